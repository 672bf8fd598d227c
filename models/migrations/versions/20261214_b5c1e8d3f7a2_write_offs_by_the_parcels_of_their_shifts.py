"""Write-offs of lost seqs by the parcels of the shifts owning them

A write-off's entry (``lost_seqs_written_off``) names the PDA and the ranges of seqs it
wrote off, and the version before filed it under no parcel, so ``GET
/audit?tracking_no=`` left it out of the history of the parcels whose handover it
decided (an outcome on a lost seq is missing for good). The service now files each
write-off under every parcel of the shifts owning its seqs as it appends it
(``sync.lost_seqs._parcels_of_owners``); the entries written before get theirs here.

Which shift owns a seq is not in SQL: it is the balance's reading of the shifts'
declared seqs and their events (``sync.handover.owned_seqs``), so it is worked out here
in Python, as it stood when the service was at this revision (a migration does not
import the service, which changes after it): a shift owns from its declared first seq
(or its lowest own event's, if lower), else from the seq after its previous shift's
declared last seq (1 with none) or its lowest event's, to its declared last seq, else,
closed, to the seq before where its PDA's next shift starts (that one's declared first
seq, else its lowest event's), else to the PDA's highest seq held. Read now, not when
the write-off was made: a shift opened since on the PDA bounds an earlier one that
declared no last seq as it bounds its balance, and events filed under a shift since
(a late push) add their parcels, as ``a3f7c9e1d5b8`` files a close by the shift's
events at the upgrade.

No schema changes; outside the hash chain, as ``e2b6d4f8a1c3``'s rows. The write-off
entries are read by ``ix_audit_entry_action``, at most ``BATCH`` at a time; each PDA's
shifts once (by ``ix_shift_device_opened``), their events by ``ix_scan_event_shift_id``;
each entry's rows are written by one statement, committed on its own on PostgreSQL, so
no append waits for more than one; only rows not there yet are written (run again, the
same end). Write-offs are rare (a PDA's storage lost), so this reads little.

Revision ID: b5c1e8d3f7a2
Revises: e2b6d4f8a1c3
Create Date: 2026-12-14 09:00:00.000000
"""

import json
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "b5c1e8d3f7a2"
down_revision: str | None = "e2b6d4f8a1c3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 500  # write-off entries at a time
ACTION = "lost_seqs_written_off"

ENTRIES = sa.text(
    "SELECT id, subject_key, details FROM audit_entry WHERE action = :action "
    "AND subject_type = 'device' AND id > :after ORDER BY id LIMIT :batch"
)
SHIFTS = sa.text(
    "SELECT s.id, s.status, s.first_seq, s.last_seq, "
    "(SELECT min(e.seq) FROM scan_event e WHERE e.shift_id = s.id "
    "AND e.device_id = s.device_id) AS lowest, "
    "(SELECT min(e.seq) FROM scan_event e WHERE e.shift_id = s.id) AS lowest_any "
    "FROM shift s WHERE s.device_id = :device ORDER BY s.opened_at, s.id"
)
MAX_SEQ = sa.text("SELECT max_seq FROM device_sync_state WHERE device_id = :device")
# Every parcel of the owning shifts' events (``sync.shifts.parcels_of_shifts``), for
# one entry; ``{ids}``: the shifts' ids, whole numbers read from the database.
FILED = """INSERT INTO audit_entry_parcel (tracking_no, entry_id)
    SELECT DISTINCT s.tracking_no, :entry_id FROM scan_event s
    WHERE s.shift_id IN ({ids})
    AND NOT EXISTS (SELECT 1 FROM audit_entry_parcel x
        WHERE x.tracking_no = s.tracking_no AND x.entry_id = :entry_id)"""


def _postgresql() -> bool:
    return bool(op.get_bind().dialect.name == "postgresql")


def _committed_as_it_runs() -> AbstractContextManager[Any]:
    return op.get_context().autocommit_block() if _postgresql() else nullcontext()


def owned_spans(shifts: Sequence[Any], max_seq: int) -> dict[int, tuple[int, int]]:
    """``{shift id: (first, last)}``: the seqs each of a PDA's shifts (in the order they
    opened) owns, as ``sync.handover.owned_seqs`` read them at this revision; a shift
    holding no event and bounding none owns none."""
    spans = {}
    for n, shift in enumerate(shifts):
        previous = shifts[n - 1] if n else None
        following = shifts[n + 1] if n + 1 < len(shifts) else None
        if shift.first_seq is not None:
            low = shift.first_seq if shift.lowest is None else min(shift.first_seq, shift.lowest)
        else:
            previous_end = 0 if previous is None else previous.last_seq
            after_previous = None if previous_end is None else previous_end + 1
            known = [s for s in (after_previous, shift.lowest) if s is not None]
            if not known:
                continue
            low = min(known)
        next_start = None
        if following is not None:
            next_start = following.first_seq
            if next_start is None:
                next_start = (
                    following.lowest if following.lowest is not None else (following.lowest_any)
                )
        if shift.last_seq is not None:
            high = shift.last_seq
        elif shift.status != "open" and next_start is not None:
            high = next_start - 1
        else:
            high = max_seq
        spans[shift.id] = (low, high)
    return spans


def _ranges(details: Any) -> list[tuple[int, int]]:
    """The ranges an entry's details list (``[[first, last], ...]``); none if malformed."""
    if isinstance(details, str):
        details = json.loads(details)
    found = []
    for item in (details or {}).get("ranges") or ():
        if (
            isinstance(item, list)
            and len(item) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) for s in item)
        ):
            found.append((item[0], item[1]))
    return found


def _owners(spans: dict[int, tuple[int, int]], ranges: list[tuple[int, int]]) -> list[int]:
    return sorted(
        shift_id
        for shift_id, (low, high) in spans.items()
        if any(max(first, low) <= min(last, high) for first, last in ranges)
    )


def upgrade() -> None:
    with _committed_as_it_runs():
        bind = op.get_bind()
        spans_of: dict[str, dict[int, tuple[int, int]]] = {}
        after = 0
        while True:
            entries = bind.execute(
                ENTRIES, {"action": ACTION, "after": after, "batch": BATCH}
            ).all()
            if not entries:
                return
            for entry_id, device, details in entries:
                if device not in spans_of:
                    shifts = bind.execute(SHIFTS, {"device": device}).all()
                    max_seq = bind.scalar(MAX_SEQ, {"device": device}) or 0
                    spans_of[device] = owned_spans(shifts, max_seq)
                owners = _owners(spans_of[device], _ranges(details))
                if owners:
                    ids = ", ".join(str(int(shift_id)) for shift_id in owners)
                    bind.execute(sa.text(FILED.format(ids=ids)), {"entry_id": entry_id})
            after = entries[-1][0]


def downgrade() -> None:
    """Nothing to undo: the rows are a finding aid the version before reads as any other
    entry's (``GET /audit?tracking_no=``), and it changes none."""
