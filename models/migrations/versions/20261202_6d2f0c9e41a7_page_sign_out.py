"""Page sign-out: signing out of the pages ends every session begun before

The pages' sessions are signed cookies, so clearing one in the browser left a copy
of it (taken from a shared computer, say) working until its twelve hours were up.
The account now keeps when it last signed out of the pages; a page session begun
before then is over.

Revision ID: 6d2f0c9e41a7
Revises: 5b1e7c2d9a40
Create Date: 2026-12-02 03:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "6d2f0c9e41a7"
down_revision: str | None = "5b1e7c2d9a40"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("app_user", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pages_signed_out_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("app_user", schema=None) as batch_op:
        batch_op.drop_column("pages_signed_out_at")
