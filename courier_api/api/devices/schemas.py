import marshmallow as ma

from courier_api.api.base import PageArgs
from courier_api.api.fields import Id, Text
from models import DeviceStatus
from sync.device_state import MAX_REASON_LENGTH, MISSING_SEQS_SHOWN
from sync.events import MAX_SEQ


class DeviceOut(ma.Schema):
    id = ma.fields.String(required=True)
    station_id = ma.fields.Integer(required=True)
    status = ma.fields.Enum(DeviceStatus, by_value=True, required=True)
    last_seen_at = ma.fields.AwareDateTime(allow_none=True, required=True)
    registered_at = ma.fields.AwareDateTime(required=True)
    status_changed_at = ma.fields.AwareDateTime(allow_none=True, required=True)


class DeviceCreate(ma.Schema):
    device_id = Text(required=True, metadata={"example": "PDA-0042"})
    station_id = Id(metadata={"description": "Defaults to the manager's own station"})


class DeviceUpdate(ma.Schema):
    status = ma.fields.Enum(DeviceStatus, by_value=True, required=True)


class DeviceListArgs(PageArgs):
    station_id = Id()
    status = ma.fields.Enum(DeviceStatus, by_value=True)
    after = Text(load_default="", metadata={"description": "Last device id seen"})


class DevicePage(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(DeviceOut), required=True)
    next_after = ma.fields.String(allow_none=True, required=True)


def _seq(description: str) -> ma.fields.Integer:
    return ma.fields.Integer(
        required=True,
        strict=True,
        validate=ma.validate.Range(min=1, max=MAX_SEQ),
        metadata={"description": description},
    )


class LostSeqsIn(ma.Schema):
    first_seq = _seq("The first seq lost")
    last_seq = _seq("The last seq lost (the same as first_seq for one)")
    reason = Text(
        required=True,
        validate=ma.validate.Length(min=1, max=MAX_REASON_LENGTH),
        metadata={"example": "PDA reset at 14:10; its unsent scans are gone"},
    )


class LostSeqsOut(ma.Schema):
    device_id = ma.fields.String(required=True)
    first_seq = ma.fields.Integer(required=True)
    last_seq = ma.fields.Integer(required=True)
    acked_through_seq = ma.fields.Integer(
        required=True, metadata={"description": "What the PDA's next receipt will say"}
    )
    missing_seq_count = ma.fields.Integer(required=True)
    missing_seqs = ma.fields.List(
        ma.fields.Integer(),
        required=True,
        metadata={"description": f"The first {MISSING_SEQS_SHOWN} still missing"},
    )
