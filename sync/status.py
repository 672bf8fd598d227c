"""Keeping each parcel's stored status and holder equal to the projection of its events.

``reproject`` runs whenever events land (a push) or a parcel appears (intake),
in the same transaction, so the stored status is never behind its events.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    and_,
    case,
    exists,
    literal_column,
    select,
    union_all,
)
from sqlalchemy.orm import Session, aliased
from sqlalchemy.orm.attributes import set_committed_value

from models import (
    Blob,
    EventType,
    FeedKind,
    Flag,
    FlagStatus,
    Parcel,
    ProofImage,
    ScanEvent,
    utcnow,
)
from sync import feed
from sync.consents import consents_for, covered_parcels
from sync.drop_bounds import bounds_of
from sync.events import referenced_blobs
from sync.flags import (
    ACTIVE_STATUSES,
    close_flags_by_id,
    raise_new_flags,
    rejudge,
)
from sync.handover import NOT_CHECKED_OUT
from sync.projection import EventFact, ordered, project
from sync.rules import (
    FINAL_OUTCOMES,
    RULE_KINDS,
    SEVERITY,
    EventDetail,
    History,
    ParcelFacts,
    Policy,
    by_station,
    cited_events,
    consents_matter,
    evaluate,
    parcel_stays,
    refolded,
    within,
)
from sync.sql import (
    Prebuilt,
    advisory_locks,
    among_param,
    chunks,
    not_among_param,
    rows_among,
    updating,
)

DEFAULT_POLICY = Policy()
# Rule flags not closed: what a shift's balance cites (``sync.balances._rule_flags``).
STANDING = (*ACTIVE_STATUSES, FlagStatus.RESOLVED)
FAILS_AGAIN = "the rule fails again"  # a rule flag judged again, in its history
# Why a rule flag whose cause went is closed, in its history and ``closed_reason``; after
# what changed about its parcel when the caller knows (``reproject``'s ``changed``).
RULE_HOLDS = "re-judged with the parcel's events and consents as they are now: the rule holds"
ANOTHER_STATIONS_USER = "a user of another station"


@dataclass(frozen=True)
class ParcelChange:
    """What a user changed about a parcel (an intake), for the reason its rule flags
    closed by the change give."""

    who: str  # their username (or the command line's)
    station_id: int | None  # theirs: None for an admin, an integration, the command line
    what: str  # ``sync.parcels.changed_what``

    def reason(self, flag_station_id: int | None) -> str:
        """As the flag of ``flag_station_id`` says it: who changed the parcel named only
        when that station's manager may know them (``sync.pages.sees_user``). A parcel's
        flags at another station (a courier there scanned it) are closed by its own
        station's change, and for that station's manager its users do not exist
        (SECURITY.md threat 3)."""
        known = self.station_id in (None, flag_station_id)
        return f"{self.who if known else ANOTHER_STATIONS_USER} changed the parcel's {self.what}"


# The tracking number, then EventFact's fields in its order.
FACT_COLUMNS = (
    ScanEvent.tracking_no,
    ScanEvent.id,
    ScanEvent.device_id,
    ScanEvent.seq,
    ScanEvent.type,
    ScanEvent.occurred_at,
    ScanEvent.client_event_id,
    ScanEvent.courier_id,
    ScanEvent.voids_client_event_id,
    ScanEvent.station_id,
    # then what the rules read beyond the projection
    ScanEvent.details,
    ScanEvent.lat,
    ScanEvent.lon,
    ScanEvent.occurred_at_device,  # a drop's time is uncertain between it and the corrected
    ScanEvent.received_at,  # ... but not after its push arrived
    ScanEvent.latest_of_earlier_seqs,  # ... and between its PDA's events around it
    ScanEvent.earliest_of_later_seqs,
)
_FACT_FIELDS = len(EventFact._fields)
# The columns after EventFact's: an event's payload, which the rules read of its final
# outcomes only (``sync.rules``: a delivery's proof and position, a drop's place and the
# times that bound it, ``drop_span``; the folding of repeats, ``_place``).
PAYLOAD_COLUMNS = FACT_COLUMNS[1 + _FACT_FIELDS :]
# As SQL literals, so that the prebuilt statement binds nothing for them (``sync.direct``).
_JUDGED_TYPES = [literal_column(f"'{kind.value}'") for kind in sorted(FINAL_OUTCOMES)]


def _payloads_judged(columns: Sequence[Any]) -> list[Any]:
    """``columns`` with the payload's read only for final outcomes, NULL for the rest
    (``load_events(judged_only=True)``)."""
    judged = ScanEvent.type.in_(_JUDGED_TYPES)
    return [
        *columns[: 1 + _FACT_FIELDS],
        *(case((judged, c), else_=None).label(c.key) for c in PAYLOAD_COLUMNS),
    ]


PARCEL_COLUMNS = (
    Parcel.id,
    Parcel.tracking_no,
    Parcel.station_id,
    Parcel.courier_id,
    Parcel.planned_courier_id,
    Parcel.status,
    Parcel.status_at,
    Parcel.service_class,
    Parcel.lat,
    Parcel.lon,
    Parcel.recipient_phone,
    Parcel.address,
    Parcel.earlier_stations,
    Parcel.consent_refusals,
)
_parcels = Parcel.__table__


def _rule_flags_where(subject_key: ColumnElement[bool]) -> tuple[ColumnElement[bool], ...]:
    """The rule flags of the parcels ``subject_key`` picks."""
    return (Flag.subject_type == "parcel", Flag.kind.in_(RULE_KINDS), subject_key)


# Whether the parcel has a rule flag at all, read with it: most have none, and then no
# flag is loaded as an entity (which costs the ORM more than the query) and no
# statement of its own asks (``apply_rule_flags``). On PostgreSQL it is read as of the
# statement's start, before its row locks are granted: current all the same, since
# rule flags are raised only here, after ``lock_parcels`` (an earlier statement) made
# every other transaction on these parcels finish first.
HAS_RULE_FLAGS = (
    exists().where(*_rule_flags_where(Flag.subject_key == Parcel.tracking_no))
).label("has_rule_flags")
# Built once (``sync.sql.Prebuilt`` says why): every push runs these.
PARCELS_FOR_UPDATE = Prebuilt(
    lambda dialect: (
        select(*PARCEL_COLUMNS, HAS_RULE_FLAGS)
        .where(among_param(dialect, Parcel.tracking_no, "numbers"))
        .order_by(Parcel.tracking_no)
        .with_for_update()
    )
)


def _events_of_parcels(
    dialect: str, *, but_given: bool = False, judged_only: bool = False
) -> CompoundSelect:
    """The events of the parcels given as parameter ``numbers`` (but those whose ids
    are given as ``given``), then the corrections filed under another tracking number
    that void one of them, as their target's parcel's: a correction voids its target
    wherever it was filed. In one statement: most devices never send a correction, and
    the second half is then an index probe per event that finds nothing. ``judged_only``:
    the payload of final outcomes only (``_payloads_judged``)."""
    columns = _payloads_judged(FACT_COLUMNS) if judged_only else FACT_COLUMNS
    own = select(*columns).where(among_param(dialect, ScanEvent.tracking_no, "numbers"))
    if but_given:
        own = own.where(not_among_param(dialect, ScanEvent.id, "given"))
    target = aliased(ScanEvent, name="target")
    elsewhere = (
        select(target.tracking_no, *columns[1:])
        .join_from(
            target,
            ScanEvent,
            and_(
                ScanEvent.device_id == target.device_id,
                ScanEvent.voids_client_event_id == target.client_event_id,
            ),
        )
        .where(
            among_param(dialect, target.tracking_no, "numbers"),
            target.type != EventType.CORRECTION,
            # filed under the target's own number: the first half has it
            ScanEvent.tracking_no.is_distinct_from(target.tracking_no),
        )
    )
    return union_all(own, elsewhere)


EVENTS_OF_PARCELS = Prebuilt(_events_of_parcels)
EVENTS_OF_PARCELS_BUT = Prebuilt(  # ... but those given
    lambda dialect: _events_of_parcels(dialect, but_given=True)
)
JUDGED_EVENTS_OF_PARCELS = Prebuilt(  # ... with the payloads the rules read
    lambda dialect: _events_of_parcels(dialect, judged_only=True)
)
JUDGED_EVENTS_OF_PARCELS_BUT = Prebuilt(
    lambda dialect: _events_of_parcels(dialect, but_given=True, judged_only=True)
)
BLOBS_HELD = Prebuilt(  # and those purged, with when
    lambda dialect: select(Blob.sha256, Blob.purged_at).where(
        among_param(dialect, Blob.sha256, "digests")
    )
)


# Locked, and read again if the session holds them: a manager's decision committed
# while a push judges the flags is judged with them, not written over (``judged_status``
# of what the flag holds is its status).
RULE_FLAGS_OF_PARCELS = Prebuilt(  # of the parcels given as parameter ``numbers``
    lambda dialect: (
        select(Flag)
        .where(*_rule_flags_where(among_param(dialect, Flag.subject_key, "numbers")))
        .order_by(Flag.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
)
PROJECTED = ("status", "status_at", "courier_id", "updated_at")  # what reproject writes
UPDATE_PROJECTED = Prebuilt(
    lambda _dialect: updating(_parcels, by="id", param="parcel_id", columns=PROJECTED)
)


@dataclass
class ReprojectOutcome:
    changed: list[str] = field(default_factory=list)  # tracking numbers whose status moved
    unknown: dict[str, list[int]] = field(default_factory=dict)  # no such parcel: event ids
    # Parcels with events recorded at another station: {tracking no: (its station, ids)}
    foreign: dict[str, tuple[int, list[int]]] = field(default_factory=dict)
    raised: list[Flag] = field(default_factory=list)  # rule flags raised or reopened
    # Rule flags closed (the rule holds), resolved again, or whose evidence changed.
    rejudged: list[Flag] = field(default_factory=list)
    # Each parcel taken in: its station and its holder now, as written (``tell_holders``).
    holders: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    # Parcels whose final outcomes stored before were folded otherwise by the events
    # just stored (``sync.rules.refolded``), and those with a final outcome scanned again.
    refolded: set[str] = field(default_factory=set)
    repeated: set[str] = field(default_factory=set)
    # Each parcel's events, as judged (``load_events``), ordered and folded once.
    histories: dict[str, History] = field(default_factory=dict)

    def not_checked_out_changed(self) -> set[str]:
        """Parcels whose ``delivered_not_checked_out`` flag was raised, closed or given
        other events: the closed shifts holding their events are judged again
        (``sync.handover.handover_flags_wanted`` reads which deliveries it names)."""
        return {
            flag.subject_key
            for flag in (*self.raised, *self.rejudged)
            if flag.kind == NOT_CHECKED_OUT
        }

    def handovers_changed(self) -> set[str]:
        """Parcels whose closed shifts are judged again: ``not_checked_out_changed``, and
        those whose outcomes the events just stored folded otherwise (``refolded``): a
        shift's only scan of a parcel repeats another shift's outcome, and raises no
        ``not_on_manifest``, only once that outcome's first scan has arrived."""
        return self.not_checked_out_changed() | self.refolded


def lock_parcels(session: Session, tracking_nos: Iterable[str]) -> None:
    """Serialize work on these tracking numbers across transactions (PostgreSQL).

    Transaction-scoped advisory locks, taken in sorted order: they also cover a
    parcel that does not exist yet, which a row lock cannot. Without them, a push
    and the intake that creates its parcel could each miss the other's
    uncommitted rows, and the parcel would keep no status although it has events.
    Pushes and intakes take these before any parcel row, so they cannot deadlock.
    SQLite needs nothing: its write transactions run one at a time.
    """
    advisory_locks(session, LOCK_SPACE, tracking_nos)


LOCK_SPACE = 0x5CA7  # tracking numbers' two-key advisory locks (``sync.sql.advisory_locks``)


def reproject(
    *,
    session: Session,
    tracking_nos: Iterable[str],
    policy: Policy = DEFAULT_POLICY,
    stored: Mapping[str, Sequence[EventDetail]] | None = None,
    changed: Mapping[str, ParcelChange] | None = None,
) -> ReprojectOutcome:
    """Recompute the status (and holder) of these parcels from all their events.

    The tracking numbers are locked first (``lock_parcels``), so that two
    transactions touching one parcel never each compute from a history missing
    the other's events. Rows are read and written with Core statements (one query
    per chunk, one executemany): a push touches hundreds of parcels. ``stored``:
    events of these parcels the caller has just stored (``stored_detail``), which
    are then not read back. ``changed``: what changed about some of these parcels, by
    tracking number ("manager1 changed the parcel's class from express to parcel"): a
    rule flag of theirs closed now says so in its reason, not only that the rule holds
    (``ParcelChange.reason``: who only where the flag's station may know them).
    """
    wanted = sorted(set(tracking_nos))
    outcome = ReprojectOutcome()
    if not wanted:
        return outcome
    lock_parcels(session, wanted)
    parcels = {
        row.tracking_no: row for row in rows_among(session, PARCELS_FOR_UPDATE, "numbers", wanted)
    }
    events = load_events(session, wanted, stored or {}, judged_only=True)
    facts = {tn: [event.fact for event in parcel_events] for tn, parcel_events in events.items()}
    # Each parcel's history ordered, its voids and its outcomes worked out once, for its
    # status, its rules and its repeats alike (``History``).
    histories = {tn: History(parcel_events) for tn, parcel_events in events.items()}
    judged = _judge(session, parcels, events, policy, histories)
    folding = {tn: history.first_scans for tn, history in histories.items()}
    # Whom a parcel's rule flag at a station concerns: at its own station its holder; at
    # another (it moved, or a courier there scanned it) that station's latest courier.
    couriers: dict[tuple[str, int], int | None] = {}
    entries: list[feed.FeedEntry] = []
    updates: list[dict[str, Any]] = []
    now = utcnow()
    for tracking_no in wanted:
        parcel = parcels.get(tracking_no)
        if parcel is None:
            if facts[tracking_no]:
                outcome.unknown[tracking_no] = sorted(f.event_id for f in facts[tracking_no])
            continue
        history = histories[tracking_no]
        projection = project(
            facts[tracking_no],
            station_id=parcel.station_id,
            in_order=[event.fact for event in history.in_order],
            voids=history.voids,
        )
        first = folding[tracking_no].get(projection.status_event_id or 0)
        if first is not None:  # a final outcome scanned again: since its first scan
            projection = replace(projection, status_at=first.fact.occurred_at)
        holder = projection.holder_courier_id or parcel.planned_courier_id
        outcome.holders[tracking_no] = (parcel.station_id, holder)
        foreign = _scanned_elsewhere(
            facts[tracking_no], parcel.station_id, parcel.earlier_stations
        )
        if foreign:
            outcome.foreign[tracking_no] = (parcel.station_id, sorted(foreign))
        # Its scans at other stations, whether while it was there or not: a flag there
        # names the latest courier of that station.
        for fact in ordered(f for f in facts[tracking_no] if f.station_id != parcel.station_id):
            couriers[(tracking_no, fact.station_id)] = fact.courier_id
        couriers[(tracking_no, parcel.station_id)] = holder
        status_moved = (parcel.status, parcel.status_at) != (
            projection.status,
            projection.status_at,
        )
        if holder == parcel.courier_id and not status_moved:
            continue
        if holder != parcel.courier_id:
            entries.extend(
                feed.entries_for_reassignment(
                    station_id=parcel.station_id,
                    tracking_no=tracking_no,
                    old_courier=parcel.courier_id,
                    new_courier=holder,
                )
            )
        elif holder is not None:
            entries.append(feed.FeedEntry(parcel.station_id, holder, FeedKind.PARCEL, tracking_no))
        if status_moved:
            outcome.changed.append(tracking_no)
        updates.append(
            {
                "parcel_id": parcel.id,
                "new_status": projection.status,
                "new_status_at": projection.status_at,
                "new_courier_id": holder,
                "new_updated_at": now,
            }
        )
    if updates:
        UPDATE_PROJECTED.execute_rows(session, updates)
        _refresh_loaded(session, updates)
    feed.record(session, entries)
    outcome.raised, outcome.rejudged = apply_rule_flags(
        session, parcels, judged, events, couriers, changed or {}
    )
    new = {event.fact.event_id for found in (stored or {}).values() for event in found}
    outcome.refolded = {tn for tn in wanted if refolded(events[tn], new, histories[tn])}
    outcome.repeated = {tn for tn in wanted if folding[tn]}
    outcome.histories = histories
    return outcome


def _scanned_elsewhere(
    facts: Sequence[EventFact], station_id: int, earlier: Sequence[Mapping[str, Any]] | None
) -> list[int]:
    """The events a device of another station recorded than the one the parcel was at
    then: the wrong station's scans (``earlier``: ``Parcel.earlier_stations``; since the
    last of them it has been at ``station_id``)."""
    stays = parcel_stays(station_id, earlier)
    return [
        f.event_id
        for f in facts
        if f.station_id != station_id and not within(stays.get(f.station_id, ()), f.occurred_at)
    ]


def _judge(
    session: Session,
    parcels: dict[str, Any],
    events: dict[str, list[EventDetail]],
    policy: Policy,
    histories: Mapping[str, History] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """The rule flags each parcel should have now (``sync.rules.evaluate``), by kind.
    ``histories``: the parcels' ``History``, when the caller has them."""
    facts = {
        tn: ParcelFacts(parcel.service_class, parcel.lat, parcel.lon)
        for tn, parcel in parcels.items()
    }
    dropped = [p for tn, p in parcels.items() if consents_matter(facts[tn], events[tn], policy)]
    consents = consents_for(session, dropped) if dropped else {}
    referenced = {
        digest
        for parcel_events in events.values()
        for event in parcel_events
        for digest in referenced_blobs(event.details)
    }
    rows = list(rows_among(session, BLOBS_HELD, "digests", sorted(referenced)))
    stored = frozenset(row.sha256 for row in rows if row.purged_at is None)
    purged = {row.sha256: row.purged_at for row in rows if row.purged_at is not None}
    histories = histories or {}
    return {
        tn: evaluate(
            facts[tn],
            events[tn],
            consents.get(tn, []),
            policy,
            stored,
            purged,
            histories.get(tn),
        )
        for tn in parcels
    }


def apply_rule_flags(
    session: Session,
    parcels: dict[str, Any],
    judged: dict[str, dict[str, dict[str, Any]]],
    events: dict[str, list[EventDetail]],
    couriers: dict[tuple[str, int], int | None],
    changed: Mapping[str, ParcelChange],
) -> tuple[list[Flag], list[Flag]]:
    """Raise the rule flags each parcel breaks now; close the ones it no longer breaks.
    Returns those raised (or opened again), and those closed, given back the status a
    manager decided or given other evidence.
    ``parcels``: rows as ``PARCELS_FOR_UPDATE`` reads them, by tracking number;
    ``judged``: ``evaluate``'s flags, by kind; ``events``: the parcels' events;
    ``couriers``: whom a flag of the parcel at a station concerns, by tracking number
    and station; ``changed``: what changed about a parcel, by tracking number, for the
    reason its closed flags give.

    A parcel has a flag of a kind at each station whose events break the rule
    (``sync.rules.by_station``; events a flag cites stay with it): one station's
    manager resolving theirs leaves another station's to its manager.

    Evidence is replaced, not merged: it is what the rule finds now. A flag is closed
    when its cause goes, resolved or not (the shifts' balances cite every rule flag
    not closed); while the cause stands, a manager's acknowledgement or resolution
    stands as long as the cause is on the events they decided on, and the flag is
    open on any other (``sync.flags.judged_status``).
    """
    flagged = sorted(tn for tn, parcel in parcels.items() if parcel.has_rule_flags)
    rule_flags = RULE_FLAGS_OF_PARCELS(session)
    existing: dict[str, dict[tuple[str, int], Flag]] = defaultdict(dict)
    for chunk in chunks(flagged):
        for flag in session.scalars(rule_flags, {"numbers": list(chunk)}):
            existing[flag.subject_key][(flag.kind, flag.station_id)] = flag
    gone: dict[int, str] = {}  # flag id: why it is closed
    raised: list[Flag] = []
    rejudged: list[Flag] = []
    new: list[Flag] = []
    for tn, parcel in parcels.items():
        cited: dict[str, dict[int, int]] = defaultdict(dict)
        for flag in sorted(existing[tn].values(), key=lambda f: f.id):
            for event_id in cited_events(flag.evidence, events[tn]):
                cited[flag.kind][event_id] = flag.station_id
        wanted = by_station(judged.get(tn, {}), events[tn], parcel.station_id, cited)
        for (kind, station_id), evidence in wanted.items():
            flag = existing[tn].get((kind, station_id))
            if flag is None:
                new.append(
                    Flag(
                        kind=kind,
                        severity=SEVERITY[kind],
                        subject_type="parcel",
                        subject_key=tn,
                        station_id=station_id,
                        courier_id=couriers.get((tn, station_id)),
                        evidence=evidence,
                    )
                )
            else:
                was, known = flag.status, flag.evidence
                if rejudge(
                    session=session,
                    flag=flag,
                    evidence=evidence,
                    cause=FAILS_AGAIN,
                    courier_id=couriers.get((tn, station_id)),
                ):
                    raised.append(flag)
                elif flag.status != was or known != evidence:
                    rejudged.append(flag)
        for key, flag in existing[tn].items():
            if key not in wanted and flag.status in STANDING:
                gone[flag.id] = (
                    f"{changed[tn].reason(flag.station_id)}; {RULE_HOLDS}"
                    if tn in changed
                    else RULE_HOLDS
                )
    raised.extend(raise_new_flags(session=session, flags=new))
    rejudged += close_flags_by_id(
        session=session, flag_ids=list(gone), reason=RULE_HOLDS, reasons=gone, statuses=STANDING
    )
    return raised, rejudged


def load_events(
    session: Session,
    tracking_nos: Sequence[str],
    stored: Mapping[str, Sequence[EventDetail]] | None = None,
    *,
    judged_only: bool = False,
) -> dict[str, list[EventDetail]]:
    """Each parcel's events, plus corrections sent under another tracking number that
    void one of them (``EVENTS_OF_PARCELS``). Events in ``stored`` (by tracking number,
    with their row ids) are taken as given.

    ``judged_only``: the payload (details, position, PDA time, time of receipt, drop
    bounds) read only of the final outcomes, whose payload the rules read; the other
    events' come back empty (``{}`` and None). A PDA that scanned one parcel 25,000
    times made each later push of it convert every one of those columns of every event
    in SQLite's writers' turn (the details' JSON, three times, a position), half of the
    push's time. ``reproject`` judges with that; a caller that shows or exports events
    reads them whole (``sync.parcels.timeline_page`` orders them with it, and reads the
    rows of the page it shows)."""
    stored = stored or {}
    events: dict[str, list[EventDetail]] = {tn: list(stored.get(tn, ())) for tn in tracking_nos}
    for chunk in chunks(tracking_nos):
        given = [event.fact.event_id for tn in chunk for event in stored.get(tn, ())]
        if judged_only:
            query = JUDGED_EVENTS_OF_PARCELS_BUT if given else JUDGED_EVENTS_OF_PARCELS
        else:
            query = EVENTS_OF_PARCELS_BUT if given else EVENTS_OF_PARCELS
        for row in query.execute(session, {"numbers": list(chunk), "given": given}):
            events[row[0]].append(_detail(row))
    return events


def stored_detail(row: Mapping[str, Any], event_id: int) -> EventDetail:
    """What ``load_events`` would read back of a ``scan_event`` row just inserted."""
    return EventDetail(
        EventFact(
            event_id=event_id,
            device_id=row["device_id"],
            seq=row["seq"],
            type=row["type"],
            occurred_at=row["occurred_at"].astimezone(dt.UTC),
            client_event_id=row["client_event_id"],
            courier_id=row["courier_id"],
            voids_client_event_id=row["voids_client_event_id"],
            station_id=row["station_id"],
        ),
        row["details"],
        row["lat"],
        row["lon"],
        row["occurred_at_device"].astimezone(dt.UTC),
        row["received_at"].astimezone(dt.UTC),
        *bounds_of(row),
    )


def _detail(row: Any) -> EventDetail:
    details = row[1 + _FACT_FIELDS]  # NULL: not read (``judged_only``)
    return EventDetail(
        EventFact._make(row[1 : 1 + _FACT_FIELDS]),
        {} if details is None else details,
        *row[2 + _FACT_FIELDS :],
    )


def targets_of_corrections(
    session: Session, device_id: str, voided_ids: Sequence[uuid.UUID]
) -> list[Any]:
    """This device's events that these corrections void (their id, client event id,
    seq, tracking number, type and details): their parcels are judged again, and a drop
    among them announced to a recipient is retracted (``sync.ingest``)."""
    return [
        row
        for chunk in chunks(voided_ids)
        for row in session.execute(
            select(
                ScanEvent.id,
                ScanEvent.client_event_id,
                ScanEvent.seq,
                ScanEvent.tracking_no,
                ScanEvent.type,
                ScanEvent.details,
            ).where(ScanEvent.device_id == device_id, ScanEvent.client_event_id.in_(chunk))
        )
    ]


def _refresh_loaded(session: Session, updates: Sequence[dict[str, Any]]) -> None:
    """Parcels the session already holds (intake) get the values just written."""
    held = {key[1][0]: obj for key, obj in session.identity_map.items() if key[0] is Parcel}
    if not held:
        return  # a push: its parcels were read as rows, not objects
    for values in updates:
        parcel = held.get(values["parcel_id"])
        if parcel is None:
            continue
        set_committed_value(parcel, "status", values["new_status"])
        set_committed_value(parcel, "status_at", values["new_status_at"])
        set_committed_value(parcel, "courier_id", values["new_courier_id"])
        set_committed_value(parcel, "updated_at", values["new_updated_at"])


def rejudge_for_consent(*, session: Session, consent: Any, policy: Policy) -> list[str]:
    """After a consent is granted or revoked: re-judge the parcels it covers, and tell
    the couriers holding them (a ``consent`` entry in their pull feed)."""
    return _rejudge_and_tell(session, covered_parcels(session, consent), policy)


def rejudge_for_refusal(*, session: Session, tracking_no: str, policy: Policy) -> list[str]:
    """After the recipient refused a request for consent: the parcel's consents given
    before no longer authorize its drops after (``sync.consents.withdrawn_by_refusals``);
    judge it again and tell its courier, as for a revocation."""
    return _rejudge_and_tell(session, [tracking_no], policy)


def _rejudge_and_tell(session: Session, tracking_nos: list[str], policy: Policy) -> list[str]:
    outcome = reproject(session=session, tracking_nos=tracking_nos, policy=policy)
    tell_holders(session, tracking_nos, outcome.holders)
    return tracking_nos


def tell_holders(
    session: Session,
    tracking_nos: Iterable[str],
    held: Mapping[str, tuple[int, int | None]],
) -> None:
    """A ``consent`` entry in the pull feed of the courier holding each of these parcels:
    the consents that cover it changed (granted, revoked, captured on a PDA or voided
    there), and the PDA replaces its copy. ``held``: each parcel's station and holder
    as the ``reproject`` just run over them left them (``ReprojectOutcome.holders``):
    not read again (a push's statement)."""
    entries = []
    for tracking_no in sorted(set(tracking_nos)):
        station, courier = held.get(tracking_no, (None, None))
        if station is not None and courier is not None:
            entries.append(feed.FeedEntry(station, courier, FeedKind.CONSENT, tracking_no))
    feed.record(session, entries)


def rejudge_after_upload(*, session: Session, digest: str, policy: Policy) -> list[str]:
    """A proof image arrived: the parcels whose deliveries name it are judged again (their
    ``pod_blob_missing`` flag closes)."""
    tracking_nos = sorted(
        set(session.scalars(select(ProofImage.tracking_no).where(ProofImage.sha256 == digest)))
    )
    reproject(session=session, tracking_nos=tracking_nos, policy=policy)
    return tracking_nos
