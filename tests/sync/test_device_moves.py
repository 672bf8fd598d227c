"""What of a PDA's seqs keeps it at its station (``sync.device_moves``)."""

import datetime as dt
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from courier_api.extensions import db
from models import AuditEntry, Device, Shift, Station
from sync import directory, shifts
from sync.device_moves import move_device, unsynced_seqs
from sync.device_state import lock_device_state
from sync.errors import Conflict, RateLimited
from sync.shifts import ShiftRules
from sync.sign_in_limits import Limit, caller_key
from tests import factories
from tests.conftest import World
from tests.lock_waits import while_held


def test_unsynced_seqs_are_the_gaps_and_the_seqs_declared_beyond_those_held() -> None:
    assert unsynced_seqs(0, [], 0) == []
    assert unsynced_seqs(9, [], 9) == []
    assert unsynced_seqs(9, [], 7) == []  # a close declaring fewer than held: nothing
    assert unsynced_seqs(9, [[3, 4], [7, 7]], 9) == [[3, 4], [7, 7]]
    assert unsynced_seqs(9, [[7, 8]], 12) == [[7, 8], [10, 12]]  # seq 9 is held
    assert unsynced_seqs(3, [[2, 2]], 5) == [[2, 2], [4, 5]]


def test_a_shift_opening_that_waited_for_a_move_does_not_open_at_the_old_station(
    session: Session, world: World
) -> None:
    """A courier's opening checked its token (the PDA at ST1), then waited for the PDA's
    lock while an admin moved it to ST2: it sees the move once it has the lock, and
    opens no shift of ST1 on a PDA at ST2 (a move is refused while one is open)."""
    device = world.device  # as the opening's request loaded it, at ST1
    session.execute(
        update(Device.__table__)
        .where(Device.__table__.c.id == device.id)
        .values(station_id=world.other_station.id)
    )
    with pytest.raises(Conflict) as refused:
        shifts.open_shift(
            session=session, device=device, courier_id=world.courier.id, rules=ShiftRules()
        )
    assert refused.value.code == "device_moved"
    assert session.scalars(select(Shift)).all() == []


def test_a_move_that_waited_for_another_moves_the_pda_from_where_that_one_left_it(
    session: Session, world: World
) -> None:
    """Two admins move the same PDA at once, to ST2 and to ST3: the second, which loaded
    the PDA at ST1 before it had the lock, moves it from ST2, and says so."""
    third = factories.station(session, code="ST3")
    device = world.device  # as the second move's request loaded it, at ST1
    session.execute(
        update(Device.__table__)
        .where(Device.__table__.c.id == device.id)
        .values(station_id=world.other_station.id)
    )
    move_device(session=session, device=device, station=third, moved_by=world.admin.id)
    assert device.station_id == third.id
    (entry,) = session.scalars(select(AuditEntry).where(AuditEntry.action == "device_moved"))
    assert entry.details["changes"] == {
        "station_id": {"from": world.other_station.id, "to": third.id}
    }
    assert (entry.details["from_station"], entry.details["to_station"]) == ("ST2", "ST3")


def _move_to_st2(session: Session) -> None:
    """A move of the PDA ``PDA-RACE`` from ST1 to ST2."""
    device = session.get(Device, "PDA-RACE")
    to = session.scalars(select(Station).where(Station.code == "ST2")).one()
    assert device is not None
    move_device(session=session, device=device, station=to, moved_by=None)


def _race_world(sessions: sessionmaker[Session]) -> int:
    """ST1, ST2, ST3 and a courier of ST1; the PDA ``PDA-RACE`` at ST1 (a push made its
    sync state). The courier's id."""
    with sessions() as setup:
        first = factories.station(setup, code="ST1")
        factories.station(setup, code="ST2")
        factories.station(setup, code="ST3")
        courier = factories.user(setup, "race-courier", "courier", first)
        factories.device(setup, "PDA-RACE", first)
        lock_device_state(setup, "PDA-RACE")
        setup.commit()
        return courier.id


@pytest.mark.postgres_only
def test_a_move_that_really_waited_for_another_moves_the_pda_from_where_it_left_it(
    committed_app: Any,
) -> None:
    """On PostgreSQL, the second of two moves at once, which loaded the PDA at ST1 and
    waited for the first's lock: its lock's statement began before the first committed,
    so the device's station read with it was ST1's still."""
    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    _race_world(sessions)

    def move_again(session: Session) -> None:
        device = session.get(Device, "PDA-RACE")  # at ST1, as the request loaded it
        third = session.scalars(select(Station).where(Station.code == "ST3")).one()
        assert device is not None
        move_device(session=session, device=device, station=third, moved_by=None)

    while_held(sessions, _move_to_st2, move_again)
    with sessions() as check:
        entries = check.scalars(
            select(AuditEntry).where(AuditEntry.action == "device_moved").order_by(AuditEntry.id)
        ).all()
        moves = [(e.details["from_station"], e.details["to_station"]) for e in entries]
        assert moves == [("ST1", "ST2"), ("ST2", "ST3")]


@pytest.mark.postgres_only
def test_a_shift_opening_that_really_waited_for_a_move_opens_nothing(
    committed_app: Any,
) -> None:
    """On PostgreSQL, an opening that loaded the PDA at ST1 and waited for a move's lock
    sees the move: no shift of ST1 opens on the PDA now at ST2."""
    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    courier_id = _race_world(sessions)

    def open_one(session: Session) -> None:
        device = session.get(Device, "PDA-RACE")  # at ST1, as the request loaded it
        assert device is not None
        shifts.open_shift(
            session=session, device=device, courier_id=courier_id, rules=ShiftRules()
        )

    with pytest.raises(Conflict) as refused:
        while_held(sessions, _move_to_st2, open_one)
    assert refused.value.code == "device_moved"
    with sessions() as check:
        assert check.scalars(select(Shift)).all() == []


class Registering:
    """A manager of ST1 whose window holds two ids of other stations' PDAs: PDA-X and
    PDA-Y, both of ST2, which they will be refused (on PostgreSQL, in real sessions)."""

    def __init__(self, committed_app: Any) -> None:
        self.sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
        with self.sessions() as setup:
            self.own = factories.station(setup, code="ST1")
            self.other = factories.station(setup, code="ST2")
            manager = factories.user(setup, "registrar", "station_manager", self.own)
            for device_id in ("PDA-X", "PDA-Y"):
                factories.device(setup, device_id, self.other)
            setup.commit()
        key = caller_key(secret=b"test", kind=directory.DEVICE_IDS_TAKEN, caller=str(manager.id))
        self.registrar = directory.Registrar(manager.id, key, Limit(2, dt.timedelta(hours=24)))

    def register(self, session: Session, device_id: str) -> str:
        """The registration's answer (its code when refused), left uncommitted."""
        try:
            directory.register_device(
                session=session, device_id=device_id, station=self.own, registrar=self.registrar
            )
        except (Conflict, RateLimited) as refusal:
            return refusal.code
        return "registered"

    def move_x(self, session: Session, station: Station) -> None:
        device = session.get(Device, "PDA-X")
        assert device is not None
        move_device(session=session, device=device, station=station, moved_by=None)


@pytest.mark.postgres_only
def test_a_registration_while_a_pda_is_moved_away_again_does_not_forgive_it_for_good(
    committed_app: Any,
) -> None:
    """On PostgreSQL, a manager of ST1 registers a PDA while an admin moves PDA-X, one
    they were refused for at ST2 and since moved to ST1, back to ST2: the registration
    reads PDA-X at ST1 (the move not committed) and counts its refusal for nothing, as
    it stood then. Once the move commits, PDA-X is another station's PDA again and its
    refusal counts: the manager's window, full with it, refuses the next registration."""
    world = Registering(committed_app)
    with world.sessions() as session:
        assert [world.register(session, "PDA-X"), world.register(session, "PDA-Y")] == [
            "device_exists"
        ] * 2
        world.move_x(session, world.own)
        session.commit()
    with world.sessions() as away, world.sessions() as registering:
        world.move_x(away, world.other)  # not committed yet
        assert world.register(registering, "PDA-NEW-1") == "registered"  # X stands at ST1
        registering.commit()
        away.commit()
    with world.sessions() as session:
        assert world.register(session, "PDA-NEW-2") == directory.TOO_MANY_DEVICE_IDS_TAKEN


@pytest.mark.postgres_only
def test_a_registration_that_waited_for_the_managers_turn_sees_a_move_committed_meanwhile(
    committed_app: Any,
) -> None:
    """On PostgreSQL, a manager of ST1, their window full with PDA-X and PDA-Y (both of
    ST2, refused), registers a PDA while their other tab's registration holds their turn
    and an admin moves PDA-X to ST1; both commit while it waits. Once its turn comes,
    PDA-X stands at ST1 and counts for nothing: the registration goes through. It read
    the ids moved to ST1 before it waited, without PDA-X, and was refused with a 429."""
    world = Registering(committed_app)
    with world.sessions() as session:
        for device_id in ("PDA-X", "PDA-Y"):
            assert world.register(session, device_id) == "device_exists"
            session.commit()
    answers: list[str] = []

    def other_tab_and_the_move(holder: Session) -> None:
        # The manager's turn held (refused: the window is full), and PDA-X moved to ST1.
        assert world.register(holder, "PDA-NEW-0") == directory.TOO_MANY_DEVICE_IDS_TAKEN
        world.move_x(holder, world.own)

    while_held(
        world.sessions,
        other_tab_and_the_move,
        lambda registering: answers.append(world.register(registering, "PDA-NEW-1")),
    )
    assert answers == ["registered"]
