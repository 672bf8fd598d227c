"""Uploads by uploader: what an account uploaded that no event names yet

An account may upload at most ``sync.blobs.UNNAMED_BYTES_PER_UPLOADER`` of images that
no event names in a day (a PDA's photos uploaded before the push that names them count
until it arrives): a stolen PDA, or a script with a courier's token, uploading image
after image that no delivery names filled the store's disk for every station. Each new
image's upload reads its uploader's uploads of the day through this index.

Built and dropped CONCURRENTLY on PostgreSQL, as ``32c6e05e447b`` says why (an
INVALID index left by a failed build is dropped and built again); SQLite builds
it plainly.

Revision ID: a9c3e5f7b1d2
Revises: f1c7a3e9b5d2
Create Date: 2026-12-14 09:00:00.000000
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import sqlalchemy as sa
from alembic import op

revision: str = "a9c3e5f7b1d2"
down_revision: str | None = "f1c7a3e9b5d2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_blob_upload_uploader_time"


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _outside_transaction() -> AbstractContextManager[None]:
    """PostgreSQL: an autocommit block, as CONCURRENTLY needs; SQLite: the migration's
    own transaction."""
    return op.get_context().autocommit_block() if _postgresql() else nullcontext()


def upgrade() -> None:
    with _outside_transaction():
        if _postgresql() and op.get_bind().scalar(
            sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
            {"n": NAME},
        ):
            op.drop_index(NAME, table_name="blob_upload", postgresql_concurrently=True)
        op.create_index(
            NAME,
            "blob_upload",
            ["uploaded_by", "uploaded_at"],
            unique=False,
            if_not_exists=True,
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with _outside_transaction():
        op.drop_index(NAME, table_name="blob_upload", if_exists=True, postgresql_concurrently=True)
