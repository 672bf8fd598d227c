"""Engine settings the service relies on, per backend."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg.waiting
import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InternalError, OperationalError

from models import engine as engine_module
from models.engine import (
    BUSY_TIMEOUT_MS,
    POSTGRESQL_CONNECT_DEFAULTS,
    BoundedConnection,
    make_engine,
    reads_only,
    set_statement_timeout,
)
from models.turnstile import TurnstileConnection


def test_postgresql_sessions_run_in_utc_whatever_else_is_asked(engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("a PostgreSQL session setting")
    url = engine.url.update_query_dict(
        {"options": "-c search_path=pg_catalog,public -c TimeZone=Asia/Shanghai"}
    )
    own = make_engine(
        url.render_as_string(hide_password=False), connect_args={"application_name": "courier-x"}
    )
    try:
        with own.connect() as connection:
            zone, name, path, moment = connection.execute(
                text(
                    "SELECT current_setting('TimeZone'), current_setting('application_name'), "
                    "current_setting('search_path'), "
                    "CAST('2026-11-30 18:00:00+08:00' AS timestamptz)"
                )
            ).one()
    finally:
        own.dispose()
    # What else the URL and connect_args ask for is kept.
    assert (zone, name, path) == ("UTC", "courier-x", "pg_catalog,public")
    # psycopg hands the value over in the zone it knows without a look-up: UTC itself.
    assert moment.tzinfo is dt.UTC
    assert moment == dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)


def test_a_sqlite_reader_neither_waits_for_the_writers_turn_nor_writes(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'turn.db'}", pool_size=1, max_overflow=1)
    reader = reads_only(engine)
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE note (body TEXT)"))
            connection.execute(text("INSERT INTO note VALUES ('committed')"))
        with engine.begin() as writer:  # holds the writers' turn and SQLite's write lock
            writer.execute(text("UPDATE note SET body = 'not yet'"))
            started = time.monotonic()
            with reader.connect() as connection:
                seen = connection.execute(text("SELECT body FROM note")).scalar_one()
                with pytest.raises(OperationalError, match="readonly"):
                    connection.execute(text("INSERT INTO note VALUES ('sneaked in')"))
            waited = time.monotonic() - started
        assert seen == "committed"  # the last commit, not the writer's change in progress
        assert waited < BUSY_TIMEOUT_MS / 1000 / 2  # not a wait for the turn that timed out
        # The pooled connection the reader used writes again for a writer.
        for _ in range(2):
            with engine.begin() as connection:
                connection.execute(text("INSERT INTO note VALUES ('later')"))
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM note")).scalar_one() == 3
    finally:
        engine.dispose()


def test_a_postgresql_reader_refuses_to_write_and_its_connection_writes_again(
    engine: Engine,
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's read-only transactions")
    own = make_engine(engine.url.render_as_string(hide_password=False), pool_size=1)
    try:
        with reads_only(own).connect() as connection:
            with pytest.raises(InternalError, match="read-only transaction"):
                connection.execute(text("CREATE TEMPORARY SEQUENCE reader_write"))
        with own.connect() as connection:  # the same pooled connection, reset
            connection.execute(text("CREATE TEMPORARY SEQUENCE writer_write"))
    finally:
        own.dispose()


def test_a_sqlite_files_connections_dispatch_no_events_the_service_does_not_hear(
    tmp_path: Path,
) -> None:
    """The writers' turn and ``BEGIN`` are taken in the dialect's ``do_begin``, not in a
    ``begin`` listener: a SQLite file's engine and its readers' have no connection
    listeners, so SQLAlchemy skips dispatching every connection event (and
    ``sync.direct`` asks no listener collection of each statement). A listener added
    (a test's, a benchmark's) is heard again, with the writer's ``BEGIN IMMEDIATE`` under
    its turn as before."""
    engine = make_engine(f"sqlite:///{tmp_path / 'quiet.db'}")
    reader = reads_only(engine)
    try:
        assert not engine._has_events and not reader._has_events
        with engine.begin() as connection:
            assert connection.connection.dbapi_connection.holds_turn
            connection.execute(text("CREATE TABLE note (body TEXT)"))
        heard: list[str] = []
        event.listen(engine, "commit", lambda _connection: heard.append("commit"))
        with engine.begin() as connection:
            assert connection.connection.dbapi_connection.holds_turn
            connection.execute(text("INSERT INTO note VALUES ('one')"))
        assert heard == ["commit"]
        with reader.connect() as connection:
            assert connection.execute(text("SELECT body FROM note")).scalars().all() == ["one"]
    finally:
        engine.dispose()


def test_a_listener_on_every_engine_hears_a_sqlite_files_statements(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listener on the ``Engine`` class (an error tracker's SQLAlchemy integration,
    SQLAlchemy's own timing recipe, an operator's hook) sets the class's
    ``_has_events``: a SQLite file's engine must not hide it behind a flag of its own,
    whether the listener came before the engine or after."""
    monkeypatch.setattr(Engine, "_has_events", Engine._has_events)  # set back after
    heard: list[str] = []

    def hear(_connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        heard.append(statement)

    event.listen(Engine, "before_cursor_execute", hear)
    before = make_engine(f"sqlite:///{tmp_path / 'before.db'}")
    try:
        with before.begin() as connection:
            connection.execute(text("SELECT 'before'"))
        event.remove(Engine, "before_cursor_execute", hear)
        after = make_engine(f"sqlite:///{tmp_path / 'after.db'}")
        event.listen(Engine, "before_cursor_execute", hear)
        try:
            with after.begin() as connection:
                connection.execute(text("SELECT 'after'"))
        finally:
            after.dispose()
    finally:
        event.remove(Engine, "before_cursor_execute", hear)
        before.dispose()
    assert heard == ["SELECT 'before'", "SELECT 'after'"]


def test_a_sqlite_files_readers_keep_connections_of_their_own(tmp_path: Path) -> None:
    """Setting ``query_only`` makes SQLite throw away every statement it prepared on the
    connection: a writer's connection never has it set, however readers and writers
    take turns, and a reader's is set once."""
    engine = make_engine(f"sqlite:///{tmp_path / 'apart.db'}", pool_size=1, max_overflow=0)
    reader = reads_only(engine)
    pragmas: list[tuple[str, str]] = []
    for name, which in (("writer", engine), ("reader", reader)):
        # What SQLite runs (its trace): the BEGIN and its pragma are not SQLAlchemy's.
        event.listen(
            which,
            "connect",
            lambda dbapi_connection, _record, name=name: dbapi_connection.set_trace_callback(
                lambda sql: pragmas.append((name, sql)) if "query_only" in sql else None
            ),
        )
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE note (body TEXT)"))
        for round_no in range(3):
            with reader.connect() as connection:
                connection.execute(text("SELECT count(*) FROM note")).scalar_one()
            with engine.begin() as connection:
                connection.execute(text("INSERT INTO note VALUES (:n)"), {"n": str(round_no)})
        assert reads_only(engine) is reader  # made once
        assert pragmas == [("reader", "PRAGMA query_only = 1")]
        with reader.connect() as connection:  # the reader's one connection, in its pool
            pass
        readers_pool = reader.pool
        assert readers_pool is not engine.pool and readers_pool.checkedin() == 1
    finally:
        engine.dispose()
    assert readers_pool.checkedin() == 0  # disposed of with the engine


def test_a_sqlite_file_commits_durably_before_a_push_is_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push's receipt goes out once its transaction commits, and the PDA then deletes
    its copies up to ``acked_through_seq``. In WAL mode with ``synchronous = NORMAL``
    a commit is synced only at the next checkpoint: after a power cut or an OS crash
    (a station's laptop), SQLite rolls back transactions it reported committed, and
    the events they held exist nowhere any more. The writers' connections keep
    ``NORMAL`` and sync the WAL file themselves before ``commit()`` returns
    (``models.turnstile``); connections without a turnstile sync with ``FULL``."""
    database = tmp_path / "durable.db"
    wal = database.with_name(database.name + "-wal")
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    engine = make_engine(f"sqlite:///{database}")
    deferred = make_engine(f"sqlite:///{database}", sqlite_begin="DEFERRED")
    try:
        with engine.begin() as connection:
            mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar_one()
            synchronous = connection.exec_driver_sql("PRAGMA synchronous").scalar_one()
            connection.exec_driver_sql("CREATE TABLE receipt (seq INTEGER)")
            assert synced == []  # not yet: the commit syncs
        assert synced == [wal.stat().st_ino]
        with engine.begin() as connection:
            connection.exec_driver_sql("INSERT INTO receipt VALUES (1)")
        assert synced == [wal.stat().st_ino] * 2
        engine.dispose()  # the last connection closed: SQLite removes the WAL file
        assert not wal.exists()
        with engine.begin() as connection:  # a new WAL file: synced, not the old one
            connection.exec_driver_sql("INSERT INTO receipt VALUES (2)")
        assert synced[2:] == [wal.stat().st_ino]
        with reads_only(engine).connect() as connection:
            reader_synchronous = connection.exec_driver_sql("PRAGMA synchronous").scalar_one()
        with deferred.connect() as connection:
            deferred_synchronous = connection.exec_driver_sql("PRAGMA synchronous").scalar_one()
    finally:
        engine.dispose()
        deferred.dispose()
    assert mode == "wal"
    assert synchronous == 1  # NORMAL, and the turnstile syncs
    assert reader_synchronous == deferred_synchronous == 2  # FULL


def test_a_sqlite_file_left_out_of_wal_mode_still_commits_each_write_synced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Where SQLite has no shared memory for the WAL index (a file system layer without
    it, or a file opened with ``nolock=1``) it leaves the file in its rollback journal,
    and says so only by the mode ``PRAGMA journal_mode = WAL`` returns. The writers
    must not then sync a WAL file that does not exist: every commit would be refused
    after it was made, so no push would ever get its receipt. SQLite syncs each commit
    itself instead, with ``EXTRA`` (``FULL`` leaves the deleted journal's directory
    unsynced: a power cut could bring the journal back and roll the commit back), and
    the service says once why it is slower. SQLite's ``unix-dotfile`` layer has no
    shared memory."""
    database = tmp_path / "no-wal.db"

    def without_shared_memory() -> sqlite3.Connection:
        return sqlite3.connect(
            f"file:{database}?vfs=unix-dotfile",
            uri=True,
            factory=TurnstileConnection,
            check_same_thread=False,
        )

    engine = make_engine(f"sqlite:///{database}", creator=without_shared_memory)
    try:
        with caplog.at_level(logging.WARNING, logger="models.engine"):
            with engine.begin() as connection:
                mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar_one()
                synchronous = connection.exec_driver_sql("PRAGMA synchronous").scalar_one()
                connection.exec_driver_sql("CREATE TABLE receipt (seq INTEGER)")
            for seq in (1, 2):
                with engine.begin() as connection:
                    connection.exec_driver_sql(f"INSERT INTO receipt VALUES ({seq})")
            with reads_only(engine).connect() as connection:
                held = connection.exec_driver_sql("SELECT seq FROM receipt").scalars().all()
            engine.dispose()  # a new connection: the warning was given already
            with engine.begin() as connection:
                connection.exec_driver_sql("INSERT INTO receipt VALUES (3)")
    finally:
        engine.dispose()
    assert mode == "delete"
    assert synchronous == 3  # EXTRA: SQLite syncs, the journal's directory too
    assert held == [1, 2]
    assert not database.with_name(database.name + "-wal").exists()
    warnings = [r for r in caplog.records if "rollback journal" in r.getMessage()]
    assert len(warnings) == 1 and str(database) in warnings[0].getMessage()


def test_postgresql_connections_give_up_on_a_vanished_server_unless_the_url_says(
    engine: Engine,
) -> None:
    """libpq waits for ever on a server that vanished without closing its connections
    (its host down, packets dropped): each connection gets a connect timeout,
    keepalives and ``tcp_user_timeout`` (``POSTGRESQL_CONNECT_DEFAULTS``), and what the
    URL or ``connect_args`` say instead is kept."""
    if engine.dialect.name != "postgresql":
        pytest.skip("libpq's connection settings")
    url = engine.url.update_query_dict({"keepalives_idle": "5"})
    own = make_engine(
        url.render_as_string(hide_password=False), connect_args={"keepalives_count": 9}
    )
    try:
        with own.connect() as connection:
            parameters = connection.connection.dbapi_connection.info.get_parameters()
    finally:
        own.dispose()
    assert {key: parameters.get(key) for key in POSTGRESQL_CONNECT_DEFAULTS} == {
        "connect_timeout": "10",
        "keepalives": "1",
        "keepalives_idle": "5",
        "keepalives_interval": "10",
        "keepalives_count": "9",
        "tcp_user_timeout": "30000",
    }


class _StalledPgconn:
    """What ``psycopg.Connection.wait`` asks of its connection: a socket (one end of a
    pair nothing is ever written to, a server that answers nothing) and its state."""

    transaction_status = psycopg.pq.TransactionStatus.IDLE

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock.fileno()
        self.finished = False
        self.broken = False  # as libpq marks a connection it lost (reset, closed)

    @property
    def status(self) -> psycopg.pq.ConnStatus:
        bad = self.finished or self.broken
        return psycopg.pq.ConnStatus.BAD if bad else psycopg.pq.ConnStatus.OK

    def finish(self) -> None:
        self.finished = True


def _connection_to(sock: socket.socket) -> BoundedConnection:
    """A ``BoundedConnection`` whose libpq connection is a ``_StalledPgconn``."""
    connection = BoundedConnection.__new__(BoundedConnection)
    connection._pool = None  # type: ignore[attr-defined]  # no warning when collected
    connection.pgconn = _StalledPgconn(sock)  # type: ignore[assignment]
    return connection


def _an_answer_never_coming() -> Iterator[psycopg.waiting.Wait]:
    while True:
        yield psycopg.waiting.Wait.R


def _wait_on_a_stalled_server(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, float]:
    """``BoundedConnection.wait`` on a server that answers nothing, bounded at 0.1 s:
    the connection stand-in, and how long the wait took."""
    monkeypatch.setattr(engine_module, "REPLY_MARGIN_SECONDS", 0.05)
    ours, theirs = socket.socketpair()
    connection = _connection_to(ours)
    set_statement_timeout(0.05)
    start = time.monotonic()
    try:
        with pytest.raises(psycopg.OperationalError, match="no answer from the database in"):
            connection.wait(_an_answer_never_coming())  # type: ignore[arg-type]
    finally:
        set_statement_timeout(None)
        ours.close()
        theirs.close()
    return connection, time.monotonic() - start


def test_a_bounded_wait_on_a_server_answering_nothing_closes_its_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """psycopg's own wait, as installed, given up at the bound: the connection closed
    and the error a lost connection's (a 503), without a PostgreSQL server."""
    connection, took = _wait_on_a_stalled_server(monkeypatch)
    assert connection.pgconn.finished  # type: ignore[attr-defined]
    assert 0.1 <= took < 10  # bounded, with room for a loaded machine


def test_a_bounded_wait_needs_no_private_name_of_psycopg(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """psycopg's wait raises ``psycopg.errors._WaitTimeout`` at its timeout, a private
    class that any release may rename or make public: renamed, an ``except`` naming it
    raised ``AttributeError`` when a server stopped answering (a 500, the half-read
    connection left in the pool) instead of closing the connection (a 503)."""

    class WaitTimeout(psycopg.OperationalError):
        """The class under another name."""

    def renamed(self: Any, gen: Any, *args: Any, timeout: float, **kwargs: Any) -> Any:
        time.sleep(timeout)  # what psycopg's wait does then, under the new name
        raise WaitTimeout("wait timeout expired")

    monkeypatch.setattr(psycopg.Connection, "wait", renamed)
    monkeypatch.delattr(psycopg.errors, "_WaitTimeout")
    monkeypatch.setattr(psycopg.errors, "WaitTimeout", WaitTimeout, raising=False)
    connection, _took = _wait_on_a_stalled_server(monkeypatch)
    assert connection.pgconn.finished  # type: ignore[attr-defined]


def test_a_server_error_within_the_bound_is_passed_on_as_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL's own cancellation (57014), or any error with a SQLSTATE, is the
    server's answer: the connection stays usable and the error is not renamed."""

    def cancelled(self: Any, gen: Any, *args: Any, **kwargs: Any) -> Any:
        raise psycopg.errors.QueryCanceled("canceling statement due to statement timeout")

    monkeypatch.setattr(psycopg.Connection, "wait", cancelled)
    ours, theirs = socket.socketpair()
    connection = _connection_to(ours)
    set_statement_timeout(0.05)
    try:
        with pytest.raises(psycopg.errors.QueryCanceled):
            connection.wait(_an_answer_never_coming())  # type: ignore[arg-type]
    finally:
        set_statement_timeout(None)
        ours.close()
        theirs.close()
    assert not connection.pgconn.finished  # type: ignore[attr-defined]


LOST = "consuming input failed: server closed the connection unexpectedly"


def test_a_connection_lost_whose_error_comes_past_the_bound_keeps_its_cause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that closed the connection is no silence: when its error reaches the
    waiting thread only past the bound (held up on a loaded machine), the error is
    still the lost connection's own, not "no answer from the database in 0.1 s", which
    sent operators after a hung server (and the true cause was dropped)."""
    monkeypatch.setattr(engine_module, "REPLY_MARGIN_SECONDS", 0.05)
    ours, theirs = socket.socketpair()
    connection = _connection_to(ours)
    theirs.close()  # the server's end goes: ours reads its end at once

    def lost_late() -> Iterator[psycopg.waiting.Wait]:
        yield psycopg.waiting.Wait.R
        time.sleep(0.15)  # the thread held up past the bound before it reads
        connection.pgconn.broken = True  # type: ignore[attr-defined]  # as libpq does
        raise psycopg.OperationalError(LOST)

    set_statement_timeout(0.05)
    try:
        with pytest.raises(psycopg.OperationalError) as raised:
            connection.wait(lost_late())  # type: ignore[arg-type]
    finally:
        set_statement_timeout(None)
        ours.close()
    assert str(raised.value) == LOST


@pytest.mark.postgres_only
def test_a_postgresql_connection_reset_past_the_bound_is_told_as_lost(
    monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    """The same with libpq and a real connection, reset by a proxy (``TcpProxy``) while
    the waiting thread is held up past the bound: libpq's own error is raised, the
    connection is closed (a lost connection's 503), not renamed a silence."""
    from tests.live_server import TcpProxy

    monkeypatch.setattr(engine_module, "REPLY_MARGIN_SECONDS", 0.2)
    direct = make_url(database_url)
    installed = psycopg.waiting.wait
    held_up = []

    with TcpProxy((direct.host or "127.0.0.1", direct.port or 5432)) as proxy:

        def reset_while_held_up(gen: Any, fileno: int, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("timeout") is not None and not held_up:
                held_up.append(proxy.cut())  # the connection reset...
                time.sleep(kwargs["timeout"] + 0.05)  # ...the thread held up past the bound
            return installed(gen, fileno, *args, **kwargs)

        libpq_url = direct.set(drivername="postgresql", host="127.0.0.1", port=proxy.port)
        connection = BoundedConnection.connect(
            libpq_url.render_as_string(hide_password=False), autocommit=True
        )
        try:
            monkeypatch.setattr(psycopg.waiting, "wait", reset_while_held_up)
            set_statement_timeout(0.2)
            with pytest.raises(psycopg.OperationalError) as raised:
                connection.execute("SELECT 1")
        finally:
            set_statement_timeout(None)
            connection.close()
    assert held_up == [1]
    assert "no answer from the database" not in str(raised.value), raised.value
    assert raised.value.sqlstate is None and connection.broken
