"""Flags per station: one flag per kind and subject at each station

A flag's subject (a parcel, a device) can move to another station. With one flag
per kind and subject, the same fault found at the second station was merged into
the first station's flag: kept in the first station's queue, and swallowed when its
manager had resolved it. The station now belongs to a flag's identity
(``sync.flags``). A flag of no station (the system's) stays one per kind and
subject: NULLs are distinct in a unique constraint, so a partial unique index keeps
those.

Downgrading fails while a subject has flags of one kind at two stations: they
cannot be folded into one without losing a manager's decision.

Revision ID: 64a4089ef286
Revises: 6d2f0c9e41a7
Create Date: 2026-12-02 03:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "64a4089ef286"
down_revision: str | None = "6d2f0c9e41a7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SUBJECT = ["kind", "subject_type", "subject_key"]
NO_STATION = "station_id IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("flag", schema=None) as batch_op:
        batch_op.drop_constraint("uq_flag_kind_subject", type_="unique")
        batch_op.create_unique_constraint("uq_flag_kind_subject_station", [*SUBJECT, "station_id"])
    op.create_index(
        "uq_flag_kind_subject_no_station",
        "flag",
        SUBJECT,
        unique=True,
        postgresql_where=sa.text(NO_STATION),
        sqlite_where=sa.text(NO_STATION),
    )


def downgrade() -> None:
    op.drop_index("uq_flag_kind_subject_no_station", table_name="flag")
    with op.batch_alter_table("flag", schema=None) as batch_op:
        batch_op.drop_constraint("uq_flag_kind_subject_station", type_="unique")
        batch_op.create_unique_constraint("uq_flag_kind_subject", SUBJECT)
