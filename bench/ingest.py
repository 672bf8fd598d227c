"""Sync ingest through the API: 1,000-event pushes next to a raw SQLAlchemy Core insert
of the same rows into the same table, on an empty database and with history stored.

    .venv/bin/python bench/ingest.py [--backend sqlite|postgresql|both] [--database-url URL]
                                     [--batches 11] [--history 100000] [--profile N]

SQLite runs on temporary files. PostgreSQL runs on --database-url, by default
postgresql+psycopg://postgres@127.0.0.1:5432/courier_bench (create it first:
``createdb -h 127.0.0.1 -U postgres courier_bench``). Its schemas ``public`` and
``bench_history`` are dropped and recreated: never point it at data you want to
keep. Without --backend, both backends run when that PostgreSQL answers, SQLite
alone otherwise.

Measured per backend, in one run, as medians of --batches timed calls:

* ``POST /api/v1/sync/push`` through Flask's test client (no network), signed in
  as a courier with a PDA: 1,000 events over 334 parcels taken in beforehand
  (every parcel checked out, then out for delivery, then delivered with a proof
  of delivery or a failed attempt), each push on parcels of its own; every
  event must come back ``applied``.
* Right after each push, the same events as ``sync.ingest`` stores them,
  inserted into ``scan_event`` with one Core executemany and committed (under
  another device, so the unique constraints hold).
* Both on two databases side by side, measured in alternation so that a noisy
  machine slows both alike: one empty, one where --history events (other
  devices, other parcels) were first loaded with the raw insert. Each is pushed
  to by a device that had not pushed before. "None stored" means only the
  benchmark's own batches (2,000 events per round, warm-up included).
  PostgreSQL gets an ANALYZE after the load, as autovacuum would give a table
  that grew to that size.

Exits 1 when something does not behave (a push not answered 200, an event not
``applied``, a flag raised, PostgreSQL asked for but not reachable).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import hashlib
import json
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

import _tree  # noqa: F401  (this tree first on sys.path, before any project import)
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, create_engine, event, insert, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from courier_api import create_app
from courier_api.api.sync.routes import ingest_rules
from courier_api.extensions import db
from courier_api.serve import freeze_startup_objects
from models import (
    Blob,
    Device,
    Parcel,
    Role,
    ServiceClass,
    Station,
    SyncBatch,
    User,
    migrate,
    utcnow,
)
from models.engine import has_own_readers, reads_only
from sync.accounts import hash_password
from sync.events import EventRejected, EventRules, PushClock, validate_event
from sync.ingest import INSERT_EVENTS, Pusher, event_row
from sync.tracking import s10_check_digit

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/courier_bench"
PASSWORD = "bench-password"
PASSWORD_HASH_METHOD = "pbkdf2:sha256:1000"
PDA_CLOCK = dt.timezone(dt.timedelta(hours=8))  # the PDAs' local time, as sent
EVENT_SPACING = dt.timedelta(seconds=2)  # between a PDA's consecutive scans
EVENTS_PER_PARCEL = 3  # checked_out, out_for_delivery, delivered or attempt failed
DELIVERED_SHARE = 0.85  # the rest are failed attempts
HISTORY_DEVICES = 10  # the history is spread over this many PDAs
PROFILE_LINES = 30
HISTORY_SCHEMA = "bench_history"  # PostgreSQL: the second database is a schema
PROJECT = Path(__file__).resolve().parent.parent


class BenchFailure(Exception):
    """The system did not behave as the benchmark needs; the run exits 1."""


@dataclass
class Pda:
    """A courier's device: its account, its token, and its own sequence numbers."""

    device_id: str
    courier_id: int
    headers: dict[str, str]
    last_seq: int = 0
    # Device time of its next scan: a PDA's scans move forward in time with its seqs
    # (an earlier time at a higher seq is flagged time_inversion).
    next_at: dt.datetime | None = None

    def next_seqs(self, count: int) -> range:
        first = self.last_seq + 1
        self.last_seq += count
        return range(first, first + count)

    def next_times(self, count: int, sent_at: dt.datetime) -> list[dt.datetime]:
        if self.next_at is None:
            self.next_at = sent_at - dt.timedelta(days=1)  # the day's first scan
        # Never dated after the push is sent (the server flags that as a clock jump):
        # when a long run catches up with the clock, scans come closer together, each
        # batch taking at most half of the time left.
        room = sent_at - self.next_at
        spacing = max(min(EVENT_SPACING, room / (2 * count)), dt.timedelta(microseconds=1))
        times = [self.next_at + spacing * n for n in range(count)]
        self.next_at += spacing * count
        return times


@dataclass(frozen=True)
class Timings:
    """Seconds per call of each measurement, in call order."""

    api_empty: list[float]
    raw_empty: list[float]
    api_history: list[float]
    raw_history: list[float]
    # This process's CPU time per push: all of SQLite's work, none of PostgreSQL's;
    # unlike wall time, hardly moved by other programs on the machine.
    cpu_empty: list[float]
    cpu_history: list[float]
    statements: list[int]  # SQL statements each push sent (no events stored)


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
    events = []
    for (tracking_no, fields), seq, at in zip(
        steps, pda.next_seqs(count), pda.next_times(count, sent_at), strict=True
    ):
        occurred_at = at.astimezone(PDA_CLOCK)
        events.append(
            {
                "client_event_id": str(uuid.uuid4()),
                "seq": seq,
                "tracking_no": tracking_no,
                "occurred_at": occurred_at.isoformat(),
                "location": {  # near the parcel's geocoded address (31.2, 121.5)
                    "lat": round(31.2 + rng.uniform(-0.001, 0.001), 6),
                    "lon": round(121.5 + rng.uniform(-0.001, 0.001), 6),
                    "accuracy_m": rng.choice([4.0, 8.0, 15.0]),
                },
                **fields,
            }
        )
    return events


# Proof images the benchmark registers as uploaded, so that deliveries are clean
# (no pod_blob_missing): a push must raise no flag.
PROOF_IMAGES = [hashlib.sha256(f"proof-{n}".encode()).hexdigest() for n in range(16)]


def proof_of_delivery(rng: random.Random) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "recipient_name": rng.choice(["Li Lei", "Han Meimei", "Wang Fang"]),
        "relation": rng.choice(["self", "family", "neighbour"]),
        "signature_sha256": rng.choice(PROOF_IMAGES),
    }
    if rng.random() < 0.5:
        pod["photo_sha256"] = rng.choice(PROOF_IMAGES)
    return pod


def push_body(pda: Pda, events: list[dict[str, Any]], sent_at: dt.datetime) -> dict[str, Any]:
    return {
        "device_id": pda.device_id,
        "batch_id": str(uuid.uuid4()),
        "sent_at": sent_at.isoformat(),
        "events": events,
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
        # By this database's engines, savepoints included; not the BEGIN (psycopg's own,
        # a SQLite file's dialect's: models.engine._begin_on_file).
        self.statements_sent = 0
        self.last_push_statements = 0
        for engine in request_engines(self.engine):
            event.listen(engine, "before_cursor_execute", self._count_statement)
        self.next_serial = 10_000_000
        with app.app_context():
            self.rules: EventRules = ingest_rules().events
            station = Station(code="BENCH", name="Bench", timezone="Asia/Shanghai")
            db.session.add(station)
            db.session.add_all(
                Blob(sha256=d, media_type="image/png", size_bytes=100, width=10, height=10)
                for d in PROOF_IMAGES
            )
            db.session.commit()
            self.station_id = station.id

    def _count_statement(self, *_: Any) -> None:
        self.statements_sent += 1

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
        try:
            valid = [validate_event(raw, rules=self.rules) for raw in events]
        except EventRejected as error:
            raise BenchFailure(f"a generated event is invalid: {error.code}: {error}") from None
        return [
            event_row(
                event,
                pusher=Pusher(pda.device_id, self.station_id, pda.courier_id),
                batch_pk=batch_pk,
                clock=PushClock(sent_at, received_at, self.rules),
            )
            for event in valid
        ]

    # -- the timed calls ---------------------------------------------------------------------

    def push(self, pda: Pda, body: dict[str, Any]) -> tuple[float, float]:
        """Wall and CPU seconds of one push, after checking its receipt.

        The body is encoded before the clock starts: that is the PDA's work, not the
        server's.
        """
        data = json.dumps(body)
        statements_before = self.statements_sent
        cpu_started = time.process_time()
        started = time.perf_counter()
        response = self.client.post(
            "/api/v1/sync/push", data=data, content_type="application/json", headers=pda.headers
        )
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        self.last_push_statements = self.statements_sent - statements_before
        if response.status_code != 200:
            raise BenchFailure(
                f"push of {pda.device_id}: {response.status_code} {response.text[:500]}"
            )
        receipt = response.get_json()
        results = receipt["results"]
        not_applied = [result for result in results if result["status"] != "applied"]
        if len(results) != len(body["events"]) or not_applied:
            raise BenchFailure(
                f"push of {pda.device_id}: {len(not_applied)} of {len(body['events'])} events "
                f"not applied, first: {not_applied[:1]}"
            )
        if receipt["flags_raised"]:
            raise BenchFailure(f"push of {pda.device_id} raised {receipt['flags_raised']}")
        last_seq = max(event["seq"] for event in body["events"])
        if receipt["acked_through_seq"] != last_seq:
            raise BenchFailure(
                f"push of {pda.device_id}: acked through {receipt['acked_through_seq']}, "
                f"expected {last_seq}"
            )
        return elapsed, cpu

    def raw_insert(self, rows: list[dict[str, Any]]) -> float:
        started = time.perf_counter()
        with self.engine.begin() as connection:
            connection.execute(INSERT_EVENTS, rows)
        return time.perf_counter() - started

    def api_and_raw(self, api_pda: Pda, raw_pda: Pda) -> tuple[float, float, float]:
        """One push of a batch through the API, then the same rows inserted raw:
        wall seconds of the push, CPU seconds of the push, wall seconds of the insert."""
        parcels = self.take_in(self.parcels_per_batch)
        sent_at = dt.datetime.now(PDA_CLOCK)
        events = pda_events(api_pda, parcels, self.batch_size, sent_at, self.rng)
        body = push_body(api_pda, events, sent_at)
        rows = self.raw_rows(raw_pda, events, sent_at)  # another device: same seqs are fine
        api_seconds, cpu_seconds = self.push(api_pda, body)
        return api_seconds, cpu_seconds, self.raw_insert(rows)

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


def request_engines(engine: Engine) -> list[Engine]:
    """The engines a request's statements go through: the app's, and on a SQLite file
    also its readers' (``models.engine.reads_only``), where a push's sign-in check
    reads. Elsewhere the readers share the engine, and its events."""
    return [engine, reads_only(engine)] if has_own_readers(engine) else [engine]


def scratch_app(url: str, instance: Path, schema: str = "public") -> Flask:
    """The app on a freshly migrated database. PostgreSQL: in ``schema``, wiped first."""
    if make_url(url).get_backend_name() == "postgresql":
        url = (
            make_url(url)
            .update_query_dict({"options": f"-csearch_path={schema}"})
            .render_as_string(hide_password=False)
        )
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
            connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
            connection.execute(text(f"CREATE SCHEMA {schema}"))
    migrate.upgrade(engine)
    return app


def run_backend(url: str, args: argparse.Namespace) -> tuple[str, Timings]:
    """All measurements on one backend ("sqlite": temporary files); returns its
    description and the timings.

    Two databases side by side, one empty and one with the history (PostgreSQL:
    two schemas of one database), measured in alternation so that a noisy
    machine slows both alike.
    """
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as scratch:
        instance = Path(scratch)
        if url == "sqlite":
            empty_app = scratch_app(f"sqlite:///{instance / 'empty.db'}", instance)
            history_app = scratch_app(f"sqlite:///{instance / 'history.db'}", instance)
        else:
            empty_app = scratch_app(url, instance)
            history_app = scratch_app(url, instance, HISTORY_SCHEMA)
        rng = random.Random(20261123)
        empty = Bench(empty_app, args.batch_size, rng)
        history = Bench(history_app, args.batch_size, rng)
        label = describe(empty.engine)
        try:
            print(f"{label}: warming up", file=sys.stderr, flush=True)
            for bench in (empty, history) if args.history else (empty,):
                bench.api_and_raw(
                    bench.pda("warmup", sign_in=True), bench.pda("warmup-raw", sign_in=False)
                )
            if args.history:
                history.load_history(args.history, label)
            freeze_startup_objects()  # as ``courier-api serve`` does before its workers start
            print(
                f"{label}: {args.batches} pushes on each database, in alternation",
                file=sys.stderr,
                flush=True,
            )
            timings = measure(empty, history if args.history else None, args.batches)
            if args.profile:
                profile(empty, args.profile, f"{label}, no events stored")
                if args.history:
                    profile(history, args.profile, f"{label}, {args.history:,} events stored")
        finally:
            empty.engine.dispose()
            history.engine.dispose()
    return label, timings


def describe(engine: Engine) -> str:
    """The backend's name and version."""
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        version = connection.execute(
            text("SELECT sqlite_version()" if sqlite else "SHOW server_version")
        ).scalar_one()
    return f"{'SQLite' if sqlite else 'PostgreSQL'} {version}"


def measure(empty: Bench, history: Bench | None, batches: int) -> Timings:
    """``batches`` rounds: a push then the raw insert on each database, which one
    first alternating; on each, a PDA that had not pushed before."""
    pdas = {
        bench: (bench.pda("api", sign_in=True), bench.pda("raw", sign_in=False))
        for bench in (empty, history)
        if bench is not None
    }
    timings = Timings([], [], [], [], [], [], [])
    for round_no in range(batches):
        order = list(pdas) if round_no % 2 == 0 else list(reversed(pdas))
        for bench in order:
            api_seconds, cpu_seconds, raw_seconds = bench.api_and_raw(*pdas[bench])
            if bench is empty:
                timings.statements.append(bench.last_push_statements)
                timings.api_empty.append(api_seconds)
                timings.cpu_empty.append(cpu_seconds)
                timings.raw_empty.append(raw_seconds)
            else:
                timings.api_history.append(api_seconds)
                timings.cpu_history.append(cpu_seconds)
                timings.raw_history.append(raw_seconds)
    return timings


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
    # (file, line, function) -> (primitive calls, calls, own s, cumulative s, callers);
    # a runtime attribute of pstats.Stats that typeshed does not declare.
    entries = pstats.Stats(profiler).stats.items()  # type: ignore[attr-defined]
    total = sum(own for _, (_, _, own, _, _) in entries)
    print(
        f"\n{label}: cProfile over {pushes} push(es) of {bench.batch_size:,} events, {total:.3f} s"
    )
    ranked = sorted(entries, key=lambda item: item[1][2], reverse=True)
    print_profile(f"top {PROFILE_LINES} by own time", ranked)
    ours = [item for item in entries if is_project_code(item[0][0])]
    ranked = sorted(ours, key=lambda item: item[1][3], reverse=True)
    print_profile(f"top {PROFILE_LINES} of the project's code by cumulative time", ranked)


def print_profile(title: str, ranked: list[tuple[tuple[str, int, str], Any]]) -> None:
    print(f"  {title}:\n      own s    cum s   calls  function")
    for (filename, line, function), (_, calls, own, cumulative, _) in ranked[:PROFILE_LINES]:
        where = f"{short_path(filename)}:{line}({function})"
        print(f"    {own:7.3f}  {cumulative:7.3f}  {calls:6d}  {where}")


def is_project_code(filename: str) -> bool:
    path = Path(filename)
    return (
        path.is_relative_to(PROJECT)
        and not path.is_relative_to(PROJECT / ".venv")
        and not path.is_relative_to(PROJECT / "bench")
    )


def short_path(filename: str) -> str:
    """A profiled file's path relative to site-packages, the project, or the stdlib."""
    parts = Path(filename).parts
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1 :])
    if Path(filename).is_relative_to(PROJECT):
        return str(Path(filename).relative_to(PROJECT))
    return "/".join(parts[-2:])


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
    print(
        f"  SQL statements per push:                {statistics.median(timings.statements):9.0f}"
        "  (sign-in check to receipt, savepoints included, not the BEGIN)"
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
        paired = statistics.median(
            stored / none
            for stored, none in zip(timings.api_history, timings.api_empty, strict=True)
        )
        raw_history = statistics.median(timings.raw_history) / statistics.median(timings.raw_empty)
        cpu = statistics.median(timings.cpu_history) / statistics.median(timings.cpu_empty)
        print(
            f"    median of the per-round ratios: {paired:.2f};"
            f" raw insert time {args.history:,} stored / none: {raw_history:.2f}"
        )
        print(
            f"    this process's CPU time per push, stored / none: {cpu:.2f}"
            + (" (PostgreSQL's own work not included)" if "PostgreSQL" in label else "")
        )
        met = met and history_met
    print("  ms per push, in order:")
    print(f"    none:   {' '.join(f'{s * 1000:4.0f}' for s in timings.api_empty)}")
    if timings.api_history:
        print(f"    stored: {' '.join(f'{s * 1000:4.0f}' for s in timings.api_history)}")
    return met


def postgres_problem(url: str) -> str | None:
    """Why PostgreSQL at ``url`` cannot be used, or None when it answers."""
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        said = str(exc.orig if getattr(exc, "orig", None) else exc).strip()
        return next(iter(said.splitlines()), type(exc).__name__)
    finally:
        engine.dispose()
    return None


def require_postgres(url: str) -> None:
    """Stop with one line saying why, when the benchmark cannot use PostgreSQL at ``url``
    (``bench/load.py`` and ``bench/board.py``: they wipe its ``public`` schema)."""
    problem = postgres_problem(url)
    if problem:
        shown = make_url(url).render_as_string(hide_password=True)
        raise SystemExit(
            f"PostgreSQL at {shown} is not usable: {problem}\n"
            "(name a database the benchmark may wipe; create it first, e.g. "
            "createdb -h 127.0.0.1 -U postgres courier_bench)"
        )


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
    parser.add_argument(
        "--batches", type=int, default=11, help="rounds: timed pushes on each database"
    )
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
    verdicts = [
        f"{label.split(' (')[0]} {'met' if report(label, timings, args) else 'NOT met'}"
        for label, timings in results
    ]
    print(f"\ntargets: {'; '.join(verdicts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
