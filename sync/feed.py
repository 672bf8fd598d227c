"""The pull feed: what a courier's PDA should hear about, in a complete order.

Readers page through ``(txid, id)``. An autoincrement id alone is not a safe
cursor under concurrent writers: a transaction that took id 10 may commit after
one that took id 11, and a reader that already moved past 11 would never see 10.
So on PostgreSQL each entry records its transaction id, and a reader returns
only entries of transactions older than the oldest one still running
(``pg_snapshot_xmin``): every transaction that could still commit sorts after
everything returned. SQLite has one writer at a time and commits in id order;
its entries all carry txid 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import func, insert, select, text, tuple_
from sqlalchemy.orm import Session

from models import FeedChange, FeedKind, Parcel
from sync.errors import CursorReset, InvalidCursor

_CURSOR = re.compile(r"([0-9]{1,19})\.([0-9]{1,19})")
_INT64_MAX = 2**63 - 1
MAX_PAGE = 500
INSERT_CHANGES = insert(FeedChange.__table__)


@dataclass(frozen=True, order=True)
class Cursor:
    txid: int
    id: int

    def __str__(self) -> str:
        return f"{self.txid}.{self.id}"

    @classmethod
    def parse(cls, raw: str | None) -> Cursor:
        if raw is None or raw == "":
            return START
        match = _CURSOR.fullmatch(raw)
        if match is None or max(int(match[1]), int(match[2])) > _INT64_MAX:
            raise InvalidCursor(
                "the cursor is malformed; send back a next_cursor exactly as received",
                field="cursor",
            )
        return cls(int(match[1]), int(match[2]))


START = Cursor(0, 0)


@dataclass(frozen=True)
class FeedEntry:
    station_id: int
    courier_id: int | None
    kind: FeedKind
    tracking_no: str


@dataclass(frozen=True)
class FeedPage:
    changes: list[tuple[FeedChange, Parcel | None]]
    next_cursor: Cursor
    has_more: bool


def record(session: Session, entries: Iterable[FeedEntry]) -> None:
    rows = [
        {
            "station_id": e.station_id,
            "courier_id": e.courier_id,
            "kind": e.kind,
            "tracking_no": e.tracking_no,
        }
        for e in dict.fromkeys(entries)
    ]
    if not rows:
        return
    txid = _current_txid(session)
    session.execute(INSERT_CHANGES, [{**row, "txid": txid} for row in rows])


def read_page(
    *, session: Session, station_id: int, courier_id: int, cursor: Cursor, limit: int
) -> FeedPage:
    """Entries for ``courier_id`` at ``station_id`` after ``cursor``, in feed order."""
    horizon = _visible_horizon(session)
    if cursor != START and not _could_have_been_issued(session, cursor, horizon):
        raise CursorReset(
            "this cursor is not known here; pull again without a cursor "
            "(your unsent events stay on the PDA and are pushed as usual)",
            field="cursor",
        )
    query = (
        select(FeedChange, Parcel)
        .outerjoin(
            Parcel,
            (Parcel.tracking_no == FeedChange.tracking_no) & (FeedChange.kind == FeedKind.PARCEL),
        )
        .where(
            FeedChange.station_id == station_id,
            FeedChange.courier_id == courier_id,
            tuple_(FeedChange.txid, FeedChange.id) > tuple_(cursor.txid, cursor.id),
        )
        .order_by(FeedChange.txid, FeedChange.id)
        .limit(limit + 1)
    )
    if horizon is not None:
        query = query.where(FeedChange.txid < horizon)
    rows = [(change, parcel) for change, parcel in session.execute(query)]
    page = rows[:limit]
    next_cursor = Cursor(page[-1][0].txid, page[-1][0].id) if page else cursor
    return FeedPage(changes=page, next_cursor=next_cursor, has_more=len(rows) > limit)


def _could_have_been_issued(session: Session, cursor: Cursor, horizon: int | None) -> bool:
    """A cursor this database handed out points at an entry it holds, of a transaction
    below the horizon then, and so below it now (the horizon only moves up). One from
    another database (a restored backup, another cluster) usually fails these checks."""
    newest = session.scalar(select(func.max(FeedChange.id)))
    if newest is None or cursor.id > newest:
        return False
    if horizon is None:
        return cursor.txid == 0
    return cursor.txid < horizon


def _current_txid(session: Session) -> int:
    if session.get_bind().dialect.name != "postgresql":
        return 0
    return int(session.scalar(text("SELECT pg_current_xact_id()::text::bigint")))


def _visible_horizon(session: Session) -> int | None:
    """The oldest transaction id still running: entries below it are final."""
    if session.get_bind().dialect.name != "postgresql":
        return None
    return int(
        session.scalar(text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"))
    )


def entries_for_reassignment(
    *, station_id: int, tracking_no: str, old_courier: int | None, new_courier: int | None
) -> Sequence[FeedEntry]:
    """A parcel moving from one courier to another: a tombstone for the old one."""
    entries = []
    if old_courier is not None and old_courier != new_courier:
        entries.append(FeedEntry(station_id, old_courier, FeedKind.PARCEL_REMOVED, tracking_no))
    if new_courier is not None:
        entries.append(FeedEntry(station_id, new_courier, FeedKind.PARCEL, tracking_no))
    return entries
