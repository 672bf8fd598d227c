"""A shift's handover balance (DESIGN.md rule 5), as pure functions.

At the end of a shift (归班交接) every parcel the courier checked out must be
accounted for::

    checked out = delivered with POD + unattended with consent + returned + missing

and the numbers must close (平衡合拢). The balance is computed from the events
filed under the shift and the rule flags that judged them; nothing in it is
typed in. Each parcel of the shift gets one outcome:

* ``delivered`` — handed over in person, with a proof of delivery;
* ``delivered_without_pod`` — handed over with no (or an incomplete) proof;
* ``unattended`` — left in a locker or at a pickup point, authorized;
* ``unattended_without_consent`` — left there without a consent that came first;
* ``returned`` — back at the station;
* ``missing`` — checked out and no final outcome since.

The balance is *balanced* when nothing is missing and no discrepancy stands;
*provisional* while sequence numbers the shift may own are still on the PDA
(whatever the rest says: the events that would settle it have not arrived);
*unbalanced* otherwise. Seqs a manager wrote off as lost (``sync.lost_seqs``) count
as held for that, and the balance names them and the write-off instead. A
discrepancy is a fact about the shift's events, so a manager resolving its flag does
not make the balance close; it lets them sign the handover off knowingly.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from models import EventType, FlagStatus, ShiftStatus
from sync.acks import overlap
from sync.projection import EventFact, ordered, voided_by
from sync.rules import DELIVERIES, DROPS, FINAL_OUTCOMES

# Flags of the shift itself, one per shift and parcel.
MISSING = "missing_at_handover"
NOT_ON_MANIFEST = "not_on_manifest"
# The rule flag that covers a parcel not on a shift's manifest (``handover_flags_wanted``):
# raised or closed, the closed shifts holding the parcel's events are judged again.
NOT_CHECKED_OUT = "delivered_not_checked_out"
HANDOVER_KINDS = (MISSING, NOT_ON_MANIFEST)
# Parcel rule flags (sync.rules) that unbalance the shifts whose events they name.
POD_KINDS = frozenset({"delivered_without_pod"})
CONSENT_KINDS = frozenset({"unauthorized_locker_drop", "consent_after_drop"})
OUTCOME_KINDS = frozenset({"conflicting_final_outcome", "delivered_not_checked_out"})
# A parcel the station has not taken in: rules 4 and 5 cannot judge its events (no
# class, no address) until it is, when the flag closes and its rule flags are raised.
INTAKE_KINDS = frozenset({"unknown_parcel"})
BALANCE_RULE_KINDS = POD_KINDS | CONSENT_KINDS | OUTCOME_KINDS | INTAKE_KINDS
# What a manager does about each kind of discrepancy: the balance and the shift page
# give it beside the flag and its evidence. Deciding on the flag records what was found;
# only events (a late batch, a correction, an intake) change the balance.
WHAT_TO_DO = {
    MISSING: "Find the parcel: ask the courier, look in the cage of returns. Its return "
    "scanned (a late batch from the PDA) closes the flag; lost, resolve the flag saying "
    "so and sign the shift off with a note on it.",
    NOT_ON_MANIFEST: "The shift has an outcome of a parcel it never checked out: ask the "
    "courier where they took it from (the parcel's flags list its other shifts). A "
    "check-out arriving late closes the flag; otherwise resolve it saying how they had it.",
    "delivered_without_pod": "The scan names no proof (or not the signature the class "
    "needs): have the courier scan the delivery again on the PDA with the signature or "
    "photo; that scan closes the flag (an image uploaded does not: the scan never named "
    "it). Without one, call the recipient and resolve the flag with what they said.",
    "unauthorized_locker_drop": "Call the recipient: have the parcel collected or fetched "
    "back. Consent recorded now does not authorize the drop (it becomes "
    "consent_after_drop); resolve the flag with the call's outcome.",
    "consent_after_drop": "The consent came after the drop: check with the recipient "
    "that they collected the parcel, and resolve the flag with what they said.",
    "conflicting_final_outcome": "Two final outcomes: ask the courier which one "
    "happened. The PDA's correction voiding the other closes the flag; otherwise resolve "
    "it with the courier's answer.",
    "delivered_not_checked_out": "Delivered though never checked out: find where the "
    "parcel came from (another courier's cage, a mis-sort). A check-out arriving late "
    "closes the flag; otherwise resolve it saying how the courier had it.",
    "unknown_parcel": "The station has not taken the parcel in: take it in (POST "
    "/parcels, or courier-api import-parcels). Intake closes the flag and judges its "
    "scans.",
}

# A parcel the shift never checked out, with no final outcome in it either, is listed
# as "no_outcome" (it is counted nowhere).
NO_OUTCOME = "no_outcome"
OUTCOMES = (
    "delivered",
    "delivered_without_pod",
    "unattended",
    "unattended_without_consent",
    "returned",
    "missing",
)
MISSING_SEQS_SHOWN = 100


class BalanceStatus:
    BALANCED = "balanced"
    UNBALANCED = "unbalanced"
    PROVISIONAL = "provisional"


class ShiftEvent(NamedTuple):
    """An event filed under a shift (or a correction voiding one)."""

    tracking_no: str
    fact: EventFact


@dataclass(frozen=True)
class FlagRef:
    """A flag as the balance cites it."""

    id: int
    kind: str
    status: FlagStatus
    event_ids: frozenset[int] = frozenset()
    station_id: int | None = None  # the station whose manager decides it


@dataclass(frozen=True)
class ParcelTrail:
    """What the shift's own events say of one parcel, before any flag is consulted."""

    tracking_no: str
    on_manifest: bool  # checked out in this shift
    checkout_event_ids: tuple[int, ...]
    # The final outcome after the last check-out, if any, by the scan that settles it:
    # one outcome however often it was scanned, settled by its first scan, as the rules
    # judge it (``sync.rules.first_scans``; the rule flags cite every scan of it). None
    # also off the manifest when the shift's scans only repeat an outcome another shift
    # recorded: that one is the other shift's.
    final_event: EventFact | None
    final_event_ids: tuple[int, ...]  # every counting final outcome in the shift
    event_ids: tuple[int, ...]  # every counting event of the parcel in the shift
    last_type: EventType | None  # what the parcel's last counting event in the shift was
    # The shift's scans that repeat an earlier scan of the same outcome, in projection
    # order, each with that outcome's first scan (in this shift or another).
    repeated_scans: tuple[RepeatedScan, ...] = ()

    def judged_event_ids(self) -> set[int]:
        """Its events whose rule flags are the shift's discrepancies: all but the scans
        repeating an outcome first scanned in another shift (that shift's, with its
        flags: a drop left unauthorized there unbalances it, not the shift that only
        scanned it again)."""
        own = set(self.event_ids)
        return own - {r.event_id for r in self.repeated_scans if r.first_event_id not in own}


class RepeatedScan(NamedTuple):
    """A final outcome scanned again (``sync.rules.final_outcomes``) and the first scan of
    the outcome it repeats, as the rule flags name it (``repeated_scans``)."""

    event_id: int
    first_event_id: int


@dataclass(frozen=True)
class Discrepancy:
    kind: str
    tracking_no: str
    flag_id: int | None
    flag_status: FlagStatus | None
    event_ids: tuple[int, ...]
    # Its flag is another station's than the shift's: that station's manager decides it,
    # the shift's neither sees nor decides it (``discrepancies_decided``). A flag raised
    # before flags had a station each sits at the parcel's station whoever's events it
    # cites (``sync.rules.by_station``), and a PDA or courier moved to another station
    # with a shift open pushes under that station's flags into it.
    flag_elsewhere: bool = False


@dataclass(frozen=True)
class ParcelOutcome:
    tracking_no: str
    outcome: str  # one of OUTCOMES
    on_manifest: bool
    outcome_event_id: int | None
    event_ids: tuple[int, ...]
    repeated_scans: tuple[RepeatedScan, ...] = ()


class WriteOff(NamedTuple):
    """A manager's write-off of seqs its PDA lost (``models.SeqWriteOff``); on a
    balance, ``ranges`` are those of the shift's seqs it still writes off."""

    id: int
    ranges: list[list[int]]
    reason: str
    written_off_by: int
    # Full name, else username; None where the reader may not know them (another
    # station's user to a station's manager: ``sync.pages.write_offs_named``).
    written_off_by_name: str | None
    written_off_at: dt.datetime


@dataclass(frozen=True)
class ShiftSeqs:
    """What the balance needs to know to tell whether events are still on the PDA."""

    status: ShiftStatus
    first_seq: int | None  # declared at opening
    last_seq: int | None  # declared at closing
    device_max_seq: int
    device_missing: Sequence[Sequence[int]]  # gaps below device_max_seq, [first, last]
    lowest_event_seq: int | None = None  # the lowest seq of the shift's own events
    # Where the device's next shift starts (its first_seq, else its lowest event's):
    # what a closed shift that declared no last_seq may own ends before it.
    next_shift_seq: int | None = None
    # Where the device's previous shift ended (its declared last_seq; 0 with no previous
    # shift): what a shift that declared no first_seq may own starts after it. None
    # when the previous shift declared none (what lies between is that one's).
    previous_shift_end: int | None = None
    # Seqs below device_max_seq written off as lost and not arrived since, [first, last],
    # and the device's write-offs that wrote them off.
    device_written_off: Sequence[Sequence[int]] = ()
    write_offs: Sequence[WriteOff] = ()


@dataclass(frozen=True)
class Balance:
    shift_id: int
    status: str
    checked_out: int
    delivered: int
    delivered_without_pod: int
    unattended: int
    unattended_without_consent: int
    returned: int
    missing: int
    not_checked_out: int  # outcomes recorded for parcels this shift never checked out
    missing_seqs: list[int]
    missing_seq_count: int
    parcels: list[ParcelOutcome] = field(default_factory=list)
    discrepancies: list[Discrepancy] = field(default_factory=list)
    # Seqs of the shift written off as lost: held for its status, named here instead.
    written_off_seqs: list[int] = field(default_factory=list)
    written_off_seq_count: int = 0
    write_offs: list[WriteOff] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Status and counts, as the station board shows them."""
        return {
            "status": self.status,
            **{name: getattr(self, name) for name in COUNT_FIELDS},
            "missing_seq_count": self.missing_seq_count,
            "discrepancy_count": len(self.discrepancies),
        }

    def snapshot(self, *, outcomes: bool = True, latest_scans: bool = False) -> dict[str, Any]:
        """What a manager signing off saw: the summary, the gaps, the discrepancies, and
        each parcel's outcome with the event that settles it (not those counted nowhere).
        Counts alone miss two parcels swapping outcomes (a mis-tapped delivery and return
        both corrected): the manager checked the other parcel at the counter.
        ``outcomes=False``: without them (a webhook's balance, every parcel's left out).
        ``latest_scans``: each outcome scanned again named by its latest scan in the
        shift, as sign-offs kept it before the first scan settled it (``signed_as``)."""
        seen: dict[str, Any] = {
            **self.summary(),
            "missing_seqs": self.missing_seqs,
            "discrepancies": [
                {"kind": d.kind, "tracking_no": d.tracking_no, "flag_id": d.flag_id}
                for d in self.discrepancies
            ],
        }
        if self.written_off_seq_count:  # (so a balance without keeps its version)
            seen["written_off_seqs"] = self.written_off_seqs
            seen["written_off_seq_count"] = self.written_off_seq_count
        if outcomes:
            seen[OUTCOMES_KEPT] = {
                p.tracking_no: [p.outcome, _latest_scan(p) if latest_scans else p.outcome_event_id]
                for p in self.parcels
                if p.outcome != NO_OUTCOME
            }
        return seen


def _latest_scan(parcel: ParcelOutcome) -> int | None:
    """The latest of the shift's scans of the parcel's outcome (its first, or a repeat)."""
    repeats = [
        r.event_id for r in parcel.repeated_scans if r.first_event_id == parcel.outcome_event_id
    ]
    return repeats[-1] if repeats else parcel.outcome_event_id


def signed_as(balance: Balance, signed: dict[str, Any] | None) -> bool:
    """Whether ``balance`` says what the snapshot ``signed`` (kept with a sign-off) says.
    A sign-off kept before an outcome scanned again was settled by its first scan named
    the latest scan as the one settling it: such a balance, unchanged since, is compared
    so too, so that the upgrade shows no shift's balance changed since its sign-off."""
    now = balance.snapshot()
    if same_snapshot(now, signed):
        return True
    before = balance.snapshot(latest_scans=True)
    return before != now and same_snapshot(before, signed)


# The snapshot's key of each parcel's outcome; sign-offs before it was kept have none.
OUTCOMES_KEPT = "outcomes"


def same_snapshot(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two balance snapshots say the same, whatever the order of their
    discrepancies: one signed off before they were cited in id order (``compute_balance``)
    stored them as the database read them (on SQLite by kind). Compared on what both
    kept: one signed off before the parcels' outcomes were kept is compared without."""
    if a is None or b is None:
        return a is b
    kept = a.keys() & b.keys()
    return _canonical(a, kept) == _canonical(b, kept)


def balance_version(balance: Balance) -> str:
    """A digest of what a manager signing off sees (``Balance.snapshot``). A sign-off
    that names the version it was shown is refused once the balance has changed since
    (a push landing between the read and the sign-off): ``sync.shifts.sign_off``."""
    return snapshot_version(balance.snapshot())


def snapshot_version(snapshot: dict[str, Any]) -> str:
    """``balance_version`` of a stored snapshot (the one kept with a sign-off)."""
    text = json.dumps(_canonical(snapshot), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _canonical(snapshot: dict[str, Any], keys: Iterable[str] | None = None) -> dict[str, Any]:
    def cited(d: dict[str, Any]) -> tuple[str, str, int]:
        return d["tracking_no"], d["kind"], -1 if d["flag_id"] is None else d["flag_id"]

    kept = {k: v for k, v in snapshot.items() if keys is None or k in keys}
    if "discrepancies" in kept:
        kept["discrepancies"] = sorted(kept["discrepancies"], key=cited)
    return kept


# A balance's counts: what was checked out, each outcome (rule 5's right-hand side), and
# what was scanned off the manifest. Built from ``OUTCOMES``, so an outcome added there
# is counted (the board, the reports' columns, the simulation's) without a second list.
COUNT_FIELDS = ("checked_out", *OUTCOMES, "not_checked_out")


def parcel_trails(
    events: Iterable[ShiftEvent], first_scans: Mapping[int, EventFact] | None = None
) -> dict[str, ParcelTrail]:
    """Each parcel's story in this shift: its events in projection order, voids applied.

    ``events`` are the shift's events plus any correction (from anywhere) that voids
    one of them. ``first_scans``: ``{repeat's event id: the first scan of the outcome it
    repeats}``, from the parcels' whole histories (``sync.rules.first_scans``), for the
    parcels whose trail may hold a repeat (``may_repeat``); a parcel not in it has none.
    """
    events = list(events)
    first_scans = first_scans or {}
    voids = voided_by(e.fact for e in events)
    by_parcel: dict[str, list[EventFact]] = defaultdict(list)
    for event in events:
        if event.fact.type != EventType.CORRECTION:
            by_parcel[event.tracking_no].append(event.fact)
    trails = {}
    for tracking_no, facts in by_parcel.items():
        counting = [f for f in ordered(facts) if f.event_id not in voids]
        if not counting:
            continue
        repeats = _settled_in_shift(counting, first_scans)
        checkouts = [i for i, f in enumerate(counting) if f.type == EventType.CHECKED_OUT]
        finals = [i for i, f in enumerate(counting) if f.type in FINAL_OUTCOMES]
        after = checkouts[-1] if checkouts else -1
        final = None
        if finals and finals[-1] > after:
            latest = counting[finals[-1]]
            final = repeats.get(latest.event_id, latest)
            if not checkouts and final.event_id not in {f.event_id for f in counting}:
                final = None  # it repeats another shift's outcome: that shift's
        trails[tracking_no] = ParcelTrail(
            tracking_no=tracking_no,
            on_manifest=bool(checkouts),
            checkout_event_ids=tuple(counting[i].event_id for i in checkouts),
            final_event=final,
            final_event_ids=tuple(counting[i].event_id for i in finals),
            event_ids=tuple(f.event_id for f in counting),
            last_type=counting[-1].type,
            repeated_scans=tuple(
                RepeatedScan(counting[i].event_id, repeats[counting[i].event_id].event_id)
                for i in finals
                if counting[i].event_id in repeats
            ),
        )
    return trails


def _settled_in_shift(
    counting: Sequence[EventFact], first_scans: Mapping[int, EventFact]
) -> dict[int, EventFact]:
    """``first_scans`` for one parcel's counting events in a shift, except the scans the
    shift's own check-out settles: a scan after a check-out of the parcel standing in
    the shift on the same PDA (a lower seq) is the shift's outcome of that check-out,
    settled by the first such scan in the shift, even when a scan on another PDA filed
    under another shift lies before it in projection order (a courier with two PDAs,
    their clocks interleaved). That is what ``may_repeat`` assumes when it leaves such
    a parcel's history unread, so the shift's trail is the same read alone (its page)
    or with the other shift (the station board): read with it, the other PDA's scan
    settled the check-out, the shift's own flags on the outcome were not its
    discrepancies (a delivery without proof balanced), read alone they were. The other
    shift keeps its scan as an outcome it never checked out (``not_on_manifest``)."""
    if not first_scans:
        return {}
    own = {f.event_id for f in counting}
    checked_out: dict[str, int] = {}  # device -> the lowest seq of a check-out there
    for fact in counting:
        if fact.type == EventType.CHECKED_OUT:
            checked_out[fact.device_id] = min(fact.seq, checked_out.get(fact.device_id, fact.seq))
    repeats: dict[int, EventFact] = {}
    settling: dict[int, EventFact] = {}  # another shift's first scan -> the shift's own
    for fact in counting:
        first = first_scans.get(fact.event_id)
        if first is None:
            continue
        if first.event_id in own or fact.seq < checked_out.get(fact.device_id, fact.seq + 1):
            repeats[fact.event_id] = first
        elif first.event_id in settling:
            repeats[fact.event_id] = settling[first.event_id]
        else:
            settling[first.event_id] = fact
    return repeats


def may_repeat(events: Iterable[ShiftEvent]) -> set[str]:
    """The parcels of a shift's events whose trail may hold a repeated final outcome,
    whose folding only their whole history tells (``parcel_trails``'s ``first_scans``):
    more than one final outcome in the shift, or one with no check-out standing before
    it in the shift (it may repeat an outcome of another shift). Voided outcomes are
    counted, and a check-out counts before an outcome only on the same PDA: a few
    parcels too many are read. Voided check-outs are not counted, nor those after the
    outcome: counted, they left the parcel unread, so the shift's trail depended on
    which shifts were read with it (one whose own outcome of the parcel had no check-out
    brought its history). Most shifts have none."""
    events = list(events)
    voids = voided_by(e.fact for e in events)
    finals: dict[str, list[EventFact]] = defaultdict(list)
    # (parcel, device) -> the lowest seq of a check-out of the parcel standing there
    first_checkout: dict[tuple[str, str], int] = {}
    for event in events:
        fact = event.fact
        if fact.type in FINAL_OUTCOMES:
            finals[event.tracking_no].append(fact)
        elif fact.type == EventType.CHECKED_OUT and fact.event_id not in voids:
            key = (event.tracking_no, fact.device_id)
            first_checkout[key] = min(fact.seq, first_checkout.get(key, fact.seq))
    return {
        tn
        for tn, scans in finals.items()
        if len(scans) > 1
        or scans[0].seq < first_checkout.get((tn, scans[0].device_id), scans[0].seq + 1)
    }


def handover_flags_wanted(
    trails: Mapping[str, ParcelTrail],
    rule_flags: Mapping[str, Sequence[FlagRef]],
    *,
    shift_status: ShiftStatus,
) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(kind, tracking no): evidence}``: the shift's own discrepancies now.

    None while the shift is open: a parcel is missing only once the courier is back.
    An outcome for a parcel this shift never checked out is ``not_on_manifest``
    unless the parcel's ``delivered_not_checked_out`` flag already names it.
    """
    if shift_status == ShiftStatus.OPEN:
        return {}
    wanted: dict[tuple[str, str], dict[str, Any]] = {}
    for tracking_no, trail in trails.items():
        if trail.on_manifest and trail.final_event is None:
            wanted[(MISSING, tracking_no)] = {
                "event_ids": list(trail.event_ids),
                "checked_out_event_ids": list(trail.checkout_event_ids),
                "last_event_type": trail.last_type.value,
            }
        elif not trail.on_manifest and trail.final_event is not None:
            finals = set(trail.final_event_ids)
            covered = any(
                flag.kind == NOT_CHECKED_OUT and flag.event_ids & finals
                for flag in rule_flags.get(tracking_no, ())
            )
            if not covered:
                wanted[(NOT_ON_MANIFEST, tracking_no)] = {
                    "event_ids": list(trail.final_event_ids),
                    "outcome": trail.final_event.type.value,
                }
    return wanted


def compute_balance(
    *,
    shift_id: int,
    trails: Mapping[str, ParcelTrail],
    rule_flags: Mapping[str, Sequence[FlagRef]],
    handover_flags: Mapping[tuple[str, str], FlagRef],
    seqs: ShiftSeqs,
    station_id: int | None = None,
) -> Balance:
    """The balance of one shift from its parcels' trails and the flags that judge them.

    ``rule_flags``: each parcel's rule flags that are not closed (their cause
    stands); ``handover_flags``: the shift's own flags by (kind, tracking number).
    ``station_id``: the shift's; a rule flag of another station is a discrepancy all
    the same, marked ``flag_elsewhere`` (None: none is).
    A discrepancy is listed from the facts, with its flag when it has one (a flag is
    raised in the transaction that causes it; a read never writes).
    """
    outcomes: list[ParcelOutcome] = []
    discrepancies: list[Discrepancy] = []
    counts = dict.fromkeys(COUNT_FIELDS, 0)
    wanted = handover_flags_wanted(trails, rule_flags, shift_status=seqs.status)
    for tracking_no in sorted(trails):
        trail = trails[tracking_no]
        shift_events = trail.judged_event_ids()
        # By id: the database hands them in no set order, and a signed-off shift's
        # balance is compared with the one signed off, discrepancies in order.
        cited = sorted(
            (
                f
                for f in rule_flags.get(tracking_no, ())
                if f.kind in BALANCE_RULE_KINDS and f.event_ids & shift_events
            ),
            key=lambda f: f.id,
        )
        outcome = _outcome(trail, cited)
        if trail.on_manifest:
            counts["checked_out"] += 1
            counts[outcome] += 1
        elif trail.final_event is not None:
            counts["not_checked_out"] += 1
        outcomes.append(
            ParcelOutcome(
                tracking_no=tracking_no,
                outcome=outcome,
                on_manifest=trail.on_manifest,
                outcome_event_id=trail.final_event.event_id if trail.final_event else None,
                event_ids=trail.event_ids,
                repeated_scans=trail.repeated_scans,
            )
        )
        for flag in cited:
            discrepancies.append(
                Discrepancy(
                    flag.kind,
                    tracking_no,
                    flag.id,
                    flag.status,
                    tuple(sorted(flag.event_ids & shift_events)),
                    flag_elsewhere=station_id is not None
                    and flag.station_id not in (None, station_id),
                )
            )
        for kind in HANDOVER_KINDS:
            if (kind, tracking_no) in wanted:
                flag = handover_flags.get((kind, tracking_no))
                discrepancies.append(
                    Discrepancy(
                        kind,
                        tracking_no,
                        flag.id if flag else None,
                        flag.status if flag else None,
                        tuple(wanted[(kind, tracking_no)]["event_ids"]),
                    )
                )
    missing_seqs, missing_count = shift_missing_seqs(seqs)
    written_off_seqs, written_off_count, write_offs = shift_written_off_seqs(seqs)
    if missing_count:
        status = BalanceStatus.PROVISIONAL
    elif counts["missing"] or discrepancies:
        status = BalanceStatus.UNBALANCED
    else:
        status = BalanceStatus.BALANCED
    return Balance(
        shift_id=shift_id,
        status=status,
        **counts,
        missing_seqs=missing_seqs,
        missing_seq_count=missing_count,
        parcels=outcomes,
        discrepancies=discrepancies,
        written_off_seqs=written_off_seqs,
        written_off_seq_count=written_off_count,
        write_offs=write_offs,
    )


def _outcome(trail: ParcelTrail, cited: Sequence[FlagRef]) -> str:
    final = trail.final_event
    if final is None:
        return "missing" if trail.on_manifest else NO_OUTCOME
    flagged = {f.kind for f in cited if final.event_id in f.event_ids}
    if final.type == EventType.RETURNED_TO_STATION:
        return "returned"
    if final.type in DROPS:
        return "unattended_without_consent" if flagged & CONSENT_KINDS else "unattended"
    assert final.type in DELIVERIES
    return "delivered_without_pod" if flagged & POD_KINDS else "delivered"


def shift_missing_seqs(seqs: ShiftSeqs) -> tuple[list[int], int]:
    """The sequence numbers the server lacks that may hold events of this shift.

    The shift owns (``owned_seqs``) the seqs from the first it declared to the
    last it declared at closing; a shift that declared none owns everything up to
    where the device's next shift starts (or, with no next shift, the device's highest
    seq): a gap there may hold its first or last events, and says so until they come.
    Missing are the device's gaps below its highest seq, plus a declared last seq
    beyond it (a final batch that never came).
    """
    span = owned_seqs(seqs)
    if span is None:
        return [], 0
    ranges = [(first, last) for first, last in seqs.device_missing]
    if span[1] > seqs.device_max_seq:
        ranges.append((seqs.device_max_seq + 1, span[1]))
    return _seqs_within(span, ranges)


def shift_written_off_seqs(seqs: ShiftSeqs) -> tuple[list[int], int, list[WriteOff]]:
    """The seqs the shift may own that a manager wrote off as lost (the first
    ``MISSING_SEQS_SHOWN``), how many, and each write-off of them with the ranges of
    them it wrote off. Not missing (``shift_missing_seqs``): held, for its status."""
    span = owned_seqs(seqs)
    if span is None or not seqs.device_written_off:
        return [], 0, []
    shown, count = _seqs_within(span, seqs.device_written_off)
    if not count:
        return [], 0, []
    standing = overlap([span], seqs.device_written_off)
    write_offs = []
    for write_off in seqs.write_offs:
        ranges = overlap(write_off.ranges, standing)
        if ranges:
            write_offs.append(write_off._replace(ranges=ranges))
    return shown, count, write_offs


def _seqs_within(span: tuple[int, int], ranges: Iterable[Sequence[int]]) -> tuple[list[int], int]:
    """The seqs of ``ranges`` (ascending) within ``span``: the first
    ``MISSING_SEQS_SHOWN``, and how many."""
    low, high = span
    shown: list[int] = []
    count = 0
    for first, last in ranges:
        first, last = max(first, low), min(last, high)
        if first > last:
            continue
        count += last - first + 1
        room = MISSING_SEQS_SHOWN - len(shown)
        shown.extend(range(first, min(last, first + room - 1) + 1))
    return shown, count


def owned_seqs(seqs: ShiftSeqs) -> tuple[int, int] | None:
    """``(first, last)``: the device's sequence numbers the shift owns, as
    ``shift_missing_seqs`` reads them (None: it holds no event and bounds none). Its
    PDA's events with these seqs are the shift's, arrived, missing or rejected."""
    low = _first_owned_seq(seqs)
    if low is None:
        return None
    if seqs.last_seq is not None:
        return low, seqs.last_seq
    if seqs.status != ShiftStatus.OPEN and seqs.next_shift_seq is not None:
        return low, seqs.next_shift_seq - 1
    return low, seqs.device_max_seq


def _first_owned_seq(seqs: ShiftSeqs) -> int | None:
    """The declared first seq (or the lowest the shift holds, if the PDA named it on a
    lower seq); else the one after the previous shift's declared last
    (1 on the device's first shift); else the lowest the shift holds. Never above the
    lowest it holds (an event filed by time or by the PDA's claim may lie below)."""
    if seqs.first_seq is not None:
        if seqs.lowest_event_seq is not None:
            return min(seqs.first_seq, seqs.lowest_event_seq)
        return seqs.first_seq
    after_previous = first_seq_after(seqs.previous_shift_end)
    known = [s for s in (after_previous, seqs.lowest_event_seq) if s is not None]
    return min(known, default=None)


def first_seq_after(previous_shift_end: int | None) -> int | None:
    """Where the seqs of a shift that declared no first seq start: after the last seq
    the device's previous shift declared (``previous_shift_end``; 0 with no previous
    shift, so 1). None when that shift declared none: what follows it may be its own.
    What the balance counts from (``_first_owned_seq``), and what ``sync.shifts`` files
    by (``_Window.with_first_seq_derived``)."""
    return None if previous_shift_end is None else previous_shift_end + 1


def discrepancies_decided(balance: Balance) -> list[int]:
    """The flags of the balance's discrepancies a manager resolved, by id. A resolved flag
    still stands as a discrepancy (resolving records a decision, it does not change what
    happened: the balance stays unbalanced); a shift closed all of whose
    discrepancies are decided, not provisional and clean in all else
    (``sync.signoffs.not_clean``), waits for nothing more of the manager but a sign-off,
    which the board offers together (``sync.signoffs.sign_off_clean`` with ``decided``).
    An acknowledged flag is still to decide, as the board's waiting flags count it.

    Not decided for this shift's station, resolved or not (``undecidable``): a flag of
    another station (``flag_elsewhere``), whose decision is that station's manager's,
    not this one's to sign off on; and an ``unknown_parcel`` (``INTAKE_KINDS``), which
    stands for the rules not judged yet, not for a fault found (DESIGN rule 5 lists
    none such): until the parcel is taken in, its delivery's proof and its drop's
    consent are unchecked, and resolving the flag checks neither (intake closes it)."""
    return [
        d.flag_id
        for d in balance.discrepancies
        if d.flag_id is not None
        and d.flag_status == FlagStatus.RESOLVED
        and undecidable(d) is None
    ]


def undecidable(discrepancy: Discrepancy) -> str | None:
    """Why no decision of this station's manager settles ``discrepancy`` for a sign-off
    of those decided, or None (``discrepancies_decided``)."""
    if discrepancy.kind in INTAKE_KINDS:
        return "take the parcel in: intake judges its scans"
    if discrepancy.flag_elsewhere:
        return "its flag is another station's: that station's manager decides it"
    return None


def discrepancies_to_decide(balance: Balance) -> list[Discrepancy]:
    """The balance's discrepancies no manager has resolved (open or acknowledged, or
    without a flag), in the order it lists them: what a sign-off of those whose
    discrepancies are all decided tells the manager to go and decide."""
    decided = set(discrepancies_decided(balance))
    return [d for d in balance.discrepancies if d.flag_id is None or d.flag_id not in decided]


def all_discrepancies_decided(balance: Balance) -> bool:
    """Unbalanced only by discrepancies each resolved by a manager (none without a flag,
    none open or acknowledged), its events all on the server."""
    return (
        balance.status == BalanceStatus.UNBALANCED
        and bool(balance.discrepancies)
        and len(discrepancies_decided(balance)) == len(balance.discrepancies)
    )


def sign_off_blocked(balance: Balance) -> str | None:
    """Why a sign-off must be forced, or None."""
    if balance.status == BalanceStatus.PROVISIONAL:
        return (
            f"{unsent_seqs_named(balance)}; wait for them, write off those its PDA lost, "
            "or force the sign-off with a reason"
        )
    return None


def unsent_seqs_named(balance: Balance) -> str:
    """``the balance is provisional: the PDA has not sent seq 3, 4``, the first 20."""
    shown = ", ".join(str(s) for s in balance.missing_seqs[:20])
    more = balance.missing_seq_count - min(20, len(balance.missing_seqs))
    if more > 0:
        shown += f" and {more} more"
    return f"the balance is provisional: the PDA has not sent seq {shown}"


def counts_named(balance: Balance) -> str:
    """``balanced, 12 checked out, 10 delivered, 2 returned``: the status and the counts
    that are not nought, as the board row shows them."""
    counts = [
        f"{getattr(balance, name)} {name.replace('_', ' ')}"
        for name in COUNT_FIELDS
        if getattr(balance, name)
    ]
    return ", ".join([balance.status, *counts])


DISCREPANCIES_NAMED = 3  # parcels of each kind a message names, at most


def discrepancies_named(
    balance: Balance, discrepancies: Iterable[Discrepancy] | None = None
) -> str:
    """``2 missing_at_handover (RR473124829GB, RR...), 1 not_on_manifest (...)``: the
    discrepancies by kind, in the order the balance lists them, each kind's first
    parcels by number: what the manager goes to find. ``discrepancies``: only those of
    the balance (``discrepancies_to_decide``), not all of them."""
    by_kind: dict[str, list[str]] = defaultdict(list)
    for d in balance.discrepancies if discrepancies is None else discrepancies:
        by_kind[d.kind].append(d.tracking_no)
    named = []
    for kind, numbers in by_kind.items():
        shown = ", ".join(numbers[:DISCREPANCIES_NAMED])
        if len(numbers) > DISCREPANCIES_NAMED:
            shown += f" and {len(numbers) - DISCREPANCIES_NAMED} more"
        named.append(f"{len(numbers)} {kind} ({shown})")
    return ", ".join(named)
