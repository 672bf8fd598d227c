"""Parcel intake: many items per call, each judged on its own."""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import InstrumentedAttribute, Session

from models import (
    AuditEntry,
    FeedKind,
    Parcel,
    Role,
    ScanEvent,
    ServiceClass,
    Station,
    SyncBatch,
    User,
    utcnow,
)
from sync import audit, feed
from sync.balances import refresh_for_parcels
from sync.errors import (
    CursorReset,
    DomainError,
    InvalidCursor,
    InvalidInput,
    NotFound,
    PermissionDenied,
)
from sync.flags import FlagSubject, close_flags
from sync.paging import MAX_PAGE_SIZE, dotted_parts, malformed_cursor
from sync.phones import normalize_phone
from sync.projection import EMSEVT_CODE, EventFact, ordered, project, voided_by
from sync.rules import EventDetail, Policy, first_scans
from sync.sql import chunks
from sync.status import STANDING, ParcelChange, load_events, lock_parcels, reproject
from sync.tracking import TrackingNumberPolicy, normalize

# Fields of a parcel whose change means re-projecting and re-judging it.
REJUDGED_FIELDS = frozenset(
    {
        "planned_courier_id",
        "station_id",
        "service_class",
        "lat",
        "lon",
        "recipient_phone",
        "address",
    }
)
# The audit log's entry for an intake that changed a known parcel (``_audit_updates``).
PARCEL_UPDATED = "parcel_updated"
# What a changed field is called where a closed flag's reason names it (``changed_what``).
FIELD_NAMES = {
    "service_class": "class",
    "station_id": "station",
    "planned_courier_id": "planned courier",
    "recipient_name": "recipient's name",
    "recipient_phone": "recipient's phone",
    "address": "address",
    "lat": "position",
    "lon": "position",
}
COMMAND_LINE = "an import from the command line"  # who, when no user is known


class IntakeStatus(enum.StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    REJECTED = "rejected"


@dataclass(frozen=True)
class ParcelDraft:
    """One intake item after its shape was checked, before the domain rules."""

    tracking_no: str
    service_class: ServiceClass
    recipient_name: str
    address: str
    recipient_phone: str | None = None
    lat: float | None = None
    lon: float | None = None
    station: str | None = None  # station code; defaults to the caller's station
    courier: str | None = None  # username of the courier it is assigned to (optional)


@dataclass(frozen=True)
class IntakeRules:
    tracking: TrackingNumberPolicy
    phone_region: str | None
    policy: Policy = field(default_factory=Policy)


@dataclass(frozen=True)
class IntakeScope:
    """Where the caller may put parcels: a manager only at their own station."""

    default_station_id: int | None
    allowed_station_ids: frozenset[int] | None  # None: every station


@dataclass
class IntakeResult:
    index: int
    tracking_no: str
    status: IntakeStatus
    error: DomainError | None = None
    parcel: Parcel | None = field(default=None, repr=False)
    # An update's changed fields, {name: (before, after)} (``parcel_updated``)
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict, repr=False)


def intake_parcels(
    *,
    session: Session,
    drafts: Sequence[tuple[int, ParcelDraft]],
    rules: IntakeRules,
    scope: IntakeScope,
    now: dt.datetime | None = None,
    changed_by: int | None = None,
) -> list[IntakeResult]:
    """Create or update parcels; one bad item never stops the others.

    ``drafts`` pairs each item with its index in the caller's list so results
    line up with the request. A parcel already known is updated when its data
    changed and reported ``unchanged`` otherwise, so re-sending a file is safe.
    ``now``: when a parcel given another station left its old one (by default, now).
    ``changed_by``: the user taking the parcels in (None: an import from the command
    line), named on the audit log's entry of each update and in the reason of a flag
    an update closes (``_audit_updates``).
    """
    # The updates' entries are chained last, after the flags the updates judge again
    # (lock order, ``sync.device_state``: ... parcels, flags, then the audit log).
    with audit.deferred(session):
        return _intake(session, drafts, rules, scope, now or utcnow(), changed_by)


def _intake(
    session: Session,
    drafts: Sequence[tuple[int, ParcelDraft]],
    rules: IntakeRules,
    scope: IntakeScope,
    now: dt.datetime,
    changed_by: int | None,
) -> list[IntakeResult]:
    lock_parcels(session, (normalize(d.tracking_no) for _, d in drafts))
    stations = _stations_by_code(session, (d.station for _, d in drafts if d.station))
    couriers = _couriers_by_username(session, (d.courier for _, d in drafts if d.courier))
    existing = _parcels_by_tracking_no(session, (normalize(d.tracking_no) for _, d in drafts))
    results = []
    entries: list[feed.FeedEntry] = []
    reassess: list[str] = []
    for index, draft in drafts:
        try:
            values = _validated_values(
                draft, rules=rules, scope=scope, stations=stations, couriers=couriers
            )
            result, result_entries, again = _apply(session, index, values, existing, scope, now)
        except DomainError as error:
            result = IntakeResult(
                index, normalize(draft.tracking_no), IntakeStatus.REJECTED, error
            )
            result_entries, again = [], False
        results.append(result)
        entries.extend(result_entries)
        if again:
            reassess.append(result.tracking_no)
    session.flush()
    feed.record(session, entries)
    updated = [r for r in results if r.changes]
    who, station_id = _who(session, changed_by) if updated else ("", None)
    _audit_updates(session, updated, changed_by, who)
    # New parcels may have events already (events can arrive first), and a new planned
    # courier changes who has the parcel unless a check-out decided it.
    judged = reproject(
        session=session,
        tracking_nos=reassess,
        policy=rules.policy,
        changed={
            r.tracking_no: ParcelChange(who, station_id, changed_what(r.changes)) for r in updated
        },
    )
    # Whoever has an updated parcel now hears about its new data.
    feed.record(
        session,
        (
            feed.FeedEntry(
                r.parcel.station_id, r.parcel.courier_id, FeedKind.PARCEL, r.tracking_no
            )
            for r in results
            if r.status == IntakeStatus.UPDATED and r.parcel and r.parcel.courier_id is not None
        ),
    )
    created = [r.tracking_no for r in results if r.status == IntakeStatus.CREATED]
    _close_unknown_parcel_flags(session, created)
    # Closed shifts with events of parcels unknown until now, or whose
    # delivered_not_checked_out flag the new data changed: their handover flags may
    # change (``sync.handover.handover_flags_wanted``).
    refresh_for_parcels(
        session=session, tracking_nos=[*created, *judged.not_checked_out_changed()]
    )
    return results


def _who(session: Session, user_id: int | None) -> tuple[str, int | None]:
    """Who changed parcels, as the audit entry and a closed flag's reason name them, and
    their station (None: none, the command line's), which decides where a flag's reason
    names them (``ParcelChange.reason``)."""
    if user_id is None:
        return COMMAND_LINE, None
    user = session.get(User, user_id)
    if user is None:
        return f"user #{user_id}", None
    return user.username, user.station_id


def changed_what(changes: dict[str, tuple[Any, Any]]) -> str:
    """The changed fields as a sentence names them: ``class from express to parcel,
    recipient's phone and address`` (a class with its values; a phone or an address
    not: a flag's reason is shown to every reader of the flag, masked or not)."""
    parts: list[str] = []
    for name, (before, after) in changes.items():
        part = FIELD_NAMES.get(name, name)
        if name == "service_class":
            part = f"{part} from {_shown(before)} to {_shown(after)}"
        if part not in parts:
            parts.append(part)
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def _audit_updates(
    session: Session, updated: Sequence[IntakeResult], user_id: int | None, who: str
) -> None:
    """An entry per parcel an intake changed (``parcel_updated``), before and after.

    Every update, whether or not the parcel has events yet: its class, recipient,
    address and position are what its drops are judged against (a class changed from
    express before the drop makes it need no consent as surely as one changed after),
    and telling the two apart would cost a query per parcel. The values are kept as
    they were (a phone number whole: admins read it masked, ``GET /audit``), a
    position as text (the audit chain holds no floats). Appended in the caller's
    ``audit.deferred``: chained together, after the flags.
    """
    for result in updated:
        assert result.parcel is not None
        audit.append(
            session=session,
            actor_id=user_id,
            action=PARCEL_UPDATED,
            subject_type="parcel",
            subject_key=result.tracking_no,
            details={
                "station_id": result.parcel.station_id,
                "by": who,
                "changes": {
                    name: {"from": _shown(before), "to": _shown(after)}
                    for name, (before, after) in result.changes.items()
                },
            },
            tracking_no=result.tracking_no,
        )


def _shown(value: Any) -> Any:
    """A parcel's field as the audit log keeps it: an enum by its value, a float as text."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, float):
        return repr(value)
    return value


def _close_unknown_parcel_flags(session: Session, tracking_nos: list[str]) -> None:
    """Events for these parcels may have arrived first and raised ``unknown_parcel``.
    Resolved ones too: like a rule flag, one whose cause went away is closed, resolved
    or not, or the shifts' balances would cite it still (``sync.balances``)."""
    if not tracking_nos:
        return
    close_flags(
        session=session,
        kind="unknown_parcel",
        subjects=[FlagSubject("parcel", tracking_no) for tracking_no in tracking_nos],
        reason="the parcel was taken in after its first events",
        statuses=STANDING,
    )


def get_parcel(*, session: Session, tracking_no: str) -> Parcel:
    parcel = session.scalar(select(Parcel).where(Parcel.tracking_no == normalize(tracking_no)))
    if parcel is None:
        raise parcel_not_found(tracking_no)
    return parcel


def parcel_not_found(tracking_no: str) -> NotFound:
    """What ``get_parcel`` answers when no parcel has ``tracking_no`` (as it was asked for)."""
    return NotFound(f"no parcel {tracking_no!r}", code="parcel_not_found")


def _validated_values(
    draft: ParcelDraft,
    *,
    rules: IntakeRules,
    scope: IntakeScope,
    stations: dict[str, Station],
    couriers: dict[str, User],
) -> dict[str, object]:
    tracking_no = rules.tracking.validate(draft.tracking_no)
    if (draft.lat is None) != (draft.lon is None):
        raise InvalidInput(
            "give both lat and lon, or neither",
            code="incomplete_location",
            field="lat" if draft.lat is None else "lon",
        )
    station_id = _station_id(draft.station, stations, scope)
    phone = (
        normalize_phone(
            draft.recipient_phone, default_region=rules.phone_region, field="recipient_phone"
        )
        if draft.recipient_phone
        else None
    )
    for name in ("recipient_name", "address"):
        if not getattr(draft, name).strip():
            raise InvalidInput(f"{name} must not be empty", code="empty_value", field=name)
    values: dict[str, object] = {
        "tracking_no": tracking_no,
        "station_id": station_id,
        "service_class": draft.service_class,
        "recipient_name": draft.recipient_name.strip(),
        "recipient_phone": phone,
        "address": draft.address.strip(),
        "lat": draft.lat,
        "lon": draft.lon,
    }
    if draft.courier is not None:
        values["planned_courier_id"] = _courier_id(draft.courier, station_id, couriers, scope)
    return values


def _courier_id(
    username: str, station_id: int, couriers: dict[str, User], scope: IntakeScope
) -> int:
    """The planned courier's id. A caller kept to their own stations (a manager) is
    told of another station's courier what they are told of a name nobody has:
    another station's users do not exist for them (SECURITY.md threat 3)."""
    courier = couriers.get(username.strip().lower())
    hidden = (
        courier is not None
        and scope.allowed_station_ids is not None
        and courier.station_id not in scope.allowed_station_ids
    )
    if courier is None or hidden or courier.role != Role.COURIER or not courier.active:
        raise InvalidInput(
            f"no active courier {username!r}", code="courier_not_found", field="courier"
        )
    if courier.station_id != station_id:
        raise InvalidInput(
            f"courier {username!r} works at another station",
            code="courier_at_other_station",
            field="courier",
        )
    return courier.id


def _station_id(code: str | None, stations: dict[str, Station], scope: IntakeScope) -> int:
    if code is None:
        if scope.default_station_id is None:
            raise InvalidInput("station is required", code="station_required", field="station")
        station_id = scope.default_station_id
    else:
        station = stations.get(code.strip().upper())
        if station is None:
            raise InvalidInput(
                f"no station with code {code!r}", code="station_not_found", field="station"
            )
        station_id = station.id
    if scope.allowed_station_ids is not None and station_id not in scope.allowed_station_ids:
        raise PermissionDenied(
            "you may take in parcels only for your own station",
            code="station_forbidden",
            field="station",
        )
    return station_id


def _apply(
    session: Session,
    index: int,
    values: dict[str, object],
    existing: dict[str, Parcel],
    scope: IntakeScope,
    now: dt.datetime,
) -> tuple[IntakeResult, list[feed.FeedEntry], bool]:
    """Create or update one parcel: ``(result, feed entries, whether to re-project it)``.

    Who has the parcel (``courier_id``) is left to ``reproject``: the courier of the
    check-out that counts last, or the planned courier before any check-out.
    """
    tracking_no = str(values["tracking_no"])
    parcel = existing.get(tracking_no)
    if parcel is None:
        parcel = Parcel(**values)
        session.add(parcel)
        existing[tracking_no] = parcel
        return IntakeResult(index, tracking_no, IntakeStatus.CREATED, parcel=parcel), [], True
    if (
        scope.allowed_station_ids is not None
        and parcel.station_id not in scope.allowed_station_ids
    ):
        raise PermissionDenied(
            f"parcel {tracking_no} belongs to another station",
            code="parcel_at_other_station",
            field="tracking_no",
        )
    changed = {k: v for k, v in values.items() if getattr(parcel, k) != v}
    if not changed:
        return IntakeResult(index, tracking_no, IntakeStatus.UNCHANGED, parcel=parcel), [], False
    if "station_id" in changed:
        left = {"station_id": parcel.station_id, "until": now.isoformat()}
        changed["earlier_stations"] = [*(parcel.earlier_stations or []), left]
        if "planned_courier_id" not in changed:
            changed["planned_courier_id"] = None  # planned at the old station
    changes = {
        k: (getattr(parcel, k), v)
        for k, v in changed.items()
        if k != "earlier_stations" and getattr(parcel, k) != v
    }
    old_station, old_courier = parcel.station_id, parcel.courier_id
    for key, value in changed.items():
        setattr(parcel, key, value)
    entries = []
    if "station_id" in changed and old_courier is not None:
        entries.append(
            feed.FeedEntry(old_station, old_courier, FeedKind.PARCEL_REMOVED, tracking_no)
        )
        parcel.courier_id = None
    # What the rules read of the parcel (its class, position, recipient: standing
    # consents) changes its flags as much as who has it.
    reassess = bool(changed.keys() & REJUDGED_FIELDS)
    result = IntakeResult(index, tracking_no, IntakeStatus.UPDATED, parcel=parcel, changes=changes)
    return result, entries, reassess


def _stations_by_code(session: Session, codes: Iterable[str]) -> dict[str, Station]:
    return _by_key(session, Station.code, {code.strip().upper() for code in codes})


def _couriers_by_username(session: Session, names: Iterable[str]) -> dict[str, User]:
    return _by_key(session, User.username, {name.strip().lower() for name in names})


def _parcels_by_tracking_no(session: Session, numbers: Iterable[str]) -> dict[str, Parcel]:
    return _by_key(session, Parcel.tracking_no, set(numbers))


def _by_key(
    session: Session, column: InstrumentedAttribute[str], keys: set[str]
) -> dict[str, Any]:
    """Rows whose ``column`` is one of ``keys``, by that value, in chunks of IN lists."""
    model = column.class_
    found: dict[str, Any] = {}
    for chunk in chunks(sorted(keys)):
        for row in session.scalars(select(model).where(column.in_(chunk))):
            found[getattr(row, column.key)] = row
    return found


@dataclass(frozen=True)
class TimelineEntry:
    event: ScanEvent
    batch_id: uuid.UUID
    pushed_by: int  # the courier signed in when the PDA pushed it (``SyncBatch``)
    emsevt: str | None
    voided_by: int | None  # id of the correction that voided this event
    # A correction: the id of the event it voids; None when it voids nothing (its PDA
    # sent no earlier event with the id it names, or that one is voided already).
    voids: int | None = None
    # A final outcome scanned again: the first scan of the outcome it repeats
    # (``sync.rules.first_scans``), which settles it; None for any other event.
    repeats: int | None = None


def parcel_timeline(*, session: Session, tracking_no: str) -> list[TimelineEntry]:
    """The parcel's events in projection order, each with its source batch and whether a
    correction voided it (voided events stay visible, marked). A correction filed under
    another tracking number shows in the timeline of the parcel whose event it voids."""
    return timeline_page(session=session, tracking_no=tracking_no).entries


_TIMELINE_CURSOR = re.compile(
    r"([0-9]{1,19})\.([0-9]{1,19})\.([0-9]{1,19})"
    r"(?:\.([0-9]{1,19})\.([0-9a-f]{16})(?:\.([0-9a-f]{16}))?)?"
)


@dataclass(frozen=True)
class TimelineCursor:
    """Where a walk through a timeline stands,
    ``as_of.count.after.updated.record.couriers``: the walk reads the timeline as it was
    at its first page, the events whose id is at most ``as_of`` (``count`` of them), and
    goes on after the event ``after``, the last one shown. ``updated`` (microseconds
    since 1970, UTC) and ``record`` (``record_key``) are the parcel's ``updated_at`` and
    record as the first page showed them: each page shows the parcel as it was then
    (``WalkHeader``). ``couriers`` (``couriers_key``) is the digest of the walk's
    events' couriers as its first page read them. None in a cursor handed out before
    they were kept (three numbers; five before ``couriers``)."""

    as_of: int
    count: int
    after: int
    updated: int | None = None
    record: str | None = None
    couriers: str | None = None

    def __str__(self) -> str:
        walk = f"{self.as_of}.{self.count}.{self.after}"
        if self.record is None:
            return walk
        walk = f"{walk}.{self.updated}.{self.record}"
        return walk if self.couriers is None else f"{walk}.{self.couriers}"

    @classmethod
    def parse(cls, raw: str | None) -> TimelineCursor | None:
        """The cursor, or None for a walk's first page. Its ``updated`` is a time a
        page can show (at most the end of year 9999): a cursor naming a later one made
        the page after a push a 500 (``_header``'s ``OverflowError``)."""
        if raw is None or raw == "":
            return None
        (as_of, count, after, updated), (record, couriers) = dotted_parts(
            raw, _TIMELINE_CURSOR, numbers=4
        )
        assert as_of is not None and count is not None and after is not None
        if updated is not None and updated > _MAX_MICROSECONDS:
            raise malformed_cursor()
        return cls(as_of, count, after, updated, record, couriers)


def couriers_key(facts: Iterable[EventFact]) -> str:
    """A digest of whose each of ``facts`` is (its id and ``courier_id``), in any order:
    16 hex digits. A shift's close changes an event's courier after it was pushed
    (``sync.shifts``, the events a PDA held filed under the shift's courier); a walk
    whose cursor keeps it finds that on its next page (``_same_couriers``)."""
    pairs = sorted((fact.event_id, fact.courier_id) for fact in facts)
    text = json.dumps(pairs, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class WalkHeader:
    """What a page of a walk shows of the parcel's record that its events move: as it
    was at the walk's first page, as its timeline is."""

    status: Any
    status_at: dt.datetime | None
    courier_id: int | None
    updated_at: dt.datetime


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# The latest time a cursor's ``updated`` may name, in microseconds since ``_EPOCH``.
_MAX_MICROSECONDS = (dt.datetime.max.replace(tzinfo=dt.UTC) - _EPOCH) // dt.timedelta(
    microseconds=1
)


def _microseconds(at: dt.datetime) -> int:
    aware = at if at.tzinfo is not None else at.replace(tzinfo=dt.UTC)
    return (aware - _EPOCH) // dt.timedelta(microseconds=1)


# The fields of a parcel's record (``record_key``), in the digest's order.
RECORD_FIELDS = (
    "service_class",
    "station_id",
    "recipient_name",
    "recipient_phone",
    "address",
    "lat",
    "lon",
    "planned_courier_id",
)


def record_key(parcel: Parcel) -> str:
    """A digest of what of ``parcel`` an intake changes (its class, station, recipient,
    phone, address, position, planned courier), no event: 16 hex digits."""
    return _record_key({name: _shown(getattr(parcel, name)) for name in RECORD_FIELDS})


def _record_key(record: Mapping[str, Any]) -> str:
    """``record_key`` of a record given as the audit log's ``parcel_updated`` entries
    show its fields (``_shown``): a class by its value, a position as text."""
    text = json.dumps(
        [record[name] for name in RECORD_FIELDS], ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# How many of a parcel's latest ``parcel_updated`` entries a refused walk reads back to
# find the record it began with (``record_changes``): intakes of a known parcel are rare.
RECORD_CHANGES_READ = 20


def record_changes(*, session: Session, parcel: Parcel, record: str) -> str | None:
    """What intakes changed of ``parcel`` since its record was the one whose
    ``record_key`` is ``record``, as a sentence names it (``changed_what``) with when:
    ``recipient's name (changed at 2026-11-23T10:00:00+00:00)``. Found by undoing its
    latest ``parcel_updated`` entries, newest first, until the record is that one; None
    when they do not lead back to it (a change not made by an intake)."""
    current = {name: _shown(getattr(parcel, name)) for name in RECORD_FIELDS}
    entries = session.execute(
        select(AuditEntry.at, AuditEntry.details)
        .where(
            AuditEntry.subject_type == "parcel",
            AuditEntry.subject_key == parcel.tracking_no,
            AuditEntry.action == PARCEL_UPDATED,
        )
        .order_by(AuditEntry.id.desc())
        .limit(RECORD_CHANGES_READ)
    ).all()
    earlier = dict(current)
    times: list[dt.datetime] = []
    for at, details in entries:
        changes = details.get("changes") if isinstance(details, dict) else None
        if not isinstance(changes, dict):  # not an entry ``_audit_updates`` wrote
            return None
        for name, change in changes.items():
            if name in earlier and isinstance(change, dict):
                earlier[name] = change.get("from")
        times.append(at)
        if _record_key(earlier) == record:
            changed = {
                name: (earlier[name], current[name])
                for name in RECORD_FIELDS
                if earlier[name] != current[name]
            }
            if not changed:
                return None
            when = ", ".join(audit.iso(at) for at in reversed(times))
            return f"{changed_what(changed)} (changed at {when})"
    return None


@dataclass(frozen=True)
class TimelinePage:
    entries: list[TimelineEntry]
    # The highest event id of the timeline the walk reads: its first page's, every page.
    as_of: int
    # Where the walk goes on; None on its last page.
    next_cursor: TimelineCursor | None
    # Events the timeline gained since the walk began, in no page of it: those with an id
    # above ``as_of``, and a correction filed under another tracking number, stored
    # before, that joined it with its target (``_without_joined_corrections``): what a
    # walk begun again shows that this one does not.
    arrived_since: int
    # The position in the walk of the page's first entry (0: the walk's first).
    offset: int = 0
    # The parcel as the walk's first page showed it, when ``timeline_page`` was given it.
    header: WalkHeader | None = None


def timeline_page(
    *,
    session: Session,
    tracking_no: str,
    cursor: TimelineCursor | None = None,
    limit: int | None = None,
    parcel: Parcel | None = None,
) -> TimelinePage:
    """``parcel_timeline`` a page at a time: at most ``limit`` entries (None: all of them)
    from the start, or from where ``cursor`` (a page's ``next_cursor``) stands.

    A walk reads one timeline, the one there was at its first page: the parcel's
    events whose id is at most the highest there was then (``as_of``), ordered, voided
    and folded among themselves alone, so its pages add up to that timeline, each event
    once. A page read the timeline as it was when asked, and went on after an event: a
    late event of a lower seq dated after its PDA's later events moves them (projection
    order, ``ordered``), so the next page repeated those it moved past that event and
    left out those it moved that event past, and still ended. Events arriving during
    the walk get higher ids; they are counted (``arrived_since``) and shown by a walk
    begun after them. One of two PDAs' pushes of the parcel may commit after the other's
    higher ids were read: the walk's ``count`` finds it, and the walk is refused
    (``CursorReset``) rather than ordered anew under it.

    The order is the projection's, worked out on the events' facts and the final
    outcomes' payloads (``load_events(judged_only=True)``, what says which scan repeats
    an outcome); each entry's row is read for the page alone, where an event's
    ``courier_id`` is as it stands then: a shift's close filing the events a PDA held
    under its courier after the walk began showed on the later pages only, an auditor
    reading an event under one courier on page 1 and one of the same queue under
    another on page 3. The cursor keeps the couriers of the walk's events as its first
    page read them (``couriers_key``), and a page finding them changed is a 410
    (``_same_couriers``), never pages of two filings (the entries' ``pushed_by`` never
    changes). A PDA that scanned one parcel 25,000 times made its timeline a 15 MB
    answer of 14 s, every event read twice.

    ``parcel``: its row, read before; the page then shows it as the walk's first page did
    (``header``): that page's own, and each later page's as it was then, so that an
    auditor reading page 3 reads its status beside the timeline it is projected from,
    not one events arrived since moved (``_header``)."""
    history = load_events(session, [tracking_no], judged_only=True)[tracking_no]
    # By id, so that the order (stable sorts) is the same on every page of a walk.
    history.sort(key=lambda event: event.fact.event_id)
    newest = history[-1].fact.event_id if history else 0
    as_of = newest if cursor is None else cursor.as_of
    walked = [event for event in history if event.fact.event_id <= as_of]
    if cursor is not None:
        walked = _without_joined_corrections(session, tracking_no, walked, history, as_of)
        if all(event.fact.event_id != cursor.after for event in walked):
            raise InvalidCursor(
                f"the cursor is not one of a walk through the timeline of {tracking_no}",
                field="cursor",
            )
        if len(walked) < cursor.count:  # none is ever deleted: no walk of this timeline
            raise InvalidCursor(
                f"the cursor is not one of a walk through the timeline of {tracking_no}",
                field="cursor",
            )
        if len(walked) > cursor.count:
            joined = len(walked) - cursor.count
            elsewhere = _filed_elsewhere(session, tracking_no, walked)
            raise CursorReset(
                f"{_joined(joined, tracking_no, as_of, elsewhere)}; read the timeline "
                "again from the start",
                field="cursor",
            )
    facts = [event.fact for event in walked]
    couriers = couriers_key(facts)
    if cursor is not None:
        _same_couriers(cursor, couriers, tracking_no)
    in_order = ordered(facts)
    start = 0
    if cursor is not None:
        start = next(i for i, f in enumerate(in_order) if f.event_id == cursor.after) + 1
    end = len(in_order) if limit is None else min(len(in_order), start + limit)
    shown = in_order[start:end]
    entries = _entries(session, walked, facts, shown)
    more = bool(shown) and end < len(in_order)
    header = None if parcel is None else _header(session, parcel, cursor, walked, facts, in_order)
    updated, record = (None, None)
    if parcel is not None:
        updated, record = _microseconds(header.updated_at), record_key(parcel)
    return TimelinePage(
        entries=entries,
        as_of=as_of,
        next_cursor=TimelineCursor(
            as_of, len(walked), shown[-1].event_id, updated, record, couriers
        )
        if more
        else None,
        arrived_since=len(history) - len(walked),
        offset=start,
        header=header,
    )


def _same_couriers(cursor: TimelineCursor, couriers: str, tracking_no: str) -> None:
    """Refuse (410 ``cursor_reset``) a page of a walk whose events are not all whose they
    were at its first page (``couriers``, their ``couriers_key`` now): the pages read so
    far showed them under couriers some are no longer filed under. Only a shift's close
    changes an event's courier (``shift_closed_for_courier``, whose ``events_taken`` on
    the audit log names them and when). A cursor handed out before it kept them is
    refused too: what its pages showed cannot be checked."""
    if cursor.couriers is None:
        raise CursorReset(
            "the walk was begun by an earlier version of the server, which did not keep "
            f"the couriers of the events of {tracking_no} its pages show; read the "
            "timeline again from the start",
            field="cursor",
        )
    if cursor.couriers != couriers:
        raise CursorReset(
            f"events of {tracking_no} in this walk were filed under another courier since "
            "it began (a shift's close, which files the events a PDA held under its "
            "courier: `shift_closed_for_courier` on the audit log names them, "
            "`events_taken`): the pages read so far showed them under the courier they "
            "were filed under then; read the timeline again from the start",
            field="cursor",
        )


def _joined(count: int, tracking_no: str, as_of: int, elsewhere: bool = False) -> str:
    """What a walk refused for ``count`` events below its ``as_of`` that joined its
    timeline after it began says of them: how many, so that an auditor knows the pages
    read so far lacked some. ``elsewhere``: a correction filed under another tracking
    number is in the timeline, with the event it voids; one stored long before comes
    with a scan committing late, and is not what a push ending at once stored."""
    if elsewhere:
        return (
            f"{count} events of {tracking_no} with ids below this walk's as_of ({as_of}) "
            "joined its timeline after it began: stored after it began (two PDAs' pushes "
            "ending at once), or, with an event so stored, a correction filed under "
            "another tracking number that voids it, however long before it was stored: "
            "the pages read so far were ordered without them"
        )
    if count == 1:
        events = f"1 event of {tracking_no} with an id below this walk's as_of ({as_of}) was"
    else:
        events = f"{count} events of {tracking_no} with ids below this walk's as_of ({as_of}) were"
    return (
        f"{events} stored after it began (two PDAs' pushes ending at once): the pages read "
        f"so far were ordered without {'it' if count == 1 else 'them'}"
    )


def _filed_elsewhere(session: Session, tracking_no: str, walked: Sequence[EventDetail]) -> bool:
    """Whether ``walked`` holds a correction filed under another tracking number than
    ``tracking_no`` (joined with its target, ``load_events``): one statement, only on a
    refused walk's page that holds a correction."""
    corrections = [
        event.fact.event_id for event in walked if event.fact.voids_client_event_id is not None
    ]
    if not corrections:
        return False
    query = select(ScanEvent.id).where(
        ScanEvent.id.in_(corrections), ScanEvent.tracking_no != tracking_no
    )
    return session.scalars(query.limit(1)).first() is not None


def _header(
    session: Session,
    parcel: Parcel,
    cursor: TimelineCursor | None,
    walked: Sequence[EventDetail],
    facts: Sequence[EventFact],
    in_order: Sequence[EventFact],
) -> WalkHeader:
    """The parcel as the walk's first page showed it. Its status, time and courier are
    what its events make them (``sync.status.reproject``): those of the walk's own
    events when events arriving since moved them (its ``updated_at`` too, then, as the
    first page gave it). What an intake changed since (class, recipient, address,
    station, planned courier) cannot be put back: a 410 ``cursor_reset``, as for two
    pushes ending at once, the walk to begin again (intakes of a known parcel are rare,
    and each is on the audit log, ``parcel_updated``, which says what changed and when:
    the 410 names them, ``record_changes``, so that an auditor sees what of the record
    the pages read so far showed is no longer so).

    The first page projects them from its events too: ``parcel`` was read before them,
    in a statement of its own (PostgreSQL's READ COMMITTED), so a push of the parcel
    committed in between put its events in the page's timeline and ``as_of`` but not
    its status in ``parcel``, and the page said ``out_for_delivery`` beside a timeline
    ending ``delivered`` (its later pages, the row then newer than the cursor's, said
    ``delivered``). When the row is the walk's (the usual case), both agree."""
    current = WalkHeader(parcel.status, parcel.status_at, parcel.courier_id, parcel.updated_at)
    if cursor is None:
        return _projected(parcel, walked, facts, in_order, parcel.updated_at)
    if cursor.record is None:
        raise CursorReset(
            "the walk was begun by an earlier version of the server, which did not keep "
            f"the record of {parcel.tracking_no} its pages show; read the timeline again "
            "from the start",
            field="cursor",
        )
    if cursor.record != record_key(parcel):
        changed = record_changes(session=session, parcel=parcel, record=cursor.record)
        what = (
            " (its class, recipient, address, station or planned courier) was changed "
            "since this walk began"
            if changed is None
            else f" was changed since this walk began: its {changed}"
        )
        raise CursorReset(
            f"the record of {parcel.tracking_no}{what}; read the timeline again from the start",
            field="cursor",
        )
    if cursor.updated == _microseconds(parcel.updated_at):
        # Unchanged since the walk's first page read it: events stored since moved
        # nothing, those of its walk included (a push that did would have set it).
        return current
    updated_at = _EPOCH + dt.timedelta(microseconds=cursor.updated or 0)
    return _projected(parcel, walked, facts, in_order, updated_at)


def _projected(
    parcel: Parcel,
    walked: Sequence[EventDetail],
    facts: Sequence[EventFact],
    in_order: Sequence[EventFact],
    updated_at: dt.datetime,
) -> WalkHeader:
    """The status, its time and the courier the walk's events give ``parcel``, as
    ``sync.status.reproject`` sets them from all its events."""
    projection = project(facts, station_id=parcel.station_id, in_order=in_order)
    status_at = projection.status_at
    first = first_scans(walked).get(projection.status_event_id or 0)
    if first is not None:  # a final outcome scanned again: since its first scan
        status_at = first.fact.occurred_at
    return WalkHeader(
        status=projection.status,
        status_at=status_at,
        courier_id=projection.holder_courier_id or parcel.planned_courier_id,
        updated_at=updated_at,
    )


def _without_joined_corrections(
    session: Session,
    tracking_no: str,
    walked: list[EventDetail],
    history: Sequence[EventDetail],
    as_of: int,
) -> list[EventDetail]:
    """``walked`` but the corrections filed under another tracking number whose target
    arrived after ``as_of``: such a correction joins this parcel's history with its
    target (``load_events``), so a PDA that pushed it before the scan it voids (a lower
    seq sent late) brought it under a walk's ``as_of`` when that scan arrived, and the
    walk's count, changed, refused it (410) for two pushes ending at once, which none
    did. It belongs to the walk only with its target; both show once read again."""
    beyond = {
        (event.fact.device_id, event.fact.client_event_id)
        for event in history
        if event.fact.event_id > as_of
    }
    joined = [
        event.fact.event_id
        for event in walked
        if event.fact.voids_client_event_id is not None
        and (event.fact.device_id, event.fact.voids_client_event_id) in beyond
    ]
    if not joined:  # the usual case: no statement
        return walked
    elsewhere = set(
        session.scalars(
            select(ScanEvent.id).where(
                ScanEvent.id.in_(joined), ScanEvent.tracking_no != tracking_no
            )
        )
    )
    return [event for event in walked if event.fact.event_id not in elsewhere]


def _entries(
    session: Session,
    history: Sequence[EventDetail],
    facts: Sequence[EventFact],
    shown: Sequence[EventFact],
) -> list[TimelineEntry]:
    """The entries of ``shown``, a stretch of the timeline of ``history`` (whose
    ``facts`` decide voids, and whose outcomes which scan repeats which), their rows read
    for them alone."""
    firsts = first_scans(history)
    events: dict[int, Any] = {}
    for chunk in chunks([fact.event_id for fact in shown]):
        rows = session.execute(
            select(ScanEvent, SyncBatch.batch_id, SyncBatch.courier_id)
            .join(SyncBatch, SyncBatch.id == ScanEvent.batch_pk)
            .where(ScanEvent.id.in_(chunk))
        )
        events.update((row[0].id, row) for row in rows)
    voids = voided_by(facts)
    voided_by_correction = {correction: voided for voided, correction in voids.items()}
    return [
        TimelineEntry(
            event=events[fact.event_id][0],
            batch_id=events[fact.event_id][1],
            pushed_by=events[fact.event_id][2],
            emsevt=EMSEVT_CODE.get(fact.type),
            voided_by=voids.get(fact.event_id),
            voids=voided_by_correction.get(fact.event_id),
            repeats=firsts[fact.event_id].fact.event_id if fact.event_id in firsts else None,
        )
        for fact in shown
    ]


@dataclass(frozen=True)
class TimelineWindow:
    """A stretch of a parcel's timeline: ``entries`` from its ``offset``-th entry (0:
    its first), of ``total`` entries in all."""

    entries: list[TimelineEntry]
    offset: int
    total: int


def timeline_around(
    *,
    session: Session,
    event_id: int,
    history: Sequence[EventDetail],
    limit: int = MAX_PAGE_SIZE,
) -> TimelineWindow:
    """The parcel's timeline (``parcel_timeline``), whole when it has no more than
    ``limit`` events, else the ``limit`` nearest the event ``event_id`` in its order:
    as many before it as after, but where the timeline ends first.

    ``history``: the parcel's events as ``load_events`` reads them, the caller's (a
    proof reads them whole for its rules): read once. A proof of a delivery of a
    parcel a PDA scanned 25,000 times answered them all, 14.7 MB, each event read
    twice."""
    walked = sorted(history, key=lambda event: event.fact.event_id)
    facts = [event.fact for event in walked]
    in_order = ordered(facts)
    position = next((i for i, f in enumerate(in_order) if f.event_id == event_id), 0)
    start = max(0, min(position - limit // 2, len(in_order) - limit))
    shown = in_order[start : start + limit]
    return TimelineWindow(_entries(session, walked, facts, shown), start, len(in_order))
