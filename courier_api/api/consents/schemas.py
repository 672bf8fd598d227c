from __future__ import annotations

import datetime as dt
from typing import Any

import marshmallow as ma

from courier_api.api.base import PageArgs
from courier_api.api.fields import After, Id, Text, UtcTime
from models import ConsentChannel, ConsentMethod, ConsentScope
from sync.consent_requests import SHOWN_STATUSES, effective_status
from sync.phones import shown_phone, shown_text


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
    address = Text(
        validate=ma.validate.Length(max=2000),
        metadata={
            "description": "standing: compared with parcels' addresses with case, "
            "punctuation, full-width forms and runs of spaces folded, and a space beside a "
            "Chinese or Japanese character ignored"
        },
    )
    station = Text(
        metadata={"description": "standing: limit it to one station (code); default all"}
    )
    method = ma.fields.Enum(
        ConsentMethod,
        by_value=True,
        metadata={"description": "Required, except when answering a request"},
    )
    point_id = Text(
        validate=ma.validate.Length(max=64),
        metadata={
            "description": "A specific locker or pickup point; default any of the method. "
            "Its id is stored and compared trimmed and upper-case (`pp-12` is `PP-12`)"
        },
    )
    channel = ma.fields.Enum(ConsentChannel, by_value=True, required=True)
    granted_at = UtcTime(
        metadata={
            "description": "When the recipient agreed. Required, except when answering a "
            "request (default: now). A time after this request arrives (a clock running "
            "ahead, by up to 5 minutes; more is a 422 `granted_in_future`) is kept as its "
            "arrival: the consent was given by then"
        }
    )
    expires_at = UtcTime(allow_none=True)
    evidence = Text(
        validate=ma.validate.Length(max=500),
        metadata={"description": "A reference to the recording, message or form"},
    )
    request_id = Id(
        metadata={
            "description": "Answer a courier's consent request (consent.requested): the "
            "parcel, method and point are the request's unless given"
        }
    )
    granted = ma.fields.Boolean(
        load_default=True,
        metadata={"description": "With request_id: false records the recipient's refusal"},
    )
    reason = Text(
        validate=ma.validate.Length(max=500),
        metadata={"description": "A refusal's reason, as the recipient gave it"},
    )
    client_consent_id = Text(
        validate=ma.validate.Length(min=1, max=64),
        metadata={
            "description": "The channel's own id for this consent (its message or call id), "
            "unique per integration account: sent again with the same consent (a retry "
            "after a lost answer), it answers the consent recorded the first time and "
            "records nothing; with another consent, 409 `client_consent_id_reused`"
        },
    )


REQUEST_CHANNELS = (ConsentChannel.SMS, ConsentChannel.APP, ConsentChannel.PHONE_CALL)


class ConsentRequestIn(ma.Schema):
    tracking_no = Text(required=True, validate=ma.validate.Length(min=1, max=40))
    method = ma.fields.Enum(ConsentMethod, by_value=True, required=True)
    point_id = Text(
        validate=ma.validate.Length(max=64),
        metadata={
            "description": "The locker or pickup point the courier proposes (stored trimmed "
            "and upper-case, as every point id)"
        },
    )
    channel = ma.fields.Enum(
        ConsentChannel,
        by_value=True,
        validate=ma.validate.OneOf(
            [ConsentChannel.SMS, ConsentChannel.APP, ConsentChannel.PHONE_CALL]
        ),
        metadata={"description": "How to ask: sms, app or phone_call (the channel decides)"},
    )
    expires_at = UtcTime(
        metadata={"description": "Default: CONSENT_REQUEST_TTL_MINUTES from now; at most 24 h"}
    )
    client_request_id = ma.fields.UUID(
        metadata={
            "description": "The PDA's own id for this request: sent again with the same "
            "request (a retry after a lost answer), it answers the request made the first "
            "time and asks the recipient nothing again; with another request, 409 "
            "`client_request_id_reused`"
        }
    )


class ConsentRequestOut(ma.Schema):
    id = ma.fields.Integer(required=True)
    station_id = ma.fields.Integer(required=True)
    tracking_no = ma.fields.String(required=True)
    courier_id = ma.fields.Integer(required=True)
    device_id = ma.fields.String(allow_none=True, required=True)
    event_id = ma.fields.Integer(
        allow_none=True, required=True, metadata={"description": "Asked on a PDA: its event"}
    )
    client_event_id = ma.fields.UUID(allow_none=True, required=True)
    client_request_id = ma.fields.UUID(
        allow_none=True,
        required=True,
        metadata={"description": "Asked online: the PDA's own id for it, if it gave one"},
    )
    method = ma.fields.Enum(ConsentMethod, by_value=True, required=True)
    point_id = ma.fields.String(allow_none=True, required=True)
    channel = ma.fields.Enum(ConsentChannel, by_value=True, allow_none=True, required=True)
    requested_at = ma.fields.AwareDateTime(required=True)
    expires_at = ma.fields.AwareDateTime(required=True)
    status = ma.fields.String(
        required=True,
        metadata={
            "description": "pending, granted, refused, expired (pending past its expiry, "
            "or granted and the consent that answered it, `consent_id`, expired since: it "
            "no longer authorizes a drop), "
            "unsent (nobody to ask: parcel not taken in, or no phone), cancelled (voided "
            "by the courier's correction), or revoked (granted, and the consent that "
            "answered it, `consent_id`, was revoked since, at `revoked_at`, or withdrawn "
            "for the parcel then by the recipient's refusal of another request)"
        },
    )
    status_reason = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={
            "description": "A refusal's, as the recipient gave it (a phone number in it "
            "is masked except for auditors); an unsent or cancelled request's cause; a "
            "revoked one's when a refusal withdrew it, naming the refused request"
        },
    )
    answered_at = ma.fields.AwareDateTime(allow_none=True, required=True)
    answered_channel = ma.fields.Enum(
        ConsentChannel,
        by_value=True,
        allow_none=True,
        required=True,
        metadata={
            "description": "How the recipient answered (the grant's or the refusal's "
            "channel); null while unanswered, or for one answered before this was kept"
        },
    )
    consent_id = ma.fields.Integer(allow_none=True, required=True)
    revoked_at = ma.fields.AwareDateTime(
        allow_none=True,
        required=True,
        metadata={
            "description": "Status revoked: when the consent that answered it was "
            "(or when the refusal that withdrew it was recorded)"
        },
    )
    not_reached = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={
            "description": "As the PDA's pull feed says it: why the question has not "
            "reached the recipient's channel (none takes consent requests at the station, "
            "its subscription is stopped, or every attempt failed so far), or, once "
            "expired, that it never did. Null when it reached the channel, or nothing "
            "says it did not"
        },
    )


class ConsentRequestListArgs(PageArgs):
    station_id = Id(metadata={"description": "Managers see their own station"})
    tracking_no = Text(validate=ma.validate.Length(max=40))
    status = ma.fields.String(
        validate=ma.validate.OneOf(SHOWN_STATUSES),
        metadata={
            "description": "As each request shows it: `pending` is still waiting, "
            "`expired` lapsed without an answer or was granted by a consent expired "
            "since, `granted` by a consent still unexpired, `revoked` was granted and its "
            "consent revoked since"
        },
    )
    after = After()


class ConsentRequestPage(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(ConsentRequestOut), required=True)
    next_after = ma.fields.Integer(allow_none=True, required=True)


class RevokeIn(ma.Schema):
    reason = Text(validate=ma.validate.Length(max=500))
    channel = ma.fields.Enum(
        ConsentChannel,
        by_value=True,
        metadata={
            "description": "How the recipient revoked it: sms, app, phone_call or "
            "in_person (optional; kept as `revoked_channel`)"
        },
    )


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
    revoked_reason = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={"description": "A phone number typed into it is masked except for auditors"},
    )
    revoked_by = ma.fields.Integer(
        allow_none=True,
        required=True,
        metadata={
            "description": "The user who revoked it (an integration's account, an admin); "
            "null if not revoked, or revoked before who did was kept"
        },
    )
    revoked_channel = ma.fields.Enum(
        ConsentChannel,
        by_value=True,
        allow_none=True,
        required=True,
        metadata={"description": "How the recipient revoked it, when the revocation said"},
    )
    evidence = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={"description": "A phone number typed into it is masked except for auditors"},
    )
    event_id = ma.fields.Integer(
        allow_none=True, required=True, metadata={"description": "Captured on a PDA: its event"}
    )
    device_id = ma.fields.String(
        allow_none=True, required=True, metadata={"description": "Captured on a PDA: that PDA"}
    )
    captured_at_station_id = ma.fields.Integer(
        allow_none=True,
        required=True,
        metadata={
            "description": "Captured on a PDA: the station that PDA belonged to then. Such a "
            "consent authorizes only that station's drops (a courier of another station "
            "cannot make this station's drop authorized); null when recorded through the API"
        },
    )
    voided = ma.fields.Boolean(
        required=True,
        metadata={
            "description": "Captured on a PDA, and the courier's later correction voided "
            "that event: it authorizes nothing"
        },
    )
    created_at = ma.fields.AwareDateTime(
        required=True, metadata={"description": "When it was recorded here"}
    )
    created_by = ma.fields.Integer(
        allow_none=True,
        required=True,
        metadata={
            "description": "The user who recorded it: the channel's integration account or "
            "an admin, or the courier whose PDA captured it (`device_id`)"
        },
    )
    client_consent_id = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={"description": "The recording channel's own id for it, if it gave one"},
    )


class ConsentListArgs(PageArgs):
    station_id = Id(metadata={"description": "Managers see their own station"})
    tracking_no = Text(metadata={"description": "The consents naming this parcel"})
    covering = Text(
        metadata={
            "description": "A tracking number: every consent that could cover that parcel, "
            "its own and the standing ones for its recipient's phone and address (what "
            "the drop rules weigh); for a station manager, of a parcel their station "
            "holds only"
        }
    )
    recipient_phone = Text(
        metadata={
            "description": "A recipient's consents: the standing ones for this phone and "
            "those of the parcels addressed to it (given through a channel or captured on "
            "a PDA). Not a station manager's (403 `role_forbidden`): they see phones "
            "masked"
        }
    )
    active = ma.fields.Boolean(
        metadata={
            "description": "Only consents in force now; with `covering`, those that "
            "authorize a drop of that parcel now by its station's PDAs, as the drop rules "
            "weigh them: not one its recipient's refusal of a request for consent "
            "withdrew for it (`refused_at`), nor one captured on another station's PDA"
        }
    )
    after = After()


class ListedConsentOut(ConsentOut):
    refused_at = ma.fields.AwareDateTime(
        allow_none=True,
        required=True,
        metadata={
            "description": "With `covering`: when the parcel's recipient refused a "
            "courier's request for consent after this consent was granted, which withdrew "
            "it for that parcel (it authorizes no drop of the parcel after then, and "
            "`active` leaves it out); null otherwise, and without `covering`"
        },
    )


class ConsentPage(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(ListedConsentOut), required=True)
    next_after = ma.fields.Integer(allow_none=True, required=True)


def consent_view(consent: Any, *, unmasked: bool, voided: bool) -> dict[str, Any]:
    view = {
        name: getattr(consent, name) for name in ConsentOut._declared_fields if name != "voided"
    }
    view["voided"] = voided
    view["recipient_phone"] = shown_phone(consent.recipient_phone, unmasked=unmasked)
    # Free text: a courier or a channel may have written the number in it.
    for name in ("evidence", "revoked_reason"):
        view[name] = shown_text(view[name], unmasked=unmasked)
    return view


class AnsweredConsentOut(ConsentOut):
    request = ma.fields.Nested(
        ConsentRequestOut,
        allow_none=True,
        required=True,
        metadata={"description": "The request this consent answers, if any"},
    )


def request_view(
    request: Any, now: dt.datetime, *, unmasked: bool, not_reached: str | None = None
) -> dict[str, Any]:
    """``unmasked``: an auditor's; for anyone else a phone number in the status's reason
    (a refusal's, as the recipient gave it) is masked. ``not_reached``: the request's
    (``sync.request_reach.not_reached``); None for an answered one."""
    view = {
        name: getattr(request, name)
        for name in ConsentRequestOut._declared_fields
        if name != "not_reached"
    }
    view["status"] = effective_status(request, now)
    view["status_reason"] = shown_text(view["status_reason"], unmasked=unmasked)
    view["not_reached"] = not_reached
    return view
