"""How README.md says the proof export writes its cells: as the search's JSON does (a
time in ISO 8601 with a `T`, in UTC; `true`, `false`; a null empty), so that an
auditor's script matches a row to its item by text and a strict ISO 8601 parser reads
its times. The export wrote `2026-12-04 09:12:00.123456+00:00` and `True`/`False`
before: README said so, and now says what it writes instead."""

import datetime as dt
import re
from pathlib import Path

from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from tests import factories
from tests.conftest import Auth, World
from tests.exports import exported

README = Path(__file__).resolve().parents[2] / "README.md"
TIMES = ("occurred_at", "occurred_at_device", "received_at")


def stated_cells() -> tuple[str, str, str]:
    """The example time and the words for true and false README gives the export."""
    text = " ".join(README.read_text(encoding="utf-8").split())
    start = text.find("its cells are written as the search's JSON writes them")
    assert start >= 0, "README does not say how the export writes its cells"
    found = re.search(r"\(`([^`]+)`, no fraction.*?`(\w+)` or `(\w+)`", text[start:])
    assert found, "README no longer says how the export writes its cells"
    return found.group(1), found.group(2), found.group(3)


def shape(example: str) -> re.Pattern[str]:
    """A time written as ``example`` is, its fraction of a second optional."""
    digits = re.sub(r"\d", r"\\d", re.escape(example))
    return re.compile(digits.replace(r"\.\d\d\d\d\d\d", r"(?:\.\d{6})?"))


def test_the_export_writes_its_cells_as_the_readme_says(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    example, true, false = stated_cells()
    assert dt.datetime.fromisoformat(example).utcoffset() == dt.timedelta(0)  # in UTC
    parcel = factories.parcel(session, world.station)
    session.commit()
    at = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=30)
    pod = {"recipient_name": "Li", "signature_sha256": "c" * 64}
    receipt = auth.push(
        [
            factories.event(1, parcel.tracking_no, occurred_at=at),
            factories.event(2, parcel.tracking_no, "delivered", occurred_at=at, pod=pod),
        ]
    )
    assert [r["status"] for r in receipt["results"]] == ["applied", "applied"]
    auditor, query = auth.headers("auditor1"), {"tracking_no": parcel.tracking_no}
    [item] = client.get("/api/v1/proofs", query_string=query, headers=auditor).get_json()["items"]
    export = client.get("/api/v1/proofs/export.csv", query_string=query, headers=auditor)
    [row] = exported(export.get_data(as_text=True))

    for column in TIMES:
        assert shape(example).fullmatch(row[column]), (column, row[column])
        assert row[column] == item[column]  # the same instant, in UTC, as the same text
    assert (item["voided"], row["voided"]) == (False, false)
    assert (item["parcel_taken_in"], row["parcel_taken_in"]) == (True, true)
    assert (item["authorizing_consent"], row["authorizing_consent_id"]) == (None, "")
