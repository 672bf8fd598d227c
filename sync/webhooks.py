"""Webhook delivery: subscriptions, signatures, the delivery worker and its admin tools.

``sync.outbox.announce`` writes a message, and one pending ``WebhookDelivery`` per
subscription that wants it, in the transaction of the change it announces. The
worker here (``deliver_due``) posts them:

* **Claiming.** A short committed transaction marks the due deliveries as held by
  this worker (``claimed_by``, ``claimed_until``); on PostgreSQL the candidates are
  read ``FOR UPDATE SKIP LOCKED``, and the claim itself only takes rows still
  unclaimed, so two workers never hold one delivery. The request is sent outside any
  transaction, and its outcome recorded in a new one. A worker that dies in between
  leaves its claim to expire (a claim lasts longer than its sends can take): the
  delivery is then sent again, with the same ``X-Courier-Delivery`` id. Delivery is
  at least once; receivers de-duplicate on that id.
* **Order per key.** A delivery is not claimed while an earlier (lower id) delivery
  of the same subscription and ordering key (a parcel's tracking number) is still
  pending, so each receiver gets one parcel's messages in the order they were
  written. A *dead* delivery does not hold back the ones after it: the receiver was
  told nothing for hours, and newer news of the parcel is worth more than strict
  order. Replaying it makes it pending again, ahead of any still-pending later one.
* **Lanes.** Each subscription's deliveries are sent on a thread of their own, a few at
  a time, so a receiver that takes its whole timeout on every call delays only its own
  messages; claims and records stay on the worker's thread.
* **Retries.** A failed attempt (not 2xx, 3xx included: redirects are never followed;
  a timeout; a refused connection) is retried after an exponential backoff with
  "equal jitter", up to ``max_attempts``; then the delivery is *dead*, with the last
  error, until an admin replays it. A message with a deadline (``DEADLINES``: a
  ``consent.requested``, its request's expiry) waits at most a quarter of the time it
  has left, and is tried until then whatever its attempts (``retry_at``).
* **Disabling.** Every failed attempt counts against the subscription, every success
  resets the count; after ``disable_after_failures`` failures in a row, the first of
  them at least ``disable_after_seconds`` before (``failing_since``), the subscription
  is disabled (its deliveries wait, up to the retention: ``purge_waiting_for_stopped``)
  and flagged ``webhook_subscription_disabled``. Both, because the count alone grows
  with the traffic: a message every 5 minutes had a receiver redeploying for 15
  disabled, nothing flowing until an admin came. Re-enabling it (``active: true``)
  resumes them; so does resuming one an admin paused, the run of failures started
  over in both cases (nothing is tried while paused: no failing). Attempts count by
  when they were made, not recorded (``_count_success``, ``_count_failure``): a failure
  older than the last success (``last_delivered_at``) is no failure in a row, and a
  success older than the failure that disabled the subscription undoes the disabling.

Requests are signed (``sign``/``verify``): ``X-Courier-Signature: t=<unix
seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``. Secrets are never logged and
never given back after the subscription is created.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import re
import secrets
import socket
import threading
import time
import typing
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpcore
import httpx
from sqlalchemy import (
    SelectBase,
    and_,
    case,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.orm import Session, aliased, sessionmaker

from models import (
    ConsentRequest,
    DeliveryStatus,
    FlagSeverity,
    OutboxMessage,
    Station,
    WebhookDelivery,
    WebhookSubscription,
    utcnow,
)
from sync import audit, request_reach
from sync.consent_requests import effective_status
from sync.errors import Conflict, InvalidInput, NotFound
from sync.flags import FlagSubject, close_flag, raise_flag
from sync.outbox import TOPICS, covers, forget_subscriptions
from sync.paging import MAX_PAGE_SIZE

log = logging.getLogger(__name__)

SUBSCRIPTION_DISABLED = "webhook_subscription_disabled"  # the flag's kind
SIGNATURE_HEADER = "X-Courier-Signature"
DELIVERY_HEADER = "X-Courier-Delivery"
MAX_URL_LENGTH = 2000
MAX_DESCRIPTION_LENGTH = 200
MAX_ERROR_BODY = 500  # characters of a failed answer's body kept in last_error
MAX_ERROR_LENGTH = 1000
# Deliveries claimed at a time: each claim lasts as long as its sends may take, so a
# worker that dies leaves at most this many deliveries waiting for the claim to expire.
CLAIM_BATCH = 10
PER_SUBSCRIPTION = 3  # claimed at a time for one subscription
SETTLED = (DeliveryStatus.DELIVERED, DeliveryStatus.DEAD, DeliveryStatus.SKIPPED)

DELIVERY = WebhookDelivery.__table__
SUBSCRIPTION = WebhookSubscription.__table__
# A subscription that is sent to: not paused by an admin, not disabled by failures.
# Its deliveries are claimed; a stopped one's wait (``purge_waiting_for_stopped``).
SENDING = and_(SUBSCRIPTION.c.active.is_(True), SUBSCRIPTION.c.disabled_at.is_(None))


def is_sending(subscription: WebhookSubscription) -> bool:
    """``SENDING``, of a loaded subscription."""
    return subscription.active and subscription.disabled_at is None


def _version() -> str:
    try:
        return metadata.version("courier-api")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0"


USER_AGENT = f"courier-field-api/{_version()}"


@dataclass(frozen=True)
class DeliverySettings:
    """The ``WEBHOOK_*`` configuration, and whether URLs follow production rules."""

    max_attempts: int = 20
    backoff_seconds: float = 5
    backoff_max_seconds: float = 3600
    timeout_seconds: float = 10
    max_response_bytes: int = 65536
    disable_after_failures: int = 20
    # Four hours: longer than a receiver's deploy or outage of an hour or two (its
    # messages retried meanwhile, as ``max_attempts`` allows, 5 to 10 hours by default),
    # and shorter than the first of its deliveries takes to die, so that a receiver
    # down for good is disabled and its deliveries wait for it (not parked as dead).
    disable_after_seconds: float = 4 * 3600
    poll_seconds: float = 1
    production: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DeliverySettings:
        return cls(
            max_attempts=config["WEBHOOK_MAX_ATTEMPTS"],
            backoff_seconds=config["WEBHOOK_BACKOFF_SECONDS"],
            backoff_max_seconds=config["WEBHOOK_BACKOFF_MAX_SECONDS"],
            timeout_seconds=config["WEBHOOK_TIMEOUT_SECONDS"],
            max_response_bytes=config["WEBHOOK_MAX_RESPONSE_BYTES"],
            disable_after_failures=config["WEBHOOK_DISABLE_AFTER_FAILURES"],
            disable_after_seconds=config["WEBHOOK_DISABLE_AFTER_SECONDS"],
            poll_seconds=config["WEBHOOK_POLL_SECONDS"],
            production=config["APP_ENV"] == "production",
        )

    @property
    def attempt_bound_seconds(self) -> float:
        """The longest one attempt takes: connecting, sending and waiting for the answer
        each within the timeout, and reading its body stopped at the deadline."""
        return 3 * self.timeout_seconds + 1

    def claim_seconds(self, count: int) -> float:
        """How long a claim of ``count`` deliveries lasts: longer than sending them all
        one after the other may take, so only a worker that died loses its claim."""
        return count * self.attempt_bound_seconds + self.timeout_seconds


# -- URLs -------------------------------------------------------------------------------------


def check_url(url: str, *, production: bool) -> str:
    """``url`` if a subscription may post to it, else ``InvalidInput`` (field ``url``).

    An absolute http(s) URL with a host, no user name or password, no fragment, at
    most 2000 characters. In production only ``https``, and never to an address
    literal that is not public (loopback, private, link-local, reserved). Elsewhere
    loopback too (localhost, 127.0.0.0/8, ::1: a receiver on the developer's machine or
    in a test), over ``http`` as well, but no other address that is not public: a
    development server (the demo, whose admin password is published) reaches no more
    of its network than a production one.
    """

    def refuse(why: str) -> typing.NoReturn:
        raise InvalidInput(f"webhook URL refused: {why}", code="webhook_url_refused", field="url")

    if len(url) > MAX_URL_LENGTH:
        refuse(f"longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        refuse("it contains whitespace or control characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc:
        refuse("it must be an absolute http:// or https:// URL")
    if "@" in parts.netloc:
        refuse("it must not carry a user name or password (authenticate with the signature)")
    if parts.fragment or "#" in url:
        refuse("it must not have a fragment (#...)")
    host = parts.hostname
    if not host:
        refuse("it has no host")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        refuse("its port is not a number from 0 to 65535")
    loopback = is_loopback_host(host)
    literal = _ip_literal(host)
    if production:
        if scheme != "https":
            refuse("production receivers must use https")
        if loopback or (literal is not None and not is_public_address(literal)):
            refuse(f"{host} is not a public address")
    elif scheme == "http" and not loopback:
        refuse("http is allowed only to loopback hosts (localhost, 127.0.0.0/8, ::1); use https")
    elif not loopback and literal is not None and not is_public_address(literal):
        refuse(f"{host} is not a public address (outside production, loopback ones are)")
    return url


def is_loopback_host(host: str) -> bool:
    literal = _ip_literal(host)
    return host.lower() == "localhost" if literal is None else literal.is_loopback


# IPv6 forms that carry an IPv4 address in their last 32 bits: NAT64's well-known prefix
# (RFC 6052; behind DNS64 ``64:ff9b::a00:1`` is 10.0.0.1) and the deprecated
# IPv4-compatible addresses. A local-use NAT64 prefix (RFC 8215) reaches whatever its
# operator's translator does: never public.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Not loopback, private, link-local, shared, reserved, unspecified or multicast,
    nor an IPv6 address standing for an IPv4 one that is (mapped, NAT64, 6to4,
    IPv4-compatible): Python's ``is_global`` takes those as public."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _LOCAL_NAT64:
            return False
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            address = embedded
    return address.is_global and not address.is_multicast


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or address in _IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def url_host(url: str) -> str:
    """The host of ``url`` alone: what logs and flags name (a URL may carry a token)."""
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


# -- signatures -------------------------------------------------------------------------------


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Courier-Signature`` value for ``body`` sent at ``timestamp`` (unix seconds)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify(
    secret: str, header: str, body: bytes, *, now: float | dt.datetime, tolerance: int = 300
) -> bool:
    """Whether ``header`` signs ``body`` with ``secret``, at most ``tolerance`` seconds
    from ``now`` (unix seconds or an aware time): what a receiver checks.

    The timestamp is signed with the body, so a captured request cannot be replayed
    later with a fresh timestamp. Comparison is constant-time.
    """
    timestamp: int | None = None
    candidates: list[bytes] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        # At most 12 digits (the year 33658): a longer stamp raised, too long for a float
        # (or for int() past 4,300 digits), and the receiver answered a stranger with a 500.
        if key == "t" and value.isascii() and value.isdigit() and len(value) <= 12:
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value.encode("utf-8", errors="replace"))
    if timestamp is None or not candidates:
        return False
    moment = now.timestamp() if isinstance(now, dt.datetime) else float(now)
    if abs(moment - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body).partition(",v1=")[2].encode()
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)


# -- subscriptions ----------------------------------------------------------------------------

KEEP: Any = object()  # update_subscription: leave this field as it is


def create_subscription(
    *,
    session: Session,
    url: str,
    topics: Iterable[str],
    production: bool,
    station_id: int | None = None,
    description: str = "",
    created_by: int | None = None,
) -> WebhookSubscription:
    """A new active subscription with a fresh secret (its only appearance is on the
    returned object: answer it once, never log it)."""
    subscription = WebhookSubscription(
        url=check_url(url.strip(), production=production),
        topics=_topics(topics),
        station_id=_station(session, station_id),
        secret=secrets.token_urlsafe(32),
        description=_description(description),
        active=True,
        created_by=created_by,
        consecutive_failures=0,
    )
    session.add(subscription)
    session.flush()
    forget_subscriptions(session)
    audit.append(
        session=session,
        actor_id=created_by,
        action="webhook_subscription_created",
        subject_type="webhook_subscription",
        subject_key=str(subscription.id),
        details={
            "host": url_host(subscription.url),
            "topics": subscription.topics,
            "station_id": subscription.station_id,
        },
    )
    return subscription


MAX_SECRET_GRACE = dt.timedelta(days=7)
MAX_SECRET_GRACE_HOURS = MAX_SECRET_GRACE // dt.timedelta(hours=1)  # the API's bound


def rotate_secret(
    *,
    session: Session,
    subscription: WebhookSubscription,
    grace: dt.timedelta,
    now: dt.datetime,
    actor_id: int | None = None,
) -> WebhookSubscription:
    """Give ``subscription`` a fresh secret (on the returned object only: answer it once,
    never log it). For ``grace`` after ``now`` every delivery is signed with the old
    secret too (a second ``v1``, after the new one: ``request_headers``), so that the
    receiver, switching to the new secret, refuses nothing in flight, and one still on
    the old secret keeps accepting; ``grace`` zero drops the old one at once (a leaked
    secret). A rotation within the grace of another forgets the secret before it; two at
    once take turns (the row is locked), the second keeping the first's new secret."""
    if not dt.timedelta() <= grace <= MAX_SECRET_GRACE:
        raise InvalidInput(
            f"the grace period is from 0 to {MAX_SECRET_GRACE_HOURS} hours",
            code="invalid_grace",
            field="grace_hours",
        )
    keep = grace > dt.timedelta()
    # The row as stored, locked: a rotation sent again while the first runs keeps the
    # first's new secret as the old one, rather than overwriting it with both having
    # read the same (the secret the first answer showed would sign nothing).
    session.scalar(
        select(WebhookSubscription)
        .where(WebhookSubscription.id == subscription.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    subscription.previous_secret = subscription.secret if keep else None
    subscription.previous_secret_until = now + grace if keep else None
    subscription.secret = secrets.token_urlsafe(32)
    session.flush()
    audit.append(
        session=session,
        actor_id=actor_id,
        action="webhook_secret_rotated",
        subject_type="webhook_subscription",
        subject_key=str(subscription.id),
        details={"previous_secret_until": None if not keep else audit.iso(now + grace)},
    )
    return subscription


def signing_secrets(subscription: WebhookSubscription, now: dt.datetime) -> tuple[str, ...]:
    """The secrets a delivery to ``subscription`` is signed with at ``now``: its own, and
    the one a rotation replaced while its grace lasts."""
    until = subscription.previous_secret_until
    if subscription.previous_secret and until is not None and now < until:
        return (subscription.secret, subscription.previous_secret)
    return (subscription.secret,)


def rotation_grace_until(
    subscription: WebhookSubscription, now: dt.datetime
) -> dt.datetime | None:
    """When a rotation's old secret stops signing, while it still signs
    (``signing_secrets``); None once that time is past, or with no old secret: the
    stored time of an ended grace tells a reader nothing true."""
    if len(signing_secrets(subscription, now)) > 1:
        return subscription.previous_secret_until
    return None


def forget_ended_graces(*, session: Session, now: dt.datetime) -> int:
    """Clear the old secret of every subscription whose rotation's grace has ended: it
    signs nothing any more (``signing_secrets``), and a secret kept stored without use
    is one more to leak. A subscription another transaction holds (a rotation now) is
    skipped, for the next run. Returns how many were cleared."""
    ended = (
        select(SUBSCRIPTION.c.id)
        .where(
            SUBSCRIPTION.c.previous_secret.is_not(None),
            SUBSCRIPTION.c.previous_secret_until <= now,
        )
        .with_for_update(skip_locked=True)
    )
    cleared = session.execute(
        update(SUBSCRIPTION)
        .where(
            SUBSCRIPTION.c.id.in_(ended.scalar_subquery()),
            SUBSCRIPTION.c.previous_secret_until <= now,  # a rotation since keeps its own
        )
        .values(previous_secret=None, previous_secret_until=None)
    ).rowcount
    return int(cleared or 0)


def get_subscription(*, session: Session, subscription_id: int) -> WebhookSubscription:
    subscription = session.get(WebhookSubscription, subscription_id)
    if subscription is None:
        raise NotFound(
            f"no webhook subscription with id {subscription_id}", code="subscription_not_found"
        )
    return subscription


def list_subscriptions(
    *, session: Session, after_id: int = 0, limit: int = 100
) -> Sequence[WebhookSubscription]:
    """Subscriptions in the order they were created; ``after_id``: the last id seen."""
    return session.scalars(
        select(WebhookSubscription)
        .where(WebhookSubscription.id > after_id)
        .order_by(WebhookSubscription.id)
        .limit(min(limit, MAX_PAGE_SIZE))
    ).all()


def update_subscription(
    *,
    session: Session,
    subscription: WebhookSubscription,
    production: bool,
    now: dt.datetime,
    actor_id: int | None = None,
    url: str | None = None,
    topics: Iterable[str] | None = None,
    station_id: int | None = KEEP,
    description: str | None = None,
    active: bool | None = None,
) -> WebhookSubscription:
    """Change what is given (``station_id=None``: every station).

    A new station or fewer topics: pending deliveries of messages the subscription no
    longer covers are deleted (see ``_drop_uncovered``).

    ``active: true`` on a subscription the worker disabled enables it again: its
    failure count starts over, its flag is closed, and its waiting deliveries are due
    at once (not after the backoff they had reached). On one an admin paused, it
    resumes it: its failure count starts over too (``failing_since`` cleared), the
    time it was paused being no failing.
    """
    # The subscription first, then its deliveries (``_enable_again``, ``_drop_uncovered``):
    # the order of a worker recording an attempt (``record_attempt``).
    _lock_subscription(session, subscription.id)
    changed: dict[str, Any] = {}
    if url is not None:
        subscription.url = check_url(url.strip(), production=production)
        changed["host"] = url_host(subscription.url)
    if topics is not None:
        subscription.topics = _topics(topics)
        changed["topics"] = subscription.topics
    if station_id is not KEEP:
        subscription.station_id = _station(session, station_id)
        changed["station_id"] = subscription.station_id
    if description is not None:
        subscription.description = _description(description)
        changed["description"] = subscription.description
    if active is not None:
        # The couriers whose questions wait for it read ``not_reached`` while it is
        # stopped: they hear when it stops and when it sends again (``request_reach``).
        stopping = not active and is_sending(subscription)
        starting = active and not is_sending(subscription)
        if active and subscription.disabled_at is not None:
            _enable_again(session, subscription, now)
            changed["enabled_again"] = True
        elif active and not subscription.active:
            # Resumed: nothing was tried while it was paused, so those hours were no
            # failing; its run of failures starts over, as an enabled-again one's does.
            # Kept, it was disabled at its first failure after a pause longer than
            # ``disable_after_seconds`` (``_count_failure``).
            subscription.consecutive_failures = 0
            subscription.failing_since = None
        subscription.active = active
        if stopping or starting:
            request_reach.tell_waiting(session, subscription.id, now)
        changed["active"] = active
    session.flush()
    forget_subscriptions(session)
    if "station_id" in changed or "topics" in changed:
        dropped = _drop_uncovered(session, subscription, now)
        if dropped:
            changed["dropped_deliveries"] = dropped
    if changed:
        audit.append(
            session=session,
            actor_id=actor_id,
            action="webhook_subscription_updated",
            subject_type="webhook_subscription",
            subject_key=str(subscription.id),
            details=changed,
        )
    return subscription


def _lock_subscription(session: Session, subscription_id: int) -> WebhookSubscription | None:
    """Lock the subscription's row, before any of its deliveries: every path that locks
    both (an admin's change, an attempt recorded) takes them in this order. Read again
    under the lock: what a worker committed while the caller waited (a failure counted,
    the subscription disabled) is what the caller changes. ``FOR NO KEY UPDATE``, as an
    update of it takes: a push writing deliveries for it (a foreign key check, ``FOR KEY
    SHARE``) is not waited for. The subscription as read under the lock (None: gone)."""
    return session.scalar(
        select(WebhookSubscription)
        .where(WebhookSubscription.id == subscription_id)
        .with_for_update(key_share=True)
        .execution_options(populate_existing=True)
    )


def _enable_again(session: Session, subscription: WebhookSubscription, now: dt.datetime) -> None:
    subscription.disabled_at = None
    subscription.disabled_reason = None
    subscription.consecutive_failures = 0
    subscription.failing_since = None
    close_flag(
        session=session,
        kind=SUBSCRIPTION_DISABLED,
        subject=FlagSubject("subscription", str(subscription.id)),
        reason="the subscription was enabled again",
    )
    waiting = _lock_deliveries(
        session,
        DELIVERY.c.subscription_id == subscription.id,
        DELIVERY.c.status == DeliveryStatus.PENDING.value,
        DELIVERY.c.next_attempt_at > now,
    )
    if waiting:
        session.execute(
            update(DELIVERY).where(DELIVERY.c.id.in_(waiting)).values(next_attempt_at=now)
        )


def _drop_uncovered(session: Session, subscription: WebhookSubscription, now: dt.datetime) -> int:
    """Delete the subscription's pending deliveries of messages it no longer covers
    (another station's, or of a topic it dropped): after a move, its receiver is
    another station's system, which must not get this one's recipients. Deleted rather
    than made dead, which a replay would send. The couriers whose consent questions
    were among them hear it (``not_reached``). How many were deleted."""
    messages = OutboxMessage.__table__
    uncovered = ~DELIVERY.c.topic.in_(subscription.topics)
    if subscription.station_id is not None:
        other_station = exists().where(
            messages.c.id == DELIVERY.c.message_id,
            or_(
                messages.c.station_id.is_(None),
                messages.c.station_id != subscription.station_id,
            ),
        )
        uncovered = or_(uncovered, other_station)
    dropped = _lock_deliveries(
        session,
        DELIVERY.c.subscription_id == subscription.id,
        DELIVERY.c.status == DeliveryStatus.PENDING.value,
        uncovered,
    )
    if dropped:
        request_reach.tell_waiting(session, subscription.id, now, deliveries=dropped)
        session.execute(delete(DELIVERY).where(DELIVERY.c.id.in_(dropped)))
    return len(dropped)


def _topics(topics: Iterable[str]) -> list[str]:
    wanted = list(dict.fromkeys(topics))
    unknown = [topic for topic in wanted if topic not in TOPICS]
    if unknown:
        raise InvalidInput(
            f"unknown topic {', '.join(map(repr, unknown))}; topics: {', '.join(TOPICS)}",
            code="unknown_topic",
            field="topics",
        )
    if not wanted:
        raise InvalidInput("name at least one topic", code="topics_required", field="topics")
    return wanted


def _station(session: Session, station_id: int | None) -> int | None:
    if station_id is not None and session.get(Station, station_id) is None:
        raise InvalidInput(
            f"no station with id {station_id}", code="station_not_found", field="station_id"
        )
    return station_id


def _description(description: str) -> str:
    text = description.strip()
    if len(text) > MAX_DESCRIPTION_LENGTH:
        raise InvalidInput(
            f"the description is longer than {MAX_DESCRIPTION_LENGTH} characters",
            code="description_too_long",
            field="description",
        )
    return text


# -- sending ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendResult:
    """How one attempt went: the answer's status and the start of its body, or the error
    that kept it from getting one."""

    status_code: int | None = None
    body: str = ""  # the first bytes of the answer (at most max_response_bytes), decoded
    error: str | None = None
    bytes_read: int = 0
    truncated: bool = False  # the answer was longer than max_response_bytes

    @property
    def ok(self) -> bool:
        return (
            self.error is None and self.status_code is not None and 200 <= self.status_code < 300
        )

    def describe(self) -> str:
        """The error as stored in ``last_error``: short, and never the request."""
        if self.error is not None:
            return self.error[:MAX_ERROR_LENGTH]
        text = f"HTTP {self.status_code}"
        if self.status_code is not None and 300 <= self.status_code < 400:
            text += " (redirects are not followed)"
        excerpt = self.body[:MAX_ERROR_BODY].strip()
        return f"{text}: {excerpt}" if excerpt else text


class Sender(Protocol):
    """Posts one signed request; never raises for what the receiver or the network did.
    Called from several threads at once (one per subscription being sent to)."""

    def send(self, *, url: str, body: bytes, headers: Mapping[str, str]) -> SendResult: ...

    def close(self) -> None: ...


class _GuardedBackend(httpcore.SyncBackend):
    """Resolves the host itself and connects to the address it checked.

    It refuses a host with any address that is not public (private, link-local,
    reserved..., and loopback in production): a subscription must not make the server
    post into its own network. Outside production loopback is allowed (a receiver on
    the developer's machine, a test's), nothing else of the network. Connecting to the
    checked address, rather than letting the socket resolve the name again, leaves no
    room for a DNS answer that changes in between. TLS still verifies the certificate
    against the host name.
    """

    def __init__(self, *, loopback_allowed: bool) -> None:
        self.loopback_allowed = loopback_allowed
        # The deadline of the attempt each thread has in progress (the worker sends to
        # several receivers at once, one attempt per thread).
        self._attempt = threading.local()

    def _may_connect(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return is_public_address(address) or (self.loopback_allowed and address.is_loopback)

    @property
    def deadline(self) -> float | None:
        """The attempt in progress must end by then (time.monotonic()): resolving,
        connecting, sending and every read of the answer are bounded by it, so a
        receiver dripping its answer a byte at a time cannot hold a worker."""
        return getattr(self._attempt, "deadline", None)

    @deadline.setter
    def deadline(self, value: float | None) -> None:
        self._attempt.deadline = value

    def remaining(self, timeout: float | None) -> float | None:
        if self.deadline is None:
            return timeout
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise httpcore.ReadTimeout("the attempt's time is up")
        return left if timeout is None else min(timeout, left)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        lookup = _resolve(host, port)
        try:
            found = lookup.result(timeout=self.remaining(timeout))
        except concurrent.futures.TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} took too long") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
        refused = [a for a in addresses if not self._may_connect(ipaddress.ip_address(a))]
        if refused:
            raise httpcore.ConnectError(
                f"refused: {host} resolves to {', '.join(refused)}, not a public address"
            )
        error: Exception = httpcore.ConnectError(f"no address for {host}")
        for address in addresses:
            try:
                stream = super().connect_tcp(
                    address,
                    port,
                    self.remaining(timeout),
                    local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
            else:
                return _BoundedStream(stream, self)
        raise error


class _BoundedStream(httpcore.NetworkStream):
    """A connection whose every read and write ends by its attempt's deadline."""

    def __init__(self, stream: httpcore.NetworkStream, backend: _GuardedBackend) -> None:
        self._stream = stream
        self._backend = backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._backend.remaining(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._backend.remaining(timeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        upgraded = self._stream.start_tls(
            ssl_context, server_hostname, self._backend.remaining(timeout)
        )
        return _BoundedStream(upgraded, self._backend)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


def _resolve(host: str, port: int) -> concurrent.futures.Future[Any]:
    """``getaddrinfo`` on a thread of its own. Name resolution has no timeout of its own,
    so an attempt waits for it only until its deadline, and a lookup left hanging (a
    receiver's name server gone) finishes on its own, harmlessly. Not in a shared pool:
    a few such lookups would fill it, and every other receiver's would wait behind them."""
    lookup: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run() -> None:
        try:
            lookup.set_result(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as exc:
            lookup.set_exception(exc)

    threading.Thread(target=run, name=f"resolve {host}", daemon=True).start()
    return lookup


class HttpxSender:
    """Sends with httpx: no redirects, no proxies from the environment, per-phase
    timeouts plus a deadline on reading the answer, which is read up to
    ``max_response_bytes`` and no further (``Accept-Encoding: identity``: no
    decompression bomb either)."""

    def __init__(self, settings: DeliverySettings) -> None:
        self.settings = settings
        transport = httpx.HTTPTransport(trust_env=False, retries=0)
        # httpx takes no network backend of its own: give its connection pool one that
        # vets addresses (httpx is pinned < 0.29; the SSRF test fails if this breaks).
        self._backend = _GuardedBackend(loopback_allowed=not settings.production)
        transport._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            network_backend=self._backend,
        )
        self._client = httpx.Client(
            transport=transport,
            follow_redirects=False,
            timeout=httpx.Timeout(settings.timeout_seconds),
            trust_env=False,
        )

    def send(self, *, url: str, body: bytes, headers: Mapping[str, str]) -> SendResult:
        try:  # again: the configuration may have changed since the subscription was made
            check_url(url, production=self.settings.production)
        except InvalidInput as exc:
            return SendResult(error=exc.message)
        deadline = time.monotonic() + self.settings.timeout_seconds
        self._backend.deadline = time.monotonic() + self.settings.attempt_bound_seconds
        limit = self.settings.max_response_bytes
        try:
            with self._client.stream(
                "POST", url, content=body, headers={**headers, "Accept-Encoding": "identity"}
            ) as response:
                received = bytearray()
                truncated = False
                try:
                    for chunk in response.iter_raw():
                        received += chunk[: limit + 1 - len(received)]
                        if len(received) > limit:  # one byte more than allowed: cut here
                            truncated = True
                            del received[limit:]
                            break
                        if time.monotonic() > deadline:
                            break
                except httpx.HTTPError:
                    pass  # the status is in; a body cut short changes nothing
                return SendResult(
                    status_code=response.status_code,
                    body=bytes(received).decode("utf-8", errors="replace"),
                    bytes_read=len(received),
                    truncated=truncated,
                )
        except httpx.TimeoutException as exc:
            return SendResult(
                error=f"timed out after {self.settings.timeout_seconds:g} s "
                f"({type(exc).__name__}{': ' + str(exc) if str(exc) else ''})"
            )
        except httpx.HTTPError as exc:
            return SendResult(error=f"{type(exc).__name__}: {exc}")
        finally:
            self._backend.deadline = None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpxSender:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


# -- the worker -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimedDelivery:
    """A delivery this worker holds, with everything needed to send it."""

    id: int
    delivery_id: uuid.UUID
    subscription_id: int
    topic: str
    ordering_key: str
    attempts: int  # before this attempt
    url: str
    secret: str = field(repr=False)
    envelope: dict[str, Any] = field(repr=False)
    # A rotation's old secret, while its grace lasts: signed with too (``signing_secrets``)
    previous_secret: str | None = field(default=None, repr=False)


def envelope_of(message: OutboxMessage, delivery_id: uuid.UUID) -> dict[str, Any]:
    """The JSON document a receiver gets for ``message`` in this delivery. The delivery
    id is in it, signed, as well as in ``X-Courier-Delivery``: a receiver de-duplicating
    on it cannot be fooled by a captured request re-sent with another header."""
    return {
        "id": str(message.id),
        "delivery_id": str(delivery_id),
        "topic": message.topic,
        "created_at": message.created_at.isoformat(),
        "station_id": message.station_id,
        "data": message.payload,
    }


def encode_body(envelope: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON: exactly the bytes that are signed and sent."""
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def request_headers(claimed: ClaimedDelivery, body: bytes, at: dt.datetime) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Courier-Topic": claimed.topic,
        DELIVERY_HEADER: str(claimed.delivery_id),
        "X-Courier-Attempt": str(claimed.attempts + 1),
        SIGNATURE_HEADER: signature(claimed, int(at.timestamp()), body),
    }


def signature(claimed: ClaimedDelivery, timestamp: int, body: bytes) -> str:
    """``sign`` with the subscription's secret, then, while a rotation's grace lasts,
    another ``v1`` with the old one: ``t=<t>,v1=<new>,v1=<old>``. A receiver checks
    every ``v1`` (``verify``); one that reads only the last still has the old secret's."""
    signed = sign(claimed.secret, timestamp, body)
    if claimed.previous_secret is None:
        return signed
    return f"{signed},v1={sign(claimed.previous_secret, timestamp, body).partition(',v1=')[2]}"


def backoff_delay(
    failures: int, *, base: float, maximum: float, rng: random.Random
) -> dt.timedelta:
    """The wait after the ``failures``-th failed attempt: d/2 plus a random share of d/2,
    where d = min(maximum, base * 2**(failures-1)). The jitter spreads the retries of
    many deliveries that failed together (a receiver back up after an outage)."""
    ceiling = min(maximum, base * 2 ** min(max(failures - 1, 0), 62))
    return dt.timedelta(seconds=ceiling / 2 + rng.uniform(0, ceiling / 2))


# Topics whose message stops being worth sending at a time its data names: the field.
# A consent.requested asks a question the courier waits for at the door, until the
# request's expiry (``_moot`` skips it once the request is no longer pending).
DEADLINES = {"consent.requested": "expires_at"}
# Of the time a deadline leaves, the share a retry may wait at most.
DEADLINE_SHARE = 0.25


def deadline_of(topic: str, data: Mapping[str, Any]) -> dt.datetime | None:
    """When a message of ``topic`` with ``data`` stops being worth sending (``DEADLINES``),
    or None."""
    name = DEADLINES.get(topic)
    value = data.get(name) if name is not None else None
    if not isinstance(value, str):
        return None
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def retry_at(
    failures: int,
    *,
    at: dt.datetime,
    deadline: dt.datetime | None,
    settings: DeliverySettings,
    rng: random.Random,
) -> dt.datetime:
    """When a delivery that failed its ``failures``-th attempt at ``at`` is tried again:
    after the backoff (``backoff_delay``), bounded, for a message with a deadline, by a
    quarter of the time it has left (never below ``backoff_seconds``). The backoff alone
    made a 30-minute consent request's retry after a 15-minute outage come 10 to 20
    minutes later, past its expiry: the recipient was never asked while the courier
    waited. Bounded, the question goes within minutes of the receiver's return, and its
    retries come ever closer together towards the expiry, never after it (but within
    the last ``4 * backoff_seconds``)."""
    maximum = settings.backoff_max_seconds
    if deadline is not None:
        left = (deadline - at).total_seconds()
        maximum = min(maximum, max(left * DEADLINE_SHARE, settings.backoff_seconds))
    return at + backoff_delay(failures, base=settings.backoff_seconds, maximum=maximum, rng=rng)


def claim_due(
    *,
    sessions: sessionmaker[Session],
    due_at: dt.datetime,
    now: dt.datetime,
    settings: DeliverySettings,
    worker_id: str,
    limit: int = CLAIM_BATCH,
    skip_ids: Collection[int] = (),
    skip_subscriptions: Collection[int] = (),
    skipped: list[int] | None = None,
) -> list[ClaimedDelivery]:
    """Claim up to ``limit`` deliveries due at ``due_at`` whose claim (if any) has expired
    by ``now``, of active subscriptions, that wait for no earlier delivery of their key,
    in one committed transaction; oldest first. ``skip_ids``: deliveries the caller
    attempted already; ``skip_subscriptions``: those it is sending to at the moment.
    ``skipped``: the ids of the deliveries found moot and settled as ``skipped``
    (``_moot``) are added to it, for the caller's counts.

    Never empty merely because its subscriptions no longer cover what it claimed: a
    claim whose every delivery was dropped or skipped (see ``_claim``) is followed by
    another, as the caller takes an empty answer for "nothing is due"."""
    while True:
        claimed, dropped, moot = _claim(
            sessions, due_at, now, settings, worker_id, limit, skip_ids, skip_subscriptions
        )
        if skipped is not None:
            skipped.extend(moot)
        if claimed or not (dropped or moot):
            return claimed


def _claim(
    sessions: sessionmaker[Session],
    due_at: dt.datetime,
    now: dt.datetime,
    settings: DeliverySettings,
    worker_id: str,
    limit: int,
    skip_ids: Collection[int],
    skip_subscriptions: Collection[int],
) -> tuple[list[ClaimedDelivery], int, list[int]]:
    """One claim of ``claim_due``: what it claimed, how many deliveries it dropped (no
    longer covered), and the ids of those it skipped (moot)."""
    earlier = aliased(WebhookDelivery)
    waits = exists().where(
        earlier.subscription_id == WebhookDelivery.subscription_id,
        earlier.ordering_key == WebhookDelivery.ordering_key,
        earlier.status == DeliveryStatus.PENDING,
        earlier.id < WebhookDelivery.id,
    )
    unclaimed = or_(WebhookDelivery.claimed_until.is_(None), WebhookDelivery.claimed_until <= now)
    with sessions.begin() as session:
        candidates: list[int] = []
        # Held by another worker's claim in progress (and what the caller skips).
        passed_over: set[int] = set(skip_ids)
        while True:  # each round passes over rows other workers hold: it ends
            due = (
                select(
                    WebhookDelivery.id,
                    func.row_number()
                    .over(
                        partition_by=WebhookDelivery.subscription_id, order_by=WebhookDelivery.id
                    )
                    .label("turn"),
                )
                .join(
                    WebhookSubscription,
                    WebhookSubscription.id == WebhookDelivery.subscription_id,
                )
                .where(
                    WebhookDelivery.status == DeliveryStatus.PENDING,
                    WebhookDelivery.next_attempt_at <= due_at,
                    unclaimed,
                    SENDING,
                    ~waits,
                )
            )
            if passed_over:
                due = due.where(WebhookDelivery.id.not_in(passed_over))
            if skip_subscriptions:
                due = due.where(WebhookDelivery.subscription_id.not_in(skip_subscriptions))
            # A few per subscription at a time (``turn``, counted in the database over
            # every due row): one slow or failing receiver, however many messages it has
            # waiting, must not keep the others' (a recipient at the door) behind it.
            ranked = due.subquery()
            picked = list(
                session.scalars(
                    select(ranked.c.id)
                    .where(ranked.c.turn <= PER_SUBSCRIPTION)
                    .order_by(ranked.c.id)
                    .limit(limit)
                )
            )
            if not picked:
                break
            # Lock what no other worker is claiming this instant (PostgreSQL skips rows
            # locked by another claim); look further when they were all taken.
            candidates = list(
                session.scalars(
                    select(WebhookDelivery.id)
                    .where(
                        WebhookDelivery.id.in_(picked),
                        # Read again under the lock: claimed a moment ago is not free.
                        WebhookDelivery.status == DeliveryStatus.PENDING,
                        unclaimed,
                    )
                    .order_by(WebhookDelivery.id)
                    .with_for_update(skip_locked=True)
                )
            )
            if candidates:
                break
            passed_over.update(picked)
        if not candidates:
            return [], 0, []
        until = now + dt.timedelta(seconds=settings.claim_seconds(len(candidates)))
        claimed = session.scalars(
            update(DELIVERY)
            .where(
                DELIVERY.c.id.in_(candidates),
                DELIVERY.c.status == DeliveryStatus.PENDING.value,
                or_(DELIVERY.c.claimed_until.is_(None), DELIVERY.c.claimed_until <= now),
            )
            .values(claimed_until=until, claimed_by=worker_id)
            .returning(DELIVERY.c.id)
        ).all()
        if not claimed:
            return [], 0, []
        rows = session.execute(
            select(WebhookDelivery, OutboxMessage, WebhookSubscription)
            .join(OutboxMessage, OutboxMessage.id == WebhookDelivery.message_id)
            .join(WebhookSubscription, WebhookSubscription.id == WebhookDelivery.subscription_id)
            .where(WebhookDelivery.id.in_(claimed))
            .order_by(WebhookDelivery.id)
        ).all()
        # A push that read the subscriptions before an admin moved one (or dropped a
        # topic) commits its deliveries after the move's clean-up ran: on PostgreSQL
        # nothing orders the two. Such a delivery is dropped here, as the clean-up would
        # have dropped it, rather than sent to a receiver that no longer covers it.
        left = [
            delivery.id
            for delivery, message, subscription in rows
            if not covers(
                subscription.topics, subscription.station_id, message.topic, message.station_id
            )
        ]
        if left:
            session.execute(delete(DELIVERY).where(DELIVERY.c.id.in_(left)))
            log.warning(
                "dropped %d webhook deliveries their subscriptions no longer cover (moved to "
                "another station or topics while the messages were being written)",
                len(left),
            )
        moot = _moot(session, [(d, m) for d, m, _ in rows if d.id not in left], now)
        for delivery, _, _ in rows:
            if delivery.id in moot:
                delivery.status = DeliveryStatus.SKIPPED
                delivery.skipped_reason = moot[delivery.id]
                delivery.claimed_until = None
                delivery.claimed_by = None
                log.info(
                    "webhook delivery %s (%s, key %s) to subscription %s: skipped, %s",
                    delivery.delivery_id,
                    delivery.topic,
                    delivery.ordering_key,
                    delivery.subscription_id,
                    moot[delivery.id],
                )
        dropped = len(left)
        left.extend(moot)
        return (
            [
                ClaimedDelivery(
                    id=delivery.id,
                    delivery_id=delivery.delivery_id,
                    subscription_id=delivery.subscription_id,
                    topic=delivery.topic,
                    ordering_key=delivery.ordering_key,
                    attempts=delivery.attempts,
                    url=subscription.url,
                    secret=subscription.secret,
                    envelope=envelope_of(message, delivery.delivery_id),
                    previous_secret=next(iter(signing_secrets(subscription, now)[1:]), None),
                )
                for delivery, message, subscription in rows
                if delivery.id not in left
            ],
            dropped,
            sorted(moot),
        )


def _moot(
    session: Session, rows: Sequence[tuple[WebhookDelivery, OutboxMessage]], now: dt.datetime
) -> dict[int, str]:
    """Of these deliveries about to be sent, those no longer worth sending, with why: a
    ``consent.requested`` whose request is no longer pending (answered, lapsed,
    cancelled) by the time it is due, after an outage of the receiver or the worker.
    Asking the recipient then would get an answer that no longer counts; what became
    of the request is what the integrator hears (its outcome's topic,
    ``consent.request_granted``, ``_refused``, ``_lapsed`` or ``_cancelled``, its own
    answer's reply, or the request read through the API)."""
    asked = {
        delivery.id: message.payload["request_id"]
        for delivery, message in rows
        if message.topic == "consent.requested"
    }
    if not asked:
        return {}
    requests = {
        request.id: request
        for request in session.scalars(
            select(ConsentRequest).where(ConsentRequest.id.in_(set(asked.values())))
        )
    }
    moot = {}
    for delivery_id, request_id in asked.items():
        request = requests.get(request_id)
        status = "gone" if request is None else effective_status(request, now)
        if status != "pending":
            moot[delivery_id] = (
                f"consent request {request_id} was no longer pending when this was due "
                f"({status}): the recipient is not asked"
            )
    return moot


def release_claims(*, sessions: sessionmaker[Session], ids: Sequence[int], worker_id: str) -> None:
    """Give back claims that will not be sent (the worker is stopping). Locked by id
    (``_lock_deliveries``)."""
    if not ids:
        return
    with sessions.begin() as session:
        held = _lock_deliveries(
            session, DELIVERY.c.id.in_(ids), DELIVERY.c.claimed_by == worker_id
        )
        if held:
            session.execute(
                update(DELIVERY)
                .where(DELIVERY.c.id.in_(held), DELIVERY.c.claimed_by == worker_id)
                .values(claimed_until=None, claimed_by=None)
            )


def _lock_deliveries(session: Session, *where: Any) -> list[int]:
    """Lock the deliveries matching ``where`` in the order of their ids, and return
    those ids: every path that locks several deliveries takes them in this order (a
    claim, ``claim_due``, too), after their subscription when it locks that. An UPDATE
    or DELETE alone locks them in the order its plan meets them (on a small table,
    where they lie on disk), and two such transactions, each holding a row the other
    wants next, deadlock on PostgreSQL."""
    return list(
        session.scalars(
            select(DELIVERY.c.id).where(*where).order_by(DELIVERY.c.id).with_for_update()
        )
    )


# Outcomes of recording an attempt.
DELIVERED, RETRY, DEAD, STALE = "delivered", "retry", "dead", "stale"


@dataclass(frozen=True)
class Recorded:
    outcome: str  # delivered | retry | dead | stale (nothing recorded: see record_attempt)
    attempts: int = 0
    next_attempt_at: dt.datetime | None = None
    disabled_subscription: bool = False


def record_attempt(
    *,
    sessions: sessionmaker[Session],
    claimed: ClaimedDelivery,
    result: SendResult,
    at: dt.datetime,
    settings: DeliverySettings,
    worker_id: str,
    rng: random.Random,
) -> Recorded:
    """Store how an attempt went, in a transaction of its own.

    Nothing is stored (``stale``) when the delivery is no longer pending (an admin
    replayed or purged it meanwhile), or when this worker's claim expired and another
    worker took the delivery over and this attempt failed: the other worker's attempt
    is the one that counts. A success is always stored: the receiver has it.

    The subscription is locked first, then the delivery: the order of an admin's change
    (``update_subscription`` locks the subscription, then its deliveries), else each
    waited for the other on PostgreSQL and one failed.
    """
    with sessions.begin() as session:
        subscription = _lock_subscription(session, claimed.subscription_id)
        delivery = session.get(
            WebhookDelivery, claimed.id, with_for_update=True, populate_existing=True
        )
        if delivery is None or delivery.status != DeliveryStatus.PENDING:
            return Recorded(STALE)
        ours = delivery.claimed_by == worker_id
        if not ours and not result.ok:
            return Recorded(STALE)
        delivery.attempts += 1
        delivery.last_attempt_at = at
        delivery.last_status_code = result.status_code
        if ours:
            delivery.claimed_until = None
            delivery.claimed_by = None
        if result.ok:
            delivery.status = DeliveryStatus.DELIVERED
            delivery.delivered_at = at
            delivery.last_error = None
            # Told at its first failure that it had not got through, or that its
            # subscription stopped while it was being sent: now it has got through.
            told_not_through = delivery.attempts > 1 or (
                subscription is not None and not is_sending(subscription)
            )
            reached = (
                (claimed.envelope.get("data") or {}).get("request_id")
                if claimed.topic == request_reach.TOPIC and told_not_through
                else None
            )
            if _count_success(session, claimed.subscription_id, at):
                # Enabled again: the couriers told it had stopped hear it sends again.
                request_reach.tell_waiting(session, claimed.subscription_id, at, also=reached)
            else:
                request_reach.tell_courier(session, reached)
            return Recorded(DELIVERED, delivery.attempts)
        error = result.describe()
        delivery.last_error = error
        deadline = deadline_of(claimed.topic, claimed.envelope.get("data") or {})
        # A message with a deadline is tried until then, whatever its attempts: the next
        # claim past it skips it (``_moot``), and its retries are bounded (``retry_at``).
        if delivery.attempts >= settings.max_attempts and (deadline is None or at >= deadline):
            delivery.status = DeliveryStatus.DEAD
            outcome = DEAD
        else:
            delivery.next_attempt_at = retry_at(
                delivery.attempts,
                at=at,
                deadline=deadline,
                settings=settings,
                rng=rng,
            )
            outcome = RETRY
        asked = (claimed.envelope.get("data") or {}).get("request_id")
        not_through = None
        if claimed.topic == request_reach.TOPIC and _request_ended(session, asked, at):
            # Answered (or cancelled) while it was being sent: the answer found it claimed,
            # nothing waiting to bring forward (``request_reach.question_due_now``). Due at
            # once, the next claim skips it, rather than hold the parcel's later messages
            # (the answer's own) back until its retry, up to an hour away.
            if outcome == RETRY:
                delivery.next_attempt_at = at
        elif claimed.topic == request_reach.TOPIC and delivery.attempts == 1:
            # The courier at the door hears that the question has not got through.
            not_through = asked
        disabled = _count_failure(session, claimed, error, at, settings)
        if disabled:
            # Its couriers hear that it stopped, this question's among them: told once.
            request_reach.tell_waiting(session, claimed.subscription_id, at, also=not_through)
        else:
            request_reach.tell_courier(session, not_through)
        return Recorded(outcome, delivery.attempts, delivery.next_attempt_at, disabled)


def _request_ended(session: Session, request_id: object, at: dt.datetime) -> bool:
    """Whether the consent request a ``consent.requested`` asks (``request_id``) is no
    longer pending at ``at``: its question is moot (``_moot``)."""
    request = session.get(ConsentRequest, request_id) if isinstance(request_id, int) else None
    return request is None or effective_status(request, at) != "pending"


def _count_success(session: Session, subscription_id: int, at: dt.datetime) -> bool:
    """A success made at ``at`` ends the subscription's run of failures, unless the run
    began after it (a later failure recorded first: the success is older news), and is
    the subscription's ``last_delivered_at`` unless a later one is. Attempts are
    recorded in the order their lanes end, by one worker or several, not in the order
    they were made. (A run begun before ``at`` is ended whole: failures made after
    ``at`` and recorded before it are not told apart, a count short by them.)

    A run it ends that disabled the subscription with a failure made after ``at`` (at
    a receiver's return, an attempt begun while it was down ended just after another's
    success, and was recorded first) is undone too: counted in the order they were
    made, that failure began a new run and disabled nothing (``_undo_disabling``).
    True when that made it send again."""
    sending_again = _undo_disabling(session, subscription_id, at)
    moment = literal(at, SUBSCRIPTION.c.failing_since.type)
    last = SUBSCRIPTION.c.last_delivered_at
    run_begun_later = SUBSCRIPTION.c.failing_since > moment
    session.execute(
        update(SUBSCRIPTION)
        .where(SUBSCRIPTION.c.id == subscription_id)
        .values(
            consecutive_failures=case(
                (run_begun_later, SUBSCRIPTION.c.consecutive_failures), else_=0
            ),
            failing_since=case((run_begun_later, SUBSCRIPTION.c.failing_since), else_=None),
            last_delivered_at=case((or_(last.is_(None), last < moment), moment), else_=last),
        )
    )
    return sending_again


def _undo_disabling(session: Session, subscription_id: int, at: dt.datetime) -> bool:
    """Enable the subscription again when a failure made after a success at ``at``
    disabled it, counting a run begun before ``at`` (see ``_count_success``): its flag
    closed, its deliveries due as they were. Not one an admin enabled since (no longer
    disabled), nor one a run begun after ``at`` disabled. True when it sends again (not
    paused by an admin meanwhile): the couriers told it had stopped are to hear it."""
    subscription = session.get(WebhookSubscription, subscription_id)
    if (
        subscription is None
        or subscription.disabled_at is None
        or subscription.disabled_at < at
        or subscription.failing_since is None
        or subscription.failing_since > at
    ):
        return False
    log.warning(
        "webhook subscription %s enabled again: the failure at %s that disabled it came "
        "after a success at %s, recorded later",
        subscription_id,
        subscription.disabled_at.isoformat(),
        at.isoformat(),
    )
    subscription.disabled_at = None
    subscription.disabled_reason = None
    session.flush()
    close_flag(
        session=session,
        kind=SUBSCRIPTION_DISABLED,
        subject=FlagSubject("subscription", str(subscription_id)),
        reason="a success made before the failure that disabled it was recorded after it",
    )
    return subscription.active


def _count_failure(
    session: Session,
    claimed: ClaimedDelivery,
    error: str,
    at: dt.datetime,
    settings: DeliverySettings,
) -> bool:
    """One more failure in a row for the subscription (the first of them, at ``at``, is
    ``failing_since``); disable and flag it at the limit: ``disable_after_failures`` in a
    row over ``disable_after_seconds`` at least. True when this failure disabled it.

    A failure made before the subscription's last success (``last_delivered_at``) and
    recorded after it is no failure in a row: not counted. One made before the run's
    first failure recorded so far, and after that success, dates the run back to it."""
    moment = literal(at, SUBSCRIPTION.c.failing_since.type)
    last = SUBSCRIPTION.c.last_delivered_at
    since = SUBSCRIPTION.c.failing_since
    counted = session.execute(
        update(SUBSCRIPTION)
        .where(
            SUBSCRIPTION.c.id == claimed.subscription_id,
            or_(last.is_(None), last < moment),
        )
        .values(
            consecutive_failures=SUBSCRIPTION.c.consecutive_failures + 1,
            failing_since=case((or_(since.is_(None), since > moment), moment), else_=since),
        )
        .returning(
            SUBSCRIPTION.c.consecutive_failures,
            SUBSCRIPTION.c.failing_since,
            SUBSCRIPTION.c.disabled_at,
        )
    ).one_or_none()
    if counted is None:  # older than the last success
        return False
    failures, failing_since, disabled_at = counted
    if (
        failures < settings.disable_after_failures
        or at - failing_since < dt.timedelta(seconds=settings.disable_after_seconds)
        or disabled_at is not None
    ):
        return False
    subscription = session.get(WebhookSubscription, claimed.subscription_id)
    assert subscription is not None
    subscription.disabled_at = at
    subscription.disabled_reason = (
        f"{failures} delivery attempts failed in a row since "
        f"{failing_since:%Y-%m-%d %H:%M:%S} UTC; last: {error}"
    )
    raise_flag(
        session=session,
        kind=SUBSCRIPTION_DISABLED,
        severity=FlagSeverity.WARNING,
        subject=FlagSubject("subscription", str(subscription.id)),
        station_id=subscription.station_id,
        evidence={
            "host": url_host(subscription.url),
            "last_error": error,
            "consecutive_failures": failures,
            "failing_since": failing_since.isoformat(),
        },
    )
    return True


_PHONE_LIKE = re.compile(r"\+?\d[\d -]{6,}\d")


def _scrubbed(result: SendResult, *secret_texts: str) -> SendResult:
    """``result`` without the secret or the signature in what it quotes: a receiver that
    echoes the request must not make us store or log them."""
    hidden = [part for text in secret_texts for part in (text, *text.split(",v1=")[1:])]

    def scrub(value: str) -> str:
        for part in filter(None, hidden):
            value = value.replace(part, "[redacted]")
        # Nor a phone number quoted back (a receiver's 400 often repeats the request):
        # errors reach logs, flags and managers, who see phones masked.
        return _PHONE_LIKE.sub(lambda m: "*" * (len(m[0]) - 4) + m[0][-4:], value)

    return replace(
        result,
        body=scrub(result.body),
        error=None if result.error is None else scrub(result.error),
    )


Sent = tuple[SendResult, dt.datetime]  # how an attempt went, and when it ended


def deliver_due(
    *,
    sessions: sessionmaker[Session],
    now: dt.datetime,
    settings: DeliverySettings,
    sender: Sender,
    worker_id: str,
    limit: int = 100,
    rng: random.Random | None = None,
    stop: threading.Event | None = None,
    due_at: dt.datetime | None = None,
) -> dict[str, Any]:
    """Send up to ``limit`` deliveries due at ``due_at`` (default: the time of each
    claim), each once, and record how it went.

    Each subscription's claimed deliveries are sent on a lane (a thread) of their own,
    one after the other, and while a lane is busy its subscription gets no more claims:
    a receiver that takes its whole timeout on every call delays its own messages, never
    another's (a recipient at the door waiting for a consent request). Claims and
    records stay on the calling thread; ``CLAIM_BATCH`` deliveries are in flight at
    most, so each lane starts as soon as it is claimed and its claim outlasts it.

    After one delivery of a key is delivered, the next of that key may go in the same
    call. What fails is not claimed again in this call. Attempts are stamped ``now``
    plus the time this call has taken. ``rng``: the jitter's random numbers (tests pass
    a seeded one). ``stop``: once set, no lane starts another attempt, the claims not
    yet sent are given back and the call returns; when the call fails (its database gone
    while claiming or recording), no lane starts another attempt either: their outcomes
    could not be recorded, and their claims expire. ``due_at``: a drain's start, so that
    what was announced or failed during the drain is not due, while ``now`` (what signs
    and claims) is the time of this call.

    Returns the counts: ``claimed``, ``delivered``, ``failed`` (to be retried),
    ``dead``, ``stale`` (see ``record_attempt``), ``skipped`` (found moot when due and
    not sent: ``_moot``; not counted as claimed), and ``disabled``: the ids of the
    subscriptions this call disabled.
    """
    rng = rng or random.Random()
    started = time.monotonic()

    def clock() -> dt.datetime:
        return now + dt.timedelta(seconds=time.monotonic() - started)

    # Set when this thread fails (the database gone while claiming or recording): the
    # lanes start no other attempt, whose outcome nobody would record.
    abandoned = threading.Event()

    def stopping() -> bool:
        return abandoned.is_set() or (stop is not None and stop.is_set())

    def send_in_turn(lane: list[ClaimedDelivery]) -> list[Sent]:
        """Attempt the lane's deliveries in order until stopped: how each went, and when."""
        outcomes = []
        for claimed in lane:
            if stopping():
                break
            body = encode_body(claimed.envelope)
            headers = request_headers(claimed, body, clock())
            try:
                result = sender.send(url=claimed.url, body=body, headers=headers)
            except Exception as exc:  # a bug in a sender must not stop the others
                log.exception("webhook sender failed on delivery %s", claimed.delivery_id)
                result = SendResult(error=f"{type(exc).__name__}: {exc}")
            outcomes.append(
                (
                    _scrubbed(
                        result,
                        claimed.secret,
                        claimed.previous_secret or "",
                        headers[SIGNATURE_HEADER],
                    ),
                    clock(),
                )
            )
        return outcomes

    stats: dict[str, Any] = {
        "claimed": 0,
        "delivered": 0,
        "failed": 0,
        "dead": 0,
        "stale": 0,
        "skipped": 0,
        "disabled": [],
    }

    def record_lane(lane: list[ClaimedDelivery], outcomes: list[Sent]) -> None:
        """Record each attempt a lane made; give back the claims it did not try."""
        for claimed, (result, at) in zip(lane, outcomes, strict=False):
            recorded = record_attempt(
                sessions=sessions,
                claimed=claimed,
                result=result,
                at=at,
                settings=settings,
                worker_id=worker_id,
                rng=rng,
            )
            _log_attempt(claimed, result, recorded)
            stats[{RETRY: "failed"}.get(recorded.outcome, recorded.outcome)] += 1
            if recorded.disabled_subscription:
                stats["disabled"].append(claimed.subscription_id)
        unsent = lane[len(outcomes) :]
        release_claims(sessions=sessions, ids=[c.id for c in unsent], worker_id=worker_id)

    attempted: set[int] = set()
    in_flight: dict[concurrent.futures.Future[list[Sent]], list[ClaimedDelivery]] = {}
    with (
        concurrent.futures.ThreadPoolExecutor(
            max_workers=CLAIM_BATCH, thread_name_prefix=f"webhook-lane-{worker_id}"
        ) as lanes,
        _set_on_failure(abandoned),  # left first: set before the executor waits for the lanes
    ):
        while True:
            room = min(CLAIM_BATCH - sum(map(len, in_flight.values())), limit - stats["claimed"])
            if room > 0 and not stopping():
                skipped: list[int] = []
                batch = claim_due(
                    sessions=sessions,
                    due_at=due_at or clock(),
                    now=clock(),
                    settings=settings,
                    worker_id=worker_id,
                    limit=room,
                    skip_ids=attempted,
                    skip_subscriptions={lane[0].subscription_id for lane in in_flight.values()},
                    skipped=skipped,
                )
                stats["skipped"] += len(skipped)
                stats["claimed"] += len(batch)
                attempted.update(claimed.id for claimed in batch)
                by_subscription: dict[int, list[ClaimedDelivery]] = {}
                for claimed in batch:
                    by_subscription.setdefault(claimed.subscription_id, []).append(claimed)
                for lane in by_subscription.values():
                    in_flight[lanes.submit(send_in_turn, lane)] = lane
            if not in_flight:
                break
            # Look again now and then while a lane is slow: a message announced meanwhile,
            # or the next of a key just delivered, need not wait for it.
            done, _ = concurrent.futures.wait(
                in_flight,
                timeout=settings.poll_seconds,
                return_when=concurrent.futures.FIRST_COMPLETED,
            )
            for future in done:
                lane = in_flight.pop(future)
                record_lane(lane, future.result())
    return stats


@contextlib.contextmanager
def _set_on_failure(event: threading.Event) -> Iterator[None]:
    """Set ``event`` when the block raises (and let the exception through)."""
    try:
        yield
    except BaseException:
        event.set()
        raise


def _log_attempt(claimed: ClaimedDelivery, result: SendResult, recorded: Recorded) -> None:
    """One line per attempt: never the secret, the signature or the whole URL."""
    what = (
        f"webhook delivery {claimed.delivery_id} ({claimed.topic}, key {claimed.ordering_key}) "
        f"to subscription {claimed.subscription_id} at {url_host(claimed.url)}, "
        f"attempt {claimed.attempts + 1}"
    )
    error = result.describe()
    if recorded.outcome == DELIVERED:
        log.info("%s: delivered (HTTP %s)", what, result.status_code)
    elif recorded.outcome == RETRY:
        assert recorded.next_attempt_at is not None
        log.warning(
            "%s: failed, retrying at %s: %s",
            what,
            recorded.next_attempt_at.isoformat(timespec="seconds"),
            error,
        )
    elif recorded.outcome == DEAD:
        log.error("%s: failed, no attempts left (dead): %s", what, error)
    else:
        log.info("%s: outcome not recorded (the delivery changed meanwhile)", what)
    if recorded.disabled_subscription:
        log.error(
            "webhook subscription %s disabled after failing too often in a row",
            claimed.subscription_id,
        )


def summary(stats: Mapping[str, Any]) -> str:
    """One line for the CLI."""
    line = (
        f"delivered {stats['delivered']}, failed {stats['failed']} (to be retried), "
        f"dead {stats['dead']}"
    )
    if stats.get("stale"):
        line += f", not recorded {stats['stale']}"
    if stats.get("skipped"):
        line += f", skipped {stats['skipped']} (no longer worth sending)"
    if stats.get("disabled"):
        line += f"; disabled subscriptions: {', '.join(map(str, stats['disabled']))}"
    return line


class DeliveryLoop:
    """Delivers what is due, again and again, until stopped: ``courier-api deliver``
    runs one in the foreground; with SCHEDULER_IN_WEB each web worker runs one on a
    thread. Several loops, in any processes, share the work through their claims."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        settings: DeliverySettings,
        sender: Sender,
        worker_id: str,
        clock: Callable[[], dt.datetime] = utcnow,
        limit: int = 100,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.sender = sender
        self.worker_id = worker_id
        self.clock = clock
        self.limit = limit
        self.stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self, due_at: dt.datetime | None = None) -> dict[str, Any]:
        return deliver_due(
            sessions=self.sessions,
            now=self.clock(),
            due_at=due_at,
            settings=self.settings,
            sender=self.sender,
            worker_id=self.worker_id,
            limit=self.limit,
            stop=self.stop_event,
        )

    def drain(self) -> dict[str, Any]:
        """Send everything due now, each delivery once (``deliver --once``).

        What is due is fixed at the start; each round signs and claims at its own time
        (a backlog may take longer than a receiver's 5-minute tolerance)."""
        started = self.clock()
        total: dict[str, Any] = {}
        while not self.stop_event.is_set():
            stats = self.run_once(started)
            for key, value in stats.items():
                total[key] = total.get(key, type(value)()) + value
            if stats["claimed"] < self.limit:
                break
        return total

    def run(self) -> None:
        """Until ``stop()``: deliver, and wait ``poll_seconds`` whenever nothing was due."""
        while not self.stop_event.is_set():
            try:
                claimed = self.run_once()["claimed"]
            except Exception:  # the database is down: keep trying, the log says why
                log.exception("webhook deliverer %s could not deliver", self.worker_id)
                claimed = 0
            if not claimed:
                self.stop_event.wait(self.settings.poll_seconds)

    def start_thread(self) -> threading.Thread:
        self._thread = threading.Thread(
            target=self.run, name=f"webhook-deliverer-{self.worker_id}", daemon=True
        )
        self._thread.start()
        return self._thread

    def stop(self, *, wait: bool = True) -> None:
        """Stop after the attempt in progress; give back the claims not yet sent."""
        self.stop_event.set()
        if wait and self._thread is not None:
            # Within gunicorn's 30-second graceful shutdown; an attempt still running
            # then is cut short, and its claim expires and is sent again.
            self._thread.join(timeout=min(self.settings.attempt_bound_seconds + 5, 25))

    def close(self) -> None:
        self.sender.close()


# -- admins: deliveries -----------------------------------------------------------------------


def list_deliveries(
    *,
    session: Session,
    status: DeliveryStatus | None = None,
    subscription_id: int | None = None,
    topic: str | None = None,
    after_id: int = 0,
    limit: int = 100,
) -> Sequence[WebhookDelivery]:
    """Deliveries matching every filter given, newest first; ``after_id``: the last id of
    the previous page (the next page holds smaller ids)."""
    query = (
        select(WebhookDelivery)
        .order_by(WebhookDelivery.id.desc())
        .limit(min(limit, MAX_PAGE_SIZE))
    )
    if status is not None:
        query = query.where(WebhookDelivery.status == status)
    if subscription_id is not None:
        query = query.where(WebhookDelivery.subscription_id == subscription_id)
    if topic is not None:
        query = query.where(WebhookDelivery.topic == topic)
    if after_id:
        query = query.where(WebhookDelivery.id < after_id)
    return session.scalars(query).all()


def get_delivery(*, session: Session, delivery_id: int) -> WebhookDelivery:
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None:
        raise NotFound(f"no webhook delivery with id {delivery_id}", code="delivery_not_found")
    return delivery


def message_of(*, session: Session, delivery: WebhookDelivery) -> OutboxMessage:
    message = session.get(OutboxMessage, delivery.message_id)
    assert message is not None  # a foreign key
    return message


def replay_delivery(
    *, session: Session, delivery: WebhookDelivery, now: dt.datetime, actor_id: int | None = None
) -> WebhookDelivery:
    """Send a dead, delivered or skipped delivery again, from its first attempt, with the
    same ``X-Courier-Delivery`` id (a receiver that has it already can tell). One that
    is still moot is skipped again (``_moot``).

    The subscription is locked first, then the delivery (``_lock_subscription``): an
    admin pausing it at this moment is waited for, and the replay refused, rather than
    read as active from before the pause and answered as sent again."""
    subscription = _lock_subscription(session, delivery.subscription_id)
    locked = session.get(
        WebhookDelivery, delivery.id, with_for_update=True, populate_existing=True
    )
    assert locked is not None
    delivery = locked
    if delivery.status not in SETTLED:
        raise Conflict(
            f"delivery {delivery.id} is still pending: it will be attempted again without "
            "a replay",
            code="delivery_pending",
        )
    if subscription is None or not is_sending(subscription):
        raise Conflict(
            f"subscription {delivery.subscription_id} is paused or disabled: nothing is "
            "sent to it until it is active again (PATCH active: true), so enable it first",
            code="subscription_stopped",
        )
    previous = delivery.status
    delivery.status = DeliveryStatus.PENDING
    delivery.attempts = 0
    delivery.next_attempt_at = now
    delivery.delivered_at = None
    delivery.skipped_reason = None
    delivery.claimed_until = None
    delivery.claimed_by = None
    session.flush()
    audit.append(
        session=session,
        actor_id=actor_id,
        action="webhook_delivery_replayed",
        subject_type="webhook_delivery",
        subject_key=str(delivery.id),
        details={
            "delivery_id": str(delivery.delivery_id),
            "subscription_id": delivery.subscription_id,
            "topic": delivery.topic,
            "from_status": previous.value,
        },
    )
    return delivery


def purge_waiting_for_stopped(
    *, session: Session, before: dt.datetime, now: dt.datetime | None = None
) -> dict[str, Any]:
    """Delete the pending deliveries created before ``before`` of subscriptions that are
    stopped: disabled after too many failures in a row, or paused by an admin
    (``active`` false); then the messages no delivery needs any more. A stopped
    receiver's messages wait for it to start again, but not past the retention every
    delivered message gets: they hold recipients' phones and pickup codes, and a
    locker notice that old tells nobody anything.

    Rows another transaction holds are skipped, and go in the next run: an admin
    enabling the subscription at this moment (``_enable_again`` locks it and its
    deliveries) keeps them, and a worker recording an attempt (the subscription, then
    the delivery) is never waited for.

    What the consent questions among them said of their requests is kept on the
    requests first (``request_reach.keep_before_purge``), locked before any delivery as
    everywhere: their requests lapsed (a request lasts a day, the retention one at
    least), so what they say no longer changes, whether they go now or next run."""
    _keep_reach(session, select(DELIVERY.c.id).where(*_waiting(before)), now or utcnow())
    stopped = select(SUBSCRIPTION.c.id).where(~SENDING).with_for_update(skip_locked=True)
    due = (
        select(DELIVERY.c.id)
        .where(
            DELIVERY.c.status == DeliveryStatus.PENDING.value,
            DELIVERY.c.created_at < before,
            DELIVERY.c.subscription_id.in_(stopped.scalar_subquery()),
        )
        .with_for_update(skip_locked=True)
    )
    purged = Counter(
        session.execute(
            delete(DELIVERY)
            .where(DELIVERY.c.id.in_(due.scalar_subquery()))
            .returning(DELIVERY.c.subscription_id)
        ).scalars()
    )
    counts = {"deliveries": sum(purged.values()), "messages": _purge_orphans(session, before)}
    if purged:
        audit.append(
            session=session,
            actor_id=None,
            action="webhook_deliveries_purged",
            subject_type="webhook_delivery",
            subject_key=DeliveryStatus.PENDING.value,
            details={
                "status": DeliveryStatus.PENDING.value,
                "before": before.isoformat(),
                # Which stopped subscriptions lost how many: told when enabled again.
                "subscriptions": {str(sub): n for sub, n in sorted(purged.items())},
                **counts,
            },
        )
    return counts


def _waiting(before: dt.datetime) -> tuple[Any, ...]:
    """The pending deliveries ``purge_waiting_for_stopped`` deletes (before skipping the
    rows another transaction holds)."""
    return (
        DELIVERY.c.status == DeliveryStatus.PENDING.value,
        DELIVERY.c.created_at < before,
        DELIVERY.c.subscription_id.in_(select(SUBSCRIPTION.c.id).where(~SENDING)),
    )


def _keep_reach(session: Session, deliveries: SelectBase, now: dt.datetime) -> int:
    """Before ``deliveries`` (their ids) are purged: what the consent questions among
    them said of their requests is kept on the requests
    (``request_reach.keep_before_purge``). How many requests it was kept on."""
    payloads = session.scalars(
        select(OutboxMessage.payload).where(
            OutboxMessage.id.in_(
                select(DELIVERY.c.message_id).where(
                    DELIVERY.c.id.in_(deliveries.scalar_subquery())
                )
            ),
            OutboxMessage.topic == request_reach.TOPIC,
        )
    )
    return request_reach.keep_before_purge(
        session,
        {
            payload["request_id"]
            for payload in payloads
            if isinstance(payload, dict) and isinstance(payload.get("request_id"), int)
        },
        now,
        deliveries,
    )


def _purge_orphans(session: Session, before: dt.datetime) -> int:
    """Delete the messages created before ``before`` that no delivery needs any more."""
    messages_table = OutboxMessage.__table__
    orphan = ~exists().where(DELIVERY.c.message_id == messages_table.c.id)
    deleted = session.execute(
        delete(messages_table).where(messages_table.c.created_at < before, orphan)
    ).rowcount
    return int(deleted or 0)


def purge_deliveries(
    *,
    session: Session,
    status: DeliveryStatus,
    before: dt.datetime,
    actor_id: int | None = None,
    now: dt.datetime | None = None,
) -> dict[str, int]:
    """Delete the ``delivered`` (or ``dead``, or ``skipped``) deliveries settled before
    ``before`` (by their delivery, or their last attempt, or else their creation), then
    the messages created before it that no delivery needs any more. Counted from when
    they settled, not from when they were written: a paused receiver's backlog,
    delivered weeks late, is kept as long as any (``parcel.drop_voided`` finds who was
    told of a drop by it).

    A delivered consent question is kept while another delivery of its message is not
    delivered (another channel failing, or dead): it is what shows the recipient was
    asked (``request_reach.not_reached``), which read "every attempt failed" from the
    other one alone. Its message, with the recipient's phone, is kept for that one
    anyway; it goes with the next purge after them. What an unanswered request's
    question's deliveries said of it is kept on the request before they go
    (``request_reach.keep_before_purge``): its ``not_reached`` neither goes null nor
    turns into "nobody takes consent requests here"."""
    if status not in SETTLED:
        raise InvalidInput(
            "only delivered, dead or skipped deliveries can be purged",
            code="invalid_status",
            field="status",
        )
    purged = _settled(status, before)
    _keep_reach(session, select(DELIVERY.c.id).where(*purged), now or utcnow())
    deliveries = session.execute(delete(DELIVERY).where(*purged)).rowcount
    counts = {"deliveries": int(deliveries or 0), "messages": _purge_orphans(session, before)}
    audit.append(
        session=session,
        actor_id=actor_id,
        action="webhook_deliveries_purged",
        subject_type="webhook_delivery",
        subject_key=status.value,
        details={"status": status.value, "before": before.isoformat(), **counts},
    )
    return counts


def _settled(status: DeliveryStatus, before: dt.datetime) -> list[Any]:
    """The deliveries ``purge_deliveries`` deletes."""
    settled_at = func.coalesce(
        DELIVERY.c.delivered_at, DELIVERY.c.last_attempt_at, DELIVERY.c.created_at
    )
    purged = [DELIVERY.c.status == status.value, settled_at < before]
    if status == DeliveryStatus.DELIVERED:
        sibling = DELIVERY.alias("sibling")
        purged.append(
            ~and_(
                DELIVERY.c.topic == request_reach.TOPIC,
                exists().where(
                    sibling.c.message_id == DELIVERY.c.message_id,
                    sibling.c.status != DeliveryStatus.DELIVERED.value,
                ),
            )
        )
    return purged


def purge_retained(
    *, session: Session, before: dt.datetime, now: dt.datetime
) -> dict[str, dict[str, Any]]:
    """The ``webhook_retention`` job's purges, in its one transaction: the delivered and
    the skipped deliveries settled before ``before`` (``purge_deliveries``), then the
    waiting ones of stopped subscriptions (``purge_waiting_for_stopped``). Each one's
    counts, by ``delivered``, ``skipped`` and ``waiting``.

    What the consent questions among them all said of their requests is kept first, in
    one pass by request id (``request_reach.keep_before_purge``), and the audit entries
    are chained at the end (``audit.deferred``). Purge by purge, the skipped one locked
    its requests after the delivered one had chained its entry: an answer or a push
    holding one of them, about to take the audit log's lock (every audited write takes
    it last), waited for the job, which waited for the request; and it locked a request
    of the delivered purge before a lower one of the skipped purge, against the lapse
    job and a push locking theirs by id. Deadlocks on PostgreSQL. Each purge still
    keeps what became its own since (a delivery skipped meanwhile)."""
    with audit.deferred(session):
        _keep_reach(
            session,
            union_all(
                select(DELIVERY.c.id).where(*_settled(DeliveryStatus.DELIVERED, before)),
                select(DELIVERY.c.id).where(*_settled(DeliveryStatus.SKIPPED, before)),
                select(DELIVERY.c.id).where(*_waiting(before)),
            ),
            now,
        )
        return {
            "delivered": purge_deliveries(
                session=session, status=DeliveryStatus.DELIVERED, before=before, now=now
            ),
            "skipped": purge_deliveries(
                session=session, status=DeliveryStatus.SKIPPED, before=before, now=now
            ),
            "waiting": purge_waiting_for_stopped(session=session, before=before, now=now),
        }
