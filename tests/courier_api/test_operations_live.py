"""``courier-api serve`` with two gunicorn workers: /metrics adds up every worker (also
one that died), logs are JSON lines with their process, a chunked body over
MAX_REQUEST_BYTES is refused with 413 by the real server, and a bug is answered,
logged and counted as in production.

The server runs on a SQLite file of its own in both passes of ``make test``: what is
tested here is gunicorn's processes, not the database.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tests.live_server import (
    START_DEADLINE_SECONDS,
    Reply,
    Server,
    call,
    free_port,
    prepare_station,
    request,
    run_cli,
    server_env,
    sign_in,
)
from tests.prometheus import value

pytestmark = pytest.mark.skipif(
    not hasattr(os, "killpg"), reason="needs POSIX process groups (gunicorn)"
)

METRICS_TOKEN = "live-scraper-token-" + "m" * 32
ADMIN_PASSWORD = "live-admin-password-1"
BODY_LIMIT = 65536
REQUESTS_PER_ROUND = 20
# How long a client of these tests waits for an answer: a guard against hangs only,
# long enough for a loaded CI machine (a load average of 12 on 2 cores), where a
# worker's first answers can take seconds. What is checked about time is told apart
# by the server's own waits (``LONG_WAIT_SECONDS``), not by seconds of this machine.
CLIENT_TIMEOUT_SECONDS = 60.0
# A long pull's wait: a pull answered before it could have ended was answered at once,
# not made to wait; /healthz answered before it could have ended was answered while
# the pull waited. The server is killed long before it ends.
LONG_WAIT_SECONDS = 120


def scrape(port: int, token: str) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT_SECONDS)
    try:
        connection.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        text = response.read().decode()
    finally:
        connection.close()
    assert response.status == 200, text
    return text


def post_chunked(port: int, path: str, chunks: list[bytes]) -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT_SECONDS)
    try:
        connection.putrequest("POST", path)
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Transfer-Encoding", "chunked")
        connection.endheaders()
        for chunk in chunks:
            connection.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        connection.send(b"0\r\n\r\n")
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    return Reply(response.status, json.loads(raw), dict(response.getheaders()))


def log_records(server: Server) -> list[dict[str, object]]:
    lines = []
    for path in server.log_paths:
        for line in path.read_text().splitlines():
            if line.startswith("serving on "):  # the command's own word to the operator
                continue
            lines.append(json.loads(line))  # everything else is one JSON object a line
    return lines


def worker_pids(server: Server) -> set[int]:
    return {
        int(str(r["message"]).rsplit(" ", 1)[-1])
        for r in log_records(server)
        if str(r["message"]).startswith("Booting worker with pid")
    }


def wait_for_workers(server: Server, booted: int) -> None:
    """Until gunicorn logged ``booted`` workers' starts: a guard against hangs only, as
    long as a start of the server may take."""
    deadline = time.monotonic() + START_DEADLINE_SECONDS
    while len(worker_pids(server)) < booted:
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.05)


def test_two_workers_add_up_in_metrics_and_log_json(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"left by an earlier run")
    env = server_env(
        tmp_path,
        f"sqlite:///{tmp_path / 'ops.db'}",
        METRICS_TOKEN=METRICS_TOKEN,
        LOG_FORMAT="json",
        MAX_REQUEST_BYTES=str(BODY_LIMIT),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    run_cli(env, "db", "upgrade")
    run_cli(
        env, "create-user", "admin", "--role", "admin", "--password-stdin",
        stdin=ADMIN_PASSWORD + "\n",
    )  # fmt: skip
    server = Server(env, free_port(), tmp_path, workers=2, threads=4)
    server.start()
    try:
        assert not (metrics_dir / "counter_999999.db").exists()  # emptied at start
        port = server.port
        before = scrape(port, METRICS_TOKEN)
        count = "courier_http_request_duration_seconds_count"
        labels = {"method": "GET", "rule": "/api/v1/stations", "status": "401"}
        for _ in range(REQUESTS_PER_ROUND):
            reply = request(port, "GET", "/api/v1/stations", timeout=CLIENT_TIMEOUT_SECONDS)
            assert reply.status == 401
        wait_for_workers(server, 2)
        served = {r["pid"] for r in log_records(server) if r.get("path") == "/api/v1/stations"}
        # End a worker that served some of them: gunicorn starts another; what the dead
        # one counted stays in the sum.
        victim = sorted(served)[0]
        os.kill(victim, signal.SIGTERM)
        wait_for_workers(server, 3)
        for _ in range(REQUESTS_PER_ROUND):
            reply = request(port, "GET", "/api/v1/stations", timeout=CLIENT_TIMEOUT_SECONDS)
            assert reply.status == 401
        signed_in = request(
            port,
            "POST",
            "/api/v1/auth/token",
            json.dumps({"username": "admin", "password": ADMIN_PASSWORD}).encode(),
            timeout=CLIENT_TIMEOUT_SECONDS,
        )
        assert signed_in.status == 200, signed_in.payload

        after = scrape(port, signed_in.payload["access_token"])  # an admin may read it too
        assert value(after, count, **labels) - value(before, count, **labels) == (
            2 * REQUESTS_PER_ROUND
        )
        assert value(after, "courier_sign_ins_total", outcome="ok") == 1
        processes = {r["pid"] for r in log_records(server) if r.get("path") == "/api/v1/stations"}
        assert len(processes) >= 2 and victim in processes  # several processes added up

        # A chunked body (no Content-Length) over MAX_REQUEST_BYTES: 413, not cut short.
        chunk = b" " * 8192
        too_large = post_chunked(port, "/api/v1/auth/token", [chunk] * (BODY_LIMIT // 8192 + 2))
        assert too_large.status == 413, too_large.payload
        assert too_large.payload["code"] == "payload_too_large"
        assert too_large.payload["limit"] == {"max": BODY_LIMIT, "unit": "bytes"}
        assert too_large.headers["X-Request-Id"]
        deep = post_chunked(port, "/api/v1/auth/token", [b"[" * 20000, b"]" * 20000])
        assert deep.status == 400 and deep.payload["code"] == "bad_request"
        fits = post_chunked(
            port,
            "/api/v1/auth/token",
            [b'{"username": "admin", ', f'"password": "{ADMIN_PASSWORD}"}}'.encode()],
        )
        assert fits.status == 200, fits.payload
    finally:
        server.kill()

    records = log_records(server)
    booting = [r for r in records if str(r["message"]).startswith("Booting worker")]
    assert booting and all(r["logger"] == "gunicorn.error" for r in booting)
    access = [r for r in records if r["logger"] == "courier_api.access"]
    assert access and all(
        {"request_id", "method", "status", "duration_ms"} <= set(r) for r in access
    )
    assert ADMIN_PASSWORD not in "".join(path.read_text() for path in server.log_paths)
    assert server.unexpected_log_lines() == []


def test_long_pulls_leave_a_thread_of_each_worker_to_health_checks_and_pushes(
    tmp_path: Path,
) -> None:
    """``--threads 2`` with ``MAX_PULL_WAITERS=4``: of two long pulls one waits, the
    other is answered at once, and /healthz is answered while the first still waits (a
    worker whose every thread held a waiting pull would answer nothing until one
    ended). Told by the pulls' wait, not by seconds of this machine: answered before a
    wait could have ended, whichever of the two pulls reached the server first (the
    second sent may arrive first on a loaded machine: it then waits, and the first is
    answered at once)."""
    env = server_env(
        tmp_path,
        f"sqlite:///{tmp_path / 'pulls.db'}",
        MAX_PULL_WAITERS="4",
        MAX_PULL_WAIT_SECONDS=str(LONG_WAIT_SECONDS),
    )
    prepare_station(env, "ST1", [("courier1", "courier-password-1", "PDA-1")])
    server = Server(env, free_port(), tmp_path, workers=1, threads=2)
    server.start()
    sent: dict[str, float] = {}
    answered: dict[str, float] = {}  # when each pull's answer came (monotonic)
    guard = LONG_WAIT_SECONDS + CLIENT_TIMEOUT_SECONDS
    try:
        token = sign_in(
            server.port, "courier1", "courier-password-1", "PDA-1", CLIENT_TIMEOUT_SECONDS
        )
        status, first = call(
            server.port, "GET", "/api/v1/sync/pull", token=token, timeout=CLIENT_TIMEOUT_SECONDS
        )
        assert status == 200, first
        long_pull = f"/api/v1/sync/pull?cursor={first['next_cursor']}&wait={LONG_WAIT_SECONDS}"

        def pull(name: str) -> None:
            sent[name] = time.monotonic()
            with contextlib.suppress(OSError, http.client.HTTPException):  # killed at the end
                request(server.port, "GET", long_pull, token=token, timeout=guard)
                answered[name] = time.monotonic()

        pulls = [threading.Thread(target=pull, args=(name,), daemon=True) for name in "AB"]
        pulls[0].start()
        time.sleep(1)  # A most likely holds one of the two threads now
        pulls[1].start()
        until = time.monotonic() + guard
        while not answered and time.monotonic() < until:
            time.sleep(0.02)
        assert answered, f"neither long pull answered in {guard:.0f} s"
        ((at_once, at), *others) = dict(answered).items()  # a copy: a thread may add
        assert not others, (answered, sent)
        waiting = "B" if at_once == "A" else "A"
        # No place in the waiting room: answered before a wait could have ended.
        assert at - sent[at_once] < LONG_WAIT_SECONDS, (at_once, at - sent[at_once])
        reply = request(server.port, "GET", "/healthz", timeout=guard)
        healthz_at = time.monotonic()
        assert reply.status == 200, reply
        # Answered while the other pull waits: before its wait could have ended (a
        # worker with no free thread answers once it ends), and it still waits.
        assert healthz_at - sent[waiting] < LONG_WAIT_SECONDS, healthz_at - sent[waiting]
        assert waiting not in answered
    finally:
        server.kill()
    warnings = [r for r in log_records(server) if r["logger"] == "courier_api.serve"]
    assert [r["level"] for r in warnings] == ["WARNING"]
    assert "MAX_PULL_WAITERS=4 would let long pulls take all 2 threads of a worker" in str(
        warnings[0]["message"]
    )
    assert "at most 1 wait at a time in each worker" in str(warnings[0]["message"])


def test_an_unhandled_error_is_answered_and_counted_as_production_answers_it(
    tmp_path: Path,
) -> None:
    """The live servers ran with ``APP_ENV=testing``, where Flask lets an unhandled
    error through to gunicorn, which answers its own HTML page: no error body, no
    request id, no access log line and no count in the metrics, where a server in
    production answers the JSON 500 (``internal_error``) a PDA and an operator get. A
    test of the live server met a 500 only as that page, so the production answer of a
    bug was never seen whole. The live servers now run with Flask's error handling as in
    production; here a device row the server cannot read (a time that is no time)
    breaks a list of PDAs."""
    env = server_env(
        tmp_path,
        f"sqlite:///{tmp_path / 'ops.db'}",
        METRICS_TOKEN=METRICS_TOKEN,
        LOG_FORMAT="json",
    )
    prepare_station(env, "ST1", [("courier1", "courier-password-1", "PDA-1")])
    run_cli(
        env, "create-user", "admin", "--role", "admin", "--password-stdin",
        stdin=ADMIN_PASSWORD + "\n",
    )  # fmt: skip
    with contextlib.closing(sqlite3.connect(tmp_path / "ops.db")) as broken:
        broken.execute("UPDATE device SET registered_at = 'not a time' WHERE id = 'PDA-1'")
        broken.commit()
    server = Server(env, free_port(), tmp_path, workers=1, threads=2)
    server.start()
    try:
        credentials = {"username": "admin", "password": ADMIN_PASSWORD}
        signed_in = request(
            server.port,
            "POST",
            "/api/v1/auth/token",
            json.dumps(credentials).encode(),
            timeout=CLIENT_TIMEOUT_SECONDS,
        )
        assert signed_in.status == 200, signed_in.payload
        token = signed_in.payload["access_token"]
        reply = request(
            server.port, "GET", "/api/v1/devices", token=token, timeout=CLIENT_TIMEOUT_SECONDS
        )
        metrics = scrape(server.port, METRICS_TOKEN)
    finally:
        server.kill()
    assert reply.status == 500, reply
    assert isinstance(reply.payload, dict), reply.payload  # not gunicorn's HTML page
    assert (reply.payload["code"], reply.payload["status"]) == ("internal_error", 500)
    assert "not a time" not in json.dumps(reply.payload)  # the details stay in the log
    [request_id] = [v for k, v in reply.headers.items() if k.lower() == "x-request-id"]
    labels = {"method": "GET", "rule": "/api/v1/devices", "status": "500"}
    assert value(metrics, "courier_http_request_duration_seconds_count", **labels) == 1
    [error] = [r for r in log_records(server) if r.get("level") == "ERROR"]
    assert error["request_id"] == request_id
