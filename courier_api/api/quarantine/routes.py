from __future__ import annotations

from typing import Any

from flask.views import MethodView

from courier_api.api.base import ApiBlueprint
from courier_api.api.pagination import cursor_or_after, page_logged, walk_page
from courier_api.api.quarantine.schemas import QuarantineArgs, QuarantinePage
from courier_api.auth import current_principal, record_auditor_read
from courier_api.extensions import db
from models import Role
from sync.paging import WalkCursor
from sync.quarantine import (
    QuarantineFilter,
    list_quarantined,
    shown_rejection,
    walk_quarantined,
)

READERS = (Role.STATION_MANAGER, Role.ADMIN, Role.AUDITOR)
# The audit log's action for an auditor's read of rejected events, here and on a shift's
# page (DESIGN.md rule 7: what an auditor reads unmasked is on record).
QUARANTINE_SEARCHED = "quarantine_searched"
FILTERS = ("station_id", "device_id", "tracking_no")  # logged with an auditor's read

blp = ApiBlueprint(
    "quarantine", __name__, url_prefix="/api/v1/quarantine", description="Rejected events"
)


@blp.route("")
class Quarantine(MethodView):
    # courier_api.database: its read holds no writers' turn (a shift page's rejected
    # events beyond its first 100 are read here at 19:00); an auditor's read is recorded
    # apart, once the rows are read, before the list goes out (``record_auditor_read``).
    READS_ONLY = True

    @blp.auth(*READERS)
    @blp.arguments(QuarantineArgs, location="query")
    @blp.response(200, QuarantinePage)
    @blp.alt_response(400, response="BAD_REQUEST")
    @blp.alt_response(410, response="GONE")
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List rejected events

        Events PDAs sent that could not be accepted, newest first, each with its
        raw payload, the error code and message, and the batch it came in: who was
        signed in on the PDA when it was pushed (`pushed_by_courier_id`, as a
        parcel's timeline names it) and the PDA's clock offset the server estimated
        for that push (`clock_offset_ms`, the PDA's clock minus the server's, by which
        the push's accepted events were given their corrected time).
        Managers see their own station whatever `station_id` says; auditors and
        admins every station's (a drop the PDA sent and the server refused is
        evidence in a dispute). `tracking_no` lists those naming a parcel (a
        drop refused for a missing compartment, of a parcel its shift counts as
        missing), by its number normalized (case, spaces, dashes): however the
        PDA wrote it (`rr 4731 2482 9gb`) and however it is asked for; each is
        shown with the number as the PDA wrote it. A phone number
        in the payload, the message or the event's fields as the PDA sent them
        (`tracking_no`, `event_type`, `client_event_id`, `field`) is masked
        except for auditors, whose read is audit-logged (`quarantine_searched`,
        with the filters given, the ids listed and the page of the walk: the
        `cursor` sent, `as_of`, the page's `offset` and `entries`, `arrived_since`
        and the `next_cursor` given; a page read with `after`: that `after` and the
        `next_after` given).

        In pages of `limit`, newest first: pass a page's `next_cursor` as `cursor`, with
        the same filters, for the next, null on the last. The pages of one walk read the
        rejected events up to `as_of` (the highest id of one when it began), each once:
        on PostgreSQL a push committing late holds an id among those already shown; the
        walk's last page counts those matching up to `as_of` and sums a mix of their ids
        (one statement) to compare them with those shown (their number and that digest,
        which the cursor carries), and answers a 410 `cursor_reset`, list again, when
        they differ, so a walk ending with `next_cursor` null held every matching
        rejected event up to `as_of` committed before its last page was read. Those
        stored since it began are counted (`arrived_since`). A malformed cursor, or one
        sent with other filters, is a 400 `cursor_malformed`. `after` (a page's
        `next_after`) is deprecated: such a page is read by id as before and can miss a
        rejected event committed late (`as_of`, `arrived_since` and `next_cursor` null);
        with `cursor` it is a 422 `cursor_and_after`.
        """
        principal = current_principal()
        filters = QuarantineFilter(
            station_id=principal.station_filter(args.get("station_id")),
            device_id=args.get("device_id"),
            tracking_no=args.get("tracking_no"),
        )
        sent = args.get("cursor") or None
        cursor_or_after(sent, args["after"])
        walk = None
        if args["after"]:  # deprecated: a page by id, which can miss a late commit
            rows = list_quarantined(
                session=db.session,
                station_id=filters.station_id,
                device_id=filters.device_id,
                tracking_no=filters.tracking_no,
                before_id=args["after"],
                limit=args["limit"],
            )
        else:
            walk = walk_quarantined(
                session=db.session,
                filters=filters,
                cursor=WalkCursor.parse(sent),
                limit=args["limit"],
            )
            rows = walk.rows
        unmasked = principal.role == Role.AUDITOR
        items = [
            {
                **shown_rejection(row, unmasked=unmasked),
                "batch_id": str(pushed.batch_id),
                "pushed_by_courier_id": pushed.courier_id,
                "clock_offset_ms": pushed.clock_offset_ms,
            }
            for row, pushed in rows
        ]
        page = walk_page(items, args["limit"], key=lambda item: item["id"], walk=walk)
        # Which page of which walk it was, as a proof search's entry says (a page read
        # by ``after`` says so).
        paging = page_logged(page, walk, sent, args["after"])
        # The parcels the rejected events shown name, as a proof search is filed under
        # the parcels of the proofs it showed: a search by PDA or station is in each
        # one's history (``GET /audit?tracking_no=``), not only a search by its number.
        parcels = sorted({row.parcel_tracking_no for row, _ in rows if row.parcel_tracking_no})
        # Last, the answer built: a read failing before it leaves no read on record.
        record_auditor_read(
            QUARANTINE_SEARCHED,
            "quarantined_event",
            "search",
            {
                **{k: args[k] for k in FILTERS if args.get(k) is not None},
                "ids": [item["id"] for item in items],
                **paging,
            },
            principal=principal,
            tracking_no=args.get("tracking_no"),  # a search of one parcel's rejected events
            parcels=parcels,
        )
        return page
