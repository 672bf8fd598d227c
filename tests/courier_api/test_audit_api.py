"""GET /audit (the log, filtered and paged) and GET /audit/verify (the chain checked)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from courier_api.config import ConfigError, load_config
from models import AuditEntry, AuditEntryParcel, SignInAttempt
from sync import audit
from sync.sign_in_limits import Limit
from tests.conftest import Auth, World
from tests.courier_api.test_shifts_api import Courier, parcels, sign_off
from tests.sync.test_audit import tamper_details

AUDIT = "/api/v1/audit"
VERIFY = f"{AUDIT}/verify"
CONSENTS = "/api/v1/consents"
FLAGS = "/api/v1/flags"
PARCELS = "/api/v1/parcels"
PROOFS = "/api/v1/proofs"
QUARANTINE = "/api/v1/quarantine"
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
        hashed = {name: value for name, value in row.items() if name != "tracking_no"}
        row["entry_hash"] = prev = audit.entry_hash(**hashed)
        rows.append(row)
    ids = sorted(session.scalars(insert(AuditEntry).returning(AuditEntry.id), rows).all())
    concerned = [
        {"tracking_no": row["tracking_no"], "entry_id": entry_id}
        for entry_id, row in zip(ids, rows, strict=True)
        if row.get("tracking_no")
    ]
    if concerned:  # as ``audit.append`` files an entry under its parcel
        session.execute(insert(AuditEntryParcel), concerned)
    session.commit()
    return ids


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
        "complete": True,
        # two sign-offs, the reopening, b's missing_at_handover closed by its return,
        # the search and the read
        "checked": 6,
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
        "tracking_no": None,
        "client_ip": None,  # written with no request
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


# -- a parcel's entries -----------------------------------------------------------------------


def typed(tracking_no: str) -> str:
    """``tracking_no`` as a person types it off a label: lower case, spaced, dashed."""
    return f"{tracking_no[:2].lower()} {tracking_no[2:6]}-{tracking_no[6:]}".lower()


def test_a_parcels_entries_of_every_kind_are_listed_by_its_tracking_number(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """An auditor settling a dispute about parcel ``a`` ("left in a locker although I
    said no") asks for its history by its number, as typed off the label: its consent
    granted and revoked, the recipient's refusal, the manager's resolution of its drop's
    flag, the sign-off of the handover it was in, the intake changing its class, the
    auditors' reads of its proof and record and a search of every parcel's proofs that
    showed it. Those entries are keyed by a consent's, a request's, a flag's, a proof's,
    a shift's id: by subject they took every id to find. Parcel ``b``'s own (its
    consent, its handover flag's acknowledgement, its read) are not among them; the
    sign-off, of both, is in both lists; the standing consent in neither."""
    a, b = parcels(session, world, 2)  # express: a locker drop needs consent
    pda = Courier(client, auth, "courier1", "PDA-0001")
    app1, manager, auditor = (auth.headers(u) for u in ("app1", "manager1", "auditor1"))
    granted_at = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)).isoformat()
    consent = {"method": "locker", "channel": "app", "granted_at": granted_at}

    def post(url: str, body: dict[str, Any], headers: dict[str, str], status: int = 200) -> Any:
        response = client.post(url, json=body, headers=headers)
        assert response.status_code == status, response.get_json()
        return response.get_json()

    consent_a = post(CONSENTS, {"tracking_no": a, **consent}, app1, 201)
    post(f"{CONSENTS}/{consent_a['id']}/revoke", {"reason": "changed my mind"}, app1)
    post(CONSENTS, {"tracking_no": b, **consent}, app1, 201)
    standing = {"scope": "standing", "recipient_phone": "+8613812345678", "address": "1 Rd"}
    post(CONSENTS, {**standing, **consent}, app1, 201)
    asked = post(f"{CONSENTS}/requests", {"tracking_no": a, "method": "locker"}, pda.headers, 201)
    refusal = {"request_id": asked["id"], "granted": False, "channel": "sms"}
    post(CONSENTS, refusal, app1)
    shift = pda.open()
    drop = {"locker_id": "L-1", "compartment": "1", "pod": {"pickup_code": "1234"}}
    events = [pda.event(a), pda.event(b), pda.event(a, "delivered_to_locker", **drop)]
    raised = pda.push(events)["flags_raised"]
    [unauthorized] = [f for f in raised if f["kind"] == "unauthorized_locker_drop"]
    post(f"{FLAGS}/{unauthorized['flag_id']}/resolve", {"note": "recipient called"}, manager)
    assert pda.close(shift["id"]).status_code == 200
    [missing] = client.get(FLAGS, query_string={"tracking_no": b}, headers=manager).json["items"]
    assert missing["subject_key"] == f"{shift['id']}:{b}"  # b's handover in the shift
    post(f"{FLAGS}/{missing['id']}/acknowledge", {"note": "looking for it"}, manager)
    assert sign_off(client, shift["id"], manager, note="b missing").status_code == 200
    [proof] = client.get(PROOFS, query_string={"tracking_no": a}, headers=auditor).json["items"]
    assert client.get(f"{PROOFS}/{proof['event_id']}", headers=auditor).status_code == 200
    for number in (a, b):
        assert client.get(f"{PARCELS}/{number}", headers=auditor).status_code == 200
    assert client.get(PROOFS, headers=auditor).status_code == 200  # every parcel's: none's
    rejected = client.get(QUARANTINE, query_string={"tracking_no": typed(a)}, headers=auditor)
    assert rejected.status_code == 200
    updated = {"tracking_no": a, "service_class": "parcel", "recipient_name": "Recipient"}
    updated |= {"recipient_phone": "+8613812345678", "address": "1 Century Ave"}
    assert post(PARCELS, {"parcels": [updated]}, manager)["results"][0]["status"] == "updated"

    of_a = listed(client, auditor, tracking_no=typed(a))
    assert [(e["action"], e["subject_type"]) for e in of_a] == [
        ("flag_status_changed", "flag"),  # the drop's flag closed: a class needing none
        ("parcel_updated", "parcel"),
        ("quarantine_searched", "quarantined_event"),  # its rejected events, by its number
        ("proofs_searched", "proof"),  # every parcel's proofs: its own among them
        ("parcel_read", "parcel"),
        ("proof_read", "proof"),
        ("proofs_searched", "proof"),  # the search by its number that found the proof
        ("shift_signed_off", "shift"),  # the balance signed off names it
        ("flag_resolved", "flag"),
        ("consent_refused", "consent_request"),
        ("consent_revoked", "consent"),
        ("consent_granted", "consent"),
    ]
    # The entry's own parcel: none for an entry about several.
    assert [e["tracking_no"] for e in of_a] == [a] * 3 + [None] + [a] * 3 + [None] + [a] * 4
    assert of_a[8]["subject_key"] == of_a[0]["subject_key"] == str(unauthorized["flag_id"])
    assert (of_a[0]["actor_id"], of_a[0]["details"]["from_status"]) == (None, "resolved")
    assert (of_a[0]["details"]["to_status"], of_a[0]["details"]["decision"]) == (
        "closed",
        "resolved",
    )
    of_b = listed(client, auditor, tracking_no=b)
    assert [(e["action"], e["subject_key"]) for e in of_b] == [
        ("parcel_read", b),
        ("shift_signed_off", str(shift["id"])),
        ("flag_acknowledged", str(missing["id"])),
        ("consent_granted", str(consent_a["id"] + 1)),
    ]
    everything = listed(client, auditor)
    assert {e["id"] for e in everything} - {e["id"] for e in of_a + of_b} == {
        e["id"]
        for e in everything
        if e["action"] == "consent_granted" and e["tracking_no"] is None
    }  # the standing consent, of no parcel
    # A page at a time, and with the other filters.
    first = client.get(AUDIT, query_string={"tracking_no": a, "limit": 3}, headers=auditor).json
    assert [e["id"] for e in first["items"]] == [e["id"] for e in of_a[:3]]
    rest = listed(client, auditor, tracking_no=a, after=first["next_after"])
    assert [e["id"] for e in rest] == [e["id"] for e in of_a[3:]]
    assert listed(client, auditor, tracking_no=a, action="consent_revoked") == [of_a[10]]
    assert listed(client, auditor, tracking_no=a, actor_id=world.auditor.id) == of_a[2:7]
    assert listed(client, auditor, tracking_no="RR473124829GB") == []  # a number with none
    assert client.get(VERIFY, headers=auditor).get_json()["intact"] is True


@pytest.mark.parametrize(
    ("username", "status"),
    [
        ("admin", 200),
        ("auditor1", 200),
        ("manager1", 403),
        ("app1", 403),
        ("courier1", 403),
    ],
)
def test_a_parcels_entries_are_read_by_whoever_reads_the_log(
    client: FlaskClient,
    auth: Auth,
    session: Session,
    world: World,
    username: str,
    status: int,
) -> None:
    """As the log's other filters: auditors and admins; a manager may not gather the
    station's parcel's history (its auditors' reads among it) this way either."""
    [number] = parcels(session, world, 1)
    chained(session, {"action": "parcel_read", "subject_type": "parcel", "subject_key": number,
                      "tracking_no": number})  # fmt: skip
    device = "PDA-0001" if username == "courier1" else None
    response = client.get(
        AUDIT, query_string={"tracking_no": number}, headers=auth.headers(username, device)
    )
    assert response.status_code == status
    if status == 200:
        assert [e["tracking_no"] for e in response.get_json()["items"]] == [number]
    else:
        assert response.get_json()["code"] == "role_forbidden"


@pytest.mark.parametrize(
    ("tracking_no", "code"),
    [
        (" - ", "invalid_tracking_no"),  # nothing left once normalized
        ("\u3000\t-", "invalid_tracking_no"),  # an ideographic space is a space too
        ("", "validation_error"),
        ("R" * 41, "validation_error"),
        ("RR\x00473124829GB", "validation_error"),
    ],
    ids=["dashes", "spaces", "empty", "too-long", "nul"],
)
def test_a_tracking_number_that_names_no_parcel_is_422_with_a_code(
    client: FlaskClient, auth: Auth, world: World, tracking_no: str, code: str
) -> None:
    response = client.get(
        AUDIT, query_string={"tracking_no": tracking_no}, headers=auth.headers("auditor1")
    )
    assert response.status_code == 422
    body = response.get_json()
    assert body["code"] == code
    assert "tracking_no" in (body["errors"].get("query") or body["errors"])


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
    by_parcel = f"{AUDIT}?tracking_no=RR473124829GB"  # a parcel's history: a read as any
    for username in ("auditor1", "admin"):
        for url in (AUDIT, VERIFY, by_parcel):
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


def test_a_check_from_a_head_recorded_long_ago_is_bounded_and_goes_on_from_where_it_stopped(
    app_with: Any, session: Session, world: World
) -> None:
    """A head recorded a year ago is a walk of a year of entries, which was not limited
    (only a walk without a head counted): one request held a worker and the database
    for as long as it took, and a script looping from the oldest head it had walked the
    whole log unlimited. Each request now reads at most ``AUDIT_VERIFY_MAX_ENTRIES``
    and says whether it reached the newest entry; the head it reached goes on, and a
    break past the bound is found by the request that reaches it."""
    ids = chained(session, *({"action": "blob_read", "details": {"i": i}} for i in range(7)))
    app: Flask = app_with(AUDIT_VERIFY_MAX_ENTRIES=3, AUDIT_FULL_VERIFICATIONS_PER_USER=None)
    client = app.test_client()
    auditor = Auth(client).headers("auditor1")
    first = client.get(VERIFY, headers=auditor).get_json()
    assert (first["intact"], first["complete"], first["checked"]) == (True, False, 3)
    assert first["head_id"] == ids[2]
    head = {"head_id": first["head_id"], "head_hash": first["head_hash"]}
    second = client.get(VERIFY, query_string=head, headers=auditor).get_json()
    # the head again, and two after it
    assert (second["complete"], second["checked"], second["head_id"]) == (False, 3, ids[4])
    session.execute(AuditEntry.__table__.delete().where(AuditEntry.id == ids[5]))
    session.commit()
    head = {"head_id": second["head_id"], "head_hash": second["head_hash"]}
    third = client.get(VERIFY, query_string=head, headers=auditor).get_json()
    assert (third["intact"], third["broken_id"], third["problem"]) == (
        False,
        ids[6],
        "link_broken",
    )
    whole = app_with(AUDIT_FULL_VERIFICATIONS_PER_USER=None).test_client()
    body = whole.get(VERIFY, headers=Auth(whole).headers("auditor1")).get_json()
    assert (body["complete"], body["checked"], body["broken_id"]) == (True, 6, ids[6])


def test_a_check_of_exactly_the_bound_is_complete(
    app_with: Any, session: Session, world: World
) -> None:
    ids = chained(session, *({"action": "blob_read", "details": {"i": i}} for i in range(3)))
    client = app_with(AUDIT_VERIFY_MAX_ENTRIES=3).test_client()
    body = client.get(VERIFY, headers=Auth(client).headers("auditor1")).get_json()
    assert (body["intact"], body["complete"], body["head_id"]) == (True, True, ids[-1])


def test_the_bound_of_a_check_is_configured(tmp_path: Path) -> None:
    assert load_config({}, tmp_path)["AUDIT_VERIFY_MAX_ENTRIES"] == 100_000
    assert (
        load_config({"AUDIT_VERIFY_MAX_ENTRIES": "5000"}, tmp_path)["AUDIT_VERIFY_MAX_ENTRIES"]
        == 5000
    )


def test_walks_of_the_whole_log_are_limited_per_user_and_free_again_after_the_window(
    app_with: Any, session: Session, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SECURITY.md threat 4: a script verifying the whole log in a loop kept a worker and
    the database busy. Its reader gets ``AUDIT_FULL_VERIFICATIONS_PER_USER`` walks in the
    window, then 429 with Retry-After until the oldest leaves it; another reader and a
    check from a recorded head are not held up."""
    ids = chained(session, *({"action": "blob_read"} for _ in range(3)))
    now = [START]
    monkeypatch.setattr("courier_api.api.audit.routes.utcnow", lambda: now[0])
    app: Flask = app_with(AUDIT_FULL_VERIFICATIONS_PER_USER=Limit.parse("2/600"))
    client = app.test_client()
    auditor, admin = Auth(client).headers("auditor1"), Auth(client).headers("admin")
    assert client.get(VERIFY, headers=auditor).status_code == 200
    now[0] += dt.timedelta(seconds=100)
    first = client.get(VERIFY, headers=auditor)
    assert first.status_code == 200

    refused = client.get(VERIFY, headers=auditor)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "500"
    assert refused.get_json()["code"] == "too_many_verifications"
    assert "head_id and head_hash" in refused.get_json()["message"]
    assert refused.headers["Cache-Control"] == "no-store"
    head = {"head_id": first.get_json()["head_id"], "head_hash": first.get_json()["head_hash"]}
    from_head = client.get(VERIFY, query_string=head, headers=auditor)
    assert (from_head.status_code, from_head.get_json()["head_id"]) == (200, ids[-1])
    assert client.get(VERIFY, headers=admin).status_code == 200  # per user

    now[0] += dt.timedelta(seconds=499)
    assert client.get(VERIFY, headers=auditor).headers["Retry-After"] == "1"
    now[0] += dt.timedelta(seconds=1)  # the first walk leaves the window
    assert client.get(VERIFY, headers=auditor).get_json()["intact"] is True
    assert client.get(VERIFY, headers=auditor).status_code == 429
    # Counted apart from the log, in the sign-in attempts' table: the read is not logged.
    assert session.scalar(select(func.count()).select_from(AuditEntry)) == 3
    walks = select(func.count()).select_from(SignInAttempt)
    assert session.scalar(walks.where(SignInAttempt.outcome == "audit_verify")) == 3


def test_walks_of_the_whole_log_are_limited_by_default_and_may_not_be(tmp_path: Path) -> None:
    name = "AUDIT_FULL_VERIFICATIONS_PER_USER"
    assert load_config({}, tmp_path)[name] == Limit(4, dt.timedelta(hours=1))
    assert load_config({name: "off"}, tmp_path)[name] is None
    with pytest.raises(ConfigError, match=name):
        load_config({name: "4 an hour"}, tmp_path)


LONG_LOG = 1_500  # entries: a check of it costs two of the budget's units of a thousand


def long_log(session: Session) -> list[int]:
    return chained(
        session, *({"action": "blob_read", "details": {"i": i}} for i in range(LONG_LOG))
    )


def head_of(body: dict[str, Any]) -> dict[str, Any]:
    return {"head_id": body["head_id"], "head_hash": body["head_hash"]}


def test_a_check_from_the_first_entrys_head_is_no_way_round_the_limit(
    app_with: Any, session: Session, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a security review (SECURITY.md threat 4): the first entry's head, which
    any reader reads from ``GET /audit``, started a check that walked the whole log and
    counted against nothing: once the walks allowed were spent (429), the same walk
    from that head was answered in full, as often as asked. Every check now spends its
    reader's budget of entries (``AUDIT_VERIFY_ENTRIES_PER_USER``), a head given or not,
    and the walks allowed had spent it."""
    ids = long_log(session)
    now = [START]
    monkeypatch.setattr("courier_api.api.audit.routes.utcnow", lambda: now[0])
    app: Flask = app_with(
        AUDIT_FULL_VERIFICATIONS_PER_USER=Limit.parse("2/600"),
        AUDIT_VERIFY_ENTRIES_PER_USER=Limit.parse("4000/600"),
    )
    client = app.test_client()
    auditor, admin = Auth(client).headers("auditor1"), Auth(client).headers("admin")
    for _ in range(2):
        walk = client.get(VERIFY, headers=auditor).get_json()
        assert (walk["intact"], walk["complete"], walk["checked"]) == (True, True, LONG_LOG)
    assert client.get(VERIFY, headers=auditor).status_code == 429

    [first] = listed(client, auditor, at_to=(START + dt.timedelta(seconds=1)).isoformat())
    assert first["id"] == ids[0]
    from_first = {"head_id": first["id"], "head_hash": first["entry_hash"]}
    refused = client.get(VERIFY, query_string=from_first, headers=auditor)
    assert refused.status_code == 429, refused.get_json()  # was 200: 1,500 entries checked
    assert refused.get_json()["code"] == "too_many_verifications"
    assert "recorded head included" in refused.get_json()["message"]
    assert refused.headers["Retry-After"] == "600"
    # the budget is spent: a check of the newest entry alone waits too
    newest = client.get(VERIFY, query_string=head_of(walk), headers=auditor)
    assert newest.status_code == 429
    assert client.get(VERIFY, query_string=from_first, headers=admin).status_code == 200

    now[0] += dt.timedelta(seconds=600)  # the walks leave the window, and what they spent
    again = client.get(VERIFY, query_string=from_first, headers=auditor).get_json()
    assert (again["intact"], again["complete"], again["checked"]) == (True, True, LONG_LOG)
    spent = select(func.count()).select_from(SignInAttempt)
    # in units of a thousand, the last check's 2: those out of the window are deleted
    assert session.scalar(spent.where(SignInAttempt.outcome == "audit_entries")) == 2
    assert session.scalar(select(func.count()).select_from(AuditEntry)) == LONG_LOG


def test_an_auditor_checks_a_long_log_from_head_to_head_within_the_budget(
    app_with: Any, session: Session, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A log longer than a request reads is checked by checks continued from the head
    each reached: each costs what it reads, so an auditor whose budget covers the log
    checks it whole, and is refused only past it. Operators' ``courier-api audit
    verify`` has no limit, from a head or not."""
    ids = long_log(session)
    now = [START]
    monkeypatch.setattr("courier_api.api.audit.routes.utcnow", lambda: now[0])
    app: Flask = app_with(
        AUDIT_VERIFY_MAX_ENTRIES=1000, AUDIT_VERIFY_ENTRIES_PER_USER=Limit.parse("2000/600")
    )
    client = app.test_client()
    auditor = Auth(client).headers("auditor1")
    body = client.get(VERIFY, headers=auditor).get_json()
    assert (body["complete"], body["checked"], body["head_id"]) == (False, 1000, ids[999])
    body = client.get(VERIFY, query_string=head_of(body), headers=auditor).get_json()
    assert (body["intact"], body["complete"], body["checked"]) == (True, True, 501)
    assert body["head_id"] == ids[-1]
    assert client.get(VERIFY, query_string=head_of(body), headers=auditor).status_code == 429

    cli = app.test_cli_runner()
    first = session.get(AuditEntry, ids[0])
    assert first is not None
    for args in [["audit", "verify"]] * 5 + [
        ["audit", "verify", "--from-head", str(ids[0]), first.entry_hash]
    ] * 5:
        result = cli.invoke(args=args)
        assert result.exit_code == 0, result.output
        assert "audit log intact" in result.output


def test_a_check_the_budget_cuts_short_goes_on_from_its_head_once_the_window_frees_it(
    app_with: Any, session: Session, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check is given no more to read than its reader's budget has left (concurrent
    ones either: each is charged before it reads), and says where it stopped."""
    ids = long_log(session)
    now = [START]
    monkeypatch.setattr("courier_api.api.audit.routes.utcnow", lambda: now[0])
    app: Flask = app_with(AUDIT_VERIFY_ENTRIES_PER_USER=Limit.parse("1000/600"))
    client = app.test_client()
    auditor = Auth(client).headers("auditor1")
    body = client.get(VERIFY, headers=auditor).get_json()
    assert (body["intact"], body["complete"], body["head_id"]) == (True, False, ids[999])
    refused = client.get(VERIFY, query_string=head_of(body), headers=auditor)
    assert (refused.status_code, refused.headers["Retry-After"]) == (429, "600")
    assert client.get(VERIFY, headers=auditor).status_code == 429
    walks = select(func.count()).select_from(SignInAttempt)
    # the walk the budget refused is not one of the walks allowed
    assert session.scalar(walks.where(SignInAttempt.outcome == "audit_verify")) == 1
    now[0] += dt.timedelta(seconds=600)
    body = client.get(VERIFY, query_string=head_of(body), headers=auditor).get_json()
    assert (body["intact"], body["complete"], body["checked"]) == (True, True, 501)


def test_a_budget_smaller_than_a_unit_is_never_overspent(
    app_with: Any, session: Session, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A budget of fewer entries than a unit (``audit.BUDGET_UNIT``) is one unit a
    window, charged as a thousand, but its reader reads no more than the entries
    configured: 300 an hour read 1,000 with the unit's worth of reading."""
    ids = long_log(session)
    now = [START]
    monkeypatch.setattr("courier_api.api.audit.routes.utcnow", lambda: now[0])
    app: Flask = app_with(AUDIT_VERIFY_ENTRIES_PER_USER=Limit.parse("300/600"))
    client = app.test_client()
    auditor = Auth(client).headers("auditor1")
    body = client.get(VERIFY, headers=auditor).get_json()
    assert (body["intact"], body["complete"], body["checked"]) == (True, False, 300)
    assert body["head_id"] == ids[299]
    assert client.get(VERIFY, query_string=head_of(body), headers=auditor).status_code == 429
    now[0] += dt.timedelta(seconds=600)
    body = client.get(VERIFY, query_string=head_of(body), headers=auditor).get_json()
    assert (body["complete"], body["checked"], body["head_id"]) == (False, 300, ids[598])


def test_the_entries_verified_are_limited_by_default_and_may_not_be(tmp_path: Path) -> None:
    name = "AUDIT_VERIFY_ENTRIES_PER_USER"
    assert load_config({}, tmp_path)[name] == Limit(400_000, dt.timedelta(hours=1))
    assert load_config({name: "off"}, tmp_path)[name] is None
    with pytest.raises(ConfigError, match=name):
        load_config({name: "400000 an hour"}, tmp_path)


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


def test_a_lost_parcels_history_has_the_close_the_reopening_and_the_decision_on_it(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """An auditor settles a dispute about parcel b, missing at a handover a manager
    closed for the courier and signed off, then returned late. ``GET /audit?
    tracking_no=b`` listed the sign-off (its balance names b) but not the close that
    decided the shift's seqs, nor the reopening b's late return made, nor the manager's
    resolution of the shift's ``late_event_after_signoff`` flag citing that return:
    those entries named no parcel. The close is filed under every parcel of the shift
    (a's too), the reopening and the decision under the late events' parcels (b only).
    """
    a, b = parcels(session, world, 2)
    pda = Courier(client, auth, "courier1", "PDA-0001")
    manager, auditor = auth.headers("manager1"), auth.headers("auditor1")
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b), pda.event(a, "delivered")])
    closed = client.post(f"/api/v1/shifts/{shift['id']}/close", json={}, headers=manager)
    assert closed.status_code == 200, closed.get_json()
    assert sign_off(client, shift["id"], manager, note="b missing").status_code == 200
    pda.push([pda.event(b, "returned_to_station", shift_id=shift["id"])])

    def shift_entries(number: str) -> list[str]:
        return [
            e["action"]
            for e in listed(client, auditor, tracking_no=number)
            if (e["subject_type"], e["subject_key"]) == ("shift", str(shift["id"]))
        ]

    assert shift_entries(b) == ["shift_reopened", "shift_signed_off", "shift_closed_for_courier"]
    assert shift_entries(a) == ["shift_signed_off", "shift_closed_for_courier"]
    # The manager's word on the late return, a decision on the shift's flag citing it,
    # is in b's history too.
    [late] = client.get(
        FLAGS,
        query_string={"shift_id": shift["id"], "kind": "late_event_after_signoff"},
        headers=manager,
    ).json["items"]
    resolved = client.post(
        f"{FLAGS}/{late['id']}/resolve", json={"note": "b came back, checked"}, headers=manager
    )
    assert resolved.status_code == 200, resolved.get_json()

    def late_flag_entries(number: str) -> list[tuple[str, int | None]]:
        return [
            (e["action"], e["actor_id"])
            for e in listed(client, auditor, tracking_no=number)
            if (e["subject_type"], e["subject_key"]) == ("flag", str(late["id"]))
        ]

    assert late_flag_entries(b) == [("flag_resolved", world.manager.id)]
    assert late_flag_entries(a) == []


def test_entries_a_request_writes_keep_where_it_came_from_and_the_chain_verifies(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """An auditor settling a dispute asks where a read came from; the log named who and
    when only. An entry a request writes keeps its client's address (``client_ip``,
    hashed with it), shown by ``GET /audit``; an entry without one (written before, or
    by the command line) still verifies beside it."""
    chained(session, {"action": "blob_read", "subject_type": "blob", "subject_key": "old",
                      "details": {}})  # fmt: skip
    a, b = parcels(session, world, 2)
    pda = Courier(client, auth, "courier1", "PDA-0001")
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b), pda.event(a, "delivered")])
    auditor = auth.headers("auditor1")
    read = client.get(
        f"/api/v1/parcels/{a}", headers=auditor, environ_base={"REMOTE_ADDR": "203.0.113.7"}
    )
    assert read.status_code == 200, read.get_json()
    assert shift["id"]
    entries = listed(client, auditor, action="parcel_read")
    assert [e["client_ip"] for e in entries] == ["203.0.113.7"]
    old = listed(client, auditor, action="blob_read")
    assert [(e["subject_key"], e["client_ip"]) for e in old] == [("old", None)]
    verified = client.get(f"{AUDIT}/verify", headers=auditor)
    assert verified.status_code == 200, verified.get_json()
    assert verified.get_json()["intact"] is True
    session.expire_all()
    stored = session.scalars(select(AuditEntry).where(AuditEntry.action == "parcel_read")).one()
    assert stored.client_ip == "203.0.113.7"
    assert audit.CLIENT_IP.get() is None  # not carried past the request
