"""Webhook delivery against a real HTTP receiver on loopback, with controlled time.

``now`` is passed in: a retry is made due by calling the worker later, never by
sleeping. The receiver (``tests.webhook_receiver``) is a real ``ThreadingHTTPServer``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import random
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import Connection, select, update
from sqlalchemy import text as sql
from sqlalchemy.orm import Session, sessionmaker

from courier_api.config import load_config
from courier_api.extensions import db
from models import (
    AuditEntry,
    ConsentMethod,
    ConsentRequest,
    ConsentRequestStatus,
    DeliveryStatus,
    Flag,
    FlagStatus,
    OutboxMessage,
    Station,
    WebhookDelivery,
    WebhookSubscription,
)
from sync import consent_requests, outbox, webhooks
from sync.errors import Conflict, InvalidInput
from sync.webhooks import DeliverySettings, HttpxSender, SendResult
from tests import factories
from tests.conftest import World
from tests.webhook_receiver import Answer, Receiver, closed_port_url

T0 = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)
SETTINGS = DeliverySettings(
    max_attempts=8,
    backoff_seconds=5,
    backoff_max_seconds=3600,
    timeout_seconds=2,
    max_response_bytes=4096,
    disable_after_failures=20,
)
LATER = dt.timedelta(hours=2)  # longer than any backoff: every retry is due again


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


@pytest.fixture
def sessions(connection: Connection) -> sessionmaker[Session]:
    """Sessions in the test's transaction, each committing to a savepoint."""
    return sessionmaker(
        bind=connection, expire_on_commit=False, join_transaction_mode="create_savepoint"
    )


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as receiver:
        yield receiver


@pytest.fixture
def sender() -> Iterator[HttpxSender]:
    with HttpxSender(SETTINGS) as sender:
        yield sender


def subscribe(
    sessions: sessionmaker[Session],
    url: str,
    topics: tuple[str, ...] = ("parcel.in_locker",),
    station_id: int | None = None,
) -> WebhookSubscription:
    with sessions.begin() as session:
        return webhooks.create_subscription(
            session=session, url=url, topics=topics, station_id=station_id, production=False
        )


def announce(
    sessions: sessionmaker[Session],
    key: str = "RR473124829GB",
    *,
    topic: str = "parcel.in_locker",
    station_id: int | None = None,
    now: dt.datetime = T0,
    **data: Any,
) -> OutboxMessage | None:
    """A committed change that announced ``topic`` about parcel ``key``."""
    with sessions.begin() as session:
        return outbox.announce(
            session=session,
            topic=topic,
            ordering_key=key,
            station_id=station_id,
            data={"tracking_no": key, "locker_id": "L-7", "compartment": "B12", **data},
            now=now,
        )


@contextlib.contextmanager
def delivering(
    sessions: sessionmaker[Session], sender: webhooks.Sender, settings: DeliverySettings
) -> Iterator[dict[str, Any]]:
    """``deliver`` at ``T0`` on a thread of its own; its counts once the block ends."""
    stats: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: stats.update(deliver(sessions, sender, T0, settings=settings))
    )
    worker.start()
    try:
        yield stats
    finally:
        worker.join(timeout=10)


def deliver(
    sessions: sessionmaker[Session],
    sender: webhooks.Sender,
    now: dt.datetime,
    *,
    settings: DeliverySettings = SETTINGS,
    worker: str = "worker-a",
) -> dict[str, Any]:
    return webhooks.deliver_due(
        sessions=sessions,
        now=now,
        settings=settings,
        sender=sender,
        worker_id=worker,
        rng=random.Random(7),
    )


def stored(sessions: sessionmaker[Session]) -> list[WebhookDelivery]:
    with sessions() as session:
        return list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


def subscription(sessions: sessionmaker[Session], id: int) -> WebhookSubscription:
    with sessions() as session:
        found = session.get(WebhookSubscription, id)
        assert found is not None
        return found


def message_ids(bodies: list[bytes]) -> list[str]:
    return [json.loads(body)["id"] for body in bodies]


# -- what is sent -----------------------------------------------------------------------------


def test_the_request_is_signed_and_the_signature_fails_when_body_or_secret_change(
    sessions: sessionmaker[Session], receiver: Receiver, sender: HttpxSender, world: World
) -> None:
    sub = subscribe(sessions, receiver.url)
    message = announce(sessions, station_id=world.station.id, pickup_code="4711")
    assert message is not None

    assert deliver(sessions, sender, T0)["delivered"] == 1

    [request] = receiver.requests
    [delivery] = stored(sessions)
    headers = request.headers
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"].startswith("courier-field-api/")
    assert headers["x-courier-topic"] == "parcel.in_locker"
    assert headers["x-courier-delivery"] == str(delivery.delivery_id)
    assert headers["x-courier-attempt"] == "1"
    envelope = json.loads(request.body)
    assert envelope == {
        "id": str(message.id),
        "delivery_id": str(delivery.delivery_id),  # signed, as the header is not
        "topic": "parcel.in_locker",
        "created_at": T0.isoformat(),
        "station_id": world.station.id,
        "data": {
            "tracking_no": "RR473124829GB",
            "locker_id": "L-7",
            "compartment": "B12",
            "pickup_code": "4711",
        },
    }
    assert request.body == json.dumps(envelope, separators=(",", ":")).encode()  # compact

    signature = headers["x-courier-signature"]
    assert signature.startswith(f"t={int(T0.timestamp())},v1=")
    assert webhooks.verify(sub.secret, signature, request.body, now=T0)
    assert webhooks.verify(sub.secret, signature, request.body, now=T0.timestamp() + 299)
    assert not webhooks.verify(sub.secret, signature, request.body + b" ", now=T0)
    tampered = request.body.replace(b"4711", b"4712")
    assert not webhooks.verify(sub.secret, signature, tampered, now=T0)
    assert not webhooks.verify(sub.secret + "x", signature, request.body, now=T0)
    assert not webhooks.verify(sub.secret, signature, request.body, now=at(301))  # stale
    assert not webhooks.verify(sub.secret, signature, request.body, now=at(-301))
    assert not webhooks.verify(sub.secret, "v1=" + "0" * 64, request.body, now=T0)
    assert not webhooks.verify(sub.secret, "garbage", request.body, now=T0)


def test_sign_is_hmac_sha256_over_timestamp_dot_body() -> None:
    import hashlib
    import hmac

    body = b'{"a":1}'
    expected = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert webhooks.sign("s3cret", 1700000000, body) == f"t=1700000000,v1={expected}"


# -- retries ----------------------------------------------------------------------------------


def test_a_receiver_failing_twice_then_answering_gets_the_message_once_with_one_id(
    sessions: sessionmaker[Session], receiver: Receiver, sender: HttpxSender
) -> None:
    sub = subscribe(sessions, receiver.url)
    announce(sessions)
    receiver.answer(Answer(500, b"database down"), Answer(503, b"busy"))

    first = deliver(sessions, sender, T0)
    assert (first["failed"], first["delivered"]) == (1, 0)
    [delivery] = stored(sessions)
    assert delivery.status == DeliveryStatus.PENDING and delivery.attempts == 1
    assert delivery.last_status_code == 500
    assert delivery.last_error == "HTTP 500: database down"
    assert delivery.next_attempt_at > T0 and delivery.claimed_by is None

    assert deliver(sessions, sender, T0)["claimed"] == 0  # not due before its backoff
    assert deliver(sessions, sender, delivery.next_attempt_at)["failed"] == 1
    third = stored(sessions)[0]
    assert third.last_error == "HTTP 503: busy"
    assert deliver(sessions, sender, third.next_attempt_at)["delivered"] == 1

    assert [r.status for r in receiver.requests] == [500, 503, 200]
    assert {r.delivery_id for r in receiver.requests} == {str(delivery.delivery_id)}
    assert [r.headers["x-courier-attempt"] for r in receiver.requests] == ["1", "2", "3"]
    assert len({r.body for r in receiver.requests}) == 1  # the same bytes every time
    assert list(receiver.messages) == [str(delivery.delivery_id)]
    [done] = stored(sessions)
    assert done.status == DeliveryStatus.DELIVERED
    assert (done.attempts, done.last_status_code, done.last_error) == (3, 200, None)
    assert done.delivered_at == done.last_attempt_at
    assert subscription(sessions, sub.id).consecutive_failures == 0  # reset by the success
    assert deliver(sessions, sender, T0 + LATER)["claimed"] == 0  # nothing left to send


def test_a_receiver_down_for_good_leaves_the_message_dead_with_its_error(
    sessions: sessionmaker[Session], sender: HttpxSender
) -> None:
    subscribe(sessions, closed_port_url())
    announce(sessions)
    now = T0
    for attempt in range(1, SETTINGS.max_attempts + 1):
        stats = deliver(sessions, sender, now)
        [delivery] = stored(sessions)
        assert delivery.attempts == attempt
        if attempt < SETTINGS.max_attempts:
            assert stats["failed"] == 1 and delivery.status == DeliveryStatus.PENDING
            now = delivery.next_attempt_at
    assert stats["dead"] == 1
    assert delivery.status == DeliveryStatus.DEAD
    assert delivery.last_status_code is None and delivery.delivered_at is None
    assert delivery.last_error is not None and delivery.last_error.startswith("ConnectError")
    assert deliver(sessions, sender, now + LATER)["claimed"] == 0  # parked, not retried


def test_a_redirect_is_a_failure_and_is_not_followed(
    sessions: sessionmaker[Session], receiver: Receiver, sender: HttpxSender
) -> None:
    subscribe(sessions, receiver.url)
    announce(sessions)
    receiver.answer(Answer(302, b"", headers={"Location": receiver.url + "/elsewhere"}))

    assert deliver(sessions, sender, T0)["failed"] == 1

    assert [r.path for r in receiver.requests] == ["/hook"]  # never /hook/elsewhere
    [delivery] = stored(sessions)
    assert delivery.status == DeliveryStatus.PENDING and delivery.last_status_code == 302
    assert delivery.last_error == "HTTP 302 (redirects are not followed)"


def test_a_huge_answer_is_read_up_to_the_limit_only(
    sessions: sessionmaker[Session], receiver: Receiver, sender: HttpxSender
) -> None:
    huge = b"x" * 2_000_000
    receiver.answer(Answer(200, huge))
    result = sender.send(url=receiver.url, body=b"{}", headers={})
    assert result.ok and result.truncated
    assert result.bytes_read == SETTINGS.max_response_bytes == len(result.body)

    receiver.answer(Answer(200, b"y" * SETTINGS.max_response_bytes))  # exactly the limit
    exact = sender.send(url=receiver.url, body=b"{}", headers={})
    assert exact.bytes_read == SETTINGS.max_response_bytes and not exact.truncated

    subscribe(sessions, receiver.url)
    announce(sessions)
    receiver.answer(Answer(500, huge))
    assert deliver(sessions, sender, T0)["failed"] == 1
    [delivery] = stored(sessions)
    assert delivery.last_error == "HTTP 500: " + "x" * 500  # the first 500 characters


def test_a_receiver_slower_than_the_timeout_is_a_failed_attempt(receiver: Receiver) -> None:
    receiver.answer(Answer(200, delay=10))
    with HttpxSender(replace(SETTINGS, timeout_seconds=1)) as sender:
        started = time.monotonic()
        result = sender.send(url=receiver.url, body=b"{}", headers={})
        elapsed = time.monotonic() - started
    assert not result.ok and result.status_code is None
    assert result.error is not None and result.error.startswith("timed out after 1 s")
    assert elapsed < 3


def test_a_sender_that_raises_counts_as_a_failed_attempt(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    class Broken:
        def send(self, *, url: str, body: bytes, headers: Mapping[str, str]) -> SendResult:
            raise RuntimeError("bug in the sender")

        def close(self) -> None:
            pass

    subscribe(sessions, receiver.url)
    announce(sessions)
    assert deliver(sessions, Broken(), T0)["failed"] == 1
    assert stored(sessions)[0].last_error == "RuntimeError: bug in the sender"


def test_backoff_grows_exponentially_is_capped_and_jittered_within_bounds() -> None:
    rng = random.Random(1)
    for failures in range(1, 16):
        ceiling = min(60.0, 5 * 2 ** (failures - 1))
        delays = [
            webhooks.backoff_delay(failures, base=5, maximum=60, rng=rng).total_seconds()
            for _ in range(200)
        ]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), failures
        assert len(set(delays)) > 150  # jittered, not a fixed step
        assert max(delays) > ceiling * 0.9 and min(delays) < ceiling * 0.6
    assert webhooks.backoff_delay(1000, base=5, maximum=60, rng=rng) <= dt.timedelta(seconds=60)
    seeded = [webhooks.backoff_delay(3, base=5, maximum=60, rng=random.Random(9)) for _ in "ab"]
    assert seeded[0] == seeded[1]  # a seeded generator makes it deterministic


def test_stored_retries_wait_longer_after_each_failure_within_the_jitter(
    sessions: sessionmaker[Session], sender: HttpxSender
) -> None:
    subscribe(sessions, closed_port_url())
    announce(sessions)
    now = T0
    waits = []
    for failures in range(1, 6):
        deliver(sessions, sender, now)
        [delivery] = stored(sessions)
        assert delivery.last_attempt_at is not None
        wait = (delivery.next_attempt_at - delivery.last_attempt_at).total_seconds()
        ceiling = SETTINGS.backoff_seconds * 2 ** (failures - 1)
        assert ceiling / 2 <= wait <= ceiling, (failures, wait)
        waits.append(wait)
        now = delivery.next_attempt_at
    assert waits[-1] > waits[0] * 4


# -- order ------------------------------------------------------------------------------------


def test_messages_of_one_parcel_arrive_in_order_while_other_parcels_go_ahead(
    sessions: sessionmaker[Session], receiver: Receiver, sender: HttpxSender
) -> None:
    subscribe(sessions, receiver.url)
    first = announce(sessions, "RR000000001GB", compartment="A1")
    second = announce(sessions, "RR000000001GB", compartment="A2")
    other = announce(sessions, "RR000000002GB", compartment="C3")
    assert first and second and other
    receiver.answer(Answer(500, b"try later"))  # the first message fails once

    stats = deliver(sessions, sender, T0)

    assert (stats["failed"], stats["delivered"]) == (1, 1)
    assert message_ids([r.body for r in receiver.requests]) == [str(first.id), str(other.id)]
    # The second message of the parcel waits for the first, even when it is due.
    assert deliver(sessions, sender, at(1))["claimed"] == 0
    pending = [d for d in stored(sessions) if d.status == DeliveryStatus.PENDING]
    assert [d.message_id for d in pending] == [first.id, second.id]

    retry = deliver(sessions, sender, T0 + LATER)

    assert retry["delivered"] == 2
    sent = message_ids([r.body for r in receiver.requests])
    assert sent == [str(first.id), str(other.id), str(first.id), str(second.id)]
    acknowledged = message_ids(list(receiver.messages.values()))
    assert acknowledged == [str(other.id), str(first.id), str(second.id)]
    assert {d.status for d in stored(sessions)} == {DeliveryStatus.DELIVERED}


def test_a_dead_message_does_not_hold_back_the_next_one_of_its_parcel(
    sessions: sessionmaker[Session], receiver: Receiver, sender: HttpxSender
) -> None:
    subscribe(sessions, receiver.url)
    first = announce(sessions, "RR000000001GB")
    second = announce(sessions, "RR000000001GB")
    assert first and second
    receiver.answer(Answer(500))

    stats = deliver(sessions, sender, T0, settings=replace(SETTINGS, max_attempts=1))

    assert (stats["dead"], stats["delivered"]) == (1, 1)
    assert [d.status for d in stored(sessions)] == [DeliveryStatus.DEAD, DeliveryStatus.DELIVERED]
    assert list(receiver.messages.values()) and message_ids(list(receiver.messages.values())) == [
        str(second.id)
    ]


def test_each_subscription_has_its_own_order(
    sessions: sessionmaker[Session], receiver: Receiver, sender: HttpxSender
) -> None:
    """A receiver that fails holds back its own messages of the parcel, not another's."""
    with Receiver() as healthy:
        subscribe(sessions, receiver.url)
        subscribe(sessions, healthy.url)
        announce(sessions, "RR000000001GB")
        announce(sessions, "RR000000001GB")
        receiver.answer(Answer(500))

        deliver(sessions, sender, T0)

        assert len(healthy.messages) == 2 and len(receiver.messages) == 0


# -- subscriptions that keep failing ----------------------------------------------------------


def test_a_subscription_failing_too_often_in_a_row_is_disabled_flagged_and_enabled_again(
    sessions: sessionmaker[Session], receiver: Receiver, sender: HttpxSender, world: World
) -> None:
    settings = replace(SETTINGS, disable_after_failures=3, disable_after_seconds=0)
    sub = subscribe(sessions, closed_port_url(), station_id=world.station.id)
    for n in range(3):
        announce(sessions, f"RR00000000{n}GB", station_id=world.station.id)

    stats = deliver(sessions, sender, T0, settings=settings)

    assert stats["failed"] == 3 and stats["disabled"] == [sub.id]
    disabled = subscription(sessions, sub.id)
    assert disabled.disabled_at is not None and disabled.active
    assert disabled.consecutive_failures == 3
    assert disabled.disabled_reason is not None
    assert disabled.disabled_reason.startswith("3 delivery attempts failed in a row")
    with sessions() as session:
        [flag] = session.scalars(select(Flag).where(Flag.kind == webhooks.SUBSCRIPTION_DISABLED))
    assert (flag.subject_type, flag.subject_key) == ("subscription", str(sub.id))
    assert flag.station_id == world.station.id and flag.severity == "warning"
    assert flag.evidence["host"] == "127.0.0.1"
    assert flag.evidence["consecutive_failures"] == 3
    assert flag.evidence["last_error"].startswith("ConnectError")
    assert sub.secret not in json.dumps(flag.evidence)
    # Disabled: its deliveries wait, however due.
    announce(sessions, "RR000000009GB", station_id=world.station.id)
    assert deliver(sessions, sender, T0 + LATER, settings=settings)["claimed"] == 0

    with sessions.begin() as session:
        webhooks.update_subscription(
            session=session,
            subscription=session.get(WebhookSubscription, sub.id),
            production=False,
            now=at(60),
            url=receiver.url,
            active=True,
        )
    enabled = subscription(sessions, sub.id)
    assert enabled.disabled_at is None and enabled.disabled_reason is None
    assert enabled.consecutive_failures == 0 and enabled.failing_since is None
    with sessions() as session:
        assert session.get(Flag, flag.id).status == FlagStatus.CLOSED
    assert all(d.next_attempt_at <= at(60) for d in stored(sessions))  # due at once

    assert deliver(sessions, sender, at(60), settings=settings)["delivered"] == 4
    assert len(receiver.messages) == 4


def _record(
    sessions: sessionmaker[Session],
    claimed: webhooks.ClaimedDelivery,
    result: SendResult,
    seconds: float,
    settings: DeliverySettings = SETTINGS,
) -> webhooks.Recorded:
    return webhooks.record_attempt(
        sessions=sessions,
        claimed=claimed,
        result=result,
        at=at(seconds),
        settings=settings,
        worker_id="w",
        rng=random.Random(7),
    )


def test_the_run_of_failures_is_the_same_whichever_attempt_is_recorded_first(
    sessions: sessionmaker[Session],
) -> None:
    """Two workers (or two lanes) record their attempts to one receiver in another order
    than they were made. A failure made before a success and recorded after it started a
    run of failures "since" a moment the receiver then answered (``failing_since``, what
    the disabling measures and an admin reads), and a success recorded after a later
    failure wiped that failure's run. Each now counts by when it was made: a failure
    older than the last success is no failure in a row, and a success older than the
    run's first failure does not end it."""
    sub = subscribe(sessions, "http://127.0.0.1:9/hook")
    for key in ("RR-1", "RR-2", "RR-3", "RR-4"):
        announce(sessions, key)
    one, two, three, four = [  # three at a time for one subscription (PER_SUBSCRIPTION)
        *webhooks.claim_due(
            sessions=sessions, due_at=T0, now=T0, settings=SETTINGS, worker_id="w"
        ),
        *webhooks.claim_due(
            sessions=sessions, due_at=T0, now=T0, settings=SETTINGS, worker_id="w"
        ),
    ]
    _record(sessions, two, SendResult(status_code=200), 20)
    assert _record(sessions, one, SendResult(status_code=503), 10).outcome == webhooks.RETRY
    failing = subscription(sessions, sub.id)
    assert (failing.consecutive_failures, failing.failing_since) == (0, None)
    assert failing.last_delivered_at == at(20)

    _record(sessions, three, SendResult(status_code=503), 40)
    _record(sessions, four, SendResult(status_code=200), 30)
    failing = subscription(sessions, sub.id)
    assert (failing.consecutive_failures, failing.failing_since) == (1, at(40))
    assert failing.last_delivered_at == at(30)
    delivery_one = next(d for d in stored(sessions) if d.id == one.id)
    assert delivery_one.attempts == 1 and delivery_one.last_status_code == 503  # kept


def test_a_failure_recorded_late_does_not_date_the_run_back_past_a_success(
    sessions: sessionmaker[Session],
) -> None:
    """What the misdating did: a failure made just before a success and recorded after
    it, then hours of nothing to send, then a receiver redeploying for a minute. The
    run's first failure read as hours old, and the redeploy's failures disabled the
    subscription at once; counted from the redeploy, it is not."""
    settings = replace(SETTINGS, disable_after_failures=3, disable_after_seconds=3600)
    sub = subscribe(sessions, "http://127.0.0.1:9/hook")
    for key in ("RR-1", "RR-2"):
        announce(sessions, key)
    late, ok = webhooks.claim_due(
        sessions=sessions, due_at=T0, now=T0, settings=SETTINGS, worker_id="w"
    )
    _record(sessions, ok, SendResult(status_code=200), 20, settings)
    with sessions.begin() as session:  # its last attempt: dead, nothing retries it
        session.get_one(WebhookDelivery, late.id).attempts = settings.max_attempts - 1
    assert _record(sessions, late, SendResult(status_code=400), 10, settings).outcome == "dead"
    redeploy = 3 * 3600
    for key in ("RR-3", "RR-4", "RR-5"):
        announce(sessions, key, now=at(redeploy))
    claimed = webhooks.claim_due(
        sessions=sessions,
        due_at=at(redeploy),
        now=at(redeploy),
        settings=settings,
        worker_id="w",
    )
    outcomes = [
        _record(sessions, c, SendResult(status_code=503), redeploy + n, settings)
        for n, c in enumerate(claimed)
    ]
    assert len(outcomes) == 3 and not any(r.disabled_subscription for r in outcomes)
    after = subscription(sessions, sub.id)
    assert after.disabled_at is None and after.failing_since == at(redeploy)


@pytest.mark.parametrize(
    ("success_at", "enabled_again"),
    [(4000, True), (4001, True), (4002, False), (-5, False)],
)
def test_a_success_recorded_after_the_failure_that_disabled_it_enables_it_again(
    sessions: sessionmaker[Session], success_at: int, enabled_again: bool
) -> None:
    """A receiver failing for over an hour comes back: one worker's attempt succeeds,
    another's, started while it was down, ends a moment later as a failure and is
    recorded first. Counted in the order they were made, that failure is the first of a
    new run (the success ended the old one) and disables nothing; recorded first, it
    completed the old run and disabled the subscription, and the success recorded next
    left it disabled, nothing sent until an admin came. The success now undoes a
    disabling by a run it ended: the same whichever is recorded first. Not one made
    after the failure that disabled it (an attempt in flight then), nor one made before
    the run began."""
    settings = replace(SETTINGS, disable_after_failures=3, disable_after_seconds=3600)
    sub = subscribe(sessions, "http://127.0.0.1:9/hook")
    for key in ("RR-1", "RR-2", "RR-3", "RR-4"):
        announce(sessions, key)
    first, second, third, back = [  # three at a time for one subscription
        *webhooks.claim_due(
            sessions=sessions, due_at=T0, now=T0, settings=SETTINGS, worker_id="w"
        ),
        *webhooks.claim_due(
            sessions=sessions, due_at=T0, now=T0, settings=SETTINGS, worker_id="w"
        ),
    ]
    _record(sessions, first, SendResult(status_code=503), 0, settings)
    _record(sessions, second, SendResult(status_code=503), 10, settings)
    # Made at 4001, and recorded before the success.
    assert _record(
        sessions, third, SendResult(status_code=503), 4001, settings
    ).disabled_subscription
    assert _record(sessions, back, SendResult(status_code=200), success_at, settings).outcome == (
        webhooks.DELIVERED
    )
    after = subscription(sessions, sub.id)
    assert (after.disabled_at is None) is enabled_again
    assert (after.disabled_reason is None) is enabled_again
    assert after.last_delivered_at == at(success_at)
    with sessions() as session:
        [flag] = session.scalars(select(Flag).where(Flag.kind == webhooks.SUBSCRIPTION_DISABLED))
        assert (flag.status == FlagStatus.CLOSED) is enabled_again


def _outage(
    sessions: sessionmaker[Session],
    sender: HttpxSender,
    receiver: Receiver,
    settings: DeliverySettings,
    minutes: int,
) -> tuple[list[dt.datetime], int]:
    """A receiver answering 503 for ``minutes`` from ``T0``, a parcel's message written
    every 5 minutes meanwhile, the worker polling every 30 seconds: the instants it
    disabled the subscription at, and the most failures in a row it counted."""
    receiver.default = Answer(503)
    disabled_at, most = [], 0
    sub_id = subscription_ids(sessions)[0]
    for step in range(minutes * 2):
        now = at(30 * step)
        if step % 10 == 0:
            announce(sessions, f"RR{step:09d}GB", now=now)
        if deliver(sessions, sender, now, settings=settings)["disabled"]:
            disabled_at.append(now)
        most = max(most, subscription(sessions, sub_id).consecutive_failures)
    return disabled_at, most


def subscription_ids(sessions: sessionmaker[Session]) -> list[int]:
    with sessions() as session:
        return list(session.scalars(select(WebhookSubscription.id)))


def test_a_receiver_redeploying_for_15_minutes_is_not_disabled_and_gets_every_message(
    sessions: sessionmaker[Session], receiver: Receiver, sender: HttpxSender
) -> None:
    """A message every 5 minutes, the receiver answering 503 for 15 (a redeploy): more
    than ``WEBHOOK_DISABLE_AFTER_FAILURES`` (20) attempts fail in a row, every message
    retried with the default backoff. Disabled on the count alone after 14 minutes,
    nothing flowed until an admin enabled it again (a ``consent.requested`` of a request
    lapsing meanwhile skipped: its recipient never asked). The first failure is not
    ``WEBHOOK_DISABLE_AFTER_SECONDS`` (4 hours) old: once the receiver answers, every
    message arrives and the run of failures is over."""
    settings = replace(SETTINGS, max_attempts=20, disable_after_failures=20)
    assert settings.disable_after_seconds == 4 * 3600  # the default
    sub = subscribe(sessions, receiver.url)

    disabled_at, most = _outage(sessions, sender, receiver, settings, minutes=15)

    assert most >= settings.disable_after_failures  # the count alone would have disabled it
    assert disabled_at == []
    failing = subscription(sessions, sub.id)
    assert failing.disabled_at is None and failing.failing_since is not None
    assert T0 <= failing.failing_since < at(1)  # its first failure, when it was tried
    receiver.default = Answer(200)
    later = at(15 * 60) + LATER
    assert deliver(sessions, sender, later, settings=settings)["delivered"] == 3
    assert len(receiver.messages) == 3
    recovered = subscription(sessions, sub.id)
    assert recovered.consecutive_failures == 0 and recovered.failing_since is None
    with sessions() as session:
        assert (
            session.scalars(select(Flag).where(Flag.kind == webhooks.SUBSCRIPTION_DISABLED)).all()
            == []
        )


def test_a_receiver_failing_for_hours_is_disabled_once_its_first_failure_is_old_enough(
    sessions: sessionmaker[Session], receiver: Receiver, sender: HttpxSender
) -> None:
    """The receiver answers 503 for an hour and a half, ``WEBHOOK_DISABLE_AFTER_SECONDS``
    an hour here: the count passes 20 within the first quarter hour, but the
    subscription is disabled (and flagged, saying since when) only at the first failure
    an hour after the first one; then it is sent nothing more. A failure before, ended
    by a success, does not count: the run starts over."""
    settings = replace(SETTINGS, max_attempts=20, disable_after_seconds=3600)
    sub = subscribe(sessions, receiver.url)
    announce(sessions, "RR000000001GB", now=at(-600))
    receiver.answer(Answer(503))
    deliver(sessions, sender, at(-600), settings=settings)  # one failure, then a success
    first = subscription(sessions, sub.id).failing_since
    assert first is not None and at(-600) <= first < at(-599)
    assert deliver(sessions, sender, at(-540), settings=settings)["delivered"] == 1
    assert subscription(sessions, sub.id).failing_since is None

    disabled_at, most = _outage(sessions, sender, receiver, settings, minutes=90)

    assert most >= settings.disable_after_failures
    [when] = disabled_at
    assert at(3600) <= when <= at(3600 + 60)
    disabled = subscription(sessions, sub.id)
    assert disabled.disabled_at is not None and when <= disabled.disabled_at < when + dt.timedelta(
        seconds=1
    )
    assert disabled.failing_since is not None and T0 <= disabled.failing_since < at(1)
    assert disabled.disabled_reason is not None
    assert " failed in a row since 2026-11-30 08:00:00 UTC; last: " in disabled.disabled_reason
    with sessions() as session:
        [flag] = session.scalars(select(Flag).where(Flag.kind == webhooks.SUBSCRIPTION_DISABLED))
    assert flag.evidence["failing_since"] == disabled.failing_since.isoformat()
    sent = len(receiver.requests)
    assert deliver(sessions, sender, when + LATER, settings=settings)["claimed"] == 0
    assert len(receiver.requests) == sent


def test_an_inactive_subscription_gets_no_new_messages_and_sends_none(
    sessions: sessionmaker[Session], receiver: Receiver, sender: HttpxSender
) -> None:
    sub = subscribe(sessions, receiver.url)
    announce(sessions, "RR000000001GB")
    with sessions.begin() as session:
        webhooks.update_subscription(
            session=session,
            subscription=session.get(WebhookSubscription, sub.id),
            production=False,
            now=T0,
            active=False,
        )
    assert announce(sessions, "RR000000002GB") is None  # nobody wants it now
    assert deliver(sessions, sender, T0)["claimed"] == 0
    assert receiver.requests == []


# -- who gets what ----------------------------------------------------------------------------


def test_announce_respects_the_station_and_topic_filters(
    sessions: sessionmaker[Session], receiver: Receiver, sender: HttpxSender, world: World
) -> None:
    here = subscribe(sessions, receiver.url + "/here", station_id=world.station.id)
    everywhere = subscribe(sessions, receiver.url + "/all", topics=("parcel.in_locker",))
    flags_only = subscribe(sessions, receiver.url + "/flags", topics=("flag.raised",))

    announce(sessions, "RR000000001GB", station_id=world.station.id)
    announce(sessions, "RR000000002GB", station_id=world.other_station.id)

    by_subscription = Counter(d.subscription_id for d in stored(sessions))
    assert by_subscription == {here.id: 1, everywhere.id: 2}
    assert flags_only.id not in by_subscription
    deliver(sessions, sender, T0)
    paths = Counter(r.path for r in receiver.requests)
    assert paths == {"/hook/here": 1, "/hook/all": 2}
    here_body = json.loads(next(r.body for r in receiver.requests if r.path == "/hook/here"))
    assert here_body["station_id"] == world.station.id


def test_a_subscription_moved_to_another_station_or_topic_gets_no_waiting_message_it_left(
    sessions: sessionmaker[Session], receiver: Receiver, sender: HttpxSender, world: World
) -> None:
    """The receiver is down while its subscription is moved from one station to
    another (or drops a topic): what waits for it from the old station (recipients'
    phones, pickup codes) or of the old topic must not reach it afterwards."""
    sub = subscribe(
        sessions,
        receiver.url,
        topics=("parcel.in_locker", "flag.raised"),
        station_id=world.station.id,
    )
    announce(sessions, "RR000000001GB", station_id=world.station.id)
    announce(sessions, "RR000000002GB", topic="flag.raised", station_id=world.station.id)
    with sessions.begin() as session:
        webhooks.update_subscription(
            session=session,
            subscription=session.get(WebhookSubscription, sub.id),
            production=False,
            now=T0,
            station_id=world.other_station.id,
            topics=["parcel.in_locker"],
        )
    kept = announce(sessions, "RR000000003GB", station_id=world.other_station.id)
    assert kept is not None

    deliver(sessions, sender, T0)

    received = [json.loads(body) for body in receiver.messages.values()]
    assert [m["id"] for m in received] == [str(kept.id)]
    assert {m["station_id"] for m in received} == {world.other_station.id}


def test_a_subscription_made_in_the_same_transaction_gets_the_next_announcement(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    with sessions.begin() as session:
        assert not outbox.announce(
            session=session, topic="flag.raised", ordering_key="k", station_id=None, data={}
        )
        webhooks.create_subscription(
            session=session, url=receiver.url, topics=["flag.raised"], production=False
        )
        assert outbox.announce(
            session=session, topic="flag.raised", ordering_key="k", station_id=None, data={}
        )


@pytest.mark.parametrize(
    ("url", "production", "refused"),
    [
        ("https://hooks.example.com/courier", True, None),
        ("https://hooks.example.com:8443/c?token=abc", True, None),
        ("http://hooks.example.com/courier", True, "must use https"),
        ("http://127.0.0.1:9000/hook", True, "must use https"),
        ("https://127.0.0.1/hook", True, "not a public address"),
        ("https://10.1.2.3/hook", True, "not a public address"),
        ("https://169.254.169.254/latest", True, "not a public address"),
        ("https://localhost/hook", True, "not a public address"),
        ("http://127.0.0.1:9000/hook", False, None),
        ("http://127.8.9.10/hook", False, None),
        ("http://localhost:9000/hook", False, None),
        ("http://[::1]:9000/hook", False, None),
        ("https://hooks.example.com/courier", False, None),
        ("http://hooks.example.com/courier", False, "only to loopback"),
        ("http://10.1.2.3/hook", False, "only to loopback"),
        # Outside production too (the demo, whose admin password is published): the
        # machine's own network is no receiver, the machine itself is.
        ("https://169.254.169.254/latest", False, "not a public address"),
        ("https://10.1.2.3/hook", False, "not a public address"),
        ("https://[fd00::1]/hook", False, "not a public address"),
        ("https://127.0.0.1/hook", False, None),
        ("https://user:pw@hooks.example.com/", True, "user name or password"),
        ("http://user@localhost/", False, "user name or password"),
        ("https://hooks.example.com/#frag", True, "fragment"),
        ("ftp://hooks.example.com/", False, "absolute http"),
        ("/relative/path", False, "absolute http"),
        ("https:///no-host", False, "absolute http"),
        ("https://hooks.example.com:99999/", True, "port"),
        ("https://hooks.example.com/a b", True, "whitespace"),
        ("https://hooks.example.com/" + "a" * 2000, True, "longer than 2000"),
    ],
)
def test_url_rules(url: str, production: bool, refused: str | None) -> None:
    if refused is None:
        assert webhooks.check_url(url, production=production) == url
        return
    with pytest.raises(InvalidInput) as caught:
        webhooks.check_url(url, production=production)
    assert refused in caught.value.message
    assert caught.value.field == "url" and caught.value.code == "webhook_url_refused"


def test_creation_refuses_bad_topics_stations_and_urls(
    sessions: sessionmaker[Session], world: World
) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"topics": ["parcel.in_locker", "parcel.lost"]}, "topics"),
        ({"topics": []}, "topics"),
        ({"station_id": 999999}, "station_id"),
        ({"url": "http://hooks.example.com/"}, "url"),
        ({"description": "x" * 201}, "description"),
    ]
    for change, field in cases:
        args: dict[str, Any] = {
            "url": "https://hooks.example.com/c",
            "topics": ["parcel.in_locker"],
            "production": False,
        } | change
        with sessions.begin() as session, pytest.raises(InvalidInput) as caught:
            webhooks.create_subscription(session=session, **args)
        assert caught.value.field == field, change
    with sessions() as session:
        assert session.scalars(select(WebhookSubscription)).all() == []
    with sessions.begin() as session:
        made = webhooks.create_subscription(
            session=session,
            url=" https://hooks.example.com/c ",
            topics=["flag.raised", "flag.raised", "report.ready"],
            station_id=world.station.id,
            production=True,
        )
    assert made.url == "https://hooks.example.com/c"
    assert made.topics == ["flag.raised", "report.ready"]
    assert len(made.secret) >= 43  # token_urlsafe(32)


# -- the sender's own checks (the configuration may change after creation) --------------------


def test_in_production_hosts_resolving_to_private_addresses_are_refused(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = socket.getaddrinfo

    def resolve(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "hooks.example.test":  # an attacker's name for our own network
            return real("127.0.0.1", port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with HttpxSender(replace(SETTINGS, production=True)) as sender:
        result = sender.send(
            url=f"https://hooks.example.test:{receiver.port}/hook", body=b"{}", headers={}
        )
        plain = sender.send(url=receiver.url, body=b"{}", headers={})
    assert not result.ok and result.error is not None
    assert "refused: hooks.example.test resolves to 127.0.0.1, not a public address" in (
        result.error
    )
    assert plain.error is not None and "production receivers must use https" in plain.error
    assert receiver.requests == []


@pytest.mark.parametrize("address", ["169.254.169.254", "10.0.0.1", "192.168.1.1", "fd00::1"])
def test_outside_production_hosts_resolving_into_the_network_are_refused_too(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A development server (``make run``: the demo, its admin password published) took
    any https URL and connected wherever its name resolved: the cloud's metadata service,
    the station's own network. Outside production a receiver is public or this machine."""
    real = socket.getaddrinfo
    connected: list[Any] = []

    def resolve(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "hooks.example.test":
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            return [(family, socket.SOCK_STREAM, 6, "", (address, port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(
        webhooks.httpcore.SyncBackend,
        "connect_tcp",
        lambda self, host, *args, **kwargs: connected.append(host) or pytest.fail("connected"),
    )
    with HttpxSender(replace(SETTINGS, production=False)) as sender:
        result = sender.send(url="https://hooks.example.test/hook", body=b"{}", headers={})
    assert result.error is not None and not result.ok
    assert f"refused: hooks.example.test resolves to {address}, not a public address" in (
        result.error
    )
    assert connected == []


def test_public_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    import ipaddress

    for text in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"):
        assert webhooks.is_public_address(ipaddress.ip_address(text))
    for text in (
        "127.0.0.1",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        # IPv4 behind IPv6 (SECURITY.md threat 7): NAT64, local NAT64, 6to4, compatible.
        "64:ff9b::a00:1",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b:1::808:808",
        "2002:a00:1::",
        "2002:a9fe:a9fe::1",
        "::a00:1",
        "::7f00:1",
    ):
        assert not webhooks.is_public_address(ipaddress.ip_address(text)), text
    # The same forms of a public IPv4 address stay public.
    for text in ("64:ff9b::808:808", "2002:808:808::1"):
        assert webhooks.is_public_address(ipaddress.ip_address(text)), text


# -- secrets ----------------------------------------------------------------------------------


def test_the_secret_and_signatures_never_reach_the_log_or_the_stored_error(
    sessions: sessionmaker[Session],
    receiver: Receiver,
    sender: HttpxSender,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # httpx's and httpcore's own lines too
    sub = subscribe(sessions, receiver.url)
    announce(sessions, "RR000000001GB")
    announce(sessions, "RR000000002GB")
    # The first answer echoes the signature back, as a careless receiver might.
    receiver.answer(Answer(401, echo_header="X-Courier-Signature"))

    stats = deliver(sessions, sender, T0)

    assert (stats["failed"], stats["delivered"]) == (1, 1)
    signatures = [r.headers["x-courier-signature"] for r in receiver.requests]
    assert len(signatures) == 2
    hexes = [signature.partition(",v1=")[2] for signature in signatures]
    assert "attempt 1: delivered (HTTP 200)" in caplog.text
    assert "attempt 1: failed, retrying at" in caplog.text
    failed = stored(sessions)[0]
    assert failed.last_error == "HTTP 401: [redacted]"
    for text in (sub.secret, *signatures, *hexes):
        assert text not in caplog.text
        assert text not in (failed.last_error or "")
    assert sub.secret not in repr(sub)


def test_a_phone_number_echoed_by_the_receiver_is_masked_in_the_stored_error(
    sessions: sessionmaker[Session], receiver: Receiver, sender: HttpxSender
) -> None:
    subscribe(sessions, receiver.url)
    announce(sessions, recipient_phone="+8613812345678")
    receiver.answer(Answer(422, b'{"error": "bad request for +8613812345678"}'))
    deliver(sessions, sender, T0)
    [failed] = stored(sessions)
    assert "+8613812345678" not in (failed.last_error or "")
    assert failed.last_error is not None and failed.last_error.endswith('**5678"}')


@pytest.mark.parametrize(
    "header",
    [
        "t=\u00b2,v1=aa",
        "t=1,v1=\u00e9",
        "v1=",
        "t=,v1=",
        "garbage",
        "",
        "t=99999999999999999999",
        # Too long for a float (OverflowError), or for int() itself (ValueError past
        # 4,300 digits): the receiver answered a stranger's header with a 500.
        "t=" + "9" * 400 + ",v1=00",
        "t=" + "1" * 5000 + ",v1=00",
    ],
)
def test_verify_says_no_to_crafted_headers_without_raising(header: str) -> None:
    assert webhooks.verify("secret", header, b"{}", now=T0) is False


# -- crashes: the outbox delivers what was committed ------------------------------------------


class Crash(BaseException):
    """The worker's process dies (like SIGKILL): nothing after it runs."""


class CrashingSender:
    """Dies while sending: before the request leaves, or after the receiver got it."""

    def __init__(self, through: HttpxSender | None = None) -> None:
        self.through = through

    def send(self, *, url: str, body: bytes, headers: Mapping[str, str]) -> SendResult:
        if self.through is not None:
            self.through.send(url=url, body=body, headers=headers)
        raise Crash

    def close(self) -> None:
        pass


@pytest.mark.parametrize("receiver_got_it", [False, True])
def test_a_crash_between_the_change_and_delivery_still_delivers_afterwards(
    sessions: sessionmaker[Session],
    receiver: Receiver,
    sender: HttpxSender,
    receiver_got_it: bool,
) -> None:
    subscribe(sessions, receiver.url)
    announce(sessions)  # the change and its announcement are committed together
    [delivery] = stored(sessions)

    with pytest.raises(Crash):
        deliver(sessions, CrashingSender(sender if receiver_got_it else None), T0, worker="a")

    [held] = stored(sessions)
    assert held.status == DeliveryStatus.PENDING and held.attempts == 0
    assert held.claimed_by == "a" and held.claimed_until is not None
    assert held.claimed_until >= T0 + dt.timedelta(seconds=SETTINGS.claim_seconds(1))
    # Another worker leaves it alone while the claim lasts...
    assert deliver(sessions, sender, at(5), worker="b")["claimed"] == 0
    # ...and sends it once the claim has expired: the same delivery, the same id.
    later = held.claimed_until + dt.timedelta(seconds=1)
    assert deliver(sessions, sender, later, worker="b")["delivered"] == 1

    expected = [str(delivery.delivery_id)] * (2 if receiver_got_it else 1)
    assert receiver.delivery_ids() == expected
    assert list(receiver.messages) == [str(delivery.delivery_id)]  # de-duplicated: once
    [done] = stored(sessions)
    assert done.status == DeliveryStatus.DELIVERED and done.attempts == 1
    assert done.claimed_by is None


def test_a_stopping_worker_gives_back_the_claims_it_did_not_send(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    subscribe(sessions, receiver.url)
    for n in range(3):
        announce(sessions, f"RR00000000{n}GB")
    stop = threading.Event()

    class StopAfterOne:
        def __init__(self) -> None:
            self.inner = HttpxSender(SETTINGS)

        def send(self, *, url: str, body: bytes, headers: Mapping[str, str]) -> SendResult:
            stop.set()  # SIGTERM arrives during the first send
            return self.inner.send(url=url, body=body, headers=headers)

        def close(self) -> None:
            self.inner.close()

    stopper = StopAfterOne()
    try:
        webhooks.deliver_due(
            sessions=sessions,
            now=T0,
            settings=SETTINGS,
            sender=stopper,
            worker_id="a",
            stop=stop,
        )
    finally:
        stopper.close()

    assert len(receiver.requests) == 1
    rows = stored(sessions)
    assert [d.status for d in rows] == [DeliveryStatus.DELIVERED] + [DeliveryStatus.PENDING] * 2
    assert all(d.claimed_by is None and d.claimed_until is None for d in rows)


def test_deliver_once_on_a_backlog_signs_each_request_with_the_time_it_is_sent(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``deliver --once`` drains a backlog in several rounds of ``limit``; one that
    lasts longer than a receiver's tolerance (5 minutes) must still sign, and claim,
    with the time of each send, not with the time the drain started."""
    elapsed = [0.0]  # seconds since T0, on the worker's clock and its monotonic one
    monkeypatch.setattr(webhooks, "time", type("Clock", (), {"monotonic": lambda: elapsed[0]}))
    sub = subscribe(sessions, "http://127.0.0.1:9/hook")
    for n in range(3):
        announce(sessions, f"RR00000000{n}GB")
    verified: list[bool] = []
    claimed_until: list[dt.datetime] = []

    class SlowReceiver:
        """Verifies as a receiver does; each answer takes 200 seconds."""

        def send(self, *, url: str, body: bytes, headers: Mapping[str, str]) -> SendResult:
            sent_at = T0 + dt.timedelta(seconds=elapsed[0])
            header = headers[webhooks.SIGNATURE_HEADER]
            verified.append(webhooks.verify(sub.secret, header, body, now=sent_at))
            claimed_until.extend(
                d.claimed_until for d in stored(sessions) if d.claimed_until is not None
            )
            elapsed[0] += 200
            return SendResult(status_code=204)

        def close(self) -> None:
            pass

    loop = webhooks.DeliveryLoop(
        sessions=sessions,
        settings=SETTINGS,
        sender=SlowReceiver(),
        worker_id="once",
        clock=lambda: T0 + dt.timedelta(seconds=elapsed[0]),
        limit=1,
    )

    assert loop.drain()["delivered"] == 3
    assert verified == [True, True, True]
    # Each claim outlasts its send on the clock other workers read: none takes it over.
    assert [until > at(200 * n) for n, until in enumerate(claimed_until)] == [True] * 3


def test_admin_replay_and_purge(sessions: sessionmaker[Session], receiver: Receiver) -> None:
    """A purge deletes what settled before its time, counted from when it settled: a
    delivery replayed and sent again is as new as its last sending."""
    subscribe(sessions, receiver.url)
    first = announce(sessions, "RR000000001GB", now=at(10))
    replayed = announce(sessions, "RR000000002GB")
    assert first and replayed
    with HttpxSender(SETTINGS) as sender:
        deliver(sessions, sender, at(10))
    delivered = stored(sessions)
    with sessions.begin() as session:
        again = webhooks.replay_delivery(
            session=session, delivery=session.get(WebhookDelivery, delivered[1].id), now=at(20)
        )
        assert again.status == DeliveryStatus.PENDING and again.attempts == 0
        with pytest.raises(Conflict):
            webhooks.replay_delivery(session=session, delivery=again, now=at(20))
    with sessions.begin() as session:
        counts = webhooks.purge_deliveries(
            session=session, status=DeliveryStatus.DELIVERED, before=at(15)
        )
    assert counts == {"deliveries": 1, "messages": 1}  # the first; the other is pending again
    with HttpxSender(SETTINGS) as sender:
        deliver(sessions, sender, at(30))
    with sessions.begin() as session:
        counts = webhooks.purge_deliveries(
            session=session, status=DeliveryStatus.DELIVERED, before=at(25)
        )
    assert counts == {"deliveries": 0, "messages": 0}  # sent again at 30
    with sessions() as session:
        assert [m.id for m in session.scalars(select(OutboxMessage))] == [replayed.id]
    assert [d.message_id for d in stored(sessions)] == [replayed.id]


class DownUntil:
    """A receiver refusing connections until ``until`` (set ``now`` before each call)."""

    def __init__(self, until: dt.datetime) -> None:
        self.until = until
        self.now = T0
        self.received: list[bytes] = []

    def send(self, *, url: str, body: bytes, headers: Mapping[str, str]) -> SendResult:
        if self.now < self.until:
            return SendResult(error="ConnectError: [Errno 111] Connection refused")
        self.received.append(body)
        return SendResult(status_code=200)

    def close(self) -> None:
        pass


def test_with_the_default_settings_a_receiver_down_for_an_hour_gets_its_message(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A gateway's deploy or outage of an hour: the locker notice waits for it. (With
    8 attempts the backoff never reached its 3600 s cap, and the message was dead
    after about 8 minutes.)"""
    settings = DeliverySettings.from_config(load_config({}, tmp_path))
    subscribe(sessions, "http://127.0.0.1:9/hook")
    announce(sessions, "RR-1")
    receiver = DownUntil(T0 + dt.timedelta(hours=1))
    for second in range(0, 2 * 3600, 20):  # a deliverer polling for two hours
        receiver.now = T0 + dt.timedelta(seconds=second)
        webhooks.deliver_due(
            sessions=sessions,
            now=receiver.now,
            settings=settings,
            sender=receiver,
            worker_id="w",
            rng=random.Random(1),
        )
    [delivery] = stored(sessions)
    assert (delivery.status, len(receiver.received)) == (DeliveryStatus.DELIVERED, 1)
    assert delivery.delivered_at is not None
    assert delivery.delivered_at - T0 < dt.timedelta(hours=1, minutes=45)


# -- real concurrency -------------------------------------------------------------------------


@pytest.mark.postgres_only
def test_the_retention_purge_leaves_a_subscription_being_enabled_at_that_moment_alone(
    committed_app: Flask,
) -> None:
    """An admin enables a disabled subscription (``_enable_again`` locks it and its
    deliveries) while the daily purge runs: the purge skips what is locked rather than
    deleting, from a snapshot taken before, the messages the admin enabled it for."""
    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    down = subscribe(sessions, "http://127.0.0.1:9/down")
    announce(sessions, "RR-1")
    with sessions.begin() as session:
        session.get(WebhookSubscription, down.id).disabled_at = T0
    later = T0 + dt.timedelta(days=31)
    enabling = sessions()
    try:
        subscription = enabling.get(WebhookSubscription, down.id, with_for_update=True)
        assert subscription is not None
        with sessions.begin() as session:
            assert (
                webhooks.purge_waiting_for_stopped(session=session, before=later)["deliveries"]
                == 0
            )
        webhooks.update_subscription(
            session=enabling, subscription=subscription, production=False, now=later, active=True
        )
        enabling.commit()
    finally:
        enabling.close()
    with sessions.begin() as session:
        assert webhooks.purge_waiting_for_stopped(session=session, before=later)["deliveries"] == 0
    assert [d.ordering_key for d in stored(sessions)] == ["RR-1"]


def _waiting_on_a_lock(sessions: sessionmaker[Session]) -> bool:
    """Whether a backend of this database waits for a row another transaction holds."""
    with sessions() as session:
        return bool(
            session.scalar(
                sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
            )
        )


@pytest.mark.postgres_only
@pytest.mark.parametrize(
    "change",
    [
        # The worker's clock a minute ahead of the API's: the delivery in flight is
        # "not yet due" by the admin's clock, so enabling makes it due at once.
        {"active": True},
        # The delivery in flight is of a topic the admin drops: deleted as uncovered.
        {"topics": ["parcel.at_pickup_point"]},
    ],
    ids=["enabled_again", "topic_dropped"],
)
def test_an_admin_change_while_an_attempt_is_being_recorded_never_deadlocks(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch, change: dict[str, Any]
) -> None:
    """A worker records a failed attempt (``record_attempt``) while an admin enables the
    disabled subscription again, or drops the topic of the delivery in flight
    (``update_subscription``). The admin's change locked the subscription, then its
    deliveries; the worker locked the delivery, then the subscription to count the
    failure: each waited for the other and PostgreSQL failed one (a 503, or an attempt
    not recorded). Both now lock the subscription first. The worker holds its locks
    until the admin's change is seen waiting for one of them, every round."""
    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    sub = subscribe(sessions, "http://127.0.0.1:9/down")
    announce(sessions, "RR-1")
    worker_clock = T0 + dt.timedelta(minutes=1)
    [claimed] = webhooks.claim_due(
        sessions=sessions, due_at=worker_clock, now=worker_clock, settings=SETTINGS, worker_id="w"
    )
    with sessions.begin() as session:
        session.get(WebhookSubscription, sub.id).disabled_at = T0  # another attempt's failure
    admin_clock = T0 + dt.timedelta(seconds=30)
    with sessions.begin() as session:  # due by the worker's clock, not yet by the admin's
        session.get(WebhookDelivery, claimed.id).next_attempt_at = worker_clock
    locked, go = threading.Event(), threading.Event()
    errors: list[BaseException] = []
    count_failure = webhooks._count_failure

    def held(*args: Any, **kwargs: Any) -> bool:
        locked.set()
        go.wait(timeout=10)
        return count_failure(*args, **kwargs)

    monkeypatch.setattr(webhooks, "_count_failure", held)

    def record() -> None:
        try:
            webhooks.record_attempt(
                sessions=sessions,
                claimed=claimed,
                result=SendResult(status_code=503),
                at=worker_clock,
                settings=SETTINGS,
                worker_id="w",
                rng=random.Random(7),
            )
        except BaseException as exc:  # reported below
            errors.append(exc)

    def patch() -> None:
        try:
            with sessions.begin() as session:
                webhooks.update_subscription(
                    session=session,
                    subscription=session.get(WebhookSubscription, sub.id),
                    production=False,
                    now=admin_clock,
                    **change,
                )
        except BaseException as exc:  # reported below
            errors.append(exc)

    worker = threading.Thread(target=record)
    admin = threading.Thread(target=patch)
    worker.start()
    try:
        assert locked.wait(timeout=10)
        admin.start()
        deadline = time.monotonic() + 10
        while not _waiting_on_a_lock(sessions) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _waiting_on_a_lock(sessions), errors  # the admin waits for the worker's lock
    finally:
        go.set()
        worker.join(timeout=30)
        if admin.ident is not None:  # started
            admin.join(timeout=30)

    assert errors == []
    after = subscription(sessions, sub.id)
    assert after.consecutive_failures == (0 if "active" in change else 1)
    deliveries = stored(sessions)
    if "active" in change:
        # The failure recorded first, then enabled again: due at once, its attempt kept.
        assert after.disabled_at is None
        [delivery] = deliveries
        assert delivery.attempts == 1 and delivery.status == DeliveryStatus.PENDING
        assert delivery.next_attempt_at == admin_clock
    else:
        assert deliveries == []


@pytest.mark.postgres_only
def test_a_replay_while_an_admin_pauses_the_subscription_waits_and_is_refused(
    committed_app: Flask,
) -> None:
    """An admin pauses a subscription (``update_subscription`` holds its row) while
    another replays one of its dead deliveries. The replay read the subscription without
    a lock, saw it active, and answered that the delivery would be sent again, while the
    pause committed: a replay of a paused subscription's delivery, which is refused
    (``subscription_stopped``) when the two do not overlap. The replay now locks the
    subscription first, as every path locking it and a delivery does: it waits for the
    pause, and is refused."""
    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    sub = subscribe(sessions, "http://127.0.0.1:9/down")
    announce(sessions, "RR-1")
    [delivery] = stored(sessions)
    with sessions.begin() as session:
        session.get(WebhookDelivery, delivery.id).status = DeliveryStatus.DEAD
    outcome: list[BaseException | WebhookDelivery] = []

    def replay() -> None:
        try:
            with sessions.begin() as session:
                outcome.append(
                    webhooks.replay_delivery(
                        session=session,
                        delivery=session.get(WebhookDelivery, delivery.id),
                        now=at(60),
                    )
                )
        except BaseException as exc:  # asserted below
            outcome.append(exc)

    pausing = sessions()
    replaying = threading.Thread(target=replay)
    try:
        webhooks.update_subscription(
            session=pausing,
            subscription=pausing.get(WebhookSubscription, sub.id),
            production=False,
            now=at(60),
            active=False,
        )
        replaying.start()
        deadline = time.monotonic() + 10
        while not outcome and not _waiting_on_a_lock(sessions) and time.monotonic() < deadline:
            time.sleep(0.02)
        pausing.commit()
    finally:
        pausing.close()
        replaying.join(timeout=30)

    [result] = outcome
    assert isinstance(result, Conflict) and result.code == "subscription_stopped", result
    assert stored(sessions)[0].status == DeliveryStatus.DEAD


@pytest.mark.postgres_only
def test_a_worker_giving_back_its_claims_locks_them_in_id_order(committed_app: Flask) -> None:
    """``release_claims`` updated its deliveries in the order the plan met them (on a
    small table, where they lie on disk: a row updated since lies after the others),
    as did an admin's change deleting or rescheduling a subscription's waiting ones
    (``_drop_uncovered``, ``_enable_again``), the claims taking them by id: two such
    transactions, each holding one row the other wants, deadlock. All now lock by id
    (``_lock_deliveries``). A transaction holds
    the first delivery by id; the release waits for it holding nothing, so the last
    one is still free for a third transaction."""
    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    subscribe(sessions, "http://127.0.0.1:9/down")
    for key in ("RR-1", "RR-2", "RR-3"):
        announce(sessions, key)
    claimed = webhooks.claim_due(
        sessions=sessions, due_at=T0, now=T0, settings=SETTINGS, worker_id="w"
    )
    ids = [c.id for c in claimed]
    assert len(ids) == 3
    with sessions.begin() as session:  # the first row, updated since, now lies last
        session.get(WebhookDelivery, ids[0]).last_error = "moved"
    errors: list[BaseException] = []

    def release() -> None:
        try:
            webhooks.release_claims(sessions=sessions, ids=ids, worker_id="w")
        except BaseException as exc:  # asserted below
            errors.append(exc)

    holding = sessions()
    releasing = threading.Thread(target=release)
    try:
        holding.get(WebhookDelivery, ids[0], with_for_update=True)
        releasing.start()
        deadline = time.monotonic() + 10
        while not _waiting_on_a_lock(sessions) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _waiting_on_a_lock(sessions)
        with sessions() as other:
            other.execute(sql("SET LOCAL lock_timeout = '1s'"))
            # Taken by the release before the first: this waits, and fails.
            assert other.get(WebhookDelivery, ids[-1], with_for_update=True) is not None
            other.rollback()
    finally:
        holding.rollback()
        holding.close()
        releasing.join(timeout=30)
    assert errors == []
    assert all(d.claimed_by is None for d in stored(sessions))


@pytest.mark.postgres_only
def test_two_workers_at_once_never_send_one_delivery_twice(
    committed_app: Flask, receiver: Receiver
) -> None:
    """Committed data, two threads with their own connections, released together: the
    claims (FOR UPDATE SKIP LOCKED) share the deliveries out; each is sent once, and
    each parcel's messages still arrive in order."""
    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    with sessions.begin() as session:
        station = Station(code="WH1", name="Webhooks", timezone="UTC")
        session.add(station)
        session.flush()
        station_id = station.id
    subscribe(sessions, receiver.url)
    # Each answer takes a moment, as a real receiver's does: the work lasts long enough
    # for both workers to be at it (else one may finish everything before the other
    # has started, and prove nothing about sharing).
    receiver.default = Answer(delay=0.02)
    written: dict[str, list[str]] = {}
    for n in range(60):
        key = f"RR{n % 12:09d}GB"
        message = announce(sessions, key, station_id=station_id, now=T0, seq=n)
        assert message is not None
        written.setdefault(key, []).append(str(message.id))
    barrier = threading.Barrier(2)
    results: dict[str, list[dict[str, Any]]] = {}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            with HttpxSender(SETTINGS) as sender:
                barrier.wait()
                rounds = results.setdefault(name, [])
                while True:
                    stats = webhooks.deliver_due(
                        sessions=sessions, now=T0, settings=SETTINGS, sender=sender, worker_id=name
                    )
                    rounds.append(stats)
                    if stats["claimed"] == 0:
                        break
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert not errors
    ids = receiver.delivery_ids()
    assert len(ids) == 60 and len(set(ids)) == 60  # every delivery sent, none twice
    delivered_by = {name: sum(s["delivered"] for s in rounds) for name, rounds in results.items()}
    assert sum(delivered_by.values()) == 60
    assert all(count > 0 for count in delivered_by.values()), delivered_by  # both worked
    sent: dict[str, list[str]] = {}
    for request in receiver.requests:
        body = json.loads(request.body)
        sent.setdefault(body["data"]["tracking_no"], []).append(body["id"])
    assert sent == written
    with sessions() as session:
        statuses = session.scalars(select(WebhookDelivery.status)).all()
    assert set(statuses) == {DeliveryStatus.DELIVERED}


def test_a_receiver_dripping_its_answer_cannot_hold_an_attempt_past_its_bound() -> None:
    """Each header line comes just before the read timeout would fire: without a
    deadline on the whole attempt, the send would last as long as the drip."""
    import socket
    import threading
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def drip() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\n")
            for n in range(40):
                if stop.wait(0.8):
                    return
                try:
                    connection.sendall(f"X-Drip-{n}: x\r\n".encode())
                except OSError:
                    return

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    settings = replace(SETTINGS, timeout_seconds=1)
    try:
        with HttpxSender(settings) as sender:
            started = time.monotonic()
            result = sender.send(url=f"http://127.0.0.1:{port}/hook", body=b"{}", headers={})
            took = time.monotonic() - started
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)
    assert not result.ok and result.error is not None
    assert took <= settings.attempt_bound_seconds + 0.5, took


@pytest.mark.parametrize("waiting", [8, 60])
def test_one_busy_subscription_does_not_keep_another_waiting(
    sessions: sessionmaker[Session], waiting: int
) -> None:
    """The cap per subscription is counted over every due message, not over the first
    few the claim happens to read: 60 older messages of one receiver (more than four
    claims' worth) leave room for another's, as 8 do."""
    busy = subscribe(sessions, "http://127.0.0.1:9/busy")
    for n in range(waiting):
        announce(sessions, f"RR{n}")  # parcels, each a key of its own
    other = subscribe(sessions, "http://127.0.0.1:9/other", topics=("flag.raised",))
    announce(sessions, "RR-X", topic="flag.raised", flag_id=1)
    claimed = webhooks.claim_due(
        sessions=sessions, due_at=T0, now=T0, settings=SETTINGS, worker_id="w", limit=4
    )
    by_subscription = [c.subscription_id for c in claimed]
    assert by_subscription.count(busy.id) == webhooks.PER_SUBSCRIPTION
    assert other.id in by_subscription


def test_the_retention_job_purges_what_was_delivered_long_ago_and_keeps_the_dead(
    sessions: sessionmaker[Session], receiver: Receiver, sender: HttpxSender
) -> None:
    from courier_api.scheduler import JOB_SPECS

    subscribe(sessions, receiver.url)
    announce(sessions, "RR-OLD")
    announce(sessions, "RR-DEAD")
    receiver.answer(Answer(200), Answer(500))
    deliver(sessions, sender, T0, settings=replace(SETTINGS, max_attempts=1))
    assert [d.status for d in stored(sessions)] == [DeliveryStatus.DELIVERED, DeliveryStatus.DEAD]
    purge = JOB_SPECS["webhook_retention"].build({"WEBHOOK_RETENTION_DAYS": 30})
    with sessions.begin() as session:
        assert purge(session=session, now=T0 + dt.timedelta(days=29))["deliveries"] == 0
    with sessions.begin() as session:
        assert purge(session=session, now=T0 + dt.timedelta(days=31))["deliveries"] == 1
    assert [d.status for d in stored(sessions)] == [DeliveryStatus.DEAD]


def test_webhook_retention_keeps_a_delivery_for_the_retention_after_it_was_delivered(
    sessions: sessionmaker[Session],
    receiver: Receiver,
    sender: HttpxSender,
) -> None:
    """README (Scheduled jobs): ``webhook_retention`` "deletes webhook deliveries
    delivered more than WEBHOOK_RETENTION_DAYS ago"; the configuration table: "delivered
    webhook messages are deleted this long after". The job deletes by ``created_at``: a
    message that waited 25 days for a paused receiver, delivered once it was enabled
    again, is deleted 6 days after its delivery (and with it the record that
    ``parcel.drop_voided`` is routed by)."""
    from courier_api.scheduler import JOB_SPECS

    subscription = subscribe(sessions, receiver.url)
    announce(sessions, "RR-WAITED")  # created at T0
    with sessions.begin() as session:  # an admin pauses the receiver ...
        session.get(WebhookSubscription, subscription.id).active = False
    with sessions.begin() as session:  # ... and enables it again 25 days later
        session.get(WebhookSubscription, subscription.id).active = True
        session.execute(update(WebhookDelivery).values(next_attempt_at=T0))
    receiver.answer(Answer(200))
    delivered_at = T0 + dt.timedelta(days=25)
    deliver(sessions, sender, delivered_at, settings=replace(SETTINGS, max_attempts=1))
    [delivery] = stored(sessions)
    assert delivery.status == DeliveryStatus.DELIVERED
    assert delivery.delivered_at is not None
    assert delivery.delivered_at >= T0 + dt.timedelta(days=24)

    purge = JOB_SPECS["webhook_retention"].build({"WEBHOOK_RETENTION_DAYS": 30})
    with sessions.begin() as session:
        counts = purge(session=session, now=T0 + dt.timedelta(days=31))  # 6 days after

    assert counts["deliveries"] == 0
    assert [d.status for d in stored(sessions)] == [DeliveryStatus.DELIVERED]


def test_messages_waiting_for_a_stopped_receiver_go_once_past_retention(
    sessions: sessionmaker[Session],
) -> None:
    """A receiver disabled after too many failures, or paused by an admin, keeps its
    messages waiting, to be sent when it starts again, but not past the retention a
    delivered message gets: they hold recipients' phones and pickup codes. A working
    receiver's message that still waits (in its backoff) is left alone, and so is a
    dead delivery (an admin's) and a message while one delivery still needs it. The
    audit log counts what went, by subscription."""
    from courier_api.scheduler import JOB_SPECS

    down = subscribe(sessions, "http://127.0.0.1:9/down")
    up = subscribe(sessions, "http://127.0.0.1:9/up", topics=("flag.raised",))
    announce(sessions, "RR-1")  # for the disabled receiver only
    announce(sessions, "RR-2", topic="flag.raised", flag_id=1)  # the working one's
    paused = subscribe(sessions, "http://127.0.0.1:9/paused", topics=("flag.raised",))
    announce(sessions, "RR-3", topic="flag.raised", flag_id=2)  # for both of those
    announce(sessions, "RR-4")  # the disabled one's, dead
    with sessions.begin() as session:
        session.get(WebhookSubscription, down.id).disabled_at = T0
        session.get(WebhookSubscription, paused.id).active = False
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.ordering_key == "RR-4")
            .values(status=DeliveryStatus.DEAD)
        )
    purge = JOB_SPECS["webhook_retention"].build({"WEBHOOK_RETENTION_DAYS": 30})
    with sessions.begin() as session:
        assert purge(session=session, now=T0 + dt.timedelta(days=29))["waiting_for_stopped"] == 0
    with sessions.begin() as session:
        counts = purge(session=session, now=T0 + dt.timedelta(days=31))
    assert (counts["waiting_for_stopped"], counts["messages"]) == (2, 1)
    left = {(d.subscription_id, d.ordering_key, d.status) for d in stored(sessions)}
    assert left == {
        (up.id, "RR-2", DeliveryStatus.PENDING),
        (up.id, "RR-3", DeliveryStatus.PENDING),
        (down.id, "RR-4", DeliveryStatus.DEAD),
    }
    with sessions() as session:
        assert "RR-1" not in session.scalars(select(OutboxMessage.ordering_key)).all()
        purges = session.scalars(
            select(AuditEntry).where(AuditEntry.action == "webhook_deliveries_purged")
        ).all()
    [entry] = [e for e in purges if e.details["status"] == "pending"]
    assert entry.details["subscriptions"] == {str(down.id): 1, str(paused.id): 1}


def test_a_stopped_subscriptions_delivery_is_replayed_once_it_is_enabled_again(
    sessions: sessionmaker[Session],
) -> None:
    """Nothing is sent to a paused or disabled subscription, so a replay then would
    only wait (and, if old, go with the retention): it is refused until it is on."""
    down = subscribe(sessions, "http://127.0.0.1:9/down")
    announce(sessions, "RR-1")
    with sessions.begin() as session:
        session.execute(update(WebhookDelivery).values(status=DeliveryStatus.DEAD))
        session.get(WebhookSubscription, down.id).disabled_at = T0
    [dead] = stored(sessions)
    with sessions.begin() as session, pytest.raises(Conflict) as refused:
        webhooks.replay_delivery(session=session, delivery=dead, now=T0)
    assert refused.value.code == "subscription_stopped"
    with sessions.begin() as session:
        webhooks.update_subscription(
            session=session,
            subscription=session.get(WebhookSubscription, down.id),
            production=False,
            now=T0,
            active=True,
        )
    with sessions.begin() as session:
        again = webhooks.replay_delivery(
            session=session, delivery=session.get(WebhookDelivery, dead.id), now=T0
        )
        assert again.status == DeliveryStatus.PENDING


def test_a_receiver_taking_its_whole_timeout_does_not_hold_back_another_receiver(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    """Older messages of a receiver that answers only after the timeout are claimed
    with another receiver's message: that one goes out at once, not after them."""
    settings = replace(SETTINGS, timeout_seconds=0.3)
    receiver.default = Answer(delay=5)  # ended early when the receiver closes
    subscribe(sessions, receiver.url)
    for n in range(3):
        announce(sessions, f"RR00000000{n}GB")
    with Receiver() as prompt, HttpxSender(settings) as sender:
        subscribe(sessions, prompt.url, topics=("flag.raised",))
        announce(sessions, "RR-X", topic="flag.raised", flag_id=1)
        with delivering(sessions, sender, settings) as stats:
            # The slow one's three attempts take 0.9 s one after the other.
            assert prompt.arrived.wait(0.25), "the prompt receiver waited for the slow one"
    assert (stats["delivered"], stats["failed"]) == (1, 3)
    assert len(receiver.requests) == 3 and len(prompt.messages) == 1


def test_a_message_falling_due_while_a_receiver_is_slow_goes_out_without_waiting_for_it(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    """The round a slow receiver holds up looks again for what has fallen due since (a
    consent request written meanwhile), rather than leaving it to the next round."""
    # Waiting for the slow receiver takes its whole timeout: the new message must come
    # well before it, with room for a loaded machine (0.45 s of 0.6 failed under CI).
    settings = replace(SETTINGS, timeout_seconds=3.0, poll_seconds=0.05)
    receiver.default = Answer(delay=5)
    subscribe(sessions, receiver.url)
    announce(sessions, "RR000000001GB")
    with Receiver() as prompt, HttpxSender(settings) as sender:
        subscribe(sessions, prompt.url, topics=("flag.raised",))
        announce(sessions, "RR-X", topic="flag.raised", now=at(0.1), flag_id=1)
        with delivering(sessions, sender, settings) as stats:
            assert prompt.arrived.wait(2.0), "the new message waited for the slow receiver"
    assert (stats["delivered"], stats["failed"]) == (1, 1)


def announce_while_it_moves(
    sessions: sessionmaker[Session],
    subscription_id: int,
    messages: list[tuple[str, str]],
    at_station: int,
    **changes: Any,
) -> None:
    """A push announces ``messages`` (key, topic) at station ``at_station`` while an
    admin changes the subscription (``changes``) and commits first, as PostgreSQL lets
    them."""
    with sessions.begin() as push:
        for key, topic in messages:
            assert outbox.announce(
                session=push,
                topic=topic,
                ordering_key=key,
                station_id=at_station,
                data={"tracking_no": key},
                now=T0,
            )
        with sessions.begin() as admin:  # commits while the push is still open
            webhooks.update_subscription(
                session=admin,
                subscription=admin.get(WebhookSubscription, subscription_id),
                production=False,
                now=T0,
                **changes,
            )


def test_a_message_committed_after_its_subscription_moved_away_is_not_sent_to_it(
    sessions: sessionmaker[Session], receiver: Receiver, sender: HttpxSender, world: World
) -> None:
    """On PostgreSQL a push reads the subscriptions, an admin moves one to another
    station (or drops a topic) and commits, then the push commits its deliveries: the
    move's clean-up could not see them. The worker still must not send the old
    station's message (recipients' phones, pickup codes) to the moved receiver."""
    sub = subscribe(
        sessions,
        receiver.url,
        topics=("parcel.in_locker", "flag.raised"),
        station_id=world.station.id,
    )
    announce_while_it_moves(
        sessions,
        sub.id,
        [("RR000000001GB", "parcel.in_locker"), ("RR-F", "flag.raised")],
        world.station.id,
        station_id=world.other_station.id,
        topics=["parcel.in_locker"],
    )
    kept = announce(sessions, "RR000000003GB", station_id=world.other_station.id)
    assert kept is not None and len(stored(sessions)) == 3

    stats = deliver(sessions, sender, T0)

    assert [json.loads(body)["id"] for body in receiver.messages.values()] == [str(kept.id)]
    assert stats["delivered"] == 1
    assert [d.message_id for d in stored(sessions)] == [kept.id]  # the others are gone


class _LaneSender:
    """Answers 200 at once, except the first request to ``slow_url``, which takes up to
    ``slow_seconds`` (released early by ``release``)."""

    def __init__(self, slow_url: str, slow_seconds: float) -> None:
        self.slow_url = slow_url
        self.slow_seconds = slow_seconds
        self.release = threading.Event()
        self.sent: list[str] = []
        self._lock = threading.Lock()

    def send(self, *, url: str, body: bytes, headers: Mapping[str, str]) -> SendResult:
        with self._lock:
            first_slow = url == self.slow_url and self.slow_url not in self.sent
            self.sent.append(url)
        if first_slow:
            self.release.wait(self.slow_seconds)
        return SendResult(status_code=200)


def test_a_failure_of_the_worker_stops_its_lanes_before_their_next_attempt(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's thread fails (its database gone while recording an attempt): the
    other lanes finish the attempt in progress and start no other. Their outcomes could
    not be recorded, so each request sent after the failure would be sent again once its
    claim expires, and the call would wait for all of them before it raises."""
    slow, quick = "http://127.0.0.1:9/slow", "http://127.0.0.1:9/quick"
    subscribe(sessions, slow)
    subscribe(sessions, quick, topics=("flag.raised",))
    for n in range(3):
        announce(sessions, f"RR00000000{n}GB")
    announce(sessions, "RR-X", topic="flag.raised", flag_id=1)
    sender = _LaneSender(slow, slow_seconds=0.3)

    def database_gone(**_: Any) -> webhooks.Recorded:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(webhooks, "record_attempt", database_gone)
    with pytest.raises(RuntimeError, match="went away"):
        deliver(sessions, sender, T0)
    assert sender.sent.count(quick) == 1
    assert sender.sent.count(slow) == 1, sender.sent


def test_a_drain_sends_what_is_due_after_messages_a_moved_subscription_no_longer_covers(
    sessions: sessionmaker[Session], receiver: Receiver, sender: HttpxSender, world: World
) -> None:
    """A claim whose every delivery turns out uncovered (the subscription moved while a
    push announced several messages) claims again: what is due after them is sent in
    the same call, and ``deliver --once`` does not stop before it."""
    sub = subscribe(
        sessions, receiver.url, topics=("parcel.in_locker",), station_id=world.station.id
    )
    announce_while_it_moves(
        sessions,
        sub.id,
        [(f"RR00000000{n}GB", "parcel.in_locker") for n in range(webhooks.PER_SUBSCRIPTION)],
        world.station.id,
        station_id=world.other_station.id,
    )
    kept = announce(sessions, "RR000000009GB", station_id=world.other_station.id)
    assert kept is not None

    loop = webhooks.DeliveryLoop(
        sessions=sessions, settings=SETTINGS, sender=sender, worker_id="w", clock=lambda: T0
    )
    stats = loop.drain()

    assert [json.loads(body)["id"] for body in receiver.messages.values()] == [str(kept.id)]
    assert stats["delivered"] == 1


def test_lookups_that_hang_hold_up_no_other_receivers_lookup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A receiver whose name server stopped answering leaves its lookups hanging past
    each attempt's deadline; the lanes sending to other receivers still resolve theirs
    (a shared pool of a few threads would fill with the hanging ones)."""
    released = threading.Event()
    resolve = socket.getaddrinfo

    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        if host.endswith(".hangs.invalid"):
            released.wait(10)
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    backend = webhooks._GuardedBackend(loopback_allowed=True)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        try:
            for n in range(8):
                with pytest.raises(webhooks.httpcore.ConnectTimeout):
                    backend.connect_tcp(f"r{n}.hangs.invalid", 443, timeout=0.02)
            stream = backend.connect_tcp("127.0.0.1", listener.getsockname()[1], timeout=2.0)
            stream.close()
        finally:
            released.set()


def test_a_consent_request_no_longer_pending_when_due_is_skipped_with_why(
    sessions: sessionmaker[Session],
    receiver: Receiver,
    sender: HttpxSender,
    world: World,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The receiver was down while three couriers asked: by the time it is back, one
    request lapsed and one was refused. Only the one still pending asks the recipient;
    the others' deliveries are skipped, with why, and not retried; the parcel's next
    message is not held back by them."""
    caplog.set_level(logging.INFO, logger="sync.webhooks")
    subscribe(sessions, receiver.url, topics=("consent.requested", "parcel.in_locker"))
    asker = consent_requests.Asker(world.courier.id, world.station.id, world.device.id)
    with sessions.begin() as session:
        parcels = [factories.parcel(session, world.station).tracking_no for _ in range(3)]
        made = [
            consent_requests.request_consent(
                session=session,
                draft=consent_requests.RequestDraft(
                    tracking_no=tracking_no, method=ConsentMethod.LOCKER
                ),
                asker=asker,
                ttl=dt.timedelta(minutes=minutes),
                requested_at=T0,
                now=T0,
            )
            for tracking_no, minutes in zip(parcels, (60, 10, 60), strict=True)
        ]
        pending, lapsed, refused = (r.id for r in made)
        session.get_one(ConsentRequest, refused).status = ConsentRequestStatus.REFUSED
    stats = deliver(sessions, sender, T0 + dt.timedelta(minutes=20))
    assert (stats["delivered"], stats["skipped"], stats["claimed"]) == (1, 2, 1)
    [asked] = [json.loads(r.body)["data"]["request_id"] for r in receiver.requests]
    assert asked == pending
    skipped = [d for d in stored(sessions) if d.status == DeliveryStatus.SKIPPED]
    assert [d.ordering_key for d in skipped] == parcels[1:]
    assert [d.skipped_reason for d in skipped] == [
        f"consent request {lapsed} was no longer pending when this was due (expired): "
        "the recipient is not asked",
        f"consent request {refused} was no longer pending when this was due (refused): "
        "the recipient is not asked",
    ]
    assert all(d.attempts == 0 and d.claimed_by is None for d in skipped)
    logged = [r.getMessage() for r in caplog.records if ": skipped, " in r.getMessage()]
    assert len(logged) == 2
    assert all(str(d.delivery_id) in line for d, line in zip(skipped, logged, strict=True))
    assert deliver(sessions, sender, T0 + LATER)["claimed"] == 0  # not retried
    announce(sessions, parcels[1], now=T0 + LATER)  # the lapsed one's parcel, in a locker
    assert deliver(sessions, sender, T0 + LATER)["delivered"] == 1


@pytest.mark.parametrize(
    ("outage_minutes", "max_attempts"), [(10, 20), (15, 20), (20, 20), (25, 20), (29, 20), (25, 8)]
)
def test_a_consent_ask_retried_after_a_short_outage_reaches_the_recipient_before_it_lapses(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    world: World,
    outage_minutes: int,
    max_attempts: int,
) -> None:
    """A courier at the door asks (a 30-minute request, the default TTL) while the
    recipient channel's gateway is down for a quarter of an hour. With the default
    backoff the retry after the failure at 10 minutes came 10 to 20 minutes later, often
    past the expiry: the delivery was skipped (``_moot``), and the recipient was never
    asked while the courier waited. A ``consent.requested``'s retries are bounded by its
    request's expiry (each waits at most a quarter of the time left): asked within
    minutes of the gateway's return, while an answer still counts. Nor is it dead
    after ``WEBHOOK_MAX_ATTEMPTS`` (its 20th attempt came some 28 minutes in) while its
    request still waits for the answer."""
    settings = replace(
        DeliverySettings.from_config(load_config({}, tmp_path)), max_attempts=max_attempts
    )
    subscribe(sessions, "http://127.0.0.1:9/hook", topics=("consent.requested",))
    with sessions.begin() as session:
        request = consent_requests.request_consent(
            session=session,
            draft=consent_requests.RequestDraft(
                tracking_no=factories.parcel(session, world.station).tracking_no,
                method=ConsentMethod.LOCKER,
            ),
            asker=consent_requests.Asker(world.courier.id, world.station.id, world.device.id),
            ttl=dt.timedelta(minutes=30),
            requested_at=T0,
            now=T0,
        )
        expires_at = request.expires_at
    back = T0 + dt.timedelta(minutes=outage_minutes)
    receiver = DownUntil(back)
    for second in range(0, 40 * 60, 20):  # a deliverer polling past the expiry
        receiver.now = T0 + dt.timedelta(seconds=second)
        webhooks.deliver_due(
            sessions=sessions,
            now=receiver.now,
            settings=settings,
            sender=receiver,
            worker_id="w",
            rng=random.Random(outage_minutes),
        )
    [delivery] = stored(sessions)
    assert delivery.status == DeliveryStatus.DELIVERED, delivery.skipped_reason
    assert len(receiver.received) == 1
    assert delivery.delivered_at is not None
    assert back <= delivery.delivered_at < expires_at
    assert delivery.delivered_at - back <= (expires_at - back) / 4 + dt.timedelta(seconds=20)


def test_a_consent_asks_retry_is_never_due_after_its_expiry() -> None:
    """The bound alone, over many draws of the jitter and failures: each retry of a
    ``consent.requested`` is due before its request's expiry, within a quarter of the
    time left; other topics keep their backoff."""
    settings = DeliverySettings()
    expires_at = T0 + dt.timedelta(minutes=30)
    rng = random.Random(3)
    for failures in range(1, 20):
        for elapsed in range(0, 1800 - 4 * 5, 37):
            failed_at = at(elapsed)
            retry = webhooks.retry_at(
                failures,
                at=failed_at,
                deadline=expires_at,
                settings=settings,
                rng=rng,
            )
            assert failed_at < retry < expires_at
            assert retry - failed_at <= max((expires_at - failed_at) / 4, dt.timedelta(seconds=5))
    unbounded = webhooks.retry_at(10, at=T0, deadline=None, settings=settings, rng=rng)
    assert unbounded - T0 >= dt.timedelta(seconds=1280)


def test_a_rotated_secret_signs_beside_the_old_one_until_the_grace_ends(
    sessions: sessionmaker[Session], receiver: Receiver, sender: HttpxSender, world: World
) -> None:
    """A channel's secret leaked, or its operator rotates secrets yearly: there was no way
    but a new subscription, which lost the deliveries waiting for the old one. A rotation
    gives a new secret and signs with the old one too during a grace period (a second
    ``v1``, last: a receiver reading the last ``v1`` with the old secret still accepts),
    so that what waited is delivered and accepted on either side of the receiver's
    switch; after the grace, or with none, the new secret alone signs."""
    sub = subscribe(sessions, receiver.url)
    announce(sessions, station_id=world.station.id, pickup_code="1")  # waiting already
    with sessions.begin() as session:
        rotated = webhooks.rotate_secret(
            session=session,
            subscription=session.get(WebhookSubscription, sub.id),
            grace=dt.timedelta(hours=24),
            now=T0,
        )
        new_secret = rotated.secret
    assert new_secret != sub.secret
    assert deliver(sessions, sender, at(60))["delivered"] == 1
    [first] = receiver.requests
    header = first.headers["x-courier-signature"]
    assert header.count("v1=") == 2
    for secret in (new_secret, sub.secret):
        assert webhooks.verify(secret, header, first.body, now=at(60))
    last_v1 = header.rpartition(",v1=")[2]  # README's first snippet read only the last one
    assert last_v1 == webhooks.sign(sub.secret, int(at(60).timestamp()), first.body)[-64:]

    after_grace = T0 + dt.timedelta(hours=24, seconds=1)
    announce(sessions, station_id=world.station.id, pickup_code="2", now=after_grace)
    assert deliver(sessions, sender, after_grace)["delivered"] == 1
    header = receiver.requests[-1].headers["x-courier-signature"]
    assert header.count("v1=") == 1
    assert webhooks.verify(new_secret, header, receiver.requests[-1].body, now=after_grace)
    assert not webhooks.verify(sub.secret, header, receiver.requests[-1].body, now=after_grace)

    with sessions.begin() as session:  # leaked: no grace
        leaked = webhooks.rotate_secret(
            session=session,
            subscription=session.get(WebhookSubscription, sub.id),
            grace=dt.timedelta(),
            now=after_grace,
        )
        assert (leaked.previous_secret, leaked.previous_secret_until) == (None, None)
        entries = session.scalars(
            select(AuditEntry).where(AuditEntry.action == "webhook_secret_rotated")
        ).all()
        assert len(entries) == 2
        assert all(new_secret not in json.dumps(e.details) for e in entries)


def test_the_readme_receiver_accepts_either_signature_of_a_rotation() -> None:
    """README's receiver snippet read the header into a dict, keeping the last ``v1``: a
    receiver switched to a rotated secret refused every delivery of the grace period,
    whose last ``v1`` is the old secret's. It accepts any ``v1`` that matches."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    snippet = next(
        block.removeprefix("python\n")
        for block in readme.split("```")
        if "def verify(secret" in block
    )
    namespace: dict[str, Any] = {}
    exec(snippet, namespace)
    body = b'{"id":"1"}'
    stamp = int(time.time())
    claimed = webhooks.ClaimedDelivery(
        id=1,
        delivery_id=uuid.uuid4(),
        subscription_id=1,
        topic="flag.raised",
        ordering_key="k",
        attempts=0,
        url="http://127.0.0.1:9/hook",
        secret="new-secret",
        envelope={},
        previous_secret="old-secret",
    )
    header = webhooks.signature(claimed, stamp, body)
    for secret in ("new-secret", "old-secret"):
        assert namespace["verify"](secret, header, body), secret
    assert not namespace["verify"]("other", header, body)
    assert not namespace["verify"]("new-secret", header, body + b" ")


def test_a_subscription_paused_while_failing_starts_its_run_over_when_resumed(
    sessions: sessionmaker[Session], receiver: Receiver, sender: HttpxSender
) -> None:
    """An admin pauses a failing subscription (``active: false``) while its receiver is
    being mended, and resumes it hours later. Nothing was tried meanwhile: the hours it
    was paused are no failing. The run of failures kept its ``failing_since`` from
    before the pause, so the first failure after resuming (a receiver warming up)
    disabled and flagged it at once, its count reached and its first failure "hours"
    old, where a receiver failing since the resumption is waited for
    ``WEBHOOK_DISABLE_AFTER_SECONDS``, as one enabled again is."""
    settings = replace(
        SETTINGS, max_attempts=20, disable_after_failures=3, disable_after_seconds=3600
    )
    sub = subscribe(sessions, receiver.url)
    for n in range(3):
        announce(sessions, f"RR00000000{n}GB")
    receiver.default = Answer(503)
    assert deliver(sessions, sender, T0, settings=settings)["failed"] == 3
    failing = subscription(sessions, sub.id)
    assert failing.consecutive_failures == 3 and failing.failing_since is not None
    assert failing.disabled_at is None  # the count reached, not the hour

    def patch(now: dt.datetime, active: bool) -> None:
        with sessions.begin() as session:
            webhooks.update_subscription(
                session=session,
                subscription=session.get(WebhookSubscription, sub.id),
                production=False,
                now=now,
                active=active,
            )

    patch(at(60), active=False)
    assert deliver(sessions, sender, at(3 * 3600), settings=settings)["claimed"] == 0
    resumed = at(5 * 3600)
    patch(resumed, active=True)

    stats = deliver(sessions, sender, resumed, settings=settings)

    assert stats["failed"] == 3 and stats["disabled"] == []
    after = subscription(sessions, sub.id)
    assert after.disabled_at is None
    assert after.failing_since is not None and after.failing_since >= resumed
    # Failing an hour after the resumption, it is disabled as any receiver failing so long.
    assert deliver(sessions, sender, resumed + LATER, settings=settings)["disabled"] == [sub.id]
