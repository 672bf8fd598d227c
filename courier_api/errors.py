"""One JSON error body for everything the API answers with an error.

``{"code": "validation_error", "status": 422, "message": "...", "errors": {...}}``:
``code`` is stable and meant for machines, ``message`` for people, and
``errors`` names the fields at fault (absent when none is: a 401, a 429, ...).
Domain errors (``sync.errors``) map to their HTTP status here and nowhere else.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from flask import Flask, current_app, has_request_context, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from werkzeug.exceptions import HTTPException

from courier_api.database import CONFLICT_RETRY_AFTER_SECONDS, TRANSACTION_CONFLICT
from sync.errors import (
    AuthenticationFailed,
    Conflict,
    CursorReset,
    DomainError,
    Gone,
    InvalidCursor,
    InvalidInput,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unavailable,
)
from sync.sql import aborted_for_a_conflict

log = logging.getLogger(__name__)

DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    410: "gone",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "service_unavailable",
}

DOMAIN_STATUS: dict[type[DomainError], int] = {
    InvalidCursor: 400,
    CursorReset: 410,
    InvalidInput: 422,
    NotFound: 404,
    Gone: 410,
    Conflict: 409,
    PermissionDenied: 403,
    AuthenticationFailed: 401,
    LimitExceeded: 413,
    RateLimited: 429,
    Unavailable: 503,
}


def error_body(
    status: int,
    *,
    code: str | None = None,
    message: str | None = None,
    errors: Any = None,
    limit: tuple[int, str] | None = None,
) -> dict[str, Any]:
    """The one error body. ``limit``: for a 413, how many of what one request may carry
    (``(5000, "events")``), as ``{"max", "unit"}``: a PDA refused its queue splits it by
    that number at once, rather than halving it blind, sending the whole body again
    over a weak signal at each refusal."""
    body: dict[str, Any] = {
        "code": code
        or DEFAULT_CODES.get(status, HTTPStatus(status).phrase.lower().replace(" ", "_")),
        "status": status,
        "message": message or HTTPStatus(status).description or HTTPStatus(status).phrase,
    }
    if errors:
        body["errors"] = errors
    if limit is not None:
        body["limit"] = {"max": limit[0], "unit": limit[1]}
    return body


DEFAULT_MESSAGES = {
    404: "no such resource",
    405: "this method is not allowed here; see the Allow header",
    422: "the request did not validate; see errors",
}
INTERNAL_ERROR_MESSAGE = "internal error; it has been logged"


def http_exception_body(error: HTTPException) -> tuple[dict[str, Any], dict[str, str]]:
    """Body and headers for a werkzeug or webargs ``HTTPException``."""
    status = error.code or 500
    data = getattr(error, "data", None) or {}
    headers = dict(data.get("headers") or {})
    if status == 405:
        headers.update((k, v) for k, v in error.get_headers() if k == "Allow")
    errors = data.get("errors") or data.get("messages")
    message = data.get("message") or (
        validation_message(errors) if status == 422 and errors else None
    )
    message = message or _default_message(status, error)
    limit = None
    if status == 413:
        limit = (_body_limit(), "bytes")
        if not errors:  # the field at fault is the body, as for an image
            errors = {"body": [message]}
    body = error_body(status, code=data.get("code"), message=message, errors=errors, limit=limit)
    return body, headers


# Where webargs says a field was read from: the top key of its ``errors``.
LOCATIONS = frozenset({"json", "query", "querystring", "form", "headers", "cookies", "files"})
FIELDS_NAMED = 3  # in a validation error's message, at most


def validation_message(errors: Any) -> str:
    """``the request did not validate: shifts[0].balance_version: Missing data for
    required field.``: the message names the fields at fault and what is wrong with
    each (the first few), so that a reader of the message alone (a manager's page, a
    log line) knows what to change; ``errors`` has them all."""
    named = [f"{path}: {text}" if path else text for path, text in _faults(errors, "")]
    shown = "; ".join(named[:FIELDS_NAMED])
    if len(named) > FIELDS_NAMED:
        shown += f"; and {len(named) - FIELDS_NAMED} more (see errors)"
    return f"the request did not validate: {shown}"


def _faults(errors: Any, path: str) -> list[tuple[str, str]]:
    """``(field path, message)`` for each message in a marshmallow/webargs error tree."""
    if isinstance(errors, dict):
        found = []
        for key, value in errors.items():
            key = str(key)
            if not path and key in LOCATIONS or key == "_schema":
                found += _faults(value, path)
            elif key.isdigit():
                found += _faults(value, f"{path}[{key}]")
            else:
                found += _faults(value, f"{path}.{key}" if path else key)
        return found
    if isinstance(errors, list | tuple):
        return [fault for item in errors for fault in _faults(item, path)]
    return [(path, str(errors))]


def _body_limit() -> int:
    """The largest request body, in bytes (``MAX_REQUEST_BYTES``)."""
    limit = (
        request.max_content_length
        if has_request_context()
        else current_app.config.get("MAX_CONTENT_LENGTH")
    )
    return int(limit or 0)


def _default_message(status: int, error: HTTPException) -> str:
    if status >= 500:
        return INTERNAL_ERROR_MESSAGE  # never the exception's own text
    if status == 413:
        return (
            f"request body is larger than the limit of {_body_limit()} bytes; nothing was stored: "
            "send less in one request (a push: fewer events per batch)"
        )
    return DEFAULT_MESSAGES.get(status) or error.description or HTTPStatus(status).phrase


def domain_status(error: DomainError) -> int:
    for cls in type(error).__mro__:
        if cls in DOMAIN_STATUS:
            return DOMAIN_STATUS[cls]
    return 400


def handle_domain_error(error: DomainError) -> ResponseReturnValue:
    status = domain_status(error)
    errors = {error.field: [error.message]} if error.field else None
    headers = {}
    if isinstance(error, Unavailable):
        # Operators must hear of a full or unwritable store; the client only that it may retry.
        log.error("%s: %s", error.code, error.__cause__ or error.message)
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    limit = (error.limit, error.unit) if isinstance(error, LimitExceeded) else None
    body = error_body(status, code=error.code, message=error.message, errors=errors, limit=limit)
    return jsonify(body), status, headers


def handle_integrity_error(error: IntegrityError) -> ResponseReturnValue:
    from courier_api.extensions import db

    db.rollback()
    log.warning("integrity error answered with 409: %s", error.orig)
    body = error_body(409, message="the change conflicts with data already stored")
    return jsonify(body), 409


def handle_data_error(error: DataError) -> ResponseReturnValue:
    """A value the database cannot store. Input validation should have said so first:
    this is the safety net that keeps it a 422 (and logged) rather than a 500."""
    from courier_api.extensions import db

    db.rollback()
    log.warning("database refused a value, answered with 422", exc_info=error)
    body = error_body(
        422, code="invalid_value", message="a value is out of range or cannot be stored"
    )
    return jsonify(body), 422


def handle_database_unavailable(error: OperationalError) -> ResponseReturnValue:
    from courier_api.extensions import db

    db.rollback()
    if written_while_reading(error):
        raise error  # a view marked READS_ONLY wrote: a bug, a 500, not "retry later"
    answer = database_refusal(error)
    body = error_body(503, code=answer.code, message=answer.message)
    return jsonify(body), 503, {"Retry-After": str(answer.retry_after)}


@dataclass(frozen=True)
class DatabaseRefusal:
    """What a request the database failed is told, by the API and the pages alike."""

    code: str
    message: str
    retry_after: int  # seconds


TRANSACTION_CONFLICT_MESSAGE = (
    "the database aborted this request to let concurrent work go on (a deadlock or a "
    "serialization failure); nothing was stored: send the same request again"
)


def database_refusal(error: OperationalError) -> DatabaseRefusal:
    """A transaction PostgreSQL aborted for a conflict with concurrent work is
    ``transaction_conflict``: the database is fine, the request lost a race, and sent
    again it may well pass (``aborted_for_a_conflict``; its transaction kept nothing).
    Any other operational error is ``database_unavailable``. Logged for operators."""
    if aborted_for_a_conflict(error):
        log.warning("transaction aborted for a conflict: %s", error.orig)
        return DatabaseRefusal(
            code=TRANSACTION_CONFLICT,
            message=TRANSACTION_CONFLICT_MESSAGE,
            retry_after=CONFLICT_RETRY_AFTER_SECONDS,
        )
    log.error("database unavailable: %s", error.orig)
    return DatabaseRefusal(
        code="database_unavailable",
        message="the database is unavailable; retry later",
        retry_after=5,
    )


def written_while_reading(error: OperationalError) -> bool:
    """SQLite refused a write in a transaction that only reads (``PRAGMA query_only``;
    PostgreSQL's READ ONLY refusal is not an OperationalError and is a 500 anyway)."""
    return getattr(error.orig, "sqlite_errorcode", None) == sqlite3.SQLITE_READONLY


def register_errorhandlers(app: Flask) -> None:
    """HTTP exceptions go through ``CourierApi.handle_http_exception``; these add the rest."""
    app.register_error_handler(DomainError, handle_domain_error)
    app.register_error_handler(IntegrityError, handle_integrity_error)
    app.register_error_handler(DataError, handle_data_error)
    app.register_error_handler(OperationalError, handle_database_unavailable)
