"""Audit entries keep the address of the client whose request wrote them: audit_entry.client_ip

An auditor settling a dispute asks where a read, a sign-off or a flag's resolution came
from; the log named who and when, not from where (the access log, which does, is kept
apart and for less long). Each entry a request writes now keeps its client's address
(``sync.audit.CLIENT_IP``, as the web edge sees it: behind ``TRUSTED_PROXY_HOPS``
proxies, the one they name), in its hash (``sync.audit.entry_hash``: hashed after the
rest when set).

The existing entries keep NULL and their hashes: an entry without an address hashes
the document it always did, so the chain verifies across the upgrade, old entries and
new alike, and nothing is re-hashed (which is what the chain exists to show). An
address put on an old entry, or taken off a new one, changes the hash verified.

On PostgreSQL the column is added on its own and committed at once (``IF NOT
EXISTS``, nullable, no default: no rewrite), so the ACCESS EXCLUSIVE lock every audited
action waits for is held for the catalog change alone; run again, the same end (on
either backend the column is added only where it is not there yet). A downgrade drops
the addresses, and with them what the hashes of the entries that have one cover: it is
refused while any entry has one (those entries would read as altered).

Revision ID: f4a8c2e6b1d3
Revises: c8f2a4d6e1b9
Create Date: 2026-12-17 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from models.migrate import MigrationRefused

revision: str = "f4a8c2e6b1d3"
down_revision: str | None = "c8f2a4d6e1b9"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "audit_entry"
COLUMN = "client_ip"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            op.execute(f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS {COLUMN} VARCHAR(64)")
    elif COLUMN not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns(TABLE)}:
        with op.batch_alter_table(TABLE, schema=None) as batch_op:
            batch_op.add_column(sa.Column(COLUMN, sa.String(length=64), nullable=True))


def downgrade() -> None:
    kept = op.get_bind().scalar(
        sa.text(f"SELECT count(*) FROM {TABLE} WHERE {COLUMN} IS NOT NULL")
    )
    if kept:
        raise MigrationRefused(
            f"{kept} audit entries keep their client's address, which their hashes cover: "
            f"without {TABLE}.{COLUMN} they would read as altered. Not downgraded"
        )
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_column(COLUMN)
