"""Proofs of delivery, as an auditor settling a complaint reads them.

A proof is a delivery event (in person, to a locker, to a pickup point) with
its POD, the parcel's event chain (whole up to 500 events, else the 500 nearest the
delivery: ``sync.parcels.timeline_around``), the consent that authorized an
unattended drop (or that none did) and the parcel's flags. A page of proofs or an
export's batch gets each drop's consent at once (``proofs_consents``).

A delivery of a tracking number the station never took in is a proof too (rule 1
kept it, flagged ``unknown_parcel``): without its parcel it has no recipient, class
or address, and belongs to the station where it was recorded, as its flag does.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, String, and_, cast, exists, func, or_, select
from sqlalchemy.orm import Session

from models import Consent, EventType, Flag, FlagStatus, Parcel, ScanEvent
from models.sync import DELIVERY_TYPES
from sync.blobs import BlobStore, Integrity, blobs_by_digest, stored_integrity
from sync.consents import consents_by_id, consents_for
from sync.errors import InvalidInput, NotFound
from sync.flags import cited_events, event_subject_keys
from sync.handover import HANDOVER_KINDS
from sync.paging import (
    MAX_PAGE_SIZE,
    NOTHING_WALKED,
    WalkCursor,
    WalkDigest,
    check_walk,
    same_search,
    summed_walk,
    walk_digest,
    walk_sums,
)
from sync.parcels import TimelineEntry, timeline_around
from sync.projection import voided_in_sql
from sync.rules import (
    DROPS,
    RULE_KINDS,
    EventDetail,
    Policy,
    authorizes,
    drop_span,
    first_scans,
    haversine_m,
    judged_scan,
    needs_consent,
)
from sync.sql import among_at_once
from sync.status import load_events
from sync.tracking import normalize
from sync.wording import counted

# The kinds the search's ``flag_kind`` finds: flags of the parcel (its rules, its PDAs'
# time inversions, a wrong station's scans, a tracking number not taken in) and of its
# handover in the delivery's shift. A shift's or a PDA's own flags are found at /flags.
SEARCHABLE_FLAG_KINDS = (
    *RULE_KINDS,
    "time_inversion",
    "wrong_station",
    "unknown_parcel",
    *HANDOVER_KINDS,
)

METHODS = {
    "in_person": EventType.DELIVERED,
    "locker": EventType.DELIVERED_TO_LOCKER,
    "pickup_point": EventType.DELIVERED_TO_PICKUP_POINT,
}


@dataclass(frozen=True)
class ProofFilter:
    station_id: int | None = None
    tracking_no: str | None = None
    courier_id: int | None = None
    occurred_from: dt.datetime | None = None
    occurred_to: dt.datetime | None = None
    flag_kind: str | None = None
    method: str | None = None
    # ``flag_kind`` counts only this station's flags (a station-bound reader's: a parcel
    # taken in elsewhere keeps each station's flags its own); None: every station's.
    flags_of_station: int | None = None


@dataclass(frozen=True)
class Proof:
    event: ScanEvent
    parcel: Parcel | None  # None: its tracking number was never taken in
    distance_m: float | None
    voided: bool  # a later correction of its device voided this delivery

    @property
    def station_id(self) -> int:
        """Whose proof it is (``proof_station``)."""
        return proof_station(self.event, self.parcel)

    @property
    def clock_offset_ms(self) -> int:
        """The correction its time was given, in whole milliseconds: its PDA's clock
        minus the server's, as estimated from the PDA's pushes (``occurred_at_device`` -
        ``occurred_at``)."""
        gap = self.event.occurred_at_device - self.event.occurred_at
        return round(gap / dt.timedelta(milliseconds=1))


def proof_station(event: ScanEvent, parcel: Parcel | None) -> int:
    """Whose proof a delivery is: its parcel's station, or for a tracking number not
    taken in (``parcel`` None) the station where it was recorded (``at_station`` in
    SQL)."""
    return event.station_id if parcel is None else parcel.station_id


@dataclass(frozen=True)
class DropConsent:
    """For a locker or pickup-point drop: the consent that authorized it, if any."""

    required: bool  # the parcel's class may be left unattended only with consent
    consent: Consent | None  # the first consent in force before the drop (rule 4)


@dataclass(frozen=True)
class ProofDetail:
    proof: Proof
    timeline: list[TimelineEntry]
    # A locker or pickup-point drop's consent; None: in person, a parcel not taken in,
    # or a drop a correction voided (not judged)
    drop: DropConsent | None
    flags: list[Flag]
    # For a drop: when it may have happened, as rule 4 judges it (``sync.rules.
    # drop_span``: its two clocks, its PDA's events around it by seq, its push's
    # arrival). A consent authorizes it only if granted before the first and in force
    # at the second: what an auditor needs when the drop's own stamp says otherwise.
    judged_between: tuple[dt.datetime, dt.datetime] | None = None
    # A repeated scan of an outcome scanned before: that first scan's event id
    # (``repeats_of``); None: a delivery of its own.
    repeat_of: int | None = None
    # Where ``timeline`` starts in the parcel's whole timeline (0: its first event), and
    # how many events that holds: all of them when no more than a page, else the page's
    # worth nearest the delivery (``sync.parcels.timeline_around``).
    timeline_offset: int = 0
    timeline_total: int = 0

    @property
    def voided(self) -> bool:
        return self.proof.voided

    @property
    def authorizing_consent(self) -> Consent | None:
        """For a drop: the consent in force before it; None: none did, in person, a
        parcel not taken in, or a voided drop (not judged)."""
        return None if self.drop is None else self.drop.consent

    @property
    def consent_required(self) -> bool | None:
        """For a drop: whether its parcel's class needed a consent; None: in person, a
        parcel not taken in (its class is unknown), or a voided drop (not judged)."""
        return None if self.drop is None else self.drop.required

    @property
    def proofs_shown(self) -> list[int]:
        """Ids of the deliveries whose POD this detail shows: its own and, in the parcel's
        timeline, any other (a mis-tap voided, the delivery after it): an auditor's read
        names them all."""
        return deliveries_shown(e.event for e in self.timeline)


def deliveries_shown(events: Iterable[ScanEvent]) -> list[int]:
    """The ids of the deliveries among ``events`` (in person, locker, pickup point), in
    order, once each: the proofs a read showing them shows, as an auditor's entry names
    them (a proof's, a parcel's timeline's, a shift's or a flag's page). Every delivery,
    with a POD or without: one sent without (``delivered_without_pod``) is a proof the
    search lists all the same, and the read showed it."""
    return sorted({event.id for event in events if event.type in DELIVERY_TYPES})


def check_filters(filters: ProofFilter) -> None:
    """Raise ``InvalidInput`` for filters no search can take (before any is run: an
    export streams its answer and cannot turn into an error once it has begun)."""
    if filters.method is not None and filters.method not in METHODS:
        raise InvalidInput(
            f"method is one of {', '.join(METHODS)}", code="invalid_method", field="method"
        )
    if (
        filters.occurred_from
        and filters.occurred_to
        and filters.occurred_from >= filters.occurred_to
    ):
        raise InvalidInput(
            "occurred_from must be before occurred_to", code="invalid_range", field="occurred_to"
        )


def at_station(station_id: int) -> ColumnElement[bool]:
    """SQL: the delivery is a proof of ``station_id`` (``Proof.station_id``): its
    parcel's station, or where it was recorded when no parcel has its tracking number.
    One probe of the parcel's tracking number per delivery."""
    parcels_station = (
        select(Parcel.station_id)
        .where(Parcel.tracking_no == ScanEvent.tracking_no)
        .scalar_subquery()
    )
    return func.coalesce(parcels_station, ScanEvent.station_id) == station_id


def _query(filters: ProofFilter) -> Select[tuple[ScanEvent, bool]]:
    """The deliveries matching ``filters``; their parcels are read apart (``_proofs``):
    joined, a delivery of a parcel not taken in needs an outer join, for which the
    planner reads the whole parcel table to match a day's deliveries."""
    check_filters(filters)
    types = [METHODS[filters.method]] if filters.method else list(DELIVERY_TYPES)
    query = select(ScanEvent, voided_in_sql(ScanEvent).label("voided")).where(
        ScanEvent.type.in_(types)
    )
    if filters.station_id is not None:
        query = query.where(at_station(filters.station_id))
    if filters.tracking_no:
        query = query.where(ScanEvent.tracking_no == normalize(filters.tracking_no))
    if filters.courier_id is not None:
        query = query.where(ScanEvent.courier_id == filters.courier_id)
    if filters.occurred_from is not None:
        query = query.where(ScanEvent.occurred_at >= filters.occurred_from)
    if filters.occurred_to is not None:
        query = query.where(ScanEvent.occurred_at < filters.occurred_to)
    if filters.flag_kind:
        handover_key = cast(ScanEvent.shift_id, String) + ":" + ScanEvent.tracking_no
        flagged = [
            or_(
                and_(Flag.subject_type == "parcel", Flag.subject_key == ScanEvent.tracking_no),
                # its handover in the delivery's shift (missing_at_handover, ...)
                and_(
                    Flag.subject_type == "shift",
                    Flag.shift_id == ScanEvent.shift_id,
                    Flag.subject_key == handover_key,
                ),
            ),
            Flag.kind == filters.flag_kind,
            # closed: the system found its cause gone (a consent arrived late): the
            # parcel has no such flag; one a manager resolved was real and counts
            Flag.status != FlagStatus.CLOSED,
        ]
        if filters.flags_of_station is not None:
            flagged.append(Flag.station_id == filters.flags_of_station)
        query = query.where(exists().where(*flagged))
    return query


def list_proofs(
    *, session: Session, filters: ProofFilter, after_id: int = 0, limit: int = 100
) -> list[Proof]:
    """Oldest event first, from ``after_id``."""
    query = (
        _query(filters)
        .where(ScanEvent.id > after_id)
        .order_by(ScanEvent.id)
        .limit(min(limit, MAX_PAGE_SIZE))
    )
    return _proofs(session, session.execute(query).all())


def search_key(filters: ProofFilter) -> str:
    """A digest of what a search matches (its filters, the reader's station among them, a
    tracking number as normalized): 16 hex digits. A walk's cursor carries it, so that a
    cursor sent with other filters is refused rather than gone on from elsewhere."""
    values = {name: None if v is None else str(v) for name, v in vars(filters).items()}
    if filters.tracking_no:
        values["tracking_no"] = normalize(filters.tracking_no)
    text = json.dumps(values, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# A proof search's walk's cursor (``sync.paging.WalkCursor``, ``search`` its
# ``search_key``).
SearchCursor = WalkCursor


@dataclass(frozen=True)
class SearchPage:
    proofs: list[Proof]
    # The highest id of a delivery the walk reads: its first page's, every page.
    as_of: int
    # Where the walk goes on; None on its last page.
    next_cursor: SearchCursor | None
    # Deliveries matching the search with an id above ``as_of``: stored since the walk
    # began, in no page of it.
    arrived_since: int
    # How many deliveries the walk showed before this page.
    offset: int = 0


def search_page(
    *, session: Session, filters: ProofFilter, cursor: SearchCursor | None, limit: int
) -> SearchPage:
    """A page of a walk through the proofs matching ``filters``: at most ``limit``, by id,
    from the start or from where ``cursor`` (a page's ``next_cursor``) stands.

    A walk reads the deliveries matching the search whose id is at most ``as_of``, the
    highest there was at its first page; later ones are counted (``arrived_since``). An
    id is taken when a push stores the event, not when it commits: on PostgreSQL a push
    committing late holds a lower id than deliveries already shown, and a page read by
    id after them never saw it (paging by ``after_id`` skips it, and an auditor takes
    its absence for none). One committed late above the last shown comes in a later
    page, as any does; below it, the walk's last page finds it: it counts the matching
    deliveries up to ``as_of`` (one statement summing a mix of their ids, an index's)
    against those the walk showed (the cursor carries their number and their digest,
    ``walk_digest``), and a difference is a ``CursorReset`` (a 410: search again,
    naming how many the walk showed and how many match) rather than a last page of a
    walk that left one out. So every matching delivery with an id up to ``as_of``
    committed before the walk's last page was read is in exactly one page of it, or
    that page is refused. The same happens
    when what matches changed below it (a flag of ``flag_kind`` raised or closed, a
    parcel moved to another station, a delivery's courier: a PDA handed over with its
    shift left open pushes the first courier's deliveries under the next one's sign-in,
    and the shift's close files them as its courier's, ``sync.shifts``). Pages before
    the last read only their rows."""
    limit = min(limit, MAX_PAGE_SIZE)
    key = search_key(filters)
    same_search(cursor, key, of="search")
    query = _query(filters).order_by(ScanEvent.id).limit(limit + 1)
    if cursor is None:
        rows = session.execute(query).all()
        as_of = rows[-1][0].id if rows else 0
        if len(rows) > limit:  # more follow: the walk reads up to the highest there is
            highest = _query(filters).with_only_columns(func.max(ScanEvent.id))
            as_of = max(as_of, session.scalar(highest) or 0)
        offset, walked = 0, NOTHING_WALKED
    else:
        as_of, offset, walked = cursor.as_of, cursor.offset, cursor.walked
        rows = session.execute(
            query.where(ScanEvent.id > cursor.after, ScanEvent.id <= as_of)
        ).all()
    page = _proofs(session, rows[:limit])
    ids = [proof.event.id for proof in page]
    walked = walk_digest(ids, walked)
    more = len(rows) > limit
    if cursor is not None and not more:
        _check_walk(session, filters, as_of, offset + len(ids), walked)
    arrived = _query(filters).with_only_columns(func.count(ScanEvent.id))
    return SearchPage(
        proofs=page,
        as_of=as_of,
        next_cursor=SearchCursor(as_of, offset + len(ids), ids[-1], walked, key) if more else None,
        arrived_since=session.scalar(arrived.where(ScanEvent.id > as_of)) or 0,
        offset=offset,
    )


def _check_walk(
    session: Session, filters: ProofFilter, as_of: int, count: int, walked: WalkDigest
) -> None:
    """Refuse a walk's last page when the deliveries matching ``filters`` up to ``as_of``
    are not the ``count`` the walk showed (``sync.paging.check_walk``)."""
    sums = _query(filters).with_only_columns(*walk_sums(ScanEvent.id))
    check_walk(
        session,
        sums.where(ScanEvent.id <= as_of),
        count=count,
        walked=walked,
        showed=f"{counted(count, 'delivery', 'deliveries')} matching the search up to event "
        f"{as_of}",
        why="deliveries with ids below those its pages showed were stored after the walk "
        "passed them (a push committing late), or came to match it or stopped matching it "
        "(a flag raised or closed, a parcel moved to another station, deliveries pushed "
        "under another courier's sign-in until a shift's close filed them as its "
        "courier's); search again from the start",
    )


def iter_proof_batches(
    *, session: Session, filters: ProofFilter, batch: int = MAX_PAGE_SIZE
) -> Iterator[list[Proof]]:
    """Every proof matching ``filters``, in keyset batches of up to ``batch`` (for a CSV
    export, which writes and audit-logs a batch at a time). The first batch comes even
    when empty; no other does.

    Then the deliveries stored meanwhile below the last id read, in batches of their
    own, oldest first: an id is taken when a push stores the event, not when it commits,
    so on PostgreSQL a push committed late holds a lower id than deliveries read already
    (each batch a statement of its own, READ COMMITTED), and the batch after them, read
    by id, skipped it: the export left out a delivery stored before it ended, and an
    auditor took its absence for none. Every delivery matching the filters committed
    before the export's last read is in it once (``_late_proofs``)."""
    batch = min(batch, MAX_PAGE_SIZE)  # a page is never longer: a shorter one is the last
    after, read = 0, set()
    while True:
        page = list_proofs(session=session, filters=filters, after_id=after, limit=batch)
        read.update(proof.event.id for proof in page)
        if page or not after:
            yield page
        if len(page) < batch:
            break
        after = page[-1].event.id
    if read:
        yield from _late_proofs(session, filters, read, batch)


def export_unchanged(
    *, session: Session, filters: ProofFilter, written: int, digest: WalkDigest, last: int
) -> int | None:
    """None when the deliveries matching ``filters`` up to event ``last`` (the highest an
    export wrote) are the ``written`` ones it wrote, whose ids' digest is ``digest``
    (``walk_digest``); else how many match now. Read after the export's last batch, one
    statement (an index's, no row), as a search walk's last page is checked: a delivery
    written that stopped matching (a shift's close filing it as another courier's, a
    flag of ``flag_kind`` closed, its parcel moved to another station) or one that came
    to match after its batch was read makes the export no longer what its filters
    select, which its last line then says (``courier_api.api.proofs.routes``)."""
    sums = _query(filters).with_only_columns(*walk_sums(ScanEvent.id))
    found, now = summed_walk(session.execute(sums.where(ScanEvent.id <= last)).one())
    return None if (found, now) == (written, digest) else found


def _late_proofs(
    session: Session, filters: ProofFilter, read: set[int], batch: int
) -> Iterator[list[Proof]]:
    """The proofs matching ``filters`` with an id below the highest of ``read`` that are
    not in ``read`` (committed after the batch that passed their id), ``batch`` at a
    time: one statement reads the ids (an index's, no row), usually finding none."""
    ids = _query(filters).with_only_columns(ScanEvent.id).where(ScanEvent.id <= max(read))
    found = session.scalars(ids.order_by(ScanEvent.id))
    late = [event_id for event_id in found if event_id not in read]
    for start in range(0, len(late), batch):
        chunk = late[start : start + batch]
        query = _query(filters).where(ScanEvent.id.in_(chunk)).order_by(ScanEvent.id)
        yield _proofs(session, session.execute(query).all())


def proof_not_found(event_id: int) -> NotFound:
    """What ``get_proof`` answers when no delivery has ``event_id``."""
    return NotFound(f"no proof of delivery with event id {event_id}", code="proof_not_found")


def get_proof(
    *, session: Session, event_id: int, policy: Policy, flags_of_station: int | None = None
) -> ProofDetail:
    """``flags_of_station``: only that station's flags of the parcel (a station-bound
    reader's: a parcel taken in elsewhere keeps each station's flags its own); ``None``:
    every station's."""
    rows = session.execute(_query(ProofFilter()).where(ScanEvent.id == event_id)).all()
    if not rows:
        raise proof_not_found(event_id)
    (proof,) = _proofs(session, rows)
    tracking_no = proof.event.tracking_no
    events = load_events(session, [tracking_no])[tracking_no]
    flags = _flags_of(session, proof, flags_of_station)
    drop = _drop(proof, events)
    consents = proofs_consents(
        session=session, proofs=[proof], policy=policy, loaded={tracking_no: events}
    )
    window = timeline_around(session=session, event_id=event_id, history=events)
    return ProofDetail(
        proof=proof,
        timeline=window.entries,
        timeline_offset=window.offset,
        timeline_total=window.total,
        drop=consents.get(event_id),
        flags=list(flags),
        judged_between=None if drop is None else drop_span(drop, policy, events),
        repeat_of=repeats_of([proof], {tracking_no: events}).get(event_id),
    )


def _flags_of(session: Session, proof: Proof, station_id: int | None) -> list[Flag]:
    """The parcel's flags (``unknown_parcel`` for one not taken in), those of the
    delivery's shift about it: its handover there (``missing_at_handover``,
    ``not_on_manifest``) and any citing the delivery itself
    (``late_event_after_signoff``: it landed after the sign-off), those of the
    delivery's event (``conflicting_duplicate``: its PDA sent it again with other
    content; ``seq_conflict``: another event with its seq), and those of its PDA citing
    the delivery (``clock_jump``: its PDA's clock jumped before the push that carried
    it; ``wrong_shift``: its PDA named a shift not its own). One statement, each part
    by an index (the subject's, the shift's)."""
    event, tracking_no = proof.event, proof.event.tracking_no
    shift_wide = str(event.shift_id)
    about = [
        and_(Flag.subject_type == "parcel", Flag.subject_key == tracking_no),
        and_(Flag.subject_type == "event", Flag.subject_key.in_(event_subject_keys(event))),
        and_(Flag.subject_type == "device", Flag.subject_key == event.device_id),
    ]
    if event.shift_id is not None:
        about.append(
            and_(
                Flag.subject_type == "shift",
                Flag.shift_id == event.shift_id,
                Flag.subject_key.in_([shift_wide, f"{shift_wide}:{tracking_no}"]),
            )
        )
    query = select(Flag).where(or_(*about))
    if station_id is not None:
        query = query.where(Flag.station_id == station_id)
    # A whole shift's or PDA's flag is about the delivery only when it cites it.
    whole = {("shift", shift_wide), ("device", event.device_id)}
    return [
        flag
        for flag in session.scalars(query.order_by(Flag.id))
        if (flag.subject_type, flag.subject_key) not in whole or cites(flag, event)
    ]


def cites(flag: Flag, event: ScanEvent) -> bool:
    """Whether the flag's evidence names the event (``sync.flags.cited_events``)."""
    return cited_events(flag).names(event)


def _drop(proof: Proof, events: Sequence[EventDetail]) -> EventDetail | None:
    """The proof's event as the rules read it, if it is a locker or pickup-point drop:
    a drop scanned again is judged by its first scan (``sync.rules.judged_scan``)."""
    if proof.event.type not in DROPS:
        return None
    return judged_scan(next(e for e in events if e.fact.event_id == proof.event.id), events)


# The images a POD names: the role each plays in it, and its key.
POD_IMAGES = (("signature", "signature_sha256"), ("photo", "photo_sha256"))


def pod_digests(pod: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """``[(role, sha256)]`` of the images a POD names."""
    pod = pod or {}
    return [(role, pod[key]) for role, key in POD_IMAGES if isinstance(pod.get(key), str)]


@dataclass(frozen=True)
class ProofImageState:
    """An image a proof's POD names, and what the server holds of it: an auditor holds
    the digest against the image, and needs to know whether the image ever arrived."""

    role: str  # signature | photo
    sha256: str
    arrived_at: dt.datetime | None  # first uploaded; None: never arrived
    purged_at: dt.datetime | None  # its bytes deleted by the retention purge
    # Whether its stored bytes still hash to its digest; None: not checked (a list)
    integrity: Integrity | None = None


def proofs_images(
    *, session: Session, proofs: Sequence[Proof], store: BlobStore | None = None
) -> dict[int, list[ProofImageState]]:
    """``{event id: its POD's images}`` for ``proofs`` (a page, an export's batch), in one
    query however many: each image the POD names, signature first, with whether and when
    it arrived and whether its bytes were purged since. With ``store`` (one proof's
    read), each held image's file is hashed too (``integrity``): an auditor reads
    whether the bytes are still the ones the PDA uploaded, not only that they arrived.
    The API's search and the export do not hash (an export's batch is 500 proofs)."""
    named = {p.event.id: pod_digests(p.event.details.get("pod")) for p in proofs}
    blobs = blobs_by_digest(
        session=session, digests=[digest for images in named.values() for _, digest in images]
    )
    return {
        event_id: [
            ProofImageState(
                role=role,
                sha256=digest,
                arrived_at=blobs[digest].uploaded_at if digest in blobs else None,
                purged_at=blobs[digest].purged_at if digest in blobs else None,
                integrity=None if store is None else stored_integrity(store, blobs.get(digest)),
            )
            for role, digest in images
        ]
        for event_id, images in named.items()
    }


def proofs_events(*, session: Session, proofs: Sequence[Proof]) -> dict[str, list[EventDetail]]:
    """Every event of the parcels of ``proofs`` (a page, an export's batch), in one
    statement per ``chunks`` of parcels: what ``repeats_of`` and ``proofs_consents``
    (its ``loaded``) read."""
    return load_events(session, sorted({p.event.tracking_no for p in proofs}))


def repeats_of(
    proofs: Sequence[Proof], events: Mapping[str, Sequence[EventDetail]]
) -> dict[int, int]:
    """``{event id: the first scan's event id}`` for the proofs among ``proofs`` that
    repeat a final outcome scanned before (the same delivery scanned twice, no check-out
    between: ``sync.rules.first_scans``), ``events`` holding their parcels' events. The
    parcel was delivered once: an auditor counting proofs counts the first scan only,
    as the balance, the reports and the rules do. A voided scan repeats nothing."""
    firsts: dict[int, int] = {}
    for tracking_no in {p.event.tracking_no for p in proofs}:
        for repeat, first in first_scans(events[tracking_no]).items():
            firsts[repeat] = first.fact.event_id
    return {p.event.id: firsts[p.event.id] for p in proofs if p.event.id in firsts}


def proofs_consents(
    *,
    session: Session,
    proofs: Sequence[Proof],
    policy: Policy,
    loaded: Mapping[str, list[EventDetail]] | None = None,
) -> dict[int, DropConsent]:
    """``{event id: DropConsent}`` for the drops among ``proofs`` (a page, an export's
    batch), in a bounded number of queries (``drop_consents``). A drop of a parcel not
    taken in has none: with no class nor recipient, the rules cannot judge it; nor one a
    correction voided: it never happened, so there is nothing to authorize (the rules
    judge only the events that count), and "required, none authorized" would read as
    an unauthorized drop."""
    drops = [
        (p.event.id, p.parcel)
        for p in proofs
        if p.event.type in DROPS and p.parcel is not None and not p.voided
    ]
    return drop_consents(session=session, drops=drops, policy=policy, loaded=loaded)


def drop_consents(
    *,
    session: Session,
    drops: Sequence[tuple[int, Parcel]],
    policy: Policy,
    loaded: Mapping[str, list[EventDetail]] | None = None,
) -> dict[int, DropConsent]:
    """``{drop event id: DropConsent}`` for ``(event id, parcel)`` pairs, in one to four
    queries for up to 450 parcels however many drops (parcels whose events are
    ``loaded`` already are not read again): covering the drop, granted before it, in
    force then (rule 4), a drop scanned again as at its first scan. What a proof, a page
    of proofs and a shift's page show."""
    if not drops:
        return {}
    parcels = list({p.tracking_no: p for _, p in drops}.values())
    loaded = loaded or {}
    unread = [p.tracking_no for p in parcels if p.tracking_no not in loaded]
    events = {**loaded, **(load_events(session, unread) if unread else {})}
    facts = consents_for(session, parcels)
    # Each parcel's history is indexed, folded and its consents sorted once, however many
    # of its drops are asked about: once a drop, a PDA that flooded one parcel with
    # events made a page of its proofs fold the whole history for every proof.
    histories = {p.tracking_no: events[p.tracking_no] for p in parcels}
    by_id = {tn: {e.fact.event_id: e for e in history} for tn, history in histories.items()}
    firsts = {tn: first_scans(history) for tn, history in histories.items()}
    by_grant = {tn: sorted(facts.get(tn, []), key=lambda c: c.granted_at) for tn in histories}
    chosen: dict[int, int | None] = {}
    for event_id, parcel in drops:
        tn = parcel.tracking_no
        drop = by_id[tn].get(event_id)
        if drop is None or drop.fact.type not in DROPS:
            continue
        drop = firsts[tn].get(event_id, drop)  # a repeated scan: its first (judged_scan)
        span = drop_span(drop, policy, histories[tn]) if by_grant[tn] else None
        chosen[event_id] = next(
            (
                fact.id
                for fact in by_grant[tn]
                if authorizes(fact, drop, policy, histories[tn], span)
            ),
            None,
        )
    consents = consents_by_id(session, [cid for cid in chosen.values() if cid is not None])
    parcel_of = dict(drops)
    return {
        event_id: DropConsent(
            required=needs_consent(parcel_of[event_id].service_class, policy),
            consent=consents.get(consent_id) if consent_id is not None else None,
        )
        for event_id, consent_id in chosen.items()
    }


def _proofs(session: Session, rows: Sequence[tuple[ScanEvent, bool]]) -> list[Proof]:
    """The proofs of these deliveries (a page: at most ``MAX_PAGE_SIZE``), with their
    parcels, read in one statement."""
    if not rows:
        return []
    numbers = sorted({event.tracking_no for event, _ in rows})
    held = select(Parcel).where(among_at_once(session, Parcel.tracking_no, numbers))
    parcels = {parcel.tracking_no: parcel for parcel in session.scalars(held)}
    return [_proof(event, parcels.get(event.tracking_no), voided) for event, voided in rows]


def _proof(event: ScanEvent, parcel: Parcel | None, voided: bool) -> Proof:
    distance = None
    if parcel is not None and None not in (event.lat, event.lon, parcel.lat, parcel.lon):
        distance = haversine_m(parcel.lat, parcel.lon, event.lat, event.lon)  # type: ignore[arg-type]
    return Proof(event=event, parcel=parcel, distance_m=distance, voided=bool(voided))
