"""Parcels keep when their recipient refused a consent request

A recipient with a standing consent who answers a courier's request for this parcel
"no, ring the bell" has withdrawn it for this parcel; a drop after the refusal was
judged authorized by the standing consent, and nothing on the proof said otherwise.
The parcel now keeps its refusals' times (a JSON list of ISO times, oldest first),
read with the parcel wherever its consents are judged. Existing refusals are copied
from the consent requests; run ``courier-api rejudge`` after the upgrade.

Revision ID: f3e9a7c1b254
Revises: d2a6f0c3b817
Create Date: 2026-12-04 00:10:00.000000
"""

import datetime as dt
from collections import defaultdict
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "f3e9a7c1b254"
down_revision: str | None = "d2a6f0c3b817"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("parcel", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "consent_refusals",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            )
        )
    bind = op.get_bind()
    refused: dict[str, list[str]] = defaultdict(list)
    rows = bind.execute(
        sa.text(
            "SELECT tracking_no, answered_at FROM consent_request "
            "WHERE status = 'refused' AND answered_at IS NOT NULL ORDER BY answered_at, id"
        )
    )
    for tracking_no, answered_at in rows:
        refused[tracking_no].append(_iso(answered_at))
    parcel = sa.table("parcel", sa.column("tracking_no"), sa.column("consent_refusals", sa.JSON))
    for tracking_no, times in refused.items():
        bind.execute(
            parcel.update()
            .where(parcel.c.tracking_no == tracking_no)
            .values(consent_refusals=times)
        )


def _iso(value: object) -> str:
    """A stored time as the application writes it (UTC, with its offset): SQLite hands
    back text, PostgreSQL an aware datetime."""
    at = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.UTC)
    return at.astimezone(dt.UTC).isoformat()


def downgrade() -> None:
    with op.batch_alter_table("parcel", schema=None) as batch_op:
        batch_op.drop_column("consent_refusals")
