"""A device's sync state row: the lock that serializes what changes where its events go.

A push takes it first (``sync.ingest``), and so does opening a shift
(``sync.shifts.open_shift``), which files under the new shift the events pushed
before it: had the two run side by side on PostgreSQL, neither would see the
other's rows, and an event pushed a moment before the opening would stay filed
under no shift. Lock order across the service: a device's sync state, then
shifts, then tracking numbers and parcels, then flags, then the audit log.
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

from sqlalchemy import ColumnElement, ScalarSelect, and_, bindparam, inspect, select
from sqlalchemy.orm import Session

from models import Device, DeviceSyncState, ScanEvent, Shift
from sync.inversions import Stamp
from sync.sql import Prebuilt, insert_ignoring_conflict

_states = DeviceSyncState.__table__
_events = ScanEvent.__table__
_devices = Device.__table__
_shifts = Shift.__table__
# With the event stored at the device's highest seq, if any: the one before an online
# PDA's next scan, which the time-inversion rule compares it with. And the device's
# last-seen time, which a push leaves alone within a minute of it.
#
# On PostgreSQL a statement that waited for this lock gets the state row as committed
# now, but every other row (joined, or read by a subquery) as it was when the statement
# began, before what it waited for committed. So it joins only rows whose staleness
# changes nothing: an event row never changes once stored (``DeviceState.at_max_seq``
# holds only an event whose seq is max_seq, as the state row says now), and a last-seen
# time read old costs at most a conditional ``TOUCH_DEVICE`` that finds it newer. What a
# lock holder may have changed (the first seq a shift opening declared, the PDA's
# station) is read by a statement of its own once the lock is held
# (``declared_first_seq_read``, ``station_after_lock``).
LOCK_DEVICE_STATE = Prebuilt(
    lambda _dialect: (
        select(
            _states.c.max_seq,
            _states.c.missing_ranges,
            _states.c.written_off_ranges,
            _states.c.held_at_write_off,
            _states.c.acked_through_seq,
            _states.c.unsettled_seq_conflicts,
            _states.c.seq_conflicts_compared,
            _events.c.seq,
            _events.c.occurred_at_device,
            _events.c.tracking_no,
            _events.c.station_id.label("pushed_at"),
            _devices.c.last_seen_at,
        )
        .select_from(
            _states.outerjoin(
                _events,
                and_(
                    _events.c.device_id == _states.c.device_id, _events.c.seq == _states.c.max_seq
                ),
            ).outerjoin(_devices, _devices.c.id == _states.c.device_id)
        )
        .where(_states.c.device_id == bindparam("device_id"))
        .with_for_update(of=_states)
    )
)
NEW_DEVICE_STATE = Prebuilt(
    lambda dialect: insert_ignoring_conflict(dialect, _states, on=["device_id"]).values(
        acked_through_seq=0, max_seq=0, missing_ranges=[]
    )
)


def held_state(session: Session, device_id: str) -> DeviceSyncState | None:
    """The device's sync state row as ``session`` holds it, if it does: to be expired
    after a statement wrote past the ORM. Its key made as the mapper makes it;
    ``Session.identity_key`` finds the mapper again each time, some 20 us, 1 % of a
    one-scan push."""
    held = session.identity_map.get(_STATE_MAPPER.identity_key_from_primary_key((device_id,)))
    return held if isinstance(held, DeviceSyncState) else None


_STATE_MAPPER = inspect(DeviceSyncState)


class DeviceState(NamedTuple):
    """What a push reads of its device's sync state (``device_sync_state``)."""

    max_seq: int
    missing_ranges: list[list[int]]
    # The event stored at ``max_seq``, as read with the lock; None: not known (that seq
    # arrived rejected, none did, or the lock was waited for), to be looked up.
    at_max_seq: Stamp | None = None
    # The device's last-seen time (``device.last_seen_at``), as read with the lock.
    device_seen_at: dt.datetime | None = None
    # Seqs a manager wrote off as lost, none of which arrived since (``sync.lost_seqs``).
    written_off_ranges: list[list[int]] = []
    # The highest seq held when a manager last wrote off seqs of the device: the
    # acknowledgement passes them only below a seq held above it (``acknowledged_through``).
    held_at_write_off: int = 0
    # The device's acknowledgement so far, which it never goes back from.
    acked_through_seq: int = 0
    # Its ``seq_conflict`` rejections not settled yet (``sync.ingest``): while some are,
    # a push storing events looks for them among the events held.
    unsettled_seq_conflicts: int = 0
    # Whether each of them was compared with every event held (``sync.ingest``): false
    # only for a device with some kept before the version that looks them up by event.
    seq_conflicts_compared: bool = True


def lock_device_state(session: Session, device_id: str) -> DeviceState:
    """Serialize the pushes and shift openings of this device on its sync-state row
    (created on first use), and return it as stored now.

    Not the ``device`` row: sign-in and device management update that one, and must
    not wait for a push of 5,000 events.
    """
    row = LOCK_DEVICE_STATE.execute(session, {"device_id": device_id}).one_or_none()
    if row is None:
        session.execute(NEW_DEVICE_STATE(session), {"device_id": device_id})
        row = LOCK_DEVICE_STATE.execute(session, {"device_id": device_id}).one()
    read = row.seq is not None and row.seq == row.max_seq
    return DeviceState(
        row.max_seq or 0,
        row.missing_ranges or [],
        Stamp(row.occurred_at_device, row.tracking_no, row.pushed_at) if read else None,
        row.last_seen_at,
        row.written_off_ranges or [],
        row.held_at_write_off or 0,
        row.acked_through_seq or 0,
        row.unsettled_seq_conflicts or 0,
        row.seq_conflicts_compared is not False,
    )


def station_after_lock(session: Session, device_id: str) -> int | None:
    """The device's station as committed now, read after ``lock_device_state``: an
    admin's move (``sync.device_moves``) takes that lock too, so a shift opening or a
    move that waited for it sees where the PDA went. A statement of its own: on
    PostgreSQL the lock's statement, begun before the move committed, reads the device
    row (not locked) as it was then, whatever it waited for. None: no such device."""
    return session.scalar(select(_devices.c.station_id).where(_devices.c.id == device_id))


def declared_first_seq_read(param: str = "device_id") -> ScalarSelect[int | None]:
    """The highest first seq a shift of the device (its id in ``param``) declared: the seqs
    from above the highest held up to it are used, and a balance may name them missing.
    For a statement sent once ``lock_device_state`` is held, not for that lock's own: a
    shift opening declares it under the lock, and on PostgreSQL a lock statement that
    waited for the opening reads the shifts as they were before it committed. One
    index entry (the last of ``ix_shift_device_first_seq``)."""
    return _highest_declared(_shifts.c.first_seq, param)


def _highest_declared(
    column: ColumnElement[int | None], param: str = "device_id"
) -> ScalarSelect[int | None]:
    """The highest ``column`` (a seq) the device's shifts declared (its id in ``param``):
    the last entry of its ``(device_id, column)`` index, one entry read however many
    shifts it has."""
    return (
        select(column)
        .where(_shifts.c.device_id == bindparam(param), column.is_not(None))
        .order_by(column.desc())
        .limit(1)
        .scalar_subquery()
    )


# In one statement (the sign-in's and each refresh's): its sync state by its key, and
# the highest seqs its shifts declared, through ``ix_shift_device_last_seq`` and
# ``ix_shift_device_first_seq``: flat however many years of shifts (one a day) the PDA
# has (tests/sync/test_shifts.py counts it, tests/courier_api/test_query_plans.py plans it).
HELD_MAX_SEQ = Prebuilt(
    lambda _dialect: select(
        select(_states.c.max_seq)
        .where(_states.c.device_id == bindparam("device_id"))
        .scalar_subquery(),
        _highest_declared(_shifts.c.last_seq),
        _highest_declared(_shifts.c.first_seq),
    )
)


def held_max_seq(session: Session, device_id: str) -> int:
    """The device's highest seq the server holds (applied or rejected; 0: none yet), or
    one a shift of the device declared used, if higher: a ``last_seq``, or the seq
    before a ``first_seq``. A PDA that lost its storage (a reset, the app reinstalled)
    numbers its next events from here on: numbered from 1 again, they would all be
    refused as ``seq_conflict``; numbered from the seqs held alone, those a shift
    declared and the server never got would be filed under that shift (its seqs hold
    them), not under the shift the PDA records them in."""
    held, last_seq, first_seq = HELD_MAX_SEQ.execute(session, {"device_id": device_id}).one()
    return max(held or 0, last_seq or 0, (first_seq or 1) - 1)
