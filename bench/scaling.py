"""How sync ingest scales: with the batch size, in memory over a long run, and with
the shifts a courier worked on a PDA before.

    .venv/bin/python bench/scaling.py sizes  [--database-url URL] [--sizes 100,1000,10000]
                                             [--rounds 3] [--events-per-round 10000]
    .venv/bin/python bench/scaling.py memory [--database-url URL] [--events 1000000]
                                             [--batch-size 1000]
    .venv/bin/python bench/scaling.py shifts [--database-url URL] [--past-shifts 365]
                                             [--pushes 301]

``sizes``: each batch size gets a fresh database; in each round every size pushes
the same number of events (``--events-per-round``) through the API (Flask's test
client, signed in as a courier with a PDA, the body encoded before the clock
starts), the sizes taking turns so that load from other programs falls on all.
Prints the median time per event of each size and its ratio to the smallest size's:
ingest is linear when the ratios stay near 1 (a larger batch costing more per event
would show as a ratio above 1). 10,000 is above the default ``MAX_EVENTS_PER_PUSH``
(5,000), which this script raises for its own app.

``memory``: ``--events`` pushed through the API in one process, in batches of
``--batch-size`` spread over 40 PDAs; prints the process's resident memory (RSS)
and Python's allocated blocks every tenth of the way, and the growth between the
first tenth and the end (flat: a push keeps nothing once answered).

``shifts``: two couriers, each with a PDA and a shift open on it (first seq declared),
push one scan at a time, in alternation, ``--pushes`` each: one new to the PDA, one
who worked ``--past-shifts`` shifts on it before (one a day, signed off, with their
seqs declared and a hundred scans each stored under them). Prints the median time of
a push of each and their ratio: flat when it stays near 1 (a push reads the shifts
near it and the events it needs, not the PDA's history).

The pushes are the ones ``bench/ingest.py`` builds (parcels taken in beforehand,
checked out, out for delivery, delivered with a proof or a failed attempt), and
every event must come back ``applied`` with no flag raised, or the script exits 1.
SQLite runs on temporary files; ``--database-url`` names a PostgreSQL database whose
schemas ``public`` and ``bench_size_*`` are dropped and recreated.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _tree  # noqa: F401  (this tree first on sys.path, before any project import)
from flask import Flask
from ingest import (  # bench/ingest.py: same pushes, same scratch databases
    EVENTS_PER_PARCEL,
    PDA_CLOCK,
    Bench,
    BenchFailure,
    Pda,
    describe,
    pda_events,
    push_body,
    scratch_app,
)
from sqlalchemy import insert

from courier_api.serve import freeze_startup_objects
from models import DeviceSyncState, Shift, ShiftStatus

PAST_SCANS_PER_SHIFT = 100  # ``shifts``: a day's scans of the veteran's year on the PDA
MEMORY_PDAS = 40  # a PDA's scans are 2 s apart and must stay within a day of its pushes


def sized_app(url: str, instance: Path, schema: str, max_events: int) -> Flask:
    app = scratch_app(url, instance, schema)
    app.config["MAX_EVENTS_PER_PUSH"] = max(max_events, app.config["MAX_EVENTS_PER_PUSH"])
    return app


def push_events(bench: Bench, pda: Pda, count: int) -> float:
    """One push of ``count`` events on new parcels; its wall seconds."""
    parcels = bench.take_in(math.ceil(count / EVENTS_PER_PARCEL))
    sent_at = dt.datetime.now(PDA_CLOCK)
    body = push_body(pda, pda_events(pda, parcels, count, sent_at, bench.rng), sent_at)
    seconds, _cpu = bench.push(pda, body)
    return seconds


def sizes(args: argparse.Namespace, url: str, instance: Path) -> None:
    sizes = sorted(int(size) for size in args.sizes.split(","))
    benches = {}
    for size in sizes:
        app = sized_app(
            url if url != "sqlite" else f"sqlite:///{instance / f'size-{size}.db'}",
            instance,
            f"bench_size_{size}",
            size,
        )
        benches[size] = Bench(app, size, random.Random(size))
        push_events(benches[size], benches[size].pda("warmup", sign_in=True), size)
    freeze_startup_objects()  # as ``courier-api serve`` does before its workers start
    per_event: dict[int, list[float]] = {size: [] for size in sizes}
    for round_no in range(args.rounds):
        order = sizes if round_no % 2 == 0 else list(reversed(sizes))
        for size in order:
            bench = benches[size]
            pda = bench.pda(f"round{round_no}", sign_in=True)
            pushes = max(1, args.events_per_round // size)
            seconds = sum(push_events(bench, pda, size) for _ in range(pushes))
            per_event[size].append(seconds / (pushes * size))
            print(
                f"round {round_no + 1}/{args.rounds}: {pushes} push(es) of {size:,} events, "
                f"{seconds:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    smallest = statistics.median(per_event[sizes[0]])
    print(f"\n{describe(benches[sizes[0]].engine)}; median of {args.rounds} rounds")
    for size in sizes:
        median = statistics.median(per_event[size])
        print(
            f"  batches of {size:>6,}: {median * 1e6:7.1f} us per event "
            f"({1 / median:8,.0f} events/s); per event vs batches of {sizes[0]:,}: "
            f"{median / smallest:.2f}"
        )
    for bench in benches.values():
        bench.engine.dispose()


def memory(args: argparse.Namespace, url: str, instance: Path) -> None:
    app = sized_app(
        url if url != "sqlite" else f"sqlite:///{instance / 'memory.db'}",
        instance,
        "bench_size_memory",
        args.batch_size,
    )
    bench = Bench(app, args.batch_size, random.Random(7))
    pdas = [bench.pda(f"memory-{n:02d}", sign_in=True) for n in range(MEMORY_PDAS)]
    push_events(bench, pdas[0], args.batch_size)  # warm up: first imports, caches
    freeze_startup_objects()
    pushes = math.ceil(args.events / args.batch_size)
    samples: list[tuple[int, int, int]] = []  # (events, RSS bytes, allocated blocks)
    started = time.perf_counter()
    for n in range(1, pushes + 1):
        push_events(bench, pdas[n % MEMORY_PDAS], args.batch_size)
        if n * 10 // pushes > (n - 1) * 10 // pushes:
            events = n * args.batch_size
            samples.append((events, rss_bytes(), sys.getallocatedblocks()))
            print(
                f"{events:>10,} events: RSS {samples[-1][1] / 2**20:7.1f} MiB, "
                f"{samples[-1][2]:>10,} allocated blocks ({time.perf_counter() - started:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    first, last = samples[0], samples[-1]
    print(f"\n{describe(bench.engine)}; {pushes:,} pushes of {args.batch_size:,} events")
    print(
        f"  RSS after {first[0]:,} events: {first[1] / 2**20:.1f} MiB; after {last[0]:,}: "
        f"{last[1] / 2**20:.1f} MiB; growth {(last[1] - first[1]) / 2**20:+.1f} MiB "
        f"({last[1] / first[1]:.2f}x)"
    )
    print(
        f"  allocated blocks after {first[0]:,} events: {first[2]:,}; after {last[0]:,}: "
        f"{last[2]:,} ({last[2] / first[2]:.2f}x)"
    )
    bench.engine.dispose()


def shifts(args: argparse.Namespace, url: str, instance: Path) -> None:
    app = scratch_app(
        url if url != "sqlite" else f"sqlite:///{instance / 'shifts.db'}",
        instance,
        "bench_size_shifts",
    )
    bench = Bench(app, 1, random.Random(11))
    new, veteran = bench.pda("new", sign_in=True), bench.pda("veteran", sign_in=True)
    past_shifts(bench, veteran, args.past_shifts)
    for pda in (new, veteran):
        opened = bench.client.post(
            "/api/v1/shifts", json={"first_seq": pda.last_seq + 1}, headers=pda.headers
        )
        if opened.status_code != 201:
            raise BenchFailure(f"opening a shift: {opened.status_code} {opened.text}")
    scans = {new.device_id: scan_bodies(bench, new, args.pushes)}
    scans[veteran.device_id] = scan_bodies(bench, veteran, args.pushes)
    freeze_startup_objects()
    seconds: dict[str, list[float]] = {new.device_id: [], veteran.device_id: []}
    for n in range(args.pushes):
        for pda in (new, veteran) if n % 2 == 0 else (veteran, new):
            seconds[pda.device_id].append(bench.push(pda, scans[pda.device_id][n])[0])
    fresh = statistics.median(seconds[new.device_id])
    worn = statistics.median(seconds[veteran.device_id])
    print(f"\n{describe(bench.engine)}; one-scan pushes, median of {args.pushes} each")
    veteran_label = (
        f"courier with {args.past_shifts:,} shifts "
        f"({args.past_shifts * PAST_SCANS_PER_SHIFT:,} scans) on it before:"
    )
    width = len(veteran_label) + 1
    print(f"  {'courier new to the PDA:':<{width}}{fresh * 1000:6.2f} ms per push")
    print(f"  {veteran_label:<{width}}{worn * 1000:6.2f} ms per push; ratio {worn / fresh:.2f}")
    bench.engine.dispose()


def past_shifts(bench: Bench, pda: Pda, count: int) -> None:
    """A year on the PDA, as far as ``count`` goes: a shift a day of ``pda``'s courier,
    the last ending two days ago, signed off, each declaring the seqs of its hundred
    scans, which are stored under it (their times those of the day). The PDA's next
    seq follows them."""
    now = dt.datetime.now(dt.UTC)
    for day in range(count):
        opened = now - dt.timedelta(days=count - day + 1)
        with bench.engine.begin() as connection:
            shift_id = connection.execute(
                insert(Shift)
                .values(
                    station_id=bench.station_id,
                    courier_id=pda.courier_id,
                    device_id=pda.device_id,
                    status=ShiftStatus.SIGNED_OFF,
                    work_date=opened.date(),
                    opened_at=opened,
                    planned_end_at=opened + dt.timedelta(hours=9),
                    closed_at=opened + dt.timedelta(hours=9),
                    first_seq=pda.last_seq + 1,
                    last_seq=pda.last_seq + PAST_SCANS_PER_SHIFT,
                )
                .returning(Shift.id)
            ).scalar_one()
        sent_at = (opened + dt.timedelta(hours=9)).astimezone(PDA_CLOCK)
        pda.next_at = opened + dt.timedelta(minutes=5)
        parcels = bench.take_in(math.ceil(PAST_SCANS_PER_SHIFT / EVENTS_PER_PARCEL))
        events = pda_events(pda, parcels, PAST_SCANS_PER_SHIFT, sent_at, bench.rng)
        rows = bench.raw_rows(pda, events, sent_at)
        for row in rows:  # received when sent, on a clock that was right
            row.update(
                occurred_at=row["occurred_at_device"], received_at=sent_at, shift_id=shift_id
            )
        bench.raw_insert(rows)
    pda.next_at = None
    with bench.engine.begin() as connection:
        connection.execute(
            insert(DeviceSyncState).values(
                device_id=pda.device_id,
                acked_through_seq=pda.last_seq,
                max_seq=pda.last_seq,
                missing_ranges=[],
            )
        )


def scan_bodies(bench: Bench, pda: Pda, count: int) -> list[dict[str, Any]]:
    """``count`` pushes of one scan each, parcels' lifecycles in order."""
    sent_at = dt.datetime.now(PDA_CLOCK)
    parcels = bench.take_in(math.ceil(count / EVENTS_PER_PARCEL))
    events = pda_events(pda, parcels, count, sent_at, bench.rng)
    return [push_body(pda, [event], sent_at) for event in events]


def rss_bytes() -> int:
    """This process's resident set size (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join((__doc__ or "").splitlines()[1:]),
    )
    parser.add_argument("what", choices=["sizes", "memory", "shifts"])
    parser.add_argument("--database-url", help="PostgreSQL to wipe; default: SQLite files")
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events-per-round", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--past-shifts", type=int, default=365)
    parser.add_argument("--pushes", type=int, default=301)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as scratch:
        url = args.database_url or "sqlite"
        try:
            {"sizes": sizes, "memory": memory, "shifts": shifts}[args.what](
                args, url, Path(scratch)
            )
        except BenchFailure as failure:
            print(f"bench/scaling.py: {failure}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
