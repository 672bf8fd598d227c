"""Alembic environment: always runs on a connection handed over by models.migrate."""

from typing import Any

from alembic import context

from models import Base, UTCDateTime


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Render our column types as the plain SQLAlchemy types they store, so a
    migration never imports application code that may change after it."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `courier-api db ...` (models.migrate)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things: batch mode copies the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
    render_item=render_item,
    # One transaction per migration, so that one may step out of it into an autocommit
    # block (PostgreSQL's CREATE INDEX CONCURRENTLY). On SQLite models.migrate holds
    # all of them in one transaction of its own, which this does not change.
    transaction_per_migration=True,
)
with context.begin_transaction():
    context.run_migrations()
