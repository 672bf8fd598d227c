"""GET /jobs and /jobs/runs: the scheduler's catalogue, its lease and its runs, for admins."""

from __future__ import annotations

import datetime as dt

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from courier_api.extensions import db
from courier_api.scheduler import JOB_SPECS, jobs_of
from models import JobRun, utcnow
from sync.scheduling import claim_lease, run_jobs
from tests.conftest import Auth, World

JOBS = "/api/v1/jobs"
RUNS = "/api/v1/jobs/runs"
T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=dt.UTC)


def test_admins_see_every_job_never_run_and_no_lease(
    client: FlaskClient, auth: Auth, world: World
) -> None:
    response = client.get(JOBS, headers=auth.headers("admin"))

    assert response.status_code == 200
    body = response.get_json()
    assert body["lease"] is None
    assert [job["name"] for job in body["jobs"]] == list(JOB_SPECS)
    assert {job["name"] for job in body["jobs"]} >= {
        "shift_not_closed",
        "stale_device",
        "blob_missing_at_handover",
        "consent_expiry",
        "proof_retention_purge",
    }
    by_name = {job["name"]: job for job in body["jobs"]}
    assert by_name["stale_device"]["interval_seconds"] == 300
    assert by_name["proof_retention_purge"]["interval_seconds"] == 86400
    assert "STALE_DEVICE_MINUTES" in by_name["stale_device"]["description"]
    assert all(job["last_run"] is None for job in body["jobs"])


def test_each_job_shows_its_last_run_and_the_lease_its_holder(
    app: Flask, client: FlaskClient, auth: Auth, world: World
) -> None:
    sessions = db.sessionmaker_of(app)
    jobs = jobs_of(app.config)
    now = utcnow()
    run_jobs(sessions=sessions, jobs=jobs, holder="host-a:1:aa", now=now, lease_seconds=60)
    later = run_jobs(
        sessions=sessions,
        jobs=jobs[:1],
        holder="host-a:1:aa",
        now=now + dt.timedelta(minutes=5),
        lease_seconds=60,
    )

    body = client.get(JOBS, headers=auth.headers("admin")).get_json()

    assert body["lease"]["holder"] == "host-a:1:aa"
    expires = dt.datetime.fromisoformat(body["lease"]["expires_at"])
    assert expires == now + dt.timedelta(minutes=5, seconds=60)
    first = body["jobs"][0]
    assert first["name"] == jobs[0].name
    assert first["last_run"]["id"] == later[0].run_id  # the newest of its two runs
    for job in body["jobs"]:
        run = job["last_run"]
        assert run is not None, job["name"]
        assert run["job"] == job["name"] and run["outcome"] == "ok"
        assert run["holder"] == "host-a:1:aa" and run["error"] is None
        assert set(run) == {
            "id",
            "job",
            "holder",
            "started_at",
            "finished_at",
            "duration_ms",
            "outcome",
            "detail",
            "error",
        }
    stale = next(job for job in body["jobs"] if job["name"] == "stale_device")
    assert stale["last_run"]["detail"]["open_shifts"] == 0


def test_an_expired_lease_is_no_lease(
    app: Flask, client: FlaskClient, auth: Auth, world: World
) -> None:
    claim_lease(
        db.sessionmaker_of(app),
        holder="gone:1:aa",
        now=utcnow() - dt.timedelta(hours=1),
        seconds=60,
    )
    assert client.get(JOBS, headers=auth.headers("admin")).get_json()["lease"] is None


@pytest.mark.parametrize(
    ("login", "status"),
    [
        (("manager1", None), 403),
        (("courier1", "PDA-0001"), 403),
        (("auditor1", None), 403),
        (("app1", None), 403),
        (None, 401),
    ],
)
@pytest.mark.parametrize("url", [JOBS, RUNS])
def test_only_admins_see_jobs(
    client: FlaskClient,
    auth: Auth,
    world: World,
    login: tuple[str, str | None] | None,
    status: int,
    url: str,
) -> None:
    headers = auth.headers(*login) if login else {}
    response = client.get(url, headers=headers)
    assert response.status_code == status
    assert response.get_json()["code"] == ("role_forbidden" if status == 403 else "token_missing")


@pytest.fixture
def runs(session: Session, world: World) -> list[JobRun]:
    """Five finished runs of two jobs, oldest first."""
    made = []
    for n, job in enumerate(["stale_device", "consent_expiry"] * 2 + ["stale_device"]):
        started = T0 + dt.timedelta(minutes=5 * n)
        run = JobRun(
            job=job,
            holder="host-a:1:aa",
            started_at=started,
            finished_at=started + dt.timedelta(milliseconds=40),
            duration_ms=40,
            outcome="failed" if n == 3 else "ok",
            detail={} if n == 3 else {"n": n},
            error="OperationalError: database is locked" if n == 3 else None,
        )
        session.add(run)
        made.append(run)
    session.commit()
    return made


def test_runs_are_listed_newest_first_by_pages(
    client: FlaskClient, auth: Auth, runs: list[JobRun]
) -> None:
    admin = auth.headers("admin")
    first = client.get(f"{RUNS}?limit=2", headers=admin).get_json()
    assert [r["id"] for r in first["items"]] == [runs[4].id, runs[3].id]
    assert first["next_after"] == runs[3].id
    failed = first["items"][1]
    assert (failed["outcome"], failed["error"]) == (
        "failed",
        "OperationalError: database is locked",
    )
    assert failed["started_at"] == "2026-11-23T08:15:00+00:00" and failed["duration_ms"] == 40
    second = client.get(f"{RUNS}?limit=2&after={first['next_after']}", headers=admin).get_json()
    assert [r["id"] for r in second["items"]] == [runs[2].id, runs[1].id]
    last = client.get(f"{RUNS}?limit=2&after={second['next_after']}", headers=admin).get_json()
    assert [r["id"] for r in last["items"]] == [runs[0].id]
    assert last["next_after"] is None


def test_runs_of_one_job(client: FlaskClient, auth: Auth, runs: list[JobRun]) -> None:
    body = client.get(f"{RUNS}?job=stale_device", headers=auth.headers("admin")).get_json()
    assert [r["id"] for r in body["items"]] == [runs[4].id, runs[2].id, runs[0].id]
    assert body["next_after"] is None


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("job=no_such_job", "job"),
        ("job=", "job"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=many", "limit"),
        ("after=-1", "after"),
    ],
)
def test_bad_run_arguments_are_422_naming_the_field(
    client: FlaskClient, auth: Auth, world: World, query: str, field: str
) -> None:
    response = client.get(f"{RUNS}?{query}", headers=auth.headers("admin"))
    assert response.status_code == 422
    assert field in response.get_json()["errors"]["query"]
