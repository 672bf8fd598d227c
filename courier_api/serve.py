"""``courier-api serve``: gunicorn in-process, with the app built once before forking.

With ``SCHEDULER_IN_WEB``, each worker starts a background scheduler after the
fork (never the master, never ``create_app``); the database lease lets one of
them run the jobs at a time.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

from flask import Flask, has_app_context
from gunicorn.app.base import BaseApplication

from courier_api.logs import gunicorn_logger_class
from courier_api.metrics import worker_exited

log = logging.getLogger(__name__)


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


def bind_address(host: str, port: int) -> str:
    """gunicorn's ``bind`` for ``host`` and ``port``: an IPv6 literal in brackets, as
    gunicorn reads ``::1:8000`` as no host and no port and refuses to start."""
    from gunicorn.util import is_ipv6

    return f"[{host}]:{port}" if is_ipv6(host) else f"{host}:{port}"


def serve(
    app: Flask, *, host: str, port: int, workers: int, threads: int = 8, timeout: int = 60
) -> None:
    """gunicorn with ``workers`` processes of ``threads`` threads each: a PDA waiting on a
    long pull (``GET /sync/pull?wait=``) holds a thread, not a whole process."""
    cap_pull_waiters(app, threads)
    freeze_startup_objects()
    GunicornServer(
        app,
        {
            "bind": bind_address(host, port),
            "workers": workers,
            "worker_class": "gthread",
            "threads": threads,
            "timeout": timeout,
            # The app logs one line per request (courier_api.logs), with more in it than
            # gunicorn's access log; gunicorn's own lines go through the same handler.
            "accesslog": None,
            "logger_class": gunicorn_logger_class(),
            "post_fork": lambda _server, _worker: _start_worker(app),
            "worker_exit": lambda _server, _worker: _stop_worker(app),
            "child_exit": lambda _server, worker: worker_exited(worker.pid),
            "preload_app": True,
            # gunicorn 27's control socket lives at one path per user: a second server
            # (or a restart after a crash) would take it from the first. We do not use it.
            "control_socket_disable": True,
        },
    ).run()


def pull_waiters_for(threads: int, configured: int) -> int:
    """Long pulls that may wait at a time in a worker of ``threads`` threads: at most
    ``configured`` (``MAX_PULL_WAITERS``), and never every thread."""
    return max(0, min(configured, threads - 1))


def cap_pull_waiters(app: Flask, threads: int) -> None:
    """Keep a thread of each worker free of long pulls, with a warning when
    ``MAX_PULL_WAITERS`` would not.

    A waiting pull holds its thread for up to ``MAX_PULL_WAIT_SECONDS``; the pull's
    waiting room (``courier_api.api.sync.routes``) exists so that pushes, sign-ins and
    health checks always find one. A pull beyond the room is answered at once, as
    when the room is full: the PDA pulls again. (Not refused: ``--threads 1`` could
    then never start, since ``MAX_PULL_WAITERS`` is at least 1.)
    """
    configured = app.config["MAX_PULL_WAITERS"]
    waiters = pull_waiters_for(threads, configured)
    if waiters == configured:
        return
    log.warning(
        "MAX_PULL_WAITERS=%d would let long pulls take all %d threads of a worker "
        "(pushes, sign-ins and health checks would wait for them): %s",
        configured,
        threads,
        f"at most {waiters} wait at a time in each worker; more are answered at once"
        if waiters
        else "no long pull waits; each is answered at once",
    )
    app.config["MAX_PULL_WAITERS"] = waiters


def freeze_startup_objects() -> None:
    """Keep the objects built at start-up (the app, SQLAlchemy's metadata, the phone
    number tables: about 150,000) out of the garbage collector's full passes.

    A 1,000-event push allocates enough to trigger full collections, and each
    walked every one of them again: tens of milliseconds added to whichever request
    was unlucky. Frozen in the master before the fork, they also stay shared
    between the workers instead of being copied when the collector touches them.
    """
    gc.collect()
    gc.freeze()


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
    db.forget_inherited_connections(app)
