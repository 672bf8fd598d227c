"""Registering PDAs (``sync.directory``)."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from sync import directory, sign_in_limits
from tests.conftest import World


def test_an_id_taken_at_another_station_counts_the_managers_window_once(
    session: Session, world: World, sent: list[str]
) -> None:
    """A manager registering another station's PDA id: their window of such ids is
    checked before the id is looked up (a full one refuses every id, a free one's too),
    then the id is counted in it, not checked again (one count of the window, one purge
    of its old rows)."""
    key = sign_in_limits.caller_key(
        secret=b"test", kind=directory.DEVICE_IDS_TAKEN, caller=str(world.manager.id)
    )
    registrar = directory.Registrar(user_id=world.manager.id, key=key)
    session.flush()
    sent.clear()
    with pytest.raises(directory.DeviceIdTaken):
        directory.register_device(
            session=session,
            device_id=world.other_device.id,
            station=world.station,
            registrar=registrar,
        )
    counts = [s for s in sent if s.startswith("SELECT count(*)") and "sign_in_attempt" in s]
    purges = [s for s in sent if s.startswith("DELETE FROM sign_in_attempt")]
    assert (len(counts), len(purges)) == (1, 1), sent
