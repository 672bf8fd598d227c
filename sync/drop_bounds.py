"""Rule 6 for drops: a PDA's other events bound when a drop happened, whatever parcel.

A device's seqs are its causal order. A drop (at a locker or a pickup point) happened
after every event its PDA recorded before it and before every event recorded after
it, on the corrected clock: a courier who sets the clock forward for the drop, to
date it after a consent the recipient gave later, and back for the next parcel's
scan, has the drop judged as having happened by that scan (``sync.rules.drop_span``),
and one who sets it back to date a drop before a revocation has it judged at the
latest event before it. Going offline on purpose to shift times gains nothing.

Each drop keeps the two times that bound it in its row (``latest_of_earlier_seqs``,
``earliest_of_later_seqs``: only when they are beyond its own time, else none), so
that judging it reads no other event. A push keeps them right (rule 3, whatever
order the events arrive in): it works them out for the drops it stores, and again
for the stored drops of the device that one of its events bounds, whose parcels it
then judges again. The device's lock (``sync.device_state``) orders its pushes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from sqlalchemy import bindparam, case, func, select, text, union_all, update
from sqlalchemy.orm import Session

from models import ScanEvent
from models.base import UTCDateTime
from models.sync import DROP_TYPES
from sync.sql import Prebuilt, among_param

_events = ScanEvent.__table__
_other = _events.alias("other")
_IS_DROP = text("scan_event.type IN ({})".format(", ".join(f"'{t.value}'" for t in DROP_TYPES)))

# The drops at the seqs given, each bound anew by the device's other events: the
# latest dated after it of those recorded before it, found through the device's events
# by time (those dated after a drop are few: it is recent, or its PDA's clock is off),
# and the earliest dated before it of those recorded after it, found through the seqs
# above it (few: a drop is stored soon after it happens, or it is read by time too).
REBOUND = Prebuilt(
    lambda dialect: (
        update(_events)
        .where(
            _events.c.device_id == bindparam("device"),
            among_param(dialect, _events.c.seq, "seqs"),
            _IS_DROP,
        )
        .values(
            latest_of_earlier_seqs=select(func.max(_other.c.occurred_at))
            .where(
                _other.c.device_id == _events.c.device_id,
                _other.c.occurred_at > _events.c.occurred_at,
                _other.c.seq < _events.c.seq,
            )
            .scalar_subquery(),
            # (the time in the aggregate, not the filter: on the index by time,
            # SQLite would read all the device's events dated before the drop)
            earliest_of_later_seqs=select(
                func.min(
                    case((_other.c.occurred_at < _events.c.occurred_at, _other.c.occurred_at))
                )
            )
            .where(_other.c.device_id == _events.c.device_id, _other.c.seq > _events.c.seq)
            .scalar_subquery(),
        )
        .returning(
            _events.c.seq, _events.c.latest_of_earlier_seqs, _events.c.earliest_of_later_seqs
        )
    )
)
# The device's stored drops a push's events may bound: those dated after its earliest
# event (one recorded after them may be dated before them), and those recorded after
# its first seq (one recorded before them may be dated after them). Each through the
# index that keeps it short; the push's own drops come back too.
_DROP_COLUMNS = (_events.c.tracking_no, _events.c.seq, _events.c.occurred_at)
MAY_BE_BOUND = Prebuilt(
    lambda _dialect: union_all(
        select(*_DROP_COLUMNS).where(
            _events.c.device_id == bindparam("device_id"),
            _events.c.occurred_at > bindparam("earliest", type_=UTCDateTime()),
            _IS_DROP,
        ),
        select(*_DROP_COLUMNS).where(
            _events.c.device_id == bindparam("device_id"),
            _events.c.seq > bindparam("lowest_seq"),
            _IS_DROP,
        ),
    )
)


class Stored(NamedTuple):
    """What of an event a push just stored the bounds depend on."""

    seq: int
    occurred_at: dt.datetime  # corrected
    is_drop: bool


class Bounds(NamedTuple):
    latest_of_earlier_seqs: dt.datetime | None
    earliest_of_later_seqs: dt.datetime | None


def bound_drops(
    session: Session, device_id: str, stored: Iterable[Stored]
) -> tuple[dict[int, Bounds], set[str]]:
    """After a push stored ``stored`` (this device's new events): the bounds of its own
    drops, by seq, and the tracking numbers of the device's earlier drops whose bounds
    its events changed, each bound anew and to be judged again."""
    new = list(stored)
    if not new:
        return {}, set()
    own = {event.seq for event in new}
    rebound: dict[int, str] = {}
    for tracking_no, seq, occurred_at in MAY_BE_BOUND.execute(
        session,
        {
            "device_id": device_id,
            "earliest": min(event.occurred_at for event in new),
            "lowest_seq": min(own),
        },
    ):
        if seq not in own and _bounds_any(seq, occurred_at, new):
            rebound[seq] = tracking_no
    seqs = sorted({event.seq for event in new if event.is_drop} | rebound.keys())
    if not seqs:
        return {}, set()
    bounds = {
        seq: Bounds(latest, earliest)
        for seq, latest, earliest in REBOUND.execute(session, {"device": device_id, "seqs": seqs})
    }
    return {seq: b for seq, b in bounds.items() if seq in own}, set(rebound.values())


def _bounds_any(seq: int, occurred_at: dt.datetime, new: Iterable[Stored]) -> bool:
    """Whether one of ``new`` bounds the drop at ``seq``: recorded after it and dated
    before it, or recorded before it and dated after it."""
    return any(
        (event.seq > seq and event.occurred_at < occurred_at)
        or (event.seq < seq and event.occurred_at > occurred_at)
        for event in new
    )


def bounds_of(row: Mapping[str, Any]) -> Bounds:
    """The bounds an event row holds (none for a row that has no such keys)."""
    return Bounds(row.get("latest_of_earlier_seqs"), row.get("earliest_of_later_seqs"))
