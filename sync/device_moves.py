"""An admin moves a PDA to another station: one sent from station A to station B.

PDA ids are unique across stations, so a PDA that changed hands cannot be registered
again at its new station: it is moved, by an admin (managers see their own station
only, and must not take another station's PDA). What it did at its old station stays
there: its shifts, events, proofs, flags and write-offs keep the station they happened
at (each row carries its own ``station_id``), so the old station's board and reports
are unchanged, and the new station's hold what the PDA does from the move on.

For that to hold, nothing of the old station may still be under way on the PDA:

* a shift still open on it is closed first (its handover is the old station's);
* seqs the server knows the PDA used and does not hold (gaps, and seqs a shift
  declared beyond the highest held) are events still on the PDA, of the old
  station's shifts: pushed there, or written off as lost by its manager, first.

The move revokes the PDA's tokens (``Device.moved_at``, checked on every request with
the token's ``iat``, ``sync.accounts``): it signs in anew at its new station, and a
token issued before a move does not work again if it moves back. It is audit-logged
(``device_moved``: who, the station from and to).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy.orm import Session

from models import Device, Station, utcnow
from sync.acks import Ranges, merged, seq_count, shown
from sync.device_state import held_max_seq, lock_device_state, station_after_lock
from sync.directory import record_device_moved
from sync.errors import Conflict
from sync.shifts import open_shift_of
from sync.wording import counted

SEQ_RANGES_NAMED = 10  # ranges a refusal names at most


def move_device(
    *,
    session: Session,
    device: Device,
    station: Station,
    moved_by: int | None,
    now: dt.datetime | None = None,
) -> Device:
    """Move ``device`` to ``station``, in the caller's transaction (``moved_by``: the
    admin, None for the command line).

    Refused (409) while it has a shift open (``device_has_open_shift``) or seqs not
    pushed (``device_has_unsynced_seqs``): both belong to its old station. Takes the
    device's sync-state lock first, as a push and a shift's opening do, so that
    neither slips in between the checks and the move, and two moves take turns (the
    second moves it from where the first left it). To the station it is at already,
    nothing changes and nothing is logged.
    """
    state = lock_device_state(session, device.id)
    if station_after_lock(session, device.id) != device.station_id:
        session.refresh(device)  # another admin's move committed while this one waited
    if device.station_id == station.id:
        return device
    old = session.get(Station, device.station_id)
    assert old is not None
    shift = open_shift_of(session=session, device_id=device.id)
    if shift is not None:
        raise Conflict(
            f"device {device.id} has shift {shift.id} open at {old.code}: its courier "
            f"hands it over and it is closed there before the PDA moves",
            code="device_has_open_shift",
            field="device_id",
        )
    unsynced = unsynced_seqs(state.max_seq, state.missing_ranges, held_max_seq(session, device.id))
    if unsynced:
        raise Conflict(
            f"device {device.id} has {counted(seq_count(unsynced), 'seq')} the server does "
            f"not hold "
            f"({_named(unsynced)}): events still on the PDA, of {old.code}'s shifts. "
            f"They are pushed at {old.code}, or written off as lost by its manager "
            f"(POST /api/v1/devices/{device.id}/lost-seqs), before the PDA moves",
            code="device_has_unsynced_seqs",
            field="device_id",
        )
    now = now or utcnow()
    device.station_id = station.id
    device.moved_at = now
    session.flush()
    record_device_moved(session=session, device=device, old=old, moved_by=moved_by)
    return device


def unsynced_seqs(max_seq: int, missing: Ranges, declared_max_seq: int) -> Ranges:
    """The seqs a PDA used that the server neither holds nor has written off: the gaps
    below its highest seq held (``missing``), and those above it up to the highest a
    shift of it declared (``declared_max_seq``, ``held_max_seq``)."""
    above = [[max_seq + 1, declared_max_seq]] if declared_max_seq > max_seq else []
    return merged([*missing, *above])


def _named(ranges: Ranges) -> str:
    named = shown(ranges[:SEQ_RANGES_NAMED])
    if len(ranges) > SEQ_RANGES_NAMED:
        named += f" and {len(ranges) - SEQ_RANGES_NAMED} more ranges"
    return named
