"""Flag decisions: a manager's latest decision on a flag and the events it covered

A rule flag judged again used to work out from its history whether a manager had
resolved it, and on which events, in three cases that each looked at it another
way; parcel rule flags did not at all, so an acknowledged or resolved flag could
end in another status depending on how the later events were batched (rule 3).
The flag now keeps the manager's latest decision (acknowledged or resolved) and
the event ids and images of its evidence at that moment (``sync.flags.
judged_status``).

Existing flags get theirs from their history where it says what the manager saw:
a flag still in the status a manager gave it, or closed by the system straight
from it (its evidence is as they left it), or a shift's flag opened on new events
with the events it was resolved on kept in its evidence (``resolved_on_event_ids``,
which goes). A flag the system opened on new events after a decision gets none:
what the manager saw is no longer known, as it was not before. An acknowledged
flag's evidence may have grown after the acknowledgement (nothing opened one on new
events then): the history cannot tell, and what it holds now is taken as seen.
The decided flags are read at once and updated one by one: a station's flags that
managers acted on, not every flag.

Revision ID: e4b7c1a9d352
Revises: 9b3e5a1c7d20
Create Date: 2026-12-02 12:40:00.000000
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "e4b7c1a9d352"
down_revision: str | None = "9b3e5a1c7d20"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
RESOLVED_ON = "resolved_on_event_ids"
SEEN = ("event_ids", "blobs")
DECISIONS = ("acknowledged", "resolved")
HANDOVER_KINDS = ("missing_at_handover", "not_on_manifest")

flag = sa.table(
    "flag",
    sa.column("id", sa.Integer),
    sa.column("kind", sa.String),
    sa.column("status", sa.String),
    sa.column("evidence", DOCUMENT),
    sa.column("decision", sa.String),
    sa.column("decided_on", DOCUMENT),
)
flag_change = sa.table(
    "flag_change",
    sa.column("id", sa.Integer),
    sa.column("flag_id", sa.Integer),
    sa.column("by_user_id", sa.Integer),
    sa.column("from_status", sa.String),
    sa.column("to_status", sa.String),
)


def upgrade() -> None:
    with op.batch_alter_table("flag", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "decision",
                sa.Enum(
                    "open",
                    "acknowledged",
                    "resolved",
                    "closed",
                    name="flag_decision",
                    native_enum=False,
                    create_constraint=True,
                    length=32,
                ),
                nullable=True,
            )
        )
        batch_op.add_column(sa.Column("decided_on", DOCUMENT, nullable=True))
    _fill_in_decisions(op.get_bind())


def _fill_in_decisions(connection: sa.Connection) -> None:
    by_person = (
        sa.select(flag_change.c.flag_id, sa.func.max(flag_change.c.id).label("change_id"))
        .where(flag_change.c.by_user_id.is_not(None))
        .group_by(flag_change.c.flag_id)
        .subquery()
    )
    latest = (
        sa.select(flag_change.c.flag_id, sa.func.max(flag_change.c.id).label("change_id"))
        .group_by(flag_change.c.flag_id)
        .subquery()
    )
    decided = flag_change.alias("decided")
    last = flag_change.alias("last")
    rows = connection.execute(
        sa.select(
            flag.c.id, flag.c.status, flag.c.evidence, decided.c.to_status, last.c.from_status
        )
        .join(by_person, by_person.c.flag_id == flag.c.id)
        .join(decided, decided.c.id == by_person.c.change_id)
        .join(latest, latest.c.flag_id == flag.c.id)
        .join(last, last.c.id == latest.c.change_id)
        .where(decided.c.to_status.in_(DECISIONS))
    ).all()
    for flag_id, status, evidence, decision, last_from in rows:
        evidence = evidence or {}
        seen = _seen(evidence)
        if status == "closed" and last_from == decision:
            pass  # closed straight from the decision: the evidence is what they saw
        elif status == "open" and decision == "resolved" and RESOLVED_ON in evidence:
            seen = {"event_ids": evidence[RESOLVED_ON]}
        elif status != decision:
            continue  # opened on new events since: what they saw is not known
        connection.execute(
            sa.update(flag).where(flag.c.id == flag_id).values(decision=decision, decided_on=seen)
        )
    _forget_resolved_on(connection)


def _seen(evidence: dict[str, Any]) -> dict[str, Any]:
    return {key: evidence[key] for key in SEEN if key in evidence}


def _forget_resolved_on(connection: sa.Connection) -> None:
    """Only a shift's own flags kept it (``missing_at_handover``, ``not_on_manifest``)."""
    for flag_id, evidence in connection.execute(
        sa.select(flag.c.id, flag.c.evidence).where(flag.c.kind.in_(HANDOVER_KINDS))
    ).all():
        if evidence and RESOLVED_ON in evidence:
            kept = {key: value for key, value in evidence.items() if key != RESOLVED_ON}
            connection.execute(sa.update(flag).where(flag.c.id == flag_id).values(evidence=kept))


def downgrade() -> None:
    with op.batch_alter_table("flag", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("ck_flag_flag_decision"), type_="check")
        batch_op.drop_column("decided_on")
        batch_op.drop_column("decision")
