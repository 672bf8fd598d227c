"""Stations, users and devices: who works where, with which PDA."""

from __future__ import annotations

import datetime as dt
import enum
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Device, DeviceStatus, Role, Station, User, utcnow
from sync import audit, sign_in_limits
from sync.accounts import DEFAULT_PASSWORD_HASH_METHOD, hash_password
from sync.errors import Conflict, InvalidInput, NotFound, RateLimited
from sync.paging import MAX_PAGE_SIZE

STATION_CODE = re.compile(r"[A-Z0-9][A-Z0-9_-]{1,31}")
USERNAME = re.compile(r"[a-z0-9][a-z0-9._-]{1,63}")
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{2,63}")
# The audit log's entries for a station's or a PDA's change (``_audit_changes``).
STATION_UPDATED = "station_updated"
DEVICE_UPDATED = "device_updated"
DEVICE_MOVED = "device_moved"  # an admin moved a PDA to another station (sync.device_moves)
# An account created or changed by an admin (or the command line): who may act, and as
# whom; a password changed is noted, never its hash.
USER_CREATED = "user_created"
USER_UPDATED = "user_updated"
COMMAND_LINE = "the command line"  # who changed it, when no user is known
# A manager's registration of a PDA id another station's PDA holds: on record, and bounded.
DEVICE_REGISTRATION_REFUSED = "device_registration_refused"
DEVICE_IDS_TAKEN = "device_taken"  # its calls' kind in sync.sign_in_limits
DEVICE_IDS_TAKEN_PER_MANAGER = sign_in_limits.Limit(10, dt.timedelta(hours=24))
TOO_MANY_DEVICE_IDS_TAKEN = "too_many_device_ids_taken"
TAKEN_TOO_OFTEN = (
    "too many registrations of PDA ids already registered, by this account (a PDA sent "
    "here from another station is not registered again: an admin moves it here)"
)


# -- stations ---------------------------------------------------------------------------------


def create_station(*, session: Session, code: str, name: str, timezone: str = "UTC") -> Station:
    code = code.strip().upper()
    if not STATION_CODE.fullmatch(code):
        raise InvalidInput(
            "station code is 2-32 characters: A-Z, 0-9, '_' or '-'",
            code="invalid_station_code",
            field="code",
        )
    if session.scalar(select(Station.id).where(Station.code == code)) is not None:
        raise Conflict(f"station {code} already exists", code="station_exists", field="code")
    station = Station(code=code, name=_required_text(name, "name"), timezone=_zone(timezone))
    session.add(station)
    session.flush()
    return station


def update_station(
    *,
    session: Session,
    station: Station,
    changed_by: int | None,
    name: str | None = None,
    timezone: str | None = None,
) -> Station:
    """Rename a station or change its time zone, each change on the audit log
    (``station_updated``, by ``changed_by``: None for the command line). The time zone
    decides which local day a shift, a board and a report belong to: moved, every one
    of them moves, and a dispute over a day's board must be able to see when and by
    whom. Given the values it has, nothing changes and nothing is logged."""
    changes: dict[str, tuple[Any, Any]] = {}
    if name is not None:
        _change(station, "name", _required_text(name, "name"), changes)
    if timezone is not None:
        _change(station, "timezone", _zone(timezone), changes)
    session.flush()
    _audit_changes(
        session, STATION_UPDATED, "station", str(station.id), station.id, changes, changed_by
    )
    return station


def get_station(*, session: Session, station_id: int) -> Station:
    station = session.get(Station, station_id)
    if station is None:
        raise NotFound(f"no station with id {station_id}", code="station_not_found")
    return station


def get_station_by_code(*, session: Session, code: str, field: str = "station") -> Station:
    station = session.scalar(select(Station).where(Station.code == code.strip().upper()))
    if station is None:
        raise NotFound(f"no station with code {code!r}", code="station_not_found", field=field)
    return station


def list_stations(
    *, session: Session, station_id: int | None = None, after_id: int = 0, limit: int = 100
) -> Sequence[Station]:
    query = select(Station).where(Station.id > after_id).order_by(Station.id).limit(_page(limit))
    if station_id is not None:
        query = query.where(Station.id == station_id)
    return session.scalars(query).all()


# -- users ------------------------------------------------------------------------------------


def create_user(
    *,
    session: Session,
    username: str,
    role: Role,
    station: Station | None,
    password: str,
    created_by: int | None,
    full_name: str = "",
    password_hash_method: str = DEFAULT_PASSWORD_HASH_METHOD,
) -> User:
    """A new account, on the audit log (``user_created``, by ``created_by``: None for
    the command line) with its role, station and name."""
    username = username.strip().lower()
    if not USERNAME.fullmatch(username):
        raise InvalidInput(
            "username is 2-64 characters: a-z, 0-9, '.', '_' or '-'",
            code="invalid_username",
            field="username",
        )
    _check_role_station(role, station)
    if session.scalar(select(User.id).where(User.username == username)) is not None:
        raise Conflict(f"user {username} already exists", code="user_exists", field="username")
    user = User(
        username=username,
        role=role,
        station_id=station.id if station else None,
        password_hash=hash_password(password, method=password_hash_method),
        full_name=full_name.strip(),
    )
    session.add(user)
    session.flush()
    audit.append(
        session=session,
        actor_id=created_by,
        action=USER_CREATED,
        subject_type="user",
        subject_key=str(user.id),
        details={
            "station_id": user.station_id,
            "by": _who(session, created_by),
            "username": user.username,
            "role": user.role.value,
            "full_name": user.full_name,
        },
    )
    return user


def update_user(
    *,
    session: Session,
    user: User,
    changed_by: int | None,
    full_name: str | None = None,
    active: bool | None = None,
    password: str | None = None,
    password_hash_method: str = DEFAULT_PASSWORD_HASH_METHOD,
) -> User:
    """Rename, disable or enable an account, or set its password; the changes on the
    audit log (``user_updated``, by ``changed_by``), a password only as changed.
    Nothing changed (the name it has, say), nothing is logged."""
    changes: dict[str, tuple[Any, Any]] = {}
    if full_name is not None:
        _change(user, "full_name", full_name.strip(), changes)
    # Disabling ends every session for good: enabling the account again later must not
    # bring back the tokens it had (nor does a password change).
    revoke = password is not None or (active is False and user.active)
    if active is not None:
        _change(user, "active", active, changes)
    if password is not None:
        user.password_hash = hash_password(password, method=password_hash_method)
    if revoke:
        # Incremented in SQL, so two concurrent changes both count.
        user.credentials_version = User.credentials_version + 1
    session.flush()
    _audit_changes(
        session,
        USER_UPDATED,
        "user",
        str(user.id),
        user.station_id,
        changes,
        changed_by,
        noted={"password_changed": True} if password is not None else {},
    )
    return user


def get_user(*, session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise user_not_found(user_id)
    return user


def user_not_found(user_id: int) -> NotFound:
    """What ``get_user`` answers when no user has ``user_id``."""
    return NotFound(f"no user with id {user_id}", code="user_not_found")


def list_users(
    *,
    session: Session,
    station_id: int | None = None,
    role: Role | None = None,
    after_id: int = 0,
    limit: int = 100,
) -> Sequence[User]:
    query = select(User).where(User.id > after_id).order_by(User.id).limit(_page(limit))
    if station_id is not None:
        query = query.where(User.station_id == station_id)
    if role is not None:
        query = query.where(User.role == role)
    return session.scalars(query).all()


def _check_role_station(role: Role, station: Station | None) -> None:
    if role.needs_station and station is None:
        raise InvalidInput(
            f"a {role.value} belongs to a station", code="station_required", field="station"
        )
    if not role.needs_station and station is not None:
        raise InvalidInput(
            f"a {role.value} works across stations and has none",
            code="station_not_expected",
            field="station",
        )


# -- devices ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registrar:
    """A manager registering PDAs at their own station, who may not know other
    stations' PDAs: ``user_id``, and their key for ``sign_in_limits`` (``caller_key`` of
    ``DEVICE_IDS_TAKEN``)."""

    user_id: int
    key: str
    # None (``DEVICE_IDS_TAKEN_PER_MANAGER=off``): not bounded; each id's refusal on
    # record once in the default window (24 hours), as when bounded.
    limit: sign_in_limits.Limit | None = DEVICE_IDS_TAKEN_PER_MANAGER


class DeviceIdTaken(Conflict):
    """A manager's registration refused for an id another station's PDA holds: its
    count and its audit entry are to be committed before the refusal is answered."""


def register_device(
    *,
    session: Session,
    device_id: str,
    station: Station,
    registrar: Registrar | None = None,
) -> Device:
    """Register a PDA at ``station``.

    Device ids are unique across stations, so a 409 ``device_exists`` for an id
    another station's PDA holds tells the manager asking that it exists: a curious
    manager could probe for other stations' PDAs. With ``registrar`` (a manager, not
    an admin, who sees every station) each id so refused is on the audit log
    (``device_registration_refused``: who, the id, the station asked for and the
    station holding it, for an admin to see and settle) and counted, once per window
    (``DEVICE_IDS_TAKEN_PER_MANAGER``'s when the limit is ``None``, ``off``):
    the same id tried again (a retry, a second click on a PDA another station still
    holds) tells nothing more and is answered alike, uncounted and not logged again.
    Once a manager has met ``registrar.limit`` ids in its window, every registration
    of theirs is refused (429 ``too_many_device_ids_taken``), a free id's too, so that the refusal
    says nothing of the id and probing yields a handful of ids a day, each on record.
    ``DeviceIdTaken`` is raised then, for the caller to commit before answering. The
    refusal's words are those of an id of the manager's own station.

    An id refused so and since moved to the manager's station by an admin (the PDAs
    another station sent, which the manager tried to register on unpacking them, as
    anyone would) was theirs to know: it counts for nothing while it stands there (its
    refusal stays on the audit log; moved away again, it counts again), so that a
    station sent a dozen PDAs is not locked out of registering its own for a day.
    """
    device_id = device_id.strip()
    if not DEVICE_ID.fullmatch(device_id):
        raise InvalidInput(
            "device id is 3-64 characters: letters, digits, '.', '_' or '-'",
            code="invalid_device_id",
            field="device_id",
        )
    now = utcnow()
    if registrar is not None and registrar.limit is not None:
        limit = registrar.limit
        # Read under the manager's lock: a move committed while it was waited for counts.
        refusal = _registrar_refusal(
            session, registrar, limit, lambda: _moved_here(session, limit, station, now), now
        )
        if refusal is not None:
            raise refusal
    held = session.get(Device, device_id)
    if held is not None:
        taken = Conflict(
            f"device {device_id} is already registered; a PDA sent here from another "
            "station is not registered again: an admin moves it here (POST "
            f"/api/v1/devices/{device_id}/move, or courier-api move-device)",
            code="device_exists",
            field="device_id",
        )
        if registrar is None or held.station_id == station.id:
            raise taken
        if registrar.limit is not None:
            # Its window was checked above, under the lock it holds: only counted here.
            counted = sign_in_limits.count_once(
                session=session,
                kind=DEVICE_IDS_TAKEN,
                key=registrar.key,
                subject=device_id,
                limit=registrar.limit,
                now=now,
            )
        else:
            # Bounded by nothing, still on record once per id and default window: each
            # try on record let a script retrying one id grow the audit log without end,
            # and a try again tells an auditor nothing its first entry does not.
            counted = sign_in_limits.record_once(
                session=session,
                kind=DEVICE_IDS_TAKEN,
                key=registrar.key,
                subject=device_id,
                window=DEVICE_IDS_TAKEN_PER_MANAGER.window,
                now=now,
            )
        if counted == 0:  # tried again: its first refusal is counted and on record
            raise taken
        audit.append(
            session=session,
            actor_id=registrar.user_id,
            action=DEVICE_REGISTRATION_REFUSED,
            subject_type="device",
            subject_key=device_id,
            details={"station_id": station.id, "held_by_station_id": held.station_id},
        )
        raise DeviceIdTaken(taken.message, code=taken.code, field="device_id")
    device = Device(id=device_id, station_id=station.id, status=DeviceStatus.ACTIVE)
    session.add(device)
    session.flush()
    return device


def _moved_here(
    session: Session, limit: sign_in_limits.Limit, station: Station, now: dt.datetime
) -> Sequence[str]:
    """The ids an admin moved to ``station`` within the window, and at it still: a
    refusal counted for one in the window was counted before its move, and counts for
    nothing while it stands here (it counts again once moved away)."""
    return session.scalars(
        select(Device.id).where(
            Device.station_id == station.id, Device.moved_at > now - limit.window
        )
    ).all()


def _registrar_refusal(
    session: Session,
    registrar: Registrar,
    limit: sign_in_limits.Limit,
    forgiven: Callable[[], Collection[str]],
    now: dt.datetime,
) -> RateLimited | None:
    return sign_in_limits.refusal_of(
        session=session,
        kind=DEVICE_IDS_TAKEN,
        key=registrar.key,
        limit=limit,
        now=now,
        what=TAKEN_TOO_OFTEN,
        code=TOO_MANY_DEVICE_IDS_TAKEN,
        forgiven=forgiven,
    )


def get_device(*, session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise device_not_found(device_id)
    return device


def device_not_found(device_id: str) -> NotFound:
    """What ``get_device`` answers when no PDA has ``device_id``."""
    return NotFound(f"no device {device_id!r}", code="device_not_found")


def set_device_status(
    *, session: Session, device: Device, status: DeviceStatus, changed_by: int | None
) -> Device:
    """Retire a device, report it lost, or bring a found one back.

    Its tokens stop working at once (they are checked against the status on
    every request). The change goes to the audit log (``device_updated``, by
    ``changed_by``: None for the command line): a PDA reported lost or brought back
    weighs on whose its events were. Set to the status it has, nothing is logged.
    """
    changes: dict[str, tuple[Any, Any]] = {}
    if _change(device, "status", status, changes):
        device.status_changed_at = utcnow()
        session.flush()
        _audit_changes(
            session, DEVICE_UPDATED, "device", device.id, device.station_id, changes, changed_by
        )
    return device


def record_device_moved(
    *, session: Session, device: Device, old: Station, moved_by: int | None
) -> None:
    """The audit entry of ``device``'s move from ``old`` to the station it is at now
    (``device_moved``: who, and the station from and to, by id and by code)."""
    new = session.get(Station, device.station_id)
    assert new is not None
    _audit_changes(
        session,
        DEVICE_MOVED,
        "device",
        device.id,
        old.id,
        {"station_id": (old.id, new.id)},
        moved_by,
        noted={"from_station": old.code, "to_station": new.code},
    )


def list_devices(
    *,
    session: Session,
    station_id: int | None = None,
    status: DeviceStatus | None = None,
    after_id: str = "",
    limit: int = 100,
) -> Sequence[Device]:
    query = select(Device).where(Device.id > after_id).order_by(Device.id).limit(_page(limit))
    if station_id is not None:
        query = query.where(Device.station_id == station_id)
    if status is not None:
        query = query.where(Device.status == status)
    return session.scalars(query).all()


# -- helpers ----------------------------------------------------------------------------------


def _change(row: Any, name: str, value: Any, changes: dict[str, tuple[Any, Any]]) -> bool:
    """Set ``row.name`` to ``value`` if it differs, noting ``changes[name]``
    (before, after); whether it changed."""
    before = getattr(row, name)
    if before == value:
        return False
    setattr(row, name, value)
    changes[name] = (before, value)
    return True


def _audit_changes(
    session: Session,
    action: str,
    subject_type: str,
    subject_key: str,
    station_id: int | None,
    changes: dict[str, tuple[Any, Any]],
    user_id: int | None,
    *,
    noted: Mapping[str, Any] | None = None,
) -> None:
    """An entry naming each changed field from and to, and who (``by``), as a parcel's
    ``parcel_updated`` does, with what ``noted`` adds (a change not shown by its
    values); none when nothing changed."""
    if not changes and not noted:
        return
    audit.append(
        session=session,
        actor_id=user_id,
        action=action,
        subject_type=subject_type,
        subject_key=subject_key,
        details={
            "station_id": station_id,
            "by": _who(session, user_id),
            "changes": {
                name: {"from": _shown(before), "to": _shown(after)}
                for name, (before, after) in changes.items()
            },
            **(noted or {}),
        },
    )


def _who(session: Session, user_id: int | None) -> str:
    """Who changed it, as the audit entry names them."""
    if user_id is None:
        return COMMAND_LINE
    user = session.get(User, user_id)
    return user.username if user is not None else f"user #{user_id}"


def _shown(value: Any) -> Any:
    """A field as the audit log keeps it: an enum by its value."""
    return value.value if isinstance(value, enum.Enum) else value


def _required_text(value: str, field: str) -> str:
    value = value.strip()
    if not value:
        raise InvalidInput(f"{field} must not be empty", code="empty_value", field=field)
    return value


def _zone(name: str) -> str:
    try:
        ZoneInfo(name)
    # OSError: a name of a folder of the zone database ("America") or of a file it
    # cannot read; ZoneInfo looks names up as paths.
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise InvalidInput(
            f"{name!r} is not an IANA time zone (e.g. Asia/Shanghai)",
            code="invalid_timezone",
            field="timezone",
        ) from exc
    return name


def _page(limit: int) -> int:
    return max(1, min(limit, MAX_PAGE_SIZE))
