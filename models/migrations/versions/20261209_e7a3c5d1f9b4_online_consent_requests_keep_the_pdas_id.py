"""Online consent requests keep the PDA's own id: consent_request.client_request_id

A courier at the door asks online (``POST /consents/requests``) over a weak signal; the
answer is lost and the PDA asks again. Each attempt made a request of its own, and the
recipient got the question twice, by SMS or in the app, and answered one of them. A
request now keeps the id the PDA gave it (``client_request_id``), unique per PDA, and a
retry with it answers the request made the first time, sending nothing again.

No backfill: the column is NULL on every existing request (offline ones keep their
event's ``client_event_id``, as before), and the unique index covers only the requests
that have one.

On PostgreSQL an upgrade stopped anywhere runs again to the end, as ``c4e8a1f3d7b9``
does: the column is added on its own (``IF NOT EXISTS``) and committed at once, then
the index is built CONCURRENTLY; an INVALID one left by a failed build is dropped and
built again. SQLite does it all in the upgrade's one transaction.

Revision ID: e7a3c5d1f9b4
Revises: d5f9b2a4e8c1
Create Date: 2026-12-09 11:00:00.000000
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import sqlalchemy as sa
from alembic import op

revision: str = "e7a3c5d1f9b4"
down_revision: str | None = "d5f9b2a4e8c1"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "consent_request"
NAME = "ix_consent_request_client_request_id"
GIVEN = sa.text("client_request_id IS NOT NULL")


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _outside_transaction() -> AbstractContextManager[None]:
    """PostgreSQL: an autocommit block, as CONCURRENTLY needs; SQLite: the migration's
    own transaction."""
    return op.get_context().autocommit_block() if _postgresql() else nullcontext()


def _create_index(**options: object) -> None:
    op.create_index(
        NAME,
        TABLE,
        ["device_id", "client_request_id"],
        unique=True,
        if_not_exists=True,
        postgresql_where=GIVEN,
        sqlite_where=GIVEN,
        **options,
    )


def upgrade() -> None:
    if _postgresql():
        _upgrade_postgresql()
        return
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.add_column(sa.Column("client_request_id", sa.Uuid(), nullable=True))
    _create_index()


def _upgrade_postgresql() -> None:
    """Each statement its own transaction, each one done again harmlessly when the
    upgrade runs again."""
    with op.get_context().autocommit_block():
        op.execute(f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS client_request_id UUID")
        if op.get_bind().scalar(
            sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
            {"n": NAME},
        ):
            op.drop_index(NAME, table_name=TABLE, postgresql_concurrently=True)
        _create_index(postgresql_concurrently=True)


def downgrade() -> None:
    with _outside_transaction():
        op.drop_index(NAME, table_name=TABLE, if_exists=True, postgresql_concurrently=True)
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_column("client_request_id")
