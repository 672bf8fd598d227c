"""Audit entries by every parcel they concern: the audit_entry_parcel table

``GET /audit?tracking_no=`` found an entry by ``audit_entry.tracking_no``, the one
parcel it is about: an entry about several parcels kept none, and an auditor settling a
dispute about one parcel did not find its shift's sign-off (the balance the manager
signed, the parcel's outcome in it), an auditor's read of the shift's page showing its
recipient, or a search whose proofs showed its delivery. Each entry now has a row here
for every parcel it concerns, that one or several, and the table's primary key
(tracking_no, entry_id) gives a parcel's entries newest first, as the log is listed.
``ix_audit_entry_tracking_no``, which no query reads any more, is dropped (CONCURRENTLY
on PostgreSQL, as ``32c6e05e447b`` says why) once the table is filled.

Outside the hash chain, as ``9d4f2b7c1e63``'s column and for the same reasons: a
finding aid derived from what the entry records, which changes nothing an entry says.

Existing entries get theirs from what they record: the parcel ``9d4f2b7c1e63`` gave
them (``audit_entry.tracking_no``), the parcels a shift page's ``parcel_read`` showed
(``details.tracking_nos``), and the parcels a sign-off's balance names (its outcomes'
and its discrepancies' numbers, ``details.balance``). Searches' and exports' entries
name their proofs by event id only: those written before keep none. JSON is read with
``jsonb_*`` on PostgreSQL and ``json_each`` on SQLite.

On PostgreSQL nothing holds ``audit_entry`` (which every audited action appends to)
for longer than a moment, and an upgrade stopped anywhere runs again to the end: the
table is created on its own and committed at once (``IF NOT EXISTS``; its foreign key
locks ``audit_entry`` against appends for the catalog change alone), then filled in
batches of at most ``BATCH`` entries by id, each committed on its own and writing only
rows that are not there yet (``ON CONFLICT DO NOTHING``); the last batch is open-ended
and takes the entries appended since the first. SQLite does it all in the upgrade's
one transaction.

Revision ID: b1d7e3a9c5f2
Revises: d8a5f1c3e6b9
Create Date: 2026-12-10 09:00:00.000000
"""

from collections.abc import Sequence
from contextlib import nullcontext

import sqlalchemy as sa
from alembic import op

revision: str = "b1d7e3a9c5f2"
down_revision: str | None = "d8a5f1c3e6b9"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "audit_entry_parcel"
OLD_INDEX = "ix_audit_entry_tracking_no"  # on audit_entry (tracking_no, id)
BATCH = 10_000  # entries per backfill statement (PostgreSQL), each its own transaction

# The parcels an existing entry concerns, one (tracking_no, entry_id) row each, for the
# entries with ``:after < id`` (and ``id <= :through`` when bounded).
POSTGRESQL_PARCELS = """
    SELECT tracking_no, id FROM audit_entry WHERE tracking_no IS NOT NULL AND {ids}
    UNION
    SELECT n.value, e.id FROM audit_entry e,
        jsonb_array_elements_text(e.details -> 'tracking_nos') AS n(value)
    WHERE e.action = 'parcel_read' AND e.subject_type = 'shift'
        AND jsonb_typeof(e.details -> 'tracking_nos') = 'array' AND {e_ids}
    UNION
    SELECT n.key, e.id FROM audit_entry e,
        jsonb_object_keys(e.details -> 'balance' -> 'outcomes') AS n(key)
    WHERE e.action = 'shift_signed_off'
        AND jsonb_typeof(e.details -> 'balance' -> 'outcomes') = 'object' AND {e_ids}
    UNION
    SELECT d.value ->> 'tracking_no', e.id FROM audit_entry e,
        jsonb_array_elements(e.details -> 'balance' -> 'discrepancies') AS d(value)
    WHERE e.action = 'shift_signed_off'
        AND jsonb_typeof(e.details -> 'balance' -> 'discrepancies') = 'array' AND {e_ids}
"""
SQLITE_PARCELS = """
    SELECT tracking_no, id FROM audit_entry WHERE tracking_no IS NOT NULL
    UNION
    SELECT n.value, e.id FROM audit_entry e, json_each(e.details, '$.tracking_nos') n
    WHERE e.action = 'parcel_read' AND e.subject_type = 'shift'
        AND json_type(e.details, '$.tracking_nos') = 'array'
    UNION
    SELECT n.key, e.id FROM audit_entry e, json_each(e.details, '$.balance.outcomes') n
    WHERE e.action = 'shift_signed_off'
        AND json_type(e.details, '$.balance.outcomes') = 'object'
    UNION
    SELECT json_extract(d.value, '$.tracking_no'), e.id FROM audit_entry e,
        json_each(e.details, '$.balance.discrepancies') d
    WHERE e.action = 'shift_signed_off'
        AND json_type(e.details, '$.balance.discrepancies') = 'array'
"""


def _filled(parcels: str) -> str:
    """The INSERT of ``parcels``' rows that name a tracking number as one is stored (1
    to 40 characters)."""
    return f"""INSERT INTO {TABLE} (tracking_no, entry_id)
    SELECT tracking_no, id FROM ({parcels}) AS p(tracking_no, id)
    WHERE length(tracking_no) BETWEEN 1 AND 40"""


def _create_table(**options: object) -> None:
    op.create_table(
        TABLE,
        sa.Column("tracking_no", sa.String(length=40), nullable=False),
        sa.Column(
            "entry_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["entry_id"],
            ["audit_entry.id"],
            name=op.f("fk_audit_entry_parcel_entry_id_audit_entry"),
        ),
        sa.PrimaryKeyConstraint("tracking_no", "entry_id", name=op.f("pk_audit_entry_parcel")),
        **options,
    )


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        _create_table()
        op.execute(
            f"INSERT INTO {TABLE} (tracking_no, entry_id) SELECT tracking_no, id FROM "
            f"({SQLITE_PARCELS}) WHERE length(tracking_no) BETWEEN 1 AND 40"
        )
        op.drop_index(OLD_INDEX, table_name="audit_entry", if_exists=True)
        return
    with op.get_context().autocommit_block():
        _create_table(if_not_exists=True)
        _fill_in_batches()
        op.drop_index(
            OLD_INDEX, table_name="audit_entry", if_exists=True, postgresql_concurrently=True
        )


def _fill_in_batches() -> None:
    """The rows of consecutive runs of at most ``BATCH`` entries by id, each run in a
    transaction of its own (autocommit). The last run is open-ended, so that it takes
    the entries appended since the first."""
    bind = op.get_bind()
    after = bind.scalar(sa.text("SELECT min(id) - 1 FROM audit_entry"))
    while after is not None:
        through = bind.scalar(
            sa.text(
                "SELECT id FROM audit_entry WHERE id > :after ORDER BY id OFFSET :skip LIMIT 1"
            ),
            {"after": after, "skip": BATCH - 1},
        )
        bounds = "id > :after" + ("" if through is None else " AND id <= :through")
        parcels = POSTGRESQL_PARCELS.format(ids=bounds, e_ids=bounds.replace("id", "e.id"))
        bind.execute(
            sa.text(f"{_filled(parcels)} ON CONFLICT DO NOTHING"),
            {"after": after, "through": through},
        )
        after = through


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    with op.get_context().autocommit_block() if postgresql else nullcontext():
        op.create_index(
            OLD_INDEX,
            "audit_entry",
            ["tracking_no", "id"],
            unique=False,
            if_not_exists=True,
            postgresql_concurrently=True,
        )
    op.drop_table(TABLE)
