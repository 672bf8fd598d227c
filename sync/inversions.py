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

Known limit: a seq that arrives rejected and is later sent again, valid, splits a
pair judged while it was a gap; a flag raised for that pair stays (flags are not
withdrawn when their evidence is superseded), so the two orders differ by it.

Pure: the caller hands in what the server holds (``SeqTracker``) and two look-ups.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import NamedTuple

from sync.acks import SeqTracker


class Stamp(NamedTuple):
    """What an inversion compares of a stored event: its time on the PDA's clock."""

    occurred_at_device: dt.datetime
    tracking_no: str


# The stored events at these seqs: {seq: stamp}, for the seqs that have one.
LookUp = Callable[[list[int]], Mapping[int, Stamp]]
# The stored event nearest an end of [low, high]: searching down from ``high``
# (``downward``) or up from ``low``: (seq, stamp), or None.
Nearest = Callable[[int, int, bool], tuple[int, Stamp] | None]


def time_inversions(
    new: Mapping[int, Stamp],
    rejected: Collection[int],
    held: SeqTracker,
    look_up: LookUp,
    nearest: Nearest,
    tolerance: dt.timedelta = dt.timedelta(0),
) -> dict[str, set[int]]:
    """``{tracking number: seqs}`` of the inverted pairs a push completes: ``new``,
    the events it stored; ``rejected``, the seqs it answered with a rejection;
    ``held``, the device's seqs that arrived (this push's included). A pair is
    inverted when the later seq is dated more than ``tolerance`` before the earlier.

    One look-up for the seqs next to each run of the push's seqs; then, only where a
    rejected seq of an earlier push lies next to a run, one search past the rejected
    seqs, unless the seqs looked at already show the stored one beyond them.
    """
    known: dict[int, Stamp] = dict(new)
    anchors = set(known) | set(rejected)
    if not anchors:
        return {}
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
    inverted: dict[str, set[int]] = {}
    for before, after in pairs:
        if before is None or after is None:
            continue
        if known[after].occurred_at_device < known[before].occurred_at_device - tolerance:
            inverted.setdefault(known[after].tracking_no, set()).update((before, after))
    return inverted


def _runs(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Ascending seqs as runs of consecutive ones: ``[(first, last), ...]``."""
    runs: list[tuple[int, int]] = []
    for seq in seqs:
        if runs and seq == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs
