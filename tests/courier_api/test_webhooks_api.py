"""/api/v1/webhooks: subscriptions, topics and deliveries, for admins only."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Mapping
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from courier_api.extensions import api, db
from models import (
    AuditEntry,
    DeliveryStatus,
    OutboxMessage,
    WebhookDelivery,
    WebhookSubscription,
    utcnow,
)
from sync import outbox, webhooks
from sync.webhooks import DeliverySettings, SendResult
from tests import factories
from tests.conftest import Auth, World

BASE = "/api/v1/webhooks"
SUBSCRIPTIONS = f"{BASE}/subscriptions"
DELIVERIES = f"{BASE}/deliveries"
URL = "http://127.0.0.1:9/hook"  # loopback: allowed outside production


class AnswerWith:
    """A sender that answers each request with the next status, without a network."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.sent: list[Mapping[str, str]] = []

    def send(self, *, url: str, body: bytes, headers: Mapping[str, str]) -> SendResult:
        self.sent.append(headers)
        return SendResult(status_code=self.statuses.pop(0), body="nope")

    def close(self) -> None:
        pass


def admin(auth: Auth) -> dict[str, str]:
    return auth.headers("admin")


def create(client: FlaskClient, auth: Auth, **body: Any) -> dict[str, Any]:
    response = client.post(
        SUBSCRIPTIONS,
        json={"url": URL, "topics": ["parcel.in_locker", "flag.raised"]} | body,
        headers=admin(auth),
    )
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def announce(session: Session, key: str, *, station_id: int | None = None, **data: Any) -> Any:
    message = outbox.announce(
        session=session,
        topic="parcel.in_locker",
        ordering_key=key,
        station_id=station_id,
        data={"tracking_no": key, **data},
    )
    session.commit()
    return message


def deliver(app: Flask, sender: AnswerWith, now: dt.datetime | None = None) -> dict[str, Any]:
    return webhooks.deliver_due(
        sessions=db.sessionmaker_of(app),
        now=now or utcnow(),
        settings=DeliverySettings(max_attempts=1),
        sender=sender,
        worker_id="test",
    )


# -- subscriptions ----------------------------------------------------------------------------


def test_an_admin_creates_a_subscription_and_sees_its_secret_only_then(
    client: FlaskClient, auth: Auth, world: World, session: Session
) -> None:
    created = create(
        client,
        auth,
        station_id=world.station.id,
        description=" SMS gateway ",
        topics=["flag.raised"],
    )

    secret = created["secret"]
    assert len(secret) >= 43
    assert created["url"] == URL and created["topics"] == ["flag.raised"]
    assert created["station_id"] == world.station.id and created["description"] == "SMS gateway"
    assert created["active"] is True and created["disabled_at"] is None
    assert created["consecutive_failures"] == 0 and created["created_by"] == world.admin.id
    url = f"{SUBSCRIPTIONS}/{created['id']}"
    answers = [
        client.get(SUBSCRIPTIONS, headers=admin(auth)),
        client.get(url, headers=admin(auth)),
        client.patch(url, json={"description": "renamed"}, headers=admin(auth)),
    ]
    for response in answers:
        assert response.status_code == 200
        assert secret not in response.get_data(as_text=True)
        assert "secret" not in response.get_data(as_text=True)
    assert client.get(url, headers=admin(auth)).get_json() == {
        key: value for key, value in created.items() if key not in ("secret", "description")
    } | {"description": "renamed"}
    entry = session.scalar(
        select(AuditEntry).where(AuditEntry.action == "webhook_subscription_created")
    )
    assert entry is not None and entry.actor_id == world.admin.id
    assert entry.details["host"] == "127.0.0.1" and secret not in json.dumps(entry.details)


def test_an_admin_rotates_a_secret_keeping_the_old_one_for_a_grace_period(
    client: FlaskClient, auth: Auth, world: World, session: Session
) -> None:
    """The channel's operator rotates its secret without a new subscription (which lost
    what waited for the old one): the answer shows the new secret, once; the old one
    signs too until ``rotation_grace_until``; a grace beyond a week is a 422."""
    created = create(client, auth)
    url = f"{SUBSCRIPTIONS}/{created['id']}/secret"
    before = utcnow()
    rotated = client.post(url, json={"grace_hours": 2}, headers=admin(auth))
    assert rotated.status_code == 200, rotated.get_json()
    body = rotated.get_json()
    assert body["id"] == created["id"] and body["secret"] not in ("", created["secret"])
    until = dt.datetime.fromisoformat(body["rotation_grace_until"])
    assert before + dt.timedelta(hours=2) <= until <= utcnow() + dt.timedelta(hours=2)
    shown = client.get(f"{SUBSCRIPTIONS}/{created['id']}", headers=admin(auth))
    assert body["secret"] not in shown.get_data(as_text=True)
    assert shown.get_json()["rotation_grace_until"] == body["rotation_grace_until"]
    leaked = client.post(url, json={"grace_hours": 0}, headers=admin(auth)).get_json()
    assert leaked["rotation_grace_until"] is None
    too_long = client.post(url, json={"grace_hours": 169}, headers=admin(auth))
    assert too_long.status_code == 422 and "grace_hours" in too_long.get_json()["errors"]["json"]
    entries = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "webhook_secret_rotated")
    ).all()
    assert [e.actor_id for e in entries] == [world.admin.id, world.admin.id]
    assert not any(body["secret"] in json.dumps(e.details) for e in entries)


def test_a_grace_that_has_ended_reads_null_and_its_old_secret_is_forgotten(
    client: FlaskClient, auth: Auth, world: World, session: Session
) -> None:
    """Two hours after a rotation with ``grace_hours: 2`` the old secret signs nothing,
    yet the subscription read ``rotation_grace_until`` two hours ago, and kept the old
    secret stored until the next rotation: an admin checking that the grace was over
    read a time, not null. It reads null once past; ``webhook_retention`` clears the
    stored old secret, leaving a grace still running alone."""
    from courier_api.scheduler import JOB_SPECS

    ended = create(client, auth)
    running = create(client, auth)
    for created in (ended, running):
        rotated = client.post(
            f"{SUBSCRIPTIONS}/{created['id']}/secret", json={"grace_hours": 2}, headers=admin(auth)
        )
        assert rotated.get_json()["rotation_grace_until"] is not None
    past = utcnow() - dt.timedelta(seconds=1)
    stored = session.get(WebhookSubscription, ended["id"])
    assert stored is not None and stored.previous_secret is not None
    stored.previous_secret_until = past  # two hours have gone by
    session.commit()

    def shown(subscription_id: int) -> Any:
        answer = client.get(f"{SUBSCRIPTIONS}/{subscription_id}", headers=admin(auth))
        return answer.get_json()["rotation_grace_until"]

    assert shown(ended["id"]) is None
    assert shown(running["id"]) is not None
    listed = client.get(SUBSCRIPTIONS, headers=admin(auth)).get_json()["items"]
    assert {s["id"]: s["rotation_grace_until"] is None for s in listed} == {
        ended["id"]: True,
        running["id"]: False,
    }
    purge = JOB_SPECS["webhook_retention"].build({"WEBHOOK_RETENTION_DAYS": 30})
    assert purge(session=session, now=utcnow())["old_secrets_forgotten"] == 1
    session.commit()
    session.expire_all()
    forgotten = session.get(WebhookSubscription, ended["id"])
    kept = session.get(WebhookSubscription, running["id"])
    assert forgotten is not None and kept is not None
    assert (forgotten.previous_secret, forgotten.previous_secret_until) == (None, None)
    assert kept.previous_secret is not None and shown(running["id"]) is not None
    assert purge(session=session, now=utcnow())["old_secrets_forgotten"] == 0


@pytest.mark.postgres_only
def test_two_rotations_at_once_keep_each_answered_secret_valid(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admin's script times out on a rotation and sends it again while the first is
    still running. Both read the secret before either wrote: the second kept the same
    old secret as "previous" and overwrote the first's new one, so the secret the first
    answer showed signed nothing, ever (a receiver switched to it refused every
    delivery). The rotation locks the row and reads it again: the second keeps the
    first's secret for the grace, and every secret shown is valid at least that long."""
    from models import WebhookSubscription
    from tests.threads import race_requests

    with committed_app.app_context():
        factories.user(db.session, "root", "admin")
        subscription = WebhookSubscription(url=URL, topics=["flag.raised"], secret="s" * 43)
        db.session.add(subscription)
        db.session.commit()
        subscription_id = subscription.id
    headers = Auth(committed_app.test_client()).headers("root")
    get_subscription = webhooks.get_subscription

    def slow_get_subscription(**kwargs: Any) -> WebhookSubscription:
        found = get_subscription(**kwargs)  # its secret read, as the rotation reads it
        time.sleep(0.6)
        return found

    monkeypatch.setattr(webhooks, "get_subscription", slow_get_subscription)
    url = f"{SUBSCRIPTIONS}/{subscription_id}/secret"
    answers = race_requests(
        committed_app,
        [("POST", url, {"grace_hours": 24}, headers), ("POST", url, {"grace_hours": 24}, headers)],
        delays=[0, 0.2],
    )
    assert [a.status_code for a in answers] == [200, 200], [a.get_json() for a in answers]
    first, second = (a.get_json()["secret"] for a in answers)
    with committed_app.app_context():
        stored = db.session.get(WebhookSubscription, subscription_id)
        assert stored is not None
        assert (stored.secret, stored.previous_secret) == (second, first)


def test_subscriptions_are_listed_in_pages(client: FlaskClient, auth: Auth, world: World) -> None:
    ids = [create(client, auth)["id"] for _ in range(3)]

    first = client.get(f"{SUBSCRIPTIONS}?limit=2", headers=admin(auth)).get_json()
    assert [item["id"] for item in first["items"]] == ids[:2]
    assert first["next_after"] == ids[1]
    rest = client.get(
        f"{SUBSCRIPTIONS}?limit=2&after={first['next_after']}", headers=admin(auth)
    ).get_json()
    assert [item["id"] for item in rest["items"]] == ids[2:] and rest["next_after"] is None


def test_patch_changes_each_field_and_null_station_means_every_station(
    client: FlaskClient, auth: Auth, world: World
) -> None:
    created = create(client, auth, station_id=world.station.id)
    url = f"{SUBSCRIPTIONS}/{created['id']}"

    response = client.patch(
        url,
        json={
            "url": "https://hooks.example.com/c",
            "topics": ["report.ready"],
            "station_id": None,
            "active": False,
        },
        headers=admin(auth),
    )

    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["url"] == "https://hooks.example.com/c" and body["topics"] == ["report.ready"]
    assert body["station_id"] is None and body["active"] is False
    untouched = client.patch(url, json={}, headers=admin(auth)).get_json()
    assert untouched == body


def test_patch_active_enables_a_disabled_subscription_again(
    app: Flask, client: FlaskClient, auth: Auth, world: World, session: Session
) -> None:
    created = create(client, auth)
    announce(session, "RR000000001GB")
    settings = DeliverySettings(max_attempts=5, disable_after_failures=1, disable_after_seconds=0)
    stats = webhooks.deliver_due(
        sessions=db.sessionmaker_of(app),
        now=utcnow(),
        settings=settings,
        sender=AnswerWith(500),
        worker_id="test",
    )
    assert stats["disabled"] == [created["id"]]
    url = f"{SUBSCRIPTIONS}/{created['id']}"
    disabled = client.get(url, headers=admin(auth)).get_json()
    assert disabled["disabled_at"] is not None and disabled["consecutive_failures"] == 1
    assert disabled["disabled_reason"].startswith("1 delivery attempts failed in a row")

    enabled = client.patch(url, json={"active": True}, headers=admin(auth)).get_json()

    assert disabled["failing_since"] is not None
    assert enabled["disabled_at"] is None and enabled["disabled_reason"] is None
    assert enabled["consecutive_failures"] == 0 and enabled["active"] is True
    assert enabled["failing_since"] is None


def test_topics_are_listed_with_their_descriptions(
    client: FlaskClient, auth: Auth, world: World
) -> None:
    response = client.get(f"{BASE}/topics", headers=admin(auth))
    assert response.status_code == 200
    topics = response.get_json()["topics"]
    assert [t["name"] for t in topics] == list(outbox.TOPICS)
    assert all(t["description"] == outbox.TOPICS[t["name"]] for t in topics)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": None}, "url"),
        ({"url": "http://hooks.example.com/c"}, "url"),
        ({"url": "https://user:pw@hooks.example.com/c"}, "url"),
        ({"url": "https://hooks.example.com/c#x"}, "url"),
        ({"url": "https://hooks.example.com/" + "a" * 2000}, "url"),
        ({"topics": []}, "topics"),
        ({"topics": ["parcel.lost"]}, "topics"),
        ({"topics": "flag.raised"}, "topics"),
        ({"station_id": 999999}, "station_id"),
        ({"station_id": 0}, "station_id"),
        ({"description": "x" * 201}, "description"),
        ({"active": True}, "active"),  # not a field of a new subscription
    ],
)
def test_invalid_subscriptions_are_422_naming_the_field(
    client: FlaskClient, auth: Auth, world: World, body: dict[str, Any], field: str
) -> None:
    response = client.post(
        SUBSCRIPTIONS,
        json={"url": URL, "topics": ["flag.raised"]} | body,
        headers=admin(auth),
    )
    assert response.status_code == 422, response.get_json()
    errors = response.get_json()["errors"]
    assert field in errors.get("json", errors), errors
    assert client.get(SUBSCRIPTIONS, headers=admin(auth)).get_json()["items"] == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "ftp://hooks.example.com/"}, "url"),
        ({"topics": []}, "topics"),
        ({"station_id": 999999}, "station_id"),
        ({"active": "maybe"}, "active"),
    ],
)
def test_invalid_changes_are_422_naming_the_field(
    client: FlaskClient, auth: Auth, world: World, body: dict[str, Any], field: str
) -> None:
    created = create(client, auth)
    response = client.patch(f"{SUBSCRIPTIONS}/{created['id']}", json=body, headers=admin(auth))
    assert response.status_code == 422, response.get_json()
    errors = response.get_json()["errors"]
    assert field in errors.get("json", errors), errors


def test_production_accepts_only_https(app_with: Any, world: World) -> None:
    production = app_with(APP_ENV="production")
    client = production.test_client()
    headers = Auth(client).headers("admin")
    refused = client.post(
        SUBSCRIPTIONS, json={"url": URL, "topics": ["flag.raised"]}, headers=headers
    )
    assert refused.status_code == 422
    assert "https" in refused.get_json()["errors"]["url"][0]
    accepted = client.post(
        SUBSCRIPTIONS,
        json={"url": "https://hooks.example.com/c", "topics": ["flag.raised"]},
        headers=headers,
    )
    assert accepted.status_code == 201


# -- deliveries -------------------------------------------------------------------------------


@pytest.fixture
def settled(app: Flask, client: FlaskClient, auth: Auth, world: World, session: Session) -> Any:
    """Three deliveries to one subscription: the first delivered, the second dead, the
    third still pending (another subscription's topic is flag.raised only)."""
    sub = create(client, auth)
    create(client, auth, topics=["flag.raised"])
    announce(
        session,
        "RR000000001GB",
        station_id=world.station.id,
        compartment="A1",
        recipient_phone="+8613812345678",
        note="rang her on 138 1234 5678",
    )
    announce(session, "RR000000002GB", station_id=world.station.id)
    deliver(app, AnswerWith(200, 500))
    announce(session, "RR000000003GB")
    rows = session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)).all()
    assert [d.status for d in rows] == [
        DeliveryStatus.DELIVERED,
        DeliveryStatus.DEAD,
        DeliveryStatus.PENDING,
    ]
    return sub, rows


def test_deliveries_are_listed_newest_first_with_filters_and_pages(
    client: FlaskClient, auth: Auth, settled: Any
) -> None:
    sub, rows = settled
    everything = client.get(DELIVERIES, headers=admin(auth)).get_json()
    assert [d["id"] for d in everything["items"]] == [d.id for d in reversed(rows)]
    assert everything["next_after"] is None
    dead = client.get(f"{DELIVERIES}?status=dead", headers=admin(auth)).get_json()["items"]
    assert [d["id"] for d in dead] == [rows[1].id]
    assert dead[0]["last_error"] == "HTTP 500: nope" and dead[0]["attempts"] == 1
    assert dead[0]["delivery_id"] == str(rows[1].delivery_id)
    by_sub = client.get(f"{DELIVERIES}?subscription_id={sub['id']}", headers=admin(auth))
    assert len(by_sub.get_json()["items"]) == 3
    other = client.get(f"{DELIVERIES}?subscription_id={sub['id'] + 1}", headers=admin(auth))
    assert other.get_json()["items"] == []
    by_topic = client.get(f"{DELIVERIES}?topic=flag.raised", headers=admin(auth)).get_json()
    assert by_topic["items"] == []
    page = client.get(f"{DELIVERIES}?limit=2", headers=admin(auth)).get_json()
    assert [d["id"] for d in page["items"]] == [rows[2].id, rows[1].id]
    rest = client.get(f"{DELIVERIES}?limit=2&after={page['next_after']}", headers=admin(auth))
    assert [d["id"] for d in rest.get_json()["items"]] == [rows[0].id]


@pytest.mark.parametrize(
    "query", ["status=sent", "topic=parcel.lost", "subscription_id=0", "after=-1", "limit=0"]
)
def test_bad_delivery_filters_are_422(
    client: FlaskClient, auth: Auth, world: World, query: str
) -> None:
    response = client.get(f"{DELIVERIES}?{query}", headers=admin(auth))
    assert response.status_code == 422
    assert query.split("=")[0] in response.get_json()["errors"]["query"]


def test_a_delivery_shows_the_message_its_receiver_gets(
    client: FlaskClient, auth: Auth, settled: Any, session: Session
) -> None:
    _, rows = settled
    response = client.get(f"{DELIVERIES}/{rows[0].id}", headers=admin(auth))
    assert response.status_code == 200
    body = response.get_json()
    message = session.get(OutboxMessage, rows[0].message_id)
    assert message is not None
    assert body["status"] == "delivered" and body["delivered_at"] is not None
    assert body["message_id"] == str(message.id)
    assert body["message"]["id"] == str(message.id)
    # The envelope as sent names its delivery (it was missing: found by the conformance test).
    assert body["message"]["delivery_id"] == body["delivery_id"] == str(rows[0].delivery_id)
    assert body["message"]["topic"] == "parcel.in_locker"
    assert body["message"]["data"] == {
        "tracking_no": "RR000000001GB",
        "compartment": "A1",
        "recipient_phone": "+86*******5678",  # masked: only auditors see phones
        "note": "rang her on ********678",  # in free text too (a flag's resolution note)
    }
    assert message.payload["recipient_phone"] == "+8613812345678"  # the receiver's copy
    assert body["ordering_key"] == "RR000000001GB"


def test_replay_sends_a_dead_delivery_again_with_the_same_id(
    app: Flask, client: FlaskClient, auth: Auth, settled: Any, world: World
) -> None:
    _, rows = settled
    dead = rows[1]
    response = client.post(f"{DELIVERIES}/{dead.id}/replay", headers=admin(auth))

    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["status"] == "pending" and body["attempts"] == 0
    assert body["delivery_id"] == str(dead.delivery_id)
    sender = AnswerWith(200, 200)
    deliver(app, sender, utcnow() + dt.timedelta(seconds=1))
    assert [h["X-Courier-Delivery"] for h in sender.sent] == [
        str(dead.delivery_id),
        str(rows[2].delivery_id),
    ]
    again = client.get(f"{DELIVERIES}/{dead.id}", headers=admin(auth)).get_json()
    assert again["status"] == "delivered"

    replayed = client.post(f"{DELIVERIES}/{rows[2].id}/replay", headers=admin(auth))
    assert replayed.status_code == 200  # delivered meanwhile: replayable
    conflict = client.post(f"{DELIVERIES}/{rows[2].id}/replay", headers=admin(auth))
    assert conflict.status_code == 409
    assert conflict.get_json()["code"] == "delivery_pending"


def test_purge_deletes_settled_deliveries_and_unneeded_messages(
    client: FlaskClient, auth: Auth, settled: Any, session: Session
) -> None:
    _, rows = settled
    before = (utcnow() + dt.timedelta(minutes=1)).isoformat()

    dead = client.post(
        f"{DELIVERIES}/purge", json={"status": "dead", "before": before}, headers=admin(auth)
    )

    assert dead.status_code == 200
    assert dead.get_json() == {"deliveries": 1, "messages": 1}
    delivered = client.post(
        f"{DELIVERIES}/purge", json={"status": "delivered", "before": before}, headers=admin(auth)
    )
    assert delivered.get_json() == {"deliveries": 1, "messages": 1}
    session.expire_all()
    assert [d.id for d in session.scalars(select(WebhookDelivery))] == [rows[2].id]
    assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 1
    entry = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "webhook_deliveries_purged")
    ).all()
    assert [e.details["deliveries"] for e in entry] == [1, 1]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"status": "pending", "before": "2026-11-30T00:00:00Z"}, "status"),
        ({"status": "dead", "before": "2026-11-30T00:00:00"}, "before"),  # no offset
        ({"status": "dead"}, "before"),
        ({"before": "2026-11-30T00:00:00Z"}, "status"),
    ],
)
def test_bad_purges_are_422_naming_the_field(
    client: FlaskClient, auth: Auth, world: World, body: dict[str, Any], field: str
) -> None:
    response = client.post(f"{DELIVERIES}/purge", json=body, headers=admin(auth))
    assert response.status_code == 422
    assert field in response.get_json()["errors"]["json"]


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", f"{SUBSCRIPTIONS}/999999"),
        ("PATCH", f"{SUBSCRIPTIONS}/999999"),
        ("POST", f"{SUBSCRIPTIONS}/999999/secret"),
        ("GET", f"{DELIVERIES}/999999"),
        ("POST", f"{DELIVERIES}/999999/replay"),
        ("GET", f"{DELIVERIES}/99999999999999999999"),  # beyond 64 bits: no such route
    ],
)
def test_unknown_subscriptions_and_deliveries_are_404(
    client: FlaskClient, auth: Auth, world: World, method: str, url: str
) -> None:
    response = client.open(url, method=method, json={}, headers=admin(auth))
    assert response.status_code == 404
    assert response.get_json()["code"] in (
        "subscription_not_found",
        "delivery_not_found",
        "not_found",
    )


# -- access -----------------------------------------------------------------------------------

ENDPOINTS = [
    ("GET", SUBSCRIPTIONS, None),
    ("POST", SUBSCRIPTIONS, {"url": URL, "topics": ["flag.raised"]}),
    ("GET", f"{SUBSCRIPTIONS}/1", None),
    ("PATCH", f"{SUBSCRIPTIONS}/1", {"active": False}),
    ("POST", f"{SUBSCRIPTIONS}/1/secret", {}),
    ("GET", f"{BASE}/topics", None),
    ("GET", DELIVERIES, None),
    ("GET", f"{DELIVERIES}/1", None),
    ("POST", f"{DELIVERIES}/1/replay", None),
    ("POST", f"{DELIVERIES}/purge", {"status": "dead", "before": "2026-11-30T00:00:00Z"}),
]


@pytest.mark.parametrize(
    ("login", "status"),
    [
        (("manager1", None), 403),
        (("courier1", "PDA-0001"), 403),
        (("auditor1", None), 403),
        (("app1", None), 403),
        (None, 401),
    ],
)
def test_only_admins_reach_webhooks(
    client: FlaskClient,
    auth: Auth,
    world: World,
    login: tuple[str, str | None] | None,
    status: int,
) -> None:
    headers = auth.headers(*login) if login else {}
    for method, url, body in ENDPOINTS:
        response = client.open(url, method=method, json=body, headers=headers)
        assert response.status_code == status, (method, url)
        expected = "role_forbidden" if status == 403 else "token_missing"
        assert response.get_json()["code"] == expected
    assert client.get(SUBSCRIPTIONS, headers=admin(auth)).get_json()["items"] == []


# -- the documentation ------------------------------------------------------------------------


def test_the_openapi_documents_the_webhook_request_as_a_callback(app: Flask) -> None:
    with app.app_context():
        spec = api.spec.to_dict()
    operation = spec["paths"][SUBSCRIPTIONS]["post"]
    assert "X-Courier-Signature" in operation["description"]
    assert "HMAC-SHA256" in operation["description"]
    callback = operation["callbacks"]["message"]["{$request.body#/url}"]["post"]
    headers = {p["name"] for p in callback["parameters"] if p["in"] == "header"}
    assert headers >= {
        "X-Courier-Topic",
        "X-Courier-Delivery",
        "X-Courier-Attempt",
        "X-Courier-Signature",
        "User-Agent",
    }
    schema = callback["requestBody"]["content"]["application/json"]["schema"]
    envelope, data = schema["allOf"]
    assert envelope == {"$ref": "#/components/schemas/WebhookEnvelope"}
    refs = [item["$ref"].rsplit("/", 1)[1] for item in data["properties"]["data"]["oneOf"]]
    assert len(refs) == len(outbox.TOPICS)
    components = spec["components"]["schemas"]
    for name in refs:
        assert name in components
    balance = components["WebhookBalance"]["properties"]
    assert {"missing_seqs", "discrepancies", "unattended_without_consent"} <= set(balance)
    assert set(components["WebhookConsentRequested"]["required"]) >= {
        "request_id",
        "recipient_phone",
        "expires_at",
    }
    assert "secret" in components["SubscriptionCreatedOut"]["properties"]
    assert "secret" not in components["SubscriptionOut"]["properties"]
    assert components["WebhookEnvelope"]["properties"]["id"]["format"] == "uuid"


def test_drop_voided_reaches_the_station_subscription_told_of_the_drop_after_a_reroute(
    client: FlaskClient, auth: Auth, world: World, session: Session
) -> None:
    """README: `parcel.drop_voided` is "sent only to the subscriptions its announcement
    went to". The station-ST1 subscription was told the parcel is in locker L-1 with its
    pickup code; the parcel is then re-routed to ST2 by an intake, and the courier's
    correction voiding the drop arrives. The retraction is announced with the parcel's
    *current* station, so the ST1 subscription (the only one told of the drop) never
    hears it: the recipient goes to the locker for nothing."""
    created = client.post(
        "/api/v1/webhooks/subscriptions",
        json={
            "url": "http://127.0.0.1:9/hook",
            "topics": ["parcel.in_locker", "parcel.drop_voided"],
            "station_id": world.station.id,
        },
        headers=auth.headers("admin"),
    )
    assert created.status_code == 201, created.get_json()
    subscription_id = created.get_json()["id"]
    parcel = factories.parcel(session, world.station)
    session.commit()
    now = dt.datetime.now(dt.UTC)
    drop = factories.locker_drop(2, parcel.tracking_no, now - dt.timedelta(minutes=5))
    checked_out = factories.event(
        1, parcel.tracking_no, occurred_at=now - dt.timedelta(minutes=10)
    )
    auth.push([checked_out, drop])
    rerouted = client.post(
        "/api/v1/parcels",
        json={
            "parcels": [
                {
                    "tracking_no": parcel.tracking_no,
                    "service_class": "express",
                    "recipient_name": "Recipient",
                    "recipient_phone": "+8613812345678",
                    "address": "1 Century Ave",
                    "station": "ST2",
                }
            ]
        },
        headers=auth.headers("app1"),
    )
    assert rerouted.get_json()["results"][0]["status"] == "updated"
    fix = factories.event(
        3,
        parcel.tracking_no,
        "correction",
        occurred_at=now - dt.timedelta(minutes=4),
        voids_client_event_id=drop["client_event_id"],
        reason="the compartment would not close",
    )
    assert auth.push([fix])["results"][0]["status"] == "applied"
    told = [
        d.topic
        for d in session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.subscription_id == subscription_id)
            .order_by(WebhookDelivery.id)
        )
    ]
    assert told == ["parcel.in_locker", "parcel.drop_voided"]
    retraction = session.scalars(
        select(OutboxMessage).where(OutboxMessage.topic == "parcel.drop_voided")
    ).one()
    # the station it was announced at, which the subscription covers when it is sent
    assert retraction.station_id == retraction.payload["station_id"] == world.station.id
