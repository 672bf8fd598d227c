"""Rule 3 for the consent requests a PDA's ``consent_requested`` events make while they
still stand (not lapsed on their way: ``tests/sync/test_convergence.py`` pushes a day
whose requests all have): however the PDA splits and orders its asks, the corrections
voiding some and the parcel's delivery in person, each request ends alike, but for
which of two asks of one question is sent, which follows arrival (README,
``CONSENT_REQUESTS_PER_PARCEL``: a message sent cannot be called back)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from models import ConsentRequest
from sync.consent_requests import HANDED_OVER_REASON
from sync.events import EventRules
from sync.ingest import IngestRules, PushBatch, Pusher, ingest
from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy
from tests import factories

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
RULES = IngestRules(
    events=EventRules(tracking=TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS))
)
TRACKING_NO = factories.s10()
METHODS = ["locker", "pickup_point"]  # two questions: each is sent once at a time


@st.composite
def streams(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A PDA at one door: asks (one of two questions, often the same twice), corrections
    voiding an earlier ask, and maybe the recipient taking the parcel in person, all
    within the requests' time to live when they arrive."""
    events: list[dict[str, Any]] = []
    for seq in range(1, draw(st.integers(1, 7)) + 1):
        at = NOW - dt.timedelta(minutes=20) + dt.timedelta(minutes=seq)
        asks = [e for e in events if e["type"] == "consent_requested"]
        kind = draw(st.sampled_from(["ask", "ask", "ask", "void", "void", "delivered"]))
        if kind == "void" and asks:
            target = draw(st.sampled_from(asks))
            fields: dict[str, Any] = {
                "voids_client_event_id": target["client_event_id"],
                "reason": "mis-tap",
            }
            event = factories.event(seq, TRACKING_NO, "correction", occurred_at=at, **fields)
        elif kind == "delivered":
            event = factories.event(
                seq,
                TRACKING_NO,
                "delivered",
                occurred_at=at,
                pod={"recipient_name": "Li Hua", "relation": "self"},
            )
        else:
            method = draw(st.sampled_from(METHODS))
            event = factories.event(
                seq, TRACKING_NO, "consent_requested", occurred_at=at, request={"method": method}
            )
        event["client_event_id"] = str(draw(st.uuids()))
        events.append(event)
    return events


@st.composite
def splits(draw: st.DrawFn, stream: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The stream in any order, cut into pushes."""
    order = draw(st.permutations(stream))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(order) - 1)))))
    bounds = [0, *(c for c in cuts if c < len(order)), len(order)]
    return [order[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if a < b]


def final_requests(engine: Engine, pushes: list[list[dict[str, Any]]]) -> list[Any]:
    """Each request as the pushes leave it: a voided ask's by its event (cancelled); the
    others by their question (status, and the reason when cancelled), whose one pending
    is whichever arrived first."""
    with engine.connect() as connection:
        transaction = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint")
        try:
            station = factories.station(session, code="CRQ")
            courier = factories.user(session, "crq-courier", "courier", station)
            device = factories.device(session, "PDA-CRQ", station)
            factories.parcel(session, station, tracking_no=TRACKING_NO)
            session.commit()
            pusher = Pusher(device.id, station.id, courier.id)
            for events in pushes:
                ingest(
                    session=session,
                    batch=PushBatch(device.id, uuid.uuid4(), NOW, events),
                    pusher=pusher,
                    rules=RULES,
                    received_at=NOW,
                )
                session.commit()
            stream = [e for events in pushes for e in events]
            voided = {
                e["voids_client_event_id"]
                for e in stream
                if e["type"] == "correction"
                and any(
                    a["client_event_id"] == e["voids_client_event_id"] and a["seq"] < e["seq"]
                    for a in stream
                )
            }
            return sorted(
                (
                    ("voided", str(r.client_event_id), r.status.value, None)
                    if str(r.client_event_id) in voided
                    else (
                        "asked",
                        r.method.value,
                        r.status.value,
                        r.status_reason if r.status.value == "cancelled" else None,
                    )
                )
                for r in session.scalars(select(ConsentRequest))
            )
        finally:
            session.close()
            transaction.rollback()


def test_held_back_requests_end_alike_however_the_pda_splits_its_asks(engine: Engine) -> None:
    @settings(
        max_examples=settings.default.max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(data=st.data(), stream=streams())
    def converge(data: st.DataObject, stream: list[dict[str, Any]]) -> None:
        pushes = data.draw(splits(stream))
        reached = final_requests(engine, pushes)
        reference = final_requests(engine, [sorted(stream, key=lambda e: e["seq"])])
        assert reached == reference
        delivered = any(e["type"] == "delivered" for e in stream)
        for kind, _, status, reason in reached:
            if kind == "voided":
                assert status == "cancelled"
            elif delivered:
                assert (status, reason) == ("cancelled", HANDED_OVER_REASON)
        for method in METHODS:  # one question is put once at a time
            statuses = [s for kind, m, s, _ in reached if kind == "asked" and m == method]
            assert statuses.count("pending") == (0 if delivered or not statuses else 1)

    converge()
