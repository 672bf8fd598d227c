"""Sign-in rules: passwords, the device a courier signs in with, and token subjects.

The token format itself (JWT) belongs to the web edge; what makes a sign-in or
a token acceptable is decided here.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import cache

from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from werkzeug.security import check_password_hash, generate_password_hash

from models import Device, DeviceStatus, RefreshTokenFamily, Role, User, utcnow
from sync.errors import AuthenticationFailed, InvalidInput, PermissionDenied
from sync.sql import Prebuilt

# Built once (``sync.sql.Prebuilt`` says why): every request a PDA makes runs it. The
# token's sign-in family, when it names one, is looked up by its key in the same query:
# a family revoked (by a reuse, or signed out) stops its access tokens too.
USER_AND_DEVICE = (
    select(User, Device, RefreshTokenFamily.revoked_at)
    .select_from(User)
    .outerjoin(Device, Device.id == bindparam("device_id"))
    .outerjoin(RefreshTokenFamily, RefreshTokenFamily.id == bindparam("family"))
    .where(User.id == bindparam("user_id"))
)
_users, _devices = User.__table__, Device.__table__
_families = RefreshTokenFamily.__table__
# ``USER_AND_DEVICE`` as plain rows (``check_token_subject``).
SUBJECT_ROWS = Prebuilt(
    lambda _dialect: (
        select(
            _users.c.active,
            _users.c.credentials_version,
            _users.c.role,
            _users.c.station_id,
            _devices.c.id.label("device_id"),
            _devices.c.station_id.label("device_station_id"),
            _devices.c.status.label("device_status"),
            _devices.c.status_changed_at.label("device_status_changed_at"),
            _devices.c.moved_at.label("device_moved_at"),
            _families.c.revoked_at.label("family_revoked_at"),
        )
        .select_from(_users)
        .outerjoin(_devices, _devices.c.id == bindparam("device_id"))
        .outerjoin(_families, _families.c.id == bindparam("family"))
        .where(_users.c.id == bindparam("user_id"))
    )
)
PASSWORD_MIN_LENGTH = 8
DEFAULT_PASSWORD_HASH_METHOD = "scrypt"


@cache
def _dummy_hash(method: str) -> str:
    """Checked against when the username is unknown, so that a wrong username costs
    the same time as a wrong password and does not reveal which accounts exist."""
    return generate_password_hash("not-the-password", method=method)


def check_password_hash_method(method: str) -> None:
    """Raise ``ValueError`` unless ``method`` is one werkzeug can hash with.

    Hashes the dummy password once, which the first unknown-user sign-in needs anyway.
    """
    try:
        _dummy_hash(method)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a usable password hash method ({exc})") from None


def hash_password(password: str, *, method: str = DEFAULT_PASSWORD_HASH_METHOD) -> str:
    if len(password) < PASSWORD_MIN_LENGTH:
        raise InvalidInput(
            f"password must have at least {PASSWORD_MIN_LENGTH} characters",
            code="weak_password",
            field="password",
        )
    return generate_password_hash(password, method=method)


@dataclass(frozen=True)
class SignIn:
    user: User
    device: Device | None


def authenticate(
    *,
    session: Session,
    username: str,
    password: str,
    device_id: str | None,
    password_hash_method: str = DEFAULT_PASSWORD_HASH_METHOD,
) -> SignIn:
    """Check a username and password, and for couriers the device they sign in with."""
    user = session.scalar(select(User).where(User.username == username.strip().lower()))
    if user is None:
        check_password_hash(_dummy_hash(password_hash_method), password)
        raise AuthenticationFailed("wrong username or password", code="invalid_credentials")
    if not check_password_hash(user.password_hash, password):
        raise AuthenticationFailed("wrong username or password", code="invalid_credentials")
    if not user.active:
        raise AuthenticationFailed("this account is disabled", code="account_disabled")
    device = _device_for_sign_in(session=session, user=user, device_id=device_id)
    if device is not None:
        device.last_seen_at = utcnow()
    _rehash_in(session, user, password, password_hash_method)
    return SignIn(user=user, device=device)


def _method_of(password_hash: str) -> str:
    """``scrypt:32768:8:1`` of ``scrypt:32768:8:1$salt$hash``: the method as werkzeug
    spells it in full, whichever way the configuration named it (``scrypt``)."""
    return password_hash.split("$", 1)[0]


def _rehash_in(session: Session, user: User, password: str, method: str) -> None:
    """The account's password hashed again with the configured method when it was hashed
    with another: a wrong password then costs what a wrong username costs (the unknown
    username's check is of the configured method, ``_dummy_hash``). Hashes kept from
    before ``PASSWORD_HASH_METHOD`` changed (scrypt, 0.2 s, beside pbkdf2's 0.6 s) told
    every such account from a name nobody has. The password is the same: not a change
    of it (``credentials_version`` stays, no token is revoked, nothing is audit-logged).

    Written only over the hash that was checked: a password changed meanwhile (committed
    during the check, PostgreSQL) was written over with the old one, which signed in
    again though the change had been made to shut it out. Then the new hash stays, and
    this sign-in's tokens carry the ``credentials_version`` the change left behind."""
    checked = user.password_hash
    if _method_of(checked) == _method_of(_dummy_hash(method)):
        return
    rehashed = generate_password_hash(password, method=method)
    written = session.execute(
        update(User)
        .where(User.id == user.id, User.password_hash == checked)
        .values(password_hash=rehashed)
        .execution_options(synchronize_session=False)
    ).rowcount
    if written:
        set_committed_value(user, "password_hash", rehashed)


def _device_for_sign_in(*, session: Session, user: User, device_id: str | None) -> Device | None:
    if user.role != Role.COURIER:
        if device_id:
            raise InvalidInput(
                "only couriers sign in with a device",
                code="device_not_expected",
                field="device_id",
            )
        return None
    if not device_id:
        raise InvalidInput(
            "couriers sign in with the id of their device",
            code="device_required",
            field="device_id",
        )
    device = session.get(Device, device_id)
    if device is None or device.station_id != user.station_id:
        raise PermissionDenied(
            f"device {device_id} is not registered at your station; sign in with the id "
            "of a PDA of your station, as a manager registered it",
            code="device_not_allowed",
            field="device_id",
        )
    if device.status != DeviceStatus.ACTIVE:
        raise PermissionDenied(
            f"device {device_id} is {device.status.value} and cannot be used",
            code="device_not_active",
            field="device_id",
        )
    return device


def _user_and_device(
    session: Session, user_id: int, device_id: str | None, family: str | None
) -> tuple[User | None, Device | None, bool]:
    """One query for the three (the user, the device, whether the token's sign-in
    family was revoked): every request a PDA makes starts here."""
    if not device_id and not family:
        return session.get(User, user_id), None, False
    found = session.execute(
        USER_AND_DEVICE, {"user_id": user_id, "device_id": device_id or "", "family": family}
    ).one_or_none()
    if found is None:
        return None, None, False
    return found[0], found[1], found[2] is not None


def load_token_subject(
    *,
    session: Session,
    user_id: int,
    device_id: str | None,
    credentials_version: int,
    issued_at: dt.datetime | None = None,
    family: str | None = None,
) -> tuple[User, Device | None]:
    """Re-check on every request what a token was issued for.

    A token outlives the facts it was issued on: a disabled account, a changed
    password, a device reported lost or retired, must stop it at once, not at expiry;
    and a device found again does not bring back the tokens issued before it was
    reported (a thief's copies). ``credentials_version`` is the account's version the
    token was issued with, ``issued_at`` when (a device's token; to the second),
    ``family`` the sign-in it belongs to (its ``fam``): a reuse of one of its refresh
    tokens, or signing out, revoked them all, the access tokens with them.
    """
    user, device, family_revoked = _user_and_device(session, user_id, device_id, family)
    _check_subject(user, device, credentials_version, issued_at, family_revoked)
    assert user is not None
    return user, device if user.role == Role.COURIER else None


def sign_out_of_pages(*, session: Session, user_id: int, at: dt.datetime) -> None:
    """End every page session of the account begun before ``at``.

    A page session is a signed cookie: clearing it in one browser leaves any copy of
    it working (taken from a shared computer, say). Signing out ends them all; the
    account's tokens, its PDA's included, are left alone.
    """
    user = session.get(User, user_id)
    if user is not None and (user.pages_signed_out_at is None or user.pages_signed_out_at < at):
        user.pages_signed_out_at = at


def page_session_ended(user: User, signed_in_at: dt.datetime | None) -> bool:
    """Whether a page session begun at ``signed_in_at`` (None: before sessions kept
    their start) was ended by the account signing out of the pages since."""
    signed_out = user.pages_signed_out_at
    if signed_out is None:
        return False
    return signed_in_at is None or signed_in_at < signed_out


def page_session_start(user: User, now: dt.datetime) -> dt.datetime:
    """When a page session beginning ``now`` counts as begun: never before the
    account's last sign-out, so a sign-out stamped by a server whose clock runs ahead
    does not end the session that follows it."""
    signed_out = user.pages_signed_out_at
    return now if signed_out is None or signed_out < now else signed_out


@dataclass(frozen=True)
class TokenSubject:
    """Whom a checked token speaks for, as ``check_token_subject`` read it."""

    user_id: int
    role: Role
    station_id: int | None
    device_id: str | None  # a courier's device; None for other roles


def check_token_subject(
    connection: Connection,
    *,
    user_id: int,
    device_id: str | None,
    credentials_version: int,
    issued_at: dt.datetime | None = None,
    family: str | None = None,
) -> TokenSubject:
    """``load_token_subject``'s checks on one plain row, in ``connection``'s transaction,
    without the ORM's entities: for a request whose sign-in check reads apart from its
    writing transaction, then again as that transaction's first statement
    (``courier_api.database.Database.read_apart``), so that an account disabled or a
    device reported lost meanwhile stops it still."""
    row = SUBJECT_ROWS.run(
        connection, {"user_id": user_id, "device_id": device_id or "", "family": family}
    ).one_or_none()
    if row is None:
        _check_subject(None, None, credentials_version, issued_at)
    assert row is not None  # _check_subject refused the missing account
    user = _User(row.active, row.credentials_version, row.role, row.station_id)
    device = (
        _Device(
            row.device_id,
            row.device_station_id,
            row.device_status,
            row.device_status_changed_at,
            row.device_moved_at,
        )
        if row.device_id is not None
        else None
    )
    _check_subject(user, device, credentials_version, issued_at, row.family_revoked_at is not None)
    courier_device = device is not None and row.role == Role.COURIER
    return TokenSubject(
        user_id=user_id,
        role=row.role,
        station_id=row.station_id,
        device_id=row.device_id if courier_device else None,
    )


@dataclass(frozen=True)
class _User:
    """What ``_check_subject`` reads of a user, from a plain row."""

    active: bool
    credentials_version: int
    role: Role
    station_id: int | None


@dataclass(frozen=True)
class _Device:
    """What ``_check_subject`` reads of a device, from a plain row."""

    id: str
    station_id: int
    status: DeviceStatus
    status_changed_at: dt.datetime | None
    moved_at: dt.datetime | None


def _check_subject(
    user: User | _User | None,
    device: Device | _Device | None,
    credentials_version: int,
    issued_at: dt.datetime | None,
    family_revoked: bool = False,
) -> None:
    if user is None or not user.active:
        raise AuthenticationFailed("the account of this token is disabled", code="token_revoked")
    if credentials_version != user.credentials_version:
        raise AuthenticationFailed(
            "the password was changed after this token was issued; sign in again",
            code="token_revoked",
        )
    if user.role == Role.COURIER:
        _check_device(device, user.station_id, issued_at)
    if family_revoked:
        raise AuthenticationFailed(
            "this sign-in was ended (signed out, or one of its refresh tokens was used "
            "twice: someone may hold a copy), and its tokens with it; sign in again",
            code="token_revoked",
        )


def _check_device(
    device: Device | _Device | None, station_id: int | None, issued_at: dt.datetime | None
) -> None:
    if device is None or device.station_id != station_id:
        raise AuthenticationFailed(
            "this token's device is not registered at the courier's station", code="token_revoked"
        )
    if device.status != DeviceStatus.ACTIVE:
        raise AuthenticationFailed(
            f"device {device.id} is {device.status.value}; its tokens no longer work",
            code="device_not_active",
        )
    changed = device.status_changed_at
    # A token's iat is whole seconds: one issued in the second of the change stands.
    if (
        issued_at is not None
        and changed is not None
        and issued_at < changed.replace(microsecond=0)
    ):
        raise AuthenticationFailed(
            f"device {device.id} was reported lost or retired after this token was "
            "issued; sign in again",
            code="device_not_active",
        )
    moved = device.moved_at
    # A courier of the station it left fails the station check above; this stops the
    # tokens of one it moves back to, and of the station it left if it moves there again.
    if issued_at is not None and moved is not None and issued_at < moved.replace(microsecond=0):
        raise AuthenticationFailed(
            f"device {device.id} was moved to another station after this token was "
            "issued; sign in again",
            code="token_revoked",
        )
