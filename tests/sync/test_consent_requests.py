"""Consent requests and the announcements the outbox carries, without Flask."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from courier_api.api.webhooks.schemas import WebhookBalance
from models import (
    AuditEntry,
    ConsentRequest,
    ConsentRequestStatus,
    FeedChange,
    FeedKind,
    Flag,
    OutboxMessage,
    ScanEvent,
    ServiceClass,
    WebhookDelivery,
    WebhookSubscription,
)
from models.enums import ConsentChannel, ConsentMethod, ConsentScope, FlagSeverity, FlagStatus
from sync import audit, consent_requests, consents, flags, shifts
from sync.consents import ConsentRules
from sync.errors import Conflict
from sync.events import EventRules
from sync.ingest import IngestRules, PushBatch, Pusher, ingest
from sync.outbox import TOPICS
from sync.reports import issue_due_reports
from sync.shifts import ShiftRules
from sync.status import rejudge_for_consent
from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy
from tests import factories
from tests.conftest import World

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
POLICY = TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS)
RULES = IngestRules(events=EventRules(tracking=POLICY))
CONSENT_RULES = ConsentRules(tracking=POLICY, phone_region="CN")


def subscribe(session: Session, *topics: str, station_id: int | None = None) -> int:
    subscription = WebhookSubscription(
        url="http://127.0.0.1:9/hook",
        topics=list(topics or TOPICS),
        station_id=station_id,
        secret="s" * 43,
    )
    session.add(subscription)
    session.commit()
    return subscription.id


def messages(session: Session, topic: str) -> list[OutboxMessage]:
    return list(
        session.scalars(
            select(OutboxMessage).where(OutboxMessage.topic == topic).order_by(OutboxMessage.id)
        )
    )


class Pda:
    def __init__(self, session: Session, world: World, skew: dt.timedelta = dt.timedelta()):
        self.session = session
        self.pusher = Pusher(world.device.id, world.station.id, world.courier.id)
        self.skew = skew
        self.seq = 0

    def event(self, tracking_no: str, type: str, minutes: float, **fields: Any) -> dict:
        self.seq += 1
        at = NOW - dt.timedelta(hours=1) + dt.timedelta(minutes=minutes) + self.skew
        return factories.event(self.seq, tracking_no, type, occurred_at=at, **fields)

    def push(self, events: list[dict], received_at: dt.datetime = NOW) -> dict[str, Any]:
        receipt = ingest(
            session=self.session,
            batch=PushBatch(self.pusher.device_id, uuid.uuid4(), received_at + self.skew, events),
            pusher=self.pusher,
            rules=RULES,
            received_at=received_at,
        )
        self.session.commit()
        return receipt


@pytest.fixture
def pda(session: Session, world: World) -> Pda:
    return Pda(session, world)


@pytest.fixture
def parcel(session: Session, world: World) -> str:
    tracking_no = factories.parcel(session, world.station).tracking_no
    session.commit()
    return tracking_no


def request_of(session: Session) -> ConsentRequest:
    return session.scalars(select(ConsentRequest)).one()


def test_a_request_from_the_pda_is_recorded_and_announced_with_the_recipients_phone(
    session: Session, world: World, parcel: str
) -> None:
    subscribe(session, "consent.requested")
    pda = Pda(session, world, skew=dt.timedelta(minutes=7))  # a PDA 7 minutes fast
    asked_at = NOW - dt.timedelta(minutes=10)
    event = pda.event(parcel, "checked_out", 0)
    request_event = pda.event(
        parcel,
        "consent_requested",
        50,
        request={
            "method": "locker",
            "point_id": "L-9",
            "channel": "sms",
            "expires_at": (asked_at + pda.skew + dt.timedelta(minutes=20)).isoformat(),
        },
    )
    receipt = pda.push([event, request_event])
    assert [r["status"] for r in receipt["results"]] == ["applied", "applied"]
    request = request_of(session)
    assert request.status == ConsentRequestStatus.PENDING
    assert (request.method, request.point_id, request.channel) == (
        ConsentMethod.LOCKER,
        "L-9",
        ConsentChannel.SMS,
    )
    assert request.requested_at == asked_at  # corrected clock
    assert request.expires_at == asked_at + dt.timedelta(minutes=20)
    assert request.client_event_id == uuid.UUID(request_event["client_event_id"])
    [message] = messages(session, "consent.requested")
    assert message.ordering_key == parcel
    assert message.payload["request_id"] == request.id
    assert message.payload["recipient_phone"] == "+8613812345678"
    assert message.payload["expires_at"] == request.expires_at.isoformat()
    assert session.scalars(select(WebhookDelivery.topic)).all() == ["consent.requested"]


def test_a_request_defaults_to_the_ttl_and_nothing_is_written_without_subscribers(
    session: Session, pda: Pda, parcel: str
) -> None:
    pda.push([pda.event(parcel, "consent_requested", 5, request={"method": "any"})])
    request = request_of(session)
    assert request.expires_at - request.requested_at == RULES.consent_request_ttl
    assert session.scalars(select(OutboxMessage)).all() == []


def test_a_request_for_a_parcel_not_taken_in_is_kept_unsent(
    session: Session, world: World, pda: Pda
) -> None:
    subscribe(session)
    pda.push([pda.event(factories.s10(), "consent_requested", 5, request={"method": "any"})])
    request = request_of(session)
    assert request.status == ConsentRequestStatus.UNSENT
    assert "not taken in" in request.status_reason
    assert messages(session, "consent.requested") == []


def test_a_request_that_lapsed_before_it_arrived_is_kept_and_not_sent(
    session: Session, pda: Pda, parcel: str
) -> None:
    subscribe(session)
    event = pda.event(parcel, "consent_requested", 5, request={"method": "locker"})
    pda.push([event], received_at=NOW + dt.timedelta(hours=2))  # offline far too long
    request = request_of(session)
    assert request.status == ConsentRequestStatus.PENDING
    assert consent_requests.effective_status(request, NOW + dt.timedelta(hours=2)) == "expired"
    assert messages(session, "consent.requested") == []


def answer(
    session: Session,
    request: ConsentRequest,
    granted: bool = True,
    now: dt.datetime = NOW,
    **kw: Any,
) -> tuple[ConsentRequest, Any, bool]:
    result = consent_requests.answer_request(
        session=session,
        request=request,
        answer=consent_requests.Answer(granted=granted, channel=ConsentChannel.SMS, **kw),
        rules=CONSENT_RULES,
        answered_by=None,
        now=now,
    )
    if result[1] is not None and result[2]:
        rejudge_for_consent(session=session, consent=result[1], policy=RULES.policy)
    session.commit()
    return result


def test_a_grant_makes_the_drop_that_follows_authorized_and_tells_the_courier(
    session: Session, world: World, pda: Pda, parcel: str
) -> None:
    pda.push(
        [
            pda.event(parcel, "checked_out", 0),
            pda.event(parcel, "consent_requested", 50, request={"method": "locker"}),
        ]
    )
    request, consent, new = answer(session, request_of(session))
    assert new and request.status == ConsentRequestStatus.GRANTED
    assert (consent.tracking_no, consent.method, consent.granted_at) == (
        parcel,
        ConsentMethod.LOCKER,
        NOW,
    )
    assert request.consent_id == consent.id and request.answered_at == NOW
    entries = session.scalars(
        select(FeedChange.kind).where(FeedChange.courier_id == world.courier.id)
    ).all()
    assert FeedKind.CONSENT_REQUEST in entries and FeedKind.CONSENT in entries
    drop = pda.event(parcel, "delivered_to_locker", 65, locker_id="L-1", compartment="4")
    drop["pod"] = {"pickup_code": "8812"}
    pda.push([drop], received_at=NOW + dt.timedelta(minutes=6))
    kinds = set(session.scalars(select(Flag.kind)))
    assert not kinds & {"unauthorized_locker_drop", "consent_after_drop"}, kinds
    # The same grant again changes nothing; a refusal now is a conflict.
    again, same, new_again = answer(session, request)
    assert (same.id, new_again) == (consent.id, False)
    with pytest.raises(Conflict) as info:
        answer(session, request, granted=False)
    assert info.value.code == "consent_request_answered"


def test_a_drop_before_the_grant_is_still_flagged(session: Session, pda: Pda, parcel: str) -> None:
    pda.push(
        [
            pda.event(parcel, "checked_out", 0),
            pda.event(parcel, "consent_requested", 50, request={"method": "locker"}),
            pda.event(parcel, "delivered_to_locker", 55, locker_id="L-1", compartment="4"),
        ]
    )
    answer(session, request_of(session))  # at NOW, after the drop (NOW - 5 min)
    assert "consent_after_drop" in set(session.scalars(select(Flag.kind)))


def test_a_refusal_is_recorded_and_a_late_or_unsent_answer_is_refused(
    session: Session, pda: Pda, parcel: str
) -> None:
    pda.push([pda.event(parcel, "consent_requested", 50, request={"method": "locker"})])
    request = request_of(session)
    refused, consent, new = answer(session, request, granted=False, reason="not home all week")
    assert (refused.status, consent, new) == (ConsentRequestStatus.REFUSED, None, True)
    assert refused.status_reason == "not home all week"
    pda.push([pda.event(parcel, "consent_requested", 55, request={"method": "any"})])
    late = session.scalars(select(ConsentRequest).order_by(ConsentRequest.id.desc())).first()
    with pytest.raises(Conflict) as info:
        answer(session, late, now=NOW + dt.timedelta(hours=1))
    assert info.value.code == "consent_request_expired"
    pda.push([pda.event(factories.s10(), "consent_requested", 56, request={"method": "any"})])
    unsent = session.scalars(select(ConsentRequest).order_by(ConsentRequest.id.desc())).first()
    with pytest.raises(Conflict) as info:
        answer(session, unsent)
    assert info.value.code == "consent_request_unsent"


def test_a_drop_announces_where_the_parcel_is_with_its_pickup_code(
    session: Session, world: World, pda: Pda
) -> None:
    subscribe(session, "parcel.in_locker", "parcel.at_pickup_point")
    ordinary = factories.parcel(session, world.station, service_class=ServiceClass.ORDINARY)
    other = factories.parcel(session, world.station, service_class=ServiceClass.ORDINARY)
    session.commit()
    receipt = pda.push(
        [
            pda.event(ordinary.tracking_no, "checked_out", 0),
            pda.event(
                ordinary.tracking_no,
                "delivered_to_locker",
                10,
                locker_id="L-2",
                compartment="11",
                pod={"pickup_code": "4711"},
            ),
            pda.event(other.tracking_no, "delivered_to_pickup_point", 12, point_id="PP-5"),
        ]
    )
    [locker] = messages(session, "parcel.in_locker")
    assert locker.payload["tracking_no"] == ordinary.tracking_no
    assert (locker.payload["locker_id"], locker.payload["compartment"]) == ("L-2", "11")
    assert locker.payload["pickup_code"] == "4711"
    assert locker.payload["recipient_phone"] == "+8613812345678"
    [point] = messages(session, "parcel.at_pickup_point")
    assert (point.payload["point_id"], point.payload["pickup_code"]) == ("PP-5", None)
    assert receipt["results"][1]["status"] == "applied"


def test_a_drop_voided_after_it_was_announced_is_retracted_once(
    session: Session, world: World, pda: Pda, parcel: str
) -> None:
    """The recipient was told the parcel is in locker L-2; then the courier's correction
    voids that drop (the compartment would not close, the parcel went back in the van).
    The recipient is told it is not there, after the first message (same ordering key),
    once: a second correction of the same drop tells nobody again."""
    subscribe(session, "parcel.in_locker", "parcel.at_pickup_point", "parcel.drop_voided")
    drop = pda.event(
        parcel,
        "delivered_to_locker",
        10,
        locker_id="L-2",
        compartment="11",
        pod={"pickup_code": "4711"},
    )
    pda.push([pda.event(parcel, "checked_out", 0), drop])
    [announced] = messages(session, "parcel.in_locker")
    fix = pda.event(
        parcel, "correction", 12, voids_client_event_id=drop["client_event_id"], reason="jammed"
    )
    pda.push([fix], received_at=NOW + dt.timedelta(minutes=1))
    [retracted] = messages(session, "parcel.drop_voided")
    drop_id, fix_id = (
        session.scalars(
            select(ScanEvent.id).where(
                ScanEvent.client_event_id == uuid.UUID(e["client_event_id"])
            )
        ).one()
        for e in (drop, fix)
    )
    assert retracted.payload == {
        "tracking_no": parcel,
        "station_id": world.station.id,
        "recipient_name": announced.payload["recipient_name"],
        "recipient_phone": "+8613812345678",
        "locker_id": "L-2",
        "compartment": "11",
        "point_id": None,
        "event_id": drop_id,
        "correction_event_id": fix_id,
        "voided_at": (NOW + dt.timedelta(minutes=1)).isoformat(),
    }
    assert announced.payload["event_id"] == drop_id
    assert retracted.ordering_key == announced.ordering_key
    deliveries = session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)).all()
    assert [d.message_id for d in deliveries] == [announced.id, retracted.id]  # in this order
    again = pda.event(
        parcel, "correction", 13, voids_client_event_id=drop["client_event_id"], reason="again"
    )
    pda.push([again])
    assert len(messages(session, "parcel.drop_voided")) == 1


@pytest.mark.parametrize("pushes", [[[0, 1, 2]], [[0, 1], [2]], [[0, 2], [1]], [[2], [0, 1]]])
def test_a_drop_scanned_again_is_announced_once_whichever_scan_arrives_first(
    session: Session, pda: Pda, parcel: str, pushes: list[list[int]]
) -> None:
    """The courier tapped the compartment twice: one drop (``sync.rules.final_outcomes``),
    and its recipient gets one message, however the PDA's queue was split and ordered
    (rule 3): not one per beep."""
    subscribe(session, "parcel.in_locker", "parcel.at_pickup_point")
    place = {"locker_id": "L-2", "compartment": "11", "pod": {"pickup_code": "4711"}}
    events = [
        pda.event(parcel, "checked_out", 0),
        pda.event(parcel, "delivered_to_locker", 10, **place),
        pda.event(parcel, "delivered_to_locker", 11, **place),
    ]
    for minute, batch in enumerate(pushes):
        pda.push([events[i] for i in batch], received_at=NOW + dt.timedelta(minutes=minute))
    assert len(messages(session, "parcel.in_locker")) == 1


@pytest.mark.parametrize("first_voided", ["again", "first"])
def test_a_drop_scanned_again_is_retracted_only_once_no_scan_of_it_stands(
    session: Session, pda: Pda, parcel: str, first_voided: str
) -> None:
    """One tap voided (a mis-tap): the parcel is in the compartment all the same, and its
    recipient is told nothing. The other voided too: the drop is undone, and the
    recipient, told of it by the first scan, is told it is not there, naming the drop as
    it was told of it (``event_id``, the first scan's), whichever scan was voided last:
    a receiver matching the retraction to the announcement by it found none when the
    first scan was voided first."""
    subscribe(session, "parcel.in_locker", "parcel.at_pickup_point", "parcel.drop_voided")
    place = {"locker_id": "L-2", "compartment": "11", "pod": {"pickup_code": "4711"}}
    first = pda.event(parcel, "delivered_to_locker", 10, **place)
    again = pda.event(parcel, "delivered_to_locker", 11, **place)
    pda.push([pda.event(parcel, "checked_out", 0), first, again])
    [announced] = messages(session, "parcel.in_locker")
    order = (again, first) if first_voided == "again" else (first, again)
    for minute, target in enumerate(order, start=1):
        fix = pda.event(
            parcel, "correction", 11 + minute, voids_client_event_id=target["client_event_id"]
        )
        pda.push([{**fix, "reason": "mis-tap"}], received_at=NOW + dt.timedelta(minutes=minute))
        if minute == 1:
            assert messages(session, "parcel.drop_voided") == []
    [retracted] = messages(session, "parcel.drop_voided")
    assert retracted.ordering_key == announced.ordering_key
    assert (retracted.payload["locker_id"], retracted.payload["compartment"]) == ("L-2", "11")
    first_id = session.scalars(
        select(ScanEvent.id).where(
            ScanEvent.client_event_id == uuid.UUID(first["client_event_id"])
        )
    ).one()
    assert announced.payload["event_id"] == retracted.payload["event_id"] == first_id


def test_only_an_announced_drop_is_retracted(
    session: Session, world: World, pda: Pda, parcel: str
) -> None:
    """Nothing to take back: a drop voided in its own push or before it (never
    announced), a correction of an event that is no drop, one with a lower seq than the
    drop (it cannot void it), and a drop of a parcel never taken in (no recipient)."""
    subscribe(session, "parcel.in_locker", "parcel.at_pickup_point", "parcel.drop_voided")
    mistap = pda.event(parcel, "delivered_to_pickup_point", 10, point_id="PP-5")
    pda.push(
        [
            mistap,
            pda.event(
                parcel,
                "correction",
                11,
                voids_client_event_id=mistap["client_event_id"],
                reason="mis-tap",
            ),
        ]
    )
    out = pda.event(parcel, "out_for_delivery", 12)
    pda.push([out])
    pda.push(
        [
            pda.event(
                parcel,
                "correction",
                13,
                voids_client_event_id=out["client_event_id"],
                reason="wrong",
            )
        ]
    )
    early_fix = pda.event(
        parcel, "correction", 14, voids_client_event_id=str(uuid.uuid4()), reason="x"
    )
    stranger = factories.s10()
    unknown_drop = pda.event(stranger, "delivered_to_locker", 15, locker_id="L-9", compartment="1")
    late_drop = pda.event(parcel, "delivered_to_locker", 16, locker_id="L-3", compartment="2")
    early_fix["voids_client_event_id"] = late_drop["client_event_id"]  # seq 14 < 16
    pda.push([unknown_drop, late_drop])  # announced
    pda.push([early_fix])  # recorded before the drop, sent after it: voids nothing
    pda.push(
        [
            pda.event(
                stranger,
                "correction",
                17,
                voids_client_event_id=unknown_drop["client_event_id"],
                reason="x",
            )
        ]
    )
    assert [m.payload["locker_id"] for m in messages(session, "parcel.in_locker")] == ["L-3"]
    assert messages(session, "parcel.drop_voided") == []


def test_a_drop_is_retracted_only_to_whom_it_was_announced(
    session: Session, world: World, pda: Pda
) -> None:
    """Nobody listened when the first drop was made, so nobody is told it is void, even
    a receiver that subscribed since. The second drop, at a pickup point, was announced
    to one receiver of both topics; a receiver of retractions alone, or one limited to
    another station, never got its announcement and is not told either."""
    first, second = (
        factories.parcel(session, world.station, service_class=ServiceClass.ORDINARY).tracking_no
        for _ in range(2)
    )
    session.commit()
    unheard = pda.event(first, "delivered_to_locker", 10, locker_id="L-1", compartment="1")
    pda.push([unheard])
    both = subscribe(session, "parcel.at_pickup_point", "parcel.in_locker", "parcel.drop_voided")
    subscribe(session, "parcel.drop_voided")
    subscribe(session, *TOPICS, station_id=world.other_station.id)
    heard = pda.event(second, "delivered_to_pickup_point", 11, point_id="PP-5")
    pda.push([heard])
    fixes = [
        pda.event(
            tn, "correction", minutes, voids_client_event_id=e["client_event_id"], reason="x"
        )
        for tn, e, minutes in ((first, unheard, 12), (second, heard, 13), (second, heard, 14))
    ]
    pda.push(fixes)  # two corrections of the second drop: the first one voids it
    [retracted] = messages(session, "parcel.drop_voided")
    assert (retracted.payload["tracking_no"], retracted.payload["point_id"]) == (second, "PP-5")
    assert retracted.payload["locker_id"] is None and retracted.payload["compartment"] is None
    voiding = session.scalars(
        select(ScanEvent.id).where(
            ScanEvent.client_event_id == uuid.UUID(fixes[1]["client_event_id"])
        )
    ).one()
    assert retracted.payload["correction_event_id"] == voiding
    receivers = session.scalars(
        select(WebhookDelivery.subscription_id).where(WebhookDelivery.message_id == retracted.id)
    ).all()
    assert receivers == [both]


def test_flags_raised_and_resolved_are_announced_in_order_per_parcel(
    session: Session, world: World, pda: Pda, parcel: str
) -> None:
    subscribe(session, "flag.raised", "flag.resolved")
    pda.push(
        [
            pda.event(parcel, "checked_out", 0),
            pda.event(parcel, "delivered_to_locker", 10, locker_id="L", compartment="1"),
        ]
    )
    raised = messages(session, "flag.raised")
    assert {m.payload["kind"] for m in raised} >= {"unauthorized_locker_drop"}
    assert {m.ordering_key for m in raised} == {parcel}
    flag = session.scalars(select(Flag).where(Flag.kind == "unauthorized_locker_drop")).one()
    flags.resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="called her")
    session.commit()
    [resolved] = messages(session, "flag.resolved")
    assert (resolved.payload["flag_id"], resolved.payload["note"]) == (flag.id, "called her")
    assert resolved.payload["resolved_by"] == world.manager.id
    deliveries = session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)).all()
    assert deliveries[-1].topic == "flag.resolved"  # written after what it resolves


def test_a_flag_the_system_closes_is_announced_with_its_reason(
    session: Session, world: World, pda: Pda, parcel: str
) -> None:
    subscribe(session, "flag.raised", "flag.closed")
    checked_out = pda.event(parcel, "checked_out", 0)
    drop = pda.event(parcel, "delivered_to_locker", 10, locker_id="L", compartment="1")
    pda.push([checked_out, drop])
    flag = session.scalars(select(Flag).where(Flag.kind == "unauthorized_locker_drop")).one()
    assert messages(session, "flag.closed") == []
    # The courier voids the mis-tapped drop: no locker drop, no violation.
    correction = pda.event(
        parcel, "correction", 12, voids_client_event_id=drop["client_event_id"], reason="mis-tap"
    )
    pda.push([correction])
    session.refresh(flag)
    assert flag.status == FlagStatus.CLOSED
    announced = messages(session, "flag.closed")
    # Every flag the correction closed (the drop's other flags too), each once.
    closed_ids = session.scalars(select(Flag.id).where(Flag.status == FlagStatus.CLOSED)).all()
    assert sorted(m.payload["flag_id"] for m in announced) == sorted(closed_ids)
    [closed] = [m for m in announced if m.payload["flag_id"] == flag.id]
    assert closed.payload["kind"] == "unauthorized_locker_drop"
    assert closed.payload["status"] == "closed"
    assert closed.payload["reason"] == flag.closed_reason
    assert closed.ordering_key == parcel  # in order with the flag.raised before it
    deliveries = session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)).all()
    assert [d.topic for d in deliveries][-1] == "flag.closed"


def test_announcements_follow_their_subscriptions_topics_and_stations(
    session: Session, world: World
) -> None:
    own = subscribe(session, "flag.raised", station_id=world.station.id)
    other = subscribe(session, "flag.raised", station_id=world.other_station.id)
    everywhere = subscribe(session, "flag.raised")
    subscribe(session, "report.ready")
    flags.raise_flag(
        session=session,
        kind="stale_device",
        severity=FlagSeverity.WARNING,
        subject=flags.FlagSubject("device", world.device.id),
        station_id=world.station.id,
        evidence={},
    )
    session.commit()
    [message] = messages(session, "flag.raised")
    assert message.ordering_key == f"device:{world.device.id}"
    receivers = set(session.scalars(select(WebhookDelivery.subscription_id)))
    assert receivers == {own, everywhere} and other not in receivers


def test_a_change_rolled_back_announces_nothing(session: Session, pda: Pda, parcel: str) -> None:
    subscribe(session)
    ingest(
        session=session,
        batch=PushBatch(
            pda.pusher.device_id,
            uuid.uuid4(),
            NOW,
            [pda.event(parcel, "delivered_to_locker", 5, locker_id="L", compartment="1")],
        ),
        pusher=pda.pusher,
        rules=RULES,
        received_at=NOW,
    )
    assert session.scalars(select(OutboxMessage)).all() != []
    session.rollback()
    assert session.scalars(select(OutboxMessage)).all() == []
    assert session.scalars(select(WebhookDelivery)).all() == []


def test_an_unbalanced_close_and_an_issued_report_are_announced(
    session: Session, world: World, pda: Pda, parcel: str
) -> None:
    subscribe(session, "shift.unbalanced", "report.ready")
    shift = shifts.open_shift(
        session=session,
        device=world.device,
        courier_id=world.courier.id,
        rules=ShiftRules(),
        now=NOW - dt.timedelta(hours=2),
    )
    session.commit()
    pda.push([pda.event(parcel, "checked_out", 0)])
    shifts.close_shift(session=session, shift=shift, closed_by=world.courier.id, now=NOW)
    session.commit()
    [unbalanced] = messages(session, "shift.unbalanced")
    assert unbalanced.payload["shift_id"] == shift.id
    # The balance as documented: not every parcel's outcome, which a sign-off keeps.
    assert set(unbalanced.payload["balance"]) <= set(WebhookBalance().fields)
    assert unbalanced.payload["balance"]["missing"] == 1
    assert unbalanced.payload["balance"]["discrepancies"][0]["kind"] == "missing_at_handover"
    world.station.created_at = NOW - dt.timedelta(days=2)
    session.commit()
    issued = issue_due_reports(
        session=session, now=NOW + dt.timedelta(days=1), deadlines={c: 24 for c in ServiceClass}
    )
    session.commit()
    ready = messages(session, "report.ready")
    assert {m.payload["report_id"] for m in ready} == {r["id"] for r in issued["issued"]}
    assert all(m.payload["url"] == f"/api/v1/reports/{m.payload['report_id']}" for m in ready)


def test_a_correction_voiding_the_request_cancels_it_whenever_it_arrives(
    session: Session, world: World, pda: Pda, parcel: str
) -> None:
    subscribe(session, "consent.requested")
    asked = pda.event(parcel, "consent_requested", 50, request={"method": "locker"})
    pda.push([asked])
    voided = pda.event(
        parcel, "correction", 51, voids_client_event_id=asked["client_event_id"], reason="mis-tap"
    )
    pda.push([voided])
    request = request_of(session)
    assert request.status == ConsentRequestStatus.CANCELLED
    with pytest.raises(Conflict) as info:
        answer(session, request)
    assert info.value.code == "consent_request_cancelled"
    # In one push, or the correction first: the request is never sent at all.
    again = pda.event(parcel, "consent_requested", 52, request={"method": "any"})
    fix = pda.event(
        parcel, "correction", 53, voids_client_event_id=again["client_event_id"], reason="oops"
    )
    pda.push([fix])
    pda.push([again])
    latest = session.scalars(select(ConsentRequest).order_by(ConsentRequest.id.desc())).first()
    assert latest.status == ConsentRequestStatus.CANCELLED
    assert len(messages(session, "consent.requested")) == 1  # only the first was sent


@pytest.mark.parametrize("one_push", [True, False])
@pytest.mark.parametrize("asked_for", ["not_taken_in", "other_station", "no_phone"])
def test_a_request_never_sent_is_cancelled_by_its_correction_however_the_pda_pushes(
    session: Session, world: World, pda: Pda, asked_for: str, one_push: bool
) -> None:
    """A request kept ``unsent`` (nobody to ask) whose event a correction voids ends
    cancelled in one push or two (rule 3): before, a correction in a later push left it
    ``unsent``, as if the courier still asked."""
    if asked_for == "not_taken_in":
        tracking_no = factories.s10()
    elif asked_for == "other_station":
        tracking_no = factories.parcel(session, world.other_station).tracking_no
    else:
        tracking_no = factories.parcel(session, world.station, phone=None).tracking_no
    session.commit()
    asked = pda.event(tracking_no, "consent_requested", 50, request={"method": "locker"})
    fix = pda.event(
        tracking_no, "correction", 51, voids_client_event_id=asked["client_event_id"], reason="x"
    )
    for events in ([asked, fix],) if one_push else ([asked], [fix]):
        pda.push(events)
    request = request_of(session)
    assert (request.status, request.status_reason) == (
        ConsentRequestStatus.CANCELLED,
        consent_requests.VOIDED_REASON,
    )
    assert request.answered_at is None  # never asked: nobody answered, nothing lapsed


@pytest.mark.parametrize("correction_first", [False, True])
def test_a_correction_numbered_before_the_request_it_names_voids_nothing(
    session: Session, pda: Pda, parcel: str, correction_first: bool
) -> None:
    """Only an earlier event can be corrected (the projection ignores the rest): a
    correction whose seq is below the request's, naming it (a PDA re-using an id),
    leaves the request pending in either order of arrival."""
    asked = pda.event(parcel, "consent_requested", 50, request={"method": "locker"})
    fix = pda.event(
        parcel, "correction", 51, voids_client_event_id=asked["client_event_id"], reason="x"
    )
    asked["seq"], fix["seq"] = fix["seq"], asked["seq"]
    for events in ([fix], [asked]) if correction_first else ([asked], [fix]):
        pda.push(events)
    assert request_of(session).status == ConsentRequestStatus.PENDING


def test_a_request_for_another_stations_parcel_is_kept_unsent(
    session: Session, world: World, pda: Pda
) -> None:
    subscribe(session)
    foreign = factories.parcel(session, world.other_station).tracking_no
    session.commit()
    pda.push([pda.event(foreign, "consent_requested", 5, request={"method": "any"})])
    request = request_of(session)
    assert (request.status, request.status_reason) == (
        ConsentRequestStatus.UNSENT,
        "the parcel belongs to another station",
    )
    assert messages(session, "consent.requested") == []


def test_an_answer_naming_another_point_is_a_consent_for_that_point(
    session: Session, pda: Pda, parcel: str
) -> None:
    pda.push(
        [
            pda.event(
                parcel, "consent_requested", 50, request={"method": "locker", "point_id": "L-77"}
            )
        ]
    )
    _, consent, _ = answer(session, request_of(session), point_id="L-80")
    assert (consent.method, consent.point_id) == (ConsentMethod.LOCKER, "L-80")


def test_an_answer_restating_the_method_asked_keeps_the_point_asked_for(
    session: Session, pda: Pda, parcel: str
) -> None:
    """Asked for locker L-1, the channel answers ``method: locker`` and no point: the
    recipient agreed to L-1, not to any locker, and a drop at L-2 is not authorized."""
    pda.push(
        [
            pda.event(parcel, "checked_out", 0),
            pda.event(
                parcel, "consent_requested", 50, request={"method": "locker", "point_id": "L-1"}
            ),
        ]
    )
    _, consent, _ = answer(session, request_of(session), method=ConsentMethod.LOCKER)
    assert (consent.method, consent.point_id) == (ConsentMethod.LOCKER, "L-1")
    drop = pda.event(parcel, "delivered_to_locker", 65, locker_id="L-2", compartment="4")
    drop["pod"] = {"pickup_code": "8812"}
    pda.push([drop], received_at=NOW + dt.timedelta(minutes=6))
    assert "unauthorized_locker_drop" in set(session.scalars(select(Flag.kind)))


def test_an_answer_dated_before_the_request_is_refused(
    session: Session, pda: Pda, parcel: str
) -> None:
    from sync.errors import InvalidInput

    pda.push([pda.event(parcel, "consent_requested", 50, request={"method": "locker"})])
    with pytest.raises(InvalidInput) as info:
        answer(session, request_of(session), granted_at=NOW - dt.timedelta(days=400))
    assert info.value.code == "granted_before_request"


def test_a_request_whose_expiry_the_pda_set_before_it_lapses_after_the_ttl_instead(
    session: Session, pda: Pda, parcel: str
) -> None:
    asked_at = NOW - dt.timedelta(hours=1) + dt.timedelta(minutes=50)
    event = pda.event(
        parcel,
        "consent_requested",
        50,
        request={"method": "locker", "channel": "app", "expires_at": "2020-01-01T00:00:00Z"},
    )
    receipt = pda.push([event])
    assert receipt["results"][0]["status"] == "applied"
    request = request_of(session)
    assert request.expires_at == asked_at + RULES.consent_request_ttl
    assert request.channel == ConsentChannel.APP


def test_a_drop_voided_by_a_correction_already_held_is_never_announced(
    session: Session, world: World, pda: Pda, parcel: str
) -> None:
    """As a voided request is never sent: a drop whose correction arrives with it, or
    before it, is a mis-tap the recipient must not be sent to a locker for."""
    subscribe(session, "parcel.in_locker", "parcel.at_pickup_point")
    drop = pda.event(
        parcel,
        "delivered_to_locker",
        10,
        locker_id="L-2",
        compartment="11",
        pod={"pickup_code": "1"},
    )
    fix = pda.event(
        parcel, "correction", 11, voids_client_event_id=drop["client_event_id"], reason="mis-tap"
    )
    pda.push([drop, fix])  # in one push
    other = pda.event(parcel, "delivered_to_pickup_point", 12, point_id="PP-5")
    undo = pda.event(
        parcel, "correction", 13, voids_client_event_id=other["client_event_id"], reason="mis-tap"
    )
    pda.push([undo])  # the correction first
    pda.push([other])
    assert messages(session, "parcel.in_locker") == []
    assert messages(session, "parcel.at_pickup_point") == []
    # A drop still standing is announced, also next to a correction of another event.
    kept = pda.event(parcel, "delivered_to_locker", 14, locker_id="L-3", compartment="2")
    pda.push([kept])
    [announced] = messages(session, "parcel.in_locker")
    assert announced.payload["locker_id"] == "L-3"


def test_a_request_cancelled_while_it_waits_is_announced_to_the_channel(
    session: Session, world: World, pda: Pda, parcel: str
) -> None:
    """The channel asked the recipient; the courier's correction voids the request: the
    channel hears of it (``consent.request_cancelled``, after the question for that
    parcel) and stops asking, rather than learning it from a 409 on the answer. A
    request voided before it was ever sent is not announced as cancelled."""
    subscribe(session, "consent.requested", "consent.request_cancelled")
    asked = pda.event(parcel, "consent_requested", 50, request={"method": "locker"})
    pda.push([asked])
    fix = pda.event(
        parcel, "correction", 51, voids_client_event_id=asked["client_event_id"], reason="x"
    )
    pda.push([fix])
    request = request_of(session)
    [message] = messages(session, "consent.request_cancelled")
    assert message.ordering_key == parcel
    assert message.payload == {
        "request_id": request.id,
        "tracking_no": parcel,
        "station_id": world.station.id,
        "cancelled_at": NOW.isoformat(),
        "reason": "voided by a correction from the PDA",
    }
    [question] = messages(session, "consent.requested")
    deliveries = session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)).all()
    assert [d.message_id for d in deliveries] == [question.id, message.id]
    again = pda.event(parcel, "consent_requested", 52, request={"method": "any"})
    oops = pda.event(
        parcel, "correction", 53, voids_client_event_id=again["client_event_id"], reason="x"
    )
    pda.push([again, oops])
    assert len(messages(session, "consent.request_cancelled")) == 1


OUTCOMES = (
    "consent.requested",
    "consent.request_granted",
    "consent.request_refused",
    "consent.request_lapsed",
    "consent.request_revoked",
)


def outcomes(session: Session) -> list[tuple[str, int]]:
    """The outcome messages written, oldest first: (topic, request id)."""
    return [
        (m.topic, m.payload["request_id"])
        for m in session.scalars(
            select(OutboxMessage)
            .where(OutboxMessage.topic.in_(OUTCOMES[1:]))
            .order_by(OutboxMessage.created_at, OutboxMessage.topic)
        )
    ]


def test_the_channel_hears_each_requests_outcome_once(
    session: Session, world: World, pda: Pda, parcel: str
) -> None:
    """The SMS gateway asked the recipient and showed "waiting for your answer"; it heard
    nothing when another channel's answer granted it, the recipient refused another,
    a third lapsed unanswered or the consent granted was revoked, and kept showing the
    stale question. Each outcome is announced once (retries of the answer, a revocation
    sent twice, the lapse job run again announce nothing), after the question (the
    parcel's key)."""
    subscribe(session, *OUTCOMES)
    pda.push(
        [
            pda.event(parcel, "consent_requested", 50, request={"method": "locker"}),
            pda.event(parcel, "consent_requested", 51, request={"method": "any"}),
            pda.event(parcel, "consent_requested", 52, request={"method": "pickup_point"}),
        ]
    )
    granted, refused, lapsed = session.scalars(
        select(ConsentRequest).order_by(ConsentRequest.id)
    ).all()
    _, consent, _ = answer(session, granted, point_id="L-3")
    answer(session, granted, point_id="L-3")  # the channel's retry
    answer(session, refused, granted=False, reason="ring the bell")
    answer(session, refused, granted=False, reason="ring the bell")
    assert outcomes(session) == [
        ("consent.request_granted", granted.id),
        ("consent.request_refused", refused.id),
    ]
    [grant] = messages(session, "consent.request_granted")
    assert grant.ordering_key == parcel and grant.station_id == world.station.id
    assert grant.payload == {
        "request_id": granted.id,
        "tracking_no": parcel,
        "station_id": world.station.id,
        "consent_id": consent.id,
        "method": "locker",
        "point_id": "L-3",
        "channel": "sms",
        "granted_at": NOW.isoformat(),
        "expires_at": None,
        "answered_at": NOW.isoformat(),
    }
    [refusal] = messages(session, "consent.request_refused")
    assert (refusal.payload["reason"], refusal.payload["refused_at"]) == (
        "ring the bell",
        NOW.isoformat(),
    )

    revocation = consents.Revocation(revoked_by=None, reason="changed my mind")
    assert consents.revoke(session=session, consent=consent, revocation=revocation)
    assert not consents.revoke(session=session, consent=consent, revocation=revocation)
    session.commit()
    [revoked] = messages(session, "consent.request_revoked")
    assert revoked.payload["consent_id"] == consent.id
    assert revoked.payload["reason"] == "changed my mind"
    assert revoked.payload["revoked_at"] == consent.revoked_at.isoformat()

    before = lapsed.expires_at - dt.timedelta(seconds=1)
    assert consent_requests.announce_lapsed(session=session, now=before)["announced"] == 0
    later = lapsed.expires_at + dt.timedelta(minutes=1)
    run = consent_requests.announce_lapsed(session=session, now=later)
    assert (run["announced"], run["request_ids"]) == (1, [lapsed.id])
    assert consent_requests.announce_lapsed(session=session, now=later)["announced"] == 0
    [lapse] = messages(session, "consent.request_lapsed")
    assert lapse.payload == {
        "request_id": lapsed.id,
        "tracking_no": parcel,
        "station_id": world.station.id,
        "expires_at": lapsed.expires_at.isoformat(),
    }
    assert sorted(outcomes(session)) == sorted(
        [
            ("consent.request_granted", granted.id),
            ("consent.request_refused", refused.id),
            ("consent.request_revoked", granted.id),
            ("consent.request_lapsed", lapsed.id),
        ]
    )
    # Each after its question, for the same subscription and key.
    questions = {m.id for m in messages(session, "consent.requested")}
    deliveries = session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)).all()
    assert {d.message_id for d in deliveries[:3]} == questions
    assert {d.ordering_key for d in deliveries} == {parcel}


def test_a_request_never_sent_is_not_announced_as_lapsed(
    session: Session, pda: Pda, parcel: str
) -> None:
    """Lapsed before it reached the server (the PDA offline too long), the request was
    never asked: the channel is not told it lapsed, and the job marks it done."""
    subscribe(session, *OUTCOMES)
    event = pda.event(parcel, "consent_requested", 5, request={"method": "locker"})
    pda.push([event], received_at=NOW + dt.timedelta(hours=2))
    run = consent_requests.announce_lapsed(session=session, now=NOW + dt.timedelta(hours=3))
    assert (run["announced"], run["never_sent"]) == (0, 1)
    assert messages(session, "consent.request_lapsed") == []
    assert request_of(session).lapse_announced_at is not None


def test_a_refusal_sent_again_with_another_reason_is_a_conflict(
    session: Session, pda: Pda, parcel: str
) -> None:
    """The recipient said "no, ring the bell"; the gateway, its answer lost, sent the
    refusal again with "no, I am on holiday, return it" and was told it was recorded,
    while the parcel keeps the first reason. The same refusal again (or without a
    reason) is a retry; with another reason, a conflict (rule 2), the first kept."""
    pda.push([pda.event(parcel, "consent_requested", 50, request={"method": "locker"})])
    request = request_of(session)
    answer(session, request, granted=False, reason="ring the bell")
    for same in ("ring the bell", None):
        _, _, new = answer(session, request, granted=False, reason=same)
        assert not new
    with pytest.raises(Conflict) as info:
        answer(session, request, granted=False, reason="on holiday, return it")
    assert info.value.code == "consent_request_answered"
    assert "refused with another reason" in info.value.message
    session.rollback()
    assert request_of(session).status_reason == "ring the bell"


def test_a_request_voided_after_it_lapsed_is_announced_as_lapsed_not_cancelled(
    session: Session, pda: Pda, parcel: str
) -> None:
    """The courier's correction of a request reached the server after the request had
    lapsed, before the lapse job ran: its end, as the channel hears it, is the lapse,
    once; not a cancellation of a question that was over."""
    subscribe(session, *OUTCOMES, "consent.request_cancelled")
    asked = pda.event(parcel, "consent_requested", 50, request={"method": "locker"})
    pda.push([asked])
    request = request_of(session)
    fix = pda.event(
        parcel, "correction", 51, voids_client_event_id=asked["client_event_id"], reason="x"
    )
    pda.push([fix], received_at=request.expires_at + dt.timedelta(seconds=30))
    assert request_of(session).status == ConsentRequestStatus.CANCELLED
    assert messages(session, "consent.request_cancelled") == []
    [lapse] = messages(session, "consent.request_lapsed")
    assert lapse.payload["request_id"] == request.id
    later = request.expires_at + dt.timedelta(minutes=5)
    assert consent_requests.announce_lapsed(session=session, now=later)["announced"] == 0
    assert len(messages(session, "consent.request_lapsed")) == 1


def test_an_answer_taking_a_consent_revoked_since_reads_revoked(
    session: Session, world: World, pda: Pda, parcel: str
) -> None:
    """The gateway recorded the recipient's "yes" alone, the recipient took it back, and
    then the gateway sent the same "yes" as the answer to the courier's request: the
    answer takes that consent (a retry of it), revoked. The request read ``granted``, and
    the courier's PDA was told to leave the parcel in the locker, a drop then flagged
    unauthorized. It reads ``revoked`` with the consent's time, and the channel hears
    both, the grant and then the revocation."""
    subscribe(session, *OUTCOMES)
    pda.push([pda.event(parcel, "consent_requested", 50, request={"method": "locker"})])
    request = request_of(session)
    alone = consents.grant_once(
        session=session,
        draft=consents.ConsentDraft(
            scope=ConsentScope.PARCEL,
            method=ConsentMethod.LOCKER,
            channel=ConsentChannel.SMS,
            granted_at=NOW,
            tracking_no=parcel,
            client_consent_id="sms-21",
        ),
        rules=CONSENT_RULES,
        created_by=None,
        now=NOW,
    ).consent
    consents.revoke(session=session, consent=alone, revocation=consents.Revocation(None))
    session.commit()
    answered, consent, new = answer(session, request, client_consent_id="sms-21")
    assert new and consent.id == alone.id
    assert answered.status == ConsentRequestStatus.REVOKED
    assert answered.revoked_at == alone.revoked_at
    assert [t for t, _ in outcomes(session)] == [
        "consent.request_granted",
        "consent.request_revoked",
    ]


@pytest.mark.parametrize("granted", [True, False])
def test_no_answer_counts_once_the_lapse_was_announced(
    session: Session, pda: Pda, parcel: str, granted: bool
) -> None:
    """The lapse job (the scheduler's clock) announced the request lapsed and the channel
    stopped asking; an answer read its time just before (a web worker whose clock runs a
    little behind, or one that waited for the job's lock on the request) and was then
    recorded: the channel heard ``consent.request_lapsed`` and then
    ``consent.request_granted`` for the same request, and the courier's PDA was told to
    leave the parcel. Once the lapse is announced, an answer is the 409
    ``consent_request_expired``, whatever its clock says, and the channel hears nothing
    more."""
    subscribe(session, *OUTCOMES)
    pda.push([pda.event(parcel, "consent_requested", 50, request={"method": "locker"})])
    request = request_of(session)
    run = consent_requests.announce_lapsed(session=session, now=request.expires_at)
    assert run["announced"] == 1
    just_before = request.expires_at - dt.timedelta(seconds=1)
    with pytest.raises(Conflict) as info:
        answer(session, request, granted=granted, now=just_before)
    assert info.value.code == "consent_request_expired"
    session.rollback()
    assert request_of(session).status == ConsentRequestStatus.PENDING
    assert consent_requests.effective_status(request_of(session), just_before) == "expired"
    for status, listed in (("expired", [request.id]), ("pending", [])):
        found = consent_requests.list_requests(session=session, status=status, now=just_before)
        assert [r.id for r in found] == listed, status
    assert outcomes(session) == [("consent.request_lapsed", request.id)]


def test_a_request_voided_after_its_lapse_was_announced_is_not_announced_again(
    session: Session, pda: Pda, parcel: str
) -> None:
    """The lapse job announced the request lapsed; the courier's correction voiding it
    reached a web worker whose clock reads a moment before the expiry: the channel was
    then told ``consent.request_cancelled`` for a question whose end it had heard. The
    request is cancelled (the PDA voided it), and the channel hears nothing more."""
    subscribe(session, *OUTCOMES, "consent.request_cancelled")
    asked = pda.event(parcel, "consent_requested", 50, request={"method": "locker"})
    pda.push([asked])
    request = request_of(session)
    assert (
        consent_requests.announce_lapsed(session=session, now=request.expires_at)["announced"] == 1
    )
    fix = pda.event(
        parcel, "correction", 51, voids_client_event_id=asked["client_event_id"], reason="x"
    )
    pda.push([fix], received_at=request.expires_at - dt.timedelta(seconds=1))
    assert request_of(session).status == ConsentRequestStatus.CANCELLED
    assert messages(session, "consent.request_cancelled") == []
    assert outcomes(session) == [("consent.request_lapsed", request.id)]


def test_a_later_refusal_withdrawing_the_consent_a_request_granted_revokes_that_request(
    session: Session, world: World, pda: Pda, parcel: str
) -> None:
    """The recipient said yes to the courier's first request, then no ("ring the bell")
    to a second one: the refusal withdraws, for the parcel, the consent that answered the
    first (``sync.consents.withdrawn_by_refusals``), yet the first request kept reading
    ``granted`` and the channel still showed "you agreed to the locker". It reads
    ``revoked`` at the refusal's time, and the channel hears ``consent.request_revoked``,
    once: a retry of the refusal or a revocation of the consent afterwards tells
    nothing more."""
    subscribe(session, *OUTCOMES)
    pda.push(
        [
            pda.event(parcel, "consent_requested", 50, request={"method": "locker"}),
            pda.event(parcel, "consent_requested", 51, request={"method": "any"}),
            pda.event(parcel, "consent_requested", 52, request={"method": "pickup_point"}),
        ]
    )
    first, second, lapsed = session.scalars(
        select(ConsentRequest).order_by(ConsentRequest.id)
    ).all()
    _, consent, _ = answer(session, first, now=NOW - dt.timedelta(minutes=5))
    # Granted for two minutes only: expired before the refusal, nothing to withdraw.
    expired_by_then = NOW - dt.timedelta(minutes=1)
    answer(session, lapsed, now=NOW - dt.timedelta(minutes=3), expires_at=expired_by_then)
    answer(session, second, granted=False, reason="ring the bell")
    answer(session, second, granted=False, reason="ring the bell")  # the channel's retry
    session.expire_all()
    assert (first.status, first.revoked_at) == (ConsentRequestStatus.REVOKED, NOW)
    assert session.get(ConsentRequest, lapsed.id).status == ConsentRequestStatus.GRANTED
    assert outcomes(session) == [
        ("consent.request_granted", first.id),
        ("consent.request_granted", lapsed.id),
        ("consent.request_refused", second.id),
        ("consent.request_revoked", first.id),
    ]
    # The channel hears the refusal before the revocation it caused (the parcel's order).
    sent = session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)).all()
    assert [d.topic for d in sent][-2:] == ["consent.request_refused", "consent.request_revoked"]
    [revoked] = messages(session, "consent.request_revoked")
    assert revoked.payload == {
        "request_id": first.id,
        "tracking_no": parcel,
        "station_id": world.station.id,
        "consent_id": consent.id,
        "revoked_at": NOW.isoformat(),
        "reason": f"withdrawn by the recipient's refusal of consent request {second.id}",
        "channel": "sms",
    }
    courier_feed = session.scalars(
        select(FeedChange.kind).where(FeedChange.courier_id == world.courier.id)
    ).all()
    # The two grants, and the refusal with the withdrawal it made (one entry: one courier)
    assert courier_feed.count(FeedKind.CONSENT_REQUEST) == 3
    revocation = consents.Revocation(revoked_by=None, reason="changed my mind")
    assert consents.revoke(session=session, consent=consent, revocation=revocation)
    session.commit()
    assert len(messages(session, "consent.request_revoked")) == 1
    assert session.get(ConsentRequest, first.id).revoked_at == NOW


def test_a_request_withdrawn_by_a_refusal_is_on_the_audit_log(
    session: Session, world: World, pda: Pda, parcel: str
) -> None:
    """An auditor settling whether a locker drop was authorized reads the history of the
    request the recipient granted: ``consent_granted`` and nothing after it, though a
    later refusal withdrew that consent for the parcel and the request reads
    ``revoked``. The withdrawal was only an outbox event (``consent.request_revoked``),
    not on the log, so the request's row set back to ``granted`` showed nothing; a
    revocation through the API is on the log (``consent_revoked``). Each withdrawal now
    writes ``consent_request_withdrawn`` under the withdrawn request and the parcel,
    once (the channel's retry writes none), whether the refusal came after the grant
    or the grant's answer arrived after the refusal."""
    pda.push(
        [
            pda.event(parcel, "consent_requested", 50, request={"method": "locker"}),
            pda.event(parcel, "consent_requested", 51, request={"method": "any"}),
            pda.event(parcel, "consent_requested", 52, request={"method": "pickup_point"}),
        ]
    )
    first, second, late = session.scalars(select(ConsentRequest).order_by(ConsentRequest.id)).all()
    _, consent, _ = answer(session, first, now=NOW - dt.timedelta(minutes=5))
    answer(session, second, granted=False, reason="ring the bell")
    answer(session, second, granted=False, reason="ring the bell")  # the channel's retry
    said_yes = late.requested_at + dt.timedelta(seconds=30)
    _, late_consent, _ = answer(
        session, late, granted_at=said_yes, now=NOW + dt.timedelta(minutes=1)
    )

    entries = session.scalars(
        select(AuditEntry)
        .where(AuditEntry.action == "consent_request_withdrawn")
        .order_by(AuditEntry.id)
    ).all()
    reason = f"withdrawn by the recipient's refusal of consent request {second.id}"
    assert [(e.subject_type, e.subject_key, e.details) for e in entries] == [
        (
            "consent_request",
            str(first.id),
            {
                "request_id": first.id,
                "consent_id": consent.id,
                "tracking_no": parcel,
                "withdrawn_at": audit.iso(NOW),
                "refusal_request_id": second.id,
                "reason": reason,
                "channel": "sms",
            },
        ),
        (
            "consent_request",
            str(late.id),
            {
                "request_id": late.id,
                "consent_id": late_consent.id,
                "tracking_no": parcel,
                "withdrawn_at": audit.iso(NOW),
                "refusal_request_id": second.id,
                "reason": reason,
                "channel": "sms",  # the refusal's, as its row keeps it
            },
        ),
    ]
    history = audit.list_entries(session=session, tracking_no=parcel)
    assert {e.id for e in entries} <= {e.id for e in history}
    assert audit.verify(session=session).ok


def test_a_grant_given_before_a_refusal_already_recorded_reads_revoked(
    session: Session, world: World, pda: Pda, parcel: str
) -> None:
    """The recipient replied "yes" by SMS to the first request, then "no" in the app to a
    second; the SMS gateway's answer arrived last, with the time of the "yes". The consent
    it records is withdrawn by the refusal after it, yet the request read ``granted``
    and the PDA was told to use the locker. It reads ``revoked`` at the refusal, and the
    channel hears the grant, then the revocation."""
    subscribe(session, *OUTCOMES)
    pda.push(
        [
            pda.event(parcel, "consent_requested", 50, request={"method": "locker"}),
            pda.event(parcel, "consent_requested", 51, request={"method": "any"}),
        ]
    )
    first, second = session.scalars(select(ConsentRequest).order_by(ConsentRequest.id)).all()
    answer(session, second, granted=False, reason="ring the bell", now=NOW)
    said_yes = second.requested_at + dt.timedelta(seconds=30)
    answered, consent, new = answer(
        session, first, granted_at=said_yes, now=NOW + dt.timedelta(minutes=1)
    )
    assert new and consent.granted_at == said_yes
    assert (answered.status, answered.revoked_at) == (ConsentRequestStatus.REVOKED, NOW)
    assert outcomes(session) == [
        ("consent.request_refused", second.id),
        ("consent.request_granted", first.id),
        ("consent.request_revoked", first.id),
    ]
    # A grant given after the refusal (they changed their mind) stands.
    pda.push([pda.event(parcel, "consent_requested", 52, request={"method": "locker"})])
    third = session.scalars(select(ConsentRequest).order_by(ConsentRequest.id.desc())).first()
    later, _, _ = answer(session, third, now=NOW + dt.timedelta(minutes=2))
    assert later.status == ConsentRequestStatus.GRANTED
    # One dated before the refusal but expired by then had nothing left to withdraw.
    pda.push([pda.event(parcel, "consent_requested", 53, request={"method": "any"})])
    fourth = session.scalars(select(ConsentRequest).order_by(ConsentRequest.id.desc())).first()
    brief, _, _ = answer(
        session,
        fourth,
        granted_at=fourth.requested_at,
        expires_at=fourth.requested_at + dt.timedelta(seconds=10),
        now=NOW + dt.timedelta(minutes=3),
    )
    assert brief.status == ConsentRequestStatus.GRANTED


def test_a_grant_withdrawn_by_a_refusal_recorded_before_it_names_the_refusals_channel(
    session: Session, pda: Pda, parcel: str
) -> None:
    """README: a ``consent.request_revoked`` for a consent a refusal withdrew names the
    refusal's ``channel``. When the grant's answer arrives after the refusal (the SMS
    gateway's "yes" late, the "no" given in the app), its announcement said null: the
    refusal's channel was on its audit entry and its message, not on its row."""
    subscribe(session, *OUTCOMES)
    pda.push(
        [
            pda.event(parcel, "consent_requested", 50, request={"method": "locker"}),
            pda.event(parcel, "consent_requested", 51, request={"method": "any"}),
        ]
    )
    first, second = session.scalars(select(ConsentRequest).order_by(ConsentRequest.id)).all()
    consent_requests.answer_request(
        session=session,
        request=second,
        answer=consent_requests.Answer(granted=False, channel=ConsentChannel.APP),
        rules=CONSENT_RULES,
        answered_by=None,
        now=NOW,
    )
    session.commit()
    answer(
        session,
        first,
        granted_at=second.requested_at + dt.timedelta(seconds=30),
        now=NOW + dt.timedelta(minutes=1),
    )
    (revoked,) = messages(session, "consent.request_revoked")
    assert revoked.payload["request_id"] == first.id
    assert revoked.payload["channel"] == "app"
    assert revoked.payload["revoked_at"] == NOW.isoformat()


def test_an_answer_taking_a_consent_recorded_alone_logs_what_that_consent_says(
    session: Session, pda: Pda, parcel: str
) -> None:
    """Asked for locker L-1, the recipient agreed to any method; the gateway recorded that
    alone, then sent it as the answer. The ``consent_request_answered`` entry recorded
    ``locker`` and ``L-1``, what was asked, as if the consent said so: an auditor
    settling a drop at a pickup point read a consent that did not cover it. The entry
    records the consent's method and point, and what was asked beside, named so."""
    pda.push(
        [
            pda.event(
                parcel, "consent_requested", 50, request={"method": "locker", "point_id": "L-1"}
            )
        ]
    )
    request = request_of(session)
    consents.grant_once(
        session=session,
        draft=consents.ConsentDraft(
            scope=ConsentScope.PARCEL,
            method=ConsentMethod.ANY,
            channel=ConsentChannel.SMS,
            granted_at=NOW,
            tracking_no=parcel,
            client_consent_id="sms-any",
        ),
        rules=CONSENT_RULES,
        created_by=None,
        now=NOW,
    )
    session.commit()
    _, consent, new = answer(
        session, request, method=ConsentMethod.ANY, granted_at=NOW, client_consent_id="sms-any"
    )
    assert new and (consent.method, consent.point_id) == (ConsentMethod.ANY, None)
    [entry] = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "consent_request_answered")
    ).all()
    assert entry.details["consent_id"] == consent.id
    assert (entry.details["method"], entry.details["point_id"]) == ("any", None)
    assert (entry.details["asked_method"], entry.details["asked_point_id"]) == ("locker", "L-1")


def test_a_correction_reads_the_request_as_stored_not_as_its_session_last_saw_it(
    session: Session, connection: Connection, pda: Pda, parcel: str
) -> None:
    """``cancel_voided`` judges the request it locked: a session that had read the request
    before (its objects outlive commits here) and meanwhile missed the lapse job's mark,
    committed by another session, took the stale copy and announced
    ``consent.request_cancelled`` after ``consent.request_lapsed``: two ends for one
    question."""
    subscribe(session, *OUTCOMES, "consent.request_cancelled")
    asked = pda.event(parcel, "consent_requested", 50, request={"method": "locker"})
    pda.push([asked])
    request = request_of(session)  # held by this session, as it is now
    with Session(bind=connection, join_transaction_mode="create_savepoint") as job:
        assert (
            consent_requests.announce_lapsed(session=job, now=request.expires_at)["announced"] == 1
        )
    assert request.lapse_announced_at is None  # the stale copy
    fix = pda.event(
        parcel, "correction", 51, voids_client_event_id=asked["client_event_id"], reason="x"
    )
    pda.push([fix], received_at=request.expires_at - dt.timedelta(seconds=1))
    assert request_of(session).status == ConsentRequestStatus.CANCELLED
    assert messages(session, "consent.request_cancelled") == []
    assert outcomes(session) == [("consent.request_lapsed", request.id)]


def test_a_refusal_tells_each_courier_whose_request_it_withdrew_once(
    session: Session, world: World, pda: Pda, parcel: str
) -> None:
    """The courier and a colleague at the door earlier each asked; the recipient granted
    both, then refused the courier's third request. The colleague's PDA hears that its
    granted request is withdrawn, and the courier's PDA hears the refusal and its own
    withdrawn request in one entry: the refusal wrote one for the answer and another
    for each request it withdrew, so the courier's next pull carried the parcel twice
    for one change."""
    colleague = factories.user(session, "colleague", "courier", world.station)
    session.commit()
    asked_earlier = consent_requests.request_consent(
        session=session,
        draft=consent_requests.RequestDraft(tracking_no=parcel, method=ConsentMethod.LOCKER),
        asker=consent_requests.Asker(colleague.id, world.station.id),
        ttl=dt.timedelta(minutes=30),
        requested_at=NOW - dt.timedelta(minutes=10),
        now=NOW - dt.timedelta(minutes=10),
        online=True,
    )
    session.commit()
    pda.push(
        [
            # By phone: the colleague's SMS question is another one (asked the same, the
            # courier's would be kept unsent: the colleague's answer covers the parcel).
            pda.event(
                parcel,
                "consent_requested",
                50,
                request={"method": "locker", "channel": "phone_call"},
            ),
            pda.event(parcel, "consent_requested", 51, request={"method": "any"}),
        ]
    )
    mine, refused = session.scalars(
        select(ConsentRequest)
        .where(ConsentRequest.courier_id == world.courier.id)
        .order_by(ConsentRequest.id)
    ).all()
    answer(session, asked_earlier, now=NOW - dt.timedelta(minutes=5))
    answer(session, mine, now=NOW - dt.timedelta(minutes=4))

    def consent_request_entries() -> dict[int | None, int]:
        rows = session.scalars(
            select(FeedChange).where(FeedChange.kind == FeedKind.CONSENT_REQUEST)
        ).all()
        return {c: sum(1 for r in rows if r.courier_id == c) for c in {r.courier_id for r in rows}}

    before = consent_request_entries()
    answer(session, refused, granted=False, reason="ring the bell")
    after = consent_request_entries()
    session.expire_all()
    assert session.get(ConsentRequest, asked_earlier.id).status == ConsentRequestStatus.REVOKED
    assert session.get(ConsentRequest, mine.id).status == ConsentRequestStatus.REVOKED
    assert after[colleague.id] - before[colleague.id] == 1
    assert after[world.courier.id] - before[world.courier.id] == 1


def test_a_refusal_withdrawing_many_grants_reads_their_questions_once(
    session: Session, world: World, pda: Pda, connection: Connection
) -> None:
    """A refusal withdraws every request of the parcel granted before it, and each
    withdrawn request's question was made due apart: a read of the webhook deliveries
    per request withdrawn (N+1 statements for a refusal at a parcel asked N times).
    Now one read for the refusal however many it withdraws."""
    from tests.sync.test_request_reach import delivery_reads

    subscribe(session, *OUTCOMES)

    def reads_of_a_refusal_withdrawing(granted: int) -> int:
        parcel = factories.parcel(session, world.station).tracking_no
        session.commit()
        pda.push(
            [
                pda.event(
                    parcel,
                    "consent_requested",
                    50,
                    request={"method": "locker", "point_id": f"L-{n}"},
                )
                for n in range(granted + 1)
            ]
        )
        *asked, refused = session.scalars(
            select(ConsentRequest)
            .where(ConsentRequest.tracking_no == parcel)
            .order_by(ConsentRequest.id)
        ).all()
        for request in asked:
            answer(session, request, now=NOW - dt.timedelta(minutes=5))
        with delivery_reads(connection) as reads:
            answer(session, refused, granted=False, reason="ring the bell")
        statuses = session.scalars(
            select(ConsentRequest.status).where(ConsentRequest.id.in_([r.id for r in asked]))
        ).all()
        assert statuses == [ConsentRequestStatus.REVOKED] * granted
        return len(reads)

    assert reads_of_a_refusal_withdrawing(4) == reads_of_a_refusal_withdrawing(1)


def test_a_request_whose_consent_expired_since_reads_expired_not_granted(
    session: Session, world: World, pda: Pda, parcel: str
) -> None:
    """The recipient agreed for ten minutes. Past them the consent authorizes no drop
    (rule 4) and leaves the parcel's ``consents``, yet the request still read
    ``granted``: a PDA showing "the recipient agreed" sent the courier to the locker for
    an ``unauthorized_locker_drop``. It reads ``expired`` from then on, as a revoked one
    reads ``revoked`` (the courier asks again); listing by status agrees."""
    pda.push([pda.event(parcel, "consent_requested", 50, request={"method": "locker"})])
    request = request_of(session)
    until = NOW + dt.timedelta(minutes=10)
    answered, consent, _ = answer(session, request, granted_at=NOW, expires_at=until)
    assert consent is not None and consent.expires_at == until

    def listed(status: str, at: dt.datetime) -> list[int]:
        return [
            r.id
            for r in consent_requests.list_requests(
                session=session, tracking_no=parcel, status=status, now=at
            )
        ]

    before = until - dt.timedelta(seconds=1)
    assert consent_requests.effective_status(answered, before) == "granted"
    assert (listed("granted", before), listed("expired", before)) == ([answered.id], [])
    assert consent_requests.effective_status(answered, until) == "expired"
    assert (listed("granted", until), listed("expired", until)) == ([], [answered.id])
    # A consent without an expiry stays granted.
    pda.push([pda.event(parcel, "consent_requested", 51, request={"method": "any"})])
    lasting = session.scalars(select(ConsentRequest).order_by(ConsentRequest.id.desc())).first()
    answered, _, _ = answer(session, lasting, now=NOW + dt.timedelta(minutes=1))
    assert consent_requests.effective_status(answered, NOW + dt.timedelta(days=30)) == "granted"
