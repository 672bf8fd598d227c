from __future__ import annotations

from typing import Any

from flask import current_app
from flask.views import MethodView

from courier_api.api.base import ApiBlueprint
from courier_api.api.parcels.intake import count_statuses, take_in_and_commit
from courier_api.api.parcels.schemas import ParcelIntakeRequest, ParcelIntakeResponse, ParcelOut
from courier_api.auth import current_principal, ensure_station_access
from courier_api.extensions import db
from models import Parcel, Role
from sync.errors import LimitExceeded
from sync.parcels import IntakeScope, get_parcel
from sync.phones import mask_phone

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
        `rejected` with an error naming the field. Re-sending the same items is
        safe. Tracking numbers are UPU S10 (check digit, ISO 3166-1 country, no
        reserved service indicator) or one of the configured domestic formats.
        Managers take in parcels for their own station only.
        """
        items = body["parcels"]
        limit = current_app.config["MAX_PARCELS_PER_INTAKE"]
        if len(items) > limit:
            raise LimitExceeded(
                f"{len(items)} parcels in one call; the limit is {limit}", field="parcels"
            )
        principal = current_principal()
        scope = IntakeScope(
            default_station_id=principal.station_id,
            allowed_station_ids=None
            if principal.is_cross_station
            else frozenset({principal.station_id}),
        )
        rows = take_in_and_commit(session=db.session, items=items, scope=scope)
        return {"results": rows, "counts": count_statuses(rows)}


@blp.route("/<string:tracking_no>")
class ParcelByTrackingNo(MethodView):
    @blp.auth()
    @blp.response(200, ParcelOut)
    @blp.alt_response(404, response="NOT_FOUND")
    def get(self, tracking_no: str) -> dict[str, Any]:
        """Get a parcel

        The recipient's phone number is masked for everyone but auditors.
        """
        parcel = get_parcel(session=db.session, tracking_no=tracking_no)
        ensure_station_access(parcel.station_id)
        return parcel_view(parcel, unmasked=current_principal().role == Role.AUDITOR)


def parcel_view(parcel: Parcel, *, unmasked: bool) -> dict[str, Any]:
    return {
        "tracking_no": parcel.tracking_no,
        "service_class": parcel.service_class,
        "station_id": parcel.station_id,
        "recipient_name": parcel.recipient_name,
        "recipient_phone": parcel.recipient_phone
        if unmasked
        else mask_phone(parcel.recipient_phone),
        "address": parcel.address,
        "lat": parcel.lat,
        "lon": parcel.lon,
        "created_at": parcel.created_at,
        "updated_at": parcel.updated_at,
    }
