from __future__ import annotations

from typing import Any

from flask.views import MethodView

from courier_api.api.base import ApiBlueprint
from courier_api.api.devices.schemas import (
    DeviceCreate,
    DeviceListArgs,
    DeviceOut,
    DevicePage,
    DeviceUpdate,
)
from courier_api.api.pagination import keyset_page
from courier_api.auth import current_principal, ensure_station_access, ensure_visible
from courier_api.extensions import db
from models import Device, Role
from sync import directory
from sync.errors import InvalidInput

blp = ApiBlueprint("devices", __name__, url_prefix="/api/v1/devices", description="PDAs")
MANAGERS = (Role.ADMIN, Role.STATION_MANAGER)


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
    def post(self, body: dict[str, Any]) -> Device:
        """Register a PDA at a station (admin, or a manager for their own station)"""
        station_id = body.get("station_id", current_principal().station_id)
        if station_id is None:
            raise InvalidInput(
                "station_id is required", code="station_required", field="station_id"
            )
        ensure_station_access(station_id)
        station = directory.get_station(session=db.session, station_id=station_id)
        device = directory.register_device(
            session=db.session, device_id=body["device_id"], station=station
        )
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
