"""Flags keep when they last opened: flag.opened_at, and the queue reads by it

The flag queue listed flags newest first by id, the order they were first raised: a
flag opened again (a manager's decision on a PDA's ``clock_jump`` that a later jump
went beyond, a handover flag a late batch raised again) stayed where it was first
raised, below a week of newer ones, at 19:00. A flag now keeps when it last became
open (``sync.flags._record``), and the queue lists the latest opened first.

Existing flags get the time of their latest change to open after their raising (their
``flag_change`` history), else when they were raised. The column is added NOT NULL
with a constant default (``UNFILLED``: no flag opened then) that marks the flags the
backfill has not filled yet; it writes only those, so a flag that running code raised
or opened again meanwhile keeps the time the code gave it.

On PostgreSQL nothing holds ``flag`` for longer than a moment, and an upgrade stopped
anywhere runs again (``courier-api db upgrade``) to the end:

* the column is added on its own and committed at once (``IF NOT EXISTS``): its
  ACCESS EXCLUSIVE lock, which every read and push of a flag waits for, is held for
  the catalog change alone (a constant default fills no row);
* the backfill runs after it, in batches of at most ``BATCH`` flags by id, each
  committed on its own (a moment's row locks), then the default is dropped (the
  models set the column on every insert) and a last pass fills any flag the version
  before inserted with the default meanwhile;
* the index is built CONCURRENTLY, as ``32c6e05e447b`` says why; an INVALID one left
  by a failed build is dropped and built again.

SQLite adds the column by copying the table (``batch_alter_table``) and fills it in
one statement, all in the upgrade's one transaction: a failed upgrade is rolled back
whole, and runs again from the start. It keeps the default.

Revision ID: 5c8d2e7a4f16
Revises: 3fbed2908ec9
Create Date: 2026-12-05 10:00:00.000000
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import sqlalchemy as sa
from alembic import op

revision: str = "5c8d2e7a4f16"
down_revision: str | None = "3fbed2908ec9"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "flag"
NAME = "ix_flag_station_opened"
UNFILLED = "'2000-01-01 00:00:00+00:00'"  # the default: a flag the backfill has not filled
BATCH = 10_000  # flags per backfill statement (PostgreSQL), each its own transaction
BACKFILL = f"""UPDATE flag
    SET opened_at = COALESCE(
        (SELECT max(flag_change.at) FROM flag_change
            WHERE flag_change.flag_id = flag.id
            AND flag_change.to_status = 'open'
            AND flag_change.from_status IS NOT NULL),
        raised_at)
    WHERE opened_at = {UNFILLED}"""


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
        batch_op.add_column(
            sa.Column(
                "opened_at",
                sa.DateTime(timezone=True),
                nullable=False,
                server_default=sa.text(UNFILLED),
            )
        )
    op.execute(BACKFILL)
    op.create_index(
        NAME, TABLE, ["station_id", "opened_at", "id"], unique=False, if_not_exists=True
    )


def _upgrade_postgresql() -> None:
    """Each statement its own transaction (an autocommit block, as CONCURRENTLY needs
    anyway), each one done again harmlessly when the upgrade runs again."""
    with op.get_context().autocommit_block():
        op.execute(
            "ALTER TABLE flag ADD COLUMN IF NOT EXISTS opened_at TIMESTAMP WITH TIME ZONE "
            f"NOT NULL DEFAULT {UNFILLED}"
        )
        _fill_in_batches(BACKFILL)
        op.execute("ALTER TABLE flag ALTER COLUMN opened_at DROP DEFAULT")
        _fill_in_batches(BACKFILL)  # what the version before inserted meanwhile
        if op.get_bind().scalar(
            sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
            {"n": NAME},
        ):
            op.drop_index(NAME, table_name=TABLE, postgresql_concurrently=True)
        op.create_index(
            NAME,
            TABLE,
            ["station_id", "opened_at", "id"],
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
        batch_op.drop_column("opened_at")
