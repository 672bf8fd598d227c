"""Write-offs remember the highest seq held then: device_sync_state.held_at_write_off

A PDA that sent its newer scans before older ones (a newest-first queue, a batch that
got through while an earlier one timed out), whose older seqs a manager then wrote off
as lost, was told by the next receipt (and the write-off's own answer) to prune through
its newer scans, the older ones still unsent on it: ``acked_through_seq`` passed seqs
written off below any seq the server held. It now passes them only below a seq held
above the highest held at the write-off (``sync.acks.acknowledged_through``): one that
came after it, such as a reset PDA's next event. And it never goes below the device's
acknowledgement so far (its ``acked_through_seq``, read as the floor).

The column is 0 on existing rows, save those of devices with seqs written off: a
write-off made before this version was judged by the rule before, so a PDA only out of
range that had sent newer scans before its older ones written off (and has not pushed
since: it was offline at the upgrade) would still be told by its first receipt back to
prune them. Its ``held_at_write_off`` is the highest seq held now (whether a seq held
came after the write-off is not known here: taken as before it), and its stored
``acked_through_seq``, read as the floor, comes down to the rule's (it passes no seq
written off below the highest held, nor, as versions before ``6280097`` stored it,
above). A reset PDA whose next events already came is acknowledged again past its
written-off seqs by its next push (numbered on, above the highest held); a lower
acknowledgement meanwhile has it keep copies it may delete, never delete one. Only
rows with write-offs are read (few: a device with lost seqs); each is read and updated
by key, and the rule is computed here, not imported.

On PostgreSQL the column is added on its own and committed at once (``IF NOT
EXISTS``, a constant default: no rewrite), so the ACCESS EXCLUSIVE lock every push
waits for is held for the catalog change alone; the rows are then updated in their
own transaction. Run again, the same end (on either backend, the column is added only
where it is not there yet).

Revision ID: c8f2a4d6e1b9
Revises: e8c2a6f4d1b7
Create Date: 2026-12-16 09:00:00.000000
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "c8f2a4d6e1b9"
down_revision: str | None = "e8c2a6f4d1b7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATE = "device_sync_state"
COLUMN = "held_at_write_off"
DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
_states = sa.table(
    STATE,
    sa.column("device_id", sa.String()),
    sa.column("max_seq", sa.BigInteger()),
    sa.column("missing_ranges", DOCUMENT),
    sa.column("written_off_ranges", DOCUMENT),
    sa.column("acked_through_seq", sa.BigInteger()),
    sa.column(COLUMN, sa.BigInteger()),
)


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    if _postgresql():
        with op.get_context().autocommit_block():
            op.execute(
                f"ALTER TABLE {STATE} ADD COLUMN IF NOT EXISTS {COLUMN} BIGINT NOT NULL DEFAULT 0"
            )
    elif COLUMN not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns(STATE)}:
        with op.batch_alter_table(STATE, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column(COLUMN, sa.Integer(), nullable=False, server_default="0")
            )
    _bring_down_acknowledgements()


def _bring_down_acknowledgements() -> None:
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(
            _states.c.device_id,
            _states.c.max_seq,
            _states.c.missing_ranges,
            _states.c.written_off_ranges,
            _states.c.acked_through_seq,
        ).where(_states.c.written_off_ranges.is_not(None), _states.c[COLUMN] == 0)
    ).all()
    for row in rows:
        missing, written_off = row.missing_ranges or [], row.written_off_ranges or []
        if not written_off:
            continue
        held = _highest_held(row.max_seq or 0, missing, written_off)
        acked = _acknowledged(row.max_seq or 0, missing, written_off)
        connection.execute(
            sa.update(_states)
            .where(_states.c.device_id == row.device_id)
            .values({COLUMN: held, "acked_through_seq": min(row.acked_through_seq or 0, acked)})
        )


def _highest_held(max_seq: int, missing: list[Any], written_off: list[Any]) -> int:
    """``sync.acks.highest_held``: the highest seq neither missing nor written off."""
    highest = max_seq
    for first, last in sorted(
        ((int(r[0]), int(r[1])) for r in [*missing, *written_off]), reverse=True
    ):
        if first <= highest <= last:
            highest = first - 1
    return max(highest, 0)


def _acknowledged(max_seq: int, missing: list[Any], written_off: list[Any]) -> int:
    """What ``sync.acks.acknowledged_through`` makes of a device's seqs when its
    ``held_at_write_off`` is its highest seq held: held or written off without a gap, and
    no further than the first seq written off."""
    acked = int(missing[0][0]) - 1 if missing else max_seq
    return max(min(acked, min(int(r[0]) for r in written_off) - 1), 0)


def downgrade() -> None:
    with op.batch_alter_table(STATE, schema=None) as batch_op:
        batch_op.drop_column(COLUMN)
