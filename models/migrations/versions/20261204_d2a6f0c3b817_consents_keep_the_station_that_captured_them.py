"""Consents keep the station that captured them: consent.captured_at_station_id

A consent captured on a PDA is filed under its parcel's station, whichever station's
courier captured it, and authorized any drop of the parcel: a courier of another
station, knowing only a tracking number, could push an "in person" consent from
their own PDA and a locker drop at the parcel's station then counted as authorized.
A captured consent now authorizes only drops recorded by a PDA of the station the
capturing PDA was at (SECURITY.md threat 2), so the consent keeps that station.

The column is nullable: consents from recipient channels have none (they hold at
every station). Existing captured consents get their capturing event's station,
the station its PDA pushed it from (the device's at capture, which a device moved
since no longer says). Flags are not judged again here: ``courier-api rejudge``
does that, with the rules in force.

Revision ID: d2a6f0c3b817
Revises: b8e2d4f6a913
Create Date: 2026-12-04 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d2a6f0c3b817"
down_revision: str | None = "b8e2d4f6a913"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BACKFILL = """UPDATE consent
    SET captured_at_station_id =
        (SELECT scan_event.station_id FROM scan_event WHERE scan_event.id = consent.event_id)
    WHERE event_id IS NOT NULL"""


def upgrade() -> None:
    with op.batch_alter_table("consent", schema=None) as batch_op:
        batch_op.add_column(sa.Column("captured_at_station_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_consent_captured_at_station_id_station"),
            "station",
            ["captured_at_station_id"],
            ["id"],
        )
    op.execute(BACKFILL)


def downgrade() -> None:
    with op.batch_alter_table("consent", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_consent_captured_at_station_id_station"), type_="foreignkey"
        )
        batch_op.drop_column("captured_at_station_id")
