"""Consents keep who revoked them and how: consent.revoked_by, revoked_channel

A revocation stored its time and reason but no actor: an auditor settling a dispute
could not tell whether the recipient's app, the SMS gateway or an admin revoked the
consent a drop leaned on. It now keeps the user who revoked it and, when the
request says, the channel through which the recipient did. Both columns are
nullable: consents revoked before this migration keep null (who revoked them is
not known), and nothing is filled in.

Revision ID: 6060e871ab1f
Revises: 5d1e7b3f9a02
Create Date: 2026-12-03 18:15:52.701220
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "6060e871ab1f"
down_revision: str | None = "5d1e7b3f9a02"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("consent", schema=None) as batch_op:
        batch_op.add_column(sa.Column("revoked_by", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column(
                "revoked_channel",
                sa.Enum(
                    "sms",
                    "app",
                    "phone_call",
                    "in_person",
                    name="revoked_channel",
                    native_enum=False,
                    create_constraint=True,
                    length=32,
                ),
                nullable=True,
            )
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_consent_revoked_by_app_user"), "app_user", ["revoked_by"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("consent", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_consent_revoked_by_app_user"), type_="foreignkey")
        batch_op.drop_constraint(batch_op.f("ck_consent_revoked_channel"), type_="check")
        batch_op.drop_column("revoked_channel")
        batch_op.drop_column("revoked_by")
