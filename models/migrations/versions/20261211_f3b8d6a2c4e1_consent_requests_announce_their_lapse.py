"""Consent requests announce their lapse once: consent_request.lapse_announced_at

A recipient channel heard of a courier's request (``consent.requested``) and of its
cancellation, but never that it lapsed unanswered: it kept showing the recipient
"waiting for your answer". The ``consent_requests_lapsed`` job now announces each
pending request past its expiry (``consent.request_lapsed``) and marks it here, so that
it is announced once.

Here: the column, and the partial index the job reads the unannounced lapses by. The
requests that had lapsed before this version are marked as of their expiry: they were
never announced, and a channel told of them now (some months late) would only be
confused. No downgrade data: the column goes.

On PostgreSQL nothing holds ``consent_request`` for longer than a moment (every push
that asks a recipient, and every answer, writes to it), and an upgrade stopped anywhere
runs again to the end, as ``5c8d2e7a4f16`` does it:

* the column (nullable, no default: a catalog change) is added on its own and committed
  at once (``IF NOT EXISTS``), so its ACCESS EXCLUSIVE lock is not held through the
  marking;
* the marking runs in batches of at most ``BATCH`` requests by id, each committed on its
  own: the lapsed-unanswered requests of a station's whole history may be many;
* then the index is built CONCURRENTLY (after the marking: it holds only the requests
  still to announce), an INVALID one left by a failed build dropped and built again.

SQLite adds the column by copying the table and marks in one statement, all in the
upgrade's one transaction.

Revision ID: f3b8d6a2c4e1
Revises: a3f7c9e1d5b8
Create Date: 2026-12-11 09:00:00.000000
"""

import datetime as dt
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import sqlalchemy as sa
from alembic import op

revision: str = "f3b8d6a2c4e1"
down_revision: str | None = "a3f7c9e1d5b8"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "consent_request"
INDEX = "ix_consent_request_unannounced_lapse"
UNANNOUNCED = "status = 'pending' AND lapse_announced_at IS NULL"
BATCH = 10_000  # requests per marking statement (PostgreSQL), each its own transaction
MARK = (
    f"UPDATE {TABLE} SET lapse_announced_at = expires_at "
    f"WHERE {UNANNOUNCED} AND expires_at <= :now"
)


def _marking(condition: str = "") -> sa.TextClause:
    """``MARK`` (and ``condition``), its ``now`` bound as the models bind a time."""
    return sa.text(MARK + condition).bindparams(
        sa.bindparam("now", type_=sa.DateTime(timezone=True))
    )


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _outside_transaction() -> AbstractContextManager[None]:
    """PostgreSQL: an autocommit block, as CONCURRENTLY needs; SQLite: the migration's
    own transaction."""
    return op.get_context().autocommit_block() if _postgresql() else nullcontext()


def upgrade() -> None:
    now = dt.datetime.now(dt.UTC)
    if _postgresql():
        _upgrade_postgresql(now)
        return
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("lapse_announced_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.create_index(
            INDEX,
            ["expires_at"],
            unique=False,
            sqlite_where=sa.text(UNANNOUNCED),
        )
    # naive UTC, as models.base.UTCDateTime keeps it on SQLite
    op.get_bind().execute(_marking(), {"now": now.replace(tzinfo=None)})


def _upgrade_postgresql(now: dt.datetime) -> None:
    """Each statement its own transaction, each done again harmlessly when the upgrade
    runs again."""
    with op.get_context().autocommit_block():
        op.execute(
            f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS lapse_announced_at "
            "TIMESTAMP WITH TIME ZONE"
        )
        _mark_in_batches(now)
        if op.get_bind().scalar(
            sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
            {"n": INDEX},
        ):
            op.drop_index(INDEX, table_name=TABLE, postgresql_concurrently=True)
        op.create_index(
            INDEX,
            TABLE,
            ["expires_at"],
            unique=False,
            if_not_exists=True,
            postgresql_where=sa.text(UNANNOUNCED),
            postgresql_concurrently=True,
        )


def _mark_in_batches(now: dt.datetime) -> None:
    """``MARK`` over consecutive runs of at most ``BATCH`` requests by id, each in a
    transaction of its own (autocommit). The last run is open-ended."""
    bind = op.get_bind()
    after = bind.scalar(sa.text(f"SELECT min(id) - 1 FROM {TABLE}"))
    while after is not None:
        through = bind.scalar(
            sa.text(f"SELECT id FROM {TABLE} WHERE id > :after ORDER BY id OFFSET :skip LIMIT 1"),
            {"after": after, "skip": BATCH - 1},
        )
        if through is None:
            bind.execute(_marking(" AND id > :after"), {"now": now, "after": after})
        else:
            bind.execute(
                _marking(" AND id > :after AND id <= :through"),
                {"now": now, "after": after, "through": through},
            )
        after = through


def downgrade() -> None:
    with _outside_transaction():
        op.drop_index(
            INDEX,
            table_name=TABLE,
            if_exists=True,
            postgresql_concurrently=True,
            postgresql_where=sa.text(UNANNOUNCED),
            sqlite_where=sa.text(UNANNOUNCED),
        )
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_column("lapse_announced_at")
