"""Rejected events keep a seq their PDA wrote as text: quarantined_event.seq

An event whose seq the PDA wrote as text (``"2"``, a serializer that quotes numbers) is
rejected ``invalid_seq`` and kept in quarantine at that seq
(``sync.events.readable_seq``). Versions before kept it with no seq, so the
station's quarantine lists it without one and a shift's rejected events find it by its
parcel only, while the balance goes on naming that seq as missing: the manager had to
match the gap to the rejected event by hand. Rows kept before get theirs here, from the
event as received (``payload``): the same reading in Python (``_readable_seq``, a
frozen copy of ``sync.events.readable_seq``); a seq that cannot be read (``"five"``,
``5.5``, ``null``) still names none, as on insert.

Only the quarantine row is written. The PDA's sync state is not: the seq stays missing
there, as the version before left it, until the PDA sends the event again (answered as
before, its seq then held, as a push holds it, with everything a filled gap judges) or
a manager writes it off as lost (``POST /api/v1/devices/<id>/lost-seqs``), now with the
rejected event listed at that seq beside the gap.

No schema changes. Rows with no seq whose payload names one (``LIKE '%"seq"%'``) are
read ``BATCH`` at a time by id and written back in one UPDATE per batch, only where
they still have none (run again, the same end); on PostgreSQL each statement is its
own transaction, so no push quarantining an event waits for more than one. Downgrade
leaves the seqs in place: the version before reads and writes the column as it is.

Revision ID: f1c7a3e9b5d2
Revises: b3f8d1a6c9e2
Create Date: 2026-12-14 09:00:00.000000
"""

import json
import re
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "f1c7a3e9b5d2"
down_revision: str | None = "b3f8d1a6c9e2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 1_000  # rows read (their payloads) and written a statement
MAX_SEQ = 2**31 - 1  # sync.events.MAX_SEQ at this revision
_SEQ_AS_TEXT = re.compile(r"\s*([0-9]{1,10})(?:\.0*)?\s*")
UNFILLED = sa.text(
    "SELECT id, payload FROM quarantined_event WHERE id > :after AND seq IS NULL "
    "AND payload LIKE '%\"seq\"%' ORDER BY id LIMIT :batch"
)
FILL_POSTGRESQL = sa.text(
    "UPDATE quarantined_event AS q SET seq = v.seq "
    "FROM unnest(CAST(:ids AS BIGINT[]), CAST(:seqs AS INTEGER[])) AS v (id, seq) "
    "WHERE q.id = v.id AND q.seq IS NULL"
)
FILL_SQLITE = sa.text("UPDATE quarantined_event SET seq = :seq WHERE id = :id AND seq IS NULL")


def _whole_number(raw: Any) -> int | None:
    """``sync.events.whole_number`` at this revision (a frozen copy)."""
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= MAX_SEQ:
        return None
    return raw


def _readable_seq(raw: Any) -> int | None:
    """``sync.events.readable_seq`` at this revision (a frozen copy)."""
    seq = _whole_number(raw)
    if seq is not None or not isinstance(raw, str):
        return seq
    written = _SEQ_AS_TEXT.fullmatch(raw)
    return _whole_number(int(written.group(1))) if written else None


def _seq_of(payload: str) -> int | None:
    """The seq of the event as received, as running code reads it on insert."""
    try:
        event = json.loads(payload)
    except ValueError:
        return None
    return _readable_seq(event.get("seq")) if isinstance(event, dict) else None


def _postgresql() -> bool:
    return bool(op.get_bind().dialect.name == "postgresql")


def _committed_as_it_runs() -> AbstractContextManager[Any]:
    return op.get_context().autocommit_block() if _postgresql() else nullcontext()


def upgrade() -> None:
    postgresql = _postgresql()
    with _committed_as_it_runs():
        bind = op.get_bind()
        after = 0
        while True:
            rows = bind.execute(UNFILLED, {"after": after, "batch": BATCH}).all()
            if not rows:
                return
            read = [(row_id, _seq_of(payload)) for row_id, payload in rows]
            filled = [(row_id, seq) for row_id, seq in read if seq is not None]
            if filled and postgresql:
                ids, seqs = zip(*filled, strict=True)
                bind.execute(FILL_POSTGRESQL, {"ids": list(ids), "seqs": list(seqs)})
            elif filled:
                bind.execute(FILL_SQLITE, [{"id": i, "seq": s} for i, s in filled])
            after = rows[-1][0]


def downgrade() -> None:
    """The seqs stay: the version before keeps a rejected event's seq as it finds it."""
