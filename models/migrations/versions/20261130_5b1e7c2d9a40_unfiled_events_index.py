"""Unfiled events index: opening a shift without reading the PDA's history

Opening a shift files under it the events of its PDA that were pushed before it
opened and belong to it (``sync.shifts.open_shift``). Without a first seq
declared, those are the events of the device filed under no shift, recorded from
just before the opening: the only index that served the look-up was the device's
(device_id, seq), so every opening read all the events the PDA had ever sent: on
SQLite, 30 ms for a PDA with 200,000 events all filed, 245 to 250 ms when one in 50
was filed under none, inside the writers' turn. This partial index holds only the
events filed under no shift, by device and time (0.2 ms and less for the second).

Built and dropped CONCURRENTLY on PostgreSQL, as ``32c6e05e447b`` says why (an
INVALID index left by a failed build is dropped and built again); SQLite builds
it plainly.

Revision ID: 5b1e7c2d9a40
Revises: 32c6e05e447b
Create Date: 2026-11-30 19:00:00.000000
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import sqlalchemy as sa
from alembic import op

revision: str = "5b1e7c2d9a40"
down_revision: str | None = "32c6e05e447b"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_scan_event_unfiled"
UNFILED = "shift_id IS NULL"


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
            op.drop_index(NAME, table_name="scan_event", postgresql_concurrently=True)
        op.create_index(
            NAME,
            "scan_event",
            ["device_id", "occurred_at"],
            unique=False,
            if_not_exists=True,
            postgresql_concurrently=True,
            postgresql_where=sa.text(UNFILED),
            sqlite_where=sa.text(UNFILED),
        )


def downgrade() -> None:
    with _outside_transaction():
        op.drop_index(NAME, table_name="scan_event", if_exists=True, postgresql_concurrently=True)
