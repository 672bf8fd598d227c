"""Run and inspect the Alembic migrations kept in ``models/migrations``.

No ``alembic.ini``: the configuration is built here so that an installed
package migrates the same way as a checkout (``courier-api db upgrade``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import OperationalError

SCRIPT_LOCATION = "models:migrations"


class MigrationRefused(RuntimeError):
    """A migration that will not run on this database, its message saying why in one
    line (``courier-api db`` prints it, with no traceback): nothing of that migration was
    done. On PostgreSQL the migrations before it in the same run, each committed on its
    own, stay done: ``courier-api db`` says where the database is."""


# Reading the current revision (/readyz, every few seconds from a load balancer; each
# CLI command's check) builds a MigrationContext, which logs "Context impl ..." and
# "Will assume ... DDL." at INFO: lines for a migration run, not for a read. A context
# variable, not the logger's level, so that a read on one thread hides nothing another
# thread's migration logs.
_READING_REVISIONS: ContextVar[bool] = ContextVar("reading_revisions", default=False)


class _NotWhileReadingRevisions(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _READING_REVISIONS.get()


logging.getLogger("alembic.runtime.migration").addFilter(_NotWhileReadingRevisions())


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    config.set_main_option("file_template", "%%(year)d%%(month).2d%%(day).2d_%%(rev)s_%%(slug)s")
    config.attributes["connection"] = connection
    return config


CONCURRENTLY = re.compile(r"\bCONCURRENTLY\b", re.IGNORECASE)
LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE for a lock_timeout that ran out


def upgrade(
    engine: Engine,
    revision: str = "head",
    *,
    lock_timeout_seconds: float | None = None,
    attempts: int = 1,
    pause_seconds: float = 5.0,
    on_retry: Callable[[int, str], None] | None = None,
) -> None:
    """Migrate the database behind ``engine`` up to ``revision``.

    On PostgreSQL an ``ALTER TABLE`` waits for every transaction holding its table
    (a long export, a transaction left open) while every push and read of that table
    queues behind it: a station stands still for as long as the longest transaction.
    With ``lock_timeout_seconds`` a statement gives up its wait after that long
    instead (not a CONCURRENTLY build, which queues no one: it waits as long as it
    must); the upgrade, whose migrations commit one by one, then tries again from the
    one that gave up, up to ``attempts`` times in all, ``pause_seconds`` apart
    (``on_retry`` hears of each: the attempt that failed and why). SQLite waits as it
    always does (its busy timeout).
    """
    for attempt in range(1, attempts + 1):
        try:
            with migrating(engine, lock_timeout_seconds=lock_timeout_seconds) as connection:
                command.upgrade(alembic_config(connection), revision)
            return
        except OperationalError as error:
            if attempt == attempts or not lock_not_available(error):
                raise
            if on_retry is not None:
                on_retry(attempt, str(error.orig).strip().splitlines()[0])
            time.sleep(pause_seconds)


def lock_not_available(error: OperationalError) -> bool:
    return getattr(error.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE


def downgrade(engine: Engine, revision: str) -> None:
    with migrating(engine) as connection:
        command.downgrade(alembic_config(connection), revision)


@contextmanager
def migrating(
    engine: Engine, *, lock_timeout_seconds: float | None = None
) -> Iterator[Connection]:
    """A connection for the migrations to run on: on PostgreSQL, one transaction per
    migration; on SQLite, one transaction for them all.

    SQLite alters a table by copying it (Alembic's batch mode), and dropping the old
    copy fails while other tables' rows refer to it: its foreign keys are switched
    off for the migration (``PRAGMA foreign_keys`` is ignored inside a transaction,
    so before it begins), checked with ``PRAGMA foreign_key_check`` before the
    commit, and switched on again, as SQLite's own documentation of ``ALTER TABLE``
    prescribes.
    """
    if engine.dialect.name != "sqlite":
        # Not in a transaction: Alembic begins one per migration (``env.py``), which a
        # migration may leave for an autocommit block (CREATE INDEX CONCURRENTLY).
        with engine.connect() as connection:
            if lock_timeout_seconds is None:
                yield connection
                return
            raw = connection.connection.driver_connection
            assert raw is not None
            # For the session, so that every migration's transaction and autocommit
            # block has it; set back before the connection returns to the pool.
            timeout = f"SET lock_timeout = '{round(lock_timeout_seconds * 1000)}ms'"
            raw.execute(timeout)
            raw.commit()
            # Whether the session's lock_timeout is 0 (a CONCURRENTLY build's) or the
            # timeout; None: not known, set before the next statement.
            waits_for_ever: bool | None = False

            def none_for_concurrent_builds(
                _connection: Connection, cursor: Any, statement: str, *_args: Any
            ) -> None:
                """A CONCURRENTLY build or drop queues no push or read behind it, so
                it waits for the table's writers as long as they last, as it always
                did; given up, it left an INVALID index to build again, and a busy
                station's upgrade ran out of attempts where waiting held up no one.
                (It runs in an autocommit block: each SET applies at once.)"""
                nonlocal waits_for_ever
                concurrent = CONCURRENTLY.search(statement) is not None
                if concurrent is not waits_for_ever:
                    cursor.execute("SET lock_timeout = 0" if concurrent else timeout)
                    waits_for_ever = concurrent

            def set_back(*_args: Any) -> None:
                """A SET in a transaction (or savepoint) rolled back is undone with it:
                the session has again whichever was set before, so the next statement
                sets its own."""
                nonlocal waits_for_ever
                waits_for_ever = None

            listeners: list[tuple[str, Callable[..., None]]] = [
                ("before_cursor_execute", none_for_concurrent_builds),
                ("rollback", set_back),
                ("rollback_savepoint", set_back),
            ]
            for name, listener in listeners:
                event.listen(connection, name, listener)
            try:
                yield connection
            finally:
                for name, listener in listeners:
                    event.remove(connection, name, listener)
                if connection.in_transaction():
                    connection.rollback()
                raw.rollback()
                raw.execute("RESET lock_timeout")
                raw.commit()
        return
    with engine.connect() as connection:
        raw = connection.connection.driver_connection
        assert raw is not None
        raw.execute("PRAGMA foreign_keys = OFF")
        try:
            with connection.begin():
                yield connection
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"the migration broke foreign keys: {broken[:5]}")
        finally:
            raw.execute("PRAGMA foreign_keys = ON")


@cache
def head_revisions() -> frozenset[str]:
    """The heads of the migrations shipped with this code (read once per process)."""
    return frozenset(ScriptDirectory.from_config(alembic_config()).get_heads())


def current_revisions(connection: Connection) -> set[str]:
    reading = _READING_REVISIONS.set(True)
    try:
        return set(MigrationContext.configure(connection).get_current_heads())
    finally:
        _READING_REVISIONS.reset(reading)


def autogenerate_revision(engine: Engine, message: str) -> None:
    """Write a new revision from the difference between the models and the database."""
    with engine.begin() as connection:
        command.revision(alembic_config(connection), message=message, autogenerate=True)
