from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask.views import MethodView

from courier_api.api.base import ApiBlueprint
from courier_api.api.flags.schemas import (
    AcknowledgeIn,
    FlagChangeOut,
    FlagDetailOut,
    FlagListArgs,
    FlagOut,
    FlagPage,
    ResolveIn,
)
from courier_api.api.pagination import cursor_or_after, keyset_page
from courier_api.auth import current_principal, ensure_visible
from courier_api.extensions import db
from models import Flag, Role
from sync import flags
from sync.phones import shown_text

blp = ApiBlueprint(
    "flags", __name__, url_prefix="/api/v1/flags", description="Discrepancies and violations"
)
READERS = (Role.ADMIN, Role.STATION_MANAGER, Role.AUDITOR)
DECIDERS = (Role.ADMIN, Role.STATION_MANAGER)


@blp.route("")
class Flags(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(*READERS)
    @blp.arguments(FlagListArgs, location="query")
    @blp.response(200, FlagPage)
    @blp.alt_response(400, response="BAD_REQUEST")
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List flags

        Flags matching every filter given, latest opened first (`opened_at`,
        then id): a flag opened again, its cause back or raised again on more
        than a manager's decision covered, is listed with the new ones, not where
        it was first raised. Pass a page's `next_cursor` as `cursor` for the next
        page: it goes on below where the page's last flag stood when listed, so a
        walk lists each flag once though one is opened again meanwhile (at the top
        then, where a walk begun again finds it); a malformed cursor is a 400
        `cursor_malformed`, one sent with `after` a 422 `cursor_and_after`.
        A flag is listed where it was opened, when the push raising it (or opening
        it again) stored it, and the push may commit after a page went past that
        place: the walk's last page counts again how often the flags its filters
        take in (whatever their status and courier) were raised or opened again in
        the 10 minutes before it began, as its first page counted them, and answers
        a 410 `cursor_reset` when more: list again from the start. So a walk ending
        with `next_cursor` null listed every flag matching its filters opened up to
        where it began and committed before its last page was read, within 10
        minutes of being stored (but one opened again after it began, at the top,
        and one whose status or courier came to match after its place was passed).
        `after` (a page's `next_after`) goes on from where its flag stands now: the
        last flag shown opened again, the next page lists again flags shown.
        `waiting=true` lists those still waiting for a decision, open or
        acknowledged, as a board row's `open_flags` counts them.
        `kind` is a kind's code (`unauthorized_locker_drop`); an
        unknown one is a 422 naming the kinds. `raised_from` is inclusive,
        `raised_to` exclusive; both
        need an offset (e.g. `Z`). `shift_id` finds a shift's own flags; a
        parcel's rule flags name no shift (`GET /shifts/{shift_id}/balance`
        lists those citing the shift's events). `tracking_no` finds a parcel's
        flags, its own and its handovers' in every shift: a lost parcel's, which
        no proof lists; and, as a proof lists them, those of its held events and
        of its shifts and PDAs citing its scans or rejected events (a shift's
        `late_event_after_signoff`, a PDA's `clock_jump` or `wrong_shift`).
        Managers see their own station whatever `station_id` says (another
        station's shift has no flags for them); admins and auditors see every station.
        """
        sent = args.get("cursor") or None
        cursor_or_after(sent, args["after"])
        walk = flags.walk_flags(
            session=db.session,
            station_id=current_principal().station_filter(args.get("station_id")),
            kind=args.get("kind"),
            severity=args.get("severity"),
            status=args.get("status"),
            standing=args["standing"],
            waiting=args["waiting"],
            courier_id=args.get("courier_id"),
            shift_id=args.get("shift_id"),
            tracking_no=args.get("tracking_no"),
            raised_from=args.get("raised_from"),
            raised_to=args.get("raised_to"),
            after_id=args["after"],
            cursor=flags.FlagCursor.parse(sent),
            limit=args["limit"],
        )
        page = keyset_page(
            [_view(flag) for flag in walk.items], args["limit"], key=lambda f: f["id"]
        )
        after = walk.next_cursor
        return {**page, "next_cursor": None if after is None else str(after)}


@blp.route("/<id:flag_id>")
class FlagById(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(*READERS)
    @blp.response(200, FlagDetailOut)
    @blp.alt_response(404, response="NOT_FOUND")
    def get(self, flag_id: int) -> dict[str, Any]:
        """Get a flag with its history

        `changes` lists every status change, oldest first: who made it (`null`
        for the system, e.g. when the flag was raised or its cause went away)
        and their note. Managers read their station's flags; one of another
        station answers what an unknown id answers (404 `flag_not_found`), so
        that it does not show it exists.
        """
        flag = flags.get_flag(session=db.session, flag_id=flag_id)
        ensure_visible(flag.station_id, flags.flag_not_found(flag_id))
        return _with_history(flag)


@blp.route("/<id:flag_id>/acknowledge")
class AcknowledgeFlag(MethodView):
    @blp.auth(*DECIDERS)
    @blp.arguments(AcknowledgeIn)
    @blp.response(200, FlagDetailOut)
    @blp.alt_response(404, response="NOT_FOUND")
    @blp.alt_response(409, response="CONFLICT")
    def post(self, body: dict[str, Any], flag_id: int) -> dict[str, Any]:
        """Acknowledge a flag

        Says that a manager of the flag's station has seen it and is dealing with
        it; the optional `note` goes into its history, and the acknowledgement, with
        what it covers (`decided_on`), into the audit log (`flag_acknowledged`).
        Only an open flag can be acknowledged (409 `flag_status_conflict`
        otherwise), but the same request sent again after its answer was lost (the
        same manager, `note` and `evidence_version`, the flag still as it left it) is
        answered as the first time and writes nothing. With
        `evidence_version` (the flag's as the manager read it), a flag whose
        evidence changed since, a push landing in between, is refused (409
        `evidence_changed`): read it again. A flag of another station answers a
        manager what an unknown id answers (404 `flag_not_found`).
        """
        return _decided(flag_id, body, flags.acknowledge_flag)


@blp.route("/<id:flag_id>/resolve")
class ResolveFlag(MethodView):
    @blp.auth(*DECIDERS)
    @blp.arguments(ResolveIn)
    @blp.response(200, FlagDetailOut)
    @blp.alt_response(404, response="NOT_FOUND")
    @blp.alt_response(409, response="CONFLICT")
    def post(self, body: dict[str, Any], flag_id: int) -> dict[str, Any]:
        """Resolve a flag

        A manager of the flag's station (or an admin) settles an open or
        acknowledged flag; the `note` saying how is required. The resolution is
        recorded in the flag's history and in the audit log (`flag_resolved`, with
        what it covers, `decided_on`, and the `evidence_version` it was made on). A
        flag that is already resolved, or that the system closed because its cause
        went away, cannot be resolved (409 `flag_status_conflict`), except by the
        same request sent again after its answer was lost (the same manager, `note`
        and `evidence_version`, the flag still as it left it): answered as the first
        time, nothing written. The resolution covers what the flag's evidence names
        (its events, seqs, missing images, a PDA's silence; found again on more, the
        flag opens again): with
        `evidence_version` (the flag's as the manager read it), a flag whose
        evidence changed since, a push landing in between, is refused (409
        `evidence_changed`): read it again. A flag of another station answers a
        manager what an unknown id answers (404 `flag_not_found`).
        """
        return _decided(flag_id, body, flags.resolve_flag)


def _decided(flag_id: int, body: dict[str, Any], decide: Callable[..., Flag]) -> dict[str, Any]:
    """``decide`` (``flags.acknowledge_flag`` or ``flags.resolve_flag``) taken by the
    caller on a flag of their station with the note and ``evidence_version`` sent,
    committed; the flag answered with its history."""
    flag = flags.get_flag(session=db.session, flag_id=flag_id)
    ensure_visible(flag.station_id, flags.flag_not_found(flag_id))
    flag = decide(
        session=db.session,
        flag=flag,
        user_id=current_principal().user_id,
        note=body["note"],
        seen_version=body["evidence_version"],
    )
    db.session.commit()
    return _with_history(flag)


def _with_history(flag: Flag) -> dict[str, Any]:
    """The flag and its history as the caller may read it: a manager's note may hold the
    recipient's phone number they called, masked for all but auditors (rule 7)."""
    unmasked = current_principal().role == Role.AUDITOR
    changes = [
        {name: getattr(change, name) for name in FlagChangeOut._declared_fields}
        | {"note": shown_text(change.note, unmasked=unmasked)}
        for change in flags.flag_changes(session=db.session, flag=flag)
    ]
    return _view(flag) | {"changes": changes}


# What ``FlagOut`` shows of a flag's row as it is; ``_view`` adds what it computes.
COLUMNS = tuple(name for name in FlagOut._declared_fields if name != "evidence_version")


def _view(flag: Flag) -> dict[str, Any]:
    """``FlagOut``: the flag's columns, and the ``evidence_version`` a decision sends back."""
    return {name: getattr(flag, name) for name in COLUMNS} | {
        "evidence_version": flags.evidence_version(flag.evidence)
    }
