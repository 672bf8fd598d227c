import marshmallow as ma

from courier_api.api.base import PageArgs
from models import Role


class UserOut(ma.Schema):
    id = ma.fields.Integer(required=True)
    username = ma.fields.String(required=True)
    full_name = ma.fields.String(required=True)
    role = ma.fields.Enum(Role, by_value=True, required=True)
    station_id = ma.fields.Integer(allow_none=True, required=True)
    active = ma.fields.Boolean(required=True)
    created_at = ma.fields.AwareDateTime(required=True)


class UserCreate(ma.Schema):
    username = ma.fields.String(required=True, metadata={"example": "courier7"})
    role = ma.fields.Enum(Role, by_value=True, required=True)
    station_id = ma.fields.Integer(
        allow_none=True, metadata={"description": "Required for couriers and managers"}
    )
    password = ma.fields.String(
        required=True, load_only=True, validate=ma.validate.Length(min=8, max=256)
    )
    full_name = ma.fields.String(load_default="", validate=ma.validate.Length(max=200))


class UserUpdate(ma.Schema):
    full_name = ma.fields.String(validate=ma.validate.Length(max=200))
    active = ma.fields.Boolean()
    password = ma.fields.String(load_only=True, validate=ma.validate.Length(min=8, max=256))


class UserListArgs(PageArgs):
    station_id = ma.fields.Integer()
    role = ma.fields.Enum(Role, by_value=True)
    after = ma.fields.Integer(load_default=0, metadata={"description": "Last user id seen"})


class UserPage(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(UserOut), required=True)
    next_after = ma.fields.Integer(allow_none=True, required=True)
