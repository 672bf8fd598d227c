"""Rule 6: a device's sequence numbers are its causal order.

An event dated earlier, on the PDA's own clock, than the event before it on the
same PDA (a consent "captured" before the drop it followed) is a time inversion,
whatever the clocks say. The event before it is the nearest stored one below it:
seqs between them that arrived and were rejected (quarantined) hold no time and
hide nothing, or a malformed event slipped in between would hide the backdating. A
seq still on the PDA leaves the pair unjudged until it comes, and the pair is
judged by the push that completes it: one that stores either event, or rejects
the last seq between them.

A clock stepped back by less than the tolerance between two events (an NTP correction
of a second or two, the PDA's clock put right) is no inversion: nothing was backdated
that a seq does not already order (a consent captured on the drop's PDA is judged by
seq, ``sync.rules.granted_before``), and a manager would get a warning for every step.
The tolerance is kept small (``TIME_INVERSION_TOLERANCE_SECONDS``, at most a minute),
so a consent backdated to before the drop it followed is still flagged.

A seq that held no event and gets one later (a rejected event sent again corrected
under its id and seq, a written-off seq arriving after all) splits the pair judged
across it: the events around it are no longer neighbours, and a flag raised for them
would stand in one order of arrival only (rule 3). The push storing it judges that
pair again (``Judgement.split``): each of its seqs that no pair of neighbours
inverted now still names (for the later one's parcel, at the flag's station:
``Judgement.standing_at``) is withdrawn from the flag. A seq still on the PDA splits
nothing: no pair was judged across it. Only a push storing a seq that arrived before
pays for it (a search on each side of the pair).

A write-off makes neighbours too: seqs a manager declares lost count as held and hold
no event, as rejected ones do, so the events around them are neighbours for good. A
push storing one of those events judges the pair across them (it finds them held and
empty); a write-off made once both had arrived judges it itself
(``across_written_off_at``), or the flags would depend on whether the manager wrote the
seqs off before or after the PDA's pushes (rule 3). It splits nothing: it stores no
event.

Pure: the caller hands in what the server holds (``SeqTracker``) and two look-ups.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import NamedTuple

from sync.acks import SeqTracker


class Stamp(NamedTuple):
    """What an inversion compares of a stored event: its time on the PDA's clock; and
    the station it was pushed at, where known: the pair it ends is that station's flag
    (``across_written_off_at``)."""

    occurred_at_device: dt.datetime
    tracking_no: str
    station_id: int | None = None


# The stored events at these seqs: {seq: stamp}, for the seqs that have one.
LookUp = Callable[[list[int]], Mapping[int, Stamp]]
# The stored event nearest an end of [low, high]: searching down from ``high``
# (``downward``) or up from ``low``: (seq, stamp), or None.
Nearest = Callable[[int, int, bool], tuple[int, Stamp] | None]


class Judgement(NamedTuple):
    """What a push changes of a device's inverted pairs: ``inverted_at``, the pairs it
    completes, ``{(tracking number, station): seqs}``, each pair its later event's
    station (``Stamp.station_id``), the station whose flag it is, to be flagged.
    ``split``: the seqs of the pairs it split, by parcel; ``standing_at``: those of them
    some inverted pair still names, by parcel and station. A station's flag keeps a split
    pair's seq only for a pair of that station, and loses the rest (``sync.ingest``): a
    seq one station's pair names is no reason to keep it on another's flag."""

    inverted_at: dict[tuple[str, int | None], set[int]]
    split: dict[str, set[int]] = {}
    standing_at: dict[tuple[str, int | None], set[int]] = {}


def judge(
    new: Mapping[int, Stamp],
    rejected: Collection[int],
    held: SeqTracker,
    look_up: LookUp,
    nearest: Nearest,
    tolerance: dt.timedelta = dt.timedelta(0),
    held_before: SeqTracker | None = None,
) -> Judgement:
    """The pairs a push completes and those it splits: ``new``, the events it stored;
    ``rejected``, the seqs it answered with a rejection; ``held``, the device's seqs
    that arrived (this push's included); ``held_before``, those that had arrived before
    it (without it, no pair is taken as split). A pair is inverted when the later seq
    is dated more than ``tolerance`` before the earlier.

    One look-up for the seqs next to each run of the push's seqs; then, only where a
    rejected seq of an earlier push lies next to a run, one search past the rejected
    seqs, unless the seqs looked at already show the stored one beyond them. A pair
    split, inverted, costs a search on each side of it, for its events' other
    neighbours.
    """
    known: dict[int, Stamp] = dict(new)
    anchors = set(known) | set(rejected)
    if not anchors:
        return Judgement({})
    probe = set(rejected) - set(known)
    for low, high in _runs(sorted(anchors)):
        probe.update((low - 1, high + 1))
    looked = sorted(s for s in probe - set(known) if held.holds(s))
    known.update(look_up(looked) if looked else {})
    # Seqs that arrived and hold no stored event: this push's rejections, unless the
    # seq is stored after all (a re-used id or seq), and the earlier ones found so.
    gaps = set(rejected) - set(known)
    empty = set(looked) - set(known)

    memo: dict[tuple[int, bool], int | None] = {}

    def beyond(seq: int, downward: bool) -> int | None:
        """The nearest stored seq from ``seq`` on, past seqs that arrived empty (this
        push's rejections and those looked up): known already, or found in one search
        of the database where the seqs looked at end; None past a seq still on the
        PDA. Each seq walked past remembers the answer."""
        step = -1 if downward else 1
        path = []
        at = seq
        while at in empty or at in gaps:
            if (at, downward) in memo:
                found = memo[at, downward]
                break
            path.append(at)
            at += step
        else:
            if at in known:
                found = at
            elif not held.holds(at):  # still on the PDA, or no seq 0
                found = None
            else:  # arrived, not looked at: the database knows
                low, high = held.held_run(at)
                hit = nearest(low, at, True) if downward else nearest(at, high, False)
                found = None if hit is None else hit[0]
                if hit is not None:
                    known[hit[0]] = hit[1]
        for visited in path:
            memo[visited, downward] = found
        return found

    ordered = sorted(set(new) | gaps)
    below = {seq: beyond(seq - 1, downward=True) for seq in ordered}
    above = {seq: beyond(seq + 1, downward=False) for seq in ordered}
    pairs: set[tuple[int | None, int | None]] = set()
    for seq in ordered:
        if seq in new:
            pairs.update(((below[seq], seq), (seq, above[seq])))
        else:
            pairs.add((below[seq], above[seq]))

    def inverted_at(
        judged: Iterable[tuple[int | None, int | None]],
    ) -> dict[tuple[str, int | None], set[int]]:
        return _inverted_at(
            (
                ((before, known[before]), (after, known[after]))
                for before, after in judged
                if before is not None and after is not None
            ),
            tolerance,
        )

    def inverted_among(judged: Iterable[tuple[int | None, int | None]]) -> dict[str, set[int]]:
        return _by_parcel(inverted_at(judged))

    completed = inverted_at(pairs)
    # The pairs split: the stored events around each chain of new neighbours, if every
    # seq between them had arrived before this push (the pair was judged then).
    split = [
        (below[seq], end)
        for seq, end in _chains(ordered, new, above).items()
        if below[seq] is not None
        and end is not None
        and held_before is not None
        and held_before.holds_all(below[seq] + 1, end - 1)
    ]
    split = [pair for pair in split if inverted_among([pair])]
    if not split:
        return Judgement(completed)
    # What else names their events now: the new pairs, and each one's other neighbour.
    standing_at = inverted_at(
        [
            *pairs,
            *((beyond(before - 1, downward=True), before) for before, _ in split),
            *((after, beyond(after + 1, downward=False)) for _, after in split),
        ]
    )
    return Judgement(completed, inverted_among(split), standing_at)


def across_written_off_at(
    ranges: Iterable[Sequence[int]],
    held: SeqTracker,
    nearest: Nearest,
    tolerance: dt.timedelta = dt.timedelta(0),
) -> dict[tuple[str, int | None], set[int]]:
    """``{(tracking number, station): seqs}`` of the inverted pairs a write-off of
    ``ranges`` completes: for each range, the stored events nearest below and above it,
    past seqs that arrived empty, when both are there (``held``: the device's seqs with
    the write-off's counted as held). Each pair is its later event's station's, the one
    it was pushed at (``Stamp.station_id``), as the push storing it in order would have
    raised it at its courier's: a PDA moved to another station since leaves its old
    shifts' pairs to their station. Two searches per range; write-offs are few."""
    pairs = []
    for first, last in ranges:
        low, high = held.held_run(first)[0], held.held_run(last)[1]
        below = nearest(low, first - 1, True) if low < first else None
        above = nearest(last + 1, high, False) if last < high else None
        if below is not None and above is not None:
            pairs.append((below, above))
    return _inverted_at(pairs, tolerance)


def still_named_at(
    seqs: Iterable[int],
    held: SeqTracker,
    look_up: LookUp,
    nearest: Nearest,
    tolerance: dt.timedelta = dt.timedelta(0),
) -> dict[tuple[str, int | None], set[int]]:
    """``{(tracking number, station): seqs}`` that the inverted pairs of neighbours with
    an end among ``seqs`` name now, each at its later event's station, judged on the
    events stored (``courier-api rejudge``: a flag's seqs, some named for a pair that a
    seq stored since split, or at another station than its later event's). A seq with
    no stored event names nothing.

    One look-up, of the seqs and those beside them: a stored seq's neighbour is nearly
    always the seq beside it, stored too. A search only where that one has no event (a
    seq rejected or written off between them), so a batch of flags costs a look-up
    however many seqs they name."""
    wanted = sorted(set(seqs))
    if not wanted:
        return {}
    beside = {seq + step for seq in wanted for step in (-1, 1) if seq + step >= 1}
    stamps = dict(look_up(sorted(beside | set(wanted))))
    pairs = []
    for seq in wanted:
        stamp = stamps.get(seq)
        if stamp is None:
            continue
        low, high = held.held_run(seq)
        if low < seq and (hit := _neighbour(stamps, seq - 1, nearest, low, True)) is not None:
            pairs.append((hit, (seq, stamp)))
        if seq < high and (hit := _neighbour(stamps, seq + 1, nearest, high, False)) is not None:
            pairs.append(((seq, stamp), hit))
    return _inverted_at(pairs, tolerance)


def _neighbour(
    stamps: Mapping[int, Stamp], beside: int, nearest: Nearest, end: int, downward: bool
) -> tuple[int, Stamp] | None:
    """The stored event nearest ``beside`` (itself when stored: read already), searching
    from it towards ``end`` of its run."""
    if beside in stamps:
        return beside, stamps[beside]
    return nearest(end, beside, True) if downward else nearest(beside, end, False)


def _inverted_at(
    pairs: Iterable[tuple[tuple[int, Stamp], tuple[int, Stamp]]], tolerance: dt.timedelta
) -> dict[tuple[str, int | None], set[int]]:
    """``{(tracking number, station): seqs}`` of the inverted ``pairs`` of neighbours,
    each ``((seq, stamp), (later seq, stamp))``: the later dated more than ``tolerance``
    before the earlier, named under the later one's parcel and station. The one test of
    rule 6 a push, a write-off and ``rejudge`` all apply."""
    found: dict[tuple[str, int | None], set[int]] = {}
    for (before, earlier), (after, later) in pairs:
        if later.occurred_at_device < earlier.occurred_at_device - tolerance:
            found.setdefault((later.tracking_no, later.station_id), set()).update((before, after))
    return found


def _by_parcel(found: Mapping[tuple[str, int | None], set[int]]) -> dict[str, set[int]]:
    merged: dict[str, set[int]] = {}
    for (tracking_no, _), seqs in found.items():
        merged.setdefault(tracking_no, set()).update(seqs)
    return merged


def _chains(
    ordered: list[int], new: Mapping[int, Stamp], above: Mapping[int, int | None]
) -> dict[int, int | None]:
    """``{first: the stored seq above the last}`` for each chain of new events that are
    neighbours of one another (each the next one's ``below``), by its first seq."""
    chains: dict[int, int | None] = {}
    following = {seq: above[seq] for seq in ordered if seq in new}
    inner = {after for after in following.values() if after in new}
    for first in following:
        if first in inner:
            continue
        end = following[first]
        while end is not None and end in new:
            end = following[end]
        chains[first] = end
    return chains


def _runs(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Ascending seqs as runs of consecutive ones: ``[(first, last), ...]``."""
    runs: list[tuple[int, int]] = []
    for seq in seqs:
        if runs and seq == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs
