"""Consent requests keep how many attempts their purged question deliveries made

consent_request.question_attempts_when_purged.

A purge kept on the request what all its question's deliveries said then, those left
(another channel's) with the purged ones: one left waiting for its first attempt made
it "nothing said" (null), and when that one failed later, ``not_reached`` still read
the kept null, never "every attempt failed". The purge now keeps what the purged
deliveries said (``not_reached_when_purged``) and their most attempts (here), and
``not_reached`` reads them with the deliveries left, as it would have read them all.

Here: one nullable column (a catalog change on PostgreSQL), no backfill.

Revision ID: a4d8c2e6f1b3
Revises: f6b3d9a2c8e4
Create Date: 2026-12-22 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a4d8c2e6f1b3"
down_revision: str | None = "f6b3d9a2c8e4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "consent_request"


def upgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("question_attempts_when_purged", sa.Integer(), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_column("question_attempts_when_purged")
