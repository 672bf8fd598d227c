"""The application factory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, redirect, request
from swagger_ui_bundle import swagger_ui_path
from werkzeug.middleware.proxy_fix import ProxyFix

from courier_api import logs, metrics
from courier_api.api.fields import IdConverter, id_converter_schema
from courier_api.bodies import CourierRequest
from courier_api.config import ensure_jwt_secret, load_config, validate_config
from sync import audit

API_TITLE = "Courier field API"

docs_assets = Blueprint(
    "docs_assets", __name__, static_folder=str(swagger_ui_path), static_url_path="/docs/assets"
)
API_VERSION = "1.0.0"


# Runs of a request PostgreSQL aborts for a deadlock or a serialization failure.
REQUEST_ATTEMPTS = 3


class CourierFlask(Flask):
    """Flask, its views run again when PostgreSQL aborted them for a conflict with
    concurrent work and a second run is exactly the first's replacement
    (``Database.dispatched_retrying_conflicts``): in one place, for every view."""

    def dispatch_request(self) -> Any:
        from courier_api.extensions import db

        dispatch = super().dispatch_request
        return db.dispatched_retrying_conflicts(dispatch, attempts=REQUEST_ATTEMPTS)


def create_app(overrides: dict[str, Any] | None = None) -> Flask:
    """Build the app from the environment, then ``overrides`` (tests use them)."""
    app = CourierFlask(__name__, instance_relative_config=True)
    app.request_class = CourierRequest  # chunked bodies held to MAX_REQUEST_BYTES too
    instance_path = default_instance_path(app)
    app.instance_path = str(instance_path)
    app.config.update(load_config(os.environ, instance_path))
    app.config.update(overrides or {})
    validate_config(app.config)
    logs.configure_logging(app.config["LOG_LEVEL"], app.config["LOG_FORMAT"])
    app.config["TESTING"] = app.config["APP_ENV"] == "testing" or app.config.get("TESTING", False)
    ensure_jwt_secret(app.config, instance_path)
    app.config.update(_openapi_settings())
    if app.config["TRUSTED_PROXY_HOPS"]:
        # The client's address (rate limits, logs) from X-Forwarded-For, as written by
        # that many proxies of ours; never trusted otherwise (anyone can send it).
        hops = app.config["TRUSTED_PROXY_HOPS"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]

    register_extensions(app)
    register_blueprints(app)
    register_errorhandlers(app)
    register_commands(app)
    return app


def default_instance_path(app: Flask | None = None) -> Path:
    """``INSTANCE_PATH``, else Flask's instance folder of this package."""
    configured = os.environ.get("INSTANCE_PATH")
    if configured:
        return Path(configured)
    return Path((app or Flask(__name__, instance_relative_config=True)).instance_path)


def register_extensions(app: Flask) -> None:
    from courier_api.extensions import api, db

    logs.init_app(app)  # request ids, one access line per request
    # Every audit entry a request writes keeps its client's address (sync.audit.CLIENT_IP).
    app.before_request(_audit_client_ip)
    app.teardown_request(_no_audit_client_ip)
    metrics.init_app(app)  # /metrics
    db.init_app(app)
    app.url_map.converters["id"] = IdConverter
    api.init_app(app)
    api.register_converter(IdConverter, id_converter_schema)
    api.spec.components.security_scheme(
        "bearerAuth", {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    )


def _audit_client_ip() -> None:
    audit.CLIENT_IP.set(audit.client_ip(request.remote_addr))


def _no_audit_client_ip(_error: BaseException | None = None) -> None:
    """Out of a request (the next one on this thread sets its own), no address."""
    audit.CLIENT_IP.set(None)


def register_blueprints(app: Flask) -> None:
    from courier_api.api.registry import BLUEPRINTS
    from courier_api.extensions import api

    for blueprint in BLUEPRINTS:
        api.register_blueprint(blueprint)
    app.register_blueprint(docs_assets)
    # The pages for station managers and auditors (/web/...): not part of the OpenAPI.
    from courier_api.web import init_app as register_pages

    register_pages(app)
    # A person opening the printed URL in a browser lands on the API docs.
    app.add_url_rule("/", "index", lambda: redirect("/docs"))


def register_errorhandlers(app: Flask) -> None:
    from courier_api.errors import register_errorhandlers as register

    register(app)


def register_commands(app: Flask) -> None:
    from courier_api.cli import register_commands as register

    register(app)


def _openapi_settings() -> dict[str, Any]:
    return {
        "API_TITLE": API_TITLE,
        "API_VERSION": API_VERSION,
        "OPENAPI_VERSION": "3.0.3",
        "OPENAPI_URL_PREFIX": "/",
        "OPENAPI_JSON_PATH": "openapi.json",
        "OPENAPI_SWAGGER_UI_PATH": "/docs",
        # Swagger UI ships in a wheel (swagger-ui-bundle): /docs works with no internet.
        "OPENAPI_SWAGGER_UI_URL": "/docs/assets/",
        "API_SPEC_OPTIONS": {
            "security": [{"bearerAuth": []}],
            "info": {
                "description": "Backs couriers' PDAs, station managers and auditors. "
                "Errors share one body: code (stable), status, message, errors (per field)."
            },
        },
    }
