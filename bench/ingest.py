"""Sync ingest through the API: 1,000-event pushes next to a raw SQLAlchemy Core insert
of the same rows into the same table, on an empty database and with history stored.

    .venv/bin/python bench/ingest.py [--backend sqlite|postgresql|both] [--database-url URL]
                                     [--batches 5] [--history 100000] [--profile N]

SQLite runs on a temporary file. PostgreSQL runs on --database-url, by default
postgresql+psycopg://postgres@127.0.0.1:5432/courier_bench (create it first:
``createdb -h 127.0.0.1 -U postgres courier_bench``). Its public schema is
dropped and recreated: never point it at data you want to keep. Without
--backend, both backends run when that PostgreSQL answers, SQLite alone otherwise.

Measured per backend, in one run, as medians of --batches timed calls:

* ``POST /api/v1/sync/push`` through Flask's test client (no network), signed in
  as a courier with a PDA: 1,000 events over 334 parcels taken in beforehand
  (every parcel checked out, then out for delivery, then delivered with a proof
  of delivery or a failed attempt), each push on parcels of its own; every
  event must come back ``applied``.
* The same events as ``sync.ingest`` stores them, inserted into ``scan_event``
  with one Core executemany and committed (under another device, so the unique
  constraints hold), right after each push.
* Both again once --history events (other devices, other parcels) have been
  loaded with the raw insert, with a device that has not pushed before. The
  "none" figures are taken on a database holding only the benchmark's own
  earlier batches. PostgreSQL gets an ANALYZE after the load, as autovacuum
  would give a table that grew to that size.

Exits 1 when something does not behave (a push not answered 200, an event not
``applied``, a flag raised, PostgreSQL asked for but not reachable).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import hashlib
import math
import pstats
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, create_engine, insert, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from courier_api import create_app
from courier_api.api.sync.routes import ingest_rules
from courier_api.extensions import db
from models import (
    Device,
    Parcel,
    Role,
    ScanEvent,
    ServiceClass,
    Station,
    SyncBatch,
    User,
    migrate,
    utcnow,
)
from sync.accounts import hash_password
from sync.events import EventRules, ValidEvent, validate_event
from sync.tracking import s10_check_digit

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/courier_bench"
PASSWORD = "bench-password"
PASSWORD_HASH_METHOD = "pbkdf2:sha256:1000"
PDA_CLOCK = dt.timezone(dt.timedelta(hours=8))  # the PDAs' local time, as sent
EVENT_SPACING = dt.timedelta(seconds=9)  # between a PDA's consecutive scans
EVENTS_PER_PARCEL = 3  # checked_out, out_for_delivery, delivered or attempt failed
DELIVERED_SHARE = 0.85  # the rest are failed attempts
HISTORY_DEVICES = 10  # the history is spread over this many PDAs


class BenchFailure(Exception):
    """The system did not behave as the benchmark needs; the run exits 1."""


@dataclass
class Pda:
    """A courier's device: its account, its token, and its own sequence numbers."""

    device_id: str
    courier_id: int
    headers: dict[str, str]
    last_seq: int = 0

    def next_seqs(self, count: int) -> range:
        first = self.last_seq + 1
        self.last_seq += count
        return range(first, first + count)


@dataclass(frozen=True)
class Timings:
    """Seconds per call of each measurement, in call order."""

    api_empty: list[float]
    raw_empty: list[float]
    api_history: list[float]
    raw_history: list[float]


def tracking_numbers(start: int, count: int) -> list[str]:
    """Valid UPU S10 numbers with consecutive serials."""
    return [f"RR{n:08d}{s10_check_digit(f'{n:08d}')}CN" for n in range(start, start + count)]


def pda_events(
    pda: Pda,
    parcels: Sequence[str],
    count: int,
    sent_at: dt.datetime,
    rng: random.Random,
) -> list[dict[str, Any]]:
    """``count`` events as a PDA records a round: every parcel checked out, then out
    for delivery, then delivered with a proof of delivery or a failed attempt."""
    steps: list[tuple[str, dict[str, Any]]] = []
    steps += [(n, {"type": "checked_out"}) for n in parcels]
    steps += [(n, {"type": "out_for_delivery"}) for n in parcels]
    for n in parcels:
        if rng.random() < DELIVERED_SHARE:
            steps.append((n, {"type": "delivered", "pod": proof_of_delivery(rng)}))
        else:
            steps.append(
                (
                    n,
                    {
                        "type": "delivery_attempt_failed",
                        "reason": "recipient_absent",
                        "action": "notice_left",
                    },
                )
            )
    if len(steps) < count:
        raise ValueError(f"{len(parcels)} parcels cannot carry {count} events")
    steps = steps[:count]
    first_at = sent_at - EVENT_SPACING * count - dt.timedelta(minutes=1)
    events = []
    for position, ((tracking_no, fields), seq) in enumerate(
        zip(steps, pda.next_seqs(count), strict=True)
    ):
        occurred_at = (first_at + EVENT_SPACING * position).astimezone(PDA_CLOCK)
        events.append(
            {
                "client_event_id": str(uuid.uuid4()),
                "seq": seq,
                "tracking_no": tracking_no,
                "occurred_at": occurred_at.isoformat(),
                "location": {
                    "lat": round(31.2 + rng.uniform(-0.05, 0.05), 6),
                    "lon": round(121.5 + rng.uniform(-0.05, 0.05), 6),
                    "accuracy_m": rng.choice([4.0, 8.0, 15.0]),
                },
                **fields,
            }
        )
    return events


def proof_of_delivery(rng: random.Random) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "recipient_name": rng.choice(["Li Lei", "Han Meimei", "Wang Fang"]),
        "relation": rng.choice(["self", "family", "neighbour"]),
        "signature_sha256": hashlib.sha256(rng.randbytes(16)).hexdigest(),
    }
    if rng.random() < 0.5:
        pod["photo_sha256"] = hashlib.sha256(rng.randbytes(16)).hexdigest()
    return pod


def push_body(pda: Pda, events: list[dict[str, Any]], sent_at: dt.datetime) -> dict[str, Any]:
    return {
        "device_id": pda.device_id,
        "batch_id": str(uuid.uuid4()),
        "sent_at": sent_at.isoformat(),
        "events": events,
    }


def scan_event_row(
    event: ValidEvent,
    *,
    pda: Pda,
    station_id: int,
    batch_pk: int,
    offset: dt.timedelta,
    received_at: dt.datetime,
) -> dict[str, Any]:
    """The row ``sync.ingest`` stores for ``event`` (``_BatchIngest._row``)."""
    location = event.location
    return {
        "station_id": station_id,
        "device_id": pda.device_id,
        "courier_id": pda.courier_id,
        "batch_pk": batch_pk,
        "client_event_id": event.client_event_id,
        "seq": event.seq,
        "type": event.type,
        "tracking_no": event.tracking_no,
        "occurred_at_device": event.occurred_at_device,
        "occurred_at": event.occurred_at_device - offset,
        "received_at": received_at,
        "lat": location.lat if location else None,
        "lon": location.lon if location else None,
        "accuracy_m": location.accuracy_m if location else None,
        "shift_id": event.shift_id,
        "voids_client_event_id": event.voids_client_event_id,
        "details": event.details,
        "content_hash": event.content_hash,
    }


def median_rate(count: int, seconds: list[float]) -> float:
    return count / statistics.median(seconds)


class Bench:
    """One scratch database with a station, its parcels and its PDAs."""

    def __init__(self, app: Flask, batch_size: int, rng: random.Random) -> None:
        self.app = app
        self.engine: Engine = db.engine_of(app)
        self.client: FlaskClient = app.test_client()
        self.batch_size = batch_size
        self.rng = rng
        self.parcels_per_batch = math.ceil(batch_size / EVENTS_PER_PARCEL)
        self.next_serial = 10_000_000
        with app.app_context():
            self.rules: EventRules = ingest_rules().events
            station = Station(code="BENCH", name="Bench", timezone="Asia/Shanghai")
            db.session.add(station)
            db.session.commit()
            self.station_id = station.id

    # -- setup -------------------------------------------------------------------------------

    def pda(self, name: str, *, sign_in: bool) -> Pda:
        """A courier with a device of their own; signed in through the API if asked."""
        device_id = f"PDA-{name.upper()}"
        with self.app.app_context():
            courier = User(
                username=f"courier-{name}",
                role=Role.COURIER,
                station_id=self.station_id,
                password_hash=hash_password(PASSWORD, method=PASSWORD_HASH_METHOD),
            )
            db.session.add_all([courier, Device(id=device_id, station_id=self.station_id)])
            db.session.commit()
            courier_id = courier.id
        headers: dict[str, str] = {}
        if sign_in:
            response = self.client.post(
                "/api/v1/auth/token",
                json={"username": f"courier-{name}", "password": PASSWORD, "device_id": device_id},
            )
            if response.status_code != 200:
                raise BenchFailure(
                    f"sign-in of {device_id}: {response.status_code} {response.text}"
                )
            headers = {"Authorization": f"Bearer {response.get_json()['access_token']}"}
        return Pda(device_id, courier_id, headers)

    def take_in(self, count: int) -> list[str]:
        """``count`` new parcels of the station (raw insert: intake has its own benchmark)."""
        numbers = tracking_numbers(self.next_serial, count)
        self.next_serial += count
        rows = [
            {
                "tracking_no": n,
                "station_id": self.station_id,
                "service_class": ServiceClass.PARCEL,
                "recipient_name": "Li Lei",
                "recipient_phone": "+8613812345678",
                "address": "1 Century Ave",
                "lat": 31.2,
                "lon": 121.5,
            }
            for n in numbers
        ]
        with self.engine.begin() as connection:
            connection.execute(insert(Parcel), rows)
        return numbers

    def batch_row(self, pda: Pda, sent_at: dt.datetime, count: int) -> int:
        """A ``sync_batch`` row for raw-inserted events to point at (not timed)."""
        batch_id = uuid.uuid4()
        with self.engine.begin() as connection:
            pk: int = connection.execute(
                insert(SyncBatch).returning(SyncBatch.id),
                {
                    "device_id": pda.device_id,
                    "batch_id": batch_id,
                    "station_id": self.station_id,
                    "courier_id": pda.courier_id,
                    "sent_at": sent_at,
                    "received_at": utcnow(),
                    "clock_offset_ms": 0,
                    "event_count": count,
                    "request_hash": hashlib.sha256(batch_id.bytes).hexdigest(),
                    "receipt": {},
                },
            ).scalar_one()
        return pk

    def raw_rows(
        self, pda: Pda, events: list[dict[str, Any]], sent_at: dt.datetime
    ) -> list[dict[str, Any]]:
        """``events`` as ``sync.ingest`` would store them for ``pda`` (not timed)."""
        batch_pk = self.batch_row(pda, sent_at, len(events))
        received_at = utcnow()
        offset = sent_at - received_at
        return [
            scan_event_row(
                validate_event(raw, sent_at=sent_at, rules=self.rules),
                pda=pda,
                station_id=self.station_id,
                batch_pk=batch_pk,
                offset=offset,
                received_at=received_at,
            )
            for raw in events
        ]

    # -- the timed calls ---------------------------------------------------------------------

    def push(self, pda: Pda, body: dict[str, Any]) -> float:
        started = time.perf_counter()
        response = self.client.post("/api/v1/sync/push", json=body, headers=pda.headers)
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            raise BenchFailure(
                f"push of {pda.device_id}: {response.status_code} {response.text[:500]}"
            )
        receipt = response.get_json()
        statuses = [result["status"] for result in receipt["results"]]
        not_applied = [r for r in receipt["results"] if r["status"] != "applied"]
        if len(statuses) != len(body["events"]) or not_applied:
            raise BenchFailure(
                f"push of {pda.device_id}: {len(not_applied)} of {len(body['events'])} events "
                f"not applied, first: {not_applied[:1]}"
            )
        if receipt["flags_raised"]:
            raise BenchFailure(f"push of {pda.device_id} raised {receipt['flags_raised']}")
        if receipt["acked_through_seq"] != pda.last_seq:
            raise BenchFailure(
                f"push of {pda.device_id}: acked through {receipt['acked_through_seq']}, "
                f"expected {pda.last_seq}"
            )
        return elapsed

    def raw_insert(self, rows: list[dict[str, Any]]) -> float:
        started = time.perf_counter()
        with self.engine.begin() as connection:
            connection.execute(insert(ScanEvent), rows)
        return time.perf_counter() - started

    def api_and_raw(self, api_pda: Pda, raw_pda: Pda) -> tuple[float, float]:
        """One push of a batch through the API, then the same rows inserted raw."""
        parcels = self.take_in(self.parcels_per_batch)
        sent_at = dt.datetime.now(PDA_CLOCK)
        events = pda_events(api_pda, parcels, self.batch_size, sent_at, self.rng)
        body = push_body(api_pda, events, sent_at)
        rows = self.raw_rows(raw_pda, events, sent_at)  # another device: same seqs are fine
        return self.push(api_pda, body), self.raw_insert(rows)

    def load_history(self, total: int, progress: str) -> None:
        """``total`` events from other PDAs, on other parcels, with the raw insert."""
        pdas = [self.pda(f"history-{i:02d}", sign_in=False) for i in range(HISTORY_DEVICES)]
        loaded, batch_no, shown = 0, 0, 0
        started = time.perf_counter()
        while loaded < total:
            count = min(self.batch_size, total - loaded)
            pda = pdas[batch_no % len(pdas)]
            # Spread over the last four weeks, older batches first.
            sent_at = dt.datetime.now(PDA_CLOCK) - dt.timedelta(
                days=28 * (total - loaded) / total, hours=1
            )
            parcels = self.take_in(math.ceil(count / EVENTS_PER_PARCEL))
            events = pda_events(pda, parcels, count, sent_at, self.rng)
            self.raw_insert(self.raw_rows(pda, events, sent_at))
            loaded += count
            batch_no += 1
            if loaded * 10 // total > shown or loaded == total:
                shown = loaded * 10 // total
                print(
                    f"{progress}: {loaded:,} of {total:,} history events stored "
                    f"({time.perf_counter() - started:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
        if self.engine.dialect.name == "postgresql":
            with self.engine.begin() as connection:
                connection.execute(text("ANALYZE"))


def scratch_app(url: str, instance: Path) -> Flask:
    """The app on a freshly migrated database (PostgreSQL: its public schema wiped)."""
    app = create_app(
        {
            "APP_ENV": "testing",
            "DATABASE_URL": url,
            "JWT_SECRET": "b" * 40,
            "INSTANCE_PATH": str(instance),
            "PASSWORD_HASH_METHOD": PASSWORD_HASH_METHOD,
            "LOG_LEVEL": "WARNING",
        }
    )
    engine = db.engine_of(app)
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.execute(text("DROP SCHEMA public CASCADE"))
            connection.execute(text("CREATE SCHEMA public"))
    migrate.upgrade(engine)
    return app


def run_backend(url: str, args: argparse.Namespace) -> tuple[str, Timings]:
    """All measurements on one backend ("sqlite": a temporary file); returns its
    description and the timings."""
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as scratch:
        if url == "sqlite":
            url = f"sqlite:///{Path(scratch) / 'bench.db'}"
        app = scratch_app(url, Path(scratch))
        bench = Bench(app, args.batch_size, random.Random(20261123))
        name = bench.engine.dialect.name
        with bench.engine.connect() as connection:
            version = connection.execute(
                text("SELECT sqlite_version()" if name == "sqlite" else "SHOW server_version")
            ).scalar_one()
        label = f"{'SQLite' if name == 'sqlite' else 'PostgreSQL'} {version}"
        try:
            print(f"{label}: warming up", file=sys.stderr, flush=True)
            bench.api_and_raw(
                bench.pda("warmup", sign_in=True), bench.pda("warmup-raw", sign_in=False)
            )

            print(f"{label}: {args.batches} pushes, empty database", file=sys.stderr, flush=True)
            api_empty, raw_empty = measure(bench, "empty", args.batches)

            api_history: list[float] = []
            raw_history: list[float] = []
            if args.history:
                bench.load_history(args.history, label)
                print(
                    f"{label}: {args.batches} pushes, {args.history:,} events stored",
                    file=sys.stderr,
                    flush=True,
                )
                api_history, raw_history = measure(bench, "history", args.batches)

            if args.profile:
                profile(bench, args.profile, label)
        finally:
            bench.engine.dispose()
    return label, Timings(api_empty, raw_empty, api_history, raw_history)


def measure(bench: Bench, name: str, batches: int) -> tuple[list[float], list[float]]:
    """``batches`` pushes of a PDA that has not pushed before, each followed by the raw insert."""
    api_pda = bench.pda(f"api-{name}", sign_in=True)
    raw_pda = bench.pda(f"raw-{name}", sign_in=False)
    api, raw = [], []
    for _ in range(batches):
        api_seconds, raw_seconds = bench.api_and_raw(api_pda, raw_pda)
        api.append(api_seconds)
        raw.append(raw_seconds)
    return api, raw


def profile(bench: Bench, pushes: int, label: str) -> None:
    """cProfile over ``pushes`` more pushes (after the timed ones, so they stay clean)."""
    pda = bench.pda("profiled", sign_in=True)
    bodies = []
    for _ in range(pushes):
        sent_at = dt.datetime.now(PDA_CLOCK)
        parcels = bench.take_in(bench.parcels_per_batch)
        bodies.append(
            push_body(pda, pda_events(pda, parcels, bench.batch_size, sent_at, bench.rng), sent_at)
        )
    profiler = cProfile.Profile()
    profiler.enable()
    for body in bodies:
        bench.push(pda, body)
    profiler.disable()
    print(f"\n{label}: cProfile over {pushes} pushes of {bench.batch_size:,} events")
    stats = pstats.Stats(profiler, stream=sys.stdout).strip_dirs()
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)


def report(label: str, timings: Timings, args: argparse.Namespace) -> bool:
    """Print one backend's figures; True when the targets are met."""
    size = args.batch_size
    api = median_rate(size, timings.api_empty)
    raw = median_rate(size, timings.raw_empty)
    ratio = api / raw
    print(f"\nbackend: {label}; {size:,} events per push; median of {args.batches} calls each")
    print(
        f"  API push, no events stored:             {api:9,.0f} events/s"
        f"  ({statistics.median(timings.api_empty) * 1000:6.0f} ms per push)"
    )
    print(
        f"  raw Core insert, same rows:             {raw:9,.0f} rows/s"
        f"    ({statistics.median(timings.raw_empty) * 1000:6.0f} ms per batch)"
    )
    met = ratio >= args.target_ratio
    print(
        f"  ratio API / raw:                        {ratio:9.2f}"
        f"  (target >= {args.target_ratio:.2f}: {'met' if met else 'NOT met'})"
    )
    if timings.api_history:
        stored = f"{args.history:,} events stored"
        api_h = median_rate(size, timings.api_history)
        raw_h = median_rate(size, timings.raw_history)
        print(
            f"  API push, {stored + ':':<30}{api_h:9,.0f} events/s"
            f"  ({statistics.median(timings.api_history) * 1000:6.0f} ms per push)"
        )
        print(
            f"  raw Core insert, {stored + ':':<23}{raw_h:9,.0f} rows/s"
            f"    ({statistics.median(timings.raw_history) * 1000:6.0f} ms per batch)"
        )
        history = statistics.median(timings.api_history) / statistics.median(timings.api_empty)
        history_met = history <= args.target_history
        print(
            f"  history ratio, push time {args.history:,} stored / none:"
            f" {history:5.2f}  (target <= {args.target_history:.2f}:"
            f" {'met' if history_met else 'NOT met'})"
        )
        raw_history = statistics.median(timings.raw_history) / statistics.median(timings.raw_empty)
        print(f"  (raw insert time {args.history:,} stored / none: {raw_history:5.2f})")
        met = met and history_met
    print(
        "  seconds per push, in order: "
        f"none {' '.join(f'{s:.3f}' for s in timings.api_empty)}"
        + (
            f"; stored {' '.join(f'{s:.3f}' for s in timings.api_history)}"
            if timings.api_history
            else ""
        )
    )
    return met


def postgres_problem(url: str) -> str | None:
    """Why PostgreSQL at ``url`` cannot be used, or None when it answers."""
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        return str(exc.orig if getattr(exc, "orig", None) else exc).strip().splitlines()[0]
    finally:
        engine.dispose()
    return None


def backends(args: argparse.Namespace) -> list[str]:
    """The database URLs to run on, in order."""
    url = args.database_url or DEFAULT_POSTGRES_URL
    if make_url(url).get_backend_name() != "postgresql":
        raise BenchFailure(f"--database-url must be a PostgreSQL URL, not {url!r}")
    wanted = args.backend
    shown = make_url(url).render_as_string(hide_password=True)
    if wanted in ("postgresql", "both") or args.database_url:
        problem = postgres_problem(url)
        if problem:
            raise BenchFailure(f"PostgreSQL at {shown} is not usable: {problem}")
    elif wanted is None:
        problem = postgres_problem(url)
        if problem:
            print(
                f"PostgreSQL at {shown} is not reachable ({problem}); running on SQLite only. "
                "Create the database or pass --database-url to include it."
            )
            return ["sqlite"]
        wanted = "both"
    urls = []
    if wanted in ("sqlite", "both"):
        urls.append("sqlite")
    if wanted in ("postgresql", "both"):
        urls.append(url)
    return urls


def main() -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join((__doc__ or "").splitlines()[1:]),
    )
    parser.add_argument(
        "--backend",
        choices=["sqlite", "postgresql", "both"],
        help="default: both when PostgreSQL answers, SQLite otherwise",
    )
    parser.add_argument(
        "--database-url", help=f"PostgreSQL to wipe (default {DEFAULT_POSTGRES_URL})"
    )
    parser.add_argument("--batches", type=int, default=5, help="timed pushes per measurement")
    parser.add_argument("--batch-size", type=int, default=1000, help="events per push")
    parser.add_argument(
        "--history", type=int, default=100_000, help="events stored beforehand; 0: skip"
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="then cProfile N pushes"
    )
    parser.add_argument("--target-ratio", type=float, default=0.3, help=argparse.SUPPRESS)
    parser.add_argument("--target-history", type=float, default=1.2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batches < 1 or args.history < 0 or not 1 <= args.batch_size <= 5000:
        parser.error("--batches must be >= 1, --history >= 0, --batch-size from 1 to 5000")
    try:
        results = []
        for url in backends(args):
            results.append(run_backend(url, args))
    except BenchFailure as failure:
        print(f"bench/ingest.py: {failure}", file=sys.stderr)
        return 1
    all_met = [report(label, timings, args) for label, timings in results]
    print(f"\ntargets {'met' if all(all_met) else 'NOT met'} on {len(results)} backend(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
