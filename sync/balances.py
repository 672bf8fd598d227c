"""Shift balances from the database, for one shift or a station's whole day.

The rules are in ``sync.handover`` (pure); this module gathers their inputs
for many shifts at once in a fixed number of queries, whatever the number of
shifts and parcels (the station board at 19:00 reads 40 shifts or 200 the
same way): the shifts' events, corrections voiding them from elsewhere, the
rule flags of their parcels, their own flags and their devices' sequence gaps.

It also keeps each closed shift's own flags (``missing_at_handover``,
``not_on_manifest``) equal to what its events say, whenever they change.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from sqlalchemy import ScalarSelect, and_, case, func, or_, select
from sqlalchemy.orm import Session, aliased

from models import (
    Blob,
    DeviceSyncState,
    Flag,
    FlagSeverity,
    FlagStatus,
    ProofImage,
    ScanEvent,
    SeqWriteOff,
    Shift,
    ShiftStatus,
    User,
)
from sync.collector import collector_paused
from sync.events import DELIVERY_TYPES
from sync.flags import (
    ACTIVE_STATUSES,
    FlagSubject,
    close_flags,
    judged_status,
    raise_new_flags,
    rejudge,
)
from sync.handover import (
    BALANCE_RULE_KINDS,
    COUNT_FIELDS,
    HANDOVER_KINDS,
    MISSING,
    OUTCOMES_KEPT,
    Balance,
    BalanceStatus,
    FlagRef,
    ParcelTrail,
    ShiftEvent,
    ShiftSeqs,
    WriteOff,
    balance_version,
    compute_balance,
    discrepancies_decided,
    handover_flags_wanted,
    may_repeat,
    owned_seqs,
    parcel_trails,
    same_snapshot,
    signed_as,
    snapshot_version,
)
from sync.projection import EventFact, voided_in_sql
from sync.quarantine import RejectionScope, rejection_counts
from sync.rules import first_scans
from sync.shifts import adjacent_shift
from sync.sql import among, among_at_once, chunks, plain_rows
from sync.status import FACT_COLUMNS, load_events

# A parcel's rule flags that wait for a manager's look without unbalancing the handover:
# a final outcome corrected (a drop made a return), by the courier or by another on the
# PDA. The mis-tap is amended, never erased, and a manager sees it (DESIGN.md): a shift
# citing one still open is no clean handover to sign off with others (``sync.signoffs``).
REVIEW_KINDS = frozenset({"correction_review", "correction_by_another_courier"})
# Handover flags the events may close: those a manager resolved too (README).
STANDING = (*ACTIVE_STATUSES, FlagStatus.RESOLVED)
HANDOVER_SEVERITY = {MISSING: FlagSeverity.CRITICAL, "not_on_manifest": FlagSeverity.WARNING}
# A shift's own flag judged again, as its history names the cause.
FAILS_AGAIN = {
    MISSING: "missing again",
    "not_on_manifest": "an outcome the shift did not check out, again,",
}


class StoredFlag(NamedTuple):
    """What judging a shift's own flag again compares: as stored."""

    evidence: dict[str, Any]
    decision: FlagStatus | None
    decided_on: dict[str, Any] | None


class OpenFlag(NamedTuple):
    """A flag naming a shift still waiting for a manager (open or acknowledged): its own
    (proof images missing at handover, not closed in time, its PDA gone silent, reopened
    by late events), which its balance does not count, or a handover flag of it, which
    it counts as a discrepancy (``waiting_flags``)."""

    flag_id: int
    kind: str
    status: FlagStatus


# The shift, then the tracking number and EventFact's fields, as the projection reads them.
EVENT_COLUMNS = (ScanEvent.shift_id, *FACT_COLUMNS[: 1 + len(EventFact._fields)])


@dataclass
class ShiftFacts:
    """Everything the balance of one shift is computed from."""

    shift: Shift
    events: list[ShiftEvent]
    rule_flags: dict[str, list[FlagRef]]
    handover_flags: dict[tuple[str, str], FlagRef]
    seqs: ShiftSeqs
    handover_stored: dict[int, StoredFlag]  # flag id -> its evidence and decision
    # Its parcels' ``REVIEW_KINDS`` flags not closed, by tracking number, whatever events
    # they cite (``review_flags`` keeps those citing the shift's).
    reviews: dict[str, list[FlagRef]] = field(default_factory=dict)
    # {repeat's event id: its outcome's first scan}, for its parcels that may repeat one
    # (``sync.handover.may_repeat``), read from their whole histories.
    first_scans: dict[int, EventFact] = field(default_factory=dict)

    def trails(self) -> dict[str, ParcelTrail]:
        return parcel_trails(self.events, self.first_scans)

    def balance(self) -> Balance:
        return compute_balance(
            shift_id=self.shift.id,
            trails=self.trails(),
            rule_flags=self.rule_flags,
            handover_flags=self.handover_flags,
            seqs=self.seqs,
            station_id=self.shift.station_id,
        )

    def review_flags(self) -> list[FlagRef]:
        """Its parcels' corrections to review that cite an event filed under it (the one
        voided, or the correction), in id order: open, acknowledged or resolved."""
        own = {event.fact.event_id for event in self.events}
        return sorted(
            (f for found in self.reviews.values() for f in found if f.event_ids & own),
            key=lambda f: f.id,
        )

    def reviews_waiting(self) -> list[OpenFlag]:
        """Those no manager has looked at yet (open): a clean handover has none."""
        return [
            OpenFlag(f.id, f.kind, f.status)
            for f in self.review_flags()
            if f.status == FlagStatus.OPEN
        ]

    def rejection_scope(self, balance: Balance) -> RejectionScope:
        """Which of its PDA's rejected events are the shift's, given its ``balance``: those
        with a seq it owns, and those without a seq naming one of its parcels."""
        return RejectionScope(
            self.shift.device_id,
            owned_seqs(self.seqs),
            sorted({p.tracking_no for p in balance.parcels}),
        )


def gather(session: Session, shifts: Sequence[Shift]) -> dict[int, ShiftFacts]:
    """The balance inputs of ``shifts``, in five to seven queries (per 900 shifts), and
    one per 900 parcels that may have a final outcome scanned again (``_first_scans``;
    none on most days).

    A few objects per event: built with the cyclic collector paused (``sync.collector``;
    ``balances`` also keeps it paused while computing from them)."""
    if not shifts:
        return {}
    with collector_paused():
        return _gather(session, shifts)


def _gather(session: Session, shifts: Sequence[Shift]) -> dict[int, ShiftFacts]:
    ids = sorted({shift.id for shift in shifts})
    devices = sorted({shift.device_id for shift in shifts})
    events: dict[int, list[ShiftEvent]] = defaultdict(list)
    lowest: dict[int, int] = {}  # shift -> the lowest seq of its own device's events in it
    lowest_by_device: dict[str, int] = {}  # device -> its lowest seq in these shifts
    in_shifts: list[tuple[int | None, ShiftEvent]] = []  # corrections filed in these shifts
    device_of = {shift.id: shift.device_id for shift in shifts}
    tracking_nos: set[str] = set()
    # One pass over what may be a hundred thousand rows: nothing here that is not needed.
    for chunk in chunks(ids):
        for shift_id, tracking_no, *columns in plain_rows(
            session, select(*EVENT_COLUMNS).where(among(session, ScanEvent.shift_id, chunk))
        ):
            fact = EventFact(*columns)
            event = ShiftEvent(tracking_no, fact)
            events[shift_id].append(event)
            tracking_nos.add(tracking_no)
            device, seq = fact.device_id, fact.seq
            if seq < lowest_by_device.get(device, seq + 1):
                lowest_by_device[device] = seq
            if device == device_of[shift_id] and seq < lowest.get(shift_id, seq + 1):
                lowest[shift_id] = seq
            if fact.voids_client_event_id is not None:
                in_shifts.append((shift_id, event))
    # A correction voids its target wherever it was filed: in another of these shifts
    # (already loaded) or outside them (read here). A correction comes after its target
    # on the device: only seqs above the lowest event of these shifts, per device, are
    # worth reading.
    outside = [(None, c) for c in _corrections(session, lowest_by_device, set(ids))]
    if in_shifts or outside:
        owner = {  # (device, client event id) -> the shift it is filed in
            (event.fact.device_id, event.fact.client_event_id): shift_id
            for shift_id, shift_events in events.items()
            for event in shift_events
        }
        for filed_in, correction in [*in_shifts, *outside]:
            voided = (correction.fact.device_id, correction.fact.voids_client_event_id)
            target = owner.get(voided)
            if target is not None and target != filed_in:
                events[target].append(correction)
    first_scans = _first_scans(session, events.values())
    rule_flags, reviews = _rule_flags(session, sorted(tracking_nos))
    handover, handover_stored = _handover_flags(session, ids)
    states = _device_states(session, devices)
    next_starts, previous_ends = _neighbour_bounds(session, shifts, lowest)
    write_offs = _write_offs(
        session, sorted(d for d, state in states.items() if state.written_off_ranges)
    )
    facts = {}
    for shift in shifts:
        state = states.get(shift.device_id)
        tracking_nos = {event.tracking_no for event in events[shift.id]}
        facts[shift.id] = ShiftFacts(
            shift=shift,
            events=events[shift.id],
            rule_flags={tn: rule_flags[tn] for tn in tracking_nos if tn in rule_flags},
            reviews={tn: reviews[tn] for tn in tracking_nos if tn in reviews},
            handover_flags=handover[shift.id],
            handover_stored=handover_stored,
            first_scans=first_scans,
            seqs=replace(
                _seqs_of(shift, state, lowest, next_starts, previous_ends),
                device_written_off=(state.written_off_ranges or []) if state else [],
                write_offs=write_offs.get(shift.device_id, []),
            ),
        )
    return facts


def shift_seqs(session: Session, shifts: Sequence[Shift]) -> dict[int, ShiftSeqs]:
    """``{shift id: what decides the seqs it owns}`` (``sync.handover.owned_seqs``), as
    ``gather`` reads it, without the shifts' events, flags and parcels' histories: a
    lowest seq per shift (an aggregate), their PDAs' states and the shifts' neighbours.
    For who owns a seq (``sync.lost_seqs.seq_owners``), which may weigh a year of a PDA's
    shifts that declared no seqs: ``gather`` loaded every event of them (8 s on SQLite
    for 250 shifts of 200 events, on each ``GET /flags?tracking_no=``)."""
    if not shifts:
        return {}
    ids = sorted({shift.id for shift in shifts})
    device_of = {shift.id: shift.device_id for shift in shifts}
    lowest: dict[int, int] = {}  # shift -> the lowest seq of its own device's events in it
    for chunk in chunks(ids):
        for shift_id, device_id, seq in session.execute(
            select(ScanEvent.shift_id, ScanEvent.device_id, func.min(ScanEvent.seq))
            .where(ScanEvent.shift_id.in_(chunk))
            .group_by(ScanEvent.shift_id, ScanEvent.device_id)
        ):
            if device_id == device_of[shift_id]:
                lowest[shift_id] = seq
    states = _device_states(session, sorted({shift.device_id for shift in shifts}))
    next_starts, previous_ends = _neighbour_bounds(session, shifts, lowest)
    return {
        shift.id: _seqs_of(shift, states.get(shift.device_id), lowest, next_starts, previous_ends)
        for shift in shifts
    }


def _device_states(session: Session, devices: Sequence[str]) -> dict[str, DeviceSyncState]:
    """``{device id: its sync state}`` for those of ``devices`` that have one."""
    return {
        state.device_id: state
        for chunk in chunks(devices)
        for state in session.scalars(
            select(DeviceSyncState).where(DeviceSyncState.device_id.in_(chunk))
        )
    }


def _seqs_of(
    shift: Shift,
    state: DeviceSyncState | None,
    lowest: Mapping[int, int],
    next_starts: Mapping[int, int],
    previous_ends: Mapping[int, int],
) -> ShiftSeqs:
    """What decides the seqs ``shift`` owns (``sync.handover.owned_seqs``), from its PDA's
    ``state`` (None: the PDA never synced) and its neighbours' bounds: without the PDA's
    write-offs, which ``gather`` adds for the balance (they decide no seq's owner)."""
    return ShiftSeqs(
        status=shift.status,
        first_seq=shift.first_seq,
        last_seq=shift.last_seq,
        device_max_seq=state.max_seq if state else 0,
        device_missing=state.missing_ranges if state else [],
        lowest_event_seq=lowest.get(shift.id),
        next_shift_seq=next_starts.get(shift.id),
        previous_shift_end=previous_ends.get(shift.id),
    )


def _first_scans(
    session: Session, shifts_events: Iterable[Sequence[ShiftEvent]]
) -> dict[int, EventFact]:
    """``{repeat's event id: the first scan of the outcome it repeats}`` for the parcels
    of these shifts that may have one (``may_repeat``), folded over each parcel's whole
    history (``sync.rules.first_scans``) as the rules fold it: the scan that settles a
    repeated outcome, and whether a shift's only outcome of a parcel repeats another
    shift's, depend on the place of each scan and on events of other shifts."""
    wanted = sorted({tn for events in shifts_events for tn in may_repeat(events)})
    if not wanted:
        return {}
    return {
        repeat: first.fact
        for history in load_events(session, wanted).values()
        for repeat, first in first_scans(history).items()
    }


def _write_offs(session: Session, devices: Sequence[str]) -> dict[str, list[WriteOff]]:
    """``{device: its write-offs of lost seqs, oldest first}``, for ``devices``: those
    with seqs still written off (none: no query)."""
    found: dict[str, list[WriteOff]] = defaultdict(list)
    for chunk in chunks(devices):
        rows = session.execute(
            select(SeqWriteOff, User.username, User.full_name)
            .join(User, User.id == SeqWriteOff.written_off_by)
            .where(SeqWriteOff.device_id.in_(chunk))
            .order_by(SeqWriteOff.id)
        )
        for write_off, username, full_name in rows:
            found[write_off.device_id].append(
                WriteOff(
                    id=write_off.id,
                    ranges=write_off.ranges,
                    reason=write_off.reason,
                    written_off_by=write_off.written_off_by,
                    written_off_by_name=full_name or username,
                    written_off_at=write_off.written_off_at,
                )
            )
    return found


def _neighbour_bounds(
    session: Session, shifts: Sequence[Shift], lowest: dict[int, int]
) -> tuple[dict[int, int], dict[int, int]]:
    """Where the device's neighbouring shifts bound what a shift may own, for shifts
    that did not declare that bound themselves (two queries, whatever their number;
    each reads a shift's two neighbours, not the device's history):

    * ``{shift id: the seq where its device's next shift starts}``, for closed shifts
      that declared no last_seq (the next one's first_seq, else its lowest event's);
    * ``{shift id: the seq where its device's previous shift ended}``, for shifts that
      declared no first_seq: the previous one's last_seq, 0 with no previous shift.
      A previous shift closed without its last_seq owns what lies between (the first
      bullet), so it is left out and the shift starts at its lowest event.
    """
    wanted = sorted(
        s.id
        for s in shifts
        if s.first_seq is None or (s.status != ShiftStatus.OPEN and s.last_seq is None)
    )
    following: dict[int, tuple[int, int | None]] = {}  # shift -> next one's id, first_seq
    preceding: dict[int, int | None] = {}  # shift -> previous one's last_seq (0: none)
    for chunk in chunks(wanted):
        for row in session.execute(NEIGHBOURS.where(_shifts.c.id.in_(chunk))):
            if row.next_id is not None:
                following[row.id] = (row.next_id, row.next_first_seq)
            if row.first_seq is None:
                preceding[row.id] = 0 if row.previous_id is None else row.previous_last_seq
    unknown = sorted(
        {nxt for nxt, first in following.values() if first is None and nxt not in lowest}
    )
    starts = dict(lowest)
    for chunk in chunks(unknown):
        starts.update(
            session.execute(
                select(ScanEvent.shift_id, func.min(ScanEvent.seq))
                .where(ScanEvent.shift_id.in_(chunk))
                .group_by(ScanEvent.shift_id)
            ).all()
        )
    next_starts = {
        shift_id: first if first is not None else starts[nxt]
        for shift_id, (nxt, first) in following.items()
        if first is not None or nxt in starts
    }
    previous_ends = {shift_id: end for shift_id, end in preceding.items() if end is not None}
    return next_starts, previous_ends


_shifts = Shift.__table__
_undeclared_last = and_(_shifts.c.status != ShiftStatus.OPEN, _shifts.c.last_seq.is_(None))


def _beside(column: str, *, following: bool) -> ScalarSelect[Any]:
    return adjacent_shift(_shifts, column, following=following, same_courier=False)


# A shift's neighbours on its device, each read only where its own seqs leave a bound
# to them: the next shift's start for a closed shift that declared no last_seq, the
# previous shift's end for one that declared no first_seq.
NEIGHBOURS = select(
    _shifts.c.id,
    _shifts.c.first_seq,
    case((_undeclared_last, _beside("id", following=True))).label("next_id"),
    case((_undeclared_last, _beside("first_seq", following=True))).label("next_first_seq"),
    case((_shifts.c.first_seq.is_(None), _beside("id", following=False))).label("previous_id"),
    case((_shifts.c.first_seq.is_(None), _beside("last_seq", following=False))).label(
        "previous_last_seq"
    ),
)


def _corrections(
    session: Session, lowest: dict[str, int], shift_ids: set[int]
) -> Iterable[ShiftEvent]:
    """Corrections filed outside these shifts by their devices (they may void an event
    in one), from each device's lowest seq among the shifts' events on: a correction
    follows its target. Read through the partial index of corrections."""
    devices = sorted(lowest)
    for chunk in chunks(devices, 200):
        for row in session.execute(
            select(*EVENT_COLUMNS).where(
                ScanEvent.voids_client_event_id.is_not(None),
                or_(*((ScanEvent.device_id == d) & (ScanEvent.seq > lowest[d]) for d in chunk)),
            )
        ):
            shift_id, tracking_no, *fact = row
            if shift_id not in shift_ids:
                yield ShiftEvent(tracking_no, EventFact(*fact))


def _rule_flags(
    session: Session, tracking_nos: Sequence[str]
) -> tuple[dict[str, list[FlagRef]], dict[str, list[FlagRef]]]:
    """Rule flags still standing (not closed) of these parcels (those with events in the
    shifts): those the balance counts, and its corrections to review (``REVIEW_KINDS``),
    in one statement however many parcels. The parcels are named as values
    (one array parameter), so reading their flags costs a probe of ``ix_flag_subject``
    per parcel, whatever the size of the flag table. (Named by a subquery on the
    shifts' events, their number is a guess to PostgreSQL's planner, which then reads
    the whole flag table: a Seq Scan, or a merge join along all of the index.)"""
    found: dict[str, list[FlagRef]] = defaultdict(list)
    reviews: dict[str, list[FlagRef]] = defaultdict(list)
    if not tracking_nos:
        return found, reviews
    for flag_id, kind, status, key, evidence, station_id in session.execute(
        select(
            Flag.id, Flag.kind, Flag.status, Flag.subject_key, Flag.evidence, Flag.station_id
        ).where(
            Flag.subject_type == "parcel",
            among_at_once(session, Flag.subject_key, tracking_nos),
            Flag.kind.in_(sorted(BALANCE_RULE_KINDS | REVIEW_KINDS)),
            Flag.status != FlagStatus.CLOSED,
        )
    ):
        (reviews if kind in REVIEW_KINDS else found)[key].append(
            _ref(flag_id, kind, status, evidence, station_id)
        )
    return found, reviews


def _handover_flags(
    session: Session, shift_ids: Sequence[int]
) -> tuple[dict[int, dict[tuple[str, str], FlagRef]], dict[int, StoredFlag]]:
    found: dict[int, dict[tuple[str, str], FlagRef]] = defaultdict(dict)
    stored: dict[int, StoredFlag] = {}
    for chunk in chunks(shift_ids):
        for flag_id, kind, status, key, shift_id, *kept in session.execute(
            select(
                Flag.id,
                Flag.kind,
                Flag.status,
                Flag.subject_key,
                Flag.shift_id,
                Flag.evidence,
                Flag.decision,
                Flag.decided_on,
            ).where(among(session, Flag.shift_id, chunk), Flag.kind.in_(HANDOVER_KINDS))
        ):
            tracking_no = key.partition(":")[2]
            found[shift_id][(kind, tracking_no)] = _ref(flag_id, kind, status, kept[0])
            stored[flag_id] = StoredFlag(*kept)
    return found, stored


def _ref(
    flag_id: int,
    kind: str,
    status: FlagStatus,
    evidence: dict[str, Any],
    station_id: int | None = None,
) -> FlagRef:
    return FlagRef(flag_id, kind, status, frozenset(evidence.get("event_ids") or ()), station_id)


def balances(session: Session, shifts: Sequence[Shift]) -> dict[int, Balance]:
    """Each shift's balance. Its inputs are a few objects per event, which the cyclic
    collector could only walk again and again (``sync.collector``)."""
    with collector_paused():
        return {shift_id: facts.balance() for shift_id, facts in gather(session, shifts).items()}


def shift_balance(*, session: Session, shift: Shift) -> Balance:
    return balances(session, [shift])[shift.id]


class HandoverReads(NamedTuple):
    """What the board and a sign-off together read of handovers: each shift's balance,
    its PDA's rejected events (those with some) and its corrections to review that no
    manager has looked at (those with some)."""

    balances: dict[int, Balance]
    rejected: dict[int, int]
    reviews: dict[int, list[OpenFlag]]


def balances_and_rejections(
    session: Session,
    shifts: Sequence[Shift],
    *,
    station_id: int,
    gathered: Mapping[int, ShiftFacts] | None = None,
) -> HandoverReads:
    """Each shift's balance, and for each shift handed over how many of its PDA's events
    pushed at ``station_id`` the server rejected (those with none left out), counted as
    its page lists them (``sync.quarantine.shift_rejections_counted``): what the PDA says
    happened that the balance cannot show (a correction refused voids nothing). One
    query more than ``balances`` (per ``sync.quarantine.COUNTED_AT_ONCE`` shifts). And its
    parcels' corrections to review still open (``ShiftFacts.reviews_waiting``), read with
    the balance's own flags. ``gathered``: the shifts' facts, when the caller has
    gathered them already (a shift's page)."""
    with collector_paused():
        facts = gathered if gathered is not None else gather(session, shifts)
        judged = {shift_id: f.balance() for shift_id, f in facts.items()}
        reviews = {
            shift_id: waiting for shift_id, f in facts.items() if (waiting := f.reviews_waiting())
        }
    scopes = {
        shift_id: f.rejection_scope(judged[shift_id])
        for shift_id, f in facts.items()
        if f.shift.status != ShiftStatus.OPEN
    }
    return HandoverReads(
        judged, rejection_counts(session=session, scopes=scopes, station_id=station_id), reviews
    )


@dataclass(frozen=True)
class HandoverRead:
    """What a manager reads of a handover to sign it off, beyond its balance, as the
    board row, the balance (``GET /shifts/<id>/balance``) and a sign-off all count it
    (``read_handovers``)."""

    balance: Balance
    open_flags: Sequence[OpenFlag] = ()  # waiting for a manager (``waiting_flags``)
    # Proof images its deliveries name that the server lacks, once handed over: the
    # sweep's ``blob_missing_at_handover`` flags them only after its grace.
    images_missing: int = 0
    # Its PDA's events the server rejected, once handed over (``balances_and_rejections``).
    rejected_events: int = 0
    # Its parcels' corrections to review, citing its events, no manager has looked at.
    reviews: Sequence[OpenFlag] = ()


def read_handovers(
    session: Session,
    shifts: Sequence[Shift],
    *,
    station_id: int,
    gathered: Mapping[int, ShiftFacts] | None = None,
) -> dict[int, HandoverRead]:
    """Each shift's ``HandoverRead``, by id: its balance and rejected events
    (``balances_and_rejections``, those pushed at ``station_id``), the flags naming it
    still waiting and the proof images its deliveries lack once handed over. The one
    count of them the board, the balance, a shift's page and both sign-offs read, in
    the same few queries however many shifts (``gathered``: their facts, read
    already)."""
    computed, rejected, reviews = balances_and_rejections(
        session, shifts, station_id=station_id, gathered=gathered
    )
    flagged = waiting_flags(session, [shift.id for shift in shifts])
    lacking = images_lacking(
        session, [shift.id for shift in shifts if shift.status != ShiftStatus.OPEN]
    )
    return {
        shift.id: HandoverRead(
            computed[shift.id],
            flagged.get(shift.id, ()),
            len(lacking.get(shift.id, ())),
            rejected.get(shift.id, 0),
            reviews.get(shift.id, ()),
        )
        for shift in shifts
    }


# -- the station board ------------------------------------------------------------------------


@dataclass(frozen=True)
class BoardRow(HandoverRead):
    """A shift of the board with its courier, and its handover as a sign-off reads it."""

    shift: Shift = field(kw_only=True)
    courier: User = field(kw_only=True)

    @property
    def balance_version(self) -> str:
        """What a sign-off of this row sends back (``sync.handover.balance_version``)."""
        return balance_version(self.balance)

    @property
    def discrepancies_decided(self) -> int:
        """How many of its discrepancies a manager resolved: all of them, the shift waits
        only for its sign-off (``sync.handover.discrepancies_decided``)."""
        return len(discrepancies_decided(self.balance))

    @property
    def changed_since_signoff(self) -> bool:
        return changed_since_signoff(self.shift, self.balance)

    @property
    def signoff_superseded(self) -> bool:
        return signoff_superseded(self.shift)


def signoff_superseded(shift: Shift) -> bool:
    """Signed off, then reopened by late events (rule 5): closed again, waiting for a new
    sign-off. The shift keeps the superseded sign-off's time, note and balance until
    then: they are the previous sign-off's, no longer the shift's state."""
    return shift.status == ShiftStatus.CLOSED and shift.signed_off_at is not None


def changed_since_signoff(shift: Shift, balance: Balance) -> bool:
    """Whether a signed-off shift's balance now says otherwise than the one its manager
    signed off. Only an event filed under the shift reopens it (rule 5); its balance
    can still change without one: a consent that arrives later authorizes a drop, a
    flag of its parcels is raised or closed through another shift's events. The
    sign-off stands, and with it the balance signed off (kept with the shift and in
    the audit log); a reader is told that the balance now differs."""
    signed = _signed_off_balance(shift)
    return signed is not None and not signed_as(balance, signed)


def signed_off_version(shift: Shift, balance: Balance) -> str | None:
    """The ``version`` of the balance the shift was signed off with, while it is: the
    balance's own ``version`` exactly when it has not changed since. A sign-off kept
    before the parcels' outcomes were (``OUTCOMES_KEPT``) is compared without them."""
    signed = _signed_off_balance(shift)
    if signed is None:
        return None
    if signed_as(balance, signed) and (
        OUTCOMES_KEPT not in signed or not same_snapshot(balance.snapshot(), signed)
    ):
        return balance_version(balance)  # kept without the outcomes, or as they were named
    return snapshot_version(signed)


def _signed_off_balance(shift: Shift) -> dict[str, Any] | None:
    """The balance kept with the shift's sign-off, while it stands (a reopened shift
    keeps the last one's until it is signed off again)."""
    return shift.signoff_balance if shift.status == ShiftStatus.SIGNED_OFF else None


def station_board(*, session: Session, station_id: int, work_date: dt.date) -> list[BoardRow]:
    """Every shift of the station's day with its courier and balance, oldest first.

    At most twelve queries whatever the number of shifts: the shifts with their
    couriers, ``gather``'s, the rejected events of their PDAs, the shifts' open flags of
    their own and the proof images their deliveries lack.
    """
    rows = session.execute(
        select(Shift, User)
        .join(User, User.id == Shift.courier_id)
        .where(Shift.station_id == station_id, Shift.work_date == work_date)
        .order_by(Shift.opened_at, Shift.id)
    ).all()
    read = read_handovers(session, [shift for shift, _ in rows], station_id=station_id)
    return [
        BoardRow(**vars(read[shift.id]), shift=shift, courier=courier) for shift, courier in rows
    ]


def images_lacking(session: Session, shift_ids: Sequence[int]) -> dict[int, set[str]]:
    """The proof images these shifts' live deliveries name that the server lacks, by
    shift, however recently the deliveries arrived: three queries however many shifts."""
    missing, _ = missing_images(session, shift_ids)
    return {shift_id: digests for shift_id, (digests, _) in missing.items()}


# How far back a day's board looks for shifts still waiting for the manager.
EARLIER_DAYS = 14


def _days_before(day: dt.date, days: int) -> dt.date:
    """``days`` before ``day``, or the calendar's first day if that is earlier (a board
    asked for 0001-01-01 has no fortnight before it)."""
    return day - dt.timedelta(days=min(days, (day - dt.date.min).days))


class EarlierWaiting(NamedTuple):
    """What a day's board reads of the days before it (``waiting_from_earlier_days``)."""

    # The shifts of those days still waiting for the manager, oldest first, with their
    # couriers.
    shifts: list[tuple[Shift, User]]


def waiting_from_earlier_days(
    *, session: Session, station_id: int, work_date: dt.date, days: int = EARLIER_DAYS
) -> EarlierWaiting:
    """The station's shifts of the ``days`` days before ``work_date`` not signed off,
    oldest first, with their couriers: still open (a PDA that died, a courier who never
    closed) or handed over and waiting for a sign-off (late events that reopened one
    today). A day's board lists that day's shifts; these are the ones from before that
    still need the manager (where the couriers of those still open went on:
    ``where_couriers_went``). One query, through ``ix_shift_station_work_date``."""
    found = session.execute(
        select(Shift, User)
        .join(User, User.id == Shift.courier_id)
        .where(
            Shift.station_id == station_id,
            Shift.work_date >= _days_before(work_date, days),
            Shift.work_date < work_date,
            Shift.status != ShiftStatus.SIGNED_OFF,
        )
        .order_by(Shift.work_date, Shift.opened_at, Shift.id)
    ).all()
    return EarlierWaiting([(shift, courier) for shift, courier in found])


def waiting_flags(session: Session, shift_ids: Sequence[int]) -> dict[int, list[OpenFlag]]:
    """The flags naming these shifts still waiting for a manager (open or acknowledged),
    by shift, oldest first: exactly what ``GET /flags?shift_id=&waiting=true`` lists for
    each (``sync.flags.list_flags``), which a board row links to. Its own flags, which
    its balance does not count (a shift whose proof images never arrived balances, and
    has one: ``blob_missing_at_handover``), and its handover flags (``HANDOVER_KINDS``),
    which it counts as discrepancies and which wait for a decision all the same. One
    query (per 900 shifts), through ``ix_flag_shift_id``."""
    found: dict[int, list[OpenFlag]] = defaultdict(list)
    for chunk in chunks(sorted(shift_ids)):
        for flag_id, kind, status, shift_id in session.execute(
            select(Flag.id, Flag.kind, Flag.status, Flag.shift_id)
            .where(among(session, Flag.shift_id, chunk), Flag.status.in_(ACTIVE_STATUSES))
            .order_by(Flag.id)
        ):
            found[shift_id].append(OpenFlag(flag_id, kind, status))
    return found


def board_totals(rows: Sequence[BoardRow]) -> dict[str, int]:
    """The day's counts summed over the board, and how many shifts are in each state.

    A shift still open is counted under ``open`` and no balance status: its parcels
    without an outcome are out on the road (``still_out``), not missing, until the
    courier hands over. At 19:00 the balance totals are the handovers to look at.
    ``with_open_flags`` counts the shifts, open or handed over, with a flag naming them
    still waiting for a manager (``waiting_flags``), whatever their balance.
    """
    totals = dict.fromkeys(
        (*COUNT_FIELDS, "still_out", "missing_seq_count", "discrepancy_count"), 0
    )
    tally = dict.fromkeys(
        (
            "shifts",
            BalanceStatus.BALANCED,
            BalanceStatus.UNBALANCED,
            BalanceStatus.PROVISIONAL,
            "open",
            "closed",
            "signed_off",
            "changed_since_signoff",
            "reopened",
            "with_open_flags",
        ),
        0,
    )
    summed = [name for name in totals if name not in ("missing", "still_out")]
    for row in rows:
        summary = row.balance.summary()
        for name in summed:
            totals[name] += summary[name]
        if row.shift.status == ShiftStatus.OPEN:
            totals["still_out"] += summary["missing"]
        else:
            totals["missing"] += summary["missing"]
            tally[summary["status"]] += 1
        tally["shifts"] += 1
        tally[row.shift.status.value] += 1
        tally["changed_since_signoff"] += row.changed_since_signoff
        tally["reopened"] += row.signoff_superseded
        tally["with_open_flags"] += bool(row.open_flags)
    return {**totals, **tally}


class CouriersWent(NamedTuple):
    """Where the couriers of shifts still open went on (``where_couriers_went``), by the
    id of each such shift."""

    # The shift on another PDA the courier handed over since, if they are back.
    back: dict[int, Shift]
    # The courier's other shifts still open on another PDA, oldest first.
    also_open: dict[int, list[Shift]]


def where_couriers_went(
    session: Session, station_id: int, shifts: Iterable[Shift]
) -> CouriersWent:
    """For each of ``shifts`` still open, where its courier went on: the shift they
    handed over since on another PDA, if they are back (``courier_back``: a PDA that
    died at 11:00, its courier on a spare one handed over at 17:00, the manager at 19:00
    waiting for a courier who is in the station), and their other shifts still open on
    another PDA (``open_alongside``: a second shift on another PDA is not refused, but
    one of them is then likely no longer used). One answer for a board row, an earlier
    day's entry, a shift's page and the API (``sync.pages.where_courier_went``): all the
    courier's shifts of the station count, of any day, as the shift's state shown is
    today's. A past day's board names the spare PDA's shift handed over the day after,
    today's board the shift left open on a PDA that died a month ago.

    One statement per ``COURIERS_PER_STATEMENT`` couriers, through
    ``ix_shift_courier_status_opened``: those couriers' shifts still open, of any day,
    and of those they handed over, the ones opened after their shift still open (read
    from that day's earliest opening among them, ``_couriers_shifts_read``), the
    latest on each PDA deciding whether they are back (``courier_back``); not the ~300
    a year each courier worked before."""
    still_open = {s.id: s for s in shifts if s.status == ShiftStatus.OPEN}
    if not still_open:
        return CouriersWent({}, {})
    # Each courier's oldest shift still open here: no shift opened before it can say
    # they are back (``courier_back`` looks at those opened after it).
    since: dict[int, dt.datetime] = {}
    for shift in still_open.values():
        earliest = since.get(shift.courier_id)
        since[shift.courier_id] = (
            shift.opened_at if earliest is None else min(earliest, shift.opened_at)
        )
    # By courier: each shift looks at its own courier's, not at every courier's of the
    # board (200 shifts against 200 couriers' was most of a big board's time here).
    theirs: dict[int, list[Shift]] = defaultdict(list)
    for couriers in chunks(sorted(since.items()), COURIERS_PER_STATEMENT):
        for shift in _couriers_shifts_read(session, station_id, couriers):
            theirs[shift.courier_id].append(shift)
    back: dict[int, Shift] = {}
    also: dict[int, list[Shift]] = {}
    for shift in still_open.values():
        pool = theirs[shift.courier_id]
        back.update(courier_back([shift], pool))
        others = open_alongside(shift, pool)
        if others:
            also[shift.id] = others
    return CouriersWent(back, also)


# Couriers whose shifts one statement reads: each a bound parameter of its ``IN`` lists.
COURIERS_PER_STATEMENT = 200


def _couriers_shifts_read(
    session: Session, station_id: int, couriers: Sequence[tuple[int, dt.datetime]]
) -> list[Shift]:
    """For ``where_couriers_went``: of each (courier, the opening of their oldest shift
    still open), their shifts at the station still open, and the latest of those they
    handed over since on each PDA.

    The couriers go in ``IN`` lists, not two terms each: building and compiling an OR
    of 400 terms was most of a 40-shift board's time in Python, and each number of
    couriers made a new statement for SQLAlchemy and the database to compile. Those
    whose oldest shift still open began the same day (UTC) share one term, from the
    earliest of their openings: one statement for a board of today's shifts, one term
    more for each other day a PDA died on. A courier's read then starts at most that
    day's earlier openings before theirs (their shifts of that day, not of every day);
    those shifts, handed over before the courier's own oldest still open, are dropped
    here. They never change which of the others is the latest on its PDA: opened
    before, they rank below every shift opened since."""
    handed_over = (ShiftStatus.CLOSED, ShiftStatus.SIGNED_OFF)
    since = dict(couriers)
    by_day: dict[dt.date, list[int]] = defaultdict(list)
    day_since: dict[dt.date, dt.datetime] = {}
    for courier, earliest in couriers:
        day = earliest.astimezone(dt.UTC).date() if earliest.tzinfo else earliest.date()
        by_day[day].append(courier)
        day_since[day] = min(day_since.get(day, earliest), earliest)
    # Each term whole (station too): SQLite reads each by the index then
    # (``ix_shift_courier_status_opened``), not the station's every shift.
    terms = [
        and_(
            Shift.courier_id.in_(sorted(since)),
            Shift.status == ShiftStatus.OPEN,
            Shift.station_id == station_id,
        ),
        *(
            and_(
                Shift.courier_id.in_(by_day[day]),
                Shift.status.in_(handed_over),
                Shift.opened_at > day_since[day],
                Shift.station_id == station_id,
            )
            for day in sorted(by_day)
        ),
    ]
    ranked = (
        select(
            Shift,
            func.row_number()
            .over(
                partition_by=(Shift.courier_id, Shift.device_id),
                order_by=(Shift.opened_at.desc(), Shift.id.desc()),
            )
            .label("latest"),
        )
        .where(or_(*terms))
        .subquery()
    )
    theirs = aliased(Shift, ranked)
    read = session.scalars(
        select(theirs).where(or_(ranked.c.status == ShiftStatus.OPEN, ranked.c.latest == 1))
    ).all()
    return [
        shift
        for shift in read
        if shift.status == ShiftStatus.OPEN or shift.opened_at > since[shift.courier_id]
    ]


def courier_back(candidates: Sequence[Shift], pool: Sequence[Shift]) -> dict[int, Shift]:
    """For each of the ``candidates`` still open, the latest shift its courier opened
    after it on another PDA and has handed over since, among the shifts of ``pool``
    (``where_couriers_went``), if any: the courier is back. Only the latest shift of
    ``pool`` opened after a candidate on another PDA of its courier decides: handed
    over, the courier is back from it; still open, they are out on the road again (a
    third PDA), and none is named until that one is handed over too."""
    back: dict[int, Shift] = {}
    for shift in candidates:
        if shift.status != ShiftStatus.OPEN:
            continue
        since = [
            other
            for other in pool
            if other.courier_id == shift.courier_id
            and other.device_id != shift.device_id
            and other.opened_at > shift.opened_at
        ]
        handed = [s for s in since if s.status != ShiftStatus.OPEN]
        if not handed:
            continue
        latest = max(handed, key=lambda s: (s.opened_at, s.id))
        if any(
            s.status == ShiftStatus.OPEN and (s.opened_at, s.id) > (latest.opened_at, latest.id)
            for s in since
        ):
            continue  # out again on another PDA
        back[shift.id] = latest
    return back


def open_alongside(shift: Shift, shifts: Iterable[Shift]) -> list[Shift]:
    """``also_open`` for ``shift``: the shifts among ``shifts`` still open of its courier
    on another PDA, oldest first (the board's rows, and a shift's page)."""
    return sorted(
        (
            other
            for other in shifts
            if other.status == ShiftStatus.OPEN
            and other.courier_id == shift.courier_id
            and other.device_id != shift.device_id
        ),
        key=lambda s: (s.opened_at, s.id),
    )


def missing_images(
    session: Session, shift_ids: Sequence[int], *, arrived_before: dt.datetime | None = None
) -> tuple[dict[int, tuple[set[str], set[int]]], set[int]]:
    """``{shift id: (missing digests, event ids naming them)}`` for these shifts' live
    deliveries that arrived before ``arrived_before`` (all, without it); and the shifts
    whose only missing images are named by events that arrived since (still within
    their grace). Missing: never uploaded, or purged before the delivery named it
    (``sync.rules``).

    Three queries however many shifts, each by one parameter of keys: their live
    deliveries (``ix_scan_event_shift_id``), the images those name (probes of
    ``uq_proof_image_event_sha256``), and which of those are stored (the ``blob`` key).
    Joined in one statement, PostgreSQL read the whole ``proof_image`` or ``blob``
    table to find a day's few hundred."""
    if not shift_ids:
        return {}, set()
    deliveries = {
        event_id: (shift_id, occurred_at, received_at)
        for event_id, shift_id, occurred_at, received_at in session.execute(
            select(
                ScanEvent.id, ScanEvent.shift_id, ScanEvent.occurred_at, ScanEvent.received_at
            ).where(
                among_at_once(session, ScanEvent.shift_id, sorted(shift_ids)),
                ScanEvent.type.in_(DELIVERY_TYPES),
                ~voided_in_sql(ScanEvent),
            )
        )
    }
    missing: dict[int, tuple[set[str], set[int]]] = defaultdict(lambda: (set(), set()))
    pending: set[int] = set()
    named = session.execute(
        select(ProofImage.event_id, ProofImage.sha256).where(
            among_at_once(session, ProofImage.event_id, sorted(deliveries))
        )
    ).all()
    stored = dict(
        session.execute(
            select(Blob.sha256, Blob.purged_at).where(
                among_at_once(session, Blob.sha256, sorted({digest for _, digest in named}))
            )
        ).all()
    )
    for event_id, digest in named:
        shift_id, occurred_at, received_at = deliveries[event_id]
        if digest in stored and not _purged_by(stored[digest], occurred_at):
            continue
        if arrived_before is not None and received_at > arrived_before:
            pending.add(shift_id)
            continue
        missing[shift_id][0].add(digest)
        missing[shift_id][1].add(event_id)
    return dict(missing), pending - set(missing)


def _purged_by(purged_at: dt.datetime | None, named_at: dt.datetime) -> bool:
    """Whether a stored image was purged by the time a delivery named it (then it is
    missing for that delivery, ``sync.rules``); purged later, it was there."""
    return purged_at is not None and purged_at <= named_at


# -- the shift's own flags --------------------------------------------------------------------


def refresh_for_parcels(*, session: Session, tracking_nos: Sequence[str]) -> list[Flag]:
    """Judge again the closed shifts that hold events of these parcels: called when
    the parcels are taken in (their events may have arrived first, and their rule
    flags were just judged). Open shifts have no handover flags yet."""
    closed = closed_shifts_holding(session, tracking_nos)
    return refresh_handover_flags(session=session, shifts=list(closed.values()))


def closed_shifts_holding(session: Session, tracking_nos: Iterable[str]) -> dict[int, Shift]:
    """The shifts, closed or signed off, that hold events of these parcels, by id."""
    closed: dict[int, Shift] = {}
    for chunk in chunks(sorted(set(tracking_nos))):
        holding = select(ScanEvent.shift_id).where(among(session, ScanEvent.tracking_no, chunk))
        for shift in session.scalars(
            select(Shift).where(Shift.id.in_(holding), Shift.status != ShiftStatus.OPEN)
        ):
            closed[shift.id] = shift
    return closed


def subject_of(shift_id: int, tracking_no: str) -> FlagSubject:
    return FlagSubject("shift", f"{shift_id}:{tracking_no}")


def refresh_handover_flags(*, session: Session, shifts: Sequence[Shift]) -> list[Flag]:
    """Raise the handover flags each closed shift's events call for; close the rest.

    Called when a shift closes and whenever events land for a closed one (a late
    batch: the parcel thought missing was returned after all). Like the parcel rule
    flags (README), a flag whose cause went away is closed with the reason, resolved
    or not; while it stands, a manager's acknowledgement or resolution stands as long
    as it stands on the events they decided on, and the flag is open on any other
    (``sync.flags.judged_status``: however the events were batched, rule 3).
    """
    judged = [shift for shift in shifts if shift.status != ShiftStatus.OPEN]
    if not judged:
        return []
    new: list[Flag] = []
    raised: list[Flag] = []
    gone: dict[str, list[FlagSubject]] = defaultdict(list)
    for shift_id, facts in gather(session, judged).items():
        shift = facts.shift
        wanted = handover_flags_wanted(facts.trails(), facts.rule_flags, shift_status=shift.status)
        for (kind, tracking_no), found in wanted.items():
            evidence = {**found, "tracking_no": tracking_no}
            existing = facts.handover_flags.get((kind, tracking_no))
            if existing is None:
                new.append(
                    Flag(
                        kind=kind,
                        severity=HANDOVER_SEVERITY[kind],
                        subject_type="shift",
                        subject_key=subject_of(shift_id, tracking_no).key,
                        station_id=shift.station_id,
                        courier_id=shift.courier_id,
                        shift_id=shift_id,
                        evidence=evidence,
                    )
                )
                continue
            stored = facts.handover_stored[existing.id]
            status = judged_status(stored.decision, stored.decided_on, evidence)
            if status == existing.status and stored.evidence == evidence:
                continue
            # Locked and read again: a manager's decision committed meanwhile is judged
            # with it, not written over.
            flag = session.get(Flag, existing.id, with_for_update=True, populate_existing=True)
            if flag is not None and rejudge(
                session=session, flag=flag, evidence=evidence, cause=FAILS_AGAIN[kind]
            ):
                raised.append(flag)
        for (kind, tracking_no), ref in facts.handover_flags.items():
            if (kind, tracking_no) not in wanted and ref.status in STANDING:
                gone[kind].append(subject_of(shift_id, tracking_no))
    raised.extend(raise_new_flags(session=session, flags=new))
    for kind, subjects in gone.items():
        close_flags(
            session=session,
            kind=kind,
            subjects=subjects,
            reason="judged again with the shift's events as they are now: the parcel is "
            "accounted for",
            statuses=STANDING,
        )
    return raised
