"""A courier is told when the consent question never reached the recipient's channel
(``sync.request_reach``), without Flask: the request read ``pending`` to its expiry
while nobody was asked."""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from types import SimpleNamespace
from typing import cast

import pytest
from flask import Flask
from sqlalchemy import Connection, event, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from models import (
    ConsentMethod,
    ConsentRequest,
    FeedChange,
    FeedKind,
    WebhookDelivery,
    WebhookSubscription,
)
from models.enums import ConsentChannel, DeliveryStatus
from sync import consent_requests, outbox, request_reach, webhooks
from sync.consents import ConsentRules
from sync.events import EventRules
from sync.ingest import IngestRules, PushBatch, Pusher, ingest
from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy
from sync.webhooks import SendResult
from tests import factories
from tests.conftest import World
from tests.sync.test_webhooks import SETTINGS, T0

RULES = ConsentRules(
    tracking=TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS), phone_region="CN"
)


class Answers:
    """A receiver answering ``status`` to every attempt."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.sent = 0

    def send(self, *, url: str, body: bytes, headers: object) -> SendResult:
        self.sent += 1
        return SendResult(status_code=self.status)

    def close(self) -> None:
        pass


@pytest.fixture
def sessions(connection: Connection) -> sessionmaker[Session]:
    return sessionmaker(
        bind=connection, expire_on_commit=False, join_transaction_mode="create_savepoint"
    )


def subscribe(sessions: sessionmaker[Session], *, topics: tuple[str, ...]) -> int:
    with sessions.begin() as session:
        return webhooks.create_subscription(
            session=session,
            url="http://127.0.0.1:9/hook",
            topics=topics,
            station_id=None,
            production=False,
        ).id


def change_subscription(
    sessions: sessionmaker[Session], subscription_id: int, **change: object
) -> None:
    """An admin's change of the subscription (paused, resumed, its topics), committed."""
    with sessions.begin() as session:
        webhooks.update_subscription(
            session=session,
            subscription=webhooks.get_subscription(
                session=session, subscription_id=subscription_id
            ),
            production=False,
            now=T0,
            **change,
        )


def ask(sessions: sessionmaker[Session], world: World, minutes: int = 30) -> int:
    with sessions.begin() as session:
        return consent_requests.request_consent(
            session=session,
            draft=consent_requests.RequestDraft(
                tracking_no=factories.parcel(session, world.station).tracking_no,
                method=ConsentMethod.LOCKER,
            ),
            asker=consent_requests.Asker(world.courier.id, world.station.id, world.device.id),
            ttl=dt.timedelta(minutes=minutes),
            requested_at=T0,
            now=T0,
        ).id


def reasons(sessions: sessionmaker[Session], request_id: int, now: dt.datetime) -> str | None:
    with sessions() as session:
        request = session.get_one(ConsentRequest, request_id)
        return request_reach.not_reached(session, [request], now).get(request_id)


def told(sessions: sessionmaker[Session], request_id: int) -> int:
    """The ``consent_request`` feed entries of the request's parcel, for its courier."""
    with sessions() as session:
        request = session.get_one(ConsentRequest, request_id)
        return len(
            session.scalars(
                select(FeedChange).where(
                    FeedChange.kind == FeedKind.CONSENT_REQUEST,
                    FeedChange.tracking_no == request.tracking_no,
                    FeedChange.courier_id == request.courier_id,
                )
            ).all()
        )


def deliver(sessions: sessionmaker[Session], sender: Answers, now: dt.datetime) -> None:
    webhooks.deliver_due(
        sessions=sessions,
        now=now,
        settings=SETTINGS,
        sender=sender,
        worker_id="w",
        rng=random.Random(1),
    )


def test_a_question_no_channel_takes_is_told_to_the_courier_at_once(
    sessions: sessionmaker[Session], world: World
) -> None:
    """No subscription takes ``consent.requested`` at the station: nobody is asked, and
    the PDA read ``pending`` for the whole TTL. Its pull feed says so from the ask on,
    and once the request lapsed, that the recipient was never asked."""
    subscribe(sessions, topics=("parcel.in_locker",))  # a channel, not for questions
    request_id = ask(sessions, world)
    assert told(sessions, request_id) == 1
    assert reasons(sessions, request_id, T0) == request_reach.NO_CHANNEL
    lapsed = reasons(sessions, request_id, T0 + dt.timedelta(minutes=31))
    assert lapsed is not None and lapsed.startswith(request_reach.NEVER)


def test_a_question_whose_every_attempt_failed_is_told_to_the_courier(
    sessions: sessionmaker[Session], world: World
) -> None:
    subscribe(sessions, topics=("consent.requested",))
    request_id = ask(sessions, world)
    assert told(sessions, request_id) == 0  # a receiver will be tried
    assert reasons(sessions, request_id, T0) is None  # not tried yet: nothing to say
    down = Answers(503)
    deliver(sessions, down, T0)
    assert down.sent == 1
    assert told(sessions, request_id) == 1  # a long pull waiting for the answer wakes
    why = reasons(sessions, request_id, T0 + dt.timedelta(seconds=1))
    assert why == request_reach.FAILING.format(attempts="1 attempt")
    deliver(sessions, down, T0 + dt.timedelta(minutes=10))
    assert told(sessions, request_id) == 1  # told once, not at every retry
    deliver(sessions, Answers(204), T0 + dt.timedelta(minutes=20))
    assert reasons(sessions, request_id, T0 + dt.timedelta(minutes=20)) is None


def test_a_question_waiting_for_a_disabled_subscription_is_told_to_the_courier(
    sessions: sessionmaker[Session], world: World
) -> None:
    subscription_id = subscribe(sessions, topics=("consent.requested",))
    with sessions.begin() as session:
        subscription = webhooks.get_subscription(session=session, subscription_id=subscription_id)
        subscription.disabled_at = T0 - dt.timedelta(minutes=1)
    request_id = ask(sessions, world)
    assert told(sessions, request_id) == 1
    assert reasons(sessions, request_id, T0) == request_reach.CHANNEL_STOPPED


class PoisonQuestion:
    """A receiver that refuses every ``consent.requested`` (a phone its gateway cannot
    parse) and takes everything else."""

    def __init__(self) -> None:
        self.taken: list[str] = []

    def send(self, *, url: str, body: bytes, headers: dict[str, str]) -> SendResult:
        if headers["X-Courier-Topic"] == request_reach.TOPIC:
            return SendResult(status_code=400)
        self.taken.append(headers["X-Courier-Topic"])
        return SendResult(status_code=204)

    def close(self) -> None:
        pass


def test_an_answered_question_stops_holding_back_the_parcels_later_messages(
    sessions: sessionmaker[Session], world: World
) -> None:
    """A day-long request whose question the receiver refuses is retried until its
    expiry, its retries an hour apart at the end, and the parcel's later messages wait
    behind it (one key, in order). Once the recipient answered (by another channel),
    the question is not worth sending, but it stayed pending until its next retry: the
    grant waited up to an hour. Now the answer makes it due at once, skipped, and the
    grant follows in the same run."""
    subscribe(sessions, topics=(request_reach.TOPIC, "consent.request_granted"))
    request_id = ask(sessions, world, minutes=24 * 60)
    receiver = PoisonQuestion()
    tried, retry = T0, T0
    for _ in range(12):  # failing, further and further apart
        tried = retry
        deliver(sessions, receiver, tried)
        with sessions() as session:
            [retry] = session.scalars(
                select(webhooks.WebhookDelivery.next_attempt_at).where(
                    webhooks.WebhookDelivery.topic == request_reach.TOPIC
                )
            ).all()
    answered_at = tried + dt.timedelta(minutes=1)
    assert retry - answered_at > dt.timedelta(minutes=10)  # the next retry is far off
    with sessions.begin() as session:
        consent_requests.answer_request(
            session=session,
            request=session.get_one(ConsentRequest, request_id),
            answer=consent_requests.Answer(granted=True, channel=ConsentChannel.PHONE_CALL),
            rules=RULES,
            answered_by=None,
            now=answered_at,
        )
    deliver(sessions, receiver, answered_at + dt.timedelta(seconds=1))
    assert receiver.taken == ["consent.request_granted"]


def test_the_courier_hears_when_the_channel_their_question_waits_for_is_paused(
    sessions: sessionmaker[Session], world: World
) -> None:
    """An admin pauses the channel's subscription before the question was sent: it
    waits, unsent, and the courier is told at the pause, not left reading pending."""
    subscription_id = subscribe(sessions, topics=(request_reach.TOPIC,))
    request_id = ask(sessions, world)
    assert told(sessions, request_id) == 0
    change_subscription(sessions, subscription_id, active=False)
    assert told(sessions, request_id) == 1
    assert reasons(sessions, request_id, T0) == request_reach.CHANNEL_STOPPED


def test_the_courier_hears_when_the_channel_their_question_waits_for_is_disabled(
    sessions: sessionmaker[Session], world: World
) -> None:
    """Another message's failure disables the subscription before this question's
    first attempt: its courier is told then."""
    subscribe(sessions, topics=(request_reach.TOPIC,))
    first = ask(sessions, world)
    with sessions.begin() as session:  # asked a little later: not due at the failure
        later = consent_requests.request_consent(
            session=session,
            draft=consent_requests.RequestDraft(
                tracking_no=factories.parcel(session, world.station).tracking_no,
                method=ConsentMethod.LOCKER,
            ),
            asker=consent_requests.Asker(world.courier.id, world.station.id, world.device.id),
            ttl=dt.timedelta(minutes=30),
            requested_at=T0,
            now=T0 + dt.timedelta(seconds=30),
        ).id
    webhooks.deliver_due(
        sessions=sessions,
        now=T0,
        settings=replace(SETTINGS, disable_after_failures=1, disable_after_seconds=0),
        sender=Answers(503),
        worker_id="w",
        rng=random.Random(1),
    )
    # Its own failure disabled the subscription: one entry, not one for each reason.
    assert told(sessions, first) == 1
    assert told(sessions, later) == 1  # the subscription disabled
    assert reasons(sessions, later, T0) == request_reach.CHANNEL_STOPPED


def test_the_courier_hears_when_a_failing_question_gets_through_at_last(
    sessions: sessionmaker[Session], world: World
) -> None:
    """The PDA was told at the first failure that the question had not got through;
    a later retry that succeeds clears ``not_reached``, and the PDA hears that too:
    else it kept reading "every attempt failed" (its copy changes only through the
    feed) while the recipient had been asked and their answer was on its way."""
    subscribe(sessions, topics=(request_reach.TOPIC,))
    request_id = ask(sessions, world)
    deliver(sessions, Answers(503), T0)
    assert told(sessions, request_id) == 1
    deliver(sessions, Answers(204), T0 + dt.timedelta(minutes=20))
    assert reasons(sessions, request_id, T0 + dt.timedelta(minutes=20)) is None
    assert told(sessions, request_id) == 2


def test_a_question_sent_at_its_first_attempt_puts_nothing_in_the_feed(
    sessions: sessionmaker[Session], world: World
) -> None:
    """Nothing the PDA reads changed: no entry for a question that simply got through."""
    subscribe(sessions, topics=(request_reach.TOPIC,))
    request_id = ask(sessions, world)
    deliver(sessions, Answers(204), T0)
    assert told(sessions, request_id) == 0


def test_the_courier_hears_when_the_stopped_channel_is_enabled_again(
    sessions: sessionmaker[Session], world: World
) -> None:
    """Paused before its first attempt, the question read ``not_reached`` (the courier
    was told); resumed, it is on its way again (``not_reached`` null): told too."""
    subscription_id = subscribe(sessions, topics=(request_reach.TOPIC,))
    request_id = ask(sessions, world)
    for active in (False, True):
        change_subscription(sessions, subscription_id, active=active)
    assert reasons(sessions, request_id, T0) is None
    assert told(sessions, request_id) == 2


def test_a_question_failing_while_its_request_is_answered_holds_nothing_back(
    sessions: sessionmaker[Session], world: World
) -> None:
    """The recipient answers (by another channel) while the worker is sending their
    question to a receiver that times out: the answer found nothing waiting to bring
    forward (the question was claimed, due), then the failure was recorded with a retry
    far off, and the grant waited behind it until then, up to an hour. A question whose
    request is no longer pending is due at once when its failure is recorded."""
    subscribe(sessions, topics=(request_reach.TOPIC, "consent.request_granted"))
    request_id = ask(sessions, world, minutes=24 * 60)
    [claimed] = webhooks.claim_due(
        sessions=sessions, due_at=T0, now=T0, settings=SETTINGS, worker_id="w"
    )
    with sessions.begin() as session:
        consent_requests.answer_request(
            session=session,
            request=session.get_one(ConsentRequest, request_id),
            answer=consent_requests.Answer(granted=True, channel=ConsentChannel.PHONE_CALL),
            rules=RULES,
            answered_by=None,
            now=T0 + dt.timedelta(seconds=1),
        )
    recorded = webhooks.record_attempt(
        sessions=sessions,
        claimed=claimed,
        result=SendResult(status_code=None, error="timed out"),
        at=T0 + dt.timedelta(seconds=2),
        settings=SETTINGS,
        worker_id="w",
        rng=random.Random(1),
    )
    assert recorded.outcome == webhooks.RETRY
    receiver = PoisonQuestion()
    deliver(sessions, receiver, T0 + dt.timedelta(seconds=3))
    assert receiver.taken == ["consent.request_granted"]


def test_a_push_asking_many_questions_reads_the_channels_once(
    session: Session, world: World, sent: list[str]
) -> None:
    """Whether a question goes to a sending channel is known from the subscriptions,
    read once per transaction as the outbox reads them: not a query per question, which
    a push of a courier's morning of asks paid for each."""
    session.add(
        WebhookSubscription(
            url="http://127.0.0.1:9/hook", topics=[request_reach.TOPIC], secret="s" * 43
        )
    )
    session.commit()
    pusher = Pusher(world.device.id, world.station.id, world.courier.id)
    asked_at = dt.datetime.now(dt.UTC)
    read: list[int] = []
    for count in (1, 12):
        parcels = [factories.parcel(session, world.station).tracking_no for _ in range(count)]
        session.commit()
        first = 1 + sum(2 * n for n in read)
        events = [
            factories.event(first + n, tn, "checked_out", occurred_at=asked_at)
            for n, tn in enumerate(parcels)
        ] + [
            factories.event(
                first + count + n,
                tn,
                "consent_requested",
                occurred_at=asked_at,
                request={"method": "any"},
            )
            for n, tn in enumerate(parcels)
        ]
        sent.clear()
        ingest(
            session=session,
            batch=PushBatch(pusher.device_id, uuid.uuid4(), asked_at, events),
            pusher=pusher,
            rules=IngestRules(events=EventRules(tracking=RULES.tracking)),
            received_at=asked_at,
        )
        session.commit()
        read_channels = [s for s in sent if s.startswith("SELECT") and "webhook_" in s]
        assert len(read_channels) <= 2, read_channels  # the outbox's, and which are sending
        assert (
            session.scalar(select(func.count()).select_from(WebhookDelivery)) == sum(read) + count
        )
        read.append(count)


def test_the_courier_hears_when_the_channel_stops_taking_their_question(
    sessions: sessionmaker[Session], world: World
) -> None:
    """An admin drops ``consent.requested`` from the channel's topics (or moves it to
    another station) while a question waits: its delivery is deleted, nobody will ask
    the recipient, and ``not_reached`` says so; the courier hears it then, not when the
    request lapses."""
    subscription_id = subscribe(sessions, topics=(request_reach.TOPIC,))
    request_id = ask(sessions, world)
    change_subscription(sessions, subscription_id, topics=("parcel.in_locker",))
    assert reasons(sessions, request_id, T0) == request_reach.NO_CHANNEL
    assert told(sessions, request_id) == 1


def test_a_lapsed_question_that_only_failed_does_not_blame_a_stopped_channel(
    sessions: sessionmaker[Session], world: World
) -> None:
    """Its every attempt failed, then it lapsed and the worker skipped it (moot): the
    PDA read that the channel's subscription was disabled or paused, waiting for an
    admin, which it never was; it says the attempts failed."""
    subscribe(sessions, topics=(request_reach.TOPIC,))
    request_id = ask(sessions, world)
    down = Answers(503)
    deliver(sessions, down, T0)
    lapsed_at = T0 + dt.timedelta(minutes=31)
    deliver(sessions, down, lapsed_at)
    assert down.sent == 1  # skipped, not sent, once lapsed
    why = reasons(sessions, request_id, lapsed_at)
    assert why == f"{request_reach.NEVER} ({request_reach.FAILING.format(attempts='1 attempt')})"


def test_a_question_the_worker_reached_only_after_the_lapse_says_it_was_not_sent(
    sessions: sessionmaker[Session], world: World
) -> None:
    """The worker was held up until the request lapsed: the question was skipped, never
    tried; no subscription was stopped, nor any attempt failed."""
    subscribe(sessions, topics=(request_reach.TOPIC,))
    request_id = ask(sessions, world)
    lapsed_at = T0 + dt.timedelta(minutes=31)
    unused = Answers(204)
    deliver(sessions, unused, lapsed_at)
    assert unused.sent == 0
    why = reasons(sessions, request_id, lapsed_at)
    assert why == f"{request_reach.NEVER} ({request_reach.NOT_SENT})"


@contextmanager
def delivery_reads(connection: Connection) -> Iterator[list[str]]:
    """The SELECTs of webhook deliveries the connection sends within the block."""
    statements: list[str] = []

    def note(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.lstrip().startswith("SELECT") and "FROM webhook_delivery" in statement:
            statements.append(statement)

    event.listen(connection, "before_cursor_execute", note)
    try:
        yield statements
    finally:
        event.remove(connection, "before_cursor_execute", note)


def test_the_lapse_job_makes_a_batchs_waiting_questions_due_together(
    sessions: sessionmaker[Session], world: World, connection: Connection
) -> None:
    """The lapse job ends up to 500 requests a transaction. Each made its own question
    due: a read and a lock of its deliveries per request, the locks in the order of the
    requests rather than of the deliveries (an admin enabling the subscription again
    locks them by id: a deadlock on PostgreSQL). Now one read and one lock, by id."""
    subscribe(sessions, topics=(request_reach.TOPIC,))
    asked = [ask(sessions, world) for _ in range(5)]
    deliver(sessions, Answers(503), T0)  # every question failed once
    lapsed_at = T0 + dt.timedelta(minutes=31)
    with sessions.begin() as session:  # their retries far off (a day-long backoff's end)
        for delivery in session.scalars(select(WebhookDelivery)):
            delivery.next_attempt_at = lapsed_at + dt.timedelta(hours=1)
    with delivery_reads(connection) as reads, sessions() as session:
        outcome = consent_requests.announce_lapsed(session=session, now=lapsed_at)
    assert outcome["announced"] == len(asked)
    assert len(reads) <= 2, reads  # the questions' read, their lock: not two per request
    with sessions() as session:
        due = session.scalars(
            select(WebhookDelivery.next_attempt_at).where(
                WebhookDelivery.topic == request_reach.TOPIC
            )
        ).all()
    assert due == [lapsed_at] * len(asked)


def test_a_push_ending_several_requests_makes_their_questions_due_together(
    session: Session, world: World, connection: Connection
) -> None:
    """A push voiding one ask and delivering other parcels in person ends their requests:
    each made its question due apart, the voided one's before the others' (in two
    batches, each by id), not all of them in the order of their deliveries' ids. Now
    one read and one lock for the push."""
    session.add(
        WebhookSubscription(
            url="http://127.0.0.1:9/hook", topics=[request_reach.TOPIC], secret="s" * 43
        )
    )
    session.commit()
    pusher = Pusher(world.device.id, world.station.id, world.courier.id)
    asked_at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    parcels = [factories.parcel(session, world.station).tracking_no for _ in range(4)]
    session.commit()
    asks = [
        factories.event(
            5 + n, tn, "consent_requested", occurred_at=asked_at, request={"method": "any"}
        )
        for n, tn in enumerate(parcels)
    ]
    rules = IngestRules(events=EventRules(tracking=RULES.tracking))
    ingest(
        session=session,
        batch=PushBatch(
            pusher.device_id,
            uuid.uuid4(),
            asked_at,
            [
                factories.event(1 + n, tn, "checked_out", occurred_at=asked_at)
                for n, tn in enumerate(parcels)
            ]
            + asks,
        ),
        pusher=pusher,
        rules=rules,
        received_at=asked_at,
    )
    session.commit()
    retry = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)  # failing: a retry far off
    for delivery in session.scalars(select(WebhookDelivery)):
        delivery.attempts, delivery.next_attempt_at = 3, retry
    session.commit()
    pushed_at = dt.datetime.now(dt.UTC)
    ending = [
        factories.event(
            9,
            parcels[0],
            "correction",
            occurred_at=pushed_at,
            voids_client_event_id=asks[0]["client_event_id"],
            reason="mis-tap",
        ),
        *(
            factories.event(10 + n, tn, "delivered", occurred_at=pushed_at)
            for n, tn in enumerate(parcels[1:])
        ),
    ]
    with delivery_reads(connection) as reads:
        ingest(
            session=session,
            batch=PushBatch(pusher.device_id, uuid.uuid4(), pushed_at, ending),
            pusher=pusher,
            rules=rules,
            received_at=pushed_at,
        )
        session.commit()
    assert {r.status for r in session.scalars(select(ConsentRequest))} == {
        consent_requests.ConsentRequestStatus.CANCELLED
    }
    assert len(reads) <= 2, reads
    due = session.scalars(
        select(WebhookDelivery.next_attempt_at).where(WebhookDelivery.topic == request_reach.TOPIC)
    ).all()
    assert len(due) == len(parcels) and all(at < retry for at in due)


def test_the_courier_hears_when_a_success_recorded_late_enables_the_channel_again(
    sessions: sessionmaker[Session], world: World
) -> None:
    """A failure made after a success, recorded first, disabled the subscription: the
    couriers whose questions wait for it were told it had stopped. The success, recorded
    next, undoes the disabling (``_undo_disabling``): the questions are on their way
    again (``not_reached`` null), but their PDAs heard nothing and kept reading that
    the channel was stopped until an admin came."""
    settings = replace(SETTINGS, disable_after_failures=2, disable_after_seconds=0)
    subscribe(sessions, topics=(request_reach.TOPIC,))
    first, second, third, waiting = [ask(sessions, world) for _ in range(4)]
    claimed = webhooks.claim_due(
        sessions=sessions, due_at=T0, now=T0, settings=settings, worker_id="w"
    )
    assert len(claimed) == 3  # three at a time for one subscription: the fourth waits

    def record(claim: webhooks.ClaimedDelivery, status: int, seconds: int) -> webhooks.Recorded:
        return webhooks.record_attempt(
            sessions=sessions,
            claimed=claim,
            result=SendResult(status_code=status),
            at=T0 + dt.timedelta(seconds=seconds),
            settings=settings,
            worker_id="w",
            rng=random.Random(1),
        )

    record(claimed[0], 503, 0)
    assert record(claimed[1], 503, 10).disabled_subscription  # made after the success
    assert told(sessions, waiting) == 1
    assert reasons(sessions, waiting, T0 + dt.timedelta(seconds=10)) == (
        request_reach.CHANNEL_STOPPED
    )
    assert record(claimed[2], 204, 5).outcome == webhooks.DELIVERED  # recorded last
    assert reasons(sessions, waiting, T0 + dt.timedelta(seconds=10)) is None
    assert told(sessions, waiting) == 2
    # The first at its failure, then as the second: its own failure stopped it, one entry
    # for both; each when it sends again. The third, in flight when it stopped, when it
    # got through.
    assert [told(sessions, r) for r in (first, second, third)] == [3, 2, 2]


class OneDown:
    """Two receivers: the one at ``down`` answers 503, the other takes everything."""

    def __init__(self, down: str) -> None:
        self.down = down

    def send(self, *, url: str, body: bytes, headers: object) -> SendResult:
        return SendResult(status_code=503 if url == self.down else 204)

    def close(self) -> None:
        pass


def test_a_question_one_channel_got_still_reached_someone_after_an_admin_purge(
    sessions: sessionmaker[Session], world: World
) -> None:
    """Two channels take the questions; one got it, the other keeps failing. An admin
    purging the delivered deliveries took the one that showed the recipient was asked:
    ``not_reached`` then read "every attempt failed" and the PDA went on ringing. A
    delivered question is kept while another delivery of it is not delivered (its
    message, with the recipient's phone, is kept for that one anyway)."""
    with sessions.begin() as session:
        for url in ("http://127.0.0.1:9/sms", "http://127.0.0.1:9/app"):
            webhooks.create_subscription(
                session=session,
                url=url,
                topics=(request_reach.TOPIC, "parcel.in_locker"),
                station_id=None,
                production=False,
            )
    request_id = ask(sessions, world)
    deliver(sessions, OneDown("http://127.0.0.1:9/app"), T0)
    later = T0 + dt.timedelta(minutes=1)
    assert reasons(sessions, request_id, later) is None
    with sessions.begin() as session:
        outbox.announce(
            session=session,
            topic="parcel.in_locker",
            ordering_key="RR-OTHER",
            station_id=world.station.id,
            data={"tracking_no": "RR-OTHER"},
            now=T0,
        )
    deliver(sessions, OneDown("none"), T0)  # the other parcel's: delivered to both
    with sessions.begin() as session:
        purged = webhooks.purge_deliveries(
            session=session, status=DeliveryStatus.DELIVERED, before=later
        )
    assert purged["deliveries"] == 2  # the other parcel's, nobody's question
    assert reasons(sessions, request_id, later) is None
    lapsed = T0 + dt.timedelta(minutes=31)
    assert reasons(sessions, request_id, lapsed) is None  # never "it never reached them"


def purge(sessions: sessionmaker[Session], status: DeliveryStatus, now: dt.datetime) -> int:
    """An admin's purge of the deliveries settled before ``now``: how many were deleted."""
    with sessions.begin() as session:
        return webhooks.purge_deliveries(session=session, status=status, before=now, now=now)[
            "deliveries"
        ]


def test_a_question_that_never_reached_the_channel_still_says_so_after_a_purge(
    sessions: sessionmaker[Session], world: World
) -> None:
    """Every attempt failed, then the request lapsed and its question was skipped. An
    admin purging the skipped deliveries deleted the only evidence: ``not_reached``
    went null ("reached the channel, or nothing says it did not") and an auditor
    settling whether the recipient was asked read nothing. The purge keeps the verdict
    on the request."""
    subscribe(sessions, topics=(request_reach.TOPIC,))
    request_id = ask(sessions, world)
    deliver(sessions, Answers(503), T0)
    lapsed_at = T0 + dt.timedelta(minutes=31)
    deliver(sessions, Answers(503), lapsed_at)  # skipped: moot
    never = f"{request_reach.NEVER} ({request_reach.FAILING.format(attempts='1 attempt')})"
    assert reasons(sessions, request_id, lapsed_at) == never
    a_week_on = lapsed_at + dt.timedelta(days=7)
    assert purge(sessions, DeliveryStatus.SKIPPED, a_week_on) == 1
    assert reasons(sessions, request_id, a_week_on) == never


def test_a_question_that_reached_the_channel_is_not_said_unasked_after_a_purge(
    sessions: sessionmaker[Session], world: World
) -> None:
    """The question was delivered; later the channel stopped taking questions, and an
    admin purged the delivered deliveries. With no delivery left and no channel taking
    the topic, ``not_reached`` read that the recipient was never asked, nobody taking
    consent requests at the station: the opposite of what happened."""
    subscription_id = subscribe(sessions, topics=(request_reach.TOPIC,))
    request_id = ask(sessions, world)
    deliver(sessions, Answers(204), T0)
    change_subscription(sessions, subscription_id, topics=("parcel.in_locker",))
    a_week_on = T0 + dt.timedelta(days=7)
    assert reasons(sessions, request_id, a_week_on) is None
    assert purge(sessions, DeliveryStatus.DELIVERED, a_week_on) == 1
    assert reasons(sessions, request_id, a_week_on) is None


def test_a_question_waiting_for_a_stopped_channel_still_says_so_after_the_retention_purge(
    sessions: sessionmaker[Session], world: World
) -> None:
    """The channel was paused while the question waited; the request lapsed. The
    retention job deletes a stopped channel's deliveries that old, the question's with
    them, and ``not_reached`` went from "never reached them (the channel is stopped)"
    to null."""
    subscription_id = subscribe(sessions, topics=(request_reach.TOPIC,))
    request_id = ask(sessions, world)
    change_subscription(sessions, subscription_id, active=False)
    a_week_on = T0 + dt.timedelta(days=7)
    never = f"{request_reach.NEVER} ({request_reach.CHANNEL_STOPPED})"
    assert reasons(sessions, request_id, a_week_on) == never
    with sessions.begin() as session:
        purged = webhooks.purge_waiting_for_stopped(
            session=session, before=a_week_on, now=a_week_on
        )
    assert purged["deliveries"] == 1
    assert reasons(sessions, request_id, a_week_on) == never


def test_the_retention_job_keeps_its_questions_reach_in_one_pass_before_its_audit_entries(
    sessions: sessionmaker[Session], world: World, connection: Connection
) -> None:
    """The retention job purges the delivered deliveries, then the skipped ones, in one
    transaction. Each purge locked its questions' requests, then chained its audit entry
    (the audit log's lock, which every audited write takes last): the skipped purge
    locked its requests after the delivered purge's entry, and a request of the
    delivered purge before a lower one of the skipped purge. An answer or a push holding
    one of those requests, waiting for the audit log, or the lapse job or a push locking
    both by id, waited for the job as it waited for them: a deadlock on PostgreSQL. The
    requests are locked in one pass by id, before any entry is chained."""
    from courier_api.scheduler import JOB_SPECS

    subscribe(sessions, topics=(request_reach.TOPIC,))
    skipped_id, delivered_id = ask(sessions, world), ask(sessions, world)
    deliver(sessions, Answers(204), T0)
    with sessions.begin() as session:  # the first one's question skipped: held up, moot
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == min(session.scalars(select(WebhookDelivery.id))))
            .values(
                status=DeliveryStatus.SKIPPED,
                delivered_at=None,
                last_attempt_at=None,
                attempts=0,
                skipped_reason="no longer pending",
            )
        )
    statements: list[tuple[str, object]] = []

    def note(_conn: object, _cursor: object, statement: str, parameters: object, *_: object):
        statements.append((statement, parameters))

    purge = JOB_SPECS["webhook_retention"].build({"WEBHOOK_RETENTION_DAYS": 30})
    a_month_on = T0 + dt.timedelta(days=31)
    event.listen(connection, "before_cursor_execute", note)
    try:
        with sessions.begin() as session:
            assert purge(session=session, now=a_month_on)["deliveries"] == 2
    finally:
        event.remove(connection, "before_cursor_execute", note)

    def ints(parameters: object) -> set[int]:
        values = parameters.values() if isinstance(parameters, dict) else parameters
        return {v for v in values or () if isinstance(v, int) and not isinstance(v, bool)}

    keeps = [
        n
        for n, (statement, _) in enumerate(statements)
        if "FROM consent_request" in statement and "ORDER BY consent_request.id" in statement
    ]
    chained = [n for n, (statement, _) in enumerate(statements) if "INTO audit_entry" in statement]
    assert keeps and chained
    assert {skipped_id, delivered_id} <= ints(statements[keeps[0]][1])  # one pass
    assert max(keeps) < min(chained)  # every request locked before the audit log
    never = f"{request_reach.NEVER} ({request_reach.NOT_SENT})"
    assert reasons(sessions, skipped_id, a_month_on) == never
    assert reasons(sessions, delivered_id, a_month_on) is None


@pytest.mark.postgres_only
def test_the_retention_job_never_deadlocks_with_a_transaction_locking_its_requests_by_id(
    committed_app: Flask,
) -> None:
    """Another transaction (the lapse job's batch, a push handing the parcels over) locks
    two requests by id: the one whose question was skipped, then the one whose question
    was delivered. The retention job locked the delivered purge's request, then waited
    for the skipped purge's, which the other held while it waited for the first: a
    deadlock, PostgreSQL failing one of them. Now the job waits for the first request
    holding none."""
    from courier_api.extensions import db
    from courier_api.scheduler import JOB_SPECS
    from tests.sync.test_webhooks import _waiting_on_a_lock

    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    with sessions.begin() as session:
        station = factories.station(session)
        world = SimpleNamespace(
            station=station,
            courier=factories.user(session, "courier1", "courier", station),
            device=factories.device(session, "PDA-0001", station),
        )
    subscribe(sessions, topics=(request_reach.TOPIC,))
    skipped_id, delivered_id = ask(sessions, cast(World, world)), ask(sessions, cast(World, world))
    deliver(sessions, Answers(204), T0)
    with sessions.begin() as session:  # the first one's question skipped: held up, moot
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == min(session.scalars(select(WebhookDelivery.id))))
            .values(status=DeliveryStatus.SKIPPED, delivered_at=None, attempts=0)
        )
    purge = JOB_SPECS["webhook_retention"].build({"WEBHOOK_RETENTION_DAYS": 30})
    locked, go = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def lock_both_by_id() -> None:
        try:
            with sessions.begin() as session:
                for request_id in (skipped_id, delivered_id):
                    session.get(ConsentRequest, request_id, with_for_update=True)
                    locked.set()
                    go.wait(timeout=10)
        except BaseException as exc:  # reported below
            errors.append(exc)

    def retention() -> None:
        try:
            with sessions.begin() as session:
                purge(session=session, now=T0 + dt.timedelta(days=31))
        except BaseException as exc:  # reported below
            errors.append(exc)

    other = threading.Thread(target=lock_both_by_id)
    job = threading.Thread(target=retention)
    other.start()
    try:
        assert locked.wait(timeout=10)
        job.start()
        deadline = time.monotonic() + 10
        while not _waiting_on_a_lock(sessions) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _waiting_on_a_lock(sessions), errors  # the job waits for the first request
    finally:
        go.set()
        other.join(timeout=30)
        if job.ident is not None:
            job.join(timeout=30)
    assert errors == []
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 0


def test_a_question_another_channel_delivers_after_an_admin_purge_of_a_dead_one_reached(
    sessions: sessionmaker[Session], world: World
) -> None:
    """Two channels take the questions, both failing at first; one's delivery of a
    pending request's question is dead (its attempts used up). An admin purging the dead
    deliveries kept "every attempt failed" on the request, while the other channel's
    delivery was still retrying: it got through later, and ``not_reached`` went on
    reading the kept verdict, then "it never reached them": the PDA kept ringing and an
    auditor read the recipient was never asked. A delivery delivered since a purge says
    the question reached them."""
    with sessions.begin() as session:
        for url in ("http://127.0.0.1:9/sms", "http://127.0.0.1:9/app"):
            webhooks.create_subscription(
                session=session,
                url=url,
                topics=(request_reach.TOPIC,),
                station_id=None,
                production=False,
            )
    request_id = ask(sessions, world)
    deliver(sessions, Answers(503), T0)
    with sessions.begin() as session:  # the app's attempts used up
        session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.subscription_id.in_(
                    select(WebhookSubscription.id).where(WebhookSubscription.url.endswith("/app"))
                )
            )
            .values(status=DeliveryStatus.DEAD)
        )
    minute = T0 + dt.timedelta(minutes=1)
    failing = request_reach.FAILING.format(attempts="1 attempt")
    assert reasons(sessions, request_id, minute) == failing
    assert purge(sessions, DeliveryStatus.DEAD, minute) == 1
    assert reasons(sessions, request_id, minute) == failing
    retried = T0 + dt.timedelta(minutes=20)
    deliver(sessions, OneDown("http://127.0.0.1:9/app"), retried)
    with sessions() as session:
        assert session.scalars(select(WebhookDelivery.status)).all() == [DeliveryStatus.DELIVERED]
    assert reasons(sessions, request_id, retried) is None
    assert reasons(sessions, request_id, T0 + dt.timedelta(days=1)) is None


def two_channels(sessions: sessionmaker[Session]) -> None:
    """Two subscriptions taking the questions: the SMS gateway's and the app's."""
    with sessions.begin() as session:
        for url in ("http://127.0.0.1:9/sms", "http://127.0.0.1:9/app"):
            webhooks.create_subscription(
                session=session,
                url=url,
                topics=(request_reach.TOPIC,),
                station_id=None,
                production=False,
            )


def set_app_delivery(sessions: sessionmaker[Session], **values: object) -> None:
    """The app's delivery of the question, changed as the sender would have."""
    with sessions.begin() as session:
        session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.subscription_id.in_(
                    select(WebhookSubscription.id).where(WebhookSubscription.url.endswith("/app"))
                )
            )
            .values(**values)
        )


def set_sms_delivery(sessions: sessionmaker[Session], **values: object) -> None:
    """The SMS gateway's delivery of the question, changed as the sender would have."""
    with sessions.begin() as session:
        session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.subscription_id.in_(
                    select(WebhookSubscription.id).where(WebhookSubscription.url.endswith("/sms"))
                )
            )
            .values(**values)
        )


def test_a_question_whose_other_channel_fails_after_an_admin_purge_says_it_never_got_through(
    sessions: sessionmaker[Session], world: World
) -> None:
    """Two channels take the questions. The SMS gateway's delivery is dead after one
    failed attempt while the app's has not been tried yet; an admin purges the dead
    deliveries. The verdict kept was read with the app's still to be tried: nothing
    ("it may yet get through"). The app's then failed too, and ``not_reached`` went on
    reading the kept nothing: null, the courier at the locker and an auditor reading
    that nothing says the recipient was not asked, where every attempt failed."""
    two_channels(sessions)
    request_id = ask(sessions, world)
    set_sms_delivery(sessions, status=DeliveryStatus.DEAD, attempts=1, last_attempt_at=T0)
    minute = T0 + dt.timedelta(minutes=1)
    assert reasons(sessions, request_id, minute) is None  # the app's yet to be tried
    assert purge(sessions, DeliveryStatus.DEAD, minute) == 1
    assert reasons(sessions, request_id, minute) is None
    set_app_delivery(sessions, status=DeliveryStatus.DEAD, attempts=3, last_attempt_at=minute)
    failing = request_reach.FAILING.format(attempts="3 attempts")
    assert reasons(sessions, request_id, minute) == failing
    lapsed = reasons(sessions, request_id, T0 + dt.timedelta(minutes=31))
    assert lapsed == f"{request_reach.NEVER} ({failing})"


def kept_as(sessions: sessionmaker[Session], request_id: int, kept: str, at: dt.datetime) -> None:
    """The SMS gateway's delivery of the question purged as ``kept`` says: dead after
    one failed attempt (an admin's purge), skipped untried (an admin's purge), waiting
    for its paused subscription (the retention job's), or, as a purge kept when no
    channel took the question, gone with "no channel" kept on the request."""
    if kept == "failing":
        set_sms_delivery(sessions, status=DeliveryStatus.DEAD, attempts=1, last_attempt_at=T0)
        assert purge(sessions, DeliveryStatus.DEAD, at) == 1
    elif kept == "not sent":
        set_sms_delivery(sessions, status=DeliveryStatus.SKIPPED, attempts=0)
        assert purge(sessions, DeliveryStatus.SKIPPED, at) == 1
    elif kept == "stopped":
        with sessions() as session:
            sms = session.scalars(
                select(WebhookSubscription.id).where(WebhookSubscription.url.endswith("/sms"))
            ).one()
        change_subscription(sessions, sms, active=False)
        with sessions.begin() as session:
            purged = webhooks.purge_waiting_for_stopped(session=session, before=at, now=at)
        assert purged["deliveries"] == 1
    else:
        with sessions.begin() as session:
            session.execute(
                update(ConsentRequest)
                .where(ConsentRequest.id == request_id)
                .values(question_purged_at=at, not_reached_when_purged=request_reach.NO_CHANNEL)
            )
            session.execute(
                WebhookDelivery.__table__.delete().where(
                    WebhookDelivery.subscription_id.in_(
                        select(WebhookSubscription.id).where(
                            WebhookSubscription.url.endswith("/sms")
                        )
                    )
                )
            )


FAILED_3 = request_reach.FAILING.format(attempts="3 attempts")


@pytest.mark.parametrize(
    ("kept", "then", "expected"),
    [
        ("failing", "delivered", None),
        ("failing", "dead", FAILED_3),
        ("failing", "untried", None),
        ("not sent", "delivered", None),
        ("not sent", "dead", request_reach.NOT_SENT),
        ("not sent", "untried", None),
        ("stopped", "delivered", None),
        ("stopped", "dead", request_reach.CHANNEL_STOPPED),
        ("stopped", "untried", None),
        ("no channel", "delivered", None),
        ("no channel", "dead", FAILED_3),
        ("no channel", "untried", None),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 12 else "",
)
def test_a_purged_question_reads_as_its_kept_deliveries_with_those_left(
    sessions: sessionmaker[Session], world: World, kept: str, then: str, expected: str | None
) -> None:
    """After a purge of one channel's delivery of the question, ``not_reached`` is what
    all its deliveries would say: the purged one as the purge kept it, the other
    channel's (the app's, untried at the purge) as it is now: delivered, dead after
    three failed attempts, or still to be tried."""
    two_channels(sessions)
    request_id = ask(sessions, world)
    minute = T0 + dt.timedelta(minutes=1)
    kept_as(sessions, request_id, kept, minute)
    with sessions() as session:
        assert session.get_one(ConsentRequest, request_id).question_purged_at == minute
    if then == "delivered":
        set_app_delivery(
            sessions, status=DeliveryStatus.DELIVERED, attempts=1, delivered_at=minute
        )
    elif then == "dead":
        set_app_delivery(sessions, status=DeliveryStatus.DEAD, attempts=3, last_attempt_at=minute)
    assert reasons(sessions, request_id, minute) == expected


def test_a_question_delivered_after_a_purge_still_reached_them_once_purged_in_turn(
    sessions: sessionmaker[Session], world: World
) -> None:
    """An admin purged the SMS gateway's dead delivery of a pending request's question
    ("every attempt failed" kept); the app's got it through later; then the delivered
    ones were purged too. Only the first purge kept anything: with the app's delivery
    gone, ``not_reached`` read the kept "every attempt failed", then "it never reached
    them", of a question the recipient got. Each purge adds what its deliveries said to
    what was kept."""
    two_channels(sessions)
    request_id = ask(sessions, world)
    set_sms_delivery(sessions, status=DeliveryStatus.DEAD, attempts=1, last_attempt_at=T0)
    minute = T0 + dt.timedelta(minutes=1)
    assert purge(sessions, DeliveryStatus.DEAD, minute) == 1
    set_app_delivery(sessions, status=DeliveryStatus.DELIVERED, attempts=2, delivered_at=minute)
    assert reasons(sessions, request_id, minute) is None
    an_hour_on = T0 + dt.timedelta(hours=1)
    assert purge(sessions, DeliveryStatus.DELIVERED, an_hour_on) == 1
    assert reasons(sessions, request_id, an_hour_on) is None
    with sessions() as session:
        assert session.get_one(ConsentRequest, request_id).question_purged_at == minute
