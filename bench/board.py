"""The station handover board for a small and a large station, side by side.

    .venv/bin/python bench/board.py [--database-url URL] [--small 10] [--large 200]
                                    [--parcels 150] [--rounds 5]
                                    [--show-statements]

Two stations' closed days are written straight into the tables (10 and 200
shifts of 150 parcels by default: every parcel checked out and delivered with a
proof, one in 50 missing at handover with its flag), then
``GET /api/v1/stations/<id>/handover`` is read through Flask's test client as an
admin, alternating between the stations, and every SQL statement of each read
is counted. Prints the median time per board, per shift, and the statement
count of each (it must not grow with the number of shifts).

SQLite runs on a temporary file; ``--database-url`` names a PostgreSQL database
whose ``public`` schema is dropped and recreated (never point it at data you
want to keep).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from typing import Any

import _tree  # noqa: F401  (this tree first on sys.path, before any project import)
from ingest import request_engines, require_postgres  # bench/ingest.py
from sqlalchemy import event, text
from sqlalchemy.orm import Session

from courier_api import create_app
from courier_api.extensions import db
from models import Role, User, migrate
from sync.accounts import hash_password
from tests.factories import station_day

DAY = dt.date(2026, 11, 23)
PASSWORD = "bench-password-1"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url")
    parser.add_argument("--small", type=int, default=10)
    parser.add_argument("--large", type=int, default=200)
    parser.add_argument("--parcels", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--show-statements", action="store_true", help="print the small board's statements"
    )
    args = parser.parse_args()
    if args.database_url:
        require_postgres(args.database_url)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{tmp}/board.db"
        app = create_app(
            {
                "APP_ENV": "testing",
                "DATABASE_URL": url,
                "JWT_SECRET": "bench-secret-" + "x" * 40,
                "PASSWORD_HASH_METHOD": "pbkdf2:sha256:1000",
                "BLOB_DIR": f"{tmp}/blobs",
                "LOG_LEVEL": "WARNING",  # no access line per board read
            }
        )
        with app.app_context():
            engine = db.engine
            if engine.dialect.name == "postgresql":
                with engine.begin() as connection:
                    connection.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
                    connection.execute(text("CREATE SCHEMA public"))
            migrate.upgrade(engine)
            started = time.perf_counter()
            with Session(engine) as session:
                stations = {
                    size: station_day(
                        session, f"S{size}", shifts=size, parcels_per_shift=args.parcels, day=DAY
                    )
                    for size in (args.small, args.large)
                }
                session.add(
                    User(
                        username="admin",
                        role=Role.ADMIN,
                        password_hash=hash_password(PASSWORD, method="pbkdf2:sha256:1000"),
                    )
                )
                session.commit()
            if engine.dialect.name == "postgresql":
                with engine.begin() as connection:
                    connection.execute(text("ANALYZE"))
            print(
                f"{engine.dialect.name}: {args.small + args.large} shifts of {args.parcels} "
                f"parcels written in {time.perf_counter() - started:.1f} s",
                file=sys.stderr,
            )
            statements: list[str] = []
            for which in request_engines(engine):  # a SQLite file's readers: their own
                event.listen(which, "before_cursor_execute", lambda *a: statements.append(a[2]))
        client = app.test_client()
        token = client.post(
            "/api/v1/auth/token", json={"username": "admin", "password": PASSWORD}
        ).get_json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        timings: dict[int, list[float]] = {size: [] for size in stations}
        counts: dict[int, int] = {}
        for _ in range(args.rounds + 1):  # the first round warms up
            for size, station_id in stations.items():
                statements.clear()
                started = time.perf_counter()
                response = client.get(
                    f"/api/v1/stations/{station_id}/handover?date={DAY}", headers=headers
                )
                elapsed = time.perf_counter() - started
                body: Any = response.get_json()
                if response.status_code != 200 or len(body["shifts"]) != size:
                    print(f"unexpected answer: {response.status_code}", file=sys.stderr)
                    return 1
                timings[size].append(elapsed)
                counts[size] = len(statements)
        print(f"backend: {engine.dialect.name}; median of {args.rounds} reads after a warm-up")
        for size in stations:
            median = statistics.median(timings[size][1:])
            print(
                f"  {size:>4} shifts x {args.parcels} parcels: {median * 1000:8.0f} ms per board, "
                f"{median * 1000 / size:6.1f} ms per shift, {counts[size]} SQL statements"
            )
        if args.show_statements:
            statements.clear()
            client.get(
                f"/api/v1/stations/{stations[args.small]}/handover?date={DAY}", headers=headers
            )
            for n, statement in enumerate(statements, 1):
                print(f"  {n:>2}. {' '.join(statement.split())[:100]}")
        small, large = (statistics.median(timings[s][1:]) for s in (args.small, args.large))
        print(f"  time ratio large / small: {large / small:.1f} (shifts ratio "
              f"{args.large / args.small:.0f}); statements equal: "
              f"{counts[args.small] == counts[args.large]}")  # fmt: skip
        return 0 if counts[args.small] == counts[args.large] else 1


if __name__ == "__main__":
    sys.exit(main())
