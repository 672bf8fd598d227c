"""Webhook subscriptions remember their last success: webhook_subscription.last_delivered_at

A subscription's run of failures (``consecutive_failures``, ``failing_since``) was
counted in the order attempts were recorded, not made: a failure made before a success
and recorded after it (two workers, or two lanes, recording in turn) started a run
"since" a moment the receiver then answered, and with nothing to send for hours after
it, a receiver's short redeploy read as failing for hours and disabled it at once. A
failure older than this column is no failure in a row; set by each success to the
latest success's time.

Here: one nullable column (a catalog change on PostgreSQL), no backfill: until its next
success a subscription counts every failure, as before.

Revision ID: c44a2b76db50
Revises: a4d8f2c6e0b3
Create Date: 2026-12-18 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c44a2b76db50"
down_revision: str | None = "a4d8f2c6e0b3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "webhook_subscription"


def upgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("last_delivered_at", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_column("last_delivered_at")
