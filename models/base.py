"""Declarative base, naming convention and the column types every model shares."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Annotated, Any

from sqlalchemy import JSON, BigInteger, DateTime, Enum, Integer, MetaData, String, TypeDecorator
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, mapped_column

# Stable constraint names, so Alembic migrations name the same thing the same way
# on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC timestamp on every backend.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so values are
    stored as naive UTC and given back their UTC zone when read. Naive values
    are refused on the way in: a time without an offset is ambiguous.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        value = value.astimezone(dt.UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def bind_processor(self, dialect: Dialect) -> Any:
        """On SQLite, the text SQLAlchemy writes (``process_bind_param``, then its
        ``DATETIME``'s ``%``-format of seven fields) in one step: a one-scan push binds
        some 18 times, and the two steps cost about three times this one.
        ``tests/models/test_base.py`` holds it to the two steps' text."""
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)
        return _sqlite_utc_text

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def _sqlite_utc_text(value: dt.datetime | None) -> str | None:
    """``value`` in UTC as SQLite stores it: ``2026-12-05 05:40:01.560667``.

    The texts of recent times already in UTC are kept (``_UTC_TEXTS``): a one-scan push
    binds the same few times again and again (its arrival five times: the batch, the
    event, the device's state twice ...), and ``isoformat`` (C's ``sprintf``) cost it
    about 4 % of its instructions. Only UTC times are kept: two times in one other zone
    compare by their wall clocks, so a repeated hour's two instants (a DST change's
    ``fold``) are equal there, and would share a text."""
    if value is None:
        return None
    if value.tzinfo is dt.UTC:
        text = _UTC_TEXTS.get(value)
        if text is None:
            if len(_UTC_TEXTS) >= _UTC_TEXTS_KEPT:
                _UTC_TEXTS.clear()
            text = _UTC_TEXTS[value] = value.isoformat(" ", "microseconds")[: -len("+00:00")]
        return text
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTCDateTime column")
    return value.astimezone(dt.UTC).isoformat(" ", "microseconds")[: -len("+00:00")]


# ``_sqlite_utc_text``'s kept texts, by time (in UTC): emptied when full.
_UTC_TEXTS: dict[dt.datetime, str] = {}
_UTC_TEXTS_KEPT = 64


def utcnow() -> dt.datetime:
    """Now, in UTC. Used as a column default (a callable, evaluated per row)."""
    return dt.datetime.now(dt.UTC)


int_pk = Annotated[int, mapped_column(Integer, primary_key=True)]
# Event-sized tables: 64-bit on PostgreSQL; SQLite's INTEGER PRIMARY KEY is 64-bit already
# and must be spelled INTEGER to be the rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")
big_pk = Annotated[int, mapped_column(BigId, primary_key=True)]
# JSON documents: jsonb on PostgreSQL (compact, indexable), JSON text on SQLite.
Document = JSON().with_variant(JSONB(), "postgresql")
sha256_hex = Annotated[str, mapped_column(String(64))]
timestamp = Annotated[dt.datetime, mapped_column(UTCDateTime(), default=utcnow)]
str64 = Annotated[str, mapped_column(String(64))]
str200 = Annotated[str, mapped_column(String(200))]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dt.datetime: UTCDateTime()}


def str_enum(enum_cls: type[enum.StrEnum], name: str) -> Enum:
    """A portable enum column: VARCHAR plus a CHECK constraint, storing the values."""
    return Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        validate_strings=True,
        values_callable=lambda members: [member.value for member in members],
    )
