"""What unsettled seq_conflict rejections cost a PDA's later pushes.

    .venv/bin/python bench/seq_conflicts.py [--database-url URL] [--refused 2000] [--pushes 30]

A PDA pushes ``--refused`` scans, then, numbered from 1 again (a reboot), as many other
scans, each refused ``seq_conflict`` and never sent again (a PDA that never recovers),
then ``--pushes`` pushes of one new scan each. Prints the median wall time, CPU time
of this process (the server's work on SQLite, the client's too: less noisy than the
wall on a busy machine) and SQL statements of those pushes, and the same for a PDA with
no rejection beside it: the difference is what the unsettled rejections cost a push.

SQLite runs on a temporary file; ``--database-url`` names a PostgreSQL database
whose ``public`` schema is dropped and recreated (never point it at data you want
to keep).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _tree  # noqa: F401  (this tree first on sys.path, before any project import)
from ingest import Bench, request_engines, require_postgres, scratch_app  # bench/ingest.py
from sqlalchemy import event


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url")
    parser.add_argument("--refused", type=int, default=2000)
    parser.add_argument("--pushes", type=int, default=30)
    args = parser.parse_args()
    if args.database_url:
        require_postgres(args.database_url)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'seq_conflicts.db'}"
        app = scratch_app(url, Path(tmp))
        bench = Bench(app, 1, random.Random(1))
        parcels = bench.take_in(400)  # 200 a PDA: a push's parcel has 20 events or so
        sent: list[str] = []
        for engine in request_engines(bench.engine):
            event.listen(engine, "before_cursor_execute", lambda *_: sent.append(""))

        def push(pda: Any, events: list[dict[str, Any]]) -> tuple[float, float, int]:
            body = {
                "device_id": pda.device_id,
                "batch_id": str(uuid.uuid4()),
                "sent_at": dt.datetime.now(dt.UTC).isoformat(),
                "events": events,
            }
            data = json.dumps(body)
            sent.clear()
            started, cpu = time.perf_counter(), time.process_time()
            response = bench.client.post(
                "/api/v1/sync/push",
                data=data,
                content_type="application/json",
                headers=pda.headers,
            )
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            if response.status_code != 200:
                raise SystemExit(f"push answered {response.status_code}: {response.text[:300]}")
            return elapsed, cpu, len(sent)

        def scan(seq: int, minutes: int = 0, mine: Sequence[str] = ()) -> dict[str, Any]:
            when = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3, minutes=-minutes)
            return {
                "client_event_id": str(uuid.uuid4()),
                "seq": seq,
                "type": "out_for_delivery",
                "tracking_no": mine[seq % len(mine)],
                "occurred_at": (when + dt.timedelta(milliseconds=seq)).isoformat(),
            }

        print(f"backend: {bench.engine.dialect.name}")
        pdas = (("no rejection", 0), (f"{args.refused:,} unsettled", args.refused))
        for n, (label, refused) in enumerate(pdas):
            pda = bench.pda(f"pda-{refused}", sign_in=True)
            mine = parcels[n * 200 : (n + 1) * 200]
            push(pda, [scan(seq, 0, mine) for seq in range(1, args.refused + 1)])
            if refused:  # numbered from 1 again: each refused seq_conflict
                push(pda, [scan(seq, 1, mine) for seq in range(1, refused + 1)])
            first = args.refused + 1
            runs = [push(pda, [scan(first + k, 2, mine)]) for k in range(args.pushes)]
            wall, cpu, statements = (statistics.median(run[i] for run in runs) for i in range(3))
            print(
                f"  {label:<18} {wall * 1000:7.1f} ms wall {cpu * 1000:7.1f} ms CPU "
                f"{statements:4.0f} statements"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
