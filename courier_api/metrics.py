"""Prometheus metrics, read at ``GET /metrics`` (prometheus_client).

* ``courier_http_request_duration_seconds`` (histogram; ``method``, ``rule``: the URL
  rule, ``<unmatched>`` for a 404 of no route; ``status``): every request;
* ``courier_sync_events_total`` (``outcome``: applied, duplicate, quarantined;
  ``reason``: the rejection code, empty otherwise): events of committed pushes;
* ``courier_sync_batches_total`` (``outcome``: stored, replayed): committed pushes; a
  replay is answered with the stored receipt and counts no event again;
* ``courier_flags_raised_total`` (``kind``): flags raised, or raised again, by
  committed transactions of this process (web requests and scheduled jobs alike);
* ``courier_scheduler_job_runs_total`` (``job``, ``outcome``: ok, failed, standby,
  not_due): scheduled job runs;
* ``courier_sign_ins_total`` (``outcome``: ok, failed, refused, limited): password
  sign-ins, through the API and the pages;
* ``courier_token_refreshes_total`` (``outcome``: rotated, retried, reused, revoked):
  refresh tokens exchanged, once committed (``sync.refresh_tokens``); ``reused`` is
  a refresh token presented twice, a copy of a PDA's sign-in in other hands.

Under gunicorn (``courier-api serve``) every worker is a process of its own:
``serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a directory it empties at start,
each worker writes its values there, and ``/metrics`` adds them all up; a worker that
exits is marked dead. prometheus_client decides on multiprocess mode when it is
first imported, so it is imported only when the first metric is made (``_metrics``),
never at import time of this module.

The values are counted here, in the web edge: ``sync`` never imports this module.
"""

from __future__ import annotations

import hmac
import os
import re
import threading
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g
from sqlalchemy import event, inspect
from sqlalchemy.orm import Session, SessionTransaction

from models import Flag, FlagStatus, Role
from sync.errors import AuthenticationFailed, PermissionDenied

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNMATCHED = "<unmatched>"
# Long pulls wait up to MAX_PULL_WAIT_SECONDS (25 s by default).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_CODE = re.compile(r"[a-z][a-z0-9_]{0,47}")

bp = Blueprint("metrics", __name__)


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Histogram(
            "courier_http_request_duration_seconds",
            "Time to answer a request, by method, URL rule and status",
            ["method", "rule", "status"],
            buckets=LATENCY_BUCKETS,
        )
        self.events = Counter(
            "courier_sync_events",
            "Events of committed pushes by outcome (applied, duplicate, quarantined) "
            "and rejection reason",
            ["outcome", "reason"],
        )
        self.batches = Counter(
            "courier_sync_batches",
            "Committed pushes: stored, or replayed (answered with the stored receipt)",
            ["outcome"],
        )
        self.unknown_field_pushes = Counter(
            "courier_sync_unknown_field_pushes",
            "Push requests with top-level keys the server does not know (ignored)",
        )
        self.flags = Counter(
            "courier_flags_raised", "Flags raised or raised again (committed), by kind", ["kind"]
        )
        self.jobs = Counter(
            "courier_scheduler_job_runs",
            "Scheduled job runs by job and outcome",
            ["job", "outcome"],
        )
        self.sign_ins = Counter(
            "courier_sign_ins",
            "Password sign-ins by outcome (ok, failed, refused, limited)",
            ["outcome"],
        )
        self.refreshes = Counter(
            "courier_token_refreshes",
            "Refresh tokens exchanged by outcome (rotated, retried, reused, revoked)",
            ["outcome"],
        )


_made: _Metrics | None = None
_making = threading.Lock()


def _metrics() -> _Metrics:
    global _made
    if _made is None:
        with _making:
            if _made is None:
                _made = _Metrics()
    return _made


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def init_app(app: Flask) -> None:
    _metrics()
    _watch_flags()
    app.register_blueprint(bp)


# -- what is counted --------------------------------------------------------------------------


# A method label from anywhere else would be a series made up by the client.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def observe_request(method: str, rule: str | None, status: int, seconds: float) -> None:
    method = method if method in METHODS else "other"
    _metrics().requests.labels(method, rule or UNMATCHED, str(status)).observe(seconds)


def count_push(receipt: Mapping[str, Any], *, replayed: bool) -> None:
    """A committed push: its batch, and (unless it was a replay) each event's outcome."""
    metrics = _metrics()
    metrics.batches.labels("replayed" if replayed else "stored").inc()
    if replayed:
        return
    counts: dict[tuple[str, str], int] = {}
    for result in receipt.get("results", []):
        if result.get("status") == "rejected":
            code = str((result.get("error") or {}).get("code", ""))
            key = ("quarantined", code if _CODE.fullmatch(code) else "other")
        else:
            key = (str(result.get("status")), "")
        counts[key] = counts.get(key, 0) + 1
    for (outcome, reason), count in counts.items():
        metrics.events.labels(outcome, reason).inc(count)


def unknown_field_push() -> None:
    """A push request whose body had keys the server ignored (no key as a label: the
    PDA chooses them, and every label value is a series)."""
    _metrics().unknown_field_pushes.inc()


def job_run(job: str, outcome: str) -> None:
    _metrics().jobs.labels(job, outcome).inc()


def sign_in(outcome: str) -> None:
    _metrics().sign_ins.labels(outcome).inc()


def token_refresh(verdict: str) -> None:
    _metrics().refreshes.labels(verdict).inc()


# Flags: a new flag, or one whose status turns open again, is noted at flush with the
# savepoint it was flushed in, dropped if that savepoint or the transaction rolls back,
# and counted once the session commits.
_PENDING = "courier_api.metrics.flags"
_watching = False


def _watch_flags() -> None:
    global _watching
    with _making:
        if _watching:
            return
        event.listen(Session, "after_flush", _note_flags)
        event.listen(Session, "after_commit", _count_flags)
        event.listen(Session, "after_soft_rollback", _drop_flags)
        event.listen(Session, "after_transaction_end", _forget_flags)
        _watching = True


def _note_flags(session: Session, _context: Any) -> None:
    raised = [obj.kind for obj in session.new if isinstance(obj, Flag)]
    for obj in session.dirty:
        if isinstance(obj, Flag):
            history = inspect(obj).attrs.status.history
            if FlagStatus.OPEN in history.added and FlagStatus.OPEN not in history.deleted:
                raised.append(obj.kind)
    if raised:
        where = session.get_nested_transaction()
        session.info.setdefault(_PENDING, []).extend((where, kind) for kind in raised)


def _count_flags(session: Session) -> None:
    if session.in_nested_transaction():  # a savepoint released: not committed yet
        return
    pending = session.info.pop(_PENDING, None)
    if not pending:
        return
    flags = _metrics().flags
    for _, kind in pending:
        flags.labels(kind).inc()


def _drop_flags(session: Session, previous: SessionTransaction) -> None:
    pending = session.info.get(_PENDING)
    if not pending:
        return
    if not previous.nested:
        session.info.pop(_PENDING, None)
        return

    def inside(transaction: SessionTransaction | None) -> bool:
        while transaction is not None:
            if transaction is previous:
                return True
            transaction = transaction.parent
        return False

    session.info[_PENDING] = [item for item in pending if not inside(item[0])]


def _forget_flags(session: Session, transaction: SessionTransaction) -> None:
    """The outermost transaction ended: what it did not commit is never counted (a
    session closed without a rollback fires no ``after_soft_rollback``)."""
    if transaction.parent is None:
        session.info.pop(_PENDING, None)


# -- reading them -----------------------------------------------------------------------------


@bp.get("/metrics")
def scrape() -> Response:
    """The Prometheus text format; for the scraper's ``METRICS_TOKEN`` or an admin."""
    _authorize()
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    if multiprocess_dir():
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    response = Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
    response.headers["Cache-Control"] = "no-store"
    return response


def _authorize() -> None:
    """``Authorization: Bearer <METRICS_TOKEN>`` (compared in constant time), or an
    admin's access token."""
    from courier_api.auth import ACCESS, bearer_token, checked_principal, decode_token

    token = bearer_token()
    configured = current_app.config["METRICS_TOKEN"]
    if configured and hmac.compare_digest(token.encode(), configured.encode()):
        return
    try:
        claims = decode_token(token, expected_type=ACCESS)
    except AuthenticationFailed as error:
        raise AuthenticationFailed(
            "send the metrics token (METRICS_TOKEN) or an admin's access token",
            code=error.code,
        ) from None
    principal = checked_principal(claims)  # on SQLite, without the writers' turn
    g.principal = principal
    if principal.role != Role.ADMIN:
        raise PermissionDenied("only admins and the metrics scraper read /metrics")


# -- gunicorn ---------------------------------------------------------------------------------


# The files prometheus_client writes per process, e.g. counter_1234.db, gauge_livesum_1234.db.
_VALUE_FILE = re.compile(r"(counter|histogram|summary|gauge_[a-z]+)_\d+\.db")


def prepare_multiprocess_dir(path: str) -> None:
    """Before the app is built: make ``path`` the directory of every worker's values,
    emptied of an earlier run's. Only prometheus_client's own files are removed: the
    directory may be shared with something else by mistake (the instance folder with
    the SQLite database)."""
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if _VALUE_FILE.fullmatch(name):
            os.remove(os.path.join(path, name))
    os.environ[MULTIPROC_ENV] = path


def worker_exited(pid: int) -> None:
    """gunicorn's ``child_exit`` (in the master): the worker's live values are dropped."""
    if multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
