"""Audit log filters: a subject's, an action's, a user's entries and a time range

``GET /api/v1/audit`` lists the log newest first, filtered by subject, action, actor
and time. The log had its primary key only: on PostgreSQL, with a year of entries
(tests/courier_api/test_query_plans.py), a subject's entries (who read proof 1042,
what happened to shift 42), a day's of a year ago and a rare action's (the rejudge
runs) were read with a Seq Scan of the whole log, or by walking it all backwards
along the primary key. Each filter gets an index that gives its entries newest first.

Built and dropped CONCURRENTLY on PostgreSQL, as ``32c6e05e447b`` says why (appends
to the log would wait for a plain build; an INVALID index left by a failed build is
dropped and built again); SQLite builds them plainly.

Revision ID: 7a3c9e5b1d08
Revises: 6060e871ab1f
Create Date: 2026-12-03 18:50:00.000000
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import sqlalchemy as sa
from alembic import op

revision: str = "7a3c9e5b1d08"
down_revision: str | None = "6060e871ab1f"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "audit_entry"
INDEXES: dict[str, list[str]] = {
    "ix_audit_entry_subject": ["subject_type", "subject_key", "id"],
    "ix_audit_entry_action": ["action", "id"],
    "ix_audit_entry_actor": ["actor_id", "id"],
    "ix_audit_entry_at": ["at"],
}


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _outside_transaction() -> AbstractContextManager[None]:
    """PostgreSQL: an autocommit block, as CONCURRENTLY needs; SQLite: the migration's
    own transaction."""
    return op.get_context().autocommit_block() if _postgresql() else nullcontext()


def upgrade() -> None:
    with _outside_transaction():
        for name, columns in INDEXES.items():
            if _postgresql() and op.get_bind().scalar(
                sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
                {"n": name},
            ):
                op.drop_index(name, table_name=TABLE, postgresql_concurrently=True)
            op.create_index(
                name,
                TABLE,
                columns,
                unique=False,
                if_not_exists=True,
                postgresql_concurrently=True,
            )


def downgrade() -> None:
    with _outside_transaction():
        for name in reversed(INDEXES):
            op.drop_index(name, table_name=TABLE, if_exists=True, postgresql_concurrently=True)
