"""Indexes for hot queries: a subject's flags, deliveries by time

Found by tests/courier_api/test_query_plans.py (EXPLAIN on PostgreSQL with a
realistic history): a parcel's flags of every kind (its proof's detail, its
shift's balance) were read with a Seq Scan of flag, and the auditors' proof search
by time with a Seq Scan of scan_event.

Revision ID: 32c6e05e447b
Revises: 48617d335743
Create Date: 2026-11-30 04:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "32c6e05e447b"
down_revision: str | None = "48617d335743"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DELIVERY_PREDICATE = "type IN ('delivered', 'delivered_to_locker', 'delivered_to_pickup_point')"


def upgrade() -> None:
    with op.batch_alter_table("flag", schema=None) as batch_op:
        batch_op.create_index("ix_flag_subject", ["subject_type", "subject_key"], unique=False)
    with op.batch_alter_table("scan_event", schema=None) as batch_op:
        batch_op.create_index(
            "ix_scan_event_delivery_time",
            ["occurred_at"],
            unique=False,
            postgresql_where=sa.text(DELIVERY_PREDICATE),
            sqlite_where=sa.text(DELIVERY_PREDICATE),
        )


def downgrade() -> None:
    with op.batch_alter_table("scan_event", schema=None) as batch_op:
        batch_op.drop_index("ix_scan_event_delivery_time")
    with op.batch_alter_table("flag", schema=None) as batch_op:
        batch_op.drop_index("ix_flag_subject")
