"""GET /audit (the log, filtered and paged) and GET /audit/verify (the chain checked)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from models import AuditEntry
from sync import audit
from tests.conftest import Auth, World
from tests.courier_api.test_shifts_api import Courier, parcels, sign_off
from tests.sync.test_audit import tamper_details

AUDIT = "/api/v1/audit"
VERIFY = f"{AUDIT}/verify"
START = dt.datetime(2026, 11, 20, 8, 0, tzinfo=dt.UTC)


def chained(session: Session, *entries: dict[str, Any]) -> list[int]:
    """``entries`` (action, actor_id, subject_type, subject_key, details; ``at``: minutes
    after ``START``) chained onto the log as ``audit.append`` chains them, at those times.
    Their ids, oldest first."""
    prev = (
        session.scalar(select(AuditEntry.entry_hash).order_by(AuditEntry.id.desc()).limit(1))
        or audit.GENESIS_HASH
    )
    rows = []
    for entry in entries:
        row = {
            "actor_id": None,
            "subject_type": "shift",
            "subject_key": "1",
            "details": {},
            **entry,
            "at": START + dt.timedelta(minutes=entry.get("at", len(rows))),
            "prev_hash": prev,
        }
        row["entry_hash"] = prev = audit.entry_hash(**row)
        rows.append(row)
    ids = session.scalars(insert(AuditEntry).returning(AuditEntry.id), rows).all()
    session.commit()
    return sorted(ids)


def listed(client: FlaskClient, headers: dict[str, str], **query: Any) -> list[dict[str, Any]]:
    response = client.get(AUDIT, query_string=query, headers=headers)
    assert response.status_code == 200, response.get_json()
    items: list[dict[str, Any]] = response.get_json()["items"]
    return items


# -- what only the log keeps ------------------------------------------------------------------


def test_an_auditor_can_read_and_verify_the_audit_log_through_the_api(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """DESIGN.md: the auditor "verifies nothing was altered" through the JSON API.
    Without these endpoints the first sign-off of a shift reopened by a late event
    and signed off again (the shift keeps only the last), the reopening itself and
    which proof the auditor read were in the log alone, which only someone with the
    database and the CLI could see, let alone verify."""
    a, b = parcels(session, world, 2)
    pda = Courier(client, auth, "courier1", "PDA-0001")
    manager, auditor = auth.headers("manager1"), auth.headers("auditor1")
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b), pda.event(a, "delivered")])
    pda.close(shift["id"])
    assert sign_off(client, shift["id"], manager, note="b missing").status_code == 200
    pda.push([pda.event(b, "returned_to_station", shift_id=shift["id"])])
    assert sign_off(client, shift["id"], manager, note="b came back").status_code == 200
    [proof] = client.get("/api/v1/proofs", query_string={"tracking_no": a}, headers=auditor).json[
        "items"
    ]
    assert client.get(f"/api/v1/proofs/{proof['event_id']}", headers=auditor).status_code == 200

    about_the_shift = listed(client, auditor, subject_type="shift", subject_key=str(shift["id"]))
    assert [(e["action"], e["details"].get("note")) for e in about_the_shift] == [
        ("shift_signed_off", "b came back"),
        ("shift_reopened", None),
        ("shift_signed_off", "b missing"),
    ]
    assert {e["actor_id"] for e in about_the_shift} == {world.manager.id, None}
    [read] = listed(client, auditor, action="proof_read")
    assert (read["actor_id"], read["subject_key"]) == (world.auditor.id, str(proof["event_id"]))
    assert read["details"]["tracking_no"] == a
    verified = client.get(VERIFY, headers=auditor)
    assert verified.status_code == 200
    assert verified.get_json() | {"head_hash": None} == {
        "intact": True,
        "checked": 5,  # two sign-offs, the reopening, the search and the read
        "broken_id": None,
        "problem": None,
        "message": None,
        "head_id": read["id"],
        "head_hash": None,
    }
    assert verified.get_json()["head_hash"] == read["entry_hash"]


# -- the list ---------------------------------------------------------------------------------


def test_entries_come_newest_first_a_page_at_a_time(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    ids = chained(session, *({"action": "blob_read"} for _ in range(5)))
    admin = auth.headers("admin")
    first = client.get(AUDIT, query_string={"limit": 2}, headers=admin).get_json()
    assert [e["id"] for e in first["items"]] == [ids[4], ids[3]]
    assert first["next_after"] == ids[3]
    second = listed(client, admin, limit=2, after=first["next_after"])
    assert [e["id"] for e in second] == [ids[2], ids[1]]
    last = client.get(AUDIT, query_string={"limit": 2, "after": ids[1]}, headers=admin).json
    assert [e["id"] for e in last["items"]] == [ids[0]] and last["next_after"] is None
    entry = session.get(AuditEntry, ids[0])
    assert entry is not None
    assert last["items"][0] == {
        "id": entry.id,
        "at": entry.at.isoformat(),
        "actor_id": None,
        "action": "blob_read",
        "subject_type": "shift",
        "subject_key": "1",
        "details": {},
        "prev_hash": audit.GENESIS_HASH,
        "entry_hash": entry.entry_hash,
    }


def test_each_filter_narrows_the_list(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    signed, read, resolved, purged = chained(
        session,
        {"action": "shift_signed_off", "actor_id": world.manager.id, "subject_key": "7"},
        {"action": "proof_read", "actor_id": world.auditor.id, "subject_type": "proof"},
        {"action": "flag_resolved", "actor_id": world.manager.id, "subject_type": "flag"},
        {"action": "proof_images_purged", "subject_type": "blob", "subject_key": "ab" * 32},
    )
    auditor = auth.headers("auditor1")

    def ids(**query: Any) -> list[int]:
        return [e["id"] for e in listed(client, auditor, **query)]

    assert ids() == [purged, resolved, read, signed]
    assert ids(action="proof_read") == [read]
    assert ids(actor_id=world.manager.id) == [resolved, signed]
    assert ids(subject_type="shift", subject_key="7") == [signed]
    assert ids(subject_type="shift", subject_key="1") == []
    assert ids(subject_type="blob", subject_key="ab" * 32) == [purged]
    minute = dt.timedelta(minutes=1)
    assert ids(at_from=(START + minute).isoformat()) == [purged, resolved, read]
    assert ids(at_to=(START + minute).isoformat()) == [signed]
    assert ids(at_from=(START + minute).isoformat(), at_to=(START + 3 * minute).isoformat()) == [
        resolved,
        read,
    ]
    assert ids(action="flag_resolved", actor_id=world.auditor.id) == []


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("action=", "action"),
        (f"action={'x' * 65}", "action"),
        ("actor_id=0", "actor_id"),
        ("actor_id=99999999999", "actor_id"),
        (f"subject_type={'x' * 33}", "subject_type"),
        ("subject_type=shift&subject_key=", "subject_key"),
        ("at_from=2026-11-20T08:00:00", "at_from"),  # no offset: ambiguous
        ("at_to=yesterday", "at_to"),
        ("after=-1", "after"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("actor=3", "actor"),  # not a filter: never answered as if it were not there
    ],
)
def test_bad_list_arguments_are_422_naming_the_field(
    client: FlaskClient, auth: Auth, world: World, query: str, field: str
) -> None:
    response = client.get(f"{AUDIT}?{query}", headers=auth.headers("auditor1"))
    assert response.status_code == 422
    assert field in response.get_json()["errors"]["query"]


def test_an_empty_time_range_is_422(client: FlaskClient, auth: Auth, world: World) -> None:
    at = START.isoformat().replace("+", "%2B")
    response = client.get(f"{AUDIT}?at_from={at}&at_to={at}", headers=auth.headers("auditor1"))
    assert response.status_code == 422
    body = response.get_json()
    assert body["code"] == "invalid_range" and "at_to" in body["errors"]


def test_a_subject_key_without_its_type_is_422(
    client: FlaskClient, auth: Auth, world: World
) -> None:
    """Shift 42, flag 42 and proof 42 share the key "42": alone it names no subject."""
    response = client.get(AUDIT, query_string={"subject_key": "42"}, headers=auth.headers("admin"))
    assert response.status_code == 422
    body = response.get_json()
    assert body["code"] == "subject_type_required" and "subject_type" in body["errors"]


def test_a_subject_type_without_its_key_is_422(
    client: FlaskClient, auth: Auth, world: World
) -> None:
    """Every proof ever read, newest first, would be read whole and sorted: no index
    gives a type's entries in that order. A kind of entry is listed by its action."""
    response = client.get(
        AUDIT, query_string={"subject_type": "proof"}, headers=auth.headers("auditor1")
    )
    assert response.status_code == 422
    body = response.get_json()
    assert body["code"] == "subject_key_required" and "subject_key" in body["errors"]


def test_a_phone_in_an_entrys_details_is_masked_for_admins_not_auditors(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """A manager signing off writes down the number they called; the sign-off's entry
    keeps the note as written. Rule 7: an admin reading the log gets it masked, an
    auditor whole (and the auditor's copy is the one its hash covers)."""
    note = "called the recipient on +86 138 1234 5678: parcel at the neighbour's"
    chained(session, {"action": "shift_signed_off", "details": {"note": note, "ids": [1]}})

    def details(username: str) -> dict[str, Any]:
        [entry] = listed(client, auth.headers(username))
        found: dict[str, Any] = entry["details"]
        return found

    assert details("auditor1") == {"note": note, "ids": [1]}
    assert details("admin") == {
        "note": "called the recipient on +**********678: parcel at the neighbour's",
        "ids": [1],
    }


def test_reading_the_log_is_not_itself_logged(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """SECURITY.md threat 4: the log shows no proof or image, and a read that wrote
    would hold SQLite's writers' turn (every push) while a verification walks the log."""
    chained(session, {"action": "blob_read"})
    for username in ("auditor1", "admin"):
        for url in (AUDIT, VERIFY):
            assert client.get(url, headers=auth.headers(username)).status_code == 200
    assert session.scalar(select(func.count()).select_from(AuditEntry)) == 1


# -- verification -----------------------------------------------------------------------------


def test_an_empty_log_verifies_with_nothing_checked(
    client: FlaskClient, auth: Auth, world: World
) -> None:
    body = client.get(VERIFY, headers=auth.headers("admin")).get_json()
    assert (body["intact"], body["checked"], body["head_id"]) == (True, 0, None)


def test_verify_names_the_first_altered_entry_as_the_cli_does(
    client: FlaskClient, auth: Auth, runner: FlaskCliRunner, session: Session, world: World
) -> None:
    """Both answers come from ``sync.audit.verify``, walking a log longer than the
    thousand entries it reads at a time, stopped at the entry changed behind the
    service's back."""
    ids = chained(session, *({"action": "blob_read", "details": {"i": i}} for i in range(1500)))
    victim = ids[1200]
    tamper_details(session, victim, {"i": -1})
    session.commit()
    body = client.get(VERIFY, headers=auth.headers("auditor1")).get_json()
    assert (body["intact"], body["broken_id"], body["problem"]) == (False, victim, "altered")
    assert body["checked"] == 1201
    assert (body["head_id"], body["head_hash"]) == (
        ids[1199],
        session.get(AuditEntry, ids[1199]).entry_hash,  # type: ignore[union-attr]
    )
    cli = runner.invoke(args=["audit", "verify"])
    assert cli.exit_code == 1
    assert cli.stdout == f"audit log BROKEN: {body['message']} (1,201 entries read)\n"


def test_verify_names_an_entry_whose_predecessor_was_removed(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    ids = chained(session, *({"action": "blob_read"} for _ in range(3)))
    session.execute(AuditEntry.__table__.delete().where(AuditEntry.id == ids[1]))
    session.commit()
    body = client.get(VERIFY, headers=auth.headers("admin")).get_json()
    assert (body["intact"], body["broken_id"], body["problem"]) == (False, ids[2], "link_broken")
    assert body["checked"] == 2 and body["head_id"] == ids[0]
    assert f"entry {ids[2]}" in body["message"] and "removed" in body["message"]


def test_the_head_of_an_intact_answer_given_back_starts_the_next_check_there(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    chained(session, *({"action": "blob_read", "details": {"i": i}} for i in range(4)))
    first = client.get(VERIFY, headers=auth.headers("auditor1")).get_json()
    later = chained(session, {"action": "blob_read", "at": 10})
    head = {"head_id": first["head_id"], "head_hash": first["head_hash"]}
    body = client.get(VERIFY, query_string=head, headers=auth.headers("auditor1")).get_json()
    assert (body["intact"], body["checked"], body["head_id"]) == (True, 2, later[0])


def test_the_newest_entries_removed_show_against_the_head_recorded(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    ids = chained(session, *({"action": "blob_read", "details": {"i": i}} for i in range(3)))
    first = client.get(VERIFY, headers=auth.headers("admin")).get_json()
    session.execute(AuditEntry.__table__.delete().where(AuditEntry.id == ids[2]))
    session.commit()
    assert client.get(VERIFY, headers=auth.headers("admin")).get_json()["intact"]
    head = {"head_id": first["head_id"], "head_hash": first["head_hash"]}
    body = client.get(VERIFY, query_string=head, headers=auth.headers("admin")).get_json()
    assert (body["intact"], body["broken_id"], body["problem"]) == (False, ids[2], "head_missing")


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ({"head_id": 1}, "head_hash_required"),
        ({"head_hash": "a" * 64}, "head_id_required"),
        ({"head_id": 1, "head_hash": "z" * 64}, "invalid_head_hash"),
    ],
)
def test_a_head_needs_its_id_and_its_hash(
    client: FlaskClient, auth: Auth, world: World, query: dict[str, Any], code: str
) -> None:
    response = client.get(VERIFY, query_string=query, headers=auth.headers("auditor1"))
    assert response.status_code == 422
    assert response.get_json()["code"] == code
