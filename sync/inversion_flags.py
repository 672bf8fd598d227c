"""Rule 6's ``time_inversion`` flags judged outside a push: by a write-off, which makes
neighbours of the events around the seqs it declares lost, and by ``courier-api
rejudge``, which judges the seqs a flag names against the events stored now.

A push judges the pairs it completes and splits itself (``sync.ingest``, through
``sync.inversions.judge``); these judge them as it would, so that the flags are the
same whether the manager's write-off came before or after the PDA's pushes, and
whether a flag was raised before or after the rejudging of split pairs existed
(rule 3). A flag's evidence names each pair as ``device#seq``, one flag per parcel.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from sqlalchemy import String, bindparam, cast, func, or_, select
from sqlalchemy.orm import Session

from models import DeviceSyncState, Flag, FlagSeverity, Parcel, ScanEvent
from sync.acks import SeqTracker
from sync.device_state import lock_device_state
from sync.flags import (
    FlagSubject,
    cited_in,
    device_seq,
    raise_flag,
    split_device_seq,
    withdraw_evidence,
)
from sync.inversions import LookUp, Nearest, Stamp, across_written_off_at, still_named_at
from sync.sql import Prebuilt, among_param, plain_rows, rows_among

KIND = "time_inversion"
EVIDENCE_KEY = "device_seqs"  # "device#seq", each end of each inverted pair
# The default of ``TIME_INVERSION_TOLERANCE_SECONDS``: a clock stepped back by NTP.
DEFAULT_TOLERANCE = dt.timedelta(seconds=2)

_events = ScanEvent.__table__
# What the judging reads of a stored event: its seq and its ``Stamp``.
_STAMPED = (
    _events.c.seq,
    _events.c.occurred_at_device,
    _events.c.tracking_no,
    _events.c.station_id,
)
# The stored events at the seqs given (through the unique index), the push's look-up
# (``sync.ingest``) as rejudge's: a statement built once, as the push needs.
TIMES_AT_SEQS = Prebuilt(
    lambda dialect: select(*_STAMPED).where(
        _events.c.device_id == bindparam("device_id"),
        among_param(dialect, _events.c.seq, "seqs"),
    )
)
# The stored event nearest a seq, within a run of seqs that all arrived: past the
# rejected and written-off ones, which hold no time (``sync.inversions``).
_IN_RUN = select(*_STAMPED).where(
    _events.c.device_id == bindparam("device_id"),
    _events.c.seq.between(bindparam("low"), bindparam("high")),
)
NEAREST_BELOW = _IN_RUN.order_by(_events.c.seq.desc()).limit(1)
NEAREST_ABOVE = _IN_RUN.order_by(_events.c.seq).limit(1)


def nearest_stored(session: Session, device_id: str) -> Nearest:
    """``sync.inversions.Nearest`` over the device's stored events: one query a search."""

    def nearest(low: int, high: int, downward: bool) -> tuple[int, Stamp] | None:
        query = NEAREST_BELOW if downward else NEAREST_ABOVE
        row = plain_rows(
            session, query, {"device_id": device_id, "low": low, "high": high}
        ).first()
        return None if row is None else (row.seq, Stamp(row[1], row[2], row[3]))

    return nearest


def stored_at(session: Session, device_id: str) -> LookUp:
    """``sync.inversions.LookUp`` over the device's stored events: one query (a chunk of
    seqs each), none for no seqs."""

    def look_up(seqs: list[int]) -> dict[int, Stamp]:
        rows = rows_among(session, TIMES_AT_SEQS, "seqs", seqs, {"device_id": device_id})
        return {row.seq: Stamp(row[1], row[2], row[3]) for row in rows}

    return look_up


def device_seqs(device_id: str, seqs: Iterable[int]) -> list[str]:
    """Seqs of a PDA as a flag's evidence names them, ``device#seq``."""
    return [device_seq(device_id, seq) for seq in sorted(seqs)]


def judge_write_off(
    *,
    session: Session,
    device_id: str,
    ranges: Sequence[Sequence[int]],
    held: SeqTracker,
    tolerance: dt.timedelta,
) -> list[Flag]:
    """Flag the inverted pairs across the seqs just written off (``ranges``), with the
    device's sync state locked and ``held`` its seqs after the write-off: the events
    around them, both stored before it, are neighbours now, and a push storing either
    after it would have judged them so. Each pair is raised at the station its later
    event was pushed at (``sync.inversions.across_written_off_at``), as the push storing
    it raised it at its courier's: not at the PDA's station now, which a PDA moved since
    its shift does not share. Returns the flags raised or opened again."""
    inverted = across_written_off_at(ranges, held, nearest_stored(session, device_id), tolerance)
    return _raised(session, _pairs(device_id, inverted))


def _pairs(
    device_id: str, inverted: dict[tuple[str, int | None], set[int]], station_id: int | None = None
) -> list[tuple[str, str, int, set[int]]]:
    """``_raised``'s pairs of a device's ``inverted`` ones (``across_written_off_at``),
    those of ``station_id`` only if given. A stored event always names its station."""
    return [
        (tracking_no, device_id, station, seqs)
        for (tracking_no, station), seqs in inverted.items()
        if station is not None and station_id in (None, station)
    ]


def _raised(session: Session, pairs: list[tuple[str, str, int, set[int]]]) -> list[Flag]:
    """Raise the flags of inverted ``pairs``, ``(tracking number, device, station,
    seqs)``, one per parcel and station, by tracking number: the order a push raises its
    own in, so that neither holds a flag the other waits for while waiting for one it
    holds. Returns the flags raised or opened again."""
    raised = []
    for tracking_no, device_id, station_id, seqs in sorted(pairs, key=lambda p: p[:3]):
        result = raise_flag(
            session=session,
            kind=KIND,
            severity=FlagSeverity.WARNING,
            subject=FlagSubject("parcel", tracking_no),
            station_id=station_id,
            evidence={EVIDENCE_KEY: device_seqs(device_id, seqs)},
        )
        if result.new:
            raised.append(result.flag)
    return raised


class Rejudged(NamedTuple):
    """What judging a batch of flags again did."""

    judged: int  # flags read
    withdrawn: int  # seqs taken out of them
    closed: int  # flags closed, left naming none
    raised: int = 0  # flags raised or opened again at the station a pair is now


# Why a push withdraws seqs from a flag (``sync.ingest``): the pair it split.
SPLIT_REASON = (
    "{seqs}: no longer an inverted pair, an event stored since between them (a rejected "
    "seq sent again corrected, a written-off one that came) is their neighbour, in order"
)
REJUDGED_REASON = (
    "{seqs}: no longer an inverted pair, judged again against the events stored now "
    "(an event stored since between them is their neighbour, in order)"
)


def rejudge_flags(
    *,
    session: Session,
    after_id: int,
    limit: int,
    tolerance: dt.timedelta,
    station_id: int | None = None,
) -> tuple[Rejudged, int | None]:
    """Judge again the ``time_inversion`` flags after ``after_id`` (at most ``limit``,
    by id, any status) against their PDAs' stored events, as a push storing an event
    between a pair withdraws it (``sync.ingest``): each seq a flag names that no
    inverted pair of neighbours names now for its parcel at its station is withdrawn
    from it (a pair its later event's station owns, named on another station's flag,
    raised there first: ``Rejudged.raised``), and a flag left naming none is closed by
    the system (``sync.flags.withdraw_evidence``, its audit entry as every system
    change's). Flags raised before a push rejudged
    the pairs it split (a pair judged across a rejected seq stored later) are so put
    right. The PDAs' sync states are locked first, in id order, as a push locks its
    own before its flags; then the flags, by parcel, as a push raises them.
    ``station_id``: only the flags on that station's board and those of its parcels now
    (at any station): a parcel moved to another station since (an intake's) leaves its
    flag on the board of the station its pair was pushed at, which a run for that station
    puts right. Returns what it did and the last id read (None: no more)."""
    query = select(Flag.id).where(Flag.kind == KIND, Flag.id > after_id)
    if station_id is not None:
        here = select(Parcel.tracking_no).where(Parcel.station_id == station_id)
        query = query.where(or_(Flag.station_id == station_id, Flag.tracking_no.in_(here)))
    ids = list(session.scalars(query.order_by(Flag.id).limit(limit)))
    if not ids:
        return Rejudged(0, 0, 0), None
    evidence = dict(session.execute(select(Flag.id, Flag.evidence).where(Flag.id.in_(ids))).all())
    named = {flag_id: _by_device(cited_in(evidence[flag_id], EVIDENCE_KEY, [])) for flag_id in ids}
    devices = sorted({device for by_device in named.values() for device in by_device})
    held = {}
    for device in devices:
        state = lock_device_state(session, device)
        held[device] = SeqTracker.of(state.max_seq, state.missing_ranges)
    # Locked by parcel, as a push and a write-off raise them (``sorted`` by tracking
    # number): by id, it could hold Q's flag and wait for P's while another PDA's push
    # held P's and waited for Q's, a deadlock on PostgreSQL.
    flags = session.scalars(
        select(Flag)
        .where(Flag.id.in_(ids))
        .order_by(Flag.subject_key, Flag.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()
    # Each PDA's seqs named by the batch judged at once: a seq's pairs are its own
    # whichever other seqs are judged with it, so a flag reads what it would alone.
    asked: dict[str, set[int]] = {}
    for flag in flags:
        for device, seqs in _by_device(cited_in(flag.evidence, EVIDENCE_KEY, [])).items():
            if device in held:  # else named by a push since the batch was read
                asked.setdefault(device, set()).update(seqs)
    named_now = {
        device: still_named_at(
            seqs,
            held[device],
            stored_at(session, device),
            nearest_stored(session, device),
            tolerance,
        )
        for device, seqs in sorted(asked.items())
    }
    withdrawn = closed = raised = 0
    for flag in flags:
        # What it names when its turn comes: a flag of its parcel at another station
        # judged before it had the seqs withdrawn from it too (``withdraw_evidence``),
        # counted once. Its seqs are among those judged above, whatever it names.
        # Each pair is its later event's station's (``sync.inversions``): one named
        # here that stands at another station (raised by a push of a PDA moved since,
        # before that rule) is raised there first, then withdrawn from this flag.
        gone: list[str] = []
        standing: dict[int | None, list[str]] = {}
        elsewhere: list[tuple[str, str, int, set[int]]] = []
        for device, seqs in sorted(_by_device(cited_in(flag.evidence, EVIDENCE_KEY, [])).items()):
            if device not in held:
                continue
            for (tracking_no, station), pair_seqs in named_now[device].items():
                if tracking_no != flag.subject_key:
                    continue
                standing.setdefault(station, []).extend(device_seqs(device, pair_seqs))
                if station is not None and station != flag.station_id:
                    if not pair_seqs.isdisjoint(seqs):
                        elsewhere.append((tracking_no, device, station, pair_seqs))
            here = named_now[device].get((flag.subject_key, flag.station_id), set())
            gone += device_seqs(device, set(seqs) - here)
        if not gone:
            continue
        raised += len(_raised(session, elsewhere))
        withdrawn += len(gone)
        closed += len(
            withdraw_evidence(
                session=session,
                kind=KIND,
                subject=FlagSubject(flag.subject_type, flag.subject_key),
                key=EVIDENCE_KEY,
                withdrawn=set(gone),
                reason=REJUDGED_REASON.format(seqs=", ".join(gone)),
                standing=standing,
            )
        )
    session.flush()
    return Rejudged(len(ids), withdrawn, closed, raised), ids[-1]


def rejudge_written_off(
    *,
    session: Session,
    after_device: str,
    limit: int,
    tolerance: dt.timedelta,
    station_id: int | None = None,
) -> tuple[int, str | None]:
    """Judge the pairs across the seqs written off of the devices after
    ``after_device`` that have some (at most ``limit``, by id), as a write-off now does
    (``judge_write_off``): those written off before it did, once both neighbours had
    arrived, were never judged. Each pair at its later event's station, as a write-off
    raises it; with ``station_id``, only the pairs of that station, of the devices with
    events pushed there (a PDA moved since leaves its old shifts' pairs there).
    The devices' sync states are locked first, in id order, before any flag, as a push
    locks its own; then the flags of every device's pairs, by parcel. Returns the flags
    raised or opened again, and the last device read (None: no more)."""
    written_off = func.coalesce(cast(DeviceSyncState.written_off_ranges, String), "null")
    query = select(DeviceSyncState.device_id).where(
        DeviceSyncState.device_id > after_device, written_off.not_in(["[]", "null"])
    )
    if station_id is not None:  # devices with events pushed there, wherever they are now
        pushed_there = (
            select(_events.c.id)
            .where(
                _events.c.device_id == DeviceSyncState.device_id,
                _events.c.station_id == station_id,
            )
            .exists()
        )
        query = query.where(pushed_there)
    devices = list(session.scalars(query.order_by(DeviceSyncState.device_id).limit(limit)))
    if not devices:
        return 0, None
    # Every state first, in id order, then the flags: a push holds its PDA's state while
    # it waits for a flag, so a state locked after a flag of this batch could deadlock.
    states = {device_id: lock_device_state(session, device_id) for device_id in devices}
    pairs = []
    for device_id in devices:
        state = states[device_id]
        if not state.written_off_ranges:
            continue
        held = SeqTracker.of(state.max_seq, state.missing_ranges)
        nearest = nearest_stored(session, device_id)
        inverted = across_written_off_at(state.written_off_ranges, held, nearest, tolerance)
        pairs += _pairs(device_id, inverted, station_id)
    raised = len(_raised(session, pairs))  # every PDA's, by parcel
    session.flush()
    return raised, devices[-1]


def _by_device(named: Iterable[Any]) -> dict[str, list[int]]:
    """``{device: seqs}`` of a flag's ``device#seq`` ids."""
    found: dict[str, list[int]] = {}
    for value in named:
        split = split_device_seq(str(value))
        if split is not None and split[0]:
            found.setdefault(split[0], []).append(split[1])
    return found
