"""Parcel intake through the API: 5,000-item calls, first sent (created) and re-sent
(unchanged), next to a raw SQLAlchemy Core insert of the same rows into the same table.

    .venv/bin/python bench/intake.py [--database-url URL] [--items 5000]

Uses a scratch database: a temporary SQLite file by default; for PostgreSQL pass
a URL to a database you can wipe (its public schema is dropped).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _tree  # noqa: F401  (this tree first on sys.path, before any project import)
from sqlalchemy import insert, text

from courier_api import create_app
from courier_api.extensions import db
from models import Parcel, Role, ServiceClass, Station, User, migrate
from sync.accounts import hash_password
from sync.tracking import s10_check_digit


def numbers(start: int, count: int) -> list[str]:
    return [f"RR{n:08d}{s10_check_digit(f'{n:08d}')}GB" for n in range(start, start + count)]


def item(tracking_no: str) -> dict:
    return {
        "tracking_no": tracking_no,
        "service_class": "parcel",
        "recipient_name": "Li Lei",
        "recipient_phone": "13812345678",
        "address": "1 Century Ave",
        "lat": 31.2,
        "lon": 121.5,
        "station": "BENCH",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url")
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp())
    url = args.database_url or f"sqlite:///{scratch / 'bench.db'}"
    app = create_app(
        {
            "APP_ENV": "testing",
            "DATABASE_URL": url,
            "JWT_SECRET": "b" * 40,
            "INSTANCE_PATH": str(scratch),
            "PASSWORD_HASH_METHOD": "pbkdf2:sha256:1000",
        }
    )
    engine = db.engine_of(app)
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.execute(text("DROP SCHEMA public CASCADE"))
            connection.execute(text("CREATE SCHEMA public"))
    migrate.upgrade(engine)
    with app.app_context():
        station = Station(code="BENCH", name="Bench", timezone="UTC")
        db.session.add(station)
        db.session.flush()
        db.session.add(
            User(
                username="bench",
                role=Role.ADMIN,
                password_hash=hash_password("bench-password", method="pbkdf2:sha256:1000"),
            )
        )
        db.session.commit()
        station_id = station.id
    client = app.test_client()
    token = client.post(
        "/api/v1/auth/token", json={"username": "bench", "password": "bench-password"}
    ).get_json()
    headers = {"Authorization": f"Bearer {token['access_token']}"}

    api_new, api_again, raw = [], [], []
    for round_no in range(args.rounds):
        batch = numbers(10_000_000 + round_no * args.items, args.items)
        body = {"parcels": [item(n) for n in batch]}
        started = time.perf_counter()
        response = client.post("/api/v1/parcels", json=body, headers=headers)
        api_new.append(time.perf_counter() - started)
        assert response.get_json()["counts"]["created"] == args.items, response.get_json()
        started = time.perf_counter()
        response = client.post("/api/v1/parcels", json=body, headers=headers)
        api_again.append(time.perf_counter() - started)
        assert response.get_json()["counts"]["unchanged"] == args.items

        rows = [
            {
                "tracking_no": n.replace("GB", "FR"),
                "station_id": station_id,
                "service_class": ServiceClass.PARCEL,
                "recipient_name": "Li Lei",
                "recipient_phone": "+8613812345678",
                "address": "1 Century Ave",
                "lat": 31.2,
                "lon": 121.5,
            }
            for n in batch
        ]
        started = time.perf_counter()
        with engine.begin() as connection:
            connection.execute(insert(Parcel), rows)
        raw.append(time.perf_counter() - started)

    def rate(seconds: list[float]) -> float:
        return args.items / statistics.median(seconds)

    print(
        f"backend: {engine.dialect.name}; {args.items} items per call; "
        f"median of {args.rounds} rounds"
    )
    print(f"  API intake, new parcels:      {rate(api_new):9.0f} parcels/s")
    print(f"  API intake, re-sent unchanged: {rate(api_again):9.0f} parcels/s")
    print(f"  raw Core insert, same rows:    {rate(raw):9.0f} rows/s")
    print(f"  ratio API new / raw insert:    {rate(api_new) / rate(raw):9.2f}")
    engine.dispose()


if __name__ == "__main__":
    main()
