"""Flags across stations by when they opened: an auditor's or an admin's flag queue

``GET /api/v1/flags`` without a station (an auditor's or an admin's, across stations)
lists the flags latest opened first (``opened_at``, then id), a page at a time by its
cursor. Only ``ix_flag_station_opened`` served that order, for one station: across
stations PostgreSQL read the whole ``flag`` table for each page and sorted it (a Parallel
Seq Scan of 108,000 flags, 55 to 70 ms a page in the plans world), and flags are kept.

Built and dropped CONCURRENTLY on PostgreSQL, as ``32c6e05e447b`` says why (an
INVALID index left by a failed build is dropped and built again); SQLite builds
it plainly.

Revision ID: d2f6a8c4e7b1
Revises: b7e2c4a9d1f6
Create Date: 2026-12-19 09:00:00.000000
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import sqlalchemy as sa
from alembic import op

revision: str = "d2f6a8c4e7b1"
down_revision: str | None = "b7e2c4a9d1f6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_flag_opened"


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _outside_transaction() -> AbstractContextManager[None]:
    """PostgreSQL: an autocommit block, as CONCURRENTLY needs; SQLite: the migration's
    own transaction."""
    return op.get_context().autocommit_block() if _postgresql() else nullcontext()


def upgrade() -> None:
    with _outside_transaction():
        if _postgresql() and op.get_bind().scalar(
            sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
            {"n": NAME},
        ):
            op.drop_index(NAME, table_name="flag", postgresql_concurrently=True)
        op.create_index(
            NAME,
            "flag",
            ["opened_at", "id"],
            unique=False,
            if_not_exists=True,
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with _outside_transaction():
        op.drop_index(NAME, table_name="flag", if_exists=True, postgresql_concurrently=True)
