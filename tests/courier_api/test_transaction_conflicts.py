"""A request PostgreSQL aborts for a deadlock or a serialization failure, whatever its
endpoint, is told so: 503 ``transaction_conflict`` with ``Retry-After``, nothing stored,
and sent again it passes. The database was fine; the request lost a race. A page says
it in words: the manager's action was not saved, submit it again."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Connection, event, func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from courier_api import database, errors
from models import Consent, Shift, ShiftStatus
from sync import sql
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
def aborted_on_first_write(connection: Connection, errcode: str) -> Iterator[list[str]]:
    """The request's first writing statement fails as PostgreSQL fails the transaction
    it picks to break a deadlock (or a serialization conflict): psycopg's error with
    that SQLSTATE, wrapped by SQLAlchemy. Yields the statements so aborted."""
    aborted: list[str] = []

    def abort(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not aborted and statement.lstrip().upper().startswith(WRITES):
            aborted.append(statement)
            raise OperationalError(statement, {}, ABORTS[errcode]("forced"))

    event.listen(connection, "before_cursor_execute", abort)
    try:
        yield aborted
    finally:
        event.remove(connection, "before_cursor_execute", abort)


def assert_transaction_conflict(response: Any) -> None:
    assert response.status_code == 503, response.get_data(as_text=True)
    body = response.get_json()
    assert body["code"] == "transaction_conflict", body
    assert "nothing was stored: send the same request again" in body["message"]
    assert "unavailable" not in body["message"]
    assert int(response.headers["Retry-After"]) >= 1


def consent_body(world: World) -> dict[str, Any]:
    return {
        "scope": "standing",
        "recipient_phone": "+8613812345678",
        "address": "1 Station Road",
        "method": "any",
        "channel": "app",
        "granted_at": (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).isoformat(),
    }


@pytest.mark.parametrize("errcode", sorted(ABORTS))
def test_a_consent_postgresql_aborts_is_a_conflict_to_send_again(
    client: FlaskClient,
    world: World,
    auth: Auth,
    connection: Connection,
    session: Session,
    errcode: str,
) -> None:
    """A recipient channel's consent: before, 503 ``database_unavailable``, "the database
    is unavailable", which sent its operators looking for an outage."""
    headers = auth.headers("app1")
    with aborted_on_first_write(connection, errcode) as aborted:
        response = client.post("/api/v1/consents", json=consent_body(world), headers=headers)
    assert aborted
    assert_transaction_conflict(response)
    assert session.scalar(select(func.count()).select_from(Consent)) == 0
    again = client.post("/api/v1/consents", json=consent_body(world), headers=headers)
    assert again.status_code == 201, again.get_json()
    assert session.scalar(select(func.count()).select_from(Consent)) == 1


def test_a_shift_opening_postgresql_aborts_is_a_conflict_to_send_again(
    client: FlaskClient, world: World, auth: Auth, connection: Connection, session: Session
) -> None:
    headers = auth.headers("courier1", "PDA-0001")
    with aborted_on_first_write(connection, "deadlock_detected") as aborted:
        response = client.post("/api/v1/shifts", json={}, headers=headers)
    assert aborted
    assert_transaction_conflict(response)
    assert session.scalar(select(func.count()).select_from(Shift)) == 0
    assert client.post("/api/v1/shifts", json={}, headers=headers).status_code == 201


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
        response = client.post("/api/v1/consents", json=consent_body(world), headers=headers)
    finally:
        event.remove(connection, "before_cursor_execute", unavailable)
    assert response.status_code == 503
    assert response.get_json()["code"] == "database_unavailable"


def test_a_managers_close_on_the_page_postgresql_aborts_says_it_was_not_saved(
    app: Flask,
    session: Session,
    day: StationDay,
    connection: Connection,
) -> None:
    """At 19:00 a manager closes a shift on its page while a push locks the same rows:
    the page said nothing a manager could read (the API's JSON body, "the database is
    unavailable"). It now says, as a page, that the close was not saved and to submit
    it again; submitted again, the shift closes."""
    pages = signed_in(app, "manager")
    path = f"/web/shifts/{day.open.id}/close"
    with aborted_on_first_write(connection, "serialization_failure") as aborted:
        refused = pages.post(path, last_seq="6")
    assert aborted
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
