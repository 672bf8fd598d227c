"""Structured logs: one JSON object a line, a request id on every response, no secrets."""

from __future__ import annotations

import datetime as dt
import io
import itertools
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import jwt as pyjwt
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from courier_api.config import ConfigError, load_config, validate_config
from courier_api.logs import REQUEST_ID_HEADER, configure_logging, make_handler, redact
from courier_api.scheduler import delivery_loop_for
from models import AuditEntry, RefreshTokenFamily, User, utcnow
from sync import consents, outbox
from tests import factories
from tests.conftest import TEST_JWT_SECRET, Auth, World
from tests.webhook_receiver import Answer, Receiver


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """Everything logged, as the service writes it: the root logger at DEBUG and the
    SQL echo on, through the service's own handler (format, context and redaction).
    Requested first, so the engine's connections are made with the echo on."""
    root = logging.getLogger()
    engine_logger = logging.getLogger("sqlalchemy.engine")
    levels = (root.level, engine_logger.level)
    stream = io.StringIO()
    configure_logging("DEBUG", "json", stream=stream, force=True)
    engine_logger.setLevel(logging.INFO)
    yield stream
    for handler in [h for h in root.handlers if getattr(h, "_courier_api_handler", False)]:
        root.removeHandler(handler)
    root.setLevel(levels[0])
    engine_logger.setLevel(levels[1])


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = stream.getvalue().splitlines()
    assert lines, "nothing was logged"
    return [json.loads(line) for line in lines]  # every line is one JSON object


def access_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [r for r in records(stream) if r["logger"] == "courier_api.access"]


# -- format and request ids -------------------------------------------------------------------


def test_each_line_is_a_json_object_and_each_response_names_its_request(
    log_output: io.StringIO, client: FlaskClient, world: World, auth: Auth
) -> None:
    headers = auth.headers("courier1", "PDA-0001")
    sane = client.get(
        "/api/v1/parcels/RR473124829GB", headers={**headers, REQUEST_ID_HEADER: "pda-7:42"}
    )
    assert sane.headers[REQUEST_ID_HEADER] == "pda-7:42"
    # Insane ids (too long, spaces, quotes, markup) are replaced by a fresh one.
    for bad in ("x" * 129, "a b", 'a"b', "<script>", "é", ""):
        response = client.get("/healthz", headers={REQUEST_ID_HEADER: bad} if bad else {})
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers[REQUEST_ID_HEADER]), bad
    # Errors too: 404, 405, 401, 422.
    for response in (
        client.get("/no/such/page"),
        client.delete("/api/v1/stations"),
        client.get("/api/v1/stations", headers={"Authorization": "Bearer nope"}),
        client.post("/api/v1/stations", json={}, headers=auth.headers("admin")),
    ):
        assert response.status_code >= 400 and response.headers[REQUEST_ID_HEADER]

    line = next(r for r in access_lines(log_output) if r.get("request_id") == "pda-7:42")
    assert line["level"] == "INFO"
    assert line["method"] == "GET" and line["path"] == "/api/v1/parcels/RR473124829GB"
    assert line["rule"] == "/api/v1/parcels/<string:tracking_no>"
    assert line["status"] == 404 and isinstance(line["duration_ms"], float)
    assert line["user_id"] == world.courier.id and line["role"] == "courier"
    assert line["station_id"] == world.station.id and line["device_id"] == "PDA-0001"
    assert dt.datetime.fromisoformat(line["timestamp"]).tzinfo is not None
    assert {"message", "logger", "pid"} <= set(line)
    unmatched = next(r for r in access_lines(log_output) if r["path"] == "/no/such/page")
    assert "rule" not in unmatched and unmatched["status"] == 404
    # Lines logged inside a request carry its id.
    lookup = [r for r in records(log_output) if "FROM parcel" in r["message"]]
    assert lookup and all(r.get("request_id") == "pda-7:42" for r in lookup)


def test_the_500_page_and_its_log_line_share_the_request_id(
    log_output: io.StringIO, app_with: Callable[..., Flask], world: World
) -> None:
    app = app_with(PROPAGATE_EXCEPTIONS=False)

    @app.route("/api/v1/_boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    response = app.test_client().get("/api/v1/_boom", headers={REQUEST_ID_HEADER: "req-500"})
    assert response.status_code == 500 and response.headers[REQUEST_ID_HEADER] == "req-500"
    error = next(r for r in records(log_output) if r["level"] == "ERROR")
    assert error["request_id"] == "req-500"
    assert "RuntimeError: a bug" in error["exc_info"]


def test_text_format_for_people(app: Flask) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    configure_logging("INFO", "text", stream=stream, force=True)
    try:
        app.test_client().get("/healthz/nothing", headers={REQUEST_ID_HEADER: "r-1"})
    finally:
        for handler in [h for h in root.handlers if getattr(h, "_courier_api_handler", False)]:
            root.removeHandler(handler)
        root.setLevel(level)
    line = stream.getvalue().strip().splitlines()[-1]
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO courier_api\.access \[r-1\]: "
        r"GET /healthz/nothing 404 \d+\.\d ms",
        line,
    ), line


def test_a_json_line_is_written_by_an_encoder_made_once(
    log_output: io.StringIO, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every push writes an access line: ``json.dumps`` with the format's options made a
    ``JSONEncoder`` for each. The lines are the same, written by one made beforehand."""
    made: list[json.JSONEncoder] = []
    initialised = json.JSONEncoder.__init__

    def counted(self: json.JSONEncoder, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        initialised(self, *args, **kwargs)

    monkeypatch.setattr(json.JSONEncoder, "__init__", counted)
    logging.getLogger("courier_api.test").info("caf\u00e9 %s", dt.date(2026, 12, 5))
    for _ in range(3):
        assert client.get("/nothing-here").status_code == 404
    lines = records(log_output)
    assert lines[-4]["message"] == "caf\u00e9 2026-12-05"
    assert [line["path"] for line in lines[-3:]] == ["/nothing-here"] * 3
    assert "caf\u00e9" in log_output.getvalue()  # not escaped: ensure_ascii is off
    assert [encoder for encoder in made if not encoder.ensure_ascii] == []


@pytest.fixture
def text_log() -> Iterator[io.StringIO]:
    """Everything logged at INFO in the text format, as ``make run`` writes it."""
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    configure_logging("INFO", "text", stream=stream, force=True)
    yield stream
    for handler in [h for h in root.handlers if getattr(h, "_courier_api_handler", False)]:
        root.removeHandler(handler)
    root.setLevel(level)


RECORD_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


def test_a_path_sent_by_anyone_forges_no_line_of_the_text_log(
    text_log: io.StringIO, client: FlaskClient
) -> None:
    """Anyone's request path is in its access line. Decoded, ``%0A`` in it was a newline
    written as it came: the text log showed a record the service never made (here an
    admin signing in), and ``%1B`` drove the terminal showing the log. Each record is one
    line, its control characters shown escaped."""
    forged = "2026-12-05 02:20:00,000 WARNING courier_api.auth: admin signed in"
    response = client.get("/api/v1/x%0D%0A" + forged.replace(" ", "%20") + "%1B[2J%E2%80%A8")
    assert response.status_code == 404
    lines = text_log.getvalue().splitlines()
    assert all(RECORD_START.match(line) for line in lines), lines
    access = [line for line in lines if " courier_api.access " in line]
    assert access and "/api/v1/x\\r\\n2026-12-05" in access[-1], access
    assert "\x1b" not in access[-1] and "\\x1b[2J\\u2028" in access[-1]


def test_an_exception_in_the_text_log_keeps_its_lines_under_its_record() -> None:
    """A traceback is many lines, its last the exception's text, which may hold what a
    caller sent (a receiver's answer, a value refused): every line after a record's
    first is indented, so none of them reads as a record of its own."""
    stream = io.StringIO()
    logger = logging.getLogger("tests.text_log")
    handler = make_handler("text", stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError("bad\n2026-12-05 02:20:00,000 INFO courier_api.auth: forged")
        except ValueError:
            logger.exception("it failed\nagain")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    first, *rest = stream.getvalue().splitlines()
    assert RECORD_START.match(first) and first.endswith("it failed\\nagain"), first
    assert rest and all(line.startswith(" ") for line in rest), rest
    assert rest[-1].strip().startswith("2026-12-05 02:20:00,000 INFO"), rest


def test_log_format_is_checked_at_start_up(tmp_path: Any) -> None:
    assert load_config({}, tmp_path)["LOG_FORMAT"] == "json"
    assert load_config({"LOG_FORMAT": "TEXT"}, tmp_path)["LOG_FORMAT"] == "text"
    with pytest.raises(ConfigError, match="LOG_FORMAT"):
        validate_config(load_config({"LOG_FORMAT": "xml"}, tmp_path))


# -- redaction --------------------------------------------------------------------------------

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxIiwicm9sZSI6ImFkbWluIn0."
    "c2lnbmF0dXJlLW9mLXRoZS10b2tlbi1oZXJlLTAxMjM0NTY3"
)


@pytest.mark.parametrize(
    ("text", "hidden", "kept"),
    [
        (f"Authorization: Bearer {JWT}", [JWT, "c2lnbmF0dXJl"], ["Authorization"]),
        ("Bearer Zm9vYmFyYmF6cXV4MTIzNDU2", ["Zm9vYmFyYmF6cXV4MTIzNDU2"], ["Bearer"]),
        ('{"password": "hunter2-long", "username": "ana"}', ["hunter2-long"], ['"ana"']),
        ("password='s3cret pass' next", ["s3cret"], ["next"]),
        ("client_secret=abc123&x=1", ["abc123"], ["x=1"]),
        ("refresh_token: abc.def.ghi", ["abc.def.ghi"], []),
        ("X-Courier-Signature: t=1764470000,v1=" + "ab" * 32, ["ab" * 32], []),
        (
            "hash pbkdf2:sha256:1000$salt1234$" + "0f" * 32,
            ["salt1234", "0f" * 32],
            ["hash"],
        ),
        (
            "secret Wq3xK9_pL2mN8vB4cX7zA1sD5fG6hJ0kQeRtYuIoP",
            ["Wq3xK9_pL2mN8vB4cX7zA1sD5fG6hJ0"],
            [],
        ),
        ("call +86 138 1234 5678 now", ["138 1234", "1234 5678"], ["678 now"]),
        ("to +8613812345678.", ["+8613812345678", "381234"], ["+**********678."]),
        ("phone 13812345678 and +44 7911 123456", ["13812345678", "7911 123"], ["456"]),
        ("手机139-8765-4321。", ["8765"], ["手机********321。"]),
        ("手机１３９－８７６５－４３２１。", ["８７６５"], ["手机********３２１。"]),
        ("sms from 8613812345678 ok", ["13812345", "8613812"], ["**********678 ok"]),
        ("dialled 0086-138-1234-5678", ["1234"], ["************678"]),
        ("tel=(+1) 415-555-0100", [], []),  # no fixed format can catch everything
        # One secret's key, the keyword anywhere in it, whatever its value looks like.
        ("password=123456 ok", ["123456"], ["ok"]),
        ('{"new_password": "hunter2", "password_confirmation": "hunter2"}', ["hunter2"], []),
        ("old_secret: abc1 secrets_token=xyz2", ["abc1", "xyz2"], []),
        ("tokenset=abc123", ["abc123"], []),
        # Many of them named (a plural key): a secret value in it is still hidden as such.
        (f"tokens: {JWT}", [JWT], ["tokens: "]),
        ("refresh_tokens=Wq3xK9_pL2mN8vB4cX7zA1sD5fG6hJ0kQeRtYuIoP", ["Wq3xK9_pL2mN8"], []),
        # A short secret under a plural key, or in a list, an object or a string with an
        # escaped quote in it, or a string never closed: each was left readable.
        ("tokens=abc1 next", ["abc1"], ["tokens=[redacted] next"]),
        ("passwords: hunter2", ["hunter2"], []),
        ("secrets=s3cr3t&x=1", ["s3cr3t"], ["x=1"]),
        ("refresh_tokens=abcdef", ["abcdef"], []),
        ("api_keys=k1;", ["k1"], [";"]),
        ("cookies: session=abc", ["abc"], []),
        ('{"password": ["hunter2", "x"], "user": "ana"}', ["hunter2", '"x"'], ['"ana"']),
        ('{"tokens": ["abc", "def"]}', ["abc", "def"], []),
        ('{"secrets": {"old": "s1x"}}', ["s1x"], []),
        ('password="a\\" b-rest" next', ["b-rest"], ["next"]),
        ('password="never-closed', ["never-closed"], []),
        # A numeric password or PIN under a plural key is a whole number too: kept as a
        # count, it was written as it was. Only a key naming a count keeps its number.
        ("passwords=123456 ok", ["123456"], ["passwords=[redacted] ok"]),
        ('{"passwords": 123456, "user": "ana"}', ["123456"], ['"ana"']),
        ("refresh_tokens=987654", ["987654"], []),
        ("old_passwords: 4321", ["4321"], []),
        ("api_keys=202611", ["202611"], []),
        ("tokens=1234", ["1234"], []),
        # A list or an object to the bracket closing it: read to its first closing
        # bracket, one nested in it or inside a quoted string left the rest readable.
        ('{"secrets": {"old": {"v": "a"}, "new": "s2x"}, "user": "ana"}', ["s2x"], ['"ana"']),
        ('tokens: [["a"], "abc2"] next', ["abc2"], ["next"]),
        ('{"tokens": ["a]", "abc3"], "n": 1}', ["abc3"], ['"n": 1']),
        ("{'cookies': {'a': 'x', 'b': 'abc4'}} tail", ["abc4"], ["tail"]),
    ],
)
def test_redaction(text: str, hidden: list[str], kept: list[str]) -> None:
    clean = redact(text)
    for secret in hidden:
        assert secret not in clean, clean
    for part in kept:
        assert part in clean, clean


@pytest.mark.parametrize(
    ("text", "hidden", "kept"),
    [
        ("Cookie: a=1; courier_session=eyJx.abc; theme=dark", ["eyJx.abc", "theme"], []),
        ("cookie: lang=en;session=s3cr3t\nnext line", ["s3cr3t"], ["\nnext line"]),
        ("Set-Cookie: courier_session=s3cr3t; Path=/; HttpOnly", ["s3cr3t"], []),
        ("headers cookies=a=1; b=s3cr3t\r\nHost: x", ["s3cr3t"], ["Host: x"]),
        ('{"cookie": "a=1; session=s3cr3t", "n": 1}', ["s3cr3t"], ['"n": 1']),
    ],
)
def test_a_cookie_headers_every_cookie_is_redacted(
    text: str, hidden: list[str], kept: list[str]
) -> None:
    """A cookie header holds its cookies separated by "; ": its value was read as a bare
    word, to the first ";", so every cookie after the first (the pages' session, signed
    in) was written as it was. A bare cookie value is hidden to the end of its line."""
    clean = redact(text)
    for secret in hidden:
        assert secret not in clean, clean
    for part in kept:
        assert part in clean, clean


def _token_signed_without_a_digit() -> str:
    """A real HS256 token whose signature holds no digit (one in some 1,400 does): the
    random-string pattern (``_RANDOM``) takes only strings of upper, lower and digits."""
    for n in itertools.count():
        token = pyjwt.encode({"sub": "1", "n": n}, TEST_JWT_SECRET, algorithm="HS256")
        if not any(c.isdigit() for c in token.rsplit(".", 1)[1]):
            return token
    raise AssertionError("unreachable")


@pytest.mark.parametrize("glued_to", ["id_", "reset-", "x", "7", "a_b-"])
def test_a_jwt_glued_to_a_word_is_redacted_whole(glued_to: str) -> None:
    """A JWT right after a letter, a digit, "_" or "-" (a path ``/reset-<token>``, a
    field ``id_<token>``) is redacted as one standing alone is: read only from the start
    of a base64url run, it was left to the random-string pattern, which keeps a part
    with no digit in it (a signature, one token in some 1,400) or shorter than 32
    characters (a small payload), so the log kept what signs the token."""
    token = _token_signed_without_a_digit()
    header, payload, signature = token.split(".")
    clean = redact(f"GET /{glued_to}{token}/next 404")
    assert signature not in clean and payload not in clean, clean
    assert clean == f"GET /{glued_to}[jwt]/next 404"


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-30T08:00:00+08:00 batch 9f1c0c7e-7f43-4c55-9d55-2d7f1b0e6a3b",
        "blob " + "ab12" * 16,  # a sha256 digest stays readable
        "parcel RR473124829GB SF1234567890123 seq 13 of 1764470000123",
        "the token has expired; refresh it or sign in again",
        "wrong username or password",
        "POST /api/v1/auth/token 401 12.5 ms",
        # A count under a plural key is not a secret: the webhook retention job's counts,
        # Alembic's line for a migration (its title names the column in brackets).
        "Running upgrade bf7c3cf65a5c -> 942ecdcc96bf, Password change revokes tokens "
        "(app_user.credentials_version)",
        "purged tokens_revoked=3 families=12",
        "n_tokens=3 secrets_count=2 passwords_total=7",
        'webhook_retention ok in 12 ms {"deliveries":0,"messages":0,'
        '"waiting_for_stopped":0,"old_secrets_forgotten":1}',
    ],
)
def test_what_is_not_secret_stays_readable(text: str) -> None:
    assert redact(text) == text


def _every_pattern_redacted(text: str) -> str:
    """``redact`` as it was before its quick check: every pattern read ``text``."""
    from courier_api import logs

    for redaction in logs._REDACTIONS:
        text = redaction(text)
    return logs.mask_phones_in(logs._RANDOM.sub(logs._mixed, text))


# Pieces near what a pattern needs: each keyword and literal whole, cut short, in
# another case, glued to a word, and Unicode letters that ``(?i)`` reads as ASCII ones.
_NEAR_SECRETS = [
    "eyJ", "eyj", "EYJ", "eyJhbGciOi", ".", "bearer ", "Basic ", "BEARER", "bear", "token",
    "tokens=", "TOKEN:", "toke", "api_key=", "api-key", "APIKEY", "apikey", "api", "key",
    "pwd=", "passwd", "Password", "passw", "secret", "sekret", "authorization", "signature",
    "cookie", "Cookie: ", "pbkdf2:", "PBKDF2", "scrypt:1:", "$", "v1=", "V1=", "ſecret",
    "to\u212aen", "password\u0131", "Wq3xK9_pL2mN8vB4cX7zA1sD5fG6hJ0kQ", "a" * 31, "A1",
    "+86 138 1234 5678", "13812345678", "１３９", " ", "=", ":", '"', "[", "{", "/api/v1/",
    "sync/push", "POST ", " 200 ", "12.3 ms", "-", "_",
]  # fmt: skip


def test_a_text_the_quick_check_passes_is_redacted_as_every_pattern_would() -> None:
    """``redact`` skips its patterns for a text none of them can match (an access line's
    message, new with each request): for every text, it writes what reading the text
    with every pattern writes."""
    import random

    rng = random.Random(51)
    texts = [piece * 2 for piece in _NEAR_SECRETS]
    texts += ["".join(rng.choices(_NEAR_SECRETS, k=rng.randint(1, 6))) for _ in range(5_000)]
    for text in texts:
        assert redact(text) == _every_pattern_redacted(text), text


# Every word and literal a pattern of ``_REDACTIONS`` is written with, and Unicode
# letters ``(?i)`` reads as ASCII ones (long s, Kelvin sign, Turkish dotted and dotless i).
_PATTERN_WORDS = [
    "eyJ", "bearer", "basic", "password", "passwd", "pwd", "secret", "token", "apikey",
    "api_key", "api-key", "authorization", "signature", "cookie", "pbkdf2", "scrypt", "v1=",
]  # fmt: skip
_ANY_PATTERN_WORD = st.sampled_from(_PATTERN_WORDS)
_FOLDED_LIKE_ASCII = {"s": "\u017f", "k": "\u212a", "i": "\u0131\u0130"}


@st.composite
def _a_pattern_word_disguised(
    draw: st.DrawFn, words: st.SearchStrategy[str] = _ANY_PATTERN_WORD
) -> str:
    """A pattern's word with each letter in either case, maybe one swapped for a
    Unicode letter ``(?i)`` folds to it, maybe cut short or split by a character."""
    word = draw(words)
    as_written = st.just([False] * len(word))  # often: some patterns heed the case
    flips = draw(as_written | st.lists(st.booleans(), min_size=len(word), max_size=len(word)))
    letters = [c.upper() if flip else c for c, flip in zip(word, flips, strict=True)]
    index = draw(st.integers(0, len(word) - 1))
    twins = _FOLDED_LIKE_ASCII.get(word[index].lower(), "")
    how = draw(st.sampled_from(["whole", "whole", "folded", "folded", "cut", "split"]))
    if how == "folded" and twins:
        letters[index] = draw(st.sampled_from(twins))
    elif how == "cut":
        letters = letters[:index]
    elif how == "split":
        letters.insert(index, draw(st.sampled_from(["-", "_", " ", ".", "%", "\x00", "\u200b"])))
    return "".join(letters)


# A secret as a pattern may find it: a key's value, a header, a token, a hash, a
# signature (each pattern's word disguised in front of what it needs after it).
_SECRET_SHAPED = st.tuples(
    st.sampled_from(["", "", "x_", "/", "old-", '"', "?a=1&"]),
    _a_pattern_word_disguised(),
    st.sampled_from(["", "", "", "s", "_count", "Hdr"]),
    st.sampled_from(["", "=", "=", ": ", '":"', " ", " ", "\t", ":"]),
    st.from_regex(r"[A-Za-z0-9._~+/=:-]{8,24}|[A-Za-z0-9$]{0,8}", fullmatch=True),
    st.sampled_from(["", "", "$ab12", ".abcd.ef", "; b=2", "}", " 200 4.2 ms"]),
).map("".join)
_SECRET_AFTER = {
    "eyJ": "hbGciOi.eyJzdWIiOiIx.c2lnbmF0dXJl",
    "bearer": " abcdefgh12345678",
    "basic": "\tdXNlcjpwYXNzd29yZA==",
    "password": "=hunter2",
    "pbkdf2": ":sha256:600000$salt$0123abcd",
    "scrypt": ":32768:8:1$salt$0123abcd",
    "v1=": "0123456789abcdef0123",
}
_TEMPLATED = st.sampled_from(sorted(_SECRET_AFTER)).flatmap(
    lambda word: st.tuples(
        st.just(word), st.sampled_from(["", "", "", "(", "/", "x"]), st.just(_SECRET_AFTER[word])
    )
)


@st.composite
def _a_templated_secret_disguised(draw: st.DrawFn) -> str:
    """One of ``_SECRET_AFTER``'s secrets whole, its word disguised as
    ``_a_pattern_word_disguised`` disguises any."""
    word, before, after = draw(_TEMPLATED)
    disguised = draw(_a_pattern_word_disguised(st.just(word)))
    return before + disguised + after


# Around it, what an access line, a path or a message holds; rarely a word of a pattern.
_FILLER = st.one_of(
    st.from_regex(r"[ /A-Za-z0-9._-]{0,12}", fullmatch=True),
    st.sampled_from(_NEAR_SECRETS),
    st.text(max_size=3),
)
_TEXTS_NEAR_SECRETS = st.tuples(
    _FILLER, st.one_of(_SECRET_SHAPED, _a_templated_secret_disguised()), _FILLER
).map("".join)


@settings(max_examples=1_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_TEXTS_NEAR_SECRETS)
def test_any_text_is_redacted_as_every_pattern_would(text: str) -> None:
    """The quick check as a property: over generated texts (each pattern's words in any
    case, cut, split, with Unicode letters ``(?i)`` folds to ASCII, glued to keys,
    values, tokens and hashes), ``redact`` writes what every pattern would."""
    assert redact(text) == _every_pattern_redacted(text)


def test_an_access_line_with_nothing_secret_in_it_is_read_by_no_redaction_pattern(
    log_output: io.StringIO, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push's access line (``POST /api/v1/sync/push 200 4.2 ms``) is new with every
    request, so no remembered redaction spares it: each pattern read it, about 74,000
    instructions of a one-scan push's 6.4 million (``docs/BENCHMARKS.md``, stop 51). A
    quick check finds that none can match; a line where one may is read by them all."""
    from courier_api import logs

    read: list[str] = []

    def counted(redaction: Callable[[str], str]) -> Callable[[str], str]:
        def reading(text: str) -> str:
            read.append(text)
            return redaction(text)

        return reading

    monkeypatch.setattr(logs, "_REDACTIONS", [counted(r) for r in logs._REDACTIONS])
    plain, keyed = f"/nothing-{uuid.uuid4().hex}", f"/nothing-{uuid.uuid4().hex}/token=s3cr3t"
    for path in (plain, keyed):
        assert client.get(path).status_code == 404
    plain_line, keyed_line = access_lines(log_output)[-2:]
    assert plain_line["message"] == f"GET {plain} 404 {plain_line['duration_ms']} ms"
    assert "s3cr3t" not in keyed_line["message"]
    assert [text for text in read if plain in text] == []
    assert any(keyed in text for text in read)


@pytest.mark.parametrize(
    "run",
    [
        "eyJ",  # a JWT's start again and again, no dot: each start read the run to its end
        "pbkdf2:",  # a password hash's method, its parameters never ending in "$"
        "scrypt:1:",
        "token-",
        "tokens=[",
        "tokens=[]",
        "tokens=['",
        '[{"',
        'password="\\',
        "tokens-=1 ",
        "aA1-",
        "v1=",
        "+1 ",
        "cookie=a;\n",
    ],
)
def test_redaction_takes_time_linear_in_the_lines_length(run: str) -> None:
    """Every access line holds a path anyone sends; an exception's text may hold what a
    caller sent too. A run of a JWT's start (``eyJeyJ...``) or of a password hash's
    method (``pbkdf2:pbkdf2:...``) made each of its repetitions a start that read the
    rest of the run: 4 KB of it cost a line 80 ms, 40 KB 11 s. Each pattern reads a
    line in time linear in its length."""
    line = "/" + run * (40_000 // len(run))
    started = time.perf_counter()
    redact(line)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"{elapsed:.2f} s for {len(line)} characters of {run!r}"


def test_a_long_path_sent_by_anyone_costs_its_access_line_no_more_than_reading_it(
    log_output: io.StringIO, client: FlaskClient
) -> None:
    """Every request's path is redacted into its access line, a stranger's 404 too. A
    path of words and dashes ("token-token-...", within the 4 KB request line gunicorn
    reads) once cost the redaction time quadratic in its length (half a minute of a
    worker's processor for 4 KB): the line is written in time linear in it, and still
    hides a secret-looking value in it."""
    path = "/" + "token-" * 333 + "x"
    started = time.perf_counter()
    response = client.get(path)
    elapsed = time.perf_counter() - started
    assert response.status_code == 404
    assert elapsed < 1.0, f"{elapsed:.1f} s for a {len(path)}-character path"
    assert client.get(path + "/x-api-key=s3cr3t-value").status_code == 404
    line = access_lines(log_output)[-1]
    assert "s3cr3t-value" not in line["path"] and "s3cr3t-value" not in line["message"]
    assert line["path"].endswith("x-api-key=[redacted]"), line["path"][-40:]


def test_no_password_token_secret_or_phone_reaches_the_log(
    log_output: io.StringIO,
    app_with: Callable[..., Flask],
    session: Session,
    world: World,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sign-ins (right and wrong), a refresh, an intake and a consent with phones, a
    webhook subscription and deliveries (one answered with its own signature echoed
    back), and a 500 whose error names a phone: the log holds none of it."""
    app = app_with(PROPAGATE_EXCEPTIONS=False)
    client = app.test_client()
    auth = Auth(client)
    seen: list[str] = [factories.PASSWORD, TEST_JWT_SECRET]

    def tokens(username: str, device: str | None = None) -> dict[str, str]:
        pair = auth.tokens(username, device)
        seen.extend([pair["access_token"], pair["refresh_token"]])
        return {"Authorization": f"Bearer {pair['access_token']}"}

    admin, manager, app1 = tokens("admin"), tokens("manager1"), tokens("app1")
    courier_pair = auth.tokens("courier1", "PDA-0001")
    seen.extend([courier_pair["access_token"], courier_pair["refresh_token"]])
    wrong = "Wrong-Password-1234"
    seen.append(wrong)
    for username in ("manager1", "nobody"):
        response = client.post(
            "/api/v1/auth/token", json={"username": username, "password": wrong}
        )
        assert response.status_code == 401
    refreshed = client.post(
        "/api/v1/auth/refresh", json={"refresh_token": courier_pair["refresh_token"]}
    ).get_json()
    seen.extend([refreshed["access_token"], refreshed["refresh_token"]])
    seen.append(session.scalar(select(User.password_hash).where(User.username == "admin")))

    phones = {"138 1234 5678": "+8613812345678", "+44 7911 123456": "+447911123456"}
    parcels = [
        {
            "tracking_no": factories.s10(),
            "service_class": "express",
            "recipient_name": "Li Lei",
            "recipient_phone": written,
            "address": "1 Century Ave",
        }
        for written in phones
    ]
    intake = client.post("/api/v1/parcels", json={"parcels": parcels}, headers=manager)
    assert intake.status_code == 200, intake.get_json()
    assert intake.get_json()["counts"]["created"] == 2, intake.get_json()
    consent = {
        "scope": "standing",
        "recipient_phone": "139 8765 4321",
        "address": "1 Century Ave",
        "method": "any",
        "channel": "sms",
        "granted_at": utcnow().isoformat(),
    }
    assert client.post("/api/v1/consents", json=consent, headers=app1).status_code == 201
    phones["139 8765 4321"] = "+8613987654321"

    with Receiver() as receiver:
        subscription = client.post(
            "/api/v1/webhooks/subscriptions",
            json={"url": receiver.url, "topics": ["flag.raised"]},
            headers=admin,
        ).get_json()
        seen.append(subscription["secret"])
        for key in ("RR000000001GB", "RR000000002GB"):
            outbox.announce(
                session=session,
                topic="flag.raised",
                ordering_key=key,
                station_id=None,
                data={"subject_key": key, "recipient_phone": "+8613812345678"},
            )
        session.commit()
        receiver.answer(Answer(500, echo_header="X-Courier-Signature"))
        loop = delivery_loop_for(app)
        try:
            counts = loop.drain()
        finally:
            loop.close()
        assert len(receiver.requests) == 2, counts
        seen.extend(
            r.headers["x-courier-signature"].partition("v1=")[2] for r in receiver.requests
        )

    def fail(**kwargs: Any) -> None:
        raise RuntimeError(f"could not store the consent of {kwargs['draft'].recipient_phone}")

    monkeypatch.setattr(consents, "grant", fail)
    broken = client.post("/api/v1/consents", json=consent, headers=app1)
    assert broken.status_code == 500

    output = log_output.getvalue()
    lines = records(log_output)
    # Not vacuous: the sign-ins, the SQL, the deliveries and the 500 were all logged.
    assert any(r["message"].startswith("POST /api/v1/auth/token 401") for r in lines)
    assert any(r["message"].startswith("POST /api/v1/auth/refresh 200") for r in lines)
    assert any("INSERT INTO parcel" in r["message"] for r in lines)
    assert any("INSERT INTO webhook_subscription" in r["message"] for r in lines)
    assert sum("delivery" in r["message"] and r["logger"] == "sync.webhooks" for r in lines) >= 2
    failure = next(r for r in lines if r["level"] == "ERROR" and "exc_info" in r)
    assert "could not store the consent of ********321" in failure["exc_info"]
    assert all(secret and len(secret) >= 8 for secret in seen)
    for secret in seen:
        assert secret not in output, secret[:12]
    for written, e164 in phones.items():
        for form in (written, e164, e164.lstrip("+"), e164[3:]):
            assert form not in output, form


def test_a_path_seen_again_is_redacted_once_and_hidden_each_time(
    log_output: io.StringIO, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every push's access line names the same path: its redaction is remembered, not
    done again (some 20 us a push); a long path (anyone's) is redacted each time."""
    from courier_api import logs

    redacted: list[str] = []

    def counted(text: str) -> str:
        redacted.append(text)
        return redact(text)

    monkeypatch.setattr(logs, "redact", counted)
    short = f"/nothing-{uuid.uuid4().hex}/x-api-key=s3cr3t-value"
    long = f"/{uuid.uuid4().hex}" + "-x" * 200 + "/x-api-key=s3cr3t-value"
    for path in (short, short, long, long):
        assert client.get(path).status_code == 404
    lines = access_lines(log_output)[-4:]
    assert [line["path"].endswith("x-api-key=[redacted]") for line in lines] == [True] * 4
    assert all("s3cr3t-value" not in line["message"] for line in lines)
    assert redacted.count(short) == 1
    assert redacted.count(long) == 2


def test_the_access_line_names_the_client_as_the_audit_entry_of_its_request_does(
    log_output: io.StringIO, client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """An audit entry keeps its client's address in one spelling (``sync.audit.
    client_ip``: an IPv4 client reached over IPv6 by its IPv4 address, an IPv6 one
    compressed, in lower case); the access line kept the address as the socket or the
    proxy spelled it, so an auditor matching log lines to an auditor's reads by address
    (where did this read come from, what else did that client ask for) found none of a
    dual-stack listener's IPv4 clients, nor an IPv6 one a proxy spelled otherwise. Both
    now name it alike, by one normaliser."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    headers = auth.headers("auditor1")
    log_output.truncate(0)
    log_output.seek(0)
    for sent, kept in (
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("2001:DB8::0:1", "2001:db8::1"),
        ("198.51.100.23", "198.51.100.23"),
    ):
        read = client.get(
            f"/api/v1/parcels/{parcel.tracking_no}",
            headers=headers,
            environ_base={"REMOTE_ADDR": sent},
        )
        assert read.status_code == 200, read.get_json()
        session.expire_all()
        entry = session.scalars(
            select(AuditEntry)
            .where(AuditEntry.action == "parcel_read")
            .order_by(AuditEntry.id.desc())
            .limit(1)
        ).one()
        (line,) = [
            a
            for a in access_lines(log_output)
            if a.get("request_id") == read.headers[REQUEST_ID_HEADER]
        ]
        assert (line["client"], entry.client_ip) == (kept, kept), sent


def test_the_newest_endpoints_log_no_token_secret_or_phone(
    log_output: io.StringIO, client: FlaskClient, session: Session, world: World
) -> None:
    """The endpoints added since the log's first test, each with a token, a secret or a
    phone number to hand: signing out and a refresh token reused (their warnings name
    the family, never the token), a webhook secret rotated, a PDA's lost seqs written off
    and a shift signed off with a recipient's phone in the reason and the note, a flag
    resolved so, a PDA moved, another station's PDA id refused, and an auditor's reads of
    the audit log that holds those texts whole: the log holds none of them."""
    from tests.courier_api.test_shifts_api import Courier, parcels, sign_off

    auth = Auth(client)
    seen: list[str] = [factories.PASSWORD, TEST_JWT_SECRET]

    def tokens(username: str, device: str | None = None) -> dict[str, str]:
        pair = auth.tokens(username, device)
        seen.extend([pair["access_token"], pair["refresh_token"]])
        return {"Authorization": f"Bearer {pair['access_token']}"}

    admin, manager, auditor = tokens("admin"), tokens("manager1"), tokens("auditor1")
    phones = {"138 1234 5678": "+8613812345678", "+44 7911 123456": "+447911123456"}
    said = "recipient on 138 1234 5678 confirmed; their neighbour +44 7911 123456 too"

    signed_out = auth.tokens("courier1", "PDA-0001")
    seen.extend([signed_out["access_token"], signed_out["refresh_token"]])
    refresh = {"refresh_token": signed_out["refresh_token"]}
    assert client.post("/api/v1/auth/logout", json=refresh).status_code == 204
    reused = auth.tokens("courier1", "PDA-0001")
    seen.extend([reused["access_token"], reused["refresh_token"]])
    refresh = {"refresh_token": reused["refresh_token"]}
    rotated = client.post("/api/v1/auth/refresh", json=refresh).get_json()
    seen.extend([rotated["access_token"], rotated["refresh_token"]])
    session.execute(update(RefreshTokenFamily).values(used_at=utcnow() - dt.timedelta(minutes=10)))
    session.commit()
    again = client.post("/api/v1/auth/refresh", json=refresh)
    assert (again.status_code, again.get_json()["code"]) == (401, "refresh_token_reused")

    subscription = client.post(
        "/api/v1/webhooks/subscriptions",
        json={"url": "https://receiver.example/hook", "topics": ["flag.raised"]},
        headers=admin,
    ).get_json()
    secret = client.post(
        f"/api/v1/webhooks/subscriptions/{subscription['id']}/secret",
        json={"grace_hours": 0},
        headers=admin,
    )
    assert secret.status_code == 200, secret.get_json()
    seen.extend([subscription["secret"], secret.get_json()["secret"]])

    pda = Courier(client, auth, "courier1", "PDA-0001")
    seen.append(pda.headers["Authorization"].removeprefix("Bearer "))
    a, b = parcels(session, world, 2)
    shift = pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(b)])
    pda.seq += 1  # seq 3 lost in a reset
    pda.push([pda.event(a, "delivered_to_locker", locker_id="L-1", compartment="7")])
    assert pda.close(shift["id"], last_seq=4).status_code == 200
    written_off = client.post(
        "/api/v1/devices/PDA-0001/lost-seqs",
        json={"seqs": [3], "ranges": [], "reason": said},
        headers=manager,
    )
    assert written_off.status_code == 201, written_off.get_json()
    flags = client.get(f"/api/v1/flags?shift_id={shift['id']}", headers=manager).get_json()
    flag_ids = [f["id"] for f in flags["items"]]
    assert flag_ids, flags
    resolved = client.post(
        f"/api/v1/flags/{flag_ids[0]}/resolve", json={"note": said}, headers=manager
    )
    assert resolved.status_code == 200, resolved.get_json()
    signed = sign_off(client, shift["id"], manager, note=said, force_reason=said)
    assert signed.status_code == 200, signed.get_json()

    factories.device(session, "PDA-0901", world.other_station)
    session.commit()
    taken = client.post("/api/v1/devices", json={"device_id": "PDA-0901"}, headers=manager)
    assert taken.status_code == 409
    moved = client.post(
        "/api/v1/devices/PDA-0901/move", json={"station_id": world.station.id}, headers=admin
    )
    assert moved.status_code == 200, moved.get_json()

    entries = client.get("/api/v1/audit?limit=100", headers=auditor)
    assert entries.status_code == 200, entries.get_json()
    assert said in json.dumps(entries.get_json()), "the auditor reads the texts whole"
    lost = client.get("/api/v1/devices/PDA-0001/lost-seqs", headers=auditor)
    assert lost.status_code == 200 and said in json.dumps(lost.get_json())

    output = log_output.getvalue()
    lines = records(log_output)
    # Not vacuous: each of them was logged.
    for logged in (
        "POST /api/v1/auth/logout 204",
        "POST /api/v1/auth/refresh 401",
        f"POST /api/v1/webhooks/subscriptions/{subscription['id']}/secret 200",
        "POST /api/v1/devices/PDA-0001/lost-seqs 201",
        f"POST /api/v1/flags/{flag_ids[0]}/resolve 200",
        f"POST /api/v1/shifts/{shift['id']}/signoff 200",
        "POST /api/v1/devices/PDA-0901/move 200",
        "GET /api/v1/audit 200",
    ):
        assert any(r["message"].startswith(logged) for r in lines), logged
    assert any(r["message"].startswith("signed out: sign-in family") for r in lines)
    assert any(r["message"].startswith("refresh token reused") for r in lines)
    assert all(secret and len(secret) >= 8 for secret in seen)
    for secret in seen:
        assert secret not in output, secret[:12]
    for written, e164 in phones.items():
        for form in (written, e164, e164.lstrip("+"), e164[3:]):
            assert form not in output, form
