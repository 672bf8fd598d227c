"""Faults around a push, with real commits: nothing acknowledged that is not stored,
nothing stored twice, and a pull that never skips a change written concurrently."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from flask import Flask
from sqlalchemy import Engine, event, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

import models.engine
from courier_api.api.sync import routes
from courier_api.app import REQUEST_ATTEMPTS
from courier_api.extensions import db
from models import (
    AuditEntry,
    Base,
    Device,
    DeviceStatus,
    DeviceSyncState,
    FeedChange,
    FeedKind,
    Flag,
    OutboxMessage,
    Parcel,
    ParcelStatus,
    QuarantinedEvent,
    ScanEvent,
    ServiceClass,
    SyncBatch,
)
from models.engine import reads_only
from sync import feed, ingest
from sync.parcels import IntakeRules, IntakeScope, ParcelDraft, intake_parcels
from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy
from tests import factories
from tests.conftest import Auth, make_test_app
from tests.live_server import TcpProxy
from tests.threads import race

PUSH = "/api/v1/sync/push"
PULL = "/api/v1/sync/pull"


class Station:
    def __init__(self, app: Flask) -> None:
        self.app = app
        with app.app_context():
            session = db.session
            station = factories.station(session, code="FAULT")
            self.courier_id = factories.user(session, "f-courier", "courier", station).id
            factories.user(session, "f-manager", "station_manager", station)
            factories.device(session, "PDA-F1", station)
            self.station_id = station.id
            self.parcels = [factories.parcel(session, station).tracking_no for _ in range(6)]
            session.commit()
        self.client = app.test_client()
        self.headers = Auth(self.client).headers("f-courier", "PDA-F1")

    def body(self, events: list[dict[str, Any]], batch_id: str | None = None) -> dict[str, Any]:
        return factories.push_body("PDA-F1", events, batch_id=batch_id)

    def push(self, body: dict[str, Any]) -> Any:
        return self.client.post(PUSH, json=body, headers=self.headers)

    def count(self, model: Any) -> int:
        with self.app.app_context():
            return db.session.scalar(select(func.count()).select_from(model))


@pytest.fixture
def station(committed_app: Flask) -> Iterator[Station]:
    yield Station(committed_app)


def events(station: Station, seqs: range) -> list[dict[str, Any]]:
    return [factories.event(seq, station.parcels[seq % 6]) for seq in seqs]


def test_a_failure_after_commit_loses_the_response_not_the_events(
    committed_app: Flask,
) -> None:
    lose_response = threading.Event()

    @committed_app.after_request
    def crash_after_commit(response: Any) -> Any:
        if lose_response.is_set():
            raise ConnectionError("the network dropped the response")
        return response

    station = Station(committed_app)
    batch = station.body(events(station, range(1, 6)))
    lose_response.set()
    with pytest.raises(ConnectionError):
        station.push(batch)
    lose_response.clear()
    assert station.count(ScanEvent) == 5  # committed before the response was lost

    replay = station.push(batch).get_json()  # the PDA retries the same batch
    assert [r["status"] for r in replay["results"]] == ["applied"] * 5
    rebuilt = station.push(station.body(batch["events"])).get_json()  # or rebuilds it
    assert [r["status"] for r in rebuilt["results"]] == ["duplicate"] * 5
    assert station.count(ScanEvent) == 5
    assert rebuilt["acked_through_seq"] == 5


def test_a_failure_before_commit_stores_and_acknowledges_nothing(
    station: Station, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = station.body(events(station, range(1, 4)) + [{"broken": True}])

    def crash(self: Any, tracker: Any) -> None:
        raise RuntimeError("the worker died while writing the receipt")

    monkeypatch.setattr(ingest._BatchIngest, "_receipt", crash)
    with pytest.raises(RuntimeError):
        station.push(batch)
    assert [station.count(m) for m in (ScanEvent, QuarantinedEvent, SyncBatch, FeedChange)] == [
        0,
        0,
        0,
        0,
    ]
    monkeypatch.undo()
    receipt = station.push(batch).get_json()
    assert [r["status"] for r in receipt["results"]] == ["applied"] * 3 + ["rejected"]
    assert station.count(ScanEvent) == 3


def test_database_down_mid_push_is_503_with_nothing_acknowledged(
    station: Station, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL the push's own connection is really terminated; SQLite, an embedded
    file, cannot go away like that, so there the driver's error is raised instead."""
    batch = station.body(events(station, range(1, 4)))
    insert = ingest._BatchIngest._insert

    def database_goes_away(self: Any, fresh: Any) -> Any:
        insert(self, fresh)
        if self.session.get_bind().dialect.name == "postgresql":
            self.session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        raise OperationalError("INSERT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(ingest._BatchIngest, "_insert", database_goes_away)
    response = station.push(batch)
    assert response.status_code == 503
    assert response.get_json()["code"] == "database_unavailable"
    assert response.headers["Retry-After"]
    assert "results" not in response.get_json()
    monkeypatch.undo()
    assert station.count(ScanEvent) == 0
    receipt = station.push(batch).get_json()  # the PDA kept everything and retries
    assert [r["status"] for r in receipt["results"]] == ["applied"] * 3


def _end_the_requests_connection(database_url: str, pid: int | None = None) -> None:
    """What a database restart, ``DROP DATABASE ... WITH (FORCE)`` or an operator's
    ``pg_terminate_backend`` does to the current request's connection (its backend
    ``pid``), from another one, waiting until its backend is gone."""
    if pid is None:
        pid = db.session.execute(text("SELECT pg_backend_pid()")).scalar_one()
    admin = make_url(database_url).set(drivername="postgresql")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.monotonic() + 10
        while other.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            assert time.monotonic() < deadline, f"backend {pid} still there"
            time.sleep(0.01)


@pytest.mark.postgres_only
@pytest.mark.parametrize("answer", ["pull", "push_refused"])
def test_a_connection_ended_after_the_requests_last_statement_leaves_its_answer_standing(
    committed_app: Flask, database_url: str, answer: str
) -> None:
    """The database ends a request's connection after its last statement, its
    transaction still open (a pull's, which only reads; a push refused, 409): the
    session's close at the request's end could not roll it back, and the error escaped
    the app from its teardown, past every error handler: gunicorn answered its own HTML
    "Internal Server Error" in place of the answer made (a PDA expects JSON). The
    answer stands (the transaction ended with its connection), and the next request
    gets a connection of its own."""
    ending = threading.Event()

    @committed_app.after_request
    def connection_ends(response: Any) -> Any:
        if ending.is_set() and db.session.in_transaction():
            ending.clear()
            _end_the_requests_connection(database_url)
        return response

    station = Station(committed_app)
    batch = station.body(events(station, range(1, 4)))
    assert station.push(batch).status_code == 200
    ending.set()
    if answer == "pull":
        response = station.client.get(PULL, headers=station.headers)
        assert response.status_code == 200, response.get_data()
        assert response.get_json()["next_cursor"]
    else:
        other = station.body(events(station, range(4, 6)), batch_id=batch["batch_id"])
        response = station.push(other)
        assert response.status_code == 409, response.get_data()
        assert response.get_json()["code"] == "batch_id_reused"
    assert not ending.is_set(), "no connection was ended"
    receipt = station.push(station.body(events(station, range(4, 6)))).get_json()
    assert [r["status"] for r in receipt["results"]] == ["applied"] * 2


@pytest.mark.postgres_only
def test_a_push_whose_connection_ends_after_its_statement_failed_is_still_a_503(
    station: Station, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push's statement fails with its connection still good (cancelled, 57014), and
    the database then ends that connection before the error is answered (a restart,
    ``DROP DATABASE ... WITH (FORCE)``): the error handler's rollback failed, and its
    error replaced the 503 with a 500."""
    batch = station.body(events(station, range(1, 4)))
    insert = ingest._BatchIngest._insert

    def cancelled_then_ended(self: Any, fresh: Any) -> Any:
        insert(self, fresh)
        pid = self.session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        self.session.execute(text("SET LOCAL statement_timeout = 1"))
        try:
            self.session.execute(text("SELECT pg_sleep(1)"))
        finally:
            _end_the_requests_connection(database_url, pid)

    monkeypatch.setattr(ingest._BatchIngest, "_insert", cancelled_then_ended)
    response = station.push(batch)
    assert response.status_code == 503, response.get_data()
    assert response.get_json()["code"] == "database_unavailable"
    assert response.headers["Retry-After"]
    monkeypatch.undo()
    assert station.count(ScanEvent) == 0
    receipt = station.push(batch).get_json()
    assert [r["status"] for r in receipt["results"]] == ["applied"] * 3


@pytest.mark.postgres_only
def test_a_push_cancelled_by_a_statement_timeout_is_503_with_nothing_stored(
    station: Station, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator's ``statement_timeout`` (``options=-c statement_timeout=...`` in the
    URL) cancels a push's statement that waits too long (a lock held elsewhere, a slow
    disk): PostgreSQL's cancellation (57014) aborts the transaction and is answered as
    the database's refusal, a 503 to send again, never run again in the request (it is
    no conflict) nor a 500; the retry applies the batch once."""
    batch = station.body(events(station, range(1, 4)))
    insert = ingest._BatchIngest._insert
    runs = []

    def cancelled(self: Any, fresh: Any) -> Any:
        runs.append(1)
        insert(self, fresh)
        self.session.execute(text("SET LOCAL statement_timeout = 10"))
        self.session.execute(text("SELECT pg_sleep(1)"))

    monkeypatch.setattr(ingest._BatchIngest, "_insert", cancelled)
    response = station.push(batch)
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["code"] == "database_unavailable"
    assert response.headers["Retry-After"]
    assert runs == [1]
    monkeypatch.undo()
    assert station.count(ScanEvent) == 0
    receipt = station.push(batch).get_json()
    assert [r["status"] for r in receipt["results"]] == ["applied"] * 3
    assert station.count(ScanEvent) == 3


@pytest.mark.postgres_only
def test_a_web_requests_statement_past_its_timeout_is_cancelled_and_a_commands_is_not(
    database_url: str, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``DATABASE_STATEMENT_TIMEOUT_SECONDS`` is the ``statement_timeout`` of a web
    request's statements: one that waits longer (a lock held elsewhere, a slow disk) is
    cancelled by PostgreSQL, a 503 with nothing stored, in the timeout and not in the
    client's longer bound; a CLI command's or a job's statements on the same pooled
    connections keep the server's (no timeout here)."""
    app = make_test_app(database_url, tmp_path, DATABASE_STATEMENT_TIMEOUT_SECONDS=1)
    try:
        station = Station(app)
        batch = station.body(events(station, range(1, 4)))
        insert = ingest._BatchIngest._insert

        def slow(self: Any, fresh: Any) -> Any:
            inserted = insert(self, fresh)
            self.session.execute(text("SELECT pg_sleep(3)"))
            return inserted

        monkeypatch.setattr(ingest._BatchIngest, "_insert", slow)
        started = time.monotonic()
        response = station.push(batch)
        waited = time.monotonic() - started
        assert response.status_code == 503, response.get_json()
        assert response.get_json()["code"] == "database_unavailable"
        assert 1 <= waited < 2.5, waited
        monkeypatch.undo()
        assert station.count(ScanEvent) == 0
        with app.app_context():  # outside a request: the server's own, on every connection
            for _ in range(3):
                with db.engine.connect() as connection:
                    shown = connection.execute(text("SHOW statement_timeout")).scalar_one()
                    assert shown == "0", shown
        receipt = station.push(batch).get_json()
        assert [r["status"] for r in receipt["results"]] == ["applied"] * 3
    finally:
        db.engine_of(app).dispose()
        with engine.begin() as connection:
            for table in reversed(Base.metadata.sorted_tables):
                connection.execute(table.delete())


@pytest.mark.postgres_only
@pytest.mark.parametrize(
    ("url_ms", "ours", "cancelled_after"),
    [(500, 30, 0.5), (60_000, 1, 1.0)],
    ids=["the_operators_smaller", "ours_smaller"],
)
def test_a_web_requests_statement_timeout_is_the_smaller_of_the_operators_and_ours(
    database_url: str,
    engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    url_ms: int,
    ours: int,
    cancelled_after: float,
) -> None:
    """An operator's ``statement_timeout`` in the URL (``options=-c
    statement_timeout=500``) bounds a web request's statements when it is smaller than
    ``DATABASE_STATEMENT_TIMEOUT_SECONDS``: the service's ``SET`` replaced it with its
    own 30 s, and a push the operator meant cancelled at 0.5 s waited its 3 s and was
    applied. The smaller of the two is the bound; outside a request the session keeps
    the operator's."""
    url = make_url(database_url).update_query_dict({"options": f"-c statement_timeout={url_ms}"})
    app = make_test_app(
        url.render_as_string(hide_password=False),
        tmp_path,
        DATABASE_STATEMENT_TIMEOUT_SECONDS=ours,
    )
    try:
        station = Station(app)
        batch = station.body(events(station, range(1, 4)))
        insert = ingest._BatchIngest._insert

        def slow(self: Any, fresh: Any) -> Any:
            inserted = insert(self, fresh)
            self.session.execute(text("SELECT pg_sleep(3)"))
            return inserted

        monkeypatch.setattr(ingest._BatchIngest, "_insert", slow)
        started = time.monotonic()
        response = station.push(batch)
        waited = time.monotonic() - started
        assert response.status_code == 503, response.get_json()
        assert response.get_json()["code"] == "database_unavailable"
        assert cancelled_after <= waited < 3, waited  # before the 3 s statement ended
        monkeypatch.undo()
        assert station.count(ScanEvent) == 0
        with app.app_context():  # outside a request: the operator's, on every connection
            for _ in range(3):
                with db.engine.connect() as connection:
                    shown = connection.execute(text("SHOW statement_timeout")).scalar_one()
                    assert shown == ("500ms" if url_ms == 500 else "1min"), shown
        receipt = station.push(batch).get_json()
        assert [r["status"] for r in receipt["results"]] == ["applied"] * 3
    finally:
        db.engine_of(app).dispose()
        with engine.begin() as connection:
            for table in reversed(Base.metadata.sorted_tables):
                connection.execute(table.delete())


@pytest.mark.postgres_only
def test_a_push_to_a_database_that_stops_answering_is_a_503_within_its_bound(
    database_url: str, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL stops answering without closing its connections (a hung server,
    packets held on the way: a proxy that forwards nothing more). The push waited for
    an answer for ever, gunicorn's worker reporting alive all along (100 s and more in
    a run), and the courier's PDA with it. Each answer is now awaited the statement
    timeout and ``REPLY_MARGIN_SECONDS`` at most (a new connection ``connect_timeout``):
    a 503 to send again, nothing stored, and the retry applies the batch once the
    database answers again."""
    monkeypatch.setattr(models.engine, "REPLY_MARGIN_SECONDS", 0.5, raising=False)
    parsed = make_url(database_url)
    with TcpProxy((parsed.host or "127.0.0.1", parsed.port or 5432)) as proxy:
        proxied = parsed.set(
            host="127.0.0.1", port=proxy.port, query={**parsed.query, "connect_timeout": "2"}
        )
        app = make_test_app(
            proxied.render_as_string(hide_password=False),
            tmp_path,
            DATABASE_STATEMENT_TIMEOUT_SECONDS=1,
        )
        answers: list[Any] = []
        try:
            station = Station(app)
            batch = station.body(events(station, range(1, 4)))
            proxy.stall()
            started = time.monotonic()
            pushing = threading.Thread(target=lambda: answers.append(station.push(batch)))
            pushing.start()
            pushing.join(timeout=10)
            waited = time.monotonic() - started
            assert answers, "no answer in 10 s from a database that stopped answering"
            response = answers[0]
            assert response.status_code == 503, response.get_json()
            assert response.get_json()["code"] == "database_unavailable"
            assert response.headers["Retry-After"]
            assert waited < 6, waited  # 1.5 s for the pooled connection, 2 s for a new one
        finally:
            proxy.restore()
            pushing.join(timeout=30)
        assert station.count(ScanEvent) == 0
        receipt = station.push(batch).get_json()
        assert [r["status"] for r in receipt["results"]] == ["applied"] * 3
        assert station.count(ScanEvent) == 3
        db.engine_of(app).dispose()
    with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())


def _aborted_by_postgresql(session: Session, errcode: str) -> None:
    """What PostgreSQL does to a transaction it picks to break a deadlock (or a
    serialization conflict): the statement fails with that SQLSTATE and the whole
    transaction is aborted. Raised here by the server itself, through psycopg, as a
    real one is; elsewhere the driver's exception is injected as the push's execute
    would raise it."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text(f"DO $$ BEGIN RAISE EXCEPTION 'forced' USING ERRCODE = '{errcode}'; END $$")
        )
    error = {
        "deadlock_detected": psycopg.errors.DeadlockDetected,
        "serialization_failure": psycopg.errors.SerializationFailure,
    }[errcode]("forced")
    raise OperationalError("INSERT", {}, error)


@pytest.mark.postgres_only
@pytest.mark.parametrize("errcode", ["deadlock_detected", "serialization_failure"])
def test_a_push_postgresql_aborts_once_is_run_again_and_applied_once(
    station: Station, monkeypatch: pytest.MonkeyPatch, errcode: str
) -> None:
    """The PDA gets its receipt, not a 503 to send again: the whole push ran again in a
    fresh transaction, after the first one had inserted its events and been aborted."""
    batch = station.body(events(station, range(1, 5)) + [{"broken": True}])
    insert = ingest._BatchIngest._insert
    attempts: list[int] = []

    def aborted_the_first_time(self: Any, fresh: Any) -> Any:
        result = insert(self, fresh)
        attempts.append(len(fresh))
        if len(attempts) == 1:
            _aborted_by_postgresql(self.session, errcode)
        return result

    monkeypatch.setattr(ingest._BatchIngest, "_insert", aborted_the_first_time)
    response = station.push(batch)
    assert response.status_code == 200, response.get_json()
    receipt = response.get_json()
    assert attempts == [4, 4]
    assert [r["status"] for r in receipt["results"]] == ["applied"] * 4 + ["rejected"]
    assert (receipt["acked_through_seq"], receipt["missing_seqs"]) == (4, [])
    monkeypatch.undo()
    counts = [station.count(m) for m in (ScanEvent, QuarantinedEvent, SyncBatch)]
    assert counts == [4, 1, 1]
    assert station.push(batch).get_json()["results"] == receipt["results"]  # a replay
    assert [station.count(m) for m in (ScanEvent, QuarantinedEvent, SyncBatch)] == counts


def test_a_push_aborted_every_time_is_a_503_to_send_again_with_nothing_stored(
    station: Station, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = station.body(events(station, range(1, 4)))
    insert = ingest._BatchIngest._insert
    attempts: list[int] = []

    def always_aborted(self: Any, fresh: Any) -> Any:
        insert(self, fresh)
        attempts.append(len(fresh))
        _aborted_by_postgresql(self.session, "deadlock_detected")

    monkeypatch.setattr(ingest._BatchIngest, "_insert", always_aborted)
    response = station.push(batch)
    assert response.status_code == 503
    assert response.get_json()["code"] == "transaction_conflict"
    assert "send the same request again" in response.get_json()["message"]
    assert int(response.headers["Retry-After"]) >= 1
    assert len(attempts) == REQUEST_ATTEMPTS
    monkeypatch.undo()
    assert [station.count(m) for m in (ScanEvent, SyncBatch)] == [0, 0]
    receipt = station.push(batch).get_json()  # the PDA kept everything and retries
    assert [r["status"] for r in receipt["results"]] == ["applied"] * 3


def test_each_run_of_an_aborted_push_is_a_run_of_its_whole_request(
    station: Station, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One retry loop, every request's (``CourierFlask.dispatch_request``): each time
    PostgreSQL aborts the push, the whole view runs again, its sign-in check and body
    first, and ingests the batch once. A loop of the push's own inside it would ingest
    several times in one run of the view; anything of the push counted as committed
    before the abort (a savepoint released) would leave it at one run."""
    batch = station.body(events(station, range(1, 4)))
    view_runs: list[int] = []
    ingested_in_run: list[int] = []
    post = routes.Push.post

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        view_runs.append(1)
        return post(self, *args, **kwargs)

    insert = ingest._BatchIngest._insert

    def always_aborted(self: Any, fresh: Any) -> Any:
        insert(self, fresh)
        ingested_in_run.append(len(view_runs))
        _aborted_by_postgresql(self.session, "serialization_failure")

    monkeypatch.setattr(routes.Push, "post", counted)
    monkeypatch.setattr(ingest._BatchIngest, "_insert", always_aborted)
    response = station.push(batch)
    assert response.status_code == 503
    assert response.get_json()["code"] == "transaction_conflict"
    assert ingested_in_run == list(range(1, REQUEST_ATTEMPTS + 1))


def test_a_push_aborted_at_its_commit_keeps_and_counts_its_second_run_alone(
    station: Station, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The latest PostgreSQL can abort a push: at its commit, once its first run had
    chained its audit entry (deferred to the commit), noted its flags for the metrics
    and written its webhook announcements. Only the second run is kept and counted:
    its audit entries once and the chain intact, the late flag counted once, its
    announcements written once, and a replay answered the receipt the PDA got."""
    from courier_api import metrics
    from sync.audit import verify
    from tests.sync.test_consent_requests import subscribe

    with station.app.app_context():
        subscribe(db.session, "flag.raised")
    shifts = "/api/v1/shifts"
    shift = station.client.post(shifts, json={}, headers=station.headers).get_json()
    a, b = station.parcels[:2]
    station.push(station.body([factories.event(1, a), factories.event(2, b)]))
    manager = Auth(station.client).headers("f-manager")
    closed = station.client.post(f"{shifts}/{shift['id']}/close", json={}, headers=station.headers)
    assert closed.status_code == 200, closed.get_json()
    signed = station.client.post(
        f"{shifts}/{shift['id']}/signoff", json={"note": "b missing"}, headers=manager
    )
    assert signed.status_code == 200, signed.get_json()
    late = station.body([factories.event(3, b, "returned_to_station", shift_id=shift["id"])])
    flags_raised = metrics._metrics().flags.labels("late_event_after_signoff")
    counted_before = flags_raised._value.get()
    entries_before, announced_before = station.count(AuditEntry), station.count(OutboxMessage)
    commits: list[int] = []

    def aborted_at_the_first_commit(session: Session) -> None:
        if session.info.get("push") and not session.in_nested_transaction():
            commits.append(1)
            if len(commits) == 1:
                _aborted_by_postgresql(session, "deadlock_detected")

    real_ingest = routes.ingest

    def marked(**kwargs: Any) -> Any:
        kwargs["session"].info["push"] = True
        return real_ingest(**kwargs)

    monkeypatch.setattr(routes, "ingest", marked)
    event.listen(Session, "before_commit", aborted_at_the_first_commit)
    try:
        response = station.push(late)
    finally:
        event.remove(Session, "before_commit", aborted_at_the_first_commit)
        monkeypatch.undo()
    assert response.status_code == 200, response.get_json()
    receipt = response.get_json()
    assert len(commits) == 2
    assert "late_event_after_signoff" in {f["kind"] for f in receipt["flags_raised"]}
    assert flags_raised._value.get() - counted_before == 1
    with station.app.app_context():
        written = db.session.scalars(
            select(AuditEntry.action).order_by(AuditEntry.id).offset(entries_before)
        ).all()
        assert verify(session=db.session).broken_id is None
    # The reopening, and the missing parcel's flag closed by the return: each once.
    assert sorted(written) == ["flag_status_changed", "shift_reopened"]
    announced = station.count(OutboxMessage) - announced_before
    assert announced == len(receipt["flags_raised"])
    assert station.push(late).get_json() == receipt  # a replay: the same receipt
    assert [station.count(m) for m in (AuditEntry, OutboxMessage)] == [
        entries_before + 2,
        announced_before + announced,
    ]


@pytest.mark.postgres_only
def test_a_pda_reported_lost_before_its_aborted_push_runs_again_is_stopped(
    station: Station, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each run of the push begins with the sign-in check: the PDA reported lost while
    its first run was being aborted is refused by the second, nothing stored."""
    batch = station.body(events(station, range(1, 4)))
    insert = ingest._BatchIngest._insert

    def report_lost() -> None:  # the manager's request, in a thread of its own
        with Session(db.engine_of(station.app)) as manager, manager.begin():
            device = manager.get(Device, "PDA-F1")
            assert device is not None
            device.status = DeviceStatus.LOST

    def reported_lost_then_aborted(self: Any, fresh: Any) -> Any:
        insert(self, fresh)
        manager = threading.Thread(target=report_lost)
        manager.start()
        manager.join()
        _aborted_by_postgresql(self.session, "deadlock_detected")

    monkeypatch.setattr(ingest._BatchIngest, "_insert", reported_lost_then_aborted)
    response = station.push(batch)
    assert (response.status_code, response.get_json()["code"]) == (401, "device_not_active")
    assert [station.count(m) for m in (ScanEvent, SyncBatch)] == [0, 0]


def test_a_busy_sqlite_file_is_not_run_again(
    station: Station, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite already waited its busy timeout: the push answers 503 at once, as before."""
    batch = station.body(events(station, range(1, 4)))
    attempts: list[int] = []

    def locked(self: Any, fresh: Any) -> Any:
        attempts.append(len(fresh))
        raise OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))

    monkeypatch.setattr(ingest._BatchIngest, "_insert", locked)
    response = station.push(batch)
    assert (response.status_code, response.get_json()["code"]) == (503, "database_unavailable")
    assert attempts == [3]


def test_a_paginated_pull_while_another_thread_pushes_sees_every_change(
    committed_app: Flask,
) -> None:
    with committed_app.app_context():
        session = db.session
        station = factories.station(session, code="PAGE")
        factories.user(session, "p-courier", "courier", station)
        factories.device(session, "PDA-P1", station)
        parcels = [factories.parcel(session, station).tracking_no for _ in range(120)]
        session.commit()
    writer_client = committed_app.test_client()
    headers = Auth(writer_client).headers("p-courier", "PDA-P1")
    done = threading.Event()
    failures: list[Any] = []

    def write() -> None:
        try:
            for start in range(0, 120, 8):
                items = [factories.event(seq + 1, parcels[seq]) for seq in range(start, start + 8)]
                body = factories.push_body("PDA-P1", items)
                response = writer_client.post(PUSH, json=body, headers=headers)
                if response.status_code != 200:
                    failures.append(response.get_json())
        finally:
            done.set()

    reader = committed_app.test_client()
    seen: list[str] = []
    cursor = "0.0"  # the feed from its start, not a snapshot: each change exactly once
    writer = threading.Thread(target=write)
    writer.start()
    while True:
        finished = done.is_set()
        page = reader.get(PULL, query_string={"cursor": cursor, "limit": 7}, headers=headers)
        body = page.get_json()
        seen += [change["tracking_no"] for change in body["changes"]]
        cursor = body["next_cursor"]
        if finished and not body["has_more"]:
            break
    writer.join()
    assert failures == []
    assert sorted(seen) == sorted(parcels)  # every change once, none skipped


@pytest.mark.postgres_only
def test_a_change_that_commits_late_with_a_lower_id_is_not_skipped(station: Station) -> None:
    """Transaction A writes a feed entry first (lower id) and commits last. A reader that
    paged past B's entry meanwhile would never see A's: the horizon prevents it."""
    engine = db.engine_of(station.app)
    with Session(engine) as late:
        feed.record(
            late,
            [feed.FeedEntry(station.station_id, station.courier_id, FeedKind.PARCEL, "LATE-1")],
        )
        late.flush()
        station.push(station.body([factories.event(1, station.parcels[0])]))  # B commits
        first = station.client.get(
            PULL, query_string={"cursor": "0.0"}, headers=station.headers
        ).get_json()
        assert first["changes"] == []  # B's entry waits until A is decided
        late.commit()
    second = station.client.get(
        PULL, query_string={"cursor": first["next_cursor"]}, headers=station.headers
    ).get_json()
    assert [c["tracking_no"] for c in second["changes"]] == ["LATE-1", station.parcels[0]]


@pytest.mark.postgres_only
def test_a_snapshot_that_says_it_is_complete_misses_no_change_committing_late(
    station: Station,
) -> None:
    """A fresh PDA's one snapshot page says ``has_more`` false while a transaction that
    wrote a feed entry for its courier is still running (above the horizon, not final):
    its cursor stays before that entry, so the pull after the commit gets it."""
    engine = db.engine_of(station.app)
    with Session(engine) as late:
        feed.record(
            late,
            [feed.FeedEntry(station.station_id, station.courier_id, FeedKind.PARCEL, "LATE-2")],
        )
        late.flush()
        station.push(station.body([factories.event(1, station.parcels[0])]))  # commits
        snapshot = station.client.get(PULL, headers=station.headers).get_json()
        assert [c["tracking_no"] for c in snapshot["changes"]] == [station.parcels[0]]
        assert not snapshot["has_more"]
        late.commit()
    after = station.client.get(
        PULL, query_string={"cursor": snapshot["next_cursor"]}, headers=station.headers
    ).get_json()
    assert "LATE-2" in [c["tracking_no"] for c in after["changes"]]


@pytest.mark.postgres_only
def test_a_transaction_on_another_database_holds_no_pull_back(station: Station) -> None:
    """The horizon is this database's: another service's transaction on the same server,
    holding a transaction id, cannot write this feed, so the pull does not wait for it."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(str(db.engine_of(station.app).url)).set(
        drivername="postgresql", database="postgres"
    )
    with psycopg.connect(url.render_as_string(hide_password=False)) as elsewhere:
        elsewhere.execute("SELECT pg_current_xact_id()")  # a writer's id, left running
        station.push(station.body([factories.event(1, station.parcels[0])]))
        page = station.client.get(
            PULL, query_string={"cursor": "0.0"}, headers=station.headers
        ).get_json()
        assert [c["tracking_no"] for c in page["changes"]] == [station.parcels[0]]
        elsewhere.rollback()


def test_the_same_batch_from_eight_threads_is_applied_once(station: Station) -> None:
    batch = station.body(events(station, range(1, 101)))
    responses = race(station.app, PUSH, [batch] * 8, station.headers)
    assert [r.status_code for r in responses] == [200] * 8
    bodies = {r.get_data() for r in responses}
    assert len(bodies) == 1  # eight identical receipts
    receipt = responses[0].get_json()
    assert {r["status"] for r in receipt["results"]} == {"applied"}
    assert station.count(ScanEvent) == 100
    assert station.count(SyncBatch) == 1


def test_two_batches_of_one_device_pushed_at_once_both_apply(station: Station) -> None:
    first = station.body(events(station, range(1, 151)))
    second = station.body(events(station, range(151, 301)))
    responses = race(station.app, PUSH, [first, second], station.headers)
    assert [r.status_code for r in responses] == [200, 200]
    for response in responses:
        assert {r["status"] for r in response.get_json()["results"]} == {"applied"}
    assert station.count(ScanEvent) == 300
    final = station.push(station.body([])).get_json()
    assert (final["acked_through_seq"], final["missing_seqs"]) == (300, [])


@pytest.mark.postgres_only
def test_a_push_waits_only_for_its_own_device(committed_app: Flask) -> None:
    """The lock is per device: with device A's lock held elsewhere, B's push goes
    through at once while A's waits."""
    with committed_app.app_context():
        pdas = {f"lock-{n}": f"PDA-LOCK-{n.upper()}" for n in ("a", "b")}
        _, parcels = factories.station_with_pdas(db.session, "LOCK", pdas, parcels=2)
        db.session.commit()
    client = committed_app.test_client()
    auth = Auth(client)
    headers = {n: auth.headers(f"lock-{n}", f"PDA-LOCK-{n.upper()}") for n in ("a", "b")}

    def push(name: str, seq: int, parcel: str) -> Any:
        body = factories.push_body(f"PDA-LOCK-{name.upper()}", [factories.event(seq, parcel)])
        return committed_app.test_client().post(PUSH, json=body, headers=headers[name])

    assert push("a", 1, parcels[0]).status_code == 200  # device A has its sync state row
    results: dict[str, Any] = {}
    with Session(db.engine_of(committed_app)) as other:
        other.execute(
            select(DeviceSyncState)
            .where(DeviceSyncState.device_id == "PDA-LOCK-A")
            .with_for_update()
        )
        waiting = threading.Thread(target=lambda: results.update(a=push("a", 2, parcels[0])))
        waiting.start()
        assert push("b", 1, parcels[1]).status_code == 200  # not held up by A's lock
        waiting.join(timeout=1.0)
        assert waiting.is_alive()  # A's second push waits for its device's lock
        other.rollback()
    waiting.join(timeout=30)
    assert results["a"].status_code == 200


def test_batches_of_different_devices_pushed_at_once_all_apply(committed_app: Flask) -> None:
    with committed_app.app_context():
        session = db.session
        station = factories.station(session, code="MANY")
        for n in range(4):
            factories.user(session, f"m-courier{n}", "courier", station)
            factories.device(session, f"PDA-M{n}", station)
        parcels = [
            [factories.parcel(session, station).tracking_no for _ in range(10)] for _ in range(4)
        ]
        shared = factories.parcel(session, station).tracking_no
        session.commit()
    client = committed_app.test_client()
    auth = Auth(client)
    headers = [auth.headers(f"m-courier{n}", f"PDA-M{n}") for n in range(4)]
    barrier = threading.Barrier(4)
    responses: list[Any] = [None] * 4

    def send(n: int) -> None:
        items = [factories.event(seq, parcels[n][seq % 10]) for seq in range(1, 51)]
        items.append(factories.event(51, shared, "out_for_delivery"))  # and one in common
        body = factories.push_body(f"PDA-M{n}", items, batch_id=str(uuid.uuid4()))
        barrier.wait()
        responses[n] = committed_app.test_client().post(PUSH, json=body, headers=headers[n])

    threads = [threading.Thread(target=send, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [r.status_code for r in responses] == [200] * 4
    with committed_app.app_context():
        assert db.session.scalar(select(func.count()).select_from(ScanEvent)) == 204
        status = db.session.scalar(select(Parcel.status).where(Parcel.tracking_no == shared))
        assert status == ParcelStatus.OUT_FOR_DELIVERY


@pytest.mark.postgres_only
def test_a_parcel_taken_in_while_its_events_are_pushed_gets_their_status(
    station: Station,
) -> None:
    """Intake creates parcel Z and has not committed; a push of Z's events arrives. The
    push waits for the intake (a lock on the tracking number, which a row lock cannot
    give before the row exists), then projects Z: no status is lost, no flag stays."""
    tracking_no = factories.s10()
    photo = "e" * 64  # the proof, uploaded
    with station.app.app_context():
        factories.stored_image(db.session, photo)
        db.session.commit()
    engine = db.engine_of(station.app)
    responses: list[Any] = []
    with Session(engine) as intake:
        intake_parcels(
            session=intake,
            drafts=[(0, ParcelDraft(tracking_no, ServiceClass.PARCEL, "R", "1 Road"))],
            rules=IntakeRules(
                tracking=TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS),
                phone_region="CN",
            ),
            scope=IntakeScope(default_station_id=station.station_id, allowed_station_ids=None),
        )
        body = station.body(
            [
                factories.event(1, tracking_no),
                factories.event(2, tracking_no, "delivered", pod={"photo_sha256": photo}),
            ]
        )
        pusher = threading.Thread(target=lambda: responses.append(station.push(body)))
        pusher.start()
        pusher.join(timeout=1.0)
        assert pusher.is_alive()  # waiting for the intake's lock on the tracking number
        intake.commit()
    pusher.join(timeout=30)
    assert responses[0].status_code == 200
    with station.app.app_context():
        parcel = db.session.scalars(select(Parcel).where(Parcel.tracking_no == tracking_no)).one()
        assert parcel.status == ParcelStatus.DELIVERED
        assert parcel.courier_id == station.courier_id
        flags = db.session.scalars(select(Flag).where(Flag.subject_key == tracking_no)).all()
        assert flags == []


def test_a_revoked_pdas_push_is_refused_by_the_first_statement_of_its_transaction(
    committed_app: Flask,
) -> None:
    """A push's sign-in check runs once, as the first statement of its writing
    transaction (``Database.check_when_writing``): no reading transaction before it
    (on SQLite, its turn comes after its body is parsed), and a stolen PDA's revoked
    token stores nothing."""
    with committed_app.app_context():
        _, parcels = factories.station_with_pdas(
            db.session, "HELD", {"held": "PDA-HELD"}, parcels=1
        )
        db.session.commit()
    client = committed_app.test_client()
    headers = Auth(client).headers("held", "PDA-HELD")
    with committed_app.app_context():
        device = db.session.get(Device, "PDA-HELD")
        assert device is not None
        device.status = DeviceStatus.LOST
        db.session.commit()
    body = factories.push_body("PDA-HELD", [factories.event(1, parcels[0])])
    engine = db.engine_of(committed_app)
    sent: list[str] = []

    def capture(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(" ".join(statement.split()))

    def trace(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.set_trace_callback(lambda sql: capture(None, None, sql))

    # On a SQLite file, what SQLite runs (its trace, on connections made anew): the
    # BEGIN is the dialect's, not a statement SQLAlchemy's listeners hear.
    sqlite = engine.dialect.name == "sqlite"
    name, listener = ("connect", trace) if sqlite else ("before_cursor_execute", capture)
    engines = {engine, reads_only(engine)}
    if sqlite:
        engine.dispose()  # its readers' too
    for each in engines:
        event.listen(each, name, listener)
    try:
        response = client.post(PUSH, json=body, headers=headers)
    finally:
        for each in engines:
            event.remove(each, name, listener)
        if sqlite:
            engine.dispose()  # no traced connection left
    assert response.status_code == 401, response.get_json()
    assert response.get_json()["code"] == "device_not_active"
    statements = [s for s in sent if not s.startswith(("PRAGMA", "SAVEPOINT", "RELEASE"))]
    if engine.dialect.name == "sqlite":
        assert statements[0] == "BEGIN IMMEDIATE", statements
        statements = statements[1:]
    assert "FROM app_user" in statements[0], statements
    assert not any("DEFERRED" in s for s in sent), sent
    with committed_app.app_context():
        assert db.session.scalar(select(func.count()).select_from(SyncBatch)) == 0


def test_a_device_reported_lost_while_its_push_waits_for_the_turn_stops_the_push(
    committed_app: Flask,
) -> None:
    """SQLite: the push's sign-in check reads before the push takes the writers' turn;
    the device reported lost by the writer it waited for is seen when it gets the turn
    (``check_token_subject``), and nothing of it is stored. (PostgreSQL: the check is
    the push's first statement, in READ COMMITTED, and the push is not held up here.)"""
    if db.engine_of(committed_app).dialect.name != "sqlite":
        pytest.skip("SQLite's writers' turn")
    with committed_app.app_context():
        _, parcels = factories.station_with_pdas(
            db.session, "LOST", {"lost": "PDA-LOST"}, parcels=1
        )
        db.session.commit()
    headers = Auth(committed_app.test_client()).headers("lost", "PDA-LOST")
    body = factories.push_body("PDA-LOST", [factories.event(1, parcels[0])])
    responses: list[Any] = []
    with Session(db.engine_of(committed_app)) as manager:
        device = manager.get(Device, "PDA-LOST")
        assert device is not None
        device.status = DeviceStatus.LOST
        manager.flush()  # the manager's transaction holds the turn
        pusher = threading.Thread(
            target=lambda: responses.append(
                committed_app.test_client().post(PUSH, json=body, headers=headers)
            )
        )
        pusher.start()
        pusher.join(timeout=1.0)
        assert pusher.is_alive()  # signed in, body parsed, waiting for the turn
        manager.commit()
    pusher.join(timeout=30)
    assert responses[0].status_code == 401, responses[0].get_json()
    assert responses[0].get_json()["code"] == "device_not_active"
    with committed_app.app_context():
        assert db.session.scalar(select(func.count()).select_from(ScanEvent)) == 0
        assert db.session.scalar(select(func.count()).select_from(SyncBatch)) == 0
