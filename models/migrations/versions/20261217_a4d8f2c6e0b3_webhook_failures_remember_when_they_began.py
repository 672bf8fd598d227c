"""Webhook failures remember when they began: webhook_subscription.failing_since

A subscription was disabled after ``WEBHOOK_DISABLE_AFTER_FAILURES`` failed attempts in
a row, however short the outage: every attempt of every message counted, so with a
message every 5 minutes a receiver redeploying for 15 was disabled, nothing flowing
until an admin enabled it again (and a ``consent.requested`` whose request lapsed
meanwhile was skipped: its recipient never asked). It is now disabled only when the
first of those failures is ``WEBHOOK_DISABLE_AFTER_SECONDS`` old too: this column, set
at the first failure after a success, cleared by a success or a re-enabling.

Here: one nullable column (a catalog change on PostgreSQL), no backfill: a subscription
failing at the upgrade has its run counted from its next failure, a later disabling,
never an earlier one.

Revision ID: a4d8f2c6e0b3
Revises: f5a1c7e3b9d4
Create Date: 2026-12-17 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a4d8f2c6e0b3"
down_revision: str | None = "f5a1c7e3b9d4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "webhook_subscription"


def upgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.add_column(sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_column("failing_since")
