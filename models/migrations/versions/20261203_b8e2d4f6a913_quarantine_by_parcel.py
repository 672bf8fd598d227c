"""Quarantine by parcel: a parcel's rejected events, newest first

``GET /api/v1/quarantine?tracking_no=`` lists the rejected events naming one parcel:
what a manager chasing a missing parcel reads first. The table had indexes by device
and seq and by station only, so a parcel with few or no rejected events (the usual
answer) read every rejected event of its station, or of every station for an admin,
and a broken PDA sends thousands. The index gives a number's rows newest first.

Built and dropped CONCURRENTLY on PostgreSQL, as ``32c6e05e447b`` says why (pushes
that quarantine an event would wait for a plain build; an INVALID index left by a
failed build is dropped and built again); SQLite builds it plainly.

Revision ID: b8e2d4f6a913
Revises: 7a3c9e5b1d08
Create Date: 2026-12-03 19:15:00.000000
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import sqlalchemy as sa
from alembic import op

revision: str = "b8e2d4f6a913"
down_revision: str | None = "7a3c9e5b1d08"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "quarantined_event"
NAME = "ix_quarantined_event_tracking_no"


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
            op.drop_index(NAME, table_name=TABLE, postgresql_concurrently=True)
        op.create_index(
            NAME,
            TABLE,
            ["tracking_no", "id"],
            unique=False,
            if_not_exists=True,
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with _outside_transaction():
        op.drop_index(NAME, table_name=TABLE, if_exists=True, postgresql_concurrently=True)
