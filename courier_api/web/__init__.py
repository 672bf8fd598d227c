"""Pages for station managers and auditors: server-rendered HTML behind a session login.

A plain Flask blueprint under ``/web`` (not part of the OpenAPI document): Jinja
templates in ``courier_api/templates/web``, one stylesheet in
``courier_api/static``, no script. The views are thin: they read through the same
``sync`` services as the API, and ``sync.pages`` gathers what a page shows at once.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask import Flask
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface

from courier_api.config import ensure_secret_key

# A page session lasts a working day; the cookie's signature carries its age.
SESSION_LIFETIME = dt.timedelta(hours=12)
SESSION_COOKIE = "courier_session"
# Served over HTTPS (production), the cookie's name carries the ``__Host-`` prefix: a
# browser then takes it only Secure, for the whole host (Path=/) and no other (no
# Domain), so neither a sibling subdomain nor a page over plain http can plant one.
SECURE_SESSION_COOKIE = "__Host-" + SESSION_COOKIE
# The sign-in form's CSRF secret, kept apart from the session (``web.session``).
LOGIN_COOKIE = "courier_login"
SECURE_LOGIN_COOKIE = "__Host-" + LOGIN_COOKIE


class CookieSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, a request sending no session cookie (every API
    request, a PDA's push) given its empty session without more: Flask builds the
    cookie's signing serializer (itsdangerous' serializer and signer) for every request
    first, and looks the cookie up with a ``get`` that raises and catches a
    ``KeyError`` when it is not there, about 1 % of a one-scan push's instructions."""

    def open_session(self, app: Flask, request: Any) -> SecureCookieSession | None:
        if app.secret_key and self.get_cookie_name(app) not in request.cookies:
            return self.session_class()
        return super().open_session(app, request)


def init_app(app: Flask) -> None:
    from courier_api.web.views import bp

    app.session_interface = CookieSessions()
    ensure_secret_key(app.config)
    https = app.config["APP_ENV"] == "production"
    app.config.update(
        # Development (``make run``) is plain http, where a browser refuses a Secure
        # cookie and so a ``__Host-`` one.
        SESSION_COOKIE_NAME=SECURE_SESSION_COOKIE if https else SESSION_COOKIE,
        LOGIN_COOKIE_NAME=SECURE_LOGIN_COOKIE if https else LOGIN_COOKIE,
        SESSION_COOKIE_HTTPONLY=True,
        # Strict, not Lax: a link on another site (a mail, a chat) opening a proof's page
        # comes without the session, so it cannot record a ``proof_read`` in the
        # auditor's name; the auditor signs in, and the page opens then.
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=https,
        SESSION_COOKIE_PATH="/",
        SESSION_COOKIE_DOMAIN=None,
        PERMANENT_SESSION_LIFETIME=SESSION_LIFETIME,
    )
    app.register_blueprint(bp)
