"""Batches keep the hash of their events as sent: sync_batch.sent_hash

A batch is known by its events' content (``sync.ingest.content_digest``), each valid
event as a duplicate is compared and a malformed one as sent, so that a PDA writing
its retry anew gets its receipt. Which events are valid depends on the tracking-number
patterns and the code: changed between an attempt and its retry, they move an event
between valid and rejected, and a retry sent byte for byte answered 409
``batch_id_reused`` instead of its receipt (DESIGN.md rule 2). A batch now also keeps
the hash of its events as sent, and a retry matching either is the same batch.

The column is nullable and not filled: a batch stored before content digests holds
the hash of its bytes in ``request_hash``, which the replay check also reads, and one
stored since then keeps only its content digest. On PostgreSQL it is added with
``IF NOT EXISTS`` in a transaction of its own (a moment's lock, no table rewrite);
SQLite adds a nullable column without copying the table.

Revision ID: a7c3e9f1b5d2
Revises: 3b6129cf67c6
Create Date: 2026-12-07 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a7c3e9f1b5d2"
down_revision: str | None = "3b6129cf67c6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            op.execute("ALTER TABLE sync_batch ADD COLUMN IF NOT EXISTS sent_hash VARCHAR(64)")
    else:
        with op.batch_alter_table("sync_batch", schema=None) as batch_op:
            batch_op.add_column(sa.Column("sent_hash", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sync_batch", schema=None) as batch_op:
        batch_op.drop_column("sent_hash")
