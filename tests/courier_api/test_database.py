"""The database extension: one engine and its readers per app, across a fork."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from courier_api import create_app
from courier_api.auth import require_auth
from courier_api.extensions import db
from models import Role, migrate
from models.engine import reads_only
from sync.errors import DomainError
from tests import factories
from tests.conftest import Auth, make_test_app


def test_a_forked_worker_leaves_the_parents_sqlite_connections_open(tmp_path: Path) -> None:
    """``Database.forget_inherited_connections`` in a gunicorn worker: new pools for the
    writers and the readers, the parent's connections left to the parent, unclosed;
    the readers stay the ones the app reads with."""
    app = create_app(
        {
            "APP_ENV": "testing",
            "DATABASE_URL": f"sqlite:///{tmp_path / 'forked.db'}",
            "JWT_SECRET": "f" * 40,
            "INSTANCE_PATH": str(tmp_path),
        }
    )
    engine = db.engine_of(app)
    reader = reads_only(engine)
    try:
        parents = []
        for which in (engine, reader):
            with which.connect() as connection:
                connection.execute(text("SELECT 1"))
                parents.append(connection.connection.dbapi_connection)
        db.forget_inherited_connections(app)
        for parent in parents:
            assert parent.execute("SELECT 2").fetchone() == (2,)  # not closed
        assert reads_only(engine) is reader
        with reader.connect() as connection:
            assert connection.connection.dbapi_connection is not parents[1]  # a new pool's
    finally:
        engine.dispose()
        for parent in parents:
            parent.close()


def test_a_refused_recheck_stands_even_when_a_view_catches_it(tmp_path: Path) -> None:
    """The device is reported lost between a request's sign-in check (read apart) and
    its first statement, which the recheck refuses. A view that catches the refusal
    around that statement (a ``DomainError`` handler) still cannot commit its writes."""
    app = make_test_app(f"sqlite:///{tmp_path / 'recheck.db'}", tmp_path)
    engine = db.engine_of(app)
    migrate.upgrade(engine)

    @require_auth(Role.COURIER)
    def swallowing() -> str:
        with engine.begin() as manager:  # another request reports the PDA lost
            manager.execute(text("UPDATE device SET status = 'lost' WHERE id = 'PDA-R'"))
        try:
            db.session.execute(text("SELECT 1"))  # the recheck refuses here
        except DomainError:
            pass
        factories.station(db.session, code="SNEAK")
        db.session.commit()
        return "stored"

    app.add_url_rule("/swallowing", view_func=swallowing, methods=["POST"])
    try:
        with app.app_context():
            factories.station_with_pdas(db.session, "REC", {"rec": "PDA-R"}, parcels=0)
            db.session.commit()
        client = app.test_client()
        response = client.post("/swallowing", headers=Auth(client).headers("rec", "PDA-R"))
        assert response.status_code == 401
        assert response.get_json()["code"] == "device_not_active"
        with engine.connect() as connection:
            sneaked = "SELECT count(*) FROM station WHERE code = 'SNEAK'"
            assert connection.execute(text(sneaked)).scalar_one() == 0
    finally:
        engine.dispose()
