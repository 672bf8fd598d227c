"""Proof images named by rejected events; auditors' reads and purges of them by parcel

An event the server rejected (kept in quarantine: a drop into a locker sent without the
locker's id, say) may name a proof image in its POD, uploaded like any other. Such a
photo is evidence in a dispute ("never delivered"), but an auditor's read of it
(``blob_read``) was filed under no parcel: ``sync.blobs.parcels_naming`` read only the
images of accepted proofs (``proof_image``), so ``GET /audit?tracking_no=`` did not say
who had looked at it. The ``rejected_image`` table keeps each image a rejected event
names, with the parcel the event names (``parcel_tracking_no``); the service writes it
as it quarantines (``sync.quarantine.images_named``) and files a read under those
parcels too.

Here the rows already in quarantine get theirs, from the payload kept as sent (with a
frozen copy of ``images_named``), and auditors' reads written before are filed under
the parcels of the rejected events naming the image that the server held when the read
was made (received by then), as ``d7e1a5c9b3f4`` filed them under proofs' parcels; so are
retention purges of such images (``proof_images_purged``, by the ``digests`` they list,
as ``e2b6d4f8a1c3`` filed them), which the service now files so too
(``sync.sweeps._parcels_of_images``).

Outside the hash chain, as every ``audit_entry_parcel`` row. Quarantined events are read
``BATCH`` at a time by key, and reads and purges filed ``BATCH`` at a time by
``ix_audit_entry_action``, each statement its own transaction on PostgreSQL; only rows not
there yet are written (run again, the same end).

Revision ID: e8c2a6f4d1b7
Revises: d7e1a5c9b3f4
Create Date: 2026-12-16 09:00:00.000000
"""

import json
import re
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "e8c2a6f4d1b7"
down_revision: str | None = "d7e1a5c9b3f4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "rejected_image"
INDEX = "ix_rejected_image_sha256"
BATCH = 2000  # quarantined events, or image reads, a statement
ACTION = "blob_read"
_DIGEST = re.compile(r"[0-9a-f]{64}")

LINKED = sa.text(
    f"""INSERT INTO {TABLE} (quarantined_event_id, sha256, tracking_no)
    VALUES (:quarantined_event_id, :sha256, :tracking_no) ON CONFLICT DO NOTHING"""
)
# The entries of ``:action`` with ids in (``:after``, ``:through``] filed under the parcels
# of the rejected events, received by then, naming the images the entry is about
# (``{digest}``: a read's subject key, or each of a purge's ``details.digests``).
FILED = f"""INSERT INTO audit_entry_parcel (tracking_no, entry_id)
    SELECT DISTINCT r.tracking_no, e.id FROM audit_entry e{{digests}}
    JOIN {TABLE} r ON r.sha256 = {{digest}}
    JOIN quarantined_event q ON q.id = r.quarantined_event_id AND q.received_at <= e.at
    WHERE e.action = :action AND e.subject_type = 'blob'
    AND e.id > :after AND e.id <= :through{{filter}}
    AND NOT EXISTS (SELECT 1 FROM audit_entry_parcel x
        WHERE x.tracking_no = r.tracking_no AND x.entry_id = e.id)"""
READS = sa.text(FILED.format(digests="", digest="e.subject_key", filter=""))
# A purge's digests, as ``e2b6d4f8a1c3`` reads them.
PURGE = "proof_images_purged"
PURGED_POSTGRESQL = sa.text(
    FILED.format(
        digests=""" CROSS JOIN LATERAL jsonb_array_elements_text(
    CASE WHEN jsonb_typeof(e.details -> 'digests') = 'array'
    THEN e.details -> 'digests' ELSE '[]'::jsonb END) AS d(value)""",
        digest="d.value",
        filter="",
    )
)
PURGED_SQLITE = sa.text(
    FILED.format(
        digests=", json_each(e.details, '$.digests') d",
        digest="d.value",
        filter=" AND json_type(e.details, '$.digests') = 'array' AND d.type = 'text'",
    )
)


def images_named(raw: Any) -> list[str]:
    """A frozen copy of ``sync.quarantine.images_named`` as of this revision."""
    pod = raw.get("pod") if isinstance(raw, Mapping) else None
    if not isinstance(pod, Mapping):
        return []
    named = (pod.get(key) for key in ("signature_sha256", "photo_sha256"))
    digests = (value.lower() for value in named if isinstance(value, str))
    return list(dict.fromkeys(d for d in digests if _DIGEST.fullmatch(d)))


def _committed_as_it_runs() -> AbstractContextManager[Any]:
    postgresql = op.get_bind().dialect.name == "postgresql"
    return op.get_context().autocommit_block() if postgresql else nullcontext()


def upgrade() -> None:
    with _committed_as_it_runs():
        op.create_table(
            TABLE,
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column(
                "quarantined_event_id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                nullable=False,
            ),
            sa.Column("sha256", sa.String(length=64), nullable=False),
            sa.Column("tracking_no", sa.String(length=40), nullable=False),
            sa.ForeignKeyConstraint(
                ["quarantined_event_id"],
                ["quarantined_event.id"],
                name=op.f("fk_rejected_image_quarantined_event_id_quarantined_event"),
            ),
            sa.PrimaryKeyConstraint("id", name=op.f("pk_rejected_image")),
            sa.UniqueConstraint(
                "quarantined_event_id", "sha256", name="uq_rejected_image_quarantined_event_sha256"
            ),
            if_not_exists=True,
        )
        op.create_index(INDEX, TABLE, ["sha256"], unique=False, if_not_exists=True)
        _link_images()
        postgresql = op.get_bind().dialect.name == "postgresql"
        _file(ACTION, READS)
        _file(PURGE, PURGED_POSTGRESQL if postgresql else PURGED_SQLITE)


def _link_images() -> None:
    """``rejected_image`` rows for the events kept in quarantine, ``BATCH`` by id."""
    bind = op.get_bind()
    after = 0
    while True:
        rows = bind.execute(
            sa.text(
                "SELECT id, parcel_tracking_no, payload FROM quarantined_event "
                "WHERE id > :after ORDER BY id LIMIT :batch"
            ),
            {"after": after, "batch": BATCH},
        ).all()
        if not rows:
            return
        linked = []
        for row_id, parcel, payload in rows:
            if parcel is None or "sha256" not in payload:
                continue
            try:
                sent = json.loads(payload)
            except (ValueError, RecursionError):
                continue
            linked += [
                {"quarantined_event_id": row_id, "sha256": digest, "tracking_no": parcel}
                for digest in images_named(sent)
            ]
        if linked:
            bind.execute(LINKED, linked)
        after = rows[-1][0]


def _file(action: str, filed: sa.TextClause) -> None:
    """The entries of ``action`` filed by ``filed`` (``FILED``), ``BATCH`` entries a
    statement."""
    bind = op.get_bind()
    after = 0
    while True:
        through = bind.scalar(
            sa.text(
                "SELECT max(id) FROM (SELECT id FROM audit_entry WHERE action = :action "
                "AND id > :after ORDER BY id LIMIT :batch) b"
            ),
            {"action": action, "after": after, "batch": BATCH},
        )
        if through is None:
            return
        bind.execute(filed, {"action": action, "after": after, "through": through})
        after = through


def downgrade() -> None:
    """The table goes; the reads it filed stay filed, a finding aid the version before
    reads as any other entry's (``GET /audit?tracking_no=``)."""
    op.drop_index(INDEX, table_name=TABLE, if_exists=True)
    op.drop_table(TABLE)
