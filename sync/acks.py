"""Which of a device's sequence numbers the server holds (pure).

A PDA numbers its events 1, 2, 3, ... without gaps. The server keeps the
highest number seen and the gaps below it as ranges, so acknowledging costs
as much as there are gaps, not as there are events, however long the history.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class SeqTracker:
    max_seq: int = 0
    # Gaps below max_seq, as disjoint ascending [first, last] ranges.
    missing: list[list[int]] = field(default_factory=list)

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

    def holds(self, seq: int) -> bool:
        """Whether ``seq`` arrived: an event the server stored, or one it rejected."""
        if not 1 <= seq <= self.max_seq:
            return False
        index = bisect.bisect_right(self.missing, [seq, float("inf")]) - 1
        return index < 0 or not self.missing[index][0] <= seq <= self.missing[index][1]

    @property
    def acked_through(self) -> int:
        """The highest seq up to which every event is held: the PDA may prune up to it."""
        return self.missing[0][0] - 1 if self.missing else self.max_seq

    @property
    def missing_count(self) -> int:
        return sum(last - first + 1 for first, last in self.missing)

    def missing_seqs(self, limit: int) -> list[int]:
        """The first ``limit`` missing sequence numbers, ascending."""
        found: list[int] = []
        for first, last in self.missing:
            found.extend(range(first, min(last, first + limit - len(found) - 1) + 1))
            if len(found) >= limit:
                break
        return found
