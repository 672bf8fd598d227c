"""Consent requests over HTTP: asking online, answering through POST /consents, and the
answer reaching the PDA through its pull feed (long-polled)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from courier_api.extensions import db
from models import AuditEntry, ConsentRequest
from sync import request_reach
from tests import factories
from tests.conftest import Auth, World

REQUESTS = "/api/v1/consents/requests"
CONSENTS = "/api/v1/consents"
PULL = "/api/v1/sync/pull"


@pytest.fixture
def courier(auth: Auth, world: World) -> dict[str, str]:
    return auth.headers("courier1", "PDA-0001")


@pytest.fixture
def channel(auth: Auth, world: World) -> dict[str, str]:
    return auth.headers("app1")


@pytest.fixture
def parcel(session: Session, world: World) -> str:
    tracking_no = factories.parcel(session, world.station).tracking_no
    session.commit()
    return tracking_no


def ask(client: FlaskClient, headers: dict[str, str], tracking_no: str, **body: Any) -> Any:
    body.setdefault("method", "locker")
    return client.post(REQUESTS, json={"tracking_no": tracking_no, **body}, headers=headers)


def test_a_courier_asks_online_and_the_channel_grants(
    client: FlaskClient, courier: dict[str, str], channel: dict[str, str], parcel: str
) -> None:
    asked = ask(client, courier, parcel, point_id="L-3", channel="sms")
    assert asked.status_code == 201, asked.get_json()
    request = asked.get_json()
    assert (request["status"], request["method"], request["point_id"]) == (
        "pending",
        "locker",
        "L-3",
    )
    assert request["device_id"] == "PDA-0001" and request["event_id"] is None
    granted = client.post(
        CONSENTS, json={"request_id": request["id"], "channel": "sms"}, headers=channel
    )
    assert granted.status_code == 201, granted.get_json()
    consent = granted.get_json()
    assert (consent["tracking_no"], consent["method"], consent["point_id"]) == (
        parcel,
        "locker",
        "L-3",
    )
    assert consent["request"]["status"] == "granted"
    assert consent["request"]["consent_id"] == consent["id"]
    assert consent["recipient_phone"] != "+8613812345678"  # masked for the channel too
    again = client.post(
        CONSENTS, json={"request_id": request["id"], "channel": "sms"}, headers=channel
    )
    assert again.status_code == 201 and again.get_json()["id"] == consent["id"]
    refusal = client.post(
        CONSENTS,
        json={"request_id": request["id"], "channel": "sms", "granted": False},
        headers=channel,
    )
    assert refusal.status_code == 409
    assert refusal.get_json()["code"] == "consent_request_answered"
    seen = client.get(f"{REQUESTS}/{request['id']}", headers=courier).get_json()
    assert seen["status"] == "granted"


def test_the_point_asked_is_trimmed_as_a_pdas_drop_names_it(
    client: FlaskClient, courier: dict[str, str], channel: dict[str, str], parcel: str
) -> None:
    """The consent answering the request keeps the point asked: " l-3 " would match no
    drop, whose locker id the PDA sends trimmed (and is stored upper-case)."""
    request = ask(client, courier, parcel, point_id=" l-3 ").get_json()
    assert request["point_id"] == "L-3"
    granted = client.post(
        CONSENTS, json={"request_id": request["id"], "channel": "sms"}, headers=channel
    )
    assert granted.get_json()["point_id"] == "L-3"
    assert ask(client, courier, parcel, point_id=" ").get_json()["code"] == "blank_point_id"


def typed(tracking_no: str) -> str:
    """The number as a person types it off a label: lower case, a space, a dash."""
    return f"{tracking_no[:2].lower()} {tracking_no[2:6]}-{tracking_no[6:]}"


def test_a_tracking_number_typed_by_a_person_matches_the_parcel(
    client: FlaskClient,
    auth: Auth,
    courier: dict[str, str],
    channel: dict[str, str],
    parcel: str,
) -> None:
    """An answer that names the parcel, and the lists filtered by it, compare the number
    as intake stores it, not as typed."""
    request = ask(client, courier, parcel).get_json()
    answer = {"request_id": request["id"], "channel": "sms", "tracking_no": typed(parcel)}
    granted = client.post(CONSENTS, json=answer, headers=channel)
    assert granted.status_code == 201, granted.get_json()
    for url in (CONSENTS, REQUESTS):
        found = client.get(
            url, query_string={"tracking_no": typed(parcel)}, headers=auth.headers("manager1")
        )
        assert found.status_code == 200, found.get_json()
        assert [item["tracking_no"] for item in found.get_json()["items"]] == [parcel]


def test_a_refusal_answers_200_with_the_request(
    client: FlaskClient, courier: dict[str, str], channel: dict[str, str], parcel: str
) -> None:
    request = ask(client, courier, parcel).get_json()
    refused = client.post(
        CONSENTS,
        json={"request_id": request["id"], "channel": "app", "granted": False, "reason": "no"},
        headers=channel,
    )
    assert refused.status_code == 200, refused.get_json()
    assert (refused.get_json()["status"], refused.get_json()["status_reason"]) == (
        "refused",
        "no",
    )
    assert refused.get_json()["answered_channel"] == "app"
    assert request["answered_channel"] is None  # not answered yet


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"scope": "standing"}, "field_not_expected", "scope"),
        ({"recipient_phone": "13812345678"}, "field_not_expected", "recipient_phone"),
        ({"tracking_no": "RR473124829GB"}, "tracking_no_mismatch", "tracking_no"),
    ],
)
def test_an_answer_with_fields_that_do_not_fit_the_request_is_refused(
    client: FlaskClient,
    courier: dict[str, str],
    channel: dict[str, str],
    parcel: str,
    body: dict[str, Any],
    code: str,
    field: str,
) -> None:
    request = ask(client, courier, parcel).get_json()
    response = client.post(
        CONSENTS, json={"request_id": request["id"], "channel": "sms", **body}, headers=channel
    )
    assert response.status_code == 422, response.get_json()
    assert response.get_json()["code"] == code and field in response.get_json()["errors"]


def test_answers_to_unknown_lapsed_or_unsent_requests(
    client: FlaskClient, courier: dict[str, str], channel: dict[str, str], parcel: str
) -> None:
    missing = client.post(CONSENTS, json={"request_id": 99999, "channel": "sms"}, headers=channel)
    assert missing.status_code == 404
    assert missing.get_json()["code"] == "consent_request_not_found"
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)).isoformat()
    lapsing = ask(client, courier, parcel, expires_at=soon).get_json()
    time.sleep(1.1)
    late = client.post(
        CONSENTS, json={"request_id": lapsing["id"], "channel": "sms"}, headers=channel
    )
    assert late.status_code == 409 and late.get_json()["code"] == "consent_request_expired"
    assert client.get(f"{REQUESTS}/{lapsing['id']}", headers=channel).get_json()["status"] == (
        "expired"
    )
    unsent = ask(client, courier, factories.s10()).get_json()
    assert unsent["status"] == "unsent"
    answered = client.post(
        CONSENTS, json={"request_id": unsent["id"], "channel": "sms"}, headers=channel
    )
    assert answered.status_code == 409
    assert answered.get_json()["code"] == "consent_request_unsent"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"method": "drone"}, "method"),
        ({"method": "any", "point_id": "L-1"}, "point_id"),
        ({"channel": "in_person"}, "channel"),
        ({"expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
        ({"tracking_no": "nope"}, "tracking_no"),
    ],
)
def test_bad_requests_are_422_naming_the_field(
    client: FlaskClient, courier: dict[str, str], parcel: str, body: dict[str, Any], field: str
) -> None:
    response = ask(client, courier, body.pop("tracking_no", parcel), **body)
    assert response.status_code == 422, response.get_json()
    error = response.get_json()
    assert field in str(error.get("errors")), error


@pytest.mark.parametrize("missing", ["method", "granted_at"])
def test_method_and_granted_at_are_still_required_for_a_consent_that_answers_no_request(
    client: FlaskClient, channel: dict[str, str], parcel: str, missing: str
) -> None:
    body = {
        "tracking_no": parcel,
        "method": "any",
        "channel": "app",
        "granted_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    del body[missing]
    response = client.post(CONSENTS, json=body, headers=channel)
    assert response.status_code == 422 and missing in response.get_json()["errors"]


def test_a_refusal_that_answers_no_request_is_422_and_grants_nothing(
    client: FlaskClient, channel: dict[str, str], parcel: str
) -> None:
    """Without a request_id, ``granted: false`` has nothing to answer; storing the rest
    of the body as a consent would grant what the recipient refused."""
    response = client.post(
        CONSENTS,
        json={
            "tracking_no": parcel,
            "method": "locker",
            "channel": "app",
            "granted_at": dt.datetime.now(dt.UTC).isoformat(),
            "granted": False,
            "reason": "recipient said no",
        },
        headers=channel,
    )
    assert response.status_code == 422
    assert response.get_json()["code"] == "refusal_without_request"
    assert list(response.get_json()["errors"]) == ["granted"]
    assert client.get(CONSENTS, headers=channel).get_json()["items"] == []


def test_who_may_ask_and_read(
    client: FlaskClient, auth: Auth, world: World, courier: dict[str, str], parcel: str
) -> None:
    request = ask(client, courier, parcel).get_json()
    for username in ("manager1", "admin", "app1", "auditor1"):
        assert ask(client, auth.headers(username), parcel).status_code == 403
    assert client.post(REQUESTS, json={"tracking_no": parcel}).status_code == 401
    url = f"{REQUESTS}/{request['id']}"
    assert client.get(url, headers=auth.headers("manager1")).status_code == 200
    assert client.get(url, headers=auth.headers("manager2")).status_code == 404  # not theirs
    assert client.get(url, headers=auth.headers("auditor1")).status_code == 200
    listed = client.get(REQUESTS, headers=auth.headers("manager2")).get_json()
    assert listed["items"] == []
    mine = client.get(f"{REQUESTS}?status=pending", headers=courier).get_json()
    assert [r["id"] for r in mine["items"]] == [request["id"]]


def test_a_request_whose_parcel_is_taken_in_elsewhere_is_seen_there(
    client: FlaskClient,
    auth: Auth,
    session: Session,
    world: World,
    courier: dict[str, str],
    parcel: str,
) -> None:
    """A courier of ST1 asks about an ST1 parcel: the request is ST1's. ST2 then takes
    the parcel in (its courier will deliver it): its manager lists and reads the
    request; ST1's still does (its courier asked); a third station's does not."""
    request = ask(client, courier, parcel).get_json()
    third = factories.station(session, code="ST3")
    factories.user(session, "manager3", "station_manager", third)
    session.commit()
    moved = client.post(
        "/api/v1/parcels",
        json={
            "parcels": [
                {
                    "tracking_no": parcel,
                    "service_class": "express",
                    "recipient_name": "Recipient",
                    "recipient_phone": "+8613812345678",
                    "address": "1 Century Ave",
                    "station": "ST2",
                }
            ]
        },
        headers=auth.headers("admin"),
    )
    assert moved.status_code == 200 and moved.get_json()["counts"]["rejected"] == 0

    def listed(manager: str) -> list[int]:
        page = client.get(
            REQUESTS, query_string={"tracking_no": parcel}, headers=auth.headers(manager)
        )
        assert page.status_code == 200
        return [r["id"] for r in page.get_json()["items"]]

    assert listed("manager2") == [request["id"]]  # the parcel's station now
    assert listed("manager1") == [request["id"]]  # its courier asked
    assert listed("manager3") == []
    read = {
        m: client.get(f"{REQUESTS}/{request['id']}", headers=auth.headers(m)).status_code
        for m in ("manager1", "manager2", "manager3")
    }
    assert read == {"manager1": 200, "manager2": 200, "manager3": 404}
    mine = client.get(REQUESTS, headers=courier).get_json()
    assert [r["id"] for r in mine["items"]] == [request["id"]]


def test_the_answer_appears_in_the_pdas_pull_feed(committed_app: Flask) -> None:
    """With real commits: on PostgreSQL the feed shows only committed transactions."""
    client, courier, channel, parcel = _committed_world(committed_app)
    push = client.post(
        "/api/v1/sync/push",
        json=factories.push_body("PDA-WAIT", [factories.event(1, parcel)]),
        headers=courier,
    )
    assert push.status_code == 200
    cursor = _drain(client, courier)
    request = ask(client, courier, parcel).get_json()
    client.post(CONSENTS, json={"request_id": request["id"], "channel": "sms"}, headers=channel)
    page = client.get(f"{PULL}?cursor={cursor}", headers=courier).get_json()
    kinds = [change["kind"] for change in page["changes"]]
    assert "consent_request" in kinds and "consent" in kinds
    entry = next(c for c in page["changes"] if c["kind"] == "consent_request")
    [seen] = entry["parcel"]["consent_requests"]
    assert (seen["id"], seen["status"]) == (request["id"], "granted")
    assert entry["parcel"]["consents"][0]["method"] == "locker"
    assert seen["not_reached"] is None  # answered: it reached the recipient


def test_the_pda_hears_at_once_that_nobody_takes_its_question(committed_app: Flask) -> None:
    """No recipient channel subscribes to ``consent.requested``: the recipient is never
    asked, and the courier used to wait at the door until the request lapsed, reading
    ``pending``. The ask itself puts the parcel in the pull feed, saying why; once the
    request lapsed, that the recipient was never asked."""
    client, courier, _channel, parcel = _committed_world(committed_app)
    push = client.post(
        "/api/v1/sync/push",
        json=factories.push_body("PDA-WAIT", [factories.event(1, parcel)]),
        headers=courier,
    )
    assert push.status_code == 200
    cursor = _drain(client, courier)
    request = ask(client, courier, parcel).get_json()
    page = client.get(f"{PULL}?cursor={cursor}", headers=courier).get_json()
    entry = next(c for c in page["changes"] if c["kind"] == "consent_request")
    [seen] = entry["parcel"]["consent_requests"]
    assert (seen["id"], seen["status"]) == (request["id"], "pending")
    assert seen["not_reached"] == request_reach.NO_CHANNEL
    with committed_app.app_context():
        stored = db.session.get_one(ConsentRequest, request["id"])
        earlier = dt.timedelta(minutes=40)  # asked 40 minutes ago
        stored.created_at -= earlier
        stored.requested_at -= earlier
        stored.expires_at -= earlier
        db.session.commit()
    page = client.get(PULL, headers=courier).get_json()
    [seen] = next(c for c in page["changes"] if c["tracking_no"] == parcel)["parcel"][
        "consent_requests"
    ]
    assert seen["status"] == "expired"
    assert seen["not_reached"].startswith(request_reach.NEVER)


def test_a_request_whose_consent_is_revoked_reads_revoked_to_the_channel_and_the_pda(
    committed_app: Flask,
) -> None:
    """The recipient said yes, then took it back: the request no longer reads
    ``granted`` (to the integrator listing requests nor in the PDA's pull feed, which
    hears of it), but ``revoked`` at the consent's ``revoked_at``. The channel's retry
    of its grant answers the same revoked consent; a refusal now is still a 409."""
    client, courier, channel, parcel = _committed_world(committed_app)
    push = client.post(
        "/api/v1/sync/push",
        json=factories.push_body("PDA-WAIT", [factories.event(1, parcel)]),
        headers=courier,
    )
    assert push.status_code == 200
    request = ask(client, courier, parcel).get_json()
    answer = {"request_id": request["id"], "channel": "sms"}
    consent = client.post(CONSENTS, json=answer, headers=channel).get_json()
    cursor = _drain(client, courier)
    revoked = client.post(
        f"{CONSENTS}/{consent['id']}/revoke", json={"reason": "at home"}, headers=channel
    ).get_json()
    seen = client.get(f"{REQUESTS}/{request['id']}", headers=channel).get_json()
    assert (seen["status"], seen["revoked_at"]) == ("revoked", revoked["revoked_at"])
    listed = client.get(f"{REQUESTS}?status=revoked", headers=channel).get_json()["items"]
    assert [r["id"] for r in listed] == [request["id"]]
    assert client.get(f"{REQUESTS}?status=granted", headers=channel).get_json()["items"] == []
    page = client.get(f"{PULL}?cursor={cursor}", headers=courier).get_json()
    entry = next(c for c in page["changes"] if c["kind"] == "consent_request")
    [pda] = entry["parcel"]["consent_requests"]
    assert (pda["status"], pda["revoked_at"]) == ("revoked", revoked["revoked_at"])
    assert entry["parcel"]["consents"] == []
    again = client.post(CONSENTS, json=answer, headers=channel)
    assert again.status_code == 201 and again.get_json()["id"] == consent["id"]
    assert again.get_json()["request"]["status"] == "revoked"
    refusal = client.post(CONSENTS, json={**answer, "granted": False}, headers=channel)
    assert refusal.get_json()["code"] == "consent_request_answered"


def _committed_world(app: Flask) -> tuple[FlaskClient, dict[str, str], dict[str, str], str]:
    with app.app_context():
        session = db.session
        station = factories.station(session, code="WAIT")
        factories.user(session, "waiter", "courier", station)
        factories.user(session, "gateway", "integration")
        factories.device(session, "PDA-WAIT", station)
        tracking_no = factories.parcel(session, station).tracking_no
        session.commit()
    client = app.test_client()
    return (
        client,
        Auth(client).headers("waiter", "PDA-WAIT"),
        Auth(client).headers("gateway"),
        tracking_no,
    )


def _drain(client: FlaskClient, headers: dict[str, str], cursor: str = "") -> str:
    while True:
        page = client.get(f"{PULL}?cursor={cursor}", headers=headers).get_json()
        cursor = page["next_cursor"]
        if not page["has_more"]:
            return cursor


def test_a_long_pull_waits_for_the_answer_and_an_idle_one_times_out(
    committed_app: Flask,
) -> None:
    """(On PostgreSQL a transaction left open elsewhere on the server holds the feed
    back, and this with it: see README, "Against PostgreSQL".)"""
    client, courier, channel, tracking_no = _committed_world(committed_app)
    cursor = _drain(client, courier)
    started = time.monotonic()
    idle = client.get(f"{PULL}?cursor={cursor}&wait=1", headers=courier).get_json()
    assert idle["changes"] == [] and time.monotonic() - started >= 0.9
    request = ask(client, courier, tracking_no).get_json()
    # No channel subscribed here: the ask itself told the PDA nobody takes its question.
    cursor = _drain(client, courier, cursor)
    answered: dict[str, Any] = {}

    def grant_soon() -> None:
        time.sleep(0.6)
        answered["response"] = committed_app.test_client().post(
            CONSENTS, json={"request_id": request["id"], "channel": "sms"}, headers=channel
        )

    thread = threading.Thread(target=grant_soon)
    started = time.monotonic()
    thread.start()
    page = client.get(f"{PULL}?cursor={cursor}&wait=20", headers=courier).get_json()
    waited = time.monotonic() - started
    thread.join(timeout=30)
    assert answered["response"].status_code == 201
    assert 0.5 <= waited < 10, waited
    assert "consent_request" in [change["kind"] for change in page["changes"]]


def test_a_courier_asking_about_another_stations_parcel_learns_nothing_nor_may_answer(
    client: FlaskClient, session: Session, world: World, courier: dict[str, str], parcel: str
) -> None:
    """Asked for online, another station's parcel is answered as one taken in nowhere: a
    request of the courier's station, unsent for the same reason, sent to nobody (a 403
    would tell the courier the parcel exists: SECURITY.md threat 3)."""
    foreign = factories.parcel(session, world.other_station).tracking_no
    session.commit()
    answers = [ask(client, courier, tracking_no) for tracking_no in (foreign, factories.s10())]
    assert [answer.status_code for answer in answers] == [201, 201]
    apart = ("id", "tracking_no", "requested_at", "expires_at")
    seen = [{k: v for k, v in a.get_json().items() if k not in apart} for a in answers]
    assert seen[0] == seen[1]
    assert seen[0]["status"] == "unsent" and seen[0]["station_id"] == world.station.id
    request = ask(client, courier, parcel).get_json()
    answer = client.post(
        CONSENTS, json={"request_id": request["id"], "channel": "sms"}, headers=courier
    )
    assert answer.status_code == 403


def test_a_long_pull_waits_no_longer_than_the_configured_bound(
    app_with: Any, world: World
) -> None:
    app = app_with(MAX_PULL_WAIT_SECONDS=1)
    client = app.test_client()
    courier = Auth(client).headers("courier1", "PDA-0001")
    cursor = _drain(client, courier)
    started = time.monotonic()
    page = client.get(f"{PULL}?cursor={cursor}&wait=3600", headers=courier)
    assert page.status_code == 200 and page.get_json()["changes"] == []
    assert time.monotonic() - started < 3


def test_when_every_waiting_place_is_taken_a_long_pull_answers_at_once(
    app: Flask, client: FlaskClient, courier: dict[str, str]
) -> None:
    from courier_api.api.sync.routes import _waiting_room

    cursor = _drain(client, courier)
    with app.app_context():
        room = _waiting_room()
        for _ in range(app.config["MAX_PULL_WAITERS"]):
            assert room.acquire(blocking=False)  # PDAs already waiting at doors
        try:
            started = time.monotonic()
            page = client.get(f"{PULL}?cursor={cursor}&wait=5", headers=courier)
            assert page.status_code == 200 and time.monotonic() - started < 1
        finally:
            for _ in range(app.config["MAX_PULL_WAITERS"]):
                room.release()
    started = time.monotonic()
    client.get(f"{PULL}?cursor={cursor}&wait=1", headers=courier)
    assert time.monotonic() - started >= 0.9  # with a place free, it waits


def test_a_phone_in_a_refusals_reason_is_masked_except_for_auditors(
    client: FlaskClient,
    auth: Auth,
    courier: dict[str, str],
    channel: dict[str, str],
    parcel: str,
) -> None:
    """The recipient refuses and says to call another number: the courier, the manager
    and the channel read the reason masked, as the recipient's phone; an auditor whole."""
    request = ask(client, courier, parcel).get_json()
    refused = client.post(
        CONSENTS,
        json={
            "request_id": request["id"], "channel": "sms", "granted": False,
            "reason": "not home, call my wife 13912345678",
        },
        headers=channel,
    )  # fmt: skip
    assert refused.status_code == 200, refused.get_json()
    assert refused.get_json()["status_reason"] == "not home, call my wife ********678"
    readers = {
        "courier1": courier,
        "manager1": auth.headers("manager1"),
        "app1": channel,
        "auditor1": auth.headers("auditor1"),
    }
    for username, headers in readers.items():
        one = client.get(f"{REQUESTS}/{request['id']}", headers=headers).get_json()
        (listed,) = client.get(REQUESTS, headers=headers).get_json()["items"]
        shown = "13912345678" if username == "auditor1" else "********678"
        expected = f"not home, call my wife {shown}"
        assert one["status_reason"] == listed["status_reason"] == expected, username


def test_requests_are_listed_by_the_status_each_shows(
    client: FlaskClient, auth: Auth, world: World, session: Session
) -> None:
    """A gateway reconciling what it still has to put to recipients: ``pending`` lists
    the requests still waiting, not one that lapsed (shown ``expired``), and every
    status a request shows can be listed."""
    waiting, lapsing = (factories.parcel(session, world.station) for _ in range(2))
    session.commit()
    courier = auth.headers("courier1", "PDA-0001")
    ids = {}
    for parcel in (waiting, lapsing):
        asked = client.post(
            REQUESTS, json={"tracking_no": parcel.tracking_no, "method": "locker"}, headers=courier
        )
        assert asked.status_code == 201, asked.get_json()
        ids[parcel.tracking_no] = asked.get_json()["id"]
    session.execute(
        update(ConsentRequest)
        .where(ConsentRequest.id == ids[lapsing.tracking_no])
        .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
    )
    session.commit()
    gateway = auth.headers("app1")

    def listed(status: str) -> list[tuple[int, str]]:
        page = client.get(REQUESTS, query_string={"status": status}, headers=gateway)
        assert page.status_code == 200, page.get_json()
        return [(item["id"], item["status"]) for item in page.get_json()["items"]]

    assert listed("pending") == [(ids[waiting.tracking_no], "pending")]
    assert listed("expired") == [(ids[lapsing.tracking_no], "expired")]
    assert listed("cancelled") == listed("granted") == []


def standing_consent(
    client: FlaskClient,
    channel: dict[str, str],
    parcel: Any,
    granted_at: dt.datetime | None = None,
) -> int:
    """A standing consent of ``parcel``'s recipient at its address, any method, given
    through ``channel`` (by default ten days ago): its id."""
    granted_at = granted_at or dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    answer = client.post(
        CONSENTS,
        json={
            "scope": "standing",
            "recipient_phone": parcel.recipient_phone,
            "address": parcel.address,
            "method": "any",
            "channel": "app",
            "granted_at": granted_at.isoformat(),
        },
        headers=channel,
    )
    assert answer.status_code == 201, answer.get_json()
    consent_id: int = answer.get_json()["id"]
    return consent_id


def _refuse(
    client: FlaskClient, courier: dict[str, str], channel: dict[str, str], tracking_no: str
) -> None:
    asked = ask(client, courier, tracking_no, channel="sms").get_json()
    body = {"request_id": asked["id"], "granted": False, "channel": "sms"}
    refusal = client.post(CONSENTS, json={**body, "reason": "home, ring"}, headers=channel)
    assert refusal.get_json()["status"] == "refused", refusal.get_json()


def _drop_flags(auth: Auth, tracking_no: str, at: dt.datetime) -> dict[str, Any]:
    receipt = auth.push(
        [
            factories.event(1, tracking_no, occurred_at=at - dt.timedelta(minutes=30)),
            factories.locker_drop(2, tracking_no, at),
        ]
    )
    return {f["kind"]: f for f in receipt["flags_raised"]}


def test_a_refusal_withdraws_for_its_parcel_the_standing_consent_given_before(
    client: FlaskClient,
    auth: Auth,
    session: Session,
    world: World,
    courier: dict[str, str],
    channel: dict[str, str],
) -> None:
    """The courier asks at the door; the recipient, who long ago gave a standing consent,
    answers "no, I am home, ring the bell"; the courier leaves the parcel in a locker
    anyway. The standing consent authorized that drop, and the proof said so: an auditor
    settling "left in a locker although I said no" was told all was in order. Now the
    drop is flagged, the flag says when the recipient refused, and the proof names no
    authorizing consent. The standing consent still covers the recipient's other
    parcels."""
    parcel = factories.parcel(session, world.station)
    other = factories.parcel(session, world.station)
    session.commit()
    standing = standing_consent(client, channel, parcel)
    _refuse(client, courier, channel, parcel.tracking_no)
    flags = _drop_flags(auth, parcel.tracking_no, dt.datetime.now(dt.UTC))
    flag = client.get(
        f"/api/v1/flags/{flags['unauthorized_locker_drop']['flag_id']}",
        headers=auth.headers("manager1"),
    ).get_json()
    assert flag["evidence"]["consent_ids"] == [standing]
    assert len(flag["evidence"]["refused_at"]) == 1
    auditor = auth.headers("auditor1")
    proofs = client.get(
        "/api/v1/proofs", query_string={"tracking_no": parcel.tracking_no}, headers=auditor
    ).get_json()["items"]
    assert [p["authorizing_consent"] for p in proofs] == [None]
    assert "unauthorized_locker_drop" not in _drop_flags(
        auth, other.tracking_no, dt.datetime.now(dt.UTC)
    )


def test_a_drop_before_the_refusal_stays_authorized_and_a_consent_after_it_authorizes(
    client: FlaskClient,
    auth: Auth,
    session: Session,
    world: World,
    courier: dict[str, str],
    channel: dict[str, str],
) -> None:
    """The refusal reaches back to no drop made before it (as a revocation does not);
    a consent the recipient gives after refusing (they changed their mind) counts."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    standing_consent(client, channel, parcel)
    before = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2)
    assert "unauthorized_locker_drop" not in _drop_flags(auth, parcel.tracking_no, before)
    _refuse(client, courier, channel, parcel.tracking_no)
    tn = parcel.tracking_no
    flags = client.get(
        "/api/v1/flags", query_string={"kind": "unauthorized_locker_drop"},
        headers=auth.headers("manager1"),
    ).get_json()["items"]  # fmt: skip
    assert [f for f in flags if f["subject_key"] == tn and f["status"] == "open"] == []
    granted = client.post(
        CONSENTS,
        json={
            "tracking_no": tn,
            "method": "locker",
            "channel": "app",
            "granted_at": dt.datetime.now(dt.UTC).isoformat(),
        },
        headers=channel,
    )
    assert granted.status_code == 201
    later = factories.locker_drop(3, tn, dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1))
    receipt = auth.push([later])
    assert "unauthorized_locker_drop" not in {f["kind"] for f in receipt["flags_raised"]}


def test_a_recipients_refusal_of_consent_is_on_the_audit_log(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """Recording or revoking a consent goes to the audit log (`consent_granted`,
    `consent_revoked`) because it decides whether a locker drop was authorized. A
    recipient's refusal of a courier's request now decides that too: it withdraws, for
    the parcel, every consent given before it (`refused_at`). Yet it leaves no audit
    entry: it lives only in the parcel's mutable `consent_refusals` and the request's
    row. The auditor settling "I said no and it went to the locker anyway" cannot show
    who recorded the refusal and when, nor tell a refusal erased or added since."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    asked = ask(client, auth.headers("courier1", "PDA-0001"), parcel.tracking_no, channel="sms")
    assert asked.status_code == 201, asked.get_json()
    refused = client.post(
        CONSENTS,
        json={"request_id": asked.get_json()["id"], "granted": False, "channel": "sms",
              "reason": "I am home, ring the bell or call 13912345678"},
        headers=auth.headers("app1"),
    )  # fmt: skip
    assert refused.get_json()["status"] == "refused", refused.get_json()
    entries = session.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
    about = [
        (e.action, e.actor_id)
        for e in entries
        if parcel.tracking_no in str(e.details) or e.subject_key == parcel.tracking_no
    ]
    assert about == [("consent_refused", world.integration.id)], about
    query = {"subject_type": "consent_request", "subject_key": str(asked.get_json()["id"])}
    (entry,) = client.get(
        "/api/v1/audit", query_string=query, headers=auth.headers("auditor1")
    ).get_json()["items"]
    details = entry["details"]
    assert (details["tracking_no"], details["channel"]) == (parcel.tracking_no, "sms")
    assert details["request_id"] == asked.get_json()["id"]  # as a grant's entry names it
    assert details["reason"] == "I am home, ring the bell or call 13912345678"
    assert dt.datetime.fromisoformat(details["refused_at"]) == dt.datetime.fromisoformat(
        refused.get_json()["answered_at"]
    )
    masked = client.get("/api/v1/audit", query_string=query, headers=auth.headers("admin"))
    assert "13912345678" not in masked.get_data(as_text=True)
    client.post(  # the channel retrying: nothing new to log
        CONSENTS,
        json={"request_id": asked.get_json()["id"], "granted": False, "channel": "sms"},
        headers=auth.headers("app1"),
    )
    assert len(session.scalars(select(AuditEntry)).all()) == len(entries)


def test_a_consent_granted_in_answer_to_a_request_names_the_request_on_the_audit_log(
    client: FlaskClient,
    auth: Auth,
    courier: dict[str, str],
    channel: dict[str, str],
    parcel: str,
) -> None:
    """The channel answers the courier's request "yes" with its own evidence (the SMS
    as received). The `consent_granted` entry named the request only in the default
    evidence, written when the channel sent none: with evidence of its own, nothing on
    the tamper-evident log tied the consent to the question the courier asked (when,
    for which point), which the request's row alone, changeable, still said. A consent
    that answers no request names none."""
    asked = ask(client, courier, parcel, channel="sms").get_json()
    granted = client.post(
        CONSENTS,
        json={"request_id": asked["id"], "channel": "sms", "evidence": "SMS reply: YES"},
        headers=channel,
    )
    assert granted.status_code == 201, granted.get_json()
    auditor = auth.headers("auditor1")
    query = {"action": "consent_granted", "subject_type": "consent"}
    (entry,) = client.get(
        "/api/v1/audit",
        query_string={**query, "subject_key": str(granted.get_json()["id"])},
        headers=auditor,
    ).get_json()["items"]
    assert entry["details"]["request_id"] == asked["id"]
    assert entry["details"]["evidence"] == "SMS reply: YES"
    unasked = client.post(
        CONSENTS,
        json={
            "tracking_no": parcel,
            "method": "any",
            "channel": "app",
            "granted_at": dt.datetime.now(dt.UTC).isoformat(),
        },
        headers=channel,
    )
    assert unasked.status_code == 201, unasked.get_json()
    (entry,) = client.get(
        "/api/v1/audit",
        query_string={**query, "subject_key": str(unasked.get_json()["id"])},
        headers=auditor,
    ).get_json()["items"]
    assert "request_id" not in entry["details"]


def test_consents_in_force_for_a_parcel_leave_out_one_its_recipient_refused(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """The recipient gave a standing consent, then answered the courier's request "no,
    ring the bell". For that parcel the standing consent is withdrawn: the proof of a
    later drop names no authorizing consent and the flag says when they refused. But
    `GET /consents?covering=<parcel>&active=true` (the consents in force for it, "as
    the rules weigh them") still lists the standing consent, with nothing saying it
    was refused: the auditor asking which consent stands for this parcel is told the
    opposite of what the proof and the flag say."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    channel = auth.headers("app1")
    standing = standing_consent(client, channel, parcel)
    asked = ask(client, auth.headers("courier1", "PDA-0001"), parcel.tracking_no, channel="sms")
    refused = client.post(
        CONSENTS,
        json={"request_id": asked.get_json()["id"], "granted": False, "channel": "sms"},
        headers=channel,
    )
    assert refused.get_json()["status"] == "refused", refused.get_json()
    assert "unauthorized_locker_drop" in _drop_flags(
        auth, parcel.tracking_no, dt.datetime.now(dt.UTC)
    )
    in_force = client.get(
        CONSENTS,
        query_string={"covering": parcel.tracking_no, "active": "true"},
        headers=auth.headers("auditor1"),
    ).get_json()["items"]
    assert [c["id"] for c in in_force] == [], in_force
    (on_record,) = client.get(
        CONSENTS, query_string={"covering": parcel.tracking_no}, headers=auth.headers("auditor1")
    ).get_json()["items"]
    assert on_record["id"] == standing
    assert dt.datetime.fromisoformat(on_record["refused_at"]) == dt.datetime.fromisoformat(
        refused.get_json()["answered_at"]
    )
    # For another parcel of the recipient the standing consent stands, and says no refusal.
    other = factories.parcel(session, world.station)
    session.commit()
    for query in ({"covering": other.tracking_no}, {"covering": other.tracking_no, "active": 1}):
        (listed,) = client.get(
            CONSENTS, query_string=query, headers=auth.headers("auditor1")
        ).get_json()["items"]
        assert (listed["id"], listed["refused_at"]) == (standing, None)


# -- a PDA's retries ----------------------------------------------------------------------------


def test_a_pdas_retry_with_its_id_asks_the_recipient_once(
    client: FlaskClient,
    session: Session,
    courier: dict[str, str],
    channel: dict[str, str],
    parcel: str,
) -> None:
    """At the door over a weak signal, the PDA's request reached the server but its
    answer did not, and the PDA asked again: each attempt made a request of its own, and
    the recipient got the question twice. With the PDA's own id for it, the retry
    answers the request made the first time, as it is now."""
    from models import WebhookDelivery
    from sync.webhooks import create_subscription

    create_subscription(
        session=session,
        url="http://127.0.0.1:9/sms",
        topics=["consent.requested"],
        production=False,
    )
    session.commit()
    asking = {"client_request_id": "6f1c1f0e-3b52-4f47-9b7e-0d3c0a6c2a11", "channel": "sms"}
    first = ask(client, courier, parcel, **asking)
    assert first.status_code == 201, first.get_json()
    assert first.get_json()["client_request_id"] == asking["client_request_id"]
    retry = ask(client, courier, parcel.lower(), **asking)
    assert retry.status_code == 201 and retry.get_json() == first.get_json()
    questions = select(WebhookDelivery).where(WebhookDelivery.topic == "consent.requested")
    assert len(session.scalars(questions).all()) == 1  # one SMS to the recipient
    assert len(session.scalars(select(ConsentRequest)).all()) == 1

    client.post(
        CONSENTS, json={"request_id": first.get_json()["id"], "channel": "sms"}, headers=channel
    )
    late = ask(client, courier, parcel, **asking)  # answered meanwhile: as it is now
    assert late.status_code == 201 and late.get_json()["status"] == "granted"

    other = ask(client, courier, parcel, method="pickup_point", **asking)
    assert other.status_code == 409, other.get_json()
    assert other.get_json()["code"] == "client_request_id_reused"
    assert list(other.get_json()["errors"]) == ["client_request_id"]
    assert "whose method differs:" in other.get_json()["message"]


def test_a_retried_request_for_another_stations_parcel_stays_unsent(
    client: FlaskClient, session: Session, world: World, courier: dict[str, str]
) -> None:
    foreign = factories.parcel(session, world.other_station).tracking_no
    session.commit()
    asking = {"client_request_id": "0b8f9a52-5d1e-4c0e-8a53-5a2f7d6c9e01"}
    answers = [ask(client, courier, foreign, **asking) for _ in range(2)]
    assert [a.status_code for a in answers] == [201, 201]
    assert answers[0].get_json() == answers[1].get_json()
    assert answers[0].get_json()["status"] == "unsent"


def test_another_grant_sent_for_a_granted_request_is_a_conflict_not_the_first_grant(
    client: FlaskClient, courier: dict[str, str], channel: dict[str, str], parcel: str
) -> None:
    """The recipient agreed to locker L-3; the app, its answer lost, then sent "pickup
    point PP-9, until tonight" for the same request and read 201: the consent said L-3
    and no expiry, and the app told the recipient otherwise. The same request id with
    another grant is a conflict naming what differs (rule 2), never the first grant
    passed off as this one; the same grant again, or one leaving out what the first
    said, is a retry."""
    request = ask(client, courier, parcel, point_id="L-3").get_json()
    answer = {"request_id": request["id"], "channel": "app", "evidence": "app tap 5"}
    first = client.post(CONSENTS, json=answer, headers=channel)
    assert first.status_code == 201, first.get_json()
    for retry in (answer, {"request_id": request["id"], "channel": "app"}):
        again = client.post(CONSENTS, json=retry, headers=channel)
        assert again.status_code == 201 and again.get_json()["id"] == first.get_json()["id"]
    tonight = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=8)).isoformat()
    other = client.post(
        CONSENTS,
        json={**answer, "method": "pickup_point", "point_id": "PP-9", "expires_at": tonight},
        headers=channel,
    )
    assert other.status_code == 409, other.get_json()
    error = other.get_json()
    assert error["code"] == "consent_request_answered"
    assert "method, point_id, expires_at differ" in error["message"], error
    by_sms = client.post(CONSENTS, json={**answer, "channel": "sms"}, headers=channel)
    assert by_sms.status_code == 409 and "whose channel differs:" in by_sms.get_json()["message"]
    consent = client.get(f"{CONSENTS}/{first.get_json()['id']}", headers=channel).get_json()
    assert (consent["point_id"], consent["expires_at"]) == ("L-3", None)


def test_the_courier_asking_online_reads_that_nobody_takes_the_question(
    client: FlaskClient, courier: dict[str, str], auth: Auth, parcel: str
) -> None:
    """No channel takes consent requests here: the courier at the door asking online
    read ``pending`` in the answer and in the request (only the pull feed said nobody
    is asked). The answer, the request and the list say it too (``not_reached``);
    the station's manager reads it as well."""
    asked = ask(client, courier, parcel)
    assert asked.status_code == 201
    assert asked.get_json()["not_reached"] == request_reach.NO_CHANNEL
    request_id = asked.get_json()["id"]
    for headers in (courier, auth.headers("manager1")):
        read = client.get(f"{REQUESTS}/{request_id}", headers=headers)
        assert read.status_code == 200, read.get_json()
        assert read.get_json()["not_reached"] == request_reach.NO_CHANNEL
    [listed] = client.get(REQUESTS, headers=courier).get_json()["items"]
    assert listed["not_reached"] == request_reach.NO_CHANNEL
