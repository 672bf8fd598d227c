"""A parcel's status as a projection of its scan events (pure functions).

Arrival order never matters: the projection sorts the events itself.

* Within one device, sequence numbers are the causal order (DESIGN.md rule 6):
  a device's events are never reordered among themselves, whatever their clock
  says. Across devices, events are ordered by corrected occurrence time. Both
  hold at once by giving each event the latest corrected time seen so far on
  its device, in sequence order, and sorting by that, then device, then seq.
* A ``correction`` voids an earlier event (lower seq) of the same device. The
  voided event stays in the timeline, marked, and no longer counts. A
  correction of a correction has no effect: amendments are not undone by
  further amendments, they are corrected by new events.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, Exists, exists
from sqlalchemy.orm import aliased

from models import EventType, ParcelStatus, ScanEvent

STATUS_OF_EVENT: dict[EventType, ParcelStatus] = {
    EventType.CHECKED_OUT: ParcelStatus.CHECKED_OUT,
    EventType.OUT_FOR_DELIVERY: ParcelStatus.OUT_FOR_DELIVERY,
    EventType.DELIVERY_ATTEMPT_FAILED: ParcelStatus.ATTEMPT_FAILED,
    EventType.DELIVERED: ParcelStatus.DELIVERED,
    EventType.DELIVERED_TO_LOCKER: ParcelStatus.IN_LOCKER,
    EventType.DELIVERED_TO_PICKUP_POINT: ParcelStatus.AT_PICKUP_POINT,
    EventType.RETURNED_TO_STATION: ParcelStatus.RETURNED,
    EventType.COLLECTED_FROM_LOCKER: ParcelStatus.COLLECTED,
    EventType.EXCEPTION: ParcelStatus.EXCEPTION,
}

# UPU EMSEVT v4 event codes, where one of ours has an equivalent.
EMSEVT_CODE: dict[EventType, str] = {
    EventType.OUT_FOR_DELIVERY: "EDG",  # out for delivery
    EventType.DELIVERY_ATTEMPT_FAILED: "EMH",  # unsuccessful (attempted) delivery
    EventType.DELIVERED: "EMI",  # final delivery
    EventType.DELIVERED_TO_LOCKER: "EDH",  # at a collection point
    EventType.DELIVERED_TO_PICKUP_POINT: "EDH",
    EventType.COLLECTED_FROM_LOCKER: "EMI",  # the recipient took it from the locker
}


class EventFact(NamedTuple):
    """What the projection needs to know of a stored event (a named tuple: the station
    board builds one per event of the day, a hundred thousand at 19:00)."""

    event_id: int
    device_id: str
    seq: int
    type: EventType
    occurred_at: dt.datetime  # corrected
    client_event_id: uuid.UUID
    courier_id: int
    voids_client_event_id: uuid.UUID | None = None
    station_id: int | None = None  # the station of the device that recorded it


@dataclass(frozen=True)
class Projection:
    status: ParcelStatus | None
    status_at: dt.datetime | None
    status_event_id: int | None
    holder_courier_id: int | None  # the courier of the check-out that counts last
    order: tuple[int, ...]  # event ids, in projection order
    voided_by: dict[int, int]  # voided event id -> id of the correction that voided it


def voided_in_sql(target: type[ScanEvent] | Any) -> Exists:
    """``voided_by`` as SQL, for a delivery or a captured consent ``target`` (the
    ``ScanEvent`` entity or an alias of it): a later correction of its device names it."""
    correction = aliased(ScanEvent, name="correction")
    return exists().where(*corrects(correction, target))


def corrects(correction: Any, target: Any) -> tuple[ColumnElement[bool], ...]:
    """``correction`` (an alias of ``ScanEvent``) voids ``target``, as SQL: a later
    event of its device naming it. Looked up through the index of the device's
    corrections (``ix_scan_event_voids``): the seqs are compared as ``seq + 0``, which
    no index serves, since SQLite, keeping no statistics, otherwise took the device's
    (device, seq) key and read every event the PDA recorded after the target, for each
    target (a PDA that pushed 25,000 events made a search of one parcel's proofs take
    two minutes). PostgreSQL's plans are the same with it or without."""
    return (
        correction.device_id == target.device_id,
        correction.voids_client_event_id == target.client_event_id,
        correction.seq + 0 > target.seq,
    )


def voided_by(facts: Iterable[EventFact]) -> dict[int, int]:
    """Which events a correction voids: ``{voided event id: correction event id}``."""
    facts = list(facts)
    corrections = [
        f for f in facts if f.type == EventType.CORRECTION and f.voids_client_event_id is not None
    ]
    if not corrections:
        return {}  # the usual case: no index of the events to build
    by_key = {(f.device_id, f.client_event_id): f for f in facts}
    voids: dict[int, EventFact] = {}
    for correction in corrections:
        target = by_key.get((correction.device_id, correction.voids_client_event_id))
        if target is None or target.type == EventType.CORRECTION:
            continue
        if target.seq >= correction.seq:
            continue  # only an earlier event can be corrected
        current = voids.get(target.event_id)
        if current is None or correction.seq < current.seq:
            voids[target.event_id] = correction
    return {target: correction.event_id for target, correction in voids.items()}


def ordered(facts: Iterable[EventFact]) -> list[EventFact]:
    """Projection order: seq order within a device, corrected time across devices."""
    by_device: dict[str, list[EventFact]] = defaultdict(list)
    for fact in facts:
        by_device[fact.device_id].append(fact)
    keyed: list[tuple[dt.datetime, str, int, EventFact]] = []
    for device_id, events in by_device.items():
        events.sort(key=lambda f: f.seq)
        latest: dt.datetime | None = None
        for fact in events:
            latest = fact.occurred_at if latest is None else max(latest, fact.occurred_at)
            keyed.append((latest, device_id, fact.seq, fact))
    keyed.sort(key=lambda item: item[:3])
    return [item[3] for item in keyed]


def project(
    facts: Sequence[EventFact],
    *,
    station_id: int | None = None,
    in_order: Sequence[EventFact] | None = None,
    voids: Mapping[int, int] | None = None,
) -> Projection:
    """The parcel's status from its events (and the corrections that target them).

    Only a check-out at the parcel's own ``station_id`` makes its courier the holder: a
    courier of another station scanning the parcel records what happened (it counts
    for the status, and is flagged) but does not take the parcel over.

    ``in_order`` and ``voids``: ``ordered(facts)`` and ``voided_by(facts)``, when the
    caller has them (a push judges the parcel's rules on them too: ``sync.rules.History``).
    """
    voids = dict(voided_by(facts) if voids is None else voids)
    status_event: EventFact | None = None
    holder: int | None = None
    in_order = ordered(facts) if in_order is None else in_order
    for fact in in_order:
        if fact.event_id in voids or fact.type not in STATUS_OF_EVENT:
            continue
        status_event = fact
        if fact.type == EventType.CHECKED_OUT and station_id in (None, fact.station_id):
            holder = fact.courier_id
    return Projection(
        status=STATUS_OF_EVENT[status_event.type] if status_event else None,
        status_at=status_event.occurred_at if status_event else None,
        status_event_id=status_event.event_id if status_event else None,
        holder_courier_id=holder,
        order=tuple(f.event_id for f in in_order),
        voided_by=voids,
    )
