"""Run and inspect the Alembic migrations kept in ``models/migrations``.

No ``alembic.ini``: the configuration is built here so that an installed
package migrates the same way as a checkout (``courier-api db upgrade``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

SCRIPT_LOCATION = "models:migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    config.set_main_option("file_template", "%%(year)d%%(month).2d%%(day).2d_%%(rev)s_%%(slug)s")
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database behind ``engine`` up to ``revision``."""
    with migrating(engine) as connection:
        command.upgrade(alembic_config(connection), revision)


def downgrade(engine: Engine, revision: str) -> None:
    with migrating(engine) as connection:
        command.downgrade(alembic_config(connection), revision)


@contextmanager
def migrating(engine: Engine) -> Iterator[Connection]:
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
            yield connection
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
    return set(MigrationContext.configure(connection).get_current_heads())


def autogenerate_revision(engine: Engine, message: str) -> None:
    """Write a new revision from the difference between the models and the database."""
    with engine.begin() as connection:
        command.revision(alembic_config(connection), message=message, autogenerate=True)
