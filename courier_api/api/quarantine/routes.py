from __future__ import annotations

from typing import Any

from flask.views import MethodView

from courier_api.api.base import ApiBlueprint
from courier_api.api.pagination import keyset_page
from courier_api.api.quarantine.schemas import QuarantineArgs, QuarantinePage
from courier_api.auth import current_principal
from courier_api.extensions import db
from models import Role
from sync.quarantine import list_quarantined, shown_rejection

# Who reads rejected events, here and on a shift's page (never auditors: see
# ``sync.quarantine``).
READERS = (Role.STATION_MANAGER, Role.ADMIN)

blp = ApiBlueprint(
    "quarantine", __name__, url_prefix="/api/v1/quarantine", description="Rejected events"
)


@blp.route("")
class Quarantine(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(*READERS)
    @blp.arguments(QuarantineArgs, location="query")
    @blp.response(200, QuarantinePage)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List rejected events

        Events PDAs sent that could not be accepted, newest first, each with its
        raw payload, the error code and message, and the batch it came in.
        Managers see their own station whatever `station_id` says; `tracking_no`
        lists those naming a parcel, as the PDA wrote the number or normalized
        (a drop refused for a missing compartment, of a parcel its shift counts
        as missing). A phone number in the payload, the message or the event's
        fields as the PDA sent them (`tracking_no`, `event_type`,
        `client_event_id`, `field`) is masked (no auditor reads this list).
        """
        rows = list_quarantined(
            session=db.session,
            station_id=current_principal().station_filter(args.get("station_id")),
            device_id=args.get("device_id"),
            tracking_no=args.get("tracking_no"),
            before_id=args["after"] or None,
            limit=args["limit"],
        )
        items = [{**shown_rejection(row), "batch_id": str(batch_id)} for row, batch_id in rows]
        return keyset_page(items, args["limit"], key=lambda item: item["id"])
