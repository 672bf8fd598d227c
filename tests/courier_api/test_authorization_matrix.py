"""Who may call what: every endpoint of the URL map, as every kind of caller, declared once.

``MATRIX`` has a row per endpoint (rule and method, from ``app.url_map``; HEAD and
OPTIONS left out) and a cell per caller: the status it must get. A test fails when
an endpoint of the URL map has no row, or a row names no endpoint, so a new route
cannot ship without saying who may call it.

The callers:

* eight identities: ``admin``, ``auditor``, ``integration``, the station manager of
  the subject's station (``manager_own``) and of another (``manager_other``), and a
  courier with their PDA at the subject's station (``courier_own``; the shift, the
  image upload and the consent request are theirs), a colleague of theirs at the same
  station with a PDA of his own (``courier_colleague``: "own station" is not "own
  shift") and a courier at another station (``courier_other``);
* bad credentials, on behalf of the admin unless said: ``no_token``, ``expired``
  (well signed, past ``exp``), ``tampered`` (a character of the signature changed),
  ``alg_none`` (``{"alg": "none"}``, no signature), ``refresh_token`` (a refresh
  token sent as an access token), ``forged_role`` (a courier's token whose payload
  says ``admin``, signature kept) and ``cookie_only`` (the admin's page session
  cookie, no token).

Every subject is real and belongs to station PDG (``tests.subjects``), so "own" and
"other" are about stations. Requests are valid for their caller
(``tests.subjects.REQUESTS``: a push from the caller's own PDA, a new parcel, a
note, ...): a 2xx or a 4xx is about who asks, not about the body. Each cell runs in
a savepoint that is rolled back, so every caller meets the same subjects (a flag
not yet resolved, a consent not yet revoked).

A cell may name the error code too, where the status alone would not tell why:
``"403 not_your_shift"`` (a colleague's shift), not ``station_forbidden`` or
``role_forbidden``. A station-bound caller naming another station's object (a parcel,
shift, flag, proof, consent, request, PDA, user, report or image) by its key gets what a
key that names nothing gets, ``"404 shift_not_found"``: a 403 would tell them it exists
(SECURITY.md threat 3; ``test_another_stations_object_...`` compares the bodies). A 403
stays where the caller's role may not call the endpoint at all (``role_forbidden``),
and for a station named in the path (``station_forbidden``): every caller lists the
stations. Batches judged item by item say how their item fared: ``"200 created"``,
``"200 rejected"`` (a manager's parcel for another station), ``"200 applied"`` (a
courier of another station scanning a PDG parcel: stored and flagged
``wrong_station``, DESIGN.md rule 1; the push names the subject's shift, so a colleague's
event is stored too, not filed under it, and flagged ``wrong_shift``: see
``test_a_colleague_...``); a consent request says how it stands, ``"201 unsent"`` (a
courier of another station asking about a PDG parcel, answered as for a parcel taken in
nowhere).

Defaults: a bearer endpoint answers 401 to every bad credential; a public one
(``public``) answers everyone alike. The pages (``/web/...``) authenticate by the
session cookie, not by tokens: admins, auditors and managers sign in through the
login form and call with their cookie; integrations and couriers cannot sign in
(the login form refuses them, 403) and the bad credentials carry no session, so
they call as visitors without a session: a GET is sent to the login page (302), a
POST is refused for its missing CSRF token (400) before anything else runs.
``cookie_only`` *is* the admin's session there. Validation never runs before
authorization here, except in that CSRF check, which is the point of it.

A 200 on a list says little on its own: ``test_lists_hold_only_...`` checks that
what a station-bound caller lists is their station's (a courier's: their own),
whatever ``station_id`` they ask for.

``GET /readyz`` is checked in a test of its own with tokens made without the
database: on SQLite it reads through a connection of its own, which the subjects'
uncommitted writes would lock out (it would answer its documented 503, slowly).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jwt
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Connection, select
from sqlalchemy.orm import Session
from werkzeug.test import TestResponse

from courier_api.web.session import CSRF_KEY
from models import Flag, ScanEvent, User
from tests import factories, subjects
from tests.conftest import Auth
from tests.exports import exported
from tests.subjects import Subjects

IDENTITIES: dict[str, subjects.Caller] = {
    "admin": subjects.ADMIN,
    "auditor": subjects.AUDITOR,
    "integration": subjects.INTEGRATION,
    "manager_own": subjects.MANAGER,
    "manager_other": subjects.OTHER_MANAGER,
    "courier_own": subjects.COURIER,
    "courier_colleague": subjects.COLLEAGUE,
    "courier_other": subjects.OTHER_COURIER,
}
BAD = ("no_token", "expired", "tampered", "alg_none", "refresh_token", "forged_role")
CALLERS = (*IDENTITIES, *BAD, "cookie_only")
PAGE_USERS = ("admin", "auditor", "manager_own", "manager_other")  # may sign in to pages
SESSION_COOKIE = "courier_session"
LOGIN_FORM_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')
PARAMETER = re.compile(r"<(?:[^<>]*:)?(\w+)>")  # <converter(args):name> in a Flask rule


def _braced(match: re.Match[str]) -> str:
    return "{" + match.group(1) + "}"


Row = dict[str, int | str]


def api(a: Any, u: Any, i: Any, m: Any, m2: Any, c: Any, cc: Any, c2: Any) -> Row:
    """A bearer endpoint: admin, auditor, integration, manager_own, manager_other,
    courier_own, courier_colleague, courier_other; every bad credential gets 401."""
    cells = dict(zip(IDENTITIES, (a, u, i, m, m2, c, cc, c2), strict=True))
    return cells | dict.fromkeys((*BAD, "cookie_only"), 401)


def public(status: int) -> Row:
    return dict.fromkeys(CALLERS, status)


def page(a: Any, u: Any, m: Any, m2: Any, *, visitor: int, **others: Any) -> Row:
    """A page: admin, auditor, manager_own, manager_other with their session; everyone
    else (integration, couriers, bad credentials) is a ``visitor`` without one, unless
    ``others`` says otherwise; ``cookie_only`` is the admin's session."""
    cells: Row = dict.fromkeys(CALLERS, visitor)
    cells |= {"admin": a, "auditor": u, "manager_own": m, "manager_other": m2}
    return cells | {"cookie_only": a} | others


GET_PAGE = {"visitor": 302}  # to the login page
POST_FORM = {"visitor": 400}  # no session, no CSRF token

# fmt: off
MATRIX: dict[str, Row] = {
    # -- public ------------------------------------------------------------------------------
    "GET /":                                                  public(302),  # to /docs
    "GET /healthz":                                           public(200),
    "GET /readyz":                                            public(200),  # test_readyz_...
    "GET /openapi.json":                                      public(200),
    "GET /docs":                                              public(200),
    "GET /docs/assets/{filename}":                            public(200),
    "GET /static/{filename}":                                 public(200),
    "POST /api/v1/auth/token":                                public(200),  # admin's password
    "POST /api/v1/auth/refresh":                              public(200),  # admin's refresh token
    "POST /api/v1/auth/logout":                               public(204),  # admin's refresh token
    # -- operations: the scraper's METRICS_TOKEN or an admin's token -------------------------
    "GET /metrics":                                           api(200, 403, 403, 403, 403, 403, 403, 403),  # noqa: E501
    # -- the API: api(admin, auditor, integration, manager_own, manager_other, courier_own,
    #                courier_colleague, courier_other) ---------------------------------------
    "GET /api/v1/stations":                                   api(200, 200, 200, 200, 200, 200, 200, 200),  # noqa: E501
    "POST /api/v1/stations":                                  api(201, 403, 403, 403, 403, 403, 403, 403),  # noqa: E501
    "GET /api/v1/stations/{station_id}":                      api(200, 200, 200, 200, 403, 200, 200, 403),  # noqa: E501
    "PATCH /api/v1/stations/{station_id}":                    api(200, 403, 403, 403, 403, 403, 403, 403),  # noqa: E501
    "GET /api/v1/users":                                      api(200, 200, 403, 200, 200, 403, 403, 403),  # noqa: E501
    "POST /api/v1/users":                                     api(201, 403, 403, 403, 403, 403, 403, 403),  # noqa: E501
    "GET /api/v1/users/{user_id}":                            api(200, 200, 403, 200, "404 user_not_found", 403, 403, 403),  # noqa: E501
    "PATCH /api/v1/users/{user_id}":                          api(200, 403, 403, 403, 403, 403, 403, 403),  # noqa: E501
    "GET /api/v1/devices":                                    api(200, 200, 403, 200, 200, 403, 403, 403),  # noqa: E501
    "POST /api/v1/devices":                                   api(201, 403, 403, 201, 403, 403, 403, 403),  # noqa: E501
    "GET /api/v1/devices/{device_id}":                        api(200, 200, 403, 200, "404 device_not_found", 403, 403, 403),  # noqa: E501
    "PATCH /api/v1/devices/{device_id}":                      api(200, 403, 403, 200, "404 device_not_found", 403, 403, 403),  # noqa: E501
    "POST /api/v1/devices/{device_id}/move":                  api(200, "403 role_forbidden", 403, "403 role_forbidden", "403 role_forbidden", 403, 403, 403),  # noqa: E501
    "GET /api/v1/devices/{device_id}/lost-seqs":              api(200, 200, 403, 200, "404 device_not_found", 403, 403, 403),  # noqa: E501
    "POST /api/v1/devices/{device_id}/lost-seqs":             api(201, 403, 403, 201, "404 device_not_found", 403, 403, 403),  # noqa: E501
    "POST /api/v1/parcels":                                   api("200 created", 403, "200 created", "200 created", "200 rejected", 403, 403, 403),  # noqa: E501
    "GET /api/v1/parcels/{tracking_no}":                      api(200, 200, 200, 200, "404 parcel_not_found", 200, 200, "404 parcel_not_found"),  # noqa: E501
    "POST /api/v1/sync/push":                                 api(403, 403, 403, 403, 403, "200 applied", "200 applied", "200 applied"),  # noqa: E501
    "GET /api/v1/sync/pull":                                  api(403, 403, 403, 403, 403, 200, 200, 200),  # noqa: E501
    "GET /api/v1/blobs/{sha256}":                             api(200, 200, 403, 200, "404 blob_not_found", 200, "404 blob_not_found", "404 blob_not_found"),  # noqa: E501
    "PUT /api/v1/blobs/{sha256}":                             api(201, 403, 201, 201, 201, 201, 201, 201),  # noqa: E501
    "GET /api/v1/consents":                                   api(200, 200, 200, 200, 200, 403, 403, 403),  # noqa: E501
    "POST /api/v1/consents":                                  api(201, 403, 201, 403, 403, 403, 403, 403),  # noqa: E501
    "GET /api/v1/consents/{consent_id}":                      api(200, 200, 200, 200, "404 consent_not_found", 403, 403, 403),  # noqa: E501
    "POST /api/v1/consents/{consent_id}/revoke":              api(200, 403, 200, 403, 403, 403, 403, 403),  # noqa: E501
    "GET /api/v1/consents/requests":                          api(200, 200, 200, 200, 200, 200, 200, 200),  # noqa: E501
    "POST /api/v1/consents/requests":                         api(403, 403, 403, 403, 403, "201 pending", "201 pending", "201 unsent"),  # noqa: E501
    "GET /api/v1/consents/requests/{request_id}":             api(200, 200, 200, 200, "404 consent_request_not_found", 200, "403 not_your_request", "404 consent_request_not_found"),  # noqa: E501
    "GET /api/v1/proofs":                                     api(200, 200, 403, 200, 200, 403, 403, 403),  # noqa: E501
    "GET /api/v1/proofs/export.csv":                          api(200, 200, 403, 200, 200, 403, 403, 403),  # noqa: E501
    "GET /api/v1/proofs/{event_id}":                          api(200, 200, 403, 200, "404 proof_not_found", 403, 403, 403),  # noqa: E501
    "GET /api/v1/quarantine":                                 api(200, 200, 403, 200, 200, 403, 403, 403),  # noqa: E501
    "GET /api/v1/audit":                                      api(200, 200, 403, 403, 403, 403, 403, 403),  # noqa: E501
    "GET /api/v1/audit/verify":                               api(200, 200, 403, 403, 403, 403, 403, 403),  # noqa: E501
    "GET /api/v1/flags":                                      api(200, 200, 403, 200, 200, 403, 403, 403),  # noqa: E501
    "GET /api/v1/flags/{flag_id}":                            api(200, 200, 403, 200, "404 flag_not_found", 403, 403, 403),  # noqa: E501
    "POST /api/v1/flags/{flag_id}/acknowledge":               api(200, 403, 403, 200, "404 flag_not_found", 403, 403, 403),  # noqa: E501
    "POST /api/v1/flags/{flag_id}/resolve":                   api(200, 403, 403, 200, "404 flag_not_found", 403, 403, 403),  # noqa: E501
    "GET /api/v1/shifts":                                     api(200, 200, 403, 200, 200, 200, 200, 200),  # noqa: E501
    "POST /api/v1/shifts":                                    api(403, 403, 403, 403, 403, 201, 201, 201),  # noqa: E501
    "GET /api/v1/shifts/{shift_id}":                          api(200, 200, 403, 200, "404 shift_not_found", 200, "403 not_your_shift", "404 shift_not_found"),  # noqa: E501
    "POST /api/v1/shifts/{shift_id}/close":                   api(200, 403, 403, 200, "404 shift_not_found", 200, "403 not_your_shift", "404 shift_not_found"),  # noqa: E501
    "GET /api/v1/shifts/{shift_id}/balance":                  api(200, 200, 403, 200, "404 shift_not_found", 200, "403 not_your_shift", "404 shift_not_found"),  # noqa: E501
    "POST /api/v1/shifts/{shift_id}/signoff":                 api(200, 403, 403, 200, "404 shift_not_found", 403, 403, 403),  # noqa: E501
    "POST /api/v1/stations/{station_id}/signoffs":            api(200, 403, 403, 200, 403, 403, 403, 403),  # noqa: E501
    "GET /api/v1/stations/{station_id}/handover":             api(200, 200, 403, 200, 403, 403, 403, 403),  # noqa: E501
    "GET /api/v1/stations/{station_id}/reports/daily":        api(200, 200, 403, 200, 403, 403, 403, 403),  # noqa: E501
    "GET /api/v1/stations/{station_id}/reports/weekly":       api(200, 200, 403, 200, 403, 403, 403, 403),  # noqa: E501
    "GET /api/v1/stations/{station_id}/reports/monthly":      api(200, 200, 403, 200, 403, 403, 403, 403),  # noqa: E501
    "GET /api/v1/stations/{station_id}/reports":              api(200, 200, 403, 200, 403, 403, 403, 403),  # noqa: E501
    "GET /api/v1/reports/{report_id}":                        api(200, 200, 403, 200, "404 report_not_found", 403, 403, 403),  # noqa: E501
    "GET /api/v1/jobs":                                       api(200, 403, 403, 403, 403, 403, 403, 403),  # noqa: E501
    "GET /api/v1/jobs/runs":                                  api(200, 403, 403, 403, 403, 403, 403, 403),  # noqa: E501
    "GET /api/v1/webhooks/topics":                            api(200, 403, 403, 403, 403, 403, 403, 403),  # noqa: E501
    "GET /api/v1/webhooks/subscriptions":                     api(200, 403, 403, 403, 403, 403, 403, 403),  # noqa: E501
    "POST /api/v1/webhooks/subscriptions":                    api(201, 403, 403, 403, 403, 403, 403, 403),  # noqa: E501
    "GET /api/v1/webhooks/subscriptions/{subscription_id}":   api(200, 403, 403, 403, 403, 403, 403, 403),  # noqa: E501
    "PATCH /api/v1/webhooks/subscriptions/{subscription_id}": api(200, 403, 403, 403, 403, 403, 403, 403),  # noqa: E501
    "POST /api/v1/webhooks/subscriptions/{subscription_id}/secret": api(200, 403, 403, 403, 403, 403, 403, 403),  # noqa: E501
    "GET /api/v1/webhooks/deliveries":                        api(200, 403, 403, 403, 403, 403, 403, 403),  # noqa: E501
    "GET /api/v1/webhooks/deliveries/{delivery_id}":          api(200, 403, 403, 403, 403, 403, 403, 403),  # noqa: E501
    "POST /api/v1/webhooks/deliveries/{delivery_id}/replay":  api(200, 403, 403, 403, 403, 403, 403, 403),  # noqa: E501
    "POST /api/v1/webhooks/deliveries/purge":                 api(200, 403, 403, 403, 403, 403, 403, 403),  # noqa: E501
    # -- the pages: page(admin, auditor, manager_own, manager_other, visitor=...) ------------
    "GET /web/":                                              public(302),  # to the board
    "GET /web/login":                                         page(302, 302, 302, 302, visitor=200),  # noqa: E501
    "POST /web/login":                                        page(302, 302, 302, 302, visitor=401, integration=403, courier_own=403, courier_colleague=403, courier_other=403, cookie_only=401),  # noqa: E501
    "POST /web/logout":                                       page(302, 302, 302, 302, **POST_FORM),  # noqa: E501
    "GET /web/board":                                         page(200, 200, 200, 403, **GET_PAGE),
    "GET /web/shifts/{shift_id}":                             page(200, 200, 200, 404, **GET_PAGE),
    "POST /web/shifts/{shift_id}/close":                      page(302, 403, 302, 404, **POST_FORM),  # noqa: E501
    "POST /web/shifts/{shift_id}/signoff":                    page(302, 403, 302, 404, **POST_FORM),  # noqa: E501
    "POST /web/shifts/{shift_id}/lost-seqs":                  page(302, 403, 302, 404, **POST_FORM),  # noqa: E501
    "POST /web/stations/{station_id}/signoffs":               page(200, 403, 200, 403, **POST_FORM),  # no box: the board again  # noqa: E501
    "GET /web/flags":                                         page(200, 200, 200, 403, **GET_PAGE),
    "GET /web/flags/{flag_id}":                               page(200, 200, 200, 404, **GET_PAGE),
    "POST /web/flags/{flag_id}/acknowledge":                  page(302, 403, 302, 404, **POST_FORM),  # noqa: E501
    "POST /web/flags/{flag_id}/resolve":                      page(302, 403, 302, 404, **POST_FORM),  # noqa: E501
    "GET /web/proofs":                                        page(200, 200, 200, 403, **GET_PAGE),
    "GET /web/proofs/export.csv":                             page(200, 200, 200, 403, **GET_PAGE),
    "GET /web/proofs/{event_id}":                             page(200, 200, 200, 404, **GET_PAGE),
    "GET /web/images/{sha256}":                               page(200, 200, 200, 404, **GET_PAGE),
    "GET /web/reports/daily":                                 page(200, 200, 200, 403, **GET_PAGE),
    "GET /web/static/{filename}":                             public(200),
    "GET /web/{unknown}":                                     public(404),  # a 404 page for any other  # noqa: E501
}
# fmt: on
ITEMIZED = {"POST /api/v1/parcels", "POST /api/v1/sync/push"}  # "200 <first item's status>"
WITH_STATUS = {"POST /api/v1/consents/requests"}  # "201 <the request's status>"


def page_request(s: Subjects, path: str) -> tuple[str, dict[str, str] | None]:
    """The URL (at PDG: its station, shift, flag, ...) and, for a POST, the form."""
    params = subjects.path_parameters(s) | {
        "filename": "swagger-ui.css" if path.startswith("/docs") else "web.css",
        "unknown": "no-such-page",
    }
    url = path.format(**params)
    if url in {"/web/board", "/web/flags", "/web/proofs", "/web/proofs/export.csv"}:
        url += f"?station={s.station_id}"
    if url == "/web/reports/daily":
        url += f"?station={s.station_id}"
    forms = {
        "signoff": {"note": "all good"},
        "signoffs": {"note": "all good"},
        "close": {},
        "lost-seqs": {"seqs": "899", "reason": "PDA reset"},  # COURIER's PDA's (subjects)
        "acknowledge": {},
        "resolve": {"note": "found it"},
        "logout": {},
    }
    return url, forms.get(url.rsplit("/", 1)[-1])


# -- credentials ------------------------------------------------------------------------------


def _b64(data: dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _payload(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def bad_tokens(admin: dict[str, Any], courier: dict[str, Any], secret: str) -> dict[str, str]:
    """Bad credentials made from real tokens (``admin``/``courier``: sign-in answers)."""
    access = admin["access_token"]
    claims = _payload(access)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    expired = jwt.encode(
        claims | {"iat": past, "exp": past + dt.timedelta(hours=1)}, secret, algorithm="HS256"
    )
    head, body, signature = access.split(".")
    middle = len(signature) // 2
    swapped = "A" if signature[middle] != "A" else "B"
    tampered = f"{head}.{body}.{signature[:middle]}{swapped}{signature[middle + 1 :]}"
    alg_none = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."
    c_head, c_body, c_signature = courier["access_token"].split(".")
    forged = _payload(courier["access_token"]) | {"role": "admin", "station": None, "device": None}
    return {
        "expired": expired,
        "tampered": tampered,
        "alg_none": alg_none,
        "refresh_token": admin["refresh_token"],
        "forged_role": f"{c_head}.{_b64(forged)}.{c_signature}",
    }


@dataclass
class Credentials:
    tokens: dict[str, str]  # caller -> bearer token
    sessions: dict[str, tuple[str, str]]  # caller -> (session cookie, its CSRF token)


def sign_in_everyone(app: Flask, client: FlaskClient) -> Credentials:
    auth = Auth(client)
    answers = {caller: auth.tokens(*identity) for caller, identity in IDENTITIES.items()}
    tokens = {caller: answer["access_token"] for caller, answer in answers.items()}
    tokens |= bad_tokens(answers["admin"], answers["courier_own"], app.config["JWT_SECRET"])
    sessions = {}
    for caller in PAGE_USERS:
        browser = app.test_client()
        csrf = login_form_token(browser)
        form = {"csrf_token": csrf, "username": IDENTITIES[caller][0]}
        answer = browser.post("/web/login", data=form | {"password": factories.PASSWORD})
        assert answer.status_code == 302, (caller, answer.get_data(as_text=True))
        cookie = browser.get_cookie(SESSION_COOKIE)
        assert cookie is not None
        with browser.session_transaction() as session:
            sessions[caller] = (cookie.value, session[CSRF_KEY])
    sessions["cookie_only"] = sessions["admin"]
    return Credentials(tokens, sessions)


# -- calling ----------------------------------------------------------------------------------


def endpoints(app: Flask) -> Iterator[str]:
    """``METHOD /path/{name}`` of every rule and method of the URL map (the OpenAPI
    spelling: converters left out)."""
    for rule in app.url_map.iter_rules():
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            yield f"{method} {PARAMETER.sub(_braced, rule.rule)}"


@dataclass(frozen=True)
class Answer:
    """What a call got: its status (``"200 <first item's status>"`` for ``ITEMIZED``) and,
    for an API error, the error body's code."""

    status: int | str
    code: str | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.code}" if self.code else str(self.status)

    def matches(self, expected: int | str) -> bool:
        """A cell is a status, or a status and the code it must carry: ``"403 not_your_shift"``."""
        if isinstance(expected, str) and isinstance(self.status, int):
            return str(self) == expected
        return self.status == expected


def call(app: Flask, s: Subjects, credentials: Credentials, endpoint: str, caller: str) -> Answer:
    method, path = endpoint.split(" ", 1)
    client = app.test_client()
    headers = {}
    if caller in credentials.tokens:
        headers["Authorization"] = f"Bearer {credentials.tokens[caller]}"
    session = credentials.sessions.get(caller)
    if session is not None and (caller == "cookie_only" or path.startswith("/web")):
        client.set_cookie(SESSION_COOKIE, session[0])
    if endpoint in subjects.REQUESTS:
        response = open_request(client, s, endpoint, caller, headers)
        if endpoint in ITEMIZED and response.status_code == 200:
            return Answer(f"200 {response.get_json()['results'][0]['status']}")
        if endpoint in WITH_STATUS and response.status_code == 201:
            return Answer(f"201 {response.get_json()['status']}")
        if response.status_code >= 400 and response.is_json:
            return Answer(response.status_code, response.get_json()["code"])
        return Answer(response.status_code)
    if endpoint == "POST /web/login":
        return Answer(_sign_in_form(client, credentials, caller))
    url, form = page_request(s, path)
    if session is not None and path.startswith("/web") and form is not None:
        form = form | {"csrf_token": session[1]}
    response = client.open(url, method=method, headers=headers, data=form)
    response.close()
    return Answer(response.status_code)


def open_request(
    client: FlaskClient, s: Subjects, endpoint: str, caller: str, headers: dict[str, str]
) -> TestResponse:
    """``endpoint``'s request for ``caller`` (``tests.subjects.REQUESTS``), sent."""
    method, path = endpoint.split(" ", 1)
    request = subjects.REQUESTS[endpoint](s, IDENTITIES.get(caller, subjects.ADMIN))
    content = {"json": request.json} if request.data is None else {"data": request.data}
    if request.content_type:
        headers = headers | {"Content-Type": request.content_type}
    return client.open(
        path.format(**request.path),
        method=method,
        headers=headers,
        query_string=request.query,
        **content,
    )


def login_form_token(client: FlaskClient) -> str:
    """The CSRF token the login form carries (its own cookie's, not a session's)."""
    token = LOGIN_FORM_TOKEN.search(client.get("/web/login").get_data(as_text=True))
    assert token is not None
    return token.group(1)


def _sign_in_form(client: FlaskClient, credentials: Credentials, caller: str) -> int:
    """The login form with its CSRF token: each identity with its own password, the bad
    credentials as the admin with a wrong one."""
    session = credentials.sessions.get(caller)  # its cookie is set already
    if session is not None:
        csrf = session[1]
    else:
        csrf = login_form_token(client)
    if caller in IDENTITIES:
        form = {"username": IDENTITIES[caller][0], "password": factories.PASSWORD}
    else:
        form = {"username": subjects.ADMIN[0], "password": "wrong-password"}
    return client.post("/web/login", data=form | {"csrf_token": csrf}).status_code


# -- tests ------------------------------------------------------------------------------------


def test_every_endpoint_of_the_url_map_has_a_row_and_every_row_an_endpoint(app: Flask) -> None:
    routed = set(endpoints(app))
    assert sorted(routed - set(MATRIX)) == [], "endpoints with no row in MATRIX"
    assert sorted(set(MATRIX) - routed) == [], "rows of MATRIX for no endpoint"
    assert all(set(row) == set(CALLERS) for row in MATRIX.values())


def test_every_caller_gets_what_the_matrix_says(
    app: Flask, client: FlaskClient, session: Session, connection: Connection
) -> None:
    s = subjects.build(session, app, client)
    credentials = sign_in_everyone(app, client)
    wrong = []
    for endpoint, row in MATRIX.items():
        if endpoint == "GET /readyz":
            continue
        for caller, expected in row.items():
            savepoint = connection.begin_nested()
            try:
                got = call(app, s, credentials, endpoint, caller)
            finally:
                savepoint.rollback()
            if not got.matches(expected):
                wrong.append(f"{endpoint} as {caller}: expected {expected}, got {got}")
    assert not wrong, "cells that differ from MATRIX:\n" + "\n".join(wrong)


# -- no cache on the way keeps what the API answers ------------------------------------------

IMAGE = "GET /api/v1/blobs/{sha256}"
IMAGE_KEPT = "private, max-age=31536000, immutable"


def test_no_api_answer_is_kept_by_a_cache_on_the_way_but_a_proof_image(
    app: Flask, client: FlaskClient, session: Session, connection: Connection
) -> None:
    """Parcels, proofs (an auditor's hold full phone numbers), the CSV export, consents,
    audit entries: every read of the API, as every caller, refusals and a path no route
    matches too, is sent ``Cache-Control: no-store``, so no proxy or tool's cache on the
    way keeps it; a proof image keeps its own header (SECURITY.md threat 9)."""
    s = subjects.build(session, app, client)
    credentials = sign_in_everyone(app, client)
    reads = [e for e in MATRIX if e.startswith("GET /api/") and e in subjects.REQUESTS]
    kept, statuses = [], {}
    for endpoint in reads:
        for caller in (*IDENTITIES, "no_token"):
            token = credentials.tokens.get(caller)
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            savepoint = connection.begin_nested()
            try:
                response = open_request(app.test_client(), s, endpoint, caller, headers)
                response.get_data()  # a streamed export ends its request here
                response.close()
            finally:
                savepoint.rollback()
            statuses[endpoint, caller] = response.status_code
            image = endpoint == IMAGE and response.status_code == 200
            expected = IMAGE_KEPT if image else "no-store"
            if response.headers.get("Cache-Control") != expected:
                got = response.headers.get("Cache-Control")
                kept.append(f"{endpoint} as {caller} ({response.status_code}): {got}")
    assert not kept, "answers a cache may keep:\n" + "\n".join(kept)
    # What the sample must hold: personal data read by each role, the export, the image.
    for endpoint, caller in (
        ("GET /api/v1/parcels/{tracking_no}", "manager_own"),
        ("GET /api/v1/proofs/{event_id}", "auditor"),
        ("GET /api/v1/proofs/export.csv", "auditor"),
        ("GET /api/v1/consents", "admin"),
        ("GET /api/v1/audit", "auditor"),
        ("GET /api/v1/sync/pull", "courier_own"),
        ("GET /api/v1/consents/{consent_id}", "integration"),
        (IMAGE, "auditor"),
    ):
        assert statuses[endpoint, caller] == 200, (endpoint, caller)
    admin = {"Authorization": f"Bearer {credentials.tokens['admin']}"}
    for response in (
        client.get("/api/v1/no-such-thing", headers=admin),
        client.delete("/api/v1/audit", headers=admin),
    ):
        assert response.status_code in (404, 405)
        assert response.headers.get("Cache-Control") == "no-store"


# -- another station's objects do not exist for a station-bound caller ------------------------

# Endpoints keyed by an object, and the callers bound to another station than the subject's
# (PDG's) who may call them with an object of their own: for them PDG's must not exist, so
# they get exactly what a key naming nothing gets (SECURITY.md threat 3).
HIDDEN: dict[str, tuple[str, ...]] = {
    "GET /api/v1/users/{user_id}": ("manager_other",),
    "GET /api/v1/devices/{device_id}": ("manager_other",),
    "PATCH /api/v1/devices/{device_id}": ("manager_other",),
    "GET /api/v1/devices/{device_id}/lost-seqs": ("manager_other",),
    "POST /api/v1/devices/{device_id}/lost-seqs": ("manager_other",),
    "GET /api/v1/parcels/{tracking_no}": ("manager_other", "courier_other"),
    "GET /api/v1/blobs/{sha256}": ("manager_other", "courier_other"),
    "GET /api/v1/consents/{consent_id}": ("manager_other",),
    "GET /api/v1/consents/requests/{request_id}": ("manager_other", "courier_other"),
    "GET /api/v1/proofs/{event_id}": ("manager_other",),
    "GET /api/v1/flags/{flag_id}": ("manager_other",),
    "POST /api/v1/flags/{flag_id}/acknowledge": ("manager_other",),
    "POST /api/v1/flags/{flag_id}/resolve": ("manager_other",),
    "GET /api/v1/shifts/{shift_id}": ("manager_other", "courier_other"),
    "POST /api/v1/shifts/{shift_id}/close": ("manager_other", "courier_other"),
    "GET /api/v1/shifts/{shift_id}/balance": ("manager_other", "courier_other"),
    "POST /api/v1/shifts/{shift_id}/signoff": ("manager_other",),
    "GET /api/v1/reports/{report_id}": ("manager_other",),
    "GET /web/shifts/{shift_id}": ("manager_other",),
    "POST /web/shifts/{shift_id}/signoff": ("manager_other",),
    "POST /web/shifts/{shift_id}/lost-seqs": ("manager_other",),
    "GET /web/flags/{flag_id}": ("manager_other",),
    "POST /web/flags/{flag_id}/acknowledge": ("manager_other",),
    "POST /web/flags/{flag_id}/resolve": ("manager_other",),
    "GET /web/proofs/{event_id}": ("manager_other",),
    "GET /web/images/{sha256}": ("manager_other",),
}
NOWHERE = 10**9  # an id no subject has


def unknown_keys() -> dict[str, Any]:
    """A well-formed key of each kind that names nothing."""
    ids = ("user_id", "consent_id", "request_id", "event_id", "flag_id", "shift_id", "report_id")
    return dict.fromkeys(ids, NOWHERE) | {
        "tracking_no": factories.s10(),  # valid, taken in nowhere
        "device_id": "PDA-NOWHERE-00",
        "sha256": "0" * 64,
    }


ERROR_MESSAGE = re.compile(r'(<p class="error-message">)(.*?)(</p>)', re.S)


def seen(
    app: Flask, s: Subjects, credentials: Credentials, endpoint: str, caller: str, key: Any
) -> tuple[int, str | None, str]:
    """Status, content type and body of ``endpoint`` called by ``caller`` with its path
    parameter set to ``key``, the key written ``<key>`` in the body's message."""
    method, path = endpoint.split(" ", 1)
    (name,) = PARAMETER.findall(path.replace("{", "<").replace("}", ">"))
    client = app.test_client()
    if path.startswith("/web"):
        cookie, csrf = credentials.sessions[caller]
        client.set_cookie(SESSION_COOKIE, cookie)
        _, form = page_request(s, path)
        form = None if form is None else form | {"csrf_token": csrf}
        response = client.open(path.format(**{name: key}), method=method, data=form)
        html = response.get_data(as_text=True)
        body = ERROR_MESSAGE.sub(lambda m: m[1] + m[2].replace(str(key), "<key>") + m[3], html)
        return response.status_code, response.mimetype, body
    request = subjects.REQUESTS[endpoint](s, IDENTITIES[caller])
    response = client.open(
        path.format(**{**request.path, name: key}),
        method=method,
        headers={"Authorization": f"Bearer {credentials.tokens[caller]}"},
        query_string=request.query,
        json=request.json,
    )
    answer = response.get_json()
    answer["message"] = answer["message"].replace(str(key), "<key>")
    return response.status_code, response.mimetype, json.dumps(answer, sort_keys=True)


def test_another_stations_object_is_answered_as_one_that_does_not_exist(
    app: Flask, client: FlaskClient, session: Session, connection: Connection
) -> None:
    """Asked for by a caller bound to another station, the subject's parcel, shift,
    flag, ... answers byte for byte what a key naming nothing answers (but for the key
    in the message): a 404 with the same code and message, never the 403 that would
    tell them it exists."""
    s = subjects.build(session, app, client)
    credentials = sign_in_everyone(app, client)
    theirs, nowhere = subjects.path_parameters(s), unknown_keys()
    different = []
    for endpoint, callers in HIDDEN.items():
        (name,) = PARAMETER.findall(endpoint.replace("{", "<").replace("}", ">"))
        for caller in callers:
            answers = []
            for key in (theirs[name], nowhere[name]):
                savepoint = connection.begin_nested()
                try:
                    answers.append(seen(app, s, credentials, endpoint, caller, key))
                finally:
                    savepoint.rollback()
            hidden, unknown = answers
            if hidden != unknown or unknown[0] != 404:
                different.append(f"{endpoint} as {caller}:\n  {hidden}\n  {unknown}")
    assert not different, "answers that tell another station's object exists:\n" + "\n".join(
        different
    )


def test_readyz_answers_everyone_alike(app: Flask) -> None:
    secret = app.config["JWT_SECRET"]
    now = dt.datetime.now(dt.UTC)
    claims = {"sub": "1", "role": "admin", "station": None, "device": None, "iat": now}
    claims |= {"exp": now + dt.timedelta(hours=1), "jti": "x", "typ": "access", "ver": 0}
    token = jwt.encode(claims, secret, algorithm="HS256")
    refresh = jwt.encode(claims | {"typ": "refresh"}, secret, algorithm="HS256")
    pair = {"access_token": token, "refresh_token": refresh}
    tokens = bad_tokens(pair, pair, secret)
    client = app.test_client()
    for caller in CALLERS:
        bearer = tokens.get(caller, token if caller in IDENTITIES else None)
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        got = client.get("/readyz", headers=headers).status_code
        assert got == MATRIX["GET /readyz"][caller], caller


# A 200 on a list is only as good as what the list holds: a station-bound caller must see
# their own station's items, whatever station_id they ask for (and a courier their own).
LISTS = (
    "GET /api/v1/users",
    "GET /api/v1/devices",
    "GET /api/v1/consents",
    "GET /api/v1/consents/requests",
    "GET /api/v1/proofs",
    "GET /api/v1/proofs/export.csv",
    "GET /api/v1/quarantine",
    "GET /api/v1/flags",
    "GET /api/v1/shifts",
)
COURIERS_OWN = {"GET /api/v1/consents/requests", "GET /api/v1/shifts"}
STANDING = {"GET /api/v1/consents"}  # standing consents (no station) hold everywhere


def items(response: Any) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.get_data(as_text=True)
    if response.mimetype == "text/csv":  # the proofs' export, its last line checked
        return list(exported(response.get_data(as_text=True)))
    found: list[dict[str, Any]] = response.get_json()["items"]
    return found


def test_lists_hold_only_what_a_station_bound_caller_may_see(
    app: Flask, client: FlaskClient, session: Session
) -> None:
    s = subjects.build(session, app, client)
    credentials = sign_in_everyone(app, client)
    pdg, mhg = s.day.station.id, s.day.other_station.id
    home = {"manager_own": pdg, "courier_own": pdg, "courier_colleague": pdg}
    home |= {"manager_other": mhg, "courier_other": mhg}
    user_ids = {
        caller: session.scalars(select(User.id).where(User.username == username)).one()
        for caller, (username, _) in IDENTITIES.items()
    }

    def get(endpoint: str, caller: str, station_id: int) -> list[dict[str, Any]]:
        headers = {"Authorization": f"Bearer {credentials.tokens[caller]}"}
        query = {"station_id": station_id, "limit": 500}
        if endpoint.endswith(".csv"):
            del query["limit"]
        return items(client.get(endpoint.split(" ")[1], query_string=query, headers=headers))

    for endpoint in LISTS:
        assert get(endpoint, "admin", pdg), f"{endpoint}: nothing at PDG to leak, test nothing"
        for caller, station in home.items():
            if MATRIX[endpoint][caller] != 200:
                continue
            other = pdg if station == mhg else mhg
            for item in get(endpoint, caller, other):
                standing = endpoint in STANDING and item["station_id"] in ("", None)
                assert standing or int(item["station_id"]) == station, (endpoint, caller, item)
                if caller.startswith("courier") and endpoint in COURIERS_OWN:
                    assert int(item["courier_id"]) == user_ids[caller], (endpoint, caller, item)


def test_a_colleague_neither_closes_nor_reads_nor_files_into_anothers_shift(
    app: Flask, client: FlaskClient, session: Session
) -> None:
    """The matrix's ``courier_colleague`` at work on a colleague's *open* shift (Chen
    Lu's): closing and reading it are refused with ``not_your_shift`` and change nothing;
    a push that names it is stored (DESIGN.md rule 1) but not filed under it, and
    flagged ``wrong_shift`` on the pushing PDA."""
    s = subjects.build(session, app, client)
    credentials = sign_in_everyone(app, client)
    headers = {"Authorization": f"Bearer {credentials.tokens['courier_colleague']}"}
    theirs = s.day.open
    assert theirs.courier_id != s.day.couriers[subjects.COLLEAGUE[0]].id

    for method, url, body in (
        ("POST", f"/api/v1/shifts/{theirs.id}/close", {}),
        ("GET", f"/api/v1/shifts/{theirs.id}", None),
        ("GET", f"/api/v1/shifts/{theirs.id}/balance", None),
    ):
        answer = client.open(url, method=method, json=body, headers=headers)
        assert answer.status_code == 403, (url, answer.get_json())
        assert answer.get_json()["code"] == "not_your_shift", (url, answer.get_json())
    session.refresh(theirs)
    assert theirs.status == "open" and theirs.closed_at is None

    event = factories.event(1001, s.parcel, "out_for_delivery", shift_id=theirs.id)
    pushed = client.post(
        "/api/v1/sync/push",
        json=factories.push_body(subjects.COLLEAGUE[1], [event]),
        headers=headers,
    )
    assert pushed.status_code == 200, pushed.get_json()
    assert pushed.get_json()["results"][0]["status"] == "applied", pushed.get_json()
    stored = session.scalars(
        select(ScanEvent).where(ScanEvent.client_event_id == uuid.UUID(event["client_event_id"]))
    ).one()
    assert stored.shift_id != theirs.id
    flag = session.scalars(
        select(Flag).where(Flag.kind == "wrong_shift", Flag.subject_key == subjects.COLLEAGUE[1])
    ).one()
    assert flag.evidence["claimed_shift_ids"] == [theirs.id]


# -- an unknown query parameter is refused everywhere ----------------------------------------


def test_every_api_endpoint_refuses_a_query_parameter_it_does_not_know(
    app: Flask, client: FlaskClient, session: Session, connection: Connection
) -> None:
    """A misspelled filter must never answer as if it were not there (``/jobs/runs?jb=``
    would list every job's runs): each API endpoint, called by the first caller the
    matrix lets in, with one parameter more than its valid request, is a 422 naming it."""
    s = subjects.build(session, app, client)
    credentials = sign_in_everyone(app, client)
    ignored = []
    for endpoint, row in MATRIX.items():
        method, path = endpoint.split(" ", 1)
        if not path.startswith("/api/"):
            continue
        caller = next(c for c in IDENTITIES if str(row[c]).startswith("2"))
        request = subjects.REQUESTS[endpoint](s, IDENTITIES[caller])
        content = {"json": request.json} if request.data is None else {"data": request.data}
        headers = {"Authorization": f"Bearer {credentials.tokens[caller]}"}
        if request.content_type:
            headers["Content-Type"] = request.content_type
        savepoint = connection.begin_nested()
        try:
            response = app.test_client().open(
                path.format(**request.path),
                method=method,
                headers=headers,
                query_string={**(request.query or {}), "unexpected": "1"},
                **content,
            )
        finally:
            savepoint.rollback()
        errors = (response.get_json(silent=True) or {}).get("errors", {})
        refused = errors.get("query") == {"unexpected": ["Unknown field."]}
        if response.status_code != 422 or not refused:
            ignored.append(f"{endpoint} as {caller}: {response.status_code}")
    assert not ignored, "endpoints that ignore an unknown query parameter:\n" + "\n".join(ignored)


# -- an auditor's call writes nothing but the audit log ---------------------------------------

# What an auditor's call may write: the audit log (its reads of evidence, DESIGN.md rule 7),
# the limiter's count of walks of the whole log (threat 4), and signing in and out of the
# pages (the session's own account row).
AUDITOR_MAY_WRITE = {"audit_entry", "audit_entry_parcel", "sign_in_attempt"}
WRITTEN_TABLE = re.compile(
    r"^\s*(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+\"?(\w+)\"?", re.IGNORECASE
)


def test_an_auditors_call_writes_nothing_but_the_audit_log(
    app: Flask, client: FlaskClient, session: Session, connection: Connection
) -> None:
    """DESIGN.md rule 7: auditors read and never write. Every endpoint the matrix lets an
    auditor call, called as the auditor, sends no INSERT, UPDATE or DELETE but to the
    audit log (and the limiter's table)."""
    from sqlalchemy import event

    s = subjects.build(session, app, client)
    credentials = sign_in_everyone(app, client)
    written: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        match = WRITTEN_TABLE.match(statement)
        if match:
            written.append(match[1].lower())

    wrote = []
    # Signing in writes the limiter's attempts and a refresh token's family, whoever signs in.
    sign_ins = {"POST /web/login", "POST /web/logout", "POST /api/v1/auth/token"}
    sign_ins |= {"POST /api/v1/auth/refresh", "POST /api/v1/auth/logout"}
    logged = set()
    for endpoint, row in MATRIX.items():
        if endpoint == "GET /readyz" or endpoint in sign_ins:
            continue
        if not 200 <= int(str(row["auditor"]).split()[0]) < 400:
            continue
        written.clear()
        savepoint = connection.begin_nested()
        event.listen(connection.engine, "before_cursor_execute", note)
        try:
            got = call(app, s, credentials, endpoint, "auditor")
        finally:
            event.remove(connection.engine, "before_cursor_execute", note)
            savepoint.rollback()
        assert got.matches(row["auditor"]), (endpoint, got)
        if "audit_entry" in written:
            logged.add(endpoint)
        others = sorted(set(written) - AUDITOR_MAY_WRITE)
        if others:
            wrote.append(f"{endpoint}: {others}")
    assert "GET /api/v1/proofs/{event_id}" in logged, "no write seen: the test sees nothing"
    assert not wrote, "an auditor's call wrote:\n" + "\n".join(wrote)
