"""PostgreSQL connections cut in the middle of a load of pushes, with the real server.

``courier-api serve`` (gunicorn, 2 workers) runs as a subprocess on a PostgreSQL
database created for the test, and reaches it through a loopback TCP proxy
(``tests.live_server.TcpProxy``). ``PDAS`` PDAs push batches of ``BATCH_SIZE``
events back to back, each retrying a batch with the same ``batch_id`` and body until
it gets a 200, as the sync contract says. Meanwhile the proxy severs every database
connection ``CUTS`` times, in the middle of the pushes, and refuses new ones for
``CUT_SECONDS`` each time (what a database restart or a network failure does).

What must hold:

* every answer is a 200 or a 503 ``database_unavailable`` with ``Retry-After`` and
  the error body: never a 500, never a dropped connection, never an answer slower
  than ``REPLY_BOUND_SECONDS`` (or ``REPLY_BOUND_FACTOR`` median pushes of the run,
  on a machine slower than the bound's: ``tests.live_server.Pace``); each cut is seen
  as 503s;
* the server recovers by itself once the database is back (its pool throws the dead
  connections away), within ``RECOVERY_BOUND_SECONDS`` (or as many median pushes);
* at the end the database holds every event exactly once, one batch row per batch,
  nothing quarantined, each PDA acknowledged through its last seq;
* the server logged no traceback, and no error but the expected "database
  unavailable" lines.
"""

from __future__ import annotations

import http.client
import json
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from tests.live_server import (
    Ledger,
    Pace,
    Server,
    TcpProxy,
    free_port,
    postgresql_database,
    postgresql_test_url,
    prepare_station,
    push_bodies,
    request,
    server_env,
    sign_in,
)

PDAS = 2
BATCHES = 16  # per PDA: more than the cuts leave time for, however fast the pushes
BATCH_SIZE = 200
CUTS = 3
CUT_SECONDS = 1.5
STATION = "CUT"
PASSWORD = "cut-courier-password-1"
# The bounds about time are these on an idle machine, and as many median pushes of the
# run on a slower one (``Pace``): a loaded CI machine (a load average of 13 on 2 cores)
# makes every answer slower, which a bound in seconds alone took for a hang.
REPLY_BOUND_SECONDS = 10.0  # no request may hang longer, cut or not
REPLY_BOUND_FACTOR = 5.0
RECOVERY_BOUND_SECONDS = 10.0  # from the database's return to a PDA's next 200
RECOVERY_BOUND_FACTOR = 5.0
# A guard against hangs: a batch unacknowledged this long since its first attempt, or
# as many median pushes (a PDA then fails the test as such, naming its batch).
STALL_FLOOR_SECONDS = 60.0
STALL_FACTOR = 20.0
# How long a PDA waits for an answer: past every bound above, so that a slow answer is
# measured and judged by them, not dropped by the client as a lost connection.
CLIENT_TIMEOUT_SECONDS = 120.0
RETRY_PAUSE_SECONDS = 0.05
# The test's own watch on its threads (``_join_watched``): a PDA checks its batch's
# guard between attempts only, so one whose batch outlived the guard by more than an
# attempt (``CLIENT_TIMEOUT_SECONDS``) and this margin is stuck, not slow; the cutter
# ends within a cut once the PDAs have (it stops when one is done or failed). A stuck
# thread fails the test within about 3 minutes on an idle machine, where joining each
# thread for its 16 batches' guards took up to 48 minutes per thread.
WATCH_MARGIN_SECONDS = 10.0
CUTTER_GRACE_SECONDS = CUT_SECONDS + 10.0


@dataclass
class Attempt:
    device: str
    batch: int
    started: float
    seconds: float
    status: int  # 0: the connection failed
    payload: Any
    headers: dict[str, str]


@dataclass
class Cut:
    started: float
    severed: int
    ended: float = 0.0


@dataclass
class Load:
    """What the PDAs did, shared with the thread that cuts the connections."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    attempts: list[Attempt] = field(default_factory=list)
    done: set[str] = field(default_factory=set)
    # The PDAs still pushing: when each began its current batch (its first attempt).
    batch_started: dict[str, tuple[int, float]] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)
    pace: Pace = field(default_factory=Pace)  # of the pushes answered 200

    def answered_since(self, moment: float) -> set[str]:
        """The PDAs that got a 200 for a push sent after ``moment``."""
        with self.lock:
            return {a.device for a in self.attempts if a.started > moment and a.status == 200}

    def stuck(self) -> str | None:
        """A PDA still pushing a batch past the moment its own guard would have ended
        it (the guard, then one attempt, then ``WATCH_MARGIN_SECONDS``): its thread is
        stuck. None when none is."""
        limit = (
            self.pace.bound(STALL_FLOOR_SECONDS, STALL_FACTOR)
            + CLIENT_TIMEOUT_SECONDS
            + WATCH_MARGIN_SECONDS
        )
        now = time.monotonic()
        with self.lock:
            pushing = dict(self.batch_started)
        for device, (batch, started) in sorted(pushing.items()):
            if now - started > limit:
                return (
                    f"{device}: batch {batch} pushed for {now - started:.0f} s, past its "
                    f"guard and an attempt ({limit:.0f} s): the thread is stuck ({self.pace})"
                )
        return None


def _device(n: int) -> str:
    return f"PDA-CUT-{n:02d}"


def _pda(port: int, token: str, device: str, bodies: list[dict[str, Any]], load: Load) -> None:
    """Push each batch until it is acknowledged, retrying it unchanged."""
    try:
        for number, body in enumerate(bodies):
            data = json.dumps(body).encode()
            first_attempt = time.monotonic()
            with load.lock:
                load.batch_started[device] = (number, first_attempt)
            while True:
                bound = load.pace.bound(STALL_FLOOR_SECONDS, STALL_FACTOR)
                if time.monotonic() - first_attempt >= bound:
                    raise AssertionError(
                        f"{device}: batch {number} unacknowledged after {bound:.0f} s "
                        f"({load.pace})"
                    )
                started = time.monotonic()
                try:
                    reply = request(
                        port, "POST", "/api/v1/sync/push", data, token, CLIENT_TIMEOUT_SECONDS
                    )
                    status, payload, headers = reply.status, reply.payload, reply.headers
                except (OSError, http.client.HTTPException) as exc:
                    status, payload, headers = 0, type(exc).__name__, {}
                seconds = time.monotonic() - started
                with load.lock:
                    load.attempts.append(
                        Attempt(device, number, started, seconds, status, payload, headers)
                    )
                if status == 200:
                    load.pace.add(seconds)
                    break
                time.sleep(RETRY_PAUSE_SECONDS)
        with load.lock:
            load.done.add(device)
    except BaseException as exc:
        load.errors.append(exc)
    finally:
        with load.lock:
            load.batch_started.pop(device, None)


def _cutter(proxy: TcpProxy, load: Load, cuts: list[Cut], rng: random.Random) -> None:
    """Cut the database's connections ``CUTS`` times while the PDAs push."""
    try:
        for _ in range(CUTS):
            since = time.monotonic()
            # Every PDA is pushing again (the previous cut is over for all of them).
            while load.answered_since(since) != {_device(n) for n in range(PDAS)}:
                if load.done or load.errors:
                    return
                time.sleep(0.02)
            time.sleep(rng.uniform(0.05, 0.3))  # somewhere inside a push
            cut = Cut(time.monotonic(), proxy.cut())
            cuts.append(cut)
            time.sleep(CUT_SECONDS)
            proxy.restore()
            cut.ended = time.monotonic()
    except BaseException as exc:
        load.errors.append(exc)


def _join_watched(
    pdas: list[threading.Thread], cutter: threading.Thread, load: Load, server: Server
) -> None:
    """Wait for the PDAs, then the cutter, failing as soon as one is stuck: a PDA past
    its batch's guard and an attempt (``Load.stuck``), the cutter still running
    ``CUTTER_GRACE_SECONDS`` after the PDAs ended. Each PDA ends by its batches' guards
    however long a slow machine takes, so the wait has no bound of its own in seconds."""
    for thread in pdas:
        while thread.is_alive():
            thread.join(timeout=0.5)
            reason = load.stuck()
            assert reason is None, f"{reason}\n{server.log_tail()}"
    cutter.join(timeout=CUTTER_GRACE_SECONDS)
    assert not cutter.is_alive(), (
        f"the cutter still runs {CUTTER_GRACE_SECONDS:.1f} s after the PDAs ended\n"
        f"{server.log_tail()}"
    )


@pytest.fixture
def cut_database() -> Any:
    base = postgresql_test_url()
    assert base is not None
    with postgresql_database(base, "cut") as url:
        yield url


@pytest.mark.postgres_only
def test_pushes_through_database_connection_cuts_get_503_and_lose_nothing(
    tmp_path: Path, cut_database: str
) -> None:
    direct = make_url(cut_database)
    couriers = [(f"cut-courier{n}", PASSWORD, _device(n)) for n in range(PDAS)]
    prepare_station(server_env(tmp_path, cut_database), STATION, couriers)
    pushed = {device: push_bodies(device, BATCHES, BATCH_SIZE) for _, _, device in couriers}

    seed = random.randrange(2**32)
    load = Load()
    cuts: list[Cut] = []
    with TcpProxy((direct.host or "127.0.0.1", direct.port or 5432)) as proxy:
        proxied = direct.set(host="127.0.0.1", port=proxy.port)
        env = server_env(tmp_path, proxied.render_as_string(hide_password=False))
        server = Server(env, free_port(), tmp_path)
        started = time.monotonic()
        try:
            server.start()
            tokens = {courier[2]: sign_in(server.port, *courier) for courier in couriers}
            pdas = [
                threading.Thread(
                    target=_pda,
                    args=(server.port, tokens[device], device, pushed[device], load),
                    daemon=True,
                )
                for device in pushed
            ]
            cutter = threading.Thread(
                target=_cutter, args=(proxy, load, cuts, random.Random(seed)), daemon=True
            )
            for thread in [*pdas, cutter]:
                thread.start()
            _join_watched(pdas, cutter, load, server)
        finally:
            proxy.restore()
            server.kill()
        elapsed = time.monotonic() - started
        connections = proxy.connections
    unavailable = [
        line
        for path in server.log_paths
        for line in path.read_text(errors="replace").splitlines()
        if "database unavailable" in line
    ]
    # Requests whose connection was severed while in use (mid-transaction), not at connect.
    in_use = [line for line in unavailable if "connection failed:" not in line]

    if load.errors:
        raise load.errors[0]
    attempts = load.attempts
    statuses = Counter(a.status for a in attempts)
    # From the database's return to the first acknowledged push.
    recoveries = [
        min(
            (
                a.started + a.seconds - cut.ended
                for a in attempts
                if a.status == 200 and a.started + a.seconds > cut.ended
            ),
            default=float("inf"),
        )
        for cut in cuts
    ]
    # The 503s of each cut: answers to requests in flight at some moment of it (sent
    # before it began and cut, or sent while it lasted), however slowly they came.
    per_cut = [
        sum(
            1
            for a in attempts
            if a.status == 503 and a.started <= cut.ended and a.started + a.seconds >= cut.started
        )
        for cut in cuts
    ]
    reply_bound = load.pace.bound(REPLY_BOUND_SECONDS, REPLY_BOUND_FACTOR)
    recovery_bound = load.pace.bound(RECOVERY_BOUND_SECONDS, RECOVERY_BOUND_FACTOR)
    context = (
        f"seed {seed}; {len(cuts)} cuts severing {[c.severed for c in cuts]} connections "
        f"(of {connections}); answers {dict(statuses)}; 503s per cut {per_cut}; "
        f"slowest answer {max(a.seconds for a in attempts):.2f} s; "
        f"recovery {[round(r, 2) for r in recoveries]} s; {len(in_use)} requests cut while "
        f"using their connection; {len(pushed) * BATCHES * BATCH_SIZE} events; {load.pace}, "
        f"bounds {reply_bound:.1f} s an answer, {recovery_bound:.1f} s a recovery; "
        f"{elapsed:.1f} s"
    )
    print(f"database cut test: {context}")  # shown with -s or -rP

    assert load.done == set(pushed), context
    assert len(cuts) == CUTS and all(cut.severed > 0 for cut in cuts), context
    # Only 200s and 503s, each 503 with the error body and Retry-After; never a hang.
    assert set(statuses) <= {200, 503}, context
    for attempt in attempts:
        assert attempt.seconds < reply_bound, (attempt, context)
        if attempt.status == 503:
            assert attempt.payload["code"] == "database_unavailable", (attempt, context)
            assert attempt.payload["status"] == 503 and attempt.payload["message"], attempt
            assert int(attempt.headers["Retry-After"]) > 0, (attempt, context)
    # Each cut was seen by the PDAs, and the server came back by itself after each.
    assert all(count > 0 for count in per_cut), context
    assert in_use, context  # cut in the middle of requests, not only between them
    assert max(recoveries) < recovery_bound, context
    assert server.unexpected_log_lines(expected=("database unavailable",)) == [], context
    assert len(unavailable) == statuses[503], context  # one line per 503, each told

    with Ledger(cut_database) as ledger:
        ledger.assert_exactly_once(pushed, context)


def _watch(
    tmp_path: Path, pushing: Any, cutting: Any, load: Load
) -> tuple[BaseException | None, float]:
    """``_join_watched`` on a PDA thread running ``pushing`` and a cutter running
    ``cutting`` (no server: its log is never read); what it raised and how long it took."""
    pda = threading.Thread(target=pushing, daemon=True)
    cutter = threading.Thread(target=cutting, daemon=True)
    pda.start()
    cutter.start()
    started = time.monotonic()
    try:
        _join_watched([pda], cutter, load, Server({}, 0, tmp_path))
    except AssertionError as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


@pytest.fixture
def short_guards(monkeypatch: pytest.MonkeyPatch) -> None:
    """The watch's bounds in tenths of a second: a PDA is stuck 0.5 s into a batch."""
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "STALL_FLOOR_SECONDS", 0.2)
    monkeypatch.setattr(module, "CLIENT_TIMEOUT_SECONDS", 0.2)
    monkeypatch.setattr(module, "WATCH_MARGIN_SECONDS", 0.1)
    monkeypatch.setattr(module, "CUTTER_GRACE_SECONDS", 0.3)


@pytest.mark.usefixtures("short_guards")
def test_a_stuck_pda_fails_the_test_past_its_guard_and_an_attempt(tmp_path: Path) -> None:
    """A PDA thread that never comes back from a batch fails the test once its guard
    and an attempt have passed, not after every batch's guard (48 minutes a thread)."""
    load = Load()
    release = threading.Event()

    def stuck() -> None:
        with load.lock:
            load.batch_started[_device(0)] = (3, time.monotonic())
        release.wait()

    try:
        error, took = _watch(tmp_path, stuck, lambda: None, load)
    finally:
        release.set()
    assert error is not None and f"{_device(0)}: batch 3 pushed" in str(error), error
    assert 0.5 <= took < 5


@pytest.mark.usefixtures("short_guards")
def test_a_stuck_cutter_fails_the_test_soon_after_the_pdas_end(tmp_path: Path) -> None:
    release = threading.Event()
    try:
        error, took = _watch(tmp_path, lambda: None, release.wait, Load())
    finally:
        release.set()
    assert error is not None and "the cutter still runs" in str(error), error
    assert took < 5


@pytest.mark.usefixtures("short_guards")
def test_a_slow_pda_going_from_batch_to_batch_is_not_stuck(tmp_path: Path) -> None:
    """Batches of 0.2 s each for 1.5 s in all, three times a stuck batch's 0.5 s: the
    watch is per batch, not per run."""
    load = Load()

    def slow() -> None:
        for number in range(8):
            with load.lock:
                load.batch_started[_device(0)] = (number, time.monotonic())
            time.sleep(0.2)
        with load.lock:
            load.batch_started.pop(_device(0))

    error, took = _watch(tmp_path, slow, lambda: None, load)
    assert error is None and took >= 1.5
