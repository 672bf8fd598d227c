"""Refresh-token rotation with reuse detection (OAuth 2.0 Security BCP, RFC 9700 4.14).

Every sign-in starts a *family*: the refresh tokens that descend from it, each
exchanged once for the next. A token carries its family (claim ``fam``) and its own
id (``jti``); the family's row (``models.RefreshTokenFamily``) holds the one token
that may be exchanged now (``current_jti``), the one exchanged last (``used_jti``,
``used_at``) and whether the family was revoked. A token presented is judged
(``judge``) by its place in the family:

* the current token: **rotated**. It becomes the used one; the answer carries a new
  current token.
* the token used last, again, less than the grace after its first use: **retried**.
  A PDA whose answer was lost on a weak signal sends the same request again. It gets
  a new pair whose refresh token is the family's current one again (the same
  ``jti``, a new string), so the family still has one token to exchange, not two.
  The grace counts from the first use; retries do not extend it. Not twice in a row:
  if the token before the used one was retried too, this is a reuse (a copy that
  refreshes seconds after the PDA every time would otherwise stay in step forever).
* any other token of the family (the one used last, past the grace; one used
  before it): **reused**. Two parties hold the family's tokens, one of them with a
  copy (a thief, or a backup restored). The family is revoked: its current token is
  refused too, whoever holds it, and the holders sign in again. Within the grace the
  server cannot tell a retry from a copy: a copy presented then gets the same
  current token as the courier, so whichever of the two is exchanged second, more
  than the grace after the other, is a reuse and ends the family.
* any token of a revoked family: **revoked**.

Signing in writes nothing here: a family is named after its first token (its
``fam`` is its ``jti``), and that token's first refresh writes the row. A token
issued before rotation existed has no ``fam``; its family is its ``jti`` too, so it
is accepted once and then rotated like any other. A later token whose family has no
row (purged after expiry, a database restored from before) is refused as revoked.

Two refreshes of one family take turns: the row is locked while it is judged
(``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's writers take turns anyway), and
the first token's row is inserted ``ON CONFLICT DO NOTHING`` before it is locked,
so two first refreshes at once find one row. Without a grace, the second of two
refreshes sent together is a reuse; within it, both get the same next token.

Access tokens name their family too (``fam``): the query that checks a token's account
and device on every request reads the family's row by its key (``sync.accounts``), so
revoking a family stops its access tokens at once, not only its refreshes.

Rows stay bounded: one per family that refreshed at least once, until its newest
token has expired (``expires_at``, plus ``PURGE_MARGIN``); ``purge_expired``
deletes the rest through an index (a daily job).
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from models import RefreshTokenFamily
from sync.errors import AuthenticationFailed
from sync.sql import insert_ignoring_conflict

ROTATED = "rotated"
RETRIED = "retried"
REUSED = "reused"
REVOKED = "revoked"
# A family is purged this long after its newest token expired: servers' clocks may
# differ a little, and a token must not outlive the row that would refuse it.
PURGE_MARGIN = dt.timedelta(hours=1)


def new_jti() -> str:
    """A token's id: 128 random bits, as hex. A sign-in's refresh token's is its family's."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class FamilyState:
    """What ``judge`` reads of a family."""

    current_jti: str
    used_jti: str | None = None
    used_at: dt.datetime | None = None
    revoked: bool = False
    # The token exchanged before the one used last was presented again in its grace:
    # a second retry in a row is a reuse (a copy kept in step with the PDA).
    retried_before: bool = False


def judge(state: FamilyState, jti: str, *, now: dt.datetime, grace: dt.timedelta) -> str:
    """``ROTATED``, ``RETRIED``, ``REUSED`` or ``REVOKED``: the token ``jti`` of the
    family ``state``, presented at ``now`` (the module's docstring says why)."""
    if state.revoked:
        return REVOKED
    if jti == state.current_jti:
        return ROTATED
    if jti == state.used_jti and state.used_at is not None and not state.retried_before:
        # ``now`` is read before the family's row is locked: a refresh that read it first
        # but got the row second finds the use after ``now``. That is no time at all
        # since the use, not time before it (with no grace, a reuse).
        if max(now, state.used_at) < state.used_at + grace:
            return RETRIED
    return REUSED


@dataclass(frozen=True)
class Presented:
    """A refresh token whose signature and expiry were verified: what it names."""

    family: str | None  # its ``fam`` claim; None on a token from before rotation
    jti: str
    user_id: int
    expires_at: dt.datetime

    @property
    def family_id(self) -> str:
        return self.family or self.jti

    @property
    def is_first(self) -> bool:
        """The first token of its family (a sign-in's, or one from before rotation)."""
        return self.family_id == self.jti


@dataclass(frozen=True)
class Exchange:
    """What ``exchange`` decided: the family and ``jti`` of the refresh token to issue,
    or the refusal to raise once the transaction is committed (a reuse's revocation
    must be)."""

    verdict: str
    family: str
    refresh_jti: str | None
    refusal: AuthenticationFailed | None = None


def exchange(
    *,
    session: Session,
    presented: Presented,
    now: dt.datetime,
    grace: dt.timedelta,
    expires_at: dt.datetime,
) -> Exchange:
    """Judge ``presented`` in its family and record the outcome, in the caller's
    transaction: the caller commits, then raises ``refusal`` if there is one.
    ``expires_at``: when the refresh token about to be issued expires."""
    family_id = presented.family_id
    if presented.is_first:
        _start_family(session, presented)
    family = session.scalar(
        select(RefreshTokenFamily)
        .where(RefreshTokenFamily.id == family_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if family is None:
        return Exchange(REVOKED, family_id, None, _unknown())
    state = FamilyState(
        current_jti=family.current_jti,
        used_jti=family.used_jti,
        used_at=family.used_at,
        revoked=family.revoked_at is not None,
        retried_before=family.retried_before,
    )
    verdict = judge(state, presented.jti, now=now, grace=grace)
    if verdict == REVOKED:
        return Exchange(verdict, family_id, None, _revoked())
    if verdict == REUSED:
        family.revoked_at = now
        return Exchange(verdict, family_id, None, _reused())
    if verdict == ROTATED:
        family.used_jti, family.used_at = family.current_jti, now
        family.current_jti = new_jti()
        family.retried_before, family.used_retried = family.used_retried, False
    else:  # RETRIED
        family.used_retried = True
    family.expires_at = max(family.expires_at, expires_at)
    return Exchange(verdict, family_id, family.current_jti)


def end_family(*, session: Session, presented: Presented, now: dt.datetime) -> None:
    """Sign out: revoke ``presented``'s family, in the caller's transaction, so that its
    refresh tokens and access tokens stop now, copies included (a backup of the PDA, a
    token read off it), rather than work on for up to ``JWT_REFRESH_TTL_SECONDS`` after
    the courier signed out. A sign-in that never refreshed gets its row here. Whoever
    holds a token of the family may end it, as presenting a used one does; ending a
    family already revoked changes nothing."""
    _start_family(session, presented)
    family = session.scalar(
        select(RefreshTokenFamily)
        .where(RefreshTokenFamily.id == presented.family_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if family is not None and family.revoked_at is None:
        family.revoked_at = now


def _start_family(session: Session, presented: Presented) -> None:
    """The family's row, its first token current, unless it is stored already."""
    dialect = session.get_bind().dialect.name
    table = RefreshTokenFamily.__table__
    session.execute(
        insert_ignoring_conflict(dialect, table, on=["id"]).values(
            id=presented.family_id,
            user_id=presented.user_id,
            current_jti=presented.jti,
            expires_at=presented.expires_at,
        )
    )


def purge_expired(*, session: Session, now: dt.datetime) -> dict[str, int]:
    """Delete the families whose every token has expired (``PURGE_MARGIN`` ago): their
    tokens are refused as expired, whatever the row said. Revoked ones go too."""
    deleted = session.execute(
        delete(RefreshTokenFamily).where(RefreshTokenFamily.expires_at < now - PURGE_MARGIN)
    ).rowcount
    return {"families": int(deleted or 0)}


def _reused() -> AuthenticationFailed:
    return AuthenticationFailed(
        "this refresh token was used before: someone else may hold a copy, so every "
        "refresh token of this sign-in is revoked; sign in again",
        code="refresh_token_reused",
    )


def _revoked() -> AuthenticationFailed:
    return AuthenticationFailed(
        "this sign-in was ended (signed out, or one of its refresh tokens was used twice: "
        "someone may hold a copy); sign in again",
        code="refresh_token_revoked",
    )


def _unknown() -> AuthenticationFailed:
    return AuthenticationFailed(
        "this refresh token's sign-in is no longer known; sign in again",
        code="refresh_token_revoked",
    )
