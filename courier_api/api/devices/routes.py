from __future__ import annotations

from typing import Any

from flask import current_app
from flask.views import MethodView

from courier_api.api.base import RATE_LIMITED, ApiBlueprint
from courier_api.api.devices.schemas import (
    DeviceCreate,
    DeviceListArgs,
    DeviceMove,
    DeviceOut,
    DevicePage,
    DeviceUpdate,
    LostSeqsIn,
    LostSeqsOut,
    WriteOffListArgs,
    WriteOffPage,
)
from courier_api.api.pagination import keyset_page
from courier_api.auth import (
    current_principal,
    ensure_station_access,
    ensure_visible,
    record_auditor_read,
)
from courier_api.config import inversion_tolerance_of
from courier_api.extensions import db
from models import Device, Role, SeqWriteOff
from sync import device_moves, directory, lost_seqs, sign_in_limits
from sync.acks import SeqTracker, seq_count
from sync.errors import InvalidInput
from sync.handover import MISSING_SEQS_SHOWN
from sync.pages import write_offs_named
from sync.phones import shown_text

blp = ApiBlueprint("devices", __name__, url_prefix="/api/v1/devices", description="PDAs")
MANAGERS = (Role.ADMIN, Role.STATION_MANAGER)
LOST_SEQS_READ = "lost_seqs_read"  # an auditor's read of a PDA's write-offs


@blp.route("")
class Devices(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(*MANAGERS, Role.AUDITOR)
    @blp.arguments(DeviceListArgs, location="query")
    @blp.response(200, DevicePage)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List devices

        Managers see the devices of their own station whatever `station_id` says.
        """
        station_id = current_principal().station_filter(args.get("station_id"))
        devices = directory.list_devices(
            session=db.session,
            station_id=station_id,
            status=args.get("status"),
            after_id=args["after"],
            limit=args["limit"],
        )
        return keyset_page(devices, args["limit"], key=lambda d: d.id)

    @blp.auth(*MANAGERS)
    @blp.arguments(DeviceCreate)
    @blp.response(201, DeviceOut)
    @blp.alt_response(409, response="CONFLICT")
    @blp.alt_response(404, response="NOT_FOUND")
    @blp.alt_response(429, **RATE_LIMITED)
    def post(self, body: dict[str, Any]) -> Device:
        """Register a PDA at a station (admin, or a manager for their own station)

        An id already registered is a 409 `device_exists`, whichever station's PDA holds
        it: a PDA sent from another station is moved by an admin
        (`POST /devices/<id>/move`), not registered again. Ids are unique across
        stations, so a manager's registration refused for an id another station's PDA
        holds is on the audit log
        (`device_registration_refused`: who, the id, and both stations, for an admin to
        settle), once per id in the window (the same id tried again is answered alike,
        neither counted nor logged again; with the bound `off`, once in 24 hours), and
        a manager who met `DEVICE_IDS_TAKEN_PER_MANAGER` such ids (10 in 24 hours unless
        configured) has every registration refused (429 `too_many_device_ids_taken`,
        `Retry-After`) until the oldest leaves the window: another station's PDAs are
        not theirs to probe for. An id an admin has since moved to the manager's station
        counts for nothing while the PDA stands there.
        """
        station_id = body.get("station_id", current_principal().station_id)
        if station_id is None:
            raise InvalidInput(
                "station_id is required", code="station_required", field="station_id"
            )
        ensure_station_access(station_id)
        station = directory.get_station(session=db.session, station_id=station_id)
        try:
            device = directory.register_device(
                session=db.session,
                device_id=body["device_id"],
                station=station,
                registrar=_registrar(),
            )
        except directory.DeviceIdTaken:
            db.session.commit()  # the refusal counted and on the audit log
            raise
        db.session.commit()
        return device


@blp.route("/<string:device_id>")
class DeviceById(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(*MANAGERS, Role.AUDITOR)
    @blp.response(200, DeviceOut)
    @blp.alt_response(404, response="NOT_FOUND")
    def get(self, device_id: str) -> Device:
        """Get a device

        Managers read their station's PDAs; one of another station answers what
        an unknown id answers (404 `device_not_found`), so that it does not show
        it exists.
        """
        device = directory.get_device(session=db.session, device_id=device_id)
        ensure_visible(device.station_id, directory.device_not_found(device_id))
        return device

    @blp.auth(*MANAGERS)
    @blp.arguments(DeviceUpdate)
    @blp.response(200, DeviceOut)
    @blp.alt_response(404, response="NOT_FOUND")
    def patch(self, body: dict[str, Any], device_id: str) -> Device:
        """Retire a device, report it lost, or reactivate it

        Tokens issued for a retired or lost device stop working at once.
        Managers change their station's PDAs; one of another station answers
        what an unknown id answers (404 `device_not_found`). A change of status is
        on the audit log (`device_updated`: who, and the status from and to); the
        status it has already changes nothing and is not logged.
        """
        device = directory.get_device(session=db.session, device_id=device_id)
        ensure_visible(device.station_id, directory.device_not_found(device_id))
        directory.set_device_status(
            session=db.session,
            device=device,
            status=body["status"],
            changed_by=current_principal().user_id,
        )
        db.session.commit()
        return device


@blp.route("/<string:device_id>/move")
class DeviceMoveView(MethodView):
    @blp.auth(Role.ADMIN)
    @blp.arguments(DeviceMove)
    @blp.response(200, DeviceOut)
    @blp.alt_response(404, response="NOT_FOUND")
    @blp.alt_response(409, response="CONFLICT")
    def post(self, body: dict[str, Any], device_id: str) -> Device:
        """Move a PDA to another station (admin)

        For a PDA sent from one station to another: ids are unique across stations,
        so it is moved, not registered again (which is a 409 `device_exists`). What
        it did at its old station stays there: its shifts, events, proofs, flags and
        write-offs keep their station, so the old station's board and reports are
        unchanged and the new station's hold what it does from the move on. Refused
        (409) while anything of the old station is still under way on it: a shift
        open (`device_has_open_shift`: it is handed over and closed there first), or
        seqs the server does not hold (`device_has_unsynced_seqs`, naming them:
        events still on the PDA, pushed at the old station or written off as lost
        by its manager first). An unknown station is a 404 `station_not_found`. Its
        tokens stop working (`token_revoked`): it signs in anew at its new station.
        On the audit log (`device_moved`: who, the station from and to). To the
        station it is at already, nothing changes.
        """
        device = directory.get_device(session=db.session, device_id=device_id)
        station = directory.get_station(session=db.session, station_id=body["station_id"])
        device_moves.move_device(
            session=db.session,
            device=device,
            station=station,
            moved_by=current_principal().user_id,
        )
        db.session.commit()
        return device


@blp.route("/<string:device_id>/lost-seqs")
class LostSeqs(MethodView):
    # Not READS_ONLY (courier_api.database): an auditor's read is written to the audit log.

    @blp.auth(*MANAGERS, Role.AUDITOR)
    @blp.arguments(WriteOffListArgs, location="query")
    @blp.response(200, WriteOffPage)
    @blp.alt_response(404, response="NOT_FOUND")
    def get(self, args: dict[str, Any], device_id: str) -> dict[str, Any]:
        """List a PDA's write-offs of lost seqs

        Newest first: each write-off's seqs as written off (`ranges`, `seq_count`),
        its `reason`, who wrote them off (`written_off_by`, by name
        `written_off_by_name`: null to a manager when they are now another
        station's user) and when. A seq whose event arrived after all stays
        listed in `ranges` (its write-off of it is moot: the balances no longer
        name it); `still_written_off` says which of them still stand and
        `arrived_seq_count` how many the PDA sent after all: a write-off with
        none still standing was disproved by the PDA.
        Managers read their station's PDAs, and those that ran shifts at their
        station and moved since; auditors and admins every station's; another
        answers a manager what an unknown id answers (404 `device_not_found`). A
        manager reads the write-offs made at their own station only (those of its
        shifts): a PDA moved from another station lists none of that station's to
        them, and one moved away lists theirs; auditors and admins read every
        station's. An auditor's read is audit-logged (`lost_seqs_read`, subject the
        device, with the page asked for and the write-off ids listed): the seqs a
        manager wrote off are evidence of what a shift's balance no longer waits for.
        """
        device = _write_offs_device(device_id)
        station = current_principal().station_filter(None)
        records = write_offs_named(
            db.session,
            lost_seqs.list_write_offs(
                session=db.session,
                device_id=device.id,
                station_id=station,
                before_id=args["after"] or None,
                limit=args["limit"],
            ),
            station,
        )
        items = [
            {
                **_write_off_fields(r.write_off),
                "written_off_by_name": r.written_off_by_name,
                "still_written_off": [
                    {"first": first, "last": last} for first, last in r.still_written_off
                ],
                "arrived_seq_count": r.arrived_seq_count,
            }
            for r in records
        ]
        page = keyset_page(items, args["limit"], key=lambda item: item["id"])
        # Last, the answer built: a read failing before it leaves no read on record.
        record_auditor_read(
            LOST_SEQS_READ,
            "device",
            device.id,
            {"after": args["after"] or None, "ids": [item["id"] for item in items]},
        )
        return page

    @blp.auth(*MANAGERS)
    @blp.arguments(LostSeqsIn)
    @blp.response(201, LostSeqsOut)
    @blp.alt_response(404, response="NOT_FOUND")
    @blp.alt_response(422, response="UNPROCESSABLE_ENTITY")
    def post(self, body: dict[str, Any], device_id: str) -> dict[str, Any]:
        """Write off seqs a PDA lost

        For a PDA that lost its storage (a reset, a broken flash): the seqs it never
        sent stay missing for good otherwise, so `acked_through_seq` never passes the
        first of them again (the PDA can prune nothing more) and every receipt and
        the balance of every shift owning them names them as still on the PDA. A
        manager of the device's station (or an admin) writes them off, saying why
        (`reason`): they leave the device's missing seqs, `acked_through_seq` passes
        them once the server holds a seq of the PDA after them that came after the
        write-off, above every seq it held then (the reset PDA's next event: a PDA
        only out of range may still hold them, unsent, also behind newer scans it
        got through first), and the
        balances of the shifts owning them are no longer provisional for them but
        name them (`written_off_seqs`) and the write-off (`write_offs`:
        by whom, when, why). Audit-logged (`lost_seqs_written_off`). Only seqs
        missing now may be written off: a gap below the highest seq the server holds,
        or a seq above it up to the highest a shift of the PDA declared used (a
        `last_seq` given at a close, the seq before a `first_seq`: a last batch that
        never came); those count as received from then on, so the PDA's next seq
        (numbered on from the sign-in's `device_max_seq`) comes after them, not after
        a gap, and the seqs up to them neither held nor written off become gaps below
        them: a signed-off shift owning some that its sign-off did not see missing
        reopens (`late_event_after_signoff`, its `latest_reopening` naming the
        `missing_seqs` and the `write_off_id`), as when a push shows such a gap; one
        that only seqs still on the PDA reopened, none missing now beyond those
        signed off, is signed off again (`shift_reopening_withdrawn`). The events
        stored on either side of the seqs written off are neighbours from then on:
        their pair is flagged `time_inversion` if the later is dated more than
        `TIME_INVERSION_TOLERANCE_SECONDS` before the earlier (rule 6), as a push
        completing the pair flags it.
        Any other is refused (422 `seqs_not_missing`), the message naming each
        refused range and why: the server holds it, it is written off already, or it
        is beyond anything declared (nobody knows it exists). A manager writes off
        only their own station's seqs (rule 7): those a shift of their station owns,
        or that no shift owns on their station's PDA; seqs a shift of another station
        owns (the PDA moved since) are refused (403 `seqs_of_another_station`, naming
        the ranges and the shift and station owning them): that station's manager
        writes those off (the PDA's shifts there make it known to them: a PDA that
        never ran a shift at their station answers what an unknown id answers), or an
        admin. The write-off is made at the manager's station (listed to them). An
        event of a
        written-off seq that arrives after all is taken as any late event, and its
        write-off is moot.
        """
        device = _write_offs_device(device_id)
        principal = current_principal()
        ranges = lost_seqs.requested_ranges(
            body["seqs"], [(r["first"], r["last"]) for r in body["ranges"]]
        )
        done = lost_seqs.write_off_lost_seqs(
            session=db.session,
            device=device,
            ranges=ranges,
            reason=body["reason"],
            user_id=principal.user_id,
            station_id=principal.station_filter(None),
            inversion_tolerance=inversion_tolerance_of(current_app.config),
        )
        db.session.commit()
        return {
            **_write_off_fields(done.write_off),
            "acked_through_seq": done.acked_through_seq,
            "missing_seqs": SeqTracker(0, done.missing_ranges).missing_seqs(MISSING_SEQS_SHOWN),
            "missing_seq_count": seq_count(done.missing_ranges),
        }


def _registrar() -> directory.Registrar | None:
    """The caller as ``directory.register_device`` bounds them: a manager, who may not
    know other stations' PDAs; None for an admin, who sees every station's."""
    principal = current_principal()
    if principal.is_cross_station:
        return None
    key = sign_in_limits.caller_key(
        secret=current_app.config["JWT_SECRET"].encode(),
        kind=directory.DEVICE_IDS_TAKEN,
        caller=str(principal.user_id),
    )
    return directory.Registrar(
        user_id=principal.user_id,
        key=key,
        limit=current_app.config["DEVICE_IDS_TAKEN_PER_MANAGER"],
    )


def _write_offs_device(device_id: str) -> Device:
    """The device whose write-offs the caller reads or makes: their station's PDA, or
    one that ran shifts at their station and moved since (its lost seqs of those shifts
    are still their station's). Any other answers what an unknown id answers."""
    device = directory.get_device(session=db.session, device_id=device_id)
    principal = current_principal()
    if not principal.can_access_station(device.station_id) and not lost_seqs.ran_shifts_at(
        session=db.session, device_id=device.id, station_id=principal.station_id
    ):
        raise directory.device_not_found(device_id)
    return device


def _write_off_fields(write_off: SeqWriteOff) -> dict[str, Any]:
    """A write-off as both the write-off's answer and the list show it: a phone number
    in its reason masked for all but auditors (rule 7), as in a note on a flag."""
    return {
        "id": write_off.id,
        "device_id": write_off.device_id,
        "ranges": [{"first": first, "last": last} for first, last in write_off.ranges],
        "seq_count": seq_count(write_off.ranges),
        # The recipient a manager called about the lost scans: whole for auditors only.
        "reason": shown_text(write_off.reason, unmasked=current_principal().role == Role.AUDITOR),
        "written_off_by": write_off.written_off_by,
        "written_off_at": write_off.written_off_at,
    }
