"""Load test of the real server: many PDAs at once, over HTTP, next to the framework's ceiling.

    .venv/bin/python bench/load.py [--pdas 20] [--duration 30] [--workers 2] [--threads 8]
                                   [--readers 2] [--scan-duration 15] [--trivial-duration 15]
                                   [--rounds 3] [--database-url URL] [--seed 1]
                                   [--turn-stats]

Starts ``courier-api serve`` (gunicorn, ``--workers`` processes of ``--threads``
threads) on loopback, on a fresh SQLite file (default) or on ``--database-url``
(PostgreSQL: its schema ``public`` is dropped and recreated, so name a database the
script may wipe, e.g. ``courier_bench``). Prepares a station as an operator would:
migrations, the station and an admin with the CLI; then through the API a manager,
an auditor, one courier and one PDA per simulated PDA, proof images (real PNGs),
and the parcels each PDA will scan (taken in with ``POST /api/v1/parcels``).

Then ``--pdas`` simulated PDAs (asyncio + httpx, one connection each) sign in, open
a shift and, for ``--duration`` seconds, push batches of ``--batch-size`` events
(a lifecycle per parcel, as ``bench/ingest.py`` builds them: checked out, out for
delivery, delivered with a proof or a failed attempt) and pull their feed after each
push; ``--readers`` more clients read as a manager (the station board, a shift's
balance) and as an auditor (proof searches). Every push must be answered 200 with
every event ``applied``. A progress line is printed every ``--progress`` seconds.

Then the same PDAs push as online PDAs do, each scan as it happens (one event per
push, the parcel's lifecycle in order), for ``--scan-duration`` seconds; and the same
concurrency (``--pdas`` + ``--readers`` clients) calls ``GET /healthz`` for
``--trivial-duration`` seconds: what the server answers when a request does no
work, the ceiling of gunicorn + Flask here. The two alternate in ``--rounds`` rounds,
each phase's time split evenly, so that both share the machine's drift in speed
(seen here: ``/healthz`` from 465 to 980 requests/s between runs minutes apart); the
ratio of each round is printed too. The report gives, per kind of request,
the throughput and the latency percentiles, and the ratios:

* scan-push throughput / trivial throughput, in requests per second (target >= 0.4):
  what a push of one scan costs next to a request that does nothing;
* p99 / p50 of the ``--batch-size`` push under the mixed load (target < 10): how much
  worse the slow pushes are;
* for scale, the batch pushes' requests and events per second next to the trivial
  requests per second.

Both are printed with "met" or "not met". Last, for each phase, the processor time per
request of the server, of this script (the clients) and of PostgreSQL's processes,
how busy the machine's cores were (``/proc/stat``: every process and the kernel) and
how much of one core this script took: a phase that leaves the cores idle is bound
by a lock (on SQLite, its writers' turn), one whose client takes near a whole core
by the one-process client (so, often, is ``/healthz``: the ceiling is then the
client's), a busy one by the processors. The exit status is 1 only when something
failed (an error answer, a rejected event, the server's log showing a traceback).
The client runs on the same machine and takes CPU from the server: on a small
machine, compare figures taken with the same options only.

``--turn-stats`` (SQLite) also records each writers' turn in the server's processes
(``bench/turn_stats``, one line a turn) and reports, for the mixed load and the scans,
the turns a second, how long each was held, and how the rest of the time went: passed
on while a writer was waiting (within a process, or to another), free with nobody
waiting, or at the edges of each round (before its first turn, after its last). A scan
phase whose turn is held or being passed on nearly all the time is bound by the turn.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import io
import itertools
import json
import math
import os
import random
import secrets
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _tree  # noqa: F401  (this tree first on sys.path, before any project import)
import httpx
from ingest import (  # bench/ingest.py: the same PDA lifecycles
    EVENTS_PER_PARCEL,
    PDA_CLOCK,
    PROOF_IMAGES,
    Pda,
    pda_events,
    push_body,
    require_postgres,
    tracking_numbers,
)
from PIL import Image
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.live_server import Server, free_port, run_cli

STATION = "LOAD"
ADMIN = ("load-admin", "load-admin-password")
MANAGER = ("load-manager", "load-manager-password")
AUDITOR = ("load-auditor", "load-auditor-password")
COURIER_PASSWORD = "load-courier-password"
INTAKE_CHUNK = 5000
PROOF_IMAGE_COUNT = 16
TARGET_PUSH_RATIO = 0.4
TARGET_TAIL_RATIO = 10.0
REQUEST_TIMEOUT_SECONDS = 60.0
# httpx makes a TLS context for each client, about 25 ms of CPU even for plain HTTP: 20
# clients took half a second of each phase's clock before its first request. One for all.
_TLS = ssl.create_default_context()


class LoadFailure(Exception):
    """The server did not behave as the load test needs; the run exits 1."""


@dataclass
class Tally:
    """Latencies (seconds) and answers per kind of request."""

    started: float = field(default_factory=time.perf_counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    events: int = 0
    failures: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    def record(self, kind: str, seconds: float, status: int) -> None:
        self.latencies[kind].append(seconds)
        self.statuses[kind][status] += 1

    def requests(self) -> int:
        return sum(len(values) for values in self.latencies.values())

    def rate(self, kind: str, seconds: float) -> float:
        return len(self.latencies.get(kind, [])) / seconds if seconds > 0 else 0.0

    def absorb(self, other: Tally) -> None:
        """Add what ``other`` counted (another round of the same phase)."""
        for kind, values in other.latencies.items():
            self.latencies[kind].extend(values)
        for kind, counts in other.statuses.items():
            self.statuses[kind].update(counts)
        self.events += other.events
        self.failures.extend(other.failures)
        self.notices.extend(other.notices)


@dataclass(frozen=True)
class CpuTimes:
    """Processor seconds used by the server (master and workers), this script (the
    simulated clients) and PostgreSQL's processes on this machine (all of them: nothing
    else should use it during a run)."""

    server: float
    client: float
    database: float
    machine: float = 0.0  # every process's and the kernel's (``/proc/stat``), all cores

    def plus(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(
            self.server + other.server,
            self.client + other.client,
            self.database + other.database,
            self.machine + other.machine,
        )


@dataclass(frozen=True)
class CpuSample:
    """What ``/proc`` says each process of the server and of PostgreSQL has used so far
    (nothing where there is no ``/proc``), and this script's own time."""

    processes: dict[int, tuple[str, float]]  # pid: ("server" or "database", seconds)
    client: float
    machine: float  # seconds the machine's cores were busy, all of them (0 without /proc)

    @classmethod
    def now(cls, server_group: int | None) -> CpuSample:
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        processes: dict[int, tuple[str, float]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:  # the process ended meanwhile
                continue
            name = text[text.index("(") + 1 : text.rindex(")")]
            fields = text[text.rindex(")") + 2 :].split()  # from field 3, "state", on
            used = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            if server_group is not None and int(fields[2]) == server_group:  # pgrp
                processes[int(stat.parent.name)] = ("server", used)
            elif name == "postgres":
                processes[int(stat.parent.name)] = ("database", used)
        return cls(processes, time.process_time(), _machine_busy(tick))

    def since(self, start: CpuSample) -> CpuTimes:
        """Used between ``start`` and now, by the processes alive now (one that ended
        in between, such as a closed connection's backend, is left out: subtracting
        its whole time would undercount)."""
        totals = {"server": 0.0, "database": 0.0}
        for pid, (role, used) in self.processes.items():
            before = start.processes.get(pid, (role, 0.0))
            totals[role] += used - (before[1] if before[0] == role else 0.0)
        return CpuTimes(
            totals["server"],
            self.client - start.client,
            totals["database"],
            self.machine - start.machine,
        )


def _machine_busy(tick: int) -> float:
    """Seconds the machine's cores have been busy since boot: ``/proc/stat``'s first
    line, all but idle and iowait (the kernel's work for the loopback included, which
    no process's own times show)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    # user, nice, system, idle, iowait, irq, softirq, steal
    jiffies = [int(field) for field in fields[:8]]
    return (sum(jiffies) - jiffies[3] - jiffies[4]) / tick


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)]


def proof_images(count: int) -> list[bytes]:
    """Small, distinct, real PNG images (the server decodes what it is sent)."""
    images = []
    for n in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 24), (n * 13 % 256, 80, 160)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


# -- the server and its data -----------------------------------------------------------------


def prepare_database(url: str | None, workdir: Path) -> str:
    if url is None:
        return f"sqlite:///{workdir / 'load.db'}"
    if make_url(url).get_backend_name() != "postgresql":
        raise SystemExit("--database-url must be a PostgreSQL URL (the default is SQLite)")
    require_postgres(url)
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return url


def server_env(database_url: str, workdir: Path) -> dict[str, str]:
    (workdir / "run").mkdir(exist_ok=True)
    return {
        **os.environ,
        "APP_ENV": "production",
        "DATABASE_URL": database_url,
        "JWT_SECRET": secrets.token_urlsafe(48),
        "BLOB_DIR": str(workdir / "blobs"),
        "INSTANCE_PATH": str(workdir / "instance"),
        # Accounts are made for the run: a quick hash keeps the set-up short. Signing in
        # is not what is measured.
        "PASSWORD_HASH_METHOD": "pbkdf2:sha256:1000",
        "SCHEDULER_IN_WEB": "false",
        # Every simulated PDA signs in from 127.0.0.1 at the same moment.
        "SIGN_IN_ATTEMPTS_PER_ADDRESS": "100000/60",
        "XDG_RUNTIME_DIR": str(workdir / "run"),
    }


class Api:
    """Blocking calls for the set-up (httpx, one connection)."""

    def __init__(self, base: str) -> None:
        self.client = httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT_SECONDS)

    def close(self) -> None:
        self.client.close()

    def call(
        self, method: str, path: str, token: str | None = None, expect: int = 200, **kw: Any
    ) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = self.client.request(method, path, headers=headers, **kw)
        if response.status_code != expect:
            raise LoadFailure(f"{method} {path}: {response.status_code} {response.text[:300]}")
        return response.json() if response.content else None

    def sign_in(self, username: str, password: str, device_id: str | None = None) -> str:
        body = {"username": username, "password": password}
        if device_id:
            body["device_id"] = device_id
        return str(self.call("POST", "/api/v1/auth/token", json=body)["access_token"])


@dataclass
class PdaState:
    """One simulated PDA across the phases: its account, sequence numbers and parcels."""

    username: str
    device_id: str
    parcels: list[str]  # of its own for the mixed load, pushed in order
    scan_parcels: list[str]  # of its own for the one-scan pushes, scanned in order
    pda: Pda
    next_parcel: int = 0
    next_scan_parcel: int = 0
    token: str | None = None
    # Scans of the parcel in hand not pushed yet when a round of scans ended: the next
    # round pushes them first, so that the PDA's seqs arrive without gaps.
    unsent: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Setup:
    station_id: int
    manager: str
    auditor: str
    pdas: list[PdaState]


def prepare(api: Api, args: argparse.Namespace, rng: random.Random) -> Setup:
    admin = api.sign_in(*ADMIN)
    station_id = next(
        s["id"]
        for s in api.call("GET", "/api/v1/stations", admin)["items"]
        if s["code"] == STATION
    )
    for (username, password), role in ((MANAGER, "station_manager"), (AUDITOR, "auditor")):
        body = {"username": username, "password": password, "role": role}
        if role == "station_manager":
            body["station_id"] = station_id
        api.call("POST", "/api/v1/users", admin, expect=201, json=body)
    manager = api.sign_in(*MANAGER)
    # Parcels for more pushes than the server can take (--max-push-rate), three times each
    # PDA's share: the PDAs are not served equally.
    parcels_per_push = math.ceil(args.batch_size / EVENTS_PER_PARCEL)
    pushes = math.ceil(args.duration * args.max_push_rate * 3 / args.pdas)
    scans = math.ceil(args.scan_duration * args.max_scan_rate * 3 / args.pdas)
    # Each phase has parcels of its own: a PDA served more than its share in the mixed
    # load must not eat into those its one-scan pushes need.
    for_load = parcels_per_push * max(5, pushes)
    per_pda = for_load + math.ceil(scans / EVENTS_PER_PARCEL)
    numbers = tracking_numbers(10_000_000, per_pda * args.pdas)
    print(
        f"set-up: {args.pdas} couriers and PDAs, {len(numbers):,} parcels taken in "
        f"through POST /api/v1/parcels ...",
        file=sys.stderr,
        flush=True,
    )
    pdas = []
    for n in range(args.pdas):
        username, device_id = f"load-courier{n:03d}", f"PDA-LOAD-{n:03d}"
        api.call(
            "POST",
            "/api/v1/users",
            admin,
            expect=201,
            json={
                "username": username,
                "password": COURIER_PASSWORD,
                "role": "courier",
                "station_id": station_id,
            },
        )
        api.call(
            "POST",
            "/api/v1/devices",
            manager,
            expect=201,
            json={"device_id": device_id, "station_id": station_id},
        )
        parcels = numbers[n * per_pda : (n + 1) * per_pda]
        pdas.append(
            PdaState(
                username, device_id, parcels[:for_load], parcels[for_load:], Pda(device_id, 0, {})
            )
        )
    for start in range(0, len(numbers), INTAKE_CHUNK):
        items = [
            {
                "tracking_no": number,
                "service_class": "parcel",
                "recipient_name": "Li Lei",
                "recipient_phone": f"+86138{rng.randrange(10**8):08d}",
                "address": f"{rng.randrange(1, 999)} Century Ave",
                "lat": 31.2,
                "lon": 121.5,
            }
            for number in numbers[start : start + INTAKE_CHUNK]
        ]
        api.call("POST", "/api/v1/parcels", manager, json={"parcels": items})
    # The proofs name real images, uploaded first: deliveries are clean (no flag).
    courier = api.sign_in(pdas[0].username, COURIER_PASSWORD, pdas[0].device_id)
    images = proof_images(PROOF_IMAGE_COUNT)
    for data in images:
        digest = hashlib.sha256(data).hexdigest()
        api.client.put(
            f"/api/v1/blobs/{digest}",
            content=data,
            headers={"Authorization": f"Bearer {courier}", "Content-Type": "image/png"},
        ).raise_for_status()
    PROOF_IMAGES[:] = [hashlib.sha256(data).hexdigest() for data in images]
    return Setup(station_id, manager, api.sign_in(*AUDITOR), pdas)


# -- the simulated clients -------------------------------------------------------------------


async def timed(
    client: httpx.AsyncClient, tally: Tally, kind: str, method: str, url: str, **kw: Any
) -> httpx.Response:
    started = time.perf_counter()
    response = await client.request(method, url, **kw)
    tally.record(kind, time.perf_counter() - started, response.status_code)
    if response.status_code >= 400:
        tally.failures.append(
            f"{kind} {method} {url}: {response.status_code} {response.text[:200]}"
        )
    return response


async def sign_in(client: httpx.AsyncClient, state: PdaState) -> None:
    """Authorize the PDA's client; the first time, sign in and open its shift."""
    if state.token is None:
        signed_in = await client.post(
            "/api/v1/auth/token",
            json={
                "username": state.username,
                "password": COURIER_PASSWORD,
                "device_id": state.device_id,
            },
        )
        signed_in.raise_for_status()
        state.token = signed_in.json()["access_token"]
        client.headers["Authorization"] = f"Bearer {state.token}"
        opened = await client.post("/api/v1/shifts", json={"first_seq": 1})
        opened.raise_for_status()
    client.headers["Authorization"] = f"Bearer {state.token}"


async def push(
    client: httpx.AsyncClient, tally: Tally, kind: str, state: PdaState, body: dict[str, Any]
) -> None:
    content = json.dumps(body).encode()  # the PDA's work, before the clock starts
    response = await timed(
        client,
        tally,
        kind,
        "POST",
        "/api/v1/sync/push",
        content=content,
        headers={"Content-Type": "application/json"},
    )
    if response.status_code == 200:
        results = response.json()["results"]
        applied = sum(1 for r in results if r["status"] == "applied")
        tally.events += applied
        if applied != len(body["events"]):
            tally.failures.append(f"{state.device_id}: {len(results) - applied} not applied")


async def simulated_pda(
    client: httpx.AsyncClient,
    state: PdaState,
    args: argparse.Namespace,
    tally: Tally,
    deadline: float,
    rng: random.Random,
) -> None:
    """A PDA back in coverage: batches of ``--batch-size`` events, a pull after each."""
    await sign_in(client, state)
    per_push = math.ceil(args.batch_size / EVENTS_PER_PARCEL)
    cursor: str | None = None
    while time.perf_counter() < deadline:
        batch = state.parcels[state.next_parcel : state.next_parcel + per_push]
        if len(batch) < per_push:
            tally.notices.append(f"{state.device_id} ran out of parcels to push")
            return
        state.next_parcel += per_push
        sent_at = dt.datetime.now(PDA_CLOCK)
        events = pda_events(state.pda, batch, args.batch_size, sent_at, rng)
        await push(client, tally, "push", state, push_body(state.pda, events, sent_at))
        while time.perf_counter() < deadline:  # the changes since its last pull
            query = {"limit": 200, **({"cursor": cursor} if cursor else {})}
            page = await timed(client, tally, "pull", "GET", "/api/v1/sync/pull", params=query)
            if page.status_code != 200:
                break
            cursor = page.json()["next_cursor"]
            if not page.json()["has_more"]:
                break
        if args.think:
            await asyncio.sleep(args.think)


async def online_pda(
    client: httpx.AsyncClient,
    state: PdaState,
    tally: Tally,
    deadline: float,
    rng: random.Random,
) -> None:
    """A PDA in coverage: each scan pushed as it happens, one event per push."""
    await sign_in(client, state)
    while time.perf_counter() < deadline:
        if not state.unsent:
            if state.next_scan_parcel >= len(state.scan_parcels):
                tally.notices.append(f"{state.device_id} ran out of parcels to scan")
                return
            parcel = state.scan_parcels[state.next_scan_parcel]
            state.next_scan_parcel += 1
            now = dt.datetime.now(PDA_CLOCK)
            state.unsent = pda_events(state.pda, [parcel], EVENTS_PER_PARCEL, now, rng)
        event = state.unsent.pop(0)
        sent_at = dt.datetime.now(PDA_CLOCK)
        await push(client, tally, "scan", state, push_body(state.pda, [event], sent_at))


async def reader(
    client: httpx.AsyncClient,
    setup: Setup,
    args: argparse.Namespace,
    tally: Tally,
    deadline: float,
    n: int,
) -> None:
    """A station manager watching the board and the shifts, then an auditor's searches."""
    manager = {"Authorization": f"Bearer {setup.manager}"}
    auditor = {"Authorization": f"Bearer {setup.auditor}"}
    since = (dt.datetime.now(dt.UTC) - dt.timedelta(days=2)).isoformat()
    shifts: list[int] = []
    turn = n
    while time.perf_counter() < deadline:
        turn += 1
        if turn % 2:
            board = await timed(
                client,
                tally,
                "balance",
                "GET",
                f"/api/v1/stations/{setup.station_id}/handover",
                headers=manager,
            )
            if board.status_code == 200 and not shifts:
                shifts = [row["shift_id"] for row in board.json()["shifts"]]
            if shifts:
                await timed(
                    client,
                    tally,
                    "balance",
                    "GET",
                    f"/api/v1/shifts/{shifts[turn % len(shifts)]}/balance",
                    headers=manager,
                )
        else:
            params = {"station_id": setup.station_id, "limit": 100}
            if turn % 4 == 0:
                params["occurred_from"] = since
            await timed(
                client,
                tally,
                "proofs",
                "GET",
                "/api/v1/proofs",
                params=params,
                headers=auditor,
            )


async def trivial_client(client: httpx.AsyncClient, tally: Tally, deadline: float) -> None:
    while time.perf_counter() < deadline:
        await timed(client, tally, "healthz", "GET", "/healthz")


async def progress(tally: Tally, deadline: float, every: float, label: str) -> None:
    while time.perf_counter() < deadline:
        await asyncio.sleep(min(every, max(0.0, deadline - time.perf_counter())))
        elapsed = time.perf_counter() - tally.started
        pushes = len(tally.latencies.get("push", [])) + len(tally.latencies.get("scan", []))
        print(
            f"{label} {elapsed:5.0f} s: {tally.requests():,} requests "
            f"({tally.requests() / elapsed:,.1f}/s), {pushes:,} pushes, "
            f"{tally.events:,} events ({tally.events / elapsed:,.0f}/s), "
            f"{len(tally.failures)} failures",
            file=sys.stderr,
            flush=True,
        )


@dataclass
class PhaseRun:
    """One run of a phase: its answers, its length and the processor time it took,
    both counted from when its clients were made (their connections open at their
    first requests, within the clock) to when the last of them had its answer."""

    tally: Tally
    seconds: float
    cpu: CpuTimes

    @property
    def window(self) -> tuple[float, float]:
        """When it ran, on the monotonic clock."""
        return self.tally.started, self.tally.started + self.seconds


def together(runs: list[PhaseRun]) -> PhaseRun:
    """The rounds of one phase as one run: answers, seconds and processor time added."""
    tally, cpu = Tally(), CpuTimes(0.0, 0.0, 0.0)
    for run in runs:
        tally.absorb(run.tally)
        cpu = cpu.plus(run.cpu)
    return PhaseRun(tally, sum(run.seconds for run in runs), cpu)


@contextlib.asynccontextmanager
async def clients(base: str, count: int) -> AsyncIterator[list[httpx.AsyncClient]]:
    """``count`` clients of one connection each, made before a phase's clock starts."""
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT_SECONDS, verify=_TLS)
            )
            for _ in range(count)
        ]


PhaseTasks = list[Coroutine[Any, Any, None]]
Tasks = Callable[[list[httpx.AsyncClient], Tally, float], PhaseTasks]


@dataclass(frozen=True)
class Target:
    """The server under load: its address and its process group (whose processor time
    ``CpuSample`` counts)."""

    base: str
    group: int | None


async def run_phase(
    target: Target, count: int, label: str, seconds: float, every: float, tasks: Tasks
) -> PhaseRun:
    """``tasks`` (given the clients, the tally and the deadline) on ``count`` clients for
    ``seconds``, with a progress line ``every`` seconds; the clock and the processor
    time start once the clients are made."""
    async with clients(target.base, count) as made:
        cpu = CpuSample.now(target.group)
        tally = Tally()
        deadline = time.perf_counter() + seconds
        await asyncio.gather(
            *tasks(made, tally, deadline), progress(tally, deadline, every, label)
        )
        elapsed = time.perf_counter() - tally.started
        return PhaseRun(tally, elapsed, CpuSample.now(target.group).since(cpu))


async def run_load(target: Target, setup: Setup, args: argparse.Namespace) -> PhaseRun:
    rng = random.Random(args.seed)
    pdas = len(setup.pdas)

    def tasks(made: list[httpx.AsyncClient], tally: Tally, deadline: float) -> PhaseTasks:
        return [
            simulated_pda(client, state, args, tally, deadline, random.Random(rng.random()))
            for client, state in zip(made[:pdas], setup.pdas, strict=True)
        ] + [
            reader(client, setup, args, tally, deadline, n) for n, client in enumerate(made[pdas:])
        ]

    return await run_phase(
        target, pdas + args.readers, "load", args.duration, args.progress, tasks
    )


async def run_scans(
    target: Target, setup: Setup, args: argparse.Namespace, seconds: float, round_no: int
) -> PhaseRun:
    rng = random.Random(args.seed + 1 + round_no)

    def tasks(made: list[httpx.AsyncClient], tally: Tally, deadline: float) -> PhaseTasks:
        return [
            online_pda(client, state, tally, deadline, random.Random(rng.random()))
            for client, state in zip(made, setup.pdas, strict=True)
        ]

    return await run_phase(target, len(setup.pdas), "scans", seconds, args.progress, tasks)


async def run_trivial(
    target: Target, count: int, args: argparse.Namespace, seconds: float
) -> PhaseRun:
    def tasks(made: list[httpx.AsyncClient], tally: Tally, deadline: float) -> PhaseTasks:
        return [trivial_client(client, tally, deadline) for client in made]

    return await run_phase(target, count, "healthz", seconds, args.progress, tasks)


# -- the report ------------------------------------------------------------------------------


def report(
    load: Tally,
    load_seconds: float,
    scans: Tally,
    scan_seconds: float,
    trivial: Tally,
    trivial_seconds: float,
) -> bool:
    print(
        f"\n{'kind':<9}{'requests':>10}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
        f"{'errors':>8}"
    )
    for tally, seconds in (
        (load, load_seconds),
        (scans, scan_seconds),
        (trivial, trivial_seconds),
    ):
        for kind, values in sorted(tally.latencies.items()):
            errors = sum(n for status, n in tally.statuses[kind].items() if status >= 400)
            print(
                f"{kind:<9}{len(values):>10,}{len(values) / seconds:>9.1f}"
                f"{percentile(values, 0.50) * 1000:>9.0f}{percentile(values, 0.95) * 1000:>9.0f}"
                f"{percentile(values, 0.99) * 1000:>9.0f}{errors:>8}"
            )
    pushes = load.latencies.get("push", [])
    scan_pushes = scans.latencies.get("scan", [])
    healthz = trivial.latencies.get("healthz", [])
    print(
        f"\nmixed load: {load.requests() / load_seconds:,.1f} requests/s, "
        f"{load.events / load_seconds:,.0f} events/s applied ({load_seconds:.0f} s); "
        f"scans: {scans.events / scan_seconds:,.0f} events/s applied ({scan_seconds:.0f} s)"
    )
    if not pushes or not scan_pushes or not healthz:
        print("no push, no scan push or no healthz answered: no ratios")
        return False
    trivial_rate = len(healthz) / trivial_seconds
    scan_rate = len(scan_pushes) / scan_seconds
    ratio = scan_rate / trivial_rate
    tail = percentile(pushes, 0.99) / percentile(pushes, 0.50)
    print(
        f"scan-push throughput / trivial throughput: {scan_rate:,.1f} / {trivial_rate:,.1f} "
        f"requests/s = {ratio:.2f} (target >= {TARGET_PUSH_RATIO}): "
        f"{'met' if ratio >= TARGET_PUSH_RATIO else 'not met'}"
    )
    print(
        f"push p99 / p50 under the mixed load: {percentile(pushes, 0.99) * 1000:,.0f} / "
        f"{statistics.median(pushes) * 1000:,.0f} ms = {tail:.2f} "
        f"(target < {TARGET_TAIL_RATIO:g}): {'met' if tail < TARGET_TAIL_RATIO else 'not met'}"
    )
    push_rate = len(pushes) / load_seconds
    print(
        f"batch pushes / trivial: {push_rate / trivial_rate:.3f} in requests/s, "
        f"{load.events / load_seconds / trivial_rate:.2f} in events/s per trivial request/s"
    )
    return True


def report_cpu(phases: list[tuple[str, CpuTimes, int, float]]) -> None:
    """Where each phase's processor time went, per request: what bounds a rate (a busy
    machine: its processors; an idle one: a lock, such as SQLite's writers' turn; a
    client near one core: the client, this script's one process).

    "machine busy" is every process's and the kernel's time (``/proc/stat``): the
    three columns before it leave out the kernel's work for the loopback and other
    processes, a quarter of a busy machine here."""
    cores = os.cpu_count() or 1
    print(
        f"\nCPU ms per request ({cores} cores)  {'server':>8}{'client':>8}{'PostgreSQL':>12}"
        f"{'machine busy':>14}{'client core':>13}"
    )
    for label, used, requests, seconds in phases:
        per = 1000 / max(requests, 1)
        busy = used.machine / (seconds * cores)
        print(
            f"{label:<29}{used.server * per:>8.2f}{used.client * per:>8.2f}"
            f"{used.database * per:>12.2f}{busy:>13.0%}{used.client / seconds:>13.0%}"
        )


# -- SQLite's writers' turn (--turn-stats) ------------------------------------------------------

TURN_STATS_DIRECTORY = Path(__file__).resolve().parent / "turn_stats"  # its sitecustomize


@dataclass(frozen=True)
class Turn:
    """One writers' turn as the server recorded it (``bench/turn_stats``), in seconds of
    the machine's monotonic clock."""

    pid: int
    asked: float
    taken: float
    released: float


def turn_stats_env(env: dict[str, str], directory: Path) -> dict[str, str]:
    """The server's environment with ``bench/turn_stats`` first on its path, recording
    into ``directory``."""
    path = os.pathsep.join(p for p in (str(TURN_STATS_DIRECTORY), env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path, "COURIER_TURN_STATS": str(directory)}


def read_turns(directory: Path) -> list[Turn]:
    """Every turn recorded, by the time it was taken. A line cut short (a process killed
    while writing it) is skipped."""
    turns = []
    for path in directory.glob("turns.*"):
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) == 4:
                turns.append(Turn(int(fields[0]), *(float(field) for field in fields[1:])))
    return sorted(turns, key=lambda turn: turn.taken)


@dataclass
class TurnUse:
    """How one phase used the turn: what each turn held it for, and each gap between
    two turns by what it was (see ``turn_use``)."""

    seconds: float
    held: list[float] = field(default_factory=list)
    same_process: list[float] = field(default_factory=list)  # hand-offs
    other_process: list[float] = field(default_factory=list)  # hand-offs
    none_waiting: list[float] = field(default_factory=list)
    edges: float = 0.0


def turn_use(turns: list[Turn], windows: list[tuple[float, float]]) -> TurnUse:
    """The turns taken and given back within ``windows`` (on the monotonic clock).

    A gap after a turn is a hand-off when some writer had asked for the turn before it
    was given back (not necessarily the one that got it next: neither the lock within a
    process nor the file lock between them serves in order). It is then the next
    writer's wake-up: within a process, its thread getting the interpreter's lock back;
    from another process, the turnstile's polling of the file lock too. Otherwise no
    writer wanted the turn: they were elsewhere (parsing, checks, the network). The
    edges are the time before a window's first turn and after its last (the clients
    connecting, then finishing)."""
    use = TurnUse(seconds=sum(end - start for start, end in windows))
    for start, end in windows:
        part = [turn for turn in turns if start <= turn.taken and turn.released <= end]
        if not part:
            use.edges += end - start
            continue
        use.held += [turn.released - turn.taken for turn in part]
        use.edges += (end - start) - (part[-1].released - part[0].taken)
        first_asked_from = list(itertools.accumulate(reversed([t.asked for t in part]), min))
        first_asked_from.reverse()  # [i]: the earliest ask among part[i:]
        for index, (before, after) in enumerate(itertools.pairwise(part)):
            gap = max(0.0, after.taken - before.released)
            if first_asked_from[index + 1] >= before.released:
                use.none_waiting.append(gap)
            elif after.pid == before.pid:
                use.same_process.append(gap)
            else:
                use.other_process.append(gap)
    return use


def _mean_ms(values: list[float]) -> str:
    return f"{statistics.fmean(values) * 1000:.2f} ({len(values):,})" if values else "-"


def report_turns(turns: list[Turn], phases: list[tuple[str, list[tuple[float, float]]]]) -> None:
    """For each phase: how often the turn was taken, how long it was held, and what
    became of the rest of the time (``turn_use``), as shares of the phase."""
    print(
        f"\nSQLite writers' turn  {'turns/s':>8}{'held p50 ms':>12}{'p90 ms':>8}"
        f"{'mean ms':>9}{'held':>7}{'hand-off mean ms: same / other process':>41}"
        f"{'hand-offs':>11}{'free, none waiting':>20}{'edges':>7}"
    )
    for label, windows in phases:
        use = turn_use(turns, windows)
        if not use.held or use.seconds <= 0:
            print(f"{label:<22}no turn recorded")
            continue
        handoffs = sum(use.same_process) + sum(use.other_process)
        print(
            f"{label:<22}{len(use.held) / use.seconds:>8.1f}"
            f"{percentile(use.held, 0.5) * 1000:>12.2f}{percentile(use.held, 0.9) * 1000:>8.2f}"
            f"{statistics.fmean(use.held) * 1000:>9.2f}{sum(use.held) / use.seconds:>7.0%}"
            f"{_mean_ms(use.same_process) + ' / ' + _mean_ms(use.other_process):>41}"
            f"{handoffs / use.seconds:>11.0%}{sum(use.none_waiting) / use.seconds:>20.0%}"
            f"{use.edges / use.seconds:>7.0%}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pdas", type=int, default=20, help="simulated PDAs pushing at once")
    parser.add_argument("--readers", type=int, default=2, help="manager and auditor clients")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of mixed load")
    parser.add_argument(
        "--trivial-duration",
        type=float,
        default=None,
        help="seconds of /healthz (default: --duration, at most 15)",
    )
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker")
    parser.add_argument("--batch-size", type=int, default=200, help="events per push")
    parser.add_argument("--think", type=float, default=0.0, help="seconds between a PDA's pushes")
    parser.add_argument(
        "--scan-duration", type=float, default=15.0, help="seconds of one-scan pushes"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="the one-scan pushes and /healthz alternate in this many rounds, each phase's "
        "time split evenly (the machine's speed drifts: both phases then share it)",
    )
    parser.add_argument(
        "--max-scan-rate",
        type=float,
        default=1000.0,
        help="one-scan pushes/s of all PDAs together the parcels taken in last for",
    )
    parser.add_argument(
        "--max-push-rate",
        type=float,
        default=40.0,
        help="pushes/s of all PDAs together the parcels taken in last for (each PDA gets "
        "three times its share)",
    )
    parser.add_argument("--progress", type=float, default=5.0, help="seconds between lines")
    parser.add_argument("--database-url", help="PostgreSQL (public schema wiped); default SQLite")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--turn-stats",
        action="store_true",
        help="SQLite: record each writers' turn in the server (bench/turn_stats) and report "
        "per phase how long it was held and how long it took to pass on",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory and log")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.trivial_duration is None:
        args.trivial_duration = min(args.duration, 15.0)
    workdir = Path(tempfile.mkdtemp(prefix="courier-load-"))
    database_url = prepare_database(args.database_url, workdir)
    env = server_env(database_url, workdir)
    turns_directory = workdir / "turns"  # --turn-stats
    backend = make_url(database_url).get_backend_name()
    if args.turn_stats:
        if backend != "sqlite":
            parser.error("--turn-stats measures SQLite's writers' turn: leave out --database-url")
        turns_directory.mkdir()
        env = turn_stats_env(env, turns_directory)
    print(
        f"load: {backend}, {args.workers} workers x {args.threads} threads, {args.pdas} PDAs "
        f"+ {args.readers} readers, {args.duration:g} s; work directory {workdir}",
        file=sys.stderr,
        flush=True,
    )
    run_cli(env, "db", "upgrade")
    run_cli(env, "create-station", STATION, "--name", "Load test", "--timezone", "Asia/Shanghai")
    run_cli(
        env, "create-user", ADMIN[0], "--role", "admin", "--password-stdin", stdin=ADMIN[1] + "\n"
    )
    server = Server(env, free_port(), workdir, workers=args.workers, threads=args.threads)
    base = f"http://127.0.0.1:{server.port}"
    ok = True
    scan_rounds: list[PhaseRun] = []
    trivial_rounds: list[PhaseRun] = []
    try:
        server.start()
        api = Api(base)
        try:
            setup = prepare(api, args, random.Random(args.seed))
        finally:
            api.close()
        group = server.process.pid if server.process is not None else None  # its own group
        target = Target(base, group)
        mixed = asyncio.run(run_load(target, setup, args))
        for round_no in range(args.rounds):  # the two phases share the machine's drift
            part = asyncio.run(
                run_scans(target, setup, args, args.scan_duration / args.rounds, round_no)
            )
            idle = asyncio.run(
                run_trivial(
                    target, args.pdas + args.readers, args, args.trivial_duration / args.rounds
                )
            )
            scan_rounds.append(part)
            trivial_rounds.append(idle)
    except LoadFailure as failure:
        print(f"load test failed: {failure}", file=sys.stderr)
        return 1
    finally:
        server.kill()
    scanned, idled = together(scan_rounds), together(trivial_rounds)
    load, scans, trivial = mixed.tally, scanned.tally, idled.tally
    ok = report(load, mixed.seconds, scans, scanned.seconds, trivial, idled.seconds) and ok
    rounds = [
        part.tally.rate("scan", part.seconds) / max(idle.tally.rate("healthz", idle.seconds), 1e-9)
        for part, idle in zip(scan_rounds, trivial_rounds, strict=True)
    ]
    print(f"scan push / trivial, round by round: {', '.join(f'{r:.2f}' for r in rounds)}")
    report_cpu(
        [
            ("mixed load", mixed.cpu, load.requests(), mixed.seconds),
            ("scans", scanned.cpu, scans.requests(), scanned.seconds),
            ("healthz", idled.cpu, trivial.requests(), idled.seconds),
        ]
    )
    if args.turn_stats:
        phases = {"mixed load": [mixed.window], "scans": [run.window for run in scan_rounds]}
        report_turns(read_turns(turns_directory), list(phases.items()))
    problems = server.unexpected_log_lines()
    for failure in (load.failures + scans.failures + trivial.failures)[:10]:
        print(f"failure: {failure}", file=sys.stderr)
    notices = sorted(set(load.notices + scans.notices))  # a PDA's once, not once a round
    if notices:
        print(
            f"{len(notices)} times a PDA ran out of parcels to push or to scan before the "
            f"end, each counted once whatever the rounds (the others went on; raise "
            f"--max-push-rate or --max-scan-rate): {', '.join(notices[:3])}",
            file=sys.stderr,
        )
    if problems:
        print(f"the server logged {len(problems)} errors, first: {problems[0][:300]}")
    failed = bool(load.failures or scans.failures or trivial.failures or problems or not ok)
    if not args.keep and not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"work directory and server log kept: {workdir}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
