"""How often a recipient is asked for consent (SECURITY.md threat 1): each request sent
is a message to their phone, so a courier, or a stolen PDA, asking again and again
for one parcel without a ``client_request_id`` must not flood them. The same question
while one is pending is not sent again; at most ``CONSENT_REQUESTS_PER_PARCEL`` are
sent per parcel in its window. Asking again once the first lapsed or was refused, or
another method or point, stays possible."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from models import ConsentRequest, FeedChange, FeedKind, OutboxMessage, WebhookSubscription
from sync.sign_in_limits import Limit
from tests import factories
from tests.conftest import Auth, World

REQUESTS = "/api/v1/consents/requests"
CONSENTS = "/api/v1/consents"


def ask(client: FlaskClient, headers: dict[str, str], tracking_no: str, **body: Any) -> Any:
    body.setdefault("method", "locker")
    return client.post(REQUESTS, json={"tracking_no": tracking_no, **body}, headers=headers)


@pytest.fixture(autouse=True)
def gateway(session: Session) -> None:
    """The recipients' channel, subscribed to the questions put to them."""
    session.add(
        WebhookSubscription(
            url="http://127.0.0.1:9/hook", topics=["consent.requested"], secret="s" * 43
        )
    )
    session.commit()


def messages(session: Session, tracking_no: str) -> int:
    """``consent.requested`` messages written for the parcel's recipient."""
    return session.scalar(
        select(func.count())
        .select_from(OutboxMessage)
        .where(
            OutboxMessage.topic == "consent.requested",
            OutboxMessage.payload["tracking_no"].as_string() == tracking_no,
        )
    )


def refuse(client: FlaskClient, channel: dict[str, str], request_id: int) -> None:
    refused = client.post(
        CONSENTS,
        json={"request_id": request_id, "channel": "sms", "granted": False},
        headers=channel,
    )
    assert refused.status_code == 200, refused.get_json()


def test_the_same_question_pending_is_not_sent_again(
    client: FlaskClient, auth: Auth, world: World, session: Session
) -> None:
    tracking_no = factories.parcel(session, world.station).tracking_no
    session.commit()
    courier = auth.headers("courier1", "PDA-0001")
    first = ask(client, courier, tracking_no, point_id="L-3", channel="sms")
    assert first.status_code == 201, first.get_json()
    for again in (
        ask(client, courier, tracking_no, point_id="L-3", channel="sms"),
        ask(client, courier, tracking_no, point_id=" l-3 ", channel="sms"),
    ):
        assert again.status_code == 200, again.get_json()
        assert again.get_json()["id"] == first.get_json()["id"]
        assert again.get_json()["status"] == "pending"
    assert messages(session, tracking_no) == 1
    # Another method or another point is another question: sent.
    for other in ({"point_id": "L-4"}, {"method": "pickup_point"}, {"method": "any"}):
        asked = ask(client, courier, tracking_no, **other)
        assert asked.status_code == 201, asked.get_json()
        assert asked.get_json()["id"] != first.get_json()["id"]
    assert messages(session, tracking_no) == 4


def test_the_courier_asks_again_once_the_first_lapsed_or_was_refused(
    client: FlaskClient, auth: Auth, world: World, session: Session
) -> None:
    tracking_no = factories.parcel(session, world.station).tracking_no
    session.commit()
    courier = auth.headers("courier1", "PDA-0001")
    channel = auth.headers("app1")
    first = ask(client, courier, tracking_no).get_json()
    session.execute(
        update(ConsentRequest)
        .where(ConsentRequest.id == first["id"])
        .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    )
    session.commit()
    after_lapse = ask(client, courier, tracking_no)
    assert after_lapse.status_code == 201, after_lapse.get_json()
    second = after_lapse.get_json()
    assert second["id"] != first["id"] and second["status"] == "pending"
    refuse(client, channel, second["id"])
    after_refusal = ask(client, courier, tracking_no)
    assert after_refusal.status_code == 201, after_refusal.get_json()
    assert after_refusal.get_json()["id"] not in (first["id"], second["id"])
    assert messages(session, tracking_no) == 3


def test_a_colleague_is_told_of_the_pending_request_and_the_courier_sees_it_on_any_pda(
    client: FlaskClient, auth: Auth, world: World, session: Session
) -> None:
    """The bound is the recipient's (per parcel), the answer each asker's own: the same
    courier on another PDA of the station gets their pending request; a colleague gets
    a 409 naming it (a colleague's request is not theirs to read), and nothing is sent."""
    tracking_no = factories.parcel(session, world.station).tracking_no
    factories.device(session, "PDA-0003", world.station)
    factories.user(session, "courier3", "courier", world.station)
    session.commit()
    first = ask(client, auth.headers("courier1", "PDA-0001"), tracking_no, point_id="L-3")
    assert first.status_code == 201, first.get_json()
    request_id = first.get_json()["id"]
    other_pda = ask(client, auth.headers("courier1", "PDA-0003"), tracking_no, point_id="L-3")
    assert other_pda.status_code == 200, other_pda.get_json()
    assert other_pda.get_json()["id"] == request_id
    assert other_pda.get_json()["device_id"] == "PDA-0001"  # asked there
    colleague = ask(client, auth.headers("courier3", "PDA-0003"), tracking_no, point_id="L-3")
    assert colleague.status_code == 409, colleague.get_json()
    error = colleague.get_json()
    assert error["code"] == "consent_request_pending"
    assert f"consent request {request_id}" in error["message"]
    assert messages(session, tracking_no) == 1
    # A point of the colleague's own is another question.
    own = ask(client, auth.headers("courier3", "PDA-0003"), tracking_no, point_id="L-9")
    assert own.status_code == 201, own.get_json()


def test_at_most_n_requests_are_sent_per_parcel_in_the_window(
    app_with: Callable[..., Flask], world: World, session: Session
) -> None:
    app = app_with(CONSENT_REQUESTS_PER_PARCEL=Limit.parse("2/3600"))
    client = app.test_client()
    auth = Auth(client)
    flooded, other = (factories.parcel(session, world.station).tracking_no for _ in range(2))
    session.commit()
    courier = auth.headers("courier1", "PDA-0001")
    channel = auth.headers("app1")
    first = ask(client, courier, flooded).get_json()
    refuse(client, channel, first["id"])
    second = ask(client, courier, flooded)  # asked again after the refusal
    assert second.status_code == 201, second.get_json()
    refuse(client, channel, second.get_json()["id"])
    third = ask(client, courier, flooded, method="pickup_point")
    assert third.status_code == 429, third.get_json()
    assert third.get_json()["code"] == "too_many_requests"
    assert 3590 <= int(third.headers["Retry-After"]) <= 3600
    assert "at most 2" in third.get_json()["message"]
    assert messages(session, flooded) == 2
    # The recipient's bound: another parcel, another recipient, is asked.
    assert ask(client, courier, other).status_code == 201
    # The window moves on: once the oldest request is an hour old, one more is sent.
    session.execute(
        update(ConsentRequest)
        .where(ConsentRequest.id == first["id"])
        .values(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1, seconds=1))
    )
    session.commit()
    assert ask(client, courier, flooded, method="pickup_point").status_code == 201
    assert messages(session, flooded) == 3


def test_a_request_that_would_be_unsent_is_not_bounded(
    app_with: Callable[..., Flask], world: World, session: Session
) -> None:
    """An unknown parcel or another station's is answered ``unsent`` however often it is
    asked for (a 409 or 429 would tell the courier it exists: threat 3)."""
    app = app_with(CONSENT_REQUESTS_PER_PARCEL=Limit.parse("1/3600"))
    client = app.test_client()
    theirs = factories.parcel(session, world.other_station).tracking_no
    session.commit()
    courier = Auth(client).headers("courier1", "PDA-0001")
    for tracking_no in (theirs, factories.s10()):
        for _ in range(3):
            asked = ask(client, courier, tracking_no)
            assert asked.status_code == 201, asked.get_json()
            assert asked.get_json()["status"] == "unsent"


def test_the_courier_at_the_door_asks_by_another_channel(
    client: FlaskClient, auth: Auth, world: World, session: Session
) -> None:
    """The recipient did not get the SMS: the courier at the door asks again by a phone
    call. That is a new attempt to reach them, not the same question posed twice: it is
    sent (within the parcel's bound), instead of answering the SMS request for the 30
    minutes it stays pending while the courier waits. Asking by the call again answers
    the call's request; a colleague asking by the call is told of it."""
    tracking_no = factories.parcel(session, world.station).tracking_no
    factories.device(session, "PDA-0003", world.station)
    factories.user(session, "courier3", "courier", world.station)
    session.commit()
    courier = auth.headers("courier1", "PDA-0001")
    by_sms = ask(client, courier, tracking_no, channel="sms")
    assert by_sms.status_code == 201, by_sms.get_json()
    by_call = ask(client, courier, tracking_no, channel="phone_call")
    assert by_call.status_code == 201, by_call.get_json()
    call = by_call.get_json()
    assert call["id"] != by_sms.get_json()["id"] and call["channel"] == "phone_call"
    assert messages(session, tracking_no) == 2
    again = ask(client, courier, tracking_no, channel="phone_call")
    assert again.status_code == 200 and again.get_json()["id"] == call["id"]
    colleague = ask(
        client, auth.headers("courier3", "PDA-0003"), tracking_no, channel="phone_call"
    )
    assert colleague.status_code == 409, colleague.get_json()
    assert colleague.get_json()["code"] == "consent_request_pending"
    assert messages(session, tracking_no) == 2


def test_a_pda_pushing_question_after_question_floods_no_recipient(
    app_with: Callable[..., Flask], world: World, session: Session
) -> None:
    """A stolen PDA, or a PDA app in a loop, pushing ``consent_requested`` events for one
    parcel: each is stored and its request kept (nothing from the field is lost), but
    beyond ``CONSENT_REQUESTS_PER_PARCEL`` sent in the window none reaches the recipient
    (the bound online is not one a push goes round). They are ``unsent``, saying why."""
    app = app_with(CONSENT_REQUESTS_PER_PARCEL=Limit.parse("2/3600"))
    client = app.test_client()
    tracking_no = factories.parcel(session, world.station).tracking_no
    session.commit()
    courier = Auth(client).headers("courier1", "PDA-0001")
    asked_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
    events = [
        factories.event(
            seq, tracking_no, "consent_requested", occurred_at=asked_at, request={"method": m}
        )
        for seq, m in enumerate(["locker", "pickup_point", "any", "locker", "locker"], 1)
    ]
    pushed = client.post(
        "/api/v1/sync/push", json=factories.push_body("PDA-0001", events), headers=courier
    )
    assert pushed.status_code == 200, pushed.get_json()
    requests = session.scalars(
        select(ConsentRequest)
        .where(ConsentRequest.tracking_no == tracking_no)
        .order_by(ConsentRequest.id)
    ).all()
    assert len(requests) == 5  # every event's request is kept
    assert messages(session, tracking_no) == 2
    assert [r.status.value for r in requests] == ["pending"] * 2 + ["unsent"] * 3
    assert "at most 2" in requests[2].status_reason
    # The locker asked again while the first locker request is pending: that one asks.
    assert all(
        f"consent request {requests[0].id} asks the recipient the same" in r.status_reason
        for r in requests[3:]
    )
    # The online door stays shut too: the window is full.
    assert ask(client, courier, tracking_no, method="any").status_code == 429


def test_which_of_a_pdas_requests_are_held_back_does_not_depend_on_their_order(
    app_with: Callable[..., Flask], world: World, session: Session
) -> None:
    """Rule 3 (convergence): a PDA sending the same events in another order (its queue
    reordered, a retry of a lost batch built anew) gets the same requests sent. Those
    within the bound are the earliest by the PDA's seq, the order the courier asked in,
    not the order of the events in the push."""
    app = app_with(CONSENT_REQUESTS_PER_PARCEL=Limit.parse("2/3600"))
    client = app.test_client()
    tracking_no = factories.parcel(session, world.station).tracking_no
    session.commit()
    courier = Auth(client).headers("courier1", "PDA-0001")
    asked_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
    events = [
        factories.event(
            seq, tracking_no, "consent_requested", occurred_at=asked_at, request={"method": m}
        )
        for seq, m in enumerate(["locker", "pickup_point", "any"], 1)
    ]
    pushed = client.post(
        "/api/v1/sync/push",
        json=factories.push_body("PDA-0001", list(reversed(events))),
        headers=courier,
    )
    assert pushed.status_code == 200, pushed.get_json()
    statuses = dict(
        session.execute(
            select(ConsentRequest.method, ConsentRequest.status).where(
                ConsentRequest.tracking_no == tracking_no
            )
        ).all()
    )
    assert {m.value: s.value for m, s in statuses.items()} == {
        "locker": "pending",
        "pickup_point": "pending",
        "any": "unsent",
    }


def test_a_request_voided_after_it_was_sent_still_counts_toward_the_bound(
    app_with: Callable[..., Flask], world: World, session: Session
) -> None:
    """A correction voiding a request already sent cancels it, but the message reached
    the recipient's phone: it keeps its place in the window (else a PDA asking and voiding
    in turn would send question after question). One voided in the push that brings it
    was never sent, and takes none."""
    app = app_with(CONSENT_REQUESTS_PER_PARCEL=Limit.parse("2/3600"))
    client = app.test_client()
    tracking_no = factories.parcel(session, world.station).tracking_no
    session.commit()
    courier = Auth(client).headers("courier1", "PDA-0001")
    at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)

    def asked(seq: int, method: str) -> dict[str, Any]:
        return factories.event(
            seq, tracking_no, "consent_requested", occurred_at=at, request={"method": method}
        )

    def voiding(seq: int, target: dict[str, Any]) -> dict[str, Any]:
        return factories.event(
            seq,
            tracking_no,
            "correction",
            occurred_at=at,
            voids_client_event_id=target["client_event_id"],
            reason="asked by mistake",
        )

    def push(events: list[dict[str, Any]]) -> None:
        pushed = client.post(
            "/api/v1/sync/push", json=factories.push_body("PDA-0001", events), headers=courier
        )
        assert pushed.status_code == 200, pushed.get_json()

    at_once = asked(1, "locker")
    push([at_once, voiding(2, at_once)])  # voided as it arrives: never sent
    sent_then_voided = asked(3, "pickup_point")
    push([sent_then_voided])
    push([voiding(4, sent_then_voided), asked(5, "any"), asked(6, "locker")])
    statuses = [
        s.value
        for s in session.scalars(
            select(ConsentRequest.status)
            .where(ConsentRequest.tracking_no == tracking_no)
            .order_by(ConsentRequest.id)
        )
    ]
    assert statuses == ["cancelled", "cancelled", "pending", "unsent"]
    assert messages(session, tracking_no) == 2


@pytest.mark.parametrize("online_first", [True, False])
def test_the_same_question_asked_online_and_on_the_pda_is_sent_once(
    client: FlaskClient, auth: Auth, world: World, session: Session, online_first: bool
) -> None:
    """The courier asks online, then the PDA pushes the ``consent_requested`` it recorded
    offline for the same question (parcel, method, point, channel), or the other way
    round: the recipient gets one message, and the event's request is the one pending
    (as the online door answers the courier's own pending request, 200), whichever
    arrived first. A correction voiding the event cancels that request in both orders."""
    tracking_no = factories.parcel(session, world.station).tracking_no
    session.commit()
    courier = auth.headers("courier1", "PDA-0001")
    question = {"method": "locker", "point_id": "L-3", "channel": "sms"}
    at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
    offline = factories.event(
        1, tracking_no, "consent_requested", occurred_at=at, request=question
    )

    def push(events: list[dict[str, Any]]) -> None:
        pushed = client.post(
            "/api/v1/sync/push", json=factories.push_body("PDA-0001", events), headers=courier
        )
        assert pushed.status_code == 200, pushed.get_json()
        assert [r["status"] for r in pushed.get_json()["results"]] == ["applied"] * len(events)

    if online_first:
        online = ask(client, courier, tracking_no, **question)
        assert online.status_code == 201, online.get_json()
        push([offline])
    else:
        push([offline])
        online = ask(client, courier, tracking_no, **question)
        assert online.status_code == 200, online.get_json()
    assert messages(session, tracking_no) == 1
    requests = session.scalars(
        select(ConsentRequest).where(ConsentRequest.tracking_no == tracking_no)
    ).all()
    assert [(r.id, str(r.client_event_id), r.status.value) for r in requests] == [
        (online.get_json()["id"], offline["client_event_id"], "pending")
    ]
    push(
        [
            factories.event(
                2,
                tracking_no,
                "correction",
                occurred_at=at,
                voids_client_event_id=offline["client_event_id"],
                reason="asked by mistake",
            )
        ]
    )
    session.expire_all()
    assert session.get(ConsentRequest, online.get_json()["id"]).status.value == "cancelled"


def test_the_bound_is_the_recipients_a_colleague_shares_it_and_still_gets_consent(
    app_with: Callable[..., Flask], world: World, session: Session
) -> None:
    """SECURITY.md threat 1: the bound is per parcel (the recipient's phone), not per
    courier, so a courier who used it up leaves a colleague now holding the parcel a
    429 until the window moves on (a bound per courier would let every courier of the
    station send its own). The colleague is not kept from a consent: one captured on
    their PDA (a phone call) is never bounded, and authorizes their drop."""
    app = app_with(CONSENT_REQUESTS_PER_PARCEL=Limit.parse("2/3600"))
    client = app.test_client()
    auth = Auth(client)
    tracking_no = factories.parcel(session, world.station).tracking_no
    factories.device(session, "PDA-0003", world.station)
    factories.user(session, "courier3", "courier", world.station)
    session.commit()
    first = auth.headers("courier1", "PDA-0001")
    for method in ("locker", "pickup_point"):
        assert ask(client, first, tracking_no, method=method).status_code == 201
    colleague = auth.headers("courier3", "PDA-0003")
    blocked = ask(client, colleague, tracking_no, method="any")
    assert blocked.status_code == 429, blocked.get_json()
    at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
    captured = factories.event(
        1,
        tracking_no,
        "consent_captured",
        occurred_at=at,
        consent={"method": "locker", "channel": "phone_call"},
    )
    pushed = client.post(
        "/api/v1/sync/push", json=factories.push_body("PDA-0003", [captured]), headers=colleague
    )
    assert pushed.status_code == 200, pushed.get_json()
    assert pushed.get_json()["results"][0]["status"] == "applied"
    listed = client.get(
        CONSENTS,
        query_string={"covering": tracking_no, "active": "true"},
        headers=auth.headers("app1"),
    )
    assert listed.status_code == 200, listed.get_json()
    assert [c["channel"] for c in listed.get_json()["items"]] == ["phone_call"]
    assert messages(session, tracking_no) == 2


@pytest.mark.parametrize("asker", ["same_push", "later_push", "colleague"])
def test_the_same_question_from_pdas_events_is_sent_once(
    client: FlaskClient, auth: Auth, world: World, session: Session, asker: str
) -> None:
    """Two ``consent_requested`` events asking the same question (parcel, method, point,
    channel) while the first's request is pending, from the same PDA (the courier tapped
    twice, in one push or two) or a colleague's PDA: the recipient gets one message, as
    the online door answers such a question with the pending request. The second event
    is stored (rule 1) and its request kept ``unsent``, naming the request that asks."""
    tracking_no = factories.parcel(session, world.station).tracking_no
    factories.device(session, "PDA-0003", world.station)
    factories.user(session, "courier3", "courier", world.station)
    session.commit()
    question = {"method": "locker", "point_id": "L-3", "channel": "sms"}
    at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)

    def asked(seq: int) -> dict[str, Any]:
        return factories.event(
            seq, tracking_no, "consent_requested", occurred_at=at, request=question
        )

    def push(device: str, user: str, events: list[dict[str, Any]]) -> None:
        pushed = client.post(
            "/api/v1/sync/push",
            json=factories.push_body(device, events),
            headers=auth.headers(user, device),
        )
        assert pushed.status_code == 200, pushed.get_json()
        assert [r["status"] for r in pushed.get_json()["results"]] == ["applied"] * len(events)

    if asker == "same_push":
        push("PDA-0001", "courier1", [asked(1), asked(2)])
    elif asker == "later_push":
        push("PDA-0001", "courier1", [asked(1)])
        push("PDA-0001", "courier1", [asked(2)])
    else:
        push("PDA-0001", "courier1", [asked(1)])
        push("PDA-0003", "courier3", [asked(1)])
    assert messages(session, tracking_no) == 1
    first, second = session.scalars(
        select(ConsentRequest)
        .where(ConsentRequest.tracking_no == tracking_no)
        .order_by(ConsentRequest.id)
    ).all()
    assert (first.status.value, second.status.value) == ("pending", "unsent")
    assert f"consent request {first.id} asks the recipient the same" in second.status_reason


@pytest.mark.parametrize("pushes", [[[0], [1], [2]], [[0, 1], [2]], [[0, 1, 2]], [[0], [1, 2]]])
def test_a_request_held_back_behind_one_voided_since_is_sent_however_pushed(
    client: FlaskClient, auth: Auth, world: World, session: Session, pushes: list[list[int]]
) -> None:
    """The PDA asks twice the same question, then voids the first ask (a mis-tap): its
    courier still asks, so the recipient is asked once the first is cancelled, whether
    the correction came in the same push (the first never sent) or later (the second,
    held back behind the first, is sent then). Rule 3: each event's request ends alike
    however the PDA split its stream."""
    tracking_no = factories.parcel(session, world.station).tracking_no
    session.commit()
    courier = auth.headers("courier1", "PDA-0001")
    question = {"method": "locker", "channel": "sms"}
    at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
    first = factories.event(1, tracking_no, "consent_requested", occurred_at=at, request=question)
    again = factories.event(2, tracking_no, "consent_requested", occurred_at=at, request=question)
    voiding = factories.event(
        3,
        tracking_no,
        "correction",
        occurred_at=at,
        voids_client_event_id=first["client_event_id"],
        reason="tapped twice",
    )
    stream = [first, again, voiding]
    for batch in pushes:
        pushed = client.post(
            "/api/v1/sync/push",
            json=factories.push_body("PDA-0001", [stream[i] for i in batch]),
            headers=courier,
        )
        assert pushed.status_code == 200, pushed.get_json()
    session.expire_all()
    statuses = {
        str(r.client_event_id): (r.status.value, r.status_reason)
        for r in session.scalars(
            select(ConsentRequest).where(ConsentRequest.tracking_no == tracking_no)
        )
    }
    assert statuses == {
        first["client_event_id"]: ("cancelled", "voided by a correction from the PDA"),
        again["client_event_id"]: ("pending", None),
    }
    # Sent once the first was cancelled (twice in all when the first was sent before).
    assert messages(session, tracking_no) == (1 if 2 in pushes[0] else 2)
    # A PDA that read the second ``unsent`` hears it was sent after all (its pull feed).
    heard = session.scalars(
        select(FeedChange.courier_id).where(
            FeedChange.kind == FeedKind.CONSENT_REQUEST, FeedChange.tracking_no == tracking_no
        )
    ).all()
    held_first = pushes in ([[0], [1], [2]], [[0, 1], [2]])
    assert heard == ([world.courier.id] if held_first else [])


@pytest.mark.parametrize("split", [True, False])
def test_an_online_request_the_pdas_voided_event_asked_too_ends_alike_however_pushed(
    client: FlaskClient, auth: Auth, world: World, session: Session, split: bool
) -> None:
    """The courier asks online; their PDA then pushes the ``consent_requested`` it
    recorded for the same question and the correction voiding it, in two pushes or in
    one. The event's request is the online one in both (rule 3: how the PDA split its
    stream changes nothing): the correction cancels it, the recipient is asked once, and
    no second request is made."""
    tracking_no = factories.parcel(session, world.station).tracking_no
    session.commit()
    courier = auth.headers("courier1", "PDA-0001")
    question = {"method": "locker", "point_id": "L-3", "channel": "sms"}
    at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
    offline = factories.event(
        1, tracking_no, "consent_requested", occurred_at=at, request=question
    )
    correction = factories.event(
        2,
        tracking_no,
        "correction",
        occurred_at=at,
        voids_client_event_id=offline["client_event_id"],
        reason="asked by mistake",
    )

    def push(events: list[dict[str, Any]]) -> None:
        pushed = client.post(
            "/api/v1/sync/push", json=factories.push_body("PDA-0001", events), headers=courier
        )
        assert pushed.status_code == 200, pushed.get_json()

    online = ask(client, courier, tracking_no, **question)
    assert online.status_code == 201, online.get_json()
    if split:
        push([offline])
        push([correction])
    else:
        push([offline, correction])
    session.expire_all()
    requests = session.scalars(
        select(ConsentRequest).where(ConsentRequest.tracking_no == tracking_no)
    ).all()
    assert [(r.id, str(r.client_event_id), r.status.value) for r in requests] == [
        (online.get_json()["id"], offline["client_event_id"], "cancelled")
    ]
    assert messages(session, tracking_no) == 1


@pytest.mark.parametrize("pushes", [[[0], [1]], [[0, 1]], [[1], [0]]])
def test_no_question_stands_for_a_parcel_delivered_in_person_however_pushed(
    client: FlaskClient, auth: Auth, world: World, session: Session, pushes: list[list[int]]
) -> None:
    """The courier asked at the door (nobody home), then the recipient came back and
    took the parcel in person: the recipient's phone kept asking them to agree to a
    locker for a parcel in their hands, or was asked it after the delivery was known.
    The delivery cancels the question (``consent.request_cancelled``, with why), and a
    question arriving with or after it is cancelled unsent: the same end whichever the
    PDA pushed first (rule 3). The online door does not send it either."""
    session.add(
        WebhookSubscription(
            url="http://127.0.0.1:9/hook",
            topics=["consent.request_cancelled"],
            secret="s" * 43,
        )
    )
    tracking_no = factories.parcel(session, world.station).tracking_no
    session.commit()
    courier = auth.headers("courier1", "PDA-0001")
    at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    asked = factories.event(
        1, tracking_no, "consent_requested", occurred_at=at, request={"method": "locker"}
    )
    delivered = factories.event(
        2,
        tracking_no,
        "delivered",
        occurred_at=at + dt.timedelta(minutes=5),
        pod={"recipient_name": "Li Hua", "relation": "self"},
    )
    stream = [asked, delivered]
    for batch in pushes:
        pushed = client.post(
            "/api/v1/sync/push",
            json=factories.push_body("PDA-0001", [stream[i] for i in batch]),
            headers=courier,
        )
        assert pushed.status_code == 200, pushed.get_json()
    session.expire_all()
    [request] = session.scalars(
        select(ConsentRequest).where(ConsentRequest.tracking_no == tracking_no)
    ).all()
    assert (request.status.value, request.status_reason) == (
        "cancelled",
        "the parcel was handed over to the recipient: nothing to ask",
    )
    sent = messages(session, tracking_no)
    cancellations = session.scalars(
        select(OutboxMessage.payload).where(OutboxMessage.topic == "consent.request_cancelled")
    ).all()
    if pushes[0] == [0]:  # asked before the delivery arrived: sent, then called back
        assert sent == 1
        assert [c["reason"] for c in cancellations] == [request.status_reason]
    else:
        assert (sent, cancellations) == (0, [])
    online = ask(client, courier, tracking_no, method="pickup_point")
    assert online.status_code == 201, online.get_json()
    assert online.get_json()["status"] == "cancelled"
    assert messages(session, tracking_no) == sent


def _push_split(
    client: FlaskClient, headers: dict[str, str], stream: list[Any], pushes: list[list[int]]
) -> None:
    for batch in pushes:
        pushed = client.post(
            "/api/v1/sync/push",
            json=factories.push_body("PDA-0001", [stream[i] for i in batch]),
            headers=headers,
        )
        assert pushed.status_code == 200, pushed.get_json()


def _requests_by_event(session: Session, tracking_no: str) -> dict[str, tuple[str, str | None]]:
    session.expire_all()
    return {
        str(r.client_event_id): (r.status.value, r.status_reason)
        for r in session.scalars(
            select(ConsentRequest).where(ConsentRequest.tracking_no == tracking_no)
        )
    }


@pytest.mark.parametrize(
    ("pushes", "sent"),
    [
        ([[0, 1], [2, 3]], 1),
        ([[0, 1], [3], [2]], 1),
        ([[0, 1, 2, 3]], 0),
        # The correction in a push of its own, before the delivery was known: the second
        # was sent then (a message sent cannot be called back).
        ([[0, 1], [2], [3]], 2),
    ],
)
def test_a_request_held_back_ends_with_the_delivery_however_pushed(
    client: FlaskClient,
    auth: Auth,
    world: World,
    session: Session,
    pushes: list[list[int]],
    sent: int,
) -> None:
    """The PDA asks twice the same question (the second held back), voids the first
    ask, and the recipient takes the parcel in person. The second ask ends cancelled,
    the parcel handed over, whichever the PDA pushed first (rule 3): it stayed
    ``unsent`` behind the first when the delivery came before the correction, and when
    both came in one push it was sent to the recipient (the correction, judged before
    the delivery was projected, sent it) and cancelled again a moment later."""
    tracking_no = factories.parcel(session, world.station).tracking_no
    session.commit()
    courier = auth.headers("courier1", "PDA-0001")
    question = {"method": "locker", "channel": "sms"}
    at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2)
    first = factories.event(1, tracking_no, "consent_requested", occurred_at=at, request=question)
    again = factories.event(2, tracking_no, "consent_requested", occurred_at=at, request=question)
    voiding = factories.event(
        3,
        tracking_no,
        "correction",
        occurred_at=at,
        voids_client_event_id=first["client_event_id"],
        reason="tapped twice",
    )
    delivered = factories.event(
        4,
        tracking_no,
        "delivered",
        occurred_at=at + dt.timedelta(minutes=1),
        pod={"recipient_name": "Li Hua", "relation": "self"},
    )
    _push_split(client, courier, [first, again, voiding, delivered], pushes)
    requests = _requests_by_event(session, tracking_no)
    assert requests[again["client_event_id"]] == (
        "cancelled",
        "the parcel was handed over to the recipient: nothing to ask",
    )
    assert requests[first["client_event_id"]][0] == "cancelled"
    assert messages(session, tracking_no) == sent


@pytest.mark.parametrize("pushes", [[[0], [1], [2]], [[0, 1], [2]], [[0, 1, 2]], [[1], [0], [2]]])
def test_a_request_held_back_then_voided_ends_cancelled_however_pushed(
    client: FlaskClient, auth: Auth, world: World, session: Session, pushes: list[list[int]]
) -> None:
    """The PDA asks twice the same question, then voids the second ask (a double tap).
    The second ends cancelled, voided, as when the correction came in its push, whichever
    was held back (rule 3); it stayed ``unsent``, its reason naming the first as pending,
    when it was held back before its correction came."""
    tracking_no = factories.parcel(session, world.station).tracking_no
    session.commit()
    courier = auth.headers("courier1", "PDA-0001")
    question = {"method": "locker", "channel": "sms"}
    at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
    first = factories.event(1, tracking_no, "consent_requested", occurred_at=at, request=question)
    again = factories.event(2, tracking_no, "consent_requested", occurred_at=at, request=question)
    voiding = factories.event(
        3,
        tracking_no,
        "correction",
        occurred_at=at,
        voids_client_event_id=again["client_event_id"],
        reason="tapped twice",
    )
    _push_split(client, courier, [first, again, voiding], pushes)
    assert _requests_by_event(session, tracking_no) == {
        first["client_event_id"]: ("pending", None),
        again["client_event_id"]: ("cancelled", "voided by a correction from the PDA"),
    }
    # Twice only when the second arrived first (sent) and the first was held behind it.
    assert messages(session, tracking_no) == (2 if pushes[0] == [1] else 1)


@pytest.mark.parametrize(
    ("pushes", "status"), [([[0, 1, 2]], "pending"), ([[0], [1], [2]], "cancelled")]
)
def test_a_delivery_voided_after_it_ended_the_question_does_not_bring_it_back(
    client: FlaskClient,
    auth: Auth,
    world: World,
    session: Session,
    pushes: list[list[int]],
    status: str,
) -> None:
    """README's bounded exception to rule 3: the courier asked, scanned the parcel
    delivered by mistake and voided that scan. Voided in the push that brought it, the
    delivery never ended the question; voided later, the question it cancelled (the
    recipient was told) stays cancelled, and the courier asks again."""
    tracking_no = factories.parcel(session, world.station).tracking_no
    session.commit()
    courier = auth.headers("courier1", "PDA-0001")
    at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2)
    asked = factories.event(
        1, tracking_no, "consent_requested", occurred_at=at, request={"method": "locker"}
    )
    delivered = factories.event(
        2, tracking_no, "delivered", occurred_at=at, pod={"recipient_name": "Li Hua"}
    )
    voiding = factories.event(
        3,
        tracking_no,
        "correction",
        occurred_at=at,
        voids_client_event_id=delivered["client_event_id"],
        reason="wrong parcel scanned",
    )
    _push_split(client, courier, [asked, delivered, voiding], pushes)
    assert [s for s, _ in _requests_by_event(session, tracking_no).values()] == [status]
    assert ask(client, courier, tracking_no).status_code == (200 if status == "pending" else 201)


@pytest.mark.parametrize("pushes", [[[0, 1, 2, 3]], [[0, 1], [2], [3]], [[0, 1, 2], [3]]])
def test_a_correction_putting_the_parcel_back_in_its_recipients_hands_ends_the_question(
    client: FlaskClient, auth: Auth, world: World, session: Session, pushes: list[list[int]]
) -> None:
    """The recipient took the parcel in person; the courier then mis-tapped a failed
    attempt on it, asked for a locker, and voided the failed attempt. Pushed whole, the
    question is cancelled as it is made (the parcel is delivered); pushed before the
    correction, it was sent and stayed pending after the correction put the parcel back
    in the recipient's hands (only a push bringing the delivery scan looked). It ends
    cancelled either way (rule 3)."""
    tracking_no = factories.parcel(session, world.station).tracking_no
    session.commit()
    courier = auth.headers("courier1", "PDA-0001")
    at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    delivered = factories.event(
        1, tracking_no, "delivered", occurred_at=at, pod={"recipient_name": "Li Hua"}
    )
    failed = factories.event(
        2,
        tracking_no,
        "delivery_attempt_failed",
        occurred_at=at + dt.timedelta(minutes=1),
        reason="recipient_absent",
        action="notice_left",
    )
    asked = factories.event(
        3,
        tracking_no,
        "consent_requested",
        occurred_at=at + dt.timedelta(minutes=2),
        request={"method": "locker"},
    )
    voiding = factories.event(
        4,
        tracking_no,
        "correction",
        occurred_at=at + dt.timedelta(minutes=3),
        voids_client_event_id=failed["client_event_id"],
        reason="wrong parcel",
    )
    _push_split(client, courier, [delivered, failed, asked, voiding], pushes)
    assert list(_requests_by_event(session, tracking_no).values()) == [
        ("cancelled", "the parcel was handed over to the recipient: nothing to ask")
    ]


def test_a_request_held_back_counts_toward_the_bound_from_when_it_was_sent(
    app_with: Callable[..., Flask], world: World, session: Session
) -> None:
    """The PDA asked the same question twice (the second held back behind the first);
    both reached the server an hour ago. The courier voids the first ask now: the second
    is sent now, a message to the recipient's phone this minute. It kept its arrival time
    for the window, which forgot it at once: two more questions went out within the
    minute, three messages in the hour where the bound allows two. The window counts it
    from when it was sent."""
    app = app_with(CONSENT_REQUESTS_PER_PARCEL=Limit.parse("2/3600"))
    client = app.test_client()
    auth = Auth(client)
    tracking_no = factories.parcel(session, world.station).tracking_no
    session.commit()
    courier = auth.headers("courier1", "PDA-0001")
    at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    question = {
        "method": "locker",
        "channel": "sms",
        "expires_at": (at + dt.timedelta(hours=3)).isoformat(),
    }
    first = factories.event(1, tracking_no, "consent_requested", occurred_at=at, request=question)
    again = factories.event(2, tracking_no, "consent_requested", occurred_at=at, request=question)
    voiding = factories.event(
        3,
        tracking_no,
        "correction",
        occurred_at=at,
        voids_client_event_id=first["client_event_id"],
        reason="tapped twice",
    )

    def push(events: list[dict[str, Any]]) -> None:
        pushed = client.post(
            "/api/v1/sync/push", json=factories.push_body("PDA-0001", events), headers=courier
        )
        assert pushed.status_code == 200, pushed.get_json()

    push([first, again])
    # Both reached the server an hour and a minute ago (the first sent then).
    session.execute(
        update(ConsentRequest)
        .where(ConsentRequest.tracking_no == tracking_no)
        .values(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1, minutes=1))
    )
    session.commit()
    push([voiding])
    session.expire_all()
    held = session.scalar(
        select(ConsentRequest).where(
            ConsentRequest.client_event_id == uuid.UUID(again["client_event_id"])
        )
    )
    assert held is not None and held.status.value == "pending"  # sent now
    assert messages(session, tracking_no) == 2
    # In the last hour: the second ask, sent now. One more is within the bound...
    assert ask(client, courier, tracking_no, method="pickup_point").status_code == 201
    # ... and the next is not, until the second ask is an hour old.
    beyond = ask(client, courier, tracking_no, method="any")
    assert beyond.status_code == 429, beyond.get_json()
    assert 3590 <= int(beyond.headers["Retry-After"]) <= 3600
    assert messages(session, tracking_no) == 3
