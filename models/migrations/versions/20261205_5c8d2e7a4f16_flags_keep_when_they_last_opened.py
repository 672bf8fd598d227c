"""Flags keep when they last opened: flag.opened_at, and the queue reads by it

The flag queue listed flags newest first by id, the order they were first raised: a
flag opened again (a manager's decision on a PDA's ``clock_jump`` that a later jump
went beyond, a handover flag a late batch raised again) stayed where it was first
raised, below a week of newer ones, at 19:00. A flag now keeps when it last became
open (``sync.flags._record``), and the queue lists the latest opened first.

Existing flags get the time of their latest change to open after their raising (their
``flag_change`` history), else when they were raised. The column is added NOT NULL
with a constant default that the backfill overwrites everywhere (SQLite cannot add a
NOT NULL column otherwise without copying the table); PostgreSQL drops the default
afterwards, SQLite keeps it (the models set the column on every insert). The index is
built CONCURRENTLY on PostgreSQL, as ``32c6e05e447b`` says why; SQLite builds it
plainly.

Revision ID: 5c8d2e7a4f16
Revises: 3fbed2908ec9
Create Date: 2026-12-05 10:00:00.000000
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import sqlalchemy as sa
from alembic import op

revision: str = "5c8d2e7a4f16"
down_revision: str | None = "3fbed2908ec9"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "flag"
NAME = "ix_flag_station_opened"
BACKFILL = """UPDATE flag
    SET opened_at = COALESCE(
        (SELECT max(flag_change.at) FROM flag_change
            WHERE flag_change.flag_id = flag.id
            AND flag_change.to_status = 'open'
            AND flag_change.from_status IS NOT NULL),
        raised_at)"""


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _outside_transaction() -> AbstractContextManager[None]:
    """PostgreSQL: an autocommit block, as CONCURRENTLY needs; SQLite: the migration's
    own transaction."""
    return op.get_context().autocommit_block() if _postgresql() else nullcontext()


def upgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "opened_at",
                sa.DateTime(timezone=True),
                nullable=False,
                server_default=sa.text("'2000-01-01 00:00:00+00:00'"),
            )
        )
    op.execute(BACKFILL)
    if _postgresql():
        op.alter_column(TABLE, "opened_at", server_default=None)
    with _outside_transaction():
        if _postgresql() and op.get_bind().scalar(
            sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
            {"n": NAME},
        ):
            op.drop_index(NAME, table_name=TABLE, postgresql_concurrently=True)
        op.create_index(
            NAME,
            TABLE,
            ["station_id", "opened_at", "id"],
            unique=False,
            if_not_exists=True,
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with _outside_transaction():
        op.drop_index(NAME, table_name=TABLE, if_exists=True, postgresql_concurrently=True)
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_column("opened_at")
