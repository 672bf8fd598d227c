"""Pages for station managers and auditors: server-rendered HTML behind a session login.

A plain Flask blueprint under ``/web`` (not part of the OpenAPI document): Jinja
templates in ``courier_api/templates/web``, one stylesheet in
``courier_api/static``, no script. The views are thin: they read through the same
``sync`` services as the API, and ``sync.pages`` gathers what a page shows at once.
"""

from __future__ import annotations

import datetime as dt

from flask import Flask

from courier_api.config import ensure_secret_key

# A page session lasts a working day; the cookie's signature carries its age.
SESSION_LIFETIME = dt.timedelta(hours=12)


def init_app(app: Flask) -> None:
    from courier_api.web.views import bp

    ensure_secret_key(app.config)
    app.config.update(
        SESSION_COOKIE_NAME="courier_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=app.config["APP_ENV"] == "production",
        PERMANENT_SESSION_LIFETIME=SESSION_LIFETIME,
    )
    app.register_blueprint(bp)
