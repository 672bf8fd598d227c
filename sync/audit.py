"""The append-only, hash-chained audit log (DESIGN.md "Audit log").

Each entry's ``entry_hash`` is the sha256 of a canonical JSON document holding its
content and ``prev_hash``, the hash of the entry before it (64 zeros for the
first), and the address of the client whose request wrote it when there was one
(``client_ip``; entries written before it was kept, and those of the command line and
the scheduler, hash the document they always did). Changing a row breaks its own hash;
removing one breaks the next entry's link; ``verify`` walks the log in id order and
names the first entry where either happens. Removing the newest entries leaves no
broken link: compare the head that ``verify`` reports with one recorded earlier to
catch that.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import hashlib
import ipaddress
import json
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, Text, event, func, select, text, type_coerce, union_all
from sqlalchemy.orm import Session, SessionTransaction

from models import AuditEntry, AuditEntryParcel, QuarantinedEvent, ScanEvent, utcnow
from sync import sign_in_limits
from sync.errors import InvalidInput
from sync.paging import MAX_PAGE_SIZE
from sync.sign_in_limits import Limit
from sync.sql import among_at_once
from sync.tracking import normalize

GENESIS_HASH = "0" * 64
# Key of the PostgreSQL advisory lock that serializes appends (any fixed 64-bit number
# that no other lock of this database uses; this one spells "audit" in ASCII).
APPEND_LOCK_KEY = 0x6175646974
VERIFY_CHUNK = 1000  # rows fetched at a time while verifying
MAX_TRACKING_NO = 40  # characters: AuditEntry.tracking_no, as every table keeps one
PROGRESS_EVERY = 10_000
_DEFERRED = "audit_deferred"  # session.info key: the entries ``deferred`` holds back
_AT_COMMIT = "audit_at_commit"  # and those ``append_at_commit`` holds for the commit
MAX_CLIENT_IP = 64  # characters: AuditEntry.client_ip (an IPv6 address with its zone)
# The address of the client whose request is being served, set by the web edge for the
# request's length (``courier_api.app``); None outside one (the command line, the
# scheduler). Every entry appended meanwhile keeps it, in its hash (``entry_hash``).
CLIENT_IP: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "audit_client_ip", default=None
)


def client_ip(address: str | None) -> str | None:
    """``address`` (a request's remote address) as an entry keeps it: an IP address in
    its one spelling (``ipaddress``), or None for anything else (none, a proxy's header
    that names no address).

    An IPv4 client reached through an IPv6 socket (a dual-stack listener, or a proxy's
    header naming it so: ``::ffff:203.0.113.7``) is kept by its IPv4 address: it is
    that client, and ``ipaddress`` spells the mapped form as ``::ffff:cb00:7107`` up to
    Python 3.12 and ``::ffff:203.0.113.7`` from 3.13, neither of which an auditor
    looking for ``203.0.113.7`` (the client's entries over IPv4, a ticket) would find."""
    try:
        parsed = ipaddress.ip_address((address or "").strip())
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    spelled = str(parsed)
    return spelled if len(spelled) <= MAX_CLIENT_IP else None


def entry_hash(
    *,
    prev_hash: str,
    at: dt.datetime,
    actor_id: int | None,
    action: str,
    subject_type: str,
    subject_key: str,
    details: dict[str, Any],
    client_ip: str | None = None,
) -> str:
    """The hash an entry with this content, chained after ``prev_hash``, must carry.

    ``client_ip``, when the entry has one, is hashed after the rest; an entry without
    one (all those written before it was kept, migration ``f4a8c2e6b1d3``) hashes the
    document it always did, so every existing hash still verifies, and an address
    removed from an entry, or put on one, changes the hash verified."""
    document: list[Any] = [
        prev_hash,
        iso(at),
        actor_id,
        action,
        subject_type,
        subject_key,
        details,
    ]
    if client_ip is not None:
        document.append(client_ip)
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def append(
    *,
    session: Session,
    actor_id: int | None,
    action: str,
    subject_type: str,
    subject_key: str,
    details: dict[str, Any],
    tracking_no: str | None = None,
    parcels: Iterable[str] = (),
) -> AuditEntry:
    """Add an entry after the newest one, in the caller's transaction.

    ``tracking_no`` names the parcel the entry is about, when it is about one (its
    proof read, its consent granted, a decision on its flag, ...); ``parcels`` the
    parcels it concerns when it is about several (a sign-off's manifest, the proofs a
    search showed). ``GET /audit?tracking_no=`` finds the entry by any of them. They
    are kept beside the entry, not in its hash (``AuditEntry.tracking_no``,
    ``AuditEntryParcel``).

    Appends are serialized so that two of them never chain off the same entry: on
    PostgreSQL by a transaction-scoped advisory lock taken before the newest entry
    is read (held until the caller commits), on SQLite by its single writer. The
    unique index on ``entry_hash`` is the backstop. Inside ``deferred`` the entry is
    chained when it ends (its id and hash are set then).
    """
    entry = _entry(actor_id, action, subject_type, subject_key, details, tracking_no, parcels)
    queue: list[AuditEntry] | None = session.info.get(_DEFERRED)
    if queue is not None:
        queue.append(entry)
    else:
        _chain(session, entry)
    return entry


def append_at_commit(
    *,
    session: Session,
    actor_id: int | None,
    action: str,
    subject_type: str,
    subject_key: str,
    details: dict[str, Any],
    tracking_no: str | None = None,
    parcels: Iterable[str] = (),
) -> AuditEntry:
    """``append``, the entry chained when the transaction commits (inside ``deferred``,
    when that ends): for a change made deep inside other work, such as the system's
    change of a flag's status, whose caller may lock more flags after it. The audit log
    is then the last lock the transaction takes, whichever path made the change
    (``deferred`` says why); a transaction rolled back chains nothing."""
    entry = _entry(actor_id, action, subject_type, subject_key, details, tracking_no, parcels)
    queue = session.info.get(_DEFERRED)
    if queue is None:
        # Held with the savepoint it was made in: rolled back, that savepoint takes it.
        held = session.info.setdefault(_AT_COMMIT, [])
        held.append((session.get_nested_transaction(), entry))
    else:
        queue.append(entry)
    return entry


def _entry(
    actor_id: int | None,
    action: str,
    subject_type: str,
    subject_key: str,
    details: dict[str, Any],
    tracking_no: str | None,
    parcels: Iterable[str],
) -> AuditEntry:
    """An entry to chain, filed under every parcel it concerns."""
    concerned = (parcel_key(number) for number in (tracking_no, *parcels) if number)
    return AuditEntry(
        actor_id=actor_id,
        client_ip=CLIENT_IP.get(),
        action=action,
        subject_type=subject_type,
        subject_key=subject_key,
        details=_plain(details),
        tracking_no=parcel_key(tracking_no),
        parcels=[
            AuditEntryParcel(tracking_no=number) for number in dict.fromkeys(concerned) if number
        ],
    )


@event.listens_for(Session, "before_commit")
def _chain_at_commit(session: Session) -> None:
    if session.in_nested_transaction():  # a savepoint: its transaction's commit chains
        return
    _chain(session, *(entry for _, entry in session.info.pop(_AT_COMMIT, ())))


@event.listens_for(Session, "after_soft_rollback")
def _forget_at_rollback(session: Session, previous: SessionTransaction) -> None:
    """A transaction rolled back chains nothing it held; a savepoint rolled back, only
    what was held in it, ``previous`` or a savepoint inside it. The entries held before
    the savepoint stay: dropped with it, a flag's closing by the system would go off the
    record while the flag stayed closed."""
    held = session.info.get(_AT_COMMIT)
    if not held:
        return
    if not previous.nested:
        session.info.pop(_AT_COMMIT, None)
        return

    def undone(where: SessionTransaction | None) -> bool:
        while where is not None:
            if where is previous:
                return True
            where = where.parent
        return False

    session.info[_AT_COMMIT] = [(where, entry) for where, entry in held if not undone(where)]


@contextlib.contextmanager
def deferred(session: Session) -> Iterator[None]:
    """Entries appended inside are chained when it ends, in the order they came.

    The audit log's lock is then the last lock the transaction takes, as the service's
    lock order has it (``sync.device_state``: ..., flags, then the audit log), however
    the work inside interleaves flags and entries: a push that reopens a signed-off
    shift and then judges its handover flags, racing a manager resolving one of them
    (flag, then audit log), would otherwise deadlock on PostgreSQL. Nothing is
    chained if the work raises. Nested, the outermost one chains.
    """
    if _DEFERRED in session.info:
        yield
        return
    queue: list[AuditEntry] = []
    session.info[_DEFERRED] = queue
    try:
        yield
    finally:
        del session.info[_DEFERRED]
    _chain(session, *queue)


def _chain(session: Session, *entries: AuditEntry) -> None:
    """Chain ``entries``, in their order, after the newest entry: the lock taken and the
    newest hash read once, and one flush, however many there are (an intake that
    changed a thousand parcels writes an entry for each)."""
    if not entries:
        return
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": APPEND_LOCK_KEY})
    prev_hash = (
        session.scalar(select(AuditEntry.entry_hash).order_by(AuditEntry.id.desc()).limit(1))
        or GENESIS_HASH
    )
    at = utcnow()
    for entry in entries:
        entry.prev_hash = prev_hash
        entry.at = at
        entry.entry_hash = prev_hash = entry_hash(
            prev_hash=entry.prev_hash,
            at=entry.at,
            actor_id=entry.actor_id,
            action=entry.action,
            subject_type=entry.subject_type,
            subject_key=entry.subject_key,
            details=entry.details,
            client_ip=entry.client_ip,
        )
    session.add_all(entries)
    session.flush()


def parcel_key(tracking_no: str | None) -> str | None:
    """``tracking_no`` as an entry keeps it: normalized as every parcel's number is
    (``sync.tracking.normalize``), or None when that leaves nothing or more than a
    tracking number's 40 characters (a search's filter as typed names no parcel then)."""
    if tracking_no is None:
        return None
    number = normalize(tracking_no)
    return number if 0 < len(number) <= MAX_TRACKING_NO else None


def parcels_of_events(
    session: Session,
    event_ids: Sequence[int],
    rejected_ids: Sequence[int] = (),
    *,
    device_id: str | None = None,
    client_event_ids: Sequence[str] = (),
    seqs: Sequence[int] = (),
) -> list[str]:
    """The parcels of the scan events ``event_ids`` and of the rejected events
    ``rejected_ids`` (quarantine ids; one naming no parcel adds none), and of the events
    of the PDA ``device_id`` by its ids for them (``client_event_ids``) or their
    ``seqs``, in one statement: what an entry citing them as its evidence is filed under
    (``append``'s ``parcels``), so that ``GET /audit?tracking_no=`` lists it with the
    parcel's other entries: a shift's reopening by late events and its withdrawal, a
    manager's decision on a flag of a shift or a PDA citing them."""
    parts = []
    if event_ids:
        parts.append(
            select(ScanEvent.tracking_no).where(
                among_at_once(session, ScanEvent.id, sorted(set(event_ids)))
            )
        )
    if rejected_ids:
        parts.append(
            select(QuarantinedEvent.parcel_tracking_no).where(
                among_at_once(session, QuarantinedEvent.id, sorted(set(rejected_ids))),
                QuarantinedEvent.parcel_tracking_no.is_not(None),
            )
        )
    client_ids = sorted(_uuids(client_event_ids))
    if device_id is not None and client_ids:
        parts.append(  # by uq_scan_event_device_event, one probe each
            select(ScanEvent.tracking_no).where(
                ScanEvent.device_id == device_id, ScanEvent.client_event_id.in_(client_ids)
            )
        )
    if device_id is not None and seqs:
        parts.append(
            select(ScanEvent.tracking_no).where(
                ScanEvent.device_id == device_id,
                among_at_once(session, ScanEvent.seq, sorted(set(seqs))),
            )
        )
    if not parts:
        return []
    query = parts[0] if len(parts) == 1 else union_all(*parts)
    return sorted({number for number in session.execute(query).scalars() if number})


def _uuids(values: Iterable[str]) -> set[uuid.UUID]:
    """The well-formed UUIDs among ``values`` (evidence as stored: text)."""
    found = set()
    for value in values:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            found.add(uuid.UUID(value))
    return found


def list_entries(
    *,
    session: Session,
    action: str | None = None,
    actor_id: int | None = None,
    subject_type: str | None = None,
    subject_key: str | None = None,
    tracking_no: str | None = None,
    at_from: dt.datetime | None = None,
    at_to: dt.datetime | None = None,
    after_id: int | None = None,
    limit: int = 100,
) -> Sequence[AuditEntry]:
    """Entries matching every filter given, newest first (by id: the order they were
    chained in).

    ``after_id`` is the last id of the previous page (the next page holds smaller ids);
    ``at_from`` is inclusive and ``at_to`` exclusive. A subject is named by its type
    and key together: the same key names shift 42, flag 42 and proof 42, and a type
    alone (every proof ever read) would be read whole to be put newest first, as no
    index gives it in that order; ``action`` lists a kind of entry. ``tracking_no``:
    the entries about that parcel (``AuditEntry.tracking_no``), normalized as the rest
    of the service normalizes a number; one that normalizes to nothing or past 40
    characters names no parcel (``invalid_tracking_no``).
    """
    if at_from is not None and at_to is not None and at_to <= at_from:
        raise InvalidInput("at_to must be later than at_from", code="invalid_range", field="at_to")
    if subject_key is not None and subject_type is None:
        raise InvalidInput(
            "subject_key needs subject_type: the same key may name subjects of several types",
            code="subject_type_required",
            field="subject_type",
        )
    if subject_type is not None and subject_key is None:
        raise InvalidInput(
            "subject_type needs subject_key: name one subject (to list a kind of entry, "
            "filter by action)",
            code="subject_key_required",
            field="subject_key",
        )
    parcel = None if tracking_no is None else parcel_key(tracking_no)
    if tracking_no is not None and parcel is None:
        raise InvalidInput(
            f"{tracking_no!r} names no parcel: without its spaces and dashes it is empty, "
            f"or longer than a tracking number's {MAX_TRACKING_NO} characters",
            code="invalid_tracking_no",
            field="tracking_no",
        )
    query = select(AuditEntry).limit(min(limit, MAX_PAGE_SIZE))
    if action is not None:
        query = query.where(AuditEntry.action == action)
    if actor_id is not None:
        query = query.where(AuditEntry.actor_id == actor_id)
    if subject_type is not None:
        query = query.where(AuditEntry.subject_type == subject_type)
    if subject_key is not None:
        query = query.where(AuditEntry.subject_key == subject_key)
    newest_first = AuditEntry.id
    if parcel is not None:  # along the parcel's key, newest first
        query = query.join(AuditEntryParcel, AuditEntryParcel.entry_id == AuditEntry.id).where(
            AuditEntryParcel.tracking_no == parcel
        )
        newest_first = AuditEntryParcel.entry_id
    if at_from is not None:
        query = query.where(AuditEntry.at >= at_from)
    if at_to is not None:
        query = query.where(AuditEntry.at < at_to)
    if after_id:
        query = query.where(newest_first < after_id)
    return session.scalars(query.order_by(newest_first.desc())).all()


@dataclass(frozen=True)
class VerifyResult:
    checked: int  # entries read
    broken_id: int | None = None  # the first entry that breaks the chain
    problem: str | None = None  # "altered", "link_broken", "head_missing" or "head_changed"
    message: str | None = None
    head_id: int | None = None  # the newest entry verified, and its hash
    head_hash: str | None = None
    # False: the walk stopped at its bound with entries after ``head_id`` left to check
    complete: bool = True

    @property
    def ok(self) -> bool:
        return self.broken_id is None


@dataclass(frozen=True)
class Head:
    """An entry and the hash it carried when a verification ended there.

    Recorded outside the service, it is what shows that the newest entries were
    removed (no link breaks then), and a later verification can start from it: the
    entries up to it cannot be altered and re-hashed without changing its hash. One
    before it altered in place (its hash left as it was), or removed, changes neither
    it nor anything after it: a verification from it vouches for the entries from it on,
    and only a walk of the whole log finds that.
    """

    id: int
    hash: str


_HASH = re.compile(r"[0-9a-f]{64}")


def recorded_head(head_id: int | None, head_hash: str | None) -> Head | None:
    """The head a caller recorded, both halves or neither (``InvalidInput`` otherwise)."""
    if head_id is None and head_hash is None:
        return None
    if head_hash is None:
        raise InvalidInput(
            "head_id needs head_hash: the hash recorded with it",
            code="head_hash_required",
            field="head_hash",
        )
    if head_id is None:
        raise InvalidInput(
            "head_hash needs head_id: the entry it was recorded for",
            code="head_id_required",
            field="head_id",
        )
    if not _HASH.fullmatch(head_hash.lower()):
        raise InvalidInput(
            "head_hash must be 64 hexadecimal digits (an entry_hash)",
            code="invalid_head_hash",
            field="head_hash",
        )
    return Head(id=head_id, hash=head_hash.lower())


def verify(
    *,
    session: Session,
    from_head: Head | None = None,
    progress: Callable[[int, int], None] | None = None,
    progress_every: int = PROGRESS_EVERY,
    chunk_size: int = VERIFY_CHUNK,
    limit: int | None = None,
) -> VerifyResult:
    """Recompute every entry's hash and link, in id order; stop at the first break.

    From ``from_head``, a head recorded after an earlier verification, only that
    entry and the ones after it are read: it must still be in the log (else
    ``head_missing``: it was removed, and every entry after it with it or not) and
    carry the recorded hash (else ``head_changed``: an entry up to it was altered
    and the chain re-hashed from there). Its own link was checked when it was
    recorded and is part of that hash.

    Rows are streamed ``chunk_size`` at a time, so a long log is never held in
    memory. ``progress`` is called with the count checked and the id of the entry
    reached every ``progress_every``. With ``limit``, at most that many entries are
    read: a walk that stops there with entries left says so (``complete`` false), and
    its head (the last entry checked) starts the next one, as a recorded head does.
    """
    # ``at`` and ``details`` come as the database gives them and are decoded row by row
    # below: SQLite keeps any value in any column, and one scribbled over must be named
    # as altered, not end the walk with a decoding error.
    read_at, read_details = (_reader(session, column) for column in (_AT, _DETAILS))
    query = select(
        AuditEntry.id,
        type_coerce(_AT, Text).label("at"),
        AuditEntry.actor_id,
        AuditEntry.action,
        AuditEntry.subject_type,
        AuditEntry.subject_key,
        type_coerce(_DETAILS, Text).label("details"),
        AuditEntry.prev_hash,
        AuditEntry.entry_hash,
        AuditEntry.client_ip,
    ).order_by(AuditEntry.id)
    if from_head is not None:
        query = query.where(AuditEntry.id >= from_head.id)
    rows = session.execute(query.execution_options(yield_per=chunk_size))
    expected_prev, prev_id, checked = GENESIS_HASH, None, 0

    def broken(row_id: int, problem: str, message: str) -> VerifyResult:
        return VerifyResult(
            checked=checked,
            broken_id=row_id,
            problem=problem,
            message=message,
            head_id=prev_id,
            head_hash=expected_prev if prev_id is not None else None,
        )

    complete = True
    try:
        for row in rows:
            if limit is not None and checked >= limit:
                complete = False  # entries are left: the head so far starts the next walk
                break
            if from_head is not None and prev_id is None:
                if row.id != from_head.id:
                    break  # the recorded head is gone: reported below
                checked += 1
                if row.entry_hash != from_head.hash:
                    return broken(
                        row.id,
                        "head_changed",
                        f"entry {row.id}: its hash is not the one recorded for it: an entry "
                        "up to it was altered and the chain re-hashed from there",
                    )
            else:
                checked += 1
                if row.prev_hash != expected_prev:
                    where = f"entry {prev_id}" if prev_id is not None else "the start of the log"
                    return broken(
                        row.id,
                        "link_broken",
                        f"entry {row.id}: its prev_hash does not match the hash of "
                        f"{where}: an entry before it was removed, or {where} was "
                        "altered and re-hashed",
                    )
            try:
                recomputed = entry_hash(
                    prev_hash=row.prev_hash,
                    at=read_at(row.at),
                    actor_id=row.actor_id,
                    action=row.action,
                    subject_type=row.subject_type,
                    subject_key=row.subject_key,
                    details=read_details(row.details),
                    client_ip=row.client_ip,
                )
            # json's decoding errors are ValueErrors; a document nested past Python's
            # recursion limit is a RecursionError
            except (TypeError, ValueError, RecursionError) as exc:
                recomputed, unreadable = None, f"its content cannot be read ({exc})"
            else:
                unreadable = "its content does not match its hash"
            if recomputed != row.entry_hash:
                return broken(
                    row.id, "altered", f"entry {row.id}: {unreadable}: the entry was altered"
                )
            expected_prev, prev_id = row.entry_hash, row.id
            if progress is not None and checked % progress_every == 0:
                progress(checked, row.id)
    finally:
        rows.close()
    if from_head is not None and prev_id is None:
        return broken(
            from_head.id,
            "head_missing",
            f"entry {from_head.id}, the head recorded, is not in the log: it was removed, "
            "and maybe entries after it",
        )
    return VerifyResult(
        checked=checked,
        head_id=prev_id,
        head_hash=expected_prev if prev_id is not None else None,
        complete=complete,
    )


# A reader's budget of entries verified through the API is spent in units of this many
# (what one query of the walk fetches): a check costs the entries it may read, rounded up,
# so that one reading the few entries after a recent head costs a unit, and a reader's
# window holds a row per unit, not per entry.
BUDGET_UNIT = VERIFY_CHUNK
BUDGET_KIND = "audit_entries"  # its units' kind in sync.sign_in_limits.admit_cost


def admit_check(
    *,
    session: Session,
    caller_key: str,
    budget: Limit,
    from_head: Head | None,
    max_entries: int,
    now: dt.datetime,
    code: str,
) -> int:
    """Charge a check (from ``from_head``, or of the whole log) to its reader's budget
    of entries read per window (``budget``, in entries; ``caller_key`` keys the reader,
    ``sign_in_limits.caller_key`` of ``BUDGET_KIND``): the most it may then read, at
    most ``max_entries``. ``RateLimited`` (``code``) once the budget is spent.

    The budget bounds what a reader's checks cost, however they are asked: a head
    is anyone's to read from the log (its first entry's hash is the walk of the whole
    log again), and a long log legitimately takes checks continued from head to head.
    Each is charged what it will read (the entries there are from its head, counted
    before it starts, up to what is left of the budget), in ``BUDGET_UNIT``s rounded up,
    and is given no more to read, so that the budget is never overspent, by concurrent
    checks either (``admit_cost`` counts a reader's at a time): a check the budget cuts
    short answers ``complete: false`` with its head, to go on from when the window frees
    units.
    """
    units = Limit(max(1, budget.count // BUDGET_UNIT), budget.window)

    def cost(left: int) -> int:
        there = entries_from(session, from_head, at_most=min(max_entries, left * BUDGET_UNIT))
        return -(-there // BUDGET_UNIT)  # rounded up; admit_cost charges at least one

    charge = sign_in_limits.admit_cost(
        session=session,
        kind=BUDGET_KIND,
        key=caller_key,
        limit=units,
        now=now,
        cost=cost,
        what=(
            "too many thousands of audit entries verified by this account, checks from "
            "a recorded head included"
        ),
        code=code,
    )
    if charge.refusal is not None:
        raise charge.refusal
    # A budget of fewer entries than a unit is one unit a window (``units``), charged as a
    # unit, but read no further than its entries: 300 an hour must not read a thousand.
    return min(max_entries, charge.units * BUDGET_UNIT, budget.count)


def entries_from(session: Session, from_head: Head | None, *, at_most: int) -> int:
    """How many entries a check from ``from_head`` (None: the whole log) reads, the
    head itself included, counting no further than ``at_most`` (along the primary key)."""
    query = select(AuditEntry.id).order_by(AuditEntry.id).limit(at_most)
    if from_head is not None:
        query = query.where(AuditEntry.id >= from_head.id)
    return session.scalar(select(func.count()).select_from(query.subquery())) or 0


def newest_id(session: Session) -> int | None:
    """The id of the newest entry (None: the log is empty): where a walk will end."""
    return session.scalar(select(func.max(AuditEntry.id)))


_AT, _DETAILS = AuditEntry.__table__.c.at, AuditEntry.__table__.c.details


def _reader(session: Session, column: Column[Any]) -> Callable[[Any], Any]:
    """What reading ``column`` does to the value the driver gives (parsing SQLite's
    text into a time, JSON text into a document), to run on one row at a time."""
    dialect = session.get_bind().dialect
    process = column.type.dialect_impl(dialect).result_processor(dialect, None)
    return process or (lambda value: value)


def iso(at: dt.datetime) -> str:
    """One spelling per instant, whatever the backend gives back (always microseconds)."""
    if at.tzinfo is None:
        raise ValueError("audit timestamps must be timezone-aware")
    return at.astimezone(dt.UTC).isoformat(timespec="microseconds")


def _plain(details: dict[str, Any]) -> dict[str, Any]:
    """``details`` as the database will give it back, so its hash can be recomputed.

    JSON-encoding turns tuples into lists and keys into strings; floats are refused
    because PostgreSQL's jsonb may give a number back in another spelling (1e+20
    comes back as 100000000000000000000) and the hash would no longer match.
    """
    plain: dict[str, Any] = json.loads(json.dumps(details, allow_nan=False))
    stack: list[Any] = [plain]
    while stack:
        value = stack.pop()
        if isinstance(value, float):
            raise ValueError("audit details must not hold floats; store them as strings")
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return plain
