"""Lost seqs written off: device_sync_state.written_off_ranges and seq_write_off

A PDA that lost its storage (a reset, a broken flash) leaves its lost seqs in its
device's missing ranges for good: ``acked_through_seq`` never passes the first of them
again, so a PDA that prunes only up to it never prunes again. A manager now writes
them off (``POST /devices/<id>/lost-seqs``, ``sync.lost_seqs``): the device's sync
state keeps the seqs still written off beside its missing ranges, and ``seq_write_off``
who wrote which ranges off, when and why, for the balances of the shifts they cover.

No backfill: the column is NULL (no write-off) on every existing device.

On PostgreSQL an upgrade stopped anywhere runs again to the end (``courier-api db
upgrade``), as ``3b6129cf67c6`` does:

* the column is added on its own and committed at once (``IF NOT EXISTS``): its
  ACCESS EXCLUSIVE lock on ``device_sync_state``, which every push waits for, is held
  for the catalog change alone;
* the table is created if it is not there yet, committed on its own;
* its index is built CONCURRENTLY (new code may write the table meanwhile); an
  INVALID one left by a failed build is dropped and built again.

SQLite does it all in the upgrade's one transaction (``batch_alter_table``): a failed
upgrade is rolled back whole, and runs again from the start.

Revision ID: a7d3e9f1c5b2
Revises: 9d4f2b7c1e63
Create Date: 2026-12-07 09:00:00.000000
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "a7d3e9f1c5b2"
down_revision: str | None = "9d4f2b7c1e63"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATE = "device_sync_state"
TABLE = "seq_write_off"
NAME = "ix_seq_write_off_device"
DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _outside_transaction() -> AbstractContextManager[None]:
    """PostgreSQL: an autocommit block, as CONCURRENTLY needs; SQLite: the migration's
    own transaction."""
    return op.get_context().autocommit_block() if _postgresql() else nullcontext()


def _create_table() -> None:
    op.create_table(
        TABLE,
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("station_id", sa.Integer(), nullable=False),
        sa.Column("ranges", DOCUMENT, nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("written_off_by", sa.Integer(), nullable=False),
        sa.Column("written_off_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["device.id"], name=op.f("fk_seq_write_off_device_id_device")
        ),
        sa.ForeignKeyConstraint(
            ["station_id"], ["station.id"], name=op.f("fk_seq_write_off_station_id_station")
        ),
        sa.ForeignKeyConstraint(
            ["written_off_by"],
            ["app_user.id"],
            name=op.f("fk_seq_write_off_written_off_by_app_user"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_seq_write_off")),
        if_not_exists=True,
    )


def upgrade() -> None:
    if _postgresql():
        _upgrade_postgresql()
        return
    with op.batch_alter_table(STATE, schema=None) as batch_op:
        batch_op.add_column(sa.Column("written_off_ranges", DOCUMENT, nullable=True))
    _create_table()
    op.create_index(NAME, TABLE, ["device_id", "id"], unique=False, if_not_exists=True)


def _upgrade_postgresql() -> None:
    """Each statement its own transaction (an autocommit block, as CONCURRENTLY needs
    anyway), each one done again harmlessly when the upgrade runs again."""
    with op.get_context().autocommit_block():
        op.execute(f"ALTER TABLE {STATE} ADD COLUMN IF NOT EXISTS written_off_ranges JSONB")
        _create_table()
        if op.get_bind().scalar(
            sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
            {"n": NAME},
        ):
            op.drop_index(NAME, table_name=TABLE, postgresql_concurrently=True)
        op.create_index(
            NAME,
            TABLE,
            ["device_id", "id"],
            unique=False,
            if_not_exists=True,
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with _outside_transaction():
        op.drop_index(NAME, table_name=TABLE, if_exists=True, postgresql_concurrently=True)
    op.drop_table(TABLE)
    with op.batch_alter_table(STATE, schema=None) as batch_op:
        batch_op.drop_column("written_off_ranges")
