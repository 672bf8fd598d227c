from __future__ import annotations

from typing import Any

from flask import current_app
from flask.views import MethodView

from courier_api.api.base import ApiBlueprint
from courier_api.api.pagination import keyset_page
from courier_api.api.shifts.schemas import (
    BalanceOut,
    BoardArgs,
    BoardOut,
    CloseShiftIn,
    OpenShiftIn,
    ShiftDetailOut,
    ShiftListArgs,
    ShiftOut,
    ShiftPage,
    SignOffCleanIn,
    SignOffCleanOut,
    SignOffIn,
    shift_view,
)
from courier_api.auth import Principal, current_principal, ensure_station_access, ensure_visible
from courier_api.config import policy_of, shift_rules_of
from courier_api.extensions import db
from models import Device, Role, Shift, utcnow
from sync import directory, shifts, signoffs
from sync.balances import (
    board_totals,
    changed_since_signoff,
    signed_off_version,
    station_board,
    waiting_from_earlier_days,
    where_couriers_went,
)
from sync.errors import PermissionDenied
from sync.handover import HANDOVER_KINDS, balance_version
from sync.pages import handover_scans_elsewhere, user_ref, where_courier_went, write_offs_named
from sync.phones import shown_text

blp = ApiBlueprint(
    "shifts", __name__, url_prefix="/api/v1", description="Shifts, handover balance, sign-off"
)
READERS = (Role.COURIER, Role.STATION_MANAGER, Role.ADMIN, Role.AUDITOR)
MANAGERS = (Role.STATION_MANAGER, Role.ADMIN)


@blp.route("/shifts")
class Shifts(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(Role.COURIER)
    @blp.arguments(OpenShiftIn)
    @blp.response(201, ShiftOut)
    @blp.alt_response(409, response="CONFLICT")
    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """Open a shift

        For the PDA the courier signed in with, at the station, before the day's
        check-outs. One shift may be open per PDA (409 `shift_already_open`:
        the courier's own is theirs to go on with, or to close at the handover; another
        courier's, left open, a manager's, and the message says which). A PDA that
        lost its storage finds its open shift with `GET /shifts?status=open&device_id=`.
        Scan events are filed under the shift the PDA names in `shift_id`, or
        else under the shift the PDA had open when they happened. Declaring
        `first_seq` (and `last_seq` when closing) lets the server tell which
        missing sequence numbers hold this shift's events; a `first_seq` the
        server already holds events at, or that an earlier shift declared used (up to
        its `last_seq`, or before its `first_seq`), is a 409 `first_seq_used`, except
        events the courier's previous shift (closed without its `last_seq`) holds only
        because they came just after its close: the opening takes those. The sign-in's
        `device_max_seq` + 1 is never used. A PDA an admin moved to another station
        while the opening waited for it is a 409 `device_moved`: sign in again there.
        """
        principal = current_principal()
        device = db.session.get(Device, principal.device_id)
        assert device is not None  # the token's device was checked when it was verified
        shift = shifts.open_shift(
            session=db.session,
            device=device,
            courier_id=principal.user_id,
            rules=shift_rules_of(current_app.config),
            planned_end_at=body["planned_end_at"],
            first_seq=body["first_seq"],
            now=utcnow(),
        )
        db.session.commit()
        return _view(shift)

    @blp.auth(*READERS)
    @blp.arguments(ShiftListArgs, location="query")
    @blp.response(200, ShiftPage)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List shifts

        Oldest first, filtered by station, local date, status, courier or PDA.
        Couriers see their own shifts, managers their station's, admins and
        auditors every station's.
        """
        principal = current_principal()
        items = shifts.list_shifts(
            session=db.session,
            station_id=principal.station_filter(args.get("station_id")),
            work_date=args.get("date"),
            status=args.get("status"),
            courier_id=principal.user_id
            if principal.role == Role.COURIER
            else args.get("courier_id"),
            device_id=args.get("device_id"),
            after_id=args["after"],
            limit=args["limit"],
        )
        return keyset_page([_view(s) for s in items], args["limit"], key=lambda s: s["id"])


@blp.route("/shifts/<id:shift_id>")
class ShiftById(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(*READERS)
    @blp.response(200, ShiftDetailOut)
    @blp.alt_response(404, response="NOT_FOUND")
    def get(self, shift_id: int) -> dict[str, Any]:
        """Get a shift

        Couriers read their own shifts (a colleague's is a 403 `not_your_shift`),
        managers their station's; a shift of another station answers what an
        unknown id answers (404 `shift_not_found`), so that it does not show it
        exists. Admins and auditors read every station's. A shift still open names,
        as its board row and its page do, the shift its courier handed over since on
        another PDA (`courier_back_shift_id`: a PDA that died, the courier back with a
        spare one, this one to close) and their other shifts still open on another PDA
        (`courier_also_open_shift_ids`).
        """
        shift = _readable(shift_id)
        return {**_view(shift), **_courier_went(shift)}


@blp.route("/shifts/<id:shift_id>/close")
class CloseShift(MethodView):
    @blp.auth(Role.COURIER, *MANAGERS)
    @blp.arguments(CloseShiftIn)
    @blp.response(200, ShiftOut)
    @blp.alt_response(404, response="NOT_FOUND")
    @blp.alt_response(409, response="CONFLICT")
    def post(self, body: dict[str, Any], shift_id: int) -> dict[str, Any]:
        """Close a shift (归班交接)

        The courier is back at the station and hands over: from now on a parcel
        checked out in this shift with no final outcome is missing, and flagged
        `missing_at_handover`. Closed by the shift's own courier from the PDA it
        was opened on, or by a manager of the station (a PDA that died, a shift
        left open when the PDA was handed to another courier). Closing a closed
        shift again answers the shift as it is (a retry), unless it names another
        `last_seq` (409 `shift_already_closed`). A shift closed without a
        `last_seq` (a manager closed it while the PDA was out of range) takes the
        one its courier's PDA declares afterwards, until it is signed off (reopened
        since or not) or the PDA opens its next shift: the events recorded up to it,
        returns scanned at the counter after that close too, are the shift's (audit-logged as
        `shift_last_seq_declared` when someone else closed it). A colleague's shift is a 403
        `not_your_shift`, even on the PDA it was opened on; a shift of another
        station answers, to a courier or a manager, what an unknown id answers
        (404 `shift_not_found`). A manager's or an admin's close is on the audit
        log (`shift_closed_for_courier`: who, the `last_seq` given, the seq the
        server held from the PDA then and the events the close took from under no
        shift); the courier's own close from the PDA, like the PDA's events, is not.
        """
        principal = current_principal()
        shift = shifts.get_shift(session=db.session, shift_id=shift_id)
        if principal.role == Role.COURIER:
            if shift.device_id != principal.device_id or shift.courier_id != principal.user_id:
                raise _not_your_shift(shift, principal, _who_closes(shift, principal))
        else:
            ensure_visible(shift.station_id, shifts.shift_not_found(shift_id))
        shift = shifts.close_shift(
            session=db.session,
            shift=shift,
            closed_by=principal.user_id,
            last_seq=body["last_seq"],
            now=utcnow(),
            policy=policy_of(current_app.config),
        )
        db.session.commit()
        return _view(shift)


@blp.route("/shifts/<id:shift_id>/balance")
class ShiftBalance(MethodView):
    READS_ONLY = True  # courier_api.database: no wait for SQLite's writers

    @blp.auth(*READERS)
    @blp.response(200, BalanceOut)
    @blp.alt_response(404, response="NOT_FOUND")
    def get(self, shift_id: int) -> dict[str, Any]:
        """Get a shift's handover balance

        Computed from the events filed under the shift, never typed in:
        `checked_out = delivered + delivered_without_pod + unattended +
        unattended_without_consent + returned + missing`, each parcel's
        outcome, and the discrepancies with their flags and the events that are
        their evidence. `status` is `provisional` while sequence numbers the
        shift may own are still on the PDA (`missing_seqs` names them),
        `unbalanced` while anything is missing or a discrepancy stands (a flag
        resolved by a manager still stands: it is a fact about the events), and
        `balanced` otherwise. While the shift is open, `missing` counts the
        parcels still out. A signed-off shift's balance can still change without
        an event of its own (a consent that arrived later authorizes a drop):
        `changed_since_signoff` then says so, and `signed_off_version` is the
        `version` it was signed off with. Who may read it: as for the shift (a
        shift of another station is a 404 `shift_not_found` to couriers and
        managers). A write-off's `written_off_by_name` is null to a station's
        reader when whoever wrote the seqs off is now another station's user.
        A parcel missing at handover, or off the manifest, lists with its
        discrepancy its check-outs and final outcomes filed under the station's
        other shifts (`elsewhere`, as the shift's page does): a courier whose PDA
        died went on with a spare one, and the "missing" parcel was delivered under
        that shift (to a courier, only their own scans). With it,
        what the board row gives beside the balance and a sign-off may send back
        to prove what was read: the flags naming the shift still waiting
        (`open_flags`), its PDA's events rejected (`rejected_events`) and its proof
        images missing (`images_missing`), counted as the board row counts them. A
        shift still open names, as its board row and its page do, the shift its courier
        handed over since on another PDA (`courier_back_shift_id`: a PDA that died, the
        courier back with a spare one, this one to close) and their other shifts still
        open on another PDA (`courier_also_open_shift_ids`).
        """
        shift = _readable(shift_id)
        read = signoffs.handover_seen(db.session, shift)
        balance = read.balance
        principal = current_principal()
        unmasked = principal.role == Role.AUDITOR
        write_offs = write_offs_named(
            db.session, balance.write_offs, principal.station_filter(None)
        )
        elsewhere = handover_scans_elsewhere(
            db.session,
            shift,
            balance,
            courier_id=principal.user_id if principal.role == Role.COURIER else None,
        )
        return {
            **balance.summary(),
            **vars(balance),
            "discrepancies": [
                {**vars(d), "elsewhere": elsewhere.get(d.tracking_no, [])}
                if d.kind in HANDOVER_KINDS
                else {**vars(d), "elsewhere": []}
                for d in balance.discrepancies
            ],
            "open_flags": [flag._asdict() for flag in read.open_flags],
            "rejected_events": read.rejected_events,
            "images_missing": read.images_missing,
            # A phone typed into a write-off's reason: whole for auditors only (rule 7).
            "write_offs": [
                w._replace(reason=shown_text(w.reason, unmasked=unmasked)) for w in write_offs
            ],
            "shift_status": shift.status,
            "version": balance_version(balance),
            "signed_off_version": signed_off_version(shift, balance),
            "changed_since_signoff": changed_since_signoff(shift, balance),
            **_courier_went(shift),
        }


@blp.route("/shifts/<id:shift_id>/signoff")
class SignOff(MethodView):
    @blp.auth(*MANAGERS)
    @blp.arguments(SignOffIn)
    @blp.response(200, ShiftOut)
    @blp.alt_response(404, response="NOT_FOUND")
    @blp.alt_response(409, response="CONFLICT")
    def post(self, body: dict[str, Any], shift_id: int) -> dict[str, Any]:
        """Sign a shift's handover off

        A manager of the station (or an admin) signs off a closed shift with a
        note; the balance as it stands is kept with the sign-off and written to
        the audit log. Refused while the shift is open (409 `shift_open`; its
        message says, as the station's sign-off together does, when its courier
        is back from a shift handed over since on another PDA: the PDA died, and
        the manager closes this one), and while its balance is provisional (409
        `balance_provisional`, naming the missing seqs) unless `force_reason`
        says why it cannot wait. With `balance_version` (the balance's `version`
        as the manager read it), a balance that changed since, a push landing
        in between, is refused (409 `balance_changed`): read it again. So, with `rejected_events`,
        `open_flags` and `images_missing` (the board row's or the balance's: its
        PDA's events rejected, which the balance cannot show, the ids of the flags
        naming it still waiting, and its proof images missing), is one whose PDA
        had another event rejected since (409 `rejected_events_changed`), whose
        flags were raised or decided since (409 `open_flags_changed`, naming them)
        or with more proof images missing now (409 `images_missing_changed`; fewer
        is an image uploaded since): the check the sign-off of clean handovers
        together makes. Each is optional, and not compared when left
        out. The same sign-off sent again (its
        answer lost: the same manager, `note`, `force_reason` and `balance_version`)
        is answered with the shift and writes nothing; another sign-off of a
        signed-off shift is refused (409 `already_signed_off`, saying by whom and
        when). A `force_reason` is kept only when the balance needed forcing: sent
        again with a reason where the sign-off kept none (or with another reason),
        it is another sign-off, refused so. An event
        that lands after the sign-off reopens the shift (it goes back to
        `closed`) and raises `late_event_after_signoff`; so does one rejected
        after it that is the shift's (one of its seqs, or without a valid seq
        naming one of its parcels: those its page lists), cited in the flag's
        `rejected_event_ids`. A shift of another
        station answers a manager what an unknown id answers (404
        `shift_not_found`).
        """
        shift = shifts.get_shift(session=db.session, shift_id=shift_id)
        ensure_visible(shift.station_id, shifts.shift_not_found(shift_id))
        shift = shifts.sign_off(
            session=db.session,
            shift=shift,
            user_id=current_principal().user_id,
            note=body["note"],
            force_reason=body["force_reason"],
            seen_version=body["balance_version"],
            seen_rejected_events=body["rejected_events"],
            seen_open_flags=body["open_flags"],
            seen_images_missing=body["images_missing"],
            now=utcnow(),
        )
        db.session.commit()
        return _view(shift)


@blp.route("/stations/<id:station_id>/signoffs")
class CleanSignOffs(MethodView):
    @blp.auth(*MANAGERS)
    @blp.arguments(SignOffCleanIn)
    @blp.response(200, SignOffCleanOut)
    @blp.alt_response(404, response="NOT_FOUND")
    def post(self, body: dict[str, Any], station_id: int) -> dict[str, Any]:
        """Sign off the station's clean handovers together

        For the evening's many shifts that need no other word: each shift named,
        with the `balance_version` its board row showed (`GET
        /stations/{station_id}/handover`), is signed off with the one `note` when
        it is closed, balanced, has no event of its PDA rejected (the row's
        `rejected_events`), no flag of its own open or acknowledged, no corrected
        outcome of its parcels still open for review (the row's
        `corrections_to_review`), every proof image uploaded, and its balance has
        not changed since it was read. Any other is refused with its reason
        (`code`, and a `message` naming what to look at: each discrepancy's parcels
        by kind, the seqs still on the PDA, the flags' kinds, the balance as it
        stands now) and left for a sign-off of its own (`POST
        /shifts/{shift_id}/signoff`), where an unbalanced or provisional handover
        gets a note about it; the rest are signed off all the same. Each sign-off
        goes to the audit log as a single one does. The same request sent again (its
        answer lost: the same manager, `note` and versions) is answered as the first
        time and writes nothing; a shift signed off otherwise (by another manager,
        with another note) is refused as `already_signed_off`, saying by whom and
        when. A shift of another
        station is refused as `shift_not_found`. With `discrepancies_decided`, a
        shift unbalanced only by discrepancies a manager has each resolved (the
        board row's `discrepancies_decided`) is signed off too, clean in all else;
        one with any still open or acknowledged is refused as
        `discrepancies_to_decide`.
        """
        ensure_station_access(station_id)
        directory.get_station(session=db.session, station_id=station_id)
        outcomes = signoffs.sign_off_clean(
            session=db.session,
            station_id=station_id,
            seen={item["shift_id"]: item["balance_version"] for item in body["shifts"]},
            user_id=current_principal().user_id,
            note=body["note"],
            now=utcnow(),
            decided=body["discrepancies_decided"],
        )
        db.session.commit()
        return {
            "signed_off": sum(o.outcome == signoffs.SIGNED_OFF for o in outcomes),
            "refused": sum(o.outcome == signoffs.REFUSED for o in outcomes),
            "outcomes": outcomes,
        }


@blp.route("/stations/<id:station_id>/handover")
class StationHandover(MethodView):
    READS_ONLY = True  # courier_api.database: the board at 19:00 holds up no push

    @blp.auth(Role.STATION_MANAGER, Role.ADMIN, Role.AUDITOR)
    @blp.arguments(BoardArgs, location="query")
    @blp.response(200, BoardOut)
    @blp.alt_response(404, response="NOT_FOUND")
    def get(self, args: dict[str, Any], station_id: int) -> dict[str, Any]:
        """The station's handover board for a day

        Every shift that opened on the station's local `date` (default: today
        there), oldest first, with its courier, its state and its balance
        counts, and the day's totals. A shift that late events reopened after
        its sign-off is `closed` again, with `reopened_count` and `reopened_at`;
        its `signed_off_at` is then the superseded sign-off's. In the totals a
        shift still open counts as `open` and under no balance status, and its
        parcels without an outcome as `still_out`, not `missing`: the balance
        totals are the handovers. Each row names the flags naming the shift still
        open or acknowledged (`open_flags`), as `GET /flags?shift_id=&waiting=true`
        lists them: its own (proof images missing at handover, say), which its
        balance does not count, and its handover flags still to decide; the totals
        count such shifts (`with_open_flags`); a handed-over row counts its PDA's events the
        server rejected (`rejected_events`), which its balance cannot show, and its
        parcels' corrected outcomes no manager has looked at yet
        (`corrections_to_review`: `correction_review`, `correction_by_another_courier`
        flags citing its events, still open), which it balances as corrected. A
        shift still open whose courier has handed over a later shift on another
        PDA names it (`courier_back_shift_id`): the courier is back, the shift
        theirs to close; one whose courier has another shift still open on
        another PDA names those (`courier_also_open_shift_ids`): a second shift is
        not refused (a PDA that died), but one of them is likely no longer used.
        Both are named as `GET /shifts/{shift_id}` names them, from the courier's
        shifts of any day: a past day's board says the courier is back from a spare
        PDA's shift handed over the day after. Shifts of the two weeks before that
        still wait for the manager (open, or handed over and not signed off) are
        listed apart (`earlier_waiting`), with the same two hints. Read in the same
        few queries however many shifts the station runs. A courier who is now
        another station's user is given to a station's manager by id only
        (`username`, `full_name` null).
        """
        ensure_station_access(station_id)
        station = directory.get_station(session=db.session, station_id=station_id)
        day = args["date"] or shifts.local_date(utcnow(), station.timezone)
        rows = station_board(session=db.session, station_id=station_id, work_date=day)
        visible = current_principal().station_filter(None)
        before = waiting_from_earlier_days(
            session=db.session, station_id=station_id, work_date=day
        )
        went = where_couriers_went(
            db.session, station_id, [*(row.shift for row in rows), *(s for s, _ in before.shifts)]
        )
        back, also = went.back, went.also_open
        return {
            "station_id": station_id,
            "date": day,
            "shifts": [
                {
                    "shift_id": row.shift.id,
                    "courier": user_ref(row.courier, visible),
                    "device_id": row.shift.device_id,
                    "shift_status": row.shift.status,
                    "opened_at": row.shift.opened_at,
                    "opened_day_offset": shifts.days_from(
                        day, row.shift.opened_at, station.timezone
                    ),
                    "planned_end_at": row.shift.planned_end_at,
                    "closed_at": row.shift.closed_at,
                    "closed_day_offset": (
                        shifts.days_from(day, row.shift.closed_at, station.timezone)
                        if row.shift.closed_at
                        else None
                    ),
                    "signed_off_at": row.shift.signed_off_at,
                    "reopened_count": row.shift.reopened_count,
                    "reopened_at": row.shift.reopened_at,
                    "changed_since_signoff": row.changed_since_signoff,
                    "balance": row.balance.summary(),
                    "balance_version": row.balance_version,
                    "open_flag_count": len(row.open_flags),
                    "open_flags": [flag._asdict() for flag in row.open_flags],
                    "images_missing": row.images_missing,
                    "rejected_events": row.rejected_events,
                    "discrepancies_decided": row.discrepancies_decided,
                    "corrections_to_review": [flag._asdict() for flag in row.reviews],
                    "courier_back_shift_id": back[row.shift.id].id
                    if row.shift.id in back
                    else None,
                    "courier_also_open_shift_ids": [s.id for s in also.get(row.shift.id, ())],
                }
                for row in rows
            ],
            "totals": board_totals(rows),
            "earlier_waiting": [
                {
                    "shift_id": shift.id,
                    "date": shift.work_date,
                    "courier": user_ref(courier, visible),
                    "device_id": shift.device_id,
                    "shift_status": shift.status,
                    "reopened_count": shift.reopened_count,
                    "courier_back_shift_id": back[shift.id].id if shift.id in back else None,
                    "courier_also_open_shift_ids": [s.id for s in also.get(shift.id, ())],
                }
                for shift, courier in before.shifts
            ],
        }


def _view(shift: Shift) -> dict[str, Any]:
    """``shift_view`` for the caller: phone numbers whole for auditors only."""
    return shift_view(shift, unmasked=current_principal().role == Role.AUDITOR)


def _courier_went(shift: Shift) -> dict[str, Any]:
    """``CourierWentOut`` of ``shift``: where its courier went on while it stayed open."""
    went = where_courier_went(db.session, shift)
    return {
        "courier_back_shift_id": went.courier_back.id if went.courier_back else None,
        "courier_also_open_shift_ids": [s.id for s in went.also_open],
    }


def _readable(shift_id: int) -> Shift:
    """The shift, if the caller may read it: couriers their own, others their stations'."""
    principal = current_principal()
    shift = shifts.get_shift(session=db.session, shift_id=shift_id)
    if principal.role == Role.COURIER:
        if shift.courier_id != principal.user_id:
            raise _not_your_shift(shift, principal, "this is another courier's shift")
    else:
        ensure_visible(shift.station_id, shifts.shift_not_found(shift_id))
    return shift


def _who_closes(shift: Shift, principal: Principal) -> str:
    """Why a courier may not close ``shift``, and who may: told apart, so that the next
    courier on a PDA whose shift was left open is not sent to close it again."""
    whose = (
        "this is another courier's shift"
        if shift.courier_id != principal.user_id
        else f"this shift was opened on PDA {shift.device_id}"
    )
    return (
        f"{whose}: a shift is closed by its own courier from the PDA it was opened on, "
        "or by a manager"
    )


def _not_your_shift(shift: Shift, principal: Principal, message: str) -> PermissionDenied:
    """The refusal of a shift to a courier: ``not_your_shift`` for a colleague's, known at
    their station anyway; another courier's at another station does not exist for them
    (raised here as the unknown id's 404)."""
    if shift.courier_id != principal.user_id:
        ensure_visible(shift.station_id, shifts.shift_not_found(shift.id))
    return PermissionDenied(message, code="not_your_shift")
