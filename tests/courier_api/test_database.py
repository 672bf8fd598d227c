"""The database extension: one engine and its readers per app, across a fork."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from courier_api import create_app
from courier_api.extensions import db
from models.engine import reads_only


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
