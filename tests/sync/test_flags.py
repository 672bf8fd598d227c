"""Flags: their history of changes, listing, and managers' acknowledge and resolve."""

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models import AuditEntry, Flag, FlagChange, FlagSeverity, FlagStatus, Station, User
from sync import audit
from sync.errors import Conflict, InvalidInput, NotFound
from sync.flags import (
    KINDS,
    LATEST_PAST_BOUND,
    MAX_EVIDENCE_IDS,
    FlagSubject,
    RaisedFlag,
    acknowledge_flag,
    cited_in,
    close_flag,
    close_flags,
    covers,
    evidence_version,
    flag_changes,
    get_flag,
    list_flags,
    raise_flag,
    raise_new_flags,
    resolve_flag,
    seen_in,
)
from tests import factories


@dataclass
class Setup:
    station: Station
    other_station: Station
    manager: User
    courier: User
    other_courier: User


@pytest.fixture
def setup(session: Session) -> Setup:
    station = factories.station(session, "ST1")
    other = factories.station(session, "ST2")
    return Setup(
        station=station,
        other_station=other,
        manager=factories.user(session, "manager1", "station_manager", station),
        courier=factories.user(session, "courier1", "courier", station),
        other_courier=factories.user(session, "courier2", "courier", station),
    )


def flag(
    session: Session,
    station: Station,
    key: str = "RR473124829GB",
    kind: str = "unknown_parcel",
    severity: FlagSeverity = FlagSeverity.WARNING,
    **kw: Any,
) -> Flag:
    raised = raise_flag(
        session=session,
        kind=kind,
        severity=severity,
        subject=FlagSubject("parcel", key),
        station_id=station.id,
        evidence={"event_ids": [1]},
        **kw,
    )
    session.flush()
    return raised.flag


def history(session: Session, f: Flag) -> list[tuple[Any, ...]]:
    return [
        (c.from_status, c.to_status, c.by_user_id, c.note)
        for c in flag_changes(session=session, flag=f)
    ]


# -- raising and closing record their changes --------------------------------------------------


def test_raising_records_the_flag_opening_once(session: Session, setup: Setup) -> None:
    f = flag(session, setup.station, courier_id=setup.courier.id)
    assert f.courier_id == setup.courier.id and f.status == FlagStatus.OPEN
    again = raise_flag(
        session=session,
        kind="unknown_parcel",
        severity=FlagSeverity.WARNING,
        subject=FlagSubject("parcel", f.subject_key),
        station_id=setup.station.id,
        evidence={"event_ids": [2]},
    )
    assert again.flag is f and not again.new
    assert f.evidence["event_ids"] == [1, 2]
    assert f.courier_id == setup.courier.id  # not given: kept
    assert history(session, f) == [(None, FlagStatus.OPEN, None, None)]


def test_each_opening_is_dated_where_it_put_the_flag_in_the_queue(
    session: Session, setup: Setup
) -> None:
    """A walk through the flags counts their openings up to where it began, an
    ``opened_at``, by their history (``sync.flags.check_flag_walk``): each opening,
    raised one by one, in a batch, or opened again, is dated at the very instant it put
    its flag in the queue. Dated a moment later (when its row was flushed), the top
    flag's opening fell past where a walk began, and its last page counted one less than
    its first: a 410 for nothing."""
    one = flag(session, setup.station, "RR1")
    (batched,) = raise_new_flags(
        session=session,
        flags=[
            Flag(
                kind="unknown_parcel",
                severity=FlagSeverity.WARNING,
                subject_type="parcel",
                subject_key="RR2",
                station_id=setup.station.id,
                evidence={"event_ids": [2]},
            )
        ],
    )
    closed = flag(session, setup.station, "RR3")
    close_flag(
        session=session, kind=closed.kind, subject=FlagSubject("parcel", "RR3"), reason="gone"
    )
    assert flag(session, setup.station, "RR3") is closed and closed.status == FlagStatus.OPEN
    session.flush()
    session.expire_all()
    for raised in (one, batched, closed):
        openings = session.scalars(
            select(FlagChange.at).where(
                FlagChange.flag_id == raised.id, FlagChange.to_status == FlagStatus.OPEN
            )
        ).all()
        assert openings[0] == raised.raised_at, raised.subject_key
        assert openings[-1] == raised.opened_at, raised.subject_key
    assert closed.opened_at > closed.raised_at  # opened again: a place of its own


def test_the_latest_courier_given_is_stored(session: Session, setup: Setup) -> None:
    f = flag(session, setup.station)
    assert f.courier_id is None
    flag(session, setup.station, courier_id=setup.other_courier.id)
    assert f.courier_id == setup.other_courier.id


def test_closing_and_raising_again_are_recorded_with_the_reason(
    session: Session, setup: Setup
) -> None:
    f = flag(session, setup.station)
    subject = FlagSubject("parcel", f.subject_key)
    close_flag(session=session, kind=f.kind, subject=subject, reason="taken in")
    assert close_flag(session=session, kind=f.kind, subject=subject, reason="twice") is f
    assert flag(session, setup.station) is f and f.status == FlagStatus.OPEN
    session.flush()
    assert history(session, f) == [
        (None, FlagStatus.OPEN, None, None),
        (FlagStatus.OPEN, FlagStatus.CLOSED, None, "taken in"),
        (FlagStatus.CLOSED, FlagStatus.OPEN, None, "raised again"),
    ]


def test_close_flags_records_each_flag_it_closes(session: Session, setup: Setup) -> None:
    a, b = flag(session, setup.station, "A1"), flag(session, setup.station, "B2")
    acknowledge_flag(session=session, flag=b, user_id=setup.manager.id, note=None)
    c = flag(session, setup.station, "C3")
    closed = close_flags(
        session=session,
        kind="unknown_parcel",
        subjects=[FlagSubject("parcel", k) for k in ("A1", "B2", "ZZ")],
        reason="taken in",
    )
    assert {x.id for x in closed} == {a.id, b.id}
    session.flush()
    assert history(session, a)[-1] == (FlagStatus.OPEN, FlagStatus.CLOSED, None, "taken in")
    assert history(session, b)[-1] == (
        FlagStatus.ACKNOWLEDGED,
        FlagStatus.CLOSED,
        None,
        "taken in",
    )
    assert len(history(session, c)) == 1 and c.status == FlagStatus.OPEN


def system_entries(session: Session) -> list[tuple[Any, ...]]:
    return [
        (e.actor_id, e.subject_key, e.details["from_status"], e.details["to_status"])
        + (e.details["reason"], e.tracking_no)
        for e in session.scalars(
            select(AuditEntry)
            .where(AuditEntry.action == "flag_status_changed")
            .order_by(AuditEntry.id)
        )
    ]


def test_every_change_the_system_makes_to_a_flag_is_audit_logged(
    session: Session, setup: Setup
) -> None:
    """An auditor asking why a flag a manager acknowledged is closed, or open again, finds
    it on the tamper-evident log, by the system (no actor) and why, as a manager's
    decision is; it was in the flag's own history alone, which a writer to the database
    rewrites unseen. A flag raised is no entry (its row says so); entries are chained
    when the transaction commits, after every flag it locks, and none if it rolls back."""
    f = flag(session, setup.station)
    acknowledge_flag(session=session, flag=f, user_id=setup.manager.id, note="on it")
    subject = FlagSubject("parcel", f.subject_key)
    close_flag(session=session, kind=f.kind, subject=subject, reason="taken in")
    raise_flag(
        session=session,
        kind=f.kind,
        severity=f.severity,
        subject=subject,
        station_id=setup.station.id,
        evidence={"event_ids": [2]},
    )
    assert system_entries(session) == []  # held for the commit
    session.commit()
    key = str(f.id)
    assert system_entries(session) == [
        (None, key, "acknowledged", "closed", "taken in", f.subject_key),
        (None, key, "closed", "open", "raised again", f.subject_key),
    ]
    [first, _] = session.scalars(
        select(AuditEntry)
        .where(AuditEntry.action == "flag_status_changed")
        .order_by(AuditEntry.id)
    )
    assert first.details["decision"] == "acknowledged"
    assert first.details["evidence_version"] == evidence_version({"event_ids": [1]})
    close_flag(session=session, kind=f.kind, subject=subject, reason="rolled back")
    session.rollback()
    session.commit()
    assert len(system_entries(session)) == 2
    assert audit.verify(session=session).ok
    assert [e.id for e in audit.list_entries(session=session, tracking_no=f.subject_key)] == [
        e.id for e in session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()))
    ]


# -- acknowledge and resolve ------------------------------------------------------------------


def test_acknowledge_then_resolve(session: Session, setup: Setup) -> None:
    f = flag(session, setup.station)
    acknowledge_flag(session=session, flag=f, user_id=setup.manager.id, note=" on it ")
    assert f.status == FlagStatus.ACKNOWLEDGED
    resolve_flag(session=session, flag=f, user_id=setup.manager.id, note="parcel found")
    assert f.status == FlagStatus.RESOLVED
    assert history(session, f)[1:] == [
        (FlagStatus.OPEN, FlagStatus.ACKNOWLEDGED, setup.manager.id, "on it"),
        (FlagStatus.ACKNOWLEDGED, FlagStatus.RESOLVED, setup.manager.id, "parcel found"),
    ]


def test_resolving_writes_the_audit_log(session: Session, setup: Setup) -> None:
    f = flag(session, setup.station)
    resolve_flag(session=session, flag=f, user_id=setup.manager.id, note="parcel found")
    entry = session.scalars(select(AuditEntry)).one()
    assert (entry.action, entry.actor_id, entry.subject_type, entry.subject_key) == (
        "flag_resolved",
        setup.manager.id,
        "flag",
        str(f.id),
    )
    assert entry.details == {
        "kind": "unknown_parcel",
        "subject_type": "parcel",
        "subject_key": f.subject_key,
        "station_id": setup.station.id,
        "from_status": "open",
        "note": "parcel found",
        "evidence_version": evidence_version({"event_ids": [1]}),
        "decided_on": {"event_ids": [1]},
    }
    session.commit()
    assert audit.verify(session=session).ok


def test_acknowledging_writes_the_audit_log_with_what_it_covered(
    session: Session, setup: Setup
) -> None:
    """An acknowledgement stands over later evidence it covers as a resolution does:
    what it covered is on the tamper-evident log, not only in the flag's row."""
    f = flag(session, setup.station)
    acknowledge_flag(session=session, flag=f, user_id=setup.manager.id)
    entry = session.scalars(select(AuditEntry)).one()
    assert (entry.action, entry.actor_id, entry.subject_key) == (
        "flag_acknowledged",
        setup.manager.id,
        str(f.id),
    )
    assert entry.details["note"] is None and entry.details["from_status"] == "open"
    assert entry.details["decided_on"] == {"event_ids": [1]} == f.decided_on
    assert entry.details["evidence_version"] == evidence_version(f.evidence)


@pytest.mark.parametrize("note", ["", "   ", None])
def test_resolving_needs_a_note(session: Session, setup: Setup, note: Any) -> None:
    f = flag(session, setup.station)
    with pytest.raises(InvalidInput) as raised:
        resolve_flag(session=session, flag=f, user_id=setup.manager.id, note=note)
    assert (raised.value.code, raised.value.field) == ("note_required", "note")
    assert f.status == FlagStatus.OPEN


def test_a_note_too_long_is_refused(session: Session, setup: Setup) -> None:
    f = flag(session, setup.station)
    with pytest.raises(InvalidInput) as raised:
        acknowledge_flag(session=session, flag=f, user_id=setup.manager.id, note="x" * 2001)
    assert raised.value.code == "note_too_long"


def _closed(session: Session, setup: Setup) -> Flag:
    f = flag(session, setup.station)
    close_flag(
        session=session, kind=f.kind, subject=FlagSubject("parcel", f.subject_key), reason="gone"
    )
    return f


def _acknowledged(session: Session, setup: Setup) -> Flag:
    f = flag(session, setup.station)
    acknowledge_flag(session=session, flag=f, user_id=setup.manager.id, note=None)
    return f


def _resolved(session: Session, setup: Setup) -> Flag:
    f = flag(session, setup.station)
    resolve_flag(session=session, flag=f, user_id=setup.manager.id, note="done")
    return f


@pytest.mark.parametrize(
    ("make", "action"),
    [
        (_acknowledged, "acknowledge"),
        (_resolved, "acknowledge"),
        (_closed, "acknowledge"),
        (_resolved, "resolve"),
        (_closed, "resolve"),
    ],
)
def test_invalid_transitions_are_a_conflict_and_change_nothing(
    session: Session, setup: Setup, make: Any, action: str
) -> None:
    f = make(session, setup)
    status, changes = f.status, len(history(session, f))
    audit_entries = len(session.scalars(select(AuditEntry)).all())
    decide = acknowledge_flag if action == "acknowledge" else resolve_flag
    with pytest.raises(Conflict) as raised:
        decide(session=session, flag=f, user_id=setup.manager.id, note="again")
    assert raised.value.code == "flag_status_conflict"
    assert f.status == status
    assert len(history(session, f)) == changes
    assert len(session.scalars(select(AuditEntry)).all()) == audit_entries


def test_a_conflict_says_why(session: Session, setup: Setup) -> None:
    f = _closed(session, setup)
    with pytest.raises(Conflict, match="closed by the system \\(gone\\)"):
        resolve_flag(session=session, flag=f, user_id=setup.manager.id, note="x")


@pytest.mark.parametrize("action", ["acknowledge", "resolve"])
def test_a_decision_on_evidence_that_changed_since_it_was_read_is_refused(
    session: Session, setup: Setup, action: str
) -> None:
    """The manager reads the flag on event 1; a late batch names event 9 before they
    decide. Deciding on what they read would cover event 9 unseen (a parcel lost on the
    route, settled as "in the van"): refused, as a sign-off on a changed balance is."""
    f = flag(session, setup.station)
    shown = evidence_version(f.evidence)
    _raised_again(session, f, setup.station.id)
    decide = acknowledge_flag if action == "acknowledge" else resolve_flag
    with pytest.raises(Conflict) as raised:
        decide(session=session, flag=f, user_id=setup.manager.id, note="x", seen_version=shown)
    assert (raised.value.code, raised.value.field) == ("evidence_changed", "evidence_version")
    assert "read the flag again" in raised.value.message
    assert (f.status, f.decision) == (FlagStatus.OPEN, None)
    assert len(history(session, f)) == 1
    now = evidence_version(f.evidence)
    decide(session=session, flag=f, user_id=setup.manager.id, note="x", seen_version=now)
    assert f.decision == action + "d" and f.decided_on == {"event_ids": [1, 9]}


def test_the_evidence_version_is_of_what_the_evidence_names() -> None:
    """Events, missing images, pushes and seqs (a ``time_inversion`` names its pairs
    so), in any order, a PDA's silence; not the evidence's other facts (a count, a
    device)."""
    shown = evidence_version({"event_ids": [1, 2], "blobs": ["a"], "device_id": "PDA-1"})
    assert evidence_version({"blobs": ["a"], "event_ids": [2, 1], "count": 3}) == shown
    assert evidence_version({"event_ids": [1, 2, 3], "blobs": ["a"]}) != shown
    assert evidence_version({"event_ids": [1, 2], "blobs": ["a", "b"]}) != shown
    pairs = evidence_version({"device_seqs": ["PDA-1#9", "PDA-1#10"]})
    assert evidence_version({"device_seqs": ["PDA-1#10", "PDA-1#9"]}) == pairs
    assert evidence_version({"device_seqs": ["PDA-1#9", "PDA-1#10", "PDA-2#3"]}) != pairs
    assert evidence_version({}) == evidence_version({"event_ids": [], "seqs": []})
    # a PDA's flags: a clock_jump names its events by the PDA's ids for them, a
    # stale_device the silence it is about (not how long it has lasted)
    jumped = evidence_version({"client_event_ids": ["b", "a"], "events_behind": 2})
    assert evidence_version({"client_event_ids": ["a", "b"], "events_behind": 9}) == jumped
    assert evidence_version({"client_event_ids": ["a", "c"]}) != jumped
    silence = {"shift_id": 7, "last_push_at": None, "silent_minutes": 50}
    assert evidence_version({**silence, "silent_minutes": 80}) == evidence_version(silence)
    assert evidence_version({**silence, "shift_id": 8}) != evidence_version(silence)
    pushed = {**silence, "last_push_at": "2026-12-04T10:00:00+00:00"}
    assert evidence_version(pushed) != evidence_version(silence)


def test_every_kind_the_engine_raises_is_known() -> None:
    """The flag queue's Kind filter offers ``KINDS`` and the API refuses any other: a
    kind raised but not listed could not be found."""
    from sync import handover, rules, shifts, sweeps, webhooks

    constants = {
        *rules.SEVERITY,
        *handover.HANDOVER_KINDS,
        shifts.LATE_EVENT,
        shifts.WRONG_SHIFT,
        shifts.NOT_CLOSED,
        sweeps.STALE_DEVICE,
        sweeps.BLOB_MISSING_AT_HANDOVER,
        webhooks.SUBSCRIPTION_DISABLED,
    }
    # The push names its kinds where it raises them: ``self._flag("clock_skew", ...``.
    ingest = Path(rules.__file__).with_name("ingest.py").read_text()
    literals = set(re.findall(r'_flag\(\s*"(\w+)"', ingest))
    assert {"clock_skew", "unknown_parcel", "wrong_station"} <= literals
    assert constants | literals <= set(KINDS)
    assert list(KINDS) == sorted(set(KINDS))


def test_every_critical_kind_unbalances_the_handover_it_cites() -> None:
    """A clean handover (``sync.signoffs``, the board's bulk sign-off) is refused while
    its balance is not balanced; it does not read the parcels' other flags. That
    refuses a shift with a critical flag of any kind only while each critical kind
    is one the balance counts (rule 5: missing, no POD, an unauthorized drop, two
    final outcomes): a kind raised critical outside the balance would be signed off
    with the others, unseen. The warnings it lets through (``far_from_address``, a
    PDA's clock) stay in the flag queue, which a sign-off settles nothing of."""
    from sync import balances, handover, rules

    critical = {
        kind
        for severities in (rules.SEVERITY, balances.HANDOVER_SEVERITY)
        for kind, severity in severities.items()
        if severity == FlagSeverity.CRITICAL
    }
    assert critical <= handover.BALANCE_RULE_KINDS | set(handover.HANDOVER_KINDS), critical
    # No module raises a critical flag but through those two tables.
    sync_dir = Path(rules.__file__).parent
    naming = {p.name for p in sync_dir.glob("*.py") if "FlagSeverity.CRITICAL" in p.read_text()}
    assert naming == {"rules.py", "balances.py"}, naming


def _raised_again(
    session: Session, flag: Flag, station_id: int, event_ids: list[int] | None = None
) -> RaisedFlag:
    """``flag``'s fault found again, citing ``event_ids`` (event 9), at ``station_id``."""
    return raise_flag(
        session=session,
        kind=flag.kind,
        severity=flag.severity,
        subject=FlagSubject("parcel", flag.subject_key),
        station_id=station_id,
        evidence={"event_ids": event_ids or [9]},
    )


def test_a_resolved_flag_raised_again_on_what_it_was_resolved_on_stays_resolved(
    session: Session, setup: Setup
) -> None:
    f = _resolved(session, setup)
    raised = raise_flag(
        session=session,
        kind=f.kind,
        severity=f.severity,
        subject=FlagSubject("parcel", f.subject_key),
        station_id=setup.station.id,
        evidence={"event_ids": [1], "device_id": "PDA-2"},
    )
    assert not raised.new and f.status == FlagStatus.RESOLVED
    assert f.evidence == {"event_ids": [1], "device_id": "PDA-2"}


@pytest.mark.parametrize("make", [_acknowledged, _resolved])
def test_a_decided_flag_raised_again_on_more_is_open_again(
    session: Session, setup: Setup, make: Any
) -> None:
    """The decision covered event 1; the fault is found again on event 9, which nobody
    saw: the flag is open again (a PDA's ``clock_jump`` jumping again), and the history
    says why."""
    f = make(session, setup)
    raised = _raised_again(session, f, setup.station.id)
    assert raised.new and f.status == FlagStatus.OPEN
    assert f.evidence["event_ids"] == [1, 9] and f.decided_on == {"event_ids": [1]}
    assert history(session, f)[-1][1:] == (
        FlagStatus.OPEN,
        None,
        "raised again on evidence the decision did not cover",
    )


def test_a_decision_covers_each_thing_a_flag_names() -> None:
    """Events, by id or their PDA's id for them, seqs, missing images item by item; a
    PDA's silence (its shift, its last push) as a whole. A decision recorded before the
    flag's evidence was named by more is compared on what it recorded."""
    seen = {"client_event_ids": ["a", "b"], "seqs": [3], "shift_id": 7, "last_push_at": None}
    assert covers(seen, {**seen, "client_event_ids": ["b"], "silent_minutes": 90})
    assert not covers(seen, {**seen, "client_event_ids": ["a", "c"]})
    assert not covers(seen, {**seen, "seqs": [3, 4]})
    assert not covers(seen, {**seen, "shift_id": 8})
    assert not covers(seen, {**seen, "last_push_at": "2026-12-04T10:00:00+00:00"})
    assert covers({"event_ids": [1]}, {"event_ids": [1], "client_event_ids": ["z"]})
    assert covers({}, {"client_event_ids": ["z"]}) and not covers(None, {})
    # A decision recorded on no events covers none (not an error).
    assert not covers({}, {"event_ids": [1]})


def test_a_flag_keeps_citing_what_it_cited_up_to_the_bound(session: Session) -> None:
    """A PDA's ``clock_jump`` names its jumped events as the PDA does (by their client
    ids, which sort in no time order): one cited stays cited however many later pushes
    jump, or a delivery's proof would lose the flag; past the bound a raising adds
    what it gives first."""
    subject = FlagSubject("device", "PDA-1")

    def jumped(ids: list[str]) -> Flag:
        return raise_flag(
            session=session,
            kind="clock_jump",
            severity=FlagSeverity.WARNING,
            subject=subject,
            station_id=None,
            evidence={"client_event_ids": ids},
        ).flag

    first = [f"f{n:03}" for n in range(MAX_EVIDENCE_IDS - 2)]
    f = jumped(first)
    jumped(["z-delivery", "a-scan", "b-scan", "c-scan"])
    assert f.evidence["client_event_ids"] == sorted([*first, "z-delivery", "a-scan"])


def _jumped(session: Session, ids: list[str]) -> Flag:
    """PDA-1's ``clock_jump`` raised on a push's jumped events, by their client ids."""
    return raise_flag(
        session=session,
        kind="clock_jump",
        severity=FlagSeverity.WARNING,
        subject=FlagSubject("device", "PDA-1"),
        station_id=None,
        evidence={"client_event_ids": ids, "events_behind": len(ids)},
    ).flag


def test_past_the_bound_the_latest_raising_is_cited_and_changes_the_version(
    session: Session,
) -> None:
    """A PDA's afternoon of scans fills its ``clock_jump``'s list (``MAX_EVIDENCE_IDS``);
    the manager reads the flag; the PDA's next push jumps again. The flag cites that
    push's ids (``past_bound``, what it gives first), counts them, and its version
    changes: a decision on the read is refused, and the manager finds the delivery. The
    next push past the bound takes the place of this one; the count never comes back,
    so neither does a version read before. Naming again only what it cites changes
    nothing."""
    first = [f"f{n:03}" for n in range(MAX_EVIDENCE_IDS + 3)]
    f = _jumped(session, first)
    assert f.evidence["client_event_ids"] == first[:MAX_EVIDENCE_IDS]
    assert f.evidence["past_bound"] == {"client_event_ids": first[MAX_EVIDENCE_IDS:], "named": 3}
    read = evidence_version(f.evidence)

    _jumped(session, ["z-delivery", "a-scan"])
    assert f.evidence["client_event_ids"] == first[:MAX_EVIDENCE_IDS]  # kept
    assert f.evidence["past_bound"] == {"client_event_ids": ["a-scan", "z-delivery"], "named": 5}
    assert "z-delivery" in cited_in(f.evidence, "client_event_ids")
    assert evidence_version(f.evidence) != read
    again = evidence_version(f.evidence)
    _jumped(session, ["z-delivery", first[0]])  # a check run again: nothing new
    assert evidence_version(f.evidence) == again

    # The previous push past the bound named again: cited again, counted again.
    _jumped(session, [first[-1]])
    assert f.evidence["past_bound"] == {"client_event_ids": [first[-1]], "named": 6}
    assert evidence_version(f.evidence) not in (read, again)

    # However large a push, the row stays bounded: what the push gives first is cited.
    many = [f"m{n:03}" for n in range(LATEST_PAST_BOUND * 2)]
    _jumped(session, many)
    assert f.evidence["past_bound"] == {
        "client_event_ids": many[:LATEST_PAST_BOUND],
        "named": 6 + len(many),
    }


def test_a_decision_past_the_bound_covers_what_it_saw_and_no_later_raising(
    session: Session, setup: Setup
) -> None:
    """A flag of any kind whose events accumulate (here a parcel's ``unknown_parcel``):
    resolved with its list full and a raising past it cited, it records both; raised
    again on those, it stays resolved; on another event past the bound it is open."""
    kept = list(range(1, MAX_EVIDENCE_IDS + 2))
    f = raise_flag(
        session=session,
        kind="unknown_parcel",
        severity=FlagSeverity.WARNING,
        subject=FlagSubject("parcel", "RR473124829GB"),
        station_id=setup.station.id,
        evidence={"event_ids": kept},
    ).flag
    session.flush()
    resolve_flag(session=session, flag=f, user_id=setup.manager.id, note="taken in")
    assert f.decided_on == {"event_ids": kept}
    assert not _raised_again(session, f, setup.station.id, [kept[-1]]).new
    assert f.status == FlagStatus.RESOLVED
    assert _raised_again(session, f, setup.station.id, [999]).new
    assert f.status == FlagStatus.OPEN and cited_in(f.evidence, "event_ids")[-1] == 999


def test_the_same_fault_raised_at_another_station_is_that_stations_own_flag(
    session: Session, setup: Setup
) -> None:
    """A parcel or a device moves between stations: the flag one station resolved stays
    resolved, and the other station's manager gets the new finding in their queue."""
    f = _resolved(session, setup)
    raised = _raised_again(session, f, setup.other_station.id)
    session.flush()
    assert raised.new and raised.flag is not f
    assert (raised.flag.station_id, raised.flag.status) == (setup.other_station.id, "open")
    assert raised.flag.evidence["event_ids"] == [9]
    assert (f.station_id, f.status, f.evidence["event_ids"]) == (setup.station.id, "resolved", [1])
    # Raised again at either station, each merges into its own.
    assert flag(session, setup.other_station) is raised.flag
    assert flag(session, setup.station) is f
    # The cause gone for the subject: every station's open flag of it closes.
    subject = FlagSubject("parcel", f.subject_key)
    assert close_flag(session=session, kind=f.kind, subject=subject, reason="gone") is raised.flag
    assert (f.status, raised.flag.status) == (FlagStatus.RESOLVED, FlagStatus.CLOSED)


def test_a_flag_of_no_station_is_one_per_kind_and_subject(session: Session) -> None:
    """NULLs are distinct in a unique constraint: a partial unique index keeps these."""
    subject = FlagSubject("subscription", "7")
    raised = [
        raise_flag(
            session=session,
            kind="subscription_disabled",
            severity=FlagSeverity.WARNING,
            subject=subject,
            station_id=None,
            evidence={"failures": n},
        )
        for n in (1, 2)
    ]
    assert raised[0].flag is raised[1].flag and not raised[1].new
    session.add(
        Flag(
            kind="subscription_disabled",
            severity=FlagSeverity.WARNING,
            subject_type=subject.type,
            subject_key=subject.key,
            station_id=None,
            evidence={},
            status=FlagStatus.OPEN,
        )
    )
    with pytest.raises(IntegrityError):
        session.flush()


# -- reading ----------------------------------------------------------------------------------


def test_get_flag(session: Session, setup: Setup) -> None:
    f = flag(session, setup.station)
    assert get_flag(session=session, flag_id=f.id) is f
    with pytest.raises(NotFound) as raised:
        get_flag(session=session, flag_id=f.id + 1000)
    assert raised.value.code == "flag_not_found"


def test_list_flags_filters(session: Session, setup: Setup) -> None:
    base = dt.datetime(2026, 11, 20, 8, tzinfo=dt.UTC)
    a = flag(session, setup.station, "A", courier_id=setup.courier.id)
    b = flag(session, setup.station, "B", kind="clock_skew", severity=FlagSeverity.CRITICAL)
    c = flag(session, setup.other_station, "C", courier_id=setup.other_courier.id)
    d = _resolved(session, setup)
    for i, f in enumerate((a, b, c, d)):
        f.raised_at = base + dt.timedelta(days=i)
    session.flush()

    def ids(**filters: Any) -> list[int]:
        return [f.id for f in list_flags(session=session, **filters)]

    assert ids() == [d.id, c.id, b.id, a.id]  # newest first
    assert ids(station_id=setup.station.id) == [d.id, b.id, a.id]
    assert ids(kind="clock_skew") == [b.id]
    assert ids(severity=FlagSeverity.CRITICAL) == [b.id]
    assert ids(status=FlagStatus.RESOLVED) == [d.id]
    assert ids(courier_id=setup.other_courier.id) == [c.id]
    assert ids(raised_from=base + dt.timedelta(days=1)) == [d.id, c.id, b.id]
    assert ids(raised_to=base + dt.timedelta(days=1)) == [a.id]
    assert ids(raised_from=base + dt.timedelta(days=1), raised_to=base + dt.timedelta(days=2)) == [
        b.id
    ]
    assert ids(station_id=setup.station.id, status=FlagStatus.OPEN, kind="unknown_parcel") == [
        a.id
    ]
    with pytest.raises(InvalidInput) as raised:
        ids(raised_from=base, raised_to=base)
    assert raised.value.field == "raised_to"


def test_list_flags_pages_by_keyset(session: Session, setup: Setup) -> None:
    made = [flag(session, setup.station, f"K{i}") for i in range(5)]
    first = list_flags(session=session, limit=2)
    second = list_flags(session=session, limit=2, after_id=first[-1].id)
    third = list_flags(session=session, limit=2, after_id=second[-1].id)
    assert [f.id for f in [*first, *second, *third]] == [f.id for f in reversed(made)]


def test_flag_changes_are_not_shared_between_flags(session: Session, setup: Setup) -> None:
    a, b = flag(session, setup.station, "A"), flag(session, setup.station, "B")
    acknowledge_flag(session=session, flag=a, user_id=setup.manager.id, note=None)
    assert len(history(session, a)) == 2 and len(history(session, b)) == 1
    assert session.scalars(select(FlagChange)).all()  # stored, not only pending


def test_rejected_events_a_flag_names_are_seen_by_a_decision_and_change_its_version() -> None:
    """``rejected_event_ids`` (a shift reopened by a rejected event) is what a decision
    covers and ``evidence_version`` digests, as ``event_ids`` are; a flag naming none has
    the version it had before the key was named, and a decision recorded without it saw
    none."""
    plain = {"event_ids": [1]}
    assert evidence_version(plain) == evidence_version({**plain, "rejected_event_ids": []})
    with_rejected = {**plain, "rejected_event_ids": [7]}
    assert evidence_version(with_rejected) != evidence_version(plain)
    assert not covers({"event_ids": [1]}, with_rejected)
    assert covers({"event_ids": [1], "rejected_event_ids": [7]}, with_rejected)
    assert seen_in(with_rejected) == {"event_ids": [1], "rejected_event_ids": [7]}
