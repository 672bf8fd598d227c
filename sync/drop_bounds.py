"""Rule 6 for drops: a PDA's other events bound when a drop happened, whatever parcel.

A device's seqs are its causal order. A drop (at a locker or a pickup point) happened
after every event its PDA recorded before it and before every event recorded after
it, on the corrected clock: a courier who sets the clock forward for the drop, to
date it after a consent the recipient gave later, and back for the next parcel's
scan, has the drop judged as having happened by that scan (``sync.rules.drop_span``),
and one who sets it back to date a drop before a revocation has it judged at the
latest event before it. Going offline on purpose to shift times gains nothing.

Within ``REACH`` of the drop's own time only. The server cannot tell which of two
inverted events had the wrong clock: a single scan stamped a day early (its clock
wrong, the drops' right) would otherwise date every drop its PDA made in that day
before it, and flag the consents of all of them. The scan gets ``time_inversion``
(``sync.inversions``) whatever the reach; the drops within it are judged by it.

Each drop keeps the two times in its row (``latest_of_earlier_seqs``,
``earliest_of_later_seqs``: only when they lie beyond its own time, else none), so
that judging it reads no other event. A push keeps them right whatever order the
events arrive in (rule 3): events are never deleted, so a drop's bounds only ever
widen, and each push widens those its events reach. One read (two when the push
fills a gap below seqs already held, more when its times lie days apart) finds every
stored event its events can bound or be bounded by; the rest is worked out here, and
only drops whose bounds moved are written and judged again. The device's lock
(``sync.device_state``) orders its pushes; ``courier-api rejudge`` works every
drop's bounds out again from its device's events (``rebound``).
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import groupby
from typing import Any, NamedTuple

from sqlalchemy import and_, bindparam, exists, or_, select, text, tuple_, update
from sqlalchemy.orm import Session

from models import Parcel, ScanEvent
from models.base import UTCDateTime
from models.sync import DROP_TYPES
from sync.device_state import lock_device_state
from sync.sql import Prebuilt

# How far from a drop's own time its PDA's other events may date it: a shift's length,
# so that a scan stamped with the clock set back a day bounds no drop of the day before.
REACH = dt.timedelta(hours=12)

_events = ScanEvent.__table__
_COLUMNS = (
    _events.c.tracking_no,
    _events.c.seq,
    _events.c.occurred_at,
    _events.c.type,
    _events.c.latest_of_earlier_seqs,
    _events.c.earliest_of_later_seqs,
)
_IS_DROP = text("scan_event.type IN ({})".format(", ".join(f"'{t.value}'" for t in DROP_TYPES)))
_stored_before = _events.c.batch_pk != bindparam("batch_pk")  # not this push's
# The device's stored events a push's events (those of one cluster of their times:
# ``_clusters``) can bound or be bounded by, in two reads. Those dated after the
# cluster's earliest event and within reach of its latest: through the index by time,
# none for a PDA online. And those recorded after its first seq within reach of its
# times: only when the device holds a seq above that one (a PDA sending what it holds
# in order never does).
DATED_AFTER = Prebuilt(
    lambda _dialect: select(*_COLUMNS).where(
        _events.c.device_id == bindparam("device_id"),
        _events.c.occurred_at > bindparam("earliest", type_=UTCDateTime()),
        _events.c.occurred_at <= bindparam("reach_after", type_=UTCDateTime()),
        _stored_before,
    )
)
RECORDED_AFTER = Prebuilt(
    lambda _dialect: select(*_COLUMNS).where(
        _events.c.device_id == bindparam("device_id"),
        _events.c.seq > bindparam("lowest_seq"),
        _events.c.occurred_at >= bindparam("reach_before", type_=UTCDateTime()),
        _events.c.occurred_at < bindparam("latest", type_=UTCDateTime()),
        _stored_before,
    )
)
STORE_BOUNDS = Prebuilt(
    lambda _dialect: (
        update(_events)
        .where(
            _events.c.device_id == bindparam("device"),
            _events.c.seq == bindparam("at_seq"),
            _IS_DROP,
        )
        .values(
            latest_of_earlier_seqs=bindparam("latest", type_=UTCDateTime()),
            earliest_of_later_seqs=bindparam("earliest", type_=UTCDateTime()),
        )
    )
)


# A device's events dated within a span (``rebound``), through the index by time.
DATED_WITHIN = Prebuilt(
    lambda _dialect: select(_events.c.seq, _events.c.occurred_at).where(
        _events.c.device_id == bindparam("device_id"),
        _events.c.occurred_at >= bindparam("since", type_=UTCDateTime()),
        _events.c.occurred_at <= bindparam("until", type_=UTCDateTime()),
    )
)


class EventTime(NamedTuple):
    """What of an event its drops' bounds depend on: its seq and corrected time."""

    seq: int
    occurred_at: dt.datetime
    is_drop: bool = False


class Bounds(NamedTuple):
    latest_of_earlier_seqs: dt.datetime | None = None
    earliest_of_later_seqs: dt.datetime | None = None

    def widened(self, other: Bounds) -> Bounds:
        """Both bounds' outermost: what every event of the two sets shows."""
        return Bounds(
            _outer(max, self.latest_of_earlier_seqs, other.latest_of_earlier_seqs),
            _outer(min, self.earliest_of_later_seqs, other.earliest_of_later_seqs),
        )


def bound_drops(
    session: Session,
    device_id: str,
    batch_pk: int,
    stored: Iterable[EventTime],
    held_max_seq: int,
) -> tuple[dict[int, Bounds], set[str]]:
    """After a push stored ``stored`` (this device's new events, in its batch
    ``batch_pk``; ``held_max_seq``: the device's highest seq before it): the bounds of
    its own drops (those that have any), by seq, stored in their rows; and the
    tracking numbers of the device's earlier drops whose bounds its events widened,
    stored too, to be judged again."""
    new = list(stored)
    nearby: dict[int, Any] = {}
    for cluster in _clusters(new):
        earliest, latest = cluster[0].occurred_at, cluster[-1].occurred_at
        lowest_seq = min(event.seq for event in cluster)
        params = {
            "device_id": device_id,
            "batch_pk": batch_pk,
            "earliest": earliest,
            "reach_after": latest + REACH,
            "lowest_seq": lowest_seq,
            "reach_before": earliest - REACH,
            "latest": latest,
        }
        reads = [DATED_AFTER] + ([RECORDED_AFTER] if lowest_seq < held_max_seq else [])
        for read in reads:
            nearby.update((row.seq, row) for row in read.execute(session, params))
    everything = [*new, *(EventTime(row.seq, row.occurred_at) for row in nearby.values())]
    own = {
        seq: bounds
        for seq, bounds in bounds_among(everything, [e for e in new if e.is_drop]).items()
        if bounds != Bounds()
    }
    earlier_drops = [
        EventTime(row.seq, row.occurred_at, True)
        for row in nearby.values()
        if row.type in DROP_TYPES
    ]
    moved: dict[int, Bounds] = {}
    for seq, by_new in bounds_among(new, earlier_drops).items():
        row = nearby[seq]
        before = Bounds(row.latest_of_earlier_seqs, row.earliest_of_later_seqs)
        if (now := before.widened(by_new)) != before:
            moved[seq] = now
    STORE_BOUNDS.execute_rows(
        session, [_stored(device_id, seq, b) for seq, b in sorted({**own, **moved}.items())]
    )
    return own, {nearby[seq].tracking_no for seq in moved}


class StoredDrop(NamedTuple):
    device_id: str
    seq: int
    occurred_at: dt.datetime
    latest_of_earlier_seqs: dt.datetime | None
    earliest_of_later_seqs: dt.datetime | None


def drops_after(
    session: Session, *, station_id: int | None, after: tuple[str, int], limit: int
) -> list[StoredDrop]:
    """Up to ``limit`` stored drops after ``after`` (device, seq), in that order: every
    device's, or with a ``station_id`` those of the parcels now at that station and
    those recorded there of tracking numbers not taken in (their parcels, taken in
    later, are judged with the bounds these keep)."""
    query = (
        select(
            _events.c.device_id,
            _events.c.seq,
            _events.c.occurred_at,
            _events.c.latest_of_earlier_seqs,
            _events.c.earliest_of_later_seqs,
        )
        .where(_IS_DROP, tuple_(_events.c.device_id, _events.c.seq) > tuple_(*after))
        .order_by(_events.c.device_id, _events.c.seq)
        .limit(limit)
    )
    if station_id is not None:
        parcel = select(Parcel.station_id).where(Parcel.tracking_no == _events.c.tracking_no)
        query = query.where(
            or_(
                exists(parcel.where(Parcel.station_id == station_id)),
                and_(~exists(parcel), _events.c.station_id == station_id),
            )
        )
    return [StoredDrop(*row) for row in session.execute(query)]


def rebound(session: Session, drops: Sequence[StoredDrop]) -> int:
    """Work these drops' bounds out again from their devices' events, and store those
    that differ; how many did. ``drops`` in ``drops_after``'s order (by device). Pushes
    keep the bounds (``bound_drops``); this repairs what they did not: drops stored by
    an earlier version while an upgrade ran. The devices' locks are taken first
    (sorted, as no push takes two), so that no push widens a bound from what it read
    before this one was stored: the caller commits soon after, pushes of these devices
    wait until then."""
    for device_id in sorted({drop.device_id for drop in drops}):
        lock_device_state(session, device_id)
    changed = []
    for device_id, of_device in groupby(drops, key=lambda drop: drop.device_id):
        stored = {drop.seq: drop for drop in of_device}
        timed = [EventTime(drop.seq, drop.occurred_at, True) for drop in stored.values()]
        for cluster in _clusters(timed):  # one read of the device's events around each
            params = {
                "device_id": device_id,
                "since": cluster[0].occurred_at - REACH,
                "until": cluster[-1].occurred_at + REACH,
            }
            events = [EventTime(*row) for row in DATED_WITHIN.execute(session, params)]
            for seq, bounds in bounds_among(events, cluster).items():
                drop = stored[seq]
                if bounds != (drop.latest_of_earlier_seqs, drop.earliest_of_later_seqs):
                    changed.append(_stored(device_id, seq, bounds))
    STORE_BOUNDS.execute_rows(session, changed)
    return len(changed)


def _stored(device_id: str, seq: int, bounds: Bounds) -> dict[str, Any]:
    """``STORE_BOUNDS``'s parameters for one drop."""
    return {"device": device_id, "at_seq": seq, "latest": bounds[0], "earliest": bounds[1]}


def _clusters(events: Sequence[EventTime]) -> list[list[EventTime]]:
    """The events by time, in runs whose neighbours lie within twice ``REACH``: what a
    stored event within reach of one of a run's events may be lies within reach of the
    run's span, and a push of today's scans with one stamped a month early reads the
    two days it touches, not the month between."""
    clusters: list[list[EventTime]] = []
    for event in sorted(events, key=lambda e: e.occurred_at):
        if clusters and event.occurred_at - clusters[-1][-1].occurred_at <= 2 * REACH:
            clusters[-1].append(event)
        else:
            clusters.append([event])
    return clusters


def bounds_among(events: Sequence[EventTime], drops: Sequence[EventTime]) -> dict[int, Bounds]:
    """Each drop's bounds by ``events`` (seq: Bounds): the latest time of an event
    recorded before it dated after it, within ``REACH``, and the earliest of one
    recorded after it dated before it, within ``REACH``. One sweep up the seqs and one
    down, each keeping the times passed in order (a binary search per drop, an insert
    per event), not drops times events: a day's backlog holds thousands of each."""
    latest = _sweep(events, drops, upward=True)
    earliest = _sweep(events, drops, upward=False)
    return {drop.seq: Bounds(latest[drop.seq], earliest[drop.seq]) for drop in drops}


def _sweep(
    events: Sequence[EventTime], drops: Sequence[EventTime], *, upward: bool
) -> dict[int, dt.datetime | None]:
    """Upward: for each drop, the latest time in ``(its time, its time + REACH]`` of an
    event with a lower seq; downward: the earliest in ``[its time - REACH, its time)``
    of one with a higher seq."""
    order = sorted(events, key=lambda e: e.seq, reverse=not upward)
    passed: list[dt.datetime] = []  # the times of the events passed, ascending
    found: dict[int, dt.datetime | None] = {}
    index = 0
    for drop in sorted(drops, key=lambda e: e.seq, reverse=not upward):
        while index < len(order) and (
            order[index].seq < drop.seq if upward else order[index].seq > drop.seq
        ):
            bisect.insort(passed, order[index].occurred_at)
            index += 1
        if upward:
            at = bisect.bisect_right(passed, drop.occurred_at + REACH) - 1
            hit = passed[at] if at >= 0 else None
            found[drop.seq] = hit if hit is not None and hit > drop.occurred_at else None
        else:
            at = bisect.bisect_left(passed, drop.occurred_at - REACH)
            hit = passed[at] if at < len(passed) else None
            found[drop.seq] = hit if hit is not None and hit < drop.occurred_at else None
    return found


def bounds_of(row: Mapping[str, Any]) -> Bounds:
    """The bounds an event row holds (none for a row without them)."""
    return Bounds(row.get("latest_of_earlier_seqs"), row.get("earliest_of_later_seqs"))


def _outer(
    pick: Callable[[dt.datetime, dt.datetime], dt.datetime],
    one: dt.datetime | None,
    other: dt.datetime | None,
) -> dt.datetime | None:
    return other if one is None else one if other is None else pick(one, other)
