"""Consent requests keep how the recipient answered: consent_request.answered_channel

A refusal withdraws for the parcel the consents given before it, and the channel hears
``consent.request_revoked`` for each request they granted, naming the refusal's
channel. A grant whose answer arrived after the refusal (the SMS gateway's "yes" late,
the "no" given in the app) was announced with ``channel: null``: the refusal's channel
was on its audit entry and its message, not on its row. Each answer now keeps it.

Nullable, nothing filled in: requests answered before this migration keep null (their
refusals' later withdrawals still say null, as before).

Revision ID: a9c4e2f7b1d3
Revises: b5c1e8d3f7a2
Create Date: 2026-12-14 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a9c4e2f7b1d3"
down_revision: str | None = "b5c1e8d3f7a2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("consent_request", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "answered_channel",
                sa.Enum(
                    "sms",
                    "app",
                    "phone_call",
                    "in_person",
                    name="request_answered_channel",
                    native_enum=False,
                    create_constraint=True,
                    length=32,
                ),
                nullable=True,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("consent_request", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("ck_consent_request_request_answered_channel"), type_="check"
        )
        batch_op.drop_column("answered_channel")
