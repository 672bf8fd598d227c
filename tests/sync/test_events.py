"""Each event is judged on its own, and the answer names a stable code and the field."""

import datetime as dt
import uuid
from typing import Any

import pytest

from models import EventType
from sync.events import EventRejected, EventRules, PushClock, validate_event
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


@pytest.mark.parametrize("event_type", list(EventType))
def test_every_event_type_has_a_valid_form(event_type: EventType) -> None:
    extra: dict[str, Any] = {
        EventType.DELIVERY_ATTEMPT_FAILED: {"reason": "recipient_absent", "action": "notice_left"},
        EventType.DELIVERED: {"pod": {"recipient_name": "Li", "relation": "self"}},
        EventType.DELIVERED_TO_LOCKER: {"locker_id": "L-7", "compartment": "12"},
        EventType.DELIVERED_TO_PICKUP_POINT: {"point_id": "PP-3"},
        EventType.EXCEPTION: {"reason": "damaged"},
        EventType.CONSENT_CAPTURED: {"consent": {"method": "any", "channel": "in_person"}},
        EventType.CONSENT_REQUESTED: {"request": {"method": "locker", "point_id": "L-7"}},
        EventType.CORRECTION: {"voids_client_event_id": str(uuid.uuid4()), "reason": "mis-tap"},
    }.get(event_type, {})
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
