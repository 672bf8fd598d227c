"""Auditors' reads of proof images by the parcels whose proofs named the images

An auditor's read of a proof image (``blob_read``, subject ``blob`` and its digest)
named no parcel, so ``GET /audit?tracking_no=`` left it out of the history of the
parcels whose delivery's signature or photo it was. The service now files each read
under those parcels as it appends it (``sync.blobs.parcels_naming``); the entries
written before get theirs here, from the digest they are about (``subject_key``) and
the proofs naming it (``proof_image``) that the server held when the read was made
(their events received by then, ``scan_event.received_at``), as the service would
have read them.

No schema changes; outside the hash chain, as ``e2b6d4f8a1c3``'s rows. The reads are
read by ``ix_audit_entry_action``, their images' parcels by ``ix_proof_image_sha256``
and their events by key; at most ``BATCH`` entries a statement, each statement its own
transaction on PostgreSQL, so no append waits for more than one; only rows not there
yet are written (run again, the same end).

Revision ID: d7e1a5c9b3f4
Revises: a9c3e5f7b1d2
Create Date: 2026-12-15 09:00:00.000000
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "d7e1a5c9b3f4"
down_revision: str | None = "a9c3e5f7b1d2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 2000  # image reads a statement (one digest each)
ACTION = "blob_read"
FILED = sa.text(
    """INSERT INTO audit_entry_parcel (tracking_no, entry_id)
    SELECT DISTINCT p.tracking_no, e.id FROM audit_entry e
    JOIN proof_image p ON p.sha256 = e.subject_key
    JOIN scan_event s ON s.id = p.event_id AND s.received_at <= e.at
    WHERE e.action = :action AND e.subject_type = 'blob'
    AND e.id > :after AND e.id <= :through
    AND NOT EXISTS (SELECT 1 FROM audit_entry_parcel x
        WHERE x.tracking_no = p.tracking_no AND x.entry_id = e.id)"""
)


def _committed_as_it_runs() -> AbstractContextManager[Any]:
    postgresql = op.get_bind().dialect.name == "postgresql"
    return op.get_context().autocommit_block() if postgresql else nullcontext()


def upgrade() -> None:
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
            bind.execute(FILED, {"action": ACTION, "after": after, "through": through})
            after = through


def downgrade() -> None:
    """Nothing to undo: the rows are a finding aid the version before reads as any other
    entry's (``GET /audit?tracking_no=``), and it changes none."""
