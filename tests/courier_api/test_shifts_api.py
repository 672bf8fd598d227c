"""Shifts over HTTP: open, push, close, balance, board, sign-off; the issue's scenarios."""

from __future__ import annotations

import datetime as dt
import re
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models import AuditEntry, Flag, ScanEvent, Shift, User
from sync.sweeps import SweepSettings, blob_missing_at_handover
from tests import factories
from tests.conftest import Auth, World
from tests.courier_api.test_web_pages import signed_in

SHIFTS = "/api/v1/shifts"
PUSH = "/api/v1/sync/push"
POD = {"recipient_name": "Wang", "signature_sha256": "c" * 64}


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Courier:
    """A courier's PDA over HTTP: numbers its events as it records them."""

    def __init__(self, client: FlaskClient, auth: Auth, username: str, device_id: str) -> None:
        self.client = client
        self.device_id = device_id
        self.headers = auth.headers(username, device_id)
        self.seq = 0

    def open(self, **body: Any) -> dict[str, Any]:
        response = self.client.post(SHIFTS, json=body, headers=self.headers)
        assert response.status_code == 201, response.get_json()
        return response.get_json()

    def event(self, tracking_no: str, type: str = "checked_out", **fields: Any) -> dict:
        self.seq += 1
        fields.setdefault("occurred_at", now())
        if type == "delivered":
            fields.setdefault("pod", POD)
        return factories.event(self.seq, tracking_no, type, **fields)

    def push(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        response = self.client.post(
            PUSH, json=factories.push_body(self.device_id, events), headers=self.headers
        )
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    def close(self, shift_id: int, **body: Any) -> Any:
        return self.client.post(f"{SHIFTS}/{shift_id}/close", json=body, headers=self.headers)


@pytest.fixture
def pda(client: FlaskClient, auth: Auth, world: World) -> Courier:
    return Courier(client, auth, "courier1", "PDA-0001")


@pytest.fixture
def manager(auth: Auth, world: World) -> dict[str, str]:
    return auth.headers("manager1")


def parcels(session: Session, world: World, n: int) -> list[str]:
    numbers = [factories.parcel(session, world.station).tracking_no for _ in range(n)]
    session.commit()
    return numbers


def balance(client: FlaskClient, shift_id: int, headers: dict[str, str]) -> dict[str, Any]:
    response = client.get(f"{SHIFTS}/{shift_id}/balance", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def sign_off(client: FlaskClient, shift_id: int, headers: dict[str, str], **body: Any) -> Any:
    body.setdefault("note", "checked at the counter")
    return client.post(f"{SHIFTS}/{shift_id}/signoff", json=body, headers=headers)


def test_a_clean_shift_balances_and_is_signed_off(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    a, b, c = parcels(session, world, 3)
    shift = pda.open(first_seq=1)
    assert shift["status"] == "open" and shift["device_id"] == "PDA-0001"
    pda.push([pda.event(a), pda.event(b), pda.event(c)])
    pda.push(
        [
            pda.event(a, "delivered"),
            pda.event(b, "consent_captured", consent={"method": "any", "channel": "phone_call"}),
            pda.event(b, "delivered_to_pickup_point", point_id="PP-9", pod={"pickup_code": "77"}),
            pda.event(c, "returned_to_station"),
        ]
    )
    response = pda.close(shift["id"], last_seq=pda.seq)
    assert response.status_code == 200 and response.get_json()["status"] == "closed"
    found = balance(client, shift["id"], manager)
    assert found["status"] == "balanced" and found["shift_status"] == "closed"
    assert {k: found[k] for k in ("checked_out", "delivered", "unattended", "returned")} == {
        "checked_out": 3,
        "delivered": 1,
        "unattended": 1,
        "returned": 1,
    }
    assert found["missing"] == 0 and found["discrepancies"] == [] and found["missing_seqs"] == []
    assert {p["tracking_no"]: p["outcome"] for p in found["parcels"]} == {
        a: "delivered",
        b: "unattended",
        c: "returned",
    }
    timeline = client.get(f"/api/v1/parcels/{a}", headers=manager).get_json()["timeline"]
    assert [entry["shift_id"] for entry in timeline] == [shift["id"], shift["id"]]
    # The courier reads their own shift's balance too.
    assert balance(client, shift["id"], pda.headers)["status"] == "balanced"
    signed = sign_off(client, shift["id"], manager)
    assert signed.status_code == 200, signed.get_json()
    assert signed.get_json()["status"] == "signed_off"
    assert signed.get_json()["signoff_note"] == "checked at the counter"


def test_a_missing_parcel_unbalances_the_shift_with_its_flag(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    a, b = parcels(session, world, 2)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b), pda.event(a, "delivered")])
    pda.close(shift["id"])
    found = balance(client, shift["id"], manager)
    assert (found["status"], found["missing"], found["delivered"]) == ("unbalanced", 1, 1)
    [discrepancy] = found["discrepancies"]
    assert discrepancy["kind"] == "missing_at_handover" and discrepancy["tracking_no"] == b
    assert discrepancy["flag_status"] == "open"
    flag = client.get(f"/api/v1/flags/{discrepancy['flag_id']}", headers=manager).get_json()
    assert flag["kind"] == "missing_at_handover" and flag["evidence"]["tracking_no"] == b
    assert flag["evidence"]["event_ids"] == discrepancy["event_ids"]
    # The manager resolves the flag: the balance still says what happened.
    resolved = client.post(
        f"/api/v1/flags/{flag['id']}/resolve", json={"note": "left at the depot"}, headers=manager
    )
    assert resolved.status_code == 200
    found = balance(client, shift["id"], manager)
    assert found["status"] == "unbalanced"
    assert found["discrepancies"][0]["flag_status"] == "resolved"
    assert sign_off(client, shift["id"], manager).status_code == 200


def test_a_sign_off_naming_the_balance_it_was_shown_is_refused_once_it_changed(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    """19:00, the manager reads a balanced shift; before they sign, the PDA pushes a
    delivery it still held, without a proof. Signing the balance they read is refused:
    they read it again, and sign off what it says now."""
    a, b = parcels(session, world, 2)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b), pda.event(a, "delivered")])
    pda.push([pda.event(b, "returned_to_station")])
    pda.close(shift["id"], last_seq=pda.seq)
    shown = balance(client, shift["id"], manager)
    assert shown["status"] == "balanced"
    assert balance(client, shift["id"], manager)["version"] == shown["version"]  # stable
    # The PDA had recorded b delivered before the return, and pushes it only now.
    pda.push([pda.event(b, "delivered", pod={})])
    now = balance(client, shift["id"], manager)
    assert now["status"] == "unbalanced" and now["version"] != shown["version"]

    refused = sign_off(client, shift["id"], manager, balance_version=shown["version"])
    assert refused.status_code == 409, refused.get_json()
    assert refused.get_json()["code"] == "balance_changed"
    assert list(refused.get_json()["errors"]) == ["balance_version"]
    assert "read it again" in refused.get_json()["message"]
    assert balance(client, shift["id"], manager)["shift_status"] == "closed"
    signed = sign_off(client, shift["id"], manager, balance_version=now["version"])
    assert signed.status_code == 200, signed.get_json()
    assert signed.get_json()["status"] == "signed_off"
    stored = session.get(Shift, shift["id"], populate_existing=True)
    assert stored is not None and stored.signoff_balance["status"] == "unbalanced"


def test_a_sign_off_is_refused_once_two_parcels_swapped_outcomes_with_the_same_counts(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    """The manager reads a balanced shift: a delivered, b returned (b on the counter).
    The PDA then pushes corrections of two mis-taps: a was returned and b delivered.
    The counts and the discrepancies are as before, but the parcel at the station is
    now a, not the one the manager checked: the version they were shown is refused."""
    a, b = parcels(session, world, 2)
    shift = pda.open(first_seq=1)
    checked_out = [pda.event(a), pda.event(b)]
    delivered_a, returned_b = pda.event(a, "delivered"), pda.event(b, "returned_to_station")
    pda.push([*checked_out, delivered_a, returned_b])
    pda.close(shift["id"])
    seen = balance(client, shift["id"], manager)
    assert seen["status"] == "balanced"

    def corrected(event: dict[str, Any]) -> dict[str, Any]:
        return pda.event(
            event["tracking_no"],
            "correction",
            voids_client_event_id=event["client_event_id"],
            reason="mis-tap",
        )

    pda.push(
        [
            corrected(delivered_a),
            pda.event(a, "returned_to_station"),
            corrected(returned_b),
            pda.event(b, "delivered"),
        ]
    )
    now = balance(client, shift["id"], manager)
    assert {p["tracking_no"]: p["outcome"] for p in now["parcels"]} == {
        a: "returned",
        b: "delivered",
    }
    assert {k: now[k] for k in ("status", "delivered", "returned")} == {
        k: seen[k] for k in ("status", "delivered", "returned")
    }
    assert now["version"] != seen["version"]
    refused = sign_off(client, shift["id"], manager, balance_version=seen["version"])
    assert refused.status_code == 409, refused.get_json()
    assert refused.get_json()["code"] == "balance_changed"
    assert (
        sign_off(client, shift["id"], manager, balance_version=now["version"]).status_code == 200
    )
    stored = session.get(Shift, shift["id"], populate_existing=True)
    assert stored is not None
    assert stored.signoff_balance["outcomes"][a][0] == "returned"


def test_a_sign_off_kept_before_the_outcomes_were_is_compared_on_what_it_kept(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    """Shifts signed off by the version before kept no parcel outcomes with the
    balance: unchanged, they are not taken for changed, and ``signed_off_version``
    still equals ``version``; a change in what they kept still shows."""
    a, b = parcels(session, world, 2)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b), pda.event(a, "delivered")])
    pda.close(shift["id"])
    assert sign_off(client, shift["id"], manager).status_code == 200
    stored = session.get(Shift, shift["id"], populate_existing=True)
    assert stored is not None
    stored.signoff_balance = {k: v for k, v in stored.signoff_balance.items() if k != "outcomes"}
    session.commit()

    found = balance(client, shift["id"], manager)
    assert found["changed_since_signoff"] is False
    assert found["signed_off_version"] == found["version"]
    board = client.get(f"/api/v1/stations/{world.station.id}/handover", headers=manager)
    assert board.get_json()["totals"]["changed_since_signoff"] == 0

    # What it kept still counts: as if one parcel fewer had been missing then.
    stored = session.get(Shift, shift["id"], populate_existing=True)
    assert stored is not None
    stored.signoff_balance = {**stored.signoff_balance, "missing": 0}
    session.commit()
    changed = balance(client, shift["id"], manager)
    assert changed["changed_since_signoff"] is True
    assert changed["signed_off_version"] != changed["version"]


def test_the_shift_page_shows_a_parcel_of_another_station_by_its_number_only(
    app: Flask, client: FlaskClient, session: Session, world: World, pda: Courier
) -> None:
    """A courier delivers, without proof, a parcel mis-sorted from another station. To
    this station's manager that parcel does not exist in the API (404): the shift page
    names it by its tracking number, without its recipient, and offers no proof link
    that would not open. An auditor, who reads every station, sees it all."""
    (own,) = parcels(session, world, 1)
    foreign = factories.parcel(session, world.other_station)
    foreign.recipient_name, foreign.address = "Secret Person", "99 Hidden Road"
    session.commit()
    shift = pda.open()
    pda.push(
        [
            pda.event(own),
            pda.event(foreign.tracking_no),
            pda.event(own, "delivered"),
            pda.event(foreign.tracking_no, "delivered", pod={}),
        ]
    )
    pda.close(shift["id"])
    manager = signed_in(app, "manager1")
    html = manager.get(f"/web/shifts/{shift['id']}")
    assert foreign.tracking_no in html and "A parcel of another station" in html
    assert "Secret Person" not in html and "99 Hidden Road" not in html
    links = re.findall(r'href="(/web/proofs/\d+)"', html)
    assert len(links) == 1  # the own parcel's delivery
    assert [manager.client.get(link).status_code for link in links] == [200]

    auditor = signed_in(app, "auditor1").get(f"/web/shifts/{shift['id']}")
    assert "Secret Person" in auditor and "99 Hidden Road" in auditor
    assert len(re.findall(r'href="(/web/proofs/\d+)"', auditor)) == 2


def test_the_board_page_names_the_sequence_numbers_still_on_a_pda(
    app: Flask, client: FlaskClient, session: Session, world: World, pda: Courier
) -> None:
    """19:00: which seqs to ask the courier for, on the board, without opening each
    provisional shift."""
    (a,) = parcels(session, world, 1)
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    pda.push([pda.event(a, "returned_to_station") | {"seq": 11}])
    pda.close(shift["id"], last_seq=12)  # 3 to 10 and 12 still on the PDA
    html = signed_in(app, "manager1").get(f"/web/board?station={world.station.id}")
    row = re.search(
        rf'<tr class="row-provisional" id="shift-{shift["id"]}">(.*?)</tr>', html, re.S
    )
    assert row is not None, html
    assert '9<br><span class="seqs">3–10, 12</span>' in row.group(1)


def test_a_manager_closes_from_the_shift_page_a_shift_whose_pda_died(
    app: Flask,
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
) -> None:
    """19:00: the PDA died on the route, the courier is back with the parcels, and the
    shift is still open: the courier cannot close it, nor can it be signed off. A
    manager closes it from its page as ``POST /shifts/<id>/close`` does, with its rules
    and their messages, and the page then shows it closed, with its balance. An auditor
    gets no such form."""
    a, b = parcels(session, world, 2)
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(b), pda.event(a, "delivered")])
    path = f"/web/shifts/{shift['id']}"
    close = f"{path}/close"
    assert close not in signed_in(app, "auditor1").get(path)
    pages = signed_in(app, "manager1")
    assert close in pages.forms_posting_to(pages.get(path))

    refused = pages.post(close, last_seq="2")  # seq 3 is held already
    assert refused.status_code == 200  # the page again, with the seq typed
    html = refused.get_data(as_text=True)
    assert "Not closed: last_seq 2 is before seq 3" in html and 'value="2"' in html
    assert close in pages.forms_posting_to(html)  # still open, the form still there

    closing = pages.post(close, last_seq="")  # the dead PDA cannot show its last seq
    assert closing.status_code == 302 and closing.location == path
    html = pages.get(path)
    assert f"Shift {shift['id']} is closed." in html and close not in html
    assert "by manager1" in html and "Sign off the handover" in html
    assert "missing at handover" in html and b in html  # the balance as it now stands
    closed = client.get(f"{SHIFTS}/{shift['id']}", headers=manager).get_json()
    assert (closed["status"], closed["closed_by"], closed["last_seq"]) == (
        "closed",
        world.manager.id,
        None,
    )
    assert balance(client, shift["id"], manager)["missing"] == 1
    # on the audit log as the API's close is, once: the refused close wrote nothing
    [entry] = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "shift_closed_for_courier")
    ).all()
    assert (entry.actor_id, entry.subject_key) == (world.manager.id, str(shift["id"]))
    assert (entry.details["last_seq"], entry.details["seq_at_close"]) == (None, 3)


def test_the_board_names_a_balanced_shifts_own_open_flag(
    app: Flask,
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
) -> None:
    """Both parcels delivered in person, each with a signature the PDA never uploaded:
    the shift balances, and after the handover the sweep flags it
    ``blob_missing_at_handover``. Its board row stays balanced (the flag is no
    discrepancy of the balance), and names the flag, in the API and on the page: among
    40 rows, the manager does not sign it off as clean. The totals count such shifts;
    an acknowledged flag still counts, a resolved one no longer."""
    a, b = parcels(session, world, 2)
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(b), pda.event(a, "delivered"), pda.event(b, "delivered")])
    pda.close(shift["id"], last_seq=pda.seq)
    blob_missing_at_handover(
        session=session, now=now() + dt.timedelta(hours=2), settings=SweepSettings()
    )
    session.commit()
    flag = session.scalars(select(Flag).where(Flag.shift_id == shift["id"])).one()
    assert flag.kind == "blob_missing_at_handover"
    board_url = f"/api/v1/stations/{world.station.id}/handover"

    def board_row() -> tuple[dict[str, Any], dict[str, Any]]:
        board = client.get(board_url, headers=manager).get_json()
        [row] = board["shifts"]
        return row, board["totals"]

    row, totals = board_row()
    assert (row["balance"]["status"], row["balance"]["discrepancy_count"]) == ("balanced", 0)
    assert row["open_flag_count"] == 1
    assert row["open_flags"] == [
        {"flag_id": flag.id, "kind": "blob_missing_at_handover", "status": "open"}
    ]
    assert (totals["balanced"], totals["with_open_flags"]) == (1, 1)
    html = signed_in(app, "manager1").get(f"/web/board?station={world.station.id}")
    found = re.search(rf'<tr class="row-balanced" id="shift-{shift["id"]}">(.*?)</tr>', html, re.S)
    assert found is not None, html
    link = f'<a href="/web/flags?shift_id={shift["id"]}&amp;status=waiting">1 open flag</a>'
    assert link in found.group(1)
    assert f'<a href="/web/flags/{flag.id}">blob missing at handover</a>' in found.group(1)
    assert "1 shift with open flags" in html

    client.post(f"/api/v1/flags/{flag.id}/acknowledge", json={}, headers=manager)
    row, totals = board_row()
    assert row["open_flags"][0]["status"] == "acknowledged" and totals["with_open_flags"] == 1
    resolved = client.post(
        f"/api/v1/flags/{flag.id}/resolve", json={"note": "signatures on paper"}, headers=manager
    )
    assert resolved.status_code == 200, resolved.get_json()
    row, totals = board_row()
    assert (row["open_flag_count"], row["open_flags"], totals["with_open_flags"]) == (0, [], 0)
    html = signed_in(app, "manager1").get(f"/web/board?station={world.station.id}")
    assert "open flag" not in html


def test_a_drop_pushed_after_the_sign_off_shows_that_in_its_proof(
    client: FlaskClient,
    auth: Auth,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
) -> None:
    """b is missing at the handover, the manager signs off, then the PDA pushes b's
    locker drop into the shift: the auditor reading the drop's proof sees the flag
    saying it landed after the sign-off, which cites it. The parcel's handover flag
    of that shift (closed now) is listed with the parcel's own flags."""
    a, b = parcels(session, world, 2)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b), pda.event(a, "delivered")])
    pda.close(shift["id"])
    assert sign_off(client, shift["id"], manager, note="b missing").status_code == 200
    drop = pda.event(
        b, "delivered_to_locker", shift_id=shift["id"], locker_id="L-1", compartment="2"
    )
    pda.push([drop])
    auditor = auth.headers("auditor1")
    (item,) = client.get(
        "/api/v1/proofs", query_string={"tracking_no": b}, headers=auditor
    ).get_json()["items"]
    detail = client.get(f"/api/v1/proofs/{item['event_id']}", headers=auditor).get_json()
    kinds = {f["kind"]: f for f in detail["flags"]}
    assert {"late_event_after_signoff", "missing_at_handover"} <= set(kinds)
    assert item["event_id"] in kinds["late_event_after_signoff"]["evidence"]["event_ids"]
    # a's delivery, in the same shift, is not what the late flag cites
    (of_a,) = client.get(
        "/api/v1/proofs", query_string={"tracking_no": a}, headers=auditor
    ).get_json()["items"]
    detail_a = client.get(f"/api/v1/proofs/{of_a['event_id']}", headers=auditor).get_json()
    assert {f["kind"] for f in detail_a["flags"]} & {
        "late_event_after_signoff",
        "missing_at_handover",
    } == set()


def test_a_delivery_voided_before_the_handover_is_found_by_its_missing_flag(
    client: FlaskClient, auth: Auth, session: Session, world: World, pda: Courier
) -> None:
    """The courier voids a delivery (a mis-tap, they say) and the parcel is missing at
    the handover: an auditor searching the proofs for ``missing_at_handover`` finds the
    voided delivery; the flag is the handover's, in the delivery's shift."""
    a, b = parcels(session, world, 2)
    shift = pda.open()
    delivered = pda.event(a, "delivered")
    pda.push([pda.event(a), pda.event(b), delivered, pda.event(b, "delivered")])
    pda.push(
        [
            pda.event(
                a,
                "correction",
                voids_client_event_id=delivered["client_event_id"],
                reason="mis-tap",
            )
        ]
    )
    pda.close(shift["id"])
    found = client.get(
        "/api/v1/proofs",
        query_string={"flag_kind": "missing_at_handover"},
        headers=auth.headers("auditor1"),
    ).get_json()
    assert [(i["tracking_no"], i["voided"]) for i in found["items"]] == [(a, True)]


def test_an_event_dated_at_the_end_of_the_calendar_is_kept_and_its_pages_still_render(
    app: Flask, client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """The push window no longer bounds the future: a locker drop stamped 9999-12-31
    23:00 UTC is applied (and flagged). The pages show PDA times on the station's wall
    clock (Asia/Shanghai, +08:00): that lies past the end of the calendar, and the
    shift page, the proofs page, the proof and its flags' pages answer 500
    (OverflowError in the ``local`` filter) where they must still render."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    pda = Courier(client, auth, "courier1", "PDA-0001")
    shift = pda.open()
    far = dt.datetime(9999, 12, 31, 23, 0, tzinfo=dt.UTC)
    receipt = pda.push(
        [
            pda.event(parcel.tracking_no),
            pda.event(
                parcel.tracking_no,
                "delivered_to_locker",
                occurred_at=far,
                locker_id="L-1",
                compartment="1",
            ),
        ]
    )
    assert [r["status"] for r in receipt["results"]] == ["applied", "applied"]
    assert pda.close(shift["id"]).status_code == 200
    drop = session.scalar(select(ScanEvent.id).where(ScanEvent.type == "delivered_to_locker"))
    api = client.get(f"/api/v1/proofs/{drop}", headers=auth.headers("auditor1"))
    assert api.status_code == 200, api.get_json()
    pages = signed_in(app, "manager1").client
    failed = {}
    for path in (f"/web/shifts/{shift['id']}", "/web/proofs", f"/web/proofs/{drop}"):
        try:
            status = pages.get(path).status_code
        except OverflowError as error:  # the test app propagates what would be a 500
            status = repr(error)
        if status != 200:
            failed[path] = status
    assert failed == {}


def test_the_shift_page_does_not_say_there_is_no_consent_for_a_parcel_it_hides(
    app: Flask, client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """ST1's courier leaves a mis-sorted express parcel of ST2 in a locker; its
    recipient's consent reaches the service after the drop (``consent_after_drop``).
    The shift page hides that parcel's consents from ST1's manager now, but still
    writes, under the discrepancy, "No consent on record for this parcel or its
    recipient": false, and the flag's own kind says there is one."""
    foreign = factories.parcel(session, world.other_station)
    session.commit()
    pda = Courier(client, auth, "courier1", "PDA-0001")
    shift = pda.open()
    pda.push([pda.event(foreign.tracking_no)])
    dropped_at = now()
    time.sleep(0.01)
    pda.push(
        [
            pda.event(
                foreign.tracking_no,
                "delivered_to_locker",
                occurred_at=dropped_at,
                locker_id="L-1",
                compartment="3",
                pod={"pickup_code": "1234"},
            )
        ]
    )
    consent = client.post(
        "/api/v1/consents",
        json={
            "tracking_no": foreign.tracking_no,
            "method": "locker",
            "channel": "app",
            # Taken after the drop's push was answered: later than its arrival, so
            # than its corrected time, however long the push took (5 ms after its
            # PDA time failed on a loaded machine).
            "granted_at": now().isoformat(),
        },
        headers=auth.headers("app1"),
    )
    assert consent.status_code == 201, consent.get_json()
    assert pda.close(shift["id"]).status_code == 200
    kinds = {
        d["kind"]
        for d in client.get(
            f"/api/v1/shifts/{shift['id']}/balance", headers=auth.headers("manager1")
        ).get_json()["discrepancies"]
    }
    assert "consent_after_drop" in kinds, kinds
    html = signed_in(app, "manager1").get(f"/web/shifts/{shift['id']}")
    assert "A parcel of another station" in html
    assert "No consent on record for this parcel or its recipient" not in html


def test_the_spec_names_every_discrepancy_kind_a_balance_answers(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    """A parcel the station has not taken in is an ``unknown_parcel`` discrepancy
    (README): the spec's list of discrepancy kinds, what a client codes against, names
    it as it names the others."""
    (known,) = parcels(session, world, 1)
    unknown = factories.s10()
    shift = pda.open()
    pda.push([pda.event(known), pda.event(unknown), pda.event(known, "returned_to_station")])
    pda.push([pda.event(unknown, "returned_to_station")])
    pda.close(shift["id"])
    found = balance(client, shift["id"], manager)
    kinds = {d["kind"] for d in found["discrepancies"]}
    assert "unknown_parcel" in kinds
    schema = client.get("/openapi.json").get_json()["components"]["schemas"]["DiscrepancyOut"]
    documented = {k.strip() for k in schema["properties"]["kind"]["description"].split(",")}
    assert kinds <= documented


def test_each_discrepancy_says_what_the_manager_does_about_it(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    """A discrepancy named its kind, its parcel, its flag and its scans, and left the
    manager at 19:00 to know what each kind asks of them. Each says it (`what_to_do`):
    a missing parcel is looked for, a delivery without proof is scanned again with one,
    and doing so settles it (an image uploaded would not: the scan names none)."""
    a, b = parcels(session, world, 2)
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(b), pda.event(b, "delivered", pod={"relation": "self"})])
    assert pda.close(shift["id"], last_seq=3).status_code == 200
    found = balance(client, shift["id"], manager)
    todo = {d["kind"]: d["what_to_do"] for d in found["discrepancies"]}
    assert set(todo) == {"missing_at_handover", "delivered_without_pod"}
    assert todo["missing_at_handover"].startswith("Find the parcel")
    assert "scan the delivery again on the PDA with the signature" in todo["delivered_without_pod"]
    page = signed_in(client.application, "manager1").get(f"/web/shifts/{shift['id']}")
    assert todo["missing_at_handover"] in page
    # As it says: the courier scans the delivery again, with the signature.
    pda.push([pda.event(b, "delivered", pod={"signature_sha256": "b" * 64})])
    found = balance(client, shift["id"], manager)
    assert {d["kind"] for d in found["discrepancies"]} == {"missing_at_handover"}
    assert found["delivered"] == 1


def test_a_sequence_gap_is_provisional_until_the_late_batch_lands(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    a, b = parcels(session, world, 2)
    shift = pda.open(first_seq=1)
    events = [pda.event(a), pda.event(b), pda.event(a, "delivered"), pda.event(b, "delivered")]
    pda.push([events[0], events[1], events[3]])  # seq 3 is still on the PDA
    pda.close(shift["id"], last_seq=4)
    found = balance(client, shift["id"], manager)
    assert (found["status"], found["missing_seqs"], found["missing_seq_count"]) == (
        "provisional",
        [3],
        1,
    )
    refused = sign_off(client, shift["id"], manager)
    assert refused.status_code == 409
    assert refused.get_json()["code"] == "balance_provisional"
    assert "3" in refused.get_json()["message"]
    pda.push([events[2]])
    found = balance(client, shift["id"], manager)
    assert (found["status"], found["delivered"], found["missing_seqs"]) == ("balanced", 2, [])
    assert sign_off(client, shift["id"], manager).status_code == 200


def test_a_provisional_balance_may_be_signed_off_when_forced_with_a_reason(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    (a,) = parcels(session, world, 1)
    shift = pda.open()
    pda.push([pda.event(a)])
    pda.close(shift["id"], last_seq=5)
    forced = sign_off(client, shift["id"], manager, force_reason="PDA lost in the river")
    assert forced.status_code == 200
    assert forced.get_json()["signoff_forced_reason"] == "PDA lost in the river"


def test_a_late_event_after_sign_off_reopens_the_shift(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    a, b = parcels(session, world, 2)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b), pda.event(a, "delivered")])
    pda.close(shift["id"])
    assert sign_off(client, shift["id"], manager, note="b missing").status_code == 200
    receipt = pda.push([pda.event(b, "returned_to_station", shift_id=shift["id"])])
    kinds = {flag["kind"] for flag in receipt["flags_raised"]}
    assert "late_event_after_signoff" in kinds
    reopened = client.get(f"{SHIFTS}/{shift['id']}", headers=manager).get_json()
    assert (reopened["status"], reopened["reopened_count"]) == ("closed", 1)
    assert balance(client, shift["id"], manager)["status"] == "balanced"
    again = sign_off(client, shift["id"], manager, note="b came back")
    assert again.status_code == 200 and again.get_json()["status"] == "signed_off"


def test_a_reopened_shift_page_shows_the_flag_of_the_late_events_that_reopened_it(
    app: Flask,
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
) -> None:
    """Rule 5: an event after the sign-off reopens the shift with a
    ``late_event_after_signoff`` flag. Otherwise the manager, back on the shift's page
    to sign it off again, is told only "closed (reopened 1x by late events)" next to
    the old sign-off shown as current, with neither the flag nor the late events, and
    the board row says just "closed": they sign off again without seeing what arrived.
    Signing off again leaves the flag open (one flag per kind and subject, resolved by
    a manager with a note): the page says so."""
    a, b = parcels(session, world, 2)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b), pda.event(a, "delivered")])
    pda.close(shift["id"])
    assert sign_off(client, shift["id"], manager, note="b missing").status_code == 200
    receipt = pda.push([pda.event(b, "returned_to_station", shift_id=shift["id"])])
    [late] = [f for f in receipt["flags_raised"] if f["kind"] == "late_event_after_signoff"]
    pages = signed_in(app, "manager1")

    html = pages.get(f"/web/shifts/{shift['id']}")

    assert "reopened 1" in html
    assert f'href="/web/flags/{late["flag_id"]}"' in html
    own_flags = html[html.index('id="flags-h"') : html.index('id="parcels-h"')]
    assert b in own_flags and "returned to station" in own_flags
    assert "(latest reopening)" in own_flags
    assert "Previous sign-off" in html and "superseded" in html
    assert "Signing off again does not resolve it" in html
    board = client.get(f"/api/v1/stations/{world.station.id}/handover", headers=manager)
    [row] = board.get_json()["shifts"]
    assert (row["shift_status"], row["reopened_count"]) == ("closed", 1)
    assert row["reopened_at"] is not None and board.get_json()["totals"]["reopened"] == 1
    assert "reopened 1× by late events, to sign off again" in pages.get("/web/board")

    assert sign_off(client, shift["id"], manager, note="b came back").status_code == 200
    flag = client.get(f"/api/v1/flags/{late['flag_id']}", headers=manager).get_json()
    assert flag["status"] == "open"
    again = pages.get(f"/web/shifts/{shift['id']}")
    assert "Previous sign-off" not in again and 'id="reopening-flag-open"' in again


def test_a_missing_parcel_whose_drop_was_rejected_shows_the_rejected_drop_as_evidence(
    app: Flask,
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
) -> None:
    """Rule 1: a malformed event is quarantined, "visible to managers"; rule 5: a
    discrepancy comes with its evidence. The courier left the parcel in a locker, but
    the PDA's drop lacked the compartment and was rejected. Otherwise the balance says
    the parcel is missing and its page shows only the check-out: nothing tells the
    manager that the PDA did record a drop of it, so a parcel sitting in locker L-7 is
    chased as lost. The page lists the shift's other rejected events too (its seqs, not
    the next shift's), with phone numbers masked as the quarantine masks them; auditors
    read them too (a rejected drop is evidence in a dispute), numbers whole, and their
    read is on the audit log."""
    (a,) = parcels(session, world, 1)
    shift = pda.open(first_seq=1)
    checkout = pda.event(a)
    drop = pda.event(  # no compartment
        a, "delivered_to_locker", locker_id="L-7", pod={"recipient_name": "call 13812345678"}
    )
    stray = pda.event("RR473124829XX", "out_for_delivery")  # no such country
    receipt = pda.push([checkout, drop, stray])
    assert [r["status"] for r in receipt["results"]] == ["applied", "rejected", "rejected"]
    assert pda.close(shift["id"], last_seq=pda.seq).status_code == 200
    pda.open(first_seq=pda.seq + 1)
    next_shifts = pda.event("RR473124829XX", "out_for_delivery")
    pda.push([next_shifts])
    found = balance(client, shift["id"], manager)
    assert (found["status"], found["missing"]) == ("unbalanced", 1)

    html = signed_in(app, "manager1").get(f"/web/shifts/{shift['id']}")

    discrepancy = html[html.index('id="discrepancy-1"') : html.index("</article>")]
    assert "missing at handover" in discrepancy
    assert drop["client_event_id"] in discrepancy and "compartment is required" in discrepancy
    rejected = html[html.index('id="rejected-h"') : html.index('id="parcels-h"')]
    assert stray["client_event_id"] in rejected and drop["client_event_id"] not in rejected
    assert next_shifts["client_event_id"] not in html
    assert "13812345678" not in html and "call ********678" in html
    auditor = signed_in(app, "auditor1").get(f"/web/shifts/{shift['id']}")
    assert drop["client_event_id"] in auditor[auditor.index('id="discrepancy-1"') :]
    assert stray["client_event_id"] in auditor[auditor.index('id="rejected-h"') :]
    assert "call 13812345678" in auditor
    logged = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "quarantine_searched")
    ).one()
    assert (logged.subject_key, len(logged.details["ids"])) == (f"shift:{shift['id']}", 2)


def test_a_rejected_drop_without_a_seq_is_the_shifts_however_the_pda_wrote_the_number(
    app: Flask,
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
) -> None:
    """A rejected event with no valid seq is the shift's when it names one of its
    parcels: named ``rr 4731 2482 9gb`` (a badly typed number is likely where an event
    was refused), it names the parcel counted missing. The shift's page shows it as the
    missing parcel's evidence, with the number as the PDA wrote it, and the board counts
    it on the shift's row."""
    (a,) = parcels(session, world, 1)
    shift = pda.open(first_seq=1)
    checkout = pda.event(a)
    drop = pda.event(factories.typed_loosely(a), "delivered_to_locker", locker_id="L-7")
    drop["seq"] = "two"  # no valid seq either: it is the shift's by the parcel it names
    receipt = pda.push([checkout, drop])
    assert [r["status"] for r in receipt["results"]] == ["applied", "rejected"]
    assert pda.close(shift["id"], last_seq=1).status_code == 200

    html = signed_in(app, "manager1").get(f"/web/shifts/{shift['id']}")

    discrepancy = html[html.index('id="discrepancy-1"') : html.index("</article>")]
    assert "missing at handover" in discrepancy
    assert drop["client_event_id"] in discrepancy
    assert f'<td class="tn">{drop["tracking_no"]}</td>' in discrepancy
    board = client.get(f"/api/v1/stations/{world.station.id}/handover", headers=manager)
    [row] = board.get_json()["shifts"]
    assert row["rejected_events"] == 1


def test_a_signed_off_balance_a_later_consent_changed_says_so_and_stays_signed_off(
    client: FlaskClient,
    session: Session,
    auth: Auth,
    world: World,
    pda: Courier,
    manager: dict[str, str],
) -> None:
    """The courier leaves an express parcel in a locker with no consent on record: the
    shift is unbalanced, and the manager signs it off so, with a note. The recipient's
    consent, given by phone before the drop, reaches the server afterwards: the drop is
    authorized and the balance closes. No event of the shift arrived, so the shift stays
    signed off (rule 5); its balance, the board and the board's totals say that the
    balance is no longer the one signed off, and which one was."""
    (dropped,) = parcels(session, world, 1)  # express: a locker drop needs a consent
    shift = pda.open()
    checked_out_at = now()
    drop_at = checked_out_at + dt.timedelta(milliseconds=300)
    time.sleep(0.4)  # the push is sent after the drop
    pda.push(
        [
            pda.event(dropped, occurred_at=checked_out_at),
            pda.event(
                dropped,
                "delivered_to_locker",
                occurred_at=drop_at,
                locker_id="L-1",
                compartment="07",
                pod={"photo_sha256": "d" * 64},
            ),
        ]
    )
    pda.close(shift["id"])
    seen = balance(client, shift["id"], manager)
    assert (seen["status"], seen["unattended_without_consent"]) == ("unbalanced", 1)
    assert (seen["signed_off_version"], seen["changed_since_signoff"]) == (None, False)
    note = "left in L-1 without a consent; courier told"
    signed = sign_off(client, shift["id"], manager, note=note, balance_version=seen["version"])
    assert signed.status_code == 200, signed.get_json()
    as_signed = balance(client, shift["id"], manager)
    assert as_signed["signed_off_version"] == seen["version"] == as_signed["version"]
    assert as_signed["changed_since_signoff"] is False

    granted = client.post(
        "/api/v1/consents",
        json={
            "tracking_no": dropped,
            "method": "locker",
            "channel": "phone_call",
            "granted_at": checked_out_at.isoformat(),  # by phone, before the drop
        },
        headers=auth.headers("app1"),
    )
    assert granted.status_code == 201, granted.get_json()
    changed = balance(client, shift["id"], manager)
    assert (changed["status"], changed["unattended"]) == ("balanced", 1)
    assert changed["shift_status"] == "signed_off"
    assert changed["changed_since_signoff"] is True
    assert changed["signed_off_version"] == seen["version"] != changed["version"]
    board = client.get(f"/api/v1/stations/{world.station.id}/handover", headers=manager)
    [row] = board.get_json()["shifts"]
    assert (row["shift_status"], row["changed_since_signoff"]) == ("signed_off", True)
    assert board.get_json()["totals"]["changed_since_signoff"] == 1


def test_a_parcel_delivered_but_never_checked_out_is_a_discrepancy(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    a, stray = parcels(session, world, 2)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(a, "delivered"), pda.event(stray, "delivered")])
    pda.close(shift["id"])
    found = balance(client, shift["id"], manager)
    assert found["status"] == "unbalanced"
    assert (found["checked_out"], found["not_checked_out"]) == (1, 1)
    [discrepancy] = found["discrepancies"]
    assert (discrepancy["kind"], discrepancy["tracking_no"]) == (
        "delivered_not_checked_out",
        stray,
    )
    outcome = next(p for p in found["parcels"] if p["tracking_no"] == stray)
    assert outcome == {
        "tracking_no": stray,
        "outcome": "delivered",
        "on_manifest": False,
        "outcome_event_id": discrepancy["event_ids"][0],
        "event_ids": discrepancy["event_ids"],
        "repeated_scans": [],
    }


def test_a_single_sign_off_is_refused_when_what_the_manager_read_changed_since(
    app: Flask,
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
) -> None:
    """The manager read the board row (balanced, no event rejected, no flag waiting) and
    signed the shift off on its own. Meanwhile the sweep flagged its signatures never
    uploaded, and the PDA sent a scan of its parcel the server rejected; neither changes
    the balance, so its version matched and the sign-off went through on what the
    manager never saw, where signing off together refuses such a shift. Now a sign-off
    naming what it was shown (`rejected_events`, `open_flags`: the board row's) is
    refused when either changed, by the same check; read again, it is signed off. Left
    out, they are not compared (as before)."""
    a, b = parcels(session, world, 2)
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(b), pda.event(a, "delivered"), pda.event(b, "delivered")])
    pda.close(shift["id"], last_seq=pda.seq)
    board_url = f"/api/v1/stations/{world.station.id}/handover"

    def seen() -> dict[str, Any]:
        [row] = client.get(board_url, headers=manager).get_json()["shifts"]
        return {
            "balance_version": row["balance_version"],
            "rejected_events": row["rejected_events"],
            "open_flags": [flag["flag_id"] for flag in row["open_flags"]],
        }

    read = seen()
    assert (read["rejected_events"], read["open_flags"]) == (0, [])
    blob_missing_at_handover(
        session=session, now=now() + dt.timedelta(hours=2), settings=SweepSettings()
    )
    session.commit()
    flag = session.scalars(select(Flag).where(Flag.shift_id == shift["id"])).one()
    refused = sign_off(client, shift["id"], manager, **read)
    assert refused.status_code == 409, refused.get_json()
    assert refused.get_json()["code"] == "open_flags_changed"
    assert f"raised or reopened since: flag {flag.id}" in refused.get_json()["message"]

    read = seen()
    assert read["open_flags"] == [flag.id]
    stray = pda.event(a, "delivered")
    del stray["seq"]  # malformed: rejected, naming one of the shift's parcels
    assert [r["status"] for r in pda.push([stray])["results"]] == ["rejected"]
    refused = sign_off(client, shift["id"], manager, **read)
    assert refused.status_code == 409, refused.get_json()
    assert refused.get_json()["code"] == "rejected_events_changed"
    assert "1 event of its PDA is rejected now, not 0" in refused.get_json()["message"]
    assert read["balance_version"] == seen()["balance_version"]  # the balance is the same

    # The shift's page sends what it showed: read again, it signs off.
    pages = signed_in(app, "manager1")
    html = pages.get(f"/web/shifts/{shift['id']}")
    assert 'name="rejected_events" value="1"' in html
    assert f'name="open_flags" value="{flag.id}"' in html
    form = re.search(r'class="signoff">(.*?)</form>', html, re.S)
    assert form is not None
    hidden = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form.group(1))
    assert {"balance_version", "rejected_events", "open_flags"} <= dict(hidden).keys()
    signed = pages.post(f"/web/shifts/{shift['id']}/signoff", **dict(hidden), note="checked")
    assert signed.status_code == 302, signed.get_data(as_text=True)
    session.expire_all()
    assert session.get_one(Shift, shift["id"]).status.value == "signed_off"


def test_a_board_rows_open_flags_are_those_its_waiting_list_shows(
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
) -> None:
    """A parcel not handed back is flagged missing_at_handover under the shift. The
    board row said "0 open flags" (it counted the shift's own kinds only), while the
    list it links to, `GET /flags?shift_id=&waiting=true`, listed that flag: the
    manager at 19:00 counted one thing and found another. They agree now, while the
    flag waits and once it is resolved."""
    a, b = parcels(session, world, 2)
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(b), pda.event(a, "delivered")])
    assert pda.close(shift["id"], last_seq=pda.seq).status_code == 200
    board_url = f"/api/v1/stations/{world.station.id}/handover"
    waiting_url = f"/api/v1/flags?shift_id={shift['id']}&waiting=true"

    def counted() -> tuple[list[int], list[int], int]:
        board = client.get(board_url, headers=manager).get_json()
        [row] = board["shifts"]
        assert row["open_flag_count"] == len(row["open_flags"])
        listed = client.get(waiting_url, headers=manager).get_json()["items"]
        return (
            [f["flag_id"] for f in row["open_flags"]],
            [f["id"] for f in listed],
            board["totals"]["with_open_flags"],
        )

    row_flags, listed, with_open = counted()
    assert len(listed) == 1 and row_flags == listed and with_open == 1
    flag_id = listed[0]
    resolved = client.post(
        f"/api/v1/flags/{flag_id}/resolve", json={"note": "lost in the van"}, headers=manager
    )
    assert resolved.status_code == 200, resolved.get_json()
    assert counted() == ([], [], 0)


def test_the_station_board_lists_the_days_shifts_with_their_balance(
    client: FlaskClient,
    session: Session,
    auth: Auth,
    world: World,
    pda: Courier,
    manager: dict[str, str],
) -> None:
    courier2 = factories.user(session, "courier2", "courier", world.station)
    factories.device(session, "PDA-0003", world.station)
    session.commit()
    other = Courier(client, auth, "courier2", "PDA-0003")
    a, b = parcels(session, world, 2)
    first = pda.open()
    pda.push([pda.event(a), pda.event(a, "delivered")])
    pda.close(first["id"])
    second = other.open()
    other.push([other.event(b)])
    response = client.get(f"/api/v1/stations/{world.station.id}/handover", headers=manager)
    assert response.status_code == 200, response.get_json()
    board = response.get_json()
    assert [row["shift_id"] for row in board["shifts"]] == [first["id"], second["id"]]
    rows = {row["shift_id"]: row for row in board["shifts"]}
    assert rows[first["id"]]["balance"]["status"] == "balanced"
    assert rows[first["id"]]["courier"]["username"] == "courier1"
    assert rows[second["id"]]["shift_status"] == "open"
    assert rows[second["id"]]["courier"]["id"] == courier2.id
    assert rows[second["id"]]["balance"]["missing"] == 1  # still out
    totals = board["totals"]
    assert (totals["shifts"], totals["checked_out"], totals["delivered"], totals["open"]) == (
        2,
        2,
        1,
        1,
    )
    # The open shift is on the road: counted as open, its parcel still out, not missing.
    assert (totals["balanced"], totals["unbalanced"], totals["provisional"]) == (1, 0, 0)
    assert (totals["missing"], totals["still_out"]) == (0, 1)
    other.close(second["id"])
    totals = client.get(
        f"/api/v1/stations/{world.station.id}/handover", headers=manager
    ).get_json()["totals"]
    assert (totals["open"], totals["balanced"], totals["unbalanced"]) == (0, 1, 1)
    assert (totals["missing"], totals["still_out"]) == (1, 0)
    assert board["date"] == first["work_date"]
    # Another day is empty; the date is the station's local date.
    yesterday = dt.date.fromisoformat(board["date"]) - dt.timedelta(days=1)
    empty = client.get(
        f"/api/v1/stations/{world.station.id}/handover?date={yesterday}", headers=manager
    ).get_json()
    assert empty["shifts"] == [] and empty["totals"]["shifts"] == 0


def test_the_board_names_a_courier_of_another_station_only_to_who_may_know_them(
    app: Flask,
    client: FlaskClient,
    session: Session,
    auth: Auth,
    world: World,
    pda: Courier,
) -> None:
    """courier1 moved to ST2 with a shift of yesterday still waiting at ST1 and one
    open today: ST1's board named him to its new manager, on the API and the page,
    where the proof page says "a courier of another station" (SECURITY.md threat 3).
    The rows stay (they are ST1's shifts), the courier by id only; the auditor reads
    his name."""
    earlier = pda.open(first_seq=1)
    pda.close(earlier["id"], last_seq=0)
    today = session.get(Shift, earlier["id"]).work_date
    session.execute(
        update(Shift)
        .where(Shift.id == earlier["id"])
        .values(work_date=today - dt.timedelta(days=1))
    )
    session.commit()
    pda.open(first_seq=1)
    world.courier.full_name = "Wang Wei"
    factories.user(session, "manager3", "station_manager", world.station)
    world.courier.station_id = world.other_station.id
    session.commit()

    def couriers(username: str) -> list[Any]:
        board = client.get(
            f"/api/v1/stations/{world.station.id}/handover", headers=auth.headers(username)
        ).get_json()
        return [row["courier"] for row in [*board["shifts"], *board["earlier_waiting"]]]

    def page(username: str) -> str:
        return signed_in(app, username).get(f"/web/board?station={world.station.id}")

    unnamed = {"id": world.courier.id, "username": None, "full_name": None}
    assert couriers("manager3") == [unnamed, unnamed]
    named = {"id": world.courier.id, "username": "courier1", "full_name": "Wang Wei"}
    assert couriers("auditor1") == [named, named]
    html = page("manager3")
    assert "Wang Wei" not in html and "courier1" not in html
    assert html.count("a courier of another station") == 2
    assert page("auditor1").count("Wang Wei") == 2


def test_shift_lists_are_scoped_to_the_caller(
    client: FlaskClient, session: Session, world: World, pda: Courier, auth: Auth
) -> None:
    shift = pda.open()
    own = client.get(SHIFTS, headers=pda.headers).get_json()
    assert [s["id"] for s in own["items"]] == [shift["id"]]
    other_manager = client.get(SHIFTS, headers=auth.headers("manager2")).get_json()
    assert other_manager["items"] == []
    by_status = client.get(f"{SHIFTS}?status=closed", headers=auth.headers("admin")).get_json()
    assert by_status["items"] == []
    by_date = client.get(
        f"{SHIFTS}?date={shift['work_date']}", headers=auth.headers("auditor1")
    ).get_json()
    assert [s["id"] for s in by_date["items"]] == [shift["id"]]


# -- errors -------------------------------------------------------------------------------


def test_one_open_shift_per_pda(client: FlaskClient, pda: Courier) -> None:
    pda.open()
    again = client.post(SHIFTS, json={}, headers=pda.headers)
    assert again.status_code == 409 and again.get_json()["code"] == "shift_already_open"
    assert "close it first" in again.get_json()["message"]


def test_a_pda_told_its_own_shift_is_open_is_told_to_go_on_with_it(
    client: FlaskClient, pda: Courier
) -> None:
    """A PDA that lost its storage mid-shift and opens one is told of the shift it is
    in: 'close it first' alone sent it to close the day's shift at noon, its parcels
    still out then missing at handover."""
    shift = pda.open()
    message = client.post(SHIFTS, json={}, headers=pda.headers).get_json()["message"]
    assert f"shift {shift['id']} open: go on with it" in message


def test_the_next_courier_on_a_pda_left_with_an_open_shift_is_told_a_manager_closes_it(
    client: FlaskClient, session: Session, world: World, auth: Auth, pda: Courier
) -> None:
    """courier1 forgot to close their shift and handed the PDA to courier2. Otherwise
    courier2's PDA is told to "close it first" when opening a shift, and, closing it, that
    a shift "is closed from the PDA it was opened on" (the very PDA it is on): a loop of
    refusals, where it should hear that the shift is another courier's and that a manager
    must close it. The codes stay as they were."""
    factories.user(session, "courier2", "courier", world.station)
    world.courier.full_name = "Zhang Wei"  # courier1, a colleague at the station
    session.commit()
    shift = pda.open()
    second = Courier(client, auth, "courier2", "PDA-0001")

    opened = client.post(SHIFTS, json={}, headers=second.headers)
    closing = second.close(shift["id"])

    assert opened.status_code == 409 and opened.get_json()["code"] == "shift_already_open"
    message = opened.get_json()["message"]
    assert "close it first" not in message
    assert "another courier (Zhang Wei)" in message and "a manager" in message
    assert closing.status_code == 403 and closing.get_json()["code"] == "not_your_shift"
    assert closing.get_json()["message"].startswith("this is another courier's shift")
    assert "or by a manager" in closing.get_json()["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"first_seq": 0}, "first_seq"),
        ({"first_seq": "one"}, "first_seq"),
        ({"planned_end_at": "2020-01-01T00:00:00Z"}, None),
        ({"planned_end_at": "tomorrow"}, "planned_end_at"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_open_requests_are_422_naming_the_field(
    client: FlaskClient, pda: Courier, body: dict[str, Any], field: str | None
) -> None:
    response = client.post(SHIFTS, json=body, headers=pda.headers)
    assert response.status_code == 422, response.get_json()
    if field:
        assert field in str(response.get_json()["errors"])
    else:
        assert response.get_json()["code"] == "invalid_planned_end"


def test_a_pda_that_lost_its_storage_finds_its_shift_and_closes_it_balanced(
    client: FlaskClient, auth: Auth, pda: Courier, session: Session, world: World
) -> None:
    """README, "A PDA that lost its storage": sign in, number on from
    ``device_max_seq + 1``, find the open shift by the documented filters (the
    README named them ``device`` and ``courier``, a 422 ``Unknown field``), go on with
    it and close it with its ``last_seq``: the balance counts every event."""
    parcels = [factories.parcel(session, world.station) for _ in range(2)]
    session.commit()
    shift = pda.open(first_seq=1)
    pda.push([pda.event(p.tracking_no) for p in parcels])
    reset = Courier(client, auth, "courier1", "PDA-0001")  # nothing kept on the PDA
    signed_in = client.post(
        "/api/v1/auth/token",
        json={"username": "courier1", "password": factories.PASSWORD, "device_id": "PDA-0001"},
    ).get_json()
    reset.seq = signed_in["device_max_seq"]
    found = client.get(
        SHIFTS, query_string={"status": "open", "device_id": "PDA-0001"}, headers=reset.headers
    )
    assert found.status_code == 200, found.get_json()
    assert [s["id"] for s in found.get_json()["items"]] == [shift["id"]]
    reset.push([reset.event(p.tracking_no, "returned_to_station") for p in parcels])
    assert reset.close(shift["id"], last_seq=reset.seq).status_code == 200
    balance = client.get(f"{SHIFTS}/{shift['id']}/balance", headers=reset.headers).get_json()
    assert (balance["status"], balance["checked_out"], balance["returned"]) == ("balanced", 2, 2)
    assert balance["missing_seqs"] == []


def test_first_seq_already_used_is_a_conflict(
    client: FlaskClient, session: Session, world: World, pda: Courier
) -> None:
    (a,) = parcels(session, world, 1)
    earlier = pda.open()
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    assert pda.close(earlier["id"]).status_code == 200
    response = client.post(SHIFTS, json={"first_seq": 2}, headers=pda.headers)
    assert response.status_code == 409 and response.get_json()["code"] == "first_seq_used"
    # It says which seq to declare: it read "this PDA's seq 2 belongs to an earlier
    # shift", as if seq 2 alone were taken.
    assert "after 2" in response.get_json()["errors"]["first_seq"][0]


def test_a_first_seq_another_shift_declared_its_own_is_a_conflict(
    client: FlaskClient, session: Session, world: World, auth: Auth, pda: Courier
) -> None:
    """The previous shift closed declaring seqs up to 3, two of them still queued: a new
    shift claiming seq 2 would take those events if its opening came before them, and
    not if after. It is told the seq is used, as for one the server holds."""
    (a,) = parcels(session, world, 1)
    earlier = pda.open(first_seq=1)
    pda.push([pda.event(a)])
    assert pda.close(earlier["id"], last_seq=3).status_code == 200
    factories.user(session, "courier2", "courier", world.station)
    session.commit()
    headers = auth.headers("courier2", "PDA-0001")
    response = client.post(SHIFTS, json={"first_seq": 2}, headers=headers)
    assert response.status_code == 409 and response.get_json()["code"] == "first_seq_used"
    assert client.post(SHIFTS, json={"first_seq": 4}, headers=headers).status_code == 201


def test_closing_is_idempotent_but_a_new_last_seq_conflicts(
    client: FlaskClient, pda: Courier
) -> None:
    shift = pda.open()
    first = pda.close(shift["id"], last_seq=3)
    again = pda.close(shift["id"], last_seq=3)
    assert again.status_code == 200 and again.get_json() == first.get_json()
    other = pda.close(shift["id"], last_seq=4)
    assert other.status_code == 409 and other.get_json()["code"] == "shift_already_closed"


def test_sign_off_needs_a_closed_shift_and_a_note(
    client: FlaskClient, pda: Courier, manager: dict[str, str]
) -> None:
    shift = pda.open()
    response = sign_off(client, shift["id"], manager)
    assert response.status_code == 409 and response.get_json()["code"] == "shift_open"
    pda.close(shift["id"])
    no_note = client.post(f"{SHIFTS}/{shift['id']}/signoff", json={}, headers=manager)
    assert no_note.status_code == 422 and "note" in str(no_note.get_json()["errors"])
    blank = sign_off(client, shift["id"], manager, note="   ")
    assert blank.status_code == 422
    assert sign_off(client, shift["id"], manager).status_code == 200
    other = sign_off(client, shift["id"], manager, note="checked again")
    assert other.status_code == 409 and other.get_json()["code"] == "already_signed_off"


def test_a_sign_off_sent_again_is_answered_as_the_first_time(
    client: FlaskClient,
    session: Session,
    world: World,
    auth: Auth,
    pda: Courier,
    manager: dict[str, str],
) -> None:
    """The shift page's answer was lost and the manager sent the sign-off again: it was
    a 409 "already signed off", as if it had failed, where a close sent again is
    answered as the first time. The same sign-off (manager, note, version) is now; it
    writes nothing. Another manager's, another note or another version is refused."""
    shift = pda.open()
    assert pda.close(shift["id"]).status_code == 200
    version = balance(client, shift["id"], manager)["version"]
    first = sign_off(client, shift["id"], manager, balance_version=version)
    assert first.status_code == 200, first.get_json()
    again = sign_off(client, shift["id"], manager, balance_version=version)
    assert again.status_code == 200, again.get_json()
    assert again.get_json() == first.get_json()
    assert sign_off(client, shift["id"], manager).status_code == 200  # no version named
    entries = select(AuditEntry).where(AuditEntry.action == "shift_signed_off")
    assert len(session.scalars(entries).all()) == 1
    factories.user(session, "manager3", "station_manager", world.station)
    session.commit()
    for headers, body in (
        (auth.headers("manager3"), {}),
        (manager, {"note": "recounted"}),
        (manager, {"balance_version": "0" * 16}),
    ):
        refused = sign_off(client, shift["id"], headers, **body)
        assert refused.status_code == 409, refused.get_json()
        assert refused.get_json()["code"] == "already_signed_off"
    assert len(session.scalars(entries).all()) == 1


def test_a_sign_off_sent_again_with_a_force_reason_it_did_not_keep_is_another_one(
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
) -> None:
    """The first sign-off needed no forcing and kept no reason; the manager sent it
    again with a `force_reason` and was answered 200 as if it were the same request
    (the kept reason was compared as "none or this one"). Now it is another sign-off:
    refused, saying the shift is signed off by the caller and when. A forced sign-off
    sent again with its reason is still the same; with another reason, it is not."""
    shift = pda.open()
    assert pda.close(shift["id"]).status_code == 200
    assert sign_off(client, shift["id"], manager).status_code == 200
    again = sign_off(client, shift["id"], manager, force_reason="PDA broken")
    assert again.status_code == 409, again.get_json()
    assert again.get_json()["code"] == "already_signed_off"
    assert "signed off, by you at " in again.get_json()["message"]

    forced = pda.open(first_seq=1)
    pda.close(forced["id"], last_seq=2)  # seqs 1-2 still on the PDA: provisional
    reason = "PDA broken, its scans are gone"
    assert sign_off(client, forced["id"], manager, force_reason=reason).status_code == 200
    assert sign_off(client, forced["id"], manager, force_reason=reason).status_code == 200
    other = sign_off(client, forced["id"], manager, force_reason="another reason")
    assert other.status_code == 409, other.get_json()
    entries = select(AuditEntry).where(AuditEntry.action == "shift_signed_off")
    assert len(session.scalars(entries).all()) == 2


def test_a_phone_in_the_sign_off_is_masked_except_for_auditors(
    client: FlaskClient, auth: Auth, pda: Courier, manager: dict[str, str]
) -> None:
    """The manager signs off after calling the recipient and writes the number down, in
    the note or in the reason for forcing it; otherwise every other reader of the shift
    (its courier, an admin, the manager's own answer) gets the recipient's whole number,
    which rule 7 shows auditors only."""
    shift = pda.open(first_seq=1)
    pda.close(shift["id"], last_seq=2)  # seqs 1-2 still on the PDA: provisional
    note = "parcel with the neighbour, recipient on 138 1234 5678 agreed"
    reason = "PDA broken; +86 138 1234 5678 confirmed both"
    signed = sign_off(client, shift["id"], manager, note=note, force_reason=reason)
    assert signed.status_code == 200, signed.get_json()

    def sign_off_texts(username: str) -> list[tuple[str, str]]:
        headers = auth.headers(username, "PDA-0001" if username == "courier1" else None)
        one = client.get(f"{SHIFTS}/{shift['id']}", headers=headers).get_json()
        listed = client.get(SHIFTS, headers=headers).get_json()["items"]
        return [(s["signoff_note"], s["signoff_forced_reason"]) for s in [one, *listed]]

    masked = (
        "parcel with the neighbour, recipient on ********678 agreed",
        "PDA broken; +**********678 confirmed both",
    )
    answer = signed.get_json()
    assert (answer["signoff_note"], answer["signoff_forced_reason"]) == masked
    assert sign_off_texts("auditor1") == [(note, reason)] * 2
    assert sign_off_texts("admin") == [masked] * 2
    assert sign_off_texts("courier1") == [masked] * 2


def test_unknown_shift_and_station_are_404_and_a_bad_date_422(
    client: FlaskClient, world: World, manager: dict[str, str]
) -> None:
    assert client.get(f"{SHIFTS}/999999/balance", headers=manager).status_code == 404
    assert client.get(f"{SHIFTS}/999999", headers=manager).get_json()["code"] == "shift_not_found"
    admin_board = client.get("/api/v1/stations/999999/handover", headers=manager)
    assert admin_board.status_code == 403  # a manager's own station only, whatever exists
    bad = client.get(f"/api/v1/stations/{world.station.id}/handover?date=29/11", headers=manager)
    assert bad.status_code == 422 and "date" in str(bad.get_json()["errors"])


def test_an_admin_gets_404_for_a_station_that_does_not_exist(
    client: FlaskClient, auth: Auth, world: World
) -> None:
    response = client.get("/api/v1/stations/999999/handover", headers=auth.headers("admin"))
    assert response.status_code == 404 and response.get_json()["code"] == "station_not_found"


# -- who may do what ------------------------------------------------------------------------

CALLERS = {
    "none": None,
    "admin": ("admin", None),
    "auditor": ("auditor1", None),
    "integration": ("app1", None),
    "manager_own": ("manager1", None),
    "manager_other": ("manager2", None),
    "courier_own": ("courier1", "PDA-0001"),
    "courier_other": ("courier9", "PDA-0009"),  # same station, not the shift's courier
}
# Each endpoint against a closed shift of courier1 at station ST1 (sign-off: 200 once).
# Another station's shift is a 404 to a manager, as an unknown id is (a 403 would tell
# them it exists); a station named in the path (the handover board) stays a 403.
EXPECTED: dict[str, dict[str, int]] = {
    "GET /shifts/<id>": dict(
        none=401, admin=200, auditor=200, integration=403, manager_own=200,
        manager_other=404, courier_own=200, courier_other=403,
    ),
    "GET /shifts/<id>/balance": dict(
        none=401, admin=200, auditor=200, integration=403, manager_own=200,
        manager_other=404, courier_own=200, courier_other=403,
    ),
    "POST /shifts/<id>/close": dict(
        none=401, admin=200, auditor=403, integration=403, manager_own=200,
        manager_other=404, courier_own=200, courier_other=403,
    ),
    "POST /shifts/<id>/signoff": dict(
        none=401, admin=200, auditor=403, integration=403, manager_own=200,
        manager_other=404, courier_own=403, courier_other=403,
    ),
    "GET /stations/<id>/handover": dict(
        none=401, admin=200, auditor=200, integration=403, manager_own=200,
        manager_other=403, courier_own=403, courier_other=403,
    ),
    "GET /shifts": dict(
        none=401, admin=200, auditor=200, integration=403, manager_own=200,
        manager_other=200, courier_own=200, courier_other=200,
    ),
    "POST /shifts": dict(
        none=401, admin=403, auditor=403, integration=403, manager_own=403,
        manager_other=403, courier_own=409, courier_other=201,
    ),
}  # fmt: skip


@pytest.mark.parametrize("endpoint", sorted(EXPECTED))
@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_access(
    client: FlaskClient,
    session: Session,
    auth: Auth,
    world: World,
    pda: Courier,
    endpoint: str,
    caller: str,
) -> None:
    factories.user(session, "courier9", "courier", world.station)
    factories.device(session, "PDA-0009", world.station)
    session.commit()
    shift = pda.open()
    pda.close(shift["id"])
    pda.open()  # courier1's PDA has an open shift again: opening another is a 409
    who = CALLERS[caller]
    headers = auth.headers(*who) if who else {}
    method, path = endpoint.split(" ")
    url = "/api/v1" + path.replace("/shifts/<id>", f"/shifts/{shift['id']}").replace(
        "/stations/<id>", f"/stations/{world.station.id}"
    )
    body = {"note": "ok"} if path.endswith("signoff") else {}
    response = client.open(url, method=method, json=body if method == "POST" else None,
                           headers=headers)  # fmt: skip
    assert response.status_code == EXPECTED[endpoint][caller], response.get_json()


@pytest.mark.parametrize("first", ["delivery", "correction"])
def test_a_colleagues_correction_voiding_a_delivery_is_flagged_whichever_arrives_first(
    client: FlaskClient, session: Session, world: World, auth: Auth, first: str
) -> None:
    """SECURITY.md threat 3: a colleague signed in with the same PDA's id voids a
    courier's delivery with a correction. It cannot be told from the courier's own
    correction still queued on the PDA at handover, so it is kept and applied, and
    flagged for the manager (``correction_by_another_courier``, naming both couriers),
    whether the correction or the delivery reached the server first (rule 3)."""
    rogue_user = factories.user(session, "courier3", "courier", world.station)
    parcel = factories.parcel(session, world.station)
    session.commit()
    owner = Courier(client, auth, "courier1", "PDA-0001")
    recorded = [
        owner.event(parcel.tracking_no),
        owner.event(
            parcel.tracking_no,
            "delivered",
            pod={"recipient_name": "Wang", "signature_sha256": "c" * 64},
        ),
    ]
    rogue = Courier(client, auth, "courier3", "PDA-0001")
    rogue.seq = 10
    voiding = rogue.event(
        parcel.tracking_no,
        "correction",
        voids_client_event_id=recorded[1]["client_event_id"],
        reason="wrong parcel",
    )
    pushes = [(owner, recorded), (rogue, [voiding])]
    for pda, events in pushes if first == "delivery" else reversed(pushes):
        receipt = pda.push(events)
        assert {r["status"] for r in receipt["results"]} == {"applied"}
    flag = session.scalars(select(Flag).where(Flag.kind == "correction_by_another_courier")).one()
    delivery, correction = (
        session.scalars(select(ScanEvent.id).where(ScanEvent.seq == seq)).one() for seq in (2, 11)
    )
    assert (flag.severity.value, flag.subject_key) == ("warning", parcel.tracking_no)
    assert flag.evidence["corrections"] == [
        {
            "voided_event_id": delivery,
            "correction_event_id": correction,
            "recorded_by": world.courier.id,
            "corrected_by": rogue_user.id,
        }
    ]


# -- a PDA handed over with the first courier's events still queued ---------------------------


def _handed_over(
    client: FlaskClient,
    session: Session,
    world: World,
    auth: Auth,
    *,
    last_seq: bool = True,
    closed: bool = True,
) -> tuple[Courier, dict[str, Any], list[str], list[dict[str, Any]]]:
    """courier1 opens a shift on PDA-0001 declaring its first seq, checks two parcels out
    online, then records offline a delivery (with a signature) and a return, naming the
    shift. Back at the station the PDA closes the shift (declaring its last seq, unless
    not ``last_seq``; not at all, unless ``closed``) and is handed to courier2, who signs
    in on it while courier1's two events are still queued. Returns the PDA (signed in
    as courier2), courier1's shift, the tracking numbers and the queued events."""
    factories.user(session, "courier2", "courier", world.station)
    first, second = parcels(session, world, 2)
    pda = Courier(client, auth, "courier1", "PDA-0001")
    shift = pda.open(first_seq=1)
    pda.push([pda.event(first), pda.event(second)])
    afternoon = now() - dt.timedelta(hours=3)
    queued = [
        pda.event(first, "delivered", occurred_at=afternoon, shift_id=shift["id"]),
        pda.event(second, "returned_to_station", occurred_at=afternoon + dt.timedelta(hours=2)),
    ]
    if closed:
        response = pda.close(shift["id"], **({"last_seq": pda.seq} if last_seq else {}))
        assert response.status_code == 200, response.get_json()
    pda.headers = auth.headers("courier2", "PDA-0001")
    return pda, shift, [first, second], queued


def test_a_handovers_queue_pushed_under_the_next_sign_in_is_the_first_couriers(
    client: FlaskClient, session: Session, world: World, auth: Auth, manager: dict[str, str]
) -> None:
    """The PDA pushes courier1's queued events with the only token it holds now,
    courier2's. They were answered `applied` and acked, so the PDA deleted them: were
    they filed under no shift, courier1's handover would show the delivered and the
    returned parcel missing for good, and the delivery flagged as courier2's, who never
    left the station. The seqs courier1 declared at opening and closing say whose they
    are."""
    pda, shift, (first, _), queued = _handed_over(client, session, world, auth)
    receipt = pda.push(queued)
    assert [r["status"] for r in receipt["results"]] == ["applied", "applied"]
    assert receipt["acked_through_seq"] == 4
    found = balance(client, shift["id"], manager)
    assert (found["missing"], found["delivered"], found["returned"]) == (0, 1, 1), found
    assert found["status"] == "balanced", found["discrepancies"]
    courier2 = session.scalar(select(User.id).where(User.username == "courier2"))
    timeline = client.get(f"/api/v1/parcels/{first}", headers=auth.headers("auditor1"))
    delivered = timeline.get_json()["timeline"][-1]
    assert (delivered["type"], delivered["shift_id"]) == ("delivered", shift["id"])
    assert (delivered["courier_id"], delivered["pushed_by_courier_id"]) == (
        world.courier.id,
        courier2,
    )
    proofs = client.get(f"/api/v1/proofs?courier_id={world.courier.id}", headers=manager)
    assert [p["tracking_no"] for p in proofs.get_json()["items"]] == [first]


def test_the_next_couriers_undeclared_shift_does_not_take_the_queued_return(
    client: FlaskClient, session: Session, world: World, auth: Auth, manager: dict[str, str]
) -> None:
    """courier2 opens a shift without `first_seq` (optional in the contract), and the
    queued return, a few minutes old, reaches the server after: by time it falls within
    the filing grace of courier2's opening, but its seq lies in courier1's declared
    range, so courier2's balance is not charged with a parcel it never checked out."""
    pda, shift, (_, second), queued = _handed_over(client, session, world, auth)
    queued[1]["occurred_at"] = (now() - dt.timedelta(minutes=1)).isoformat()
    next_shift = pda.open()
    pda.push(queued)
    theirs = balance(client, next_shift["id"], manager)
    assert second not in {p["tracking_no"] for p in theirs["parcels"]}, theirs["parcels"]
    assert balance(client, shift["id"], manager)["returned"] == 1


def test_another_couriers_shift_takes_no_event_its_declared_seqs_do_not_hold(
    client: FlaskClient, session: Session, world: World, auth: Auth, manager: dict[str, str]
) -> None:
    """Only a closed shift's declared seqs speak for another courier: closed without its
    last seq, courier1's shift holds nothing courier2's sign-in pushes (its end is only
    an estimate by time), and a queued event that names it is `wrong_shift`, as a
    colleague's claim always was. (PDAs should declare both seqs.)"""
    pda, shift, (first, _), queued = _handed_over(client, session, world, auth, last_seq=False)
    pda.push(queued)
    assert balance(client, shift["id"], manager)["missing"] == 2
    flags = client.get("/api/v1/flags?kind=wrong_shift", headers=manager).get_json()["items"]
    assert [f["evidence"]["claimed_shift_ids"] for f in flags] == [[shift["id"]]]
    assert flags[0]["evidence"]["seqs"] == [queued[0]["seq"]]


def test_a_handovers_queue_pushed_before_the_manager_closes_the_shift_is_filed_as_after(
    client: FlaskClient, session: Session, world: World, auth: Auth
) -> None:
    """courier1 forgets to close the shift and hands the PDA over. The PDA pushes
    courier1's queue under courier2's sign-in at once; then the manager closes
    courier1's shift, declaring its last seq. Pushed after the close, the same events
    are filed under courier1's shift as courier1's; pushed before, they stayed filed
    under no shift, as courier2's, and courier1's handover showed both parcels missing
    for good (the PDA pruned them: they were acked), whether the push or the close
    came first deciding (rule 3). The `wrong_shift` their naming the shift raised
    closes with the close."""
    pda, shift, _, queued = _handed_over(client, session, world, auth, closed=False)
    receipt = pda.push(queued)
    assert receipt["acked_through_seq"] == 4  # the PDA deletes them now

    manager = auth.headers("manager1")
    named = client.get("/api/v1/flags?kind=wrong_shift", headers=manager).get_json()["items"]
    assert [f["status"] for f in named] == ["open"]  # the delivery named courier1's shift
    closed = client.post(
        f"/api/v1/shifts/{shift['id']}/close", json={"last_seq": 4}, headers=manager
    )
    assert closed.status_code == 200, closed.get_json()

    found = balance(client, shift["id"], manager)
    assert (found["missing"], found["delivered"], found["returned"]) == (0, 1, 1), found
    delivered = session.scalar(select(ScanEvent).where(ScanEvent.seq == 3))
    assert delivered is not None
    session.refresh(delivered)
    assert (delivered.shift_id, delivered.courier_id) == (shift["id"], world.courier.id)
    named = client.get("/api/v1/flags?kind=wrong_shift", headers=manager).get_json()["items"]
    assert [f["status"] for f in named] == ["closed"]


def test_a_handovers_queued_correction_taken_by_the_close_is_judged_as_the_first_couriers(
    client: FlaskClient, session: Session, world: World, auth: Auth
) -> None:
    """courier1 delivers a parcel, pushes it, then voids the delivery with a correction
    recorded while the next parcel was in hand (filed under that parcel's number), and
    hands the PDA over with the shift open. courier2's sign-in pushes the correction: as
    courier2's, it voids courier1's delivery (`correction_by_another_courier`). The
    manager's close declaring the last seq takes the correction as courier1's; the
    delivery's parcel is judged again then, and the flag closes, as it never opens when
    courier1's own sign-in pushes the correction (rule 3)."""
    first, second = parcels(session, world, 2)
    pda = Courier(client, auth, "courier1", "PDA-0001")
    shift = pda.open(first_seq=1)
    pda.push([pda.event(first), pda.event(second)])
    delivered = pda.event(first, "delivered")
    pda.push([delivered])
    correction = pda.event(
        second,
        "correction",
        voids_client_event_id=delivered["client_event_id"],
        reason="tapped the wrong parcel",
    )
    factories.user(session, "courier2", "courier", world.station)
    pda.headers = auth.headers("courier2", "PDA-0001")
    pda.push([correction])

    manager = auth.headers("manager1")

    def foreign_corrections() -> list[str]:
        listed = client.get(
            "/api/v1/flags?kind=correction_by_another_courier", headers=manager
        ).get_json()["items"]
        return [f["status"] for f in listed]

    assert foreign_corrections() == ["open"]  # as courier2's, before the close
    closed = client.post(
        f"/api/v1/shifts/{shift['id']}/close", json={"last_seq": pda.seq}, headers=manager
    )
    assert closed.status_code == 200, closed.get_json()
    taken = session.scalar(select(ScanEvent).where(ScanEvent.seq == pda.seq))
    assert taken is not None
    session.refresh(taken)
    assert taken.courier_id == world.courier.id
    assert foreign_corrections() == ["closed"]


def _closes_on_the_log(client: FlaskClient, auth: Auth, shift_id: int) -> list[dict[str, Any]]:
    """The shift's `shift_closed_for_courier` entries, as an auditor reads them."""
    answer = client.get(
        "/api/v1/audit",
        query_string={"subject_type": "shift", "subject_key": str(shift_id)},
        headers=auth.headers("auditor1"),
    )
    assert answer.status_code == 200, answer.get_json()
    return [e for e in answer.get_json()["items"] if e["action"] == "shift_closed_for_courier"]


def _log_intact(client: FlaskClient, auth: Auth) -> bool:
    answer = client.get("/api/v1/audit/verify", headers=auth.headers("auditor1")).get_json()
    return bool(answer["intact"])


def test_a_managers_close_declaring_the_last_seq_is_on_the_audit_log(
    client: FlaskClient, session: Session, world: World, auth: Auth
) -> None:
    """courier1 hands the PDA over with the shift open and courier2's sign-in pushes the
    queue; the manager closes courier1's shift declaring last seq 4, which takes both
    queued events and makes the balance. The row keeps only who closed it and the seq:
    the log says who, the last seq given, what the server held from the PDA then and
    which events the close took. The retry changes nothing and logs nothing; a refused
    close neither."""
    pda, shift, _, queued = _handed_over(client, session, world, auth, closed=False)
    pda.push(queued)
    manager = auth.headers("manager1")
    close = f"/api/v1/shifts/{shift['id']}/close"
    refused = client.post(close, json={"last_seq": 0}, headers=manager)
    assert refused.status_code == 422, refused.get_json()
    assert _closes_on_the_log(client, auth, shift["id"]) == []
    for _ in range(2):  # the second is a retry
        closed = client.post(close, json={"last_seq": 4}, headers=manager)
        assert closed.status_code == 200, closed.get_json()

    [entry] = _closes_on_the_log(client, auth, shift["id"])
    assert (entry["actor_id"], entry["subject_type"], entry["subject_key"]) == (
        world.manager.id,
        "shift",
        str(shift["id"]),
    )
    taken = session.scalars(
        select(ScanEvent.id).where(ScanEvent.seq.in_([3, 4])).order_by(ScanEvent.seq)
    ).all()
    closed_at = dt.datetime.fromisoformat(closed.get_json()["closed_at"])
    assert entry["details"] == {
        "station_id": world.station.id,
        "courier_id": world.courier.id,
        "device_id": "PDA-0001",
        "first_seq": 1,
        "last_seq": 4,
        "seq_at_close": 4,
        "closed_at": closed_at.astimezone(dt.UTC).isoformat(timespec="microseconds"),
        "events_taken": list(taken),
    }
    assert len(taken) == 2
    assert _log_intact(client, auth)


def test_an_admins_close_without_a_last_seq_is_logged_and_the_couriers_own_is_not(
    client: FlaskClient, session: Session, world: World, auth: Auth, pda: Courier
) -> None:
    """A close from the PDA by its own courier is the courier's own record, as the PDA's
    events are: no entry. An admin closing a colleague's shift left open (the PDA died)
    without a last seq leaves its end to time: the entry says so (`last_seq` null)."""
    (a,) = parcels(session, world, 1)
    own = pda.open(first_seq=1)
    pda.push([pda.event(a)])
    assert pda.close(own["id"], last_seq=1).status_code == 200
    assert _closes_on_the_log(client, auth, own["id"]) == []

    left = pda.open(first_seq=2)
    pda.push([pda.event(a, "delivered")])
    closed = client.post(f"{SHIFTS}/{left['id']}/close", json={}, headers=auth.headers("admin"))
    assert closed.status_code == 200, closed.get_json()
    [entry] = _closes_on_the_log(client, auth, left["id"])
    assert entry["actor_id"] == world.admin.id
    details = entry["details"]
    assert (details["last_seq"], details["first_seq"], details["seq_at_close"]) == (None, 2, 2)
    assert (details["courier_id"], details["events_taken"]) == (world.courier.id, [])
    assert _log_intact(client, auth)


def test_a_close_keeps_the_wrong_shift_of_a_handovers_queue_that_named_another_shift(
    client: FlaskClient, session: Session, world: World, auth: Auth
) -> None:
    """As above, but the PDA's app stamps courier1's queued events with a shift id left
    from another PDA's session (424242, no shift of this PDA): the push under courier2's
    sign-in raises the PDA's `wrong_shift`, and the events wait, filed under no shift.
    The manager closes courier1's shift declaring its last seq, which takes them by
    their seqs. The flag was closed, "closed declaring the seqs its events name it by":
    they never named it, and the PDA still names a shift not its own. It stays open."""
    pda, shift, _, queued = _handed_over(client, session, world, auth, closed=False)
    pda.push([{**event, "shift_id": 424242} for event in queued])
    manager = auth.headers("manager1")
    (named,) = client.get("/api/v1/flags?kind=wrong_shift", headers=manager).get_json()["items"]
    assert named["status"] == "open" and named["evidence"]["claimed_shift_ids"] == [424242]

    closed = client.post(
        f"/api/v1/shifts/{shift['id']}/close", json={"last_seq": 4}, headers=manager
    )
    assert closed.status_code == 200, closed.get_json()
    found = balance(client, shift["id"], manager)
    assert (found["missing"], found["delivered"], found["returned"]) == (0, 1, 1), found
    after = client.get(f"/api/v1/flags/{named['id']}", headers=manager).get_json()
    assert after["status"] == "open", (after["status"], after["closed_reason"])


def test_a_colleagues_declared_seqs_beat_the_pushers_shift_left_open_by_seq(
    client: FlaskClient, session: Session, world: World, auth: Auth
) -> None:
    """courier2 closes a shift on the PDA declaring its first seq but not its last, and
    hands the PDA to courier1 at the counter, who opens a shift declaring first_seq 2,
    checks a parcel out a minute later (seq 3, still queued: the counter's Wi-Fi is
    down) and closes declaring last_seq 3. Handed back, the PDA pushes seq 3 under
    courier2's sign-in. courier1's shift declared seqs 2-3 its own, and courier2's
    shift, by its balance (``sync.handover.owned_seqs``), ends where the PDA's next
    shift starts. A shift left open by seq holds, by time alone, what came within the
    filing grace of its close: that estimate must not beat seqs another courier's
    shift declared, or courier2's shift would take courier1's check-out as courier2's,
    where pushed under courier1's sign-in it is courier1's."""
    factories.user(session, "courier2", "courier", world.station)
    mine, theirs = parcels(session, world, 2)
    pda = Courier(client, auth, "courier2", "PDA-0001")
    own = pda.open(first_seq=1)
    pda.push([pda.event(mine)])
    assert pda.close(own["id"]).status_code == 200  # no last_seq: optional

    pda.headers = auth.headers("courier1", "PDA-0001")
    colleague = pda.open(first_seq=2)
    pda.push([pda.event(theirs)])  # seq 2
    queued = [pda.event(theirs, "out_for_delivery")]  # seq 3, a minute after the close
    closed = pda.close(colleague["id"], last_seq=3)
    assert closed.status_code == 200, closed.get_json()

    pda.headers = auth.headers("courier2", "PDA-0001")
    pda.push(queued)

    event = session.scalar(select(ScanEvent).where(ScanEvent.seq == 3))
    assert event is not None
    assert (event.shift_id, event.courier_id) == (colleague["id"], world.courier.id)


@pytest.mark.parametrize("order", ["push, then close", "close, then push"])
def test_deliveries_recorded_while_the_pda_clock_was_reset_count_in_the_shift_its_seqs_bound(
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
    order: str,
) -> None:
    """The PDA's battery died offline; it came back dated 2000-01-01 and the courier kept
    delivering. On reconnecting at 18:00 the PDA set its clock right (NTP) and pushed its
    queue, and the courier closed the shift declaring its last seq. The shift was opened
    without a first_seq (optional) on the PDA's first shift, so its balance counts the
    PDA's seqs from 1 (README, "provisional"): seqs 1-6 are all this shift's by the PDA's
    causal order (rule 6). The events dated 2000, corrected to a year ago at most, were
    filed under no shift, and the delivered and returned parcels showed missing at
    handover; whether the push or the close came first must not matter (rule 3)."""
    checked, at_door, locker = parcels(session, world, 3)
    shift = pda.open()
    stored = session.get(Shift, shift["id"])
    assert stored is not None
    stored.opened_at = now() - dt.timedelta(hours=7)  # opened at 11:00
    session.commit()
    noon = now() - dt.timedelta(hours=6)
    pda.push(
        [
            pda.event(n, occurred_at=noon - dt.timedelta(minutes=30))
            for n in (checked, at_door, locker)
        ]
    )
    factory_date = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    offline = [
        pda.event(checked, "delivered", occurred_at=noon + dt.timedelta(hours=1)),
        pda.event(at_door, "delivered", occurred_at=factory_date + dt.timedelta(minutes=5)),
        pda.event(locker, "returned_to_station", occurred_at=factory_date + dt.timedelta(hours=3)),
    ]
    if order == "push, then close":
        pda.push(offline)  # sent_at: now, the clock set right
    closed = pda.close(shift["id"], last_seq=6)
    assert closed.status_code == 200, closed.get_json()
    if order == "close, then push":
        pda.push(offline)

    found = balance(client, shift["id"], manager)
    outcomes = {p["tracking_no"]: p["outcome"] for p in found["parcels"]}
    assert outcomes == {checked: "delivered", at_door: "delivered", locker: "returned"}
    assert found["missing"] == 0 and found["status"] == "balanced", found["discrepancies"]
    flags = client.get("/api/v1/flags?kind=missing_at_handover", headers=manager).get_json()
    assert {f["status"] for f in flags["items"]} <= {"closed"}  # raised at close, if before


def test_returns_scanned_after_a_managers_early_close_count_once_the_pda_declares_its_last_seq(
    client: FlaskClient,
    auth: Auth,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
) -> None:
    """19:00: the manager closes the shifts still open, this one too, its PDA out of
    range since noon. 19:20: the courier is back and scans the two parcels not delivered
    in at the counter; the PDA pushes its queue and closes the shift with its last seq,
    as README says. The close was refused (409) and the returns, more than five minutes
    after the manager's close, were no shift's: two parcels missing at handover that the
    courier had handed back. The PDA's last seq is taken, and the shift balances."""
    delivered, back, other = parcels(session, world, 3)
    shift = pda.open(first_seq=1)
    stored = session.get(Shift, shift["id"])
    assert stored is not None
    stored.opened_at = now() - dt.timedelta(hours=8)
    session.commit()
    pda.push(
        [pda.event(n, occurred_at=now() - dt.timedelta(hours=7)) for n in (delivered, back, other)]
    )
    queued = [pda.event(delivered, "delivered", occurred_at=now() - dt.timedelta(hours=2))]
    assert (
        client.post(f"{SHIFTS}/{shift['id']}/close", json={}, headers=manager).status_code == 200
    )
    session.execute(
        update(Shift)
        .where(Shift.id == shift["id"])
        .values(closed_at=now() - dt.timedelta(minutes=40))
    )
    session.commit()
    queued += [
        pda.event(n, "returned_to_station", occurred_at=now() - dt.timedelta(minutes=20))
        for n in (back, other)
    ]
    pda.push(queued)
    closing = pda.close(shift["id"], last_seq=pda.seq)
    assert closing.status_code == 200, closing.get_json()
    found = balance(client, shift["id"], manager)
    assert (found["status"], found["returned"], found["missing"]) == ("balanced", 2, 0)
    log = client.get(
        "/api/v1/audit",
        query_string={"action": "shift_last_seq_declared"},
        headers=auth.headers("admin"),
    ).get_json()["items"]
    assert [(e["actor_id"], e["details"]["last_seq"]) for e in log] == [
        (world.courier.id, pda.seq)
    ]


def test_a_drop_rejected_after_a_balanced_sign_off_reopens_the_shift_with_a_flag(
    app: Flask,
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
) -> None:
    """A station manager's case: yesterday's shift was signed off balanced, its parcel
    returned; today the PDA pushes a locker drop of that parcel without its locker,
    rejected. The shift owns the seq (closed without its last seq), so the drop is one
    of its rejected events: the sign-off never saw it. Otherwise the shift stays signed
    off with no flag, and today's board never shows it (its earlier days list only
    shifts not signed off). It reopens with a late_event_after_signoff flag citing the
    quarantined drop: the board lists it among the earlier days' waiting, the shift's
    page and the flag's page show the drop."""
    (a,) = parcels(session, world, 1)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    assert pda.close(shift["id"]).status_code == 200
    assert balance(client, shift["id"], manager)["status"] == "balanced"
    assert sign_off(client, shift["id"], manager, note="all back").status_code == 200
    yesterday = session.get(Shift, shift["id"])
    assert yesterday is not None
    yesterday.work_date -= dt.timedelta(days=1)
    session.commit()
    drop = pda.event(a, "delivered_to_locker", compartment="B07")  # no locker_id

    receipt = pda.push([drop])

    assert receipt["results"][0]["status"] == "rejected"
    [late] = [f for f in receipt["flags_raised"] if f["kind"] == "late_event_after_signoff"]
    found = client.get(f"{SHIFTS}/{shift['id']}", headers=manager).get_json()
    assert (found["status"], found["reopened_count"]) == ("closed", 1)
    flag = client.get(f"/api/v1/flags/{late['flag_id']}", headers=manager).get_json()
    quarantined = client.get(
        "/api/v1/quarantine", query_string={"device_id": pda.device_id}, headers=manager
    ).get_json()
    [rejected] = [q["id"] for q in quarantined["items"]]
    assert flag["status"] == "open" and flag["evidence"]["rejected_event_ids"] == [rejected]
    pages = signed_in(app, "manager1")
    board = pages.get("/web/board")
    earlier = board[board.index('id="earlier-waiting"') :]
    assert f'href="/web/shifts/{shift["id"]}"' in earlier and "reopened by late events" in earlier
    html = pages.get(f"/web/shifts/{shift['id']}")
    own_flags = html[html.index('id="flags-h"') : html.index('id="rejected-h"')]
    assert f'href="#rejected-{rejected}"' in own_flags
    assert f'id="rejected-{rejected}"' in html and drop["client_event_id"] in html
    flag_html = pages.get(f"/web/flags/{late['flag_id']}")
    cited = flag_html[flag_html.index('id="rejected-events"') :]
    assert drop["client_event_id"] in cited and "locker_id" in cited
    assert f'href="/web/shifts/{shift["id"]}#rejected-{rejected}"' in cited
    auditor = signed_in(app, "auditor1").get(f"/web/flags/{late['flag_id']}")
    assert drop["client_event_id"] in auditor[auditor.index('id="rejected-events"') :]
    read = session.scalars(
        select(AuditEntry).where(AuditEntry.subject_key == f"flag:{late['flag_id']}")
    ).one()
    assert (read.action, read.details) == ("quarantine_searched", {"ids": [rejected]})


def test_an_auditors_pages_showing_a_rejected_drop_are_in_its_parcels_history(
    app: Flask,
    client: FlaskClient,
    auth: Auth,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
) -> None:
    """A drop of parcel b refused after the sign-off reopens the shift; an auditor opens
    the late flag's page and the shift's page, each showing the refused drop whole, and
    each read is on record (``quarantine_searched``), but under no parcel: ``GET
    /audit?tracking_no=b`` did not list them, as it lists a page that showed b's proof.
    Both are in b's history now, and not in a's (a parcel of the shift the drop does
    not name)."""
    a, b = parcels(session, world, 2)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    assert pda.close(shift["id"]).status_code == 200
    assert sign_off(client, shift["id"], manager, note="all back").status_code == 200
    receipt = pda.push([pda.event(b, "delivered_to_locker", compartment="B07")])
    assert receipt["results"][0]["status"] == "rejected"
    [late] = [f["flag_id"] for f in receipt["flags_raised"]]
    pages = signed_in(app, "auditor1")
    pages.get(f"/web/flags/{late}")
    pages.get(f"/web/shifts/{shift['id']}")
    auditor = auth.headers("auditor1")

    def searched(number: str) -> list[str]:
        response = client.get(
            "/api/v1/audit", query_string={"tracking_no": number}, headers=auditor
        )
        assert response.status_code == 200, response.get_json()
        return sorted(
            e["subject_key"]
            for e in response.get_json()["items"]
            if e["action"] == "quarantine_searched"
        )

    assert searched(b) == [f"flag:{late}", f"shift:{shift['id']}"]
    assert searched(a) == []


def test_a_decision_on_a_late_flag_read_before_a_rejected_event_reopened_it_is_refused(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    """A manager reads the late flag (its evidence_version), the shift is signed off
    again, and the PDA sends another malformed drop: the flag cites it, its version
    changed, and the decision made on the earlier read is refused (409
    evidence_changed). The same drop sent again after the next sign-off reopens
    nothing: it was seen."""
    (a,) = parcels(session, world, 1)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    pda.close(shift["id"])
    assert sign_off(client, shift["id"], manager, note="all back").status_code == 200
    pda.push([pda.event(a, "delivered_to_locker", compartment="B07")])
    late = session.scalars(select(Flag).where(Flag.kind == "late_event_after_signoff")).one()
    read = client.get(f"/api/v1/flags/{late.id}", headers=manager).get_json()
    assert sign_off(client, shift["id"], manager, note="a drop refused").status_code == 200
    second = pda.event(a, "delivered_to_locker", locker_id="L-7")  # no compartment
    pda.push([second])
    refused = client.post(
        f"/api/v1/flags/{late.id}/resolve",
        json={"note": "seen", "evidence_version": read["evidence_version"]},
        headers=manager,
    )
    assert refused.status_code == 409 and refused.get_json()["code"] == "evidence_changed"
    now_read = client.get(f"/api/v1/flags/{late.id}", headers=manager).get_json()
    assert len(now_read["evidence"]["rejected_event_ids"]) == 2
    resolved = client.post(
        f"/api/v1/flags/{late.id}/resolve",
        json={"note": "both drops refused", "evidence_version": now_read["evidence_version"]},
        headers=manager,
    )
    assert resolved.status_code == 200
    assert sign_off(client, shift["id"], manager, note="both seen").status_code == 200
    again = pda.push([second])
    assert again["results"][0]["status"] == "rejected" and not again["flags_raised"]
    found = client.get(f"{SHIFTS}/{shift['id']}", headers=manager).get_json()
    assert (found["status"], found["reopened_count"]) == ("signed_off", 2)
    assert client.get(f"/api/v1/flags/{late.id}", headers=manager).get_json()["status"] == (
        "resolved"
    )


def test_the_balance_gives_what_a_sign_off_sends_back_as_the_board_row_counts_it(
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
) -> None:
    """A manager working from the shift's balance (`GET /shifts/<id>/balance`), not the
    board, could not send `rejected_events` nor `open_flags` with the sign-off: the
    balance did not give them. It gives them now, with `images_missing`, counted as
    the board row counts them, and the sign-off sending them back goes through."""
    a, b = parcels(session, world, 2)
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(b), pda.event(a, "delivered"), pda.event(b, "delivered")])
    pda.close(shift["id"], last_seq=pda.seq)
    blob_missing_at_handover(
        session=session, now=now() + dt.timedelta(hours=2), settings=SweepSettings()
    )
    session.commit()
    stray = pda.event(a, "delivered")
    del stray["seq"]  # malformed: rejected, naming one of the shift's parcels
    assert [r["status"] for r in pda.push([stray])["results"]] == ["rejected"]

    found = balance(client, shift["id"], manager)
    board = f"/api/v1/stations/{world.station.id}/handover"
    [row] = client.get(board, headers=manager).get_json()["shifts"]
    assert found["open_flags"] == row["open_flags"] != []
    assert (found["rejected_events"], found["images_missing"]) == (
        row["rejected_events"],
        row["images_missing"],
    )
    assert found["rejected_events"] == 1 and found["images_missing"] > 0
    signed = sign_off(
        client,
        shift["id"],
        manager,
        balance_version=found["version"],
        rejected_events=found["rejected_events"],
        open_flags=[flag["flag_id"] for flag in found["open_flags"]],
        images_missing=found["images_missing"],
    )
    assert signed.status_code == 200, signed.get_json()


def test_a_single_sign_off_is_refused_when_more_proof_images_are_missing_than_were_read(
    app: Flask,
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
) -> None:
    """The courier scanned the delivered parcel again at the door, and the server
    rejected that scan (its photo's digest mangled). The manager read the balance:
    balanced, its signature not uploaded yet. Then the PDA sent the scan again
    corrected, under its seq, with a photo it has not uploaded: the shift's balance is
    the same (a repeat settles nothing), but two of its proof images are missing now.
    Signed off together, the shift is refused for it; signed off on its own, naming the
    balance and the images it was shown, it went through. It is refused now (409
    `images_missing_changed`); read again it signs off, fewer missing being no refusal."""
    [a] = parcels(session, world, 1)
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(a, "delivered")])
    again = pda.event(a, "delivered", pod={"recipient_name": "Wang", "photo_sha256": "x"})
    assert [r["status"] for r in pda.push([again])["results"]] == ["rejected"]
    pda.close(shift["id"], last_seq=pda.seq)
    read = balance(client, shift["id"], manager)
    assert (read["status"], read["images_missing"]) == ("balanced", 1)  # its signature

    photo = "ab" * 32
    again["pod"] = {"recipient_name": "Wang", "photo_sha256": photo}
    assert [r["status"] for r in pda.push([again])["results"]] == ["applied"]
    now_read = balance(client, shift["id"], manager)
    assert (now_read["version"], now_read["images_missing"]) == (read["version"], 2)
    refused = sign_off(
        client,
        shift["id"],
        manager,
        balance_version=read["version"],
        images_missing=read["images_missing"],
    )
    assert refused.status_code == 409, refused.get_json()
    assert refused.get_json()["code"] == "images_missing_changed"
    assert (
        "2 proof images of its deliveries are missing now, not 1" in refused.get_json()["message"]
    )

    # The shift's page shows them and sends them back with its sign-off.
    html = signed_in(app, "manager1").get(f"/web/shifts/{shift['id']}")
    assert 'name="images_missing" value="2"' in html
    assert "2 proof images of its deliveries not uploaded yet" in html
    signed = sign_off(
        client, shift["id"], manager, balance_version=now_read["version"], images_missing=3
    )
    assert signed.status_code == 200, signed.get_json()


def test_a_shift_declares_no_seqs_far_beyond_what_its_pda_sent(
    client: FlaskClient,
    session: Session,
    world: World,
    auth: Auth,
    pda: Courier,
    manager: dict[str, str],
) -> None:
    """Seqs a shift declares are its own for good: an event of its PDA in them is filed
    under it whoever pushes it, and a closed shift's last_seq never changes. A close
    declaring last_seq 2147483647 (a rogue courier, or a manager's typo reading the seq
    off a broken PDA) took every later courier's events of the PDA, as that courier's,
    under the closed shift, and no later shift could declare a first_seq. A declaration
    reaching more than MAX_SEQS_DECLARED_AHEAD beyond the seqs the server holds from the
    PDA is refused (422 seq_too_far_ahead) and changes nothing."""
    from sync.shifts import MAX_SEQS_DECLARED_AHEAD

    factories.user(session, "courier2", "courier", world.station)
    session.commit()
    a, b = parcels(session, world, 2)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    for closer, last_seq in ((pda.headers, 2**31 - 1), (manager, 2 + MAX_SEQS_DECLARED_AHEAD + 1)):
        refused = client.post(
            f"{SHIFTS}/{shift['id']}/close", json={"last_seq": last_seq}, headers=closer
        )
        assert refused.status_code == 422, refused.get_json()
        assert (refused.get_json()["code"], refused.get_json()["errors"]) == (
            "seq_too_far_ahead",
            {"last_seq": [refused.get_json()["message"]]},
        )
    assert client.get(f"{SHIFTS}/{shift['id']}", headers=manager).get_json()["status"] == "open"
    assert pda.close(shift["id"], last_seq=2).status_code == 200

    # The next courier on the PDA: their shift and their events are their own.
    assert auth.tokens("courier2", "PDA-0001")["device_max_seq"] == 2
    colleague = Courier(client, auth, "courier2", "PDA-0001")
    colleague.seq = 2
    far = client.post(
        SHIFTS, json={"first_seq": 2 + MAX_SEQS_DECLARED_AHEAD + 2}, headers=colleague.headers
    )
    assert far.status_code == 422 and far.get_json()["code"] == "seq_too_far_ahead"
    theirs = colleague.open(first_seq=3)
    colleague.push([colleague.event(b), colleague.event(b, "returned_to_station")])
    courier2 = session.scalars(select(User.id).where(User.username == "courier2")).one()
    stored = session.execute(
        select(ScanEvent.seq, ScanEvent.shift_id, ScanEvent.courier_id)
        .where(ScanEvent.seq > 2)
        .order_by(ScanEvent.seq)
    ).all()
    assert [tuple(row) for row in stored] == [
        (3, theirs["id"], courier2),
        (4, theirs["id"], courier2),
    ]


def test_the_next_shift_declares_the_seqs_after_what_earlier_shifts_declared(
    client: FlaskClient, session: Session, world: World, auth: Auth, pda: Courier
) -> None:
    """A shift that used its allowance (opened with a first_seq ahead, its events still
    queued, and closed with a last_seq beyond that) declared seqs up to 20,000 beyond
    what the server held. The next courier's PDA, told by its sign-in to number on from
    device_max_seq, had every first_seq refused seq_too_far_ahead (the bound was
    measured from the seqs held alone, and the seqs before were first_seq_used), and
    a shift opened without one could not close with its last_seq either. The bound is
    measured from the highest seq the server holds or a shift of the PDA declared:
    device_max_seq + 1 is always a first_seq, and a typo far beyond it is refused."""
    from sync.shifts import MAX_SEQS_DECLARED_AHEAD

    factories.user(session, "courier2", "courier", world.station)
    session.commit()
    (a,) = parcels(session, world, 1)
    pda.push([pda.event(a)])  # the server holds seq 1
    first = pda.open(first_seq=1 + MAX_SEQS_DECLARED_AHEAD + 1)
    declared = 1 + 2 * MAX_SEQS_DECLARED_AHEAD
    assert pda.close(first["id"], last_seq=declared).status_code == 200

    device_max_seq = auth.tokens("courier2", "PDA-0001")["device_max_seq"]
    assert device_max_seq == declared
    colleague = Courier(client, auth, "courier2", "PDA-0001")
    too_far = client.post(
        SHIFTS,
        json={"first_seq": declared + MAX_SEQS_DECLARED_AHEAD + 2},
        headers=colleague.headers,
    )
    assert too_far.status_code == 422 and too_far.get_json()["code"] == "seq_too_far_ahead"
    message = too_far.get_json()["message"]
    assert f"seq {declared}, the highest seq a shift of PDA PDA-0001 declared" in message
    opened = client.post(SHIFTS, json={"first_seq": declared + 1}, headers=colleague.headers)
    assert opened.status_code == 201, opened.get_json()
    closed = client.post(
        f"{SHIFTS}/{opened.get_json()['id']}/close",
        json={"last_seq": declared + 50},
        headers=colleague.headers,
    )
    assert closed.status_code == 200, closed.get_json()

    # Opened without a first_seq, the shift after still closes with its last_seq.
    third = client.post(SHIFTS, json={}, headers=colleague.headers)
    assert third.status_code == 201, third.get_json()
    closed = client.post(
        f"{SHIFTS}/{third.get_json()['id']}/close",
        json={"last_seq": declared + 100},
        headers=colleague.headers,
    )
    assert closed.status_code == 200, closed.get_json()


def test_a_first_seq_before_an_earlier_shifts_first_seq_is_used(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    """A PDA's seqs are its causal order (rule 6): an earlier shift that declared its
    first_seq (its events from it still queued, closed by a manager without a last_seq)
    owns the seqs from it. A later shift declaring a first_seq before it was taken, so
    the earlier shift owned no seq at all: its queued events, pushed later, were filed
    under the later shift as the later courier's, and its balance said balanced with
    nothing. The seqs before an earlier shift's first_seq are used (as the sign-in's
    device_max_seq says); its first_seq itself is still the device_max_seq + 1 a PDA
    that lost its storage declares."""
    (a,) = parcels(session, world, 1)
    pda.push([pda.event(a)])  # the server holds seq 1
    earlier = pda.open(first_seq=100)
    assert (
        client.post(f"{SHIFTS}/{earlier['id']}/close", json={}, headers=manager).status_code == 200
    )
    before = client.post(SHIFTS, json={"first_seq": 50}, headers=pda.headers)
    assert before.status_code == 409, before.get_json()
    assert before.get_json()["code"] == "first_seq_used"
    assert "first_seq" in before.get_json()["errors"]
    assert "up to 99" in before.get_json()["message"]
    assert client.post(SHIFTS, json={"first_seq": 100}, headers=pda.headers).status_code == 201


def test_a_close_too_far_beyond_its_first_seq_names_the_seq_it_is_measured_from(
    client: FlaskClient, session: Session, world: World, pda: Courier, manager: dict[str, str]
) -> None:
    """A shift opened with its first_seq ahead of what the PDA sent (its earlier events
    still queued) may declare a last_seq up to MAX_SEQS_DECLARED_AHEAD beyond its first
    seq, not only beyond what the server holds. Refused beyond it, the manager checking
    the number on the PDA was told the server held seqs up to that first seq, which it
    never did: the message names the seq the bound is measured from for what it is."""
    from sync.shifts import MAX_SEQS_DECLARED_AHEAD

    (a,) = parcels(session, world, 1)
    pda.push([pda.event(a)])  # the server holds seq 1 of the PDA
    shift = pda.open(first_seq=5_001)  # seqs 2..5,000 still queued on the PDA
    refused = client.post(
        f"{SHIFTS}/{shift['id']}/close",
        json={"last_seq": 5_000 + MAX_SEQS_DECLARED_AHEAD + 1},
        headers=manager,
    )
    assert refused.status_code == 422, refused.get_json()
    assert refused.get_json()["code"] == "seq_too_far_ahead"
    message = refused.get_json()["message"]
    assert "the highest the server holds" not in message, message
    assert "seq 5000, the seq before the shift's first_seq" in message, message
    assert "up to 1 from PDA PDA-0001" in message, message
    closed = client.post(
        f"{SHIFTS}/{shift['id']}/close",
        json={"last_seq": 5_000 + MAX_SEQS_DECLARED_AHEAD},
        headers=manager,
    )
    assert closed.status_code == 200, closed.get_json()
