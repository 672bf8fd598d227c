"""Webhook secrets rotate: webhook_subscription.previous_secret, previous_secret_until

A subscription's secret could not be changed: a leaked one stayed valid, and the only
way out (a new subscription) lost the deliveries waiting for the old one and broke the
order per parcel. ``POST /webhooks/subscriptions/<id>/secret`` now gives a new secret
and keeps the old one, signing every delivery with both until ``previous_secret_until``
(a grace period), so that the receiver switches without refusing what is in flight.

Here: two nullable columns (a catalog change on PostgreSQL), no backfill.

Revision ID: e7b3d9a5c2f8
Revises: c4e8b2f6a1d9
Create Date: 2026-12-13 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e7b3d9a5c2f8"
down_revision: str | None = "c4e8b2f6a1d9"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "webhook_subscription"


def upgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.add_column(sa.Column("previous_secret", sa.String(length=128), nullable=True))
        batch_op.add_column(
            sa.Column("previous_secret_until", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_column("previous_secret_until")
        batch_op.drop_column("previous_secret")
