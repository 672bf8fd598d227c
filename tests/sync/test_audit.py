"""The hash-chained audit log: appends chain, verify names the first altered or missing entry."""

import hashlib
import json
import threading

import pytest
from flask import Flask
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from courier_api.extensions import db
from models import AuditEntry
from sync import audit
from sync.errors import InvalidInput


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
    seen: list[tuple[int, int]] = []
    result = audit.verify(
        session=session,
        progress=lambda *at: seen.append(at),
        progress_every=3,
        chunk_size=2,
    )
    assert result.ok and result.checked == 7 and result.complete
    ids = list(session.scalars(select(AuditEntry.id).order_by(AuditEntry.id)))
    assert seen == [(3, ids[2]), (6, ids[5])]


def test_verify_reads_at_most_its_limit_and_says_it_stopped(session: Session) -> None:
    add(session, 5)
    ids = list(session.scalars(select(AuditEntry.id).order_by(AuditEntry.id)))
    stopped = audit.verify(session=session, limit=2)
    assert (stopped.ok, stopped.complete, stopped.checked, stopped.head_id) == (
        True,
        False,
        2,
        ids[1],
    )
    assert stopped.head_hash is not None
    head = audit.Head(id=ids[1], hash=stopped.head_hash)
    rest = audit.verify(session=session, from_head=head, limit=4)
    assert (rest.complete, rest.checked, rest.head_id) == (True, 4, ids[-1])


def head_of(entry: AuditEntry) -> audit.Head:
    return audit.Head(id=entry.id, hash=entry.entry_hash)


def rehash_from(session: Session, entries: list[AuditEntry], start: int) -> None:
    """Re-hash the chain from ``entries[start]`` on, as someone covering an alteration
    with database access would: every link checks out again."""
    prev = entries[start].prev_hash
    for entry in entries[start:]:
        session.refresh(entry)
        fresh = audit.entry_hash(
            prev_hash=prev,
            at=entry.at,
            actor_id=entry.actor_id,
            action=entry.action,
            subject_type=entry.subject_type,
            subject_key=entry.subject_key,
            details=entry.details,
        )
        session.execute(
            text("UPDATE audit_entry SET prev_hash = :p, entry_hash = :h WHERE id = :id"),
            {"p": prev, "h": fresh, "id": entry.id},
        )
        prev = fresh


def test_from_a_recorded_head_only_that_entry_and_the_later_ones_are_read(
    session: Session,
) -> None:
    entries = add(session, 6)
    result = audit.verify(session=session, from_head=head_of(entries[3]))
    assert result.ok, result.message
    assert (result.checked, result.head_id, result.head_hash) == (
        3,
        entries[-1].id,
        entries[-1].entry_hash,
    )


def test_from_the_newest_entry_nothing_new_checks_out_as_that_head(session: Session) -> None:
    entries = add(session, 3)
    result = audit.verify(session=session, from_head=head_of(entries[-1]))
    assert result.ok and result.checked == 1
    assert (result.head_id, result.head_hash) == (entries[-1].id, entries[-1].entry_hash)


def test_the_newest_entries_removed_are_named_by_the_recorded_head(session: Session) -> None:
    """No link breaks when the tail goes, so a full walk calls the log intact; the head
    recorded before says otherwise."""
    entries = add(session, 5)
    head = head_of(entries[-1])
    session.execute(text("DELETE FROM audit_entry WHERE id >= :id"), {"id": entries[3].id})
    assert audit.verify(session=session).ok
    result = audit.verify(session=session, from_head=head)
    assert (result.ok, result.broken_id, result.problem) == (False, head.id, "head_missing")
    assert result.checked == 0 and result.head_id is None
    assert f"entry {head.id}" in result.message and "removed" in result.message


def test_a_recorded_head_removed_from_the_middle_is_missing_too(session: Session) -> None:
    entries = add(session, 5)
    session.execute(text("DELETE FROM audit_entry WHERE id = :id"), {"id": entries[2].id})
    result = audit.verify(session=session, from_head=head_of(entries[2]))
    assert (result.broken_id, result.problem) == (entries[2].id, "head_missing")


def test_an_entry_before_the_head_altered_and_the_chain_rehashed_is_caught(
    session: Session,
) -> None:
    """Re-hashed from the altered entry on, every link checks out and a full walk finds
    nothing; the recorded head's hash changed with it."""
    entries = add(session, 5)
    head = head_of(entries[3])
    tamper_details(session, entries[1].id, {"i": 1, "note": "forged", "ids": [3, 1, 2]})
    rehash_from(session, entries, 1)
    assert audit.verify(session=session).ok
    result = audit.verify(session=session, from_head=head)
    assert (result.broken_id, result.problem, result.checked) == (head.id, "head_changed", 1)
    assert "re-hashed" in result.message and result.head_id is None


def test_a_check_from_a_head_vouches_for_the_entries_from_it_on_only(session: Session) -> None:
    """An entry before the head altered in place (its hash left as it was) changes
    neither the head nor what follows it: a check from the head reads from there and
    says intact of what it read (``checked``), as README and SECURITY.md now say; the
    walk of the whole log names the entry."""
    entries = add(session, 5)
    head = head_of(entries[3])
    tamper_details(session, entries[0].id, {"i": 0, "note": "forged"})
    from_head = audit.verify(session=session, from_head=head)
    assert (from_head.ok, from_head.checked, from_head.head_id) == (True, 2, entries[4].id)
    whole = audit.verify(session=session)
    assert (whole.broken_id, whole.problem) == (entries[0].id, "altered")


@pytest.mark.parametrize("offset", [0, 1], ids=["the head", "after it"])
def test_an_entry_from_the_head_on_altered_is_named(session: Session, offset: int) -> None:
    entries = add(session, 5)
    victim = entries[2 + offset]
    tamper_details(session, victim.id, {"i": -1})
    result = audit.verify(session=session, from_head=head_of(entries[2]))
    assert (result.broken_id, result.problem, result.checked) == (victim.id, "altered", 1 + offset)


def test_an_entry_after_the_head_removed_breaks_the_next_link(session: Session) -> None:
    entries = add(session, 5)
    session.execute(text("DELETE FROM audit_entry WHERE id = :id"), {"id": entries[3].id})
    result = audit.verify(session=session, from_head=head_of(entries[2]))
    assert (result.broken_id, result.problem) == (entries[4].id, "link_broken")
    assert (result.head_id, result.checked) == (entries[2].id, 2)


@pytest.mark.parametrize(
    ("head_id", "head_hash", "code"),
    [
        (7, None, "head_hash_required"),
        (None, "a" * 64, "head_id_required"),
        (7, "g" * 64, "invalid_head_hash"),
        (7, "a" * 63, "invalid_head_hash"),
    ],
)
def test_a_recorded_head_needs_both_halves_and_a_hash(
    head_id: int | None, head_hash: str | None, code: str
) -> None:
    with pytest.raises(InvalidInput) as refused:
        audit.recorded_head(head_id, head_hash)
    assert refused.value.code == code


def test_a_recorded_head_is_read_whatever_the_case_of_its_hash() -> None:
    assert audit.recorded_head(7, "AB" * 32) == audit.Head(id=7, hash="ab" * 32)
    assert audit.recorded_head(None, None) is None


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


def test_an_entry_held_for_the_commit_outlives_a_savepoint_rolled_back_after_it(
    session: Session,
) -> None:
    """``append_at_commit`` holds an entry until the transaction commits (a system change
    of a flag's status). A savepoint rolled back after it (a flag raised by a concurrent
    transaction a moment ago, its insert undone) undoes nothing of the entry's change;
    an entry held inside that savepoint goes with it."""

    def held(key: str) -> None:
        audit.append_at_commit(
            session=session,
            actor_id=None,
            action="flag_status_changed",
            subject_type="flag",
            subject_key=key,
            details={},
        )

    session.execute(select(1))  # the transaction begun
    held("before")
    with pytest.raises(InvalidInput), session.begin_nested():
        held("undone")
        raise InvalidInput("undone with its savepoint")
    with session.begin_nested():
        held("released")
    session.commit()
    keys = session.scalars(select(AuditEntry.subject_key).order_by(AuditEntry.id)).all()
    assert keys == ["before", "released"]


def test_entries_keep_their_clients_address_in_their_hash_and_old_ones_still_verify(
    session: Session,
) -> None:
    """A dispute asks where a read came from; the log said who and when only. An entry
    appended while a client's address is known (``CLIENT_IP``, set by the web edge)
    keeps it, in its hash; one without (every entry written before, the command line's)
    hashes the document it always did, so a log of both verifies, and an address put
    on an old entry, changed on a new one or taken off it reads as altered."""
    old = add(session, 2)
    token = audit.CLIENT_IP.set(audit.client_ip(" 2001:DB8::0:1 "))
    try:
        new = add(session, 2)
    finally:
        audit.CLIENT_IP.reset(token)
    assert [e.client_ip for e in old + new] == [None, None, "2001:db8::1", "2001:db8::1"]
    # The old document, unchanged: seven fields, no address.
    first = old[0]
    document = [first.prev_hash, audit.iso(first.at), None, first.action, first.subject_type,
                first.subject_key, first.details]  # fmt: skip
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert first.entry_hash == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    assert new[0].entry_hash != audit.entry_hash(
        prev_hash=new[0].prev_hash, at=new[0].at, actor_id=None, action=new[0].action,
        subject_type=new[0].subject_type, subject_key=new[0].subject_key,
        details=new[0].details,
    )  # fmt: skip
    result = audit.verify(session=session)
    assert result.ok and result.checked == 4, result.message
    for victim, address in ((old[1], "192.0.2.9"), (new[0], "192.0.2.9"), (new[1], None)):
        kept = victim.client_ip
        session.execute(
            text("UPDATE audit_entry SET client_ip = :ip WHERE id = :id"),
            {"ip": address, "id": victim.id},
        )
        result = audit.verify(session=session)
        assert (result.broken_id, result.problem) == (victim.id, "altered"), address
        session.execute(
            text("UPDATE audit_entry SET client_ip = :ip WHERE id = :id"),
            {"ip": kept, "id": victim.id},
        )
    assert audit.verify(session=session).ok


@pytest.mark.parametrize(
    ("sent", "kept"),
    [("203.0.113.7", "203.0.113.7"), ("::ffff:203.0.113.7", "203.0.113.7"),
     ("::FFFF:CB00:7107", "203.0.113.7"), ("0:0:0:0:0:ffff:203.0.113.7", "203.0.113.7"),
     ("2001:DB8::0:1", "2001:db8::1"),
     (None, None), ("", None), ("unknown", None), ("203.0.113.7, 10.0.0.1", None)],
)  # fmt: skip
def test_a_clients_address_is_kept_in_one_spelling_or_not_at_all(
    sent: str | None, kept: str | None
) -> None:
    """An IPv4 client reached over IPv6 (``::ffff:203.0.113.7``, as a dual-stack
    listener gives it) is kept by its IPv4 address, as it is over IPv4: its IPv6
    spelling differed between Python versions (``::ffff:cb00:7107`` up to 3.12), and
    neither was found by an auditor searching for ``203.0.113.7``."""
    assert audit.client_ip(sent) == kept
