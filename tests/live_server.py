"""The real server for fault tests, and what they need around it.

* ``Server``: ``courier-api serve`` (gunicorn) in a process group of its own, started
  and SIGKILLed at will;
* ``server_database``: a database of the server's own: a SQLite file in the SQLite
  pass, a PostgreSQL database created next to ``TEST_DATABASE_URL``'s (and dropped
  afterwards) in the PostgreSQL pass. The suite's own database cannot be used: its
  tests run in rolled-back transactions, while a server in another process commits;
* ``prepare_station``: migrate and create a station, couriers and their PDAs with the
  CLI, as an operator would;
* ``TcpProxy``: a loopback TCP proxy between the server and PostgreSQL that can cut
  every connection and refuse new ones for a while;
* ``Ledger``: what the database holds afterwards, read directly, and the checks that
  every pushed event is stored exactly once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import http.client
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import psycopg
from psycopg import sql
from sqlalchemy import Engine, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from models import DeviceSyncState, QuarantinedEvent, ScanEvent, SyncBatch
from models.engine import make_engine
from tests import factories
from tests.conftest import FAST_PASSWORD_HASH, TEST_JWT_SECRET

# For one start of the server: a guard against hangs only, as the start is waited for
# by its condition (``/healthz`` answers), so a loaded machine's slow start passes.
START_DEADLINE_SECONDS = 60.0
# For a SIGKILL: the master's exit, then the port's release (each waited for this long).
KILL_DEADLINE_SECONDS = 10.0
REQUEST_TIMEOUT_SECONDS = 15.0


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("courier-api")
    return [str(script)] if script.exists() else [sys.executable, "-m", "courier_api"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


@dataclass
class Reply:
    status: int
    payload: Any
    headers: dict[str, str]


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    token: str | None = None,
    timeout: float = REQUEST_TIMEOUT_SECONDS,
) -> Reply:
    """One request on a fresh connection; connection errors propagate (the caller retries)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
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
    return Reply(response.status, payload, dict(response.getheaders()))


def call(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    token: str | None = None,
    timeout: float = REQUEST_TIMEOUT_SECONDS,
) -> tuple[int, Any]:
    reply = request(port, method, path, body, token, timeout)
    return reply.status, reply.payload


def sign_in(
    port: int,
    username: str,
    password: str,
    device_id: str,
    timeout: float = REQUEST_TIMEOUT_SECONDS,
) -> str:
    body = {"username": username, "password": password, "device_id": device_id}
    status, tokens = call(
        port, "POST", "/api/v1/auth/token", json.dumps(body).encode(), timeout=timeout
    )
    assert status == 200, tokens
    return str(tokens["access_token"])


class Pace:
    """How long this machine takes now for a push answered 200, measured during the run.

    The bounds of the fault tests that are about time (no answer slower than, back
    within, a batch not stuck longer than) are ``floor`` on an idle machine, and
    ``factor`` times the median push when the machine is slower than that: a CI
    machine busy with other jobs (a load average of 13 on 2 cores) makes every push
    slower, not a hang any less of a hang, and a bound fixed in seconds then failed
    tests that held (``bound``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: list[float] = []

    def add(self, seconds: float) -> None:
        with self._lock:
            self._seconds.append(seconds)

    def median(self) -> float | None:
        with self._lock:
            ordered = sorted(self._seconds)
        return ordered[len(ordered) // 2] if ordered else None

    def bound(self, floor: float, factor: float) -> float:
        median = self.median()
        return floor if median is None else max(floor, factor * median)

    def __str__(self) -> str:
        median = self.median()
        return "no push answered" if median is None else f"median push {median:.2f} s"


# -- the server's database ------------------------------------------------------------------


def postgresql_test_url() -> str | None:
    """``TEST_DATABASE_URL`` in the PostgreSQL pass of ``make test``, else None."""
    url = os.environ.get("TEST_DATABASE_URL", "")
    return url if url.startswith("postgresql") else None


def _libpq_url(url: str) -> str:
    """The SQLAlchemy URL as psycopg takes it (no ``+psycopg``)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@contextlib.contextmanager
def postgresql_database(base_url: str, suffix: str) -> Iterator[str]:
    """A PostgreSQL database of its own on ``base_url``'s server, named after
    ``base_url``'s database and ``suffix``; dropped afterwards (also when a crashed
    run left it behind)."""
    parsed = make_url(base_url)
    name = f"{parsed.database}_{suffix}"[:63]
    admin_url = _libpq_url(str(parsed.set(database="postgres")))
    _drop_database(admin_url, name)
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield parsed.set(database=name).render_as_string(hide_password=False)
    finally:
        _drop_database(admin_url, name)


@contextlib.contextmanager
def server_database(tmp_path: Path, suffix: str) -> Iterator[str]:
    """The server's database: PostgreSQL in the PostgreSQL pass, else a SQLite file."""
    base = postgresql_test_url()
    if base is None:
        yield f"sqlite:///{tmp_path / f'{suffix}.db'}"
        return
    with postgresql_database(base, suffix) as url:
        yield url


def server_env(tmp_path: Path, database_url: str, **extra: str) -> dict[str, str]:
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    env = {
        **os.environ,
        # Not "testing": Flask there lets an unhandled error through to gunicorn, whose
        # HTML page a test then met in place of the JSON 500, request id, access log
        # line and metric a server in production gives. "development" differs from
        # "production" in transport only (plain-http cookies, webhooks' schemes).
        "APP_ENV": "development",
        "DATABASE_URL": database_url,
        "JWT_SECRET": TEST_JWT_SECRET,
        "BLOB_DIR": str(tmp_path / "blobs"),
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "PASSWORD_HASH_METHOD": FAST_PASSWORD_HASH,
        # gunicorn's control socket defaults to ~/.gunicorn/gunicorn.ctl, shared by
        # every gunicorn of the user: keep this test's servers off it.
        "XDG_RUNTIME_DIR": str(run_dir),
        **extra,
    }
    env.pop("TEST_DATABASE_URL", None)
    return env


def run_cli(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [*cli_command(), *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"courier-api {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done.stdout


def prepare_station(
    env: dict[str, str], station: str, couriers: list[tuple[str, str, str]]
) -> None:
    """Migrate, then create the station and each ``(username, password, device)``."""
    run_cli(env, "db", "upgrade")
    run_cli(env, "create-station", station, "--name", f"Station {station}")
    for username, password, device in couriers:
        run_cli(
            env,
            "create-user",
            username,
            "--role",
            "courier",
            "--station",
            station,
            "--password-stdin",
            stdin=password + "\n",
        )
        run_cli(env, "register-device", device, "--station", station)


def push_bodies(device: str, batches: int, size: int) -> list[dict[str, Any]]:
    """``batches`` push bodies of ``size`` check-outs each from ``device``: seqs 1 up,
    new parcels, a second apart three hours ago."""
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
    bodies = []
    for number in range(batches):
        events = [
            factories.event(seq, factories.s10(), occurred_at=start + dt.timedelta(seconds=seq))
            for seq in range(number * size + 1, (number + 1) * size + 1)
        ]
        bodies.append(factories.push_body(device, events))
    return bodies


# -- the server -----------------------------------------------------------------------------


class Server:
    """``courier-api serve`` in a process group of its own, started and SIGKILLed at will."""

    def __init__(
        self, env: dict[str, str], port: int, log_dir: Path, workers: int = 2, threads: int = 8
    ) -> None:
        self.env = env
        self.port = port
        self.log_dir = log_dir
        self.workers = workers
        self.threads = threads
        self.starts = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log: TextIO | None = None
        self.ready_at = 0.0  # when it last answered /healthz after a start (monotonic)
        # When its last kill began, until a start has it answer again (a restart in
        # progress: ``ready_at`` is the previous start's then); None while it runs.
        self.down_since: float | None = None

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
                *cli_command(),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                str(self.workers),
                "--threads",
                str(self.threads),
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
                if call(self.port, "GET", "/healthz")[0] == 200:
                    self.ready_at = time.monotonic()
                    self.down_since = None
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
        self.down_since = time.monotonic()
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=KILL_DEADLINE_SECONDS)
        if self.log is not None:
            self.log.close()
            self.log = None
        # The workers die with the master; their copies of the listening socket go with them.
        deadline = time.monotonic() + KILL_DEADLINE_SECONDS
        while not port_is_closed(self.port):
            if time.monotonic() > deadline:
                raise AssertionError(f"port {self.port} still accepts after the SIGKILL")
            time.sleep(0.01)

    def unexpected_log_lines(self, expected: tuple[str, ...] = ()) -> list[str]:
        """Log lines of every start that report an error or a traceback, but those that
        contain one of ``expected``."""
        found = []
        for path in self.log_paths:
            for line in path.read_text(errors="replace").splitlines():
                if not _ERROR_LINE.search(line):
                    continue
                if not any(text in line for text in expected):
                    found.append(f"{path.name}: {line}")
        return found


# A traceback, gunicorn's "[ERROR]", a log record at ERROR or CRITICAL in the plain
# format ("... ERROR name: message") or as JSON ("level": "error").
_ERROR_LINE = re.compile(
    r"Traceback|\[(ERROR|CRITICAL)\]|\s(ERROR|CRITICAL)\s|\"(level|levelname)\":\s*\"(error|critical)\"",
    re.IGNORECASE,
)


# -- a proxy that cuts the database's connections -------------------------------------------


class TcpProxy:
    """Loopback TCP proxy to ``upstream``, on a port of its own.

    ``cut()`` severs every connection through it at once (a reset towards the client,
    a close towards the server: what a failing network or a database restart does) and
    refuses new connections (accepted and reset at once) until ``restore()``.
    ``stall()`` forwards nothing more, either way, on the connections open or new ones,
    closing none (a hung server, packets held on the way) until ``restore()``.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.refusing = False
        self.flowing = threading.Event()  # cleared while stalled
        self.flowing.set()
        self.connections = 0  # accepted and forwarded
        self.severed = 0  # cut while open
        self.refused = 0  # accepted and reset during a cut
        self.closed = False
        self.thread = threading.Thread(target=self._accept, daemon=True, name="tcp-proxy")
        self.thread.start()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if self.refusing or self.closed:
                    self.refused += 1
                    _reset(client)
                    continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self.lock:
                if self.refusing or self.closed:  # cut while connecting upstream
                    self.refused += 1
                    _reset(client)
                    server.close()
                    continue
                self.pairs.append((client, server))
                self.connections += 1
            for source, target in ((client, server), (server, client)):
                threading.Thread(
                    target=_pump, args=(source, target, self.flowing), daemon=True
                ).start()

    def cut(self) -> int:
        """Sever every open connection and refuse new ones; how many were severed."""
        with self.lock:
            self.refusing = True
            pairs, self.pairs = self.pairs, []
            self.severed += len(pairs)
        for client, server in pairs:
            _reset(client)
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
        return len(pairs)

    def stall(self) -> None:
        self.flowing.clear()

    def restore(self) -> None:
        with self.lock:
            self.refusing = False
        self.flowing.set()

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.flowing.set()  # the stalled pumps end on the severed sockets
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close does not)
        self.listener.close()
        self.thread.join(timeout=5)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), waking any thread blocked on it."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _pump(source: socket.socket, target: socket.socket, flowing: threading.Event) -> None:
    try:
        while True:
            data = source.recv(65536)
            flowing.wait()  # held while stalled, the end of the stream too
            if not data:
                break
            target.sendall(data)
    except OSError as exc:
        if exc.errno not in (None, errno.EBADF, errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
            raise
    finally:
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)


# -- what the database holds ----------------------------------------------------------------


def uuid_text(value: Any) -> str:
    return str(uuid.UUID(str(value)))


class Ledger:
    """Reads the server's database directly (its own engine, never the app's).

    Each read opens a connection of its own and closes it (no pool): a test that fails
    before it closes the ledger leaves no session open on the database it drops, nor
    one the killer thread's last look could still hold. Use it as a context manager."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self.engine: Engine = make_engine(
            database_url, sqlite_begin="DEFERRED", poolclass=NullPool
        )

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.engine.dispose()

    def batch_committed(self, batch_id: str) -> bool:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(SyncBatch.id).where(SyncBatch.batch_id == uuid.UUID(batch_id))
            ).first()
        return row is not None

    def wait_for_batch(self, batch_id: str, still_waiting: Any, poll: float = 0.001) -> None:
        """Poll until the batch's row is committed, or ``still_waiting()`` is false."""
        query = select(SyncBatch.id).where(SyncBatch.batch_id == uuid.UUID(batch_id))
        with self.engine.connect() as conn:
            # PostgreSQL: one round trip a look (each statement sees what committed
            # before it), not two with a rollback: the server answers at once after
            # its commit, and on a loaded machine a slower look notices it too late.
            autocommit = conn.dialect.name == "postgresql"
            if autocommit:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            while still_waiting():
                found = conn.execute(query).first()
                if not autocommit:
                    conn.rollback()  # a new snapshot for the next look
                if found is not None:
                    return
                time.sleep(poll)

    def assert_exactly_once(
        self, pushed: dict[str, list[dict[str, Any]]], context: str = ""
    ) -> None:
        """Every event of every pushed batch (``{device: [push bodies]}``) is stored once,
        with nothing else: one ``sync_batch`` row per batch, nothing quarantined, each
        device acknowledged through its last seq with no gap."""
        if self.engine.dialect.name == "sqlite":
            with self.engine.connect() as conn:
                check = conn.exec_driver_sql("PRAGMA integrity_check").fetchall()
            assert [tuple(row) for row in check] == [("ok",)], context
        total = sum(len(body["events"]) for bodies in pushed.values() for body in bodies)
        with self.engine.connect() as conn:
            stored = conn.scalar(select(func.count()).select_from(ScanEvent))
            assert stored == total, f"{stored} events stored of {total}; {context}"
            quarantined = conn.scalar(select(func.count()).select_from(QuarantinedEvent))
            assert quarantined == 0, context
            for device, bodies in pushed.items():
                sent = [event for body in bodies for event in body["events"]]
                rows = conn.execute(
                    select(ScanEvent.seq, ScanEvent.client_event_id).where(
                        ScanEvent.device_id == device
                    )
                ).all()
                seqs = Counter(seq for seq, _ in rows)
                assert len(rows) == len(sent), (device, context)
                assert sorted(seqs) == sorted(event["seq"] for event in sent), (device, context)
                assert max(seqs.values()) == 1, (device, context)
                ids = Counter(uuid_text(client_event_id) for _, client_event_id in rows)
                assert max(ids.values()) == 1, (device, context)
                assert set(ids) == {event["client_event_id"] for event in sent}, (device, context)
                batch_ids = conn.scalars(
                    select(SyncBatch.batch_id).where(SyncBatch.device_id == device)
                ).all()
                assert sorted(uuid_text(b) for b in batch_ids) == sorted(
                    body["batch_id"] for body in bodies
                ), (device, context)
                state = conn.execute(
                    select(
                        DeviceSyncState.acked_through_seq,
                        DeviceSyncState.max_seq,
                        DeviceSyncState.missing_ranges,
                    ).where(DeviceSyncState.device_id == device)
                ).one()
                last = max(event["seq"] for event in sent)
                assert (state[0], state[1]) == (last, last), (device, context)
                assert state[2] == [], (device, context)
