"""Writing off the seqs a PDA lost (``sync.lost_seqs``): which may be, and what follows.

Above all the case a station manager meets at 19:00: the courier closed the shift
online declaring its ``last_seq``, but the PDA's last batch never reached the server
and the PDA was reset (or broke). The seqs of that batch lie above the highest seq the
server holds: not a gap of the sync state, and yet named by the balance as still on
the PDA. They may be written off like a gap.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from models import DeviceSyncState, Flag, FlagStatus, Shift, ShiftStatus, SyncBatch
from sync import audit, shifts
from sync.acks import merged
from sync.balances import gather, shift_balance
from sync.device_state import held_max_seq
from sync.errors import InvalidInput
from sync.handover import owned_seqs
from sync.ingest import PushBatch, ingest
from sync.lost_seqs import (
    Refused,
    Seqs,
    WrittenOff,
    after_write_off,
    refused_seqs,
    seq_owners,
    write_off_lost_seqs,
)
from tests.conftest import World
from tests.sync.test_shifts import NOW, RULES, Pda, at, parcels

REASON = "PDA reset at 18:40: its last batch never left it"


@pytest.fixture
def pda(session: Session, world: World) -> Pda:
    return Pda(session, world)


def write_off(session: Session, world: World, *ranges: list[int]) -> WrittenOff:
    done = write_off_lost_seqs(
        session=session,
        device=world.device,
        ranges=list(ranges),
        reason=REASON,
        user_id=world.manager.id,
    )
    session.commit()
    return done


def state(session: Session, world: World) -> tuple[int, list, list, int]:
    """The device's sync state: max_seq, missing, written off, acked_through_seq."""
    row = session.get(DeviceSyncState, world.device.id)
    assert row is not None
    session.refresh(row)
    return row.max_seq, row.missing_ranges, row.written_off_ranges or [], row.acked_through_seq


def last_batch_lost(session: Session, world: World, pda: Pda) -> tuple[Shift, list[str], list]:
    """A shift of seqs 1-6 closed online declaring last_seq 6; the server got 1-4 only:
    the batch of 5 and 6 (two parcels returned) never got through, then the PDA was
    reset. Its parcels, and the two lost events."""
    a, b, c = parcels(session, world, 3)
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(b), pda.event(c), pda.event(a, "delivered")])
    lost = [pda.event(b, "returned_to_station"), pda.event(c, "returned_to_station")]
    return pda.close(shift, last_seq=6), [a, b, c], lost


def test_a_write_off_is_in_the_history_of_the_parcels_of_the_shift_owning_the_seqs(
    session: Session, world: World, pda: Pda
) -> None:
    """An auditor settles a dispute about parcel b, returned on a seq the PDA lost: the
    write-off made it missing for good, no longer on the PDA. ``GET /audit?tracking_no=b``
    did not list the write-off (subject the PDA, no parcel): it is filed under the
    parcels of the shift owning the seqs, as a close for the courier is, and of no
    other shift."""
    shift, (a, b, c), _ = last_batch_lost(session, world, pda)
    pda.open(first_seq=7)
    (other,) = parcels(session, world, 1)
    pda.push([pda.event(other)])

    write_off(session, world, [5, 6])

    def actions(number: str) -> list[str]:
        return [e.action for e in audit.list_entries(session=session, tracking_no=number)]

    for number in (a, b, c):
        assert "lost_seqs_written_off" in actions(number), (number, actions(number))
    assert "lost_seqs_written_off" not in actions(other)
    assert audit.verify(session=session).ok


def test_a_managers_write_off_reads_the_shifts_owning_the_seqs_once(
    session: Session, world: World, pda: Pda, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manager writes off the seqs a PDA lost over a month (its ranges between many
    shifts): the shifts that may own them are read as their balances read them, every
    event of each (``sync.balances.gather``), to refuse another station's seqs; they
    were read again, whole, for the parcels to file the entry under, and each owning
    shift's parcels then read one statement a shift. Read once now, the parcels of the
    owners in one statement; filed under the same parcels."""
    from sync import lost_seqs

    shift, (a, b, c), _ = last_batch_lost(session, world, pda)
    gathered = lost_seqs.shift_seqs
    calls: list[int] = []

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return gathered(*args, **kwargs)

    monkeypatch.setattr(lost_seqs, "shift_seqs", counted)
    write_off_lost_seqs(
        session=session,
        device=world.device,
        ranges=[[5, 6]],
        reason=REASON,
        user_id=world.manager.id,
        station_id=world.station.id,
    )
    session.commit()

    assert len(calls) == 1, calls
    for number in (a, b, c):
        listed = [e.action for e in audit.list_entries(session=session, tracking_no=number)]
        assert "lost_seqs_written_off" in listed, (number, listed)


def test_who_owns_a_seq_is_read_without_loading_the_shifts_events(
    session: Session, world: World, pda: Pda
) -> None:
    """``GET /flags?tracking_no=`` asks who owns each seq the parcel's rejected events
    hold (``seq_owners``). A PDA that never declares its seqs leaves every shift of it a
    candidate, and each was read as its balance is (``sync.balances.gather``: every
    event, the rules' flags, the parcels' histories): 8 s on SQLite for a year of 250
    shifts of 200 events, on each such request. What a shift owns needs its lowest seq
    only (an aggregate): no event row is loaded, and the owners are still the shifts
    whose balances own the seqs."""
    numbers = parcels(session, world, 6)
    for n in range(3):  # three shifts of seqs 1-3, 4-6 and 7-9, none declaring them
        shift = pda.open(now=at(3 * n + 0.5))
        mine = numbers[2 * n : 2 * n + 2]
        pda.push(
            [pda.event(tn) for tn in mine] + [pda.event(mine[0], "returned_to_station")],
            received_at=at(3 * n + 3.2),
        )
        pda.close(shift, now=at(3 * n + 3.4))
    session.expire_all()
    ids = sorted(s.id for s in session.scalars(select(Shift)))
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    connection = session.connection()
    event.listen(connection, "before_cursor_execute", count)
    try:
        owners = seq_owners(session, world.device.id, [[2, 2], [7, 9]])
    finally:
        event.remove(connection, "before_cursor_execute", count)

    assert [(o.shift_id, o.ranges) for o in owners] == [
        (ids[0], [[2, 2]]),
        (ids[2], [[7, 9]]),
    ]
    balances = gather(session, [session.get(Shift, i) for i in ids])
    assert [owned_seqs(balances[i].seqs) for i in ids] == [(1, 3), (4, 6), (7, 9)]
    loaded = [s for s in statements if "scan_event.client_event_id" in s]
    assert loaded == [], loaded


# -- the rule, pure -------------------------------------------------------------------------


def test_a_write_off_may_name_gaps_and_seqs_up_to_the_highest_declared_and_nothing_else() -> None:
    seqs = Seqs(max_seq=10, missing_ranges=[[3, 4]], written_off_ranges=[[6, 6]])
    assert refused_seqs([[3, 4], [11, 15]], seqs, 15) == Refused([], [], [])
    assert refused_seqs([[1, 20]], seqs, 15) == Refused(
        held=[[1, 2], [5, 5], [7, 10]], written_off=[[6, 6]], undeclared=[[16, 20]]
    )
    # Nothing declared above the highest seq held: nothing above it may be named.
    assert refused_seqs([[11, 11]], seqs, 10) == Refused([], [], [[11, 11]])


def test_seqs_written_off_above_the_highest_held_count_as_held_up_to_the_highest_of_them() -> None:
    """Written off, 13-15 move max_seq up to 15; 11 and 12, declared but neither held nor
    written off, become a gap below it, as they would once the PDA sent seq 16. The
    acknowledgement passes no written-off seq above 10, the highest held: the PDA may
    hold them still, unsent (``acknowledged_through``). Nor 3 and 4, below seqs held
    before the write-off (5-10): a PDA that sent those first may hold 3 and 4 unsent.
    Seq 16, held after the write-off, passes them all."""
    before = Seqs(max_seq=10, missing_ranges=[[3, 4]], written_off_ranges=[])
    after = after_write_off([[13, 15]], before)
    assert after == Seqs(15, [[3, 4], [11, 12]], [[13, 15]], 10, 2)
    assert after.acked_through_seq == 2
    everything = after_write_off([[3, 4], [11, 15]], before)
    assert everything == Seqs(15, [], [[3, 4], [11, 15]], 10, 2)
    assert everything.acked_through_seq == 2
    assert everything.arrived(16).acked_through_seq == 16  # seq 16 held after them


# A PDA numbers 1..PDA_SEQS; its shifts may declare seqs up to ``declared`` used.
PDA_SEQS = 30
write_offs = st.tuples(st.just("off"), st.integers(1, PDA_SEQS), st.integers(0, 5))


def _arrive(seqs: Seqs, seq: int) -> Seqs:
    """``seqs`` once ``seq`` arrives, as a push stores it (``sync.ingest``)."""
    return seqs.arrived(seq)


def _written_off(seqs: Seqs, first: int, more: int, declared: int) -> Seqs:
    """``seqs`` once a manager writes off ``first``..``first + more``, if allowed."""
    ranges = [[first, first + more]]
    if any(refused_seqs(ranges, seqs, max(declared, seqs.max_seq))):
        return seqs
    return after_write_off(ranges, seqs)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(st.tuples(st.just("send"), st.integers(1, PDA_SEQS)), write_offs)),
    st.integers(1, PDA_SEQS),
)
def test_the_acknowledgement_never_goes_back(ops: list[tuple[Any, ...]], declared: int) -> None:
    """Whatever arrives in whatever order and whatever a manager writes off, no receipt
    acknowledges less than one before it: a PDA that pruned must never be asked for
    what it deleted."""
    seqs, acked = Seqs(0, [], []), 0
    for op in ops:
        seqs = _arrive(seqs, op[1]) if op[0] == "send" else _written_off(seqs, *op[1:], declared)
        assert seqs.acked_through_seq >= acked, (op, seqs)
        acked = seqs.acked_through_seq


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(st.tuples(st.just("send"), st.integers(1, 5)), write_offs)),
    st.integers(1, PDA_SEQS),
)
def test_a_pda_sending_oldest_first_is_never_told_to_prune_what_it_has_not_sent(
    ops: list[tuple[Any, ...]], declared: int
) -> None:
    """The PDA sends its queue oldest first, a few at a time; a manager writes off any
    seqs it may meanwhile (the PDA only out of range). No receipt passes a seq the PDA
    has not sent, and once it has sent them all its receipt acknowledges them all."""
    seqs, unsent = Seqs(0, [], []), 1
    for op in ops:
        if op[0] == "send":
            last = min(PDA_SEQS, unsent + op[1] - 1)
            for seq in range(unsent, last + 1):
                seqs = _arrive(seqs, seq)
            unsent = last + 1
        else:
            seqs = _written_off(seqs, *op[1:], declared)
        assert seqs.acked_through_seq < unsent, (op, seqs)
    for seq in range(unsent, PDA_SEQS + 1):
        seqs = _arrive(seqs, seq)
    assert seqs.acked_through_seq == PDA_SEQS


def test_a_pda_that_sent_newer_seqs_first_is_not_told_to_prune_older_ones_written_off() -> None:
    """A PDA out of range all afternoon got seqs 5 and 6 through before 3 and 4 (a
    newest-first queue, or a batch that timed out and waits for its retry); at 19:00
    a manager wrote 3 and 4 off as lost. The write-off's answer and every receipt
    after it acknowledged through 6, and the PDA pruned 3 and 4, never sent. Now the
    acknowledgement stops before them until they come, or a seq after 6 does."""
    seqs = Seqs(0, [], [])
    for seq in (1, 2, 5, 6):
        seqs = seqs.arrived(seq)
    assert seqs.acked_through_seq == 2
    seqs = after_write_off([[3, 4]], seqs)
    assert seqs.acked_through_seq == 2
    assert seqs.arrived(6).acked_through_seq == 2  # its retry of 5 and 6
    assert seqs.arrived(3).acked_through_seq == 3
    assert seqs.arrived(3).arrived(4).acked_through_seq == 6
    assert seqs.arrived(7).acked_through_seq == 7  # a reset PDA's next event


def test_seqs_written_off_long_passed_hold_back_no_later_write_off_that_all_came() -> None:
    """A PDA reset last week: 3 and 4 written off, passed by its next event (7). Today,
    out of range all afternoon, its seq 9 stuck behind 10; at 19:00 a manager wrote 9
    off. The PDA sent 9 after all: every seq is held or long passed, yet the receipt
    stopped at 8, the seqs written off last week counted as ahead of a write-off made
    since, so the PDA kept 9 and 10 until its next scan (tomorrow's). It says 10."""
    seqs = Seqs(0, [], [])
    for seq in (1, 2, 5, 6):
        seqs = seqs.arrived(seq)
    seqs = after_write_off([[3, 4]], seqs).arrived(7)
    assert seqs.acked_through_seq == 7
    seqs = seqs.arrived(8).arrived(10)
    seqs = after_write_off([[9, 9]], seqs)
    assert seqs.acked_through_seq == 8  # 9 may be on the PDA, unsent, behind 10
    assert seqs.arrived(9).acked_through_seq == 10
    assert seqs.arrived(11).acked_through_seq == 11


@settings(max_examples=300, deadline=None)
@given(st.permutations(list(range(1, PDA_SEQS + 1))), st.data())
def test_a_pda_sending_any_order_until_a_write_off_is_never_told_to_prune_what_it_holds(
    order: list[int], data: st.DataObject
) -> None:
    """The PDA sends its queue (1..PDA_SEQS) in any order until a manager writes off seqs
    the server still waits for, then the rest oldest first. No receipt passes a seq it
    has not sent, and once it has sent them all its receipt acknowledges them all."""
    sent_before = data.draw(st.integers(0, PDA_SEQS), label="sent before the write-off")
    seqs = Seqs(0, [], [])
    for seq in order[:sent_before]:
        seqs = seqs.arrived(seq)
        assert seqs.acked_through_seq < min(set(order[sent_before:]) | {PDA_SEQS + 1})
    unsent = sorted(order[sent_before:])
    lost = merged([[seq, seq] for seq in unsent if seq < seqs.max_seq])
    if lost:
        wanted = data.draw(st.sets(st.sampled_from([r[0] for r in lost])), label="written off")
        ranges = [r for r in lost if r[0] in wanted]
        if ranges:
            assert not any(refused_seqs(ranges, seqs, seqs.max_seq))
            seqs = after_write_off(ranges, seqs)
    for index, seq in enumerate(unsent):
        assert seqs.acked_through_seq < seq, (seq, seqs)
        seqs = seqs.arrived(seq)
        assert seqs.acked_through_seq < min(unsent[index + 1 :] or [PDA_SEQS + 1])
    assert seqs.acked_through_seq == PDA_SEQS


@settings(max_examples=300, deadline=None)
@given(st.sets(st.integers(1, PDA_SEQS)), st.integers(1, PDA_SEQS))
def test_a_reset_pdas_next_event_acknowledges_every_seq_written_off(
    arrived: set[int], declared: int
) -> None:
    """A PDA reset with seqs unsent: a manager writes off every seq still missing, and
    the reset PDA's first event, numbered from the new ``device_max_seq + 1``, drains
    the acknowledgement past all of them (its storage does not fill)."""
    seqs = Seqs(0, [], [])
    for seq in sorted(arrived):
        seqs = _arrive(seqs, seq)
    declared = max(declared, seqs.max_seq)
    lost = merged(
        [*seqs.missing_ranges, *([[seqs.max_seq + 1, declared]] * (declared > seqs.max_seq))]
    )
    if lost:
        assert not any(refused_seqs(lost, seqs, declared))
        seqs = after_write_off(lost, seqs)
    device_max_seq = max(seqs.max_seq, declared)
    seqs = _arrive(seqs, device_max_seq + 1)
    assert seqs.acked_through_seq == device_max_seq + 1


def test_a_receipt_stored_passing_written_off_seqs_is_answered_to_a_retry_stopping_before_them(
    session: Session, world: World, pda: Pda
) -> None:
    """Receipts stored before the acknowledgement stopped at the highest seq held passed
    seqs written off as lost. A PDA only out of range, its seqs 3-6 written off at 19:00,
    sent 3 and 4, got no answer (a timeout after the commit) and sent the batch again:
    the stored receipt told it to prune through 6, and it deleted 5 and 6, never sent.
    The retry's receipt stops at 4, the highest seq held; its results are as stored."""
    (a,) = parcels(session, world, 1)
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "out_for_delivery")])
    pda.close(shift, last_seq=6)
    write_off(session, world, [3, 6])
    sent = PushBatch(world.device.id, uuid.uuid4(), NOW, [pda.event(a, "delivered"), pda.event(a)])
    first = ingest(session=session, batch=sent, pusher=pda.pusher, rules=RULES, received_at=NOW)
    session.commit()
    assert first["acked_through_seq"] == 4
    # As the version before stored it: the seqs written off counted as held.
    stored = session.scalars(select(SyncBatch).where(SyncBatch.batch_id == sent.batch_id)).one()
    stored.receipt = {**first, "acked_through_seq": 6}
    session.commit()
    retry = ingest(session=session, batch=sent, pusher=pda.pusher, rules=RULES, received_at=NOW)
    session.commit()
    assert retry["acked_through_seq"] == 4
    assert retry["results"] == first["results"] and retry["server_time"] == first["server_time"]
    # Once the PDA sent 5 and 6 after all, the retry is answered as stored.
    pda.push([pda.event(a, "returned_to_station"), pda.event(a, "out_for_delivery")])
    retry = ingest(session=session, batch=sent, pusher=pda.pusher, rules=RULES, received_at=NOW)
    assert retry["acked_through_seq"] == 6


# -- beyond the highest seq held ------------------------------------------------------------


def test_the_seqs_a_closed_shift_declared_beyond_the_highest_held_are_written_off(
    session: Session, world: World, pda: Pda
) -> None:
    shift, (a, b, c), _ = last_batch_lost(session, world, pda)
    before = shift_balance(session=session, shift=shift)
    assert (before.status, before.missing_seqs) == ("provisional", [5, 6])
    assert state(session, world) == (4, [], [], 4)  # not a gap of the sync state

    done = write_off(session, world, [5, 6])

    # Not acknowledged before a seq after them arrives: the PDA may hold them still.
    assert (done.seq_count, done.acked_through_seq, done.missing_ranges) == (2, 4, [])
    assert state(session, world) == (6, [], [[5, 6]], 4)
    after = shift_balance(session=session, shift=shift)
    # Its two returns were on the lost seqs: missing now, and no longer provisional.
    assert (after.status, after.missing_seqs, after.missing_seq_count) == ("unbalanced", [], 0)
    assert (after.missing, after.written_off_seqs, after.written_off_seq_count) == (2, [5, 6], 2)
    (named,) = after.write_offs
    assert (named.ranges, named.reason, named.written_off_by) == (
        [[5, 6]],
        REASON,
        world.manager.id,
    )
    assert named.written_off_by_name == (world.manager.full_name or world.manager.username)
    # The sign-off needs no forcing any more.
    signed = shifts.sign_off(
        session=session, shift=shift, user_id=world.manager.id, note="b and c not back"
    )
    assert signed.status == ShiftStatus.SIGNED_OFF


def test_the_reset_pdas_next_event_comes_after_the_written_off_seqs_not_after_a_gap(
    session: Session, world: World, pda: Pda
) -> None:
    """The sign-in's device_max_seq is what the shift declared (6) before and after the
    write-off; the reset PDA's next event, seq 7, leaves no gap: the receipt
    acknowledges it, and nothing is missing."""
    last_batch_lost(session, world, pda)
    assert held_max_seq(session, world.device.id) == 6
    write_off(session, world, [5, 6])
    assert held_max_seq(session, world.device.id) == 6
    pda.seq = held_max_seq(session, world.device.id)  # the reset PDA numbers on from here
    (d,) = parcels(session, world, 1)
    later = NOW + dt.timedelta(hours=14)
    next_shift = pda.open(now=later)
    receipt = pda.push(
        [pda.event(d, occurred_at=later + dt.timedelta(minutes=1))],
        received_at=later + dt.timedelta(minutes=2),
    )
    assert (receipt["acked_through_seq"], receipt["missing_seqs"]) == (7, [])
    assert state(session, world) == (7, [], [[5, 6]], 7)
    assert shift_balance(session=session, shift=next_shift).missing_seq_count == 0


def test_written_off_in_part_the_rest_of_the_last_batch_stays_missing(
    session: Session, world: World, pda: Pda
) -> None:
    """Seq 5 may still come (another PDA in the courier's bag): only 6 is written off.
    Below the new max_seq, 5 is a gap now, named by the receipts too."""
    shift, _, lost = last_batch_lost(session, world, pda)
    done = write_off(session, world, [6, 6])
    assert (done.acked_through_seq, done.missing_ranges) == (4, [[5, 5]])
    assert state(session, world) == (6, [[5, 5]], [[6, 6]], 4)
    balance = shift_balance(session=session, shift=shift)
    assert (balance.status, balance.missing_seqs, balance.written_off_seqs) == (
        "provisional",
        [5],
        [6],
    )
    receipt = pda.push([lost[0]])
    # 6, written off, may be on the PDA too: acknowledged once a seq after it arrives.
    assert (receipt["acked_through_seq"], receipt["missing_seqs"]) == (5, [])


def test_seqs_below_a_declared_first_seq_that_never_came_are_written_off(
    session: Session, world: World, pda: Pda
) -> None:
    """The first shift closed without a last_seq; the next opened declaring first_seq
    6: seqs 3 to 5 were used, the server never got them, and the first shift's balance
    waits for them. They lie above the highest seq held (2), below what was declared."""
    a, b = parcels(session, world, 2)
    first = pda.open()
    pda.push([pda.event(a), pda.event(a, "delivered")])
    first = pda.close(first)
    pda.open(first_seq=6, now=NOW + dt.timedelta(hours=1))
    assert shift_balance(session=session, shift=first).missing_seqs == [3, 4, 5]
    refused = pytest.raises(InvalidInput, write_off, session, world, [3, 6])
    assert "6 are beyond seq 5" in refused.value.message
    write_off(session, world, [3, 5])
    balance = shift_balance(session=session, shift=first)
    assert (balance.status, balance.written_off_seqs) == ("balanced", [3, 4, 5])


# -- refused --------------------------------------------------------------------------------


def test_seqs_beyond_anything_declared_are_refused_saying_so(
    session: Session, world: World, pda: Pda
) -> None:
    shift, _, _ = last_batch_lost(session, world, pda)
    with pytest.raises(InvalidInput) as beyond:
        write_off(session, world, [5, 9])
    assert beyond.value.code == "seqs_not_missing" and beyond.value.field == "seqs"
    assert beyond.value.message.startswith(
        "seqs 7-9 of device PDA-0001 are not missing: 7-9 are beyond seq 6, the highest "
        "the server holds or a shift of the device declared: nobody knows they exist."
    )
    with pytest.raises(InvalidInput) as both:
        write_off(session, world, [2, 2], [5, 7])
    assert both.value.message.startswith(
        "seqs 2, 7 of device PDA-0001 are not missing: the server holds 2; 7 are beyond seq 6"
    )
    session.rollback()
    assert state(session, world) == (4, [], [], 4)  # nothing written off
    write_off(session, world, [5, 6])
    with pytest.raises(InvalidInput) as again:
        write_off(session, world, [6, 6])
    assert again.value.message.startswith(
        "seqs 6 of device PDA-0001 are not missing: 6 are written off already."
    )
    session.rollback()
    assert shift_balance(session=session, shift=shift).written_off_seqs == [5, 6]


# -- an event of a written-off seq that arrives after all -----------------------------------


def test_a_written_off_seq_beyond_the_highest_held_arriving_after_all_is_a_late_event(
    session: Session, world: World, pda: Pda
) -> None:
    """Seq 5 turns up after the write-off and the sign-off (the PDA was not reset after
    all): it is applied as any late event, reopens the signed-off shift, and leaves the
    write-off (6 stays written off). The acknowledgement stops at 5: the PDA that sent
    5 may hold 6 too, unsent, and would delete it on a receipt passing it."""
    shift, (_, b, _), lost = last_batch_lost(session, world, pda)
    write_off(session, world, [5, 6])
    shifts.sign_off(session=session, shift=shift, user_id=world.manager.id, note="checked")
    session.commit()
    receipt = pda.push([lost[0]])
    assert receipt["results"][0]["status"] == "applied"
    assert (receipt["acked_through_seq"], receipt["missing_seqs"]) == (5, [])
    assert state(session, world) == (6, [], [[6, 6]], 5)
    session.refresh(shift)
    assert shift.status == ShiftStatus.CLOSED  # reopened, waiting for a new sign-off
    late = session.scalars(
        select(Flag).where(Flag.kind == "late_event_after_signoff", Flag.shift_id == shift.id)
    ).one()
    assert late.status == FlagStatus.OPEN
    balance = shift_balance(session=session, shift=shift)
    assert (balance.returned, balance.missing, balance.written_off_seqs) == (1, 1, [6])
    assert {p.tracking_no: p.outcome for p in balance.parcels}[b] == "returned"
    assert balance.write_offs[0].ranges == [[6, 6]]


def test_the_pair_around_written_off_seqs_beyond_the_highest_held_is_judged_for_inversion(
    session: Session, world: World, pda: Pda
) -> None:
    """Rule 6 across the written-off seqs: the reset PDA's next event (seq 7) dated
    before the last one the server holds (seq 4) is a time inversion; the seqs
    between, written off, hide nothing."""
    _, (a, _, _), _ = last_batch_lost(session, world, pda)
    write_off(session, world, [5, 6])
    pda.seq = held_max_seq(session, world.device.id)
    backdated = pda.event(a, "returned_to_station", occurred_at=NOW - dt.timedelta(days=1))
    pda.push([backdated])
    inversion = session.scalars(select(Flag).where(Flag.kind == "time_inversion")).one()
    assert inversion.evidence == {"device_seqs": ["PDA-0001#4", "PDA-0001#7"]}


def test_gaps_a_write_off_above_the_highest_held_leaves_reopen_the_shift_owning_them(
    session: Session, world: World, pda: Pda
) -> None:
    """The first shift closed without a last seq and was signed off with nothing
    missing: it owns the seqs up to the highest held (2) while the next shift has no
    event and declared no first seq. The next shift closed online declaring last seq
    10, none of its events arrived, and a manager wrote seq 10 off: the seqs held now
    reach 10, and 3 to 9 are gaps below it, still on the PDA as far as anyone knows,
    which the first shift owns. Its balance turns provisional with seqs the sign-off
    did not see missing: it reopens, as when a push shows such a gap (rule 5), the
    write-off naming it; and once those seqs are written off too, it is signed off
    again."""
    (a,) = parcels(session, world, 1)
    first = pda.open()
    pda.push([pda.event(a), pda.event(a, "delivered")])
    first = pda.close(first)
    shifts.sign_off(session=session, shift=first, user_id=world.manager.id, note="checked")
    session.commit()
    second = pda.open(now=NOW + dt.timedelta(hours=1))
    pda.close(second, last_seq=10, now=NOW + dt.timedelta(hours=2))
    done = write_off(session, world, [10, 10])
    session.refresh(first)
    assert shift_balance(session=session, shift=first).missing_seqs == list(range(3, 10))
    assert first.status == ShiftStatus.CLOSED
    late = session.scalars(
        select(Flag).where(Flag.kind == "late_event_after_signoff", Flag.shift_id == first.id)
    ).one()
    assert late.status == FlagStatus.OPEN
    assert late.evidence["latest_reopening"] == {
        "event_ids": [],
        "missing_seqs": list(range(3, 10)),
        "write_off_id": done.write_off.id,
    }
    write_off(session, world, [3, 9])
    session.refresh(first)
    session.refresh(late)
    assert (first.status, late.status) == (ShiftStatus.SIGNED_OFF, FlagStatus.CLOSED)
