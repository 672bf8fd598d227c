"""``courier-api serve``: gunicorn in-process, with the app built once before forking.

With ``SCHEDULER_IN_WEB``, each worker starts a background scheduler after the
fork (never the master, never ``create_app``); the database lease lets one of
them run the jobs at a time.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, has_app_context
from gunicorn.app.base import BaseApplication


class GunicornServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, app: Flask, options: dict[str, Any]) -> None:
        self.application = app
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self.application


def serve(
    app: Flask, *, host: str, port: int, workers: int, threads: int = 8, timeout: int = 60
) -> None:
    """gunicorn with ``workers`` processes of ``threads`` threads each: a PDA waiting on a
    long pull (``GET /sync/pull?wait=``) holds a thread, not a whole process."""
    GunicornServer(
        app,
        {
            "bind": f"{host}:{port}",
            "workers": workers,
            "worker_class": "gthread",
            "threads": threads,
            "timeout": timeout,
            "accesslog": "-",
            "post_fork": lambda _server, _worker: _start_worker(app),
            "worker_exit": lambda _server, _worker: _stop_worker(app),
            "preload_app": True,
            # gunicorn 27's control socket lives at one path per user: a second server
            # (or a restart after a crash) would take it from the first. We do not use it.
            "control_socket_disable": True,
        },
    ).run()


def _start_worker(app: Flask) -> None:
    _forget_parent_connections(app)
    if app.config["SCHEDULER_IN_WEB"]:
        from courier_api.scheduler import start_in_web_worker

        start_in_web_worker(app)


def _stop_worker(app: Flask) -> None:
    if app.config["SCHEDULER_IN_WEB"]:
        from courier_api.scheduler import stop_in_web_worker

        stop_in_web_worker()


def _forget_parent_connections(app: Flask) -> None:
    """Each worker opens its own database connections, never the master's.

    A worker must start with no app context: requests would share its ``g`` and
    database session (holding SQLite's write lock, or a failed PostgreSQL
    transaction) instead of getting one each.
    """
    from courier_api.extensions import db

    if has_app_context():
        raise RuntimeError("gunicorn worker started inside a Flask app context")
    db.engine_of(app).dispose(close=False)
