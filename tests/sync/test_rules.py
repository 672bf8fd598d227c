"""Each rule of rules 4 and 5, with its clean twin (pure: no database)."""

import dataclasses
import datetime as dt
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models import ConsentMethod, EventType, ServiceClass
from sync.flags import REPEATED_SCANS, causes, covers, evidence_version, seen_in
from sync.projection import EventFact
from sync.rules import (
    FINAL_OUTCOMES,
    JUDGING_OUTCOMES,
    ConsentFact,
    EventDetail,
    History,
    ParcelFacts,
    Policy,
    by_station,
    consents_matter,
    evaluate,
    final_outcomes,
    refolded,
)

T = dt.datetime(2026, 11, 23, 15, 0, tzinfo=dt.UTC)
EXPRESS = ParcelFacts(ServiceClass.EXPRESS, lat=31.2304, lon=121.4737)
POLICY = Policy()
_ids = iter(range(1, 10**9))


def ev(
    seq: int,
    type: EventType,
    minutes: float = 0,
    device: str = "PDA-1",
    voids: EventDetail | None = None,
    lat: float | None = None,
    lon: float | None = None,
    **details: Any,
) -> EventDetail:
    return EventDetail(
        EventFact(
            event_id=next(_ids),
            device_id=device,
            seq=seq,
            type=type,
            occurred_at=T + dt.timedelta(minutes=minutes),
            client_event_id=uuid.uuid4(),
            courier_id=1,
            voids_client_event_id=voids.fact.client_event_id if voids else None,
        ),
        details,
        lat,
        lon,
    )


def consent(
    minutes: float,
    method: ConsentMethod = ConsentMethod.LOCKER,
    point_id: str | None = None,
    **kw: Any,
) -> ConsentFact:
    return ConsentFact(
        id=next(_ids),
        method=method,
        point_id=point_id,
        granted_at=T + dt.timedelta(minutes=minutes),
        **kw,
    )


POD = {"pod": {"photo_sha256": "a" * 64}}


def locker_day(drop_minutes: float = 30, locker: str = "L-1", **pod: Any) -> list[EventDetail]:
    return [
        ev(1, EventType.CHECKED_OUT, 0),
        ev(2, EventType.OUT_FOR_DELIVERY, 5),
        ev(
            3,
            EventType.DELIVERED_TO_LOCKER,
            drop_minutes,
            locker_id=locker,
            compartment="4",
            **pod,
        ),
    ]


def kinds(events: list[EventDetail], consents: list[ConsentFact] = (), **kw: Any) -> set[str]:
    blobs = frozenset({"a" * 64, "b" * 64})
    return set(evaluate(kw.pop("parcel", EXPRESS), events, list(consents), POLICY, blobs))


def test_a_drop_with_consent_granted_before_it_is_clean() -> None:
    assert kinds(locker_day(**POD), [consent(28)]) == set()


def test_a_drop_without_consent_is_unauthorized() -> None:
    assert kinds(locker_day(**POD)) == {"unauthorized_locker_drop"}


def test_consent_granted_after_the_drop_is_flagged_not_silence() -> None:
    assert kinds(locker_day(**POD), [consent(32)]) == {"consent_after_drop"}


def test_a_class_that_needs_no_consent_is_clean_without_one() -> None:
    parcel = ParcelFacts(ServiceClass.PARCEL)
    assert kinds(locker_day(**POD), parcel=parcel) == set()


@pytest.mark.parametrize(
    ("revoked", "flagged"),
    [(25, {"unauthorized_locker_drop"}), (30, {"unauthorized_locker_drop"}), (35, set())],
)
def test_revoked_consent_counts_only_until_revoked(revoked: float, flagged: set[str]) -> None:
    """Revoked at the drop's very instant (30) it was no longer in force: "not revoked
    at that time" (DESIGN.md rule 4) leaves no tie to the courier."""
    revoked_at = T + dt.timedelta(minutes=revoked)
    assert kinds(locker_day(**POD), [consent(10, revoked_at=revoked_at)]) == flagged


@pytest.mark.parametrize(
    ("expires", "flagged"),
    [(20, {"unauthorized_locker_drop"}), (30, {"unauthorized_locker_drop"}), (40, set())],
)
def test_expired_consent_does_not_authorize(expires: float, flagged: set[str]) -> None:
    """Expiring at the drop's very instant (30), it no longer authorizes it."""
    expires_at = T + dt.timedelta(minutes=expires)
    assert kinds(locker_day(**POD), [consent(10, expires_at=expires_at)]) == flagged


@pytest.mark.parametrize(
    ("point", "flagged"), [("L-2", {"unauthorized_locker_drop"}), ("L-1", set())]
)
def test_consent_for_a_specific_point_covers_only_that_point(
    point: str, flagged: set[str]
) -> None:
    assert kinds(locker_day(**POD), [consent(10, point_id=point)]) == flagged


@pytest.mark.parametrize(
    ("method", "flagged"),
    [
        (ConsentMethod.PICKUP_POINT, {"unauthorized_locker_drop"}),
        (ConsentMethod.LOCKER, set()),
        (ConsentMethod.ANY, set()),
    ],
)
def test_the_consent_method_must_fit_the_drop(method: ConsentMethod, flagged: set[str]) -> None:
    assert kinds(locker_day(**POD), [consent(10, method=method)]) == flagged


def test_a_consent_captured_after_the_drop_but_stamped_earlier_does_not_authorize_it() -> None:
    """Rule 6: on the drop's own PDA, seq decides. The consent at seq 4 followed the drop
    at seq 3, whatever time it claims."""
    backdated = consent(10, device_id="PDA-1", seq=4)
    assert kinds(locker_day(**POD), [backdated]) == {"consent_after_drop"}
    honest = consent(10, device_id="PDA-1", seq=2)
    assert kinds(locker_day(**POD), [honest]) == set()


@pytest.mark.parametrize(
    ("pod", "flagged"),
    [
        ({}, {"delivered_without_pod"}),
        ({"pod": {"photo_sha256": "a" * 64}}, {"delivered_without_pod"}),  # no signature
        ({"pod": {"signature_sha256": "b" * 64}}, set()),
    ],
)
def test_express_in_person_needs_a_signature(pod: dict[str, Any], flagged: set[str]) -> None:
    events = [ev(1, EventType.CHECKED_OUT), ev(2, EventType.DELIVERED, 30, **pod)]
    assert kinds(events) == flagged


def test_a_parcel_class_delivered_in_person_needs_a_pod_but_no_signature() -> None:
    parcel = ParcelFacts(ServiceClass.PARCEL)
    events = [ev(1, EventType.CHECKED_OUT), ev(2, EventType.DELIVERED, 30, **POD)]
    assert kinds(events, parcel=parcel) == set()
    bare = [ev(1, EventType.CHECKED_OUT), ev(2, EventType.DELIVERED, 30)]
    assert kinds(bare, parcel=parcel) == {"delivered_without_pod"}


@pytest.mark.parametrize(
    ("pod", "flagged"),
    [
        ({"recipient_name": "Li Lei", "relation": "self"}, {"delivered_without_pod"}),
        ({"recipient_name": "Li Lei", "pickup_code": "4711"}, {"delivered_without_pod"}),
        ({"recipient_name": "Li Lei", "photo_sha256": "a" * 64}, set()),
        ({"relation": "neighbour", "signature_sha256": "b" * 64}, set()),
    ],
)
def test_in_person_only_an_image_proves_the_hand_over(
    pod: dict[str, Any], flagged: set[str]
) -> None:
    """A name, a relation or a code typed on the PDA are the courier's word, which an
    auditor settling a dispute cannot check: a signature or a photo is the proof."""
    parcel = ParcelFacts(ServiceClass.PARCEL)
    events = [ev(1, EventType.CHECKED_OUT), ev(2, EventType.DELIVERED, 30, pod=pod)]
    stored = frozenset({"a" * 64, "b" * 64})
    assert set(evaluate(parcel, events, [], POLICY, stored)) == flagged


@pytest.mark.parametrize(
    ("pod", "flagged"),
    [
        ({"recipient_name": "Li Lei"}, {"delivered_without_pod"}),
        ({"pickup_code": "4711"}, set()),  # the code the locker issued
        ({"photo_sha256": "a" * 64}, set()),
    ],
)
def test_at_a_locker_the_points_code_is_a_proof(pod: dict[str, Any], flagged: set[str]) -> None:
    parcel = ParcelFacts(ServiceClass.PARCEL)
    drop = ev(2, EventType.DELIVERED_TO_LOCKER, 30, locker_id="L1", compartment="3", pod=pod)
    stored = frozenset({"a" * 64})
    assert set(evaluate(parcel, [ev(1, EventType.CHECKED_OUT), drop], [], POLICY, stored)) == (
        flagged
    )


def test_a_pod_image_not_uploaded_is_flagged_until_it_is() -> None:
    events = [
        ev(1, EventType.CHECKED_OUT),
        ev(2, EventType.DELIVERED, 30, pod={"signature_sha256": "c" * 64}),
    ]
    assert kinds(events) == {"pod_blob_missing"}
    stored = frozenset({"c" * 64})
    assert set(evaluate(EXPRESS, events, [], POLICY, stored)) == set()


@pytest.mark.parametrize(("purged_after", "flagged"), [(31, set()), (29, {"pod_blob_missing"})])
def test_an_image_purged_by_retention_was_there_for_a_delivery_made_before(
    purged_after: int, flagged: set[str]
) -> None:
    """The retention purge deletes old images by policy: the deliveries that named them
    before keep their proof. A delivery made after the purge that names one names an
    image the server does not have: the PDA must send it again."""
    events = [
        ev(1, EventType.CHECKED_OUT),
        ev(2, EventType.DELIVERED, 30, pod={"signature_sha256": "c" * 64}),
    ]
    purged = {"c" * 64: T + dt.timedelta(minutes=purged_after)}
    assert set(evaluate(EXPRESS, events, [], POLICY, frozenset(), purged)) == flagged


@pytest.mark.parametrize(("lat", "flagged"), [(31.2404, {"far_from_address"}), (31.2310, set())])
def test_a_delivery_far_from_the_geocoded_address(lat: float, flagged: set[str]) -> None:
    delivery = ev(
        2, EventType.DELIVERED, 30, lat=lat, lon=121.4737, pod={"signature_sha256": "b" * 64}
    )
    assert kinds([ev(1, EventType.CHECKED_OUT), delivery]) == flagged  # ~1.1 km vs ~70 m


def test_delivered_and_returned_conflict_unless_checked_out_again_between() -> None:
    signed = {"pod": {"signature_sha256": "b" * 64}}
    conflict = [
        ev(1, EventType.CHECKED_OUT),
        ev(2, EventType.DELIVERED, 30, **signed),
        ev(3, EventType.RETURNED_TO_STATION, 60),
    ]
    assert kinds(conflict) == {"conflicting_final_outcome"}
    next_day = [
        ev(1, EventType.CHECKED_OUT),
        ev(2, EventType.RETURNED_TO_STATION, 60),
        ev(3, EventType.CHECKED_OUT, 600),
        ev(4, EventType.DELIVERED, 630, **signed),
    ]
    assert kinds(next_day) == set()


def by(courier_id: int, event: EventDetail) -> EventDetail:
    """``event`` recorded by another courier (on the same PDA: a shared one)."""
    return dataclasses.replace(event, fact=event.fact._replace(courier_id=courier_id))


LOCKER_4 = {"locker_id": "L-1", "compartment": "4"}


@pytest.mark.parametrize(
    ("outcome", "details"),
    [
        (EventType.RETURNED_TO_STATION, {}),
        (EventType.DELIVERED, {"pod": {"signature_sha256": "b" * 64}}),
        (EventType.DELIVERED_TO_LOCKER, {**LOCKER_4, **POD}),
        (EventType.DELIVERED_TO_PICKUP_POINT, {"point_id": "PP-1", **POD}),
    ],
)
def test_a_final_outcome_scanned_twice_is_one_outcome(
    outcome: EventType, details: dict[str, Any]
) -> None:
    """The scanner beeped twice, or the courier scanned the cage and then each parcel, or
    tapped the compartment twice: the parcel was handled once."""
    events = [
        ev(1, EventType.CHECKED_OUT),
        ev(2, outcome, 30, **details),
        ev(3, EventType.OUT_FOR_DELIVERY, 31),  # whatever comes between, but a check-out
        ev(4, outcome, 32, **details),
    ]
    assert kinds(events, [consent(-10, ConsentMethod.ANY)]) == set()


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (ev(2, EventType.DELIVERED_TO_LOCKER, 30, **LOCKER_4, **POD),
         ev(3, EventType.DELIVERED_TO_LOCKER, 32, locker_id="L-1", compartment="5", **POD)),
        (ev(2, EventType.DELIVERED_TO_LOCKER, 30, **LOCKER_4, **POD),
         ev(3, EventType.DELIVERED_TO_LOCKER, 32, locker_id="L-2", compartment="4", **POD)),
        (ev(2, EventType.DELIVERED_TO_PICKUP_POINT, 30, point_id="PP-1", **POD),
         ev(3, EventType.DELIVERED_TO_PICKUP_POINT, 32, point_id="PP-2", **POD)),
        (ev(2, EventType.RETURNED_TO_STATION, 30),
         by(2, ev(3, EventType.RETURNED_TO_STATION, 32))),
        (ev(2, EventType.DELIVERED_TO_LOCKER, 30, **LOCKER_4, **POD),
         ev(3, EventType.DELIVERED_TO_PICKUP_POINT, 32, point_id="L-1", **POD)),
    ],
    ids=["another-compartment", "another-locker", "another-point", "another-courier",
         "another-type"],
)  # fmt: skip
def test_the_same_type_elsewhere_or_by_another_courier_is_a_second_outcome(
    first: EventDetail, second: EventDetail
) -> None:
    events = [ev(1, EventType.CHECKED_OUT), first, second]
    flags = evaluate(
        EXPRESS, events, [consent(-10, ConsentMethod.ANY)], POLICY, frozenset({"a" * 64})
    )
    assert set(flags) == {"conflicting_final_outcome"}
    assert flags["conflicting_final_outcome"]["event_ids"] == [
        first.fact.event_id,
        second.fact.event_id,
    ]


def test_a_repeated_outcome_then_another_conflicts_citing_every_scan_of_both() -> None:
    cage, parcel, delivered = (
        ev(2, EventType.RETURNED_TO_STATION, 60),
        ev(3, EventType.RETURNED_TO_STATION, 61),
        ev(4, EventType.DELIVERED, 90, pod={"signature_sha256": "b" * 64}),
    )
    flags = evaluate(EXPRESS, [ev(1, EventType.CHECKED_OUT), cage, parcel, delivered], [], POLICY)
    assert flags["conflicting_final_outcome"]["event_ids"] == [
        e.fact.event_id for e in (cage, parcel, delivered)
    ]


def test_a_repeated_scan_voided_leaves_the_other_and_a_review() -> None:
    first = ev(2, EventType.DELIVERED_TO_LOCKER, 30, **LOCKER_4, **POD)
    again = ev(3, EventType.DELIVERED_TO_LOCKER, 31, **LOCKER_4, **POD)
    events = [
        ev(1, EventType.CHECKED_OUT),
        first,
        again,
        ev(4, EventType.CORRECTION, 32, voids=first),
    ]
    flags = evaluate(EXPRESS, events, [], POLICY, frozenset({"a" * 64}))
    assert set(flags) == {"unauthorized_locker_drop", "correction_review"}
    assert flags["unauthorized_locker_drop"]["event_ids"] == [again.fact.event_id]


def test_a_repeat_voided_is_no_correction_of_the_outcome_that_stands() -> None:
    """The second beep corrected away: the drop stands on its first scan, judged at the
    same time, and there is nothing for the manager to review."""
    first = ev(2, EventType.DELIVERED_TO_LOCKER, 30, **LOCKER_4, **POD)
    again = ev(3, EventType.DELIVERED_TO_LOCKER, 31, **LOCKER_4, **POD)
    events = [
        ev(1, EventType.CHECKED_OUT),
        first,
        again,
        ev(4, EventType.CORRECTION, 32, voids=again),
    ]
    flags = evaluate(EXPRESS, events, [], POLICY, frozenset({"a" * 64}))
    assert set(flags) == {"unauthorized_locker_drop"}
    assert flags["unauthorized_locker_drop"] == {
        "event_ids": [first.fact.event_id],
        "consent_ids": [],
    }


def test_every_scan_of_an_outcome_voided_needs_review_citing_each() -> None:
    first = ev(2, EventType.RETURNED_TO_STATION, 30)
    again = ev(3, EventType.RETURNED_TO_STATION, 31)
    undo_first, undo_again = (
        ev(4, EventType.CORRECTION, 32, voids=first),
        ev(5, EventType.CORRECTION, 33, voids=again),
    )
    events = [ev(1, EventType.CHECKED_OUT), first, again, undo_first, undo_again]
    flags = evaluate(EXPRESS, events, [], POLICY)
    assert set(flags) == {"correction_review"}
    assert flags["correction_review"]["corrections"] == [
        {"voided_event_id": first.fact.event_id, "correction_event_id": undo_first.fact.event_id},
        {"voided_event_id": again.fact.event_id, "correction_event_id": undo_again.fact.event_id},
    ]


def test_a_repeat_voided_by_another_courier_is_still_flagged_as_theirs() -> None:
    """Who voided whose scan still matters (``correction_by_another_courier``), though
    the outcome needs no review."""
    first = ev(2, EventType.DELIVERED, 30, pod={"signature_sha256": "b" * 64})
    again = ev(3, EventType.DELIVERED, 31, pod={"signature_sha256": "b" * 64})
    undo = by(2, ev(4, EventType.CORRECTION, 32, voids=again))
    events = [ev(1, EventType.CHECKED_OUT), first, again, undo]
    flags = evaluate(EXPRESS, events, [], POLICY, frozenset({"b" * 64}))
    assert set(flags) == {"correction_by_another_courier"}
    assert flags["correction_by_another_courier"]["event_ids"] == [
        again.fact.event_id,
        undo.fact.event_id,
    ]


def test_a_repeated_drop_without_consent_is_one_unauthorized_drop_citing_both_scans() -> None:
    day = locker_day(**POD)
    again = ev(4, EventType.DELIVERED_TO_LOCKER, 31, **LOCKER_4, **POD)
    flags = evaluate(EXPRESS, [*day, again], [], POLICY, frozenset({"a" * 64}))
    assert set(flags) == {"unauthorized_locker_drop"}
    assert flags["unauthorized_locker_drop"]["event_ids"] == [
        day[2].fact.event_id,
        again.fact.event_id,
    ]


def test_a_drop_scanned_again_after_a_consent_was_made_before_it() -> None:
    """The parcel went into the locker at the first scan: a consent granted before the
    second came after the drop, and scanning again does not make it come first."""
    day = locker_day(drop_minutes=30, **POD)
    again = ev(4, EventType.DELIVERED_TO_LOCKER, 40, **LOCKER_4, **POD)
    flags = evaluate(EXPRESS, [*day, again], [consent(35)], POLICY, frozenset({"a" * 64}))
    assert set(flags) == {"consent_after_drop"}
    assert flags["consent_after_drop"]["event_ids"] == [day[2].fact.event_id, again.fact.event_id]


@pytest.mark.parametrize(
    ("first_pod", "again_pod", "flagged"),
    [
        ({"signature_sha256": "b" * 64}, {}, set()),
        ({}, {"signature_sha256": "b" * 64}, set()),
        ({}, {"recipient_name": "Li"}, {"delivered_without_pod"}),
        # express in person: a photo alone is no signature, whichever scan has it
        ({"photo_sha256": "a" * 64}, {"recipient_name": "Li"}, {"delivered_without_pod"}),
    ],
    ids=["proof-then-none", "none-then-proof", "neither", "neither-complete"],
)
def test_a_delivery_scanned_twice_was_delivered_with_a_proof_if_one_scan_has_it(
    first_pod: dict[str, Any], again_pod: dict[str, Any], flagged: set[str]
) -> None:
    """One hand-over, one proof: the repeated scan without one does not make the parcel
    delivered without proof; with none on either, the flag cites both scans."""
    first = ev(2, EventType.DELIVERED, 30, pod=first_pod)
    again = ev(3, EventType.DELIVERED, 31, pod=again_pod)
    flags = evaluate(EXPRESS, [ev(1, EventType.CHECKED_OUT), first, again], [], POLICY,
                     frozenset({"a" * 64, "b" * 64}))  # fmt: skip
    assert set(flags) == flagged
    if flagged:
        assert flags["delivered_without_pod"]["event_ids"] == [
            first.fact.event_id,
            again.fact.event_id,
        ]


def test_a_delivery_without_a_check_out_is_flagged() -> None:
    events = [ev(1, EventType.DELIVERED, 30, pod={"signature_sha256": "b" * 64})]
    assert kinds(events) == {"delivered_not_checked_out"}
    checked_out = [ev(1, EventType.CHECKED_OUT), *events]
    assert kinds(checked_out) == set()


def test_a_corrected_final_outcome_needs_review_and_counts_no_more() -> None:
    drop = ev(3, EventType.DELIVERED_TO_LOCKER, 30, locker_id="L-1", compartment="4", **POD)
    correction = ev(4, EventType.CORRECTION, 31, voids=drop)
    events = [ev(1, EventType.CHECKED_OUT), ev(2, EventType.OUT_FOR_DELIVERY, 5), drop, correction]
    assert kinds(events) == {"correction_review"}  # the voided drop is not judged
    day = locker_day(**POD)
    not_a_final_outcome = ev(4, EventType.CORRECTION, 32, voids=day[1])
    assert kinds([*day, not_a_final_outcome], [consent(1)]) == set()


def test_evidence_names_the_events() -> None:
    day = locker_day(**POD)
    flags = evaluate(EXPRESS, day, [], POLICY, frozenset({"a" * 64}))
    assert flags["unauthorized_locker_drop"]["event_ids"] == [day[2].fact.event_id]


def test_a_consent_posted_long_after_the_drop_cannot_be_dated_before_it() -> None:
    """granted_at is the channel's word: recorded more than the grace after the drop,
    the consent counts as after it."""
    recorded_late = T + dt.timedelta(hours=3)
    assert kinds(locker_day(**POD), [consent(10, recorded_at=recorded_late)]) == {
        "consent_after_drop"
    }
    recorded_soon = T + dt.timedelta(minutes=50)
    assert kinds(locker_day(**POD), [consent(10, recorded_at=recorded_soon)]) == set()


def pda_clock(day: list[EventDetail], minutes: float) -> list[EventDetail]:
    """``day`` with its drop (the last event) stamped ``minutes`` off its corrected time
    on the PDA's clock (negative: the device time is earlier)."""
    drop = day[-1]
    device = drop.fact.occurred_at + dt.timedelta(minutes=minutes)
    return [*day[:-1], dataclasses.replace(drop, occurred_at_device=device)]


@pytest.mark.parametrize(
    ("clock", "flagged"),
    [
        (0, set()),
        (1.5, set()),  # an honest drift: the corrected time alone
        (-2, set()),  # at the bound (CLOCK_SKEW_FLAG_SECONDS' default) still
        (-2.5, {"consent_after_drop"}),  # may have happened at 27.5, before the consent
        (-60, {"consent_after_drop"}),  # set back after the drop, or forward before it
        (5, set()),  # the consent precedes the whole span
    ],
)
def test_a_drop_whose_clocks_disagree_beyond_the_bound_needs_consent_before_both(
    clock: float, flagged: set[str]
) -> None:
    """Rule 6: the offset is measured at the push, and the clock may have moved between
    the drop and the push. Beyond the bound, the drop may have happened anywhere between
    its device time and its corrected time: a consent must precede the earliest."""
    assert kinds(pda_clock(locker_day(**POD), clock), [consent(29)]) == flagged


@pytest.mark.parametrize(
    ("clock", "flagged"),
    [(1.5, set()), (-5, set()), (5, {"unauthorized_locker_drop"})],
)
def test_a_drop_whose_clocks_disagree_beyond_the_bound_needs_consent_in_force_at_the_later(
    clock: float, flagged: set[str]
) -> None:
    """Revoked at 32, two minutes after the corrected drop: in force at the latest time
    the drop may have happened only if that is before 32."""
    revoked = consent(10, revoked_at=T + dt.timedelta(minutes=32))
    assert kinds(pda_clock(locker_day(**POD), clock), [revoked]) == flagged


def test_an_uncertain_drop_cannot_have_happened_after_its_push_arrived() -> None:
    """A PDA clock 60 minutes fast: the drop at 30 (corrected) says 90 on the PDA, but its
    push reached the server at 35. A consent expiring at 40 was in force whenever it
    happened; one expiring at 33 maybe not."""
    day = pda_clock(locker_day(**POD), 60)
    day[-1] = dataclasses.replace(day[-1], received_at=T + dt.timedelta(minutes=35))
    assert kinds(day, [consent(10, expires_at=T + dt.timedelta(minutes=40))]) == set()
    assert kinds(day, [consent(10, expires_at=T + dt.timedelta(minutes=33))]) == {
        "unauthorized_locker_drop"
    }


def test_a_consent_recorded_past_the_grace_of_an_uncertain_drops_earliest_time_is_late() -> None:
    """Recorded within the grace of the corrected time but not of the device time, an hour
    before it: a channel's consent might have been posted after the drop."""
    recorded = T + dt.timedelta(minutes=80)  # 50 after the corrected drop
    assert kinds(locker_day(**POD), [consent(10, recorded_at=recorded)]) == set()
    assert kinds(pda_clock(locker_day(**POD), -60), [consent(-40, recorded_at=recorded)]) == {
        "consent_after_drop"
    }


def test_a_consent_captured_on_the_drops_own_pda_is_still_ordered_by_seq() -> None:
    day = pda_clock(locker_day(**POD), -60)
    assert kinds(day, [consent(10, device_id="PDA-1", seq=2)]) == set()
    assert kinds(day, [consent(10, device_id="PDA-1", seq=4)]) == {"consent_after_drop"}


def test_a_consent_captured_on_another_stations_pda_authorizes_no_drop_of_this_one() -> None:
    """SECURITY.md threat 2: a courier of station 2, on station 2's PDA, records an "in
    person" consent for a parcel of station 1 they never held (its tracking number is
    all it takes). Station 1's drop is unauthorized, and the flag says which consent did
    not count and why. One captured on any PDA of station 1 (the drop's own, a
    colleague's) authorizes it, as a recipient channel's does."""
    day = [at_station(e, 1) for e in locker_day(**POD)]
    forged = consent(10, device_id="PDA-9", seq=1, captured_at_station=2)
    flags = evaluate(EXPRESS, day, [forged], POLICY, frozenset({"a" * 64}))
    assert flags == {
        "unauthorized_locker_drop": {
            "event_ids": [day[-1].fact.event_id],
            "consent_ids": [forged.id],
            "captured_at_other_station": [forged.id],
        }
    }
    colleagues = consent(10, device_id="PDA-2", seq=1, captured_at_station=1)
    own = consent(10, device_id="PDA-1", seq=2, captured_at_station=1)
    for authorizing in (colleagues, own, consent(10)):
        assert kinds(day, [forged, authorizing]) == set()


def test_a_consent_captured_at_another_station_after_the_drop_is_not_merely_late() -> None:
    """Such a consent counts neither before the drop nor after it: the drop is
    unauthorized, not ``consent_after_drop``; a late one of its own station's is late."""
    day = [at_station(e, 1) for e in locker_day(**POD)]
    forged = consent(32, device_id="PDA-9", seq=1, captured_at_station=2)
    assert kinds(day, [forged]) == {"unauthorized_locker_drop"}
    late = consent(32, device_id="PDA-2", seq=1, captured_at_station=1)
    flags = evaluate(EXPRESS, day, [forged, late], POLICY, frozenset({"a" * 64}))
    assert flags["consent_after_drop"]["consent_ids"] == [late.id]
    assert flags["consent_after_drop"]["captured_at_other_station"] == [forged.id]


def test_a_drop_stamped_before_an_earlier_seq_of_its_pda_is_judged_no_earlier_than_it() -> None:
    """Rule 6: the PDA's seqs are its causal order. Out for delivery at 35 (seq 2), then
    the drop (seq 3) stamped 30, the clock set back for it and put right before the
    push (no offset shows it): the drop happened after 35, when the consent revoked at
    32 was no longer in force. The projection orders it after 35 too."""
    day = locker_day(**POD)
    day[1] = ev(2, EventType.OUT_FOR_DELIVERY, 35)
    revoked = consent(10, revoked_at=T + dt.timedelta(minutes=32))
    assert kinds(day, [revoked]) == {"unauthorized_locker_drop"}
    assert kinds(day, [consent(10, revoked_at=T + dt.timedelta(minutes=36))]) == set()


def test_a_drop_stamped_after_a_later_seq_of_its_pda_is_judged_no_later_than_it() -> None:
    """The drop (seq 3) stamped 40, the clock set forward for it; the PDA's next event of
    the parcel (seq 4) says 31: the drop happened by 31, and the consent granted at 32
    came after it."""
    day = [*locker_day(40, **POD), ev(4, EventType.EXCEPTION, 31, reason="damaged")]
    assert kinds(day, [consent(32)]) == {"consent_after_drop"}
    assert kinds(day, [consent(30)]) == set()


def test_the_clock_uncertainty_bound_is_the_policys() -> None:
    day = pda_clock(locker_day(**POD), -5)
    blobs = frozenset({"a" * 64})
    lenient = Policy(clock_uncertainty=dt.timedelta(minutes=10))
    assert evaluate(EXPRESS, day, [consent(29)], lenient, blobs) == {}
    assert set(evaluate(EXPRESS, day, [consent(29)], POLICY, blobs)) == {"consent_after_drop"}


def test_a_delivery_by_a_courier_it_was_not_checked_out_to_is_flagged() -> None:
    checked_out = ev(1, EventType.CHECKED_OUT)
    other = ev(2, EventType.DELIVERED, 30, device="PDA-2", pod={"signature_sha256": "b" * 64})
    other = EventDetail(other.fact._replace(courier_id=2), other.details)
    assert kinds([checked_out, other]) == {"delivered_not_checked_out"}


def test_a_delivery_by_a_courier_who_returned_it_before_another_took_it_is_flagged() -> None:
    """Courier 1 returned the parcel to the station and courier 2 checked it out; then
    courier 1 records it delivered. It was checked out to courier 2 then, not to
    courier 1 (rule 1's example), whoever held it once: courier 1's shift shows it
    delivered, courier 2's missing, and only this flag ties the two."""
    signed = {"pod": {"signature_sha256": "b" * 64}}
    taken = ev(1, EventType.CHECKED_OUT, 90, device="PDA-2")
    taken = EventDetail(taken.fact._replace(courier_id=2), taken.details)
    events = [
        ev(1, EventType.CHECKED_OUT, 0),
        ev(2, EventType.RETURNED_TO_STATION, 60),
        taken,
        ev(3, EventType.DELIVERED, 120, **signed),
    ]
    assert kinds(events) == {"delivered_not_checked_out"}


def test_a_delivery_after_its_courier_returned_it_unchecked_out_again_is_flagged() -> None:
    """Returned to the station, the parcel is checked out to no one: the same courier
    delivering it afterwards without a new check-out delivered a parcel not checked out
    to them (rule 1's example), besides the two final outcomes (rule 5)."""
    signed = {"pod": {"signature_sha256": "b" * 64}}
    events = [
        ev(1, EventType.CHECKED_OUT, 0),
        ev(2, EventType.RETURNED_TO_STATION, 60),
        ev(3, EventType.DELIVERED, 120, **signed),
    ]
    flags = evaluate(EXPRESS, events, [], POLICY, frozenset({"b" * 64}))
    assert set(flags) == {"conflicting_final_outcome", "delivered_not_checked_out"}
    assert flags["delivered_not_checked_out"] == {"event_ids": [events[2].fact.event_id]}


def test_consents_matter_to_a_drop_of_a_class_that_needs_them() -> None:
    assert consents_matter(EXPRESS, locker_day(**POD), POLICY)
    assert not consents_matter(ParcelFacts(ServiceClass.PARCEL), locker_day(**POD), POLICY)
    in_person = [ev(1, EventType.CHECKED_OUT), ev(2, EventType.DELIVERED, 30, **POD)]
    assert not consents_matter(EXPRESS, in_person, POLICY)


@given(
    types=st.lists(st.sampled_from(list(EventType)), max_size=6),
    service_class=st.sampled_from(list(ServiceClass)),
    granted=st.lists(
        st.tuples(st.integers(-60, 120), st.sampled_from(list(ConsentMethod))), max_size=3
    ),
)
def test_where_consents_do_not_matter_the_rules_judge_alike_without_them(
    types: list[EventType], service_class: ServiceClass, granted: list[tuple[int, ConsentMethod]]
) -> None:
    """``consents_matter`` lets a push skip looking consents up: where it says they do
    not, ``evaluate`` finds the same flags with the consents and without."""
    parcel = ParcelFacts(service_class, lat=31.2304, lon=121.4737)
    details = {"locker_id": "L-1", "point_id": "P-1", "compartment": "4", **POD}
    events = [ev(seq, kind, seq * 5, **details) for seq, kind in enumerate(types, 1)]
    consents = [consent(minutes, method) for minutes, method in granted]
    blobs = frozenset({"a" * 64})
    with_consents = evaluate(parcel, events, consents, POLICY, blobs)
    if not consents_matter(parcel, events, POLICY):
        assert with_consents == evaluate(parcel, events, [], POLICY, blobs)


def at_station(event: EventDetail, station_id: int) -> EventDetail:
    return EventDetail(
        event.fact._replace(station_id=station_id), event.details, event.lat, event.lon
    )


def test_flags_are_split_by_the_station_each_event_was_recorded_at() -> None:
    """A parcel re-routed from station 1 to station 2 and dropped without consent and
    without its photo at both: each station's flag cites its own events (and images)."""
    first = [at_station(e, 1) for e in locker_day(30, pod={"photo_sha256": "a" * 64})]
    second = [
        at_station(e, 2)
        for e in (
            ev(1, EventType.CHECKED_OUT, 60, device="PDA-2"),
            ev(
                2,
                EventType.DELIVERED_TO_LOCKER,
                90,
                device="PDA-2",
                locker_id="L-2",
                compartment="1",
                pod={"photo_sha256": "b" * 64},
            ),
        )
    ]
    events = [*first, *second]
    split = by_station(evaluate(EXPRESS, events, [], POLICY), events, home=2)
    drop_1, drop_2 = first[-1].fact.event_id, second[-1].fact.event_id
    assert split[("unauthorized_locker_drop", 1)]["event_ids"] == [drop_1]
    assert split[("unauthorized_locker_drop", 2)]["event_ids"] == [drop_2]
    assert split[("pod_blob_missing", 1)] == {"blobs": ["a" * 64], "event_ids": [drop_1]}
    assert split[("pod_blob_missing", 2)] == {"blobs": ["b" * 64], "event_ids": [drop_2]}
    # One station's events only: the evidence as evaluate gives it.
    assert by_station(evaluate(EXPRESS, first, [], POLICY), first, home=2) == {
        (kind, 1): evidence for kind, evidence in evaluate(EXPRESS, first, [], POLICY).items()
    }


def test_a_correction_is_reviewed_at_the_station_of_the_outcome_it_voids() -> None:
    """A PDA moved to station 2 voids the drop it recorded at station 1: one review, at
    station 1, citing both; not a second flag at station 2 with no correction in it."""
    drop = at_station(ev(3, EventType.DELIVERED_TO_LOCKER, 30, locker_id="L-1"), 1)
    correction = at_station(ev(4, EventType.CORRECTION, 31, voids=drop), 2)
    events = [at_station(ev(1, EventType.CHECKED_OUT), 1), drop, correction]
    split = by_station(evaluate(EXPRESS, events, [], POLICY), events, home=2)
    assert split == {
        ("correction_review", 1): {
            "event_ids": sorted([drop.fact.event_id, correction.fact.event_id]),
            "corrections": [
                {
                    "voided_event_id": drop.fact.event_id,
                    "correction_event_id": correction.fact.event_id,
                }
            ],
        }
    }


DROP = "unauthorized_locker_drop"


def test_events_a_flag_cites_stay_with_its_station() -> None:
    """A flag raised before flags had a station each sits at the parcel's station (2)
    citing a drop recorded at station 1: judged again, it is still that flag's."""
    events = [at_station(e, 1) for e in locker_day(30)]
    drop = events[-1].fact.event_id
    judged = {"unauthorized_locker_drop": evaluate(EXPRESS, events, [], POLICY)[DROP]}
    assert set(by_station(judged, events, home=2)) == {(DROP, 1)}
    assert set(by_station(judged, events, home=2, cited={DROP: {drop: 2}})) == {(DROP, 2)}


# None, a photo, a point's code, a signature never uploaded (pod_blob_missing)
PODS_OR_NONE = [
    {},
    {"photo_sha256": "a" * 64},
    {"pickup_code": "9"},
    {"signature_sha256": "c" * 64},
]
FINAL_TYPES = [
    EventType.DELIVERED,
    EventType.DELIVERED_TO_LOCKER,
    EventType.DELIVERED_TO_PICKUP_POINT,
    EventType.RETURNED_TO_STATION,
]


@st.composite
def parcel_days(draw: st.DrawFn) -> list[EventDetail]:
    """A parcel's events on one PDA, shared by two couriers: check-outs, final outcomes
    at two lockers' compartments and two points, with proofs or none, in person near
    the address or far, dated anywhere in the hour (seqs 3 apart: room for two repeats)."""
    types = [EventType.CHECKED_OUT, EventType.OUT_FOR_DELIVERY, *FINAL_TYPES * 2]
    events = []
    for seq in range(3, 3 * draw(st.integers(1, 7)) + 1, 3):
        kind = draw(st.sampled_from(types))
        details = {
            "locker_id": draw(st.sampled_from(["L-1", "L-2"])),
            "compartment": draw(st.sampled_from(["4", "5"])),
            "point_id": draw(st.sampled_from(["PP-1", "PP-2"])),
            "pod": draw(st.sampled_from(PODS_OR_NONE)),
        }
        lat = draw(st.sampled_from([31.2304, 31.2404]))
        event = ev(seq, kind, draw(st.integers(0, 60)), lat=lat, lon=121.4737, **details)
        events.append(by(draw(st.sampled_from([1, 2])), event))
    return events


def scanned_again(event: EventDetail) -> EventDetail:
    """``event`` scanned again right after: the next seq, the same clock, courier, place,
    proof and position."""
    fact = event.fact._replace(
        event_id=next(_ids), seq=event.fact.seq + 1, client_event_id=uuid.uuid4()
    )
    return EventDetail(fact, event.details, event.lat, event.lon)


def folded(flags: dict[str, dict[str, Any]], again: int, first: int) -> dict[str, Any]:
    """``flags`` as if the scan ``again`` were ``first`` it repeats."""

    def fold(ids: list[int]) -> list[int]:
        return list(dict.fromkeys(first if i == again else i for i in ids))

    seen = {}
    for kind, evidence in flags.items():
        evidence = {**evidence, "event_ids": fold(evidence["event_ids"])}
        if "distances_m" in evidence:
            evidence["distances_m"] = [
                d for d in evidence["distances_m"] if d["event_id"] != again
            ]
        if REPEATED_SCANS in evidence:
            repeats = [r for r in evidence[REPEATED_SCANS] if r["event_id"] != again]
            evidence[REPEATED_SCANS] = repeats
            if not repeats:
                del evidence[REPEATED_SCANS]
        seen[kind] = evidence
    return seen


@given(
    day=parcel_days(),
    which=st.integers(0, 6),
    granted=st.lists(
        st.tuples(st.integers(-10, 70), st.sampled_from(list(ConsentMethod))), max_size=2
    ),
    order=st.randoms(use_true_random=False),
)
def test_a_final_outcome_scanned_again_judges_as_scanned_once_whatever_the_order(
    day: list[EventDetail],
    which: int,
    granted: list[tuple[int, ConsentMethod]],
    order: Any,
) -> None:
    """Rule 3 for repeated scans: a final outcome scanned again changes no flag, its
    evidence citing the repeat wherever it cites the scan it repeats, and the parcel's
    events judge the same in whatever order they are handed over (the projection
    orders them: arrival order, batches and duplicates never reach the rules)."""
    finals = [e for e in day if e.fact.type in FINAL_TYPES]
    consents = [consent(minutes, method) for minutes, method in granted]
    blobs = frozenset({"a" * 64})
    once = evaluate(EXPRESS, day, consents, POLICY, blobs)
    if finals:
        first = finals[which % len(finals)]
        again = scanned_again(first)
        twice_day = [*day, again]
        twice = evaluate(EXPRESS, twice_day, consents, POLICY, blobs)
        assert folded(twice, again.fact.event_id, first.fact.event_id) == once
        cited = {k for k, e in twice.items() if first.fact.event_id in e["event_ids"]}
        assert cited == {k for k, e in twice.items() if again.fact.event_id in e["event_ids"]}
        # A flag judging the outcome names the repeat as one: a decision on the outcome
        # covers it, and the flag's evidence version is the one the manager read.
        for kind in cited & set(JUDGING_OUTCOMES):
            repeats = {r["event_id"] for r in twice[kind][REPEATED_SCANS]}
            assert again.fact.event_id in repeats
            assert causes(twice[kind], "event_ids") == causes(once[kind], "event_ids")
            assert evidence_version(twice[kind]) == evidence_version(once[kind])
            assert covers(seen_in(once[kind]), twice[kind])
        day = twice_day
    shuffled = list(day)
    order.shuffle(shuffled)
    assert evaluate(EXPRESS, shuffled, consents, POLICY, blobs) == evaluate(
        EXPRESS, day, consents, POLICY, blobs
    )


@given(
    day=parcel_days(),
    which=st.integers(0, 6),
    times=st.integers(1, 2),
    corrector=st.sampled_from([1, 2]),
    granted=st.lists(
        st.tuples(st.integers(-10, 70), st.sampled_from(list(ConsentMethod))), max_size=2
    ),
    order=st.randoms(use_true_random=False),
)
def test_a_final_outcome_scanned_again_and_the_repeats_voided_judges_as_scanned_once(
    day: list[EventDetail],
    which: int,
    times: int,
    corrector: int,
    granted: list[tuple[int, ConsentMethod]],
    order: Any,
) -> None:
    """Rule 3 for a repeated scan voided: scanned again (once or twice), and each repeat
    voided by a correction, in whatever order the parcel's events are handed over, the
    parcel judges as scanned once. No ``correction_review`` (the outcome stands on its
    first scan, judged at the same time); a correction by another courier than the
    scan's is still ``correction_by_another_courier``. Voiding the first scan as well
    needs review, citing it."""
    # the first scan of an outcome (the day's own scans may repeat one already)
    finals = [outcome.first for outcome in final_outcomes(day)]
    consents = [consent(minutes, method) for minutes, method in granted]
    blobs = frozenset({"a" * 64})
    if not finals:
        return
    first = finals[which % len(finals)]
    repeats = [scanned_again(first)]
    if times == 2:  # the third beep: its seq after the second, its time the same
        third = scanned_again(repeats[0])
        repeats.append(third)
    # Corrections come last (seqs after the day's), late in the day: they bound no drop.
    undo = [
        by(corrector, ev(100 + k, EventType.CORRECTION, 120, voids=r))
        for k, r in enumerate(repeats)
    ]
    events = [*day, *repeats, *undo]
    order.shuffle(events)
    judged = evaluate(EXPRESS, events, consents, POLICY, blobs)
    foreign = judged.pop("correction_by_another_courier", None)
    assert judged == evaluate(EXPRESS, day, consents, POLICY, blobs)
    assert (foreign is not None) == (corrector != first.fact.courier_id)
    undo_first = ev(200, EventType.CORRECTION, 121, voids=first)
    reviewed = evaluate(EXPRESS, [*events, undo_first], consents, POLICY, blobs)
    assert first.fact.event_id in reviewed["correction_review"]["event_ids"]


def read_judged_only(event: EventDetail) -> EventDetail:
    """``event`` as a push reads it back (``sync.status.load_events(judged_only=True)``):
    a final outcome whole, any other event its facts alone."""
    return event if event.fact.type in FINAL_OUTCOMES else EventDetail(event.fact)


@st.composite
def days_with_payloads(draw: st.DrawFn) -> list[EventDetail]:
    """``parcel_days`` whose events all carry a payload, those that are no final outcome
    too: a position near the address or far, a PDA time off the corrected one, the time
    of receipt, the bounds a drop keeps, a locker, a point, a proof; with a captured
    consent, a failed attempt, an exception and corrections voiding any of them."""
    day = draw(parcel_days())
    others = [
        EventType.CONSENT_CAPTURED,
        EventType.DELIVERY_ATTEMPT_FAILED,
        EventType.EXCEPTION,
        EventType.COLLECTED_FROM_LOCKER,
        EventType.OUT_FOR_DELIVERY,
    ]
    for seq in range(2, 3 * draw(st.integers(1, 7)) + 1, 3):  # the seqs parcel_days skips
        kind = draw(st.sampled_from(others))
        details = {"locker_id": "L-1", "compartment": "4", "point_id": "PP-1", **POD}
        day.append(by(draw(st.sampled_from([1, 2])), ev(seq, kind, draw(st.integers(0, 60)))))
        day[-1] = dataclasses.replace(day[-1], details=details)
    voided = st.lists(st.sampled_from(day), max_size=2, unique_by=lambda e: e.fact.event_id)
    for k, target in enumerate(draw(voided) if day else []):
        day.append(ev(100 + k, EventType.CORRECTION, 90, voids=target, reason="mis-tap"))
    skews = st.sampled_from([0, -45, 45])
    return [
        dataclasses.replace(
            event,
            lat=draw(st.sampled_from([31.2304, 31.2404])),
            lon=121.4737,
            occurred_at_device=event.fact.occurred_at + dt.timedelta(minutes=draw(skews)),
            received_at=T + dt.timedelta(minutes=draw(st.sampled_from([61, 200]))),
            latest_of_earlier_seqs=draw(st.sampled_from([None, T + dt.timedelta(minutes=70)])),
            earliest_of_later_seqs=draw(st.sampled_from([None, T - dt.timedelta(minutes=10)])),
        )
        for event in day
    ]


@given(
    day=days_with_payloads(),
    granted=st.lists(
        st.tuples(st.integers(-10, 70), st.sampled_from(list(ConsentMethod)), st.integers(0, 90)),
        max_size=2,
    ),
    service_class=st.sampled_from([ServiceClass.EXPRESS, ServiceClass.PARCEL]),
)
def test_the_rules_read_the_payload_of_final_outcomes_alone(
    day: list[EventDetail],
    granted: list[tuple[int, ConsentMethod, int]],
    service_class: ServiceClass,
) -> None:
    """A push judges a parcel on its history read back with the payload of its final
    outcomes alone (``load_events(judged_only=True)``: a PDA that scanned it 25,000 times
    made each push convert every column of every event). That is sound only while no
    rule, and nothing a push works out from the history after them (the folding of
    repeats, which scans an outcome's recipient was told of), reads the position, the
    details or the times of any other event: a rule that did would judge on ``{}`` and
    None, silently. Every such reading here is the same on both."""
    parcel = ParcelFacts(service_class, lat=31.2304, lon=121.4737)
    consents = [
        consent(minutes, method, revoked_at=T + dt.timedelta(minutes=minutes + lasted))
        for minutes, method, lasted in granted
    ]
    blobs = frozenset({"a" * 64})
    lean = [read_judged_only(e) for e in day]
    assert evaluate(parcel, lean, consents, POLICY, blobs) == evaluate(
        parcel, day, consents, POLICY, blobs
    )
    whole, judged = History(day), History(lean)
    assert judged.voids == whole.voids

    def ids(folding: dict[int, EventDetail]) -> dict[int, int]:
        return {scan: first.fact.event_id for scan, first in folding.items()}

    assert ids(judged.first_scans) == ids(whole.first_scans)
    assert judged.scans_of_outcomes == whole.scans_of_outcomes
    for event in day:
        event_id = event.fact.event_id
        assert judged.scans_ever(event_id) == whole.scans_ever(event_id)
        if event_id in whole.voids:
            assert judged.stands_on_another_scan(event_id) == whole.stands_on_another_scan(
                event_id
            )
    new = {e.fact.event_id for e in day[-2:]}
    assert refolded(lean, new) == refolded(day, new)
