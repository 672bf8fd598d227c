"""Proofs of delivery, as an auditor settling a complaint reads them.

A proof is a delivery event (in person, to a locker, to a pickup point) with
its POD, the parcel's whole event chain, the consent that authorized an
unattended drop (or that none did) and the parcel's flags.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from sqlalchemy import Select, String, and_, cast, exists, or_, select
from sqlalchemy.orm import Session

from models import Consent, EventType, Flag, FlagStatus, Parcel, ScanEvent
from models.sync import DELIVERY_TYPES
from sync.consents import consents_for
from sync.errors import InvalidInput, NotFound
from sync.flags import FlagSubject
from sync.parcels import TimelineEntry, parcel_timeline
from sync.projection import voided_in_sql
from sync.rules import DROPS, EventDetail, Policy, authorizes, drop_span, haversine_m
from sync.status import load_events
from sync.tracking import normalize

METHODS = {
    "in_person": EventType.DELIVERED,
    "locker": EventType.DELIVERED_TO_LOCKER,
    "pickup_point": EventType.DELIVERED_TO_PICKUP_POINT,
}
MAX_PAGE_SIZE = 500


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
    parcel: Parcel
    distance_m: float | None
    voided: bool  # a later correction of its device voided this delivery


@dataclass(frozen=True)
class ProofDetail:
    proof: Proof
    timeline: list[TimelineEntry]
    authorizing_consent: Consent | None  # for a drop: the consent in force before it
    flags: list[Flag]
    # For a drop: when it may have happened, as rule 4 judges it (``sync.rules.
    # drop_span``: its two clocks, its PDA's events around it by seq, its push's
    # arrival). A consent authorizes it only if granted before the first and in force
    # at the second: what an auditor needs when the drop's own stamp says otherwise.
    judged_between: tuple[dt.datetime, dt.datetime] | None = None

    @property
    def voided(self) -> bool:
        return self.proof.voided

    @property
    def proofs_shown(self) -> list[int]:
        """Ids of the deliveries whose POD this detail shows: its own and, in the parcel's
        timeline, any other (a mis-tap voided, the delivery after it): an auditor's read
        names them all."""
        return sorted(e.event.id for e in self.timeline if e.event.type in DELIVERY_TYPES)


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


def _query(filters: ProofFilter) -> Select[tuple[ScanEvent, Parcel, bool]]:
    check_filters(filters)
    types = [METHODS[filters.method]] if filters.method else list(DELIVERY_TYPES)
    query = (
        select(ScanEvent, Parcel, voided_in_sql(ScanEvent).label("voided"))
        .join(Parcel, Parcel.tracking_no == ScanEvent.tracking_no)
        .where(ScanEvent.type.in_(types))
    )
    if filters.station_id is not None:
        query = query.where(Parcel.station_id == filters.station_id)
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
    return [_proof(*row) for row in session.execute(query)]


def iter_proofs(*, session: Session, filters: ProofFilter, batch: int = 500) -> Iterator[Proof]:
    """Every proof matching ``filters``, read in keyset batches (for a CSV export)."""
    after = 0
    while True:
        page = list_proofs(session=session, filters=filters, after_id=after, limit=batch)
        yield from page
        if len(page) < batch:
            return
        after = page[-1].event.id


def proof_not_found(event_id: int) -> NotFound:
    """What ``get_proof`` answers when no delivery has ``event_id``."""
    return NotFound(f"no proof of delivery with event id {event_id}", code="proof_not_found")


def get_proof(
    *, session: Session, event_id: int, policy: Policy, flags_of_station: int | None = None
) -> ProofDetail:
    """``flags_of_station``: only that station's flags of the parcel (a station-bound
    reader's: a parcel taken in elsewhere keeps each station's flags its own); ``None``:
    every station's."""
    row = session.execute(_query(ProofFilter()).where(ScanEvent.id == event_id)).first()
    if row is None:
        raise proof_not_found(event_id)
    proof = _proof(*row)
    parcel = proof.parcel
    events = load_events(session, [parcel.tracking_no])[parcel.tracking_no]
    flags = _flags_of(session, proof, flags_of_station)
    drop = _drop(proof, events)
    return ProofDetail(
        proof=proof,
        timeline=parcel_timeline(session=session, tracking_no=parcel.tracking_no),
        authorizing_consent=None
        if drop is None
        else _authorizing(session, proof, drop, events, policy),
        flags=list(flags),
        judged_between=None if drop is None else drop_span(drop, policy, events),
    )


def _flags_of(session: Session, proof: Proof, station_id: int | None) -> list[Flag]:
    """The parcel's flags, those of the delivery's shift about it: its handover there
    (``missing_at_handover``, ``not_on_manifest``) and any citing the delivery itself
    (``late_event_after_signoff``: it landed after the sign-off), and those of the
    delivery's event (``conflicting_duplicate``: its PDA sent it again with other
    content; ``seq_conflict``: another event with its seq). One statement, each part
    by an index (the subject's, the shift's)."""
    event, tracking_no = proof.event, proof.event.tracking_no
    shift_wide = str(event.shift_id)
    about = [
        and_(Flag.subject_type == "parcel", Flag.subject_key == tracking_no),
        and_(Flag.subject_type == "event", Flag.subject_key.in_(event_subject_keys(event))),
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
    return [
        flag
        for flag in session.scalars(query.order_by(Flag.id))
        if (flag.subject_type, flag.subject_key) != ("shift", shift_wide)
        or event.id in flag.evidence.get("event_ids", ())
    ]


def event_subject_keys(event: ScanEvent) -> list[str]:
    """The subject keys of the flags about a held event (``sync.ingest``): its id sent
    again with other content, and its seq claimed by another event of its PDA."""
    return [
        FlagSubject.event_sent_again(event.device_id, event.client_event_id).key,
        FlagSubject.event_seq(event.device_id, event.seq).key,
    ]


def _drop(proof: Proof, events: Sequence[EventDetail]) -> EventDetail | None:
    """The proof's event as the rules read it, if it is a locker or pickup-point drop."""
    if proof.event.type not in DROPS:
        return None
    return next(e for e in events if e.fact.event_id == proof.event.id)


def _authorizing(
    session: Session,
    proof: Proof,
    drop: EventDetail,
    events: Sequence[EventDetail],
    policy: Policy,
) -> Consent | None:
    """The first consent that authorized the drop."""
    facts = consents_for(session, [proof.parcel]).get(proof.parcel.tracking_no, [])
    for fact in sorted(facts, key=lambda c: c.granted_at):
        if authorizes(fact, drop, policy, events):
            return session.get(Consent, fact.id)
    return None


def _proof(event: ScanEvent, parcel: Parcel, voided: bool) -> Proof:
    distance = None
    if None not in (event.lat, event.lon, parcel.lat, parcel.lon):
        distance = haversine_m(parcel.lat, parcel.lon, event.lat, event.lon)  # type: ignore[arg-type]
    return Proof(event=event, parcel=parcel, distance_m=distance, voided=bool(voided))
