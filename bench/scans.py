"""One-scan pushes, as an online PDA sends them, with and without ``sync.direct``.

    .venv/bin/python bench/scans.py [--database-url URL] [--parcels 100] [--rounds 6]

A courier's PDA pushes each parcel's lifecycle one event at a time (checked out,
out for delivery, delivered with a proof or a failed attempt: ``bench/ingest.py``'s
events) through Flask's test client, in rounds that alternate between the push
path's prebuilt statements run on the driver's cursor (``sync.direct``, as
served) and run through SQLAlchemy's execution (``DirectStatement.template``
patched to give none), so that both share the machine's drift. Each round takes
``--parcels`` new parcels. Prints, for each way, the medians over its rounds of:
this process's CPU per push (all of SQLite's work, none of PostgreSQL's), wall time
per push, and on SQLite the writers' turn per push (``BEGIN IMMEDIATE`` to its
release, the span every other push waits for); the statements per push, and the
ratio of the two ways. Every push must come back ``applied``, or it exits 1. (The
session's connection is kept for its transaction both ways: ``sync.sql.
flushed_connection``; what differs is only how the statements run.)

SQLite runs on a temporary file; ``--database-url`` names a PostgreSQL database
whose ``public`` schema is dropped and recreated (never point it at data you
want to keep).
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _tree  # noqa: F401  (this tree first on sys.path, before any project import)
from ingest import Bench, Pda, pda_events, push_body, require_postgres, scratch_app

from courier_api.serve import freeze_startup_objects
from models import turnstile
from sync import direct

WAYS = ("direct", "SQLAlchemy")


class TurnTimer:
    """Each span from taking SQLite's writers' turn to giving it back."""

    def __init__(self) -> None:
        self.spans: list[float] = []
        self._taken: dict[int, float] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        take, give = (
            turnstile.TurnstileConnection.take_turn,
            turnstile.TurnstileConnection.give_turn,
        )
        timer = self

        def timed_take(connection: Any) -> None:
            take(connection)
            timer._taken[id(connection)] = time.perf_counter()

        def timed_give(connection: Any) -> None:
            held = connection.holds_turn
            give(connection)
            taken = timer._taken.pop(id(connection), None)
            if held and taken is not None:
                timer.spans.append(time.perf_counter() - taken)

        turnstile.TurnstileConnection.take_turn = timed_take  # type: ignore[method-assign]
        turnstile.TurnstileConnection.give_turn = timed_give  # type: ignore[method-assign]
        try:
            yield
        finally:
            turnstile.TurnstileConnection.take_turn = take  # type: ignore[method-assign]
            turnstile.TurnstileConnection.give_turn = give  # type: ignore[method-assign]


@contextlib.contextmanager
def through_sqlalchemy() -> Iterator[None]:
    """Every prebuilt statement run by SQLAlchemy, as before ``sync.direct``."""
    template = direct.DirectStatement.template
    direct.DirectStatement.template = lambda _self, _params: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        direct.DirectStatement.template = template  # type: ignore[method-assign]


def one_round(bench: Bench, pda: Pda, parcels: int, rng: random.Random) -> list[dict[str, Any]]:
    """The events of ``parcels`` new parcels' lifecycles, in the order they are scanned."""
    events: list[dict[str, Any]] = []
    for tracking_no in bench.take_in(parcels):
        events += pda_events(pda, [tracking_no], 3, dt.datetime.now(dt.UTC), rng)
    return events


def push_each(bench: Bench, pda: Pda, events: list[dict[str, Any]]) -> tuple[float, float, int]:
    """CPU and wall seconds per push, and statements per push, pushing one at a time."""
    statements = bench.statements_sent
    cpu, wall = time.process_time(), time.perf_counter()
    for event in events:
        bench.push(pda, push_body(pda, [event], dt.datetime.now(dt.UTC)))
    count = len(events)
    return (
        (time.process_time() - cpu) / count,
        (time.perf_counter() - wall) / count,
        round((bench.statements_sent - statements) / count),
    )


def run(url: str, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-scans-") as scratch:
        instance = Path(scratch)
        app = scratch_app(url if url != "sqlite" else f"sqlite:///{instance / 's.db'}", instance)
        rng = random.Random(20261201)
        bench = Bench(app, 3, rng)
        pda = bench.pda("scans", sign_in=True)
        timer = TurnTimer()
        figures: dict[str, dict[str, list[float]]] = {
            way: {"cpu": [], "wall": [], "turn": [], "statements": []} for way in WAYS
        }
        label = bench.engine.dialect.name
        try:
            push_each(bench, pda, one_round(bench, pda, 20, rng))  # warm-up, both ways
            with through_sqlalchemy():
                push_each(bench, pda, one_round(bench, pda, 20, rng))
            freeze_startup_objects()  # as ``courier-api serve`` does
            with timer.installed():
                for number in range(args.rounds * 2):
                    way = WAYS[number % 2]
                    events = one_round(bench, pda, args.parcels, rng)
                    timer.spans.clear()
                    with through_sqlalchemy() if way == "SQLAlchemy" else contextlib.nullcontext():
                        cpu, wall, statements = push_each(bench, pda, events)
                    figures[way]["cpu"].append(cpu)
                    figures[way]["wall"].append(wall)
                    figures[way]["statements"].append(statements)
                    if timer.spans:
                        figures[way]["turn"].append(statistics.median(timer.spans))
                    print(
                        f"{label} round {number // 2 + 1} {way}: {len(events)} pushes, "
                        f"{cpu * 1000:.2f} ms CPU per push",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            bench.engine.dispose()
        report(label, figures, args)


def report(
    label: str, figures: dict[str, dict[str, list[float]]], args: argparse.Namespace
) -> None:
    pushes = args.parcels * 3
    print(f"\n{label}: one-scan pushes, {args.rounds} rounds of {pushes} each way, medians")
    print(f"  {'':34} {'direct':>10} {'SQLAlchemy':>11} {'ratio':>7}")
    rows = [
        ("process CPU per push, ms", "cpu", 1000),
        ("wall time per push, ms", "wall", 1000),
        ("writers' turn per push, ms", "turn", 1000),
        ("SQL statements per push", "statements", 1),
    ]
    for title, key, scale in rows:
        if not figures["direct"][key]:
            continue  # no turn outside a SQLite file
        mine, theirs = (statistics.median(figures[way][key]) * scale for way in WAYS)
        print(f"  {title:34} {mine:10.2f} {theirs:11.2f} {mine / theirs:7.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join((__doc__ or "").splitlines()[1:]),
    )
    parser.add_argument("--database-url", help="PostgreSQL to wipe; default: SQLite")
    parser.add_argument("--parcels", type=int, default=100, help="parcels per round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each way")
    args = parser.parse_args()
    if args.database_url:
        require_postgres(args.database_url)
    run(args.database_url or "sqlite", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
