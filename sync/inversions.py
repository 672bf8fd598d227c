"""Rule 6: a device's sequence numbers are its causal order.

An event dated earlier, on the PDA's own clock, than the event before it on the
same PDA (a consent "captured" before the drop it followed) is a time inversion,
whatever the clocks say. The event before it is the nearest stored one below it:
seqs between them that arrived and were rejected (quarantined) hold no time and
hide nothing, or a malformed event slipped in between would hide the backdating. A
seq still on the PDA leaves the pair unjudged until it comes, and the pair is
judged by the push that completes it: one that stores either event, or rejects
the last seq between them.

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
# The stored event nearest to ``start`` within [low, high], searching down from
# ``high`` (``downward``) or up from ``low``: (seq, stamp), or None.
Nearest = Callable[[int, int, bool], tuple[int, Stamp] | None]


def time_inversions(
    new: Mapping[int, Stamp],
    rejected: Collection[int],
    held: SeqTracker,
    look_up: LookUp,
    nearest: Nearest,
) -> dict[str, set[int]]:
    """``{tracking number: seqs}`` of the inverted pairs a push completes: ``new``,
    the events it stored; ``rejected``, the seqs it answered with a rejection;
    ``held``, the device's seqs that arrived (this push's included).

    One look-up for the seqs next to each run of the push's seqs; one more search,
    per side of such a run, only when a rejected seq of an earlier push lies there.
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

    def beyond(seq: int, downward: bool) -> int | None:
        """The nearest stored seq from ``seq`` on, past seqs that arrived empty."""
        low, high = held.held_run(seq)
        hit = nearest(low, seq, True) if downward else nearest(seq, high, False)
        if hit is None:
            return None
        known[hit[0]] = hit[1]
        return hit[0]

    ordered = sorted(set(new) | gaps)
    below: dict[int, int | None] = {}
    for seq in ordered:  # ascending: a gap's answer is ready for the seq above it
        previous = seq - 1
        if previous in known:
            below[seq] = previous
        elif previous in gaps:
            below[seq] = below[previous]
        elif previous in empty:
            below[seq] = beyond(previous, downward=True)
        else:  # still on the PDA, or no seq 0
            below[seq] = None
    above: dict[int, int | None] = {}
    for seq in reversed(ordered):
        following = seq + 1
        if following in known:
            above[seq] = following
        elif following in gaps:
            above[seq] = above[following]
        elif following in empty:
            above[seq] = beyond(following, downward=False)
        else:
            above[seq] = None
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
        if known[after].occurred_at_device < known[before].occurred_at_device:
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
