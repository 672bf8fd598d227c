"""A PDA offline all afternoon, following README's PDA contract to the letter.

Six hours of scans queued on the PDA (check-outs pushed in the morning; then
deliveries with proof images, failed attempts, consents captured at the door,
locker and pickup-point drops, returns), a PDA clock running seven minutes fast,
an access token that expired meanwhile, a queue too big for one push (413: split),
a push whose answer was lost (sent again under its batch id), parts sent out of
order, images uploaded after their events, and a manager who closed the shift
before the PDA came back. Nothing may be lost, doubled or misjudged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import uuid
from collections import Counter
from typing import Any

import jwt
import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from models import ScanEvent, ServiceClass, Shift
from sync import ingest
from tests import factories
from tests.conftest import TEST_JWT_SECRET, Auth, World

PUSH = "/api/v1/sync/push"
DRIFT = dt.timedelta(minutes=7)  # the PDA's clock runs this much ahead
MAX_EVENTS = 250


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def image(n: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (n % 256, (n // 256) % 256, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


class Pda:
    """The PDA as README describes it: numbers events from 1 with no gap, stamps them
    on its own clock, pushes in batches, refreshes its token on 401, splits on 413,
    retries an unanswered batch under its batch id, prunes up to acked_through_seq."""

    def __init__(self, client: FlaskClient, auth: Auth, username: str, device_id: str) -> None:
        self.client = client
        self.device_id = device_id
        tokens = auth.tokens(username, device_id)
        self.access, self.refresh = tokens["access_token"], tokens["refresh_token"]
        self.seq = 0
        self.queue: list[dict[str, Any]] = []  # recorded, not yet acknowledged
        self.blobs: dict[str, bytes] = {}  # images not uploaded yet
        self.receipts: list[dict[str, Any]] = []
        self.splits = 0  # batches answered 413 and split

    def clock(self, real: dt.datetime) -> dt.datetime:
        return real + DRIFT

    def record(self, tracking_no: str, type: str, at: dt.datetime, **fields: Any) -> dict:
        self.seq += 1
        event = factories.event(self.seq, tracking_no, type, occurred_at=self.clock(at), **fields)
        self.queue.append(event)
        return event

    def photo(self, n: int) -> str:
        data = image(n)
        digest = hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access}"}

    def _refresh(self) -> None:
        response = self.client.post("/api/v1/auth/refresh", json={"refresh_token": self.refresh})
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        self.access, self.refresh = body["access_token"], body["refresh_token"]

    def post(self, url: str, **kwargs: Any) -> Any:
        response = self.client.post(url, headers=self._headers(), **kwargs)
        if response.status_code == 401 and response.get_json()["code"] == "token_expired":
            self._refresh()
            response = self.client.post(url, headers=self._headers(), **kwargs)
        return response

    def body(self, events: list[dict[str, Any]], batch_id: str | None = None) -> dict[str, Any]:
        return factories.push_body(
            self.device_id, events, batch_id=batch_id, sent_at=self.clock(now())
        )

    def push(self, events: list[dict[str, Any]], lose_answer: bool = False) -> dict[str, Any]:
        """One batch: on 413 split it into parts of the limit the answer names, oldest
        first, each under a batch id of its own; an answer lost is asked for again with
        the same batch id and events (``sent_at`` refreshed)."""
        body = self.body(events)
        response = self.post(PUSH, json=body)
        if response.status_code == 413:
            refused = response.get_json()
            assert refused["code"] == "payload_too_large"
            assert refused["limit"] == {"max": MAX_EVENTS, "unit": "events"}
            self.splits += 1
            size = refused["limit"]["max"]
            parts = [events[i : i + size] for i in range(0, len(events), size)]
            for part in parts[:-1]:
                self.push(part)
            return self.push(parts[-1])
        assert response.status_code == 200, response.get_json()
        if lose_answer:
            body["sent_at"] = self.clock(now()).isoformat()
            response = self.post(PUSH, json=body)
            assert response.status_code == 200, response.get_json()
        receipt: dict[str, Any] = response.get_json()
        self.read(receipt)
        return receipt

    def read(self, receipt: dict[str, Any]) -> None:
        """README's reading order: no seq_conflict expected here; drop rejected events;
        prune up to acked_through_seq."""
        self.receipts.append(receipt)
        statuses = Counter(r["status"] for r in receipt["results"])
        assert set(statuses) <= {"applied", "duplicate"}, receipt["results"]
        acked = receipt["acked_through_seq"]
        self.queue = [e for e in self.queue if e["seq"] > acked]

    def upload_images(self) -> None:
        for digest, data in list(self.blobs.items()):
            response = self.client.put(
                f"/api/v1/blobs/{digest}",
                data=data,
                content_type="application/octet-stream",
                headers=self._headers(),
            )
            assert response.status_code in (200, 201), response.get_json()
            del self.blobs[digest]


def expire(pda: Pda, world: World) -> None:
    """The access token the PDA holds expired while it was offline."""
    claims = jwt.decode(pda.access, TEST_JWT_SECRET, algorithms=["HS256"])
    past = int((now() - dt.timedelta(hours=2)).timestamp())
    claims.update(iat=past, exp=past + 3600)
    pda.access = jwt.encode(claims, TEST_JWT_SECRET, algorithm="HS256")


@pytest.fixture
def app_small(app_with: Any) -> Flask:
    app: Flask = app_with(MAX_EVENTS_PER_PUSH=MAX_EVENTS)
    return app


@pytest.mark.parametrize("order", ["in order", "last part first"])
def test_an_afternoon_offline_is_pushed_whole_and_judged_as_recorded(
    app_small: Flask, session: Session, world: World, order: str
) -> None:
    client = app_small.test_client()
    auth = Auth(client)
    manager = auth.headers("manager1")
    express = [factories.parcel(session, world.station).tracking_no for _ in range(240)]
    ordinary = [
        factories.parcel(session, world.station, service_class=ServiceClass.PARCEL).tracking_no
        for _ in range(60)
    ]
    session.commit()
    pda = Pda(client, auth, "courier1", "PDA-0001")
    opened = pda.post("/api/v1/shifts", json={"first_seq": 1})
    assert opened.status_code == 201, opened.get_json()
    shift_id = opened.get_json()["id"]
    morning = now() - dt.timedelta(hours=7)
    stored = session.get(Shift, shift_id)
    assert stored is not None
    stored.opened_at = morning - dt.timedelta(minutes=5)
    session.commit()

    # Morning, online at the station: every parcel checked out, pushed at once.
    everything = express + ordinary
    for n, tracking_no in enumerate(everything):
        pda.record(tracking_no, "checked_out", morning + dt.timedelta(seconds=n))
    pda.push(list(pda.queue))
    assert pda.queue == []

    # The afternoon, offline: a parcel every minute or so.
    start = now() - dt.timedelta(hours=6)
    expected: dict[str, str] = {}
    late_consent: list[str] = []
    for n, tracking_no in enumerate(everything):
        at = start + dt.timedelta(seconds=70 * n)
        pda.record(tracking_no, "out_for_delivery", at)
        kind = n % 6
        if tracking_no in ordinary:
            pda.record(
                tracking_no,
                "delivered_to_pickup_point",
                at + dt.timedelta(seconds=20),
                point_id="PP-9",
                pod={"pickup_code": f"{n:06d}"},
            )
            expected[tracking_no] = "unattended"
        elif kind in (0, 1):
            pod = {"recipient_name": "Li", "signature_sha256": pda.photo(n)}
            pod["photo_sha256"] = pda.photo(10_000 + n)
            pda.record(tracking_no, "delivered", at + dt.timedelta(seconds=30), pod=pod)
            expected[tracking_no] = "delivered"
        elif kind == 2:
            pda.record(
                tracking_no,
                "delivery_attempt_failed",
                at + dt.timedelta(seconds=10),
                reason="recipient_absent",
                action="retry_planned",
            )
            expected[tracking_no] = "returned"
        elif kind in (3, 4):
            consent = {"method": "locker", "channel": "phone_call"}
            pda.record(
                tracking_no, "consent_captured", at + dt.timedelta(seconds=5), consent=consent
            )
            pda.record(
                tracking_no,
                "delivered_to_locker",
                at + dt.timedelta(seconds=40),
                locker_id="L-7",
                compartment=str(n % 30),
                pod={"pickup_code": f"{n:06d}"},
            )
            expected[tracking_no] = "unattended"
        else:  # dropped first, the recipient's yes recorded after
            pda.record(
                tracking_no,
                "delivered_to_locker",
                at + dt.timedelta(seconds=10),
                locker_id="L-7",
                compartment=str(n % 30),
                pod={"pickup_code": f"{n:06d}"},
            )
            consent = {"method": "locker", "channel": "phone_call"}
            pda.record(
                tracking_no, "consent_captured", at + dt.timedelta(seconds=50), consent=consent
            )
            expected[tracking_no] = "unattended_without_consent"
            late_consent.append(tracking_no)
    end = start + dt.timedelta(seconds=70 * len(everything))
    for tracking_no, outcome in expected.items():
        if outcome == "returned":
            pda.record(tracking_no, "returned_to_station", end)
    queued = list(pda.queue)
    assert len(queued) > 2 * MAX_EVENTS

    # Meanwhile, at 19:00, the manager closed the shift the PDA had not come back to:
    # every parcel is missing at handover, for now.
    closed = client.post(f"/api/v1/shifts/{shift_id}/close", json={}, headers=manager)
    assert closed.status_code == 200, closed.get_json()

    # Back in range: the token expired; the queue, too big for one push (413), is
    # pushed in parts, one of whose answers is lost and asked for again.
    expire(pda, world)
    parts = [queued[i : i + 300] for i in range(0, len(queued), 300)]
    pda.splits = 0
    for index, part in enumerate(reversed(parts) if order == "last part first" else parts):
        pda.push(part, lose_answer=index == 1)
    assert pda.queue == []
    assert pda.splits == sum(len(part) > MAX_EVENTS for part in parts)
    sent_before = len(pda.receipts)
    again = pda.push(queued)  # the whole queue again, as a PDA unsure of it rebuilds it
    statuses = {r["status"] for receipt in pda.receipts[sent_before:] for r in receipt["results"]}
    assert statuses == {"duplicate"}
    pda.upload_images()  # after their events, as README allows
    closing = pda.post(f"/api/v1/shifts/{shift_id}/close", json={"last_seq": pda.seq})
    assert closing.status_code == 200, closing.get_json()

    held = session.scalar(
        select(func.count()).select_from(ScanEvent).where(ScanEvent.device_id == "PDA-0001")
    )
    assert held == pda.seq  # nothing lost, nothing doubled
    assert (again["acked_through_seq"], again["missing_seqs"]) == (pda.seq, [])
    found = client.get(f"/api/v1/shifts/{shift_id}/balance", headers=manager).get_json()
    outcomes = {p["tracking_no"]: p["outcome"] for p in found["parcels"]}
    assert outcomes == expected
    assert (found["status"], found["missing"]) == ("unbalanced", 0)
    assert {(d["kind"], d["tracking_no"]) for d in found["discrepancies"]} == {
        ("consent_after_drop", n) for n in late_consent
    }
    flags = client.get(
        "/api/v1/flags", query_string={"limit": 500, "status": "open"}, headers=manager
    ).get_json()["items"]
    # What stands: the drops whose consent came after them, and the PDA's clock.
    assert Counter(f["kind"] for f in flags) == {
        "consent_after_drop": len(late_consent),
        "clock_skew": 1,
    }


@pytest.mark.parametrize("first_attempt", ["answer lost", "never arrived"])
def test_an_afternoon_retried_otherwise_converges(
    app_small: Flask, session: Session, world: World, first_attempt: str
) -> None:
    """Variants the PDA's afternoon may take: an image uploaded before its event; a
    drop at the wrong locker corrected while the batch holding it waited for an answer,
    the retry rebuilt from the PDA's store in another order (its answer lost: the retry
    gets the receipt, one rebuilt with the correction in it is a 409 and nothing is
    stored; never arrived: the retry lands after its correction and the rest); the rest
    of the queue split one way, an answer lost, then split another way and pushed last
    part first; the token expiring between parts. Nothing lost or doubled, and the shift
    balances as recorded: the drop voided, the parcel returned."""
    client = app_small.test_client()
    auth = Auth(client)
    manager = auth.headers("manager1")
    tns = [
        factories.parcel(session, world.station, service_class=ServiceClass.PARCEL).tracking_no
        for _ in range(200)
    ]
    session.commit()
    pda = Pda(client, auth, "courier1", "PDA-0001")
    opened = pda.post("/api/v1/shifts", json={"first_seq": 1})
    assert opened.status_code == 201, opened.get_json()
    shift_id = opened.get_json()["id"]
    start = now() - dt.timedelta(hours=3)
    for n, tn in enumerate(tns):
        pda.record(tn, "checked_out", start + dt.timedelta(seconds=n))
    pda.push(list(pda.queue))

    # An image uploaded before the event naming it.
    early = pda.photo(1)
    pda.upload_images()
    pda.record(
        tns[0],
        "delivered",
        start + dt.timedelta(minutes=30),
        pod={"recipient_name": "Li", "signature_sha256": early},
    )
    # A drop at the wrong locker, pushed; the answer lost.
    drop = pda.record(
        tns[1],
        "delivered_to_locker",
        start + dt.timedelta(minutes=31),
        locker_id="L-1",
        compartment="1",
        pod={"pickup_code": "1"},
    )
    unanswered = pda.body(list(pda.queue))
    if first_attempt == "answer lost":
        assert pda.post(PUSH, json=unanswered).status_code == 200
    # Corrected while the batch waits for its answer, the parcel taken back.
    pda.record(
        tns[1],
        "correction",
        start + dt.timedelta(minutes=32),
        voids_client_event_id=drop["client_event_id"],
        reason="wrong locker",
    )
    # The rest of the afternoon: more than MAX_EVENTS events.
    for n, tn in enumerate(tns[2:], start=2):
        at = start + dt.timedelta(minutes=40, seconds=30 * n)
        pda.record(tn, "out_for_delivery", at)
        pda.record(
            tn,
            "delivered_to_pickup_point",
            at + dt.timedelta(seconds=20),
            point_id="PP-1",
            pod={"pickup_code": str(n)},
        )
    pda.record(tns[1], "returned_to_station", now() - dt.timedelta(minutes=5))
    retry = {**unanswered, "events": unanswered["events"][::-1]}  # rebuilt otherwise
    if first_attempt == "answer lost":
        with_fix = {**retry, "events": [*retry["events"], pda.queue[len(retry["events"])]]}
        refused = pda.post(PUSH, json=with_fix)
        assert (refused.status_code, refused.get_json()["code"]) == (409, "batch_id_reused")
        retry["sent_at"] = pda.clock(now()).isoformat()
        expire(pda, world)
        retried = pda.post(PUSH, json=retry)
        assert retried.status_code == 200, retried.get_json()
        pda.read(retried.get_json())
    # The rest split one way, an answer lost, then another way.
    sent = {e["client_event_id"] for e in unanswered["events"]}
    queued = [e for e in pda.queue if e["client_event_id"] not in sent]
    assert len(queued) > MAX_EVENTS
    assert pda.post(PUSH, json=pda.body(queued[:200])).status_code == 200  # answer lost
    expire(pda, world)
    for part in [queued[i : i + 150] for i in range(0, len(queued), 150)][::-1]:
        pda.push(part)
    if first_attempt == "never arrived":
        # acked below them only: the PDA keeps them and everything after
        assert pda.queue == [*unanswered["events"], *queued]
        retry["sent_at"] = pda.clock(now()).isoformat()
        pda.read(pda.post(PUSH, json=retry).get_json())
    assert pda.queue == []
    closing = pda.post(f"/api/v1/shifts/{shift_id}/close", json={"last_seq": pda.seq})
    assert closing.status_code == 200, closing.get_json()
    held = session.scalar(
        select(func.count()).select_from(ScanEvent).where(ScanEvent.device_id == "PDA-0001")
    )
    assert held == pda.seq
    found = client.get(f"/api/v1/shifts/{shift_id}/balance", headers=manager).get_json()
    outcomes = Counter(p["outcome"] for p in found["parcels"])
    assert outcomes == {"delivered": 1, "returned": 1, "unattended": len(tns) - 2}, found
    flags = client.get(
        "/api/v1/flags", query_string={"limit": 500, "status": "open"}, headers=manager
    ).get_json()["items"]
    assert found["status"] == "balanced", found["discrepancies"]
    # What stands: the corrected drop for a manager to see, and the PDA's clock.
    assert Counter(f["kind"] for f in flags) == {"correction_review": 1, "clock_skew": 1}


def test_an_afternoon_through_a_reboot_an_update_and_clock_jumps_is_held_once(
    app_small: Flask, session: Session, world: World
) -> None:
    """Five hours offline, a thousand events queued behind a morning of check-outs: the
    battery dies mid-round (the clock comes back at its factory date for twenty parcels),
    NTP puts the clock right later on, the PDA reboots and its app numbers from 1 again
    (a bug: those seqs are the morning's), and an app update sends an `app_version` with
    every push. The queue goes in parts too big for one push (413: split), one answer
    lost and asked for again. Following README, the events rejected `seq_conflict` are
    set apart, numbered on after the sign-in's `device_max_seq` and sent again under
    their ids: every event is held once, the acknowledgement reaches the last seq with no
    gap, and the shift balances as recorded."""
    client = app_small.test_client()
    auth = Auth(client)
    manager = auth.headers("manager1")
    tns = [
        factories.parcel(session, world.station, service_class=ServiceClass.PARCEL).tracking_no
        for _ in range(500)
    ]
    session.commit()
    pda = Pda(client, auth, "courier1", "PDA-0001")
    opened = pda.post("/api/v1/shifts", json={"first_seq": 1})
    assert opened.status_code == 201, opened.get_json()
    shift_id = opened.get_json()["id"]
    start = now() - dt.timedelta(hours=6)
    for n, tn in enumerate(tns):
        pda.record(tn, "checked_out", start + dt.timedelta(seconds=n))
    pda.push(list(pda.queue))
    assert pda.queue == []

    afternoon = start + dt.timedelta(minutes=20)
    fast = pda.clock
    factory = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    given = 0
    for n, tn in enumerate(tns):
        at = afternoon + dt.timedelta(seconds=40 * n)
        if n == 200:  # the battery died: the clock came back at its factory date
            pda.clock = lambda real: factory + (real - afternoon)  # type: ignore[method-assign]
        elif n == 220:  # set right by hand, as fast as before
            pda.clock = fast  # type: ignore[method-assign]
        elif n == 300:  # NTP: right from here on
            pda.clock = lambda real: real  # type: ignore[method-assign]
        elif n == 350:  # a reboot: the app numbers from 1 again
            given, pda.seq = pda.seq, 0
        pda.record(tn, "out_for_delivery", at)
        pda.record(
            tn,
            "delivered_to_pickup_point",
            at + dt.timedelta(seconds=20),
            point_id="PP-1",
            pod={"pickup_code": str(n)},
        )
    recorded = list(pda.queue)
    assert len(recorded) == 1000
    expire(pda, world)

    set_apart: list[dict[str, Any]] = []

    def read(receipt: dict[str, Any]) -> None:
        """README's order, for a PDA whose seqs restarted: set apart what was rejected
        `seq_conflict` (nothing else may be), then drop what the receipt holds (by id:
        pruned by seq, the restarted events would go unsent)."""
        rejected = [r for r in receipt["results"] if r["status"] == "rejected"]
        assert {r["error"]["code"] for r in rejected} <= {"seq_conflict"}, rejected
        conflicts = {r["client_event_id"] for r in rejected}
        set_apart.extend(e for e in pda.queue if e["client_event_id"] in conflicts)
        sent = {r["client_event_id"] for r in receipt["results"]}
        pda.queue = [e for e in pda.queue if e["client_event_id"] not in sent]

    def push(events: list[dict[str, Any]], lose_answer: bool = False) -> None:
        body = {**pda.body(events), "app_version": "2.0"}
        response = pda.post(PUSH, json=body)
        if response.status_code == 413:
            size = response.get_json()["limit"]["max"]
            for part in [events[i : i + size] for i in range(0, len(events), size)]:
                push(part, lose_answer)
                lose_answer = False
            return
        assert response.status_code == 200, response.get_json()
        if lose_answer:
            body["sent_at"] = pda.clock(now()).isoformat()
            response = pda.post(PUSH, json=body)
            assert response.status_code == 200, response.get_json()
        assert [w["field"] for w in response.get_json()["warnings"]] == ["app_version"]
        read(response.get_json())

    for index, part in enumerate([recorded[i : i + 400] for i in range(0, 1000, 400)]):
        push(part, lose_answer=index == 1)
    assert pda.queue == []
    assert len(set_apart) == pda.seq  # every restarted seq was the morning's

    tokens = auth.tokens("courier1", "PDA-0001")
    pda.access = tokens["access_token"]
    pda.seq = max(tokens["device_max_seq"], given)
    for event in set_apart:
        pda.seq += 1
        event["seq"] = pda.seq
    pda.queue = list(set_apart)
    push(set_apart)
    assert pda.queue == []

    held = session.scalar(
        select(func.count()).select_from(ScanEvent).where(ScanEvent.device_id == "PDA-0001")
    )
    assert held == len(tns) + len(recorded) == pda.seq  # nothing lost, nothing doubled
    last = pda.post(PUSH, json=pda.body([])).get_json()
    assert (last["acked_through_seq"], last["missing_seqs"]) == (pda.seq, [])
    closing = pda.post(f"/api/v1/shifts/{shift_id}/close", json={"last_seq": pda.seq})
    assert closing.status_code == 200, closing.get_json()
    found = client.get(f"/api/v1/shifts/{shift_id}/balance", headers=manager).get_json()
    assert found["status"] == "balanced", found["discrepancies"]
    assert Counter(p["outcome"] for p in found["parcels"]) == {"unattended": len(tns)}
    # Each event set apart is held under its new seq: its rejection says so, and the
    # manager at 19:00 finds no seq_conflict flag left open, one per restarted seq.
    conflicts = client.get(
        "/api/v1/flags", query_string={"limit": 500, "kind": "seq_conflict"}, headers=manager
    ).get_json()["items"]
    assert len(conflicts) == len(set_apart)
    assert {f["status"] for f in conflicts} == {"closed"}
    rejected = client.get(
        "/api/v1/quarantine", query_string={"limit": 500}, headers=manager
    ).get_json()["items"]
    assert {r["error_code"] for r in rejected} == {"seq_conflict"}
    assert sorted(r["resent_seq"] for r in rejected) == [e["seq"] for e in set_apart]


MAX_BYTES = 24 * 1024  # a body of 300 events is some 80 KiB


class ContractPda(Pda):
    """The PDA app a developer writes from README's **PDA sync** alone: it keeps an
    outbox (each batch with its id, stored before it is sent, so a restarted app sends
    it again as it was), sizes batches by the sign-in's `limits`, splits on either 413,
    waits out a 503's `Retry-After`, sends a 409 `batch_id_reused` batch anew, reads
    each receipt in README's order, and pulls by cursor, dropping its list on a 410."""

    def __init__(self, client: FlaskClient, auth: Auth, username: str, device_id: str) -> None:
        super().__init__(client, auth, username, device_id)
        self.auth = auth
        self.sign_in(username)
        self.outbox: list[dict[str, Any]] = []  # bodies sent, no answer read yet
        self.set_apart: list[dict[str, Any]] = []  # rejected seq_conflict (step 1)
        self.sent: set[str] = set()
        self.bodies_sent: list[int] = []  # every push body's size, in bytes
        self.answers: Counter[tuple[int, str]] = Counter()  # the non-200 answers met
        self.waited: list[int] = []  # Retry-After seconds
        self.cursor: str | None = None
        self.parcels: dict[str, dict[str, Any]] = {}  # the local list the pull keeps

    def sign_in(self, username: str) -> dict[str, Any]:
        tokens = self.auth.tokens(username, self.device_id)
        self.access, self.refresh = tokens["access_token"], tokens["refresh_token"]
        self.limits: dict[str, int] = tokens["limits"]
        return tokens

    def _refresh(self) -> None:
        """A refresh states the limits too: the app sizes by the latest."""
        response = self.client.post("/api/v1/auth/refresh", json={"refresh_token": self.refresh})
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        self.access, self.refresh = body["access_token"], body["refresh_token"]
        self.limits = body["limits"]

    def batches(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The events in bodies within the sign-in's limits, oldest first."""
        bodies: list[dict[str, Any]] = []
        part: list[dict[str, Any]] = []
        for event in sorted(events, key=lambda e: e["seq"]):
            if part and (
                len(part) == self.limits["max_events_per_push"]
                or len(json.dumps(self.body([*part, event]))) > self.limits["max_request_bytes"]
            ):
                bodies.append(self.body(part))
                part = []
            part.append(event)
        return [*bodies, self.body(part)] if part else bodies

    def queue_batches(self, events: list[dict[str, Any]]) -> None:
        """Stored in the outbox before anything is sent: a killed app finds them."""
        self.outbox.extend(self.batches(events))

    def send_outbox(self, kill_after: int | None = None) -> None:
        """Send the outbox oldest first; ``kill_after`` sends that many and is killed
        sending the next: the request reached the server, its answer never read."""
        while self.outbox:
            body = self.outbox[0]
            if kill_after == 0:
                self.client.post(PUSH, json=body, headers=self._headers())
                return
            self.deliver(body)
            self.outbox.pop(0)
            if kill_after is not None:
                kill_after -= 1

    def deliver(self, body: dict[str, Any]) -> None:
        """One body, until it is answered 200, as README says for each other answer."""
        while True:
            body["sent_at"] = self.clock(now()).isoformat()  # refreshed on every retry
            self.bodies_sent.append(len(json.dumps(body)))
            response = self.post(PUSH, json=body)
            answer = response.get_json()
            if response.status_code == 200:
                self.read_receipt(answer)
                return
            self.answers[(response.status_code, answer["code"])] += 1
            if response.status_code == 503:  # nothing stored: the same batch again
                self.waited.append(int(response.headers["Retry-After"]))
            elif response.status_code == 409 and answer["code"] == "batch_id_reused":
                body["batch_id"] = str(uuid.uuid4())  # the same events, a batch of their own
            elif response.status_code == 413 and answer["code"] == "payload_too_large":
                limit = answer["limit"]
                key = "max_events_per_push" if limit["unit"] == "events" else "max_request_bytes"
                self.limits[key] = limit["max"]  # an operator lowered it since the sign-in
                for part in self.batches(body["events"]):
                    self.deliver(part)
                return
            else:
                raise AssertionError(answer)

    def read_receipt(self, receipt: dict[str, Any]) -> None:
        """README's **Read the results before you prune**, steps 1 to 3."""
        self.receipts.append(receipt)
        rejected = {
            r["client_event_id"]: r for r in receipt["results"] if r["status"] == "rejected"
        }
        conflicts = {i for i, r in rejected.items() if r["error"]["code"] == "seq_conflict"}
        self.set_apart.extend(e for e in self.queue if e["client_event_id"] in conflicts)
        self.sent |= {r["client_event_id"] for r in receipt["results"]}
        acked = receipt["acked_through_seq"]
        self.queue = [
            e
            for e in self.queue
            if e["client_event_id"] not in rejected
            and not (e["seq"] <= acked and e["client_event_id"] in self.sent)
        ]

    def pull(self) -> list[dict[str, Any]]:
        """Pull until `has_more` is false; a 410 `cursor_reset` drops the local list."""
        changes: list[dict[str, Any]] = []
        while True:
            query = {"cursor": self.cursor} if self.cursor is not None else {}
            response = self.client.get(
                "/api/v1/sync/pull", query_string=query, headers=self._headers()
            )
            page = response.get_json()
            if response.status_code == 410:
                assert page["code"] == "cursor_reset"
                self.answers[(410, "cursor_reset")] += 1
                self.cursor, self.parcels = None, {}
                continue
            assert response.status_code == 200, page
            for change in page["changes"]:
                if change["kind"] == "parcel_removed":
                    self.parcels.pop(change["tracking_no"], None)
                else:
                    self.parcels[change["tracking_no"]] = change["parcel"]
            changes.extend(page["changes"])
            self.cursor = page["next_cursor"]
            if not page["has_more"]:
                return changes


def test_an_afternoon_by_the_contract_in_bytes_killed_handed_over_and_pulled(
    app_with: Any, session: Session, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The courier's PDA offline all afternoon, its app written from README alone: 300
    events queued (deliveries, consents captured at the door before locker drops, failed
    attempts, a clock typed an hour ahead for a few scans), pushed in bodies sized by
    the sign-in's `max_request_bytes`, which an operator lowers meanwhile (413 in bytes:
    split); a 503 waited out; an answer lost; the app killed mid-push and restarted,
    sending its outbox again, one batch rebuilt with an event more (409: sent anew);
    the handover, and the next courier on the same PDA, whose pull with the first
    courier's cursor is a 410. Nothing lost or doubled, the shift balanced as recorded,
    each courier's list what they hold."""
    app = app_with(MAX_CONTENT_LENGTH=MAX_BYTES)
    client = app.test_client()
    auth = Auth(client)
    manager = auth.headers("manager1")
    courier2 = factories.user(session, "courier2", "courier", world.station)
    parcels = [factories.parcel(session, world.station) for _ in range(125)]
    for parcel in parcels[:115]:
        parcel.courier_id = parcel.planned_courier_id = world.courier.id
    for parcel in parcels[115:]:
        parcel.courier_id = parcel.planned_courier_id = courier2.id
    session.commit()
    mine = [p.tracking_no for p in parcels[:115]]
    pda = ContractPda(client, auth, "courier1", "PDA-0001")
    assert pda.limits["max_request_bytes"] == MAX_BYTES
    opened = pda.post("/api/v1/shifts", json={"first_seq": 1})
    assert opened.status_code == 201, opened.get_json()
    shift_id = opened.get_json()["id"]

    # Morning, at the station: the list pulled, every parcel checked out and pushed.
    pda.pull()
    assert set(pda.parcels) == set(mine)
    morning = now() - dt.timedelta(hours=7)
    for n, tn in enumerate(mine):
        pda.record(tn, "checked_out", morning + dt.timedelta(seconds=n))
    pda.queue_batches(list(pda.queue))
    pda.send_outbox()
    assert pda.queue == [] and pda.answers == {}

    # The afternoon, offline: 300 events.
    start = now() - dt.timedelta(hours=6)
    expected: dict[str, str] = {}
    consented: list[str] = []
    for n, tn in enumerate(mine):
        at = start + dt.timedelta(seconds=150 * n)
        if 40 <= n < 45:  # the date typed a day ahead, put right by NTP after
            pda.clock = lambda real: real + DRIFT + dt.timedelta(days=1)  # type: ignore[method-assign]
        elif n == 45:
            pda.clock = lambda real: real + DRIFT  # type: ignore[method-assign]
        pda.record(tn, "out_for_delivery", at)
        if n % 3 == 0:
            pod = {"recipient_name": "Li", "signature_sha256": pda.photo(n)}
            pda.record(tn, "delivered", at + dt.timedelta(seconds=30), pod=pod)
            expected[tn] = "delivered"
        elif n % 3 == 1:
            consent = {"method": "locker", "channel": "in_person"}
            pda.record(tn, "consent_captured", at + dt.timedelta(seconds=5), consent=consent)
            pda.record(
                tn,
                "delivered_to_locker",
                at + dt.timedelta(seconds=40),
                locker_id="L-7",
                compartment=str(n),
                pod={"pickup_code": f"{n:06d}"},
            )
            expected[tn] = "unattended"
            consented.append(tn)
        else:
            pda.record(
                tn,
                "delivery_attempt_failed",
                at + dt.timedelta(seconds=10),
                reason="recipient_absent",
                action="retry_planned",
            )
            expected[tn] = "returned"
    for tn, outcome in expected.items():
        if outcome == "returned":
            pda.record(tn, "returned_to_station", start + dt.timedelta(hours=5))
    afternoon = list(pda.queue)
    assert len(afternoon) >= 300

    # Back in range: the outbox sized by the sign-in's limits.
    pda.queue_batches(afternoon)
    assert len(pda.outbox) > 2
    expire(pda, world)
    pda.send_outbox(kill_after=1)  # the first answered; killed while sending the second
    killed_events = list(pda.outbox[0]["events"])
    left_out = pda.outbox[0]["events"][-1]
    # Restarted, the app rebuilds the unanswered batch from its store, which had not
    # kept its last event: one less under its batch id, a 409, sent anew.
    pda.outbox[0] = {**pda.outbox[0], "events": pda.outbox[0]["events"][:-1]}
    pda.deliver(pda.outbox.pop(0))
    assert pda.answers == {(409, "batch_id_reused"): 1}
    pda.send_outbox(kill_after=0)  # killed again: the next batch stored, no answer read
    killed_events += pda.outbox[0]["events"]
    # An operator halves the body limit: the batch sent again and the next ones are
    # refused 413 in bytes and split (what the first attempt stored comes back
    # `duplicate`); the database goes away during one push (503, nothing stored).
    lowered = app_with(MAX_CONTENT_LENGTH=MAX_BYTES // 2)
    pda.client = lowered.test_client()
    lowered_at = len(pda.bodies_sent)
    insert = ingest._BatchIngest._insert
    failures = [1]

    def database_away_once(self: Any, fresh: Any) -> Any:
        if failures:
            failures.pop()
            raise OperationalError("INSERT", {}, Exception("server closed the connection"))
        return insert(self, fresh)

    monkeypatch.setattr(ingest._BatchIngest, "_insert", database_away_once)
    pda.send_outbox()
    monkeypatch.undo()
    assert pda.set_apart == []
    assert pda.answers[(503, "database_unavailable")] == 1 and pda.waited
    assert pda.answers[(413, "payload_too_large")] >= 1
    # What the killed attempts stored came back `duplicate` to the batches sent anew.
    killed = {e["client_event_id"] for e in killed_events}
    assert {
        r["status"] for receipt in pda.receipts for r in receipt["results"]
        if r["client_event_id"] in killed
    } == {"duplicate"}  # fmt: skip
    # Every body over the lowered limit was refused, every one within it taken.
    over = [size for size in pda.bodies_sent[lowered_at:] if size > MAX_BYTES // 2]
    assert len(over) == pda.answers[(413, "payload_too_large")]
    # The event the rebuilt batch left out was never acknowledged: still queued.
    assert [e["client_event_id"] for e in pda.queue] == [left_out["client_event_id"]]
    pda.queue_batches([e for e in pda.queue if e["client_event_id"] not in pda.sent])
    pda.send_outbox()
    assert pda.queue == []
    assert pda.receipts[-1]["acked_through_seq"] == pda.seq

    # Back at the station: the pull brings the consents captured at the door.
    changes = pda.pull()
    assert Counter(c["kind"] for c in changes)["consent"] == len(consented)
    at_the_door = [{"method": "locker", "point_id": None, "expires_at": None}]
    assert all(pda.parcels[tn]["consents"] == at_the_door for tn in consented)
    # The handover: images uploaded, the shift closed with its last seq.
    pda.upload_images()
    closing = pda.post(f"/api/v1/shifts/{shift_id}/close", json={"last_seq": pda.seq})
    assert closing.status_code == 200, closing.get_json()
    found = client.get(f"/api/v1/shifts/{shift_id}/balance", headers=manager).get_json()
    assert (found["status"], found["discrepancies"]) == ("balanced", [])
    assert {p["tracking_no"]: p["outcome"] for p in found["parcels"]} == expected

    # The next courier takes the PDA. The first signs out (README: a copy of their
    # tokens left on it stops at once); the PDA numbers on; the cursor it kept is the
    # first courier's (410: the list dropped and pulled whole).
    first_access = pda.access
    signed_out = client.post("/api/v1/auth/logout", json={"refresh_token": pda.refresh})
    assert signed_out.status_code == 204
    tokens = pda.sign_in("courier2")
    stale = client.get("/api/v1/sync/pull", headers={"Authorization": f"Bearer {first_access}"})
    assert (stale.status_code, stale.get_json()["code"]) == (401, "token_revoked")
    assert tokens["device_max_seq"] == pda.seq
    opened = pda.post("/api/v1/shifts", json={"first_seq": pda.seq + 1})
    assert opened.status_code == 201, opened.get_json()
    theirs = [p.tracking_no for p in parcels[115:]]
    pda.pull()
    assert pda.answers[(410, "cursor_reset")] == 1
    assert set(pda.parcels) == set(theirs)
    evening = now() - dt.timedelta(minutes=50)
    for n, tn in enumerate(theirs):
        pda.record(tn, "checked_out", evening + dt.timedelta(seconds=n))
    consent = {"method": "pickup_point", "point_id": "pp-3", "channel": "phone_call"}
    pda.record(theirs[0], "consent_captured", evening + dt.timedelta(minutes=5), consent=consent)
    pda.record(
        theirs[0],
        "delivered_to_pickup_point",
        evening + dt.timedelta(minutes=9),
        point_id="PP-3",
        pod={"pickup_code": "3"},
    )
    pda.queue_batches(list(pda.queue))
    pda.send_outbox()
    assert pda.queue == []
    changes = pda.pull()
    assert ("consent", theirs[0]) in {(c["kind"], c["tracking_no"]) for c in changes}
    at_the_point = [{"method": "pickup_point", "point_id": "PP-3", "expires_at": None}]
    assert pda.parcels[theirs[0]]["consents"] == at_the_point
    held = session.scalar(
        select(func.count()).select_from(ScanEvent).where(ScanEvent.device_id == "PDA-0001")
    )
    assert held == pda.seq  # nothing lost, nothing doubled
    last = pda.receipts[-1]
    assert (last["acked_through_seq"], last["missing_seqs"]) == (pda.seq, [])
    flags = client.get(
        "/api/v1/flags", query_string={"limit": 500, "status": "open"}, headers=manager
    ).get_json()["items"]
    # What stands: the day typed ahead (its scans dated after their push, and the scan
    # after NTP put it right dated before them) and the PDA's clock.
    assert Counter(f["kind"] for f in flags) == {
        "clock_jump": 1,
        "time_inversion": 1,
        "clock_skew": 1,
    }


def test_a_shift_the_manager_closed_while_its_pda_was_offline_balances_when_it_comes_back(
    app_with: Any, session: Session, world: World
) -> None:
    """README (Shifts): a shift a manager closed at 19:00 without its `last_seq`, its PDA
    still out of range, takes the `last_seq` the PDA declares when it comes back. The
    PDA, written from README alone, pushes its afternoon, one event of which is refused
    for a mistyped number (README step 2: sent again corrected, same id and seq), then
    closes the shift itself with its `last_seq`: the close is taken, the returns scanned
    at the counter after the manager's close are the shift's, and the balance is what
    the courier recorded, nothing missing."""
    app = app_with(MAX_CONTENT_LENGTH=MAX_BYTES)
    client = app.test_client()
    auth = Auth(client)
    manager = auth.headers("manager1")
    parcels = [factories.parcel(session, world.station) for _ in range(6)]
    for parcel in parcels:
        parcel.courier_id = parcel.planned_courier_id = world.courier.id
    session.commit()
    mine = [p.tracking_no for p in parcels]
    pda = ContractPda(client, auth, "courier1", "PDA-0001")
    opened = pda.post("/api/v1/shifts", json={"first_seq": 1})
    assert opened.status_code == 201, opened.get_json()
    shift_id = opened.get_json()["id"]
    pda.pull()
    morning = now() - dt.timedelta(hours=7)
    for n, tn in enumerate(mine):
        pda.record(tn, "checked_out", morning + dt.timedelta(seconds=n))
    pda.queue_batches(list(pda.queue))
    pda.send_outbox()
    assert pda.queue == []

    # Offline: three delivered, three failed and brought back.
    start = now() - dt.timedelta(hours=5)
    for n, tn in enumerate(mine[:3]):
        pod = {"recipient_name": "Li", "signature_sha256": pda.photo(n)}
        pda.record(tn, "delivered", start + dt.timedelta(minutes=10 * n), pod=pod)
    for n, tn in enumerate(mine[3:]):
        pda.record(
            tn,
            "delivery_attempt_failed",
            start + dt.timedelta(minutes=40 + n),
            reason="recipient_absent",
            action="retry_planned",
        )
    # 19:00: the manager closes the shift, the PDA still out of range.
    closed = client.post(f"/api/v1/shifts/{shift_id}/close", json={}, headers=manager)
    assert closed.status_code == 200, closed.get_json()
    # Back at the counter after that close: the returns scanned, one number mistyped.
    back = now() + dt.timedelta(minutes=20)
    for tn in mine[3:]:
        pda.record(tn, "returned_to_station", back)
    mistyped = pda.queue[-1]
    right = mistyped["tracking_no"]
    mistyped["tracking_no"] = right[:2] + ("1" if right[2] != "1" else "2") + right[3:]
    pda.queue_batches(list(pda.queue))
    pda.send_outbox()
    [refused] = [
        r for r in pda.receipts[-1]["results"] if r["status"] == "rejected"
    ]  # README step 2: corrected on the PDA, sent again under its id and seq
    assert refused["client_event_id"] == mistyped["client_event_id"]
    assert refused["error"]["field"] == "tracking_no"
    assert pda.set_apart == []
    corrected = {**mistyped, "tracking_no": right}
    pda.queue.append(corrected)
    pda.queue_batches([corrected])
    pda.send_outbox()
    assert pda.queue == []
    assert pda.receipts[-1]["acked_through_seq"] == pda.seq
    pda.upload_images()
    closing = pda.post(f"/api/v1/shifts/{shift_id}/close", json={"last_seq": pda.seq})
    assert closing.status_code == 200, closing.get_json()
    found = client.get(f"/api/v1/shifts/{shift_id}/balance", headers=manager).get_json()
    assert (found["status"], found["discrepancies"]) == ("balanced", [])
    outcomes = {p["tracking_no"]: p["outcome"] for p in found["parcels"]}
    assert outcomes == {tn: "delivered" for tn in mine[:3]} | {tn: "returned" for tn in mine[3:]}


def test_a_pda_that_numbered_from_1_again_recovers_by_the_contract_and_leaves_nothing_open(
    app_with: Any, session: Session, world: World
) -> None:
    """README's **Read the results before you prune**, all four steps, by the PDA app
    written from README alone: its app numbered the afternoon from 1 again (a bug after
    an update), so every event of it is refused `seq_conflict`; set apart (step 1), it
    signs in again and sends them under seqs after the higher of `device_max_seq` and
    its own (step 4). Every event is held once, each rejection names the seq it is held
    under, the manager is left no `seq_conflict` flag open, and the shift balances."""
    app = app_with(MAX_CONTENT_LENGTH=MAX_BYTES)
    client = app.test_client()
    auth = Auth(client)
    manager = auth.headers("manager1")
    parcels = [factories.parcel(session, world.station) for _ in range(5)]
    for parcel in parcels:
        parcel.courier_id = parcel.planned_courier_id = world.courier.id
    session.commit()
    mine = [p.tracking_no for p in parcels]
    pda = ContractPda(client, auth, "courier1", "PDA-0001")
    opened = pda.post("/api/v1/shifts", json={"first_seq": 1})
    assert opened.status_code == 201, opened.get_json()
    shift_id = opened.get_json()["id"]
    morning = now() - dt.timedelta(hours=7)
    for n, tn in enumerate(mine):
        pda.record(tn, "checked_out", morning + dt.timedelta(seconds=n))
    pda.queue_batches(list(pda.queue))
    pda.send_outbox()

    pda.seq = 0  # the bug: numbered from 1 again, all afternoon
    start = now() - dt.timedelta(hours=5)
    for n, tn in enumerate(mine):
        pod = {"recipient_name": "Li", "signature_sha256": pda.photo(n)}
        pda.record(tn, "delivered", start + dt.timedelta(minutes=10 * n), pod=pod)
    afternoon = list(pda.queue)
    pda.queue_batches(afternoon)
    pda.send_outbox()
    assert [e["client_event_id"] for e in pda.set_apart] == [
        e["client_event_id"] for e in afternoon
    ]
    assert pda.queue == []  # step 3: nothing set apart was pruned with the rest

    tokens = pda.sign_in("courier1")  # step 4
    first = max(tokens["device_max_seq"], pda.seq) + 1
    renumbered = [{**e, "seq": first + n} for n, e in enumerate(pda.set_apart)]
    pda.set_apart, pda.queue = [], list(renumbered)
    pda.seq = renumbered[-1]["seq"]
    pda.queue_batches(renumbered)
    pda.send_outbox()
    assert pda.set_apart == [] and pda.queue == []
    assert {r["status"] for r in pda.receipts[-1]["results"]} == {"applied"}
    assert (pda.receipts[-1]["acked_through_seq"], pda.receipts[-1]["missing_seqs"]) == (
        pda.seq,
        [],
    )

    pda.upload_images()
    closing = pda.post(f"/api/v1/shifts/{shift_id}/close", json={"last_seq": pda.seq})
    assert closing.status_code == 200, closing.get_json()
    found = client.get(f"/api/v1/shifts/{shift_id}/balance", headers=manager).get_json()
    assert (found["status"], found["discrepancies"]) == ("balanced", [])
    assert {p["tracking_no"]: p["outcome"] for p in found["parcels"]} == dict.fromkeys(
        mine, "delivered"
    )
    rejected = client.get(
        "/api/v1/quarantine", query_string={"device_id": "PDA-0001"}, headers=manager
    ).get_json()["items"]
    resent = {e["client_event_id"]: e["seq"] for e in renumbered}
    assert {r["client_event_id"]: r["resent_seq"] for r in rejected} == resent
    flags = client.get(
        "/api/v1/flags", query_string={"limit": 500, "status": "open"}, headers=manager
    ).get_json()["items"]
    assert "seq_conflict" not in {f["kind"] for f in flags}, flags
