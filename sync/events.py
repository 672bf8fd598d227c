"""Validation of one scan event from a PDA, on its own (PDA sync contract v1).

An event is a JSON object. Each is judged alone: a bad one is rejected with a
stable code and the field at fault, and its siblings go on. Validation is pure
(no database), so the same payload gets the same answer every time it is sent.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

from models import EventType
from sync.errors import DomainError
from sync.tracking import TrackingNumberPolicy

MAX_SEQ = 2**31 - 1
# The code events dated more than ``EventRules.max_age`` before their push's sent_at
# were once rejected with. They are kept now (``clock_jump``); quarantine rows may
# still carry it (``sync.ingest``).
OUT_OF_WINDOW = "occurred_at_out_of_range"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")

FAILED_ATTEMPT_REASONS = frozenset(
    {
        "recipient_absent",
        "address_not_found",
        "address_inaccessible",
        "refused",
        "business_closed",
        "recipient_moved",
        "other",
    }
)
FAILED_ATTEMPT_ACTIONS = frozenset(
    {"notice_left", "retry_planned", "moved_to_pickup_point", "return_to_sender"}
)
EXCEPTION_REASONS = frozenset({"damaged", "lost", "other"})
CONSENT_METHODS = frozenset({"locker", "pickup_point", "any"})
CONSENT_CHANNELS = frozenset({"phone_call", "in_person", "sms", "app"})
REQUEST_CHANNELS = frozenset({"sms", "app", "phone_call"})  # how the recipient is asked
DELIVERY_TYPES = frozenset(
    {EventType.DELIVERED, EventType.DELIVERED_TO_LOCKER, EventType.DELIVERED_TO_PICKUP_POINT}
)
COMMON_FIELDS = frozenset(
    {"client_event_id", "seq", "type", "tracking_no", "occurred_at", "location", "shift_id"}
)


class EventRejected(DomainError):
    """The event is malformed; it goes to quarantine with this code and field."""

    code = "invalid_event"


@dataclass(frozen=True)
class EventRules:
    tracking: TrackingNumberPolicy
    # The engine flags ``clock_jump`` on a push holding events dated more than max_age
    # before its sent_at, or later than sent_at (beyond future_tolerance), both on the
    # device's own clock, so a skewed clock does not matter here. Such events are kept,
    # whatever their date: the clock was set forward between the scan and the push (a
    # typo in the year), or back (a PDA whose battery died comes back in the year 2000).
    max_age: dt.timedelta = dt.timedelta(days=30)
    future_tolerance: dt.timedelta = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Location:
    lat: float
    lon: float
    accuracy_m: float | None = None


@dataclass(frozen=True)
class ValidEvent:
    """An event that passed validation, normalized (tracking number, UTC time)."""

    client_event_id: uuid.UUID
    seq: int
    type: EventType
    tracking_no: str
    occurred_at_device: dt.datetime
    location: Location | None
    shift_id: int | None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def voids_client_event_id(self) -> uuid.UUID | None:
        raw = self.details.get("voids_client_event_id")
        return uuid.UUID(raw) if raw else None

    def canonical(self) -> dict[str, Any]:
        """The event's content in one spelling: what "the same content" compares."""
        return {
            "client_event_id": str(self.client_event_id),
            "seq": self.seq,
            "type": self.type.value,
            "tracking_no": self.tracking_no,
            "occurred_at": self.occurred_at_device.isoformat(timespec="microseconds"),
            "location": None
            if self.location is None
            else [self.location.lat, self.location.lon, self.location.accuracy_m],
            "shift_id": self.shift_id,
            "details": self.details,
        }

    @cached_property
    def content_hash(self) -> str:
        return sha256_json(self.canonical())


# How deep one event may nest: ours go three levels (the event, its proof of delivery,
# a list in it). A deeper one is quarantined on its own (``too_deep``), stored cut to
# this depth: its siblings are applied, and no JSON encoder nears its recursion limit.
MAX_EVENT_DEPTH = 16
CUT = "(nested deeper than the limit: cut)"


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects or arrays more than ``limit`` levels. The walk
    recurses at most ``limit + 1`` calls deep, however deep ``value`` is (it may be as
    deep as a JSON parser allows)."""
    if isinstance(value, dict):
        children: Any = value.values()
    elif isinstance(value, list):
        children = value
    else:
        return False
    if limit <= 0:
        return True
    for child in children:
        if isinstance(child, (dict, list)) and nested_deeper_than(child, limit - 1):
            return True
    return False


def within_depth(raw: Any, limit: int = MAX_EVENT_DEPTH) -> Any:
    """``raw`` with what nests deeper than ``limit`` levels replaced by ``CUT``: what is
    stored and hashed of a raw event too deep to keep whole."""
    if not isinstance(raw, dict | list):
        return raw
    if limit <= 0:
        return CUT
    if isinstance(raw, dict):
        return {key: within_depth(value, limit - 1) for key, value in raw.items()}
    return [within_depth(value, limit - 1) for value in raw]


# No circularity check: what is hashed was parsed from JSON (it cannot refer to itself)
# and is at most MAX_EVENT_DEPTH deep; the check costs a tenth of the encoding.
_CANONICAL_JSON = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, check_circular=False
)


def sha256_json(value: Any) -> str:
    """sha256 of ``value`` as canonical JSON (sorted keys, no spaces, ASCII)."""
    return hashlib.sha256(_CANONICAL_JSON.encode(value).encode("ascii")).hexdigest()


def parse_time(raw: Any, *, field: str) -> dt.datetime:
    """An ISO 8601 time with an offset, as an aware UTC datetime."""
    if not isinstance(raw, str) or len(raw) > 64:
        raise EventRejected(
            "must be an ISO 8601 time with an offset", code="invalid_time", field=field
        )
    try:
        value = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise EventRejected(
            f"{raw!r} is not an ISO 8601 time", code="invalid_time", field=field
        ) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise EventRejected(
            "the time needs an offset (e.g. +08:00 or Z): without one it is ambiguous",
            code="time_without_offset",
            field=field,
        )
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        raise EventRejected(
            f"{raw!r} is out of range", code="time_out_of_range", field=field
        ) from None


def validate_event(raw: Any, *, rules: EventRules) -> ValidEvent:
    """Check one raw event against the contract; raise ``EventRejected`` otherwise.

    The event alone: whether its date fits its push's ``sent_at`` is no reason to
    refuse a scan that happened (rule 1), only to flag the PDA's clock.
    """
    if not isinstance(raw, Mapping):
        raise EventRejected("an event must be a JSON object", code="not_an_object")
    event_type = _event_type(raw.get("type"))
    spec = _TYPE_FIELDS[event_type]
    if not raw.keys() <= _ALLOWED_FIELDS[event_type]:
        unknown = sorted(set(raw) - _ALLOWED_FIELDS[event_type])
        raise EventRejected(
            f"unknown field {unknown[0]!r} for an event of type {event_type.value}",
            code="unknown_field",
            field=storable_name(str(unknown[0]))[:64],
        )
    client_event_id = _uuid(raw.get("client_event_id"), "client_event_id")
    seq = _seq(raw.get("seq"))
    try:
        tracking_no = rules.tracking.validate(_text(raw.get("tracking_no"), "tracking_no", 40))
    except EventRejected:
        raise
    except DomainError as error:
        raise EventRejected(error.message, code=error.code, field="tracking_no") from None
    occurred_at = parse_time(raw.get("occurred_at"), field="occurred_at")
    details = {
        name: parse(raw.get(name), name)
        for name, (required, parse) in spec.items()
        if required or not absent(raw.get(name))
    }
    for name in ("consent", "request"):
        asked = details.get(name)
        if asked is not None and asked["method"] == "any" and "point_id" in asked:
            raise EventRejected(
                "a specific point needs method locker or pickup_point",
                code="point_without_method",
                field=f"{name}.point_id",
            )
    if event_type == EventType.CORRECTION and details["voids_client_event_id"] == str(
        client_event_id
    ):
        raise EventRejected(
            "a correction cannot void itself",
            code="correction_voids_itself",
            field="voids_client_event_id",
        )
    return ValidEvent(
        client_event_id=client_event_id,
        seq=seq,
        type=event_type,
        tracking_no=tracking_no,
        occurred_at_device=occurred_at,
        location=_location(raw.get("location")),
        shift_id=_optional_id(raw.get("shift_id"), "shift_id"),
        details=details,
    )


def storable_name(name: str) -> str:
    """A field name from the PDA as the receipt and the quarantine can hold it: NULs
    and lone surrogates (which PostgreSQL's jsonb refuses) written as ``\\uXXXX``."""
    return _UNSTORABLE.sub(lambda match: f"\\u{ord(match.group()):04x}", name)


@dataclass(frozen=True)
class PushClock:
    """A push's two clocks: ``sent_at`` on the PDA's, ``received_at`` on ours.

    An event dated within the push's window (at most ``max_age`` before ``sent_at``,
    at most ``future_tolerance`` after it) was recorded on the clock that sent it: its
    corrected time is its device time moved by the push's offset. One dated outside
    it was recorded before the clock jumped (set forward by a typo in the year, back
    to its factory date when the battery died): the push's offset says nothing of the
    clock that recorded it, so its device time stands. Either is kept between the
    push's arrival (nothing happened after it reached us) and ``OLDEST`` before it (a
    clock saying the year 1 is wrong, not the scan that old; and a time in range is
    one every rule can compute with).
    """

    OLDEST: ClassVar[dt.timedelta] = dt.timedelta(days=366)

    sent_at: dt.datetime
    received_at: dt.datetime
    rules: EventRules

    @property
    def offset(self) -> dt.timedelta:
        return self.sent_at - self.received_at

    def ahead(self, device_time: dt.datetime) -> bool:
        """Dated after the push was sent: the clock went back in between."""
        return device_time > shifted(self.sent_at, self.rules.future_tolerance)

    def behind(self, device_time: dt.datetime) -> bool:
        """Dated long before the push was sent: the clock went forward in between (or
        the PDA kept the event that long)."""
        return device_time < shifted(self.sent_at, -self.rules.max_age)

    def corrected(self, device_time: dt.datetime) -> dt.datetime:
        jumped = self.ahead(device_time) or self.behind(device_time)
        moved = device_time if jumped else shifted(device_time, -self.offset)
        return max(min(moved, self.received_at), self.received_at - self.OLDEST)


def shifted(moment: dt.datetime, delta: dt.timedelta) -> dt.datetime:
    """``moment + delta``, saturating at the ends of the calendar (a PDA whose clock
    says year 1 must get an answer, not an overflow)."""
    try:
        return moment + delta
    except OverflowError:
        extreme = dt.datetime.max if delta > dt.timedelta(0) else dt.datetime.min
        return extreme.replace(tzinfo=dt.UTC)


# -- field parsers --------------------------------------------------------------------------


def absent(raw: Any) -> bool:
    """Whether an optional field's value stands for nothing: null, or a blank string
    (empty or whitespace only: what a PDA form sends for a field left empty). Either
    way the field is left out, as if not sent (rule 1: an optional field left blank is
    no reason to refuse what the courier recorded). A required field left blank is
    refused by its parser, naming it."""
    return raw is None or (isinstance(raw, str) and not raw.strip())


def _event_type(raw: Any) -> EventType:
    if raw is None:
        raise EventRejected("type is required", code="missing_field", field="type")
    try:
        return EventType(raw)
    except ValueError:
        known = ", ".join(t.value for t in EventType)
        shown = repr(raw)[:60]
        raise EventRejected(
            f"unknown event type {shown}; one of: {known}", code="unknown_event_type", field="type"
        ) from None


def _uuid(raw: Any, name: str) -> uuid.UUID:
    if isinstance(raw, str) and len(raw) <= 64:
        try:
            return uuid.UUID(raw)
        except ValueError:
            pass
    raise EventRejected(f"{name} must be a UUID", code="invalid_uuid", field=name)


def _uuid_text(raw: Any, name: str) -> str:
    return str(_uuid(raw, name))


def whole_number(raw: Any) -> int | None:
    """``raw`` as a number from 1 to ``MAX_SEQ``, or None.

    A whole number written ``5.0`` counts: JSON has one number type, and some PDA
    serializers (Gson over a map, for one) write every number with a fraction.
    Refusing it would leave the event's seq unheld, so its PDA could never prune
    past it. ``true`` is no number, nor is ``5.5``.
    """
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= MAX_SEQ:
        return None
    return raw


_SEQ_AS_TEXT = re.compile(r"\s*([0-9]{1,10})(?:\.0*)?\s*")


def readable_seq(raw: Any) -> int | None:
    """The seq a rejected event was given, as far as it can be read: a whole number
    (``whole_number``), or one written as text (``"7"``, ``" 7 "``, ``"7.0"``: a PDA
    serializer that quotes numbers). Such an event is still rejected ``invalid_seq``
    (the contract's seq is a number), but the server holds it at that seq, in
    quarantine, as every rejected event with a seq: its PDA's seqs show no gap the PDA
    can never fill, and its shift's balance does not stay provisional for it. Anything
    else (``null``, ``"seven"``, ``5.5``, ``true``) names no seq: None."""
    seq = whole_number(raw)
    if seq is not None or not isinstance(raw, str):
        return seq
    written = _SEQ_AS_TEXT.fullmatch(raw)
    return whole_number(int(written.group(1))) if written else None


def _seq(raw: Any) -> int:
    seq = whole_number(raw)
    if seq is None:
        raise EventRejected(
            f"seq must be an integer from 1 to {MAX_SEQ}", code="invalid_seq", field="seq"
        )
    return seq


def _optional_id(raw: Any, name: str) -> int | None:
    if absent(raw):
        return None
    number = whole_number(raw)
    if number is None:
        raise EventRejected(f"{name} must be a positive integer", code="invalid_id", field=name)
    return number


def _text(raw: Any, name: str, max_length: int) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise EventRejected(f"{name} must be a non-empty string", code="missing_text", field=name)
    if len(raw) > max_length:
        raise EventRejected(
            f"{name} is longer than {max_length} characters", code="text_too_long", field=name
        )
    if _UNSTORABLE.search(raw):
        raise EventRejected(
            f"{name} contains a NUL character or an unpaired surrogate",
            code="unstorable_text",
            field=name,
        )
    return raw.strip()


def _text_parser(max_length: int) -> Callable[[Any, str], str]:
    return lambda raw, name: _text(raw, name, max_length)


def canonical_point(point: str) -> str:
    """A locker's or pickup point's id as stored and compared: without surrounding
    spaces, upper-case. A recipient's app, a PDA's keyboard and a locker's label need
    not agree on case (``pp-12`` is the point ``PP-12``); a consent for a point must
    authorize a drop there whichever spelt it."""
    return point.strip().upper()


def _point_parser(max_length: int) -> Callable[[Any, str], str]:
    def parse(raw: Any, name: str) -> str:
        point = canonical_point(_text(raw, name, max_length))
        if len(point) > max_length:  # "ß" is "SS": upper case may be longer
            raise EventRejected(
                f"{name} is longer than {max_length} characters in upper case",
                code="text_too_long",
                field=name,
            )
        return point

    return parse


def _choice(choices: frozenset[str]) -> Callable[[Any, str], str]:
    def parse(raw: Any, name: str) -> str:
        if not isinstance(raw, str) or raw not in choices:
            raise EventRejected(
                f"{name} must be one of: {', '.join(sorted(choices))}",
                code="invalid_choice",
                field=name,
            )
        return raw

    return parse


def _number(raw: Any, name: str, low: float, high: float) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise EventRejected(f"{name} must be a number", code="invalid_number", field=name)
    try:
        value = float(raw)
    except OverflowError:  # an integer with hundreds of digits
        value = math.inf
    if not math.isfinite(value) or not low <= value <= high:
        raise EventRejected(
            f"{name} must be a number from {low:g} to {high:g}",
            code="invalid_number",
            field=name,
        )
    return value


def _location(raw: Any) -> Location | None:
    """The event's GPS fix; none if it sent none, or a form with every field blank (a
    PDA without a fix): ``absent`` as a whole, so it hashes as the event sent without
    one. A fix with only one of lat and lon is refused."""
    if absent(raw):
        return None
    if not isinstance(raw, Mapping):
        raise EventRejected(
            "location must be an object {lat, lon, accuracy_m}",
            code="invalid_location",
            field="location",
        )
    unknown = sorted(set(raw) - {"lat", "lon", "accuracy_m"})
    if unknown:
        raise EventRejected(
            f"unknown field {str(unknown[0])[:40]!r} in location",
            code="unknown_field",
            field="location",
        )
    if all(absent(raw.get(key)) for key in ("lat", "lon", "accuracy_m")):
        return None
    for key in ("lat", "lon"):
        if absent(raw.get(key)):
            raise EventRejected(
                f"location.{key} is missing: a fix has both lat and lon (or send no location)",
                code="missing_field",
                field=f"location.{key}",
            )
    accuracy = raw.get("accuracy_m")
    return Location(
        lat=_number(raw.get("lat"), "location.lat", -90, 90),
        lon=_number(raw.get("lon"), "location.lon", -180, 180),
        accuracy_m=None if absent(accuracy) else _number(accuracy, "location.accuracy_m", 0, 1e6),
    )


def _object(
    fields: dict[str, tuple[bool, Callable[[Any, str], Any]]],
) -> Callable[[Any, str], dict[str, Any]]:
    """A nested object with known fields, each (required, parser); an optional one that
    is ``absent`` is left out."""

    def parse(raw: Any, name: str) -> dict[str, Any]:
        if not isinstance(raw, Mapping):
            raise EventRejected(f"{name} must be an object", code="invalid_object", field=name)
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise EventRejected(
                f"unknown field {str(unknown[0])[:40]!r} in {name}",
                code="unknown_field",
                field=name,
            )
        parsed = {}
        for key, (required, parse_field) in fields.items():
            value = raw.get(key)
            if value is None and required:
                raise EventRejected(
                    f"{name}.{key} is required", code="missing_field", field=f"{name}.{key}"
                )
            if not required and absent(value):
                continue
            parsed[key] = parse_field(value, f"{name}.{key}")
        return parsed

    return parse


def _sha256(raw: Any, name: str) -> str:
    if not isinstance(raw, str) or not SHA256_HEX.fullmatch(raw):
        raise EventRejected(
            f"{name} must be a lowercase hex sha256 digest", code="invalid_digest", field=name
        )
    return raw


def _required(parse: Callable[[Any, str], Any]) -> tuple[bool, Callable[[Any, str], Any]]:
    def parse_required(raw: Any, name: str) -> Any:
        if raw is None:
            raise EventRejected(f"{name} is required", code="missing_field", field=name)
        return parse(raw, name)

    return True, parse_required


def _optional(parse: Callable[[Any, str], Any]) -> tuple[bool, Callable[[Any, str], Any]]:
    return False, parse


# The objects an event may carry, each field (required, parser): kept as specs so that
# the API's documentation of the push can be checked against them (``object_fields``).
_POD_FIELDS: dict[str, tuple[bool, Callable[[Any, str], Any]]] = {
    "recipient_name": (False, _text_parser(200)),
    "relation": (False, _text_parser(64)),
    "signature_sha256": (False, _sha256),
    "photo_sha256": (False, _sha256),
    "pickup_code": (False, _text_parser(32)),
}
_CONSENT_FIELDS: dict[str, tuple[bool, Callable[[Any, str], Any]]] = {
    "method": (True, _choice(CONSENT_METHODS)),
    "point_id": (False, _point_parser(64)),
    "channel": (True, _choice(CONSENT_CHANNELS)),
    "evidence": (False, _text_parser(500)),
}
# A consent asked for at the door: sent to the recipient, answered through the API.
_CONSENT_REQUEST_FIELDS: dict[str, tuple[bool, Callable[[Any, str], Any]]] = {
    "method": (True, _choice(CONSENT_METHODS)),
    "point_id": (False, _point_parser(64)),
    "channel": (False, _choice(REQUEST_CHANNELS)),
    "expires_at": (False, lambda raw, name: parse_time(raw, field=name).isoformat()),
}
POD = _object(_POD_FIELDS)
CONSENT = _object(_CONSENT_FIELDS)
CONSENT_REQUEST = _object(_CONSENT_REQUEST_FIELDS)


def object_fields() -> dict[str, dict[str, bool]]:
    """The objects an event's type-specific fields may carry, by the field that holds
    them: each of their fields and whether it is required."""
    return {
        "pod": {name: required for name, (required, _) in _POD_FIELDS.items()},
        "consent": {name: required for name, (required, _) in _CONSENT_FIELDS.items()},
        "request": {name: required for name, (required, _) in _CONSENT_REQUEST_FIELDS.items()},
    }


# Type-specific fields: name -> (required, parser). Parsed values go to ``details``.
_TYPE_FIELDS: dict[EventType, dict[str, tuple[bool, Callable[[Any, str], Any]]]] = {
    EventType.CHECKED_OUT: {},
    EventType.OUT_FOR_DELIVERY: {},
    EventType.DELIVERY_ATTEMPT_FAILED: {
        "reason": _required(_choice(FAILED_ATTEMPT_REASONS)),
        "action": _required(_choice(FAILED_ATTEMPT_ACTIONS)),
    },
    EventType.DELIVERED: {"pod": _optional(POD)},
    EventType.DELIVERED_TO_LOCKER: {
        "locker_id": _required(_point_parser(64)),
        "compartment": _required(_text_parser(32)),
        "pod": _optional(POD),
    },
    EventType.DELIVERED_TO_PICKUP_POINT: {
        "point_id": _required(_point_parser(64)),
        "pod": _optional(POD),
    },
    EventType.RETURNED_TO_STATION: {},
    EventType.COLLECTED_FROM_LOCKER: {
        "locker_id": _optional(_point_parser(64)),
        "compartment": _optional(_text_parser(32)),
    },
    EventType.EXCEPTION: {"reason": _required(_choice(EXCEPTION_REASONS))},
    EventType.CONSENT_CAPTURED: {"consent": _required(CONSENT)},
    EventType.CONSENT_REQUESTED: {"request": _required(CONSENT_REQUEST)},
    EventType.CORRECTION: {
        "voids_client_event_id": _required(_uuid_text),
        "reason": _required(_text_parser(500)),
    },
}


def type_fields(event_type: EventType) -> frozenset[str]:
    """The type-specific fields an event of ``event_type`` may carry."""
    return frozenset(_TYPE_FIELDS[event_type])


# The fields an event of each type may carry (what ``validate_event`` checks first).
_ALLOWED_FIELDS = {
    event_type: COMMON_FIELDS | frozenset(spec) for event_type, spec in _TYPE_FIELDS.items()
}


def referenced_blobs(details: Mapping[str, Any]) -> list[str]:
    """The proof images an event's POD points at (they may arrive after the event)."""
    pod = details.get("pod") or {}
    return [pod[key] for key in ("signature_sha256", "photo_sha256") if key in pod]
