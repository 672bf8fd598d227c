import pytest

from sync.errors import InvalidInput
from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy, s10_check_digit

policy = TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS)


@pytest.mark.parametrize("number", ["RR473124829GB", "EE471108151FR", "RB123456785GB"])
def test_valid_s10_numbers_are_accepted(number: str) -> None:
    assert policy.validate(number) == number


def test_numbers_are_normalized_before_checking() -> None:
    assert policy.validate(" rr 473 124 829 gb ") == "RR473124829GB"
    assert policy.validate("RR-473124829-GB") == "RR473124829GB"


@pytest.mark.parametrize(
    ("number", "code"),
    [
        ("RB123456786US", "invalid_check_digit"),
        ("RB123456785XX", "unknown_country_code"),
        ("JA123456785GB", "reserved_service_indicator"),
        ("KA123456785GB", "reserved_service_indicator"),
        ("SA123456785GB", "reserved_service_indicator"),
        ("TA123456785GB", "reserved_service_indicator"),
        ("WA123456785GB", "reserved_service_indicator"),
        ("", "invalid_tracking_no"),
        ("HELLO", "invalid_tracking_no"),
    ],
)
def test_invalid_numbers_are_refused_with_a_precise_code(number: str, code: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        policy.validate(number)
    assert raised.value.code == code
    assert raised.value.field == "tracking_no"


def test_check_digit_maps_ten_to_zero_and_eleven_to_five() -> None:
    # Serials chosen so that 11 - (sum mod 11) is 10 and 11 respectively.
    results = {s10_check_digit(f"{n:08d}") for n in range(0, 2000)}
    assert results <= set(range(10))
    assert s10_check_digit("47312482") == 9
    ten = next(
        f"{n:08d}"
        for n in range(10**6)
        if 11
        - sum(int(d) * w for d, w in zip(f"{n:08d}", (8, 6, 4, 2, 3, 5, 9, 7), strict=True)) % 11
        == 10
    )
    eleven = next(
        f"{n:08d}"
        for n in range(10**6)
        if sum(int(d) * w for d, w in zip(f"{n:08d}", (8, 6, 4, 2, 3, 5, 9, 7), strict=True)) % 11
        == 0
    )
    assert s10_check_digit(ten) == 0
    assert s10_check_digit(eleven) == 5


def test_s10_shaped_numbers_are_never_rescued_by_a_domestic_pattern() -> None:
    permissive = TrackingNumberPolicy.from_patterns([r"[A-Z0-9]+"])
    with pytest.raises(InvalidInput) as raised:
        permissive.validate("RB123456786US")
    assert raised.value.code == "invalid_check_digit"


def test_domestic_patterns_are_configurable() -> None:
    sf_only = TrackingNumberPolicy.from_patterns([r"SF\d{12}"])
    assert sf_only.validate("SF130000000001") == "SF130000000001"
    with pytest.raises(InvalidInput):
        sf_only.validate("YT1234567890123")
    assert policy.validate("YT1234567890123") == "YT1234567890123"


def test_a_broken_pattern_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="invalid domestic tracking pattern"):
        TrackingNumberPolicy.from_patterns(["(unclosed"])


def test_full_width_input_becomes_the_ascii_number() -> None:
    assert policy.validate("ＲＲ４７３１２４８２９ＧＢ") == "RR473124829GB"
    assert policy.validate("ＳＦ１３０００００００００１") == "SF130000000001"


@pytest.mark.parametrize("number", ["RR٤٧٣١٢٤٨٢٩GB", "SF١٣٠٠٠٠٠٠٠٠٠٠١"])
def test_non_ascii_digits_are_not_digits_of_a_tracking_number(number: str) -> None:
    with pytest.raises(InvalidInput):
        policy.validate(number)
