"""Signing off a station's clean handovers together.

At 19:00 a manager has many shifts to sign off, and most of them need no other word
than "all accounted for": handed over, balanced, with no event of their PDA rejected,
no flag naming them waiting, no corrected outcome still to review and every proof image
uploaded. ``sign_off_clean`` signs
those off with one note, each as ``sync.shifts.sign_off`` would with the balance
version the manager was shown, and refuses any other with its reason: it gets a
sign-off of its own, with a note about what is wrong (and a forced reason where the
balance is provisional). The others are signed off all the same: one shift that
changed does not hold up the rest. Asked to (``decided``), it also signs off the shifts
unbalanced only by discrepancies a manager has each resolved, whose decisions carry
their notes: the board offers those apart from the clean ones.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import FlagStatus, Shift, ShiftStatus, utcnow
from sync import audit
from sync.balances import (
    HandoverRead,
    read_handovers,
    signed_off_version,
    where_couriers_went,
)
from sync.errors import InvalidInput
from sync.handover import (
    Balance,
    BalanceStatus,
    Discrepancy,
    all_discrepancies_decided,
    balance_version,
    counts_named,
    discrepancies_decided,
    discrepancies_named,
    discrepancies_to_decide,
    undecidable,
    unsent_seqs_named,
)
from sync.manager_text import manager_text
from sync.shifts import (
    already_signed_off,
    lock_shifts,
    record_sign_off,
    station_clock,
    station_timezone,
)
from sync.wording import counted

# Shifts signed off in one request: a station's day, with room to spare.
MAX_SHIFTS = 200

SIGNED_OFF = "signed_off"
REFUSED = "refused"
ALREADY_SIGNED_OFF = "already_signed_off"


class Refusal(NamedTuple):
    code: str
    message: str


class Seen(NamedTuple):
    """What the manager signing a shift off was shown of it, as they send it back; None:
    not sent, not compared. The board row gives all four (``balance_version``,
    ``rejected_events``, ``open_flags``, ``images_missing``), the shift's balance and its
    page too; a shift signed off with others was clean when read: no event rejected, no
    flag waiting, no image missing."""

    balance_version: str | None
    rejected_events: int | None = None  # its PDA's events rejected, as counted then
    open_flags: Collection[int] | None = None  # ids of the flags naming it still waiting
    images_missing: int | None = None  # proof images its deliveries lacked then


# A shift signed off with others was read clean (``not_clean``).
READ_CLEAN = {"rejected_events": 0, "open_flags": (), "images_missing": 0}


def changed_since_read(seen: Seen, read: HandoverRead) -> Refusal | None:
    """Whether the shift changed since the manager read it, in what they were shown and
    would sign off without seeing again: its balance, its PDA's rejected events (which
    the balance cannot show), the flags naming it still waiting
    (``sync.balances.waiting_flags``) and, risen, the proof images its deliveries lack
    (fewer is an image uploaded since: nothing the manager did not see), or None. The
    one check of both sign-offs: a single one (``sync.shifts.sign_off``) and those signed
    off together, each as ``sync.balances.read_handovers`` counts them."""
    balance, rejected_events, flags = read.balance, read.rejected_events, read.open_flags
    if seen.balance_version is not None and seen.balance_version != balance_version(balance):
        return Refusal(
            "balance_changed",
            f"its balance changed since it was read (now {counts_named(balance)}): read it again",
        )
    if seen.rejected_events is not None and seen.rejected_events != rejected_events:
        return Refusal(
            "rejected_events_changed",
            f"{rejected_events} event{'' if rejected_events == 1 else 's'} of its PDA "
            f"{'is' if rejected_events == 1 else 'are'} rejected now, not "
            f"{seen.rejected_events} as when it was read: read its page again",
        )
    now = {flag.flag_id for flag in flags}
    if seen.open_flags is not None and set(seen.open_flags) != now:
        raised = sorted(now - set(seen.open_flags))
        decided = sorted(set(seen.open_flags) - now)
        changes = [
            *([f"raised or reopened since: {_ids(raised)}"] if raised else []),
            *([f"decided or closed since: {_ids(decided)}"] if decided else []),
        ]
        return Refusal(
            "open_flags_changed",
            f"the flags waiting on it changed since it was read ({'; '.join(changes)}): "
            "read its page again",
        )
    lacking = read.images_missing
    if seen.images_missing is not None and lacking > seen.images_missing:
        return Refusal(
            "images_missing_changed",
            f"{lacking} proof image{'' if lacking == 1 else 's'} of its deliveries "
            f"{'is' if lacking == 1 else 'are'} missing now, not {seen.images_missing} as "
            "when it was read: read its page again",
        )
    return None


def handover_seen(session: Session, shift: Shift) -> HandoverRead:
    """One shift's handover read as the board reads it (``sync.balances.read_handovers``):
    what its balance shows beside the balance (``GET /shifts/<id>/balance``), and what a
    sign-off compares with what the manager was shown."""
    return read_handovers(session, [shift], station_id=shift.station_id)[shift.id]


def _ids(flag_ids: Sequence[int]) -> str:
    return ", ".join(f"flag {i}" for i in flag_ids)


@dataclass(frozen=True)
class Outcome:
    """What became of one shift of the request: signed off, or refused (``code``, and a
    ``message`` for the manager)."""

    shift_id: int
    outcome: str
    code: str | None = None
    message: str | None = None
    # Signed off already by this same sign-off, sent before (``_retried``): answered
    # ``signed_off`` as the first time, nothing written now. The API answers it so on
    # purpose (a request sent again after its answer was lost); the board's page says
    # how many it signed off now, and these apart.
    sent_again: bool = False


def sign_off_clean(
    *,
    session: Session,
    station_id: int,
    seen: Mapping[int, str],
    user_id: int,
    note: str,
    now: dt.datetime | None = None,
    decided: bool = False,
) -> list[Outcome]:
    """Sign off, with ``note``, each of the station's shifts in ``seen`` (shift id:
    the balance ``version`` the manager was shown) that is a clean handover: closed,
    balanced, no event of its PDA rejected (``sync.balances.balances_and_rejections``),
    no flag naming it open or acknowledged (``sync.balances.waiting_flags``), no corrected
    outcome of its parcels still to review (``sync.balances.REVIEW_KINDS``), every proof
    image its deliveries name uploaded, and its balance still the version shown.
    The others are refused, each with its reason; outcomes come in shift id order.
    A shift this same request signed off already (its answer lost, sent again) is
    answered ``signed_off`` again, and nothing is written (``_retried``).

    ``decided``: a shift unbalanced only by discrepancies a manager has each resolved
    (``sync.handover.all_discrepancies_decided``) is signed off too, as clean in all else
    (the board's "Sign off all N handovers with every discrepancy decided"): each
    decision carries its own note, and the sign-off's audit entry names the flags it
    rested on (``discrepancies_decided``). One whose flag was opened again, or whose
    balance changed, since it was read is refused as any other.

    The shifts are locked in id order (the service's lock order, ``lock_shifts``) and
    judged in a few queries however many there are. Each sign-off goes to the audit
    log as a single one does.
    """
    now = now or utcnow()
    text = manager_text(note, "note", required=True)
    assert text is not None  # required
    if not seen:
        raise InvalidInput(
            "name at least one shift to sign off", code="shifts_required", field="shifts"
        )
    if len(seen) > MAX_SHIFTS:
        raise InvalidInput(
            f"at most {MAX_SHIFTS} shifts are signed off at once, not {len(seen)}",
            code="too_many_shifts",
            field="shifts",
        )
    ids = sorted(seen)
    of_station = set(
        session.scalars(select(Shift.id).where(Shift.id.in_(ids), Shift.station_id == station_id))
    )
    handed_over = lock_shifts(session, of_station)
    read = read_handovers(session, list(handed_over.values()), station_id=station_id)
    outcomes = []
    timezone: str | None = None  # the station's, read once a refusal names a time
    still_open = sorted(of_station - set(handed_over))
    if still_open:
        timezone = station_timezone(session, station_id)
    open_said = still_open_said(session, station_id, still_open, timezone)
    # Every sign-off's entry chained at once, after its UPDATE: statements per request
    # do not grow with the shifts signed off (record_sign_off does not flush).
    with audit.deferred(session):
        for shift_id in ids:
            shift_read = read.get(shift_id)
            balance = shift_read.balance if shift_read is not None else None
            if _retried(handed_over.get(shift_id), balance, seen[shift_id], user_id, text):
                outcomes.append(Outcome(shift_id, SIGNED_OFF, sent_again=True))
                continue
            shift = handed_over.get(shift_id)
            if shift is not None and shift.status == ShiftStatus.SIGNED_OFF:
                # Said as the state says it: whose sign-off, and when (the request's
                # own, sent again with another note, reads that it was theirs).
                timezone = timezone or station_timezone(session, station_id)
                said = already_signed_off(
                    session, shift, user_id, compared="note or version", timezone=timezone
                )
                outcomes.append(Outcome(shift_id, REFUSED, ALREADY_SIGNED_OFF, said))
                continue
            refusal = _refusal(
                shift_id,
                seen[shift_id],
                known=shift_id in of_station,
                shift=shift,
                read=shift_read,
                decided=decided,
                open_said=open_said.get(shift_id),
            )
            if refusal is not None:
                outcomes.append(refusal)
                continue
            assert balance is not None  # not refused: handed over
            record_sign_off(
                session=session,
                shift=handed_over[shift_id],
                balance=balance,
                user_id=user_id,
                note=text,
                forced_reason=None,
                now=now,
                decided_flags=discrepancies_decided(balance) if decided else None,
            )
            outcomes.append(Outcome(shift_id, SIGNED_OFF))
    return outcomes


STILL_OPEN = "still open; it is signed off after it is closed"


def still_open_said(
    session: Session, station_id: int, shift_ids: Sequence[int], timezone: str | None
) -> dict[int, str]:
    """Why each of these shifts still open is refused, when its courier went on since
    as its board row says (``sync.balances.where_couriers_went``): back from a shift
    handed over on another PDA (the PDA died: no one but the manager closes this one),
    or on the road with another PDA (one of the two likely no longer used). The plain
    reason, ``STILL_OPEN``, read as waiting for the courier to close it. Two statements
    when the request names a shift still open, however many; none otherwise. A single
    sign-off (``sync.shifts.sign_off``) says it as signing off together does."""
    if not shift_ids:
        return {}
    assert timezone is not None  # read with them
    found = session.scalars(
        select(Shift).where(Shift.id.in_(shift_ids), Shift.status == ShiftStatus.OPEN)
    ).all()
    went = where_couriers_went(session, station_id, found)
    said: dict[int, str] = {}
    for shift in found:
        back = went.back.get(shift.id)
        if back is not None and back.closed_at is not None:
            said[shift.id] = (
                f"still open, but its courier is back: they handed over shift {back.id} on "
                f"{back.device_id} at {station_clock(back.closed_at, timezone)}; close this "
                "one (its page), then sign it off"
            )
        elif shift.id in went.also_open:
            others = ", ".join(
                f"shift {other.id} on {other.device_id}" for other in went.also_open[shift.id]
            )
            said[shift.id] = (
                f"still open, and its courier also has {others} open: close the one no longer "
                "used, then sign it off"
            )
    return said


def _retried(
    shift: Shift | None, balance: Balance | None, version: str, user_id: int, note: str
) -> bool:
    """Whether ``shift`` stands signed off as this request signs it off: by the same
    user, with the same note, on the balance version named, not forced. The request
    repeated after its answer was lost (a dropped connection at 19:00) is answered as
    the first time, ``signed_off``, and writes nothing; a sign-off that differs is
    refused (``already_signed_off``)."""
    return (
        shift is not None
        and balance is not None
        and shift.status == ShiftStatus.SIGNED_OFF
        and shift.signed_off_by == user_id
        and shift.signoff_note == note
        and shift.signoff_forced_reason is None
        and signed_off_version(shift, balance) == version
    )


def not_clean(shift: Shift, read: HandoverRead, *, decided: bool = False) -> Refusal | None:
    """Why this shift is no clean handover, to sign off with others, or None: the board
    offers to sign off together exactly those it finds clean (its rows are the
    ``HandoverRead`` a sign-off of them reads again).

    ``rejected_events``: its PDA's events the server rejected. The balance cannot show
    them (a refused correction voids nothing: the balance still counts what it meant to
    void), so the manager reads them on the shift's page before signing it off.
    ``reviews``: its parcels' corrected outcomes no manager has looked at
    (``sync.balances.REVIEW_KINDS``, open): the balance counts the outcome as corrected,
    a drop made a return balancing as well as the return, so the manager sees the
    correction before the handover is signed off. ``decided``: unbalanced only by
    discrepancies each resolved by a manager passes too (``all_discrepancies_decided``)."""
    balance, flags, reviews = read.balance, read.open_flags, read.reviews
    images_missing, rejected_events = read.images_missing, read.rejected_events
    if shift.status == ShiftStatus.OPEN:
        return Refusal("shift_open", STILL_OPEN)
    if shift.status == ShiftStatus.SIGNED_OFF:
        # No sign-off of it to offer; ``sign_off_clean`` tells a manager who names it
        # whose sign-off it was, and when (``sync.shifts.already_signed_off``).
        return Refusal(ALREADY_SIGNED_OFF, "already signed off")
    if balance.status == BalanceStatus.PROVISIONAL:
        return Refusal(
            "balance_provisional",
            f"{unsent_seqs_named(balance)}: wait for them, write off those its PDA lost, or "
            "sign it off on its own with a reason it cannot wait",
        )
    if balance.status != BalanceStatus.BALANCED and not (
        decided and all_discrepancies_decided(balance)
    ):
        if decided and balance.discrepancies:
            # Named are those still to decide: the resolved ones beside them sent the
            # manager to open a decided flag first.
            waiting = discrepancies_to_decide(balance)
            return Refusal(
                "discrepancies_to_decide",
                f"{_to_decide(len(waiting), len(balance.discrepancies))} still to decide "
                f"({discrepancies_named(balance, waiting)}){_resolved_in_vain(waiting)}: "
                f"decide on {'it' if len(waiting) == 1 else 'them'} on its page, or sign it "
                "off on its own",
            )
        found = f": {discrepancies_named(balance)}" if balance.discrepancies else ""
        return Refusal(
            f"balance_{balance.status}",
            f"the balance is {balance.status}{found}; sign it off on its own, with a note on it",
        )
    if rejected_events:
        were = "event of its PDA was" if rejected_events == 1 else "events of its PDA were"
        return Refusal(
            "rejected_events",
            f"{rejected_events} {were} rejected: see its page, or sign it off on its own",
        )
    if flags:
        kinds = ", ".join(sorted({flag.kind for flag in flags}))
        return Refusal(
            "open_flags",
            f"{len(flags)} flag{'' if len(flags) == 1 else 's'} of it waiting ({kinds}): "
            "decide on them, or sign it off on its own",
        )
    if reviews:
        kinds = ", ".join(sorted({flag.kind for flag in reviews}))
        return Refusal(
            "corrections_to_review",
            f"{len(reviews)} corrected outcome{'' if len(reviews) == 1 else 's'} of its "
            f"parcels to review ({kinds}): acknowledge them, or sign it off on its own",
        )
    if images_missing:
        return Refusal(
            "images_missing",
            f"{images_missing} proof image{'' if images_missing == 1 else 's'} of its "
            "deliveries not uploaded: wait for them, or sign it off on its own",
        )
    return None


def _to_decide(waiting: int, found: int) -> str:
    """``2 of its 3 discrepancies``; ``1 discrepancy``, ``2 discrepancies`` when none of
    them is decided (not "1 of its 1")."""
    if waiting == found:
        return counted(waiting, "discrepancy", "discrepancies")
    return f"{waiting} of its {counted(found, 'discrepancy', 'discrepancies')}"


def _resolved_in_vain(waiting: Sequence[Discrepancy]) -> str:
    """``; unknown_parcel (PAR1) is resolved, but take the parcel in: ...``: why a
    resolved flag among ``waiting`` does not count as decided (``undecidable``), which
    the manager who resolved it would not guess."""
    return "".join(
        f"; {d.kind} ({d.tracking_no}) is resolved, but {why}"
        for d in waiting
        if d.flag_status == FlagStatus.RESOLVED and (why := undecidable(d)) is not None
    )


def _refusal(
    shift_id: int,
    version: str,
    *,
    known: bool,
    shift: Shift | None,
    read: HandoverRead | None,
    decided: bool = False,
    open_said: str | None = None,
) -> Outcome | None:
    """Why this shift of the request is not signed off, or None. ``shift`` and
    ``read`` are None for a shift still open (or not the station's: ``known``);
    ``open_said``: why such a one is refused, where its courier went on
    (``still_open_said``), if they did."""
    if not known:
        why: Refusal | None = Refusal("shift_not_found", "no such shift at this station")
    elif shift is None or read is None:
        why = Refusal("shift_open", open_said or STILL_OPEN)
    else:
        why = not_clean(shift, read, decided=decided)
        if why is None:  # clean when read too: no event rejected, no flag, no image missing
            why = changed_since_read(Seen(version, **READ_CLEAN), read)
    if why is None:
        return None
    return Outcome(shift_id, REFUSED, why.code, f"shift {shift_id}: {why.message}")
