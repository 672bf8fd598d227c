"""Webhook deliveries may be skipped, with why: webhook_delivery.skipped_reason

A ``consent.requested`` written while the receiver (or the deliverer) was down was sent
once it came back, hours on: the recipient was asked about a request that had lapsed
or been answered meanwhile, and their answer was refused. The deliverer now skips
such a delivery when it is due (status ``skipped``) and keeps why
(``skipped_reason``).

Here: the column is added and the status's CHECK constraint takes ``skipped``. No
backfill: a delivery sent before was sent. The downgrade gives the skipped ones
status ``dead`` with their reason as the last error: they were never delivered, and
an admin may replay them.

Revision ID: c9e4a2d7f5b3
Revises: b6d2f8a4c1e7
Create Date: 2026-12-10 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from alembic.operations import BatchOperations

revision: str = "c9e4a2d7f5b3"
down_revision: str | None = "b6d2f8a4c1e7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "webhook_delivery"
CHECK = "ck_webhook_delivery_delivery_status"
BEFORE = ("pending", "delivered", "dead")
AFTER = (*BEFORE, "skipped")

AS_DEAD = sa.text(
    "UPDATE webhook_delivery SET status = 'dead', last_error = skipped_reason "
    "WHERE status = 'skipped'"
)


def _allow(batch_op: BatchOperations, statuses: Sequence[str]) -> None:
    allowed = ", ".join(f"'{status}'" for status in statuses)
    batch_op.drop_constraint(batch_op.f(CHECK), type_="check")
    batch_op.create_check_constraint(batch_op.f(CHECK), sa.text(f"status IN ({allowed})"))


def upgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.add_column(sa.Column("skipped_reason", sa.Text(), nullable=True))
        _allow(batch_op, AFTER)


def downgrade() -> None:
    op.execute(AS_DEAD)
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        _allow(batch_op, BEFORE)
        batch_op.drop_column("skipped_reason")
