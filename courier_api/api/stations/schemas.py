import marshmallow as ma

from courier_api.api.base import PageArgs
from courier_api.api.fields import After, Text


class StationOut(ma.Schema):
    id = ma.fields.Integer(required=True)
    code = ma.fields.String(required=True)
    name = ma.fields.String(required=True)
    timezone = ma.fields.String(required=True)
    created_at = ma.fields.AwareDateTime(required=True)


class StationCreate(ma.Schema):
    code = Text(required=True, metadata={"example": "SH-PD-01"})
    name = Text(required=True, validate=ma.validate.Length(min=1, max=200))
    timezone = Text(load_default="UTC", metadata={"example": "Asia/Shanghai"})


class StationUpdate(ma.Schema):
    name = Text(validate=ma.validate.Length(min=1, max=200))
    timezone = Text()


class StationListArgs(PageArgs):
    after = After()


class StationPage(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(StationOut), required=True)
    next_after = ma.fields.Integer(allow_none=True, required=True)
