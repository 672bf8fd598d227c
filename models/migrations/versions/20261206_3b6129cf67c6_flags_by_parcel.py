"""Flags by parcel: flag.tracking_no, and the index the queue reads a parcel's flags by

An auditor settling a dispute about a lost parcel asks for its flags: there is no
delivery, so no proof page lists them, and ``GET /flags`` could not filter by parcel.
A parcel's flags are its own (subject ``parcel``, its tracking number) and those of
its handovers (subject ``shift``, ``<shift id>:<tracking no>``), whose subject key only
ends with the number: no index on the subject finds them. A flag now keeps the
parcel it is about (``models.flag.parcel_of``; set on every insert from its subject),
and ``ix_flag_tracking_no`` gives a parcel's flags as the queue lists them.

Existing flags get theirs from their subject: a parcel's key, or what follows the
colon of a handover's (``strpos`` on PostgreSQL, ``instr`` on SQLite). The backfill
writes only the flags that have none yet: what it computes is what running code sets
on insert, and a flag it has filled is not written again.

On PostgreSQL nothing holds ``flag`` for longer than a moment, and an upgrade stopped
anywhere runs again (``courier-api db upgrade``) to the end:

* the column is added on its own and committed at once (``IF NOT EXISTS``): its
  ACCESS EXCLUSIVE lock, which every read and push of a flag waits for, is held for
  the catalog change alone;
* the backfill runs after it, in batches of at most ``BATCH`` flags by id, each
  committed on its own (a moment's row locks);
* the index is built CONCURRENTLY, as ``32c6e05e447b`` says why; an INVALID one left
  by a failed build is dropped and built again.

SQLite adds the column with ``batch_alter_table`` and fills it in one statement, all
in the upgrade's one transaction: a failed upgrade is rolled back whole, and runs
again from the start.

Revision ID: 3b6129cf67c6
Revises: 5c8d2e7a4f16
Create Date: 2026-12-06 09:00:00.000000
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import sqlalchemy as sa
from alembic import op

revision: str = "3b6129cf67c6"
down_revision: str | None = "5c8d2e7a4f16"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "flag"
NAME = "ix_flag_tracking_no"
BATCH = 10_000  # flags per backfill statement (PostgreSQL), each its own transaction
BACKFILL = """UPDATE flag
    SET tracking_no = CASE WHEN subject_type = 'parcel' THEN subject_key
        ELSE substr(subject_key, {find}(subject_key, ':') + 1) END
    WHERE tracking_no IS NULL AND (subject_type = 'parcel'
        OR (subject_type = 'shift' AND {find}(subject_key, ':') > 0))"""


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _outside_transaction() -> AbstractContextManager[None]:
    """PostgreSQL: an autocommit block, as CONCURRENTLY needs; SQLite: the migration's
    own transaction."""
    return op.get_context().autocommit_block() if _postgresql() else nullcontext()


def upgrade() -> None:
    if _postgresql():
        _upgrade_postgresql()
        return
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.add_column(sa.Column("tracking_no", sa.String(length=40), nullable=True))
    op.execute(BACKFILL.format(find="instr"))
    op.create_index(
        NAME, TABLE, ["tracking_no", "opened_at", "id"], unique=False, if_not_exists=True
    )


def _upgrade_postgresql() -> None:
    """Each statement its own transaction (an autocommit block, as CONCURRENTLY needs
    anyway), each one done again harmlessly when the upgrade runs again."""
    with op.get_context().autocommit_block():
        op.execute("ALTER TABLE flag ADD COLUMN IF NOT EXISTS tracking_no VARCHAR(40)")
        _fill_in_batches(BACKFILL.format(find="strpos"))
        if op.get_bind().scalar(
            sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
            {"n": NAME},
        ):
            op.drop_index(NAME, table_name=TABLE, postgresql_concurrently=True)
        op.create_index(
            NAME,
            TABLE,
            ["tracking_no", "opened_at", "id"],
            unique=False,
            if_not_exists=True,
            postgresql_concurrently=True,
        )


def _fill_in_batches(update: str) -> None:
    """``update`` (an UPDATE of ``flag`` ending in its WHERE clause) over consecutive
    runs of at most ``BATCH`` flags by id, each in a transaction of its own (autocommit):
    the row locks of one run are held while it runs. The last run is open-ended, so that
    it takes the flags inserted since the first."""
    bind = op.get_bind()
    after = bind.scalar(sa.text("SELECT min(id) - 1 FROM flag"))
    while after is not None:
        through = bind.scalar(
            sa.text("SELECT id FROM flag WHERE id > :after ORDER BY id OFFSET :skip LIMIT 1"),
            {"after": after, "skip": BATCH - 1},
        )
        if through is None:
            bind.execute(sa.text(f"{update} AND id > :after"), {"after": after})
        else:
            bind.execute(
                sa.text(f"{update} AND id > :after AND id <= :through"),
                {"after": after, "through": through},
            )
        after = through


def downgrade() -> None:
    with _outside_transaction():
        op.drop_index(NAME, table_name=TABLE, if_exists=True, postgresql_concurrently=True)
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_column("tracking_no")
