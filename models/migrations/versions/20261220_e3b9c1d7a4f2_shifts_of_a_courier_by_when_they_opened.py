"""Shifts of a courier by when they opened: where the courier of a dead PDA's shift went

A shift still open names where its courier went on (``sync.balances.
where_couriers_went``, on the board, a shift's page and its balance, and a sign-off's
refusal): their shifts opened since on another PDA, and their other shifts still open.
It read every shift the courier ever worked at the station through
``ix_shift_courier_id`` (one a day: some 300 a year, for each such shift on each
board). ``ix_shift_courier_status_opened`` reads only their shifts still open, however
old, and those handed over (closed or signed off) opened since; it also serves what
``ix_shift_courier_id`` served (its leading column), which is dropped.

Built and dropped CONCURRENTLY on PostgreSQL, as ``32c6e05e447b`` says why (an
INVALID index left by a failed build is dropped and built again); SQLite builds
them plainly.

Revision ID: e3b9c1d7a4f2
Revises: e9c3b7a5d1f2
Create Date: 2026-12-20 09:00:00.000000
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import sqlalchemy as sa
from alembic import op

revision: str = "e3b9c1d7a4f2"
down_revision: str | None = "e9c3b7a5d1f2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "shift"
NAME = "ix_shift_courier_status_opened"
REPLACED = "ix_shift_courier_id"


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _outside_transaction() -> AbstractContextManager[None]:
    """PostgreSQL: an autocommit block, as CONCURRENTLY needs; SQLite: the migration's
    own transaction."""
    return op.get_context().autocommit_block() if _postgresql() else nullcontext()


def _build(name: str, columns: list[str]) -> None:
    if _postgresql() and op.get_bind().scalar(
        sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
        {"n": name},
    ):
        op.drop_index(name, table_name=TABLE, postgresql_concurrently=True)
    op.create_index(
        name, TABLE, columns, unique=False, if_not_exists=True, postgresql_concurrently=True
    )


def upgrade() -> None:
    with _outside_transaction():
        _build(NAME, ["courier_id", "status", "opened_at"])
        op.drop_index(REPLACED, table_name=TABLE, if_exists=True, postgresql_concurrently=True)


def downgrade() -> None:
    with _outside_transaction():
        _build(REPLACED, ["courier_id"])
        op.drop_index(NAME, table_name=TABLE, if_exists=True, postgresql_concurrently=True)
