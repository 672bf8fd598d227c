"""Refresh token families: each refresh token is accepted once, a reuse ends its sign-in

A refresh token could be exchanged again and again for its 14 days, so a copy taken
from a PDA worked as long as the PDA's own. Refresh tokens now rotate (OAuth 2.0
Security BCP, RFC 9700): each sign-in starts a family, each refresh exchanges the
family's current token for the next, and a token presented again after its use
(beyond a short grace for a lost answer) revokes the family. One row per family
that refreshed at least once, kept until its newest token expires.

Revision ID: c4f1a8e2b6d3
Revises: e4b7c1a9d352
Create Date: 2026-12-02 04:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c4f1a8e2b6d3"
down_revision: str | None = "e4b7c1a9d352"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "refresh_token_family",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("current_jti", sa.String(length=64), nullable=False),
        sa.Column("used_jti", sa.String(length=64), nullable=True),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("used_retried", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("retried_before", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["app_user.id"],
            name=op.f("fk_refresh_token_family_user_id_app_user"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refresh_token_family")),
    )
    with op.batch_alter_table("refresh_token_family", schema=None) as batch_op:
        batch_op.create_index("ix_refresh_token_family_expires_at", ["expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("refresh_token_family", schema=None) as batch_op:
        batch_op.drop_index("ix_refresh_token_family_expires_at")
    op.drop_table("refresh_token_family")
