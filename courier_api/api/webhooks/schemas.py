from typing import Any

import marshmallow as ma

from courier_api.api.base import PageArgs
from courier_api.api.fields import After, Id, Text, UtcTime
from models import (
    ConsentChannel,
    ConsentMethod,
    DeliveryStatus,
    FlagSeverity,
    ReportKind,
    utcnow,
)
from sync.outbox import TOPICS
from sync.webhooks import (
    MAX_DESCRIPTION_LENGTH,
    MAX_SECRET_GRACE_HOURS,
    MAX_URL_LENGTH,
    rotation_grace_until,
)

# Delivery ids are 64-bit (a delivery per message per subscription).
MAX_BIG_ID = 2**63 - 1
TOPIC_LIST = ", ".join(TOPICS)


def _topic(**kwargs: object) -> Text:
    return Text(
        validate=ma.validate.OneOf(list(TOPICS)),
        metadata={"description": f"One of {TOPIC_LIST}", "example": "parcel.in_locker"},
        **kwargs,
    )


# -- subscriptions ----------------------------------------------------------------------------


class GraceUntil(ma.fields.AwareDateTime):
    """A subscription's rotation grace as it stands now (``rotation_grace_until``): its
    end while the old secret still signs, null once past (the time stored stays until
    ``webhook_retention`` clears it, and read alone it told an admin the old secret was
    still in use)."""

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return super()._serialize(rotation_grace_until(obj, utcnow()), attr, obj, **kwargs)


class SubscriptionIn(ma.Schema):
    url = Text(
        required=True,
        validate=ma.validate.Length(min=1, max=MAX_URL_LENGTH),
        metadata={
            "description": "Where to post: https (http only to loopback hosts outside "
            "production); no user name or password, no fragment; redirects are not followed",
            "example": "https://hooks.example.com/courier",
        },
    )
    topics = ma.fields.List(
        _topic(required=True),
        required=True,
        validate=ma.validate.Length(min=1, max=len(TOPICS)),
        metadata={"description": "The topics to receive (GET /webhooks/topics lists them)"},
    )
    station_id = Id(
        load_default=None,
        allow_none=True,
        metadata={"description": "Only this station's messages; null: every station's"},
    )
    description = Text(
        load_default="",
        validate=ma.validate.Length(max=MAX_DESCRIPTION_LENGTH),
        metadata={"example": "SMS gateway: consent requests and locker notices"},
    )


class SubscriptionPatch(ma.Schema):
    url = Text(validate=ma.validate.Length(min=1, max=MAX_URL_LENGTH))
    topics = ma.fields.List(
        _topic(required=True), validate=ma.validate.Length(min=1, max=len(TOPICS))
    )
    station_id = Id(allow_none=True, metadata={"description": "null: every station's messages"})
    description = Text(validate=ma.validate.Length(max=MAX_DESCRIPTION_LENGTH))
    active = ma.fields.Boolean(
        metadata={
            "description": "false pauses deliveries (they wait); true resumes them, and "
            "enables a subscription the worker disabled again"
        }
    )


class SubscriptionOut(ma.Schema):
    id = ma.fields.Integer(required=True)
    url = ma.fields.String(required=True)
    topics = ma.fields.List(ma.fields.String(), required=True)
    station_id = ma.fields.Integer(allow_none=True, required=True)
    description = ma.fields.String(required=True)
    active = ma.fields.Boolean(
        required=True, metadata={"description": "Set by admins: false pauses deliveries"}
    )
    disabled_at = ma.fields.AwareDateTime(
        allow_none=True,
        required=True,
        metadata={
            "description": "When the worker disabled it after too many failures in a row "
            "(WEBHOOK_DISABLE_AFTER_FAILURES, the first of them "
            "WEBHOOK_DISABLE_AFTER_SECONDS before; its deliveries wait, up to "
            "WEBHOOK_RETENTION_DAYS after they were written); PATCH active: true enables "
            "it again"
        },
    )
    disabled_reason = ma.fields.String(allow_none=True, required=True)
    consecutive_failures = ma.fields.Integer(
        required=True,
        metadata={
            "description": "Failed attempts since the last success (or since an admin "
            "last set it active: enabled again or resumed)"
        },
    )
    failing_since = ma.fields.AwareDateTime(
        allow_none=True,
        required=True,
        metadata={
            "description": "The first of those failed attempts (null: the last attempt "
            "succeeded, or none failed since it was enabled, enabled again or resumed)"
        },
    )
    created_at = ma.fields.AwareDateTime(required=True)
    created_by = ma.fields.Integer(allow_none=True, required=True)
    rotation_grace_until = GraceUntil(
        attribute="previous_secret_until",
        allow_none=True,
        required=True,
        metadata={
            "description": "After a rotation of the secret: until when deliveries are "
            "signed with the old secret too (a second v1); null: none, or that time "
            "has passed"
        },
    )


class SecretRotationIn(ma.Schema):
    grace_hours = ma.fields.Integer(
        load_default=24,
        validate=ma.validate.Range(min=0, max=MAX_SECRET_GRACE_HOURS),
        metadata={
            "description": "How long deliveries are signed with the old secret too, so "
            "that the receiver can switch without refusing any; 0: drop it now (a leak)"
        },
    )


class SubscriptionCreatedOut(SubscriptionOut):
    secret = ma.fields.String(
        required=True,
        metadata={
            "description": "Signs every delivery (X-Courier-Signature). Shown in this "
            "answer only (or a rotation's): store it now, it is never given out again"
        },
    )


class SubscriptionListArgs(PageArgs):
    after = After()


class SubscriptionPage(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(SubscriptionOut), required=True)
    next_after = ma.fields.Integer(allow_none=True, required=True)


class TopicOut(ma.Schema):
    name = ma.fields.String(required=True, metadata={"example": "parcel.in_locker"})
    description = ma.fields.String(required=True)


class TopicList(ma.Schema):
    topics = ma.fields.List(ma.fields.Nested(TopicOut), required=True)


# -- deliveries -------------------------------------------------------------------------------


class DeliveryListArgs(PageArgs):
    status = ma.fields.Enum(DeliveryStatus, by_value=True)
    subscription_id = Id()
    topic = _topic()
    after = ma.fields.Integer(
        load_default=0,
        validate=ma.validate.Range(min=0, max=MAX_BIG_ID),
        metadata={"description": "Last id of the previous page"},
    )


class DeliveryOut(ma.Schema):
    id = ma.fields.Integer(required=True)
    delivery_id = ma.fields.UUID(
        required=True,
        metadata={"description": "Sent as X-Courier-Delivery on every attempt and replay"},
    )
    message_id = ma.fields.UUID(
        required=True, metadata={"description": "The envelope's id (the same for every receiver)"}
    )
    subscription_id = ma.fields.Integer(required=True)
    topic = ma.fields.String(required=True)
    ordering_key = ma.fields.String(
        required=True,
        metadata={"description": "Messages of one key reach a receiver in order (a parcel)"},
    )
    status = ma.fields.Enum(DeliveryStatus, by_value=True, required=True)
    attempts = ma.fields.Integer(required=True)
    next_attempt_at = ma.fields.AwareDateTime(
        required=True, metadata={"description": "When a pending delivery is tried next"}
    )
    last_attempt_at = ma.fields.AwareDateTime(allow_none=True, required=True)
    last_status_code = ma.fields.Integer(allow_none=True, required=True)
    last_error = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={
            "description": "Why the last attempt failed: the status and the start of "
            "the answer, or the network error"
        },
    )
    delivered_at = ma.fields.AwareDateTime(allow_none=True, required=True)
    skipped_reason = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={
            "description": "Status skipped: why it was not sent, e.g. a `consent.requested` "
            "whose request was answered or lapsed by the time it was due (after an "
            "outage): the recipient is not asked a question whose answer no longer counts"
        },
    )
    created_at = ma.fields.AwareDateTime(required=True)


class DeliveryPage(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(DeliveryOut), required=True)
    next_after = ma.fields.Integer(allow_none=True, required=True)


class PurgeIn(ma.Schema):
    status = ma.fields.Enum(
        DeliveryStatus,
        by_value=True,
        required=True,
        validate=ma.validate.OneOf(
            [DeliveryStatus.DELIVERED, DeliveryStatus.DEAD, DeliveryStatus.SKIPPED]
        ),
        metadata={"description": "delivered, dead or skipped"},
    )
    before = UtcTime(
        required=True, metadata={"description": "Purge deliveries created before this time"}
    )


class PurgeOut(ma.Schema):
    deliveries = ma.fields.Integer(required=True, metadata={"description": "Deliveries deleted"})
    messages = ma.fields.Integer(
        required=True, metadata={"description": "Messages deleted: no delivery needed them"}
    )


# -- what receivers get (documented in the callbacks of POST /webhooks/subscriptions) ---------


def _time(description: str | None = None, **kwargs: object) -> ma.fields.AwareDateTime:
    metadata = {"description": description} if description else {}
    return ma.fields.AwareDateTime(required=True, metadata=metadata, **kwargs)


class WebhookConsentRequested(ma.Schema):
    """`consent.requested`: ask the recipient; answer with POST /consents and `request_id`.
    Sent only while the request is pending: one answered, lapsed or cancelled before
    it was due is skipped."""

    request_id = ma.fields.Integer(required=True)
    tracking_no = ma.fields.String(required=True, metadata={"example": "RR473124829GB"})
    station_id = ma.fields.Integer(required=True)
    recipient_name = ma.fields.String(required=True)
    recipient_phone = ma.fields.String(
        required=True,
        metadata={
            "description": "E.164, in full: the channel must reach the recipient",
            "example": "+8613812345678",
        },
    )
    address = ma.fields.String(required=True)
    method = ma.fields.Enum(ConsentMethod, by_value=True, required=True)
    point_id = ma.fields.String(allow_none=True, required=True)
    channel = ma.fields.Enum(
        ConsentChannel,
        by_value=True,
        allow_none=True,
        required=True,
        metadata={"description": "How to ask; null: the channel's default"},
    )
    requested_at = _time()
    expires_at = _time("An answer after this time is refused")


class _WebhookRequestOutcome(ma.Schema):
    """What every message on what became of a courier's request names: the request."""

    request_id = ma.fields.Integer(required=True)
    tracking_no = ma.fields.String(required=True, metadata={"example": "RR473124829GB"})
    station_id = ma.fields.Integer(required=True)


class WebhookConsentRequestCancelled(_WebhookRequestOutcome):
    """`consent.request_cancelled`: the courier's PDA voided a pending request (a
    correction), or the parcel was delivered to the recipient in person or collected
    from its locker (`reason` says which): stop asking the recipient; an answer to it
    is a 409 `consent_request_cancelled`. Comes after its `consent.requested` (one not
    sent by then is skipped)."""

    cancelled_at = _time()
    reason = ma.fields.String(required=True)


class WebhookConsentRequestGranted(_WebhookRequestOutcome):
    """`consent.request_granted`: the recipient agreed (an answer through POST /consents
    with the `request_id`, this channel's or another's): stop asking, tell them it is
    recorded. Once per request, after its `consent.requested`."""

    consent_id = ma.fields.Integer(required=True)
    method = ma.fields.Enum(ConsentMethod, by_value=True, required=True)
    point_id = ma.fields.String(allow_none=True, required=True)
    channel = ma.fields.Enum(
        ConsentChannel,
        by_value=True,
        required=True,
        metadata={"description": "The channel the answer came through"},
    )
    granted_at = _time()
    expires_at = ma.fields.AwareDateTime(
        allow_none=True, required=True, metadata={"description": "The consent's; null: none"}
    )
    answered_at = _time("When the answer reached the server")


class WebhookConsentRequestRefused(_WebhookRequestOutcome):
    """`consent.request_refused`: the recipient said no (the courier rings the bell;
    their earlier consents no longer hold for this parcel). Once per request."""

    channel = ma.fields.Enum(ConsentChannel, by_value=True, required=True)
    refused_at = _time()
    reason = ma.fields.String(allow_none=True, required=True)


class WebhookConsentRequestLapsed(_WebhookRequestOutcome):
    """`consent.request_lapsed`: the request reached its expiry unanswered: stop asking;
    an answer now is a 409 `consent_request_expired`. Once per request, within a minute
    or so of its expiry (a job); not for one that lapsed before it was sent."""

    expires_at = _time()


class WebhookConsentRequestRevoked(_WebhookRequestOutcome):
    """`consent.request_revoked`: the consent that granted the request was revoked
    (POST /consents/<id>/revoke), or withdrawn for the parcel by the recipient's refusal
    of a later request (`revoked_at` the refusal's, `reason` naming it): it no longer
    authorizes a drop. Once per request."""

    consent_id = ma.fields.Integer(required=True)
    revoked_at = _time()
    reason = ma.fields.String(allow_none=True, required=True)
    channel = ma.fields.Enum(
        ConsentChannel,
        by_value=True,
        allow_none=True,
        required=True,
        metadata={
            "description": "How the recipient revoked, when the revocation said; for a "
            "refusal's withdrawal, the refusal's channel (null for a refusal recorded "
            "before the server kept it)"
        },
    )


class WebhookParcelInLocker(ma.Schema):
    """`parcel.in_locker`: tell the recipient where to collect the parcel."""

    tracking_no = ma.fields.String(required=True)
    station_id = ma.fields.Integer(required=True)
    recipient_name = ma.fields.String(required=True)
    recipient_phone = ma.fields.String(allow_none=True, required=True)
    locker_id = ma.fields.String(required=True)
    compartment = ma.fields.String(required=True)
    pickup_code = ma.fields.String(allow_none=True, required=True)
    occurred_at = _time()
    event_id = ma.fields.Integer(required=True)


class WebhookParcelAtPickupPoint(ma.Schema):
    """`parcel.at_pickup_point`: tell the recipient where to collect the parcel."""

    tracking_no = ma.fields.String(required=True)
    station_id = ma.fields.Integer(required=True)
    recipient_name = ma.fields.String(required=True)
    recipient_phone = ma.fields.String(allow_none=True, required=True)
    point_id = ma.fields.String(required=True)
    pickup_code = ma.fields.String(allow_none=True, required=True)
    occurred_at = _time()
    event_id = ma.fields.Integer(required=True)


class WebhookParcelDropVoided(ma.Schema):
    """`parcel.drop_voided`: tell the recipient that the parcel is not where an earlier
    `parcel.in_locker` or `parcel.at_pickup_point` said (the courier's correction voided
    that drop; a drop voided before it was announced is never announced at all). Sent
    only to a subscription that was sent that announcement, once."""

    tracking_no = ma.fields.String(required=True)
    station_id = ma.fields.Integer(required=True)
    recipient_name = ma.fields.String(required=True)
    recipient_phone = ma.fields.String(allow_none=True, required=True)
    locker_id = ma.fields.String(allow_none=True, required=True)
    compartment = ma.fields.String(allow_none=True, required=True)
    point_id = ma.fields.String(allow_none=True, required=True)
    event_id = ma.fields.Integer(
        required=True, metadata={"description": "The drop voided: its announcement's `event_id`"}
    )
    correction_event_id = ma.fields.Integer(required=True)
    voided_at = _time("When the correction reached the server")


class _WebhookFlag(ma.Schema):
    flag_id = ma.fields.Integer(required=True)
    kind = ma.fields.String(required=True, metadata={"example": "unauthorized_locker_drop"})
    severity = ma.fields.Enum(FlagSeverity, by_value=True, required=True)
    status = ma.fields.String(required=True)
    subject_type = ma.fields.String(required=True, metadata={"example": "parcel"})
    subject_key = ma.fields.String(required=True)
    station_id = ma.fields.Integer(allow_none=True, required=True)
    shift_id = ma.fields.Integer(allow_none=True, required=True)
    courier_id = ma.fields.Integer(allow_none=True, required=True)


class WebhookFlagRaised(_WebhookFlag):
    """`flag.raised`: a flag was raised, or raised again after it was closed (open, or
    acknowledged: back on no more than the events a manager acknowledged it on)."""

    evidence = ma.fields.Dict(required=True)
    raised_at = _time()


class WebhookFlagResolved(_WebhookFlag):
    """`flag.resolved`: a manager resolved the flag."""

    note = ma.fields.String(allow_none=True, required=True)
    resolved_by = ma.fields.Integer(
        allow_none=True, required=True, metadata={"description": "The user's id"}
    )


class WebhookFlagClosed(_WebhookFlag):
    """`flag.closed`: the system closed the flag, its cause gone (the parcel's events
    or consents as they are now, an image uploaded, a shift's parcel accounted for)."""

    reason = ma.fields.String(required=True)


class WebhookDiscrepancy(ma.Schema):
    kind = ma.fields.String(required=True)
    tracking_no = ma.fields.String(required=True)
    flag_id = ma.fields.Integer(allow_none=True, required=True)


class WebhookBalance(ma.Schema):
    status = ma.fields.String(required=True, metadata={"example": "unbalanced"})
    checked_out = ma.fields.Integer(required=True)
    delivered = ma.fields.Integer(required=True)
    delivered_without_pod = ma.fields.Integer(required=True)
    unattended = ma.fields.Integer(required=True)
    unattended_without_consent = ma.fields.Integer(required=True)
    returned = ma.fields.Integer(required=True)
    missing = ma.fields.Integer(required=True)
    not_checked_out = ma.fields.Integer(required=True)
    missing_seq_count = ma.fields.Integer(required=True)
    discrepancy_count = ma.fields.Integer(required=True)
    missing_seqs = ma.fields.List(ma.fields.Integer(), required=True)
    written_off_seqs = ma.fields.List(
        ma.fields.Integer(),
        metadata={
            "description": "Only when a manager wrote off seqs of the shift as lost: the "
            "first 100 (held for `status`, not in `missing_seqs`)"
        },
    )
    written_off_seq_count = ma.fields.Integer(metadata={"description": "Only with them"})
    discrepancies = ma.fields.List(ma.fields.Nested(WebhookDiscrepancy), required=True)


class WebhookShiftUnbalanced(ma.Schema):
    """`shift.unbalanced`: a shift closed without its handover balancing."""

    shift_id = ma.fields.Integer(required=True)
    station_id = ma.fields.Integer(required=True)
    courier_id = ma.fields.Integer(required=True)
    device_id = ma.fields.String(required=True)
    work_date = ma.fields.Date(required=True)
    closed_at = _time()
    balance = ma.fields.Nested(WebhookBalance, required=True)


class WebhookReportReady(ma.Schema):
    """`report.ready`: a station report was issued; fetch it at `url` with a token."""

    report_id = ma.fields.Integer(required=True)
    station_id = ma.fields.Integer(required=True)
    kind = ma.fields.Enum(ReportKind, by_value=True, required=True)
    period = ma.fields.String(required=True, metadata={"example": "2026-W48"})
    period_start = ma.fields.Date(required=True)
    url = ma.fields.String(required=True)


# Each topic's data, in the order of sync.outbox.TOPICS.
TOPIC_DATA: dict[str, type[ma.Schema]] = {
    "consent.requested": WebhookConsentRequested,
    "consent.request_cancelled": WebhookConsentRequestCancelled,
    "consent.request_granted": WebhookConsentRequestGranted,
    "consent.request_refused": WebhookConsentRequestRefused,
    "consent.request_lapsed": WebhookConsentRequestLapsed,
    "consent.request_revoked": WebhookConsentRequestRevoked,
    "parcel.in_locker": WebhookParcelInLocker,
    "parcel.at_pickup_point": WebhookParcelAtPickupPoint,
    "parcel.drop_voided": WebhookParcelDropVoided,
    "flag.raised": WebhookFlagRaised,
    "flag.resolved": WebhookFlagResolved,
    "flag.closed": WebhookFlagClosed,
    "shift.unbalanced": WebhookShiftUnbalanced,
    "report.ready": WebhookReportReady,
}


class WebhookEnvelope(ma.Schema):
    """The body of every webhook request: compact UTF-8 JSON, signed as sent."""

    id = ma.fields.UUID(
        required=True,
        metadata={"description": "The message: the same for every subscription receiving it"},
    )
    delivery_id = ma.fields.UUID(
        required=True,
        metadata={
            "description": "This delivery: the same on every attempt and replay, and equal "
            "to X-Courier-Delivery. Signed with the body: de-duplicate on it"
        },
    )
    topic = ma.fields.String(
        required=True,
        validate=ma.validate.OneOf(list(TOPICS)),
        metadata={"example": "flag.raised"},
    )
    created_at = _time("When the change it announces was committed")
    station_id = ma.fields.Integer(allow_none=True, required=True)
    data = ma.fields.Dict(
        required=True, metadata={"description": "The topic's data (one of the Webhook* schemas)"}
    )


class DeliveryDetailOut(DeliveryOut):
    message = ma.fields.Nested(
        WebhookEnvelope,
        required=True,
        metadata={"description": "The envelope the receiver gets (its body, before encoding)"},
    )
