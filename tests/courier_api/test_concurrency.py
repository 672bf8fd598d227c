"""Requests that race each other, with real commits (on SQLite and on PostgreSQL)."""

from flask import Flask
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from courier_api.extensions import db
from models import Parcel
from tests import factories
from tests.conftest import Auth
from tests.threads import race


def test_concurrent_intakes_of_the_same_parcels_both_succeed(committed_app: Flask) -> None:
    with committed_app.app_context():
        session: Session = db.session
        station = factories.station(session, code="RACE")
        factories.user(session, "racer", "admin")
        session.commit()
        station_code = station.code
    headers = Auth(committed_app.test_client()).headers("racer")
    numbers = [factories.s10() for _ in range(200)]
    body = {
        "parcels": [
            {
                "tracking_no": n,
                "service_class": "parcel",
                "recipient_name": "R",
                "address": "A",
                "station": station_code,
            }
            for n in numbers
        ]
    }

    responses = race(committed_app, "/api/v1/parcels", [body] * 4, headers)

    assert [r.status_code for r in responses] == [200] * 4, [r.get_json() for r in responses]
    created = sum(r.get_json()["counts"]["created"] for r in responses)
    unchanged = sum(r.get_json()["counts"]["unchanged"] for r in responses)
    assert (created, unchanged) == (200, 600)
    with committed_app.app_context():
        stored = db.session.scalar(select(func.count()).select_from(Parcel))
    assert stored == 200
