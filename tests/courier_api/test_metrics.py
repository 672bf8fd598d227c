"""GET /metrics: who may read it, and each metric family moving when its thing happens.

The metrics are the process's (one set for every app a test makes), so each test
compares values before and after. Several gunicorn workers adding up are tested in
test_operations_live.py.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy.orm import Session

from courier_api.config import ConfigError, validate_config
from models import FlagSeverity, utcnow
from sync.flags import FlagSubject, raise_flag
from tests import factories
from tests.conftest import Auth, World
from tests.prometheus import value

SCRAPER_TOKEN = "scraper-" + "s" * 40


def scrape(client: FlaskClient, token: str) -> str:
    response = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.content_type.startswith("text/plain")
    return response.get_data(as_text=True)


class Metrics:
    """Scrapes with the static token and tells what moved."""

    def __init__(self, client: FlaskClient) -> None:
        self.client = client
        self.before = scrape(client, SCRAPER_TOKEN)

    def moved(self, sample: str, **labels: str) -> float:
        after = scrape(self.client, SCRAPER_TOKEN)
        return value(after, sample, **labels) - value(self.before, sample, **labels)


@pytest.fixture
def metered(app_with: Callable[..., Flask], world: World) -> Flask:
    return app_with(METRICS_TOKEN=SCRAPER_TOKEN)


# -- access -----------------------------------------------------------------------------------


def test_metrics_are_for_the_scraper_token_and_admins_only(metered: Flask) -> None:
    client = metered.test_client()
    auth = Auth(client)
    missing = client.get("/metrics")
    assert missing.status_code == 401 and missing.get_json()["code"] == "token_missing"
    wrong = client.get("/metrics", headers={"Authorization": "Bearer " + "s" * 48})
    assert wrong.status_code == 401 and wrong.get_json()["code"] == "token_invalid"
    for username in ("manager1", "auditor1", "app1"):
        refused = client.get("/metrics", headers=auth.headers(username))
        assert refused.status_code == 403, username
    refused = client.get("/metrics", headers=auth.headers("courier1", "PDA-0001"))
    assert refused.status_code == 403
    assert "courier_http_request_duration_seconds" in scrape(client, SCRAPER_TOKEN)
    admin = auth.headers("admin")["Authorization"].removeprefix("Bearer ")
    assert "courier_sign_ins_total" in scrape(client, admin)
    # Without a configured token, admins only.
    assert scrape(metered.test_client(), admin)


def test_without_a_metrics_token_only_admins_read(app: Flask, world: World, auth: Auth) -> None:
    client = app.test_client()
    assert app.config["METRICS_TOKEN"] == ""
    assert client.get("/metrics", headers={"Authorization": "Bearer "}).status_code == 401
    assert scrape(client, auth.headers("admin")["Authorization"].removeprefix("Bearer "))


@pytest.mark.parametrize("token", ["short", " " + "x" * 40])
def test_a_weak_metrics_token_stops_the_service(app: Flask, token: str) -> None:
    with pytest.raises(ConfigError, match="METRICS_TOKEN"):
        validate_config({**app.config, "METRICS_TOKEN": token})


def test_metrics_are_not_part_of_the_api_document(app: Flask) -> None:
    spec = app.test_client().get("/openapi.json").get_json()
    assert "/metrics" not in spec["paths"]


# -- each family ------------------------------------------------------------------------------


def test_request_latency_by_method_url_rule_and_status(metered: Flask) -> None:
    client = metered.test_client()
    metrics = Metrics(client)
    for _ in range(3):
        client.get("/healthz")
    client.get("/api/v1/shifts/7", headers={"Authorization": "Bearer x"})
    client.get("/no/such/thing")
    count = "courier_http_request_duration_seconds_count"
    assert metrics.moved(count, method="GET", rule="/healthz", status="200") == 3
    assert (
        metrics.moved(count, method="GET", rule="/api/v1/shifts/<id:shift_id>", status="401") == 1
    )
    assert metrics.moved(count, method="GET", rule="<unmatched>", status="404") == 1
    bucket = "courier_http_request_duration_seconds_bucket"
    assert metrics.moved(bucket, method="GET", rule="/healthz", status="200", le="60.0") == 3


def test_events_and_batches_by_outcome_counted_once_committed(metered: Flask) -> None:
    client = metered.test_client()
    courier = Auth(client).headers("courier1", "PDA-0001")
    metrics = Metrics(client)
    tn = factories.s10()
    first = factories.event(1, tn)
    bad = factories.event(2, tn, type="teleported")
    body = factories.push_body("PDA-0001", [first, bad])
    assert client.post("/api/v1/sync/push", json=body, headers=courier).status_code == 200
    # The same batch again: answered from its receipt, nothing counted twice.
    assert client.post("/api/v1/sync/push", json=body, headers=courier).status_code == 200
    # The first event again, in a new batch, and a conflicting copy of it.
    conflicting = copy.deepcopy(first) | {"type": "out_for_delivery"}
    again = factories.push_body("PDA-0001", [first, conflicting])
    results = client.post("/api/v1/sync/push", json=again, headers=courier).get_json()["results"]
    assert [r["status"] for r in results] == ["duplicate", "rejected"]

    events = "courier_sync_events_total"
    assert metrics.moved(events, outcome="applied", reason="") == 1
    assert metrics.moved(events, outcome="duplicate", reason="") == 1
    assert metrics.moved(events, outcome="quarantined", reason="unknown_event_type") == 1
    assert metrics.moved(events, outcome="quarantined", reason="conflicting_duplicate") == 1
    assert metrics.moved("courier_sync_batches_total", outcome="stored") == 2
    assert metrics.moved("courier_sync_batches_total", outcome="replayed") == 1
    # The conflicting copy raised a flag, committed with its push.
    assert metrics.moved("courier_flags_raised_total", kind="conflicting_duplicate") == 1


def test_pushes_with_unknown_top_level_keys_are_counted(metered: Flask) -> None:
    """The keys are ignored with a receipt warning only the PDA reads: an operator
    sees in the count that PDAs send what this server does not know (an app a release
    ahead, a misspelt field whose value is lost), each request once, replays too."""
    client = metered.test_client()
    courier = Auth(client).headers("courier1", "PDA-0001")
    metrics = Metrics(client)
    body = factories.push_body("PDA-0001", [factories.event(1, factories.s10())])
    unknown = {**body, "app_version": "3.2", "zone": {}}
    assert client.post("/api/v1/sync/push", json=unknown, headers=courier).status_code == 200
    assert client.post("/api/v1/sync/push", json=unknown, headers=courier).status_code == 200
    plain = factories.push_body("PDA-0001", [factories.event(2, factories.s10())])
    assert client.post("/api/v1/sync/push", json=plain, headers=courier).status_code == 200
    assert metrics.moved("courier_sync_unknown_field_pushes_total") == 2


def test_a_push_that_fails_counts_nothing(metered: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    client = metered.test_client()
    courier = Auth(client).headers("courier1", "PDA-0001")
    metrics = Metrics(client)
    body = factories.push_body("PDA-0001", [factories.event(1, factories.s10())])

    def fail(_session: Session) -> None:
        raise RuntimeError("commit failed")

    monkeypatch.setattr(Session, "commit", fail)
    with pytest.raises(RuntimeError, match="commit failed"):
        client.post("/api/v1/sync/push", json=body, headers=courier)
    monkeypatch.undo()
    assert metrics.moved("courier_sync_events_total", outcome="applied", reason="") == 0
    assert metrics.moved("courier_sync_batches_total", outcome="stored") == 0


def test_flags_count_only_when_committed(metered: Flask, session: Session, world: World) -> None:
    metrics = Metrics(metered.test_client())

    def raise_one(key: str) -> None:
        raise_flag(
            session=session,
            kind="metrics_test",
            severity=FlagSeverity.WARNING,
            subject=FlagSubject("device", key),
            station_id=world.station.id,
            evidence={},
        )

    raise_one("rolled-back")
    session.rollback()
    savepoint = session.begin_nested()
    raise_one("in-a-savepoint")
    session.flush()
    savepoint.rollback()
    raise_one("kept")
    raise_one("kept")  # the same flag again: merged, not raised twice
    session.commit()
    assert metrics.moved("courier_flags_raised_total", kind="metrics_test") == 1


def test_scheduler_job_runs_by_job_and_outcome(
    metered: Flask, runner: FlaskCliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = Metrics(metered.test_client())
    result = runner.invoke(args=["scheduler", "--once", "--job", "stale_device"])
    assert result.exit_code == 0, result.output

    def broken(**_: Any) -> dict[str, Any]:
        raise RuntimeError("the sweep broke")

    monkeypatch.setattr("sync.sweeps.shift_not_closed", broken)
    result = runner.invoke(args=["scheduler", "--once", "--job", "shift_not_closed"])
    assert result.exit_code == 1
    runs = "courier_scheduler_job_runs_total"
    assert metrics.moved(runs, job="stale_device", outcome="ok") == 1
    assert metrics.moved(runs, job="shift_not_closed", outcome="failed") == 1


def test_a_scheduled_run_that_could_not_reach_the_database_is_counted_failed(
    metered: Flask, tmp_path: Any
) -> None:
    """The run could not even be recorded (the database is down, or SQLite stayed
    locked): no run row says so, so the metric must, or an alert on failed runs never
    fires while every sweep is skipped."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from courier_api.scheduler import job_scheduler_for

    metrics = Metrics(metered.test_client())
    runner = job_scheduler_for(metered, ["stale_device"])
    unreachable = create_engine(f"sqlite:///{tmp_path / 'no-such-dir' / 'db.sqlite'}")
    runner.sessions = sessionmaker(bind=unreachable)

    runner.scheduled_run("stale_device")  # logs, never raises: the scheduler goes on

    runs = "courier_scheduler_job_runs_total"
    assert metrics.moved(runs, job="stale_device", outcome="failed") == 1


def test_sign_ins_by_outcome(metered: Flask) -> None:
    client = metered.test_client()
    metrics = Metrics(client)
    Auth(client).tokens("admin")
    client.post("/api/v1/auth/token", json={"username": "admin", "password": "wrong-pass"})
    client.post(
        "/api/v1/auth/token", json={"username": "courier1", "password": factories.PASSWORD}
    )
    assert metrics.moved("courier_sign_ins_total", outcome="ok") == 1
    assert metrics.moved("courier_sign_ins_total", outcome="failed") == 1
    assert metrics.moved("courier_sign_ins_total", outcome="refused") == 1  # no device


def test_token_refreshes_by_outcome_and_a_reuse_in_the_log(
    metered: Flask, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh token presented twice is a copy in other hands (threat 1): the operator
    sees it in the metrics and in a log line naming the PDA, never the token."""
    client = metered.test_client()
    metrics = Metrics(client)
    first = Auth(client).tokens("courier1", "PDA-0001")["refresh_token"]
    clock = [utcnow()]
    monkeypatch.setattr("courier_api.auth.utcnow", lambda: clock[0])

    def refresh(token: str) -> Any:
        return client.post("/api/v1/auth/refresh", json={"refresh_token": token})

    second = refresh(first).get_json()["refresh_token"]
    assert refresh(first).status_code == 200  # a lost answer, sent again within the grace
    clock[0] += dt.timedelta(seconds=metered.config["REFRESH_REUSE_GRACE_SECONDS"] + 1)
    with caplog.at_level("WARNING", logger="courier_api.auth"):
        assert refresh(first).get_json()["code"] == "refresh_token_reused"
    assert refresh(second).get_json()["code"] == "refresh_token_revoked"
    refreshes = "courier_token_refreshes_total"
    assert metrics.moved(refreshes, outcome="rotated") == 1
    assert metrics.moved(refreshes, outcome="retried") == 1
    assert metrics.moved(refreshes, outcome="reused") == 1
    assert metrics.moved(refreshes, outcome="revoked") == 1
    [line] = [r.getMessage() for r in caplog.records if "reused" in r.getMessage()]
    assert "PDA-0001" in line and first not in line and second not in line


def test_the_command_line_imports_prometheus_client_only_with_the_app() -> None:
    """prometheus_client picks multiprocess mode when it is first imported: ``serve`` sets
    PROMETHEUS_MULTIPROC_DIR before loading the app, so nothing may import it earlier."""
    import subprocess
    import sys

    probe = (
        "import sys, courier_api.cli, courier_api.serve, courier_api.scheduler, "
        "courier_api.metrics, courier_api.sign_in; print('prometheus_client' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def test_flags_of_a_session_closed_without_commit_are_never_counted(
    metered: Flask, session: Session, world: World
) -> None:
    metrics = Metrics(metered.test_client())
    raise_flag(
        session=session,
        kind="metrics_test_closed",
        severity=FlagSeverity.WARNING,
        subject=FlagSubject("device", "abandoned"),
        station_id=world.station.id,
        evidence={},
    )
    session.flush()
    session.close()  # no rollback event: the work is simply abandoned
    session.commit()  # a later, empty transaction of the same session
    assert metrics.moved("courier_flags_raised_total", kind="metrics_test_closed") == 0


def test_a_method_made_up_by_the_client_makes_no_series_of_its_own(metered: Flask) -> None:
    client = metered.test_client()
    metrics = Metrics(client)
    for n in range(3):
        assert client.open("/healthz", method=f"X{n}ZZ").status_code == 405
    after = scrape(client, SCRAPER_TOKEN)
    assert "X0ZZ" not in after
    count = "courier_http_request_duration_seconds_count"
    assert metrics.moved(count, method="other", status="405") == 3


def test_preparing_the_metrics_directory_removes_only_prometheus_files(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from courier_api.metrics import MULTIPROC_ENV, prepare_multiprocess_dir

    monkeypatch.setenv(MULTIPROC_ENV, "")  # restored after the test
    names = ["counter_123.db", "histogram_9.db", "gauge_livesum_77.db", "courier.db", "a.txt"]
    for name in names:
        (tmp_path / name).write_text("x")
    prepare_multiprocess_dir(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "courier.db"]
