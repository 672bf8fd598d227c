import marshmallow as ma

from courier_api.api.base import PageArgs
from courier_api.api.fields import After, Id, Text, UtcTime


class AuditListArgs(PageArgs):
    action = Text(
        validate=ma.validate.Length(min=1, max=64),
        metadata={"example": "shift_signed_off", "description": "What was done"},
    )
    actor_id = Id(metadata={"description": "The user who did it (the system's entries have none)"})
    subject_type = Text(
        validate=ma.validate.Length(min=1, max=32),
        metadata={
            "example": "shift",
            "description": "What kind of thing it was done to (needs `subject_key`)",
        },
    )
    subject_key = Text(
        validate=ma.validate.Length(min=1, max=160),
        metadata={
            "example": "42",
            "description": "Which one (needs `subject_type`): a shift's or flag's id, a "
            "proof's event id, an image's sha256, ...",
        },
    )
    tracking_no = Text(
        validate=ma.validate.Length(min=1, max=40),
        metadata={
            "example": "RR473124829GB",
            "description": "A parcel's entries, whatever their subject: its proofs and "
            "its record read, its consents granted, revoked or refused, decisions on its "
            "flags, its changes by an intake, searches of its proofs or rejected events, "
            "and those about it among other parcels (its handover's sign-off, a shift "
            "page, search or export that showed it). Spaces, dashes and case as any "
            "tracking number in the API",
        },
    )
    at_from = UtcTime(metadata={"description": "Recorded at or after this time"})
    at_to = UtcTime(metadata={"description": "Recorded before this time"})
    after = After()


class AuditVerifyArgs(ma.Schema):
    head_id = Id(
        metadata={
            "description": "`head_id` of an earlier intact answer, with its `head_hash`: "
            "check from that entry on"
        }
    )
    head_hash = Text(
        validate=ma.validate.Length(equal=64),
        metadata={
            "example": "9f2c" + "0" * 60,
            "description": "`head_hash` of that answer: the hash the entry must still carry",
        },
    )


class AuditEntryOut(ma.Schema):
    id = ma.fields.Integer(required=True)
    at = ma.fields.AwareDateTime(required=True, metadata={"description": "When it was recorded"})
    actor_id = ma.fields.Integer(
        allow_none=True, required=True, metadata={"description": "null: the system"}
    )
    action = ma.fields.String(required=True, metadata={"example": "proof_read"})
    subject_type = ma.fields.String(required=True, metadata={"example": "proof"})
    subject_key = ma.fields.String(required=True, metadata={"example": "1042"})
    details = ma.fields.Dict(
        required=True,
        metadata={
            "description": "What the action recorded (a sign-off's note, the event ids a "
            "read showed, ...). For admins a phone number in it is masked, so their copy "
            "no longer matches `entry_hash`; auditors get it as it was hashed"
        },
    )
    tracking_no = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={
            "description": "The parcel the entry is about (null: none, or several), as "
            "the service knew it when it wrote the entry; kept beside the entry, not "
            "covered by `entry_hash`"
        },
    )
    client_ip = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={
            "description": "The address of the client whose request wrote the entry (behind "
            "TRUSTED_PROXY_HOPS proxies, the one they name); null for the command line, the "
            "scheduler and entries written before it was kept. Covered by `entry_hash` when "
            "set"
        },
    )
    prev_hash = ma.fields.String(
        required=True, metadata={"description": "`entry_hash` of the entry before it"}
    )
    entry_hash = ma.fields.String(
        required=True,
        metadata={
            "description": "sha256 over this entry (`client_ip` too when set) and `prev_hash`"
        },
    )


class AuditPage(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(AuditEntryOut), required=True)
    next_after = ma.fields.Integer(allow_none=True, required=True)


class AuditVerifyOut(ma.Schema):
    intact = ma.fields.Boolean(
        required=True, metadata={"description": "Every entry checked matches its hash and link"}
    )
    checked = ma.fields.Integer(
        required=True,
        metadata={
            "description": "Entries read, the broken one included (from a head: that "
            "entry and those after it)"
        },
    )
    complete = ma.fields.Boolean(
        required=True,
        metadata={
            "description": "false: the check stopped at its bound "
            "(`AUDIT_VERIFY_MAX_ENTRIES`) with entries after `head_id` left to check; give "
            "`head_id` and `head_hash` back to go on from there"
        },
    )
    broken_id = ma.fields.Integer(
        allow_none=True,
        required=True,
        metadata={"description": "The first entry that breaks the chain; null if intact"},
    )
    problem = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={
            "enum": ["altered", "link_broken", "head_missing", "head_changed"],
            "description": "`altered`: its content does not match its hash; "
            "`link_broken`: its `prev_hash` is not the hash of the entry before it (that "
            "one was removed, or altered and re-hashed); from a head recorded earlier: "
            "`head_missing`, that entry is no longer in the log (removed, maybe with the "
            "ones after it); `head_changed`, it no longer carries the hash recorded (an "
            "entry up to it was altered and the chain re-hashed)",
        },
    )
    message = ma.fields.String(allow_none=True, required=True)
    head_id = ma.fields.Integer(
        allow_none=True,
        required=True,
        metadata={
            "description": "The newest entry that checks out (null: none does). Record it "
            "with `head_hash` somewhere else and give both back to the next check: "
            "removing the newest entries breaks no link"
        },
    )
    head_hash = ma.fields.String(allow_none=True, required=True)
