import marshmallow as ma

from courier_api.api.fields import Text


class TokenRequest(ma.Schema):
    username = Text(required=True, validate=ma.validate.Length(min=1, max=64))
    password = Text(required=True, validate=ma.validate.Length(min=1, max=256))
    device_id = Text(
        validate=ma.validate.Length(min=1, max=64),
        metadata={"description": "Required for couriers: the PDA they sign in with"},
    )


class RefreshRequest(ma.Schema):
    refresh_token = Text(required=True)


class RequestLimitsOut(ma.Schema):
    max_events_per_push = ma.fields.Integer(
        required=True,
        metadata={
            "description": "The most events one `POST /sync/push` may carry "
            "(`MAX_EVENTS_PER_PUSH`); more is a 413 `payload_too_large`, nothing stored"
        },
    )
    max_request_bytes = ma.fields.Integer(
        required=True,
        metadata={
            "description": "The largest request body, in bytes (`MAX_REQUEST_BYTES`): a "
            "push's JSON as sent must stay within it; larger is a 413, nothing stored"
        },
    )
    max_image_bytes = ma.fields.Integer(
        required=True,
        metadata={
            "description": "The largest proof image `PUT /blobs/<sha256>` stores, in bytes "
            "(`MAX_BLOB_BYTES`, or `max_request_bytes` if lower); larger is a 413"
        },
    )


class TokenResponse(ma.Schema):
    access_token = ma.fields.String(required=True)
    refresh_token = ma.fields.String(required=True)
    token_type = ma.fields.String(required=True, metadata={"example": "Bearer"})
    expires_in = ma.fields.Integer(required=True, metadata={"description": "Seconds"})
    refresh_expires_in = ma.fields.Integer(required=True, metadata={"description": "Seconds"})
    role = ma.fields.String(required=True)
    station_id = ma.fields.Integer(allow_none=True)
    device_id = ma.fields.String(allow_none=True)
    device_max_seq = ma.fields.Integer(
        allow_none=True,
        metadata={
            "description": "A courier's PDA: the highest sequence number the server holds "
            "for it (0: none yet), or that a shift of it declared used (a last_seq, the "
            "seq before a first_seq), if higher. A PDA that lost its storage (reset, app "
            "reinstalled) numbers its next events from this + 1: numbered from 1 again, "
            "every one would be rejected as `seq_conflict`. Null for other roles"
        },
    )
    limits = ma.fields.Nested(
        RequestLimitsOut,
        required=True,
        metadata={
            "description": "The limits the server enforces on one request, the same values "
            "its 413s name: size a PDA's batches and photos by them before sending"
        },
    )
