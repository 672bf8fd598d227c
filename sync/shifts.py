"""Shifts: opened at the station, closed at the return, signed off by a manager.

A shift is a courier's session on one PDA (DESIGN.md "Shift"). Its manifest
and balance are computed from the scan events filed under it; this module
keeps its life: opening, closing, sign-off, and reopening when an event lands
after the sign-off (``late_event_after_signoff``).

Which shift an event belongs to (``ShiftFiler``): the one the PDA named, when it
is the courier's on that PDA; else the one whose declared seqs hold it (another
courier's too: a handover's queue; a shift that declared no first seq starts where
its balance counts from); else the courier's shift the PDA had open when
the event happened, on the corrected clock. A PDA naming a shift that is not its
own is flagged (``wrong_shift``) and its event is filed by the other rules.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from sqlalchemy import (
    ColumnElement,
    FromClause,
    ScalarSelect,
    and_,
    bindparam,
    case,
    false,
    func,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models import (
    Device,
    DeviceSyncState,
    Flag,
    FlagSeverity,
    QuarantinedEvent,
    ScanEvent,
    Shift,
    ShiftStatus,
    Station,
    User,
    utcnow,
)
from sync import audit, outbox
from sync.acks import highest_held
from sync.device_state import held_max_seq, lock_device_state, station_after_lock
from sync.errors import Conflict, InvalidInput, NotFound
from sync.flags import (
    ACTIVE_STATUSES,
    FlagSubject,
    cited_in,
    close_flag,
    raise_flag,
    reopen_flag,
)
from sync.handover import Balance, first_seq_after
from sync.manager_text import manager_text
from sync.paging import MAX_PAGE_SIZE
from sync.rules import Policy
from sync.sql import Prebuilt, among_at_once, among_param, chunks, rows_among
from sync.status import DEFAULT_POLICY, reproject, targets_of_corrections

MAX_SHIFT_LENGTH = dt.timedelta(hours=24)
# Seqs a shift may declare used beyond the highest the server holds from its PDA or an
# earlier shift of it declared (a ``last_seq`` at its close, the seq before a
# ``first_seq`` at its opening): the events still queued on the PDA, more than it
# records in days of work offline. Declared seqs are the shift's for good (``_Window``:
# an event of the PDA in them is filed under it, whoever pushes it, and a closed
# shift's ``last_seq`` never changes), so an unbounded one (a typo, 2**31 - 1) took
# every later courier's events of the PDA for this one.
MAX_SEQS_DECLARED_AHEAD = 10_000
_shifts = Shift.__table__


def adjacent_shift(
    shift: FromClause, column: str, *, following: bool, same_courier: bool
) -> ScalarSelect[Any]:
    """``column`` of the shift on ``shift``'s PDA opened just after it (or just before),
    in the order shifts opened; of the same courier's shifts only, if ``same_courier``.
    Correlated to the row of ``shift`` (``Shift``'s table or an alias of it): one probe
    of ``ix_shift_device_opened`` per row."""
    other = _shifts.alias("adjacent_shift")
    if following:
        beyond = and_(
            other.c.opened_at >= shift.c.opened_at,
            or_(other.c.opened_at > shift.c.opened_at, other.c.id > shift.c.id),
        )
        order = (other.c.opened_at, other.c.id)
    else:
        beyond = and_(
            other.c.opened_at <= shift.c.opened_at,
            or_(other.c.opened_at < shift.c.opened_at, other.c.id < shift.c.id),
        )
        order = (other.c.opened_at.desc(), other.c.id.desc())
    query = select(other.c[column]).where(other.c.device_id == shift.c.device_id, beyond)
    if same_courier:
        query = query.where(other.c.courier_id == shift.c.courier_id)
    return query.order_by(*order).limit(1).scalar_subquery()


def _next_own_shift(column: str) -> ColumnElement[Any]:
    """``column`` of the courier's next shift on the PDA, for a shift that closed with
    a first seq and no last seq (NULL for any other, or with no next shift)."""
    seqs_left_open = and_(
        _shifts.c.closed_at.is_not(None),
        _shifts.c.first_seq.is_not(None),
        _shifts.c.last_seq.is_(None),
    )
    return case(
        (seqs_left_open, adjacent_shift(_shifts, column, following=True, same_courier=True))
    )


def _before_undeclared_first(column: str) -> ColumnElement[Any]:
    """``column`` of the shift opened on the PDA just before a shift that declared no
    first seq and whose seqs end is known: closed with a last seq, or still open (NULL
    for any other shift). Where that one's seqs start
    (``_Window.with_first_seq_derived``)."""
    undeclared_first = and_(
        _shifts.c.first_seq.is_(None),
        or_(_shifts.c.last_seq.is_not(None), _shifts.c.closed_at.is_(None)),
    )
    return case(
        (undeclared_first, adjacent_shift(_shifts, column, following=False, same_courier=False))
    )


# The shifts on one PDA that may hold some of a push's events, in order: what
# ``ShiftFiler`` files them under. The pushing courier's: those whose declared seqs
# leave room for one of the push's seqs; those that declared no first seq (theirs
# start after the PDA's previous shift's: ``_Window.with_first_seq_derived``) and are
# open or closed with a last seq at or after the push's lowest; those open at some
# time of the push's events, give or take the filing grace; and those opened or closed
# within it of one (what ``file`` looks at, also for a shift whose clock closed it
# before it opened). Another courier's: those closed with a last seq at or after the
# push's lowest, and a first seq, if declared, at or before its highest (a handover's
# queue, ``ShiftFiler`` rule 2). The database still
# walks the PDA's shifts in its index, but hands over only these few, however many
# shifts were worked on that PDA before: all of them were loaded, and a year of daily
# shifts made a one-scan push cost 1.5 times as much on SQLite (``bench/scaling.py
# shifts``). A shift closed without its last seq comes with where the courier's next
# shift on the PDA starts (``_Window.holds_by_seq``): one index probe, for it alone.
SHIFT_WINDOWS = Prebuilt(
    lambda _dialect: (
        select(
            _shifts.c.id,
            _shifts.c.opened_at,
            _shifts.c.closed_at,
            _shifts.c.first_seq,
            _shifts.c.last_seq,
            _next_own_shift("opened_at"),
            _next_own_shift("first_seq"),
            _shifts.c.courier_id,
            _before_undeclared_first("id"),
            _before_undeclared_first("last_seq"),
            _shifts.c.status,
        )
        .where(
            _shifts.c.device_id == bindparam("device_id"),
            or_(
                and_(
                    _shifts.c.courier_id == bindparam("courier_id"),
                    or_(
                        and_(
                            _shifts.c.first_seq.is_not(None),
                            _shifts.c.first_seq <= bindparam("max_seq"),
                            or_(
                                _shifts.c.last_seq.is_(None),
                                _shifts.c.last_seq >= bindparam("min_seq"),
                            ),
                        ),
                        and_(
                            _shifts.c.first_seq.is_(None),
                            or_(
                                _shifts.c.last_seq >= bindparam("min_seq"),
                                _shifts.c.closed_at.is_(None),
                            ),
                        ),
                        and_(
                            _shifts.c.opened_at <= bindparam("until"),
                            or_(
                                _shifts.c.closed_at.is_(None),
                                _shifts.c.closed_at >= bindparam("since"),
                            ),
                        ),
                        _shifts.c.opened_at.between(bindparam("since"), bindparam("until")),
                        _shifts.c.closed_at.between(bindparam("since"), bindparam("until")),
                    ),
                ),
                and_(
                    _shifts.c.courier_id != bindparam("courier_id"),
                    _shifts.c.closed_at.is_not(None),
                    func.coalesce(_shifts.c.first_seq, 1) <= bindparam("max_seq"),
                    _shifts.c.last_seq >= bindparam("min_seq"),
                ),
            ),
        )
        .order_by(_shifts.c.opened_at, _shifts.c.id)
    )
)
# Which of these shift ids are the courier's on the PDA: shifts the PDA named that are
# not among the windows above (a claim far from the event's time and seqs).
OWN_SHIFTS_AMONG = Prebuilt(
    lambda dialect: select(_shifts.c.id).where(
        _shifts.c.device_id == bindparam("device_id"),
        _shifts.c.courier_id == bindparam("courier_id"),
        among_param(dialect, _shifts.c.id, "ids"),
    )
)
LATE_EVENT = "late_event_after_signoff"
WRONG_SHIFT = "wrong_shift"
LATEST_REOPENING = "latest_reopening"  # its evidence: what reopened the shift this time
# In it: the seqs the shift owns still on the PDA, for a reopening no event made
# (``judge_reopening``).
MISSING_SEQS = "missing_seqs"
# Its evidence: the rejected events (quarantine ids) that reopened it (``sync.flags.SEEN``).
REJECTED_IDS = "rejected_event_ids"
NOT_CLOSED = "shift_not_closed"
STALE_DEVICE = "stale_device"
NO_OPEN_SHIFT = "the device has no open shift any more"
# The audit log's entry for a shift closed by someone other than its courier (``close_shift``).
CLOSED_FOR_COURIER = "shift_closed_for_courier"
LAST_SEQ_DECLARED = "shift_last_seq_declared"


@dataclass(frozen=True)
class ShiftRules:
    planned_length: dt.timedelta = dt.timedelta(hours=10)
    # Corrected PDA clocks are estimates: an event stamped this much before its shift
    # opened (a check-out right after opening) still belongs to it.
    filing_grace: dt.timedelta = dt.timedelta(minutes=5)


# -- life of a shift ---------------------------------------------------------------------------


def open_shift(
    *,
    session: Session,
    device: Device,
    courier_id: int,
    rules: ShiftRules,
    planned_end_at: dt.datetime | None = None,
    first_seq: int | None = None,
    now: dt.datetime | None = None,
) -> Shift:
    """Open a shift for ``device`` and its courier. One open shift per PDA.

    The audit entries of the shifts it reopens or restores are written last
    (``audit.deferred``): restoring one closes a flag after another was reopened.
    """
    with audit.deferred(session):
        return _open_shift(
            session=session,
            device=device,
            courier_id=courier_id,
            rules=rules,
            planned_end_at=planned_end_at,
            first_seq=first_seq,
            now=now,
        )


def _open_shift(
    *,
    session: Session,
    device: Device,
    courier_id: int,
    rules: ShiftRules,
    planned_end_at: dt.datetime | None,
    first_seq: int | None,
    now: dt.datetime | None,
) -> Shift:
    now = now or utcnow()
    planned_end_at = planned_end_at or now + rules.planned_length
    if not now < planned_end_at <= now + MAX_SHIFT_LENGTH:
        raise InvalidInput(
            "planned_end_at must be after now and at most 24 hours from now",
            code="invalid_planned_end",
            field="planned_end_at",
        )
    # Pushes of this PDA wait for the opening, or it for them: each sees the other.
    lock_device_state(session, device.id)
    now_at = station_after_lock(session, device.id)
    if now_at is not None and now_at != device.station_id:
        # Moved by an admin while this opening waited for the lock (the courier's token
        # was checked before): no shift of the old station opens on a PDA that left it.
        raise Conflict(
            f"device {device.id} was moved to another station; sign in again",
            code="device_moved",
            field="device_id",
        )
    current = open_shift_of(session=session, device_id=device.id)
    if current is not None:
        raise _already_open(session, current, courier_id=courier_id)
    previous = _previous_with_open_seqs(session, device.id, courier_id)
    if first_seq is not None:
        _check_first_seq(session, device.id, first_seq, previous)
    station = session.get(Station, device.station_id)
    assert station is not None
    shift = Shift(
        station_id=device.station_id,
        courier_id=courier_id,
        device_id=device.id,
        status=ShiftStatus.OPEN,
        work_date=local_date(now, station.timezone),
        opened_at=now,
        planned_end_at=planned_end_at,
        first_seq=first_seq,
    )
    try:
        with session.begin_nested():
            session.add(shift)
    except IntegrityError:  # opened by a concurrent request a moment ago
        current = open_shift_of(session=session, device_id=device.id)
        if current is None:
            raise
        raise _already_open(session, current, courier_id=courier_id) from None
    before, before_last_seq = session.execute(
        select(
            adjacent_shift(_shifts, "id", following=False, same_courier=False),
            adjacent_shift(_shifts, "last_seq", following=False, same_courier=False),
        ).where(_shifts.c.id == shift.id)
    ).one()
    # Events of this courier's PDA that belong here but were pushed before it opened
    # (from its first seq on, declared or where its balance counts from, as
    # ``ShiftFiler`` files them once it is open; else recorded just before the opening)
    # are filed under it now, as they would have been had they arrived after.
    starts = (
        first_seq
        if first_seq is not None
        else first_seq_after(0 if before is None else before_last_seq)
    )
    belongs: ColumnElement[bool]
    if starts is None:
        belongs = ScanEvent.occurred_at >= now - rules.filing_grace
    elif starts > 1:
        belongs = ScanEvent.seq >= starts
    else:  # every seq: read through the index of the PDA's unfiled events, not by seq
        belongs = true()
    session.execute(
        update(ScanEvent)
        .where(
            ScanEvent.device_id == device.id,
            ScanEvent.courier_id == courier_id,
            ScanEvent.shift_id.is_(None),
            belongs,
        )
        .values(shift_id=shift.id)
        .execution_options(synchronize_session=False)
    )
    if previous is not None:
        _refile_from_previous(session, previous, shift, belongs, rules, also_lock=before)
    if before is not None:
        _reopen_if_bounded(session, before, shift)
    return shift


class _OpenSeqs(NamedTuple):
    id: int
    first_seq: int | None
    ended_at: dt.datetime  # its close, or its opening if a clock closed it "before"


def _previous_with_open_seqs(
    session: Session, device_id: str, courier_id: int
) -> _OpenSeqs | None:
    """The courier's last shift on the PDA, if it closed with no last seq: it holds what
    came just after its close, by seq up to where the next shift starts if it declared
    its first (``_Window.holds_by_seq``), else by the filing grace (``ShiftFiler`` rule
    4), so it may hold events the opening now takes. Pushed after the opening, those
    the opening declares by its first seq, or (declaring none) that happened while it
    was open or nearer its opening than that close, are the opening's; so they are
    when pushed before it (rule 3)."""
    row = session.execute(
        select(Shift.id, Shift.first_seq, Shift.last_seq, Shift.opened_at, Shift.closed_at)
        .where(Shift.device_id == device_id, Shift.courier_id == courier_id)
        .order_by(Shift.opened_at.desc(), Shift.id.desc())
        .limit(1)
    ).first()
    if row is None or row.last_seq is not None or row.closed_at is None:
        return None
    return _OpenSeqs(row.id, row.first_seq, max(row.opened_at, row.closed_at))


def _check_first_seq(
    session: Session, device_id: str, first_seq: int, previous: _OpenSeqs | None
) -> None:
    """Refuse a ``first_seq`` the PDA's earlier shifts used (409 ``first_seq_used``):
    at or below a seq filed under one of them, one declared at a close, or one before an
    earlier shift's ``first_seq``; or further ahead than a PDA holds events unsent (422
    ``seq_too_far_ahead``). ``previous``: the courier's shift whose seqs were left open
    (``_previous_with_open_seqs``), whose events after its close are the new shift's."""
    filed = select(func.max(ScanEvent.seq)).where(
        ScanEvent.device_id == device_id, ScanEvent.shift_id.is_not(None)
    )
    if previous is not None and (previous.first_seq or 0) < first_seq:
        # What the previous shift holds only because its seqs were left open (what
        # came after its close, by the grace or by seq) is this one's from its first
        # seq on: moved below, not a conflict. What came before its close is its own.
        filed = filed.where(
            ~and_(_refilable_from(previous.id), ScanEvent.occurred_at > previous.ended_at)
        )
    used = session.scalar(filed)
    # Seqs an earlier shift declared its own at closing are used too, though their
    # events may still be queued (a handover's): another shift taking them would
    # take them only if it came first. So are those before an earlier shift's
    # first_seq (the seqs are the PDA's causal order): a first_seq before it left
    # that shift no seq, and its queued events were filed under this one. Its
    # first_seq itself is the sign-in's device_max_seq + 1 a reset PDA declares.
    declared, declared_first = session.execute(
        select(func.max(Shift.last_seq), func.max(Shift.first_seq)).where(
            Shift.device_id == device_id
        )
    ).one()
    before_first = declared_first - 1 if declared_first is not None else None
    used = max((u for u in (used, declared, before_first) if u is not None), default=None)
    _ensure_within_reach(session, device_id, first_seq - 1, "first_seq", floor=0)
    if used is not None and first_seq <= used:
        raise Conflict(
            f"first_seq {first_seq} is already used: this PDA's seqs up to {used} "
            "belong to earlier shifts; declare the seq the shift's first event will "
            f"carry, after {used} (a PDA that lost its storage: the device_max_seq "
            "of its sign-in + 1)",
            code="first_seq_used",
            field="first_seq",
        )


def _refilable_from(shift_id: int) -> ColumnElement[bool]:
    """Events filed under ``shift_id`` by its seqs or its times, not because the PDA
    named it."""
    return and_(
        ScanEvent.shift_id == shift_id,
        or_(ScanEvent.claimed_shift_id.is_(None), ScanEvent.claimed_shift_id != shift_id),
    )


def _refile_from_previous(
    session: Session,
    previous: _OpenSeqs,
    opened: Shift,
    belongs: ColumnElement[bool],
    rules: ShiftRules,
    also_lock: int | None,
) -> None:
    """File again, as ``ShiftFiler`` files them now that ``opened`` bounds its seqs, the
    events the previous shift held only because its seqs were left open: those pushed
    before this opening that would have been this shift's had they come after.
    ``also_lock`` (the shift ``_reopen_if_bounded`` judges next) is locked in id order
    with the shifts the moves change, before their flags and audit entries.

    Signed off, the previous shift is not reopened for losing them, whatever its
    balance becomes (a return taken away leaves a parcel missing): its sign-off saw
    more than it owns, not less, and with the opening arriving before the push that
    brought them, the sign-off would have seen it without them and nothing would
    reopen it (rule 3). Its balance says it changed since (``changed_since_signoff``).
    A reopening those events made is withdrawn (``judge_reopening``)."""
    from sync.balances import refresh_handover_flags

    rows = session.execute(
        select(ScanEvent.id, ScanEvent.seq, ScanEvent.occurred_at).where(
            _refilable_from(previous.id), belongs
        )
    ).all()
    if not rows:
        return
    filings = [Filing(row.seq, None, row.occurred_at) for row in rows]
    filer = ShiftFiler(session, opened.device_id, opened.courier_id, rules, filings)
    moved = [
        {"id": row.id, "shift_id": shift_id}
        for row, filing in zip(rows, filings, strict=True)
        if (shift_id := filer.file(filing)) != previous.id
    ]
    if not moved:
        return
    session.execute(update(ScanEvent), moved)  # by primary key
    # The previous shift lost events; one they moved to may be closed (clocks).
    judged = {previous.id, *(m["shift_id"] for m in moved if m["shift_id"] is not None)}
    order = sorted(judged if also_lock is None else judged | {also_lock})
    locked = [lock_shift(session, i) for i in order]
    refresh_handover_flags(session=session, shifts=[s for s in locked if s.id in judged])
    judge_reopening(
        session=session,
        shift=lock_shift(session, previous.id),
        now=opened.opened_at,
        details={"next_shift_id": opened.id},
    )
    _reopen_where_filed(session, moved, previous.id, opened)


def _reopen_if_bounded(session: Session, shift_id: int, opened: Shift) -> None:
    """The shift opened just before ``opened`` on its PDA, if closed without its last
    seq, owns the seqs up to where ``opened`` starts (``sync.handover``): the opening
    may show seqs of it still on the PDA (or a gap not its own), its balance changing
    with no event moving. Signed off, it then reopens, naming the shift that opened; a
    push showing a gap in its seqs reopens it too (``sync.ingest``), so the order of
    the push and the opening decides nothing. The other way round, reopened by seqs
    missing or by rejected events a push brought before the opening, it may own them no
    more (``opened`` declares a first seq at or below them): its reopening is
    withdrawn, as it never reopened had the shift opened before that push (rule 3).
    Both by ``judge_reopening``."""
    judge_reopening(
        session=session,
        shift=lock_shift(session, shift_id),
        now=opened.opened_at,
        details={"next_shift_id": opened.id},
    )


@dataclass(frozen=True)
class Delta:
    """What a shift owns now that its latest sign-off did not see (rule 5): the late
    events (filed under it, or corrections voiding its events, arrived after the
    sign-off), the late rejected events whose seqs it owns, and, when it owns seqs still
    on the PDA that the sign-off did not name missing, the seqs missing now. What the
    sign-off saw and the shift owns no more (the next shift's opening took its grace
    scans, fewer seqs missing) is no delta: a shift that lost something is not
    reopened for it, its balance says it changed since (``changed_since_signoff``)."""

    late_event_ids: tuple[int, ...] = ()
    late_rejected_ids: tuple[int, ...] = ()
    unseen_missing_seqs: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.late_event_ids or self.late_rejected_ids or self.unseen_missing_seqs)


def signoff_delta(session: Session, shift: Shift) -> Delta:
    """``Delta`` of ``shift`` (locked, signed off at least once) from what is stored.

    Signed off, nothing of it is known late but seqs missing: an event or a rejected
    event arriving is late by its arrival, and its caller says so
    (``judge_reopening``'s ``arrived``, ``rejected``). Reopened, the late events and
    rejected events are those its latest reopening named that it still owns, and its
    events (or corrections voiding them) pushed in that reopening's push or since
    (``_events_since``). Seqs missing count for a shift closed without its last seq
    only: one that declared it owned every seq of its range at its sign-off, and the
    seqs held and written off only grow."""
    latest = _latest_reopening(session, shift) if shift.status == ShiftStatus.CLOSED else None
    return _delta(session, shift, latest or {})


def _delta(session: Session, shift: Shift, latest: dict[str, Any]) -> Delta:
    """``signoff_delta``, what its latest reopening named read (``latest``)."""
    from sync.balances import gather
    from sync.quarantine import owned_rejections

    named = latest.get("event_ids") or []
    late_events = _events_since(session, shift, named) if named else []
    if late_events:  # (the rest is not needed to know the delta is not empty)
        return Delta(late_event_ids=tuple(late_events))
    rejected = latest.get(REJECTED_IDS) or []
    if not rejected and shift.last_seq is not None:
        return Delta()
    facts = gather(session, [shift])[shift.id]
    balance = facts.balance()
    owned = (
        owned_rejections(session=session, scope=facts.rejection_scope(balance), ids=rejected)
        if rejected
        else []
    )
    unseen = shift.last_seq is None and _missing_beyond_signed(shift, balance)
    return Delta(
        late_rejected_ids=tuple(owned),
        unseen_missing_seqs=tuple(balance.missing_seqs) if unseen else (),
    )


def judge_reopening(
    *,
    session: Session,
    shift: Shift,
    now: dt.datetime,
    details: dict[str, Any] | None = None,
    arrived: Sequence[int] = (),
    rejected: Sequence[int] = (),
) -> list[Flag]:
    """Reopen ``shift`` (locked) or withdraw its reopening, by its ``signoff_delta``: a
    reopening stands exactly when the shift owns something its sign-off did not see.
    The one place that decides it; its callers (a push, an opening, a close, a
    write-off) only find which shifts to judge, by what they changed.

    * Signed off, with events of it (or corrections voiding its events) that just
      ``arrived``, or rejected events of it (quarantine ids) just ``rejected``: it
      reopens, its ``late_event_after_signoff`` flag naming them (``details`` too).
    * Signed off with a delta (seqs of it still on the PDA that its sign-off did not
      name missing: an opening, a push or a write-off of seqs above the highest held
      showed them): it reopens, its ``late_event_after_signoff`` flag naming no event,
      its latest reopening the seqs missing now (with ``details``: what showed them).
    * Reopened, with events or rejected events arriving: its reopening names them if
      it named no event yet (``_name_late_events``), so that it is never withdrawn as
      if nothing of it came late.
    * Reopened, standing for seqs missing once the late events it named are the next
      shift's: its flag names the seqs instead (``_rename_reopening``).
    * Reopened with none left (its late events filed under the next shift that
      opened, its rejected events the next shift's, its missing seqs arrived under
      another shift or written off): it is signed off again
      (``shift_reopening_withdrawn``), as it never reopened had these come in the other
      order (rule 3). The reopening stays in the audit log and in ``reopened_count``.

    Any other shift is left as it is. Returns the flags raised."""
    if shift.signed_off_at is None or shift.status == ShiftStatus.OPEN:
        return []
    if arrived or rejected:
        if shift.status == ShiftStatus.CLOSED:
            return _name_late_events(session, shift, arrived, rejected)
        return _reopen(
            session, shift, now=now, event_ids=arrived, rejected=rejected, details=details
        )
    if shift.status == ShiftStatus.SIGNED_OFF:
        if shift.last_seq is not None:
            return []  # (it owned every seq of its range when signed off)
        missing = signoff_delta(session, shift).unseen_missing_seqs
        if not missing:
            return []
        return _reopen(
            session, shift, now=now, details={**(details or {}), MISSING_SEQS: list(missing)}
        )
    latest = _latest_reopening(session, shift)
    if latest is None:
        return []
    delta = _delta(session, shift, latest)
    if not delta:
        _sign_off_again(session, shift, _withdrawn_because(session, latest), latest)
        return []
    return _rename_reopening(session, shift, latest, delta, details)


def _latest_reopening(session: Session, shift: Shift) -> dict[str, Any] | None:
    """What the latest reopening of ``shift`` named, in its ``late_event_after_signoff``
    flag's evidence: under ``LATEST_REOPENING``, or (a flag raised before that was kept)
    at the top, where ``event_ids`` gathers every reopening's, the earlier ones signed
    off since: more than the latest named, never fewer. None without the flag."""
    flag = _late_flag(session, shift.id)
    if flag is None:
        return None
    return flag.evidence.get(LATEST_REOPENING) or flag.evidence


def _rename_reopening(
    session: Session,
    shift: Shift,
    latest: dict[str, Any],
    delta: Delta,
    details: dict[str, Any] | None,
) -> list[Flag]:
    """A reopening that stands for another reason than the one it named: the late events
    it named are another shift's now (the next shift's opening took them), and seqs of
    it are still on the PDA that its sign-off did not name missing. Its flag's latest
    reopening names the seqs (with ``details``: what changed), not events that are no
    longer the shift's; the reopening is not written again (it still stands, one entry
    in the audit log). Returns the flag if it is open again."""
    if delta.late_event_ids or not latest.get("event_ids") or not delta.unseen_missing_seqs:
        return []
    named = {
        **latest,
        **(details or {}),
        "event_ids": [],
        MISSING_SEQS: list(delta.unseen_missing_seqs),
    }
    raised = raise_flag(
        session=session,
        kind=LATE_EVENT,
        severity=FlagSeverity.WARNING,
        subject=FlagSubject("shift", str(shift.id)),
        station_id=shift.station_id,
        evidence={LATEST_REOPENING: named},
        again=AFTER_ANOTHER_SIGNOFF,
    )
    return [raised.flag] if raised.new else []


def _withdrawn_because(session: Session, latest: dict[str, Any]) -> str:
    """Why a reopening is withdrawn, by what it named (``latest``)."""
    if latest.get("event_ids"):
        return "its late events were filed under the next shift when it opened"
    if rejected := latest.get(REJECTED_IDS):
        settled = session.scalar(
            select(func.count()).where(
                QuarantinedEvent.id.in_(sorted(set(rejected))),
                QuarantinedEvent.resent_seq.is_not(None),
            )
        )
        if settled == len(set(rejected)):
            return (
                "its rejected late events were refused seq_conflict and are held since "
                "under new seqs, sent again by the PDA: nothing of it was lost"
            )
        return "its rejected late events are the next shift's: its seqs end before them"
    return (
        "the seqs it was missing arrived under another shift or were written off: "
        "its balance is again the one signed off"
    )


def _missing_beyond_signed(shift: Shift, balance: Balance) -> bool:
    """Whether ``balance`` names seqs of ``shift`` still on the PDA that its sign-off did
    not: more of them, or one it did not show (it shows the first hundred)."""
    signed = shift.signoff_balance or {}
    count = signed.get("missing_seq_count", balance.missing_seq_count)
    shown = signed.get(MISSING_SEQS, balance.missing_seqs)
    return balance.missing_seq_count > count or not set(balance.missing_seqs) <= set(shown)


def may_own_revealed_gap(device_id: str, lowest: int) -> ColumnElement[bool]:
    """The closed or signed-off shifts of ``device_id`` that may own seq ``lowest`` or a
    later one, which a push just showed missing (above the highest seq the server held
    before it): closed without their last seq, they own the seqs up to where the next
    shift on the PDA starts, its first seq or else its lowest event, or up to the
    device's highest seq when it has neither (``sync.handover.owned_seqs``). A push
    showing a gap locks these with its shifts (``lock_shifts``), as a write-off leaving
    one does (``sync.lost_seqs``), and reopens those the gap made provisional
    (``judge_reopening``): in practice the PDA's shift before its current one,
    if any; a PDA's other signed-off shifts are not read.

    Closed ones too, though only signed-off ones reopen: a sign-off locks its shift
    alone, not the PDA, and on PostgreSQL (READ COMMITTED) a ``FOR UPDATE`` skips,
    without waiting, a row that does not match as last committed. Matching only
    ``signed_off``, a push would pass over a shift being signed off that moment, whose
    sign-off read the balance before the gap: signed off with seqs still on the PDA,
    never reopened. Matching ``closed`` as well, the push waits for the sign-off and
    reopens the shift, or the sign-off waits for the push and reads the balance
    provisional (tests/sync/test_signoff_races.py)."""
    shift = _shifts.c
    next_id = adjacent_shift(_shifts, "id", following=True, same_courier=False)
    next_first = adjacent_shift(_shifts, "first_seq", following=True, same_courier=False)
    # (Correlated to the locked shift's row across the EXISTS: not to one of its own.)
    next_starts_at_or_before = (
        select(ScanEvent.id)
        .where(ScanEvent.shift_id == next_id.correlate(_shifts), ScanEvent.seq <= lowest)
        .exists()
    )
    return and_(
        shift.device_id == device_id,
        shift.status.in_((ShiftStatus.CLOSED, ShiftStatus.SIGNED_OFF)),
        shift.last_seq.is_(None),
        or_(next_first.is_(None), next_first > lowest),
        ~next_starts_at_or_before,
    )


def _reopen_where_filed(
    session: Session, moved: list[dict[str, Any]], previous_id: int, opened: Shift
) -> None:
    """A signed-off shift that the time rules now file some of the moved events under
    (clocks: a scan stamped before the previous shift opened) gained events after its
    sign-off, as from a late push (``sync.ingest``): it reopens, naming them and the
    shift they came from (``judge_reopening``)."""
    gained: dict[int, list[int]] = {}
    for m in moved:
        if m["shift_id"] is not None and m["shift_id"] != opened.id:
            gained.setdefault(m["shift_id"], []).append(m["id"])
    for shift_id, event_ids in sorted(gained.items()):
        judge_reopening(
            session=session,
            shift=lock_shift(session, shift_id),
            now=opened.opened_at,
            details={"filed_from_shift_id": previous_id},
            arrived=event_ids,
        )


def _sign_off_again(session: Session, shift: Shift, reason: str, latest: dict[str, Any]) -> None:
    """Withdraw the reopening of ``shift`` (locked, its balance again the one signed off):
    signed off again, its late flag closed with ``reason``, the withdrawal audit-logged,
    filed under the parcels of the events its reopening named (``latest``), as the
    reopening's entry is (``audit.parcels_of_events``)."""
    shift.status = ShiftStatus.SIGNED_OFF
    subject = FlagSubject("shift", str(shift.id))
    close_flag(session=session, kind=LATE_EVENT, subject=subject, reason=reason)
    audit.append(
        session=session,
        actor_id=None,
        action="shift_reopening_withdrawn",
        subject_type="shift",
        subject_key=str(shift.id),
        details={"station_id": shift.station_id, "reason": reason},
        parcels=audit.parcels_of_events(
            session, latest.get("event_ids") or [], latest.get(REJECTED_IDS) or []
        ),
    )


def shift_parcels(session: Session, shift_id: int) -> list[str]:
    """The parcels of the events filed under the shift: its manifest (check-outs) and
    every outcome it holds, in one statement by ``scan_event``'s shift index. What an
    entry deciding the shift's seqs, hence its whole balance, is filed under (a close
    for its courier, a last seq declared afterwards): each parcel's history in the
    audit log then shows who closed the shift it was counted in."""
    return parcels_of_shifts(session, [shift_id])


def parcels_of_shifts(session: Session, shift_ids: Sequence[int]) -> list[str]:
    """``shift_parcels`` of several shifts, in one statement however many (a write-off
    of seqs several shifts own: ``sync.lost_seqs``)."""
    if not shift_ids:
        return []
    query = (
        select(ScanEvent.tracking_no)
        .where(among_at_once(session, ScanEvent.shift_id, sorted(set(shift_ids))))
        .distinct()
    )
    return sorted(session.scalars(query))


def reopened_with_seqs_left_open(device_id: str) -> ColumnElement[bool]:
    """The shifts of ``device_id`` reopened since their sign-off (closed again, signed
    off before) that declared no last seq: they own the seqs up to where the next shift
    on the PDA starts, which that shift's events may move down
    (``sync.handover.owned_seqs``), and the seqs of which a gap may have reopened them
    (``judge_reopening``). A push filing under a shift that declared no first seq
    an event below the highest seq held before it (pushed in order, none can end their
    seqs sooner), filling a gap of its PDA's seqs, or filing under no shift an event
    above that seq and below a declared first seq (which showed it missing), locks these
    with its shifts, and a
    write-off of lost seqs locks them too, for ``judge_reopening``."""
    return and_(
        Shift.device_id == device_id,
        Shift.status == ShiftStatus.CLOSED,
        Shift.signed_off_at.is_not(None),
        Shift.last_seq.is_(None),
    )


def reopened_since_signoff(device_id: str) -> ColumnElement[bool]:
    """The shifts of ``device_id`` reopened since their sign-off (closed again, signed
    off before), whatever seqs they declared: a push settling a ``seq_conflict`` (its
    event held under a new seq, ``sync.ingest``) locks them with its shifts, for
    ``judge_reopening``, as the rejected event it settled is no shift's any more."""
    return and_(
        Shift.device_id == device_id,
        Shift.status == ShiftStatus.CLOSED,
        Shift.signed_off_at.is_not(None),
    )


def _name_late_events(
    session: Session, shift: Shift, event_ids: Sequence[int], rejected: Sequence[int] = ()
) -> list[Flag]:
    """Events filed under ``shift`` (locked), and rejected events of its (quarantine
    ids), that arrive while it stands reopened with no event of its own named (seqs of
    it still on the PDA, rejected events): they came after its sign-off too, and its
    reopening now names them, so it is never withdrawn as if nothing of it came late
    (``judge_reopening``). A reopening that names events already is
    left as it is. Returns the flag if it is open again (a manager had decided on it)."""
    if shift.status != ShiftStatus.CLOSED or shift.signed_off_at is None:
        return []
    if not event_ids and not rejected:
        return []
    flag = _late_flag(session, shift.id)
    if flag is None:
        return []
    latest = flag.evidence.get(LATEST_REOPENING) or {}
    if latest.get("event_ids"):
        return []
    named: dict[str, Any] = {}
    if event_ids:
        named["event_ids"] = sorted(set(event_ids))
    if rejected:
        named[REJECTED_IDS] = sorted({*latest.get(REJECTED_IDS, []), *rejected})
    raised = raise_flag(
        session=session,
        kind=LATE_EVENT,
        severity=FlagSeverity.WARNING,
        subject=FlagSubject("shift", str(shift.id)),
        station_id=shift.station_id,
        evidence={**named, LATEST_REOPENING: {**latest, **named}},
        again=AFTER_ANOTHER_SIGNOFF,
    )
    return [raised.flag] if raised.new else []


def _events_since(session: Session, shift: Shift, named: Sequence[int]) -> list[int]:
    """The events of ``shift`` now (filed under it, or corrections voiding its events)
    that came in the push of the earliest of ``named`` (the events its latest reopening
    named) or one since: those of ``named`` it still owns, and those that landed on it
    reopened. Such a late event reopens nothing and no reopening names it, but the
    manager has not seen it either: had the events of the reopening never come, it
    would have reopened the shift itself (rule 3). (A reopening no event made names
    them instead, ``_name_late_events``.)"""
    reopening = (
        select(func.min(ScanEvent.batch_pk))
        .where(ScanEvent.id.in_(sorted(set(named))))
        .scalar_subquery()
    )
    its_events = select(ScanEvent.client_event_id).where(
        ScanEvent.device_id == shift.device_id, ScanEvent.shift_id == shift.id
    )
    return list(
        session.scalars(
            select(ScanEvent.id)
            .where(
                ScanEvent.device_id == shift.device_id,
                ScanEvent.batch_pk >= reopening,
                or_(
                    ScanEvent.shift_id == shift.id,
                    ScanEvent.voids_client_event_id.in_(its_events),
                ),
            )
            .order_by(ScanEvent.id)
        )
    )


def _late_flag(session: Session, shift_id: int) -> Flag | None:
    """The shift's ``late_event_after_signoff`` flag, in whatever status."""
    return session.scalar(
        select(Flag).where(
            Flag.kind == LATE_EVENT,
            Flag.subject_type == "shift",
            Flag.subject_key == str(shift_id),
        )
    )


def _already_open(session: Session, current: Shift, *, courier_id: int) -> Conflict:
    """The refusal of a second open shift on a PDA. The courier's own is theirs to
    close; another courier's (forgotten when the PDA was handed over) is not: only a
    manager closes it, and the message says so rather than send the PDA round in a
    loop of closes it is refused. That courier is named: a colleague of the same
    station, which the PDA belongs to."""
    if current.courier_id == courier_id:
        return Conflict(
            f"this PDA already has your shift {current.id} open: go on with it (events "
            "without a shift_id are filed under it), or, if its work is handed over, "
            "close it first",
            code="shift_already_open",
        )
    holder = session.get(User, current.courier_id)
    named = f" ({holder.full_name or holder.username})" if holder is not None else ""
    return Conflict(
        f"this PDA has shift {current.id} of another courier{named} open; a manager of "
        "the station must close it before a shift can be opened on this PDA",
        code="shift_already_open",
    )


def close_shift(
    *,
    session: Session,
    shift: Shift,
    closed_by: int,
    last_seq: int | None = None,
    now: dt.datetime | None = None,
    policy: Policy = DEFAULT_POLICY,
) -> Shift:
    """Close the shift: the courier is back and hands over (归班交接).

    Closing again is answered with the shift as it is (a PDA retrying a close whose
    answer it lost), unless it declares another ``last_seq``; one closed without a
    ``last_seq`` takes the one its courier's PDA declares later, while that is still
    open to change (``_may_declare_last_seq_late``). The shift's handover
    discrepancies are judged now: what was checked out and has no outcome is missing.
    A ``last_seq`` also takes the PDA's events filed under no shift in the seqs it
    declares (``_take_unfiled_in_seqs``): the courier's own, recorded on a clock that
    was wrong, and those another courier's sign-in pushed; their parcels are judged
    again by ``policy``.

    Closed by anyone but its courier (a manager or an admin, for a PDA that died or a
    shift left open), the close goes to the audit log (``_audit_close``): it decides
    which seqs are the shift's, hence its balance, and the row keeps only who closed it
    and the last seq. The courier's own close from the PDA does not: like the PDA's
    events it is the courier's own record, and every evening's closes stay off the
    audit log's lock.
    """
    from sync.balances import refresh_handover_flags

    now = now or utcnow()
    if last_seq is not None:  # the lock order: the device's sync state, then the shift
        lock_device_state(session, shift.device_id)
    shift = lock_shift(session, shift.id)
    declared_late = False
    if shift.status != ShiftStatus.OPEN:
        if last_seq is None or last_seq == shift.last_seq:
            return shift
        declared_late = _may_declare_last_seq_late(session, shift, closed_by)
        if not declared_late:
            raise Conflict(
                f"shift {shift.id} was closed with last_seq {shift.last_seq}; "
                "it cannot be closed again with another"
                if shift.last_seq is not None
                else f"shift {shift.id} was closed without a last_seq; it can be given one "
                "only by its courier's PDA, before a sign-off and before the PDA's next shift",
                code="shift_already_closed",
                field="last_seq",
            )
    if last_seq is not None:
        _check_last_seq(session, shift, last_seq)
    if declared_late:
        shift.last_seq = last_seq
        session.flush()
        taken = _take_unfiled_in_seqs(session, shift, policy)
        refresh_handover_flags(session=session, shifts=[shift])
        _announce_if_unbalanced(session, shift)
        if shift.closed_by != shift.courier_id:
            _audit_last_seq_declared(session, shift, taken)
        return shift
    state = session.get(DeviceSyncState, shift.device_id)
    shift.status = ShiftStatus.CLOSED
    shift.closed_at = now
    shift.closed_by = closed_by
    shift.last_seq = last_seq
    shift.seq_at_close = (
        highest_held(state.max_seq, state.missing_ranges, state.written_off_ranges or [])
        if state is not None
        else 0
    )
    session.flush()
    taken = _take_unfiled_in_seqs(session, shift, policy) if last_seq is not None else []
    close_flag(
        session=session,
        kind=NOT_CLOSED,
        subject=FlagSubject("shift", str(shift.id)),
        reason="the shift was closed at "
        + station_clock(now, station_timezone(session, shift.station_id)),
    )
    # A PDA has one open shift at most (``uq_shift_open_per_device``): closing it leaves
    # the PDA none, so its silence is no longer a courier out of touch.
    close_stale_device(
        session=session,
        device_id=shift.device_id,
        reason=NO_OPEN_SHIFT,
        station_id=shift.station_id,
    )
    refresh_handover_flags(session=session, shifts=[shift])
    _announce_if_unbalanced(session, shift)
    if closed_by != shift.courier_id:
        _audit_close(session, shift, taken)
    return shift


def _ensure_within_reach(
    session: Session, device_id: str, declared: int, field: str, *, floor: int
) -> None:
    """Refuse a shift's declaration of its PDA's seqs up to ``declared`` that reaches
    more than ``MAX_SEQS_DECLARED_AHEAD`` beyond the highest seq the server holds from
    the PDA, or one its shifts declared (``held_max_seq``: the sign-in's
    ``device_max_seq``, from which the PDA numbers on), or ``floor`` (what the shift
    declared at its opening): the PDA cannot hold that many events unsent, and the seqs
    declared would file every later courier's events of the PDA under this shift.
    Measured from the seqs held alone, a shift that used its allowance (a first_seq
    ahead, then a last_seq beyond it) left the next one no first_seq it could declare:
    those up to its last_seq are used. The PDA's sync state is locked by the caller."""
    held = (
        session.scalar(
            select(DeviceSyncState.max_seq).where(DeviceSyncState.device_id == device_id)
        )
        or 0
    )
    known = held_max_seq(session, device_id)
    base = max(known, floor)
    if declared - base > MAX_SEQS_DECLARED_AHEAD:
        # The manager or courier checks the number against the seq named: say which it
        # is (a close is measured from its shift's first_seq when that is further).
        if base == held:
            measured_from = f"seq {base}, the highest the server holds from PDA {device_id}"
        elif base == floor:
            measured_from = (
                f"seq {base}, the seq before the shift's first_seq (the server holds "
                f"seqs up to {held} from PDA {device_id})"
            )
        else:
            measured_from = (
                f"seq {base}, the highest seq a shift of PDA {device_id} declared used "
                f"(the server holds seqs up to {held}; the sign-in's device_max_seq)"
            )
        raise InvalidInput(
            f"{field} {declared + (field == 'first_seq')} is more than "
            f"{MAX_SEQS_DECLARED_AHEAD:,} seqs beyond {measured_from}: a PDA does not "
            f"hold that many events unsent. Check the number on the PDA; a shift may "
            f"leave {field} out",
            code="seq_too_far_ahead",
            field=field,
        )


def _check_last_seq(session: Session, shift: Shift, last_seq: int) -> None:
    """Refuse a ``last_seq`` the shift cannot end at (422): before its ``first_seq``
    (less one: a shift may end holding none), before the last seq its PDA's previous
    shift declared (a shift that declared no ``first_seq``), or before an event of the
    shift the server holds (``invalid_last_seq``); or further ahead than a PDA holds
    events unsent (``seq_too_far_ahead``, ``_ensure_within_reach``)."""
    if shift.first_seq is not None and last_seq < shift.first_seq - 1:
        raise InvalidInput(
            f"last_seq {last_seq} is before the shift's first_seq {shift.first_seq}",
            code="invalid_last_seq",
            field="last_seq",
        )
    if shift.first_seq is None:
        # Undeclared, its seqs start after the last seq the PDA's previous shift
        # declared (``sync.handover``): a last_seq before that leaves it none.
        before = adjacent_shift(_shifts, "last_seq", following=False, same_courier=False)
        previous_last = session.scalar(select(before).where(_shifts.c.id == shift.id))
        if previous_last is not None and last_seq < previous_last:
            raise InvalidInput(
                f"last_seq {last_seq} is before seq {previous_last}, the last_seq this "
                "PDA's previous shift declared",
                code="invalid_last_seq",
                field="last_seq",
            )
    held = session.scalar(
        select(func.max(ScanEvent.seq)).where(
            ScanEvent.shift_id == shift.id, ScanEvent.device_id == shift.device_id
        )
    )
    if held is not None and last_seq < held:
        raise InvalidInput(
            f"last_seq {last_seq} is before seq {held}, an event of this shift the "
            "server already holds",
            code="invalid_last_seq",
            field="last_seq",
        )
    _ensure_within_reach(
        session, shift.device_id, last_seq, "last_seq", floor=(shift.first_seq or 1) - 1
    )


def _may_declare_last_seq_late(session: Session, shift: Shift, closed_by: int) -> bool:
    """Whether ``closed_by`` may now declare the last seq of this closed ``shift``: its
    courier (from its PDA: the route checks), when it was closed without one (a manager
    closed it at 19:00 while the PDA was still out of range) and is not signed off, and
    no later shift was opened on the PDA. The PDA's seqs are its causal order (rule 6):
    its returns scanned at the counter after that close are the shift's, as they would
    be had the PDA closed first (rule 3), not parcels missing at handover that nobody
    can account for. After a sign-off or the PDA's next shift, what the shift owns is
    settled by then, and the 409 stands; a shift reopened since its sign-off too (its
    ``signed_off_at`` kept): declared before the push that reopened it, the last seq
    was refused, so it is after it too (rule 3)."""
    if shift.status != ShiftStatus.CLOSED or shift.last_seq is not None:
        return False
    if shift.signed_off_at is not None or closed_by != shift.courier_id:
        return False
    following = adjacent_shift(_shifts, "id", following=True, same_courier=False)
    return session.scalar(select(following).where(_shifts.c.id == shift.id)) is None


def _audit_last_seq_declared(session: Session, shift: Shift, taken: list[int]) -> None:
    """The ``shift_last_seq_declared`` entry: the courier's PDA declared the last seq of
    a shift someone else closed without one, which changes what the logged close
    (``shift_closed_for_courier``, ``last_seq`` null) decided the shift owns; the
    events it took from under no shift (``taken``, their ids)."""
    audit.append(
        session=session,
        actor_id=shift.courier_id,
        action=LAST_SEQ_DECLARED,
        subject_type="shift",
        subject_key=str(shift.id),
        details={
            "station_id": shift.station_id,
            "courier_id": shift.courier_id,
            "device_id": shift.device_id,
            "closed_by": shift.closed_by,
            "last_seq": shift.last_seq,
            "seq_at_close": shift.seq_at_close,
            "events_taken": taken,
        },
        parcels=shift_parcels(session, shift.id),
    )


def _audit_close(session: Session, shift: Shift, taken: list[int]) -> None:
    """The ``shift_closed_for_courier`` entry: who closed it (the actor), the last seq
    given (null: none, its events are then the shift's by time), the seq the server held
    from the PDA then, and the events the last seq took from under no shift (``taken``,
    their ids): what the row said then, so a close rewritten in the database afterwards
    no longer matches. Appended last: the audit log is the last lock a transaction takes.
    """
    assert shift.closed_at is not None and shift.closed_by is not None
    audit.append(
        session=session,
        actor_id=shift.closed_by,
        action=CLOSED_FOR_COURIER,
        subject_type="shift",
        subject_key=str(shift.id),
        details={
            "station_id": shift.station_id,
            "courier_id": shift.courier_id,
            "device_id": shift.device_id,
            "first_seq": shift.first_seq,
            "last_seq": shift.last_seq,
            "seq_at_close": shift.seq_at_close,
            "closed_at": audit.iso(shift.closed_at),
            "events_taken": taken,
        },
        parcels=shift_parcels(session, shift.id),
    )


def close_stale_device(
    *, session: Session, device_id: str, reason: str, station_id: int | None = None
) -> Flag | None:
    """Close the PDA's open ``stale_device`` flags, at every station (at ``station_id``
    only, if given): it was heard from again, or has no open shift any more (the
    ``stale_device`` sweep, and ``close_shift``)."""
    return close_flag(
        session=session,
        kind=STALE_DEVICE,
        subject=FlagSubject("device", device_id),
        reason=reason,
        station_id=station_id,
    )


def _take_unfiled_in_seqs(session: Session, shift: Shift, policy: Policy) -> list[int]:
    """File under ``shift``, as its courier's, the events of its PDA that were pushed
    before this close and that no shift took, in the seqs the close declares the
    shift's (from its first seq, declared or derived: ``_Window.with_first_seq_derived``):

    * another courier's: a PDA handed over with the shift left open pushes the first
      courier's queue under the next one's sign-in, and a manager closes the shift
      afterwards;
    * the courier's own that the time rules filed under none: recorded while the
      PDA's clock was wrong (a battery died, it came back dated 2000), or before the
      opening, in seqs its balance counts as its own.

    Pushed after the close, ``ShiftFiler`` (rule 2) files them so; before it, they wait
    here, so that the order of the push and the close changes nothing (rule 3). Their
    parcels are judged again (who holds them, whose delivery it was), and the PDA's
    ``wrong_shift`` flag closes when these were all it named. (Events another shift's
    seqs hold were filed under it when pushed, or when it opened: none is taken.)
    Returns the ids of the events taken, in seq order."""
    previous_id, previous_last_seq = session.execute(
        select(
            adjacent_shift(_shifts, "id", following=False, same_courier=False),
            adjacent_shift(_shifts, "last_seq", following=False, same_courier=False),
        ).where(_shifts.c.id == shift.id)
    ).one()
    window = _Window(
        shift.id,
        shift.opened_at,
        shift.closed_at,
        shift.first_seq,
        shift.last_seq,
        previous_id=previous_id,
        previous_last_seq=previous_last_seq,
    ).with_first_seq_derived()
    if window.first_seq is None or window.last_seq is None:
        return []
    taken = session.execute(
        select(
            ScanEvent.id,
            ScanEvent.seq,
            ScanEvent.tracking_no,
            ScanEvent.claimed_shift_id,
            ScanEvent.voids_client_event_id,
        ).where(
            ScanEvent.device_id == shift.device_id,
            ScanEvent.shift_id.is_(None),
            ScanEvent.seq.between(window.first_seq, window.last_seq),
        )
    ).all()
    if not taken:
        return []
    session.execute(
        update(ScanEvent),
        [{"id": row.id, "shift_id": shift.id, "courier_id": shift.courier_id} for row in taken],
    )
    reproject(session=session, tracking_nos=_judged_again(session, shift, taken), policy=policy)
    _close_wrong_shift_if_taken(session, shift, {row.seq: row.claimed_shift_id for row in taken})
    return [row.id for row in sorted(taken, key=lambda row: row.seq)]


def _judged_again(session: Session, shift: Shift, taken: Sequence[Any]) -> set[str]:
    """The parcels of the events a close took, and those of the events their corrections
    void: a correction may be filed under another tracking number than its target (as
    ``sync.ingest`` knows), and whose it is decides its target parcel's
    ``correction_by_another_courier``."""
    judged = {row.tracking_no for row in taken}
    voided = [row.voids_client_event_id for row in taken if row.voids_client_event_id]
    if voided:
        judged |= {t.tracking_no for t in targets_of_corrections(session, shift.device_id, voided)}
    return judged


def _close_wrong_shift_if_taken(
    session: Session, shift: Shift, claims: dict[int, int | None]
) -> None:
    """Close the PDA's ``wrong_shift`` flag when the close made good every claim it is
    about: the shift took each seq it names (``claims``: the seqs taken, and the shift
    each event named), and each of those events, as the flag's ``claimed_shift_ids``,
    named this shift (a handover's queue naming the shift before it was closed).
    Events naming another shift (an id left on the PDA from another's session) still
    name a shift not their PDA's, whichever shift took them by their seqs: the flag
    stays."""
    subject = FlagSubject("device", shift.device_id)
    flag = session.scalar(
        select(Flag).where(
            Flag.kind == WRONG_SHIFT,
            Flag.subject_type == subject.type,
            Flag.subject_key == subject.key,
            Flag.status.in_(ACTIVE_STATUSES),
        )
    )
    if flag is None:
        return
    seqs = cited_in(flag.evidence, "seqs", [])
    named = {claims.get(seq) for seq in seqs} | set(
        cited_in(flag.evidence, "claimed_shift_ids", [])
    )
    if set(seqs) <= claims.keys() and named <= {shift.id}:
        close_flag(
            session=session,
            kind=WRONG_SHIFT,
            subject=subject,
            reason=f"shift {shift.id} closed declaring the seqs its events name it by",
        )


def _announce_if_unbalanced(session: Session, shift: Shift) -> None:
    """``shift.unbalanced`` through the outbox: the station hears at once."""
    from sync.balances import shift_balance
    from sync.handover import BalanceStatus

    if not outbox.wanted(session, "shift.unbalanced", shift.station_id):
        return
    balance = shift_balance(session=session, shift=shift)
    if balance.status == BalanceStatus.BALANCED:
        return
    outbox.announce(
        session=session,
        topic="shift.unbalanced",
        ordering_key=f"shift:{shift.id}",
        station_id=shift.station_id,
        data={
            "shift_id": shift.id,
            "station_id": shift.station_id,
            "courier_id": shift.courier_id,
            "device_id": shift.device_id,
            "work_date": shift.work_date,
            "closed_at": shift.closed_at,
            "balance": balance.snapshot(outcomes=False),
        },
    )


def sign_off(
    *,
    session: Session,
    shift: Shift,
    user_id: int,
    note: str,
    force_reason: str | None = None,
    seen_version: str | None = None,
    seen_rejected_events: int | None = None,
    seen_open_flags: Collection[int] | None = None,
    seen_images_missing: int | None = None,
    now: dt.datetime | None = None,
) -> Shift:
    """A manager signs the handover off, with the balance as it stands.

    Refused while the shift is open, and while its balance is provisional (events
    are still on the PDA) unless forced with a reason, before anything seen is compared
    (a forced one is compared all the same). With ``seen_version`` (the
    ``balance_version`` the manager was shown), refused when the balance has changed
    since, so that nobody signs off a balance they did not see; with
    ``seen_rejected_events``, ``seen_open_flags`` and ``seen_images_missing`` (its PDA's
    rejected events, the ids of the flags naming it still waiting and the proof images
    its deliveries lack, as the board row, the balance or the page showed them), refused
    when those changed since too (more images missing, not fewer): the check the
    sign-off of clean handovers together makes (``sync.signoffs.changed_since_read``).
    The sign-off, with the balance, goes to the audit log.

    The same sign-off sent again (its answer lost: the same manager, note, reason and
    version) is answered with the shift as it stands, and writes nothing; any other
    sign-off of a signed-off shift is refused (``already_signed_off``), a retry giving
    a ``force_reason`` the sign-off did not keep too: a reason is kept only where the
    sign-off needed forcing, so a retry naming one where none was kept is not the
    same request.
    """
    from sync.balances import HandoverRead, shift_balance, signed_off_version
    from sync.handover import sign_off_blocked

    # Here, not at the top: sync.signoffs and sync.balances import this module.
    from sync.signoffs import STILL_OPEN, Seen, changed_since_read, handover_seen, still_open_said

    now = now or utcnow()
    note_text = manager_text(note, "note", required=True)
    reason = manager_text(force_reason, "force_reason", required=False)
    shift = lock_shift(session, shift.id)
    if shift.status == ShiftStatus.OPEN:
        # Where its courier went on, as signing off together says it: a courier back
        # from another PDA's shift leaves this one the manager's to close.
        timezone = station_timezone(session, shift.station_id)
        said = still_open_said(session, shift.station_id, [shift.id], timezone)
        raise Conflict(f"shift {shift.id} is {said.get(shift.id, STILL_OPEN)}", code="shift_open")
    if shift.status == ShiftStatus.SIGNED_OFF:
        if (
            shift.signed_off_by == user_id
            and shift.signoff_note == note_text
            and shift.signoff_forced_reason == reason
            and (
                seen_version is None
                or signed_off_version(shift, shift_balance(session=session, shift=shift))
                == seen_version
            )
        ):
            return shift  # this sign-off, sent again
        raise Conflict(already_signed_off(session, shift, user_id), code="already_signed_off")
    seen = Seen(seen_version, seen_rejected_events, seen_open_flags, seen_images_missing)
    if all(shown is None for shown in seen[1:]):  # the balance's version at most
        read = HandoverRead(shift_balance(session=session, shift=shift))
    else:  # a few queries more, only for a sign-off that names them
        read = handover_seen(session, shift)
    balance = read.balance
    # Provisional first, as the board's sign-off together refuses it (``sync.signoffs``):
    # a balance gone provisional since it was read has changed too, and "read it again"
    # only sent the manager back to be told of the seqs still on the PDA at the next try.
    blocked = sign_off_blocked(balance)
    if blocked and reason is None:
        raise Conflict(blocked, code="balance_provisional")
    changed = changed_since_read(seen, read)
    if changed is not None:
        raise Conflict(
            f"shift {shift.id}: {changed.message}",
            code=changed.code,
            field=_SEEN_FIELDS[changed.code],
        )
    return record_sign_off(
        session=session,
        shift=shift,
        balance=balance,
        user_id=user_id,
        note=note_text,
        forced_reason=reason if blocked else None,
        now=now,
    )


# The field of a sign-off naming what changed since the manager read the shift.
_SEEN_FIELDS = {
    "balance_changed": "balance_version",
    "rejected_events_changed": "rejected_events",
    "open_flags_changed": "open_flags",
    "images_missing_changed": "images_missing",
}


def already_signed_off(
    session: Session,
    shift: Shift,
    user_id: int,
    *,
    compared: str = "note, force_reason or balance_version",
    timezone: str | None = None,
) -> str:
    """Why a sign-off of a signed-off shift is refused, as the state says: by whom (the
    caller themselves, or a user by id) and when, on the station's clock (``timezone``,
    read when not given). A manager whose answer was lost and who sent the sign-off
    again with another note, reason or version reads that it was theirs, not someone
    else's. ``compared``: what of the request differs, as the request names it."""
    who = "you" if shift.signed_off_by == user_id else f"user #{shift.signed_off_by}"
    assert shift.signed_off_at is not None  # signed off
    zone = timezone or station_timezone(session, shift.station_id)
    when = station_clock(shift.signed_off_at, zone)
    return (
        f"shift {shift.id} is already signed off, by {who} at {when}, and not as this "
        f"sign-off says (its {compared} differ): its page shows the sign-off with its note"
    )


def record_sign_off(
    *,
    session: Session,
    shift: Shift,
    balance: Balance,
    user_id: int,
    note: str,
    forced_reason: str | None,
    now: dt.datetime,
    decided_flags: Sequence[int] | None = None,
) -> Shift:
    """Mark a locked shift, whose sign-off the rules allow, signed off with ``balance``
    as it stands, and write it to the audit log: ``sign_off`` and
    ``sync.signoffs.sign_off_clean`` decide, this records. ``decided_flags``: signed
    off with others as unbalanced only by discrepancies a manager resolved, the flags of
    those decisions (the entry's ``discrepancies_decided``)."""
    shift.status = ShiftStatus.SIGNED_OFF
    shift.signed_off_at = now
    shift.signed_off_by = user_id
    shift.signoff_note = note
    shift.signoff_forced_reason = forced_reason
    shift.signoff_balance = balance.snapshot()
    audit.append(
        session=session,
        actor_id=user_id,
        action="shift_signed_off",
        subject_type="shift",
        subject_key=str(shift.id),
        details={
            "station_id": shift.station_id,
            "courier_id": shift.courier_id,
            "device_id": shift.device_id,
            "note": note,
            "forced_reason": shift.signoff_forced_reason,
            "balance": shift.signoff_balance,
            **(
                {"discrepancies_decided": sorted(decided_flags)}
                if decided_flags is not None
                else {}
            ),
        },
        # the parcels the balance names: each one's audit history shows the sign-off
        parcels=[p.tracking_no for p in balance.parcels]
        + [d.tracking_no for d in balance.discrepancies if d.tracking_no],
    )
    return shift


AFTER_ANOTHER_SIGNOFF = "events landed after another sign-off"


def _reopen(
    session: Session,
    shift: Shift,
    *,
    now: dt.datetime,
    event_ids: Sequence[int] = (),
    rejected: Sequence[int] = (),
    details: dict[str, Any] | None = None,
) -> list[Flag]:
    """Reopen ``shift`` (locked, signed off), as ``judge_reopening`` decided.

    The shift goes back to closed, waiting for a new sign-off; a
    ``late_event_after_signoff`` flag names the late events (``event_ids``; opened
    again if a manager had acknowledged or resolved it after an earlier reopening:
    these events came after that decision and the sign-off since), and the audit log
    records it. ``details`` go into the evidence too. ``rejected``: quarantine ids of
    events its PDA sent that were rejected (``sync.quarantine.RejectionScope`` says
    they are the shift's), named under ``REJECTED_IDS``: the sign-off never saw them
    either, and a shift with a rejected event is no clean handover. Returns the flag.
    """
    late = sorted(set(event_ids))
    refused = {REJECTED_IDS: sorted(set(rejected))} if rejected else {}
    latest = {"event_ids": late, **refused, **(details or {})}
    signed = {
        "signed_off_at": shift.signed_off_at.isoformat() if shift.signed_off_at else None,
        "signed_off_by": shift.signed_off_by,
    }
    # replaced at each reopening, where event_ids accumulate
    evidence = {"event_ids": late, **refused, LATEST_REOPENING: latest, **signed}
    shift.status = ShiftStatus.CLOSED
    shift.reopened_count += 1
    shift.reopened_at = now
    raised = raise_flag(
        session=session,
        kind=LATE_EVENT,
        severity=FlagSeverity.WARNING,
        subject=FlagSubject("shift", str(shift.id)),
        station_id=shift.station_id,
        evidence=evidence,
        courier_id=shift.courier_id,
        shift_id=shift.id,
        again=AFTER_ANOTHER_SIGNOFF,
    )
    if not raised.new:  # reopened, whatever the flag's evidence could still cite
        reopen_flag(session=session, flag=raised.flag, note=AFTER_ANOTHER_SIGNOFF)
    audit.append(
        session=session,
        actor_id=None,
        action="shift_reopened",
        subject_type="shift",
        subject_key=str(shift.id),
        # This reopening's, once: the flag's evidence repeats them to accumulate.
        details={"station_id": shift.station_id, "reason": LATE_EVENT, **latest, **signed},
        parcels=audit.parcels_of_events(session, late, refused.get(REJECTED_IDS, [])),
    )
    session.flush()
    return [raised.flag]


# -- reading -----------------------------------------------------------------------------------


def get_shift(*, session: Session, shift_id: int) -> Shift:
    shift = session.get(Shift, shift_id)
    if shift is None:
        raise shift_not_found(shift_id)
    return shift


def shift_not_found(shift_id: int) -> NotFound:
    """What ``get_shift`` answers when no shift has ``shift_id``."""
    return NotFound(f"no shift with id {shift_id}", code="shift_not_found")


def lock_shift(session: Session, shift_id: int) -> Shift:
    """The shift's row, locked and re-read: a close, a sign-off and a late push take turns."""
    shift = session.scalar(
        select(Shift)
        .where(Shift.id == shift_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if shift is None:
        raise shift_not_found(shift_id)
    return shift


def open_shift_of(*, session: Session, device_id: str) -> Shift | None:
    return session.scalar(
        select(Shift).where(Shift.device_id == device_id, Shift.status == ShiftStatus.OPEN)
    )


def list_shifts(
    *,
    session: Session,
    station_id: int | None = None,
    work_date: dt.date | None = None,
    status: ShiftStatus | None = None,
    courier_id: int | None = None,
    device_id: str | None = None,
    after_id: int = 0,
    limit: int = 100,
) -> Sequence[Shift]:
    """Shifts matching every filter given, oldest first, by keyset on id."""
    query = select(Shift).where(Shift.id > after_id).order_by(Shift.id)
    if station_id is not None:
        query = query.where(Shift.station_id == station_id)
    if work_date is not None:
        query = query.where(Shift.work_date == work_date)
    if status is not None:
        query = query.where(Shift.status == status)
    if courier_id is not None:
        query = query.where(Shift.courier_id == courier_id)
    if device_id is not None:
        query = query.where(Shift.device_id == device_id)
    return session.scalars(query.limit(min(limit, MAX_PAGE_SIZE))).all()


def local_date(moment: dt.datetime, timezone: str) -> dt.date:
    """The calendar date at ``moment`` in a station's time zone."""
    return moment.astimezone(ZoneInfo(timezone)).date()


def days_from(day: dt.date, moment: dt.datetime, timezone: str) -> int:
    """How many days after ``day`` the station's calendar is at ``moment``: 0 on it, 1
    for a shift of the day closed after local midnight, -1 for one filed under the day
    that opened the evening before (its station's zone moved since)."""
    return (local_date(moment, timezone) - day).days


def station_clock(moment: dt.datetime, timezone: str) -> str:
    """``moment`` as a reason or a note written for a station's manager tells it: on the
    station's wall clock, to the second, with its offset (``2026-11-23T20:50:00+08:00``).
    The pages show times there (the ``local`` filter); a stored text in UTC would read
    hours off beside them, and it is kept as written, for the API and the audit too."""
    return moment.astimezone(ZoneInfo(timezone)).isoformat(timespec="seconds")


def station_timezone(session: Session, station_id: int) -> str:
    station = session.get(Station, station_id)
    assert station is not None
    return station.timezone


def day_bounds(day: dt.date, timezone: str) -> tuple[dt.datetime, dt.datetime]:
    """``[start, end)`` of a station's local calendar day, in UTC."""
    zone = ZoneInfo(timezone)
    start = dt.datetime.combine(day, dt.time(), tzinfo=zone)
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=zone)
    return start.astimezone(dt.UTC), end.astimezone(dt.UTC)


# -- filing events under shifts ----------------------------------------------------------------


class Filing(NamedTuple):
    """What filing an event looks at: its seq, the shift its PDA named, its time on the
    corrected clock."""

    seq: int
    claimed: int | None
    occurred_at: dt.datetime


@dataclass(frozen=True)
class _Window:
    shift_id: int
    opened_at: dt.datetime
    closed_at: dt.datetime | None
    first_seq: int | None
    last_seq: int | None
    # Where the courier's next shift on the PDA starts, for a shift closed with a first
    # seq and no last seq: its opening, and its first seq if it declared one.
    next_opened_at: dt.datetime | None = None
    next_first_seq: int | None = None
    courier_id: int | None = None
    # The PDA's shift before this one, for a shift that declared no first seq and is
    # open or closed with its last seq: its id and its last seq.
    previous_id: int | None = None
    previous_last_seq: int | None = None
    status: ShiftStatus | None = None  # as read (``ShiftFiler.seen_open``)

    def with_first_seq_derived(self) -> _Window:
        """This shift with the first seq it declared, or else, when its seqs end is
        known (its last seq declared, or it is open), with the one its balance counts
        from: after the last seq the PDA's previous shift declared, or 1 on the PDA's
        first shift (``sync.handover.first_seq_after``). Its seqs are then the PDA's
        causal order as for a declared first seq: an event recorded while its clock was
        reset is its own. Unchanged otherwise: a shift closed with neither holds by time
        (its seqs left open end at its close), and what follows a previous shift that
        declared no last seq may be that one's."""
        if self.first_seq is not None or (self.last_seq is None and self.closed_at is not None):
            return self
        first = first_seq_after(0 if self.previous_id is None else self.previous_last_seq)
        return self if first is None else replace(self, first_seq=first)

    def as_colleagues(self) -> _Window | None:
        """This shift of another courier as it may take a push's events: by its seqs
        alone, declared or derived (``with_first_seq_derived``); else it takes none."""
        window = self.with_first_seq_derived()
        return window if window.first_seq is not None else None

    def may_hold(self, seq: int) -> bool:
        """Whether the seqs the PDA declared leave room for ``seq`` in this shift."""
        return (self.first_seq is None or seq >= self.first_seq) and (
            self.last_seq is None or seq <= self.last_seq
        )

    def declares(self, seq: int) -> bool:
        """Whether the PDA declared ``seq`` this shift's: it lies from the first seq
        (declared at opening, or derived: ``with_first_seq_derived``) to the last
        declared at closing (or the shift is open)."""
        return (
            self.first_seq is not None
            and self.may_hold(seq)
            and (self.last_seq is not None or self.closed_at is None)
        )

    def holds_by_seq(self, seq: int, occurred_at: dt.datetime, grace: dt.timedelta) -> bool:
        """Whether the seqs the PDA declared name ``seq`` as this shift's (rule 2).

        A shift closed without its last seq declared where its seqs start, not where
        they end: they end at its close, give or take the filing grace (measured from
        its opening if a clock stepped back closed it "before"), or where the
        courier's next shift on the PDA starts, if sooner: at that shift's first seq,
        or (undeclared) at its opening less the grace (what the time rules give the
        next shift). Later events go by time; an event the next shift takes is
        filed under it when it opens (``open_shift``).

        The end in time is an estimate, as any time rule is: an event a few minutes
        after the close is the shift's or not by the push's latency. Scans an hour
        later, the next shift's pushed before it opened, are never this one's: they
        would reopen it after its sign-off.
        """
        if self.first_seq is None or not self.may_hold(seq):
            return False
        if self.declares(seq):
            return True
        if self.next_first_seq is not None and seq >= self.next_first_seq:
            return False
        if self.next_opened_at is not None and occurred_at >= self.next_opened_at - grace:
            return False
        return occurred_at <= max(self.opened_at, self.closed_at) + grace


class ShiftFiler:
    """Decides the shift each event of one courier's push is filed under.

    The shifts this courier worked on this PDA count, and, by their seqs alone,
    another courier's closed on it with its last seq declared (and its first, or else
    the PDA's previous shift's last: ``_Window.as_colleagues``): a PDA handed over at
    the counter pushes the first courier's queued events under the next one's
    sign-in, and the seqs the first courier declared say whose they are
    (``colleagues``; the event is then that courier's: ``recorded_by``). By time,
    another courier's shift never takes an event. Rules, in order:

    1. the shift the PDA named, when it is one of those (else ``wrong_shift``);
    2. the shift whose declared sequence numbers hold the event's seq (``first_seq``
       at opening, ``last_seq`` at closing): the PDA's own causal order, whatever the
       clocks say (a shift that declared no ``first_seq`` but is open or declared its
       ``last_seq`` starts where its balance counts from:
       ``_Window.with_first_seq_derived``); the courier's own shifts first, then
       another's; then a shift of the courier's closed with a ``first_seq`` and
       without a ``last_seq``, which holds by seq only what came by its close, give
       or take ``filing_grace``, and before the courier's next shift on the PDA
       starts (``_Window.holds_by_seq``);
    3. the courier's shift open when the event happened (corrected clock);
    4. one opened a little after it, or closed a little before it (``filing_grace``:
       corrected clocks are estimates, off by the push's latency), unless the
       shift's declared seqs say the event is not its;
    5. otherwise none: events between shifts, or before the first, belong to none
       (unless the seqs of rule 2 say otherwise).

    An event filed under none because its shift opened only after it arrived is
    filed under that shift when it opens (``open_shift``), and one its shift's
    ``last_seq`` claims when it closes (``close_shift``). PDAs that declare both seqs
    (or the last, where the previous shift declared its own) get a filing that does
    not depend on when anything was pushed.
    """

    def __init__(
        self,
        session: Session,
        device_id: str,
        courier_id: int,
        rules: ShiftRules,
        events: Sequence[Filing],
        *,
        colleagues: bool = False,
    ) -> None:
        """Read the shifts that may hold ``events``, the events it will be asked to file;
        with ``colleagues``, also another courier's that hold them by their seqs."""
        self.grace = rules.filing_grace
        self.windows: list[_Window] = []
        self.colleagues: dict[int, _Window] = {}
        self.own: set[int] = set()
        self.wrong_claims: dict[int, int] = {}  # seq -> a shift id not of this courier's
        # The shifts read open here, in the caller's transaction (``lock_shifts``).
        self.seen_open: frozenset[int] = frozenset()
        if not events:
            return
        courier = {"device_id": device_id, "courier_id": courier_id}
        seqs = [e.seq for e in events]
        times = [e.occurred_at for e in events]
        bounds = {
            "min_seq": min(seqs),
            "max_seq": max(seqs),
            "since": min(times) - self.grace,
            "until": max(times) + self.grace,
        }
        open_ids = []
        for row in SHIFT_WINDOWS.execute(session, {**courier, **bounds}):
            window = _Window(*row)
            if window.status == ShiftStatus.OPEN:
                open_ids.append(window.shift_id)
            if window.courier_id == courier_id:
                self.windows.append(window.with_first_seq_derived())
            elif colleagues and (theirs := window.as_colleagues()) is not None:
                self.colleagues[window.shift_id] = theirs
        self.seen_open = frozenset(open_ids)
        self.own = {w.shift_id for w in self.windows}
        farther = sorted({e.claimed for e in events if e.claimed is not None} - self.own)
        if farther:
            own = rows_among(session, OWN_SHIFTS_AMONG, "ids", farther, courier)
            self.own.update(row.id for row in own)

    def file(self, event: Filing) -> int | None:
        """The id of the shift ``event`` (one of those given at the start) is filed under."""
        seq, claimed, occurred_at = event
        if claimed is not None:
            if claimed in self.own:
                return claimed
            colleague = self.colleagues.get(claimed)
            if colleague is not None and colleague.holds_by_seq(seq, occurred_at, self.grace):
                return claimed
            self.wrong_claims[seq] = claimed
        # Seqs declared at both ends speak first, then the end of a shift closed without
        # its last seq, which is estimated by time (``_Window.holds_by_seq``).
        for window in (*reversed(self.windows), *self.colleagues.values()):
            if window.declares(seq):
                return window.shift_id
        for window in reversed(self.windows):
            if window.holds_by_seq(seq, occurred_at, self.grace):
                return window.shift_id
        near: list[tuple[dt.timedelta, int]] = []
        for window in reversed(self.windows):
            closed = window.closed_at
            if not window.may_hold(seq):
                continue
            if window.opened_at <= occurred_at and (closed is None or occurred_at <= closed):
                return window.shift_id
            if window.opened_at - self.grace <= occurred_at < window.opened_at:
                near.append((window.opened_at - occurred_at, window.shift_id))
            elif closed is not None and closed < occurred_at <= closed + self.grace:
                near.append((occurred_at - closed, window.shift_id))
        return min(near)[1] if near else None

    def starts_at_its_events(self, shift_id: int | None) -> bool:
        """Whether ``shift_id`` (an event was filed under it) declared no first seq and
        derives none: where its seqs start is its lowest event, which ends those of the
        shift before it on the PDA if that one closed without its last seq
        (``sync.handover.owned_seqs``)."""
        for window in (*self.windows, *self.colleagues.values()):
            if window.shift_id == shift_id:
                return window.first_seq is None
        return False

    def recorded_by(self, shift_id: int | None) -> int | None:
        """The courier who recorded an event filed under ``shift_id`` when that is
        another courier's shift (the seqs they declared hold it); else None, the
        pushing courier."""
        colleague = self.colleagues.get(shift_id) if shift_id is not None else None
        return colleague.courier_id if colleague is not None else None


# Built once (``sync.sql.Prebuilt`` says why): a push that files scans under a shift runs it.
SHIFT_STATUSES_FOR_UPDATE = Prebuilt(
    lambda dialect: (
        select(Shift.id, Shift.status)
        .where(among_param(dialect, Shift.id, "ids"))
        .order_by(Shift.id)
        .with_for_update()
    )
)


def lock_shifts(
    session: Session,
    ids: Iterable[int],
    *,
    also: ColumnElement[bool] | None = None,
    seen_open: frozenset[int] = frozenset(),
) -> dict[int, Shift]:
    """Lock shift rows in id order; return the locked ones that are no longer open
    (closed or signed off), as stored now: those a push must judge again.

    ``also``: shifts found by a condition besides (``may_own_rejected``), locked in the
    same statement, so still in id order with the others.

    Locked as plain rows of id and status: the shifts of a push are nearly always
    open, and then no entity is loaded. (PostgreSQL; SQLite's writers take turns
    anyway, and no ``FOR UPDATE`` is sent there.)

    Lock order across the service: a device's sync state, then shifts, then
    tracking numbers and parcels, then flags, then the audit log. Opening takes the
    device's sync state, then the earlier shifts whose events or seqs it changes, in
    id order; closing and signing off take a shift first, then flags and the audit log.

    ``seen_open``: shifts the caller's transaction read open after it began writing
    (``ShiftFiler.seen_open``: a push reads them after storing its batch). On SQLite no
    other writer can have closed them since, its writers taking turns for a whole
    transaction, and only closing a shift makes an open one anything else
    (``close_shift``), which a push never does: when every one of ``ids`` is among
    them and ``also`` names none, nothing is read. A one-scan push's shift is nearly always so.
    PostgreSQL reads them anyway: the rows must be locked, and may have been closed by
    another transaction since they were read.
    """
    wanted = sorted(set(ids))
    if (
        also is None
        and seen_open.issuperset(wanted)
        and session.get_bind().dialect.name == "sqlite"
    ):
        return {}
    if also is None:
        rows: Iterable[Any] = rows_among(session, SHIFT_STATUSES_FOR_UPDATE, "ids", wanted)
    else:
        rows = session.execute(
            select(Shift.id, Shift.status)
            .where(or_(Shift.id.in_(wanted), also) if wanted else also)
            .order_by(Shift.id)
            .with_for_update()
        )
    not_open = [row.id for row in rows if row.status != ShiftStatus.OPEN]
    return {
        shift.id: shift
        for chunk in chunks(not_open)
        for shift in session.scalars(
            select(Shift)
            .where(Shift.id.in_(chunk))
            .order_by(Shift.id)
            .execution_options(populate_existing=True)
        )
    }


def may_own_rejected(
    device_id: str, seqs: Sequence[int], tracking_nos: Sequence[str]
) -> ColumnElement[bool]:
    """The shifts of ``device_id`` that may own, as ``sync.quarantine.RejectionScope``
    reads it, a rejected event with one of ``seqs`` or, one without a seq, naming one of
    ``tracking_nos``: more than those (whose seqs it owns, ``sync.handover.owned_seqs``,
    needs their events and their neighbours'), never fewer. A push that quarantines
    events locks these with its shifts (``lock_shifts``), and asks the scope itself of
    those signed off. Those whose seqs surely end before the lowest of ``seqs`` are left
    out (their last seq declared below it; closed without one, the next shift on the PDA
    declaring its first seq at or below it), and those whose seqs surely start after the
    highest (a first seq declared above it, no event of theirs at or below it): a PDA's
    signed-off shifts are not all read again at each malformed event of its open one."""
    shift = _shifts.c
    owning = []
    if seqs:
        lowest, highest = min(seqs), max(seqs)
        next_first = adjacent_shift(_shifts, "first_seq", following=True, same_courier=False)
        ends_at_or_after = or_(
            shift.last_seq >= lowest,
            and_(
                shift.last_seq.is_(None),
                or_(
                    shift.status == ShiftStatus.OPEN,
                    next_first.is_(None),
                    next_first > lowest,
                ),
            ),
        )
        starts_at_or_before = or_(
            shift.first_seq.is_(None),
            shift.first_seq <= highest,
            select(ScanEvent.id)
            .where(ScanEvent.shift_id == shift.id, ScanEvent.seq <= highest)
            .exists(),
        )
        owning.append(and_(ends_at_or_after, starts_at_or_before))
    if tracking_nos:
        owning.append(
            select(ScanEvent.id)
            .where(
                ScanEvent.shift_id == shift.id,
                ScanEvent.tracking_no.in_(sorted(set(tracking_nos))),
            )
            .exists()
        )
    return and_(shift.device_id == device_id, or_(*owning) if owning else false())
