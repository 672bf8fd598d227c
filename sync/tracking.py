"""Tracking numbers: UPU S10 for international items, configurable domestic formats.

S10 (UPU standard S10): two letters (service indicator), eight digits, a check
digit, and the ISO 3166-1 alpha-2 code of the issuing country, e.g.
``RR473124829GB``. Check digit: weights 8 6 4 2 3 5 9 7 over the eight digits,
``11 - sum mod 11``, with 10 becoming 0 and 11 becoming 5. Service indicators
beginning with J, K, S, T or W are reserved by the UPU and never issued.
"""

from __future__ import annotations

import operator
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import pycountry

from sync.errors import InvalidInput

# re.ASCII: without it \d also matches Arabic-Indic and other Unicode digits.
S10_SHAPE = re.compile(r"^([A-Z]{2})(\d{8})(\d)([A-Z]{2})$", re.ASCII)
S10_WEIGHTS = (8, 6, 4, 2, 3, 5, 9, 7)
RESERVED_SERVICE_INDICATOR_LETTERS = frozenset("JKSTW")
DEFAULT_DOMESTIC_PATTERNS = (r"[A-Z]{0,4}\d{10,20}",)

_ISO_COUNTRY_CODES = frozenset(country.alpha_2 for country in pycountry.countries)


def s10_check_digit(serial: str) -> int:
    """The S10 check digit for an eight-digit serial number."""
    if len(serial) != 8 or not serial.isdigit():
        raise ValueError("an S10 serial number is eight digits")
    remainder = 11 - sum(map(operator.mul, map(int, serial), S10_WEIGHTS)) % 11
    return {10: 0, 11: 5}.get(remainder, remainder)


def normalize(tracking_no: str) -> str:
    """Upper case, without the spaces and dashes people type or print on labels.

    NFKC first, so full-width characters from East Asian input methods
    (``ＲＲ４７３…``) become the ASCII number they stand for. Rejected events keep the
    parcel they name in this form (``sync.quarantine.parcel_named``): a change here
    needs a migration computing theirs again.
    """
    return re.sub(r"[\s-]", "", unicodedata.normalize("NFKC", tracking_no)).upper()


@dataclass(frozen=True)
class TrackingNumberPolicy:
    """Which tracking numbers a deployment accepts.

    A number shaped like S10 is judged as S10 only: a wrong check digit is an
    error even when a domestic pattern would match the same characters.
    """

    domestic_patterns: tuple[re.Pattern[str], ...]

    @classmethod
    def from_patterns(cls, patterns: Iterable[str]) -> TrackingNumberPolicy:
        compiled = []
        for pattern in patterns:
            try:
                compiled.append(re.compile(pattern, re.ASCII))
            except re.error as exc:
                raise ValueError(f"invalid domestic tracking pattern {pattern!r}: {exc}") from exc
        return cls(tuple(compiled))

    def validate(self, raw: str, *, field: str = "tracking_no") -> str:
        """Return the normalized number or raise ``InvalidInput`` saying what is wrong."""
        valid = _valid_number(self, raw)  # a push names each parcel about three times
        return valid if valid is not None else self._validate(raw, field)

    def _validate(self, raw: str, field: str) -> str:
        tracking_no = normalize(raw)
        if not tracking_no:
            raise InvalidInput("tracking number is empty", code="invalid_tracking_no", field=field)
        match = S10_SHAPE.match(tracking_no)
        if match:
            _validate_s10(tracking_no, match, field)
            return tracking_no
        if any(pattern.fullmatch(tracking_no) for pattern in self.domestic_patterns):
            return tracking_no
        raise InvalidInput(
            f"{tracking_no!r} is neither a UPU S10 number nor of a configured domestic format",
            code="invalid_tracking_no",
            field=field,
        )


def _validate_s10(tracking_no: str, match: re.Match[str], field: str) -> None:
    indicator, serial, check, country = match.groups()
    if indicator[0] in RESERVED_SERVICE_INDICATOR_LETTERS:
        raise InvalidInput(
            f"{tracking_no}: service indicator {indicator} is reserved by the UPU "
            "(J, K, S, T, W are never issued)",
            code="reserved_service_indicator",
            field=field,
        )
    expected = s10_check_digit(serial)
    if int(check) != expected:
        raise InvalidInput(
            f"{tracking_no}: check digit is {check}, expected {expected}",
            code="invalid_check_digit",
            field=field,
        )
    if country not in _ISO_COUNTRY_CODES:
        raise InvalidInput(
            f"{tracking_no}: {country} is not an ISO 3166-1 country code",
            code="unknown_country_code",
            field=field,
        )


@lru_cache(maxsize=8192)
def _valid_number(policy: TrackingNumberPolicy, raw: str) -> str | None:
    """The normalized number when ``raw`` is valid under ``policy``, else None (the
    caller validates again to raise the error with its field: errors are not cached)."""
    try:
        return policy._validate(raw, "tracking_no")
    except InvalidInput:
        return None
