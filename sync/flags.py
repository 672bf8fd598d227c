"""Flags: discrepancies and violations, one per kind and subject (DESIGN.md "Flag") at
each station.

Raising a flag that exists merges the new evidence into it instead of adding a
second one, so re-running a check or re-sending a batch never duplicates flags.
A flag whose cause went away is closed with the reason, never deleted.

The station is part of a flag's identity: a parcel or a device moves between
stations, and what happens to it at one station is that station's manager's to
see and settle, in that station's queue. A flag one station resolved stays
resolved when the same kind of fault is found for its subject at another station:
that station gets a flag of its own. (Flags of no station, the system's, are one
per kind and subject too.)

Every status change is recorded as a ``FlagChange``: by the system (``by_user_id``
None) when a flag is raised, raised again after it was closed, closed, or judged
again (below); by a person when a manager acknowledges or resolves it. These decisions
also go to the audit log, with what they covered. A flag's life::

    (raised) -> open -> acknowledged -> resolved
                open ----------------> resolved
    open, acknowledged -> closed (cause gone) -> open (raised again)

A rule flag (a parcel's, a shift's own) is judged again whenever its subject's events
change, and its status is then a function of the events as they are and of the
manager's latest decision (``judged_status``): closed while the rule holds, resolved
or not; while it fails, the decision's status (acknowledged, resolved) if the rule
fails only on the events the manager decided on, open if on any other (a scan
repeating an outcome they decided on is no other: ``REPEATED_SCANS``). So any status
may follow any other, by the system, and a decision stands, or comes back, however
the later events were batched (rule 3); nothing the manager did not see is settled
by it. Other kinds keep the life above, and the same rule: a decided flag raised again
on evidence that names what its decision did not cover (``covers``: another event, seq
or missing image, another silence of a PDA) is open again (``raise_flag``): a PDA's
``clock_jump`` resolved on one push's scans comes back when a later push jumps again.
A ``time_inversion`` whose pairs later events show were none (``withdraw_evidence``)
is judged as a rule flag is (``JUDGED_ON_EVIDENCE``): closed when it names none,
resolved or not, and raised again on seqs the decision covered, given it back; opened
by seqs the decision did not cover and left, once those are withdrawn, on seqs it did,
given it back too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, Select, and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models import (
    Flag,
    FlagChange,
    FlagSeverity,
    FlagStatus,
    QuarantinedEvent,
    ScanEvent,
    User,
    utcnow,
)
from sync import audit, outbox
from sync.acks import merged
from sync.errors import Conflict, CursorReset, InvalidInput, NotFound
from sync.manager_text import manager_text
from sync.paging import MAX_PAGE_SIZE, dotted_parts, malformed_cursor
from sync.sql import among, chunks
from sync.tracking import normalize

ACTIVE_STATUSES = (FlagStatus.OPEN, FlagStatus.ACKNOWLEDGED)

# Every kind of flag there is, as the modules raising them name them (``sync.ingest``,
# ``sync.rules``, ``sync.handover``, ``sync.parcels``, ``sync.shifts``, ``sync.sweeps``,
# ``sync.webhooks``; tests/sync/test_flags.py keeps the list whole): the flag queue's
# Kind filter offers these, and the API's names them when it refuses another.
KINDS = (
    "blob_missing_at_handover",
    "clock_jump",
    "clock_skew",
    "conflicting_duplicate",
    "conflicting_final_outcome",
    "consent_after_drop",
    "correction_by_another_courier",
    "correction_review",
    "delivered_not_checked_out",
    "delivered_without_pod",
    "far_from_address",
    "late_event_after_signoff",
    "missing_at_handover",
    "not_on_manifest",
    "pod_blob_missing",
    "seq_conflict",
    "shift_not_closed",
    "stale_device",
    "time_inversion",
    "unauthorized_locker_drop",
    "unknown_parcel",
    "webhook_subscription_disabled",
    "wrong_shift",
    "wrong_station",
)


# What a flag is about (``Flag.subject_type``), and what its ``subject_key`` is then.
SUBJECT_KEYS = {
    "parcel": "its tracking number",
    "shift": "its id; a parcel's handover in it (missing_at_handover, not_on_manifest): "
    "`<shift id>:<tracking no>`",
    "device": "the PDA's id",
    "event": "a held event of a PDA: `<device id>/<client event id>` (its id sent again "
    "with other content) or `<device id>#<seq>` (its seq claimed by another event)",
    "subscription": "a webhook subscription's id",
}


@dataclass(frozen=True)
class FlagSubject:
    type: str  # one of SUBJECT_KEYS
    key: str

    @classmethod
    def event_sent_again(cls, device_id: str, client_event_id: uuid.UUID) -> FlagSubject:
        """A held event's id sent again by its PDA with other content."""
        return cls("event", f"{device_id}/{client_event_id}")

    @classmethod
    def event_seq(cls, device_id: str, seq: int) -> FlagSubject:
        """A held event's seq, claimed by another event of its PDA."""
        return cls("event", device_seq(device_id, seq))


def device_seq(device_id: str, seq: int) -> str:
    """A seq of a PDA as flags name it, ``device#seq``: a held event's subject
    (``FlagSubject.event_seq``), each end of a ``time_inversion``'s pairs."""
    return f"{device_id}#{seq}"


def split_device_seq(value: str) -> tuple[str, int] | None:
    """A ``device_seq`` as its device and seq; None for another value."""
    device, mark, seq = value.rpartition("#")
    return (device, int(seq)) if mark and seq.isdigit() else None


@dataclass(frozen=True)
class RaisedFlag:
    flag: Flag
    # created, or open again: closed by the system, or decided on less than it names now
    new: bool


def raise_flag(
    *,
    session: Session,
    kind: str,
    severity: FlagSeverity,
    subject: FlagSubject,
    station_id: int | None,
    evidence: dict[str, Any],
    courier_id: int | None = None,
    shift_id: int | None = None,
    again: str = "raised again on evidence the decision did not cover",
) -> RaisedFlag:
    """Create the flag, or merge ``evidence`` into the one of this kind and subject that
    exists at ``station_id``.

    ``courier_id``, when given, names the courier concerned; like evidence, the
    latest one given wins. An acknowledged or resolved flag keeps its status while its
    evidence names nothing beyond what the decision covered (``covers``), and is open
    again, ``again`` saying why in its history, once it does: nothing the manager did
    not see is settled by their decision. A closed flag raised again is open, or, of a
    kind ``JUDGED_ON_EVIDENCE``, given back the decision that covers its evidence.
    """
    flag = _locked(session, kind, subject, station_id)
    if flag is None:
        flag = Flag(
            kind=kind,
            severity=severity,
            subject_type=subject.type,
            subject_key=subject.key,
            station_id=station_id,
            courier_id=courier_id,
            shift_id=shift_id,
            evidence=_merged({}, evidence),
            status=FlagStatus.OPEN,
        )
        try:
            with session.begin_nested():
                session.add(flag)
        except IntegrityError:  # raised by a concurrent transaction a moment ago
            flag = _locked(session, kind, subject, station_id)
            assert flag is not None
        else:
            _record(session, flag, None, FlagStatus.OPEN)
            return RaisedFlag(flag, new=True)
    merged = _merged(flag.evidence, evidence)
    if merged != flag.evidence:
        flag.evidence = merged
    if courier_id is not None and courier_id != flag.courier_id:
        flag.courier_id = courier_id
    if flag.status == FlagStatus.CLOSED:
        status = FlagStatus.OPEN
        if kind in JUDGED_ON_EVIDENCE and covers(flag.decided_on, evidence):
            status = judged_status(flag.decision, flag.decided_on, flag.evidence)
        note = "raised again"
        if status != FlagStatus.OPEN:
            note = f"raised again on the events a manager {status.value} it on"
        _record(session, flag, FlagStatus.CLOSED, status, note=note)
        flag.status = status
        flag.closed_reason = None
        # back as acknowledged is raised (announced so), as ``rejudge`` counts it
        return RaisedFlag(flag, new=status != FlagStatus.RESOLVED)
    if flag.status in DECISIONS and not (
        # what it cites now, and what this raising named, cited or not (past the bound)
        covers(flag.decided_on, flag.evidence) and covers(flag.decided_on, evidence)
    ):
        reopen_flag(session=session, flag=flag, note=again)
        return RaisedFlag(flag, new=True)
    return RaisedFlag(flag, new=False)


def raise_new_flags(*, session: Session, flags: Sequence[Flag]) -> list[Flag]:
    """Create flags known not to exist yet, in one batch (a push can raise hundreds).

    If another transaction created one of them meanwhile, the batch is undone and
    each is raised on its own instead.
    """
    if not flags:
        return []
    for flag in flags:
        flag.status = FlagStatus.OPEN
    try:
        with session.begin_nested():
            session.add_all(flags)
    except IntegrityError:
        return [
            raise_flag(
                session=session,
                kind=flag.kind,
                severity=flag.severity,
                subject=FlagSubject(flag.subject_type, flag.subject_key),
                station_id=flag.station_id,
                evidence=flag.evidence,
                courier_id=flag.courier_id,
                shift_id=flag.shift_id,
            ).flag
            for flag in flags
        ]
    for flag in flags:
        _record(session, flag, None, FlagStatus.OPEN)
    return list(flags)


def reopen_flag(*, session: Session, flag: Flag, note: str) -> Flag:
    """Open a flag again, acknowledged, resolved or closed: its cause is back with new
    evidence, which no manager's decision saw."""
    if flag.status != FlagStatus.OPEN:
        _record(session, flag, flag.status, FlagStatus.OPEN, note=note)
        flag.status = FlagStatus.OPEN
        flag.closed_reason = None
    return flag


# What a flag's evidence names its cause by, and so what a manager's decision covers
# (``decided_on``): its events, by id or by their PDA's id for them (``clock_jump``,
# ``seq_conflict``); the rejected events of its PDA, by their quarantine id
# (``late_event_after_signoff``: rejected after the sign-off); the seqs of its PDA
# (``wrong_shift``) or of PDAs (a ``time_inversion`` names its pairs so); the images a
# delivery lacks (``pod_blob_missing``); and the silence a ``stale_device`` flag is about,
# its shift and the PDA's last push. Lists (the events, seqs, images) are covered item by item, one
# value (the silence) as a whole. (Counts, times and measures it also holds, such as
# ``clock_skew``'s offset, name nothing: they change with every push.)
SEEN = (
    "event_ids",
    "client_event_ids",
    "rejected_event_ids",
    "seqs",
    "device_seqs",
    "blobs",
    "shift_id",
    "last_push_at",
)
DECISIONS = (FlagStatus.ACKNOWLEDGED, FlagStatus.RESOLVED)
# Kinds whose evidence the system withdraws when later events show it never was their
# cause (``withdraw_evidence``: a ``time_inversion``'s pair split by a seq stored
# between). Their status is a function of the evidence and the manager's latest
# decision, as a rule flag's is (``judged_status``): closed when none is left, whatever
# the decision, and raised again on evidence the decision covered, given it back. So
# a flag resolved on seqs 1, 3, 5 and 7 ends resolved on 3 and 5 whether the seq that
# made 3 and 5 neighbours came before or after those that split 1-3 and 5-7 (which
# closed it for a while), and one opened by a pair a later seq splits is resolved
# again once that pair is withdrawn: rule 3.
JUDGED_ON_EVIDENCE = frozenset({"time_inversion"})
# The lists of a flag's evidence that grow as its cause recurs (``_merged``): the
# events, pushes and seqs it names.
ACCUMULATED = (
    "event_ids",
    "client_event_ids",
    "rejected_event_ids",
    "batch_ids",
    "seqs",
    "device_seqs",
)
# Lists that accumulate as those do but name no cause of their own: what the events
# the flag cites said (the shifts a ``wrong_shift``'s events named, each with a seq its
# ``seqs`` cites). One is new only with a new event, so ``evidence_version`` and a
# decision read the events, not these; but a later raising adds to them, never
# replaces them, so what they say does not depend on how the events were batched.
ACCOMPANYING = ("claimed_shift_ids",)
# The scans a rule flag cites that repeat an outcome it cites by an earlier scan
# (``sync.rules.JUDGING_OUTCOMES``): ``[{"event_id", "first_event_id"}]``. A repeat
# changes nothing the flag judges, so it names no cause of its own (``causes``): a
# decision on the outcome covers it and ``evidence_version`` leaves it out. Its
# ``event_ids`` still cite it, as a proof and a shift's balance read them.
REPEATED_SCANS = "repeated_scans"
# Keys named later than the versions of flags without them: ``evidence_version`` reads
# them only where a flag's evidence names some, so those versions stay as they were
# read; and a decision recorded without them saw none (``covers``).
NAMED_WHERE_HELD = frozenset({"rejected_event_ids"})


def seen_in(evidence: dict[str, Any]) -> dict[str, Any]:
    """What a manager deciding on a flag with this evidence has seen: under each key,
    what it cites (``cited_in``, the ids past the bound too)."""
    return {key: _copied(cited_in(evidence, key)) for key in SEEN if key in evidence}


def covers(decided_on: dict[str, Any] | None, evidence: dict[str, Any]) -> bool:
    """Whether the cause in ``evidence`` stands only on what the decision saw: no event,
    seq or missing image beyond it (``cited_in``: past the bound too), no other silence. A
    decision recorded before its flag's evidence was named by more (images only, or
    events only) is compared on what it recorded."""
    if decided_on is None:
        return False
    shown = [key for key in SEEN if key in decided_on] or ["event_ids"]
    # Named in no evidence before: a decision that recorded none saw none.
    shown += sorted(NAMED_WHERE_HELD.difference(shown))
    return all(
        key not in evidence or _within(causes(evidence, key), decided_on.get(key)) for key in shown
    )


def causes(evidence: dict[str, Any], key: str, default: Any = None) -> Any:
    """What ``evidence`` names as a cause under ``key``: what it cites (``cited_in``),
    less, among its events, each repeated scan of an outcome whose first scan it cites
    (``REPEATED_SCANS``). What a decision must have seen, and ``evidence_version``
    reads."""
    named = cited_in(evidence, key, default)
    if key != "event_ids" or not evidence.get(REPEATED_SCANS) or not isinstance(named, list):
        return named
    repeats = {r["event_id"] for r in evidence[REPEATED_SCANS] if r["first_event_id"] in named}
    return [i for i in named if i not in repeats]


def cited_in(evidence: dict[str, Any], key: str, default: Any = None) -> Any:
    """What ``evidence`` names under ``key``: a list of ids (``ACCUMULATED``) is the ids
    kept since they were first named and those of the latest raising past the bound
    (``_merged``), in ``_evidence_order``; another value as it is (``default`` if none).
    What a manager reads, a decision covers and a proof looks its delivery up in."""
    value = evidence.get(key, default)
    listed = key in ACCUMULATED or key in ACCOMPANYING
    past = (evidence.get(PAST_BOUND) or {}).get(key) if listed else None
    if not past:
        return value
    return sorted({*(value or ()), *past}, key=_evidence_order)


def _within(named: Any, seen: Any) -> bool:
    """Whether what the evidence names under a key was seen: each item of a list, or
    the one value."""
    if isinstance(named, list):
        return set(named) <= set(seen if isinstance(seen, list) else [])
    return bool(named == seen)


def _copied(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def evidence_version(evidence: dict[str, Any]) -> str:
    """A digest of what the flag's ``evidence`` names: what a decision covers
    (``SEEN``: its events, seqs, missing images, a PDA's silence, ``causes``: not a
    repeated scan of an outcome it cites) and the
    pushes it grows by, lists whatever their order, and, once its lists are past the
    bound, how many ids raisings named past it (``_merged``). A decision that names the
    version its manager was shown is refused once the evidence has changed since (a
    push landing between the read and the decision), as a sign-off is on a changed
    ``balance_version``: nobody settles events they did not see.

    Every raising that names an id the flag did not cite changes it: within the bound
    the id joins its list, which never loses one; past it the count grows (so the
    version never comes back to one a manager read, whichever ids the latest raising
    named). (Other counts, times and measures the evidence holds are not in it: they
    change with every push, and name nothing new.)"""
    past = evidence.get(PAST_BOUND) or {}
    named = sorted(
        key
        for key in {*SEEN, *ACCUMULATED}
        if key not in NAMED_WHERE_HELD or cited_in(evidence, key)
    )
    seen = {key: _in_order(causes(evidence, key, [])) for key in named}
    if NAMED_PAST_BOUND in past:  # absent until the bound is reached: versions read before
        seen[NAMED_PAST_BOUND] = past[NAMED_PAST_BOUND]
    text = json.dumps(seen, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def judged_status(
    decision: FlagStatus | None, decided_on: dict[str, Any] | None, evidence: dict[str, Any]
) -> FlagStatus:
    """The status of a rule flag whose cause stands now, on ``evidence``: the manager's
    latest decision (acknowledged, resolved) while it covers the evidence, open when
    the cause stands on anything they did not see.

    A function of the events as they are and of the decision only, not of the flag's
    path (closed and raised again, opened and resolved again): however the events
    after the decision were batched, the flag ends the same (rule 3).
    """
    if decision in DECISIONS and covers(decided_on, evidence):
        return decision  # type: ignore[return-value]
    return FlagStatus.OPEN


def rejudge(
    *,
    session: Session,
    flag: Flag,
    evidence: dict[str, Any],
    cause: str,
    courier_id: int | None = None,
) -> bool:
    """A rule flag whose cause stands now, on ``evidence``: it takes that evidence (what
    the rule finds now, not merged history) and the status ``judged_status`` gives,
    the change recorded as the system's. ``cause`` names it in the history ("missing
    again"); ``courier_id``, when given, names the courier concerned should the flag
    be raised again (as ``raise_flag`` does), before it is announced. True if it was:
    opened, or back from closed as acknowledged (announced as ``flag.raised``,
    counted, in the push's ``flags_raised``)."""
    status = judged_status(flag.decision, flag.decided_on, evidence)
    if flag.evidence != evidence:
        flag.evidence = evidence
    if status == flag.status:
        return False
    raised = status == FlagStatus.OPEN or (
        flag.status == FlagStatus.CLOSED and status == FlagStatus.ACKNOWLEDGED
    )
    if raised and courier_id is not None and courier_id != flag.courier_id:
        flag.courier_id = courier_id
    if status != FlagStatus.OPEN:
        note = f"{cause} on the events a manager {status.value} it on"
    elif flag.status == FlagStatus.CLOSED and flag.decision is None:
        note = "raised again"
    else:
        note = f"{cause} on new events"
    _record(session, flag, flag.status, status, note=note)
    flag.status = status
    flag.closed_reason = None
    return raised


def close_flag(
    *,
    session: Session,
    kind: str,
    subject: FlagSubject,
    reason: str,
    station_id: int | None = None,
) -> Flag | None:
    """Close the subject's open flags of this kind, at every station (at ``station_id``
    only, if given), because their cause disappeared; ``reason`` says why. Returns the
    latest raised (closed or not), if any."""
    query = select(Flag).where(
        Flag.kind == kind,
        Flag.subject_type == subject.type,
        Flag.subject_key == subject.key,
    )
    if station_id is not None:
        query = query.where(Flag.station_id == station_id)
    flags = session.scalars(query.order_by(Flag.id).with_for_update()).all()
    for flag in flags:
        if flag.status in ACTIVE_STATUSES:
            _close(session, flag, reason)
    return flags[-1] if flags else None


def close_flags(
    *,
    session: Session,
    kind: str,
    subjects: Sequence[FlagSubject],
    reason: str,
    statuses: Sequence[FlagStatus] = ACTIVE_STATUSES,
) -> list[Flag]:
    """``close_flag`` for many subjects of one kind, in one query per chunk: their flags
    in ``statuses`` (by default those nobody resolved), at every station."""
    closed = []
    by_type: dict[str, list[str]] = {}
    for subject in subjects:
        by_type.setdefault(subject.type, []).append(subject.key)
    for subject_type, keys in by_type.items():
        for chunk in chunks(keys):
            for flag in session.scalars(
                select(Flag)
                .where(
                    Flag.kind == kind,
                    Flag.subject_type == subject_type,
                    Flag.subject_key.in_(chunk),
                    Flag.status.in_(statuses),
                )
                .with_for_update()
            ):
                _close(session, flag, reason)
                closed.append(flag)
    return closed


def close_flags_by_id(
    *,
    session: Session,
    flag_ids: Sequence[int],
    reason: str,
    statuses: Sequence[FlagStatus] = ACTIVE_STATUSES,
    reasons: Mapping[int, str] | None = None,
) -> list[Flag]:
    """Close these flags, those of them in ``statuses`` once locked, in one query per
    chunk: a subject's flag at one station, not its flags at the others. ``reasons``:
    a flag's own reason, by id, where it has one other than ``reason`` (locked in one
    pass in id order all the same)."""
    reasons = reasons or {}
    closed = []
    for chunk in chunks(sorted(flag_ids)):
        for flag in session.scalars(
            select(Flag)
            .where(Flag.id.in_(chunk), Flag.status.in_(statuses))
            .order_by(Flag.id)
            .with_for_update()
        ):
            _close(session, flag, reasons.get(flag.id, reason))
            closed.append(flag)
    return closed


def withdraw_evidence(
    *,
    session: Session,
    kind: str,
    subject: FlagSubject,
    key: str,
    withdrawn: set[str],
    reason: str,
    standing: Mapping[int | None, Collection[str]] | None = None,
) -> list[Flag]:
    """Take ``withdrawn`` out of what the subject's flags of this kind cite under
    ``key`` (a list ``ACCUMULATED``), at every station: their cause no longer stands on
    them. ``standing``: by station, what still stands on that station's flag (kept
    there; a station not named keeps none of ``withdrawn``). A flag left citing nothing
    there is closed by the system, ``reason`` saying why, whatever its status (a
    decision on a cause that went away settles nothing, as for a rule flag), the change
    on the audit log; its decision is kept, and given back should it be raised again on
    what the decision covered (``JUDGED_ON_EVIDENCE``). A flag citing others keeps its
    status, acknowledged or resolved too (what it cites now the decision saw); its
    ``evidence_version`` changes. One of a kind ``JUDGED_ON_EVIDENCE`` that is open and
    now cites only what the manager's latest decision covered is given it back
    (``judged_status``): opened by the evidence just withdrawn, it stands where it would
    had that evidence never been named (rule 3).
    Returns the flags closed."""
    closed = []
    flags = session.scalars(
        select(Flag)
        .where(
            Flag.kind == kind,
            Flag.subject_type == subject.type,
            Flag.subject_key == subject.key,
        )
        .order_by(Flag.id)
        .with_for_update()
    ).all()
    for flag in flags:
        gone = withdrawn
        if standing is not None:
            gone = withdrawn - set(standing.get(flag.station_id, ()))
        if gone.isdisjoint(cited_in(flag.evidence, key, [])):
            continue
        flag.evidence = _without(flag.evidence, key, gone)
        if flag.status != FlagStatus.CLOSED and not cited_in(flag.evidence, key):
            _close(session, flag, reason)
            closed.append(flag)
        elif flag.status == FlagStatus.OPEN and kind in JUDGED_ON_EVIDENCE:
            status = judged_status(flag.decision, flag.decided_on, flag.evidence)
            if status != FlagStatus.OPEN:
                note = f"{reason}; left on the events a manager {status.value} it on"
                _record(session, flag, FlagStatus.OPEN, status, note=note)
                flag.status = status
    return closed


def _without(evidence: dict[str, Any], key: str, withdrawn: set[str]) -> dict[str, Any]:
    """``evidence`` citing none of ``withdrawn`` under ``key``, past the bound either
    (how many ids raisings named past it stays: the count only grows)."""
    kept = {**evidence, key: [v for v in evidence.get(key, []) if v not in withdrawn]}
    past = evidence.get(PAST_BOUND) or {}
    if key in past:
        rest = {**past, key: [v for v in past[key] if v not in withdrawn]}
        kept[PAST_BOUND] = rest if rest[key] else {k: v for k, v in rest.items() if k != key}
    return kept


def _close(session: Session, flag: Flag, reason: str) -> None:
    _record(session, flag, flag.status, FlagStatus.CLOSED, note=reason)
    flag.status = FlagStatus.CLOSED
    flag.closed_reason = reason


# -- reading ----------------------------------------------------------------------------------


_FLAG_CURSOR = re.compile(
    r"([0-9]{1,19})\.([0-9]{1,19})\.([0-9]{1,19})\.([0-9]{1,19})\.([0-9]{1,19})"
)
# How long after storing a flag the transaction storing it may commit and a walk begun
# meanwhile still find it (``walk_flags``): a push takes seconds (its size is bounded,
# each statement by ``DATABASE_STATEMENT_TIMEOUT_SECONDS``); a walk counts the flags
# raised this long before it began, not every flag ever kept.
LATE_COMMIT_WINDOW = dt.timedelta(minutes=10)
# A cursor given before a walk kept where it began: ``<opened_at>.<id>``.
_EARLIER_FLAG_CURSOR = re.compile(r"[0-9]{1,19}\.[0-9]{1,19}")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# The latest time a cursor may hold: datetime's last day (9999-12-31), in microseconds.
_LAST_MICROSECOND = (dt.datetime.max.replace(tzinfo=dt.UTC) - _EPOCH) // dt.timedelta(
    microseconds=1
)


def _microseconds(when: dt.datetime) -> int:
    return (when - _EPOCH) // dt.timedelta(microseconds=1)


def _instant(microseconds: int) -> dt.datetime:
    if microseconds > _LAST_MICROSECOND:
        raise malformed_cursor()
    return _EPOCH + dt.timedelta(microseconds=microseconds)


@dataclass(frozen=True)
class FlagCursor:
    """Where a walk through the flags stands, ``<opened_at>.<id>.<as_of>.<since>.<raised>``:
    its last flag's ``opened_at`` as it was when listed (microseconds since 1970, UTC)
    and id. The walk goes on below that place, whatever became of the flag since: opened
    again, it is at the top, where ``after`` (its id) went on from and listed again the
    flags shown.

    ``as_of`` is where the walk began, the latest ``opened_at`` of the flags its
    filters that never change took in then, and ``raised`` how often those had been
    opened (raised, or opened again) after ``since`` (``LATE_COMMIT_WINDOW`` before the
    walk began) and up to ``as_of``: the walk's last page counts them again to find a
    flag committed late below where the walk began (``check_flag_walk``)."""

    opened_at: dt.datetime
    flag_id: int
    as_of: dt.datetime
    since: dt.datetime
    raised: int

    def __str__(self) -> str:
        return (
            f"{_microseconds(self.opened_at)}.{self.flag_id}."
            f"{_microseconds(self.as_of)}.{_microseconds(self.since)}.{self.raised}"
        )

    @classmethod
    def parse(cls, raw: str | None) -> FlagCursor | None:
        """The cursor, or None for a walk's first page; 400 ``cursor_malformed`` for
        one this server never gave; 410 ``cursor_reset`` for one given before a walk
        kept where it began (nothing to check its last page against)."""
        if raw is None or raw == "":
            return None
        if _EARLIER_FLAG_CURSOR.fullmatch(raw):
            raise CursorReset(
                "the walk was begun by an earlier version of the server; list the flags "
                "again from the start",
                field="cursor",
            )
        numbers, _ = dotted_parts(raw, _FLAG_CURSOR, numbers=5)
        opened_at, flag_id, as_of, since, raised = numbers
        assert opened_at is not None and flag_id is not None and as_of is not None
        assert since is not None and raised is not None
        if flag_id < 1 or opened_at > as_of:  # its last flag: one the walk took in
            raise malformed_cursor()
        return cls(_instant(opened_at), flag_id, _instant(as_of), _instant(since), raised)


@dataclass(frozen=True)
class FlagWalk:
    """A page of a walk through the flags (``walk_flags``): its ``items``, and the
    ``next_cursor`` when the page is full (None on the last page). ``as_of``: where
    the walk began, the latest ``opened_at`` among the flags its fixed filters took in
    then (None when there were none)."""

    items: Sequence[Flag]
    next_cursor: FlagCursor | None
    as_of: dt.datetime | None


def list_flags(
    *,
    session: Session,
    station_id: int | None = None,
    kind: str | None = None,
    severity: FlagSeverity | None = None,
    status: FlagStatus | None = None,
    standing: bool = False,
    waiting: bool = False,
    courier_id: int | None = None,
    shift_id: int | None = None,
    tracking_no: str | None = None,
    raised_from: dt.datetime | None = None,
    raised_to: dt.datetime | None = None,
    after_id: int | None = None,
    cursor: FlagCursor | None = None,
    limit: int = 100,
) -> Sequence[Flag]:
    """Flags matching every filter given, latest opened first (``Flag.opened_at``, then
    id): a flag opened again, by the system or raised again on more than a manager's
    decision covered, rises to the top with the new ones, not left where it was first
    raised.

    ``cursor`` is where the previous page's last flag stood when listed
    (``FlagCursor``): the next page holds the flags listed after that place, so a walk
    shows each flag once, though one is opened again meanwhile (listed at the top, where
    a walk begun again finds it). ``after_id`` is the last id of the previous page, read
    where its flag stands now (one opened again meanwhile is at the top, and the page
    after it lists again the flags shown; one not of ``station_id`` names no place, as an
    unknown id);
    ``raised_from`` is inclusive and ``raised_to`` exclusive. ``waiting``: those still
    waiting for a manager's decision, open or acknowledged (``ACTIVE_STATUSES``), as the
    board counts a shift's open flags. ``shift_id``: that
    shift's own flags (its handover discrepancies, sign-off and sweeps); a parcel's
    rule flags name no shift. ``tracking_no``: the parcel's flags, its own (rules,
    wrong station, not taken in) and its handovers' in every shift (``missing_at_handover``,
    ``not_on_manifest``), by ``Flag.tracking_no``'s index: a lost parcel has no proof
    to list them; and those citing its events (``flags_citing_parcel``).
    ``standing``: only flags whose cause stands (open, acknowledged or
    resolved), not those the system closed when it went away, as the reports count them
    (``sync.reports``): a flag raised and closed only because a PDA's pushes arrived in
    a given order is no news to a manager.
    """
    fixed = _fixed_filters(
        session=session,
        station_id=station_id,
        kind=kind,
        severity=severity,
        shift_id=shift_id,
        tracking_no=tracking_no,
        raised_from=raised_from,
        raised_to=raised_to,
    )
    query = _page_query(
        fixed,
        status=status,
        standing=standing,
        waiting=waiting,
        courier_id=courier_id,
        station_id=station_id,
        after_id=after_id,
        cursor=cursor,
        limit=limit,
    )
    return session.scalars(query).all()


def walk_flags(
    *,
    session: Session,
    station_id: int | None = None,
    kind: str | None = None,
    severity: FlagSeverity | None = None,
    status: FlagStatus | None = None,
    standing: bool = False,
    waiting: bool = False,
    courier_id: int | None = None,
    shift_id: int | None = None,
    tracking_no: str | None = None,
    raised_from: dt.datetime | None = None,
    raised_to: dt.datetime | None = None,
    after_id: int | None = None,
    cursor: FlagCursor | None = None,
    limit: int = 100,
) -> FlagWalk:
    """A page of ``list_flags`` as a walk reads it, with the next page's cursor.

    A flag is listed where it was opened (``opened_at``, set when the transaction
    raising it stores it), and a push may commit seconds later: by then a page may have
    gone past its place, and the walk's next pages, below that page, never list it (the
    same with ``after``). So a walk's first page (one without ``cursor``) also reads,
    in the same statement (one snapshot), where the walk begins (``as_of``: the latest
    ``opened_at`` of the flags its filters that never change take in, whatever their
    status or courier) and how often those were opened (raised, or opened again) in
    the ``LATE_COMMIT_WINDOW`` before it (a flag committed late was stored in it,
    unless its transaction ran longer); its last page (not full) counts those openings
    again, up to ``as_of``, and answers 410 ``cursor_reset`` when there are more
    (``check_flag_walk``): a flag raised or opened again by a push committed below where
    the walk began, which its pages may have passed. A flag opened again since the walk
    began is above ``as_of``, as is one raised since, so neither counts. So a walk
    ending with ``next_cursor`` null listed every flag matching its filters that was
    opened up to ``as_of`` and committed before its last page was read, within
    ``LATE_COMMIT_WINDOW`` of being stored, but one opened again above its place after
    the walk began (listed at the top then, where a walk begun again finds it) and one
    a decision or a courier changed to match a filter after its place was passed (a
    walk reads each flag's status and courier when its page is read)."""
    fixed = _fixed_filters(
        session=session,
        station_id=station_id,
        kind=kind,
        severity=severity,
        shift_id=shift_id,
        tracking_no=tracking_no,
        raised_from=raised_from,
        raised_to=raised_to,
    )
    query = _page_query(
        fixed,
        status=status,
        standing=standing,
        waiting=waiting,
        courier_id=courier_id,
        station_id=station_id,
        after_id=after_id,
        cursor=cursor,
        limit=limit,
    )
    if cursor is None:
        since = utcnow() - LATE_COMMIT_WINDOW  # before the page's snapshot is taken
        latest = select(func.max(Flag.opened_at)).where(*fixed).scalar_subquery()
        recent = _openings(fixed, since, latest, of_parcel=tracking_no is not None)
        rows = session.execute(query.add_columns(recent.scalar_subquery(), latest)).all()
        items: Sequence[Flag] = [row[0] for row in rows]
        raised, as_of = (rows[0][1], _aware(rows[0][2])) if rows else (0, None)
    else:
        items = session.scalars(query).all()
        raised, as_of, since = cursor.raised, cursor.as_of, cursor.since
    if len(items) < min(limit, MAX_PAGE_SIZE) or not items:
        if cursor is not None:
            check_flag_walk(
                session=session, fixed=fixed, cursor=cursor, of_parcel=tracking_no is not None
            )
        return FlagWalk(items, None, as_of)
    assert as_of is not None
    last = items[-1]
    return FlagWalk(items, FlagCursor(last.opened_at, last.id, as_of, since, raised), as_of)


def _openings(
    fixed: Sequence[ColumnElement[bool]],
    since: dt.datetime,
    up_to: Any,
    *,
    of_parcel: bool,
) -> Select[tuple[int]]:
    """How many times the flags ``fixed`` takes in were opened (raised, or opened again)
    after ``since`` and up to ``up_to``, by their history (``FlagChange``: kept, each
    opening dated where it put its flag in the queue, ``_record``). A flag opened again
    since the walk began is above ``up_to`` then, so no more than it was; one opened
    below it by a push committed late, raised or opened again (resolved hours ago, and
    now above its old place, where the walk's pages no longer find it), is one more. A
    flag is opened when it is raised or later, so the bound on ``opened_at`` holds too:
    it is what the queue's indexes read a range of (``ix_flag_opened``,
    ``ix_flag_station_opened``), the few flags of the last minutes, their histories by
    ``ix_flag_change_flag_id``, not every flag ever kept. ``of_parcel``: a parcel's
    flags, a handful read by its number (``ix_flag_tracking_no``) and their ids, are
    counted whenever opened: a walk of a parcel's flags has no window."""
    query = (
        select(func.count(FlagChange.id))
        .join(Flag, Flag.id == FlagChange.flag_id)
        .where(*fixed, FlagChange.to_status == FlagStatus.OPEN, FlagChange.at <= up_to)
    )
    if of_parcel:
        return query
    return query.where(Flag.opened_at > since, FlagChange.at > since)


def check_flag_walk(
    *,
    session: Session,
    fixed: Sequence[ColumnElement[bool]],
    cursor: FlagCursor,
    of_parcel: bool = False,
) -> None:
    """Refuse a walk's last page (410 ``cursor_reset``) when the flags its fixed
    filters take in were opened more often after ``cursor.since`` and up to where it
    began (``cursor.as_of``) than its first page counted (``_openings``): a flag raised,
    or opened again, by a push committed since, below where the walk began, which its
    pages may have gone past. Read after the page, so a flag committed before the page
    was read is counted."""
    opened = session.scalar(_openings(fixed, cursor.since, cursor.as_of, of_parcel=of_parcel))
    if opened != cursor.raised:
        began = cursor.as_of.isoformat()
        raise CursorReset(
            f"when this walk began, the flags its filters take in (whatever their status "
            f"and courier) had been raised or opened again {cursor.raised} times after "
            f"{cursor.since.isoformat()} and up to {began}; {opened} times now: a flag "
            "stored before the walk began was committed after a page of it was read, "
            "below where it began, and its pages may have gone past it; list the flags "
            "again from the start",
            field="cursor",
        )


def _aware(when: dt.datetime | None) -> dt.datetime | None:
    """A time read by an aggregate, in UTC (SQLite gives it back naive)."""
    if when is None or when.tzinfo is not None:
        return when
    return when.replace(tzinfo=dt.UTC)


def _fixed_filters(
    *,
    session: Session,
    station_id: int | None,
    kind: str | None,
    severity: FlagSeverity | None,
    shift_id: int | None,
    tracking_no: str | None,
    raised_from: dt.datetime | None,
    raised_to: dt.datetime | None,
) -> list[ColumnElement[bool]]:
    """The filters of a flag listing that a flag, once raised, keeps matching or not:
    its station, kind, severity, shift, parcel and when it was raised (a flag may come
    to cite a parcel's event, never cease to)."""
    if raised_from is not None and raised_to is not None and raised_to <= raised_from:
        raise InvalidInput(
            "raised_to must be later than raised_from", code="invalid_range", field="raised_to"
        )
    fixed: list[ColumnElement[bool]] = []
    if station_id is not None:
        fixed.append(Flag.station_id == station_id)
    if kind is not None:
        fixed.append(Flag.kind == kind)
    if severity is not None:
        fixed.append(Flag.severity == severity)
    if shift_id is not None:
        fixed.append(Flag.shift_id == shift_id)
    if tracking_no is not None:
        number = normalize(tracking_no)
        citing = flags_citing_parcel(session=session, tracking_no=number, station_id=station_id)
        about = Flag.tracking_no == number
        fixed.append(or_(about, Flag.id.in_(citing)) if citing else about)
    if raised_from is not None:
        fixed.append(Flag.raised_at >= raised_from)
    if raised_to is not None:
        fixed.append(Flag.raised_at < raised_to)
    return fixed


def _page_query(
    fixed: Sequence[ColumnElement[bool]],
    *,
    status: FlagStatus | None,
    standing: bool,
    waiting: bool,
    courier_id: int | None,
    station_id: int | None,
    after_id: int | None,
    cursor: FlagCursor | None,
    limit: int,
) -> Select[tuple[Flag]]:
    query = (
        select(Flag)
        .where(*fixed)
        .order_by(Flag.opened_at.desc(), Flag.id.desc())
        .limit(min(limit, MAX_PAGE_SIZE))
    )
    if status is not None:
        query = query.where(Flag.status == status)
    if standing:
        query = query.where(Flag.status != FlagStatus.CLOSED)
    if waiting:
        query = query.where(Flag.status.in_(ACTIVE_STATUSES))
    if courier_id is not None:
        query = query.where(Flag.courier_id == courier_id)
    if after_id:
        # Where the flag stands, read only among the flags listed (its station's): one of
        # another station answers as an id naming no flag, not with where it stands.
        found = select(Flag.opened_at).where(Flag.id == after_id)
        if station_id is not None:
            found = found.where(Flag.station_id == station_id)
        stands = found.scalar_subquery()
        query = query.where(*_below(stands, after_id))
    if cursor is not None:
        query = query.where(*_below(cursor.opened_at, cursor.flag_id))
    return query


def _below(opened_at: Any, flag_id: int) -> tuple[ColumnElement[bool], ...]:
    """The flags listed after the place ``(opened_at, flag_id)``. The bound on
    ``opened_at`` alone is what an index condition takes (PostgreSQL reads no row of the
    ``or_`` from an index's range): without it a page began at the queue's top and passed
    over every flag above its place, 9,000 for the 180th page of a year's queue."""
    return (
        Flag.opened_at <= opened_at,
        or_(Flag.opened_at < opened_at, and_(Flag.opened_at == opened_at, Flag.id < flag_id)),
    )


def flags_citing_parcel(
    *, session: Session, tracking_no: str, station_id: int | None = None
) -> list[int]:
    """The ids of the flags about a parcel's stored events that its number does not
    file them under (``Flag.tracking_no`` is None): those of a held event of it
    (``conflicting_duplicate``, ``seq_conflict``), and those of a shift its events were
    filed under or whose seqs its rejected events hold (``late_event_after_signoff``:
    a shift owns its PDA's seqs, arrived, missing or rejected,
    ``sync.lost_seqs.seq_owners``) or of their PDA (``clock_jump``, ``wrong_shift``)
    that cite one of them or a rejected event naming the parcel (``cited_events``). An
    auditor asking for "every flag about RR...GB" gets those too, as its proof lists
    them, and as ``GET /audit?tracking_no=`` lists the entries citing them: a parcel
    whose every event was rejected (a drop refused after the sign-off) has its shift's
    flag too. Read by indexes: the parcel's events and rejected events by its number,
    the shifts owning the rejected events' seqs, then the flags of their shifts, PDAs
    and events by subject (a few per shift or PDA: one per kind); at ``station_id``
    only, if given."""
    from sync.lost_seqs import seq_owners  # sync.lost_seqs reads balances, which read flags

    events = session.scalars(
        select(ScanEvent).where(ScanEvent.tracking_no == tracking_no).order_by(ScanEvent.id)
    ).all()
    rejections = session.execute(
        select(QuarantinedEvent.id, QuarantinedEvent.device_id, QuarantinedEvent.seq).where(
            QuarantinedEvent.parcel_tracking_no == tracking_no
        )
    ).all()
    if not events and not rejections:
        return []
    rejected = {row.id for row in rejections}
    devices = sorted({event.device_id for event in events} | {row.device_id for row in rejections})
    shift_ids = {event.shift_id for event in events if event.shift_id is not None}
    rejected_seqs: dict[str, list[list[int]]] = {}
    for row in rejections:
        if row.seq is not None:
            rejected_seqs.setdefault(row.device_id, []).append([row.seq, row.seq])
    for device_id, seqs in sorted(rejected_seqs.items()):
        shift_ids.update(owned.shift_id for owned in seq_owners(session, device_id, merged(seqs)))
    shifts = sorted(str(shift_id) for shift_id in shift_ids)
    held = sorted({key for event in events for key in event_subject_keys(event)})
    subjects = [and_(Flag.subject_type == "device", Flag.subject_key.in_(devices))]
    if held:
        subjects.append(and_(Flag.subject_type == "event", Flag.subject_key.in_(held)))
    if shifts:
        subjects.append(and_(Flag.subject_type == "shift", Flag.subject_key.in_(shifts)))
    query = select(Flag).where(or_(*subjects))
    if station_id is not None:
        query = query.where(Flag.station_id == station_id)
    found = []
    for flag in session.scalars(query.order_by(Flag.id)):
        cited = cited_events(flag)
        if (
            flag.subject_type == "event"
            or not rejected.isdisjoint(cited.rejected_event_ids)
            or any(cited.names(event) for event in events)
        ):
            found.append(flag.id)
    return found


def event_subject_keys(event: ScanEvent) -> list[str]:
    """The subject keys of the flags about a held event (``sync.ingest``): its id sent
    again with other content, and its seq claimed by another event of its PDA."""
    return [
        FlagSubject.event_sent_again(event.device_id, event.client_event_id).key,
        FlagSubject.event_seq(event.device_id, event.seq).key,
    ]


def get_flag(*, session: Session, flag_id: int) -> Flag:
    flag = session.get(Flag, flag_id)
    if flag is None:
        raise flag_not_found(flag_id)
    return flag


def flag_not_found(flag_id: int) -> NotFound:
    """What ``get_flag`` answers when no flag has ``flag_id``."""
    return NotFound(f"no flag with id {flag_id}", code="flag_not_found")


def flag_changes(*, session: Session, flag: Flag) -> Sequence[FlagChange]:
    """The flag's history, oldest first."""
    return session.scalars(
        select(FlagChange).where(FlagChange.flag_id == flag.id).order_by(FlagChange.id)
    ).all()


@dataclass(frozen=True)
class Decision:
    """A manager's decision on a flag, from its history: acknowledged or resolved, by
    whom, when, with what note."""

    flag_id: int
    status: FlagStatus  # acknowledged, resolved
    by: User
    at: dt.datetime
    note: str | None


def latest_decisions(*, session: Session, flags: Sequence[Flag]) -> dict[int, Decision]:
    """Each of ``flags``' latest decision by a manager, by flag id: those never decided
    have none. A flag opened again since (raised again on more than the decision
    covered) keeps it, its status saying open. One query however many flags, with the
    deciders (``ix_flag_change_flag_id``); none when none of them was ever decided."""
    decided = sorted({flag.id for flag in flags if flag.decision is not None})
    if not decided:
        return {}
    latest = (
        select(func.max(FlagChange.id))
        .where(
            among(session, FlagChange.flag_id, decided),
            FlagChange.by_user_id.is_not(None),
            FlagChange.to_status.in_(DECISIONS),
        )
        .group_by(FlagChange.flag_id)
    )
    return {
        change.flag_id: Decision(change.flag_id, change.to_status, user, change.at, change.note)
        for change, user in session.execute(
            select(FlagChange, User)
            .join(User, User.id == FlagChange.by_user_id)
            .where(FlagChange.id.in_(latest.scalar_subquery()))
        )
    }


# -- managers' decisions ----------------------------------------------------------------------


def acknowledge_flag(
    *,
    session: Session,
    flag: Flag,
    user_id: int,
    note: str | None = None,
    seen_version: str | None = None,
) -> Flag:
    """A manager has seen the flag and is on it: open -> acknowledged.

    With ``seen_version`` (the ``evidence_version`` the manager was shown), refused
    when the evidence has changed since (``_ensure_seen``). An acknowledgement stands
    over later evidence it covers as a resolution does (``judged_status``), so it is
    written to the audit log too (action ``flag_acknowledged``, ``_audit_decision``).
    """
    text = manager_text(note, "note", required=False)
    return _take_decision(session, flag, FlagStatus.ACKNOWLEDGED, user_id, text, seen_version)


def resolve_flag(
    *,
    session: Session,
    flag: Flag,
    user_id: int,
    note: str,
    seen_version: str | None = None,
) -> Flag:
    """A manager settles the flag, saying how: open or acknowledged -> resolved.

    With ``seen_version`` (the ``evidence_version`` the manager was shown), refused
    when the evidence has changed since (``_ensure_seen``). The resolution is also
    written to the audit log (action ``flag_resolved``, ``_audit_decision``).
    """
    text = manager_text(
        note, "note", required=True, missing="say how the flag was resolved in a note"
    )
    return _take_decision(session, flag, FlagStatus.RESOLVED, user_id, text, seen_version)


class _DecisionRule(NamedTuple):
    """What a manager's decision may follow, and the words it is refused and logged in."""

    taken_from: tuple[FlagStatus, ...]
    done: str  # "acknowledged": refused, the flag "cannot be acknowledged"
    rule: str  # the rule a refusal quotes
    doing: str  # "acknowledging": read the flag again before acknowledging it
    action: str  # the audit log's


_DECISION_RULES = {
    FlagStatus.ACKNOWLEDGED: _DecisionRule(
        taken_from=(FlagStatus.OPEN,),
        done="acknowledged",
        rule="only an open flag can be acknowledged",
        doing="acknowledging",
        action="flag_acknowledged",
    ),
    FlagStatus.RESOLVED: _DecisionRule(
        taken_from=ACTIVE_STATUSES,
        done="resolved",
        rule="only an open or acknowledged flag can be resolved",
        doing="resolving",
        action="flag_resolved",
    ),
}


def _take_decision(
    session: Session,
    flag: Flag,
    decision: FlagStatus,
    user_id: int,
    text: str | None,
    seen_version: str | None,
) -> Flag:
    """A manager's ``decision`` on the flag, locked: the same request sent again is
    answered as the first time (``_sent_again``); else refused from a status it may not
    follow or on evidence changed since (``_ensure_seen``), or recorded in the flag's
    history and the audit log."""
    rule = _DECISION_RULES[decision]
    flag = _lock(session, flag)
    if _sent_again(session, flag, decision, user_id, text, seen_version):
        return flag
    if flag.status not in rule.taken_from:
        raise _status_conflict(flag, rule.done, rule.rule)
    _ensure_seen(flag, seen_version, rule.doing)
    previous = flag.status
    _record(session, flag, previous, decision, by=user_id, note=text)
    # On the evidence the manager sees: it stands while the flag's cause stands on no
    # more than that (``judged_status``).
    flag.status = decision
    flag.decision = decision
    flag.decided_on = seen_in(flag.evidence)
    session.flush()
    _audit_decision(session, flag, rule.action, user_id, previous, text)
    return flag


def _audit_decision(
    session: Session,
    flag: Flag,
    action: str,
    user_id: int,
    previous: FlagStatus,
    note: str | None,
) -> None:
    """The decision on the audit log, with what it covered: ``decided_on`` and the
    ``evidence_version`` it was made on. The flag's own ``decided_on`` decides whether
    later evidence stays covered (``judged_status``); this is its tamper-evident
    record, which an auditor can hold it against."""
    audit.append(
        session=session,
        actor_id=user_id,
        action=action,
        subject_type="flag",
        subject_key=str(flag.id),
        details={
            **_entry_details(flag, previous),
            "note": note,
            "evidence_version": evidence_version(flag.evidence),
            "decided_on": flag.decided_on,
        },
        tracking_no=flag.tracking_no,  # a parcel's own flag or its handover's
        parcels=_parcels_cited(session, flag),
    )


def _parcels_cited(session: Session, flag: Flag) -> list[str]:
    """The parcels a flag of no one parcel (a shift's, a PDA's) cites by its events and
    rejected events (``cited_events``). A manager's decision on it (a shift's
    ``late_event_after_signoff``, "the parcel came back late, checked"; a PDA's
    ``clock_jump``, "clock reset, the times are right") is a decision about each of
    them, which an auditor settling a dispute about one finds in its history
    (``GET /audit?tracking_no=``). One statement, for such a flag only."""
    if flag.tracking_no is not None:
        return []
    cited = cited_events(flag)
    return audit.parcels_of_events(
        session,
        sorted(cited.event_ids),
        sorted(cited.rejected_event_ids),
        device_id=cited.device_id,
        client_event_ids=sorted(cited.client_event_ids),
        seqs=sorted(cited.seqs),
    )


@dataclass(frozen=True)
class CitedEvents:
    """The events a flag's evidence names (``cited_in``: past the bound of its lists
    too): by id (``event_ids``), rejected ones by their quarantine id
    (``rejected_event_ids``: ``late_event_after_signoff``), and, a flag of a PDA or of a
    held event of it, by the PDA's id for them (``client_event_ids``: ``clock_jump``,
    ``seq_conflict``) or, a PDA's own flag, by their seqs (``seqs``: ``wrong_shift``; a
    PDA's seqs are its events' own). The one statement of what a flag cites, which a
    proof (``sync.proofs.cites``), a decision's audit entry (``_parcels_cited``) and a
    parcel's flags (``flags_citing_parcel``) read."""

    event_ids: frozenset[int]
    rejected_event_ids: frozenset[int]
    device_id: str | None  # whose events client_event_ids and seqs name
    client_event_ids: frozenset[str]
    seqs: frozenset[int]

    def names(self, event: ScanEvent) -> bool:
        """Whether these name the stored ``event``."""
        return event.id in self.event_ids or (
            event.device_id == self.device_id
            and (str(event.client_event_id) in self.client_event_ids or event.seq in self.seqs)
        )


def cited_events(flag: Flag) -> CitedEvents:
    """What ``flag``'s evidence cites of events (``CitedEvents``); values of another
    type than the key's (evidence is stored JSON) name none."""
    evidence = flag.evidence

    def cited(key: str, kind: type) -> frozenset[Any]:
        found = cited_in(evidence, key, None) or ()
        return frozenset(i for i in found if isinstance(i, kind) and not isinstance(i, bool))

    device = _device_of(flag.subject_type, flag.subject_key)
    return CitedEvents(
        event_ids=cited("event_ids", int),
        rejected_event_ids=cited("rejected_event_ids", int),
        device_id=device,
        client_event_ids=cited("client_event_ids", str) if device is not None else frozenset(),
        seqs=cited("seqs", int) if flag.subject_type == "device" else frozenset(),
    )


def _device_of(subject_type: str, subject_key: str) -> str | None:
    """The PDA a flag's subject is or is of (``FlagSubject``: a device, an event of a
    device by its id or its seq); None for another subject."""
    if subject_type == "device":
        return subject_key
    if subject_type == "event":
        device, mark, _ = subject_key.rpartition("/" if "/" in subject_key else "#")
        return device if mark else None
    return None


def _entry_details(flag: Flag, from_status: FlagStatus) -> dict[str, Any]:
    """What every audit entry about a flag's status says first: the flag (its kind,
    subject and station) and the status it left."""
    return {
        "kind": flag.kind,
        "subject_type": flag.subject_type,
        "subject_key": flag.subject_key,
        "station_id": flag.station_id,
        "from_status": from_status.value,
    }


def _sent_again(
    session: Session,
    flag: Flag,
    decision: FlagStatus,
    user_id: int,
    note: str | None,
    seen_version: str | None,
) -> bool:
    """Whether this decision is the one the flag stands by: its latest change is this
    manager's ``decision`` with this note, on the evidence named (if named). The same
    request sent again after its answer was lost (a dropped connection at 19:00) is
    answered as the first time and writes nothing, as a sign-off sent again is; any
    other decision on a decided flag is refused (``flag_status_conflict``)."""
    if flag.status != decision or seen_version not in (None, evidence_version(flag.evidence)):
        return False
    latest = session.scalar(
        select(FlagChange)
        .where(FlagChange.flag_id == flag.id)
        .order_by(FlagChange.id.desc())
        .limit(1)
    )
    return (
        latest is not None
        and latest.by_user_id == user_id
        and latest.to_status == decision
        and latest.note == note
    )


def _ensure_seen(flag: Flag, seen_version: str | None, deciding: str) -> None:
    """Refuse a decision made on other evidence than the flag's now (409
    ``evidence_changed``): it would cover events the manager was never shown (a late
    batch naming a loss). Without ``seen_version`` the decision covers the evidence as
    it stands."""
    if seen_version is None or seen_version == evidence_version(flag.evidence):
        return
    raise Conflict(
        f"the evidence of flag {flag.id} changed since it was read (a push named more, "
        f"or less): read the flag again before {deciding} it",
        code="evidence_changed",
        field="evidence_version",
    )


def _lock(session: Session, flag: Flag) -> Flag:
    """The flag's row, locked and re-read: two managers acting at once take turns."""
    locked = session.scalar(
        select(Flag)
        .where(Flag.id == flag.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    assert locked is not None
    return locked


def _status_conflict(flag: Flag, wanted: str, rule: str) -> Conflict:
    why = {
        FlagStatus.CLOSED: f"it was closed by the system ({flag.closed_reason})",
        FlagStatus.RESOLVED: "it is already resolved",
        FlagStatus.ACKNOWLEDGED: "it is already acknowledged",
    }.get(flag.status, f"it is {flag.status.value}")
    return Conflict(
        f"flag {flag.id} cannot be {wanted}: {why}; {rule}", code="flag_status_conflict"
    )


def _record(
    session: Session,
    flag: Flag,
    from_status: FlagStatus | None,
    to_status: FlagStatus,
    *,
    by: int | None = None,
    note: str | None = None,
) -> None:
    at = utcnow()
    if to_status == FlagStatus.OPEN:
        if from_status is not None:
            flag.opened_at = at  # opened again: back at the top of the queue
        # An opening is dated where it put the flag in the queue (raised: its
        # ``raised_at``), the instant a walk's check counts it at (``_openings``).
        at = flag.opened_at or at
    session.add(
        FlagChange(
            flag_id=flag.id,
            by_user_id=by,
            from_status=from_status,
            to_status=to_status,
            note=note,
            at=at,
        )
    )
    if by is None and from_status is not None:
        _audit_system_change(session, flag, from_status, to_status, note)
    if to_status in ANNOUNCED:
        _announce(session, flag, to_status, by=by, note=note)
    elif from_status == FlagStatus.CLOSED:
        # Back from closed in the status a manager acknowledged it in (``rejudge``): a
        # station system that heard it closed hears it is back.
        _announce(session, flag, to_status, by=by, note=note, topic="flag.raised")


SYSTEM_CHANGE = "flag_status_changed"  # the audit log's action for the system's changes


def _audit_system_change(
    session: Session,
    flag: Flag,
    from_status: FlagStatus,
    to_status: FlagStatus,
    reason: str | None,
) -> None:
    """The system's change of a raised flag's status on the audit log, as a manager's
    decision is (``_audit_decision``), with no actor: closed (its cause gone: a consent
    arrived, a sweep found the shift closed, a reopening withdrawn, a rejudge), open
    again, or given back the status a manager decided while the cause stands only on
    what they saw. An auditor asking why a flag is no longer open finds who, or what,
    changed it, on the tamper-evident record; the flag's history (``FlagChange``) is not
    that. A flag raised is not an entry: its row and history say so, and a push raising
    flags takes no turn at the log for it. Chained when the transaction commits
    (``audit.append_at_commit``): a sweep closes flags one after another. Filed, as a
    decision is, under the parcels a shift's or a PDA's flag cites (``_parcels_cited``):
    a PDA's ``clock_jump`` opened again on a parcel's scans is in that parcel's history
    beside the resolution it undid."""
    audit.append_at_commit(
        session=session,
        actor_id=None,
        action=SYSTEM_CHANGE,
        subject_type="flag",
        subject_key=str(flag.id),
        details={
            **_entry_details(flag, from_status),
            "to_status": to_status.value,
            "reason": reason,
            "evidence_version": evidence_version(flag.evidence),
            "decision": flag.decision.value if flag.decision is not None else None,
        },
        tracking_no=flag.tracking_no,
        parcels=_parcels_cited(session, flag),
    )


# What a flag's change of status is announced as (every change but acknowledging it).
ANNOUNCED = {
    FlagStatus.OPEN: "flag.raised",
    FlagStatus.RESOLVED: "flag.resolved",
    FlagStatus.CLOSED: "flag.closed",
}


def _announce(
    session: Session,
    flag: Flag,
    status: FlagStatus,
    *,
    by: int | None,
    note: str | None,
    topic: str | None = None,
) -> None:
    """``flag.raised`` (raised, or raised again: open, or back from closed in the status
    a manager acknowledged it in), ``flag.resolved`` (by a manager, or given back the
    resolution a manager made: ``resolved_by`` null) or ``flag.closed`` (by the system,
    its cause gone), through the outbox: a station system that heard of a flag also
    hears that it is over, and that it is back."""
    topic = topic or ANNOUNCED[status]
    raised = topic == "flag.raised"
    if not outbox.wanted(session, topic, flag.station_id):
        return
    data: dict[str, Any] = {
        "flag_id": flag.id,
        "kind": flag.kind,
        "severity": flag.severity,
        "status": status,
        "subject_type": flag.subject_type,
        "subject_key": flag.subject_key,
        "station_id": flag.station_id,
        "shift_id": flag.shift_id,
        "courier_id": flag.courier_id,
    }
    if raised:
        data |= {"evidence": flag.evidence, "raised_at": flag.raised_at or utcnow()}
    elif status == FlagStatus.RESOLVED:
        data |= {"note": note, "resolved_by": by}
    else:
        data |= {"reason": note}
    outbox.announce(
        session=session,
        topic=topic,
        ordering_key=outbox.subject_key(flag.subject_type, flag.subject_key),
        station_id=flag.station_id,
        data=data,
    )


def _locked(
    session: Session, kind: str, subject: FlagSubject, station_id: int | None
) -> Flag | None:
    """The subject's flag of this kind at this station (or of no station), locked."""
    return session.scalar(
        select(Flag)
        .where(
            Flag.kind == kind,
            Flag.subject_type == subject.type,
            Flag.subject_key == subject.key,
            Flag.station_id.is_(None) if station_id is None else Flag.station_id == station_id,
        )
        .with_for_update()
    )


MAX_EVIDENCE_IDS = 200  # a flag's row stays small however often its cause recurs
LATEST_PAST_BOUND = 50  # and still names what the latest raising past that brought
PAST_BOUND = "past_bound"  # the evidence's key for them
NAMED_PAST_BOUND = "named"  # in it: how many ids raisings named past the bound, in all


def _merged(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Later evidence wins per key; lists of ids accumulate, in ``_evidence_order``.

    Each list keeps the first ``MAX_EVIDENCE_IDS`` ids named, what an investigation
    starts from, and never loses one (a proof lists the flags that cite its delivery,
    ``sync.proofs.cites``); of one raising, those it gives first (its caller's order: a
    ``clock_jump`` gives the deliveries first). Past that bound, the latest raising
    that names an id the flag does not cite is cited too, under ``past_bound``: up to
    ``LATEST_PAST_BOUND`` of its ids the lists have no room for, again those it gives
    first, in place of the previous such raising's; and ``past_bound.named`` counts the
    ids raisings named past the bound that the flag did not cite then, cited or not.
    So a raising that brings what no decision covered changes the flag's
    ``evidence_version`` (the count only grows), and the flag names what reopened it:
    a manager finds the delivery, and its proof lists the flag. The row stays bounded
    (``MAX_EVIDENCE_IDS`` + ``LATEST_PAST_BOUND`` ids per list). Naming again only ids
    it cites changes nothing (re-running a check). The ``ACCOMPANYING`` lists accumulate
    so too, their ids past the bound uncounted (the events they go with are)."""
    merged = {**old, **new}
    past = dict(old.get(PAST_BOUND) or {})
    for key in (*ACCUMULATED, *ACCOMPANYING):
        if key in old or key in new:
            kept = set(old.get(key, []))
            added = [value for value in dict.fromkeys(new.get(key, [])) if value not in kept]
            room = max(MAX_EVIDENCE_IDS - len(kept), 0)
            merged[key] = sorted(kept.union(added[:room]), key=_evidence_order)
            beyond = added[room:]
            uncited = set(beyond).difference(past.get(key, []))
            if uncited:
                latest = beyond[:LATEST_PAST_BOUND]
                past[key] = sorted(latest, key=_evidence_order)
                if key in ACCUMULATED:
                    past[NAMED_PAST_BOUND] = past.get(NAMED_PAST_BOUND, 0) + len(uncited)
    if past:
        merged[PAST_BOUND] = past
    return merged


def _in_order(value: Any) -> Any:
    """A list of evidence in ``_evidence_order``, once each; one value as it is."""
    return sorted(set(value), key=_evidence_order) if isinstance(value, list) else value


def _evidence_order(value: Any) -> tuple[Any, ...]:
    """Numbers first, by value; then strings, a ``device#seq`` by device then seq
    number (``PDA-1#9`` before ``PDA-1#10``)."""
    if not isinstance(value, str):
        return (0, value)
    named = split_device_seq(value)
    return (1, value, -1) if named is None else (1, *named)
