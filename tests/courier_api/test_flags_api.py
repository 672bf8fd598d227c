"""GET /flags, GET /flags/<id>, POST /flags/<id>/acknowledge and /resolve, and who may."""

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

import sync
from courier_api.extensions import db
from models import AuditEntry, Flag, FlagChange, FlagSeverity, FlagStatus, ScanEvent
from sync import audit
from sync.flags import FlagSubject, close_flag, evidence_version, raise_flag, reopen_flag
from tests import factories
from tests.conftest import Auth, World
from tests.courier_api.test_shifts_api import Courier, parcels, sign_off
from tests.threads import race

FLAGS = "/api/v1/flags"


def make_flag(
    session: Session,
    station_id: int | None,
    key: str,
    kind: str = "unknown_parcel",
    severity: FlagSeverity = FlagSeverity.WARNING,
    courier_id: int | None = None,
) -> Flag:
    raised = raise_flag(
        session=session,
        kind=kind,
        severity=severity,
        subject=FlagSubject("parcel", key),
        station_id=station_id,
        evidence={"event_ids": [1, 2]},
        courier_id=courier_id,
    )
    session.commit()
    return raised.flag


@dataclass
class Flags:
    here: Flag  # ST1, open, courier1's
    skew: Flag  # ST1, critical clock_skew
    there: Flag  # ST2


@pytest.fixture
def flags(session: Session, world: World) -> Flags:
    here = make_flag(session, world.station.id, "RR1", courier_id=world.courier.id)
    skew = make_flag(
        session, world.station.id, "RR2", kind="clock_skew", severity=FlagSeverity.CRITICAL
    )
    there = make_flag(session, world.other_station.id, "RR3")
    return Flags(here=here, skew=skew, there=there)


def listed(client: FlaskClient, headers: dict[str, str], query: str = "") -> list[int]:
    response = client.get(f"{FLAGS}?{query}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return [item["id"] for item in response.get_json()["items"]]


# -- listing ----------------------------------------------------------------------------------


def test_managers_list_their_own_station_whatever_station_id_says(
    client: FlaskClient, auth: Auth, world: World, flags: Flags
) -> None:
    manager = auth.headers("manager1")
    own = [flags.skew.id, flags.here.id]
    assert listed(client, manager) == own
    assert listed(client, manager, f"station_id={world.other_station.id}") == own
    assert listed(client, auth.headers("manager2")) == [flags.there.id]


@pytest.mark.parametrize("username", ["admin", "auditor1"])
def test_admins_and_auditors_list_every_station(
    client: FlaskClient, auth: Auth, world: World, flags: Flags, username: str
) -> None:
    headers = auth.headers(username)
    assert listed(client, headers) == [flags.there.id, flags.skew.id, flags.here.id]
    assert listed(client, headers, f"station_id={world.other_station.id}") == [flags.there.id]


def test_a_listed_flag_carries_its_fields(
    client: FlaskClient, auth: Auth, world: World, flags: Flags
) -> None:
    item = client.get(FLAGS, headers=auth.headers("admin")).get_json()["items"][-1]
    assert item["opened_at"] == item["raised_at"]  # never opened again
    assert item | {"raised_at": None, "opened_at": None, "updated_at": None} == {
        "id": flags.here.id,
        "station_id": world.station.id,
        "kind": "unknown_parcel",
        "severity": "warning",
        "subject_type": "parcel",
        "subject_key": "RR1",
        "evidence": {"event_ids": [1, 2]},
        "status": "open",
        "courier_id": world.courier.id,
        "shift_id": None,
        "raised_at": None,
        "opened_at": None,
        "updated_at": None,
        "closed_reason": None,
        "decision": None,
        "decided_on": None,
        "evidence_version": evidence_version({"event_ids": [1, 2]}),
    }


def test_list_filters(
    client: FlaskClient, auth: Auth, session: Session, world: World, flags: Flags
) -> None:
    day = dt.datetime(2026, 11, 20, 8, tzinfo=dt.UTC)
    flags.here.raised_at = day - dt.timedelta(days=1)
    flags.skew.raised_at = day
    flags.there.raised_at = day + dt.timedelta(days=1)
    session.commit()
    admin = auth.headers("admin")
    assert listed(client, admin, "kind=clock_skew") == [flags.skew.id]
    assert listed(client, admin, "severity=critical") == [flags.skew.id]
    assert listed(client, admin, f"courier_id={world.courier.id}") == [flags.here.id]
    assert listed(client, admin, "status=resolved") == []
    # 16:00:01+08:00 is 08:00:01Z; raised_from is inclusive, raised_to exclusive.
    assert listed(client, admin, "raised_to=2026-11-20T16:00:01%2B08:00") == [
        flags.skew.id,
        flags.here.id,
    ]
    assert listed(client, admin, "raised_from=2026-11-20T08:00Z&raised_to=2026-11-21T08:00Z") == [
        flags.skew.id
    ]
    assert listed(client, admin, "raised_from=2026-11-20T08:00:01Z") == [flags.there.id]


def test_standing_leaves_out_the_flags_the_system_closed(
    client: FlaskClient, auth: Auth, session: Session, world: World, flags: Flags
) -> None:
    """A flag raised and closed only because a PDA's pushes came in a given order (the
    parcel taken in after its scans) is not one a dashboard of what stands should show,
    nor do the reports count it: ``standing=true`` lists the others, resolved ones too."""
    close_flag(
        session=session,
        kind="unknown_parcel",
        subject=FlagSubject("parcel", "RR1"),
        reason="taken in",
        station_id=world.station.id,
    )
    flags.skew.status = FlagStatus.RESOLVED
    session.commit()
    manager = auth.headers("manager1")
    assert listed(client, manager) == [flags.skew.id, flags.here.id]
    assert listed(client, manager, "standing=true") == [flags.skew.id]


def test_the_flags_still_waiting_for_a_decision_are_listed_together(
    client: FlaskClient, auth: Auth, session: Session, world: World, flags: Flags
) -> None:
    """At 19:00 the queue the manager works through is what still waits, open or
    acknowledged, as a board row counts its open flags: `status` takes one value, so
    they read two lists or every flag resolved and closed with them. `waiting=true`."""
    manager = auth.headers("manager1")
    close_flag(
        session=session,
        kind="clock_skew",
        subject=FlagSubject("parcel", "RR2"),
        reason="the PDA's clock is right again",
    )
    closed = make_flag(session, world.station.id, "RR4")
    close_flag(
        session=session,
        kind="unknown_parcel",
        subject=FlagSubject("parcel", "RR4"),
        reason="taken in",
    )
    session.commit()
    acknowledged = make_flag(session, world.station.id, "RR5")
    response = client.post(f"{FLAGS}/{acknowledged.id}/acknowledge", json={}, headers=manager)
    assert response.status_code == 200, response.get_json()
    assert listed(client, manager) == [acknowledged.id, closed.id, flags.skew.id, flags.here.id]
    assert listed(client, manager, "waiting=true") == [acknowledged.id, flags.here.id]
    assert listed(client, manager, "waiting=true&status=acknowledged") == [acknowledged.id]
    assert listed(client, manager, "waiting=false") == listed(client, manager)


def test_a_shifts_own_flags_are_listed_by_its_id_at_the_readers_station(
    client: FlaskClient, auth: Auth, session: Session, world: World, flags: Flags
) -> None:
    """A shift's own flags (here the parcel missing at its handover) carry its id and are
    found by it; otherwise a program following a shift pages through its station's whole
    queue to find them. Station-bound as the other filters: another station's manager
    finds none."""
    tracking_no = factories.parcel(session, world.station).tracking_no
    session.commit()
    pda = auth.headers("courier1", "PDA-0001")
    shift = client.post("/api/v1/shifts", json={}, headers=pda).get_json()
    auth.push([factories.event(1, tracking_no, shift_id=shift["id"])])
    closed = client.post(f"/api/v1/shifts/{shift['id']}/close", json={}, headers=pda)
    assert closed.status_code == 200, closed.get_json()

    response = client.get(f"{FLAGS}?shift_id={shift['id']}", headers=auth.headers("manager1"))

    [missing] = response.get_json()["items"]
    assert (missing["kind"], missing["shift_id"]) == ("missing_at_handover", shift["id"])
    assert listed(client, auth.headers("manager2"), f"shift_id={shift['id']}") == []
    other = f"shift_id={shift['id']}&station_id={world.other_station.id}"
    assert listed(client, auth.headers("admin"), other) == []
    assert listed(client, auth.headers("auditor1"), f"shift_id={shift['id']}") == [missing["id"]]


def test_a_lost_parcels_flags_are_listed_by_its_tracking_number_at_the_readers_station(
    client: FlaskClient, auth: Auth, session: Session, world: World, flags: Flags
) -> None:
    """A parcel of ST1 is lost: checked out and never accounted for (its handover flag,
    subject ``<shift>:<tracking no>``), and its last scan was by a courier of ST2
    (``wrong_station``, the parcel's station's to settle); ST2 has a flag of its own
    about it. With no delivery no proof lists its flags: the auditor asks for them by
    its number, however written, and gets them all, and no other parcel's; each
    station's manager gets their own station's."""
    lost = factories.parcel(session, world.station).tracking_no
    factories.user(session, "courier2", "courier", world.other_station)
    session.commit()
    pda = auth.headers("courier1", "PDA-0001")
    shift = client.post("/api/v1/shifts", json={}, headers=pda).get_json()
    auth.push([factories.event(1, lost, shift_id=shift["id"])])
    assert (
        client.post(f"/api/v1/shifts/{shift['id']}/close", json={}, headers=pda).status_code == 200
    )
    receipt = auth.push([factories.event(1, lost)], username="courier2", device_id="PDA-0002")
    assert [f["kind"] for f in receipt["flags_raised"]] == ["wrong_station"]
    make_flag(session, world.other_station.id, lost, kind="time_inversion")
    session.commit()

    def found(username: str, number: str = lost) -> list[tuple[str, str, int | None]]:
        response = client.get(
            FLAGS, query_string={"tracking_no": number}, headers=auth.headers(username)
        )
        assert response.status_code == 200, response.get_json()
        return [(f["kind"], f["subject_key"], f["station_id"]) for f in response.json["items"]]

    missing = ("missing_at_handover", f"{shift['id']}:{lost}", world.station.id)
    scanned = ("wrong_station", lost, world.station.id)
    theirs = ("time_inversion", lost, world.other_station.id)
    assert found("auditor1") == [theirs, scanned, missing]  # the latest opened first
    assert found("auditor1", f"{lost[:2].lower()} {lost[2:]}") == [theirs, scanned, missing]
    assert found("manager1") == [scanned, missing]
    assert found("manager2") == [theirs]
    assert found("auditor1", flags.here.subject_key) == [
        (flags.here.kind, flags.here.subject_key, world.station.id)
    ]


def test_a_parcels_flags_include_its_shifts_and_pdas_flags_citing_it(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """An auditor settles a dispute about parcel b, missing at a handover the manager
    signed off, returned late on a PDA whose clock had jumped. ``GET /flags?
    tracking_no=b`` listed b's handover flag only: not the shift's
    ``late_event_after_signoff`` citing b's late return, nor the PDA's ``clock_jump``
    citing b's scans, flags the proof of a delivery lists when they cite it. Both are
    listed for b now, for its station's manager too, and neither for a (whose events
    they do not cite) nor for another station's manager."""
    a, b = parcels(session, world, 2)
    pda = Courier(client, auth, "courier1", "PDA-0001")
    manager = auth.headers("manager1")
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b), pda.event(a, "delivered")])
    closed = client.post(f"/api/v1/shifts/{shift['id']}/close", json={}, headers=manager)
    assert closed.status_code == 200, closed.get_json()
    assert sign_off(client, shift["id"], manager, note="b missing").status_code == 200
    jumped = now() - dt.timedelta(days=40)
    receipt = pda.push(
        [pda.event(b, "returned_to_station", shift_id=shift["id"], occurred_at=jumped)]
    )
    raised = {f["kind"] for f in receipt["flags_raised"]}
    assert {"late_event_after_signoff", "clock_jump"} <= raised, raised

    def kinds(number: str, username: str) -> list[str]:
        response = client.get(
            FLAGS, query_string={"tracking_no": number}, headers=auth.headers(username)
        )
        assert response.status_code == 200, response.get_json()
        return sorted(f["kind"] for f in response.json["items"])

    cited = {"clock_jump", "late_event_after_signoff", "missing_at_handover"}
    for reader in ("auditor1", "manager1"):
        assert cited <= set(kinds(b, reader)), kinds(b, reader)
        assert cited.isdisjoint(kinds(a, reader)), kinds(a, reader)
    assert kinds(b, "manager2") == []

    # Page by page (the keyset after each page's last id), the same flags in the same
    # order as in one page: its own and those citing it, none twice, none left out.
    whole = client.get(FLAGS, query_string={"tracking_no": b}, headers=manager).json["items"]
    paged: list[int] = []
    after = None
    while True:
        query = {"tracking_no": b, "limit": 1} | ({"after": after} if after else {})
        page = client.get(FLAGS, query_string=query, headers=manager).get_json()
        paged += [f["id"] for f in page["items"]]
        after = page.get("next_after")
        if not page["items"] or after is None:
            break
    assert paged == [f["id"] for f in whole] and len(whole) >= 3, (paged, whole)


def test_a_parcels_flags_include_its_shifts_flag_citing_only_its_rejected_event(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """A dispute about parcel b: the PDA sent a locker drop of it after the shift was
    signed off, without its locker, and the server refused it. The shift owns the
    drop's seq (closed without its last seq), so it reopened with a
    ``late_event_after_signoff`` citing the refused drop, the only event of b: ``GET
    /audit?tracking_no=b`` lists the reopening, ``GET /flags?tracking_no=b`` listed
    nothing, as it found b's shifts by b's stored events only. It lists the flag now,
    and still once a colleague's PDA has scanned b in a shift of its own (b's stored
    events then name that shift, not the one whose seq the drop holds)."""
    a, b = parcels(session, world, 2)
    factories.user(session, "courier3", "courier", world.station)
    factories.device(session, "PDA-0003", world.station)
    session.commit()
    pda = Courier(client, auth, "courier1", "PDA-0001")
    manager = auth.headers("manager1")
    shift = pda.open()
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    assert pda.close(shift["id"]).status_code == 200
    assert sign_off(client, shift["id"], manager, note="all back").status_code == 200
    receipt = pda.push([pda.event(b, "delivered_to_locker", compartment="B07")])
    assert receipt["results"][0]["status"] == "rejected"
    [late] = [f["flag_id"] for f in receipt["flags_raised"]]
    flag = session.get(Flag, late)
    assert flag is not None and flag.kind == "late_event_after_signoff"
    auditor = auth.headers("auditor1")
    audited = client.get("/api/v1/audit", query_string={"tracking_no": b}, headers=auditor)
    assert "shift_reopened" in {e["action"] for e in audited.json["items"]}, audited.json

    def found(username: str, number: str = b) -> list[int]:
        response = client.get(
            FLAGS, query_string={"tracking_no": number}, headers=auth.headers(username)
        )
        assert response.status_code == 200, response.get_json()
        return [f["id"] for f in response.json["items"]]

    assert late in found("auditor1") and late in found("manager1")
    assert found("manager2") == []
    assert late not in found("auditor1", a)

    colleague = Courier(client, auth, "courier3", "PDA-0003")
    colleague.open()
    colleague.push([colleague.event(b)])
    assert late in found("auditor1") and late in found("manager1")


def test_the_list_pages_by_keyset(client: FlaskClient, auth: Auth, flags: Flags) -> None:
    admin = auth.headers("admin")
    first = client.get(f"{FLAGS}?limit=2", headers=admin).get_json()
    assert [i["id"] for i in first["items"]] == [flags.there.id, flags.skew.id]
    assert first["next_after"] == flags.skew.id
    rest = client.get(f"{FLAGS}?limit=2&after={first['next_after']}", headers=admin).get_json()
    assert [i["id"] for i in rest["items"]] == [flags.here.id]
    assert rest["next_after"] is None


def test_a_page_after_another_stations_flag_answers_as_after_an_id_naming_nothing(
    client: FlaskClient, auth: Auth, flags: Flags
) -> None:
    """The keyset cursor is a flag's id, and the next page starts where that flag stands
    in the queue. Given another station's flag, the page showed where it stood (the
    manager's own flags opened before it): paging with ids one by one told a curious
    manager which ids are another station's flags and, by halving, when each was opened
    (SECURITY.md threat 3). It answers what an id naming no flag answers."""
    manager = auth.headers("manager1")
    unknown = listed(client, manager, "after=999999")
    assert listed(client, manager, f"after={flags.there.id}") == unknown
    assert listed(client, manager, f"after={flags.skew.id}") == [flags.here.id]
    # A cursor carries its place, a time and an id: naming another station's flag, it
    # reads nothing of it, and lists the manager's own flags below that place.
    first = client.get(FLAGS, query_string={"limit": 1}, headers=manager).get_json()
    place, _, walk = first["next_cursor"].split(".", 2)  # walk: where it began
    below = listed(client, manager, f"cursor={place}.999999.{walk}")
    assert below == [flags.skew.id, flags.here.id]  # skew opened there, its id below
    assert listed(client, manager, f"cursor={place}.{flags.there.id}.{walk}") == below
    assert listed(client, manager, f"cursor={place}.{flags.skew.id}.{walk}") == [flags.here.id]


def test_a_flag_opened_again_is_listed_first(
    client: FlaskClient, session: Session, auth: Auth, world: World, flags: Flags
) -> None:
    """The manager resolved RR1's flag last week; today a new event of the parcel raises
    it again, on more than the resolution covered, and it is open again. At 19:00 the
    queue lists it at the top, with the flags raised today, not below every flag raised
    since it first was; paging goes on from where each flag stands now."""
    manager = auth.headers("manager1")
    assert listed(client, manager) == [flags.skew.id, flags.here.id]
    resolved = client.post(
        f"{FLAGS}/{flags.here.id}/resolve", json={"note": "checked"}, headers=manager
    )
    assert resolved.status_code == 200, resolved.get_json()
    assert listed(client, manager) == [flags.skew.id, flags.here.id]  # a decision: no move
    session.expire_all()  # as the next push's own session reads it
    raised = raise_flag(
        session=session,
        kind="unknown_parcel",
        severity=FlagSeverity.WARNING,
        subject=FlagSubject("parcel", "RR1"),
        station_id=world.station.id,
        evidence={"event_ids": [3]},
    )
    session.commit()
    assert raised.new and raised.flag.status.value == "open"
    assert listed(client, manager) == [flags.here.id, flags.skew.id]
    assert listed(client, manager, "status=open") == [flags.here.id, flags.skew.id]
    first = client.get(f"{FLAGS}?limit=1", headers=manager).get_json()
    assert [i["id"] for i in first["items"]] == [flags.here.id]
    assert first["next_after"] == flags.here.id
    assert listed(client, manager, f"limit=1&after={flags.here.id}") == [flags.skew.id]
    assert listed(client, manager, f"after={flags.skew.id}") == []


def test_a_walk_by_cursor_neither_repeats_nor_starts_over_when_its_last_flag_reopens(
    client: FlaskClient, session: Session, auth: Auth, world: World, flags: Flags
) -> None:
    """At 19:00 a manager walks the queue page by page; meanwhile the last flag shown is
    opened again (a new event of its parcel, beyond the decision on it). The next page by
    ``after`` went on from where that flag stands now, the top, and listed again a flag
    already shown. A page's ``next_cursor`` holds where its last flag stood when listed:
    the walk goes on below it, each flag once; the flag opened again is at the top, with
    the new ones, where a walk begun again finds it."""
    admin = auth.headers("admin")
    first = client.get(FLAGS, query_string={"limit": 2}, headers=admin).get_json()
    assert [i["id"] for i in first["items"]] == [flags.there.id, flags.skew.id]
    assert first["next_cursor"] is not None
    resolved = client.post(
        f"{FLAGS}/{flags.skew.id}/resolve", json={"note": "checked"}, headers=admin
    )
    assert resolved.status_code == 200, resolved.get_json()
    session.expire_all()
    raised = raise_flag(
        session=session,
        kind="clock_skew",
        severity=FlagSeverity.CRITICAL,
        subject=FlagSubject("parcel", "RR2"),
        station_id=world.station.id,
        evidence={"event_ids": [3]},
    )
    session.commit()
    assert raised.flag.status == FlagStatus.OPEN
    # The deprecated way: from where the flag stands now, the top: ``there`` again.
    assert listed(client, admin, f"limit=2&after={flags.skew.id}") == [
        flags.there.id,
        flags.here.id,
    ]
    rest = client.get(
        FLAGS, query_string={"limit": 2, "cursor": first["next_cursor"]}, headers=admin
    ).get_json()
    assert [i["id"] for i in rest["items"]] == [flags.here.id]
    assert rest["next_cursor"] is None and rest["next_after"] is None
    assert listed(client, admin) == [flags.skew.id, flags.there.id, flags.here.id]
    # A cursor and ``after`` at once, or a cursor this server never gave, is refused.
    both = client.get(
        FLAGS, query_string={"cursor": first["next_cursor"], "after": 1}, headers=admin
    )
    assert both.status_code == 422 and both.get_json()["code"] == "cursor_and_after"
    for wrong in ("x", "1", "1.2.3", f"{first['next_cursor']}0" * 3, "99999999999999999999.1"):
        malformed = client.get(FLAGS, query_string={"cursor": wrong}, headers=admin)
        assert malformed.status_code == 400, wrong
        assert malformed.get_json()["code"] == "cursor_malformed", wrong


def test_a_walk_whose_passed_pages_gained_a_flag_committed_late_is_refused_at_its_end(
    client: FlaskClient, session: Session, auth: Auth, world: World, flags: Flags
) -> None:
    """An auditor walks the queue while a long push is still committing: its flag was
    opened (``opened_at``, when the push stored it) between two flags the first page
    showed, and committed after that page was read. The next pages go on below the first
    page's last flag, so none of them lists it: the walk ended with ``next_cursor`` null,
    every page a 200, one flag never shown. The walk's last page counts the flags raised
    up to where it began, as the first page counted them, and refuses the walk (410
    ``cursor_reset``: search again) when more are there now; the walk begun again lists
    it."""
    auditor = auth.headers("auditor1")
    first = client.get(FLAGS, query_string={"limit": 2}, headers=auditor).get_json()
    assert [i["id"] for i in first["items"]] == [flags.there.id, flags.skew.id]
    late = make_flag(session, world.station.id, "RR9")
    factories.flag_raised_at(  # stored by the push before the page was read, committed after
        session, late, flags.skew.opened_at + (flags.there.opened_at - flags.skew.opened_at) / 2
    )
    session.commit()
    rest = client.get(
        FLAGS, query_string={"limit": 2, "cursor": first["next_cursor"]}, headers=auditor
    )
    assert rest.status_code == 410, rest.get_json()
    body = rest.get_json()
    assert body["code"] == "cursor_reset" and "cursor" in body["errors"]
    assert "list the flags again from the start" in body["message"], body["message"]
    assert listed(client, auditor) == [flags.there.id, late.id, flags.skew.id, flags.here.id]


def test_a_walk_of_a_parcels_flags_finds_one_committed_late_however_long_after(
    client: FlaskClient, session: Session, auth: Auth, world: World
) -> None:
    """A parcel's flags are a handful: its walk counts them whenever raised, not those
    of the minutes before it began alone, so a flag stored hours before its transaction
    committed, between two the first page showed, is found too (410)."""
    hours = [3, 2, 1]
    made = [
        make_flag(session, world.station.id, "RR5", kind=kind)
        for kind in ("unknown_parcel", "clock_skew", "far_from_address")
    ]
    for flag, ago in zip(made, hours, strict=True):
        factories.flag_raised_at(session, flag, now() - dt.timedelta(hours=ago))
    session.commit()
    auditor, query = auth.headers("auditor1"), {"limit": 2, "tracking_no": "RR5"}
    first = client.get(FLAGS, query_string=query, headers=auditor).get_json()
    assert [i["id"] for i in first["items"]] == [made[2].id, made[1].id]
    late = make_flag(session, world.station.id, "RR5", kind="time_inversion")
    factories.flag_raised_at(session, late, now() - dt.timedelta(minutes=90))
    session.commit()
    rest = client.get(
        FLAGS, query_string={**query, "cursor": first["next_cursor"]}, headers=auditor
    )
    assert rest.status_code == 410, rest.get_json()
    assert rest.get_json()["code"] == "cursor_reset"


def test_a_walk_past_a_flag_opened_again_by_a_push_committed_late_is_refused_at_its_end(
    client: FlaskClient, session: Session, auth: Auth, world: World, flags: Flags
) -> None:
    """A flag resolved hours ago is opened again by a push (a loss the decision never
    saw), which stores its new place (``opened_at``) between two flags the walk's first
    page showed and commits after that page was read. The walk's later pages, below the
    first, no longer find it at its old place and never at its new one: raised hours
    ago, outside the minutes the walk counts, it was no flag the walk's check counted,
    and the walk ended with ``next_cursor`` null without it. Its opening is counted
    (410 ``cursor_reset``), and the walk begun again lists it."""
    resolved = make_flag(session, world.station.id, "RR7")
    factories.flag_raised_at(session, resolved, now() - dt.timedelta(hours=3))
    resolved.status = FlagStatus.RESOLVED
    session.commit()
    auditor = auth.headers("auditor1")
    first = client.get(FLAGS, query_string={"limit": 2}, headers=auditor).get_json()
    assert [i["id"] for i in first["items"]] == [flags.there.id, flags.skew.id]
    reopen_flag(session=session, flag=resolved, note="raised again on evidence")
    session.flush()
    # stored by the push before the page was read, committed after it
    stored = flags.skew.opened_at + (flags.there.opened_at - flags.skew.opened_at) / 2
    resolved.opened_at = stored
    opening = session.scalars(
        select(FlagChange).where(FlagChange.flag_id == resolved.id).order_by(FlagChange.id)
    ).all()[-1]
    assert opening.to_status == FlagStatus.OPEN
    opening.at = stored
    session.commit()
    rest = client.get(
        FLAGS, query_string={"limit": 2, "cursor": first["next_cursor"]}, headers=auditor
    )
    assert rest.status_code == 410, rest.get_json()
    assert rest.get_json()["code"] == "cursor_reset"
    assert listed(client, auditor) == [
        flags.there.id,
        resolved.id,
        flags.skew.id,
        flags.here.id,
    ]


def test_a_walk_that_gained_no_flag_below_where_it_began_ends_as_a_page_of_its_own(
    client: FlaskClient, session: Session, auth: Auth, world: World, flags: Flags
) -> None:
    """The walk's check takes neither a flag raised since it began (at the top, with the
    new ones), nor one opened again or decided meanwhile, nor a filter's flags whose
    status changed, for a flag it missed: each page a 200, each flag once."""
    auditor = auth.headers("auditor1")
    query = {"limit": 1, "status": "open"}
    first = client.get(FLAGS, query_string=query, headers=auditor).get_json()
    assert [i["id"] for i in first["items"]] == [flags.there.id]
    make_flag(session, world.station.id, "RR8")  # raised since: above where it began
    resolved = client.post(
        f"{FLAGS}/{flags.there.id}/resolve", json={"note": "seen"}, headers=auth.headers("admin")
    )
    assert resolved.status_code == 200, resolved.get_json()
    shown, cursor = [], first["next_cursor"]
    while cursor is not None:
        page = client.get(FLAGS, query_string={**query, "cursor": cursor}, headers=auditor)
        assert page.status_code == 200, page.get_json()
        shown += [i["id"] for i in page.get_json()["items"]]
        cursor = page.get_json()["next_cursor"]
    assert shown == [flags.skew.id, flags.here.id]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("severity=loud", "severity"),
        ("status=gone", "status"),
        ("raised_from=2026-11-20T08:00:00", "raised_from"),  # no offset: ambiguous
        ("raised_from=0001-01-01T00:00:00%2B01:00", "raised_from"),  # before year 1 in UTC
        ("after=-1", "after"),
        ("courier_id=99999999999", "courier_id"),
        ("limit=501", "limit"),
        ("kind=unauthorized+locker+drop", "kind"),  # a kind's code, exactly
    ],
)
def test_bad_list_arguments_are_422_naming_the_field(
    client: FlaskClient, auth: Auth, world: World, query: str, field: str
) -> None:
    response = client.get(f"{FLAGS}?{query}", headers=auth.headers("admin"))
    assert response.status_code == 422
    assert field in response.get_json()["errors"]["query"]


def test_an_unknown_kind_is_422_naming_the_kinds(
    client: FlaskClient, auth: Auth, world: World
) -> None:
    """Otherwise a kind mistyped lists no flag, as if there were none of it."""
    response = client.get(f"{FLAGS}?kind=locker_drop", headers=auth.headers("admin"))
    assert response.status_code == 422
    [message] = response.get_json()["errors"]["query"]["kind"]
    assert message.startswith("no flag is of kind locker_drop; the kinds are ")
    assert "unauthorized_locker_drop" in message and "missing_at_handover" in message


def test_an_empty_time_range_is_422(client: FlaskClient, auth: Auth, world: World) -> None:
    response = client.get(
        f"{FLAGS}?raised_from=2026-11-20T08:00:00Z&raised_to=2026-11-20T08:00:00Z",
        headers=auth.headers("admin"),
    )
    assert response.status_code == 422
    body = response.get_json()
    assert body["code"] == "invalid_range" and "raised_to" in body["errors"]


# -- one flag ---------------------------------------------------------------------------------


def test_a_flag_comes_with_its_history(
    client: FlaskClient, auth: Auth, session: Session, flags: Flags
) -> None:
    close_flag(
        session=session, kind="unknown_parcel", subject=FlagSubject("parcel", "RR1"), reason="in"
    )
    session.commit()
    body = client.get(f"{FLAGS}/{flags.here.id}", headers=auth.headers("auditor1")).get_json()
    assert body["status"] == "closed" and body["closed_reason"] == "in"
    assert [
        (c["from_status"], c["to_status"], c["by_user_id"], c["note"]) for c in body["changes"]
    ] == [(None, "open", None, None), ("open", "closed", None, "in")]


@pytest.mark.parametrize("path", ["", "/acknowledge", "/resolve"])
def test_an_unknown_flag_is_404(client: FlaskClient, auth: Auth, world: World, path: str) -> None:
    method = client.get if not path else client.post
    response = method(f"{FLAGS}/424242{path}", headers=auth.headers("admin"), json={"note": "x"})
    assert response.status_code == 404
    assert response.get_json()["code"] == "flag_not_found"
    huge = method(f"{FLAGS}/99999999999{path}", headers=auth.headers("admin"), json={})
    assert huge.status_code == 404


# -- acknowledge and resolve ------------------------------------------------------------------


def test_a_manager_acknowledges_then_resolves(
    client: FlaskClient, auth: Auth, session: Session, world: World, flags: Flags
) -> None:
    manager = auth.headers("manager1")
    acknowledged = client.post(
        f"{FLAGS}/{flags.here.id}/acknowledge", json={"note": "looking"}, headers=manager
    )
    assert acknowledged.status_code == 200, acknowledged.get_json()
    assert acknowledged.get_json()["status"] == "acknowledged"
    assert acknowledged.get_json()["decision"] == "acknowledged"
    assert acknowledged.get_json()["decided_on"] == {"event_ids": [1, 2]}
    resolved = client.post(
        f"{FLAGS}/{flags.here.id}/resolve", json={"note": "parcel found"}, headers=manager
    )
    assert resolved.status_code == 200, resolved.get_json()
    body = resolved.get_json()
    assert (body["status"], body["decision"]) == ("resolved", "resolved")
    assert [(c["to_status"], c["by_user_id"], c["note"]) for c in body["changes"]] == [
        ("open", None, None),
        ("acknowledged", world.manager.id, "looking"),
        ("resolved", world.manager.id, "parcel found"),
    ]
    entries = session.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
    assert [(e.action, e.actor_id, e.subject_key, e.details["note"]) for e in entries] == [
        ("flag_acknowledged", world.manager.id, str(flags.here.id), "looking"),
        ("flag_resolved", world.manager.id, str(flags.here.id), "parcel found"),
    ]
    assert [e.details["decided_on"] for e in entries] == [{"event_ids": [1, 2]}] * 2


def test_a_phone_in_a_managers_note_is_masked_except_for_auditors(
    client: FlaskClient, auth: Auth, flags: Flags
) -> None:
    """The manager acknowledges the flag, calls the recipient and resolves it, writing the
    number down; otherwise every other reader of the flag's history (another manager,
    an admin, the manager's own answer) gets the recipient's whole number, which rule 7
    shows auditors only."""
    manager = auth.headers("manager1")
    noted = ["calling 138 1234 5678", "called the recipient on +86 138 1234 5678: found"]
    client.post(f"{FLAGS}/{flags.here.id}/acknowledge", json={"note": noted[0]}, headers=manager)
    resolved = client.post(
        f"{FLAGS}/{flags.here.id}/resolve", json={"note": noted[1]}, headers=manager
    )

    def notes(username: str) -> list[str]:
        body = client.get(f"{FLAGS}/{flags.here.id}", headers=auth.headers(username)).get_json()
        return [c["note"] for c in body["changes"] if c["note"]]

    masked = ["calling ********678", "called the recipient on +**********678: found"]
    assert [c["note"] for c in resolved.get_json()["changes"] if c["note"]] == masked
    assert notes("auditor1") == noted
    assert notes("admin") == masked
    assert notes("manager1") == masked


@pytest.mark.parametrize("body", [None, {}, {"note": None}])
def test_acknowledging_needs_no_note(
    client: FlaskClient, auth: Auth, flags: Flags, body: Any
) -> None:
    response = client.post(
        f"{FLAGS}/{flags.here.id}/acknowledge", json=body, headers=auth.headers("manager1")
    )
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["changes"][-1]["note"] is None


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "validation_error"),
        ({"note": ""}, "validation_error"),
        ({"note": "  "}, "note_required"),
    ],
)
def test_resolving_needs_a_note(
    client: FlaskClient, auth: Auth, flags: Flags, body: dict[str, Any], code: str
) -> None:
    response = client.post(
        f"{FLAGS}/{flags.here.id}/resolve", json=body, headers=auth.headers("manager1")
    )
    assert response.status_code == 422
    assert response.get_json()["code"] == code
    assert "note" in str(response.get_json()["errors"])


def test_a_note_over_2000_characters_is_422(client: FlaskClient, auth: Auth, flags: Flags) -> None:
    response = client.post(
        f"{FLAGS}/{flags.here.id}/resolve",
        json={"note": "x" * 2001},
        headers=auth.headers("admin"),
    )
    assert response.status_code == 422
    assert "note" in response.get_json()["errors"]["json"]


@pytest.mark.parametrize(
    ("before", "action"),
    [
        ("acknowledge", "acknowledge"),
        ("resolve", "acknowledge"),
        ("resolve", "resolve"),
        ("close", "acknowledge"),
        ("close", "resolve"),
    ],
)
def test_a_decision_the_status_forbids_is_409(
    client: FlaskClient, auth: Auth, session: Session, flags: Flags, before: str, action: str
) -> None:
    manager = auth.headers("manager1")
    url = f"{FLAGS}/{flags.here.id}"
    if before == "close":
        close_flag(
            session=session,
            kind="unknown_parcel",
            subject=FlagSubject("parcel", "RR1"),
            reason="taken in",
        )
        session.commit()
    else:
        assert (
            client.post(f"{url}/{before}", json={"note": "x"}, headers=manager).status_code == 200
        )
    response = client.post(f"{url}/{action}", json={"note": "again"}, headers=manager)
    assert response.status_code == 409
    assert response.get_json()["code"] == "flag_status_conflict"


@pytest.mark.parametrize(
    ("action", "note"), [("acknowledge", None), ("acknowledge", "on it"), ("resolve", "found")]
)
def test_a_decision_sent_again_is_answered_as_the_first_time(
    client: FlaskClient, auth: Auth, session: Session, flags: Flags, action: str, note: str | None
) -> None:
    """The manager's answer was lost (a dropped connection at 19:00) and the same decision
    goes again, on the same evidence version: answered as the first time, nothing written
    twice. Another note, or another manager, is still refused."""
    manager = auth.headers("manager1")
    url = f"{FLAGS}/{flags.here.id}/{action}"
    read = client.get(f"{FLAGS}/{flags.here.id}", headers=manager).get_json()
    body = {"evidence_version": read["evidence_version"]}
    if note is not None:
        body["note"] = note
    first = client.post(url, json=body, headers=manager)
    again = client.post(url, json=body, headers=manager)
    assert first.status_code == 200, first.get_json()
    assert again.status_code == 200, again.get_json()
    assert again.get_json() == first.get_json()
    entries = session.scalars(select(AuditEntry)).all()
    assert [e.action for e in entries] == [f"flag_{action}d"]
    other = client.post(url, json={**body, "note": "another note"}, headers=manager)
    assert other.status_code == 409
    assert other.get_json()["code"] == "flag_status_conflict"


@pytest.mark.parametrize(("action", "body"), [("acknowledge", {}), ("resolve", {"note": "x"})])
def test_a_decision_on_evidence_that_changed_since_it_was_read_is_409(
    client: FlaskClient, auth: Auth, session: Session, flags: Flags, action: str, body: dict
) -> None:
    """A late batch names another event between the manager's read and their decision:
    deciding on what they read would cover it unseen. With the ``evidence_version``
    read, refused (as a sign-off with a changed ``balance_version``); read again, it
    covers what it now shows."""
    manager = auth.headers("manager1")
    url = f"{FLAGS}/{flags.here.id}"
    read = client.get(url, headers=manager).get_json()
    raise_flag(
        session=session,
        kind="unknown_parcel",
        severity=FlagSeverity.WARNING,
        subject=FlagSubject("parcel", "RR1"),
        station_id=flags.here.station_id,
        evidence={"event_ids": [3]},
    )
    session.commit()
    stale = body | {"evidence_version": read["evidence_version"]}
    refused = client.post(f"{url}/{action}", json=stale, headers=manager)
    assert refused.status_code == 409
    assert refused.get_json()["code"] == "evidence_changed"
    assert list(refused.get_json()["errors"]) == ["evidence_version"]
    again = client.get(url, headers=manager).get_json()
    assert (again["status"], again["decision"]) == ("open", None)
    assert again["evidence_version"] != read["evidence_version"]
    fresh = body | {"evidence_version": again["evidence_version"]}
    decided = client.post(f"{url}/{action}", json=fresh, headers=manager)
    assert decided.status_code == 200, decided.get_json()
    assert decided.get_json()["decided_on"] == {"event_ids": [1, 2, 3]}


def test_a_flag_of_no_station_is_for_admins(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    orphan = make_flag(session, None, "RR9")
    url = f"{FLAGS}/{orphan.id}/resolve"
    assert (
        client.post(url, json={"note": "x"}, headers=auth.headers("manager1")).status_code == 404
    )
    assert client.post(url, json={"note": "x"}, headers=auth.headers("admin")).status_code == 200


# -- who may do what --------------------------------------------------------------------------

ENDPOINTS = ("list", "get", "acknowledge", "resolve")
# Expected status per role and endpoint, for a flag of ST1 (the station of manager1). To a
# manager of another station it is a 404, as an unknown id is: a 403 would say it exists.
MATRIX: dict[str, tuple[int, int, int, int]] = {
    "admin": (200, 200, 200, 200),
    "manager_own_station": (200, 200, 200, 200),
    "manager_other_station": (200, 404, 404, 404),
    "courier": (403, 403, 403, 403),
    "auditor": (200, 200, 403, 403),
    "integration": (403, 403, 403, 403),
    "anonymous": (401, 401, 401, 401),
}
LOGINS: dict[str, tuple[str, str | None] | None] = {
    "admin": ("admin", None),
    "manager_own_station": ("manager1", None),
    "manager_other_station": ("manager2", None),
    "courier": ("courier1", "PDA-0001"),
    "auditor": ("auditor1", None),
    "integration": ("app1", None),
    "anonymous": None,
}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("role", MATRIX)
def test_authorization_matrix(
    client: FlaskClient, auth: Auth, flags: Flags, role: str, endpoint: str
) -> None:
    login = LOGINS[role]
    headers = auth.headers(*login) if login else {}
    url = f"{FLAGS}/{flags.here.id}"
    if endpoint == "list":
        response = client.get(FLAGS, headers=headers)
    elif endpoint == "get":
        response = client.get(url, headers=headers)
    else:
        response = client.post(f"{url}/{endpoint}", json={"note": "seen"}, headers=headers)
    expected = MATRIX[role][ENDPOINTS.index(endpoint)]
    assert response.status_code == expected, response.get_json()
    if expected == 403:
        assert response.get_json()["code"] in {"role_forbidden", "station_forbidden"}


def test_a_refused_decision_changes_nothing(
    client: FlaskClient, auth: Auth, session: Session, flags: Flags
) -> None:
    for username in ("auditor1", "manager2"):
        client.post(
            f"{FLAGS}/{flags.here.id}/resolve", json={"note": "x"}, headers=auth.headers(username)
        )
    session.expire_all()
    assert session.get(Flag, flags.here.id).status == "open"
    assert session.scalars(select(AuditEntry)).all() == []


def test_simultaneous_resolutions_resolve_once(committed_app: Flask) -> None:
    """Real commits from several threads: the flag's row lock lets one win, the others 409."""
    with committed_app.app_context():
        session: Session = db.session
        station = factories.station(session, code="RACE")
        factories.user(session, "racer", "station_manager", station)
        flag_id = make_flag(session, station.id, "RR7").id
    headers = Auth(committed_app.test_client()).headers("racer")

    responses = race(
        committed_app, f"{FLAGS}/{flag_id}/resolve", [{"note": f"n{i}"} for i in range(4)], headers
    )

    assert sorted(r.status_code for r in responses) == [200, 409, 409, 409]
    with committed_app.app_context():
        entries = db.session.scalars(select(AuditEntry)).all()
        assert [e.subject_key for e in entries] == [str(flag_id)]
        assert audit.verify(session=db.session).ok


@pytest.mark.postgres_only
def test_a_flag_a_push_commits_after_a_walks_first_page_is_not_silently_missed(
    committed_app: Flask,
) -> None:
    """Real transactions on PostgreSQL: a push stores a flag (its ``opened_at`` then)
    and commits after another push's flag, opened later, and after an auditor read the
    walk's first page, which went past the late flag's place before it could see it.
    The walk's next page, below the first, never lists it: it ended with
    ``next_cursor`` null, one flag missing. It is refused now (410 ``cursor_reset``),
    and the walk begun again lists every flag."""
    with committed_app.app_context():
        session: Session = db.session
        station = factories.station(session, code="LATE")
        factories.user(session, "walker", "auditor", None)
        oldest = make_flag(session, station.id, "RR10").id
        older = make_flag(session, station.id, "RR11").id
        with Session(db.engine) as push:  # a long push, still committing
            stored = raise_flag(
                session=push,
                kind="unknown_parcel",
                severity=FlagSeverity.WARNING,
                subject=FlagSubject("parcel", "RR12"),
                station_id=station.id,
                evidence={"event_ids": [1]},
            ).flag
            push.flush()
            late = stored.id
            newest = make_flag(session, station.id, "RR13").id  # another push's, committed
            client = committed_app.test_client()
            headers = Auth(client).headers("walker")
            first = client.get(FLAGS, query_string={"limit": 2}, headers=headers).get_json()
            assert [i["id"] for i in first["items"]] == [newest, older]
            push.commit()
        rest = client.get(
            FLAGS, query_string={"limit": 2, "cursor": first["next_cursor"]}, headers=headers
        )
        assert rest.status_code == 410, rest.get_json()
        assert rest.get_json()["code"] == "cursor_reset"
        assert listed(client, headers) == [newest, late, older, oldest]


@pytest.mark.postgres_only
def test_a_flag_a_push_opens_again_and_commits_after_a_walks_first_page_is_not_silently_missed(
    committed_app: Flask,
) -> None:
    """Real transactions on PostgreSQL: a push opens a resolved flag again (it rises to
    the top: its ``opened_at`` then) and commits after another push's flag, opened later,
    and after an auditor read the walk's first page. The walk's next page, below the
    first, no longer finds the flag at its old place, nor ever at its new one, and its
    raising is long past: it ended with ``next_cursor`` null, one flag missing. Its
    opening is counted: refused (410 ``cursor_reset``), and the walk begun again lists
    every flag."""
    with committed_app.app_context():
        session: Session = db.session
        station = factories.station(session, code="AGAIN")
        factories.user(session, "walker", "auditor", None)
        decided = make_flag(session, station.id, "RR20")
        decided.status = FlagStatus.RESOLVED
        session.commit()
        oldest = make_flag(session, station.id, "RR21").id
        older = make_flag(session, station.id, "RR22").id
        with Session(db.engine) as push:  # a long push, still committing
            flag = push.get(Flag, decided.id)
            assert flag is not None
            reopen_flag(session=push, flag=flag, note="raised again on evidence")
            push.flush()
            newest = make_flag(session, station.id, "RR23").id  # another push's, committed
            client = committed_app.test_client()
            headers = Auth(client).headers("walker")
            first = client.get(FLAGS, query_string={"limit": 2}, headers=headers).get_json()
            assert [i["id"] for i in first["items"]] == [newest, older]
            push.commit()
        rest = client.get(
            FLAGS, query_string={"limit": 2, "cursor": first["next_cursor"]}, headers=headers
        )
        assert rest.status_code == 410, rest.get_json()
        assert rest.get_json()["code"] == "cursor_reset"
        assert listed(client, headers) == [newest, decided.id, older, oldest]


# -- a PDA's flags and what a decision covered ----------------------------------------


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _jumped(auth: Auth, tracking_no: str, first_seq: int) -> dict[str, Any]:
    """PDA-0001 pushes a check-out and a return of the parcel stamped 40 days back, on a
    clock that jumped: the PDA's ``clock_jump`` flag names them. The push's receipt."""
    stamped = now() - dt.timedelta(days=40)
    return auth.push(
        [
            factories.event(first_seq, tracking_no, occurred_at=stamped),
            factories.event(
                first_seq + 1, tracking_no, "returned_to_station", occurred_at=stamped
            ),
        ]
    )


def _flag_of(client: FlaskClient, headers: dict[str, str], kind: str) -> dict[str, Any]:
    listed = client.get(FLAGS, query_string={"kind": kind}, headers=headers).get_json()
    (item,) = listed["items"]
    return item


def test_a_clock_jump_resolved_on_a_stale_read_is_refused(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """The manager opens the PDA's clock_jump flag: it names the two scans stamped 40
    days back. While they read, the PDA's next batch carries two more jumped scans,
    and the flag now names those instead. They press Resolve with the
    ``evidence_version`` they were shown: the resolution is recorded over events they
    never saw, which is what ``evidence_version`` exists to refuse (409
    ``evidence_changed``). The digest leaves out ``client_event_ids``, the only way a
    clock_jump names its events."""
    first, second = (factories.parcel(session, world.station) for _ in range(2))
    session.commit()
    _jumped(auth, first.tracking_no, first_seq=1)
    manager = auth.headers("manager1")
    read = _flag_of(client, manager, "clock_jump")
    _jumped(auth, second.tracking_no, first_seq=3)
    again = client.get(f"{FLAGS}/{read['id']}", headers=manager).get_json()
    assert again["evidence"]["client_event_ids"] != read["evidence"]["client_event_ids"]
    decided = client.post(
        f"{FLAGS}/{read['id']}/resolve",
        json={"note": "PDA clock fixed", "evidence_version": read["evidence_version"]},
        headers=manager,
    )
    assert decided.status_code == 409, decided.get_json()
    assert decided.get_json()["code"] == "evidence_changed"


def test_a_resolved_clock_jump_comes_back_when_the_pda_jumps_again(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """Monday the manager resolves PDA-0001's clock_jump ("clock reset, courier told").
    Later the PDA's clock jumps again: a new push carries other scans stamped 40 days
    back. The flag takes the new scans into its evidence and stays resolved: nothing
    in the queue, nothing in the push's ``flags_raised``, so the manager never hears
    of a second jump. A decision covers what it saw (module docstring of sync.flags),
    not events that came after it."""
    first, second = (factories.parcel(session, world.station) for _ in range(2))
    session.commit()
    _jumped(auth, first.tracking_no, first_seq=1)
    manager = auth.headers("manager1")
    read = _flag_of(client, manager, "clock_jump")
    resolved = client.post(
        f"{FLAGS}/{read['id']}/resolve",
        json={"note": "clock reset, courier told", "evidence_version": read["evidence_version"]},
        headers=manager,
    )
    assert resolved.status_code == 200, resolved.get_json()
    receipt = _jumped(auth, second.tracking_no, first_seq=3)
    after = client.get(f"{FLAGS}/{read['id']}", headers=manager).get_json()
    assert set(after["evidence"]["client_event_ids"]) != set(read["evidence"]["client_event_ids"])
    waiting = client.get(
        FLAGS, query_string={"kind": "clock_jump", "status": "open"}, headers=manager
    ).get_json()["items"]
    assert waiting or "clock_jump" in [f["kind"] for f in receipt["flags_raised"]], (
        after["status"],
        after["evidence"],
    )


def test_a_pdas_flag_opened_again_by_the_system_is_in_the_history_of_the_parcel_it_cites(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """An auditor settles a dispute about parcel second, scanned on a PDA whose clock
    had jumped. Its history (``GET /audit?tracking_no=``) listed the manager's
    resolution of the PDA's ``clock_jump`` on first's scans (a decision on a PDA's flag
    is filed under the parcels it cites) but not the system opening that flag again
    when second's scans jumped too (``flag_status_changed``, no actor): that entry named
    no parcel. It is filed under the parcels the flag cites then, as a decision is."""
    first, second = (factories.parcel(session, world.station) for _ in range(2))
    session.commit()
    _jumped(auth, first.tracking_no, first_seq=1)
    manager, auditor = auth.headers("manager1"), auth.headers("auditor1")
    read = _flag_of(client, manager, "clock_jump")
    resolved = client.post(
        f"{FLAGS}/{read['id']}/resolve",
        json={"note": "clock reset, courier told", "evidence_version": read["evidence_version"]},
        headers=manager,
    )
    assert resolved.status_code == 200, resolved.get_json()
    _jumped(auth, second.tracking_no, first_seq=3)
    assert client.get(f"{FLAGS}/{read['id']}", headers=manager).json["status"] == "open"

    def flag_entries(number: str) -> list[str]:
        listed = client.get(
            "/api/v1/audit", query_string={"tracking_no": number}, headers=auditor
        ).get_json()["items"]
        return [
            e["action"]
            for e in listed
            if (e["subject_type"], e["subject_key"]) == ("flag", str(read["id"]))
        ]

    assert flag_entries(second.tracking_no) == ["flag_status_changed"]
    assert flag_entries(first.tracking_no)[-1] == "flag_resolved"


def test_a_clock_jump_at_its_bound_refuses_a_decision_read_before_the_next_jump(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """The PDA's battery died at noon and it came back dated 2000-01-01: the courier's
    afternoon, 205 scans, is pushed at 18:00 on that clock and the PDA's clock_jump flag
    cites 200 of them in its list (MAX_EVIDENCE_IDS). The manager opens the flag.
    Meanwhile the PDA, its clock still wrong, pushes one more delivery stamped 2000. The
    flag's list had no room for it, so its evidence, and its ``evidence_version``, did
    not change: the manager's Resolve on their read was accepted, settling a delivery
    they were never shown, which the flag did not name and whose proof did not list
    it. The flag cites the latest jump past its bound (``past_bound``): the stale
    decision is refused, and the delivery and its proof lead to each other."""
    first, second = (factories.parcel(session, world.station).tracking_no for _ in range(2))
    session.commit()
    factory_date = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    afternoon = [
        factories.event(
            seq, first, "out_for_delivery", occurred_at=factory_date + dt.timedelta(minutes=seq)
        )
        for seq in range(1, 206)
    ]
    auth.push(afternoon)
    manager = auth.headers("manager1")
    read = client.get(f"{FLAGS}/{_flag_of(client, manager, 'clock_jump')['id']}", headers=manager)
    read = read.get_json()
    assert read["status"] == "open"

    late = factories.event(
        206,
        second,
        "delivered",
        occurred_at=factory_date + dt.timedelta(hours=5),
        pod={"recipient_name": "Wang", "signature_sha256": "c" * 64},
    )
    auth.push([late])

    decided = client.post(
        f"{FLAGS}/{read['id']}/resolve",
        json={"note": "clock reset, courier told", "evidence_version": read["evidence_version"]},
        headers=manager,
    )
    assert decided.status_code == 409, decided.get_json()
    assert decided.get_json()["code"] == "evidence_changed"
    again = client.get(f"{FLAGS}/{read['id']}", headers=manager).get_json()
    assert again["evidence"]["past_bound"]["client_event_ids"] == [late["client_event_id"]]
    delivery = session.scalar(select(ScanEvent.id).where(ScanEvent.seq == 206))
    proof = client.get(f"/api/v1/proofs/{delivery}", headers=manager).get_json()
    assert read["id"] in [f["id"] for f in proof["flags"]], proof["flags"]
    decided = client.post(
        f"{FLAGS}/{read['id']}/resolve",
        json={"note": "clock reset, courier told", "evidence_version": again["evidence_version"]},
        headers=manager,
    )
    assert late["client_event_id"] in decided.get_json()["decided_on"]["client_event_ids"]


def _unauthorized_drop(auth: Auth, session: Session, world: World) -> tuple[str, int]:
    """An express parcel left in a locker with no consent: its tracking number and the
    ``unauthorized_locker_drop`` flag's id."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    at = now() - dt.timedelta(minutes=20)
    receipt = auth.push(
        [
            factories.event(1, parcel.tracking_no, occurred_at=at - dt.timedelta(minutes=30)),
            factories.locker_drop(2, parcel.tracking_no, at),
        ]
    )
    (flag,) = [f for f in receipt["flags_raised"] if f["kind"] == "unauthorized_locker_drop"]
    return parcel.tracking_no, flag["flag_id"]


def test_a_flag_resolution_in_the_audit_log_names_the_evidence_it_was_decided_on(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """Months later the auditor asks "on what evidence did the manager close this
    unauthorized drop?". The resolution's only tamper-evident record, its
    `flag_resolved` audit entry, holds the kind, the subject and the note, not the
    events the decision covered. Those live only in the flag's mutable `decided_on`,
    which also decides whether a later drop of the parcel stays covered by the old
    resolution (`sync.flags.judged_status`): widened after the fact in the database,
    it silently covers drops nobody looked at, and the audit log cannot show the
    difference."""
    _, flag_id = _unauthorized_drop(auth, session, world)
    manager = auth.headers("manager1")
    flag = client.get(f"/api/v1/flags/{flag_id}", headers=manager).get_json()
    resolved = client.post(
        f"/api/v1/flags/{flag_id}/resolve",
        json={"note": "called the recipient, parcel collected",
              "evidence_version": flag["evidence_version"]},
        headers=manager,
    )  # fmt: skip
    assert resolved.status_code == 200, resolved.get_json()
    decided_on = resolved.get_json()["decided_on"]
    assert decided_on["event_ids"] == flag["evidence"]["event_ids"]
    (entry,) = session.scalars(
        select(AuditEntry).where(
            AuditEntry.action == "flag_resolved", AuditEntry.subject_key == str(flag_id)
        )
    )
    logged = entry.details
    assert (
        logged.get("decided_on", {}).get("event_ids") == decided_on["event_ids"]
        or logged.get("event_ids") == decided_on["event_ids"]
        or logged.get("evidence_version") == flag["evidence_version"]
    ), logged


def test_the_spec_names_every_subject_a_flag_is_raised_about(client: FlaskClient) -> None:
    """The spec said a flag's subject is a parcel, a device or an event, its key a
    tracking number, a device id or an event id: a manager filtering the queue met
    `shift` flags keyed `12:RR473124829GB` (a parcel's handover in shift 12) and
    `subscription` ones it never named. Every subject ``sync`` raises a flag about is
    named, with what its key is."""
    sources = "".join(path.read_text() for path in Path(sync.__file__).parent.glob("*.py"))
    raised = set(re.findall(r'(?:FlagSubject|cls)\("(\w+)"', sources))
    assert {"parcel", "shift", "device", "event", "subscription"} <= raised
    schema = client.get("/openapi.json").get_json()["components"]["schemas"]["FlagOut"]
    types = {t.strip() for t in schema["properties"]["subject_type"]["description"].split(",")}
    assert raised <= types
    keys = schema["properties"]["subject_key"]["description"]
    assert all(f"{kind}, " in keys for kind in raised)
    assert "`<shift id>:<tracking no>`" in keys
