"""A request for consent reads revoked once the consent that answered it is revoked

A courier asked; the recipient said yes (the request ``granted``, its consent
``consent_id``); later they revoked that consent. The request still read ``granted``,
to the integrator listing requests and in the PDA's pull feed, while the consent no
longer authorized a drop. A request now takes status ``revoked`` with the consent's
``revoked_at`` (``consent_request.revoked_at``) when its consent is revoked.

Here: the column is added, the status's CHECK constraint takes ``revoked``, and every
``granted`` request whose consent is revoked is marked so, with its consent's time, in
one statement (a request is answered by one consent: ``consent_id`` is unique). The
downgrade gives those requests back ``granted``. Nothing is judged again: the rules read
consents, never requests.

Revision ID: b6d2f8a4c1e7
Revises: e7a3c5d1f9b4
Create Date: 2026-12-10 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from alembic.operations import BatchOperations

revision: str = "b6d2f8a4c1e7"
down_revision: str | None = "e7a3c5d1f9b4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "consent_request"
CHECK = "ck_consent_request_consent_request_status"
BEFORE = ("pending", "granted", "refused", "unsent", "cancelled")
AFTER = (*BEFORE, "revoked")

MARK_REVOKED = sa.text(
    "UPDATE consent_request SET status = 'revoked', revoked_at = "
    "(SELECT consent.revoked_at FROM consent WHERE consent.id = consent_request.consent_id) "
    "WHERE status = 'granted' AND consent_id IN "
    "(SELECT id FROM consent WHERE revoked_at IS NOT NULL)"
)
MARK_GRANTED = sa.text("UPDATE consent_request SET status = 'granted' WHERE status = 'revoked'")


def _allow(batch_op: BatchOperations, statuses: Sequence[str]) -> None:
    allowed = ", ".join(f"'{status}'" for status in statuses)
    batch_op.drop_constraint(batch_op.f(CHECK), type_="check")
    batch_op.create_check_constraint(batch_op.f(CHECK), sa.text(f"status IN ({allowed})"))


def upgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
        _allow(batch_op, AFTER)
    op.execute(MARK_REVOKED)


def downgrade() -> None:
    op.execute(MARK_GRANTED)
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        _allow(batch_op, BEFORE)
        batch_op.drop_column("revoked_at")
