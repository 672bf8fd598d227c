"""Rule 3 across a PDA's two shifts, with a manager at work between its pushes.

``test_convergence`` plays one shift against the engine; here a PDA worked two shifts
(the second maybe another courier's, after a hand-over), each declaring its seqs or
not, and its queue reaches the server split, reordered and repeated, with events
rejected (with their seq), events the PDA lost for good, and corrections voiding
events of either shift. The second shift's opening arrives before any push, between
two or after all. Between two pushes a manager signs the first shift off
(forced when provisional) and writes off the seqs missing then. The final state of
both shifts (their balances with missing and written-off seqs, their flags, the
parcels' statuses, where each event is filed, what was rejected) must be what one
in-order push gives, with the same seqs written off and the first shift signed off
afterwards (the acknowledgement alone may be further on, as a seq that arrived after a
write-off passes the seqs written off: ``converges_as`` names which); and the sign-off
is reopened exactly when something the first shift owns in the end (an event filed
under it, a correction voiding one, a rejected event with a seq it owns) first arrived
after it, or when it owns in the end seqs still on the PDA
that its sign-off did not name missing (a gap a later push showed, as the next
shift's events arrived before its own lost ones).
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import (
    DeviceSyncState,
    Flag,
    FlagStatus,
    Parcel,
    ScanEvent,
    ServiceClass,
    Shift,
    ShiftStatus,
)
from sync import shifts
from sync.acks import highest_held
from sync.balances import gather, shift_balance
from sync.events import EventRules
from sync.flags import ACTIVE_STATUSES
from sync.ingest import IngestRules, PushBatch, Pusher, ingest
from sync.lost_seqs import write_off_lost_seqs
from sync.quarantine import shift_rejections_counted
from sync.shifts import LATE_EVENT, ShiftRules
from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy
from tests import factories
from tests.batchings import draw_batchings
from tests.conftest import World

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
FIRST_OPENED = NOW - dt.timedelta(hours=8)
FIRST_CLOSED = NOW - dt.timedelta(hours=5)
SECOND_OPENED = NOW - dt.timedelta(hours=4)
# Or just after the first's close: its first scans lie in the first's filing grace.
SECOND_OPENED_SOON = FIRST_CLOSED + dt.timedelta(minutes=1)
RULES = IngestRules(
    events=EventRules(tracking=TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS))
)
POD = {"recipient_name": "Wang", "signature_sha256": "a" * 64}
KINDS = [
    "checked_out",
    "checked_out",
    "out_for_delivery",
    "delivered",
    "delivered_to_locker",
    "returned_to_station",
    "consent_captured",
    "correction",
    "rejected",
    "rejected",
    "unsequenced",
]
FIELDS: dict[str, dict[str, Any]] = {
    "delivered": {"pod": POD},
    "delivered_to_locker": {"locker_id": "L-1", "compartment": "3", "pod": {"pickup_code": "1"}},
    "consent_captured": {"consent": {"method": "locker", "channel": "sms"}},
    "rejected": {"colour": "red"},  # an unknown field: rejected, its seq kept
}
# Rejected events: with their seq, and without one (it names its parcel only).
REJECTED = ("rejected", "unsequenced")


@dataclass
class Plan:
    """What the PDA recorded and how the two shifts were declared."""

    first_declares_first: bool
    first_last_seq: int | None  # declared at its close
    second_first_seq: int | None  # declared at its opening
    second_is_colleagues: bool  # the PDA handed over to another courier
    second_closed_before: bool  # else closed at the end, last seq declared or not
    second_last_seq: int | None
    # (seq, kind, parcel index, target seq for a correction), seq 1..n
    events: list[tuple[int, str, int, int | None]]
    in_first: int  # seqs 1..in_first recorded in the first shift
    lost: set[int] = field(default_factory=set)  # never pushed
    second_opens_soon: bool = False  # a minute after the first's close (else an hour)
    # A seq dated half a minute before the seq two before it, in its shift (rule 6: a
    # time_inversion with either, which a write-off of the seq between may complete).
    backdated: int | None = None

    @property
    def second_opened(self) -> dt.datetime:
        return SECOND_OPENED_SOON if self.second_opens_soon else SECOND_OPENED


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    n = draw(st.integers(2, 9), label="events")
    in_first = draw(st.integers(1, n - 1), label="in the first shift")
    events = []
    for seq in range(1, n + 1):
        kind = draw(st.sampled_from(KINDS))
        parcel = draw(st.integers(0, 2))
        target = None
        if kind == "correction":
            if seq == 1:
                kind = "checked_out"
            else:
                target = draw(st.integers(1, seq - 1))
        events.append((seq, kind, parcel, target))
    lost = draw(st.sets(st.integers(1, n), max_size=1), label="lost")
    # Seqs left undeclared more often: then where a shift's seqs end is its neighbour's
    # events, and arrival order has more to change.
    sometimes = st.sampled_from([True, False, False])
    declares_last = draw(sometimes, label="first shift declares its last seq")
    declares_first = draw(sometimes, label="second shift declares its first seq")
    second_closed_before = draw(st.booleans())
    second_declares_last = draw(st.booleans())
    # Not a shift's first two: dated back, they would lie before the shift's opening.
    may_be_backdated = [s for s in range(3, n + 1) if s not in (in_first + 1, in_first + 2)]
    # Mostly the seq after the lost one: a pair across it, which a write-off completes.
    after_lost = [s + 1 for s in lost if s + 1 in may_be_backdated]
    backdated = (
        draw(st.none() | st.sampled_from(after_lost * 3 + may_be_backdated), label="backdated")
        if may_be_backdated
        else None
    )
    return Plan(
        first_declares_first=draw(st.booleans()),
        first_last_seq=in_first if declares_last else None,
        second_first_seq=in_first + 1 if declares_first else None,
        second_is_colleagues=draw(st.booleans(), label="another courier's"),
        second_closed_before=second_closed_before,
        second_last_seq=n if second_declares_last else None,
        events=events,
        in_first=in_first,
        lost=lost,
        second_opens_soon=draw(st.booleans(), label="second opens just after the first closed"),
        backdated=backdated,
    )


class Run:
    """One PDA of the world working the plan's two shifts, and its manager."""

    def __init__(
        self, session: Session, world: World, plan: Plan, *, open_the_second: bool = True
    ) -> None:
        """``open_the_second``: the second shift opens now, before any push; else the
        test opens it when it likes (``open_the_second``)."""
        self.session, self.world, self.plan = session, world, plan
        self.device = factories.device(session, f"PDA-{uuid.uuid4().hex[:12]}", world.station)
        classes = [ServiceClass.EXPRESS, ServiceClass.PARCEL, ServiceClass.PARCEL]
        self.parcels = [
            factories.parcel(session, world.station, service_class=c).tracking_no for c in classes
        ]
        colleague = factories.user(
            session, f"colleague-{uuid.uuid4().hex[:8]}", "courier", world.station
        )
        self.second_courier = colleague.id if plan.second_is_colleagues else world.courier.id
        self.first = shifts.open_shift(
            session=session,
            device=self.device,
            courier_id=world.courier.id,
            rules=ShiftRules(),
            first_seq=1 if plan.first_declares_first else None,
            now=FIRST_OPENED,
        )
        self.first = shifts.close_shift(
            session=session,
            shift=self.first,
            closed_by=world.courier.id,
            last_seq=plan.first_last_seq,
            now=FIRST_CLOSED,
        )
        session.commit()
        self._second: Shift | None = None
        if open_the_second:
            self.open_the_second()
        self.events = self._recorded()
        self.pushed: dict[str, int] = {}  # client event id -> the push first carrying it
        self.pushes = 0
        self.signed_off_before: int | None = None  # the push the sign-off came before

    def _recorded(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for seq, kind, parcel, target in self.plan.events:
            first = seq <= self.plan.in_first
            when = (FIRST_OPENED if first else self.plan.second_opened) + dt.timedelta(
                minutes=seq - (0 if first else self.plan.in_first)
            )
            if seq == self.plan.backdated:  # half a minute before the seq two before it
                when -= dt.timedelta(seconds=150)
            fields = dict(FIELDS.get(kind, {}))
            if kind == "correction":
                fields = {
                    "voids_client_event_id": events[target - 1]["client_event_id"],
                    "reason": "mis-tap",
                }
            sent_type = "checked_out" if kind in REJECTED else kind
            tracking_no = self.parcels[parcel]
            if kind == "correction":
                tracking_no = events[target - 1]["tracking_no"]
            event = factories.event(seq, tracking_no, sent_type, occurred_at=when, **fields)
            if kind == "unsequenced":
                del event["seq"]
            events.append(event)
        return events

    def open_the_second(self) -> None:
        """The second shift opens (at its time, whenever its request arrives), closed
        at once if the plan closes it before the pushes (those after the opening)."""
        self._second = shifts.open_shift(
            session=self.session,
            device=self.device,
            courier_id=self.second_courier,
            rules=ShiftRules(),
            first_seq=self.plan.second_first_seq,
            now=self.plan.second_opened,
        )
        self.session.commit()
        if self.plan.second_closed_before:
            self.close_the_second()

    @property
    def second(self) -> Shift:
        assert self._second is not None, "the second shift is not open yet"
        return self._second

    def close_the_second(self) -> None:
        self._second = shifts.close_shift(
            session=self.session,
            shift=self.second,
            closed_by=self.second_courier,
            last_seq=self.plan.second_last_seq,
            now=NOW - dt.timedelta(minutes=30),
        )
        self.session.commit()

    def push(self, seqs: list[int]) -> None:
        events = [self.events[s - 1] for s in seqs if s not in self.plan.lost]
        if not events:
            return
        for event in events:
            self.pushed.setdefault(event["client_event_id"], self.pushes)
        self.pushes += 1
        pusher = Pusher(self.device.id, self.world.station.id, self.second_courier)
        ingest(
            session=self.session,
            batch=PushBatch(self.device.id, uuid.uuid4(), NOW, events),
            pusher=pusher,
            rules=RULES,
            received_at=NOW,
        )
        self.session.commit()

    def sign_off_the_first(self) -> None:
        self.session.refresh(self.first)
        balance = shift_balance(session=self.session, shift=self.first)
        forced = "the PDA lost some" if balance.status == "provisional" else None
        shifts.sign_off(
            session=self.session,
            shift=self.first,
            user_id=self.world.manager.id,
            note="checked",
            force_reason=forced,
            now=NOW,
        )
        self.session.commit()
        self.signed_off_before = self.pushes

    def write_off(self, ranges: list[list[int]] | None = None) -> None:
        """The seqs missing now, or ``ranges``."""
        state = self.session.get(DeviceSyncState, self.device.id)
        self.session.refresh(state) if state is not None else None
        ranges = ranges if ranges is not None else (state.missing_ranges if state else [])
        if not ranges:
            return
        write_off_lost_seqs(
            session=self.session,
            device=self.device,
            ranges=[list(r) for r in ranges],
            reason="the PDA was reset",
            user_id=self.world.manager.id,
        )
        self.session.commit()

    # -- what it ends in ----------------------------------------------------------------

    def label(self, shift_id: int | None) -> str | None:
        return {self.first.id: "first", self.second.id: "second", None: None}.get(
            shift_id, str(shift_id)
        )

    def parcel_index(self, tracking_no: str) -> Any:
        return self.parcels.index(tracking_no) if tracking_no in self.parcels else tracking_no

    def seq_of(self) -> dict[int, int]:
        return dict(
            self.session.execute(
                select(ScanEvent.id, ScanEvent.seq).where(ScanEvent.device_id == self.device.id)
            ).all()
        )

    def _subject(self, key: str) -> str:
        head, sep, tail = key.partition(":")
        if sep:
            return f"{self.label(int(head)) if head.isdigit() else head}:{self.parcel_index(tail)}"
        if key in self.parcels:
            return f"parcel {self.parcels.index(key)}"
        if key.isdigit() and int(key) in (self.first.id, self.second.id):
            return f"shift {self.label(int(key))}"
        return "the device" if key == self.device.id else key

    def final_state(self) -> dict[str, Any]:
        session = self.session
        session.expire_all()
        seqs = self.seq_of()
        state = session.get(DeviceSyncState, self.device.id)
        balances = {}
        for name, shift in (("first", self.first), ("second", self.second)):
            balance = shift_balance(session=session, shift=session.get(Shift, shift.id))
            balances[name] = (
                balance.summary(),
                balance.missing_seqs,
                balance.written_off_seqs,
                sorted(
                    (
                        self.parcel_index(p.tracking_no),
                        p.outcome,
                        seqs.get(p.outcome_event_id or 0),
                        [(seqs[r.event_id], seqs[r.first_event_id]) for r in p.repeated_scans],
                    )
                    for p in balance.parcels
                ),
                sorted(
                    (d.kind, self.parcel_index(d.tracking_no), d.flag_status)
                    for d in balance.discrepancies
                ),
            )
        flags = sorted(
            (
                kind,
                self._subject(key),
                status,
                sorted(seqs.get(i, -1) for i in (evidence or {}).get("event_ids", [])),
                # A time_inversion's pairs: "device#seq".
                sorted(int(s.rpartition("#")[2]) for s in (evidence or {}).get("device_seqs", [])),
            )
            for kind, key, status, evidence in session.execute(
                select(Flag.kind, Flag.subject_key, Flag.status, Flag.evidence).where(
                    Flag.kind.not_in(["clock_skew", LATE_EVENT]),
                    Flag.status.in_(ACTIVE_STATUSES),
                    Flag.subject_key.contains(self.device.id)
                    | Flag.shift_id.in_([self.first.id, self.second.id])
                    | Flag.tracking_no.in_(self.parcels),
                )
            )
        )
        events = sorted(
            (seq, self.label(shift_id), courier_id == self.world.courier.id)
            for seq, shift_id, courier_id in session.execute(
                select(ScanEvent.seq, ScanEvent.shift_id, ScanEvent.courier_id).where(
                    ScanEvent.device_id == self.device.id
                )
            )
        )
        statuses = [
            session.execute(
                select(Parcel.status, Parcel.status_at).where(Parcel.tracking_no == tn)
            ).one()
            for tn in self.parcels
        ]
        return {
            "balances": balances,
            "flags": flags,
            "events": events,
            "statuses": statuses,
            "rejected": [
                sorted(self.seq_sent(q.client_event_id) for q in self.rejected_of(shift))
                for shift in (self.first, self.second)
            ],
            "acks": (
                state.acked_through_seq,
                state.max_seq,
                state.missing_ranges,
                state.written_off_ranges,
            ),
        }

    def rejected_of(self, shift: Shift) -> list[Any]:
        shift = self.session.get(Shift, shift.id)
        facts = gather(self.session, [shift])[shift.id]
        scope = facts.rejection_scope(facts.balance())
        rejected, _ = shift_rejections_counted(session=self.session, scope=scope, station_id=None)
        return rejected

    def seq_sent(self, client_event_id: Any) -> int:
        """An event's place in the PDA's queue (its seq, sent or not)."""
        ids = [e["client_event_id"] for e in self.events]
        return ids.index(str(client_event_id)) + 1

    def owned_late(self) -> list[int]:
        """Seqs the first shift owns in the end that first arrived after its sign-off:
        its events, corrections voiding them, its rejected events."""
        if self.signed_off_before is None:
            return []
        rows = self.session.execute(
            select(ScanEvent.client_event_id, ScanEvent.shift_id).where(
                ScanEvent.device_id == self.device.id
            )
        ).all()
        stored = {str(r.client_event_id) for r in rows}
        its = {str(r.client_event_id) for r in rows if r.shift_id == self.first.id}
        owned = set(its)
        owned |= {
            e["client_event_id"]
            for e in self.events
            if e.get("voids_client_event_id") in its and e["client_event_id"] in stored
        }
        owned |= {str(q.client_event_id) for q in self.rejected_of(self.first)}
        return sorted(
            self.seq_sent(i) for i in owned if self.pushed.get(i, -1) >= self.signed_off_before
        )

    def missing_since_signoff(self) -> list[int]:
        """Seqs the first shift owns in the end that the server lacks and its sign-off
        did not name missing: a gap shown after it (all seqs are shown: at most 9)."""
        if self.signed_off_before is None:
            return []
        shift = self.session.get(Shift, self.first.id)
        assert shift is not None and shift.signoff_balance is not None
        missing = shift_balance(session=self.session, shift=shift).missing_seqs
        return sorted(set(missing) - set(shift.signoff_balance["missing_seqs"]))


def on_the_test_database(examples: int) -> settings:
    """At most ``examples`` (the profile's count if lower): each runs two PDAs' days."""
    return settings(
        max_examples=min(examples, settings.default.max_examples),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@on_the_test_database(examples=150)
@given(plan=plans(), data=st.data())
def test_two_shifts_signed_off_and_written_off_between_pushes_converge(
    session: Session, world: World, plan: Plan, data: st.DataObject
) -> None:
    """The final state does not depend on how the queue was pushed, nor on when between
    pushes the second shift's opening arrived (before any, between two, after all; its
    first seq declared or not), the manager signed the first shift off or wrote off the
    seqs missing then; the sign-off is reopened exactly when what the first shift owns
    came after it, or seqs it owns are still on the PDA that the manager did not see
    missing."""
    converges(session, world, plan, data)


def test_a_return_scanned_again_after_a_voided_check_out_is_the_first_shifts_alike_split(
    session: Session, world: World
) -> None:
    """Found by the property: parcel 1 returned in the first shift (seq 2), checked out
    in the second by a mis-tap (seq 3, voided by seq 6) and returned again (seq 9): no
    check-out stands between the returns, so seq 9 repeats seq 2 and the second shift
    counts nothing for it. Pushed alone, seq 9 was judged with the second shift read
    alone, which took the voided check-out for one and raised a ``not_on_manifest`` for
    the return; in one push, read with the first shift, it folded (rule 3)."""
    plan = Plan(
        first_declares_first=False,
        first_last_seq=2,
        second_first_seq=3,
        second_is_colleagues=False,
        second_closed_before=True,
        second_last_seq=None,
        events=[
            (1, "checked_out", 0, None),
            (2, "returned_to_station", 1, None),
            (3, "checked_out", 1, None),
            (4, "checked_out", 0, None),
            (5, "checked_out", 0, None),
            (6, "correction", 0, 3),
            (7, "checked_out", 0, None),
            (8, "checked_out", 0, None),
            (9, "returned_to_station", 1, None),
        ],
        in_first=2,
    )
    reached = converges_as(
        session,
        world,
        plan,
        [list(range(1, 9)), [9]],
        sign_off_at=0,
        write_off_at=None,
        open_at=0,
        opens_after_manager=False,
    )
    second = reached["balances"]["second"]
    assert second[0]["not_checked_out"] == 0
    assert (1, "no_outcome", None, [(9, 2)]) in second[3]  # (parcel, outcome, seq, repeats)
    assert ("not_on_manifest", 1, FlagStatus.OPEN) not in second[4]


@pytest.mark.parametrize("write_off_at", [0, 1, 2])
def test_a_pair_across_a_lost_seq_is_flagged_whether_written_off_before_or_after(
    session: Session, world: World, write_off_at: int
) -> None:
    """The PDA lost seq 2; seq 3 is dated half a minute before seq 1. Pushed as 1 and 4,
    then 3 and 5, with the manager writing off what is missing between the two (seqs 2
    and 3: seq 3 comes after all) or after both (seq 2): seqs 1 and 3 are neighbours
    for good, and their time_inversion is flagged either way, as the reference (one
    push in order, then the write-off) flags it. The write-off after both pushes judged
    no pair, so the reference did not either (rule 3). Before the first push nothing is
    missing: seq 2 stays on the PDA, and the pair unjudged."""
    plan = Plan(
        first_declares_first=True,
        first_last_seq=None,
        second_first_seq=None,
        second_is_colleagues=False,
        second_closed_before=True,
        second_last_seq=None,
        events=[
            (1, "checked_out", 0, None),
            (2, "checked_out", 1, None),
            (3, "out_for_delivery", 0, None),
            (4, "delivered", 0, None),
            (5, "checked_out", 2, None),
        ],
        in_first=4,
        lost={2},
        backdated=3,
    )
    reached = converges_as(
        session,
        world,
        plan,
        [[1, 4], [3, 5]],
        sign_off_at=2,
        write_off_at=write_off_at,
        open_at=0,
        opens_after_manager=False,
    )
    inversion = ("time_inversion", "parcel 0", FlagStatus.OPEN, [], [1, 3])
    assert (inversion in reached["flags"]) is (write_off_at > 0)


@on_the_test_database(examples=60)
@given(
    declared=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    second_closed_before=st.booleans(),
    data=st.data(),
)
def test_outcomes_scanned_again_in_the_next_shift_converge(
    session: Session,
    world: World,
    declared: tuple[bool, bool, bool],
    second_closed_before: bool,
    data: st.DataObject,
) -> None:
    """The courier delivered a parcel and left the express one in a locker without
    consent in the first shift, and scanned both again in the second (no check-out
    between): the first shift's outcomes, the second counting nothing for them. However
    the queue is pushed (the second shift's scans before the first's), the same final
    state, the repeats named alike."""
    first_last, second_first, second_last = declared
    plan = Plan(
        first_declares_first=True,
        first_last_seq=4 if first_last else None,
        second_first_seq=5 if second_first else None,
        second_is_colleagues=False,
        second_closed_before=second_closed_before,
        second_last_seq=6 if second_last else None,
        events=[
            (1, "checked_out", 1, None),
            (2, "checked_out", 0, None),
            (3, "delivered", 1, None),
            (4, "delivered_to_locker", 0, None),
            (5, "delivered", 1, None),
            (6, "delivered_to_locker", 0, None),
        ],
        in_first=4,
    )
    reached = converges(session, world, plan, data)
    first, second = (reached["balances"][name] for name in ("first", "second"))
    assert second[0]["not_checked_out"] == 0 and second[4] == []  # no discrepancy of its own
    assert [r for *_, r in second[3]] == [[(6, 4)], [(5, 3)]]  # (repeat, first scan) by seq
    assert [(outcome, settled) for _, outcome, settled, _ in first[3]] == [
        ("unattended_without_consent", 4),
        ("delivered", 3),
    ]


def converges(session: Session, world: World, plan: Plan, data: st.DataObject) -> dict[str, Any]:
    """Play ``plan`` pushed as drawn, with the second shift's opening, the sign-off and
    the write-off between pushes; the final state, checked against one in-order push."""
    n = len(plan.events)
    batches = [[s + 1 for s in batch] for batch in draw_batchings(data, n)]
    sign_off_at = data.draw(st.integers(0, len(batches)), label="sign-off before push")
    write_off_at = data.draw(
        st.none() | st.integers(0, len(batches)), label="write-off before push"
    )
    open_at = data.draw(st.integers(0, len(batches)), label="second opens before push")
    opens_after_manager = data.draw(st.booleans(), label="opens after the manager's work")
    note(
        f"{plan!r} pushes {batches}, sign-off before {sign_off_at}, write-off "
        f"{write_off_at}, opening before {open_at} (after the manager: {opens_after_manager})"
    )
    return converges_as(
        session,
        world,
        plan,
        batches,
        sign_off_at=sign_off_at,
        write_off_at=write_off_at,
        open_at=open_at,
        opens_after_manager=opens_after_manager,
    )


def converges_as(
    session: Session,
    world: World,
    plan: Plan,
    batches: list[list[int]],
    *,
    sign_off_at: int,
    write_off_at: int | None,
    open_at: int,
    opens_after_manager: bool,
) -> dict[str, Any]:
    """``converges`` for one drawing: ``batches`` of seqs pushed in turn, the sign-off,
    the write-off (``None``: none) and the second shift's opening before the push of
    that index (the number of pushes: after all)."""
    run = Run(session, world, plan, open_the_second=False)
    for index, batch in enumerate([*batches, []]):
        if open_at == index and not opens_after_manager:
            run.open_the_second()
        if write_off_at == index:
            run.write_off()
        if sign_off_at == index:
            run.sign_off_the_first()
        if open_at == index and opens_after_manager:
            run.open_the_second()
        run.push(batch)
    if not plan.second_closed_before:
        run.close_the_second()
    session.refresh(run.first)
    late = run.owned_late()
    gap = run.missing_since_signoff()
    reopened = run.first.status == ShiftStatus.CLOSED
    assert reopened == bool(late or gap), (run.first.status, late, gap)
    if reopened:
        flag = session.scalars(
            select(Flag).where(Flag.kind == LATE_EVENT, Flag.shift_id == run.first.id)
        ).one()
        assert flag.status == FlagStatus.OPEN
    reached = run.final_state()

    reference = Run(session, world, plan)
    reference.events = [
        {**e, "tracking_no": reference.parcels[run.parcels.index(e["tracking_no"])]}
        for e in run.events
    ]
    reference.push(list(range(1, len(plan.events) + 1)))
    written_off = reached["acks"][3]
    if written_off:
        reference.write_off(written_off)
    if not plan.second_closed_before:
        reference.close_the_second()
    reference.sign_off_the_first()
    referred = reference.final_state()
    # The acknowledgement alone depends on when seqs were written off: a seq held before
    # the write-off passes none of them (the PDA may hold them unsent behind it), one
    # held after it, above every seq held then, passes them
    # (``sync.acks.acknowledged_through``). So it is the reference's (written off once
    # all arrived: stopping before the first seq written off) unless such a seq came
    # after the write-off: then it stops at the highest seq held.
    (acked, max_seq, missing, _), (least, *same) = reached["acks"], referred["acks"]
    held_through = missing[0][0] - 1 if missing else max_seq
    held_then = max((s for batch in batches[:write_off_at] for s in batch), default=0)
    came_after = [s for batch in batches[write_off_at:] for s in batch]
    if not written_off:
        assert acked == least == held_through, (acked, least, held_through)
    else:
        before_them = min(held_through, written_off[0][0] - 1)
        assert least == before_them, (least, before_them)
        passed = max(came_after, default=0) > held_then
        expected = min(held_through, highest_held(max_seq, missing, written_off))
        assert acked == (expected if passed else before_them), (acked, held_then, came_after)
    assert [max_seq, missing, written_off] == same
    assert {**reached, "acks": None} == {**referred, "acks": None}
    return reached


def test_a_rejected_event_the_next_shift_owns_in_the_end_withdraws_the_reopening_it_made(
    session: Session, world: World
) -> None:
    """The first shift closed without its last seq, the next opened without its first:
    the first owns seqs up to the next one's lowest event. Its seq 1 pushed, it was
    signed off; then a rejected event, seq 3, arrived before the next shift's seq 2:
    the first shift owned it then and reopened. Seq 2 shows it is the next shift's
    (pushed in the other order, it never reopened the first): the reopening is
    withdrawn, the first shift signed off again with its late flag closed."""
    plan = Plan(
        first_declares_first=False,
        first_last_seq=None,
        second_first_seq=None,
        second_is_colleagues=False,
        second_closed_before=False,
        second_last_seq=None,
        events=[
            (1, "checked_out", 0, None),
            (2, "checked_out", 1, None),
            (3, "rejected", 1, None),
        ],
        in_first=1,
    )
    run = Run(session, world, plan)
    run.push([1])
    run.sign_off_the_first()
    run.push([3])
    session.refresh(run.first)
    assert run.first.status == ShiftStatus.CLOSED  # the first's, as far as it is known
    run.push([2])
    session.refresh(run.first)
    assert run.owned_late() == []
    assert run.first.status == ShiftStatus.SIGNED_OFF
    flag = session.scalars(
        select(Flag).where(Flag.kind == LATE_EVENT, Flag.shift_id == run.first.id)
    ).one()
    assert flag.status == FlagStatus.CLOSED
    assert [run.seq_sent(q.client_event_id) for q in run.rejected_of(run.second)] == [3]


def test_a_gap_the_next_shifts_event_shows_after_the_sign_off_reopens_the_first_shift(
    session: Session, world: World
) -> None:
    """The first shift's seq 2 (the return) is lost; its seq 1 pushed, it was signed off
    with nothing missing. The next shift's seq 3 arrives: seq 2 is missing and the
    first shift's (its seqs end where the next one's events start): its balance is
    provisional, one nobody signed off, and it reopens though nothing of it arrived."""
    plan = Plan(
        first_declares_first=False,
        first_last_seq=None,
        second_first_seq=None,
        second_is_colleagues=False,
        second_closed_before=False,
        second_last_seq=None,
        events=[
            (1, "checked_out", 0, None),
            (2, "returned_to_station", 0, None),
            (3, "checked_out", 1, None),
        ],
        in_first=2,
        lost={2},
    )
    run = Run(session, world, plan)
    run.push([1])
    run.sign_off_the_first()
    assert run.first.signoff_balance["missing_seqs"] == []
    run.push([3])
    session.refresh(run.first)
    assert (run.owned_late(), run.missing_since_signoff()) == ([], [2])
    assert run.first.status == ShiftStatus.CLOSED


@pytest.mark.parametrize("late", ["out_for_delivery", "rejected"])
def test_a_late_event_that_came_while_a_rejected_event_held_the_shift_reopened_keeps_it(
    session: Session, world: World, late: str
) -> None:
    """As above, but between the rejected event (seq 4) and the next shift's first event
    (seq 3) the first shift's own seq 2 arrived: late, after the sign-off, and the
    first's in the end. Pushed after seq 3, it reopens the first shift (the manager
    never saw it); so it must keep it reopened here, though the rejected event that
    reopened it turns out the next shift's and the balance is the one signed off (an
    out-for-delivery scan, or a rejected event, changes no count)."""
    plan = Plan(
        first_declares_first=False,
        first_last_seq=None,
        second_first_seq=None,
        second_is_colleagues=False,
        second_closed_before=False,
        second_last_seq=None,
        events=[
            (1, "checked_out", 0, None),
            (2, late, 0, None),
            (3, "checked_out", 1, None),
            (4, "rejected", 1, None),
        ],
        in_first=2,
    )
    run = Run(session, world, plan)
    run.push([1])
    run.sign_off_the_first()
    run.push([4])
    run.push([2])
    run.push([3])
    session.refresh(run.first)
    assert run.owned_late() == [2]
    assert run.first.status == ShiftStatus.CLOSED
    flag = session.scalars(
        select(Flag).where(Flag.kind == LATE_EVENT, Flag.shift_id == run.first.id)
    ).one()
    assert flag.status == FlagStatus.OPEN


def test_the_next_shifts_pushes_cost_nothing_more_while_the_first_waits_reopened(
    session: Session, world: World
) -> None:
    """The first shift (closed without its last seq) was reopened by its own late scan
    and waits for a new sign-off; the next shift (no first seq declared) pushes its
    scans all day, each after the last. Such a push cannot show that a rejected event
    was not the first shift's (that needs a seq below one the server has already had),
    so it costs the statements it costs when the first shift is signed off."""
    from tests.sync.test_ingest import statements_sent

    def statements(reopened: bool) -> int:
        plan = Plan(
            first_declares_first=False,
            first_last_seq=None,
            second_first_seq=None,
            second_is_colleagues=False,
            second_closed_before=False,
            second_last_seq=None,
            events=[
                (1, "checked_out", 0, None),
                (2, "out_for_delivery", 0, None),
                (3, "checked_out", 1, None),
                (4, "out_for_delivery", 1, None),
                (5, "out_for_delivery", 1, None),
            ],
            in_first=2,
        )
        run = Run(session, world, plan)
        run.push([1] if reopened else [1, 2])
        run.sign_off_the_first()
        if reopened:
            run.push([2])
        run.push([3])
        run.push([4])
        session.refresh(run.first)
        assert (run.first.status == ShiftStatus.CLOSED) == reopened
        with statements_sent(session) as sent:
            run.push([5])
        return len(sent)

    assert statements(reopened=True) == statements(reopened=False)


def test_seqs_an_opening_showed_missing_arriving_under_no_shift_withdraw_its_reopening(
    session: Session, world: World
) -> None:
    """The first shift declared no seqs and was signed off before anything was pushed.
    A colleague's shift opened declaring seq 2 its first: the first shift owns seq 1,
    still on the PDA, and reopened for it (its sign-off saw none missing). Seq 1 then
    arrives with the colleague's seqs, filed under no shift (another courier's shift
    takes no event by time): nothing of the first shift is missing any more and none of
    its events came late. Opened after that push, the shift never reopened (rule 3): the
    reopening is withdrawn, as when a gap below the highest seq held is filled."""
    plan = Plan(
        first_declares_first=False,
        first_last_seq=None,
        second_first_seq=2,
        second_is_colleagues=True,
        second_closed_before=False,
        second_last_seq=None,
        events=[
            (1, "checked_out", 0, None),
            (2, "checked_out", 0, None),
            (3, "checked_out", 0, None),
        ],
        in_first=1,
    )
    run = Run(session, world, plan, open_the_second=False)
    run.sign_off_the_first()
    run.open_the_second()
    session.refresh(run.first)
    assert run.missing_since_signoff() == [1]
    assert run.first.status == ShiftStatus.CLOSED
    run.push([1, 2, 3])
    session.refresh(run.first)
    assert (run.owned_late(), run.missing_since_signoff()) == ([], [])
    assert run.first.status == ShiftStatus.SIGNED_OFF
    flag = session.scalars(
        select(Flag).where(Flag.kind == LATE_EVENT, Flag.shift_id == run.first.id)
    ).one()
    assert flag.status == FlagStatus.CLOSED


def test_scans_the_next_opening_takes_from_a_signed_off_shift_reopen_nothing(
    session: Session, world: World
) -> None:
    """The next shift opened a minute after the first's close, declaring seq 2 its
    first, but its request reached the server late: its first scans (seqs 2 to 4, in
    the first's grace) were filed under the first, which was signed off with them, and
    seq 5 came after the sign-off, in the grace too, and reopened it. The opening takes
    all four: the first owns seq 1 alone, as its sign-off would have seen had the
    opening arrived in its place, and nothing of it came late. It ends signed off (the
    reopening by seq 5 withdrawn, though its balance is not the one signed off)."""
    plan = Plan(
        first_declares_first=False,
        first_last_seq=None,
        second_first_seq=2,
        second_is_colleagues=False,
        second_closed_before=False,
        second_last_seq=None,
        events=[
            (1, "checked_out", 0, None),
            (2, "checked_out", 0, None),
            (3, "checked_out", 0, None),
            (4, "checked_out", 1, None),
            (5, "checked_out", 0, None),
        ],
        in_first=1,
        second_opens_soon=True,
    )
    run = Run(session, world, plan, open_the_second=False)
    run.push([1, 2, 3, 4])
    run.sign_off_the_first()
    run.push([5])
    session.refresh(run.first)
    assert run.first.status == ShiftStatus.CLOSED  # seq 5, the first's by the grace
    run.open_the_second()
    session.refresh(run.first)
    assert (run.owned_late(), run.missing_since_signoff()) == ([], [])
    assert run.first.status == ShiftStatus.SIGNED_OFF
    flag = session.scalars(
        select(Flag).where(Flag.kind == LATE_EVENT, Flag.shift_id == run.first.id)
    ).one()
    assert flag.status == FlagStatus.CLOSED
