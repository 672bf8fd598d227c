"""Reading the quarantine: what PDAs sent that could not be accepted."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import QuarantinedEvent, SyncBatch

MAX_PAGE_SIZE = 500


def list_quarantined(
    *,
    session: Session,
    station_id: int | None,
    device_id: str | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> Sequence[tuple[QuarantinedEvent, uuid.UUID]]:
    """Newest first; ``before_id`` is the last id of the previous page."""
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
    if before_id is not None:
        query = query.where(QuarantinedEvent.id < before_id)
    return [(row, batch_id) for row, batch_id in session.execute(query)]
