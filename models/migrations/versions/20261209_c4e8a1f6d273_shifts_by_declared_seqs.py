"""Shifts by their declared seqs: a PDA's sign-in without reading its history

A PDA's sign-in (and each refresh of its tokens, hourly by default) answers
``device_max_seq``: the highest seq the server holds of it, or one its shifts declared
(a ``last_seq``, the seq before a ``first_seq``), if higher
(``sync.device_state.held_max_seq``). It took the maximum over all of the device's
shifts through ``ix_shift_device_opened``: one a day, so a PDA in its third year read
a thousand shifts at every sign-in, more each day. These two indexes give each
maximum as the last entry of the device's range: one entry, however many shifts.

Built and dropped CONCURRENTLY on PostgreSQL, as ``32c6e05e447b`` says why (an
INVALID index left by a failed build is dropped and built again); SQLite builds
them plainly.

Revision ID: c4e8a1f6d273
Revises: effb064af2ab
Create Date: 2026-12-09 09:00:00.000000
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import sqlalchemy as sa
from alembic import op

revision: str = "c4e8a1f6d273"
down_revision: str | None = "effb064af2ab"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "shift"
INDEXES = {
    "ix_shift_device_last_seq": ["device_id", "last_seq"],
    "ix_shift_device_first_seq": ["device_id", "first_seq"],
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
