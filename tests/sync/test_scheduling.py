"""The scheduler's lease and run records, with controlled time (``sync.scheduling``)."""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger
from flask import Flask
from sqlalchemy import Connection, event, func, select
from sqlalchemy.orm import Session, sessionmaker

from courier_api.extensions import db
from courier_api.scheduler import RETRY_SUFFIX, JobScheduler, jobs_of, new_scheduler
from models import JobRun, SchedulerLease, Station
from sync import scheduling
from sync.scheduling import Job, claim_lease, give_up_lease, run_job, run_jobs

T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=dt.UTC)
LEASE = 60
A, B = "host-a:101:aaaa", "host-b:202:bbbb"


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


@pytest.fixture
def sessions(connection: Connection) -> sessionmaker[Session]:
    """Sessions in the test's transaction, each committing to a savepoint."""
    return sessionmaker(
        bind=connection, expire_on_commit=False, join_transaction_mode="create_savepoint"
    )


def counting_job(name: str = "count", interval: int = 300) -> Job:
    def run(*, session: Session, now: dt.datetime) -> dict[str, Any]:
        return {"now": now.isoformat(), "stations": session.scalar(select(func.count(Station.id)))}

    return Job(name, f"{name} things", dt.timedelta(seconds=interval), run)


def runs(sessions: sessionmaker[Session], job: str | None = None) -> list[JobRun]:
    with sessions() as session:
        query = select(JobRun).order_by(JobRun.id)
        if job is not None:
            query = query.where(JobRun.job == job)
        return list(session.scalars(query))


def run(sessions: sessionmaker[Session], job: Job, holder: str, now: dt.datetime, **kw: Any):
    return run_job(sessions=sessions, job=job, holder=holder, now=now, lease_seconds=LEASE, **kw)


# -- the lease ---------------------------------------------------------------------------------


def test_the_lease_is_taken_renewed_refused_and_taken_over_after_it_expires(
    sessions: sessionmaker[Session],
) -> None:
    first = claim_lease(sessions, holder=A, now=T0, seconds=LEASE)
    assert first.held and first.lease == scheduling.Lease(A, T0, at(60))

    refused = claim_lease(sessions, holder=B, now=at(10), seconds=LEASE)
    assert not refused.held
    assert refused.lease == scheduling.Lease(A, T0, at(60))  # who, until when

    renewed = claim_lease(sessions, holder=A, now=at(30), seconds=LEASE)
    assert renewed.held and renewed.taken_over_from is None
    assert renewed.lease == scheduling.Lease(A, T0, at(90))  # acquired_at kept

    assert not claim_lease(sessions, holder=B, now=at(89), seconds=LEASE).held
    taken = claim_lease(sessions, holder=B, now=at(90), seconds=LEASE)
    assert taken.held and taken.taken_over_from == A
    assert taken.lease == scheduling.Lease(B, at(90), at(150))

    late = claim_lease(sessions, holder=A, now=at(100), seconds=LEASE)
    assert not late.held and late.lease.holder == B
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(SchedulerLease)) == 1
        assert scheduling.current_lease(session, now=at(149)).holder == B
        assert scheduling.current_lease(session, now=at(150)) is None  # expired


def test_releasing_the_lease_lets_another_process_take_it_at_once(
    sessions: sessionmaker[Session],
) -> None:
    assert claim_lease(sessions, holder=A, now=T0, seconds=LEASE).held
    assert not give_up_lease(sessions, holder=B)  # not B's to give up
    assert not claim_lease(sessions, holder=B, now=at(1), seconds=LEASE).held
    assert give_up_lease(sessions, holder=A)
    claim = claim_lease(sessions, holder=B, now=at(2), seconds=LEASE)
    assert claim.held and claim.taken_over_from is None
    with sessions() as session:
        assert scheduling.current_lease(session, now=at(2)).holder == B


# -- runs --------------------------------------------------------------------------------------


def test_a_run_is_recorded_with_what_the_job_did(sessions: sessionmaker[Session]) -> None:
    result = run(sessions, counting_job(), A, T0)

    assert result.outcome == "ok" and result.run_id is not None
    assert result.detail == {"now": T0.isoformat(), "stations": 0}
    [stored] = runs(sessions)
    assert (stored.id, stored.job, stored.holder, stored.outcome) == (
        result.run_id,
        "count",
        A,
        "ok",
    )
    assert stored.started_at == T0
    assert stored.duration_ms is not None and stored.duration_ms >= 0
    assert stored.finished_at == T0 + dt.timedelta(milliseconds=stored.duration_ms)
    assert stored.detail == result.detail and stored.error is None
    assert "count ok in" in result.summary()


def test_a_job_runs_only_in_the_process_holding_the_lease(
    sessions: sessionmaker[Session],
) -> None:
    job = counting_job()
    assert run(sessions, job, A, T0).outcome == "ok"

    other = run(sessions, job, B, at(30), force=True)  # A's lease runs until at(60)

    assert other.outcome == "standby" and not other.ran
    assert other.lease is not None and other.lease.holder == A
    assert "held by host-a:101:aaaa until 2026-11-23T08:01:00+00:00" in other.summary()
    assert [r.holder for r in runs(sessions)] == [A]


def test_a_job_is_due_again_after_its_interval_whoever_ran_it(
    sessions: sessionmaker[Session],
) -> None:
    job = counting_job(interval=300)
    assert run(sessions, job, A, T0).outcome == "ok"
    assert run(sessions, job, A, at(60)).outcome == "not_due"
    assert run(sessions, job, A, at(60), force=True).outcome == "ok"  # --once
    # A timer firing a little early still counts as the next turn.
    assert run(sessions, job, A, at(60 + 280)).outcome == "ok"
    # A dies; B takes over when its lease expires, and does not re-run what A just ran.
    assert run(sessions, job, B, at(60 + 280 + 61)).outcome == "not_due"
    assert run(sessions, job, B, at(60 + 280 + 300)).outcome == "ok"
    assert [(r.holder, r.started_at) for r in runs(sessions)] == [
        (A, T0),
        (A, at(60)),
        (A, at(340)),
        (B, at(640)),
    ]


def flaky_job(failures: int, *, interval: dt.timedelta = dt.timedelta(days=1)) -> Job:
    """A daily job whose first ``failures`` runs fail (the database restarting)."""
    calls: list[dt.datetime] = []

    def run(*, session: Session, now: dt.datetime) -> dict[str, Any]:
        calls.append(now)
        if len(calls) <= failures:
            raise ConnectionError("the database is restarting")
        return {"runs": len(calls)}

    return Job("purge", "purge", interval, run, retry_after=dt.timedelta(minutes=15))


def test_a_failed_run_is_due_again_after_its_retry_delay_not_a_whole_interval(
    sessions: sessionmaker[Session],
) -> None:
    job = flaky_job(failures=2)
    minute, day = 60, 24 * 3600
    assert run(sessions, job, A, T0).outcome == "failed"
    assert run(sessions, job, A, at(5 * minute)).outcome == "not_due"
    assert run(sessions, job, A, at(15 * minute)).outcome == "failed"  # still restarting
    assert run(sessions, job, A, at(30 * minute)).outcome == "ok"
    # Once it ran, it waits its interval again.
    assert run(sessions, job, A, at(45 * minute)).outcome == "not_due"
    assert run(sessions, job, A, at(30 * minute + day)).outcome == "ok"
    # A turn whose start could not be recorded is decided as of when it was due: run
    # once when tried again, and not again for the same turn.
    missed, later = at(2 * day + 30 * minute), at(2 * day + 45 * minute)
    assert run(sessions, job, A, later, due_as_of=missed).outcome == "ok"
    assert run(sessions, job, A, at(2 * day + 60 * minute), due_as_of=missed).outcome == (
        "not_due"
    )
    # A job with no retry delay waits its interval after a failure too.
    plain = Job("plain", "plain", dt.timedelta(days=1), flaky_job(1).run)
    assert run(sessions, plain, A, T0).outcome == "failed"
    assert run(sessions, plain, A, at(20 * minute)).outcome == "not_due"


def installed(
    sessions: Any, jobs: list[Job], holder: str, now: list[dt.datetime]
) -> tuple[JobScheduler, Any]:
    """A ``JobScheduler`` on ``now[0]``'s clock, installed in an APScheduler scheduler
    that is not started: the test fires its turns itself."""
    runner = JobScheduler(
        sessions=sessions, jobs=jobs, lease_seconds=LEASE, holder=holder, clock=lambda: now[0]
    )
    return runner, runner.install(new_scheduler(BackgroundScheduler), start_now=False)


def test_the_scheduler_tries_a_failed_daily_run_again_a_quarter_hour_later(
    sessions: sessionmaker[Session],
) -> None:
    """Not the next day: APScheduler gets a one-off turn for it, again while it fails,
    none once it ran, none for a job that comes round every few minutes anyway."""
    now = [T0]
    runner, scheduler = installed(
        sessions, [flaky_job(failures=2), counting_job("often", interval=300)], A, now
    )

    def retry_turn() -> Any:
        return scheduler.get_job(f"purge{RETRY_SUFFIX}")

    started = dt.datetime.now(dt.UTC)
    runner.scheduled_run("purge")
    turn = retry_turn()
    assert turn is not None and isinstance(turn.trigger, DateTrigger)
    wait = turn.trigger.run_date - started
    assert dt.timedelta(minutes=15) <= wait < dt.timedelta(minutes=16)
    for expected in ("failed", "ok"):
        now[0] += dt.timedelta(minutes=15)
        scheduler.remove_job(turn.id)  # APScheduler drops a one-off turn once it fired
        turn.func(*turn.args)
        assert runs(sessions, "purge")[-1].outcome == expected
        turn = retry_turn()
        assert (turn is not None) == (expected == "failed")
    assert [r.outcome for r in runs(sessions, "purge")] == ["failed", "failed", "ok"]

    def broken() -> Session:
        raise ConnectionError("the database is unreachable")

    unreachable, other = installed(
        broken, [flaky_job(failures=0), counting_job("often", interval=300)], B, now
    )
    unreachable.scheduled_run("purge")
    turn = other.get_job(f"purge{RETRY_SUFFIX}")
    assert turn is not None and turn.args == ("purge", now[0])  # as of the missed turn
    unreachable.scheduled_run("often")
    assert other.get_job(f"often{RETRY_SUFFIX}") is None  # its next turn comes sooner


def test_a_daily_run_cut_off_by_a_database_restart_is_tried_again_a_quarter_hour_later(
    sessions: sessionmaker[Session],
) -> None:
    """The run's start is recorded, then the database goes away mid-run: the job fails
    and so does recording its end. A quarter of an hour later, with the database
    back, the retry marks the run abandoned and runs the job (a second reader saw it
    judged "as of" the turn, zero minutes after the run it abandons: not due, and no
    retry after that)."""
    down = [False]

    class Restarting:
        """The database: unreachable while ``down``."""

        def __call__(self) -> Session:
            if down[0]:
                raise ConnectionError("the database is restarting")
            return sessions()

        def begin(self) -> Any:
            if down[0]:
                raise ConnectionError("the database is restarting")
            return sessions.begin()

    ran: list[dt.datetime] = []

    def purge(*, session: Session, now: dt.datetime) -> dict[str, Any]:
        ran.append(now)
        if len(ran) == 1:
            down[0] = True  # the restart begins mid-run
            raise ConnectionError("server closed the connection unexpectedly")
        return {"purged": 0}

    now = [T0]
    job = Job("purge", "purge", dt.timedelta(days=1), purge, retry_after=dt.timedelta(minutes=15))
    runner, scheduler = installed(Restarting(), [job], A, now)
    runner.scheduled_run("purge")
    turn = scheduler.get_job(f"purge{RETRY_SUFFIX}")
    assert turn is not None
    down[0] = False
    now[0] = T0 + dt.timedelta(minutes=15)
    scheduler.remove_job(turn.id)
    turn.func(*turn.args)
    assert ran == [T0, now[0]]
    assert [(r.outcome, r.started_at) for r in runs(sessions, "purge")] == [
        ("failed", T0),
        ("ok", now[0]),
    ]
    assert scheduler.get_job(f"purge{RETRY_SUFFIX}") is None


def test_a_failing_job_is_recorded_as_failed_and_its_writes_are_rolled_back(
    sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    def breaks(*, session: Session, now: dt.datetime) -> dict[str, Any]:
        session.add(Station(code="HALF", name="half-done", timezone="UTC"))
        session.flush()
        raise ValueError("the sweep broke half-way")

    failing = Job("breaks", "breaks", dt.timedelta(minutes=5), breaks)

    results = run_jobs(
        sessions=sessions,
        jobs=[failing, counting_job()],
        holder=A,
        now=T0,
        lease_seconds=LEASE,
    )

    assert [(r.job, r.outcome) for r in results] == [("breaks", "failed"), ("count", "ok")]
    assert results[0].error == "ValueError: the sweep broke half-way"
    assert results[1].detail["stations"] == 0  # the half-done write is gone
    failed = runs(sessions, "breaks")[0]
    assert failed.outcome == "failed" and failed.error == "ValueError: the sweep broke half-way"
    assert failed.finished_at is not None and failed.duration_ms is not None
    assert failed.detail == {}
    with sessions() as session:
        assert session.scalar(select(Station).where(Station.code == "HALF")) is None
    assert "job breaks (run" in caplog.text and "Traceback" in caplog.text


def test_a_run_left_running_by_a_process_that_lost_the_lease_is_marked_abandoned(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:  # A started a run, then died
        scheduling.acquire_lease(session, holder=A, now=T0, seconds=LEASE)
        session.add(JobRun(job="count", holder=A, started_at=T0, outcome="running", detail={}))

    assert run(sessions, counting_job(), B, at(30)).outcome == "standby"
    result = run(sessions, counting_job(), B, at(400))

    assert result.outcome == "ok"
    dead, new = runs(sessions)
    assert (dead.outcome, dead.finished_at) == ("failed", at(400))
    assert dead.error.startswith(f"abandoned: {A} stopped holding the scheduler lease")
    assert (new.holder, new.outcome) == (B, "ok")


def test_a_run_whose_end_was_never_recorded_is_marked_abandoned_by_the_next(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:  # A's run ended while the database was unreachable
        scheduling.acquire_lease(session, holder=A, now=T0, seconds=LEASE)
        session.add(JobRun(job="count", holder=A, started_at=T0, outcome="running", detail={}))

    result = run(sessions, counting_job(), A, at(30), force=True)

    assert result.outcome == "ok"
    lost, new = runs(sessions)
    assert (lost.outcome, lost.finished_at) == ("failed", at(30))
    assert lost.error.startswith("abandoned: the end of this run was never recorded")
    assert new.outcome == "ok"


def test_a_run_paused_past_its_lease_while_another_process_ran_the_job_commits_nothing(
    sessions: sessionmaker[Session],
) -> None:
    """A process stopped in the middle of a run (SIGSTOP, a long GC or VM pause) wakes
    up still believing it holds the lease; meanwhile the lease expired and another
    process took it over and ran the job. The woken run must not commit: its writes
    would be the job's effect a second time (a second purge audit entry, a flag
    closed and raised again from a stale ``now``)."""

    def leaves_a_mark(*, session: Session, now: dt.datetime) -> dict[str, Any]:
        if now == T0:  # A's run: A stops here; B takes the lease over and runs the job
            assert run(sessions, job, B, at(LEASE + 300)).outcome == "ok"
        seconds = int((now - T0).total_seconds())
        session.add(Station(code=f"RUN-AT-{seconds}", name="a run's mark", timezone="UTC"))
        return {"at": seconds}

    job = Job("marks", "marks", dt.timedelta(seconds=300), leaves_a_mark)

    woken = run(sessions, job, A, T0)

    with sessions() as session:
        assert session.scalars(select(Station.code)).all() == [f"RUN-AT-{LEASE + 300}"]
    assert woken.outcome == "failed" and woken.error is not None
    assert woken.error.startswith(f"LeaseLost: {A} no longer holds the scheduler lease")
    assert [(r.holder, r.outcome) for r in runs(sessions)] == [(A, "failed"), (B, "ok")]


def test_two_schedulers_one_after_the_other_run_each_job_once(
    sessions: sessionmaker[Session],
) -> None:
    jobs = [counting_job("one"), counting_job("two", 60), counting_job("three", 86400)]
    first = run_jobs(sessions=sessions, jobs=jobs, holder=A, now=T0, lease_seconds=LEASE)
    second = run_jobs(sessions=sessions, jobs=jobs, holder=B, now=T0, lease_seconds=LEASE)

    assert [r.outcome for r in first] == ["ok", "ok", "ok"]
    assert [r.outcome for r in second] == ["standby"] * 3
    assert {r.lease.holder for r in second if r.lease} == {A}
    assert Counter(r.job for r in runs(sessions)) == {"one": 1, "two": 1, "three": 1}


# -- real concurrency ----------------------------------------------------------------------------


@pytest.fixture
def committed_sessions(committed_app: Flask) -> Iterator[sessionmaker[Session]]:
    yield sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)


@pytest.mark.postgres_only
def test_two_schedulers_started_at_once_run_each_job_once(
    committed_app: Flask, committed_sessions: sessionmaker[Session]
) -> None:
    """Both processes ask to run every due job at the same moment, with the real jobs
    on committed data: the lease lets one run each job, the other stands by."""
    jobs = jobs_of(committed_app.config)
    # A lease shorter than the shortest interval (a minute): once it has expired, no job
    # that ran at its start is due again yet.
    lease = 30
    assert all(job.interval > dt.timedelta(seconds=lease + 1) for job in jobs)
    holders = [A, B]
    results: dict[str, list[scheduling.RunResult]] = {}
    barrier = threading.Barrier(len(holders))

    def scheduler(holder: str, now: dt.datetime) -> None:
        barrier.wait()
        results[holder] = run_jobs(
            sessions=committed_sessions, jobs=jobs, holder=holder, now=now, lease_seconds=lease
        )

    threads = [threading.Thread(target=scheduler, args=(holder, T0)) for holder in holders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    outcomes = {holder: [r.outcome for r in results[holder]] for holder in holders}
    assert sorted(outcomes.values()) == [["ok"] * len(jobs), ["standby"] * len(jobs)], outcomes
    winner = next(h for h in holders if outcomes[h][0] == "ok")
    stored = runs(committed_sessions)
    assert Counter(r.job for r in stored) == {job.name: 1 for job in jobs}
    assert {r.holder for r in stored} == {winner}

    # Once the lease has expired both try again at once, and since every job ran less
    # than its interval ago, neither runs anything; one of them holds the lease now.
    barrier.reset()
    again = at(lease + 1)
    threads = [threading.Thread(target=scheduler, args=(holder, again)) for holder in holders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    later = [r.outcome for holder in holders for r in results[holder]]
    assert "ok" not in later and "failed" not in later
    assert len(runs(committed_sessions)) == len(jobs)


@pytest.mark.postgres_only
def test_two_processes_claiming_an_absent_lease_at_once_get_one_holder(
    committed_sessions: sessionmaker[Session],
) -> None:
    holders = [f"host:{n}:race" for n in range(6)]
    barrier = threading.Barrier(len(holders))
    claims: dict[str, bool] = {}

    def claim(holder: str) -> None:
        barrier.wait()
        claims[holder] = claim_lease(committed_sessions, holder=holder, now=T0, seconds=LEASE).held

    threads = [threading.Thread(target=claim, args=(holder,)) for holder in holders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(claims.values()) == [False] * 5 + [True]
    with committed_sessions() as session:
        lease = scheduling.current_lease(session, now=T0)
    assert lease is not None and claims[lease.holder]


def test_a_runs_savepoints_do_not_check_the_lease_only_its_commits_do(
    sessions: sessionmaker[Session], connection: Connection
) -> None:
    """The lease is checked, and on PostgreSQL locked, as the last thing before each
    commit of a run (``fence_to_lease``), not at every savepoint it releases (a sweep
    raises each flag in one): locked from the first one on, the lease row would be held
    for the rest of the run, and the process's own renewal would wait for all of it."""
    checks: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        flat = " ".join(statement.split())
        if flat.startswith("SELECT scheduler_lease.holder FROM"):
            checks.append(flat)

    def in_savepoints(*, session: Session, now: dt.datetime) -> dict[str, Any]:
        for n in range(3):
            with session.begin_nested():
                session.add(Station(code=f"SP-{n}", name="a savepoint's mark", timezone="UTC"))
        return {}

    event.listen(connection, "before_cursor_execute", note)
    try:
        result = run(
            sessions, Job("savepoints", "s", dt.timedelta(seconds=300), in_savepoints), A, T0
        )
    finally:
        event.remove(connection, "before_cursor_execute", note)
    assert result.outcome == "ok", result.error
    assert len(checks) == 1, checks
