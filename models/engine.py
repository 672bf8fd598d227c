"""Engine construction with the per-backend settings the service relies on."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

from models.turnstile import Turnstile, connect_args, wal_identity

BUSY_TIMEOUT_MS = 10_000  # how long a SQLite writer waits for its turn (then a 503)
# Execution option of transactions that only read (``reads_only``).
READS_ONLY = "courier_reads_only"

log = logging.getLogger(__name__)

# libpq's settings against a PostgreSQL that vanishes without closing its connections
# (its host down, packets dropped): a connection attempt gives up after 10 s (libpq
# has no bound, psycopg 130 s), an idle connection is probed after 30 s and given up
# after 3 unanswered probes, and data sent and not acknowledged for 30 s ends the
# connection. The URL's own values (``?keepalives_idle=...``) win.
POSTGRESQL_CONNECT_DEFAULTS: dict[str, int] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # milliseconds
}
# How much longer than its statement timeout a bounded statement waits for PostgreSQL's
# answer (its own cancellation, normally) before giving the connection up: a server
# that is hung, or a network that holds the packets, answers nothing at all.
REPLY_MARGIN_SECONDS = 5.0
# The statement timeout of the statements run in this context, in seconds
# (``set_statement_timeout``); None: none of ours.
_STATEMENT_TIMEOUT: ContextVar[float | None] = ContextVar(
    "courier_statement_timeout", default=None
)


def make_engine(url: str, *, sqlite_begin: str = "IMMEDIATE", **kwargs: Any) -> Engine:
    """Create the engine for ``url``.

    SQLite gets foreign keys, WAL, a busy timeout, and SQLAlchemy's recipe for
    real ``BEGIN``/``SAVEPOINT`` handling (the sqlite3 module's own transaction
    guessing breaks savepoints). Transactions begin ``IMMEDIATE``: a deferred
    transaction that reads and then writes fails at once with "database is
    locked" when another process wrote in between (busy timeouts do not help
    there), whereas an immediate one waits its turn, in the order of a
    ``Turnstile`` (file databases). SQLite is the one-machine store; PostgreSQL
    is the concurrent one.
    """
    parsed = make_url(url)
    # SQL parameters hold passwords' hashes, webhook secrets and recipients' phones:
    # never in logs (echo) nor in the text of database errors.
    kwargs.setdefault("hide_parameters", True)
    if parsed.get_backend_name() == "sqlite":
        if sqlite_begin not in ("DEFERRED", "IMMEDIATE"):
            raise ValueError(f"sqlite_begin must be DEFERRED or IMMEDIATE, not {sqlite_begin!r}")
        in_memory = parsed.database in (None, "", ":memory:")
        turnstile = None
        if sqlite_begin == "IMMEDIATE" and not in_memory:
            turnstile = Turnstile(Path(parsed.database).resolve(), BUSY_TIMEOUT_MS / 1000)
        reader_kwargs = dict(kwargs)
        if turnstile is not None:
            kwargs["connect_args"] = connect_args(kwargs.get("connect_args"))
        engine = create_engine(url, **kwargs)
        _configure_sqlite(engine, in_memory=in_memory, begin=sqlite_begin, turnstile=turnstile)
        if turnstile is not None:
            _TURNSTILES[engine] = turnstile
        if not in_memory:
            _SQLITE_FILES[engine] = (url, reader_kwargs)
            event.listen(engine, "engine_disposed", _dispose_reader)
            # SQLAlchemy tells ``engine_disposed`` whether or not the engine has events;
            # the flag, set by that listener, would make every connection of the file
            # dispatch its other events (``begin``, ``commit``, each statement's), which
            # no listener of the service hears: ``_configure_sqlite``. Taken off the
            # engine, not set false there: the class's flag shows again, set by a
            # listener on every ``Engine`` (an error tracker's, an operator's hook).
            del engine._has_events
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    postgresql = parsed.get_backend_name() == "postgresql"
    if postgresql:
        given = kwargs.get("connect_args") or {}
        defaults = {
            key: value
            for key, value in POSTGRESQL_CONNECT_DEFAULTS.items()
            if key not in parsed.query and key not in given
        }
        kwargs["connect_args"] = {**defaults, **given}
    engine = create_engine(url, **kwargs)
    if postgresql:
        event.listen(engine, "do_connect", _bounded_connection)
        event.listen(engine, "connect", _utc_session)
        event.listen(engine, "checkout", _statement_timeout_on_checkout)
    return engine


def set_statement_timeout(seconds: float | None) -> None:
    """Statements run on PostgreSQL from now on in this context (a web request's, set
    and cleared by its hooks: ``courier_api.database``) get ``statement_timeout`` =
    ``seconds``, or the session's own when smaller (an operator's, the URL's say:
    ``_own_statement_timeout``): PostgreSQL cancels one that runs or waits for a lock
    longer (57014, a 503 with nothing stored). Their answers are awaited
    ``REPLY_MARGIN_SECONDS`` longer at most: past that, a server that answers nothing
    (hung, or packets held on the way) costs the connection, closed, and the statement
    fails as a lost connection does. None, and in any other context (migrations, CLI
    commands, the scheduler): no bound of ours, the session's own alone."""
    _STATEMENT_TIMEOUT.set(seconds)


class BoundedConnection(psycopg.Connection):  # type: ignore[type-arg]
    """A psycopg connection whose waits for the server's answers are bounded in a
    ``set_statement_timeout`` context; ``statement_timeout`` is the one the session has
    now (set by ``_statement_timeout_on_checkout``; None: the session's own)."""

    statement_timeout: float | None = None
    # The session's own (``_own_statement_timeout``), once read.
    own_statement_timeout: float | None

    def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        seconds = _STATEMENT_TIMEOUT.get()
        if seconds is None or args or "timeout" in kwargs:
            return super().wait(gen, *args, **kwargs)
        if self.statement_timeout is not None:  # the session's own, smaller
            seconds = min(seconds, self.statement_timeout)
        bound = seconds + REPLY_MARGIN_SECONDS
        deadline = time.monotonic() + bound
        try:
            return super().wait(gen, *args, timeout=bound, **kwargs)
        except psycopg.OperationalError as error:
            if not _no_answer_in_time(error, deadline, self.pgconn.status):
                raise
            # Half a conversation: the connection cannot be used again. Closed, the
            # pool throws it away (``connection.closed``) and the error is the lost
            # connection's (503 ``database_unavailable``).
            self.pgconn.finish()
            raise psycopg.OperationalError(
                f"no answer from the database in {bound:g} s: connection closed"
            ) from error


def _no_answer_in_time(
    error: psycopg.OperationalError, deadline: float, status: psycopg.pq.ConnStatus
) -> bool:
    """Whether psycopg's wait gave up at its timeout: an error of the client's (no
    SQLSTATE: not the server's, such as its own cancellation, 57014) once the deadline
    has passed, on a connection libpq still holds as good (``status``). Told by these
    public marks, not by the class psycopg raises (``psycopg.errors._WaitTimeout``,
    private: renamed or gone in any release, an ``except`` naming it would itself
    fail, an ``AttributeError`` where a 503 was due). A connection that broke (reset,
    closed by the server: libpq then marks it bad) is no silence, even when its error
    comes past the deadline (a thread held up on a loaded machine): its own error is
    passed on, naming the true cause, a lost connection's all the same (a 503)."""
    return (
        error.sqlstate is None
        and status == psycopg.pq.ConnStatus.OK
        and time.monotonic() >= deadline
    )


def _bounded_connection(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
    return BoundedConnection.connect(*cargs, **cparams)


def _statement_timeout_on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """The session's ``statement_timeout`` made the context's (``set_statement_timeout``),
    or the session's own when that is smaller, when it is not already: once per
    connection in a server's worker, whose requests all have the same; ``RESET`` (the
    session's own) outside one."""
    seconds = _STATEMENT_TIMEOUT.get()
    if seconds is not None:
        own = _own_statement_timeout(dbapi_connection)
        if own is not None:
            seconds = min(seconds, own)
    if getattr(dbapi_connection, "statement_timeout", None) == seconds:
        return
    if seconds is None:
        dbapi_connection.execute("RESET statement_timeout")
    else:
        dbapi_connection.execute(f"SET statement_timeout = {round(seconds * 1000)}")
    dbapi_connection.commit()  # a SET rolled back with the request's work is undone
    dbapi_connection.statement_timeout = seconds


def _own_statement_timeout(dbapi_connection: Any) -> float | None:
    """The ``statement_timeout`` the session has without ours, in seconds (None: none):
    an operator's, from the URL's ``options=-c statement_timeout=...``, ``PGOPTIONS``,
    the role's or the database's setting or the server's. Read once per connection,
    before any ``SET`` of ours (``RESET`` goes back to it). An operator who set it
    smaller than ``DATABASE_STATEMENT_TIMEOUT_SECONDS`` meant it for every statement:
    a request's bound is the smaller of the two, never a longer one of ours."""
    own = getattr(dbapi_connection, "own_statement_timeout", _UNREAD)
    if own is _UNREAD:
        (milliseconds,) = dbapi_connection.execute(
            "SELECT setting::float8 FROM pg_settings WHERE name = 'statement_timeout'"
        ).fetchone()
        dbapi_connection.commit()
        own = milliseconds / 1000 if milliseconds else None
        dbapi_connection.own_statement_timeout = own
    return own  # type: ignore[no-any-return]


_UNREAD = object()


def reads_only(engine: Engine) -> Engine:
    """An engine for transactions that only read, on the database of ``engine``.

    On SQLite they begin ``DEFERRED`` without waiting for the writers' turn: in WAL
    mode a reader sees the last commit and never blocks a writer, so a station
    manager's board or a PDA's pull does not hold up every push for the length of
    its read. (A file SQLite could not put in WAL mode, ``_journal_in_wal``, loses
    that: a writer's commit there waits for the readers.) A write in one fails at
    once (``PRAGMA query_only``, "attempt to write a readonly database"), as it does
    on PostgreSQL (``READ ONLY`` transactions): marking a view that writes is a bug
    that shows, not a race.

    A SQLite file's readers have connections of their own, read-only from the
    start, made on first use and disposed of with ``engine``: setting ``query_only``
    on a connection throws away every statement SQLite had prepared on it, so a
    pooled connection passing between a reader and a writer would parse and plan
    each of the writer's statements anew (a one-scan push's statements took four
    times as long). Elsewhere: the same engine and pool, with options.
    """
    if engine in _SQLITE_FILES:
        reader = _SQLITE_READERS.get(engine)
        if reader is None:
            with _READER_SETUP:
                reader = _SQLITE_READERS.get(engine)
                if reader is None:
                    url, kwargs = _SQLITE_FILES[engine]
                    base = create_engine(url, **kwargs)
                    _configure_sqlite(
                        base, in_memory=False, begin="DEFERRED", turnstile=None, reader=True
                    )
                    reader = _SQLITE_READERS[engine] = base.execution_options(**{READS_ONLY: True})
        return reader
    options: dict[str, Any] = {READS_ONLY: True}
    if engine.dialect.name == "postgresql":
        options["postgresql_readonly"] = True
    return engine.execution_options(**options)


def writes_refused(engine: Engine) -> OSError | None:
    """Why this process's writes on ``engine``'s SQLite file fail until it restarts (its
    WAL file deleted under it, or a failed sync of it: ``Turnstile.refusal``), asked
    without waiting for the writers' turn; None when they do not, or for a database
    other than a SQLite file."""
    turnstile = _TURNSTILES.get(engine)
    return None if turnstile is None else turnstile.refusal()


def has_own_readers(engine: Engine) -> bool:
    """Whether ``reads_only(engine)`` has connections of its own (a SQLite file's), not
    the engine's pool with options."""
    return engine in _SQLITE_FILES


# SQLite file engines: how each was made (for its readers), and its readers once made.
_SQLITE_FILES: weakref.WeakKeyDictionary[Engine, tuple[str, dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)
_SQLITE_READERS: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()
_TURNSTILES: weakref.WeakKeyDictionary[Engine, Turnstile] = weakref.WeakKeyDictionary()
_READER_SETUP = threading.Lock()


def _dispose_reader(engine: Engine) -> None:
    """The readers' pool too, closing its connections (the reader stays, with a new
    pool, as the engine does). A forked process leaves its parent's connections
    unclosed by disposing of the reader first, with ``close=False``: its pool is then
    new and empty when this runs."""
    reader = _SQLITE_READERS.get(engine)
    if reader is not None:
        reader.dispose()  # the pool it shares with the engine its options were set on


def _utc_session(dbapi_connection: Any, _record: Any) -> None:
    """Each PostgreSQL session in UTC, whatever the server's default or the options
    given (the URL's, ``connect_args``' or ``PGOPTIONS``, all kept otherwise):
    timestamps then come back in UTC as they are (in the zone psycopg knows without a
    look-up, not one converted through the zone database per value: a balance reads
    a hundred thousand), and no SQL renders a time in a zone that depends on the
    server. Once per new connection, outside any transaction."""
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    try:
        dbapi_connection.execute("SET TIME ZONE 'UTC'")
    finally:
        dbapi_connection.autocommit = autocommit


def _configure_sqlite(
    engine: Engine,
    *,
    in_memory: bool,
    begin: str,
    turnstile: Turnstile | None,
    reader: bool = False,
) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # let SQLAlchemy emit BEGIN itself
        if turnstile is not None:
            dbapi_connection.turnstile = turnstile
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # 32 MiB of page cache per connection instead of 2 MiB: with a few hundred
        # thousand events, index look-ups would otherwise keep re-reading pages.
        cursor.execute("PRAGMA cache_size = -32768")
        if not in_memory:
            wal = _journal_in_wal(cursor)
            # Each commit synced before it returns: a push's receipt tells the PDA to
            # delete its copies, and in WAL mode NORMAL alone loses commits to a power
            # cut (synced only at checkpoints). A turnstile's writers sync the WAL
            # themselves, after giving their turn back (``models.turnstile``). Without
            # a WAL SQLite syncs each commit itself, and only EXTRA also syncs the
            # directory once the rollback journal is deleted: under FULL a power cut
            # can bring the journal back, and with it the commit rolled back.
            if not wal:
                synchronous = "EXTRA"
            elif turnstile is not None:
                synchronous = "NORMAL"
            else:
                synchronous = "FULL"
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
            if turnstile is not None:
                dbapi_connection.syncs_wal = wal
                if wal:  # the pragma opened the WAL file (when the database had one)
                    dbapi_connection.wal_identity = wal_identity(turnstile.wal)
        cursor.close()

    if in_memory:
        # Its readers share its pool, told apart by an execution option (``reads_only``),
        # which only a listener is given.
        event.listen(engine, "begin", _begin_listener(begin))
    else:
        engine.dialect.do_begin = partial(  # type: ignore[method-assign]
            _begin_on_file, reader=reader, begin=begin, turnstile=turnstile
        )


def _begin_listener(begin: str) -> Callable[[Connection], None]:
    def _on_begin(connection: Connection) -> None:
        reader = bool(connection.get_execution_options().get(READS_ONLY))
        refuse_writes(connection, reader)  # once per connection of a test's reader
        connection.exec_driver_sql("BEGIN DEFERRED" if reader else f"BEGIN {begin}")

    return _on_begin


def _begin_on_file(pooled: Any, *, reader: bool, begin: str, turnstile: Turnstile | None) -> None:
    """The transaction's ``BEGIN`` on a SQLite file's connection (``pooled``, the pool's
    proxy of it), as the dialect's ``do_begin``: a reader's ``BEGIN DEFERRED``, without
    the turn (in WAL mode readers never wait, nor, out of it, for the turn); a
    writer's after taking the turn. Not a ``begin`` listener: with one, SQLAlchemy
    dispatches every event of every connection of the engine (its ``begin``, ``commit``,
    each statement's ``before_cursor_execute`` ...), and ``sync.direct`` asks of each
    statement whether it has listeners, some 5 % of a one-scan push's instructions.
    Run on the driver's cursor, the ``BEGIN`` reaches no ``before_cursor_execute``
    listener (SQLite's own trace does see it); an error is SQLAlchemy's as any
    ``do_begin``'s (``Connection._begin_impl``)."""
    dbapi_connection = pooled.dbapi_connection
    _set_query_only(pooled, reader)  # a reader's once per connection
    if reader:
        _run(dbapi_connection, "BEGIN DEFERRED")
        return
    if turnstile is None:
        _run(dbapi_connection, f"BEGIN {begin}")
        return
    dbapi_connection.take_turn()
    try:
        _run(dbapi_connection, f"BEGIN {begin}")
    except BaseException:
        dbapi_connection.give_turn()
        raise


def _run(dbapi_connection: Any, sql: str) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(sql)
    finally:
        cursor.close()


def _set_query_only(pooled: Any, refuse: bool) -> None:
    """``refuse_writes`` on the pool's proxy of a connection, in the same record."""
    info = pooled.info
    if info.get("query_only", False) != refuse:
        _run(pooled.dbapi_connection, f"PRAGMA query_only = {int(refuse)}")
        info["query_only"] = refuse


def _journal_in_wal(cursor: Any) -> bool:
    """Ask for WAL mode; whether the file is in it. Where SQLite has no shared memory
    for the WAL index (a file system layer without it, such as ``unix-dotfile`` or
    ``unix-none``, or a file opened with ``nolock=1``) it leaves the file in its
    rollback journal and says so only by the mode the pragma returns: the service
    then works with readers and writers waiting for each other, and says why once
    per file and process."""
    (mode,) = cursor.execute("PRAGMA journal_mode = WAL").fetchone()
    if str(mode).lower() == "wal":
        return True
    (_, _, path) = cursor.execute("PRAGMA database_list").fetchone()
    with _WARNED_LOCK:  # not held while logging: a fork meanwhile would inherit it held
        first = path not in _WARNED_NO_WAL
        _WARNED_NO_WAL.add(path)
    if first:
        log.warning(
            "SQLite left %s in its rollback journal (journal mode %r), not WAL: the "
            "SQLite file system layer or URI in use offers no shared memory for it. "
            "Readers and writers now wait for each other (a long read can hold a push "
            "up to the busy timeout), and SQLite syncs each commit itself.",
            path,
            mode,
        )
    return False


_WARNED_NO_WAL: set[str] = set()  # once per file and process
_WARNED_LOCK = threading.Lock()


def refuse_writes(connection: Connection, refuse: bool) -> None:
    """SQLite's ``query_only`` on this connection, set only when it changes (a pooled
    reader's connection is a writer's next; a test's connection serves both). No-op
    on other databases."""
    if connection.dialect.name != "sqlite":
        return
    info = connection.connection.info
    if info.get("query_only", False) != refuse:
        connection.exec_driver_sql(f"PRAGMA query_only = {int(refuse)}")
        info["query_only"] = refuse
