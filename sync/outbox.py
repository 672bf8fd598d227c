"""The transactional outbox: announcements written with the change that causes them.

``announce`` adds a message, and one delivery per subscription that wants it,
to the caller's transaction: if the change is rolled back, so is its
announcement, and once it is committed the delivery worker
(``sync.webhooks``) will send it, however long the receiver is down or the
worker was stopped. A message no subscription wants is not written.

Messages that concern a parcel carry its tracking number as their ordering key
(a flag about it, its locker notice, a consent request for it); each
subscription gets the messages of one key in the order they were written.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections.abc import Collection, Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import OutboxMessage, WebhookDelivery, WebhookSubscription, utcnow

# Every topic a subscription may ask for, with what its message says.
TOPICS: dict[str, str] = {
    "consent.requested": "A courier asks a recipient to agree to unattended delivery",
    "consent.request_cancelled": "The courier's PDA voided such a request (a correction), "
    "or the parcel was handed over to the recipient, while it waited: stop asking, no "
    "answer to it counts",
    "consent.request_granted": "The recipient agreed to such a request: the consent that "
    "answers it",
    "consent.request_refused": "The recipient refused such a request",
    "consent.request_lapsed": "Such a request reached its expiry unanswered: stop asking, "
    "an answer now is refused",
    "consent.request_revoked": "The consent that answered such a request was revoked, or "
    "withdrawn for the parcel by the recipient's refusal of a later request",
    "parcel.in_locker": "A parcel was left in a locker: where, and the pickup code",
    "parcel.at_pickup_point": "A parcel was left at a pickup point, and its pickup code",
    "parcel.drop_voided": "A courier's correction voided such a drop: the parcel is not "
    "where the earlier message said",
    "flag.raised": "A discrepancy or violation was flagged (or flagged again)",
    "flag.resolved": "A manager resolved a flag, with a note (or the system gave it back "
    "the resolution a manager made)",
    "flag.closed": "A flag's cause went away (new events, a consent, an upload): closed, "
    "with the reason",
    "shift.unbalanced": "A shift closed without its handover balancing",
    "report.ready": "A station's daily, weekly or monthly report was issued",
}
_CACHE_KEY = "outbox.subscriptions"
_SENDING_KEY = "outbox.sending"


def announce(
    *,
    session: Session,
    topic: str,
    ordering_key: str,
    station_id: int | None,
    data: Mapping[str, Any],
    now: dt.datetime | None = None,
    only_to: Collection[int] | None = None,
) -> OutboxMessage | None:
    """Write ``data`` for every subscription to ``topic`` (at this station, or all;
    ``only_to``: of these subscriptions), in the caller's transaction. None when no
    subscription wants it."""
    if topic not in TOPICS:
        raise ValueError(f"unknown topic {topic!r}")
    wanted = [
        sub_id
        for sub_id, topics, sub_station in _subscriptions(session)
        if covers(topics, sub_station, topic, station_id)
        and (only_to is None or sub_id in only_to)
    ]
    if not wanted:
        return None
    now = now or utcnow()
    message = OutboxMessage(
        id=uuid.uuid4(),
        topic=topic,
        station_id=station_id,
        ordering_key=ordering_key[:160],
        payload=plain(data),
        created_at=now,
    )
    session.add(message)
    session.add_all(
        WebhookDelivery(
            message_id=message.id,
            subscription_id=sub_id,
            delivery_id=uuid.uuid4(),
            topic=topic,
            ordering_key=message.ordering_key,
            next_attempt_at=now,
            created_at=now,
        )
        for sub_id in wanted
    )
    return message


def wanted(session: Session, topic: str, station_id: int | None = None) -> bool:
    """Whether any subscription wants ``topic`` (at this station, when given): lets a
    caller skip building a message nobody would receive."""
    return any(
        topic in topics and (station_id is None or sub_station in (None, station_id))
        for _, topics, sub_station in _subscriptions(session)
    )


def subscribers(session: Session, topic: str) -> set[int]:
    """The active subscriptions that want ``topic`` (at any station)."""
    return {sub_id for sub_id, topics, _ in _subscriptions(session) if topic in topics}


def _subscriptions(session: Session) -> list[tuple[int, list[str], int | None]]:
    """The active subscriptions, read once per transaction (a push may announce hundreds
    of flags)."""
    transaction = session.get_transaction()
    cached = session.info.get(_CACHE_KEY)
    if cached is not None and cached[0] is transaction:
        return cached[1]
    rows = [
        (row.id, list(row.topics), row.station_id)
        for row in session.execute(
            select(
                WebhookSubscription.id, WebhookSubscription.topics, WebhookSubscription.station_id
            ).where(WebhookSubscription.active.is_(True))
        )
    ]
    session.info[_CACHE_KEY] = (transaction, rows)
    return rows


def sending_to(session: Session, topic: str, station_id: int | None) -> bool:
    """Whether a subscription that is sent to (active, not disabled after its failures)
    wants ``topic`` at ``station_id``: one ``announce`` writes for may wait unsent. Read
    once per transaction, as ``_subscriptions`` (a push may ask hundreds of questions)."""
    transaction = session.get_transaction()
    cached = session.info.get(_SENDING_KEY)
    if cached is None or cached[0] is not transaction:
        rows = [
            (list(row.topics), row.station_id)
            for row in session.execute(
                select(WebhookSubscription.topics, WebhookSubscription.station_id).where(
                    WebhookSubscription.active.is_(True),
                    WebhookSubscription.disabled_at.is_(None),
                )
            )
        ]
        cached = session.info[_SENDING_KEY] = (transaction, rows)
    return any(covers(topics, sub_station, topic, station_id) for topics, sub_station in cached[1])


def forget_subscriptions(session: Session) -> None:
    """Subscriptions changed in this transaction: read them again on the next announce."""
    session.info.pop(_CACHE_KEY, None)
    session.info.pop(_SENDING_KEY, None)


def covers(
    topics: list[str], subscription_station: int | None, topic: str, station_id: int | None
) -> bool:
    """Whether a subscription with these topics, at this station (None: every one),
    wants a message of ``topic`` at ``station_id``: decided by ``announce``, and asked
    again when the message is sent (``sync.webhooks.claim_due``)."""
    return topic in topics and subscription_station in (None, station_id)


def parcel_key(tracking_no: str) -> str:
    return tracking_no


def subject_key(subject_type: str, subject_key: str) -> str:
    """The ordering key of a message about a flag's subject: the parcel's tracking
    number when it concerns one (a parcel, or a parcel in a shift), else the subject."""
    if subject_type == "parcel":
        return subject_key
    if subject_type == "shift" and ":" in subject_key:
        return subject_key.partition(":")[2]
    return f"{subject_type}:{subject_key}"


def plain(value: Any) -> Any:
    """``value`` as JSON can hold it: times in ISO 8601, enums as their values."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, uuid.UUID):
        return str(value)
    return value
