"""Locker and pickup-point ids are stored trimmed and upper-case

A consent for pickup point ``pp-12`` (as the recipient's app spelt it) did not authorize
a drop the courier's PDA recorded at ``PP-12``: point ids were compared as sent, case
and all, and the drop was flagged ``unauthorized_locker_drop``. Every point id is now
written in one spelling at every entry (``sync.events.canonical_point``: trimmed,
upper-case): a PDA's drops and consents and requests captured on it, and consents and
requests from the API. Here the stored ones are rewritten alike: ``consent.point_id``,
``consent_request.point_id``, and in ``scan_event.details`` a drop's ``locker_id`` or
``point_id`` and a captured consent's or a request's ``point_id``.

An event's ``content_hash`` is what a PDA's re-sent event is compared with (rule 2); it
is computed over the event as validated, point ids now upper-case. An event whose point
id changes here gets its hash computed again (``_content_hash``, a frozen copy of
``sync.events.ValidEvent.canonical`` and ``sha256_json``), so that the PDA sending it
again, spelt either way, is a duplicate and not a conflicting one.

Rows are read and written back in batches of ``BATCH`` by id, only those that change,
as ``d5f9b2a4e8c1`` does; on PostgreSQL each batch commits on its own (an autocommit
block), so no push or consent waits for more than a batch. Running it again changes
nothing. Rows the version before writes in the minutes of the rollout keep their
spelling until it runs again.

No parcel is judged again here: a drop judged unauthorized because its consent spelt
the point otherwise stays flagged until ``courier-api rejudge`` runs after the upgrade,
with the new version serving.

The downgrade changes nothing: the spelling each id was sent in is not kept, and the
version before compares upper-case ids as well as any.

Revision ID: d8a5f1c3e6b9
Revises: c9e4a2d7f5b3
Create Date: 2026-12-10 11:00:00.000000
"""

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "d8a5f1c3e6b9"
down_revision: str | None = "c9e4a2d7f5b3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 1_000  # rows read per batch
MAX_POINT_LENGTH = 64
# Where each event type keeps its point ids in its details: (object or None, field).
POINTS = {
    "delivered_to_locker": ((None, "locker_id"),),
    "collected_from_locker": ((None, "locker_id"),),
    "delivered_to_pickup_point": ((None, "point_id"),),
    "consent_captured": (("consent", "point_id"),),
    "consent_requested": (("request", "point_id"),),
}
DOCUMENT = sa.JSON().with_variant(JSONB(), "postgresql")
_CANONICAL_JSON = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, check_circular=False
)

EVENTS = sa.text(
    "SELECT id, client_event_id, seq, type, tracking_no, occurred_at_device, lat, lon, "
    "accuracy_m, claimed_shift_id, details FROM scan_event "
    f"WHERE type IN ({', '.join(repr(t) for t in POINTS)}) AND id > :after "
    "ORDER BY id LIMIT :batch"
).columns(
    client_event_id=sa.Uuid(), occurred_at_device=sa.DateTime(timezone=True), details=DOCUMENT
)
SET_EVENT = sa.text(
    "UPDATE scan_event SET details = :details, content_hash = :content_hash WHERE id = :id"
).bindparams(sa.bindparam("details", type_=DOCUMENT))


def _point(point: str) -> str:
    """``sync.events.canonical_point`` as it is at this revision; a point that upper case
    would make longer than a point id may be ("ß" is "SS", which the service now
    refuses) is left as it is."""
    canonical = point.strip().upper()
    return canonical if len(canonical) <= MAX_POINT_LENGTH else point


def _outside_transaction() -> AbstractContextManager[None]:
    """PostgreSQL: an autocommit block, each batch's statements committed on their own;
    SQLite: the migration's own transaction."""
    if op.get_bind().dialect.name == "postgresql":
        return op.get_context().autocommit_block()
    return nullcontext()


def _rewrite_column(table: str) -> None:
    bind = op.get_bind()
    read = sa.text(
        f"SELECT id, point_id FROM {table} WHERE point_id IS NOT NULL AND id > :after "
        "ORDER BY id LIMIT :batch"
    )
    write = sa.text(f"UPDATE {table} SET point_id = :point WHERE id = :id")
    after = 0
    while rows := bind.execute(read, {"after": after, "batch": BATCH}).all():
        changed = [
            {"id": row_id, "point": _point(point)}
            for row_id, point in rows
            if _point(point) != point
        ]
        if changed:
            bind.execute(write, changed)
        after = rows[-1][0]


def _rewritten(event_type: str, details: dict[str, Any]) -> dict[str, Any] | None:
    """The event's details with its point ids upper-case; None when none changes."""
    rewritten = json.loads(json.dumps(details))
    changed = False
    for within, name in POINTS[event_type]:
        holder = rewritten if within is None else rewritten.get(within)
        if isinstance(holder, dict) and isinstance(holder.get(name), str):
            point = _point(holder[name])
            changed |= point != holder[name]
            holder[name] = point
    return rewritten if changed else None


def _content_hash(row: Any, details: dict[str, Any]) -> str:
    """``sync.events.ValidEvent.content_hash`` of the stored event with ``details``."""
    occurred = row.occurred_at_device
    occurred = (
        occurred.replace(tzinfo=dt.UTC) if occurred.tzinfo is None else occurred
    ).astimezone(dt.UTC)
    canonical = {
        "client_event_id": str(row.client_event_id),
        "seq": row.seq,
        "type": row.type,
        "tracking_no": row.tracking_no,
        "occurred_at": occurred.isoformat(timespec="microseconds"),
        "location": None if row.lat is None else [row.lat, row.lon, row.accuracy_m],
        "shift_id": row.claimed_shift_id,
        "details": details,
    }
    return hashlib.sha256(_CANONICAL_JSON.encode(canonical).encode("ascii")).hexdigest()


def _rewrite_events() -> None:
    bind = op.get_bind()
    after = 0
    while rows := bind.execute(EVENTS, {"after": after, "batch": BATCH}).all():
        changed = []
        for row in rows:
            details = _rewritten(row.type, row.details)
            if details is not None:
                changed.append(
                    {"id": row.id, "details": details, "content_hash": _content_hash(row, details)}
                )
        if changed:
            bind.execute(SET_EVENT, changed)
        after = rows[-1].id


def upgrade() -> None:
    with _outside_transaction():
        _rewrite_column("consent")
        _rewrite_column("consent_request")
        _rewrite_events()


def downgrade() -> None:
    pass
