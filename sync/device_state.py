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
from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy import and_, bindparam, select, update
from sqlalchemy.orm import Session

from models import Device, DeviceSyncState, ScanEvent
from sync import audit
from sync.acks import SeqTracker
from sync.errors import Conflict, InvalidInput
from sync.inversions import Stamp
from sync.sql import Prebuilt, insert_ignoring_conflict

_states = DeviceSyncState.__table__
_events = ScanEvent.__table__
_devices = Device.__table__
# With the event stored at the device's highest seq, if any: the one before an online
# PDA's next scan, which the time-inversion rule compares it with. (On PostgreSQL a
# push that waited for this lock gets the state row as now but the event from before
# its wait: ``DeviceState.at_max_seq`` holds only an event whose seq is max_seq.) And
# the device's last-seen time, which a push leaves alone within a minute of it.
LOCK_DEVICE_STATE = Prebuilt(
    lambda _dialect: (
        select(
            _states.c.max_seq,
            _states.c.missing_ranges,
            _events.c.seq,
            _events.c.occurred_at_device,
            _events.c.tracking_no,
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


class DeviceState(NamedTuple):
    """What a push reads of its device's sync state (``device_sync_state``)."""

    max_seq: int
    missing_ranges: list[list[int]]
    # The event stored at ``max_seq``, as read with the lock; None: not known (that seq
    # arrived rejected, none did, or the lock was waited for), to be looked up.
    at_max_seq: Stamp | None = None
    # The device's last-seen time (``device.last_seen_at``), as read with the lock.
    device_seen_at: dt.datetime | None = None


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
        Stamp(row.occurred_at_device, row.tracking_no) if read else None,
        row.last_seen_at,
    )


def held_max_seq(session: Session, device_id: str) -> int:
    """The device's highest seq the server holds (applied or rejected; 0: none yet). A
    PDA that lost its storage (a reset, the app reinstalled) numbers its next events
    from here on: numbered from 1 again, they would all be refused as ``seq_conflict``."""
    held = session.scalar(select(_states.c.max_seq).where(_states.c.device_id == device_id))
    return held or 0


WRITTEN_OFF_ACTION = "device_seqs_written_off"
MAX_REASON_LENGTH = 2000
MISSING_SEQS_SHOWN = 100


@dataclass(frozen=True)
class SeqsWrittenOff:
    device_id: str
    first_seq: int
    last_seq: int
    acked_through_seq: int
    missing_seq_count: int
    missing_seqs: list[int]  # the first ``MISSING_SEQS_SHOWN`` still missing


def write_off_seqs(
    *,
    session: Session,
    device_id: str,
    first_seq: int,
    last_seq: int,
    reason: str,
    actor_id: int,
) -> SeqsWrittenOff:
    """Count seqs the server waits for as lost with the PDA's storage (a reset, the app
    reinstalled): a manager's word, with a reason, in the audit log.

    Until then they are missing for good: ``acked_through_seq`` stops below the first
    of them, so the PDA may prune nothing it sends later, and the shift that owns them
    stays provisional. Only seqs still missing can be written off; one that arrives
    afterwards is stored as usual (nothing of it was held)."""
    text = reason.strip()
    if not text:
        raise InvalidInput("reason is required", code="reason_required", field="reason")
    if len(text) > MAX_REASON_LENGTH:
        raise InvalidInput(
            f"reason is longer than {MAX_REASON_LENGTH} characters",
            code="reason_too_long",
            field="reason",
        )
    if first_seq > last_seq:
        raise InvalidInput(
            "last_seq must not be below first_seq", code="invalid_seq_range", field="last_seq"
        )
    state = lock_device_state(session, device_id)
    tracker = SeqTracker(state.max_seq, [list(r) for r in state.missing_ranges])
    if tracker.missing_between(first_seq, last_seq) != last_seq - first_seq + 1:
        shown = ", ".join(f"{low}-{high}" for low, high in tracker.missing[:5]) or "none"
        raise Conflict(
            f"seqs {first_seq} to {last_seq} of {device_id} are not all missing: only seqs "
            f"the server is waiting for can be written off (missing now: {shown})",
            code="seqs_not_missing",
            field="first_seq",
        )
    before = tracker.acked_through
    tracker.write_off(first_seq, last_seq)
    session.execute(
        update(DeviceSyncState)
        .where(DeviceSyncState.device_id == device_id)
        .values(missing_ranges=tracker.missing, acked_through_seq=tracker.acked_through)
    )
    audit.append(
        session=session,
        actor_id=actor_id,
        action=WRITTEN_OFF_ACTION,
        subject_type="device",
        subject_key=device_id,
        details={
            "first_seq": first_seq,
            "last_seq": last_seq,
            "reason": text,
            "acked_through_seq": {"before": before, "after": tracker.acked_through},
        },
    )
    return SeqsWrittenOff(
        device_id=device_id,
        first_seq=first_seq,
        last_seq=last_seq,
        acked_through_seq=tracker.acked_through,
        missing_seq_count=tracker.missing_count,
        missing_seqs=tracker.missing_seqs(MISSING_SEQS_SHOWN),
    )
