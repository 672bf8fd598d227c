"""Keeping each parcel's stored status and holder equal to the projection of its events.

``reproject`` runs whenever events land (a push) or a parcel appears (intake),
in the same transaction, so the stored status is never behind its events.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from models import FeedKind, Parcel, ScanEvent, utcnow
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


def reproject(*, session: Session, tracking_nos: Iterable[str]) -> ReprojectOutcome:
    """Recompute the status (and holder) of these parcels from all their events.

    The parcels are locked first, in a fixed order, so that two pushes touching
    one parcel cannot each compute from a history missing the other's events.
    Rows are read and written with Core statements (one query per chunk, one
    executemany): a push touches hundreds of parcels.
    """
    wanted = sorted(set(tracking_nos))
    outcome = ReprojectOutcome()
    if not wanted:
        return outcome
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
    facts: dict[str, list[EventFact]] = {tracking_no: [] for tracking_no in wanted}
    for chunk in _chunks(wanted):
        for row in session.execute(select(*FACT_COLUMNS).where(ScanEvent.tracking_no.in_(chunk))):
            facts[row[0]].append(EventFact(*row[1:]))
    entries: list[feed.FeedEntry] = []
    updates: list[dict[str, Any]] = []
    now = utcnow()
    for tracking_no in wanted:
        parcel = parcels.get(tracking_no)
        if parcel is None:
            if facts[tracking_no]:
                outcome.unknown[tracking_no] = sorted(f.event_id for f in facts[tracking_no])
            continue
        projection = project(facts[tracking_no])
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
