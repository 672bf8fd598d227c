import marshmallow as ma

from courier_api.api.base import PageArgs
from courier_api.api.fields import After, Id, Text


class QuarantineArgs(PageArgs):
    station_id = Id(metadata={"description": "Admins only; managers see their own station"})
    device_id = Text()
    tracking_no = Text(
        validate=ma.validate.Length(max=40),
        metadata={"description": "The rejected events naming this parcel"},
    )
    cursor = Text(
        metadata={
            "description": "The previous page's `next_cursor`, as received, with the same "
            "filters; omit it for a walk's first page"
        }
    )
    after = After(
        metadata={
            "deprecated": True,
            "description": "Deprecated, use `cursor`: the last id of the previous page (its "
            "`next_after`). Pages read so can miss a rejected event: a push committing "
            "late holds an id among those already read (PostgreSQL), and no page after "
            "them reads it. Not with `cursor`",
        }
    )


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
    next_cursor = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={
            "description": "When more rejected events of the walk follow: pass it as "
            "`cursor`, with the same filters, for the next page. Null on its last page, "
            "and on a page read with `after`"
        },
    )
    as_of = ma.fields.Integer(
        allow_none=True,
        required=True,
        metadata={
            "description": "The highest id of a matching rejected event when the walk "
            "began, the same on each of its pages: the walk reads those up to it (0: none "
            "then). Null on a page read with `after`"
        },
    )
    arrived_since = ma.fields.Integer(
        allow_none=True,
        required=True,
        metadata={
            "description": "Matching rejected events stored since the walk began (an id "
            "above `as_of`), counted when this page was read: in no page of this walk. "
            "Null on a page read with `after`"
        },
    )
    next_after = ma.fields.Integer(
        allow_none=True,
        required=True,
        metadata={
            "deprecated": True,
            "description": "Deprecated, use `next_cursor`: the last id of a full page, to "
            "pass as `after` (which can miss a rejected event committed late)",
        },
    )
