"""The audit log from outside: auditors' blob reads land in it; `audit verify` checks it."""

import datetime as dt
import hashlib
import io
from typing import Any

import pytest
from flask.testing import FlaskClient, FlaskCliRunner
from PIL import Image
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from models import AuditEntry
from sync import audit
from tests.conftest import Auth, World


def append(session: Session, n: int) -> list[AuditEntry]:
    entries = [
        audit.append(
            session=session,
            actor_id=None,
            action="proof_read",
            subject_type="parcel",
            subject_key=f"RR{i:09d}GB",
            details={"i": i},
        )
        for i in range(n)
    ]
    session.commit()
    return entries


def test_an_intact_log_exits_0_and_names_its_head(
    runner: FlaskCliRunner, session: Session
) -> None:
    entries = append(session, 3)
    result = runner.invoke(args=["audit", "verify"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        f"audit log intact: 3 entries; head: entry {entries[-1].id} {entries[-1].entry_hash}"
    )


def test_an_empty_log_exits_0(runner: FlaskCliRunner, session: Session) -> None:
    result = runner.invoke(args=["audit", "verify"])
    assert result.exit_code == 0, result.output
    assert "empty" in result.output


def test_an_altered_entry_exits_1_naming_it(runner: FlaskCliRunner, session: Session) -> None:
    entries = append(session, 4)
    session.execute(
        text("UPDATE audit_entry SET subject_key = 'RR999999999GB' WHERE id = :id"),
        {"id": entries[1].id},
    )
    session.commit()
    result = runner.invoke(args=["audit", "verify"])
    assert result.exit_code == 1
    assert f"BROKEN: entry {entries[1].id}:" in result.stdout
    assert "altered" in result.stdout


@pytest.mark.parametrize(
    ("column", "scribble"),
    [
        ("at", "yesterday"),
        ("details", '{"i": 1'),
        ("details", "[" * 100_000 + "]" * 100_000),  # past Python's recursion limit
    ],
)
def test_an_entry_scribbled_over_with_what_cannot_be_read_is_named_not_a_crash(
    runner: FlaskCliRunner, session: Session, column: str, scribble: str
) -> None:
    """SQLite keeps any text in any column: an entry whose time or details no longer
    parse is named as altered, and the walk does not end in a decoding error.
    (PostgreSQL reads 'yesterday' as a time, which then differs from the hashed one,
    and refuses JSON that does not parse or nests that deep.)"""
    entries = append(session, 4)
    update = text(f"UPDATE audit_entry SET {column} = :scribble WHERE id = :id")
    if session.get_bind().dialect.name == "postgresql" and column == "details":
        with pytest.raises(DBAPIError):
            session.execute(update, {"scribble": scribble, "id": entries[1].id})
        return
    session.execute(update, {"scribble": scribble, "id": entries[1].id})
    session.commit()
    result = runner.invoke(args=["audit", "verify"])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code == 1
    assert f"BROKEN: entry {entries[1].id}:" in result.stdout
    assert "altered" in result.stdout


def test_a_deleted_entry_exits_1_naming_the_entry_after_it(
    runner: FlaskCliRunner, session: Session
) -> None:
    entries = append(session, 4)
    session.execute(text("DELETE FROM audit_entry WHERE id = :id"), {"id": entries[2].id})
    session.commit()
    result = runner.invoke(args=["audit", "verify"])
    assert result.exit_code == 1
    assert f"BROKEN: entry {entries[3].id}:" in result.stdout
    assert f"hash of entry {entries[1].id}" in result.stdout and "removed" in result.stdout


def test_from_the_head_an_earlier_run_printed_only_the_newer_entries_are_read(
    runner: FlaskCliRunner, session: Session
) -> None:
    append(session, 3)
    first = runner.invoke(args=["audit", "verify"])
    assert first.exit_code == 0, first.output
    head_id, head_hash = first.stdout.split("head: entry ")[1].split()
    newer = append(session, 2)
    result = runner.invoke(args=["audit", "verify", "--from-head", head_id, head_hash])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        f"audit log intact: 3 entries from entry {head_id}; "
        f"head: entry {newer[-1].id} {newer[-1].entry_hash}"
    )


def test_counts_name_one_entry_and_a_head_with_nothing_after_it(
    runner: FlaskCliRunner, session: Session
) -> None:
    """An operator re-checking the head with nothing appended since is told so, not
    "1 entries": the head itself is the only entry read. Every count a run prints is
    "1 entry", "N entries"."""
    (entry,) = append(session, 1)
    whole = runner.invoke(args=["audit", "verify"])
    assert (
        whole.stdout == f"audit log intact: 1 entry; head: entry {entry.id} {entry.entry_hash}\n"
    )
    again = runner.invoke(args=["audit", "verify", "--from-head", str(entry.id), entry.entry_hash])
    assert again.exit_code == 0, again.output
    assert again.stdout == (
        f"audit log intact: entry {entry.id} still carries the hash recorded for it, and no "
        f"entry was appended after it; head: entry {entry.id} {entry.entry_hash}\n"
    )
    newer = append(session, 1)[0]
    bounded = runner.invoke(
        args=[
            "audit",
            "verify",
            "--from-head",
            str(entry.id),
            entry.entry_hash,
            "--max-entries",
            "1",
        ]
    )
    assert bounded.stdout.startswith(
        f"audit log intact so far: 1 entry from entry {entry.id}, through entry {entry.id} of "
        f"{newer.id}; NOT checked to the end"
    )
    session.execute(text("UPDATE audit_entry SET action = 'x' WHERE id = :id"), {"id": entry.id})
    session.commit()
    broken = runner.invoke(args=["audit", "verify"])
    assert broken.exit_code == 1
    assert broken.stdout.rstrip().endswith("(1 entry read)")


def test_the_newest_entries_removed_exit_1_from_the_head_recorded(
    runner: FlaskCliRunner, session: Session
) -> None:
    entries = append(session, 4)
    session.execute(text("DELETE FROM audit_entry WHERE id >= :id"), {"id": entries[2].id})
    session.commit()
    assert runner.invoke(args=["audit", "verify"]).exit_code == 0  # no link breaks
    head = entries[-1]
    result = runner.invoke(args=["audit", "verify", "--from-head", str(head.id), head.entry_hash])
    assert result.exit_code == 1
    assert result.stdout.startswith(f"audit log BROKEN: entry {head.id}, the head recorded,")


def test_a_head_that_is_not_a_hash_is_refused_with_a_message(
    runner: FlaskCliRunner, session: Session
) -> None:
    result = runner.invoke(args=["audit", "verify", "--from-head", "3", "not-a-hash"])
    assert result.exit_code == 1
    assert "head_hash must be 64 hexadecimal digits" in result.output
    assert "Traceback" not in result.output


def test_progress_every_10000_entries(runner: FlaskCliRunner, session: Session) -> None:
    """A long log, chained here in bulk (appending one by one would take a while)."""
    rows: list[dict[str, Any]] = []
    prev, start = audit.GENESIS_HASH, dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    for i in range(10_001):
        row = {
            "at": start + dt.timedelta(seconds=i),
            "actor_id": None,
            "action": "blob_read",
            "subject_type": "blob",
            "subject_key": f"{i:064x}",
            "details": {"i": i},
            "prev_hash": prev,
        }
        row["entry_hash"] = prev = audit.entry_hash(**row)
        rows.append(row)
    session.execute(insert(AuditEntry), rows)
    session.commit()
    newest = session.scalar(select(func.max(AuditEntry.id)))
    result = runner.invoke(args=["audit", "verify"])
    assert result.exit_code == 0, result.output
    # how far along, too: a long walk says how much is left
    assert result.stderr == f"checked 10,000 entries, through entry {newest - 1} of {newest}\n"
    assert result.stdout.startswith("audit log intact: 10,001 entries;")


def test_a_run_bounded_by_max_entries_says_where_to_go_on_from(
    runner: FlaskCliRunner, session: Session
) -> None:
    """A head recorded long ago leaves every entry appended since to read in one run:
    --max-entries stops after so many, says the check did not reach the end, and names
    the head to go on from; the run from it reaches the end."""
    for i in range(5):
        audit.append(
            session=session,
            actor_id=None,
            action="blob_read",
            subject_type="blob",
            subject_key=str(i),
            details={},
        )
    session.commit()
    ids = list(session.scalars(select(AuditEntry.id).order_by(AuditEntry.id)))
    stopped = runner.invoke(args=["audit", "verify", "--max-entries", "3"])
    assert stopped.exit_code == 0, stopped.output
    head = session.get(AuditEntry, ids[2])
    assert head is not None
    assert stopped.stdout == (
        f"audit log intact so far: 3 entries, through entry {ids[2]} of {ids[-1]}; NOT checked "
        f"to the end: go on with --from-head {ids[2]} {head.entry_hash}\n"
    )
    rest = runner.invoke(
        args=["audit", "verify", "--from-head", str(ids[2]), head.entry_hash, "--max-entries", "3"]
    )
    assert rest.exit_code == 0, rest.output
    assert rest.stdout.startswith(f"audit log intact: 3 entries from entry {ids[2]}; head: entry")
    assert runner.invoke(args=["audit", "verify", "--max-entries", "0"]).exit_code == 2


# -- auditors' reads of proof images ----------------------------------------------------------


@pytest.fixture
def image(client: FlaskClient, auth: Auth, world: World) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (0, 90, 200)).save(buffer, format="PNG")
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    response = client.put(
        f"/api/v1/blobs/{digest}",
        data=data,
        content_type="image/png",
        headers=auth.headers("courier1", "PDA-0001"),
    )
    assert response.status_code == 201
    return digest


def test_every_auditor_read_of_an_image_is_logged(
    client: FlaskClient, auth: Auth, session: Session, world: World, image: str
) -> None:
    for _ in range(2):
        response = client.get(f"/api/v1/blobs/{image}", headers=auth.headers("auditor1"))
        assert response.status_code == 200
    entries = session.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
    assert [(e.action, e.actor_id, e.subject_type, e.subject_key) for e in entries] == [
        ("blob_read", world.auditor.id, "blob", image)
    ] * 2
    assert entries[0].details == {"media_type": "image/png", "size_bytes": len(response.data)}
    assert audit.verify(session=session).ok


@pytest.mark.parametrize("username", ["admin", "manager1", "courier1"])
def test_reads_by_others_are_not_logged(
    client: FlaskClient, auth: Auth, session: Session, image: str, username: str
) -> None:
    device = "PDA-0001" if username == "courier1" else None
    response = client.get(f"/api/v1/blobs/{image}", headers=auth.headers(username, device))
    assert response.status_code == 200
    assert session.scalars(select(AuditEntry)).all() == []


def test_a_refused_auditor_read_is_not_logged(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    response = client.get(f"/api/v1/blobs/{'ab' * 32}", headers=auth.headers("auditor1"))
    assert response.status_code == 404
    assert session.scalars(select(AuditEntry)).all() == []
