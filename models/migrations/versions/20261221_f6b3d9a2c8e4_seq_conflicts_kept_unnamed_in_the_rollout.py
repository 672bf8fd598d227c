"""Seq conflicts kept naming no event: an index of the unsettled ones

``e9c3b7a5d1f2`` has each ``seq_conflict`` rejection name its event
(``quarantined_event.unsettled_event_id``), by which a push storing that event finds
it, and marks compared every PDA with none unsettled at the upgrade. In the minutes of
the rollout the version before still answers pushes: a rejection it keeps names no
event, on a PDA marked compared, and a push of the new version storing its event under
a new seq never found it: left unsettled, its flag open, for good.

``ix_quarantined_event_unnamed`` holds a device's unsettled ``seq_conflict``
rejections that name no event: none but those (and those kept before
``e9c3b7a5d1f2``, until their PDA's next push names them), so a push storing events
while its PDA has some unsettled probes it once, an empty index range almost always,
and compares and names what it finds (``sync.ingest``).

On PostgreSQL the index is built CONCURRENTLY, as ``32c6e05e447b`` says why (an
INVALID index left by a failed build is dropped and built again). Run again, the
same end.

Revision ID: f6b3d9a2c8e4
Revises: e3b9c1d7a4f2
Create Date: 2026-12-21 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "f6b3d9a2c8e4"
down_revision: str | None = "e3b9c1d7a4f2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

QUARANTINE = "quarantined_event"
INDEX = "ix_quarantined_event_unnamed"
PARTIAL = "error_code = 'seq_conflict' AND resent_seq IS NULL AND unsettled_event_id IS NULL"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            if op.get_bind().scalar(
                sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
                {"n": INDEX},
            ):
                op.drop_index(INDEX, table_name=QUARANTINE, postgresql_concurrently=True)
            op.create_index(
                INDEX,
                QUARANTINE,
                ["device_id"],
                unique=False,
                if_not_exists=True,
                postgresql_concurrently=True,
                postgresql_where=sa.text(PARTIAL),
            )
    else:
        op.create_index(
            INDEX,
            QUARANTINE,
            ["device_id"],
            unique=False,
            if_not_exists=True,
            sqlite_where=sa.text(PARTIAL),
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            op.drop_index(
                INDEX, table_name=QUARANTINE, if_exists=True, postgresql_concurrently=True
            )
    else:
        op.drop_index(INDEX, table_name=QUARANTINE, if_exists=True)
