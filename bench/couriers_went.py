"""Where the couriers of a board's dead PDAs went on, for 20, 40 and 200 of them.

    .venv/bin/python bench/couriers_went.py [--database-url URL] [--rounds 15]

200 couriers of one station, each with a month of shifts signed off on a PDA and
one shift left open on it today; every other one is back, from a shift handed
over on a spare PDA three hours later. ``sync.balances.where_couriers_went`` is
called for the first 20, 40 and 200 of those open shifts (the station board, a
shift's page, ``GET /shifts/<id>/balance``): the first call of each size, then
the median of ``--rounds`` more.

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

import _tree  # noqa: F401  (this tree first on sys.path, before any project import)
from ingest import require_postgres  # bench/ingest.py
from sqlalchemy import text
from sqlalchemy.orm import Session

from models import Shift, ShiftStatus, migrate
from models.engine import make_engine
from sync.balances import where_couriers_went
from tests import factories
from tests.conftest import reset_database

TODAY = dt.datetime(2026, 11, 23, 8, tzinfo=dt.UTC)
COURIERS = 200


def shifts_left_open(session: Session) -> tuple[int, list[Shift]]:
    station = factories.station(session, "BENCH")
    left_open = []
    for n in range(COURIERS):
        courier = factories.user(session, f"courier{n}", "courier", station)
        dead = factories.device(session, f"PDA-{n}", station)
        spare = factories.device(session, f"SPARE-{n}", station)

        def shift(
            device: str, opened: dt.datetime, status: ShiftStatus, courier_id: int = courier.id
        ) -> Shift:
            return Shift(
                station_id=station.id,
                courier_id=courier_id,
                device_id=device,
                status=status,
                work_date=opened.date(),
                opened_at=opened,
                planned_end_at=opened + dt.timedelta(hours=9),
                closed_at=None if status == ShiftStatus.OPEN else opened + dt.timedelta(hours=8),
            )

        session.add_all(
            shift(dead.id, TODAY - dt.timedelta(days=d), ShiftStatus.SIGNED_OFF)
            for d in range(1, 31)
        )
        left_open.append(shift(dead.id, TODAY, ShiftStatus.OPEN))
        if n % 2:
            session.add(shift(spare.id, TODAY + dt.timedelta(hours=3), ShiftStatus.CLOSED))
    session.add_all(left_open)
    session.commit()
    return station.id, left_open


def run(url: str, rounds: int) -> None:
    engine = make_engine(url)
    reset_database(engine)
    migrate.upgrade(engine)
    with Session(engine, expire_on_commit=False) as session:
        station, left_open = shifts_left_open(session)
        if engine.dialect.name == "postgresql":
            with engine.begin() as connection:
                connection.execute(text("ANALYZE shift"))
        print(f"backend: {engine.dialect.name}; first call, then median of {rounds}")
        for couriers in (20, 40, COURIERS):
            asked = left_open[:couriers]
            started = time.perf_counter()
            went = where_couriers_went(session, station, asked)
            first = time.perf_counter() - started
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                again = where_couriers_went(session, station, asked)
                times.append(time.perf_counter() - started)
                assert again == went
            print(
                f"  {couriers:4d} couriers: first {first * 1000:6.1f} ms, "
                f"median {statistics.median(times) * 1000:6.1f} ms, back {len(went.back)}"
            )
    engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if args.database_url:
        require_postgres(args.database_url)
        run(args.database_url, args.rounds)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(f"sqlite:///{tmp}/bench.db", args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
