"""Consent asked for at the door, answered by the recipient (issue 6).

The recipient is absent; the courier's PDA asks for their consent to a locker
or pickup-point delivery (a ``consent_requested`` event, or online). The request
goes to the recipient's channel through the outbox (``consent.requested``). The
channel answers through ``POST /consents`` with the request's id: a grant
creates the consent like any other (and the rules judge the parcel again); a
refusal is recorded, withdraws for the parcel the consents given before it, and
goes to the audit log (``consent_refused``). Either way the answer reaches the
courier's PDA through its pull feed (a ``consent_request`` entry), which it may
long-poll.

A request for a parcel the station has not taken in, of another station, or
whose recipient has no phone number, cannot be sent: it is kept as ``unsent``
with the reason. A correction voiding the request's event cancels it: the
recipient's answer no longer counts (one already given stands: it was theirs).

The channel hears what became of each request it was asked, once, through the outbox
and after its ``consent.requested`` (the parcel's ordering key): one topic per outcome,
as ``consent.request_cancelled`` is one, each with its own facts (the consent that
answers a grant, a refusal's reason): ``consent.request_granted``,
``consent.request_refused``, ``consent.request_lapsed`` (pending at its expiry:
``announce_lapsed``, a job) and ``consent.request_revoked`` (``sync.consents.revoke``,
or the recipient's refusal of another request withdrawing the consent that granted it:
``_withdraw_granted_before``).
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import and_, exists, or_, select, true, update
from sqlalchemy.orm import Session, aliased

from models import (
    Consent,
    ConsentChannel,
    ConsentMethod,
    ConsentRequest,
    ConsentRequestStatus,
    ConsentScope,
    EventType,
    FeedKind,
    Parcel,
    ParcelStatus,
    ScanEvent,
    utcnow,
)
from sync import audit, consents, feed, outbox, request_reach
from sync.errors import Conflict, InvalidInput, NotFound, RateLimited
from sync.events import shifted
from sync.paging import MAX_PAGE_SIZE
from sync.sign_in_limits import Limit, window_text
from sync.sql import Prebuilt, among, among_param, chunks, created_once
from sync.status import lock_parcels
from sync.tracking import normalize

MAX_TTL = dt.timedelta(hours=24)
# A parcel in its recipient's hands: delivered in person, or collected from the locker.
# Asking them to agree to leave it in a locker tells them something false.
HANDED_OVER = (ParcelStatus.DELIVERED, ParcelStatus.COLLECTED)
HANDED_OVER_REASON = "the parcel was handed over to the recipient: nothing to ask"
VOIDED_REASON = "voided by a correction from the PDA"
# A request the recipient answered: granted (revoked since, maybe) or refused.
ANSWERED = (
    ConsentRequestStatus.GRANTED,
    ConsentRequestStatus.REVOKED,
    ConsentRequestStatus.REFUSED,
)


@dataclass(frozen=True)
class RequestDraft:
    tracking_no: str
    method: ConsentMethod
    point_id: str | None = None
    channel: ConsentChannel | None = None
    expires_at: dt.datetime | None = None


@dataclass(frozen=True)
class Asker:
    """The courier (and PDA) asking, at their station."""

    courier_id: int
    station_id: int
    device_id: str | None = None


def request_consent(
    *,
    session: Session,
    draft: RequestDraft,
    asker: Asker,
    ttl: dt.timedelta,
    requested_at: dt.datetime,
    now: dt.datetime,
    event_id: int | None = None,
    client_event_id: uuid.UUID | None = None,
    voided: bool = False,
    online: bool = False,
    client_request_id: uuid.UUID | None = None,
    held_back: str | None = None,
) -> ConsentRequest:
    """Record a request and announce it to the recipient's channel.

    ``requested_at`` is when the courier asked (corrected clock); the request lapses
    at ``expires_at`` (default ``ttl`` later, at most 24 hours). One made offline may
    arrive already lapsed: it is kept, and not sent. ``online``: asked through the
    API, where a parcel of another station is one not taken in (the answer must not
    tell the courier it exists: SECURITY.md threat 3); from a PDA's event it is kept,
    unsent, at the parcel's station, whose manager sees a courier asked for it.
    ``held_back``: why a request that would be sent is kept ``unsent`` instead (a
    PDA's beyond the parcel's bound, ``requests_from_events``).
    """
    point_id = consents.point_named(draft.method, draft.point_id)
    expires_at = draft.expires_at or requested_at + ttl
    if not requested_at < expires_at <= requested_at + MAX_TTL:
        raise InvalidInput(
            "expires_at must be after the request and at most 24 hours later",
            code="invalid_expiry",
            field="expires_at",
        )
    parcel = session.scalar(select(Parcel).where(Parcel.tracking_no == draft.tracking_no))
    if online and parcel is not None and parcel.station_id != asker.station_id:
        parcel = None
    request = ConsentRequest(
        station_id=parcel.station_id if parcel else asker.station_id,
        tracking_no=draft.tracking_no,
        courier_id=asker.courier_id,
        device_id=asker.device_id,
        event_id=event_id,
        client_event_id=client_event_id,
        client_request_id=client_request_id,
        method=draft.method,
        point_id=point_id,
        channel=draft.channel,
        requested_at=requested_at,
        expires_at=expires_at,
        status=ConsentRequestStatus.PENDING,
        created_at=now,
    )
    if voided:
        request.status = ConsentRequestStatus.CANCELLED
        request.status_reason = VOIDED_REASON
    elif parcel is None:
        request.status = ConsentRequestStatus.UNSENT
        request.status_reason = "the parcel is not taken in at this station: nobody to ask"
    elif parcel.station_id != asker.station_id:
        request.status = ConsentRequestStatus.UNSENT
        request.status_reason = "the parcel belongs to another station"
    elif not parcel.recipient_phone:
        request.status = ConsentRequestStatus.UNSENT
        request.status_reason = "the parcel's recipient has no phone number"
    elif parcel.status in HANDED_OVER:
        # Cancelled, not sent, as it is once the delivery arrives after it was sent
        # (``cancel_for_handed_over``): the same end whichever arrives first (rule 3).
        request.status = ConsentRequestStatus.CANCELLED
        request.status_reason = HANDED_OVER_REASON
    elif held_back is not None and now < expires_at:
        request.status = ConsentRequestStatus.UNSENT
        request.status_reason = held_back
    session.add(request)
    session.flush()
    if parcel is not None and request.status == ConsentRequestStatus.PENDING:
        if expires_at <= now:
            request.status_reason = "lapsed before it reached the server: not sent"
        else:
            _announce_requested(session, parcel, request, now)
    return request


def _announce_requested(
    session: Session, parcel: Parcel, request: ConsentRequest, now: dt.datetime
) -> None:
    """``consent.requested``: the recipient's channel asks them ``request``'s question.
    When no receiver is sending it (none takes the topic here, or only a disabled one),
    the courier's pull feed says so at once (``request_reach``): nobody is asked."""
    message = outbox.announce(
        session=session,
        topic="consent.requested",
        ordering_key=outbox.parcel_key(parcel.tracking_no),
        station_id=parcel.station_id,
        data={
            "request_id": request.id,
            "tracking_no": parcel.tracking_no,
            "station_id": parcel.station_id,
            "recipient_name": parcel.recipient_name,
            "recipient_phone": parcel.recipient_phone,
            "address": parcel.address,
            "method": request.method,
            "point_id": request.point_id,
            "channel": request.channel,
            "requested_at": request.requested_at,
            "expires_at": request.expires_at,
        },
        now=now,
    )
    if not request_reach.sends_to_anyone(session, message):
        request_reach.tell_courier(session, request.id)


def request_once(
    *,
    session: Session,
    draft: RequestDraft,
    asker: Asker,
    client_request_id: uuid.UUID | None,
    ttl: dt.timedelta,
    now: dt.datetime,
    per_parcel: Limit | None = None,
) -> tuple[ConsentRequest, bool]:
    """``request_consent`` online (``POST /consents/requests``): ``(request, pending)``,
    ``pending`` True when the same question, pending, answers (``asking_bound``).

    Once per ``client_request_id`` of the asking PDA: a PDA that got no answer asks
    again with the same id, and gets the request made the first time (as it is now:
    answered, maybe) instead of a second question to the recipient. The same id with
    another request is a conflict. Two attempts at once: the second answers the
    first's request (``created_once``).

    Bounded for the recipient (``asking_bound``): the same question while one is
    pending answers that one (the courier's own) or is a conflict naming it (a
    colleague's), and at most ``per_parcel`` questions reach one parcel's recipient in
    its window."""

    def ask() -> ConsentRequest:
        return request_consent(
            session=session,
            draft=draft,
            asker=asker,
            ttl=ttl,
            requested_at=now,
            now=now,
            online=True,
            client_request_id=client_request_id,
        )

    earlier = (
        None
        if client_request_id is None
        else asked_as(session, asker.device_id, client_request_id)
    )
    pending = None
    if earlier is None:
        pending = asking_bound(
            session=session, draft=draft, asker=asker, per_parcel=per_parcel, now=now
        )
        if client_request_id is not None:  # an attempt with this id held the lock first
            earlier = asked_as(session, asker.device_id, client_request_id)
    if earlier is None:
        if pending is not None:
            return pending, True
        if client_request_id is None:
            return ask(), False
        request, new = created_once(
            session, lambda: asked_as(session, asker.device_id, client_request_id), ask
        )
        if new:
            return request, False
        earlier = request
    differing = [
        name
        for name, asked, stored in (
            ("courier", asker.courier_id, earlier.courier_id),
            ("tracking_no", draft.tracking_no, earlier.tracking_no),
            ("method", draft.method, earlier.method),
            ("point_id", consents.point_named(draft.method, draft.point_id), earlier.point_id),
            ("channel", draft.channel, earlier.channel),
            ("expires_at", draft.expires_at or earlier.expires_at, earlier.expires_at),
        )
        if asked != stored
    ]
    if differing:
        raise Conflict(
            f"client_request_id {client_request_id} was used for consent request "
            f"{earlier.id}, whose {consents.fields_differ(differing)}: ask again with a new id",
            code="client_request_id_reused",
            field="client_request_id",
        )
    return earlier, False


def asking_bound(
    *,
    session: Session,
    draft: RequestDraft,
    asker: Asker,
    per_parcel: Limit | None,
    now: dt.datetime,
) -> ConsentRequest | None:
    """What stops a courier (or a stolen PDA) from sending one recipient question after
    question: each request sent is a message to their phone.

    * The same question (parcel, method, point and channel) while one is pending,
      sent and neither answered, cancelled nor lapsed: the courier's own pending
      request is the answer (returned: nothing is sent again);
      a colleague's is a 409 ``consent_request_pending`` naming it (the consent it may
      bring covers the parcel, whoever asked). Once it lapsed or was refused, or for
      another method or point, the courier asks anew; by another channel too (the
      recipient did not get the SMS: the courier at the door has them called, instead
      of waiting for the SMS request to lapse).
    * At most ``per_parcel.count`` requests sent for the parcel in any
      ``per_parcel.window``, by any courier, online or from a PDA's events: beyond, a
      429 ``too_many_requests`` with the seconds until the oldest leaves the window.

    Only a request that would be sent is bounded: one for a parcel of another station
    or not taken in, or without a phone, is kept ``unsent`` as ever (its answer must
    not tell the courier the parcel exists: SECURITY.md threat 3). Checked under the
    parcel's lock, so that two requests at once take turns: its number's first
    (``sync.status.lock_parcels``), which a push holds while it makes its PDA's requests
    (``requests_from_events``), then its row."""
    lock_parcels(session, [draft.tracking_no])
    parcel = session.scalar(
        select(Parcel).where(Parcel.tracking_no == draft.tracking_no).with_for_update()
    )
    if parcel is None or parcel.station_id != asker.station_id or not parcel.recipient_phone:
        return None
    pending = _same_question_pending(session, draft, now)
    if pending is not None:
        if pending.courier_id == asker.courier_id:
            return pending
        raise Conflict(
            f"consent request {pending.id}, another courier's, asks the recipient the same "
            f"until {pending.expires_at.isoformat()}: its answer covers the parcel; ask "
            "again once it lapsed or was refused",
            code="consent_request_pending",
            field="tracking_no",
        )
    if per_parcel is not None:
        sent = _sent_in_window(session, parcel.tracking_no, per_parcel, now)
        if len(sent) >= per_parcel.count:
            # Below the limit again when the (held - count + 1)-th oldest leaves it.
            leaving = sent[len(sent) - per_parcel.count]
            retry_after = max(1, math.ceil((leaving + per_parcel.window - now).total_seconds()))
            raise RateLimited(
                f"{_asked_text(parcel.tracking_no, len(sent), per_parcel)}; "
                f"try again in {retry_after} seconds",
                retry_after=retry_after,
            )
    return None


def _same_question_pending(
    session: Session, draft: RequestDraft, now: dt.datetime
) -> ConsentRequest | None:
    """The latest request asking the recipient ``draft``'s question (parcel, method,
    point and channel) that is pending: sent, neither answered, cancelled nor lapsed."""
    point_id = consents.point_named(draft.method, draft.point_id)
    return session.scalar(
        select(ConsentRequest)
        .where(
            ConsentRequest.tracking_no == draft.tracking_no,
            ConsentRequest.method == draft.method,
            ConsentRequest.point_id.is_(None)
            if point_id is None
            else ConsentRequest.point_id == point_id,
            ConsentRequest.channel.is_(None)
            if draft.channel is None
            else ConsentRequest.channel == draft.channel,
            _sent(),
            ConsentRequest.status == ConsentRequestStatus.PENDING,
            ConsentRequest.lapse_announced_at.is_(None),
            ConsentRequest.expires_at > now,
        )
        .order_by(ConsentRequest.id.desc())
        .limit(1)
    )


def _sent_in_window(
    session: Session, tracking_no: str, per_parcel: Limit, now: dt.datetime
) -> Sequence[dt.datetime]:
    """When each request sent for the parcel in ``per_parcel``'s window was, oldest first:
    its ``created_at``, when it reached the server, or, held back then, when it was sent at
    last (``_send_held_back``)."""
    return session.scalars(
        select(ConsentRequest.created_at)
        .where(
            ConsentRequest.tracking_no == tracking_no,
            _sent(),
            ConsentRequest.created_at > now - per_parcel.window,
        )
        .order_by(ConsentRequest.created_at)
    ).all()


def _asked_text(tracking_no: str, sent: int, per_parcel: Limit) -> str:
    return (
        f"the recipient of {tracking_no} was asked for consent {sent} times in the last "
        f"{window_text(per_parcel.window)} (at most {per_parcel.count})"
    )


def _sent() -> Any:
    """A request whose question went to the recipient's channel: not ``unsent``, not
    lapsed on its way to the server, not cancelled at arrival by a correction."""
    return and_(
        ConsentRequest.status != ConsentRequestStatus.UNSENT,
        ConsentRequest.created_at < ConsentRequest.expires_at,
        or_(
            ConsentRequest.status != ConsentRequestStatus.CANCELLED,
            ConsentRequest.answered_at.is_not(None),
        ),
    )


def asked_as(
    session: Session, device_id: str | None, client_request_id: uuid.UUID
) -> ConsentRequest | None:
    """The request the PDA ``device_id`` asked online with its id ``client_request_id``."""
    if device_id is None:
        return None
    return session.scalar(
        select(ConsentRequest).where(
            ConsentRequest.device_id == device_id,
            ConsentRequest.client_request_id == client_request_id,
        )
    )


def requests_from_events(
    *,
    session: Session,
    events: Iterable[dict[str, Any]],
    ttl: dt.timedelta,
    now: dt.datetime,
    per_parcel: Limit | None = None,
) -> list[ConsentRequest]:
    """Requests made on PDAs: one per stored ``consent_requested`` event (row dicts as
    ``sync.ingest.event_row`` builds them, with their ``id``). The request's own
    ``expires_at``, on the PDA's clock, is corrected by the same offset as the event.

    Never refused (the event is the field's record), but one asking the same question
    as a request pending (from this PDA, another of the courier's, or a colleague's), or
    beyond ``per_parcel`` sent for its parcel in the window, is kept ``unsent``, saying
    so (``_held_back``): else a PDA (a stolen one, an app in a loop, a courier tapping
    twice) pushing question after question went round the bound ``asking_bound`` puts
    on ``POST /consents/requests``. Counted in arrival
    order, this push's own included, and within the push in its PDA's seq order (the
    order the courier asked in, whatever order the push lists them in: rule 3). Made
    under the parcels' locks the push's projection took (``sync.status.lock_parcels``),
    as ``asking_bound`` takes them: an online ask or another PDA's push at the same
    instant waits, and sees these requests."""
    rows = sorted(
        (row for row in events if row["type"] == EventType.CONSENT_REQUESTED),
        key=lambda row: (row["device_id"], row["seq"]),
    )
    voided = voided_at_arrival(session, rows)
    made = []
    for row in rows:
        asked = row["details"]["request"]
        offset = row["occurred_at_device"] - row["occurred_at"]
        expires_at = (  # saturating: a PDA clock centuries off must not overflow it
            shifted(dt.datetime.fromisoformat(asked["expires_at"]), -offset)
            if "expires_at" in asked
            else None
        )
        if expires_at is not None and not (
            row["occurred_at"] < expires_at <= row["occurred_at"] + MAX_TTL
        ):
            # An expiry the PDA set before the request or a day on: the event stays
            # stored (nothing from the field is lost); the request lapses after the TTL.
            expires_at = None
        draft = RequestDraft(
            tracking_no=row["tracking_no"],
            method=ConsentMethod(asked["method"]),
            point_id=asked.get("point_id"),
            channel=ConsentChannel(asked["channel"]) if "channel" in asked else None,
            expires_at=expires_at,
        )
        asker = Asker(row["courier_id"], row["station_id"], row["device_id"])
        is_voided = (row["device_id"], row["client_event_id"]) in voided
        online = (
            None
            if now >= (expires_at or row["occurred_at"] + ttl)
            else _asked_online_pending(session, draft, asker, now, lock=is_voided)
        )
        if online is not None:
            # The courier asked the same online, then their PDA recorded it offline:
            # the event's request is that one, as the online door answers the courier
            # with the event's pending request when the event came first (nothing sent).
            online.event_id = row["id"]
            online.client_event_id = row["client_event_id"]
            if is_voided and _cancel(session, online, now):
                # Its correction came first or in the same push: it cancels that request
                # as it does when it comes later (``cancel_voided``), however the PDA
                # split its stream (rule 3).
                _send_held_back(session, online, per_parcel, now)
            made.append(online)
            continue
        made.append(
            request_consent(
                session=session,
                draft=draft,
                asker=asker,
                ttl=ttl,
                requested_at=row["occurred_at"],
                now=now,
                event_id=row["id"],
                client_event_id=row["client_event_id"],
                voided=is_voided,
                held_back=None if is_voided else _held_back(session, draft, per_parcel, now),
            )
        )
    return made


def _asked_online_pending(
    session: Session, draft: RequestDraft, asker: Asker, now: dt.datetime, *, lock: bool = False
) -> ConsentRequest | None:
    """The courier's own pending request asking ``draft``'s question, made online (no
    event of its own), that a PDA's event asking the same is: the recipient is asked once
    whichever arrives first (``asking_bound`` answers the online ask with the event's
    request the other way round). Only for a request the event would send: for the
    parcel of the asker's station, with a phone (else it would be ``unsent``)."""
    parcel = session.scalar(select(Parcel).where(Parcel.tracking_no == draft.tracking_no))
    if parcel is None or parcel.station_id != asker.station_id or not parcel.recipient_phone:
        return None
    pending = _same_question_pending(session, draft, now)
    if pending is None or pending.event_id is not None or pending.courier_id != asker.courier_id:
        return None
    if lock:  # to be cancelled: as locked, still pending (an answer may have come meanwhile)
        # Not waited for: the push holds the parcel's locks by now, which an answer
        # holding this row takes after it (``answer_request``). One being answered at
        # this instant is taken as answered first (the event gets its own request,
        # cancelled), as when the answer commits before the push.
        pending = session.scalar(
            select(ConsentRequest)
            .where(ConsentRequest.id == pending.id)
            .with_for_update(skip_locked=True)
            .execution_options(populate_existing=True)
        )
        if (
            pending is None
            or pending.status != ConsentRequestStatus.PENDING
            or has_lapsed(pending, now)
        ):
            return None
    return pending


def _held_back(
    session: Session, draft: RequestDraft, per_parcel: Limit | None, now: dt.datetime
) -> str | None:
    """Why a PDA's request for the parcel is not sent, as ``asking_bound`` refuses to send
    one online: the same question is pending (asked by this courier, on this or another
    of their PDAs, or by a colleague: its answer covers the parcel whoever asked), or the
    parcel's bound is reached. Its event is stored all the same (rule 1)."""
    pending = _same_question_pending(session, draft, now)
    if pending is not None:
        return (
            f"{HELD_BACK}consent request {pending.id} asks the recipient the same until "
            f"{pending.expires_at.isoformat()}; its answer covers the parcel"
        )
    if per_parcel is None:
        return None
    sent = len(_sent_in_window(session, draft.tracking_no, per_parcel, now))
    if sent < per_parcel.count:
        return None
    return f"{HELD_BACK}{_asked_text(draft.tracking_no, sent, per_parcel)}"


# How the reason of a PDA's request held back (``_held_back``) begins: one that would have
# been sent, unlike the other ``unsent`` (nobody to ask), which no cancellation changes.
HELD_BACK = "not sent: "


def _send_held_back(
    session: Session,
    cancelled: ConsentRequest,
    per_parcel: Limit | None,
    now: dt.datetime,
) -> ConsentRequest | None:
    """A PDA's request held back because ``cancelled`` asked the same question is sent
    once ``cancelled`` is (its event voided), as it would have been had the correction
    arrived with or before the first event (rule 3: the courier's PDA still asks it;
    voided at arrival, ``cancelled`` never stood in its way). The earliest such request
    still standing (its own event not voided, not lapsed), within the parcel's bound
    as when it arrived (``_held_back``); the others stay held behind it."""
    voiding = aliased(ScanEvent)
    held = session.scalars(
        select(ConsentRequest)
        .join(ScanEvent, ScanEvent.id == ConsentRequest.event_id)
        .where(
            ConsentRequest.tracking_no == cancelled.tracking_no,
            ConsentRequest.method == cancelled.method,
            ConsentRequest.point_id.is_(None)
            if cancelled.point_id is None
            else ConsentRequest.point_id == cancelled.point_id,
            ConsentRequest.channel.is_(None)
            if cancelled.channel is None
            else ConsentRequest.channel == cancelled.channel,
            _is_held_back(),
            ConsentRequest.created_at < ConsentRequest.expires_at,
            ConsentRequest.expires_at > now,
            ~exists().where(
                voiding.device_id == ScanEvent.device_id,
                voiding.voids_client_event_id == ScanEvent.client_event_id,
                voiding.seq > ScanEvent.seq,
            ),
        )
        .order_by(ConsentRequest.requested_at, ConsentRequest.id)
        .limit(1)
        # Not waited for: a held-back request locked now is one its own PDA's push is
        # cancelling (``cancel_voided``, before that push's parcel locks, which this
        # one holds: waiting would deadlock); the next one held stands in its place.
        .with_for_update(of=ConsentRequest, skip_locked=True)
    ).first()
    if held is None:
        return None
    parcel = session.scalar(select(Parcel).where(Parcel.tracking_no == held.tracking_no))
    if (
        parcel is None
        or parcel.station_id != held.station_id
        or not parcel.recipient_phone
        or parcel.status in HANDED_OVER
    ):
        return None
    draft = RequestDraft(held.tracking_no, held.method, held.point_id, held.channel)
    still_held = _held_back(session, draft, per_parcel, now)
    if still_held is not None:
        held.status_reason = still_held
        return None
    held.status = ConsentRequestStatus.PENDING
    held.status_reason = None
    # Sent now: the parcel's window counts it from now (``_sent_in_window``), not from its
    # arrival, which an hour behind would have it forgotten as its message goes out.
    held.created_at = now
    _announce_requested(session, parcel, held, now)
    # Its courier's PDA read it ``unsent``: it hears that it was sent after all.
    feed.record(
        session,
        [
            feed.FeedEntry(
                held.station_id, held.courier_id, FeedKind.CONSENT_REQUEST, held.tracking_no
            )
        ],
    )
    return held


def voided_at_arrival(
    session: Session, rows: Sequence[dict[str, Any]]
) -> set[tuple[str, uuid.UUID]]:
    """``(device, client event id)`` of the events among ``rows`` (stored event rows) that
    a stored correction voids (in their push, or one that arrived before them): one of
    their PDA's with a higher seq."""
    by_device: dict[str, dict[uuid.UUID, int]] = {}
    for row in rows:
        by_device.setdefault(row["device_id"], {})[row["client_event_id"]] = row["seq"]
    return {
        (device_id, target)
        for device_id, seqs in by_device.items()
        for chunk in chunks(list(seqs))
        for target, correction_seq in session.execute(
            select(ScanEvent.voids_client_event_id, ScanEvent.seq).where(
                ScanEvent.device_id == device_id,
                ScanEvent.voids_client_event_id.in_(chunk),
            )
        )
        if correction_seq > seqs[target]
    }


def cancel_voided(
    *,
    session: Session,
    device_id: str,
    corrections: Mapping[uuid.UUID, int],
    now: dt.datetime,
) -> list[ConsentRequest]:
    """Requests whose events these corrections void (``{voided client event id: the
    highest seq of a correction naming it}``; only an earlier event can be voided) are
    cancelled: a pending one, and one never sent (held back, ``_held_back``, or with
    nobody to ask), which ends as it does when its correction comes in its push
    (``request_consent``: rule 3), not ``unsent`` as if its PDA still asked. Returns the
    pending ones, which stood in the way of requests
    held back behind them: the caller sends those once it holds the parcels' locks
    (``send_held_back_behind``). (Found by their events' row ids, through the indexes of
    both tables: a request from a PDA names its event both ways.)"""
    freed = []
    for chunk in chunks(list(corrections)):
        for request, target, seq in session.execute(
            select(ConsentRequest, ScanEvent.client_event_id, ScanEvent.seq)
            .join(ScanEvent, ScanEvent.id == ConsentRequest.event_id)
            .where(
                ScanEvent.device_id == device_id,
                ScanEvent.client_event_id.in_(chunk),
                ConsentRequest.status.in_(
                    (ConsentRequestStatus.PENDING, ConsentRequestStatus.UNSENT)
                ),
            )
            # Locked already, with the parcels' requests a push hands over, in one order
            # (``lock_requests_to_end``); again by id, as that order has it. (Not those
            # with nobody to ask, which no other writer touches.)
            .order_by(ConsentRequest.id)
            .with_for_update(of=ConsentRequest)
            # The row as locked, not a copy the session read before: a mark the lapse
            # job committed since decides what the channel is told (``_locked``).
            .execution_options(populate_existing=True)
        ).all():
            if seq >= corrections[target]:
                continue
            if _cancel_pending_or_held_back(session, request, now, VOIDED_REASON):
                freed.append(request)
    return freed


def send_held_back_behind(
    *,
    session: Session,
    cancelled: Sequence[ConsentRequest],
    per_parcel: Limit | None,
    now: dt.datetime,
) -> None:
    """For each request just cancelled (``cancel_voided``), the request held back behind
    it is sent (``_send_held_back``). Run by a push after its projection: under the
    parcels' locks, which an online ask of the same question takes too (one of them is
    sent), and on the parcels' statuses with this push's events (none is sent for a
    parcel it hands over)."""
    for request in cancelled:
        _send_held_back(session, request, per_parcel, now)


def _is_held_back() -> Any:
    """A PDA's request kept ``unsent`` although it would have been sent (``_held_back``),
    told by its reason: the other ``unsent`` (nobody to ask) never begin so."""
    return and_(
        ConsentRequest.status == ConsentRequestStatus.UNSENT,
        ConsentRequest.status_reason.startswith(HELD_BACK, autoescape=True),
    )


def _cancel(
    session: Session,
    request: ConsentRequest,
    now: dt.datetime,
    reason: str = VOIDED_REASON,
) -> bool:
    """A pending ``request``, sent, whose event a correction voids (or whose parcel was
    handed over since), is cancelled (locked). True when it was still asking the
    recipient: a PDA's request held back behind it may be sent now
    (``_send_held_back``)."""
    request.status = ConsentRequestStatus.CANCELLED
    request.status_reason = reason
    request.answered_at = now
    if request.lapse_announced_at is not None:
        return False  # its end, the lapse, was announced (on the job's clock): no more
    if now < request.expires_at:  # asked, and maybe shown: tell the channel
        _announce_cancelled(session, request, now)
        return True
    if request.created_at < request.expires_at:
        # It lapsed first, asked: that is its end, as the channel hears it.
        _announce_lapsed(session, request, now)
    return False


def _cancel_pending_or_held_back(
    session: Session, request: ConsentRequest, now: dt.datetime, reason: str
) -> bool:
    """A locked request, pending or never sent (held back, ``_is_held_back``, or with
    nobody to ask), is cancelled for ``reason``: an unsent one was never asked, so there
    is nothing to tell the channel; a pending one ends as ``_cancel`` says. True when it
    was still asking the recipient (``_cancel``)."""
    if request.status == ConsentRequestStatus.UNSENT:  # never asked
        request.status = ConsentRequestStatus.CANCELLED
        request.status_reason = reason
        return False
    return _cancel(session, request, now, reason)


def lock_requests_to_end(
    *,
    session: Session,
    device_id: str,
    voided: Iterable[uuid.UUID],
    tracking_nos: Iterable[str],
) -> None:
    """The requests a push may end are locked, all in one order, by id: run before it takes
    any parcel lock (an answer holds its request, then locks the parcel), as the
    ``consent_requests_lapsed`` job locks its batch. Those its corrections void (the
    client event ids ``voided`` of this PDA's asks, pending or held back), which
    ``cancel_voided`` then cancels as locked; and the pending ones of the parcels it may
    hand over (``tracking_nos``), waited for while an answer holds one, so that
    ``cancel_for_handed_over``, under the parcels' locks, finds them as the answer left
    them. Passed over there, a request whose answer gave up (a ``granted_at`` before the
    question, a conflict) stayed pending on a parcel in its recipient's hands, the
    channel asking them until it lapsed. Not the held-back ones of those parcels, which
    no answer holds: locked here, another push sending one behind a request it cancels
    would pass over it (``_send_held_back``), and this push may not hand the parcel over
    after all.

    Found first, then locked by their sorted ids: locked by each chunk of keys (900
    corrections or tracking numbers, ``sync.sql.chunks``), then the handed-over parcels'
    after the voided ones, a push ending more than 900 questions, or voiding one ask and
    delivering another parcel, took a later request before an earlier one, and
    deadlocked with a push or the job taking both by id. Locked only if still pending
    or held back then (``REQUESTS_LOCKED``): one answered since it was found is not the
    push's to hold. PostgreSQL only: SQLite has no row locks (a writer holds the whole
    database)."""
    if session.get_bind().dialect.name != "postgresql":
        return
    ids: set[int] = set()
    for chunk in chunks(list(voided)):
        ids.update(
            session.scalars(
                select(ConsentRequest.id)
                .join(ScanEvent, ScanEvent.id == ConsentRequest.event_id)
                .where(
                    ScanEvent.device_id == device_id,
                    ScanEvent.client_event_id.in_(chunk),
                    or_(ConsentRequest.status == ConsentRequestStatus.PENDING, _is_held_back()),
                )
            )
        )
    for chunk in chunks(sorted(set(tracking_nos))):
        ids.update(id_ for (id_,) in PENDING_REQUESTS.execute(session, {"numbers": chunk}))
    for chunk in chunks(sorted(ids)):
        REQUESTS_LOCKED.execute(session, {"ids": chunk})


# Built once (``sync.sql.Prebuilt`` says why): every push bringing a delivery runs it on
# PostgreSQL, and building it cost as much as ``cancel_for_handed_over``'s query did.
PENDING_REQUESTS = Prebuilt(
    lambda dialect: select(ConsentRequest.id).where(
        among_param(dialect, ConsentRequest.tracking_no, "numbers"),
        ConsentRequest.status == ConsentRequestStatus.PENDING,
    )
)
# Those still to end only, as found under the lock: one answered since it was found
# (granted, committed) is left alone. Held, a refusal of another of the parcel's
# requests withdrawing that grant (it holds the refused request, then updates the
# granted one: ``_withdraw_granted_before``) waited for this push, which waited for
# the refused one, next by id: a deadlock.
REQUESTS_LOCKED = Prebuilt(
    lambda dialect: (
        select(ConsentRequest.id)
        .where(
            among_param(dialect, ConsentRequest.id, "ids"),
            or_(ConsentRequest.status == ConsentRequestStatus.PENDING, _is_held_back()),
        )
        .order_by(ConsentRequest.id)
        .with_for_update()
    )
)


# Built once (``sync.sql.Prebuilt`` says why): whether any of a push's handed-over
# parcels has a request a hand-over may end. Most have none, and building the locking
# query below cost each push bringing a delivery about a millisecond of processor time
# (a cProfile of 600 one-scan pushes: ``bench/push_instructions.py``'s mix).
REQUESTS_A_HAND_OVER_MAY_END = Prebuilt(
    lambda dialect: (
        select(ConsentRequest.id)
        .where(
            among_param(dialect, ConsentRequest.tracking_no, "numbers"),
            or_(
                ConsentRequest.status == ConsentRequestStatus.PENDING,
                ConsentRequest.status == ConsentRequestStatus.UNSENT,
            ),
        )
        .limit(1)
    )
)


def cancel_for_handed_over(
    *, session: Session, tracking_nos: Iterable[str], now: dt.datetime
) -> list[ConsentRequest]:
    """The pending requests of these parcels that are in their recipients' hands now
    (``HANDED_OVER``: a push brought the delivery in person, or the collection from the
    locker) are cancelled: the channel stops asking the recipient to agree to leave
    in a locker a parcel they hold (``consent.request_cancelled``, with the reason),
    and the courier who asked hears it in the pull feed. So are the requests held back
    behind them (never sent: nothing to tell the channel), as one arriving after the
    delivery is cancelled as it is made (``request_consent``): the same end whichever
    the PDA pushed first (rule 3), not ``unsent`` behind a request cancelled.

    Run after the projection, holding the parcels' locks, the requests locked before them
    (``lock_requests_to_end``): one made since and locked by an answer at this instant (which
    locks the parcel next: waiting would deadlock) is passed over, the answer taken as
    first, as when it commits before the push."""
    cancelled: list[ConsentRequest] = []
    for chunk in chunks(sorted(set(tracking_nos))):
        # None to end (no parcel lock lets one be made meanwhile: ``asking_bound``).
        if not REQUESTS_A_HAND_OVER_MAY_END.execute(session, {"numbers": chunk}):
            continue
        cancelled.extend(
            session.scalars(
                select(ConsentRequest)
                .join(Parcel, Parcel.tracking_no == ConsentRequest.tracking_no)
                .where(
                    among(session, ConsentRequest.tracking_no, chunk),
                    or_(ConsentRequest.status == ConsentRequestStatus.PENDING, _is_held_back()),
                    Parcel.status.in_(HANDED_OVER),
                )
                .order_by(ConsentRequest.id)
                .with_for_update(of=ConsentRequest, skip_locked=True)
                .execution_options(populate_existing=True)
            ).all()
        )
    with request_reach.questions_due_together(session):
        for request in cancelled:
            _cancel_pending_or_held_back(session, request, now, HANDED_OVER_REASON)
    if cancelled:
        feed.record(
            session,
            [
                feed.FeedEntry(r.station_id, r.courier_id, FeedKind.CONSENT_REQUEST, r.tracking_no)
                for r in cancelled
            ],
        )
    return cancelled


def _announce_cancelled(session: Session, request: ConsentRequest, now: dt.datetime) -> None:
    """``consent.request_cancelled``: the channel stops asking the recipient a question
    whose answer would be refused (``consent_request_cancelled``). After the request's
    ``consent.requested`` for the same parcel; one not yet sent then is skipped
    (``sync.webhooks``)."""
    consents.announce_outcome(
        session,
        request,
        "consent.request_cancelled",
        {"cancelled_at": now, "reason": request.status_reason},
        now,
    )


def _announce_granted(
    session: Session,
    request: ConsentRequest,
    consent: Consent,
    channel: ConsentChannel,
    now: dt.datetime,
) -> None:
    """``consent.request_granted``: the recipient agreed; what, as the consent records it."""
    consents.announce_outcome(
        session,
        request,
        "consent.request_granted",
        {
            "consent_id": consent.id,
            "method": consent.method,
            "point_id": consent.point_id,
            "channel": channel,
            "granted_at": consent.granted_at,
            "expires_at": consent.expires_at,
            "answered_at": now,
        },
        now,
    )


def _announce_refused(
    session: Session, request: ConsentRequest, channel: ConsentChannel, now: dt.datetime
) -> None:
    """``consent.request_refused``: the recipient said no (the courier rings the bell)."""
    consents.announce_outcome(
        session,
        request,
        "consent.request_refused",
        {"channel": channel, "refused_at": now, "reason": request.status_reason},
        now,
    )


def _announce_lapsed(session: Session, request: ConsentRequest, now: dt.datetime) -> None:
    """``consent.request_lapsed``, once (``lapse_announced_at``)."""
    request.lapse_announced_at = now
    consents.announce_outcome(
        session, request, "consent.request_lapsed", {"expires_at": request.expires_at}, now
    )


LAPSE_BATCH = 500


def announce_lapsed(*, session: Session, now: dt.datetime) -> dict[str, Any]:
    """The ``consent_requests_lapsed`` job: each request still pending at its expiry, not
    announced yet, is announced as lapsed (``consent.request_lapsed``) and marked, so
    that the channel stops showing the recipient a question no answer to counts. Not
    one that lapsed before it reached the server (never sent). Committed batch by batch;
    a request answered or cancelled meanwhile is passed over (read again under its
    lock)."""
    unannounced = (
        ConsentRequest.status == ConsentRequestStatus.PENDING,
        ConsentRequest.lapse_announced_at.is_(None),
        ConsentRequest.expires_at <= now,
    )
    # Picked by expiry (the partial index), locked by id: the order in which a push
    # handing their parcels over locks them (``lock_requests_to_end``), and a push voiding
    # their asks (``cancel_voided``). Locked by expiry, two requests whose expiries run
    # against their ids deadlocked with such a push.
    due = (
        select(ConsentRequest)
        .where(
            ConsentRequest.id.in_(
                select(ConsentRequest.id)
                .where(*unannounced)
                .order_by(ConsentRequest.expires_at, ConsentRequest.id)
                .limit(LAPSE_BATCH)
                .scalar_subquery()
            ),
            *unannounced,  # again under the lock: answered or cancelled meanwhile
        )
        .order_by(ConsentRequest.id)
        .with_for_update(of=ConsentRequest)
        .execution_options(populate_existing=True)
    )
    announced: list[int] = []
    never_sent = 0
    while batch := session.scalars(due).all():
        # Their questions made due together: one read, locked in id order.
        with request_reach.questions_due_together(session):
            for request in batch:
                if request.created_at >= request.expires_at:  # lapsed on its way: not sent
                    request.lapse_announced_at = now
                    never_sent += 1
                    continue
                _announce_lapsed(session, request, now)
                announced.append(request.id)
        session.commit()
    return {"announced": len(announced), "never_sent": never_sent, "request_ids": announced[:100]}


@dataclass(frozen=True)
class Answer:
    """The recipient's answer, as the channel reports it."""

    granted: bool
    channel: ConsentChannel
    granted_at: dt.datetime | None = None  # default: when the answer arrives
    expires_at: dt.datetime | None = None
    method: ConsentMethod | None = None  # default: what was asked
    point_id: str | None = None
    evidence: str | None = None
    reason: str | None = None  # a refusal's
    # The channel's own id for the consent a grant records (``sync.consents.grant_once``)
    client_consent_id: str | None = None


def answer_request(
    *,
    session: Session,
    request: ConsentRequest,
    answer: Answer,
    rules: consents.ConsentRules,
    answered_by: int | None,
    now: dt.datetime | None = None,
) -> tuple[ConsentRequest, Consent | None, bool]:
    """Record the recipient's answer: ``(request, consent or None, new)``.

    The same answer sent again (a channel retrying) changes nothing and gives back
    what the first one made (a grant's consent, revoked since: the request reads
    ``revoked``); the other answer, a grant stating another consent than the one
    recorded (``_differing_grant``: rule 2, never the first grant passed off as this
    one), a refusal giving another reason, one to a request that lapsed, or one to a
    request that was never sent is a conflict. A grant creates a parcel consent (the
    caller judges the parcel again); a refusal is kept with the parcel and written
    to the audit log. Either answer tells the courier's PDA; both write to the audit
    log, which the caller may defer until it has judged the parcel (``audit.deferred``:
    the log's lock comes after the flags').
    """
    now = now or utcnow()
    request = _locked(session, request.id)
    if request.status in ANSWERED:
        if (request.status != ConsentRequestStatus.REFUSED) == answer.granted:
            consent = session.get(Consent, request.consent_id) if request.consent_id else None
            if consent is not None:
                differing = _differing_grant(session, request, consent, answer, rules, now)
                if differing:
                    raise Conflict(
                        f"consent request {request.id} was already granted by consent "
                        f"{consent.id}, whose {consents.fields_differ(differing)}: send the "
                        "same answer again, or ask the courier for a new request",
                        code="consent_request_answered",
                        field="request_id",
                    )
            elif answer.reason not in (None, request.status_reason):
                raise Conflict(
                    f"consent request {request.id} was already refused with another "
                    "reason: send the same answer again",
                    code="consent_request_answered",
                    field="reason",
                )
            return request, consent, False
        raise Conflict(
            f"consent request {request.id} was already answered: {request.status.value}",
            code="consent_request_answered",
            field="request_id",
        )
    if request.status in (ConsentRequestStatus.UNSENT, ConsentRequestStatus.CANCELLED):
        raise Conflict(
            f"consent request {request.id} is {request.status.value} "
            f"({request.status_reason}): no answer counts",
            code=f"consent_request_{request.status.value}",
            field="request_id",
        )
    if has_lapsed(request, now):
        raise Conflict(
            f"consent request {request.id} lapsed at {request.expires_at.isoformat()}; "
            "the courier has to ask again",
            code="consent_request_expired",
            field="request_id",
        )
    if answer.granted_at is not None and answer.granted_at < request.requested_at:
        raise InvalidInput(
            "granted_at is before the request was made: an answer cannot precede its question",
            code="granted_before_request",
            field="granted_at",
        )
    consent = None
    withdrawn: Sequence[ConsentRequest] = ()
    if answer.granted:
        draft = _granted_draft(request, answer, now)
        consent = _granted_once(session, request, draft, answer, rules, answered_by, now)
        request.status = ConsentRequestStatus.GRANTED
        request.consent_id = consent.id
        request.consent_expires_at = consent.expires_at
    else:
        request.status = ConsentRequestStatus.REFUSED
        request.status_reason = answer.reason
        # The requests it withdraws first, then the parcel: a revocation of their
        # consent at the same moment takes them in that order too (no deadlock).
        withdrawn = _withdraw_granted_before(session, request, now)
        _record_refusal(session, request.tracking_no, now)
        # Again under the parcel's lock: a grant holding it a moment ago read the
        # refusals before this one was kept, and its request, not committed then, was
        # not found above; it is now (``_refusal_withdrawing`` waits for this lock).
        withdrawn = [*withdrawn, *_withdraw_granted_before(session, request, now)]
    request.answered_at = now
    request.answered_by = answered_by
    request.answered_channel = answer.channel
    # The questions of the requests it ends (its own, and those a refusal withdraws)
    # made due together: one read of their deliveries, not one per request.
    with request_reach.questions_due_together(session):
        if answer.granted:
            assert consent is not None
            _announce_granted(session, request, consent, answer.channel, now)
            if consent.revoked_at is not None:
                # A consent the channel recorded alone and revoked before this answer
                # took it: the request reads what that consent is, as if answered, then
                # revoked.
                request.status = ConsentRequestStatus.REVOKED
                request.revoked_at = consent.revoked_at
                consents.announce_revoked(session, request, consent, now)
            elif refusal := _refusal_withdrawing(session, consent):
                # Granted (as the channel says) before a refusal already recorded:
                # withdrawn for the parcel by it, as if answered, then withdrawn.
                _withdraw(session, request, consent, refusal, now)
        else:
            _audit_refusal(session, request, answer.channel, now)
            _announce_refused(session, request, answer.channel, now)
            consents_of = consents.consents_by_id(
                session, [r.consent_id for r in withdrawn if r.consent_id is not None]
            )
            for earlier in withdrawn:  # after the refusal that withdrew them
                assert earlier.consent_id is not None
                consent_of = consents_of[earlier.consent_id]
                _audit_withdrawn(
                    session, earlier, consent_of, request, answer.channel, answered_by
                )
                _announce_withdrawn(session, earlier, consent_of, request, answer.channel, now)
    # The courier's PDA hears the answer, and each courier whose request it withdrew
    # hears that: one entry each (the same courier asking both hears it once).
    feed.record(
        session,
        [
            feed.FeedEntry(
                asked.station_id, asked.courier_id, FeedKind.CONSENT_REQUEST, asked.tracking_no
            )
            for asked in (request, *withdrawn)
        ],
    )
    session.flush()
    return request, consent, True


def _withdrawn_reason(refusal: ConsentRequest) -> str:
    """A request's ``status_reason`` (and its ``consent.request_revoked``'s ``reason``)
    when the recipient's refusal of another request withdrew the consent answering it."""
    return f"withdrawn by the recipient's refusal of consent request {refusal.id}"


def _withdraw_granted_before(
    session: Session, refusal: ConsentRequest, now: dt.datetime
) -> Sequence[ConsentRequest]:
    """The parcel's requests granted by a consent given before ``refusal`` (being recorded
    at ``now``) read ``revoked`` at the refusal, as the rules weigh that consent for the
    parcel from then on (``sync.consents.withdrawn_by_refusals``); their channel and
    courier's PDA hear it, as of a revocation (the caller announces them after the
    refusal, ``_announce_withdrawn``, and tells their couriers' PDAs with its own). One
    guarded update, as ``sync.consents.revoked_requests``: a revocation of the consent
    at the same moment withdraws the request once, whichever comes first (the second
    finds it ``revoked``)."""
    refusal.answered_at = now
    withdrawn = session.scalars(
        update(ConsentRequest)
        .where(
            ConsentRequest.tracking_no == refusal.tracking_no,
            ConsentRequest.status == ConsentRequestStatus.GRANTED,
            ConsentRequest.consent_id.in_(
                select(Consent.id).where(
                    Consent.tracking_no == refusal.tracking_no,
                    Consent.granted_at < refusal.answered_at,
                    # One that expired before has nothing left to withdraw.
                    or_(Consent.expires_at.is_(None), Consent.expires_at > refusal.answered_at),
                )
            ),
        )
        .values(
            status=ConsentRequestStatus.REVOKED,
            revoked_at=refusal.answered_at,
            status_reason=_withdrawn_reason(refusal),
        )
        .returning(ConsentRequest)
        .execution_options(synchronize_session="fetch")
    ).all()
    return withdrawn


def _refusal_withdrawing(session: Session, consent: Consent) -> ConsentRequest | None:
    """The first refusal of a request for ``consent``'s parcel recorded after the time it
    was granted: the one that withdraws it for the parcel, if any. Read under the
    parcel's lock, which a refusal takes to be kept (``_record_refusal``): one being
    recorded at this moment is waited for, not missed."""
    session.scalar(
        select(Parcel.id).where(Parcel.tracking_no == consent.tracking_no).with_for_update()
    )
    return session.scalar(
        select(ConsentRequest)
        .where(
            ConsentRequest.tracking_no == consent.tracking_no,
            ConsentRequest.status == ConsentRequestStatus.REFUSED,
            ConsentRequest.answered_at > consent.granted_at,
            true()
            if consent.expires_at is None
            else ConsentRequest.answered_at < consent.expires_at,
        )
        .order_by(ConsentRequest.answered_at, ConsentRequest.id)
        .limit(1)
    )


def _withdraw(
    session: Session,
    request: ConsentRequest,
    consent: Consent,
    refusal: ConsentRequest,
    now: dt.datetime,
) -> None:
    """``request``, just granted by ``consent``, is withdrawn by ``refusal`` (earlier)."""
    request.status = ConsentRequestStatus.REVOKED
    request.revoked_at = refusal.answered_at
    request.status_reason = _withdrawn_reason(refusal)
    # The refusal's channel, as its row keeps it (null for one answered before it was).
    _audit_withdrawn(
        session, request, consent, refusal, refusal.answered_channel, request.answered_by
    )
    _announce_withdrawn(session, request, consent, refusal, refusal.answered_channel, now)


def _audit_withdrawn(
    session: Session,
    request: ConsentRequest,
    consent: Consent,
    refusal: ConsentRequest,
    channel: ConsentChannel | None,
    actor_id: int | None,
) -> None:
    """Write to the audit log that ``refusal`` withdrew the consent granting ``request``
    (``consent_request_withdrawn``, subject the withdrawn request): its row now reads
    ``revoked`` and the consent authorizes no drop of the parcel after the refusal, a
    change the refusal's own entry (``consent_refused``, of another request) does not
    name, and that a consent revoked through the API has on the log
    (``consent_revoked``). An auditor reading the granted request's history sees it end
    here; one its row set back to ``granted`` afterwards no longer matches. ``actor_id``:
    who sent the answer that withdrew it (the refusal, or a grant arriving after it)."""
    audit.append(
        session=session,
        actor_id=actor_id,
        action="consent_request_withdrawn",
        subject_type="consent_request",
        subject_key=str(request.id),
        details={
            "request_id": request.id,
            "consent_id": consent.id,
            "tracking_no": request.tracking_no,
            "withdrawn_at": audit.iso(refusal.answered_at),
            "refusal_request_id": refusal.id,
            "reason": request.status_reason,
            "channel": channel.value if channel is not None else None,
        },
        tracking_no=request.tracking_no,
    )


def _announce_withdrawn(
    session: Session,
    request: ConsentRequest,
    consent: Consent,
    refusal: ConsentRequest,
    channel: ConsentChannel | None,
    now: dt.datetime,
) -> None:
    """``consent.request_revoked`` for a request whose consent ``refusal`` withdrew: the
    channel stops showing "you agreed"; revoked at the refusal, through ``channel``, the
    refusal's (null for a refusal answered before its channel was kept)."""
    consents.announce_outcome(
        session,
        request,
        "consent.request_revoked",
        {
            "consent_id": consent.id,
            "revoked_at": refusal.answered_at,
            "reason": request.status_reason,
            "channel": channel,
        },
        now,
    )


def _granted_draft(
    request: ConsentRequest, answer: Answer, now: dt.datetime
) -> consents.ConsentDraft:
    """The consent a grant answering ``request`` states."""
    # What the recipient agreed to: the request's method and point, unless the answer
    # names others (a point named alone keeps the method asked).
    method = answer.method or request.method
    # The request's point stands unless the answer names a point or another method
    # (restating the method asked is not a wider consent).
    named = answer.point_id is not None or method != request.method
    return consents.ConsentDraft(
        scope=ConsentScope.PARCEL,
        method=method,
        channel=answer.channel,
        granted_at=answer.granted_at or now,
        tracking_no=request.tracking_no,
        point_id=answer.point_id if named else request.point_id,
        expires_at=answer.expires_at,
        evidence=answer.evidence or consents.answer_evidence(request.id),
        client_consent_id=answer.client_consent_id,
    )


def _differing_grant(
    session: Session,
    request: ConsentRequest,
    consent: Consent,
    answer: Answer,
    rules: consents.ConsentRules,
    now: dt.datetime,
) -> list[str]:
    """The fields a grant sent again for ``request`` states otherwise than ``consent``,
    the one that answered it, recorded them. What it leaves unsaid (when, the expiry,
    the evidence, the channel's id) is taken as the consent's, as a retry of the
    first answer may leave it out."""
    stated = replace(
        _granted_draft(request, answer, now),
        granted_at=answer.granted_at or consent.granted_at,
        expires_at=consent.expires_at if answer.expires_at is None else answer.expires_at,
        evidence=consent.evidence if answer.evidence is None else answer.evidence,
    )
    differing = consents.differing_from(session, consent, stated, rules, now)
    if answer.client_consent_id not in (None, consent.client_consent_id):
        differing.append("client_consent_id")
    return differing


def _granted_once(
    session: Session,
    request: ConsentRequest,
    draft: consents.ConsentDraft,
    answer: Answer,
    rules: consents.ConsentRules,
    answered_by: int | None,
    now: dt.datetime,
) -> Consent:
    """The consent a grant answering ``request`` records, once per channel's id
    (``draft.client_consent_id``), as ``sync.consents.grant_once`` records one: the
    channel may have given that id to a consent already, by ``POST /consents`` without
    the request, or by an answer racing this one (``created_once``). Then this answer
    gets that consent if it states the same (what the answer leaves unsaid, when and
    the evidence, is taken as that consent's) and it answers no other request; else
    the 409 ``client_consent_id_reused``, naming the fields that differ. (A retry of
    this very answer is told by its request, granted already.)

    A consent taken so was recorded (``consent_granted``) without naming the request:
    the answer writes ``consent_request_answered`` naming both, so that an auditor sees
    which request it answered."""

    def grant() -> Consent:
        return consents.grant(
            session=session,
            draft=draft,
            rules=rules,
            created_by=answered_by,
            now=now,
            request_id=request.id,
        )

    client_consent_id = draft.client_consent_id
    if client_consent_id is None:
        return grant()
    consent, new = created_once(
        session, lambda: consents.recorded_as(session, answered_by, client_consent_id), grant
    )
    if new:
        return consent
    stated = replace(
        draft,
        granted_at=answer.granted_at or consent.granted_at,
        evidence=consent.evidence if answer.evidence is None else answer.evidence,
    )
    differing = consents.differing_from(session, consent, stated, rules, now)
    answered = session.scalar(
        select(ConsentRequest.id).where(ConsentRequest.consent_id == consent.id)
    )
    if differing or answered is not None:
        why = (
            f"whose {consents.fields_differ(differing)}"
            if differing
            else f"which answers consent request {answered}"
        )
        raise Conflict(
            f"client_consent_id {client_consent_id!r} was used for consent {consent.id}, "
            f"{why}: a new consent needs a new id",
            code="client_consent_id_reused",
            field="client_consent_id",
        )
    _audit_answered_by(session, request, consent, answer.channel, answered_by, now)
    return consent


def _audit_answered_by(
    session: Session,
    request: ConsentRequest,
    consent: Consent,
    channel: ConsentChannel,
    answered_by: int | None,
    at: dt.datetime,
) -> None:
    """Write to the audit log that a grant answered ``request`` with ``consent``, recorded
    before it (``consent_request_answered``): the consent's own ``consent_granted`` entry
    does not name the request, and the request's row can be changed afterwards with
    nothing to tell. ``method`` and ``point_id`` are the consent's; ``asked_method`` and
    ``asked_point_id`` the request's."""
    audit.append(
        session=session,
        actor_id=answered_by,
        action="consent_request_answered",
        subject_type="consent_request",
        subject_key=str(request.id),
        details={
            "request_id": request.id,
            "consent_id": consent.id,
            "tracking_no": request.tracking_no,
            "answered_at": audit.iso(at),
            "channel": channel.value,
            **_asked(request),
            # What the consent says (the recipient may have agreed to more, or to
            # another point), as its own ``consent_granted`` entry does; what was asked
            # beside it, named so.
            "method": consent.method.value,
            "point_id": consent.point_id,
            "asked_method": request.method.value,
            "asked_point_id": request.point_id,
            "client_consent_id": consent.client_consent_id,
        },
        tracking_no=request.tracking_no,
    )


def _asked(request: ConsentRequest) -> dict[str, Any]:
    """What the courier asked, as an answer's and a refusal's audit entries record it."""
    return {
        "method": request.method.value,
        "point_id": request.point_id,
        "requested_at": audit.iso(request.requested_at),
        "courier_id": request.courier_id,
        "station_id": request.station_id,
    }


def _record_refusal(session: Session, tracking_no: str, at: dt.datetime) -> None:
    """Keep the refusal with the parcel: consents given before it no longer authorize a
    drop of the parcel after it (``sync.consents.withdrawn_by_refusals``). The caller
    judges the parcel again (``sync.status.rejudge_for_refusal``)."""
    parcel = session.scalar(
        select(Parcel).where(Parcel.tracking_no == tracking_no).with_for_update()
    )
    if parcel is not None:
        parcel.consent_refusals = [*(parcel.consent_refusals or []), at.isoformat()]


def _audit_refusal(
    session: Session, request: ConsentRequest, channel: ConsentChannel, at: dt.datetime
) -> None:
    """Write the refusal to the audit log (``consent_refused``), as a consent recorded or
    revoked through the API is: it decides whether a later drop of the parcel was
    authorized, and the parcel's ``consent_refusals`` and the request's row can be
    changed afterwards with nothing to tell. A phone number in the reason is masked on
    reading, as in any entry's details."""
    audit.append(
        session=session,
        actor_id=request.answered_by,
        action="consent_refused",
        subject_type="consent_request",
        subject_key=str(request.id),
        details={
            "request_id": request.id,  # as the grant's entry names it (its subject too)
            "tracking_no": request.tracking_no,
            "refused_at": audit.iso(at),
            "reason": request.status_reason,
            "channel": channel.value,
            **_asked(request),
        },
        tracking_no=request.tracking_no,
    )


def get_request(*, session: Session, request_id: int) -> ConsentRequest:
    request = session.get(ConsentRequest, request_id)
    if request is None:
        raise request_not_found(request_id)
    return request


def request_not_found(request_id: int) -> NotFound:
    """What ``get_request`` answers when no request has ``request_id``."""
    return NotFound(f"no consent request {request_id}", code="consent_request_not_found")


def _locked(session: Session, request_id: int) -> ConsentRequest:
    """The request's row, locked and re-read: two answers at once take turns."""
    request = session.scalar(
        select(ConsentRequest)
        .where(ConsentRequest.id == request_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if request is None:
        raise request_not_found(request_id)
    return request


def list_requests(
    *,
    session: Session,
    station_id: int | None = None,
    courier_id: int | None = None,
    tracking_no: str | None = None,
    status: str | None = None,
    now: dt.datetime | None = None,
    after_id: int = 0,
    limit: int = 100,
) -> Sequence[ConsentRequest]:
    """Oldest first from ``after_id``. ``station_id`` also returns the requests for
    parcels the station holds now (``sync.consents.held_at``): a request keeps the
    station it was asked at, read rather than moved at intake, as for consents.
    ``status`` is the one each request shows (``effective_status`` at ``now``): a
    pending request past its expiry is ``expired``, not ``pending``."""
    query = select(ConsentRequest).where(ConsentRequest.id > after_id)
    if station_id is not None:
        query = query.where(
            or_(
                ConsentRequest.station_id == station_id,
                consents.held_at(ConsentRequest.tracking_no, station_id),
            )
        )
    if courier_id is not None:
        query = query.where(ConsentRequest.courier_id == courier_id)
    if tracking_no is not None:
        query = query.where(ConsentRequest.tracking_no == normalize(tracking_no))
    now = now or utcnow()
    lapsed = and_(
        ConsentRequest.status == ConsentRequestStatus.PENDING,
        or_(ConsentRequest.expires_at <= now, ConsentRequest.lapse_announced_at.is_not(None)),
    )
    consent_lapsed = and_(
        ConsentRequest.status == ConsentRequestStatus.GRANTED,
        ConsentRequest.consent_expires_at <= now,
    )
    if status == EXPIRED:
        query = query.where(or_(lapsed, consent_lapsed))
    elif status == ConsentRequestStatus.PENDING:
        query = query.where(ConsentRequest.status == ConsentRequestStatus.PENDING, ~lapsed)
    elif status == ConsentRequestStatus.GRANTED:
        query = query.where(
            ConsentRequest.status == ConsentRequestStatus.GRANTED,
            or_(
                ConsentRequest.consent_expires_at.is_(None),
                ConsentRequest.consent_expires_at > now,
            ),
        )
    elif status is not None:
        query = query.where(ConsentRequest.status == ConsentRequestStatus(status))
    return session.scalars(
        query.order_by(ConsentRequest.id).limit(min(limit, MAX_PAGE_SIZE))
    ).all()


def latest_for(
    session: Session, *, courier_id: int, tracking_nos: Sequence[str], per_parcel: int = 5
) -> dict[str, list[ConsentRequest]]:
    """Each parcel's latest requests by this courier, newest first (for the pull feed)."""
    found: dict[str, list[ConsentRequest]] = {tn: [] for tn in tracking_nos}
    for chunk in chunks(sorted(set(tracking_nos))):
        for request in session.scalars(
            select(ConsentRequest)
            .where(
                ConsentRequest.courier_id == courier_id,
                among(session, ConsentRequest.tracking_no, chunk),
            )
            .order_by(ConsentRequest.id.desc())
        ):
            if len(found[request.tracking_no]) < per_parcel:
                found[request.tracking_no].append(request)
    return found


# What a pending request past its expiry shows, and a granted one past its consent's
# (never stored: each lapses by itself).
EXPIRED = "expired"
# Every status a request shows, stored or lapsed.
SHOWN_STATUSES = (*(s.value for s in ConsentRequestStatus), EXPIRED)


def has_lapsed(request: ConsentRequest, now: dt.datetime) -> bool:
    """Whether ``request``'s time is over at ``now``: past its expiry, or its lapse was
    announced (``announce_lapsed``, on the scheduler's clock). Once announced, the
    channel has stopped asking: an answer timed a moment before (a web worker's clock
    behind, a wait for the job's lock) must not follow ``consent.request_lapsed`` with a
    grant."""
    return now >= request.expires_at or request.lapse_announced_at is not None


def effective_status(request: ConsentRequest, now: dt.datetime) -> str:
    """The status as a PDA should read it: a pending request past its expiry, or whose
    lapse was announced (no answer counts then), lapsed; a granted one whose consent
    expired too: that consent authorizes no drop any more (rule 4), and "granted" would
    send the courier to the locker (they ask again, as after a revocation)."""
    if request.status == ConsentRequestStatus.PENDING and has_lapsed(request, now):
        return EXPIRED
    if (
        request.status == ConsentRequestStatus.GRANTED
        and request.consent_expires_at is not None
        and request.consent_expires_at <= now
    ):
        return EXPIRED
    return request.status.value
