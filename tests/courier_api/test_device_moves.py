"""An admin moves a PDA sent from one station to another (``sync.device_moves``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import jwt
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import AuditEntry
from sync import audit
from tests import factories
from tests.conftest import TEST_JWT_SECRET, Auth, World
from tests.courier_api.test_auth import _claims_for, bearer
from tests.courier_api.test_shifts_api import Courier, parcels

DEVICES = "/api/v1/devices"


def move(client: FlaskClient, headers: dict[str, str], device_id: str, station_id: Any) -> Any:
    return client.post(
        f"{DEVICES}/{device_id}/move", json={"station_id": station_id}, headers=headers
    )


def board(client: FlaskClient, headers: dict[str, str], station_id: int) -> dict[str, Any]:
    response = client.get(f"/api/v1/stations/{station_id}/handover", headers=headers)
    assert response.status_code == 200, response.get_json()
    answer: dict[str, Any] = response.get_json()
    return answer


def test_a_pda_sent_to_another_station_is_moved_there_its_history_staying_behind(
    client: FlaskClient, session: Session, world: World, auth: Auth
) -> None:
    """PDA-0001 worked a shift at ST1 and was sent to ST2. ST2's manager cannot
    register it (the id is taken); an admin moves it. ST1's board still shows the
    shift it ran there, ST2's only what it does from the move on; ST1's courier's
    tokens stop, ST2's courier signs in with it."""
    factories.user(session, "courier2", "courier", world.other_station)
    session.commit()
    a, b = parcels(session, world, 2)
    pda = Courier(client, auth, "courier1", "PDA-0001")
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b), pda.event(a, "delivered")])
    assert pda.close(shift["id"]).status_code == 200
    manager1, manager2 = auth.headers("manager1"), auth.headers("manager2")
    before = board(client, manager1, world.station.id)
    assert [row["shift_id"] for row in before["shifts"]] == [shift["id"]]

    taken = client.post(f"{DEVICES}", json={"device_id": "PDA-0001"}, headers=manager2)
    assert (taken.status_code, taken.get_json()["code"]) == (409, "device_exists")
    assert "an admin moves it here" in taken.get_json()["message"]

    admin = auth.headers("admin")
    moved = move(client, admin, "PDA-0001", world.other_station.id)
    assert moved.status_code == 200, moved.get_json()
    assert moved.get_json()["station_id"] == world.other_station.id

    # The history stays at ST1: its board, the shift and its balance are ST1's.
    assert board(client, manager1, world.station.id) == before
    assert client.get(f"/api/v1/shifts/{shift['id']}/balance", headers=manager1).status_code == 200
    assert client.get(f"/api/v1/shifts/{shift['id']}/balance", headers=manager2).status_code == 404
    assert board(client, manager2, world.other_station.id)["shifts"] == []
    # The PDA is ST2's now.
    assert client.get(f"{DEVICES}/PDA-0001", headers=manager1).status_code == 404
    assert client.get(f"{DEVICES}/PDA-0001", headers=manager2).status_code == 200

    # ST1's courier's tokens no longer work, nor may they sign in with it.
    refused = client.post("/api/v1/shifts", json={}, headers=pda.headers)
    assert (refused.status_code, refused.get_json()["code"]) == (401, "token_revoked")
    sign_in = {"username": "courier1", "password": factories.PASSWORD, "device_id": "PDA-0001"}
    again = client.post("/api/v1/auth/token", json=sign_in)
    assert (again.status_code, again.get_json()["code"]) == (403, "device_not_allowed")

    # ST2's courier signs in with it; its new shift is on ST2's board alone.
    there = Courier(client, auth, "courier2", "PDA-0001")
    there.seq = 3  # the PDA numbers on
    new_shift = there.open()
    assert new_shift["station_id"] == world.other_station.id
    rows = board(client, manager2, world.other_station.id)["shifts"]
    assert [(r["shift_id"], r["device_id"]) for r in rows] == [(new_shift["id"], "PDA-0001")]
    assert board(client, manager1, world.station.id) == before

    (entry,) = session.scalars(select(AuditEntry).where(AuditEntry.action == "device_moved"))
    assert (entry.actor_id, entry.subject_type, entry.subject_key) == (
        world.admin.id,
        "device",
        "PDA-0001",
    )
    assert entry.details == {
        "station_id": world.station.id,
        "by": "admin",
        "changes": {"station_id": {"from": world.station.id, "to": world.other_station.id}},
        "from_station": "ST1",
        "to_station": "ST2",
    }
    assert audit.verify(session=session).ok


def test_only_an_admin_moves_a_pda(client: FlaskClient, world: World, auth: Auth) -> None:
    """A manager may not take another station's PDA, nor give theirs away; an auditor
    never writes. An unknown station or PDA is a 404, a body without a station a 422."""
    for username in ("manager1", "manager2", "auditor1"):
        refused = move(client, auth.headers(username), "PDA-0001", world.other_station.id)
        assert (refused.status_code, refused.get_json()["code"]) == (403, "role_forbidden")
    courier = auth.headers("courier1", "PDA-0001")
    assert move(client, courier, "PDA-0001", world.other_station.id).status_code == 403

    admin = auth.headers("admin")
    unknown = move(client, admin, "PDA-0001", 999_999)
    assert (unknown.status_code, unknown.get_json()["code"]) == (404, "station_not_found")
    no_pda = move(client, admin, "PDA-9999", world.other_station.id)
    assert (no_pda.status_code, no_pda.get_json()["code"]) == (404, "device_not_found")
    empty = client.post(f"{DEVICES}/PDA-0001/move", json={}, headers=admin)
    assert empty.status_code == 422
    device = client.get(f"{DEVICES}/PDA-0001", headers=admin).get_json()
    assert device["station_id"] == world.station.id


def test_a_pda_with_a_shift_open_is_not_moved(
    client: FlaskClient, session: Session, world: World, auth: Auth
) -> None:
    """The shift open on it is its old station's handover: closed there first."""
    (a,) = parcels(session, world, 1)
    pda = Courier(client, auth, "courier1", "PDA-0001")
    shift = pda.open()
    pda.push([pda.event(a), pda.event(a, "delivered")])
    admin = auth.headers("admin")
    refused = move(client, admin, "PDA-0001", world.other_station.id)
    assert (refused.status_code, refused.get_json()["code"]) == (409, "device_has_open_shift")
    assert f"shift {shift['id']} open at ST1" in refused.get_json()["message"]
    assert (
        session.scalars(select(AuditEntry).where(AuditEntry.action == "device_moved")).all() == []
    )

    assert pda.close(shift["id"]).status_code == 200
    assert move(client, admin, "PDA-0001", world.other_station.id).status_code == 200


def test_a_pda_with_seqs_still_on_it_is_not_moved(
    client: FlaskClient, session: Session, world: World, auth: Auth
) -> None:
    """Seqs the server does not hold are events still on the PDA, of its old station's
    shifts: a gap, and seqs a close declared beyond those held. Pushed there (or written
    off as lost by its manager), the PDA moves."""
    a, b = parcels(session, world, 2)
    pda = Courier(client, auth, "courier1", "PDA-0001")
    shift = pda.open()
    first, second, third = pda.event(a), pda.event(b), pda.event(a, "delivered")
    pda.push([first, third])
    assert pda.close(shift["id"], last_seq=5).status_code == 200
    admin = auth.headers("admin")
    refused = move(client, admin, "PDA-0001", world.other_station.id)
    assert (refused.status_code, refused.get_json()["code"]) == (409, "device_has_unsynced_seqs")
    assert "3 seqs the server does not hold (2, 4-5)" in refused.get_json()["message"]

    pda.push([second])
    manager1 = auth.headers("manager1")
    for lost in (5, 4):
        refused = move(client, admin, "PDA-0001", world.other_station.id)
        assert refused.status_code == 409, refused.get_json()
        # One seq left is "1 seq", not "1 seqs".
        unsynced = "2 seqs the server does not hold (4-5)" if lost == 5 else "1 seq the server"
        assert unsynced in refused.get_json()["message"], refused.get_json()
        written_off = client.post(
            f"{DEVICES}/PDA-0001/lost-seqs",
            json={"ranges": [{"first": lost, "last": lost}], "reason": "PDA reset"},
            headers=manager1,
        )
        assert written_off.status_code == 201, written_off.get_json()
    assert move(client, admin, "PDA-0001", world.other_station.id).status_code == 200


def test_a_token_issued_before_a_move_does_not_work_again_when_the_pda_moves_back(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    """ST1's courier's tokens (issued a minute ago) fail while the PDA is at ST2: it is
    not their station's. Moved back, the PDA signs in anew: tokens issued before a move
    stay revoked, a copy kept of them too, as a PDA found again after it was reported
    lost does not revive them."""
    minute_ago = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    issued = {
        typ: jwt.encode(
            _claims_for(
                world,
                sub=str(world.courier.id),
                role="courier",
                device="PDA-0001",
                typ=typ,
                iat=minute_ago,
                ver=world.courier.credentials_version,
            ),
            TEST_JWT_SECRET,
            algorithm="HS256",
        )
        for typ in ("access", "refresh")
    }
    assert client.get("/api/v1/sync/pull", headers=bearer(issued["access"])).status_code == 200
    admin = auth.headers("admin")
    assert move(client, admin, "PDA-0001", world.other_station.id).status_code == 200
    away = client.get("/api/v1/sync/pull", headers=bearer(issued["access"]))
    assert (away.status_code, away.get_json()["code"]) == (401, "token_revoked")
    assert move(client, admin, "PDA-0001", world.station.id).status_code == 200

    refused = client.get("/api/v1/sync/pull", headers=bearer(issued["access"]))
    assert (refused.status_code, refused.get_json()["code"]) == (401, "token_revoked")
    assert "moved to another station" in refused.get_json()["message"]
    refresh = client.post("/api/v1/auth/refresh", json={"refresh_token": issued["refresh"]})
    assert (refresh.status_code, refresh.get_json()["code"]) == (401, "token_revoked")
    fresh = auth.headers("courier1", "PDA-0001")
    assert client.get("/api/v1/sync/pull", headers=fresh).status_code == 200


def test_a_pda_moved_to_the_station_it_is_at_changes_nothing(
    client: FlaskClient, session: Session, world: World, auth: Auth
) -> None:
    headers = auth.headers("courier1", "PDA-0001")
    moved = move(client, auth.headers("admin"), "PDA-0001", world.station.id)
    assert (moved.status_code, moved.get_json()["station_id"]) == (200, world.station.id)
    assert client.get("/api/v1/sync/pull", headers=headers).status_code == 200
    assert (
        session.scalars(select(AuditEntry).where(AuditEntry.action == "device_moved")).all() == []
    )
