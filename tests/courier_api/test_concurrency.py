"""Requests that race each other, with real commits (on SQLite and on PostgreSQL)."""

import threading
from typing import Any

from flask import Flask
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from courier_api.extensions import db
from models import Parcel
from tests import factories
from tests.conftest import Auth


def _race(app: Flask, requests: list[dict[str, Any]], headers: dict[str, str]) -> list[Any]:
    """Send the bodies to POST /api/v1/parcels from one thread each, released together."""
    barrier = threading.Barrier(len(requests))
    responses: list[Any] = [None] * len(requests)

    def send(index: int) -> None:
        client = app.test_client()
        barrier.wait()
        responses[index] = client.post("/api/v1/parcels", json=requests[index], headers=headers)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return responses


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

    responses = _race(committed_app, [body] * 4, headers)

    assert [r.status_code for r in responses] == [200] * 4, [r.get_json() for r in responses]
    created = sum(r.get_json()["counts"]["created"] for r in responses)
    unchanged = sum(r.get_json()["counts"]["unchanged"] for r in responses)
    assert (created, unchanged) == (200, 600)
    with committed_app.app_context():
        stored = db.session.scalar(select(func.count()).select_from(Parcel))
    assert stored == 200
