"""Refresh-token rotation (sync.refresh_tokens): the rule on plain data, then on the database."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import RefreshTokenFamily
from sync import refresh_tokens
from sync.refresh_tokens import (
    RETRIED,
    REUSED,
    REVOKED,
    ROTATED,
    FamilyState,
    Presented,
    exchange,
    judge,
    purge_expired,
)
from tests import factories

T0 = dt.datetime(2026, 12, 2, 8, 0, tzinfo=dt.UTC)
GRACE = dt.timedelta(seconds=60)
SECOND = dt.timedelta(seconds=1)
TTL = dt.timedelta(days=14)

# -- the rule ---------------------------------------------------------------------------------

USED_AT_T0 = FamilyState(current_jti="c" * 32, used_jti="u" * 32, used_at=T0)


@pytest.mark.parametrize(
    ("jti", "now", "verdict"),
    [
        ("c" * 32, T0 + dt.timedelta(hours=1), ROTATED),  # the current token, at any time
        ("u" * 32, T0, RETRIED),  # the one used last, at once again: a retry
        ("u" * 32, T0 + GRACE - SECOND, RETRIED),
        ("u" * 32, T0 + GRACE, REUSED),  # the grace is over
        ("o" * 32, T0 + SECOND, REUSED),  # used before the last one: never a retry
    ],
)
def test_a_token_is_judged_by_its_place_in_the_family(
    jti: str, now: dt.datetime, verdict: str
) -> None:
    assert judge(USED_AT_T0, jti, now=now, grace=GRACE) == verdict


def test_a_revoked_family_refuses_every_token_of_it() -> None:
    revoked = FamilyState(current_jti="c" * 32, used_jti="u" * 32, used_at=T0, revoked=True)
    for jti in ("c" * 32, "u" * 32, "o" * 32):
        assert judge(revoked, jti, now=T0, grace=GRACE) == REVOKED


def test_a_retry_right_after_a_retried_refresh_is_a_reuse() -> None:
    """A copy kept in step with the PDA (refreshing seconds after it, every time) would
    be a retry forever; two generations retried in a row are a reuse."""
    after_a_retry = FamilyState(
        current_jti="c" * 32, used_jti="u" * 32, used_at=T0, retried_before=True
    )
    assert judge(after_a_retry, "u" * 32, now=T0 + SECOND, grace=GRACE) == REUSED
    assert judge(after_a_retry, "c" * 32, now=T0 + SECOND, grace=GRACE) == ROTATED


def test_no_grace_makes_every_second_use_a_reuse() -> None:
    assert judge(USED_AT_T0, "u" * 32, now=T0, grace=dt.timedelta(0)) == REUSED


def test_a_clock_read_before_the_use_it_waited_for_is_no_grace() -> None:
    """Two refreshes at once: the second to get the family's row may have read the
    clock before the first recorded its use. Without a grace it is still a reuse; with
    one, a retry."""
    before = T0 - dt.timedelta(milliseconds=1)
    assert judge(USED_AT_T0, "u" * 32, now=before, grace=dt.timedelta(0)) == REUSED
    assert judge(USED_AT_T0, "u" * 32, now=before, grace=GRACE) == RETRIED


# -- on the database --------------------------------------------------------------------------


@pytest.fixture
def courier(session: Session) -> int:
    station = factories.station(session)
    user_id = factories.user(session, "courier1", "courier", station).id
    session.commit()
    return user_id


def signed_in(user_id: int, at: dt.datetime = T0) -> Presented:
    """The refresh token a sign-in at ``at`` hands out: its family is its own jti."""
    jti = refresh_tokens.new_jti()
    return Presented(family=jti, jti=jti, user_id=user_id, expires_at=at + TTL)


def use(session: Session, token: Presented, now: dt.datetime, grace: dt.timedelta = GRACE):
    """Exchange ``token`` at ``now`` (committed); the next token, as the edge would sign it."""
    result = exchange(session=session, presented=token, now=now, grace=grace, expires_at=now + TTL)
    session.commit()
    issued = None
    if result.refusal is None:
        assert result.refresh_jti is not None
        issued = Presented(
            family=result.family,
            jti=result.refresh_jti,
            user_id=token.user_id,
            expires_at=now + TTL,
        )
    return result, issued


def family_row(session: Session, family: str) -> RefreshTokenFamily | None:
    session.expire_all()
    return session.get(RefreshTokenFamily, family)


def test_signing_in_stores_nothing_and_the_first_refresh_starts_the_family(
    session: Session, courier: int
) -> None:
    first = signed_in(courier)
    assert family_row(session, first.family) is None
    result, second = use(session, first, T0 + dt.timedelta(hours=1))
    assert (result.verdict, result.refusal) == (ROTATED, None)
    assert second is not None and second.family == first.family and second.jti != first.jti
    row = family_row(session, first.family)
    assert row is not None
    assert (row.user_id, row.current_jti, row.used_jti) == (courier, second.jti, first.jti)
    assert row.used_at == T0 + dt.timedelta(hours=1) and row.revoked_at is None
    assert row.expires_at == second.expires_at


def test_each_token_is_exchanged_once_down_the_family(session: Session, courier: int) -> None:
    token, now = signed_in(courier), T0
    seen = {token.jti}
    for _ in range(4):
        now += dt.timedelta(hours=1)
        result, token = use(session, token, now)
        assert result.verdict == ROTATED and token is not None
        seen.add(token.jti)
    assert len(seen) == 5
    assert session.scalar(select(func.count()).select_from(RefreshTokenFamily)) == 1


def test_a_retry_within_the_grace_gets_the_familys_current_token_again(
    session: Session, courier: int
) -> None:
    """The answer to the first use was lost: the retry is given the same next token
    (same jti), so the family still has exactly one token to exchange."""
    first = signed_in(courier)
    _, lost = use(session, first, T0)
    result, retried = use(session, first, T0 + 30 * SECOND)
    assert (result.verdict, result.refusal) == (RETRIED, None)
    assert retried is not None and lost is not None
    assert (retried.family, retried.jti) == (lost.family, lost.jti)
    # The retry does not move the grace: it counts from the first use.
    late, _ = use(session, first, T0 + GRACE)
    assert late.verdict == REUSED


def test_a_reuse_revokes_the_family_and_its_newest_token_with_it(
    session: Session, courier: int
) -> None:
    first = signed_in(courier)
    _, second = use(session, first, T0)
    assert second is not None
    reused, _ = use(session, first, T0 + GRACE + SECOND)
    assert reused.verdict == REUSED
    assert reused.refusal is not None and reused.refusal.code == "refresh_token_reused"
    assert "sign in again" in reused.refusal.message
    row = family_row(session, first.family)
    assert row is not None and row.revoked_at == T0 + GRACE + SECOND
    newest, _ = use(session, second, T0 + GRACE + 2 * SECOND)
    assert newest.verdict == REVOKED
    assert newest.refusal is not None and newest.refusal.code == "refresh_token_revoked"
    assert "sign in again" in newest.refusal.message


def test_a_token_two_exchanges_back_is_a_reuse_even_within_the_grace(
    session: Session, courier: int
) -> None:
    first = signed_in(courier)
    _, second = use(session, first, T0)
    assert second is not None
    use(session, second, T0 + SECOND)
    result, _ = use(session, first, T0 + 2 * SECOND)
    assert result.verdict == REUSED


def test_families_are_independent(session: Session, courier: int) -> None:
    """Two sign-ins (two PDAs' worth, or one signing in again): a reuse in one family
    leaves the other alone."""
    one, other = signed_in(courier), signed_in(courier)
    _, one_next = use(session, one, T0)
    _, other_next = use(session, other, T0)
    assert use(session, one, T0 + GRACE + SECOND)[0].verdict == REUSED
    assert other_next is not None
    assert use(session, other_next, T0 + GRACE + SECOND)[0].verdict == ROTATED


def test_a_token_from_before_rotation_is_its_own_familys_first(
    session: Session, courier: int
) -> None:
    """A refresh token issued before families existed has no ``fam``: its family is
    its jti, so it is accepted once and then rotated like any other."""
    legacy = Presented(family=None, jti="l" * 32, user_id=courier, expires_at=T0 + TTL)
    assert legacy.family_id == "l" * 32
    result, issued = use(session, legacy, T0)
    assert result.verdict == ROTATED
    assert issued is not None and issued.family == "l" * 32
    assert use(session, legacy, T0 + GRACE + SECOND)[0].verdict == REUSED


def test_a_later_token_of_a_family_never_stored_is_refused(session: Session, courier: int) -> None:
    """Only a family's first token may start its row: a later one whose family is not
    stored (purged, or a database restored from before it) is refused."""
    stray = Presented(family="f" * 32, jti="j" * 32, user_id=courier, expires_at=T0 + TTL)
    result, _ = use(session, stray, T0)
    assert result.verdict == REVOKED
    assert result.refusal is not None and result.refusal.code == "refresh_token_revoked"
    assert family_row(session, "f" * 32) is None


def test_the_family_expires_with_its_newest_token(session: Session, courier: int) -> None:
    first = signed_in(courier)
    _, second = use(session, first, T0 + dt.timedelta(days=1))
    assert second is not None
    row = family_row(session, first.family)
    assert row is not None and row.expires_at == T0 + dt.timedelta(days=1) + TTL
    # A retry issued later keeps the latest expiry.
    use(session, first, T0 + dt.timedelta(days=1) + 10 * SECOND)
    row = family_row(session, first.family)
    assert row is not None and row.expires_at == T0 + dt.timedelta(days=1, seconds=10) + TTL


def test_the_purge_deletes_only_families_whose_tokens_have_all_expired(
    session: Session, courier: int
) -> None:
    old, recent = signed_in(courier, T0 - TTL), signed_in(courier)
    use(session, old, T0 - TTL)
    use(session, recent, T0)
    revoked = signed_in(courier, T0 - TTL)
    use(session, revoked, T0 - TTL)
    use(session, revoked, T0 - TTL + GRACE + SECOND)  # reused: revoked, expires as the others

    now = T0 + refresh_tokens.PURGE_MARGIN
    assert purge_expired(session=session, now=now) == {"families": 0}  # within the margin
    assert purge_expired(session=session, now=now + SECOND) == {"families": 2}
    session.commit()
    left = session.scalars(select(RefreshTokenFamily.id)).all()
    assert left == [recent.family]
    # Idempotent: run again at the same time, nothing more goes.
    assert purge_expired(session=session, now=now + SECOND) == {"families": 0}
