"""Bearer tokens (PyJWT, HS256) and the one role/station check every blueprint uses.

Access tokens carry ``sub`` (user id), ``role``, ``station`` (station id or
null), ``device`` (couriers), ``iat``, ``exp``, ``jti``, ``typ`` and ``ver``
(the account's credentials version), and ``fam``, their sign-in's family, whose
revocation stops them (``sync.accounts``). What a
token was issued for is re-checked on every request, so retiring a device or
disabling an account takes effect at once. Refresh tokens carry the same and
``fam``, their family: each is exchanged once (``exchange_refresh_token``,
``sync.refresh_tokens``).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from functools import wraps
from typing import Any

import jwt
from flask import Flask, Request, current_app, g, request
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from courier_api import metrics
from models import Device, Role, User, utcnow
from sync import audit, refresh_tokens
from sync.accounts import TokenSubject, check_token_subject, load_token_subject
from sync.errors import AuthenticationFailed, NotFound, PermissionDenied

log = logging.getLogger(__name__)

ALGORITHM = "HS256"
ACCESS = "access"
REFRESH = "refresh"
REQUIRED_CLAIMS = ["sub", "role", "iat", "exp", "jti", "typ", "ver"]
# Roles that read across stations; what they may write is decided by each view's roles.
ROLE_VALUES = frozenset(role.value for role in Role)
CROSS_STATION_ROLES = frozenset({Role.ADMIN, Role.AUDITOR, Role.INTEGRATION})


@dataclass(frozen=True)
class Principal:
    """Who is calling, as established from a verified token."""

    user_id: int
    role: Role
    station_id: int | None
    device_id: str | None

    @classmethod
    def of(cls, user: User, device: Device | None = None) -> Principal:
        """The principal of a checked user (with the device of a courier's token)."""
        return cls(
            user_id=user.id,
            role=user.role,
            station_id=user.station_id,
            device_id=device.id if device else None,
        )

    @classmethod
    def of_subject(cls, subject: TokenSubject) -> Principal:
        """The principal of a token checked on a plain row (``check_token_subject``):
        its fields of the same names."""
        return cls(**{field.name: getattr(subject, field.name) for field in fields(cls)})

    @classmethod
    def of_claims(cls, claims: dict[str, Any]) -> Principal:
        """The principal a verified token names, before its account is checked."""
        role = Role(claims["role"])
        return cls(
            user_id=int(claims["sub"]),
            role=role,
            station_id=claims.get("station"),
            device_id=claims.get("device") if role == Role.COURIER else None,
        )

    @property
    def is_cross_station(self) -> bool:
        return self.role in CROSS_STATION_ROLES

    def can_access_station(self, station_id: int | None) -> bool:
        return self.is_cross_station or (station_id is not None and station_id == self.station_id)

    def station_filter(self, requested: int | None) -> int | None:
        """The station a listing is limited to: a station-bound caller's own, whatever
        they asked for; for cross-station roles, what they asked (``None``: all)."""
        return requested if self.is_cross_station else self.station_id


@dataclass(frozen=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int
    refresh_expires_in: int


def issue_tokens(
    user: User,
    device: Device | None,
    *,
    family: str | None = None,
    refresh_jti: str | None = None,
) -> TokenPair:
    """A new pair. A sign-in's refresh token starts a family, named after it; a
    refresh's is the one ``sync.refresh_tokens.exchange`` decided on (``family``,
    ``refresh_jti``)."""
    config = current_app.config
    access_ttl = config["JWT_ACCESS_TTL_SECONDS"]
    refresh_ttl = config["JWT_REFRESH_TTL_SECONDS"]
    jti = refresh_jti or refresh_tokens.new_jti()
    family = family or jti
    return TokenPair(
        # The access token names its sign-in's family too: a reuse that revokes the
        # family stops it at once (``sync.accounts``), not when its hour is up.
        access_token=_encode(user, device, ACCESS, access_ttl, family=family),
        refresh_token=_encode(user, device, REFRESH, refresh_ttl, jti=jti, family=family),
        expires_in=access_ttl,
        refresh_expires_in=refresh_ttl,
    )


def _encode(
    user: User,
    device: Device | None,
    token_type: str,
    ttl: int,
    *,
    jti: str | None = None,
    family: str | None = None,
) -> str:
    now = dt.datetime.now(dt.UTC)
    claims: dict[str, Any] = {
        "sub": str(user.id),
        "role": user.role.value,
        "station": user.station_id,
        "device": device.id if device else None,
        "iat": now,
        "exp": now + dt.timedelta(seconds=ttl),
        "jti": jti or refresh_tokens.new_jti(),
        "typ": token_type,
        "ver": user.credentials_version,
    }
    if family is not None:
        claims["fam"] = family
    return jwt.encode(claims, current_app.config["JWT_SECRET"], algorithm=ALGORITHM)


def exchange_refresh_token(token: str) -> tuple[User, Device | None, TokenPair]:
    """``POST /auth/refresh``: verify ``token``, check its account (and device) again as
    every request does, then exchange it in its family (``sync.refresh_tokens``) for a
    new pair. Commits; a refusal is raised after the commit, so that a reuse's
    revocation of the family stands."""
    from courier_api.extensions import db

    claims = decode_token(token, expected_type=REFRESH)
    _, user, device = principal_from_claims(claims)
    now = utcnow()
    config = current_app.config
    exchanged = refresh_tokens.exchange(
        session=db.session,
        presented=refresh_tokens.Presented(
            family=claims.get("fam"),
            jti=claims["jti"],
            user_id=user.id,
            expires_at=dt.datetime.fromtimestamp(claims["exp"], dt.UTC),
        ),
        now=now,
        grace=dt.timedelta(seconds=config["REFRESH_REUSE_GRACE_SECONDS"]),
        expires_at=now + dt.timedelta(seconds=config["JWT_REFRESH_TTL_SECONDS"]),
    )
    if exchanged.refusal is not None:
        db.session.commit()
        metrics.token_refresh(exchanged.verdict)
        if exchanged.verdict == refresh_tokens.REUSED:
            log.warning(
                "refresh token reused: sign-in family %s of user %s on device %s revoked",
                exchanged.family,
                user.id,
                device.id if device is not None else "-",
            )
        raise exchanged.refusal
    pair = issue_tokens(user, device, family=exchanged.family, refresh_jti=exchanged.refresh_jti)
    db.session.commit()
    metrics.token_refresh(exchanged.verdict)
    return user, device, pair


def end_sign_in(token: str) -> None:
    """``POST /auth/logout``: verify the refresh ``token`` and end its sign-in's family
    (``sync.refresh_tokens.end_family``): its refresh and access tokens stop at once.
    Commits."""
    from courier_api.extensions import db

    claims = decode_token(token, expected_type=REFRESH)
    refresh_tokens.end_family(
        session=db.session,
        presented=refresh_tokens.Presented(
            family=claims.get("fam"),
            jti=claims["jti"],
            user_id=int(claims["sub"]),
            expires_at=dt.datetime.fromtimestamp(claims["exp"], dt.UTC),
        ),
        now=utcnow(),
    )
    db.session.commit()
    # As a reuse is: a PDA whose pushes then meet 401 ``token_revoked`` mid-shift (a
    # copy of its refresh token is enough to sign it out) shows here which it was.
    log.info(
        "signed out: sign-in family %s of user %s on device %s ended",
        claims.get("fam") or claims["jti"],
        claims["sub"],
        claims.get("device") or "-",
    )


class VerifiedTokens:
    """The tokens this app verified lately, with their claims: a PDA sends the same
    access token with every push, and verifying it (the signature, and PyJWT's checks
    of each segment, character by character) cost a one-scan push through the test
    client 7 % of its processor time (pushes with and without it alternating in one
    process). A token is found only as the same string signed with the same secret,
    so a tampered or forged one is verified in full; its expiry is checked on each
    use. The claims are shared between the requests: read them, never change them.
    """

    LIMIT = 4096  # tokens held; when full, it starts over

    def __init__(self) -> None:
        self._claims: dict[str, tuple[str, dict[str, Any]]] = {}

    @staticmethod
    def of_app(app: Flask | None = None) -> VerifiedTokens:
        """The current app's (or ``app``'s)."""
        extensions = (app or current_app).extensions
        found = extensions.get(_VERIFIED_TOKENS)
        if found is None:
            found = extensions.setdefault(_VERIFIED_TOKENS, VerifiedTokens())
        return found  # type: ignore[no-any-return]

    def get(self, token: str, secret: str) -> dict[str, Any] | None:
        held = self._claims.get(token)
        if held is None or held[0] != secret:
            return None
        claims = held[1]
        if claims["exp"] <= clock():
            self._claims.pop(token, None)
            raise _expired()
        return claims

    def keep(self, token: str, secret: str, claims: dict[str, Any]) -> None:
        if len(self._claims) >= self.LIMIT:
            self._claims.clear()
        self._claims[token] = (secret, claims)


_VERIFIED_TOKENS = "courier_api.verified_tokens"
clock = time.time  # the expiry check of a token verified before (tests move it)


def _expired() -> AuthenticationFailed:
    return AuthenticationFailed(
        "the token has expired; refresh it or sign in again", code="token_expired"
    )


def decode_token(token: str, *, expected_type: str) -> dict[str, Any]:
    """Verify signature, algorithm, expiry and type; raise ``AuthenticationFailed`` otherwise.
    A token verified before is found in ``VerifiedTokens``, its expiry checked again."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]  # once: see logs
    secret = app.config["JWT_SECRET"]
    verified = VerifiedTokens.of_app(app)
    claims = verified.get(token, secret)
    if claims is None:
        claims = _verify(token, secret)
        verified.keep(token, secret, claims)
    if claims["typ"] != expected_type:
        raise AuthenticationFailed(
            f"this is the {claims['typ']} token, which cannot be used here; send the "
            f"{expected_type} token",
            code="wrong_token_type",
        )
    return claims


def _verify(token: str, secret: str) -> dict[str, Any]:
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": REQUIRED_CLAIMS},
        )
    except jwt.ExpiredSignatureError:
        raise _expired() from None
    except jwt.PyJWTError as exc:
        raise AuthenticationFailed(
            f"the token is invalid ({exc}): send the token exactly as the sign-in or "
            "refresh gave it, or sign in again",
            code="token_invalid",
        ) from None
    if (
        not str(claims["sub"]).isdigit()
        or claims["role"] not in ROLE_VALUES
        or not isinstance(claims["ver"], int)
    ):
        raise AuthenticationFailed("the token's claims are malformed", code="token_invalid")
    return claims


def principal_from_claims(
    claims: dict[str, Any], session: Session | None = None
) -> tuple[Principal, User, Device | None]:
    """Load and re-check the user (and device) a verified token names, in ``session``
    (the request's by default)."""
    from courier_api.extensions import db

    user, device = load_token_subject(session=session or db.session, **_subject_of(claims))
    return Principal.of(user, device), user, device


def _subject_of(claims: dict[str, Any]) -> dict[str, Any]:
    """What a verified token names, as ``sync.accounts`` checks it."""
    return {
        "user_id": int(claims["sub"]),
        "device_id": claims.get("device"),
        "credentials_version": claims["ver"],
        "issued_at": dt.datetime.fromtimestamp(claims["iat"], dt.UTC),
        # An access token's family is checked on every request; a refresh token's is
        # judged by its exchange (``sync.refresh_tokens``), which says reused or revoked.
        "family": claims.get("fam") if claims["typ"] == ACCESS else None,
    }


def checked_principal(claims: dict[str, Any]) -> Principal:
    """``principal_from_claims`` for a request that only reads; for one that writes, the
    same check on one plain row (``sync.accounts.check_token_subject``) in the request's
    transaction, and on a SQLite file first in a reading transaction of its own, to
    spare the writers (``Database.read_apart``).

    A view that sets ``SIGN_IN_CHECKED_WHEN_WRITING`` (the sync push) gets the principal
    its token names, and the check runs once, as the first statement of its writing
    transaction (``Database.check_when_writing``), which must then find the same
    principal: no reading transaction before it, which cost a one-scan push a tenth of
    its processor time.

    Where the check loads the user and device into the request's session, they are
    held for the request (``g.signed_in``): the session's identity map only keeps
    objects referenced elsewhere, and a view getting them then sends no statement.
    """
    from courier_api.extensions import db

    def in_session(session: Session) -> Principal:
        principal, user, device = principal_from_claims(claims, session)
        g.signed_in = (user, device)
        return principal

    def on_a_row(connection: Connection) -> Principal:
        return Principal.of_subject(check_token_subject(connection, **_subject_of(claims)))

    if not db.checks_when_writing():
        return db.read_apart(in_session, on_a_row)
    named = Principal.of_claims(claims)

    def names_the_same(connection: Connection) -> None:
        if on_a_row(connection) != named:
            raise AuthenticationFailed(
                "this token was issued before the account's role or station changed; "
                "sign in again",
                code="token_revoked",
            )

    db.check_when_writing(names_the_same)
    return named


def bearer_token(req: Request | None = None) -> str:
    """The access token the request (or ``req``) is sent with."""
    header = (req or request).headers.get("Authorization", "")
    if not header:
        raise AuthenticationFailed(
            "send an access token: 'Authorization: Bearer <token>'", code="token_missing"
        )
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed(
            "the Authorization header must be 'Bearer <token>'", code="token_invalid"
        )
    return token.strip()


def require_auth(*roles: Role) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Authenticate the request; allow only ``roles`` when some are given."""
    allowed = frozenset(roles)

    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            # Out of their proxies once: ``courier_api.logs._start_request`` says why.
            req, ctx = request._get_current_object(), g._get_current_object()  # type: ignore[attr-defined]
            claims = decode_token(bearer_token(req), expected_type=ACCESS)
            # The whole body is in before the first query: a PDA sending its batch over
            # a weak signal holds no database connection meanwhile (on SQLite, not the
            # writers' turn, which every other push would wait for). Parsers read it
            # from here (werkzeug caches it). So a token with a valid signature whose
            # account is disabled sends its body before its 401 (a body beyond the
            # limit is a 413 first).
            req.get_data(cache=True)
            principal = checked_principal(claims)
            ctx.token_claims = claims  # a long request checks them again (the long pull)
            if allowed and principal.role not in allowed:
                role = principal.role.value
                article = "an" if role[0] in "aeiou" else "a"
                raise PermissionDenied(f"{article} {role} may not do this", code="role_forbidden")
            ctx.principal = principal
            return view(*args, **kwargs)

        return wrapper

    return decorator


def current_principal() -> Principal:
    principal: Principal | None = g._get_current_object().get("principal")  # type: ignore[attr-defined]
    if principal is None:
        raise RuntimeError("current_principal() outside a view decorated with require_auth")
    return principal


def ensure_station_access(station_id: int | None) -> None:
    """Managers and couriers see only their own station; cross-station roles see all.

    For a station the caller names (in the path, a filter, a body): every caller lists
    the stations, so a 403 tells nothing. An object found by its key uses
    ``ensure_visible``."""
    principal = current_principal()
    if not principal.can_access_station(station_id):
        raise PermissionDenied("this belongs to another station", code="station_forbidden")


def ensure_visible(station_id: int | None, unknown: NotFound) -> None:
    """An object found by its key (a parcel, shift, flag, proof, ...), belonging to
    ``station_id``: for a manager or courier of another station it does not exist.

    ``unknown`` is what looking the key up answers when nothing has it (``sync``'s
    ``shift_not_found(shift_id)``, ...), and that is the answer: a 403 would tell a
    curious manager of another station that the tracking number or id they tried
    exists (SECURITY.md threat 3). Cross-station roles see every station's."""
    if not current_principal().can_access_station(station_id):
        raise unknown


def record_auditor_read(
    action: str,
    subject_type: str,
    subject_key: str,
    details: dict[str, Any] | None = None,
    principal: Principal | None = None,
    tracking_no: str | None = None,
    parcels: Iterable[str] = (),
) -> None:
    """DESIGN.md rule 7: an auditor's read of proofs, images or unmasked parcels is on
    record, committed, before the data goes out; other roles' reads are not recorded.
    ``tracking_no``: the parcel read, when the read is of one parcel's; ``parcels``:
    the parcels it showed, when it showed several (``GET /audit?tracking_no=`` lists it
    with each one's other entries). A request that only reads (``READS_ONLY``) writes
    the entry in a short transaction of its own (``Database.write_apart``), so that
    its read holds no writers' turn: call it once the read is done, as it ends the
    request's reading transaction."""
    record_auditor_reads(
        [AuditorRead(action, subject_type, subject_key, details or {}, tracking_no, parcels)],
        principal,
    )


@dataclass(frozen=True)
class AuditorRead:
    """One read an answer shows, to put on record (``record_auditor_read``'s fields)."""

    action: str
    subject_type: str
    subject_key: str
    details: dict[str, Any]
    tracking_no: str | None = None
    parcels: Iterable[str] = ()


def record_auditor_reads(reads: Sequence[AuditorRead], principal: Principal | None = None) -> None:
    """``record_auditor_read`` for the reads one answer shows (a proof page: the proof
    and the parcel's rejected events), in one transaction: all on record, or none when
    the write fails and the answer is not given. Call it last, the answer built (a
    page rendered), so that a request failing before it leaves no read on record.

    A ``HEAD`` is not a read: Flask answers it with the GET view's headers and no body,
    so nothing was seen (an image's type and length, its digest already known), and the
    log says who saw what: recorded, an auditor's tool checking a link or a cache would
    put on record an image or a proof nobody looked at, beside the reads of a dispute."""
    principal = principal or current_principal()
    if principal.role != Role.AUDITOR or not reads or request.method == "HEAD":
        return
    # Imported here: courier_api.extensions imports the API base, which imports this module.
    from courier_api.extensions import db

    def record(session: Session) -> None:
        # The request's client, set again here: a streamed answer (the CSV export)
        # records its parts after the view returned, outside the context its request's
        # before_request set it in (``courier_api.app``), which then reads none.
        address = audit.CLIENT_IP.set(audit.client_ip(request.remote_addr))
        try:
            _append_reads(session)
        finally:
            audit.CLIENT_IP.reset(address)

    def _append_reads(session: Session) -> None:
        for read in reads:
            audit.append(
                session=session,
                actor_id=principal.user_id,
                action=read.action,
                subject_type=read.subject_type,
                subject_key=read.subject_key,
                details=read.details,
                tracking_no=read.tracking_no,
                parcels=read.parcels,
            )

    if db.request_only_reads():
        db.write_apart(record)
        return
    record(db.session)
    db.session.commit()
