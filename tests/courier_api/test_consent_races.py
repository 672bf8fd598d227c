"""Consents recorded or revoked through the API while a manager decides on the flag they
settle, with real commits (racing on PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import Engine, select, text

from courier_api.extensions import db
from models import ConsentRequestStatus, Flag, OutboxMessage, Station, WebhookSubscription
from sync import consents as consents_module
from tests import factories
from tests.conftest import Auth
from tests.threads import race_requests

CONSENTS = "/api/v1/consents"
FLAGS = "/api/v1/flags"


def _dropped_without_consent(app: Flask, rounds: int) -> tuple[dict[str, dict[str, str]], list]:
    """``rounds`` express parcels each left in a locker with no consent: the headers of
    the integration, the manager and the courier, and each parcel's tracking number
    with its drop time and its ``unauthorized_locker_drop`` flag id."""
    with app.app_context():
        session = db.session
        station = factories.station(session, code="RACE")
        factories.user(session, "racer", "courier", station)
        factories.user(session, "boss", "station_manager", station)
        factories.user(session, "shop", "integration")
        factories.device(session, "PDA-RACE", station)
        numbers = [factories.parcel(session, station).tracking_no for _ in range(rounds)]
        session.commit()
    client = app.test_client()
    auth = Auth(client)
    headers = {
        "courier": auth.headers("racer", "PDA-RACE"),
        "manager": auth.headers("boss"),
        "integration": auth.headers("shop"),
    }
    dropped_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    events = []
    for n, tracking_no in enumerate(numbers):
        events.append(factories.event(2 * n + 1, tracking_no, occurred_at=dropped_at))
        events.append(factories.locker_drop(2 * n + 2, tracking_no, dropped_at))
    pushed = client.post(
        "/api/v1/sync/push",
        json=factories.push_body("PDA-RACE", events),
        headers=headers["courier"],
    )
    assert pushed.status_code == 200, pushed.get_json()
    with app.app_context():
        flags = {
            flag.subject_key: flag.id
            for flag in db.session.scalars(
                select(Flag).where(Flag.kind == "unauthorized_locker_drop")
            )
        }
    return headers, [(tn, dropped_at, flags[tn]) for tn in numbers]


def _asked_twice(app: Flask, headers: dict[str, dict[str, str]], tracking_no: str) -> list[int]:
    """Two pending requests of the courier for the same locker consent: one asked online,
    then one from the PDA's ``consent_requested`` event asking by phone call (the same
    question again, online or from the PDA, would be answered by the first, pending:
    ``sync.consent_requests.asking_bound``)."""
    client = app.test_client()
    online = client.post(
        f"{CONSENTS}/requests",
        json={"tracking_no": tracking_no, "method": "locker"},
        headers=headers["courier"],
    )
    assert online.status_code == 201, online.get_json()
    asked_offline = factories.event(
        3,  # after the check-out and the drop of ``_dropped_without_consent``'s one parcel
        tracking_no,
        "consent_requested",
        occurred_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5),
        request={"method": "locker", "channel": "phone_call"},
    )
    pushed = client.post(
        "/api/v1/sync/push",
        json=factories.push_body("PDA-RACE", [asked_offline]),
        headers=headers["courier"],
    )
    assert pushed.status_code == 200, pushed.get_json()
    with app.app_context():
        from models import ConsentRequest

        ids = db.session.scalars(
            select(ConsentRequest.id)
            .where(ConsentRequest.tracking_no == tracking_no)
            .order_by(ConsentRequest.id)
        ).all()
    assert len(ids) == 2 and ids[0] == online.get_json()["id"], ids
    return list(ids)


@pytest.mark.postgres_only
def test_a_consent_granted_while_the_manager_resolves_its_drops_flag_never_deadlocks(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recipient's app records, through the API, the consent they gave before the
    drop, while the manager resolves the drop's ``unauthorized_locker_drop`` flag.

    Recording the consent writes its audit entry (``consent_granted``) and judges the
    parcel again, which locks its flags; resolving a flag locks the flag, then takes
    the audit log's lock. With the entry written as it came, each waited for the other
    and PostgreSQL failed one of them (a 503). The entry is now chained last
    (``audit.deferred``), as the service's lock order has it: either may win, neither
    fails. The grant dawdles after writing its entry, so the manager's request lands
    in that window every round."""
    grant = consents_module.grant

    def slow_grant(**kwargs: Any) -> Any:
        consent = grant(**kwargs)
        time.sleep(0.4)  # its audit entry written, the flags not judged yet
        return consent

    monkeypatch.setattr(consents_module, "grant", slow_grant)
    rounds = 3
    headers, drops = _dropped_without_consent(committed_app, rounds)
    failures = []
    for tracking_no, dropped_at, flag_id in drops:
        consent = {
            "tracking_no": tracking_no,
            "method": "locker",
            "channel": "app",
            "granted_at": (dropped_at - dt.timedelta(minutes=30)).isoformat(),
        }
        evidence = (
            committed_app.test_client()
            .get(f"{FLAGS}/{flag_id}", headers=headers["manager"])
            .get_json()["evidence_version"]
        )
        granted, resolved = race_requests(
            committed_app,
            [
                ("POST", CONSENTS, consent, headers["integration"]),
                (
                    "POST",
                    f"{FLAGS}/{flag_id}/resolve",
                    {"note": "called the recipient", "evidence_version": evidence},
                    headers["manager"],
                ),
            ],
            delays=[0, 0.15],
        )
        if granted.status_code != 201 or resolved.status_code not in (200, 409):
            failures.append(
                (tracking_no, granted.status_code, resolved.status_code, resolved.get_json())
            )
    assert failures == [], f"{len(failures)} of {rounds} rounds failed: {failures[:2]}"


def _slow_to_find_none(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> None:
    """``module.name``, a look-up of what a retry's id recorded, waits half a second
    when it finds nothing: two attempts at once both find nothing before either
    inserts."""
    looked_up = getattr(module, name)

    def slow_to_find(*args: Any, **kwargs: Any) -> Any:
        found = looked_up(*args, **kwargs)
        if found is None:
            time.sleep(0.5)
        return found

    monkeypatch.setattr(module, name, slow_to_find)


@pytest.mark.postgres_only
def test_two_retries_of_a_consent_at_once_record_it_once(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway's retry overtakes its first attempt: both look for the consent by
    the channel's id before either has recorded it. The unique index makes the second
    insert wait for the first's commit and fail; it answers the first's consent, and
    one consent is recorded."""
    headers, [(tracking_no, dropped_at, _)] = _dropped_without_consent(committed_app, 1)
    _slow_to_find_none(monkeypatch, consents_module, "recorded_as")
    body = {
        "tracking_no": tracking_no,
        "method": "locker",
        "channel": "sms",
        "granted_at": (dropped_at - dt.timedelta(minutes=10)).isoformat(),
        "client_consent_id": "sms-race-1",
    }
    answers = race_requests(committed_app, [("POST", CONSENTS, body, headers["integration"])] * 2)
    assert [a.status_code for a in answers] == [201, 201], [a.get_json() for a in answers]
    assert answers[0].get_json()["id"] == answers[1].get_json()["id"]
    with committed_app.app_context():
        from models import AuditEntry, Consent

        assert len(db.session.scalars(select(Consent.id)).all()) == 1
        granted = select(AuditEntry.id).where(AuditEntry.action == "consent_granted")
        assert len(db.session.scalars(granted).all()) == 1
        flag = db.session.scalars(select(Flag).where(Flag.kind == "unauthorized_locker_drop"))
        assert flag.one().status.value == "closed"


@pytest.mark.postgres_only
def test_two_attempts_of_a_consent_request_at_once_ask_the_recipient_once(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PDA's retry overtakes its first attempt: both look for the request by the
    PDA's id before either has made it. The second insert waits for the first's commit
    and fails on the unique index; it answers the first's request."""
    from models import ConsentRequest
    from sync import consent_requests

    headers, [(tracking_no, _, _)] = _dropped_without_consent(committed_app, 1)
    _slow_to_find_none(monkeypatch, consent_requests, "asked_as")
    body = {
        "tracking_no": tracking_no,
        "method": "locker",
        "client_request_id": "2c1d4e8f-6a7b-4c3d-9e0f-1a2b3c4d5e6f",
    }
    attempt = ("POST", f"{CONSENTS}/requests", body, headers["courier"])
    answers = race_requests(committed_app, [attempt] * 2)
    assert [a.status_code for a in answers] == [201, 201], [a.get_json() for a in answers]
    assert answers[0].get_json()["id"] == answers[1].get_json()["id"]
    with committed_app.app_context():
        assert len(db.session.scalars(select(ConsentRequest.id)).all()) == 1


@pytest.mark.postgres_only
def test_an_answer_racing_the_same_consent_with_its_id_gets_it(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway sends the recipient's "yes" twice at once with one id: once alone,
    then, a moment later, as the answer to the courier's request. Both look for the id
    before either has recorded it; the answer, losing to the unique index, got its
    generic 409. It now gets what a retry gets: the consent recorded alone, which
    answers the request; one consent is recorded."""
    from models import Consent, ConsentRequest

    headers, [(tracking_no, _, _)] = _dropped_without_consent(committed_app, 1)
    asked = (
        committed_app.test_client()
        .post(
            f"{CONSENTS}/requests",
            json={"tracking_no": tracking_no, "method": "locker"},
            headers=headers["courier"],
        )
        .get_json()
    )
    _slow_to_find_none(monkeypatch, consents_module, "recorded_as")
    granted_at = dt.datetime.now(dt.UTC).isoformat()
    alone = {
        "tracking_no": tracking_no,
        "method": "locker",
        "channel": "sms",
        "granted_at": granted_at,
        "client_consent_id": "sms-race-2",
    }
    answer = {
        "request_id": asked["id"],
        "channel": "sms",
        "granted_at": granted_at,
        "client_consent_id": "sms-race-2",
    }
    answers = race_requests(
        committed_app,
        [
            ("POST", CONSENTS, alone, headers["integration"]),
            ("POST", CONSENTS, answer, headers["integration"]),
        ],
        delays=[0, 0.25],  # both find nothing; the consent alone inserts first
    )
    assert [a.status_code for a in answers] == [201, 201], [a.get_json() for a in answers]
    assert answers[0].get_json()["id"] == answers[1].get_json()["id"]
    with committed_app.app_context():
        [consent_id] = db.session.scalars(select(Consent.id)).all()
        request = db.session.get(ConsentRequest, asked["id"])
        assert request is not None
        assert (request.status.value, request.consent_id) == ("granted", consent_id)


@pytest.mark.postgres_only
def test_a_consent_alone_losing_the_race_to_the_answer_with_its_id_is_a_retry(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same race the other way round, neither sending evidence: the answer inserts
    first, its consent carrying the server's evidence ("answer to consent request N").
    The plain POST, finding it after the unique index, was a 409 "evidence differ"; it
    is the same grant and is answered as a retry (rule 2), one consent recorded."""
    from models import Consent, ConsentRequest

    headers, [(tracking_no, _, _)] = _dropped_without_consent(committed_app, 1)
    asked = (
        committed_app.test_client()
        .post(
            f"{CONSENTS}/requests",
            json={"tracking_no": tracking_no, "method": "locker"},
            headers=headers["courier"],
        )
        .get_json()
    )
    _slow_to_find_none(monkeypatch, consents_module, "recorded_as")
    granted_at = dt.datetime.now(dt.UTC).isoformat()
    answer = {
        "request_id": asked["id"],
        "channel": "sms",
        "granted_at": granted_at,
        "client_consent_id": "sms-race-4",
    }
    alone = {
        "tracking_no": tracking_no,
        "method": "locker",
        "channel": "sms",
        "granted_at": granted_at,
        "client_consent_id": "sms-race-4",
    }
    answers = race_requests(
        committed_app,
        [
            ("POST", CONSENTS, answer, headers["integration"]),
            ("POST", CONSENTS, alone, headers["integration"]),
        ],
        delays=[0, 0.25],  # both find nothing; the answer inserts first
    )
    assert [a.status_code for a in answers] == [201, 201], [a.get_json() for a in answers]
    assert answers[0].get_json()["id"] == answers[1].get_json()["id"]
    with committed_app.app_context():
        [consent_id] = db.session.scalars(select(Consent.id)).all()
        request = db.session.get(ConsentRequest, asked["id"])
        assert request is not None and request.consent_id == consent_id


@pytest.mark.postgres_only
def test_two_answers_racing_with_one_id_for_two_requests_give_the_loser_the_named_409(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The courier asked twice; the gateway answers both at once with one id. One
    consent answers one request; the other answer gets the 409 a retry gets
    (``client_consent_id_reused``, saying which request that consent answers), not
    the generic one of the unique index."""
    headers, [(tracking_no, _, _)] = _dropped_without_consent(committed_app, 1)
    asked = _asked_twice(committed_app, headers, tracking_no)
    _slow_to_find_none(monkeypatch, consents_module, "recorded_as")
    answers = race_requests(
        committed_app,
        [
            (
                "POST",
                CONSENTS,
                {"request_id": request_id, "channel": "sms", "client_consent_id": "sms-race-3"},
                headers["integration"],
            )
            for request_id in asked
        ],
    )
    codes = sorted(a.status_code for a in answers)
    assert codes == [201, 409], [a.get_json() for a in answers]
    [won] = [a.get_json() for a in answers if a.status_code == 201]
    [lost] = [a.get_json() for a in answers if a.status_code == 409]
    assert lost["code"] == "client_consent_id_reused", lost
    assert f"which answers consent request {won['request']['id']}" in lost["message"]


@pytest.mark.postgres_only
def test_a_refusal_while_the_consent_it_withdraws_is_revoked_never_deadlocks(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recipient granted the courier's first request, then, at the same moment,
    revokes that consent in the app and refuses a second request by SMS. The revocation
    marks the first request revoked, then judges the parcel (its lock); the refusal
    locks the parcel to keep the refusal, and must mark the first request too: taken in
    that order, each waited for the other and PostgreSQL failed one (a 503). The
    refusal marks the request before it locks the parcel, as the revocation does:
    both succeed, and the request is revoked once (by whichever came first)."""
    from models import ConsentRequest

    headers, [(tracking_no, _, _)] = _dropped_without_consent(committed_app, 1)
    client = committed_app.test_client()
    first, second = _asked_twice(committed_app, headers, tracking_no)
    granted = client.post(
        CONSENTS, json={"request_id": first, "channel": "app"}, headers=headers["integration"]
    )
    assert granted.status_code == 201, granted.get_json()
    with committed_app.app_context():
        db.session.add(
            WebhookSubscription(
                url="http://127.0.0.1:9/hook",
                topics=["consent.request_revoked"],
                secret="s" * 43,
            )
        )
        db.session.commit()
    revoked_requests = consents_module.revoked_requests

    def slow_revoked_requests(*args: Any, **kwargs: Any) -> None:
        revoked_requests(*args, **kwargs)
        time.sleep(0.6)  # the first request marked, the parcel not judged yet

    monkeypatch.setattr(consents_module, "revoked_requests", slow_revoked_requests)
    revocation, refusal = race_requests(
        committed_app,
        [
            (
                "POST",
                f"{CONSENTS}/{granted.get_json()['id']}/revoke",
                {"reason": "changed my mind"},
                headers["integration"],
            ),
            (
                "POST",
                CONSENTS,
                {"request_id": second, "channel": "sms", "granted": False},
                headers["integration"],
            ),
        ],
        delays=[0, 0.2],
    )
    assert (revocation.status_code, refusal.status_code) == (200, 200), (
        revocation.get_json(),
        refusal.get_json(),
    )
    with committed_app.app_context():
        request = db.session.get(ConsentRequest, first)
        assert request is not None and request.status == ConsentRequestStatus.REVOKED
        told = db.session.scalars(
            select(OutboxMessage).where(OutboxMessage.topic == "consent.request_revoked")
        ).all()
        assert len(told) == 1


@pytest.mark.postgres_only
def test_a_grant_and_a_refusal_of_two_requests_at_once_never_leave_the_grant_standing(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The courier asked twice for the same parcel; the recipient says yes to the first
    in the app and, a moment later, no to the second by SMS. The refusal withdraws the
    consent just granted (granted before it), so the first request must read revoked and
    its channel hear ``consent.request_revoked``. The refusal marked the requests
    granted before it while the grant, holding the parcel's lock, was not committed yet
    (nothing granted to mark), then waited for that lock; the grant had read the
    refusals before the refusal was kept: each missed the other, and the first request
    stayed ``granted`` by a consent the rules hold withdrawn. The refusal looks again
    once it holds the parcel's lock, after which no grant can miss it."""
    from models import ConsentRequest
    from sync import consent_requests as requests_module

    headers, [(tracking_no, _, _)] = _dropped_without_consent(committed_app, 1)
    first, second = _asked_twice(committed_app, headers, tracking_no)
    with committed_app.app_context():
        db.session.add(
            WebhookSubscription(
                url="http://127.0.0.1:9/hook",
                topics=["consent.request_revoked"],
                secret="s" * 43,
            )
        )
        db.session.commit()
    refusal_withdrawing = requests_module._refusal_withdrawing

    def slow_refusal_withdrawing(*args: Any, **kwargs: Any) -> Any:
        found = refusal_withdrawing(*args, **kwargs)
        time.sleep(0.6)  # the parcel locked, the refusals read, not committed yet
        return found

    monkeypatch.setattr(requests_module, "_refusal_withdrawing", slow_refusal_withdrawing)
    grant, refusal = race_requests(
        committed_app,
        [
            ("POST", CONSENTS, {"request_id": first, "channel": "app"}, headers["integration"]),
            (
                "POST",
                CONSENTS,
                {"request_id": second, "channel": "sms", "granted": False},
                headers["integration"],
            ),
        ],
        delays=[0, 0.2],
    )
    assert (grant.status_code, refusal.status_code) == (201, 200), (
        grant.get_json(),
        refusal.get_json(),
    )
    with committed_app.app_context():
        request = db.session.get(ConsentRequest, first)
        assert request is not None and request.status == ConsentRequestStatus.REVOKED
        told = db.session.scalars(
            select(OutboxMessage).where(OutboxMessage.topic == "consent.request_revoked")
        ).all()
        assert len(told) == 1


@pytest.mark.postgres_only
def test_the_same_question_asked_twice_at_once_is_sent_once(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PDA (or a script with its token) posts the same question twice at once, without
    a ``client_request_id``: both looked for a pending request before either had made
    one, and the recipient got two messages. The bound is checked under the parcel's
    lock: the second waits for the first's commit, and its pending request answers."""
    from models import ConsentRequest
    from sync import consent_requests

    headers, [(tracking_no, _, _)] = _dropped_without_consent(committed_app, 1)
    made = consent_requests.request_consent

    def slow_to_make(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)  # after the look for a pending one, before the insert
        return made(*args, **kwargs)

    monkeypatch.setattr(consent_requests, "request_consent", slow_to_make)
    body = {"tracking_no": tracking_no, "method": "locker"}
    answers = race_requests(
        committed_app, [("POST", f"{CONSENTS}/requests", body, headers["courier"])] * 2
    )
    assert sorted(a.status_code for a in answers) == [200, 201], [a.get_json() for a in answers]
    assert answers[0].get_json()["id"] == answers[1].get_json()["id"]
    with committed_app.app_context():
        assert len(db.session.scalars(select(ConsentRequest.id)).all()) == 1


@pytest.mark.postgres_only
@pytest.mark.parametrize("pda", ["own", "colleague"])
def test_a_push_and_an_online_ask_of_the_same_question_at_once_send_it_once(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch, pda: str
) -> None:
    """The courier asks online while a PDA pushes a ``consent_requested`` asking the same
    question: their own PDA (recorded offline a moment before) or a colleague's. Each
    looked for a pending request before the other had made one, and the recipient got
    the question twice. The push makes its requests under the parcels' locks, which the
    online ask takes too: the second waits for the first's commit and finds its request
    pending (the online ask answered with it, or the event's request that one, or kept
    ``unsent`` behind a colleague's)."""
    from models import ConsentRequest
    from sync import consent_requests

    headers, [(tracking_no, _, _)] = _dropped_without_consent(committed_app, 1)
    with committed_app.app_context():
        if pda == "colleague":
            station = db.session.scalars(select(Station).where(Station.code == "RACE")).one()
            factories.user(db.session, "mate", "courier", station)
            factories.device(db.session, "PDA-MATE", station)
        db.session.add(
            WebhookSubscription(
                url="http://127.0.0.1:9/hook", topics=["consent.requested"], secret="s" * 43
            )
        )
        db.session.commit()
    device, pusher = (
        ("PDA-RACE", headers["courier"])
        if pda == "own"
        else ("PDA-MATE", Auth(committed_app.test_client()).headers("mate", "PDA-MATE"))
    )
    made = consent_requests.request_consent

    def slow_to_make(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)  # after the look for a pending one, before the insert
        return made(*args, **kwargs)

    monkeypatch.setattr(consent_requests, "request_consent", slow_to_make)
    question = {"method": "locker", "channel": "sms"}
    asked_offline = factories.event(
        3 if pda == "own" else 1,  # after ``_dropped_without_consent``'s two events
        tracking_no,
        "consent_requested",
        occurred_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5),
        request=question,
    )
    answers = race_requests(
        committed_app,
        [
            (
                "POST",
                f"{CONSENTS}/requests",
                {"tracking_no": tracking_no, **question},
                headers["courier"],
            ),
            ("POST", "/api/v1/sync/push", factories.push_body(device, [asked_offline]), pusher),
        ],
    )
    assert answers[1].status_code == 200, answers[1].get_json()
    assert answers[0].status_code in (200, 201, 409), answers[0].get_json()
    with committed_app.app_context():
        sent = db.session.scalars(
            select(OutboxMessage.id).where(OutboxMessage.topic == "consent.requested")
        ).all()
        statuses = db.session.scalars(select(ConsentRequest.status)).all()
    assert len(sent) == 1
    assert sorted(s.value for s in statuses).count("pending") == 1, statuses


@pytest.mark.postgres_only
def test_a_push_voiding_the_ask_of_a_request_being_answered_waits_for_no_answer(
    committed_app: Flask, engine: Engine
) -> None:
    """The courier asked online; their PDA pushes the ``consent_requested`` it recorded
    for the same question and the correction voiding it, while the recipient's answer
    to the online request holds its row (and would next lock the parcel's, which the
    push holds by then: a deadlock, PostgreSQL failing one of them). The push does not
    wait for that row: the answer is taken as first, the event's request is its own,
    cancelled, and the online request is the answer's to settle."""
    from models import ConsentRequest

    headers, [(tracking_no, _, _)] = _dropped_without_consent(committed_app, 1)
    client = committed_app.test_client()
    question = {"method": "locker", "channel": "sms"}
    online = client.post(
        f"{CONSENTS}/requests",
        json={"tracking_no": tracking_no, **question},
        headers=headers["courier"],
    )
    assert online.status_code == 201, online.get_json()
    at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    asked = factories.event(3, tracking_no, "consent_requested", occurred_at=at, request=question)
    voiding = factories.event(
        4,
        tracking_no,
        "correction",
        occurred_at=at,
        voids_client_event_id=asked["client_event_id"],
        reason="asked by mistake",
    )
    answers: list[Any] = []

    def push() -> None:
        answers.append(
            committed_app.test_client().post(
                "/api/v1/sync/push",
                json=factories.push_body("PDA-RACE", [asked, voiding]),
                headers=headers["courier"],
            )
        )

    with engine.connect() as answering:  # an answer holding the online request's row
        answering.execute(
            select(ConsentRequest.id)
            .where(ConsentRequest.id == online.get_json()["id"])
            .with_for_update()
        )
        pushing = threading.Thread(target=push)
        pushing.start()
        pushing.join(timeout=10)
        waited = pushing.is_alive()
        answering.rollback()  # the answer goes on (here: gives up), releasing the row
    pushing.join(timeout=60)
    assert not waited, "the push waited for the answer's row"
    [pushed] = answers
    assert pushed.status_code == 200, pushed.get_json()
    with committed_app.app_context():
        requests = {
            r.id: (r.status, str(r.client_event_id) if r.client_event_id else None)
            for r in db.session.scalars(select(ConsentRequest))
        }
    assert requests.pop(online.get_json()["id"]) == (ConsentRequestStatus.PENDING, None)
    assert list(requests.values()) == [(ConsentRequestStatus.CANCELLED, asked["client_event_id"])]


@pytest.mark.postgres_only
def test_a_push_handing_over_a_parcel_whose_request_is_being_answered_ends_it_if_the_answer_fails(
    committed_app: Flask, engine: Engine
) -> None:
    """The courier asked online; the recipient answers it (the answer holds the request's
    row, and locks the parcel's next) while the PDA pushes the parcel's collection from
    the locker. The push cancelled the parcel's pending requests after its projection,
    holding the parcel's locks: waiting for the answer's row there deadlocked (PostgreSQL
    failed one of them); passing over it left the request pending, on a parcel in its
    recipient's hands, when the answer then gave up (a ``granted_at`` before the
    question, a conflict): the channel asked them until it lapsed. The push now locks the
    parcel's requests before any parcel lock: it waits for the answer, which takes the
    parcel's lock (no deadlock), and cancels the request the answer left pending."""
    from models import ConsentRequest, Parcel
    from sync.consent_requests import HANDED_OVER_REASON

    headers, [(tracking_no, dropped_at, _)] = _dropped_without_consent(committed_app, 1)
    client = committed_app.test_client()
    online = client.post(
        f"{CONSENTS}/requests",
        json={"tracking_no": tracking_no, "method": "locker", "channel": "sms"},
        headers=headers["courier"],
    )
    assert online.status_code == 201, online.get_json()
    collected = factories.event(
        3, tracking_no, "collected_from_locker", occurred_at=dropped_at + dt.timedelta(minutes=5)
    )
    answers: list[Any] = []

    def push() -> None:
        answers.append(
            committed_app.test_client().post(
                "/api/v1/sync/push",
                json=factories.push_body("PDA-RACE", [collected]),
                headers=headers["courier"],
            )
        )

    with engine.connect() as answering:  # an answer holding the online request's row
        answering.execute(
            select(ConsentRequest.id)
            .where(ConsentRequest.id == online.get_json()["id"])
            .with_for_update()
        )
        pushing = threading.Thread(target=push)
        pushing.start()
        pushing.join(timeout=2)  # the push reaches the request
        answering.execute(text("SET LOCAL lock_timeout = '10s'"))
        # The parcel, as an answer locks it next: taken, not deadlocked (nor timed out).
        answering.execute(
            select(Parcel.id).where(Parcel.tracking_no == tracking_no).with_for_update()
        )
        answering.rollback()  # the answer gives up, the request as it was: pending
    pushing.join(timeout=60)
    [pushed] = answers
    assert pushed.status_code == 200, pushed.get_json()
    assert [r["status"] for r in pushed.get_json()["results"]] == ["applied"]
    with committed_app.app_context():
        parcel = db.session.scalar(select(Parcel).where(Parcel.tracking_no == tracking_no))
        assert parcel is not None and parcel.status.value == "collected"
        request = db.session.get(ConsentRequest, online.get_json()["id"])
        assert request is not None
        assert (request.status, request.status_reason) == (
            ConsentRequestStatus.CANCELLED,
            HANDED_OVER_REASON,
        )


@pytest.mark.postgres_only
@pytest.mark.parametrize("voided", ["pending", "held back"])
def test_a_push_voiding_asks_and_a_colleagues_delivering_their_parcels_at_once_never_deadlock(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch, voided: str
) -> None:
    """Two PDAs asked the same questions about the same parcels: one's requests were sent
    (pending), the other's held back behind them. Then, at the same instant, one PDA
    pushes the corrections voiding its asks (``voided``: the pending ones, which frees
    the held-back ones, or the held-back ones) while the other pushes the parcels'
    deliveries in person. The voiding push locks the requests it cancels
    (``cancel_voided``), the delivering push the parcels' pending requests
    (``lock_requests_to_end``), both before any parcel lock: taken in two orders (the
    first by its corrections' event ids, the second by the requests' ids), two parcels'
    requests deadlocked, PostgreSQL aborting one push, run again. Each run is allowed
    once here, so that a deadlock is a 503, not hidden by the run again. Many rounds,
    several parcels each; in every one, each parcel ends delivered with no question
    left asking its recipient."""
    from courier_api import app as app_module
    from models import ConsentRequest, Parcel, ParcelStatus

    monkeypatch.setattr(app_module, "REQUEST_ATTEMPTS", 1)
    rounds, per_round = 12, 3
    with committed_app.app_context():
        session = db.session
        _, numbers = factories.station_with_pdas(
            session,
            "RACE",
            {"asker": "PDA-ASK", "mate": "PDA-MATE"},
            parcels=rounds * per_round,
        )
        session.add(
            WebhookSubscription(
                url="http://127.0.0.1:9/hook",
                topics=["consent.requested", "consent.request_cancelled"],
                secret="s" * 43,
            )
        )
        session.commit()
    auth = Auth(committed_app.test_client())
    headers = {
        "PDA-ASK": auth.headers("asker", "PDA-ASK"),
        "PDA-MATE": auth.headers("mate", "PDA-MATE"),
    }
    seqs = {"PDA-ASK": 0, "PDA-MATE": 0}

    def events(device: str, made: list[tuple[str, str, dict[str, Any]]]) -> list[dict[str, Any]]:
        out = []
        for tracking_no, kind, fields in made:
            seqs[device] += 1
            at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
            out.append(factories.event(seqs[device], tracking_no, kind, occurred_at=at, **fields))
        return out

    def push(device: str, batch: list[dict[str, Any]]) -> None:
        pushed = committed_app.test_client().post(
            "/api/v1/sync/push", json=factories.push_body(device, batch), headers=headers[device]
        )
        assert pushed.status_code == 200, pushed.get_json()

    question = {"method": "locker", "channel": "sms"}
    voider, deliverer = ("PDA-ASK", "PDA-MATE") if voided == "pending" else ("PDA-MATE", "PDA-ASK")
    failures = []
    for round_ in range(rounds):
        parcels = numbers[round_ * per_round : (round_ + 1) * per_round]
        asks = {}
        for device in ("PDA-ASK", "PDA-MATE"):  # the first's sent, the second's held back
            asks[device] = events(
                device, [(tn, "consent_requested", {"request": question}) for tn in parcels]
            )
            push(device, asks[device])
        voiding = events(
            voider,
            [
                (
                    ask["tracking_no"],
                    "correction",
                    {
                        "voids_client_event_id": ask["client_event_id"],
                        "reason": "asked by mistake",
                    },
                )
                for ask in reversed(asks[voider])  # not in the order they were asked
            ],
        )
        delivering = events(
            deliverer,
            [
                (tn, "delivered", {"pod": {"recipient_name": "Li Hua", "relation": "self"}})
                for tn in parcels
            ],
        )
        answers = race_requests(
            committed_app,
            [
                (
                    "POST",
                    "/api/v1/sync/push",
                    factories.push_body(voider, voiding),
                    headers[voider],
                ),
                (
                    "POST",
                    "/api/v1/sync/push",
                    factories.push_body(deliverer, delivering),
                    headers[deliverer],
                ),
            ],
        )
        codes = [a.status_code for a in answers]
        if codes != [200, 200]:
            failures.append((round_, codes, [a.get_json().get("code") for a in answers]))
    assert failures == [], f"{len(failures)} of {rounds} rounds failed: {failures[:3]}"
    with committed_app.app_context():
        session = db.session
        assert set(session.scalars(select(Parcel.status)).all()) == {ParcelStatus.DELIVERED}
        statuses = session.scalars(select(ConsentRequest.status)).all()
        assert len(statuses) == 2 * rounds * per_round
        assert set(statuses) == {ConsentRequestStatus.CANCELLED}
        told = {
            topic: sorted(
                session.scalars(
                    select(OutboxMessage.payload["request_id"].as_integer()).where(
                        OutboxMessage.topic == topic
                    )
                ).all()
            )
            for topic in ("consent.requested", "consent.request_cancelled")
        }
    # Each question asked was called off: none left asking the recipient.
    assert told["consent.requested"] == told["consent.request_cancelled"]


def _asked_by_two_pdas(app: Flask, parcels: int) -> tuple[dict[str, dict[str, str]], list[dict]]:
    """A station with two PDAs (``PDA-ASK``, ``PDA-MATE``) that each asked the same
    question about the same ``parcels`` parcels, ``PDA-ASK`` first (its requests sent, the
    colleague's held back behind them): the headers by device and ``PDA-ASK``'s asks."""
    with app.app_context():
        _, numbers = factories.station_with_pdas(
            db.session, "ORDER", {"asker": "PDA-ASK", "mate": "PDA-MATE"}, parcels=parcels
        )
        db.session.commit()
    auth = Auth(app.test_client())
    headers = {
        "PDA-ASK": auth.headers("asker", "PDA-ASK"),
        "PDA-MATE": auth.headers("mate", "PDA-MATE"),
    }
    at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
    question = {"method": "locker", "channel": "sms"}
    asked = {}
    for device in headers:
        asked[device] = [
            factories.event(seq, tn, "consent_requested", occurred_at=at, request=question)
            for seq, tn in enumerate(numbers, start=1)
        ]
        pushed = app.test_client().post(
            "/api/v1/sync/push",
            json=factories.push_body(device, asked[device]),
            headers=headers[device],
        )
        assert pushed.status_code == 200, pushed.get_json()
    return headers, asked["PDA-ASK"]


@pytest.mark.postgres_only
def test_the_pushes_ending_questions_lock_the_requests_in_one_order(committed_app: Flask) -> None:
    """A push voiding its PDA's asks locks the requests it cancels before any parcel lock
    (``cancel_voided``), as a colleague's push handing the parcels over locks their
    pending requests (``lock_requests_to_end``). The second locked them by id, the first in
    whatever order the plan read them (by the events' client ids or times through an
    index, or the heap's order once rows were updated): with two requests taken in two
    orders, the two pushes at once could deadlock (the race above does not meet it on
    small tables, where the plan happens to follow the ids). Every statement of these
    pushes locking several requests locks them by id; one locking at most one row
    (``LIMIT``) has no order to keep."""
    from sqlalchemy import event

    headers, asks = _asked_by_two_pdas(committed_app, 3)
    at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=20)
    voiding = [
        factories.event(
            4 + n,
            ask["tracking_no"],
            "correction",
            occurred_at=at,
            voids_client_event_id=ask["client_event_id"],
            reason="asked by mistake",
        )
        for n, ask in enumerate(reversed(asks))
    ]
    delivering = [
        factories.event(
            4 + n,
            ask["tracking_no"],
            "delivered",
            occurred_at=at,
            pod={"recipient_name": "Li Hua", "relation": "self"},
        )
        for n, ask in enumerate(asks)
    ]
    locking: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        flat = " ".join(statement.split())
        if "FOR UPDATE" in flat and " FROM consent_request" in flat:
            locking.append(flat)

    engine = db.engine_of(committed_app)
    event.listen(engine, "before_cursor_execute", record)
    try:
        for device, batch in (("PDA-ASK", voiding), ("PDA-MATE", delivering)):
            pushed = committed_app.test_client().post(
                "/api/v1/sync/push",
                json=factories.push_body(device, batch),
                headers=headers[device],
            )
            assert pushed.status_code == 200, pushed.get_json()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert len(locking) >= 2, locking  # cancel_voided's and lock_requests_to_end's at least
    unordered = [
        s for s in locking if " LIMIT " not in s and "ORDER BY consent_request.id" not in s
    ]
    assert unordered == []


@pytest.mark.postgres_only
def test_the_lapse_job_and_a_push_handing_the_parcels_over_never_deadlock(
    committed_app: Flask, engine: Engine
) -> None:
    """Two requests lapsed unannounced: the first asked until later than the second. The
    ``consent_requests_lapsed`` job locks them by expiry (the second first), a push
    bringing their parcels' deliveries by id (``lock_requests_to_end``: the first first):
    each held the request the other waited for, PostgreSQL aborting one (the push run
    again, or the job's run lost). The job picks them by expiry and locks them by id.
    Here a connection takes the push's turn: it holds the first request, and takes the
    second while the job waits."""
    from sqlalchemy.orm import Session as OrmSession

    from models import ConsentRequest
    from sync import consent_requests

    with committed_app.app_context():
        _, numbers = factories.station_with_pdas(
            db.session, "LAPSE", {"asker": "PDA-ASK"}, parcels=2
        )
        db.session.commit()
    courier = Auth(committed_app.test_client()).headers("asker", "PDA-ASK")
    now = dt.datetime.now(dt.UTC)
    ids = []
    for tracking_no, minutes in zip(numbers, (20, 10), strict=True):
        asked = committed_app.test_client().post(
            f"{CONSENTS}/requests",
            json={
                "tracking_no": tracking_no,
                "method": "locker",
                "expires_at": (now + dt.timedelta(minutes=minutes)).isoformat(),
            },
            headers=courier,
        )
        assert asked.status_code == 201, asked.get_json()
        ids.append(asked.get_json()["id"])
    outcome: list[Any] = []

    def lapse() -> None:
        try:
            with OrmSession(engine) as session:
                outcome.append(
                    consent_requests.announce_lapsed(
                        session=session, now=now + dt.timedelta(minutes=30)
                    )
                )
        except Exception as error:  # reported below
            outcome.append(error)

    with engine.connect() as pushing:
        pushing.execute(text("SET LOCAL lock_timeout = '10s'"))
        pushing.execute(
            select(ConsentRequest.id).where(ConsentRequest.id == ids[0]).with_for_update()
        )
        job = threading.Thread(target=lapse)
        job.start()
        job.join(timeout=2)  # the job reaches the first request, held here
        try:
            pushing.execute(
                select(ConsentRequest.id).where(ConsentRequest.id == ids[1]).with_for_update()
            )
            took = None
        except Exception as error:  # reported below
            took = error
        pushing.rollback()
    job.join(timeout=60)
    assert took is None, took
    [ran] = outcome
    assert isinstance(ran, dict) and ran["announced"] == 2, ran


@pytest.mark.postgres_only
@pytest.mark.parametrize("push", ["voiding", "delivering", "voiding and delivering"])
def test_a_push_ending_many_questions_locks_them_all_in_one_order(
    committed_app: Flask, engine: Engine, monkeypatch: pytest.MonkeyPatch, push: str
) -> None:
    """A push locks the requests it may end before any parcel lock: those its corrections
    void, and the pending ones of the parcels it hands over. It took them in two steps
    (``cancel_voided``, then ``lock_for_handover``), each statement locking its rows by
    id, but its keys went in chunks of 900 (by corrections, by tracking numbers), and the
    two sets one after the other: a push voiding or delivering more than 900
    (``MAX_EVENTS_PER_PUSH`` is 5000), or voiding one ask and delivering another parcel,
    took a later request before an earlier one, and deadlocked with any push or lapse
    job taking them by id (now one step, ``lock_requests_to_end``, by the sorted ids of
    both sets). Chunks of
    one key here stand for the 900: the PDA asked about parcel ``b`` (the first request)
    then ``a`` (the second, its tracking number sorting first); the push names ``a``
    first. A connection takes the turn of another push: it holds the first request and
    takes the second while the push waits; every push is allowed one run."""
    from courier_api import app as app_module
    from models import ConsentRequest
    from sync import consent_requests
    from sync.sql import chunks

    monkeypatch.setattr(app_module, "REQUEST_ATTEMPTS", 1)
    monkeypatch.setattr(consent_requests, "chunks", lambda items: chunks(items, 1))
    with committed_app.app_context():
        _, numbers = factories.station_with_pdas(
            db.session, "CHUNK", {"asker": "PDA-ASK"}, parcels=2
        )
        db.session.commit()
    a, b = sorted(numbers)
    courier = Auth(committed_app.test_client()).headers("asker", "PDA-ASK")
    at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
    question = {"method": "locker", "channel": "sms"}
    asks = [
        factories.event(seq, tn, "consent_requested", occurred_at=at, request=question)
        for seq, tn in ((1, b), (2, a))
    ]
    asked = committed_app.test_client().post(
        "/api/v1/sync/push", json=factories.push_body("PDA-ASK", asks), headers=courier
    )
    assert asked.status_code == 200, asked.get_json()
    with committed_app.app_context():
        ids = {
            request.tracking_no: request.id
            for request in db.session.scalars(select(ConsentRequest))
        }
    assert ids[b] < ids[a], ids

    def voiding(seq: int, ask: dict[str, Any]) -> dict[str, Any]:
        return factories.event(
            seq,
            ask["tracking_no"],
            "correction",
            occurred_at=at,
            voids_client_event_id=ask["client_event_id"],
            reason="asked by mistake",
        )

    def delivering(seq: int, tracking_no: str) -> dict[str, Any]:
        return factories.event(
            seq,
            tracking_no,
            "delivered",
            occurred_at=at,
            pod={"recipient_name": "Li Hua", "relation": "self"},
        )

    batch = {
        "voiding": [voiding(3, asks[1]), voiding(4, asks[0])],
        "delivering": [delivering(3, a), delivering(4, b)],
        "voiding and delivering": [voiding(3, asks[1]), delivering(4, b)],
    }[push]
    answers: list[Any] = []

    def send() -> None:
        answers.append(
            committed_app.test_client().post(
                "/api/v1/sync/push", json=factories.push_body("PDA-ASK", batch), headers=courier
            )
        )

    with engine.connect() as other:
        other.execute(text("SET LOCAL lock_timeout = '10s'"))
        other.execute(
            select(ConsentRequest.id).where(ConsentRequest.id == ids[b]).with_for_update()
        )
        pushing = threading.Thread(target=send)
        pushing.start()
        pushing.join(timeout=2)  # the push reaches the first request, held here
        try:
            other.execute(
                select(ConsentRequest.id).where(ConsentRequest.id == ids[a]).with_for_update()
            )
            took = None
        except Exception as error:  # reported below
            took = error
        other.rollback()
    pushing.join(timeout=60)
    assert took is None, took
    [answer] = answers
    assert answer.status_code == 200, answer.get_json()
    with committed_app.app_context():
        statuses = dict(
            db.session.execute(select(ConsentRequest.tracking_no, ConsentRequest.status)).all()
        )
    assert statuses == {a: ConsentRequestStatus.CANCELLED, b: ConsentRequestStatus.CANCELLED}


@pytest.mark.postgres_only
def test_a_push_locks_no_request_answered_between_finding_and_locking_it(
    committed_app: Flask, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push handing a parcel over finds the parcel's pending requests without locking
    them, then locks them by id (``lock_requests_to_end``). One answered in between (the
    recipient's grant, committed) is pending no more: the push locked it all the same,
    holding a granted request to its commit. A refusal of another of the parcel's
    requests withdrawing that grant (``_withdraw_granted_before``: it holds the refused
    request, then updates the granted one) and this push (holding the granted one, the
    refused one next by id) then each waited for the other: a deadlock, as a
    revocation of that consent waited for the push. It locks only those still pending
    (or held back), as the single locking statement before it did."""
    from models import ConsentRequest
    from sync import consent_requests

    headers, [(tracking_no, dropped_at, _)] = _dropped_without_consent(committed_app, 1)
    asked = committed_app.test_client().post(
        f"{CONSENTS}/requests",
        json={"tracking_no": tracking_no, "method": "locker", "channel": "sms"},
        headers=headers["courier"],
    )
    assert asked.status_code == 201, asked.get_json()
    request_id = asked.get_json()["id"]
    answered: list[Any] = []
    probed: list[Any] = []
    finding, locking = consent_requests.PENDING_REQUESTS, consent_requests.REQUESTS_LOCKED

    class AnsweredOnceFound:
        """The find, then the recipient's grant, committed before the push locks."""

        def execute(self, session: Any, params: Any) -> Any:
            found = finding.execute(session, params)
            answering = threading.Thread(
                target=lambda: answered.append(
                    committed_app.test_client().post(
                        CONSENTS,
                        json={"request_id": request_id, "channel": "sms"},
                        headers=headers["integration"],
                    )
                )
            )
            answering.start()
            answering.join(timeout=30)
            return found

    class ProbedOnceLocked:
        """The lock, then another connection asks for the answered request at once."""

        def execute(self, session: Any, params: Any) -> Any:
            locked = locking.execute(session, params)
            with engine.connect() as other:
                try:
                    other.execute(
                        select(ConsentRequest.id)
                        .where(ConsentRequest.id == request_id)
                        .with_for_update(nowait=True)
                    )
                    probed.append(None)
                except Exception as error:  # reported below
                    probed.append(error)
                other.rollback()
            return locked

    monkeypatch.setattr(consent_requests, "PENDING_REQUESTS", AnsweredOnceFound())
    monkeypatch.setattr(consent_requests, "REQUESTS_LOCKED", ProbedOnceLocked())
    collected = factories.event(
        3, tracking_no, "collected_from_locker", occurred_at=dropped_at + dt.timedelta(minutes=5)
    )
    pushed = committed_app.test_client().post(
        "/api/v1/sync/push",
        json=factories.push_body("PDA-RACE", [collected]),
        headers=headers["courier"],
    )

    assert pushed.status_code == 200, pushed.get_json()
    [answer] = answered
    assert answer.status_code in (200, 201), answer.get_json()
    assert probed in ([], [None]), probed  # not locked by the push (nothing left to lock)
    with committed_app.app_context():
        request = db.session.get(ConsentRequest, request_id)
        assert request is not None and request.status == ConsentRequestStatus.GRANTED
