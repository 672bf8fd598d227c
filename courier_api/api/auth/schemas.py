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
