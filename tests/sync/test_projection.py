"""Parcel status is a projection: arrival order never changes it (pure, no database)."""

import datetime as dt
import uuid

from hypothesis import given
from hypothesis import strategies as st

from models import EventType, ParcelStatus
from sync.projection import EventFact, ordered, project, voided_by

T0 = dt.datetime(2026, 11, 23, 9, 0, tzinfo=dt.UTC)
_ids = iter(range(1, 10**9))


def fact(
    seq: int,
    type: EventType,
    minutes: float,
    device: str = "PDA-1",
    courier: int = 1,
    voids: EventFact | None = None,
) -> EventFact:
    return EventFact(
        event_id=next(_ids),
        device_id=device,
        seq=seq,
        type=type,
        occurred_at=T0 + dt.timedelta(minutes=minutes),
        client_event_id=uuid.uuid4(),
        courier_id=courier,
        voids_client_event_id=voids.client_event_id if voids else None,
    )


def test_the_last_event_decides_the_status() -> None:
    facts = [
        fact(1, EventType.CHECKED_OUT, 0),
        fact(2, EventType.OUT_FOR_DELIVERY, 5),
        fact(3, EventType.DELIVERED, 30),
    ]
    projection = project(facts[::-1])
    assert projection.status == ParcelStatus.DELIVERED
    assert projection.status_at == T0 + dt.timedelta(minutes=30)


def test_within_a_device_seq_order_wins_over_a_clock_that_went_backwards() -> None:
    delivered = fact(1, EventType.DELIVERED, 30)
    returned = fact(2, EventType.RETURNED_TO_STATION, 10)  # clock jumped back
    assert project([returned, delivered]).status == ParcelStatus.RETURNED


def test_across_devices_the_corrected_time_orders_events() -> None:
    courier_a = fact(1, EventType.CHECKED_OUT, 0, device="A", courier=1)
    courier_b = fact(1, EventType.CHECKED_OUT, 60, device="B", courier=2)
    projection = project([courier_b, courier_a])
    assert projection.holder_courier_id == 2
    later_a = fact(2, EventType.DELIVERED, 90, device="A", courier=1)
    assert project([courier_b, later_a, courier_a]).status == ParcelStatus.DELIVERED


def test_a_correction_voids_an_earlier_event_of_its_device_which_stays_visible() -> None:
    out = fact(1, EventType.OUT_FOR_DELIVERY, 0)
    delivered = fact(2, EventType.DELIVERED, 10)
    correction = fact(3, EventType.CORRECTION, 11, voids=delivered)
    projection = project([correction, delivered, out])
    assert projection.status == ParcelStatus.OUT_FOR_DELIVERY
    assert projection.voided_by == {delivered.event_id: correction.event_id}
    assert delivered.event_id in projection.order


def test_corrections_that_cannot_apply_have_no_effect() -> None:
    delivered = fact(2, EventType.DELIVERED, 10)
    earlier_correction = fact(1, EventType.CORRECTION, 5, voids=delivered)  # lower seq
    other_device = fact(3, EventType.CORRECTION, 11, device="PDA-2", voids=delivered)
    assert voided_by([delivered, earlier_correction, other_device]) == {}
    first = fact(4, EventType.CORRECTION, 12, voids=delivered)
    correction_of_correction = fact(5, EventType.CORRECTION, 13, voids=first)
    assert voided_by([delivered, first, correction_of_correction]) == {
        delivered.event_id: first.event_id
    }


def test_consent_and_corrections_do_not_change_the_status() -> None:
    facts = [fact(1, EventType.CHECKED_OUT, 0), fact(2, EventType.CONSENT_CAPTURED, 5)]
    assert project(facts).status == ParcelStatus.CHECKED_OUT


TYPES = st.sampled_from(list(EventType))


@st.composite
def histories(draw: st.DrawFn) -> list[EventFact]:
    facts: list[EventFact] = []
    for device in draw(st.lists(st.sampled_from(["A", "B", "C"]), min_size=1, unique=True)):
        for seq in range(1, draw(st.integers(1, 6)) + 1):
            event_type = draw(TYPES)
            target = None
            if event_type == EventType.CORRECTION and facts:
                target = draw(st.sampled_from(facts))
            facts.append(
                fact(seq, event_type, draw(st.integers(0, 120)), device=device, voids=target)
            )
    return facts


@given(histories(), st.randoms())
def test_arrival_order_never_changes_the_projection(facts: list[EventFact], random) -> None:
    shuffled = list(facts)
    random.shuffle(shuffled)
    a, b = project(facts), project(shuffled)
    assert (a.status, a.status_at, a.holder_courier_id, a.voided_by, a.order) == (
        b.status,
        b.status_at,
        b.holder_courier_id,
        b.voided_by,
        b.order,
    )


@given(histories())
def test_each_device_keeps_its_seq_order(facts: list[EventFact]) -> None:
    seen: dict[str, int] = {}
    for item in ordered(facts):
        assert item.seq > seen.get(item.device_id, 0)
        seen[item.device_id] = item.seq
