"""The station pages through Flask's test client: sign-in, access, CSRF, what each page
shows, the images route, audit logging and the CSV export (the browser tests in
``tests/browser`` drive the same pages in Chromium)."""

from __future__ import annotations

import datetime as dt
import functools
import re
import time
from html import escape as html_escape
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.test import TestResponse

import courier_api
from courier_api.extensions import api
from courier_api.web import session as web_session
from courier_api.web.forms import seq_ranges_typed
from courier_api.web.views import clock_on, seq_ranges
from models import (
    AuditEntry,
    Blob,
    Consent,
    Device,
    EventType,
    Flag,
    FlagSeverity,
    FlagStatus,
    Parcel,
    QuarantinedEvent,
    Role,
    ScanEvent,
    SeqWriteOff,
    Shift,
    ShiftStatus,
    SyncBatch,
    User,
    utcnow,
)
from sync import flags, shifts, sweeps
from sync.blobs import FileBlobStore
from sync.ingest import Pusher
from sync.proofs import drop_consents, get_proof
from sync.quarantine import parcel_named
from sync.rules import Policy
from sync.shifts import ShiftRules, day_bounds, station_clock
from sync.sweeps import SweepSettings
from tests import factories
from tests.browser import station_day
from tests.browser.station_day import StationDay
from tests.conftest import Auth
from tests.courier_api.test_consent_requests_api import standing_consent
from tests.exports import exported

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


class Pages:
    """A browser's worth of cookies on the pages, signing in through the form."""

    def __init__(self, client: FlaskClient) -> None:
        self.client = client

    def login(self, username: str, password: str = factories.PASSWORD, **extra: str) -> Any:
        form = self.client.get("/web/login").get_data(as_text=True)
        token = CSRF.search(form)
        assert token, form
        return self.client.post(
            "/web/login",
            data={"csrf_token": token.group(1), "username": username, "password": password}
            | extra,
        )

    def token(self) -> str:
        with self.client.session_transaction() as session:
            return str(session["csrf"])

    def post(self, path: str, **form: str) -> TestResponse:
        return self.client.post(path, data={"csrf_token": self.token(), **form})

    def get(self, path: str, status: int = 200) -> str:
        response = self.client.get(path)
        assert response.status_code == status, (path, response.status_code, response.location)
        return response.get_data(as_text=True)

    def forms_posting_to(self, html: str) -> list[str]:
        return re.findall(r'<form method="post" action="([^"]+)"', html)

    def submit(self, html: str, action: str, **typed: str) -> TestResponse:
        """Post the page's form to ``action`` as a browser does: its hidden fields as the
        page wrote them, and what was typed."""
        form = re.search(
            rf'<form method="post" action="{re.escape(action)}">(.*?)</form>', html, re.S
        )
        assert form, f"no form posting to {action}"
        hidden = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form.group(1))
        return self.client.post(action, data=dict(hidden) | typed)


@pytest.fixture
def day(session: Session, app: Flask) -> StationDay:
    return station_day.build(session, app.config["BLOB_DIR"], history_days=0)


def signed_in(app: Flask, username: str) -> Pages:
    pages = Pages(app.test_client())
    response = pages.login(username)
    assert response.status_code == 302, response.get_data(as_text=True)
    return pages


def audit_actions(session: Session) -> list[tuple[str, str, int | None]]:
    return [
        (e.action, e.subject_key, e.actor_id)
        for e in session.scalars(select(AuditEntry).order_by(AuditEntry.id))
    ]


# -- signing in -------------------------------------------------------------------------------


def test_a_manager_signs_in_and_gets_a_hardened_session_cookie(
    app: Flask, day: StationDay
) -> None:
    pages = Pages(app.test_client())
    login = pages.get("/web/login")
    assert 'href="/docs"' in login and 'name="csrf_token"' in login
    response = pages.login("manager")
    assert response.status_code == 302 and response.location == "/web/board"
    cookie = next(c for c in response.headers.getlist("Set-Cookie") if "courier_session=" in c)
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Secure" not in cookie  # only when APP_ENV=production
    assert cookie.startswith("courier_session=")  # plain http (make run): no __Host-
    board = pages.get("/web/board")
    assert "Wang Fang · station manager" in board


def test_the_session_cookie_is_secure_in_production(app_with: Any) -> None:
    production = app_with(APP_ENV="production", SECRET_KEY="")
    assert production.config["SESSION_COOKIE_SECURE"] is True
    assert len(production.config["SECRET_KEY"]) == 64  # derived from JWT_SECRET by HMAC
    assert production.config["SECRET_KEY"] != production.config["JWT_SECRET"]


def test_in_production_the_session_cookie_is_a_host_cookie_sent_same_site_only(
    app_with: Any, session: Session
) -> None:
    """Over HTTPS the cookie is ``__Host-`` (Secure, Path=/, no Domain: a browser takes
    it so or not at all, and no sibling subdomain can plant or shadow one) and
    SameSite=Strict: a link from another site (a mail) opening a proof's page comes
    without it, so it cannot record a read of the proof in an auditor's name (Lax sent
    the cookie with every top-level navigation)."""
    production = app_with(APP_ENV="production")
    station_day.build(session, production.config["BLOB_DIR"], history_days=0)
    client = production.test_client()
    client.environ_base["wsgi.url_scheme"] = "https"  # served over HTTPS, as a browser sees it
    pages = Pages(client)
    response = pages.login("auditor")
    assert response.status_code == 302, response.get_data(as_text=True)
    cookie = next(c for c in response.headers.getlist("Set-Cookie") if "courier_session=" in c)
    attributes = [part.strip() for part in cookie.split(";")]
    assert attributes[0].startswith("__Host-courier_session=")
    assert {"Secure", "HttpOnly", "Path=/", "SameSite=Strict"} <= set(attributes)
    assert not any(part.lower().startswith("domain=") for part in attributes)
    board = pages.client.get("/web/board")
    assert board.status_code == 200, board.location  # the session came back under its name


def test_signing_in_returns_to_the_page_asked_for_and_never_off_site(
    app: Flask, day: StationDay
) -> None:
    pages = Pages(app.test_client())
    response = pages.client.get(f"/web/shifts/{day.unbalanced.id}")
    assert response.status_code == 302
    assert response.location == f"/web/login?next=/web/shifts/{day.unbalanced.id}"
    response = pages.login("manager", next=f"/web/shifts/{day.unbalanced.id}")
    assert response.location == f"/web/shifts/{day.unbalanced.id}"
    for target in ("https://evil.example/web/board", "//evil.example/web/board", "/docs"):
        other = Pages(app.test_client())
        assert other.login("manager", next=target).location == "/web/board"


@pytest.mark.parametrize("target", ["/web/board\r\nX-Injected: 1", "/web/board\n", "/web/\x00"])
def test_a_return_address_with_a_line_break_is_no_error_after_signing_in(
    app: Flask, day: StationDay, target: str
) -> None:
    """A link to the sign-in page whose ``next`` held a line break (``%0d%0a``) passed as a
    page of ours, and the redirect to it failed (a header may hold no line break): the
    manager, signed in, got the 500 page and the log an error with its traceback, from
    a link anyone may send. Such a ``next`` is ignored, as one off the site is."""
    pages = Pages(app.test_client())
    assert pages.login("manager", next=target).location == "/web/board"
    response = pages.client.get("/web/login", query_string={"next": target})
    assert (response.status_code, response.location) == (302, "/web/board")


@pytest.mark.parametrize(
    ("username", "password", "status", "message"),
    [
        ("manager", "wrong-password", 401, "Wrong username or password."),
        ("nobody", factories.PASSWORD, 401, "Wrong username or password."),
        ("liwei", factories.PASSWORD, 403, "Couriers sign in on their PDA."),
        (
            "recipient-app",
            factories.PASSWORD,
            403,
            "This account is for systems that use the API.",
        ),
    ],
)
def test_who_may_not_sign_in_is_told_why(
    app: Flask, day: StationDay, username: str, password: str, status: int, message: str
) -> None:
    pages = Pages(app.test_client())
    response = pages.login(username, password)
    assert response.status_code == status
    assert message in response.get_data(as_text=True)
    assert pages.client.get("/web/board").status_code == 302  # not signed in


def test_logout_is_a_post_and_ends_the_session(app: Flask, day: StationDay) -> None:
    pages = signed_in(app, "manager")
    assert pages.client.get("/web/logout").status_code == 405
    response = pages.post("/web/logout")
    assert response.status_code == 302 and response.location == "/web/login"
    assert "You are signed out." in pages.get("/web/login")
    assert pages.client.get("/web/board").status_code == 302


def test_signing_out_ends_a_copy_of_the_session_cookie_too(
    app: Flask, session: Session, day: StationDay
) -> None:
    """A cookie copied from a shared computer stops working when its owner signs out;
    signing in again at once works, and the account's API tokens are left alone."""
    pages = signed_in(app, "manager")
    copy = Pages(app.test_client())
    cookie = pages.client.get_cookie("courier_session")
    assert cookie is not None
    copy.client.set_cookie("courier_session", cookie.value)
    assert copy.client.get("/web/board").status_code == 200
    pages.post("/web/logout")
    response = copy.client.get("/web/board")
    assert response.status_code == 302 and response.location.startswith("/web/login")
    assert "this account signed out of the pages since" in copy.get("/web/login")
    again = signed_in(app, "manager")  # within the same second
    assert again.client.get("/web/board").status_code == 200
    assert copy.client.get("/web/board").status_code == 302
    token = app.test_client().post(
        "/api/v1/auth/token", json={"username": "manager", "password": factories.PASSWORD}
    )
    assert token.status_code == 200
    session.expire_all()
    assert day.manager.credentials_version == 0  # tokens stand


def test_a_session_already_ended_cannot_sign_the_account_out_again(
    app: Flask, session: Session, day: StationDay
) -> None:
    """The copy of a cookie left on a shared computer is over once its owner signs out:
    its sign-out button (a stale page, or whoever holds the copy) must not end the
    owner's new session, again and again."""
    pages = signed_in(app, "manager")
    copy = Pages(app.test_client())
    cookie = pages.client.get_cookie("courier_session")
    assert cookie is not None
    copy.client.set_cookie("courier_session", cookie.value)
    pages.post("/web/logout")
    assert copy.client.get("/web/board").status_code == 302  # the copy is over
    copy.client.set_cookie("courier_session", cookie.value)  # still held
    again = signed_in(app, "manager")
    assert again.client.get("/web/board").status_code == 200
    copy.post("/web/logout")
    assert again.client.get("/web/board").status_code == 200


def test_a_sign_out_stamped_by_a_clock_running_ahead_ends_only_the_sessions_before(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Another server's clock a few seconds ahead stamped the sign-out: the session
    signed in right after it stands, one from before does not."""
    before = signed_in(app, "manager")
    day.manager.pages_signed_out_at = utcnow() + dt.timedelta(seconds=5)
    session.commit()
    after = signed_in(app, "manager")
    assert after.client.get("/web/board").status_code == 200
    assert before.client.get("/web/board").status_code == 302


def test_a_session_from_before_sessions_kept_their_start_ends_with_a_sign_out(
    app: Flask, session: Session, day: StationDay
) -> None:
    pages = signed_in(app, "manager")
    with pages.client.session_transaction() as cookie:
        del cookie[web_session.SIGNED_IN_KEY]
    day.manager.pages_signed_out_at = utcnow() - dt.timedelta(days=30)
    session.commit()
    assert pages.client.get("/web/board").status_code == 302


def test_a_session_ends_a_working_day_after_signing_in_however_busy(
    app: Flask, day: StationDay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every page signs the cookie again, so its own age only ends an idle session; the
    time of signing in ends a busy one 12 hours on."""
    signed = time.time()
    pages = signed_in(app, "manager")
    for hours, status in ((6, 200), (11.9, 200), (12.1, 302)):
        clock = SimpleNamespace(time=lambda hours=hours: signed + hours * 3600)
        monkeypatch.setattr(web_session, "time", clock)
        assert pages.client.get("/web/board").status_code == status, hours
    assert "ended a working day after you signed in" in pages.get("/web/login")
    monkeypatch.undo()
    assert pages.client.get("/web/board").status_code == 302  # the session is gone


def test_a_session_from_before_sessions_kept_their_start_is_not_ended_by_it(
    app: Flask, day: StationDay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deploy signs nobody out: a session without its start counts from then on."""
    pages = signed_in(app, "manager")
    with pages.client.session_transaction() as cookie:
        del cookie[web_session.SIGNED_IN_KEY]
    assert pages.client.get("/web/board").status_code == 200
    later = time.time() + 12.1 * 3600
    monkeypatch.setattr(web_session, "time", SimpleNamespace(time=lambda: later))
    assert pages.client.get("/web/board").status_code == 302


# A page's rows, or an export's lines, by their id.
ROWS = re.compile(r'<tr id="((?:flag|proof)-\d+)"|^(\d+),', re.MULTILINE)


@pytest.mark.parametrize(
    ("query", "shows"),
    [
        ("/web/flags?raised_to=9999-12-31", "all"),
        ("/web/flags?raised_from=0001-01-01", "all"),
        ("/web/proofs?occurred_to=9999-12-31", "all"),
        ("/web/proofs?occurred_from=0001-01-01&occurred_to=9999-12-31", "all"),
        ("/web/proofs/export.csv?occurred_from=0001-01-01", "all"),
        ("/web/flags?raised_from=9999-12-31", "none"),
        ("/web/proofs?occurred_from=9999-12-31", "none"),
        ("/web/proofs/export.csv?occurred_from=9999-12-31", "none"),
    ],
)
def test_a_date_at_the_calendars_edge_bounds_the_range_as_it_says(
    app: Flask, day: StationDay, query: str, shows: str
) -> None:
    """A bound that is no datetime in UTC is the calendar's edge: no 500."""
    pages = signed_in(app, "auditor")
    everything = ROWS.findall(pages.get(query.split("?")[0]))
    assert everything  # the station's day has flags and proofs
    assert ROWS.findall(pages.get(query)) == (everything if shows == "all" else [])


@pytest.mark.parametrize("change", ["password", "disabled", "role"])
def test_the_session_ends_when_the_account_changes(
    app: Flask, session: Session, day: StationDay, change: str
) -> None:
    pages = signed_in(app, "manager")
    pages.get("/web/board")
    if change == "password":
        day.manager.credentials_version += 1  # what a password change does
    elif change == "disabled":
        day.manager.active = False
    else:
        day.manager.role = Role.COURIER
    session.commit()
    response = pages.client.get("/web/board")
    assert response.status_code == 302 and response.location.startswith("/web/login")
    assert "You were signed out" in pages.get("/web/login")
    assert pages.client.get("/web/board").status_code == 302  # the session is gone


# -- CSRF -------------------------------------------------------------------------------------


def test_a_post_without_the_session_csrf_token_is_refused(
    app: Flask, session: Session, day: StationDay
) -> None:
    anonymous = Pages(app.test_client())
    response = anonymous.client.post(
        "/web/login", data={"username": "manager", "password": factories.PASSWORD}
    )
    assert response.status_code == 400
    assert "security token is missing or out of date" in response.get_data(as_text=True)

    pages = signed_in(app, "manager")
    flag = day.flag(session, "unauthorized_locker_drop")
    path = f"/web/flags/{flag.id}/resolve"
    for data in ({"note": "x"}, {"note": "x", "csrf_token": "forged"}):
        response = pages.client.post(path, data=data)
        assert response.status_code == 400
        assert "text/html" in response.content_type
    other = signed_in(app, "manager")  # another session's token does not do either
    response = pages.client.post(path, data={"note": "x", "csrf_token": other.token()})
    assert response.status_code == 400
    session.refresh(flag)
    assert flag.status == FlagStatus.OPEN


def test_the_sign_in_page_leaves_the_session_alone_and_its_form_has_a_cookie_of_its_own(
    app: Flask, day: StationDay
) -> None:
    """A link from another site comes without the SameSite=Strict session, and lands on
    the sign-in page: had that page answered with a session cookie (its form's CSRF
    secret), it would have replaced the session the browser held, and any link from
    elsewhere signed its viewer out. Its secret is a login cookie of its own, bound to
    the browser: another browser's token is refused."""
    withheld = app.test_client()  # a browser whose session was not sent
    login = withheld.get("/web/login")
    set_cookies = login.headers.getlist("Set-Cookie")
    assert not any(c.startswith("courier_session=") for c in set_cookies), set_cookies
    login_cookie = next(c for c in set_cookies if c.startswith("courier_login="))
    assert "HttpOnly" in login_cookie and "SameSite=Strict" in login_cookie

    other = Pages(app.test_client())
    their_token = CSRF.search(other.client.get("/web/login").get_data(as_text=True))
    assert their_token
    mine = Pages(withheld)
    forged = mine.client.post(
        "/web/login",
        data={
            "csrf_token": their_token.group(1),
            "username": "manager",
            "password": factories.PASSWORD,
        },
    )
    assert forged.status_code == 400
    signed = mine.login("manager")
    assert signed.status_code == 302 and signed.location == "/web/board"
    assert mine.get("/web/board")


def test_signing_in_after_a_link_from_elsewhere_keeps_the_forms_open_in_other_tabs(
    app: Flask, session: Session, day: StationDay
) -> None:
    """A manager with the board open in one tab follows a link in a mail to a flag: the
    SameSite=Strict session is withheld, the link lands on the sign-in page, and the
    manager signs in there. The session the browser held is the same account's, still
    good: its forms, open in the other tab (a sign-off note typed out), still go through.
    A new CSRF secret at that sign-in refused each of them with a 400 page."""
    pages = signed_in(app, "manager")
    board = pages.get("/web/board")
    flag = day.flag(session, "unauthorized_locker_drop")
    flag_page = pages.get(f"/web/flags/{flag.id}")  # the other tab

    held = pages.client.get_cookie("courier_session")
    assert held is not None
    pages.client.delete_cookie("courier_session")  # withheld: the link came from elsewhere
    landed = pages.client.get(f"/web/flags/{flag.id}")
    assert landed.status_code == 302 and landed.location.startswith("/web/login?next=")
    form = pages.client.get(landed.location).get_data(as_text=True)
    pages.client.set_cookie("courier_session", held.value)  # the form is sent same-site
    token = CSRF.search(form)
    assert token
    signed = pages.client.post(
        "/web/login",
        data={
            "csrf_token": token.group(1),
            "username": "manager",
            "password": factories.PASSWORD,
            "next": f"/web/flags/{flag.id}",
        },
    )
    assert signed.status_code == 302 and signed.location == f"/web/flags/{flag.id}"

    resolved = pages.submit(flag_page, f"/web/flags/{flag.id}/resolve", note="parcel found")
    assert resolved.status_code == 302, resolved.get_data(as_text=True)
    session.refresh(flag)
    assert flag.status == FlagStatus.RESOLVED
    signed_out = pages.submit(board, "/web/logout")
    assert signed_out.status_code == 302 and signed_out.location == "/web/login"


def test_signing_in_again_as_someone_else_gives_the_session_a_new_csrf_secret(
    app: Flask, day: StationDay
) -> None:
    """The secret kept at a sign-in is the same account's only, from a session still
    good: another account's, or a signed-out one's, is not carried over."""
    pages = signed_in(app, "manager")
    before = pages.token()
    admin = {"username": "admin", "password": factories.PASSWORD}
    assert pages.post("/web/login", **admin).status_code == 302  # from a tab of the session
    assert pages.token() != before
    again = pages.token()
    held = pages.client.get_cookie("courier_session")
    assert held is not None
    assert pages.post("/web/logout").status_code == 302  # ends the sessions begun before
    pages.client.set_cookie("courier_session", held.value)  # a copy of the one signed out
    assert pages.post("/web/login", csrf_token=again, **admin).status_code == 302
    assert pages.token() != again


def test_two_tabs_on_the_sign_in_page_both_sign_in(app: Flask, day: StationDay) -> None:
    """At 19:00 two tabs of an expired session both show the sign-in page: signing in
    in the first must not refuse the second's form with a 400 page (its login cookie
    was dropped at the first sign-in), nor end the first's forms."""
    pages = Pages(app.test_client())
    first = CSRF.search(pages.client.get("/web/login").get_data(as_text=True))
    second = CSRF.search(pages.client.get("/web/login").get_data(as_text=True))
    assert first and second
    credentials = {"username": "manager", "password": factories.PASSWORD}
    assert (
        pages.client.post("/web/login", data={"csrf_token": first.group(1)} | credentials)
    ).status_code == 302
    board = pages.get("/web/board")
    answer = pages.client.post("/web/login", data={"csrf_token": second.group(1)} | credentials)
    assert answer.status_code == 302, answer.get_data(as_text=True)
    assert pages.submit(board, "/web/logout").status_code == 302


def test_two_tabs_opening_the_sign_in_page_at_once_both_sign_in(
    app: Flask, day: StationDay
) -> None:
    """The morning after, the browser restores the board and a flag's page at once: the
    session over, both land on the sign-in page together, each asked before either
    answer set a login cookie, so each form got a token of its own and the browser kept
    the last one's cookie. The password typed into the other tab's form was refused with
    a 400 page ("go back, reload"): that form is shown again, with the cookie's token and
    the username typed, and signs in."""
    pages = Pages(app.test_client())
    first = CSRF.search(pages.client.get("/web/login?next=/web/flags").get_data(as_text=True))
    pages.client.delete_cookie("courier_login")  # asked before the first answer came
    second = CSRF.search(pages.client.get("/web/login").get_data(as_text=True))
    assert first and second and first.group(1) != second.group(1)
    credentials = {"username": "manager", "password": factories.PASSWORD}
    refused = pages.client.post(
        "/web/login", data={"csrf_token": first.group(1), "next": "/web/flags"} | credentials
    )
    assert refused.status_code == 400
    again = refused.get_data(as_text=True)
    assert "opened again in another tab" in again
    assert 'value="manager"' in again and 'name="next" value="/web/flags"' in again
    token = CSRF.search(again)
    assert token and token.group(1) == second.group(1)  # the cookie the browser holds
    assert pages.client.get_cookie("courier_session") is None  # not signed in by it
    answer = pages.client.post(
        "/web/login", data={"csrf_token": token.group(1), "next": "/web/flags"} | credentials
    )
    assert answer.status_code == 302 and answer.location == "/web/flags"

    forged = Pages(app.test_client()).client.post(  # no login cookie: refused as before
        "/web/login", data={"csrf_token": first.group(1)} | credentials
    )
    assert forged.status_code == 400
    assert "security token is missing or out of date" in forged.get_data(as_text=True)


def test_the_sign_in_form_renews_its_cookie_for_as_long_as_the_form_may_take(
    app: Flask, day: StationDay
) -> None:
    """The form's token lives as long as its cookie. A cookie set by a sign-in page shown
    nearly 12 hours before (a link from elsewhere, the viewer signed in already) must
    not be reused as it is: the form shown at the session's end would be refused a
    minute later, its cookie expired as the password was typed."""
    browser = app.test_client()
    browser.set_cookie("courier_login", "set-by-a-sign-in-page-this-morning", max_age=60)
    page = browser.get("/web/login")
    token = CSRF.search(page.get_data(as_text=True))
    assert token and token.group(1) == "set-by-a-sign-in-page-this-morning"
    renewed = next(c for c in page.headers.getlist("Set-Cookie") if c.startswith("courier_login="))
    assert renewed.startswith("courier_login=set-by-a-sign-in-page-this-morning;")
    assert "Max-Age=43200" in renewed and "SameSite=Strict" in renewed


def test_in_production_a_sign_in_over_plain_http_says_the_pages_need_https(
    app_with: Any, session: Session
) -> None:
    """APP_ENV=production served over plain http: the browser keeps none of the pages'
    Secure (``__Host-``) cookies, so every sign-in came back refused as "missing or out
    of date", reloading changing nothing. The refusal says what is wrong."""
    production = app_with(APP_ENV="production")
    station_day.build(session, production.config["BLOB_DIR"], history_days=0)
    browser = production.test_client()  # http, as the test client is by default
    form = browser.get("/web/login").get_data(as_text=True)
    token = CSRF.search(form)
    assert token
    browser._cookies.clear()  # what a browser over http does with a Secure cookie
    answer = browser.post(
        "/web/login",
        data={"csrf_token": token.group(1), "username": "manager", "password": factories.PASSWORD},
    )
    assert answer.status_code == 400
    text = answer.get_data(as_text=True)
    assert "HTTPS" in text and "APP_ENV=production" in text

    refused = production.test_client().post(
        "/web/login",
        base_url="https://localhost",
        data={"csrf_token": token.group(1), "username": "manager", "password": "x"},
    )
    assert refused.status_code == 400  # over HTTPS, a token refused is refused as before
    assert "security token is missing or out of date" in refused.get_data(as_text=True)
    proxied = production.test_client().post(  # behind a TLS proxy, TRUSTED_PROXY_HOPS unset
        "/web/login",
        headers={"X-Forwarded-Proto": "https"},
        data={"csrf_token": token.group(1), "username": "manager", "password": "x"},
    )
    assert "security token is missing or out of date" in proxied.get_data(as_text=True)


# -- access -----------------------------------------------------------------------------------


def test_a_manager_of_another_station_gets_a_403_page_or_an_unknown_ids_404(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Another station, named: a 403 page. Its shift, flag or proof, found by its id: the
    404 page of an unknown id, which does not tell the manager it exists."""
    pages = signed_in(app, "manager.mhg")
    flag = day.flag(session, "unauthorized_locker_drop")
    for path in (
        f"/web/board?station={day.station.id}",
        f"/web/flags?station={day.station.id}",
        f"/web/reports/daily?station={day.station.id}&date={day.day}",
    ):
        html = pages.get(path, status=403)
        assert "this belongs to another station" in html, path
    for path, unknown in (
        (f"/web/shifts/{day.unbalanced.id}", "no shift with id"),
        (f"/web/flags/{flag.id}", "no flag with id"),
        (f"/web/proofs/{day.drop_event_id}", "no proof of delivery with event id"),
    ):
        html = pages.get(path, status=404)
        assert unknown in html and "another station" not in html, path
    assert pages.post(f"/web/flags/{flag.id}/resolve", note="not mine").status_code == 404
    assert pages.client.get(f"/web/images/{day.uploaded[0]}").status_code == 404
    # Their own station's pages work, without a station picker.
    board = pages.get(f"/web/board?date={day.day}")
    assert "MHG" in board and "Zhao Lei" in board and 'name="station"' not in board
    session.refresh(flag)
    assert flag.status == FlagStatus.OPEN


def test_an_auditor_reads_every_station_but_gets_no_forms_and_may_not_post(
    app: Flask, session: Session, day: StationDay
) -> None:
    pages = signed_in(app, "auditor")
    board = pages.get(f"/web/board?station={day.station.id}&date={day.day}")
    assert 'name="station"' in board and "MHG · Minhang Gumei" in board
    flag = day.flag(session, "unauthorized_locker_drop")
    for path in (
        f"/web/board?date={day.day}",
        f"/web/shifts/{day.provisional.id}",
        f"/web/flags?station={day.station.id}",
        f"/web/flags/{flag.id}",
        f"/web/proofs?station={day.station.id}",
    ):
        assert pages.forms_posting_to(pages.get(path)) == ["/web/logout"], path
    assert pages.post(f"/web/flags/{flag.id}/resolve", note="auditor").status_code == 403
    assert pages.post(f"/web/flags/{flag.id}/acknowledge").status_code == 403
    response = pages.post(f"/web/shifts/{day.balanced.id}/signoff", note="auditor")
    assert response.status_code == 403
    assert "auditors may not do this" in response.get_data(as_text=True)
    session.refresh(flag)
    session.refresh(day.balanced)
    assert flag.status == FlagStatus.OPEN
    assert day.balanced.status == ShiftStatus.CLOSED


def test_the_proof_page_names_who_delivered_and_who_recorded_and_pushed_each_event(
    app: Flask, client: FlaskClient, session: Session, world: Any, auth: Auth
) -> None:
    """Who left the parcel? The page named a bare user id ("Courier · PDA 4 ·
    PDA-0001") and its event chain no courier at all. Here courier1's delivery was
    still queued on the PDA when it was handed to courier2, whose sign-in pushed it:
    the page names courier1 as the courier, and courier2 as who pushed it."""
    from tests.courier_api.test_shifts_api import _handed_over

    world.courier.full_name = "Wang Wei"
    session.commit()
    pda, _, (first, _), queued = _handed_over(client, session, world, auth)
    pda.push(queued)
    delivery = session.scalars(
        select(ScanEvent).where(ScanEvent.tracking_no == first, ScanEvent.type == "delivered")
    ).one()
    html = signed_in(app, "auditor1").get(f"/web/proofs/{delivery.id}")
    assert "<dt>Courier · PDA</dt><dd>Wang Wei (courier1) · PDA-0001 #" in html
    assert re.findall(r'<td class="courier">(.*?)</td>', html) == [
        "Wang Wei (courier1)",
        'Wang Wei (courier1) <span class="muted">pushed by courier2</span>',
    ]


def test_the_proof_page_names_another_stations_courier_only_to_who_may_know_them(
    app: Flask, client: FlaskClient, session: Session, world: Any, auth: Auth
) -> None:
    """A courier of another station scanned the parcel (mis-sorted) before the
    station's own courier dropped it: the auditor reads both names, the station's
    manager that it was a courier of another station (SECURITY.md threat 3)."""
    parcel = factories.parcel(session, world.station)
    factories.user(session, "courier2", "courier", world.other_station)
    session.commit()
    at = utcnow() - dt.timedelta(minutes=30)
    auth.push(
        [factories.event(1, parcel.tracking_no, occurred_at=at)],
        username="courier2",
        device_id="PDA-0002",
    )
    auth.push(
        [
            factories.event(1, parcel.tracking_no, occurred_at=at + dt.timedelta(minutes=1)),
            factories.locker_drop(2, parcel.tracking_no, at + dt.timedelta(minutes=2)),
        ]
    )
    drop = session.scalars(
        select(ScanEvent).where(
            ScanEvent.tracking_no == parcel.tracking_no, ScanEvent.type == "delivered_to_locker"
        )
    ).one()
    couriers = {
        reader: re.findall(
            r'<td class="courier">(.*?)</td>',
            signed_in(app, reader).get(f"/web/proofs/{drop.id}"),
        )
        for reader in ("auditor1", "manager1")
    }
    assert couriers == {
        "auditor1": ["courier2", "courier1", "courier1"],
        "manager1": ["a courier of another station", "courier1", "courier1"],
    }


def test_the_proof_list_names_another_stations_courier_only_to_who_may_know_them(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Zhao Lei of MHG left a mis-sorted PDG parcel in a locker: the drop is PDG's proof.
    Its page tells PDG's manager that a courier of another station delivered it; the
    proof search, listing the same proof, named him all the same (SECURITY.md threat
    3: for a manager another station's courier does not exist). The auditor reads his
    name in both."""
    drop = station_day.mis_sorted_drop(session, day)
    search = f"/web/proofs?tracking_no={drop.tracking_no}"
    listed = signed_in(app, "manager").get(search)
    assert f"/web/proofs/{drop.drop_id}" in listed
    assert "Zhao Lei" not in listed and "zhaolei" not in listed, listed
    assert "a courier of another station" in listed
    assert "Zhao Lei" in signed_in(app, "auditor").get(search)


def test_a_manager_sees_masked_phone_numbers_and_an_auditor_the_whole_number(
    app: Flask, day: StationDay
) -> None:
    path = f"/web/proofs/{day.drop_event_id}"
    manager = signed_in(app, "manager").get(path)
    assert "+86*******5678" in manager and "+8613812345678" not in manager
    auditor = signed_in(app, "auditor").get(path)
    assert "+8613812345678" in auditor


def test_the_proof_pages_timeline_says_when_each_event_reached_the_server(
    app: Flask, session: Session, day: StationDay
) -> None:
    """An auditor settling "the consent was given before the drop" compares the PDA's
    clock with when the server received each event: a consent the PDA stamped before
    the drop but pushed after it shows that here, as the API's timeline does."""
    drop = session.get(ScanEvent, day.drop_event_id)
    assert drop is not None
    events = session.scalars(
        select(ScanEvent).where(ScanEvent.tracking_no == drop.tracking_no)
    ).all()
    html = signed_in(app, "auditor").get(f"/web/proofs/{drop.id}")
    table = re.search(r'<table class="events">(.*?)</table>', html, re.S)
    assert table is not None, html
    assert '<th scope="col" title="When the server received it' in table.group(1)
    received = re.findall(r'<td class="received">([^<]+)</td>', table.group(1))
    tz = ZoneInfo(day.station.timezone)
    assert sorted(received) == sorted(
        e.received_at.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S") for e in events
    )


def test_a_phone_in_a_managers_note_is_masked_on_the_pages_except_for_auditors(
    app: Flask, session: Session, day: StationDay
) -> None:
    """A manager writes the number of the recipient they called into a flag's resolution
    and into a sign-off; otherwise every other manager's flag and shift pages show it
    whole, which rule 7 shows auditors only."""
    manager = signed_in(app, "manager")
    flag = day.flag(session, "unauthorized_locker_drop")
    manager.post(f"/web/flags/{flag.id}/resolve", note="called +86 138 1234 5678: agreed")
    shift = f"/web/shifts/{day.provisional.id}"
    manager.post(
        f"{shift}/signoff", note="Wang on 138 1234 5678 has it", force_reason="+86 138 1234 5678"
    )
    auditor = signed_in(app, "auditor")
    for path in (f"/web/flags/{flag.id}", shift):
        assert "+**********678" in manager.get(path) and "1234 5678" not in manager.get(path)
        assert "+86 138 1234 5678" in auditor.get(path)
    assert "Wang on ********678 has it" in manager.get(shift)


# -- the pages --------------------------------------------------------------------------------


def test_the_board_lists_each_shift_with_its_balance_and_the_days_totals(
    app: Flask, day: StationDay
) -> None:
    pages = signed_in(app, "manager")
    html = pages.get(f"/web/board?date={day.day}")
    rows = re.findall(r'<tr class="row-(\w+)" id="shift-(\d+)">', html)
    assert rows == [
        ("balanced", str(day.balanced.id)),
        ("unbalanced", str(day.unbalanced.id)),
        ("provisional", str(day.provisional.id)),
        ("open", str(day.open.id)),  # still on the road: no balance status yet
    ]
    for courier in ("Li Wei", "Zhang Min", "Wang Qiang", "Chen Lu"):
        assert courier in html
    assert "1 balanced</span>" in html and "1 unbalanced</span>" in html
    assert "1 on the road (2 parcels still out);" in html
    assert f'href="/web/shifts/{day.unbalanced.id}"' in html
    footer = board_footer(html)
    assert list(footer.values()) == ["16", "7", "0", "2", "1", "2", "0", "2 · 2 out", "1", "3"]
    # The day's totals add up as each row does: the open shift's 2 parcels without an
    # outcome are still out, beside the handed-over shifts' 2 missing, not left out.
    outcomes = ("Delivered", "No POD", "Unattended", "No consent", "Returned", "Missing")
    accounted = sum(int(n) for name in outcomes for n in re.findall(r"\d+", footer[name]))
    assert accounted == int(footer["Checked out"])
    empty = pages.get(f"/web/board?date={day.day - dt.timedelta(days=1)}")
    assert "No shift opened at PDG" in empty


def test_the_board_dates_a_shift_closed_after_local_midnight(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Zhou Ning's evening shift opens at 17:00 and hands over at 00:40 the next day
    (Asia/Shanghai). The board showed "17:00–00:40": the close read as earlier than the
    open, within the day. The page says "+1 day", the API the day offsets, beside the
    day's other shifts, which say nothing more."""
    courier = factories.user(session, "zhouning", "courier", day.station)
    pda = station_day.Pda(session, factories.device(session, "PDA-PDG-09", day.station), courier)
    (parcel,) = [factories.parcel(session, day.station).tracking_no]
    session.commit()
    shift = pda.open(station_day.local(day.day, 17, 0))
    checked_out = pda.event(station_day.local(day.day, 17, 5), parcel, "checked_out")
    returned = pda.event(station_day.local(day.day, 23, 50), parcel, "returned_to_station")
    pda.push([checked_out, returned], station_day.local(day.day, 23, 55))
    after_midnight = day.day + dt.timedelta(days=1)
    pda.close(shift, station_day.local(after_midnight, 0, 40))

    html = signed_in(app, "manager").get(f"/web/board?date={day.day}")
    row = html.split(f'id="shift-{shift.id}"')[1].split("</tr>")[0]
    assert "17:00–00:40 (+1 day)" in row
    balanced = html.split(f'id="shift-{day.balanced.id}"')[1].split("</tr>")[0]
    assert "08:00–17:05<" in balanced

    manager = Auth(app.test_client()).headers("manager")
    board = app.test_client().get(
        f"/api/v1/stations/{day.station.id}/handover?date={day.day}", headers=manager
    )
    assert board.status_code == 200, board.get_json()
    rows = {r["shift_id"]: r for r in board.get_json()["shifts"]}
    assert (rows[shift.id]["opened_day_offset"], rows[shift.id]["closed_day_offset"]) == (0, 1)
    assert (
        rows[day.balanced.id]["opened_day_offset"],
        rows[day.balanced.id]["closed_day_offset"],
    ) == (0, 0)
    assert rows[day.open.id]["closed_day_offset"] is None


@pytest.mark.parametrize(
    ("local", "shown"),
    [
        ("2026-11-23T17:00", "17:00"),
        ("2026-11-24T00:40", "00:40 (+1 day)"),
        ("2026-11-22T23:30", "23:30 (−1 day)"),
        ("2026-11-26T09:15", "2026-11-26 09:15"),
    ],
)
def test_a_board_time_off_its_day_says_which_day(local: str, shown: str) -> None:
    zone = "Asia/Shanghai"
    moment = dt.datetime.fromisoformat(local).replace(tzinfo=ZoneInfo(zone)).astimezone(dt.UTC)
    assert clock_on(moment, dt.date(2026, 11, 23), zone) == shown


def board_footer(board: str) -> dict[str, str]:
    """The board's totals row, by column: each numeric cell's text without its markup."""
    header = re.findall(r'<th scope="col"[^>]*>([^<]+)</th>', board)
    numeric = header[header.index("Checked out") : header.index("Discrepancies") + 1]
    totals = re.search(r"<tfoot>(.*?)</tfoot>", board, re.S)
    assert totals is not None, board
    cells = re.findall(r'<td class="num">(.*?)</td>', totals.group(1), re.S)
    return dict(zip(numeric, (re.sub(r"<[^>]+>", "", c).strip() for c in cells), strict=True))


def test_the_board_counts_outcomes_for_parcels_a_shift_never_checked_out(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Chen Lu, still out, returns a parcel she never checked out: her row and the
    day's totals count it apart, so a manager sees why the numbers do not add up."""
    device = session.get(Device, day.open.device_id)
    assert device is not None
    chen = station_day.Pda(session, device, day.couriers["chenlu"])
    chen.seq = 4  # her three check-outs and a delivery
    stray = factories.parcel(session, day.station).tracking_no
    session.commit()
    at = station_day.local(day.day, 12, 0)
    chen.push([chen.event(at, stray, "returned_to_station")], at)
    board = signed_in(app, "manager").get(f"/web/board?date={day.day}")
    header = re.findall(r'<th scope="col"[^>]*>([^<]+)</th>', board)
    row = re.search(rf'<tr class="row-\w+" id="shift-{day.open.id}">(.*?)</tr>', board, re.S)
    assert row is not None
    cells = re.findall(r'<td class="num[^"]*">(\d+)', row.group(1))
    numeric = header[header.index("Checked out") : header.index("Discrepancies") + 1]
    counts = dict(zip(numeric, cells, strict=True))
    assert counts["Checked out"] == "3" and counts["Returned"] == "0"
    assert counts["Not checked out"] == "1"
    assert '<td class="num warn">1</td>' in row.group(1)
    footer = board_footer(board)
    assert footer["Not checked out"] == "1" and footer["Checked out"] == "16"


def test_the_unbalanced_shift_shows_each_discrepancy_with_its_evidence(
    app: Flask, session: Session, day: StationDay
) -> None:
    pages = signed_in(app, "manager")
    html = pages.get(f"/web/shifts/{day.unbalanced.id}")
    drop_flag = day.flag(session, "unauthorized_locker_drop")
    missing_flag = day.flag(
        session, "missing_at_handover", subject_key=f"{day.unbalanced.id}:{day.missing_parcel}"
    )
    assert "Discrepancies (2)" in html
    assert f'href="/web/flags/{drop_flag.id}"' in html
    assert f'href="/web/flags/{missing_flag.id}"' in html
    assert "No consent before this drop" in html
    assert "No consent on record for this parcel or its recipient." in html
    assert "HIVE-PDG-03, compartment A07" in html
    assert "+4m00s" in html  # the PDA's clock ran four minutes fast
    assert re.search(r"31\.\d{5}, 121\.\d{5} ±\d+ m", html)
    proof = get_proof(session=session, event_id=day.drop_event_id, policy=Policy())
    photo = proof.proof.event.details["pod"]["photo_sha256"]
    assert f'src="/web/images/{photo}"' in html
    assert 'class="badge flag-open">open</span>' in html
    assert "Missing: checked out, no outcome: 1" in html and day.missing_parcel in html
    assert pages.forms_posting_to(html) == [
        "/web/logout",
        f"/web/shifts/{day.unbalanced.id}/signoff",
    ]
    assert "force_reason" not in html  # not provisional: no reason asked for


def _app_consent_before_the_drop(
    client: FlaskClient, session: Session, day: StationDay, headers: dict[str, str]
) -> TestResponse:
    """The recipient's app grants locker delivery of the dropped parcel, dated half an
    hour before the drop, and the server records it now (after the drop)."""
    drop = session.get(ScanEvent, day.drop_event_id)
    assert drop is not None and drop.occurred_at is not None
    return client.post(
        "/api/v1/consents",
        json={
            "tracking_no": day.dropped_parcel,
            "method": "locker",
            "channel": "app",
            "granted_at": (drop.occurred_at - dt.timedelta(minutes=30)).isoformat(),
        },
        headers=headers,
    )


def test_a_revoked_consent_on_record_says_how_the_recipient_revoked_it(
    app: Flask, session: Session, day: StationDay
) -> None:
    """The recipient's consent reached the server after the drop, then they revoked it
    by SMS. Otherwise the manager reads when it was revoked, not how; and the channel
    is said as such ("through sms"), after the account that recorded the revocation,
    not in its place ("by sms")."""
    client = app.test_client()
    headers = Auth(client).headers("recipient-app")
    granted = _app_consent_before_the_drop(client, session, day, headers).get_json()
    revoke = client.post(
        f"/api/v1/consents/{granted['id']}/revoke", json={"channel": "sms"}, headers=headers
    )
    assert revoke.status_code == 200, revoke.get_json()
    html = signed_in(app, "manager").get(f"/web/shifts/{day.unbalanced.id}")
    [on_record] = re.findall(r'<ul class="consents"><li>(.*?)</li>', html)
    assert on_record.startswith(f"consent #{granted['id']}: locker, by app, parcel")
    assert re.search(r", revoked [^,]+ by [^,]+ through sms$", on_record), on_record
    assert " by sms" not in on_record


def test_a_consent_on_record_says_the_recipients_refusal_withdrew_it_for_the_parcel(
    app: Flask, session: Session, day: StationDay
) -> None:
    """The recipient's standing consent, dated before the drop, then their "no, ring the
    bell" to a courier's request for consent: for this parcel the standing consent is
    withdrawn (``GET /consents?covering=`` says ``refused_at``). The shift page lists it
    as withdrawn, with when they refused, not as a consent that stands."""
    client = app.test_client()
    auth = Auth(client)
    channel = auth.headers("recipient-app")
    parcel = session.scalars(select(Parcel).where(Parcel.tracking_no == day.dropped_parcel)).one()
    standing = standing_consent(client, channel, parcel, utcnow() - dt.timedelta(days=30))
    asked = client.post(
        "/api/v1/consents/requests",
        json={"tracking_no": parcel.tracking_no, "method": "locker"},
        headers=auth.headers("zhangmin", "PDA-PDG-02"),
    ).get_json()
    refused = client.post(
        "/api/v1/consents",
        json={"request_id": asked["id"], "granted": False, "channel": "sms"},
        headers=channel,
    )
    assert refused.get_json()["status"] == "refused", refused.get_json()
    html = signed_in(app, "manager").get(f"/web/shifts/{day.unbalanced.id}")
    [on_record] = re.findall(r'<ul class="consents"><li>(.*?)</li>', html)
    assert on_record.startswith(f"consent #{standing}: any, by app, standing"), on_record
    assert "withdrawn for this parcel: the recipient refused a request for consent" in on_record


def test_the_proof_of_a_drop_after_a_refusal_lists_the_consent_it_withdrew_and_when(
    app: Flask, client: FlaskClient, session: Session, world: Any, auth: Auth
) -> None:
    """A standing consent three days old; at the door today the courier asks again and
    the recipient refuses ("ring the bell"); the courier leaves the parcel in a locker
    anyway: ``unauthorized_locker_drop``, rightly. The proof page does not say "no
    consent before this drop", which the consents API contradicts: it lists the
    consents on record as the shift page does, the standing one withdrawn for this
    parcel by the refusal, with when. A drop with none on record says that."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    channel = auth.headers("app1")
    start = utcnow() - dt.timedelta(minutes=10)
    standing = standing_consent(client, channel, parcel, start - dt.timedelta(days=3))
    ask = factories.event(
        2,
        parcel.tracking_no,
        "consent_requested",
        occurred_at=start + dt.timedelta(minutes=1),
        request={"method": "locker", "channel": "sms"},
    )
    auth.push([factories.event(1, parcel.tracking_no, occurred_at=start), ask])
    [request] = client.get(
        "/api/v1/consents/requests",
        query_string={"tracking_no": parcel.tracking_no},
        headers=channel,
    ).get_json()["items"]
    refused = client.post(
        "/api/v1/consents",
        json={"request_id": request["id"], "granted": False, "channel": "sms"},
        headers=channel,
    )
    assert refused.get_json()["status"] == "refused", refused.get_json()
    receipt = auth.push([factories.locker_drop(3, parcel.tracking_no, utcnow())])
    assert [f["kind"] for f in receipt["flags_raised"]] == ["unauthorized_locker_drop"]
    drop = session.scalars(
        select(ScanEvent).where(
            ScanEvent.tracking_no == parcel.tracking_no, ScanEvent.type == "delivered_to_locker"
        )
    ).one()
    html = signed_in(app, "auditor1").get(f"/web/proofs/{drop.id}")
    assert "No consent authorized this drop" in html
    [on_record] = re.findall(r'<ul class="consents"><li>(.*?)</li>', html)
    assert on_record.startswith(f"consent #{standing}: any, by app, standing"), on_record
    assert re.search(
        r"withdrawn for this parcel: the recipient refused a request for consent \d{4}-", on_record
    ), on_record
    managers = signed_in(app, "manager1").get(f"/web/proofs/{drop.id}")
    assert "withdrawn for this parcel" in managers  # the parcel's station reads it alike


def test_the_proof_of_a_drop_after_a_revocation_says_who_revoked_the_consent_and_why(
    app: Flask, client: FlaskClient, session: Session, world: Any, auth: Auth
) -> None:
    """The recipient revoked their consent through the app ("I will be home, ring the
    bell"); the courier left the parcel in a locker afterwards. The proof page listed
    the consent on record as "revoked <time> by app": the channel, written where every
    other line of the page names a person ("recorded ... by app1"), and neither the
    account that recorded the revocation nor the recipient's reason, which the API
    keeps (`revoked_by`, `revoked_reason`). An auditor settling "I never agreed to a
    locker" could not tell from the page who withdrew the consent, nor why."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    channel = auth.headers("app1")
    granted = client.post(
        "/api/v1/consents",
        json={
            "tracking_no": parcel.tracking_no,
            "method": "locker",
            "channel": "sms",
            "granted_at": (utcnow() - dt.timedelta(hours=2)).isoformat(),
        },
        headers=channel,
    ).get_json()
    revoked = client.post(
        f"/api/v1/consents/{granted['id']}/revoke",
        json={"reason": "home all day, call 13912345678", "channel": "app"},
        headers=channel,
    ).get_json()
    assert revoked["revoked_by"] == world.integration.id
    out = factories.event(1, parcel.tracking_no, occurred_at=utcnow() - dt.timedelta(minutes=1))
    receipt = auth.push([out, factories.locker_drop(2, parcel.tracking_no, utcnow())])
    assert [f["kind"] for f in receipt["flags_raised"]] == ["unauthorized_locker_drop"]
    drop = session.scalars(
        select(ScanEvent).where(
            ScanEvent.tracking_no == parcel.tracking_no, ScanEvent.type == "delivered_to_locker"
        )
    ).one()

    html = signed_in(app, "auditor1").get(f"/web/proofs/{drop.id}")

    [on_record] = re.findall(r'<ul class="consents"><li>(.*?)</li>', html)
    assert re.search(r", revoked \d{4}-\d\d-\d\d \d\d:\d\d:\d\d by app1 through app", on_record)
    assert "home all day, call 13912345678" in on_record
    managers = signed_in(app, "manager1").get(f"/web/proofs/{drop.id}")
    assert "home all day, call ********678" in managers  # masked but for auditors
    assert "13912345678" not in managers


def test_the_proof_of_a_drop_with_no_consent_on_record_says_so(
    app: Flask, day: StationDay
) -> None:
    html = signed_in(app, "auditor").get(f"/web/proofs/{day.drop_event_id}")
    assert (
        "No consent authorized this drop</span>: no consent on record for this parcel or "
        "its recipient." in html
    )


def test_the_provisional_shift_names_the_missing_sequence_numbers(
    app: Flask, day: StationDay
) -> None:
    html = signed_in(app, "manager").get(f"/web/shifts/{day.provisional.id}")
    assert "Provisional: 1 sequence number not received" in html
    assert '<span class="seqs">4</span>' in html
    assert 'name="force_reason"' in html
    assert "the PDA has not sent seq 4" in html


def test_the_open_shift_cannot_be_signed_off_yet(app: Flask, day: StationDay) -> None:
    html = signed_in(app, "manager").get(f"/web/shifts/{day.open.id}")
    assert "The shift is still open" in html
    assert f"/web/shifts/{day.open.id}/signoff" not in html


def test_the_shift_page_of_a_shift_on_the_road_does_not_call_it_unbalanced(
    app: Flask, day: StationDay
) -> None:
    """At 19:00 the board shows Chen Lu's shift "on the road", its two parcels still
    out, and counts it under no balance status. The manager clicks through: the shift
    page's heading says "✗ unbalanced" in red, the board's contradiction, for a courier
    who simply is not back yet (stop 38 changed the board, not the page)."""
    pages = signed_in(app, "manager")
    board = pages.get(f"/web/board?date={day.day}")
    assert re.search(rf'<tr class="row-open" id="shift-{day.open.id}">', board)
    html = pages.get(f"/web/shifts/{day.open.id}")
    heading = re.search(r"<h1>(.*?)</h1>", html, re.S)
    assert heading is not None
    assert "unbalanced" not in heading.group(1), heading.group(1)
    # Nor does the page list her parcels as missing: they are out, as on the board.
    assert "Still out: checked out, no outcome yet: 2" in html
    assert "Missing: checked out" not in html and "outcome-missing" not in html


def test_closing_a_dead_pdas_shift_from_its_page_leaves_no_silent_pda_flag_on_the_board(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Chen Lu's PDA died on the road: the sweeps flagged the shift ``shift_not_closed``
    and the PDA ``stale_device`` (filed under the shift). Chen Lu is back; the manager
    closes the shift from its page, the remedy stop 38 added. ``shift_not_closed``
    closes with it, but ``stale_device``, whose cause ("an open shift whose device
    has gone silent") went away just the same, stays open: the board row still says
    "1 open flag: stale device" and counts the shift in ``with_open_flags``, so the
    manager settles by hand, shift after shift, a flag the close already answered
    (or waits for the next sweep and wonders)."""
    at = utcnow()
    sweeps.shift_not_closed(session=session, now=at, settings=SweepSettings())
    sweeps.stale_device(session=session, now=at, settings=SweepSettings())
    session.commit()
    pages = signed_in(app, "manager")
    board = pages.get(f"/web/board?date={day.day}")
    assert "open flags" in board or "open flag" in board
    html = pages.get(f"/web/shifts/{day.open.id}")
    closed = pages.submit(html, f"/web/shifts/{day.open.id}/close")
    assert closed.status_code == 302
    assert f"Shift {day.open.id} is closed." in pages.get(f"/web/shifts/{day.open.id}")
    api = app.test_client()
    token = api.post(
        "/api/v1/auth/token", json={"username": "manager", "password": factories.PASSWORD}
    ).get_json()["access_token"]
    answer = api.get(
        f"/api/v1/stations/{day.station.id}/handover",
        query_string={"date": day.day.isoformat()},
        headers={"Authorization": f"Bearer {token}"},
    ).get_json()
    (row,) = [r for r in answer["shifts"] if r["shift_id"] == day.open.id]
    assert row["shift_status"] == "closed"
    # Only its handover flags wait (its parcels still out are missing now).
    assert {f["kind"] for f in row["open_flags"]} <= {"missing_at_handover"}, row["open_flags"]


def test_the_flag_queue_filters_and_pages(app: Flask, session: Session, day: StationDay) -> None:
    pages = signed_in(app, "manager")
    html = pages.get("/web/flags")
    shown = set(re.findall(r'<tr id="flag-(\d+)"', html))
    station_flags = {
        str(f.id) for f in session.scalars(select(Flag).where(Flag.station_id == day.station.id))
    }
    assert shown == station_flags
    other = session.scalars(select(Flag).where(Flag.station_id == day.other_station.id)).all()
    assert other and not {str(f.id) for f in other} & shown
    critical = pages.get("/web/flags?severity=critical&kind=missing_at_handover")
    assert len(re.findall(r'<tr id="flag-', critical)) == 2
    assert '<option value="critical" selected>' in critical
    courier = day.couriers["zhangmin"]
    theirs = pages.get(f"/web/flags?courier_id={courier.id}")
    ids = set(re.findall(r'<tr id="flag-(\d+)"', theirs))
    assert ids == {
        str(f.id) for f in session.scalars(select(Flag).where(Flag.courier_id == courier.id))
    }
    # The filter takes the station's dates: past 16:00 UTC it is already tomorrow there.
    today = dt.datetime.now(ZoneInfo(day.station.timezone)).date()
    assert len(re.findall(r'<tr id="flag-', pages.get(f"/web/flags?raised_to={day.day}"))) == 0
    recent = pages.get(f"/web/flags?raised_from={day.day}&raised_to={today}")
    assert set(re.findall(r'<tr id="flag-(\d+)"', recent)) == station_flags
    own = pages.get(f"/web/flags?shift_id={day.unbalanced.id}")  # the shift's own flags
    assert set(re.findall(r'<tr id="flag-(\d+)"', own)) == {
        str(f.id) for f in session.scalars(select(Flag).where(Flag.shift_id == day.unbalanced.id))
    }
    assert "No flag matches." in pages.get(f"/web/flags?shift_id={day.other_shift.id}")
    assert "No flag matches." in pages.get("/web/flags?status=closed")
    assert "severity" in pages.get("/web/flags?severity=bogus", status=422)


def test_the_flag_queue_leaves_out_by_default_the_flags_the_system_closed(
    app: Flask, session: Session, day: StationDay
) -> None:
    """A PDA's pushes arrived drop first, consent after: the unauthorized_locker_drop
    raised in between was closed by the system when the consent came (as images
    uploaded after their deliveries close pod_blob_missing, a late batch a parcel's
    missing_at_handover). At 19:00 the manager's queue listed every such flag among those
    to act on, hundreds for one PDA back from an afternoon offline, though the reports
    and the board count none of them. By default the queue lists the flags whose cause
    stands (open, acknowledged, resolved); "closed" and "any" still find the others."""
    pages = signed_in(app, "manager")
    closed = day.flag(session, "unauthorized_locker_drop")
    closed.status = FlagStatus.CLOSED
    session.commit()
    station_flags = {
        str(f.id) for f in session.scalars(select(Flag).where(Flag.station_id == day.station.id))
    }
    html = pages.get("/web/flags")
    assert '<option value="standing" selected' in html
    assert set(re.findall(r'<tr id="flag-(\d+)"', html)) == station_flags - {str(closed.id)}
    for status in ("closed", "any"):
        listed = set(re.findall(r'<tr id="flag-(\d+)"', pages.get(f"/web/flags?status={status}")))
        assert str(closed.id) in listed
    assert "status" in pages.get("/web/flags?status=bogus", status=422)


def test_a_board_rows_open_flags_lead_to_the_queue_of_what_still_waits(
    app: Flask, session: Session, day: StationDay
) -> None:
    """The board row says "2 open flags" and linked to the queue of every flag of the
    shift, those resolved or closed long ago with them. It leads to those waiting for a
    decision, open or acknowledged (`status=waiting`), which the queue's filter offers."""
    at = utcnow()
    sweeps.shift_not_closed(session=session, now=at, settings=SweepSettings())
    sweeps.stale_device(session=session, now=at, settings=SweepSettings())
    session.commit()
    own = session.scalars(select(Flag).where(Flag.shift_id == day.open.id).order_by(Flag.id)).all()
    assert len(own) >= 2
    flags.resolve_flag(session=session, flag=own[0], user_id=day.manager.id, note="seen")
    session.commit()
    pages = signed_in(app, "manager")
    board = pages.get(f"/web/board?date={day.day}")
    link = f"/web/flags?shift_id={day.open.id}&amp;status=waiting"
    assert f'href="{link}"' in board
    queue = pages.get(link.replace("&amp;", "&"))
    assert set(re.findall(r'<tr id="flag-(\d+)"', queue)) == {str(f.id) for f in own[1:]}
    assert '<option value="waiting" selected>' in queue
    every = pages.get(f"/web/flags?shift_id={day.open.id}")
    assert set(re.findall(r'<tr id="flag-(\d+)"', every)) == {str(f.id) for f in own}


def test_the_flag_queue_pages_by_keyset(
    app: Flask, session: Session, day: StationDay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("courier_api.web.views.PAGE_SIZE", 2)
    pages = signed_in(app, "manager")
    first = pages.get("/web/flags?status=open")
    link = re.search(r'<a href="([^"]+)" rel="next">', first)
    assert link is not None
    second = pages.get(link.group(1).replace("&amp;", "&"))
    assert "status=open" in link.group(1)
    one = re.findall(r'<tr id="flag-(\d+)"', first)
    two = re.findall(r'<tr id="flag-(\d+)"', second)
    assert len(one) == 2 and two and int(two[0]) < int(one[-1])
    # The last flag shown opened again meanwhile (a late batch at 19:00): the next page
    # went on from where it stands now, the top, and listed the first flag again. It
    # goes on from where it stood when shown: none twice.
    last = session.get(Flag, int(one[-1]))
    assert last is not None
    last.opened_at = dt.datetime.now(dt.UTC)
    session.commit()
    again = pages.get(link.group(1).replace("&amp;", "&"))
    assert re.findall(r'<tr id="flag-(\d+)"', again) == two
    assert "cursor" in pages.get("/web/flags?cursor=x", status=400)


def test_the_flag_queue_refuses_a_cursor_and_an_after_together_as_the_api_does(
    app: Flask, session: Session, day: StationDay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link carrying both a walk's cursor and the deprecated after listed the page of
    one of them, unsaid which (the page below both places, here the first flag's), where
    the API answers 422 ``cursor_and_after``: one link, read on the page or through the
    API, gave two answers."""
    monkeypatch.setattr("courier_api.web.views.PAGE_SIZE", 2)
    pages = signed_in(app, "manager")
    first = pages.get("/web/flags?status=any")
    link = re.search(r'<a href="([^"]+)" rel="next">', first)
    assert link is not None
    one = re.findall(r'<tr id="flag-(\d+)"', first)
    both = link.group(1).replace("&amp;", "&") + f"&after={one[0]}"
    refused = pages.get(both, status=422)
    assert "send cursor or after, not both" in refused
    assert pages.get(link.group(1).replace("&amp;", "&"))  # the cursor alone still reads


def test_the_flag_queue_says_to_list_again_when_a_flag_committed_late_above_its_page(
    app: Flask, session: Session, day: StationDay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manager pages the queue at 19:00 while a push still commits: its flag, stored
    between two flags the first page showed, was never on a page, and the last page
    said nothing. That page answers 410 saying to list the flags again."""
    monkeypatch.setattr("courier_api.web.views.PAGE_SIZE", 2)
    pages = signed_in(app, "manager")
    first = pages.get("/web/flags?status=any")
    link = re.search(r'<a href="([^"]+)" rel="next">', first)
    assert link is not None
    top, second = (session.get(Flag, int(i)) for i in re.findall(r'<tr id="flag-(\d+)"', first))
    assert top is not None and second is not None
    late = flags.raise_flag(
        session=session,
        kind="unknown_parcel",
        severity=FlagSeverity.WARNING,
        subject=flags.FlagSubject("parcel", "RR404"),
        station_id=day.station.id,
        evidence={"event_ids": []},
    ).flag
    factories.flag_raised_at(
        session, late, second.opened_at + (top.opened_at - second.opened_at) / 2
    )
    session.commit()
    url = link.group(1).replace("&amp;", "&")
    while True:  # to the walk's last page
        page = pages.client.get(url)
        if page.status_code != 200:
            break
        following = re.search(r'<a href="([^"]+)" rel="next">', page.get_data(as_text=True))
        assert following is not None, "the walk ended without the flag committed late"
        url = following.group(1).replace("&amp;", "&")
    assert page.status_code == 410
    assert "list the flags again from the start" in page.get_data(as_text=True)


def test_the_flag_queue_says_when_a_flag_it_lists_first_was_opened_again(
    app: Flask, session: Session, day: StationDay
) -> None:
    """The queue lists the latest opened first, but showed only when each flag was first
    raised: a flag reopened this evening sat at the top dated days ago, above today's,
    with nothing saying why. Its row says when it was opened again, on the station's
    clock; a flag opened when it was raised says nothing more."""
    pages = signed_in(app, "manager")
    flag = day.flag(session, "unauthorized_locker_drop")
    other = day.flag(
        session, "missing_at_handover", subject_key=f"{day.unbalanced.id}:{day.missing_parcel}"
    )
    # Raised three days ago; opened again just now (a late batch, say).
    reopened = dt.datetime.now(dt.UTC)
    flag.raised_at, flag.opened_at = reopened - dt.timedelta(days=3), reopened
    session.commit()
    html = pages.get("/web/flags")
    assert re.findall(r'<tr id="flag-(\d+)"', html)[0] == str(flag.id)  # the latest opened
    row = _queue_row(html, flag.id)
    local = reopened.astimezone(ZoneInfo(day.station.timezone)).strftime("%Y-%m-%d %H:%M:%S")
    assert f"reopened {local}</span>" in row, row
    assert "reopened" not in _queue_row(html, other.id)
    assert f'<dd class="reopened">{local}:' in pages.get(f"/web/flags/{flag.id}")
    assert "Opened again" not in pages.get(f"/web/flags/{other.id}")


def test_the_flag_queue_lists_one_parcels_flags_by_its_tracking_number(
    app: Flask, session: Session, day: StationDay
) -> None:
    """A lost parcel has no proof page to list its flags: the queue finds them by its
    number, however it is typed, its handover's included, and keeps the number in
    the filter (and in the next page's link)."""
    lost = day.flag(
        session, "missing_at_handover", subject_key=f"{day.unbalanced.id}:{day.missing_parcel}"
    )
    other = day.flag(session, "unauthorized_locker_drop")
    session.commit()
    pages = signed_in(app, "manager")
    typed = f"{day.missing_parcel[:2].lower()} {day.missing_parcel[2:]}"
    html = pages.get(f"/web/flags?tracking_no={quote(typed)}")
    assert re.findall(r'<tr id="flag-(\d+)"', html) == [str(lost.id)]
    assert f'name="tracking_no" value="{typed}"' in html
    assert re.findall(r'<tr id="flag-(\d+)"', pages.get("/web/flags")).count(str(other.id)) == 1


def _queue_row(html: str, flag_id: int) -> str:
    row = re.search(rf'<tr id="flag-{flag_id}".*?</tr>', html, re.S)
    assert row is not None, html
    return row.group(0)


def test_a_parcels_flag_leads_from_the_queue_to_the_shift_and_the_proof_of_its_events(
    app: Flask, session: Session, day: StationDay
) -> None:
    """An unauthorized locker drop is a parcel's rule flag: it names no shift of its own.
    Otherwise its row in the queue and its page link nowhere, and the manager cannot
    reach the shift page (the consents on record, the drop's photo) nor the drop's
    proof to check the consent before resolving the flag."""
    pages = signed_in(app, "manager")
    flag = day.flag(session, "unauthorized_locker_drop")
    assert flag.shift_id is None
    shift_link = f'href="/web/shifts/{day.unbalanced.id}"'

    row = _queue_row(pages.get("/web/flags?kind=unauthorized_locker_drop"), flag.id)
    html = pages.get(f"/web/flags/{flag.id}")

    assert shift_link in row
    assert shift_link in html and f'href="/web/proofs/{day.drop_event_id}"' in html


def test_a_flag_links_no_shift_of_a_station_its_reader_does_not_see(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Another station's courier delivers one of this station's parcels: its
    ``wrong_station`` flag is this station's, its event filed under a shift of the
    other station. Otherwise this station's manager is sent from the queue and the flag
    page to a 404 page; the admin, who sees both stations, gets the link."""
    device = session.get(Device, day.other_shift.device_id)
    assert device is not None
    zhao = station_day.Pda(session, device, day.couriers["zhaolei"])
    zhao.seq = day.other_shift.last_seq or 0
    at = station_day.local(day.day, 18, 0)
    shift = zhao.open(at)
    pod = {"recipient_name": "Liu Yang", "signature_sha256": "c" * 64}
    delivered = zhao.event(at + dt.timedelta(minutes=5), day.missing_parcel, "delivered", pod=pod)
    zhao.push([delivered], at + dt.timedelta(minutes=6))
    flag = day.flag(session, "wrong_station")
    shift_link = f'href="/web/shifts/{shift.id}"'

    manager, admin = signed_in(app, "manager"), signed_in(app, "admin")

    for reader, shown in ((manager, False), (admin, True)):
        assert (shift_link in _queue_row(reader.get("/web/flags"), flag.id)) is shown
        page = reader.get(f"/web/flags/{flag.id}")
        assert (shift_link in page) is shown
        assert '<a href="/web/proofs/' in page  # the parcel is this station's


def _delivered_not_taken_in(session: Session, day: StationDay) -> tuple[Shift, ScanEvent]:
    """A PDG courier signs for a tracking number no station took in (flagged
    ``unknown_parcel``): the shift and the delivery, a proof of PDG."""
    courier = factories.user(session, "sunli", "courier", day.station)
    pda = station_day.Pda(session, factories.device(session, "PDA-PDG-09", day.station), courier)
    session.commit()
    unknown = factories.s10()
    shift = pda.open(station_day.local(day.day, 18, 0))
    delivered = pda.event(
        station_day.local(day.day, 18, 30),
        unknown,
        "delivered",
        pod={"recipient_name": "Mr Wu", "signature_sha256": day.uploaded[0]},
    )
    pda.push([delivered], station_day.local(day.day, 18, 40))
    pda.close(shift, station_day.local(day.day, 19, 0))
    event = session.scalars(
        select(ScanEvent).where(ScanEvent.tracking_no == unknown, ScanEvent.type == "delivered")
    ).one()
    return shift, event


def test_the_flag_page_of_a_parcel_not_taken_in_links_its_proof(
    app: Flask, session: Session, day: StationDay
) -> None:
    """beb0c78: a delivery of a tracking number no station took in is a proof of the
    station that recorded it, and its manager opens it (`/web/proofs/<id>`, "Not taken
    in"). The `unknown_parcel` flag that the same delivery raised at that station lists
    the delivery as its evidence, but without the link to its proof that every other
    delivery on a flag page gets (README, Pages: "each event linking its shift and, a
    delivery, its proof (neither when it is another station's)"): the page links the proof
    only of tracking numbers taken in (`sync.pages.flag_page`), so the manager chasing
    the unknown parcel never reaches the proof (who signed, the photo) from its flag.
    Another station's manager, who would get a 404 page, is not linked to it."""
    _, delivered = _delivered_not_taken_in(session, day)
    event_id = delivered.id
    flag = day.flag(session, "unknown_parcel", subject_key=delivered.tracking_no)
    assert event_id in flag.evidence["event_ids"]
    manager = signed_in(app, "manager")
    assert "Not taken in" in manager.get(f"/web/proofs/{event_id}")

    html = manager.get(f"/web/flags/{flag.id}")

    assert f'href="/web/proofs/{event_id}"' in html
    admin = signed_in(app, "admin").get(f"/web/flags/{flag.id}")
    assert f'href="/web/proofs/{event_id}"' in admin


def _drop_voided_for_review(session: Session, world: Any, auth: Auth) -> Flag:
    """The courier's locker drop of an ST1 parcel, voided a minute later as a mis-tap:
    the parcel's ``correction_review`` flag, citing the drop and the correction."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    drop = factories.locker_drop(2, parcel.tracking_no, occurred_at=at)
    correction = factories.event(
        3,
        parcel.tracking_no,
        "correction",
        occurred_at=at + dt.timedelta(minutes=1),
        voids_client_event_id=drop["client_event_id"],
        reason="wrong parcel scanned",
    )
    auth.push([factories.event(1, parcel.tracking_no, occurred_at=at), drop, correction])
    reviewed = (Flag.kind == "correction_review", Flag.subject_key == parcel.tracking_no)
    return session.scalars(select(Flag).where(*reviewed)).one()


def test_the_flag_page_marks_a_delivery_a_correction_voided(
    app: Flask, session: Session, world: Any, auth: Auth
) -> None:
    """A flag's page lists its evidence's events, a delivery linked as "(proof)", but
    said nothing of a correction that voided one: the courier's locker drop, voided a
    minute later as a mis-tap, stood on the flag's page as a delivery like any other,
    where the proof page and the shift page say "voided by event ...". An auditor
    reading the flag took the drop for one that stands."""
    flag = _drop_voided_for_review(session, world, auth)
    drop_id, correction_id = flag.evidence["event_ids"]

    html = signed_in(app, "auditor1").get(f"/web/flags/{flag.id}")

    rows = {
        int(m.group(1)): m.group(0)
        for m in re.finditer(r"<tr[^>]*><td>(?:<a [^>]*>)?(\d+)<.*?</tr>", html, re.S)
    }
    assert f"voided by event {correction_id}" in rows[drop_id]
    assert "voided by event" not in rows[correction_id]


def _moved_to_another_station(session: Session, world: Any, *users: User) -> None:
    """``users`` moved to ST2 since (as ``test_proofs_api`` moves a manager): ST1 has a
    new manager, manager3, who never worked with them."""
    factories.user(session, "manager3", "station_manager", world.station)
    for user in users:
        user.station_id = world.other_station.id
    session.commit()


def test_the_flag_page_names_another_stations_users_only_to_who_may_know_them(
    app: Flask, client: FlaskClient, session: Session, world: Any, auth: Auth
) -> None:
    """The flag's page named its courier and everyone who changed it whatever their
    station, where the flag queue and the proof page tell a manager only that it was a
    courier of another station, or another station's user by id (SECURITY.md threat 3:
    for a manager another station's users do not exist). Here courier1's voided drop
    was acknowledged by an admin and resolved by manager1; courier1 and manager1 then
    moved to ST2. ST1's new manager reads that a courier of another station is
    concerned, that an admin acknowledged (an admin works across stations, as the
    proof page names them) and that user #N resolved; the auditor reads every name."""
    flag = _drop_voided_for_review(session, world, auth)
    assert flag.courier_id == world.courier.id
    url = f"/api/v1/flags/{flag.id}"
    acked = client.post(f"{url}/acknowledge", json={}, headers=auth.headers("admin"))
    assert acked.status_code == 200, acked.get_json()
    resolved = client.post(
        f"{url}/resolve", json={"note": "mis-tap"}, headers=auth.headers("manager1")
    )
    assert resolved.status_code == 200, resolved.get_json()
    world.courier.full_name = "Wang Wei"
    _moved_to_another_station(session, world, world.courier, world.manager)

    def shown(username: str) -> tuple[str, list[str]]:
        html = signed_in(app, username).get(f"/web/flags/{flag.id}")
        [courier] = re.findall(r"<dt>Courier</dt><dd>(.*?)</dd>", html)
        history = re.findall(r"→ <strong>\w+</strong> by (.*?)(?::|</li>)", html)
        return courier, history

    assert shown("manager3") == (
        "a courier of another station",
        ["the system", "admin", f"user #{world.manager.id}"],
    )
    assert shown("auditor1") == ("Wang Wei", ["the system", "admin", "manager1"])
    queue = signed_in(app, "manager3").get(f"/web/flags?tracking_no={flag.tracking_no}")
    assert "Wang Wei" not in queue and "a courier of another station" in queue


def test_the_shift_page_names_another_stations_users_only_to_who_may_know_them(
    app: Flask, client: FlaskClient, session: Session, world: Any, auth: Auth
) -> None:
    """The shift's page named its courier, who closed it, who signed it off and who
    wrote off its PDA's lost seqs whatever their station now: courier1 and manager1
    moved to ST2, ST1's new manager read both names, where the proof page says "a
    courier of another station" and "user #N" (SECURITY.md threat 3). The auditor
    reads them all."""
    from tests.courier_api.test_lost_seqs_api import lost_in_the_middle, lost_seqs
    from tests.courier_api.test_shifts_api import Courier, sign_off

    world.courier.full_name = "Wang Wei"
    world.manager.full_name = "Li Na"
    session.commit()
    pda = Courier(client, auth, "courier1", "PDA-0001")
    shift, _, _ = lost_in_the_middle(session, world, pda)
    manager = auth.headers("manager1")
    assert lost_seqs(client, manager, ranges=[{"first": 3, "last": 4}]).status_code == 201
    assert sign_off(client, shift["id"], manager, note="two parcels lost").status_code == 200
    _moved_to_another_station(session, world, world.courier, world.manager)

    def shown(username: str) -> list[str]:
        html = signed_in(app, username).get(f"/web/shifts/{shift['id']}")
        return [
            re.search(r"<h1>Shift \d+ · (.*?) · ", html).group(1),  # type: ignore[union-attr]
            *re.findall(r"<dt>Courier</dt><dd>(.*?)</dd>", html),
            *re.findall(r"<dt>Closed</dt><dd>.*? by (.*?)</dd>", html),
            *re.findall(r"<dt>Signed off</dt><dd>.*? by (.*?): “", html),
            *re.findall(r"<li>3–4: written off .*? by (.*?): “", html),
        ]

    theirs = "a courier of another station"
    assert shown("manager3") == [
        theirs,
        theirs,
        f"user #{world.courier.id}",
        *[f"user #{world.manager.id}"] * 2,
    ]
    assert shown("auditor1") == [
        "Wang Wei",
        "Wang Wei (courier1)",
        "courier1",
        "manager1",
        "Li Na",
    ]


def test_the_shift_page_links_the_proof_of_a_delivery_not_taken_in(
    app: Flask, session: Session, day: StationDay
) -> None:
    """The same delivery of a tracking number never taken in, under "Parcels by
    outcome" on its shift's page: the page linked the proof only of parcels taken in at
    the reader's station, so the manager settling the shift's handover saw the
    delivery but could not open its proof, though it is their station's."""
    shift, delivered = _delivered_not_taken_in(session, day)

    html = signed_in(app, "manager").get(f"/web/shifts/{shift.id}")

    outcomes = html[html.index('id="parcels-h"') :]
    assert delivered.tracking_no in outcomes
    assert f'href="/web/proofs/{delivered.id}"' in outcomes


def test_the_flag_queue_reads_the_shifts_of_a_page_of_flags_at_once(
    app: Flask, session: Session, day: StationDay
) -> None:
    """The shifts of the parcel flags' events are read in one query for the page,
    however many flags it lists: otherwise the station's queue, 50 flags a page, costs
    a query per flag."""
    pages = signed_in(app, "manager")
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    def queries(path: str) -> int:
        statements.clear()
        connection = session.connection()
        sqlalchemy.event.listen(connection, "before_cursor_execute", count)
        try:
            html = pages.get(path)
        finally:
            sqlalchemy.event.remove(connection, "before_cursor_execute", count)
        assert "/web/shifts/" in html
        return len(statements)

    one = queries("/web/flags?kind=unauthorized_locker_drop")
    every = queries("/web/flags")
    parcel_flags = session.scalars(
        select(Flag).where(Flag.station_id == day.station.id, Flag.subject_type == "parcel")
    ).all()
    assert len(parcel_flags) > 1
    assert every == one


def test_a_decision_on_a_pdas_flag_says_what_it_covered(
    app: Flask, session: Session, day: StationDay
) -> None:
    """A PDA's ``clock_jump`` names its events by the PDA's ids for them, a
    ``stale_device`` the silence it is about: the page says the decision was on
    those, not "on no events" (which a manager would read as covering anything)."""
    from sync.flags import FlagSubject, raise_flag, resolve_flag

    pages = signed_in(app, "manager")
    for kind, evidence, said in (
        ("clock_jump", {"client_event_ids": ["a-1", "b-2"]}, "PDA events a-1, b-2"),
        ("stale_device", {"shift_id": 7, "last_push_at": None}, "the PDA silent in shift 7"),
    ):
        flag = raise_flag(
            session=session,
            kind=kind,
            severity=FlagSeverity.WARNING,
            subject=FlagSubject("device", "PDA-X"),
            station_id=day.station.id,
            evidence=evidence,
        ).flag
        resolve_flag(session=session, flag=flag, user_id=day.manager.id, note="seen")
        session.commit()
        detail = pages.get(f"/web/flags/{flag.id}")
        assert f"<dt>Manager's decision</dt><dd>resolved, on {said}:" in detail


def test_a_manager_acknowledges_then_resolves_a_flag_and_returns_to_the_queue(
    app: Flask, session: Session, day: StationDay
) -> None:
    pages = signed_in(app, "manager")
    flag = day.flag(session, "unauthorized_locker_drop")
    back = "/web/flags?kind=unauthorized_locker_drop"
    response = pages.post(f"/web/flags/{flag.id}/acknowledge", note="on it", next=back)
    assert response.status_code == 302 and response.location == back
    assert f"Flag {flag.id} is acknowledged." in pages.get(back)
    response = pages.post(f"/web/flags/{flag.id}/resolve", note="", next=back)
    # Refused: the queue again, as filtered, its forms coming back to it.
    assert response.status_code == 200
    refused = response.get_data(as_text=True)
    assert "Not resolved: say how the flag was resolved in a note" in refused
    assert re.findall(r'<tr id="flag-(\d+)"', refused) == [str(flag.id)]
    assert f'name="next" value="{back}"' in refused
    session.refresh(flag)
    assert flag.status == FlagStatus.ACKNOWLEDGED
    response = pages.post(
        f"/web/flags/{flag.id}/resolve", note="recipient agreed by phone", next="//evil.example"
    )
    assert response.location == f"/web/flags/{flag.id}"
    detail = pages.get(response.location)
    assert f"Flag {flag.id} is resolved." in detail
    assert "recipient agreed by phone" in detail and "on it" in detail
    seen = ", ".join(str(i) for i in flag.evidence["event_ids"])
    assert f"<dt>Manager's decision</dt><dd>resolved, on events {seen}:" in detail
    session.refresh(flag)
    assert flag.status == FlagStatus.RESOLVED
    assert ("flag_resolved", str(flag.id), day.manager.id) in audit_actions(session)
    again = pages.post(f"/web/flags/{flag.id}/resolve", note="twice")
    assert again.status_code == 200  # its page again, with no form to decide on it
    assert "it is already resolved" in again.get_data(as_text=True)


def test_a_flag_decided_from_its_page_covers_only_the_evidence_the_page_showed(
    app: Flask, client: FlaskClient, session: Session, world: Any, auth: Auth
) -> None:
    """19:00: the manager opens a ``missing_at_handover`` flag: its evidence is the
    check-out, and the courier says the parcel is in the van. Before they press Resolve,
    the PDA's late batch lands: the parcel was lost on the route, and the flag's
    evidence names that too. The resolution would settle the loss unseen: it is refused,
    and the flag, read again, shows it; resolved from there, it covers both."""
    from tests.courier_api.test_shifts_api import Courier, parcels

    a, b = parcels(session, world, 2)
    pda = Courier(client, auth, "courier1", "PDA-0001")
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(b), pda.event(a, "delivered")])
    lost = pda.event(b, "exception", reason="lost")  # recorded on the route, still on the PDA
    assert pda.close(shift["id"]).status_code == 200
    flag = session.scalars(select(Flag).where(Flag.kind == "missing_at_handover")).one()
    pages = signed_in(app, "manager1")
    path, resolve = f"/web/flags/{flag.id}", f"/web/flags/{flag.id}/resolve"
    shown = pages.get(path)
    assert "exception" not in shown  # the check-out only

    pda.push([lost])
    response = pages.submit(shown, resolve, note="in the van")
    assert response.status_code == 200  # the flag's page again, read anew
    html = response.get_data(as_text=True)
    assert f"Not resolved: the evidence of flag {flag.id} changed since it was read" in html
    assert 'value="in the van"' in html  # the note typed, to say more before resolving
    assert "read the flag again before resolving it" in html and "exception" in html
    session.refresh(flag)
    assert (flag.status, flag.decision) == (FlagStatus.OPEN, None)

    pages.submit(html, resolve, note="lost on the route: reported")
    assert f"Flag {flag.id} is resolved." in pages.get(path)
    session.refresh(flag)
    assert flag.status == FlagStatus.RESOLVED
    assert flag.decided_on == {"event_ids": flag.evidence["event_ids"]}
    assert len(flag.evidence["event_ids"]) == 2


def test_a_refused_flag_decision_keeps_the_note_in_that_flags_form_only(
    app: Flask, session: Session, day: StationDay
) -> None:
    """A push changes a flag's evidence while the manager writes how it was resolved:
    "Not resolved: the evidence ... changed", on the queue they decided from or on the
    flag's page, and the note typed is in that flag's resolve form again, not in
    another flag's nor in its acknowledge form."""
    pages = signed_in(app, "manager")
    flag = day.flag(session, "unauthorized_locker_drop")
    other = day.flag(
        session, "missing_at_handover", subject_key=f"{day.unbalanced.id}:{day.missing_parcel}"
    )
    back = f"/web/flags?station={day.station.id}"
    note = "Recipient agreed by phone at 18:40: the locker was her choice"
    refused = pages.post(
        f"/web/flags/{flag.id}/resolve", note=note, evidence_version="0" * 16, next=back
    )
    assert refused.status_code == 200
    queue = refused.get_data(as_text=True)
    assert "Not resolved: the evidence of flag" in queue
    rows = dict(re.findall(r'<tr id="flag-(\d+)"[^>]*>(.*?)</tr>', queue, re.S))
    assert {str(flag.id), str(other.id)} <= set(rows)
    assert (
        f'placeholder="How it was resolved" required maxlength="2000" value="{note}"'
        in (rows[str(flag.id)])
    )
    assert note not in rows[str(other.id)]
    assert rows[str(flag.id)].count(note) == 1  # not in its acknowledge form

    acknowledged = pages.post(
        f"/web/flags/{other.id}/acknowledge", note="on it", evidence_version="0" * 16
    )
    assert acknowledged.status_code == 200  # no next: the flag's page
    page = acknowledged.get_data(as_text=True)
    assert "Not acknowledged: the evidence of flag" in page
    assert 'placeholder="Note (optional)" maxlength="2000" value="on it"' in page
    session.refresh(flag)
    session.refresh(other)
    assert flag.status == other.status == FlagStatus.OPEN


def test_the_flag_queue_finds_a_kind_written_as_the_queue_shows_it(
    app: Flask, session: Session, day: StationDay
) -> None:
    """The queue writes each kind in words ("unauthorized locker drop"). The Kind filter
    offers the kinds so written and takes them typed in a link too, in any case;
    otherwise the words the queue shows match nothing and "No flag matches" hides why.
    A kind that is none is said so, naming the kinds."""
    pages = signed_in(app, "manager")
    flag = day.flag(session, "unauthorized_locker_drop")
    queue = pages.get("/web/flags")
    assert '<option value="unauthorized_locker_drop">unauthorized locker drop</option>' in queue
    for typed in (
        "unauthorized+locker+drop",
        "Unauthorized+Locker+Drop",
        "unauthorized_locker_drop",
    ):
        html = pages.get(f"/web/flags?kind={typed}")
        assert re.findall(r'<tr id="flag-(\d+)"', html) == [str(flag.id)]
        assert '<option value="unauthorized_locker_drop" selected>' in html
    unknown = pages.get("/web/flags?kind=locker+drop", status=422)
    assert "kind: no flag is of kind “locker drop”; the kinds are:" in unknown
    assert "unauthorized locker drop, unknown parcel" in unknown
    assert "No flag matches" not in unknown


def test_a_manager_signs_off_and_a_provisional_balance_needs_a_reason(
    app: Flask, session: Session, day: StationDay
) -> None:
    pages = signed_in(app, "manager")
    path = f"/web/shifts/{day.provisional.id}"
    response = pages.post(f"{path}/signoff", note="checked what came")
    assert response.status_code == 200  # the page again, with the note typed
    refused = response.get_data(as_text=True)
    assert "Not signed off: the balance is provisional" in refused
    assert ">checked what came</textarea>" in refused
    session.refresh(day.provisional)
    assert day.provisional.status == ShiftStatus.CLOSED
    pages.post(f"{path}/signoff", note="checked what came", force_reason="PDA broken")
    html = pages.get(path)
    assert f"Shift {day.provisional.id} is signed off." in html
    assert "(forced: PDA broken)" in html and f"{path}/signoff" not in html
    session.refresh(day.provisional)
    assert day.provisional.status == ShiftStatus.SIGNED_OFF
    assert day.provisional.signoff_forced_reason == "PDA broken"
    assert ("shift_signed_off", str(day.provisional.id), day.manager.id) in audit_actions(session)
    response = pages.post(f"/web/shifts/{day.balanced.id}/signoff", note="")
    assert response.status_code == 200
    assert "Not signed off: note is required" in response.get_data(as_text=True)


def test_a_refused_sign_off_keeps_the_note_and_the_reason_the_manager_typed(
    app: Flask, session: Session, day: StationDay
) -> None:
    """The manager writes a long note on a provisional shift and forgets the reason: the
    page says "Not signed off: the balance is provisional ..." and must not come back
    with an empty note. The same when a push changed the balance meanwhile: the note
    and the reason typed are there to send again once the page is read anew. (Shown
    again in the answer: a note of 2,000 characters does not fit in the session's
    cookie.)"""
    pages = signed_in(app, "manager")
    path = f"/web/shifts/{day.provisional.id}"
    [shown] = re.findall(r'name="balance_version" value="([0-9a-f]{16})"', pages.get(path))
    note = "Called the recipient about the parcel: left with the neighbour, seq 2 on the PDA"
    refused = pages.post(f"{path}/signoff", note=note, balance_version=shown)
    assert refused.status_code == 200
    page = refused.get_data(as_text=True)
    assert "Not signed off: the balance is provisional" in page
    assert f'placeholder="What you checked">{note}</textarea>' in page, "the note typed is lost"
    assert f'name="balance_version" value="{shown}"' in page

    reason = "PDA broken, screen shows seq 2 was the delivery"
    stale = "0" * 16 if shown != "0" * 16 else "1" * 16
    refused = pages.post(f"{path}/signoff", note=note, force_reason=reason, balance_version=stale)
    assert refused.status_code == 200
    page = refused.get_data(as_text=True)
    assert f"Not signed off: shift {day.provisional.id}: its balance changed since" in page
    assert f">{note}</textarea>" in page and f">{reason}</textarea>" in page
    session.refresh(day.provisional)
    assert day.provisional.status == ShiftStatus.CLOSED
    # Kept for that answer only: the page read again is empty.
    assert note not in pages.get(path)


def test_a_manager_writes_off_the_lost_seqs_of_a_provisional_shift_on_its_page(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Seq 4 of the provisional shift never reached the server: the page offers the
    write-off beside it; refused (a seq the server holds, no reason) it comes back with
    what was typed; done, the page names the seqs written off, by whom and why, instead
    of a provisional balance, and the sign-off needs no forcing."""
    pages = signed_in(app, "manager")
    path = f"/web/shifts/{day.provisional.id}"
    page = pages.get(path)
    assert 'id="write-off-lost-seqs"' in page and 'id="written-off-seqs"' not in page
    read = signed_in(app, "auditor").get(path)  # the seqs missing, and no form
    assert 'id="missing-seqs"' in read and 'id="write-off-lost-seqs"' not in read
    refused = pages.post(f"{path}/lost-seqs", seqs="3-4", reason="PDA reset")
    assert refused.status_code == 200
    shown = refused.get_data(as_text=True)
    assert "Not written off: seqs 3 of device PDA-PDG-03 are not missing" in shown
    assert 'value="3-4"' in shown and ">PDA reset</textarea>" in shown
    no_reason = pages.post(f"{path}/lost-seqs", seqs="4")
    assert "Not written off: say why" in no_reason.get_data(as_text=True)
    done = pages.submit(page, f"{path}/lost-seqs", seqs="4", reason="PDA reset at noon")
    assert done.status_code == 302
    page = pages.get(path)
    assert "1 sequence number written off as lost" in page
    written_off = re.search(r'id="written-off-seqs">(.*?)</div>', page, re.S)
    assert written_off, page
    manager = session.scalars(select(User).where(User.username == "manager")).one()
    assert f"by {manager.full_name}: “PDA reset at noon”" in written_off.group(1)
    assert 'id="missing-seqs"' not in page and "Reason to sign off now" not in page
    assert [a for a, *_ in audit_actions(session)][-1] == "lost_seqs_written_off"


def test_a_pda_moved_to_another_station_is_written_off_from_an_old_shifts_page_here(
    app: Flask, session: Session, day: StationDay
) -> None:
    """The provisional shift's PDA moved to the other station since. Its page wrote its
    seqs off filed under the other station, where this manager could not read the
    write-off they made; then it offered none, sending the manager to the other
    station, whose manager may not write off this station's shift's seqs (rule 7).
    The seqs are this station's shift's: the page offers the write-off, saying whose
    the PDA is now, and the write-off is made here, where this manager reads it."""
    device = session.get(Device, day.provisional.device_id)
    assert device is not None
    device.station_id = day.other_station.id
    session.commit()
    pages = signed_in(app, "manager")
    path = f"/web/shifts/{day.provisional.id}"
    page = pages.get(path)
    assert 'id="write-off-lost-seqs"' in page and 'id="pda-elsewhere"' in page
    missing = re.search(r'<span class="seqs">([^<]*)</span>', page)
    assert missing is not None
    done = pages.post(f"{path}/lost-seqs", seqs=missing.group(1), reason="PDA reset at noon")
    assert done.status_code == 302, done.get_data(as_text=True)
    [written] = session.scalars(select(SeqWriteOff)).all()
    assert written.station_id == day.station.id


def test_the_seqs_a_close_declared_beyond_the_highest_held_are_written_off_on_the_page(
    app: Flask, session: Session, day: StationDay
) -> None:
    """The open shift's PDA pushed seqs 1-4; closed declaring last_seq 6, its last batch
    (5 and 6) never came and the PDA was reset. The page names 5 and 6 as not received
    and offers the write-off; seqs beyond the 6 declared are refused, saying so; 5-6
    (copied from the page as 5–6) are written off, and the balance waits no more."""
    pages = signed_in(app, "manager")
    path = f"/web/shifts/{day.open.id}"
    assert pages.post(f"{path}/close", last_seq="6").status_code == 302
    page = pages.get(path)
    missing = re.search(r'id="missing-seqs">(.*?)</div>', page, re.S)
    assert missing and '<span class="seqs">5, 6</span>' in missing.group(1)
    assert 'id="write-off-lost-seqs"' in page
    refused = pages.post(f"{path}/lost-seqs", seqs="5-8", reason="PDA reset")
    shown = refused.get_data(as_text=True)
    assert f"Not written off: seqs 7-8 of device {day.open.device_id} are not missing" in shown
    assert "7-8 are beyond seq 6" in shown and 'value="5-8"' in shown
    done = pages.submit(page, f"{path}/lost-seqs", seqs="5–6", reason="PDA reset before upload")
    assert done.status_code == 302
    page = pages.get(path)
    assert 'id="missing-seqs"' not in page and "2 sequence numbers written off as lost" in page
    written_off = re.search(r'id="written-off-seqs">(.*?)</div>', page, re.S)
    assert written_off and "5–6: written off" in written_off.group(1)
    assert "“PDA reset before upload”" in written_off.group(1)
    assert "Reason to sign off now" not in page


@pytest.mark.parametrize("typed", ["0", "-1"], ids=["before its seqs held", "not a seq"])
def test_a_refused_close_keeps_the_last_seq_the_manager_typed(
    app: Flask, session: Session, day: StationDay, typed: str
) -> None:
    """A last seq the rules refuse (before seqs the shift holds) or the form does (not a
    seq) is told, with the page shown again holding the number typed, the shift open."""
    pages = signed_in(app, "manager")
    refused = pages.post(f"/web/shifts/{day.open.id}/close", last_seq=typed)
    assert refused.status_code == 200
    page = refused.get_data(as_text=True)
    assert "Not closed: " in page
    assert 'name="last_seq"' in page and f'value="{typed}"' in page
    session.refresh(day.open)
    assert day.open.status == ShiftStatus.OPEN


def test_the_sign_off_form_signs_only_the_balance_the_page_showed(
    app: Flask, session: Session, day: StationDay
) -> None:
    pages = signed_in(app, "manager")
    path = f"/web/shifts/{day.balanced.id}"
    [shown] = re.findall(r'name="balance_version" value="([0-9a-f]{16})"', pages.get(path))
    stale = "0" * 16 if shown != "0" * 16 else "1" * 16  # a balance that changed since
    refused = pages.post(f"{path}/signoff", note="checked", balance_version=stale)
    assert refused.status_code == 200
    assert "its balance changed since it was read" in refused.get_data(as_text=True)
    session.refresh(day.balanced)
    assert day.balanced.status == ShiftStatus.CLOSED
    pages.post(f"{path}/signoff", note="checked", balance_version=shown)
    assert f"Shift {day.balanced.id} is signed off." in pages.get(path)


def test_a_signed_off_shift_whose_balance_changed_since_says_so_on_its_page_and_the_board(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Zhang Min's shift is signed off with its two discrepancies (a locker drop without
    consent, a parcel missing). The recipient's consent, dated before the drop, reaches
    the server hours later: the drop is now judged ``consent_after_drop`` (recorded
    beyond the grace). No event of the shift arrived, so it stays signed off; its page
    shows the discrepancies signed off and those now, and the board marks it."""
    pages = signed_in(app, "manager")
    path = f"/web/shifts/{day.unbalanced.id}"
    pages.post(f"{path}/signoff", note="locker drop without consent; one parcel missing")
    assert f"Shift {day.unbalanced.id} is signed off." in pages.get(path)
    assert "changed since" not in pages.get(path) + pages.get(f"/web/board?date={day.day}")
    client = app.test_client()
    headers = Auth(client).headers("recipient-app")
    granted = _app_consent_before_the_drop(client, session, day, headers)
    assert granted.status_code == 201, granted.get_json()
    html = pages.get(path)
    assert "The balance has changed since the sign-off" in html
    missing = f"missing at handover {day.missing_parcel}"
    drop, gaps = day.dropped_parcel, "0 sequence numbers missing"
    was, now = f"unauthorized locker drop {drop}", f"consent after drop {drop}"
    both = sorted([(day.missing_parcel, missing), (drop, "{}")])
    listed = "; ".join(text for _, text in both)
    assert f"<li>Signed off: unbalanced, {gaps}: {listed.format(was)}</li>" in html
    assert f"<li>Now: unbalanced, {gaps}: {listed.format(now)}</li>" in html
    assert "Signed off " in html and f"{path}/signoff" not in html  # the sign-off stands
    board = pages.get(f"/web/board?date={day.day}")
    assert "1 changed since</span>" in board
    row = re.search(rf'<tr class="row-\w+" id="shift-{day.unbalanced.id}">(.*?)</tr>', board, re.S)
    assert row is not None and "changed since" in row.group(1)


def test_the_proof_search_shows_the_consent_behind_each_drop(
    app: Flask, session: Session, day: StationDay
) -> None:
    pages = signed_in(app, "auditor")
    html = pages.get(f"/web/proofs?station={day.station.id}&method=locker")
    rows = re.findall(r'<tr id="proof-(\d+)">', html)
    assert sorted(rows) == sorted([str(day.authorized_drop_event_id), str(day.drop_event_id)])
    authorized = html.split(f'id="proof-{day.authorized_drop_event_id}"')[1].split("</tr>")[0]
    assert "Authorized by consent #" in authorized and "in person" in authorized
    dropped = html.split(f'id="proof-{day.drop_event_id}"')[1].split("</tr>")[0]
    assert "No consent before this drop" in dropped
    pickup = pages.get(f"/web/proofs?station={day.station.id}&method=pickup_point")
    assert "No consent (not required for this class)" in pickup
    assert "photo: not uploaded yet" in pages.get(f"/web/proofs?station={day.station.id}")
    assert 'href="/web/proofs/export.csv?station=' in html and "method=locker" in html


def test_each_drop_gets_the_consent_the_api_names(session: Session, day: StationDay) -> None:
    proofs = [
        get_proof(session=session, event_id=event_id, policy=Policy())
        for event_id in (day.authorized_drop_event_id, day.drop_event_id)
    ]
    found = drop_consents(
        session=session,
        drops=[(p.proof.event.id, p.proof.parcel) for p in proofs],
        policy=Policy(),
    )
    assert found[day.authorized_drop_event_id].consent is not None
    for proof in proofs:
        consent = found[proof.proof.event.id].consent
        api_consent = proof.authorizing_consent
        assert (consent.id if consent else None) == (api_consent.id if api_consent else None)


def test_the_proof_pages_name_the_time_zone_of_their_times(
    app: Flask, session: Session, day: StationDay
) -> None:
    """The proofs of every station are listed in UTC, a station's and a proof's own page
    in the station's zone (Asia/Shanghai): without saying which, one drop read 02:35 on
    one page and 10:35 on the next, and an auditor judging "delivered late" could not
    tell which was the time at the door."""
    drop = session.get(ScanEvent, day.drop_event_id)
    assert drop is not None
    pages = signed_in(app, "auditor")
    for path, zone in (
        ("/web/proofs?method=locker", "UTC"),
        (f"/web/proofs?station={day.station.id}&method=locker", day.station.timezone),
        (f"/web/proofs/{drop.id}", day.station.timezone),
    ):
        html = pages.get(path)
        assert f"Times in {zone}." in html, path
        assert f"{drop.occurred_at.astimezone(ZoneInfo(zone)):%Y-%m-%d %H:%M:%S}" in html, path


def test_the_flag_shift_and_board_pages_name_the_time_zone_of_their_times(
    app: Flask, session: Session, day: StationDay
) -> None:
    """The auditor reads when a manager resolved a flag on its page (History), to set
    it beside the audit log's `at` (UTC) and the proof page (which says "Times in
    Asia/Shanghai"). The flag page prints the station's wall clock, the flag queue
    without a station UTC, and neither says which: the one resolution reads as two
    times eight hours apart, and the auditor cannot tell which is right. The shift
    page and the board, in the station's zone, say so too."""
    flag = day.flag(session, "unauthorized_locker_drop")
    pages = signed_in(app, "auditor")
    zone = day.station.timezone
    for path, shown_in in (
        (f"/web/flags/{flag.id}", zone),
        ("/web/flags?kind=unauthorized_locker_drop", "UTC"),
        (f"/web/flags?station={day.station.id}&kind=unauthorized_locker_drop", zone),
    ):
        html = pages.get(path)
        assert f"Times in {shown_in}." in html, path
        assert f"{flag.raised_at.astimezone(ZoneInfo(shown_in)):%Y-%m-%d %H:%M:%S}" in html, path
    shift = pages.get(f"/web/shifts/{day.unbalanced.id}")
    assert f"Times in {zone}." in shift
    assert f"{day.unbalanced.opened_at.astimezone(ZoneInfo(zone)):%Y-%m-%d %H:%M:%S}" in shift
    board = pages.get(f"/web/board?station={day.station.id}&date={day.day}")
    assert f"Times in {zone}." in board


def test_the_daily_report_draws_two_charts_with_tables_beside_them(
    app: Flask, session: Session
) -> None:
    history = station_day.build(session, app.config["BLOB_DIR"], history_days=3)
    html = signed_in(app, "manager").get(f"/web/reports/daily?date={history.day}")
    assert html.count("<svg ") == 2
    assert 'role="img" aria-labelledby="chart-couriers-title chart-couriers-desc"' in html
    couriers = html.split('id="chart-couriers"')[1].split("</figure>")[0]
    assert couriers.count('<rect class="bar') == 4 * 5  # four couriers, five series
    assert "<title>Zhang Min: Discrepancies 2</title>" in couriers
    week = html.split('id="chart-week"')[1].split("</figure>")[0]
    assert f"<title>{history.day}: Missing 4</title>" in week
    first = history.day - dt.timedelta(days=6)
    assert f">{first}</a></th>" in html and f">{history.day}</a></th>" in html
    assert "Outcomes per courier (the chart's numbers)" in html


def test_a_future_day_has_no_report(app: Flask, day: StationDay) -> None:
    tomorrow = dt.date.today() + dt.timedelta(days=3)
    html = signed_in(app, "manager").get(f"/web/reports/daily?date={tomorrow}", status=422)
    assert "cannot be computed before the period begins" in html


def test_no_page_needs_javascript(app: Flask, session: Session, day: StationDay) -> None:
    pages = signed_in(app, "admin")
    flag = day.flag(session, "unauthorized_locker_drop")
    anonymous = Pages(app.test_client())
    for path in (
        f"/web/board?date={day.day}",
        f"/web/shifts/{day.unbalanced.id}",
        "/web/flags",
        f"/web/flags/{flag.id}",
        "/web/proofs",
        f"/web/proofs/{day.drop_event_id}",
        f"/web/reports/daily?date={day.day}",
        "/web/login",
    ):
        html = anonymous.get(path) if path == "/web/login" else pages.get(path)
        assert "<script" not in html, path
        assert not re.search(r"<[^>]+\s(style|on[a-z]+)=", html), path  # blocked by the CSP
        assert '<link rel="icon" href="data:,">' in html


def test_unknown_things_and_bad_filters_get_html_pages(app: Flask, day: StationDay) -> None:
    pages = signed_in(app, "manager")
    assert "no shift with id 999999" in pages.get("/web/shifts/999999", status=404)
    assert "Not found" in pages.get("/web/flags/999999", status=404)
    assert "there is no page /web/nowhere/at/all" in pages.get("/web/nowhere/at/all", status=404)
    assert app.test_client().get("/web/nowhere").content_type.startswith("text/html")
    assert "courier_id" in pages.get("/web/proofs?courier_id=abc", status=422)
    assert "occurred_from must be before" in pages.get(
        f"/web/proofs?occurred_from={day.day}&occurred_to={day.day - dt.timedelta(days=2)}",
        status=422,
    )


# -- images, audit, CSV -----------------------------------------------------------------------


def test_the_proof_page_links_no_shift_its_reader_cannot_open(
    app: Flask, session: Session, day: StationDay
) -> None:
    """A PDG parcel that a courier of MHG scanned and left in a locker (mis-sorted) is
    PDG's, its drop filed under MHG's shift. PDG's manager reads the proof: the page
    neither links nor names that shift (it would answer a 404 page, and give away
    another station's shift id), as the flag page does; the admin gets the link."""
    drop = station_day.mis_sorted_drop(session, day)
    shift, event_id = drop.shift, drop.drop_id
    manager = signed_in(app, "manager")
    html = manager.get(f"/web/proofs/{event_id}")
    assert f"shift {shift.id}" not in html and "/web/shifts/" not in html
    assert "a shift of another station" in html
    admin = signed_in(app, "admin").get(f"/web/proofs/{event_id}")
    assert f'href="/web/shifts/{shift.id}"' in admin


def test_proof_images_are_served_to_who_may_read_them(
    app: Flask, session: Session, day: StationDay
) -> None:
    digest = day.uploaded[0]
    manager = signed_in(app, "manager")
    response = manager.client.get(f"/web/images/{digest}")
    assert response.status_code == 200 and response.content_type == "image/png"
    assert response.data.startswith(b"\x89PNG")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert manager.client.get(f"/web/images/{day.not_uploaded}").status_code == 404
    assert manager.client.get("/web/images/not-a-digest").status_code == 422
    assert Pages(app.test_client()).client.get(f"/web/images/{digest}").status_code == 302
    blob = session.get(Blob, digest)
    assert blob is not None
    blob.purged_at = dt.datetime.now(dt.UTC)
    session.commit()
    assert manager.client.get(f"/web/images/{digest}").status_code == 410
    html = manager.get(f"/web/shifts/{day.balanced.id}")
    assert f"/web/images/{digest}" not in html


def test_a_proof_image_altered_in_the_store_is_shown_as_altered_not_served(
    app: Flask, session: Session, day: StationDay
) -> None:
    """The photo of the drop's proof was replaced in BLOB_DIR: the proof page and the
    shift page say so in its place, with no image to load, and the image route
    refuses it (409) rather than serve other bytes as the photo the PDA uploaded."""
    proof = get_proof(session=session, event_id=day.drop_event_id, policy=Policy())
    photo = proof.proof.event.details["pod"]["photo_sha256"]
    FileBlobStore(app.config["BLOB_DIR"]).path(photo).write_bytes(b"\x89PNG not the photo")
    auditor = signed_in(app, "auditor")
    for page in (f"/web/proofs/{day.drop_event_id}", f"/web/shifts/{day.unbalanced.id}"):
        html = auditor.get(page)
        assert "file altered in the store: not shown" in html, page
        assert f"/web/images/{photo}" not in html, page
    assert auditor.client.get(f"/web/images/{photo}").status_code == 409


def test_the_proof_search_hashes_no_image_and_leaves_integrity_to_the_proofs_page(
    app: Flask, session: Session, day: StationDay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A search page listed up to 50 proofs and hashed both images of each (8 MiB each at
    most) on every view: any signed-in reader could make the server read some 800 MiB
    a click. As the API's search, it reads no image file now; each image on record
    links to its proof's page, which hashes that proof's images and says when one was
    altered (and the image route refuses it: it is never shown as the genuine one)."""
    hashed: list[int] = []  # bytes each read of the store hashes
    for name in ("verify", "read"):
        original = getattr(FileBlobStore, name)

        def counted(self: Any, digest: str, *, size: int, _original: Any = original) -> Any:
            hashed.append(size)
            return _original(self, digest, size=size)

        monkeypatch.setattr(FileBlobStore, name, counted)
    proof = get_proof(session=session, event_id=day.drop_event_id, policy=Policy())
    photo = proof.proof.event.details["pod"]["photo_sha256"]
    FileBlobStore(app.config["BLOB_DIR"]).path(photo).write_bytes(b"\x89PNG not the photo")
    auditor = signed_in(app, "auditor")
    html = auditor.get(f"/web/proofs?station={day.station.id}")
    assert hashed == []
    row = html.split(f'id="proof-{day.drop_event_id}"')[1].split("</tr>")[0]
    assert f'<a href="/web/proofs/{day.drop_event_id}#images">photo</a>' in row
    assert f"/web/images/{photo}" not in html  # nothing loads it from the search
    assert "photo: not uploaded yet" in html  # what the records say is still shown
    detail = auditor.get(f"/web/proofs/{day.drop_event_id}")
    assert hashed, "the proof's page checks its images"
    assert 'id="images"' in detail and "file altered in the store: not shown" in detail


@pytest.mark.parametrize("started", ["same-site", "cross-site"])
def test_a_page_another_site_sends_the_browser_to_reads_nothing_in_the_auditors_name(
    app: Flask, session: Session, day: StationDay, started: str
) -> None:
    """SameSite=Strict keeps the session off a link from another site, but not off one
    from a sibling host of the same site (a chat or a wiki at another subdomain), nor
    an image such a page embeds: the auditor following it put a ``proof_read`` (or a
    ``blob_read``, a ``parcel_read``) on record in their name without knowing, which
    SECURITY.md says a link from elsewhere cannot. A request the browser says another
    site started (``Sec-Fetch-Site``) is answered as one without a session: the sign-in
    page, which does not send it back on its own, and the page opens once signed in."""
    auditor = signed_in(app, "auditor")
    before = len(audit_actions(session))
    elsewhere = {"Sec-Fetch-Site": started}
    for path in (
        f"/web/proofs/{day.drop_event_id}",
        f"/web/shifts/{day.unbalanced.id}",
        f"/web/images/{day.uploaded[0]}",
    ):
        landed = auditor.client.get(path, headers=elsewhere)
        assert landed.status_code == 302 and landed.location.startswith("/web/login?next="), (
            path,
            landed.status_code,
        )
        login = auditor.client.get(landed.location, headers=elsewhere)
        assert login.status_code == 200  # the form, not back to the page (a loop)
    assert len(audit_actions(session)) == before

    own = auditor.client.get(
        f"/web/proofs/{day.drop_event_id}", headers={"Sec-Fetch-Site": "same-origin"}
    )
    assert own.status_code == 200
    typed = auditor.client.get(
        f"/web/shifts/{day.unbalanced.id}", headers={"Sec-Fetch-Site": "none"}
    )
    assert typed.status_code == 200  # typed in, or a bookmark
    assert [action for action, *_ in audit_actions(session)[before:]] == [
        "proof_read",
        "proofs_searched",
        "parcel_read",
    ]


def test_auditor_reads_are_audit_logged_and_managers_are_not(
    app: Flask, session: Session, day: StationDay
) -> None:
    before = len(audit_actions(session))
    manager = signed_in(app, "manager")
    manager.get(f"/web/proofs/{day.drop_event_id}")
    manager.get(f"/web/shifts/{day.unbalanced.id}")
    manager.client.get(f"/web/images/{day.uploaded[0]}")
    assert len(audit_actions(session)) == before
    auditor = signed_in(app, "auditor")
    auditor.get(f"/web/proofs?station={day.station.id}&method=locker")
    auditor.get(f"/web/proofs/{day.drop_event_id}")
    auditor.get(f"/web/shifts/{day.unbalanced.id}")
    auditor.client.get(f"/web/images/{day.uploaded[0]}")
    auditor.client.get(f"/web/proofs/export.csv?station={day.station.id}").close()
    logged = audit_actions(session)[before:]
    assert logged == [
        ("proofs_searched", "search", day.auditor.id),
        ("proof_read", str(day.drop_event_id), day.auditor.id),
        ("proofs_searched", f"shift:{day.unbalanced.id}", day.auditor.id),
        ("parcel_read", str(day.unbalanced.id), day.auditor.id),
        ("blob_read", day.uploaded[0], day.auditor.id),
        ("proofs_exported", "export", day.auditor.id),
    ]
    search = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "proofs_searched").order_by(AuditEntry.id)
    ).first()
    assert search is not None
    assert sorted(search.details["event_ids"]) == sorted(
        [day.authorized_drop_event_id, day.drop_event_id]
    )


@pytest.mark.parametrize("failing", ["second_record", "rendering"])
def test_an_auditors_shift_or_flag_page_that_fails_after_its_reads_leaves_no_read_on_record(
    app: Flask,
    session: Session,
    day: StationDay,
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
) -> None:
    """An auditor opens the page of a shift with discrepancies: its proofs shown
    (``proofs_searched``) and its recipients (``parcel_read``) go on record. Each was
    committed on its own before the page was rendered, so a second write that failed
    (on a SQLite file, the writers' turn taken again while PDAs push: a 503) or a page
    that failed to render left a read on record of a page never shown. They are
    recorded together once the page is rendered, as on a proof's page; so is a flag
    page's read of its proofs."""
    from sqlalchemy.exc import OperationalError

    from courier_api.web import views
    from sync import audit

    appended = audit.append

    def busy_at_the_second(**kwargs: Any) -> Any:
        if kwargs["action"] == "parcel_read":
            raise OperationalError("INSERT INTO audit_entry", {}, Exception("database is locked"))
        return appended(**kwargs)

    def broken(*_args: Any, **_kwargs: Any) -> str:
        raise RuntimeError("the template failed")

    auditor = signed_in(app, "auditor")
    before = audit_actions(session)
    if failing == "second_record":
        monkeypatch.setattr(audit, "append", busy_at_the_second)
        response = auditor.client.get(f"/web/shifts/{day.unbalanced.id}")
        assert response.status_code == 503, response.status_code
    else:
        monkeypatch.setattr(views, "render_template", broken)
        for path in (
            f"/web/shifts/{day.unbalanced.id}",
            f"/web/flags/{day.flag(session, 'unauthorized_locker_drop').id}",
        ):
            with pytest.raises(RuntimeError):
                auditor.client.get(path)
    session.expire_all()
    assert audit_actions(session) == before


def test_an_auditors_read_of_a_shift_page_showing_a_missing_parcels_recipient_is_logged(
    app: Flask, session: Session, day: StationDay
) -> None:
    """A lost parcel (``missing_at_handover``): no delivery among its evidence, so no
    proof read to log, but the shift page shows an auditor its recipient, phone
    unmasked, and address, as ``GET /api/v1/parcels/<tn>`` does, which logs
    ``parcel_read``. The page logs the same, naming the discrepancies' parcels."""
    missing = session.scalars(select(Parcel).where(Parcel.tracking_no == day.missing_parcel)).one()
    assert missing.recipient_phone
    before = len(audit_actions(session))
    html = signed_in(app, "auditor").get(f"/web/shifts/{day.unbalanced.id}")
    assert missing.recipient_phone in html and missing.address in html
    session.expire_all()
    [read] = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "parcel_read").order_by(AuditEntry.id)
    ).all()
    assert (read.subject_type, read.subject_key, read.actor_id) == (
        "shift",
        str(day.unbalanced.id),
        day.auditor.id,
    )
    assert read.details == {"tracking_nos": sorted([day.missing_parcel, day.dropped_parcel])}
    assert len(audit_actions(session)) > before


@pytest.mark.parametrize("username", ["auditor", "manager"])
def test_the_csv_export_is_the_apis_for_the_same_filter(
    app: Flask, client: FlaskClient, auth: Auth, day: StationDay, username: str
) -> None:
    pages = signed_in(app, username)
    start, end = day_bounds(day.day, station_day.TIMEZONE)
    web = pages.client.get(
        f"/web/proofs/export.csv?station={day.station.id}&method=in_person"
        f"&occurred_from={day.day}&occurred_to={day.day}"
    )
    assert web.status_code == 200
    assert web.headers["Content-Disposition"] == 'attachment; filename="proofs.csv"'
    assert web.content_type.startswith("text/csv")
    web_text = web.get_data(as_text=True)  # read a stream before the next request
    api_csv = client.get(
        "/api/v1/proofs/export.csv",
        query_string={
            "station_id": day.station.id,
            "method": "in_person",
            "occurred_from": start.isoformat(),
            "occurred_to": end.isoformat(),
        },
        headers=auth.headers(username),
    )
    # The same lines, but the last, naming each its own export (``export_id``).
    assert exported(web_text) == exported(api_csv.get_data(as_text=True))
    assert web_text.splitlines()[:-1] == api_csv.get_data(as_text=True).splitlines()[:-1]
    assert len(exported(web_text)) == 7
    everything = pages.client.get("/web/proofs/export.csv").get_data(as_text=True)
    api_all = client.get("/api/v1/proofs/export.csv", headers=auth.headers(username))
    assert exported(everything) == exported(api_all.get_data(as_text=True))
    assert len(exported(everything)) > len(exported(web_text))


def test_an_export_with_its_days_the_wrong_way_round_is_an_error_page(
    app: Flask, day: StationDay
) -> None:
    """Its filters are checked before the download starts, not halfway through it."""
    pages = signed_in(app, "manager")
    response = pages.client.get(
        "/web/proofs/export.csv?occurred_from=2026-11-20&occurred_to=2026-11-10"
    )
    assert response.status_code == 422 and response.mimetype == "text/html"
    assert "occurred_from must be before occurred_to" in response.get_data(as_text=True)


def test_pages_send_security_headers(app: Flask, day: StationDay) -> None:
    pages = Pages(app.test_client())
    login = pages.client.get("/web/login")
    for name, value in PAGE_HEADERS.items():
        assert login.headers[name] == value
    assert login.headers["Cache-Control"] == "no-store"
    pages.login("manager")
    for path in (f"/web/board?date={day.day}", f"/web/images/{day.uploaded[0]}"):
        response = pages.client.get(path)
        for name, value in PAGE_HEADERS.items():
            assert response.headers[name] == value, (path, name)
        assert response.headers["Cache-Control"] == "no-store", path
    css = pages.client.get("/web/static/web.css")
    assert css.status_code == 200 and css.content_type.startswith("text/css")
    assert "no-store" not in css.headers.get("Cache-Control", "")
    css.close()


def test_no_page_lets_a_browser_frame_it(app: Flask, day: StationDay) -> None:
    """Clickjacking: a site framing the sign-off form under a decoy button. The CSP's
    ``frame-ancestors 'none'`` stops browsers that read it; one that does not (CSP
    level 1, an embedded browser on a station's terminal) framed the pages as it was
    told nothing: ``X-Frame-Options: DENY`` tells it, on every page and error page."""
    pages = Pages(app.test_client())
    assert pages.client.get("/web/login").headers.get("X-Frame-Options") == "DENY"
    pages.login("manager")
    shift_id = day.unbalanced.id
    for path in (f"/web/board?date={day.day}", f"/web/shifts/{shift_id}", "/web/no-such-page"):
        assert pages.client.get(path).headers.get("X-Frame-Options") == "DENY", path
    forged = pages.client.post(f"/web/shifts/{shift_id}/signoff", data={"note": "ok"})
    assert forged.status_code == 400
    assert forged.headers.get("X-Frame-Options") == "DENY"


def test_the_pages_hold_no_script_for_their_policy_to_refuse() -> None:
    """The pages work without JavaScript (the browser tests drive them with it off too),
    so their policy allows no script at all: one injected into a page runs nowhere, not
    even from a file of ours. A script added to a template or to static/ would be
    refused by the browser: this says so before a browser does."""
    package = Path(courier_api.__file__).parent
    scripted = re.compile(r"<script|\son[a-z]+\s*=|javascript:", re.I)
    for template in sorted((package / "templates").rglob("*.html")):
        found = scripted.search(template.read_text(encoding="utf-8"))
        assert found is None, (template.name, found.group())
    assert [f.name for f in (package / "static").rglob("*") if f.suffix in (".js", ".mjs")] == []


def test_a_proof_image_shown_on_the_pages_is_not_kept_by_the_browser(
    app: Flask, day: StationDay
) -> None:
    """A station's shared computer: the manager reads a proof (the recipient's signature
    and doorstep photo) and signs out; the next person at the desk must not find the
    images in the browser's cache, any more than the page. The API's answer with the
    same bytes keeps its caching: an API client is not a shared browser."""
    manager = signed_in(app, "manager")
    image = manager.client.get(f"/web/images/{day.uploaded[0]}")
    assert image.status_code == 200 and image.mimetype.startswith("image/")
    assert image.headers["Cache-Control"] == "no-store"
    api = Auth(app.test_client())
    same = api.client.get(f"/api/v1/blobs/{day.uploaded[0]}", headers=api.headers("manager"))
    assert same.status_code == 200 and same.data == image.data
    assert same.headers["Cache-Control"] == "private, max-age=31536000, immutable"


def test_the_pages_are_not_in_the_openapi_document(app: Flask) -> None:
    with app.app_context():
        paths = api.spec.to_dict()["paths"]
    assert paths and not [p for p in paths if p.startswith("/web")]
    assert app.test_client().get("/").location == "/docs"


def test_an_auditor_reading_a_flag_page_that_shows_a_proof_is_audit_logged(
    app: Flask, session: Session, day: StationDay
) -> None:
    """The flag page shows its evidence's events: a drop's POD (pickup code) is a proof
    read, logged as the shift page logs the same events (DESIGN.md rule 7), among the
    parcel's entries (``GET /audit?tracking_no=``): a parcel's flag shows its proofs."""
    drop_flag = day.flag(session, "unauthorized_locker_drop")
    assert day.drop_event_id in drop_flag.evidence["event_ids"]
    before = len(audit_actions(session))
    signed_in(app, "manager").get(f"/web/flags/{drop_flag.id}")
    assert len(audit_actions(session)) == before
    html = signed_in(app, "auditor").get(f"/web/flags/{drop_flag.id}")
    assert "code 771205" in html
    assert audit_actions(session)[before:] == [
        ("proofs_searched", f"flag:{drop_flag.id}", day.auditor.id)
    ]
    entry = session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc())).first()
    assert entry is not None and entry.details["event_ids"] == [day.drop_event_id]
    assert drop_flag.tracking_no is not None and entry.tracking_no == drop_flag.tracking_no


@pytest.mark.parametrize(
    ("seqs", "total", "shown"),
    [
        ([], None, ""),
        ([7], None, "7"),
        ([3, 4, 5, 9, 11, 12], None, "3–5, 9, 11–12"),
        (list(range(1, 101)), 250, "1–100 and 150 more"),
    ],
)
def test_missing_seqs_are_shown_as_runs(seqs: list[int], total: int | None, shown: str) -> None:
    assert seq_ranges(seqs, total) == shown


@pytest.mark.parametrize(
    "typed", ["3-5, 9, 11-12", "3–5, 9, 11–12", "3 — 5 9 11 - 12", "3-5,9,11–12"]
)
def test_the_write_off_form_takes_seqs_as_the_page_shows_them(typed: str) -> None:
    """The page shows missing seqs as runs with an en dash (``seq_ranges``: 3–5); a
    manager copying them into the write-off form was refused "no seq or range of
    seqs", the form taking a hyphen only."""
    assert seq_ranges_typed(typed) == [(3, 5), (9, 9), (11, 12)]
    assert seq_ranges_typed(seq_ranges([3, 4, 5, 9, 11, 12])) == [(3, 5), (9, 9), (11, 12)]


def _forged_consent_then_unasked_drop(
    session: Session, day: StationDay
) -> tuple[Shift, Consent, Flag]:
    """SECURITY.md threat 2: Zhao Lei, a courier of MHG, knowing only the tracking number
    of a PDG express parcel, records an "in person" locker consent for it on MHG's PDA at
    17:30. At 18:30 PDG's courier leaves the parcel in a locker without asking. The drop
    is ``unauthorized_locker_drop`` (the consent counts only at MHG)."""
    zhao = session.scalars(select(User).where(User.username == "zhaolei")).one()
    rogue = station_day.Pda(session, session.get(Device, "PDA-MHG-05"), zhao)
    rogue.seq = 10  # after the day's own events
    parcel = factories.parcel(session, day.station)
    courier = factories.user(session, "sunli", "courier", day.station)
    courier.full_name = "Sun Li"
    pda = station_day.Pda(session, factories.device(session, "PDA-PDG-09", day.station), courier)
    session.commit()
    tn = parcel.tracking_no
    forged = rogue.event(
        station_day.local(day.day, 17, 30),
        tn,
        "consent_captured",
        consent={"method": "locker", "channel": "in_person", "evidence": "asked at the door"},
    )
    rogue.push([forged], station_day.local(day.day, 17, 35))
    shift = pda.open(station_day.local(day.day, 18, 0))
    checkout = pda.event(station_day.local(day.day, 18, 5), tn, "checked_out")
    drop = pda.event(
        station_day.local(day.day, 18, 30),
        tn,
        "delivered_to_locker",
        locker_id="HIVE-PDG-1",
        compartment="B2",
        pod={"pickup_code": "551177"},
    )
    pda.push([checkout, drop], station_day.local(day.day, 18, 40))
    pda.close(shift, station_day.local(day.day, 19, 0))
    consent = session.scalars(select(Consent).where(Consent.tracking_no == tn)).one()
    flag = session.scalars(
        select(Flag).where(Flag.kind == "unauthorized_locker_drop", Flag.subject_key == tn)
    ).one()
    assert flag.evidence["captured_at_other_station"] == [consent.id]
    return shift, consent, flag


def test_the_shift_page_marks_another_stations_consent_and_names_its_courier_to_auditors(
    app: Flask,
    session: Session,
    day: StationDay,
) -> None:
    """PDG's manager opens the unbalanced shift to judge the unauthorized drop. Under
    "Consents on record for this parcel" the page lists the consent MHG's courier forged
    as an ordinary one (in person, granted 17:30, an hour before the drop), recorded "by
    Zhao Lei": nothing says it was captured on another station's PDA and so authorizes
    nothing here (the flag's evidence says so, `captured_at_other_station`, but the page
    does not). The manager sees a consent granted before the drop and resolves the flag
    as a false alarm: the forged consent has made the drop look authorized after all.
    And the page names a courier of another station, who for PDG's manager should not
    exist (SECURITY.md threat 3)."""
    shift, consent, _ = _forged_consent_then_unasked_drop(session, day)

    html = signed_in(app, "manager").get(f"/web/shifts/{shift.id}")

    start = html.index('id="discrepancy-1"')
    discrepancy = html[start : html.index("</article>", start)]
    assert "unauthorized locker drop" in discrepancy.lower()
    assert "Zhao Lei" not in html and "zhaolei" not in html
    if f"consent #{consent.id}" in discrepancy:
        listed = discrepancy[discrepancy.index(f"consent #{consent.id}") :]
        listed = listed[: listed.index("</li>")]
        assert "another station" in listed, listed
        assert "by a courier of another station" in listed, listed
    # An auditor reads every station: the consent marked all the same, its courier named.
    html = signed_in(app, "auditor").get(f"/web/shifts/{shift.id}")
    [listed] = re.findall(rf"<li>(consent #{consent.id}: .*?)</li>", html)
    assert "by Zhao Lei" in listed, listed
    assert "captured on another station's PDA: authorizes no drop here" in listed, listed


def _drop_voided_on(
    session: Session, day: StationDay, device: str
) -> tuple[station_day.Pda, Shift, list[dict]]:
    """A PDG courier's shift: an express parcel left in a locker, the drop voided a
    minute later as a mis-tap; the PDA's two events not yet pushed."""
    courier = factories.user(session, f"courier-{device.lower()}", "courier", day.station)
    pda = station_day.Pda(session, factories.device(session, device, day.station), courier)
    tracking_no = factories.parcel(session, day.station).tracking_no
    session.commit()
    shift = pda.open(station_day.local(day.day, 17, 0))
    drop = pda.event(
        station_day.local(day.day, 17, 30),
        tracking_no,
        "delivered_to_locker",
        locker_id="L-7",
        compartment="1",
        pod={"pickup_code": "4711"},
    )
    correction = pda.event(
        station_day.local(day.day, 17, 31),
        tracking_no,
        "correction",
        voids_client_event_id=drop["client_event_id"],
        reason="mis-tap",
    )
    return pda, shift, [drop, correction]


def _events_table_row(html: str, seq: int) -> str:
    return next(
        m.group(0)
        for m in re.finditer(r"<tr[^>]*>\s*<td>(\d+)</td>.*?</tr>", html, re.S)
        if m.group(1) == str(seq)
    )


def test_the_shift_page_marks_a_late_drop_a_correction_voided(
    app: Flask, session: Session, day: StationDay
) -> None:
    """A signed-off shift reopened by late events lists them with its flag: a locker
    drop among them that a correction voided stood there as a drop like any other,
    where the flag's own page and the proof page say "voided by event N"."""
    pda, shift, (drop, correction) = _drop_voided_on(session, day, "PDA-PDG-32")
    pda.close(shift, station_day.local(day.day, 17, 40))  # its seqs 1 and 2 not pushed yet
    pages = signed_in(app, "manager")
    pages.post(f"/web/shifts/{shift.id}/signoff", note="checked", force_reason="PDA offline")
    session.refresh(shift)
    assert shift.status == ShiftStatus.SIGNED_OFF
    pda.push([drop, correction], station_day.local(day.day, 18, 0))
    reopened = session.scalars(
        select(Flag).where(Flag.kind == "late_event_after_signoff", Flag.shift_id == shift.id)
    ).one()
    drop_id, correction_id = sorted(reopened.evidence["event_ids"])

    html = pages.get(f"/web/shifts/{shift.id}")

    flags = html[html.index("late event after signoff") :]
    assert f"voided by event {correction_id}" in _events_table_row(flags, drop["seq"])
    assert "voided by event" not in _events_table_row(flags, correction["seq"])


def test_the_sign_off_form_of_a_shift_with_more_rejected_events_than_it_lists_signs_off(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Li Wei's PDA sent 120 events the server refused (a broken app sending the same bad
    scan again and again): the page lists the first 100, and its sign-off form sent back
    the count it listed (101, one more telling there are more), so the sign-off compared
    it with the 120 the board and the balance count and refused it for ever
    (``rejected_events_changed``, "read its page again"). The page counts them as the
    balance does (``sync.balances.read_handovers``): the manager who read them signs off."""
    shift = day.balanced
    tracking_no = session.scalars(
        select(ScanEvent.tracking_no).where(ScanEvent.shift_id == shift.id).limit(1)
    ).one()
    batch_pk = session.scalars(
        select(SyncBatch.id).where(SyncBatch.device_id == shift.device_id).limit(1)
    ).one()
    session.execute(
        sqlalchemy.insert(QuarantinedEvent),
        [
            {
                "station_id": shift.station_id,
                "device_id": shift.device_id,
                "batch_pk": batch_pk,
                "position": n,
                "tracking_no": tracking_no,
                "parcel_tracking_no": parcel_named(tracking_no),
                "error_code": "missing_field",
                "message": "compartment is required",
                "payload": "{}",
                "payload_hash": f"{n:064d}",
            }
            for n in range(120)
        ],
    )
    session.flush()
    client = app.test_client()
    balance = client.get(
        f"/api/v1/shifts/{shift.id}/balance", headers=Auth(client).headers("manager")
    ).get_json()
    assert balance["rejected_events"] == 120
    pages = signed_in(app, "manager")
    path = f"/web/shifts/{shift.id}"
    html = pages.get(path)
    assert 'name="rejected_events" value="120"' in html
    form = html[html.index(f'action="{path}/signoff"') :].split("</form>")[0]
    hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form))
    signed = pages.client.post(f"{path}/signoff", data=hidden | {"note": "refused scans read"})
    assert signed.status_code == 302, signed.get_data(as_text=True)[-2000:]
    session.refresh(shift)
    assert shift.status == ShiftStatus.SIGNED_OFF


def _rejected_rows(session: Session, shift: Shift, tracking_no: str, n: int) -> None:
    """``n`` events the shift's PDA sent that the server refused, naming ``tracking_no``
    and no seq (as a PDA sends a drop it could not number), each its own row."""
    batch_pk = session.scalars(
        select(SyncBatch.id).where(SyncBatch.device_id == shift.device_id).limit(1)
    ).one()
    session.execute(
        sqlalchemy.insert(QuarantinedEvent),
        [
            {
                "station_id": shift.station_id,
                "device_id": shift.device_id,
                "batch_pk": batch_pk,
                "position": position,
                "tracking_no": tracking_no,
                "parcel_tracking_no": parcel_named(tracking_no),
                "error_code": "missing_field",
                "message": "compartment is required",
                "payload": "{}",
                "payload_hash": f"{shift.id}{position:060d}",
            }
            for position in range(n)
        ],
    )
    session.flush()


def _rejected_heading(html: str) -> str:
    return re.search(r'<h2 id="rejected-h">([^<]*)</h2>', html).group(1)


def _board_rejected(html: str, shift: Shift) -> str:
    return re.search(rf'href="/web/shifts/{shift.id}#rejected-h"[^>]*>([^<]*)</a>', html).group(1)


def test_the_shift_page_counts_its_rejected_events_as_the_board_does(
    app: Flask, session: Session, day: StationDay
) -> None:
    """At 19:00 the board said Li Wei's PDA had 120 events rejected and Zhang Min's 1;
    their pages said "(100 and more)" (the count it listed) and "(0)" (the one rejected
    drop of the missing parcel listed with its discrepancy, not counted in the heading).
    The heading counts them all, as the board and the balance do."""
    _rejected_rows(session, day.balanced, _a_parcel_of(session, day.balanced), 120)
    _rejected_rows(session, day.unbalanced, day.missing_parcel, 1)
    pages = signed_in(app, "manager")
    board = pages.get(f"/web/board?station={day.station.id}&date={day.day}")
    assert _board_rejected(board, day.balanced) == "120 events of its PDA rejected"
    assert _board_rejected(board, day.unbalanced) == "1 event of its PDA rejected"

    many = pages.get(f"/web/shifts/{day.balanced.id}")
    assert _rejected_heading(many) == "Rejected events of this shift (120)"
    assert "20 more are not" in many
    one = pages.get(f"/web/shifts/{day.unbalanced.id}")
    assert _rejected_heading(one) == "Rejected events of this shift (1)"


def test_the_shift_page_says_one_rejected_event_past_the_first_100_in_the_singular(
    app: Flask, session: Session, day: StationDay
) -> None:
    """101 rejected events of Li Wei's PDA: the page said "...; 1 more are not"."""
    _rejected_rows(session, day.balanced, _a_parcel_of(session, day.balanced), 101)
    html = signed_in(app, "manager").get(f"/web/shifts/{day.balanced.id}")
    assert _rejected_heading(html) == "Rejected events of this shift (101)"
    assert "The first 100 by sequence number are listed" in html
    assert "; 1 more is not:" in html


def _a_parcel_of(session: Session, shift: Shift) -> str:
    return session.scalars(
        select(ScanEvent.tracking_no).where(ScanEvent.shift_id == shift.id).limit(1)
    ).one()


def test_a_parcel_with_two_discrepancies_lists_its_rejected_events_once(
    app: Flask, session: Session, day: StationDay
) -> None:
    """An express parcel handed over without a signature, then left in a locker without
    consent, has three discrepancies (delivered without proof, unauthorized drop, two
    final outcomes); the drop the PDA sent first, refused for its missing compartment,
    was listed under each of them (the same row three times, its anchor ``rejected-N``
    three times, and an auditor's read of it logged with the id three times). Listed
    once now, with the parcel's first discrepancy; the others link to it."""
    courier = factories.user(session, "sunhao", "courier", day.station)
    pda = station_day.Pda(session, factories.device(session, "PDA-PDG-41", day.station), courier)
    tracking_no = factories.parcel(session, day.station).tracking_no
    session.commit()
    shift = pda.open(station_day.local(day.day, 17, 0))
    refused = pda.event(
        station_day.local(day.day, 17, 20), tracking_no, "delivered_to_locker", locker_id="L-7"
    )
    receipt = pda.push(
        [
            pda.event(station_day.local(day.day, 17, 5), tracking_no, "checked_out"),
            refused,
            pda.event(station_day.local(day.day, 17, 25), tracking_no, "delivered"),
            pda.event(
                station_day.local(day.day, 17, 30),
                tracking_no,
                "delivered_to_locker",
                locker_id="L-7",
                compartment="3",
                pod={"pickup_code": "4711"},
            ),
        ],
        station_day.local(day.day, 17, 35),
    )
    assert [r["status"] for r in receipt["results"]] == [
        "applied",
        "rejected",
        "applied",
        "applied",
    ]
    pda.close(shift, station_day.local(day.day, 17, 40))
    (rejected_id,) = session.scalars(
        select(QuarantinedEvent.id).where(QuarantinedEvent.device_id == "PDA-PDG-41")
    ).all()

    html = signed_in(app, "manager").get(f"/web/shifts/{shift.id}")
    kinds = re.findall(r'<article class="discrepancy" id="discrepancy-\d+">\s*<h3>([^·]*)·', html)
    assert len(kinds) == 3, kinds
    assert html.count(f'id="rejected-{rejected_id}"') == 1
    assert html.count('class="muted rejections-elsewhere"') == len(kinds) - 1
    assert _rejected_heading(html) == "Rejected events of this shift (1)"

    signed_in(app, "auditor").get(f"/web/shifts/{shift.id}")
    read = session.scalars(
        select(AuditEntry)
        .where(AuditEntry.action == "quarantine_searched")
        .order_by(AuditEntry.id.desc())
        .limit(1)
    ).one()
    assert read.details["ids"] == [rejected_id]


def test_a_signed_off_shift_whose_lost_seqs_were_written_off_since_says_that_changed_it(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Wang Qiang's PDA never sent seq 4: Wang Fang forces the sign-off at 19:00 (the PDA
    is dead), then writes seq 4 off as lost on the same page. The balance is no longer
    the one signed off (provisional, now unbalanced), and the page said "No event of this
    shift arrived since; something else changed it (a consent, another shift's events, a
    parcel taken in)", and "1 sequence numbers missing": the manager went looking for a
    consent or a parcel taken in. It names the write-off that changed it."""
    pages = signed_in(app, "manager")
    path = f"/web/shifts/{day.provisional.id}"
    signed = pages.post(f"{path}/signoff", note="checked", force_reason="PDA dead")
    assert signed.status_code == 302, signed.get_data(as_text=True)[-2000:]
    written = pages.post(f"{path}/lost-seqs", seqs="4", reason="PDA reset")
    assert written.status_code == 302, written.get_data(as_text=True)[-2000:]

    html = pages.get(path)
    assert "The balance has changed since the sign-off" in html
    assert "<li>Signed off: provisional, 1 sequence number missing: " in html
    since = re.search(r'<p id="written-off-since-signoff">(.*?)</p>', html, re.S)
    assert since is not None, html[html.index('id="changed-since-signoff"') :][:2000]
    assert (
        "the sequence number of its PDA written off as lost since changed it: 4 by Wang Fang at "
        in since.group(1)
    )
    assert "something else changed it" not in html


def test_a_signed_off_shift_changed_by_two_seqs_written_off_since_names_them_in_the_plural(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Sun Li's PDA sent seqs 1, 2 and 5 of her shift; 3 and 4 never came. Wang Fang
    forces the sign-off, then writes 3-4 off as lost: the page names "the sequence
    numbers" written off, and for seq 4 alone of Wang Qiang's "the sequence number"
    (``test_a_signed_off_shift_whose_lost_seqs_were_written_off_since_says_that_changed_it``):
    it said "sequence numbers" for one as for two."""
    courier = factories.user(session, "sunli", "courier", day.station)
    pda = station_day.Pda(session, factories.device(session, "PDA-PDG-09", day.station), courier)
    tracking_no = factories.parcel(session, day.station).tracking_no
    session.commit()
    shift = pda.open(station_day.local(day.day, 17, 0))
    sent = [
        pda.event(station_day.local(day.day, 17, 5), tracking_no, "checked_out"),
        pda.event(station_day.local(day.day, 17, 10), tracking_no, "out_for_delivery"),
        pda.event(station_day.local(day.day, 17, 15), tracking_no, "delivery_attempt_failed"),
        pda.event(station_day.local(day.day, 17, 20), tracking_no, "delivery_attempt_failed"),
        pda.event(station_day.local(day.day, 17, 30), tracking_no, "returned_to_station"),
    ]
    pda.push([sent[0], sent[1], sent[4]], station_day.local(day.day, 17, 35))
    pda.close(shift, station_day.local(day.day, 17, 40))
    pages = signed_in(app, "manager")
    path = f"/web/shifts/{shift.id}"
    signed = pages.post(f"{path}/signoff", note="checked", force_reason="PDA dead")
    assert signed.status_code == 302, signed.get_data(as_text=True)[-2000:]
    written = pages.post(f"{path}/lost-seqs", seqs="3-4", reason="PDA reset")
    assert written.status_code == 302, written.get_data(as_text=True)[-2000:]

    html = pages.get(path)
    assert "<li>Signed off: provisional, 2 sequence numbers missing</li>" in html
    since = re.search(r'<p id="written-off-since-signoff">(.*?)</p>', html, re.S)
    assert since is not None, html[html.index('id="changed-since-signoff"') :][:2000]
    assert (
        "the sequence numbers of its PDA written off as lost since changed it: 3–4 by Wang "
        "Fang at " in since.group(1)
    )


@pytest.mark.parametrize("typed", ["²", "12,³", "٣", "9" * 5000])
def test_a_sign_off_naming_no_flag_id_in_open_flags_is_refused_as_a_form_error(
    app: Flask, day: StationDay, typed: str
) -> None:
    """The shift page's sign-off sends the flags it showed waiting (``open_flags``).
    A forged value, a superscript digit (which ``str.isdigit`` takes for one, and
    ``int`` refuses) or a number of thousands of digits (past ``int``'s limit), is said
    like any bad field, on the page shown again: it was a 500 page, the form's checks
    raising past the form (a digit of another script was taken for a flag id)."""
    pages = signed_in(app, "manager")
    path = f"/web/shifts/{day.unbalanced.id}"
    html = pages.get(path)
    form = html[html.index(f'action="{path}/signoff"') :].split("</form>")[0]
    hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form))
    refused = pages.client.post(
        f"{path}/signoff", data=hidden | {"note": "checked at 19:00", "open_flags": typed}
    )
    assert refused.status_code == 200, refused.status_code  # the page again, told why
    assert "flag ids, comma-separated" in refused.get_data(as_text=True)
    assert day.unbalanced.status == ShiftStatus.CLOSED


def test_a_sign_off_from_a_page_that_showed_no_flag_waiting_is_refused_once_one_is_raised(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Wang Fang resolved Zhang Min's missing parcel as lost at 18:50, and at 19:00 her
    shift's page shows no flag waiting on it: the sign-off form sends ``open_flags``
    empty, which the form read as not sent, so the flags were not compared at all. The
    sweep then flagged the delivery photo the PDA never uploaded
    (``blob_missing_at_handover``), and her sign-off went through on a page that never
    listed that flag, where the API's sign-off with ``open_flags: []`` and the board's
    are refused. An empty list sent is compared as none waiting."""
    missing = session.scalars(
        select(Flag).where(Flag.kind == "missing_at_handover", Flag.shift_id == day.unbalanced.id)
    ).one()
    flags.resolve_flag(session=session, flag=missing, user_id=day.manager.id, note="lost")
    session.commit()
    pages = signed_in(app, "manager")
    path = f"/web/shifts/{day.unbalanced.id}"
    html = pages.get(path)
    form = html[html.index(f'action="{path}/signoff"') :].split("</form>")[0]
    hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form))
    assert hidden["open_flags"] == ""
    swept = sweeps.blob_missing_at_handover(
        session=session, now=utcnow(), settings=SweepSettings()
    )
    session.commit()
    assert swept["flags_raised"], swept

    refused = pages.client.post(f"{path}/signoff", data=hidden | {"note": "checked at 19:00"})

    assert refused.status_code == 200, refused.location
    again = refused.get_data(as_text=True)
    assert "the flags waiting on it changed since it was read" in again
    assert "<h3>blob missing at handover</h3>" in again  # listed on the page shown again
    session.refresh(day.unbalanced)
    assert day.unbalanced.status == ShiftStatus.CLOSED


def _spare_pda(session: Session, day: StationDay) -> tuple[Shift, Shift, list[str]]:
    """Sun Li's PDA-PDG-09 dies at 11:00 with three of its four parcels checked out and
    no outcome; she goes on with PDA-PDG-10, delivers two (12:00, 12:30), returns the
    third (16:00) and hands that shift over at 17:00. The dead PDA's shift stays open."""
    courier = factories.user(session, "sunli", "courier", day.station)
    courier.full_name = "Sun Li"
    dead = station_day.Pda(session, factories.device(session, "PDA-PDG-09", day.station), courier)
    spare = station_day.Pda(session, factories.device(session, "PDA-PDG-10", day.station), courier)
    numbers = [factories.parcel(session, day.station).tracking_no for _ in range(4)]
    session.commit()
    at = functools.partial(station_day.local, day.day)
    first = dead.open(at(8, 0))
    pod = {"recipient_name": "Mr Wu", "signature_sha256": day.uploaded[0]}
    dead.push(
        [
            *(dead.event(at(8, 5), tn, "checked_out") for tn in numbers),
            dead.event(at(9, 0), numbers[0], "delivered", pod=pod),
        ],
        at(9, 5),
    )
    second = spare.open(at(11, 0))
    spare.push(
        [
            spare.event(at(12, 0), numbers[1], "delivered", pod=pod),
            spare.event(at(12, 30), numbers[2], "delivered", pod=pod),
            spare.event(at(16, 0), numbers[3], "returned_to_station"),
        ],
        at(16, 5),
    )
    spare.close(second, at(17, 0))
    return first, second, numbers


def test_a_shift_page_says_where_a_parcel_it_lacks_was_scanned_on_a_spare_pda(
    app: Flask, session: Session, day: StationDay
) -> None:
    """A courier's PDA dies at 11:00 with three parcels checked out on it; they go on
    with a spare PDA, delivering two and returning the third, and the manager closes
    the dead PDA's shift at 19:00. That shift's page called the three parcels missing
    at handover, each with "look in the cage of returns", and the spare PDA's called
    them outcomes never checked out, "ask the courier where they took it from", with
    nothing on either page saying the other shift held them: the manager looked for
    parcels delivered hours before. Each discrepancy now lists the parcel's check-outs
    and outcomes filed under the station's other shifts, each linking its shift."""
    first, second, numbers = _spare_pda(session, day)
    at = functools.partial(station_day.local, day.day)
    shifts.close_shift(
        session=session, shift=first, closed_by=day.manager.id, last_seq=None, now=at(19, 0)
    )
    session.commit()
    pages = signed_in(app, "manager")

    def discrepancies(shift_id: int) -> dict[str, str]:
        html = pages.get(f"/web/shifts/{shift_id}")
        found = re.findall(r'<article class="discrepancy".*?</article>', html, re.S)
        return {re.search(r"<h3>[^<]*· (\w+)</h3>", a).group(1): a for a in found}  # type: ignore[union-attr]

    lacking = discrepancies(first.id)
    assert sorted(lacking) == sorted(numbers[1:])
    scanned = (("delivered", "12:00"), ("delivered", "12:30"), ("returned to station", "16:00"))
    for tn, (outcome, clock) in zip(numbers[1:], scanned, strict=True):
        assert "missing at handover" in lacking[tn]
        [scan] = re.findall(r'<ul class="scans-elsewhere">(.*?)</ul>', lacking[tn], re.S)
        assert f"{outcome} {day.day} {clock}:00" in scan
        assert f'href="/web/shifts/{second.id}">Shift {second.id}</a>' in scan
        assert "Sun Li" in scan and "PDA-PDG-10" in scan

    unlisted = discrepancies(second.id)
    assert sorted(unlisted) == sorted(numbers[1:])
    for tn in numbers[1:]:
        assert "not on manifest" in unlisted[tn]
        [scan] = re.findall(r'<ul class="scans-elsewhere">(.*?)</ul>', unlisted[tn], re.S)
        assert f"checked out {day.day} 08:05:00" in scan
        assert f'href="/web/shifts/{first.id}">Shift {first.id}</a>' in scan
        assert "PDA-PDG-09" in scan

    # A parcel missing with no scan elsewhere lists none.
    html = pages.get(f"/web/shifts/{day.unbalanced.id}")
    assert day.missing_parcel in html
    assert "scans-elsewhere" not in html


def test_the_balance_api_says_where_a_parcel_it_lacks_was_scanned_on_a_spare_pda(
    app: Flask, session: Session, day: StationDay
) -> None:
    """The shift's page and the flag's page list, with a parcel missing at handover (or
    off the manifest), its scans under the station's other shifts: the spare PDA's
    delivery of the dead PDA's "missing" parcel. ``GET /shifts/<id>/balance`` did not,
    so a client of the API sent the manager to the cage of returns for a parcel
    delivered at 12:00. Each such discrepancy now lists them (``elsewhere``), as the
    page does (in one statement more: ``tests/sync/test_board_queries.py``)."""
    first, second, numbers = _spare_pda(session, day)
    at = functools.partial(station_day.local, day.day)
    shifts.close_shift(
        session=session, shift=first, closed_by=day.manager.id, last_seq=None, now=at(19, 0)
    )
    session.commit()
    client = app.test_client()
    headers = Auth(client).headers("manager")

    def balance_of(shift_id: int) -> dict[str, Any]:
        response = client.get(f"/api/v1/shifts/{shift_id}/balance", headers=headers)
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    lacking = balance_of(first.id)
    by_parcel = {d["tracking_no"]: d for d in lacking["discrepancies"]}
    assert sorted(by_parcel) == sorted(numbers[1:])
    scanned = (("delivered", 12, 0), ("delivered", 12, 30), ("returned_to_station", 16, 0))
    for tn, (outcome, hour, minute) in zip(numbers[1:], scanned, strict=True):
        assert by_parcel[tn]["kind"] == "missing_at_handover"
        [scan] = by_parcel[tn]["elsewhere"]
        assert (scan["type"], scan["shift_id"], scan["device_id"]) == (
            outcome,
            second.id,
            "PDA-PDG-10",
        )
        assert scan["courier_id"] == second.courier_id
        assert dt.datetime.fromisoformat(scan["occurred_at"]) == at(hour, minute)
    unlisted = balance_of(second.id)
    for d in unlisted["discrepancies"]:
        assert d["kind"] == "not_on_manifest"
        assert [(s["type"], s["shift_id"]) for s in d["elsewhere"]] == [("checked_out", first.id)]
    # A parcel missing with no scan elsewhere lists none.
    missing = balance_of(day.unbalanced.id)
    assert all(d["elsewhere"] == [] for d in missing["discrepancies"])
    assert any(d["kind"] == "missing_at_handover" for d in missing["discrepancies"])


def test_a_courier_reading_their_balance_is_told_only_of_their_own_shifts_elsewhere(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Sun Li returned the dead PDA's fourth parcel at 16:00 on her spare PDA; Wang Wei
    checked it out at 16:30 and delivered it at 17:30. The manager reading the dead
    PDA's balance is told of all three scans (``elsewhere``). Sun Li reading her own
    balance was told of Wang Wei's too: his shift's id, his user id and his PDA, a shift
    she cannot open (another courier's), which a courier reads only of their own (DESIGN
    rule 7). She is told of hers alone: where her own parcels went."""
    first, second, numbers = _spare_pda(session, day)
    at = functools.partial(station_day.local, day.day)
    colleague = factories.user(session, "wangwei", "courier", day.station)
    other = station_day.Pda(
        session, factories.device(session, "PDA-PDG-11", day.station), colleague
    )
    session.commit()
    theirs = other.open(at(16, 20))
    pod = {"recipient_name": "Ms Zhao", "signature_sha256": day.uploaded[0]}
    other.push(
        [
            other.event(at(16, 30), numbers[3], "checked_out"),
            other.event(at(17, 30), numbers[3], "delivered", pod=pod),
        ],
        at(17, 35),
    )
    other.close(theirs, at(18, 0))
    shifts.close_shift(
        session=session, shift=first, closed_by=day.manager.id, last_seq=None, now=at(19, 0)
    )
    session.commit()
    client = app.test_client()

    def elsewhere(headers: dict[str, str]) -> list[tuple[str, int]]:
        response = client.get(f"/api/v1/shifts/{first.id}/balance", headers=headers)
        assert response.status_code == 200, response.get_json()
        [found] = [
            d for d in response.get_json()["discrepancies"] if d["tracking_no"] == numbers[3]
        ]
        assert found["kind"] == "missing_at_handover"
        return [(s["type"], s["shift_id"]) for s in found["elsewhere"]]

    assert elsewhere(Auth(client).headers("manager")) == [
        ("returned_to_station", second.id),
        ("checked_out", theirs.id),
        ("delivered", theirs.id),
    ]
    assert elsewhere(Auth(client).headers("sunli", "PDA-PDG-10")) == [
        ("returned_to_station", second.id)
    ]


def test_scans_elsewhere_are_those_of_the_stations_shifts_wherever_they_were_pushed(
    app: Flask, session: Session, day: StationDay
) -> None:
    """A parcel a shift lacks lists its scans under the station's other shifts: they were
    chosen by the station each scan was pushed at, not by that of the shift it is filed
    under, and the two differ once a PDA moves to another station with its courier. Sun
    Li's spare PDA and she moved to MHG before it sent the delivery it made at 12:00
    under her shift at PDG: filed under that PDG shift, pushed at MHG, and the dead PDA's
    page and balance at PDG did not list it. Li Na's PDA delivered a parcel with no shift
    open at PDG, and moved to MHG with her, where the shift she opened took that
    delivery: pushed at PDG, filed under MHG's shift, and listed at PDG with a link to it
    (a 404), her shift at MHG named to PDG's manager. The shift's station decides now."""
    courier = factories.user(session, "sunli", "courier", day.station)
    colleague = factories.user(session, "lina", "courier", day.station)
    dead = station_day.Pda(session, factories.device(session, "PDA-PDG-09", day.station), courier)
    spare = station_day.Pda(session, factories.device(session, "PDA-PDG-10", day.station), courier)
    hers = station_day.Pda(
        session, factories.device(session, "PDA-PDG-11", day.station), colleague
    )
    numbers = [factories.parcel(session, day.station).tracking_no for _ in range(3)]
    session.commit()
    at = functools.partial(station_day.local, day.day)
    pod = {"recipient_name": "Mr Wu", "signature_sha256": day.uploaded[0]}
    first = dead.open(at(8, 0))
    dead.push([dead.event(at(8, 5), tn, "checked_out") for tn in numbers], at(8, 10))
    second = spare.open(at(11, 0))
    delivered = spare.event(at(12, 0), numbers[1], "delivered", pod=pod)
    hers.push([hers.event(at(13, 0), numbers[2], "delivered", pod=pod)], at(13, 5))
    # Both couriers move to MHG with their PDAs, and sign in there again.
    for moved in (spare, hers):
        moved.courier.station_id = moved.device.station_id = day.other_station.id
        moved.pusher = Pusher(moved.device.id, day.other_station.id, moved.courier.id)
    session.commit()
    spare.push([delivered], at(16, 5))
    at_mhg = shifts.open_shift(
        session=session,
        device=hers.device,
        courier_id=colleague.id,
        rules=ShiftRules(),
        first_seq=1,
        now=at(14, 0),
    )
    session.commit()
    filed = dict(
        session.execute(
            select(ScanEvent.tracking_no, ScanEvent.shift_id).where(
                ScanEvent.type == EventType.DELIVERED, ScanEvent.tracking_no.in_(numbers)
            )
        ).all()
    )
    assert filed == {numbers[1]: second.id, numbers[2]: at_mhg.id}
    shifts.close_shift(
        session=session, shift=first, closed_by=day.manager.id, last_seq=None, now=at(19, 0)
    )
    session.commit()

    html = signed_in(app, "manager").get(f"/web/shifts/{first.id}")
    found = re.findall(r'<article class="discrepancy".*?</article>', html, re.S)
    lacking = {re.search(r"<h3>[^<]*· (\w+)</h3>", a).group(1): a for a in found}  # type: ignore[union-attr]
    assert sorted(lacking) == sorted(numbers)
    [scan] = re.findall(r'<ul class="scans-elsewhere">(.*?)</ul>', lacking[numbers[1]], re.S)
    assert f"delivered {day.day} 12:00:00" in scan
    assert f'href="/web/shifts/{second.id}">Shift {second.id}</a>' in scan
    assert "scans-elsewhere" not in lacking[numbers[2]]
    assert f"/web/shifts/{at_mhg.id}" not in html

    client = app.test_client()
    response = client.get(
        f"/api/v1/shifts/{first.id}/balance", headers=Auth(client).headers("manager")
    )
    assert response.status_code == 200, response.get_json()
    elsewhere = {d["tracking_no"]: d["elsewhere"] for d in response.get_json()["discrepancies"]}
    assert [(s["type"], s["shift_id"]) for s in elsewhere[numbers[1]]] == [
        ("delivered", second.id)
    ]
    assert elsewhere[numbers[0]] == elsewhere[numbers[2]] == []


def test_the_board_says_the_courier_of_a_shift_left_open_on_a_dead_pda_is_back(
    app: Flask, session: Session, day: StationDay
) -> None:
    """The dead PDA's shift stays open while its courier hands over the spare PDA's at
    17:00: the board at 19:00 called it "on the road" with its parcels "still out", and
    the manager waited for a courier who was in the station. Its row now says the
    courier is back, which shift they handed over, and that this one is to close; the
    courier's shift on the road with no later handover says nothing of the kind."""
    first, second, _ = _spare_pda(session, day)

    html = signed_in(app, "manager").get(f"/web/board?station={day.station.id}&date={day.day}")

    row = re.search(rf'<tr class="row-open" id="shift-{first.id}">(.*?)</tr>', html, re.S)
    assert row, html
    assert (
        '<span class="courier-back count-provisional">Courier back: handed over '
        f'<a href="/web/shifts/{second.id}">shift {second.id}</a> on PDA-PDG-10 at 17:00; '
        "close this one</span>"
    ) in row.group(1)
    still_out = re.search(rf'id="shift-{day.open.id}">(.*?)</tr>', html, re.S)
    assert still_out and "courier-back" not in still_out.group(1)

    # The API's board row says so too, for the same shifts.
    response = app.test_client().get(
        f"/api/v1/stations/{day.station.id}/handover?date={day.day}",
        headers=Auth(app.test_client()).headers("manager"),
    )
    assert response.status_code == 200, response.get_json()
    back = {row["shift_id"]: row["courier_back_shift_id"] for row in response.get_json()["shifts"]}
    assert back[first.id] == second.id
    assert back[day.open.id] is None and back[second.id] is None


def test_the_boards_summary_counts_no_dead_pdas_shift_on_the_road(
    app: Flask, session: Session, day: StationDay
) -> None:
    """At 19:00 the board's summary said "2 on the road (5 parcels still out)": Chen Lu,
    out with 2 parcels, and the shift left open on Sun Li's dead PDA, whose 3 parcels
    without an outcome there she delivered and returned on her spare PDA, handed over
    at 17:00. Its row said she is back; the summary had the manager wait for two
    couriers. It counts one on the road, and the dead PDA's shift apart, to close."""
    _spare_pda(session, day)

    html = signed_in(app, "manager").get(f"/web/board?station={day.station.id}&date={day.day}")

    summary = re.search(r'<p class="summary">(.*?)</p>', html, re.S)
    assert summary, html
    said = " ".join(re.sub(r"<[^>]+>", "", summary.group(1)).split())
    assert (
        "1 on the road (2 parcels still out); 1 left open on a PDA whose courier is back "
        "(3 parcels with no outcome on it): close it;"
    ) in said, said


def test_the_board_says_no_courier_is_back_who_went_out_again_on_a_third_pda(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Sun Li's PDA died at 11:00, she handed the spare PDA's shift over at 17:00 and went
    out again at 17:30 with a third PDA, still on the road at 19:00. The board said of the
    dead PDA's shift "Courier back: handed over shift N at 17:00", and the API gave that
    shift as its ``courier_back_shift_id``: the manager went looking for a courier who
    was out. She is back only when no shift of hers opened after that handover is still
    open; the dead PDA's shift and the third are both on the road, neither says back."""
    first, second, _ = _spare_pda(session, day)
    third_pda = station_day.Pda(
        session,
        factories.device(session, "PDA-PDG-11", day.station),
        session.get_one(User, second.courier_id),
    )
    third = third_pda.open(station_day.local(day.day, 17, 30))

    html = signed_in(app, "manager").get(f"/web/board?station={day.station.id}&date={day.day}")

    assert f'id="shift-{third.id}"' in html
    assert "courier-back" not in html, html
    response = app.test_client().get(
        f"/api/v1/stations/{day.station.id}/handover?date={day.day}",
        headers=Auth(app.test_client()).headers("manager"),
    )
    assert response.status_code == 200, response.get_json()
    back = {row["shift_id"]: row["courier_back_shift_id"] for row in response.get_json()["shifts"]}
    assert back[first.id] is None and back[third.id] is None and back[second.id] is None

    # Handed over at 18:40, the third shift is the one she is back from.
    third_pda.close(third, station_day.local(day.day, 18, 40))
    html = signed_in(app, "manager").get(f"/web/board?station={day.station.id}&date={day.day}")
    row = re.search(rf'<tr class="row-open" id="shift-{first.id}">(.*?)</tr>', html, re.S)
    assert row, html
    assert (
        f'<a href="/web/shifts/{third.id}">shift {third.id}</a> on PDA-PDG-11 at 18:40'
        in row.group(1)
    )


def test_the_shift_page_of_a_dead_pdas_shift_says_the_courier_is_back_as_the_board_does(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Sun Li's PDA died at 11:00 and she handed the spare PDA's shift over at 17:00. The
    board says of the dead PDA's shift "Courier back: handed over shift N on PDA-PDG-10
    at 17:00; close this one"; the shift's page, where the manager goes to close it,
    said only "The shift is open", its parcels still out. It says what the board says
    now, from the same rule (``sync.balances.courier_back``): not once she is out again
    on a third PDA, and again once that one is handed over."""
    first, second, _ = _spare_pda(session, day)
    pages = signed_in(app, "manager")

    def courier_back(shift_id: int) -> str | None:
        found = re.search(
            r'<p class="courier-back[^>]*>(.*?)</p>', pages.get(f"/web/shifts/{shift_id}"), re.S
        )
        return found.group(1) if found else None

    assert courier_back(first.id) == (
        f'Courier back: handed over <a href="/web/shifts/{second.id}">shift {second.id}</a> '
        f"on PDA-PDG-10 at {day.day} 17:00:00; close this one."
    )
    assert courier_back(second.id) is None  # handed over itself
    assert courier_back(day.open.id) is None  # a courier still out
    third_pda = station_day.Pda(
        session,
        factories.device(session, "PDA-PDG-11", day.station),
        session.get_one(User, second.courier_id),
    )
    third = third_pda.open(station_day.local(day.day, 17, 30))
    assert courier_back(first.id) is None  # out again
    third_pda.close(third, station_day.local(day.day, 18, 40))
    assert f'href="/web/shifts/{third.id}">shift {third.id}</a> on PDA-PDG-11 at' in (
        courier_back(first.id) or ""
    )
    board = _board_api(app, day, day.day)
    back = {row["shift_id"]: row["courier_back_shift_id"] for row in board["shifts"]}
    assert back[first.id] == third.id


def test_a_dead_pdas_shift_through_the_api_says_where_its_courier_went_as_its_page_does(
    app: Flask, session: Session, day: StationDay
) -> None:
    """The board and the shift's page said of the dead PDA's shift that its courier is
    back (the spare PDA's shift handed over at 17:00), and that a courier with a second
    shift open on another PDA has one likely no longer used; a manager reading the
    shift through the API (``GET /shifts/<id>`` and its balance) saw it "on the road",
    its parcels still out, and nothing of either. Both name them now, from the same
    rule as the page (``sync.pages.where_courier_went``)."""
    first, second, _ = _spare_pda(session, day)
    client = app.test_client()
    manager = Auth(client).headers("manager")

    def went(shift_id: int) -> tuple[int | None, list[int]]:
        said = set()
        for path in (f"/api/v1/shifts/{shift_id}", f"/api/v1/shifts/{shift_id}/balance"):
            response = client.get(path, headers=manager)
            assert response.status_code == 200, response.get_json()
            body = response.get_json()
            said.add((body["courier_back_shift_id"], tuple(body["courier_also_open_shift_ids"])))
        [(back, also)] = said  # the shift and its balance say the same
        return back, list(also)

    assert went(first.id) == (second.id, [])
    assert went(second.id) == (None, [])  # handed over itself
    assert went(day.open.id) == (None, [])  # a courier still out, on one PDA
    third_pda = station_day.Pda(
        session,
        factories.device(session, "PDA-PDG-11", day.station),
        session.get_one(User, second.courier_id),
    )
    third = third_pda.open(station_day.local(day.day, 17, 30))
    assert went(first.id) == (None, [third.id])  # out again on a third PDA
    assert went(third.id) == (None, [first.id])
    board = _board_api(app, day, day.day)
    rows = {row["shift_id"]: row for row in board["shifts"]}
    for shift_id in (first.id, third.id):
        assert went(shift_id) == (
            rows[shift_id]["courier_back_shift_id"],
            rows[shift_id]["courier_also_open_shift_ids"],
        )


def test_a_dead_pdas_shift_names_no_shift_its_courier_works_at_another_station(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Sun Li's PDA-PDG-09 dies at 11:00, its shift left open; she goes on with a PDA of
    the other station there, out at 11:30, back at 17:00. Through the API, as on the
    board and the shift's page, the dead PDA's shift names no shift of hers there, open
    or handed over: a shift of another station answers this station's manager what an
    unknown id answers (404), so that it does not show it exists, and a link to it
    would lead nowhere. Nothing held ``where_courier_went`` to the shift's station."""
    courier = factories.user(session, "sunli", "courier", day.station)
    dead = station_day.Pda(session, factories.device(session, "PDA-PDG-09", day.station), courier)
    lent = station_day.Pda(
        session, factories.device(session, "PDA-MHG-09", day.other_station), courier
    )
    first = dead.open(station_day.local(day.day, 8, 0))
    there = lent.open(station_day.local(day.day, 11, 30))
    assert there.station_id == day.other_station.id
    client = app.test_client()
    manager = Auth(client).headers("manager")
    pages = signed_in(app, "manager")

    def went() -> set[tuple[int | None, tuple[int, ...]]]:
        said = set()
        for path in (f"/api/v1/shifts/{first.id}", f"/api/v1/shifts/{first.id}/balance"):
            response = client.get(path, headers=manager)
            assert response.status_code == 200, response.get_json()
            body = response.get_json()
            said.add((body["courier_back_shift_id"], tuple(body["courier_also_open_shift_ids"])))
        row = next(r for r in _board_api(app, day, day.day)["shifts"] if r["shift_id"] == first.id)
        said.add((row["courier_back_shift_id"], tuple(row["courier_also_open_shift_ids"])))
        html = pages.get(f"/web/shifts/{first.id}")
        assert 'id="courier-back"' not in html and 'id="also-open"' not in html, html
        return said

    assert went() == {(None, ())}  # still out there
    assert client.get(f"/api/v1/shifts/{there.id}", headers=manager).status_code == 404
    lent.close(there, station_day.local(day.day, 17, 0))
    assert went() == {(None, ())}  # back there


def _board_api(app: Flask, day: StationDay, date: dt.date) -> dict[str, Any]:
    response = app.test_client().get(
        f"/api/v1/stations/{day.station.id}/handover?date={date}",
        headers=Auth(app.test_client()).headers("manager"),
    )
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_an_earlier_days_shift_left_open_on_a_dead_pda_says_the_courier_is_back(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Sun Li's PDA died yesterday at 11:00; she handed the spare PDA's shift over at
    17:00 and the manager signed it off. Today's board lists yesterday's dead-PDA shift
    under "earlier days still wait", "still open", with no word of her being back: the
    manager took it for a courier still out since yesterday. It now says, as a row of
    the day does, "Courier back: handed over shift N ...; close this one", and the API's
    ``earlier_waiting`` entry names that shift (``courier_back_shift_id``)."""
    first, second, _ = _spare_pda(session, day)
    shifts.sign_off(
        session=session,
        shift=session.get_one(Shift, second.id),
        user_id=day.manager.id,
        note="spare PDA's handover checked",
    )
    session.commit()
    today = day.day + dt.timedelta(days=1)

    html = signed_in(app, "manager").get(f"/web/board?station={day.station.id}&date={today}")

    earlier = re.search(
        r'<div class="callout callout-provisional" id="earlier-waiting">(.*?)</div>', html, re.S
    )
    assert earlier, html
    entry = re.search(rf'<li><a href="/web/shifts/{first.id}">.*?</li>', earlier.group(1), re.S)
    assert entry, earlier.group(1)
    assert (
        '<span class="courier-back count-provisional">Courier back: handed over '
        f'<a href="/web/shifts/{second.id}">shift {second.id}</a> on PDA-PDG-10 at 17:00 '
    ) in entry.group(0)
    still_out = re.search(
        rf'<li><a href="/web/shifts/{day.open.id}">.*?</li>', earlier.group(1), re.S
    )
    assert still_out and "courier-back" not in still_out.group(0)
    board = _board_api(app, day, today)
    back = {e["shift_id"]: e["courier_back_shift_id"] for e in board["earlier_waiting"]}
    assert back[first.id] == second.id
    assert back[day.open.id] is None


def test_the_board_says_when_a_courier_has_a_second_shift_open_on_another_pda(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Sun Li's PDA died at 11:00 and she opened a shift on a spare one, still on the road
    at 19:00: nothing refuses a second shift on another PDA (a PDA that died is the normal
    reason), and nothing said so either. The board showed two shifts of hers "on the
    road", the dead PDA's parcels "still out", and the manager learnt of the dead PDA only
    when the spare's shift came back with parcels it never checked out. Each of the two
    rows now names the other, still open (page and API: ``courier_also_open_shift_ids``),
    as each shift's page does; and yesterday's shift left open on a PDA does so from the
    earlier days' list."""
    courier = factories.user(session, "sunli", "courier", day.station)
    dead = station_day.Pda(session, factories.device(session, "PDA-PDG-09", day.station), courier)
    spare = station_day.Pda(session, factories.device(session, "PDA-PDG-10", day.station), courier)
    session.commit()
    first = dead.open(station_day.local(day.day, 8))
    second = spare.open(station_day.local(day.day, 11))

    html = signed_in(app, "manager").get(f"/web/board?station={day.station.id}&date={day.day}")

    for shift, other, device, since in (
        (first, second, "PDA-PDG-10", "11:00"),
        (second, first, "PDA-PDG-09", "08:00"),
    ):
        row = re.search(rf'id="shift-{shift.id}">(.*?)</tr>', html, re.S)
        assert row, html
        assert (
            '<span class="also-open count-provisional" title="Opening a second shift on '
            "another PDA is not refused: a PDA that died is the usual reason. Close the one "
            f'no longer used.">Courier also has <a href="/web/shifts/{other.id}">shift '
            f"{other.id}</a> open on {device} (since {since})</span>"
        ) in row.group(1)
    alone = re.search(rf'id="shift-{day.open.id}">(.*?)</tr>', html, re.S)
    assert alone and "also-open" not in alone.group(1)
    # The shift's page says so too, of an open shift.
    page = signed_in(app, "manager").get(f"/web/shifts/{first.id}")
    assert (
        f'Its courier also has <a href="/web/shifts/{second.id}">shift {second.id}</a> open '
        f"on PDA-PDG-10 (since {day.day} 11:00:00)"
    ) in page
    assert 'id="also-open"' not in signed_in(app, "manager").get(f"/web/shifts/{day.open.id}")
    board = _board_api(app, day, day.day)
    also = {r["shift_id"]: r["courier_also_open_shift_ids"] for r in board["shifts"]}
    assert also[first.id] == [second.id] and also[second.id] == [first.id]
    assert also[day.open.id] == [] and also[day.balanced.id] == []

    # The next day, the spare's shift handed over, a third PDA opened: yesterday's dead
    # PDA's shift, still open, and today's name each other.
    spare.close(second, station_day.local(day.day, 17))
    tomorrow = day.day + dt.timedelta(days=1)
    third_pda = station_day.Pda(
        session, factories.device(session, "PDA-PDG-11", day.station), courier
    )
    session.commit()
    third = third_pda.open(station_day.local(tomorrow, 8))
    board = _board_api(app, day, tomorrow)
    earlier = {e["shift_id"]: e for e in board["earlier_waiting"]}
    assert earlier[first.id]["courier_also_open_shift_ids"] == [third.id]
    assert earlier[first.id]["courier_back_shift_id"] is None  # out again on a third PDA
    also = {r["shift_id"]: r["courier_also_open_shift_ids"] for r in board["shifts"]}
    assert also[third.id] == [first.id]
    html = signed_in(app, "manager").get(f"/web/board?station={day.station.id}&date={tomorrow}")
    assert f'Courier also has <a href="/web/shifts/{third.id}">shift {third.id}</a>' in html


def test_the_daily_report_page_counts_outcomes_of_parcels_not_checked_out(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Sun Li delivers two parcels and returns a third on a spare PDA, whose shift never
    checked them out. The report (``GET .../reports/daily``) counts them as
    ``not_checked_out``, but its page showed no such number, in the day's totals, Sun
    Li's row or the last 7 days: her row read one delivered and nothing returned, and
    three outcomes of the day were on no line of the page. They are now, under "Not
    checked out", as the board shows them."""
    first, _, _ = _spare_pda(session, day)
    shifts.close_shift(
        session=session,
        shift=first,
        closed_by=day.manager.id,
        last_seq=None,
        now=station_day.local(day.day, 19, 0),
    )
    session.commit()
    pages = signed_in(app, "manager")
    api = pages.client.get(
        f"/api/v1/stations/{day.station.id}/reports/daily?date={day.day}",
        headers=Auth(app.test_client()).headers("manager"),
    ).get_json()

    html = pages.get(f"/web/reports/daily?station={day.station.id}&date={day.day}")

    total = api["totals"]["not_checked_out"]
    assert total == 3
    metrics = html.split('<dl class="metrics">')[1].split("</dl>")[0]
    assert (
        '<dt title="Outcomes recorded for parcels their shift never checked out">'
        f"Not checked out</dt><dd>{total}</dd>"
    ) in metrics

    def cells(table: str, first_cell: str) -> dict[str, str]:
        heads = re.findall(r'<th scope="col"[^>]*>([^<]+)</th>', table)
        row = re.search(rf"<tr><th scope=\"row\">{first_cell}</th>(.*?)</tr>", table, re.S)
        assert row, table
        values = re.findall(r'<td class="num">([^<]*)</td>', row.group(1))
        return dict(zip(heads[1:], values, strict=True))

    couriers = html.split('id="couriers-h"')[1].split("</section>")[0]
    sun_li = cells(couriers, "Sun Li")
    assert sun_li["Not checked out"] == "3"
    assert sun_li["Delivered"] == "1" and sun_li["Missing"] == "3"
    week = html.split('id="week-h"')[1].split("</section>")[0]
    assert cells(week, rf'<a href="[^"]+">{day.day}</a>')["Not checked out"] == str(total)


def test_a_missing_parcels_flag_page_says_where_it_was_scanned_on_a_spare_pda(
    app: Flask, session: Session, day: StationDay
) -> None:
    """The manager resolving the dead PDA's ``missing_at_handover`` flags from the flag
    queue reads each flag's page: like the shift's page, it now lists the parcel's
    outcome under the spare PDA's shift, linking it, where it said nothing of it. A
    flag of another kind lists none."""
    first, second, numbers = _spare_pda(session, day)
    shifts.close_shift(
        session=session,
        shift=first,
        closed_by=day.manager.id,
        last_seq=None,
        now=station_day.local(day.day, 19, 0),
    )
    session.commit()
    flag = day.flag(session, "missing_at_handover", subject_key=f"{first.id}:{numbers[3]}")
    pages = signed_in(app, "manager")

    html = pages.get(f"/web/flags/{flag.id}")

    [scan] = re.findall(r'<ul class="scans-elsewhere">(.*?)</ul>', html, re.S)
    assert f"returned to station {day.day} 16:00:00" in scan
    assert f'href="/web/shifts/{second.id}">Shift {second.id}</a> · Sun Li · PDA-PDG-10' in scan
    drop = day.flag(session, "unauthorized_locker_drop")
    assert "scans-elsewhere" not in pages.get(f"/web/flags/{drop.id}")


@pytest.mark.parametrize("started", ["same-site", "cross-site"])
def test_a_sign_in_form_another_site_posts_signs_nobody_in(
    app: Flask, session: Session, day: StationDay, started: str
) -> None:
    """A sign-in CSRF from a sibling host: over plain http (``make run``) the login
    cookie is ``courier_login``, not ``__Host-``, so another app at a sibling subdomain
    sets one of its own for the whole site (``Domain=``), with a value it knows, and
    has the browser post that value with its own account's password: SameSite=Strict
    sends a sibling's (same-site) post its cookies, and the browser was signed in as
    the attacker, whose pages then recorded what the victim did and read. A POST the
    browser says another site started is refused before anything runs, whatever its
    token; the pages' own forms (``same-origin``) sign in as before."""
    pages = Pages(app.test_client())
    pages.client.set_cookie("courier_login", "planted-by-a-sibling-host")
    forged = pages.client.post(
        "/web/login",
        data={
            "csrf_token": "planted-by-a-sibling-host",
            "username": "manager",
            "password": factories.PASSWORD,
        },
        headers={"Sec-Fetch-Site": started},
    )
    assert forged.status_code == 403, forged.get_data(as_text=True)
    assert "started on another site" in forged.get_data(as_text=True)
    assert pages.client.get_cookie("courier_session") is None
    assert pages.client.get("/web/board").status_code == 302  # not signed in

    own = Pages(app.test_client())
    form = own.client.get("/web/login").get_data(as_text=True)
    token = CSRF.search(form)
    assert token
    answer = own.client.post(
        "/web/login",
        data={"csrf_token": token.group(1), "username": "manager", "password": factories.PASSWORD},
        headers={"Sec-Fetch-Site": "same-origin"},
    )
    assert answer.status_code == 302
    board = own.get("/web/board")
    # Nor does any other form of the pages go through from elsewhere, its token right.
    sign_out = own.client.post(
        "/web/logout", data={"csrf_token": own.token()}, headers={"Sec-Fetch-Site": started}
    )
    assert sign_out.status_code == 403
    assert own.get("/web/board") and board


def _went_through_the_api(app: Flask, shift_id: int) -> tuple[int | None, list[int]]:
    """What ``GET /shifts/<id>`` says of where the shift's courier went on."""
    client = app.test_client()
    response = client.get(f"/api/v1/shifts/{shift_id}", headers=Auth(client).headers("manager"))
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    return body["courier_back_shift_id"], body["courier_also_open_shift_ids"]


def _went_on_the_board(board: dict[str, Any], shift_id: int) -> tuple[int | None, list[int]]:
    [row] = [r for r in [*board["shifts"], *board["earlier_waiting"]] if r["shift_id"] == shift_id]
    return row["courier_back_shift_id"], row["courier_also_open_shift_ids"]


def test_a_past_days_board_says_the_courier_is_back_as_the_api_does(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Sun Li's PDA died at 11:00 and she went home; the next morning she opened a shift
    on a spare PDA and handed it over at 17:00. Today's board and ``GET /shifts/<id>``
    said of the dead PDA's shift that she is back; the board of the day it died, read
    the morning after to check that day, called it "still open" with no word of her,
    as if she were still out since: it looked at that day's shifts only. Every board
    now names where the courier went as the shift's page and the API do, whatever day
    it is read for: the shift's state it shows is today's."""
    courier = factories.user(session, "sunli", "courier", day.station)
    dead = station_day.Pda(session, factories.device(session, "PDA-PDG-09", day.station), courier)
    spare = station_day.Pda(session, factories.device(session, "PDA-PDG-10", day.station), courier)
    session.commit()
    next_day = day.day + dt.timedelta(days=1)
    first = dead.open(station_day.local(day.day, 8, 0))
    second = spare.open(station_day.local(next_day, 8, 0))
    spare.close(second, station_day.local(next_day, 17, 0))

    assert _went_through_the_api(app, first.id) == (second.id, [])
    for date in (day.day, next_day, next_day + dt.timedelta(days=1)):
        assert _went_on_the_board(_board_api(app, day, date), first.id) == (second.id, []), date


def test_the_board_names_a_shift_left_open_weeks_ago_as_the_api_does(
    app: Flask, session: Session, day: StationDay
) -> None:
    """Sun Li's old PDA died three weeks ago with its shift left open; today she works on
    another. ``GET /shifts/<id>`` and the shift's page of today's shift named the old
    one still open ("a second shift is open on another PDA: close the one no longer
    used"); today's board row did not, looking back two weeks only, and the manager
    signing off at 19:00 never heard of it. The row names it now, as the API does (the
    board still lists apart only the two weeks' shifts waiting)."""
    courier = factories.user(session, "sunli", "courier", day.station)
    old = station_day.Pda(session, factories.device(session, "PDA-PDG-09", day.station), courier)
    new = station_day.Pda(session, factories.device(session, "PDA-PDG-10", day.station), courier)
    session.commit()
    forgotten = old.open(station_day.local(day.day - dt.timedelta(days=21), 8, 0))
    today = new.open(station_day.local(day.day, 8, 0))

    assert _went_through_the_api(app, today.id) == (None, [forgotten.id])
    board = _board_api(app, day, day.day)
    assert _went_on_the_board(board, today.id) == (None, [forgotten.id])
    assert forgotten.id not in {e["shift_id"] for e in board["earlier_waiting"]}


def test_signing_off_together_a_dead_pdas_shift_says_its_courier_is_back_to_close_it(
    app: Flask, session: Session, day: StationDay
) -> None:
    """At 19:00 the manager signs off the day's shifts together, the dead PDA's among
    them (through the API, every shift of the board named). It was refused "still open;
    it is signed off after it is closed", which read as waiting for the courier to close
    it: but she is back, her spare PDA's shift handed over at 17:00, and no one but the
    manager will close it. The refusal now says so, as the board row does, and what to
    do; a shift whose courier is still out keeps the plain reason."""
    first, second, _ = _spare_pda(session, day)
    board = _board_api(app, day, day.day)
    client = app.test_client()
    response = client.post(
        f"/api/v1/stations/{day.station.id}/signoffs",
        json={
            "note": "evening handover",
            "shifts": [
                {"shift_id": row["shift_id"], "balance_version": row["balance_version"]}
                for row in board["shifts"]
            ],
        },
        headers=Auth(client).headers("manager"),
    )
    assert response.status_code == 200, response.get_json()
    said = {o["shift_id"]: (o["code"], o["message"]) for o in response.get_json()["outcomes"]}
    at_17 = station_clock(station_day.local(day.day, 17, 0), day.station.timezone)
    assert said[first.id] == (
        "shift_open",
        f"shift {first.id}: still open, but its courier is back: they handed over shift "
        f"{second.id} on PDA-PDG-10 at {at_17}; close this one (its page), then sign it off",
    )
    assert said[day.open.id] == (
        "shift_open",
        f"shift {day.open.id}: still open; it is signed off after it is closed",
    )
    # Out again on a third PDA: not back, but with two shifts open.
    third = station_day.Pda(
        session,
        factories.device(session, "PDA-PDG-11", day.station),
        session.get_one(User, second.courier_id),
    ).open(station_day.local(day.day, 17, 30))
    response = client.post(
        f"/api/v1/stations/{day.station.id}/signoffs",
        json={
            "note": "evening handover",
            "shifts": [{"shift_id": first.id, "balance_version": "any"}],
        },
        headers=Auth(client).headers("manager"),
    )
    [outcome] = response.get_json()["outcomes"]
    assert outcome["message"] == (
        f"shift {first.id}: still open, and its courier also has shift {third.id} on "
        "PDA-PDG-11 open: close the one no longer used, then sign it off"
    )


def test_signing_off_a_dead_pdas_shift_alone_says_its_courier_is_back_to_close_it(
    app: Flask, session: Session, day: StationDay
) -> None:
    """The manager signs off the dead PDA's shift on its own (``POST /shifts/<id>/signoff``
    and its page's form), not with the others. Signing off together said that Sun Li is
    back and the shift is the manager's to close; alone it said only "still open; it is
    signed off after it is closed", as if she were still out. Both say it the same way
    now; a shift whose courier is still out keeps the plain reason."""
    first, second, _ = _spare_pda(session, day)
    client = app.test_client()
    headers = Auth(client).headers("manager")
    at_17 = station_clock(station_day.local(day.day, 17, 0), day.station.timezone)
    back = (
        f"shift {first.id} is still open, but its courier is back: they handed over shift "
        f"{second.id} on PDA-PDG-10 at {at_17}; close this one (its page), then sign it off"
    )
    response = client.post(
        f"/api/v1/shifts/{first.id}/signoff", json={"note": "checked"}, headers=headers
    )
    assert response.status_code == 409, response.get_json()
    assert (response.get_json()["code"], response.get_json()["message"]) == ("shift_open", back)
    response = client.post(
        f"/api/v1/shifts/{day.open.id}/signoff", json={"note": "checked"}, headers=headers
    )
    assert response.get_json()["message"] == (
        f"shift {day.open.id} is still open; it is signed off after it is closed"
    )
    page = signed_in(app, "manager")
    html = page.post(f"/web/shifts/{first.id}/signoff", note="checked").get_data(as_text=True)
    assert html_escape(back, quote=False) in html
