"""Logs: one JSON object a line (or text for people), a request id, nothing secret.

* ``configure_logging`` puts one handler on the root logger, for every process of
  the service: ``create_app`` (hence ``serve``'s gunicorn workers, the CLI and the
  scheduler) calls it, and gunicorn's own logger is routed through it
  (``GunicornLogger``). ``LOG_FORMAT=json`` (the default) writes each record as one
  JSON object: ``timestamp``, ``level``, ``logger``, ``message``, ``pid``, and in a
  request ``request_id`` and who is calling; ``text`` writes a line for people.
* ``init_app`` gives every request an id: the caller's ``X-Request-Id`` when it is
  sane (1-128 characters of ``A-Z a-z 0-9 . _ : -``), else a new one. It is sent back
  in ``X-Request-Id`` on every response, errors included, and one access line is
  logged per request (``courier_api.access``): method, path, url rule, status,
  duration, the client's address as the request's audit entries name it, and the
  user, role, station and device when known.
* ``Redactor``, a filter on that handler, rewrites every record before it is
  written, whichever logger it comes from: bearer tokens and JWT-looking strings,
  values of ``password``/``secret``/``token``-like keys, plurals too (``tokens=abc``,
  ``passwords=123456``; only a whole number under a key naming a count of them stays:
  ``"old_secrets_forgotten":1``, ``tokens_revoked=3``), a quoted,
  listed or bracketed value whole, password hashes, webhook
  signatures, long random-looking strings, and phone numbers (all but their last
  3 digits, in any script's digits: ``sync.phones.mask_phones_in``, the pattern the
  API masks free text with). It is defense in depth: the code logs none of these on
  purpose, and SQL parameters are never logged (``models.engine``: ``hide_parameters``).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable
from typing import IO, Any

from flask import Flask, Response, g, has_request_context, request

from courier_api import metrics
from sync import audit
from sync.phones import mask_phones_in

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID_ENVIRON = "HTTP_" + REQUEST_ID_HEADER.upper().replace("-", "_")  # as WSGI names it
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
ACCESS_LOGGER = "courier_api.access"
# Probes and scrapes that succeed are logged at DEBUG: they come every few seconds.
QUIET_RULES = frozenset({"/healthz", "/readyz", "/metrics"})
# Record attributes written as JSON fields when present (set by ``RequestContext`` or
# passed as ``extra``).
FIELDS = (
    "request_id",
    "method",
    "path",
    "rule",
    "status",
    "duration_ms",
    "client",
    "user_id",
    "role",
    "station_id",
    "device_id",
)
_HANDLER_MARK = "_courier_api_handler"


# -- the request id and the access line -------------------------------------------------------


def init_app(app: Flask) -> None:
    app.before_request(_start_request)
    app.after_request(_finish_request)


# The request and ``g`` are taken out of their context proxies once per function here
# and on the push's path: each name looked up through a proxy (``request.path``) first
# fails on the proxy itself, an ``AttributeError`` made and its message formatted:
# about 9,000 instructions a name with the proxy's own work (a one-scan push looked up
# 53; 33 fewer saved it 295,000, ``docs/BENCHMARKS.md``, stop 48).


def _start_request() -> None:
    req, ctx = request._get_current_object(), g._get_current_object()  # type: ignore[attr-defined]
    ctx.request_started = time.perf_counter()
    # From the environ: ``headers.get`` raises and catches a ``KeyError`` when a request
    # sends no id (nearly all of them).
    incoming = req.environ.get(_REQUEST_ID_ENVIRON, "")
    ctx.request_id = incoming if _SANE_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex


def _finish_request(response: Response) -> Response:
    req, ctx = request._get_current_object(), g._get_current_object()  # type: ignore[attr-defined]
    if ctx.get("request_id") is None:  # a before_request of ours never ran
        _start_request()
    response.headers[REQUEST_ID_HEADER] = ctx.request_id
    duration = time.perf_counter() - ctx.request_started
    url_rule = req.url_rule
    rule = url_rule.rule if url_rule is not None else None
    method, path, status = req.method, req.path, response.status_code
    metrics.observe_request(method, rule, status, duration)
    quiet = rule in QUIET_RULES and status < 400
    logging.getLogger(ACCESS_LOGGER).log(
        logging.DEBUG if quiet else logging.INFO,
        "%s %s %s %.1f ms",
        method,
        path,
        status,
        duration * 1000,
        extra={
            "method": method,
            "path": path,
            "rule": rule,
            "status": status,
            "duration_ms": round(duration * 1000, 1),
            "client": _client(req.remote_addr),
        },
    )
    return response


def _client(address: str | None) -> str | None:
    """The request's client as the audit entries it writes name it (``sync.audit.
    client_ip``: an IPv4 client reached over IPv6 by its IPv4 address, one spelling of
    an IPv6 one, None for what names no address), so that an auditor finds a read's
    access line by the address its entry gives. The web edge set it for the request
    (``courier_api.app``), worked out once; worked out here when that has not run."""
    return audit.CLIENT_IP.get() or audit.client_ip(address)


class RequestContext(logging.Filter):
    """Adds the request id, and who is calling when known, to records made in a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not has_request_context():
            return True
        ctx = g._get_current_object()  # type: ignore[attr-defined]  # once (``_start_request``)
        if getattr(record, "request_id", None) is None:
            record.request_id = ctx.get("request_id")
        principal = ctx.get("principal")
        if principal is not None and getattr(record, "user_id", None) is None:
            record.user_id = principal.user_id
            record.role = principal.role.value
            record.station_id = principal.station_id
            record.device_id = principal.device_id
        return True


# -- redaction --------------------------------------------------------------------------------


def _jwts(run: str) -> str:
    """``run`` (base64url and dots) with each JSON Web Token in it as ``[jwt]``: three
    parts, the first a JSON object ("eyJ" and 4 more characters) wherever it begins, so
    that one glued to a word (``/reset-<token>``, ``id_<token>``) goes whole too, the
    second of 4 or more. Worked out on the run's parts, each read once: a pattern
    trying each "eyJ" of a run of them without a dot ("eyJeyJ...", anyone's path) read
    the run to its end again from each, time quadratic in its length; one trying only
    a run's start left a token glued to a word to the random-string pattern
    (``_RANDOM``), which keeps a signature with no digit in it (one in some 1,400)."""
    parts = run.split(".")
    kept: list[str] = []
    index = 0
    while index < len(parts):
        part = parts[index]
        start = part.find("eyJ")
        if 0 <= start <= len(part) - 7 and index + 2 < len(parts) and len(parts[index + 1]) >= 4:
            kept.append(part[:start] + "[jwt]")
            index += 3
        else:
            kept.append(part)
            index += 1
    return ".".join(kept)


_KEYWORDS = r"password|passwd|pwd|secret|token|api[_-]?key|authorization|signature|cookie"
_KEYWORD_IN_KEY = re.compile(rf"(?i)(?:{_KEYWORDS})(s(?![a-z]))?")
# A word of a key that makes it a count of the things it names: a count's own name, or
# a participle saying what befell them (``tokens_revoked``, ``old_secrets_forgotten``).
_COUNT_WORD = re.compile(r"count|total|num|number|n|[a-z]+(?:ed|en)")


def _names_a_count(key: str) -> bool:
    """Whether ``key`` names a count of secrets, not the secrets: its every keyword a
    plural and a word of it a count word (``_COUNT_WORD``). A plural alone
    (``passwords``, ``refresh_tokens``, ``api_keys``) may hold the values themselves,
    and a numeric password or PIN is a whole number."""
    keywords = list(_KEYWORD_IN_KEY.finditer(key))
    if not all(found.group(1) for found in keywords):
        return False
    return any(
        _COUNT_WORD.fullmatch(word) and not _KEYWORD_IN_KEY.search(word)
        for word in re.split(r"[_-]+", key.lower())
    )


def _valued(match: re.Match[str]) -> str:
    """A secret-sounding key's value as ``[redacted]``, but a count under a key naming
    one (``_names_a_count``: ``"old_secrets_forgotten":1``, the webhook retention job's
    summary): an unquoted whole number."""
    key, value = match.group(2), match.group(3)
    if value.isascii() and value.isdigit() and _names_a_count(key):
        return match.group(0)
    return f"{match.group(1)}[redacted]"


# key: value and key=value, quoted or not, for secret-sounding keys. The key is a whole
# run of word characters and dashes, read once from its start (the lookahead finds the
# keyword in it, the possessive run never gives a character back): a key that could
# begin at any word boundary of the run, and end anywhere in it, cost time quadratic in
# the run's length, and a request's path is such a run whoever sends it
# ("token-token-...": half a minute for the 4 KB gunicorn reads). A key in the plural is
# hidden too ("tokens=abc", "passwords: ['a', 'b']"): left readable, it let a short
# secret through; only a count under a key naming one stays (``_valued``). The value is
# a quoted string to its closing quote (escaped quotes in it, or the line's end when it
# is never closed), a list or an object to the bracket closing it (``_bracketed_end``),
# or a bare word: a list's first item, or what followed an escaped quote, was left
# readable.
_KEYED = re.compile(
    rf"(?i)((?<![\w-])(?=[\w-]*?(?:{_KEYWORDS}))([\w-]*+)[\"']?\s*+[:=]\s*)"
    r"(\"(?:[^\"\\]|\\.)*+\"?|'(?:[^'\\]|\\.)*+'?|[\[{]|[^\s,;&\"'}\])]+)"
)
_CLOSING = {"[": "]", "{": "}"}
_QUOTED = {quote: re.compile(rf"{quote}(?:[^{quote}\\]|\\.)*+{quote}?") for quote in "\"'"}
_BRACKET_OR_QUOTE = re.compile(r"[\[\]{}\"']")


def _bracketed_end(text: str, start: int) -> int:
    """Where the list or object opening at ``start`` ends: after the bracket closing it,
    the brackets nested in it and those inside its quoted strings counted right (or the
    text's end when it is never closed). Read to the first closing bracket, one nested
    (``{"secrets": {"old": "a"}, "new": "b"}``) or quoted (``["a]", "b"]``) left what
    followed it readable. Each character is read once."""
    expected: list[str] = []
    found = _BRACKET_OR_QUOTE.search(text, start)
    while found is not None:
        char, index = found.group(), found.start()
        quoted = _QUOTED[char].match(text, index) if char in _QUOTED else None
        if quoted is not None:  # to its closing quote: a bracket in it is text
            index = quoted.end() - 1
        elif char in _CLOSING:
            expected.append(_CLOSING[char])
        elif expected and char == expected[-1]:
            expected.pop()
            if not expected:
                return index + 1
        found = _BRACKET_OR_QUOTE.search(text, index + 1)
    return len(text)


_LINE_END = re.compile(r"[\r\n]")


def _cookie_header_end(text: str, match: re.Match[str], redacted: str) -> int | None:
    """Where a cookie header's bare value ends: at its line's end, not at the first
    ";". A ``Cookie:`` header is ``a=1; session=...``: read as a bare word, only its
    first cookie was hidden, and the session after it written as it was. None for any
    other value (quoted ones already run to their closing quote)."""
    value = match.group(3)
    if "cookie" not in match.group(2).lower() or value[0] in "\"'" or redacted == match.group(0):
        return None
    found = _LINE_END.search(text, match.end())
    return found.start() if found is not None else len(text)


def _keyed_values(text: str) -> str:
    """``text`` with each secret-sounding key's value redacted (``_KEYED``, ``_valued``).
    Each character is read once: the search goes on after the value it redacted."""
    kept: list[str] = []
    position = 0
    while (match := _KEYED.search(text, position)) is not None:
        end = match.end()
        redacted = _valued(match)
        if match.group(3) in _CLOSING:
            end = _bracketed_end(text, match.start(3))
        elif (cookies_end := _cookie_header_end(text, match, redacted)) is not None:
            end = cookies_end
        kept += [text[position : match.start()], redacted]
        position = end
    return "".join(kept) + text[position:]


def _replacing(pattern: re.Pattern[str], replacement: Any) -> Callable[[str], str]:
    return functools.partial(pattern.sub, replacement)


_REDACTIONS: list[Callable[[str], str]] = [
    # JSON Web Tokens (``_jwts``): each run of base64url and dots holding "eyJ", read
    # from its start only (the lookahead finds "eyJ" in it; the possessive run never
    # gives a character back).
    _replacing(
        re.compile(r"(?<![A-Za-z0-9_.-])(?=[A-Za-z0-9_.-]*?eyJ)[A-Za-z0-9_.-]++"),
        lambda match: _jwts(match.group(0)),
    ),
    # Authorization header values.
    _replacing(re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 [redacted]"),
    _keyed_values,
    # werkzeug password hashes: a method and at most four parameters (``scrypt:32768:8:1``),
    # so that a run of methods never ending in "$" ("pbkdf2:pbkdf2:...") is not read to
    # its end again from each of them.
    _replacing(
        re.compile(r"\b(?:pbkdf2|scrypt)(?::\w++){0,4}+\$[^\s$]+\$[0-9a-fA-F]+"),
        "[password hash]",
    ),
    # Webhook signatures (X-Courier-Signature: t=...,v1=<hex>).
    _replacing(re.compile(r"\bv1=[0-9a-fA-F]{16,}"), "v1=[redacted]"),
]
# Random-looking strings (generated secrets): 32+ characters of base64url mixing upper
# and lower case and digits. Hex digests and UUIDs (lower case only) stay readable.
_RANDOM = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{32,}(?![A-Za-z0-9_-])")


def _mixed(match: re.Match[str]) -> str:
    text = match.group(0)
    if any(c.isupper() for c in text) and any(c.islower() for c in text):
        if any(c.isdigit() for c in text):
            return "[redacted]"
    return text


# What each of ``_REDACTIONS`` needs in an ASCII text before it can change it: its
# case-insensitive words and its case-sensitive literals, in lower case. In ASCII,
# ``str.lower`` compares as ``(?i)`` does; outside it, ``(?i)`` also reads "ſ" as "s"
# and "K" (Kelvin) as "k", so such a text is always read by every pattern.
_WORDS_REDACTED_NEAR = ("eyj", "bearer", "basic", "pwd", "passw", "secret", "token", "apikey")
_WORDS_REDACTED_NEAR += ("api_key", "api-key", "authorization", "signature", "cookie", "pbkdf2")
_WORDS_REDACTED_NEAR += ("scrypt", "v1=")


def _none_of_the_redactions_matches(text: str) -> bool:
    """Whether no pattern of ``_REDACTIONS`` can match ``text``: an access line's
    message (``POST /api/v1/sync/push 200 4.2 ms``), new with every request, was read
    by each of them in turn: skipping them spares a one-scan push about 74,000 of its
    6.4 million instructions (``docs/BENCHMARKS.md``, stop 51)."""
    if not text.isascii():
        return False
    lowered = text.lower()
    for word in _WORDS_REDACTED_NEAR:  # a loop, not ``any``: no generator to run
        if word in lowered:
            return False
    return True


def redact(text: str) -> str:
    """``text`` without what must never be written to a log."""
    if not _none_of_the_redactions_matches(text):
        for redaction in _REDACTIONS:
            text = redaction(text)
    text = _RANDOM.sub(_mixed, text)
    return mask_phones_in(text)


class Redactor(logging.Filter):
    """Rewrites a record's message, exception and stack text with ``redact``."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what there is
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for name in ("path", "client"):
            value = getattr(record, name, None)
            if isinstance(value, str):
                setattr(record, name, _redacted_field(value))
        return True


def _redacted_field(value: str) -> str:
    """``redact(value)``, remembered for short values: the access line's path and
    client are the same few strings request after request (``/api/v1/sync/push``,
    a proxy's address), and redacting each took some 20 us of a push's processor
    time. A long one (anyone's path) is redacted each time, never kept."""
    if len(value) > _REMEMBERED_LENGTH:
        return redact(value)
    return _remembered_redaction(value)


_REMEMBERED_LENGTH = 200


@functools.lru_cache(maxsize=512)
def _remembered_redaction(value: str) -> str:
    return redact(value)


# -- formats ----------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    # ``json.dumps`` with these options makes an encoder for each line; one is kept.
    _ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "timestamp": dt.datetime.fromtimestamp(record.created, dt.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                document[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            document["exc_info"] = record.exc_text
        if record.stack_info:
            document["stack_info"] = record.stack_info
        return self._ENCODER.encode(document)


# What a line of the text format never holds as written: C0 and C1 control characters
# (a newline in anyone's request path began a record the service never made; ESC drives
# the terminal showing the log) and the Unicode line and paragraph separators. Each is
# shown escaped, as Python writes it in a string: ``\n``, ``\x1b``, ``\u2028``.
_ESCAPED = {
    code: repr(chr(code))[1:-1]
    for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
    if code != ord("\t")
}
_INDENT = "    "


def one_line(text: str) -> str:
    """``text`` on one line, its control characters shown escaped (``_ESCAPED``)."""
    return text.translate(_ESCAPED)


class TextFormatter(logging.Formatter):
    """``2026-11-30 03:09:28,123 INFO name [request id]: message`` for people.

    One record's first line is its only one beginning with a time: the message is
    written on one line (``one_line``), and each line of a traceback or stack after it
    is indented, so that nothing a caller sent (a path, a receiver's answer quoted in an
    exception) reads as a record of its own."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(request)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.request = f" [{request_id}]" if request_id else ""
        record.message = one_line(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for more in (record.exc_text, record.stack_info):
            if more:
                lines = more.splitlines() or [""]
                text += "".join(f"\n{_INDENT}{one_line(line)}" for line in lines)
        return text


class _StandardError(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (as ``logging.lastResort``)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, _value: IO[str]) -> None:
        pass


def make_handler(log_format: str, stream: IO[str] | None = None) -> logging.Handler:
    """A handler writing ``log_format`` (json or text), with the request context and
    the redaction applied to every record it writes."""
    handler: logging.Handler = (
        _StandardError() if stream is None else logging.StreamHandler(stream)
    )
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestContext())
    handler.addFilter(Redactor())
    setattr(handler, _HANDLER_MARK, True)
    return handler


def configure_logging(
    level: str, log_format: str = "json", *, stream: IO[str] | None = None, force: bool = False
) -> None:
    """Put this service's handler on the root logger (replacing an earlier one of ours).

    Leaves a logging set up by someone else alone (pytest's, an embedding program's),
    like ``logging.basicConfig``, unless ``force``.
    """
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]
    if not force and len(ours) < len(root.handlers):
        return
    for handler in ours:
        root.removeHandler(handler)
    root.addHandler(make_handler(log_format, stream))
    root.setLevel(level)
    # Alembic announces each of its plugins at INFO; that is noise for operators.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


# -- gunicorn ---------------------------------------------------------------------------------


def gunicorn_logger_class() -> type:
    """gunicorn's logger, writing through the root logger (so in this service's format,
    redacted) instead of handlers of its own. Its access log is not used: the app logs
    one access line per request with more in it."""
    from gunicorn import glogging

    class GunicornLogger(glogging.Logger):  # type: ignore[misc]
        def setup(self, cfg: Any) -> None:
            super().setup(cfg)
            for logger in (self.error_log, self.access_log):
                for handler in list(logger.handlers):
                    logger.removeHandler(handler)
                logger.propagate = True

    return GunicornLogger
