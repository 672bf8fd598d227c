"""The PDA sync endpoints under fuzzed input (hypothesis), through HTTP.

A push mixes well-formed events (``valid_events``: every event type, with its
optional fields, some left blank, unicode text, GPS, POD, consents) with corrupted ones
(``corruptions``): wrong types, huge strings, nesting, NUL and lone surrogates,
NaN and Infinity literals, times before year 1 or after 9999 in UTC or without an offset,
negative and enormous seqs, missing and unknown fields, unknown event types,
events that are not objects, and duplicate JSON keys. Whatever comes in:

* the answer is never a 5xx;
* it is either a clear 4xx with the project's error body (``code``, ``status``,
  ``message``), and then nothing of the push is stored, or a 200 whose results hold
  one result per event, at its index, ``applied``, ``duplicate`` or ``rejected`` (with
  an error code and message);
* no lost sibling (DESIGN.md, rule 1): every well-formed event is ``applied``, and
  is stored exactly once, as sent; every corrupted one is ``rejected`` and its raw
  payload is in the quarantine;
* sending the same push again (rule 2) answers the same receipt and stores nothing.

Pushes that are malformed as a whole (bytes that are not UTF-8, truncated JSON,
nesting beyond the parser's limit, a broken envelope) must be a 4xx storing
nothing. Pulls with fuzzed cursors and limits, and image uploads of mutated PNG,
JPEG and WebP files, must answer a 2xx or a 4xx.

Reproducible: ``derandomize=True`` and no example database; ids and seqs are drawn
from counters at run time, so that every example (and every shrink) is a new push.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import itertools
import json
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from sqlalchemy import Connection, func, select
from sqlalchemy.orm import Session

from models import ConsentRequest, EventType, QuarantinedEvent, ScanEvent, SyncBatch
from sync.events import (
    CONSENT_CHANNELS,
    CONSENT_METHODS,
    EXCEPTION_REASONS,
    FAILED_ATTEMPT_ACTIONS,
    FAILED_ATTEMPT_REASONS,
    REQUEST_CHANNELS,
    sha256_json,
    within_depth,
)
from tests import factories
from tests.conftest import Auth, World

PUSH = "/api/v1/sync/push"
DEVICE = "PDA-0001"
FUZZ = settings(
    max_examples=100,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TRACKING = [factories.s10() for _ in range(4)]  # two taken in at ST1, two unknown
NOW = dt.datetime.now(dt.UTC)


# -- bodies with duplicate keys ---------------------------------------------------------------


@dataclass(frozen=True)
class Pairs:
    """A JSON object written from its (key, value) pairs, duplicates and all."""

    items: tuple[tuple[str, Any], ...]


def encode(value: Any) -> str:
    """JSON text as a PDA might send it: NaN and Infinity as the bare literals Python
    writes, lone surrogates escaped, ``Pairs`` with their duplicate keys."""
    if isinstance(value, Pairs):
        return "{" + ", ".join(f"{encode(k)}: {encode(v)}" for k, v in value.items) + "}"
    if isinstance(value, dict):
        return encode(Pairs(tuple(value.items())))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(encode(v) for v in value) + "]"
    return json.dumps(value)


# -- well-formed events -----------------------------------------------------------------------

TEXT = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1, max_size=20
).filter(str.strip)
DIGEST = st.binary(min_size=1, max_size=8).map(lambda b: hashlib.sha256(b).hexdigest())
# What a PDA sends for an optional field left empty: taken as absent, never refused.
BLANK = st.sampled_from(["", " ", "\t\n"])
OPTIONAL_TEXT = st.one_of(TEXT, BLANK)
LOCATION = st.fixed_dictionaries(
    {"lat": st.floats(-90, 90), "lon": st.floats(-180, 180)},
    optional={"accuracy_m": st.floats(0, 1_000_000)},
)
POD = st.fixed_dictionaries(
    {},
    optional={
        "recipient_name": OPTIONAL_TEXT,
        "relation": OPTIONAL_TEXT,
        "signature_sha256": st.one_of(DIGEST, BLANK),
        "photo_sha256": st.one_of(DIGEST, BLANK),
        "pickup_code": OPTIONAL_TEXT,
    },
)


def _asked(methods: frozenset[str], channels: frozenset[str], **extra: Any) -> Any:
    method = st.sampled_from(sorted(methods))
    return method.flatmap(
        lambda m: st.fixed_dictionaries(
            {"method": st.just(m), "channel": st.sampled_from(sorted(channels))},
            optional={**({} if m == "any" else {"point_id": OPTIONAL_TEXT}), **extra},
        )
    )


def _moment(low: dt.datetime, high: dt.datetime) -> Any:
    return st.datetimes(low.replace(tzinfo=None), high.replace(tzinfo=None)).map(
        lambda t: t.replace(tzinfo=dt.UTC).isoformat()
    )


TYPE_FIELDS: dict[str, dict[str, Any]] = {
    "checked_out": {},
    "out_for_delivery": {},
    "returned_to_station": {},
    "delivery_attempt_failed": {
        "reason": st.sampled_from(sorted(FAILED_ATTEMPT_REASONS)),
        "action": st.sampled_from(sorted(FAILED_ATTEMPT_ACTIONS)),
    },
    "delivered": {},
    "delivered_to_locker": {"locker_id": TEXT, "compartment": TEXT},
    "delivered_to_pickup_point": {"point_id": TEXT},
    "collected_from_locker": {},
    "exception": {"reason": st.sampled_from(sorted(EXCEPTION_REASONS))},
    "consent_captured": {
        "consent": _asked(CONSENT_METHODS, CONSENT_CHANNELS, evidence=OPTIONAL_TEXT)
    },
    "consent_requested": {
        "request": _asked(
            CONSENT_METHODS,
            REQUEST_CHANNELS,
            expires_at=st.one_of(_moment(dt.datetime(1, 1, 2), dt.datetime(9999, 12, 30)), BLANK),
        )
    },
    "correction": {"voids_client_event_id": st.uuids().map(str), "reason": TEXT},
}
OPTIONAL_FIELDS: dict[str, dict[str, Any]] = {
    "delivered": {"pod": POD},
    "delivered_to_locker": {"pod": POD},
    "delivered_to_pickup_point": {"pod": POD},
    "collected_from_locker": {"locker_id": OPTIONAL_TEXT, "compartment": OPTIONAL_TEXT},
}
assert set(TYPE_FIELDS) == {t.value for t in EventType}


@st.composite
def valid_events(draw: st.DrawFn) -> dict[str, Any]:
    """An event as a PDA sends it, without ``client_event_id`` and ``seq`` (the test
    numbers them when it runs)."""
    kind = draw(st.sampled_from(sorted(TYPE_FIELDS)))
    minutes_ago = draw(st.integers(0, 60 * 24 * 25))
    event = {
        "type": kind,
        "tracking_no": draw(st.sampled_from(TRACKING)),
        "occurred_at": (NOW - dt.timedelta(minutes=minutes_ago)).isoformat(),
    }
    event |= draw(st.fixed_dictionaries(TYPE_FIELDS[kind], optional=OPTIONAL_FIELDS.get(kind)))
    event |= draw(st.fixed_dictionaries({}, optional={"location": LOCATION}))
    return event


# -- corrupted events -------------------------------------------------------------------------

# Values no field of an event accepts (None is "absent" for optional fields: not here).
JUNK = st.one_of(
    st.booleans(),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.integers(max_value=0),
    st.integers(min_value=2**31),
    st.lists(st.integers(), max_size=3),
    st.recursive(st.lists(st.none(), max_size=1), lambda inner: st.lists(inner, max_size=2)),
)
BAD_TIMES = st.sampled_from(
    [
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
        "9999-12-31T23:59:59-01:00",  # after year 9999 in UTC
        "2026-11-23T10:00:00",  # no offset
        "noon",
        "",
        "2026-13-45T99:99:99Z",
    ]
)
BAD_SEQS = st.sampled_from([0, -1, -(2**63), 2**31, 2**63, 10**40, 1.5, "7", True, math.nan])
UNSTORABLE = st.sampled_from(["\x00", "\ud800", "ok\udfffok", "RR\x00"])
COMMON = ("client_event_id", "seq", "type", "tracking_no", "occurred_at")
KNOWN = (
    {*COMMON, "location", "shift_id"}
    | {f for d in TYPE_FIELDS.values() for f in d}
    | {f for d in OPTIONAL_FIELDS.values() for f in d}
)


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


CORRUPTIONS = (
    "junk",
    "missing",
    "unknown_field",
    "huge_string",
    "unknown_type",
    "bad_time",
    "bad_seq",
    "not_an_object",
    "nested",
    "unstorable",
    "duplicate_key",
)


@st.composite
def corruptions(draw: st.DrawFn, event: dict[str, Any], how: str) -> Any:
    """``event`` made malformed the ``how`` way; a ``Pairs`` or a plain value."""
    bad = dict(event)
    if how == "junk":
        field = draw(st.sampled_from(sorted(set(bad) | {"location", "shift_id"})))
        bad[field] = draw(JUNK)
    elif how == "missing":
        del bad[draw(st.sampled_from(COMMON))]
    elif how == "unknown_field":
        name = draw(
            st.one_of(TEXT, st.text(max_size=3), UNSTORABLE).filter(lambda n: n not in KNOWN)
        )
        bad[name] = draw(st.one_of(st.none(), TEXT, JUNK))
    elif how == "huge_string":
        field = draw(st.sampled_from(["client_event_id", "tracking_no", "occurred_at", "type"]))
        bad[field] = draw(st.sampled_from(["9", "x", "é", "日"])) * draw(
            st.sampled_from([65, 1000, 100_000])
        )
    elif how == "unknown_type":
        bad["type"] = draw(TEXT.filter(lambda t: t not in TYPE_FIELDS))
    elif how == "bad_time":
        bad["occurred_at"] = draw(BAD_TIMES)
    elif how == "bad_seq":
        bad["seq"] = draw(BAD_SEQS)
    elif how == "not_an_object":
        return draw(st.one_of(st.none(), st.integers(), TEXT, st.lists(st.integers())))
    elif how == "nested":
        field = draw(st.sampled_from(["location", "tracking_no", "seq", "pod", "consent"]))
        bad[field] = nested(draw(st.integers(2, 400)))  # past MAX_EVENT_DEPTH too
    elif how == "unstorable":
        field = draw(st.sampled_from(["tracking_no", "occurred_at", "client_event_id"]))
        bad[field] = draw(UNSTORABLE)
    else:  # a good value then a bad one for the same key: JSON parsers keep the last
        field = draw(st.sampled_from(COMMON))
        return Pairs((*bad.items(), (field, draw(JUNK))))
    return bad


# -- running a push ---------------------------------------------------------------------------


@dataclass
class Pda:
    client: FlaskClient
    headers: dict[str, str]
    connection: Connection
    numbers: Iterator[int]

    def number(self, event: dict[str, Any]) -> dict[str, Any]:
        n = next(self.numbers)
        return {"client_event_id": str(uuid.UUID(int=n)), "seq": n, **event}

    def post(self, body: str | bytes) -> Any:
        return self.client.post(
            PUSH, data=body, content_type="application/json", headers=self.headers
        )

    def envelope(self, events: list[Any], **fields: Any) -> dict[str, Any]:
        batch = str(uuid.UUID(int=next(self.numbers)))
        return (
            {"device_id": DEVICE, "batch_id": batch, "sent_at": NOW.isoformat()}
            | fields
            | {"events": events}
        )

    def held(self, ids: list[str]) -> dict[str, list[tuple[int, str]]]:
        """client event id -> the (seq, type) of each stored copy."""
        rows = self.connection.execute(
            select(ScanEvent.client_event_id, ScanEvent.seq, ScanEvent.type).where(
                ScanEvent.device_id == DEVICE,
                ScanEvent.client_event_id.in_([uuid.UUID(i) for i in ids]),
            )
        )
        found: dict[str, list[tuple[int, str]]] = {}
        for client_event_id, seq, kind in rows:
            found.setdefault(str(client_event_id), []).append((seq, str(kind.value)))
        return found

    def quarantined(self, hashes: list[str]) -> set[str]:
        rows = self.connection.execute(
            select(QuarantinedEvent.payload_hash).where(
                QuarantinedEvent.device_id == DEVICE, QuarantinedEvent.payload_hash.in_(hashes)
            )
        )
        return {row.payload_hash for row in rows}

    def counts(self) -> tuple[int, int, int]:
        return tuple(  # type: ignore[return-value]
            self.connection.execute(select(func.count()).select_from(table)).scalar_one()
            for table in (ScanEvent, QuarantinedEvent, SyncBatch)
        )


@pytest.fixture
def pda(
    client: FlaskClient, auth: Auth, world: World, session: Session, connection: Connection
) -> Pda:
    for tracking_no in TRACKING[:2]:
        factories.parcel(session, world.station, tracking_no=tracking_no)
    session.commit()
    return Pda(client, auth.headers("courier1", DEVICE), connection, itertools.count(1))


def assert_error_body(response: Any) -> None:
    assert 400 <= response.status_code < 500, response.get_data(as_text=True)[:500]
    body = response.get_json()
    assert body["status"] == response.status_code, body
    assert isinstance(body["code"], str) and isinstance(body["message"], str), body


def assert_nothing_stored(pda: Pda, before: tuple[int, int, int]) -> None:
    assert pda.counts() == before


# -- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", CORRUPTIONS)
@settings(FUZZ, max_examples=30)
@given(
    data=st.data(),
    siblings=st.lists(valid_events(), min_size=1, max_size=5),
    bad_count=st.integers(1, 3),
)
def test_bad_events_are_quarantined_and_their_siblings_applied(
    pda: Pda, how: str, data: st.DataObject, siblings: list[dict[str, Any]], bad_count: int
) -> None:
    good = [pda.number(event) for event in siblings]
    bad = [
        data.draw(corruptions(pda.number(data.draw(valid_events())), how), label="corrupted")
        for _ in range(bad_count)
    ]
    events: list[Any] = list(good)
    for event in bad:
        events.insert(data.draw(st.integers(0, len(events)), label="at"), event)
    body = encode(pda.envelope(events))
    response = pda.post(body)
    assert response.status_code == 200, response.get_data(as_text=True)[:2000]
    receipt = response.get_json()

    results = receipt["results"]
    assert [r["index"] for r in results] == list(range(len(events)))
    for event, result in zip(events, results, strict=True):
        if any(event is g for g in good):
            assert result["status"] == "applied", (event, result)
            assert result["client_event_id"] == event["client_event_id"]
        else:
            assert result["status"] == "rejected", (event, result)
            assert result["error"]["code"] and result["error"]["message"]

    # Every valid event stored once, as sent; every rejected one in the quarantine.
    held = pda.held([e["client_event_id"] for e in good])
    for event in good:
        assert held.get(event["client_event_id"]) == [(event["seq"], event["type"])], event
    parsed = json.loads(body)["events"]  # what the server read (duplicate keys: the last)
    rejected = [  # an event nested too deep is kept cut to MAX_EVENT_DEPTH
        sha256_json(within_depth(parsed[r["index"]]))
        if r["error"]["code"] == "too_deep"
        else sha256_json(parsed[r["index"]])
        for r in results
        if r["status"] == "rejected"
    ]
    assert pda.quarantined(rejected) == set(rejected)

    # The same push again: the same receipt, and nothing more stored.
    before = pda.counts()
    again = pda.post(body)
    assert again.status_code == 200 and again.get_json() == receipt
    assert pda.counts() == before


EARLIEST = dt.datetime(1, 1, 1, tzinfo=dt.UTC)
LATEST = dt.datetime(9999, 12, 31, 23, 59, tzinfo=dt.UTC)


@FUZZ
@given(
    data=st.data(),
    sent_at=st.datetimes(dt.datetime(1, 1, 1), dt.datetime(9999, 12, 31, 23, 59)).map(
        lambda t: t.replace(tzinfo=dt.UTC)
    ),
    siblings=st.lists(valid_events(), min_size=1, max_size=4),
)
def test_a_pda_clock_anywhere_from_year_1_to_9999_still_gets_its_events_applied(
    pda: Pda, data: st.DataObject, sent_at: dt.datetime, siblings: list[dict[str, Any]]
) -> None:
    """Events dated any time from year 1 to 9999, whatever their push's sent_at (the
    clock jumped between the scan and the push, or is centuries off): well-formed, so
    stored (and the clock flagged), never refused."""
    room = int((sent_at - EARLIEST).total_seconds() // 60)
    after = int((LATEST - sent_at).total_seconds() // 60)
    good = []
    for event in siblings:
        before = dt.timedelta(minutes=data.draw(st.integers(-after, room)))
        good.append(pda.number(event | {"occurred_at": (sent_at - before).isoformat()}))
    response = pda.post(encode(pda.envelope(good, sent_at=sent_at.isoformat())))
    assert response.status_code == 200, response.get_data(as_text=True)[:2000]
    assert [r["status"] for r in response.get_json()["results"]] == ["applied"] * len(good)
    held = pda.held([e["client_event_id"] for e in good])
    assert all(len(held.get(e["client_event_id"], [])) == 1 for e in good), held


@pytest.mark.parametrize(
    ("sent_at", "expires_at"),
    [
        ("0001-01-02T00:00:00+00:00", "9999-12-30T00:00:00+00:00"),
        ("9999-12-30T00:00:00+00:00", "0001-01-02T00:00:00+00:00"),
    ],
)
def test_a_consent_request_expiry_centuries_off_lapses_after_the_ttl(
    pda: Pda, sent_at: str, expires_at: str
) -> None:
    """Found by the test above: the request's expiry, moved by the PDA's clock offset,
    left the calendar (a 500). It is out of range, so the request lapses after the TTL."""
    event = pda.number(
        {
            "type": "consent_requested",
            "tracking_no": TRACKING[0],
            "occurred_at": sent_at,
            "request": {"method": "locker", "channel": "sms", "expires_at": expires_at},
        }
    )
    response = pda.post(encode(pda.envelope([event], sent_at=sent_at)))
    assert response.status_code == 200, response.get_data(as_text=True)[:2000]
    assert [r["status"] for r in response.get_json()["results"]] == ["applied"]
    expiry = pda.connection.execute(
        select(ConsentRequest.expires_at, ConsentRequest.requested_at).where(
            ConsentRequest.event_id.in_(
                select(ScanEvent.id).where(
                    ScanEvent.client_event_id == uuid.UUID(event["client_event_id"])
                )
            )
        )
    ).one()
    ttl = dt.timedelta(minutes=pda.client.application.config["CONSENT_REQUEST_TTL_MINUTES"])
    assert expiry.expires_at - expiry.requested_at == ttl


@FUZZ
@given(data=st.data(), siblings=st.lists(valid_events(), min_size=1, max_size=3))
def test_a_push_malformed_as_a_whole_is_a_clear_4xx_that_stores_nothing(
    pda: Pda, data: st.DataObject, siblings: list[dict[str, Any]]
) -> None:
    good = [pda.number(event) for event in siblings]
    how = data.draw(
        st.sampled_from(
            ["invalid_utf8", "truncated", "too_deep", "junk_envelope", "missing", "not_object"]
        )
    )
    envelope = pda.envelope(good)
    # Where to break the text: a share of its length (the length itself depends on the
    # numbers the counters gave, and what is drawn must not).
    share = data.draw(st.integers(0, 999), label="where, in thousandths")
    if how == "invalid_utf8":
        text = encode(envelope).encode()
        at = len(text) * share // 1000
        bad = data.draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"]))
        body: str | bytes = text[:at] + bad + text[at:]
    elif how == "truncated":
        text = encode(envelope)
        body = text[: len(text) * share // 1000]
    elif how == "too_deep":
        depth = data.draw(st.integers(100_000, 300_000))  # past what the parser can read
        envelope["events"].append("DEEP")
        body = encode(envelope).replace('"DEEP"', "[" * depth + "]" * depth)
    elif how == "junk_envelope":
        field = data.draw(st.sampled_from(["device_id", "batch_id", "sent_at", "events"]))
        envelope[field] = data.draw(st.one_of(JUNK, BAD_TIMES, st.none(), TEXT))
        body = encode(envelope)
    elif how == "missing":
        del envelope[data.draw(st.sampled_from(["device_id", "batch_id", "sent_at", "events"]))]
        body = encode(envelope)
    else:
        body = encode(data.draw(st.one_of(st.none(), st.integers(), TEXT, st.just(good))))
    before = pda.counts()
    response = pda.post(body)
    if response.status_code == 200:
        # A junk value can be a valid one after all (a text sent_at, a UUID-like batch_id).
        assert how == "junk_envelope", response.get_json()
        return
    assert_error_body(response)
    assert_nothing_stored(pda, before)


CURSORS = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"(s\.)?[0-9]{1,25}\.[0-9]{1,25}(\.[0-9]{1,25})?", fullmatch=True),
    st.sampled_from(["0.0", "s.0.0.0", f"{2**63}.1", f"1.{2**63 - 1}", "s.1.1", "١٢.٣"]),
)


@FUZZ
@given(
    cursor=st.one_of(st.none(), CURSORS),
    limit=st.one_of(st.none(), st.integers(-5, 600), st.sampled_from(["x", "", "1e3", "5.5"])),
    wait=st.one_of(st.none(), st.sampled_from([0, -1, 3601, 10**20, "x", ""])),
)
def test_a_pull_with_any_cursor_and_limit_answers_200_or_a_clear_4xx(
    pda: Pda, cursor: str | None, limit: Any, wait: Any
) -> None:
    query = {
        k: v for k, v in {"cursor": cursor, "limit": limit, "wait": wait}.items() if v is not None
    }
    response = pda.client.get("/api/v1/sync/pull", query_string=query, headers=pda.headers)
    if response.status_code != 200:
        assert_error_body(response)
        return
    page = response.get_json()
    assert isinstance(page["changes"], list) and isinstance(page["next_cursor"], str)


def _image(kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (9, 7), (200, 30, 90)).save(buffer, format=kind)
    return buffer.getvalue()


IMAGES = {kind: _image(kind) for kind in ("PNG", "JPEG", "WEBP")}


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(IMAGES[draw(st.sampled_from(sorted(IMAGES)))])
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = draw(st.integers(0, len(data) - 1))
        if how == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "cut":
            del data[at:]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at : at + draw(st.integers(1, 16))]
        if not data:
            data = bytearray(b"\x00")
    return bytes(data)


@FUZZ
@given(image=mutated_images())
def test_an_upload_of_damaged_image_bytes_is_stored_or_refused_never_a_500(
    pda: Pda, image: bytes
) -> None:
    digest = hashlib.sha256(image).hexdigest()
    response = pda.client.put(
        f"/api/v1/blobs/{digest}", data=image, content_type="image/png", headers=pda.headers
    )
    if response.status_code not in (200, 201):
        assert_error_body(response)
        assert response.status_code == 422, response.get_json()
