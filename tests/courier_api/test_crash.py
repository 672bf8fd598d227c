"""Crash test: the real server, killed with SIGKILL in the middle of pushes.

``courier-api serve`` (gunicorn, 2 workers) runs as a subprocess on a database of
its own (``tests.live_server``: a SQLite file in the SQLite pass of ``make test``, a
PostgreSQL database created for the test in the PostgreSQL pass), prepared with the
CLI as an operator would. One client pushes ``BATCHES`` batches of ``BATCH_SIZE``
events (more, up to ``MAX_BATCHES``, while a round below still has its kill to land;
seq 1..N, each event a fresh ``client_event_id``), one batch after the other as a PDA
does. Meanwhile a second thread kills the server's whole process group with SIGKILL
``KILLS`` times and starts it again. The kills alternate between two moments:

* a random moment of an in-flight push (in practice before its commit: the
  transaction must vanish, and the retry must apply the batch in full);
* just after the in-flight push committed (seen by polling the database from the
  test), before its receipt reaches the client: the retry must be answered with the
  stored receipt and must store nothing twice.

A kill may miss its moment: the client may have read the receipt already, and not yet
said so when the signal is sent (more often on a loaded machine; on PostgreSQL under
load this failed the run though nothing was lost). The killer tells such a kill
apart, by the client's attempt in flight, and the round kills a later push, up to
``TRIES_PER_ROUND`` times, until one lands as its mode asks.

The client retries the failed batch, with the same ``batch_id`` and the same
body, until it gets a 200; a refused connection, a reset or a 503 is a retry.
Once every batch is acknowledged the server is killed once more, and the
database is checked directly: exactly N events for the device, seqs 1..N once
each, exactly the ``client_event_id``s sent, one ``sync_batch`` row per batch,
nothing quarantined, the device's acknowledgement at N (and, on SQLite, the
file's integrity). It also checks that each round's kill landed in a push in flight,
and that the two ``after_commit`` ones came after a commit and before its answer, so
it cannot pass vacuously; and that the server logged no error or traceback on any of
its starts.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.live_server import (
    KILL_DEADLINE_SECONDS,
    START_DEADLINE_SECONDS,
    Ledger,
    Pace,
    Server,
    call,
    free_port,
    prepare_station,
    push_bodies,
    server_database,
    server_env,
    sign_in,
)

pytestmark = pytest.mark.skipif(
    not hasattr(os, "killpg"), reason="needs POSIX process groups (gunicorn)"
)

BATCHES = 30
# The rounds' later tries push on past ``BATCHES``, up to this many batches in all.
MAX_BATCHES = 90
BATCH_SIZE = 200
KILLS = 4
STATION = "CRASH"
USERNAME = "crash-courier"
PASSWORD = "crash-courier-password-1"
DEVICE = "PDA-CRASH-01"
# A guard against hangs: a batch unacknowledged this long since its first attempt or
# the end of the server's last restart, whichever came later, or this many median
# pushes on a machine slower than that (``Pace``). It bounded the whole run (90 s) and
# failed runs that held on a loaded machine, where every push, kill and restart is
# slower. A restart in progress is not counted (its start may take
# ``START_DEADLINE_SECONDS``, more than the floor): it has a guard of its own, the
# kill's waits and the start's, and this margin for the look at the database between.
STALL_FLOOR_SECONDS = 60.0
STALL_FACTOR = 20.0
RESTART_GUARD_SECONDS = 2 * KILL_DEADLINE_SECONDS + START_DEADLINE_SECONDS + 30.0
COMMIT_POLL_SECONDS = 0.001  # well below the time from commit to sent receipt
RETRY_PAUSE_SECONDS = 0.05
# Kills a round may take to have one land as its mode asks (``Kill.landed``); a kill
# that missed is a kill all the same (a restart, and the client's push answered first).
TRIES_PER_ROUND = 20


@dataclass
class Kill:
    mode: str  # "random" or "after_commit"
    batch: int  # the batch in flight when the signal was sent
    batch_id: str
    attempt: int  # the client's attempt in flight when the signal was sent
    at: dt.datetime
    committed: bool  # its sync_batch row was in the database at the kill
    # The attempt in flight got no answer: the kill landed mid-push. False when the
    # receipt reached the client before the signal (the client had not yet said so).
    interrupted: bool = False

    @property
    def landed(self) -> bool:
        """What the round's mode is about: a push cut short, and for ``after_commit``
        one cut short after its commit (its answer lost)."""
        return self.interrupted and (self.committed or self.mode == "random")


@dataclass
class Progress:
    """What the client is doing, shared with the killer thread."""

    condition: threading.Condition = field(default_factory=threading.Condition)
    batch: int = -1
    batch_id: str = ""
    attempt: int = 0  # the number of the client's latest attempt
    in_flight: bool = False
    answered: dict[int, bool] = field(default_factory=dict)  # attempt: got a 200
    finished: bool = False
    rounds_done: bool = False  # every round's kill landed: the client may stop at BATCHES
    killer_errors: list[BaseException] = field(default_factory=list)


def _next_push(progress: Progress, earliest: int) -> tuple[int, str] | None:
    """Wait for a push of batch ``earliest`` or later to be in flight (None: all done)."""

    def ready() -> bool:
        return progress.finished or (progress.in_flight and progress.batch >= earliest)

    with progress.condition:
        progress.condition.wait_for(ready)
        if progress.finished:
            return None
        return progress.batch, progress.batch_id


def _got_no_answer(progress: Progress, attempt: int) -> bool:
    """Wait for the client's ``attempt`` to end: True if it got no 200."""
    with progress.condition:
        progress.condition.wait_for(lambda: attempt in progress.answered or progress.finished)
        return not progress.answered.get(attempt, False)


def _killer(
    server: Server, progress: Progress, ledger: Ledger, rng: random.Random, kills: list[Kill]
) -> None:
    """Kill the server during pushes, restarting it after each kill, until ``KILLS``
    rounds each had a kill land as its mode asks (``Kill.landed``): a kill sent once the
    push committed may find its receipt already read by the client (more often on a
    loaded machine: 4 of 6 on PostgreSQL at a load average of 11 to 13), and the round
    then kills a later push, up to ``TRIES_PER_ROUND`` times, the client pushing past
    ``BATCHES`` meanwhile."""
    try:
        for round_ in range(KILLS):
            mode = "random" if round_ % 2 == 0 else "after_commit"
            earliest = max(
                (round_ + 1) * BATCHES // (KILLS + 2), kills[-1].batch + 1 if kills else 0
            )
            tries = 0
            while True:
                push = _next_push(progress, earliest)
                if push is None:
                    return
                batch, batch_id = push
                if mode == "random":
                    time.sleep(rng.uniform(0.0, 0.25))
                else:
                    ledger.wait_for_batch(
                        batch_id,
                        lambda b=batch: progress.in_flight and progress.batch == b,
                        poll=COMMIT_POLL_SECONDS,
                    )
                with progress.condition:
                    if not progress.in_flight or (
                        mode == "after_commit" and progress.batch != batch
                    ):
                        # The push ended first: its next attempt, or the next batch's.
                        earliest = batch
                        continue
                    batch, batch_id = progress.batch, progress.batch_id
                    attempt = progress.attempt
                    at = dt.datetime.now(dt.UTC)
                    server.kill()
                kill = Kill(mode, batch, batch_id, attempt, at, ledger.batch_committed(batch_id))
                kills.append(kill)
                server.start()
                kill.interrupted = _got_no_answer(progress, attempt)
                if kill.landed:
                    break
                tries += 1
                if tries == TRIES_PER_ROUND:
                    raise AssertionError(
                        f"round {round_}: no {mode} kill landed in {tries} tries: {kills}"
                    )
                earliest = batch + 1
        with progress.condition:
            progress.rounds_done = True
    except BaseException as exc:  # reported by the client thread and the test
        progress.killer_errors.append(exc)
        with progress.condition:
            progress.condition.notify_all()


def _stall(first_attempt: float, server: Server, pace: Pace) -> str | None:
    """Why the batch first attempted at ``first_attempt`` counts as stuck now, or None:
    unacknowledged past its guard since that attempt or the end of the server's last
    restart, whichever came later; or the server down, in a restart, past
    ``RESTART_GUARD_SECONDS`` (the killer's own deadlines fail it sooner)."""
    now = time.monotonic()
    down_since = server.down_since
    if down_since is not None:
        if now - down_since < RESTART_GUARD_SECONDS:
            return None
        return f"the server down for {now - down_since:.0f} s, in a restart"
    stalled = now - max(first_attempt, server.ready_at)
    bound = pace.bound(STALL_FLOOR_SECONDS, STALL_FACTOR)
    if stalled < bound:
        return None
    return f"not acknowledged in {bound:.0f} s ({pace})"


@pytest.fixture
def crash_database(tmp_path: Path) -> Any:
    with server_database(tmp_path, "crash") as url:
        yield url


@pytest.fixture
def crash_ledger(crash_database: str) -> Iterator[Ledger]:
    """Closed however the test ends, after its killer thread (which reads through it),
    before its database is dropped."""
    with Ledger(crash_database) as ledger:
        yield ledger


def test_pushes_survive_sigkill_of_the_server_without_losing_or_doubling_events(
    tmp_path: Path, crash_database: str, crash_ledger: Ledger
) -> None:
    env = server_env(tmp_path, crash_database)
    prepare_station(env, STATION, [(USERNAME, PASSWORD, DEVICE)])
    bodies = push_bodies(DEVICE, MAX_BATCHES, BATCH_SIZE)

    seed = random.randrange(2**32)
    server = Server(env, free_port(), tmp_path)
    ledger = crash_ledger
    progress = Progress()
    kills: list[Kill] = []
    receipts: list[dict[str, Any]] = []
    failures: list[tuple[int, str]] = []  # (batch, what the attempt ran into)
    killer = threading.Thread(
        target=_killer,
        args=(server, progress, ledger, random.Random(seed), kills),
        daemon=True,
    )
    pace = Pace()
    started = time.monotonic()
    try:
        server.start()
        token = sign_in(server.port, USERNAME, PASSWORD, DEVICE)
        killer.start()
        for number, body in enumerate(bodies):
            with progress.condition:
                if number >= BATCHES and progress.rounds_done:
                    break
            data = json.dumps(body).encode()
            first_attempt = time.monotonic()
            while True:
                assert not progress.killer_errors, "the killer thread failed"
                stall = _stall(first_attempt, server, pace)
                assert stall is None, (
                    f"batch {number}: {stall} (seed {seed}); "
                    f"failures {failures[-5:]}\n{server.log_tail()}"
                )
                with progress.condition:
                    progress.batch, progress.batch_id = number, body["batch_id"]
                    progress.attempt += 1
                    progress.in_flight = True
                    progress.condition.notify_all()
                attempt = time.monotonic()
                status = 0
                try:
                    status, payload = call(server.port, "POST", "/api/v1/sync/push", data, token)
                except (OSError, http.client.HTTPException) as exc:
                    status, payload = 0, None
                    failures.append((number, type(exc).__name__))
                finally:
                    with progress.condition:
                        progress.in_flight = False
                        progress.answered[progress.attempt] = status == 200
                        progress.condition.notify_all()
                if status == 200:
                    pace.add(time.monotonic() - attempt)
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
        server.kill()  # SIGKILL once more: what was acknowledged must be stored
    elapsed = time.monotonic() - started
    pushed = bodies[: len(receipts)]
    total = len(pushed) * BATCH_SIZE

    context = (
        f"{ledger.engine.dialect.name}, seed {seed}; kills: "
        + ", ".join(
            f"{k.mode} in batch {k.batch} ({'committed' if k.committed else 'rolled back'}"
            f"{'' if k.interrupted else ', answered first'})"
            for k in kills
        )
        + f"; {len(pushed)} batches; failed attempts: {dict(Counter(failures))}; "
        + f"{pace}; {elapsed:.1f} s"
    )
    print(f"crash test: {context}")  # shown with -s or -rP
    # The kills were real and hit pushes in flight: the test is not vacuous. Each round
    # ended with a kill that landed as its mode asks; a kill whose push was answered
    # first (the receipt read before the signal) is told apart, not counted as landed.
    landed = [kill for kill in kills if kill.landed]
    assert [kill.mode for kill in landed] == ["random", "after_commit"] * (KILLS // 2), context
    interrupted = {number for number, _ in failures}
    assert {kill.batch for kill in landed} <= interrupted, context
    # Twice the batch was committed but its answer never reached the client: the case
    # where a careless retry would store the events twice.
    lost_answers = [kill for kill in landed if kill.committed]
    assert len(lost_answers) >= KILLS // 2, context
    assert server.starts == len(kills) + 1, context
    assert server.unexpected_log_lines() == [], context

    # Every receipt: its batch, every event applied once, acknowledged through its end.
    assert len(receipts) >= BATCHES, context
    for number, (body, receipt) in enumerate(zip(pushed, receipts, strict=True)):
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

    # The database itself, after the final SIGKILL.
    ledger.assert_exactly_once({DEVICE: pushed}, context)


def test_a_batch_is_not_counted_stuck_while_the_server_restarts(tmp_path: Path) -> None:
    """A restart may take ``START_DEADLINE_SECONDS`` (60 s) on a loaded machine, more
    than the stall guard's floor: counted from the batch's first attempt before the
    kill (``ready_at`` still the previous start's meanwhile), a restart within its own
    deadline failed the test. The guard counts from the restart's end; the restart has
    its own."""
    server = Server({}, 0, tmp_path)
    pace = Pace()
    now = time.monotonic()
    server.ready_at = now - 200.0  # the previous start
    first_attempt = now - 70.0  # then the server was killed, and restarts since
    server.down_since = now - 69.0
    assert _stall(first_attempt, server, pace) is None
    server.down_since, server.ready_at = None, now - 1.0  # up again a second ago
    assert _stall(first_attempt, server, pace) is None
    server.ready_at = now - STALL_FLOOR_SECONDS - 1.0  # up since, the batch unanswered
    assert "not acknowledged in 60 s" in (_stall(first_attempt, server, pace) or "")
    server.down_since = now - RESTART_GUARD_SECONDS - 1.0  # a restart that never ends
    assert "in a restart" in (_stall(first_attempt, server, pace) or "")
