"""Recipient phone numbers: stored in E.164, shown masked to everyone but auditors."""

from __future__ import annotations

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
