"""Machine instructions a one-scan push and a ``/healthz`` cost the app, counted by
callgrind: a measure that does not move with the machine's load.

    .venv/bin/python bench/push_instructions.py [--pushes 300] [--healthz 300]

Runs itself again under ``valgrind --tool=callgrind`` (which must be installed, with
its headers, and a C compiler: a two-function library issues callgrind's client
requests). The app is built as ``courier-api serve`` builds it (``APP_ENV=production``,
the JSON access line at INFO, written to ``/dev/null``) on a migrated SQLite file; a
courier's PDA signs in and opens a shift, as in ``bench/load.py``. Then, each request
called through the app's WSGI callable (no server, no client; every environ built
beforehand), after a warm-up: ``--pushes`` one-scan pushes (``bench/load.py``'s
online PDA: each new parcel checked out, out for delivery, then delivered with a proof
or a failed attempt, one event a push), then ``--healthz`` ``GET /healthz``. Every push
must come back 200 and ``applied``, or it exits 1. The database is migrated
beforehand, outside valgrind (there it takes minutes), and no listener counts
statements (the server has none).

Prints instructions per push, per ``/healthz`` and their ratio, and (counted apart, by
the same run without valgrind) this process's CPU per request. Instructions include
SQLite's own work; time spent waiting (``fsync`` at commit) is not an instruction.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import _tree  # noqa: F401  (this tree first on sys.path, before any project import)
from ingest import PDA_CLOCK, Bench, Pda, pda_events, push_body, request_engines, scratch_app
from sqlalchemy import event
from werkzeug.test import EnvironBuilder

from courier_api.extensions import db
from courier_api.logs import configure_logging
from courier_api.serve import freeze_startup_objects

WARM_UP_PUSHES = 30
CLIENT_REQUESTS_C = """
#include <valgrind/callgrind.h>
int running_on_valgrind(void) { return RUNNING_ON_VALGRIND; }
void zero_stats(void) { CALLGRIND_ZERO_STATS; }
void dump_stats(const char *label) { CALLGRIND_DUMP_STATS_AT(label); }
"""


def client_requests(scratch: Path) -> ctypes.CDLL:
    """callgrind's client requests (inline machine code in C macros), as a tiny library."""
    source, library = scratch / "callgrind_requests.c", scratch / "callgrind_requests.so"
    source.write_text(CLIENT_REQUESTS_C)
    subprocess.run(["cc", "-O1", "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    return ctypes.CDLL(str(library))


def wsgi_call(app: Any, environ: dict[str, Any]) -> tuple[str, bytes]:
    """The status and body of one request, as a WSGI server gets them."""
    answer: dict[str, str] = {}

    def start_response(status: str, _headers: Any, _exc_info: Any = None) -> Callable[..., Any]:
        answer["status"] = status
        return lambda _data: None

    result: Iterable[bytes] = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return answer["status"], body


# A push's sent_at, written into its prebuilt body as it is sent: a body stamped when
# it was built would reach a server slowed by valgrind minutes later, and its PDA be
# flagged for a skewed clock (another path than an online PDA's).
SENT_AT_MARK = b"SENT_AT_" * 4  # as long as PDA_CLOCK's isoformat with microseconds


def sent_now() -> bytes:
    return dt.datetime.now(PDA_CLOCK).isoformat(timespec="microseconds").encode()


def push_environs(pda: Pda, parcels: list[str], rng: random.Random) -> list[dict[str, Any]]:
    """One environ per scan of ``parcels``' lifecycles, one event a push, as sent (but
    for its ``sent_at``, stamped by ``stamped``)."""
    environs = []
    assert len(sent_now()) == len(SENT_AT_MARK)
    for tracking_no in parcels:
        for scan in pda_events(pda, [tracking_no], 3, dt.datetime.now(PDA_CLOCK), rng):
            body = {
                **push_body(pda, [scan], dt.datetime.now(PDA_CLOCK)),
                "sent_at": SENT_AT_MARK.decode(),
            }
            environs.append(
                EnvironBuilder(
                    path="/api/v1/sync/push",
                    method="POST",
                    data=json.dumps(body).encode(),
                    content_type="application/json",
                    headers=pda.headers,
                ).get_environ()
            )
    return environs


def stamped(environ: dict[str, Any]) -> dict[str, Any]:
    """``environ`` with its body's ``sent_at`` now."""
    body = environ["wsgi.input"].read()
    stamped_body = body.replace(SENT_AT_MARK, sent_now(), 1)
    return {**environ, "wsgi.input": io.BytesIO(stamped_body)}


def healthz_environs(count: int) -> list[dict[str, Any]]:
    return [EnvironBuilder(path="/healthz").get_environ() for _ in range(count)]


def run_pushes(app: Any, environs: list[dict[str, Any]]) -> None:
    for environ in environs:
        status, body = wsgi_call(app, stamped(environ))
        receipt = json.loads(body) if status.startswith("200") else {}
        if [r["status"] for r in receipt.get("results", [])] != ["applied"]:
            raise SystemExit(f"a push was not applied: {status} {body[:300]!r}")
        if receipt["flags_raised"]:  # another path than a clean scan's
            raise SystemExit(f"a push raised flags: {receipt['flags_raised']}")


def run_healthz(app: Any, environs: list[dict[str, Any]]) -> None:
    for environ in environs:
        status, body = wsgi_call(app, environ)
        if not status.startswith("200"):
            raise SystemExit(f"/healthz answered {status} {body[:300]!r}")


def measure(args: argparse.Namespace, scratch: Path) -> None:
    """The measured process: under callgrind it dumps a profile after each part."""
    requests = client_requests(scratch) if args.under_valgrind else None
    os.environ["APP_ENV"] = "production"
    os.environ["LOG_LEVEL"] = "INFO"
    if args.migrated is not None:  # migrating under valgrind would take minutes
        shutil.copyfile(args.migrated, scratch / "push.db")
    app = scratch_app(f"sqlite:///{scratch / 'push.db'}", scratch)
    app.config.update(APP_ENV="production", TESTING=False, LOG_LEVEL="INFO")
    # The access line at INFO, formatted and redacted as served, written nowhere.
    configure_logging("INFO", "json", stream=open(os.devnull, "w"), force=True)  # noqa: SIM115
    rng = random.Random(20261205)
    engines = request_engines(db.engine_of(app))
    # Whether each engine has connection listeners as the server builds it: removing
    # the bench's counter below leaves SQLAlchemy's flag set, and every connection
    # event dispatched as in no server.
    served = {engine: engine._has_events for engine in engines}
    bench = Bench(app, 3, rng)
    pda = bench.pda("instructions", sign_in=True)
    for engine in engines:  # the server counts no statements
        event.remove(engine, "before_cursor_execute", bench._count_statement)
        engine._has_events = served[engine]
    opened = bench.client.post("/api/v1/shifts", json={"first_seq": 1}, headers=pda.headers)
    if opened.status_code != 201:
        raise SystemExit(f"opening the shift: {opened.status_code} {opened.text[:300]}")
    warm_up = push_environs(pda, bench.take_in(WARM_UP_PUSHES // 3), rng)
    pushes = push_environs(pda, bench.take_in(-(-args.pushes // 3)), rng)[: args.pushes]
    probes = healthz_environs(args.healthz)
    run_pushes(app, warm_up)
    run_healthz(app, healthz_environs(WARM_UP_PUSHES))
    freeze_startup_objects()  # as ``courier-api serve`` does
    if requests is not None:
        requests.zero_stats()
        run_pushes(app, pushes)
        requests.dump_stats(b"pushes")
        run_healthz(app, probes)
        requests.dump_stats(b"healthz")
        return
    started = time.process_time()
    run_pushes(app, pushes)
    push_cpu = (time.process_time() - started) / len(pushes)
    started = time.process_time()
    run_healthz(app, probes)
    healthz_cpu = (time.process_time() - started) / len(probes)
    (scratch / "cpu.json").write_text(json.dumps({"push": push_cpu, "healthz": healthz_cpu}))


def dumped_instructions(directory: Path) -> dict[str, int]:
    """Each dump's label and its instructions (the ``summary:`` line)."""
    counts: dict[str, int] = {}
    for path in directory.glob("callgrind.out.*"):
        label = total = None
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("desc: Trigger: Client Request: "):
                label = line.removeprefix("desc: Trigger: Client Request: ").strip()
            elif line.startswith(("summary:", "totals:")):
                total = int(line.split()[1])
        if label is not None and total is not None:
            counts[label] = total
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join((__doc__ or "").splitlines()[1:]),
    )
    parser.add_argument("--pushes", type=int, default=300, help="one-scan pushes counted")
    parser.add_argument("--healthz", type=int, default=300, help="GET /healthz counted")
    parser.add_argument(
        "--keep", type=Path, help="keep callgrind's profiles here (for callgrind_annotate)"
    )
    parser.add_argument("--under-valgrind", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--migrated", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--migrate-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.migrate_only is not None:
        scratch_app(f"sqlite:///{args.migrate_only}", args.migrate_only.parent)
        return 0
    if args.scratch is not None:
        args.scratch.mkdir(exist_ok=True)
        measure(args, args.scratch)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as scratch_dir:
        scratch = Path(scratch_dir)
        profiles = args.keep or scratch / "profiles"
        profiles.mkdir(parents=True, exist_ok=True)
        migrated = scratch / "migrated.db"
        subprocess.run([sys.executable, __file__, f"--migrate-only={migrated}"], check=True)
        own = [
            sys.executable,
            __file__,
            f"--pushes={args.pushes}",
            f"--healthz={args.healthz}",
            f"--migrated={migrated}",
        ]
        subprocess.run([*own, f"--scratch={scratch / 'cpu'}"], check=True, cwd=scratch)
        cpu = json.loads((scratch / "cpu" / "cpu.json").read_text())
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={profiles}/callgrind.out.%p",
                f"--log-file={scratch}/valgrind.log",
                *own,
                "--under-valgrind",
                f"--scratch={scratch / 'vg'}",
            ],
            check=True,
            cwd=scratch,
        )
        counts = dumped_instructions(profiles)
    push = counts["pushes"] / args.pushes
    healthz = counts["healthz"] / args.healthz
    push_ms, healthz_ms = cpu["push"] * 1000, cpu["healthz"] * 1000
    print(f"instructions per one-scan push: {push:12,.0f}  (CPU {push_ms:.3f} ms)")
    print(f"instructions per GET /healthz:  {healthz:12,.0f}  (CPU {healthz_ms:.3f} ms)")
    print(f"push / healthz: {push / healthz:.2f} (instructions), {push_ms / healthz_ms:.2f} (CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
