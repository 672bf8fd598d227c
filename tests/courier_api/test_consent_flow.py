"""The consent asked for at the door, end to end, with real commits and a real receiver:

the PDA records a consent request while offline and pushes it later; the deliverer
posts it, signed, to the recipient channel's webhook on loopback; the channel grants
it through the API; the PDA's long pull returns the grant; the locker drop that
follows is not flagged.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from typing import Any

from flask import Flask
from sqlalchemy import select

from courier_api.extensions import db
from models import Flag, utcnow
from sync import webhooks
from tests import factories
from tests.conftest import Auth
from tests.webhook_receiver import Receiver

PUSH = "/api/v1/sync/push"
PULL = "/api/v1/sync/pull"


def test_a_consent_requested_offline_is_granted_and_the_drop_that_follows_is_clean(
    committed_app: Flask,
) -> None:
    with committed_app.app_context():
        session = db.session
        station = factories.station(session, code="DOOR")
        factories.user(session, "door-courier", "courier", station)
        factories.user(session, "sms-gateway", "integration")
        factories.user(session, "door-admin", "admin")
        factories.device(session, "PDA-DOOR", station)
        tracking_no = factories.parcel(session, station).tracking_no  # express, with a phone
        session.commit()
    client = committed_app.test_client()
    auth = Auth(client)
    courier = auth.headers("door-courier", "PDA-DOOR")
    gateway = auth.headers("sms-gateway")
    with Receiver() as receiver:
        created = client.post(
            "/api/v1/webhooks/subscriptions",
            json={"url": receiver.url, "topics": ["consent.requested"]},
            headers=auth.headers("door-admin"),
        )
        assert created.status_code == 201, created.get_json()
        secret = created.get_json()["secret"]
        shift = client.post("/api/v1/shifts", json={"first_seq": 1}, headers=courier).get_json()
        now = utcnow()
        # Offline at the door: the check-out and the request wait on the PDA.
        recorded = [
            factories.event(1, tracking_no, occurred_at=now - dt.timedelta(minutes=3)),
            factories.event(
                2,
                tracking_no,
                "consent_requested",
                occurred_at=now - dt.timedelta(minutes=2),
                request={"method": "locker", "point_id": "L-77", "channel": "sms"},
            ),
        ]
        pushed = client.post(PUSH, json=factories.push_body("PDA-DOOR", recorded), headers=courier)
        assert [r["status"] for r in pushed.get_json()["results"]] == ["applied", "applied"]
        cursor = _drain(client, courier)

        settings = webhooks.DeliverySettings.from_config(committed_app.config)
        with webhooks.HttpxSender(settings) as sender:
            stats = webhooks.deliver_due(
                sessions=db.sessionmaker_of(committed_app),
                now=utcnow(),
                settings=settings,
                sender=sender,
                worker_id="test-deliverer",
            )
        assert stats["delivered"] == 1, stats
        [request] = receiver.requests
        header = request.headers["x-courier-signature"]
        assert webhooks.verify(secret, header, request.body, now=utcnow())
        message = json.loads(request.body)
        assert message["topic"] == "consent.requested"
        data = message["data"]
        assert (data["tracking_no"], data["method"], data["point_id"]) == (
            tracking_no,
            "locker",
            "L-77",
        )
        assert data["recipient_phone"] == "+8613812345678"

        # The courier waits at the door, long-polling; the recipient answers by SMS.
        pulled: dict[str, Any] = {}

        def long_pull() -> None:
            pulled["page"] = (
                committed_app.test_client()
                .get(f"{PULL}?cursor={cursor}&wait=15", headers=courier)
                .get_json()
            )

        waiting = threading.Thread(target=long_pull)
        waiting.start()
        granted = client.post(
            "/api/v1/consents",
            json={"request_id": data["request_id"], "channel": "sms", "evidence": "SMS 'YES'"},
            headers=gateway,
        )
        waiting.join(timeout=30)
        assert granted.status_code == 201, granted.get_json()
        entry = next(c for c in pulled["page"]["changes"] if c["kind"] == "consent_request")
        assert entry["parcel"]["consent_requests"][0]["status"] == "granted"
        assert entry["parcel"]["consents"] == [
            {"method": "locker", "point_id": "L-77", "expires_at": None}
        ]

        drop = factories.event(
            3,
            tracking_no,
            "delivered_to_locker",
            occurred_at=utcnow(),
            locker_id="L-77",
            compartment="5",
            pod={"pickup_code": "3141"},
        )
        receipt = client.post(
            PUSH, json=factories.push_body("PDA-DOOR", [drop]), headers=courier
        ).get_json()
        assert receipt["results"][0]["status"] == "applied"
        kinds = {flag["kind"] for flag in receipt["flags_raised"]}
        assert not kinds & {"unauthorized_locker_drop", "consent_after_drop"}, kinds
    with committed_app.app_context():
        standing = set(
            db.session.scalars(select(Flag.kind).where(Flag.subject_key == tracking_no))
        )
    assert not standing & {"unauthorized_locker_drop", "consent_after_drop"}, standing
    closed = client.post(
        f"/api/v1/shifts/{shift['id']}/close", json={"last_seq": 3}, headers=courier
    )
    assert closed.status_code == 200
    balance = client.get(
        f"/api/v1/shifts/{shift['id']}/balance", headers=auth.headers("door-admin")
    ).get_json()
    assert (balance["status"], balance["unattended"]) == ("balanced", 1), balance


def _drain(client: Any, headers: dict[str, str], cursor: str = "") -> str:
    while True:
        page = client.get(f"{PULL}?cursor={cursor}", headers=headers).get_json()
        cursor = page["next_cursor"]
        if not page["has_more"]:
            return cursor
