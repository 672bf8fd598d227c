"""Seq conflicts are settled by their events sent again: quarantined_event.resent_seq

A PDA that numbered from 1 again (a reboot, a reset) has its events rejected
``seq_conflict``; README's recovery sends each again under a new seq, the same event
otherwise, and the server then holds it. The rejection is settled then: its quarantine
row names the seq the event is held under (``resent_seq``) and the ``seq_conflict``
flag of its seq is closed once every event refused that seq is held, pushed by the
courier who pushed the event holding the seq (``sync.ingest``). A push looks for
such events only while its device has unsettled ``seq_conflict`` rejections
(``device_sync_state.unsettled_seq_conflicts``), so a PDA without any pays no
statement for it.

Rows kept before this version are all counted unsettled, per device: the device's next
push storing events looks them up among the events it holds, settles those sent again
already (and closes their flags, on the audit log), and keeps the count of the rest.
Nothing else is read here: only the devices with ``seq_conflict`` rejections are
updated, in one statement.

On PostgreSQL each column is added on its own and committed at once (``IF NOT
EXISTS``, nullable or a constant default: no rewrite), so the ACCESS EXCLUSIVE locks
pushes wait for are held for the catalog change alone. Run again, the same end (on
either backend, a column is added only where it is not there yet).

Revision ID: f5a1c7e3b9d4
Revises: f4a8c2e6b1d3
Create Date: 2026-12-17 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "f5a1c7e3b9d4"
down_revision: str | None = "f4a8c2e6b1d3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

QUARANTINE = "quarantined_event"
RESENT = "resent_seq"
STATE = "device_sync_state"
UNSETTLED = "unsettled_seq_conflicts"


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _has(table: str, column: str) -> bool:
    return column in {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}


def upgrade() -> None:
    if _postgresql():
        with op.get_context().autocommit_block():
            op.execute(f"ALTER TABLE {QUARANTINE} ADD COLUMN IF NOT EXISTS {RESENT} INTEGER")
            op.execute(
                f"ALTER TABLE {STATE} ADD COLUMN IF NOT EXISTS {UNSETTLED} "
                "INTEGER NOT NULL DEFAULT 0"
            )
    else:
        if not _has(QUARANTINE, RESENT):
            op.add_column(QUARANTINE, sa.Column(RESENT, sa.Integer(), nullable=True))
        if not _has(STATE, UNSETTLED):
            op.add_column(
                STATE, sa.Column(UNSETTLED, sa.Integer(), nullable=False, server_default="0")
            )
    op.execute(
        f"UPDATE {STATE} SET {UNSETTLED} = (SELECT count(*) FROM {QUARANTINE} q "
        f"WHERE q.device_id = {STATE}.device_id AND q.error_code = 'seq_conflict' "
        f"AND q.{RESENT} IS NULL) "
        f"WHERE EXISTS (SELECT 1 FROM {QUARANTINE} q WHERE q.device_id = {STATE}.device_id "
        f"AND q.error_code = 'seq_conflict' AND q.{RESENT} IS NULL)"
    )


def downgrade() -> None:
    with op.batch_alter_table(STATE, schema=None) as batch_op:
        batch_op.drop_column(UNSETTLED)
    with op.batch_alter_table(QUARANTINE, schema=None) as batch_op:
        batch_op.drop_column(RESENT)
