"""Input fields that refuse, with a clear 422, values the database would refuse with a 500."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import marshmallow as ma
from werkzeug.routing import IntegerConverter, Map

# Our integer keys are 32-bit; larger numbers overflow SQLite's and PostgreSQL's integers.
MAX_ID = 2**31 - 1


# NUL: PostgreSQL cannot store it. Lone surrogates (JSON allows "\ud800"): no
# database driver can encode them. No field of ours needs either.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> bool:
    """Whether the database can store ``text`` (``Text``'s check)."""
    return _UNSTORABLE.search(text) is None


class Text(ma.fields.String):
    """A string the database can store: no NUL character, no lone surrogate."""

    default_error_messages = {
        "unstorable": "must not contain NUL characters or unpaired surrogates"
    }

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text: str = super()._deserialize(value, attr, data, **kwargs)
        if not storable(text):
            raise self.make_error("unstorable")
        return text


class Id(ma.fields.Integer):
    """A row id: a positive 32-bit integer."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("validate", ma.validate.Range(min=1, max=MAX_ID))
        super().__init__(**kwargs)


class After(ma.fields.Integer):
    """Keyset cursor over integer ids: the last id seen, 0 for the first page."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("load_default", 0)
        kwargs.setdefault("validate", ma.validate.Range(min=0, max=MAX_ID))
        kwargs.setdefault("metadata", {"description": "Last id of the previous page"})
        super().__init__(**kwargs)


class IdConverter(IntegerConverter):
    """``<id:name>`` in routes: out-of-range numbers are a 404, never a database error."""

    def __init__(self, map: Map) -> None:
        super().__init__(map, min=1, max=MAX_ID)


def id_converter_schema(_converter: IdConverter) -> dict[str, Any]:
    return {"type": "integer", "minimum": 1, "maximum": MAX_ID}


class UtcTime(ma.fields.AwareDateTime):
    """An ISO 8601 time with an offset, given back in UTC; times that UTC cannot hold
    (year 1 east of Greenwich) are a 422, not an overflow."""

    default_error_messages = {
        "out_of_range": "the time is out of range",
        "invalid_awareness": "give the time with its offset: 2026-11-23T19:00:00+08:00, or Z",
    }

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        moment: dt.datetime = super()._deserialize(value, attr, data, **kwargs)
        try:
            return moment.astimezone(dt.UTC)
        except OverflowError:
            raise self.make_error("out_of_range") from None
