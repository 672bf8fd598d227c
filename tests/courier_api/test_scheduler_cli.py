"""``courier-api scheduler``: --once, the lease held elsewhere, and APScheduler wiring."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from flask import Flask
from flask.testing import FlaskCliRunner
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from courier_api.extensions import db
from courier_api.scheduler import (
    JOB_SPECS,
    LEASE_JOB_ID,
    MISFIRE_GRACE_SECONDS,
    job_scheduler_for,
    new_scheduler,
)
from models import JobRun, SchedulerLease, StationReport, utcnow
from sync import sweeps
from sync.scheduling import claim_lease

EXPECTED_INTERVALS = {
    "shift_not_closed": 300,
    "stale_device": 300,
    "blob_missing_at_handover": 900,
    "consent_expiry": 300,
    "consent_requests_lapsed": 60,
    "proof_retention_purge": 86400,
    "webhook_retention": 86400,
    "refresh_token_purge": 86400,
    "station_reports": 1800,
}


def stored_runs(session: Session) -> list[JobRun]:
    session.expire_all()
    return list(session.scalars(select(JobRun).order_by(JobRun.id)))


def test_once_runs_every_job_prints_a_line_each_and_releases_the_lease(
    runner: FlaskCliRunner, session: Session, world: Any
) -> None:
    result = runner.invoke(args=["scheduler", "--once"])

    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(JOB_SPECS)
    assert all(" ok in " in line for line in lines), lines
    assert Counter(run.job for run in stored_runs(session)) == {name: 1 for name in JOB_SPECS}
    assert {run.outcome for run in stored_runs(session)} == {"ok"}
    assert session.scalar(select(func.count()).select_from(SchedulerLease)) == 0

    again = runner.invoke(args=["scheduler", "--once"])  # --once: due or not
    assert again.exit_code == 0
    assert len(stored_runs(session)) == 2 * len(JOB_SPECS)


def test_the_report_job_issues_each_finished_day_of_a_station_once(
    runner: FlaskCliRunner, session: Session, world: Any
) -> None:
    for station in (world.station, world.other_station):
        station.created_at = utcnow() - dt.timedelta(days=3)
    session.commit()
    result = runner.invoke(args=["scheduler", "--once", "--job", "station_reports"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("station_reports ok")
    session.expire_all()
    daily = session.scalars(
        select(StationReport.period).where(
            StationReport.station_id == world.station.id, StationReport.kind == "daily"
        )
    ).all()
    # The three local days since the station opened that have ended (today has not).
    assert len(daily) == 3 and len(set(daily)) == 3
    issued = session.scalar(select(func.count()).select_from(StationReport))
    again = runner.invoke(args=["scheduler", "--once", "--job", "station_reports"])
    assert again.exit_code == 0
    session.expire_all()
    assert session.scalar(select(func.count()).select_from(StationReport)) == issued


def test_once_with_a_job_runs_just_that_job(runner: FlaskCliRunner, session: Session) -> None:
    result = runner.invoke(args=["scheduler", "--once", "--job", "stale_device"])

    assert result.exit_code == 0, result.output
    assert result.output.startswith("stale_device ok in ")
    assert len(result.output.strip().splitlines()) == 1
    assert [run.job for run in stored_runs(session)] == ["stale_device"]


def test_once_says_who_holds_the_lease_and_runs_nothing(
    app: Flask, runner: FlaskCliRunner, session: Session
) -> None:
    until = utcnow() + dt.timedelta(seconds=60)
    claim_lease(
        db.sessionmaker_of(app),
        holder="other-host:4242:beef",
        now=until - dt.timedelta(seconds=60),
        seconds=60,
    )

    result = runner.invoke(args=["scheduler", "--once"])

    assert result.exit_code == 0, result.output
    assert result.output.strip() == (
        "nothing run: the scheduler lease is held by other-host:4242:beef "
        f"until {until.isoformat(timespec='seconds')}"
    )
    assert stored_runs(session) == []
    lease = session.scalar(select(SchedulerLease))
    assert lease is not None and lease.holder == "other-host:4242:beef"


def test_once_exits_1_when_a_job_fails(
    runner: FlaskCliRunner, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**_: Any) -> dict[str, Any]:
        raise RuntimeError("no route to the blob store")

    monkeypatch.setattr(sweeps, "stale_device", broken)

    result = runner.invoke(args=["scheduler", "--once"])

    assert result.exit_code == 1
    assert "stale_device FAILED after" in result.output
    assert "RuntimeError: no route to the blob store" in result.output
    assert "shift_not_closed ok in" in result.output  # the others still ran
    outcomes = {run.job: run.outcome for run in stored_runs(session)}
    assert outcomes["stale_device"] == "failed" and outcomes["consent_expiry"] == "ok"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--once", "--job", "nope"], "no job 'nope'"),
        (["--job", "stale_device"], "use it with --once"),
    ],
)
def test_bad_options_are_usage_errors(
    runner: FlaskCliRunner, session: Session, args: list[str], message: str
) -> None:
    result = runner.invoke(args=["scheduler", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert stored_runs(session) == []


def test_the_apscheduler_scheduler_has_every_job_with_its_trigger(app: Flask) -> None:
    runner = job_scheduler_for(app)
    scheduler = runner.install(new_scheduler(BackgroundScheduler))

    jobs = {job.id: job for job in scheduler.get_jobs()}

    assert set(jobs) == set(JOB_SPECS) | {LEASE_JOB_ID}
    for name, seconds in EXPECTED_INTERVALS.items():
        job = jobs[name]
        assert isinstance(job.trigger, IntervalTrigger)
        assert job.trigger.interval == dt.timedelta(seconds=seconds)
        assert JOB_SPECS[name].interval_seconds == seconds
        assert (job.max_instances, job.coalesce) == (1, True)
        assert job.misfire_grace_time == MISFIRE_GRACE_SECONDS
        assert job.args == (name,) and job.executor == "default"
    lease = jobs[LEASE_JOB_ID]
    assert lease.trigger.interval == dt.timedelta(seconds=20)  # a third of the 60 s lease
    assert lease.executor == "lease"


def test_a_background_scheduler_runs_each_job_once_then_releases_the_lease(
    committed_app: Flask,
) -> None:
    """A short real run: every job fires at start, once; stopping releases the lease."""
    runner = job_scheduler_for(committed_app)
    scheduler = runner.install(new_scheduler(BackgroundScheduler))
    sessions = db.sessionmaker_of(committed_app)
    scheduler.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with sessions() as session:
                finished = session.scalar(
                    select(func.count()).select_from(JobRun).where(JobRun.outcome != "running")
                )
            if finished == len(JOB_SPECS):
                break
            time.sleep(0.05)
        with sessions() as session:
            lease = session.scalar(select(SchedulerLease))
            assert lease is not None and lease.holder == runner.holder
    finally:
        scheduler.shutdown(wait=True)
        runner.release()
    with sessions() as session:
        runs = list(session.scalars(select(JobRun)))
        assert session.scalar(select(func.count()).select_from(SchedulerLease)) == 0
    assert Counter(run.job for run in runs) == {name: 1 for name in JOB_SPECS}
    assert {(run.outcome, run.holder) for run in runs} == {("ok", runner.holder)}


# -- as deployed --------------------------------------------------------------------------------


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'scheduler.db'}",
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "APP_ENV": "development",
        "JWT_SECRET": "scheduler-test-secret-" + "x" * 40,
        **extra,
    }
    return env


def _wait_for_runs(url: str, count: int, timeout: float = 30) -> list[Any]:
    engine = create_engine(url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with engine.connect() as connection:
                rows = connection.execute(
                    select(JobRun.job, JobRun.holder, JobRun.outcome).where(
                        JobRun.outcome != "running"
                    )
                ).all()
            if len(rows) >= count or time.monotonic() > deadline:
                return list(rows)
            time.sleep(0.1)
    finally:
        engine.dispose()


def test_the_scheduler_process_runs_jobs_a_second_stands_by_and_sigterm_releases(
    tmp_path: Path,
) -> None:
    env = _env(tmp_path)
    cli = [sys.executable, "-m", "courier_api"]
    subprocess.run([*cli, "db", "upgrade"], env=env, check=True, capture_output=True)
    log_path = tmp_path / "scheduler.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*cli, "scheduler"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            runs = _wait_for_runs(env["DATABASE_URL"], len(JOB_SPECS))
            assert Counter(run.job for run in runs) == {name: 1 for name in JOB_SPECS}
            [holder] = {run.holder for run in runs}

            second = subprocess.run(
                [*cli, "scheduler", "--once"], env=env, capture_output=True, text=True, timeout=60
            )
            assert second.returncode == 0, second.stderr
            assert f"nothing run: the scheduler lease is held by {holder} until" in second.stdout

            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
    output = log_path.read_text()
    assert f"scheduler {holder}: {len(JOB_SPECS)} jobs" in output
    assert "job stale_device ok in" in output  # one line per run, in the log
    # The log's redaction of secret-sounding keys leaves a job's outcome readable.
    assert "job refresh_token_purge ok in" in output
    assert f"scheduler {holder} stopped; lease released" in output
    engine = create_engine(env["DATABASE_URL"])
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(SchedulerLease)) == 0
    engine.dispose()


def test_web_workers_scheduling_run_each_job_once_between_them(tmp_path: Path) -> None:
    """SCHEDULER_IN_WEB: both gunicorn workers schedule; the lease lets one run the jobs."""
    env = _env(tmp_path, SCHEDULER_IN_WEB="true")
    cli = [sys.executable, "-m", "courier_api"]
    subprocess.run([*cli, "db", "upgrade"], env=env, check=True, capture_output=True)
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [*cli, "serve", "--port", str(_free_port()), "--workers", "2"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            runs = _wait_for_runs(env["DATABASE_URL"], len(JOB_SPECS))
            time.sleep(1)  # give the other worker time to (wrongly) run a job too
            runs = _wait_for_runs(env["DATABASE_URL"], len(JOB_SPECS))
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    output = log_path.read_text()
    assert Counter(run.job for run in runs) == {name: 1 for name in JOB_SPECS}, output
    assert len({run.holder for run in runs}) == 1
    assert output.count("started in this web worker") == 2, output


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
