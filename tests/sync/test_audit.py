"""The hash-chained audit log: appends chain, verify names the first altered or missing entry."""

import json
import threading

import pytest
from flask import Flask
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from courier_api.extensions import db
from models import AuditEntry
from sync import audit


def add(session: Session, n: int, *, action: str = "blob_read") -> list[AuditEntry]:
    entries = [
        audit.append(
            session=session,
            actor_id=None,
            action=action,
            subject_type="blob",
            subject_key=f"{i:064x}",
            details={"i": i, "note": "read for case 7", "ids": [3, 1, 2]},
        )
        for i in range(n)
    ]
    session.commit()
    return entries


def tamper_details(session: Session, entry_id: int, details: dict[str, object]) -> None:
    """Change a row behind the service's back, as someone with database access could."""
    postgres = session.get_bind().dialect.name == "postgresql"
    value = "CAST(:details AS jsonb)" if postgres else ":details"
    session.execute(
        text(f"UPDATE audit_entry SET details = {value} WHERE id = :id"),
        {"details": json.dumps(details), "id": entry_id},
    )


def test_a_clean_chain_verifies(session: Session) -> None:
    entries = add(session, 5)
    assert entries[0].prev_hash == "0" * 64
    assert [e.prev_hash for e in entries[1:]] == [e.entry_hash for e in entries[:-1]]
    result = audit.verify(session=session)
    assert result.ok, result.message
    assert (result.checked, result.head_id, result.head_hash) == (
        5,
        entries[-1].id,
        entries[-1].entry_hash,
    )


def test_an_empty_log_verifies(session: Session) -> None:
    result = audit.verify(session=session)
    assert result.ok and result.checked == 0 and result.head_id is None


def test_a_row_changed_with_sql_is_named(session: Session) -> None:
    entries = add(session, 5)
    tamper_details(session, entries[2].id, {"i": 2, "note": "nothing to see", "ids": [3, 1, 2]})
    result = audit.verify(session=session)
    assert not result.ok
    assert (result.broken_id, result.problem) == (entries[2].id, "altered")
    assert f"entry {entries[2].id}" in result.message and "altered" in result.message
    assert result.head_id == entries[1].id  # the last entry that still checks out


def test_a_changed_row_given_a_fresh_hash_breaks_the_next_link(session: Session) -> None:
    entries = add(session, 4)
    victim = entries[1]
    forged = {"i": 1, "note": "forged", "ids": [3, 1, 2]}
    tamper_details(session, victim.id, forged)
    rehashed = audit.entry_hash(
        prev_hash=victim.prev_hash,
        at=victim.at,
        actor_id=None,
        action=victim.action,
        subject_type=victim.subject_type,
        subject_key=victim.subject_key,
        details=forged,
    )
    session.execute(
        text("UPDATE audit_entry SET entry_hash = :h WHERE id = :id"),
        {"h": rehashed, "id": victim.id},
    )
    result = audit.verify(session=session)
    assert (result.broken_id, result.problem) == (entries[2].id, "link_broken")
    assert f"entry {victim.id}" in result.message


@pytest.mark.parametrize("position", [0, 2], ids=["first", "middle"])
def test_a_deleted_row_is_named_by_the_entry_after_it(session: Session, position: int) -> None:
    entries = add(session, 5)
    session.execute(text("DELETE FROM audit_entry WHERE id = :id"), {"id": entries[position].id})
    result = audit.verify(session=session)
    assert (result.broken_id, result.problem) == (entries[position + 1].id, "link_broken")
    assert "removed" in result.message
    assert result.checked == position + 1


def test_verify_streams_in_chunks_and_reports_progress(session: Session) -> None:
    add(session, 7)
    seen: list[int] = []
    result = audit.verify(session=session, progress=seen.append, progress_every=3, chunk_size=2)
    assert result.ok and result.checked == 7
    assert seen == [3, 6]


def test_details_are_stored_as_they_will_be_read_back(session: Session) -> None:
    entry = audit.append(
        session=session,
        actor_id=None,
        action="proof_read",
        subject_type="parcel",
        subject_key="RR473124829GB",
        details={"ids": (1, 2), 7: "seven", "nested": {"b": None, "a": True}},
    )
    session.commit()
    session.expire_all()
    assert session.get(AuditEntry, entry.id).details == {
        "ids": [1, 2],
        "7": "seven",
        "nested": {"b": None, "a": True},
    }
    assert audit.verify(session=session).ok


@pytest.mark.parametrize("details", [{"x": 1.5}, {"x": [{"y": 1e20}]}, {"x": float("nan")}])
def test_floats_are_refused_because_jsonb_may_respell_them(
    session: Session, details: dict[str, object]
) -> None:
    with pytest.raises(ValueError):
        audit.append(
            session=session,
            actor_id=None,
            action="x",
            subject_type="x",
            subject_key="x",
            details=details,
        )


def test_concurrent_appends_never_chain_off_the_same_entry(committed_app: Flask) -> None:
    """Real commits from several threads: every append sees the one committed before it."""
    engine = db.engine_of(committed_app)
    threads_count, per_thread = 6, 5
    barrier = threading.Barrier(threads_count)
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                with Session(engine) as session:
                    audit.append(
                        session=session,
                        actor_id=None,
                        action="blob_read",
                        subject_type="blob",
                        subject_key=f"{index}-{i}",
                        details={},
                    )
                    session.commit()
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    with Session(engine) as session:
        result = audit.verify(session=session)
        prev_hashes = session.scalars(select(AuditEntry.prev_hash)).all()
    assert result.ok, result.message
    assert result.checked == threads_count * per_thread
    assert len(set(prev_hashes)) == len(prev_hashes)
