"""Consents over HTTP, and what they do to the flags of the parcels they cover."""

import datetime as dt
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Connection, func, select
from sqlalchemy.orm import Session

from courier_api.extensions import db
from models import AuditEntry, Consent, Flag, FlagStatus, Parcel, ScanEvent
from tests import factories
from tests.conftest import Auth, World
from tests.courier_api.test_proofs_api import counted
from tests.courier_api.test_web_pages import signed_in

URL = "/api/v1/consents"


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.fixture
def parcel(session: Session, world: World) -> Parcel:
    parcel = factories.parcel(session, world.station)  # express, +8613812345678
    session.commit()
    return parcel


@pytest.fixture
def app1(auth: Auth, world: World) -> dict[str, str]:
    return auth.headers("app1")


def grant(client: FlaskClient, headers: dict[str, str], **body: Any) -> Any:
    body.setdefault("method", "locker")
    body.setdefault("channel", "app")
    body.setdefault("granted_at", (now() - dt.timedelta(hours=1)).isoformat())
    return client.post(URL, json=body, headers=headers)


def push_drop(
    client: FlaskClient,
    auth: Auth,
    tracking_no: str,
    at: dt.datetime,
    skew: dt.timedelta,
    moved: dt.timedelta = dt.timedelta(0),
) -> dict[str, Any]:
    """The courier checks the parcel out and leaves it in locker L-1, on a PDA whose
    clock is ``skew`` off; ``moved``: by how much the courier moved the PDA's clock
    between the drop and the push."""
    events = [
        factories.event(1, tracking_no, occurred_at=at - dt.timedelta(hours=1) + skew),
        factories.event(
            2,
            tracking_no,
            "delivered_to_locker",
            occurred_at=at + skew,
            locker_id="L-1",
            compartment="7",
            pod={"pickup_code": "4821"},
        ),
    ]
    body = factories.push_body("PDA-0001", events, sent_at=now() + skew + moved)
    response = client.post(
        "/api/v1/sync/push", json=body, headers=auth.headers("courier1", "PDA-0001")
    )
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def push_and_read_the_proof(
    client: FlaskClient, auth: Auth, session: Session, events: list[dict[str, Any]]
) -> tuple[set[str], dict[str, Any]]:
    """PDA-0001 pushes ``events``, one of them its only locker drop: the kinds of the
    flags the push raised, and the auditor's proof of the drop."""
    receipt = client.post(
        "/api/v1/sync/push",
        json=factories.push_body("PDA-0001", events),
        headers=auth.headers("courier1", "PDA-0001"),
    ).get_json()
    drop = session.scalar(select(ScanEvent.id).where(ScanEvent.type == "delivered_to_locker"))
    proof = client.get(f"/api/v1/proofs/{drop}", headers=auth.headers("auditor1")).get_json()
    return {f["kind"] for f in receipt["flags_raised"]}, proof


def flag_status(session: Session, kind: str, tracking_no: str) -> FlagStatus | None:
    session.expire_all()
    return session.scalar(
        select(Flag.status).where(Flag.kind == kind, Flag.subject_key == tracking_no)
    )


def test_a_parcel_consent_is_recorded_and_phones_are_masked(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel
) -> None:
    response = grant(client, app1, tracking_no=parcel.tracking_no, point_id="L-1")
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert (body["scope"], body["tracking_no"], body["method"], body["point_id"]) == (
        "parcel",
        parcel.tracking_no,
        "locker",
        "L-1",
    )
    assert body["station_id"] == parcel.station_id and body["revoked_at"] is None


def test_a_standing_consent_normalizes_the_phone_and_matches_the_address_loosely(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel, session: Session
) -> None:
    response = grant(
        client,
        app1,
        scope="standing",
        recipient_phone="138 1234 5678",
        address="1  CENTURY ave.",
        method="any",
    )
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["recipient_phone"] == "+86*******5678"
    auditor = client.get(URL, headers=auth.headers("auditor1")).get_json()["items"][0]
    assert auditor["recipient_phone"] == "+8613812345678"
    at = now() - dt.timedelta(minutes=30)
    receipt = push_drop(client, auth, parcel.tracking_no, at, dt.timedelta(0))
    assert receipt["flags_raised"] == []  # the standing consent covers the drop


@pytest.mark.parametrize(
    ("on_the_parcel", "in_the_app"),
    [
        ("北京市朝阳区建国路1号院3号楼", "北京市 朝阳区 建国路 1 号院 3 号楼"),
        ("北京市 朝阳区 建国路１号院３号楼", "北京市朝阳区建国路1号院3号楼"),
        ("上海市浦东新区世纪大道100号 A座", "上海市浦东新区世纪大道100号A座"),
    ],
    ids=["spaced-in-the-app", "spaced-and-full-width-on-the-parcel", "space-before-latin"],
)
def test_a_standing_consent_matches_a_chinese_address_however_it_is_spaced(
    client: FlaskClient,
    auth: Auth,
    app1: dict[str, str],
    parcel: Parcel,
    session: Session,
    on_the_parcel: str,
    in_the_app: str,
) -> None:
    """Chinese is written without spaces between words, and people and forms put them
    anywhere: the recipient's app recorded the standing consent with the address as
    typed, spaced, the sender's manifest had it unspaced, and the consent the API had
    accepted matched none of the recipient's parcels: every drop was flagged
    ``unauthorized_locker_drop``."""
    parcel.address = on_the_parcel
    session.commit()
    response = grant(
        client,
        app1,
        scope="standing",
        recipient_phone="13812345678",
        address=in_the_app,
        method="locker",
    )
    assert response.status_code == 201, response.get_json()
    receipt = push_drop(client, auth, parcel.tracking_no, now(), dt.timedelta(0))
    assert receipt["flags_raised"] == []  # the standing consent covers the drop
    covering = client.get(
        URL, query_string={"covering": parcel.tracking_no, "active": "true"}, headers=app1
    )
    assert [c["id"] for c in covering.get_json()["items"]] == [response.get_json()["id"]]


def test_a_standing_consent_still_tells_latin_words_apart(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel
) -> None:
    """Spaces between words written in Latin letters still count: "1 Century Ave" is
    not "1 Centuryave"."""
    grant(
        client,
        app1,
        scope="standing",
        recipient_phone="13812345678",
        address="1 Centuryave",
        method="locker",
    )
    receipt = push_drop(client, auth, parcel.tracking_no, now(), dt.timedelta(0))
    assert [f["kind"] for f in receipt["flags_raised"]] == ["unauthorized_locker_drop"]


@pytest.mark.parametrize(
    ("consent_minutes", "flagged"),
    [(-2, None), (2, "consent_after_drop")],
    ids=["granted-before", "granted-after"],
)
def test_a_pda_clock_five_minutes_fast_is_corrected_before_judging(
    client: FlaskClient,
    auth: Auth,
    app1: dict[str, str],
    parcel: Parcel,
    session: Session,
    consent_minutes: int,
    flagged: str | None,
) -> None:
    """The drop happened at T (server clock); the PDA stamped it T+5. A consent granted
    at T-2 authorizes it once the clock is corrected; one at T+2 does not."""
    drop_at = now() - dt.timedelta(minutes=20)
    at = (drop_at + dt.timedelta(minutes=consent_minutes)).isoformat()
    assert grant(client, app1, tracking_no=parcel.tracking_no, granted_at=at).status_code == 201
    receipt = push_drop(client, auth, parcel.tracking_no, drop_at, dt.timedelta(minutes=5))
    kinds = {f["kind"] for f in receipt["flags_raised"]} - {"clock_skew"}
    assert kinds == ({flagged} if flagged else set())


DROP_FLAGS = {"unauthorized_locker_drop", "consent_after_drop"}


def test_a_pda_clock_set_back_before_the_push_does_not_date_the_drop_after_the_consent(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel, session: Session
) -> None:
    """The drop happened at T-40 on a PDA whose clock was right; the recipient consented
    at T-30, after it. The courier set the PDA's clock back an hour before pushing: the
    offset measured at the push moves the drop to about now, after the consent. The
    server cannot tell when the clock moved, so the drop is judged over the whole span
    between its device time and its corrected time: the consent came after it."""
    drop_at = now() - dt.timedelta(minutes=40)
    at = (drop_at + dt.timedelta(minutes=10)).isoformat()
    assert grant(client, app1, tracking_no=parcel.tracking_no, granted_at=at).status_code == 201
    receipt = push_drop(
        client, auth, parcel.tracking_no, drop_at, dt.timedelta(0), -dt.timedelta(hours=1)
    )
    kinds = {f["kind"] for f in receipt["flags_raised"]}
    assert kinds & DROP_FLAGS == {"consent_after_drop"}, kinds
    assert flag_status(session, "unauthorized_locker_drop", parcel.tracking_no) is None


def test_a_pda_clock_set_forward_before_the_push_does_not_date_the_drop_before_a_revocation(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel, session: Session
) -> None:
    """The consent was revoked, then the drop happened on a PDA whose clock was right;
    the courier set the PDA's clock an hour forward before pushing: the offset measured
    at the push moves the drop an hour back, when the consent was still in force. It
    must be in force at the latest time the drop may have happened: it was not."""
    consent = grant(
        client,
        app1,
        tracking_no=parcel.tracking_no,
        granted_at=(now() - dt.timedelta(hours=3)).isoformat(),
    ).get_json()
    revoked = client.post(f"{URL}/{consent['id']}/revoke", json={}, headers=app1)
    assert revoked.status_code == 200
    drop_at = now()  # after the revocation
    receipt = push_drop(
        client, auth, parcel.tracking_no, drop_at, dt.timedelta(0), dt.timedelta(hours=1)
    )
    kinds = {f["kind"] for f in receipt["flags_raised"]}
    assert kinds & DROP_FLAGS == {"unauthorized_locker_drop"}, kinds


def test_a_drop_stamped_before_the_pdas_previous_scan_is_judged_after_it(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel, session: Session
) -> None:
    """Rule 6: the consent expired 20 minutes ago; the courier took the parcel out for
    delivery 10 minutes ago (seq 2), then set the PDA's clock back to stamp the drop
    (seq 3) 30 minutes ago, and put it right before the push (no offset shows it). The
    seqs say the drop followed the scan at T-10, when the consent had expired: it is
    unauthorized, and the auditor's proof names no consent that authorized it."""
    expired = now() - dt.timedelta(minutes=20)
    granted = grant(
        client,
        app1,
        tracking_no=parcel.tracking_no,
        granted_at=(now() - dt.timedelta(hours=3)).isoformat(),
        expires_at=expired.isoformat(),
    )
    assert granted.status_code == 201, granted.get_json()
    tn = parcel.tracking_no
    events = [
        factories.event(1, tn, occurred_at=now() - dt.timedelta(hours=1)),
        factories.event(2, tn, "out_for_delivery", occurred_at=now() - dt.timedelta(minutes=10)),
        factories.event(
            3,
            tn,
            "delivered_to_locker",
            occurred_at=now() - dt.timedelta(minutes=30),
            locker_id="L-1",
            compartment="7",
            pod={"pickup_code": "4821"},
        ),
    ]
    kinds, proof = push_and_read_the_proof(client, auth, session, events)
    assert kinds & DROP_FLAGS == {"unauthorized_locker_drop"}, kinds
    assert "time_inversion" in kinds
    assert proof["authorizing_consent"] is None
    assert "unauthorized_locker_drop" in {f["kind"] for f in proof["flags"]}
    between = proof["judged_between"]  # from its stamp to the scan before it (corrected)
    scan = session.scalar(select(ScanEvent.occurred_at).where(ScanEvent.seq == 2))
    assert between["earliest"] == proof["occurred_at"]
    assert dt.datetime.fromisoformat(between["latest"]) == scan


def test_a_drop_stamped_after_the_pdas_next_scan_of_another_parcel_counts_before_it(
    app: Flask,
    client: FlaskClient,
    auth: Auth,
    app1: dict[str, str],
    parcel: Parcel,
    session: Session,
    world: World,
) -> None:
    """Rule 6 across parcels: the recipient consented 30 minutes ago; the courier set
    the PDA's clock forward to stamp the drop (seq 2) 20 minutes ago, then put it
    right and scanned the next parcel (seq 3) 40 minutes ago. The drop happened by
    then, before the consent: ``consent_after_drop``, and the auditor's proof says
    when the drop was judged to have happened, and names no consent."""
    consent_at = (now() - dt.timedelta(minutes=30)).isoformat()
    granted = grant(client, app1, tracking_no=parcel.tracking_no, granted_at=consent_at)
    assert granted.status_code == 201, granted.get_json()
    tn, other = parcel.tracking_no, factories.parcel(session, world.station).tracking_no
    session.commit()
    events = [
        factories.event(1, tn, occurred_at=now() - dt.timedelta(hours=1)),
        factories.locker_drop(2, tn, now() - dt.timedelta(minutes=20)),
        factories.event(3, other, occurred_at=now() - dt.timedelta(minutes=40)),
    ]
    kinds, proof = push_and_read_the_proof(client, auth, session, events)
    assert kinds & DROP_FLAGS == {"consent_after_drop"}, kinds
    assert proof["authorizing_consent"] is None
    scanned = session.scalar(select(ScanEvent.occurred_at).where(ScanEvent.seq == 3))
    assert dt.datetime.fromisoformat(proof["judged_between"]["earliest"]) == scanned
    assert proof["judged_between"]["latest"] == proof["occurred_at"]
    page = signed_in(app, "auditor1").get(f"/web/proofs/{proof['event_id']}")
    assert "<dt>Judged between</dt>" in page


def test_an_honest_pda_drifting_within_the_bound_keeps_a_consent_given_at_the_door(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel, session: Session
) -> None:
    """A PDA 90 s slow (within ``CLOCK_SKEW_FLAG_SECONDS``), the recipient consenting
    30 s before the drop: the drop is judged at its corrected time, and authorized."""
    drop_at = now() - dt.timedelta(minutes=5)
    at = (drop_at - dt.timedelta(seconds=30)).isoformat()
    assert grant(client, app1, tracking_no=parcel.tracking_no, granted_at=at).status_code == 201
    receipt = push_drop(client, auth, parcel.tracking_no, drop_at, -dt.timedelta(seconds=90))
    assert receipt["flags_raised"] == []
    assert flag_status(session, "consent_after_drop", parcel.tracking_no) is None


def test_a_pda_consistently_off_beyond_the_bound_keeps_a_consent_granted_well_before(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel, session: Session
) -> None:
    """A PDA 10 minutes slow at the drop and at the push: its drop may have happened
    anywhere in the ten minutes between device and corrected time. A consent granted
    before all of them authorizes it (only the device's ``clock_skew`` is raised)."""
    drop_at = now() - dt.timedelta(minutes=20)
    at = (drop_at - dt.timedelta(minutes=15)).isoformat()
    assert grant(client, app1, tracking_no=parcel.tracking_no, granted_at=at).status_code == 201
    receipt = push_drop(client, auth, parcel.tracking_no, drop_at, -dt.timedelta(minutes=10))
    assert {f["kind"] for f in receipt["flags_raised"]} == {"clock_skew"}


def test_a_revocation_after_the_push_arrived_does_not_reach_back_to_a_fast_pdas_drop(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel, session: Session
) -> None:
    """A PDA 20 minutes fast at the drop and at the push: its drop, 10 minutes ago, is
    judged over the span up to its device time, 10 minutes from now. But the drop cannot
    have happened after its push reached the server: a consent revoked after that was
    in force whenever the drop happened, and the drop stays authorized."""
    consent = grant(
        client,
        app1,
        tracking_no=parcel.tracking_no,
        granted_at=(now() - dt.timedelta(hours=3)).isoformat(),
    ).get_json()
    drop_at = now() - dt.timedelta(minutes=10)
    receipt = push_drop(client, auth, parcel.tracking_no, drop_at, dt.timedelta(minutes=20))
    assert {f["kind"] for f in receipt["flags_raised"]} == {"clock_skew"}
    revoked = client.post(f"{URL}/{consent['id']}/revoke", json={}, headers=app1)
    assert revoked.status_code == 200
    assert flag_status(session, "unauthorized_locker_drop", parcel.tracking_no) is None


def test_a_consent_arriving_later_but_granted_before_closes_the_flag(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel, session: Session
) -> None:
    drop_at = now() - dt.timedelta(minutes=20)
    receipt = push_drop(client, auth, parcel.tracking_no, drop_at, dt.timedelta(0))
    assert [f["kind"] for f in receipt["flags_raised"]] == ["unauthorized_locker_drop"]
    earlier = (drop_at - dt.timedelta(minutes=10)).isoformat()
    grant(client, app1, tracking_no=parcel.tracking_no, granted_at=earlier, channel="phone_call")
    assert flag_status(session, "unauthorized_locker_drop", parcel.tracking_no) == (
        FlagStatus.CLOSED
    )
    flag = session.scalars(select(Flag).where(Flag.kind == "unauthorized_locker_drop")).one()
    assert "rule holds" in flag.closed_reason


def test_revoking_after_the_drop_keeps_the_drop_authorized_but_revoked_before_does_not(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel, session: Session
) -> None:
    consent = grant(client, app1, tracking_no=parcel.tracking_no).get_json()
    push_drop(client, auth, parcel.tracking_no, now() - dt.timedelta(minutes=20), dt.timedelta(0))
    revoke = client.post(f"{URL}/{consent['id']}/revoke", json={"reason": "moved"}, headers=app1)
    assert revoke.status_code == 200 and revoke.get_json()["revoked_reason"] == "moved"
    assert flag_status(session, "unauthorized_locker_drop", parcel.tracking_no) is None
    again = client.post(f"{URL}/{consent['id']}/revoke", json={}, headers=app1)
    assert again.get_json()["revoked_at"] == revoke.get_json()["revoked_at"]


def test_a_consent_for_another_locker_leaves_the_drop_unauthorized(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel
) -> None:
    grant(client, app1, tracking_no=parcel.tracking_no, point_id="L-9")
    receipt = push_drop(
        client, auth, parcel.tracking_no, now() - dt.timedelta(minutes=5), dt.timedelta(0)
    )
    assert [f["kind"] for f in receipt["flags_raised"]] == ["unauthorized_locker_drop"]


def test_a_point_a_channel_sends_with_spaces_is_the_point_the_pda_names(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel, session: Session
) -> None:
    """A PDA's locker id is stored trimmed, as every text a PDA sends: a channel's
    consent for " L-1 " is for locker L-1, and its drop there is authorized. A blank
    point names no point, and is refused rather than taken for any point."""
    granted = grant(client, app1, tracking_no=parcel.tracking_no, point_id=" L-1 ")
    assert granted.status_code == 201 and granted.get_json()["point_id"] == "L-1"
    receipt = push_drop(
        client, auth, parcel.tracking_no, now() - dt.timedelta(minutes=5), dt.timedelta(0)
    )
    assert receipt["flags_raised"] == []
    blank = grant(client, app1, tracking_no=parcel.tracking_no, method="any", point_id=" ")
    assert blank.status_code == 422 and blank.get_json()["code"] == "blank_point_id"
    blank = grant(client, app1, tracking_no=parcel.tracking_no, point_id="")
    assert blank.status_code == 422 and blank.get_json()["code"] == "blank_point_id"


def test_point_ids_compare_whatever_their_case(
    client: FlaskClient, auth: Auth, app1: dict[str, str], session: Session, world: World
) -> None:
    """The recipient's app spelt the point ``pp-12``, the courier's PDA ``PP-12`` (or
    the other way round, with spaces): the same point. Each is stored upper-case, and
    the drop there is authorized."""
    parcels = [factories.parcel(session, world.station).tracking_no for _ in range(2)]
    session.commit()
    for tracking_no, consented in zip(parcels, ("pp-12", " PP-12 "), strict=True):
        consent = grant(
            client, app1, tracking_no=tracking_no, method="pickup_point", point_id=consented
        )
        assert consent.get_json()["point_id"] == "PP-12"
    at = now() - dt.timedelta(minutes=5)
    events = [
        factories.event(n + 1, tracking_no, occurred_at=at - dt.timedelta(hours=1))
        for n, tracking_no in enumerate(parcels)
    ] + [
        factories.event(
            n + 3,
            tracking_no,
            "delivered_to_pickup_point",
            occurred_at=at,
            point_id=dropped,
            pod={"pickup_code": "4821"},
        )
        for n, (tracking_no, dropped) in enumerate(zip(parcels, ("PP-12", "pp-12 "), strict=True))
    ]
    pushed = client.post(
        "/api/v1/sync/push",
        json=factories.push_body("PDA-0001", events),
        headers=auth.headers("courier1", "PDA-0001"),
    ).get_json()
    assert pushed["flags_raised"] == []
    stored = session.scalars(
        select(ScanEvent.details).where(ScanEvent.type == "delivered_to_pickup_point")
    ).all()
    assert [d["point_id"] for d in stored] == ["PP-12", "PP-12"]


def test_consent_captured_on_the_pda_before_the_drop_authorizes_it(
    client: FlaskClient, auth: Auth, parcel: Parcel, session: Session
) -> None:
    at = now() - dt.timedelta(minutes=30)
    tn = parcel.tracking_no
    events = [
        factories.event(1, tn, occurred_at=at),
        factories.event(
            2,
            tn,
            "consent_captured",
            occurred_at=at + dt.timedelta(minutes=1),
            consent={"method": "locker", "channel": "in_person"},
        ),
        factories.event(
            3,
            tn,
            "delivered_to_locker",
            occurred_at=at + dt.timedelta(minutes=2),
            locker_id="L-1",
            compartment="2",
            pod={"pickup_code": "4821"},
        ),
    ]
    body = factories.push_body("PDA-0001", events)
    receipt = client.post(
        "/api/v1/sync/push", json=body, headers=auth.headers("courier1", "PDA-0001")
    ).get_json()
    assert receipt["flags_raised"] == []
    captured = session.scalars(select(Consent)).one()
    assert (captured.device_id, captured.seq, captured.channel) == ("PDA-0001", 2, "in_person")
    assert captured.event_id is not None


def test_a_consent_captured_then_voided_on_the_pda_is_shown_voided_and_not_in_force(
    client: FlaskClient, auth: Auth, parcel: Parcel, session: Session
) -> None:
    """The rules drop a consent whose capture the courier voided; the consents an
    auditor or a manager lists say so, and ``active`` leaves it out."""
    at = now() - dt.timedelta(minutes=30)
    tn = parcel.tracking_no
    captured = factories.event(
        2,
        tn,
        "consent_captured",
        occurred_at=at + dt.timedelta(minutes=1),
        consent={"method": "any", "channel": "in_person"},
    )
    correction = factories.event(
        3,
        tn,
        "correction",
        occurred_at=at + dt.timedelta(minutes=2),
        voids_client_event_id=captured["client_event_id"],
        reason="the recipient said no",
    )
    auth.push([factories.event(1, tn, occurred_at=at), captured])
    auth.push([correction, factories.locker_drop(4, tn, at + dt.timedelta(minutes=10))])
    assert flag_status(session, "unauthorized_locker_drop", tn) == FlagStatus.OPEN
    for reader in ("auditor1", "manager1"):
        query = {"tracking_no": tn}
        listed = client.get(URL, query_string=query, headers=auth.headers(reader)).get_json()
        assert [c["voided"] for c in listed["items"]] == [True]
        one = client.get(f"{URL}/{listed['items'][0]['id']}", headers=auth.headers(reader))
        assert one.get_json()["voided"] is True
        active = client.get(
            URL, query_string={**query, "active": "true"}, headers=auth.headers(reader)
        )
        assert active.get_json()["items"] == []
    granted = grant(client, auth.headers("app1"), tracking_no=tn, granted_at=at.isoformat())
    assert granted.status_code == 201 and granted.get_json()["voided"] is False
    active = client.get(
        URL, query_string={"tracking_no": tn, "active": "true"}, headers=auth.headers("auditor1")
    )
    assert [c["id"] for c in active.get_json()["items"]] == [granted.get_json()["id"]]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({}, 422, "tracking_no_required"),
        ({"tracking_no": "RR473124829GB"}, 404, "parcel_not_found"),
        ({"scope": "standing", "address": "1 Road"}, 422, "recipient_required"),
        ({"scope": "standing", "recipient_phone": "13812345678"}, 422, "recipient_required"),
        ({"scope": "standing", "recipient_phone": "12", "address": "A"}, 422, None),
        ({"method": "any", "point_id": "L-1", "tracking_no": "T"}, 422, "point_without_method"),
        ({"station": "ST1", "tracking_no": "T"}, 422, "station_not_expected"),
        ({"method": "drone"}, 422, "validation_error"),
    ],
)
def test_bad_consents_are_refused_naming_the_field(
    client: FlaskClient, app1: dict[str, str], body: dict[str, Any], status: int, code: str | None
) -> None:
    response = grant(client, app1, **body)
    assert response.status_code == status, response.get_json()
    if code:
        assert response.get_json()["code"] == code


def test_a_standing_consent_sent_without_its_scope_is_told_to_name_it(
    client: FlaskClient, app1: dict[str, str]
) -> None:
    """A recipient channel sending a standing consent (phone + address) as README's
    table described it, without ``scope``, read "a parcel consent names its tracking
    number": nothing said a consent is a parcel's unless ``scope`` says ``standing``."""
    response = grant(client, app1, recipient_phone="13812345678", address="1 Road")
    assert response.status_code == 422
    body = response.get_json()
    assert body["code"] == "tracking_no_required"
    assert '"scope": "standing"' in body["message"]


def test_times_must_make_sense(client: FlaskClient, app1: dict[str, str], parcel: Parcel) -> None:
    future = (now() + dt.timedelta(hours=1)).isoformat()
    response = grant(client, app1, tracking_no=parcel.tracking_no, granted_at=future)
    assert response.get_json()["code"] == "granted_in_future"
    response = grant(
        client,
        app1,
        tracking_no=parcel.tracking_no,
        expires_at=(now() - dt.timedelta(hours=2)).isoformat(),
    )
    assert response.get_json()["code"] == "expires_before_granted"


@pytest.mark.parametrize(
    ("username", "device", "post", "read"),
    [
        ("app1", None, 201, 200),
        ("admin", None, 201, 200),
        ("auditor1", None, 403, 200),
        ("manager1", None, 403, 200),
        ("courier1", "PDA-0001", 403, 403),
    ],
)
def test_who_may_grant_and_read(
    client: FlaskClient,
    auth: Auth,
    parcel: Parcel,
    username: str,
    device: str | None,
    post: int,
    read: int,
) -> None:
    headers = auth.headers(username, device)
    assert grant(client, headers, tracking_no=parcel.tracking_no).status_code == post
    assert client.get(URL, headers=headers).status_code == read


def test_managers_see_their_station_and_standing_consents_for_all(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel
) -> None:
    own = grant(client, app1, tracking_no=parcel.tracking_no).get_json()
    everywhere = grant(
        client, app1, scope="standing", recipient_phone="13900000000", address="9 Rd"
    ).get_json()
    elsewhere = grant(
        client,
        app1,
        scope="standing",
        recipient_phone="13900000001",
        address="8 Rd",
        station="ST2",
    ).get_json()
    seen = client.get(URL, headers=auth.headers("manager1")).get_json()["items"]
    assert [c["id"] for c in seen] == [own["id"], everywhere["id"]]
    hidden = client.get(f"{URL}/{elsewhere['id']}", headers=auth.headers("manager1"))
    assert (hidden.status_code, hidden.get_json()["code"]) == (404, "consent_not_found")
    active = client.get(
        URL, query_string={"active": "true", "tracking_no": parcel.tracking_no}, headers=app1
    ).get_json()["items"]
    assert [c["id"] for c in active] == [own["id"]]


def test_the_consents_covering_a_parcel_include_the_standing_one_that_authorized_its_drop(
    client: FlaskClient, auth: Auth, session: Session, app1: dict[str, str], parcel: Parcel
) -> None:
    """An auditor settling a dispute reads the drop's proof (a standing consent
    authorized it), then asks for every consent on record for the parcel: ``covering``
    gives its own and the standing ones for its recipient and address, not another
    recipient's; ``tracking_no`` still gives those naming it."""
    own = grant(client, app1, tracking_no=parcel.tracking_no, method="pickup_point").get_json()
    standing = grant(
        client,
        app1,
        scope="standing",
        recipient_phone=parcel.recipient_phone,
        address=parcel.address.upper(),
        granted_at=(now() - dt.timedelta(hours=3)).isoformat(),
    ).get_json()
    grant(client, app1, scope="standing", recipient_phone="13900000000", address="9 Rd")
    push_drop(client, auth, parcel.tracking_no, now() - dt.timedelta(minutes=30), dt.timedelta(0))
    auditor = auth.headers("auditor1")
    drop = session.scalar(select(ScanEvent.id).where(ScanEvent.type == "delivered_to_locker"))
    proof = client.get(f"/api/v1/proofs/{drop}", headers=auditor).get_json()
    assert proof["authorizing_consent"]["id"] == standing["id"]

    def listed(**query: str) -> list[int]:
        page = client.get(URL, query_string=query, headers=auditor)
        assert page.status_code == 200, page.get_json()
        return [c["id"] for c in page.get_json()["items"]]

    assert listed(covering=parcel.tracking_no) == [own["id"], standing["id"]]
    assert listed(tracking_no=parcel.tracking_no) == [own["id"]]
    assert listed(covering=factories.s10()) == []  # not taken in, nothing captured for it


def test_covering_does_not_tell_a_manager_the_recipient_of_another_stations_parcel(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """A parcel of ST1 answers ST2's manager what an unknown one answers (its proof, its
    parcel page: 404). ``covering=<its tracking number>`` must not hand ST2's manager
    the standing consent of its recipient: that links the parcel to its recipient's
    address and phone, and shows the parcel exists."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    standing = client.post(
        "/api/v1/consents",
        json={
            "scope": "standing",
            "recipient_phone": parcel.recipient_phone,
            "address": parcel.address,
            "method": "locker",
            "channel": "app",
            "granted_at": (now() - dt.timedelta(hours=1)).isoformat(),
        },
        headers=auth.headers("app1"),
    )
    assert standing.status_code == 201, standing.get_json()
    other = auth.headers("manager2")
    # What ST2's manager gets for the parcel elsewhere: nothing.
    assert client.get(f"/api/v1/parcels/{parcel.tracking_no}", headers=other).status_code == 404
    page = client.get(
        "/api/v1/consents", query_string={"covering": parcel.tracking_no}, headers=other
    )
    assert page.status_code == 200, page.get_json()
    leaked = [(c["id"], c["address"]) for c in page.get_json()["items"]]
    assert leaked == [], f"ST2's manager learns the recipient of ST1's parcel: {leaked}"


def test_a_recipients_consent_history_by_phone_includes_the_consents_of_their_parcels(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel
) -> None:
    """An auditor (or the recipient's channel) asks for a recipient's consent history by
    phone. Only standing consents name a phone: the consents for their parcel, one by
    SMS and one captured at the door on the PDA, are found through the parcel's
    recipient phone. Another recipient's standing consent is not theirs. Managers,
    who see phones masked, may not search by one."""
    by_sms = grant(client, app1, tracking_no=parcel.tracking_no, channel="sms").get_json()
    standing = grant(
        client, app1, scope="standing", recipient_phone=parcel.recipient_phone, address="9 Rd"
    ).get_json()
    grant(client, app1, scope="standing", recipient_phone="13900000000", address="9 Rd")
    at = now() - dt.timedelta(hours=1)
    auth.push(
        [
            factories.event(1, parcel.tracking_no, occurred_at=at),
            factories.event(
                2,
                parcel.tracking_no,
                "consent_captured",
                occurred_at=at,
                consent={"method": "any", "channel": "in_person"},
            ),
        ]
    )

    def history(headers: dict[str, str]) -> list[int]:
        query = {"recipient_phone": parcel.recipient_phone}
        page = client.get(URL, query_string=query, headers=headers)
        assert page.status_code == 200, page.get_json()
        return [c["id"] for c in page.get_json()["items"]]

    def refused(headers: dict[str, str]) -> int:
        query = {"recipient_phone": parcel.recipient_phone}
        return client.get(URL, query_string=query, headers=headers).status_code

    covering = client.get(
        URL, query_string={"covering": parcel.tracking_no}, headers=auth.headers("auditor1")
    ).get_json()["items"]
    at_the_door = [c["id"] for c in covering if c["channel"] == "in_person"]
    assert len(at_the_door) == 1
    assert history(auth.headers("auditor1")) == [by_sms["id"], standing["id"], *at_the_door]
    assert history(app1) == [by_sms["id"], standing["id"], *at_the_door]
    # Managers see phones masked: a search by a whole phone is not theirs (it would test
    # guesses of the hidden digits against every station's standing consents).
    assert refused(auth.headers("manager1")) == refused(auth.headers("manager2")) == 403


def _courier_pulling(app: Flask, code: str) -> tuple[FlaskClient, Auth, str, str]:
    """A courier of a new station has checked a parcel out on their PDA and pulled:
    the client, its ``Auth``, the parcel's tracking number and the pull's cursor.
    ``code`` (lower case) names them: the station is its upper case, its integration
    account ``<code>-app``, its courier ``<code>-courier`` on ``PDA-<code>``."""
    with app.app_context():
        session = db.session
        station = factories.station(session, code=code.upper())
        factories.user(session, f"{code}-courier", "courier", station)
        factories.user(session, f"{code}-app", "integration")
        factories.device(session, f"PDA-{code}", station)
        tracking_no = factories.parcel(session, station).tracking_no
        session.commit()
    client = app.test_client()
    auth = Auth(client)
    courier = auth.headers(f"{code}-courier", f"PDA-{code}")
    body = factories.push_body(f"PDA-{code}", [factories.event(1, tracking_no)])
    assert client.post("/api/v1/sync/push", json=body, headers=courier).status_code == 200
    cursor = client.get("/api/v1/sync/pull", headers=courier).get_json()["next_cursor"]
    return client, auth, tracking_no, cursor


def test_the_courier_holding_the_parcel_pulls_its_consents(committed_app: Flask) -> None:
    client, auth, tracking_no, cursor = _courier_pulling(committed_app, "cons")
    courier = auth.headers("cons-courier", "PDA-cons")
    grant(client, auth.headers("cons-app"), tracking_no=tracking_no, point_id="L-4")
    page = client.get("/api/v1/sync/pull", query_string={"cursor": cursor}, headers=courier)
    changes = page.get_json()["changes"]
    assert [(c["kind"], c["tracking_no"]) for c in changes] == [("consent", tracking_no)]
    assert changes[0]["parcel"]["consents"] == [
        {"method": "locker", "point_id": "L-4", "expires_at": None}
    ]


def test_a_consent_stamped_by_a_clock_running_ahead_is_in_force_once_recorded(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel, session: Session
) -> None:
    """The SMS gateway's clock runs four minutes ahead (within the five the API accepts):
    its consent says it was granted four minutes from now. It was recorded now, so it
    was given by now; but it was kept as sent, and a drop a minute later was flagged
    ``consent_after_drop``. It is kept as granted when it was recorded, the time sent
    being on its audit entry."""
    auth.push([factories.event(1, parcel.tracking_no, occurred_at=now() - dt.timedelta(hours=1))])
    sent = now() + dt.timedelta(minutes=4)
    body = {"tracking_no": parcel.tracking_no, "granted_at": sent.isoformat()}
    response = grant(client, app1, client_consent_id="sms-ahead", **body)
    assert response.status_code == 201, response.get_json()
    consent = response.get_json()
    assert consent["granted_at"] == consent["created_at"]
    retry = grant(client, app1, client_consent_id="sms-ahead", **body)  # a moment later
    assert retry.status_code == 201 and retry.get_json() == consent

    auth.push([factories.locker_drop(2, parcel.tracking_no, now())])
    session.expire_all()
    kinds = set(session.scalars(select(Flag.kind).where(Flag.subject_key == parcel.tracking_no)))
    assert kinds & DROP_FLAGS == set()
    entry = session.scalars(select(AuditEntry).where(AuditEntry.action == "consent_granted")).one()
    recorded = dt.datetime.fromisoformat(consent["granted_at"])
    assert dt.datetime.fromisoformat(entry.details["granted_at"]) == recorded
    assert dt.datetime.fromisoformat(entry.details["granted_at_sent"]) == sent


def test_the_pda_pulls_a_consent_stamped_by_a_clock_running_ahead(committed_app: Flask) -> None:
    """The courier's PDA, pulling as soon as the consent is recorded, got no consent in
    force (its grant was minutes ahead) and was never told again."""
    client, auth, tracking_no, cursor = _courier_pulling(committed_app, "ahead")
    courier = auth.headers("ahead-courier", "PDA-ahead")
    ahead = (now() + dt.timedelta(minutes=4)).isoformat()
    assert grant(client, auth.headers("ahead-app"), tracking_no=tracking_no, granted_at=ahead)
    page = client.get("/api/v1/sync/pull", query_string={"cursor": cursor}, headers=courier)
    changes = page.get_json()["changes"]
    assert [(c["kind"], c["tracking_no"]) for c in changes] == [("consent", tracking_no)]
    assert changes[0]["parcel"]["consents"] == [
        {"method": "locker", "point_id": None, "expires_at": None}
    ]


def test_a_resolved_flag_reopens_when_the_rule_fails_again_on_new_events(
    client: FlaskClient, auth: Auth, parcel: Parcel, session: Session
) -> None:
    drop_at = now() - dt.timedelta(hours=2)
    receipt = push_drop(client, auth, parcel.tracking_no, drop_at, dt.timedelta(0))
    flag_id = receipt["flags_raised"][0]["flag_id"]
    resolved = client.post(
        f"/api/v1/flags/{flag_id}/resolve",
        json={"note": "recipient confirmed by phone"},
        headers=auth.headers("manager1"),
    )
    assert resolved.status_code == 200, resolved.get_json()
    again = [
        factories.event(3, parcel.tracking_no, occurred_at=drop_at + dt.timedelta(minutes=30)),
        factories.event(
            4,
            parcel.tracking_no,
            "delivered_to_locker",
            occurred_at=drop_at + dt.timedelta(minutes=40),
            locker_id="L-2",
            compartment="1",
            pod={"pickup_code": "1"},
        ),
    ]
    receipt = client.post(
        "/api/v1/sync/push",
        json=factories.push_body("PDA-0001", again),
        headers=auth.headers("courier1", "PDA-0001"),
    ).get_json()
    assert flag_id in [f["flag_id"] for f in receipt["flags_raised"]]
    assert flag_status(session, "unauthorized_locker_drop", parcel.tracking_no) == FlagStatus.OPEN


def test_a_consent_captured_before_its_parcel_was_taken_in_elsewhere_is_seen_there(
    client: FlaskClient, auth: Auth, world: World, session: Session
) -> None:
    """A courier of ST1 captures a consent for a parcel no station has taken in yet:
    the consent is ST1's. ST2 then takes the parcel in: its manager lists and reads the
    consent on record for the parcel; a third station's does not."""
    tracking_no = factories.s10()
    captured = factories.event(
        1,
        tracking_no,
        "consent_captured",
        consent={"method": "locker", "channel": "in_person"},
    )
    pushed = client.post(
        "/api/v1/sync/push",
        json=factories.push_body("PDA-0001", [captured]),
        headers=auth.headers("courier1", "PDA-0001"),
    )
    assert pushed.status_code == 200, pushed.get_json()
    consent = session.scalars(select(Consent).where(Consent.tracking_no == tracking_no)).one()
    assert consent.station_id == world.station.id
    third = factories.station(session, code="ST3")
    factories.user(session, "manager3", "station_manager", third)
    factories.parcel(session, world.other_station, tracking_no=tracking_no)
    session.commit()

    def listed(manager: str) -> list[int]:
        page = client.get(
            URL, query_string={"tracking_no": tracking_no}, headers=auth.headers(manager)
        )
        assert page.status_code == 200
        return [c["id"] for c in page.get_json()["items"]]

    assert listed("manager2") == [consent.id]  # the parcel's station now
    assert listed("manager1") == [consent.id]  # its courier captured it
    assert listed("manager3") == []
    read = {
        m: client.get(f"{URL}/{consent.id}", headers=auth.headers(m)).status_code
        for m in ("manager1", "manager2", "manager3")
    }
    assert read == {"manager1": 200, "manager2": 200, "manager3": 404}


def capture_at_the_door(
    client: FlaskClient,
    auth: Auth,
    session: Session,
    tracking_no: str,
    at: dt.datetime,
    courier: tuple[str, str] = ("courier2", "PDA-0002"),
    seq: int = 1,
) -> Consent:
    """``courier`` (username, PDA) pushes an in-person locker consent for the parcel,
    captured at ``at`` (``seq`` on the PDA): the consent recorded."""
    captured = factories.event(
        seq,
        tracking_no,
        "consent_captured",
        occurred_at=at,
        consent={"method": "locker", "channel": "in_person", "evidence": "asked at the door"},
    )
    pushed = client.post(
        "/api/v1/sync/push",
        json=factories.push_body(courier[1], [captured]),
        headers=auth.headers(*courier),
    )
    assert pushed.status_code == 200, pushed.get_json()
    return session.scalars(select(Consent).where(Consent.tracking_no == tracking_no)).one()


def test_a_consent_captured_on_another_stations_pda_does_not_authorize_this_stations_drop(
    client: FlaskClient, auth: Auth, world: World, parcel: Parcel, session: Session
) -> None:
    """SECURITY.md threat 2: a courier of ST2, on ST2's PDA, records an in-person consent
    for an express parcel of ST1 they never held (its tracking number is all it takes;
    online, their consent request for it is not even sent). Ten minutes later ST1's
    courier leaves the parcel in a locker without asking: the drop is unauthorized, its
    flag names the consent as captured at another station, no proof names it as
    authorizing, and ST1's PDA is not told of it as a consent in force."""
    factories.user(session, "courier2", "courier", world.other_station)
    session.commit()
    t = now()
    tn = parcel.tracking_no
    auth.push([factories.event(1, tn, occurred_at=t - dt.timedelta(minutes=60))])
    forged = capture_at_the_door(client, auth, session, tn, t - dt.timedelta(minutes=30))
    assert forged.captured_at_station_id == world.other_station.id
    assert forged.station_id == world.station.id  # filed under the parcel's station
    pulled = client.get("/api/v1/sync/pull", headers=auth.headers("courier1", "PDA-0001"))
    held = {c["tracking_no"]: c["parcel"] for c in pulled.get_json()["changes"]}
    assert held[tn]["consents"] == []

    auth.push([factories.locker_drop(2, tn, t - dt.timedelta(minutes=20))])

    drop = session.scalar(select(ScanEvent.id).where(ScanEvent.type == "delivered_to_locker"))
    for reader in ("manager1", "auditor1"):
        proof = client.get(f"/api/v1/proofs/{drop}", headers=auth.headers(reader)).get_json()
        assert (proof["consent_required"], proof["authorizing_consent"]) == (True, None)
    flag = session.scalars(select(Flag).where(Flag.kind == "unauthorized_locker_drop")).one()
    assert (flag.subject_key, flag.station_id) == (tn, world.station.id)
    assert flag.status == FlagStatus.OPEN and flag.evidence["event_ids"] == [drop]
    assert flag.evidence["captured_at_other_station"] == [forged.id]
    covering = {"covering": tn}
    on_record = client.get(URL, query_string=covering, headers=auth.headers("auditor1"))
    assert [c["id"] for c in on_record.get_json()["items"]] == [forged.id]
    # The auditor is told why it stands for nothing here: captured at the other station.
    [listed] = on_record.get_json()["items"]
    assert listed["captured_at_station_id"] == world.other_station.id
    in_force = client.get(
        URL, query_string={**covering, "active": "true"}, headers=auth.headers("auditor1")
    )
    assert in_force.get_json()["items"] == []  # it authorizes no drop of ST1's PDAs


def test_a_consent_captured_by_the_courier_of_another_station_holding_the_parcel_is_theirs(
    client: FlaskClient, auth: Auth, world: World, parcel: Parcel, session: Session
) -> None:
    """A parcel of ST1 mis-sorted to ST2: ST2's courier takes it out, asks the recipient
    at the door on ST2's PDA, then leaves it in a locker from that PDA. The consent
    authorizes the drop (the scans are flagged ``wrong_station``, nothing more)."""
    factories.user(session, "courier2", "courier", world.other_station)
    session.commit()
    t = now()
    tn = parcel.tracking_no
    checked_out = factories.event(1, tn, occurred_at=t - dt.timedelta(minutes=40))
    auth.push([checked_out], username="courier2", device_id="PDA-0002")
    consent = capture_at_the_door(client, auth, session, tn, t - dt.timedelta(minutes=30), seq=2)
    drop = factories.locker_drop(3, tn, t - dt.timedelta(minutes=20))
    receipt = auth.push([drop], username="courier2", device_id="PDA-0002")
    assert {f["kind"] for f in receipt["flags_raised"]} <= {"wrong_station"}
    assert flag_status(session, "unauthorized_locker_drop", tn) is None
    drop_id = session.scalar(select(ScanEvent.id).where(ScanEvent.type == "delivered_to_locker"))
    proof = client.get(f"/api/v1/proofs/{drop_id}", headers=auth.headers("auditor1")).get_json()
    assert proof["authorizing_consent"]["id"] == consent.id


@pytest.mark.parametrize(
    ("granted_minutes", "flagged"),
    [(-10, None), (10, "consent_after_drop")],
    ids=["granted-before", "granted-after"],
)
def test_a_standing_consent_of_a_station_judges_a_drop_there_after_the_parcel_moved_on(
    client: FlaskClient,
    auth: Auth,
    app1: dict[str, str],
    parcel: Parcel,
    session: Session,
    world: World,
    granted_minutes: int,
    flagged: str | None,
) -> None:
    """The parcel was left in a locker at ST1 without consent, then re-routed to ST2.
    The recipient's standing consent limited to ST1 covers that drop (it was at ST1 then):
    granting it judges the parcel again, wherever the parcel is now, as it would have
    before the re-route."""
    drop_at = now() - dt.timedelta(minutes=20)
    receipt = push_drop(client, auth, parcel.tracking_no, drop_at, dt.timedelta(0))
    assert [f["kind"] for f in receipt["flags_raised"]] == ["unauthorized_locker_drop"]
    moved = {
        "tracking_no": parcel.tracking_no,
        "service_class": "express",
        "recipient_name": "Recipient",
        "address": "1 Century Ave",
        "recipient_phone": "+8613812345678",
        "station": "ST2",
    }
    taken = client.post(
        "/api/v1/parcels", json={"parcels": [moved]}, headers=auth.headers("admin")
    )
    assert taken.status_code == 200 and taken.get_json()["counts"]["rejected"] == 0
    session.expire_all()
    assert session.get(Parcel, parcel.id).station_id == world.other_station.id
    granted_at = (drop_at + dt.timedelta(minutes=granted_minutes)).isoformat()
    response = grant(
        client,
        app1,
        scope="standing",
        recipient_phone="+8613812345678",
        address="1 Century Ave",
        station="ST1",
        granted_at=granted_at,
    )
    assert response.status_code == 201, response.get_json()
    assert flag_status(session, "unauthorized_locker_drop", parcel.tracking_no) == (
        FlagStatus.CLOSED
    )
    if flagged:
        assert flag_status(session, flagged, parcel.tracking_no) == FlagStatus.OPEN


def test_a_phone_in_a_revocations_reason_is_masked_except_for_auditors(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel
) -> None:
    """The channel writes down how the recipient revoked, with the number they called
    from: only auditors read it whole, as the consent's own phone and evidence."""
    consent = grant(client, app1, tracking_no=parcel.tracking_no).get_json()
    reason = {"reason": "recipient called from +86 138 1234 5678"}
    revoked = client.post(f"{URL}/{consent['id']}/revoke", json=reason, headers=app1)
    assert revoked.status_code == 200
    assert revoked.get_json()["revoked_reason"] == "recipient called from +**********678"

    def shown(username: str) -> str:
        body = client.get(f"{URL}/{consent['id']}", headers=auth.headers(username)).get_json()
        return body["revoked_reason"]

    assert shown("manager1") == "recipient called from +**********678"
    assert shown("auditor1") == "recipient called from +86 138 1234 5678"


@pytest.mark.parametrize(
    "typed",
    [
        "SMS reply Y from 8613812345678",  # an SMS gateway's MSISDN: no "+"
        "SMS reply Y from 008613812345678",  # dialled from China: 00 86 ...
        "recipient called from 86-138-1234-5678",
    ],
)
def test_a_phone_typed_with_its_country_code_but_no_plus_is_masked_except_for_auditors(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel, typed: str
) -> None:
    """The SMS gateway writes the recipient's number into the consent's evidence as
    gateways write MSISDNs, country code first and no "+": a manager reading the consent
    and an admin reading the audit log see it masked, as any phone typed into free text;
    an auditor reads it whole."""
    granted = grant(client, app1, tracking_no=parcel.tracking_no, channel="sms", evidence=typed)
    assert granted.status_code == 201, granted.get_json()
    consent_id = granted.get_json()["id"]

    def digits(text: str) -> str:
        return "".join(c for c in text if c.isdigit())

    as_manager = client.get(f"{URL}/{consent_id}", headers=auth.headers("manager1"))
    assert as_manager.status_code == 200
    assert as_manager.get_json()["evidence"].endswith("*678")
    assert "1381234" not in digits(as_manager.get_json()["evidence"])

    entries = client.get(
        "/api/v1/audit",
        query_string={"action": "consent_granted"},
        headers=auth.headers("admin"),
    ).get_json()["items"]
    assert entries and "1381234" not in digits(entries[0]["details"]["evidence"])

    as_auditor = client.get(f"{URL}/{consent_id}", headers=auth.headers("auditor1"))
    assert as_auditor.get_json()["evidence"] == typed


def test_a_consent_says_who_recorded_it_and_who_revoked_it(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel, world: World
) -> None:
    """The recipient says they revoked the consent a courier's drop leaned on. Otherwise
    the consent shows neither who recorded it (the recipient's app, the SMS gateway, an
    admin) nor who revoked it and how: the auditor cannot settle the dispute. A second
    revocation (the app's) changes none of what the first (the admin's) stored."""
    consent = grant(client, app1, tracking_no=parcel.tracking_no).get_json()
    assert (consent["created_by"], consent["revoked_by"]) == (world.integration.id, None)
    revoke = {"reason": "recipient called the station", "channel": "phone_call"}
    revoked = client.post(
        f"{URL}/{consent['id']}/revoke", json=revoke, headers=auth.headers("admin")
    )
    assert revoked.status_code == 200, revoked.get_json()
    client.post(f"{URL}/{consent['id']}/revoke", json={"channel": "app"}, headers=app1)
    for reader in ("auditor1", "manager1", "app1"):
        seen = client.get(f"{URL}/{consent['id']}", headers=auth.headers(reader)).get_json()
        assert seen["revoked_at"] == revoked.get_json()["revoked_at"]
        assert (seen["created_by"], seen["revoked_by"], seen["revoked_channel"]) == (
            world.integration.id,
            world.admin.id,
            "phone_call",
        )
    listed = client.get(
        URL, query_string={"tracking_no": parcel.tracking_no}, headers=auth.headers("manager1")
    ).get_json()["items"]
    assert [(c["revoked_by"], c["recipient_phone"]) for c in listed] == [(world.admin.id, None)]


def test_a_consent_captured_on_a_pda_names_its_courier_and_pda(
    client: FlaskClient, auth: Auth, parcel: Parcel, world: World
) -> None:
    """Otherwise a consent the courier captured at the door reads like one from a
    recipient's channel, but for its event id."""
    at = now() - dt.timedelta(minutes=30)
    captured = factories.event(
        2, parcel.tracking_no, "consent_captured", occurred_at=at,
        consent={"method": "locker", "channel": "in_person"},
    )  # fmt: skip
    auth.push([factories.event(1, parcel.tracking_no, occurred_at=at), captured])
    query = {"tracking_no": parcel.tracking_no}
    [seen] = client.get(URL, query_string=query, headers=auth.headers("auditor1")).json["items"]
    assert (seen["created_by"], seen["device_id"]) == (world.courier.id, "PDA-0001")
    assert (seen["revoked_by"], seen["revoked_channel"]) == (None, None)


@pytest.mark.parametrize("channel", ["fax", "", None, 3])
def test_a_revocations_channel_is_one_a_consent_comes_through(
    client: FlaskClient, app1: dict[str, str], parcel: Parcel, channel: Any
) -> None:
    """Otherwise a channel nobody can revoke through would be stored as evidence."""
    consent = grant(client, app1, tracking_no=parcel.tracking_no).get_json()
    body = {"channel": channel}
    refused = client.post(f"{URL}/{consent['id']}/revoke", json=body, headers=app1)
    assert refused.status_code == 422
    assert list(refused.get_json()["errors"]["json"]) == ["channel"]
    unrevoked = client.get(f"{URL}/{consent['id']}", headers=app1).get_json()
    assert unrevoked["revoked_at"] is None


def test_a_bad_recipient_phone_filter_is_named_as_sent(
    client: FlaskClient, app1: dict[str, str]
) -> None:
    response = client.get(URL, query_string={"recipient_phone": "12"}, headers=app1)
    assert response.status_code == 422
    assert list(response.get_json()["errors"]) == ["recipient_phone"]


def test_a_consent_recorded_and_revoked_through_the_api_is_in_the_audit_log(
    client: FlaskClient, auth: Auth, app1: dict[str, str], world: World
) -> None:
    """The consent decides whether a locker drop was authorized: its row alone can be
    changed afterwards and nothing would tell. The audit log keeps what it said when
    recorded and when revoked (once: the second revocation changes nothing), with who
    did it; admins read the recipient's phone masked."""
    granted_at = (now() - dt.timedelta(hours=2)).replace(microsecond=0)
    consent = grant(
        client,
        app1,
        scope="standing",
        recipient_phone="+8613812345678",
        address="1 Gaoqiao Road",
        granted_at=granted_at.isoformat(),
    ).get_json()
    revoke = {"reason": "moved house", "channel": "phone_call"}
    client.post(f"{URL}/{consent['id']}/revoke", json=revoke, headers=auth.headers("admin"))
    client.post(f"{URL}/{consent['id']}/revoke", json={"channel": "app"}, headers=app1)
    query = {"subject_type": "consent", "subject_key": str(consent["id"])}
    entries = client.get(
        "/api/v1/audit", query_string=query, headers=auth.headers("auditor1")
    ).get_json()["items"]
    assert [(e["action"], e["actor_id"]) for e in entries] == [
        ("consent_revoked", world.admin.id),
        ("consent_granted", world.integration.id),
    ]
    revoked, recorded = (e["details"] for e in entries)
    assert dt.datetime.fromisoformat(recorded["granted_at"]) == granted_at
    assert (recorded["scope"], recorded["method"], recorded["channel"]) == (
        "standing",
        "locker",
        "app",
    )
    assert recorded["recipient_phone"] == "+8613812345678"
    assert (revoked["reason"], revoked["channel"]) == ("moved house", "phone_call")
    stored = client.get(f"{URL}/{consent['id']}", headers=auth.headers("auditor1")).get_json()
    assert dt.datetime.fromisoformat(revoked["revoked_at"]) == dt.datetime.fromisoformat(
        stored["revoked_at"]
    )
    masked = client.get("/api/v1/audit", query_string=query, headers=auth.headers("admin"))
    assert "+8613812345678" not in masked.get_data(as_text=True)
    verified = client.get("/api/v1/audit/verify", headers=auth.headers("auditor1")).get_json()
    assert verified["intact"] is True


def test_a_consent_captured_on_a_pda_is_its_event_not_an_audit_entry(
    client: FlaskClient, auth: Auth, parcel: Parcel
) -> None:
    """A push stays free of the audit log's append: the captured consent's event is
    stored as sent, and a re-sent one with other content is refused and flagged."""
    at = now() - dt.timedelta(minutes=30)
    captured = factories.event(
        2, parcel.tracking_no, "consent_captured", occurred_at=at,
        consent={"method": "locker", "channel": "in_person"},
    )  # fmt: skip
    auth.push([factories.event(1, parcel.tracking_no, occurred_at=at), captured])
    entries = client.get(
        "/api/v1/audit", query_string={"subject_type": "consent", "subject_key": "1"},
        headers=auth.headers("auditor1"),
    ).get_json()["items"]  # fmt: skip
    assert entries == []


# -- a channel's retries ----------------------------------------------------------------------


def test_a_channels_retry_records_its_consent_once_and_revoking_that_one_ends_it(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel, session: Session
) -> None:
    """The SMS gateway records the recipient's consent; the answer is lost on the way
    back, and the gateway sends the same POST again. Each attempt recorded a consent of
    its own: the gateway heard of the second one only, revoked it when the recipient
    said no, and the first went on authorizing drops. With its own id for the
    consent, the retry answers the consent recorded the first time."""
    body = {
        "tracking_no": parcel.tracking_no,
        "channel": "sms",
        "granted_at": (now() - dt.timedelta(hours=1)).isoformat(),
        "client_consent_id": "sms-7731",
    }
    first = grant(client, app1, **body)
    assert first.status_code == 201, first.get_json()
    retry = grant(client, app1, **{**body, "tracking_no": parcel.tracking_no.lower()})
    assert retry.status_code == 201, retry.get_json()
    assert retry.get_json() == first.get_json()
    assert first.get_json()["client_consent_id"] == "sms-7731"
    assert session.scalar(select(func.count()).select_from(Consent)) == 1
    granted = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "consent_granted")
    ).all()
    assert [e.details["client_consent_id"] for e in granted] == ["sms-7731"]

    revoked = client.post(f"{URL}/{retry.get_json()['id']}/revoke", json={}, headers=app1)
    assert revoked.status_code == 200
    receipt = push_drop(client, auth, parcel.tracking_no, now(), dt.timedelta(0))
    assert [f["kind"] for f in receipt["flags_raised"]] == ["unauthorized_locker_drop"]
    again = grant(client, app1, **body)  # a late retry: still the one, revoked
    assert again.status_code == 201 and again.get_json()["revoked_at"] is not None


def test_a_retry_of_a_standing_consent_may_write_the_phone_and_address_otherwise(
    client: FlaskClient, app1: dict[str, str], parcel: Parcel
) -> None:
    body = {
        "scope": "standing",
        "address": parcel.address,
        "client_consent_id": "app-standing-1",
        "granted_at": (now() - dt.timedelta(hours=1)).isoformat(),
    }
    first = grant(client, app1, recipient_phone="+8613812345678", **body)
    retry = grant(client, app1, recipient_phone="138 1234 5678", **body)
    assert (first.status_code, retry.status_code) == (201, 201), retry.get_json()
    assert retry.get_json()["id"] == first.get_json()["id"]


def test_the_same_client_consent_id_for_another_consent_is_a_conflict(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel, session: Session
) -> None:
    body = {"tracking_no": parcel.tracking_no, "client_consent_id": "call-42"}
    granted_at = (now() - dt.timedelta(hours=1)).isoformat()
    assert grant(client, app1, granted_at=granted_at, **body).status_code == 201
    other = grant(client, app1, granted_at=granted_at, point_id="L-9", **body)
    assert other.status_code == 409
    error = other.get_json()
    assert error["code"] == "client_consent_id_reused"
    assert list(error["errors"]) == ["client_consent_id"]
    assert "whose point_id differs:" in error["message"]
    session.expire_all()
    assert session.scalars(select(Consent.point_id)).all() == [None]  # not overwritten
    # Another channel's account keeps ids of its own.
    factories.user(session, "gateway2", "integration")
    session.commit()
    theirs = grant(client, auth.headers("gateway2"), granted_at=granted_at, **body)
    assert theirs.status_code == 201, theirs.get_json()


def asked_twice(client: FlaskClient, auth: Auth, tracking_no: str) -> list[dict[str, Any]]:
    """Two pending requests of courier1 for the same locker consent: one asked online,
    one from the PDA's ``consent_requested`` event asking by phone call (the same
    question again, online or from the PDA, would be answered by the first, pending:
    ``sync.consent_requests.asking_bound``)."""
    courier = auth.headers("courier1", "PDA-0001")
    online = client.post(
        f"{URL}/requests", json={"tracking_no": tracking_no, "method": "locker"}, headers=courier
    )
    assert online.status_code == 201, online.get_json()
    auth.push(
        [
            factories.event(
                1,
                tracking_no,
                "consent_requested",
                occurred_at=now() - dt.timedelta(seconds=5),
                request={"method": "locker", "channel": "phone_call"},
            )
        ]
    )
    listed = client.get(
        f"{URL}/requests", query_string={"tracking_no": tracking_no}, headers=courier
    ).get_json()["items"]
    assert [r["status"] for r in listed] == ["pending", "pending"], listed
    assert listed[0]["id"] == online.get_json()["id"]
    return listed


def test_an_answer_to_a_request_keeps_the_channels_id_unless_it_was_used(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel
) -> None:
    asked = asked_twice(client, auth, parcel.tracking_no)
    answer = {"request_id": asked[0]["id"], "channel": "sms", "client_consent_id": "sms-1"}
    granted = client.post(URL, json=answer, headers=app1)
    assert granted.status_code == 201, granted.get_json()
    assert granted.get_json()["client_consent_id"] == "sms-1"
    retry = client.post(URL, json=answer, headers=app1)  # known by its request
    assert retry.status_code == 201 and retry.get_json()["id"] == granted.get_json()["id"]
    reused = client.post(URL, json={**answer, "request_id": asked[1]["id"]}, headers=app1)
    assert reused.status_code == 409, reused.get_json()
    assert reused.get_json()["code"] == "client_consent_id_reused"
    plain = grant(client, app1, tracking_no=parcel.tracking_no, client_consent_id="sms-1")
    assert plain.status_code == 409 and plain.get_json()["code"] == "client_consent_id_reused"


def test_an_answer_taking_a_consent_recorded_alone_is_on_the_audit_log_naming_both(
    client: FlaskClient,
    auth: Auth,
    app1: dict[str, str],
    parcel: Parcel,
    session: Session,
    world: World,
) -> None:
    """The gateway recorded the recipient's "yes" alone, then sent it as the answer to the
    courier's request: the consent's ``consent_granted`` entry names no request, and the
    auditor settling a dispute could not tell which request it answered. The answer
    writes ``consent_request_answered``, naming the request and the consent, once."""
    courier = auth.headers("courier1", "PDA-0001")
    asked = client.post(
        f"{URL}/requests",
        json={"tracking_no": parcel.tracking_no, "method": "locker"},
        headers=courier,
    ).get_json()
    granted_at = now().isoformat()
    alone = grant(
        client,
        app1,
        tracking_no=parcel.tracking_no,
        channel="sms",
        granted_at=granted_at,
        client_consent_id="sms-11",
    ).get_json()
    answer = {
        "request_id": asked["id"],
        "channel": "sms",
        "granted_at": granted_at,
        "client_consent_id": "sms-11",
    }
    assert client.post(URL, json=answer, headers=app1).status_code == 201
    assert client.post(URL, json=answer, headers=app1).status_code == 201  # a retry
    session.expire_all()
    entries = session.scalars(
        select(AuditEntry)
        .where(AuditEntry.action.in_(["consent_granted", "consent_request_answered"]))
        .order_by(AuditEntry.id)
    ).all()
    assert [(e.action, e.subject_type, e.subject_key) for e in entries] == [
        ("consent_granted", "consent", str(alone["id"])),
        ("consent_request_answered", "consent_request", str(asked["id"])),
    ]
    linked = entries[1]
    assert (linked.details["request_id"], linked.details["consent_id"]) == (
        asked["id"],
        alone["id"],
    )
    assert (linked.actor_id, linked.tracking_no) == (world.integration.id, parcel.tracking_no)
    by_parcel = client.get(
        "/api/v1/audit",
        query_string={"tracking_no": parcel.tracking_no},
        headers=auth.headers("auditor1"),
    ).get_json()
    assert "consent_request_answered" in [e["action"] for e in by_parcel["items"]]


def test_a_consent_sent_alone_after_the_answer_that_recorded_it_is_a_retry(
    client: FlaskClient,
    auth: Auth,
    app1: dict[str, str],
    parcel: Parcel,
    session: Session,
    connection: Connection,
) -> None:
    """The gateway sends the recipient's "yes" both ways with one id, the answer to the
    request arriving first with no evidence: the consent it records has the server's
    evidence ("answer to consent request N"), which the plain POST, also without
    evidence, did not say otherwise. It is the same grant (rule 2): answered as a retry,
    not a 409 "evidence differ"; a plain POST stating other evidence is still the 409."""
    courier = auth.headers("courier1", "PDA-0001")
    asked = client.post(
        f"{URL}/requests",
        json={"tracking_no": parcel.tracking_no, "method": "locker"},
        headers=courier,
    ).get_json()
    granted_at = now().isoformat()
    answered = client.post(
        URL,
        json={
            "request_id": asked["id"],
            "channel": "sms",
            "granted_at": granted_at,
            "client_consent_id": "sms-12",
        },
        headers=app1,
    ).get_json()
    alone = {
        "tracking_no": parcel.tracking_no,
        "channel": "sms",
        "granted_at": granted_at,
        "client_consent_id": "sms-12",
    }
    with counted(connection) as statements:
        plain = grant(client, app1, **alone)
    assert plain.status_code == 201, plain.get_json()
    assert plain.get_json()["id"] == answered["id"]
    # The request the consent answers is looked up once, not by the retry and its answer.
    by_consent = "FROM consent_request \nWHERE consent_request.consent_id ="
    assert sum(by_consent in s for s in statements) == 1, statements
    # The consent answers the request: the answer says so, as the answer's own did.
    assert plain.get_json()["request"]["id"] == asked["id"]
    assert plain.get_json()["request"]["status"] == "granted"
    assert session.scalar(select(func.count()).select_from(Consent)) == 1
    other = grant(client, app1, **alone, evidence="recording 77")
    assert other.status_code == 409 and "evidence differ" in other.get_json()["message"]


def test_an_answer_with_the_id_of_the_same_consent_recorded_alone_is_answered_by_it(
    client: FlaskClient, auth: Auth, app1: dict[str, str], parcel: Parcel
) -> None:
    """The channel recorded the recipient's "yes" by itself (``POST /consents`` with its
    id), then sent it again as the answer to the courier's request: the request is
    answered by the consent recorded, as a retry of that consent would be, not a 409;
    an answer saying something else with that id is the 409 naming what differs."""
    asked = asked_twice(client, auth, parcel.tracking_no)
    granted_at = now().isoformat()  # after the courier asked
    alone = grant(
        client,
        app1,
        tracking_no=parcel.tracking_no,
        channel="sms",
        granted_at=granted_at,
        client_consent_id="sms-9",
    ).get_json()
    answer = {
        "request_id": asked[0]["id"],
        "channel": "sms",
        "granted_at": granted_at,
        "client_consent_id": "sms-9",
    }
    answered = client.post(URL, json=answer, headers=app1)
    assert answered.status_code == 201, answered.get_json()
    assert answered.get_json()["id"] == alone["id"]
    request = answered.get_json()["request"]
    assert (request["status"], request["consent_id"]) == ("granted", alone["id"])
    other = {**answer, "request_id": asked[1]["id"], "channel": "app", "method": "any"}
    reused = client.post(URL, json=other, headers=app1).get_json()
    assert reused["code"] == "client_consent_id_reused"
    assert "method, channel differ" in reused["message"], reused
    by_app = {**answer, "request_id": asked[1]["id"], "channel": "app"}
    one_field = client.post(URL, json=by_app, headers=app1).get_json()
    assert "whose channel differs:" in one_field["message"], one_field


def test_a_manager_cannot_test_phone_numbers_against_the_consents(
    client: FlaskClient, auth: Auth, app1: dict[str, str], world: World
) -> None:
    """Every station's manager lists the standing consents that hold at every station,
    the phone masked (``+86*******5678``) beside the address. A search by a full phone
    answered them whether it was that consent's: a few thousand guesses of the hidden
    digits (fewer with the carrier's prefixes), each unseen, gave them the recipient's
    whole number, which DESIGN.md shows auditors only. The consent history by phone is
    the auditors' (and the recipient channels' that record consents by phone, and
    admins'); a manager's search by phone is refused, the same whether the phone has a
    consent or not, and the parcel's consents are theirs by ``covering``."""
    standing = grant(
        client, app1, scope="standing", recipient_phone="13912345678", address="9 Rd"
    ).get_json()
    listed = client.get(URL, headers=auth.headers("manager2")).get_json()["items"]
    assert [(c["id"], c["recipient_phone"]) for c in listed] == [
        (standing["id"], "+86*******5678")
    ]
    answers = []
    for phone in ("13912345678", "13912340000"):
        for manager in ("manager1", "manager2"):
            query = {"recipient_phone": phone}
            answer = client.get(URL, query_string=query, headers=auth.headers(manager))
            answers.append((answer.status_code, answer.get_json()))
    assert answers[0][0] == 403, answers[0]
    assert answers[0][1]["code"] == "role_forbidden"
    assert list(answers[0][1]["errors"]) == ["recipient_phone"]
    assert all(answer == answers[0] for answer in answers)  # says nothing of the phone
    for reader in ("auditor1", "app1", "admin"):
        query = {"recipient_phone": "13912345678"}
        found = client.get(URL, query_string=query, headers=auth.headers(reader))
        assert [c["id"] for c in found.get_json()["items"]] == [standing["id"]], reader
