"""Every CSV the service writes (the proof export, the station reports) writes its cells
as its JSON answers do, through one formatter: ``sync.spreadsheets.csv_cell``."""

import datetime as dt
import json
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from sync.spreadsheets import csv_cell


def json_text(value: Any) -> str:
    """A scalar of a JSON answer as the CSV cell holding the same writes it (the csv
    module's ``str`` of ``csv_cell``): its JSON text, a string as it is, a null empty."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def test_a_time_is_written_in_iso_8601_with_a_t_in_utc() -> None:
    """Python's ``str`` writes a space for the `T`, which a strict parser (Java's
    OffsetDateTime.parse) refuses and which never equals the JSON's text."""
    shanghai = dt.datetime(2026, 12, 4, 17, 12, 0, 123456, tzinfo=ZoneInfo("Asia/Shanghai"))
    assert csv_cell(shanghai) == "2026-12-04T09:12:00.123456+00:00"
    whole = dt.datetime(2026, 12, 4, 9, 12, tzinfo=dt.UTC)
    assert csv_cell(whole) == "2026-12-04T09:12:00+00:00" == whole.isoformat()
    assert csv_cell(dt.date(2026, 12, 4)) == "2026-12-04"


@pytest.mark.parametrize("value", [True, False, None, 0, 12, 0.5, 0.1234, -3])
def test_a_boolean_a_null_and_a_number_are_written_as_json_writes_them(value: object) -> None:
    """The csv module writes what it is given with ``str``: ``True`` for true, but an
    empty cell for None."""
    assert str(csv_cell(value)) == json_text(value)


def test_no_text_cell_runs_as_a_formula_and_a_number_stays_a_number() -> None:
    """Typed by a person or not (a tracking number a deployment's patterns let a "+"
    through, a code): an apostrophe before a formula start. A negative number stays a
    number, a time a time."""
    assert csv_cell("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert csv_cell("Li;=1") == "Li;'=1"
    assert csv_cell("+441234567890") == "'+441234567890"
    assert csv_cell("-3") == "'-3"
    assert csv_cell(-3) == -3
    assert csv_cell(-0.5) == -0.5
    assert csv_cell(None) == ""
    assert csv_cell(dt.date(2026, 12, 4)) == "2026-12-04"
