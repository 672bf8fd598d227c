from __future__ import annotations

from typing import Any

from flask.views import MethodView

from courier_api.api.base import ApiBlueprint
from courier_api.api.pagination import keyset_page
from courier_api.api.quarantine.schemas import QuarantineArgs, QuarantinePage
from courier_api.auth import current_principal
from courier_api.extensions import db
from models import Role
from sync.phones import mask_phones_in, mask_phones_in_json, shown_text
from sync.quarantine import list_quarantined

blp = ApiBlueprint(
    "quarantine", __name__, url_prefix="/api/v1/quarantine", description="Rejected events"
)


@blp.route("")
class Quarantine(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(Role.STATION_MANAGER, Role.ADMIN)
    @blp.arguments(QuarantineArgs, location="query")
    @blp.response(200, QuarantinePage)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List rejected events

        Events PDAs sent that could not be accepted, newest first, each with its
        raw payload, the error code and message, and the batch it came in.
        Managers see their own station whatever `station_id` says. A phone number
        in the payload, the message or the event's fields as the PDA sent them
        (`tracking_no`, `event_type`, `client_event_id`, `field`) is masked (no
        auditor reads this list).
        """
        rows = list_quarantined(
            session=db.session,
            station_id=current_principal().station_filter(args.get("station_id")),
            device_id=args.get("device_id"),
            before_id=args["after"] or None,
            limit=args["limit"],
        )
        # No auditor reads it: a phone number in what the PDA sent (a consent's
        # evidence), or echoed in the error, is masked as everywhere else (rule 7). The
        # payload is ASCII JSON: its strings are masked as typed, not as escaped.
        # So are the event's own fields as the PDA sent them (a number typed into the
        # tracking number field), as they are in the payload next to them.
        items = [
            {
                **{c: getattr(row, c) for c in QUARANTINE_COLUMNS},
                **{c: shown_text(getattr(row, c), unmasked=False) for c in SENT_BY_THE_PDA},
                "payload": mask_phones_in_json(row.payload),
                "message": mask_phones_in(row.message),
                "batch_id": str(batch_id),
            }
            for row, batch_id in rows
        ]
        return keyset_page(items, args["limit"], key=lambda item: item["id"])


QUARANTINE_COLUMNS = (
    "id",
    "station_id",
    "device_id",
    "position",
    "client_event_id",
    "seq",
    "event_type",
    "tracking_no",
    "error_code",
    "message",
    "field",
    "payload",
    "received_at",
)
# Copied from the rejected event as the PDA sent it (or named after a key it sent).
SENT_BY_THE_PDA = ("client_event_id", "event_type", "tracking_no", "field")
