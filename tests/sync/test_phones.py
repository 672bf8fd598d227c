import sys
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sync.errors import InvalidInput
from sync.phones import (
    mask_phone,
    mask_phones_in,
    mask_phones_in_message,
    normalize_phone,
    shown_phone,
    shown_text,
)


def test_numbers_are_stored_in_e164() -> None:
    assert normalize_phone("138 1234 5678", default_region="CN") == "+8613812345678"
    assert normalize_phone("+44 20 7946 0958", default_region="CN") == "+442079460958"


def test_invalid_numbers_name_the_field() -> None:
    with pytest.raises(InvalidInput) as raised:
        normalize_phone("12345", default_region="CN", field="recipient_phone")
    assert raised.value.code == "invalid_phone"
    assert raised.value.field == "recipient_phone"


def test_masking_keeps_country_code_and_last_four_digits() -> None:
    assert mask_phone("+8613812345678") == "+86*******5678"
    assert mask_phone(None) is None


def test_a_phone_number_is_shown_whole_to_an_auditor_only() -> None:
    """Rule 7: the recipient's number as each reader is shown it, wherever it is shown
    (a parcel, a proof, a consent, a page)."""
    assert shown_phone("+8613812345678", unmasked=True) == "+8613812345678"
    assert shown_phone("+8613812345678", unmasked=False) == "+86*******5678"
    assert shown_phone("+442079460958", unmasked=False) == mask_phone("+442079460958")
    for unmasked in (True, False):
        assert shown_phone(None, unmasked=unmasked) is None  # none on record
        assert shown_phone("", unmasked=unmasked) == ""


def test_a_webhook_message_masks_its_recipient_phone_as_a_number_and_the_rest_as_text() -> None:
    """An admin reading a delivery: the recipient's phone keeps its country code and last
    four digits, wherever it stands; a number typed into a note, its last three."""
    data = {
        "recipient_phone": "+8613812345678",
        "note": "rang her on 138 1234 5678",
        "parcels": [{"recipient_phone": "+442079460958", "seq": 3}],
        "consent": {"recipient_phone": None, "granted": True},
    }
    assert mask_phones_in_message(data) == {
        "recipient_phone": "+86*******5678",
        "note": "rang her on ********678",
        "parcels": [{"recipient_phone": "+44******0958", "seq": 3}],
        "consent": {"recipient_phone": None, "granted": True},
    }


# -- phone numbers in free text ---------------------------------------------------------------

# The first digit of every Unicode script's decimal digits (each script's run 0-9 is
# consecutive): ASCII, full-width, Arabic-Indic, Devanagari, Bengali, Thai, ...
ZEROS = [
    chr(code)
    for code in range(sys.maxunicode + 1)
    if unicodedata.category(chr(code)) == "Nd" and unicodedata.decimal(chr(code)) == 0
]
FULL_WIDTH = dict(zip("0123456789+-() ", "０１２３４５６７８９＋－（）\u3000", strict=True))


def written_in(zero: str, digits: str) -> str:
    return "".join(chr(ord(zero) + int(d)) for d in digits)


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        # full-width digits and signs, as a Chinese input method types them
        ("电话１３８００１３８０００。", "电话********０００。"),
        ("１３８－００１３－８０００", "********０００"),
        ("１３８\u3000００１３\u3000８０００", "********０００"),
        ("（＋８６）１３８００１３８０００", "（＋**********０００"),
        ("＋86 138 0013 8000", "＋**********000"),
        ("＋44 20 7946 0958", "＋*********958"),
        # other scripts' digits, and scripts mixed in one number
        ("رقم ١٣٨٠٠١٣٨٠٠٠ شكرا", "رقم ********٠٠٠ شكرا"),
        ("फ़ोन १३८००१३८००० है", "फ़ोन ********००० है"),
        ("138００13８000", "********000"),
        # separators typed in free text
        ("call 13812345678.", "call ********678."),
        ("138.0013.8000", "********000"),
        ("138–0013–8000", "********000"),
        ("138 — 0013 — 8000", "********000"),
        ("138 - 0013 - 8000", "********000"),
        ("138\u00a00013\u00a08000", "********000"),
        ("Tel.13800138000", "Tel.********000"),
        ("(+86)13800138000", "(+**********000"),
        ("+86 (138) 0013-8000", "+**********000"),
        ("+86 - 138 - 0013 - 8000", "+**********000"),
        ("+1.415.555.0100", "+********100"),
        ("Tel+8613812345678", "Tel+**********678"),
        ("x+13812345678", "x+********678"),
        ("++8613812345678", "++**********678"),
        # China's country code without the "+": an SMS gateway's MSISDN, dialled from abroad
        ("SMS reply Y from 8613812345678", "SMS reply Y from **********678"),
        ("from 008613812345678.", "from ************678."),
        ("86-138-1234-5678", "**********678"),
        ("0086 138 1234 5678", "************678"),
        ("00 86 138 1234 5678", "************678"),
        ("(86)138-1234-5678", "(**********678"),
        ("(0086) 138 1234 5678", "(************678"),
        ("86.138.1234.5678", "**********678"),
        ("电话８６１３８１２３４５６７８。", "电话**********６７８。"),
        ("（００８６）１３８－１２３４－５６７８", "（************６７８"),
        ("China Mobile 10086, then 13812345678", "China Mobile 10086, then ********678"),
    ],
)
def test_a_phone_in_free_text_is_masked_however_it_was_typed(text: str, masked: str) -> None:
    assert mask_phones_in(text) == masked
    assert shown_text(text, unmasked=False) == masked
    assert shown_text(text, unmasked=True) == text


@pytest.mark.parametrize(
    "text",
    [
        "parcel RR473124829GB SF1234567890123 seq 13 of 1764470000123",
        "took 1764470000.1 s; ratio 0.13812345678",
        "version 2.13812345678",
        "order 2026-13812345678",
        "SF１３８００１３８０００",  # a longer code, in full-width letters and digits
        "１３８００１３８０００１",  # twelve digits
        "price ¹³⁸⁰⁰¹³⁸⁰⁰⁰",  # superscripts are not decimal digits
        "电话没有，地址：上海市浦东新区世纪大道１００号",
        # 86 before a mobile number, inside a tracking number or a longer run of digits
        "SF8613812345678 JD008613812345678 8613812345678SF",
        "SF８６１３８１２３４５６７８",
        "IMEI 861381234567890",  # 15 digits, as Chinese handsets' IMEIs begin
        "086138123456789",
        # a decimal number or a range, not a phone
        "ratio 2.8613812345678, lon 86.13812345678, order 2026-8613812345678",
        # another country code without "+" is not read: as often an order number or a
        # time in milliseconds (the "+" says it is a phone)
        "4413812345678 8513812345678 1764470000123",
    ],
)
def test_what_is_not_a_phone_stays_as_written(text: str) -> None:
    assert mask_phones_in(text) == text


SEPARATORS = ["", " ", "-", "\u3000", "\u00a0", "－", "–", "—", " - "]
BEFORE = [" ", "：", ":", "，", "(", "（", "\n", "电话", "Tel.", "tel: "]
AFTER = [" ", "，", "。", "!", ")", "）", "\n", "；", ". "]
PLUS_LIKE = "+＋﹢⁺₊"
# Text around a number: anything but digits and plus signs (those would make it another
# number).
AROUND = st.text(
    alphabet=st.characters(exclude_categories=["Nd", "Cs"], exclude_characters=PLUS_LIKE),
    max_size=12,
)


@st.composite
def mobile_numbers(draw: st.DrawFn) -> tuple[str, str]:
    """A Chinese mobile number as typed, in one script: (text, its digits in it)."""
    digits = (
        "1"
        + draw(st.sampled_from("3456789"))
        + draw(st.text("0123456789", min_size=9, max_size=9))
    )
    local = written_in(draw(st.sampled_from(ZEROS)), digits)
    separator = draw(st.sampled_from([*SEPARATORS, "."]))
    typed = separator.join((local[:3], local[3:7], local[7:])) if separator else local
    return typed, local


@st.composite
def plus_numbers(draw: st.DrawFn) -> tuple[str, str]:
    """An international number as typed: a plus, then 8 to 15 digits in groups."""
    digits = draw(st.text("0123456789", min_size=8, max_size=15))
    local = written_in(draw(st.sampled_from(ZEROS)), digits)
    cuts = sorted(draw(st.sets(st.integers(1, len(local) - 1), max_size=4)))
    groups = [local[i:j] for i, j in zip([0, *cuts], [*cuts, len(local)], strict=True)]
    separators = [*SEPARATORS, ".", "(", ")", ") ", " (", "（", "）"]
    typed = groups[0] + "".join(draw(st.sampled_from(separators)) + g for g in groups[1:])
    return draw(st.sampled_from("+＋")) + typed, local


@st.composite
def country_code_numbers(draw: st.DrawFn) -> tuple[str, str]:
    """A Chinese mobile number after 86 or 0086 without a plus, as typed, in one script."""
    prefix = draw(st.sampled_from(["86", "0086"]))
    mobile, local = draw(mobile_numbers())
    zero = chr(ord(local[0]) - 1)
    code = written_in(zero, prefix)
    if len(code) == 4:
        code = code[:2] + draw(st.sampled_from(SEPARATORS)) + code[2:]
    dotted = "." in mobile
    after = "." if dotted else draw(st.sampled_from([*SEPARATORS, "(", ")", ") "]))
    return code + after + mobile, written_in(zero, prefix) + local


@given(
    number=st.one_of(mobile_numbers(), plus_numbers(), country_code_numbers()),
    before=st.sampled_from(BEFORE),
    after=st.sampled_from(AFTER),
    head=AROUND,
    tail=AROUND,
)
def test_any_phone_shaped_run_in_any_digit_script_is_masked(
    number: tuple[str, str], before: str, after: str, head: str, tail: str
) -> None:
    """Whatever the script of its digits and the separators between them, a number
    keeps its last 3 digits as written (and its plus sign); nothing around it changes."""
    typed, digits = number
    plus = typed[0] if typed[0] in PLUS_LIKE else ""
    masked = plus + "*" * (len(digits) - 3) + digits[-3:]
    text = head + before + typed + after + tail
    assert mask_phones_in(text) == head + before + masked + after + tail


DIGIT_RUNS = st.builds(
    written_in, st.sampled_from(ZEROS), st.text("0123456789", min_size=1, max_size=7)
)


@given(st.lists(st.one_of(AROUND, DIGIT_RUNS), max_size=8))
def test_text_without_a_phone_shaped_run_is_unchanged(tokens: list[str]) -> None:
    """Runs of up to 7 digits, in any script, between other text: no phone number."""
    text = ", ".join(tokens)
    assert mask_phones_in(text) == text
