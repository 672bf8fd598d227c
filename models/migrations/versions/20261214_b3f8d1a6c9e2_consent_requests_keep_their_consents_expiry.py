"""Consent requests keep their consent's expiry: consent_request.consent_expires_at

A request granted by a consent that expired since still read ``granted``, in the API
and in the PDA's pull feed, while that consent authorizes no drop any more: a PDA
showing "the recipient agreed" sent the courier to the locker for an
``unauthorized_locker_drop``. Past its consent's expiry a granted request now reads
``expired`` (computed on reading, as a pending request's lapse is), which needs the
consent's expiry beside the request: a copy, as a consent's expiry never changes.

One nullable column, filled in from each granted or revoked request's consent (a
statement; the table holds one row per request asked).

Revision ID: b3f8d1a6c9e2
Revises: a9c4e2f7b1d3
Create Date: 2026-12-14 11:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b3f8d1a6c9e2"
down_revision: str | None = "a9c4e2f7b1d3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("consent_request", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("consent_expires_at", sa.DateTime(timezone=True), nullable=True)
        )
    op.execute(
        "UPDATE consent_request SET consent_expires_at = "
        "(SELECT consent.expires_at FROM consent WHERE consent.id = consent_request.consent_id) "
        "WHERE consent_id IS NOT NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("consent_request", schema=None) as batch_op:
        batch_op.drop_column("consent_expires_at")
