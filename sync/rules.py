"""The rules a parcel's history is judged by (DESIGN.md rules 4 and 5), as pure functions.

``evaluate`` takes a parcel's events (projection order, voids resolved), the
consents that could apply and the station's policy, and returns the flags the
parcel should have now, each with its evidence. The caller raises those and
closes the parcel's other rule flags with the reason, so re-evaluating is
idempotent and a late event or consent can make a flag go away as well as
appear.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from models import ConsentMethod, EventType, FlagSeverity, ServiceClass
from sync.events import referenced_blobs
from sync.flags import REPEATED_SCANS
from sync.projection import EventFact, ordered, voided_by

DROPS = {
    EventType.DELIVERED_TO_LOCKER: ConsentMethod.LOCKER,
    EventType.DELIVERED_TO_PICKUP_POINT: ConsentMethod.PICKUP_POINT,
}
DELIVERIES = frozenset({EventType.DELIVERED, *DROPS})
FINAL_OUTCOMES = frozenset({*DELIVERIES, EventType.RETURNED_TO_STATION})
# What in a proof of delivery shows the hand-over (DESIGN.md: the POD is a signature
# and/or a photo, with the name, the relation and the position). In person: an image;
# the name, the relation or a code the courier typed are the courier's word, which
# the server cannot check. At a locker or a pickup point also the code the point
# issued for the recipient (consent, rule 4, is what authorizes the drop itself).
POD_IMAGES = frozenset({"signature_sha256", "photo_sha256"})
DROP_POD_EVIDENCE = POD_IMAGES | {"pickup_code"}

SEVERITY = {
    "unauthorized_locker_drop": FlagSeverity.CRITICAL,
    "consent_after_drop": FlagSeverity.WARNING,
    "delivered_without_pod": FlagSeverity.CRITICAL,
    "far_from_address": FlagSeverity.WARNING,
    "conflicting_final_outcome": FlagSeverity.CRITICAL,
    "pod_blob_missing": FlagSeverity.WARNING,
    "delivered_not_checked_out": FlagSeverity.WARNING,
    "correction_review": FlagSeverity.INFO,
    "correction_by_another_courier": FlagSeverity.WARNING,
}
RULE_KINDS = tuple(SEVERITY)
# The flags that judge a final outcome as one, however often it was scanned
# (``final_outcomes``): each cites every scan of it, and names the scans that repeat one
# it cites under ``REPEATED_SCANS`` (``_name_repeats``). The others judge each scan's own
# facts (its position, the images it names, a correction of it).
JUDGING_OUTCOMES = (
    "unauthorized_locker_drop",
    "consent_after_drop",
    "delivered_without_pod",
    "conflicting_final_outcome",
    "delivered_not_checked_out",
)


@dataclass(frozen=True)
class Policy:
    """Which classes need consent for unattended delivery, and a signature in person."""

    consent_required: frozenset[ServiceClass] = frozenset({ServiceClass.EXPRESS})
    signature_required: frozenset[ServiceClass] = frozenset({ServiceClass.EXPRESS})
    far_from_address_m: float = 300.0
    # A consent from a recipient channel says when it was granted; it counts for a drop
    # only if it was also recorded by then, give or take this (an SMS gateway's lag),
    # so that a consent posted after a drop cannot be dated before it.
    consent_recording_grace: dt.timedelta = dt.timedelta(hours=1)
    # How far a drop's PDA time may be from its corrected time and the corrected time
    # still be taken as when it happened (the bound that flags ``clock_skew``). Beyond
    # it the PDA's clock may have moved between the drop and the push, which the offset
    # measured at the push cannot tell: the drop is judged over the span between the two
    # (``drop_span``), so that moving the clock gains nothing (DESIGN.md rule 6).
    clock_uncertainty: dt.timedelta = dt.timedelta(seconds=120)


def needs_consent(service_class: ServiceClass, policy: Policy) -> bool:
    """Whether a parcel of this class may be left in a locker or at a pickup point only
    with its recipient's consent (rule 4; ``CONSENT_REQUIRED_CLASSES``)."""
    return service_class in policy.consent_required


@dataclass(frozen=True)
class EventDetail:
    """A stored event with what the rules read beyond the projection's facts."""

    fact: EventFact
    details: Mapping[str, Any] = field(default_factory=dict)
    lat: float | None = None
    lon: float | None = None
    # As the PDA's clock said (the fact's ``occurred_at`` is corrected by the offset
    # measured at the push); None: not known, the corrected time alone counts.
    occurred_at_device: dt.datetime | None = None
    # When its push reached the server: it happened before, whatever its PDA time says.
    received_at: dt.datetime | None = None
    # A drop's: the latest corrected time of an event its PDA recorded before it, when
    # later than its own, and the earliest of one recorded after it, when earlier
    # (whatever their parcels, within reach: ``sync.drop_bounds``). None: none such.
    latest_of_earlier_seqs: dt.datetime | None = None
    earliest_of_later_seqs: dt.datetime | None = None


@dataclass(frozen=True)
class ConsentFact:
    id: int
    method: ConsentMethod
    point_id: str | None
    granted_at: dt.datetime  # corrected clock
    expires_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None
    # Captured on a PDA: its event, whose seq orders it against that device's drops,
    # and the station that PDA was at (``counts_at_station``).
    device_id: str | None = None
    seq: int | None = None
    captured_at_station: int | None = None
    recorded_at: dt.datetime | None = None  # when the server stored it
    # A standing consent limited to one station: when the parcel was at that station
    # (``[from, until)``, None an open end). None: no limit.
    at_station: tuple[Stay, ...] | None = None
    # For this parcel, revoked (``revoked_at``) by the recipient's refusal of a request
    # for consent: when they refused.
    refused_at: dt.datetime | None = None


@dataclass(frozen=True)
class ParcelFacts:
    service_class: ServiceClass
    lat: float | None = None
    lon: float | None = None


def evaluate(
    parcel: ParcelFacts,
    events: Sequence[EventDetail],
    consents: Sequence[ConsentFact],
    policy: Policy,
    stored_blobs: frozenset[str] = frozenset(),
    purged_blobs: Mapping[str, dt.datetime] | None = None,
    history: History | None = None,
) -> dict[str, dict[str, Any]]:
    """``{flag kind: evidence}`` for every rule the parcel breaks now.

    ``stored_blobs``: the proof images the server holds; ``purged_blobs``: those the
    retention purge deleted, and when. A purged image was there for a delivery made
    before the purge; one made since names an image the server no longer has.
    ``history``: the ``History`` of ``events``, when the caller has it."""
    if not any(e.fact.type in FINAL_OUTCOMES for e in events):
        return {}  # every rule judges a delivery, a drop or a return
    history = history or History(events)
    by_id = {e.fact.event_id: e for e in events}
    voids, counting, outcomes = history.voids, history.counting, history.outcomes
    flags: dict[str, dict[str, Any]] = {}
    _drops(parcel, outcomes, consents, policy, flags, history.in_order)
    _proofs(parcel, counting, outcomes, policy, stored_blobs, purged_blobs or {}, flags)
    _outcomes(counting, outcomes, flags)
    _corrections(history.in_order, voids, by_id, flags)
    _name_repeats(outcomes, flags)
    return flags


def _name_repeats(outcomes: Sequence[FinalOutcome], flags: dict[str, dict[str, Any]]) -> None:
    """Name, in each flag judging outcomes (``JUDGING_OUTCOMES``), the scans it cites
    that repeat a scan it also cites: ``{"event_id": the repeat, "first_event_id": the
    outcome's first scan}``. A repeat changes nothing the flag judges, so a manager's
    decision on the outcome covers it and the flag's ``evidence_version`` leaves it out
    (``sync.flags.causes``): a second beep after the manager resolved the drop does not
    send it back to their queue."""
    first_of = {
        scan.fact.event_id: outcome.first.fact.event_id
        for outcome in outcomes
        for scan in outcome.scans[1:]
    }
    if not first_of:
        return
    for kind in JUDGING_OUTCOMES:
        evidence = flags.get(kind)
        if evidence is None:
            continue
        cited = set(evidence["event_ids"])
        repeats = [
            {"event_id": i, "first_event_id": first_of[i]}
            for i in evidence["event_ids"]
            if i in first_of and first_of[i] in cited
        ]
        if repeats:
            evidence[REPEATED_SCANS] = repeats


def by_station(
    flags: Mapping[str, dict[str, Any]],
    events: Sequence[EventDetail],
    home: int,
    cited: Mapping[str, Mapping[int, int]] | None = None,
) -> dict[tuple[str, int], dict[str, Any]]:
    """``evaluate``'s flags split by the station each cited event was recorded at:
    ``{(kind, station): evidence}``. A parcel moves between stations (re-routed, or
    scanned by a courier of another), and each station's manager sees and settles the
    faults of their own station's events. Evidence citing no event is the parcel's
    station's (``home``).

    ``cited``: by kind, the events a flag already cites, and its station; they stay
    with it, so a manager's decision on them stands (a flag raised before flags had a
    station each sits at the parcel's station whoever's events it cites). A correction
    goes with the outcome it voids: the review is of that outcome.
    """
    recorded_at = {e.fact.event_id: e.fact.station_id for e in events}
    split: dict[tuple[str, int], dict[str, Any]] = {}
    for kind, evidence in flags.items():
        station_of = {**recorded_at, **(cited or {}).get(kind, {})}
        for pair in evidence.get("corrections", []):
            voided = station_of.get(pair["voided_event_id"], home)
            station_of[pair["correction_event_id"]] = voided
        ids = evidence.get("event_ids") or []
        stations = sorted({station_of.get(i, home) for i in ids}) or [home]
        if len(stations) == 1:
            split[(kind, stations[0])] = evidence
            continue
        for station in stations:
            kept = {i for i in ids if station_of.get(i, home) == station}
            split[(kind, station)] = _evidence_of(evidence, kept, events)
    return split


def cited_events(evidence: Mapping[str, Any], events: Sequence[EventDetail]) -> set[int]:
    """The events a rule flag's evidence cites: its ``event_ids``; for a
    ``pod_blob_missing`` flag stored before it named them, the deliveries naming its
    images."""
    if "event_ids" in evidence:
        return set(evidence["event_ids"])
    blobs = set(evidence.get("blobs", []))
    return {e.fact.event_id for e in events if blobs.intersection(referenced_blobs(e.details))}


def _evidence_of(
    evidence: dict[str, Any], kept: set[int], events: Sequence[EventDetail]
) -> dict[str, Any]:
    """The part of ``evidence`` about the events ``kept`` (what ``evaluate`` gives)."""
    part = {**evidence, "event_ids": [i for i in evidence["event_ids"] if i in kept]}
    if "distances_m" in evidence:
        part["distances_m"] = [d for d in evidence["distances_m"] if d["event_id"] in kept]
    if "corrections" in evidence:
        part["corrections"] = [c for c in evidence["corrections"] if c["voided_event_id"] in kept]
    if REPEATED_SCANS in evidence:
        # a repeat of a scan recorded at another station is new to this station's manager
        repeats = [
            r
            for r in evidence[REPEATED_SCANS]
            if r["event_id"] in kept and r["first_event_id"] in kept
        ]
        if repeats:
            part[REPEATED_SCANS] = repeats
        else:
            del part[REPEATED_SCANS]
    if "blobs" in evidence:
        named = {b for e in events if e.fact.event_id in kept for b in referenced_blobs(e.details)}
        part["blobs"] = [b for b in evidence["blobs"] if b in named]
    return part


def consents_matter(parcel: ParcelFacts, events: Sequence[EventDetail], policy: Policy) -> bool:
    """Whether ``evaluate`` reads the parcel's consents: only for a drop of a class that
    needs consent (rule 4). Most parcels judged have no drop, and their consents need
    not be looked up."""
    return needs_consent(parcel.service_class, policy) and any(
        e.fact.type in DROPS for e in events
    )


def _drops(
    parcel: ParcelFacts,
    outcomes: Sequence[FinalOutcome],
    consents: Sequence[ConsentFact],
    policy: Policy,
    flags: dict[str, dict[str, Any]],
    history: Sequence[EventDetail],
) -> None:
    """Rule 4: an unattended drop of a class that needs consent needs consent before it.
    ``history``: all the parcel's events, voided ones too (``drop_span``). A consent
    captured on a PDA of another station than the drop's counts neither as given before
    nor after it; the flag names it (``captured_at_other_station``).

    A drop scanned again (``final_outcomes``) is judged by its first scan, when the
    parcel went in: a consent granted between the two came after the drop. Its flag
    cites every scan of it."""
    if not needs_consent(parcel.service_class, policy):
        return
    unauthorized: list[_Unauthorized] = []
    late: list[_Unauthorized] = []
    considered: set[int] = set()  # consents for this method and point that did not do
    for outcome in outcomes:
        drop = outcome.first
        if drop.fact.type not in DROPS:
            continue
        matching = [c for c in consents if covers(c, drop)]
        considered.update(c.id for c in matching)
        # Once a drop, not once a consent: it reads the parcel's whole history.
        span = drop_span(drop, policy, history) if matching else None
        if any(authorizes(c, drop, policy, history, span) for c in matching):
            continue
        here = [c for c in matching if counts_at_station(c, drop.fact.station_id)]
        elsewhere = [c.id for c in matching if c not in here]
        after = [c.id for c in here if not granted_before(c, drop, policy, history, span)]
        judged = _Unauthorized(outcome.event_ids, after, elsewhere)
        (late if after else unauthorized).append(judged)
    if unauthorized:
        refused = sorted({c.refused_at for c in consents if c.id in considered and c.refused_at})
        flags["unauthorized_locker_drop"] = {
            "event_ids": [i for u in unauthorized for i in u.event_ids],
            "consent_ids": sorted(considered),
            **_captured_elsewhere(unauthorized),
            # a consent the recipient's refusal withdrew for this parcel: why one on
            # record did not authorize a drop after the refusal
            **({"refused_at": [at.isoformat() for at in refused]} if refused else {}),
        }
    if late:
        flags["consent_after_drop"] = {
            "event_ids": [i for u in late for i in u.event_ids],
            "consent_ids": sorted({cid for u in late for cid in u.granted_after}),
            **_captured_elsewhere(late),
        }


@dataclass(frozen=True)
class _Unauthorized:
    """A drop no consent authorized (its scans: ``final_outcomes``): the consents for its
    method and point granted after it, and those captured on a PDA of another station
    than its own."""

    event_ids: list[int]
    granted_after: list[int]
    captured_elsewhere: list[int]


def _captured_elsewhere(drops: Sequence[_Unauthorized]) -> dict[str, list[int]]:
    """The evidence naming the consents that covered these drops but were captured at
    another station (``counts_at_station``): why the manager sees a consent on record and
    the drop flagged all the same. Nothing when there are none."""
    ids = sorted({cid for drop in drops for cid in drop.captured_elsewhere})
    return {"captured_at_other_station": ids} if ids else {}


Span = tuple[dt.datetime, dt.datetime]  # a drop's earliest and latest times (drop_span)


def authorizes(
    consent: ConsentFact,
    drop: EventDetail,
    policy: Policy,
    history: Sequence[EventDetail],
    span: Span | None = None,
) -> bool:
    """Rule 4: the consent covers the drop, was captured at the drop's station if on a
    PDA, was granted before it and was in force at it (whenever in its ``drop_span`` it
    happened). ``history``: the parcel's events; ``span``: the drop's ``drop_span``
    when the caller judges it against several consents (it reads the whole history)."""
    return (
        covers(consent, drop)
        and counts_at_station(consent, drop.fact.station_id)
        and granted_before(consent, drop, policy, history, span)
        and in_force_at(consent, (span or drop_span(drop, policy, history))[1])
    )


def drop_span(drop: EventDetail, policy: Policy, history: Sequence[EventDetail]) -> Span:
    """The earliest and the latest time the drop may have happened: its corrected time,
    unless its PDA time is further from it than ``policy.clock_uncertainty``. The offset
    that corrects it was measured at the push, and a clock set back (or forward) between
    the drop and the push would move the drop later (or earlier) by as much: a consent
    granted after it would seem before it, or one revoked before it in force. Beyond the
    bound, then, the drop may have happened anywhere between the two times.

    It may also have happened as late as an event its PDA recorded before it (by seq),
    and as early as one it recorded after it, on the corrected clock, whatever parcel
    that event was about: the seqs are the PDA's causal order (rule 6), and a clock set
    back (or forward) for the drop alone and put right before the push shows no offset,
    only that order. The parcel's own such events are in its ``history`` (the
    projection orders the drop after the first too: ``sync.projection.ordered``); the
    latest and earliest of all its PDA's, within ``sync.drop_bounds.REACH`` of it, are
    kept with the drop. All of it is stored with the events, so the span does not
    depend on the order they arrived in (rule 3).

    Never after its push reached the server (``received_at``): a PDA time ahead of that
    (a clock running fast) is no time the drop may have had, and a consent revoked or
    expiring after it was in force whenever the drop happened."""
    at = drop.fact.occurred_at
    device = drop.occurred_at_device
    earliest = latest = at
    if device is not None and abs(device - at) > policy.clock_uncertainty:
        earliest, latest = min(at, device), max(at, device)
    for event in history:
        if event.fact.device_id != drop.fact.device_id:
            continue
        if event.fact.seq < drop.fact.seq:
            latest = max(latest, event.fact.occurred_at)
        elif event.fact.seq > drop.fact.seq:
            earliest = min(earliest, event.fact.occurred_at)
    if drop.latest_of_earlier_seqs is not None:
        latest = max(latest, drop.latest_of_earlier_seqs)
    if drop.earliest_of_later_seqs is not None:
        earliest = min(earliest, drop.earliest_of_later_seqs)
    if drop.received_at is not None:
        latest = max(at, min(latest, drop.received_at))
    return earliest, latest


def covers(consent: ConsentFact, drop: EventDetail) -> bool:
    """The consent's method, and its point when it names one, fit this drop, and it held
    at the station the parcel was at then."""
    method = DROPS[drop.fact.type]
    if consent.method not in (ConsentMethod.ANY, method) or not held_at_station(
        consent, drop.fact.occurred_at
    ):
        return False
    point = drop.details.get("locker_id") or drop.details.get("point_id")
    return consent.point_id is None or consent.point_id == point


def counts_at_station(consent: ConsentFact, station_id: int | None) -> bool:
    """Whether the consent may authorize a drop recorded by a PDA of ``station_id``. One
    captured on a PDA counts only at the station that PDA was at: its courier, or a
    colleague, met the recipient (or called them). A courier of another station needs
    only the tracking number to push an "in person" consent for a parcel they never
    held (SECURITY.md threat 2); online, their consent request for it is not even sent.
    One from a recipient channel counts at every station."""
    return consent.captured_at_station is None or consent.captured_at_station == station_id


def granted_before(
    consent: ConsentFact,
    drop: EventDetail,
    policy: Policy,
    history: Sequence[EventDetail],
    span: Span | None = None,
) -> bool:
    """Granted before the drop. A consent captured on the drop's own PDA is ordered by
    sequence number, not by time: a higher seq stamped earlier is a backdated consent.
    Any other must also have been recorded by the drop (with the policy's grace): the
    ``granted_at`` of a recipient channel is the sender's word, and that of another
    PDA its clock's, which no seq ties to the drop's (set back to capture and put right
    before the push, it shows no offset). Before the earliest time the drop may have
    happened (``drop_span``)."""
    if consent.device_id == drop.fact.device_id and consent.seq is not None:
        return consent.seq < drop.fact.seq
    at = (span or drop_span(drop, policy, history))[0]
    if consent.granted_at > at:
        return False
    return (
        consent.recorded_at is None or consent.recorded_at <= at + policy.consent_recording_grace
    )


def held_at_station(consent: ConsentFact, at: dt.datetime) -> bool:
    """Whether the parcel was at the station the consent is limited to at ``at``: a
    parcel re-routed after a drop keeps the drop judged by its station then."""
    return consent.at_station is None or within(consent.at_station, at)


# When a parcel was at a station: ``[from, until)``, None an open end.
Stay = tuple[dt.datetime | None, dt.datetime | None]


def parcel_stays(
    station_id: int, earlier: Sequence[Mapping[str, Any]] | None
) -> dict[int, list[Stay]]:
    """When the parcel was at each station it has been at: ``earlier`` (its
    ``earlier_stations``: the stations an intake moved it away from, oldest first, each
    with when it left), then ``station_id`` since."""
    stays: dict[int, list[Stay]] = {}
    since: dt.datetime | None = None
    for stay in earlier or ():
        until = dt.datetime.fromisoformat(stay["until"])
        stays.setdefault(stay["station_id"], []).append((since, until))
        since = until
    stays.setdefault(station_id, []).append((since, None))
    return stays


def within(stays: Sequence[Stay], at: dt.datetime) -> bool:
    return any(
        (since is None or since <= at) and (until is None or at < until) for since, until in stays
    )


def in_force_at(consent: ConsentFact, at: dt.datetime) -> bool:
    revoked = consent.revoked_at is not None and consent.revoked_at <= at
    expired = consent.expires_at is not None and consent.expires_at <= at
    return not revoked and not expired


def _proofs(
    parcel: ParcelFacts,
    counting: Sequence[EventDetail],
    outcomes: Sequence[FinalOutcome],
    policy: Policy,
    stored_blobs: frozenset[str],
    purged_blobs: Mapping[str, dt.datetime],
    flags: dict[str, dict[str, Any]],
) -> None:
    """A delivery without a proof of the hand-over (``_has_pod``); one scanned again
    (``final_outcomes``) was delivered once, with a proof if any of its scans has one,
    and without, its flag cites every scan. Each scan's images and position are its
    own: an image not uploaded, a scan far from the address."""
    without_pod, far, missing_blobs, naming_missing = [], [], [], []

    def lacking(digest: str, delivery: EventDetail) -> bool:
        purged_at = purged_blobs.get(digest)
        held_then = purged_at is not None and delivery.fact.occurred_at < purged_at
        return digest not in stored_blobs and not held_then

    for outcome in outcomes:
        if outcome.first.fact.type in DELIVERIES and not any(
            _has_pod(parcel, scan, policy) for scan in outcome.scans
        ):
            without_pod += outcome.event_ids
    for delivery in (e for e in counting if e.fact.type in DELIVERIES):
        pod = delivery.details.get("pod") or {}
        missing = [
            pod[key] for key in sorted(POD_IMAGES) if key in pod and lacking(pod[key], delivery)
        ]
        if missing:
            missing_blobs += missing
            naming_missing.append(delivery.fact.event_id)
        metres = _distance_m(parcel, delivery)
        if metres is not None and metres > policy.far_from_address_m:
            far.append({"event_id": delivery.fact.event_id, "metres": round(metres)})
    if without_pod:
        flags["delivered_without_pod"] = {"event_ids": without_pod}
    if far:
        flags["far_from_address"] = {
            "event_ids": [f["event_id"] for f in far],
            "distances_m": far,
            "limit_m": policy.far_from_address_m,
        }
    if missing_blobs:
        flags["pod_blob_missing"] = {
            "blobs": sorted(set(missing_blobs)),
            "event_ids": naming_missing,
        }


def _outcomes(
    counting: Sequence[EventDetail],
    outcomes: Sequence[FinalOutcome],
    flags: dict[str, dict[str, Any]],
) -> None:
    """Two final outcomes with no new check-out between them, or a delivery by a courier
    the parcel was not checked out to then (rule 1's example): the courier of its
    latest check-out, unless it was returned to the station since. A courier who once
    held it, returned it, and saw another take it out does not hold it any more.

    A scan repeating the outcome before it (``repeats``) is no second outcome: the
    conflict cites every scan of the two outcomes that differ."""
    conflicting: list[int] = []
    for outcome in outcomes:
        if outcome.follows is not None:
            conflicting += [*outcome.follows.event_ids, *outcome.event_ids]
    if conflicting:
        flags["conflicting_final_outcome"] = {"event_ids": sorted(set(conflicting))}
    not_checked_out: list[int] = []
    holder: int | None = None  # the courier the parcel is checked out to now
    for event in counting:
        kind = event.fact.type
        if kind == EventType.CHECKED_OUT:
            holder = event.fact.courier_id
        elif kind in FINAL_OUTCOMES:
            if kind in DELIVERIES and event.fact.courier_id != holder:
                not_checked_out.append(event.fact.event_id)
            if kind == EventType.RETURNED_TO_STATION:
                holder = None
    if not_checked_out:
        flags["delivered_not_checked_out"] = {"event_ids": not_checked_out}


@dataclass
class FinalOutcome:
    """One final outcome of a parcel, as scanned: its first scan, then each scan that
    repeated it (``repeats``). ``follows``: the outcome before it with no check-out
    between (a conflict, rule 5), or None."""

    scans: list[EventDetail]
    follows: FinalOutcome | None = None

    @property
    def first(self) -> EventDetail:
        """The scan that recorded the outcome: when it happened, for rule 4."""
        return self.scans[0]

    @property
    def event_ids(self) -> list[int]:
        return [scan.fact.event_id for scan in self.scans]


def final_outcomes(counting: Sequence[EventDetail]) -> list[FinalOutcome]:
    """The parcel's final outcomes in projection order (``counting``: its events in that
    order, voided ones left out), a repeated scan folded into the outcome it repeats.

    A scanner that beeped twice, a cage of returns scanned and then each of its
    parcels, a compartment tapped twice: the parcel was handled once, and a courier
    flagged for a conflict there teaches the manager to ignore the flag. The order is
    the projection's, so the folding does not depend on the order the scans arrived
    in (rule 3)."""
    outcomes: list[FinalOutcome] = []
    last: FinalOutcome | None = None  # the latest outcome since the latest check-out
    for event in counting:
        if event.fact.type == EventType.CHECKED_OUT:
            last = None
        elif event.fact.type in FINAL_OUTCOMES:
            if last is not None and repeats(event, last.scans[-1]):
                last.scans.append(event)
                continue
            last = FinalOutcome([event], follows=last)
            outcomes.append(last)
    return outcomes


def repeats(scan: EventDetail, previous: EventDetail) -> bool:
    """Whether final outcome ``scan`` repeats ``previous``, the parcel's final outcome
    before it with no check-out between: the same type, by the same courier, and for an
    unattended drop at the same place (the same locker and compartment, the same
    pickup point). Another type, place or courier is another outcome."""
    return (
        scan.fact.type == previous.fact.type
        and scan.fact.courier_id == previous.fact.courier_id
        and _place(scan) == _place(previous)
    )


def _place(scan: EventDetail) -> tuple[Any, ...]:
    """Where a drop left the parcel (nothing for a delivery in person or a return)."""
    if scan.fact.type == EventType.DELIVERED_TO_LOCKER:
        return scan.details.get("locker_id"), scan.details.get("compartment")
    if scan.fact.type == EventType.DELIVERED_TO_PICKUP_POINT:
        return (scan.details.get("point_id"),)
    return ()


class History:
    """A parcel's events as the rules read them: in projection order
    (``sync.projection.ordered``), its corrections' voids (``voided_by``), its final
    outcomes folded (``final_outcomes``), each worked out once, when first asked for. A
    push reads all of them for each parcel it touches (its status, ``evaluate``,
    ``first_scans``, ``refolded``, the drops told or taken back), and each sorted the
    whole history anew: a PDA that pushed 25,000 events of one parcel made each later
    push of it, its honest courier's scan too, sort them six times in SQLite's writers'
    turn. ``events``: all of the parcel's, in any order, voided ones too.
    ``voids``: their ``voided_by``, when the caller knows it already."""

    def __init__(
        self, events: Sequence[EventDetail], voids: Mapping[int, int] | None = None
    ) -> None:
        self.events = events
        if voids is not None:
            self.voids = voids

    @cached_property
    def voids(self) -> Mapping[int, int]:
        """``{voided event id: correction event id}`` (``voided_by``)."""
        return voided_by(e.fact for e in self.events)

    @cached_property
    def in_order(self) -> list[EventDetail]:
        """The events in projection order, voided ones too."""
        by_id = {e.fact.event_id: e for e in self.events}
        return [by_id[f.event_id] for f in ordered(e.fact for e in self.events)]

    @cached_property
    def counting(self) -> list[EventDetail]:
        """``in_order`` less the voided events."""
        return [e for e in self.in_order if e.fact.event_id not in self.voids]

    @cached_property
    def outcomes(self) -> list[FinalOutcome]:
        """``final_outcomes`` of the counting events."""
        return final_outcomes(self.counting)

    @cached_property
    def folded(self) -> list[FinalOutcome]:
        """``outcomes``, or none when fewer than two events are final outcomes: nothing
        repeats then, and most parcels' history need not be ordered for it."""
        if sum(e.fact.type in FINAL_OUTCOMES for e in self.events) < 2:
            return []
        return self.outcomes

    @cached_property
    def first_scans(self) -> dict[int, EventDetail]:
        """``first_scans`` of the events."""
        return {
            scan.fact.event_id: outcome.first
            for outcome in self.folded
            for scan in outcome.scans[1:]
        }

    @cached_property
    def scans_of_outcomes(self) -> dict[int, list[int]]:
        """``scans_of_outcomes`` of the events."""
        return {
            scan.fact.event_id: outcome.event_ids
            for outcome in self.folded
            if len(outcome.scans) > 1
            for scan in outcome.scans
        }

    def stands_on_another_scan(self, voided: int) -> bool:
        """``stands_on_another_scan`` over the events."""
        if sum(e.fact.type in FINAL_OUTCOMES for e in self.events) < 2:
            return False
        outcome = _counted_again(voided, self.in_order, self.voids)
        return outcome is not None and len(outcome.scans) > 1

    def scans_ever(self, scan: int) -> list[int]:
        """``scans_ever`` over the events."""
        return next((o.event_ids for o in self._outcomes_ever if scan in o.event_ids), [scan])

    @cached_property
    def _outcomes_ever(self) -> list[FinalOutcome]:
        """``final_outcomes`` with the voided scans of final outcomes counted again."""
        return final_outcomes(
            [
                e
                for e in self.in_order
                if e.fact.event_id not in self.voids or e.fact.type in FINAL_OUTCOMES
            ]
        )


def judged_scan(scan: EventDetail, events: Sequence[EventDetail]) -> EventDetail:
    """The scan rule 4 judges a final outcome ``scan`` by: the first scan of the outcome
    it repeats (``final_outcomes``), else itself. ``events``: the parcel's. What a
    proof shows of a repeated drop (its authorizing consent, when it may have happened)
    is what the rules judged."""
    return first_scans(events).get(scan.fact.event_id, scan)


def first_scans(events: Sequence[EventDetail]) -> dict[int, EventDetail]:
    """``{repeat's event id: the first scan of the outcome it repeats}`` over a parcel's
    events (``events``: all of them, in any order, voided ones too; a voided scan
    repeats nothing). The one folding of ``final_outcomes`` every reader of a final
    outcome takes: the balance, the reports, the proofs and the parcel's status settle
    a repeated outcome by its first scan, as the rules judge it."""
    return {
        scan.fact.event_id: outcome.first
        for outcome in _folded(events)
        for scan in outcome.scans[1:]
    }


def scans_of_outcomes(events: Sequence[EventDetail]) -> dict[int, list[int]]:
    """``{scan's event id: every scan of its outcome, the first first}`` for the final
    outcomes of a parcel's ``events`` scanned more than once (``first_scans``)."""
    return History(events).scans_of_outcomes


def stands_on_another_scan(voided: int, events: Sequence[EventDetail]) -> bool:
    """Whether the final outcome the voided scan ``voided`` was a scan of still stands on
    another of its scans (a repeat voided, or the first with a repeat left): the parcel
    is where it was, only its scan was amended. Judged, as ``repeats_standing``, with
    that scan alone counted again."""
    return History(events).stands_on_another_scan(voided)


def scans_ever(scan: int, events: Sequence[EventDetail]) -> list[int]:
    """Every scan of the final outcome ``scan`` is a scan of, voided scans of final
    outcomes counted again: what its recipient may have been told of it by."""
    return History(events).scans_ever(scan)


def _folded(events: Sequence[EventDetail]) -> list[FinalOutcome]:
    """``final_outcomes`` of a parcel's events in any order, voided ones left out."""
    return History(events).folded


def refolded(events: Sequence[EventDetail], new: Set[int], history: History | None = None) -> bool:
    """Whether the events ``new`` among a parcel's ``events`` change which scan an
    outcome scanned before them is settled by (``first_scans``): a scan that was an
    outcome's first now repeats one (the first scan arrived after its repeat, or a
    check-out between them was voided), or the other way round. A shift holding such a
    scan is judged again: whether its outcome is its own depends on it. ``history``:
    the ``History`` of ``events``, when the caller has it."""
    finals = [e for e in events if e.fact.type in FINAL_OUTCOMES]
    if len(finals) < 2 or not any(e.fact.event_id in new for e in events):
        return False
    after = (history or History(events)).first_scans
    # Without the new events. Their corrections aside, the same corrections void the
    # same events (a device's client event ids are its own): the voids need not be
    # worked out again.
    old = [e for e in events if e.fact.event_id not in new]
    voids = None
    if history is not None and not any(
        e.fact.type == EventType.CORRECTION for e in events if e.fact.event_id in new
    ):
        voids = {t: c for t, c in history.voids.items() if t not in new}
    before = History(old, voids).first_scans

    def first(folding: Mapping[int, EventDetail], event_id: int) -> int:
        return folding[event_id].fact.event_id if event_id in folding else event_id

    return any(
        first(before, e.fact.event_id) != first(after, e.fact.event_id)
        for e in finals
        if e.fact.event_id not in new
    )


def _corrections(
    history: Sequence[EventDetail],
    voids: Mapping[int, int],
    by_id: Mapping[int, EventDetail],
    flags: dict[str, dict[str, Any]],
) -> None:
    """A final outcome amended by a correction waits for a manager's acknowledgement,
    but not a repeated scan of it voided while the outcome stands on an earlier scan
    (``repeats_standing``): the outcome and when it is judged to have happened are
    unchanged. Voiding its first scan moves that time, and voiding every scan undoes
    it: both need review. So does an event of such a parcel (a repeat too) voided by a
    correction another courier pushed (``correction_by_another_courier``, a warning):
    a PDA is named by its id, and on one shared between shifts the next courier could
    undo what the one before recorded (SECURITY.md threat 3), or push the one before's
    correction still queued on it. Judged on the parcel's events, whichever arrived
    first."""
    foreign = [
        {
            "voided_event_id": voided,
            "correction_event_id": correction,
            "recorded_by": by_id[voided].fact.courier_id,
            "corrected_by": by_id[correction].fact.courier_id,
        }
        for voided, correction in sorted(voids.items())
        if voided in by_id
        and correction in by_id
        and by_id[voided].fact.courier_id != by_id[correction].fact.courier_id
    ]
    if foreign:
        flags["correction_by_another_courier"] = {
            "event_ids": sorted(
                {f[k] for f in foreign for k in ("voided_event_id", "correction_event_id")}
            ),
            "corrections": foreign,
        }
    reviewed = [
        {"voided_event_id": voided, "correction_event_id": correction}
        for voided, correction in sorted(voids.items())
        if voided in by_id
        and by_id[voided].fact.type in FINAL_OUTCOMES
        and not repeats_standing(by_id[voided], history, voids)
    ]
    if reviewed:
        flags["correction_review"] = {
            "event_ids": sorted({v for r in reviewed for v in r.values()}),
            "corrections": reviewed,
        }


def repeats_standing(
    voided: EventDetail, history: Sequence[EventDetail], voids: Mapping[int, int]
) -> bool:
    """Whether the voided final outcome ``voided`` was a repeated scan (not the first)
    of an outcome that still stands on an earlier scan: the parcel's counting events
    (``history`` in projection order, less ``voids``) with it alone counted again fold
    it into an outcome whose first scan is another. Whichever of its repeats are
    voided, each is judged alone, on the events as they are: the answer does not
    depend on the order they came in (rule 3)."""
    voided_id = voided.fact.event_id
    outcome = _counted_again(voided_id, history, voids)
    return outcome is not None and outcome.first.fact.event_id != voided_id


def _counted_again(
    voided: int, history: Sequence[EventDetail], voids: Mapping[int, int]
) -> FinalOutcome | None:
    """The final outcome the voided scan ``voided`` folds into when it alone is counted
    again among the parcel's counting events (``history`` in projection order)."""
    counting = [e for e in history if e.fact.event_id not in voids or e.fact.event_id == voided]
    return next((o for o in final_outcomes(counting) if voided in o.event_ids), None)


def _has_pod(parcel: ParcelFacts, delivery: EventDetail, policy: Policy) -> bool:
    """Whether the delivery's proof shows the hand-over (``POD_IMAGES``,
    ``DROP_POD_EVIDENCE``), with a signature where the class needs one in person."""
    pod = delivery.details.get("pod") or {}
    in_person = delivery.fact.type == EventType.DELIVERED
    needs_signature = in_person and parcel.service_class in policy.signature_required
    evidence = POD_IMAGES if in_person else DROP_POD_EVIDENCE
    return bool(evidence.intersection(pod)) and not (
        needs_signature and "signature_sha256" not in pod
    )


def _distance_m(parcel: ParcelFacts, event: EventDetail) -> float | None:
    if None in (parcel.lat, parcel.lon, event.lat, event.lon):
        return None
    return haversine_m(parcel.lat, parcel.lon, event.lat, event.lon)  # type: ignore[arg-type]


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres (mean Earth radius)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6_371_008.8 * math.asin(math.sqrt(a))
