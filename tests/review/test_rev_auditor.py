"""Second reader's tests, from an auditor's point of view: settling a dispute about a
lost parcel or an express item left in a locker without consent. Each test fails on
the code as reviewed and passes once its defect is fixed."""

from __future__ import annotations

import datetime as dt

from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import AuditEntry
from tests import factories
from tests.conftest import Auth, World

AUDIT = "/api/v1/audit"
PHONE = "+8613812345678"


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def entries_by(session: Session, user_id: int) -> list[AuditEntry]:
    session.expire_all()
    return list(
        session.scalars(
            select(AuditEntry).where(AuditEntry.actor_id == user_id).order_by(AuditEntry.id)
        )
    )


# -- 5. a lost parcel's flags cannot be asked for ---------------------------------------------


def test_an_auditor_lists_the_flags_of_one_parcel(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """A parcel of ST1 is lost; its last scan was by a courier of ST2 (`wrong_station`).
    With no delivery there is no proof page to list its flags, and `GET /flags`
    filters by station, kind, severity, status, courier and shift but not by parcel:
    `tracking_no` is refused (422), so the auditor pages through every station's
    queue to find what was raised about the parcel in dispute."""
    lost = factories.parcel(session, world.station)
    factories.user(session, "courier2", "courier", world.other_station)
    session.commit()
    receipt = auth.push(
        [factories.event(1, lost.tracking_no)], username="courier2", device_id="PDA-0002"
    )
    assert [f["kind"] for f in receipt["flags_raised"]] == ["wrong_station"]
    response = client.get(
        "/api/v1/flags",
        query_string={"tracking_no": lost.tracking_no},
        headers=auth.headers("auditor1"),
    )
    assert response.status_code == 200, response.get_json()
    assert [(f["kind"], f["subject_key"]) for f in response.get_json()["items"]] == [
        ("wrong_station", lost.tracking_no)
    ]
