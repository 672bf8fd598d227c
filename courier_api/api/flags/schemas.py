import marshmallow as ma

from courier_api.api.base import PageArgs
from courier_api.api.fields import After, Id, Text, UtcTime
from models import FlagSeverity, FlagStatus
from sync.flags import KINDS, SUBJECT_KEYS
from sync.manager_text import MAX_NOTE_LENGTH


class FlagListArgs(PageArgs):
    station_id = Id(
        metadata={"description": "Admins and auditors; managers see their own station"}
    )
    kind = Text(
        validate=ma.validate.OneOf(
            KINDS, error="no flag is of kind {input}; the kinds are {choices}"
        ),
        metadata={"example": "clock_skew", "description": "A kind's code, exactly"},
    )
    severity = ma.fields.Enum(FlagSeverity, by_value=True)
    status = ma.fields.Enum(FlagStatus, by_value=True)
    standing = ma.fields.Boolean(
        load_default=False,
        metadata={
            "description": "Only flags whose cause stands (open, acknowledged or "
            "resolved), as the reports count them: not those the system closed when their "
            "cause went away (a drop's flag closed by its consent pushed after it, a "
            "`pod_blob_missing` by its image uploaded after the delivery)"
        },
    )
    waiting = ma.fields.Boolean(
        load_default=False,
        metadata={
            "description": "true: only those still waiting for a decision, open or "
            "acknowledged (a board row's `open_flags`)"
        },
    )
    courier_id = Id(metadata={"description": "The courier concerned"})
    shift_id = Id(
        metadata={
            "description": "A shift's own flags (its handover discrepancies, sign-off, "
            "sweeps); a parcel's rule flags name no shift: the shift's balance lists those "
            "citing its events"
        }
    )
    tracking_no = Text(
        validate=ma.validate.Length(min=1, max=40),
        metadata={
            "example": "RR473124829GB",
            "description": "A parcel's flags: its own (its rules, a wrong station's "
            "scans, not taken in) and those of its handover in each shift "
            "(`missing_at_handover`, `not_on_manifest`, subject `<shift id>:<tracking no>`)",
        },
    )
    raised_from = UtcTime(metadata={"description": "Raised at or after this time"})
    raised_to = UtcTime(metadata={"description": "Raised before this time"})
    cursor = Text(
        metadata={
            "description": "The previous page's `next_cursor`, as received; omit it for a "
            "walk's first page. The walk goes on below where that page's last flag stood "
            "when listed, though it was opened again since"
        }
    )
    after = After(
        metadata={
            "description": "The last id of the previous page (its `next_after`), read where "
            "that flag stands now: one opened again since is at the top, and the page lists "
            "again flags shown; `cursor` does not"
        }
    )


class FlagOut(ma.Schema):
    id = ma.fields.Integer(required=True)
    station_id = ma.fields.Integer(allow_none=True, required=True)
    kind = ma.fields.String(required=True, metadata={"example": "unknown_parcel"})
    severity = ma.fields.Enum(FlagSeverity, by_value=True, required=True)
    subject_type = ma.fields.String(
        required=True, metadata={"description": ", ".join(SUBJECT_KEYS)}
    )
    subject_key = ma.fields.String(
        required=True,
        metadata={
            "description": "By subject_type: "
            + "; ".join(f"{kind}, {key}" for kind, key in SUBJECT_KEYS.items())
        },
    )
    evidence = ma.fields.Dict(
        required=True,
        metadata={
            "description": "What the check found, e.g. event_ids. Lists gathered over "
            "every raising keep their first 200 ids; past them, `past_bound` names the "
            "ids of the latest raising that named more (up to 50 per list) and counts "
            "in `named` the ids named past the 200 in all. A flag judging a final "
            "outcome cites every scan of it, and names under `repeated_scans` each scan "
            "repeating one it cites (`event_id`, `first_event_id`, the outcome's first "
            "scan): a decision covering that scan covers its repeats, and "
            "`evidence_version` leaves them out"
        },
    )
    status = ma.fields.Enum(FlagStatus, by_value=True, required=True)
    courier_id = ma.fields.Integer(allow_none=True, required=True)
    shift_id = ma.fields.Integer(
        allow_none=True,
        required=True,
        metadata={
            "description": "The shift concerned, for a shift's own flags; null for a "
            "parcel's rule flags, whose evidence's events name their shifts"
        },
    )
    raised_at = ma.fields.AwareDateTime(required=True)
    opened_at = ma.fields.AwareDateTime(
        required=True,
        metadata={
            "description": "When it last became open: raised, or opened again (its cause "
            "back after the system closed it, or raised again on more than a manager's "
            "decision covered). The queue lists the latest opened first"
        },
    )
    updated_at = ma.fields.AwareDateTime(required=True)
    closed_reason = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={"description": "Why the system closed it (its cause went away)"},
    )
    decision = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={
            "enum": ["acknowledged", "resolved"],
            "description": "A manager's latest decision, null if none. A parcel's rule "
            "flags and a shift's own flags are judged again whenever their events change: "
            "while the cause stands only on what the decision covered (`decided_on`), "
            "the flag has this status; on anything else it is open; when the cause goes, "
            "closed. Any other flag found again on more than the decision covered (a "
            "PDA's clock jumping again) is open again",
        },
    )
    decided_on = ma.fields.Dict(
        allow_none=True,
        required=True,
        metadata={
            "description": "What that decision covered: what the evidence named when the "
            "manager decided, its `event_ids`, `client_event_ids` (a `clock_jump`'s "
            "events), `rejected_event_ids` (quarantine ids: a `late_event_after_signoff` "
            "of rejected events), `seqs`, `device_seqs` (each with those under `past_bound`), "
            "`blobs` (missing images), and a "
            "`stale_device`'s `shift_id` and `last_push_at` (the silence). Also in the "
            "decision's audit entry (`flag_acknowledged`, `flag_resolved`)"
        },
    )
    evidence_version = ma.fields.String(
        required=True,
        metadata={
            "description": "A digest of what the evidence names (what `decided_on` "
            "records, its `batch_ids` and `past_bound`): send it back with an "
            "acknowledgement or a resolution to decide only on the evidence you read"
        },
    )


class FlagChangeOut(ma.Schema):
    at = ma.fields.AwareDateTime(required=True)
    by_user_id = ma.fields.Integer(
        allow_none=True, required=True, metadata={"description": "null: the system"}
    )
    from_status = ma.fields.Enum(
        FlagStatus,
        by_value=True,
        allow_none=True,
        required=True,
        metadata={"description": "null when the flag was raised"},
    )
    to_status = ma.fields.Enum(FlagStatus, by_value=True, required=True)
    note = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={"description": "Phone numbers in it are masked except for auditors"},
    )


class FlagDetailOut(FlagOut):
    changes = ma.fields.List(
        ma.fields.Nested(FlagChangeOut),
        required=True,
        metadata={"description": "Every status change, oldest first"},
    )


class FlagPage(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(FlagOut), required=True)
    next_after = ma.fields.Integer(allow_none=True, required=True)
    next_cursor = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={
            "description": "When a full page was listed: pass it as `cursor`, with the same "
            "filters, for the next page; null on the last"
        },
    )


class _Decision(ma.Schema):
    evidence_version = ma.fields.String(
        load_default=None,
        validate=ma.validate.Length(min=1, max=64),
        metadata={
            "description": "The `evidence_version` of the flag the manager was shown: the "
            "decision is refused (409 `evidence_changed`) if the evidence has changed "
            "since. Without it, the decision covers the evidence as it stands"
        },
    )


class AcknowledgeIn(_Decision):
    note = Text(
        load_default=None, allow_none=True, validate=ma.validate.Length(max=MAX_NOTE_LENGTH)
    )


class ResolveIn(_Decision):
    note = Text(
        required=True,
        validate=ma.validate.Length(min=1, max=MAX_NOTE_LENGTH),
        metadata={"description": "How the flag was resolved", "example": "parcel found"},
    )
