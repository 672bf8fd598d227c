"""Drop bounds: a drop keeps the times its PDA's other events bound it by

A locker or pickup-point drop was judged against a consent by its own time, bounded
only by the events of the same parcel its PDA recorded around it. A courier who set
the PDA's clock forward for the drop (after a consent the recipient gave later) and
back for the next parcel's scan had the drop counted as authorized: only the next
scan was flagged ``time_inversion``. The seqs are the PDA's causal order whatever the
parcel (DESIGN.md rule 6), so a drop now keeps the latest time of an event recorded
before it that is dated later, and the earliest of one recorded after it that is
dated earlier (``sync.drop_bounds``), and the rules judge it between the two.

Existing drops are filled in one pass over each device's events in seq order
(window functions; SQLite 3.33 or later for ``UPDATE ... FROM``). The new index reads
a device's events by time; built and dropped CONCURRENTLY on PostgreSQL, as
``32c6e05e447b`` says why (an INVALID index left by a failed build is dropped and
built again); SQLite builds it plainly.

Revision ID: 5d1e7b3f9a02
Revises: c4f1a8e2b6d3
Create Date: 2026-12-03 11:00:00.000000
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import sqlalchemy as sa
from alembic import op

revision: str = "5d1e7b3f9a02"
down_revision: str | None = "c4f1a8e2b6d3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BACKFILL = """
UPDATE scan_event SET
    latest_of_earlier_seqs =
        CASE WHEN bounds.latest_before > scan_event.occurred_at THEN bounds.latest_before END,
    earliest_of_later_seqs =
        CASE WHEN bounds.earliest_after < scan_event.occurred_at THEN bounds.earliest_after END
FROM (
    SELECT
        id,
        max(occurred_at) OVER (
            PARTITION BY device_id ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING
        ) AS latest_before,
        min(occurred_at) OVER (
            PARTITION BY device_id ORDER BY seq ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING
        ) AS earliest_after
    FROM scan_event
) AS bounds
WHERE bounds.id = scan_event.id
    AND scan_event.type IN ('delivered_to_locker', 'delivered_to_pickup_point')
    AND (
        bounds.latest_before > scan_event.occurred_at
        OR bounds.earliest_after < scan_event.occurred_at
    )
"""


NAME = "ix_scan_event_device_time"


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _outside_transaction() -> AbstractContextManager[None]:
    """PostgreSQL: an autocommit block, as CONCURRENTLY needs; SQLite: the migration's
    own transaction."""
    return op.get_context().autocommit_block() if _postgresql() else nullcontext()


def upgrade() -> None:
    with op.batch_alter_table("scan_event", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("latest_of_earlier_seqs", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("earliest_of_later_seqs", sa.DateTime(timezone=True), nullable=True)
        )
    op.execute(BACKFILL)
    with _outside_transaction():
        if _postgresql() and op.get_bind().scalar(
            sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
            {"n": NAME},
        ):
            op.drop_index(NAME, table_name="scan_event", postgresql_concurrently=True)
        op.create_index(
            NAME,
            "scan_event",
            ["device_id", "occurred_at", "seq"],
            unique=False,
            if_not_exists=True,
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with _outside_transaction():
        op.drop_index(NAME, table_name="scan_event", if_exists=True, postgresql_concurrently=True)
    with op.batch_alter_table("scan_event", schema=None) as batch_op:
        batch_op.drop_column("earliest_of_later_seqs")
        batch_op.drop_column("latest_of_earlier_seqs")
