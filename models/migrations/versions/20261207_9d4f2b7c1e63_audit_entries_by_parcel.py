"""Audit entries by parcel: audit_entry.tracking_no, and the index a parcel's are read by

An auditor settling a dispute about one parcel could not gather its audit history:
its entries are keyed by a consent's, a flag's, a proof's (an event's) id, the parcel's
tracking number inside their details when at all, and ``GET /audit`` filters by
subject. An entry now keeps the parcel it is about, as the code appending it knew it
(``sync.audit.append``'s ``tracking_no``), and ``ix_audit_entry_tracking_no`` gives a
parcel's entries newest first, as the log is listed (``GET /audit?tracking_no=``).

Why the column is outside the hash chain. ``entry_hash`` covers a fixed list of fields
(``sync.audit.entry_hash``: prev_hash, at, actor_id, action, subject_type,
subject_key, details), not the row, so a new column changes no existing hash and the
chain verifies as before. Putting the parcel in the hash would mean either re-hashing
every existing entry, which is what the chain exists to make visible (every head an
auditor recorded outside the service would answer ``head_changed``, and a rewrite by
this migration could not be told from a forger's), or two hash formats told apart
by the entry, which ``verify`` and every copy of the chain would have to learn. The
column is a finding aid: it is derived from what the entry records (the hashed
content names the parcel, or the consent, flag or proof that is the parcel's), it
changes nothing an entry says, and the record a dispute is settled on is the hashed
content. What a writer to the database can do with it is hide an entry from the
parcel's list, or add it to another's, never alter it; listing by subject or action
still shows it (SECURITY.md threat 4).

Existing entries get theirs where their details record the parcel's tracking number
as the service stores it (normalized): a consent granted, revoked or refused, a
proof read (``details.tracking_no``), an entry whose subject is a parcel (an intake's
``parcel_updated``, an auditor's ``parcel_read``: its key), a decision on a parcel's
flag (``flag_acknowledged``, ``flag_resolved``: the flag's subject in the details, a
parcel's number or a handover's ``<shift id>:<tracking no>``, as
``models.flag.parcel_of`` reads it). JSON is read with ``->>`` on PostgreSQL and
``json_extract`` on SQLite. Searches by a tracking number (``proofs_exported``,
``quarantine_searched``) recorded it as typed, and a proof search or a flag page's
proofs (``proofs_searched``) not at all: those written before keep none. The backfill
writes only entries that have none yet: what it computes is what running code sets,
and an entry it has filled is not written again.

On PostgreSQL nothing holds ``audit_entry`` (which every audited action appends to)
for longer than a moment, and an upgrade stopped anywhere runs again (``courier-api
db upgrade``) to the end:

* the column is added on its own and committed at once (``IF NOT EXISTS``): its
  ACCESS EXCLUSIVE lock is held for the catalog change alone;
* the backfill runs after it, in batches of at most ``BATCH`` entries by id, each
  committed on its own (appends insert, they wait for no row of it); the last batch
  is open-ended and takes the entries appended since the first (entries the version
  before appends after it, in the minutes of the rollout, keep none: they are listed
  by subject and action as before);
* the index is built CONCURRENTLY, as ``32c6e05e447b`` says why; an INVALID one left
  by a failed build is dropped and built again.

SQLite adds the column with ``batch_alter_table`` and fills it in one statement, all
in the upgrade's one transaction: a failed upgrade is rolled back whole, and runs
again from the start.

Revision ID: 9d4f2b7c1e63
Revises: a7c3e9f1b5d2
Create Date: 2026-12-07 09:00:00.000000
"""

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import sqlalchemy as sa
from alembic import op

revision: str = "9d4f2b7c1e63"
down_revision: str | None = "a7c3e9f1b5d2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "audit_entry"
NAME = "ix_audit_entry_tracking_no"
COLUMNS = ["tracking_no", "id"]
BATCH = 10_000  # entries per backfill statement (PostgreSQL), each its own transaction
# Actions whose details record the parcel's number as stored (``details.tracking_no``).
NAMED_IN_DETAILS = ("proof_read", "consent_granted", "consent_revoked", "consent_refused")
FLAG_DECISIONS = ("flag_acknowledged", "flag_resolved")  # details: the flag's subject


def _parcel(get: Callable[[str], str], find: str) -> str:
    """SQL for the parcel an existing entry records (NULL: none): ``get(key)`` reads a
    key of its details as text, ``find`` is the dialect's position-of function."""
    named, decisions = (
        ", ".join(f"'{a}'" for a in actions) for actions in (NAMED_IN_DETAILS, FLAG_DECISIONS)
    )
    key = get("subject_key")
    return f"""CASE
        WHEN subject_type = 'parcel' THEN subject_key
        WHEN action IN ({named}) THEN {get("tracking_no")}
        WHEN action IN ({decisions}) AND {get("subject_type")} = 'parcel' THEN {key}
        WHEN action IN ({decisions}) AND {get("subject_type")} = 'shift'
            AND {find}({key}, ':') > 0 THEN substr({key}, {find}({key}, ':') + 1)
        END"""


def _backfill(postgresql: bool) -> str:
    """The UPDATE filling the entries that have no parcel yet and record one of at most
    40 characters (a tracking number's; none longer is stored), ending in its WHERE."""
    if postgresql:
        parcel = _parcel(lambda key: f"(details ->> '{key}')", "strpos")
    else:
        parcel = _parcel(lambda key: f"json_extract(details, '$.{key}')", "instr")
    return f"""UPDATE audit_entry SET tracking_no = {parcel}
    WHERE tracking_no IS NULL AND length({parcel}) BETWEEN 1 AND 40"""


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _outside_transaction() -> AbstractContextManager[None]:
    """PostgreSQL: an autocommit block, as CONCURRENTLY needs; SQLite: the migration's
    own transaction."""
    return op.get_context().autocommit_block() if _postgresql() else nullcontext()


def upgrade() -> None:
    if _postgresql():
        _upgrade_postgresql()
        return
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.add_column(sa.Column("tracking_no", sa.String(length=40), nullable=True))
    op.execute(_backfill(postgresql=False))
    op.create_index(NAME, TABLE, COLUMNS, unique=False, if_not_exists=True)


def _upgrade_postgresql() -> None:
    """Each statement its own transaction (an autocommit block, as CONCURRENTLY needs
    anyway), each one done again harmlessly when the upgrade runs again."""
    with op.get_context().autocommit_block():
        op.execute("ALTER TABLE audit_entry ADD COLUMN IF NOT EXISTS tracking_no VARCHAR(40)")
        _fill_in_batches(_backfill(postgresql=True))
        if op.get_bind().scalar(
            sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
            {"n": NAME},
        ):
            op.drop_index(NAME, table_name=TABLE, postgresql_concurrently=True)
        op.create_index(
            NAME,
            TABLE,
            COLUMNS,
            unique=False,
            if_not_exists=True,
            postgresql_concurrently=True,
        )


def _fill_in_batches(update: str) -> None:
    """``update`` (an UPDATE of ``audit_entry`` ending in its WHERE clause) over
    consecutive runs of at most ``BATCH`` entries by id, each in a transaction of its
    own (autocommit). The last run is open-ended, so that it takes the entries appended
    since the first."""
    bind = op.get_bind()
    after = bind.scalar(sa.text("SELECT min(id) - 1 FROM audit_entry"))
    while after is not None:
        through = bind.scalar(
            sa.text(
                "SELECT id FROM audit_entry WHERE id > :after ORDER BY id OFFSET :skip LIMIT 1"
            ),
            {"after": after, "skip": BATCH - 1},
        )
        if through is None:
            bind.execute(sa.text(f"{update} AND id > :after"), {"after": after})
        else:
            bind.execute(
                sa.text(f"{update} AND id > :after AND id <= :through"),
                {"after": after, "through": through},
            )
        after = through


def downgrade() -> None:
    with _outside_transaction():
        op.drop_index(NAME, table_name=TABLE, if_exists=True, postgresql_concurrently=True)
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_column("tracking_no")
