import datetime as dt
from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from courier_api.api.parcels import routes as parcel_routes
from models import AuditEntry, Flag, FlagStatus, Parcel, ScanEvent
from sync import audit
from sync.audit import iso
from tests import factories
from tests.browser import station_day
from tests.browser.station_day import StationDay
from tests.conftest import Auth, World
from tests.courier_api.test_shifts_api import _handed_over
from tests.courier_api.test_web_pages import day, signed_in  # noqa: F401 - fixture

URL = "/api/v1/parcels"


def item(tracking_no: str, **changes) -> dict:
    data = {
        "tracking_no": tracking_no,
        "service_class": "express",
        "recipient_name": "Li Lei",
        "recipient_phone": "138 1234 5678",
        "address": "1 Century Ave, Pudong",
        "lat": 31.23,
        "lon": 121.54,
    }
    data.update(changes)
    return data


def test_intake_reports_each_item_at_its_index(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    response = client.post(
        URL,
        headers=auth.headers("manager1"),
        json={
            "parcels": [
                item("RR473124829GB"),
                item("RB123456786US"),  # wrong check digit
                item("RB123456785XX"),  # unknown country
                item("JA123456785GB"),  # reserved service indicator
                item("EE471108151FR", service_class="teleport"),
                item("SF1300000000001", recipient_phone="12"),
                item("RB123456785GB", lat=None, lon=121.5),
                "not an object",
            ]
        },
    )
    assert response.status_code == 200
    body = response.get_json()
    results = body["results"]
    assert [r["index"] for r in results] == list(range(8))
    assert results[0]["status"] == "created"
    codes = [r.get("error", {}).get("code") for r in results]
    assert codes[1:] == [
        "invalid_check_digit",
        "unknown_country_code",
        "reserved_service_indicator",
        "validation_error",
        "invalid_phone",
        "incomplete_location",
        "validation_error",
    ]
    assert "service_class" in results[4]["error"]["errors"]
    assert "tracking_no" in results[1]["error"]["errors"]
    assert results[4]["tracking_no"] == "EE471108151FR"
    assert body["counts"] == {"created": 1, "updated": 0, "unchanged": 0, "rejected": 7}
    assert client.get(f"{URL}/RR473124829GB", headers=auth.headers("manager1")).status_code == 200


def test_resending_is_unchanged_and_changes_are_updates(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    manager = auth.headers("manager1")
    first = client.post(URL, headers=manager, json={"parcels": [item("RR473124829GB")]})
    assert first.get_json()["counts"]["created"] == 1
    again = client.post(
        URL,
        headers=manager,
        json={
            "parcels": [item("rr 473124829 gb"), item("RR473124829GB", address="2 Century Ave")]
        },
    )
    statuses = [r["status"] for r in again.get_json()["results"]]
    assert statuses == ["unchanged", "updated"]
    parcel = client.get(f"{URL}/RR473124829GB", headers=manager).get_json()
    assert parcel["address"] == "2 Century Ave"


def test_manager_cannot_take_in_for_another_station(
    client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    foreign = factories.parcel(session, world.other_station)
    session.commit()
    response = client.post(
        URL,
        headers=auth.headers("manager1"),
        json={
            "parcels": [
                item("RR473124829GB", station="ST2"),
                item(foreign.tracking_no),
            ]
        },
    )
    codes = [r["error"]["code"] for r in response.get_json()["results"]]
    assert codes == ["station_forbidden", "parcel_at_other_station"]


def test_a_courier_of_another_station_is_unknown_to_a_manager_but_named_to_an_admin(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    """SECURITY.md threat 3: trying usernames one by one as the planned courier must
    not list another station's couriers to a manager. An admin, who sees every
    station, is told why."""

    def refusal(username: str, courier: str, station: str) -> dict:
        body = {"parcels": [item(factories.s10(), courier=courier, station=station)]}
        response = client.post(URL, headers=auth.headers(username), json=body)
        assert response.status_code == 200, response.get_json()
        error = response.get_json()["results"][0]["error"]
        return {"code": error["code"], "message": error["message"].replace(courier, "<c>")}

    theirs = refusal("manager2", world.courier.username, "ST2")
    assert theirs == refusal("manager2", "no.such.courier", "ST2")
    assert theirs["code"] == "courier_not_found"
    assert refusal("admin", world.courier.username, "ST2")["code"] == "courier_at_other_station"


def test_integration_names_the_station(client: FlaskClient, world: World, auth: Auth) -> None:
    integration = auth.headers("app1")
    response = client.post(
        URL,
        headers=integration,
        json={
            "parcels": [
                item("RR473124829GB", station="ST2"),
                item("EE471108151FR"),
                item("RB123456785GB", station="NOPE"),
            ]
        },
    )
    results = response.get_json()["results"]
    assert results[0]["status"] == "created"
    assert results[1]["error"]["code"] == "station_required"
    assert results[2]["error"]["code"] == "station_not_found"


def test_too_many_items_is_413_with_the_limit(
    app_with: Callable[..., Flask], world: World
) -> None:
    client = app_with(MAX_PARCELS_PER_INTAKE=2).test_client()
    response = client.post(
        URL,
        headers=Auth(client).headers("admin"),
        json={"parcels": [item(factories.s10(), station="ST1") for _ in range(3)]},
    )
    assert response.status_code == 413
    body = response.get_json()
    assert body["code"] == "payload_too_large"
    assert "limit is 2" in body["message"]
    assert body["limit"] == {"max": 2, "unit": "parcels"}


def test_empty_or_missing_list_is_422(client: FlaskClient, world: World, auth: Auth) -> None:
    manager = auth.headers("manager1")
    assert client.post(URL, headers=manager, json={"parcels": []}).status_code == 422
    assert client.post(URL, headers=manager, json={}).status_code == 422


def test_couriers_and_auditors_cannot_take_in(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    body = {"parcels": [item("RR473124829GB")]}
    assert client.post(URL, json=body, headers=auth.headers("auditor1")).status_code == 403
    assert (
        client.post(URL, json=body, headers=auth.headers("courier1", "PDA-0001")).status_code
        == 403
    )


def test_phone_is_masked_except_for_auditors(
    client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    parcel = factories.parcel(session, world.station, phone="+8613812345678")
    session.commit()
    path = f"{URL}/{parcel.tracking_no}"
    for username, device in (("manager1", None), ("courier1", "PDA-0001"), ("admin", None)):
        shown = client.get(path, headers=auth.headers(username, device)).get_json()
        assert shown["recipient_phone"] == "+86*******5678", username
    audited = client.get(path, headers=auth.headers("auditor1")).get_json()
    assert audited["recipient_phone"] == "+8613812345678"


def test_parcel_lookup_errors(
    client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    foreign = factories.parcel(session, world.other_station)
    session.commit()
    manager = auth.headers("manager1")
    missing = client.get(f"{URL}/RR000000000GB", headers=manager)
    assert missing.status_code == 404
    assert missing.get_json()["code"] == "parcel_not_found"
    assert client.get(f"{URL}/{foreign.tracking_no}", headers=manager).status_code == 404


def test_another_stations_parcel_answers_as_an_unknown_tracking_number(
    client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    """To a manager or a courier of ST1, an ST2 parcel gets what a tracking number taken in
    nowhere gets, the same 404 body but for the number: a 403 would tell them it exists
    (SECURITY.md threat 3). Auditors, admins and integrations read it."""
    foreign = factories.parcel(session, world.other_station).tracking_no
    nowhere = factories.s10()
    session.commit()
    for headers in (auth.headers("manager1"), auth.headers("courier1", "PDA-0001")):
        hidden, unknown = (client.get(f"{URL}/{t}", headers=headers) for t in (foreign, nowhere))
        assert hidden.status_code == unknown.status_code == 404
        assert hidden.headers["Content-Type"] == unknown.headers["Content-Type"]
        assert hidden.get_json() == {
            **unknown.get_json(),
            "message": unknown.get_json()["message"].replace(nowhere, foreign),
        }
        assert hidden.get_json()["code"] == "parcel_not_found"
    for username in ("auditor1", "admin", "app1"):
        assert client.get(f"{URL}/{foreign}", headers=auth.headers(username)).status_code == 200


def test_a_timeline_names_no_shift_of_a_station_its_reader_cannot_open(
    app: Flask,
    session: Session,
    day: StationDay,  # noqa: F811
) -> None:
    """8c98729 made the proof page neither link nor name the MHG shift a mis-sorted PDG
    parcel's drop is filed under ("it would answer a 404 page, and give away another
    station's shift id"). The same PDG manager reading the same proof through the API
    (`GET /api/v1/proofs/<id>`, and the parcel's timeline, `GET /api/v1/parcels/<tn>`) is
    handed that shift's id in each of MHG's events' `shift_id`: another station's shift,
    which answers them `shift_not_found`, is named all the same (SECURITY.md threat 3:
    for a manager another station's objects do not exist). The admin, who may open it,
    is told it."""
    drop = station_day.mis_sorted_drop(session, day)
    shift, event_id, tracking_no = drop.shift, drop.drop_id, drop.tracking_no
    client = app.test_client()

    for username, opens in (("manager", False), ("admin", True)):
        token = client.post(
            "/api/v1/auth/token", json={"username": username, "password": factories.PASSWORD}
        ).get_json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        opened = client.get(f"/api/v1/shifts/{shift.id}", headers=headers)
        assert opened.status_code == (200 if opens else 404)

        proof = client.get(f"/api/v1/proofs/{event_id}", headers=headers)
        found = client.get(f"{URL}/{tracking_no}", headers=headers)

        assert proof.status_code == 200 and found.status_code == 200
        named = {e["shift_id"] for e in proof.get_json()["timeline"]} | {
            e["shift_id"] for e in found.get_json()["timeline"]
        }
        assert (shift.id in named) is opens, username


@pytest.mark.parametrize(
    ("taken_in_as", "corrected_to", "flagged_after"),
    [("parcel", "express", True), ("express", "ordinary", False)],
)
def test_a_class_corrected_at_intake_judges_the_parcels_drops_again(
    client: FlaskClient,
    world: World,
    auth: Auth,
    session: Session,
    taken_in_as: str,
    corrected_to: str,
    flagged_after: bool,
) -> None:
    """What the rules read of a parcel (its class here; its position and recipient too)
    decides its flags as much as who has it: a correction at intake judges it again,
    not whichever of its events happens to come next."""
    manager, tn = auth.headers("manager1"), factories.s10()
    at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    taken = client.post(
        URL, headers=manager, json={"parcels": [item(tn, service_class=taken_in_as)]}
    )
    assert taken.status_code == 200
    drop = factories.locker_drop(2, tn, at + dt.timedelta(minutes=10))
    auth.push([factories.event(1, tn, occurred_at=at), drop])
    assert unauthorized_drop_flagged(session, tn) is not flagged_after
    corrected = client.post(
        URL, headers=manager, json={"parcels": [item(tn, service_class=corrected_to)]}
    )
    assert corrected.get_json()["results"][0]["status"] == "updated"
    assert unauthorized_drop_flagged(session, tn) is flagged_after


def unauthorized_drop_flagged(session: Session, tracking_no: str) -> bool:
    session.expire_all()
    return (
        tracking_no
        in session.scalars(
            select(Flag.subject_key).where(
                Flag.kind == "unauthorized_locker_drop",
                Flag.status.in_([FlagStatus.OPEN, FlagStatus.ACKNOWLEDGED]),
            )
        ).all()
    )


def test_a_phone_typed_into_an_events_free_text_is_masked_except_for_auditors(
    app: Flask, client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    """The courier notes the number they called in the consent's evidence and in a
    correction's reason: managers read both masked (parcel, consents, the pages), as
    the parcel's own number; auditors read them whole."""
    parcel = factories.parcel(session, world.station, phone="+8613812345678")
    session.commit()
    at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)
    consent = factories.event(
        1, parcel.tracking_no, "consent_captured", occurred_at=at,
        consent={"method": "locker", "channel": "phone_call", "evidence": "called 13812345678"},
    )  # fmt: skip
    drop = factories.event(
        2, parcel.tracking_no, "delivered_to_locker", occurred_at=at,
        locker_id="L-1", compartment="7",
    )  # fmt: skip
    correction = factories.event(
        3, parcel.tracking_no, "correction", occurred_at=at + dt.timedelta(minutes=1),
        voids_client_event_id=drop["client_event_id"], reason="recipient +86 138 1234 5678 moved",
    )  # fmt: skip
    auth.push([consent, drop, correction])

    def texts(username: str) -> tuple[str, str, str]:
        body = client.get(f"{URL}/{parcel.tracking_no}", headers=auth.headers(username)).json
        details = {e["type"]: e["details"] for e in body["timeline"]}
        consents = client.get("/api/v1/consents", headers=auth.headers(username)).json
        (captured,) = (c for c in consents["items"] if c["tracking_no"] == parcel.tracking_no)
        return (
            details["consent_captured"]["consent"]["evidence"],
            details["correction"]["reason"],
            captured["evidence"],
        )

    assert texts("manager1") == (
        "called ********678",
        "recipient +**********678 moved",
        "called ********678",
    )
    assert texts("auditor1") == (
        "called 13812345678",
        "recipient +86 138 1234 5678 moved",
        "called 13812345678",
    )
    proofs = client.get(
        "/api/v1/proofs", query_string={"tracking_no": parcel.tracking_no},
        headers=auth.headers("manager1"),
    ).json["items"]  # fmt: skip
    pages = {
        username: signed_in(app, username).get(f"/web/proofs/{proofs[0]['event_id']}")
        for username in ("manager1", "auditor1")
    }
    assert "recipient +**********678 moved" in pages["manager1"]
    assert "1234 5678" not in pages["manager1"]
    assert "recipient +86 138 1234 5678 moved" in pages["auditor1"]


def test_a_phone_typed_in_another_scripts_digits_is_masked_except_for_auditors(
    app: Flask, client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    """A Chinese input method types full-width digits and signs (and some PDAs another
    script's digits): the courier's note reaches managers masked all the same, on the API
    and the pages, with the rest of the note as written; auditors read it whole."""
    parcel = factories.parcel(session, world.station, phone="+8613812345678")
    session.commit()
    at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)
    evidence = "电话１３８－１２３４－５６７８，（＋８６）１３９ ８７６５ ４３２１"
    consent = factories.event(
        1, parcel.tracking_no, "consent_captured", occurred_at=at,
        consent={"method": "locker", "channel": "phone_call", "evidence": evidence},
    )  # fmt: skip
    drop = factories.event(
        2, parcel.tracking_no, "delivered_to_locker", occurred_at=at,
        locker_id="L-1", compartment="7",
    )  # fmt: skip
    correction = factories.event(
        3, parcel.tracking_no, "correction", occurred_at=at + dt.timedelta(minutes=1),
        voids_client_event_id=drop["client_event_id"], reason="رقم ١٣٨١٢٣٤٥٦٧٨ انتقل",
    )  # fmt: skip
    auth.push([consent, drop, correction])

    def texts(username: str) -> tuple[str, str]:
        body = client.get(f"{URL}/{parcel.tracking_no}", headers=auth.headers(username)).json
        details = {e["type"]: e["details"] for e in body["timeline"]}
        return details["consent_captured"]["consent"]["evidence"], details["correction"]["reason"]

    assert texts("manager1") == (
        "电话********６７８，（＋**********３２１",
        "رقم ********٦٧٨ انتقل",
    )
    assert texts("auditor1") == (evidence, "رقم ١٣٨١٢٣٤٥٦٧٨ انتقل")
    proofs = client.get(
        "/api/v1/proofs", query_string={"tracking_no": parcel.tracking_no},
        headers=auth.headers("manager1"),
    ).json["items"]  # fmt: skip
    page = signed_in(app, "manager1").get(f"/web/proofs/{proofs[0]['event_id']}")
    assert "رقم ********٦٧٨ انتقل" in page and "١٣٨١٢٣٤" not in page


def taken_in_as_class_parcel(client: FlaskClient, auth: Auth, tracking_no: str) -> None:
    """ST1's manager takes the express parcel in again as class `parcel` (the rest as
    ``item`` gave it): its drop needs no consent any more."""
    same = {"recipient_name": "Recipient", "address": "1 Century Ave"}
    changed = client.post(
        URL,
        headers=auth.headers("manager1"),
        json={"parcels": [item(tracking_no, service_class="parcel", lat=None, lon=None, **same)]},
    )
    assert changed.get_json()["results"][0]["status"] == "updated"


def test_a_class_changed_after_an_unauthorized_drop_is_on_the_audit_log_and_in_the_flag(
    client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    """An express parcel left in a locker with no consent, then taken in again by the
    station's manager as class `parcel`: the flag closes, as the rule now holds. The
    hash-chained audit log says who changed the class, from what to what, and the
    flag's reason names the change, not only that the rule holds (SECURITY.md
    threat 4)."""
    parcel = factories.parcel(session, world.station)  # express
    session.commit()
    at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)
    receipt = auth.push(
        [
            factories.event(1, parcel.tracking_no, occurred_at=at),
            factories.locker_drop(2, parcel.tracking_no, at + dt.timedelta(minutes=1)),
        ]
    )
    assert [f["kind"] for f in receipt["flags_raised"]] == ["unauthorized_locker_drop"]
    taken_in_as_class_parcel(client, auth, parcel.tracking_no)

    log = client.get(
        "/api/v1/audit",
        query_string={"subject_type": "parcel", "subject_key": parcel.tracking_no},
        headers=auth.headers("auditor1"),
    ).get_json()["items"]
    [entry] = [e for e in log if e["action"] == "parcel_updated"]
    assert entry["actor_id"] == world.manager.id
    assert entry["details"] == {
        "station_id": world.station.id,
        "by": "manager1",
        "changes": {"service_class": {"from": "express", "to": "parcel"}},
    }
    session.expire_all()
    flag = session.scalars(select(Flag).where(Flag.subject_key == parcel.tracking_no)).one()
    assert flag.status == FlagStatus.CLOSED
    assert flag.closed_reason is not None
    assert flag.closed_reason.startswith(
        "manager1 changed the parcel's class from express to parcel; re-judged"
    )


def test_a_flag_of_another_station_closed_by_a_parcels_change_does_not_name_who_changed_it(
    client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    """ST1's express parcel, mis-sorted, left in a locker by courier2 of ST2 without
    consent: the flag is ST2's. ST1's manager takes the parcel in again as class
    `parcel`, and ST2's flag closed with the reason "manager1 changed the parcel's
    class ...": ST2's manager learned the name of another station's user (SECURITY.md
    threat 3: for them ST1's users do not exist). ST2's flag says a user of another
    station changed it; the audit log names manager1 to auditors, as ever."""
    parcel = factories.parcel(session, world.station)  # express
    factories.user(session, "courier2", "courier", world.other_station)
    session.commit()
    at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)
    auth.push([factories.event(1, parcel.tracking_no, occurred_at=at)])
    auth.push(
        [
            factories.event(1, parcel.tracking_no, occurred_at=at + dt.timedelta(minutes=1)),
            factories.locker_drop(2, parcel.tracking_no, at + dt.timedelta(minutes=2)),
        ],
        username="courier2",
        device_id="PDA-0002",
    )
    drops = select(Flag).where(
        Flag.subject_key == parcel.tracking_no, Flag.kind == "unauthorized_locker_drop"
    )
    [theirs] = session.scalars(drops).all()
    assert theirs.station_id == world.other_station.id
    taken_in_as_class_parcel(client, auth, parcel.tracking_no)

    read = client.get(f"/api/v1/flags/{theirs.id}", headers=auth.headers("manager2")).get_json()
    assert read["status"] == "closed"
    assert "manager1" not in read["closed_reason"], read["closed_reason"]
    assert read["closed_reason"].startswith(
        "a user of another station changed the parcel's class from express to parcel; "
    )


def test_a_recipients_phone_changed_to_match_a_standing_consent_is_logged_masked_for_admins(
    client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    """The drop's flag goes away when the recipient's phone is changed to one with a
    standing consent: the audit entry keeps both numbers (whole for auditors, masked
    for admins), and the flag's reason names the phone without its number."""
    parcel = factories.parcel(session, world.station, phone="+8613912345678")
    session.commit()
    granted = client.post(
        "/api/v1/consents",
        json={
            "scope": "standing",
            "recipient_phone": "+8613812345678",
            "address": "1 Century Ave",
            "method": "any",
            "channel": "app",
            "granted_at": (dt.datetime.now(dt.UTC) - dt.timedelta(days=3)).isoformat(),
        },
        headers=auth.headers("app1"),
    )
    assert granted.status_code == 201, granted.get_json()
    at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)
    receipt = auth.push(
        [
            factories.event(1, parcel.tracking_no, occurred_at=at),
            factories.locker_drop(2, parcel.tracking_no, at + dt.timedelta(minutes=1)),
        ]
    )
    assert [f["kind"] for f in receipt["flags_raised"]] == ["unauthorized_locker_drop"]
    changed = client.post(
        URL,
        headers=auth.headers("manager1"),
        json={
            "parcels": [
                {
                    "tracking_no": parcel.tracking_no,
                    "service_class": "express",
                    "recipient_name": "Recipient",
                    "recipient_phone": "+8613812345678",
                    "address": "1 Century Ave",
                }
            ]
        },
    )
    assert changed.get_json()["results"][0]["status"] == "updated"

    def change(username: str) -> dict:
        log = client.get(
            "/api/v1/audit",
            query_string={"action": "parcel_updated"},
            headers=auth.headers(username),
        ).get_json()["items"]
        [entry] = log
        return entry["details"]["changes"]

    assert change("auditor1") == {
        "recipient_phone": {"from": "+8613912345678", "to": "+8613812345678"}
    }
    masked = change("admin")["recipient_phone"]
    assert "12345" not in str(masked) and masked["from"].endswith("678"), masked
    session.expire_all()
    flag = session.scalars(select(Flag).where(Flag.subject_key == parcel.tracking_no)).one()
    assert flag.status == FlagStatus.CLOSED
    assert flag.closed_reason is not None
    assert flag.closed_reason.startswith("manager1 changed the parcel's recipient's phone;")
    assert "5678" not in flag.closed_reason


def test_a_long_timeline_comes_in_pages_that_add_up_to_the_whole(
    client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    """A PDA that scanned one parcel 25,000 times made its timeline one answer of 15 MB
    (14 s, every event read twice). A timeline no longer than a page (most) still comes
    whole, ``next_cursor`` null; a longer one comes ``limit`` events at a time, each page
    leading to the next, and the pages add up to the whole timeline, in its order, each
    entry as the whole shows it (voids, repeats). A cursor that is malformed, or of
    another parcel's timeline, is a 400."""
    parcel = factories.parcel(session, world.station)
    other = factories.parcel(session, world.station, tracking_no="RB123456785GB")
    session.commit()
    tn = parcel.tracking_no
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    pod = {"recipient_name": "Li", "pickup_code": "1"}
    events = [factories.event(1, tn, occurred_at=start)]
    events += [
        factories.event(seq, tn, "out_for_delivery", occurred_at=start + dt.timedelta(minutes=seq))
        for seq in range(2, 10)
    ]
    drop = {"locker_id": "L-1", "compartment": "1", "pod": pod}
    events += [
        factories.event(
            seq, tn, "delivered_to_locker", occurred_at=start + dt.timedelta(minutes=seq), **drop
        )
        for seq in (10, 11)
    ]
    events.append(
        factories.event(12, tn, "correction", occurred_at=start + dt.timedelta(minutes=12),
                        voids_client_event_id=events[3]["client_event_id"], reason="mis-tap")
    )  # fmt: skip
    auth.push(events)
    headers = auth.headers("manager1")
    whole = client.get(f"{URL}/{tn}", headers=headers).json
    assert len(whole["timeline"]) == len(events) and whole["next_cursor"] is None
    assert whole["as_of"] == max(e["event_id"] for e in whole["timeline"])
    assert whole["arrived_since"] == 0
    assert any(e["repeats_event_id"] for e in whole["timeline"])
    assert any(e["voided"] for e in whole["timeline"])
    pages, query = [], {"limit": 5}
    while True:
        page = client.get(f"{URL}/{tn}", query_string=query, headers=headers).json
        pages.append(page["timeline"])
        assert {k: v for k, v in page.items() if k not in ("timeline", "next_cursor")} == {
            k: v for k, v in whole.items() if k not in ("timeline", "next_cursor")
        }
        if page["next_cursor"] is None:
            break
        query = {"limit": 5, "cursor": page["next_cursor"]}
    assert [len(p) for p in pages] == [5, 5, 2]
    assert [e for p in pages for e in p] == whole["timeline"]
    cursor = client.get(f"{URL}/{tn}", query_string={"limit": 5}, headers=headers).json[
        "next_cursor"
    ]
    as_of, count, after, updated, record, couriers = cursor.split(".")
    for wrong in (
        "5",
        "1.2.x",
        f"{10**20}.1.1",
        f"{2**63}.1.1",  # 19 digits, beyond a BIGINT
        f"{as_of}.{count}.{after}.{updated}",
        f"{as_of}.{count}.{after}.{updated}.{record.upper()}.{couriers}",
        f"{as_of}.{count}.{after}.{updated}.{record}0.{couriers}",
        f"{as_of}.{count}.{after}.{updated}.{record}.{couriers.upper()}",
        f"{as_of}.{count}.{after}.{updated}.{record}.{couriers[1:]}",
        f"{as_of}.{count}.{after}.{updated}.{record}.{couriers}.{couriers}",
        f"{as_of}.{count}.{after}.{2**63}.{record}.{couriers}",
        # A time no page can show (after year 9999): it was a 500 (OverflowError).
        f"{as_of}.{count}.{after}.{2**63 - 1}.{record}.{couriers}",
        # More events than the walk's timeline holds: none is ever deleted.
        f"{as_of}.{int(count) + 1}.{after}.{updated}.{record}.{couriers}",
    ):
        malformed = client.get(f"{URL}/{tn}", query_string={"cursor": wrong}, headers=headers)
        assert malformed.status_code == 400, wrong
        assert malformed.json["code"] == "cursor_malformed"
        assert list(malformed.json["errors"]) == ["cursor"]
    # One handed out before the cursor kept the walk's couriers: what its pages showed
    # cannot be checked, so walk again.
    earlier = f"{as_of}.{count}.{after}.{updated}.{record}"
    reset = client.get(f"{URL}/{tn}", query_string={"cursor": earlier}, headers=headers)
    assert reset.status_code == 410 and reset.json["code"] == "cursor_reset", reset.json
    assert "earlier version" in reset.json["message"]
    elsewhere = client.get(
        f"{URL}/{other.tracking_no}", query_string={"cursor": cursor}, headers=headers
    )
    assert elsewhere.status_code == 400 and elsewhere.json["code"] == "cursor_malformed"
    too_long = client.get(f"{URL}/{tn}", query_string={"limit": 501}, headers=headers)
    assert too_long.status_code == 422


def test_a_walk_through_a_timeline_adds_up_to_it_as_it_was_when_a_late_event_moves_it(
    client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    """A page followed the timeline as it was when asked, after an event: a late event
    of a lower seq dated after its PDA's later events moved them (projection order), and
    the next page left out an event there from the start (or repeated one), and ended
    all the same; an auditor took the last page for the whole. The pages of one walk
    now add up exactly to the timeline as it was at its first page (``as_of``), each
    event once, in that order; each page says how many events arrived since
    (``arrived_since``), and a walk begun again shows them in their place."""
    parcel = factories.parcel(session, world.station)
    factories.device(session, "PDA-0003", world.station)
    factories.user(session, "courier3", "courier", world.station)
    session.commit()
    tn = parcel.tracking_no
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)

    def scan(seq: int, minutes: int) -> dict:
        return factories.event(
            seq, tn, "out_for_delivery", occurred_at=start + dt.timedelta(minutes=minutes)
        )

    auth.push([scan(2, 0)])  # its seq 1 still on the PDA
    auth.push([scan(1, 3), scan(2, 20)], "courier3", "PDA-0003")
    headers = auth.headers("manager1")

    def page(limit: int, cursor: str | None = None) -> dict:
        query: dict = {"limit": limit} if cursor is None else {"limit": limit, "cursor": cursor}
        answer = client.get(f"{URL}/{tn}", query_string=query, headers=headers)
        assert answer.status_code == 200, answer.json
        return answer.json

    def seqs(timeline: list[dict]) -> list[tuple[str, int]]:
        return [(e["device_id"], e["seq"]) for e in timeline]

    before = page(500)
    assert seqs(before["timeline"]) == [("PDA-0001", 2), ("PDA-0003", 1), ("PDA-0003", 2)]
    walks = {limit: [page(limit)] for limit in (1, 2)}
    auth.push([scan(1, 10)])  # seq 1 arrives, dated after seq 2: both after PDA-0003's 1
    for limit, pages in walks.items():
        while pages[-1]["next_cursor"] is not None:
            pages.append(page(limit, pages[-1]["next_cursor"]))
        walked = [e for p in pages for e in p["timeline"]]
        assert walked == before["timeline"], limit
        assert {p["as_of"] for p in pages} == {before["as_of"]}
        assert [p["arrived_since"] for p in pages] == [0] + [1] * (len(pages) - 1)
    again = page(500)
    assert seqs(again["timeline"]) == [
        ("PDA-0003", 1),
        ("PDA-0001", 1),
        ("PDA-0001", 2),
        ("PDA-0003", 2),
    ]
    assert again["arrived_since"] == 0 and again["as_of"] > before["as_of"]


def test_a_walk_that_events_joined_below_its_as_of_is_refused_not_ordered_anew(
    client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    """Two PDAs' pushes of one parcel may commit out of their ids' order (PostgreSQL): a
    walk begun between them would read, on a later page, an event below its ``as_of``
    that its first page was ordered without. The cursor carries how many events the
    walk reads; a page that finds another number is a 410 ``cursor_reset``, start
    again, never a page of another order. (Here an event of another parcel, its id
    between the parcel's, is filed under it after the walk's first page: the parcel
    gains an event below ``as_of``, as a late commit makes it.)"""
    parcel = factories.parcel(session, world.station)
    other = factories.parcel(session, world.station, tracking_no="RB123456785GB")
    session.commit()
    tn = parcel.tracking_no
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)

    def scan(seq: int, tracking_no: str = tn) -> dict:
        when = start + dt.timedelta(minutes=seq)
        return factories.event(seq, tracking_no, "out_for_delivery", occurred_at=when)

    auth.push([scan(1), scan(2)])
    auth.push([scan(3, other.tracking_no)])
    auth.push([scan(4)])
    headers = auth.headers("manager1")
    first = client.get(f"{URL}/{tn}", query_string={"limit": 1}, headers=headers).json
    walk = f"{first['as_of']}.3.{first['timeline'][0]['event_id']}."
    assert first["next_cursor"].startswith(walk)
    session.execute(
        update(ScanEvent).where(ScanEvent.tracking_no == other.tracking_no).values(tracking_no=tn)
    )
    session.commit()
    joined = client.get(
        f"{URL}/{tn}", query_string={"limit": 1, "cursor": first["next_cursor"]}, headers=headers
    )
    assert joined.status_code == 410
    assert joined.json["code"] == "cursor_reset"
    assert list(joined.json["errors"]) == ["cursor"]
    # It says how many joined the walk, so that an auditor knows what the pages missed.
    assert joined.json["message"].startswith(
        f"1 event of {tn} with an id below this walk's as_of ({first['as_of']}) was stored"
    ), joined.json["message"]
    again = client.get(f"{URL}/{tn}", headers=headers).json
    assert [e["seq"] for e in again["timeline"]] == [1, 2, 3, 4]


def test_a_walk_is_not_refused_for_a_correction_filed_elsewhere_whose_target_came_after(
    client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    """A correction filed under another tracking number joins the parcel's timeline when
    its target arrives (``load_events`` files it under its target's parcel). A PDA that
    pushed the correction before the scan it voids (a lower seq sent late) brought that
    correction, stored long before, under a walk's ``as_of`` once the scan arrived during
    the walk: the walk's count changed and every later page was a 410 ``cursor_reset``
    blaming two pushes ending at once. The correction belongs to the walk only with its
    target: the walk goes on, as it was, and a walk begun again shows both."""
    parcel = factories.parcel(session, world.station)
    other = factories.parcel(session, world.station, tracking_no="RB123456785GB")
    factories.device(session, "PDA-0003", world.station)
    factories.user(session, "courier3", "courier", world.station)
    session.commit()
    tn = parcel.tracking_no
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    target = factories.event(
        1, tn, "out_for_delivery", occurred_at=start + dt.timedelta(minutes=10)
    )
    correction = factories.event(
        2,
        other.tracking_no,
        "correction",
        occurred_at=start + dt.timedelta(minutes=11),
        voids_client_event_id=target["client_event_id"],
        reason="mis-scanned",
    )
    receipt = auth.push([correction], "courier3", "PDA-0003")  # its seq 1 still on the PDA
    assert receipt["results"][0]["status"] == "applied", receipt
    auth.push(
        [
            factories.event(
                seq, tn, "out_for_delivery", occurred_at=start + dt.timedelta(minutes=seq)
            )
            for seq in (1, 2, 3)
        ]
    )
    headers = auth.headers("manager1")
    pages = [client.get(f"{URL}/{tn}", query_string={"limit": 1}, headers=headers).json]
    assert pages[0]["as_of"] > 0
    auth.push([target], "courier3", "PDA-0003")
    while pages[-1]["next_cursor"] is not None:
        answer = client.get(
            f"{URL}/{tn}",
            query_string={"limit": 1, "cursor": pages[-1]["next_cursor"]},
            headers=headers,
        )
        assert answer.status_code == 200, answer.json
        pages.append(answer.json)
    assert [e["seq"] for p in pages for e in p["timeline"]] == [1, 2, 3]
    # The scan and its correction: both new to the parcel's timeline, in no page of it.
    assert [p["arrived_since"] for p in pages] == [0, 2, 2]
    again = client.get(f"{URL}/{tn}", headers=headers).json
    assert [(e["device_id"], e["seq"], e["voided"]) for e in again["timeline"]][-2:] == [
        ("PDA-0003", 1, True),
        ("PDA-0003", 2, False),
    ]


def test_a_walk_refused_for_a_late_scan_says_its_correction_filed_elsewhere_came_with_it(
    client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    """On PostgreSQL a scan committing late holds an id below a walk's ``as_of``, and a
    correction of it filed under another tracking number, stored long before, joins the
    parcel's timeline with it: the walk is refused (410), rightly, but its message said
    "2 events ... were stored after it began (two PDAs' pushes ending at once)", the
    correction among them, which was not. It says the correction came with the event it
    voids. (Here the scan, stored under a third number before the walk, is filed under
    the parcel after its first page, as a late commit makes it.)"""
    parcel = factories.parcel(session, world.station)
    other = factories.parcel(session, world.station, tracking_no="RB123456785GB")
    third = factories.parcel(session, world.station)
    factories.device(session, "PDA-0003", world.station)
    factories.user(session, "courier3", "courier", world.station)
    session.commit()
    tn = parcel.tracking_no
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    target = factories.event(
        1, third.tracking_no, "out_for_delivery", occurred_at=start + dt.timedelta(minutes=10)
    )
    correction = factories.event(
        2,
        other.tracking_no,
        "correction",
        occurred_at=start + dt.timedelta(minutes=11),
        voids_client_event_id=target["client_event_id"],
        reason="mis-scanned",
    )
    auth.push([correction], "courier3", "PDA-0003")
    auth.push([target], "courier3", "PDA-0003")
    auth.push(
        [
            factories.event(
                seq, tn, "out_for_delivery", occurred_at=start + dt.timedelta(minutes=seq)
            )
            for seq in (1, 2, 3)
        ]
    )
    headers = auth.headers("manager1")
    first = client.get(f"{URL}/{tn}", query_string={"limit": 1}, headers=headers).json
    session.execute(
        update(ScanEvent).where(ScanEvent.tracking_no == third.tracking_no).values(tracking_no=tn)
    )
    session.commit()
    refused = client.get(
        f"{URL}/{tn}", query_string={"limit": 1, "cursor": first["next_cursor"]}, headers=headers
    )
    assert refused.status_code == 410 and refused.json["code"] == "cursor_reset", refused.json
    message = refused.json["message"]
    assert message.startswith(
        f"2 events of {tn} with ids below this walk's as_of ({first['as_of']}) joined its "
        "timeline after it began"
    ), message
    assert "a correction filed under another tracking number" in message, message
    assert "were stored after it began" not in message, message


def test_each_page_of_a_walk_shows_the_parcel_as_its_first_page_did(
    client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    """A walk's pages read its timeline as it was at its first page, but each page's
    parcel was the parcel as it was when asked: a delivery arriving during the walk, in
    no page of it, made page 2 say `delivered` beside a timeline ending out for
    delivery, and an auditor settling a dispute read a status the timeline shown did not
    make. Each page now shows the status, its time, the courier and `updated_at` of the
    walk's own events; a walk begun again shows the delivery. An intake changing the
    parcel's record during the walk (its recipient here), which its events cannot put
    back, makes the walk's next page a 410 `cursor_reset`."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    tn = parcel.tracking_no
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    at = [start + dt.timedelta(minutes=seq) for seq in range(4)]
    auth.push(
        [factories.event(seq, tn, "out_for_delivery", occurred_at=at[seq]) for seq in (1, 2, 3)]
    )
    headers = auth.headers("auditor1")
    header = ("status", "status_at", "courier_id", "updated_at", "recipient_name")

    def read(cursor: str | None = None) -> dict:
        query = {"limit": 1} if cursor is None else {"limit": 1, "cursor": cursor}
        answer = client.get(f"{URL}/{tn}", query_string=query, headers=headers)
        assert answer.status_code == 200, answer.json
        return answer.json

    pages = [read()]
    assert pages[0]["status"] == "out_for_delivery"
    delivered = start + dt.timedelta(minutes=10)
    auth.push(
        [factories.event(4, tn, "delivered", occurred_at=delivered, pod={"recipient_name": "Li"})]
    )
    while pages[-1]["next_cursor"] is not None:
        pages.append(read(pages[-1]["next_cursor"]))
    assert len(pages) == 3 and [p["arrived_since"] for p in pages] == [0, 1, 1]
    for page in pages[1:]:
        assert {k: page[k] for k in header} == {k: pages[0][k] for k in header}
    again = client.get(f"{URL}/{tn}", headers=headers).json
    assert again["status"] == "delivered" and again["updated_at"] > pages[0]["updated_at"]
    walk = read()
    intake = client.post(
        URL,
        json={"parcels": [item(tn, recipient_name="Someone Else")]},
        headers=auth.headers("manager1"),
    )
    assert intake.json["results"][0]["status"] == "updated", intake.json
    changed = client.get(
        f"{URL}/{tn}", query_string={"limit": 1, "cursor": walk["next_cursor"]}, headers=headers
    )
    assert changed.status_code == 410 and changed.json["code"] == "cursor_reset"
    assert list(changed.json["errors"]) == ["cursor"]


def test_a_walk_whose_events_a_shifts_close_filed_under_another_courier_is_refused(
    client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    """A walk read each entry's row with its page: courier1 hands the PDA over with the
    shift open, courier2's sign-in pushes the queued delivery, and the manager closes
    courier1's shift, filing it under courier1 (``shift_closed_for_courier``). An
    auditor walking the parcel's timeline across the close read the delivery under
    courier2 on the pages before it and under courier1 on those after, events of one
    walk under two couriers, and no word that anything changed. The cursor now keeps
    the couriers of the walk's events as its first page read them: a page finding one
    changed is a 410 ``cursor_reset`` naming the cause, and the walk begun again reads
    them as filed."""
    pda, shift, (first, _), queued = _handed_over(client, session, world, auth, closed=False)
    pda.push(queued)
    headers = auth.headers("auditor1")

    def events(tn: str) -> list[tuple[int, int]]:
        rows = session.execute(
            select(ScanEvent.id, ScanEvent.courier_id)
            .where(ScanEvent.tracking_no == tn)
            .order_by(ScanEvent.id)
        )
        return [(row.id, row.courier_id) for row in rows]

    before = events(first)
    assert len(before) == 2 and before[-1][1] != world.courier.id  # pushed under courier2
    walk = client.get(f"{URL}/{first}", query_string={"limit": 1}, headers=headers)
    assert walk.status_code == 200 and walk.json["next_cursor"] is not None, walk.json
    closed = client.post(
        f"/api/v1/shifts/{shift['id']}/close",
        json={"last_seq": 4},
        headers=auth.headers("manager1"),
    )
    assert closed.status_code == 200, closed.get_json()
    session.expire_all()
    after = events(first)
    assert after[-1] == (before[-1][0], world.courier.id)  # the close filed it under courier1
    changed = client.get(
        f"{URL}/{first}",
        query_string={"limit": 1, "cursor": walk.json["next_cursor"]},
        headers=headers,
    )
    assert changed.status_code == 410, changed.json
    assert changed.json["code"] == "cursor_reset"
    assert list(changed.json["errors"]) == ["cursor"]
    assert "shift's close" in changed.json["message"], changed.json["message"]
    again = client.get(f"{URL}/{first}", query_string={"limit": 1}, headers=headers).json
    pages = [again]
    while pages[-1]["next_cursor"] is not None:
        page = client.get(
            f"{URL}/{first}",
            query_string={"limit": 1, "cursor": pages[-1]["next_cursor"]},
            headers=headers,
        )
        assert page.status_code == 200, page.json
        pages.append(page.json)
    shown = {e["event_id"]: e["courier_id"] for p in pages for e in p["timeline"]}
    assert shown == dict(after)


def test_a_walk_refused_for_an_intake_says_what_the_intake_changed_and_when(
    client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    """An intake changing the parcel's record during a walk makes its next page a 410
    `cursor_reset`, which said only that its class, recipient, address, station or
    planned courier was changed: an auditor settling a dispute, told the pages read so
    far showed a record no longer so, could not tell which of it. The 410 names the
    fields the intakes changed since the walk began and when, from their
    `parcel_updated` entries (a class with its values; a phone or an address not, as a
    flag's reason names them), and the walk begun again goes through."""
    tn = "RR473124829GB"
    headers, manager = auth.headers("auditor1"), auth.headers("manager1")
    taken = client.post(URL, json={"parcels": [item(tn)]}, headers=manager)
    assert taken.json["results"][0]["status"] == "created", taken.json
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    auth.push(
        [
            factories.event(
                seq, tn, "out_for_delivery", occurred_at=start + dt.timedelta(minutes=seq)
            )
            for seq in (1, 2, 3)
        ]
    )
    walk = client.get(f"{URL}/{tn}", query_string={"limit": 1}, headers=headers).json
    for changes in (
        {"recipient_name": "Someone Else"},
        {
            "recipient_name": "Someone Else",
            "service_class": "parcel",
            "recipient_phone": "139 8765 4321",
        },
    ):
        intake = client.post(URL, json={"parcels": [item(tn, **changes)]}, headers=manager)
        assert intake.json["results"][0]["status"] == "updated", intake.json
    times = session.scalars(
        select(AuditEntry.at)
        .where(AuditEntry.action == "parcel_updated", AuditEntry.subject_key == tn)
        .order_by(AuditEntry.id)
    ).all()
    assert len(times) == 2
    changed = client.get(
        f"{URL}/{tn}", query_string={"limit": 1, "cursor": walk["next_cursor"]}, headers=headers
    )
    assert changed.status_code == 410 and changed.json["code"] == "cursor_reset"
    message = changed.json["message"]
    assert (
        "was changed since this walk began: its class from express to parcel, recipient's "
        "name and recipient's phone (changed at "
        f"{iso(times[0])}, {iso(times[1])})"
    ) in message, message
    assert "8765" not in message and "Someone" not in message
    again = client.get(f"{URL}/{tn}", query_string={"limit": 1}, headers=headers).json
    while again["next_cursor"] is not None:
        page = client.get(
            f"{URL}/{tn}",
            query_string={"limit": 1, "cursor": again["next_cursor"]},
            headers=headers,
        )
        assert page.status_code == 200, page.json
        again = page.json


def test_a_walk_refused_for_a_change_no_intake_entry_explains_keeps_the_plain_410(
    client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    """The 410 names what changed from the parcel's ``parcel_updated`` entries; one of
    another shape than an intake writes (hand-written), or a change with no entry,
    leaves it the message it had: a 410, never a 500."""
    tn = "RR473124829GB"
    manager = auth.headers("manager1")
    assert client.post(URL, json={"parcels": [item(tn)]}, headers=manager).status_code == 200
    auth.push([factories.event(seq, tn, "out_for_delivery") for seq in (1, 2)])
    headers = auth.headers("auditor1")
    walk = client.get(f"{URL}/{tn}", query_string={"limit": 1}, headers=headers).json
    session.execute(update(Parcel).where(Parcel.tracking_no == tn).values(address="elsewhere"))
    session.commit()
    for details in (None, {"changes": ["address"]}):
        if details is not None:
            audit.append(
                session=session,
                actor_id=None,
                action="parcel_updated",
                subject_type="parcel",
                subject_key=tn,
                details=details,
                tracking_no=tn,
            )
            session.commit()
        changed = client.get(
            f"{URL}/{tn}",
            query_string={"limit": 1, "cursor": walk["next_cursor"]},
            headers=headers,
        )
        assert changed.status_code == 410 and changed.json["code"] == "cursor_reset", details
        assert (
            "(its class, recipient, address, station or planned courier)"
            in (changed.json["message"])
        )


def test_an_auditors_read_of_a_page_of_a_walk_records_which_page_of_which_walk(
    client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    """``parcel_read`` named only the deliveries whose proof the page showed: an auditor's
    walk through a long timeline was a row of entries alike, and what the auditor saw
    on each page (as of when, from where) could not be told. Each entry now names the
    cursor sent, the walk's ``as_of``, the page's ``offset`` and ``entries``,
    ``arrived_since``, the ``next_cursor`` given and the status shown."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    tn = parcel.tracking_no
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    at = [start + dt.timedelta(minutes=seq) for seq in range(4)]
    auth.push(
        [factories.event(seq, tn, "out_for_delivery", occurred_at=at[seq]) for seq in (1, 2, 3)]
    )
    headers = auth.headers("auditor1")
    first = client.get(f"{URL}/{tn}", query_string={"limit": 2}, headers=headers).json
    second = client.get(
        f"{URL}/{tn}", query_string={"limit": 2, "cursor": first["next_cursor"]}, headers=headers
    ).json
    assert second["next_cursor"] is None
    session.expire_all()
    entries = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "parcel_read").order_by(AuditEntry.id)
    ).all()
    walk = {"as_of": first["as_of"], "arrived_since": 0, "status": "out_for_delivery"}
    assert [e.details for e in entries] == [
        {"event_ids": [], "cursor": None, "offset": 0, "entries": 2,
         "next_cursor": first["next_cursor"], **walk},
        {"event_ids": [], "cursor": first["next_cursor"], "offset": 2, "entries": 1,
         "next_cursor": None, **walk},
    ]  # fmt: skip


def test_an_auditors_read_names_every_delivery_it_shows_as_a_proofs_read_does(
    client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    """``parcel_read`` named the deliveries whose event carried a ``pod`` key, while a
    proof's read (``proof_read``) names every delivery of the parcel's timeline: a
    delivery sent without a POD (flagged ``delivered_without_pod``, a proof the search
    lists all the same) was shown to an auditor by the timeline and missing from its
    entry. One rule names the deliveries a read shows (``sync.proofs.deliveries_shown``)."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    tn = parcel.tracking_no
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    auth.push(
        [
            factories.event(1, tn, "out_for_delivery", occurred_at=start),
            factories.event(2, tn, "delivered", occurred_at=start + dt.timedelta(minutes=5)),
        ]
    )
    delivery = session.scalar(
        select(ScanEvent.id).where(ScanEvent.tracking_no == tn, ScanEvent.type == "delivered")
    )
    headers = auth.headers("auditor1")
    read = client.get(f"{URL}/{tn}", headers=headers)
    assert read.status_code == 200, read.json
    proof = client.get(f"/api/v1/proofs/{delivery}", headers=headers)
    assert proof.status_code == 200, proof.json
    session.expire_all()
    named = {
        entry.action: entry.details["event_ids"]
        for entry in session.scalars(
            select(AuditEntry).where(AuditEntry.action.in_(["parcel_read", "proof_read"]))
        )
    }
    assert named == {"parcel_read": [delivery], "proof_read": [delivery]}


def test_a_walks_first_page_shows_the_status_its_timeline_makes_when_a_push_came_between(
    client: FlaskClient, world: World, auth: Auth, session: Session, monkeypatch
) -> None:
    """A page reads the parcel's row, then its events, each in a statement of its own
    (PostgreSQL's READ COMMITTED): a push of the parcel committed between the two reads
    put its delivery in the first page's timeline and ``as_of``, but not in the status
    read before it, and the page said ``out_for_delivery`` beside a timeline ending
    ``delivered``, while the walk's next pages (the row newer than the cursor's) said
    ``delivered``. The row here is held as it was before the push, as such a read
    gives it; every page of the walk now shows the status its timeline makes."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    tn = parcel.tracking_no
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    at = [start + dt.timedelta(minutes=seq) for seq in range(4)]
    auth.push(
        [factories.event(seq, tn, "out_for_delivery", occurred_at=at[seq]) for seq in (1, 2, 3)]
    )
    session.expire_all()
    row = session.scalars(select(Parcel).where(Parcel.tracking_no == tn)).one()
    held = {
        name: getattr(row, name) for name in ("status", "status_at", "courier_id", "updated_at")
    }
    assert str(held["status"]) == "out_for_delivery"
    delivered = start + dt.timedelta(minutes=10)
    auth.push(
        [factories.event(4, tn, "delivered", occurred_at=delivered, pod={"recipient_name": "Li"})]
    )
    read_row = parcel_routes.get_parcel

    def read_before_the_push(*, session: Session, tracking_no: str) -> Parcel:
        parcel = read_row(session=session, tracking_no=tracking_no)
        for name, value in held.items():
            set_committed_value(parcel, name, value)
        return parcel

    headers = auth.headers("auditor1")

    def read(cursor: str | None = None) -> dict:
        query = {"limit": 2} if cursor is None else {"limit": 2, "cursor": cursor}
        answer = client.get(f"{URL}/{tn}", query_string=query, headers=headers)
        assert answer.status_code == 200, answer.json
        return answer.json

    monkeypatch.setattr(parcel_routes, "get_parcel", read_before_the_push)
    pages = [read()]
    monkeypatch.undo()
    while pages[-1]["next_cursor"] is not None:
        pages.append(read(pages[-1]["next_cursor"]))
    assert len(pages) == 2 and pages[0]["arrived_since"] == 0
    assert pages[-1]["timeline"][-1]["type"] == "delivered"
    shown = [(p["status"], p["status_at"], p["courier_id"]) for p in pages]
    assert [status for status, _, _ in shown] == ["delivered", "delivered"]
    assert shown[0] == shown[1]
