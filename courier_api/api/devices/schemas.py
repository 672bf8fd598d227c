import marshmallow as ma

from courier_api.api.base import PageArgs
from courier_api.api.fields import After, Id, Text
from models import DeviceStatus
from sync.events import MAX_SEQ
from sync.manager_text import MAX_NOTE_LENGTH


class DeviceOut(ma.Schema):
    id = ma.fields.String(required=True)
    station_id = ma.fields.Integer(required=True)
    status = ma.fields.Enum(DeviceStatus, by_value=True, required=True)
    last_seen_at = ma.fields.AwareDateTime(allow_none=True, required=True)
    registered_at = ma.fields.AwareDateTime(required=True)
    status_changed_at = ma.fields.AwareDateTime(allow_none=True, required=True)


class DeviceCreate(ma.Schema):
    device_id = Text(required=True, metadata={"example": "PDA-0042"})
    station_id = Id(metadata={"description": "Defaults to the manager's own station"})


class DeviceUpdate(ma.Schema):
    status = ma.fields.Enum(DeviceStatus, by_value=True, required=True)


class DeviceMove(ma.Schema):
    station_id = Id(required=True, metadata={"description": "The station the PDA was sent to"})


class DeviceListArgs(PageArgs):
    station_id = Id()
    status = ma.fields.Enum(DeviceStatus, by_value=True)
    after = Text(load_default="", metadata={"description": "Last device id seen"})


class DevicePage(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(DeviceOut), required=True)
    next_after = ma.fields.String(allow_none=True, required=True)


MAX_NAMED = 1000  # seqs, and ranges, one write-off names at most
_seq = {"strict": True, "validate": ma.validate.Range(min=1, max=MAX_SEQ)}


class SeqRange(ma.Schema):
    first = ma.fields.Integer(required=True, **_seq)
    last = ma.fields.Integer(required=True, **_seq)


class LostSeqsIn(ma.Schema):
    seqs = ma.fields.List(
        ma.fields.Integer(**_seq),
        load_default=list,
        validate=ma.validate.Length(max=MAX_NAMED),
        metadata={"description": f"Seqs to write off (at most {MAX_NAMED})", "example": [41]},
    )
    ranges = ma.fields.List(
        ma.fields.Nested(SeqRange),
        load_default=list,
        validate=ma.validate.Length(max=MAX_NAMED),
        metadata={
            "description": f"Ranges of seqs to write off, both ends included (at most {MAX_NAMED})"
        },
    )
    reason = Text(
        required=True,
        validate=ma.validate.Length(min=1, max=MAX_NOTE_LENGTH),
        metadata={"example": "PDA reset on 4 December: its unsent scans are gone"},
    )


class WriteOffFields(ma.Schema):
    id = ma.fields.Integer(required=True, metadata={"description": "The write-off's id"})
    device_id = ma.fields.String(required=True)
    ranges = ma.fields.List(
        ma.fields.Nested(SeqRange),
        required=True,
        metadata={"description": "The seqs written off, as written off: [{first, last}, ...]"},
    )
    seq_count = ma.fields.Integer(required=True, metadata={"description": "Seqs written off"})
    reason = ma.fields.String(
        required=True,
        metadata={"description": "Phone numbers in it are masked except for auditors"},
    )
    written_off_by = ma.fields.Integer(required=True)
    written_off_at = ma.fields.AwareDateTime(required=True)


class LostSeqsOut(WriteOffFields):
    acked_through_seq = ma.fields.Integer(
        required=True,
        metadata={"description": "The device's, now: its next push's receipt says the same"},
    )
    missing_seqs = ma.fields.List(
        ma.fields.Integer(),
        required=True,
        metadata={"description": "Still missing: the first 100"},
    )
    missing_seq_count = ma.fields.Integer(required=True)


class WriteOffItem(WriteOffFields):
    still_written_off = ma.fields.List(
        ma.fields.Nested(SeqRange),
        required=True,
        metadata={
            "description": "Of `ranges`, those still written off now: [{first, last}, ...]. "
            "A seq whose event the PDA sent after all (taken as any late event) leaves "
            "them; empty once the PDA sent every one: the write-off is disproved"
        },
    )
    arrived_seq_count = ma.fields.Integer(
        required=True,
        metadata={
            "description": "How many of its seqs the PDA sent after all since "
            "(`seq_count` minus those still written off)"
        },
    )
    written_off_by_name = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={
            "description": "Who wrote them off, by full name or username; null to a "
            "manager when they are now another station's user (`written_off_by` stays)"
        },
    )


class WriteOffListArgs(PageArgs):
    after = After()


class WriteOffPage(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(WriteOffItem), required=True)
    next_after = ma.fields.Integer(allow_none=True, required=True)
