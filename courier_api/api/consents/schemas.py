from __future__ import annotations

from typing import Any

import marshmallow as ma

from courier_api.api.base import PageArgs
from courier_api.api.fields import After, Id, Text, UtcTime
from models import ConsentChannel, ConsentMethod, ConsentScope
from sync.phones import mask_phone


class ConsentIn(ma.Schema):
    scope = ma.fields.Enum(
        ConsentScope,
        by_value=True,
        load_default=ConsentScope.PARCEL,
        metadata={
            "description": "parcel: one parcel; standing: every parcel to this phone "
            "at this address"
        },
    )
    tracking_no = Text(validate=ma.validate.Length(max=40), metadata={"description": "parcel"})
    recipient_phone = Text(
        validate=ma.validate.Length(max=40),
        metadata={"description": "standing; normalised to E.164"},
    )
    address = Text(validate=ma.validate.Length(max=2000), metadata={"description": "standing"})
    station = Text(
        metadata={"description": "standing: limit it to one station (code); default all"}
    )
    method = ma.fields.Enum(ConsentMethod, by_value=True, required=True)
    point_id = Text(
        validate=ma.validate.Length(max=64),
        metadata={"description": "A specific locker or pickup point; default any of the method"},
    )
    channel = ma.fields.Enum(ConsentChannel, by_value=True, required=True)
    granted_at = UtcTime(required=True, metadata={"description": "When the recipient agreed"})
    expires_at = UtcTime(allow_none=True)
    evidence = Text(
        validate=ma.validate.Length(max=500),
        metadata={"description": "A reference to the recording, message or form"},
    )


class RevokeIn(ma.Schema):
    reason = Text(validate=ma.validate.Length(max=500))


class ConsentOut(ma.Schema):
    id = ma.fields.Integer(required=True)
    scope = ma.fields.Enum(ConsentScope, by_value=True, required=True)
    station_id = ma.fields.Integer(allow_none=True, required=True)
    tracking_no = ma.fields.String(allow_none=True, required=True)
    recipient_phone = ma.fields.String(
        allow_none=True, required=True, metadata={"description": "Masked except for auditors"}
    )
    address = ma.fields.String(allow_none=True, required=True)
    method = ma.fields.Enum(ConsentMethod, by_value=True, required=True)
    point_id = ma.fields.String(allow_none=True, required=True)
    channel = ma.fields.Enum(ConsentChannel, by_value=True, required=True)
    granted_at = ma.fields.AwareDateTime(required=True)
    expires_at = ma.fields.AwareDateTime(allow_none=True, required=True)
    revoked_at = ma.fields.AwareDateTime(allow_none=True, required=True)
    revoked_reason = ma.fields.String(allow_none=True, required=True)
    evidence = ma.fields.String(allow_none=True, required=True)
    event_id = ma.fields.Integer(
        allow_none=True, required=True, metadata={"description": "Captured on a PDA: its event"}
    )
    created_at = ma.fields.AwareDateTime(required=True)


class ConsentListArgs(PageArgs):
    station_id = Id(metadata={"description": "Managers see their own station"})
    tracking_no = Text()
    recipient_phone = Text()
    active = ma.fields.Boolean(metadata={"description": "Only consents in force now"})
    after = After()


class ConsentPage(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(ConsentOut), required=True)
    next_after = ma.fields.Integer(allow_none=True, required=True)


def consent_view(consent: Any, *, unmasked: bool) -> dict[str, Any]:
    view = {name: getattr(consent, name) for name in ConsentOut._declared_fields}
    if not unmasked:
        view["recipient_phone"] = mask_phone(consent.recipient_phone)
    return view
