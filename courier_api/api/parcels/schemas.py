from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import marshmallow as ma

from courier_api.api.base import PageArgs
from courier_api.api.fields import Text
from models import EventType, ParcelStatus, ServiceClass
from sync.paging import MAX_PAGE_SIZE
from sync.parcels import ParcelDraft


@dataclass(frozen=True)
class RejectedItem:
    """An intake item whose shape is wrong; it is reported, its siblings go on."""

    raw: Any
    messages: Any


class ParcelIn(ma.Schema):
    tracking_no = Text(
        required=True,
        validate=ma.validate.Length(min=1, max=40),
        metadata={"description": "UPU S10 (e.g. RR473124829GB) or a domestic format"},
    )
    service_class = ma.fields.Enum(ServiceClass, by_value=True, required=True)
    recipient_name = Text(required=True, validate=ma.validate.Length(min=1, max=200))
    recipient_phone = Text(
        allow_none=True,
        validate=ma.validate.Length(max=40),
        metadata={"description": "Normalised to E.164; without '+' read in DEFAULT_PHONE_REGION"},
    )
    address = Text(required=True, validate=ma.validate.Length(min=1, max=2000))
    lat = ma.fields.Float(allow_none=True, validate=ma.validate.Range(min=-90, max=90))
    lon = ma.fields.Float(allow_none=True, validate=ma.validate.Range(min=-180, max=180))
    station = Text(
        allow_none=True,
        metadata={"description": "Station code; defaults to the caller's own station"},
    )
    courier = Text(
        allow_none=True,
        metadata={"description": "Username of the courier it is assigned to; their PDA pulls it"},
    )

    @ma.post_load
    def to_draft(self, data: dict[str, Any], **_: Any) -> ParcelDraft:
        return ParcelDraft(**data)


class PerItemNested(ma.fields.Nested):
    """Loads each list item on its own: a bad item becomes a ``RejectedItem``."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        try:
            return super()._deserialize(value, attr, data, **kwargs)
        except ma.ValidationError as exc:
            return RejectedItem(raw=value, messages=exc.messages)


class ParcelIntakeRequest(ma.Schema):
    parcels = ma.fields.List(
        PerItemNested(ParcelIn),
        required=True,
        validate=ma.validate.Length(min=1),
        metadata={"description": "Up to MAX_PARCELS_PER_INTAKE items (default 5,000)"},
    )


class ItemError(ma.Schema):
    code = ma.fields.String(required=True)
    message = ma.fields.String(required=True)
    errors = ma.fields.Dict()


class IntakeItemResult(ma.Schema):
    index = ma.fields.Integer(required=True, metadata={"description": "Position in the request"})
    tracking_no = ma.fields.String(allow_none=True, required=True)
    status = ma.fields.String(
        required=True, metadata={"enum": ["created", "updated", "unchanged", "rejected"]}
    )
    error = ma.fields.Nested(ItemError)


class IntakeCounts(ma.Schema):
    created = ma.fields.Integer(required=True)
    updated = ma.fields.Integer(required=True)
    unchanged = ma.fields.Integer(required=True)
    rejected = ma.fields.Integer(required=True)


class ParcelIntakeResponse(ma.Schema):
    results = ma.fields.List(ma.fields.Nested(IntakeItemResult), required=True)
    counts = ma.fields.Nested(IntakeCounts, required=True)


class ParcelOut(ma.Schema):
    tracking_no = ma.fields.String(required=True)
    service_class = ma.fields.Enum(ServiceClass, by_value=True, required=True)
    station_id = ma.fields.Integer(required=True)
    recipient_name = ma.fields.String(required=True)
    recipient_phone = ma.fields.String(
        allow_none=True, required=True, metadata={"description": "Masked except for auditors"}
    )
    address = ma.fields.String(required=True)
    lat = ma.fields.Float(allow_none=True, required=True)
    lon = ma.fields.Float(allow_none=True, required=True)
    created_at = ma.fields.AwareDateTime(required=True)
    updated_at = ma.fields.AwareDateTime(required=True)
    courier_id = ma.fields.Integer(
        allow_none=True, required=True, metadata={"description": "The assigned courier"}
    )
    status = ma.fields.Enum(
        ParcelStatus,
        by_value=True,
        allow_none=True,
        required=True,
        metadata={"description": "Projected from the events; null before the first one"},
    )
    status_at = ma.fields.AwareDateTime(
        allow_none=True,
        required=True,
        metadata={
            "description": "When the status was reached (corrected clock): a final outcome "
            "scanned again, at its first scan"
        },
    )


class EventLocation(ma.Schema):
    lat = ma.fields.Float(required=True)
    lon = ma.fields.Float(required=True)
    accuracy_m = ma.fields.Float(allow_none=True, required=True)


class TimelineEvent(ma.Schema):
    event_id = ma.fields.Integer(required=True)
    client_event_id = ma.fields.UUID(required=True)
    device_id = ma.fields.String(required=True)
    courier_id = ma.fields.Integer(
        required=True,
        metadata={
            "description": "The courier who recorded it: the one signed in on the PDA "
            "when it was pushed, or, for events a PDA still held when it was handed to "
            "the next courier, the courier whose closed shift's declared seqs hold it"
        },
    )
    pushed_by_courier_id = ma.fields.Integer(
        required=True,
        metadata={"description": "The courier signed in on the PDA when it was pushed"},
    )
    seq = ma.fields.Integer(required=True)
    type = ma.fields.Enum(EventType, by_value=True, required=True)
    emsevt = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={"description": "UPU EMSEVT code where one applies (EDG, EMH, EMI, EDH)"},
    )
    occurred_at_device = ma.fields.AwareDateTime(
        required=True, metadata={"description": "As the PDA's clock said"}
    )
    occurred_at = ma.fields.AwareDateTime(
        required=True, metadata={"description": "Corrected by the device's clock offset"}
    )
    received_at = ma.fields.AwareDateTime(required=True)
    batch_id = ma.fields.UUID(required=True, metadata={"description": "The push it came in"})
    shift_id = ma.fields.Integer(
        allow_none=True,
        required=True,
        metadata={
            "description": "The shift it is filed under (none before the PDA's first). "
            "Null too for a station manager or a courier when that shift is another "
            "station's (a mis-sorted parcel's event, filed under the shift of the PDA "
            "that scanned it), which they cannot open"
        },
    )
    location = ma.fields.Nested(EventLocation, allow_none=True, required=True)
    details = ma.fields.Dict(
        required=True,
        metadata={
            "description": "Type-specific fields; a phone number typed into their text "
            "is masked except for auditors"
        },
    )
    voided = ma.fields.Boolean(required=True)
    voided_by_event_id = ma.fields.Integer(allow_none=True, required=True)
    voids_event_id = ma.fields.Integer(
        allow_none=True,
        required=True,
        metadata={
            "description": "A correction: the event it voids. Null for any other event, "
            "and for a correction that voids nothing: its PDA sent no earlier event with "
            "the id it names (yet: one arriving later is voided then), or a correction "
            "before it voided that one already"
        },
    )
    repeats_event_id = ma.fields.Integer(
        allow_none=True,
        required=True,
        metadata={
            "description": "A final outcome scanned again (the same type, courier and place "
            "as the outcome before it, no check-out between: the scanner beeped twice): the "
            "first scan of the outcome it repeats, which settles it (the parcel's "
            "`status_at`, the balance, the reports). Null for any other event"
        },
    )


class TimelineArgs(PageArgs):
    """A page of the timeline: ``limit`` entries, by default as many as a page may hold,
    so that a parcel's whole timeline comes at once as before unless it is that long."""

    limit = ma.fields.Integer(
        load_default=MAX_PAGE_SIZE,
        validate=ma.validate.Range(min=1, max=MAX_PAGE_SIZE),
        metadata={"description": f"Events per page (1-{MAX_PAGE_SIZE}, default {MAX_PAGE_SIZE})"},
    )
    cursor = Text(
        metadata={
            "description": "The previous page's `next_cursor`, as received; omit it for "
            "a walk's first page"
        }
    )


class ParcelDetail(ParcelOut):
    timeline = ma.fields.List(
        ma.fields.Nested(TimelineEvent),
        required=True,
        metadata={
            "description": "Seq order within a device, corrected time across devices: "
            "the whole timeline when it has no more than `limit` events (most parcels), "
            "its first `limit` otherwise, the rest on the pages `next_cursor` leads to, "
            "each page of one walk of the timeline as it was at its first (`as_of`)"
        },
    )
    as_of = ma.fields.Integer(
        required=True,
        metadata={
            "description": "The highest event id of the timeline this walk reads, the "
            "same on each of its pages: the timeline as it was at its first page (0: no "
            "events). Its pages add up to that timeline, each event once"
        },
    )
    arrived_since = ma.fields.Integer(
        required=True,
        metadata={
            "description": "Events the parcel's timeline gained since the walk began, "
            "counted when this page was read: those stored since (an id above `as_of`) "
            "and a correction filed under another tracking number, stored before, that "
            "joined the timeline with the event it voids; in no page of this walk; read "
            "the timeline again without a cursor to see them in their place"
        },
    )
    next_cursor = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={
            "description": "When more events of the walk's timeline follow: pass it as "
            "`cursor` for the next page. Null on its last page"
        },
    )
