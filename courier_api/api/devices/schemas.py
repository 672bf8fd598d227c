import marshmallow as ma

from courier_api.api.base import PageArgs
from courier_api.api.fields import Id, Text
from models import DeviceStatus


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
