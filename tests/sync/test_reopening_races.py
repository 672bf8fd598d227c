"""A manager's sign-off and what else reopens a signed-off shift, at once, on PostgreSQL.

``tests/sync/test_signoff_races.py`` races the sign-off against a push showing a gap of
the shift's seqs. Two more reopen a signed-off shift, each finding the shifts to judge by
a condition in the statement that locks them (``sync.shifts.lock_shifts``), while the
sign-off locks its shift alone: a write-off of lost seqs above the highest held, which
leaves the seqs below them as gaps the shift owns (``sync.lost_seqs``,
``may_own_revealed_gap``), and a push whose rejected event is the shift's
(``may_own_rejected``). On PostgreSQL (READ COMMITTED) a ``FOR UPDATE`` passes over,
without waiting, a row that does not match as last committed: a condition matching only
signed-off shifts would miss the one being signed off that moment, whose sign-off read
the balance before. Whichever commits first, the other must see it (rule 5): the
sign-off is refused, or the shift reopens.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from courier_api.extensions import db
from models import Device, Flag, FlagStatus, QuarantinedEvent, Shift, ShiftStatus
from sync import shifts, signoffs
from sync.balances import shift_balance
from sync.device_state import lock_device_state
from sync.errors import Conflict
from sync.handover import balance_version
from sync.lost_seqs import write_off_lost_seqs
from sync.shifts import LATE_EVENT, ShiftRules
from tests import factories
from tests.lock_waits import while_held
from tests.sync.test_lock_reads import NOW, push
from tests.sync.test_signoff_races import first_shift_now

pytestmark = pytest.mark.postgres_only
DEVICE = "PDA-RACE"


class Signed:
    """The first shift of the PDA, closed without its last seq with seqs 1-2 held (a
    parcel checked out and returned), balanced, committed; and the manager's two ways of
    signing it off, at the balance they read."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        with sessions() as setup:
            station = factories.station(setup, code="ST1")
            manager = factories.user(setup, "race-manager", "station_manager", station)
            courier = factories.user(setup, "race-courier", "courier", station)
            device = factories.device(setup, DEVICE, station)
            self.parcel = factories.parcel(setup, station).tracking_no
            lock_device_state(setup, device.id)
            first = shifts.open_shift(
                session=setup,
                device=device,
                courier_id=courier.id,
                rules=ShiftRules(),
                now=NOW - dt.timedelta(hours=8),
            )
            setup.commit()
            push(
                setup,
                device.id,
                station.id,
                courier.id,
                [
                    factories.event(1, self.parcel, occurred_at=NOW - dt.timedelta(hours=7)),
                    factories.event(
                        2,
                        self.parcel,
                        "returned_to_station",
                        occurred_at=NOW - dt.timedelta(hours=6),
                    ),
                ],
            )
            shifts.close_shift(
                session=setup, shift=first, closed_by=courier.id, now=NOW - dt.timedelta(hours=5)
            )
            setup.commit()
            self.ids = (first.id, manager.id, station.id, courier.id)

    def read(self, sessions: sessionmaker[Session]) -> None:
        """The balance as the manager read it: balanced, nothing missing."""
        with sessions() as check:
            shift = check.get(Shift, self.ids[0])
            assert shift is not None
            balance = shift_balance(session=check, shift=shift)
            assert (balance.status, balance.missing_seqs) == ("balanced", [])
            self.version = balance_version(balance)

    def sign_off(self, session: Session) -> None:
        """Signed off on the shift's page: its form sends back the balance's version and
        the rejected events it counted (none)."""
        first_id, manager_id, _, _ = self.ids
        shift = session.get(Shift, first_id)
        assert shift is not None
        shifts.sign_off(
            session=session,
            shift=shift,
            user_id=manager_id,
            note="all back",
            seen_version=self.version,
            seen_rejected_events=0,
        )

    def sign_off_clean(self, session: Session) -> None:
        """Signed off from the board with the other clean handovers; refused, it raises."""
        first_id, manager_id, station_id, _ = self.ids
        (outcome,) = signoffs.sign_off_clean(
            session=session,
            station_id=station_id,
            seen={first_id: self.version},
            user_id=manager_id,
            note="all back",
        )
        if outcome.outcome != signoffs.SIGNED_OFF:
            raise Conflict(outcome.message or "", code=outcome.code or "")


def late_flag(sessions: sessionmaker[Session], shift_id: int) -> Flag:
    with sessions() as check:
        return check.scalars(
            select(Flag).where(Flag.kind == LATE_EVENT, Flag.shift_id == shift_id)
        ).one()


# -- a write-off leaving gaps the shift owns ------------------------------------------


class WriteOff(Signed):
    """The PDA's next shift opened without a first seq and closed online declaring last
    seq 10, none of its events arrived: the manager writes seq 10 off as lost. The seqs
    held then reach 10, and 3 to 9, neither held nor written off, are gaps the first
    shift owns (up to where the next shift starts: it has no event, no first seq)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        super().__init__(sessions)
        _, manager_id, _, courier_id = self.ids
        with sessions() as setup:
            device = setup.get_one(Device, DEVICE)
            lock_device_state(setup, DEVICE)
            second = shifts.open_shift(
                session=setup,
                device=device,
                courier_id=courier_id,
                rules=ShiftRules(),
                now=NOW - dt.timedelta(hours=4),
            )
            setup.commit()
            shifts.close_shift(
                session=setup,
                shift=second,
                closed_by=courier_id,
                last_seq=10,
                now=NOW - dt.timedelta(hours=3),
            )
            setup.commit()
        self.read(sessions)

    def write_off(self, session: Session) -> None:
        write_off_lost_seqs(
            session=session,
            device=session.get_one(Device, DEVICE),
            ranges=[[10, 10]],
            reason="the PDA was reset",
            user_id=self.ids[1],
        )


@pytest.mark.parametrize("how", ["sign_off", "sign_off_clean"])
def test_a_write_off_leaving_gaps_while_the_shift_is_signed_off_reopens_it(
    committed_app: Any, how: str
) -> None:
    """The sign-off has read the balance (nothing missing) and not committed when the
    write-off of seq 10 comes: the write-off must wait for it, and reopen the shift for
    seqs 3-9, naming itself as what reopened it."""
    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    race = WriteOff(sessions)
    while_held(sessions, getattr(race, how), race.write_off)
    first_id = race.ids[0]
    shift, balance = first_shift_now(sessions, first_id)
    assert balance.missing_seqs == list(range(3, 10))
    assert (shift.status, shift.reopened_count) == (ShiftStatus.CLOSED, 1)
    flag = late_flag(sessions, first_id)
    assert flag.status == FlagStatus.OPEN
    assert flag.evidence["latest_reopening"]["missing_seqs"] == list(range(3, 10))
    assert "write_off_id" in flag.evidence["latest_reopening"]


@pytest.mark.parametrize("how", ["sign_off", "sign_off_clean"])
def test_a_sign_off_while_a_write_off_leaves_gaps_of_the_shift_is_refused(
    committed_app: Any, how: str
) -> None:
    """The write-off of seq 10 has not committed when the manager signs the first shift
    off: the sign-off must wait for it, and see seqs 3-9 missing: the balance
    provisional, on its page (its version changed from the one read too, but the seqs
    still on the PDA are what the manager must act on) as from the board."""
    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    race = WriteOff(sessions)
    with pytest.raises(Conflict) as refusal:
        while_held(sessions, race.write_off, getattr(race, how))
    assert refusal.value.code == "balance_provisional"
    shift, balance = first_shift_now(sessions, race.ids[0])
    assert balance.missing_seqs == list(range(3, 10))
    assert (shift.status, shift.signed_off_at) == (ShiftStatus.CLOSED, None)


# -- a push whose rejected event is the shift's ----------------------------------------


class Rejected(Signed):
    """The PDA pushes seq 3, a locker drop of the returned parcel written without its
    locker: rejected, and the first shift's (closed without its last seq, it owns the
    seqs up to the PDA's highest), as its page lists it."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        super().__init__(sessions)
        self.read(sessions)
        drop = factories.event(
            3,
            self.parcel,
            "delivered_to_locker",
            occurred_at=NOW - dt.timedelta(hours=4),
            compartment="B07",
        )
        self.events = [drop]

    def push(self, session: Session) -> None:
        _, _, station_id, courier_id = self.ids
        push(session, DEVICE, station_id, courier_id, self.events)


def rejected_ids(sessions: sessionmaker[Session]) -> list[int]:
    with sessions() as check:
        return list(check.scalars(select(QuarantinedEvent.id).order_by(QuarantinedEvent.id)))


@pytest.mark.parametrize("how", ["sign_off", "sign_off_clean"])
def test_a_push_rejecting_an_event_of_the_shift_while_it_is_signed_off_reopens_it(
    committed_app: Any, how: str
) -> None:
    """The sign-off has read the handover (no event rejected) and not committed when the
    push of the malformed drop comes: the push must wait for it, and reopen the shift,
    its flag citing the rejected event."""
    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    race = Rejected(sessions)
    while_held(sessions, getattr(race, how), race.push)
    [rejected] = rejected_ids(sessions)
    first_id = race.ids[0]
    shift, _ = first_shift_now(sessions, first_id)
    assert (shift.status, shift.reopened_count) == (ShiftStatus.CLOSED, 1)
    flag = late_flag(sessions, first_id)
    assert flag.status == FlagStatus.OPEN
    assert flag.evidence["rejected_event_ids"] == [rejected]


@pytest.mark.parametrize(
    ("how", "refused"),
    [("sign_off", "rejected_events_changed"), ("sign_off_clean", "rejected_events")],
)
def test_a_sign_off_while_a_push_rejects_an_event_of_the_shift_is_refused(
    committed_app: Any, how: str, refused: str
) -> None:
    """The push of the malformed drop has not committed when the manager signs the first
    shift off, having read no event rejected: the sign-off must wait for it and see the
    rejected event, and be refused (the page's form sent the count it read)."""
    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    race = Rejected(sessions)
    with pytest.raises(Conflict) as refusal:
        while_held(sessions, race.push, getattr(race, how))
    assert refusal.value.code == refused
    assert len(rejected_ids(sessions)) == 1
    shift, _ = first_shift_now(sessions, race.ids[0])
    assert (shift.status, shift.signed_off_at) == (ShiftStatus.CLOSED, None)
