"""Consent requests, the transactional outbox, webhook subscriptions and deliveries."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import ForeignKey, Index, String, Text, Uuid, text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, BigId, Document, big_pk, int_pk, str_enum, timestamp
from models.enums import ConsentChannel, ConsentMethod, ConsentRequestStatus, DeliveryStatus


class ConsentRequest(Base):
    """A request for a recipient's consent to unattended delivery, made at the door.

    From a ``consent_requested`` event of a PDA (``event_id``) or online. Sent to the
    recipient's channel through the outbox; answered through ``POST /consents`` with
    its id, which creates the consent (``consent_id``) or records the refusal.
    """

    __tablename__ = "consent_request"
    __table_args__ = (
        Index("ix_consent_request_station_id", "station_id", "id"),
        Index("ix_consent_request_tracking_no", "tracking_no"),
        # A PDA's retry of an online request finds the one made the first time.
        Index(
            "ix_consent_request_client_request_id",
            "device_id",
            "client_request_id",
            unique=True,
            postgresql_where=text("client_request_id IS NOT NULL"),
            sqlite_where=text("client_request_id IS NOT NULL"),
        ),
        # The requests whose lapse the ``consent_requests_lapsed`` job has yet to announce.
        Index(
            "ix_consent_request_unannounced_lapse",
            "expires_at",
            postgresql_where=text("status = 'pending' AND lapse_announced_at IS NULL"),
            sqlite_where=text("status = 'pending' AND lapse_announced_at IS NULL"),
        ),
    )

    id: Mapped[int_pk]
    station_id: Mapped[int] = mapped_column(ForeignKey("station.id"))
    tracking_no: Mapped[str] = mapped_column(String(40))
    courier_id: Mapped[int] = mapped_column(ForeignKey("app_user.id"))  # who asked
    device_id: Mapped[str | None] = mapped_column(ForeignKey("device.id"))
    event_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("scan_event.id"), unique=True)
    client_event_id: Mapped[uuid.UUID | None] = mapped_column(Uuid())
    # Asked online: the PDA's own id for the request, unique per PDA (a retry of
    # ``POST /consents/requests`` with it asks nothing again).
    client_request_id: Mapped[uuid.UUID | None] = mapped_column(Uuid())
    method: Mapped[ConsentMethod] = mapped_column(str_enum(ConsentMethod, "request_method"))
    point_id: Mapped[str | None] = mapped_column(String(64))
    # How to ask the recipient (the channel picks a default when None).
    channel: Mapped[ConsentChannel | None] = mapped_column(
        str_enum(ConsentChannel, "request_channel")
    )
    requested_at: Mapped[dt.datetime]  # corrected clock
    expires_at: Mapped[dt.datetime]
    status: Mapped[ConsentRequestStatus] = mapped_column(
        str_enum(ConsentRequestStatus, "consent_request_status"),
        default=ConsentRequestStatus.PENDING,
    )
    status_reason: Mapped[str | None] = mapped_column(Text)
    answered_at: Mapped[dt.datetime | None]
    answered_by: Mapped[int | None] = mapped_column(ForeignKey("app_user.id"))
    # How the recipient answered (the grant's or the refusal's channel): a refusal's names
    # the channel of a ``consent.request_revoked`` for the grants it withdraws, a grant
    # recorded after it too. None for requests answered before this was kept.
    answered_channel: Mapped[ConsentChannel | None] = mapped_column(
        str_enum(ConsentChannel, "request_answered_channel")
    )
    consent_id: Mapped[int | None] = mapped_column(ForeignKey("consent.id"), unique=True)
    # The expiry of the consent that answered it (a copy: a consent's expiry never
    # changes), past which a granted request reads ``expired`` (``effective_status``).
    consent_expires_at: Mapped[dt.datetime | None]
    # Status ``revoked``: when the consent that answered it was revoked (its ``revoked_at``).
    revoked_at: Mapped[dt.datetime | None]
    # When its lapse (pending at ``expires_at``) was announced (``consent.request_lapsed``):
    # once. Set on the requests that had lapsed before this was kept, never announced.
    lapse_announced_at: Mapped[dt.datetime | None]
    # When a purge of webhook deliveries (an admin's, or the retention job's) first
    # deleted deliveries of its question, what ``sync.request_reach.not_reached`` said
    # of those every purge deleted (why they had not reached the recipient's channel;
    # None: one had), and the most attempts one of them made: read from here on with the
    # deliveries left (another channel's), as if the purged ones were still there. Set
    # only on unanswered ones.
    question_purged_at: Mapped[dt.datetime | None]
    not_reached_when_purged: Mapped[str | None] = mapped_column(Text)
    question_attempts_when_purged: Mapped[int | None]
    # When it reached the server; a PDA's request held back then (``unsent``, "not sent:
    # ..."), when it was sent at last: the parcel's window counts the messages sent.
    created_at: Mapped[timestamp]

    def __repr__(self) -> str:
        return f"<ConsentRequest {self.id} {self.tracking_no} {self.status}>"


class OutboxMessage(Base):
    """Something to announce, written in the transaction of the change that causes it.

    So nothing is announced that did not happen, and nothing happens unannounced:
    the deliveries to each subscription are written with it and worked off later.
    """

    __tablename__ = "outbox_message"
    __table_args__ = (Index("ix_outbox_message_created_at", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    topic: Mapped[str] = mapped_column(String(64))
    station_id: Mapped[int | None] = mapped_column(ForeignKey("station.id"))
    # Messages with one key reach each subscription in the order they were written.
    ordering_key: Mapped[str] = mapped_column(String(160))
    payload: Mapped[dict[str, Any]] = mapped_column(Document)
    created_at: Mapped[timestamp]


class WebhookSubscription(Base):
    """A receiver of announcements: a URL, the topics it wants, optionally one station."""

    __tablename__ = "webhook_subscription"

    id: Mapped[int_pk]
    url: Mapped[str] = mapped_column(Text)
    topics: Mapped[list[str]] = mapped_column(Document)
    station_id: Mapped[int | None] = mapped_column(ForeignKey("station.id"))
    # Signs every delivery (HMAC-SHA256); shown once, at creation or rotation, never again.
    secret: Mapped[str] = mapped_column(String(128))
    # The secret a rotation replaced: deliveries are signed with it too (a second ``v1``)
    # until ``previous_secret_until``, so that the receiver can switch without refusing
    # what is in flight (``sync.webhooks.rotate_secret``).
    previous_secret: Mapped[str | None] = mapped_column(String(128))
    previous_secret_until: Mapped[dt.datetime | None]
    description: Mapped[str] = mapped_column(String(200), default="")
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[timestamp]
    created_by: Mapped[int | None] = mapped_column(ForeignKey("app_user.id"))
    disabled_at: Mapped[dt.datetime | None]
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    consecutive_failures: Mapped[int] = mapped_column(default=0)
    # The first failed attempt of the failures in a row (null after a success): disabled
    # only once they have gone on long enough (``sync.webhooks._count_failure``).
    failing_since: Mapped[dt.datetime | None]
    # When the latest successful attempt was made (not recorded): a failure made before
    # it, recorded after it, is no failure in a row (``sync.webhooks.record_attempt``).
    last_delivered_at: Mapped[dt.datetime | None]

    def __repr__(self) -> str:
        return f"<WebhookSubscription {self.id} active={self.active}>"


class WebhookDelivery(Base):
    """One message to one subscription: its attempts and how it ended."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (
        # The worker: what is due.
        Index("ix_webhook_delivery_due", "status", "next_attempt_at"),
        # Order per key: nothing goes before an earlier delivery of its key is settled.
        Index("ix_webhook_delivery_order", "subscription_id", "ordering_key", "status", "id"),
        Index("ix_webhook_delivery_message_id", "message_id"),
    )

    id: Mapped[big_pk]
    message_id: Mapped[uuid.UUID] = mapped_column(Uuid(), ForeignKey("outbox_message.id"))
    subscription_id: Mapped[int] = mapped_column(ForeignKey("webhook_subscription.id"))
    # Sent with every attempt: the receiver's idempotency key.
    delivery_id: Mapped[uuid.UUID] = mapped_column(Uuid(), unique=True, default=uuid.uuid4)
    topic: Mapped[str] = mapped_column(String(64))
    ordering_key: Mapped[str] = mapped_column(String(160))
    status: Mapped[DeliveryStatus] = mapped_column(
        str_enum(DeliveryStatus, "delivery_status"), default=DeliveryStatus.PENDING
    )
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[dt.datetime]
    # A worker holds a delivery while it sends; a crashed one's hold expires.
    claimed_until: Mapped[dt.datetime | None]
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    last_attempt_at: Mapped[dt.datetime | None]
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[dt.datetime | None]
    # Status ``skipped``: why it was not sent (a consent request answered or lapsed).
    skipped_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[timestamp]
