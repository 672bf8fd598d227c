"""Recipient phone numbers: stored in E.164, shown masked to everyone but auditors."""

from __future__ import annotations

import re
from typing import Any

import phonenumbers

from sync.errors import InvalidInput


def normalize_phone(raw: str, *, default_region: str | None, field: str = "phone") -> str:
    """Parse a number as people write it and return its E.164 form (``+8613812345678``).

    Numbers without a ``+`` prefix are read in ``default_region``.
    """
    try:
        number = phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidInput(
            f"{raw!r} is not a phone number: {exc}", code="invalid_phone", field=field
        ) from exc
    if not phonenumbers.is_valid_number(number):
        raise InvalidInput(
            f"{raw!r} is not a valid phone number"
            + ("" if raw.startswith("+") else f" in region {default_region}"),
            code="invalid_phone",
            field=field,
        )
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def mask_phone(e164: str | None) -> str | None:
    """Keep the country calling code and the last four digits: ``+86*******5678``."""
    if not e164:
        return e164
    try:
        country_code = phonenumbers.parse(e164).country_code
    except phonenumbers.NumberParseException:
        return "*" * max(len(e164) - 4, 0) + e164[-4:]
    prefix = f"+{country_code}"
    hidden = len(e164) - len(prefix) - 4
    return prefix + "*" * max(hidden, 0) + e164[-4:]


# Phone numbers in free text (a consent's evidence, a courier's note; a log line):
# international (+ then 8 to 15 digits, spaces, dots, dashes or parentheses between),
# and Chinese mobile numbers written without the country code (11 digits from 13, maybe
# grouped 3-4-4).
_PHONE_IN_TEXT = re.compile(
    r"(?<![A-Za-z0-9_+])\+\d(?:[ ().-]{0,2}\d){7,14}(?![0-9])"
    r"|(?<![A-Za-z0-9_.+-])1[3-9][0-9](?:[ -]?[0-9]){8}(?![A-Za-z0-9_.-])"
)


def _masked(match: re.Match[str]) -> str:
    digits = [c for c in match.group(0) if c.isdigit()]
    prefix = "+" if match.group(0).startswith("+") else ""
    return prefix + "*" * (len(digits) - 3) + "".join(digits[-3:])


def mask_phones_in(text: str) -> str:
    """``text`` with every phone number in it masked but for its last 3 digits: free
    text typed by a courier or a recipient channel may name one."""
    return _PHONE_IN_TEXT.sub(_masked, text)


def shown_text(text: str | None, *, unmasked: bool) -> str | None:
    """Free text as its reader may see it: whole for an auditor (``unmasked``), else with
    every phone number in it masked (rule 7)."""
    return text if unmasked or not text else mask_phones_in(text)


def mask_phones_in_value(value: Any) -> Any:
    """``mask_phones_in`` on every string of a JSON-like value (an event's details)."""
    if isinstance(value, str):
        return mask_phones_in(value)
    if isinstance(value, dict):
        return {key: mask_phones_in_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [mask_phones_in_value(item) for item in value]
    return value
