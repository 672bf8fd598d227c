"""POST /sync/push, GET /sync/pull, GET /quarantine and the parcel timeline, over HTTP."""

import datetime as dt
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Connection, event, func, insert, inspect, select
from sqlalchemy.orm import Session
from werkzeug.local import LocalProxy

from courier_api.api.quarantine import routes as quarantine_routes
from courier_api.extensions import db
from models import AuditEntry, Flag, Parcel, QuarantinedEvent, ScanEvent, SyncBatch, User
from tests import factories
from tests.conftest import Auth, World
from tests.factories import typed_loosely
from tests.range_reads import RangeReads

PUSH = "/api/v1/sync/push"
PULL = "/api/v1/sync/pull"


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def ev(seq: int, tracking_no: str, type: str = "checked_out", **kw: Any) -> dict[str, Any]:
    kw.setdefault("occurred_at", now() - dt.timedelta(minutes=60 - seq))
    return factories.event(seq, tracking_no, type, **kw)


@pytest.fixture
def courier(auth: Auth, world: World) -> dict[str, str]:
    return auth.headers("courier1", "PDA-0001")


@pytest.fixture
def parcel(session: Session, world: World) -> Parcel:
    parcel = factories.parcel(session, world.station)
    session.commit()
    return parcel


def push(client: FlaskClient, headers: dict[str, str], events: list[Any], **kw: Any) -> Any:
    return client.post(PUSH, json=factories.push_body("PDA-0001", events, **kw), headers=headers)


def test_push_applies_events_and_answers_the_contract(
    client: FlaskClient, courier: dict[str, str], parcel: Parcel
) -> None:
    events = [ev(1, parcel.tracking_no), ev(2, parcel.tracking_no, "out_for_delivery")]
    response = push(client, courier, events)
    assert response.status_code == 200
    receipt = response.get_json()
    assert set(receipt) == {
        "batch_id",
        "server_time",
        "clock_offset_ms",
        "results",
        "acked_through_seq",
        "missing_seqs",
        "missing_seq_count",
        "flags_raised",
    }
    assert [r["status"] for r in receipt["results"]] == ["applied", "applied"]
    assert [r["client_event_id"] for r in receipt["results"]] == [
        e["client_event_id"] for e in events
    ]
    assert receipt["acked_through_seq"] == 2 and receipt["missing_seqs"] == []
    assert abs(receipt["clock_offset_ms"]) < 60_000


def test_replaying_a_batch_returns_the_identical_receipt(
    client: FlaskClient, courier: dict[str, str], parcel: Parcel, session: Session
) -> None:
    body = factories.push_body("PDA-0001", [ev(1, parcel.tracking_no)])
    first = client.post(PUSH, json=body, headers=courier)
    body["sent_at"] = now().isoformat()  # a retry refreshes sent_at: still the same batch
    second = client.post(PUSH, json=body, headers=courier)
    assert second.status_code == 200
    assert second.get_data() == first.get_data()
    assert len(session.scalars(select(ScanEvent)).all()) == 1


def stored_receipt(session: Session, batch_id: str) -> Any:
    return session.scalar(
        select(SyncBatch.receipt).where(SyncBatch.batch_id == uuid.UUID(batch_id))
    )


def test_a_new_batchs_receipt_is_encoded_once_and_sent_as_stored(
    app: Flask,
    client: FlaskClient,
    courier: dict[str, str],
    parcel: Parcel,
    session: Session,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its JSON text is made once, in the writers' turn, for its row and for the answer:
    the answer is those bytes, as ``jsonify`` writes the stored receipt, and a replay
    (the stored receipt read back, then ``jsonify``) answers the same."""
    encoded: list[Any] = []
    dumps = app.json.dumps

    def counted(obj: Any, **kwargs: Any) -> str:
        if isinstance(obj, dict) and "results" in obj:  # a receipt, not a request's body
            encoded.append(obj)
        return dumps(obj, **kwargs)

    monkeypatch.setattr(app.json, "dumps", counted)
    body = factories.push_body("PDA-0001", [ev(1, parcel.tracking_no)])
    first = client.post(PUSH, json=body, headers=courier)
    assert first.status_code == 200
    assert encoded == []  # not encoded again for the answer
    stored = stored_receipt(session, body["batch_id"])
    assert first.get_data() == app.json.response(stored).get_data()
    replayed = client.post(PUSH, json=body, headers=courier)
    assert replayed.get_data() == first.get_data()
    assert len(encoded) == 2  # the replay's answer, by jsonify (and the check above)


def test_in_debug_mode_a_new_batchs_receipt_is_indented_as_jsonify_writes_it(
    app: Flask, client: FlaskClient, courier: dict[str, str], parcel: Parcel, session: Session
) -> None:
    app.debug = True
    body = factories.push_body("PDA-0001", [ev(1, parcel.tracking_no)])
    first = client.post(PUSH, json=body, headers=courier)
    assert first.status_code == 200
    assert first.get_data().startswith(b'{\n  "acked_through_seq": 1,\n')
    assert (
        first.get_data() == app.json.response(stored_receipt(session, body["batch_id"])).get_data()
    )


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_a_receipt_with_text_beyond_ascii_is_replayed_in_the_same_bytes(
    app: Flask,
    client: FlaskClient,
    courier: dict[str, str],
    parcel: Parcel,
    ensure_ascii: bool,
) -> None:
    """A rejected event's message quotes what the PDA sent, in any script: the new batch's
    answer (its stored text, or ``jsonify`` when the app's provider writes otherwise)
    and a replay's (the receipt read back from the database) are the same bytes."""
    app.json.ensure_ascii = ensure_ascii  # type: ignore[attr-defined]
    body = factories.push_body(
        "PDA-0001", [ev(1, parcel.tracking_no), ev(2, parcel.tracking_no, "配送✓ é 𝄞")]
    )
    first = client.post(PUSH, json=body, headers=courier)
    assert first.status_code == 200
    assert first.get_json()["results"][1]["error"]["message"].startswith(
        "unknown event type '配送✓ é 𝄞'"
    )
    assert ("配送".encode() in first.get_data()) is not ensure_ascii
    replayed = client.post(PUSH, json=body, headers=courier)
    assert replayed.get_data() == first.get_data()


def test_a_batch_id_reused_with_other_events_is_409(
    client: FlaskClient, courier: dict[str, str], parcel: Parcel
) -> None:
    batch_id = str(uuid.uuid4())
    push(client, courier, [ev(1, parcel.tracking_no)], batch_id=batch_id)
    response = push(client, courier, [ev(2, parcel.tracking_no)], batch_id=batch_id)
    assert response.status_code == 409
    assert response.get_json()["code"] == "batch_id_reused"


def test_a_retry_with_its_events_in_another_order_gets_the_original_receipt(
    client: FlaskClient, courier: dict[str, str], parcel: Parcel, session: Session
) -> None:
    """README, "Retry": a PDA rebuilding its unanswered batch from a query that
    orders it otherwise gets the original receipt (DESIGN.md rule 2), each result at
    the index of the retry; other events under the batch_id are still a 409."""
    tn = parcel.tracking_no
    events = [ev(1, tn), ev(2, tn, "out_for_delivery")]
    batch_id = str(uuid.uuid4())
    first = push(client, courier, events, batch_id=batch_id).get_json()
    reordered = push(client, courier, events[::-1], batch_id=batch_id)
    assert reordered.status_code == 200
    answered = reordered.get_json()
    assert [r["client_event_id"] for r in answered["results"]] == [
        e["client_event_id"] for e in events[::-1]
    ]
    assert [r["index"] for r in answered["results"]] == [0, 1]
    assert {**answered, "results": first["results"]} == first
    other = push(client, courier, [events[1], ev(3, tn, "returned_to_station")], batch_id=batch_id)
    assert other.status_code == 409
    assert other.get_json()["code"] == "batch_id_reused"
    assert len(session.scalars(select(ScanEvent)).all()) == 2


def test_a_duplicate_and_a_conflicting_duplicate(
    client: FlaskClient, courier: dict[str, str], parcel: Parcel
) -> None:
    event = ev(1, parcel.tracking_no)
    push(client, courier, [event])
    altered = {**event, "type": "delivered"}
    receipt = push(client, courier, [event, altered]).get_json()
    assert [r["status"] for r in receipt["results"]] == ["duplicate", "rejected"]
    assert receipt["results"][1]["error"]["code"] == "conflicting_duplicate"
    assert [f["kind"] for f in receipt["flags_raised"]] == ["conflicting_duplicate"]


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda e: e.update(type="bogus"), "unknown_event_type"),
        (lambda e: e.update(seq=-1), "invalid_seq"),
        (lambda e: e.update(seq=10**30), "invalid_seq"),
        (lambda e: e.update(occurred_at="0001-01-01T00:00:00+05:00"), "time_out_of_range"),
        (lambda e: e.update(tracking_no="RR473124829XX"), "unknown_country_code"),
        (lambda e: e.update(location={"lat": "north", "lon": 1}), "invalid_number"),
        (lambda e: e.update(client_event_id=None), "invalid_uuid"),
        (lambda e: e.update(extra="field"), "unknown_field"),
    ],
)
def test_each_rejection_code_reaches_the_pda_and_the_quarantine(
    client: FlaskClient,
    auth: Auth,
    courier: dict[str, str],
    parcel: Parcel,
    mutate: Any,
    code: str,
) -> None:
    bad = ev(2, parcel.tracking_no)
    mutate(bad)
    receipt = push(client, courier, [ev(1, parcel.tracking_no), bad]).get_json()
    assert [r["status"] for r in receipt["results"]] == ["applied", "rejected"]
    assert receipt["results"][1]["error"]["code"] == code
    listed = client.get("/api/v1/quarantine", headers=auth.headers("manager1")).get_json()
    assert [item["error_code"] for item in listed["items"]] == [code]
    assert listed["items"][0]["batch_id"] == receipt["batch_id"]


def test_a_consent_captured_with_its_optional_evidence_left_blank_still_authorizes_the_drop(
    client: FlaskClient, auth: Auth, courier: dict[str, str], parcel: Parcel
) -> None:
    """At the door, offline, the recipient agreed to the locker; the courier left the
    consent's optional evidence note empty (the PDA sends it as ""), then dropped the
    express parcel. The consent is applied (it was once quarantined whole,
    ``missing_text``), so the drop is authorized: rule 1, a blank optional field is no
    reason to discard what the courier recorded."""
    consent = {"method": "locker", "channel": "in_person", "evidence": ""}
    events = [
        ev(1, parcel.tracking_no),
        ev(2, parcel.tracking_no, "consent_captured", consent=consent),
        factories.locker_drop(3, parcel.tracking_no, now() - dt.timedelta(minutes=30)),
    ]
    receipt = push(client, courier, events).get_json()
    assert [r["status"] for r in receipt["results"]] == ["applied"] * 3, receipt["results"]
    assert receipt["flags_raised"] == []
    consents = client.get(
        "/api/v1/consents",
        query_string={"covering": parcel.tracking_no},
        headers=auth.headers("manager1"),
    ).get_json()["items"]
    assert [(c["channel"], c["device_id"], c["evidence"]) for c in consents] == [
        ("in_person", "PDA-0001", None)
    ]


@pytest.mark.parametrize(
    ("pod", "without_pod"),
    [
        ({"recipient_name": "", "relation": " ", "signature_sha256": "a" * 64}, False),
        ({"recipient_name": "Wang", "relation": "", "signature_sha256": " "}, True),
    ],
    ids=["blank-name-and-relation", "blank-signature"],
)
def test_a_delivery_with_optional_pod_fields_left_blank_is_applied_as_without_them(
    client: FlaskClient,
    auth: Auth,
    courier: dict[str, str],
    parcel: Parcel,
    pod: dict[str, str],
    without_pod: bool,
) -> None:
    """A POD's name, relation or image left blank on the PDA is absent, not a reason to
    quarantine the delivery (the parcel would show missing at handover): the delivery
    is applied, and judged on what its proof holds. A blank signature is no signature:
    the express parcel is ``delivered_without_pod``."""
    events = [ev(1, parcel.tracking_no), ev(2, parcel.tracking_no, "delivered", pod=pod)]
    receipt = push(client, courier, events).get_json()
    assert [r["status"] for r in receipt["results"]] == ["applied"] * 2, receipt["results"]
    kinds = {f["kind"] for f in receipt["flags_raised"]}
    assert ("delivered_without_pod" in kinds) is without_pod, receipt["flags_raised"]
    url = f"/api/v1/parcels/{parcel.tracking_no}"
    found = client.get(url, headers=auth.headers("manager1")).get_json()
    assert found["status"] == "delivered"
    [delivery] = [e for e in found["timeline"] if e["type"] == "delivered"]
    assert delivery["details"]["pod"] == {k: v for k, v in pod.items() if v.strip()}
    quarantined = client.get("/api/v1/quarantine", headers=auth.headers("manager1"))
    assert quarantined.get_json()["items"] == []


def test_malformed_json_values_in_events_are_quarantined_not_500(
    client: FlaskClient, courier: dict[str, str], parcel: Parcel
) -> None:
    body = factories.push_body("PDA-0001", [])
    envelope = json.dumps({**body, "events": "EVENTS"})
    events = (
        '[null, 7, "x", [], {"seq": NaN, "lat": Infinity}, '
        '{"type": "checked_out", "tracking_no": "\\u0000"}]'
    )
    raw = envelope.replace('"EVENTS"', events)
    response = client.post(PUSH, data=raw, content_type="application/json", headers=courier)
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert [r["status"] for r in results] == ["rejected"] * 6


def test_an_unknown_field_named_with_a_nul_is_quarantined_and_its_siblings_applied(
    client: FlaskClient, courier: dict[str, str], parcel: Parcel, auth: Auth
) -> None:
    """Found by test_sync_fuzz: on PostgreSQL the field name went raw into the receipt
    (jsonb refuses NULs and lone surrogates) and the whole push was a 422."""
    first, second = ev(2, parcel.tracking_no), ev(3, parcel.tracking_no)
    first["a\x00b"], second["x\ud800"] = 1, 2
    events = [ev(1, parcel.tracking_no), first, second]
    response = client.post(
        PUSH,
        data=json.dumps(factories.push_body("PDA-0001", events)),
        content_type="application/json",
        headers=courier,
    )
    assert response.status_code == 200, response.get_json()
    results = response.get_json()["results"]
    assert [r["status"] for r in results] == ["applied", "rejected", "rejected"]
    assert [r["error"]["field"] for r in results[1:]] == ["a\\u0000b", "x\\ud800"]
    listed = client.get("/api/v1/quarantine", headers=auth.headers("manager1")).get_json()
    assert sorted(item["field"] for item in listed["items"]) == ["a\\u0000b", "x\\ud800"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {"device_id": "PDA-0001", "batch_id": "x", "sent_at": "2026-11-23T10:00:00Z"},
            "batch_id",
        ),
        ({"device_id": "PDA-0001", "batch_id": str(uuid.uuid4()), "sent_at": "noon"}, "sent_at"),
        (
            {
                "device_id": "PDA-0001",
                "batch_id": str(uuid.uuid4()),
                "sent_at": "2026-11-23T10:00",
            },
            "sent_at",
        ),
    ],
)
def test_a_bad_envelope_is_422_naming_the_field(
    client: FlaskClient, courier: dict[str, str], body: dict[str, Any], field: str
) -> None:
    response = client.post(PUSH, json={**body, "events": []}, headers=courier)
    assert response.status_code == 422
    assert field in response.get_json()["errors"]["json"]


def test_an_unknown_top_level_key_is_ignored_with_a_warning_and_the_events_taken(
    client: FlaskClient, courier: dict[str, str], parcel: Parcel
) -> None:
    """A PDA app that sends one key more than the server knows (its version, a newer
    contract's field) had every push refused 422: its events held on the PDA until
    the server was upgraded, and lost by a PDA that drops a batch refused 4xx. The
    events are taken; the receipt names the keys ignored; an event's unknown field
    still rejects that event."""
    tn = parcel.tracking_no
    events = [ev(1, tn), {**ev(2, tn, "out_for_delivery"), "app_version": "3.2"}]
    body = {**factories.push_body("PDA-0001", events), "app_version": "3.2", "zone": {}}
    response = client.post(PUSH, json=body, headers=courier)
    assert response.status_code == 200, response.get_json()
    receipt = response.get_json()
    assert [r["status"] for r in receipt["results"]] == ["applied", "rejected"]
    assert receipt["results"][1]["error"]["field"] == "app_version"
    assert [(w["code"], w["field"]) for w in receipt["warnings"]] == [
        ("unknown_field_ignored", "app_version"),
        ("unknown_field_ignored", "zone"),
    ]
    assert "app_version" in receipt["warnings"][0]["message"]
    replay = client.post(PUSH, json={**body, "zone": None, "more": 1}, headers=courier)
    assert replay.get_json()["results"] == receipt["results"]  # the same batch
    assert [w["field"] for w in replay.get_json()["warnings"]] == ["app_version", "more", "zone"]
    plain = client.post(PUSH, json=factories.push_body("PDA-0001", events), headers=courier)
    assert "warnings" not in plain.get_json()


def test_an_unknown_top_level_key_is_logged_for_operators_without_its_value(
    client: FlaskClient, courier: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Only the PDA read the receipt's warning: a field the server drops (a misspelt
    one whose value is lost) went unseen at the station. A warning line
    names the device, the batch and the keys (never their values)."""
    body = {
        **factories.push_body("PDA-0001", []),
        "app_version": "3.2",
        "recipient_phone": "+8613800138000",
        "line\nbreak": 1,
    }
    body.update({f"zz_{i:02}": i for i in range(25)})
    with caplog.at_level(logging.WARNING, logger="courier_api.api.sync.routes"):
        assert client.post(PUSH, json=body, headers=courier).status_code == 200
    [record] = [r for r in caplog.records if r.name == "courier_api.api.sync.routes"]
    line = record.getMessage()
    assert record.levelno == logging.WARNING
    assert "PDA-0001" in line and body["batch_id"] in line
    assert "28 unknown top-level fields" in line
    assert "'app_version'" in line and "'recipient_phone'" in line
    assert "1 not named" in line and "break" not in line  # not a field's name
    assert "\n" not in line  # a key cannot forge a second line
    assert "8 more" in line  # the first 20 named, as in the receipt
    assert "13800138000" not in caplog.text and "3.2" not in caplog.text


def test_an_unknown_key_set_is_logged_once_per_device_not_on_each_push_or_replay(
    client: FlaskClient, courier: dict[str, str], parcel: Parcel, caplog: pytest.LogCaptureFixture
) -> None:
    """A PDA a release ahead sends its app_version with every push, and a PDA that got
    no answer sends its batch again: each push wrote a warning line, so one PDA pushing
    each scan wrote a line a scan and the key went unseen in the flood. The set of keys
    is logged the first time a device sends it; a new key is logged again. The receipt
    warns every time, as the PDA reads only its own."""
    tn = parcel.tracking_no
    first = {**factories.push_body("PDA-0001", [ev(1, tn)]), "app_version": "3.2"}
    later = {
        **factories.push_body("PDA-0001", [ev(2, tn, "out_for_delivery")]),
        "app_version": "3.2",
    }
    newer = {**factories.push_body("PDA-0001", []), "app_version": "3.3", "zone": "A"}
    with caplog.at_level(logging.WARNING, logger="courier_api.api.sync.routes"):
        receipts = [
            client.post(PUSH, json=body, headers=courier).get_json()
            for body in (first, first, later, newer, later)
        ]
    lines = [r.getMessage() for r in caplog.records if r.name == "courier_api.api.sync.routes"]
    assert len(lines) == 2, lines
    assert first["batch_id"] in lines[0] and "'app_version'" in lines[0]
    assert newer["batch_id"] in lines[1] and "'zone'" in lines[1]
    assert all(r["warnings"][0]["field"] == "app_version" for r in receipts)


def test_an_unknown_key_that_is_not_a_fields_name_is_counted_in_the_log_not_named(
    client: FlaskClient, courier: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """The PDA chooses the keys, and a key may be data: a map keyed by a recipient's
    phone or a token sent one level too high. The log's filter masks a phone standing
    alone, not one inside a word ('phone_13800138000'), nor a short random secret. A
    key is named in the log only when it reads as a field's name (letters, digits and
    '_', '-', '.', no run of 4 digits, not a random-looking mix); the others are
    counted. The receipt, the PDA's own, still names them all."""
    secrets = ["phone_13800138000", "x13800138000", "Xy7Zk9Qw2Lm4Np6R", "a b", "pin:4821"]
    body = {**factories.push_body("PDA-0001", []), "app_version": "3.2"}
    body.update(dict.fromkeys(secrets, 1))
    with caplog.at_level(logging.WARNING, logger="courier_api.api.sync.routes"):
        response = client.post(PUSH, json=body, headers=courier)
    assert response.status_code == 200
    [record] = [r for r in caplog.records if r.name == "courier_api.api.sync.routes"]
    line = record.getMessage()
    assert "6 unknown top-level fields" in line and "'app_version'" in line
    assert "5 not named" in line
    assert not [key for key in secrets if key in line], line
    assert "13800138000" not in line and "4821" not in line
    warned = [w.get("field") for w in response.get_json()["warnings"]]
    assert set(secrets) <= set(warned)


def test_events_must_be_a_list(client: FlaskClient, courier: dict[str, str]) -> None:
    body = factories.push_body("PDA-0001", [])
    body["events"] = {"seq": 1}
    response = client.post(PUSH, json=body, headers=courier)
    assert response.status_code == 422
    assert "events" in response.get_json()["errors"]["json"]


def test_a_retry_of_a_batch_stored_before_the_limit_was_lowered_gets_its_receipt(
    app_with: Callable[..., Flask], world: World
) -> None:
    """A PDA whose answer was lost retries its batch, as README says, after an operator
    lowered MAX_EVENTS_PER_PUSH (or on a server behind the same balancer configured
    lower). The batch is stored: a 413 saying "nothing was stored" would be false, and
    would have the PDA split it into new batches. It gets the original receipt; a new
    batch that size is still refused."""
    before = app_with(MAX_EVENTS_PER_PUSH=10).test_client()
    headers = Auth(before).headers("courier1", "PDA-0001")
    tn = factories.s10()
    body = factories.push_body("PDA-0001", [ev(i, tn) for i in range(1, 9)])
    first = before.post(PUSH, json=body, headers=headers)
    assert first.status_code == 200, first.get_json()
    after = app_with(MAX_EVENTS_PER_PUSH=5).test_client()
    retry = after.post(PUSH, json={**body, "events": body["events"][::-1]}, headers=headers)
    assert retry.status_code == 200, retry.get_json()
    receipt = retry.get_json()
    assert receipt["batch_id"] == body["batch_id"]
    assert receipt["server_time"] == first.get_json()["server_time"]  # the stored receipt
    assert [r["status"] for r in receipt["results"]] == ["applied"] * 8
    assert receipt["acked_through_seq"] == 8
    new = factories.push_body("PDA-0001", [ev(i, tn) for i in range(9, 17)])
    refused = after.post(PUSH, json=new, headers=headers)
    assert refused.status_code == 413
    assert refused.get_json()["limit"] == {"max": 5, "unit": "events"}


def test_a_retry_over_a_body_limit_lowered_since_is_split_and_loses_nothing(
    app_with: Callable[..., Flask], world: World, session: Session
) -> None:
    """A retry over a MAX_REQUEST_BYTES lowered since (or a server behind the same
    balancer configured lower) cannot get its receipt, as one over MAX_EVENTS_PER_PUSH
    does: the body is refused unread, so the server cannot know which batch it is. It
    is a 413 naming the bytes; the PDA splits its batch as README says, each part a
    new batch: every event held comes back ``duplicate``, the one refused
    ``seq_conflict`` the first time is refused so again (the PDA sets it apart, as
    step 1 says), nothing is stored twice and no flag is raised again."""
    before = app_with(MAX_CONTENT_LENGTH=20_000).test_client()
    headers = Auth(before).headers("courier1", "PDA-0001")
    tn = factories.s10()
    assert push(before, headers, [ev(1, tn)]).status_code == 200
    events = [ev(1, tn, "out_for_delivery"), *[ev(i, tn) for i in range(2, 9)]]
    body = factories.push_body("PDA-0001", events)
    first = before.post(PUSH, json=body, headers=headers).get_json()
    assert [r["status"] for r in first["results"]] == ["rejected"] + ["applied"] * 7
    assert first["results"][0]["error"]["code"] == "seq_conflict"
    flags_before = session.scalar(select(func.count()).select_from(Flag))
    size = len(json.dumps(body))
    after = app_with(MAX_CONTENT_LENGTH=size // 2 + 200).test_client()
    retry = after.post(PUSH, json=body, headers=headers)
    assert retry.status_code == 413
    assert retry.get_json()["limit"]["unit"] == "bytes"
    parts = [
        after.post(PUSH, json=factories.push_body("PDA-0001", part), headers=headers)
        for part in (events[:4], events[4:])
    ]
    assert [p.status_code for p in parts] == [200, 200]
    results = [r for p in parts for r in p.get_json()["results"]]
    assert [r["status"] for r in results] == ["rejected"] + ["duplicate"] * 7
    assert results[0]["error"] == first["results"][0]["error"]
    assert parts[-1].get_json()["acked_through_seq"] == first["acked_through_seq"] == 8
    assert all(p.get_json()["flags_raised"] == [] for p in parts)
    assert session.scalar(select(func.count()).select_from(ScanEvent)) == 8
    assert session.scalar(select(func.count()).select_from(Flag)) == flags_before


def test_more_events_than_the_limit_is_413_with_the_limit(
    app_with: Callable[..., Flask], world: World
) -> None:
    client = app_with(MAX_EVENTS_PER_PUSH=3).test_client()
    headers = Auth(client).headers("courier1", "PDA-0001")
    tn = factories.s10()
    response = push(client, headers, [ev(i, tn) for i in range(1, 5)])
    assert response.status_code == 413
    assert "limit is 3" in response.get_json()["message"]
    assert response.get_json()["limit"] == {"max": 3, "unit": "events"}


def test_a_queue_refused_for_its_size_is_split_once_by_the_limit_the_413_names(
    app_with: Callable[..., Flask], world: World
) -> None:
    """A PDA back after a day offline pushes its whole queue; refused, it reads how many
    events one push takes from the answer, not from its prose, and sends the queue in
    parts of that size, oldest first, each under a batch id of its own: one refusal,
    then every event applied and acknowledged."""
    client = app_with(MAX_EVENTS_PER_PUSH=4).test_client()
    headers = Auth(client).headers("courier1", "PDA-0001")
    tn = factories.s10()
    queue = [ev(i, tn, "out_for_delivery" if i > 1 else "checked_out") for i in range(1, 11)]
    refused = push(client, headers, queue)
    assert (refused.status_code, refused.get_json()["code"]) == (413, "payload_too_large")
    limit = refused.get_json()["limit"]
    assert limit["unit"] == "events"
    size = limit["max"]
    receipts = [push(client, headers, queue[i : i + size]) for i in range(0, len(queue), size)]
    assert [r.status_code for r in receipts] == [200, 200, 200]
    assert {r["status"] for rc in receipts for r in rc.get_json()["results"]} == {"applied"}
    assert receipts[-1].get_json()["acked_through_seq"] == 10


def test_a_body_over_the_size_limit_is_413(app_with: Callable[..., Flask], world: World) -> None:
    client = app_with(MAX_CONTENT_LENGTH=2000).test_client()
    headers = Auth(client).headers("courier1", "PDA-0001")
    tn = factories.s10()
    response = push(client, headers, [ev(i, tn) for i in range(1, 40)])
    assert response.status_code == 413
    assert "2000 bytes" in response.get_json()["message"]
    assert response.get_json()["limit"] == {"max": 2000, "unit": "bytes"}


def test_a_courier_pushes_only_for_the_device_of_their_token(
    client: FlaskClient, courier: dict[str, str], parcel: Parcel
) -> None:
    body = factories.push_body("PDA-0002", [ev(1, parcel.tracking_no)])
    response = client.post(PUSH, json=body, headers=courier)
    assert response.status_code == 403
    assert response.get_json()["code"] == "device_mismatch"


@pytest.mark.parametrize("username", ["manager1", "admin", "auditor1", "app1"])
def test_only_couriers_push_and_pull(
    client: FlaskClient, auth: Auth, world: World, username: str
) -> None:
    headers = auth.headers(username)
    assert (
        client.post(PUSH, json=factories.push_body("PDA-0001", []), headers=headers).status_code
        == 403
    )
    assert client.get(PULL, headers=headers).status_code == 403


def test_push_without_a_token_is_401(client: FlaskClient) -> None:
    assert client.post(PUSH, json=factories.push_body("PDA-0001", [])).status_code == 401


def test_gaps_and_acks(client: FlaskClient, courier: dict[str, str], parcel: Parcel) -> None:
    tn = parcel.tracking_no
    receipt = push(client, courier, [ev(1, tn), ev(4, tn, "delivered")]).get_json()
    assert (receipt["acked_through_seq"], receipt["missing_seqs"]) == (1, [2, 3])
    receipt = push(
        client, courier, [ev(3, tn, "out_for_delivery"), ev(2, tn, "out_for_delivery")]
    ).get_json()
    assert (receipt["acked_through_seq"], receipt["missing_seqs"]) == (4, [])


def test_seqs_written_with_a_fraction_are_held_and_acked(
    client: FlaskClient, courier: dict[str, str], parcel: Parcel
) -> None:
    """A PDA whose serializer writes ``2.0`` for ``2`` can still prune what it sent:
    the rejected event's seq is held too, and resending in whole numbers is a
    duplicate, not a conflicting one."""
    events = [ev(1, parcel.tracking_no), ev(2, parcel.tracking_no, "out_for_delivery")]
    bad = ev(3, parcel.tracking_no, "bogus")
    written = [{**e, "seq": float(e["seq"])} for e in [*events, bad]]
    receipt = push(client, courier, written).get_json()
    assert [r["status"] for r in receipt["results"]] == ["applied", "applied", "rejected"]
    assert receipt["results"][2]["error"]["code"] == "unknown_event_type"
    assert (receipt["acked_through_seq"], receipt["missing_seqs"]) == (3, [])
    again = push(client, courier, events).get_json()
    assert [r["status"] for r in again["results"]] == ["duplicate", "duplicate"]


def test_an_event_whose_seq_is_written_as_text_is_rejected_but_leaves_no_gap(
    client: FlaskClient, courier: dict[str, str], auth: Auth, parcel: Parcel
) -> None:
    """A PDA serializer that quoted one seq ("2"): the event is rejected invalid_seq and
    quarantined naming seq 2, so the PDA may prune past it and the shift's balance is
    not provisional for ever on a seq that will never come (it was waiting for 2)."""
    tn = parcel.tracking_no
    shift_id = client.post("/api/v1/shifts", json={}, headers=courier).get_json()["id"]
    quoted = {**ev(2, tn, "out_for_delivery"), "seq": " 2 "}
    receipt = push(client, courier, [ev(1, tn), quoted, ev(3, tn, "returned_to_station")])
    receipt = receipt.get_json()
    assert receipt["results"][1]["status"] == "rejected"
    assert receipt["results"][1]["error"]["code"] == "invalid_seq"
    assert (receipt["acked_through_seq"], receipt["missing_seqs"]) == (3, [])
    manager = auth.headers("manager1")
    (rejected,) = client.get("/api/v1/quarantine", headers=manager).get_json()["items"]
    assert (rejected["seq"], rejected["error_code"]) == (2, "invalid_seq")
    assert (
        client.post(f"/api/v1/shifts/{shift_id}/close", json={}, headers=courier).status_code
        == 200
    )
    balance = client.get(f"/api/v1/shifts/{shift_id}/balance", headers=manager).get_json()
    assert (balance["status"], balance["missing_seqs"]) == ("balanced", [])
    again = push(client, courier, [{**quoted, "seq": 2}]).get_json()  # sent corrected
    assert again["results"][0]["status"] == "applied"


@pytest.mark.parametrize("seq", [None, "two", 2.5, True, "-2", "0x2"])
def test_an_event_whose_seq_cannot_be_read_leaves_its_seq_missing(
    client: FlaskClient, courier: dict[str, str], parcel: Parcel, seq: Any
) -> None:
    """Nothing says which seq it was: the server waits for it (README: send it again
    corrected, or a manager writes the seq off)."""
    tn = parcel.tracking_no
    bad = {**ev(2, tn, "out_for_delivery"), "seq": seq}
    receipt = push(client, courier, [ev(1, tn), bad, ev(3, tn, "returned_to_station")])
    receipt = receipt.get_json()
    assert receipt["results"][1]["error"]["code"] == "invalid_seq"
    assert (receipt["acked_through_seq"], receipt["missing_seqs"]) == (1, [2])


def test_an_event_rejected_seq_conflict_is_acknowledged_by_seq_and_taken_renumbered(
    client: FlaskClient, courier: dict[str, str], parcel: Parcel
) -> None:
    """README, "Read the results before you prune": a push in flight when the PDA was
    reset lands after its new events took the same seqs. Their receipt acknowledges
    their seqs (another event holds them) though the server holds nothing of them: a
    PDA pruning up to ``acked_through_seq`` first would delete them. Given new seqs
    after ``device_max_seq``, with the same ids, they are applied."""
    landed_late = [ev(1, parcel.tracking_no), ev(2, parcel.tracking_no, "out_for_delivery")]
    assert push(client, courier, landed_late).status_code == 200
    after_reset = [
        ev(
            1,
            parcel.tracking_no,
            "delivery_attempt_failed",
            reason="recipient_absent",
            action="notice_left",
        ),
        ev(3, parcel.tracking_no, "out_for_delivery"),
    ]
    receipt = push(client, courier, after_reset).get_json()
    assert [r["status"] for r in receipt["results"]] == ["rejected", "applied"]
    assert receipt["results"][0]["error"]["code"] == "seq_conflict"
    assert "not stored" in receipt["results"][0]["error"]["message"]  # so: keep it
    assert receipt["acked_through_seq"] == 3  # past the seq of the event it did not take
    again = push(client, courier, [{**after_reset[0], "seq": 4}]).get_json()
    assert [r["status"] for r in again["results"]] == ["applied"]
    assert again["acked_through_seq"] == 4


def test_seq_conflicts_renumbered_from_device_max_seq_take_the_pdas_unsent_seqs(
    client: FlaskClient, courier: dict[str, str], parcel: Parcel
) -> None:
    """README, step 4 of "Read the results before you prune": the events set apart
    take seqs after the higher of ``device_max_seq`` and the highest seq the PDA has
    given. A scan recorded while the push was out (seq 3, not sent yet) is beyond
    ``device_max_seq``: renumbered from ``device_max_seq + 1`` as the README said,
    a set-apart event took its seq and one of the two was refused again."""
    tn = parcel.tracking_no
    assert push(client, courier, [ev(1, tn), ev(2, tn, "out_for_delivery")]).status_code == 200
    set_apart = [ev(1, tn, "out_for_delivery"), ev(2, tn, "returned_to_station")]
    receipt = push(client, courier, set_apart).get_json()
    assert [r["error"]["code"] for r in receipt["results"]] == ["seq_conflict"] * 2
    recorded_meanwhile = ev(3, tn, "exception", reason="damaged")
    signed_in = client.post(
        "/api/v1/auth/token",
        json={"username": "courier1", "password": factories.PASSWORD, "device_id": "PDA-0001"},
    ).get_json()
    assert signed_in["device_max_seq"] == 2  # the PDA has given 3

    from_device_max_seq = [{**e, "seq": 3 + i} for i, e in enumerate(set_apart)]
    receipt = push(client, courier, from_device_max_seq).get_json()
    assert [r["status"] for r in receipt["results"]] == ["applied", "applied"]
    refused = push(client, courier, [recorded_meanwhile]).get_json()["results"][0]
    assert refused["error"]["code"] == "seq_conflict"  # the README's old step 4


def test_seq_conflicts_renumbered_after_the_highest_seq_given_keep_every_event(
    client: FlaskClient, courier: dict[str, str], parcel: Parcel
) -> None:
    """The same PDA following step 4 as it now reads: every event is applied once."""
    tn = parcel.tracking_no
    push(client, courier, [ev(1, tn), ev(2, tn, "out_for_delivery")])
    set_apart = [ev(1, tn, "out_for_delivery"), ev(2, tn, "returned_to_station")]
    push(client, courier, set_apart)
    recorded_meanwhile = ev(3, tn, "exception", reason="damaged")
    device_max_seq = client.post(
        "/api/v1/auth/token",
        json={"username": "courier1", "password": factories.PASSWORD, "device_id": "PDA-0001"},
    ).get_json()["device_max_seq"]
    highest_given = 3
    start = max(device_max_seq, highest_given) + 1
    renumbered = [{**e, "seq": start + i} for i, e in enumerate(set_apart)]
    receipt = push(client, courier, [recorded_meanwhile, *renumbered]).get_json()
    assert [r["status"] for r in receipt["results"]] == ["applied"] * 3
    assert (receipt["acked_through_seq"], receipt["missing_seqs"]) == (5, [])


def test_clock_skew_is_reported_and_flagged(
    client: FlaskClient, courier: dict[str, str], parcel: Parcel
) -> None:
    skew = dt.timedelta(minutes=4)
    event = ev(1, parcel.tracking_no, occurred_at=now() - dt.timedelta(minutes=10) + skew)
    receipt = push(client, courier, [event], sent_at=now() + skew).get_json()
    assert 235_000 < receipt["clock_offset_ms"] < 245_000
    assert [f["kind"] for f in receipt["flags_raised"]] == ["clock_skew"]
    timeline = client.get(f"/api/v1/parcels/{parcel.tracking_no}", headers=courier).get_json()
    entry = timeline["timeline"][0]
    shown = dt.datetime.fromisoformat(entry["occurred_at_device"]) - dt.datetime.fromisoformat(
        entry["occurred_at"]
    )
    assert abs(shown - skew) < dt.timedelta(seconds=5)


def test_the_timeline_shows_three_times_the_batch_emsevt_and_voided_events(
    client: FlaskClient, auth: Auth, courier: dict[str, str], parcel: Parcel
) -> None:
    tn = parcel.tracking_no
    delivered = ev(3, tn, "delivered_to_locker", locker_id="L-1", compartment="4")
    first = push(client, courier, [ev(1, tn), ev(2, tn, "out_for_delivery"), delivered]).get_json()
    correction = ev(
        4,
        tn,
        "correction",
        voids_client_event_id=delivered["client_event_id"],
        reason="wrong locker",
    )
    push(client, courier, [correction])
    body = client.get(f"/api/v1/parcels/{tn}", headers=auth.headers("manager1")).get_json()
    assert body["status"] == "out_for_delivery"
    timeline = body["timeline"]
    assert [e["seq"] for e in timeline] == [1, 2, 3, 4]
    assert [e["emsevt"] for e in timeline] == [None, "EDG", "EDH", None]
    assert [e["voided"] for e in timeline] == [False, False, True, False]
    assert timeline[2]["voided_by_event_id"] == timeline[3]["event_id"]
    assert [e["voids_event_id"] for e in timeline] == [None, None, None, timeline[2]["event_id"]]
    assert timeline[2]["details"] == {"locker_id": "L-1", "compartment": "4"}
    assert timeline[0]["batch_id"] == first["batch_id"]
    assert {"occurred_at_device", "occurred_at", "received_at"} <= set(timeline[0])


def test_a_correction_that_voids_nothing_says_so_in_the_timeline(
    client: FlaskClient, auth: Auth, courier: dict[str, str], parcel: Parcel
) -> None:
    """An auditor reading a parcel's timeline must tell a correction that took effect
    from one that did not: here a second correction of the same delivery (the first
    voided it) and one naming an event its PDA never sent. Both are stored, neither
    voids anything."""
    tn = parcel.tracking_no
    delivered = ev(2, tn, "delivered")
    push(client, courier, [ev(1, tn), delivered])
    fix = {"voids_client_event_id": delivered["client_event_id"], "reason": "wrong parcel"}
    nothing = {"voids_client_event_id": str(uuid.uuid4()), "reason": "typo"}
    push(
        client,
        courier,
        [ev(3, tn, "correction", **fix), ev(4, tn, "correction", **fix)]
        + [ev(5, tn, "correction", **nothing)],
    )
    body = client.get(f"/api/v1/parcels/{tn}", headers=auth.headers("auditor1")).get_json()
    timeline = {e["seq"]: e for e in body["timeline"]}
    assert timeline[3]["voids_event_id"] == timeline[2]["event_id"]
    assert (timeline[4]["voids_event_id"], timeline[5]["voids_event_id"]) == (None, None)
    assert timeline[2]["voided_by_event_id"] == timeline[3]["event_id"]


def test_pull_pages_through_assignments_and_tombstones(committed_app: Flask) -> None:
    """Real commits: on PostgreSQL a reader sees only committed transactions' changes."""
    with committed_app.app_context():
        session = db.session
        station = factories.station(session, code="PULL")
        factories.user(session, "pull-manager", "station_manager", station)
        factories.user(session, "pull-courier", "courier", station)
        factories.user(session, "pull-courier2", "courier", station)
        factories.device(session, "PDA-PULL", station)
        session.commit()
    client = committed_app.test_client()
    auth = Auth(client)
    numbers = [factories.s10() for _ in range(5)]
    items = [
        {
            "tracking_no": n,
            "service_class": "parcel",
            "recipient_name": "R",
            "address": "A",
            "recipient_phone": "+8613812345678",
            "courier": "pull-courier",
        }
        for n in numbers
    ]
    manager = auth.headers("pull-manager")
    assert (
        client.post("/api/v1/parcels", json={"parcels": items}, headers=manager).status_code == 200
    )
    courier = auth.headers("pull-courier", "PDA-PULL")
    changes: list[dict[str, Any]] = []
    cursor = None
    for _ in range(10):  # a fresh PDA: the parcels it holds, then the feed since
        query = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get(PULL, query_string=query, headers=courier).get_json()
        changes += page["changes"]
        cursor = page["next_cursor"]
        if not page["has_more"]:
            break
    assert [(c["kind"], c["tracking_no"]) for c in changes] == [("parcel", n) for n in numbers]
    assert {c["parcel"]["recipient_phone"] for c in changes} == {"+86*******5678"}

    moved = {"parcels": [{**items[0], "courier": "pull-courier2"}]}
    assert client.post("/api/v1/parcels", json=moved, headers=manager).status_code == 200
    page = client.get(PULL, query_string={"cursor": cursor}, headers=courier).get_json()
    assert [(c["kind"], c["tracking_no"], c["parcel"]) for c in page["changes"]] == [
        ("parcel_removed", numbers[0], None)
    ]
    again = client.get(PULL, query_string={"cursor": page["next_cursor"]}, headers=courier)
    assert again.get_json()["changes"] == []
    assert again.get_json()["next_cursor"] == page["next_cursor"]


@pytest.mark.parametrize(
    "cursor",
    ["abc", "1", "1.2.3", "-1.5", "1." + "9" * 30, "9" * 19 + ".1", "١.١", "s.1.2", "1.2.3"],
)
def test_a_malformed_cursor_is_400(
    client: FlaskClient, courier: dict[str, str], cursor: str
) -> None:
    response = client.get(PULL, query_string={"cursor": cursor}, headers=courier)
    assert response.status_code == 400
    assert response.get_json()["code"] == "cursor_malformed"


@pytest.mark.parametrize("cursor", ["0.999999", "9223372036854775807.1"])
def test_an_unknown_cursor_asks_for_a_reset(
    client: FlaskClient, courier: dict[str, str], parcel: Parcel, cursor: str
) -> None:
    """Beyond the newest entry, or from a transaction this database could not have
    handed out (another cluster, a restored backup)."""
    push(client, courier, [ev(1, parcel.tracking_no)])  # at least one feed entry exists
    response = client.get(PULL, query_string={"cursor": cursor}, headers=courier)
    assert response.status_code == 410
    assert response.get_json()["code"] == "cursor_reset"
    assert client.get(PULL, headers=courier).status_code == 200


def test_the_quarantine_is_per_station_for_managers(
    client: FlaskClient, auth: Auth, courier: dict[str, str], parcel: Parcel
) -> None:
    push(client, courier, [{"garbage": True}])
    assert (
        len(client.get("/api/v1/quarantine", headers=auth.headers("manager1")).get_json()["items"])
        == 1
    )
    other = client.get(
        "/api/v1/quarantine",
        query_string={"station_id": parcel.station_id},
        headers=auth.headers("manager2"),
    ).get_json()
    assert other["items"] == []
    assert (
        len(client.get("/api/v1/quarantine", headers=auth.headers("admin")).get_json()["items"])
        == 1
    )
    assert client.get("/api/v1/quarantine", headers=auth.headers("app1")).status_code == 403
    assert client.get("/api/v1/quarantine", headers=courier).status_code == 403


def test_the_quarantine_lists_the_rejected_events_naming_a_parcel(
    client: FlaskClient, auth: Auth, courier: dict[str, str], parcel: Parcel
) -> None:
    """A manager chasing a parcel counted missing asks the quarantine for its rejected
    events (a drop refused for a missing compartment) by its tracking number, as the
    PDA wrote it or as a label prints it; otherwise they page through every rejected
    event of the station. Another station's manager gets none of them."""
    drop = ev(2, parcel.tracking_no, "delivered_to_locker", locker_id="L-7")  # no compartment
    push(client, courier, [ev(1, parcel.tracking_no), drop, {"garbage": True}])
    printed = f"{parcel.tracking_no[:2].lower()} {parcel.tracking_no[2:]}"
    for asked in (parcel.tracking_no, printed):
        listed = client.get(
            "/api/v1/quarantine",
            query_string={"tracking_no": asked},
            headers=auth.headers("manager1"),
        ).get_json()
        assert [i["client_event_id"] for i in listed["items"]] == [drop["client_event_id"]]
    elsewhere = client.get(
        "/api/v1/quarantine",
        query_string={"tracking_no": parcel.tracking_no},
        headers=auth.headers("manager2"),
    ).get_json()
    assert elsewhere["items"] == []


def test_the_quarantine_finds_a_rejected_event_of_a_parcel_however_its_pda_wrote_the_number(
    client: FlaskClient, auth: Auth, courier: dict[str, str], parcel: Parcel
) -> None:
    """A rejected event is where a badly typed number is likely: drops of the parcel
    written ``rr 4731 2482 9gb`` and ``rr-4731-2482-9gb`` (each refused for its missing
    compartment) are found by the number as stored, the one a manager copies from the
    parcel's page, and by any other way of writing it; each is shown as the PDA wrote
    it. Another parcel's is not."""
    spaced = ev(2, typed_loosely(parcel.tracking_no), "delivered_to_locker", locker_id="L-7")
    dashed = ev(3, typed_loosely(parcel.tracking_no, "-"), "delivered_to_locker", locker_id="L-7")
    other = ev(4, "RR473124829GB", "delivered_to_locker", locker_id="L-7")
    receipt = push(client, courier, [ev(1, parcel.tracking_no), spaced, dashed, other]).get_json()
    assert [r["status"] for r in receipt["results"]] == ["applied", *["rejected"] * 3]
    for asked in (parcel.tracking_no, typed_loosely(parcel.tracking_no, "-").upper()):
        listed = client.get(
            "/api/v1/quarantine",
            query_string={"tracking_no": asked},
            headers=auth.headers("manager1"),
        ).get_json()["items"]
        assert [(i["client_event_id"], i["tracking_no"]) for i in listed] == [
            (dashed["client_event_id"], dashed["tracking_no"]),
            (spaced["client_event_id"], spaced["tracking_no"]),
        ], asked


def test_an_auditor_can_see_that_a_pda_sent_a_rejected_drop_of_the_parcel(
    client: FlaskClient,
    auth: Auth,
    session: Session,
    courier: dict[str, str],
    parcel: Parcel,
) -> None:
    """The recipient says it was never delivered. The courier's PDA did send a locker
    drop of the parcel, rejected for a missing compartment and kept in quarantine (rule
    1): the one record that the courier claims to have dropped it. Auditors read across
    stations, so they read the quarantine too, phone numbers whole as everywhere they
    read, and their read is on the audit log naming what they were shown (rule 7)."""
    drop = ev(
        2, parcel.tracking_no, "delivered_to_locker", locker_id="L-7",
        pod={"recipient_name": "call 13812345678"},
    )  # fmt: skip
    push(client, courier, [ev(1, parcel.tracking_no), drop])
    response = client.get(
        "/api/v1/quarantine",
        query_string={"tracking_no": parcel.tracking_no},
        headers=auth.headers("auditor1"),
    )
    assert response.status_code == 200, response.get_json()
    (item,) = response.get_json()["items"]
    assert (item["event_type"], item["client_event_id"]) == (
        "delivered_to_locker",
        drop["client_event_id"],
    )
    assert "call 13812345678" in item["payload"]
    logged = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "quarantine_searched")
    ).one()
    assert (logged.subject_type, logged.subject_key) == ("quarantined_event", "search")
    assert logged.details == {
        "tracking_no": parcel.tracking_no, "ids": [item["id"]], "cursor": None,
        "as_of": item["id"], "offset": 0, "entries": 1, "arrived_since": 0,
        "next_cursor": None,
    }  # fmt: skip
    assert logged.actor_id == session.scalar(select(User.id).where(User.username == "auditor1"))
    client.get("/api/v1/quarantine", headers=auth.headers("manager1"))
    assert session.scalar(select(func.count()).select_from(AuditEntry)) == 1  # auditors' only


def test_a_rejected_drop_says_who_pushed_it_and_the_clock_it_was_written_on(
    client: FlaskClient,
    auth: Auth,
    session: Session,
    courier: dict[str, str],
    parcel: Parcel,
) -> None:
    """A PDA whose clock runs ten minutes fast sent a locker drop without its
    compartment: refused, kept in quarantine. An auditor settling "never delivered"
    read it with its PDA and the time its PDA wrote, but not who was signed in on the
    PDA when it was pushed (the timeline names that, ``pushed_by_courier_id``, for every
    accepted event) nor the clock offset the server estimated for that push (the
    timeline's corrected times come from it), so the refused drop could be put neither
    on a courier nor on the server's clock. Both are listed now, as the receipt said."""
    fast = dt.timedelta(minutes=10)
    drop = ev(
        2,
        parcel.tracking_no,
        "delivered_to_locker",
        locker_id="L-7",
        occurred_at=dt.datetime.now(dt.UTC) + fast - dt.timedelta(minutes=5),
    )
    receipt = push(
        client,
        courier,
        [ev(1, parcel.tracking_no, occurred_at=dt.datetime.now(dt.UTC) + fast), drop],
        sent_at=dt.datetime.now(dt.UTC) + fast,
    ).get_json()
    assert [r["status"] for r in receipt["results"]] == ["applied", "rejected"], receipt
    listed = client.get(
        "/api/v1/quarantine",
        query_string={"tracking_no": parcel.tracking_no},
        headers=auth.headers("auditor1"),
    ).get_json()["items"]
    courier_id = session.scalar(select(User.id).where(User.username == "courier1"))
    assert [(i["pushed_by_courier_id"], i["clock_offset_ms"]) for i in listed] == [
        (courier_id, receipt["clock_offset_ms"])
    ]
    assert receipt["clock_offset_ms"] > 9 * 60_000


def test_an_auditors_quarantine_search_by_pda_is_in_each_shown_parcels_history(
    client: FlaskClient,
    auth: Auth,
    session: Session,
    courier: dict[str, str],
    parcel: Parcel,
    world: World,
) -> None:
    """An auditor lists a PDA's rejected events (by ``device_id``, not by a parcel's
    number) and is shown the refused locker drop of the parcel, its payload unmasked.
    The read was on record, but filed under no parcel, so ``GET /audit?tracking_no=``
    of that parcel did not list it, where a proof search by station that showed the
    parcel's proof is listed: who was shown the parcel's rejected drop is now in its
    history too, and in no other parcel's."""
    other = factories.parcel(session, world.station)
    session.commit()
    push(client, courier, [ev(1, parcel.tracking_no, "delivered_to_locker", locker_id="L-7")])
    auditor = auth.headers("auditor1")
    listed = client.get(
        "/api/v1/quarantine", query_string={"device_id": "PDA-0001"}, headers=auditor
    )
    assert listed.status_code == 200 and len(listed.get_json()["items"]) == 1

    def history(number: str) -> list[str]:
        response = client.get(
            "/api/v1/audit", query_string={"tracking_no": number}, headers=auditor
        )
        assert response.status_code == 200, response.get_json()
        return [e["action"] for e in response.get_json()["items"]]

    assert "quarantine_searched" in history(parcel.tracking_no)
    assert "quarantine_searched" not in history(other.tracking_no)


def test_an_auditors_quarantine_search_failing_after_its_record_leaves_none(
    client: FlaskClient,
    auth: Auth,
    session: Session,
    courier: dict[str, str],
    parcel: Parcel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``GET /quarantine`` put the auditor's search on record (``quarantine_searched``),
    then built the answer from the rejected events: a read failing after the record
    left a search on record that the auditor was never shown. A read is on record
    when, and only when, it is shown: recorded last, as a proof's is."""
    push(client, courier, [ev(1, parcel.tracking_no, "delivered_to_locker", locker_id="L-7")])

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("the rejected event could not be shown")

    monkeypatch.setattr(quarantine_routes, "shown_rejection", broken)
    before = session.scalars(select(AuditEntry.action)).all()
    try:
        response = client.get("/api/v1/quarantine", headers=auth.headers("auditor1"))
        assert response.status_code >= 500, response.status_code
    except RuntimeError:  # raised through the test client
        pass
    session.expire_all()
    assert session.scalars(select(AuditEntry.action)).all() == before


def test_quarantine_pages_newest_first(
    client: FlaskClient, auth: Auth, courier: dict[str, str]
) -> None:
    push(client, courier, [{"n": i} for i in range(5)])
    manager = auth.headers("manager1")
    first = client.get("/api/v1/quarantine", query_string={"limit": 3}, headers=manager).get_json()
    rest = client.get(
        "/api/v1/quarantine",
        query_string={"limit": 3, "after": first["next_after"]},
        headers=manager,
    ).get_json()
    positions = [i["position"] for i in first["items"] + rest["items"]]
    assert positions == [4, 3, 2, 1, 0]
    assert rest["next_after"] is None


def test_a_quarantine_walk_refuses_its_last_page_when_a_rejection_committed_late_among_it(
    client: FlaskClient, auth: Auth, session: Session, courier: dict[str, str]
) -> None:
    """An id is taken when a push stores its rejected events, not when it commits: on
    PostgreSQL a push committing late holds an id among those a page (newest first)
    showed already, and the next page, read by id below them (``after``), never saw it:
    an auditor listing a PDA's rejected drops to the end took its absence for none. A
    walk by ``cursor`` compares, at its last page, the rejected events up to its
    ``as_of`` with those it showed: a 410 ``cursor_reset``, list again, and the walk
    begun again holds it. Pages read by the deprecated ``after`` still miss it."""
    push(client, courier, [{"n": i} for i in range(5)])
    ids = sorted(session.scalars(select(QuarantinedEvent.id)), reverse=True)
    late = session.get(QuarantinedEvent, ids[1])
    assert late is not None
    row = {a.columns[0].name: getattr(late, a.key) for a in inspect(QuarantinedEvent).column_attrs}
    session.delete(late)  # stored, its push not committed yet
    session.commit()
    headers = auth.headers("auditor1")
    url = "/api/v1/quarantine"
    first = client.get(url, query_string={"limit": 2}, headers=headers).get_json()
    assert [i["id"] for i in first["items"]] == [ids[0], ids[2]]
    assert first["as_of"] == ids[0] and first["arrived_since"] == 0
    assert first["next_after"] == ids[2] and first["next_cursor"] is not None
    session.execute(insert(QuarantinedEvent.__table__).values(**row))  # the push commits
    session.commit()
    by_after = client.get(
        url, query_string={"limit": 2, "after": first["next_after"]}, headers=headers
    ).get_json()
    assert [i["id"] for i in by_after["items"]] == ids[3:]  # the deprecated way misses it
    assert by_after["next_cursor"] is None and by_after["as_of"] is None
    last = client.get(
        url, query_string={"limit": 2, "cursor": first["next_cursor"]}, headers=headers
    )
    assert last.status_code == 410, last.get_json()
    assert last.get_json()["code"] == "cursor_reset"
    assert "this walk showed 4 rejected events" in last.get_json()["message"]
    again, cursor, pages = None, None, 0
    walked: list[int] = []
    while again is None or cursor is not None:
        query = {"limit": 2} if cursor is None else {"limit": 2, "cursor": cursor}
        again = client.get(url, query_string=query, headers=headers)
        assert again.status_code == 200, again.get_json()
        walked += [i["id"] for i in again.get_json()["items"]]
        cursor, pages = again.get_json()["next_cursor"], pages + 1
    assert walked == ids and pages == 3
    both = client.get(
        url, query_string={"cursor": first["next_cursor"], "after": ids[2]}, headers=headers
    )
    assert both.status_code == 422 and both.get_json()["code"] == "cursor_and_after"
    other = client.get(
        url, query_string={"cursor": first["next_cursor"], "device_id": "PDA-9"}, headers=headers
    )
    assert other.status_code == 400 and other.get_json()["code"] == "cursor_malformed"
    logged = session.scalars(
        select(AuditEntry)
        .where(AuditEntry.action == "quarantine_searched")
        .order_by(AuditEntry.id)
    ).all()
    assert logged[0].details == {
        "ids": [ids[0], ids[2]], "cursor": None, "as_of": ids[0], "offset": 0, "entries": 2,
        "arrived_since": 0, "next_cursor": first["next_cursor"],
    }  # fmt: skip
    assert logged[1].details == {"ids": ids[3:], "after": ids[2], "next_after": ids[4]}


def test_the_app_fixture_is_not_shared(app: Flask) -> None:
    assert app.config["MAX_EVENTS_PER_PUSH"] == 5000


@pytest.mark.parametrize(
    ("sent_at", "answer"),
    [
        # Its events are later or far earlier than its clock: the clock jumped between
        # the scan and the push, and the scan is kept.
        ("0001-01-01T00:00:00+00:00", {"status": "applied"}),
        ("9999-12-31T23:59:59+00:00", {"status": "applied"}),
    ],
)
def test_a_pda_clock_at_the_end_of_the_calendar_gets_answers_not_a_500(
    client: FlaskClient, courier: dict[str, str], parcel: Parcel, sent_at: str, answer: dict
) -> None:
    body = factories.push_body("PDA-0001", [ev(1, parcel.tracking_no)])
    body["sent_at"] = sent_at
    response = client.post(PUSH, json=body, headers=courier)
    assert response.status_code == 200
    result = response.get_json()["results"][0]
    assert {k: result.get(k, result.get("error", {}).get(k)) for k in answer} == answer


@pytest.mark.parametrize("depth", [20, 100, 400])
def test_an_event_nested_deep_is_quarantined_and_only_an_absurd_body_is_400(
    client: FlaskClient, auth: Auth, courier: dict[str, str], parcel: Parcel, depth: int
) -> None:
    """A bad event never blocks its batch (rule 1), however deep it nests: it is
    quarantined, cut to MAX_EVENT_DEPTH. Only a body the JSON parser cannot read is
    refused whole."""
    sibling = ev(2, parcel.tracking_no)
    deep_pod = ev(1, parcel.tracking_no, "delivered", pod="POD")
    body = factories.push_body("PDA-0001", [deep_pod, sibling])
    raw = json.dumps(body).replace('"POD"', '{"a": ' * depth + "{}" + "}" * depth)
    response = client.post(PUSH, data=raw, content_type="application/json", headers=courier)
    assert response.status_code == 200, response.get_json()
    results = response.get_json()["results"]
    assert [r["status"] for r in results] == ["rejected", "applied"]
    assert results[0]["error"]["code"] == "too_deep"
    listed = client.get("/api/v1/quarantine", headers=auth.headers("manager1")).get_json()
    assert [(item["seq"], item["error_code"]) for item in listed["items"]] == [(1, "too_deep")]
    again = client.post(PUSH, data=raw, content_type="application/json", headers=courier)
    assert again.get_json() == response.get_json()  # the same batch: the same receipt

    too_deep = "[" * 100_000 + "]" * 100_000
    raw = json.dumps({**body, "events": "NESTED"}).replace('"NESTED"', too_deep)
    response = client.post(PUSH, data=raw, content_type="application/json", headers=courier)
    assert response.status_code == 400
    assert response.get_json()["code"] == "bad_request"


def test_pickup_codes_are_hidden_from_couriers(
    client: FlaskClient, auth: Auth, courier: dict[str, str], parcel: Parcel
) -> None:
    drop = ev(
        1,
        parcel.tracking_no,
        "delivered_to_locker",
        locker_id="L-9",
        compartment="3",
        pod={"pickup_code": "482913"},
    )
    push(client, courier, [drop])
    url = f"/api/v1/parcels/{parcel.tracking_no}"
    as_courier = client.get(url, headers=courier).get_json()["timeline"][0]["details"]
    as_manager = client.get(url, headers=auth.headers("manager1")).get_json()["timeline"][0]
    assert as_courier["pod"]["pickup_code"] == "****"
    assert as_manager["details"]["pod"]["pickup_code"] == "482913"


def test_a_fresh_pda_gets_the_parcels_it_holds_not_the_whole_history(
    client: FlaskClient, courier: dict[str, str], session: Session, world: World
) -> None:
    """After a reset the feed is not replayed from its first day: the PDA gets the
    parcels it still has to deal with."""
    done, open_ = (
        factories.parcel(session, world.station),
        factories.parcel(session, world.station),
    )
    session.commit()
    push(client, courier, [ev(1, done.tracking_no), ev(2, open_.tracking_no)])
    push(client, courier, [ev(3, done.tracking_no, "delivered")])
    first = client.get(PULL, headers=courier).get_json()
    assert [c["tracking_no"] for c in first["changes"]] == [open_.tracking_no]
    # On to the feed (test_pull_pages_through_assignments_and_tombstones follows it),
    # which holds nothing newer yet: the one page says so.
    assert not first["has_more"] and first["next_cursor"].count(".") == 1


def test_a_snapshot_cursor_pages_by_parcel(
    client: FlaskClient, courier: dict[str, str], session: Session, world: World
) -> None:
    parcels = [factories.parcel(session, world.station) for _ in range(3)]
    session.commit()
    push(client, courier, [ev(i + 1, p.tracking_no) for i, p in enumerate(parcels)])
    page = client.get(PULL, query_string={"limit": 2}, headers=courier).get_json()
    assert page["next_cursor"].startswith("s.") and len(page["changes"]) == 2
    rest = client.get(
        PULL, query_string={"limit": 2, "cursor": page["next_cursor"]}, headers=courier
    ).get_json()
    assert [c["tracking_no"] for c in page["changes"] + rest["changes"]] == [
        p.tracking_no for p in parcels
    ]


def test_a_push_rewrites_no_device_row_while_it_was_seen_within_the_minute(
    client: FlaskClient, courier: dict[str, str], parcel: Parcel, connection: Connection
) -> None:
    """Signing in just now set the device's last-seen time, and the push's sign-in
    check read it (``Pusher.device_seen_at``): no statement touches the device row."""
    sent: list[str] = []

    def capture(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(" ".join(statement.split()))

    event.listen(connection, "before_cursor_execute", capture)
    try:
        assert push(client, courier, [ev(1, parcel.tracking_no)]).status_code == 200
    finally:
        event.remove(connection, "before_cursor_execute", capture)
    assert [s for s in sent if s.startswith("UPDATE device ")] == []
    assert db_value(connection, "SELECT count(*) FROM device WHERE last_seen_at IS NOT NULL") == 1


def db_value(connection: Connection, sql: str) -> Any:
    return connection.exec_driver_sql(sql).scalar_one()


def pull_all(
    client: FlaskClient, headers: dict[str, str], cursor: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """Every change after ``cursor``, page after page, and the cursor to go on from."""
    changes: list[dict[str, Any]] = []
    while True:
        query = {"limit": 500, **({"cursor": cursor} if cursor else {})}
        response = client.get(PULL, query_string=query, headers=headers)
        assert response.status_code == 200, response.get_json()
        page = response.get_json()
        changes += page["changes"]
        cursor = page["next_cursor"]
        if not page["has_more"]:
            return changes, cursor


def ask_for_consent(client: FlaskClient, courier: dict[str, str], tracking_no: str) -> int:
    asked = client.post(
        "/api/v1/consents/requests",
        json={"tracking_no": tracking_no, "method": "locker"},
        headers=courier,
    )
    assert asked.status_code == 201, asked.get_json()
    return int(asked.get_json()["id"])


def grant_request(client: FlaskClient, channel: dict[str, str], request_id: int) -> int:
    """The recipient's yes, through the channel: the answer's status code."""
    return client.post(
        "/api/v1/consents", json={"request_id": request_id, "channel": "sms"}, headers=channel
    ).status_code


def intake_item(tracking_no: str, **fields: str) -> dict[str, Any]:
    return {
        "tracking_no": tracking_no,
        "service_class": "express",
        "recipient_name": "Li Lei",
        "address": "9 Hidden Road",
        "recipient_phone": "+8613812345678",
        **fields,
    }


def committed_feed_world(app: Flask) -> Auth:
    """Two stations (FEEDA, FEEDB) whose requests really commit: on PostgreSQL a pull
    sees only committed transactions' changes. FEEDA has a manager and two couriers
    with a PDA each; an admin and a recipients' channel are there too."""
    with app.app_context():
        station = factories.station(db.session, code="FEEDA")
        factories.station(db.session, code="FEEDB")
        factories.user(db.session, "fa-manager", "station_manager", station)
        for n in (1, 2):
            factories.user(db.session, f"fa-courier{n}", "courier", station)
            factories.device(db.session, f"PDA-FA{n}", station)
        factories.user(db.session, "fa-admin", "admin")
        factories.user(db.session, "fa-gateway", "integration")
        db.session.commit()
    return Auth(app.test_client())


def take_in(auth: Auth, headers: dict[str, str], item: dict[str, Any]) -> None:
    taken = auth.client.post("/api/v1/parcels", json={"parcels": [item]}, headers=headers)
    assert taken.status_code == 200 and taken.get_json()["counts"]["rejected"] == 0


@pytest.mark.parametrize("moved_to", ["a colleague", "another station"])
def test_a_parcel_moved_on_reaches_the_old_courier_only_as_its_tombstone(
    committed_app: Flask, moved_to: str
) -> None:
    """Courier 1 asks for consent, then the parcel goes to a colleague or is re-routed
    to another station. Updates of it then reach courier 1's PDA only as tombstones;
    the recipient's answer to courier 1's request reaches courier 1 while the parcel
    is at the station, and never carries another station's address and recipient."""
    auth = committed_feed_world(committed_app)
    client, manager, tn = auth.client, auth.headers("fa-manager"), factories.s10()
    take_in(auth, manager, intake_item(tn, station="FEEDA", courier="fa-courier1"))
    courier = auth.headers("fa-courier1", "PDA-FA1")
    _, cursor = pull_all(client, courier)
    request_id = ask_for_consent(client, courier, tn)
    if moved_to == "a colleague":
        take_in(auth, manager, intake_item(tn, station="FEEDA", courier="fa-courier2"))
    else:
        moved = intake_item(tn, station="FEEDB", address="77 Other Road")
        take_in(auth, auth.headers("fa-admin"), moved)
    changes, cursor = pull_all(client, courier, cursor)
    assert [(c["kind"], c["tracking_no"]) for c in changes][-1] == ("parcel_removed", tn)
    assert grant_request(client, auth.headers("fa-gateway"), request_id) == 201
    changes, _ = pull_all(client, courier, cursor)
    if moved_to == "another station":
        assert [(c["kind"], c["parcel"]) for c in changes] == [("parcel_removed", None)]
    else:
        assert [c["kind"] for c in changes] == ["consent_request"]
        assert changes[0]["parcel"]["consent_requests"][0]["status"] == "granted"


def test_a_pull_without_a_cursor_never_waits_even_when_the_pda_holds_nothing(
    client: FlaskClient, courier: dict[str, str]
) -> None:
    """README: pull without a cursor for the parcels you hold. A PDA starting fresh,
    holding none yet, whose pull code always asks to wait, waited up to
    MAX_PULL_WAIT_SECONDS for an empty page that was its answer already: the start of
    its first shift held back, and a waiting place taken. It is answered at once with
    the cursor to wait on; a long pull from that cursor still waits."""
    started = time.monotonic()
    response = client.get(PULL, query_string={"wait": 3}, headers=courier)
    assert time.monotonic() - started < 1.5
    page = response.get_json()
    assert response.status_code == 200, page
    assert (page["changes"], page["has_more"]) == ([], False)
    started = time.monotonic()
    after = client.get(
        PULL, query_string={"cursor": page["next_cursor"], "wait": 1}, headers=courier
    )
    assert after.status_code == 200 and after.get_json()["changes"] == []
    assert time.monotonic() - started >= 0.9


def test_a_long_pull_waiting_when_its_pda_is_reported_lost_hands_over_nothing(
    committed_app: Flask,
) -> None:
    """The token is checked again each time the long pull looks for news."""
    with committed_app.app_context():
        station = factories.station(db.session, code="LOSTW")
        factories.user(db.session, "lw-courier", "courier", station)
        factories.user(db.session, "lw-manager", "station_manager", station)
        factories.user(db.session, "lw-gateway", "integration")
        factories.device(db.session, "PDA-LOSTW", station)
        tracking_no = factories.parcel(db.session, station).tracking_no
        db.session.commit()
    client = committed_app.test_client()
    auth = Auth(client)
    courier = auth.headers("lw-courier", "PDA-LOSTW")
    manager, channel = auth.headers("lw-manager"), auth.headers("lw-gateway")
    _, cursor = pull_all(client, courier)
    request_id = ask_for_consent(client, courier, tracking_no)
    _, cursor = pull_all(client, courier, cursor)
    done: dict[str, int] = {}

    def report_lost_then_answer() -> None:
        time.sleep(0.8)
        other = committed_app.test_client()
        done["lost"] = other.patch(
            "/api/v1/devices/PDA-LOSTW", json={"status": "lost"}, headers=manager
        ).status_code
        done["answer"] = grant_request(other, channel, request_id)

    thread = threading.Thread(target=report_lost_then_answer)
    thread.start()
    response = client.get(PULL, query_string={"cursor": cursor, "wait": 10}, headers=courier)
    thread.join(timeout=30)
    assert done == {"lost": 200, "answer": 201}
    assert response.status_code == 401
    assert response.get_json()["code"] == "device_not_active"


def test_a_courier_asking_about_a_colleagues_parcel_gets_the_answer(
    committed_app: Flask,
) -> None:
    """Courier 2 is at the door with a parcel planned for courier 1 (nobody checked it
    out) and asks for consent: the answer reaches the courier who asked."""
    auth = committed_feed_world(committed_app)
    client, tn = auth.client, factories.s10()
    take_in(
        auth, auth.headers("fa-manager"), intake_item(tn, station="FEEDA", courier="fa-courier1")
    )
    asker = auth.headers("fa-courier2", "PDA-FA2")
    _, cursor = pull_all(client, asker)
    request_id = ask_for_consent(client, asker, tn)
    assert grant_request(client, auth.headers("fa-gateway"), request_id) == 201
    changes, _ = pull_all(client, asker, cursor)
    # The ask's (no channel subscribed here: nobody would ask the recipient), the answer's.
    assert [c["kind"] for c in changes] == ["consent_request", "consent_request"]
    assert changes[-1]["parcel"]["consent_requests"][0]["status"] == "granted"
    assert changes[-1]["parcel"]["consent_requests"][0]["not_reached"] is None


def test_a_phone_in_a_rejected_events_payload_reaches_the_quarantine_masked(
    client: FlaskClient, auth: Auth, courier: dict[str, str], parcel: Parcel
) -> None:
    """A consent the PDA got wrong (an unknown field) is kept whole, but the managers
    and admins who read the quarantine see the number masked; auditors see it whole."""
    rejected = factories.event(
        1, parcel.tracking_no, "consent_captured", occurred_at=dt.datetime.now(dt.UTC),
        consent={"method": "locker", "channel": "phone_call", "evidence": "+8613812345678"},
        colour="red",
    )  # fmt: skip
    push(client, courier, [rejected])
    for username in ("manager1", "admin"):
        (item,) = client.get("/api/v1/quarantine", headers=auth.headers(username)).json["items"]
        assert "+**********678" in item["payload"], username
        assert "13812345678" not in item["payload"] + item["message"], username
    (item,) = client.get("/api/v1/quarantine", headers=auth.headers("auditor1")).json["items"]
    assert "+8613812345678" in item["payload"]


def test_a_phone_typed_in_full_width_digits_reaches_the_quarantine_masked(
    client: FlaskClient, auth: Auth, courier: dict[str, str], parcel: Parcel
) -> None:
    """The payload is kept as ASCII JSON, where a full-width digit is written \\uff11
    and the Chinese character before a number ends in a letter (\\u8bdd): it is masked
    as the courier typed it, the rest of the payload left as it was."""
    typed = "电话１３８－００１３－８０００，或13912345678"
    rejected = factories.event(
        1, parcel.tracking_no, "consent_captured", occurred_at=dt.datetime.now(dt.UTC),
        consent={"method": "locker", "channel": "phone_call", "evidence": typed},
        colour="red",
    )  # fmt: skip
    push(client, courier, [rejected])
    (item,) = client.get("/api/v1/quarantine", headers=auth.headers("manager1")).json["items"]
    payload = json.loads(item["payload"])
    assert payload["consent"]["evidence"] == "电话********０００，或********678"
    assert payload["colour"] == "red" and payload["tracking_no"] == parcel.tracking_no
    assert item["payload"].isascii()


def test_a_phone_sent_as_a_json_number_reaches_the_quarantine_masked(
    client: FlaskClient, auth: Auth, courier: dict[str, str], parcel: Parcel
) -> None:
    """A PDA that sends the evidence as a number (the wrong type: why it is rejected)
    does not show it to managers whole: the payload is masked as a document, where a
    number is not a string, and masking the text of the document did catch it."""
    rejected = factories.event(
        1, parcel.tracking_no, "consent_captured", occurred_at=dt.datetime.now(dt.UTC),
        consent={"method": "locker", "channel": "phone_call", "evidence": 13812345678},
        notes=[13912345678],
    )  # fmt: skip
    push(client, courier, [rejected])
    for username in ("manager1", "admin"):
        (item,) = client.get("/api/v1/quarantine", headers=auth.headers(username)).json["items"]
        payload = json.loads(item["payload"])  # still a JSON document
        assert payload["consent"]["evidence"] == "********678", username
        assert payload["notes"] == ["********678"], username
        assert payload["tracking_no"] == parcel.tracking_no, username


def test_a_phone_in_a_rejected_events_own_fields_reaches_the_quarantine_masked(
    client: FlaskClient, auth: Auth, courier: dict[str, str]
) -> None:
    """The quarantine lists a rejected event's tracking number, type and client event
    id as the PDA sent them, next to its payload: a phone number typed into the tracking
    number field is masked there as it is in the payload and the message."""
    rejected = factories.event(
        1, "+86 138 1234 5678", "checked_out", occurred_at=dt.datetime.now(dt.UTC),
    )  # fmt: skip
    push(client, courier, [rejected])
    (item,) = client.get("/api/v1/quarantine", headers=auth.headers("manager1")).json["items"]
    assert "1234 5678" not in json.dumps(item), item
    assert item["tracking_no"] == "+**********678"


def test_a_cursor_kept_from_another_couriers_pulls_on_the_same_pda_loses_no_parcel(
    committed_app: Flask,
) -> None:
    """A shared PDA keeps its last ``next_cursor`` across sign-ins. The afternoon
    courier's parcels were assigned before the morning courier's last entry: pulling
    from that cursor must not skip them (a 410 ``cursor_reset`` is the way to say the
    cursor is not this courier's: the PDA pulls again from scratch). Real commits: on
    PostgreSQL a reader sees only committed transactions' changes."""
    with committed_app.app_context():
        session = db.session
        station = factories.station(session, code="SHARED")
        factories.user(session, "shared-manager", "station_manager", station)
        factories.user(session, "morning", "courier", station)
        factories.user(session, "afternoon", "courier", station)
        factories.device(session, "PDA-SHARED", station)
        session.commit()
    client = committed_app.test_client()
    auth = Auth(client)
    manager = auth.headers("shared-manager")

    def assign(courier: str) -> str:
        item = {
            "tracking_no": factories.s10(),
            "service_class": "parcel",
            "recipient_name": "R",
            "address": "A",
            "courier": courier,
        }
        response = client.post("/api/v1/parcels", json={"parcels": [item]}, headers=manager)
        assert response.status_code == 200, response.get_json()
        return item["tracking_no"]

    afternoons = [assign("afternoon"), assign("afternoon")]
    mornings = [assign("morning")]
    morning, cursor = pull_all(client, auth.headers("morning", "PDA-SHARED"))
    assert [c["tracking_no"] for c in morning] == mornings

    afternoon = auth.headers("afternoon", "PDA-SHARED")
    query = {"limit": 500, "cursor": cursor}
    response = client.get(PULL, query_string=query, headers=afternoon)
    if response.status_code == 410:
        assert response.get_json()["code"] == "cursor_reset"
        changes, _ = pull_all(client, afternoon)
    else:
        assert response.status_code == 200
        changes, _ = pull_all(client, afternoon, cursor)
    assert {c["tracking_no"] for c in changes if c["kind"] == "parcel"} >= set(afternoons)


def test_a_consent_a_colleague_captured_and_then_voided_reaches_the_holders_pda(
    committed_app: Flask,
) -> None:
    """Courier 2 meets the recipient of courier 1's express parcel and captures their
    consent to a locker on PDA-FA2; later courier 2 voids it (a mis-tap). Courier 1's
    PDA must hear both from its pull: told nothing, it asks the recipient again, or,
    told of the consent and not of its voiding, drops the parcel on a consent that no
    longer authorizes anything (``unauthorized_locker_drop``)."""
    auth = committed_feed_world(committed_app)
    client, tn = auth.client, factories.s10()
    take_in(
        auth, auth.headers("fa-manager"), intake_item(tn, station="FEEDA", courier="fa-courier1")
    )
    holder = auth.headers("fa-courier1", "PDA-FA1")
    _, cursor = pull_all(client, holder)
    colleague = auth.headers("fa-courier2", "PDA-FA2")
    consent = {"method": "locker", "channel": "in_person"}
    capture = ev(1, tn, "consent_captured", consent=consent)
    pushed = client.post(PUSH, json=factories.push_body("PDA-FA2", [capture]), headers=colleague)
    assert pushed.get_json()["results"][0]["status"] == "applied"

    changes, cursor = pull_all(client, holder, cursor)
    assert [c["tracking_no"] for c in changes] == [tn], "the holder never hears of the consent"
    assert [c["method"] for c in changes[-1]["parcel"]["consents"]] == ["locker"]

    void = ev(2, tn, "correction", voids_client_event_id=capture["client_event_id"], reason="x")
    pushed = client.post(PUSH, json=factories.push_body("PDA-FA2", [void]), headers=colleague)
    assert pushed.get_json()["results"][0]["status"] == "applied"
    changes, _ = pull_all(client, holder, cursor)
    assert [c["tracking_no"] for c in changes] == [tn], "the holder keeps a voided consent"
    assert changes[-1]["parcel"]["consents"] == []


@pytest.mark.parametrize(("tolerance", "flagged"), [(None, False), (0, True)])
def test_the_time_inversion_tolerance_is_configured(
    app_with: Callable[..., Flask],
    world: World,
    parcel: Parcel,
    tolerance: int | None,
    flagged: bool,
) -> None:
    """A scan dated a second before the one before it (NTP stepped the clock back): no
    time_inversion by default (TIME_INVERSION_TOLERANCE_SECONDS is 2), one with 0."""
    overrides = {} if tolerance is None else {"TIME_INVERSION_TOLERANCE_SECONDS": tolerance}
    client = app_with(**overrides).test_client()
    scan = now() - dt.timedelta(minutes=5)
    events = [
        ev(1, parcel.tracking_no, occurred_at=scan),
        ev(2, parcel.tracking_no, "out_for_delivery", occurred_at=scan - dt.timedelta(seconds=1)),
    ]
    receipt = Auth(client).push(events)
    kinds = {flag["kind"] for flag in receipt["flags_raised"]}
    assert ("time_inversion" in kinds) is flagged, receipt["flags_raised"]


def test_a_pda_that_sent_every_other_seq_costs_its_next_push_no_more_than_its_gaps(
    client: FlaskClient,
    session: Session,
    auth: Auth,
    courier: dict[str, str],
    parcel: Parcel,
) -> None:
    """A PDA (a stolen one, a broken app) sending every other seq leaves a gap per event:
    four pushes of 5,000 leave 20,000. Every later push compares the gaps before and
    after it, and a manager's write-off compares the seqs named with them: compared each
    with each, that cost a push some 40 s of a worker's processor while it held the PDA's
    lock (on SQLite, every PDA's turn to write), a write-off as long. Each now reads each
    gap a few times: counted, not timed, so a slow or loaded machine cannot fail it, and
    a sweep comparing each gap with each exceeds the budget within its first few gaps."""
    from models import DeviceSyncState

    assert push(client, courier, [ev(1, parcel.tracking_no)]).status_code == 200
    gaps = 20_000
    state = session.get(DeviceSyncState, "PDA-0001")
    assert state is not None
    state.max_seq = 2 * gaps + 1
    state.missing_ranges = [[2 * n, 2 * n] for n in range(1, gaps + 1)]
    state.acked_through_seq = 1
    session.commit()

    def counted(call: Callable[[], Any]) -> tuple[Any, RangeReads]:
        # A few sweeps of the gaps (each range read three times a sweep), never gaps².
        with RangeReads(budget=40 * gaps) as reads:
            response = call()
        assert 0 < reads.count <= reads.budget, reads
        return response, reads

    for seq in (2 * gaps + 2, 2):  # one beyond them all, one filling the first gap
        event = ev(seq, parcel.tracking_no, "out_for_delivery")
        response, reads = counted(lambda event=event: push(client, courier, [event]))
        assert response.status_code == 200, (response.get_json(), reads)
        # The sweeps did compare the gaps: a budget no push came near proves nothing.
        assert reads.count >= gaps, reads
    receipt = response.get_json()
    assert (receipt["acked_through_seq"], receipt["missing_seq_count"]) == (3, gaps - 1)
    named = [4 * n for n in range(1, 1001)]  # 1,000 of the gaps, written off
    response, reads = counted(
        lambda: client.post(
            "/api/v1/devices/PDA-0001/lost-seqs",
            json={"seqs": named, "reason": "PDA reset"},
            headers=auth.headers("manager1"),
        )
    )
    assert response.status_code == 201, (response.get_json(), reads)
    assert response.get_json()["missing_seq_count"] == gaps - 1 - len(named)
    assert reads.count >= gaps, reads


def test_the_push_rules_are_built_once_and_again_when_a_setting_changes(
    app: Flask,
    client: FlaskClient,
    courier: dict[str, str],
    parcel: Parcel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from courier_api.api.sync import routes
    from sync.tracking import TrackingNumberPolicy

    built: list[object] = []
    from_patterns = TrackingNumberPolicy.from_patterns

    def counted(patterns: Any) -> TrackingNumberPolicy:
        built.append(patterns)
        return from_patterns(patterns)

    monkeypatch.setattr(routes.TrackingNumberPolicy, "from_patterns", counted)
    domestic = "ZX12345"  # no default pattern takes it
    first = push(client, courier, [ev(1, parcel.tracking_no), ev(2, domestic)]).get_json()
    second = push(client, courier, [ev(3, parcel.tracking_no, "out_for_delivery")]).get_json()
    assert [r["status"] for r in first["results"] + second["results"]] == [
        "applied",
        "rejected",
        "applied",
    ]
    assert first["results"][1]["error"]["code"] == "invalid_tracking_no"
    assert len(built) == 1  # not once a push

    app.config["DOMESTIC_TRACKING_PATTERNS"] = (r"ZX\d{5}",)
    third = push(client, courier, [ev(4, domestic)]).get_json()
    assert len(built) == 2
    assert [r["status"] for r in third["results"]] == ["applied"]


def test_the_push_rules_read_no_setting_they_are_not_built_again_for(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rules are kept until one of ``_INGEST_SETTINGS`` changes: a rule made to read
    one more setting, not added to the list, would keep its first value in every test
    that changes it (and pass for the wrong reason). It is refused when built."""
    from courier_api.api.sync import routes

    policy_of = routes.policy_of

    def reading_one_more(config: Any) -> Any:
        config["DRIVING_SPEED_KMH"]  # noqa: B018 - read, as a new rule would
        return policy_of(config)

    monkeypatch.setattr(routes, "policy_of", reading_one_more)
    app.config["DRIVING_SPEED_KMH"] = 40
    app.extensions.pop("courier_api.ingest_rules", None)
    with app.app_context(), pytest.raises(KeyError, match="DRIVING_SPEED_KMH"):
        routes.ingest_rules()


def test_a_one_scan_push_looks_few_names_up_through_flasks_context_proxies(
    client: FlaskClient, courier: dict[str, str], parcel: Parcel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``request.path``, ``g.x``, ``current_app.config``: each name looked up through a
    context proxy first fails on the proxy (an ``AttributeError`` made, its message
    formatted) before its ``__getattr__`` finds it, some 9,000 instructions; a one-scan
    push looked up 53. The push's own code takes the objects out of their proxies once."""
    push(client, courier, [ev(1, parcel.tracking_no)])
    looked_up: list[str] = []

    def counted(proxy: LocalProxy, name: str) -> Any:
        looked_up.append(name)
        return getattr(proxy._get_current_object(), name)

    monkeypatch.setattr(LocalProxy, "__getattr__", counted)
    response = push(client, courier, [ev(2, parcel.tracking_no, "out_for_delivery")])
    monkeypatch.undo()
    assert response.status_code == 200
    assert [r["status"] for r in response.get_json()["results"]] == ["applied"]
    # None of the app's config, extensions or JSON provider (``Database._state``, the
    # body's limit read twice, the receipt's ``jsonify``): the rest are Flask's,
    # flask-smorest's and webargs' own, and the audit's client address (/healthz's too).
    assert not {"config", "extensions", "json"} & set(looked_up), sorted(looked_up)
    assert len(looked_up) <= 11, sorted(looked_up)


def test_a_plainly_valid_envelope_is_loaded_without_marshmallows_field_walk(
    client: FlaskClient, courier: dict[str, str], parcel: Parcel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """marshmallow's walk of the envelope's four fields (each field's missing, null,
    type and validator checks, the hooks looked up) was a one-scan push's largest piece
    of parsing: an envelope whose every field is plainly valid is read by
    ``PushRequest`` itself, to the same result."""
    import marshmallow as ma

    deserialized: list[str | None] = []
    deserialize = ma.fields.Field.deserialize

    def counted(
        field: ma.fields.Field, value: Any, attr: str | None = None, *a: Any, **k: Any
    ) -> Any:
        deserialized.append(attr)
        return deserialize(field, value, attr, *a, **k)

    monkeypatch.setattr(ma.fields.Field, "deserialize", counted)
    body = {**factories.push_body("PDA-0001", [ev(1, parcel.tracking_no)]), "app_version": "5.1"}
    response = client.post(PUSH, json=body, headers=courier)
    assert response.status_code == 200
    assert [r["status"] for r in response.get_json()["results"]] == ["applied"]
    assert [w["field"] for w in response.get_json()["warnings"]] == ["app_version"]
    assert deserialized == []
    # An envelope marshmallow must judge is still its to refuse, in its words.
    body = {**factories.push_body("PDA-0001", [ev(2, parcel.tracking_no)]), "batch_id": "x"}
    refused = client.post(PUSH, json=body, headers=courier)
    assert refused.status_code == 422
    assert refused.get_json()["errors"] == {"json": {"batch_id": ["Not a valid UUID."]}}
    assert "batch_id" in deserialized


def _envelopes() -> list[Any]:
    """Push envelopes, valid and not: each field missing, null, of another type, at its
    bounds, and past them."""
    valid = {
        "device_id": "PDA-0001",
        "batch_id": "9f1c0c7e-7f43-4c55-9d55-2d7f1b0e6a3b",
        "sent_at": "2026-12-05T08:00:00.123456+08:00",
        "events": [{"seq": 1}],
    }
    values: dict[str, list[Any]] = {
        "device_id": ["P", "P" * 64, "P" * 65, "", "PDA\x00", "PDA\ud800", 7, None, ["PDA"]],
        "batch_id": [
            "9F1C0C7E7F434C559D552D7F1B0E6A3B",
            "{9f1c0c7e-7f43-4c55-9d55-2d7f1b0e6a3b}",
            "urn:uuid:9f1c0c7e-7f43-4c55-9d55-2d7f1b0e6a3b",
            "not-a-uuid",
            "",
            12,
            None,
        ],
        "sent_at": [
            "2026-12-05T00:00:00Z",
            "2026-12-05",
            "2026-12-05T08:00:00",
            "yesterday",
            "9999-12-31T23:59:59-14:00",
            "2026-12-05T08:00:00+08:00" + " " * 64,
            1764892800,
            None,
        ],
        "events": [[], "events", {"0": {}}, None, 3],
    }
    envelopes: list[Any] = [valid, {}, [], "envelope", None, {**valid, "zone": 3, "Z": None}]
    for name, tried in values.items():
        envelopes += [{**valid, name: value} for value in tried]
        envelopes.append({key: value for key, value in valid.items() if key != name})
    return envelopes


@pytest.mark.parametrize("envelope", _envelopes())
def test_an_envelope_is_loaded_or_refused_as_marshmallow_loads_or_refuses_it(
    envelope: Any,
) -> None:
    import marshmallow as ma

    from courier_api.api.sync.schemas import PushRequest

    schema = PushRequest()
    try:
        expected: Any = ("loaded", ma.Schema.load(schema, envelope))
    except ma.ValidationError as error:
        expected = ("refused", error.normalized_messages())
    try:
        loaded: Any = ("loaded", schema.load(envelope))
    except ma.ValidationError as error:
        loaded = ("refused", error.normalized_messages())
    assert loaded == expected
    if loaded[0] == "loaded":
        assert list(loaded[1]) == list(expected[1])  # in the same order
        assert loaded[1]["events"] is envelope["events"]  # the events as received


class _Text(str):
    """A string of another type: marshmallow's to judge."""

    def __repr__(self) -> str:
        return f"_Text({super().__repr__()})"


class _Events(list):  # type: ignore[type-arg]
    """A list of another type: marshmallow's to judge."""

    def __repr__(self) -> str:
        return f"_Events({super().__repr__()})"


def _loaded_or_refused(load: Callable[[Any], Any], envelope: Any) -> tuple[Any, ...]:
    """What ``load`` makes of ``envelope``: its result, marshmallow's refusal, or what
    else it raised, each as comparable values."""
    import marshmallow as ma

    try:
        return ("loaded", load(envelope))
    except ma.ValidationError as error:
        return ("refused", error.normalized_messages(), error.valid_data)
    except Exception as error:  # noqa: BLE001  # raised alike is alike
        return ("raised", type(error), str(error))


def _envelope_strategy() -> Any:
    """Envelopes near and far from valid: each field a plausible or wrong value of any
    JSON type (bool for text, float and big ints, str subclasses, lone surrogates, NUL,
    every spelling of a UUID and of a time), fields missing, unknown keys, any order."""
    from hypothesis import strategies as st

    def spellings(value: uuid.UUID) -> Any:
        return st.sampled_from(
            [
                str(value),
                str(value).upper(),
                value.hex,
                f"{{{value}}}",
                f"urn:uuid:{value}",
                f" {value} ",
                value.hex[:8] + "_" + value.hex[8:31],
                str(value)[:-1],
                str(value) + "0",
            ]
        )

    times = st.datetimes(timezones=st.timezones()).map(lambda moment: moment.isoformat())
    naive_times = st.datetimes().map(lambda moment: moment.isoformat())
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(),
        st.text(max_size=4),
    )
    # Per field, what a PDA sends (nearly valid, at and past each bound), then anything.
    plausible = {
        "device_id": st.one_of(
            st.text(min_size=1, max_size=64),
            st.from_regex(r"[A-Z]{1,4}-[0-9]{1,6}", fullmatch=True),
            st.text(st.characters(codec="ascii"), min_size=62, max_size=66),
            st.sampled_from(["PDA-0001", "P", "", "PDA\x00", "PDA\ud800", "P" * 64, "P" * 65]),
        ),
        "batch_id": st.uuids().flatmap(spellings),
        "sent_at": st.one_of(
            times,
            times,
            naive_times,
            times.map(lambda text: text + " " * 40),
            st.sampled_from(
                ["2026-12-05T08:00:00Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-14:00"]
            ),
        ),
        "events": st.one_of(
            st.lists(st.dictionaries(st.text(max_size=3), scalars, max_size=2), max_size=3),
            st.lists(scalars, max_size=2),
            st.lists(scalars, max_size=2).map(_Events),
            st.tuples(scalars),
        ),
    }
    anything = st.one_of(
        scalars,
        st.binary(max_size=4),
        st.uuids(),
        st.dates().map(str),
        st.dictionaries(st.text(max_size=3), scalars, max_size=2),
    )
    extra = st.dictionaries(
        st.sampled_from(["app_version", "Device_id", "events ", "ignored_fields", "x"]),
        scalars,
        max_size=2,
    )

    @st.composite
    def envelope(draw: Any) -> Any:
        fields = {}
        for name, strategy in plausible.items():
            choice = draw(st.integers(0, 15))  # mostly plausible: all four must be valid
            if choice == 0:
                continue  # left out
            fields[name] = draw(anything if choice == 1 else strategy)
            if choice == 2 and type(fields[name]) is str:  # of another type
                fields[name] = _Text(fields[name])
        items = list({**draw(extra), **fields}.items())
        ordered = draw(st.permutations(items))
        kind = draw(st.sampled_from([dict, dict, dict, dict, OrderedDict]))
        return kind(ordered)

    return st.one_of(envelope(), envelope(), envelope(), scalars, st.lists(scalars, max_size=2))


def test_any_envelope_is_loaded_or_refused_as_marshmallow_loads_or_refuses_it() -> None:
    """``PushRequest.load``'s own reading of a plainly valid envelope, as a property:
    over generated envelopes, the same result (the same values, keys in the same order,
    the events and device id the objects received) or the same refusal, in the same
    words, or the same exception, as marshmallow's own load."""
    import marshmallow as ma
    from hypothesis import HealthCheck, given, settings

    from courier_api.api.sync.schemas import PushRequest

    schema = PushRequest()

    @settings(
        max_examples=2_000,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    @given(envelope=_envelope_strategy())
    def loaded_alike(envelope: Any) -> None:
        expected = _loaded_or_refused(lambda data: ma.Schema.load(schema, data), envelope)
        loaded = _loaded_or_refused(schema.load, envelope)
        assert loaded == expected
        if loaded[0] == "loaded":
            assert type(loaded[1]) is type(expected[1])
            assert list(loaded[1]) == list(expected[1])
            for name in ("device_id", "events"):  # the objects received, or copies alike
                received = envelope[name]
                assert (loaded[1][name] is received) == (expected[1][name] is received)
                assert type(loaded[1][name]) is type(expected[1][name])

    loaded_alike()


@pytest.mark.parametrize(
    "options",
    [
        {"unknown": "raise"},
        {"only": ("device_id", "batch_id", "sent_at")},
        {"exclude": ("events",)},
        {"dump_only": ("events",)},
        {"partial": True},
        {},
    ],
)
def test_a_push_request_made_with_options_loads_as_marshmallow_loads_it(
    options: dict[str, Any],
) -> None:
    """The envelope's own reading knows only the plain schema: one made to refuse an
    unknown key, or to read fewer fields, refused or read what marshmallow would not
    (an ``app_version`` taken, ``events`` loaded though excluded)."""
    import marshmallow as ma

    from courier_api.api.sync.schemas import PushRequest

    envelope = {**factories.push_body("PDA-0001", []), "app_version": "5.1"}
    schema = PushRequest(**options)
    expected = _loaded_or_refused(lambda data: ma.Schema.load(schema, data), envelope)
    assert _loaded_or_refused(schema.load, envelope) == expected
