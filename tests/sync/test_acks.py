"""Acknowledgements: the highest contiguous seq, and the gaps, whatever the arrival order."""

from collections.abc import Iterable, Sequence

from hypothesis import given
from hypothesis import strategies as st

from sync.acks import SeqTracker, highest_held, merged, overlap, seq_count, without
from tests.range_reads import RangeReads


def model(seqs: list[int]) -> tuple[int, list[int]]:
    held = set(seqs)
    acked = 0
    while acked + 1 in held:
        acked += 1
    missing = [s for s in range(1, max(held, default=0) + 1) if s not in held]
    return acked, missing


@given(st.lists(st.integers(min_value=1, max_value=60), max_size=80))
def test_tracker_agrees_with_the_set_of_held_seqs(seqs: list[int]) -> None:
    tracker = SeqTracker()
    tracker.add_all(seqs)
    acked, missing = model(seqs)
    assert tracker.acked_through == acked
    assert tracker.missing_seqs(1000) == missing
    assert tracker.missing_count == len(missing)
    assert tracker.missing_seqs(3) == missing[:3]
    assert [s for s in range(0, 62) if tracker.holds(s)] == sorted(set(seqs))


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=50), st.randoms())
def test_order_and_repetition_do_not_matter(seqs: list[int], random) -> None:
    shuffled = seqs * 2
    random.shuffle(shuffled)
    a, b = SeqTracker(), SeqTracker()
    a.add_all(seqs)
    b.add_all(shuffled)
    assert (a.max_seq, a.missing) == (b.max_seq, b.missing)


def test_a_huge_gap_costs_one_range_not_one_entry_per_seq() -> None:
    tracker = SeqTracker()
    tracker.add_all([1, 2, 2_000_000_000])
    assert tracker.missing == [[3, 1_999_999_999]]
    assert tracker.acked_through == 2
    assert tracker.missing_count == 1_999_999_997
    assert tracker.missing_seqs(3) == [3, 4, 5]


pairs = st.lists(
    st.tuples(st.integers(min_value=1, max_value=40), st.integers(min_value=0, max_value=6)).map(
        lambda p: [p[0], p[0] + p[1]]
    ),
    max_size=8,
)


def seqs_of(ranges: list[list[int]]) -> set[int]:
    return {s for first, last in ranges for s in range(first, last + 1)}


@given(pairs, pairs)
def test_ranges_of_seqs_merge_overlap_and_subtract_as_sets_do(a, b) -> None:
    """What a write-off of lost seqs computes with (``sync.lost_seqs``): disjoint,
    ascending, not touching ranges, holding the seqs the sets say."""
    for ranges, expected in (
        (merged(a), seqs_of(a)),
        (overlap(a, b), seqs_of(a) & seqs_of(b)),
        (without(a, b), seqs_of(a) - seqs_of(b)),
    ):
        assert seqs_of(ranges) == expected
        assert seq_count(ranges) == len(expected)
        assert all(x[1] + 1 < y[0] for x, y in zip(ranges, ranges[1:], strict=False))


def without_each_with_each(
    ranges: Iterable[Sequence[int]], cut: Iterable[Sequence[int]]
) -> list[list[int]]:
    """``without`` as it was before its single sweep (43987f0): each range compared with
    every cut. Quadratic, and the definition the sweep must keep."""
    out: list[list[int]] = []
    cuts = merged(cut)
    for first, last in merged(ranges):
        at = first
        for cut_first, cut_last in cuts:
            if cut_last < at or cut_first > last:
                continue
            if cut_first > at:
                out.append([at, cut_first - 1])
            at = cut_last + 1
        if at <= last:
            out.append([at, last])
    return out


# Ranges of seqs as a PDA's gaps and write-offs are: many, in any order, overlapping or
# touching, single seqs or a reset's billions; seqs too many to compare as sets.
wide_ranges = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=2**31 - 1),
        st.one_of(
            st.integers(min_value=0, max_value=3), st.integers(min_value=0, max_value=2**31)
        ),
    ).map(lambda p: [p[0], min(p[0] + p[1], 2**31 - 1)]),
    max_size=60,
)
dense_ranges = st.lists(
    st.tuples(st.integers(min_value=1, max_value=200), st.integers(min_value=0, max_value=4)).map(
        lambda p: [p[0], p[0] + p[1]]
    ),
    max_size=60,
)


@given(st.one_of(wide_ranges, dense_ranges), st.one_of(wide_ranges, dense_ranges))
def test_the_sweep_of_without_gives_what_each_with_each_gave(a, b) -> None:
    """The single sweep answers exactly (same ranges, same order) what comparing each
    range with each cut did, on lists too many and too wide for the sets above."""
    assert without(a, b) == without_each_with_each(a, b)


def test_without_reads_each_range_a_few_times_not_once_per_cut() -> None:
    """A PDA sending every other seq has a gap per event; a push compares its gaps
    before and after it. Counted, not timed, so no slow machine fails it."""
    gaps = 20_000
    before = [[2 * n, 2 * n] for n in range(1, gaps + 1)]
    after = before[1:]
    # Four reads a range a call, for the three calls: each with each reads 20,000².
    with RangeReads(budget=4 * 2 * (len(before) + len(after) + 1)) as reads:
        assert without(before, after) == [[2, 2]]
        assert without(after, before) == []
        assert without([[1, 2 * gaps + 1]], before) == [
            [2 * n + 1, 2 * n + 1] for n in range(gaps + 1)
        ]
    assert 0 < reads.count <= reads.budget, reads


def test_the_highest_seq_held_leaves_out_seqs_missing_or_written_off() -> None:
    assert highest_held(0, [], []) == 0
    assert highest_held(6, [[3, 4]], []) == 6
    assert highest_held(6, [[5, 5]], [[6, 6]]) == 4  # 6 written off, 5 still missing
    assert highest_held(4, [], [[1, 4]]) == 0
