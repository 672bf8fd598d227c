"""Indexes for hot queries: a subject's flags, deliveries by time

Found by tests/courier_api/test_query_plans.py (EXPLAIN on PostgreSQL with a
realistic history): a parcel's flags of every kind (its proof's detail, its
shift's balance) were read with a Seq Scan of flag, and the auditors' proof search
by time with a Seq Scan of scan_event.

On PostgreSQL the indexes are built (and dropped) CONCURRENTLY: a plain CREATE
INDEX holds a SHARE lock on its table until it is built, and on a large scan_event
that would hold every push back for as long. CONCURRENTLY cannot run inside a
transaction, so each runs in an autocommit block: the migrations before it are
committed first, and a build that failed half-way leaves an INVALID index behind,
which running the upgrade again drops and builds anew. SQLite builds them plainly.

Revision ID: 32c6e05e447b
Revises: 48617d335743
Create Date: 2026-11-30 04:00:00.000000
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import sqlalchemy as sa
from alembic import op

revision: str = "32c6e05e447b"
down_revision: str | None = "48617d335743"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DELIVERY_PREDICATE = "type IN ('delivered', 'delivered_to_locker', 'delivered_to_pickup_point')"
# name -> (table, columns, partial index predicate)
INDEXES: dict[str, tuple[str, list[str], str | None]] = {
    "ix_flag_subject": ("flag", ["subject_type", "subject_key"], None),
    "ix_scan_event_delivery_time": ("scan_event", ["occurred_at"], DELIVERY_PREDICATE),
}


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _outside_transaction() -> AbstractContextManager[None]:
    """PostgreSQL: an autocommit block, as CONCURRENTLY needs; SQLite: the migration's
    own transaction."""
    return op.get_context().autocommit_block() if _postgresql() else nullcontext()


def upgrade() -> None:
    with _outside_transaction():
        for name, (table, columns, where) in INDEXES.items():
            if _postgresql() and op.get_bind().scalar(
                sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
                {"n": name},
            ):
                op.drop_index(name, table_name=table, postgresql_concurrently=True)
            predicate = {} if where is None else {"postgresql_where": sa.text(where)}
            if where is not None:
                predicate["sqlite_where"] = sa.text(where)
            op.create_index(
                name,
                table,
                columns,
                unique=False,
                if_not_exists=True,
                postgresql_concurrently=True,
                **predicate,
            )


def downgrade() -> None:
    with _outside_transaction():
        for name, (table, _, _) in reversed(INDEXES.items()):
            op.drop_index(name, table_name=table, if_exists=True, postgresql_concurrently=True)
