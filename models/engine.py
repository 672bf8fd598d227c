"""Engine construction with the per-backend settings the service relies on."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url


def make_engine(url: str, *, sqlite_begin: str = "IMMEDIATE", **kwargs: Any) -> Engine:
    """Create the engine for ``url``.

    SQLite gets foreign keys, WAL, a busy timeout, and SQLAlchemy's recipe for
    real ``BEGIN``/``SAVEPOINT`` handling (the sqlite3 module's own transaction
    guessing breaks savepoints). Transactions begin ``IMMEDIATE``: a deferred
    transaction that reads and then writes fails at once with "database is
    locked" when another process wrote in between (busy timeouts do not help
    there), whereas an immediate one waits its turn. SQLite is the one-process
    store; PostgreSQL is the concurrent one.
    """
    parsed = make_url(url)
    # SQL parameters hold passwords' hashes, webhook secrets and recipients' phones:
    # never in logs (echo) nor in the text of database errors.
    kwargs.setdefault("hide_parameters", True)
    if parsed.get_backend_name() == "sqlite":
        if sqlite_begin not in ("DEFERRED", "IMMEDIATE"):
            raise ValueError(f"sqlite_begin must be DEFERRED or IMMEDIATE, not {sqlite_begin!r}")
        engine = create_engine(url, **kwargs)
        _configure_sqlite(
            engine, in_memory=parsed.database in (None, "", ":memory:"), begin=sqlite_begin
        )
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def _configure_sqlite(engine: Engine, *, in_memory: bool, begin: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # let SQLAlchemy emit BEGIN itself
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA busy_timeout = 10000")
        # 32 MiB of page cache per connection instead of 2 MiB: with a few hundred
        # thousand events, index look-ups would otherwise keep re-reading pages.
        cursor.execute("PRAGMA cache_size = -32768")
        if not in_memory:
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql(f"BEGIN {begin}")
