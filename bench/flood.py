"""A parcel flooded with events, then one-event pushes touching it.

    .venv/bin/python bench/flood.py [--database-url URL] [--flood 25000] [--pushes 5]
                                    [--reads 3] [--profile]

A stolen or buggy PDA scans one tracking number ``--flood`` times (rule 1 stores every
event; they are inserted raw, as ``sync.ingest`` stores them, in batches of 5,000:
mostly ``out_for_delivery``, every tenth a ``delivered`` with a proof of delivery).
Then the parcel's honest courier pushes ``--pushes`` one-event scans of it through the
API (Flask's test client, no network), each judged on the parcel's whole history,
after a first one and the collector's freeze of what was built so far, as
``courier-api serve`` freezes what it built at start-up.
Prints, as medians over those pushes: this process's CPU per push (all of SQLite's
work, none of PostgreSQL's), wall time per push, and on SQLite the writers' turn it
held (``BEGIN IMMEDIATE`` to its release: what every other PDA's push waits for).
Then ``--reads`` times ``GET /parcels/<tracking_no>`` as the courier asks it, without
a query (what a client that knows of no pages gets), and as often an auditor's
``GET /proofs/<event_id>`` of one of the parcel's deliveries (its answer holds the
500 events of the parcel's timeline nearest it, as the web page of a proof shows
them): wall, CPU and the answer's size.
``--profile``: cProfile over one more such push, the project's code by cumulative time.

SQLite runs on a temporary file; ``--database-url`` names a PostgreSQL database whose
``public`` schema is dropped and recreated (never point it at data you want to keep).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import json
import pstats
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import _tree  # noqa: F401  (this tree first on sys.path, before any project import)
from ingest import (
    PASSWORD,
    PASSWORD_HASH_METHOD,
    PDA_CLOCK,
    Bench,
    BenchFailure,
    Pda,
    is_project_code,
    print_profile,
    proof_of_delivery,
    push_body,
    require_postgres,
    scratch_app,
)
from scans import TurnTimer
from sqlalchemy import select

from courier_api.extensions import db
from courier_api.serve import freeze_startup_objects
from models import EventType, Role, ScanEvent, User
from sync.accounts import hash_password

FLOOD_BATCH = 5_000  # the default push limit: what one PDA push may carry


def flood_events(
    pda: Pda, tracking_no: str, count: int, rng: random.Random
) -> list[dict[str, Any]]:
    """``count`` scans of one parcel by ``pda``, a second apart, ending an hour ago."""
    start = dt.datetime.now(PDA_CLOCK) - dt.timedelta(hours=1, seconds=count)
    events = []
    for seq in pda.next_seqs(count):
        fields: dict[str, Any] = {"type": "out_for_delivery"}
        if seq % 10 == 0:
            fields = {"type": "delivered", "pod": proof_of_delivery(rng)}
        events.append(
            {
                "client_event_id": str(uuid.uuid4()),
                "seq": seq,
                "tracking_no": tracking_no,
                "occurred_at": (start + dt.timedelta(seconds=seq)).isoformat(),
                "location": {"lat": 31.2, "lon": 121.5, "accuracy_m": 8.0},
                **fields,
            }
        )
    return events


def one_scan(bench: Bench, pda: Pda, tracking_no: str) -> tuple[float, float]:
    """Wall and CPU seconds of one push of one scan of the parcel."""
    (seq,) = pda.next_seqs(1)
    sent_at = dt.datetime.now(PDA_CLOCK)
    event = {
        "client_event_id": str(uuid.uuid4()),
        "seq": seq,
        "tracking_no": tracking_no,
        "occurred_at": sent_at.isoformat(),
        "type": "out_for_delivery",
    }
    data = json.dumps(push_body(pda, [event], sent_at))
    cpu, wall = time.process_time(), time.perf_counter()
    response = bench.client.post(
        "/api/v1/sync/push", data=data, content_type="application/json", headers=pda.headers
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if response.status_code != 200:
        raise BenchFailure(f"push: {response.status_code} {response.text[:500]}")
    if [r["status"] for r in response.get_json()["results"]] != ["applied"]:
        raise BenchFailure(f"push: {response.get_json()['results']}")
    return wall, cpu


def read_parcel(bench: Bench, pda: Pda, tracking_no: str) -> tuple[float, float, int]:
    """Wall and CPU seconds of ``GET /parcels/<tracking_no>`` as its courier asks (no
    query: what a client that knows of no pages gets), and the answer's size."""
    cpu, wall = time.process_time(), time.perf_counter()
    response = bench.client.get(f"/api/v1/parcels/{tracking_no}", headers=pda.headers)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if response.status_code != 200:
        raise BenchFailure(f"GET parcel: {response.status_code} {response.text[:500]}")
    return wall, cpu, len(response.data)


def read_proof(
    bench: Bench, headers: dict[str, str], tracking_no: str
) -> tuple[float, float, int]:
    """Wall and CPU seconds of an auditor's ``GET /proofs/<event_id>`` of the parcel's
    first delivery, and the answer's size."""
    with bench.app.app_context():
        delivery = db.session.scalar(
            select(ScanEvent.id)
            .where(ScanEvent.tracking_no == tracking_no, ScanEvent.type == EventType.DELIVERED)
            .order_by(ScanEvent.id)
            .limit(1)
        )
    cpu, wall = time.process_time(), time.perf_counter()
    response = bench.client.get(f"/api/v1/proofs/{delivery}", headers=headers)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if response.status_code != 200:
        raise BenchFailure(f"GET proof: {response.status_code} {response.text[:500]}")
    return wall, cpu, len(response.data)


def auditor_headers(bench: Bench) -> dict[str, str]:
    """An auditor signed in through the API."""
    with bench.app.app_context():
        db.session.add(
            User(
                username="auditor-flood",
                role=Role.AUDITOR,
                password_hash=hash_password(PASSWORD, method=PASSWORD_HASH_METHOD),
            )
        )
        db.session.commit()
    response = bench.client.post(
        "/api/v1/auth/token", json={"username": "auditor-flood", "password": PASSWORD}
    )
    if response.status_code != 200:
        raise BenchFailure(f"auditor's sign-in: {response.status_code} {response.text}")
    return {"Authorization": f"Bearer {response.get_json()['access_token']}"}


def run(url: str, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as scratch:
        instance = Path(scratch)
        app = scratch_app(url if url != "sqlite" else f"sqlite:///{instance / 'f.db'}", instance)
        rng = random.Random(20261205)
        bench = Bench(app, FLOOD_BATCH, rng)
        label = bench.engine.dialect.name
        try:
            (tracking_no,) = bench.take_in(1)
            flooder = bench.pda("flooder", sign_in=False)
            events = flood_events(flooder, tracking_no, args.flood, rng)
            for start in range(0, len(events), FLOOD_BATCH):
                part = events[start : start + FLOOD_BATCH]
                bench.raw_insert(bench.raw_rows(flooder, part, dt.datetime.now(PDA_CLOCK)))
            print(f"{label}: {args.flood:,} events of {tracking_no} stored", file=sys.stderr)
            honest = bench.pda("honest", sign_in=True)
            one_scan(bench, honest, tracking_no)  # warm-up: projects the flood once
            freeze_startup_objects()  # as ``courier-api serve`` does
            timer = TurnTimer()
            walls, cpus = [], []
            with timer.installed():
                for _ in range(args.pushes):
                    wall, cpu = one_scan(bench, honest, tracking_no)
                    walls.append(wall)
                    cpus.append(cpu)
            reads = [read_parcel(bench, honest, tracking_no) for _ in range(args.reads)]
            auditor = auditor_headers(bench) if args.reads else {}
            proofs = [read_proof(bench, auditor, tracking_no) for _ in range(args.reads)]
            print(f"\n{label}: one-event pushes on a parcel of {args.flood:,} events, medians")
            print(f"  process CPU per push, s   {statistics.median(cpus):8.3f}")
            print(f"  wall time per push, s     {statistics.median(walls):8.3f}")
            if timer.spans:
                print(f"  writers' turn per push, s {statistics.median(timer.spans):8.3f}")
            if reads:
                wall, cpu, size = (statistics.median(r[i] for r in reads) for i in range(3))
                print(
                    f"  GET /parcels/<tn>: wall {wall:.3f} s, CPU {cpu:.3f} s, {size:,.0f} bytes"
                )
            if proofs:
                wall, cpu, size = (statistics.median(r[i] for r in proofs) for i in range(3))
                print(
                    f"  GET /proofs/<id>:  wall {wall:.3f} s, CPU {cpu:.3f} s, {size:,.0f} bytes"
                )
            if args.profile:
                profiler = cProfile.Profile()
                profiler.enable()
                one_scan(bench, honest, tracking_no)
                profiler.disable()
                entries = pstats.Stats(profiler).stats.items()  # type: ignore[attr-defined]
                ours = [item for item in entries if is_project_code(item[0][0])]
                ranked = sorted(ours, key=lambda item: item[1][3], reverse=True)
                print_profile("the project's code by cumulative time", ranked)
                ranked = sorted(entries, key=lambda item: item[1][2], reverse=True)
                print_profile("all code by own time", ranked)
        finally:
            bench.engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default="sqlite")
    parser.add_argument("--flood", type=int, default=25_000)
    parser.add_argument("--pushes", type=int, default=5)
    parser.add_argument(
        "--reads", type=int, default=3, help="GETs of the parcel, and of a proof, timed"
    )
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    try:
        if args.database_url != "sqlite":
            require_postgres(args.database_url)
        run(args.database_url, args)
    except BenchFailure as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
