import marshmallow as ma

from courier_api.api.base import PageArgs, Walked
from courier_api.api.fields import Id, Text

REJECTED = Walked(rows="rejected events", row="rejected event")


class QuarantineArgs(PageArgs):
    station_id = Id(metadata={"description": "Admins only; managers see their own station"})
    device_id = Text()
    tracking_no = Text(
        validate=ma.validate.Length(max=40),
        metadata={"description": "The rejected events naming this parcel"},
    )
    cursor, after = REJECTED.args()


class QuarantinedEventOut(ma.Schema):
    id = ma.fields.Integer(required=True)
    station_id = ma.fields.Integer(required=True)
    device_id = ma.fields.String(required=True)
    batch_id = ma.fields.String(required=True)
    position = ma.fields.Integer(required=True, metadata={"description": "Index in the batch"})
    client_event_id = ma.fields.String(allow_none=True, required=True)
    seq = ma.fields.Integer(allow_none=True, required=True)
    event_type = ma.fields.String(allow_none=True, required=True)
    tracking_no = ma.fields.String(allow_none=True, required=True)
    error_code = ma.fields.String(required=True)
    message = ma.fields.String(required=True)
    field = ma.fields.String(allow_none=True, required=True)
    payload = ma.fields.String(
        required=True,
        metadata={"description": "The event as received, as JSON text, phone numbers masked"},
    )
    received_at = ma.fields.AwareDateTime(required=True)
    resent_seq = ma.fields.Integer(
        allow_none=True,
        required=True,
        metadata={
            "description": "Rejected `seq_conflict`, then sent again by its PDA under this "
            "seq, the same event otherwise (same `client_event_id` and content), and held: "
            "settled, nothing lost. Null for any other rejection, or one not sent again yet"
        },
    )
    pushed_by_courier_id = ma.fields.Integer(
        required=True,
        metadata={"description": "The courier signed in on the PDA when it was pushed"},
    )
    clock_offset_ms = ma.fields.Integer(
        required=True,
        metadata={
            "description": "The PDA's clock minus the server's, as estimated for the push "
            "it came in"
        },
    )


class QuarantinePage(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(QuarantinedEventOut), required=True)
    next_cursor, as_of, arrived_since, next_after = REJECTED.page()
