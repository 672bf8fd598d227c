"""The ``Api`` and ``Blueprint`` of this project: our error body, auth in the docs."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

import marshmallow as ma
from flask import Flask, Request, Response, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from flask_smorest import Api, Blueprint, abort
from webargs.flaskparser import FlaskParser, is_json_request
from werkzeug.exceptions import HTTPException

from courier_api.api.fields import After, Text
from courier_api.auth import require_auth
from courier_api.errors import http_exception_body
from models import Role
from sync.events import nested_deeper_than
from sync.paging import MAX_PAGE_SIZE


class LimitSchema(ma.Schema):
    max = ma.fields.Integer(
        required=True, metadata={"description": "How many one request may carry"}
    )
    unit = ma.fields.String(
        required=True,
        metadata={"description": "Of what: events (a push), parcels (an intake) or bytes"},
    )


class ErrorSchema(ma.Schema):
    code = ma.fields.String(
        required=True, metadata={"description": "Stable machine code, e.g. token_expired"}
    )
    status = ma.fields.Integer(required=True, metadata={"description": "HTTP status"})
    message = ma.fields.String(required=True, metadata={"description": "Human explanation"})
    errors = ma.fields.Dict(
        metadata={
            "description": "The fields at fault, each with its messages. A 422 "
            "validation_error (the request did not fit its schema) keys them by location, "
            "then field (errors.json.password, errors.query.limit); any other error by the "
            "field alone (errors.device_id, errors.sha256, errors.body). Absent when no one "
            "field is at fault"
        }
    )
    limit = ma.fields.Nested(
        LimitSchema,
        metadata={
            "description": "A 413 payload_too_large only: the limit the request went over, "
            "to split it by (errors names the field: events, parcels or body)"
        },
    )


# ``alt_response(429, **RATE_LIMITED)``: a refusal by a rate limit, and when to try again.
RATE_LIMITED: dict[str, Any] = {
    "schema": ErrorSchema,
    "description": "Too many attempts: wait the seconds in Retry-After, then try again",
    "headers": {
        "Retry-After": {
            "description": "Seconds to wait before trying again",
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
        }
    },
}


# What the API answers is kept by no cache on the way (a station's proxy, a tool's HTTP
# cache): parcels, proofs (an auditor's hold full phone numbers), exports, consents and
# audit entries are personal data. Errors included, and paths no route matches.
API_PATH_PREFIX = "/api/"
NOT_KEPT = "no-store"


def kept_by_no_cache(response: Response) -> Response:
    """``Cache-Control: no-store`` on an API answer that sets no Cache-Control of its
    own: a proof image keeps its ``private, max-age=31536000, immutable``
    (``courier_api.api.blobs.routes.image_response``), a sign-in its ``Pragma`` too."""
    path = request._get_current_object().path  # type: ignore[attr-defined]  # once: see logs
    if path.startswith(API_PATH_PREFIX) and "Cache-Control" not in response.headers:
        response.headers["Cache-Control"] = NOT_KEPT
    return response


class CourierApi(Api):
    ERROR_SCHEMA = ErrorSchema

    def init_app(self, app: Flask, *, spec_kwargs: dict[str, Any] | None = None) -> None:
        super().init_app(app, spec_kwargs=spec_kwargs)
        app.after_request(kept_by_no_cache)

    def handle_http_exception(self, error: HTTPException) -> ResponseReturnValue:
        body, headers = http_exception_body(error)
        return jsonify(body), body["status"], headers


class JsonParser(FlaskParser):
    """webargs' parser, with every malformed JSON body a 400, never a 500, and an
    unknown query parameter a 422 as an unknown body field is.

    webargs catches decode errors only; Python's JSON module also raises
    ``ValueError`` for integer literals beyond its digit limit and
    ``RecursionError`` for deeply nested documents. webargs drops query parameters it
    does not know: a misspelled filter (``/proofs?tracking=``) would answer every
    record, as if there were none.
    """

    DEFAULT_UNKNOWN_BY_LOCATION = {
        **FlaskParser.DEFAULT_UNKNOWN_BY_LOCATION,
        "query": ma.RAISE,
        "querystring": ma.RAISE,
    }

    def _raw_load_json(self, req: Request) -> Any:
        # webargs passes ``request``: out of its proxy once (``courier_api.logs`` says why).
        req = getattr(req, "_get_current_object", lambda: req)()
        if not is_json_request(req) and req.get_data(cache=True):
            # Else webargs reads no body at all, and every required field is "missing".
            abort(
                415,
                message=(
                    f"the body must be JSON, sent as Content-Type: application/json "
                    f"(it came as {req.mimetype or 'no Content-Type'})"
                ),
                errors={"Content-Type": ["must be application/json"]},
            )
        try:
            document = super()._raw_load_json(req)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise
        except (ValueError, RecursionError) as exc:
            return self._handle_invalid_json_error(exc, req)  # type: ignore[arg-type]
        if not _depth_judged_per_item(req) and nested_deeper_than(document, MAX_JSON_DEPTH):
            error = ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
            return self._handle_invalid_json_error(error, req)  # type: ignore[arg-type]
        return document

    def _handle_invalid_json_error(
        self, error: Exception, req: Request, *_: Any, **__: Any
    ) -> Any:
        """A 400 whose message says what is wrong with the body (webargs' says only
        "Invalid JSON body.", under werkzeug's "The browser (or proxy) sent a request
        that this server could not understand."), the body the field at fault
        (``errors.body``), as for a body over the size limit."""
        if isinstance(error, RecursionError):
            why = "the body is JSON nested deeper than this service reads"
        elif isinstance(error, UnicodeDecodeError):
            why = "the body is not valid JSON: it is not UTF-8 text"
        elif str(error).startswith("JSON nested deeper than"):
            why = f"the body is {error}"
        else:
            why = f"the body is not valid JSON: {error}"
        abort(400, exc=error, message=why, errors={"body": [why]})


# No document of ours nests deeper than a few levels; far deeper ones would make
# Python's JSON encoder (hashing, storing a rejected item) hit its recursion limit.
MAX_JSON_DEPTH = 32


def _depth_judged_per_item(req: Request) -> bool:
    """Views whose items are judged one by one (``JSON_DEPTH_PER_ITEM``: the sync push)
    check depth per item: one item nested too deep must not make its whole batch a
    400 that a PDA would send again forever. Past what the JSON parser itself can
    read (a ``RecursionError``, near Python's recursion limit), the body is a 400."""
    # Out of their proxies (webargs passes ``request``'s): see ``courier_api.logs``.
    endpoint = getattr(req, "_get_current_object", lambda: req)().endpoint
    view = current_app._get_current_object().view_functions.get(endpoint or "")  # type: ignore[attr-defined]
    return bool(getattr(getattr(view, "view_class", None), "JSON_DEPTH_PER_ITEM", False))


class ApiBlueprint(Blueprint):
    ARGUMENTS_PARSER = JsonParser()

    def arguments(
        self, schema: Any, *, location: str = "json", **kwargs: Any
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """flask-smorest's, also documenting the 400 of a JSON body that does not parse.

        A schema class is made an instance once, here: webargs makes one per request
        from a class, copying each of its fields, and its nested schemas' again (60
        microseconds of a push's, before the nested ones). Loading keeps no state in
        a marshmallow 4 schema, so every request can share one."""
        if isinstance(schema, type) and issubclass(schema, ma.Schema):
            schema = schema()
        decorator = super().arguments(schema, location=location, **kwargs)
        if location in ("query", "querystring"):
            return _taking_query(decorator)
        if location != "json":
            return decorator

        def documented(view: Callable[..., Any]) -> Callable[..., Any]:
            view = self.alt_response(400, response="BAD_REQUEST")(decorator(view))
            return self.alt_response(415, response="UNSUPPORTED_MEDIA_TYPE")(view)

        return documented

    def alt_response(
        self, status_code: Any, **kwargs: Any
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """flask-smorest's, the response documented on the view itself rather than on one
        more wrapper around it: the wrapper only calls the view again (through
        ``current_app.ensure_sync``), and a push went through eight of them, some 10 us
        of its processor time. The documentation is flask-smorest's own, a copy."""
        documenting = super().alt_response(status_code, **kwargs)

        def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
            view._apidoc = documenting(view)._apidoc  # type: ignore[attr-defined]
            return view

        return decorator

    def auth(self, *roles: Role) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Require a valid access token (and one of ``roles`` when given); document 401/403."""

        def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
            view = require_auth(*roles)(self._refusing_unknown_query(view))
            view = self.alt_response(401, response="UNAUTHORIZED")(view)
            return self.alt_response(403, response="FORBIDDEN")(view)

        return decorator

    def public(self, view: Callable[..., Any]) -> Callable[..., Any]:
        """Mark a view as needing no token (overrides the API's default security)."""
        return self.probe(self._refusing_unknown_query(view))

    def _refusing_unknown_query(self, view: Callable[..., Any]) -> Callable[..., Any]:
        """A view with no query arguments answers a query parameter with the 422 webargs
        gives a view that has them (its parser refuses unknown ones): a misspelled filter
        sent to the wrong endpoint must not look obeyed. Checked after the caller's
        token, as every validation is. ``@blp.arguments(..., location="query")`` must
        sit below ``@blp.auth`` or ``@blp.public``, where every view has it."""
        if getattr(view, "_takes_query", False):
            return view
        return self.alt_response(422, response="UNPROCESSABLE_ENTITY")(_refusing_query(view))

    def probe(self, view: Callable[..., Any]) -> Callable[..., Any]:
        """A public view that takes whatever query it is sent: a load balancer's health
        check may add a parameter of its own (a cache buster), and a 422 would take the
        instance out of service."""
        return self.doc(security=[])(view)


def _taking_query(decorator: Callable[..., Any]) -> Callable[..., Any]:
    def marked(view: Callable[..., Any]) -> Callable[..., Any]:
        view = decorator(view)
        view._takes_query = True  # type: ignore[attr-defined]  # kept by functools.wraps
        return view

    return marked


def _refusing_query(view: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(view)
    def checked(*args: Any, **kwargs: Any) -> Any:
        req = request._get_current_object()  # type: ignore[attr-defined]  # once: see logs
        if req.query_string and req.args:
            abort(422, errors={"query": {name: ["Unknown field."] for name in req.args}})
        return view(*args, **kwargs)

    return checked


class PageArgs(ma.Schema):
    """Keyset pagination: pass the last id you saw as ``after``."""

    limit = ma.fields.Integer(
        load_default=100,
        validate=ma.validate.Range(min=1, max=MAX_PAGE_SIZE),
        metadata={"description": f"Items per page (1-{MAX_PAGE_SIZE})"},
    )


@dataclass(frozen=True)
class Walked:
    """What a walk through a list by id (``sync.paging.WalkCursor``: a proof search's,
    the rejected events') reads, as its fields' descriptions name it: the ``rows``
    (``deliveries``), one ``row`` (``delivery``) and its id (``event id``). Every walk's
    arguments and page fields are these, in the same words."""

    rows: str
    row: str
    row_id: str = "id"

    def args(self) -> tuple[Text, After]:
        """The query's ``cursor`` and the deprecated ``after``."""
        cursor = Text(
            metadata={
                "description": "The previous page's `next_cursor`, as received, with the "
                "same filters; omit it for a walk's first page"
            }
        )
        after = After(
            metadata={
                "deprecated": True,
                "description": f"Deprecated, use `cursor`: the last {self.row_id} of the "
                f"previous page (its `next_after`). Pages read so can miss a {self.row}: a "
                "push committing late holds an id among those already read (PostgreSQL), "
                "and no page after them reads it. Not with `cursor`",
            }
        )
        return cursor, after

    def page(self) -> tuple[ma.fields.Field, ...]:
        """The page's ``next_cursor``, ``as_of``, ``arrived_since`` and the deprecated
        ``next_after`` (``courier_api.api.pagination.walk_page``)."""
        next_cursor = ma.fields.String(
            allow_none=True,
            required=True,
            metadata={
                "description": f"When more {self.rows} of the walk follow: pass it as "
                "`cursor`, with the same filters, for the next page. Null on its last "
                "page, and on a page read with `after`"
            },
        )
        as_of = ma.fields.Integer(
            allow_none=True,
            required=True,
            metadata={
                "description": f"The highest {self.row_id} of a matching {self.row} when "
                "the walk began, the same on each of its pages: the walk reads the "
                f"matching {self.rows} up to it (0: none then). Null on a page read with "
                "`after`"
            },
        )
        arrived_since = ma.fields.Integer(
            allow_none=True,
            required=True,
            metadata={
                "description": f"Matching {self.rows} stored since the walk began (an id "
                "above `as_of`), counted when this page was read: in no page of this "
                "walk; search again without a cursor to see them. Null on a page read "
                "with `after`"
            },
        )
        next_after = ma.fields.Integer(
            allow_none=True,
            required=True,
            metadata={
                "deprecated": True,
                "description": f"Deprecated, use `next_cursor`: the last {self.row_id} of "
                f"a full page, to pass as `after` (which can miss a {self.row} committed "
                "late)",
            },
        )
        return next_cursor, as_of, arrived_since, next_after


class UserRef(ma.Schema):
    """A user as the reader may know them (``sync.pages.user_ref``)."""

    id = ma.fields.Integer(required=True)
    username = ma.fields.String(
        allow_none=True,
        required=True,
        metadata={
            "description": "null to a station's manager when the user is now another "
            "station's (SECURITY.md threat 3): known by `id` only, as the pages name "
            'them `user #<id>` or "a courier of another station"'
        },
    )
    full_name = ma.fields.String(
        allow_none=True, required=True, metadata={"description": "null as `username` is"}
    )
