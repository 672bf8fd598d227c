"""Which of a device's sequence numbers the server holds (pure).

A PDA numbers its events 1, 2, 3, ... without gaps. The server keeps the
highest number seen and the gaps below it as ranges, so acknowledging costs
as much as there are gaps, not as there are events, however long the history.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass
class SeqTracker:
    max_seq: int = 0
    # Gaps below max_seq, as disjoint ascending [first, last] ranges.
    missing: list[list[int]] = field(default_factory=list)

    @classmethod
    def of(cls, max_seq: int, missing: Iterable[Sequence[int]]) -> SeqTracker:
        """A tracker of what a device's sync state records (``max_seq``, its
        ``missing_ranges``), on its own copy of the ranges: adding to it changes
        nothing stored or cached."""
        return cls(max_seq, [list(r) for r in missing])

    def add(self, seq: int) -> None:
        if seq > self.max_seq:
            if seq > self.max_seq + 1:
                self.missing.append([self.max_seq + 1, seq - 1])
            self.max_seq = seq
            return
        index = bisect.bisect_right(self.missing, [seq, float("inf")]) - 1
        if index < 0:
            return
        first, last = self.missing[index]
        if not first <= seq <= last:
            return  # already held
        pieces = [[first, seq - 1]] if first < seq else []
        if seq < last:
            pieces.append([seq + 1, last])
        self.missing[index : index + 1] = pieces

    def add_all(self, seqs: Iterable[int]) -> None:
        for seq in seqs:
            self.add(seq)

    def held_run(self, seq: int) -> tuple[int, int]:
        """``(first, last)``: the seqs around ``seq`` (which arrived) that all arrived."""
        index = bisect.bisect_right(self.missing, [seq, float("inf")]) - 1
        first = self.missing[index][1] + 1 if index >= 0 else 1
        last = self.missing[index + 1][0] - 1 if index + 1 < len(self.missing) else self.max_seq
        return first, last

    def holds_all(self, first: int, last: int) -> bool:
        """Whether every seq from ``first`` to ``last`` arrived (none to hold: True)."""
        return first > last or (self.holds(first) and self.held_run(first)[1] >= last)

    def holds(self, seq: int) -> bool:
        """Whether ``seq`` arrived: an event the server stored, or one it rejected."""
        if not 1 <= seq <= self.max_seq:
            return False
        index = bisect.bisect_right(self.missing, [seq, float("inf")]) - 1
        return index < 0 or not self.missing[index][0] <= seq <= self.missing[index][1]

    @property
    def acked_through(self) -> int:
        """The highest seq up to which every seq is held or written off (a device's
        ``acked_through_seq`` is ``acknowledged_through``: written-off seqs the PDA may
        still hold are not passed)."""
        return self.missing[0][0] - 1 if self.missing else self.max_seq

    @property
    def missing_count(self) -> int:
        return seq_count(self.missing)

    def missing_seqs(self, limit: int) -> list[int]:
        """The first ``limit`` missing sequence numbers, ascending."""
        found: list[int] = []
        for first, last in self.missing:
            found.extend(range(first, min(last, first + limit - len(found) - 1) + 1))
            if len(found) >= limit:
                break
        return found


# -- ranges of seqs, as the sync state keeps them: [[first, last], ...] ascending ----------

Ranges = list[list[int]]


def merged(ranges: Iterable[Sequence[int]]) -> Ranges:
    """``ranges`` in any order, overlapping or touching ones joined: disjoint, ascending."""
    out: Ranges = []
    for first, last in sorted((int(r[0]), int(r[1])) for r in ranges):
        if out and first <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], last)
        else:
            out.append([first, last])
    return out


def overlap(ranges: Iterable[Sequence[int]], other: Iterable[Sequence[int]]) -> Ranges:
    """The seqs in both, as disjoint ascending ranges."""
    a, b = merged(ranges), merged(other)
    out: Ranges = []
    i = j = 0
    while i < len(a) and j < len(b):
        first, last = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if first <= last:
            out.append([first, last])
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def without(ranges: Iterable[Sequence[int]], cut: Iterable[Sequence[int]]) -> Ranges:
    """The seqs of ``ranges`` not in ``cut``, as disjoint ascending ranges.

    One sweep through both, as ``overlap`` does: every push compares its PDA's gaps
    before and after it (``sync.ingest``), and a PDA sending every other seq leaves
    as many gaps as events; compared each with each, 20,000 of them cost a push
    twice 20 s of a worker's processor (and the PDA's lock, SQLite's writers' turn)."""
    out: Ranges = []
    cuts = merged(cut)
    below = 0  # cuts before ``below`` end before the range at hand, and every later one
    for first, last in merged(ranges):
        while below < len(cuts) and cuts[below][1] < first:
            below += 1
        at = first
        index = below
        while index < len(cuts) and cuts[index][0] <= last:
            cut_first, cut_last = cuts[index]
            if cut_first > at:
                out.append([at, cut_first - 1])
            at = max(at, cut_last + 1)
            index += 1
        if at <= last:
            out.append([at, last])
    return out


def highest_held(max_seq: int, missing: Ranges, written_off: Ranges) -> int:
    """The highest seq whose event (or rejection) the server holds, 0 for none: a
    device's ``max_seq`` counts written-off seqs as held (a write-off raises it over
    seqs that never came), this one does not."""
    held = without([[1, max_seq]], [*missing, *written_off]) if max_seq >= 1 else []
    return held[-1][1] if held else 0


def seq_count(ranges: Iterable[Sequence[int]]) -> int:
    return sum(last - first + 1 for first, last in ranges)


def shown(ranges: Iterable[Sequence[int]]) -> str:
    """``3-5, 9``: ranges as a message names them."""
    return ", ".join(f"{f}" if f == last else f"{f}-{last}" for f, last in ranges)


def acknowledged_through(
    max_seq: int,
    missing: Ranges,
    written_off: Ranges,
    *,
    held_at_write_off: int = 0,
    acknowledged_before: int = 0,
) -> int:
    """A device's ``acked_through_seq``: the highest seq up to which every seq is held
    or written off, and no further than the highest seq the server holds; never below
    ``acknowledged_before`` (the device's acknowledgement so far: a PDA that pruned is
    never asked for what it deleted).

    The PDA deletes its copies up to it. A manager writes seqs off as lost when the
    PDA lost them (a reset), or when they only look lost: a PDA offline all afternoon
    still holds them, unsent. Passed before the PDA sends them, they would be deleted
    by the first receipt it gets back online (a batch of the first of them): scans lost
    for good. So written-off seqs are passed only below a seq the server holds that
    came after the write-off, one above ``held_at_write_off`` (the highest seq it held
    when a manager last wrote off seqs of the device): the PDA numbered on past them and
    sent that (a reset PDA's next event, numbered from the sign-in's ``device_max_seq``),
    or, sending its queue oldest first, sent every seq before it. A seq held before the
    write-off passes nothing: a PDA that sent its newer scans before its older ones
    (then written off) still holds those older ones, unsent. Seqs written off that the
    acknowledgement already passed (a reset PDA's, last week) hold nothing back: the PDA
    pruned them, and a later write-off whose seqs all came after all is no gap."""
    acked = missing[0][0] - 1 if missing else max_seq
    ahead = [r for r in written_off if r[1] > acknowledged_before]
    if ahead:
        top = highest_held(max_seq, missing, written_off)
        acked = min(acked, top if top > held_at_write_off else ahead[0][0] - 1)
    return max(acked, acknowledged_before)
