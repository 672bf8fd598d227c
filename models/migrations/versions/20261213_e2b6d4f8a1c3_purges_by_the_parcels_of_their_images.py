"""Retention purges by the parcels whose proofs named their images

A retention purge's entry (``proof_images_purged``) lists the digests of the images
whose bytes it deleted, and named no parcel, so ``GET /audit?tracking_no=`` left it
out of the history of the parcels whose proofs the images were. The service now files
each purge under those parcels as it appends it (``sync.sweeps._parcels_of_images``);
the entries written before get theirs here, from the digests they list
(``details.digests``) and the proofs naming them (``proof_image``).

No schema changes; outside the hash chain, as ``c4e8b2f6a1d9``'s rows. The purge entries
are read by ``ix_audit_entry_action``, their images' parcels by
``ix_proof_image_sha256``; at most ``BATCH`` entries a statement (each some 200
digests), each statement its own transaction on PostgreSQL, so no append waits for
more than one; only rows not there yet are written (run again, the same end).

Revision ID: e2b6d4f8a1c3
Revises: e7b3d9a5c2f8
Create Date: 2026-12-13 09:00:00.000000
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "e2b6d4f8a1c3"
down_revision: str | None = "e7b3d9a5c2f8"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 500  # purge entries a statement
ACTION = "proof_images_purged"
POSTGRESQL = """CROSS JOIN LATERAL jsonb_array_elements_text(
    CASE WHEN jsonb_typeof(e.details -> 'digests') = 'array'
    THEN e.details -> 'digests' ELSE '[]'::jsonb END) AS d(value)"""
SQLITE = ", json_each(e.details, '$.digests') d"
SQLITE_FILTER = " AND json_type(e.details, '$.digests') = 'array' AND d.type = 'text'"
FILED = """INSERT INTO audit_entry_parcel (tracking_no, entry_id)
    SELECT DISTINCT p.tracking_no, e.id FROM audit_entry e {digests}
    JOIN proof_image p ON p.sha256 = d.value
    WHERE e.action = '{action}' AND e.id > :after AND e.id <= :through{filter}
    AND NOT EXISTS (SELECT 1 FROM audit_entry_parcel x
        WHERE x.tracking_no = p.tracking_no AND x.entry_id = e.id)"""


def _postgresql() -> bool:
    return bool(op.get_bind().dialect.name == "postgresql")


def _committed_as_it_runs() -> AbstractContextManager[Any]:
    return op.get_context().autocommit_block() if _postgresql() else nullcontext()


def upgrade() -> None:
    postgresql = _postgresql()
    filed = sa.text(
        FILED.format(
            digests=POSTGRESQL if postgresql else SQLITE,
            action=ACTION,
            filter="" if postgresql else SQLITE_FILTER,
        )
    )
    with _committed_as_it_runs():
        bind = op.get_bind()
        after = 0
        while True:
            through = bind.scalar(
                sa.text(
                    "SELECT max(id) FROM (SELECT id FROM audit_entry WHERE action = :action "
                    "AND id > :after ORDER BY id LIMIT :batch) b"
                ),
                {"action": ACTION, "after": after, "batch": BATCH},
            )
            if through is None:
                return
            bind.execute(filed, {"after": after, "through": through})
            after = through


def downgrade() -> None:
    """Nothing to undo: the rows are a finding aid the version before reads as any other
    entry's (``GET /audit?tracking_no=``), and it changes none."""
