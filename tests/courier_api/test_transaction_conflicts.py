"""A request PostgreSQL aborts for a deadlock or a serialization failure, whatever its
endpoint, is run again whole by the server, in a fresh session, sign-in check first,
while a second run is exactly the first's replacement (nothing of the request committed
yet): its effect is stored once. Aborted every time, or after it committed something,
it is told so: 503 ``transaction_conflict`` with ``Retry-After``, nothing stored by the
aborted transaction, and sent again it passes. The database was fine; the request lost
a race. A page says it in words: the manager's action was not saved, submit it again."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from flask import Flask, flash, g
from flask.testing import FlaskClient
from sqlalchemy import Connection, event, func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from courier_api import database, errors
from courier_api.app import REQUEST_ATTEMPTS
from courier_api.database import Database
from courier_api.extensions import db
from models import AuditEntry, Blob, BlobUpload, Consent, Device, DeviceStatus, Shift, ShiftStatus
from sync import sql
from tests import factories
from tests.browser import station_day
from tests.browser.station_day import StationDay
from tests.conftest import Auth, World
from tests.courier_api.test_web_pages import signed_in

ABORTS = {
    "deadlock_detected": psycopg.errors.DeadlockDetected,
    "serialization_failure": psycopg.errors.SerializationFailure,
}
WRITES = ("INSERT", "UPDATE", "DELETE")


@pytest.fixture
def day(session: Session, app: Flask) -> StationDay:
    return station_day.build(session, app.config["BLOB_DIR"], history_days=0)


@contextmanager
def aborted(
    connection: Connection,
    errcode: str,
    *,
    runs: int | None = None,
    after_a_commit: bool = False,
    into: str | None = None,
) -> Iterator[list[str]]:
    """The first writing statement of each of the request's first ``runs`` runs (every
    run: None) fails as PostgreSQL fails the transaction it picks to break a deadlock
    (or a serialization conflict): psycopg's error with that SQLSTATE, wrapped by
    SQLAlchemy; with ``after_a_commit``, only a write after the request committed
    something; with ``into``, only an insert into that table. Yields the statements so
    aborted."""
    failed: list[str] = []

    def abort(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not statement.lstrip().upper().startswith(WRITES):
            return
        if into is not None and not statement.lstrip().startswith(f"INSERT INTO {into} "):
            return
        if runs is not None and len(failed) >= runs:
            return
        if after_a_commit and not g.get("db_committed", False):
            return
        failed.append(statement)
        raise OperationalError(statement, {}, ABORTS[errcode]("forced"))

    event.listen(connection, "before_cursor_execute", abort)
    try:
        yield failed
    finally:
        event.remove(connection, "before_cursor_execute", abort)


def assert_transaction_conflict(response: Any) -> None:
    assert response.status_code == 503, response.get_data(as_text=True)
    body = response.get_json()
    assert body["code"] == "transaction_conflict", body
    assert "nothing was stored: send the same request again" in body["message"]
    assert "unavailable" not in body["message"]
    assert int(response.headers["Retry-After"]) >= 1


def consent_body() -> dict[str, Any]:
    return {
        "scope": "standing",
        "recipient_phone": "+8613812345678",
        "address": "1 Station Road",
        "method": "any",
        "channel": "app",
        "granted_at": (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).isoformat(),
    }


def count(session: Session, model: Any, *where: Any) -> int:
    return session.scalar(select(func.count()).select_from(model).where(*where)) or 0


@pytest.mark.parametrize("errcode", sorted(ABORTS))
def test_a_consent_postgresql_aborts_once_is_run_again_and_recorded_once(
    client: FlaskClient,
    world: World,
    auth: Auth,
    connection: Connection,
    session: Session,
    errcode: str,
) -> None:
    """A recipient channel's consent lost a race with a push: before, 503
    ``database_unavailable``, "the database is unavailable". The server runs the whole
    request again in a fresh session: 201, one consent, one audit entry."""
    headers = auth.headers("app1")
    with aborted(connection, errcode, runs=1) as failed:
        response = client.post("/api/v1/consents", json=consent_body(), headers=headers)
    assert len(failed) == 1
    assert response.status_code == 201, response.get_json()
    assert count(session, Consent) == 1
    assert count(session, AuditEntry, AuditEntry.action == "consent_granted") == 1


def test_a_consent_aborted_every_time_is_a_conflict_to_send_again(
    client: FlaskClient, world: World, auth: Auth, connection: Connection, session: Session
) -> None:
    headers = auth.headers("app1")
    with aborted(connection, "deadlock_detected") as failed:
        response = client.post("/api/v1/consents", json=consent_body(), headers=headers)
    assert len(failed) == REQUEST_ATTEMPTS
    assert_transaction_conflict(response)
    assert count(session, Consent) == 0
    again = client.post("/api/v1/consents", json=consent_body(), headers=headers)
    assert again.status_code == 201, again.get_json()
    assert count(session, Consent) == 1


def test_a_shift_opening_aborted_every_time_is_a_conflict_to_send_again(
    client: FlaskClient, world: World, auth: Auth, connection: Connection, session: Session
) -> None:
    headers = auth.headers("courier1", "PDA-0001")
    with aborted(connection, "serialization_failure") as failed:
        response = client.post("/api/v1/shifts", json={}, headers=headers)
    assert len(failed) == REQUEST_ATTEMPTS
    assert_transaction_conflict(response)
    assert count(session, Shift) == 0
    assert client.post("/api/v1/shifts", json={}, headers=headers).status_code == 201
    assert count(session, Shift) == 1


def test_a_pda_reported_lost_before_its_aborted_request_runs_again_is_stopped(
    client: FlaskClient,
    world: World,
    auth: Auth,
    connection: Connection,
    session: Session,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each run begins with the view's sign-in check: a PDA reported lost while its
    shift's opening was being aborted opens nothing on the second run."""
    headers = auth.headers("courier1", "PDA-0001")
    discard = Database._discard_session

    def reported_lost_meanwhile() -> None:
        discard()
        connection.execute(
            update(Device).where(Device.id == "PDA-0001").values(status=DeviceStatus.LOST)
        )

    monkeypatch.setattr(Database, "_discard_session", staticmethod(reported_lost_meanwhile))
    with aborted(connection, "deadlock_detected", runs=1) as failed:
        response = client.post("/api/v1/shifts", json={}, headers=headers)
    assert len(failed) == 1
    assert response.status_code == 401, response.get_json()
    assert response.get_json()["code"] == "device_not_active"
    assert count(session, Shift) == 0


def test_a_request_that_committed_before_it_was_aborted_is_not_run_again(
    client: FlaskClient, world: World, connection: Connection, session: Session
) -> None:
    """A sign-in commits its attempt (the rate limits' row) before it checks the
    password: run again, it would count the attempt twice. Aborted after that commit,
    it is answered 503 ``transaction_conflict`` at once."""
    body = {"username": "app1", "password": factories.PASSWORD}
    with aborted(connection, "deadlock_detected", after_a_commit=True) as failed:
        response = client.post("/api/v1/auth/token", json=body)
    assert len(failed) == 1
    assert response.status_code == 503
    assert response.get_json()["code"] == "transaction_conflict"


def test_a_request_after_one_that_committed_under_the_same_app_context_is_run_again(
    app: Flask,
    client: FlaskClient,
    world: World,
    auth: Auth,
    connection: Connection,
    session: Session,
) -> None:
    """Whether the request committed something is the request's own: two requests under
    one app context (a test's, a CLI's) share ``g``, and the first one's commit stopped
    the second from being run again, a 503 ``transaction_conflict`` after one run."""
    headers = auth.headers("app1")
    with app.app_context():
        first = client.post("/api/v1/consents", json=consent_body(), headers=headers)
        assert first.status_code == 201, first.get_json()
        with aborted(connection, "deadlock_detected", runs=1) as failed:
            response = client.post("/api/v1/consents", json=consent_body(), headers=headers)
    assert len(failed) == 1
    assert response.status_code == 201, response.get_json()
    assert count(session, Consent) == 2


def test_a_request_aborted_after_a_savepoint_it_released_is_run_again(
    client: FlaskClient, world: World, auth: Auth, connection: Connection, session: Session
) -> None:
    """Releasing a savepoint commits nothing: the whole transaction is still PostgreSQL's
    to abort. A new image's upload releases one for its row, then inserts its uploader;
    aborted there, it answered 503 ``transaction_conflict`` as if something of it had
    committed (so did any request writing in a savepoint first: a push, a flag raised).
    Run again: 201, the image and its uploader stored once."""
    from tests.courier_api.test_blobs_api import digest, image_bytes, put

    data = image_bytes()
    headers = auth.headers("courier1", "PDA-0001")
    with aborted(connection, "deadlock_detected", runs=1, into="blob_upload") as failed:
        response = put(client, headers, data)
    assert len(failed) == 1
    assert response.status_code == 201, response.get_json()
    assert count(session, Blob, Blob.sha256 == digest(data)) == 1
    assert count(session, BlobUpload, BlobUpload.sha256 == digest(data)) == 1


def test_a_busy_database_is_still_unavailable_not_a_conflict(
    client: FlaskClient, world: World, auth: Auth, connection: Connection
) -> None:
    """Only PostgreSQL's two SQLSTATEs are conflicts: any other operational error (a
    connection lost, SQLite's busy timeout) stays ``database_unavailable``."""
    headers = auth.headers("app1")

    def unavailable(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith(WRITES):
            raise OperationalError(statement, {}, psycopg.OperationalError("server closed"))

    event.listen(connection, "before_cursor_execute", unavailable)
    try:
        response = client.post("/api/v1/consents", json=consent_body(), headers=headers)
    finally:
        event.remove(connection, "before_cursor_execute", unavailable)
    assert response.status_code == 503
    assert response.get_json()["code"] == "database_unavailable"


def test_a_managers_close_on_the_page_aborted_once_is_closed_once(
    app: Flask, session: Session, day: StationDay, connection: Connection
) -> None:
    """At 19:00 a manager closes a shift on its page while a push locks the same rows:
    run again, the shift is closed once, with one audit entry and one "closed" told."""
    pages = signed_in(app, "manager")
    path = f"/web/shifts/{day.open.id}/close"
    with aborted(connection, "deadlock_detected", runs=1) as failed:
        closed = pages.post(path, last_seq="6")
    assert len(failed) == 1
    assert closed.status_code == 302, closed.get_data(as_text=True)
    session.refresh(day.open)
    assert day.open.status != ShiftStatus.OPEN
    assert count(session, AuditEntry, AuditEntry.action == "shift_closed_for_courier") == 1
    page = pages.get(f"/web/shifts/{day.open.id}")
    assert page.count(f"Shift {day.open.id} is closed.") == 1


def test_a_managers_close_on_the_page_aborted_every_time_says_it_was_not_saved(
    app: Flask, session: Session, day: StationDay, connection: Connection
) -> None:
    """The page said nothing a manager could read (the API's JSON body, "the database
    is unavailable"). It now says, as a page, that the close was not saved and to
    submit it again; submitted again, the shift closes."""
    pages = signed_in(app, "manager")
    path = f"/web/shifts/{day.open.id}/close"
    with aborted(connection, "serialization_failure") as failed:
        refused = pages.post(path, last_seq="6")
    assert len(failed) == REQUEST_ATTEMPTS
    assert refused.status_code == 503
    assert refused.mimetype == "text/html"
    assert int(refused.headers["Retry-After"]) >= 1
    page = refused.get_data(as_text=True)
    assert "Not saved" in page and "submit the form again" in page
    assert "unavailable" not in page
    session.refresh(day.open)
    assert day.open.status == ShiftStatus.OPEN
    assert pages.post(path, last_seq="6").status_code == 302
    session.refresh(day.open)
    assert day.open.status != ShiftStatus.OPEN


def test_an_auditors_proof_page_aborted_every_time_says_to_load_it_again(
    app: Flask, session: Session, day: StationDay, connection: Connection
) -> None:
    """A page that only reads, its auditor's read recorded apart once it is rendered:
    aborted, it is run again as any request (ending its reading transaction stored
    nothing; it answered the 503 after one run). Aborted every time, a page with
    ``Retry-After`` saying to load it again (a GET: no form was lost), nothing on record."""
    pages = signed_in(app, "auditor")
    path = f"/web/proofs/{day.authorized_drop_event_id}"
    pages.get(path)
    read = AuditEntry.action == "proof_read"
    before = count(session, AuditEntry, read)
    with aborted(connection, "deadlock_detected") as failed:
        refused = pages.client.get(path)
    assert len(failed) == REQUEST_ATTEMPTS
    assert (refused.status_code, refused.mimetype) == (503, "text/html")
    assert int(refused.headers["Retry-After"]) >= 1
    page = refused.get_data(as_text=True)
    assert "load the page again" in page
    assert "Not saved" not in page and "unavailable" not in page
    assert count(session, AuditEntry, read) == before


def test_a_page_the_database_is_unavailable_for_is_a_page(
    app: Flask,
    day: StationDay,
    connection: Connection,
) -> None:
    pages = signed_in(app, "manager")

    def unavailable(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith(WRITES):
            raise OperationalError(statement, {}, psycopg.OperationalError("server closed"))

    event.listen(connection, "before_cursor_execute", unavailable)
    try:
        refused = pages.post(f"/web/shifts/{day.open.id}/close", last_seq="6")
    finally:
        event.remove(connection, "before_cursor_execute", unavailable)
    assert (refused.status_code, refused.mimetype) == (503, "text/html")
    assert "database is unavailable; nothing was saved" in refused.get_data(as_text=True)


def test_the_web_edge_tells_a_conflict_by_the_rule_sync_keeps() -> None:
    """One rule for rejudge's retries, the push's and the error answers."""
    assert database.aborted_for_a_conflict is sql.aborted_for_a_conflict
    assert errors.aborted_for_a_conflict is sql.aborted_for_a_conflict


def test_a_run_that_changed_the_pages_cookie_session_is_not_run_again(app: Flask) -> None:
    """A run that flashed a message (or signed someone in) before it was aborted would
    flash it twice: run again only while the cookie session is as the request found it."""
    runs: list[str] = []

    def view(flashes: bool) -> Any:
        runs.append("run")
        if flashes:
            flash("Shift 1 is closed.", "ok")
        raise OperationalError("UPDATE shift", {}, ABORTS["deadlock_detected"]("forced"))

    for flashes, expected in ((False, REQUEST_ATTEMPTS), (True, 1)):
        runs.clear()
        with app.test_request_context("/web/shifts/1/close", method="POST"):
            with pytest.raises(OperationalError):
                db.dispatched_retrying_conflicts(
                    lambda flashes=flashes: view(flashes), attempts=REQUEST_ATTEMPTS
                )
        assert len(runs) == expected


@pytest.mark.parametrize("stop", [ValueError, SystemExit, KeyboardInterrupt])
def test_what_the_runs_kept_is_put_on_record_however_the_request_ends(
    app: Flask, stop: type[BaseException]
) -> None:
    """An upload that put a proof image's altered bytes back keeps that to put on record
    if no run stores it; the record is written whatever ends the request: an error, or a
    ``SystemExit`` or ``KeyboardInterrupt`` raised in its thread (Ctrl-C on a one-thread
    server), which let the altered file go unrecorded."""
    recorded: list[dict[Any, Any]] = []

    def view() -> Any:
        kept = db.kept_across_runs(
            "bytes_found", if_nothing_stored=lambda session, kept: recorded.append(dict(kept))
        )
        kept["a" * 64] = "put back"
        raise stop()

    with app.test_request_context("/api/v1/blobs/" + "a" * 64, method="PUT"):
        with pytest.raises(stop):
            db.dispatched_retrying_conflicts(view, attempts=REQUEST_ATTEMPTS)
    assert recorded == [{"a" * 64: "put back"}]
