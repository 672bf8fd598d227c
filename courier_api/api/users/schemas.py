import marshmallow as ma

from courier_api.api.base import PageArgs
from courier_api.api.fields import After, Id, Text
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
    username = Text(required=True, metadata={"example": "courier7"})
    role = ma.fields.Enum(Role, by_value=True, required=True)
    station_id = Id(
        allow_none=True, metadata={"description": "Required for couriers and managers"}
    )
    password = Text(required=True, load_only=True, validate=ma.validate.Length(min=8, max=256))
    full_name = Text(load_default="", validate=ma.validate.Length(max=200))


class UserUpdate(ma.Schema):
    full_name = Text(validate=ma.validate.Length(max=200))
    active = ma.fields.Boolean()
    password = Text(load_only=True, validate=ma.validate.Length(min=8, max=256))


class UserListArgs(PageArgs):
    station_id = Id()
    role = ma.fields.Enum(Role, by_value=True)
    after = After()


class UserPage(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(UserOut), required=True)
    next_after = ma.fields.Integer(allow_none=True, required=True)
