import pytest
from flask import Flask
from flask.sessions import SecureCookieSessionInterface
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


def test_readyz_is_503_while_a_worker_refuses_writes_for_a_deleted_wal_file(tmp_path) -> None:
    """A worker whose SQLite WAL file was deleted under it saves what the file held and
    refuses every write until it restarts (``models.turnstile``): the load balancer
    must hear it, or it keeps sending pushes to a worker that answers each with a 503.
    """
    from sqlalchemy import text

    from courier_api.extensions import db
    from models import migrate
    from models.engine import make_engine
    from tests.conftest import make_test_app

    path = tmp_path / "service.db"
    setup = make_engine(f"sqlite:///{path}")
    migrate.upgrade(setup)
    setup.dispose()
    app = make_test_app(f"sqlite:///{path}", tmp_path)
    client = app.test_client()
    try:
        assert client.get("/readyz").status_code == 200
        with app.app_context():
            with db.engine.begin() as connection:  # a write: the WAL file is open
                connection.execute(text("UPDATE alembic_version SET version_num = version_num"))
            path.with_name(path.name + "-wal").unlink()
            with db.engine.begin() as connection:  # the commit that finds it gone
                connection.execute(text("UPDATE alembic_version SET version_num = version_num"))
        response = client.get("/readyz")
        body = response.get_json()
        assert response.status_code == 503, body
        assert body["status"] == "not_ready"
        assert body["database"].startswith("writes refused until a restart")
        assert "WAL file was deleted" in body["database"]
        assert str(tmp_path) not in body["database"]  # the probe answers anyone
    finally:
        db.engine_of(app).dispose()


def test_readyz_answers_at_once_while_a_writer_holds_the_database(tmp_path) -> None:
    """The probe reads the migrations' revision: on SQLite it queued for the writers'
    turn behind the pushes, and answered 503 after the busy timeout (10 s) when a push
    held it that long, so a load balancer took a busy worker out of service."""
    import time

    from sqlalchemy import text

    from courier_api.extensions import db
    from models import migrate
    from models.engine import make_engine
    from tests.conftest import make_test_app

    path = tmp_path / "service.db"
    setup = make_engine(f"sqlite:///{path}")
    migrate.upgrade(setup)
    setup.dispose()
    app = make_test_app(f"sqlite:///{path}", tmp_path)
    client = app.test_client()
    try:
        with db.engine_of(app).begin() as writer:  # a push in progress: the writers' turn
            writer.execute(text("UPDATE alembic_version SET version_num = version_num"))
            started = time.monotonic()
            response = client.get("/readyz")
            waited = time.monotonic() - started
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["status"] == "ready"
        assert waited < 2, waited
    finally:
        db.engine_of(app).dispose()


def test_a_request_without_a_session_cookie_builds_no_signing_serializer(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every API request (a PDA's push) sends no session cookie: its empty session is
    given without Flask's signing serializer (``courier_api.web.CookieSessions``). One
    with a cookie gets it read as Flask reads it."""
    built: list[object] = []
    serializer = SecureCookieSessionInterface.get_signing_serializer

    def counted(self: SecureCookieSessionInterface, app: Flask) -> object:
        built.append(app)
        return serializer(self, app)

    monkeypatch.setattr(SecureCookieSessionInterface, "get_signing_serializer", counted)
    assert client.get("/healthz").status_code == 200
    assert built == []
    client.set_cookie("courier_session", "not-a-signed-value")
    assert client.get("/healthz").status_code == 200
    assert len(built) == 1
