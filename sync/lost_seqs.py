"""A manager writes off the seqs a PDA lost (a reset, a broken flash).

Those seqs would stay in the device's missing ranges for good: the receipt's
``acked_through_seq`` would never pass the first of them again, so a PDA that prunes
only up to it (the contract) would never prune again and its storage would fill, and
every receipt and every balance of the shifts owning them would name them as still on
the PDA. Written off, they leave the missing ranges for ``written_off_ranges``: held
for the acknowledgement and for a balance's status, and named on the balance with the
write-off (who, when, why) instead. Only seqs missing now may be written off.

An event of a written-off seq that arrives after all is taken as any late event
(rule 1: nothing from the field is lost): the push takes its seq out of
``written_off_ranges`` (``sync.ingest``), and the write-off of it is moot.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from sqlalchemy import update
from sqlalchemy.orm import Session

from models import Device, DeviceSyncState, SeqWriteOff
from sync import audit
from sync.acks import Ranges, SeqTracker, merged, seq_count, shown, without
from sync.device_state import lock_device_state
from sync.errors import InvalidInput

ACTION = "lost_seqs_written_off"
MAX_REASON_LENGTH = 2000
RANGES_NAMED = 20  # in a refusal's message, at most
_states = DeviceSyncState.__table__


class WrittenOff(NamedTuple):
    """A write-off, and the device's seqs as they stand after it."""

    write_off: SeqWriteOff
    seq_count: int
    acked_through_seq: int
    missing_ranges: Ranges


def requested_ranges(seqs: Iterable[int], ranges: Iterable[Sequence[int]]) -> Ranges:
    """What a request names, seqs and ``[first, last]`` ranges together, merged."""
    wanted = [[seq, seq] for seq in seqs]
    for first, last in ranges:
        if not 1 <= first <= last:
            raise InvalidInput(
                f"range [{first}, {last}] is not a range of seqs: 1 <= first <= last",
                code="invalid_range",
                field="ranges",
            )
        wanted.append([first, last])
    if not wanted:
        raise InvalidInput(
            "name the seqs to write off (seqs, ranges)", code="seqs_required", field="seqs"
        )
    return merged(wanted)


def write_off_lost_seqs(
    *, session: Session, device: Device, ranges: Ranges, reason: str, user_id: int
) -> WrittenOff:
    """Write off ``ranges`` (merged) of ``device``'s seqs as lost, in the caller's
    transaction, audit-logged (``lost_seqs_written_off``). Refused unless every one of
    them is missing now (``seqs_not_missing``, naming those that are not), or without
    a ``reason``. Takes the device's sync-state lock, as a push does: the two never
    interleave."""
    text = (reason or "").strip()
    if not text:
        raise InvalidInput(
            "say why the seqs are lost in a reason", code="reason_required", field="reason"
        )
    if len(text) > MAX_REASON_LENGTH:
        raise InvalidInput(
            f"the reason is longer than {MAX_REASON_LENGTH} characters",
            code="reason_too_long",
            field="reason",
        )
    state = lock_device_state(session, device.id)
    not_missing = without(ranges, state.missing_ranges)
    if not_missing:
        named = shown(not_missing[:RANGES_NAMED])
        if len(not_missing) > RANGES_NAMED:
            named += f" and {len(not_missing) - RANGES_NAMED} more ranges"
        raise InvalidInput(
            f"seqs {named} of device {device.id} are not missing (the server holds "
            "them, or they are beyond the highest seq it holds): only seqs the device "
            "has not sent may be written off",
            code="seqs_not_missing",
            field="seqs",
        )
    missing = without(state.missing_ranges, ranges)
    acked = SeqTracker(state.max_seq, missing).acked_through
    session.execute(
        update(_states)
        .where(_states.c.device_id == device.id)
        .values(
            missing_ranges=missing,
            written_off_ranges=merged([*state.written_off_ranges, *ranges]),
            acked_through_seq=acked,
        )
    )
    held = session.identity_map.get(session.identity_key(DeviceSyncState, device.id))
    if held is not None:
        session.expire(held)
    write_off = SeqWriteOff(
        device_id=device.id,
        station_id=device.station_id,
        ranges=ranges,
        reason=text,
        written_off_by=user_id,
    )
    session.add(write_off)
    session.flush()
    count = seq_count(ranges)
    audit.append(
        session=session,
        actor_id=user_id,
        action=ACTION,
        subject_type="device",
        subject_key=device.id,
        details={
            "station_id": device.station_id,
            "write_off_id": write_off.id,
            "ranges": ranges,
            "seq_count": count,
            "reason": text,
            "acked_through_seq": acked,
        },
    )
    return WrittenOff(write_off, count, acked, missing)
