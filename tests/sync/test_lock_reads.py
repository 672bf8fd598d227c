"""What a statement that waited for a PDA's lock reads of rows it does not lock.

On PostgreSQL (READ COMMITTED) a ``SELECT ... FOR UPDATE`` that waits for a row gets
that row as committed now, but reads every other row, joined or in a subquery, as it
was when the statement began: before whatever it waited for committed. Each test here
holds a change uncommitted in one session while another waits for the same lock in a
thread of its own, then commits, and checks that the second acted on the change.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from courier_api.extensions import db
from models import Device, Flag, FlagStatus, ScanEvent, Shift, ShiftStatus, Station, User
from sync import shifts
from sync.balances import shift_balance
from sync.device_moves import move_device
from sync.device_state import lock_device_state
from sync.events import EventRules
from sync.ingest import IngestRules, PushBatch, Pusher, ingest
from sync.shifts import LATE_EVENT, ShiftRules
from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy
from tests import factories
from tests.lock_waits import while_held

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
RULES = IngestRules(
    events=EventRules(tracking=TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS))
)


def push(session: Session, device_id: str, station_id: int, courier_id: int, events: Any) -> None:
    ingest(
        session=session,
        batch=PushBatch(device_id, uuid.uuid4(), NOW, events),
        pusher=Pusher(device_id, station_id, courier_id),
        rules=RULES,
        received_at=NOW,
    )


@pytest.mark.postgres_only
def test_seqs_a_waited_for_opening_showed_missing_withdraw_its_reopening(
    committed_app: Any,
) -> None:
    """A courier's shift closed declaring no seqs and was signed off before anything of
    the PDA arrived. A colleague's opening declares seq 2 its first (so seq 1, still on
    the PDA, is the first shift's: it reopens), while the colleague's push of seqs 1-3
    waits for the PDA's lock. Seq 1 is filed under no shift: nothing of the first shift
    is missing any more, and its reopening is withdrawn, as when the push comes after
    (``test_convergence_handover``). The push's lock statement began before the opening
    committed: the highest first seq declared it read with it was none."""
    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    with sessions() as setup:
        station = factories.station(setup, code="ST1")
        manager = factories.user(setup, "race-manager", "station_manager", station)
        courier = factories.user(setup, "race-courier", "courier", station)
        colleague = factories.user(setup, "race-colleague", "courier", station)
        device = factories.device(setup, "PDA-RACE", station)
        parcels = [factories.parcel(setup, station).tracking_no for _ in range(3)]
        lock_device_state(setup, device.id)
        first = shifts.open_shift(
            session=setup,
            device=device,
            courier_id=courier.id,
            rules=ShiftRules(),
            now=NOW - dt.timedelta(hours=8),
        )
        shifts.close_shift(
            session=setup, shift=first, closed_by=courier.id, now=NOW - dt.timedelta(hours=5)
        )
        setup.commit()
        balance = shift_balance(session=setup, shift=first)
        shifts.sign_off(
            session=setup,
            shift=first,
            user_id=manager.id,
            note="checked",
            force_reason="lost" if balance.status == "provisional" else None,
            now=NOW - dt.timedelta(hours=4, minutes=30),
        )
        setup.commit()
        ids = (first.id, station.id, colleague.id)
    first_id, station_id, colleague_id = ids
    # Seq 1 scanned in the first shift, seqs 2 and 3 in the colleague's.
    times = [NOW - dt.timedelta(hours=7), NOW - dt.timedelta(hours=3), NOW - dt.timedelta(hours=2)]
    events = [
        factories.event(seq, parcels[seq - 1], occurred_at=times[seq - 1]) for seq in (1, 2, 3)
    ]

    def open_declaring_seq_2(session: Session) -> None:
        device = session.get(Device, "PDA-RACE")
        assert device is not None and session.get(User, colleague_id) is not None
        shifts.open_shift(
            session=session,
            device=device,
            courier_id=colleague_id,
            rules=ShiftRules(),
            first_seq=2,
            now=NOW - dt.timedelta(hours=4),
        )
        reopened = session.get(Shift, first_id)
        assert reopened is not None and reopened.status == ShiftStatus.CLOSED

    while_held(
        sessions,
        open_declaring_seq_2,
        lambda session: push(session, "PDA-RACE", station_id, colleague_id, events),
    )
    with sessions() as check:
        first_now = check.get(Shift, first_id)
        assert first_now is not None
        flag = check.scalars(
            select(Flag).where(Flag.kind == LATE_EVENT, Flag.shift_id == first_id)
        ).one()
        assert (first_now.status, flag.status) == (ShiftStatus.SIGNED_OFF, FlagStatus.CLOSED)


@pytest.mark.postgres_only
def test_a_push_that_waited_for_a_move_of_its_pda_stores_its_events_at_the_old_station(
    committed_app: Any,
) -> None:
    """A courier of ST1 pushes from the PDA (its token checked, the PDA at ST1) while an
    admin moves the PDA to ST2, and waits for the move's lock. Its events are kept, at
    ST1: the ST1 courier scanned them while the PDA was at ST1 (no ST2 courier could
    sign in on it before the move committed), so they are ST1's handover (rule 7), as
    they are when the push comes first. Refused, they would be worse off: the PDA's
    retry is 401 (its token predates the move) and only an ST2 courier's sign-in could
    bring them, filed at ST2."""
    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    with sessions() as setup:
        first = factories.station(setup, code="ST1")
        factories.station(setup, code="ST2")
        courier = factories.user(setup, "race-courier", "courier", first)
        factories.device(setup, "PDA-RACE", first)
        parcel = factories.parcel(setup, first).tracking_no
        lock_device_state(setup, "PDA-RACE")
        setup.commit()
        first_id, courier_id = first.id, courier.id

    def move(session: Session) -> None:
        device = session.get(Device, "PDA-RACE")
        to = session.scalars(select(Station).where(Station.code == "ST2")).one()
        assert device is not None
        move_device(session=session, device=device, station=to, moved_by=None)

    events = [factories.event(1, parcel)]
    while_held(
        sessions, move, lambda session: push(session, "PDA-RACE", first_id, courier_id, events)
    )
    with sessions() as check:
        device = check.get(Device, "PDA-RACE")
        (event,) = check.scalars(select(ScanEvent)).all()
        assert device is not None and device.station_id != first_id
        assert (event.station_id, event.courier_id, event.seq) == (first_id, courier_id, 1)
