import marshmallow as ma

from courier_api.api.base import PageArgs


class StationOut(ma.Schema):
    id = ma.fields.Integer(required=True)
    code = ma.fields.String(required=True)
    name = ma.fields.String(required=True)
    timezone = ma.fields.String(required=True)
    created_at = ma.fields.AwareDateTime(required=True)


class StationCreate(ma.Schema):
    code = ma.fields.String(required=True, metadata={"example": "SH-PD-01"})
    name = ma.fields.String(required=True, validate=ma.validate.Length(min=1, max=200))
    timezone = ma.fields.String(load_default="UTC", metadata={"example": "Asia/Shanghai"})


class StationUpdate(ma.Schema):
    name = ma.fields.String(validate=ma.validate.Length(min=1, max=200))
    timezone = ma.fields.String()


class StationListArgs(PageArgs):
    after = ma.fields.Integer(load_default=0, metadata={"description": "Last station id seen"})


class StationPage(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(StationOut), required=True)
    next_after = ma.fields.Integer(allow_none=True, required=True)
