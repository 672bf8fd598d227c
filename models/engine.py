"""Engine construction with the per-backend settings the service relies on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from models.turnstile import Turnstile, connect_args

BUSY_TIMEOUT_MS = 10_000  # how long a SQLite writer waits for its turn (then a 503)


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
            kwargs["connect_args"] = connect_args(kwargs.get("connect_args"))
        engine = create_engine(url, **kwargs)
        _configure_sqlite(engine, in_memory=in_memory, begin=sqlite_begin, turnstile=turnstile)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    if parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = _utc_sessions(
            parsed.query.get("options"), kwargs.get("connect_args")
        )
    return create_engine(url, **kwargs)


def _utc_sessions(
    in_url: str | tuple[str, ...] | None, given: dict[str, Any] | None
) -> dict[str, Any]:
    """PostgreSQL sessions in UTC, whatever the server's default: timestamps then come
    back in UTC as they are (with the zone psycopg reads at once, not one looked up in
    the zone database and converted per value: a balance reads a hundred thousand),
    and no SQL renders a time in a zone that depends on the server.

    libpq ``options`` given in the URL (``?options=-csearch_path%3D...``) or in
    ``connect_args`` are kept: ``connect_args`` would otherwise replace the URL's."""
    args = dict(given or {})
    url_options = [in_url] if isinstance(in_url, str) else list(in_url or ())
    args["options"] = " ".join(
        filter(None, [*url_options, args.get("options"), "-c TimeZone=UTC"])
    )
    return args


def _configure_sqlite(
    engine: Engine, *, in_memory: bool, begin: str, turnstile: Turnstile | None
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
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        if turnstile is None:
            connection.exec_driver_sql(f"BEGIN {begin}")
            return
        dbapi_connection = connection.connection.dbapi_connection
        dbapi_connection.take_turn()
        try:
            connection.exec_driver_sql(f"BEGIN {begin}")
        except BaseException:
            dbapi_connection.give_turn()
            raise
