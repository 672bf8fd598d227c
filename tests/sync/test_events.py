"""Each event is judged on its own, and the answer names a stable code and the field."""

import datetime as dt
import uuid
from typing import Any

import pytest

from models import EventType
from sync.events import (
    EventRejected,
    EventRules,
    PushClock,
    readable_seq,
    type_fields,
    validate_event,
)
from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy
from tests import factories

SENT_AT = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
RULES = EventRules(tracking=TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS))
TRACKING_NO = "RR473124829GB"


def event(**overrides: Any) -> dict[str, Any]:
    base = factories.event(1, TRACKING_NO, occurred_at=SENT_AT - dt.timedelta(hours=1))
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def rejection(raw: Any) -> tuple[str, str | None]:
    with pytest.raises(EventRejected) as info:
        validate_event(raw, rules=RULES)
    return info.value.code, info.value.field


def test_a_valid_event_is_normalized() -> None:
    raw = event(
        tracking_no=" rr473124829gb ",
        occurred_at="2026-11-23T18:30:00+08:00",
        location={"lat": 31.2, "lon": 121.5, "accuracy_m": 8},
    )
    valid = validate_event(raw, rules=RULES)
    assert valid.tracking_no == TRACKING_NO
    assert valid.occurred_at_device == dt.datetime(2026, 11, 23, 10, 30, tzinfo=dt.UTC)
    assert valid.location is not None and valid.location.accuracy_m == 8.0
    assert valid.type == EventType.CHECKED_OUT


def test_the_same_instant_in_two_spellings_has_the_same_content_hash() -> None:
    cid = str(uuid.uuid4())
    a = validate_event(
        event(client_event_id=cid, occurred_at="2026-11-23T18:30:00+08:00"),
        rules=RULES,
    )
    b = validate_event(
        event(client_event_id=cid, occurred_at="2026-11-23T10:30:00Z"),
        rules=RULES,
    )
    c = validate_event(
        event(client_event_id=cid, occurred_at="2026-11-23T10:31:00Z"),
        rules=RULES,
    )
    assert a.content_hash == b.content_hash != c.content_hash


def test_a_whole_number_written_with_a_fraction_is_that_number() -> None:
    """Gson over a map writes ``5`` as ``5.0``; the event is the same event."""
    cid = str(uuid.uuid4())
    plain = validate_event(event(client_event_id=cid, seq=5, shift_id=7), rules=RULES)
    written = validate_event(event(client_event_id=cid, seq=5.0, shift_id=7.0), rules=RULES)
    assert (written.seq, written.shift_id) == (5, 7)
    assert type(written.seq) is int and type(written.shift_id) is int
    assert written.content_hash == plain.content_hash


@pytest.mark.parametrize(
    ("raw", "seq"),
    [
        (7, 7),
        (7.0, 7),
        ("7", 7),
        (" 7 ", 7),
        ("7.0", 7),
        ("2147483647", 2**31 - 1),
        ("2147483648", None),
        ("99999999999", None),
        ("0", None),
        ("-7", None),
        ("７", None),
        ("7.5", None),
        ("seven", None),
        ("", None),
        (None, None),
        (True, None),
        (7.5, None),
        ([7], None),
    ],
)
def test_the_seq_of_a_rejected_event_is_read_when_it_names_one(raw: Any, seq: int | None) -> None:
    """Whatever is read here is still refused (``invalid_seq`` unless a number): only
    the quarantine and the acknowledgements take the seq a quoted number names."""
    assert readable_seq(raw) == seq


@pytest.mark.parametrize(
    ("raw", "code", "field"),
    [
        ([1, 2], "not_an_object", None),
        (event(type=None), "missing_field", "type"),
        (event(type="teleported"), "unknown_event_type", "type"),
        (event(client_event_id="not-a-uuid"), "invalid_uuid", "client_event_id"),
        (event(client_event_id=12), "invalid_uuid", "client_event_id"),
        (event(seq=0), "invalid_seq", "seq"),
        (event(seq=-5), "invalid_seq", "seq"),
        (event(seq=2**31), "invalid_seq", "seq"),
        (event(seq=True), "invalid_seq", "seq"),
        (event(seq="3"), "invalid_seq", "seq"),
        (event(seq=5.5), "invalid_seq", "seq"),
        (event(seq=float("nan")), "invalid_seq", "seq"),
        (event(seq=float("inf")), "invalid_seq", "seq"),
        (event(seq=2.0**31), "invalid_seq", "seq"),
        (event(shift_id=1.5), "invalid_id", "shift_id"),
        (event(tracking_no="RR473124828GB"), "invalid_check_digit", "tracking_no"),
        (event(tracking_no=""), "missing_text", "tracking_no"),
        (event(tracking_no="x" * 41), "text_too_long", "tracking_no"),
        (event(occurred_at="yesterday"), "invalid_time", "occurred_at"),
        (event(occurred_at="2026-11-23T10:00:00"), "time_without_offset", "occurred_at"),
        (event(occurred_at="0001-01-01T00:00:00+01:00"), "time_out_of_range", "occurred_at"),
        (event(location={"lat": 95, "lon": 0}), "invalid_number", "location.lat"),
        (event(location={"lat": float("nan"), "lon": 0}), "invalid_number", "location.lat"),
        (event(location={"lat": 10**400, "lon": 0}), "invalid_number", "location.lat"),
        (event(location={"lat": 1, "lon": 2, "alt": 3}), "unknown_field", "location"),
        (event(location="here"), "invalid_location", "location"),
        (event(shift_id=-1), "invalid_id", "shift_id"),
        (event(colour="red"), "unknown_field", "colour"),
        (event(type="delivery_attempt_failed", action="notice_left"), "missing_field", "reason"),
        (
            event(type="delivery_attempt_failed", reason="bored", action="notice_left"),
            "invalid_choice",
            "reason",
        ),
        (event(type="delivered_to_locker", locker_id="L1"), "missing_field", "compartment"),
        (event(type="delivered_to_pickup_point"), "missing_field", "point_id"),
        (
            event(type="delivered", pod={"signature_sha256": "ABC"}),
            "invalid_digest",
            "pod.signature_sha256",
        ),
        (event(type="delivered", pod={"mood": "happy"}), "unknown_field", "pod"),
        (
            event(type="delivered", pod={"recipient_name": "a\x00b"}),
            "unstorable_text",
            "pod.recipient_name",
        ),
        (event(type="exception", reason="sad"), "invalid_choice", "reason"),
        (
            event(type="consent_captured", consent={"method": "locker"}),
            "missing_field",
            "consent.channel",
        ),
        (
            event(type="consent_captured", consent={"method": "drone", "channel": "sms"}),
            "invalid_choice",
            "consent.method",
        ),
        (event(type="correction", reason="mis-tap"), "missing_field", "voids_client_event_id"),
        (event(type="consent_requested"), "missing_field", "request"),
        (
            event(type="consent_requested", request={"method": "any", "point_id": "L-1"}),
            "point_without_method",
            "request.point_id",
        ),
        (
            event(type="consent_requested", request={"method": "locker", "channel": "fax"}),
            "invalid_choice",
            "request.channel",
        ),
        (
            event(type="consent_requested", request={"method": "locker", "expires_at": "soon"}),
            "invalid_time",
            "request.expires_at",
        ),
        (
            event(
                type="consent_captured",
                consent={"method": "any", "point_id": "L-1", "channel": "sms"},
            ),
            "point_without_method",
            "consent.point_id",
        ),
        (
            event(type="correction", voids_client_event_id=str(uuid.uuid4())),
            "missing_field",
            "reason",
        ),
        (event(type="checked_out", locker_id="L1"), "unknown_field", "locker_id"),
        # A required field left blank is refused, naming it (an optional one is absent).
        (event(tracking_no="  "), "missing_text", "tracking_no"),
        (event(occurred_at=""), "invalid_time", "occurred_at"),
        (event(client_event_id=""), "invalid_uuid", "client_event_id"),
        (
            event(type="delivered_to_locker", locker_id="", compartment="1"),
            "missing_text",
            "locker_id",
        ),
        (
            event(type="delivered_to_locker", locker_id="L1", compartment=" "),
            "missing_text",
            "compartment",
        ),
        (event(type="delivered_to_pickup_point", point_id="\t"), "missing_text", "point_id"),
        (
            event(type="delivery_attempt_failed", reason="", action="notice_left"),
            "invalid_choice",
            "reason",
        ),
        (
            event(type="delivery_attempt_failed", reason="refused", action=" "),
            "invalid_choice",
            "action",
        ),
        (event(type="exception", reason=""), "invalid_choice", "reason"),
        (
            event(type="consent_captured", consent={"method": "", "channel": "sms"}),
            "invalid_choice",
            "consent.method",
        ),
        (
            event(type="consent_captured", consent={"method": "locker", "channel": " "}),
            "invalid_choice",
            "consent.channel",
        ),
        (event(type="consent_captured", consent=""), "invalid_object", "consent"),
        (
            event(type="consent_requested", request={"method": ""}),
            "invalid_choice",
            "request.method",
        ),
        (
            event(type="correction", voids_client_event_id=str(uuid.uuid4()), reason=" "),
            "missing_text",
            "reason",
        ),
        (
            event(type="correction", voids_client_event_id="", reason="mis-tap"),
            "invalid_uuid",
            "voids_client_event_id",
        ),
        # Named as PostgreSQL's jsonb can store it (a raw NUL refused the whole push).
        (event(**{"a\x00b": 1}), "unknown_field", "a\\u0000b"),
        (event(**{"x\ud800": 1}), "unknown_field", "x\\ud800"),
    ],
)
def test_rejections_name_a_code_and_the_field(raw: Any, code: str, field: str | None) -> None:
    assert rejection(raw) == (code, field)


def test_a_correction_cannot_void_itself() -> None:
    cid = str(uuid.uuid4())
    raw = event(type="correction", client_event_id=cid, voids_client_event_id=cid, reason="x")
    assert rejection(raw) == ("correction_voids_itself", "voids_client_event_id")


def test_an_unknown_field_is_named_with_the_type_that_does_not_take_it() -> None:
    """It read 'unknown field 'locker_id' for a out_for_delivery event'."""
    with pytest.raises(EventRejected) as refused:
        validate_event(event(type="out_for_delivery", locker_id="L1"), rules=RULES)
    assert refused.value.message == (
        "unknown field 'locker_id' for an event of type out_for_delivery"
    )


@pytest.mark.parametrize(
    "occurred_at",
    [
        "2026-11-23T10:00:00Z",  # a scan of this morning
        "2000-01-01T00:00:00Z",  # a PDA reset to its factory date
        "0001-01-01T00:00:00Z",  # the start of the calendar
        "9999-12-31T23:59:59Z",  # its end
    ],
)
def test_an_event_of_any_date_is_valid_whatever_its_push_says(occurred_at: str) -> None:
    """The event alone is checked: a date far from its push's ``sent_at`` is the PDA's
    clock jumping, which the engine flags (``clock_jump``); the scan is kept."""
    valid = validate_event(event(occurred_at=occurred_at), rules=RULES)
    assert valid.occurred_at_device == dt.datetime.fromisoformat(occurred_at)


# A valid form of each event type that has fields of its own: its required ones.
VALID_FORMS: dict[EventType, dict[str, Any]] = {
    EventType.DELIVERY_ATTEMPT_FAILED: {"reason": "recipient_absent", "action": "notice_left"},
    EventType.DELIVERED: {"pod": {"recipient_name": "Li", "relation": "self"}},
    EventType.DELIVERED_TO_LOCKER: {"locker_id": "L-7", "compartment": "12"},
    EventType.DELIVERED_TO_PICKUP_POINT: {"point_id": "PP-3"},
    EventType.EXCEPTION: {"reason": "damaged"},
    EventType.CONSENT_CAPTURED: {"consent": {"method": "any", "channel": "in_person"}},
    EventType.CONSENT_REQUESTED: {"request": {"method": "locker", "point_id": "L-7"}},
    EventType.CORRECTION: {"voids_client_event_id": str(uuid.uuid4()), "reason": "mis-tap"},
}


@pytest.mark.parametrize("event_type", list(EventType))
def test_every_event_type_has_a_valid_form(event_type: EventType) -> None:
    extra = VALID_FORMS.get(event_type, {})
    valid = validate_event(event(type=event_type.value, **extra), rules=RULES)
    assert valid.type == event_type
    assert set(valid.details) == set(extra)


def test_a_push_clock_corrects_by_its_offset_what_it_recorded_and_keeps_the_rest() -> None:
    """Within the push's window an event is moved by the push's offset; outside it the
    clock jumped since, and its device time stands, kept within a year before the
    push's arrival and never after it."""
    received = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
    clock = PushClock(received + dt.timedelta(days=365), received, RULES)  # a year ahead
    within = received + dt.timedelta(days=360)
    assert not clock.behind(within) and clock.corrected(within) == received - dt.timedelta(days=5)
    recorded_right = received - dt.timedelta(hours=3)  # before the year was mistyped
    assert clock.behind(recorded_right) and clock.corrected(recorded_right) == recorded_right
    year_one = dt.datetime(1, 1, 1, tzinfo=dt.UTC)
    assert clock.corrected(year_one) == received - dt.timedelta(days=366)
    reset = PushClock(dt.datetime(2000, 1, 1, tzinfo=dt.UTC), received, RULES)
    assert reset.ahead(recorded_right) and reset.corrected(recorded_right) == recorded_right
    assert reset.corrected(dt.datetime(9999, 12, 31, tzinfo=dt.UTC)) == received


# The fields of a valid event of each type that has optional fields, every one filled
# in; ``OPTIONAL_FIELDS`` names each optional field by its event type and path.
WITH_OPTIONALS: dict[EventType, dict[str, Any]] = {
    EventType.CHECKED_OUT: {
        "location": {"lat": 31.2, "lon": 121.5, "accuracy_m": 8},
        "shift_id": 7,
    },
    EventType.DELIVERED: {
        "pod": {
            "recipient_name": "Li",
            "relation": "neighbour",
            "signature_sha256": "a" * 64,
            "photo_sha256": "b" * 64,
            "pickup_code": "1234",
        }
    },
    EventType.DELIVERED_TO_LOCKER: {
        "locker_id": "L-7",
        "compartment": "12",
        "pod": {"photo_sha256": "b" * 64, "pickup_code": "1234"},
    },
    EventType.DELIVERED_TO_PICKUP_POINT: {"point_id": "PP-3", "pod": {"pickup_code": "1234"}},
    EventType.COLLECTED_FROM_LOCKER: {"locker_id": "L-7", "compartment": "12"},
    EventType.CONSENT_CAPTURED: {
        "consent": {
            "method": "locker",
            "point_id": "L-7",
            "channel": "in_person",
            "evidence": "asked at the door",
        }
    },
    EventType.CONSENT_REQUESTED: {
        "request": {
            "method": "locker",
            "point_id": "L-7",
            "channel": "sms",
            "expires_at": "2026-11-24T12:00:00+08:00",
        }
    },
}
OPTIONAL_FIELDS: list[tuple[EventType, tuple[str, ...]]] = [
    (EventType.CHECKED_OUT, ("location",)),
    (EventType.CHECKED_OUT, ("location", "accuracy_m")),
    (EventType.CHECKED_OUT, ("shift_id",)),
    *(
        (delivery, ("pod", *name))
        for delivery in (
            EventType.DELIVERED,
            EventType.DELIVERED_TO_LOCKER,
            EventType.DELIVERED_TO_PICKUP_POINT,
        )
        for name in [(), *((key,) for key in WITH_OPTIONALS[delivery]["pod"])]
    ),
    (EventType.COLLECTED_FROM_LOCKER, ("locker_id",)),
    (EventType.COLLECTED_FROM_LOCKER, ("compartment",)),
    (EventType.CONSENT_CAPTURED, ("consent", "point_id")),
    (EventType.CONSENT_CAPTURED, ("consent", "evidence")),
    (EventType.CONSENT_REQUESTED, ("request", "point_id")),
    (EventType.CONSENT_REQUESTED, ("request", "channel")),
    (EventType.CONSENT_REQUESTED, ("request", "expires_at")),
]


def with_value(fields: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """``fields`` with the field at ``path`` set to ``value`` (left out when ``...``)."""
    head, *rest = path
    copied = dict(fields)
    if rest:
        copied[head] = with_value(copied[head], tuple(rest), value)
    elif value is ...:
        copied.pop(head, None)
    else:
        copied[head] = value
    return copied


@pytest.mark.parametrize("blank", [None, "", " ", "\t\n "])
@pytest.mark.parametrize(
    ("event_type", "path"),
    OPTIONAL_FIELDS,
    ids=[f"{t.value}:{'.'.join(p)}" for t, p in OPTIONAL_FIELDS],
)
def test_an_optional_field_left_blank_is_taken_as_absent(
    event_type: EventType, path: tuple[str, ...], blank: str | None
) -> None:
    """A PDA form sends a field left empty as "" (or null): the event is the one without
    the field, content hash and all, never refused for it (rule 1). Only a value that
    is there and wrong is refused."""
    cid = str(uuid.uuid4())
    fields = WITH_OPTIONALS[event_type]
    left_blank = validate_event(
        event(type=event_type.value, client_event_id=cid, **with_value(fields, path, blank)),
        rules=RULES,
    )
    left_out = validate_event(
        event(type=event_type.value, client_event_id=cid, **with_value(fields, path, ...)),
        rules=RULES,
    )
    filled_in = validate_event(
        event(type=event_type.value, client_event_id=cid, **fields), rules=RULES
    )
    assert left_blank.canonical() == left_out.canonical() != filled_in.canonical()
    assert left_blank.content_hash == left_out.content_hash


@pytest.mark.parametrize(
    "no_fix",
    [
        {"lat": None, "lon": None, "accuracy_m": None},
        {"lat": "", "lon": " ", "accuracy_m": ""},
        {"lat": None, "lon": ""},
        {},
    ],
)
def test_a_location_with_every_field_blank_is_no_location(no_fix: dict[str, Any]) -> None:
    """A PDA without a GPS fix sends its location form empty: the event is the one sent
    without a location, content hash and all (a retry in either form is a duplicate).
    A fix with only one of lat and lon is no fix, and refused."""
    cid = str(uuid.uuid4())
    blank = validate_event(event(client_event_id=cid, location=no_fix), rules=RULES)
    left_out = validate_event(event(client_event_id=cid), rules=RULES)
    assert blank.location is None
    assert blank.content_hash == left_out.content_hash


@pytest.mark.parametrize(
    ("half", "field"),
    [
        ({"lat": 31.2, "lon": None, "accuracy_m": None}, "location.lon"),
        ({"lat": "", "lon": 121.5}, "location.lat"),
        ({"lat": None, "lon": None, "accuracy_m": 8}, "location.lat"),
        ({"lon": 121.5}, "location.lat"),
        ({"lat": 31.2}, "location.lon"),
    ],
)
def test_a_location_with_only_part_of_a_fix_is_refused_naming_what_is_missing(
    half: dict[str, Any], field: str
) -> None:
    """A fix with lat alone was refused as "location.lon must be a number": the PDA's
    developer read that lon was sent wrong, when it was not sent at all."""
    with pytest.raises(EventRejected) as info:
        validate_event(event(location=half), rules=RULES)
    assert (info.value.code, info.value.field) == ("missing_field", field)
    assert info.value.message.startswith(f"{field} is missing")


def test_every_optional_field_of_an_event_type_is_in_the_blank_field_test() -> None:
    """A field of its own an event type is valid without is in ``OPTIONAL_FIELDS``: a new
    optional field is tested left blank too. (The fields inside ``pod``, ``consent`` and
    ``request``, and the common ``location`` and ``shift_id``, are listed by hand.)"""
    optional = set()
    for event_type in EventType:
        fields = {**VALID_FORMS.get(event_type, {}), **WITH_OPTIONALS.get(event_type, {})}
        for name in type_fields(event_type):
            without = event(type=event_type.value, **with_value(fields, (name,), ...))
            try:
                validate_event(without, rules=RULES)
            except EventRejected:
                continue
            optional.add((event_type, (name,)))
    assert optional
    assert optional <= {(event_type, path[:1]) for event_type, path in OPTIONAL_FIELDS}


def test_point_ids_are_upper_case_one_content_and_no_longer_than_stored() -> None:
    """A locker or pickup point spelt in lower case is the same point, and the same
    event content; one that upper case makes longer than a point id may be ("ß" is
    "SS") is refused, naming the field."""
    cid = str(uuid.uuid4())
    lower = validate_event(
        event(client_event_id=cid, type="delivered_to_pickup_point", point_id=" pp-12"),
        rules=RULES,
    )
    upper = validate_event(
        event(client_event_id=cid, type="delivered_to_pickup_point", point_id="PP-12"),
        rules=RULES,
    )
    assert lower.details["point_id"] == "PP-12"
    assert lower.content_hash == upper.content_hash
    consent = {"method": "locker", "point_id": "l-3", "channel": "sms"}
    captured = validate_event(event(type="consent_captured", consent=consent), rules=RULES)
    assert captured.details["consent"]["point_id"] == "L-3"
    long = event(type="delivered_to_locker", locker_id="ß" * 33, compartment="1")
    assert rejection(long) == ("text_too_long", "locker_id")
