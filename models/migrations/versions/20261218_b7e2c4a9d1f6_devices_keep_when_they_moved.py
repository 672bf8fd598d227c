"""PDAs keep when an admin last moved them to another station: device.moved_at

A PDA sent from one station to another is moved by an admin (``sync.device_moves``):
its tokens issued before the move stop working, so it signs in anew at its new station,
and a token of its old station's courier does not work again if it moves back. Tokens
are checked against this column on every request (``sync.accounts``).

Here: one nullable column (a catalog change on PostgreSQL), no backfill: no PDA was
moved before (there was no way to). Added only where it is not there yet: running code
used at an older revision (tests/models/test_migrations.py) writes it.

Revision ID: b7e2c4a9d1f6
Revises: c44a2b76db50
Create Date: 2026-12-18 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b7e2c4a9d1f6"
down_revision: str | None = "c44a2b76db50"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "device"
COLUMN = "moved_at"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS {COLUMN} TIMESTAMP WITH TIME ZONE"
        )
    elif COLUMN not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns(TABLE)}:
        with op.batch_alter_table(TABLE, schema=None) as batch_op:
            batch_op.add_column(sa.Column(COLUMN, sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_column(COLUMN)
