"""PDA sync contract v1. Events are documented here and validated by ``sync.events``.

Each event is judged on its own by the engine (a bad one is quarantined, its
siblings go on), so the request schema checks only the envelope and passes
the events through as received.
"""

from __future__ import annotations

import uuid
from typing import Any

import marshmallow as ma

from courier_api.api.fields import Text, storable
from models import ConsentMethod, EventType, FeedKind, ParcelStatus, ServiceClass
from sync.events import (
    CONSENT_CHANNELS,
    CONSENT_METHODS,
    EXCEPTION_REASONS,
    FAILED_ATTEMPT_ACTIONS,
    FAILED_ATTEMPT_REASONS,
    REQUEST_CHANNELS,
    EventRejected,
    parse_time,
)
from sync.paging import MAX_PAGE_SIZE


class DeviceTime(ma.fields.String):
    """An ISO 8601 time with an offset, on the device's clock."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        try:
            return parse_time(value, field=attr or "time")
        except EventRejected as error:
            raise ma.ValidationError(error.message) from None


class Location(ma.Schema):
    lat = ma.fields.Float(required=True, metadata={"minimum": -90, "maximum": 90})
    lon = ma.fields.Float(required=True, metadata={"minimum": -180, "maximum": 180})
    accuracy_m = ma.fields.Float(metadata={"minimum": 0, "maximum": 1_000_000})


class ProofOfDelivery(ma.Schema):
    recipient_name = ma.fields.String()
    relation = ma.fields.String(metadata={"example": "neighbour"})
    signature_sha256 = ma.fields.String(metadata={"description": "PUT the image to /blobs"})
    photo_sha256 = ma.fields.String()
    pickup_code = ma.fields.String(metadata={"description": "Lockers and pickup points"})


class CapturedConsent(ma.Schema):
    method = ma.fields.String(required=True, metadata={"enum": sorted(CONSENT_METHODS)})
    point_id = ma.fields.String(
        metadata={"description": "Stored trimmed and upper-case, as every point id"}
    )
    channel = ma.fields.String(required=True, metadata={"enum": sorted(CONSENT_CHANNELS)})
    evidence = ma.fields.String()


class ConsentRequested(ma.Schema):
    method = ma.fields.String(required=True, metadata={"enum": sorted(CONSENT_METHODS)})
    point_id = ma.fields.String(
        metadata={
            "description": "The locker or pickup point the courier proposes (stored "
            "trimmed and upper-case, as every point id)"
        }
    )
    channel = ma.fields.String(
        metadata={
            "enum": sorted(REQUEST_CHANNELS),
            "description": "How to ask (the channel decides)",
        }
    )
    expires_at = ma.fields.String(
        metadata={
            "format": "date-time",
            "description": "Device clock, with an offset. Default: "
            "CONSENT_REQUEST_TTL_MINUTES after the event; at most 24 h",
        }
    )


class ScanEventIn(ma.Schema):
    client_event_id = ma.fields.UUID(required=True)
    seq = ma.fields.Integer(
        required=True,
        metadata={
            "minimum": 1,
            "maximum": 2**31 - 1,
            "description": "Per device, from 1, without gaps on the PDA",
        },
    )
    type = ma.fields.Enum(EventType, by_value=True, required=True)
    tracking_no = ma.fields.String(required=True, metadata={"maxLength": 40})
    occurred_at = ma.fields.String(
        required=True,
        metadata={
            "format": "date-time",
            "description": (
                "Device clock, with an offset. Dated after sent_at, or more than "
                "MAX_EVENT_AGE_DAYS before it, the event is kept and its PDA flagged "
                "clock_jump"
            ),
        },
    )
    location = ma.fields.Nested(
        Location,
        metadata={
            "description": "The GPS fix. Without one, leave it out, null, or every field "
            "blank: the same event. Only one of lat and lon is refused"
        },
    )
    shift_id = ma.fields.Integer()
    reason = ma.fields.String(
        metadata={
            "description": "delivery_attempt_failed: "
            + ", ".join(sorted(FAILED_ATTEMPT_REASONS))
            + "; exception: "
            + ", ".join(sorted(EXCEPTION_REASONS))
            + "; correction: free text"
        }
    )
    action = ma.fields.String(
        metadata={
            "description": "delivery_attempt_failed: " + ", ".join(sorted(FAILED_ATTEMPT_ACTIONS))
        }
    )
    locker_id = ma.fields.String(
        metadata={
            "description": "delivered_to_locker; collected_from_locker (optional). Stored "
            "and compared trimmed and upper-case (`l-3` is `L-3`), as a consent's point"
        }
    )
    compartment = ma.fields.String(
        metadata={"description": "delivered_to_locker; collected_from_locker (optional)"}
    )
    point_id = ma.fields.String(
        metadata={
            "description": "delivered_to_pickup_point. Stored and compared trimmed and "
            "upper-case (`pp-12` is `PP-12`), as a consent's point"
        }
    )
    pod = ma.fields.Nested(
        ProofOfDelivery,
        metadata={
            "description": "delivered*. In person: a signature or a photo (a name or "
            "a typed code alone is flagged delivered_without_pod); express parcels need "
            "a signature. At a locker or pickup point: an image or the point's code"
        },
    )
    consent = ma.fields.Nested(CapturedConsent, metadata={"description": "consent_captured"})
    request = ma.fields.Nested(
        ConsentRequested,
        metadata={
            "description": "consent_requested: asks the recipient to agree to a locker or "
            "pickup point; the answer comes back in the pull feed"
        },
    )
    voids_client_event_id = ma.fields.UUID(
        metadata={"description": "correction: an earlier event of this device"}
    )


class RawEvents(ma.fields.List):
    """A list documented as ``ScanEventIn`` items, passed to the engine as received."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, list):
            raise self.make_error("invalid")
        return value


IGNORED_FIELDS = "ignored_fields"  # the key ``PushRequest`` loads them under
IGNORED_FIELDS_NAMED = 20  # at most this many named in the warning, each cut to 64 chars


class PushRequest(ma.Schema):
    """The envelope. A top-level key it does not know is ignored, not refused: a PDA
    whose app sends one more (an ``app_version``, a newer contract's field) before the
    server knows it would otherwise have every push refused, its events held back on
    the PDA until the server is upgraded. The receipt warns of it (``warnings``);
    the events' own fields are as strict as ever (an unknown one rejects its event)."""

    class Meta:
        unknown = ma.EXCLUDE

    device_id = Text(required=True, validate=ma.validate.Length(min=1, max=64))
    batch_id = ma.fields.UUID(
        required=True, metadata={"description": "New for each batch; re-send it unchanged"}
    )
    sent_at = DeviceTime(
        required=True,
        metadata={
            "format": "date-time",
            "description": "Device clock at sending, refreshed on every attempt",
        },
    )
    events = RawEvents(
        ma.fields.Nested(ScanEventIn),
        required=True,
        metadata={"description": "Up to MAX_EVENTS_PER_PUSH events (default 5,000)"},
    )

    @ma.post_load(pass_original=True)
    def name_ignored_fields(self, data: dict[str, Any], original: Any, **_: Any) -> dict[str, Any]:
        data[IGNORED_FIELDS] = sorted(str(key) for key in original if key not in self.fields)
        return data

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # Read here only as made plainly: options naming fields to skip or refusing an
        # unknown key are marshmallow's to apply (``_plainly_valid`` knows none).
        self._read_plainly = (
            not self.many
            and not self.partial
            and self.unknown == ma.EXCLUDE
            and self.load_fields.keys() == self._declared_fields.keys()
        )

    def load(  # type: ignore[override]
        self,
        data: Any,
        *,
        many: bool | None = None,
        partial: bool | None = None,
        unknown: str | None = None,
    ) -> Any:
        """marshmallow's, but an envelope every field of which is plainly valid is read
        here, to what marshmallow makes of it: its generic walk (each field's missing,
        null, type and validator checks, the hooks looked up) was a one-scan push's
        largest piece of parsing (``docs/BENCHMARKS.md``, stop 51). Anything else,
        marshmallow loads, so every refusal is its own."""
        if many is None and partial is None and unknown is None and self._read_plainly:
            loaded = self._plainly_valid(data)
            if loaded is not None:
                return loaded
        return super().load(data, many=many, partial=partial, unknown=unknown)

    def _plainly_valid(self, data: Any) -> dict[str, Any] | None:
        """``data`` loaded, if each field is as marshmallow accepts it (a string the
        database can store of 1 to 64 characters, a UUID's text, a time with an offset,
        a list); None for anything marshmallow must judge."""
        if type(data) is not dict:
            return None
        device_id, batch_id = data.get("device_id"), data.get("batch_id")
        sent_at, events = data.get("sent_at"), data.get("events")
        if type(device_id) is not str or not 1 <= len(device_id) <= 64:
            return None
        if type(batch_id) is not str or type(sent_at) is not str or type(events) is not list:
            return None
        if not storable(device_id):
            return None
        try:
            loaded = {
                "device_id": device_id,
                "batch_id": uuid.UUID(batch_id),
                "sent_at": parse_time(sent_at, field="sent_at"),
                "events": events,
            }
        except (ValueError, EventRejected):
            return None
        return self.name_ignored_fields(loaded, data)


class EventError(ma.Schema):
    code = ma.fields.String(required=True)
    message = ma.fields.String(required=True)
    field = ma.fields.String()


class PushWarning(ma.Schema):
    code = ma.fields.String(required=True, metadata={"enum": ["unknown_field_ignored"]})
    message = ma.fields.String(required=True)
    field = ma.fields.String(metadata={"description": "The top-level key ignored"})


class EventResult(ma.Schema):
    index = ma.fields.Integer(
        required=True,
        metadata={"description": "The event's position in the pushed events list, from 0"},
    )
    client_event_id = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={
            "description": "The event's client_event_id as the PDA wrote it; null when the "
            "event carried none that could be read (not an object, the id missing, or not a "
            "string of up to 64 characters): find it by index"
        },
    )
    status = ma.fields.String(
        required=True, metadata={"enum": ["applied", "duplicate", "rejected"]}
    )
    error = ma.fields.Nested(EventError)


class RaisedFlag(ma.Schema):
    flag_id = ma.fields.Integer(required=True)
    kind = ma.fields.String(required=True)
    subject_type = ma.fields.String(required=True)
    subject_key = ma.fields.String(required=True)


class PushReceipt(ma.Schema):
    batch_id = ma.fields.String(required=True)
    server_time = ma.fields.String(required=True, metadata={"format": "date-time"})
    clock_offset_ms = ma.fields.Integer(
        required=True, metadata={"description": "Device clock minus server clock"}
    )
    results = ma.fields.List(ma.fields.Nested(EventResult), required=True)
    acked_through_seq = ma.fields.Integer(
        required=True,
        metadata={
            "description": "Every seq up to this one is held. Set apart the events "
            "rejected seq_conflict first (their seq is another event's, which is what is "
            "held; send them again under new seqs), then prune up to it"
        },
    )
    missing_seqs = ma.fields.List(
        ma.fields.Integer(),
        required=True,
        metadata={"description": "The first 100 missing sequence numbers, ascending"},
    )
    missing_seq_count = ma.fields.Integer(
        required=True,
        metadata={
            "description": "How many seqs are missing in all, of which missing_seqs names "
            "the first 100"
        },
    )
    flags_raised = ma.fields.List(ma.fields.Nested(RaisedFlag), required=True)
    warnings = ma.fields.List(
        ma.fields.Nested(PushWarning),
        metadata={
            "description": "Only when this request had something the server ignored: "
            "each top-level key of the body it does not know (nothing of it was stored; "
            "the events were taken as usual). A replay is warned of its own keys"
        },
    )


class PullArgs(ma.Schema):
    cursor = ma.fields.String(
        metadata={"description": "next_cursor of the previous page; omit to start over"}
    )
    limit = ma.fields.Integer(
        load_default=100, validate=ma.validate.Range(min=1, max=MAX_PAGE_SIZE)
    )
    wait = ma.fields.Integer(
        load_default=0,
        validate=ma.validate.Range(min=0, max=3600),
        metadata={
            "description": "Long poll: when nothing is new, wait up to this many seconds "
            "(at most MAX_PULL_WAIT_SECONDS, 25 by default) for a change before answering. "
            "Only with a cursor: a pull without one is answered at once"
        },
    )


class PdaConsent(ma.Schema):
    method = ma.fields.Enum(ConsentMethod, by_value=True, required=True)
    point_id = ma.fields.String(allow_none=True, required=True)
    expires_at = ma.fields.AwareDateTime(allow_none=True, required=True)


class PdaConsentRequest(ma.Schema):
    id = ma.fields.Integer(required=True)
    client_event_id = ma.fields.UUID(
        allow_none=True,
        required=True,
        metadata={"description": "The consent_requested event it came from, if any"},
    )
    status = ma.fields.String(
        required=True,
        metadata={
            "description": "pending, granted, refused, expired (unanswered in time, or "
            "granted by a consent whose own expiry has passed since: it no longer "
            "authorizes a drop, ask again), unsent, cancelled, or revoked (granted, and "
            "the recipient revoked that consent since, at `revoked_at`: it no longer "
            "authorizes a drop)"
        },
    )
    method = ma.fields.Enum(ConsentMethod, by_value=True, required=True)
    point_id = ma.fields.String(allow_none=True, required=True)
    expires_at = ma.fields.AwareDateTime(required=True)
    answered_at = ma.fields.AwareDateTime(allow_none=True, required=True)
    revoked_at = ma.fields.AwareDateTime(allow_none=True, required=True)
    not_reached = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={
            "description": "Why the question has not reached the recipient's channel "
            "(none takes consent requests at the station, its subscription is stopped, or "
            "every attempt failed so far), or, once expired, that it never did: the "
            "recipient was not asked, stop waiting at the door. Null when it reached "
            "the channel, or nothing says it did not"
        },
    )


class PdaParcel(ma.Schema):
    tracking_no = ma.fields.String(required=True)
    service_class = ma.fields.Enum(ServiceClass, by_value=True, required=True)
    recipient_name = ma.fields.String(required=True)
    recipient_phone = ma.fields.String(allow_none=True, required=True)
    address = ma.fields.String(required=True)
    lat = ma.fields.Float(allow_none=True, required=True)
    lon = ma.fields.Float(allow_none=True, required=True)
    status = ma.fields.Enum(ParcelStatus, by_value=True, allow_none=True, required=True)
    status_at = ma.fields.AwareDateTime(allow_none=True, required=True)
    consents = ma.fields.List(
        ma.fields.Nested(PdaConsent),
        required=True,
        metadata={
            "description": "Consents in force now for unattended delivery by a PDA of "
            "this station (one captured on another station's PDA does not count here)"
        },
    )
    consent_requests = ma.fields.List(
        ma.fields.Nested(PdaConsentRequest),
        required=True,
        metadata={"description": "This courier's latest requests for the parcel, newest first"},
    )


class FeedChangeOut(ma.Schema):
    kind = ma.fields.Enum(
        FeedKind,
        by_value=True,
        required=True,
        metadata={
            "description": "parcel_removed is a tombstone: drop it from the PDA; consent: "
            "its consents changed; consent_request: a request this courier made was answered, "
            "or its question has not reached the recipient's channel (`not_reached`)"
        },
    )
    tracking_no = ma.fields.String(required=True)
    parcel = ma.fields.Nested(PdaParcel, allow_none=True, required=True)


class PullPage(ma.Schema):
    changes = ma.fields.List(ma.fields.Nested(FeedChangeOut), required=True)
    next_cursor = ma.fields.String(required=True)
    has_more = ma.fields.Boolean(required=True)
