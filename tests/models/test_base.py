"""The column types every model shares."""

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.types import TypeDecorator

from models import UTCDateTime
from models import base as base_module

SQLITE = sqlite.dialect()
offsets = st.builds(
    dt.timezone,
    st.timedeltas(
        min_value=dt.timedelta(hours=-23, minutes=-59), max_value=dt.timedelta(hours=23)
    ),
)
aware = st.datetimes(
    min_value=dt.datetime(2, 1, 1), max_value=dt.datetime(9998, 12, 31), timezones=offsets
)


def two_steps(dialect: sa.Dialect) -> object:
    """The bind processor SQLAlchemy composes: ``process_bind_param``, then the
    dialect's own ``DATETIME`` processor."""
    return TypeDecorator.bind_processor(UTCDateTime().dialect_impl(dialect), dialect)


@settings(deadline=None)  # a loaded CI machine: the check, not its speed
@given(aware)
def test_sqlite_binds_in_one_step_the_text_of_the_two_steps(value: dt.datetime) -> None:
    one_step = UTCDateTime().dialect_impl(SQLITE).bind_processor(SQLITE)
    assert one_step(value) == two_steps(SQLITE)(value)  # type: ignore[operator]


def test_sqlite_binds_without_the_per_value_hook_and_refuses_naive_times(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A one-scan push binds some 18 times: the hook and SQLAlchemy's format after it
    cost about three times the one step."""

    def refused(*_: object) -> object:
        raise AssertionError("process_bind_param called on SQLite")

    monkeypatch.setattr(UTCDateTime, "process_bind_param", refused)
    bind = UTCDateTime().dialect_impl(SQLITE).bind_processor(SQLITE)
    assert bind(None) is None
    kolkata = dt.timezone(dt.timedelta(hours=5, minutes=30))
    at = dt.datetime(2026, 12, 5, 11, 10, 1, 560667, tzinfo=kolkata)
    assert bind(at) == "2026-12-05 05:40:01.560667"
    with pytest.raises(ValueError, match="naive datetime"):
        bind(dt.datetime(2026, 12, 5, 5, 40))


def test_other_dialects_keep_the_hook() -> None:
    dialect = postgresql.dialect()
    at = dt.datetime(2026, 12, 5, 13, 40, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    bind = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    stored = bind(at) if bind is not None else at
    assert stored == at and stored.utcoffset() == dt.timedelta(0)


def test_a_time_written_and_read_on_sqlite_is_the_same_instant() -> None:
    table = sa.Table("t", sa.MetaData(), sa.Column("at", UTCDateTime()))
    engine = sa.create_engine("sqlite://")
    at = dt.datetime(2026, 12, 5, 13, 40, 1, 7, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    with engine.begin() as connection:
        table.create(connection)
        connection.execute(table.insert(), {"at": at})
        assert connection.scalar(sa.text("SELECT at FROM t")) == "2026-12-05 05:40:01.000007"
        assert connection.scalar(sa.select(table.c.at)) == at
    engine.dispose()


def test_sqlite_keeps_the_text_of_a_recent_utc_time_and_no_other_zones() -> None:
    """A push binds the same few UTC times again and again: their text is made once.
    A time in another zone is converted each time: in one zone, a repeated hour's two
    instants (``fold``) compare equal, and must not share a text."""
    bind = UTCDateTime().dialect_impl(SQLITE).bind_processor(SQLITE)
    assert bind is not None
    at = dt.datetime(2026, 12, 5, 5, 40, 1, 560667, tzinfo=dt.UTC)
    first = bind(at)
    assert first == "2026-12-05 05:40:01.560667"
    assert bind(at + dt.timedelta()) is first  # an equal time: the text kept
    new_york = ZoneInfo("America/New_York")
    earlier = dt.datetime(2026, 11, 1, 1, 30, tzinfo=new_york)  # EDT, then EST again
    later = earlier.replace(fold=1)
    assert earlier == later  # one zone: compared by the wall clock
    assert bind(earlier) == "2026-11-01 05:30:00.000000"
    assert bind(later) == "2026-11-01 06:30:00.000000"
    for minute in range(500):  # the kept texts stay few
        bind(at + dt.timedelta(minutes=minute))
    assert bind(at + dt.timedelta(minutes=499)) == "2026-12-05 13:59:01.560667"
    assert len(base_module._UTC_TEXTS) <= base_module._UTC_TEXTS_KEPT
