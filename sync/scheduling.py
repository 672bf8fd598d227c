"""Scheduled jobs: which process may run them (a database lease) and what each run did.

Several processes may schedule the jobs (a ``courier-api scheduler`` and, when
configured, every web worker), yet each job must run in one of them only. They
compete for one row of ``scheduler_lease``: the process holding it runs jobs
and renews it; the others stand by and take it over once it has expired (its
holder died or hung). The lease is checked, and renewed, in the same
transaction that records a run's start, so two processes never both start a
job: the second one's lease update waits for the first one's commit, then finds
the lease taken. It is checked again at every commit of the job's own
transaction (``fence_to_lease``): a process paused past its lease's expiry
(SIGSTOP, a long GC or VM pause) while another took the lease over and ran the
job commits nothing when it wakes up.

A job is *due* when its previous run started at least (nearly) one interval
ago, whoever ran it: a process that takes the lease over does not re-run what
its predecessor has just run. A job whose previous run failed is due again
sooner, after its ``retry_after``: a daily purge that met a database restart
runs again within the hour, not the next day.

Each run is a ``JobRun`` row: committed as ``running`` when the job starts, then
``ok`` with what the job returned, or ``failed`` with the error. The job runs in
its own transaction; when it fails, its uncommitted writes are rolled back
before the failure is recorded. Time (``now``) is always passed in.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import case, delete, event, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from models import JobRun, SchedulerLease
from sync.paging import MAX_PAGE_SIZE
from sync.sql import insert_ignoring_conflict

log = logging.getLogger(__name__)

LEASE_NAME = "scheduler"
RUNNING, OK, FAILED = "running", "ok", "failed"
# Outcomes of asking for a run that did not start (never stored).
NOT_DUE, STANDBY = "not_due", "standby"
# A job fires on its own interval in each process; a run that started this close to a
# full interval ago counts as due, so timer jitter never skips a run.
DUE_SLACK = 0.1
MAX_ERROR_LENGTH = 4000

LEASE = SchedulerLease.__table__
RUNS = JobRun.__table__


class JobFunction(Protocol):
    def __call__(self, *, session: Session, now: dt.datetime) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Job:
    """A scheduled job: ``run(session=, now=)`` does the work and returns what it did."""

    name: str
    description: str
    interval: dt.timedelta
    run: JobFunction
    # After a failed run, the job is due again this soon (never later than its interval).
    retry_after: dt.timedelta | None = None

    @property
    def wait_after_failure(self) -> dt.timedelta:
        return min(self.interval, self.retry_after or self.interval)

    @property
    def interval_seconds(self) -> int:
        return int(self.interval.total_seconds())


@dataclass(frozen=True)
class Lease:
    holder: str
    acquired_at: dt.datetime
    expires_at: dt.datetime


@dataclass(frozen=True)
class LeaseClaim:
    """The answer to "may I run jobs?": ``held`` by the asker or not, and the lease as
    it stands (the asker's, or the other holder's, to say who and until when)."""

    held: bool
    lease: Lease
    taken_over_from: str | None = None  # the holder whose lease had expired


@dataclass(frozen=True)
class RunResult:
    job: str
    outcome: str  # ok | failed | not_due | standby
    run_id: int | None = None
    duration_ms: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    lease: Lease | None = None  # standby: the other holder's lease

    @property
    def ran(self) -> bool:
        return self.outcome in (OK, FAILED)

    def summary(self) -> str:
        """One line for logs and the CLI.

        No colon after the job's name: the log's redaction takes ``name: value`` with
        a secret-sounding name (``refresh_token_purge``) for a secret, and would hide
        the outcome.
        """
        if self.outcome == OK:
            return f"{self.job} ok in {self.duration_ms} ms {_compact(self.detail)}"
        if self.outcome == FAILED:
            return f"{self.job} FAILED after {self.duration_ms} ms: {self.error}"
        if self.outcome == STANDBY and self.lease is not None:
            return f"{self.job} not run: {held_elsewhere(self.lease)}"
        return f"{self.job} not due yet"


def held_elsewhere(lease: Lease) -> str:
    return (
        f"the scheduler lease is held by {lease.holder} "
        f"until {lease.expires_at.isoformat(timespec='seconds')}"
    )


# -- the lease --------------------------------------------------------------------------------


def acquire_lease(
    session: Session, *, holder: str, now: dt.datetime, seconds: int, name: str = LEASE_NAME
) -> LeaseClaim:
    """Take the lease, renew it, or learn who holds it, in the caller's transaction.

    The row is created if absent (insert, ignoring a conflict), then locked and
    updated only if the caller holds it or it has expired; the update's row count
    says whether the caller holds it now. Until the caller's transaction ends, a
    competitor waits on the row (PostgreSQL) or on the database (SQLite).
    """
    expires_at = now + dt.timedelta(seconds=seconds)
    inserted = session.execute(
        insert_ignoring_conflict(session.get_bind().dialect.name, LEASE, on=["name"]).values(
            name=name, holder=holder, acquired_at=now, expires_at=expires_at
        )
    )
    if inserted.rowcount == 1:
        return LeaseClaim(True, Lease(holder, now, expires_at))
    before = session.execute(
        select(LEASE.c.holder, LEASE.c.acquired_at, LEASE.c.expires_at)
        .where(LEASE.c.name == name)
        .with_for_update()
    ).one()
    renewed = session.execute(
        update(LEASE)
        .where(
            LEASE.c.name == name,
            or_(LEASE.c.holder == holder, LEASE.c.expires_at <= now),
        )
        .values(
            holder=holder,
            acquired_at=case((LEASE.c.holder == holder, LEASE.c.acquired_at), else_=now),
            expires_at=expires_at,
        )
    )
    if renewed.rowcount != 1:
        return LeaseClaim(False, Lease(before.holder, before.acquired_at, before.expires_at))
    if before.holder == holder:
        return LeaseClaim(True, Lease(holder, before.acquired_at, expires_at))
    return LeaseClaim(True, Lease(holder, now, expires_at), taken_over_from=before.holder)


def release_lease(session: Session, *, holder: str, name: str = LEASE_NAME) -> bool:
    """Give the lease up (if the caller holds it), so a standby process takes over at once."""
    result = session.execute(delete(LEASE).where(LEASE.c.name == name, LEASE.c.holder == holder))
    return bool(result.rowcount)


def current_lease(session: Session, *, now: dt.datetime, name: str = LEASE_NAME) -> Lease | None:
    """The lease in force at ``now``, or None when nobody holds one."""
    row = session.execute(
        select(LEASE.c.holder, LEASE.c.acquired_at, LEASE.c.expires_at).where(
            LEASE.c.name == name, LEASE.c.expires_at > now
        )
    ).one_or_none()
    return None if row is None else Lease(row.holder, row.acquired_at, row.expires_at)


def claim_lease(
    sessions: sessionmaker[Session], *, holder: str, now: dt.datetime, seconds: int
) -> LeaseClaim:
    """``acquire_lease`` in a transaction of its own (the scheduler's periodic renewal)."""
    with sessions.begin() as session:
        return acquire_lease(session, holder=holder, now=now, seconds=seconds)


def give_up_lease(sessions: sessionmaker[Session], *, holder: str) -> bool:
    with sessions.begin() as session:
        return release_lease(session, holder=holder)


class LeaseLost(Exception):
    """The process running a job no longer holds the scheduler lease."""


def fence_to_lease(session: Session, *, holder: str, name: str = LEASE_NAME) -> None:
    """Refuse every commit of ``session`` once ``holder`` no longer holds the lease.

    A run starts only under the lease, but a process stopped mid-run past the lease's
    expiry wakes up believing it still holds it, while the process that took it over
    may have run the same job: the woken run's writes would be the job's effect a
    second time, worked out at a stale ``now``. A takeover changes the holder, so the
    holder is what is checked, not the clock. The check comes after the flush and
    locks the lease row (on SQLite the transaction began ``IMMEDIATE`` and holds the
    write lock), so no takeover slips in before the commit and the lease row is the
    last lock the transaction takes.
    """

    def check(session: Session) -> None:
        if session.in_nested_transaction():  # a savepoint: its transaction's commit checks
            return
        session.flush()
        current = session.scalar(
            select(LEASE.c.holder).where(LEASE.c.name == name).with_for_update()
        )
        if current != holder:
            raise LeaseLost(
                f"{holder} no longer holds the scheduler lease ({current or 'nobody'} does): "
                "the writes of this run since its last commit are rolled back"
            )

    event.listen(session, "before_commit", check)


# -- runs -------------------------------------------------------------------------------------


def is_due(last: JobRun | None, job: Job, now: dt.datetime) -> bool:
    """Whether ``job`` is due at ``now``, its newest run being ``last``."""
    if last is None:
        return True
    wait = job.wait_after_failure if last.outcome == FAILED else job.interval
    return last.started_at <= now - wait * (1 - DUE_SLACK)


def run_job(
    *,
    sessions: sessionmaker[Session],
    job: Job,
    holder: str,
    now: dt.datetime,
    lease_seconds: int,
    force: bool = False,
    due_as_of: dt.datetime | None = None,
) -> RunResult:
    """Run ``job`` if this process holds (or can take) the lease and the job is due
    (``force``: due or not; ``due_as_of``: due at that earlier moment, a turn whose
    start could not be recorded, and not run since, unless its newest run failed,
    which is judged now), recording the run.

    A failing job never raises here: its transaction is rolled back, the traceback
    logged, and the run recorded as failed with the error's message. So is a run
    whose process lost the lease before it committed (``LeaseLost``).
    """
    started = _start(sessions, job, holder, now, lease_seconds, force, due_as_of or now)
    if isinstance(started, RunResult):
        return started
    clock = time.monotonic()
    detail: dict[str, Any] = {}
    error: str | None = None
    try:
        with sessions() as session:
            fence_to_lease(session, holder=holder)
            detail = _storable(job.run(session=session, now=now))
            session.commit()
    except Exception as exc:  # the scheduler outlives any job's failure
        log.exception("job %s (run %d) failed", job.name, started)
        error = (f"{type(exc).__name__}: {exc}")[:MAX_ERROR_LENGTH]
    duration_ms = round((time.monotonic() - clock) * 1000)
    outcome = OK if error is None else FAILED
    with sessions.begin() as session:
        session.execute(
            update(RUNS)
            .where(RUNS.c.id == started)
            .values(
                outcome=outcome,
                finished_at=now + dt.timedelta(milliseconds=duration_ms),
                duration_ms=duration_ms,
                detail=detail,
                error=error,
            )
        )
    return RunResult(job.name, outcome, started, duration_ms, detail, error)


def run_jobs(
    *,
    sessions: sessionmaker[Session],
    jobs: Sequence[Job],
    holder: str,
    now: dt.datetime,
    lease_seconds: int,
    force: bool = False,
) -> list[RunResult]:
    """Run every job that is due now (``force``: every job), one after the other.

    Once the lease turns out to be held elsewhere, the remaining jobs are not tried.
    """
    results: list[RunResult] = []
    for job in jobs:
        if results and results[-1].outcome == STANDBY:
            results.append(RunResult(job.name, STANDBY, lease=results[-1].lease))
            continue
        results.append(
            run_job(
                sessions=sessions,
                job=job,
                holder=holder,
                now=now,
                lease_seconds=lease_seconds,
                force=force,
            )
        )
    return results


def _start(
    sessions: sessionmaker[Session],
    job: Job,
    holder: str,
    now: dt.datetime,
    lease_seconds: int,
    force: bool,
    due_as_of: dt.datetime,
) -> int | RunResult:
    """The id of the new ``running`` row, or why the job does not run now."""
    with sessions.begin() as session:
        claim = acquire_lease(session, holder=holder, now=now, seconds=lease_seconds)
        if not claim.held:
            return RunResult(job.name, STANDBY, lease=claim.lease)
        last = latest_run(session, job=job.name)
        if last is not None and last.outcome == RUNNING:
            # No run of it can be going on: another process would have needed the lease,
            # and this one runs each job one at a time (APScheduler's max_instances=1).
            last.outcome = FAILED
            last.finished_at = now
            last.error = (
                f"abandoned: {last.holder} stopped holding the scheduler lease before the "
                f"run finished; {holder} took over"
                if last.holder != holder
                else "abandoned: the end of this run was never recorded (the database was "
                "unreachable, or the process stopped)"
            )
        # A failed run (one just marked abandoned too) is tried again after its
        # retry_after from now; ``due_as_of`` speaks for a turn that left no row.
        moment = now if last is not None and last.outcome == FAILED else due_as_of
        if not force and not is_due(last, job, moment):
            return RunResult(job.name, NOT_DUE)
        run = JobRun(job=job.name, holder=holder, started_at=now, outcome=RUNNING, detail={})
        session.add(run)
        session.flush()
        return run.id


def _storable(detail: Any) -> dict[str, Any]:
    """What the job returned, as JSON the database stores and gives back unchanged."""
    if not isinstance(detail, dict):
        detail = {"result": detail}
    stored: dict[str, Any] = json.loads(json.dumps(detail, default=str))
    return stored


def _compact(detail: dict[str, Any]) -> str:
    return json.dumps(detail, separators=(",", ":"), default=str)[:300]


# -- reading ----------------------------------------------------------------------------------


def latest_run(session: Session, *, job: str, outcome: str | None = None) -> JobRun | None:
    """The job's newest run (``outcome``: its newest run with that outcome)."""
    query = select(JobRun).where(JobRun.job == job).order_by(JobRun.id.desc()).limit(1)
    if outcome is not None:
        query = query.where(JobRun.outcome == outcome)
    return session.scalar(query)


def latest_runs(session: Session, jobs: Sequence[str]) -> dict[str, JobRun | None]:
    """Each job's newest run (one index probe per job)."""
    return {name: latest_run(session, job=name) for name in jobs}


def list_runs(
    *,
    session: Session,
    job: str | None = None,
    after_id: int = 0,
    limit: int = 100,
) -> Sequence[JobRun]:
    """Runs newest first; ``after_id`` is the last id of the previous page."""
    query = select(JobRun).order_by(JobRun.id.desc()).limit(min(limit, MAX_PAGE_SIZE))
    if job is not None:
        query = query.where(JobRun.job == job)
    if after_id:
        query = query.where(JobRun.id < after_id)
    return session.scalars(query).all()
