"""Crash test: the real server, killed with SIGKILL in the middle of pushes.

``courier-api serve`` (gunicorn, 2 workers) runs as a subprocess on a SQLite
file of its own, prepared with the CLI as an operator would. One client pushes
``BATCHES`` batches of ``BATCH_SIZE`` events (seq 1..N, each event a fresh
``client_event_id``), one batch after the other as a PDA does. Meanwhile a
second thread kills the server's whole process group with SIGKILL ``KILLS``
times and starts it again. The kills alternate between two moments:

* a random moment of an in-flight push (in practice before its commit: the
  transaction must vanish, and the retry must apply the batch in full);
* just after the in-flight push committed (seen by polling the database file),
  before its receipt reaches the client: the retry must be answered with the
  stored receipt and must store nothing twice.

The client retries the failed batch, with the same ``batch_id`` and the same
body, until it gets a 200; a refused connection, a reset or a 503 is a retry.
Once every batch is acknowledged the server is killed once more, and the
database file is checked directly: exactly N events for the device, seqs
1..N once each, exactly the ``client_event_id``s sent, one ``sync_batch`` row
per batch, nothing quarantined, the device's acknowledgement at N. It also
checks that kills really happened during pushes, and that at least one came
after a commit and before its answer, so it cannot pass vacuously; and that
the server logged no error or traceback on any of its starts.

This test always uses its own SQLite file, also in the PostgreSQL pass of
``make test``: the suite's PostgreSQL database is shared with the per-test
transactions, and a server in another process must commit for real.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pytest

from tests import factories
from tests.conftest import FAST_PASSWORD_HASH, TEST_JWT_SECRET

pytestmark = pytest.mark.skipif(
    not hasattr(os, "killpg"), reason="needs POSIX process groups (gunicorn)"
)

BATCHES = 30
BATCH_SIZE = 200
KILLS = 4
STATION = "CRASH"
USERNAME = "crash-courier"
PASSWORD = "crash-courier-password-1"
DEVICE = "PDA-CRASH-01"
PUSH_DEADLINE_SECONDS = 90.0  # all pushes, kills and restarts: a guard against hangs
COMMIT_POLL_SECONDS = 0.001  # well below the time from commit to sent receipt
START_DEADLINE_SECONDS = 20.0  # for one start of the server
REQUEST_TIMEOUT_SECONDS = 15.0
RETRY_PAUSE_SECONDS = 0.05


def _cli_command() -> list[str]:
    script = Path(sys.executable).with_name("courier-api")
    return [str(script)] if script.exists() else [sys.executable, "-m", "courier_api"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_is_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def _call(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    token: str | None = None,
) -> tuple[int, Any]:
    """One request on a fresh connection; connection errors propagate (the caller retries)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_SECONDS)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    try:
        payload = json.loads(raw) if raw else None
    except ValueError:
        payload = raw.decode(errors="replace")
    return response.status, payload


def _uuid_text(value: Any) -> str:
    """A UUID column as SQLite holds it (32 hex digits), in the canonical spelling."""
    return str(uuid.UUID(str(value)))


class Server:
    """``courier-api serve`` in a process group of its own, started and SIGKILLed at will."""

    def __init__(self, env: dict[str, str], port: int, log_dir: Path) -> None:
        self.env = env
        self.port = port
        self.log_dir = log_dir
        self.starts = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log: TextIO | None = None

    @property
    def log_paths(self) -> list[Path]:
        return [self.log_dir / f"server-{n}.log" for n in range(1, self.starts + 1)]

    def log_tail(self, chars: int = 3000) -> str:
        if not self.starts:
            return "(never started)"
        return self.log_paths[-1].read_text(errors="replace")[-chars:]

    def start(self) -> None:
        assert self.process is None, "the server is already running"
        self.starts += 1
        self.log = (self.log_dir / f"server-{self.starts}.log").open("w")
        self.process = subprocess.Popen(
            [
                *_cli_command(),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "2",
            ],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: master and workers die together
        )
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        while True:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the server exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                if _call(self.port, "GET", "/healthz")[0] == 200:
                    return
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not answer /healthz:\n{self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the master and its workers at once, and wait until the port is free."""
        process, self.process = self.process, None
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)
        if self.log is not None:
            self.log.close()
            self.log = None
        # The workers die with the master; their copies of the listening socket go with them.
        deadline = time.monotonic() + 10
        while not _port_is_closed(self.port):
            if time.monotonic() > deadline:
                raise AssertionError(f"port {self.port} still accepts after the SIGKILL")
            time.sleep(0.01)


@dataclass
class Kill:
    mode: str  # "random" or "after_commit"
    batch: int  # the batch in flight when the signal was sent
    batch_id: str
    at: dt.datetime
    committed: bool  # its sync_batch row was in the database file at the kill


@dataclass
class Progress:
    """What the client is doing, shared with the killer thread."""

    condition: threading.Condition = field(default_factory=threading.Condition)
    batch: int = -1
    batch_id: str = ""
    in_flight: bool = False
    finished: bool = False
    killer_errors: list[BaseException] = field(default_factory=list)


def _batch_committed(db_path: Path, batch_id: str) -> bool:
    with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as conn:
        row = conn.execute(
            "SELECT 1 FROM sync_batch WHERE batch_id = ?", (uuid.UUID(batch_id).hex,)
        ).fetchone()
    return row is not None


def _next_push(progress: Progress, earliest: int) -> tuple[int, str] | None:
    """Wait for a push of batch ``earliest`` or later to be in flight (None: all done)."""

    def ready() -> bool:
        return progress.finished or (progress.in_flight and progress.batch >= earliest)

    with progress.condition:
        progress.condition.wait_for(ready)
        if progress.finished:
            return None
        return progress.batch, progress.batch_id


def _wait_for_commit(progress: Progress, db_path: Path, batch: int, batch_id: str) -> None:
    """Poll the database file until the batch's row is committed or its push has ended."""
    with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as conn:
        while progress.in_flight and progress.batch == batch:
            query = "SELECT 1 FROM sync_batch WHERE batch_id = ?"
            if conn.execute(query, (uuid.UUID(batch_id).hex,)).fetchone() is not None:
                return
            time.sleep(COMMIT_POLL_SECONDS)


def _killer(
    server: Server, progress: Progress, db_path: Path, rng: random.Random, kills: list[Kill]
) -> None:
    """Kill the server ``KILLS`` times during pushes, restarting it after each kill."""
    try:
        for round_ in range(KILLS):
            mode = "random" if round_ % 2 == 0 else "after_commit"
            earliest = max(
                (round_ + 1) * BATCHES // (KILLS + 2), kills[-1].batch + 1 if kills else 0
            )
            while True:
                push = _next_push(progress, earliest)
                if push is None:
                    return
                batch, batch_id = push
                if mode == "random":
                    time.sleep(rng.uniform(0.0, 0.25))
                else:
                    _wait_for_commit(progress, db_path, batch, batch_id)
                with progress.condition:
                    if not progress.in_flight or (
                        mode == "after_commit" and progress.batch != batch
                    ):
                        earliest = batch + 1  # the push ended first: try the next one
                        continue
                    batch, batch_id = progress.batch, progress.batch_id
                    at = dt.datetime.now(dt.UTC)
                    server.kill()
                kills.append(Kill(mode, batch, batch_id, at, _batch_committed(db_path, batch_id)))
                server.start()
                break
    except BaseException as exc:  # reported by the client thread and the test
        progress.killer_errors.append(exc)
        with progress.condition:
            progress.condition.notify_all()


def _prepare_database(env: dict[str, str]) -> None:
    """Migrate and create the station, the courier and the PDA with the CLI."""

    def run(*args: str, stdin: str | None = None) -> None:
        done = subprocess.run(
            [*_cli_command(), *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"courier-api {' '.join(args)}:\n{done.stdout}{done.stderr}"

    run("db", "upgrade")
    run("create-station", STATION, "--name", "Crash test station")
    run(
        "create-user",
        USERNAME,
        "--role",
        "courier",
        "--station",
        STATION,
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    run("register-device", DEVICE, "--station", STATION)


def _batches() -> list[dict[str, Any]]:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
    bodies = []
    for number in range(BATCHES):
        events = [
            factories.event(seq, factories.s10(), occurred_at=start + dt.timedelta(seconds=seq))
            for seq in range(number * BATCH_SIZE + 1, (number + 1) * BATCH_SIZE + 1)
        ]
        bodies.append(factories.push_body(DEVICE, events))
    return bodies


def test_pushes_survive_sigkill_of_the_server_without_losing_or_doubling_events(
    tmp_path: Path,
) -> None:
    db_path = tmp_path / "crash.db"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {
        **os.environ,
        "APP_ENV": "testing",
        "DATABASE_URL": f"sqlite:///{db_path}",
        "JWT_SECRET": TEST_JWT_SECRET,
        "BLOB_DIR": str(tmp_path / "blobs"),
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "PASSWORD_HASH_METHOD": FAST_PASSWORD_HASH,
        # gunicorn's control socket defaults to ~/.gunicorn/gunicorn.ctl, shared by
        # every gunicorn of the user: keep this test's servers off it.
        "XDG_RUNTIME_DIR": str(run_dir),
    }
    env.pop("TEST_DATABASE_URL", None)
    _prepare_database(env)
    bodies = _batches()
    sent_ids = {event["client_event_id"] for body in bodies for event in body["events"]}
    total = BATCHES * BATCH_SIZE
    assert len(sent_ids) == total

    seed = random.randrange(2**32)
    server = Server(env, _free_port(), tmp_path)
    progress = Progress()
    kills: list[Kill] = []
    receipts: list[dict[str, Any]] = []
    failures: list[tuple[int, str]] = []  # (batch, what the attempt ran into)
    killer = threading.Thread(
        target=_killer,
        args=(server, progress, db_path, random.Random(seed), kills),
        daemon=True,
    )
    started = time.monotonic()
    try:
        server.start()
        status, tokens = _call(
            server.port,
            "POST",
            "/api/v1/auth/token",
            json.dumps({"username": USERNAME, "password": PASSWORD, "device_id": DEVICE}).encode(),
        )
        assert status == 200, tokens
        token = tokens["access_token"]
        killer.start()
        deadline = started + PUSH_DEADLINE_SECONDS
        for number, body in enumerate(bodies):
            data = json.dumps(body).encode()
            while True:
                assert not progress.killer_errors, "the killer thread failed"
                assert time.monotonic() < deadline, (
                    f"batch {number} not acknowledged in time (seed {seed}); "
                    f"failures {failures[-5:]}\n{server.log_tail()}"
                )
                with progress.condition:
                    progress.batch, progress.batch_id = number, body["batch_id"]
                    progress.in_flight = True
                    progress.condition.notify_all()
                try:
                    status, payload = _call(server.port, "POST", "/api/v1/sync/push", data, token)
                except (OSError, http.client.HTTPException) as exc:
                    status, payload = 0, None
                    failures.append((number, type(exc).__name__))
                finally:
                    with progress.condition:
                        progress.in_flight = False
                if status == 200:
                    receipts.append(payload)
                    break
                assert status in (0, 503), f"batch {number}: {status} {payload}"
                if status == 503:
                    failures.append((number, "503"))
                time.sleep(RETRY_PAUSE_SECONDS)
        with progress.condition:
            progress.finished = True
            progress.condition.notify_all()
        killer.join(timeout=START_DEADLINE_SECONDS + 10)
        assert not killer.is_alive(), "the killer thread did not stop"
        if progress.killer_errors:
            raise progress.killer_errors[0]
    finally:
        with progress.condition:
            progress.finished = True
            progress.condition.notify_all()
        if killer.ident is not None:
            killer.join(timeout=START_DEADLINE_SECONDS + 10)
        server.kill()  # SIGKILL once more: what was acknowledged must be on disk
    elapsed = time.monotonic() - started

    context = (
        f"seed {seed}; kills: "
        + ", ".join(
            f"{k.mode} in batch {k.batch} ({'committed' if k.committed else 'rolled back'})"
            for k in kills
        )
        + f"; failed attempts: {dict(Counter(failures))}; {elapsed:.1f} s"
    )
    print(f"crash test: {context}")  # shown with -s or -rP
    # The kills were real and hit pushes in flight: the test is not vacuous.
    assert len(kills) == KILLS, context
    interrupted = {number for number, _ in failures}
    assert interrupted, context
    # At least once the batch was committed but its answer never reached the client:
    # the case where a careless retry would store the events twice.
    lost_answers = [kill for kill in kills if kill.committed and kill.batch in interrupted]
    assert lost_answers, context
    assert server.starts == KILLS + 1, context
    for log_path in server.log_paths:
        log = log_path.read_text(errors="replace")
        assert "Traceback" not in log and "[ERROR]" not in log, f"{log_path.name}:\n{log}"

    # Every receipt: its batch, every event applied once, acknowledged through its end.
    assert len(receipts) == BATCHES
    for number, (body, receipt) in enumerate(zip(bodies, receipts, strict=True)):
        assert receipt["batch_id"] == body["batch_id"]
        assert [r["client_event_id"] for r in receipt["results"]] == [
            e["client_event_id"] for e in body["events"]
        ]
        assert {r["status"] for r in receipt["results"]} == {"applied"}, (number, context)
        assert receipt["acked_through_seq"] == (number + 1) * BATCH_SIZE, (number, context)
        assert receipt["missing_seqs"] == [], (number, context)
    assert receipts[-1]["acked_through_seq"] == total
    assert receipts[-1]["missing_seqs"] == []
    # A batch that committed before its kill was answered on retry with the stored
    # receipt (its server_time is from before the kill), not ingested again.
    for kill in kills:
        receipt = receipts[kill.batch]
        if kill.committed:
            assert dt.datetime.fromisoformat(receipt["server_time"]) < kill.at, (kill, context)

    # The database file itself, after the final SIGKILL.
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = conn.execute(
            "SELECT seq, client_event_id FROM scan_event WHERE device_id = ?", (DEVICE,)
        ).fetchall()
        assert conn.execute("SELECT count(*) FROM scan_event").fetchone() == (total,)
        batch_ids = [
            _uuid_text(row[0])
            for row in conn.execute(
                "SELECT batch_id FROM sync_batch WHERE device_id = ?", (DEVICE,)
            )
        ]
        quarantined = conn.execute("SELECT count(*) FROM quarantined_event").fetchone()
        state = conn.execute(
            "SELECT acked_through_seq, max_seq, missing_ranges FROM device_sync_state "
            "WHERE device_id = ?",
            (DEVICE,),
        ).fetchone()
    seqs = Counter(seq for seq, _ in rows)
    assert len(rows) == total, context
    assert sorted(seqs) == list(range(1, total + 1)), context
    assert max(seqs.values()) == 1, context
    stored_ids = Counter(_uuid_text(client_event_id) for _, client_event_id in rows)
    assert max(stored_ids.values()) == 1, context
    assert set(stored_ids) == sent_ids, context
    assert sorted(batch_ids) == sorted(body["batch_id"] for body in bodies), context
    assert quarantined == (0,), context
    assert state is not None and state[:2] == (total, total), context
    assert json.loads(state[2]) == [], context
