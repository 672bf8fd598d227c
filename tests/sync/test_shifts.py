"""Shifts and their handover balance through the engine, without Flask (rule 5)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, func, insert, select, update
from sqlalchemy.orm import Session

from models import (
    AuditEntry,
    DeviceSyncState,
    EventType,
    Flag,
    FlagSeverity,
    FlagStatus,
    QuarantinedEvent,
    ScanEvent,
    ServiceClass,
    Shift,
    ShiftStatus,
)
from sync import balances as balances_module
from sync import shifts
from sync.audit import list_entries
from sync.balances import balances, shift_balance
from sync.device_state import held_max_seq
from sync.errors import Conflict, InvalidInput
from sync.events import EventRules
from sync.flags import FlagSubject, close_flags_by_id, raise_flag, resolve_flag
from sync.handover import (
    BALANCE_RULE_KINDS,
    HANDOVER_KINDS,
    WHAT_TO_DO,
    FlagRef,
    ShiftEvent,
    ShiftSeqs,
    compute_balance,
    parcel_trails,
)
from sync.handover import MISSING as MISSING_KIND
from sync.ingest import IngestRules, PushBatch, Pusher, ingest
from sync.parcels import IntakeRules, IntakeScope, ParcelDraft, intake_parcels
from sync.projection import EventFact
from sync.shifts import ShiftRules
from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy
from tests import factories
from tests.batchings import draw_batchings
from tests.conftest import World

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
OPENED = NOW - dt.timedelta(hours=4)
RULES = IngestRules(
    events=EventRules(tracking=TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS))
)
POD = {"recipient_name": "Wang", "signature_sha256": "a" * 64}


def at(minutes: float) -> dt.datetime:
    """Minutes into the shift (it opened four hours before NOW)."""
    return OPENED + dt.timedelta(minutes=minutes)


class Pda:
    """The test world's PDA: opens a shift, numbers its events, pushes them."""

    def __init__(self, session: Session, world: World) -> None:
        self.session = session
        self.world = world
        self.device = world.device
        self.pusher = Pusher(world.device.id, world.station.id, world.courier.id)
        self.seq = 0

    def open(self, *, first_seq: int | None = None, now: dt.datetime = OPENED) -> Shift:
        shift = shifts.open_shift(
            session=self.session,
            device=self.device,
            courier_id=self.world.courier.id,
            rules=ShiftRules(),
            first_seq=first_seq,
            now=now,
        )
        self.session.commit()
        return shift

    def event(self, tracking_no: str, type: str = "checked_out", **fields: Any) -> dict:
        self.seq += 1
        fields.setdefault("occurred_at", at(self.seq))
        if type == "delivered":
            fields.setdefault("pod", POD)
        return factories.event(self.seq, tracking_no, type, **fields)

    def void(self, target: dict) -> dict:
        """The next event: a correction voiding ``target`` (a mis-tap)."""
        return self.event(
            target["tracking_no"],
            "correction",
            voids_client_event_id=target["client_event_id"],
            reason="mis-tap",
        )

    def push(
        self,
        events: list[dict],
        *,
        received_at: dt.datetime = NOW,
        latency: dt.timedelta = dt.timedelta(0),
    ) -> dict[str, Any]:
        """Push ``events``, sent ``latency`` before they arrive (on a PDA clock that is
        right: the server's estimate of it is off by the latency)."""
        receipt = ingest(
            session=self.session,
            batch=PushBatch(self.device.id, uuid.uuid4(), received_at - latency, events),
            pusher=self.pusher,
            rules=RULES,
            received_at=received_at,
        )
        self.session.commit()
        return receipt

    def close(self, shift: Shift, *, last_seq: int | None = None, now: dt.datetime = NOW) -> Shift:
        shift = shifts.close_shift(
            session=self.session,
            shift=shift,
            closed_by=self.world.courier.id,
            last_seq=last_seq,
            now=now,
        )
        self.session.commit()
        return shift


@pytest.fixture
def pda(session: Session, world: World) -> Pda:
    return Pda(session, world)


def parcels(session: Session, world: World, n: int, **kw: Any) -> list[str]:
    numbers = [factories.parcel(session, world.station, **kw).tracking_no for _ in range(n)]
    session.commit()
    return numbers


def shift_row(
    world: World,
    device_id: str,
    opened_at: dt.datetime,
    closed_at: dt.datetime | None,
    *,
    courier_id: int | None = None,
    first_seq: int | None = None,
    last_seq: int | None = None,
) -> dict[str, Any]:
    """A ``shift`` row to insert as it is: histories no API call makes in a test (a year
    of shifts, a close recorded before its opening). Closed unless ``closed_at`` is
    ``None``; the world's courier's unless ``courier_id``."""
    return {
        "station_id": world.station.id,
        "courier_id": world.courier.id if courier_id is None else courier_id,
        "device_id": device_id,
        "status": ShiftStatus.OPEN if closed_at is None else ShiftStatus.CLOSED,
        "work_date": opened_at.date(),
        "opened_at": opened_at,
        "planned_end_at": opened_at + dt.timedelta(hours=9),
        "closed_at": closed_at,
        "first_seq": first_seq,
        "last_seq": last_seq,
    }


def insert_shift(session: Session, row: dict[str, Any]) -> int:
    return session.execute(insert(Shift).values(row).returning(Shift.id)).scalar_one()


def handover_flags(session: Session, shift: Shift) -> dict[tuple[str, str], FlagStatus]:
    return {
        (flag.kind, flag.subject_key.partition(":")[2]): flag.status
        for flag in session.scalars(select(Flag).where(Flag.shift_id == shift.id))
    }


def test_a_clean_shift_balances(session: Session, world: World, pda: Pda) -> None:
    a, b, c, d = parcels(session, world, 4)
    shift = pda.open()
    pda.push([pda.event(tn) for tn in (a, b, c, d)])
    consent = {"method": "locker", "channel": "sms"}
    pda.push(
        [
            pda.event(a, "delivered"),
            pda.event(b, "consent_captured", consent=consent),
            pda.event(b, "delivered_to_locker", locker_id="L1", compartment="3", pod=POD),
            pda.event(
                c, "delivery_attempt_failed", reason="recipient_absent", action="retry_planned"
            ),
            pda.event(c, "returned_to_station"),
            pda.event(d, "delivered", pod={"recipient_name": "Li", "signature_sha256": "b" * 64}),
        ]
    )
    shift = pda.close(shift, last_seq=pda.seq)
    balance = shift_balance(session=session, shift=shift)
    assert balance.status == "balanced", balance.discrepancies
    assert (balance.checked_out, balance.delivered, balance.unattended, balance.returned) == (
        4,
        2,
        1,
        1,
    )
    assert balance.missing == 0 and balance.discrepancies == []
    assert {p.tracking_no: p.outcome for p in balance.parcels} == {
        a: "delivered",
        b: "unattended",
        c: "returned",
        d: "delivered",
    }
    assert handover_flags(session, shift) == {}


def test_an_open_shift_with_a_parcel_still_out_does_not_balance(
    session: Session, world: World, pda: Pda
) -> None:
    """Missing > 0 unbalances the balance (DESIGN.md rule 5) before the courier is back
    too, while no ``missing_at_handover`` flag is raised yet: a manager watching the
    shift sees a parcel unaccounted for, not a shift that balances."""
    a, b = parcels(session, world, 2)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b), pda.event(a, "delivered")])
    balance = shift_balance(session=session, shift=shift)
    assert (balance.checked_out, balance.delivered, balance.missing) == (2, 1, 1)
    assert balance.missing_seqs == [] and balance.discrepancies == []
    assert balance.status == "unbalanced"


def test_events_are_filed_under_the_shift_open_when_they_happened(
    session: Session, world: World, pda: Pda
) -> None:
    (a,) = parcels(session, world, 1)
    pda.push([pda.event(a, occurred_at=OPENED - dt.timedelta(hours=1))])  # before any shift
    first = pda.open()
    pda.push([pda.event(a, "returned_to_station")])
    first = pda.close(first)  # at NOW
    second = pda.open(now=NOW + dt.timedelta(minutes=5))
    after_close = pda.event(a, "out_for_delivery", occurred_at=NOW - dt.timedelta(minutes=1))
    before_open = pda.event(a, occurred_at=NOW + dt.timedelta(minutes=4))
    inside_first = pda.event(a, "exception", reason="damaged", occurred_at=at(100))
    named = pda.event(
        a, "out_for_delivery", shift_id=first.id, occurred_at=NOW + dt.timedelta(minutes=6)
    )
    pda.push(
        [after_close, before_open, inside_first, named], received_at=NOW + dt.timedelta(minutes=7)
    )
    filed = dict(session.execute(select(ScanEvent.seq, ScanEvent.shift_id)).all())
    assert filed == {
        # Before the PDA's first shift, which declared no first_seq: its seqs start at
        # 1, as its balance counts them, so the opening took it (by seq, not by time).
        1: first.id,
        2: first.id,
        3: first.id,  # a minute before its close
        4: second.id,  # a minute before the next opened: clocks are estimates
        5: first.id,
        6: first.id,  # named by the PDA
    }


@pytest.mark.parametrize("pushed", ["during the next shift", "before it opens"])
def test_a_shift_closed_without_its_last_seq_holds_by_seq_only_what_came_before_its_close(
    session: Session, world: World, pda: Pda, pushed: str
) -> None:
    """A shift that declared its first seq but closed without its last: the next shift
    declares nothing, or declares the first seq of its own, and its scans are its own
    (not the first shift's, whose handover would show them missing), whichever comes
    first, the scan or the opening."""
    a, b = parcels(session, world, 2)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    pda.close(first)  # at NOW, no last_seq
    later = NOW + dt.timedelta(hours=1)
    scan = pda.event(b, occurred_at=later + dt.timedelta(minutes=1))  # seq 3
    if pushed == "during the next shift":
        second = pda.open(now=later)
        pda.push([scan], received_at=later + dt.timedelta(minutes=2))
    else:
        pda.push([scan], received_at=later - dt.timedelta(minutes=30) + dt.timedelta(hours=1))
        second = pda.open(first_seq=3, now=later + dt.timedelta(hours=1))
    filed = dict(session.execute(select(ScanEvent.seq, ScanEvent.shift_id)).all())
    assert filed == {1: first.id, 2: first.id, 3: second.id}
    assert shift_balance(session=session, shift=first).status == "balanced"
    assert shift_balance(session=session, shift=second).checked_out == 1


@pytest.mark.parametrize("latency", [0, 3], ids=lambda m: f"{m}-min-upload")
def test_a_return_just_after_a_close_without_last_seq_is_the_shifts(
    session: Session, world: World, pda: Pda, latency: int
) -> None:
    """The return scanned a minute after the close, sent at once or over a slow
    network: the corrected clock puts it after the close by up to the push's latency,
    still within the filing grace. The shift declared its first seq and no next shift
    has started: the scan is its own, and the parcel is not missing."""
    (a,) = parcels(session, world, 1)
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a)])
    shift = pda.close(shift)  # at NOW, no last_seq
    assert shift_balance(session=session, shift=shift).missing == 1
    returned = pda.event(a, "returned_to_station", occurred_at=NOW + dt.timedelta(minutes=1))
    pda.push(
        [returned],
        received_at=NOW + dt.timedelta(minutes=1, seconds=30 + 60 * latency),
        latency=dt.timedelta(minutes=latency),
    )
    assert session.scalars(select(ScanEvent.shift_id).where(ScanEvent.seq == 2)).one() == (
        shift.id
    )
    assert shift_balance(session=session, shift=shift).status == "balanced"


@pytest.mark.parametrize("first_seq", [None, 3], ids=["undeclared", "declared"])
@pytest.mark.parametrize("pushed", ["before the opening", "after the opening"])
def test_the_next_days_scans_never_reopen_a_signed_off_shift_whatever_the_order(
    session: Session, world: World, pda: Pda, first_seq: int | None, pushed: str
) -> None:
    """The shift closed without its last seq and was signed off. The next morning's
    check-out, scanned a moment before the next shift's opening reached the server,
    is the next shift's whether it was pushed before the opening or after: the
    signed-off shift is not reopened, and no late_event_after_signoff is raised."""
    a, b = parcels(session, world, 2)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    first = sign_off(session, world, pda.close(first))
    opening = NOW + dt.timedelta(hours=12)
    check_out = pda.event(b, occurred_at=opening - dt.timedelta(minutes=2))
    if pushed == "before the opening":
        pda.push([check_out], received_at=opening - dt.timedelta(seconds=30))
        second = pda.open(first_seq=first_seq, now=opening)
    else:
        second = pda.open(first_seq=first_seq, now=opening)
        pda.push([check_out], received_at=opening + dt.timedelta(minutes=1))
    session.refresh(first)
    assert (first.status, first.reopened_count) == (ShiftStatus.SIGNED_OFF, 0)
    late = session.scalars(select(Flag).where(Flag.kind == "late_event_after_signoff")).all()
    assert late == []
    filed = session.scalars(select(ScanEvent.shift_id).where(ScanEvent.seq == 3)).one()
    assert filed == second.id


@pytest.mark.parametrize("pushed", ["before the opening", "after the opening"])
def test_a_scan_just_after_a_sign_off_that_the_next_shift_takes_leaves_it_signed_off(
    session: Session, world: World, pda: Pda, pushed: str
) -> None:
    """Signed off at the close; a check-out four minutes later, the next shift opened a
    minute after that. Pushed before the opening, the scan is the closed shift's by
    the grace and reopens it, until the opening takes it: the reopening is then
    withdrawn (its flag closed, the audit log saying so). Either way the shift ends
    signed off with no open flag, and the scan is the next shift's."""
    a, b = parcels(session, world, 2)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    first = sign_off(session, world, pda.close(first))
    opening = NOW + dt.timedelta(minutes=5)
    check_out = pda.event(b, occurred_at=NOW + dt.timedelta(minutes=4))
    if pushed == "before the opening":
        pda.push([check_out], received_at=NOW + dt.timedelta(minutes=4, seconds=30))
        session.refresh(first)
        assert first.status == ShiftStatus.CLOSED  # reopened by what looked late
        second = pda.open(now=opening)
    else:
        second = pda.open(now=opening)
        pda.push([check_out], received_at=opening + dt.timedelta(seconds=30))
    session.refresh(first)
    assert first.status == ShiftStatus.SIGNED_OFF
    late = session.scalars(select(Flag).where(Flag.kind == "late_event_after_signoff")).all()
    assert [flag.status for flag in late] == (
        [FlagStatus.CLOSED] if pushed == "before the opening" else []
    )
    assert session.scalars(select(ScanEvent.shift_id).where(ScanEvent.seq == 3)).one() == (
        second.id
    )
    actions = session.scalars(
        select(AuditEntry.action)
        .where(AuditEntry.subject_type == "shift", AuditEntry.subject_key == str(first.id))
        .order_by(AuditEntry.id)
    ).all()
    assert actions[1:] == (
        ["shift_reopened", "shift_reopening_withdrawn"] if pushed == "before the opening" else []
    )


def test_a_reopening_and_its_withdrawal_are_filed_under_the_late_scans_parcel(
    session: Session, world: World, pda: Pda
) -> None:
    """A check-out of b four minutes after the sign-off reopens the shift until the next
    opening takes it. An auditor reading b's history (``GET /audit?tracking_no=``) sees
    that it reopened a handover and that the reopening was withdrawn; a's history,
    the shift's other parcel, names neither (its sign-off only)."""
    a, b = parcels(session, world, 2)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    first = sign_off(session, world, pda.close(first))
    check_out = pda.event(b, occurred_at=NOW + dt.timedelta(minutes=4))
    pda.push([check_out], received_at=NOW + dt.timedelta(minutes=4, seconds=30))
    pda.open(now=NOW + dt.timedelta(minutes=5))

    def of_parcel(number: str) -> list[str]:
        return [
            entry.action
            for entry in list_entries(session=session, tracking_no=number)
            if (entry.subject_type, entry.subject_key) == ("shift", str(first.id))
        ]

    assert of_parcel(b) == ["shift_reopening_withdrawn", "shift_reopened"]
    assert of_parcel(a) == ["shift_signed_off"]


def test_a_decision_on_a_pdas_flag_is_filed_under_the_parcels_it_cites_by_the_pdas_ids(
    session: Session, world: World, pda: Pda
) -> None:
    """A PDA's ``clock_jump`` cites its jumped events by the PDA's ids for them
    (``client_event_ids``), its ``wrong_shift`` by their seqs, and the proof of b's
    delivery lists both as citing it (``sync.proofs.cites``). The manager's resolution
    of each ("clock reset, the delivery time is right") is a decision about b, yet b's
    history (``GET /audit?tracking_no=``) missed both: only ``event_ids`` were read.
    So did a ``seq_conflict`` on the seq of b's delivery (subject the PDA's event by its
    seq, evidence by the PDA's ids). None cites a, the PDA's other parcel."""
    a, b = parcels(session, world, 2)
    pda.open(first_seq=1)
    delivery = pda.event(b, "delivered")
    pda.push([pda.event(a), pda.event(b), delivery])
    device = FlagSubject("device", world.device.id)
    cited = [
        ("clock_jump", device, {"client_event_ids": [delivery["client_event_id"]]}),
        ("wrong_shift", device, {"seqs": [delivery["seq"]], "claimed_shift_ids": [999]}),
        (  # b's delivery's seq claimed by an event the server refused
            "seq_conflict",
            FlagSubject.event_seq(world.device.id, delivery["seq"]),
            {"client_event_ids": [delivery["client_event_id"], str(uuid.uuid4())]},
        ),
    ]
    for kind, subject, evidence in cited:
        raised = raise_flag(
            session=session,
            kind=kind,
            severity=FlagSeverity.WARNING,
            subject=subject,
            station_id=world.station.id,
            evidence=evidence,
        )
        resolve_flag(session=session, flag=raised.flag, user_id=world.manager.id, note="checked")
    session.commit()

    def decisions(number: str) -> list[str]:
        return [
            entry.details["kind"]
            for entry in list_entries(session=session, tracking_no=number)
            if entry.action == "flag_resolved"
        ]

    assert sorted(decisions(b)) == ["clock_jump", "seq_conflict", "wrong_shift"]
    assert decisions(a) == []


def test_a_reopening_whose_scan_the_next_shift_takes_stands_once_for_the_seq_still_on_the_pda(
    session: Session, world: World, pda: Pda
) -> None:
    """Signed off at the close with seqs 1 and 2; a check-out four minutes later (seq 4)
    is pushed before the next shift opens a minute after, seq 3 still on the PDA: the
    scan is the closed shift's by the grace and reopens it. The opening takes the scan,
    and the shift still owns seq 3, missing, which its sign-off never saw: its
    reopening stands (rule 5), as it does had the opening come first. It was withdrawn
    and written again (two more entries in the audit log, the flag closed and opened);
    it now stands once, its flag naming the missing seq and the shift that opened, not
    the scan that is the next shift's."""
    a, b, c = parcels(session, world, 3)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    first = sign_off(session, world, pda.close(first))
    pda.event(c, occurred_at=NOW + dt.timedelta(minutes=3))  # seq 3, still on the PDA
    check_out = pda.event(b, occurred_at=NOW + dt.timedelta(minutes=4))
    pda.push([check_out], received_at=NOW + dt.timedelta(minutes=4, seconds=30))
    session.refresh(first)
    assert first.status == ShiftStatus.CLOSED
    second = pda.open(now=NOW + dt.timedelta(minutes=5))
    session.refresh(first)
    assert session.scalars(select(ScanEvent.shift_id).where(ScanEvent.seq == 4)).one() == (
        second.id
    )
    assert shift_balance(session=session, shift=first).missing_seqs == [3]
    assert (first.status, first.reopened_count) == (ShiftStatus.CLOSED, 1)
    assert shift_actions(session, first) == ["shift_signed_off", "shift_reopened"]
    late = session.scalars(select(Flag).where(Flag.kind == "late_event_after_signoff")).one()
    assert late.status == FlagStatus.OPEN
    assert late.evidence["latest_reopening"]["event_ids"] == []
    assert late.evidence["latest_reopening"]["missing_seqs"] == [3]
    assert late.evidence["latest_reopening"]["next_shift_id"] == second.id
    assert shifts.signoff_delta(session, first) == shifts.Delta(unseen_missing_seqs=(3,))


@pytest.mark.parametrize("first_seq", [3, None])
@pytest.mark.parametrize("pushed", ["before the opening", "after the opening"])
def test_a_scan_after_the_next_opening_is_the_next_shifts_though_pushed_before_it(
    session: Session, world: World, pda: Pda, pushed: str, first_seq: int | None
) -> None:
    """The first shift declared no seqs and was signed off at the close; the next
    opened four minutes later (its request reaching the server late), and the PDA's
    check-out a minute after that, pushed before the opening arrived, lies in the
    closed shift's grace: the time rules filed it there and it reopened the shift. It
    is the next shift's: by the first seq it declares (3), as its seqs decide when the
    scan is pushed after it; declaring none, by time, as the time rules file it then
    (it happened while the next shift was open). The opening takes it, and was refused
    (``first_seq_used``) when declaring its seq; the reopening is withdrawn. Either
    way the shift ends signed off and the scan is the next shift's (rule 3)."""
    a, b = parcels(session, world, 2)
    first = pda.open()
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    first = sign_off(session, world, pda.close(first))
    opening = NOW + dt.timedelta(minutes=4)
    check_out = pda.event(b, occurred_at=NOW + dt.timedelta(minutes=5))
    if pushed == "before the opening":
        pda.push([check_out], received_at=NOW + dt.timedelta(minutes=5, seconds=30))
        session.refresh(first)
        assert first.status == ShiftStatus.CLOSED  # reopened by what looked late
        second = pda.open(first_seq=first_seq, now=opening)
    else:
        second = pda.open(first_seq=first_seq, now=opening)
        pda.push([check_out], received_at=NOW + dt.timedelta(minutes=5, seconds=30))
    session.refresh(first)
    assert first.status == ShiftStatus.SIGNED_OFF
    assert session.scalars(select(ScanEvent.shift_id).where(ScanEvent.seq == 3)).one() == (
        second.id
    )
    late = session.scalars(select(Flag).where(Flag.kind == "late_event_after_signoff")).all()
    assert [flag.status for flag in late] == (
        [FlagStatus.CLOSED] if pushed == "before the opening" else []
    )


def test_a_late_scan_landing_on_a_shift_reopened_by_what_the_next_opening_takes_keeps_it(
    session: Session, world: World, pda: Pda
) -> None:
    """As above, pushed before the opening, but the PDA then pushed a scan of the shift
    itself (an out-for-delivery of its returned parcel, named by the shift's id): late,
    after the sign-off, and landing on a shift already reopened, it reopened nothing.
    The opening takes the check-out: the reopening it made is no more, but the scan
    still came after the sign-off, unseen, so the shift stays reopened (pushed after
    the opening, the scan reopens it, rule 3)."""
    a, b = parcels(session, world, 2)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    first = sign_off(session, world, pda.close(first))
    check_out = pda.event(b, occurred_at=NOW + dt.timedelta(minutes=4))
    pda.push([check_out], received_at=NOW + dt.timedelta(minutes=4, seconds=30))
    late = pda.event(
        a, "out_for_delivery", shift_id=first.id, occurred_at=NOW - dt.timedelta(minutes=30)
    )
    pda.push([late], received_at=NOW + dt.timedelta(minutes=4, seconds=40))
    session.refresh(first)
    assert first.status == ShiftStatus.CLOSED
    pda.open(now=NOW + dt.timedelta(minutes=5))
    session.refresh(first)
    assert first.status == ShiftStatus.CLOSED
    flag = session.scalars(select(Flag).where(Flag.kind == "late_event_after_signoff")).one()
    assert flag.status == FlagStatus.OPEN


@pytest.mark.parametrize("pushed", ["before the opening", "after the opening"])
def test_a_correction_just_after_a_sign_off_keeps_the_shift_reopened_whatever_the_order(
    session: Session, world: World, pda: Pda, pushed: str
) -> None:
    """The late event is a correction voiding the shift's return: filed under the next
    shift or not, it changes the handover that was signed off (the parcel is missing
    again), so the shift stays reopened in both orders."""
    (a,) = parcels(session, world, 1)
    first = pda.open(first_seq=1)
    checked_out = pda.event(a)
    returned = pda.event(a, "returned_to_station")
    pda.push([checked_out, returned])
    first = sign_off(session, world, pda.close(first))
    assert first.signoff_balance["status"] == "balanced"
    opening = NOW + dt.timedelta(minutes=5)
    correction = pda.event(
        a,
        "correction",
        occurred_at=NOW + dt.timedelta(minutes=4),
        voids_client_event_id=returned["client_event_id"],
        reason="mis-tap",
    )
    if pushed == "before the opening":
        pda.push([correction], received_at=NOW + dt.timedelta(minutes=4, seconds=30))
        pda.open(now=opening)
    else:
        pda.open(now=opening)
        pda.push([correction], received_at=opening + dt.timedelta(seconds=30))
    session.refresh(first)
    assert first.status == ShiftStatus.CLOSED
    assert shift_balance(session=session, shift=first).missing == 1


@pytest.mark.parametrize("opened", ["after the sign-off", "before the push"])
def test_a_signed_off_shift_whose_return_the_next_opening_takes_stays_signed_off(
    session: Session, world: World, pda: Pda, opened: str
) -> None:
    """Closed without its last seq, the shift holds by the grace a return scanned four
    minutes after its close, and is signed off balanced. The next shift opens a minute
    later and takes the return (nearer its opening): the shift's balance now has the
    parcel missing, but it owns nothing its sign-off did not see (it saw more: the
    return is the next shift's), and with the opening's request arriving before the
    push the sign-off would have seen it without the return and nothing reopens it
    (rule 3). So it stays signed off either way, its balance saying it changed since
    (it was reopened, the balance signed off no longer holding)."""
    from sync.balances import changed_since_signoff

    (a,) = parcels(session, world, 1)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a)])
    first = pda.close(first)
    returned = pda.event(a, "returned_to_station", occurred_at=NOW + dt.timedelta(minutes=4))
    opening = NOW + dt.timedelta(minutes=5)
    if opened == "before the push":
        second = pda.open(now=opening)
    pda.push([returned], received_at=NOW + dt.timedelta(minutes=5, seconds=30))
    first = sign_off(session, world, first, force_reason="a is missing")
    if opened == "after the sign-off":
        assert first.signoff_balance["status"] == "balanced"
        second = pda.open(now=opening)
    session.refresh(first)
    (moved,) = session.scalars(select(ScanEvent).where(ScanEvent.seq == 2))
    assert moved.shift_id == second.id
    assert (first.status, first.reopened_count) == (ShiftStatus.SIGNED_OFF, 0)
    balance = shift_balance(session=session, shift=first)
    assert balance.missing == 1
    assert changed_since_signoff(first, balance) == (opened == "after the sign-off")
    assert session.scalars(select(Flag).where(Flag.kind == "late_event_after_signoff")).all() == []


def test_a_second_reopening_by_a_scan_the_next_shift_takes_is_withdrawn(
    session: Session, world: World, pda: Pda
) -> None:
    """Reopened by a real late event and signed off again, then reopened by a check-out
    the next shift takes when it opens: that second reopening is withdrawn, as a first
    would be. The flag still names both reopenings' events."""
    a, b = parcels(session, world, 2)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    first = sign_off(session, world, pda.close(first))
    late = pda.event(
        a, "out_for_delivery", shift_id=first.id, occurred_at=NOW - dt.timedelta(minutes=30)
    )
    pda.push([late], received_at=NOW + dt.timedelta(minutes=1))
    session.refresh(first)
    assert (first.status, first.reopened_count) == (ShiftStatus.CLOSED, 1)
    first = sign_off(session, world, first, note="seen")
    check_out = pda.event(b, occurred_at=NOW + dt.timedelta(minutes=4))
    pda.push([check_out], received_at=NOW + dt.timedelta(minutes=4, seconds=30))
    session.refresh(first)
    assert (first.status, first.reopened_count) == (ShiftStatus.CLOSED, 2)
    second = pda.open(now=NOW + dt.timedelta(minutes=5))
    session.refresh(first)
    assert session.scalars(select(ScanEvent.shift_id).where(ScanEvent.seq == 4)).one() == (
        second.id
    )
    assert first.status == ShiftStatus.SIGNED_OFF
    flag = session.scalars(select(Flag).where(Flag.kind == "late_event_after_signoff")).one()
    assert flag.status == FlagStatus.CLOSED and len(flag.evidence["event_ids"]) == 2


def test_a_signed_off_shift_that_an_opening_files_a_scan_under_is_reopened(
    session: Session, world: World, pda: Pda
) -> None:
    """The first shift is signed off; the second opens a minute after its close
    declaring first seq 3, takes by seq a check-out the PDA's clock put a minute before
    that close, and closes a minute later without its last seq. The third opens a
    minute after that, declaring nothing: the check-out, near its opening, is no longer
    the second's, and the time rules file it under the first, whose signed-off balance
    no longer holds (one more parcel out, missing). It is reopened, as for a late event
    pushed into it, naming the scan and the shift it came from."""
    a, b = parcels(session, world, 2)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    first = sign_off(session, world, pda.close(first))
    assert first.signoff_balance["checked_out"] == 1
    second = pda.open(first_seq=3, now=NOW + dt.timedelta(minutes=1))
    check_out = pda.event(b, occurred_at=NOW - dt.timedelta(minutes=1))
    pda.push([check_out], received_at=NOW + dt.timedelta(minutes=1, seconds=30))
    (moved,) = session.scalars(select(ScanEvent).where(ScanEvent.seq == 3))
    assert moved.shift_id == second.id
    pda.close(second, now=NOW + dt.timedelta(minutes=2))
    pda.open(now=NOW + dt.timedelta(minutes=3))
    session.refresh(first)
    session.refresh(moved)
    assert moved.shift_id == first.id
    assert shift_balance(session=session, shift=first).missing == 1
    assert (first.status, first.reopened_count) == (ShiftStatus.CLOSED, 1)
    late = session.scalars(select(Flag).where(Flag.kind == "late_event_after_signoff")).one()
    assert late.status == FlagStatus.OPEN and late.shift_id == first.id
    assert late.evidence["latest_reopening"] == {
        "event_ids": [moved.id],
        "filed_from_shift_id": second.id,
    }


def test_a_signed_off_shift_whose_seqs_the_next_opening_shows_still_on_the_pda_is_reopened(
    session: Session, world: World, pda: Pda
) -> None:
    """The PDA died with its last scans unsent (seqs 3 and 4: the failed attempt and
    the return). Its shift, opened with first seq 1, was closed without a last seq (a
    manager closing for a dead PDA cannot know it) and signed off as it stood: the
    parcel missing, no seq known to be missing. The next morning the PDA opens its
    next shift declaring first seq 5: seqs 3 and 4 are the first shift's and still on
    the PDA. No event moved, yet its balance is now provisional, one a sign-off would
    have needed a reason for: the shift reopens, naming the shift that opened and
    the seqs missing. When they land, it balances and waits for a new sign-off."""
    (a,) = parcels(session, world, 1)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "out_for_delivery")])
    unsent = [
        pda.event(a, "delivery_attempt_failed", reason="recipient_absent", action="notice_left"),
        pda.event(a, "returned_to_station"),
    ]
    first = sign_off(session, world, pda.close(first), note="a is missing; PDA dead")
    signed = first.signoff_balance
    assert (signed["status"], signed["missing"], signed["missing_seqs"]) == ("unbalanced", 1, [])
    second = pda.open(first_seq=5, now=NOW + dt.timedelta(hours=12))
    session.refresh(first)
    balance = shift_balance(session=session, shift=first)
    assert (balance.status, balance.missing_seqs) == ("provisional", [3, 4])
    assert (first.status, first.reopened_count) == (ShiftStatus.CLOSED, 1)
    late = session.scalars(select(Flag).where(Flag.kind == "late_event_after_signoff")).one()
    assert late.status == FlagStatus.OPEN and late.shift_id == first.id
    assert late.evidence["latest_reopening"] == {
        "event_ids": [],
        "next_shift_id": second.id,
        "missing_seqs": [3, 4],
    }
    actions = session.scalars(
        select(AuditEntry.action)
        .where(AuditEntry.subject_type == "shift", AuditEntry.subject_key == str(first.id))
        .order_by(AuditEntry.id)
    ).all()
    assert actions == ["shift_signed_off", "shift_reopened"]
    pda.push(unsent, received_at=NOW + dt.timedelta(hours=12, minutes=5))
    session.refresh(first)
    assert shift_balance(session=session, shift=first).status == "balanced"
    assert (first.status, first.reopened_count) == (ShiftStatus.CLOSED, 1)


def test_a_signed_off_shift_whose_seqs_the_next_opening_leaves_as_they_were_stays_signed_off(
    session: Session, world: World, pda: Pda
) -> None:
    """The opening judges only what it can change, the seqs the shift owns: a rule flag
    of its parcel closed since the sign-off (a consent that came later, say), which
    reopened nothing then, reopens nothing when the next shift opens either."""
    (a,) = parcels(session, world, 1)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "delivered", pod={"recipient_name": "R"})])  # no proof
    first = sign_off(session, world, pda.close(first), note="asked for the proof")
    assert first.signoff_balance["discrepancy_count"] == 1
    flag = session.scalars(select(Flag).where(Flag.kind == "delivered_without_pod")).one()
    close_flags_by_id(session=session, flag_ids=[flag.id], reason="proof found")
    session.commit()
    pda.open(first_seq=3, now=NOW + dt.timedelta(hours=12))
    session.refresh(first)
    assert (first.status, first.reopened_count) == (ShiftStatus.SIGNED_OFF, 0)
    assert session.scalars(select(Flag).where(Flag.kind == "late_event_after_signoff")).all() == []


@pytest.mark.parametrize("order", ["in order", "check-out last"])
def test_not_on_manifest_is_flagged_whatever_the_order_the_check_out_arrives_in(
    session: Session, world: World, pda: Pda, order: str
) -> None:
    """Shift R checks parcel P out (seq 1); shift S delivers it (seq 2) without checking
    it out again: P is not on S's manifest. With R's check-out arriving after S closed,
    S was judged while ``delivered_not_checked_out`` covered the delivery; when the
    check-out lands that flag closes, and S is judged again (rule 3)."""
    (p,) = parcels(session, world, 1)
    check_out = pda.event(p, occurred_at=NOW - dt.timedelta(hours=3))
    delivered = pda.event(p, "delivered", occurred_at=NOW - dt.timedelta(hours=1))
    r = pda.open(first_seq=1, now=NOW - dt.timedelta(hours=4))
    if order == "in order":
        pda.push([check_out], received_at=NOW - dt.timedelta(hours=3))
    r = pda.close(r, last_seq=1, now=NOW - dt.timedelta(hours=2, minutes=30))
    s = pda.open(first_seq=2, now=NOW - dt.timedelta(hours=2))
    pda.push([delivered], received_at=NOW - dt.timedelta(minutes=50))
    s = pda.close(s, last_seq=2, now=NOW - dt.timedelta(minutes=30))
    if order == "check-out last":
        pda.push([check_out], received_at=NOW)
    filed = dict(session.execute(select(ScanEvent.seq, ScanEvent.shift_id)).all())
    assert filed == {1: r.id, 2: s.id}
    balance = shift_balance(session=session, shift=s)
    assert [(d.kind, d.flag_id is not None) for d in balance.discrepancies] == [
        ("not_on_manifest", True)
    ]
    flags = session.execute(select(Flag.kind, Flag.status).where(Flag.shift_id == s.id))
    assert [tuple(f) for f in flags] == [("not_on_manifest", FlagStatus.OPEN)]


@pytest.mark.parametrize("order", ["in order", "check-out last"])
def test_not_on_manifest_when_a_late_check_out_only_narrows_the_flag(
    session: Session, world: World, pda: Pda, order: str
) -> None:
    """Shift A delivers P (seq 1) never checked out; shift B checks P out (seq 2);
    shift C delivers it again (seq 3) without checking it out. With B's check-out
    last, C was judged while delivered_not_checked_out named both deliveries; the
    check-out narrows that flag to A's (neither raised nor closed), and C is judged
    again all the same."""
    (p,) = parcels(session, world, 1)
    d1 = pda.event(p, "delivered", occurred_at=NOW - dt.timedelta(hours=7))
    check_out = pda.event(p, occurred_at=NOW - dt.timedelta(hours=4, minutes=50))
    d2 = pda.event(p, "delivered", occurred_at=NOW - dt.timedelta(hours=2))
    a = pda.open(first_seq=1, now=NOW - dt.timedelta(hours=8))
    pda.push([d1], received_at=NOW - dt.timedelta(hours=7))
    a = pda.close(a, last_seq=1, now=NOW - dt.timedelta(hours=6))
    b = pda.open(first_seq=2, now=NOW - dt.timedelta(hours=5))
    if order == "in order":
        pda.push([check_out], received_at=NOW - dt.timedelta(hours=4, minutes=50))
    b = pda.close(b, last_seq=2, now=NOW - dt.timedelta(hours=4))
    c = pda.open(first_seq=3, now=NOW - dt.timedelta(hours=3))
    pda.push([d2], received_at=NOW - dt.timedelta(hours=2))
    c = pda.close(c, last_seq=3, now=NOW - dt.timedelta(hours=1))
    if order == "check-out last":
        pda.push([check_out], received_at=NOW)
    filed = dict(session.execute(select(ScanEvent.seq, ScanEvent.shift_id)).all())
    assert filed == {1: a.id, 2: b.id, 3: c.id}
    balance = shift_balance(session=session, shift=c)
    assert [(d.kind, d.flag_id is not None) for d in balance.discrepancies] == [
        ("not_on_manifest", True)
    ]


def test_a_signed_off_shift_whose_scan_the_next_opening_takes_unchanged_stays_signed_off(
    session: Session, world: World, pda: Pda
) -> None:
    """The shift, closed without its last seq, holds by the grace an out-for-delivery
    scan of a parcel it never took (it counts nowhere) and is signed off with a
    delivery without proof. The proof is found (the rule flag closes: no reopening).
    The next shift opens and takes the scan: the shift's balance is the same with it
    or without it, so the opening changed nothing of it, and it stays signed off."""
    a, b = parcels(session, world, 2)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "delivered", pod={"recipient_name": "R"})])  # no proof
    first = pda.close(first)
    scan = pda.event(b, "out_for_delivery", occurred_at=NOW + dt.timedelta(minutes=4))
    pda.push([scan], received_at=NOW + dt.timedelta(minutes=4, seconds=30))
    first = sign_off(session, world, first, note="asked for the proof")
    flag = session.scalars(select(Flag).where(Flag.kind == "delivered_without_pod")).one()
    close_flags_by_id(session=session, flag_ids=[flag.id], reason="proof found")
    session.commit()
    second = pda.open(now=NOW + dt.timedelta(minutes=5))
    assert session.scalars(select(ScanEvent.shift_id).where(ScanEvent.seq == 3)).one() == (
        second.id
    )
    session.refresh(first)
    assert (first.status, first.reopened_count) == (ShiftStatus.SIGNED_OFF, 0)
    assert session.scalars(select(Flag).where(Flag.kind == "late_event_after_signoff")).all() == []


def test_a_resolved_rule_flag_whose_cause_went_away_is_closed_and_unbalances_nothing(
    session: Session, world: World, pda: Pda
) -> None:
    """Shift A checks P out and returns it; shift B checks it out again (seq 3) and
    delivers it (seq 4). Seq 4 arrives first: returned then delivered with no check-out
    between is a conflicting_final_outcome naming A's return, and the manager resolves
    it. Seq 3 then lands: there is no conflict (pushed in order there never was one),
    so the flag is closed, and neither shift's balance cites it any more."""
    from sync.flags import flag_changes, resolve_flag

    (p,) = parcels(session, world, 1)
    start = NOW - dt.timedelta(hours=4)
    a = pda.open(first_seq=1, now=start)
    pda.push(
        [
            pda.event(p, occurred_at=start + dt.timedelta(minutes=1)),
            pda.event(p, "returned_to_station", occurred_at=start + dt.timedelta(hours=1)),
        ],
        received_at=start + dt.timedelta(hours=1),
    )
    a = pda.close(a, last_seq=2, now=start + dt.timedelta(hours=1, minutes=10))
    b = pda.open(first_seq=3, now=start + dt.timedelta(hours=2))
    re_check_out = pda.event(p, occurred_at=start + dt.timedelta(hours=2, minutes=1))
    delivered = pda.event(p, "delivered", occurred_at=start + dt.timedelta(hours=3))
    pda.push([delivered], received_at=start + dt.timedelta(hours=3, minutes=1))
    assert shift_balance(session=session, shift=a).status == "unbalanced"
    conflict = session.scalars(select(Flag).where(Flag.kind == "conflicting_final_outcome")).one()
    resolve_flag(session=session, flag=conflict, user_id=world.manager.id, note="checked")
    session.commit()
    pda.push([re_check_out], received_at=start + dt.timedelta(hours=3, minutes=2))
    b = pda.close(b, last_seq=4, now=start + dt.timedelta(hours=3, minutes=30))
    session.refresh(conflict)
    assert conflict.status == FlagStatus.CLOSED
    assert [c.to_status for c in flag_changes(session=session, flag=conflict)][-2:] == [
        FlagStatus.RESOLVED,
        FlagStatus.CLOSED,
    ]
    assert shift_balance(session=session, shift=a).status == "balanced"
    assert shift_balance(session=session, shift=b).delivered == 1


@pytest.mark.parametrize(
    ("gap", "minutes", "pushed", "held_before"),
    [
        (60, -3, "before the opening", None),
        (5, -1, "before the opening", "the closed shift"),
        (60, -3, "after the opening", None),
        (60, 2, "after the opening", None),
        (1, 2, "after the opening", None),
    ],
    ids=[
        "scanned-and-pushed-just-before-the-opening",
        "scanned-and-pushed-just-after-the-close-before-the-opening",
        "scanned-just-before-the-opening",
        "scanned-just-after-the-opening",
        "opened-a-minute-after-the-close",
    ],
)
def test_the_next_shift_takes_its_first_scans_from_one_closed_without_its_last_seq(
    session: Session,
    world: World,
    pda: Pda,
    gap: int,
    minutes: int,
    pushed: str,
    held_before: str | None,
) -> None:
    """The next shift, opened ``gap`` minutes after the close, declared no seqs; its
    check-out, scanned just after it opened (or a moment before, within the filing
    grace), and its delivery are its own, not the previous shift's by seq, whether the
    check-out reached the server before the opening (filed until then under none, or
    under the previous shift when it came within the grace of its close) or after:
    the previous shift is balanced, the next one delivered what it took."""
    a, b = parcels(session, world, 2)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    pda.close(first)  # at NOW, no last_seq
    opening = NOW + dt.timedelta(minutes=gap)
    check_out = pda.event(b, occurred_at=opening + dt.timedelta(minutes=minutes))
    if pushed == "before the opening":
        pda.push([check_out], received_at=opening - dt.timedelta(seconds=30))
        held = session.scalars(select(ScanEvent.shift_id).where(ScanEvent.seq == 3)).one()
        assert held == (first.id if held_before else None)
        second = pda.open(now=opening)
    else:
        second = pda.open(now=opening)
        pda.push([check_out], received_at=opening + dt.timedelta(minutes=3))
    pda.push(
        [pda.event(b, "delivered", occurred_at=opening + dt.timedelta(hours=1))],
        received_at=opening + dt.timedelta(hours=1),
    )
    filed = dict(session.execute(select(ScanEvent.seq, ScanEvent.shift_id)).all())
    assert filed == {1: first.id, 2: first.id, 3: second.id, 4: second.id}
    assert shift_balance(session=session, shift=first).status == "balanced"
    balance = shift_balance(session=session, shift=second)
    assert (balance.checked_out, balance.delivered, balance.missing) == (1, 1, 0)


def test_a_shift_closed_before_it_opened_keeps_its_seqs_just_after_the_opening(
    session: Session, world: World, pda: Pda
) -> None:
    """The server's clock stepped back between the opening and the close: the seqs it
    left open end a grace after its opening, not before it."""
    (a,) = parcels(session, world, 1)
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a, occurred_at=OPENED + dt.timedelta(minutes=1))])
    shift = pda.close(shift, now=OPENED - dt.timedelta(minutes=10))
    pda.push(
        [pda.event(a, "returned_to_station", occurred_at=OPENED + dt.timedelta(minutes=2))],
        received_at=OPENED + dt.timedelta(minutes=3),
    )
    filed = session.scalars(select(ScanEvent.shift_id).order_by(ScanEvent.seq)).all()
    assert filed == [shift.id, shift.id]


def test_seqs_left_open_end_at_the_close_or_where_the_next_shift_starts() -> None:
    """The bound of a shift closed without its last seq, at its edges: its close and
    the grace; sooner, the next shift's first seq when it declared one (whatever the
    time), or its opening less the grace."""
    grace = ShiftRules().filing_grace
    alone = shifts._Window(1, OPENED, NOW, 1, None)
    assert alone.holds_by_seq(10**9, NOW + grace, grace)
    assert not alone.holds_by_seq(10**9, NOW + grace + dt.timedelta(seconds=1), grace)
    assert not alone.holds_by_seq(0, NOW, grace)  # below its own first seq
    stepped_back = shifts._Window(1, OPENED, OPENED - dt.timedelta(hours=1), 1, None)
    assert stepped_back.holds_by_seq(5, OPENED + grace, grace)
    opening = NOW + dt.timedelta(minutes=3)
    undeclared = shifts._Window(1, OPENED, NOW, 1, None, next_opened_at=opening)
    assert undeclared.holds_by_seq(5, opening - grace - dt.timedelta(seconds=1), grace)
    assert not undeclared.holds_by_seq(5, opening - grace, grace)
    declared = shifts._Window(1, OPENED, NOW, 1, None, next_opened_at=opening, next_first_seq=5)
    assert declared.holds_by_seq(4, NOW - dt.timedelta(hours=1), grace)
    assert not declared.holds_by_seq(5, NOW - dt.timedelta(hours=1), grace)


def test_with_declared_seqs_an_event_between_shifts_is_filed_the_same_whenever_pushed(
    session: Session, world: World, pda: Pda
) -> None:
    """A scan a minute before the next shift opens, after the first one closed with its
    last_seq: pushed before the opening it belongs to none until the opening files it;
    pushed after, straight to the new shift. (The seqs are the PDA's causal order.)"""
    (a,) = parcels(session, world, 1)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    pda.close(first, last_seq=2)  # at NOW
    early = pda.event(a, occurred_at=NOW + dt.timedelta(minutes=1))
    pda.push([early], received_at=NOW + dt.timedelta(minutes=4, seconds=30))
    assert session.scalars(select(ScanEvent.shift_id).where(ScanEvent.seq == 3)).one() is None
    second = pda.open(first_seq=3, now=NOW + dt.timedelta(minutes=5))
    assert session.scalars(select(ScanEvent.shift_id).where(ScanEvent.seq == 3)).one() == (
        second.id
    )


def test_without_declared_seqs_a_scan_just_after_the_close_belongs_to_the_shift(
    session: Session, world: World, pda: Pda
) -> None:
    """Corrected clocks are estimates: the return scanned as the shift closed may be
    dated a moment after the close by the push's latency."""
    (a,) = parcels(session, world, 1)
    shift = pda.open()
    pda.push([pda.event(a)])
    shift = pda.close(shift)  # at NOW
    pda.push(
        [pda.event(a, "returned_to_station", occurred_at=NOW + dt.timedelta(seconds=2))],
        received_at=NOW + dt.timedelta(seconds=3),
    )
    assert shift_balance(session=session, shift=shift).status == "balanced"


def test_an_event_long_after_a_close_belongs_to_no_shift_and_reopens_nothing(
    session: Session, world: World, pda: Pda
) -> None:
    (a,) = parcels(session, world, 1)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    shift = pda.close(shift)
    sign_off(session, world, shift)
    receipt = pda.push(
        [pda.event(a, occurred_at=NOW + dt.timedelta(hours=15))],
        received_at=NOW + dt.timedelta(hours=15, minutes=1),
    )
    late = session.scalars(select(ScanEvent).where(ScanEvent.seq == 3)).one()
    assert late.shift_id is None
    session.refresh(shift)
    assert shift.status == ShiftStatus.SIGNED_OFF
    assert "late_event_after_signoff" not in {f["kind"] for f in receipt["flags_raised"]}


def test_an_event_pushed_before_its_shift_opened_is_filed_under_it_when_it_opens(
    session: Session, world: World, pda: Pda
) -> None:
    (a,) = parcels(session, world, 1)
    early = pda.event(a, occurred_at=OPENED - dt.timedelta(minutes=2))
    pda.push([early], received_at=OPENED - dt.timedelta(minutes=1))
    assert session.scalars(select(ScanEvent.shift_id)).one() is None
    shift = pda.open()
    assert session.scalars(select(ScanEvent.shift_id)).one() == shift.id
    assert shift_balance(session=session, shift=shift).checked_out == 1


def test_opening_a_shift_reads_only_the_pdas_events_filed_under_none(
    session: Session, world: World, pda: Pda
) -> None:
    """What the opening files is looked up among the PDA's events filed under no
    shift, by time (``ix_scan_event_unfiled``), not among every event the PDA sent.
    On SQLite, here; PostgreSQL's plan is checked on a realistic history, in
    ``tests/courier_api/test_query_plans.py``."""
    if session.get_bind().dialect.name != "sqlite":
        pytest.skip("PostgreSQL plans depend on statistics: test_query_plans.py has them")
    sent: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    connection = session.connection()
    event.listen(connection, "before_cursor_execute", capture)
    try:
        pda.open()
    finally:
        event.remove(connection, "before_cursor_execute", capture)
    [(filing, parameters)] = [(s, p) for s, p in sent if s.startswith("UPDATE scan_event")]
    plan = session.connection().exec_driver_sql(f"EXPLAIN QUERY PLAN {filing}", parameters)
    assert "USING INDEX ix_scan_event_unfiled" in " ".join(row[-1] for row in plan)


def _shift_statuses_read(session: Session, push: Any) -> tuple[Any, list[str]]:
    """What ``push()`` returns, and the statements it sent that read shifts' statuses
    (``sync.shifts.lock_shifts``)."""
    sent: list[str] = []

    def capture(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    connection = session.connection()
    event.listen(connection, "before_cursor_execute", capture)
    try:
        receipt = push()
    finally:
        event.remove(connection, "before_cursor_execute", capture)
    return receipt, [s for s in sent if s.startswith("SELECT shift.id, shift.status")]


def test_a_scan_filed_under_its_open_shift_reads_its_status_again_only_to_lock_it(
    session: Session, world: World, pda: Pda
) -> None:
    """The filing read the shift open in the push's own transaction. On SQLite no other
    writer can close it before the push commits, so the push reads its status no
    second time (one statement fewer for every scan pushed as it happens); PostgreSQL
    locks its row, which another transaction may have closed since the filing read it."""
    (a,) = parcels(session, world, 1)
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a)])
    receipt, reads = _shift_statuses_read(
        session, lambda: pda.push([pda.event(a, "out_for_delivery")])
    )
    assert [r["status"] for r in receipt["results"]] == ["applied"]
    assert len(reads) == open_shifts_locking(session)
    filed = session.scalars(select(ScanEvent.shift_id).order_by(ScanEvent.seq)).all()
    assert filed == [shift.id, shift.id]


def test_a_scan_filed_under_its_closed_shift_reads_its_status_and_reopens_its_sign_off(
    session: Session, world: World, pda: Pda
) -> None:
    """A shift the filing read closed or signed off is read again, locked, and judged:
    a late scan under a signed-off shift reopens it, on SQLite as on PostgreSQL."""
    (a,) = parcels(session, world, 1)
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a)])
    shift = sign_off(
        session, world, pda.close(shift, last_seq=2), force_reason="the return comes later"
    )
    receipt, reads = _shift_statuses_read(
        session, lambda: pda.push([pda.event(a, "returned_to_station")])
    )
    assert [r["status"] for r in receipt["results"]] == ["applied"]
    assert len(reads) == 1
    session.refresh(shift)
    assert shift.status == ShiftStatus.CLOSED
    late = session.scalars(select(Flag).where(Flag.kind == "late_event_after_signoff")).one()
    assert late.subject_key == str(shift.id)


def test_another_courier_on_the_same_pda_never_files_into_its_shift(
    session: Session, world: World, pda: Pda
) -> None:
    (a,) = parcels(session, world, 1)
    shift = pda.open()
    other = factories.user(session, "courier2", "courier", world.station)
    session.commit()
    intruder = Pda(session, world)
    intruder.pusher = Pusher(world.device.id, world.station.id, other.id)
    receipt = intruder.push([intruder.event(a), intruder.event(a, "delivered", shift_id=shift.id)])
    assert [r["status"] for r in receipt["results"]] == ["applied", "applied"]
    assert set(session.scalars(select(ScanEvent.shift_id))) == {None}
    assert shift_balance(session=session, shift=shift).checked_out == 0
    flag = session.scalars(select(Flag).where(Flag.kind == "wrong_shift")).one()
    assert flag.evidence["claimed_shift_ids"] == [shift.id]


def test_a_shift_named_by_the_pda_that_is_not_its_own_is_flagged_and_filed_by_time(
    session: Session, world: World, pda: Pda
) -> None:
    (a,) = parcels(session, world, 1)
    shift = pda.open()
    receipt = pda.push([pda.event(a, shift_id=999_999)])
    stored = session.scalars(select(ScanEvent)).one()
    assert (stored.shift_id, stored.claimed_shift_id) == (shift.id, 999_999)
    flag = session.scalars(select(Flag).where(Flag.kind == "wrong_shift")).one()
    assert flag.evidence["claimed_shift_ids"] == [999_999]
    assert flag.id in {f["flag_id"] for f in receipt["flags_raised"]}


def test_a_wrong_shift_flag_keeps_every_shift_its_pda_named_whatever_the_batching(
    session: Session, world: World, pda: Pda
) -> None:
    """A PDA that named shift 999 999 in one push and 888 888 in the next: the flag's
    ``claimed_shift_ids`` names both, as one push of both events gives (rule 3). The
    later push used to overwrite the list, and the manager read only the latest."""
    a, b = parcels(session, world, 2)
    pda.open()
    pda.push([pda.event(a, shift_id=999_999)])
    pda.push([pda.event(b, shift_id=888_888)])
    flag = session.scalars(select(Flag).where(Flag.kind == "wrong_shift")).one()
    assert flag.evidence["claimed_shift_ids"] == [888_888, 999_999]
    assert flag.evidence["seqs"] == [1, 2]


def test_a_parcel_without_outcome_is_missing_at_handover(
    session: Session, world: World, pda: Pda
) -> None:
    a, b = parcels(session, world, 2)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b), pda.event(a, "delivered")])
    open_balance = shift_balance(session=session, shift=shift)
    # While the courier is out the parcel is not yet "missing at handover": no flag.
    assert open_balance.missing == 1 and handover_flags(session, shift) == {}
    pda.push(
        [pda.event(b, "delivery_attempt_failed", reason="refused", action="return_to_sender")]
    )
    shift = pda.close(shift, last_seq=pda.seq)
    balance = shift_balance(session=session, shift=shift)
    assert balance.status == "unbalanced"
    assert (balance.checked_out, balance.delivered, balance.missing) == (2, 1, 1)
    [discrepancy] = balance.discrepancies
    assert (discrepancy.kind, discrepancy.tracking_no) == ("missing_at_handover", b)
    flag = session.get(Flag, discrepancy.flag_id)
    assert flag.kind == "missing_at_handover" and flag.shift_id == shift.id
    assert flag.evidence["last_event_type"] == "delivery_attempt_failed"
    assert flag.courier_id == world.courier.id


@pytest.mark.parametrize("blank", [None, ""])
def test_a_delivery_recorded_without_a_gps_fix_is_not_quarantined(
    session: Session, world: World, pda: Pda, blank: str | None
) -> None:
    """The courier handed the parcel over in an underground car park: the PDA had no GPS
    fix and its location form went out empty, ``{"lat": null, "lon": null,
    "accuracy_m": null}`` (or ``""`` each). Optional fields left blank are absent (README,
    "Optional fields left empty"; ``sync.events.absent``), but a location whose every
    field is blank is refused whole (``invalid_number``, location.lat): the delivery is
    quarantined, and the parcel the courier did hand over shows missing at handover,
    the shift unbalanced (rule 1). It should be the event without a location."""
    (a,) = parcels(session, world, 1)
    shift = pda.open()
    no_fix = {"lat": blank, "lon": blank, "accuracy_m": blank}
    receipt = pda.push([pda.event(a), pda.event(a, "delivered", location=no_fix)])
    assert [r["status"] for r in receipt["results"]] == ["applied", "applied"], receipt["results"]
    assert session.scalars(select(QuarantinedEvent)).all() == []
    shift = pda.close(shift, last_seq=2)
    balance = shift_balance(session=session, shift=shift)
    assert (balance.status, balance.delivered, balance.missing) == ("balanced", 1, 0)


def test_a_sequence_gap_makes_it_provisional_until_the_late_batch_lands(
    session: Session, world: World, pda: Pda
) -> None:
    a, b = parcels(session, world, 2)
    shift = pda.open(first_seq=1)
    events = [
        pda.event(a),
        pda.event(b),
        pda.event(a, "delivered"),
        pda.event(b, "returned_to_station"),
    ]
    pda.push(events[:2])
    shift = pda.close(shift, last_seq=4)  # seqs 3 and 4 are still on the PDA
    balance = shift_balance(session=session, shift=shift)
    assert balance.status == "provisional"
    assert (balance.missing_seqs, balance.missing_seq_count) == ([3, 4], 2)
    # Both parcels look missing meanwhile, and are flagged so.
    assert set(handover_flags(session, shift).values()) == {FlagStatus.OPEN}
    pda.push(events[2:], received_at=NOW + dt.timedelta(minutes=30))
    balance = shift_balance(session=session, shift=shift)
    assert balance.status == "balanced"
    assert (balance.delivered, balance.returned, balance.missing_seqs) == (1, 1, [])
    assert set(handover_flags(session, shift).values()) == {FlagStatus.CLOSED}


def test_a_final_batch_that_never_came_is_a_gap_beyond_the_highest_seq(
    session: Session, world: World, pda: Pda
) -> None:
    (a,) = parcels(session, world, 1)
    shift = pda.open()
    pda.push([pda.event(a)])
    shift = pda.close(shift, last_seq=3)
    balance = shift_balance(session=session, shift=shift)
    assert (balance.status, balance.missing_seqs) == ("provisional", [2, 3])


def test_a_gap_of_an_earlier_shift_does_not_hold_a_later_one(
    session: Session, world: World, pda: Pda
) -> None:
    (a,) = parcels(session, world, 1)
    first = pda.open(first_seq=1)
    pda.seq = 1  # seq 1 never arrives
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    first = pda.close(first, last_seq=3)
    second = pda.open(first_seq=4, now=NOW + dt.timedelta(minutes=1))
    pda.push(
        [
            pda.event(a, occurred_at=NOW + dt.timedelta(minutes=2)),
            pda.event(a, "returned_to_station", occurred_at=NOW + dt.timedelta(minutes=3)),
        ],
        received_at=NOW + dt.timedelta(minutes=4),
    )
    assert shift_balance(session=session, shift=first).missing_seqs == [1]
    second_balance = shift_balance(session=session, shift=second)
    assert (second_balance.status, second_balance.missing_seqs) == ("balanced", [])


def test_a_shift_without_first_seq_owns_the_gap_below_its_first_event_that_arrived(
    session: Session, world: World, pda: Pda
) -> None:
    """The PDA's first shift declared no first_seq; its check-outs (seqs 1 and 2) are
    still on the PDA, its deliveries arrived: the balance waits for them (provisional),
    rather than showing the deliveries as not on the manifest."""
    a, b = parcels(session, world, 2)
    shift = pda.open()
    check_outs = [pda.event(a), pda.event(b)]
    pda.push([pda.event(a, "delivered"), pda.event(b, "delivered")])
    shift = pda.close(shift)
    balance = shift_balance(session=session, shift=shift)
    assert (balance.status, balance.missing_seqs) == ("provisional", [1, 2])
    pda.push(check_outs)
    balance = shift_balance(session=session, shift=shift)
    assert (balance.status, balance.missing_seqs, balance.delivered) == ("balanced", [], 2)


def test_after_a_declared_last_seq_the_next_shift_owns_from_the_seq_after_it(
    session: Session, world: World, pda: Pda
) -> None:
    """The next shift declared no first_seq: it owns from the seq after the previous
    shift's last_seq, so a closing with a last_seq and none of its events in yet is
    provisional, not balanced with nothing checked out."""
    (a,) = parcels(session, world, 1)
    first = pda.open()
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    pda.close(first, last_seq=2)
    second = pda.open(now=NOW + dt.timedelta(minutes=1))
    second = pda.close(second, last_seq=5, now=NOW + dt.timedelta(hours=2))  # 3 to 5: on the PDA
    balance = shift_balance(session=session, shift=second)
    assert (balance.status, balance.missing_seqs, balance.checked_out) == (
        "provisional",
        [3, 4, 5],
        0,
    )


def test_a_reset_pda_numbering_from_its_sign_in_never_files_into_the_closed_shift(
    session: Session, world: World, pda: Pda
) -> None:
    """The courier closed the PDA's first shift (opened without a first_seq) declaring
    last_seq 2, while seq 2 (the return) was still queued; then the PDA lost its storage
    (the app reinstalled). As README says, it numbers its next events from the sign-in's
    ``device_max_seq + 1``: the server holds only seq 1, so 2. It opens its next shift
    without a first_seq (which now starts after the 2 the closed shift declared) and
    checks out and delivers another parcel.

    The check-out (seq 2) is filed under the closed shift, whose declared seqs hold it
    (``_Window.with_first_seq_derived``, stop 38; before, the time rules filed it under
    the new shift): the new shift shows a delivery it never checked out, the closed one a
    check-out that is not its own. The sign-in's ``device_max_seq`` should not hand out
    seqs a shift already declared its own (``sync.device_state.held_max_seq``)."""
    a, b = parcels(session, world, 2)
    first = pda.open()
    pda.push([pda.event(a)])
    pda.event(a, "returned_to_station")  # seq 2: lost with the PDA's storage
    first = pda.close(first, last_seq=2)
    pda.seq = held_max_seq(session, world.device.id)  # the reset PDA numbers on from here
    later = NOW + dt.timedelta(hours=1)
    second = pda.open(now=later)
    pda.push(
        [
            pda.event(b, occurred_at=later + dt.timedelta(minutes=1)),
            pda.event(b, "delivered", occurred_at=later + dt.timedelta(minutes=2)),
        ],
        received_at=later + dt.timedelta(minutes=3),
    )
    filed = set(session.scalars(select(ScanEvent.shift_id).where(ScanEvent.tracking_no == b)))
    assert filed == {second.id}
    balance = shift_balance(session=session, shift=second)
    assert (balance.checked_out, balance.delivered, balance.not_checked_out) == (1, 1, 0)


def test_a_reset_pda_numbers_on_after_the_seqs_its_open_shift_did_not_yet_use(
    session: Session, world: World, pda: Pda
) -> None:
    """The PDA opened its shift declaring first_seq 4 (seqs 1 to 3 its earlier shift's,
    which it closed without a last_seq), pushed nothing of the new one, then lost its
    storage. Numbered on from the seq the server holds (1), its next check-out (seq 2)
    falls before the shift's first_seq and is filed under no shift: the sign-in hands
    out the seq before the first_seq a shift declared, as it does a declared last_seq."""
    a, b = parcels(session, world, 2)
    first = pda.open()
    pda.push([pda.event(a)])
    pda.close(first)
    later = NOW + dt.timedelta(hours=1)
    second = pda.open(first_seq=4, now=later)
    pda.seq = held_max_seq(session, world.device.id)  # the reset PDA numbers on from here
    assert pda.seq == 3
    pda.push(
        [pda.event(b, occurred_at=later + dt.timedelta(minutes=1))],
        received_at=later + dt.timedelta(minutes=2),
    )
    filed = session.scalars(select(ScanEvent.shift_id).where(ScanEvent.tracking_no == b)).one()
    assert filed == second.id


def _shifts_worked(session: Session, world: World, days: range) -> None:
    """The PDA's closed shifts of ``days``, one a day, each declaring ten seqs; the
    middle day's declared the most (a PDA's history need not rise day by day)."""
    rows = []
    for day in days:
        opened = NOW - dt.timedelta(days=3000 - day)
        first = day * 10 + 1 if day != 500 else 100_000
        rows.append(
            {
                "station_id": world.station.id,
                "courier_id": world.courier.id,
                "device_id": world.device.id,
                "status": ShiftStatus.CLOSED,
                "work_date": opened.date(),
                "opened_at": opened,
                "planned_end_at": opened + dt.timedelta(hours=8),
                "closed_at": opened + dt.timedelta(hours=8),
                "first_seq": first,
                "last_seq": first + 9,
            }
        )
    session.execute(insert(Shift), rows)


def test_a_pdas_sign_in_reads_as_much_after_years_of_shifts_as_after_days(
    session: Session, world: World
) -> None:
    """``held_max_seq`` (each sign-in and refresh of a PDA's tokens) reads the highest
    seq its shifts declared from the end of an index: the same work for a PDA with 30
    shifts as for one with 1,000. SQLite's virtual machine steps count it; before, it
    aggregated every shift of the PDA, a step per shift more each day. PostgreSQL's plan
    is checked in tests/courier_api/test_query_plans.py."""
    if session.get_bind().dialect.name != "sqlite":
        pytest.skip("counts SQLite's steps: test_query_plans.py plans PostgreSQL's")
    driver = session.connection().connection.driver_connection

    def steps() -> tuple[int, int]:
        counted = [0]

        def step() -> int:
            counted[0] += 1
            return 0

        driver.set_progress_handler(step, 1)
        try:
            found = held_max_seq(session, world.device.id)
        finally:
            driver.set_progress_handler(None, 1)
        return found, counted[0]

    _shifts_worked(session, world, range(470, 530))  # days 470..529, 500 declared the most
    few = steps()
    _shifts_worked(session, world, [*range(0, 470), *range(530, 1000)])
    many = steps()
    assert few[0] == many[0] == 100_009
    assert many[1] == few[1], (few, many)


# A PDA's clock after its battery died; a push corrects its times to a year before at most.
FACTORY_DATE = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize("pushed", ["before the close", "after the close"])
def test_scans_recorded_on_a_reset_clock_are_the_shifts_whose_seqs_hold_them(
    session: Session, world: World, pda: Pda, pushed: str
) -> None:
    """The PDA's first shift, opened without a first_seq: its seqs start at 1, as its
    balance counts them, and end at the last_seq its close declares (while open, they
    go on). The delivery and the return recorded after the PDA came back dated 2000
    are its own whatever their time says (rule 6), whether they reach the server
    before the close or after (rule 3), and the handover balances."""
    a, b = parcels(session, world, 2)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b)])
    reset = [
        pda.event(a, "delivered", occurred_at=FACTORY_DATE),
        pda.event(b, "returned_to_station", occurred_at=FACTORY_DATE + dt.timedelta(hours=1)),
    ]
    if pushed == "before the close":
        pda.push(reset)
    shift = pda.close(shift, last_seq=4)
    if pushed == "after the close":
        pda.push(reset, received_at=NOW + dt.timedelta(minutes=5))
    filed = session.scalars(select(ScanEvent.shift_id).order_by(ScanEvent.seq)).all()
    assert filed == [shift.id] * 4
    balance = shift_balance(session=session, shift=shift)
    assert (balance.status, balance.delivered, balance.returned) == ("balanced", 1, 1)
    assert set(handover_flags(session, shift).values()) <= {FlagStatus.CLOSED}


def test_closing_with_a_last_seq_takes_the_couriers_scans_in_its_seqs_filed_under_none(
    session: Session, world: World, pda: Pda
) -> None:
    """Scans of the courier in the seqs the close declares the shift's that no shift
    holds (a push filed them by their reset clock's time before the seqs decided, as
    this service did) are taken at the close, as a push after it files them, and
    their parcels judged again: the handover balances."""
    a, b = parcels(session, world, 2)
    shift = pda.open()
    pda.push(
        [
            pda.event(a),
            pda.event(b),
            pda.event(a, "delivered", occurred_at=FACTORY_DATE),
            pda.event(b, "returned_to_station", occurred_at=FACTORY_DATE),
        ]
    )
    session.execute(update(ScanEvent).where(ScanEvent.seq > 2).values(shift_id=None))
    session.commit()
    shift = pda.close(shift, last_seq=4)
    filed = session.scalars(select(ScanEvent.shift_id).order_by(ScanEvent.seq)).all()
    assert filed == [shift.id] * 4
    assert shift_balance(session=session, shift=shift).status == "balanced"
    assert handover_flags(session, shift) == {}


@pytest.mark.parametrize("pushed", ["before the opening", "after the opening"])
def test_an_undeclared_shift_takes_by_seq_only_what_follows_the_last_seq_before_it(
    session: Session, world: World, pda: Pda, pushed: str
) -> None:
    """The first shift closed declaring last_seq 2; the next, opened without a
    first_seq, starts at seq 3, as its balance counts. Two scans recorded on a reset
    clock arrive late: seq 2 is the first shift's (the next one does not take it), seq
    3 the next one's, whether they were pushed before the opening or after. Their
    clock's time would have filed neither."""
    a, b = parcels(session, world, 2)
    first = pda.open()
    pda.push([pda.event(a)])
    returned = pda.event(a, "returned_to_station", occurred_at=FACTORY_DATE)  # seq 2
    next_check_out = pda.event(b, occurred_at=FACTORY_DATE + dt.timedelta(days=1))  # seq 3
    first = pda.close(first, last_seq=2)
    later = NOW + dt.timedelta(hours=1)
    if pushed == "before the opening":
        pda.push([returned, next_check_out], received_at=later - dt.timedelta(minutes=30))
        second = pda.open(now=later)
    else:
        second = pda.open(now=later)
        pda.push([returned, next_check_out], received_at=later + dt.timedelta(minutes=5))
    filed = dict(session.execute(select(ScanEvent.seq, ScanEvent.shift_id)).all())
    assert filed == {1: first.id, 2: first.id, 3: second.id}
    assert shift_balance(session=session, shift=first).status == "balanced"
    assert shift_balance(session=session, shift=second).checked_out == 1


def test_an_undeclared_first_seq_is_derived_only_where_the_shifts_seqs_end_is_known() -> None:
    """Where the balance counts the seqs of a shift that declared no first seq from
    (``sync.handover``): 1 on the PDA's first shift, else after the previous shift's
    declared last seq, and nowhere after one that declared none. Only for a shift open
    or closed with its last seq: one closed without either holds by time."""

    def derived(window: shifts._Window) -> int | None:
        return window.with_first_seq_derived().first_seq

    assert derived(shifts._Window(1, OPENED, None, None, None)) == 1
    assert derived(shifts._Window(1, OPENED, NOW, None, 9)) == 1
    assert (
        derived(shifts._Window(2, OPENED, NOW, None, 9, previous_id=1, previous_last_seq=4)) == 5
    )
    assert derived(shifts._Window(2, OPENED, None, None, None, previous_id=1)) is None
    assert derived(shifts._Window(1, OPENED, NOW, None, None)) is None
    assert derived(shifts._Window(2, OPENED, NOW, 7, 9, previous_id=1, previous_last_seq=4)) == 7


def test_a_gap_above_an_event_the_pda_filed_below_the_first_seq_is_the_shifts(
    session: Session, world: World, pda: Pda
) -> None:
    """The second shift declared first_seq 5, but the PDA named it on seq 3 too: the
    shift owns from its lowest event, so seq 4, between two of its events and still on
    the PDA, keeps it provisional until it lands."""
    a, b = parcels(session, world, 2)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    pda.close(first, last_seq=2)
    second = pda.open(first_seq=5, now=NOW + dt.timedelta(minutes=1))
    claimed = {"shift_id": second.id}
    events = [
        pda.event(b, occurred_at=NOW + dt.timedelta(minutes=2), **claimed),
        pda.event(b, "out_for_delivery", occurred_at=NOW + dt.timedelta(minutes=3), **claimed),
        pda.event(b, "returned_to_station", occurred_at=NOW + dt.timedelta(minutes=4)),
    ]
    pda.push([events[0], events[2]], received_at=NOW + dt.timedelta(minutes=5))
    second = pda.close(second, last_seq=5, now=NOW + dt.timedelta(minutes=6))
    balance = shift_balance(session=session, shift=second)
    assert (balance.status, balance.missing_seqs) == ("provisional", [4])
    pda.push([events[1]], received_at=NOW + dt.timedelta(minutes=7))
    assert shift_balance(session=session, shift=second).status == "balanced"


def test_a_gap_between_an_undeclared_close_and_the_next_shift_belongs_to_the_first(
    session: Session, world: World, pda: Pda
) -> None:
    """No last_seq at the close and no first_seq at the next opening: the seqs missing
    between them may be the first shift's last events, so it stays provisional."""
    a, b, c = parcels(session, world, 3)
    first = pda.open()
    events = [pda.event(a), pda.event(b), pda.event(a, "delivered"), pda.event(b, "delivered")]
    pda.push(events[:2])
    first = pda.close(first)  # seqs 3 and 4 are still on the PDA
    second = pda.open(now=NOW + dt.timedelta(minutes=10))
    pda.push(
        [pda.event(c, occurred_at=NOW + dt.timedelta(minutes=11))],
        received_at=NOW + dt.timedelta(minutes=12),
    )
    balance = shift_balance(session=session, shift=first)
    assert (balance.status, balance.missing_seqs) == ("provisional", [3, 4])
    assert shift_balance(session=session, shift=second).missing_seqs == []
    with pytest.raises(Conflict):
        sign_off(session, world, first)
    pda.push(events[2:], received_at=NOW + dt.timedelta(minutes=20))
    balance = shift_balance(session=session, shift=first)
    assert balance.status == "balanced", balance.discrepancies


def test_a_parcel_delivered_but_never_checked_out_is_a_discrepancy(
    session: Session, world: World, pda: Pda
) -> None:
    a, stray = parcels(session, world, 2)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(a, "delivered"), pda.event(stray, "delivered")])
    shift = pda.close(shift)
    balance = shift_balance(session=session, shift=shift)
    assert balance.status == "unbalanced"
    assert (balance.checked_out, balance.delivered, balance.not_checked_out) == (1, 1, 1)
    kinds = {(d.kind, d.tracking_no) for d in balance.discrepancies}
    # The parcel's own rule flag names the delivery; no second flag for the same fact.
    assert kinds == {("delivered_not_checked_out", stray)}
    assert all(d.flag_id is not None for d in balance.discrepancies)


def test_a_return_of_a_parcel_this_shift_never_took_is_not_on_the_manifest(
    session: Session, world: World, pda: Pda
) -> None:
    (a,) = parcels(session, world, 1)
    shift = pda.open()
    pda.push([pda.event(a, "returned_to_station")])
    shift = pda.close(shift)
    balance = shift_balance(session=session, shift=shift)
    assert [(d.kind, d.tracking_no) for d in balance.discrepancies] == [("not_on_manifest", a)]
    assert handover_flags(session, shift) == {("not_on_manifest", a): FlagStatus.OPEN}


def test_rule_flags_unbalance_the_shift_that_holds_their_events(
    session: Session, world: World, pda: Pda
) -> None:
    express, twice = parcels(session, world, 2)
    shift = pda.open()
    pda.push(
        [
            pda.event(express),
            pda.event(twice),
            # express, no consent, no proof: unauthorized drop and no POD
            pda.event(express, "delivered_to_locker", locker_id="L1", compartment="2"),
            pda.event(twice, "delivered"),
            pda.event(twice, "returned_to_station"),
        ]
    )
    shift = pda.close(shift)
    balance = shift_balance(session=session, shift=shift)
    assert balance.status == "unbalanced"
    assert balance.unattended_without_consent == 1
    assert {(d.kind, d.tracking_no) for d in balance.discrepancies} == {
        ("unauthorized_locker_drop", express),
        ("delivered_without_pod", express),
        ("conflicting_final_outcome", twice),
    }
    # Counted by its last outcome: checked out = sum of the outcomes.
    outcomes = (
        balance.delivered
        + balance.delivered_without_pod
        + balance.unattended
        + balance.unattended_without_consent
        + balance.returned
        + balance.missing
    )
    assert outcomes == balance.checked_out == 2


def accounted(balance: Any) -> int:
    """The outcomes the balance counts: each parcel checked out once, under one."""
    return sum(
        getattr(balance, name)
        for name in (
            "delivered",
            "delivered_without_pod",
            "unattended",
            "unattended_without_consent",
            "returned",
            "missing",
        )
    )


def test_a_final_outcome_scanned_twice_is_counted_once_and_balances(
    session: Session, world: World, pda: Pda
) -> None:
    """The courier scans the cage of returns and then each parcel, taps a compartment
    twice, and the scanner beeps twice at a door (the second time with no proof): each
    parcel was handled once, and the handover closes."""
    back, locker, door = parcels(session, world, 3, service_class=ServiceClass.PARCEL)
    shift = pda.open()
    drop = {"locker_id": "L1", "compartment": "2", "pod": {"pickup_code": "55"}}
    pda.push(
        [
            *(pda.event(tn) for tn in (back, locker, door)),
            pda.event(locker, "delivered_to_locker", **drop),
            pda.event(locker, "delivered_to_locker", **drop),
            pda.event(door, "delivered"),
            pda.event(door, "delivered", pod={}),
            pda.event(back, "returned_to_station"),
            pda.event(back, "returned_to_station"),
        ]
    )
    shift = pda.close(shift)
    balance = shift_balance(session=session, shift=shift)
    assert (balance.status, balance.discrepancies) == ("balanced", [])
    assert (balance.delivered, balance.unattended, balance.returned) == (1, 1, 1)
    assert accounted(balance) == balance.checked_out == 3
    raised = session.scalars(select(Flag.kind).where(Flag.status != FlagStatus.CLOSED)).all()
    assert raised == ["pod_blob_missing"]  # the signature's image, not uploaded: a warning


def test_an_express_drop_scanned_twice_without_consent_is_one_unauthorized_drop(
    session: Session, world: World, pda: Pda
) -> None:
    (express,) = parcels(session, world, 1)
    shift = pda.open()
    drop = {"locker_id": "L1", "compartment": "2", "pod": {"pickup_code": "55"}}
    checked_out = pda.event(express)
    first, again = (pda.event(express, "delivered_to_locker", **drop) for _ in range(2))
    pda.push([checked_out, first, again])
    shift = pda.close(shift)
    balance = shift_balance(session=session, shift=shift)
    assert [d.kind for d in balance.discrepancies] == ["unauthorized_locker_drop"]
    stored = dict(session.execute(select(ScanEvent.client_event_id, ScanEvent.id)).all())
    scans = tuple(sorted(stored[uuid.UUID(e["client_event_id"])] for e in (first, again)))
    assert balance.discrepancies[0].event_ids == scans
    assert (balance.status, balance.unattended_without_consent) == ("unbalanced", 1)
    assert accounted(balance) == balance.checked_out == 1


def test_a_final_outcome_scanned_again_is_settled_by_its_first_scan_and_lists_its_repeats(
    session: Session, world: World, pda: Pda
) -> None:
    """The rules judge a repeated outcome by its first scan; the balance names that scan
    as the one settling the parcel (not the latest beep), and lists the others as
    repeats of it."""
    back, locker = parcels(session, world, 2, service_class=ServiceClass.PARCEL)
    shift = pda.open()
    drop = {"locker_id": "L1", "compartment": "2", "pod": {"pickup_code": "55"}}
    checked_out = [pda.event(back), pda.event(locker)]
    returns = [pda.event(back, "returned_to_station") for _ in range(3)]
    drops = [pda.event(locker, "delivered_to_locker", **drop) for _ in range(2)]
    pda.push([*checked_out, *returns, *drops])
    balance = shift_balance(session=session, shift=pda.close(shift))
    ids = dict(session.execute(select(ScanEvent.client_event_id, ScanEvent.id)).all())
    back_ids, locker_ids = (
        [ids[uuid.UUID(e["client_event_id"])] for e in s] for s in (returns, drops)
    )
    settled = {
        p.tracking_no: (p.outcome, p.outcome_event_id, p.repeated_scans) for p in balance.parcels
    }
    assert settled == {
        back: ("returned", back_ids[0], tuple((i, back_ids[0]) for i in back_ids[1:])),
        locker: ("unattended", locker_ids[0], ((locker_ids[1], locker_ids[0]),)),
    }
    assert balance.snapshot()["outcomes"] == {
        back: ["returned", back_ids[0]],
        locker: ["unattended", locker_ids[0]],
    }


def test_a_parcel_delivered_and_scanned_again_has_its_status_since_the_first_scan(
    session: Session, world: World, pda: Pda
) -> None:
    """The parcel's ``status_at`` and its timeline: delivered at the first beep, the
    second marked as repeating it. The repeat moves no status: the PDAs' pull feed gets
    no parcel update for it."""
    from models import FeedChange, Parcel
    from sync.parcels import parcel_timeline

    (a,) = parcels(session, world, 1, service_class=ServiceClass.PARCEL)
    pda.open()
    checked_out, first, again = pda.event(a), pda.event(a, "delivered"), pda.event(a, "delivered")
    pda.push([checked_out, first])
    updates = session.scalar(select(func.count()).select_from(FeedChange))
    pda.push([again])
    assert session.scalar(select(func.count()).select_from(FeedChange)) == updates
    parcel = session.scalars(select(Parcel).where(Parcel.tracking_no == a)).one()
    assert parcel.status_at == at(2)
    timeline = parcel_timeline(session=session, tracking_no=a)
    assert [entry.repeats for entry in timeline] == [None, None, timeline[1].event.id]


@pytest.mark.parametrize("next_shift_first", [False, True], ids=["in order", "next shift first"])
def test_a_repeat_in_the_next_shift_is_the_first_shifts_outcome(
    session: Session, world: World, pda: Pda, next_shift_first: bool
) -> None:
    """The courier delivered the parcel in the morning shift and, in the afternoon one
    on the same PDA, scanned the delivery again (no check-out between): the afternoon
    shift did not deliver it. It raises no ``not_on_manifest``, counts nothing for it
    and lists the scan as a repeat of the morning's; the morning shift is settled by its
    own scan. The same whichever shift's push arrives first (rule 3): the afternoon's
    ``not_on_manifest`` raised before the morning's delivery arrived is closed by it."""
    (a,) = parcels(session, world, 1, service_class=ServiceClass.PARCEL)
    morning = pda.open(first_seq=1)
    checked_out, delivered = pda.event(a), pda.event(a, "delivered")
    for morning_event in (checked_out, delivered):
        morning_event["shift_id"] = morning.id
    if not next_shift_first:
        pda.push([checked_out, delivered], received_at=at(20))
    morning = pda.close(morning, last_seq=2, now=at(30))
    afternoon = pda.open(first_seq=3, now=at(40))
    again = pda.event(a, "delivered", pod={}, occurred_at=at(45))
    pda.push([again], received_at=at(50))
    afternoon = pda.close(afternoon, last_seq=3, now=at(60))
    if next_shift_first:
        pda.push([checked_out, delivered], received_at=at(70))
    ids = dict(session.execute(select(ScanEvent.client_event_id, ScanEvent.id)).all())
    first, repeat = (ids[uuid.UUID(e["client_event_id"])] for e in (delivered, again))
    balance = shift_balance(session=session, shift=afternoon)
    assert (balance.status, balance.discrepancies, balance.not_checked_out) == ("balanced", [], 0)
    assert [(p.outcome, p.outcome_event_id, p.repeated_scans) for p in balance.parcels] == [
        ("no_outcome", None, ((repeat, first),))
    ]
    standing = {
        k: s for k, s in handover_flags(session, afternoon).items() if s != FlagStatus.CLOSED
    }
    assert standing == {}
    balance = shift_balance(session=session, shift=morning)
    assert (balance.status, balance.delivered, balance.checked_out) == ("balanced", 1, 1)
    assert [(p.outcome_event_id, p.repeated_scans) for p in balance.parcels] == [(first, ())]


@pytest.mark.parametrize("next_shift_first", [False, True], ids=["in order", "next shift first"])
def test_a_repeat_after_a_voided_check_out_in_the_next_shift_is_the_first_shifts_outcome(
    session: Session, world: World, pda: Pda, next_shift_first: bool
) -> None:
    """As above, with a check-out of the parcel between the two returns that the courier
    voided at once (a mis-tap): nothing stands between them, so the afternoon's return
    repeats the morning's. Read alone (the push brought only its events, a manager opens
    its page), the afternoon shift took the voided check-out for one and its return for
    its own outcome, a ``not_on_manifest`` raised; read with the morning shift (one push
    of the whole queue), the repeat (rule 3). Either way now: no flag, nothing counted."""
    (a,) = parcels(session, world, 1, service_class=ServiceClass.PARCEL)
    morning = pda.open(first_seq=1)
    morning_events = [pda.event(a), pda.event(a, "returned_to_station")]
    if not next_shift_first:
        pda.push(morning_events, received_at=at(20))
    morning = pda.close(morning, last_seq=2, now=at(30))
    afternoon = pda.open(first_seq=3, now=at(40))
    mis_tap = pda.event(a, occurred_at=at(41))
    void = pda.void(mis_tap)
    void["occurred_at"] = at(42).isoformat()
    again = pda.event(a, "returned_to_station", occurred_at=at(45))
    afternoon = pda.close(afternoon, last_seq=5, now=at(60))
    pda.push([mis_tap, void, again], received_at=at(65))
    if next_shift_first:
        pda.push(morning_events, received_at=at(70))
    ids = dict(session.execute(select(ScanEvent.client_event_id, ScanEvent.id)).all())
    first, repeat = (ids[uuid.UUID(e["client_event_id"])] for e in (morning_events[1], again))
    balance = shift_balance(session=session, shift=afternoon)
    assert (balance.status, balance.discrepancies, balance.not_checked_out) == ("balanced", [], 0)
    assert [(p.outcome, p.outcome_event_id, p.repeated_scans) for p in balance.parcels] == [
        ("no_outcome", None, ((repeat, first),))
    ]
    standing = {
        k: s for k, s in handover_flags(session, afternoon).items() if s != FlagStatus.CLOSED
    }
    assert standing == {}
    balance = shift_balance(session=session, shift=morning)
    assert (balance.status, balance.returned, balance.checked_out) == ("balanced", 1, 1)


def test_a_repeat_before_a_check_out_in_the_next_shift_is_listed_however_the_shift_is_read(
    session: Session, world: World, pda: Pda
) -> None:
    """The courier scanned a return in the morning shift and again at the start of the
    afternoon one, then checked the parcel out: the afternoon's return repeats the
    morning's. Its page (the shift read alone) listed no repeat, as the check-out
    after it hid that the parcel's history was to be read; the station board (read
    with the morning shift, whose return had no check-out) listed it. Both list it."""
    (a,) = parcels(session, world, 1, service_class=ServiceClass.PARCEL)
    morning = pda.open(first_seq=1)
    returned = pda.event(a, "returned_to_station")
    pda.push([returned], received_at=at(20))
    morning = pda.close(morning, last_seq=1, now=at(30))
    afternoon = pda.open(first_seq=2, now=at(40))
    again = pda.event(a, "returned_to_station", occurred_at=at(41))
    pda.push([again, pda.event(a, occurred_at=at(42))], received_at=at(50))
    afternoon = pda.close(afternoon, last_seq=3, now=at(60))
    ids = dict(session.execute(select(ScanEvent.client_event_id, ScanEvent.id)).all())
    first, repeat = (ids[uuid.UUID(e["client_event_id"])] for e in (returned, again))
    alone = shift_balance(session=session, shift=afternoon)
    with_morning = balances(session=session, shifts=[morning, afternoon])[afternoon.id]
    for balance in (alone, with_morning):
        assert [(p.outcome, p.repeated_scans) for p in balance.parcels] == [
            ("missing", ((repeat, first),))
        ]


def test_a_check_out_settled_on_its_pda_after_another_pdas_scan_is_the_shifts_own_outcome(
    session: Session, world: World
) -> None:
    """A courier with two PDAs, their clocks interleaved: PDA B's shift checked the
    parcel out (minute 5); PDA A, in a shift of its own, scanned the delivery first
    (minute 10, no proof); B scanned it twice after (minutes 15 and 16, no proof either).
    By the rules the three scans are one delivery without proof, first scanned on A.
    B's balance read alone (its page) counted the check-out delivered_without_pod,
    settled by its own scan, the flag its discrepancy; read with A's shift (the station
    board) it was settled by A's scan, and the flag, citing B's scans only as repeats of
    another shift's, was none of B's: balanced, a delivery without proof counted as
    delivered. Decided (rule 5, as ``may_repeat`` already assumes): a scan after a
    check-out standing in the shift on the same PDA is the shift's outcome of it,
    settled by the first such scan however the shift is read; A's scan stays an outcome
    A never checked out."""
    (a,) = parcels(session, world, 1, service_class=ServiceClass.PARCEL)
    second = factories.device(session, "PDA-0003", world.station)
    session.commit()
    pda_a, pda_b = Pda(session, world), Pda(session, world)
    pda_b.device = second
    pda_b.pusher = Pusher(second.id, world.station.id, world.courier.id)
    shift_a = pda_a.open(first_seq=1, now=at(0))
    shift_b = pda_b.open(first_seq=1, now=at(0))
    checked_out = pda_b.event(a, occurred_at=at(5))
    first = pda_a.event(a, "delivered", occurred_at=at(10), pod={})
    again = [pda_b.event(a, "delivered", occurred_at=at(m), pod={}) for m in (15, 16)]
    pda_b.push([checked_out, *again], received_at=at(20))
    pda_a.push([first], received_at=at(21))
    shift_a = pda_a.close(shift_a, last_seq=1, now=at(30))
    shift_b = pda_b.close(shift_b, last_seq=3, now=at(30))
    ids = dict(session.execute(select(ScanEvent.client_event_id, ScanEvent.id)).all())
    first_id, *again_ids = (ids[uuid.UUID(e["client_event_id"])] for e in (first, *again))
    alone = shift_balance(session=session, shift=shift_b)
    on_the_board = balances(session=session, shifts=[shift_a, shift_b])
    for balance in (alone, on_the_board[shift_b.id]):
        assert (balance.status, balance.checked_out, balance.delivered_without_pod) == (
            "unbalanced",
            1,
            1,
        )
        assert [(p.outcome_event_id, p.repeated_scans) for p in balance.parcels] == [
            (again_ids[0], ((again_ids[1], again_ids[0]),))
        ]
        assert [d.kind for d in balance.discrepancies] == ["delivered_without_pod"]
        assert balances_module.balance_version(balance) == balances_module.balance_version(alone)
    for balance in (shift_balance(session=session, shift=shift_a), on_the_board[shift_a.id]):
        assert (balance.not_checked_out, balance.parcels[0].outcome_event_id) == (1, first_id)
        assert sorted(d.kind for d in balance.discrepancies) == [
            "delivered_without_pod",
            "not_on_manifest",
        ]


def test_a_sign_off_kept_when_the_latest_scan_settled_a_repeat_is_of_the_same_balance(
    session: Session, world: World, pda: Pda
) -> None:
    """The version before named a repeated outcome's latest scan as the one settling it,
    and kept the balance signed off so. After the upgrade that balance, unchanged, is
    still the one signed off: no shift with a double beep shows "changed since the
    sign-off" (nor a version other than the one signed off) for it."""
    (a,) = parcels(session, world, 1, service_class=ServiceClass.PARCEL)
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "delivered"), pda.event(a, "delivered")])
    shift = sign_off(session, world, pda.close(shift, last_seq=3))
    balance = balances_module.shift_balance(session=session, shift=shift)
    (parcel,) = balance.parcels
    assert parcel.outcome_event_id != parcel.repeated_scans[-1].event_id
    for settled_by, changed in ((parcel.repeated_scans[-1].event_id, False), (None, True)):
        kept = {**shift.signoff_balance, "outcomes": {a: ["delivered", settled_by]}}
        session.execute(update(Shift).where(Shift.id == shift.id).values(signoff_balance=kept))
        session.refresh(shift)
        assert balances_module.changed_since_signoff(shift, balance) is changed
        signed = balances_module.signed_off_version(shift, balance)
        assert (signed != balances_module.balance_version(balance)) is changed


def test_a_repeat_in_the_next_shift_after_the_first_ones_sign_off_changes_nothing_signed(
    session: Session, world: World, pda: Pda
) -> None:
    """Rule 5 reopens the shift an event is filed under: the morning's repeat scanned in
    the afternoon shift is the afternoon's event, so the signed-off morning shift stays
    signed off with the balance signed off (its outcome is settled by its own scan)."""
    (a,) = parcels(session, world, 1, service_class=ServiceClass.PARCEL)
    morning = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "delivered")], received_at=at(20))
    morning = sign_off(session, world, pda.close(morning, last_seq=2, now=at(30)))
    afternoon = pda.open(first_seq=3, now=at(40))
    pda.push([pda.event(a, "delivered", pod={}, occurred_at=at(45))], received_at=at(50))
    pda.close(afternoon, last_seq=3, now=at(60))
    session.refresh(morning)
    assert morning.status == ShiftStatus.SIGNED_OFF and morning.reopened_count == 0
    view = balances_module.shift_balance(session=session, shift=morning)
    assert not balances_module.changed_since_signoff(morning, view)


def test_a_parcel_class_without_consent_rules_left_in_a_locker_is_unattended(
    session: Session, world: World, pda: Pda
) -> None:
    (a,) = parcels(session, world, 1, service_class=ServiceClass.ORDINARY)
    shift = pda.open()
    pda.push(
        [
            pda.event(a),
            pda.event(
                a, "delivered_to_locker", locker_id="L", compartment="1", pod={"pickup_code": "55"}
            ),
        ]
    )
    balance = shift_balance(session=session, shift=pda.close(shift))
    assert (balance.status, balance.unattended) == ("balanced", 1)


def test_a_corrected_return_makes_the_parcel_missing_again(
    session: Session, world: World, pda: Pda
) -> None:
    (a,) = parcels(session, world, 1)
    shift = pda.open()
    checked_out = pda.event(a)
    returned = pda.event(a, "returned_to_station")
    pda.push([checked_out, returned])
    shift = pda.close(shift)
    assert shift_balance(session=session, shift=shift).status == "balanced"
    second = pda.open(now=NOW + dt.timedelta(minutes=1))
    # A correction filed in the next shift voids the return of the first.
    pda.push(
        [
            pda.event(
                a,
                "correction",
                voids_client_event_id=returned["client_event_id"],
                reason="mis-tap",
                occurred_at=NOW + dt.timedelta(minutes=2),
            )
        ],
        received_at=NOW + dt.timedelta(minutes=3),
    )
    assert (
        session.scalars(select(ScanEvent.shift_id).where(ScanEvent.type == "correction")).one()
        == second.id
    )
    balance = shift_balance(session=session, shift=shift)
    assert (balance.status, balance.missing) == ("unbalanced", 1)
    assert handover_flags(session, shift) == {("missing_at_handover", a): FlagStatus.OPEN}
    # Read together with the shift that holds the correction, the answer is the same,
    # and judging both again (a later scan of the parcel) keeps the flag open.
    second = pda.close(second)
    assert balances(session, [shift, second])[shift.id].missing == 1
    pda.push(
        [pda.event(a, "exception", reason="lost", shift_id=second.id)],
        received_at=NOW + dt.timedelta(minutes=4),
    )
    assert handover_flags(session, shift) == {("missing_at_handover", a): FlagStatus.OPEN}


def take_in(session: Session, world: World, tracking_no: str) -> None:
    """The station takes the parcel in (intake), after its first events arrived."""
    intake_parcels(
        session=session,
        drafts=[(0, ParcelDraft(tracking_no, "parcel", "R", "1 Road"))],
        rules=IntakeRules(
            tracking=TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS),
            phone_region="CN",
        ),
        scope=IntakeScope(default_station_id=world.station.id, allowed_station_ids=None),
    )


def test_a_parcel_not_taken_in_unbalances_its_shift_until_intake_judges_it(
    session: Session, world: World, pda: Pda
) -> None:
    """Rules 4 and 5 cannot judge a parcel the station does not know (its class, its
    address): a shift that handled one is not balanced on the strength of no flags.
    Once taken in, the parcel's events are judged, here a delivery without a POD."""
    (known,) = parcels(session, world, 1)
    unknown = factories.s10()
    shift = pda.open()
    pda.push([pda.event(known), pda.event(unknown)])
    pda.push([pda.event(known, "delivered"), pda.event(unknown, "delivered", pod={})])
    pda.close(shift)
    balance = shift_balance(session=session, shift=shift)
    assert balance.status == "unbalanced"
    assert [(d.kind, d.tracking_no) for d in balance.discrepancies] == [
        ("unknown_parcel", unknown)
    ]

    take_in(session, world, unknown)
    session.commit()
    balance = shift_balance(session=session, shift=shift)
    assert balance.status == "unbalanced"
    assert [(d.kind, d.tracking_no) for d in balance.discrepancies] == [
        ("delivered_without_pod", unknown)
    ]
    assert (balance.delivered, balance.delivered_without_pod) == (1, 1)


def test_one_open_shift_per_device(session: Session, world: World, pda: Pda) -> None:
    first = pda.open()
    with pytest.raises(Conflict) as info:
        pda.open()
    assert info.value.code == "shift_already_open" and str(first.id) in info.value.message


def test_lock_shifts_returns_only_the_shifts_no_longer_open_as_stored_now(
    session: Session, world: World, pda: Pda
) -> None:
    """A push locks every shift it files events under and loads only those it must
    judge again (closed or signed off), re-read: the session's copy may be stale."""
    first = pda.open()
    pda.close(first)
    second = pda.open(now=NOW + dt.timedelta(minutes=1))
    session.execute(  # signed off elsewhere: the ORM copy of ``first`` still says closed
        update(Shift)
        .where(Shift.id == first.id)
        .values(status=ShiftStatus.SIGNED_OFF)
        .execution_options(synchronize_session=False)
    )
    assert first.status == ShiftStatus.CLOSED
    locked = shifts.lock_shifts(session, [second.id, first.id, first.id])
    assert list(locked) == [first.id]
    assert locked[first.id] is first and first.status == ShiftStatus.SIGNED_OFF
    assert shifts.lock_shifts(session, [second.id]) == {}


def test_a_push_reads_the_shifts_near_it_not_a_year_of_them(
    session: Session, world: World, pda: Pda
) -> None:
    """A courier who used this PDA every day for a year: filing today's scans reads
    today's shift, not the 365 before it."""
    year_ago = OPENED - dt.timedelta(days=365)
    session.execute(
        insert(Shift),
        [
            shift_row(
                world,
                pda.device.id,
                opened_at=year_ago + dt.timedelta(days=day),
                closed_at=year_ago + dt.timedelta(days=day, hours=9),
                first_seq=day * 100 + 1,
                last_seq=day * 100 + 100,
            )
            | {"status": ShiftStatus.SIGNED_OFF}
            for day in range(365)
        ],
    )
    # Their scans arrived: a first_seq reaches no further beyond them than a PDA's queue.
    session.execute(
        insert(DeviceSyncState).values(
            device_id=pda.device.id, max_seq=36_500, acked_through_seq=36_500, missing_ranges=[]
        )
    )
    pda.seq = 36_500
    today = pda.open(first_seq=36_501)
    scan = shifts.Filing(seq=36_501, claimed=None, occurred_at=at(1))
    filer = shifts.ShiftFiler(session, pda.device.id, world.courier.id, ShiftRules(), [scan])
    assert [w.shift_id for w in filer.windows] == [today.id]
    assert filer.file(scan) == today.id
    [number] = parcels(session, world, 1)
    assert pda.push([pda.event(number)])["results"][0]["status"] == "applied"
    filed = session.scalar(select(ScanEvent.shift_id).where(ScanEvent.seq == 36_501))
    assert filed == today.id


# A courier's shifts on one PDA over ten days, some of another courier's, and pushes
# of events around them: a shift's times in minutes from the start, its declared seqs
# optional; claims name one of the shifts or one that does not exist.
MINUTES = st.integers(min_value=0, max_value=10 * 24 * 60)
SEQS = st.integers(min_value=1, max_value=400)


def on_the_test_database(examples: int | None = None) -> settings:
    """Hypothesis settings for a property run in the test's database session: each
    example writes to the same rolled-back transaction, which is what the fixture is
    for, and an example reads and writes rows, so no deadline. ``examples``: the
    profile's count when None."""
    return settings(
        max_examples=examples if examples is not None else settings.default.max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


SHIFT_SPECS = st.lists(
    st.tuples(
        MINUTES,  # opened
        # Minutes until closed; or a server clock stepped back closed it "before" it opened.
        st.integers(min_value=1, max_value=14 * 60) | st.integers(min_value=-60, max_value=0),
        st.none() | SEQS,  # first_seq
        st.none() | st.integers(min_value=0, max_value=200),  # last_seq - (first_seq or 1)
        st.booleans(),  # the courier's own (else another courier's on the same PDA)
    ),
    max_size=25,
)


@on_the_test_database(examples=150)
@given(shift_specs=SHIFT_SPECS, data=st.data())
def test_the_filer_reads_only_the_shifts_near_a_push_and_files_as_if_it_read_them_all(
    session: Session, world: World, shift_specs: list[Any], data: st.DataObject
) -> None:
    """``ShiftFiler`` reads the shifts that may hold a push's events, not the courier's
    whole history on the PDA: every event is filed, and every claim judged, as by a
    filer given all the courier's shifts on that PDA."""
    start = NOW - dt.timedelta(days=10)
    device = factories.device(session, f"PDA-{uuid.uuid4().hex[:12]}", world.station)
    other = factories.user(session, f"other-{uuid.uuid4().hex[:8]}", "courier", world.station)
    rows = []
    for opened, length, first_seq, span, own in shift_specs:
        opened_at = start + dt.timedelta(minutes=opened)
        rows.append(
            shift_row(
                world,
                device.id,
                opened_at,
                opened_at + dt.timedelta(minutes=length),
                courier_id=None if own else other.id,
                first_seq=first_seq,
                last_seq=None if span is None else (first_seq or 1) + span,
            )
        )
    if rows and data.draw(st.booleans(), label="the last one still open"):
        rows[-1].update(status=ShiftStatus.OPEN, closed_at=None, last_seq=None)
    ids = [insert_shift(session, row) for row in rows]
    claimable = st.none() | st.sampled_from(ids + [max(ids, default=0) + 1_000])
    # Anywhere in the ten days, or within twice the filing grace of an opening or a close.
    edges = [row[key] for row in rows for key in ("opened_at", "closed_at") if row[key]]
    near_an_edge = st.tuples(
        st.sampled_from(edges or [start]), st.integers(min_value=-600, max_value=600)
    ).map(lambda edge: edge[0] + dt.timedelta(seconds=edge[1]))
    events = data.draw(
        st.lists(
            st.builds(
                shifts.Filing,
                seq=SEQS,
                claimed=claimable,
                occurred_at=MINUTES.map(lambda m: start + dt.timedelta(minutes=m)) | near_an_edge,
            ),
            min_size=1,
            max_size=6,
        ),
        label="events",
    )
    rules = ShiftRules()
    filer = shifts.ShiftFiler(session, device.id, world.courier.id, rules, events)
    everything = shifts.ShiftFiler(session, device.id, world.courier.id, rules, [])
    own = sorted(
        (
            {**row, "id": id}
            for row, id in zip(rows, ids, strict=True)
            if row["courier_id"] == world.courier.id
        ),
        key=lambda r: (r["opened_at"], r["id"]),
    )
    on_the_pda = sorted(
        ({**row, "id": id} for row, id in zip(rows, ids, strict=True)),
        key=lambda r: (r["opened_at"], r["id"]),
    )
    before = {r["id"]: p for p, r in zip([None, *on_the_pda], on_the_pda, strict=False)}
    everything.windows = []
    for i, r in enumerate(own):  # a shift closed with its seqs left open ends at the next
        left_open = r["closed_at"] and r["first_seq"] is not None and r["last_seq"] is None
        bound = own[i + 1] if left_open and i + 1 < len(own) else None
        previous = before[r["id"]]  # any courier's: where an undeclared first seq starts
        everything.windows.append(
            shifts._Window(
                r["id"],
                r["opened_at"],
                r["closed_at"],
                r["first_seq"],
                r["last_seq"],
                next_opened_at=bound and bound["opened_at"],
                next_first_seq=bound and bound["first_seq"],
                previous_id=previous and previous["id"],
                previous_last_seq=previous and previous["last_seq"],
            ).with_first_seq_derived()
        )
    everything.own = {w.shift_id for w in everything.windows}
    assert len(filer.windows) <= len(everything.windows)
    assert [filer.file(e) for e in events] == [everything.file(e) for e in events]
    assert filer.wrong_claims == everything.wrong_claims
    for filing in events:  # alone: the push's bounds are the event's own
        alone = shifts.ShiftFiler(session, device.id, world.courier.id, rules, [filing])
        assert alone.file(filing) == everything.file(filing)


@pytest.mark.parametrize(
    ("opened", "closed"),
    [(3, -10), (10, -2)],
    ids=["opened-just-after", "closed-just-before"],
)
def test_a_shift_closed_before_it_opened_still_takes_the_scans_near_either_end(
    session: Session, world: World, pda: Pda, opened: int, closed: int
) -> None:
    """A server clock stepped back between opening and closing leaves a shift closed
    "before" it opened. A scan a few minutes (within the filing grace) before its
    opening, or after its close, is still filed under it, as it was when the filer read
    every shift: the bounded read must not assume the close comes after the opening."""
    scan_at = NOW - dt.timedelta(days=1)
    shift_id = insert_shift(
        session,
        shift_row(
            world,
            pda.device.id,
            opened_at=scan_at + dt.timedelta(minutes=opened),
            closed_at=scan_at + dt.timedelta(minutes=closed),
        ),
    )
    scan = shifts.Filing(seq=1, claimed=None, occurred_at=scan_at)
    filer = shifts.ShiftFiler(session, pda.device.id, world.courier.id, ShiftRules(), [scan])
    assert filer.file(scan) == shift_id


def test_first_seq_must_not_reach_into_an_earlier_shift(
    session: Session, world: World, pda: Pda
) -> None:
    (a,) = parcels(session, world, 1)
    first = pda.open()
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    pda.close(first)
    with pytest.raises(Conflict) as info:
        pda.open(first_seq=2, now=NOW + dt.timedelta(minutes=1))
    assert info.value.code == "first_seq_used"
    assert pda.open(first_seq=3, now=NOW + dt.timedelta(minutes=1)).first_seq == 3


@pytest.mark.parametrize(
    "case", ["after the close", "before the close", "named by the PDA"], ids=lambda c: c
)
def test_first_seq_takes_what_a_shift_closed_without_its_last_seq_held_after_its_close(
    session: Session, world: World, pda: Pda, case: str
) -> None:
    """The previous shift declared its first seq and left its last open, and holds a
    scan by seq. The next shift's first seq says where the previous one ended (rule
    2): a scan recorded after the close is the new shift's, as it would be had it come
    after the opening. One recorded before the close, or that the PDA itself filed
    under the previous shift, cannot be the new shift's: a conflict."""
    a, b = parcels(session, world, 2)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    when = NOW + dt.timedelta(minutes=2) if case == "after the close" else at(30)
    named = {"shift_id": first.id} if case == "named by the PDA" else {}
    if case == "before the close":
        pda.push([pda.event(b, occurred_at=when)])
        first = pda.close(first)
    else:
        first = pda.close(first)  # at NOW, no last_seq
        pda.push(
            [pda.event(b, occurred_at=when, **named)], received_at=NOW + dt.timedelta(minutes=2)
        )
    assert session.scalars(select(ScanEvent.shift_id).where(ScanEvent.seq == 3)).one() == (
        first.id
    )
    assert handover_flags(session, first) == {("missing_at_handover", b): FlagStatus.OPEN}
    with pytest.raises(Conflict) as info:  # its own first seq: it would lose everything
        pda.open(first_seq=1, now=NOW + dt.timedelta(minutes=3))
    assert info.value.code == "first_seq_used"
    if case != "after the close":
        with pytest.raises(Conflict) as info:
            pda.open(first_seq=3, now=NOW + dt.timedelta(minutes=3))
        assert info.value.code == "first_seq_used"
        return
    second = pda.open(first_seq=3, now=NOW + dt.timedelta(minutes=3))
    filed = dict(session.execute(select(ScanEvent.seq, ScanEvent.shift_id)).all())
    assert filed == {1: first.id, 2: first.id, 3: second.id}
    assert handover_flags(session, first) == {("missing_at_handover", b): FlagStatus.CLOSED}
    assert shift_balance(session=session, shift=first).status == "balanced"
    assert shift_balance(session=session, shift=second).checked_out == 1


def test_events_sent_before_the_shift_from_its_first_seq_on_are_filed_under_it(
    session: Session, world: World, pda: Pda
) -> None:
    """Check-outs scanned before the PDA could reach the server to open its shift."""
    (a,) = parcels(session, world, 1)
    pda.push([pda.event(a, occurred_at=OPENED - dt.timedelta(minutes=40))])
    shift = pda.open(first_seq=1)
    assert shift_balance(session=session, shift=shift).checked_out == 1


def test_a_last_seq_below_the_shifts_own_events_is_refused(
    session: Session, world: World, pda: Pda
) -> None:
    (a,) = parcels(session, world, 1)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    with pytest.raises(InvalidInput) as info:
        pda.close(shift, last_seq=1)
    assert (info.value.code, info.value.field) == ("invalid_last_seq", "last_seq")
    assert pda.close(shift, last_seq=2).status == ShiftStatus.CLOSED


def test_a_last_seq_before_the_last_seq_the_previous_shift_declared_is_refused(
    session: Session, world: World, pda: Pda
) -> None:
    """The first shift declared last_seq 2; the next, opened without a first_seq, owns
    from seq 3. Closing it with last_seq 1 would leave its seqs nowhere: its scans,
    pushed later, would be filed under no shift and its balance would read balanced
    with nothing checked out. Refused, as a last_seq before a declared first_seq is;
    last_seq 2 (nothing scanned in it) is accepted."""
    (a,) = parcels(session, world, 1)
    first = pda.open()
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    pda.close(first, last_seq=2)
    second = pda.open(now=NOW + dt.timedelta(minutes=1))
    with pytest.raises(InvalidInput) as info:
        pda.close(second, last_seq=1, now=NOW + dt.timedelta(hours=2))
    assert (info.value.code, info.value.field) == ("invalid_last_seq", "last_seq")
    session.rollback()
    second = pda.close(second, last_seq=2, now=NOW + dt.timedelta(hours=2))
    assert shift_balance(session=session, shift=second).status == "balanced"


def test_closing_twice_is_idempotent_but_not_with_another_last_seq(
    session: Session, world: World, pda: Pda
) -> None:
    shift = pda.open()
    closed = pda.close(shift, last_seq=5)
    assert pda.close(shift, last_seq=5).closed_at == closed.closed_at
    assert pda.close(shift).status == ShiftStatus.CLOSED
    with pytest.raises(Conflict) as info:
        pda.close(shift, last_seq=6)
    assert info.value.code == "shift_already_closed"


def close_for_courier(session: Session, world: World, shift: Shift, now: dt.datetime) -> Shift:
    """A manager closes the shift of a PDA that has not come back (no last seq)."""
    closed = shifts.close_shift(session=session, shift=shift, closed_by=world.manager.id, now=now)
    session.commit()
    return closed


def test_a_pda_declares_its_last_seq_after_a_managers_close_and_its_late_returns_count(
    session: Session, world: World, pda: Pda
) -> None:
    """At 12:00 a manager closed the shift of a PDA still out of range (no last seq);
    at 12:20 the courier, back, scanned the two undelivered parcels in at the counter,
    the PDA pushed them and closed the shift declaring its last seq. The returns came
    more than five minutes after the close, so by time they are no shift's: the two
    parcels showed missing_at_handover, and the PDA's close was refused (409), leaving
    nobody a way to account for them. Had the PDA closed first, they were the shift's
    by seq (rule 3). The PDA's last seq is taken: the returns are filed under the shift,
    it balances, and the audit log says the courier declared it after the logged close."""
    a, b = parcels(session, world, 2)
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(b)])
    closed_at = NOW - dt.timedelta(minutes=40)
    close_for_courier(session, world, shift, closed_at)
    assert shift_balance(session=session, shift=shift).missing == 2
    returns = [
        pda.event(n, "returned_to_station", occurred_at=closed_at + dt.timedelta(minutes=20))
        for n in (a, b)
    ]
    pda.push(returns)
    assert shift_balance(session=session, shift=shift).missing == 2  # no shift's, by time
    closed = pda.close(shift, last_seq=4)
    assert (closed.last_seq, closed.closed_by, closed.closed_at) == (
        4,
        world.manager.id,
        closed_at,
    )
    balance = shift_balance(session=session, shift=shift)
    assert (balance.status, balance.returned, balance.missing) == ("balanced", 2, 0)
    flags = session.scalars(select(Flag.status).where(Flag.kind == MISSING_KIND)).all()
    assert set(flags) == {FlagStatus.CLOSED}
    entry = session.scalars(
        select(AuditEntry).where(AuditEntry.action == shifts.LAST_SEQ_DECLARED)
    ).one()
    assert entry.actor_id == world.courier.id
    assert entry.details["last_seq"] == 4 and len(entry.details["events_taken"]) == 2
    assert pda.close(shift, last_seq=4).last_seq == 4  # a retry answers the same
    with pytest.raises(Conflict):
        pda.close(shift, last_seq=5)


@pytest.mark.parametrize("settled_by", ["sign-off", "sign-off, then reopened", "next shift"])
def test_a_last_seq_after_a_close_without_one_is_refused_once_the_shift_is_settled(
    session: Session, world: World, pda: Pda, settled_by: str
) -> None:
    """A manager closed the shift of a dead PDA; the PDA declares its last seq only after
    the shift was signed off, or after it opened its next shift: what the shift owns
    was settled by then, and the refusal says when a last seq can still be given. A
    shift reopened since its sign-off (a late event of its own) was signed off all the
    same: declared before the late event's push, the last seq was refused (rule 3)."""
    shift = close_for_courier(session, world, pda.open(), NOW - dt.timedelta(hours=1))
    if settled_by.startswith("sign-off"):
        sign_off(session, world, shift)
        if settled_by.endswith("reopened"):
            (a,) = parcels(session, world, 1)
            pda.push([pda.event(a, shift_id=shift.id)], received_at=NOW + dt.timedelta(hours=1))
            session.refresh(shift)
            assert (shift.status, shift.reopened_count) == (ShiftStatus.CLOSED, 1)
    else:
        pda.open(now=NOW - dt.timedelta(minutes=30))
    with pytest.raises(Conflict) as info:
        pda.close(shift, last_seq=6)
    assert info.value.code == "shift_already_closed"
    assert info.value.message == (
        f"shift {shift.id} was closed without a last_seq; it can be given one only by its "
        "courier's PDA, before a sign-off and before the PDA's next shift"
    )


def sign_off(session: Session, world: World, shift: Shift, **kw: Any) -> Shift:
    kw.setdefault("note", "all accounted for")
    signed = shifts.sign_off(session=session, shift=shift, user_id=world.manager.id, now=NOW, **kw)
    session.commit()
    return signed


def test_a_reopenings_audit_entry_names_what_reopened_it_once(
    session: Session, world: World, pda: Pda
) -> None:
    """The ``shift_reopened`` entry records the events (and rejected events) that
    reopened the shift, with the sign-off they came after, once each: it stored them
    at the top and again under ``latest_reopening``, a copy of the same ids that the
    chain hashes and an auditor reads twice."""
    (a,) = parcels(session, world, 1)
    shift = pda.open()
    pda.push([pda.event(a)])
    shift = sign_off(session, world, pda.close(shift), note="a is out")
    pda.push(
        [pda.event(a, "returned_to_station", shift_id=shift.id), pda.event(a, colour="red")],
        received_at=NOW + dt.timedelta(hours=1),
    )
    late = session.scalars(select(ScanEvent.id).where(ScanEvent.seq == 2)).one()
    flag = session.scalars(select(Flag).where(Flag.kind == "late_event_after_signoff")).one()
    rejected = flag.evidence["rejected_event_ids"]
    assert len(rejected) == 1
    entry = session.scalars(select(AuditEntry).where(AuditEntry.action == "shift_reopened")).one()
    assert entry.details == {
        "station_id": world.station.id,
        "reason": "late_event_after_signoff",
        "event_ids": [late],
        "rejected_event_ids": rejected,
        "signed_off_at": NOW.isoformat(),
        "signed_off_by": world.manager.id,
    }


def test_sign_off_is_refused_while_open_and_while_provisional_unless_forced(
    session: Session, world: World, pda: Pda
) -> None:
    (a,) = parcels(session, world, 1)
    shift = pda.open()
    pda.push([pda.event(a)])
    with pytest.raises(Conflict) as info:
        sign_off(session, world, shift)
    assert info.value.code == "shift_open"
    shift = pda.close(shift, last_seq=3)
    with pytest.raises(Conflict) as info:
        sign_off(session, world, shift)
    assert info.value.code == "balance_provisional" and "2, 3" in info.value.message
    with pytest.raises(InvalidInput):
        sign_off(session, world, shift, note="  ")
    signed = sign_off(session, world, shift, force_reason="PDA broken; its last batch is lost")
    assert signed.status == ShiftStatus.SIGNED_OFF
    assert signed.signoff_forced_reason == "PDA broken; its last batch is lost"
    assert signed.signoff_balance["status"] == "provisional"
    assert signed.signoff_balance["missing_seqs"] == [2, 3]
    entry = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "shift_signed_off")
    ).one()
    assert entry.subject_key == str(shift.id) and entry.actor_id == world.manager.id
    assert entry.details["balance"]["missing"] == 1
    with pytest.raises(Conflict) as info:
        sign_off(session, world, shift)
    assert info.value.code == "already_signed_off"


def test_a_sign_off_of_a_balance_gone_provisional_since_it_was_read_says_provisional(
    session: Session, world: World, pda: Pda
) -> None:
    """The manager read the shift balanced; the PDA then pushes seq 4 and not seq 3, a
    seq of that shift (closed without its last seq) still on the PDA. The shift's page
    refused the sign-off as ``balance_changed`` ("read it again") and only the next try,
    with the balance read again, said provisional; the board's sign-off together names
    it provisional at once. The real reason comes first now: the seq still on the PDA,
    to wait for, write off or force past. A forced sign-off still signs only the balance
    it was shown."""
    a, b = parcels(session, world, 2)
    first = pda.open()
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    first = pda.close(first)
    pda.open(now=NOW + dt.timedelta(minutes=30))
    read = balances_module.balance_version(shift_balance(session=session, shift=first))
    assert shift_balance(session=session, shift=first).status == "balanced"
    pda.seq += 1  # seq 3 stays on the PDA
    pda.push(
        [pda.event(b, occurred_at=NOW + dt.timedelta(minutes=40))],
        received_at=NOW + dt.timedelta(hours=1),
    )
    now = shift_balance(session=session, shift=first)
    assert (now.status, now.missing_seqs) == ("provisional", [3])

    with pytest.raises(Conflict) as refused:
        sign_off(session, world, first, seen_version=read)
    assert refused.value.code == "balance_provisional" and "seq 3" in refused.value.message
    session.rollback()
    with pytest.raises(Conflict) as refused:
        sign_off(session, world, first, seen_version=read, force_reason="PDA reset")
    assert refused.value.code == "balance_changed"
    session.rollback()
    signed = sign_off(
        session,
        world,
        first,
        seen_version=balances_module.balance_version(now),
        force_reason="PDA reset",
    )
    assert signed.status == ShiftStatus.SIGNED_OFF
    assert signed.signoff_balance["missing_seqs"] == [3]


def test_an_event_after_sign_off_reopens_the_shift_with_a_flag(
    session: Session, world: World, pda: Pda
) -> None:
    a, b = parcels(session, world, 2)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b), pda.event(a, "delivered")])
    shift = pda.close(shift)
    sign_off(session, world, shift, note="b is missing; searching")
    receipt = pda.push(
        [pda.event(b, "returned_to_station", shift_id=shift.id)],
        received_at=NOW + dt.timedelta(hours=1),
    )
    session.refresh(shift)
    assert shift.status == ShiftStatus.CLOSED and shift.reopened_count == 1
    flag = session.scalars(select(Flag).where(Flag.kind == "late_event_after_signoff")).one()
    assert flag.shift_id == shift.id and flag.status == FlagStatus.OPEN
    late_event = session.scalars(select(ScanEvent.id).where(ScanEvent.seq == pda.seq)).one()
    assert flag.evidence["event_ids"] == [late_event]
    assert flag.id in {f["flag_id"] for f in receipt["flags_raised"]}
    assert shift_balance(session=session, shift=shift).status == "balanced"
    actions = list(session.scalars(select(AuditEntry.action).order_by(AuditEntry.id)))
    # and the missing parcel's flag closed by its return
    assert actions == ["shift_signed_off", "shift_reopened", "flag_status_changed"]
    # Signed off again, then another late event: the resolved flag opens again.
    flags_resolved = session.get(Flag, flag.id)
    from sync.flags import resolve_flag

    resolve_flag(session=session, flag=flags_resolved, user_id=world.manager.id, note="seen")
    session.commit()
    sign_off(session, world, shift, note="found")
    pda.push(
        [pda.event(b, "exception", reason="damaged", shift_id=shift.id)],
        received_at=NOW + dt.timedelta(hours=2),
    )
    session.refresh(shift)
    assert shift.reopened_count == 2
    assert session.get(Flag, flag.id).status == FlagStatus.OPEN


def test_a_repeated_scan_after_sign_off_reopens_the_shift_but_no_flag_decided_on_it(
    session: Session, world: World, pda: Pda
) -> None:
    """The express parcel left in the locker without consent: the manager resolved its
    ``unauthorized_locker_drop`` and signed the shift off. The PDA then pushes the
    compartment's second tap. The drop the manager judged is unchanged, so its flag
    stays resolved (it cites the tap as a repeat); the shift reopens all the same (rule
    5: an event after the sign-off reopens it; the balance signed off names the drop's
    latest scan as the one settling the parcel)."""
    (a,) = parcels(session, world, 1)
    shift = pda.open()
    drop = {"locker_id": "L-1", "compartment": "7", "pod": {"pickup_code": "1234"}}
    pda.push([pda.event(a), pda.event(a, "delivered_to_locker", **drop)])
    shift = pda.close(shift)
    flag = session.scalars(select(Flag).where(Flag.kind == "unauthorized_locker_drop")).one()
    from sync.flags import resolve_flag

    resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="called: agreed")
    session.commit()
    sign_off(session, world, shift, note="drop settled with the recipient")
    pda.push(
        [pda.event(a, "delivered_to_locker", shift_id=shift.id, **drop)],
        received_at=NOW + dt.timedelta(hours=1),
    )
    session.refresh(flag)
    assert flag.status == FlagStatus.RESOLVED
    assert [r["event_id"] for r in flag.evidence["repeated_scans"]] == [
        session.scalars(select(ScanEvent.id).where(ScanEvent.seq == pda.seq)).one()
    ]
    session.refresh(shift)
    assert shift.status == ShiftStatus.CLOSED and shift.reopened_count == 1
    late = session.scalars(select(Flag).where(Flag.kind == "late_event_after_signoff")).one()
    assert late.status == FlagStatus.OPEN


NEIGHBOUR_SPECS = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=1),  # which of two PDAs
        st.integers(min_value=0, max_value=4),  # opened, in hours: ties are likely
        st.sampled_from(list(ShiftStatus)),
        st.none() | st.integers(min_value=1, max_value=30),  # first_seq
        st.none() | st.integers(min_value=1, max_value=30),  # last_seq
        st.booleans(),  # the world's courier's (else another courier's)
        st.none() | st.integers(min_value=1, max_value=30),  # its lowest event's seq
    ),
    min_size=1,
    max_size=8,
)


@on_the_test_database(examples=100)
@given(specs=NEIGHBOUR_SPECS, data=st.data())
def test_a_balance_bounds_a_shift_by_its_neighbours_on_the_pdas_whole_timeline(
    session: Session, world: World, specs: list[Any], data: st.DataObject
) -> None:
    """``_neighbour_bounds`` reads each shift's previous and next shift on its PDA (any
    courier's, in the order they opened, ties by id) with one probe each: the bounds
    are those of the PDAs' whole timelines, for any subset of shifts asked about."""
    other = factories.user(session, f"other-{uuid.uuid4().hex[:8]}", "courier", world.station)
    devices = [
        factories.device(session, f"PDA-{uuid.uuid4().hex[:12]}", world.station).id
        for _ in range(2)
    ]
    rows, lowest, has_open = [], {}, set()
    for pda, hours, status, first_seq, last_seq, own, low in specs:
        if status == ShiftStatus.OPEN and pda in has_open:
            status = ShiftStatus.CLOSED  # one open shift per PDA
        has_open.update([pda] if status == ShiftStatus.OPEN else [])
        opened_at = NOW + dt.timedelta(hours=hours)
        row = shift_row(
            world,
            devices[pda],
            opened_at,
            None if status == ShiftStatus.OPEN else opened_at + dt.timedelta(minutes=30),
            courier_id=None if own else other.id,
            first_seq=first_seq,
            last_seq=last_seq,
        ) | {"status": status}
        row["id"] = insert_shift(session, row)
        rows.append(row)
        if low is not None:
            lowest[row["id"]] = low
    timeline = sorted(rows, key=lambda r: (r["device_id"], r["opened_at"], r["id"]))
    before: dict[int, dict[str, Any] | None] = {}
    after: dict[int, dict[str, Any] | None] = {}
    for earlier, later in zip([None, *timeline], [*timeline, None], strict=True):
        same_pda = earlier and later and earlier["device_id"] == later["device_id"]
        if later is not None:
            before[later["id"]] = earlier if same_pda else None
        if earlier is not None:
            after[earlier["id"]] = later if same_pda else None
    asked = data.draw(st.sets(st.sampled_from([r["id"] for r in rows]), min_size=1))
    next_starts, previous_ends = {}, {}
    for row in rows:
        if row["id"] not in asked:
            continue
        following, preceding = after[row["id"]], before[row["id"]]
        if row["status"] != ShiftStatus.OPEN and row["last_seq"] is None and following:
            start = following["first_seq"] or lowest.get(following["id"])
            if start is not None:
                next_starts[row["id"]] = start
        if row["first_seq"] is None:
            if preceding is None:
                previous_ends[row["id"]] = 0
            elif preceding["last_seq"] is not None:
                previous_ends[row["id"]] = preceding["last_seq"]
    shifts = session.scalars(select(Shift).where(Shift.id.in_(asked))).all()
    assert balances_module._neighbour_bounds(session, shifts, lowest) == (
        next_starts,
        previous_ends,
    )


def test_a_first_seq_inside_the_last_seq_a_predecessor_declared_is_a_conflict(
    session: Session, world: World, pda: Pda
) -> None:
    """The first shift opened without a first_seq and closed declaring last_seq 3,
    scanned two minutes after the close: a next opening declaring first_seq 3
    contradicts the PDA's own declaration, and takes nothing from that shift."""
    a, b = parcels(session, world, 2)
    first = pda.open()
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    first = pda.close(first, last_seq=3)
    pda.push(
        [pda.event(b, occurred_at=NOW + dt.timedelta(minutes=2))],
        received_at=NOW + dt.timedelta(minutes=3),
    )
    assert session.scalars(select(ScanEvent.shift_id).where(ScanEvent.seq == 3)).one() == (
        first.id
    )
    with pytest.raises(Conflict) as info:
        pda.open(first_seq=3, now=NOW + dt.timedelta(minutes=10))
    assert info.value.code == "first_seq_used"


def test_a_signed_off_shift_whose_gap_the_next_opening_widens_beyond_the_seqs_shown_is_reopened(
    session: Session, world: World, pda: Pda
) -> None:
    """A PDA lost a batch (seqs 3 to 149) and its shift, closed without a last seq, was
    signed off provisional with that reason. The next opening declares first seq 400:
    seqs 151 to 399 are the signed-off shift's too and still on the PDA, 249 more than
    the manager signed off. Only the first 100 missing seqs are listed, and those are
    the same: the count is what changed, and the shift must reopen (d2d1ed2)."""
    (a,) = parcels(session, world, 1)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "out_for_delivery")])
    pda.seq = 149
    pda.push([pda.event(a, "returned_to_station")])  # seq 150
    first = pda.close(first)
    first = sign_off(session, world, first, force_reason="batch 3-149 lost")
    signed = first.signoff_balance
    assert (signed["status"], signed["missing_seq_count"]) == ("provisional", 147)
    pda.open(first_seq=400, now=NOW + dt.timedelta(hours=12))
    session.refresh(first)
    balance = shift_balance(session=session, shift=first)
    assert balance.missing_seq_count == 147 + 249
    assert balance.missing_seqs == signed["missing_seqs"]  # the 100 shown: unchanged
    assert (first.status, first.reopened_count) == (ShiftStatus.CLOSED, 1)


def test_a_resolved_handover_flag_closes_with_its_cause_and_opens_on_new_events(
    session: Session, world: World, pda: Pda
) -> None:
    """README: when the events change what happened, the system closes the flag, resolved
    or not; should the cause come back on the events the manager resolved it on, it is
    resolved again, on new events it opens. A parcel missing at handover, resolved by the
    manager, then returned by a late batch: the flag closes. Checked out again (a new
    event the manager never saw) and missing once more: the flag opens, not silently
    resolved. The return voided instead: resolved again, as the manager decided."""
    from sync.flags import flag_changes, resolve_flag

    a, b = parcels(session, world, 2)
    shift = pda.open(first_seq=1)
    checkouts = [pda.event(a), pda.event(b)]
    returns = [pda.event(a, "returned_to_station"), pda.event(b, "returned_to_station")]
    again = pda.event(a)
    pda.push(checkouts)
    shift = pda.close(shift, last_seq=5)
    for flag in session.scalars(select(Flag).where(Flag.shift_id == shift.id)):
        resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="lost")
    session.commit()
    pda.push(returns)
    assert handover_flags(session, shift) == {
        (MISSING_KIND, a): FlagStatus.CLOSED,
        (MISSING_KIND, b): FlagStatus.CLOSED,
    }
    assert shift_balance(session=session, shift=shift).discrepancies == []
    undo_b = pda.void(returns[1])  # seq 6: the correction voiding b's return
    pda.push([again])
    pda.push([undo_b])
    assert handover_flags(session, shift) == {
        (MISSING_KIND, a): FlagStatus.OPEN,  # missing again after a new check-out
        (MISSING_KIND, b): FlagStatus.RESOLVED,  # back on the events the manager saw
    }
    flag_b = session.scalars(
        select(Flag).where(Flag.shift_id == shift.id, Flag.subject_key.endswith(b))
    ).one()
    assert [c.to_status for c in flag_changes(session=session, flag=flag_b)] == [
        FlagStatus.OPEN,
        FlagStatus.RESOLVED,
        FlagStatus.CLOSED,
        FlagStatus.RESOLVED,
    ]


def a_missing_flag_resolved(
    session: Session, world: World, pda: Pda, *, last_seq: int
) -> tuple[str, Shift, Flag]:
    """A parcel checked out and never seen again, its shift closed, and the manager's
    resolution of its missing flag ("lost")."""
    from sync.flags import resolve_flag

    (a,) = parcels(session, world, 1)
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a)])
    shift = pda.close(shift, last_seq=last_seq)
    (flag,) = session.scalars(select(Flag).where(Flag.shift_id == shift.id))
    resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="lost")
    session.commit()
    return a, shift, flag


@pytest.mark.parametrize("pushed", ["together", "apart"])
def test_a_resolved_missing_flag_opened_on_a_mis_tap_is_resolved_again_once_it_is_voided(
    session: Session, world: World, pda: Pda, pushed: str
) -> None:
    """Rule 3: a scan of the missing parcel after the manager resolved its flag, and the
    correction voiding it, end the same pushed together or apart. Apart, the scan opens
    the flag (new events); voided, the cause stands on the events the manager resolved
    it on again, and it is resolved again, as pushed together it stayed."""
    from sync.flags import flag_changes

    a, shift, flag = a_missing_flag_resolved(session, world, pda, last_seq=3)
    scan = pda.event(a, "out_for_delivery")
    undo = pda.void(scan)
    if pushed == "together":
        pda.push([scan, undo])
    else:
        pda.push([scan])
        assert handover_flags(session, shift) == {(MISSING_KIND, a): FlagStatus.OPEN}
        pda.push([undo])
    assert handover_flags(session, shift) == {(MISSING_KIND, a): FlagStatus.RESOLVED}
    session.refresh(flag)
    if pushed == "apart":
        assert [c.to_status for c in flag_changes(session=session, flag=flag)][-2:] == [
            FlagStatus.OPEN,
            FlagStatus.RESOLVED,
        ]


def test_a_withdrawn_reopening_leaves_the_resolved_missing_flag_resolved(
    session: Session, world: World, pda: Pda
) -> None:
    """The parcel is missing, its flag resolved, the shift signed off. A check-out of it
    scanned in the grace after the close reopens the shift and opens the flag (new
    events); the next shift opens and takes the check-out: the reopening is withdrawn,
    and the flag is resolved again, as it would have stayed had the check-out come
    after the opening."""
    from sync.flags import resolve_flag

    (a,) = parcels(session, world, 1)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a)])
    first = pda.close(first)
    (flag,) = session.scalars(select(Flag).where(Flag.shift_id == first.id))
    resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="lost")
    session.commit()
    first = sign_off(session, world, first)
    again = pda.event(a, occurred_at=NOW + dt.timedelta(minutes=4))
    pda.push([again], received_at=NOW + dt.timedelta(minutes=4, seconds=30))
    session.refresh(first)
    session.refresh(flag)
    assert (first.status, flag.status) == (ShiftStatus.CLOSED, FlagStatus.OPEN)
    second = pda.open(now=NOW + dt.timedelta(minutes=5))
    assert session.scalars(select(ScanEvent.shift_id).where(ScanEvent.seq == 2)).one() == (
        second.id
    )
    session.refresh(first)
    session.refresh(flag)
    assert (first.status, flag.status) == (ShiftStatus.SIGNED_OFF, FlagStatus.RESOLVED)


def test_a_resolved_not_on_manifest_flag_opened_on_new_events_says_so(
    session: Session, world: World, pda: Pda
) -> None:
    """Its history speaks of an outcome off the manifest, not of a missing parcel."""
    from sync.flags import flag_changes, resolve_flag

    (p,) = parcels(session, world, 1)
    r = pda.open(first_seq=1, now=NOW - dt.timedelta(hours=4))
    pda.push([pda.event(p, occurred_at=NOW - dt.timedelta(hours=3))])
    pda.close(r, last_seq=1, now=NOW - dt.timedelta(hours=2, minutes=30))
    s = pda.open(first_seq=2, now=NOW - dt.timedelta(hours=2))
    pda.push([pda.event(p, "delivered", occurred_at=NOW - dt.timedelta(hours=1))])
    s = pda.close(s, last_seq=3, now=NOW - dt.timedelta(minutes=30))
    (flag,) = session.scalars(select(Flag).where(Flag.shift_id == s.id))
    assert flag.kind == "not_on_manifest"
    resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="checked")
    session.commit()
    pda.push(
        [
            pda.event(
                p,
                "delivered_to_pickup_point",
                point_id="PP-1",
                occurred_at=NOW - dt.timedelta(minutes=45),
            )
        ]
    )
    session.refresh(flag)
    assert flag.status == FlagStatus.OPEN
    note = flag_changes(session=session, flag=flag)[-1].note
    assert "missing" not in note and "not check out" in note


def test_a_balance_cites_a_parcels_rule_flags_in_one_order_however_they_were_read() -> None:
    """The database hands back a parcel's rule flags in no set order (PostgreSQL's may
    change between reads), and a signed-off shift's balance is compared with the one
    signed off, discrepancies in order: the same flags must give the same balance."""
    when = dt.datetime(2026, 11, 23, 9, 0, tzinfo=dt.UTC)

    def fact(event_id: int, event_type: EventType) -> EventFact:
        return EventFact(event_id, "PDA-1", event_id, event_type, when, uuid.uuid4(), 1)

    trails = parcel_trails(
        [
            ShiftEvent("RR1", fact(1, EventType.CHECKED_OUT)),
            ShiftEvent("RR1", fact(2, EventType.DELIVERED_TO_LOCKER)),
        ]
    )
    flags = [
        FlagRef(8, "unauthorized_locker_drop", FlagStatus.OPEN, frozenset({2})),
        FlagRef(5, "conflicting_final_outcome", FlagStatus.OPEN, frozenset({2})),
    ]
    seqs = ShiftSeqs(ShiftStatus.CLOSED, 1, 2, 2, [])

    def judged(read: list[FlagRef]) -> dict[str, Any]:
        return compute_balance(
            shift_id=1, trails=trails, rule_flags={"RR1": read}, handover_flags={}, seqs=seqs
        ).snapshot()

    assert judged(flags) == judged(flags[::-1])
    assert [d["flag_id"] for d in judged(flags)["discrepancies"]] == [5, 8]


def test_a_reopening_is_withdrawn_for_a_shift_signed_off_with_its_flags_in_another_order(
    session: Session, world: World, pda: Pda
) -> None:
    """Signed off before its rule flags were cited in id order, a shift stored them as
    the database read them: on SQLite by kind (the unique index leads with it), so an
    express drop without consent or proof stored delivered_without_pod before the
    unauthorized_locker_drop raised first. A scan just after the close reopens it and
    the next opening takes the scan: its balance is the one signed off, discrepancies
    listed in another order, and the reopening is withdrawn."""
    a, b = parcels(session, world, 2)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "delivered_to_locker", locker_id="L1", compartment="2")])
    first = sign_off(session, world, pda.close(first))
    cited = first.signoff_balance["discrepancies"]
    as_read = sorted(cited, key=lambda d: (d["tracking_no"], d["kind"]))
    assert [d["flag_id"] for d in cited] != [d["flag_id"] for d in as_read]
    session.execute(
        update(Shift)
        .where(Shift.id == first.id)
        .values(signoff_balance={**first.signoff_balance, "discrepancies": as_read})
    )
    session.commit()
    check_out = pda.event(b, occurred_at=NOW + dt.timedelta(minutes=4))
    pda.push([check_out], received_at=NOW + dt.timedelta(minutes=4, seconds=30))
    session.refresh(first)
    assert first.status == ShiftStatus.CLOSED  # reopened by what looked late
    pda.open(now=NOW + dt.timedelta(minutes=5))
    session.refresh(first)
    assert (first.status, first.reopened_count) == (ShiftStatus.SIGNED_OFF, 1)


def test_a_handover_flag_closed_after_opening_on_new_events_is_resolved_again_once_they_go(
    session: Session, world: World, pda: Pda
) -> None:
    """Rule 3: the manager resolves the missing flag; a late scan opens it (new events),
    a late return closes it; the corrections voiding both, pushed together, leave the
    cause on the events the manager resolved it on only: resolved again, as pushed
    apart (or all in one push, where the flag never moved)."""
    a, shift, flag = a_missing_flag_resolved(session, world, pda, last_seq=10)
    scan = pda.event(a, "out_for_delivery")
    back = pda.event(a, "returned_to_station")
    undo = []
    for target in (back, scan):
        undo.append(pda.void(target))
    pda.push([scan])
    assert handover_flags(session, shift) == {(MISSING_KIND, a): FlagStatus.OPEN}
    pda.push([back])
    assert handover_flags(session, shift) == {(MISSING_KIND, a): FlagStatus.CLOSED}
    pda.push(undo)
    assert handover_flags(session, shift) == {(MISSING_KIND, a): FlagStatus.RESOLVED}
    session.refresh(flag)


LATE = ("out_for_delivery", "returned_to_station", "delivered", "checked_out")


@on_the_test_database()  # the profile's count: 100, 300 in CI's SQLite pass
@given(data=st.data())
def test_a_resolved_missing_flag_ends_the_same_however_the_late_events_are_pushed(
    session: Session, world: World, data: st.DataObject
) -> None:
    """Rule 3: one PDA, a shift closed with a parcel missing, its flag resolved by the
    manager; then the same late events (scans, a return, a check-out again, corrections
    voiding some) pushed in one batch or shuffled, repeated and split into several:
    the flag ends in the same status."""
    from sync.flags import resolve_flag

    # A scan (the parcel still out) and a return (accounted for), perhaps more.
    kinds = ["out_for_delivery", "returned_to_station"]
    kinds += data.draw(st.lists(st.sampled_from(LATE), max_size=2), label="more")
    kinds = data.draw(st.permutations(kinds), label="late")
    voided = data.draw(
        st.lists(st.booleans(), min_size=len(kinds), max_size=len(kinds)), label="voided"
    )

    def run(batches: list[list[int]]) -> FlagStatus:
        device = factories.device(session, f"PDA-{uuid.uuid4().hex[:12]}", world.station)
        (a,) = parcels(session, world, 1)
        pda = Pda(session, world)
        pda.device = device
        pda.pusher = Pusher(device.id, world.station.id, world.courier.id)
        shift = pda.open(first_seq=1)
        pda.push([pda.event(a)])
        shift = pda.close(shift, last_seq=20)
        (flag,) = session.scalars(select(Flag).where(Flag.shift_id == shift.id))
        resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="lost")
        session.commit()
        late = [pda.event(a, kind) for kind in kinds]
        for target, void in zip(list(late), voided, strict=True):
            if void:
                late.append(pda.void(target))
        for batch in batches:
            pda.push([late[i] for i in batch])
        session.refresh(flag)
        return flag.status

    n = len(kinds) + sum(voided)
    assert run(draw_batchings(data, n)) == run([list(range(n))])


REPEATABLE = ("returned_to_station", "delivered_to_locker", "delivered")


@on_the_test_database()
@given(data=st.data())
def test_a_shift_with_repeated_outcomes_balances_the_same_however_they_are_pushed(
    session: Session, world: World, data: st.DataObject
) -> None:
    """Rule 3: a shift's events with final outcomes scanned again (some in another
    compartment: a second outcome), some voided, pushed in one batch or shuffled,
    repeated and split into several: the same balance, its counts adding up."""
    outcomes = data.draw(
        st.lists(
            st.tuples(st.sampled_from(REPEATABLE), st.sampled_from(["2", "3"]), st.booleans()),
            min_size=1,
            max_size=4,
        ),
        label="outcomes (type, compartment, voided)",
    )

    def run(batches: list[list[int]]) -> tuple[Any, ...]:
        device = factories.device(session, f"PDA-{uuid.uuid4().hex[:12]}", world.station)
        (a,) = parcels(session, world, 1, service_class=ServiceClass.PARCEL)
        pda = Pda(session, world)
        pda.device = device
        pda.pusher = Pusher(device.id, world.station.id, world.courier.id)
        shift = pda.open(first_seq=1)
        events = [pda.event(a)]
        for kind, compartment, _ in outcomes:
            place = {"locker_id": "L1", "compartment": compartment, "pod": {"pickup_code": "5"}}
            events.append(pda.event(a, kind, **(place if kind == "delivered_to_locker" else {})))
        for target, (*_, void) in zip(list(events[1:]), outcomes, strict=True):
            if void:
                events.append(pda.void(target))
        for batch in batches:
            pda.push([events[i] for i in batch])
        shift = pda.close(shift, last_seq=len(events))
        balance = shift_balance(session=session, shift=shift)
        assert accounted(balance) == balance.checked_out == 1
        return (
            balance.summary(),
            [(p.outcome, p.on_manifest) for p in balance.parcels],
            sorted(d.kind for d in balance.discrepancies),
        )

    n = 1 + len(outcomes) + sum(void for *_, void in outcomes)
    assert run(draw_batchings(data, n)) == run([list(range(n))])


def test_an_acknowledged_handover_flag_back_on_the_resolved_events_costs_no_query_per_push(
    session: Session, world: World, pda: Pda
) -> None:
    """Resolved, opened on a late scan, acknowledged by the manager, the scan voided: it
    stays acknowledged (the manager's latest decision, which saw the scan too). Judging
    the shift again reads no flag's history when nothing changes."""
    from sync.balances import refresh_handover_flags
    from sync.flags import acknowledge_flag

    a, shift, flag = a_missing_flag_resolved(session, world, pda, last_seq=10)
    scan = pda.event(a, "out_for_delivery")
    pda.push([scan])
    acknowledge_flag(session=session, flag=flag, user_id=world.manager.id)
    session.commit()
    undo = pda.void(scan)
    pda.push([undo])
    session.refresh(flag)
    assert flag.status == FlagStatus.ACKNOWLEDGED
    sent: list[str] = []

    def capture(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    session.expunge_all()
    connection = session.connection()
    event.listen(connection, "before_cursor_execute", capture)
    try:
        refresh_handover_flags(session=session, shifts=[session.get(Shift, shift.id)])
    finally:
        event.remove(connection, "before_cursor_execute", capture)
    assert [s for s in sent if "flag_change" in s] == []


def test_a_late_event_after_another_sign_off_opens_an_acknowledged_late_flag(
    session: Session, world: World, pda: Pda
) -> None:
    """A manager acknowledged the first reopening's flag and signed the shift off again;
    another event after that sign-off is one they never saw: the flag is open again,
    as it would be had they resolved it."""
    from sync.flags import acknowledge_flag

    a, b = parcels(session, world, 2)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b), pda.event(a, "delivered")])
    shift = pda.close(shift)
    sign_off(session, world, shift, note="b is missing; searching")
    pda.push(
        [pda.event(b, "returned_to_station", shift_id=shift.id)],
        received_at=NOW + dt.timedelta(hours=1),
    )
    flag = session.scalars(select(Flag).where(Flag.kind == "late_event_after_signoff")).one()
    acknowledge_flag(session=session, flag=flag, user_id=world.manager.id, note="on it")
    session.commit()
    sign_off(session, world, shift, note="b found")
    pda.push(
        [pda.event(b, "exception", reason="damaged", shift_id=shift.id)],
        received_at=NOW + dt.timedelta(hours=2),
    )
    session.refresh(shift)
    assert shift.status == ShiftStatus.CLOSED and shift.reopened_count == 2
    assert session.get(Flag, flag.id).status == FlagStatus.OPEN


def test_a_resolved_unknown_parcel_flag_closes_when_the_parcel_is_taken_in(
    session: Session, world: World, pda: Pda
) -> None:
    """The manager resolved the ``unknown_parcel`` flag ("taken in tomorrow"); once it
    is, its cause is gone like that of any rule flag, resolved or not: it is closed and
    no longer keeps the shift from balancing."""
    from sync.flags import resolve_flag

    unknown = factories.s10()
    shift = pda.open()
    pda.push([pda.event(unknown), pda.event(unknown, "returned_to_station")])
    shift = pda.close(shift)
    [discrepancy] = shift_balance(session=session, shift=shift).discrepancies
    assert discrepancy.kind == "unknown_parcel"
    flag = session.get(Flag, discrepancy.flag_id)
    resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="intake tomorrow")
    session.commit()

    take_in(session, world, unknown)
    session.commit()

    session.refresh(flag)
    assert flag.status == FlagStatus.CLOSED
    balance = shift_balance(session=session, shift=shift)
    assert (balance.status, balance.discrepancies) == ("balanced", [])


# -- rejected events after a sign-off ----------------------------------------------------


def late_flag(session: Session) -> Flag | None:
    return session.scalars(select(Flag).where(Flag.kind == "late_event_after_signoff")).first()


def quarantined_ids(session: Session) -> list[int]:
    return list(session.scalars(select(QuarantinedEvent.id).order_by(QuarantinedEvent.id)))


def malformed_drop(pda: Pda, tracking_no: str, **fields: Any) -> dict[str, Any]:
    """A locker drop the PDA wrote without its locker: rejected, kept in quarantine."""
    drop = pda.event(tracking_no, "delivered_to_locker", compartment="B07", **fields)
    drop.pop("locker_id", None)
    return drop


def test_a_rejected_event_of_a_signed_off_shift_reopens_it_with_a_flag(
    session: Session, world: World, pda: Pda
) -> None:
    """Signed off balanced, the parcel returned; the PDA then sends a locker drop of it
    that is rejected (no locker). The shift owns its seq (closed without its last seq:
    up to the PDA's highest), so its page lists it and the sign-off never saw it: the
    shift reopens with a late_event_after_signoff flag citing the quarantined event."""
    (a,) = parcels(session, world, 1)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    shift = sign_off(session, world, pda.close(shift))
    assert shift.signoff_balance["status"] == "balanced"
    receipt = pda.push([malformed_drop(pda, a)], received_at=NOW + dt.timedelta(hours=1))
    assert receipt["results"][0]["status"] == "rejected"
    [rejected] = quarantined_ids(session)
    session.refresh(shift)
    assert (shift.status, shift.reopened_count) == (ShiftStatus.CLOSED, 1)
    flag = late_flag(session)
    assert flag is not None and flag.shift_id == shift.id and flag.status == FlagStatus.OPEN
    assert flag.evidence["rejected_event_ids"] == [rejected]
    assert flag.evidence["event_ids"] == []
    assert flag.evidence["latest_reopening"] == {"event_ids": [], "rejected_event_ids": [rejected]}
    assert flag.id in {f["flag_id"] for f in receipt["flags_raised"]}
    actions = list(session.scalars(select(AuditEntry.action).order_by(AuditEntry.id)))
    assert actions == ["shift_signed_off", "shift_reopened"]


@pytest.mark.parametrize("separator", [None, " ", "-"])
def test_a_rejected_event_without_a_seq_naming_a_signed_off_shifts_parcel_reopens_it(
    session: Session, world: World, pda: Pda, separator: str | None
) -> None:
    """Closed with its last seq, the shift owns no later seq; a rejected event with no
    valid seq is the shift's when it names one of its parcels (as its page lists it),
    however the PDA wrote the number (``rr 4731 2482 9gb``, ``rr-4731-2482-9gb``)."""
    (a,) = parcels(session, world, 1)
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    shift = sign_off(
        session, world, pda.close(shift, last_seq=2), force_reason="the return comes later"
    )
    written = a if separator is None else factories.typed_loosely(a, separator)
    pda.push(
        [{**malformed_drop(pda, written), "seq": "three"}],
        received_at=NOW + dt.timedelta(hours=1),
    )
    [rejected] = quarantined_ids(session)
    session.refresh(shift)
    assert shift.status == ShiftStatus.CLOSED
    flag = late_flag(session)
    assert flag is not None and flag.evidence["rejected_event_ids"] == [rejected]


def test_a_rejected_event_of_the_next_shift_leaves_the_signed_off_one_alone(
    session: Session, world: World, pda: Pda
) -> None:
    """Seqs past the last seq declared are the next shift's: its rejected event is on the
    next shift's page, and the one signed off stays so."""
    (a, b) = parcels(session, world, 2)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    first = sign_off(session, world, pda.close(first, last_seq=2))
    pda.open(first_seq=3, now=NOW + dt.timedelta(minutes=10))
    pda.push(
        [pda.event(b, occurred_at=NOW + dt.timedelta(minutes=11)), malformed_drop(pda, a)],
        received_at=NOW + dt.timedelta(minutes=12),
    )
    assert len(quarantined_ids(session)) == 1
    session.refresh(first)
    assert (first.status, first.reopened_count) == (ShiftStatus.SIGNED_OFF, 0)
    assert late_flag(session) is None


def test_a_rejected_event_sent_again_after_the_sign_off_reopens_nothing(
    session: Session, world: World, pda: Pda
) -> None:
    """A rejected event sent again (same payload, another batch) is the one quarantined
    before: kept once, answered as then. Quarantined before the sign-off, the manager
    signing off had it on the shift's page; after a reopening and a new sign-off, it
    does not reopen the shift again."""
    (a,) = parcels(session, world, 1)
    shift = pda.open()
    drop = malformed_drop(pda, a)
    pda.push([pda.event(a), drop, pda.event(a, "returned_to_station")])
    shift = sign_off(session, world, pda.close(shift), note="the drop was refused; returned")
    pda.push([drop], received_at=NOW + dt.timedelta(hours=1))
    session.refresh(shift)
    assert (shift.status, shift.reopened_count) == (ShiftStatus.SIGNED_OFF, 0)
    assert late_flag(session) is None
    # Rejected after the sign-off: it reopens once, and not again when sent again.
    second = malformed_drop(pda, a)
    pda.push([second], received_at=NOW + dt.timedelta(hours=2))
    session.refresh(shift)
    assert (shift.status, shift.reopened_count) == (ShiftStatus.CLOSED, 1)
    sign_off(session, world, shift, note="seen the second drop")
    pda.push([second], received_at=NOW + dt.timedelta(hours=3))
    session.refresh(shift)
    assert (shift.status, shift.reopened_count) == (ShiftStatus.SIGNED_OFF, 1)
    assert len(quarantined_ids(session)) == 2


def test_a_seq_conflict_settled_by_the_recovery_withdraws_the_reopening_it_made(
    session: Session, world: World, pda: Pda
) -> None:
    """A PDA numbered from 1 again after the morning's shift was signed off: its first
    event of the afternoon is refused ``seq_conflict`` at a seq the morning's shift
    declared, which reopens that shift (a rejected event of it). README's recovery sends
    the event again under a new seq: held, filed under the afternoon's shift, its refusal
    settled. Nothing of the morning was lost: its reopening is withdrawn, and its page
    and board count no rejected event of it, as had the PDA numbered on; the manager at
    19:00 is not left a signed-off shift to sign off again for nothing. Refused and sent
    again in one push, it reopens nothing."""
    (a, b, c) = parcels(session, world, 3)
    morning = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    morning = sign_off(session, world, pda.close(morning, last_seq=2))
    pda.open(now=NOW + dt.timedelta(minutes=10))
    pda.seq = 0  # the app numbered from 1 again
    refused = pda.event(b, occurred_at=NOW + dt.timedelta(minutes=11))
    receipt = pda.push([refused], received_at=NOW + dt.timedelta(minutes=12))
    assert receipt["results"][0]["error"]["code"] == "seq_conflict"
    session.refresh(morning)
    assert (morning.status, morning.reopened_count) == (ShiftStatus.CLOSED, 1)

    resent = pda.push([{**refused, "seq": 3}], received_at=NOW + dt.timedelta(minutes=13))
    assert [r["status"] for r in resent["results"]] == ["applied"]
    session.refresh(morning)
    assert (morning.status, morning.reopened_count) == (ShiftStatus.SIGNED_OFF, 1)
    flag = late_flag(session)
    assert flag is not None and flag.status == FlagStatus.CLOSED
    actions = list(session.scalars(select(AuditEntry.action).order_by(AuditEntry.id)))
    assert actions[-2:] == ["shift_reopening_withdrawn", "flag_status_changed"]
    [withdrawn] = list_entries(session=session, action="shift_reopening_withdrawn")
    assert "held since under new seqs" in withdrawn.details["reason"], withdrawn.details
    read = balances_module.read_handovers(session, [morning], station_id=world.station.id)
    assert read[morning.id].rejected_events == 0

    pda.seq = 1  # again, refused and sent again in one push
    again = pda.event(c, occurred_at=NOW + dt.timedelta(minutes=14))
    both = pda.push([again, {**again, "seq": 4}], received_at=NOW + dt.timedelta(minutes=15))
    assert [r["status"] for r in both["results"]] == ["rejected", "applied"]
    session.refresh(morning)
    assert (morning.status, morning.reopened_count) == (ShiftStatus.SIGNED_OFF, 1)


def test_a_late_event_and_a_rejected_one_in_one_push_reopen_the_shift_once(
    session: Session, world: World, pda: Pda
) -> None:
    (a, b) = parcels(session, world, 2)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b), pda.event(a, "returned_to_station")])
    shift = sign_off(session, world, pda.close(shift), note="b is missing; searching")
    late = pda.event(b, "returned_to_station", shift_id=shift.id)
    pda.push([late, malformed_drop(pda, a)], received_at=NOW + dt.timedelta(hours=1))
    session.refresh(shift)
    assert shift.reopened_count == 1
    late_id = session.scalars(select(ScanEvent.id).where(ScanEvent.seq == late["seq"])).one()
    flag = late_flag(session)
    assert flag is not None
    assert (flag.evidence["event_ids"], flag.evidence["rejected_event_ids"]) == (
        [late_id],
        quarantined_ids(session),
    )


def test_a_rejected_event_reopens_a_signed_off_shift_after_a_decision_on_its_late_events(
    session: Session, world: World, pda: Pda
) -> None:
    """The late flag was resolved on the late events it named; a rejected event after the
    next sign-off opens it again, its evidence_version changed: a decision on the version
    read before it is refused."""
    from sync.flags import evidence_version, resolve_flag

    (a, b) = parcels(session, world, 2)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b), pda.event(a, "returned_to_station")])
    shift = sign_off(session, world, pda.close(shift), note="b is missing; searching")
    pda.push([pda.event(b, "returned_to_station", shift_id=shift.id)], received_at=at(300))
    flag = late_flag(session)
    assert flag is not None
    read = evidence_version(flag.evidence)
    resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="b found")
    session.commit()
    sign_off(session, world, shift, note="found")
    pda.push([malformed_drop(pda, a)], received_at=at(400))
    session.refresh(flag)
    assert flag.status == FlagStatus.OPEN
    assert evidence_version(flag.evidence) != read
    with pytest.raises(Conflict) as refused:
        resolve_flag(
            session=session, flag=flag, user_id=world.manager.id, note="seen", seen_version=read
        )
    assert refused.value.code == "evidence_changed"


def test_a_push_quarantining_an_event_of_the_open_shift_costs_one_statement_at_most(
    session: Session, world: World, pda: Pda
) -> None:
    """What may own a quarantined event is found in the statement that locks the push's
    shifts (``sync.shifts.may_own_rejected``): a push with valid events and a rejected
    one reads shifts in two statements (filing, locking), one with valid events only in
    as many on PostgreSQL, one fewer on SQLite (its open shift needs no lock there:
    ``lock_shifts``), one with rejected events only in one. The shift signed off before
    is not read again (its last seq lies below), nor is any shift's balance gathered."""
    from tests.sync.test_ingest import statements_sent

    (a, b) = parcels(session, world, 2)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    sign_off(session, world, pda.close(first, last_seq=2))
    later = NOW + dt.timedelta(minutes=10)
    pda.open(first_seq=3, now=later)
    pda.push([pda.event(b, occurred_at=later)], received_at=later)

    def reading_shifts(events: list[dict[str, Any]]) -> list[str]:
        with statements_sent(session) as statements:
            pda.push(events, received_at=later + dt.timedelta(minutes=5))
        gathered = [s for s in statements if "scan_event.shift_id IN" in s]
        assert not gathered  # no shift's balance
        return shift_reads(statements)

    valid = reading_shifts([pda.event(b, "out_for_delivery", occurred_at=later)])
    both = [pda.event(b, "out_for_delivery", occurred_at=later), malformed_drop(pda, a)]
    assert len(reading_shifts(both)) == 2  # filing, locking with what may own it
    assert len(valid) == 1 + open_shifts_locking(session)
    assert len(reading_shifts([malformed_drop(pda, b)])) == 1
    assert len(quarantined_ids(session)) == 2
    assert late_flag(session) is None


def test_a_late_push_quarantining_nothing_asks_for_no_rejected_events_of_the_shift(
    session: Session, world: World, pda: Pda
) -> None:
    """A late event reopening a signed-off shift in a push that rejected nothing: no
    rejected event of the push can be the shift's, so neither its facts are gathered
    for a rejection scope nor the push's quarantined rows read (``rejections_of_batch``)."""
    from tests.sync.test_ingest import statements_sent

    (a, b) = parcels(session, world, 2)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b), pda.event(a, "returned_to_station")])
    shift = sign_off(session, world, pda.close(shift), note="b is missing; searching")
    late = pda.event(b, "returned_to_station", shift_id=shift.id)
    with statements_sent(session) as statements:
        pda.push([late], received_at=NOW + dt.timedelta(hours=1))
    session.refresh(shift)
    assert shift.reopened_count == 1
    assert not [s for s in statements if "quarantined_event.batch_pk" in s]


# -- a gap a push shows after the sign-off -----------------------------------------------------

NEXT_DAY = NOW + dt.timedelta(hours=12)


def open_shifts_locking(session: Session) -> int:
    """The statements a push's lock of shifts its filing read open costs when nothing
    else is locked with them: none on SQLite, one on PostgreSQL (``lock_shifts``)."""
    return 0 if session.get_bind().dialect.name == "sqlite" else 1


def shift_reads(statements: list[str]) -> list[str]:
    """The statements reading shifts, but the batch's insert: it reads the highest first
    seq declared with it (one index entry, ``sync.ingest.NEW_BATCH``)."""
    return [
        s
        for s in statements
        if " FROM shift " in f"{' '.join(s.split())} "
        and not s.lstrip().startswith("INSERT INTO sync_batch")
    ]


def shift_actions(session: Session, shift: Shift) -> list[str]:
    return list(
        session.scalars(
            select(AuditEntry.action)
            .where(AuditEntry.subject_type == "shift", AuditEntry.subject_key == str(shift.id))
            .order_by(AuditEntry.id)
        )
    )


def signed_off_then_next_opened(session: Session, world: World, pda: Pda) -> tuple[Shift, str]:
    """A shift opened declaring seq 1, its parcel checked out and returned (seqs 1 and 2),
    closed without its last seq and signed off balanced; the next opened the next day
    declaring no first seq: it bounds nothing yet, and nothing is missing. A parcel for
    the next shift is returned too."""
    a, b = parcels(session, world, 2)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    first = sign_off(session, world, pda.close(first))
    assert (first.signoff_balance["status"], first.signoff_balance["missing_seqs"]) == (
        "balanced",
        [],
    )
    pda.open(now=NEXT_DAY)
    assert session.get(Shift, first.id).status == ShiftStatus.SIGNED_OFF
    return first, b


def next_days(pda: Pda, minutes: int) -> dt.datetime:
    return NEXT_DAY + dt.timedelta(minutes=minutes)


def test_a_push_showing_seqs_of_a_signed_off_shift_still_on_the_pda_reopens_it(
    session: Session, world: World, pda: Pda
) -> None:
    """The first shift's seq 3 (a scan after its return) never arrived; the next day's
    seq 4 does: seq 3 is missing, and the first shift owns it (closed without its last
    seq, its seqs end where the next shift's events start). Its balance is provisional
    now, one its manager never signed off: it reopens, as the next opening declaring
    seq 4 would have reopened it, its late flag naming the seq still on the PDA."""
    first, b = signed_off_then_next_opened(session, world, pda)
    pda.seq = 3  # seq 3 stays on the PDA
    receipt = pda.push(
        [pda.event(b, occurred_at=next_days(pda, 1))], received_at=next_days(pda, 2)
    )
    assert receipt["missing_seqs"] == [3]
    session.refresh(first)
    balance = shift_balance(session=session, shift=first)
    assert (balance.status, balance.missing_seqs) == ("provisional", [3])
    assert (first.status, first.reopened_count) == (ShiftStatus.CLOSED, 1)
    flag = late_flag(session)
    assert flag is not None and flag.shift_id == first.id and flag.status == FlagStatus.OPEN
    assert flag.evidence["latest_reopening"] == {
        "event_ids": [],
        "batch_id": receipt["batch_id"],
        "missing_seqs": [3],
    }
    assert flag.id in {f["flag_id"] for f in receipt["flags_raised"]}
    assert shift_actions(session, first) == ["shift_signed_off", "shift_reopened"]


def test_a_reopening_for_a_gap_is_withdrawn_when_its_seqs_are_the_next_shifts(
    session: Session, world: World, pda: Pda
) -> None:
    """The next shift's seq 4 arrived before its seq 3: the first shift owned seq 3 then,
    and reopened. Seq 3 arrives, the next shift's: the first shift's seqs end at 2, its
    balance is the one signed off again (pushed in order, it never reopened): the
    reopening is withdrawn, the shift signed off again and its late flag closed."""
    first, b = signed_off_then_next_opened(session, world, pda)
    checked_out = pda.event(b, occurred_at=next_days(pda, 1))  # seq 3
    returned = pda.event(b, "returned_to_station", occurred_at=next_days(pda, 2))  # seq 4
    pda.push([returned], received_at=next_days(pda, 3))
    session.refresh(first)
    assert first.status == ShiftStatus.CLOSED
    pda.push([checked_out], received_at=next_days(pda, 4))
    session.refresh(first)
    assert (first.status, first.reopened_count) == (ShiftStatus.SIGNED_OFF, 1)
    flag = late_flag(session)
    assert flag is not None and flag.status == FlagStatus.CLOSED
    assert shift_actions(session, first) == [
        "shift_signed_off",
        "shift_reopened",
        "shift_reopening_withdrawn",
    ]


def test_a_reopening_for_a_gap_is_withdrawn_when_its_seqs_are_written_off(
    session: Session, world: World, pda: Pda
) -> None:
    """Seq 3 was lost with the PDA's storage: a manager writes it off. The first shift's
    balance has no seq missing any more, the one signed off (naming the write-off): the
    reopening is withdrawn, after the write-off in the audit log."""
    from sync.lost_seqs import write_off_lost_seqs

    first, b = signed_off_then_next_opened(session, world, pda)
    pda.seq = 3
    pda.push([pda.event(b, occurred_at=next_days(pda, 1))], received_at=next_days(pda, 2))
    session.refresh(first)
    assert first.status == ShiftStatus.CLOSED
    write_off_lost_seqs(
        session=session,
        device=pda.device,
        ranges=[[3, 3]],
        reason="the PDA was reset",
        user_id=world.manager.id,
    )
    session.commit()
    session.refresh(first)
    assert (first.status, shift_balance(session=session, shift=first).written_off_seqs) == (
        ShiftStatus.SIGNED_OFF,
        [3],
    )
    flag = late_flag(session)
    assert flag is not None and flag.status == FlagStatus.CLOSED
    actions = list(session.scalars(select(AuditEntry.action).order_by(AuditEntry.id)))
    assert actions[-3:] == [
        "lost_seqs_written_off",
        "flag_status_changed",  # the late flag, closed by the withdrawal
        "shift_reopening_withdrawn",
    ]


def test_a_reopening_for_a_gap_stands_once_the_missing_seq_arrives_as_the_shifts_own(
    session: Session, world: World, pda: Pda
) -> None:
    """The first shift reopened for seq 3; seq 3 arrives, a scan of the first shift (its
    time): an event after its sign-off, which reopens it in any order. Its reopening
    now names it, and stands when a later push fills another gap of the PDA."""
    first, b = signed_off_then_next_opened(session, world, pda)
    (a,) = parcels(session, world, 1)
    lost = pda.event(a, "out_for_delivery")  # seq 3, in the first shift's time
    pda.seq = 4
    pda.push([pda.event(b, occurred_at=next_days(pda, 1))], received_at=next_days(pda, 2))
    returned = pda.event(b, "returned_to_station", occurred_at=next_days(pda, 3))  # seq 6
    pda.seq = 6
    seven = pda.event(b, "out_for_delivery", occurred_at=next_days(pda, 4))
    pda.push([seven], received_at=next_days(pda, 4))
    pda.push([lost], received_at=next_days(pda, 5))
    late_id = session.scalars(select(ScanEvent.id).where(ScanEvent.seq == 3)).one()
    session.refresh(first)
    assert first.status == ShiftStatus.CLOSED
    flag = late_flag(session)
    assert flag is not None and flag.evidence["latest_reopening"]["event_ids"] == [late_id]
    pda.push([returned], received_at=next_days(pda, 6))  # fills seq 6
    session.refresh(first)
    assert first.status == ShiftStatus.CLOSED and flag.status == FlagStatus.OPEN


def test_a_reopening_for_a_gap_stands_once_a_rejected_event_of_the_shift_arrives(
    session: Session, world: World, pda: Pda
) -> None:
    """Reopened for seq 3, the first shift then gets seq 3 rejected (a malformed locker
    drop): no seq of it is missing any more, but its rejected event came after its
    sign-off, which reopens it in any order. Its reopening names it, and stands."""
    first, b = signed_off_then_next_opened(session, world, pda)
    (a,) = parcels(session, world, 1)
    drop = malformed_drop(pda, a)  # seq 3
    pda.push([pda.event(b, occurred_at=next_days(pda, 1))], received_at=next_days(pda, 2))
    pda.push([drop], received_at=next_days(pda, 3))
    session.refresh(first)
    assert shift_balance(session=session, shift=first).missing_seqs == []
    assert first.status == ShiftStatus.CLOSED
    flag = late_flag(session)
    assert flag is not None and flag.status == FlagStatus.OPEN
    assert flag.evidence["latest_reopening"]["rejected_event_ids"] == quarantined_ids(session)


def test_a_push_showing_no_gap_pays_nothing_for_the_signed_off_shift_before_it(
    session: Session, world: World, pda: Pda
) -> None:
    """Pushing seqs in order, a PDA whose previous shift was signed off without its last
    seq reads shifts to file its events (and, on PostgreSQL, to lock their open shift),
    its balance never gathered; a push showing a gap, with no signed-off shift owning
    it, in two statements: filing, and locking with the shifts that may own the gap."""
    from tests.sync.test_ingest import statements_sent

    first, b = signed_off_then_next_opened(session, world, pda)

    def reading_shifts(events: list[dict[str, Any]]) -> list[str]:
        with statements_sent(session) as statements:
            pda.push(events, received_at=next_days(pda, 30))
        assert not [s for s in statements if "scan_event.shift_id IN" in s]
        return shift_reads(statements)

    in_order = reading_shifts([pda.event(b, occurred_at=next_days(pda, 1))])  # seq 3
    pda.seq = 5
    with_a_gap = reading_shifts([pda.event(b, "out_for_delivery", occurred_at=next_days(pda, 2))])
    assert len(in_order) == 1 + open_shifts_locking(session)  # filing (, locking)
    assert len(with_a_gap) == 2  # filing, locking with what may own the gap
    session.refresh(first)
    assert first.status == ShiftStatus.SIGNED_OFF


def test_a_reopening_for_a_gap_is_withdrawn_when_the_next_opening_shows_the_seqs_its_own(
    session: Session, world: World, pda: Pda
) -> None:
    """The next day's seq 4 is pushed before the next shift's opening reaches the server:
    seq 3 is missing and the first shift owns it (nothing after it on the PDA starts
    sooner), so it reopens. Then the opening arrives, declaring seq 3 its first: the
    first shift's seqs end at 2, none missing, its balance the one signed off. Opened
    before the push, the next shift owned seq 3 and the first never reopened (rule 3):
    the reopening is withdrawn."""
    a, b = parcels(session, world, 2)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    first = sign_off(session, world, pda.close(first))
    pda.seq = 3  # seq 3 stays on the PDA (the next shift's, as its opening will say)
    pda.push([pda.event(b, occurred_at=next_days(pda, 1))], received_at=next_days(pda, 2))
    session.refresh(first)
    assert first.status == ShiftStatus.CLOSED
    pda.open(first_seq=3, now=NEXT_DAY)
    session.refresh(first)
    assert shift_balance(session=session, shift=first).missing_seqs == []
    assert first.status == ShiftStatus.SIGNED_OFF
    flag = late_flag(session)
    assert flag is not None and flag.status == FlagStatus.CLOSED
    assert shift_actions(session, first) == [
        "shift_signed_off",
        "shift_reopened",
        "shift_reopening_withdrawn",
    ]


def test_a_rejected_reopening_is_withdrawn_when_the_next_opening_shows_the_seq_its_own(
    session: Session, world: World, pda: Pda
) -> None:
    """As above, but the next day's seq 3 is rejected (a malformed locker drop) before
    the opening arrives: the first shift owned it then (up to the highest seq held), and
    reopened. The opening declares seq 3 its first: the rejected event is the next
    shift's, as it would have been had the opening come first; the reopening goes."""
    a, b = parcels(session, world, 2)
    first = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    first = sign_off(session, world, pda.close(first))
    pda.push([malformed_drop(pda, b)], received_at=next_days(pda, 2))  # seq 3
    session.refresh(first)
    assert first.status == ShiftStatus.CLOSED
    pda.open(first_seq=3, now=NEXT_DAY)
    session.refresh(first)
    assert first.status == ShiftStatus.SIGNED_OFF
    flag = late_flag(session)
    assert flag is not None and flag.status == FlagStatus.CLOSED
    assert shift_actions(session, first)[-1] == "shift_reopening_withdrawn"


def test_every_discrepancy_kind_says_what_to_do() -> None:
    assert set(WHAT_TO_DO) == {*HANDOVER_KINDS, *BALANCE_RULE_KINDS}
