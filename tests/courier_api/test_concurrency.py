"""Requests that race each other, with real commits (on SQLite and on PostgreSQL)."""

import time

from flask import Flask
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from courier_api.extensions import db
from models import Parcel, Station
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


def test_the_board_a_balance_and_a_pull_answer_while_a_writer_holds_the_database(
    committed_app: Flask,
) -> None:
    with committed_app.app_context():
        session: Session = db.session
        station = factories.station(session, code="READ")
        factories.user(session, "reader-boss", "station_manager", station)
        factories.user(session, "reader-rider", "courier", station)
        factories.device(session, "PDA-READ", station)
        session.commit()
        station_id = station.id
    client = committed_app.test_client()
    auth = Auth(client)
    manager = auth.headers("reader-boss")
    courier = auth.headers("reader-rider", "PDA-READ")
    opened = client.post("/api/v1/shifts", json={"first_seq": 1}, headers=courier)
    assert opened.status_code == 201, opened.get_json()
    shift_id = opened.get_json()["id"]
    reads = [
        (f"/api/v1/stations/{station_id}/handover", manager),
        (f"/api/v1/shifts/{shift_id}/balance", manager),
        ("/api/v1/sync/pull", courier),
    ]
    engine = db.engine_of(committed_app)
    with engine.begin() as writer:  # a push in progress: on SQLite, the writers' turn
        writer.execute(update(Station).where(Station.id == station_id).values(name="Busy"))
        started = time.monotonic()
        answers = [client.get(url, headers=headers) for url, headers in reads]
        waited = time.monotonic() - started
    assert [a.status_code for a in answers] == [200, 200, 200], [a.get_json() for a in answers]
    # Read at once from the last commit: not after the busy timeout (10 s on SQLite).
    assert waited < 5
    assert answers[0].get_json()["totals"]["shifts"] == 1
