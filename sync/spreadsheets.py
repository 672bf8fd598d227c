"""What a CSV file we write must never do when a spreadsheet opens it.

A cell a spreadsheet would run as a formula begins with one of ``FORMULA_STARTS``
(OWASP's CSV injection). Text typed by a recipient, a sender, a courier or a
manager is written with a leading apostrophe there, which spreadsheets show as text
and do not display. So is a phone number: "+8613800001234" would open as the number
8.6E+12, a masked one as a formula that fails. So is every text cell, whoever wrote it:
a column of codes holds what its validation let through (a deployment's tracking
number patterns may let a "+" or an "=" through), and a column that no list names as
typed by a person is not left unguarded. Numbers stay numbers: -3 is not a formula.
The proof export and the station reports' CSV both write their cells through
``csv_cell``.

A spreadsheet whose list separator is ";" (Excel in most of continental Europe, where
an auditor may open the export) splits each line of a comma-separated file at every
";", quoted or not: a name typed as ``Li;=HYPERLINK(...)`` began a cell of its own
there, run as a formula. It reads a double quote as quoting only at a cell's start,
so a line break inside a text cell (quoted after a comma) ends its line there too, and
what follows begins a line: ``Li\\n=HYPERLINK(...)`` ran as well. So a formula start
after a ";" or a line break in a text cell (spaces, tabs and double quotes between
them too) gets the same apostrophe.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_A_CELL_BEGINS_INSIDE = re.compile(r"([;\r\n][ \t\"]*+)(?=[=+\-@\r])")


def as_text_cell(value: Any) -> Any:
    """``value`` as a spreadsheet shows it, never run as a formula, also where a
    spreadsheet splitting lines at ";" would begin a cell (after a ";" or a line
    break)."""
    if not isinstance(value, str):
        return value
    value = _A_CELL_BEGINS_INSIDE.sub(r"\1'", value)
    if value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_cell(value: Any) -> Any:
    """``value`` as every CSV the service writes holds it: as its JSON answers write it,
    so that a script can match a row to them by text and a strict ISO 8601 parser reads
    its times. A time in ISO 8601 with a ``T``, in UTC (``2026-12-04T09:12:00+00:00``,
    a fraction only off a whole second), a date ``YYYY-MM-DD``, ``true`` or ``false``,
    an empty cell for null, not Python's ``str`` (a space for the ``T``, ``True``).
    Text is never run as a formula (``as_text_cell``)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    return as_text_cell(value)
