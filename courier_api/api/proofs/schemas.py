from __future__ import annotations

import marshmallow as ma

from courier_api.api.base import PageArgs, UserRef, Walked
from courier_api.api.fields import Id, Text, UtcTime
from courier_api.api.parcels.schemas import TimelineEvent
from models import ServiceClass
from sync.paging import MAX_PAGE_SIZE
from sync.proofs import METHODS, SEARCHABLE_FLAG_KINDS

DELIVERIES = Walked(rows="deliveries", row="delivery", row_id="event id")


class ProofArgs(ma.Schema):
    station_id = Id(metadata={"description": "Managers see their own station"})
    tracking_no = Text()
    courier_id = Id()
    occurred_from = UtcTime(metadata={"description": "Corrected time, inclusive"})
    occurred_to = UtcTime(metadata={"description": "Corrected time, exclusive"})
    flag_kind = Text(
        validate=ma.validate.OneOf(SEARCHABLE_FLAG_KINDS),
        metadata={
            "description": "Only deliveries of parcels with a flag of this kind, on the "
            "parcel or on its handover in the delivery's shift (`missing_at_handover`, "
            "`not_on_manifest`), open or resolved by a manager (not one the system closed "
            "because its cause went away); a station manager's own station's flags only. "
            "Flags of a whole shift or device (`late_event_after_signoff`, `clock_skew`, "
            "...) are found at /flags; a proof lists those that cite its delivery"
        },
    )
    method = ma.fields.String(validate=ma.validate.OneOf(list(METHODS)))


class ProofListArgs(ProofArgs, PageArgs):
    cursor, after = DELIVERIES.args()


class ConsentRef(ma.Schema):
    id = ma.fields.Integer(required=True)
    scope = ma.fields.String(required=True)
    method = ma.fields.String(required=True)
    point_id = ma.fields.String(allow_none=True, required=True)
    channel = ma.fields.String(required=True)
    granted_at = ma.fields.AwareDateTime(required=True)
    expires_at = ma.fields.AwareDateTime(allow_none=True, required=True)
    revoked_at = ma.fields.AwareDateTime(allow_none=True, required=True)
    evidence = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={"description": "A phone number typed into it is masked except for auditors"},
    )
    event_id = ma.fields.Integer(allow_none=True, required=True)
    created_at = ma.fields.AwareDateTime(
        required=True,
        metadata={
            "description": "When it was recorded here (`granted_at` is when the channel "
            "says the recipient gave it): one recorded after the drop but dated before "
            "it shows here"
        },
    )
    created_by = ma.fields.Integer(
        allow_none=True,
        required=True,
        metadata={
            "description": "The user who recorded it: the channel's integration account or "
            "an admin, or the courier whose PDA captured it"
        },
    )


class ProofImageOut(ma.Schema):
    role = ma.fields.String(required=True, metadata={"enum": ["signature", "photo"]})
    sha256 = ma.fields.String(required=True)
    arrived_at = ma.fields.AwareDateTime(
        allow_none=True,
        required=True,
        metadata={"description": "First uploaded; null: the image never arrived"},
    )
    purged_at = ma.fields.AwareDateTime(
        allow_none=True,
        required=True,
        metadata={"description": "Its bytes deleted by the retention purge (the record stays)"},
    )


class ProofImageCheckedOut(ProofImageOut):
    integrity = ma.fields.String(
        required=True,
        metadata={
            "enum": ["intact", "altered", "missing", "purged"],
            "description": "Whether the stored bytes are still the image the digest names, "
            "the file hashed as this proof was read: `intact`; `altered`, changed or "
            "replaced in the store since it was verified on upload (not served: "
            "`GET /blobs/<sha256>` answers 409 `blob_bytes_altered`); `missing`, never "
            "uploaded (`arrived_at` null) or its file gone from the store; `purged`, "
            "deleted by the retention purge",
        },
    )


class ProofOut(ma.Schema):
    event_id = ma.fields.Integer(required=True)
    tracking_no = ma.fields.String(required=True)
    station_id = ma.fields.Integer(
        required=True,
        metadata={
            "description": "The parcel's station; for a parcel not taken in, the station "
            "where the delivery was recorded"
        },
    )
    parcel_taken_in = ma.fields.Boolean(
        required=True,
        metadata={
            "description": "False: no parcel with this tracking number was ever taken in "
            "(the delivery is kept and flagged `unknown_parcel`): the recipient, address "
            "and service class are null, and a drop's consent is not judged"
        },
    )
    courier_id = ma.fields.Integer(required=True)
    device_id = ma.fields.String(required=True)
    method = ma.fields.String(required=True, metadata={"enum": list(METHODS)})
    voided = ma.fields.Boolean(
        required=True,
        metadata={"description": "A later correction from the same PDA voided this delivery"},
    )
    repeat_of = ma.fields.Integer(
        allow_none=True,
        required=True,
        metadata={
            "description": "A repeated scan (the same final outcome scanned again by the "
            "same courier, no check-out between, as the shift's `repeated_scans` names it): "
            "the event id of its first scan, the one delivery; count that one only. Null: "
            "a delivery of its own"
        },
    )
    occurred_at = ma.fields.AwareDateTime(required=True, metadata={"description": "Corrected"})
    occurred_at_device = ma.fields.AwareDateTime(
        required=True, metadata={"description": "As the PDA's clock said"}
    )
    clock_offset_ms = ma.fields.Integer(
        required=True,
        metadata={
            "description": "The correction applied: the PDA's clock minus the server's, "
            "as estimated from its pushes (`occurred_at_device` - `occurred_at`)"
        },
    )
    seq = ma.fields.Integer(
        required=True,
        metadata={"description": "Its PDA's sequence number: its place in the PDA's order"},
    )
    received_at = ma.fields.AwareDateTime(required=True)
    recipient_name = ma.fields.String(
        allow_none=True, required=True, metadata={"description": "Null: parcel not taken in"}
    )
    recipient_phone = ma.fields.String(
        allow_none=True, required=True, metadata={"description": "Masked except for auditors"}
    )
    address = ma.fields.String(
        allow_none=True, required=True, metadata={"description": "Null: parcel not taken in"}
    )
    service_class = ma.fields.Enum(
        ServiceClass,
        by_value=True,
        allow_none=True,
        required=True,
        metadata={"description": "Null: parcel not taken in"},
    )
    locker_id = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={
            "description": "A locker drop's locker, as the PDA sent it (trimmed and "
            "upper-case, as every point id); null otherwise"
        },
    )
    compartment = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={"description": "A locker drop's compartment; null otherwise"},
    )
    point_id = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={"description": "A pickup-point drop's point; null otherwise"},
    )
    pod = ma.fields.Dict(
        required=True,
        metadata={
            "description": "Signature and photo (blob sha256), name, ...; a phone number "
            "typed into the name or the relation is masked except for auditors"
        },
    )
    images = ma.fields.List(
        ma.fields.Nested(ProofImageOut),
        required=True,
        metadata={
            "description": "The images the POD names (signature, photo), each with "
            "whether it arrived: `arrived_at` null, never uploaded (`pod_blob_missing`); "
            "`purged_at`, its bytes deleted by the retention purge since. A list does "
            "not hash the stored bytes: a proof's detail (`GET /proofs/<event_id>`) says "
            "whether they are still the image (`integrity`)"
        },
    )
    lat = ma.fields.Float(allow_none=True, required=True)
    lon = ma.fields.Float(allow_none=True, required=True)
    distance_m = ma.fields.Float(
        allow_none=True,
        required=True,
        metadata={"description": "From the parcel's geocoded address, when both are known"},
    )
    consent_required = ma.fields.Boolean(
        allow_none=True,
        required=True,
        metadata={
            "description": "Drops only (null in person; for a parcel not taken in: "
            "its class is unknown; and for a drop a correction voided: it is not judged, "
            "there is nothing to authorize): whether the parcel's class may be left in a "
            "locker or at a pickup point only with its recipient's consent "
            "(CONSENT_REQUIRED_CLASSES): true with `authorizing_consent` null is an "
            "unauthorized drop"
        },
    )
    authorizing_consent = ma.fields.Nested(
        ConsentRef,
        allow_none=True,
        required=True,
        metadata={
            "description": "Drops only: the consent in force before it; null: none (or a "
            "voided drop, not judged). A drop scanned again (the same locker and "
            "compartment or pickup point, by the same courier, with no check-out "
            "between) is judged by its first scan, when the parcel went in: this is the "
            "consent in force before that one"
        },
    )


class ProofPage(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(ProofOut), required=True)
    next_cursor, as_of, arrived_since, next_after = DELIVERIES.page()


class FlagDecisionRef(ma.Schema):
    decision = ma.fields.String(
        required=True,
        metadata={
            "enum": ["acknowledged", "resolved"],
            "description": "As the flag's `decision` (`POST /flags/{flag_id}/acknowledge`, "
            "`/resolve`)",
        },
    )
    by = ma.fields.Nested(UserRef, required=True, metadata={"description": "The manager"})
    at = ma.fields.AwareDateTime(required=True)
    note = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={"description": "Phone numbers in it are masked except for auditors"},
    )


class FlagRef(ma.Schema):
    id = ma.fields.Integer(required=True)
    kind = ma.fields.String(required=True)
    severity = ma.fields.String(required=True)
    status = ma.fields.String(required=True)
    evidence = ma.fields.Dict(required=True)
    closed_reason = ma.fields.String(allow_none=True, required=True)
    latest_decision = ma.fields.Nested(
        FlagDecisionRef,
        allow_none=True,
        required=True,
        metadata={
            "description": "A manager's latest decision on it, null if none; the flag keeps "
            "it when opened again on evidence it did not cover (its `status` then says "
            "open). Every change is at `GET /flags/{flag_id}`"
        },
    )


class JudgedBetween(ma.Schema):
    earliest = ma.fields.AwareDateTime(required=True)
    latest = ma.fields.AwareDateTime(required=True)


class ProofDetailOut(ProofOut):
    images = ma.fields.List(
        ma.fields.Nested(ProofImageCheckedOut),
        required=True,
        metadata={
            "description": "The images the POD names (signature, photo), each with "
            "whether it arrived and whether its stored bytes are still the image "
            "(`integrity`, the file hashed as the proof was read)"
        },
    )
    judged_between = ma.fields.Nested(
        JudgedBetween,
        allow_none=True,
        required=True,
        metadata={
            "description": "Drops only (null otherwise): when the drop may have happened, "
            "on the corrected clock, as the consent rule judges it: between its PDA "
            "time and its corrected time when they differ beyond CLOCK_SKEW_FLAG_SECONDS; "
            "after every event its PDA recorded before it and before every one recorded "
            "after it (those of other parcels within 12 hours); never after its push "
            "arrived. A consent from a recipient channel or another PDA authorizes it "
            "only if granted at or before `earliest` (one captured on the drop's own PDA "
            "is ordered by seq instead) and in force at `latest`; one captured on a PDA "
            "of another station than the drop's never does. A drop scanned again is "
            "judged by its first scan: the span is that scan's, and may end before this "
            "one"
        },
    )
    timeline = ma.fields.List(
        ma.fields.Nested(TimelineEvent),
        required=True,
        metadata={
            "description": "The parcel's timeline in projection order: whole when it has "
            f"no more than {MAX_PAGE_SIZE} events (every parcel but one a PDA scanned "
            f"hundreds of times), else the {MAX_PAGE_SIZE} nearest this delivery, from "
            "`timeline_offset` of its `timeline_total` events; "
            "`GET /api/v1/parcels/{tracking_no}` pages through them all"
        },
    )
    timeline_offset = ma.fields.Integer(
        required=True,
        metadata={
            "description": "Where `timeline` starts in the parcel's whole timeline (0: "
            "at its first event)"
        },
    )
    timeline_total = ma.fields.Integer(
        required=True,
        metadata={
            "description": "Events in the parcel's whole timeline: `timeline` is all of "
            "it when it holds as many"
        },
    )
    rejected_events = ma.fields.Integer(
        required=True,
        metadata={
            "description": "How many events naming the parcel (however the PDA wrote its "
            "number: case, spaces, dashes) PDAs sent that the server "
            "rejected (kept in quarantine: a locker drop refused for a missing locker is "
            "another outcome a PDA tried to record), pushed at a station manager's own "
            "station (any station's for auditors and admins). "
            "`GET /api/v1/quarantine?tracking_no=` lists them, with their payloads (an "
            "auditor's read of those is audit-logged there, `quarantine_searched`)"
        },
    )
    flags = ma.fields.List(
        ma.fields.Nested(FlagRef),
        required=True,
        metadata={
            "description": "The parcel's flags (`unknown_parcel`: it was never taken "
            "in), its handover's in the delivery's shift, and any flag citing this "
            "delivery (`late_event_after_signoff`: it landed after the shift was signed "
            "off; `conflicting_duplicate`: its PDA sent it again with other content; "
            "`seq_conflict`: another event claimed its seq; `clock_jump`: its PDA's "
            "clock jumped before the push that carried it, so its time may be off; "
            "`wrong_shift`: its PDA named a shift not its own); a station manager's own "
            "station's only"
        },
    )
