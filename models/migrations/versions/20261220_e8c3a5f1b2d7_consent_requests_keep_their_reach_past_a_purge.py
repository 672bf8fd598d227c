"""Consent requests keep whether their question reached the channel past a purge

consent_request.question_purged_at and consent_request.not_reached_when_purged.

``not_reached`` was read from the question's webhook deliveries alone: once an admin
purged them (skipped or dead, as an unanswered question's end), it went null, "nothing
says it did not reach them", and an auditor settling whether the recipient was asked
read nothing; a delivered one purged after its channel stopped taking questions read
"nobody takes consent requests here: not asked". The purge now keeps the verdict on
the request.

Here: two nullable columns (a catalog change on PostgreSQL), no backfill: a question
purged before this says nothing, as before.

Revision ID: e8c3a5f1b2d7
Revises: d2f6a8c4e7b1
Create Date: 2026-12-20 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e8c3a5f1b2d7"
down_revision: str | None = "d2f6a8c4e7b1"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "consent_request"


def upgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("question_purged_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("not_reached_when_purged", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_column("not_reached_when_purged")
        batch_op.drop_column("question_purged_at")
