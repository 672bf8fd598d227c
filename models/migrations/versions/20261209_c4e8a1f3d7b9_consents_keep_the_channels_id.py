"""Consents keep the recording channel's own id: consent.client_consent_id

A recipient channel (an SMS gateway, the app, the call centre) that sent
``POST /consents`` and got no answer sends it again; each attempt recorded a consent
of its own, and revoking the one whose id the channel finally heard left the other in
force. A consent now keeps the id the channel gave it (``client_consent_id``), unique
per recording user, and a retry with it answers the consent already recorded.

No backfill: the column is NULL (no id given) on every existing consent, and the
unique index covers only the consents that have one.

On PostgreSQL an upgrade stopped anywhere runs again to the end, as ``a7d3e9f1c5b2``
does: the column is added on its own (``IF NOT EXISTS``) and committed at once, then
the index is built CONCURRENTLY (running code may record consents meanwhile); an
INVALID one left by a failed build is dropped and built again. SQLite does it all in
the upgrade's one transaction: a failed upgrade is rolled back whole.

Revision ID: c4e8a1f3d7b9
Revises: c4e8a1f6d273
Create Date: 2026-12-09 09:00:00.000000
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import sqlalchemy as sa
from alembic import op

revision: str = "c4e8a1f3d7b9"
down_revision: str | None = "c4e8a1f6d273"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "consent"
NAME = "ix_consent_client_consent_id"
GIVEN = sa.text("client_consent_id IS NOT NULL")


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _outside_transaction() -> AbstractContextManager[None]:
    """PostgreSQL: an autocommit block, as CONCURRENTLY needs; SQLite: the migration's
    own transaction."""
    return op.get_context().autocommit_block() if _postgresql() else nullcontext()


def _create_index(**options: object) -> None:
    op.create_index(
        NAME,
        TABLE,
        ["created_by", "client_consent_id"],
        unique=True,
        if_not_exists=True,
        postgresql_where=GIVEN,
        sqlite_where=GIVEN,
        **options,
    )


def upgrade() -> None:
    if _postgresql():
        _upgrade_postgresql()
        return
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.add_column(sa.Column("client_consent_id", sa.String(length=64), nullable=True))
    _create_index()


def _upgrade_postgresql() -> None:
    """Each statement its own transaction, each one done again harmlessly when the
    upgrade runs again."""
    with op.get_context().autocommit_block():
        op.execute(f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS client_consent_id VARCHAR(64)")
        if op.get_bind().scalar(
            sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
            {"n": NAME},
        ):
            op.drop_index(NAME, table_name=TABLE, postgresql_concurrently=True)
        _create_index(postgresql_concurrently=True)


def downgrade() -> None:
    with _outside_transaction():
        op.drop_index(NAME, table_name=TABLE, if_exists=True, postgresql_concurrently=True)
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_column("client_consent_id")
