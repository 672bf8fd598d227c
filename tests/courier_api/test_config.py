import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from courier_api.config import (
    ConfigError,
    ensure_jwt_secret,
    load_config,
    masked_url,
    policy_of,
    validate_config,
)
from models import ServiceClass


def test_defaults_put_the_database_and_blobs_under_instance(tmp_path: Path) -> None:
    config = load_config({}, tmp_path)
    assert config["DATABASE_URL"] == f"sqlite:///{tmp_path / 'courier.db'}"
    assert config["BLOB_DIR"] == str(tmp_path / "blobs")
    assert config["MAX_CONTENT_LENGTH"] == 16 * 1024 * 1024
    assert config["MAX_EVENTS_PER_PUSH"] == 5000
    assert config["REFRESH_REUSE_GRACE_SECONDS"] == 60
    assert (
        load_config({"REFRESH_REUSE_GRACE_SECONDS": "0"}, tmp_path)["REFRESH_REUSE_GRACE_SECONDS"]
        == 0
    )  # no grace: every second use is a reuse


def test_production_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    config = load_config({"APP_ENV": "production"}, tmp_path)
    with pytest.raises(ConfigError, match="JWT_SECRET is required"):
        ensure_jwt_secret(config, tmp_path)
    short = load_config({"APP_ENV": "production", "JWT_SECRET": "short"}, tmp_path)
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        ensure_jwt_secret(short, tmp_path)


def test_development_creates_a_secret_once_and_keeps_it(tmp_path: Path) -> None:
    first = load_config({}, tmp_path)
    ensure_jwt_secret(first, tmp_path)
    second = load_config({}, tmp_path)
    ensure_jwt_secret(second, tmp_path)
    assert first["JWT_SECRET"] == second["JWT_SECRET"]
    assert len(first["JWT_SECRET"]) >= 48


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"APP_ENV": "staging"}, "APP_ENV must be one of"),
        ({"JWT_ACCESS_TTL_SECONDS": "soon"}, "JWT_ACCESS_TTL_SECONDS must be an integer"),
        ({"MAX_REQUEST_BYTES": "-1"}, "MAX_REQUEST_BYTES must be positive"),
        ({"SHIFT_PLANNED_HOURS": "30"}, "SHIFT_PLANNED_HOURS must be at most 24"),
        ({"PROOF_RETENTION_DAYS": "99999999"}, "PROOF_RETENTION_DAYS must be at most 36500"),
        ({"SCHEDULER_IN_WEB": "maybe"}, "SCHEDULER_IN_WEB must be true or false"),
        ({"REFRESH_REUSE_GRACE_SECONDS": "-1"}, "REFRESH_REUSE_GRACE_SECONDS must be at least 0"),
        (
            {"REFRESH_REUSE_GRACE_SECONDS": "601"},
            "REFRESH_REUSE_GRACE_SECONDS must be at most 600",
        ),
        (
            {"TIME_INVERSION_TOLERANCE_SECONDS": "61"},
            "TIME_INVERSION_TOLERANCE_SECONDS must be at most 60",
        ),
        ({"DELIVERY_DEADLINE_HOURS": "express=24"}, "gives no deadline for parcel, registered"),
        ({"DELIVERY_DEADLINE_HOURS": "express=soon"}, "class=hours pairs"),
    ],
)
def test_bad_values_fail_early_and_say_which(tmp_path: Path, environ: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(environ, tmp_path)


def test_domestic_patterns_are_separated_by_whitespace(tmp_path: Path) -> None:
    """Commas belong to regular expressions: the README's default has two."""
    config = load_config(
        {"DOMESTIC_TRACKING_PATTERNS": r"[A-Z]{0,4}\d{10,20}  YT\d{13}"}, tmp_path
    )
    assert config["DOMESTIC_TRACKING_PATTERNS"] == (r"[A-Z]{0,4}\d{10,20}", r"YT\d{13}")
    validate_config(config)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"DOMESTIC_TRACKING_PATTERNS": "SF(\\d"}, "DOMESTIC_TRACKING_PATTERNS: invalid"),
        ({"DEFAULT_PHONE_REGION": "XX"}, "DEFAULT_PHONE_REGION must be a region code"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL must be one of"),
        ({"DOMESTIC_TRACKING_PATTERNS": r"SF\d{12},YT\d{13}"}, "comma outside"),
        ({"PASSWORD_HASH_METHOD": "md5"}, "PASSWORD_HASH_METHOD 'md5': not a usable"),
        ({"DATABASE_URL": "not-a-url"}, "DATABASE_URL must be a database URL.*'not-a-url'"),
        (  # a colon missing, the password not shown
            {"DATABASE_URL": "postgresql+psycopg//app:s3cret@db/courier"},
            r"DATABASE_URL must be a database URL.*'postgresql\+psycopg//app:\*\*\*@db/courier'",
        ),
        (  # SQLAlchemy 2 has no "postgres" dialect: the URL to write is the one given, fixed
            {"DATABASE_URL": "postgres://app:s3cret@db:6432/courier?sslmode=require"},
            r"DATABASE_URL: SQLAlchemy has no 'postgres' dialect; write the URL as "
            r"postgresql\+psycopg://app:\*\*\*@db:6432/courier\?sslmode=require, "
            r"got 'postgres://app:\*\*\*@db:6432/courier\?sslmode=require'",
        ),
        (  # psycopg2 is not installed: the service uses psycopg 3
            {"DATABASE_URL": "postgresql+psycopg2://app:s3cret@db/courier"},
            r"DATABASE_URL: the driver 'psycopg2' is not one the service installs or runs on; "
            r"write the URL as postgresql\+psycopg://app:\*\*\*@db/courier \(psycopg 3\), "
            r"got 'postgresql\+psycopg2://app:\*\*\*@db/courier'",
        ),
        (
            {"DATABASE_URL": "mysql://app:s3cret@db/courier"},
            r"DATABASE_URL: 'mysql' is not a database the service runs on; use sqlite:///.* "
            r"or postgresql\+psycopg://",
        ),
        ({"DATABASE_URL": "mongodb://db/courier"}, "DATABASE_URL: 'mongodb' is not a database"),
        (
            {"DATABASE_URL": "sqlite+aiosqlite:///courier.db"},
            r"the driver 'aiosqlite' is not .*; write the URL as sqlite:///courier.db, got",
        ),
        (  # SQLAlchemy's parser read "5432,h2:5433" as the port: a ValueError traceback
            {"DATABASE_URL": "postgresql+psycopg://app:s3cret@h1:5432,h2:5433/courier?a=b"},
            r"DATABASE_URL: several hosts with their ports are written in the query; write the "
            r"URL as postgresql\+psycopg://app:\*\*\*@/courier\?a=b&host=h1:5432&host=h2:5433, "
            r"got 'postgresql\+psycopg://app:\*\*\*@h1:5432,h2:5433/courier\?a=b'$",
        ),
        (  # a port that is not a number: a ValueError traceback too
            {"DATABASE_URL": "postgresql+psycopg://app:s3cret@db:54x2/courier"},
            r"DATABASE_URL must be a database URL such as .*, "
            r"got 'postgresql\+psycopg://app:\*\*\*@db:54x2/courier'$",
        ),
    ],
)
def test_values_that_would_fail_later_are_refused_at_start(
    tmp_path: Path, environ: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(load_config(environ, tmp_path))


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////var/lib/courier/courier.db",
        "sqlite+pysqlite:///courier.db",
        "sqlite://",
        "postgresql://app:s3cret@db:5432/courier",  # psycopg: SQLAlchemy 2.1's default
        "postgresql+psycopg://app@db/courier",
        "postgresql+psycopg://app@db1,db2/courier",  # several hosts on the default port
        "postgresql+psycopg://app@/courier?host=db1:5432&host=db2:5433",  # and with ports
    ],
)
def test_the_database_urls_the_service_runs_on_pass(tmp_path: Path, url: str) -> None:
    validate_config(load_config({"DATABASE_URL": url}, tmp_path))


def test_several_hosts_with_ports_reach_psycopg_as_libpq_lists() -> None:
    """The URL the refusal of ``@h1:5432,h2:5433`` names is one psycopg tries host after
    host on: libpq's ``host=h1,h2 port=5432,5433``."""
    url = make_url("postgresql+psycopg://app@/courier?host=db1:5432&host=db2:5433")
    _, kwargs = create_engine(url).dialect.create_connect_args(url)
    assert (kwargs["host"], kwargs["port"]) == ("db1,db2", "5432,5433")


@pytest.mark.parametrize(
    "password",
    ["s3cret", "p/ss", "p:ss", "p@ss", "a/b:c@d", "@:/", "p%40ss", "//x:y@z/w"],
)
def test_a_database_url_shown_never_shows_its_password(tmp_path: Path, password: str) -> None:
    """Everything between ``//user:`` and the last ``@`` is hidden, whatever the
    password holds; a URL SQLAlchemy cannot parse is shown so in the error."""
    for url in (
        f"postgresql+psycopg://app:{password}@db.example:5432/courier",
        f"postgresql+psycopg//app:{password}@db.example:5432/courier",  # a colon missing
        f"postgresql:app:{password}@db.example:5432/courier",  # no //
    ):
        shown = masked_url(url)
        assert password not in shown
        assert shown.endswith("***@db.example:5432/courier")
    with pytest.raises(ConfigError) as refused:
        validate_config(
            load_config(
                {"DATABASE_URL": f"postgresql+psycopg//app:{password}@db.example/courier"},
                tmp_path,
            )
        )
    assert password not in str(refused.value)
    assert "'postgresql+psycopg//app:***@db.example/courier'" in str(refused.value)


def test_a_database_url_without_a_password_is_shown_whole() -> None:
    assert masked_url("postgresql+psycopg://app@db/courier") == (
        "postgresql+psycopg://app@db/courier"
    )
    assert masked_url("sqlite:////var/lib/courier/courier.db") == (
        "sqlite:////var/lib/courier/courier.db"
    )


def test_empty_phone_region_means_numbers_need_a_plus(tmp_path: Path) -> None:
    config = load_config({"DEFAULT_PHONE_REGION": ""}, tmp_path)
    assert config["DEFAULT_PHONE_REGION"] is None
    validate_config(config)


@pytest.mark.parametrize(
    ("command", "environ", "message"),
    [
        (["db", "current"], {"DEFAULT_PHONE_REGION": "XX"}, "DEFAULT_PHONE_REGION"),
        (
            ["db", "upgrade"],
            {"DATABASE_URL": "postgres://app:s3cret@127.0.0.1/courier"},
            "DATABASE_URL: SQLAlchemy has no 'postgres' dialect",
        ),
        (
            ["serve", "--port", "0"],
            {"DATABASE_URL": "postgresql+psycopg2://app:s3cret@127.0.0.1/courier"},
            "DATABASE_URL: the driver 'psycopg2'",
        ),
    ],
)
def test_the_cli_reports_a_bad_value_in_one_line(
    tmp_path: Path, command: list[str], environ: dict[str, str], message: str
) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "INSTANCE_PATH": str(tmp_path), **environ}
    env.pop("JWT_SECRET", None)
    result = subprocess.run(
        [sys.executable, "-m", "courier_api", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"Error: configuration: {message}" in result.stderr
    assert "Traceback" not in result.stderr
    assert "s3cret" not in result.stderr


def test_the_rules_policy_comes_from_the_configuration(tmp_path: Path) -> None:
    config = load_config(
        {
            "CONSENT_REQUIRED_CLASSES": "express registered",
            "SIGNATURE_REQUIRED_CLASSES": "",
            "FAR_FROM_ADDRESS_METRES": "150",
            "CLOCK_SKEW_FLAG_SECONDS": "300",
        },
        tmp_path,
    )
    policy = policy_of(config)
    assert policy.consent_required == {ServiceClass.EXPRESS, ServiceClass.REGISTERED}
    assert policy.signature_required == frozenset()
    assert policy.far_from_address_m == 150.0
    # the bound that flags clock_skew is the one beyond which a drop's time is uncertain
    assert policy.clock_uncertainty == dt.timedelta(minutes=5)
    assert policy_of(load_config({}, tmp_path)).clock_uncertainty == dt.timedelta(minutes=2)
    with pytest.raises(ConfigError, match="CONSENT_REQUIRED_CLASSES"):
        load_config({"CONSENT_REQUIRED_CLASSES": "express,parcel"}, tmp_path)
