from __future__ import annotations

from typing import Any

import marshmallow as ma

from courier_api.api.base import PageArgs, UserRef
from courier_api.api.fields import MAX_ID, After, Id, Text, UtcTime
from models import EventType, FlagStatus, ShiftStatus
from sync.balances import EARLIER_DAYS
from sync.handover import BALANCE_RULE_KINDS, HANDOVER_KINDS, OUTCOMES, WHAT_TO_DO
from sync.manager_text import MAX_NOTE_LENGTH
from sync.phones import shown_text
from sync.signoffs import MAX_SHIFTS

BALANCE_STATUSES = ("balanced", "unbalanced", "provisional")
Seq = ma.fields.Integer


class OpenShiftIn(ma.Schema):
    planned_end_at = UtcTime(
        load_default=None,
        metadata={"description": "When the shift should end; default: SHIFT_PLANNED_HOURS on"},
    )
    first_seq = Seq(
        load_default=None,
        validate=ma.validate.Range(min=1, max=MAX_ID),
        metadata={
            "description": "The seq the PDA's first event of this shift will carry. Optional, "
            "recommended: it lets the server tell which missing seqs belong to the shift. At "
            "most 10,000 beyond the highest seq the server holds from the PDA or its shifts "
            "declared, the sign-in's `device_max_seq` (422 `seq_too_far_ahead`): "
            "`device_max_seq` + 1 is always within it"
        },
    )


class CloseShiftIn(ma.Schema):
    last_seq = Seq(
        load_default=None,
        validate=ma.validate.Range(min=0, max=MAX_ID),
        metadata={
            "description": "The seq of the PDA's last event of this shift. Optional, "
            "recommended: events up to it still on the PDA keep the balance provisional. At "
            "most 10,000 beyond the highest seq the server holds from the PDA or its shifts "
            "declared, or beyond the seq before the shift's `first_seq` when that is higher (422 "
            "`seq_too_far_ahead`): the seqs a shift declares are its own for good"
        },
    )


class SignOffIn(ma.Schema):
    note = Text(
        required=True,
        validate=ma.validate.Length(min=1, max=MAX_NOTE_LENGTH),
        metadata={"example": "all parcels accounted for"},
    )
    force_reason = Text(
        load_default=None,
        validate=ma.validate.Length(max=MAX_NOTE_LENGTH),
        metadata={
            "description": "Sign off a provisional balance anyway (events are still on "
            "the PDA), saying why"
        },
    )
    balance_version = ma.fields.String(
        load_default=None,
        validate=ma.validate.Length(min=1, max=64),
        metadata={
            "description": "The `version` of the balance the manager was shown "
            "(`GET /shifts/{shift_id}/balance`): the sign-off is refused (409 "
            "`balance_changed`) if the balance has changed since"
        },
    )
    rejected_events = ma.fields.Integer(
        load_default=None,
        validate=ma.validate.Range(min=0),
        metadata={
            "description": "How many events of its PDA the server had rejected when the "
            "manager read the shift (the board row's or the balance's `rejected_events`): "
            "the sign-off is "
            "refused (409 `rejected_events_changed`) if that changed since. Optional: "
            "not compared when left out"
        },
    )
    open_flags = ma.fields.List(
        ma.fields.Integer(),
        load_default=None,
        validate=ma.validate.Length(max=1000),
        metadata={
            "description": "The ids of the flags naming the shift still waiting when the "
            "manager read it (the board row's or the balance's `open_flags`, each "
            "`flag_id`; `[]` for "
            "none): the sign-off is refused (409 `open_flags_changed`, naming the flags "
            "raised or decided since) if they changed since. Optional: not compared when "
            "left out"
        },
    )
    images_missing = ma.fields.Integer(
        load_default=None,
        validate=ma.validate.Range(min=0),
        metadata={
            "description": "How many proof images of its deliveries the server lacked when "
            "the manager read the shift (the board row's or the balance's `images_missing`): "
            "the sign-off is refused (409 `images_missing_changed`) if more are missing now "
            "(fewer is an image uploaded since). Optional: not compared when left out"
        },
    )


class ShiftListArgs(PageArgs):
    station_id = Id(metadata={"description": "Admins and auditors; managers see their own"})
    date = ma.fields.Date(metadata={"description": "The station's local date the shift opened"})
    status = ma.fields.Enum(ShiftStatus, by_value=True)
    courier_id = Id(metadata={"description": "Couriers see their own shifts only"})
    device_id = Text(validate=ma.validate.Length(max=64))
    after = After()


class ShiftOut(ma.Schema):
    id = ma.fields.Integer(required=True)
    station_id = ma.fields.Integer(required=True)
    courier_id = ma.fields.Integer(required=True)
    device_id = ma.fields.String(required=True)
    status = ma.fields.Enum(
        ShiftStatus,
        by_value=True,
        required=True,
        metadata={"description": "open, closed (handed over, awaiting sign-off), signed_off"},
    )
    work_date = ma.fields.Date(
        required=True, metadata={"description": "The station's local date the shift opened"}
    )
    opened_at = ma.fields.AwareDateTime(required=True)
    planned_end_at = ma.fields.AwareDateTime(required=True)
    first_seq = ma.fields.Integer(allow_none=True, required=True)
    last_seq = ma.fields.Integer(allow_none=True, required=True)
    closed_at = ma.fields.AwareDateTime(allow_none=True, required=True)
    closed_by = ma.fields.Integer(allow_none=True, required=True)
    signed_off_at = ma.fields.AwareDateTime(
        allow_none=True,
        required=True,
        metadata={
            "description": "The latest sign-off (and `signed_off_by`, `signoff_note`); "
            "while `status` is `closed`, one that late events superseded (`reopened_at`)"
        },
    )
    signed_off_by = ma.fields.Integer(allow_none=True, required=True)
    signoff_note = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={"description": "Phone numbers in it are masked except for auditors"},
    )
    signoff_forced_reason = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={"description": "Phone numbers in it are masked except for auditors"},
    )
    reopened_count = ma.fields.Integer(
        required=True, metadata={"description": "Times an event after a sign-off reopened it"}
    )
    reopened_at = ma.fields.AwareDateTime(allow_none=True, required=True)


class CourierWentOut(ma.Schema):
    """Where the courier of a shift still open went on (``sync.pages.where_courier_went``),
    as its board row and its page say it: a shift's balance and the shift itself."""

    courier_back_shift_id = ma.fields.Integer(
        allow_none=True,
        required=True,
        metadata={
            "description": "A shift still open whose courier has handed over a shift they "
            "opened after it on another PDA of the station: the latest such shift (a PDA that "
            "died, its courier gone on with a spare one and back): close this one for them. "
            "Null otherwise, and while a shift the courier opened after that one is still "
            "open (out again on a third PDA); as the board row's"
        },
    )
    courier_also_open_shift_ids = ma.fields.List(
        ma.fields.Integer(),
        required=True,
        metadata={
            "description": "A shift still open: its courier's other shifts of the station "
            "still open on another PDA, oldest first, as the board row's. One of them is "
            "likely no longer used: close it. Empty otherwise"
        },
    )


class ShiftDetailOut(ShiftOut, CourierWentOut):
    """One shift as ``GET /shifts/{shift_id}`` answers it."""


def shift_view(shift: Any, *, unmasked: bool) -> dict[str, Any]:
    """``unmasked``: an auditor's; for anyone else a phone number in the sign-off's free
    text (the recipient a manager called before signing off) is masked (rule 7)."""
    view = {name: getattr(shift, name) for name in ShiftOut._declared_fields}
    for name in ("signoff_note", "signoff_forced_reason"):
        view[name] = shown_text(view[name], unmasked=unmasked)
    return view


class ShiftPage(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(ShiftOut), required=True)
    next_after = ma.fields.Integer(allow_none=True, required=True)


def _count(description: str) -> ma.fields.Integer:
    return ma.fields.Integer(required=True, metadata={"description": description})


def _also_open_ids() -> ma.fields.List:
    return ma.fields.List(
        ma.fields.Integer(),
        required=True,
        metadata={
            "description": "A shift still open: its courier's other shifts still open on "
            "another PDA (of `date` or of the earlier days listed), oldest first. Opening a "
            "second shift on another PDA is not refused (a PDA that died is the normal "
            "reason), but one of them is then likely no longer used: close it. Empty "
            "otherwise"
        },
    )


class BalanceCounts(ma.Schema):
    status = ma.fields.String(
        required=True,
        validate=ma.validate.OneOf(BALANCE_STATUSES),
        metadata={
            "description": "balanced; unbalanced (something missing, or a discrepancy); "
            "provisional (seqs the shift may own are still on the PDA)"
        },
    )
    checked_out = _count("Parcels checked out in this shift (its manifest)")
    delivered = _count("Handed over in person with a proof of delivery")
    delivered_without_pod = _count("Handed over in person without a (complete) proof")
    unattended = _count("Left in a locker or at a pickup point, authorized")
    unattended_without_consent = _count("Left unattended without a consent that came first")
    returned = _count("Returned to the station")
    missing = _count("Checked out, no final outcome (while open: still out)")
    not_checked_out = _count("Outcomes recorded for parcels this shift never checked out")
    missing_seq_count = _count("Sequence numbers still on the PDA that may belong here")
    discrepancy_count = _count("Discrepancies, each with its flag")


class ScanElsewhereOut(ma.Schema):
    event_id = ma.fields.Integer(required=True)
    type = ma.fields.Enum(EventType, by_value=True, required=True)
    occurred_at = ma.fields.AwareDateTime(
        required=True, metadata={"description": "Corrected time"}
    )
    shift_id = ma.fields.Integer(required=True, metadata={"description": "Filed under"})
    courier_id = ma.fields.Integer(required=True)
    device_id = ma.fields.String(required=True)


class DiscrepancyOut(ma.Schema):
    kind = ma.fields.String(
        required=True,
        # From the kinds a balance cites, so that the list cannot miss one again.
        metadata={"description": ", ".join((*HANDOVER_KINDS, *sorted(BALANCE_RULE_KINDS)))},
    )
    tracking_no = ma.fields.String(required=True)
    flag_id = ma.fields.Integer(allow_none=True, required=True)
    flag_status = ma.fields.Enum(FlagStatus, by_value=True, allow_none=True, required=True)
    flag_elsewhere = ma.fields.Boolean(
        required=True,
        metadata={
            "description": "Its flag is another station's than the shift's (one raised "
            "before flags had a station each sits at the parcel's station): that "
            "station's manager decides it (`GET /flags/{flag_id}` is a 404 to this "
            "station's), and resolved or not it does not count in the board row's "
            "`discrepancies_decided`"
        },
    )
    event_ids = ma.fields.List(
        ma.fields.Integer(), required=True, metadata={"description": "The evidence: events"}
    )
    what_to_do = ma.fields.Function(
        lambda d: WHAT_TO_DO[d["kind"]],
        required=True,
        metadata={"description": "What a manager does about it, for people"},
    )
    elsewhere = ma.fields.List(
        ma.fields.Nested(ScanElsewhereOut),
        required=True,
        metadata={
            "description": "A `missing_at_handover` or `not_on_manifest` parcel's check-outs "
            "and final outcomes filed under the station's other shifts (of its latest 20 "
            "not voided), oldest first, as the shift's page lists them: a courier whose PDA "
            "died went on with a spare one. To a courier reading their own balance, only "
            "their own scans (another courier's shifts are not theirs to read). Empty "
            "for other kinds"
        },
    )


class RepeatedScanOut(ma.Schema):
    event_id = ma.fields.Integer(required=True, metadata={"description": "The repeat"})
    first_event_id = ma.fields.Integer(
        required=True, metadata={"description": "The first scan of the outcome it repeats"}
    )


class ParcelOutcomeOut(ma.Schema):
    tracking_no = ma.fields.String(required=True)
    outcome = ma.fields.String(
        required=True,
        validate=ma.validate.OneOf((*OUTCOMES, "no_outcome")),
        metadata={
            "description": f"One of {', '.join(OUTCOMES)}; no_outcome off the manifest with "
            "no outcome of the shift's own (none, or only scans repeating another shift's: "
            "`repeated_scans`)"
        },
    )
    on_manifest = ma.fields.Boolean(required=True)
    outcome_event_id = ma.fields.Integer(
        allow_none=True,
        required=True,
        metadata={
            "description": "The scan that settles the outcome: a final outcome scanned again "
            "(the same type, courier and place, no check-out between) by its first scan, as "
            "the rules judge it; null with no outcome of the shift's own"
        },
    )
    event_ids = ma.fields.List(ma.fields.Integer(), required=True)
    repeated_scans = ma.fields.List(
        ma.fields.Nested(RepeatedScanOut),
        required=True,
        metadata={
            "description": "The shift's scans that repeat an earlier scan of the same final "
            "outcome, each with that outcome's first scan (in this shift or, off the "
            "manifest, in another shift whose outcome it is: then counted nowhere here)"
        },
    )


class WriteOffOut(ma.Schema):
    id = ma.fields.Integer(required=True, metadata={"description": "The write-off's id"})
    ranges = ma.fields.Function(
        lambda w: [{"first": first, "last": last} for first, last in w.ranges],
        required=True,
        metadata={
            "description": "The shift's seqs it wrote off, not arrived since: [{first, last}, ...]"
        },
    )
    reason = ma.fields.String(
        required=True,
        metadata={"description": "Phone numbers in it are masked except for auditors"},
    )
    written_off_by = ma.fields.Integer(required=True)
    written_off_by_name = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={
            "description": "Full name, else username; null to a station's reader when "
            "they are now another station's user (`written_off_by` stays)"
        },
    )
    written_off_at = ma.fields.AwareDateTime(required=True)


class BoardFlagOut(ma.Schema):
    flag_id = ma.fields.Integer(required=True)
    kind = ma.fields.String(
        required=True,
        metadata={
            "description": "blob_missing_at_handover, shift_not_closed, stale_device, "
            "late_event_after_signoff, ..."
        },
    )
    status = ma.fields.Enum(
        FlagStatus, by_value=True, required=True, metadata={"description": "open, acknowledged"}
    )


class BalanceOut(BalanceCounts, CourierWentOut):
    shift_id = ma.fields.Integer(required=True)
    version = ma.fields.String(
        required=True,
        metadata={
            "description": "A digest of the status, counts, missing seqs, "
            "discrepancies and each parcel's outcome and the event that settles it: send "
            "it with the sign-off as `balance_version` to sign off only the balance you saw"
        },
    )
    shift_status = ma.fields.Enum(ShiftStatus, by_value=True, required=True)
    signed_off_version = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={
            "description": "The `version` of the balance the shift was signed off with "
            "(kept with the sign-off and in the audit log); null unless signed off"
        },
    )
    changed_since_signoff = ma.fields.Boolean(
        required=True,
        metadata={
            "description": "Signed off, and the balance now differs from the one signed "
            "off (`version` is not `signed_off_version`): a consent that arrived later, "
            "or another shift's events, changed it. Only an event filed under the shift "
            "reopens it; the sign-off stands"
        },
    )
    missing_seqs = ma.fields.List(
        ma.fields.Integer(), required=True, metadata={"description": "The first 100"}
    )
    written_off_seqs = ma.fields.List(
        ma.fields.Integer(),
        required=True,
        metadata={
            "description": "Seqs the shift may own that a manager wrote off as lost "
            "(`POST /devices/{device_id}/lost-seqs`), the first 100: held for `status` "
            "(not provisional for them), named here instead of in `missing_seqs`"
        },
    )
    written_off_seq_count = _count("Seqs of the shift written off as lost")
    write_offs = ma.fields.List(
        ma.fields.Nested(WriteOffOut),
        required=True,
        metadata={"description": "The write-offs of those seqs: by whom, when, why"},
    )
    parcels = ma.fields.List(ma.fields.Nested(ParcelOutcomeOut), required=True)
    discrepancies = ma.fields.List(ma.fields.Nested(DiscrepancyOut), required=True)
    # What a sign-off may send back (``POST /shifts/{shift_id}/signoff``), as the board
    # row counts it (``sync.balances.read_handovers``).
    open_flags = ma.fields.List(
        ma.fields.Nested(BoardFlagOut),
        required=True,
        metadata={
            "description": "The flags naming the shift still open or acknowledged, oldest "
            "first, as its board row lists them (`GET /flags?shift_id=&waiting=true`): its "
            "own, which the balance does not count, and its handover discrepancies'. Send "
            "their ids back with the sign-off as `open_flags`"
        },
    )
    rejected_events = _count(
        "Events of the handed-over shift's PDA that the server rejected, as its board row "
        "counts them (0 while open): what the balance cannot show. Send it back with the "
        "sign-off as `rejected_events`"
    )
    images_missing = _count(
        "Proof images the handed-over shift's deliveries name that the server lacks, as its "
        "board row counts them (0 while open). Send it back with the sign-off as "
        "`images_missing`"
    )


class BoardArgs(ma.Schema):
    date = ma.fields.Date(
        load_default=None,
        metadata={"description": "The station's local date; default: today there"},
    )


class BoardShiftOut(ma.Schema):
    shift_id = ma.fields.Integer(required=True)
    courier = ma.fields.Nested(UserRef, required=True)
    device_id = ma.fields.String(required=True)
    shift_status = ma.fields.Enum(ShiftStatus, by_value=True, required=True)
    opened_at = ma.fields.AwareDateTime(required=True)
    opened_day_offset = ma.fields.Integer(
        required=True,
        metadata={
            "description": "Days from the board's `date` to the station's local date at "
            "`opened_at`: 0, or -1 for a shift filed under the day that opened the evening "
            "before (the station's time zone moved since)"
        },
    )
    planned_end_at = ma.fields.AwareDateTime(required=True)
    closed_at = ma.fields.AwareDateTime(allow_none=True, required=True)
    closed_day_offset = ma.fields.Integer(
        allow_none=True,
        required=True,
        metadata={
            "description": "Days from the board's `date` to the station's local date at "
            "`closed_at` (null while open): 1 for a shift closed after local midnight, whose "
            "close reads earlier than its open on the wall clock alone"
        },
    )
    signed_off_at = ma.fields.AwareDateTime(
        allow_none=True,
        required=True,
        metadata={
            "description": "The latest sign-off; while `shift_status` is `closed`, one that "
            "late events superseded (`reopened_at`): the shift waits for a new sign-off"
        },
    )
    reopened_count = ma.fields.Integer(
        required=True, metadata={"description": "Times an event after a sign-off reopened it"}
    )
    reopened_at = ma.fields.AwareDateTime(
        allow_none=True, required=True, metadata={"description": "Its latest reopening"}
    )
    changed_since_signoff = ma.fields.Boolean(
        required=True,
        metadata={
            "description": "Signed off, and the balance now differs from the one signed off"
        },
    )
    balance = ma.fields.Nested(BalanceCounts, required=True)
    balance_version = ma.fields.String(
        required=True,
        metadata={
            "description": "The balance's `version`, as `GET /shifts/{shift_id}/balance` "
            "gives it: send it back to sign the shift off (`POST /shifts/{shift_id}/signoff`, "
            "`POST /stations/{station_id}/signoffs`)"
        },
    )
    open_flag_count = _count(
        "The flags naming the shift still open or acknowledged, as `GET "
        "/flags?shift_id=&waiting=true` lists them: its own (a balanced shift can have one, "
        "such as proof images still missing at handover) and its handover discrepancies' "
        "(`missing_at_handover`, `not_on_manifest`), which its balance also counts"
    )
    open_flags = ma.fields.List(
        ma.fields.Nested(BoardFlagOut),
        required=True,
        metadata={
            "description": "Those flags, oldest first (`GET /flags?shift_id=&waiting=true` "
            "lists them; without `waiting`, decided ones too)"
        },
    )
    images_missing = _count(
        "Proof images (signatures, photos) the handed-over shift's deliveries name that the "
        "server lacks: not uploaded yet, or purged. `blob_missing_at_handover` flags them "
        "only after its grace; a shift with any is no clean handover to sign off together"
    )
    rejected_events = _count(
        "Events of the handed-over shift's PDA that the server rejected (kept in quarantine, "
        "listed on the shift's page): those with one of the shift's seqs, or without a seq "
        "naming one of its parcels (however the PDA wrote the number: case, spaces, "
        "dashes). Its balance cannot show what they said (a correction "
        "rejected voids nothing): a shift with any is no clean handover to sign off together"
    )
    discrepancies_decided = _count(
        "Its discrepancies (`balance.discrepancy_count`) whose flag a manager resolved: each "
        "still stands in the balance, which stays unbalanced (not counted: a resolved "
        "`unknown_parcel`, whose scans only intake judges, and a flag of another station, "
        "which that station's manager decides). All of them, on a shift "
        "closed (not signed off yet), not provisional and clean in all else (no event of "
        "its PDA rejected, no flag of its own waiting, no corrected outcome to review, "
        "every proof image uploaded): the shift waits only for its sign-off, which "
        "`POST /stations/{station_id}/signoffs` with `discrepancies_decided` gives it "
        "together with others. A shift still open, or provisional, may have all its "
        "discrepancies decided and still wait for more"
    )
    courier_back_shift_id = ma.fields.Integer(
        allow_none=True,
        required=True,
        metadata={
            "description": "A shift still open whose courier has handed over a shift they "
            "opened after it on another PDA: the latest such shift (a PDA that died at "
            "11:00, its courier gone on with a spare one and back): close this one for them "
            "(`POST /shifts/{shift_id}/close`). Null otherwise, and while a shift the courier "
            "opened after that one is still open (out again on a third PDA)"
        },
    )
    courier_also_open_shift_ids = _also_open_ids()
    corrections_to_review = ma.fields.List(
        ma.fields.Nested(BoardFlagOut),
        required=True,
        metadata={
            "description": "Its parcels' corrected final outcomes no manager has looked at "
            "yet: `correction_review` and `correction_by_another_courier` flags, still open, "
            "citing its events (the event voided, or the correction). Its balance counts the "
            "outcome as corrected; a shift with any is no clean handover to sign off together "
            "until they are acknowledged or resolved"
        },
    )


class BoardTotalsOut(BalanceCounts):
    class Meta:
        exclude = ("status",)

    missing = _count("Checked out, no final outcome, in shifts handed over (closed or signed off)")
    still_out = _count("Checked out, no final outcome yet, in shifts still open (on the road)")
    shifts = _count("Shifts of the day")
    balanced = _count("Shifts handed over whose balance closes")
    unbalanced = _count("Shifts handed over with something missing or a discrepancy")
    provisional = _count("Shifts handed over still waiting for events on the PDA")
    open = _count("Shifts still open: counted here, under no balance status, until they hand over")
    closed = _count("Shifts handed over, waiting for a sign-off")
    signed_off = _count("Shifts signed off")
    changed_since_signoff = _count("Shifts signed off whose balance has changed since")
    reopened = _count(
        "Shifts signed off, then reopened by late events: closed, waiting for a new sign-off"
    )
    with_open_flags = _count(
        "Shifts with a flag open or acknowledged (`open_flag_count`), whatever their balance"
    )


class EarlierShiftOut(ma.Schema):
    shift_id = ma.fields.Integer(required=True)
    date = ma.fields.Date(required=True, metadata={"description": "The day it opened on"})
    courier = ma.fields.Nested(UserRef, required=True)
    device_id = ma.fields.String(required=True)
    shift_status = ma.fields.Enum(
        ShiftStatus, by_value=True, required=True, metadata={"description": "open, closed"}
    )
    reopened_count = ma.fields.Integer(
        required=True, metadata={"description": "Times an event after a sign-off reopened it"}
    )
    courier_back_shift_id = ma.fields.Integer(
        allow_none=True,
        required=True,
        metadata={
            "description": "Still open, its courier has handed over a shift opened after it "
            "on another PDA since, up to `date` (signed off or not): as a board row's "
            "`courier_back_shift_id`"
        },
    )
    courier_also_open_shift_ids = _also_open_ids()


class BoardOut(ma.Schema):
    station_id = ma.fields.Integer(required=True)
    date = ma.fields.Date(required=True)
    shifts = ma.fields.List(ma.fields.Nested(BoardShiftOut), required=True)
    totals = ma.fields.Nested(BoardTotalsOut, required=True)
    earlier_waiting = ma.fields.List(
        ma.fields.Nested(EarlierShiftOut),
        required=True,
        metadata={
            "description": f"Shifts of the {EARLIER_DAYS} days before `date` not signed off, "
            "oldest first: still open (a PDA that died) or handed over and waiting for a "
            "sign-off (reopened by late events, say). Not in `shifts` nor in the totals"
        },
    )


class SeenShiftIn(ma.Schema):
    shift_id = Id(required=True)
    balance_version = ma.fields.String(
        required=True,
        validate=ma.validate.Length(min=1, max=64),
        metadata={"description": "The board row's `balance_version`, as the manager saw it"},
    )


class SignOffCleanIn(ma.Schema):
    note = Text(
        required=True,
        validate=ma.validate.Length(min=1, max=MAX_NOTE_LENGTH),
        metadata={"example": "all parcels accounted for"},
    )
    shifts = ma.fields.List(
        ma.fields.Nested(SeenShiftIn),
        required=True,
        validate=ma.validate.Length(min=1, max=MAX_SHIFTS),
        metadata={"description": f"At most {MAX_SHIFTS}, each shift once"},
    )
    discrepancies_decided = ma.fields.Boolean(
        load_default=False,
        metadata={
            "description": "Also sign off a shift unbalanced only by discrepancies a manager "
            "has each resolved (its board row's `discrepancies_decided` equal to its "
            "`discrepancy_count`), clean in all else; one with any still to decide is refused "
            "as `discrepancies_to_decide`. The sign-off's audit entry names the resolved "
            "flags it rested on (`discrepancies_decided`)"
        },
    )

    @ma.validates("shifts")
    def _each_once(self, value: list[dict[str, Any]], **_: Any) -> None:
        ids = [item["shift_id"] for item in value]
        twice = sorted({shift_id for shift_id in ids if ids.count(shift_id) > 1})
        if twice:
            raise ma.ValidationError(f"shift {', '.join(map(str, twice))} named more than once")


class SignOffOutcomeOut(ma.Schema):
    shift_id = ma.fields.Integer(required=True)
    outcome = ma.fields.String(required=True, metadata={"description": "signed_off, refused"})
    code = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={
            "description": "Why it was refused: shift_not_found, shift_open, "
            "already_signed_off, balance_unbalanced, discrepancies_to_decide (with "
            "`discrepancies_decided`), balance_provisional, open_flags, images_missing, "
            "rejected_events, corrections_to_review, balance_changed; null when signed off"
        },
    )
    message = ma.fields.String(allow_none=True, required=True)


class SignOffCleanOut(ma.Schema):
    signed_off = _count("Shifts signed off by this request")
    refused = _count("Shifts left for a sign-off of their own")
    outcomes = ma.fields.List(
        ma.fields.Nested(SignOffOutcomeOut),
        required=True,
        metadata={"description": "One per shift named, in shift id order"},
    )
