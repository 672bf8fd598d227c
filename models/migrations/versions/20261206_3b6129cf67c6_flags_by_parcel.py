"""Flags by parcel: flag.tracking_no, and the index the queue reads a parcel's flags by

An auditor settling a dispute about a lost parcel asks for its flags: there is no
delivery, so no proof page lists them, and ``GET /flags`` could not filter by parcel.
A parcel's flags are its own (subject ``parcel``, its tracking number) and those of
its handovers (subject ``shift``, ``<shift id>:<tracking no>``), whose subject key only
ends with the number: no index on the subject finds them. A flag now keeps the
parcel it is about (``models.flag.parcel_of``; set on every insert from its subject),
and ``ix_flag_tracking_no`` gives a parcel's flags as the queue lists them.

Existing flags get theirs from their subject: a parcel's key, or what follows the
colon of a handover's (``strpos`` on PostgreSQL, ``instr`` on SQLite). The index is
built CONCURRENTLY on PostgreSQL, as ``32c6e05e447b`` says why (an INVALID one left by
a failed build is dropped and built again); SQLite builds it plainly.

Revision ID: 3b6129cf67c6
Revises: 5c8d2e7a4f16
Create Date: 2026-12-06 09:00:00.000000
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import sqlalchemy as sa
from alembic import op

revision: str = "3b6129cf67c6"
down_revision: str | None = "5c8d2e7a4f16"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "flag"
NAME = "ix_flag_tracking_no"
PARCELS = "UPDATE flag SET tracking_no = subject_key WHERE subject_type = 'parcel'"
HANDOVERS = """UPDATE flag SET tracking_no = substr(subject_key, {find}(subject_key, ':') + 1)
    WHERE subject_type = 'shift' AND {find}(subject_key, ':') > 0"""


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _outside_transaction() -> AbstractContextManager[None]:
    """PostgreSQL: an autocommit block, as CONCURRENTLY needs; SQLite: the migration's
    own transaction."""
    return op.get_context().autocommit_block() if _postgresql() else nullcontext()


def upgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.add_column(sa.Column("tracking_no", sa.String(length=40), nullable=True))
    op.execute(PARCELS)
    op.execute(HANDOVERS.format(find="strpos" if _postgresql() else "instr"))
    with _outside_transaction():
        if _postgresql() and op.get_bind().scalar(
            sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
            {"n": NAME},
        ):
            op.drop_index(NAME, table_name=TABLE, postgresql_concurrently=True)
        op.create_index(
            NAME,
            TABLE,
            ["tracking_no", "opened_at", "id"],
            unique=False,
            if_not_exists=True,
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with _outside_transaction():
        op.drop_index(NAME, table_name=TABLE, if_exists=True, postgresql_concurrently=True)
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_column("tracking_no")
