"""What rejected events cost a PDA's pushes: one push of many malformed events, and
the pushes after them.

    .venv/bin/python bench/rejected.py [--database-url URL] [--rejected 5000] [--lone 50]

A PDA pushes one scan, then one push of ``--rejected`` malformed events (an event
type the server does not know: each is answered ``rejected`` and kept in
quarantine), then one scan, then ``--lone`` pushes of one malformed event each (a
PDA whose scanner is broken). Prints the wall time and the SQL statements of each
push (savepoints included, not the BEGIN): a rejected seq next to a push must cost a
constant number of statements (rule 6 looks past it in one search, not one
seq at a time), however many came before.

SQLite runs on a temporary file; ``--database-url`` names a PostgreSQL database
whose ``public`` schema is dropped and recreated (never point it at data you want
to keep).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import _tree  # noqa: F401  (this tree first on sys.path, before any project import)
from ingest import Bench, request_engines, require_postgres, scratch_app  # bench/ingest.py
from sqlalchemy import event


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url")
    parser.add_argument("--rejected", type=int, default=5000)
    parser.add_argument("--lone", type=int, default=50)
    args = parser.parse_args()
    if args.database_url:
        require_postgres(args.database_url)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'rejected.db'}"
        app = scratch_app(url, Path(tmp))
        bench = Bench(app, 1, random.Random(1))
        pda = bench.pda("broken", sign_in=True)
        [tracking_no] = bench.take_in(1)
        sent: list[str] = []
        for engine in request_engines(bench.engine):
            event.listen(engine, "before_cursor_execute", lambda *_: sent.append(""))

        def push(events: list[dict[str, Any]]) -> tuple[float, int]:
            now = dt.datetime.now(dt.UTC)
            body = {
                "device_id": pda.device_id,
                "batch_id": str(uuid.uuid4()),
                "sent_at": now.isoformat(),
                "events": events,
            }
            data = json.dumps(body)
            sent.clear()
            started = time.perf_counter()
            response = bench.client.post(
                "/api/v1/sync/push",
                data=data,
                content_type="application/json",
                headers=pda.headers,
            )
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise SystemExit(f"push answered {response.status_code}: {response.text[:300]}")
            return elapsed, len(sent)

        def scan(seq: int, type: str = "checked_out") -> dict[str, Any]:
            when = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3, milliseconds=-seq)
            return {
                "client_event_id": str(uuid.uuid4()),
                "seq": seq,
                "type": type,
                "tracking_no": tracking_no,
                "occurred_at": when.isoformat(),
            }

        print(f"backend: {bench.engine.dialect.name}")
        report("first scan", push([scan(1)]))
        last = 1 + args.rejected
        malformed = [scan(seq, "no_such_type") for seq in range(2, last + 1)]
        report(f"{args.rejected:,} malformed events in one push", push(malformed))
        report("the next scan", push([scan(last + 1, "out_for_delivery")]))
        lone = [push([scan(last + 1 + n, "no_such_type")]) for n in range(1, args.lone + 1)]
        if lone:
            report("the 1st lone malformed push", lone[0])
            if len(lone) > 5:
                report("the 5th lone malformed push", lone[4])
            report(f"the {len(lone)}th lone malformed push", lone[-1])
    return 0


def report(label: str, measured: tuple[float, int]) -> None:
    seconds, statements = measured
    print(f"  {label:<42} {seconds * 1000:9.1f} ms  {statements:6,} statements")


if __name__ == "__main__":
    raise SystemExit(main())
