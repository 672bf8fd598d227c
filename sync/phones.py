"""Recipient phone numbers: stored in E.164, shown masked to everyone but auditors."""

from __future__ import annotations

import json
import re
import unicodedata
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


# Phone numbers in free text (a consent's evidence, a courier's note; a log line), read in
# the text as ``_as_typed`` folds it (one character for one: any script's decimal digits
# as 0-9, full-width and other compatibility forms as their ASCII letter or sign, every
# space as " ", every dash as "-"):
# * international: + then 8 to 15 digits, up to 3 spaces, dots, dashes or parentheses
#   between two ("+86 (138) 0013-8000", "+86 - 138 - 0013 - 8000", "(+86)13800138000"),
#   also right after a word or another "+" ("Tel+8613800138000", "++86..."), not after
#   a digit (a sum, "2026+12345678");
# * Chinese mobile numbers written without the country code: 11 digits from 13, with up
#   to 3 spaces or dashes between two ("138 - 0013 - 8000") or dots between the groups of
#   3-4-4 ("138.0013.8000"); not inside a longer run of letters and digits or a decimal
#   number ("SF13800138000", "0.13812345678"), but at the end of a sentence;
# * the same mobile numbers after China's country code without the "+", as SMS gateways
#   write them and people dialling from abroad type them: 86 or 0086 (up to 3 spaces or
#   dashes inside "00 86"), then up to 3 spaces, dashes or parentheses, or a dot before a
#   number dotted 3-4-4 ("8613800138000", "0086 138 0013 8000", "(86)138-0013-8000",
#   "86.138.0013.8000"), with the same bounds ("SF8613800138000", "2.8613800138000").
#   Other countries' codes are read only after a "+": a 13-digit run of another shape is
#   an order number or a time in milliseconds as often as a phone.
# Each branch begins with its literal (the character before it looked at from there):
# the engine then skips to a "+", a "1", an "8" or a "0", faster over a log line.
_MOBILE_AFTER_ITS_1 = r"[3-9][0-9](?:(?:[ -]{0,3}[0-9]){8}|\.[0-9]{4}\.[0-9]{4})"
_NOT_GOING_ON = r"(?![A-Za-z0-9_]|[.-][0-9])"
_AFTER_86 = r"(?:[ ()-]{0,3}|\.(?=[0-9]{3}\.))1"


def _begins(digit: str) -> str:
    """``digit`` where a number may begin: not after a letter, a digit, "_" or "+" (the
    international branch reads a "+"), nor after a decimal point or a dash after a digit."""
    return rf"{digit}(?<![A-Za-z0-9_+]{digit})(?<![0-9][.-]{digit})"


_PHONE_IN_TEXT = re.compile(
    r"\+(?<![0-9]\+)[0-9](?:[ ().-]{0,3}[0-9]){7,14}(?![0-9])"
    rf"|{_begins('1')}{_MOBILE_AFTER_ITS_1}{_NOT_GOING_ON}"
    rf"|{_begins('8')}6{_AFTER_86}{_MOBILE_AFTER_ITS_1}{_NOT_GOING_ON}"
    rf"|{_begins('0')}0[ -]{{0,3}}86{_AFTER_86}{_MOBILE_AFTER_ITS_1}{_NOT_GOING_ON}",
    re.ASCII,
)
_ANY_DIGIT = re.compile(r"\d")  # any script's decimal digit (Unicode category Nd)
_MINUS = "\u2212"


def _folded(char: str) -> str:
    """``char`` as the phone pattern reads it: always one character."""
    if char.isdecimal():
        return str(unicodedata.decimal(char))
    compatible = unicodedata.normalize("NFKC", char)
    if len(compatible) == 1 and compatible.isascii() and not compatible.isdigit():
        return compatible  # "＋" "（" "．" "－" "Ａ", the ideographic and no-break spaces
    category = unicodedata.category(char)
    if category == "Zs":
        return " "
    if category == "Pd" or char == _MINUS:
        return "-"  # en and em dashes, hyphens, the minus sign
    return char


class _Folds(dict[int, str]):
    """``str.translate``'s table of ``_folded``, filled as characters come (text in Chinese
    is read twice as fast as character by character); at most ``LIMIT`` of them kept."""

    LIMIT = 8192

    def __missing__(self, code: int) -> str:
        folded = _folded(chr(code))
        if len(self) < self.LIMIT:
            self[code] = folded
        return folded


_FOLDS = _Folds()


def _as_typed(text: str) -> str:
    """``text`` with each character as ``_folded`` reads it, so that a match's span in it
    is the number's span in ``text``."""
    return text if text.isascii() else text.translate(_FOLDS)


def _masked(typed: str) -> str:
    """A number as found in the text: its plus sign and its last 3 digits as written."""
    digits = [c for c in typed if c.isdecimal()]
    plus = "" if typed[0].isdecimal() else typed[0]
    return plus + "*" * (len(digits) - 3) + "".join(digits[-3:])


def mask_phones_in(text: str) -> str:
    """``text`` with every phone number in it masked but for its last 3 digits: free
    text typed by a courier or a recipient channel may name one, in any script's digits
    (full-width ``１３８…``, Arabic-Indic, ...) and with the separators people type. The
    rest of the text is left as it was written; so are the digits kept."""
    if not _ANY_DIGIT.search(text):
        return text
    parts: list[str] = []
    end = 0
    for match in _PHONE_IN_TEXT.finditer(_as_typed(text)):
        parts += [text[end : match.start()], _masked(text[match.start() : match.end()])]
        end = match.end()
    return "".join(parts) + text[end:] if parts else text


def mask_phones_in_json(document: str) -> str:
    """``mask_phones_in`` for a JSON document written with ``ensure_ascii`` (a rejected
    event's payload): its strings are masked as read, not as escaped (``\\uff11`` is a
    full-width 1, and ``\\u8bdd`` before a number is a Chinese character, not a letter
    d); keys too; an integer that reads as a phone number becomes the masked string. The
    document keeps its form (sorted keys, ASCII). Not JSON: masked as text."""
    try:
        value = json.loads(document)
    except ValueError:
        return mask_phones_in(document)
    return json.dumps(_masked_value(value, keys=True), ensure_ascii=True, sort_keys=True)


def shown_phone(e164: str | None, *, unmasked: bool) -> str | None:
    """A phone number as its reader may see it: whole for an auditor (``unmasked``),
    else masked (``mask_phone``; rule 7)."""
    return e164 if unmasked else mask_phone(e164)


def shown_text(text: str | None, *, unmasked: bool) -> str | None:
    """Free text as its reader may see it: whole for an auditor (``unmasked``), else with
    every phone number in it masked (rule 7)."""
    return text if unmasked or not text else mask_phones_in(text)


def mask_phones_in_value(value: Any) -> Any:
    """``mask_phones_in`` on every string of a JSON-like value (an event's details), and
    on every integer as written: a number a PDA sent as one (``13812345678``, the wrong
    type) becomes the masked string."""
    return _masked_value(value, keys=False)


def mask_phones_in_message(data: Any) -> Any:
    """A webhook message's data as an admin is shown it: each ``recipient_phone`` masked
    as a phone number (``mask_phone``), any number typed into the rest (a manager's note
    on a flag resolved) as in free text (``mask_phones_in_value``)."""
    return _masked_value(data, keys=False, numbers=frozenset({"recipient_phone"}))


def _masked_value(value: Any, *, keys: bool, numbers: frozenset[str] = frozenset()) -> Any:
    """``value`` with phone numbers masked in its strings and integers, and in its keys
    if ``keys``; the values of the keys in ``numbers`` are phone numbers (``mask_phone``)."""
    if isinstance(value, str):
        return mask_phones_in(value)
    if isinstance(value, int) and not isinstance(value, bool):
        written = str(value)
        masked = mask_phones_in(written)
        return value if masked == written else masked
    if isinstance(value, dict):
        return {
            mask_phones_in(key) if keys else key: (
                mask_phone(item)
                if key in numbers
                else _masked_value(item, keys=keys, numbers=numbers)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_masked_value(item, keys=keys, numbers=numbers) for item in value]
    return value
