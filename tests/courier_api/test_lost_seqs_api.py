"""A manager writes off the seqs a PDA lost: receipts, balances and late arrivals after."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from courier_api.api.devices import routes as devices_routes
from courier_api.api.webhooks.schemas import WebhookBalance
from models import AuditEntry, SeqWriteOff
from sync.audit import verify
from tests import factories
from tests.conftest import Auth, World
from tests.courier_api.test_shifts_api import Courier, balance, parcels, sign_off
from tests.courier_api.test_web_pages import signed_in
from tests.sync.test_consent_requests import messages, subscribe

REASON = "PDA reset on 4 December: its unsent scans are gone"


def lost_seqs(
    client: FlaskClient, headers: dict[str, str], device_id: str = "PDA-0001", **body: Any
) -> Any:
    body.setdefault("reason", REASON)
    return client.post(f"/api/v1/devices/{device_id}/lost-seqs", json=body, headers=headers)


@pytest.fixture
def pda(client: FlaskClient, auth: Auth, world: World) -> Courier:
    return Courier(client, auth, "courier1", "PDA-0001")


@pytest.fixture
def manager(auth: Auth, world: World) -> dict[str, str]:
    return auth.headers("manager1")


def lost_in_the_middle(
    session: Session, world: World, pda: Courier
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """A shift of seqs 1-6 whose PDA sent 1, 2, 5 and 6, then lost 3 and 4 in a reset:
    the shift, its six events, the last receipt."""
    a, b = parcels(session, world, 2)
    shift = pda.open(first_seq=1)
    events = [
        pda.event(a),
        pda.event(b),
        pda.event(a, "delivered"),
        pda.event(b, "returned_to_station"),
        pda.event(a, "out_for_delivery"),
        pda.event(b, "out_for_delivery"),
    ]
    pda.push(events[:2])
    receipt = pda.push(events[4:])
    assert pda.close(shift["id"], last_seq=6).status_code == 200
    return shift, events, receipt


def test_without_a_write_off_lost_seqs_hold_the_acknowledgement_back_for_good(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    shift, events, receipt = lost_in_the_middle(session, world, pda)
    assert (receipt["acked_through_seq"], receipt["missing_seqs"]) == (2, [3, 4])
    receipt = pda.push([pda.event(events[0]["tracking_no"], "out_for_delivery")])
    assert (receipt["acked_through_seq"], receipt["missing_seqs"]) == (2, [3, 4])
    assert balance(client, shift["id"], manager)["status"] == "provisional"


def test_a_manager_writes_lost_seqs_off_and_the_next_receipt_acknowledges_past_them(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    _, events, _ = lost_in_the_middle(session, world, pda)
    response = lost_seqs(client, manager, seqs=[4], ranges=[{"first": 3, "last": 3}])
    assert response.status_code == 201, response.get_json()
    done = response.get_json()
    assert done["ranges"] == [{"first": 3, "last": 4}]
    assert (done["seq_count"], done["reason"], done["written_off_by"]) == (
        2,
        REASON,
        world.manager.id,
    )
    # Not past 3 and 4: 5 and 6 came before the write-off, and a PDA that sent them
    # first may hold 3 and 4 still, unsent. The reset PDA's next event passes them.
    assert (done["acked_through_seq"], done["missing_seqs"], done["missing_seq_count"]) == (
        2,
        [],
        0,
    )
    receipt = pda.push([pda.event(events[0]["tracking_no"], "out_for_delivery")])
    assert (receipt["acked_through_seq"], receipt["missing_seqs"]) == (7, [])
    assert receipt["missing_seq_count"] == 0


def test_the_balance_names_written_off_seqs_and_is_no_longer_provisional_for_them(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    shift, _, _ = lost_in_the_middle(session, world, pda)
    before = balance(client, shift["id"], manager)
    assert (before["status"], before["missing_seqs"], before["written_off_seqs"]) == (
        "provisional",
        [3, 4],
        [],
    )
    assert lost_seqs(client, manager, ranges=[{"first": 3, "last": 4}]).status_code == 201
    after = balance(client, shift["id"], manager)
    # Its parcels' outcomes were on the lost seqs: missing now, no longer provisional.
    assert (after["status"], after["missing"], after["missing_seqs"]) == ("unbalanced", 2, [])
    assert (after["written_off_seqs"], after["written_off_seq_count"]) == ([3, 4], 2)
    (write_off,) = after["write_offs"]
    assert write_off["ranges"] == [{"first": 3, "last": 4}]
    assert (write_off["reason"], write_off["written_off_by"]) == (REASON, world.manager.id)
    assert write_off["written_off_by_name"] and write_off["written_off_at"]
    assert after["version"] != before["version"]
    # Signed off now without forcing: nothing is provisional any more.
    assert sign_off(client, shift["id"], manager, note="two parcels lost").status_code == 200


def test_a_written_off_seq_that_arrives_after_all_is_taken_and_its_write_off_is_moot(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    shift, events, _ = lost_in_the_middle(session, world, pda)
    assert lost_seqs(client, manager, ranges=[{"first": 3, "last": 4}]).status_code == 201
    receipt = pda.push([events[2]])  # seq 3 was on a card the courier found after all
    assert receipt["results"][0]["status"] == "applied"
    # Not past 4, written off but maybe on that card too: 5 and 6 came before the write-off.
    assert (receipt["acked_through_seq"], receipt["missing_seqs"]) == (3, [])
    found = balance(client, shift["id"], manager)
    assert (found["delivered"], found["written_off_seqs"]) == (1, [4])
    assert found["write_offs"][0]["ranges"] == [{"first": 4, "last": 4}]
    receipt = pda.push([events[3]])
    assert receipt["results"][0]["status"] == "applied"
    assert receipt["acked_through_seq"] == 6
    found = balance(client, shift["id"], manager)
    assert (found["status"], found["written_off_seqs"], found["write_offs"]) == (
        "balanced",
        [],
        [],
    )
    assert found["written_off_seq_count"] == 0


def test_a_write_off_is_audit_logged_in_the_chain(
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
) -> None:
    lost_in_the_middle(session, world, pda)
    done = lost_seqs(client, manager, seqs=[3, 4]).get_json()
    entry = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "lost_seqs_written_off")
    ).one()
    assert (entry.actor_id, entry.subject_type, entry.subject_key) == (
        world.manager.id,
        "device",
        "PDA-0001",
    )
    assert entry.details == {
        "station_id": world.station.id,
        "write_off_id": done["id"],
        "ranges": [[3, 4]],
        "seq_count": 2,
        "reason": REASON,
        "acked_through_seq": 2,
    }
    assert verify(session=session).ok


def test_only_missing_seqs_may_be_written_off(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    shift, _, _ = lost_in_the_middle(session, world, pda)
    refused = lost_seqs(client, manager, seqs=[2, 3, 4, 9], ranges=[{"first": 11, "last": 12}])
    assert refused.status_code == 422
    body = refused.get_json()
    assert (body["code"], list(body["errors"])) == ("seqs_not_missing", ["seqs"])
    assert "seqs 2, 9, 11-12 of device PDA-0001 are not missing" in body["message"]
    # Each refused range with why: held, or beyond the last_seq 6 the shift declared.
    assert "the server holds 2; 9, 11-12 are beyond seq 6" in body["message"]
    backwards = lost_seqs(client, manager, ranges=[{"first": 4, "last": 3}])
    assert (backwards.status_code, backwards.get_json()["code"]) == (422, "invalid_range")
    nothing = lost_seqs(client, manager)
    assert (nothing.status_code, nothing.get_json()["code"]) == (422, "seqs_required")
    # Nothing was written off by the refusals.
    assert balance(client, shift["id"], manager)["missing_seqs"] == [3, 4]
    assert (
        session.scalars(
            select(AuditEntry).where(AuditEntry.action == "lost_seqs_written_off")
        ).all()
        == []
    )


def test_a_write_off_needs_a_reason(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    lost_in_the_middle(session, world, pda)
    url = "/api/v1/devices/PDA-0001/lost-seqs"
    missing = client.post(url, json={"seqs": [3]}, headers=manager)
    assert missing.status_code == 422
    assert "reason" in missing.get_json()["errors"]["json"]
    blank = lost_seqs(client, manager, seqs=[3], reason="   ")
    assert (blank.status_code, blank.get_json()["code"]) == (422, "reason_required")


def test_only_a_manager_of_the_devices_station_or_an_admin_writes_seqs_off(
    client: FlaskClient, session: Session, world: World, pda: Courier, auth: Auth
) -> None:
    lost_in_the_middle(session, world, pda)
    other = lost_seqs(client, auth.headers("manager2"), seqs=[3])
    # Another station's PDA answers what an unknown one does: it does not show it exists.
    assert (other.status_code, other.get_json()["code"]) == (404, "device_not_found")
    unknown = lost_seqs(client, auth.headers("manager1"), device_id="PDA-9999", seqs=[3])
    assert (unknown.status_code, unknown.get_json()["code"]) == (404, "device_not_found")
    courier = lost_seqs(client, pda.headers, seqs=[3])
    assert courier.status_code == 403
    auditor = lost_seqs(client, auth.headers("auditor1"), seqs=[3])
    assert auditor.status_code == 403
    admin = lost_seqs(client, auth.headers("admin"), seqs=[3])
    assert admin.status_code == 201
    assert admin.get_json()["missing_seqs"] == [4]


def test_a_shift_closed_after_a_write_off_announces_its_written_off_seqs(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    """Written off while the shift is still open, the seqs are named in the balance of
    ``shift.unbalanced`` (its webhook schema documents them), not as missing."""
    subscribe(session, "shift.unbalanced")
    (a,) = parcels(session, world, 1)
    shift = pda.open(first_seq=1)
    events = [pda.event(a), pda.event(a, "delivered"), pda.event(a, "out_for_delivery")]
    pda.push([events[0], events[2]])  # seq 2 was lost with the PDA's storage
    assert lost_seqs(client, manager, seqs=[2]).status_code == 201
    assert pda.close(shift["id"], last_seq=3).status_code == 200
    [message] = messages(session, "shift.unbalanced")
    balance = message.payload["balance"]
    assert set(balance) <= set(WebhookBalance().fields)  # as documented
    assert (balance["status"], balance["missing_seqs"]) == ("unbalanced", [])
    assert (balance["written_off_seqs"], balance["written_off_seq_count"]) == ([2], 1)


# -- GET /devices/<id>/lost-seqs: the PDA's write-offs ----------------------------------------


def write_offs(
    client: FlaskClient, headers: dict[str, str], device_id: str = "PDA-0001", **query: Any
) -> Any:
    return client.get(
        f"/api/v1/devices/{device_id}/lost-seqs", query_string=query, headers=headers
    )


def test_a_pdas_write_offs_are_listed_newest_first_with_who_by_name(
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
    auth: Auth,
) -> None:
    """Each as written off, with who by name; a seq of it that arrived after all (3)
    leaves it listed as it was: the list is the record of the decisions."""
    world.manager.full_name = "Li Na"
    session.commit()
    _, events, _ = lost_in_the_middle(session, world, pda)
    assert write_offs(client, manager).get_json() == {"items": [], "next_after": None}
    first = lost_seqs(client, manager, seqs=[3]).get_json()
    second = lost_seqs(client, auth.headers("admin"), seqs=[4], reason="flash broken").get_json()
    pda.push([events[2]])  # seq 3 turns up after all
    for reader in (manager, auth.headers("admin"), auth.headers("auditor1")):
        response = write_offs(client, reader)
        assert response.status_code == 200, response.get_json()
        page = response.get_json()
        assert [item["id"] for item in page["items"]] == [second["id"], first["id"]]
        assert page["next_after"] is None
    newest, oldest = page["items"]
    assert newest == {
        "id": second["id"],
        "device_id": "PDA-0001",
        "ranges": [{"first": 4, "last": 4}],
        "seq_count": 1,
        "reason": "flash broken",
        "written_off_by": world.admin.id,
        "written_off_by_name": "admin",  # no full name: the username
        "written_off_at": second["written_off_at"],
        "still_written_off": [{"first": 4, "last": 4}],
        "arrived_seq_count": 0,
    }
    assert (oldest["ranges"], oldest["seq_count"], oldest["reason"]) == (
        [{"first": 3, "last": 3}],
        1,
        REASON,
    )
    assert (oldest["still_written_off"], oldest["arrived_seq_count"]) == ([], 1)
    assert (oldest["written_off_by"], oldest["written_off_by_name"]) == (world.manager.id, "Li Na")


def test_an_auditors_read_of_a_pdas_write_offs_is_audit_logged(
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
    auth: Auth,
) -> None:
    """Rule 7: the seqs a manager wrote off are evidence (what a balance no longer waits
    for), read by an auditor as a proof is: on record, naming what was listed. A
    manager's and an admin's reads are not."""
    lost_in_the_middle(session, world, pda)
    first = lost_seqs(client, manager, seqs=[3]).get_json()
    second = lost_seqs(client, manager, seqs=[4]).get_json()
    reads = select(AuditEntry).where(AuditEntry.action == "lost_seqs_read")
    for reader in (manager, auth.headers("admin")):
        assert write_offs(client, reader).status_code == 200
    assert session.scalars(reads).all() == []
    auditor = auth.headers("auditor1")
    assert write_offs(client, auditor).status_code == 200
    assert write_offs(client, auditor, limit=1, after=second["id"]).status_code == 200
    entries = session.scalars(reads.order_by(AuditEntry.id)).all()
    assert [(e.actor_id, e.subject_type, e.subject_key) for e in entries] == [
        (world.auditor.id, "device", "PDA-0001")
    ] * 2
    assert [e.details for e in entries] == [
        {"after": None, "ids": [second["id"], first["id"]]},
        {"after": second["id"], "ids": [first["id"]]},
    ]
    assert verify(session=session).ok


def test_an_auditors_read_of_write_offs_failing_after_its_record_leaves_none(
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
    auth: Auth,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``GET /devices/<id>/lost-seqs`` put the auditor's read on record
    (``lost_seqs_read``), then built the answer from the write-offs: a read failing
    after the record left a read on record that the auditor was never shown. A read is
    on record when, and only when, it is shown: recorded last, as a proof's is."""
    lost_in_the_middle(session, world, pda)
    assert lost_seqs(client, manager, seqs=[3]).status_code == 201

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("the write-off could not be shown")

    monkeypatch.setattr(devices_routes, "_write_off_fields", broken)
    before = session.scalars(select(AuditEntry.action)).all()
    try:
        response = write_offs(client, auth.headers("auditor1"))
        assert response.status_code >= 500, response.status_code
    except RuntimeError:  # raised through the test client
        pass
    session.expire_all()
    assert session.scalars(select(AuditEntry.action)).all() == before


def test_the_write_off_list_says_which_seqs_the_pda_sent_after_all(
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
    auth: Auth,
) -> None:
    """Seqs 3-4 written off, then the PDA sent seq 3 after all (a card the courier
    found): the list showed the write-off as made, so neither the manager nor an
    auditor could tell which write-offs the PDA later disproved. Each item now says
    what of it still stands (`still_written_off`: its ranges within the device's
    written-off seqs now) and how many of its seqs arrived since, its `ranges` still
    as written off."""
    _, events, _ = lost_in_the_middle(session, world, pda)
    assert lost_seqs(client, manager, ranges=[{"first": 3, "last": 4}]).status_code == 201

    def listed(headers: dict[str, str]) -> list[tuple[Any, ...]]:
        items = write_offs(client, headers).get_json()["items"]
        return [
            (w["ranges"], w["seq_count"], w["still_written_off"], w["arrived_seq_count"])
            for w in items
        ]

    as_made = [{"first": 3, "last": 4}]
    assert listed(manager) == [(as_made, 2, as_made, 0)]
    pda.push([events[2]])  # seq 3
    for reader in (manager, auth.headers("auditor1")):
        assert listed(reader) == [(as_made, 2, [{"first": 4, "last": 4}], 1)]
    pda.push([events[3]])  # seq 4: nothing of the write-off stands
    assert listed(manager) == [(as_made, 2, [], 2)]


def test_who_wrote_seqs_off_is_named_only_to_who_may_know_them(
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
    auth: Auth,
) -> None:
    """The balance and the write-off list named who wrote the seqs off whatever their
    station: manager1 moved to ST2 since, and ST1's new manager still read "Li Na",
    where a proof's detail gives another station's user by id only (SECURITY.md
    threat 3). An admin who wrote some off is named to every reader, as on a proof; an
    auditor reads every name."""
    world.manager.full_name = "Li Na"
    session.commit()
    shift, _, _ = lost_in_the_middle(session, world, pda)
    assert lost_seqs(client, manager, seqs=[3]).status_code == 201
    assert lost_seqs(client, auth.headers("admin"), seqs=[4], reason="flash").status_code == 201
    factories.user(session, "manager3", "station_manager", world.station)
    world.manager.station_id = world.other_station.id
    session.commit()

    def names(username: str) -> tuple[list[Any], list[Any]]:
        headers = auth.headers(username)
        on_balance = balance(client, shift["id"], headers)["write_offs"]
        listed = write_offs(client, headers).get_json()["items"]
        return (
            [(w["written_off_by"], w["written_off_by_name"]) for w in on_balance],
            [(w["written_off_by"], w["written_off_by_name"]) for w in listed],
        )

    theirs, admin = (world.manager.id, None), (world.admin.id, "admin")
    assert names("manager3") == ([theirs, admin], [admin, theirs])
    named = (world.manager.id, "Li Na")
    assert names("auditor1") == ([named, admin], [admin, named])


def test_a_manager_lists_only_their_own_stations_write_offs_of_a_pda_moved_to_them(
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
    auth: Auth,
) -> None:
    """PDA-0001 wrote off seq 3 at ST1, then moved to ST2: ST2's manager listed ST1's
    write-off, its reason and all, though ST1's shifts are not theirs (a manager sees
    their own station's). Now they list those made at ST2 only; an auditor reads both."""
    lost_in_the_middle(session, world, pda)
    at_st1 = lost_seqs(client, manager, seqs=[3]).get_json()["id"]
    world.device.station_id = world.other_station.id
    factories.user(session, "courier2", "courier", world.other_station)
    session.commit()
    # ST2's first shift declares seq 8 its first: seq 7 is no shift's, ST2's to write off.
    Courier(client, auth, "courier2", "PDA-0001").open(first_seq=8)
    moved = auth.headers("manager2")
    at_st2 = lost_seqs(client, moved, seqs=[7], reason="found broken at ST2").get_json()["id"]

    def listed(headers: dict[str, str]) -> list[int]:
        response = write_offs(client, headers)
        assert response.status_code == 200, response.get_json()
        return [item["id"] for item in response.get_json()["items"]]

    assert listed(moved) == [at_st2]
    assert listed(auth.headers("auditor1")) == listed(auth.headers("admin")) == [at_st2, at_st1]


def test_a_close_records_as_held_seq_at_close_the_seqs_that_arrived_not_those_written_off(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    """The PDA sent seqs 1-2 of a shift closed at 4, and 3-4 were written off as lost;
    the manager closed the next shift for its dead PDA, and the log's `seq_at_close`,
    "the seq the server held from the PDA then", said 4: a write-off raises the
    device's highest seq over seqs that never arrived. It says 2 now."""
    a, b = parcels(session, world, 2)
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(b)])
    assert pda.close(shift["id"], last_seq=4).status_code == 200
    assert lost_seqs(client, manager, ranges=[{"first": 3, "last": 4}]).status_code == 201
    pda.seq = 4
    following = pda.open(first_seq=5)
    closed = client.post(f"/api/v1/shifts/{following['id']}/close", json={}, headers=manager)
    assert closed.status_code == 200, closed.get_json()
    entry = session.scalars(
        select(AuditEntry).where(
            AuditEntry.action == "shift_closed_for_courier",
            AuditEntry.subject_key == str(following["id"]),
        )
    ).one()
    assert entry.details["seq_at_close"] == 2


def test_a_pdas_write_offs_are_paginated_by_the_last_id_seen(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    lost_in_the_middle(session, world, pda)
    ids = [lost_seqs(client, manager, seqs=[seq]).get_json()["id"] for seq in (3, 4)]
    first = write_offs(client, manager, limit=1).get_json()
    assert ([item["id"] for item in first["items"]], first["next_after"]) == ([ids[1]], ids[1])
    second = write_offs(client, manager, limit=1, after=first["next_after"]).get_json()
    assert ([item["id"] for item in second["items"]], second["next_after"]) == ([ids[0]], ids[0])
    last = write_offs(client, manager, limit=1, after=second["next_after"]).get_json()
    assert last == {"items": [], "next_after": None}
    too_many = write_offs(client, manager, limit=501)
    assert too_many.status_code == 422


def test_a_pdas_write_offs_are_hidden_from_other_stations_and_refused_to_couriers(
    client: FlaskClient, session: Session, world: World, pda: Courier, auth: Auth
) -> None:
    """Another station's manager gets what an unknown PDA answers, body and all (it does
    not show the PDA exists), as the write-off itself answers them; a courier, even
    the PDA's own, may not read them."""
    lost_in_the_middle(session, world, pda)
    assert lost_seqs(client, auth.headers("manager1"), seqs=[3]).status_code == 201
    other = write_offs(client, auth.headers("manager2"))
    unknown = write_offs(client, auth.headers("manager2"), device_id="PDA-9999")
    assert (other.status_code, other.get_json()["code"]) == (404, "device_not_found")
    assert (unknown.status_code, unknown.get_json()["code"]) == (404, "device_not_found")
    assert other.get_json()["message"] == unknown.get_json()["message"].replace(
        "PDA-9999", "PDA-0001"
    )
    courier = write_offs(client, pda.headers)
    assert (courier.status_code, courier.get_json()["code"]) == (403, "role_forbidden")
    # That manager reads their own station's PDA: it has none.
    own = write_offs(client, auth.headers("manager2"), device_id="PDA-0002")
    assert own.get_json() == {"items": [], "next_after": None}


def test_a_manager_may_not_write_off_seqs_of_a_shift_of_the_station_a_pda_moved_from(
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
    auth: Auth,
) -> None:
    """PDA-0001 lost seqs 3 and 4 of a shift at ST1, then moved to ST2: ST2's manager
    wrote them off, the write-off taking the PDA's station at the time, though the seqs
    are ST1's shift's handover (rule 7: managers act on their own station). Refused
    now, naming the seqs and the shift owning them; an admin may."""
    shift, _, _ = lost_in_the_middle(session, world, pda)
    world.device.station_id = world.other_station.id
    session.commit()
    refused = lost_seqs(client, auth.headers("manager2"), seqs=[3, 4])
    assert refused.status_code == 403, refused.get_json()
    body = refused.get_json()
    assert body["code"] == "seqs_of_another_station"
    assert f"shift {shift['id']} of station ST1" in body["message"]
    assert "3-4" in body["message"]
    assert "leave these to that station's manager or an admin" in body["message"]
    assert balance(client, shift["id"], manager)["missing_seqs"] == [3, 4]


def test_the_manager_of_the_station_a_pda_moved_from_writes_off_its_shifts_lost_seqs(
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
    auth: Auth,
) -> None:
    """Seqs 3-4 of ST1's shift are ST1's handover, also once the PDA moved to ST2: ST1's
    manager writes them off (the PDA answered them 404, as another station's, and only
    an admin could), the write-off made at ST1 (listed to ST1, not to ST2); seqs of no
    shift stay ST2's. A manager whose station the PDA never ran a shift at is answered
    what an unknown id answers."""
    shift, _, _ = lost_in_the_middle(session, world, pda)
    world.device.station_id = world.other_station.id
    third = factories.station(session, code="ST3")
    factories.user(session, "manager3", "station_manager", third)
    session.commit()
    unknown = lost_seqs(client, auth.headers("manager3"), seqs=[3, 4])
    assert unknown.status_code == 404, unknown.get_json()
    done = lost_seqs(client, manager, seqs=[3, 4])
    assert done.status_code == 201, done.get_json()
    written = session.get_one(SeqWriteOff, done.get_json()["id"])
    assert written.station_id == world.station.id
    after = balance(client, shift["id"], manager)
    assert (after["missing_seqs"], after["written_off_seqs"]) == ([], [3, 4])
    listed = write_offs(client, auth.headers("manager2")).get_json()["items"]
    assert listed == []
    # ST1's manager lists the write-off they made (the PDA answered them 404).
    mine = write_offs(client, manager)
    assert mine.status_code == 200, mine.get_json()
    assert [item["id"] for item in mine.get_json()["items"]] == [written.id]
    assert write_offs(client, auth.headers("manager3")).status_code == 404


def test_a_manager_writes_off_seqs_of_no_shift_on_a_pda_moved_to_their_station(
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    auth: Auth,
) -> None:
    """The seqs between ST1's last shift (declared to end at 6) and ST2's first
    (declared to start at 10) belong to no shift: the PDA's station, ST2, writes them
    off."""
    lost_in_the_middle(session, world, pda)
    world.device.station_id = world.other_station.id
    factories.user(session, "courier2", "courier", world.other_station)
    session.commit()
    Courier(client, auth, "courier2", "PDA-0001").open(first_seq=10)
    response = lost_seqs(client, auth.headers("manager2"), ranges=[{"first": 7, "last": 9}])
    assert response.status_code == 201, response.get_json()
    refused = lost_seqs(client, auth.headers("manager2"), seqs=[3])
    assert refused.get_json()["code"] == "seqs_of_another_station"


def test_the_shift_page_of_a_pda_moved_since_offers_its_lost_seqs_write_off(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    """The page said the PDA's new station's manager writes the seqs off, and refused
    the form (device_moved), though that manager may not (the seqs are this station's
    shift's). It offers the form, saying so, and the write-off is made."""
    shift, _, _ = lost_in_the_middle(session, world, pda)
    world.device.station_id = world.other_station.id
    session.commit()
    pages = signed_in(client.application, "manager1")
    html = pages.get(f"/web/shifts/{shift['id']}")
    assert 'id="pda-elsewhere"' in html and 'id="write-off-lost-seqs"' in html
    assert "write off here the seqs this station" in html
    done = pages.post(f"/web/shifts/{shift['id']}/lost-seqs", seqs="3-4", reason=REASON)
    assert done.status_code == 302, done.get_data(as_text=True)
    assert balance(client, shift["id"], manager)["written_off_seqs"] == [3, 4]


def test_a_phone_in_a_write_offs_reason_is_masked_except_for_auditors(
    client: FlaskClient,
    session: Session,
    world: World,
    auth: Auth,
    pda: Courier,
    manager: dict[str, str],
) -> None:
    """The manager writes down the number of the recipient they called about the lost
    scans; the courier reading their shift's balance, another manager, an admin and the
    manager's own answer get it masked, as a note on a flag or a sign-off (rule 7)."""
    shift, _, _ = lost_in_the_middle(session, world, pda)
    typed = "PDA reset; recipient on +86 138 1234 5678 says parcel 2 came back"
    shown = "PDA reset; recipient on +**********678 says parcel 2 came back"
    done = lost_seqs(client, manager, seqs=[3, 4], reason=typed)
    assert done.status_code == 201, done.get_json()
    assert done.get_json()["reason"] == shown

    def reasons(headers: dict[str, str]) -> list[str]:
        listed = client.get("/api/v1/devices/PDA-0001/lost-seqs", headers=headers)
        found = [item["reason"] for item in listed.get_json()["items"]]
        return found + [w["reason"] for w in balance(client, shift["id"], headers)["write_offs"]]

    assert reasons(auth.headers("auditor1")) == [typed, typed]
    for reader in (manager, auth.headers("admin")):
        assert reasons(reader) == [shown, shown]
    assert [w["reason"] for w in balance(client, shift["id"], pda.headers)["write_offs"]] == [
        shown
    ]


def test_a_phone_in_a_write_offs_reason_is_masked_on_the_shift_page_and_in_the_audit_log(
    client: FlaskClient,
    session: Session,
    world: World,
    auth: Auth,
    pda: Courier,
    manager: dict[str, str],
) -> None:
    """The reason is also on the shift's page and in the write-off's audit entry (filed
    under the PDA and the parcels of the shifts owning the seqs): masked for managers
    and admins there too, whole for auditors (rule 7)."""
    shift, _, _ = lost_in_the_middle(session, world, pda)
    typed = "PDA reset; recipient on +86 138 1234 5678 says parcel 2 came back"
    masked = "+**********678"
    assert lost_seqs(client, manager, seqs=[3, 4], reason=typed).status_code == 201
    page = f"/web/shifts/{shift['id']}"
    manager_page = signed_in(client.application, "manager1").get(page)
    assert masked in manager_page and "138 1234 5678" not in manager_page
    assert typed in signed_in(client.application, "auditor1").get(page)

    def reasons(username: str) -> list[str]:
        listed = client.get(
            "/api/v1/audit?action=lost_seqs_written_off", headers=auth.headers(username)
        )
        assert listed.status_code == 200, listed.get_json()
        return [entry["details"]["reason"] for entry in listed.get_json()["items"]]

    assert reasons("auditor1") == [typed]
    assert reasons("admin") == [typed.replace("+86 138 1234 5678", masked)]


def test_seqs_written_off_while_still_on_the_pda_are_not_acknowledged_before_it_sends_them(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    """A PDA offline all afternoon holds seqs 3-6 unsent; its shift was closed with
    last_seq 6, and at 19:00 the manager wrote 3-6 off as lost. Written-off seqs counted
    as held for the acknowledgement, so the receipt of the PDA's first batch back online
    (3 and 4) said acked_through_seq 6, and a PDA pruning up to it, as the contract says,
    deleted 5 and 6, never sent: two scans lost for good. The acknowledgement passes
    written-off seqs only below a seq the server holds (a reset PDA numbers on after
    them, and its next event acknowledges them)."""
    a, b = parcels(session, world, 2)
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(b)])
    queued = [
        pda.event(a, "out_for_delivery"),
        pda.event(b, "out_for_delivery"),
        pda.event(a, "delivered"),
        pda.event(b, "returned_to_station"),
    ]
    closed = client.post(
        f"/api/v1/shifts/{shift['id']}/close", json={"last_seq": 6}, headers=manager
    )
    assert closed.status_code == 200, closed.get_json()
    done = lost_seqs(client, manager, ranges=[{"first": 3, "last": 6}])
    assert done.status_code == 201, done.get_json()
    assert done.get_json()["acked_through_seq"] == 2  # the server holds nothing after 2

    receipt = pda.push(queued[:2])
    assert receipt["acked_through_seq"] == 4  # 5 and 6 are still on the PDA: keep them
    receipt = pda.push(queued[2:])
    assert [r["status"] for r in receipt["results"]] == ["applied", "applied"]
    assert (receipt["acked_through_seq"], receipt["missing_seqs"]) == (6, [])
    found = balance(client, shift["id"], manager)
    assert (found["status"], found["delivered"], found["returned"]) == ("balanced", 1, 1)
