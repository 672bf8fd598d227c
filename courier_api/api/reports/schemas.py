from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import marshmallow as ma

from courier_api.api.base import PageArgs
from courier_api.api.fields import After
from models import ReportKind
from sync.reports import parse_month, parse_week

FORMATS = ("json", "csv")


class PeriodLabel(ma.fields.String):
    """A period label in the query string (``2026-W48``, ``2026-11``), loaded as the
    date the period starts; a malformed one is a 422 naming the field."""

    default_error_messages = {"malformed": "{message}"}

    def __init__(self, parse: Callable[[str], dt.date], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.parse = parse

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            return self.parse(text)
        except ValueError as exc:
            raise self.make_error("malformed", message=str(exc)) from None


class FormatArgs(ma.Schema):
    format = ma.fields.String(
        load_default="json",
        validate=ma.validate.OneOf(FORMATS),
        metadata={"description": "`csv`: the report as a CSV table (`text/csv`)"},
    )


class DailyArgs(FormatArgs):
    date = ma.fields.Date(
        metadata={
            "description": "The station's local day (YYYY-MM-DD); default: its yesterday",
            "example": "2026-11-29",
        }
    )


class WeeklyArgs(FormatArgs):
    week = PeriodLabel(
        parse_week,
        metadata={
            "description": "ISO week, Monday first (YYYY-Www); default: the last finished week",
            "example": "2026-W48",
            "pattern": r"^\d{4}-W\d{2}$",
        },
    )


class MonthlyArgs(FormatArgs):
    month = PeriodLabel(
        parse_month,
        metadata={
            "description": "Calendar month (YYYY-MM); default: the last finished month",
            "example": "2026-11",
            "pattern": r"^\d{4}-\d{2}$",
        },
    )


class ReportListArgs(PageArgs):
    kind = ma.fields.Enum(ReportKind, by_value=True)
    after = After(metadata={"description": "Last report id of the previous page"})


# -- bodies -----------------------------------------------------------------------------------


def _count(description: str) -> ma.fields.Integer:
    return ma.fields.Integer(required=True, metadata={"description": description})


def _rate(description: str) -> ma.fields.Float:
    return ma.fields.Float(required=True, allow_none=True, metadata={"description": description})


class OnTimeOut(ma.Schema):
    measured = _count("Deliveries of this class measured against its deadline")
    on_time = _count("Of those, delivered at most the deadline after intake")
    rate = _rate("on_time / measured; null when none was measured")


class OnTimeByClass(ma.Schema):
    express = ma.fields.Nested(OnTimeOut, required=True)
    parcel = ma.fields.Nested(OnTimeOut, required=True)
    registered = ma.fields.Nested(OnTimeOut, required=True)
    ordinary = ma.fields.Nested(OnTimeOut, required=True)


class MetricsOut(ma.Schema):
    """The metrics of a period, a day or a courier (or their change)."""

    shifts = _count("Shifts opened on the day(s) (the station's local date)")
    shifts_open = _count(
        "Of those, still open when the report was made: their parcels still out count as missing"
    )
    shifts_provisional = _count(
        "Of those, provisional: events still on a PDA may change the figures"
    )
    checked_out = _count("Parcels on the shifts' manifests (checked out)")
    delivered = _count("Handed over in person, with a proof of delivery")
    delivered_without_pod = _count("Handed over in person with no or an incomplete proof")
    unattended = _count("Left in a locker or at a pickup point, authorized (with consent)")
    unattended_without_consent = _count("Left there without a consent that came first")
    returned = _count("Brought back to the station")
    missing = _count("Checked out with no final outcome since")
    not_checked_out = _count("Outcomes recorded for parcels the shift never checked out")
    information_loss_rate = _rate("missing / checked_out; null when nothing was checked out")
    pod_completeness = _rate(
        "delivered / (delivered + delivered_without_pod); null without in-person deliveries"
    )
    avg_checkout_to_delivery_minutes = ma.fields.Float(
        required=True,
        allow_none=True,
        metadata={
            "description": "Mean corrected time from a parcel's last check-out to its delivery "
            "(in person or unattended), in minutes to 0.1; null when nothing was delivered"
        },
    )
    on_time_rate = _rate(
        "Share of the deliveries (of parcels taken in at the station) made at most their "
        "class's deadline after intake; null when none was measured"
    )
    on_time = ma.fields.Nested(
        OnTimeByClass, required=True, metadata={"description": "The on-time rate by class"}
    )
    flags_total = _count(
        "Flags raised on the day(s) whose cause stands (not closed by the system when it "
        "went away); a courier's row: flags naming them"
    )
    flags_by_kind = ma.fields.Dict(
        keys=ma.fields.String(),
        values=ma.fields.Integer(),
        required=True,
        metadata={"example": {"missing_at_handover": 1, "unauthorized_locker_drop": 2}},
    )


class DayOut(MetricsOut):
    date = ma.fields.String(required=True, metadata={"format": "date"})


class CourierOut(MetricsOut):
    courier_id = ma.fields.Integer(required=True)
    username = ma.fields.String(required=True)
    full_name = ma.fields.String(required=True)


class PreviousOut(ma.Schema):
    period = ma.fields.String(required=True, metadata={"example": "2026-W47"})
    period_start = ma.fields.String(required=True, metadata={"format": "date"})
    period_end = ma.fields.String(required=True, metadata={"format": "date"})
    totals = ma.fields.Nested(MetricsOut, required=True)


class ReportOut(ma.Schema):
    station_id = ma.fields.Integer(required=True)
    station_code = ma.fields.String(required=True, metadata={"example": "DEMO"})
    station_timezone = ma.fields.String(
        required=True, metadata={"description": "Its days are local days of this zone"}
    )
    # A string in the body (stored bodies are JSON); the choices documented.
    kind = ma.fields.String(
        required=True, validate=ma.validate.OneOf([kind.value for kind in ReportKind])
    )
    period = ma.fields.String(
        required=True, metadata={"description": "2026-11-29, 2026-W48 or 2026-11"}
    )
    period_start = ma.fields.String(required=True, metadata={"format": "date"})
    period_end = ma.fields.String(
        required=True, metadata={"format": "date", "description": "The period's last day"}
    )
    complete = ma.fields.Boolean(
        required=True,
        metadata={"description": "false: the period had not ended when it was computed"},
    )
    generated_at = ma.fields.String(required=True, metadata={"format": "date-time"})
    delivery_deadline_hours = ma.fields.Dict(
        keys=ma.fields.String(),
        values=ma.fields.Integer(),
        required=True,
        metadata={
            "description": "The deadlines the on-time rates were measured against",
            "example": {"express": 24, "registered": 48, "parcel": 72, "ordinary": 96},
        },
    )
    totals = ma.fields.Nested(MetricsOut, required=True)
    days = ma.fields.List(
        ma.fields.Nested(DayOut),
        required=True,
        metadata={"description": "One row per local day of the period"},
    )
    couriers = ma.fields.List(
        ma.fields.Nested(CourierOut),
        required=True,
        metadata={"description": "One row per courier with shifts in the period"},
    )
    previous = ma.fields.Nested(
        PreviousOut,
        required=True,
        metadata={"description": "The previous day, week or month"},
    )
    change = ma.fields.Nested(
        MetricsOut,
        required=True,
        metadata={"description": "totals minus previous.totals; null where either is null"},
    )


class StoredReportOut(ma.Schema):
    id = ma.fields.Integer(required=True)
    station_id = ma.fields.Integer(required=True)
    kind = ma.fields.Enum(ReportKind, by_value=True, required=True)
    period = ma.fields.String(required=True, metadata={"example": "2026-W48"})
    period_start = ma.fields.Date(required=True)
    period_end = ma.fields.Date(required=True)
    generated_at = ma.fields.AwareDateTime(required=True)


class StoredReportPage(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(StoredReportOut), required=True)
    next_after = ma.fields.Integer(allow_none=True, required=True)
