"""Configuration from environment variables (the table in README.md lists them)."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import phonenumbers
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from models import ServiceClass
from sync.accounts import check_password_hash_method
from sync.rules import Policy
from sync.shifts import ShiftRules
from sync.sign_in_limits import Limit, SignInLimits
from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy

log = logging.getLogger(__name__)

ENVIRONMENTS = ("development", "production", "testing")
MIN_JWT_SECRET_BYTES = 32
_QUANTIFIER = re.compile(r"\{\d*,\d*\}")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("json", "text")
MIN_METRICS_TOKEN_BYTES = 32
# The databases the service runs on (migrations, engine settings, tests), and their driver.
DATABASE_DRIVERS = {"sqlite": "pysqlite", "postgresql": "psycopg"}
_SUGGESTED_URLS = {
    "sqlite": "sqlite:////var/lib/courier/courier.db",
    "postgresql": "postgresql+psycopg://user@host:5432/name (psycopg 3)",
}
_EXAMPLE_URLS = " or ".join(_SUGGESTED_URLS.values())
_SCHEME = re.compile(r"[\w+.\-]*:?//")


class ConfigError(RuntimeError):
    """The service cannot start with this configuration; the message says why."""


def load_config(environ: Mapping[str, str], instance_path: Path) -> dict[str, Any]:
    """Build the Flask config from ``environ``; fail early and clearly on bad values."""
    env = environ.get("APP_ENV", "development")
    if env not in ENVIRONMENTS:
        raise ConfigError(f"APP_ENV must be one of {', '.join(ENVIRONMENTS)}, got {env!r}")
    return {
        "APP_ENV": env,
        "DATABASE_URL": environ.get("DATABASE_URL") or f"sqlite:///{instance_path / 'courier.db'}",
        # PostgreSQL: a web request's statement cancelled past this (503), its answer
        # awaited 5 s longer at most (a hung server); 0: none (models.engine).
        "DATABASE_STATEMENT_TIMEOUT_SECONDS": _int(
            environ, "DATABASE_STATEMENT_TIMEOUT_SECONDS", 30, minimum=0, maximum=3600
        ),
        "JWT_SECRET": environ.get("JWT_SECRET", ""),
        # Signs the web pages' session cookie; empty: derived from JWT_SECRET.
        "SECRET_KEY": environ.get("SECRET_KEY", ""),
        "JWT_ACCESS_TTL_SECONDS": _int(environ, "JWT_ACCESS_TTL_SECONDS", 3600),
        "JWT_REFRESH_TTL_SECONDS": _int(environ, "JWT_REFRESH_TTL_SECONDS", 14 * 24 * 3600),
        # How long after its use a refresh token may be sent again (a PDA that lost the
        # answer) without counting as a reuse (sync.refresh_tokens); 0: never.
        "REFRESH_REUSE_GRACE_SECONDS": _int(
            environ, "REFRESH_REUSE_GRACE_SECONDS", 60, minimum=0, maximum=600
        ),
        "BLOB_DIR": environ.get("BLOB_DIR") or str(instance_path / "blobs"),
        "MAX_CONTENT_LENGTH": _int(environ, "MAX_REQUEST_BYTES", 16 * 1024 * 1024),
        "MAX_EVENTS_PER_PUSH": _int(environ, "MAX_EVENTS_PER_PUSH", 5000),
        "MAX_PARCELS_PER_INTAKE": _int(environ, "MAX_PARCELS_PER_INTAKE", 5000),
        "MAX_BLOB_BYTES": _int(environ, "MAX_BLOB_BYTES", 8 * 1024 * 1024),
        "CLOCK_SKEW_FLAG_SECONDS": _int(environ, "CLOCK_SKEW_FLAG_SECONDS", 120),
        "MAX_EVENT_AGE_DAYS": _int(environ, "MAX_EVENT_AGE_DAYS", 30),
        # Small on purpose: a clock step, not a backdated consent (sync.inversions).
        "TIME_INVERSION_TOLERANCE_SECONDS": _int(
            environ, "TIME_INVERSION_TOLERANCE_SECONDS", 2, minimum=0, maximum=60
        ),
        # Service classes, whitespace-separated.
        "CONSENT_REQUIRED_CLASSES": _classes(environ, "CONSENT_REQUIRED_CLASSES", "express"),
        "SIGNATURE_REQUIRED_CLASSES": _classes(environ, "SIGNATURE_REQUIRED_CLASSES", "express"),
        "FAR_FROM_ADDRESS_METRES": _int(environ, "FAR_FROM_ADDRESS_METRES", 300),
        "CONSENT_RECORDING_GRACE_MINUTES": _int(environ, "CONSENT_RECORDING_GRACE_MINUTES", 60),
        # Whitespace-separated: a tracking number never contains spaces once normalized,
        # while commas are common in regular expressions (\d{10,20}).
        "DOMESTIC_TRACKING_PATTERNS": tuple(environ["DOMESTIC_TRACKING_PATTERNS"].split())
        if "DOMESTIC_TRACKING_PATTERNS" in environ
        else DEFAULT_DOMESTIC_PATTERNS,
        "DEFAULT_PHONE_REGION": environ.get("DEFAULT_PHONE_REGION", "CN").upper() or None,
        "PASSWORD_HASH_METHOD": environ.get("PASSWORD_HASH_METHOD", "scrypt"),
        # Shifts, sweeps and reports (issue 5).
        "SHIFT_PLANNED_HOURS": _int(environ, "SHIFT_PLANNED_HOURS", 10, maximum=24),
        "SHIFT_CLOSE_GRACE_MINUTES": _int(environ, "SHIFT_CLOSE_GRACE_MINUTES", 30),
        "STALE_DEVICE_MINUTES": _int(environ, "STALE_DEVICE_MINUTES", 45),
        "BLOB_MISSING_GRACE_MINUTES": _int(environ, "BLOB_MISSING_GRACE_MINUTES", 60),
        "PROOF_RETENTION_DAYS": _int(environ, "PROOF_RETENTION_DAYS", 365, maximum=36500),
        "DELIVERY_DEADLINE_HOURS": _deadlines(
            environ, "DELIVERY_DEADLINE_HOURS", "express=24 registered=48 parcel=72 ordinary=96"
        ),
        "SCHEDULER_LEASE_SECONDS": _int(environ, "SCHEDULER_LEASE_SECONDS", 60),
        "SCHEDULER_IN_WEB": _flag(environ, "SCHEDULER_IN_WEB", False),
        # Consent requests, long pulls and webhooks (issue 6).
        "CONSENT_REQUEST_TTL_MINUTES": _int(
            environ, "CONSENT_REQUEST_TTL_MINUTES", 30, maximum=24 * 60
        ),
        "MAX_PULL_WAIT_SECONDS": _int(environ, "MAX_PULL_WAIT_SECONDS", 25, maximum=300),
        "MAX_PULL_WAITERS": _int(environ, "MAX_PULL_WAITERS", 4),
        # With the backoff below, 20 attempts span 5 to 10 hours: a receiver down for
        # a deploy or an outage of an hour or two still gets every message.
        "WEBHOOK_MAX_ATTEMPTS": _int(environ, "WEBHOOK_MAX_ATTEMPTS", 20),
        "WEBHOOK_BACKOFF_SECONDS": _int(environ, "WEBHOOK_BACKOFF_SECONDS", 5),
        "WEBHOOK_BACKOFF_MAX_SECONDS": _int(environ, "WEBHOOK_BACKOFF_MAX_SECONDS", 3600),
        "WEBHOOK_TIMEOUT_SECONDS": _int(environ, "WEBHOOK_TIMEOUT_SECONDS", 10),
        "WEBHOOK_MAX_RESPONSE_BYTES": _int(environ, "WEBHOOK_MAX_RESPONSE_BYTES", 65536),
        "WEBHOOK_DISABLE_AFTER_FAILURES": _int(environ, "WEBHOOK_DISABLE_AFTER_FAILURES", 20),
        # And the first of those failures this long ago: a receiver's deploy or outage of
        # an hour or two is waited for, however many messages fail meanwhile.
        "WEBHOOK_DISABLE_AFTER_SECONDS": _int(
            environ, "WEBHOOK_DISABLE_AFTER_SECONDS", 4 * 3600, minimum=0
        ),
        "WEBHOOK_POLL_SECONDS": _int(environ, "WEBHOOK_POLL_SECONDS", 1),
        "WEBHOOK_RETENTION_DAYS": _int(environ, "WEBHOOK_RETENTION_DAYS", 30, maximum=36500),
        "LOG_LEVEL": environ.get("LOG_LEVEL", "INFO").upper(),
        # Abuse and operations (issue 8).
        "LOG_FORMAT": environ.get("LOG_FORMAT", "json").strip().lower() or "json",
        "SIGN_IN_FAILURES_PER_USERNAME": _limit(
            environ, "SIGN_IN_FAILURES_PER_USERNAME", "10/900"
        ),
        "SIGN_IN_ATTEMPTS_PER_ADDRESS": _limit(environ, "SIGN_IN_ATTEMPTS_PER_ADDRESS", "300/60"),
        "SIGN_IN_FAILURES_PER_ADDRESS": _limit(environ, "SIGN_IN_FAILURES_PER_ADDRESS", "100/900"),
        # Consent requests sent to one parcel's recipient (each a message to their phone).
        "CONSENT_REQUESTS_PER_PARCEL": _limit(environ, "CONSENT_REQUESTS_PER_PARCEL", "4/3600"),
        # Walks of the whole audit log (GET /audit/verify without a head) per user.
        "AUDIT_FULL_VERIFICATIONS_PER_USER": _limit(
            environ, "AUDIT_FULL_VERIFICATIONS_PER_USER", "4/3600"
        ),
        # Ids of other stations' PDAs a manager's registrations met (POST /devices: each
        # a 409 that tells them another station has it), per manager.
        "DEVICE_IDS_TAKEN_PER_MANAGER": _limit(
            environ, "DEVICE_IDS_TAKEN_PER_MANAGER", "10/86400"
        ),
        # Entries each user's GET /audit/verify read, from a head or not (each check
        # charged in thousands, rounded up): as many as the four walks above may read.
        "AUDIT_VERIFY_ENTRIES_PER_USER": _limit(
            environ, "AUDIT_VERIFY_ENTRIES_PER_USER", "400000/3600"
        ),
        # Entries one GET /audit/verify reads at most (some 5 seconds per 100,000).
        "AUDIT_VERIFY_MAX_ENTRIES": _int(environ, "AUDIT_VERIFY_MAX_ENTRIES", 100_000),
        "TRUSTED_PROXY_HOPS": _int(environ, "TRUSTED_PROXY_HOPS", 0, minimum=0, maximum=10),
        "METRICS_TOKEN": environ.get("METRICS_TOKEN", ""),
    }


def validate_config(config: Mapping[str, Any]) -> None:
    """Check the values that parse but would fail later, on the first request that uses them."""
    _check_database_url(str(config["DATABASE_URL"]))
    patterns = config["DOMESTIC_TRACKING_PATTERNS"]
    try:
        TrackingNumberPolicy.from_patterns(patterns)
    except ValueError as exc:
        raise ConfigError(f"DOMESTIC_TRACKING_PATTERNS: {exc}") from None
    for pattern in patterns:
        if "," in _QUANTIFIER.sub("", pattern):
            raise ConfigError(
                f"DOMESTIC_TRACKING_PATTERNS: {pattern!r} has a comma outside a {{m,n}} "
                "quantifier; separate patterns with spaces (tracking numbers have no commas)"
            )
    region = config["DEFAULT_PHONE_REGION"]
    if region is not None and region not in phonenumbers.SUPPORTED_REGIONS:
        raise ConfigError(
            "DEFAULT_PHONE_REGION must be a region code such as CN or GB (or empty), "
            f"got {region!r}"
        )
    if config["LOG_LEVEL"] not in LOG_LEVELS:
        raise ConfigError(
            f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {config['LOG_LEVEL']!r}"
        )
    if config["LOG_FORMAT"] not in LOG_FORMATS:
        raise ConfigError(
            f"LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, got {config['LOG_FORMAT']!r}"
        )
    token = config["METRICS_TOKEN"]
    if token and (len(token.encode()) < MIN_METRICS_TOKEN_BYTES or token != token.strip()):
        raise ConfigError(
            f"METRICS_TOKEN must have at least {MIN_METRICS_TOKEN_BYTES} bytes and no "
            "surrounding spaces (or be empty: only admins' tokens may read /metrics)"
        )
    try:
        check_password_hash_method(config["PASSWORD_HASH_METHOD"])
    except ValueError as exc:
        raise ConfigError(
            f"PASSWORD_HASH_METHOD {config['PASSWORD_HASH_METHOD']!r}: {exc}"
        ) from None


def _check_database_url(url: str) -> None:
    """A URL SQLAlchemy parses may still name a dialect or a driver that cannot load
    (``postgres://``, ``postgresql+psycopg2://``): found on the first connection, in a
    traceback. The service runs on SQLite and on PostgreSQL through psycopg 3."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        several_hosts = _hosts_in_query(url)
        if several_hosts is not None:
            raise ConfigError(
                "DATABASE_URL: several hosts with their ports are written in the query; write "
                f"the URL as {masked_url(several_hosts)}, got {masked_url(url)!r}"
            ) from None
        raise ConfigError(
            f"DATABASE_URL must be a database URL such as {_EXAMPLE_URLS}, got {masked_url(url)!r}"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "postgres":
        raise ConfigError(
            "DATABASE_URL: SQLAlchemy has no 'postgres' dialect; write the URL as "
            f"{_url_to_write(parsed, 'postgresql')}, got {masked_url(url)!r}"
        )
    if backend not in DATABASE_DRIVERS:
        raise ConfigError(
            f"DATABASE_URL: {parsed.drivername!r} is not a database the service runs on; "
            f"use {_EXAMPLE_URLS}, got {masked_url(url)!r}"
        )
    driver = parsed.get_driver_name()  # the dialect's default when the URL names none
    if driver != DATABASE_DRIVERS[backend]:
        psycopg = " (psycopg 3)" if backend == "postgresql" else ""
        raise ConfigError(
            f"DATABASE_URL: the driver {driver!r} is not one the service installs or runs "
            f"on; write the URL as {_url_to_write(parsed, backend)}{psycopg}, "
            f"got {masked_url(url)!r}"
        )


def _hosts_in_query(url: str) -> str | None:
    """``url`` with its comma-separated hosts (``@h1:5432,h2:5433/db``) moved to the
    query as SQLAlchemy reads them (``@/db?host=h1:5432&host=h2:5433``, handed to
    psycopg as libpq's ``host=h1,h2 port=5432,5433``); None when it names one host.

    SQLAlchemy's parser takes everything after the first host's colon for the port
    and fails on ``int()``. The hosts follow the last ``@``, as for ``masked_url``."""
    scheme = _SCHEME.match(url)
    if scheme is None:
        return None
    start = max(url.rfind("@") + 1, scheme.end())
    end = min(
        (i for i in (url.find("/", start), url.find("?", start)) if i >= 0), default=len(url)
    )
    hosts = url[start:end].split(",")
    if len(hosts) < 2 or not all(hosts):
        return None
    path, _, query = url[end:].partition("?")
    host_query = "&".join(f"host={host}" for host in hosts)
    return f"{url[:start]}{path or '/'}?{query + '&' if query else ''}{host_query}"


def _url_to_write(parsed: URL, backend: str) -> str:
    """The URL given, on ``backend`` through the driver the service runs it with (named
    for PostgreSQL, whose default driver SQLAlchemy has changed between versions), its
    password masked: what the operator is to write."""
    drivername = "sqlite" if backend == "sqlite" else f"{backend}+{DATABASE_DRIVERS[backend]}"
    return masked_url(parsed.set(drivername=drivername).render_as_string(hide_password=False))


def masked_url(url: str) -> str:
    """``url`` as it can be shown or logged: its password replaced by stars.

    The password is everything between ``//user:`` and the last ``@`` (a password
    may hold ``/``, ``:`` and ``@``, escaped or not); with no ``//`` (a mistyped
    scheme), between the first ``:`` and the last ``@``. An ``@`` after the host (in
    the query) makes more than the password hidden, never less.
    """
    at = url.rfind("@")
    if at < 0:
        return url
    scheme = _SCHEME.match(url)
    start = scheme.end() if scheme is not None and scheme.end() <= at else 0
    colon = url.find(":", start, at)
    if colon < 0:  # a user without a password
        return url
    return f"{url[: colon + 1]}***{url[at:]}"


def ensure_jwt_secret(config: dict[str, Any], instance_path: Path) -> None:
    """Production needs ``JWT_SECRET``; development keeps a generated one under ``instance/``."""
    secret = config["JWT_SECRET"]
    if secret:
        if config["APP_ENV"] == "production" and len(secret.encode()) < MIN_JWT_SECRET_BYTES:
            raise ConfigError(f"JWT_SECRET must have at least {MIN_JWT_SECRET_BYTES} bytes")
        return
    if config["APP_ENV"] == "production":
        raise ConfigError("JWT_SECRET is required when APP_ENV=production")
    config["JWT_SECRET"] = _development_secret(instance_path / "jwt-secret")


def ensure_secret_key(config: dict[str, Any]) -> None:
    """The key that signs the pages' session cookies (Flask's ``SECRET_KEY``).

    Unset, it is derived from ``JWT_SECRET`` (call after ``ensure_jwt_secret``) with
    HMAC under a label of its own, so no new variable is required and a session
    cookie's key never equals the tokens' key. Rotating ``JWT_SECRET`` ends every
    page session too.
    """
    key = config.get("SECRET_KEY") or ""
    if key:
        if config["APP_ENV"] == "production" and len(key.encode()) < MIN_JWT_SECRET_BYTES:
            raise ConfigError(f"SECRET_KEY must have at least {MIN_JWT_SECRET_BYTES} bytes")
        return
    config["SECRET_KEY"] = hmac.new(
        config["JWT_SECRET"].encode(), b"courier-api web session cookie", hashlib.sha256
    ).hexdigest()


def _development_secret(path: Path) -> str:
    """Read the development secret, creating it once (safe when workers race)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(48))
    log.warning("JWT_SECRET is not set: created a development secret in %s", path)
    return path.read_text().strip()


def _classes(environ: Mapping[str, str], name: str, default: str) -> frozenset[ServiceClass]:
    raw = environ.get(name, default)
    try:
        return frozenset(ServiceClass(word) for word in raw.split())
    except ValueError:
        choices = ", ".join(c.value for c in ServiceClass)
        raise ConfigError(
            f"{name} lists service classes separated by spaces ({choices}), got {raw!r}"
        ) from None


def _deadlines(environ: Mapping[str, str], name: str, default: str) -> dict[ServiceClass, int]:
    """``express=24 parcel=72 ...``: hours from intake to delivery, per service class.

    Every class needs one: the on-time rate is measured against it.
    """
    raw = environ.get(name) or default
    hours: dict[ServiceClass, int] = {}
    for item in raw.split():
        key, _, value = item.partition("=")
        try:
            service_class = ServiceClass(key)
            hours[service_class] = int(value)
        except ValueError:
            raise ConfigError(
                f"{name} lists class=hours pairs separated by spaces "
                f"(e.g. {default!r}), got {raw!r}"
            ) from None
        if hours[service_class] <= 0:
            raise ConfigError(f"{name}: hours must be positive, got {item!r}")
    missing = [c.value for c in ServiceClass if c not in hours]
    if missing:
        raise ConfigError(f"{name} gives no deadline for {', '.join(missing)}")
    return hours


def _flag(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _limit(environ: Mapping[str, str], name: str, default: str) -> Limit | None:
    try:
        return Limit.parse(environ.get(name) or default)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def sign_in_limits_of(config: Mapping[str, Any]) -> SignInLimits:
    return SignInLimits(
        failures_per_username=config["SIGN_IN_FAILURES_PER_USERNAME"],
        attempts_per_address=config["SIGN_IN_ATTEMPTS_PER_ADDRESS"],
        failures_per_address=config["SIGN_IN_FAILURES_PER_ADDRESS"],
    )


def shift_rules_of(config: Mapping[str, Any]) -> ShiftRules:
    return ShiftRules(planned_length=dt.timedelta(hours=config["SHIFT_PLANNED_HOURS"]))


def policy_of(config: Mapping[str, Any]) -> Policy:
    """The rules' policy (``sync.rules.Policy``) from the configuration."""
    return Policy(
        consent_required=config["CONSENT_REQUIRED_CLASSES"],
        signature_required=config["SIGNATURE_REQUIRED_CLASSES"],
        far_from_address_m=float(config["FAR_FROM_ADDRESS_METRES"]),
        consent_recording_grace=dt.timedelta(minutes=config["CONSENT_RECORDING_GRACE_MINUTES"]),
        clock_uncertainty=dt.timedelta(seconds=config["CLOCK_SKEW_FLAG_SECONDS"]),
    )


def inversion_tolerance_of(config: Mapping[str, Any]) -> dt.timedelta:
    """How far a later seq may be dated before the one before it and be no
    ``time_inversion`` (rule 6): a push's, a write-off's and a rejudge's."""
    return dt.timedelta(seconds=config["TIME_INVERSION_TOLERANCE_SECONDS"])


def _int(
    environ: Mapping[str, str],
    name: str,
    default: int,
    *,
    minimum: int = 1,
    maximum: int | None = None,
) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        least = "positive" if minimum == 1 else f"at least {minimum}"
        raise ConfigError(f"{name} must be {least}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, got {value}")
    return value
