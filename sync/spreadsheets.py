"""What a CSV file we write must never do when a spreadsheet opens it.

A cell a spreadsheet would run as a formula begins with one of ``FORMULA_STARTS``
(OWASP's CSV injection). Text typed by a recipient, a sender, a courier or a
manager is written with a leading apostrophe there, which spreadsheets show as text
and do not display. So is a phone number: "+8613800001234" would open as the number
8.6E+12, a masked one as a formula that fails. The proof export and the station
reports' CSV both write their text cells through ``as_text_cell``.
"""

from __future__ import annotations

from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def as_text_cell(value: Any) -> Any:
    """``value`` as a spreadsheet shows it, never run as a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value
