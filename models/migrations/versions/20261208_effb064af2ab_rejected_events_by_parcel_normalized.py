"""Rejected events by parcel, normalized: quarantined_event.parcel_tracking_no

A rejected event was found by parcel (``GET /api/v1/quarantine?tracking_no=``, a
proof's page and detail, a shift's page, the board's counts, what reopens a signed-off
shift) only where the PDA wrote the number exactly as asked for or in its normalized
form, ``ix_quarantined_event_tracking_no`` on the number as written. Pages ask with the
number as stored (normalized), so a rejected event whose PDA wrote ``rr 4731 2482 9gb``
or ``RR-473124829-GB`` was found by none of them: and a rejected event is where a badly
typed number is likely, an auditor settling a dispute missed the PDA's attempt. A
rejected event now keeps the parcel it names, normalized as parcels' numbers are stored
(``sync.quarantine.parcel_named``, set on insert), and ``ix_quarantined_event_parcel``
gives a parcel's newest first; it replaces the index on the number as written, which
nothing reads by any more (the number as written is kept, and shown, as before).

Existing rows get theirs from the number they kept as written: the same normalization
in Python (``_parcel_named``, a copy of ``sync.quarantine.parcel_named`` and of
``sync.tracking.normalize`` as they are at this revision: NFKC, no white space or
dashes, upper case). SQL cannot say it alike on both backends (NFKC; Unicode white
space; SQLite's ``upper`` is ASCII's only), so rows are read and written back in
batches of at most ``BATCH`` by id. Only rows that have none yet are written: what it
computes is what running code sets on insert, and a row it filled is not written again.

On PostgreSQL nothing holds ``quarantined_event`` (which every push quarantining an
event inserts into) for longer than a moment, and an upgrade stopped anywhere runs
again (``courier-api db upgrade``) to the end:

* the column is added on its own and committed at once (``IF NOT EXISTS``);
* the backfill runs after it, one UPDATE per batch (its numbers as one array), each
  committed on its own; the batches go on until no row is left, so they take the rows
  quarantined since the first (rows the version before quarantines after the last, in
  the minutes of the rollout, keep none: they are listed by station and device as
  before, not by parcel);
* the index is built CONCURRENTLY, as ``32c6e05e447b`` says why (an INVALID one left by
  a failed build is dropped and built again), and only then the old one dropped,
  CONCURRENTLY too.

SQLite adds the column with ``batch_alter_table`` and fills it in the upgrade's one
transaction: a failed upgrade is rolled back whole, and runs again from the start.

Revision ID: effb064af2ab
Revises: a7d3e9f1c5b2
Create Date: 2026-12-08 09:00:00.000000
"""

import re
import unicodedata
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import sqlalchemy as sa
from alembic import op

revision: str = "effb064af2ab"
down_revision: str | None = "a7d3e9f1c5b2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "quarantined_event"
NAME = "ix_quarantined_event_parcel"
COLUMNS = ["parcel_tracking_no", "id"]
OLD_NAME = "ix_quarantined_event_tracking_no"  # the number as the PDA wrote it
OLD_COLUMNS = ["tracking_no", "id"]
LENGTH = 40  # the column's
BATCH = 10_000  # rows per backfill statement (PostgreSQL), each its own transaction
UNFILLED = sa.text(
    "SELECT id, tracking_no FROM quarantined_event WHERE id > :after "
    "AND tracking_no IS NOT NULL AND parcel_tracking_no IS NULL ORDER BY id LIMIT :batch"
)
FILL_POSTGRESQL = sa.text(
    "UPDATE quarantined_event AS q SET parcel_tracking_no = v.parcel "
    "FROM unnest(CAST(:ids AS BIGINT[]), CAST(:parcels AS VARCHAR[])) AS v (id, parcel) "
    "WHERE q.id = v.id AND q.parcel_tracking_no IS NULL"
)
FILL_SQLITE = sa.text(
    "UPDATE quarantined_event SET parcel_tracking_no = :parcel "
    "WHERE id = :id AND parcel_tracking_no IS NULL"
)


def _normalize(tracking_no: str) -> str:
    """``sync.tracking.normalize`` at this revision (a frozen copy)."""
    return re.sub(r"[\s-]", "", unicodedata.normalize("NFKC", tracking_no)).upper()


def _parcel_named(tracking_no: str | None) -> str | None:
    """``sync.quarantine.parcel_named`` at this revision (a frozen copy)."""
    if tracking_no is None:
        return None
    parcel = _normalize(tracking_no)
    if not parcel or len(parcel) > LENGTH:
        return None
    if any(ch == "\x00" or "\ud800" <= ch <= "\udfff" for ch in parcel):
        return None
    return parcel


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
        batch_op.add_column(sa.Column("parcel_tracking_no", sa.String(length=LENGTH)))
    _fill_in_batches(postgresql=False)
    op.create_index(NAME, TABLE, COLUMNS, unique=False, if_not_exists=True)
    op.drop_index(OLD_NAME, table_name=TABLE, if_exists=True)


def _upgrade_postgresql() -> None:
    """Each statement its own transaction (an autocommit block, as CONCURRENTLY needs
    anyway), each one done again harmlessly when the upgrade runs again."""
    with op.get_context().autocommit_block():
        op.execute(
            f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS parcel_tracking_no VARCHAR({LENGTH})"
        )
        _fill_in_batches(postgresql=True)
        _build_concurrently(NAME, COLUMNS)
        op.drop_index(OLD_NAME, table_name=TABLE, if_exists=True, postgresql_concurrently=True)


def _build_concurrently(name: str, columns: list[str]) -> None:
    """The index built CONCURRENTLY, an INVALID one a failed build left dropped first."""
    if op.get_bind().scalar(
        sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
        {"n": name},
    ):
        op.drop_index(name, table_name=TABLE, postgresql_concurrently=True)
    op.create_index(
        name, TABLE, columns, unique=False, if_not_exists=True, postgresql_concurrently=True
    )


def _fill_in_batches(*, postgresql: bool) -> None:
    """Every row keeping a number as written and no parcel yet gets ``_parcel_named`` of
    it, ``BATCH`` rows by id at a time: on PostgreSQL one UPDATE each, committed as it
    runs (autocommit). Until a read finds no row left, so that it takes the rows
    inserted since the first."""
    bind = op.get_bind()
    after = bind.scalar(sa.text(f"SELECT min(id) - 1 FROM {TABLE}"))
    while after is not None:
        rows = bind.execute(UNFILLED, {"after": after, "batch": BATCH}).all()
        if not rows:
            return
        named = [(row_id, _parcel_named(written)) for row_id, written in rows]
        filled = [(row_id, parcel) for row_id, parcel in named if parcel is not None]
        if filled and postgresql:
            ids, parcels = zip(*filled, strict=True)
            bind.execute(FILL_POSTGRESQL, {"ids": list(ids), "parcels": list(parcels)})
        elif filled:
            bind.execute(FILL_SQLITE, [{"id": i, "parcel": p} for i, p in filled])
        after = rows[-1][0]


def downgrade() -> None:
    if _postgresql():
        with op.get_context().autocommit_block():
            _build_concurrently(OLD_NAME, OLD_COLUMNS)
            op.drop_index(NAME, table_name=TABLE, if_exists=True, postgresql_concurrently=True)
    else:
        op.create_index(OLD_NAME, TABLE, OLD_COLUMNS, unique=False, if_not_exists=True)
        op.drop_index(NAME, table_name=TABLE, if_exists=True)
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_column("parcel_tracking_no")
