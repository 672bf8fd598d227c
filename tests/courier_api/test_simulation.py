"""A simulated station day, played through the API, ends exactly where its plan says.

The plan knows what it meant to happen to every parcel; the server knows only the
requests it received. For several seeds, each shift's balance (status and every
count), the board's tally and the flags standing at the station must be what the
plan expects.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from html.parser import HTMLParser
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from courier_api.extensions import db
from courier_api.simulation import InProcess, Simulation, SimulationError, plan_day
from courier_api.simulation.plan import COUNTS, DayPlan, Fate, Names, Trait
from models.base import utcnow
from sync.shifts import local_date
from tests import factories
from tests.conftest import Auth

ADMIN = ("sim-admin", factories.PASSWORD)


def _admin(app: Flask) -> None:
    with app.app_context():
        factories.user(db.session, ADMIN[0], "admin")
        db.session.commit()


def started_on(plan: DayPlan) -> dt.date:
    """The station's local date as the simulated day starts: the board's day for its
    shifts, also when the run crosses the station's midnight (16:00 UTC in Shanghai)."""
    return local_date(utcnow(), plan.names.timezone)


def shown(client: FlaskClient, auth: Auth, station_id: int, day: dt.date) -> dict[str, Any]:
    """What the API shows the station's manager and an auditor now."""
    admin = auth.headers(ADMIN[0])
    board = client.get(
        f"/api/v1/stations/{station_id}/handover?date={day.isoformat()}", headers=admin
    ).get_json()
    shifts = {}
    for row in board["shifts"]:
        balance = row["balance"]
        shifts[row["courier"]["username"]] = {
            "status": balance["status"],
            "shift_status": row["shift_status"],
            **{
                name: balance[name] for name in (*COUNTS, "missing_seq_count", "discrepancy_count")
            },
        }
    standing: Counter[str] = Counter()
    for status in ("open", "acknowledged"):
        after = 0
        while True:
            page = client.get(
                f"/api/v1/flags?station_id={station_id}&status={status}&limit=500&after={after}",
                headers=admin,
            ).get_json()
            standing.update(flag["kind"] for flag in page["items"])
            if page["next_after"] is None:
                break
            after = page["next_after"]
    totals = board["totals"]
    return {
        "shifts": shifts,
        "board": {k: totals[k] for k in ("shifts", "balanced", "unbalanced", "provisional")},
        "flags": dict(sorted(standing.items())),
    }


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_station_shows_what_the_simulated_day_planned(committed_app: Flask, seed: int) -> None:
    _admin(committed_app)
    plan = plan_day(couriers=6, parcels=66, seed=seed)
    lines: list[str] = []
    day = started_on(plan)
    result = Simulation(InProcess(committed_app), plan, admin=ADMIN, progress=lines.append).run()
    client = committed_app.test_client()
    expected = result.expected.as_dict()
    actual = shown(client, Auth(client), result.station_id, day)
    assert actual["shifts"] == expected["shifts"]
    assert actual["board"] == expected["board"]
    assert actual["flags"] == expected["flags"]
    # The day had every kind of PDA and every fate the plan can draw.
    traits = {t for courier in plan.couriers for t in courier.traits}
    assert traits == set(Trait)
    assert len(lines) == 2 + len(plan.couriers)  # a progress line per courier
    assert expected["board"]["provisional"] == 1  # the PDA whose last batch never came


def test_the_plan_is_the_same_for_the_same_seed_and_covers_every_fate() -> None:
    first = plan_day(couriers=6, parcels=200, seed=11)
    assert first == plan_day(couriers=6, parcels=200, seed=11)
    assert first != plan_day(couriers=6, parcels=200, seed=12)
    assert {p.fate for p in first.parcels} == set(Fate)


def test_a_station_that_exists_already_is_refused_with_a_clear_error(
    committed_app: Flask,
) -> None:
    _admin(committed_app)
    plan = plan_day(couriers=1, parcels=2, seed=5)
    Simulation(InProcess(committed_app), plan, admin=ADMIN).run()
    with pytest.raises(SimulationError, match="409"):
        Simulation(InProcess(committed_app), plan, admin=ADMIN).run()


def test_another_day_at_another_station_with_the_same_seed_is_played_too(
    committed_app: Flask,
) -> None:
    """README: `simulate --station CODE` plays another such day at a new station. With
    the default seed both days drew the same tracking numbers: the second station's
    intake moved the first one's parcels (delivered, returned, ...) to it, and its
    couriers pulled none of them ("pulled 0 parcels, 20 were planned")."""
    _admin(committed_app)
    first, second = (
        plan_day(couriers=1, parcels=3, seed=1, names=names)
        for names in (
            Names(
                station_code=code,
                manager=f"{code.lower()}-manager",
                integration=f"{code.lower()}-gateway",
                courier_prefix=f"{code.lower()}-courier",
                device_prefix=f"PDA-{code}-",
            )
            for code in ("ONE", "TWO")
        )
    )
    assert [p.fate for p in first.parcels] == [p.fate for p in second.parcels]  # one day
    assert not {p.tracking_no for p in first.parcels} & {p.tracking_no for p in second.parcels}
    for plan in (first, second):
        result = Simulation(InProcess(committed_app), plan, admin=ADMIN).run()
        assert result.expected.as_dict()["parcels"] == 3


class BoardTable(HTMLParser):
    """The rows of the board page: ``{shift id: (status class, [cell texts])}``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, tuple[str, list[str]]] = {}
        self._row: int | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "tr" and (attributes.get("id") or "").startswith("shift-"):
            self._row = int(str(attributes["id"]).removeprefix("shift-"))
            self.rows[self._row] = (str(attributes.get("class", "")).removeprefix("row-"), [])
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self.rows[self._row][1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


@pytest.mark.parametrize("seed", [4, 5])
def test_the_board_page_shows_what_the_simulated_day_planned(
    committed_app: Flask, seed: int
) -> None:
    _admin(committed_app)
    plan = plan_day(couriers=6, parcels=48, seed=seed)
    day = started_on(plan)
    result = Simulation(InProcess(committed_app), plan, admin=ADMIN).run()
    client = committed_app.test_client()
    form = client.get("/web/login").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', form)
    assert token
    signed_in = client.post(
        "/web/login",
        data={"csrf_token": token.group(1), "username": ADMIN[0], "password": ADMIN[1]},
    )
    assert signed_in.status_code == 302
    page = client.get(f"/web/board?station={result.station_id}&date={day.isoformat()}")
    assert page.status_code == 200
    table = BoardTable()
    table.feed(page.get_data(as_text=True))
    expected = result.expected.shifts
    courier_of = {shift_id: name for name, shift_id in result.shift_ids.items()}
    assert set(table.rows) == set(courier_of)
    # The board's order: outcomes for parcels a shift never checked out (none here: the
    # simulated PDAs deliver only what they checked out) before the missing ones.
    returned = COUNTS.index("returned") + 1
    columns = (
        *COUNTS[:returned],
        "not_checked_out",
        *COUNTS[returned:],
        "missing_seq_count",
        "discrepancy_count",
    )
    for shift_id, (status, cells) in table.rows.items():
        shift = expected[courier_of[shift_id]]
        assert status == shift.status
        assert shift.shift_status.replace("_", " ") in cells[2]
        # The count first; the missing seqs' cell goes on with the seqs themselves.
        shown = dict(zip(columns, (int(cell.split()[0]) for cell in cells[4:]), strict=True))
        assert shown == {
            **shift.counts,
            "not_checked_out": 0,
            "missing_seq_count": shift.missing_seq_count,
            "discrepancy_count": shift.discrepancy_count,
        }
