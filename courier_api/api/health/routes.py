from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask.views import MethodView
from sqlalchemy.exc import SQLAlchemyError

from courier_api.api.base import ApiBlueprint
from courier_api.extensions import db
from models.engine import reads_only, writes_refused
from models.migrate import current_revisions, head_revisions

blp = ApiBlueprint("health", __name__, description="Liveness and readiness probes")


class Liveness(ma.Schema):
    status = ma.fields.String(required=True, metadata={"example": "ok"})


class Readiness(ma.Schema):
    status = ma.fields.String(required=True, metadata={"enum": ["ready", "not_ready"]})
    database = ma.fields.String(required=True)
    migrations = ma.fields.Dict(required=True)


@blp.route("/healthz")
class Healthz(MethodView):
    @blp.probe
    @blp.response(200, Liveness)
    def get(self) -> dict[str, Any]:
        """The process is up (no dependency is checked)"""
        return {"status": "ok"}


@blp.route("/readyz")
class Readyz(MethodView):
    @blp.probe
    @blp.response(200, Readiness)
    @blp.alt_response(503, schema=Readiness, description="Not ready: see database/migrations")
    def get(self) -> tuple[dict[str, Any], int]:
        """The database answers and its schema is at the migrations' head"""
        # Read without the writers' turn: on SQLite the probe queued behind the pushes
        # and, past the busy timeout, took the worker out of service for being busy.
        # And this worker may write: on a SQLite file whose WAL file was deleted, or
        # failed to sync, it refuses every write until it restarts.
        head = sorted(head_revisions())
        try:
            with reads_only(db.engine).connect() as connection:
                current = sorted(current_revisions(connection))
            refused = writes_refused(db.engine)
        except SQLAlchemyError as exc:
            body = {
                "status": "not_ready",
                "database": f"unreachable: {type(exc).__name__}",
                "migrations": {"current": [], "head": head},
            }
            return body, 503
        ready = current == head and refused is None
        # Why, without the file's path (the probe answers anyone, as the reason a
        # database is unreachable is its error's type alone); the log names the file.
        why = None if refused is None else refused.strerror or type(refused).__name__
        body = {
            "status": "ready" if ready else "not_ready",
            "database": "ok" if why is None else f"writes refused until a restart: {why}",
            "migrations": {"current": current, "head": head},
        }
        return body, 200 if ready else 503
