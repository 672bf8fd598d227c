"""Reading the quarantine: what PDAs sent that could not be accepted.

Managers and admins read it (rule 1: rejected events stay visible to managers), and
auditors across stations: a drop the PDA sent and the server refused is evidence in a
dispute ("never delivered"). A phone number in what the PDA sent is shown masked but to
auditors (rule 7), in the list (``GET /api/v1/quarantine``) as on a shift's page; an
auditor's read is audit-logged there (``quarantine_searched``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from models import QuarantinedEvent, SyncBatch
from sync.phones import mask_phones_in, mask_phones_in_json, shown_text
from sync.sql import among_at_once
from sync.tracking import normalize

MAX_PAGE_SIZE = 500
# A shift's page lists this many of its PDA's rejected events at most (a broken PDA
# may send thousands); the list API has them all.
SHIFT_REJECTIONS_SHOWN = 100

QUARANTINE_COLUMNS = (
    "id",
    "station_id",
    "device_id",
    "position",
    "client_event_id",
    "seq",
    "event_type",
    "tracking_no",
    "error_code",
    "message",
    "field",
    "payload",
    "received_at",
)
# Copied from the rejected event as the PDA sent it (or named after a key it sent).
SENT_BY_THE_PDA = ("client_event_id", "event_type", "tracking_no", "field")


def list_quarantined(
    *,
    session: Session,
    station_id: int | None,
    device_id: str | None = None,
    tracking_no: str | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> Sequence[tuple[QuarantinedEvent, uuid.UUID]]:
    """Newest first; ``before_id`` is the last id of the previous page.

    ``tracking_no``: the events naming that parcel, as the PDA wrote the number or as
    it reads normalized (the number a manager copies from a parcel's page)."""
    query = (
        select(QuarantinedEvent, SyncBatch.batch_id)
        .join(SyncBatch, SyncBatch.id == QuarantinedEvent.batch_pk)
        .order_by(QuarantinedEvent.id.desc())
        .limit(min(limit, MAX_PAGE_SIZE))
    )
    if station_id is not None:
        query = query.where(QuarantinedEvent.station_id == station_id)
    if device_id is not None:
        query = query.where(QuarantinedEvent.device_id == device_id)
    if tracking_no is not None:
        query = query.where(
            QuarantinedEvent.tracking_no.in_(sorted({tracking_no, normalize(tracking_no)}))
        )
    if before_id is not None:
        query = query.where(QuarantinedEvent.id < before_id)
    return [(row, batch_id) for row, batch_id in session.execute(query)]


def shift_rejections(
    *,
    session: Session,
    device_id: str,
    seqs: tuple[int, int] | None,
    tracking_nos: Sequence[str],
    station_id: int | None,
    limit: int = SHIFT_REJECTIONS_SHOWN,
) -> list[QuarantinedEvent]:
    """A shift's PDA's rejected events that were the shift's: those whose seq is among
    ``seqs`` (``(first, last)``, the seqs the shift owns, ``sync.handover.owned_seqs``),
    and those without a seq that name one of its parcels (``tracking_nos``). In seq
    order, at most ``limit`` + 1 (one more tells the reader there are more); one query,
    along ``ix_quarantined_event_device_seq``. ``station_id``: only what was pushed
    at that station (None: any)."""
    owned = []
    if seqs is not None:
        owned.append(QuarantinedEvent.seq.between(*seqs))
    if tracking_nos:
        owned.append(
            and_(
                QuarantinedEvent.seq.is_(None),
                among_at_once(session, QuarantinedEvent.tracking_no, tracking_nos),
            )
        )
    if not owned:
        return []
    query = (
        select(QuarantinedEvent)
        .where(QuarantinedEvent.device_id == device_id, or_(*owned))
        .order_by(QuarantinedEvent.seq.nulls_last(), QuarantinedEvent.id)
        .limit(limit + 1)
    )
    if station_id is not None:
        query = query.where(QuarantinedEvent.station_id == station_id)
    return list(session.scalars(query))


def shown_rejection(row: QuarantinedEvent, *, unmasked: bool) -> dict[str, Any]:
    """The rejected event as its reader is shown it: whole for an auditor
    (``unmasked``); for a manager or an admin a phone number in what the PDA sent (a
    consent's evidence), or echoed in the error, is masked as everywhere else (rule 7).
    The payload is ASCII JSON: its strings are masked as typed, not as escaped. So are
    the event's own fields as the PDA sent them (a number typed into the tracking
    number field), as they are in the payload next to them."""
    shown = {c: getattr(row, c) for c in QUARANTINE_COLUMNS}
    if unmasked:
        return shown
    return {
        **shown,
        **{c: shown_text(shown[c], unmasked=False) for c in SENT_BY_THE_PDA},
        "payload": mask_phones_in_json(row.payload),
        "message": mask_phones_in(row.message),
    }
