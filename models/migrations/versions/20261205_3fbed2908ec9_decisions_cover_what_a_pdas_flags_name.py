"""Flag decisions cover what a PDA's flags name

A manager's decision on a flag covered its events and missing images only
(``decided_on``): a PDA's ``clock_jump`` names its events by the PDA's ids for them,
a ``wrong_shift`` by seqs, a ``stale_device`` the silence it is about (its shift and
the PDA's last push), so a decision on one covered nothing in particular, and the
flag stayed resolved whatever the PDA did next. A decided flag raised again on more
than its decision covered now opens again (``sync.flags.raise_flag``), and a decision
records what these name too (``sync.flags.SEEN``).

A flag still in the status a manager gave it gets what its evidence names now as
covered: for a ``stale_device`` that is the silence it was resolved on (a later one
opened it again); a ``clock_jump`` or ``wrong_shift`` may have taken more events
since the decision, and the evidence cannot tell which: what it holds now is taken
as seen, as it was. No schema change; the downgrade leaves the keys, which the
earlier code does not read.

Revision ID: 3fbed2908ec9
Revises: f3e9a7c1b254
Create Date: 2026-12-05 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "3fbed2908ec9"
down_revision: str | None = "f3e9a7c1b254"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
NOW_SEEN = ("client_event_ids", "seqs", "device_seqs", "shift_id", "last_push_at")
DECISIONS = ("acknowledged", "resolved")

flag = sa.table(
    "flag",
    sa.column("id", sa.Integer),
    sa.column("status", sa.String),
    sa.column("evidence", DOCUMENT),
    sa.column("decision", sa.String),
    sa.column("decided_on", DOCUMENT),
)


def upgrade() -> None:
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(flag.c.id, flag.c.evidence, flag.c.decided_on).where(
            flag.c.status.in_(DECISIONS), flag.c.decision == flag.c.status
        )
    ).all()
    for flag_id, evidence, decided_on in rows:
        if decided_on is None:  # what the manager saw is not known (a JSON null too)
            continue
        named = {
            key: evidence[key]
            for key in NOW_SEEN
            if key in (evidence or {}) and key not in decided_on
        }
        if named:
            connection.execute(
                sa.update(flag)
                .where(flag.c.id == flag_id)
                .values(decided_on={**decided_on, **named})
            )


def downgrade() -> None:
    pass
