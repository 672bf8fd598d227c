from __future__ import annotations

from typing import Any

from flask import current_app
from flask.views import MethodView

from courier_api.api.base import ApiBlueprint
from courier_api.api.parcels.intake import count_statuses, take_in_and_commit
from courier_api.api.parcels.schemas import (
    ParcelDetail,
    ParcelIntakeRequest,
    ParcelIntakeResponse,
    TimelineArgs,
)
from courier_api.auth import current_principal, ensure_visible, record_auditor_read
from courier_api.extensions import db
from models import Parcel, Role
from sync.errors import LimitExceeded
from sync.pages import opens_shift
from sync.parcels import (
    IntakeScope,
    TimelineCursor,
    TimelineEntry,
    get_parcel,
    parcel_not_found,
    timeline_page,
)
from sync.phones import mask_phones_in_value, shown_phone
from sync.proofs import deliveries_shown

blp = ApiBlueprint("parcels", __name__, url_prefix="/api/v1/parcels", description="Parcels")


@blp.route("")
class Parcels(MethodView):
    @blp.auth(Role.STATION_MANAGER, Role.ADMIN, Role.INTEGRATION)
    @blp.arguments(ParcelIntakeRequest)
    @blp.response(200, ParcelIntakeResponse)
    @blp.alt_response(413, response="REQUEST_ENTITY_TOO_LARGE")
    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """Take in parcels

        Each item is judged on its own and gets a result at its index:
        `created`, `updated` (known parcel, changed data), `unchanged`, or
        `rejected` with an error naming the field. Each `updated` parcel goes to
        the audit log (`parcel_updated`: who, and each field from and to), and a
        flag the change closes names it in its reason. Re-sending the same items is
        safe. Tracking numbers are UPU S10 (check digit, ISO 3166-1 country, no
        reserved service indicator) or one of the configured domestic formats.
        Managers take in parcels for their own station only.
        """
        items = body["parcels"]
        limit = current_app.config["MAX_PARCELS_PER_INTAKE"]
        if len(items) > limit:
            raise LimitExceeded(
                f"{len(items)} parcels in one call; the limit is {limit}",
                limit=limit,
                unit="parcels",
                field="parcels",
            )
        principal = current_principal()
        scope = IntakeScope(
            default_station_id=principal.station_id,
            allowed_station_ids=None
            if principal.is_cross_station
            else frozenset({principal.station_id}),
        )
        rows = take_in_and_commit(
            session=db.session, items=items, scope=scope, changed_by=principal.user_id
        )
        return {"results": rows, "counts": count_statuses(rows)}


@blp.route("/<string:tracking_no>")
class ParcelByTrackingNo(MethodView):
    @blp.auth()
    @blp.arguments(TimelineArgs, location="query")
    @blp.response(200, ParcelDetail)
    @blp.alt_response(400, response="BAD_REQUEST")
    @blp.alt_response(404, response="NOT_FOUND")
    @blp.alt_response(410, response="GONE")
    @blp.alt_response(422, response="UNPROCESSABLE_ENTITY")
    def get(self, args: dict[str, Any], tracking_no: str) -> dict[str, Any]:
        """Get a parcel and its timeline

        The status is projected from the scan events, whatever order they
        arrived in. The timeline lists every event with the device's time, the
        corrected time and the time it was received, the batch it came in, and
        its UPU EMSEVT code where one applies. An event voided by a correction
        stays in the timeline, marked `voided`, and no longer counts. The
        recipient's phone number is masked for everyone but auditors; locker
        pickup codes are hidden from couriers.

        Couriers and managers read their own station's parcels; a parcel of
        another station answers what an unknown tracking number answers (404
        `parcel_not_found`), so that it does not show it exists. Admins,
        auditors and integrations read every station's.

        The timeline comes in pages of `limit` events (default and at most 500):
        a parcel's whole timeline in one when it is no longer (most are), and
        `next_cursor` null. A longer one (a PDA that scanned it thousands of
        times) gives `next_cursor`: pass it as `cursor` for the next page. The
        pages of one walk read the timeline as it was at its first page, its
        events up to `as_of` (the highest event id then, the same on every
        page), ordered, voided and folded among themselves: they add up to that
        timeline exactly, each event once, even when an event arrives meanwhile
        that moves others in the order. Events that arrived since are in no page
        of the walk: `arrived_since` counts them on each page (0: the walk is the
        timeline as it is now); read it again from the start, without a cursor,
        to see them in their place. Each page shows the parcel as the first page
        did: its `status`, `status_at`, `courier_id` and `updated_at` those of the
        walk's own events, not those of events arrived since; each entry's
        `courier_id` is as the first page read it. A cursor that is malformed or
        not of this parcel's timeline is a 400 (`cursor_malformed`); a 410
        `cursor_reset` means events the walk began without were stored below
        `as_of` (two PDAs' pushes of the parcel ending at once), or an intake
        changed the parcel's class, recipient, address, station or planned courier
        since the walk began (its message names what and when, from the intakes'
        `parcel_updated` entries), or a shift's close filed some of the walk's
        events under another courier since it began (`shift_closed_for_courier`
        on the audit log names them): start the walk again.

        An auditor's read is on the audit log (`parcel_read`), naming the
        deliveries whose proof the page shows and the page of the walk: the
        `cursor` sent, `as_of`, the page's `offset` in the walk and its
        `entries`, `arrived_since`, `next_cursor` and the `status` shown.
        """
        parcel = get_parcel(session=db.session, tracking_no=tracking_no)
        ensure_visible(parcel.station_id, parcel_not_found(tracking_no))
        principal = current_principal()
        role = principal.role
        page = timeline_page(
            session=db.session,
            tracking_no=parcel.tracking_no,
            cursor=TimelineCursor.parse(args.get("cursor")),
            limit=args["limit"],
            parcel=parcel,
        )
        # The parcel as the walk's first page showed it, as its timeline is.
        assert page.header is not None
        view = parcel_view(parcel, unmasked=role == Role.AUDITOR) | {
            "status": page.header.status,
            "status_at": page.header.status_at,
            "courier_id": page.header.courier_id,
            "updated_at": page.header.updated_at,
        }
        timeline = page.entries
        # A locker's pickup code opens the compartment: other couriers have no use for it.
        hide_codes = role == Role.COURIER
        unmasked = role == Role.AUDITOR
        visible_station = principal.station_filter(None)
        answer = {
            **view,
            "timeline": [
                timeline_view(e, hide_codes, unmasked, visible_station=visible_station)
                for e in timeline
            ],
            "as_of": page.as_of,
            "arrived_since": page.arrived_since,
            "next_cursor": None if page.next_cursor is None else str(page.next_cursor),
        }
        # Rule 7: its proofs and the unmasked phone go out logged, naming the deliveries
        # whose POD the timeline shows, as a proof's read does, and which page of which
        # walk it was: the walk's timeline is the events up to ``as_of``, and the page
        # its ``entries`` from ``offset``, so what the auditor saw can be shown again.
        # Last, the answer built: a read failing before it leaves no read on record.
        shown = deliveries_shown(e.event for e in timeline)
        record_auditor_read(
            "parcel_read",
            "parcel",
            parcel.tracking_no,
            {
                "event_ids": shown,
                "cursor": args.get("cursor") or None,
                "as_of": page.as_of,
                "offset": page.offset,
                "entries": len(timeline),
                "arrived_since": page.arrived_since,
                "next_cursor": answer["next_cursor"],
                "status": None if page.header.status is None else str(page.header.status),
            },
            principal=principal,
            tracking_no=parcel.tracking_no,
        )
        return answer


def parcel_view(parcel: Parcel, *, unmasked: bool) -> dict[str, Any]:
    return {
        "tracking_no": parcel.tracking_no,
        "service_class": parcel.service_class,
        "station_id": parcel.station_id,
        "recipient_name": parcel.recipient_name,
        "recipient_phone": shown_phone(parcel.recipient_phone, unmasked=unmasked),
        "address": parcel.address,
        "lat": parcel.lat,
        "lon": parcel.lon,
        "courier_id": parcel.courier_id,
        "status": parcel.status,
        "status_at": parcel.status_at,
        "created_at": parcel.created_at,
        "updated_at": parcel.updated_at,
    }


HIDDEN = "****"


def timeline_view(
    entry: TimelineEntry, hide_pickup_code: bool, unmasked: bool, *, visible_station: int | None
) -> dict[str, Any]:
    """``unmasked``: an auditor's; for anyone else a phone number typed into the event's
    free text (a consent's evidence, a courier's note) is masked, as the parcel's is.
    ``visible_station``: the reader's (``Principal.station_filter``); the shift an event
    is filed under is named only if they may open it, as the pages link it
    (``opens_shift``): a mis-sorted parcel's events are filed under another station's."""
    event = entry.event
    details = event.details if unmasked else mask_phones_in_value(event.details)
    if hide_pickup_code and "pickup_code" in details.get("pod", {}):
        details = {**details, "pod": {**details["pod"], "pickup_code": HIDDEN}}
    return {
        "event_id": event.id,
        "client_event_id": event.client_event_id,
        "device_id": event.device_id,
        "courier_id": event.courier_id,
        "seq": event.seq,
        "type": event.type,
        "emsevt": entry.emsevt,
        "occurred_at_device": event.occurred_at_device,
        "occurred_at": event.occurred_at,
        "received_at": event.received_at,
        "batch_id": entry.batch_id,
        "pushed_by_courier_id": entry.pushed_by,
        "shift_id": event.shift_id if opens_shift(event, visible_station) else None,
        "location": None
        if event.lat is None
        else {"lat": event.lat, "lon": event.lon, "accuracy_m": event.accuracy_m},
        "details": details,
        "voided": entry.voided_by is not None,
        "voided_by_event_id": entry.voided_by,
        "voids_event_id": entry.voids,
        "repeats_event_id": entry.repeats,
    }
