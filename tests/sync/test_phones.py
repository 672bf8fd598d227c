import pytest

from sync.errors import InvalidInput
from sync.phones import mask_phone, normalize_phone


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
