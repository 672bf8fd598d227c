"""Seq conflicts looked up by their events: quarantined_event.unsettled_event_id

A push storing events while its PDA had ``seq_conflict`` rejections not settled read
every one of them, and looked each one's id up among the events held, to find those
sent again under a new seq (README's recovery): a PDA left with 2,000 such rejections
paid it on every later push. A rejection and the event held are each stored once and
never change, so each pair needs comparing once, when the later of the two arrives:
a push compares the rejections it quarantines with the events held, and the events it
stores with the rejections naming them, found through ``ix_quarantined_event_unsettled``
by ``unsettled_event_id`` (the rejection's id read as a UUID, however the PDA wrote it).

Rejections kept before this version name no event there, and those of the version
before ``f5a1c7e3b9d4`` were never compared: each device with some not settled gets
``device_sync_state.seq_conflicts_compared`` false, and its next push storing events
compares them all with the events held, as the version before did on every push, and
names the event of each left unsettled. Nothing else is read here.

On PostgreSQL each column is added on its own and committed at once (``IF NOT
EXISTS``, nullable or a constant default: no rewrite), and the index is built
CONCURRENTLY, as ``32c6e05e447b`` says why (an INVALID index left by a failed build is
dropped and built again). Run again, the same end.

Revision ID: e9c3b7a5d1f2
Revises: e8c3a5f1b2d7
Create Date: 2026-12-20 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e9c3b7a5d1f2"
down_revision: str | None = "e8c3a5f1b2d7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

QUARANTINE = "quarantined_event"
EVENT_ID = "unsettled_event_id"
INDEX = "ix_quarantined_event_unsettled"
STATE = "device_sync_state"
COMPARED = "seq_conflicts_compared"
PARTIAL = f"{EVENT_ID} IS NOT NULL"


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _has(table: str, column: str) -> bool:
    return column in {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}


def upgrade() -> None:
    if _postgresql():
        with op.get_context().autocommit_block():
            op.execute(f"ALTER TABLE {QUARANTINE} ADD COLUMN IF NOT EXISTS {EVENT_ID} UUID")
            op.execute(
                f"ALTER TABLE {STATE} ADD COLUMN IF NOT EXISTS {COMPARED} "
                "BOOLEAN NOT NULL DEFAULT true"
            )
            if op.get_bind().scalar(
                sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
                {"n": INDEX},
            ):
                op.drop_index(INDEX, table_name=QUARANTINE, postgresql_concurrently=True)
            op.create_index(
                INDEX,
                QUARANTINE,
                ["device_id", EVENT_ID],
                unique=False,
                if_not_exists=True,
                postgresql_concurrently=True,
                postgresql_where=sa.text(PARTIAL),
            )
    else:
        if not _has(QUARANTINE, EVENT_ID):
            op.add_column(QUARANTINE, sa.Column(EVENT_ID, sa.Uuid(), nullable=True))
        if not _has(STATE, COMPARED):
            op.add_column(
                STATE,
                sa.Column(COMPARED, sa.Boolean(), nullable=False, server_default=sa.true()),
            )
        op.create_index(
            INDEX,
            QUARANTINE,
            ["device_id", EVENT_ID],
            unique=False,
            if_not_exists=True,
            sqlite_where=sa.text(PARTIAL),
        )
    op.execute(
        f"UPDATE {STATE} SET {COMPARED} = false WHERE unsettled_seq_conflicts > 0 AND {COMPARED}"
    )


def downgrade() -> None:
    if _postgresql():
        with op.get_context().autocommit_block():
            op.drop_index(
                INDEX, table_name=QUARANTINE, if_exists=True, postgresql_concurrently=True
            )
    else:
        op.drop_index(INDEX, table_name=QUARANTINE, if_exists=True)
    with op.batch_alter_table(STATE, schema=None) as batch_op:
        batch_op.drop_column(COMPARED)
    with op.batch_alter_table(QUARANTINE, schema=None) as batch_op:
        batch_op.drop_column(EVENT_ID)
