"""The manager at 19:00 with many shifts to sign off, over HTTP and on the board page:
signing off the clean handovers together (``sync.signoffs``), and the shifts of earlier
days that still wait (``sync.balances.waiting_from_earlier_days``)."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from html import unescape
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models import AuditEntry, Flag, FlagStatus, ServiceClass, Shift
from sync import flags
from sync.sweeps import SweepSettings, blob_missing_at_handover
from tests import factories
from tests.browser.station_day import doorstep_png
from tests.conftest import Auth, World
from tests.courier_api.test_shifts_api import Courier, balance, now, parcels, sign_off
from tests.courier_api.test_web_pages import signed_in


def board(client: FlaskClient, world: World, headers: dict[str, str]) -> dict[int, Any]:
    response = client.get(f"/api/v1/stations/{world.station.id}/handover", headers=headers)
    assert response.status_code == 200, response.get_json()
    return {row["shift_id"]: row for row in response.get_json()["shifts"]}


def sign_off_clean(
    client: FlaskClient,
    station_id: int,
    headers: dict[str, str],
    seen: dict[int, str],
    note: str = "all accounted for",
) -> Any:
    shifts = [{"shift_id": i, "balance_version": v} for i, v in seen.items()]
    return client.post(
        f"/api/v1/stations/{station_id}/signoffs",
        json={"note": note, "shifts": shifts},
        headers=headers,
    )


@pytest.fixture
def couriers(client: FlaskClient, session: Session, auth: Auth, world: World) -> list[Courier]:
    """Five couriers of ST1, each on a PDA of their own."""
    pdas = [Courier(client, auth, "courier1", "PDA-0001")]
    for n in range(2, 6):
        factories.user(session, f"courier{n}", "courier", world.station)
        factories.device(session, f"PDA-10{n:02d}", world.station)
    session.commit()
    pdas += [Courier(client, auth, f"courier{n}", f"PDA-10{n:02d}") for n in range(2, 6)]
    return pdas


def test_the_clean_handovers_are_signed_off_together_and_the_others_refused_with_why(
    client: FlaskClient,
    session: Session,
    auth: Auth,
    world: World,
    couriers: list[Courier],
) -> None:
    """Five shifts on the board: one clean, one unbalanced, one balanced with its proof
    images never uploaded (a flag of its own), one still on the road, and one a late
    batch changed after the board was read. Only the clean one is signed off; each
    other is refused with its reason and left as it was, for a sign-off of its own."""
    clean, unbalanced, flagged, on_road, changed = couriers
    manager = auth.headers("manager1")
    a, b, c, d, e, f, g = parcels(session, world, 7)
    shift = {}
    for pda in couriers:
        shift[pda] = pda.open(first_seq=1)["id"]
    clean.push([clean.event(a), clean.event(a, "returned_to_station")])
    unbalanced.push(
        [
            unbalanced.event(b),
            unbalanced.event(c),
            unbalanced.event(b, "delivered", pod={"recipient_name": "Li", "relation": "self"}),
        ]
    )
    flagged.push([flagged.event(d), flagged.event(d, "delivered")])
    on_road.push([on_road.event(e)])
    changed.push([changed.event(f), changed.event(f, "returned_to_station")])
    for pda in (clean, unbalanced, flagged, changed):
        assert pda.close(shift[pda]).status_code == 200
    blob_missing_at_handover(
        session=session, now=now() + dt.timedelta(hours=2), settings=SweepSettings()
    )
    session.commit()

    rows = board(client, world, manager)
    assert rows[shift[clean]]["balance"]["status"] == "balanced"
    assert rows[shift[flagged]]["open_flag_count"] == 1
    seen = {shift_id: row["balance_version"] for shift_id, row in rows.items()}
    # After the read, the PDA whose shift was closed without a last seq sends one more.
    changed.push([changed.event(g), changed.event(g, "returned_to_station")])

    response = sign_off_clean(client, world.station.id, manager, seen)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    outcomes = {o["shift_id"]: (o["outcome"], o["code"]) for o in body["outcomes"]}
    assert outcomes == {
        shift[clean]: ("signed_off", None),
        shift[unbalanced]: ("refused", "balance_unbalanced"),
        shift[flagged]: ("refused", "open_flags"),
        shift[on_road]: ("refused", "shift_open"),
        shift[changed]: ("refused", "balance_changed"),
    }
    assert [o["shift_id"] for o in body["outcomes"]] == sorted(seen)
    assert (body["signed_off"], body["refused"]) == (1, 4)
    flagged_message = outcomes_message(body, shift[flagged])
    assert "blob_missing_at_handover" in flagged_message
    # Each refusal says what the manager goes to find: the parcels at fault (it said
    # "the balance is unbalanced" only), what the balance says now (it said "0
    # discrepancies now", of a balance that had none before either).
    assert outcomes_message(body, shift[unbalanced]) == (
        f"shift {shift[unbalanced]}: the balance is unbalanced: 1 delivered_without_pod "
        f"({b}), 1 missing_at_handover ({c}); sign it off on its own, with a note on it"
    )
    assert outcomes_message(body, shift[changed]) == (
        f"shift {shift[changed]}: its balance changed since it was read (now balanced, "
        "2 checked out, 2 returned): read it again"
    )

    session.expire_all()
    stored = {s.id: s for s in session.scalars(select(Shift))}
    assert stored[shift[clean]].status.value == "signed_off"
    assert stored[shift[clean]].signoff_note == "all accounted for"
    assert stored[shift[clean]].signoff_balance["status"] == "balanced"
    for pda in (unbalanced, flagged, changed):
        assert stored[shift[pda]].status.value == "closed"
        assert stored[shift[pda]].signed_off_at is None
    assert stored[shift[on_road]].status.value == "open"
    entries = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "shift_signed_off")
    ).all()
    assert [(e.subject_key, e.details["note"]) for e in entries] == [
        (str(shift[clean]), "all accounted for")
    ]
    # The board row now says signed off, and the changed one signs off with what it shows.
    rows = board(client, world, manager)
    assert rows[shift[clean]]["shift_status"] == "signed_off"
    again = sign_off_clean(
        client,
        world.station.id,
        manager,
        {
            shift[clean]: rows[shift[clean]]["balance_version"],
            shift[changed]: rows[shift[changed]]["balance_version"],
        },
        note="checked again",
    )
    assert again.status_code == 200, again.get_json()
    assert {o["shift_id"]: o["code"] for o in again.get_json()["outcomes"]} == {
        shift[clean]: "already_signed_off",
        shift[changed]: None,
    }


def test_a_sign_off_together_sent_again_is_answered_as_the_first_time(
    client: FlaskClient, session: Session, auth: Auth, world: World, couriers: list[Courier]
) -> None:
    """The answer to the evening's sign-off was lost (the station's connection dropped)
    and the manager sent it again: every shift signed off came back "refused:
    already_signed_off", as if none had been. The same request (same manager, note and
    versions) is now answered as the first time and writes nothing; another manager's,
    or another note, is still refused."""
    clean, other = couriers[:2]
    manager = auth.headers("manager1")
    a, b = parcels(session, world, 2)
    shift = {}
    for pda, parcel in ((clean, a), (other, b)):
        shift[pda] = pda.open(first_seq=1)["id"]
        pda.push([pda.event(parcel), pda.event(parcel, "returned_to_station")])
        assert pda.close(shift[pda]).status_code == 200
    rows = board(client, world, manager)
    seen = {shift_id: row["balance_version"] for shift_id, row in rows.items()}
    first = sign_off_clean(client, world.station.id, manager, seen)
    assert first.status_code == 200, first.get_json()
    assert first.get_json()["signed_off"] == 2
    again = sign_off_clean(client, world.station.id, manager, seen)
    assert again.status_code == 200, again.get_json()
    assert again.get_json() == first.get_json()
    signoffs = select(AuditEntry).where(AuditEntry.action == "shift_signed_off")
    assert len(session.scalars(signoffs).all()) == 2

    factories.user(session, "manager3", "station_manager", world.station)
    session.commit()
    for headers, note in ((auth.headers("manager3"), "all accounted for"), (manager, "ok")):
        refused = sign_off_clean(client, world.station.id, headers, seen, note=note)
        assert refused.get_json()["signed_off"] == 0
        assert {o["code"] for o in refused.get_json()["outcomes"]} == {"already_signed_off"}
    assert len(session.scalars(signoffs).all()) == 2


def test_a_sign_off_together_refused_as_signed_off_says_by_whom_and_when(
    client: FlaskClient, session: Session, auth: Auth, world: World, couriers: list[Courier]
) -> None:
    """The manager's sign-off together went through, its answer lost; they sent it again
    with the note edited, and read "already signed off, by another sign-off than this
    one", as if a colleague had: it was theirs. The refusal says by whom ("you", or a
    user by id) and when, as a single sign-off's does."""
    pda = couriers[0]
    manager = auth.headers("manager1")
    [a] = parcels(session, world, 1)
    shift_id = pda.open(first_seq=1)["id"]
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    assert pda.close(shift_id).status_code == 200
    seen = {shift_id: board(client, world, manager)[shift_id]["balance_version"]}
    assert sign_off_clean(client, world.station.id, manager, seen).get_json()["signed_off"] == 1
    again = sign_off_clean(client, world.station.id, manager, seen, note="edited")
    [outcome] = again.get_json()["outcomes"]
    assert outcome["code"] == "already_signed_off"
    assert f"shift {shift_id} is already signed off, by you at " in outcome["message"]
    factories.user(session, "manager3", "station_manager", world.station)
    session.commit()
    other = sign_off_clean(client, world.station.id, auth.headers("manager3"), seen)
    [outcome] = other.get_json()["outcomes"]
    assert f"by user #{world.manager.id} at " in outcome["message"]


def outcomes_message(body: dict[str, Any], shift_id: int) -> str:
    [message] = [o["message"] for o in body["outcomes"] if o["shift_id"] == shift_id]
    return message


def test_a_provisional_handover_is_left_for_a_sign_off_with_its_reason(
    client: FlaskClient, session: Session, auth: Auth, world: World, couriers: list[Courier]
) -> None:
    """Seq 2 is still on the PDA: the balance is provisional, and only a sign-off of its
    own, forced with a reason, may close it before the PDA sends it."""
    pda = couriers[0]
    manager = auth.headers("manager1")
    [a] = parcels(session, world, 1)
    shift_id = pda.open(first_seq=1)["id"]
    first = pda.event(a)
    pda.event(a, "delivered")  # seq 2, never pushed
    last = pda.event(a, "returned_to_station")
    pda.push([first, last])
    pda.close(shift_id, last_seq=pda.seq)
    row = board(client, world, manager)[shift_id]
    assert row["balance"]["status"] == "provisional"
    response = sign_off_clean(
        client, world.station.id, manager, {shift_id: row["balance_version"]}
    )
    [outcome] = response.get_json()["outcomes"]
    assert (outcome["outcome"], outcome["code"]) == ("refused", "balance_provisional")
    assert outcome["message"] == (
        f"shift {shift_id}: the balance is provisional: the PDA has not sent seq 2: wait "
        "for them, write off those its PDA lost, or sign it off on its own with a reason "
        "it cannot wait"
    )
    assert session.get(Shift, shift_id).status.value == "closed"


def test_another_stations_shift_is_not_found_and_another_stations_manager_is_forbidden(
    client: FlaskClient, session: Session, auth: Auth, world: World, couriers: list[Courier]
) -> None:
    pda = couriers[0]
    [a] = parcels(session, world, 1)
    shift_id = pda.open(first_seq=1)["id"]
    pda.push([pda.event(a), pda.event(a, "returned_to_station")])
    pda.close(shift_id, last_seq=pda.seq)
    version = board(client, world, auth.headers("manager1"))[shift_id]["balance_version"]

    # Named under the other station's URL by its own manager: not theirs, not signed.
    response = sign_off_clean(
        client, world.other_station.id, auth.headers("manager2"), {shift_id: version}
    )
    assert response.status_code == 200, response.get_json()
    [outcome] = response.get_json()["outcomes"]
    assert (outcome["outcome"], outcome["code"]) == ("refused", "shift_not_found")
    assert str(shift_id) in outcome["message"] and "ST1" not in outcome["message"]
    # ST1's URL is not theirs at all.
    forbidden = sign_off_clean(
        client, world.station.id, auth.headers("manager2"), {shift_id: version}
    )
    assert forbidden.status_code == 403
    assert forbidden.get_json()["code"] == "station_forbidden"
    # Couriers and auditors do not sign off; an admin may.
    for role_headers in (pda.headers, auth.headers("auditor1")):
        assert (
            sign_off_clean(client, world.station.id, role_headers, {shift_id: version}).status_code
            == 403
        )
    assert session.get(Shift, shift_id).status.value == "closed"
    admin = sign_off_clean(client, world.station.id, auth.headers("admin"), {shift_id: version})
    assert admin.get_json()["signed_off"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"shifts": [{"shift_id": 1, "balance_version": "x"}]}, "note"),
        ({"note": "  ", "shifts": [{"shift_id": 1, "balance_version": "x"}]}, "note"),
        ({"note": "ok", "shifts": []}, "shifts"),
        ({"note": "ok", "shifts": [{"shift_id": 1}]}, "shifts"),
        (
            {
                "note": "ok",
                "shifts": [
                    {"shift_id": 1, "balance_version": "x"},
                    {"shift_id": 1, "balance_version": "y"},
                ],
            },
            "shifts",
        ),
        (
            {
                "note": "ok",
                "shifts": [{"shift_id": n, "balance_version": "x"} for n in range(1, 202)],
            },
            "shifts",
        ),
    ],
    ids=["no note", "blank note", "no shift", "no version", "a shift twice", "201 shifts"],
)
def test_a_bad_request_is_422_naming_the_field_and_signs_nothing_off(
    client: FlaskClient, auth: Auth, world: World, body: dict[str, Any], field: str
) -> None:
    response = client.post(
        f"/api/v1/stations/{world.station.id}/signoffs",
        json=body,
        headers=auth.headers("manager1"),
    )
    assert response.status_code == 422, response.get_json()
    assert field in str(response.get_json()), response.get_json()


def test_an_unknown_station_is_404(client: FlaskClient, auth: Auth, world: World) -> None:
    response = sign_off_clean(client, 999_999, auth.headers("admin"), {1: "x"})
    assert response.status_code == 404


def test_the_board_page_signs_off_the_checked_clean_shifts(
    app: Flask,
    client: FlaskClient,
    session: Session,
    auth: Auth,
    world: World,
    couriers: list[Courier],
) -> None:
    """The board offers a box only on a clean handover; the manager checks them, writes
    one note and signs them off; the page says how many, and why any was refused."""
    clean, unbalanced = couriers[:2]
    a, b = parcels(session, world, 2)
    ids = {}
    for pda, parcel in ((clean, a), (unbalanced, b)):
        ids[pda] = pda.open(first_seq=1)["id"]
        pda.push(
            [pda.event(parcel)]
            + ([pda.event(parcel, "returned_to_station")] if pda is clean else [])
        )
        pda.close(ids[pda], last_seq=pda.seq)
    page = signed_in(app, "manager1")
    html = page.get(f"/web/board?station={world.station.id}")
    boxes = dict(re.findall(r'<input type="checkbox" name="shift" value="(\d+):(\w+)"', html))
    assert list(boxes) == [str(ids[clean])], html
    done = page.client.post(
        f"/web/stations/{world.station.id}/signoffs",
        data={
            "csrf_token": page.token(),
            "note": "all on the shelf",
            "shift": [f"{ids[clean]}:{boxes[str(ids[clean])]}", f"{ids[unbalanced]}:stale"],
            "date": "",
        },
        follow_redirects=True,
    ).get_data(as_text=True)
    assert "1 shift signed off" in done, done
    assert f"shift {ids[unbalanced]}: the balance is unbalanced" in done, done
    session.expire_all()
    assert session.get(Shift, ids[clean]).signoff_note == "all on the shelf"
    assert session.get(Shift, ids[unbalanced]).status.value == "closed"


def test_the_board_page_counts_only_the_shifts_it_signed_off_now(
    app: Flask, session: Session, world: World, couriers: list[Courier]
) -> None:
    """19:00: the manager signs off two clean handovers from the board; the answer is slow
    and they press the button again with a third row checked. The page said "3 shifts
    signed off": the two of the first press, answered again as signed off (as the API
    answers a request sent again), were counted with the one signed off now. It counts
    the one, and says the two were signed off already, by them with this note."""
    ids = []
    for pda, parcel in zip(couriers[:3], parcels(session, world, 3), strict=True):
        shift_id = pda.open(first_seq=1)["id"]
        pda.push([pda.event(parcel), pda.event(parcel, "returned_to_station")])
        pda.close(shift_id, last_seq=pda.seq)
        ids.append(shift_id)
    page = signed_in(app, "manager1")
    html = page.get(f"/web/board?station={world.station.id}")
    boxes = re.findall(r'<input type="checkbox" name="shift" value="(\d+:\w+)"', html)
    assert len(boxes) == 3, html

    def press(checked: list[str]) -> str:
        return page.client.post(
            f"/web/stations/{world.station.id}/signoffs",
            data={
                "csrf_token": page.token(),
                "note": "on the shelf",
                "shift": checked,
                "date": "",
            },
            follow_redirects=True,
        ).get_data(as_text=True)

    assert "2 shifts signed off." in press(boxes[:2])
    shown = press(boxes)
    assert "1 shift signed off." in shown, shown
    assert "3 shifts signed off" not in shown, shown
    assert (
        "2 shifts were already signed off, by you with this note: nothing changed for them."
    ) in shown, shown
    session.expire_all()
    assert {session.get_one(Shift, i).status.value for i in ids} == {"signed_off"}


def test_the_board_refusing_the_whole_sign_off_keeps_the_note_and_the_checked_boxes(
    app: Flask, session: Session, auth: Auth, world: World, couriers: list[Courier]
) -> None:
    """19:00, the manager writes the note and presses the button with no box checked
    ("Nothing signed off: ..."): the board comes back with the note as typed. Checked
    boxes and a note of spaces: the boxes come back checked, but one whose row's balance
    has changed since (its box named another version): that row is read anew."""
    ids = []
    for pda, parcel in zip(couriers[:2], parcels(session, world, 2), strict=True):
        ids.append(pda.open(first_seq=1)["id"])
        pda.push([pda.event(parcel), pda.event(parcel, "returned_to_station")])
        pda.close(ids[-1], last_seq=pda.seq)
    page = signed_in(app, "manager1")
    html = page.get(f"/web/board?station={world.station.id}")
    boxes = re.findall(r'<input type="checkbox" name="shift" value="(\d+:\w+)"', html)
    assert [box.partition(":")[0] for box in boxes] == [str(i) for i in ids], html
    action = f"/web/stations/{world.station.id}/signoffs"
    note = "All on the shelf, counted with Li Wei at the counter"

    def sign_off(note: str, shift: list[str]) -> Any:
        return page.client.post(
            action, data={"csrf_token": page.token(), "note": note, "shift": shift, "date": ""}
        )

    nothing = sign_off(note, [])
    assert nothing.status_code == 200
    refused = nothing.get_data(as_text=True)
    assert "Nothing signed off: name at least one shift to sign off" in refused
    assert f'placeholder="all parcels accounted for" value="{note}"' in refused
    assert " checked>" not in refused

    stale = f"{ids[1]}:{'0' * 16}"
    blank = sign_off("   ", [boxes[0], stale])
    assert blank.status_code == 200
    refused = blank.get_data(as_text=True)
    assert "Nothing signed off: note" in refused, refused
    assert f'value="{boxes[0]}" aria-label="Sign off shift {ids[0]}" checked>' in refused
    assert f'value="{boxes[1]}" aria-label="Sign off shift {ids[1]}">' in refused
    session.expire_all()
    assert [session.get_one(Shift, i).status.value for i in ids] == ["closed", "closed"]


def test_the_board_keeps_the_note_when_a_checked_shift_is_refused(
    app: Flask, session: Session, auth: Auth, world: World, couriers: list[Courier]
) -> None:
    """19:00, the manager checks two rows and writes a long note; one row's balance
    changed since the page was read. The other is signed off; the board comes back at
    once saying why the first was not, with the note as typed, to sign it off again
    once read anew, rather than an empty form to type it all again."""
    ids = []
    for pda, parcel in zip(couriers[:2], parcels(session, world, 2), strict=True):
        ids.append(pda.open(first_seq=1)["id"])
        pda.push([pda.event(parcel), pda.event(parcel, "returned_to_station")])
        pda.close(ids[-1], last_seq=pda.seq)
    page = signed_in(app, "manager1")
    html = page.get(f"/web/board?station={world.station.id}")
    boxes = re.findall(r'<input type="checkbox" name="shift" value="(\d+:\w+)"', html)
    note = "All on the shelf, counted with Li Wei at the counter"
    changed = f"{ids[1]}:{'0' * 16}"  # its row as read before a push changed it

    response = page.client.post(
        f"/web/stations/{world.station.id}/signoffs",
        data={"csrf_token": page.token(), "note": note, "shift": [boxes[0], changed], "date": ""},
    )

    assert response.status_code == 200, "the note typed is lost in a redirect"
    shown = response.get_data(as_text=True)
    assert "1 shift signed off" in shown
    assert f"shift {ids[1]}: its balance changed since it was read" in shown
    assert f'placeholder="all parcels accounted for" value="{note}"' in shown
    assert f'aria-label="Sign off shift {ids[1]}">' in shown  # read anew, to check again
    assert f'aria-label="Sign off shift {ids[0]}"' not in shown  # signed off
    session.expire_all()
    assert [session.get_one(Shift, i).status.value for i in ids] == ["signed_off", "closed"]


def test_a_shift_whose_signature_is_not_uploaded_yet_is_no_clean_handover_until_it_is(
    client: FlaskClient, session: Session, auth: Auth, world: World, couriers: list[Courier]
) -> None:
    """19:00, the courier has just handed over: the balance closes, but the PDA has not
    uploaded the signature its delivery names, and the sweep flags that only after its
    grace. The board says so at once, offers no box, and a sign-off together refuses
    it; once the image is uploaded the same shift signs off with the others."""
    pda = couriers[0]
    manager = auth.headers("manager1")
    [a] = parcels(session, world, 1)
    signature = doorstep_png(77)
    shift_id = pda.open(first_seq=1)["id"]
    pod = {"recipient_name": "Wang", "signature_sha256": hashlib.sha256(signature).hexdigest()}
    pda.push([pda.event(a), pda.event(a, "delivered", pod=pod)])
    pda.close(shift_id, last_seq=pda.seq)

    row = board(client, world, manager)[shift_id]
    assert (row["balance"]["status"], row["open_flag_count"]) == ("balanced", 0)
    assert row["images_missing"] == 1
    html = signed_in(client.application, "manager1").get(f"/web/board?station={world.station.id}")
    assert "1 proof image not uploaded" in html
    assert 'name="shift"' not in html
    refused = sign_off_clean(client, world.station.id, manager, {shift_id: row["balance_version"]})
    [outcome] = refused.get_json()["outcomes"]
    assert (outcome["outcome"], outcome["code"]) == ("refused", "images_missing")

    uploaded = client.put(
        f"/api/v1/blobs/{pod['signature_sha256']}",
        data=signature,
        content_type="application/octet-stream",
        headers=pda.headers,
    )
    assert uploaded.status_code == 201, uploaded.get_json()
    row = board(client, world, manager)[shift_id]
    assert row["images_missing"] == 0
    done = sign_off_clean(client, world.station.id, manager, {shift_id: row["balance_version"]})
    assert done.get_json()["signed_off"] == 1, done.get_json()


def test_a_shift_whose_pda_had_events_rejected_is_no_clean_handover(
    client: FlaskClient, session: Session, auth: Auth, world: World, couriers: list[Courier]
) -> None:
    """The PDA voids the shift's only delivery ("mis-tap: the recipient was out") with a
    correction that leaves out its reason: the server rejects it, and the stored events
    still show the delivery, balanced. The rejected seq counts as arrived. The board
    counts the rejected event on the row and offers no box, and a sign-off together
    refuses the shift, which is signed off on its own, where its page lists it."""
    pda = couriers[0]
    manager = auth.headers("manager1")
    a = factories.parcel(session, world.station, service_class=ServiceClass.ORDINARY).tracking_no
    session.commit()
    signature = doorstep_png(5)
    digest = hashlib.sha256(signature).hexdigest()
    uploaded = client.put(
        f"/api/v1/blobs/{digest}",
        data=signature,
        content_type="application/octet-stream",
        headers=pda.headers,
    )
    assert uploaded.status_code == 201, uploaded.get_json()
    shift_id = pda.open(first_seq=1)["id"]
    checked_out = pda.event(a)
    pod = {"recipient_name": "Li", "relation": "self", "signature_sha256": digest}
    delivered = pda.event(a, "delivered", pod=pod)
    voided = pda.event(a, "correction", voids_client_event_id=delivered["client_event_id"])
    receipt = pda.push([checked_out, delivered, voided])
    assert [r["status"] for r in receipt["results"]] == ["applied", "applied", "rejected"]
    assert pda.close(shift_id, last_seq=pda.seq).status_code == 200

    row = board(client, world, manager)[shift_id]
    assert (row["balance"]["status"], row["open_flag_count"], row["images_missing"]) == (
        "balanced",
        0,
        0,
    )
    assert row["rejected_events"] == 1
    html = signed_in(client.application, "manager1").get(f"/web/board?station={world.station.id}")
    assert "1 event of its PDA rejected" in html
    assert 'name="shift"' not in html, "the board offers it as a clean handover"
    refused = sign_off_clean(client, world.station.id, manager, {shift_id: row["balance_version"]})
    assert refused.status_code == 200, refused.get_json()
    [outcome] = refused.get_json()["outcomes"]
    assert (outcome["outcome"], outcome["code"]) == ("refused", "rejected_events")
    assert outcome["message"] == (
        f"shift {shift_id}: 1 event of its PDA was rejected: see its page, "
        "or sign it off on its own"
    )
    session.expire_all()
    assert session.get_one(Shift, shift_id).status.value == "closed"

    alone = sign_off(client, shift_id, manager, balance_version=row["balance_version"])
    assert alone.status_code == 200, alone.get_json()
    assert board(client, world, manager)[shift_id]["rejected_events"] == 1


def test_a_handover_whose_courier_corrected_a_drop_into_a_return_is_no_clean_handover(
    client: FlaskClient, session: Session, auth: Auth, world: World, couriers: list[Courier]
) -> None:
    """The courier recorded b left at a pickup point, then voided that ("mis-tap") and
    recorded it returned: the balance counts b returned and closes. Whether b is on the
    counter or in the pickup point is what the manager checks: the correction waits for
    their look (``correction_review``). The board names it on the row and offers no box,
    the shift's page shows it, and a sign-off together refuses the shift until the
    manager has acknowledged it; then it is signed off with the others."""
    pda = couriers[0]
    manager = auth.headers("manager1")
    a, b = (
        factories.parcel(session, world.station, service_class=ServiceClass.ORDINARY).tracking_no
        for _ in range(2)
    )
    session.commit()
    shift_id = pda.open(first_seq=1)["id"]
    dropped = pda.event(b, "delivered_to_pickup_point", point_id="PP-1", pod={"pickup_code": "12"})
    pda.push([pda.event(a), pda.event(b), pda.event(a, "returned_to_station"), dropped])
    voided = pda.event(
        b, "correction", voids_client_event_id=dropped["client_event_id"], reason="mis-tap"
    )
    pda.push([voided, pda.event(b, "returned_to_station")])
    assert pda.close(shift_id, last_seq=pda.seq).status_code == 200

    row = board(client, world, manager)[shift_id]
    assert (row["balance"]["status"], row["balance"]["returned"], row["open_flag_count"]) == (
        "balanced",
        2,
        0,
    )
    refused = sign_off_clean(client, world.station.id, manager, {shift_id: row["balance_version"]})
    [outcome] = refused.get_json()["outcomes"]
    assert (outcome["outcome"], outcome["code"]) == ("refused", "corrections_to_review"), (
        "signed off with a correction no manager looked at"
    )
    assert "correction_review" in outcome["message"]
    session.expire_all()
    assert session.get_one(Shift, shift_id).status.value == "closed"
    [review] = row["corrections_to_review"]
    assert (review["kind"], review["status"]) == ("correction_review", "open")
    page = signed_in(client.application, "manager1")
    html = page.get(f"/web/board?station={world.station.id}")
    assert "1 corrected outcome to review" in html
    assert 'name="shift"' not in html, "the board offers it as a clean handover"
    shift_html = page.get(f"/web/shifts/{shift_id}")
    assert f'id="flag-{review["flag_id"]}"' in shift_html, "its page does not show the correction"

    seen = client.post(
        f"/api/v1/flags/{review['flag_id']}/acknowledge",
        json={"note": "b is on the counter"},
        headers=manager,
    )
    assert seen.status_code == 200, seen.get_json()
    row = board(client, world, manager)[shift_id]
    assert row["corrections_to_review"] == []
    done = sign_off_clean(client, world.station.id, manager, {shift_id: row["balance_version"]})
    assert done.get_json()["signed_off"] == 1, done.get_json()


def test_the_board_lists_the_shifts_of_earlier_days_that_still_wait(
    app: Flask,
    client: FlaskClient,
    session: Session,
    auth: Auth,
    world: World,
    couriers: list[Courier],
) -> None:
    """Yesterday's shift whose PDA died is still open, and one of three days ago was
    reopened by late events this afternoon: neither is on today's board, which lists
    the shifts opened today. Both are listed apart, with links; a signed-off shift of
    two days ago, one beyond the two weeks looked back, and today's are not."""
    dead, reopened, signed, ancient, today = couriers
    ids = {pda: pda.open(first_seq=1)["id"] for pda in couriers}
    for pda in (reopened, signed):
        pda.close(ids[pda], last_seq=0)
    board_day = session.get(Shift, ids[today]).work_date
    moves = {
        dead: (1, "open", 0),
        reopened: (3, "closed", 1),
        signed: (2, "signed_off", 0),
        ancient: (20, "open", 0),
    }
    for pda, (days_ago, status, reopened_count) in moves.items():
        session.execute(
            update(Shift)
            .where(Shift.id == ids[pda])
            .values(
                work_date=board_day - dt.timedelta(days=days_ago),
                status=status,
                reopened_count=reopened_count,
            )
        )
    session.commit()

    response = client.get(
        f"/api/v1/stations/{world.station.id}/handover", headers=auth.headers("manager1")
    )
    body = response.get_json()
    assert [row["shift_id"] for row in body["shifts"]] == [ids[today]]
    assert body["totals"]["shifts"] == 1
    assert [
        (
            e["shift_id"],
            e["date"],
            e["shift_status"],
            e["reopened_count"],
            e["courier"]["username"],
        )
        for e in body["earlier_waiting"]
    ] == [
        (ids[reopened], str(board_day - dt.timedelta(days=3)), "closed", 1, "courier2"),
        (ids[dead], str(board_day - dt.timedelta(days=1)), "open", 0, "courier1"),
    ]
    # The other station's board does not list them; the day before shows yesterday's
    # shift as its own, and the one of three days ago as earlier.
    other = client.get(
        f"/api/v1/stations/{world.other_station.id}/handover", headers=auth.headers("admin")
    )
    assert other.get_json()["earlier_waiting"] == []
    yesterday = client.get(
        f"/api/v1/stations/{world.station.id}/handover?date={board_day - dt.timedelta(days=1)}",
        headers=auth.headers("manager1"),
    ).get_json()
    assert [row["shift_id"] for row in yesterday["shifts"]] == [ids[dead]]
    assert [e["shift_id"] for e in yesterday["earlier_waiting"]] == [ids[reopened]]

    html = signed_in(app, "manager1").get(f"/web/board?station={world.station.id}")
    waiting = re.search(r'<div class="callout[^"]*" id="earlier-waiting">(.*?)</div>', html, re.S)
    assert waiting is not None, html
    assert "2 shifts of earlier days still wait" in waiting.group(1)
    assert f'<a href="/web/shifts/{ids[dead]}">Shift {ids[dead]}</a>' in waiting.group(1)
    assert "still open" in waiting.group(1)
    assert "handed over, not signed off (reopened by late events)" in waiting.group(1)
    assert f"Shift {ids[signed]}<" not in waiting.group(1)


def test_a_board_of_the_calendars_first_day_is_shown_not_an_error(
    client: FlaskClient, app: Flask, auth: Auth, world: World
) -> None:
    """A date picker lets anyone type 0001-01-01: the board of that day is empty, not a
    500 (the fortnight before it, whose waiting shifts the board lists, is before the
    calendar begins)."""
    response = client.get(
        f"/api/v1/stations/{world.station.id}/handover?date=0001-01-01",
        headers=auth.headers("manager1"),
    )
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["shifts"] == []
    signed_in(app, "manager1").get(f"/web/board?station={world.station.id}&date=0001-01-01")


@pytest.mark.parametrize("box", ["²:abc", "99999999999999999999:abc", "٣:abc"])
def test_a_board_box_naming_no_shift_id_is_refused_as_no_board_row_not_an_error(
    app: Flask, world: World, box: str
) -> None:
    """A forged box (a superscript digit, which ``str.isdigit`` takes for one, or an id no
    integer column holds) is told like any box that is no board row."""
    page = signed_in(app, "manager1")
    response = page.client.post(
        f"/web/stations/{world.station.id}/signoffs",
        data={"csrf_token": page.token(), "note": "all on the shelf", "shift": box, "date": ""},
    )
    assert response.status_code == 200
    assert "Nothing signed off: shift: not a board row" in response.get_data(as_text=True)


def test_the_board_signs_off_every_clean_handover_in_one_click(
    app: Flask, session: Session, auth: Auth, world: World, couriers: list[Courier]
) -> None:
    """19:00, 40 shifts handed over, 30 of them clean: the board made the manager check
    30 boxes one by one (the pages have no script to check them all) before pressing
    "Sign off the checked shifts". "Sign off all N clean handovers" signs off every row
    that had a box, each at the balance the page showed, with the note; the others are
    left for their own pages, and a clean row whose balance changed since the page was
    read is refused as a checked one is."""
    ids = []
    for n, (pda, parcel) in enumerate(zip(couriers[:4], parcels(session, world, 4), strict=True)):
        ids.append(pda.open(first_seq=1)["id"])
        pda.push([pda.event(parcel)] + ([pda.event(parcel, "returned_to_station")] if n else []))
        pda.close(ids[-1], last_seq=pda.seq)
    unbalanced, clean = ids[0], ids[1:]
    page = signed_in(app, "manager1")
    html = page.get(f"/web/board?station={world.station.id}")
    assert (
        '<button type="submit" name="every_clean" value="1" title="Every clean handover of '
        'this page, each as the page shows it: no box to check">Sign off all 3 clean '
        "handovers</button>"
    ) in html
    every = re.findall(r'<input type="hidden" name="clean" value="(\d+:\w+)">', html)
    assert f'aria-label="Sign off shift {unbalanced}"' not in html
    assert [box.partition(":")[0] for box in every] == [str(i) for i in clean]
    changed = f"{clean[2]}:{'0' * 16}"  # its row as read before a push changed it

    response = page.client.post(
        f"/web/stations/{world.station.id}/signoffs",
        data={
            "csrf_token": page.token(),
            "note": "all on the shelf",
            "clean": [*every[:2], changed],
            "every_clean": "1",
            "date": "",
        },
    )

    shown = response.get_data(as_text=True)
    assert "2 shifts signed off" in shown, shown
    assert f"shift {clean[2]}: its balance changed since it was read" in shown
    session.expire_all()
    states = {i: session.get_one(Shift, i) for i in ids}
    assert [states[i].status.value for i in ids] == [
        "closed",
        "signed_off",
        "signed_off",
        "closed",
    ]
    assert states[clean[0]].signoff_note == states[clean[1]].signoff_note == "all on the shelf"


def test_the_board_signs_off_apart_the_handovers_whose_discrepancies_are_all_decided(
    app: Flask,
    client: FlaskClient,
    session: Session,
    auth: Auth,
    world: World,
    couriers: list[Courier],
) -> None:
    """A manager resolved every discrepancy flag of an unbalanced shift (the parcel found
    damaged in the cage, say): the balance stays unbalanced, as DESIGN wants (resolving
    records a decision, it does not change what happened), but the board showed the
    row as any other unbalanced one, "1" discrepancy and nothing more, and offered no
    sign-off with the clean ones: at 19:00 the manager opened each page again to find
    which were decided. The row (page and API) now says "all 1 decided" apart from "1
    open" (an acknowledged flag is still to decide), and "Sign off all N handovers with
    every discrepancy decided" signs those off together, apart from the clean ones, each
    refused if a decision was undone since the page was read; the sign-off's audit entry
    names the decisions it rested on."""
    clean, decided, half, acked, undone = couriers
    manager = auth.headers("manager1")
    a, b, c, d, e, f = parcels(session, world, 6)
    ids = {}
    for pda, checked_out in (
        (clean, [a]),
        (decided, [b]),
        (half, [c, d]),
        (acked, [e]),
        (undone, [f]),
    ):
        ids[pda] = pda.open(first_seq=1)["id"]
        pda.push(
            [pda.event(parcel) for parcel in checked_out]
            + ([pda.event(a, "returned_to_station")] if pda is clean else [])
        )
        assert pda.close(ids[pda], last_seq=pda.seq).status_code == 200
    rows = board(client, world, manager)
    flag_of = {
        pda: [flag["flag_id"] for flag in rows[ids[pda]]["open_flags"]]
        for pda in (decided, half, acked, undone)
    }
    for pda, flag_ids in flag_of.items():
        for flag_id in flag_ids[:1]:
            flag = session.get_one(Flag, flag_id)
            if pda is acked:
                flags.acknowledge_flag(session=session, flag=flag, user_id=world.manager.id)
            else:
                flags.resolve_flag(
                    session=session, flag=flag, user_id=world.manager.id, note="in the cage"
                )
    session.commit()

    rows = board(client, world, manager)
    assert {pda: rows[ids[pda]]["discrepancies_decided"] for pda in couriers} == {
        clean: 0,
        decided: 1,
        half: 1,
        acked: 0,
        undone: 1,
    }
    assert rows[ids[decided]]["balance"]["status"] == "unbalanced"  # as DESIGN wants
    page = signed_in(app, "manager1")
    html = page.get(f"/web/board?station={world.station.id}")
    cell = {
        pda: re.search(rf'id="shift-{ids[pda]}">.*?</tr>', html, re.S).group(0)  # type: ignore[union-attr]
        for pda in couriers
    }
    assert ">all 1 decided</span>" in cell[decided]
    assert ">1 open</span>" in cell[half] and "decided</span>" not in cell[half]
    assert ">1 open</span>" in cell[acked]
    assert "decided</span>" not in cell[clean] and "open</span>" not in cell[clean]
    assert (
        '<button type="submit" name="every_decided" value="1" title="Every unbalanced '
        "handover of this page whose discrepancies are all decided, each as the page shows "
        'it">Sign off all 2 handovers with every discrepancy decided</button>'
    ) in html
    # Enter in the note field must sign nothing off: a browser submits through the form's
    # first button, which is disabled, not the first sign-off button.
    form = html[html.index('id="sign-off-clean"') :]
    assert "disabled" in re.search(r"<button[^>]*>", form).group(0)  # type: ignore[union-attr]
    offered = re.findall(r'<input type="hidden" name="decided" value="(\d+):(\w+)">', html)
    assert [int(i) for i, _ in offered] == [ids[decided], ids[undone]]
    # After the read, the last shift's decision is undone (its flag opened again).
    session.execute(
        update(Flag).where(Flag.id == flag_of[undone][0]).values(status=FlagStatus.OPEN)
    )
    session.commit()

    response = page.client.post(
        f"/web/stations/{world.station.id}/signoffs",
        data={
            "csrf_token": page.token(),
            "note": "decided on each",
            "decided": [f"{i}:{v}" for i, v in offered],
            "clean": re.findall(r'<input type="hidden" name="clean" value="(\d+:\w+)">', html),
            "every_decided": "1",
            "date": "",
        },
    )

    shown = response.get_data(as_text=True)
    assert "1 shift signed off" in shown, shown
    assert (f"shift {ids[undone]}: 1 discrepancy still to decide (1 missing_at_handover") in shown
    session.expire_all()
    status = {pda: session.get_one(Shift, ids[pda]).status.value for pda in couriers}
    assert status == {
        clean: "closed",  # the clean ones are their own button's
        decided: "signed_off",
        half: "closed",
        acked: "closed",
        undone: "closed",
    }
    entry = session.scalars(
        select(AuditEntry).where(
            AuditEntry.action == "shift_signed_off", AuditEntry.subject_key == str(ids[decided])
        )
    ).one()
    assert entry.details["discrepancies_decided"] == flag_of[decided]
    assert entry.details["note"] == "decided on each"
    assert entry.details["balance"]["status"] == "unbalanced"

    # The API signs them off together when asked, and refuses those still to decide.
    rows = board(client, world, manager)
    seen = {ids[pda]: rows[ids[pda]]["balance_version"] for pda in (half, acked)}
    response = client.post(
        f"/api/v1/stations/{world.station.id}/signoffs",
        json={
            "note": "decided",
            "discrepancies_decided": True,
            "shifts": [{"shift_id": i, "balance_version": v} for i, v in seen.items()],
        },
        headers=manager,
    )
    assert response.status_code == 200, response.get_json()
    assert [(o["outcome"], o["code"]) for o in response.get_json()["outcomes"]] == [
        ("refused", "discrepancies_to_decide")
    ] * 2
    # Without it, a decided shift is refused as unbalanced, as before.
    undone_seen = {ids[undone]: rows[ids[undone]]["balance_version"]}
    flags.resolve_flag(
        session=session,
        flag=session.get_one(Flag, flag_of[undone][0]),
        user_id=world.manager.id,
        note="found",
    )
    session.commit()
    body = sign_off_clean(client, world.station.id, manager, undone_seen).get_json()
    assert body["outcomes"][0]["code"] == "balance_unbalanced"
    body = client.post(
        f"/api/v1/stations/{world.station.id}/signoffs",
        json={
            "note": "decided",
            "discrepancies_decided": True,
            "shifts": [{"shift_id": ids[undone], "balance_version": undone_seen[ids[undone]]}],
        },
        headers=manager,
    ).get_json()
    assert body["signed_off"] == 1, body


def test_the_board_says_a_decided_shift_waits_only_for_its_sign_off_when_it_does(
    app: Flask,
    client: FlaskClient,
    session: Session,
    auth: Auth,
    world: World,
    couriers: list[Courier],
) -> None:
    """A delivery without its signature at 10:00, the recipient called and the flag
    resolved at 11:00: the row of the shift still on the road said "all 1 decided",
    titled "the shift waits only for its sign-off" (and the API's field said as much of
    every row whose discrepancies are all resolved), while the courier was out and the
    shift could not be signed off at all. Only a handover offered for a sign-off of
    those decided says so; the others say what is decided, no more."""
    on_road, handed_over = couriers[:2]
    manager = auth.headers("manager1")
    a, b = parcels(session, world, 2)
    ids = {}
    for pda, parcel in ((on_road, a), (handed_over, b)):
        ids[pda] = pda.open(first_seq=1)["id"]
        pda.push(
            [
                pda.event(parcel),
                pda.event(parcel, "delivered", pod={"recipient_name": "Li", "relation": "self"}),
            ]
        )
    assert handed_over.close(ids[handed_over], last_seq=handed_over.seq).status_code == 200
    for pda in (on_road, handed_over):
        [found] = balance(client, ids[pda], manager)["discrepancies"]
        assert found["kind"] == "delivered_without_pod"
        flags.resolve_flag(
            session=session,
            flag=session.get_one(Flag, found["flag_id"]),
            user_id=world.manager.id,
            note="recipient called: signed for it",
        )
    session.commit()

    rows = board(client, world, manager)
    assert [rows[ids[pda]]["discrepancies_decided"] for pda in (on_road, handed_over)] == [1, 1]
    html = signed_in(app, "manager1").get(f"/web/board?station={world.station.id}")
    cell = {
        pda: re.search(rf'id="shift-{ids[pda]}">.*?</tr>', html, re.S).group(0)  # type: ignore[union-attr]
        for pda in (on_road, handed_over)
    }
    assert all(">all 1 decided</span>" in found for found in cell.values())
    assert "waits only for its sign-off" not in cell[on_road]
    assert "waits only for its sign-off" in cell[handed_over]


def test_a_decision_a_late_event_undoes_refuses_the_decided_sign_off_at_the_same_balance(
    client: FlaskClient,
    session: Session,
    auth: Auth,
    world: World,
    couriers: list[Courier],
) -> None:
    """A parcel missing at handover, resolved "lost"; the board offers the shift to sign
    off with every discrepancy decided. Before the click, the PDA sends a failed attempt
    at that parcel: the system opens the flag again (the decision did not see it), but
    the balance (still 1 missing, the same flag) keeps its version. The sign-off reads
    the flag as it is, and refuses the shift: no version check would."""
    pda = couriers[0]
    manager = auth.headers("manager1")
    returned, lost = parcels(session, world, 2)
    shift_id = pda.open(first_seq=1)["id"]
    pda.push([pda.event(returned), pda.event(lost), pda.event(returned, "returned_to_station")])
    assert pda.close(shift_id).status_code == 200  # no last seq: a later one is its own
    [found] = balance(client, shift_id, manager)["discrepancies"]
    flag = session.get_one(Flag, found["flag_id"])
    flags.resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="lost")
    session.commit()
    row = board(client, world, manager)[shift_id]
    assert row["discrepancies_decided"] == row["balance"]["discrepancy_count"] == 1

    pda.push(
        [
            pda.event(
                lost, "delivery_attempt_failed", reason="recipient_absent", action="retry_planned"
            )
        ]
    )

    now = board(client, world, manager)[shift_id]
    assert now["balance_version"] == row["balance_version"]
    assert now["discrepancies_decided"] == 0
    body = client.post(
        f"/api/v1/stations/{world.station.id}/signoffs",
        json={
            "note": "each decided",
            "discrepancies_decided": True,
            "shifts": [{"shift_id": shift_id, "balance_version": row["balance_version"]}],
        },
        headers=manager,
    ).get_json()
    assert [(o["outcome"], o["code"]) for o in body["outcomes"]] == [
        ("refused", "discrepancies_to_decide")
    ], body
    session.expire_all()
    assert session.get_one(Shift, shift_id).status.value == "closed"


def decided_sign_off(
    client: FlaskClient, world: World, headers: dict[str, str], row: dict[str, Any]
) -> dict[str, Any]:
    response = client.post(
        f"/api/v1/stations/{world.station.id}/signoffs",
        json={
            "note": "each decided",
            "discrepancies_decided": True,
            "shifts": [{"shift_id": row["shift_id"], "balance_version": row["balance_version"]}],
        },
        headers=headers,
    )
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_a_resolved_unknown_parcel_is_no_decided_discrepancy(
    app: Flask,
    client: FlaskClient,
    session: Session,
    auth: Auth,
    world: World,
    couriers: list[Courier],
) -> None:
    """A courier delivered, in a locker, a parcel the station never took in; the manager
    resolved its ``unknown_parcel`` flag ("intake data comes tomorrow"), and the board
    called the shift "all 1 decided" and signed it off with the decided ones. But that
    flag is no fault found: it says the rules have not judged the parcel's scans (no
    class: no consent or proof checked, DESIGN rule 4 and 5). Resolving it checks
    nothing; only intake does. It is still to decide, on the board and at the sign-off."""
    pda = couriers[0]
    manager = auth.headers("manager1")
    unknown = factories.s10()
    shift_id = pda.open(first_seq=1)["id"]
    pda.push(
        [
            pda.event(unknown),
            pda.event(unknown, "delivered_to_locker", locker_id="L-1", compartment="7"),
        ]
    )
    assert pda.close(shift_id, last_seq=pda.seq).status_code == 200
    found = balance(client, shift_id, manager)["discrepancies"]
    assert [d["kind"] for d in found] == ["unknown_parcel"], found
    [found] = found
    flags.resolve_flag(
        session=session,
        flag=session.get_one(Flag, found["flag_id"]),
        user_id=world.manager.id,
        note="intake data comes tomorrow",
    )
    session.commit()

    row = board(client, world, manager)[shift_id]
    assert row["balance"]["discrepancy_count"] == 1
    assert row["discrepancies_decided"] == 0
    html = signed_in(app, "manager1").get(f"/web/board?station={world.station.id}")
    cell = re.search(rf'id="shift-{shift_id}">.*?</tr>', html, re.S).group(0)  # type: ignore[union-attr]
    assert "decided</span>" not in cell and ">1 open</span>" in cell
    assert "with every discrepancy decided" not in html
    body = decided_sign_off(client, world, manager, row)
    [outcome] = body["outcomes"]
    assert (outcome["outcome"], outcome["code"]) == ("refused", "discrepancies_to_decide")
    assert f"unknown_parcel ({unknown}) is resolved, but take the parcel in" in outcome["message"]
    session.expire_all()
    assert session.get_one(Shift, shift_id).status.value == "closed"


def test_another_stations_decision_is_no_decided_discrepancy_of_this_station(
    app: Flask,
    client: FlaskClient,
    session: Session,
    auth: Auth,
    world: World,
    couriers: list[Courier],
) -> None:
    """A delivery without its signature in this station's shift, flagged at another
    station: a flag raised before flags had a station each sits at the parcel's station
    whoever's events it cites (``sync.rules.by_station``), here a parcel of the other
    station that this station's courier delivered. That station's manager resolved it.
    This station's board counted it "all 1 decided" and its manager signed the handover
    off on a decision they cannot even read (the flag is a 404 to them). It is still to
    decide here: the shift is signed off on its own, with a note."""
    manager = auth.headers("manager1")
    shift_id, flag, theirs = _decided_by_the_other_station(
        client, session, world, couriers[0], manager
    )
    assert client.get(f"/api/v1/flags/{flag.id}", headers=manager).status_code == 404

    row = board(client, world, manager)[shift_id]
    count = row["balance"]["discrepancy_count"]
    assert row["discrepancies_decided"] == count - 1
    html = signed_in(app, "manager1").get(f"/web/board?station={world.station.id}")
    assert "with every discrepancy decided" not in html
    body = decided_sign_off(client, world, manager, row)
    [outcome] = body["outcomes"]
    assert (outcome["outcome"], outcome["code"]) == ("refused", "discrepancies_to_decide")
    assert (
        f"delivered_without_pod ({theirs}) is resolved, but its flag is another station's"
    ) in outcome["message"]
    session.expire_all()
    assert session.get_one(Shift, shift_id).status.value == "closed"
    # On its own, with a note, the manager signs it off knowingly.
    assert (
        sign_off(client, shift_id, manager, balance_version=row["balance_version"]).status_code
        == 200
    )


def _decided_by_the_other_station(
    client: FlaskClient,
    session: Session,
    world: World,
    pda: Courier,
    manager: dict[str, str],
) -> tuple[int, Flag, str]:
    """A closed shift of this station whose discrepancies are each resolved, one of them
    a delivery without its signature of a parcel of the other station, on a flag of the
    other station (raised before flags had a station each) that its manager resolved:
    the shift's id, that flag and the parcel's number."""
    theirs = factories.parcel(session, world.other_station).tracking_no
    session.commit()
    shift_id = pda.open(first_seq=1)["id"]
    pda.push(
        [
            pda.event(theirs),
            pda.event(theirs, "delivered", pod={"recipient_name": "Li", "relation": "self"}),
        ]
    )
    assert pda.close(shift_id, last_seq=pda.seq).status_code == 200
    found = [
        d
        for d in balance(client, shift_id, manager)["discrepancies"]
        if d["kind"] == "delivered_without_pod"
    ]
    assert len(found) == 1
    flag = session.get_one(Flag, found[0]["flag_id"])
    assert flag.station_id == world.station.id  # raised today at the scan's station
    # As a flag of the parcel raised before flags had a station each stands:
    session.execute(
        update(Flag).where(Flag.id == flag.id).values(station_id=world.other_station.id)
    )
    session.commit()
    session.expire_all()
    for d in balance(client, shift_id, manager)["discrepancies"]:
        if d["flag_id"] is not None and d["flag_id"] != flag.id:
            flags.resolve_flag(
                session=session,
                flag=session.get_one(Flag, d["flag_id"]),
                user_id=world.manager.id,
                note="decided here",
            )
    flags.resolve_flag(
        session=session,
        flag=session.get_one(Flag, flag.id),
        user_id=world.other_manager.id,
        note="recipient called by the other station",
    )
    session.commit()
    return shift_id, flag, theirs


def test_a_shift_page_shows_another_stations_flag_without_a_link_and_says_whose(
    app: Flask,
    client: FlaskClient,
    session: Session,
    auth: Auth,
    world: World,
    couriers: list[Courier],
) -> None:
    """The shift's page linked a discrepancy's flag of another station like any other:
    its manager followed it to a 404 (the flag is that station's to read and decide),
    and nothing said why this "resolved" flag kept the handover from the sign-off of
    those decided. It is named without a link, as the other station's, by its code; an
    admin, who reads every station's flags, still gets the link."""
    manager = auth.headers("manager1")
    shift_id, flag, _ = _decided_by_the_other_station(client, session, world, couriers[0], manager)

    html = signed_in(app, "manager1").get(f"/web/shifts/{shift_id}")
    assert f'href="/web/flags/{flag.id}"' not in html
    assert signed_in(app, "manager1").client.get(f"/web/flags/{flag.id}").status_code == 404
    theirs = re.search(rf"Flag #{flag.id} .*?</p>", html, re.S)
    assert theirs is not None, html
    assert (
        f"of station {world.other_station.code}: its manager decides it, and it does not "
        "count as decided here"
    ) in theirs.group(0)
    # This station's flags of its discrepancies keep their link, and say nothing of it.
    ours = [
        d["flag_id"]
        for d in balance(client, shift_id, manager)["discrepancies"]
        if d["flag_id"] not in (None, flag.id)
    ]
    assert all(f'href="/web/flags/{i}"' in html for i in ours)
    assert html.count("its manager decides it") == 1

    admin = signed_in(app, "admin").get(f"/web/shifts/{shift_id}")
    assert f'href="/web/flags/{flag.id}"' in admin
    assert f"of station {world.other_station.code}: its manager decides it" in admin


def test_the_balance_api_says_which_discrepancys_flag_is_another_stations(
    client: FlaskClient,
    session: Session,
    auth: Auth,
    world: World,
    couriers: list[Courier],
) -> None:
    """The board's ``discrepancies_decided`` leaves out a resolved flag of another
    station, and ``GET /flags/<id>`` answers it 404 to this station's manager: a client
    reading the balance saw every flag resolved, one not counted, and no way to tell
    which or why. Each discrepancy says whether its flag is another station's
    (``flag_elsewhere``), as the shift's page does."""
    manager = auth.headers("manager1")
    shift_id, flag, _ = _decided_by_the_other_station(client, session, world, couriers[0], manager)

    found = balance(client, shift_id, manager)["discrepancies"]
    assert {d["flag_id"]: d["flag_elsewhere"] for d in found if d["flag_id"]}[flag.id] is True
    assert [d["flag_id"] for d in found if d["flag_elsewhere"]] == [flag.id]
    assert all(d["flag_status"] == "resolved" for d in found if d["flag_id"])


def test_the_board_page_tells_apart_signed_now_signed_before_and_refused(
    app: Flask, session: Session, world: World, couriers: list[Courier]
) -> None:
    """One press on the board, a mix: two shifts a press before signed off with this note
    (the answer was slow), one signed off now, one unbalanced, one a press before signed
    off with another note. Each is counted once, where it belongs: "1 shift signed off",
    the two apart, and each refusal with its reason."""
    ids = []
    for n, (pda, parcel) in enumerate(zip(couriers, parcels(session, world, 5), strict=True)):
        shift_id = pda.open(first_seq=1)["id"]
        events = [pda.event(parcel)]  # checked out, then returned: clean, but the fourth
        events += [] if n == 3 else [pda.event(parcel, "returned_to_station")]
        pda.push(events)
        pda.close(shift_id, last_seq=pda.seq)
        ids.append(shift_id)
    page = signed_in(app, "manager1")
    html = page.get(f"/web/board?station={world.station.id}")
    boxes = dict(re.findall(r'<input type="checkbox" name="shift" value="(\d+):(\w+)"', html))
    assert list(boxes) == [str(ids[n]) for n in (0, 1, 2, 4)], html
    checked = {n: f"{ids[n]}:{boxes.get(str(ids[n]), 'stale')}" for n in range(5)}

    def press(which: list[int], note: str) -> str:
        return page.client.post(
            f"/web/stations/{world.station.id}/signoffs",
            data={
                "csrf_token": page.token(),
                "note": note,
                "shift": [checked[n] for n in which],
                "date": "",
            },
            follow_redirects=True,
        ).get_data(as_text=True)

    assert "2 shifts signed off." in press([0, 1], "on the shelf")
    assert "1 shift signed off." in press([4], "counted twice")
    shown = press([0, 1, 2, 3, 4], "on the shelf")

    flashed = re.findall(r'<p class="flash flash-\w+" role="status">(.*?)</p>', shown, re.S)
    said = " | ".join(" ".join(unescape(f).split()) for f in flashed)
    assert "1 shift signed off." in said, said
    assert "3 shifts signed off" not in said and "4 shifts signed off" not in said, said
    assert (
        "2 shifts were already signed off, by you with this note: nothing changed for them."
    ) in said, said
    assert f"Not signed off: shift {ids[3]}: the balance is unbalanced" in said, said
    assert f"Not signed off: shift {ids[4]} is already signed off, by you at " in said, said
    session.expire_all()
    status = [session.get_one(Shift, i).status.value for i in ids]
    assert status == ["signed_off", "signed_off", "signed_off", "closed", "signed_off"]
    assert session.get_one(Shift, ids[4]).signoff_note == "counted twice"
