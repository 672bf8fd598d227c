"""The scheduled jobs, and how they are run with APScheduler (DESIGN.md "Scheduled work").

``courier-api scheduler`` runs them in a ``BlockingScheduler``. With
``SCHEDULER_IN_WEB``, each gunicorn worker also starts a ``BackgroundScheduler``
after the fork (``courier_api.serve``). However many processes schedule, each
run is guarded by the database lease of ``sync.scheduling``: only the holder
runs jobs, the others stand by and take over when it expires. ``create_app()``
never starts a scheduler. Triggers live in each process's memory (no shared
APScheduler job store, which its FAQ warns against); the lease and the record
of runs live in the database.

Adding a job: write ``(*, session, now, settings) -> dict`` in ``sync/`` and
register a builder for it below with ``@register_job``, like the sweeps.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import signal
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger
from flask import Flask
from sqlalchemy.orm import Session, sessionmaker

from courier_api import metrics
from courier_api.config import policy_of
from courier_api.extensions import db
from models import utcnow
from sync import consent_requests, refresh_tokens, reports, sweeps, webhooks
from sync.blobs import FileBlobStore
from sync.scheduling import (
    FAILED,
    OK,
    STANDBY,
    Job,
    JobFunction,
    LeaseClaim,
    RunResult,
    claim_lease,
    give_up_lease,
    held_elsewhere,
    run_job,
    run_jobs,
)
from sync.webhooks import DeliveryLoop, DeliverySettings, HttpxSender

log = logging.getLogger(__name__)

MINUTE = 60
HOUR = 60 * MINUTE
# A run that could not start on time (the process was busy or asleep) still starts
# this late; later than that it waits for its next turn. Missed turns are coalesced.
MISFIRE_GRACE_SECONDS = 2 * MINUTE
LEASE_JOB_ID = "scheduler_lease"
RETRY_SUFFIX = ".retry"  # the id of a job's one-off turn after a failure
# A failed run of a job that runs less often than this is tried again this much later
# (again and again while it fails), instead of waiting for its next turn.
RETRY_AFTER_FAILURE = dt.timedelta(minutes=15)

JobBuilder = Callable[[Mapping[str, Any]], JobFunction]


@dataclass(frozen=True)
class JobSpec:
    """A registered job: what it is called, what it does, how often; ``build`` makes
    its function from the app's configuration."""

    name: str
    description: str
    interval_seconds: int
    build: JobBuilder


JOB_SPECS: dict[str, JobSpec] = {}


def register_job(
    name: str, *, description: str, interval_seconds: int
) -> Callable[[JobBuilder], JobBuilder]:
    """Add a job to the registry (a decorator for its builder)."""

    def decorator(build: JobBuilder) -> JobBuilder:
        if name in JOB_SPECS:
            raise ValueError(f"job {name!r} is registered twice")
        JOB_SPECS[name] = JobSpec(name, description, interval_seconds, build)
        return build

    return decorator


def sweep_settings_of(config: Mapping[str, Any]) -> sweeps.SweepSettings:
    return sweeps.SweepSettings(
        shift_close_grace=dt.timedelta(minutes=config["SHIFT_CLOSE_GRACE_MINUTES"]),
        stale_device_after=dt.timedelta(minutes=config["STALE_DEVICE_MINUTES"]),
        blob_missing_grace=dt.timedelta(minutes=config["BLOB_MISSING_GRACE_MINUTES"]),
        proof_retention=dt.timedelta(days=config["PROOF_RETENTION_DAYS"]),
        policy=policy_of(config),
        blob_store=FileBlobStore(config["BLOB_DIR"]),
    )


# -- the jobs ---------------------------------------------------------------------------------


@register_job(
    sweeps.SHIFT_NOT_CLOSED,
    interval_seconds=5 * MINUTE,
    description="Flags open shifts still open SHIFT_CLOSE_GRACE_MINUTES after their "
    "planned end (shift_not_closed).",
)
def _shift_not_closed(config: Mapping[str, Any]) -> JobFunction:
    return partial(sweeps.shift_not_closed, settings=sweep_settings_of(config))


@register_job(
    sweeps.STALE_DEVICE,
    interval_seconds=5 * MINUTE,
    description="Flags devices with an open shift that have not pushed for "
    "STALE_DEVICE_MINUTES (stale_device); closes the flag once they push again.",
)
def _stale_device(config: Mapping[str, Any]) -> JobFunction:
    return partial(sweeps.stale_device, settings=sweep_settings_of(config))


@register_job(
    sweeps.BLOB_MISSING_AT_HANDOVER,
    interval_seconds=15 * MINUTE,
    description="Flags shifts closed BLOB_MISSING_GRACE_MINUTES ago whose proof images "
    "have not all been uploaded (blob_missing_at_handover); closes it when they arrive.",
)
def _blob_missing_at_handover(config: Mapping[str, Any]) -> JobFunction:
    return partial(sweeps.blob_missing_at_handover, settings=sweep_settings_of(config))


@register_job(
    "consent_expiry",
    interval_seconds=5 * MINUTE,
    description="Announces expired consents: re-judges the parcels they cover and tells "
    "the couriers' PDAs through the pull feed.",
)
def _consent_expiry(config: Mapping[str, Any]) -> JobFunction:
    return partial(sweeps.consent_expiry, settings=sweep_settings_of(config))


@register_job(
    "consent_requests_lapsed",
    interval_seconds=MINUTE,
    description="Announces consent requests that lapsed unanswered "
    "(consent.request_lapsed), once each, so that the recipient's channel stops asking.",
)
def _consent_requests_lapsed(config: Mapping[str, Any]) -> JobFunction:
    return consent_requests.announce_lapsed


@register_job(
    sweeps.PROOF_RETENTION_PURGE,
    interval_seconds=24 * HOUR,
    description="Deletes proof images older than PROOF_RETENTION_DAYS (their records "
    "stay, marked purged), with an audit log entry per batch.",
)
def _proof_retention_purge(config: Mapping[str, Any]) -> JobFunction:
    return partial(sweeps.proof_retention_purge, settings=sweep_settings_of(config))


@register_job(
    "webhook_retention",
    interval_seconds=24 * HOUR,
    description="Deletes webhook deliveries delivered (or skipped) more than "
    "WEBHOOK_RETENTION_DAYS ago, the pending ones that old of a disabled or paused "
    "subscription, and the messages no delivery needs any more (they hold recipients' "
    "phones and pickup codes); dead ones stay until an admin replays or purges them.",
)
def _webhook_retention(config: Mapping[str, Any]) -> JobFunction:
    days = dt.timedelta(days=config["WEBHOOK_RETENTION_DAYS"])

    def purge(*, session: Session, now: dt.datetime) -> dict[str, Any]:
        purged = webhooks.purge_retained(session=session, before=now - days, now=now)
        delivered, skipped, waiting = purged["delivered"], purged["skipped"], purged["waiting"]
        return {
            "deliveries": delivered["deliveries"] + skipped["deliveries"],
            "messages": delivered["messages"] + skipped["messages"] + waiting["messages"],
            "waiting_for_stopped": waiting["deliveries"],
            "old_secrets_forgotten": webhooks.forget_ended_graces(session=session, now=now),
        }

    return purge


@register_job(
    "refresh_token_purge",
    interval_seconds=24 * HOUR,
    description="Deletes the refresh token families whose newest token expired (an hour "
    "ago or more): their tokens are refused as expired anyway.",
)
def _refresh_token_purge(config: Mapping[str, Any]) -> JobFunction:
    return refresh_tokens.purge_expired


@register_job(
    "station_reports",
    interval_seconds=30 * MINUTE,
    description="Issues the daily (日监控), weekly (周分析) and monthly (月通报) report of "
    "every station for each local day, ISO week and month that has ended (last 7 days).",
)
def _station_reports(config: Mapping[str, Any]) -> JobFunction:
    return partial(reports.issue_due_reports, deadlines=config["DELIVERY_DEADLINE_HOURS"])


def jobs_of(config: Mapping[str, Any], names: Iterable[str] | None = None) -> list[Job]:
    """The registered jobs (or those named), ready to run with ``config``."""
    wanted = list(JOB_SPECS) if names is None else list(names)
    unknown = [name for name in wanted if name not in JOB_SPECS]
    if unknown:
        raise KeyError(f"no job named {', '.join(unknown)}; jobs: {', '.join(JOB_SPECS)}")
    return [
        Job(
            spec.name,
            spec.description,
            dt.timedelta(seconds=spec.interval_seconds),
            spec.build(config),
            retry_after=RETRY_AFTER_FAILURE,
        )
        for spec in (JOB_SPECS[name] for name in wanted)
    ]


def holder_id() -> str:
    """This process, as the lease names it: host, pid and a random suffix (pids repeat)."""
    return f"{socket.gethostname()[:150]}:{os.getpid()}:{secrets.token_hex(4)}"


# -- running them -----------------------------------------------------------------------------


class JobScheduler:
    """Runs jobs when this process holds the lease, and logs one line per run."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        jobs: Iterable[Job],
        lease_seconds: int,
        holder: str | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.sessions = sessions
        self.jobs = {job.name: job for job in jobs}
        self.lease_seconds = lease_seconds
        self.holder = holder or holder_id()
        self.clock = clock
        self._holding: bool | None = None
        self._lock = threading.Lock()
        self._scheduler: BaseScheduler | None = None  # set by ``install``, for retries

    @property
    def renew_every_seconds(self) -> int:
        return max(1, self.lease_seconds // 3)

    def claim(self) -> LeaseClaim:
        """Take or renew the lease (or learn who holds it)."""
        claim = claim_lease(
            self.sessions, holder=self.holder, now=self.clock(), seconds=self.lease_seconds
        )
        self._note(claim.held, claim)
        return claim

    def release(self) -> bool:
        released = give_up_lease(self.sessions, holder=self.holder)
        if released:
            log.info("scheduler %s released the lease", self.holder)
        self._holding = False
        return released

    def run(
        self, name: str, *, force: bool = False, due_as_of: dt.datetime | None = None
    ) -> RunResult:
        result = run_job(
            sessions=self.sessions,
            job=self.jobs[name],
            holder=self.holder,
            now=self.clock(),
            lease_seconds=self.lease_seconds,
            force=force,
            due_as_of=due_as_of,
        )
        self._log(result)
        return result

    def run_all(
        self, names: Iterable[str] | None = None, *, force: bool = False
    ) -> list[RunResult]:
        """Run the jobs (all, or those named) one after the other: the due ones, or all
        of them with ``force``."""
        jobs = [self.jobs[name] for name in (names or self.jobs)]
        results = run_jobs(
            sessions=self.sessions,
            jobs=jobs,
            holder=self.holder,
            now=self.clock(),
            lease_seconds=self.lease_seconds,
            force=force,
        )
        for result in results:
            self._log(result)
        return results

    # APScheduler calls these two; whatever goes wrong (the database is down) is logged
    # and the next turn tries again.

    def scheduled_run(self, name: str, due_as_of: dt.datetime | None = None) -> None:
        """A turn whose run could not even be recorded (the database unreachable, or
        locked past its timeout) leaves no run row: it is counted as failed, so the
        metric tells what the record cannot. Either failure is tried again after the
        job's ``retry_after`` (``_retry``); a turn that left no row, as of when it
        was due."""
        due_at = due_as_of or self.clock()
        try:
            result = self.run(name, due_as_of=due_as_of)
        except Exception:
            log.exception("scheduler could not run %s", name)
            metrics.job_run(name, FAILED)
            self._retry(name, due_as_of=due_at)
            return
        if result.outcome == FAILED:
            self._retry(name)

    def _retry(self, name: str, *, due_as_of: dt.datetime | None = None) -> None:
        """A one-off turn of ``name`` after its ``retry_after``, when that comes before
        its next regular turn; it decides again then whether the job is due."""
        job = self.jobs[name]
        if self._scheduler is None or job.wait_after_failure >= job.interval:
            return
        at = dt.datetime.now(dt.UTC) + job.wait_after_failure
        self._scheduler.add_job(
            self.scheduled_run,
            DateTrigger(run_date=at),
            args=[name, due_as_of],
            id=f"{name}{RETRY_SUFFIX}",
            name=f"{name} (again after a failure)",
            replace_existing=True,
            misfire_grace_time=MISFIRE_GRACE_SECONDS,
        )
        log.info("job %s will be tried again at %s", name, at.isoformat(timespec="seconds"))

    def scheduled_renewal(self) -> None:
        try:
            self.claim()
        except Exception:
            log.exception("scheduler could not renew its lease")

    def install(self, scheduler: BaseScheduler, *, start_now: bool = True) -> BaseScheduler:
        """Add every job, and the lease renewal, to an APScheduler scheduler made by
        ``new_scheduler``. ``start_now``: first runs at start, then every interval."""
        self._scheduler = scheduler
        first = dt.datetime.now(dt.UTC) if start_now else None
        for job in self.jobs.values():
            scheduler.add_job(
                self.scheduled_run,
                IntervalTrigger(seconds=job.interval_seconds),
                args=[job.name],
                id=job.name,
                name=job.name,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=MISFIRE_GRACE_SECONDS,
                next_run_time=first,
            )
        scheduler.add_job(
            self.scheduled_renewal,
            IntervalTrigger(seconds=self.renew_every_seconds),
            id=LEASE_JOB_ID,
            name="renew the scheduler lease",
            executor="lease",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=self.renew_every_seconds,
            next_run_time=first,
        )
        return scheduler

    def _note(self, held: bool, claim: LeaseClaim | None = None) -> None:
        with self._lock:
            was, self._holding = self._holding, held
        if held and not was:
            taken = (
                f" (taken over from {claim.taken_over_from})"
                if claim and claim.taken_over_from
                else ""
            )
            log.info("scheduler %s holds the lease%s", self.holder, taken)
        elif not held and was is not False and claim is not None:
            log.info("scheduler %s stands by: %s", self.holder, held_elsewhere(claim.lease))

    def _log(self, result: RunResult) -> None:
        metrics.job_run(result.job, result.outcome)
        if result.outcome == STANDBY:
            if result.lease is not None:
                self._note(False, LeaseClaim(False, result.lease))
            log.debug("%s", result.summary())
            return
        if result.ran:
            self._note(True)
        if result.outcome == OK:
            log.info("job %s", result.summary())
        elif result.outcome == FAILED:
            log.error("job %s", result.summary())
        else:
            log.debug("job %s", result.summary())


def job_scheduler_for(app: Flask, names: Iterable[str] | None = None) -> JobScheduler:
    return JobScheduler(
        sessions=db.sessionmaker_of(app),
        jobs=jobs_of(app.config, names),
        lease_seconds=app.config["SCHEDULER_LEASE_SECONDS"],
    )


def new_scheduler(cls: type[BaseScheduler] = BackgroundScheduler) -> BaseScheduler:
    """An APScheduler scheduler in UTC. Jobs run one at a time (short sweeps; SQLite has
    one writer anyway); the lease is renewed on a thread of its own, so a long job
    never lets it lapse."""
    # One line per run is ours (``JobScheduler._log``); APScheduler's own lines about
    # adding, running and finishing each job are noise. Its warnings (missed runs) stay.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    return cls(
        timezone=dt.UTC,
        executors={"default": ThreadPoolExecutor(1), "lease": ThreadPoolExecutor(1)},
    )


class _Stop(BaseException):
    """SIGTERM: leave the scheduler's loop like Ctrl-C does."""


def run_until_stopped(runner: JobScheduler) -> None:
    """Run the jobs in the foreground until SIGTERM or SIGINT; then let the running job
    finish and release the lease so a standby scheduler takes over at once."""

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise _Stop(signum)

    scheduler = runner.install(new_scheduler(BlockingScheduler))
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        scheduler.start()
    except (_Stop, KeyboardInterrupt):
        log.info("scheduler %s stopping", runner.holder)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if scheduler.running:
            scheduler.shutdown(wait=True)
        runner.release()


# -- webhook delivery -------------------------------------------------------------------------


def delivery_loop_for(app: Flask) -> DeliveryLoop:
    """The webhook delivery loop of ``courier-api deliver`` and of web workers: several
    may run at once, in any processes; their claims keep them off each other's work."""
    # One line per attempt is ours (``sync.webhooks``); httpx's own line per request
    # would repeat it.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = DeliverySettings.from_config(app.config)
    return DeliveryLoop(
        sessions=db.sessionmaker_of(app),
        settings=settings,
        sender=HttpxSender(settings),
        worker_id=holder_id(),
    )


# -- inside web workers (SCHEDULER_IN_WEB) ----------------------------------------------------

_worker: tuple[JobScheduler, BaseScheduler] | None = None
_deliverer: DeliveryLoop | None = None


def start_in_web_worker(app: Flask) -> None:
    """Called after gunicorn forks a worker: every worker schedules, the lease picks one;
    every worker also delivers webhooks (claims share the deliveries out)."""
    global _worker, _deliverer
    runner = job_scheduler_for(app)
    scheduler = runner.install(new_scheduler(BackgroundScheduler))
    scheduler.start()
    _worker = (runner, scheduler)
    log.info("scheduler %s started in this web worker", runner.holder)
    _deliverer = delivery_loop_for(app)
    _deliverer.start_thread()
    log.info("webhook deliverer %s is running in this web worker", _deliverer.worker_id)


def stop_in_web_worker() -> None:
    global _worker, _deliverer
    if _deliverer is not None:
        deliverer, _deliverer = _deliverer, None
        deliverer.stop()
        deliverer.close()
    if _worker is None:
        return
    runner, scheduler = _worker
    _worker = None
    scheduler.shutdown(wait=True)
    runner.release()
