import marshmallow as ma

from courier_api.api.base import PageArgs
from models import DeviceStatus


class DeviceOut(ma.Schema):
    id = ma.fields.String(required=True)
    station_id = ma.fields.Integer(required=True)
    status = ma.fields.Enum(DeviceStatus, by_value=True, required=True)
    last_seen_at = ma.fields.AwareDateTime(allow_none=True, required=True)
    registered_at = ma.fields.AwareDateTime(required=True)
    status_changed_at = ma.fields.AwareDateTime(allow_none=True, required=True)


class DeviceCreate(ma.Schema):
    device_id = ma.fields.String(required=True, metadata={"example": "PDA-0042"})
    station_id = ma.fields.Integer(
        metadata={"description": "Defaults to the manager's own station"}
    )


class DeviceUpdate(ma.Schema):
    status = ma.fields.Enum(DeviceStatus, by_value=True, required=True)


class DeviceListArgs(PageArgs):
    station_id = ma.fields.Integer()
    status = ma.fields.Enum(DeviceStatus, by_value=True)
    after = ma.fields.String(load_default="", metadata={"description": "Last device id seen"})


class DevicePage(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(DeviceOut), required=True)
    next_after = ma.fields.String(allow_none=True, required=True)
