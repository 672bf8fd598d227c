"""Signing in to the pages: a signed session cookie, re-checked on every page, and CSRF.

The session is Flask's signed cookie (``SECRET_KEY``; HttpOnly, SameSite=Strict, and in
production, served over HTTPS, Secure and named ``__Host-courier_session``). It holds
the user id, the account's credentials version (the ``ver`` of tokens) and a
per-session CSRF secret. Every page loads the account
again through ``sync.accounts.load_token_subject``, as every API request does with
its token: a disabled account or a changed password ends the session at once.

Every POST form carries the session's CSRF secret in a hidden field; a POST
without it, or with another value, is refused (400) before anything else runs.
SameSite=Strict already keeps the cookie off cross-site requests; the token also covers
browsers that ignore it and same-site attackers (another app on the same host).

SameSite=Strict, not Lax: a link on another site to a page (a proof's, whose reading an
auditor's session puts on record) comes without the session, so the browser lands on
the sign-in page. That page must not answer with a session cookie, which would replace
the session the browser holds but withheld (every link from elsewhere would sign its
viewer out): the sign-in form's CSRF secret is a cookie of its own
(``LOGIN_COOKIE_NAME``, a double-submit token: SameSite=Strict, and ``__Host-`` in
production so that no sibling host can plant one), the session is left alone. Signing
in there keeps the CSRF secret of the same account's session the browser still holds
(``sign_in``): the forms open in its other tabs still go through.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from flask import Response, current_app, flash, g, redirect, request, session, url_for
from werkzeug.exceptions import BadRequest, Forbidden

from courier_api.auth import Principal
from courier_api.extensions import db
from courier_api.web import SESSION_LIFETIME
from models import Role, User, utcnow
from sync.accounts import (
    load_token_subject,
    page_session_ended,
    page_session_start,
    sign_out_of_pages,
)
from sync.errors import AuthenticationFailed, PermissionDenied

log = logging.getLogger(__name__)

USER_KEY = "user_id"
VERSION_KEY = "credentials_version"
SIGNED_IN_KEY = "signed_in_at"  # seconds since the epoch: the session's start
CSRF_KEY = "csrf"
CSRF_FIELD = "csrf_token"
# Who may use the pages; couriers use their PDA, integrations the API.
PAGE_ROLES = frozenset({Role.STATION_MANAGER, Role.ADMIN, Role.AUDITOR})
# Who may act on what the pages show (resolve flags, sign shifts off).
DECIDERS = frozenset({Role.STATION_MANAGER, Role.ADMIN})


class CsrfRefused(BadRequest):
    description = (
        "This form was refused: its security token is missing or out of date (the "
        "session may have ended in the meantime). Go back, reload the page and send "
        "it again."
    )


class SignInCookieNotKept(CsrfRefused):
    """The sign-in form came back without its cookie over plain http, in production:
    the browser keeps no Secure (``__Host-``) cookie there, so reloading changes
    nothing, and "out of date" would send the viewer round in circles."""

    description = (
        "This browser sent back no sign-in cookie. With APP_ENV=production the pages' "
        "cookies are Secure: a browser keeps them only over HTTPS, and this page was "
        "reached over plain http. Open the pages at their https:// address (behind a "
        "proxy terminating TLS, set TRUSTED_PROXY_HOPS); cookies must be allowed too."
    )


class SignInFormReplaced(CsrfRefused):
    """A sign-in form whose token is not the login cookie the browser holds: two tabs
    asked for the sign-in page at once (a browser restoring its tabs the morning
    after), neither holding a login cookie yet, so each form got a token of its own and
    the browser kept the last answer's cookie. The form is shown again with that
    cookie's token (``views.refuse_forged_posts``), nobody signed in by it: "go back,
    reload" lost what was typed, and the tab in front is seldom the last one loaded."""

    description = (
        "This sign-in form was out of date: the sign-in page was opened again in another "
        "tab. Type the password again here."
    )


class PostedFromElsewhere(Forbidden):
    """A form the browser says another site posted (``started_elsewhere``): refused
    whatever token it carries. Over plain http the login cookie is no ``__Host-``
    cookie, so a sibling host (another app at another subdomain, same-site to a
    browser) could set one with a value of its own and post it with its account's
    password: the browser signed in as that account (a sign-in CSRF). Our own pages'
    forms are ``same-origin``."""

    description = (
        "This form was refused: the browser says it was started on another site, not "
        "on these pages. Open the pages yourself and send the form from there."
    )


@dataclass(frozen=True)
class Viewer:
    """Who is looking at a page."""

    user: User
    principal: Principal

    @property
    def role(self) -> Role:
        return self.principal.role

    @property
    def may_decide(self) -> bool:
        return self.role in DECIDERS

    @property
    def is_auditor(self) -> bool:
        return self.role == Role.AUDITOR


def csrf_token() -> str:
    """The session's CSRF secret, created on first use (the login page's form too)."""
    token: str | None = session.get(CSRF_KEY)
    if not token:
        token = secrets.token_urlsafe(32)
        session[CSRF_KEY] = token
    return token


def check_csrf() -> None:
    _compare(session.get(CSRF_KEY) or "")


def login_csrf_token() -> str:
    """The sign-in form's CSRF secret: the browser's login cookie, or a new one; either
    is set on the answer by ``keep_login_csrf``, for ``SESSION_LIFETIME`` from now. The
    session is not touched (see above). Renewed, not only reused: a cookie set by a
    sign-in page shown nearly that long ago (a link from elsewhere, its viewer signed in
    already) expired as the password was typed into the form shown at the session's end.
    """
    token = request.cookies.get(current_app.config["LOGIN_COOKIE_NAME"]) or g.get("login_csrf")
    token = g.login_csrf = token or secrets.token_urlsafe(32)
    return token


def keep_login_csrf(response: Response) -> None:
    """Set the login cookie of this answer's form, if it has one."""
    token = g.get("login_csrf")
    if token:
        response.set_cookie(
            current_app.config["LOGIN_COOKIE_NAME"],
            token,
            max_age=int(SESSION_LIFETIME.total_seconds()),
            path="/",
            secure=current_app.config["SESSION_COOKIE_SECURE"],
            httponly=True,
            samesite="Strict",
        )


def check_login_csrf() -> None:
    """The sign-in form's secret is its login cookie's; a form posted from a page of a
    session (signed in already, in another tab) may carry the session's.

    The login cookie outlives a sign-in (it expires by itself): two tabs showing the
    sign-in form (a session over at 19:00) both sign in, the second's form no longer
    refused for a cookie the first had spent. It only ever lets a same-site form sign
    in (SameSite=Strict, ``__Host-`` in production).

    A form whose token is not the cookie the browser holds (two tabs asked for the
    sign-in page at once) is ``SignInFormReplaced``: shown again, not signed in."""
    kept = request.cookies.get(current_app.config["LOGIN_COOKIE_NAME"]) or ""
    sent = request.form.get(CSRF_FIELD, "")
    if kept and hmac.compare_digest(sent.encode(), kept.encode()):
        return
    try:
        check_csrf()
    except CsrfRefused:
        if not kept and current_app.config["SESSION_COOKIE_SECURE"] and not _over_https():
            log.warning(
                "a sign-in form came back without its cookie over plain http with "
                "APP_ENV=production: browsers keep the pages' Secure cookies over HTTPS "
                "only (behind a proxy terminating TLS, set TRUSTED_PROXY_HOPS)"
            )
            raise SignInCookieNotKept() from None
        if kept:
            raise SignInFormReplaced() from None
        raise


def _over_https() -> bool:
    """Whether the browser reached us over HTTPS, as far as a message can tell: the
    request's scheme, or a proxy's ``X-Forwarded-Proto`` (read here to choose words, not
    trusted for anything; ``TRUSTED_PROXY_HOPS`` unset, the scheme says http behind a
    proxy terminating TLS, where the cookie missing is something else)."""
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[-1].strip().lower()
    return request.is_secure or forwarded == "https"


def _compare(expected: str) -> None:
    sent = request.form.get(CSRF_FIELD, "")
    if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise CsrfRefused()


def sign_in(user: User) -> None:
    """A new session for ``user``: nothing from the anonymous one survives (fixation).

    But the CSRF secret of a session of ``user``'s own that the browser sent, still
    good: signing in on the page a link from elsewhere landed on (the SameSite=Strict
    session withheld from that link, sent with the form), the forms open in the
    browser's other tabs (a sign-off note typed out) go through still; a new secret
    refused each with a 400 page. Another account's, or a session ended, gives none."""
    held = session.get(CSRF_KEY) if _still_signed_in_as(user) else None
    session.clear()
    session.permanent = True
    session[USER_KEY] = user.id
    session[VERSION_KEY] = user.credentials_version
    start = page_session_start(user, dt.datetime.fromtimestamp(time.time(), dt.UTC))
    session[SIGNED_IN_KEY] = start.timestamp()  # to the microsecond: see sign_out
    session[CSRF_KEY] = held if isinstance(held, str) and held else secrets.token_urlsafe(32)


def _still_signed_in_as(user: User) -> bool:
    """Whether the session sent is ``user``'s, and ``_load_viewer`` would take it: the
    same credentials, within its working day, not ended by a sign-out since."""
    if session.get(USER_KEY) != user.id or session.get(VERSION_KEY) != user.credentials_version:
        return False
    started = session.get(SIGNED_IN_KEY)
    if not isinstance(started, int | float):
        return False
    if time.time() - started > SESSION_LIFETIME.total_seconds():
        return False
    return not page_session_ended(user, dt.datetime.fromtimestamp(started, dt.UTC))


def sign_out() -> None:
    session.clear()


def sign_out_everywhere() -> None:
    """Sign out, and end every other page session of the account begun before now,
    a copy of this session's cookie included. (A session signed in again in the same
    second stands: its start is kept to the microsecond.) A session already over
    signs nobody out: a copy of a cookie its owner signed out of cannot end the
    owner's next session."""
    viewer = _load_viewer()
    if viewer is not None:
        sign_out_of_pages(session=db.session, user_id=viewer.user.id, at=utcnow())
        db.session.commit()
    sign_out()


def _load_viewer() -> Viewer | None:
    """The signed-in account, checked again now; None (and the session ended) if it no
    longer may use the pages."""
    user_id, version = session.get(USER_KEY), session.get(VERSION_KEY)
    if not isinstance(user_id, int) or not isinstance(version, int):
        return None
    # The cookie is signed again on every page, so its own age only times out a session
    # left idle: a busy one ends a working day after signing in all the same.
    kept_start = session.get(SIGNED_IN_KEY)
    signed_in_at = kept_start if isinstance(kept_start, int | float) else None
    if signed_in_at is not None and time.time() - signed_in_at > SESSION_LIFETIME.total_seconds():
        sign_out()
        flash("Your session ended a working day after you signed in: sign in again.", "error")
        return None
    try:
        user, _ = load_token_subject(
            session=db.session, user_id=user_id, device_id=None, credentials_version=version
        )
    except AuthenticationFailed:
        sign_out()
        flash(
            "You were signed out: the account was disabled or its password changed "
            "since you signed in.",
            "error",
        )
        return None
    started = None if signed_in_at is None else dt.datetime.fromtimestamp(signed_in_at, dt.UTC)
    if page_session_ended(user, started):
        sign_out()
        flash("You were signed out: this account signed out of the pages since.", "error")
        return None
    if signed_in_at is None:  # signed in before sessions kept their start: from now
        session[SIGNED_IN_KEY] = time.time()
    if user.role not in PAGE_ROLES:
        sign_out()
        flash("You were signed out: your account may no longer use these pages.", "error")
        return None
    return Viewer(user=user, principal=Principal.of(user))


# What a browser's ``Sec-Fetch-Site`` says of a request another site started: a link or
# an image on a page of another site, or of a sibling host of the same site (another
# subdomain), which SameSite=Strict does not tell from ours.
STARTED_ELSEWHERE = frozenset({"same-site", "cross-site"})


def started_elsewhere() -> bool:
    """Whether the browser says another site started this request (fetch metadata; a
    browser that sends none is taken at its cookies, SameSite=Strict)."""
    return request.headers.get("Sec-Fetch-Site", "").lower() in STARTED_ELSEWHERE


def page(*roles: Role) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Require a signed-in viewer (and one of ``roles`` when given).

    Not signed in: to the login page, coming back here afterwards (GET). A role that
    may not do this: 403. ``ensure_station_access`` and ``ensure_visible`` work in these
    views as in the API's: the viewer is ``g.principal`` too.

    A request another site started (``started_elsewhere``) is answered as one without a
    session, whatever cookie came: SameSite=Strict keeps the session off a link from
    another site, not off one from a sibling host of the same site (another subdomain),
    nor an image its page embeds, and an auditor following one put a read of a proof
    on record in their name unknowingly. The page opens once they sign in.
    """
    allowed = frozenset(roles) or PAGE_ROLES

    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            viewer = None if started_elsewhere() else _load_viewer()
            if viewer is None:
                target = request.full_path.rstrip("?") if request.method == "GET" else None
                return redirect(url_for("web.login", next=target))
            g.viewer = viewer
            g.principal = viewer.principal
            if viewer.role not in allowed:
                raise PermissionDenied(
                    f"{viewer.role.value.replace('_', ' ')}s may not do this",
                    code="role_forbidden",
                )
            return view(*args, **kwargs)

        return wrapper

    return decorator


def safe_next(target: str | None) -> str | None:
    """``target`` if it is a page of ours (no open redirect), else None. Not one with a
    control character either: a line break cannot go into the redirect's header, and
    the redirect failed with a 500 after signing in."""
    if not target or "\\" in target or any(ord(ch) < 32 or ord(ch) == 127 for ch in target):
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith("/web/"):
        return None
    return target
