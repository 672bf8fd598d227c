"""The pull feed: what a courier's PDA should hear about, in a complete order.

Readers page through ``(txid, id)``. An autoincrement id alone is not a safe
cursor under concurrent writers: a transaction that took id 10 may commit after
one that took id 11, and a reader that already moved past 11 would never see 10.
So on PostgreSQL each entry records its transaction id, and a reader returns
only entries of transactions older than the oldest one still running
(``pg_snapshot_xmin``): every transaction that could still commit sorts after
everything returned. SQLite has one writer at a time and commits in id order;
its entries all carry txid 0.

The price: a writing transaction left open on this database holds the horizon
back, and pulls see nothing newer until it ends. Production servers should set
``idle_in_transaction_session_timeout``. Transactions on the server's other
databases do not count: they cannot write this feed (``_HORIZON``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, insert, literal_column, or_, select, text, tuple_
from sqlalchemy.orm import Session

from models import FeedChange, FeedKind, Parcel, ParcelStatus
from sync.errors import CursorReset, InvalidCursor
from sync.sql import Prebuilt

_CURSOR = re.compile(r"(s\.)?([0-9]{1,19})\.([0-9]{1,19})(?:\.([0-9]{1,19}))?")
_INT64_MAX = 2**63 - 1
# On PostgreSQL the transaction id is written by the insert itself, not asked for first:
# one round trip fewer on every push.
INSERT_CHANGES = Prebuilt(
    lambda dialect: insert(FeedChange.__table__).values(
        txid=literal_column("pg_current_xact_id()::text::bigint") if dialect == "postgresql" else 0
    )
)


@dataclass(frozen=True)
class Cursor:
    """A position in the feed, ``txid.id``; or, while a fresh PDA is being sent the
    parcels it holds, ``s.txid.id.parcel``: the feed position the snapshot started at,
    and the last parcel id sent."""

    txid: int
    id: int
    snapshot_after: int | None = None

    def __str__(self) -> str:
        if self.snapshot_after is None:
            return f"{self.txid}.{self.id}"
        return f"s.{self.txid}.{self.id}.{self.snapshot_after}"

    @property
    def position(self) -> Cursor:
        return Cursor(self.txid, self.id)

    @classmethod
    def parse(cls, raw: str | None) -> Cursor | None:
        """The cursor, or None for "from scratch"."""
        if raw is None or raw == "":
            return None
        match = _CURSOR.fullmatch(raw)
        snapshot = match is not None and match[1] is not None
        if (
            match is None
            or snapshot != (match[4] is not None)
            or max(int(n) for n in match.groups()[1:] if n is not None) > _INT64_MAX
        ):
            raise InvalidCursor(
                "the cursor is malformed; send back a next_cursor exactly as received",
                field="cursor",
            )
        return cls(int(match[2]), int(match[3]), int(match[4]) if snapshot else None)


START = Cursor(0, 0)
# Parcels a PDA starting from scratch is sent: the ones still to be dealt with.
DONE = (
    ParcelStatus.DELIVERED,
    ParcelStatus.IN_LOCKER,
    ParcelStatus.AT_PICKUP_POINT,
    ParcelStatus.COLLECTED,
    ParcelStatus.RETURNED,
)


@dataclass(frozen=True)
class FeedEntry:
    station_id: int
    courier_id: int | None
    kind: FeedKind
    tracking_no: str


@dataclass(frozen=True)
class FeedItem:
    kind: FeedKind
    tracking_no: str
    parcel: Parcel | None  # as it is now; None for a tombstone


@dataclass(frozen=True)
class FeedPage:
    changes: list[FeedItem]
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
    INSERT_CHANGES.execute_rows(session, rows)


def read_page(
    *, session: Session, station_id: int, courier_id: int, cursor: Cursor | None, limit: int
) -> FeedPage:
    """What ``courier_id`` at ``station_id`` should hear after ``cursor``.

    Without a cursor (a new PDA, or one told to reset) the feed is not replayed from
    its beginning: the PDA is first sent the parcels it holds now, still to be dealt
    with (a snapshot, paged by parcel id), then the feed from where the snapshot
    began. Every change committed before that point shows in the snapshot; every
    later one comes from the feed (some twice, which a PDA applies idempotently). The
    snapshot's last page says ``has_more`` only when the feed already holds such a
    later change (``_snapshot_page``).
    """
    horizon = _visible_horizon(session)
    if cursor is None:
        cursor = Cursor(*_head(session, station_id, courier_id, horizon), snapshot_after=0)
    elif cursor.position != START and not _could_have_been_issued(
        session, cursor.position, horizon, station_id, courier_id
    ):
        raise CursorReset(
            "this cursor is not known here; pull again without a cursor "
            "(your unsent events stay on the PDA and are pushed as usual)",
            field="cursor",
        )
    if cursor.snapshot_after is not None:
        return _snapshot_page(session, station_id, courier_id, cursor, limit, horizon)
    query = (
        select(FeedChange, Parcel)
        .outerjoin(
            Parcel,
            (Parcel.tracking_no == FeedChange.tracking_no)
            & (FeedChange.kind != FeedKind.PARCEL_REMOVED),
        )
        .where(*_after(station_id, courier_id, cursor, horizon))
        .order_by(FeedChange.txid, FeedChange.id)
        .limit(limit + 1)
    )
    rows = session.execute(query).all()
    page = rows[:limit]
    return FeedPage(
        changes=[_as_held(change, parcel, station_id, courier_id) for change, parcel in page],
        next_cursor=Cursor(page[-1][0].txid, page[-1][0].id) if page else cursor,
        has_more=len(rows) > limit,
    )


def _after(
    station_id: int, courier_id: int, cursor: Cursor, horizon: int | None
) -> list[ColumnElement[bool]]:
    """The courier's final entries (below the horizon) after ``cursor``'s position."""
    where = [
        FeedChange.station_id == station_id,
        FeedChange.courier_id == courier_id,
        tuple_(FeedChange.txid, FeedChange.id) > tuple_(cursor.txid, cursor.id),
    ]
    if horizon is not None:
        where.append(FeedChange.txid < horizon)
    return where


def _as_held(
    change: FeedChange, parcel: Parcel | None, station_id: int, courier_id: int
) -> FeedItem:
    """An entry as the PDA should apply it now. A parcel moved to another station is
    only ever sent as its tombstone (its new station's recipient and address are not
    this courier's to read), whatever the entry was about; an update of a parcel (its
    data, its consents) the courier no longer holds too. The answer to a consent
    request reaches the courier who asked at the station, holder or not (a
    colleague's parcel at the door)."""
    if parcel is not None and (
        parcel.station_id != station_id
        or (change.kind != FeedKind.CONSENT_REQUEST and parcel.courier_id != courier_id)
    ):
        return FeedItem(FeedKind.PARCEL_REMOVED, change.tracking_no, None)
    return FeedItem(change.kind, change.tracking_no, parcel)


def _head(
    session: Session, station_id: int, courier_id: int, horizon: int | None
) -> tuple[int, int]:
    """The courier's newest feed entry that is final (below the horizon)."""
    query = (
        select(FeedChange.txid, FeedChange.id)
        .where(FeedChange.station_id == station_id, FeedChange.courier_id == courier_id)
        .order_by(FeedChange.txid.desc(), FeedChange.id.desc())
        .limit(1)
    )
    if horizon is not None:
        query = query.where(FeedChange.txid < horizon)
    row = session.execute(query).first()
    return (row.txid, row.id) if row else (START.txid, START.id)


def _snapshot_page(
    session: Session,
    station_id: int,
    courier_id: int,
    cursor: Cursor,
    limit: int,
    horizon: int | None,
) -> FeedPage:
    """A page of the snapshot. Its last page hands over the feed cursor where the
    snapshot began, and says ``has_more`` only when the feed already holds a final entry
    after it (one query on the reader's index, ``LIMIT 1``): a PDA holding few parcels
    needs no second request to learn that nothing followed. An entry not final yet (its
    transaction still running, above the horizon) is not counted, as a feed page would
    not return it; the cursor stays before it, so the next pull gets it."""
    assert cursor.snapshot_after is not None
    parcels = session.scalars(
        select(Parcel)
        .where(
            Parcel.station_id == station_id,
            Parcel.courier_id == courier_id,
            Parcel.id > cursor.snapshot_after,
            or_(Parcel.status.is_(None), Parcel.status.not_in(DONE)),
        )
        .order_by(Parcel.id)
        .limit(limit + 1)
    ).all()
    page = parcels[:limit]
    changes = [FeedItem(FeedKind.PARCEL, parcel.tracking_no, parcel) for parcel in page]
    if len(parcels) > limit:
        snapshot_cursor = Cursor(cursor.txid, cursor.id, snapshot_after=page[-1].id)
        return FeedPage(changes=changes, next_cursor=snapshot_cursor, has_more=True)
    # The snapshot is complete: on with the feed, from where the snapshot began.
    feed_cursor = cursor.position
    newer = session.scalar(
        select(FeedChange.id).where(*_after(station_id, courier_id, feed_cursor, horizon)).limit(1)
    )
    return FeedPage(changes=changes, next_cursor=feed_cursor, has_more=newer is not None)


def _could_have_been_issued(
    session: Session, cursor: Cursor, horizon: int | None, station_id: int, courier_id: int
) -> bool:
    """A cursor this database handed to this courier points at one of the courier's own
    entries at this station (a page's last, or the newest when a snapshot began), of a
    transaction below the horizon then, and so below it now (the horizon only moves up).
    One from another database (a restored backup, another cluster) usually fails these
    checks. So does one left on a shared PDA by another courier's pulls, or one from
    the courier's previous station: read from there, it would skip this courier's
    entries before it (parcels assigned earlier would never reach the PDA)."""
    entry = session.execute(
        select(FeedChange.txid, FeedChange.station_id, FeedChange.courier_id).where(
            FeedChange.id == cursor.id
        )
    ).first()
    if entry is None or tuple(entry) != (cursor.txid, station_id, courier_id):
        return False
    return horizon is None or cursor.txid < horizon


# The oldest transaction still running that may write to this database: the lowest
# in-progress id of the current snapshot (its xmin, or its xmax when none runs), leaving
# out the ids of sessions connected to another database, which cannot write the feed. An
# id pg_stat_activity does not place (another role's session, whose details it hides, or
# a background process) is kept. An id belongs to one transaction for good, so even an
# activity row read before the snapshot places it rightly. Its 32-bit ``backend_xid`` is
# the 64-bit id modulo 2^32: ids still running lie within 2^31 of each other.
_HORIZON = text(
    """
    WITH snapshot AS (SELECT pg_current_snapshot() AS s),
    elsewhere AS (
        SELECT backend_xid::text::bigint AS xid FROM pg_stat_activity
        WHERE backend_xid IS NOT NULL AND datname <> current_database()
    )
    SELECT coalesce(
        (
            SELECT min(running::text::bigint)
            FROM snapshot, pg_snapshot_xip(snapshot.s) AS running
            WHERE mod(running::text::bigint, 4294967296) NOT IN (SELECT xid FROM elsewhere)
        ),
        (SELECT pg_snapshot_xmax(s)::text::bigint FROM snapshot)
    )
    """
)


def _visible_horizon(session: Session) -> int | None:
    """The oldest transaction id still running on this database: entries below it are
    final. A transaction on another database of the server (another service's, a
    migration elsewhere) holds no pull back (``_HORIZON``)."""
    if session.get_bind().dialect.name != "postgresql":
        return None
    return int(session.scalar(_HORIZON))


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
