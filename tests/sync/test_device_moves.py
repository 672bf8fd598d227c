"""What of a PDA's seqs keeps it at its station (``sync.device_moves``)."""

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models import AuditEntry, Device, Shift
from sync import shifts
from sync.device_moves import move_device, unsynced_seqs
from sync.errors import Conflict
from sync.shifts import ShiftRules
from tests import factories
from tests.conftest import World


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
