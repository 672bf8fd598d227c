from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from flask import Response, current_app
from flask.views import MethodView

from courier_api.api.base import ApiBlueprint
from courier_api.api.pagination import keyset_page
from courier_api.api.reports.schemas import (
    DailyArgs,
    FormatArgs,
    MonthlyArgs,
    ReportListArgs,
    ReportOut,
    StoredReportPage,
    WeeklyArgs,
)
from courier_api.auth import ensure_station_access, ensure_visible
from courier_api.extensions import db
from models import ReportKind, Role, utcnow
from sync import reports
from sync.directory import get_station

blp = ApiBlueprint(
    "reports", __name__, url_prefix="/api/v1", description="Daily, weekly and monthly reports"
)
READERS = (Role.ADMIN, Role.AUDITOR, Role.STATION_MANAGER)
# The 200 answer in both formats (``@blp.response`` documents only one content type).
CSV_DOC = {
    "responses": {
        "200": {
            "description": "The report; `format=csv`: as a CSV table",
            "content": {
                "application/json": {"schema": ReportOut},
                "text/csv": {
                    "schema": {"type": "string"},
                    "example": "station,period,scope,date,courier_id,...\n"
                    "DEMO,2026-11-29,total,,,,,12,1000,...\n",
                },
            },
        }
    }
}


def _answer(body: Mapping[str, Any], fmt: str) -> Mapping[str, Any] | Response:
    """The body as JSON, or as CSV for ``format=csv``."""
    if fmt != "csv":
        return body
    response = Response(reports.report_csv(body), mimetype="text/csv")
    response.headers["Content-Disposition"] = (
        f'attachment; filename="{reports.csv_filename(body)}"'
    )
    return response


def _live(station_id: int, kind: ReportKind, start: dt.date | None, fmt: str) -> Any:
    ensure_station_access(station_id)
    body = reports.report(
        session=db.session,
        station_id=station_id,
        kind=kind,
        start=start,
        deadlines=current_app.config["DELIVERY_DEADLINE_HOURS"],
        now=utcnow(),
    )
    return _answer(body, fmt)


@blp.route("/stations/<id:station_id>/reports/daily")
class DailyReport(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(*READERS)
    @blp.arguments(DailyArgs, location="query")
    @blp.response(200, ReportOut)
    @blp.doc(**CSV_DOC)
    @blp.alt_response(404, response="NOT_FOUND")
    def get(self, args: dict[str, Any], station_id: int) -> Any:
        """Daily monitoring report (日监控) of a station

        Computed now from the shifts opened on `date`, the station's local day
        (default: its yesterday; today's report is as it stands, `complete`
        false; a future day is a 422). The counts are the shifts' handover
        balances summed: `checked_out` = `delivered` + `delivered_without_pod`
        + `unattended` + `unattended_without_consent` + `returned` + `missing`.
        `information_loss_rate` is `missing / checked_out`; `pod_completeness`
        `delivered / (delivered + delivered_without_pod)`; flags are those
        raised during the local day whose cause stands (open, acknowledged or
        resolved, not closed by the system when its cause went away), by kind;
        `avg_checkout_to_delivery_minutes`
        runs from a parcel's last check-out to its delivery (corrected clock);
        `on_time_rate` measures each delivery against its service class's
        deadline from intake (`delivery_deadline_hours`). `couriers` has a row
        per courier with shifts that day, `change` is the day minus the
        previous day. `format=csv` answers the same as a CSV table with a
        `scope` column (`total`, `day`, `courier`, `previous`, `change`).

        Managers read their own station; admins and auditors every station.
        """
        return _live(station_id, ReportKind.DAILY, args.get("date"), args["format"])


@blp.route("/stations/<id:station_id>/reports/weekly")
class WeeklyReport(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(*READERS)
    @blp.arguments(WeeklyArgs, location="query")
    @blp.response(200, ReportOut)
    @blp.doc(**CSV_DOC)
    @blp.alt_response(404, response="NOT_FOUND")
    def get(self, args: dict[str, Any], station_id: int) -> Any:
        """Weekly analysis report (周分析) of a station

        The daily metrics over an ISO week (`week`, Monday to Sunday, default:
        the last finished week), computed now: `totals` for the week, `days`
        with one row per day, `couriers` with one row per courier who had
        shifts in the week, and `change` against the previous week. Rates are
        computed from the week's counts, not averaged over days. `format=csv`
        answers a CSV table with a `scope` column.

        Managers read their own station; admins and auditors every station.
        """
        return _live(station_id, ReportKind.WEEKLY, args.get("week"), args["format"])


@blp.route("/stations/<id:station_id>/reports/monthly")
class MonthlyReport(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(*READERS)
    @blp.arguments(MonthlyArgs, location="query")
    @blp.response(200, ReportOut)
    @blp.doc(**CSV_DOC)
    @blp.alt_response(404, response="NOT_FOUND")
    def get(self, args: dict[str, Any], station_id: int) -> Any:
        """Monthly report (月通报) of a station

        The daily metrics over a calendar month (`month`, default: the last
        finished month), computed now: `totals`, `days` (one row per day),
        `couriers` (one row per courier who had shifts in the month) and
        `change` against the previous month. `format=csv` answers a CSV table
        with a `scope` column.

        Managers read their own station; admins and auditors every station.
        """
        return _live(station_id, ReportKind.MONTHLY, args.get("month"), args["format"])


@blp.route("/stations/<id:station_id>/reports")
class IssuedReports(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(*READERS)
    @blp.arguments(ReportListArgs, location="query")
    @blp.response(200, StoredReportPage)
    @blp.alt_response(404, response="NOT_FOUND")
    def get(self, args: dict[str, Any], station_id: int) -> dict[str, Any]:
        """List the reports issued for a station

        The reports the scheduler stored when each day, week and month ended,
        most recently issued first, optionally of one `kind`. An issued report
        keeps what it said then; the live endpoints compute afresh (late
        events may have changed the numbers since). Fetch one with
        `GET /reports/{report_id}`.
        """
        ensure_station_access(station_id)
        get_station(session=db.session, station_id=station_id)
        items = reports.list_reports(
            session=db.session,
            station_id=station_id,
            kind=args.get("kind"),
            after_id=args["after"],
            limit=args["limit"],
        )
        return keyset_page(items, args["limit"], key=lambda item: item["id"])


@blp.route("/reports/<id:report_id>")
class IssuedReport(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(*READERS)
    @blp.arguments(FormatArgs, location="query")
    @blp.response(200, ReportOut)
    @blp.doc(**CSV_DOC)
    @blp.alt_response(404, response="NOT_FOUND")
    def get(self, args: dict[str, Any], report_id: int) -> Any:
        """Get an issued report

        The report body exactly as it was issued (see the daily report for the
        metrics); `format=csv` answers it as a CSV table. A report of another
        station answers a manager what an unknown id answers (404
        `report_not_found`).
        """
        stored = reports.get_report(session=db.session, report_id=report_id)
        ensure_visible(stored.station_id, reports.report_not_found(report_id))
        return _answer(stored.body, args["format"])
