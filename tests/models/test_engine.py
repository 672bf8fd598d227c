"""Engine settings the service relies on, per backend."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import Engine, text

from models.engine import make_engine


def test_postgresql_sessions_run_in_utc_whatever_else_is_asked(engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("a PostgreSQL session setting")
    url = engine.url.update_query_dict(
        {"options": "-c search_path=pg_catalog,public -c TimeZone=Asia/Shanghai"}
    )
    own = make_engine(
        url.render_as_string(hide_password=False), connect_args={"application_name": "courier-x"}
    )
    try:
        with own.connect() as connection:
            zone, name, path, moment = connection.execute(
                text(
                    "SELECT current_setting('TimeZone'), current_setting('application_name'), "
                    "current_setting('search_path'), "
                    "CAST('2026-11-30 18:00:00+08:00' AS timestamptz)"
                )
            ).one()
    finally:
        own.dispose()
    # What else the URL and connect_args ask for is kept.
    assert (zone, name, path) == ("UTC", "courier-x", "pg_catalog,public")
    # psycopg hands the value over in the zone it knows without a look-up: UTC itself.
    assert moment.tzinfo is dt.UTC
    assert moment == dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)
