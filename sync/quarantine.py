"""Reading the quarantine: what PDAs sent that could not be accepted.

Managers and admins read it (rule 1: rejected events stay visible to managers), and
auditors across stations: a drop the PDA sent and the server refused is evidence in a
dispute ("never delivered"). A phone number in what the PDA sent is shown masked but to
auditors (rule 7), in the list (``GET /api/v1/quarantine``) as on a shift's page; an
auditor's read is audit-logged there (``quarantine_searched``).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, and_, false, func, or_, select
from sqlalchemy.orm import Session

from models import QuarantinedEvent, SyncBatch
from sync.paging import (
    MAX_PAGE_SIZE,
    NOTHING_WALKED,
    WalkCursor,
    WalkDigest,
    check_walk,
    same_search,
    walk_digest,
    walk_sums,
)
from sync.phones import mask_phones_in, mask_phones_in_json, shown_text
from sync.sql import among_at_once, chunks
from sync.tracking import normalize
from sync.wording import counted

# A shift's page lists this many of its PDA's rejected events at most (a broken PDA
# may send thousands); the list API has them all.
SHIFT_REJECTIONS_SHOWN = 100
# Shifts whose rejected events one statement counts (``rejection_counts``): a station's
# day, well within SQLite's expression depth (1,000: each shift is a term of one OR).
COUNTED_AT_ONCE = 200
# The longest parcel number a rejected event is kept naming (its column's length).
PARCEL_LENGTH = 40

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
    "resent_seq",
)
# Copied from the rejected event as the PDA sent it (or named after a key it sent).
SENT_BY_THE_PDA = ("client_event_id", "event_type", "tracking_no", "field")


class PushedIn(NamedTuple):
    """The push a rejected event came in: its ``batch_id``, the courier signed in on the
    PDA who pushed it (``courier_id``, as a timeline's ``pushed_by``), and the PDA's
    clock offset the server estimated for it (``clock_offset_ms``, the PDA's clock minus
    the server's), by which the time the PDA wrote is put on the server's clock."""

    batch_id: uuid.UUID
    courier_id: int
    clock_offset_ms: int


@dataclass(frozen=True)
class QuarantineFilter:
    """What a list of rejected events is of: a station's (None: every station's), a
    PDA's, those naming a parcel."""

    station_id: int | None = None
    device_id: str | None = None
    tracking_no: str | None = None


def _matching(filters: QuarantineFilter) -> list[ColumnElement[bool]]:
    """The conditions a rejected event matching ``filters`` meets."""
    conditions: list[ColumnElement[bool]] = []
    if filters.station_id is not None:
        conditions.append(QuarantinedEvent.station_id == filters.station_id)
    if filters.device_id is not None:
        conditions.append(QuarantinedEvent.device_id == filters.device_id)
    if filters.tracking_no is not None:
        conditions.append(naming(filters.tracking_no))
    return conditions


def list_quarantined(
    *,
    session: Session,
    station_id: int | None,
    device_id: str | None = None,
    tracking_no: str | None = None,
    before_id: int | None = None,
    limit: int = 100,
    as_of: int | None = None,
) -> Sequence[tuple[QuarantinedEvent, PushedIn]]:
    """Newest first, each with the push it came in; ``before_id`` is the last id of the
    previous page; ``as_of``: none above it.

    ``tracking_no``: the events naming that parcel (``naming``), however the PDA wrote
    the number and however it is asked for.

    The pushes are read apart, by their ids (``pushes_by_id``): joined in the page's
    statement, PostgreSQL hashed every push ever stored (a Seq Scan of ``sync_batch``)
    to match a station's page of 100, on every page of ``?station_id=``."""
    filters = QuarantineFilter(station_id, device_id, tracking_no)
    query = (
        select(QuarantinedEvent)
        .where(*_matching(filters))
        .order_by(QuarantinedEvent.id.desc())
        .limit(min(limit, MAX_PAGE_SIZE))
    )
    if before_id is not None:
        query = query.where(QuarantinedEvent.id < before_id)
    if as_of is not None:
        query = query.where(QuarantinedEvent.id <= as_of)
    rows = session.scalars(query).all()
    pushes = pushes_by_id(session, {row.batch_pk for row in rows})
    return [(row, pushes[row.batch_pk]) for row in rows]


def pushes_by_id(session: Session, batch_pks: Iterable[int]) -> dict[int, PushedIn]:
    """The pushes ``batch_pks`` name (``SyncBatch.id``), by it: probes of its key."""
    found: dict[int, PushedIn] = {}
    for chunk in chunks(sorted(set(batch_pks))):
        rows = session.execute(
            select(
                SyncBatch.id, SyncBatch.batch_id, SyncBatch.courier_id, SyncBatch.clock_offset_ms
            ).where(SyncBatch.id.in_(chunk))
        )
        found.update((pk, PushedIn(*pushed)) for pk, *pushed in rows)
    return found


def search_key(filters: QuarantineFilter) -> str:
    """A digest of what a list of rejected events matches (its filters, the reader's
    station among them, a parcel's number as ``naming`` reads it): 16 hex digits. A
    walk's cursor carries it, so that one sent with other filters is refused."""
    values = {
        "station_id": filters.station_id,
        "device_id": filters.device_id,
        "parcel": None if filters.tracking_no is None else parcel_named(filters.tracking_no),
        "named": filters.tracking_no is not None,
    }
    text = json.dumps(values, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class QuarantineWalkPage:
    rows: Sequence[tuple[QuarantinedEvent, PushedIn]]
    # The highest id of a rejected event the walk reads: its first page's, every page.
    as_of: int
    # Where the walk goes on; None on its last page.
    next_cursor: WalkCursor | None
    # Rejected events matching with an id above ``as_of``: stored since the walk began.
    arrived_since: int
    # How many rejected events the walk showed before this page.
    offset: int = 0


def walk_quarantined(
    *, session: Session, filters: QuarantineFilter, cursor: WalkCursor | None, limit: int
) -> QuarantineWalkPage:
    """A page of a walk through the rejected events matching ``filters``, newest first:
    at most ``limit``, from the start or from where ``cursor`` (a page's
    ``next_cursor``) stands.

    As a proof search's walk (``sync.proofs.search_page``): the walk reads the rejected
    events with an id up to ``as_of``, the highest at its first page. An id is taken
    when a push stores the event, not when it commits: on PostgreSQL a push committing
    late holds an id among those already shown, and a page read by ``before_id`` below
    them never saw it (an auditor took its absence for none). Its last page counts the
    matching rejected events up to ``as_of`` and sums a mix of their ids (one statement,
    an index's) to compare their number and digest with those the walk showed: a
    difference is a ``CursorReset`` (410: search again) rather than a last page of a
    walk that left one out. Later ones are counted (``arrived_since``)."""
    limit = min(limit, MAX_PAGE_SIZE)
    key = search_key(filters)
    same_search(cursor, key, of="list")
    listed = {
        "session": session,
        "station_id": filters.station_id,
        "device_id": filters.device_id,
        "tracking_no": filters.tracking_no,
        "limit": limit + 1,
    }
    if cursor is None:
        rows = list_quarantined(**listed)
        as_of, offset, walked = (rows[0][0].id if rows else 0), 0, NOTHING_WALKED
    else:
        as_of, offset, walked = cursor.as_of, cursor.offset, cursor.walked
        rows = list_quarantined(**listed, before_id=cursor.after, as_of=as_of)
    more = len(rows) > limit
    rows = rows[:limit]
    ids = [row.id for row, _ in rows]
    walked = walk_digest(ids, walked)
    if cursor is not None and not more:
        _check_walk(session, filters, as_of, offset + len(ids), walked)
    arrived = select(func.count(QuarantinedEvent.id)).where(
        *_matching(filters), QuarantinedEvent.id > as_of
    )
    return QuarantineWalkPage(
        rows=rows,
        as_of=as_of,
        next_cursor=WalkCursor(as_of, offset + len(ids), ids[-1], walked, key) if more else None,
        arrived_since=session.scalar(arrived) or 0,
        offset=offset,
    )


def _check_walk(
    session: Session, filters: QuarantineFilter, as_of: int, count: int, walked: WalkDigest
) -> None:
    """Refuse a walk's last page when the rejected events matching ``filters`` up to
    ``as_of`` are not the ``count`` the walk showed (``sync.paging.check_walk``)."""
    sums = select(*walk_sums(QuarantinedEvent.id)).where(
        *_matching(filters), QuarantinedEvent.id <= as_of
    )
    check_walk(
        session,
        sums,
        count=count,
        walked=walked,
        showed=f"{counted(count, 'rejected event')} up to id {as_of}",
        why="rejected events with ids among those its pages showed were stored after the "
        "walk passed them (a push committing late); list them again from the start",
    )


def parcel_named(tracking_no: str | None) -> str | None:
    """The parcel a rejected event names (``QuarantinedEvent.parcel_tracking_no``): the
    number the PDA wrote (``tracking_no`` as kept: a string of at most 40 characters)
    normalized as parcels' numbers are stored (``sync.tracking.normalize``: NFKC, no
    spaces or dashes, upper case). A rejected event is where a badly typed number is
    likely, and ``rr 4731 2482 9gb`` names RR473124829GB. None: it wrote none, or one
    that normalizes to nothing, to more than the column holds (NFKC expands some
    characters), or to what no column can store (a NUL, a lone surrogate).

    Migration ``effb064af2ab`` computed the same for the rows kept before it, with a
    frozen copy of this and of ``normalize``: a change to either needs a migration of
    its own to compute the rows kept before it again, and ``rejected_image.tracking_no``
    with them (a copy of it, ``sync.ingest``)."""
    if tracking_no is None:
        return None
    parcel = normalize(tracking_no)
    if not parcel or len(parcel) > PARCEL_LENGTH:
        return None
    if any(ch == "\x00" or "\ud800" <= ch <= "\udfff" for ch in parcel):
        return None
    return parcel


def images_named(raw: Any) -> list[str]:
    """The proof images a rejected event's POD names (``pod.signature_sha256``,
    ``pod.photo_sha256``), as images are named: 64 hexadecimal digits, lower case. An
    auditor's read of one is filed under the parcel the event names (``RejectedImage``).

    Migration ``e8c2a6f4d1b7`` computed the same for the rows kept before it, with a
    frozen copy of this: a change here needs a migration of its own."""
    pod = raw.get("pod") if isinstance(raw, Mapping) else None
    if not isinstance(pod, Mapping):
        return []
    named = (pod.get(key) for key in ("signature_sha256", "photo_sha256"))
    digests = (value.lower() for value in named if isinstance(value, str))
    return list(dict.fromkeys(d for d in digests if _DIGEST.fullmatch(d)))


_DIGEST = re.compile(r"[0-9a-f]{64}")


def naming(tracking_no: str) -> ColumnElement[bool]:
    """The rejected events naming the parcel ``tracking_no`` (``parcel_named``), however
    the PDA wrote the number and however the reader writes it: a range of
    ``ix_quarantined_event_parcel``."""
    parcel = parcel_named(tracking_no)
    if parcel is None:
        return false()
    return QuarantinedEvent.parcel_tracking_no == parcel


def count_naming(*, session: Session, tracking_no: str, station_id: int | None) -> int:
    """How many rejected events name the parcel (``naming``), pushed at ``station_id``
    (None: any station's): what ``list_quarantined`` with ``tracking_no`` lists, counted
    in one statement (a proof's detail says how many; the list shows them)."""
    query = select(func.count()).select_from(QuarantinedEvent).where(naming(tracking_no))
    if station_id is not None:
        query = query.where(QuarantinedEvent.station_id == station_id)
    return session.scalar(query) or 0


def naming_counted(
    *, session: Session, tracking_no: str, station_id: int | None, limit: int
) -> tuple[list[QuarantinedEvent], int]:
    """The newest ``limit`` rejected events naming the parcel (``naming``), pushed at
    ``station_id`` (None: any station's), and how many there are in all (``count_naming``),
    in one statement (a count over the rows before the limit): a proof's page lists the
    newest and says how many, as its detail in the API counts them."""
    query = (
        select(QuarantinedEvent, func.count().over())
        .where(naming(tracking_no))
        .order_by(QuarantinedEvent.id.desc())
        .limit(limit)
    )
    if station_id is not None:
        query = query.where(QuarantinedEvent.station_id == station_id)
    rows = session.execute(query).all()
    return [row for row, _ in rows], rows[0][1] if rows else 0


class RejectionScope(NamedTuple):
    """Which of its PDA's rejected events are a shift's: those of ``device_id`` whose seq
    is among ``seqs`` (``(first, last)``, the seqs the shift owns,
    ``sync.handover.owned_seqs``; None: it owns none), and those without a seq that
    name one of its parcels (``tracking_nos``, as parcels' are stored: matched to the
    number each names, ``parcel_named``, however its PDA wrote it)."""

    device_id: str
    seqs: tuple[int, int] | None
    tracking_nos: Sequence[str]


def _owned_by(session: Session, scope: RejectionScope) -> ColumnElement[bool] | None:
    """The rejected events ``scope`` names (None: none), as branches of one OR that
    each begin with the device: each is a range of ``ix_quarantined_event_device_seq``."""
    device = QuarantinedEvent.device_id == scope.device_id
    owned = []
    if scope.seqs is not None:
        # Not a seq_conflict settled: its event is held under a new seq, that seq's
        # shift's (``sync.ingest``), so nothing of this one's was lost.
        owned.append(
            and_(
                device,
                QuarantinedEvent.seq.between(*scope.seqs),
                QuarantinedEvent.resent_seq.is_(None),
            )
        )
    if scope.tracking_nos:
        owned.append(
            and_(
                device,
                QuarantinedEvent.seq.is_(None),
                among_at_once(session, QuarantinedEvent.parcel_tracking_no, scope.tracking_nos),
            )
        )
    return or_(*owned) if owned else None


def shift_rejections_counted(
    *,
    session: Session,
    scope: RejectionScope,
    station_id: int | None,
    limit: int = SHIFT_REJECTIONS_SHOWN,
) -> tuple[list[QuarantinedEvent], int]:
    """A shift's PDA's rejected events that were the shift's (``scope``): the first
    ``limit`` in seq order, and how many there are in all, in one statement (a count
    over the rows before the limit), along ``ix_quarantined_event_device_seq``: a
    shift's page lists the first ones and says how many there are, as the board counts
    them (``rejection_counts``), with no statement more for a PDA that sent thousands.
    ``station_id``: only what was pushed at that station (None: any)."""
    owned = _owned_by(session, scope)
    if owned is None:
        return [], 0
    query = (
        select(QuarantinedEvent, func.count().over())
        .where(owned)
        .order_by(QuarantinedEvent.seq.nulls_last(), QuarantinedEvent.id)
        .limit(limit)
    )
    if station_id is not None:
        query = query.where(QuarantinedEvent.station_id == station_id)
    rows = session.execute(query).all()
    return [row for row, _ in rows], rows[0][1] if rows else 0


def rejection_counts(
    *, session: Session, scopes: Mapping[int, RejectionScope], station_id: int
) -> dict[int, int]:
    """How many rejected events each shift has (``{shift id: count}``, those with none
    left out), as ``shift_rejections_counted`` finds them, pushed at ``station_id``. One
    statement per ``COUNTED_AT_ONCE`` shifts: a count per shift over the rows its own
    scope picks, of the rows any scope picks (a row two shifts own counts for both, as
    each one's page lists it)."""
    owned = [
        (shift_id, where)
        for shift_id, scope in sorted(scopes.items())
        if (where := _owned_by(session, scope)) is not None
    ]
    found: dict[int, int] = {}
    for chunk in chunks(owned, COUNTED_AT_ONCE):
        counts = session.execute(
            select(*(func.count().filter(where) for _, where in chunk)).where(
                QuarantinedEvent.station_id == station_id, or_(*(where for _, where in chunk))
            )
        ).one()
        found.update({shift_id: n for (shift_id, _), n in zip(chunk, counts, strict=True) if n})
    return found


def rejections_by_id(
    *, session: Session, ids: Sequence[int], station_id: int | None
) -> list[QuarantinedEvent]:
    """The rejected events with these quarantine ids (a flag's ``rejected_event_ids``), in
    id order; ``station_id``: only those pushed at that station (None: any)."""
    if not ids:
        return []
    query = select(QuarantinedEvent).where(among_at_once(session, QuarantinedEvent.id, ids))
    if station_id is not None:
        query = query.where(QuarantinedEvent.station_id == station_id)
    return list(session.scalars(query.order_by(QuarantinedEvent.id)))


def parcels_named_by(*, session: Session, ids: Sequence[int]) -> list[str]:
    """The parcels the rejected events ``ids`` name (``parcel_tracking_no``; those naming
    none add none), by their primary key: what a page showing them files an auditor's
    read under, as a proof search is filed under its proofs' parcels."""
    if not ids:
        return []
    return sorted(
        set(
            session.scalars(
                select(QuarantinedEvent.parcel_tracking_no).where(
                    among_at_once(session, QuarantinedEvent.id, sorted(set(ids))),
                    QuarantinedEvent.parcel_tracking_no.is_not(None),
                )
            )
        )
    )


def owned_rejections(*, session: Session, scope: RejectionScope, ids: Sequence[int]) -> list[int]:
    """Which of the rejected events ``ids`` are the shift's (``scope``), as
    ``shift_rejections_counted`` finds them: whether those that reopened a signed-off shift
    still are (``sync.shifts.signoff_delta``)."""
    owned = _owned_by(session, scope)
    if owned is None or not ids:
        return []
    return list(
        session.scalars(
            select(QuarantinedEvent.id)
            .where(owned, QuarantinedEvent.id.in_(sorted(set(ids))))
            .order_by(QuarantinedEvent.id)
        )
    )


def rejections_of_batch(
    *, session: Session, scopes: Mapping[int, RejectionScope], batch_pk: int, station_id: int
) -> dict[int, list[int]]:
    """Which rejected events of one push each shift has (``{shift id: quarantine ids}``,
    those with none left out), as ``shift_rejections_counted`` finds them, pushed at
    ``station_id``: one statement, over the rows that push quarantined. What reopens a
    signed-off shift whose PDA sent it a malformed event (``sync.ingest``)."""
    owned = [
        (shift_id, where)
        for shift_id, scope in sorted(scopes.items())
        if (where := _owned_by(session, scope)) is not None
    ]
    found: dict[int, list[int]] = {}
    for chunk in chunks(owned, COUNTED_AT_ONCE):
        rows = session.execute(
            select(QuarantinedEvent.id, *(where for _, where in chunk))
            .where(
                QuarantinedEvent.batch_pk == batch_pk,
                QuarantinedEvent.station_id == station_id,
                or_(*(where for _, where in chunk)),
            )
            .order_by(QuarantinedEvent.id)
        )
        for row_id, *owners in rows:
            for (shift_id, _), owns in zip(chunk, owners, strict=True):
                if owns:
                    found.setdefault(shift_id, []).append(row_id)
    return found


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
