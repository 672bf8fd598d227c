import pytest
from flask.testing import FlaskClient


def test_healthz_answers_without_a_token(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_reports_database_and_migration_head(client: FlaskClient) -> None:
    response = client.get("/readyz")
    body = response.get_json()
    assert response.status_code == 200, body
    assert body["status"] == "ready"
    assert body["migrations"]["current"] == body["migrations"]["head"]
    assert body["migrations"]["head"]


def test_a_ready_probe_logs_nothing_at_info(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A load balancer asks every few seconds: a ready answer is logged at DEBUG only
    (README), so alembic's "Context impl PostgresqlImpl." and "Will assume
    transactional DDL." lines, written each time the revision is read, are not either."""
    with caplog.at_level("INFO"):
        assert client.get("/readyz").status_code == 200
    assert [r.getMessage() for r in caplog.records if r.levelname != "DEBUG"] == []


def test_a_probe_with_a_cache_buster_is_answered(client: FlaskClient) -> None:
    """Unknown query parameters are a 422 elsewhere; a load balancer's probe may add one
    of its own, and a 422 would take the instance out of service."""
    assert client.get("/healthz?_=1733250000").status_code == 200
    assert client.get("/readyz?probe=lb").status_code == 200


def test_readyz_is_503_on_an_unmigrated_database(tmp_path) -> None:
    from tests.conftest import make_test_app

    app = make_test_app(f"sqlite:///{tmp_path / 'empty.db'}", tmp_path)
    response = app.test_client().get("/readyz")
    body = response.get_json()
    assert response.status_code == 503
    assert body["status"] == "not_ready"
    assert body["migrations"]["current"] == []


def test_root_sends_a_browser_to_the_docs(client: FlaskClient) -> None:
    response = client.get("/")
    assert response.status_code == 302
    assert response.headers["Location"].endswith("/docs")
