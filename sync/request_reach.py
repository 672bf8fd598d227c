"""Whether a consent request's question reached the recipient's channel.

A request is ``pending`` from the moment the courier asks until it is answered or
lapses, whatever became of its ``consent.requested`` on the way: a courier at the
door waited the whole TTL for an answer that could not come when no channel took
consent requests at the station, or when the channel's receiver failed every attempt
(down, or its subscription disabled or paused). ``not_reached`` says so, read from
the question's webhook deliveries, and ``tell_courier`` puts the parcel in the
courier's pull feed when it starts to hold (so a long pull waiting for the answer
hears it): when the question is written with no receiver sending, at its first
failed attempt, and when the subscription it waits for is disabled or paused; and
when it gets through after all: sent after failing, or its subscription sending again.

Read from the deliveries as they are: a question asked before the channel subscribed
is said nothing about (None), never "not reached" on no evidence. A purge of its
deliveries (an admin's, or the retention job's) keeps on the request what they said
(``keep_before_purge``): read from there afterwards with the deliveries left (another
channel's, still trying), as all of them would read, neither silent (null) on a
question that never got through, nor "nobody takes consent requests here" on one
delivered before its channel stopped taking them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager

from sqlalchemy import SelectBase, select, update
from sqlalchemy.orm import Session

from models import (
    ConsentRequest,
    ConsentRequestStatus,
    FeedKind,
    OutboxMessage,
    WebhookDelivery,
    WebhookSubscription,
)
from models.enums import DeliveryStatus
from sync import feed, outbox
from sync.sql import among, chunks

TOPIC = "consent.requested"
# The longest a request waits for its answer (``sync.consent_requests.MAX_TTL``).
MAX_TTL = dt.timedelta(hours=24)
NO_CHANNEL = (
    "no recipient channel takes consent requests at this station: the recipient is not asked"
)
CHANNEL_STOPPED = (
    "the recipient channel's webhook subscription is disabled or paused: the question "
    "waits, unsent, until an admin enables it"
)
FAILING = (
    "every attempt to send the question to the recipient's channel failed so far "
    "({attempts}); it is tried again until the request expires"
)
NOT_SENT = "the question was not sent to the recipient's channel before the request lapsed"
NEVER = "the question never reached the recipient's channel: the recipient was not asked"


def _candidates(requests: Sequence[ConsentRequest]) -> list[ConsentRequest]:
    """The requests whose question was to be sent and is unanswered: pending as stored
    (lapsed or not), neither kept back nor lapsed before they reached the server."""
    return [
        r
        for r in requests
        if r.status == ConsentRequestStatus.PENDING
        and r.status_reason is None
        and r.created_at < r.expires_at
    ]


def not_reached(
    session: Session, requests: Sequence[ConsentRequest], now: dt.datetime
) -> dict[int, str]:
    """Of ``requests``, those whose question has not reached the recipient's channel,
    each with why: by request id. While a request is pending, why it has not yet; once
    it lapsed, that it never did. One delivered to any receiver reached it."""
    asked = _candidates(requests)
    reasons: dict[int, str] = {}
    for request, why in _unreached(session, asked).items():
        lapsed = now >= request.expires_at or request.lapse_announced_at is not None
        reasons[request.id] = f"{NEVER} ({why})" if lapsed else why
    return reasons


def keep_before_purge(
    session: Session,
    request_ids: Collection[int],
    now: dt.datetime,
    purged: SelectBase,
) -> int:
    """Keep on these requests (whose question's deliveries a purge is about to delete:
    an admin's, or the retention job's) what the deliveries it deletes (``purged``: the
    ids of the deliveries) say, for ``not_reached`` to read with the deliveries left
    from then on: only unanswered ones (an answered one says nothing), with what an
    earlier purge kept (one delivered after it, purged in turn, still reached them). A
    purged delivery has settled (delivered, dead, or skipped once the request ended) or
    waited for a stopped subscription past the retention (its request lapsed since), so
    what it says no longer changes; another channel's delivery of the question, not
    purged, may still get through or fail (a dead one purged while the request is
    pending): what all of them said together at the purge (one not yet tried: "nothing
    said") was no verdict to keep. Kept again (the retention job keeps its purges'
    together, then each its own), the same deliveries say the same. How many requests
    it was kept on."""
    kept = 0
    for chunk in chunks(sorted(request_ids)):
        asked = _candidates(
            session.scalars(
                select(ConsentRequest)
                .where(
                    ConsentRequest.id.in_(chunk),
                    ConsentRequest.status == ConsentRequestStatus.PENDING,
                )
                .order_by(ConsentRequest.id)  # as the lapse job locks them: no deadlock
                .with_for_update()
            ).all()
        )
        found = _deliveries(session, asked, only=purged)
        for request in asked:
            deliveries = found.get(request.id)
            if not deliveries:
                continue  # none of its question's deliveries goes: nothing to keep
            if request.question_purged_at is None:
                request.question_purged_at = now
            elif (earlier := _kept(request)) is not None:
                deliveries = [*deliveries, earlier]  # an earlier purge's
            # A purged delivery waits only for a stopped subscription: none is sending.
            request.not_reached_when_purged = _why(deliveries, {}, anyone_takes=True)
            request.question_attempts_when_purged = max(d.attempts for d in deliveries)
            kept += 1
    session.flush()
    return kept


def _unreached(session: Session, asked: Sequence[ConsentRequest]) -> dict[ConsentRequest, str]:
    """Of the requests ``asked`` (``_candidates``), those whose question has not reached
    the recipient's channel, with why (as if pending): from their deliveries, and from
    what a purge kept of the purged ones (``_kept``), read with those left as if they
    were all still there. A purge of some of a question's deliveries (an admin's of the
    dead ones) may leave another still trying: delivered since, the question reached
    them; failed since, every attempt failed, whatever was kept of the purged ones."""
    if not asked:
        return {}
    subscriptions = {
        s.id: s
        for s in session.scalars(
            select(WebhookSubscription).where(WebhookSubscription.active.is_(True))
        )
    }
    found = _deliveries(session, asked)
    anyone_takes = {r.station_id: _taken_at(subscriptions, r.station_id) for r in asked}
    unreached: dict[ConsentRequest, str] = {}
    for request in asked:
        deliveries = found.get(request.id, [])
        if request.question_purged_at is not None:
            kept = _kept(request)
            if kept is None and not deliveries:
                # Nobody took the question when it was purged; nothing came since.
                unreached[request] = NO_CHANNEL
                continue
            deliveries = deliveries + ([] if kept is None else [kept])
        why = _why(deliveries, subscriptions, anyone_takes[request.station_id])
        if why is not None:
            unreached[request] = why
    return unreached


def _kept(request: ConsentRequest) -> WebhookDelivery | None:
    """The purged deliveries of ``request``'s question as one that says what they said
    (``keep_before_purge``), for ``_why`` to read with those left: delivered; waiting
    for a stopped subscription; settled unsent after its attempts failed, or with one
    never tried. None: no channel took it (kept so before the purged deliveries' own
    verdict was kept: there were none)."""
    why = request.not_reached_when_purged
    attempts = request.question_attempts_when_purged or 0
    if why is None:
        return WebhookDelivery(status=DeliveryStatus.DELIVERED, attempts=attempts)
    if why == NO_CHANNEL:
        return None
    if why == CHANNEL_STOPPED:  # no subscription: never sending
        return WebhookDelivery(status=DeliveryStatus.PENDING, attempts=attempts)
    if why == NOT_SENT:
        return WebhookDelivery(status=DeliveryStatus.SKIPPED, attempts=0)
    return WebhookDelivery(status=DeliveryStatus.DEAD, attempts=max(attempts, 1))


def _deliveries(
    session: Session, asked: Sequence[ConsentRequest], only: SelectBase | None = None
) -> dict[int, list[WebhookDelivery]]:
    """The deliveries of the questions of the requests ``asked``, by request id; with
    ``only`` (delivery ids), only those among them."""
    if not asked:
        return {}
    all_subscriptions = list(session.scalars(select(WebhookSubscription.id)))
    keys = sorted({outbox.parcel_key(r.tracking_no) for r in asked})
    since = min(r.created_at for r in asked)
    found: dict[int, list[WebhookDelivery]] = {}
    for chunk in chunks(keys):
        # By (subscription, ordering key): the index a claim reads too, never the table.
        query = (
            select(WebhookDelivery, OutboxMessage.payload)
            .join(OutboxMessage, OutboxMessage.id == WebhookDelivery.message_id)
            .where(
                WebhookDelivery.subscription_id.in_(all_subscriptions),
                among(session, WebhookDelivery.ordering_key, chunk),
                WebhookDelivery.topic == TOPIC,
                WebhookDelivery.created_at >= since,
            )
        )
        if only is not None:
            query = query.where(WebhookDelivery.id.in_(only.scalar_subquery()))
        for delivery, payload in session.execute(query).all():
            request_id = payload.get("request_id") if isinstance(payload, dict) else None
            if isinstance(request_id, int):
                found.setdefault(request_id, []).append(delivery)
    return found


def _taken_at(subscriptions: dict[int, WebhookSubscription], station_id: int) -> bool:
    """Whether an active subscription takes consent requests of ``station_id``."""
    return any(
        outbox.covers(s.topics, s.station_id, TOPIC, station_id) for s in subscriptions.values()
    )


def _why(
    deliveries: list[WebhookDelivery],
    subscriptions: dict[int, WebhookSubscription],
    anyone_takes: bool,
) -> str | None:
    """Why a question with these deliveries has not reached a receiver; None when it
    has, or may yet without anyone's help (waiting for its first attempt)."""
    if not deliveries:
        # Nothing was written for it: nobody takes the topic here (else a delivery
        # would be there, unless purged or subscribed since: then nothing is said).
        return None if anyone_takes else NO_CHANNEL
    if any(d.status == DeliveryStatus.DELIVERED for d in deliveries):
        return None
    sending = [
        d
        for d in deliveries
        if d.status == DeliveryStatus.PENDING
        and (s := subscriptions.get(d.subscription_id)) is not None
        and s.disabled_at is None
    ]
    if not sending and any(d.status == DeliveryStatus.PENDING for d in deliveries):
        return CHANNEL_STOPPED
    # None sending nor waiting: settled unsent (skipped once the request lapsed, or dead),
    # their attempts failed, or none was made in time (the sender held up): no channel
    # was stopped for them.
    tried = sending or deliveries
    if all(d.attempts > 0 for d in tried):
        attempts = max(d.attempts for d in tried)
        return FAILING.format(attempts=f"{attempts} attempt{'s' if attempts > 1 else ''}")
    return None if sending else NOT_SENT


def tell_courier(session: Session, request_id: object) -> None:
    """Put the request's parcel in its courier's pull feed (a ``consent_request``
    entry): what the PDA reads of it changed. Nothing for an unknown id."""
    entry = _entry(session, request_id)
    if entry is not None:
        feed.record(session, [entry])


def _entry(session: Session, request_id: object) -> feed.FeedEntry | None:
    """The ``consent_request`` feed entry telling the request's courier; None for an
    unknown id."""
    request = session.get(ConsentRequest, request_id) if isinstance(request_id, int) else None
    if request is None:
        return None
    return feed.FeedEntry(
        request.station_id, request.courier_id, FeedKind.CONSENT_REQUEST, request.tracking_no
    )


def sends_to_anyone(session: Session, message: OutboxMessage | None) -> bool:
    """Whether ``message`` (a question just written; None: nobody wanted it) goes to a
    subscription that is sending (not disabled): from the subscriptions as the
    transaction read them (``outbox.sending_to``), not a query per question."""
    if message is None:
        return False
    return outbox.sending_to(session, message.topic, message.station_id)


def question_due_now(session: Session, request: ConsentRequest, now: dt.datetime) -> int:
    """Make ``request``'s ``consent.requested`` deliveries still waiting for a retry due
    at ``now``: it is no longer pending (answered, cancelled, lapsed), so their next
    claim skips them (``sync.webhooks._moot``) instead of sending. Until then they held
    back the parcel's later messages to that receiver (its outcome, a locker drop), for
    up to ``WEBHOOK_BACKOFF_MAX_SECONDS`` (an hour) after the answer when the question
    had been failing. Inside ``questions_due_together``, left to its end (0 here). How
    many were brought forward."""
    gathered = session.info.get(_GATHERED)
    if gathered is not None:
        gathered[request.id] = (outbox.parcel_key(request.tracking_no), now)
        return 0
    return _due_now(session, {request.id: (outbox.parcel_key(request.tracking_no), now)})


@contextmanager
def questions_due_together(session: Session) -> Iterator[None]:
    """Within it, the questions of the requests a transaction ends (``question_due_now``)
    are made due together when it ends: one read and one lock of their deliveries, in
    id order. Request by request, the lapse job's batch of 500, or a push ending
    several, read each request's deliveries apart and locked them in the order of the
    requests, not of the deliveries: against an admin's change locking a subscription's
    deliveries by id (``sync.webhooks._enable_again``, ``_drop_uncovered``), each could
    hold one the other wanted next (a deadlock on PostgreSQL). Nested, the outermost
    one makes them due. Nothing is done when the block raises."""
    if _GATHERED in session.info:
        yield
        return
    gathered: dict[int, tuple[str, dt.datetime]] = {}
    session.info[_GATHERED] = gathered
    try:
        yield
    finally:
        del session.info[_GATHERED]
    _due_now(session, gathered)


_GATHERED = "request_reach.questions_due"


def _due_now(session: Session, asked: Mapping[int, tuple[str, dt.datetime]]) -> int:
    """Make due the waiting questions of the requests ``asked`` (``{request id: (the
    parcel's ordering key, now)}``): found by their keys, then locked in id order, as
    every path locking several deliveries (``sync.webhooks._lock_deliveries``). How many
    were brought forward."""
    if not asked:
        return 0
    earliest = min(now for _, now in asked.values())
    waiting: dict[int, int] = {}  # delivery id: request id
    for chunk in chunks(sorted({key for key, _ in asked.values()})):
        # By (subscription, ordering key): the index a claim reads too, never the table.
        for delivery_id, payload, next_attempt_at in session.execute(
            select(WebhookDelivery.id, OutboxMessage.payload, WebhookDelivery.next_attempt_at)
            .join(OutboxMessage, OutboxMessage.id == WebhookDelivery.message_id)
            .where(
                WebhookDelivery.subscription_id.in_(select(WebhookSubscription.id)),
                among(session, WebhookDelivery.ordering_key, chunk),
                WebhookDelivery.topic == TOPIC,
                WebhookDelivery.status == DeliveryStatus.PENDING,
                WebhookDelivery.next_attempt_at > earliest,
            )
        ):
            request_id = payload.get("request_id") if isinstance(payload, dict) else None
            if isinstance(request_id, int) and request_id in asked:
                if next_attempt_at > asked[request_id][1]:
                    waiting[delivery_id] = request_id
    if not waiting:
        return 0
    # Locked in id order (one statement per chunk of sorted ids: the same order), read
    # again under the lock: one claimed, sent or replayed meanwhile is left as it is.
    locked = [
        row
        for chunk in chunks(sorted(waiting))
        for row in session.execute(
            select(WebhookDelivery.id, WebhookDelivery.next_attempt_at)
            .where(
                WebhookDelivery.id.in_(chunk),
                WebhookDelivery.status == DeliveryStatus.PENDING,
                WebhookDelivery.next_attempt_at > earliest,
            )
            .order_by(WebhookDelivery.id)
            .with_for_update()
        )
    ]
    due: dict[dt.datetime, list[int]] = {}
    for delivery_id, next_attempt_at in locked:
        _, now = asked[waiting[delivery_id]]
        if next_attempt_at > now:
            due.setdefault(now, []).append(delivery_id)
    for now, ids in due.items():
        for chunk in chunks(ids):
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_(chunk))
                .values(next_attempt_at=now)
                .execution_options(synchronize_session=False)
            )
    return sum(len(ids) for ids in due.values())


def tell_waiting(
    session: Session,
    subscription_id: int,
    now: dt.datetime,
    deliveries: Collection[int] | None = None,
    also: object = None,
) -> int:
    """Tell the couriers whose questions wait for this subscription, just stopped
    (disabled after its failures, or paused by an admin), that they are not getting
    through (``not_reached``): nothing is sent to it until an admin enables it; and,
    once it sends again (enabled or resumed, or its disabling undone by a success
    recorded late: ``sync.webhooks._undo_disabling``), that they are on their way. Only
    questions young enough to be pending (a request lasts a day at most).
    ``deliveries``: only these of its deliveries (about to be deleted: the subscription
    no longer takes them, ``sync.webhooks._drop_uncovered``). ``also``: a request whose
    courier is told at the same moment, whatever it waits for (the question whose
    attempt stopped or restarted the subscription: its first failure, a success after
    failing), in the same entries: one, not one for each reason (``feed.record``
    writes an entry once). How many requests' couriers were told."""
    query = (
        select(OutboxMessage.payload)
        .join(WebhookDelivery, WebhookDelivery.message_id == OutboxMessage.id)
        .where(
            WebhookDelivery.subscription_id == subscription_id,
            WebhookDelivery.topic == TOPIC,
            WebhookDelivery.status == DeliveryStatus.PENDING,
            WebhookDelivery.created_at > now - MAX_TTL,
        )
    )
    payloads = (
        list(session.scalars(query))
        if deliveries is None
        else [
            payload
            for chunk in chunks(sorted(deliveries))
            for payload in session.scalars(query.where(WebhookDelivery.id.in_(chunk)))
        ]
    )
    request_ids = sorted(
        {
            payload["request_id"]
            for payload in payloads
            if isinstance(payload, dict) and isinstance(payload.get("request_id"), int)
        }
    )
    entries = [
        feed.FeedEntry(r.station_id, r.courier_id, FeedKind.CONSENT_REQUEST, r.tracking_no)
        for chunk in chunks(request_ids)
        for r in session.scalars(
            select(ConsentRequest).where(
                ConsentRequest.id.in_(chunk),
                ConsentRequest.status == ConsentRequestStatus.PENDING,
                ConsentRequest.expires_at > now,
            )
        )
    ]
    if (entry := _entry(session, also)) is not None:
        entries.append(entry)
    feed.record(session, entries)
    return len(set(entries))
