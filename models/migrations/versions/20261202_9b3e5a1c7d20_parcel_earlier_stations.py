"""Parcel earlier stations: where a parcel was before an intake moved it

A parcel re-routed to another station kept the scans its first station made, and
the next push about it at the new station flagged those as ``wrong_station``: a
warning in the new station's queue for every re-routed parcel. The parcel now
keeps the stations it was moved away from, each with when it left (a JSON list);
a scan made at a station while the parcel was there is its history there. Existing
parcels get none (never moved, as far as is known).

Revision ID: 9b3e5a1c7d20
Revises: 64a4089ef286
Create Date: 2026-12-02 03:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "9b3e5a1c7d20"
down_revision: str | None = "64a4089ef286"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("parcel", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "earlier_stations",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("parcel", schema=None) as batch_op:
        batch_op.drop_column("earlier_stations")
