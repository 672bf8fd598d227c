"""Consent requests announce their lapse once: consent_request.lapse_announced_at

A recipient channel heard of a courier's request (``consent.requested``) and of its
cancellation, but never that it lapsed unanswered: it kept showing the recipient
"waiting for your answer". The ``consent_requests_lapsed`` job now announces each
pending request past its expiry (``consent.request_lapsed``) and marks it here, so that
it is announced once.

Here: the column, and the partial index the job reads the unannounced lapses by. The
requests that had lapsed before this version are marked as of their expiry: they were
never announced, and a channel told of them now (some months late) would only be
confused. No downgrade data: the column goes.

Revision ID: f3b8d6a2c4e1
Revises: a3f7c9e1d5b8
Create Date: 2026-12-11 09:00:00.000000
"""

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "f3b8d6a2c4e1"
down_revision: str | None = "a3f7c9e1d5b8"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "consent_request"
INDEX = "ix_consent_request_unannounced_lapse"
UNANNOUNCED = "status = 'pending' AND lapse_announced_at IS NULL"


def upgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("lapse_announced_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.create_index(
            INDEX,
            ["expires_at"],
            unique=False,
            postgresql_where=sa.text(UNANNOUNCED),
            sqlite_where=sa.text(UNANNOUNCED),
        )
    now = dt.datetime.now(dt.UTC)
    if op.get_bind().dialect.name == "sqlite":  # naive UTC, as models.base.UTCDateTime
        now = now.replace(tzinfo=None)
    op.execute(
        sa.text(
            f"UPDATE {TABLE} SET lapse_announced_at = expires_at "
            f"WHERE {UNANNOUNCED} AND expires_at <= :now"
        ).bindparams(sa.bindparam("now", now, type_=sa.DateTime(timezone=True)))
    )


def downgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_index(
            INDEX, postgresql_where=sa.text(UNANNOUNCED), sqlite_where=sa.text(UNANNOUNCED)
        )
        batch_op.drop_column("lapse_announced_at")
