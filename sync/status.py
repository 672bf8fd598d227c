"""Keeping each parcel's stored status and holder equal to the projection of its events.

``reproject`` runs whenever events land (a push) or a parcel appears (intake),
in the same transaction, so the stored status is never behind its events.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, select, text, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from models import EventType, FeedKind, Parcel, ScanEvent, utcnow
from sync import feed
from sync.projection import EventFact, project

_IN_CHUNK = 900  # below SQLite's and PostgreSQL's bound-parameter limits

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
)
PARCEL_COLUMNS = (
    Parcel.id,
    Parcel.tracking_no,
    Parcel.station_id,
    Parcel.courier_id,
    Parcel.planned_courier_id,
    Parcel.status,
    Parcel.status_at,
)
_parcels = Parcel.__table__
UPDATE_PROJECTED = (
    update(_parcels)
    .where(_parcels.c.id == bindparam("parcel_id"))
    .values(
        status=bindparam("new_status"),
        status_at=bindparam("new_status_at"),
        courier_id=bindparam("new_courier_id"),
        updated_at=bindparam("new_updated_at"),
    )
)


@dataclass
class ReprojectOutcome:
    changed: list[str] = field(default_factory=list)  # tracking numbers whose status moved
    unknown: dict[str, list[int]] = field(default_factory=dict)  # no such parcel: event ids
    # Parcels with events recorded at another station: {tracking no: (its station, ids)}
    foreign: dict[str, tuple[int, list[int]]] = field(default_factory=dict)


def lock_parcels(session: Session, tracking_nos: Iterable[str]) -> None:
    """Serialize work on these tracking numbers across transactions (PostgreSQL).

    Transaction-scoped advisory locks, taken in sorted order: they also cover a
    parcel that does not exist yet, which a row lock cannot. Without them, a push
    and the intake that creates its parcel could each miss the other's
    uncommitted rows, and the parcel would keep no status although it has events.
    Pushes and intakes take these before any parcel row, so they cannot deadlock.
    SQLite needs nothing: its write transactions run one at a time.
    """
    numbers = sorted(set(tracking_nos))
    if not numbers or session.get_bind().dialect.name != "postgresql":
        return
    for chunk in _chunks(numbers):
        session.execute(LOCK_TRACKING_NUMBERS, {"space": LOCK_SPACE, "numbers": list(chunk)})


LOCK_SPACE = 0x5CA7  # this application's namespace for two-key advisory locks
# Volatile functions in the select list run after ORDER BY, so the locks come in order.
LOCK_TRACKING_NUMBERS = text(
    "SELECT pg_advisory_xact_lock(:space, hashtext(number)) "
    "FROM unnest(CAST(:numbers AS text[])) WITH ORDINALITY AS given(number, position) "
    "ORDER BY position"
)


def reproject(*, session: Session, tracking_nos: Iterable[str]) -> ReprojectOutcome:
    """Recompute the status (and holder) of these parcels from all their events.

    The tracking numbers are locked first (``lock_parcels``), so that two
    transactions touching one parcel never each compute from a history missing
    the other's events. Rows are read and written with Core statements (one query
    per chunk, one executemany): a push touches hundreds of parcels.
    """
    wanted = sorted(set(tracking_nos))
    outcome = ReprojectOutcome()
    if not wanted:
        return outcome
    lock_parcels(session, wanted)
    parcels = {
        row.tracking_no: row
        for chunk in _chunks(wanted)
        for row in session.execute(
            select(*PARCEL_COLUMNS)
            .where(Parcel.tracking_no.in_(chunk))
            .order_by(Parcel.tracking_no)
            .with_for_update()
        )
    }
    facts = load_facts(session, wanted)
    entries: list[feed.FeedEntry] = []
    updates: list[dict[str, Any]] = []
    now = utcnow()
    for tracking_no in wanted:
        parcel = parcels.get(tracking_no)
        if parcel is None:
            if facts[tracking_no]:
                outcome.unknown[tracking_no] = sorted(f.event_id for f in facts[tracking_no])
            continue
        projection = project(facts[tracking_no], station_id=parcel.station_id)
        foreign = [f.event_id for f in facts[tracking_no] if f.station_id != parcel.station_id]
        if foreign:
            outcome.foreign[tracking_no] = (parcel.station_id, sorted(foreign))
        holder = projection.holder_courier_id or parcel.planned_courier_id
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
        session.execute(UPDATE_PROJECTED, updates)
        _refresh_loaded(session, updates)
    feed.record(session, entries)
    return outcome


def load_facts(session: Session, tracking_nos: Sequence[str]) -> dict[str, list[EventFact]]:
    """Each parcel's events, plus corrections sent under another tracking number that
    void one of them (a correction voids its target wherever it was filed)."""
    facts: dict[str, list[EventFact]] = {tracking_no: [] for tracking_no in tracking_nos}
    for chunk in _chunks(tracking_nos):
        for row in session.execute(select(*FACT_COLUMNS).where(ScanEvent.tracking_no.in_(chunk))):
            facts[row[0]].append(EventFact(*row[1:]))
    for tracking_no, correction in _corrections_from_elsewhere(session, facts):
        facts[tracking_no].append(correction)
    return facts


def _corrections_from_elsewhere(
    session: Session, facts: dict[str, list[EventFact]]
) -> Iterable[tuple[str, EventFact]]:
    parcel_of: dict[tuple[str, uuid.UUID], str] = {}
    by_device: dict[str, list[uuid.UUID]] = defaultdict(list)
    for tracking_no, events in facts.items():
        for fact in events:
            if fact.type != EventType.CORRECTION:
                parcel_of[(fact.device_id, fact.client_event_id)] = tracking_no
                by_device[fact.device_id].append(fact.client_event_id)
    for device_id, ids in by_device.items():
        if not _has_corrections(session, device_id):
            continue  # the usual case: one index probe instead of a look-up per event
        for chunk in _chunks(ids):
            for row in session.execute(
                select(*FACT_COLUMNS).where(
                    ScanEvent.device_id == device_id,
                    ScanEvent.voids_client_event_id.in_(chunk),
                )
            ):
                correction = EventFact(*row[1:])
                target = parcel_of[(device_id, correction.voids_client_event_id)]
                if row[0] != target:  # filed under the target's own number: loaded already
                    yield target, correction


def _has_corrections(session: Session, device_id: str) -> bool:
    return (
        session.scalar(
            select(ScanEvent.id)
            .where(ScanEvent.device_id == device_id, ScanEvent.voids_client_event_id.is_not(None))
            .limit(1)
        )
        is not None
    )


def targets_of_corrections(
    session: Session, device_id: str, voided_ids: Sequence[uuid.UUID]
) -> set[str]:
    """Tracking numbers of this device's events that these corrections void."""
    return {
        tracking_no
        for chunk in _chunks(voided_ids)
        for tracking_no in session.scalars(
            select(ScanEvent.tracking_no).where(
                ScanEvent.device_id == device_id, ScanEvent.client_event_id.in_(chunk)
            )
        )
    }


def _refresh_loaded(session: Session, updates: Sequence[dict[str, Any]]) -> None:
    """Parcels the session already holds (intake) get the values just written."""
    for values in updates:
        parcel = session.identity_map.get(session.identity_key(Parcel, values["parcel_id"]))
        if parcel is None:
            continue
        set_committed_value(parcel, "status", values["new_status"])
        set_committed_value(parcel, "status_at", values["new_status_at"])
        set_committed_value(parcel, "courier_id", values["new_courier_id"])
        set_committed_value(parcel, "updated_at", values["new_updated_at"])


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), _IN_CHUNK):
        yield items[start : start + _IN_CHUNK]
