"""Counting the ranges ``sync.acks``' arithmetic reads: a bound on work that no slow or
loaded machine can break, unlike a bound on seconds, yet one a sweep that compares each
range with each (quadratic in a PDA's gaps) exceeds at once."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pytest

import sync.acks


class OverBudget(AssertionError):
    """More ranges read than the budget: raised where it happens, so a quadratic sweep
    stops at once instead of running its hundreds of millions of comparisons."""


class RangeReads:
    """The ranges read, by index or by iteration, out of every ``merged`` list (what
    ``without`` and ``overlap`` sweep) while counting."""

    def __init__(self, budget: int) -> None:
        self.count = 0
        self.budget = budget

    def read(self) -> None:
        self.count += 1
        if self.count > self.budget:
            raise OverBudget(f"more than {self.budget:,} ranges read")

    def __enter__(self) -> RangeReads:
        """Count from here to the end of the ``with`` block (``merged`` patched in
        ``sync.acks`` alone, where ``without`` and ``overlap`` look it up)."""
        real = sync.acks.merged

        def counted(ranges: Iterable[Sequence[int]]) -> list[list[int]]:
            return _Counted(real(ranges), self)

        self._patch = pytest.MonkeyPatch()
        self._patch.setattr(sync.acks, "merged", counted)
        return self

    def __exit__(self, *_: object) -> None:
        self._patch.undo()

    def __repr__(self) -> str:
        return f"{self.count:,} ranges read (budget {self.budget:,})"


class _Counted(list[list[int]]):
    def __init__(self, ranges: list[list[int]], reads: RangeReads) -> None:
        super().__init__(ranges)
        self.reads = reads

    def __getitem__(self, index: Any) -> Any:
        self.reads.read()
        return super().__getitem__(index)

    def __iter__(self) -> Iterator[list[int]]:
        for item in super().__iter__():
            self.reads.read()
            yield item
