"""What the station pages show, gathered in a bounded number of queries.

The pages (``courier_api/web``) read the same services as the API. This module
gathers what a page shows at once and the API answers in separate calls: a
shift with the evidence of each discrepancy (its events on both clocks, the
consent a drop had or lacked, the proof images, its PDA's rejected events about
the parcel), the shift's own flags with their events, the consent behind each drop
of a page of proofs, whether each proof image can be shown to the reader, and a
day's monitoring report with the six days before it. Nothing here writes.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar
from zoneinfo import ZoneInfo

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session, aliased

from models import (
    Blob,
    Consent,
    EventType,
    Flag,
    FlagChange,
    Parcel,
    QuarantinedEvent,
    ReportKind,
    ScanEvent,
    Shift,
    ShiftStatus,
    Station,
    User,
)
from sync.balances import (
    HandoverRead,
    ShiftFacts,
    changed_since_signoff,
    gather,
    read_handovers,
    signoff_superseded,
    station_board,
    where_couriers_went,
)
from sync.blobs import (
    BlobReader,
    BlobStore,
    Integrity,
    blobs_by_digest,
    readable_blobs,
    stored_integrity,
)
from sync.consents import consents_by_id, consents_for
from sync.directory import get_station
from sync.flags import Decision, cited_in, flag_changes, latest_decisions
from sync.handover import (
    CONSENT_KINDS,
    HANDOVER_KINDS,
    OUTCOMES,
    Balance,
    Discrepancy,
    ParcelOutcome,
    WriteOff,
    balance_version,
    sign_off_blocked,
)
from sync.projection import corrects, voided_by, voided_in_sql
from sync.proofs import (
    DELIVERY_TYPES,
    DropConsent,
    Proof,
    ProofDetail,
    drop_consents,
    pod_digests,
    proof_station,
    proofs_consents,
    proofs_events,
    repeats_of,
)
from sync.quarantine import (
    naming_counted,
    rejections_by_id,
    shift_rejections_counted,
    shown_rejection,
)
from sync.reports import EARLIEST, OnTimeDeadlines, StationDays, report
from sync.rules import DROPS, FINAL_OUTCOMES, Policy, counts_at_station
from sync.shifts import LATE_EVENT, LATEST_REOPENING, REJECTED_IDS
from sync.sql import among, among_at_once, chunks
from sync.status import load_events

WEEK_DAYS = 7
# A proof's page lists this many of the rejected events naming its parcel at most, the
# newest (a broken PDA may send the same bad drop again and again); the list API
# (``GET /api/v1/quarantine?tracking_no=``) has them all.
PROOF_REJECTIONS_SHOWN = 20


# -- who reads, and what they may see ---------------------------------------------------------


class ImageState(enum.StrEnum):
    AVAILABLE = "available"
    NOT_UPLOADED = "not_uploaded"  # the PDA has not sent it yet
    PURGED = "purged"  # deleted by the retention purge; the record stays
    NOT_READABLE = "not_readable"  # uploaded at another station than the reader's
    BYTES_MISSING = "bytes_missing"  # recorded, but the file is gone from the store
    BYTES_ALTERED = "bytes_altered"  # the file is no longer the bytes its digest names
    # Uploaded and readable, its file not hashed: a search lists it, the proof's page
    # says whether its bytes are intact (``recorded_image_states``).
    ON_RECORD = "on_record"


@dataclass(frozen=True)
class ProofImageRef:
    role: str  # signature | photo
    sha256: str
    state: ImageState


def image_states(
    *, session: Session, digests: Iterable[str], reader: BlobReader, store: BlobStore
) -> dict[str, ImageState]:
    """Whether each image can be shown to ``reader``, so that a page never shows a
    broken image, nor one altered in the store as the genuine one: one query for the
    blobs and one for who may read them; each readable image's file is hashed as it
    is read (``BlobStore.verify``), as serving it does."""
    return _image_states(session, digests, reader, lambda blob: _stored_state(store, blob))


def recorded_image_states(
    *, session: Session, digests: Iterable[str], reader: BlobReader
) -> dict[str, ImageState]:
    """``image_states`` as the records say, no file read: a readable image is
    ``ON_RECORD``. For a search, which lists up to a page of proofs with two images each
    (8 MiB each at most): hashing them all on every view let any signed-in reader make
    the server read some 800 MiB a click. As the API's search and export, it leaves the
    bytes' integrity to the proof's page (and to the image itself, checked as served)."""
    return _image_states(session, digests, reader, lambda blob: ImageState.ON_RECORD)


def _image_states(
    session: Session,
    digests: Iterable[str],
    reader: BlobReader,
    held: Callable[[Blob], ImageState],
) -> dict[str, ImageState]:
    """Each image's state from its record, ``held`` telling that of a readable one."""
    wanted = sorted(set(digests))
    blobs = blobs_by_digest(session=session, digests=wanted)
    readable = readable_blobs(session=session, digests=blobs, reader=reader)
    states = {}
    for digest in wanted:
        blob = blobs.get(digest)
        if blob is None:
            states[digest] = ImageState.NOT_UPLOADED
        elif blob.purged_at is not None:
            states[digest] = ImageState.PURGED
        elif digest not in readable:
            states[digest] = ImageState.NOT_READABLE
        else:
            states[digest] = held(blob)
    return states


# What a page shows of an image not purged, by its bytes' ``Integrity``.
_SHOWN_AS = {
    Integrity.INTACT: ImageState.AVAILABLE,
    Integrity.MISSING: ImageState.BYTES_MISSING,
    Integrity.ALTERED: ImageState.BYTES_ALTERED,
}


def _stored_state(store: BlobStore, blob: Blob) -> ImageState:
    return _SHOWN_AS[stored_integrity(store, blob)]


def _images(
    pod: Mapping[str, Any] | None, states: Mapping[str, ImageState]
) -> list[ProofImageRef]:
    return [ProofImageRef(role, digest, states[digest]) for role, digest in pod_digests(pod)]


# -- a shift and its evidence -----------------------------------------------------------------


@dataclass(frozen=True)
class EvidenceEvent:
    event: ScanEvent
    voided_by: int | None  # the correction's event id
    images: list[ProofImageRef]


@dataclass(frozen=True)
class ConsentOnRecord:
    """A consent that could cover a discrepancy's parcel, as the rules weigh it for the
    shift's drops."""

    consent: Consent
    # Captured on a PDA of another station than the shift's: it authorizes none of the
    # shift's drops (``sync.rules.counts_at_station``; SECURITY.md threat 2).
    elsewhere: bool
    # Withdrawn for this parcel by its recipient's refusal of a request for consent.
    refused_at: dt.datetime | None


@dataclass(frozen=True)
class DiscrepancyEvidence:
    discrepancy: Discrepancy
    flag: Flag | None
    parcel: Parcel | None  # None: a tracking number never taken in
    events: list[EvidenceEvent]  # the flag's events in this shift, in device order
    drops: dict[int, DropConsent]  # by event id, for the drops among ``events``
    consents_on_record: list[ConsentOnRecord]  # consent kinds: every one that could cover it
    # The PDA's rejected events of the shift naming this parcel (``shown_rejection``):
    # a drop refused for a missing compartment is why a parcel in a locker is missing.
    # Listed with the parcel's first discrepancy only: a parcel with two (delivered
    # without proof, then dropped in a locker) lists each rejected event once.
    rejections: list[dict[str, Any]] = field(default_factory=list)
    # A later discrepancy of the same parcel: the position (from 1, as the page numbers
    # them) of the one its rejected events are listed with; None otherwise.
    rejections_listed_with: int | None = None
    # A parcel missing at handover, or off the manifest: its check-outs and outcomes
    # filed under other shifts of the station (``scans_elsewhere``), oldest first.
    elsewhere: list[ScanElsewhere] = field(default_factory=list)
    # Its flag's station when that is another than the shift's (a flag raised before
    # flags had a station each, at the parcel's station): its manager decides it, and
    # no decision counts here (``sync.handover.undecidable``). None otherwise.
    flag_station: Station | None = None
    # Whether the reader may open its flag's page: not a station's reader another
    # station's flag (a 404 to them).
    flag_readable: bool = True


@dataclass(frozen=True)
class ScanElsewhere:
    """A check-out or a final outcome of a discrepancy's parcel filed under another
    shift of the shift's station: a courier whose PDA died delivers on a spare one the
    parcels checked out on the first, and the first shift's page says where they went
    (its "missing" parcel was delivered at 12:00 under shift 7) instead of sending the
    manager to look for them in the cage of returns."""

    event_id: int
    type: EventType
    occurred_at: dt.datetime  # corrected
    shift_id: int
    courier_id: int
    device_id: str


# At most this many of a parcel's latest check-outs and final outcomes are looked up
# under other shifts (a PDA that scanned a parcel 25,000 times lists no page of them).
SCANS_ELSEWHERE_READ = 20


@dataclass(frozen=True)
class ShiftFlag:
    """A flag about the shift itself rather than one of its parcels' discrepancies:
    reopened by late events, not closed in time, proof images missing at handover,
    its PDA gone silent."""

    flag: Flag
    events: list[ScanEvent]  # its evidence's events, in device order
    latest: frozenset[int]  # a reopening's flag: the events of the latest reopening
    voided_by: dict[int, int]  # those of its events a correction voided: the correction's id
    # A reopening's flag: the rejected events it cites (quarantine ids), listed on the
    # page with the shift's rejected events.
    rejected: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ShiftPage:
    shift: Shift
    station: Station
    # The courier, who closed and signed it off, who wrote off its PDA's lost seqs, and
    # who recorded consents: those the reader may know (``sees_user``), others by id.
    users: dict[int, User]
    balance: Balance
    outcomes: list[tuple[str, list[ParcelOutcome]]]  # by outcome, in the balance's order
    outcome_events: dict[int, ScanEvent]  # each parcel's outcome event
    proofs: frozenset[int]  # the deliveries among them whose proof the reader may open
    parcels: dict[str, Parcel]  # those the reader may see
    elsewhere: frozenset[str]  # taken in at a station the reader does not see
    discrepancies: list[DiscrepancyEvidence]
    flags: list[ShiftFlag]  # the shift's own, oldest first, whatever their status
    # The PDA's rejected events of the shift that name no parcel of a discrepancy (those
    # are with it).
    rejections: list[dict[str, Any]]
    more_rejections: bool  # more than ``SHIFT_REJECTIONS_SHOWN``: the API lists them all
    # How many rejected events of the shift there are for this reader, those listed with
    # a discrepancy and those past ``SHIFT_REJECTIONS_SHOWN`` too: the count the board
    # shows (``sync.balances.read_handovers``) for the shift's station's reader.
    rejected_total: int
    sign_off_blocked: str | None  # why a sign-off must be forced, or None
    balance_version: str  # sent back with a sign-off: refused if the balance changed
    changed_since_signoff: bool  # signed off, and the balance now differs (rule 5)
    # Sent back with a sign-off too, refused if they changed (as the board row counts
    # them, ``sync.signoffs.changed_since_read``): its PDA's events rejected, the ids
    # of the flags naming it still waiting, and the proof images its deliveries lack
    # (counted only for a shift waiting for its sign-off, whose page has the form).
    rejected_events: int = 0
    open_flag_ids: tuple[int, ...] = ()
    images_missing: int = 0
    # A shift still open: its courier's other shifts still open on another PDA, oldest
    # first, and the one handed over since that says the courier is back
    # (``where_courier_went``).
    also_open: list[Shift] = field(default_factory=list)
    courier_back: Shift | None = None

    @property
    def reopening(self) -> Flag | None:
        """The ``late_event_after_signoff`` flag, once late events reopened the shift."""
        return next((f.flag for f in self.flags if f.flag.kind == LATE_EVENT), None)

    @property
    def signoff_superseded(self) -> bool:
        return signoff_superseded(self.shift)

    @property
    def written_off_since_signoff(self) -> list[WriteOff]:
        """The write-offs of its PDA's lost seqs made after its sign-off, when its balance
        changed since: a sign-off forced while seqs were missing, then those seqs written
        off, changes the balance with no event of the shift arriving (nothing reopens it),
        and its page names the write-off as what changed it."""
        signed_at = self.shift.signed_off_at
        if not self.changed_since_signoff or signed_at is None:
            return []
        return [w for w in self.balance.write_offs if w.written_off_at > signed_at]

    @property
    def seqs_written_off_since_signoff(self) -> int:
        """How many of the shift's seqs ``written_off_since_signoff`` writes off: its
        page names them as "the sequence number" or "the sequence numbers"."""
        return sum(
            last - first + 1 for w in self.written_off_since_signoff for first, last in w.ranges
        )

    @property
    def recipients_shown(self) -> list[str]:
        """The tracking numbers of the discrepancies' parcels whose recipient the page
        shows (name, phone, address): a missing parcel's, with no delivery among its
        evidence, is read as surely as one whose proof is shown."""
        return sorted({d.parcel.tracking_no for d in self.discrepancies if d.parcel})

    @property
    def rejections_shown(self) -> list[int]:
        """The ids of the rejected events on the page, with its discrepancies or not."""
        shown = [*self.rejections, *(r for d in self.discrepancies for r in d.rejections)]
        return sorted(r["id"] for r in shown)


def shift_page(
    *,
    session: Session,
    shift: Shift,
    policy: Policy,
    reader: BlobReader,
    store: BlobStore,
    visible_station: int | None,
    unmasked: bool,
) -> ShiftPage:
    """The shift, its balance by outcome, each discrepancy with its evidence, the
    shift's own flags with their events, and its PDA's rejected events.

    ``visible_station``: the one station whose parcels a station-bound reader sees
    (None: all). A parcel of another station that the shift's courier scanned (one
    mis-sorted) is shown by its tracking number only, as the API shows it: its
    recipient, its consents and its proof belong to that station. Nor are its users
    named to that reader when they are another station's (``sees_user``): one who
    moved there since, the shift's own courier or manager too.
    ``unmasked``: the reader is an auditor, shown the phone numbers in the PDA's
    rejected events whole (``shown_rejection``).

    About a dozen queries whatever the number of parcels (plus one per proof image of
    the discrepancies for a station's reader, see ``image_states``).
    """
    station = get_station(session=session, station_id=shift.station_id)
    facts = gather(session, [shift])[shift.id]
    read = _handover_read(session, shift, facts)
    balance = read.balance
    numbers = sorted({p.tracking_no for p in balance.parcels})
    taken_in = _parcels(session, numbers)
    elsewhere = frozenset(
        n for n, p in taken_in.items() if visible_station not in (None, p.station_id)
    )
    parcels = {n: p for n, p in taken_in.items() if n not in elsewhere}
    reviews = [f.id for f in facts.review_flags()]
    flags, own_flags = _flags(session, shift, balance, visible_station, reviews)
    outcome_ids = [p.outcome_event_id for p in balance.parcels if p.outcome_event_id]
    evidence_ids = {i for d in balance.discrepancies for i in d.event_ids}
    troubled = sorted({d.tracking_no for d in balance.discrepancies})
    facts_of = load_events(session, troubled) if troubled else {}
    voids = voided_by(e.fact for found in facts_of.values() for e in found)
    lost = {d.tracking_no for d in balance.discrepancies if d.kind in HANDOVER_KINDS}
    scanned = scans_of_interest({n: facts_of.get(n, []) for n in sorted(lost)}, voids)
    events, filed_at = _events_filed(
        session,
        [
            *outcome_ids,
            *evidence_ids,
            *(i for f in own_flags for i in _evidence_ids(f)),
            *(i for ids in scanned.values() for i in ids),
        ],
    )
    elsewhere_of = scans_elsewhere(
        shift.id,
        shift.station_id,
        {
            n: [_scan_row(events[i], filed_at) for i in ids if i in events]
            for n, ids in scanned.items()
        },
    )
    flag_voids = voided_among(
        session, (events[i] for f in own_flags for i in _evidence_ids(f) if i in events)
    )
    drops = [
        (event_id, parcels[events[event_id].tracking_no])
        for event_id in sorted(evidence_ids)
        if event_id in events
        and events[event_id].type in DROPS
        and events[event_id].tracking_no in parcels
    ]
    consents = drop_consents(session=session, drops=drops, policy=policy, loaded=facts_of)
    on_record = consents_on_record(
        session,
        [
            parcels[d.tracking_no]
            for d in balance.discrepancies
            if d.kind in CONSENT_KINDS and d.tracking_no in parcels
        ],
        shift.station_id,
    )
    recorders = [
        *(i for d in consents.values() for i in consent_users(d.consent)),
        *(i for shown in on_record.values() for c in shown for i in consent_users(c.consent)),
    ]
    staff = [shift.courier_id, shift.closed_by, shift.signed_off_by]
    writers = [w.written_off_by for w in balance.write_offs]
    others = [scan.courier_id for found in elsewhere_of.values() for scan in found]
    users = users_seen_by(session, [*staff, *writers, *recorders, *others], visible_station)
    states = image_states(
        session=session,
        digests=[
            digest
            for event_id in evidence_ids
            if event_id in events
            for _, digest in pod_digests(events[event_id].details.get("pod"))
        ],
        reader=reader,
        store=store,
    )
    scope = facts.rejection_scope(balance)
    shown_rejected, rejected_total = shift_rejections_counted(
        session=session, scope=scope, station_id=visible_station
    )
    rejections_of = _by_parcel(shown_rejected)
    flag_stations = _stations(
        session, {f.station_id for f in flags.values() if f.station_id != shift.station_id}
    )
    first_of_parcel: dict[str, int] = {}  # the position of each parcel's first discrepancy
    discrepancies = []
    for position, d in enumerate(balance.discrepancies, start=1):
        listed_with = first_of_parcel.setdefault(d.tracking_no, position)
        shown = sorted(
            (events[i] for i in d.event_ids if i in events), key=lambda e: (e.device_id, e.seq)
        )
        discrepancies.append(
            DiscrepancyEvidence(
                discrepancy=d,
                flag=flags.get(d.flag_id) if d.flag_id else None,
                parcel=parcels.get(d.tracking_no),
                events=[
                    EvidenceEvent(e, voids.get(e.id), _images(e.details.get("pod"), states))
                    for e in shown
                ],
                drops={e.id: consents[e.id] for e in shown if e.id in consents},
                consents_on_record=on_record.get(d.tracking_no, [])
                if d.kind in CONSENT_KINDS
                else [],
                rejections=[
                    shown_rejection(r, unmasked=unmasked)
                    for r in rejections_of.get(d.tracking_no, [])
                ]
                if listed_with == position
                else [],
                rejections_listed_with=listed_with
                if listed_with != position and rejections_of.get(d.tracking_no)
                else None,
                elsewhere=elsewhere_of.get(d.tracking_no, []) if d.kind in HANDOVER_KINDS else [],
                **_flag_whose(
                    flags.get(d.flag_id) if d.flag_id else None, flag_stations, visible_station
                ),
            )
        )
    grouped: dict[str, list[ParcelOutcome]] = defaultdict(list)
    for parcel in balance.parcels:
        grouped[parcel.outcome].append(parcel)
    order = [*OUTCOMES, *sorted(set(grouped) - set(OUTCOMES))]
    went = where_courier_went(session, shift)
    return ShiftPage(
        shift=shift,
        station=station,
        users=users,
        balance=balance,
        outcomes=[(outcome, grouped[outcome]) for outcome in order if grouped.get(outcome)],
        outcome_events={i: events[i] for i in outcome_ids if i in events},
        proofs=_proofs_opened(
            (events[i] for i in outcome_ids if i in events), taken_in, visible_station
        ),
        parcels=parcels,
        elsewhere=elsewhere,
        discrepancies=discrepancies,
        flags=[_shift_flag(f, events, flag_voids) for f in own_flags],
        rejections=[
            shown_rejection(r, unmasked=unmasked)
            for r in shown_rejected
            if r.parcel_tracking_no not in troubled
        ],
        more_rejections=rejected_total > len(shown_rejected),
        rejected_total=rejected_total,
        sign_off_blocked=sign_off_blocked(balance),
        balance_version=balance_version(balance),
        changed_since_signoff=changed_since_signoff(shift, balance),
        rejected_events=read.rejected_events,
        open_flag_ids=tuple(flag.flag_id for flag in read.open_flags),
        images_missing=read.images_missing,
        also_open=went.also_open,
        courier_back=went.courier_back,
    )


def _stations(session: Session, station_ids: Iterable[int | None]) -> dict[int, Station]:
    """These stations by id: one statement, none for no station."""
    wanted = sorted(i for i in station_ids if i is not None)
    if not wanted:
        return {}
    return {s.id: s for s in session.scalars(select(Station).where(Station.id.in_(wanted)))}


def _flag_whose(
    flag: Flag | None, stations: Mapping[int, Station], visible_station: int | None
) -> dict[str, Any]:
    """A discrepancy's ``flag_station`` and ``flag_readable`` (``DiscrepancyEvidence``):
    a flag of another station is named without a link to a reader of this one."""
    if flag is None:
        return {}
    return {
        "flag_station": stations.get(flag.station_id) if flag.station_id is not None else None,
        "flag_readable": visible_station is None or flag.station_id == visible_station,
    }


class CourierWent(NamedTuple):
    """Where the courier of a shift still open went on (``where_courier_went``)."""

    also_open: list[Shift]
    courier_back: Shift | None


def where_courier_went(session: Session, shift: Shift) -> CourierWent:
    """For a shift still open, what its board row names (``sync.balances.
    where_couriers_went``, the same statement): its courier's other shifts still open on
    another PDA, oldest first, and the shift on another PDA they handed over since, if
    they are back. Shifts of the same station only (another's would be a 404 link)."""
    went = where_couriers_went(session, shift.station_id, [shift])
    return CourierWent(went.also_open.get(shift.id, []), went.back.get(shift.id))


def scans_of_interest(
    histories: Mapping[str, Sequence[Any]], voids: Mapping[int, int]
) -> dict[str, list[int]]:
    """The ids of each parcel's latest ``SCANS_ELSEWHERE_READ`` check-outs and final
    outcomes not voided, from its history as ``load_events`` read it: what
    ``latest_scans`` reads in SQL, for a page that reads the parcels' histories anyway
    (a shift's page, for its discrepancies' evidence)."""
    wanted = {EventType.CHECKED_OUT, *FINAL_OUTCOMES}
    chosen: dict[str, list[int]] = {}
    for tracking_no, found in histories.items():
        scans = sorted(
            (e.fact for e in found if e.fact.type in wanted and e.fact.event_id not in voids),
            key=lambda f: (f.occurred_at, f.event_id),
        )
        chosen[tracking_no] = [f.event_id for f in scans[-SCANS_ELSEWHERE_READ:]]
    return chosen


def _scan_row(event: ScanEvent, filed_at: Mapping[int, int | None]) -> ScanRow:
    """``event`` as ``scans_elsewhere`` reads it, with the station of its shift
    (``_events_filed``)."""
    return ScanRow(
        event.id,
        event.tracking_no,
        event.type,
        event.occurred_at,
        event.shift_id,
        event.courier_id,
        event.device_id,
        filed_at.get(event.id),
    )


def scans_elsewhere(
    shift_id: int, station_id: int, scans: Mapping[str, Sequence[ScanRow]]
) -> dict[str, list[ScanElsewhere]]:
    """Of each parcel's scans ``latest_scans`` chose, those filed under another shift
    than ``shift_id`` of ``station_id``, oldest first, by parcel. The station is the
    shift's, not the one the scan was pushed at: a PDA moved to another station with its
    courier pushes the scans of its shift left open here under that shift, recorded at
    the new station, and a shift opened there takes the PDA's scans pushed here under no
    shift (``sync.shifts.open_shift``); a page links each shift it names, and another
    station's is not shown on its pages (a 404)."""
    found: dict[str, list[ScanElsewhere]] = {}
    for tracking_no, rows in scans.items():
        shown = [
            ScanElsewhere(
                r.id,
                r.type,
                r.occurred_at.astimezone(dt.UTC),
                r.shift_id,
                r.courier_id,
                r.device_id,
            )
            for r in sorted(rows, key=_scan_order)
            if r.shift_id is not None
            and r.shift_id != shift_id
            and r.shift_station_id == station_id
        ]
        if shown:
            found[tracking_no] = shown
    return found


class ScanRow(NamedTuple):
    """A scan as ``scans_elsewhere`` reads it (``latest_scans``, ``_scan_row``)."""

    id: int
    tracking_no: str
    type: EventType
    occurred_at: dt.datetime
    shift_id: int | None
    courier_id: int
    device_id: str
    shift_station_id: int | None  # the station of the shift it is filed under


def latest_scans(session: Session, tracking_nos: Sequence[str]) -> dict[str, list[ScanRow]]:
    """Each parcel's latest ``SCANS_ELSEWHERE_READ`` check-outs and final outcomes not
    voided (a correction voiding one found as the projection finds it:
    ``voided_in_sql``), with the station of the shift each is filed under. One
    statement, none for no parcel: the database ranks each parcel's scans
    (``ROW_NUMBER``, SQLite 3.25 and PostgreSQL alike) and sends the latest alone, so a
    parcel a PDA scanned 500 times on a loop sends 20 rows to each read of its balance,
    not 500."""
    if not tracking_nos:
        return {}
    latest = func.row_number().over(
        partition_by=ScanEvent.tracking_no,
        order_by=(ScanEvent.occurred_at.desc(), ScanEvent.id.desc()),
    )
    ranked = (
        select(
            ScanEvent.id,
            ScanEvent.tracking_no,
            ScanEvent.type,
            ScanEvent.occurred_at,
            ScanEvent.shift_id,
            ScanEvent.courier_id,
            ScanEvent.device_id,
            latest.label("latest"),
        )
        .where(
            among_at_once(session, ScanEvent.tracking_no, sorted(set(tracking_nos))),
            ScanEvent.type.in_(sorted({EventType.CHECKED_OUT, *FINAL_OUTCOMES})),
            ~voided_in_sql(ScanEvent),
        )
        .subquery()
    )
    # Looked up for each scan kept, by the shift's key: joined, PostgreSQL read the whole
    # shift table (a Seq Scan) to find a handful.
    filed_at = select(Shift.station_id).where(Shift.id == ranked.c.shift_id).scalar_subquery()
    found: dict[str, list[ScanRow]] = defaultdict(list)
    for row in session.execute(
        select(
            ranked.c.id,
            ranked.c.tracking_no,
            ranked.c.type,
            ranked.c.occurred_at,
            ranked.c.shift_id,
            ranked.c.courier_id,
            ranked.c.device_id,
            filed_at,
        ).where(ranked.c.latest <= SCANS_ELSEWHERE_READ)
    ):
        found[row.tracking_no].append(ScanRow(*row))
    return dict(found)


def handover_scans_elsewhere(
    session: Session, shift: Shift, balance: Balance, *, courier_id: int | None = None
) -> dict[str, list[ScanElsewhere]]:
    """For each parcel of the balance's handover discrepancies (``HANDOVER_KINDS``), its
    check-outs and final outcomes filed under the station's other shifts, oldest first:
    what the shift's page lists with each and ``GET /shifts/<id>/balance`` answers
    (``latest_scans`` then ``scans_elsewhere``: of the latest ``SCANS_ELSEWHERE_READ``
    of them not voided, those of another shift of the station; the page chooses them
    from the histories it reads for their evidence, ``scans_of_interest``). One
    statement, none without such a discrepancy.

    ``courier_id``: only the scans that courier made (a courier reading their own
    balance: another courier's shifts, their ids, users and PDAs are not theirs to read,
    DESIGN rule 7); None: every one of the station's."""
    lost = sorted({d.tracking_no for d in balance.discrepancies if d.kind in HANDOVER_KINDS})
    found = scans_elsewhere(shift.id, shift.station_id, latest_scans(session, lost))
    if courier_id is None:
        return found
    own = {n: [s for s in scans if s.courier_id == courier_id] for n, scans in found.items()}
    return {n: scans for n, scans in own.items() if scans}


def _scan_order(row: ScanRow) -> tuple[dt.datetime, int]:
    return row.occurred_at, row.id


def _handover_read(session: Session, shift: Shift, facts: ShiftFacts) -> HandoverRead:
    """The shift's handover as its sign-off form sends it back: counted as the board,
    the balance and the sign-off count it (``read_handovers``, pushed at the shift's
    station), whoever reads the page; a page lists at most ``SHIFT_REJECTIONS_SHOWN`` of
    its rejected events, and a manager of another station sees none of those. Only a
    shift waiting for its sign-off has the form: a page of a shift still open or signed
    off counts nothing beside its balance (the statements spared on every page of a past
    handover)."""
    if shift.status != ShiftStatus.CLOSED:
        return HandoverRead(facts.balance())
    return read_handovers(
        session, [shift], station_id=shift.station_id, gathered={shift.id: facts}
    )[shift.id]


def _flags(
    session: Session,
    shift: Shift,
    balance: Balance,
    visible_station: int | None,
    reviews: Sequence[int] = (),
) -> tuple[dict[int, Flag], list[Flag]]:
    """In one query: the flags of the balance's discrepancies, by id, and the shift's
    own flags of the reader's station, oldest first: those naming it (``shift_id``)
    but its handover flags, which are discrepancies; and ``reviews``, its parcels'
    corrected outcomes citing its events (``ShiftFacts.review_flags``), which keep a
    handover from being clean while open."""

    def own(flag: Flag) -> bool:
        return visible_station in (None, flag.station_id) and (
            flag.id in reviews or (flag.shift_id == shift.id and flag.kind not in HANDOVER_KINDS)
        )

    reviewed = Flag.id.in_(sorted(reviews))
    if visible_station is not None:
        reviewed = and_(reviewed, Flag.station_id == visible_station)
    cited = {d.flag_id for d in balance.discrepancies if d.flag_id}
    found = session.scalars(
        select(Flag)
        .where(or_(Flag.id.in_(sorted(cited)), Flag.shift_id == shift.id, reviewed))
        .order_by(Flag.id)
    ).all()
    return {f.id: f for f in found if f.id in cited}, [f for f in found if own(f)]


def _evidence_ids(flag: Flag) -> list[int]:
    return [i for i in cited_in(flag.evidence, "event_ids", ()) if isinstance(i, int)]


def _shift_flag(
    flag: Flag, events: Mapping[int, ScanEvent], voided: Mapping[int, int]
) -> ShiftFlag:
    latest = (flag.evidence.get(LATEST_REOPENING) or {}).get("event_ids") or ()
    shown = sorted(
        (events[i] for i in _evidence_ids(flag) if i in events),
        key=lambda e: (e.device_id, e.seq),
    )
    return ShiftFlag(
        flag=flag,
        events=shown,
        latest=frozenset(i for i in latest if isinstance(i, int)),
        voided_by={e.id: voided[e.id] for e in shown if e.id in voided},
        rejected=[i for i in cited_in(flag.evidence, REJECTED_IDS, ()) if isinstance(i, int)],
    )


def _by_parcel(rejected: Iterable[QuarantinedEvent]) -> dict[str, list[QuarantinedEvent]]:
    found: dict[str, list[QuarantinedEvent]] = defaultdict(list)
    for row in rejected:
        if row.parcel_tracking_no is not None:  # as ``RejectionScope`` attributed it
            found[row.parcel_tracking_no].append(row)
    return found


def _parcels(session: Session, numbers: Sequence[str]) -> dict[str, Parcel]:
    return {
        p.tracking_no: p
        for chunk in chunks(numbers)
        for p in session.scalars(select(Parcel).where(among(session, Parcel.tracking_no, chunk)))
    }


def voided_among(session: Session, events: Iterable[ScanEvent]) -> dict[int, int]:
    """``{event id: the correction's event id}`` for those of ``events`` a later
    correction of their PDA voided (the earliest, as ``sync.projection.voided_by`` has
    it), one statement per chunk: a page listing a flag's events says which no longer
    stand, as a proof's timeline does."""
    targets = {e.id: e for e in events if e.type != EventType.CORRECTION}
    correction = aliased(ScanEvent, name="correction")
    found: dict[int, tuple[int, int]] = {}
    for chunk in chunks(sorted(targets)):
        rows = session.execute(
            select(ScanEvent.id, correction.id, correction.seq)
            .join(
                correction,
                and_(*corrects(correction, ScanEvent)),
            )
            .where(ScanEvent.id.in_(chunk))
        )
        for target_id, correction_id, seq in rows:
            if target_id not in found or seq < found[target_id][1]:
                found[target_id] = (correction_id, seq)
    return {target_id: correction_id for target_id, (correction_id, _) in found.items()}


def _events_filed(
    session: Session, ids: Iterable[int]
) -> tuple[dict[int, ScanEvent], dict[int, int | None]]:
    """``_events``, with the station of the shift each is filed under (None: none), in
    the same statements (by the shift's key, as ``latest_scans`` reads it)."""
    events: dict[int, ScanEvent] = {}
    filed_at: dict[int, int | None] = {}
    station = select(Shift.station_id).where(Shift.id == ScanEvent.shift_id).scalar_subquery()
    for chunk in chunks(sorted(set(ids))):
        for event, station_id in session.execute(
            select(ScanEvent, station).where(among(session, ScanEvent.id, chunk))
        ):
            events[event.id] = event
            filed_at[event.id] = station_id
    return events, filed_at


def _events(session: Session, ids: Iterable[int]) -> dict[int, ScanEvent]:
    wanted = sorted(set(ids))
    return {
        e.id: e
        for chunk in chunks(wanted)
        for e in session.scalars(select(ScanEvent).where(among(session, ScanEvent.id, chunk)))
    }


def consents_on_record(
    session: Session, parcels: Sequence[Parcel], station_id: int
) -> dict[str, list[ConsentOnRecord]]:
    """Every consent that could cover each parcel, oldest grant first, as the rules weigh
    it for a drop by a PDA of ``station_id``."""
    if not parcels:
        return {}
    facts = consents_for(session, parcels)
    rows = consents_by_id(session, [f.id for found in facts.values() for f in found])
    return {
        tracking_no: sorted(
            (
                ConsentOnRecord(rows[f.id], not counts_at_station(f, station_id), f.refused_at)
                for f in found
                if f.id in rows
            ),
            key=lambda c: (c.consent.granted_at, c.consent.id),
        )
        for tracking_no, found in facts.items()
    }


def sees_user(user: User, visible_station: int | None) -> bool:
    """Whether a reader seeing ``visible_station`` (None: all) may learn who ``user`` is:
    one of that station, or of none (an admin, a channel's integration account); not a
    courier of another station (SECURITY.md threat 3), such as one who recorded a
    consent for this station's parcel on their own station's PDA."""
    return visible_station is None or user.station_id in (None, visible_station)


def user_ref(user: User, visible_station: int | None) -> dict[str, Any]:
    """``user`` as the API gives them to a reader seeing ``visible_station``: by id, and
    by name only where the reader may know them (``sees_user``)."""
    named = sees_user(user, visible_station)
    return {
        "id": user.id,
        "username": user.username if named else None,
        "full_name": user.full_name if named else None,
    }


class _WrittenOffBy(Protocol):
    @property
    def written_off_by(self) -> int: ...

    @property
    def written_off_by_name(self) -> str | None: ...

    def _replace(self, **changes: Any) -> Any: ...


W = TypeVar("W", bound=_WrittenOffBy)


def write_offs_named(
    session: Session, write_offs: Sequence[W], visible_station: int | None
) -> list[W]:
    """``write_offs`` (a balance's ``WriteOff``, a list's ``WriteOffRecord``) with who
    wrote each off named only to a reader who may know them (``sees_user``): a manager
    who moved to another station since is an id (``written_off_by``) to this station's,
    as on a proof. One query, none without write-offs."""
    named = users_seen_by(session, [w.written_off_by for w in write_offs], visible_station)
    return [
        w if w.written_off_by in named else w._replace(written_off_by_name=None)
        for w in write_offs
    ]


def consent_users(consent: Consent | None) -> list[int | None]:
    """The users a page names with a consent: who recorded it and who revoked it."""
    return [] if consent is None else [consent.created_by, consent.revoked_by]


def users_by_id(session: Session, ids: Iterable[int | None]) -> dict[int, User]:
    wanted = sorted({i for i in ids if i is not None})
    return {
        u.id: u
        for chunk in chunks(wanted)
        for u in session.scalars(select(User).where(User.id.in_(chunk)))
    }


def users_seen_by(
    session: Session, ids: Iterable[int | None], visible_station: int | None
) -> dict[int, User]:
    """``users_by_id``, keeping those a reader seeing ``visible_station`` may know
    (``sees_user``): a list names no courier of another station that its rows' pages
    would not name (a mis-sorted parcel's, on the proof search)."""
    return {i: u for i, u in users_by_id(session, ids).items() if sees_user(u, visible_station)}


# -- a flag -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlagPage:
    flag: Flag
    changes: Sequence[FlagChange]
    events: list[ScanEvent]  # the evidence's events, in device order
    # The courier and whoever changed the flag: those the reader may know (``sees_user``).
    users: dict[int, User]
    shifts: frozenset[int]  # the shifts of those events the reader may open
    proofs: frozenset[int]  # the deliveries among them whose proof the reader may open
    voided_by: dict[int, int]  # those of them a correction voided: the correction's id
    # The rejected events it cites (``REJECTED_IDS``: a shift reopened by them), as
    # ``shown_rejection`` shows them; those of another station left out.
    rejections: list[dict[str, Any]] = field(default_factory=list)
    # A parcel missing at handover, or off the manifest: its check-outs and outcomes
    # under the station's other shifts, as the shift's page lists them.
    elsewhere: list[ScanElsewhere] = field(default_factory=list)


def flag_page(
    *, session: Session, flag: Flag, visible_station: int | None, unmasked: bool = False
) -> FlagPage:
    """The flag, its history and its evidence's events, each leading to the shift it is
    filed under and, a delivery, to its proof: a parcel's rule flag names no shift of
    its own, and the shift page is where its consents on record and its photos are.

    ``visible_station``: the one station a station-bound reader sees (None: all). An
    event pushed by another station's PDA (``wrong_station``) is filed under that
    station's shift, and a parcel's proof is its own station's (one never taken in is
    the recording station's, ``opens_proof``): neither is linked for a reader who would
    get a 404 page. Nor is a user of another station named to them (``sees_user``): the
    flag's courier, or a manager who decided it, since moved there. Its rejected events
    (``REJECTED_IDS``) are listed too, masked as on the shift's page but for an auditor
    (``unmasked``). Five to seven queries; one more for a handover flag, whose
    parcel's scans under the station's other shifts it lists (``scans_elsewhere``)."""
    changes = flag_changes(session=session, flag=flag)
    rejected = [i for i in cited_in(flag.evidence, REJECTED_IDS, ()) if isinstance(i, int)]
    events = sorted(
        _events(session, _evidence_ids(flag)).values(), key=lambda e: (e.device_id, e.seq)
    )
    elsewhere = _flag_scans_elsewhere(session, flag)
    users = users_seen_by(
        session,
        [flag.courier_id, *(c.by_user_id for c in changes), *(s.courier_id for s in elsewhere)],
        visible_station,
    )
    delivered = sorted({e.tracking_no for e in events if e.type in DELIVERY_TYPES})
    parcels = _parcels(session, delivered) if delivered else {}
    return FlagPage(
        flag=flag,
        changes=changes,
        events=events,
        users=users,
        shifts=frozenset(e.shift_id for e in events if opens_shift(e, visible_station)),
        proofs=_proofs_opened(events, parcels, visible_station),
        voided_by=voided_among(session, events),
        rejections=[
            shown_rejection(row, unmasked=unmasked)
            for row in rejections_by_id(session=session, ids=rejected, station_id=visible_station)
        ],
        elsewhere=elsewhere,
    )


def _flag_scans_elsewhere(session: Session, flag: Flag) -> list[ScanElsewhere]:
    """A handover flag's parcel's check-outs and outcomes under the station's other
    shifts (``scans_elsewhere``): one statement, for those flags only."""
    if flag.kind not in HANDOVER_KINDS or not flag.tracking_no or flag.shift_id is None:
        return []
    found = scans_elsewhere(
        flag.shift_id, flag.station_id, latest_scans(session, [flag.tracking_no])
    )
    return found.get(flag.tracking_no, [])


def opens_shift(event: ScanEvent, visible_station: int | None) -> bool:
    """Whether a page links the shift ``event`` is filed under: it is filed under one,
    and the reader (``visible_station``: the one station a station-bound reader sees,
    None all) may open it. A PDA of another station files its events under that
    station's shift (a mis-sorted parcel's drop): a reader who would get a 404 page is
    neither linked to it nor told its id."""
    return event.shift_id is not None and visible_station in (None, event.station_id)


def opens_proof(event: ScanEvent, parcel: Parcel | None, visible_station: int | None) -> bool:
    """Whether a page links the proof of ``event``: it is a delivery, and the reader
    (``visible_station`` as for ``opens_shift``) may open it: it is a proof of their
    station (``sync.proofs.proof_station``: its parcel's, or for a tracking number never
    taken in, ``parcel`` None, the station where it was recorded)."""
    return event.type in DELIVERY_TYPES and visible_station in (
        None,
        proof_station(event, parcel),
    )


def _proofs_opened(
    events: Iterable[ScanEvent], parcels: Mapping[str, Parcel], visible_station: int | None
) -> frozenset[int]:
    """The ids of the deliveries among ``events`` whose proof a page links
    (``opens_proof``); ``parcels``: every one of their tracking numbers taken in."""
    return frozenset(
        e.id for e in events if opens_proof(e, parcels.get(e.tracking_no), visible_station)
    )


def evidence_shifts(
    *, session: Session, flags: Sequence[Flag], visible_station: int | None
) -> dict[int, list[int]]:
    """``{flag id: [shift id]}``: for each parcel's flag of a page of the flag queue that
    names no shift of its own (a rule flag), the shifts its evidence's events are filed
    under and the reader may open (``visible_station`` as for ``flag_page``). One query
    for a page of flags (a parcel's evidence is a few of its events)."""
    cited = {
        flag.id: _evidence_ids(flag)
        for flag in flags
        if flag.shift_id is None and flag.subject_type == "parcel"
    }
    wanted = sorted({i for ids in cited.values() for i in ids})
    filed: dict[int, int] = {}
    for chunk in chunks(wanted):
        query = select(ScanEvent.id, ScanEvent.shift_id).where(
            among(session, ScanEvent.id, chunk), ScanEvent.shift_id.is_not(None)
        )
        if visible_station is not None:
            query = query.where(ScanEvent.station_id == visible_station)
        filed.update((event_id, shift_id) for event_id, shift_id in session.execute(query))
    return {
        flag_id: sorted({filed[i] for i in ids if i in filed}) for flag_id, ids in cited.items()
    }


# -- proofs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProofRow:
    proof: Proof
    images: list[ProofImageRef]
    drop: DropConsent | None  # locker and pickup-point drops only
    # A repeated scan: the first scan's event id (``sync.proofs.repeats_of``)
    repeat_of: int | None = None


@dataclass(frozen=True)
class ProofPage:
    detail: ProofDetail
    # A drop no consent authorized, its class needing one: every consent on record that
    # could cover its parcel, as the shift page lists them (a standing one granted days
    # before, withdrawn for the parcel by the recipient's refusal at the door, says so).
    consents_on_record: list[ConsentOnRecord]
    # The delivery's courier, each event's courier and who pushed it, and who recorded
    # the consents shown: those the reader may know (``sees_user``).
    users: dict[int, User]
    # The PDAs' events naming the parcel that the server rejected (kept in quarantine),
    # newest first, as ``shown_rejection`` shows them: a locker drop refused for a
    # missing locker is another outcome the PDA tried to record. At most
    # ``PROOF_REJECTIONS_SHOWN``.
    rejections: list[dict[str, Any]] = field(default_factory=list)
    more_rejections: bool = False  # more than those: the quarantine's list has them all
    # How many there are in all, as the proof's detail counts them (``rejected_events``).
    rejected_total: int = 0
    # Each of its flags' latest decision by a manager, by flag id, as the API's
    # ``latest_decision`` gives it: the decider named through ``users`` like the others.
    decisions: dict[int, Decision] = field(default_factory=dict)

    @property
    def rejections_shown(self) -> list[int]:
        """The ids of the rejected events on the page (an auditor's read names them)."""
        return sorted(r["id"] for r in self.rejections)


def proof_page(
    *,
    session: Session,
    detail: ProofDetail,
    visible_station: int | None,
    unmasked: bool,
) -> ProofPage:
    """A proof as its page shows it: its detail (``sync.proofs.get_proof``), the
    consents on record for a drop none authorized, judged as for a drop by a PDA of the
    drop's station, the users it names: who delivered, who recorded and pushed each
    event of the chain, who recorded the consents, and the rejected events naming its
    parcel (``parcel_rejections``). ``visible_station`` as for ``shift_page``: a courier
    of another station (one who scanned the parcel mis-sorted) is not named to a
    station-bound reader, nor is another station's PDA's rejected event shown.
    ``unmasked``: the reader is an auditor, shown the phone numbers in those rejected
    events whole. Each flag's latest decision, its manager named as the others.
    Three queries (two when no flag was decided), and those of the consents on record
    for a drop none authorized, however many rejected events name the parcel."""
    parcel, drop = detail.proof.parcel, detail.drop
    unauthorized = drop is not None and drop.required and drop.consent is None
    on_record = (
        consents_on_record(session, [parcel], detail.proof.event.station_id).get(
            parcel.tracking_no, []
        )
        if unauthorized and parcel is not None
        else []
    )
    named = [
        detail.proof.event.courier_id,
        *(i for t in detail.timeline for i in (t.event.courier_id, t.pushed_by)),
        *consent_users(detail.authorizing_consent),
        *(i for c in on_record for i in consent_users(c.consent)),
    ]
    rejected, rejected_total = parcel_rejections(
        session=session, tracking_no=detail.proof.event.tracking_no, station_id=visible_station
    )
    decisions = latest_decisions(session=session, flags=detail.flags)
    deciders = {d.by.id: d.by for d in decisions.values()}
    return ProofPage(
        detail=detail,
        consents_on_record=on_record,
        users={
            i: u
            for i, u in {**users_by_id(session, named), **deciders}.items()
            if sees_user(u, visible_station)
        },
        decisions=decisions,
        rejections=[shown_rejection(r, unmasked=unmasked) for r in rejected],
        more_rejections=rejected_total > len(rejected),
        rejected_total=rejected_total,
    )


def parcel_rejections(
    *, session: Session, tracking_no: str, station_id: int | None
) -> tuple[list[QuarantinedEvent], int]:
    """The rejected events naming the parcel, newest first, as
    ``GET /api/v1/quarantine?tracking_no=`` finds them for a reader of ``station_id``
    (pushed there; None: any station's): at most ``PROOF_REJECTIONS_SHOWN``, and how many
    there are in all, as the proof's detail counts them (``count_naming``). One query,
    along ``ix_quarantined_event_parcel``."""
    return naming_counted(
        session=session,
        tracking_no=tracking_no,
        station_id=station_id,
        limit=PROOF_REJECTIONS_SHOWN,
    )


def proof_rows(
    *,
    session: Session,
    proofs: Sequence[Proof],
    policy: Policy,
    reader: BlobReader,
) -> list[ProofRow]:
    """A page of proofs with their images' states as recorded (``recorded_image_states``:
    no file hashed), each drop's consent and whether it repeats a scan before it (the
    same delivery scanned twice)."""
    events = proofs_events(session=session, proofs=proofs)
    consents = proofs_consents(session=session, proofs=proofs, policy=policy, loaded=events)
    repeats = repeats_of(proofs, events)
    states = recorded_image_states(
        session=session,
        digests=[d for p in proofs for _, d in pod_digests(p.event.details.get("pod"))],
        reader=reader,
    )
    return [
        ProofRow(
            proof=p,
            images=_images(p.event.details.get("pod"), states),
            drop=consents.get(p.event.id),
            repeat_of=repeats.get(p.event.id),
        )
        for p in proofs
    ]


def local_range(
    first: dt.date | None, last: dt.date | None, timezone: str
) -> tuple[dt.datetime | None, dt.datetime | None]:
    """``[start of first, end of last)`` of a station's local days, in UTC (either open).
    A bound at the calendar's edge that is no datetime in UTC (the end of 9999-12-31,
    the start of 0001-01-01 east of Greenwich) is the edge itself: from 0001-01-01
    is everything, from 9999-12-31 nothing."""
    return _bound(first, timezone, 0), _bound(last, timezone, 1)


def _bound(day: dt.date | None, timezone: str, days_after: int) -> dt.datetime | None:
    """The start of ``day`` (``days_after`` 0) or of the day after it (1), in UTC."""
    if day is None:
        return None
    try:
        local = dt.datetime.combine(
            day + dt.timedelta(days=days_after), dt.time(), tzinfo=ZoneInfo(timezone)
        )
        return local.astimezone(dt.UTC)
    except OverflowError:
        edge = dt.datetime.max if day.year > dt.MAXYEAR // 2 else dt.datetime.min
        return edge.replace(tzinfo=dt.UTC)


# -- the daily monitoring report --------------------------------------------------------------


@dataclass(frozen=True)
class DailyMonitoring:
    report: dict[str, Any]  # sync.reports' daily report, as the API answers it
    week: list[dict[str, Any]]  # the day and the six before it: {"date", **metrics}
    discrepancies: dict[int, int]  # by courier: discrepancies of their shifts that day


def daily_monitoring(
    *,
    session: Session,
    station_id: int,
    day: dt.date | None,
    deadlines: OnTimeDeadlines,
    now: dt.datetime,
) -> DailyMonitoring:
    """The daily report of ``day`` (default: the station's yesterday), the six days
    before it for a chart, and each courier's discrepancy count from the day's board.

    Bounded: seven days' tallies, each computed once (the day and its previous day are
    in the week), and one board.
    """
    station = get_station(session=session, station_id=station_id)
    tallies = StationDays(session, station, deadlines)
    body = report(
        session=session,
        station_id=station_id,
        kind=ReportKind.DAILY,
        start=day,
        deadlines=deadlines,
        now=now,
        days=tallies,
    )
    shown = dt.date.fromisoformat(body["period_start"])
    days = [
        shown - dt.timedelta(days=n)
        for n in reversed(range(WEEK_DAYS))
        if shown - dt.timedelta(days=n) >= EARLIEST
    ]
    week = [{"date": t.day.isoformat(), **t.total().metrics()} for t in tallies.of(days)]
    discrepancies: dict[int, int] = defaultdict(int)
    for row in station_board(session=session, station_id=station_id, work_date=shown):
        discrepancies[row.shift.courier_id] += len(row.balance.discrepancies)
    return DailyMonitoring(report=body, week=week, discrepancies=dict(discrepancies))
