"""Sign-in attempts, for rate limits shared by every worker and replica

Revision ID: 48617d335743
Revises: 8ddc69f1da5c
Create Date: 2026-11-30 03:09:28.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "48617d335743"
down_revision: str | None = "8ddc69f1da5c"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sign_in_attempt",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("username_key", sa.String(length=64), nullable=False),
        sa.Column("address_key", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sign_in_attempt")),
    )
    with op.batch_alter_table("sign_in_attempt", schema=None) as batch_op:
        batch_op.create_index("ix_sign_in_attempt_address_at", ["address_key", "at"], unique=False)
        batch_op.create_index("ix_sign_in_attempt_at", ["at"], unique=False)
        batch_op.create_index(
            "ix_sign_in_attempt_username_at", ["username_key", "at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("sign_in_attempt", schema=None) as batch_op:
        batch_op.drop_index("ix_sign_in_attempt_username_at")
        batch_op.drop_index("ix_sign_in_attempt_at")
        batch_op.drop_index("ix_sign_in_attempt_address_at")
    op.drop_table("sign_in_attempt")
