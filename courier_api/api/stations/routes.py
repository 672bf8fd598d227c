from __future__ import annotations

from typing import Any

from flask.views import MethodView

from courier_api.api.base import ApiBlueprint
from courier_api.api.pagination import keyset_page
from courier_api.api.stations.schemas import (
    StationCreate,
    StationListArgs,
    StationOut,
    StationPage,
    StationUpdate,
)
from courier_api.auth import current_principal, ensure_station_access
from courier_api.extensions import db
from models import Role, Station
from sync import directory

blp = ApiBlueprint("stations", __name__, url_prefix="/api/v1/stations", description="Stations")


@blp.route("")
class Stations(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth()
    @blp.arguments(StationListArgs, location="query")
    @blp.response(200, StationPage)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List stations

        Couriers and managers see their own station; admins, auditors and
        integrations see all.
        """
        stations = directory.list_stations(
            session=db.session,
            station_id=current_principal().station_filter(None),
            after_id=args["after"],
            limit=args["limit"],
        )
        return keyset_page(stations, args["limit"], key=lambda s: s.id)

    @blp.auth(Role.ADMIN)
    @blp.arguments(StationCreate)
    @blp.response(201, StationOut)
    @blp.alt_response(409, response="CONFLICT")
    def post(self, body: dict[str, Any]) -> Station:
        """Create a station (admin)"""
        station = directory.create_station(session=db.session, **body)
        db.session.commit()
        return station


@blp.route("/<id:station_id>")
class StationById(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth()
    @blp.response(200, StationOut)
    @blp.alt_response(404, response="NOT_FOUND")
    def get(self, station_id: int) -> Station:
        """Get a station"""
        ensure_station_access(station_id)
        return directory.get_station(session=db.session, station_id=station_id)

    @blp.auth(Role.ADMIN)
    @blp.arguments(StationUpdate)
    @blp.response(200, StationOut)
    @blp.alt_response(404, response="NOT_FOUND")
    def patch(self, body: dict[str, Any], station_id: int) -> Station:
        """Rename a station or change its time zone (admin)

        Each change is on the audit log (`station_updated`: who, and each
        changed field from and to): the time zone decides the local day of every
        shift, board and report of the station. A field given the value it has
        changes nothing and is not logged.
        """
        station = directory.get_station(session=db.session, station_id=station_id)
        directory.update_station(
            session=db.session, station=station, changed_by=current_principal().user_id, **body
        )
        db.session.commit()
        return station
