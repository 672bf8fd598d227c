"""``courier-api deliver``: --once in-process, and real processes against a receiver."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskCliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session

from courier_api.extensions import db
from models import ConsentMethod, DeliveryStatus, WebhookDelivery, utcnow
from models.engine import make_engine
from sync import consent_requests, outbox, webhooks
from tests import factories
from tests.conftest import World
from tests.webhook_receiver import Answer, Receiver

CLI = [sys.executable, "-m", "courier_api"]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as receiver:
        yield receiver


def announce(session: Session, key: str) -> None:
    outbox.announce(
        session=session,
        topic="flag.raised",
        ordering_key=key,
        station_id=None,
        data={"flag_id": 1, "subject_key": key},
    )


def test_once_delivers_what_is_due_and_prints_the_counts(
    runner: FlaskCliRunner, session: Session, receiver: Receiver
) -> None:
    webhooks.create_subscription(
        session=session, url=receiver.url, topics=["flag.raised"], production=False
    )
    announce(session, "RR000000001GB")
    announce(session, "RR000000002GB")
    session.commit()
    receiver.answer(Answer(500, b"not now"))

    result = runner.invoke(args=["deliver", "--once"])

    assert result.exit_code == 0, result.output
    assert result.output.strip() == "delivered 1, failed 1 (to be retried), dead 0"
    assert len(receiver.requests) == 2 and len(receiver.messages) == 1
    again = runner.invoke(args=["deliver", "--once"])  # the failed one is not due yet
    assert again.exit_code == 0
    assert again.output.strip() == "delivered 0, failed 0 (to be retried), dead 0"
    assert len(receiver.requests) == 2
    session.expire_all()
    statuses = session.scalars(select(WebhookDelivery.status).order_by(WebhookDelivery.id))
    assert list(statuses) == [DeliveryStatus.PENDING, DeliveryStatus.DELIVERED]


def test_once_counts_the_deliveries_it_skipped(
    runner: FlaskCliRunner, session: Session, world: World, receiver: Receiver
) -> None:
    """The deliverer was down while a courier asked; by then the request had lapsed. The
    operator running ``deliver --once`` read "delivered 0, failed 0, dead 0" and could not
    tell the backlog was settled rather than lost: the skipped delivery is counted."""
    webhooks.create_subscription(
        session=session, url=receiver.url, topics=["consent.requested"], production=False
    )
    asked_at = utcnow() - dt.timedelta(hours=2)
    consent_requests.request_consent(
        session=session,
        draft=consent_requests.RequestDraft(
            tracking_no=factories.parcel(session, world.station).tracking_no,
            method=ConsentMethod.LOCKER,
        ),
        asker=consent_requests.Asker(world.courier.id, world.station.id, world.device.id),
        ttl=dt.timedelta(minutes=30),
        requested_at=asked_at,
        now=asked_at,
    )
    session.commit()

    result = runner.invoke(args=["deliver", "--once"])

    assert result.exit_code == 0, result.output
    assert result.output.strip() == (
        "delivered 0, failed 0 (to be retried), dead 0, skipped 1 (no longer worth sending)"
    )
    assert receiver.requests == []
    session.expire_all()
    assert session.scalars(select(WebhookDelivery.status)).all() == [DeliveryStatus.SKIPPED]


def test_once_with_nothing_due(runner: FlaskCliRunner, session: Session) -> None:
    result = runner.invoke(args=["deliver", "--once"])
    assert result.exit_code == 0
    assert result.output.strip() == "delivered 0, failed 0 (to be retried), dead 0"


# -- as deployed: real processes on a SQLite file ---------------------------------------------


@pytest.fixture
def deployment(tmp_path: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'deliver.db'}",
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "APP_ENV": "development",
        "JWT_SECRET": "deliver-test-secret-" + "x" * 40,
        "WEBHOOK_TIMEOUT_SECONDS": "1",  # claims last 5 s: a crashed claim expires soon
        "WEBHOOK_POLL_SECONDS": "1",
        "LOG_LEVEL": "INFO",
    }
    subprocess.run([*CLI, "db", "upgrade"], env=env, check=True, capture_output=True)
    return env


def _setup(env: dict[str, str], url: str, keys: list[str]) -> str:
    """A subscription and committed announcements, as the API would leave them; the
    subscription's secret."""
    engine = make_engine(env["DATABASE_URL"])
    try:
        with Session(engine) as session:
            subscription = webhooks.create_subscription(
                session=session, url=url, topics=["flag.raised"], production=False
            )
            for key in keys:
                announce(session, key)
            session.commit()
            return subscription.secret
    finally:
        engine.dispose()


def _deliveries(env: dict[str, str]) -> list[Any]:
    engine = make_engine(env["DATABASE_URL"])
    try:
        with Session(engine) as session:
            return list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))
    finally:
        engine.dispose()


def test_a_deliverer_killed_mid_send_leaves_the_message_to_the_next_one(
    deployment: dict[str, str], receiver: Receiver, tmp_path: Path
) -> None:
    """SIGKILL after the receiver got the request but before the outcome was recorded:
    once the claim expires, ``deliver --once`` sends it again with the same id."""
    _setup(deployment, receiver.url, ["RR000000001GB"])
    receiver.answer(Answer(200, delay=60))  # holds the first request: the process dies then
    log_path = tmp_path / "deliver.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*CLI, "deliver"], env=deployment, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            assert receiver.arrived.wait(timeout=60), log_path.read_text()
            process.kill()
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    [held] = _deliveries(deployment)
    assert held.status == DeliveryStatus.PENDING and held.attempts == 0
    assert held.claimed_by is not None and held.claimed_until is not None
    assert held.claimed_until <= utcnow() + dt.timedelta(seconds=10)

    time.sleep(max(0.0, (held.claimed_until - utcnow()).total_seconds()) + 0.5)
    second = subprocess.run(
        [*CLI, "deliver", "--once"], env=deployment, capture_output=True, text=True, timeout=60
    )

    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "delivered 1, failed 0 (to be retried), dead 0"
    assert receiver.delivery_ids() == [str(held.delivery_id)] * 2
    assert list(receiver.messages) == [str(held.delivery_id)]
    [done] = _deliveries(deployment)
    assert done.status == DeliveryStatus.DELIVERED and done.attempts == 1


def test_the_deliverer_runs_until_sigterm_logging_each_attempt_without_secrets(
    deployment: dict[str, str], receiver: Receiver, tmp_path: Path
) -> None:
    secret = _setup(deployment, receiver.url, ["RR000000001GB", "RR000000002GB"])
    receiver.answer(Answer(500, b"first try fails"))
    log_path = tmp_path / "deliver.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*CLI, "deliver"], env=deployment, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 60
            while len(receiver.messages) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    output = log_path.read_text()
    assert "delivering webhooks, looking for due ones every 1 s" in output
    assert "attempt 1: failed, retrying at" in output and "HTTP 500: first try fails" in output
    assert "attempt 1: delivered (HTTP 200)" in output
    assert "stopped" in output.strip().splitlines()[-1]
    assert secret not in output
    for request in receiver.requests:
        assert request.headers["x-courier-signature"] not in output


def test_web_workers_deliver_on_a_thread_of_their_own(
    committed_app: Flask, receiver: Receiver
) -> None:
    """SCHEDULER_IN_WEB: what a gunicorn worker starts after the fork also delivers
    webhooks, and stopping it stops the deliverer's thread."""
    from courier_api import scheduler

    sessions = db.sessionmaker_of(committed_app)
    with sessions.begin() as session:
        webhooks.create_subscription(
            session=session, url=receiver.url, topics=["flag.raised"], production=False
        )
        announce(session, "RR000000001GB")
    scheduler.start_in_web_worker(committed_app)
    try:
        deliverer = scheduler._deliverer
        assert deliverer is not None and deliverer._thread is not None
        thread = deliverer._thread
        deadline = time.monotonic() + 30
        while not receiver.messages and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        scheduler.stop_in_web_worker()
    assert len(receiver.messages) == 1
    assert not thread.is_alive() and scheduler._deliverer is None
    with sessions() as session:
        assert session.scalars(select(WebhookDelivery.status)).all() == [DeliveryStatus.DELIVERED]
