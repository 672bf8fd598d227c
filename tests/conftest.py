"""Fixtures: a migrated database per run, one rolled-back transaction per test.

The suite runs on SQLite by default and on PostgreSQL when ``TEST_DATABASE_URL``
is set (``make test`` does both). Each test runs inside an outer transaction
that is rolled back at teardown; the app's sessions commit to savepoints in it
(SQLAlchemy's "joining a session into an external transaction" recipe).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from hypothesis import settings
from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

from courier_api import create_app
from courier_api.extensions import db
from models import Base, migrate
from models.engine import make_engine
from tests import factories

# Hypothesis profiles: CI runs at least 300 examples per property; `slow` digs deeper.
settings.register_profile("dev", max_examples=100)
settings.register_profile("ci", max_examples=300)
settings.register_profile("slow", max_examples=3000)


def hypothesis_profile() -> str:
    """``HYPOTHESIS_PROFILE`` when set; else ``dev``, and ``ci`` in CI's SQLite pass.

    The PostgreSQL pass repeats each property for the dialect (locks, types, plans),
    not to search further: 100 examples there, beside the 300 of the SQLite pass,
    keep CI's two passes within its time."""
    chosen = os.environ.get("HYPOTHESIS_PROFILE")
    if chosen:
        return chosen
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    on_postgresql = os.environ.get("TEST_DATABASE_URL", "").startswith("postgresql")
    return "ci" if in_ci and not on_postgresql else "dev"


settings.load_profile(hypothesis_profile())

FAST_PASSWORD_HASH = "pbkdf2:sha256:1000"  # tests only: production uses scrypt
TEST_JWT_SECRET = "test-secret-" + "x" * 40
OUTPUT_DIR = Path(__file__).resolve().parent.parent / "test-output"


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        return url
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}"


def reset_database(engine: Engine) -> None:
    """Start the run from an empty database (PostgreSQL keeps one between runs)."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
            connection.execute(text("CREATE SCHEMA public"))


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    # Deferred: the outer per-test transaction must not hold SQLite's write lock
    # before the test writes, or the app's own engine (e.g. /readyz) would wait on it.
    engine = make_engine(database_url, sqlite_begin="DEFERRED")
    reset_database(engine)
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def connection(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as connection:
        transaction = connection.begin()
        yield connection
        if transaction.is_active:
            transaction.rollback()


@pytest.fixture
def session(connection: Connection) -> Iterator[Session]:
    with Session(
        bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    ) as session:
        yield session


def make_test_app(database_url: str, tmp_path: Path, **overrides: Any) -> Flask:
    config = {
        "APP_ENV": "testing",
        "DATABASE_URL": database_url,
        "JWT_SECRET": TEST_JWT_SECRET,
        "BLOB_DIR": str(tmp_path / "blobs"),
        "PASSWORD_HASH_METHOD": FAST_PASSWORD_HASH,
    }
    config.update(overrides)
    return create_app(config)


@pytest.fixture
def app(database_url: str, connection: Connection, tmp_path: Path) -> Iterator[Flask]:
    app = make_test_app(database_url, tmp_path)
    db.bind_to_connection(app, connection)
    yield app
    db.engine_of(app).dispose()


@pytest.fixture
def app_with(
    database_url: str, connection: Connection, tmp_path: Path
) -> Iterator[Callable[..., Flask]]:
    """Apps with configuration overrides, inside the test's transaction like ``app``."""
    made: list[Flask] = []

    def make(**overrides: Any) -> Flask:
        app = make_test_app(database_url, tmp_path, **overrides)
        db.bind_to_connection(app, connection)
        made.append(app)
        return app

    yield make
    for app in made:
        db.engine_of(app).dispose()


@pytest.fixture
def committed_app(database_url: str, engine: Engine, tmp_path: Path) -> Iterator[Flask]:
    """An app whose requests really commit, for tests of concurrent requests.

    Every table is emptied afterwards so the rolled-back tests never see its rows.
    """
    app = make_test_app(database_url, tmp_path)
    yield app
    db.engine_of(app).dispose()
    with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner(app: Flask) -> FlaskCliRunner:
    return app.test_cli_runner()


@dataclass
class World:
    """A small station setup most API tests start from."""

    station: Any
    other_station: Any
    admin: Any
    manager: Any
    other_manager: Any
    courier: Any
    auditor: Any
    integration: Any
    device: Any
    other_device: Any


@pytest.fixture
def world(session: Session) -> World:
    station = factories.station(session, code="ST1")
    other = factories.station(session, code="ST2")
    world = World(
        station=station,
        other_station=other,
        admin=factories.user(session, "admin", "admin"),
        manager=factories.user(session, "manager1", "station_manager", station),
        other_manager=factories.user(session, "manager2", "station_manager", other),
        courier=factories.user(session, "courier1", "courier", station),
        auditor=factories.user(session, "auditor1", "auditor"),
        integration=factories.user(session, "app1", "integration"),
        device=factories.device(session, "PDA-0001", station),
        other_device=factories.device(session, "PDA-0002", other),
    )
    session.commit()
    return world


class Auth:
    """Signs in through the real endpoint and hands out Authorization headers."""

    def __init__(self, client: FlaskClient) -> None:
        self.client = client

    def tokens(self, username: str, device_id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"username": username, "password": factories.PASSWORD}
        if device_id:
            body["device_id"] = device_id
        response = self.client.post("/api/v1/auth/token", json=body)
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    def headers(self, username: str, device_id: str | None = None) -> dict[str, str]:
        token = self.tokens(username, device_id)["access_token"]
        return {"Authorization": f"Bearer {token}"}

    def push(
        self, events: list[dict[str, Any]], username: str = "courier1", device_id: str = "PDA-0001"
    ) -> dict[str, Any]:
        """``events`` pushed in one batch by ``username`` on ``device_id``: the receipt."""
        response = self.client.post(
            "/api/v1/sync/push",
            json=factories.push_body(device_id, events),
            headers=self.headers(username, device_id),
        )
        assert response.status_code == 200, response.get_json()
        receipt: dict[str, Any] = response.get_json()
        return receipt


@pytest.fixture
def auth(client: FlaskClient) -> Auth:
    return Auth(client)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``postgres_only`` tests need PostgreSQL's concurrency; the PostgreSQL pass runs them."""
    if item.get_closest_marker("postgres_only") and not os.environ.get(
        "TEST_DATABASE_URL", ""
    ).startswith("postgresql"):
        pytest.skip("needs PostgreSQL (runs in the PostgreSQL pass of make test)")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Leave a record of this pass (CI checks that the PostgreSQL pass really ran)."""
    if hasattr(session.config, "workerinput"):
        return
    url = os.environ.get("TEST_DATABASE_URL", "sqlite")
    backend = "postgresql" if url.startswith("postgresql") else "sqlite"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    passed = len(reporter.stats.get("passed", [])) if reporter else 0
    failed = len(reporter.stats.get("failed", [])) + len(reporter.stats.get("error", []))
    OUTPUT_DIR.mkdir(exist_ok=True)
    (OUTPUT_DIR / f"pass-{backend}.json").write_text(
        json.dumps(
            {"backend": backend, "exitstatus": int(exitstatus), "passed": passed, "failed": failed}
        )
    )
