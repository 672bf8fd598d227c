"""Station monitoring reports: 日监控 (daily), 周分析 (weekly), 月通报 (monthly).

A report says, for one station and one period of its local calendar, what its
couriers checked out and what became of it: the handover balances of the
period's shifts summed, how much information was lost (checked out, no outcome),
how complete the proofs of delivery were, the flags raised, how long deliveries
took from check-out, and how many met their service class's delivery deadline.

Definitions (every count is a sum over the shifts whose ``work_date`` is in the
period, i.e. opened on that local date):

* ``checked_out`` ... ``not_checked_out``: the shifts' handover balances
  (``sync.handover.Balance``) summed.
* ``information_loss_rate`` = missing / checked_out; ``pod_completeness`` =
  delivered / (delivered + delivered_without_pod): null when the denominator is 0.
* ``flags_by_kind``: flags of the station raised (``Flag.raised_at``) within the
  period's local days whose cause stands, by kind: open, acknowledged or resolved (a
  manager's decision settles a cause that was there), not those the system closed
  because their cause went away (a drop whose earlier consent was pushed after it, a
  parcel a late batch accounted for at the handover, a device heard from again). A
  rule flag the system closed is one the events as they now stand do not raise, so
  the counts do not depend on how a PDA split its queue into pushes (rule 3). A
  courier's row counts the flags naming that courier.
* ``avg_checkout_to_delivery_minutes``: over the parcels of the shifts' manifests
  whose outcome is a delivery (in person, with or without POD, or unattended, with
  or without consent): the corrected time of the outcome event (its first scan, when
  it was scanned again: ``sync.rules.final_outcomes``) minus the corrected time of the
  last check-out before it, averaged, to 0.1 minute. A device's clock
  that went back between the two (flagged ``time_inversion``) counts as zero, as
  the projection never orders a device's outcome before its check-out.
* ``on_time``: among the same deliveries, those whose outcome came at most the
  class's deadline (``DELIVERY_DEADLINE_HOURS``) after the parcel's intake
  (``Parcel.created_at``); by class and overall. A parcel the station never took in
  (no ``Parcel`` row) cannot be measured and is left out.
* ``change``: this period's totals minus the previous period's (previous day,
  ISO week or month); null where either side is null.

Rates are rounded to 4 decimals. A week or a month is computed as its days:
each day's shifts are gathered (``sync.balances.gather``) and reduced to a small
tally before the next day is read, so memory does not grow with the period and a
weekly report, the daily reports of its days and the previous week's totals share
the same per-day work within one call. The queries per day are bounded: the
day's shifts with their couriers, ``gather``'s (five, and one per 900 parcels with
more than one final outcome in a shift: their events, a repeated scan's place), and
one per 900 delivered parcels (their class and intake time); the flags of the
days read are one more query. (A month of 10 shifts x 100 parcels a day: about 1 s
on SQLite, about 2 s with the previous month to compare with, a few MB at most.)
"""

from __future__ import annotations

import calendar
import csv
import datetime as dt
import io
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models import (
    Flag,
    FlagStatus,
    Parcel,
    ReportKind,
    ServiceClass,
    Shift,
    ShiftStatus,
    Station,
    StationReport,
    User,
    utcnow,
)
from sync import outbox
from sync.balances import ShiftFacts, gather
from sync.directory import get_station
from sync.errors import InvalidInput, NotFound
from sync.handover import COUNT_FIELDS, BalanceStatus, compute_balance
from sync.paging import MAX_PAGE_SIZE
from sync.shifts import day_bounds, local_date
from sync.spreadsheets import csv_cell
from sync.sql import among, chunks

DELIVERY_OUTCOMES = frozenset(
    {"delivered", "delivered_without_pod", "unattended", "unattended_without_consent"}
)
RATE_DIGITS = 4
# How long an issuer waits for a period's open or provisional shifts to settle.
SETTLE_TIME = dt.timedelta(hours=24)
# Periods before this are refused: nothing was recorded then, and date arithmetic
# near year 1 overflows.
EARLIEST = dt.date(2000, 1, 1)
# The query argument that names each kind's period, for errors about it.
PERIOD_FIELD = {ReportKind.DAILY: "date", ReportKind.WEEKLY: "week", ReportKind.MONTHLY: "month"}
SCALAR_METRICS = (
    "shifts",
    *COUNT_FIELDS,
    "information_loss_rate",
    "pod_completeness",
    "avg_checkout_to_delivery_minutes",
    "on_time_rate",
    "flags_total",
)
# ``change`` has every metric of a period: the scalars and how many shifts were unsettled.
CHANGE_METRICS = (*SCALAR_METRICS, "shifts_open", "shifts_provisional")
OnTimeDeadlines = Mapping[ServiceClass, int]  # hours from intake to delivery, per class


# -- periods ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Period:
    kind: ReportKind
    start: dt.date
    end: dt.date  # inclusive: the period's last local day

    @property
    def label(self) -> str:
        if self.kind == ReportKind.DAILY:
            return self.start.isoformat()
        if self.kind == ReportKind.WEEKLY:
            year, week, _ = self.start.isocalendar()
            return f"{year}-W{week:02d}"
        return f"{self.start.year}-{self.start.month:02d}"

    def days(self) -> list[dt.date]:
        return [self.start + dt.timedelta(days=n) for n in range((self.end - self.start).days + 1)]

    def previous(self) -> Period:
        return period_of(self.kind, self.start - dt.timedelta(days=1))


def period_of(kind: ReportKind, day: dt.date) -> Period:
    """The period of ``kind`` that holds ``day``."""
    if kind == ReportKind.DAILY:
        return Period(kind, day, day)
    try:
        if kind == ReportKind.WEEKLY:
            start = day - dt.timedelta(days=day.weekday())
            return Period(kind, start, start + dt.timedelta(days=6))
    except OverflowError:  # the last days of year 9999
        raise InvalidInput(
            f"the week of {day.isoformat()} ends after the last representable date",
            code="period_out_of_range",
            field=PERIOD_FIELD[kind],
        ) from None
    start = day.replace(day=1)
    return Period(kind, start, day.replace(day=calendar.monthrange(day.year, day.month)[1]))


def period_starting(kind: ReportKind, start: dt.date) -> Period:
    """The period of ``kind`` that starts on ``start`` (a Monday, the 1st of a month)."""
    period = period_of(kind, start)
    if period.start != start:
        what = {ReportKind.WEEKLY: "a Monday", ReportKind.MONTHLY: "the 1st of a month"}
        raise InvalidInput(
            f"a {kind.value} report starts on {what[kind]}, not {start.isoformat()}",
            code="invalid_period",
            field=PERIOD_FIELD[kind],
        )
    return period


def last_finished(kind: ReportKind, today: dt.date) -> Period:
    """The latest period of ``kind`` that ended before ``today``: yesterday, last week,
    last month."""
    return period_of(kind, period_of(kind, today).start - dt.timedelta(days=1))


def parse_week(label: str) -> dt.date:
    """``2026-W48`` -> the Monday of that ISO week. ``ValueError`` when malformed."""
    year, sep, week = label.partition("-W")
    if not (sep and len(year) == 4 and year.isdigit() and len(week) == 2 and week.isdigit()):
        raise ValueError(f"expected an ISO week like 2026-W48, got {label!r}")
    try:
        return dt.date.fromisocalendar(int(year), int(week), 1)
    except ValueError:
        raise ValueError(f"{year} has no week {week}") from None


def parse_month(label: str) -> dt.date:
    """``2026-11`` -> 2026-11-01. ``ValueError`` when malformed."""
    year, sep, month = label.partition("-")
    if not (sep and len(year) == 4 and year.isdigit() and len(month) == 2 and month.isdigit()):
        raise ValueError(f"expected a month like 2026-11, got {label!r}")
    if not 1 <= int(month) <= 12:
        raise ValueError(f"there is no month {month}")
    return dt.date(int(year), int(month), 1)


# -- tallies ----------------------------------------------------------------------------------


@dataclass
class Tally:
    """What a report row is computed from; tallies of days and couriers add up."""

    shifts: int = 0
    shifts_open: int = 0  # the courier is still out: what is out counts as missing
    shifts_provisional: int = 0  # events still on a PDA: the figures may change
    counts: Counter[str] = field(default_factory=Counter)  # COUNT_FIELDS
    flags: Counter[str] = field(default_factory=Counter)  # by kind
    delivery_seconds: float = 0.0  # check-out to outcome, summed over the deliveries
    deliveries_timed: int = 0
    measured: Counter[str] = field(default_factory=Counter)  # by class: deliveries measured
    on_time: Counter[str] = field(default_factory=Counter)  # by class: within the deadline

    def add(self, other: Tally) -> None:
        self.shifts += other.shifts
        self.shifts_open += other.shifts_open
        self.shifts_provisional += other.shifts_provisional
        self.counts.update(other.counts)
        self.flags.update(other.flags)
        self.delivery_seconds += other.delivery_seconds
        self.deliveries_timed += other.deliveries_timed
        self.measured.update(other.measured)
        self.on_time.update(other.on_time)

    def metrics(self) -> dict[str, Any]:
        """The row as reports show it (JSON types only)."""
        counts = {name: self.counts[name] for name in COUNT_FIELDS}
        in_person = counts["delivered"] + counts["delivered_without_pod"]
        measured = sum(self.measured.values())
        return {
            "shifts": self.shifts,
            "shifts_open": self.shifts_open,
            "shifts_provisional": self.shifts_provisional,
            **counts,
            "information_loss_rate": _rate(counts["missing"], counts["checked_out"]),
            "pod_completeness": _rate(counts["delivered"], in_person),
            "avg_checkout_to_delivery_minutes": round(
                self.delivery_seconds / self.deliveries_timed / 60, 1
            )
            if self.deliveries_timed
            else None,
            "on_time_rate": _rate(sum(self.on_time.values()), measured),
            "on_time": {
                c.value: {
                    "measured": self.measured[c.value],
                    "on_time": self.on_time[c.value],
                    "rate": _rate(self.on_time[c.value], self.measured[c.value]),
                }
                for c in ServiceClass
            },
            "flags_total": sum(self.flags.values()),
            "flags_by_kind": dict(sorted(self.flags.items())),
        }


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, RATE_DIGITS) if whole else None


def change(current: Mapping[str, Any], previous: Mapping[str, Any]) -> dict[str, Any]:
    """``current - previous`` for every metric of two ``Tally.metrics()`` rows."""

    def minus(a: Any, b: Any) -> Any:
        if a is None or b is None:
            return None
        return round(a - b, RATE_DIGITS) if isinstance(a, float) or isinstance(b, float) else a - b

    kinds = sorted({*current["flags_by_kind"], *previous["flags_by_kind"]})
    return {
        **{name: minus(current[name], previous[name]) for name in CHANGE_METRICS},
        "on_time": {
            c: {k: minus(v, previous["on_time"][c][k]) for k, v in row.items()}
            for c, row in current["on_time"].items()
        },
        "flags_by_kind": {
            k: current["flags_by_kind"].get(k, 0) - previous["flags_by_kind"].get(k, 0)
            for k in kinds
        },
    }


@dataclass(frozen=True)
class CourierRef:
    id: int
    username: str
    full_name: str


@dataclass
class DayTally:
    day: dt.date
    couriers: dict[int, Tally]  # by courier id; couriers with flags but no shift included
    unattributed_flags: Counter[str]  # flags of the station naming no courier

    def total(self) -> Tally:
        total = Tally(flags=Counter(self.unattributed_flags))
        for tally in self.couriers.values():
            total.add(tally)
        return total


class StationDays:
    """One station's day tallies, each computed once (reports of a run share them)."""

    def __init__(self, session: Session, station: Station, deadlines: OnTimeDeadlines) -> None:
        self.session = session
        self.station = station
        self.deadlines = deadlines
        self.tallies: dict[dt.date, DayTally] = {}
        self.couriers: dict[int, CourierRef] = {}

    def of(self, days: Sequence[dt.date]) -> list[DayTally]:
        wanted = sorted(set(days) - set(self.tallies))
        if wanted:
            flags = self._flags(wanted[0], wanted[-1])
            for day in wanted:
                self.tallies[day] = self._tally(day, flags.get(day, {}))
        return [self.tallies[day] for day in days]

    def _flags(
        self, first: dt.date, last: dt.date
    ) -> dict[dt.date, dict[int | None, Counter[str]]]:
        """Flags raised from ``first`` to ``last`` (local days) whose cause stands (not
        closed by the system), by day and courier."""
        start, _ = day_bounds(first, self.station.timezone)
        _, end = day_bounds(last, self.station.timezone)
        found: dict[dt.date, dict[int | None, Counter[str]]] = defaultdict(
            lambda: defaultdict(Counter)
        )
        for kind, courier_id, raised_at in self.session.execute(
            select(Flag.kind, Flag.courier_id, Flag.raised_at).where(
                Flag.station_id == self.station.id,
                Flag.raised_at >= start,
                Flag.raised_at < end,
                Flag.status != FlagStatus.CLOSED,
            )
        ):
            found[local_date(raised_at, self.station.timezone)][courier_id][kind] += 1
        return found

    def _tally(self, day: dt.date, flags: Mapping[int | None, Counter[str]]) -> DayTally:
        rows = self.session.execute(
            select(Shift, User.username, User.full_name)
            .join(User, User.id == Shift.courier_id)
            .where(Shift.station_id == self.station.id, Shift.work_date == day)
            .order_by(Shift.id)
        ).all()
        couriers: dict[int, Tally] = defaultdict(Tally)
        deliveries: list[tuple[Tally, str, dt.datetime]] = []  # (row, tracking no, outcome at)
        for shift, username, full_name in rows:
            self.couriers[shift.courier_id] = CourierRef(shift.courier_id, username, full_name)
        facts = gather(self.session, [shift for shift, _, _ in rows])
        for shift_facts in facts.values():
            tally = couriers[shift_facts.shift.courier_id]
            tally.shifts += 1
            deliveries.extend((tally, tn, at) for tn, at in _shift_into(tally, shift_facts))
        self._measure_deadlines(deliveries)
        for courier_id, kinds in flags.items():
            if courier_id is not None:
                couriers[courier_id].flags.update(kinds)
        return DayTally(day, dict(couriers), Counter(flags.get(None, {})))

    def _measure_deadlines(self, deliveries: Sequence[tuple[Tally, str, dt.datetime]]) -> None:
        numbers = sorted({tracking_no for _, tracking_no, _ in deliveries})
        intake: dict[str, tuple[ServiceClass, dt.datetime]] = {}
        for chunk in chunks(numbers):
            for tracking_no, service_class, created_at in self.session.execute(
                select(Parcel.tracking_no, Parcel.service_class, Parcel.created_at).where(
                    among(self.session, Parcel.tracking_no, chunk)
                )
            ):
                intake[tracking_no] = (service_class, created_at)
        for tally, tracking_no, delivered_at in deliveries:
            if tracking_no not in intake:
                continue
            service_class, created_at = intake[tracking_no]
            hours = self.deadlines.get(service_class)
            if hours is None:
                continue
            tally.measured[service_class.value] += 1
            if delivered_at - created_at <= dt.timedelta(hours=hours):
                tally.on_time[service_class.value] += 1


def _shift_into(tally: Tally, facts: ShiftFacts) -> Iterator[tuple[str, dt.datetime]]:
    """Add one shift's balance and delivery times to ``tally``; yield its deliveries."""
    trails = facts.trails()
    balance = compute_balance(
        shift_id=facts.shift.id,
        trails=trails,
        rule_flags=facts.rule_flags,
        handover_flags=facts.handover_flags,
        seqs=facts.seqs,
    )
    for name in COUNT_FIELDS:
        tally.counts[name] += getattr(balance, name)
    tally.shifts_open += facts.shift.status == ShiftStatus.OPEN
    tally.shifts_provisional += balance.status == BalanceStatus.PROVISIONAL
    occurred = {event.fact.event_id: event.fact.occurred_at for event in facts.events}
    for parcel in balance.parcels:
        if not parcel.on_manifest or parcel.outcome not in DELIVERY_OUTCOMES:
            continue
        trail = trails[parcel.tracking_no]
        assert trail.final_event is not None and trail.checkout_event_ids
        # The outcome's first scan, not a repeat of it (``sync.handover.ParcelTrail``)
        delivered_at = trail.final_event.occurred_at
        taken = delivered_at - occurred[trail.checkout_event_ids[-1]]
        tally.delivery_seconds += max(taken.total_seconds(), 0.0)
        tally.deliveries_timed += 1
        yield parcel.tracking_no, delivered_at


def report(
    *,
    session: Session,
    station_id: int,
    kind: ReportKind,
    start: dt.date | None,
    deadlines: OnTimeDeadlines,
    now: dt.datetime | None = None,
    days: StationDays | None = None,
) -> dict[str, Any]:
    """A report of ``kind`` for the period starting on ``start``, computed now (from
    ``days``' tallies when given: a caller reading more of the station's days shares
    them).

    ``start`` None: the last finished period in the station's calendar (yesterday,
    last week, last month). A period that has begun but not ended is reported as it
    stands (``complete`` false); one that has not begun is refused.
    """
    now = now or utcnow()
    station = get_station(session=session, station_id=station_id)
    today = local_date(now, station.timezone)
    if start is None:
        period = last_finished(kind, today)
    else:
        period = period_starting(kind, start)
        if period.start > today:
            raise InvalidInput(
                f"the {kind.value} report for {period.label} cannot be computed before the "
                f"period begins (today is {today.isoformat()} at station {station.code})",
                code="period_in_future",
                field=PERIOD_FIELD[kind],
            )
        if period.start < EARLIEST:
            raise InvalidInput(
                f"reports start in {EARLIEST.year}; {period.label} is earlier",
                code="period_out_of_range",
                field=PERIOD_FIELD[kind],
            )
    return build_report(
        days=days or StationDays(session, station, deadlines), period=period, now=now, today=today
    )


def build_report(
    *, days: StationDays, period: Period, now: dt.datetime, today: dt.date
) -> dict[str, Any]:
    """The report body of ``period`` from a station's day tallies (JSON types only)."""
    previous = period.previous()
    previous_total = Tally()
    for tally in days.of(previous.days()):
        previous_total.add(tally.total())
    current = days.of(period.days())
    total = Tally()
    by_courier: dict[int, Tally] = defaultdict(Tally)
    for tally in current:
        total.add(tally.total())
        for courier_id, courier_tally in tally.couriers.items():
            by_courier[courier_id].add(courier_tally)
    totals = total.metrics()
    previous_totals = previous_total.metrics()
    couriers = sorted(
        (days.couriers[courier_id] for courier_id, t in by_courier.items() if t.shifts),
        key=lambda c: (c.username, c.id),
    )
    station = days.station
    return {
        "station_id": station.id,
        "station_code": station.code,
        "station_timezone": station.timezone,
        "kind": period.kind.value,
        "period": period.label,
        "period_start": period.start.isoformat(),
        "period_end": period.end.isoformat(),
        "complete": period.end < today,
        "generated_at": now.astimezone(dt.UTC).isoformat(),
        "delivery_deadline_hours": {
            c.value: days.deadlines[c] for c in ServiceClass if c in days.deadlines
        },
        "totals": totals,
        "days": [{"date": t.day.isoformat(), **t.total().metrics()} for t in current],
        "couriers": [
            {
                "courier_id": c.id,
                "username": c.username,
                "full_name": c.full_name,
                **by_courier[c.id].metrics(),
            }
            for c in couriers
        ],
        "previous": {
            "period": previous.label,
            "period_start": previous.start.isoformat(),
            "period_end": previous.end.isoformat(),
            "totals": previous_totals,
        },
        "change": change(totals, previous_totals),
    }


# -- CSV --------------------------------------------------------------------------------------

ROW_COLUMNS = (
    "station",
    "period",
    "scope",
    "date",
    "courier_id",
    "courier_username",
    "courier_name",
)
# Per service class: its part of the on-time metrics -> the column's name (before the class).
ON_TIME_COLUMNS = {
    "measured": "on_time_measured",
    "on_time": "on_time_count",
    "rate": "on_time_rate",
}


def report_rows(body: Mapping[str, Any]) -> Iterator[list[Any]]:
    """The report as a table: a header, then one row per scope.

    Every row has the same columns, so a spreadsheet filter on ``scope`` picks a part:
    ``total`` (the period), ``day`` (one per local day), ``courier`` (one per courier
    with shifts in the period), ``previous`` (the previous period's totals) and
    ``change`` (total minus previous). Flags have one column per kind that occurs.
    Names as they were typed (a courier's, a station's code) are text cells a
    spreadsheet never runs as a formula; every cell is written as the report's JSON
    writes it (``sync.spreadsheets.csv_cell``).
    """
    rows: list[tuple[dict[str, Any], Mapping[str, Any]]] = []
    station, period = body["station_code"], body["period"]

    def keys(scope: str, **extra: Any) -> dict[str, Any]:
        return {"station": station, "period": period, "scope": scope, **extra}

    rows.append((keys("total"), body["totals"]))
    rows.extend((keys("day", date=day["date"]), day) for day in body["days"])
    rows.extend(
        (
            keys(
                "courier",
                courier_id=c["courier_id"],
                courier_username=c["username"],
                courier_name=c["full_name"],
            ),
            c,
        )
        for c in body["couriers"]
    )
    previous = body["previous"]
    rows.append(({**keys("previous"), "period": previous["period"]}, previous["totals"]))
    rows.append((keys("change"), body["change"]))
    classes = list(body["totals"]["on_time"])
    kinds = sorted({kind for _, metrics in rows for kind in metrics["flags_by_kind"]})
    header = [
        *ROW_COLUMNS,
        *SCALAR_METRICS,
        *(f"{column}_{c}" for c in classes for column in ON_TIME_COLUMNS.values()),
        *(f"flags_{kind}" for kind in kinds),
    ]
    yield header
    for key, metrics in rows:
        yield [
            *(csv_cell(key.get(column)) for column in ROW_COLUMNS),
            *(csv_cell(metrics[name]) for name in SCALAR_METRICS),
            *(csv_cell(metrics["on_time"][c][part]) for c in classes for part in ON_TIME_COLUMNS),
            *(csv_cell(metrics["flags_by_kind"].get(kind, 0)) for kind in kinds),
        ]


def report_csv(body: Mapping[str, Any]) -> str:
    """``report_rows`` as CSV text (empty cells for nulls)."""
    buffer = io.StringIO()
    csv.writer(buffer).writerows(report_rows(body))
    return buffer.getvalue()


def csv_filename(body: Mapping[str, Any]) -> str:
    """``DEMO-daily-2026-11-29.csv``."""
    return f"{body['station_code']}-{body['kind']}-{body['period']}.csv"


# -- issued reports ---------------------------------------------------------------------------


def due_periods(today: dt.date, *, lookback_days: int, since: dt.date) -> list[Period]:
    """The finished periods that ended within the last ``lookback_days`` days before
    ``today`` and not before ``since`` (the station's first day), oldest first."""
    first = max(today - dt.timedelta(days=lookback_days), since)
    due: list[Period] = []
    for kind in ReportKind:
        period = last_finished(kind, today)
        found = []
        while period.end >= first:
            found.append(period)
            period = period.previous()
        due.extend(found)
    return sorted(due, key=lambda p: (p.end, list(ReportKind).index(p.kind)))


def issue_due_reports(
    *,
    session: Session,
    now: dt.datetime,
    deadlines: OnTimeDeadlines,
    lookback_days: int = 7,
) -> dict[str, Any]:
    """Store a report for every finished period of every station that has none yet.

    For each station: each local day, ISO week and month that ended within the last
    ``lookback_days`` days (and after the station was created), oldest first. A
    period with a stored report is skipped, so a second run issues nothing; two
    issuers racing each insert in a savepoint and the loser skips on the unique
    constraint. Today (unfinished) is never issued, nor a period with a shift still
    open or provisional (its figures would still move) until ``SETTLE_TIME`` after
    the period ended: then it is issued as it stands, saying how many were. The
    caller commits.

    Returns ``{"issued": [{"id", "station_id", "kind", "period"}], "counts": {kind:
    n}, "skipped": n}`` (``skipped``: lost to a concurrent issuer).
    """
    issued: list[dict[str, Any]] = []
    skipped = 0
    stations = session.scalars(select(Station).order_by(Station.id)).all()
    for station in stations:
        today = local_date(now, station.timezone)
        since = local_date(station.created_at, station.timezone)
        due = due_periods(today, lookback_days=lookback_days, since=since)
        if not due:
            continue
        have = _issued_periods(session, station.id, min(p.start for p in due))
        days = StationDays(session, station, deadlines)
        for period in due:
            if (period.kind, period.start) in have:
                continue
            body = build_report(days=days, period=period, now=now, today=today)
            unsettled = body["totals"]["shifts_open"] + body["totals"]["shifts_provisional"]
            ended = day_bounds(period.end, station.timezone)[1]
            if unsettled and now < ended + SETTLE_TIME:
                continue  # a later run issues it, once its shifts have settled
            stored = StationReport(
                station_id=station.id,
                kind=period.kind,
                period_start=period.start,
                period=period.label,
                generated_at=now,
                body=body,
            )
            try:
                with session.begin_nested():
                    session.add(stored)
            except IntegrityError:  # a concurrent issuer stored it a moment ago
                skipped += 1
                continue
            issued.append(
                {
                    "id": stored.id,
                    "station_id": station.id,
                    "kind": period.kind.value,
                    "period": period.label,
                }
            )
            outbox.announce(
                session=session,
                topic="report.ready",
                ordering_key=f"reports:{station.id}",
                station_id=station.id,
                data={
                    "report_id": stored.id,
                    "station_id": station.id,
                    "kind": period.kind,
                    "period": period.label,
                    "period_start": period.start,
                    "url": f"/api/v1/reports/{stored.id}",
                },
                now=now,
            )
    counts = Counter(item["kind"] for item in issued)
    return {
        "issued": issued,
        "counts": {kind.value: counts[kind.value] for kind in ReportKind},
        "skipped": skipped,
    }


def _issued_periods(
    session: Session, station_id: int, since: dt.date
) -> set[tuple[ReportKind, dt.date]]:
    return {
        (kind, start)
        for kind, start in session.execute(
            select(StationReport.kind, StationReport.period_start).where(
                StationReport.station_id == station_id, StationReport.period_start >= since
            )
        )
    }


def list_reports(
    *,
    session: Session,
    station_id: int,
    kind: ReportKind | None = None,
    after_id: int = 0,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The station's issued reports, most recently issued first (keyset on id: the
    next page holds ids below ``after_id``). Without their bodies."""
    query = (
        select(
            StationReport.id,
            StationReport.station_id,
            StationReport.kind,
            StationReport.period,
            StationReport.period_start,
            StationReport.generated_at,
        )
        .where(StationReport.station_id == station_id)
        .order_by(StationReport.id.desc())
        .limit(min(limit, MAX_PAGE_SIZE))
    )
    if kind is not None:
        query = query.where(StationReport.kind == kind)
    if after_id:
        query = query.where(StationReport.id < after_id)
    return [
        {
            **row._asdict(),
            "period_end": period_starting(row.kind, row.period_start).end,
        }
        for row in session.execute(query)
    ]


def get_report(*, session: Session, report_id: int) -> StationReport:
    stored = session.get(StationReport, report_id)
    if stored is None:
        raise report_not_found(report_id)
    return stored


def report_not_found(report_id: int) -> NotFound:
    """What ``get_report`` answers when no report has ``report_id``."""
    return NotFound(f"no report with id {report_id}", code="report_not_found")
