"""Drop bounds: a drop keeps the times its PDA's other events bound it by

A locker or pickup-point drop was judged against a consent by its own time, bounded
only by the events of the same parcel its PDA recorded around it. A courier who set
the PDA's clock forward for the drop (after a consent the recipient gave later) and
back for the next parcel's scan had the drop counted as authorized: only the next
scan was flagged ``time_inversion``. The seqs are the PDA's causal order whatever the
parcel (DESIGN.md rule 6), so a drop now keeps the latest time of an event recorded
before it that is dated later, and the earliest of one recorded after it that is
dated earlier, each within 12 hours of its own (``sync.drop_bounds.REACH``), and the
rules judge it between the two.

The columns are added in a transaction of their own (PostgreSQL: a moment's lock,
then committed; ``IF NOT EXISTS``, so that an upgrade stopped later runs again). The
new index, a device's events by time, is built CONCURRENTLY on PostgreSQL, as
``32c6e05e447b`` says why, and SQLite builds it plainly. Existing drops are then
filled through it, each reading its device's events within 12 hours of it, in one
statement that writes only the drops that have a bound. Flags are not judged again
here: ``courier-api rejudge`` does that, with the rules in force.

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

DROPS = "('delivered_to_locker', 'delivered_to_pickup_point')"
NAME = "ix_scan_event_device_time"
COLUMNS = ("latest_of_earlier_seqs", "earliest_of_later_seqs")


def _backfill(later: str, earlier: str) -> str:
    """The drops' bounds, as ``sync.drop_bounds`` keeps them: ``later`` and
    ``earlier`` spell a drop's time plus and minus 12 hours in the dialect."""
    latest = f"""(SELECT max(other.occurred_at) FROM scan_event AS other
        WHERE other.device_id = scan_event.device_id
            AND other.occurred_at > scan_event.occurred_at
            AND other.occurred_at <= {later}
            AND other.seq < scan_event.seq)"""
    earliest = f"""(SELECT min(other.occurred_at) FROM scan_event AS other
        WHERE other.device_id = scan_event.device_id
            AND other.occurred_at < scan_event.occurred_at
            AND other.occurred_at >= {earlier}
            AND other.seq > scan_event.seq)"""
    return f"""UPDATE scan_event
        SET latest_of_earlier_seqs = {latest}, earliest_of_later_seqs = {earliest}
        WHERE type IN {DROPS} AND ({latest} IS NOT NULL OR {earliest} IS NOT NULL)"""


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _outside_transaction() -> AbstractContextManager[None]:
    """PostgreSQL: an autocommit block, as CONCURRENTLY needs; SQLite: the migration's
    own transaction."""
    return op.get_context().autocommit_block() if _postgresql() else nullcontext()


def upgrade() -> None:
    if _postgresql():
        for column in COLUMNS:
            op.execute(f"ALTER TABLE scan_event ADD COLUMN IF NOT EXISTS {column} TIMESTAMPTZ")
    else:
        with op.batch_alter_table("scan_event", schema=None) as batch_op:
            for column in COLUMNS:
                batch_op.add_column(sa.Column(column, sa.DateTime(timezone=True), nullable=True))
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
        if _postgresql():
            op.execute(
                _backfill(
                    "scan_event.occurred_at + interval '12 hours'",
                    "scan_event.occurred_at - interval '12 hours'",
                )
            )
        else:  # stored as 'YYYY-MM-DD HH:MM:SS.ffffff' (naive UTC): whole seconds moved,
            # the fraction kept as it is (SQLite would round .9995 and up to the next second)
            op.execute(
                _backfill(
                    "strftime('%Y-%m-%d %H:%M:%S', substr(scan_event.occurred_at, 1, 19),"
                    " '+12 hours') || substr(scan_event.occurred_at, 20)",
                    "strftime('%Y-%m-%d %H:%M:%S', substr(scan_event.occurred_at, 1, 19),"
                    " '-12 hours') || substr(scan_event.occurred_at, 20)",
                )
            )


def downgrade() -> None:
    with _outside_transaction():
        op.drop_index(NAME, table_name="scan_event", if_exists=True, postgresql_concurrently=True)
    with op.batch_alter_table("scan_event", schema=None) as batch_op:
        for column in reversed(COLUMNS):
            batch_op.drop_column(column)
