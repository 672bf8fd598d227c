"""A manager writes off the seqs a PDA lost (a reset, a broken flash).

Those seqs would stay missing for good: the receipt's ``acked_through_seq`` would never
pass the first of them again, so a PDA that prunes only up to it (the contract) would
never prune again and its storage would fill, and every receipt and every balance of
the shifts owning them would name them as still on the PDA. Written off, they leave
the missing ranges for ``written_off_ranges``: held for a balance's status, and named
on the balance with the write-off (who, when, why) instead; held for the
acknowledgement once the server holds a seq after them (``sync.acks.acknowledged_through``:
a PDA only out of range still holds them, and would delete them on a receipt passing
them).

Any seq a balance may name as missing may be written off: a gap below the highest seq
the server holds (the sync state's ``missing_ranges``), and a seq above it up to the
highest a shift of the device declared used (``held_max_seq``: a ``last_seq`` given at
a close, the seq before a ``first_seq`` given at an opening), as a shift closed online
declares the seqs of a last batch that never came. Written off, those count as held:
the device's ``max_seq`` moves up to the highest written off, and the seqs up to it
neither held nor written off become gaps below it. The PDA, reset, numbers on after what
its shifts declared (the sign-in's ``device_max_seq``), so its next event comes after
them, not after a gap. Refused: seqs the server holds, seqs written off already, and
seqs beyond anything declared (nobody knows they exist).

An event of a written-off seq that arrives after all is taken as any late event
(rule 1: nothing from the field is lost): the push takes its seq out of
``written_off_ranges`` (``sync.ingest``), and the write-off of it is moot. The list of
write-offs keeps each as it was made and says what of it still stands
(``still_standing``): which write-offs the PDA later disproved.

Written off, seqs hold no event, as rejected ones: the events stored around them are
neighbours for good, and their pair is judged for rule 6 (``time_inversion``) by the
write-off when both had arrived before it (``sync.inversion_flags.judge_write_off``), as
a push storing either after it judges it. A written-off seq arriving after all splits
the pair again (``sync.ingest``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from models import (
    Device,
    DeviceSyncState,
    ScanEvent,
    SeqWriteOff,
    Shift,
    Station,
    User,
    utcnow,
)
from sync import audit
from sync.acks import (
    Ranges,
    SeqTracker,
    acknowledged_through,
    highest_held,
    merged,
    overlap,
    seq_count,
    shown,
    without,
)
from sync.balances import shift_seqs
from sync.device_state import held_max_seq, held_state, lock_device_state
from sync.errors import InvalidInput, PermissionDenied
from sync.handover import owned_seqs
from sync.inversion_flags import DEFAULT_TOLERANCE, judge_write_off
from sync.manager_text import manager_text
from sync.paging import MAX_PAGE_SIZE
from sync.shifts import (
    judge_reopening,
    lock_shifts,
    may_own_revealed_gap,
    parcels_of_shifts,
    reopened_with_seqs_left_open,
)

ACTION = "lost_seqs_written_off"
RANGES_NAMED = 20  # in a refusal's message, at most
_states = DeviceSyncState.__table__


class WrittenOff(NamedTuple):
    """A write-off, and the device's seqs as they stand after it."""

    write_off: SeqWriteOff
    seq_count: int
    acked_through_seq: int
    missing_ranges: Ranges


class Seqs(NamedTuple):
    """A device's seqs as its sync state keeps them (``DeviceSyncState``)."""

    max_seq: int
    missing_ranges: Ranges
    written_off_ranges: Ranges
    # The highest seq held at the last write-off, and the acknowledgement so far
    # (``acknowledged_through``).
    held_at_write_off: int = 0
    acknowledged_before: int = 0

    @property
    def acked_through_seq(self) -> int:
        return acknowledged_through(
            self.max_seq,
            self.missing_ranges,
            self.written_off_ranges,
            held_at_write_off=self.held_at_write_off,
            acknowledged_before=self.acknowledged_before,
        )

    def arrived(self, seq: int) -> Seqs:
        """These seqs once ``seq`` arrives, as a push stores them (``sync.ingest``): a
        written-off seq that arrives is held like any other, and the acknowledgement
        then is the one the next never goes below."""
        tracker = SeqTracker.of(self.max_seq, self.missing_ranges)
        tracker.add(seq)
        moved = self._replace(
            max_seq=tracker.max_seq,
            missing_ranges=tracker.missing,
            written_off_ranges=without(self.written_off_ranges, [[seq, seq]]),
        )
        return moved._replace(acknowledged_before=moved.acked_through_seq)


class Refused(NamedTuple):
    """The seqs a write-off may not name, by why (disjoint ascending ranges each)."""

    held: Ranges  # the server holds them (an event, or a rejection)
    written_off: Ranges  # written off already, none arrived since
    undeclared: Ranges  # beyond what the server holds and any shift declared


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


def refused_seqs(ranges: Ranges, seqs: Seqs, declared_max_seq: int) -> Refused:
    """Which of ``ranges`` may not be written off, and why (pure). Allowed: the gaps
    below ``max_seq`` and the seqs above it up to ``declared_max_seq`` (``held_max_seq``:
    what the device's shifts declared used)."""
    beyond_held = [[seqs.max_seq + 1, declared_max_seq]] if declared_max_seq > seqs.max_seq else []
    refused = without(ranges, [*seqs.missing_ranges, *beyond_held])
    undeclared = without(refused, [[1, max(seqs.max_seq, declared_max_seq)]])
    written_off = overlap(refused, seqs.written_off_ranges)
    held = without(refused, [*undeclared, *written_off])
    return Refused(held, written_off, undeclared)


def after_write_off(ranges: Ranges, seqs: Seqs) -> Seqs:
    """The device's seqs once ``ranges`` (none refused) are written off (pure): they
    count as held, so ``max_seq`` rises to the highest of them, and the seqs up to it
    neither held nor written off are gaps below it. A reset PDA numbers on after what
    its shifts declared: its next event comes after the written-off seqs, not after a
    gap (``SeqTracker.add``)."""
    top = max(seqs.max_seq, ranges[-1][1] if ranges else 0)
    beyond_held = [[seqs.max_seq + 1, top]] if top > seqs.max_seq else []
    held = highest_held(seqs.max_seq, seqs.missing_ranges, seqs.written_off_ranges)
    return Seqs(
        top,
        without([*seqs.missing_ranges, *beyond_held], ranges),
        merged([*seqs.written_off_ranges, *ranges]),
        max(seqs.held_at_write_off, held),
        seqs.acked_through_seq,
    )


def refusal(device_id: str, refused: Refused, declared_max_seq: int) -> InvalidInput:
    """``seqs_not_missing``, naming each refused range with why it is refused."""
    everything = merged([*refused.held, *refused.written_off, *refused.undeclared])
    reasons = []
    if refused.held:
        reasons.append(f"the server holds {_named(refused.held)}")
    if refused.written_off:
        reasons.append(f"{_named(refused.written_off)} are written off already")
    if refused.undeclared:
        reasons.append(
            f"{_named(refused.undeclared)} are beyond seq {declared_max_seq}, the highest "
            "the server holds or a shift of the device declared: nobody knows they exist"
        )
    return InvalidInput(
        f"seqs {_named(everything)} of device {device_id} are not missing: "
        + "; ".join(reasons)
        + ". Only seqs the device has not sent, up to the highest a shift of it declared, "
        "may be written off",
        code="seqs_not_missing",
        field="seqs",
    )


class Owned(NamedTuple):
    """Seqs of a write-off that a shift of the device owns (``sync.handover.owned_seqs``,
    as its balance reads them)."""

    ranges: Ranges
    shift_id: int
    station_id: int


def seq_owners(session: Session, device_id: str, ranges: Ranges) -> list[Owned]:
    """The device's shifts owning any of ``ranges``, each with those it owns, in shift
    id order. Read as the balances read them (``sync.balances.shift_seqs``), for the shifts
    that may own them only: those not declared to end below them, nor to start above
    them with no event below their first seq (a PDA's history of declared shifts is not
    read whole for a write-off)."""
    low, high = ranges[0][0], ranges[-1][1]
    below_high = (
        select(ScanEvent.id).where(ScanEvent.shift_id == Shift.id, ScanEvent.seq <= high).exists()
    )
    candidates = session.scalars(
        select(Shift)
        .where(
            Shift.device_id == device_id,
            or_(Shift.last_seq.is_(None), Shift.last_seq >= low),
            or_(Shift.first_seq.is_(None), Shift.first_seq <= high, below_high),
        )
        .order_by(Shift.id)
    ).all()
    station_of = {shift.id: shift.station_id for shift in candidates}
    found = []
    for shift_id, seqs in sorted(shift_seqs(session, candidates).items()):
        span = owned_seqs(seqs)
        owned = overlap(ranges, [list(span)]) if span is not None else []
        if owned:
            found.append(Owned(owned, shift_id, station_of[shift_id]))
    return found


def _parcels_of_owners(session: Session, owners: Sequence[Owned]) -> list[str]:
    """The parcels of the shifts owning a write-off's seqs (``seq_owners``): their
    manifests and every outcome they hold (``sync.shifts.parcels_of_shifts``, one
    statement). A write-off decides those shifts' balances (an outcome on a lost seq is
    missing for good: the parcel is lost, not still on the PDA), as a close for the
    courier does, and is filed under the same parcels, so that an auditor settling a
    dispute about one finds it in its history (``GET /audit?tracking_no=``)."""
    return parcels_of_shifts(session, [owned.shift_id for owned in owners])


def ensure_own_station(
    session: Session, device: Device, ranges: Ranges, station_id: int | None
) -> list[Owned] | None:
    """Refuse a manager of ``station_id`` seqs that are not their station's (rule 7):
    seqs a shift of another station owns (a PDA moved since: those are that station's
    handover), or seqs no shift owns on a PDA of another station. ``None``: a
    cross-station role (an admin), who may write off any. The refusal
    (``seqs_of_another_station``, 403) names the ranges and the shifts owning them.
    Returns the owners read (``seq_owners``), None for a cross-station role (none read)."""
    if station_id is None:
        return None
    owners = seq_owners(session, device.id, ranges)
    foreign = [owned for owned in owners if owned.station_id != station_id]
    unowned = without(ranges, [r for owned in owners for r in owned.ranges])
    if device.station_id == station_id:
        unowned = []
    if not foreign and not unowned:
        return owners
    codes = dict(
        session.execute(
            select(Station.id, Station.code).where(
                Station.id.in_({o.station_id for o in foreign} | {device.station_id})
            )
        ).all()
    )
    named = [
        f"{_named(owned.ranges)} belong to shift {owned.shift_id} of station "
        f"{codes[owned.station_id]}"
        for owned in foreign
    ]
    if unowned:
        named.append(
            f"{_named(unowned)} belong to no shift, and PDA {device.id} is station "
            f"{codes[device.station_id]}'s"
        )
    raise PermissionDenied(
        f"seqs of device {device.id} are another station's to write off: "
        + "; ".join(named)
        + ". A manager writes off only seqs of their own station's shifts (or of no shift, "
        "on their station's PDA): write off those that are, and leave these to that "
        "station's manager or an admin",
        code="seqs_of_another_station",
        field="seqs",
    )


def ran_shifts_at(*, session: Session, device_id: str, station_id: int | None) -> bool:
    """Whether the device ran a shift at ``station_id``: a PDA moved from there since
    still has that station's shifts' lost seqs to write off. One query."""
    if station_id is None:
        return False
    return (
        session.scalar(
            select(Shift.id)
            .where(Shift.device_id == device_id, Shift.station_id == station_id)
            .limit(1)
        )
        is not None
    )


def _named(ranges: Ranges) -> str:
    named = shown(ranges[:RANGES_NAMED])
    if len(ranges) > RANGES_NAMED:
        named += f" and {len(ranges) - RANGES_NAMED} more ranges"
    return named


def write_off_lost_seqs(
    *,
    session: Session,
    device: Device,
    ranges: Ranges,
    reason: str,
    user_id: int,
    station_id: int | None = None,
    inversion_tolerance: dt.timedelta = DEFAULT_TOLERANCE,
) -> WrittenOff:
    """Write off ``ranges`` (merged) of ``device``'s seqs as lost, in the caller's
    transaction, audit-logged (``lost_seqs_written_off``). Refused unless every one of
    them is missing now, below the highest seq held or up to the highest a shift of
    the device declared (``seqs_not_missing``, naming those that are not and why), or
    without a ``reason``. Takes the device's sync-state lock, as a push does: the two
    never interleave. ``station_id``: the station of the manager writing them off, who
    may write off only their own station's seqs (``ensure_own_station``); None: anyone's
    (an admin).

    A shift reopened after its sign-off only because seqs of it were still on the PDA
    is signed off again once they are written off and its balance is again the one
    signed off (``sync.shifts.judge_reopening``), after the write-off's entry in the
    audit log. Seqs written off above the highest held leave the seqs below them
    neither held nor written off as gaps: a signed-off shift owning some that its
    sign-off did not see missing reopens, as when a push shows them.

    The events stored on either side of a range written off are neighbours now: their
    pair is flagged ``time_inversion`` if the later seq is dated more than
    ``inversion_tolerance`` before the earlier (``TIME_INVERSION_TOLERANCE_SECONDS``),
    as a push storing either after the write-off flags it: at the station the later
    event was pushed at, its courier's (a PDA moved since: its old station's), not the
    PDA's station now."""
    with audit.deferred(session):
        written, held, revealed = _write_off(session, device, ranges, reason, user_id, station_id)
        judge_write_off(
            session=session,
            device_id=device.id,
            ranges=written.write_off.ranges,
            held=held,
            tolerance=inversion_tolerance,
        )
        _judge_reopenings(session, device.id, revealed, written.write_off.id)
    return written


def _judge_reopenings(
    session: Session, device_id: str, revealed: Ranges, write_off_id: int
) -> None:
    """Judge the device's signed-off shifts the write-off may change, locked after its
    sync state (the service's lock order), rarely any, by ``sync.shifts.judge_reopening``:
    withdraw the reopenings the seqs just written off made (those reopened since their
    sign-off and closed without a last seq), and reopen those owning the gaps it
    ``revealed`` (``sync.shifts.may_own_revealed_gap``), as a push showing them would."""
    judged = reopened_with_seqs_left_open(device_id)
    if revealed:
        judged = or_(judged, may_own_revealed_gap(device_id, revealed[0][0]))
    for shift in lock_shifts(session, [], also=judged).values():
        judge_reopening(
            session=session, shift=shift, now=utcnow(), details={"write_off_id": write_off_id}
        )


def _write_off(
    session: Session,
    device: Device,
    ranges: Ranges,
    reason: str,
    user_id: int,
    station_id: int | None,
) -> tuple[WrittenOff, SeqTracker, Ranges]:
    """The write-off, the device's seqs held after it, and the gaps it leaves below the
    seqs written off above the highest held (none before it)."""
    text = manager_text(
        reason, "reason", required=True, missing="say why the seqs are lost in a reason"
    )
    assert text is not None  # required
    state = lock_device_state(session, device.id)
    owners = ensure_own_station(session, device, ranges, station_id)
    before = Seqs(
        state.max_seq,
        state.missing_ranges,
        state.written_off_ranges,
        state.held_at_write_off,
        state.acked_through_seq,
    )
    declared = max(state.max_seq, held_max_seq(session, device.id))
    refused = refused_seqs(ranges, before, declared)
    if any(refused):
        raise refusal(device.id, refused, declared)
    after = after_write_off(ranges, before)
    acked = after.acked_through_seq
    session.execute(
        update(_states)
        .where(_states.c.device_id == device.id)
        .values(
            max_seq=after.max_seq,
            missing_ranges=after.missing_ranges,
            written_off_ranges=after.written_off_ranges,
            held_at_write_off=after.held_at_write_off,
            acked_through_seq=acked,
        )
    )
    cached = held_state(session, device.id)
    if cached is not None:
        session.expire(cached)
    # Made at the manager's station (their own shifts' seqs, also of a PDA moved since:
    # ``list_write_offs`` lists it to them); an admin's, at the PDA's.
    made_at = device.station_id if station_id is None else station_id
    write_off = SeqWriteOff(
        device_id=device.id,
        station_id=made_at,
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
            "station_id": made_at,
            "write_off_id": write_off.id,
            "ranges": ranges,
            "seq_count": count,
            "reason": text,
            "acked_through_seq": acked,
        },
        parcels=_parcels_of_owners(
            session, seq_owners(session, device.id, ranges) if owners is None else owners
        ),
    )
    revealed = without(after.missing_ranges, before.missing_ranges)
    held = SeqTracker.of(after.max_seq, after.missing_ranges)
    return WrittenOff(write_off, count, acked, after.missing_ranges), held, revealed


class WriteOffRecord(NamedTuple):
    """A write-off as listed: who by name, its ranges as written off, and those of them
    still written off now."""

    write_off: SeqWriteOff
    # Full name, else username; None where the reader may not know them
    # (``sync.pages.write_offs_named``).
    written_off_by_name: str | None
    # Its ranges within the device's ``written_off_ranges`` now: none of their seqs
    # arrived since. The others' events (or rejected events) came after all, and
    # disproved that much of it (``still_standing``).
    still_written_off: Ranges

    @property
    def written_off_by(self) -> int:
        return self.write_off.written_off_by

    @property
    def arrived_seq_count(self) -> int:
        """How many of its seqs the PDA sent after all, since it was made."""
        return seq_count(self.write_off.ranges) - seq_count(self.still_written_off)


def still_standing(ranges: Ranges, written_off_now: Ranges) -> Ranges:
    """What of a write-off of ``ranges`` still stands (pure): the seqs of it still in
    the device's ``written_off_ranges``, which a push takes out as their events arrive.
    Write-offs never share a seq (one written off already is refused), so each such
    seq is this write-off's."""
    return overlap(ranges, written_off_now)


def list_write_offs(
    *,
    session: Session,
    device_id: str,
    station_id: int | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> list[WriteOffRecord]:
    """The device's write-offs, newest first, each with what of it still stands
    (``still_standing``); ``before_id`` is the last id of the previous page
    (``ix_seq_write_off_device``). Two queries.

    ``station_id`` keeps those made at that station (a manager's own: the write-offs of
    their station's shifts); ``None``, every station's (auditors, admins). A PDA moved
    to another station keeps its history, and the new station's manager reads its
    write-offs from then on only, as the old station's shifts are not theirs."""
    now = session.scalar(
        select(_states.c.written_off_ranges).where(_states.c.device_id == device_id)
    )
    query = (
        select(SeqWriteOff, User.username, User.full_name)
        .join(User, User.id == SeqWriteOff.written_off_by)
        .where(SeqWriteOff.device_id == device_id)
        .order_by(SeqWriteOff.id.desc())
        .limit(min(limit, MAX_PAGE_SIZE))
    )
    if before_id is not None:
        query = query.where(SeqWriteOff.id < before_id)
    if station_id is not None:
        query = query.where(SeqWriteOff.station_id == station_id)
    return [
        WriteOffRecord(
            write_off, full_name or username, still_standing(write_off.ranges, now or [])
        )
        for write_off, username, full_name in session.execute(query)
    ]
