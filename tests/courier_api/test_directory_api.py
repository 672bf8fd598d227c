"""Admin endpoints for stations, users and devices, and who may use them."""

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from courier_api.config import ConfigError, load_config
from models import AuditEntry, utcnow
from sync import directory
from sync.sign_in_limits import Limit
from tests import factories
from tests.conftest import Auth, World


def test_admin_creates_and_renames_a_station(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    admin = auth.headers("admin")
    created = client.post(
        "/api/v1/stations",
        json={"code": "sh-pd-02", "name": "Pudong 2", "timezone": "Asia/Shanghai"},
        headers=admin,
    )
    assert created.status_code == 201
    station = created.get_json()
    assert station["code"] == "SH-PD-02"
    renamed = client.patch(
        f"/api/v1/stations/{station['id']}", json={"name": "Pudong Two"}, headers=admin
    )
    assert renamed.status_code == 200
    assert renamed.get_json()["name"] == "Pudong Two"


@pytest.mark.parametrize("zone", ["Mars/Olympus", "America", "Etc", "../zoneinfo", ""])
def test_a_station_time_zone_is_an_iana_zone(
    client: FlaskClient, world: World, auth: Auth, zone: str
) -> None:
    """Not a zone: unknown, a folder of the zone database, a path, nothing."""
    admin = auth.headers("admin")
    created = client.post(
        "/api/v1/stations", json={"code": "X2", "name": "X", "timezone": zone}, headers=admin
    )
    updated = client.patch(
        f"/api/v1/stations/{world.station.id}", json={"timezone": zone}, headers=admin
    )
    for answer in (created, updated):
        assert answer.status_code == 422
        assert answer.get_json()["code"] == "invalid_timezone"
        assert list(answer.get_json()["errors"]) == ["timezone"]


def test_station_input_is_checked(client: FlaskClient, world: World, auth: Auth) -> None:
    admin = auth.headers("admin")
    bad_code = client.post("/api/v1/stations", json={"code": "a b", "name": "X"}, headers=admin)
    assert bad_code.status_code == 422
    assert bad_code.get_json()["code"] == "invalid_station_code"


def test_managers_see_only_their_own_station(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    listed = client.get("/api/v1/stations", headers=auth.headers("manager1")).get_json()
    assert [s["code"] for s in listed["items"]] == ["ST1"]
    everything = client.get("/api/v1/stations", headers=auth.headers("auditor1")).get_json()
    assert {"ST1", "ST2"} <= {s["code"] for s in everything["items"]}


def test_station_list_pages_by_keyset(client: FlaskClient, world: World, auth: Auth) -> None:
    admin = auth.headers("admin")
    first = client.get("/api/v1/stations?limit=1", headers=admin).get_json()
    assert len(first["items"]) == 1 and first["next_after"] == first["items"][0]["id"]
    second = client.get(
        f"/api/v1/stations?limit=1&after={first['next_after']}", headers=admin
    ).get_json()
    assert second["items"][0]["id"] > first["items"][0]["id"]
    rest = client.get(
        f"/api/v1/stations?limit=500&after={second['next_after']}", headers=admin
    ).get_json()
    assert rest["next_after"] is None


def test_admin_creates_users_with_station_rules(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    admin = auth.headers("admin")
    courier = client.post(
        "/api/v1/users",
        json={
            "username": "courier9",
            "role": "courier",
            "station_id": world.station.id,
            "password": "long-enough-pass",
        },
        headers=admin,
    )
    assert courier.status_code == 201
    body = courier.get_json()
    assert body["role"] == "courier" and "password" not in body and "password_hash" not in body
    stationless = client.post(
        "/api/v1/users",
        json={"username": "courier10", "role": "courier", "password": "long-enough-pass"},
        headers=admin,
    )
    assert stationless.status_code == 422
    assert stationless.get_json()["code"] == "station_required"
    auditor_at_station = client.post(
        "/api/v1/users",
        json={
            "username": "aud2",
            "role": "auditor",
            "station_id": world.station.id,
            "password": "long-enough-pass",
        },
        headers=admin,
    )
    assert auditor_at_station.get_json()["code"] == "station_not_expected"
    duplicate = client.post(
        "/api/v1/users",
        json={
            "username": "courier9",
            "role": "courier",
            "station_id": world.station.id,
            "password": "long-enough-pass",
        },
        headers=admin,
    )
    assert duplicate.status_code == 409
    assert duplicate.get_json()["code"] == "user_exists"


def test_new_user_can_sign_in(client: FlaskClient, world: World, auth: Auth) -> None:
    client.post(
        "/api/v1/users",
        json={
            "username": "mgr3",
            "role": "station_manager",
            "station_id": world.station.id,
            "password": "long-enough-pass",
        },
        headers=auth.headers("admin"),
    )
    response = client.post(
        "/api/v1/auth/token", json={"username": "mgr3", "password": "long-enough-pass"}
    )
    assert response.status_code == 200


def test_manager_lists_own_station_users_only(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    response = client.get(
        f"/api/v1/users?station_id={world.other_station.id}", headers=auth.headers("manager1")
    )
    usernames = {u["username"] for u in response.get_json()["items"]}
    assert usernames == {"manager1", "courier1"}
    other = client.get(f"/api/v1/users/{world.other_manager.id}", headers=auth.headers("manager1"))
    assert (other.status_code, other.get_json()["code"]) == (404, "user_not_found")


def test_couriers_cannot_list_users(client: FlaskClient, world: World, auth: Auth) -> None:
    response = client.get("/api/v1/users", headers=auth.headers("courier1", "PDA-0001"))
    assert response.status_code == 403


def test_manager_registers_and_retires_a_device(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    manager = auth.headers("manager1")
    created = client.post("/api/v1/devices", json={"device_id": "PDA-0100"}, headers=manager)
    assert created.status_code == 201
    assert created.get_json()["station_id"] == world.station.id
    lost = client.patch("/api/v1/devices/PDA-0100", json={"status": "lost"}, headers=manager)
    assert lost.get_json()["status"] == "lost"
    assert lost.get_json()["status_changed_at"] is not None
    listed = client.get("/api/v1/devices?status=lost", headers=manager).get_json()
    assert [d["id"] for d in listed["items"]] == ["PDA-0100"]


def test_manager_cannot_touch_another_stations_devices(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    manager = auth.headers("manager1")
    elsewhere = client.post(
        "/api/v1/devices",
        json={"device_id": "PDA-0200", "station_id": world.other_station.id},
        headers=manager,
    )
    assert elsewhere.status_code == 403  # the station is named: every caller lists them
    # Another station's PDA is found by its id: it answers as an unknown one, so that the
    # answer does not tell the manager it exists.
    retire = client.patch("/api/v1/devices/PDA-0002", json={"status": "retired"}, headers=manager)
    unknown = client.patch("/api/v1/devices/PDA-9999", json={"status": "retired"}, headers=manager)
    assert (retire.status_code, retire.get_json()["code"]) == (404, "device_not_found")
    assert retire.get_json()["message"] == unknown.get_json()["message"].replace("9999", "0002")
    assert client.get("/api/v1/devices/PDA-0002", headers=manager).status_code == 404
    assert client.get("/api/v1/devices/PDA-0002", headers=auth.headers("admin")).status_code == 200


def test_device_errors(client: FlaskClient, world: World, auth: Auth) -> None:
    admin = auth.headers("admin")
    assert (
        client.post(
            "/api/v1/devices",
            json={"device_id": "PDA-0001", "station_id": world.station.id},
            headers=admin,
        ).status_code
        == 409
    )
    no_station = client.post("/api/v1/devices", json={"device_id": "PDA-0300"}, headers=admin)
    assert no_station.status_code == 422
    assert no_station.get_json()["code"] == "station_required"
    bad_id = client.post(
        "/api/v1/devices", json={"device_id": "a/b", "station_id": world.station.id}, headers=admin
    )
    assert bad_id.get_json()["code"] == "invalid_device_id"
    assert client.get("/api/v1/devices/NOPE", headers=admin).status_code == 404
    bad_status = client.patch("/api/v1/devices/PDA-0001", json={"status": "broken"}, headers=admin)
    assert bad_status.status_code == 422


def test_auditor_reads_but_never_writes(client: FlaskClient, world: World, auth: Auth) -> None:
    auditor = auth.headers("auditor1")
    assert client.get("/api/v1/devices/PDA-0002", headers=auditor).status_code == 200
    assert (
        client.patch(
            "/api/v1/devices/PDA-0002", json={"status": "retired"}, headers=auditor
        ).status_code
        == 403
    )
    assert (
        client.post(
            "/api/v1/stations", json={"code": "Z9", "name": "Z"}, headers=auditor
        ).status_code
        == 403
    )


def _log(client: FlaskClient, auth: Auth, subject_type: str, key: str) -> list[dict[str, Any]]:
    """The audit log's entries about one subject, oldest first, as an auditor reads them."""
    answer = client.get(
        "/api/v1/audit",
        query_string={"subject_type": subject_type, "subject_key": key},
        headers=auth.headers("auditor1"),
    )
    assert answer.status_code == 200, answer.get_json()
    return list(reversed(answer.get_json()["items"]))


def _verified(client: FlaskClient, auth: Auth) -> bool:
    answer = client.get("/api/v1/audit/verify", headers=auth.headers("auditor1")).get_json()
    return bool(answer["intact"]) and answer["checked"] > 0


def test_a_stations_time_zone_moved_is_on_the_audit_log_from_and_to(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    """The time zone decides which local day each shift, board and report is of: an
    auditor judging a day's board sees who moved it, when, from which zone to which.
    A PATCH giving the values the station has, or nothing, writes no entry; a refused
    one neither."""
    admin = auth.headers("admin")
    url = f"/api/v1/stations/{world.station.id}"
    moved = client.patch(url, json={"timezone": "Europe/London", "name": "Pudong"}, headers=admin)
    assert moved.status_code == 200, moved.get_json()
    for same in ({"timezone": "Europe/London", "name": " Pudong "}, {}):
        assert client.patch(url, json=same, headers=admin).status_code == 200
    refused = client.patch(url, json={"timezone": "Mars/Olympus"}, headers=admin)
    assert refused.status_code == 422

    [entry] = _log(client, auth, "station", str(world.station.id))
    assert (entry["action"], entry["actor_id"]) == ("station_updated", world.admin.id)
    assert entry["details"] == {
        "station_id": world.station.id,
        "by": "admin",
        "changes": {
            "timezone": {"from": "Asia/Shanghai", "to": "Europe/London"},
            "name": {"from": "Station ST1", "to": "Pudong"},
        },
    }
    back = client.patch(url, json={"timezone": "Asia/Shanghai"}, headers=admin)
    assert back.status_code == 200
    second = _log(client, auth, "station", str(world.station.id))[1]
    assert second["details"]["changes"] == {
        "timezone": {"from": "Europe/London", "to": "Asia/Shanghai"}
    }
    assert _verified(client, auth)


def test_a_pda_reported_lost_and_found_again_is_on_the_audit_log(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    """A PDA reported lost stops its tokens; brought back, they work again: both weigh on
    whose its events were, and each is on the log with who and the status from and to.
    Set to the status it has, or refused (another station's PDA, a status that is none),
    nothing is logged."""
    manager = auth.headers("manager1")
    url = "/api/v1/devices/PDA-0001"
    assert client.patch(url, json={"status": "lost"}, headers=manager).status_code == 200
    assert client.patch(url, json={"status": "lost"}, headers=manager).status_code == 200
    assert client.patch(url, json={"status": "broken"}, headers=manager).status_code == 422
    elsewhere = client.patch("/api/v1/devices/PDA-0002", json={"status": "lost"}, headers=manager)
    assert elsewhere.status_code == 404
    found = client.patch(url, json={"status": "active"}, headers=auth.headers("admin"))
    assert found.status_code == 200

    lost, active = _log(client, auth, "device", "PDA-0001")
    assert (lost["action"], lost["actor_id"]) == ("device_updated", world.manager.id)
    assert lost["details"] == {
        "station_id": world.station.id,
        "by": "manager1",
        "changes": {"status": {"from": "active", "to": "lost"}},
    }
    assert (active["action"], active["actor_id"]) == ("device_updated", world.admin.id)
    assert active["details"]["changes"] == {"status": {"from": "lost", "to": "active"}}
    assert active["details"]["by"] == "admin"
    assert _log(client, auth, "device", "PDA-0002") == []
    assert _verified(client, auth)


def test_an_account_created_renamed_disabled_and_given_a_password_is_on_the_audit_log(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    """Who may act, and as whom, is an admin's decision: an auditor judging who
    recorded a consent or signed a shift off sees who created that account, renamed or
    disabled it, or set its password (noted as changed, never its hash nor the
    password). A PATCH changing nothing writes no entry; a refused one neither."""
    admin = auth.headers("admin")
    created = client.post(
        "/api/v1/users",
        json={
            "username": "zhaolei",
            "role": "courier",
            "station_id": world.station.id,
            "password": "a-long-enough-password-1",
            "full_name": "Zhao Lei",
        },
        headers=admin,
    )
    assert created.status_code == 201, created.get_json()
    url = f"/api/v1/users/{created.get_json()['id']}"
    assert client.patch(url, json={"full_name": "Zhao Lei"}, headers=admin).status_code == 200
    assert client.patch(url, json={}, headers=admin).status_code == 200
    assert client.patch(url, json={"active": "maybe"}, headers=admin).status_code == 422
    changed = client.patch(
        url,
        json={
            "full_name": "Zhao Lei (north)",
            "active": False,
            "password": "another-pass-phrase-2",
        },
        headers=admin,
    )
    assert changed.status_code == 200, changed.get_json()

    made, updated = _log(client, auth, "user", str(created.get_json()["id"]))
    assert (made["action"], made["actor_id"]) == ("user_created", world.admin.id)
    assert made["details"] == {
        "station_id": world.station.id,
        "by": "admin",
        "username": "zhaolei",
        "role": "courier",
        "full_name": "Zhao Lei",
    }
    assert (updated["action"], updated["actor_id"]) == ("user_updated", world.admin.id)
    assert updated["details"] == {
        "station_id": world.station.id,
        "by": "admin",
        "changes": {
            "full_name": {"from": "Zhao Lei", "to": "Zhao Lei (north)"},
            "active": {"from": True, "to": False},
        },
        "password_changed": True,
    }
    assert "another-pass-phrase-2" not in str(updated) and "$" not in str(updated["details"])
    assert _verified(client, auth)


def test_a_password_alone_set_again_is_on_the_audit_log(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    """A password set to an account is a change, though no field shows it."""
    answer = client.patch(
        f"/api/v1/users/{world.courier.id}",
        json={"password": "a-new-pass-phrase-3"},
        headers=auth.headers("admin"),
    )
    assert answer.status_code == 200, answer.get_json()

    [entry] = _log(client, auth, "user", str(world.courier.id))
    assert entry["details"] == {
        "station_id": world.station.id,
        "by": "admin",
        "changes": {},
        "password_changed": True,
    }


def test_probing_for_another_stations_pda_ids_is_on_record_and_bounded(
    client: FlaskClient, session: Session, world: World, auth: Auth
) -> None:
    """Device ids are unique across stations, so a manager registering an id another
    station's PDA holds gets a 409 ``device_exists``, and their own list (or a 404 for
    ``GET /devices/<id>``) then tells them that station has it: a curious manager could
    try id after id (``PDA-SH-0001``, ``PDA-SH-0002``...) and learn every other
    station's PDAs, each refusal free and unseen. Each is now on the audit log, and once
    a manager met ``DEVICE_IDS_TAKEN_PER_MANAGER`` of them in a day every registration
    of theirs is a 429, a free id's too (the answer then says nothing of the id). Their
    own station's id refused, and an admin's refusals, count for nothing: those PDAs
    are theirs to know."""
    manager = auth.headers("manager1")
    bound = directory.DEVICE_IDS_TAKEN_PER_MANAGER.count
    probed = ["PDA-0002", *(f"PDA-9{n:03d}" for n in range(1, bound))]
    for device_id in probed[1:]:
        factories.device(session, device_id, world.other_station)
    session.commit()
    own = client.post("/api/v1/devices", json={"device_id": "PDA-0001"}, headers=manager)
    assert (own.status_code, own.get_json()["code"]) == (409, "device_exists")
    for device_id in probed:
        probe = client.post("/api/v1/devices", json={"device_id": device_id}, headers=manager)
        # In the words of an id of their own station's: the station is named nowhere.
        said = json.loads(probe.get_data(as_text=True).replace(device_id, "PDA-0001"))
        assert (probe.status_code, said) == (409, own.get_json())
    refused = session.scalars(
        select(AuditEntry)
        .where(AuditEntry.action == "device_registration_refused")
        .order_by(AuditEntry.id)
    ).all()
    assert [(e.actor_id, e.subject_type, e.subject_key) for e in refused] == [
        (world.manager.id, "device", device_id) for device_id in probed
    ]
    assert refused[0].details == {
        "station_id": world.station.id,
        "held_by_station_id": world.other_station.id,
    }

    free = client.post("/api/v1/devices", json={"device_id": "PDA-0777"}, headers=manager)
    assert (free.status_code, free.get_json()["code"]) == (429, "too_many_device_ids_taken")
    assert 0 < int(free.headers["Retry-After"]) <= 24 * 3600
    assert "(at most 10 in 24 hours)" in free.get_json()["message"]
    taken = client.post("/api/v1/devices", json={"device_id": "PDA-0002"}, headers=manager)
    assert taken.get_json() == free.get_json()  # the same whatever the id
    assert client.get("/api/v1/devices/PDA-0777", headers=manager).status_code == 404
    assert (
        session.scalar(
            select(func.count())
            .select_from(AuditEntry)
            .where(AuditEntry.action == "device_registration_refused")
        )
        == bound
    )

    # Another manager, and an admin, register as before.
    other = auth.headers("manager2")
    assert (
        client.post("/api/v1/devices", json={"device_id": "PDA-0778"}, headers=other).status_code
        == 201
    )
    admin = auth.headers("admin")
    body = {"device_id": "PDA-0002", "station_id": world.station.id}
    assert client.post("/api/v1/devices", json=body, headers=admin).status_code == 409
    body = {"device_id": "PDA-0779", "station_id": world.station.id}
    assert client.post("/api/v1/devices", json=body, headers=admin).status_code == 201


def test_a_manager_trying_one_taken_id_again_is_counted_once(
    client: FlaskClient, session: Session, world: World, auth: Auth
) -> None:
    """A manager at 07:00 registers the PDA handed over from another station, still
    registered there: 409 ``device_exists``, and they try again (a second click, their
    script's retry, a colleague's try). The id told them all it could the first time, so
    the tries after it count for nothing and add no audit entry of their own: a day's
    bound of another station's ids is spent on that many ids, not on one id tried
    that many times, and the manager then registers their new PDAs. Other ids of other
    stations still count each, so the bound still holds."""
    manager = auth.headers("manager1")
    bound = directory.DEVICE_IDS_TAKEN_PER_MANAGER.count
    for _ in range(bound + 2):
        again = client.post("/api/v1/devices", json={"device_id": "PDA-0002"}, headers=manager)
        assert (again.status_code, again.get_json()["code"]) == (409, "device_exists")
    new = client.post("/api/v1/devices", json={"device_id": "PDA-0777"}, headers=manager)
    assert new.status_code == 201, new.get_json()
    refused = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "device_registration_refused")
    ).all()
    assert [(e.actor_id, e.subject_key) for e in refused] == [(world.manager.id, "PDA-0002")]

    # Other stations' ids, each counted once: the bound's worth, and then a 429.
    admin = auth.headers("admin")
    for n in range(1, bound):
        body = {"device_id": f"PDA-9{n:03d}", "station_id": world.other_station.id}
        assert client.post("/api/v1/devices", json=body, headers=admin).status_code == 201
        taken = client.post(
            "/api/v1/devices", json={"device_id": f"PDA-9{n:03d}"}, headers=manager
        )
        assert taken.status_code == 409
    late = client.post("/api/v1/devices", json={"device_id": "PDA-0778"}, headers=manager)
    assert (late.status_code, late.get_json()["code"]) == (429, "too_many_device_ids_taken")


def test_a_station_sent_a_dozen_pdas_is_not_locked_out_once_they_are_moved_there(
    client: FlaskClient, session: Session, world: World, auth: Auth
) -> None:
    """Found by a security review (SECURITY.md threat 3): ST2 sends ST1 a dozen PDAs. ST1's
    manager, unpacking them, tries to register each (the natural first step): 409
    ``device_exists`` for each, every one counted as an id of another station's, and
    the tenth locked them out (429) for 24 hours. The admin then moved the PDAs to ST1,
    as the 409 says; the manager still could not register the new PDA bought the same
    day, nor any other, until the next morning. Ids now at the manager's own station,
    moved there, were theirs to know: their refusals count for nothing any more (they
    stay on the audit log), and the bound holds for the ids still elsewhere."""
    manager, admin = auth.headers("manager1"), auth.headers("admin")
    bound = directory.DEVICE_IDS_TAKEN_PER_MANAGER.count
    sent = [f"PDA-7{n:03d}" for n in range(bound + 2)]
    for device_id in sent:
        factories.device(session, device_id, world.other_station)
    session.commit()
    answers = [
        client.post("/api/v1/devices", json={"device_id": device_id}, headers=manager)
        for device_id in sent
    ]
    assert [a.status_code for a in answers] == [409] * bound + [429, 429]
    for device_id in sent:
        moved = client.post(
            f"/api/v1/devices/{device_id}/move",
            json={"station_id": world.station.id},
            headers=admin,
        )
        assert moved.status_code == 200, moved.get_json()

    new = client.post("/api/v1/devices", json={"device_id": "PDA-0777"}, headers=manager)
    assert new.status_code == 201, new.get_json()
    refused = select(func.count()).where(AuditEntry.action == "device_registration_refused")
    assert session.scalar(refused) == bound  # on record still

    # Ids of other stations still count, the bound's worth of them.
    for n in range(bound):
        factories.device(session, f"PDA-9{n:03d}", world.other_station)
    session.commit()
    probes = [
        client.post("/api/v1/devices", json={"device_id": f"PDA-9{n:03d}"}, headers=manager)
        for n in range(bound)
    ]
    assert [p.status_code for p in probes] == [409] * bound
    late = client.post("/api/v1/devices", json={"device_id": "PDA-0778"}, headers=manager)
    assert (late.status_code, late.get_json()["code"]) == (429, "too_many_device_ids_taken")


def test_a_pda_moved_away_again_counts_again(
    client: FlaskClient, session: Session, world: World, auth: Auth
) -> None:
    """Only ids at the manager's station now are forgiven: a PDA moved to ST1 and back
    to ST2 (or on to another station) within the day is another station's again, and
    the manager's refusal for it counts as before."""
    manager, admin = auth.headers("manager1"), auth.headers("admin")
    bound = directory.DEVICE_IDS_TAKEN_PER_MANAGER.count
    ids = [f"PDA-7{n:03d}" for n in range(bound)]
    for device_id in ids:
        factories.device(session, device_id, world.other_station)
    session.commit()
    for device_id in ids:
        taken = client.post("/api/v1/devices", json={"device_id": device_id}, headers=manager)
        assert taken.status_code == 409
    for station in (world.station, world.other_station):
        moved = client.post(
            f"/api/v1/devices/{ids[0]}/move", json={"station_id": station.id}, headers=admin
        )
        assert moved.status_code == 200, moved.get_json()
    late = client.post("/api/v1/devices", json={"device_id": "PDA-0778"}, headers=manager)
    assert (late.status_code, late.get_json()["code"]) == (429, "too_many_device_ids_taken")


def test_the_bound_on_other_stations_ids_is_a_setting(
    app_with: Callable[..., Flask], session: Session, world: World
) -> None:
    """``DEVICE_IDS_TAKEN_PER_MANAGER`` (``COUNT/SECONDS``) bounds a manager's refusals for
    other stations' ids as the other limits are bounded: a station that often receives
    PDAs loosens it, a cautious one tightens it."""
    client = app_with(DEVICE_IDS_TAKEN_PER_MANAGER=Limit.parse("2/600")).test_client()
    manager = Auth(client).headers("manager1")
    factories.device(session, "PDA-9001", world.other_station)
    session.commit()
    for device_id in ("PDA-0002", "PDA-9001"):
        taken = client.post("/api/v1/devices", json={"device_id": device_id}, headers=manager)
        assert taken.status_code == 409
    late = client.post("/api/v1/devices", json={"device_id": "PDA-0778"}, headers=manager)
    assert (late.status_code, late.get_json()["code"]) == (429, "too_many_device_ids_taken")
    assert "at most 2 in 10 minutes" in late.get_json()["message"]
    assert 0 < int(late.headers["Retry-After"]) <= 600


def test_with_the_bound_off_each_ids_refusal_is_still_on_record(
    app_with: Callable[..., Flask], session: Session, world: World
) -> None:
    """``off``: no 429 however many ids of other stations a manager meets, and each id's
    refusal still on the audit log for an admin to see."""
    client = app_with(DEVICE_IDS_TAKEN_PER_MANAGER=None).test_client()
    manager = Auth(client).headers("manager1")
    bound = directory.DEVICE_IDS_TAKEN_PER_MANAGER.count
    for n in range(bound + 1):
        factories.device(session, f"PDA-9{n:03d}", world.other_station)
    session.commit()
    for n in range(bound + 1):
        body = {"device_id": f"PDA-9{n:03d}"}
        assert client.post("/api/v1/devices", json=body, headers=manager).status_code == 409
    new = client.post("/api/v1/devices", json={"device_id": "PDA-0777"}, headers=manager)
    assert new.status_code == 201, new.get_json()
    refused = select(func.count()).where(AuditEntry.action == "device_registration_refused")
    assert session.scalar(refused) == bound + 1


def test_with_the_bound_off_an_id_tried_again_is_on_record_once_a_day(
    app_with: Callable[..., Flask], session: Session, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``off`` bounds nothing, but a script retrying one id another station holds wrote
    an audit entry per try: the append-only log, which every verification walks, grew
    without end. The id's refusal is on record once in the default window (24 hours),
    as it is when bounded: a try again tells an auditor nothing its first entry does
    not, and is answered alike; a day later it is on record again."""
    client = app_with(DEVICE_IDS_TAKEN_PER_MANAGER=None).test_client()
    manager = Auth(client).headers("manager1")
    factories.device(session, "PDA-9001", world.other_station)
    session.commit()
    body = {"device_id": "PDA-9001"}
    answers = [client.post("/api/v1/devices", json=body, headers=manager) for _ in range(5)]
    assert {(a.status_code, a.get_json()["code"]) for a in answers} == {(409, "device_exists")}
    assert len({a.get_json()["message"] for a in answers}) == 1
    refused = select(AuditEntry).where(AuditEntry.action == "device_registration_refused")
    [entry] = session.scalars(refused).all()
    assert (entry.subject_key, entry.details["held_by_station_id"]) == (
        "PDA-9001",
        world.other_station.id,
    )

    day_later = utcnow() + directory.DEVICE_IDS_TAKEN_PER_MANAGER.window
    monkeypatch.setattr("sync.directory.utcnow", lambda: day_later)
    again = client.post("/api/v1/devices", json=body, headers=manager)
    assert again.status_code == 409
    assert len(session.scalars(refused).all()) == 2


def test_the_bound_on_other_stations_ids_defaults_to_ten_a_day(tmp_path: Path) -> None:
    name = "DEVICE_IDS_TAKEN_PER_MANAGER"
    assert load_config({}, tmp_path)[name] == Limit(10, dt.timedelta(hours=24))
    assert load_config({}, tmp_path)[name] == directory.DEVICE_IDS_TAKEN_PER_MANAGER
    assert load_config({name: "30/86400"}, tmp_path)[name] == Limit(30, dt.timedelta(days=1))
    assert load_config({name: "off"}, tmp_path)[name] is None
    with pytest.raises(ConfigError, match=name):
        load_config({name: "10 a day"}, tmp_path)


def test_a_pda_moved_away_again_counts_again_though_the_manager_registered_meanwhile(
    client: FlaskClient, session: Session, world: World, auth: Auth
) -> None:
    """Found by a second reading: a refusal was forgiven by deleting its count at the
    manager's first registration while the PDA stood at their station, so that moved
    away again it counted no more, against ``test_a_pda_moved_away_again_counts_again``
    (which makes no registration in between). Only an id at the manager's station now
    counts for nothing, whatever the manager did while it stood there."""
    manager, admin = auth.headers("manager1"), auth.headers("admin")
    bound = directory.DEVICE_IDS_TAKEN_PER_MANAGER.count
    ids = [f"PDA-7{n:03d}" for n in range(bound)]
    for device_id in ids:
        factories.device(session, device_id, world.other_station)
    session.commit()
    for device_id in ids:
        taken = client.post("/api/v1/devices", json={"device_id": device_id}, headers=manager)
        assert taken.status_code == 409

    def move(station_id: int) -> None:
        moved = client.post(
            f"/api/v1/devices/{ids[0]}/move", json={"station_id": station_id}, headers=admin
        )
        assert moved.status_code == 200, moved.get_json()

    move(world.station.id)
    new = client.post("/api/v1/devices", json={"device_id": "PDA-0777"}, headers=manager)
    assert new.status_code == 201, new.get_json()  # ids[0] stands at ST1: forgiven
    move(world.other_station.id)
    late = client.post("/api/v1/devices", json={"device_id": "PDA-0778"}, headers=manager)
    assert late.status_code == 429, late.get_json()
    assert late.get_json()["code"] == "too_many_device_ids_taken"
    again = client.post("/api/v1/devices", json={"device_id": ids[0]}, headers=manager)
    assert (again.status_code, again.get_json()["code"]) == (429, "too_many_device_ids_taken")
    refused = select(func.count()).where(AuditEntry.action == "device_registration_refused")
    assert session.scalar(refused) == bound  # its first refusal stands for it still
