"""A manager's sign-off and a PDA's push that shows a gap of seqs the shift owns, at once.

The shift closed without declaring its last seq, so it owns the seqs up to where the
PDA's next shift starts (``sync.handover.owned_seqs``). Its sign-off reads a balance with
nothing missing; the push of the next shift's seq 4 shows seq 3 missing, the first
shift's. Whichever commits first, the other must see it (rule 5): the sign-off is
refused as provisional, or the push reopens the signed-off shift. Neither seeing the
other leaves a shift signed off while seqs of it are still on the PDA.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from courier_api.extensions import db
from models import Flag, FlagStatus, Shift, ShiftStatus
from sync import shifts, signoffs
from sync.balances import shift_balance
from sync.device_state import lock_device_state
from sync.errors import Conflict
from sync.handover import balance_version
from sync.shifts import LATE_EVENT, ShiftRules
from tests import factories
from tests.lock_waits import while_held
from tests.sync.test_lock_reads import NOW, push


class Race:
    """The world of the race, committed: the first shift closed without a last seq, its
    seqs 1-2 held, the next shift of the PDA open, and what the push sends."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        with sessions() as setup:
            station = factories.station(setup, code="ST1")
            manager = factories.user(setup, "race-manager", "station_manager", station)
            courier = factories.user(setup, "race-courier", "courier", station)
            device = factories.device(setup, "PDA-RACE", station)
            a, b = (factories.parcel(setup, station).tracking_no for _ in range(2))
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
                    factories.event(1, a, occurred_at=NOW - dt.timedelta(hours=7)),
                    factories.event(
                        2, a, "returned_to_station", occurred_at=NOW - dt.timedelta(hours=6)
                    ),
                ],
            )
            shifts.close_shift(
                session=setup, shift=first, closed_by=courier.id, now=NOW - dt.timedelta(hours=5)
            )
            setup.commit()
            shifts.open_shift(
                session=setup,
                device=device,
                courier_id=courier.id,
                rules=ShiftRules(),
                now=NOW - dt.timedelta(hours=4),
            )
            setup.commit()
            balance = shift_balance(session=setup, shift=first)
            assert (balance.status, balance.missing_seqs) == ("balanced", [])
            self.version = balance_version(balance)
            self.ids = (first.id, manager.id, station.id, courier.id)
        # Seq 3 (the first shift's, a scan after its return) stays on the PDA.
        self.events = [factories.event(4, b, occurred_at=NOW - dt.timedelta(hours=3))]

    def sign_off(self, session: Session) -> None:
        """The manager's sign-off of the first shift on its page."""
        first_id, manager_id, _, _ = self.ids
        shift = session.get(Shift, first_id)
        assert shift is not None
        shifts.sign_off(session=session, shift=shift, user_id=manager_id, note="all back")

    def sign_off_clean(self, session: Session) -> None:
        """The first shift signed off from the board with the other clean handovers, at
        the balance version the board showed (nothing missing); refused, it raises."""
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

    def push(self, session: Session) -> None:
        _, _, station_id, courier_id = self.ids
        push(session, "PDA-RACE", station_id, courier_id, self.events)


def first_shift_now(sessions: sessionmaker[Session], shift_id: int) -> tuple[Shift, Any]:
    """The first shift as committed, and its balance."""
    with sessions() as check:
        shift = check.get(Shift, shift_id)
        assert shift is not None
        return shift, shift_balance(session=check, shift=shift)


@pytest.mark.postgres_only
@pytest.mark.parametrize("how", ["sign_off", "sign_off_clean"])
def test_a_push_showing_a_gap_while_the_shift_is_signed_off_reopens_it(
    committed_app: Any, how: str
) -> None:
    """The sign-off has read the balance (nothing missing) and not committed when the
    push of seq 4 comes: the push must see the sign-off, and reopen the shift for seq 3.
    Signed off on its own, or from the board with the other clean handovers."""
    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    race = Race(sessions)
    while_held(sessions, getattr(race, how), race.push, must_wait=False)
    first_id = race.ids[0]
    shift, balance = first_shift_now(sessions, first_id)
    assert balance.missing_seqs == [3]
    assert (shift.status, shift.reopened_count) == (ShiftStatus.CLOSED, 1)
    with sessions() as check:
        flag = check.scalars(
            select(Flag).where(Flag.kind == LATE_EVENT, Flag.shift_id == first_id)
        ).one()
        assert flag.status == FlagStatus.OPEN


@pytest.mark.postgres_only
@pytest.mark.parametrize("how", ["sign_off", "sign_off_clean"])
def test_a_sign_off_while_a_push_shows_a_gap_of_the_shift_is_refused_as_provisional(
    committed_app: Any, how: str
) -> None:
    """The push of seq 4 has not committed when the manager signs the first shift off:
    the sign-off must see seq 3 missing, and be refused without a reason it cannot wait
    (with the other clean handovers: refused as no clean one)."""
    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    race = Race(sessions)
    with pytest.raises(Conflict) as refused:
        while_held(sessions, race.push, getattr(race, how), must_wait=False)
    assert refused.value.code == "balance_provisional"
    shift, balance = first_shift_now(sessions, race.ids[0])
    assert balance.missing_seqs == [3]
    assert (shift.status, shift.signed_off_at) == (ShiftStatus.CLOSED, None)
