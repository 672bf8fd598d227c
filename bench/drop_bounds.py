"""What keeping drops' bounds (``sync.drop_bounds``, rule 6) costs a push.

    .venv/bin/python bench/drop_bounds.py [--days 10] [--backlog 4998] [--rounds 3]

A PDA's history of ``--days`` days (300 events a day, every third a locker drop,
pushed a day at a time), then two pushes timed: a day's backlog of ``--backlog``
events in one push (every third a locker drop, in order), and one scan stamped five
days early (its clock set back), which bounds the drops of the 12 hours after its
stamp (recorded before it): their parcels are judged again, and the scan gets its
``time_inversion``. Each round runs the whole history twice on fresh SQLite files,
with the bounds kept (as served) and with ``sync.ingest.bound_drops`` stubbed out,
so that both share the machine's drift; prints the medians over the rounds of this
process's CPU per push, each way, and their ratio. Every push must come back
applied, or it exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _tree  # noqa: F401  (this tree first on sys.path, before any project import)
from ingest import Bench, BenchFailure, push_body, scratch_app

from sync import ingest

WAYS = ("bounds kept", "stubbed out")
LIFECYCLE = ("checked_out", "out_for_delivery", "delivered_to_locker")


def lifecycles(
    numbers: list[str], first_seq: int, start: dt.datetime, step: dt.timedelta
) -> list[dict[str, Any]]:
    """Each parcel checked out, out for delivery and left in a locker, ``step`` apart."""
    events = []
    for seq, (tracking_no, kind) in enumerate(
        ((tn, kind) for tn in numbers for kind in LIFECYCLE), start=first_seq
    ):
        event: dict[str, Any] = {
            "client_event_id": str(uuid.uuid4()),
            "seq": seq,
            "type": kind,
            "tracking_no": tracking_no,
            "occurred_at": (start + step * (seq - first_seq)).isoformat(),
        }
        if kind == "delivered_to_locker":
            event.update(locker_id="L-1", compartment="3", pod={"pickup_code": "1234"})
        events.append(event)
    return events


@contextlib.contextmanager
def stubbed(way: str) -> Iterator[None]:
    kept = ingest.bound_drops
    if way == WAYS[1]:
        ingest.bound_drops = lambda *_args, **_kw: ({}, set())  # type: ignore[assignment]
    try:
        yield
    finally:
        ingest.bound_drops = kept  # type: ignore[assignment]


def timed_flagging(push: Any) -> float:
    """CPU seconds of ``push()``, which applies every event and raises flags."""
    cpu = time.process_time()
    try:
        push()
    except BenchFailure as failure:
        if " raised [" not in str(failure):  # anything but the flags it should raise
            raise
    else:
        raise BenchFailure("the backdated scan raised no flag")
    return time.process_time() - cpu


def one_round(args: argparse.Namespace, way: str) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="bench-drops-") as scratch, stubbed(way):
        instance = Path(scratch)
        app = scratch_app(f"sqlite:///{instance / 'd.db'}", instance)
        bench = Bench(app, 5000, random.Random(20261203))
        pda = bench.pda("drops", sign_in=True)
        now = dt.datetime.now(dt.UTC)
        seq = 1
        for day in range(args.days, 0, -1):
            events = lifecycles(
                bench.take_in(100), seq, now - dt.timedelta(days=day), dt.timedelta(seconds=100)
            )
            bench.push(pda, push_body(pda, events, now))
            seq += len(events)
        backlog = lifecycles(
            bench.take_in(args.backlog // 3),
            seq,
            now - dt.timedelta(hours=14),
            dt.timedelta(seconds=8),
        )
        seq += len(backlog)
        _, backlog_cpu = bench.push(pda, push_body(pda, backlog, now))
        early = lifecycles(
            bench.take_in(1), seq, now - dt.timedelta(days=5, hours=1), dt.timedelta(0)
        )[:1]
        early_cpu = timed_flagging(lambda: bench.push(pda, push_body(pda, early, now)))
        bench.engine.dispose()
        return backlog_cpu, early_cpu


def main() -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join((__doc__ or "").splitlines()[1:]),
    )
    parser.add_argument("--days", type=int, default=10, help="days of history first")
    parser.add_argument("--backlog", type=int, default=4998, help="events in the backlog push")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each way")
    args = parser.parse_args()
    figures: dict[str, list[tuple[float, float]]] = {way: [] for way in WAYS}
    for number in range(args.rounds * 2):
        way = WAYS[number % 2]
        figures[way].append(one_round(args, way))
        backlog, early = figures[way][-1]
        print(
            f"round {number // 2 + 1} {way}: backlog {backlog * 1000:.0f} ms CPU, "
            f"backdated scan {early * 1000:.1f} ms CPU",
            file=sys.stderr,
            flush=True,
        )
    print(f"\nSQLite, medians of {args.rounds} rounds, process CPU per push (ms)")
    print(f"  {'':40} {WAYS[0]:>12} {WAYS[1]:>12} {'ratio':>7}")
    for index, title in enumerate(
        (f"a backlog of {args.backlog} events, 1/3 drops", "one scan stamped 5 days early")
    ):
        kept, stub = (statistics.median(f[index] for f in figures[way]) * 1000 for way in WAYS)
        print(f"  {title:40} {kept:12.1f} {stub:12.1f} {kept / stub:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
