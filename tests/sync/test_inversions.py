"""Rule 6 without a database: which pairs a push completes, and what it reads."""

from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from sync.acks import SeqTracker, merged
from sync.inversions import (
    LookUp,
    Nearest,
    Stamp,
    across_written_off_at,
    judge,
    still_named_at,
)

T0 = dt.datetime(2026, 11, 23, 9, 0, tzinfo=dt.UTC)


def by_parcel(found: dict[tuple[str, int | None], set[int]]) -> dict[str, set[int]]:
    """``{(tracking number, station): seqs}`` of one station's events (None: every
    event here is stamped without one) by parcel."""
    assert all(station is None for _, station in found)
    return {tracking_no: seqs for (tracking_no, _), seqs in found.items()}


def still_named_here(
    seqs: list[int], held: SeqTracker, look_up: LookUp, nearest: Nearest
) -> dict[str, set[int]]:
    """``still_named_at`` of one station's events, by parcel."""
    return by_parcel(still_named_at(seqs, held, look_up, nearest))


class Device:
    """What the server holds of one PDA: stored events by seq, and the seqs that arrived
    (stored or rejected). Counts the look-ups a judgement makes."""

    def __init__(self) -> None:
        self.stored: dict[int, Stamp] = {}
        self.held = SeqTracker()
        self.look_ups = 0
        self.searches = 0
        # The flags the pushes raised, as the engine keeps them: {parcel: seqs}.
        self.flagged: dict[str, set[int]] = {}

    def look_up(self, seqs: list[int]) -> dict[int, Stamp]:
        self.look_ups += 1
        return {s: self.stored[s] for s in seqs if s in self.stored}

    def nearest(self, low: int, high: int, downward: bool) -> tuple[int, Stamp] | None:
        self.searches += 1
        seqs = [s for s in self.stored if low <= s <= high]
        if not seqs:
            return None
        seq = max(seqs) if downward else min(seqs)
        return seq, self.stored[seq]

    def push(
        self, events: dict[int, int], rejected: set[int], parcels: dict[int, str] | None = None
    ) -> dict[str, set[int]]:
        """Store ``{seq: minutes}`` (parcel ``P<seq>``, or as ``parcels`` names it),
        reject ``rejected``; judge, and keep the flags (``flagged``) as the engine does:
        the pairs the push completes raised, the seqs it withdraws taken out."""
        new = {}
        for seq, minutes in events.items():
            if seq in self.stored:
                rejected = rejected | {seq}  # a re-used seq: answered with a rejection
                continue
            tracking_no = (parcels or {}).get(seq, f"P{seq}")
            new[seq] = self.stored[seq] = Stamp(T0 + dt.timedelta(minutes=minutes), tracking_no)
        before = SeqTracker(self.held.max_seq, [list(r) for r in self.held.missing])
        self.held.add_all([*new, *rejected])
        judged = judge(new, rejected, self.held, self.look_up, self.nearest, held_before=before)
        # As ``sync.ingest`` applies it, every event here pushed at one station (None):
        # raised by parcel and station, a split pair's seqs withdrawn but those a pair
        # of the flag's station still names.
        for (tracking_no, _), seqs in judged.inverted_at.items():
            self.flagged.setdefault(tracking_no, set()).update(seqs)
        for tracking_no, seqs in judged.split.items():
            gone = seqs - judged.standing_at.get((tracking_no, None), set())
            if not gone:
                continue
            self.flagged[tracking_no] -= gone
            if not self.flagged[tracking_no]:
                del self.flagged[tracking_no]
        return by_parcel(judged.inverted_at)

    def write_off(self, seqs: set[int]) -> dict[str, set[int]]:
        """Write ``seqs`` off as lost (none of them arrived): held from now on, holding
        no event; the pairs across them flagged, as ``sync.lost_seqs`` does."""
        self.held.add_all(seqs)
        found = by_parcel(
            across_written_off_at(merged([s, s] for s in seqs), self.held, self.nearest)
        )
        for tracking_no, named in found.items():
            self.flagged.setdefault(tracking_no, set()).update(named)
        return found


def test_a_rejected_seq_between_two_events_is_skipped() -> None:
    device = Device()
    assert device.push({1: 10, 2: 60}, set()) == {}
    assert device.push({4: 50}, {3}) == {"P4": {2, 4}}


def test_a_rejected_seq_that_is_stored_after_all_is_no_gap() -> None:
    """A re-used id or seq is answered with a rejection at a seq that holds an event:
    the events around it are not neighbours."""
    device = Device()
    assert device.push({1: 60, 2: 50, 3: 55}, set()) == {"P2": {1, 2}}
    assert device.push({}, {2}) == {}  # not {"P3": {1, 3}}


def test_a_long_run_of_rejected_seqs_costs_one_look_up_and_one_search_per_side() -> None:
    device = Device()
    device.push({1: 60}, set())
    for seq in range(2, 2_002):
        device.push({}, {seq})
    device.look_ups = device.searches = 0
    assert device.push({2_002: 50}, set()) == {"P2002": {1, 2_002}}
    assert (device.look_ups, device.searches) == (1, 1)
    device.look_ups = device.searches = 0
    assert device.push({}, set(range(2_003, 7_003))) == {}
    assert (device.look_ups, device.searches) == (1, 0)


def test_runs_between_rejected_seqs_cost_no_search_when_the_look_up_shows_them() -> None:
    """Every odd seq rejected first, then every even one stored in one push: each even
    event's neighbours are the even ones around it, known from the push itself."""
    device = Device()
    device.push({}, set(range(1, 2_001, 2)))
    device.look_ups = device.searches = 0
    times = {seq: (10 if seq == 1_000 else seq) for seq in range(2, 2_001, 2)}
    assert device.push(times, set()) == {"P1000": {998, 1_000}}
    assert (device.look_ups, device.searches) == (1, 0)


@st.composite
def streams(draw: st.DrawFn) -> tuple[dict[int, int], set[int], list[list[int]]]:
    """A PDA's seqs 1..n, each stored (with a time) or rejected, cut into pushes sent
    in some order."""
    n = draw(st.integers(1, 12))
    rejected = set(draw(st.sets(st.integers(1, n))))
    times = {s: draw(st.integers(0, 30)) for s in range(1, n + 1) if s not in rejected}
    order = draw(st.permutations(list(range(1, n + 1))))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=n)) if n > 1 else [])
    pushes, start = [], 0
    for cut in [*cuts, n]:
        pushes.append(order[start:cut])
        start = cut
    return times, rejected, pushes


@given(streams())
def test_any_split_and_order_flags_the_pairs_of_the_whole_stream(
    stream: tuple[dict[int, int], set[int], list[list[int]]],
) -> None:
    """Rule 3 for rule 6: the pairs flagged over all pushes are those of the stored
    events taken in seq order, rejected seqs skipped, whatever the pushes."""
    times, rejected, pushes = stream
    device = Device()
    flagged: dict[str, set[int]] = {}
    for push in pushes:
        found = device.push(
            {s: times[s] for s in push if s in times}, {s for s in push if s in rejected}
        )
        for tracking_no, seqs in found.items():
            flagged.setdefault(tracking_no, set()).update(seqs)
    ordered = sorted(times)
    expected: dict[str, set[int]] = {}
    for before, after in zip(ordered, ordered[1:], strict=False):
        if times[after] < times[before]:
            expected.setdefault(f"P{after}", set()).update((before, after))
    assert flagged == expected


@st.composite
def corrected_streams(
    draw: st.DrawFn,
) -> tuple[dict[int, int], dict[int, str], set[int], list[list[tuple[int, bool]]]]:
    """A PDA's seqs 1..n on two parcels, some rejected for good, some rejected at first
    and sent again corrected (stored) in a later push or the same one, all cut into
    pushes sent in some order: ``(times, parcels, rejected for good, pushes)``, each
    push's seqs with whether they are sent as the rejected version."""
    n = draw(st.integers(1, 12))
    for_good = set(draw(st.sets(st.integers(1, n))))
    corrected = set(draw(st.sets(st.integers(1, n)))) - for_good
    times = {s: draw(st.integers(0, 30)) for s in range(1, n + 1) if s not in for_good}
    parcels = {s: draw(st.sampled_from(["A", "B"])) for s in times}
    sends = [(s, s in for_good) for s in range(1, n + 1)] + [(s, True) for s in corrected]
    order = draw(st.permutations(sends))
    for seq in corrected:  # the rejected version goes first
        first, second = order.index((seq, True)), order.index((seq, False))
        if second < first:
            order[first], order[second] = order[second], order[first]
    cuts = draw(st.sets(st.integers(1, len(order) - 1))) if len(order) > 1 else set()
    pushes, start = [], 0
    for cut in [*sorted(cuts), len(order)]:
        pushes.append(order[start:cut])
        start = cut
    return times, parcels, for_good, pushes


@given(corrected_streams())
def test_rejected_seqs_sent_again_corrected_leave_the_flags_of_the_whole_stream(
    stream: tuple[dict[int, int], dict[int, str], set[int], list[list[tuple[int, bool]]]],
) -> None:
    """Rule 3 for rule 6 when a rejected seq is sent again corrected: the pair judged
    across it while it was rejected is judged again once it is stored, so the flags
    kept over all pushes (raised, and withdrawn) are those of the stored events taken
    in seq order, whatever the pushes."""
    times, parcels, for_good, pushes = stream
    device = Device()
    for push in pushes:
        device.push(
            {s: times[s] for s, rejected in push if not rejected},
            {s for s, rejected in push if rejected},
            parcels,
        )
    ordered = sorted(times)
    expected: dict[str, set[int]] = {}
    for before, after in zip(ordered, ordered[1:], strict=False):
        if times[after] < times[before]:
            expected.setdefault(parcels[after], set()).update((before, after))
    assert device.flagged == expected


def test_a_later_seq_dated_within_the_tolerance_before_the_one_before_it_is_no_pair() -> None:
    """A clock stepped back by NTP: seq 2 two seconds before seq 1 is no inversion with a
    tolerance of 2 s; three seconds before is."""
    held = SeqTracker()
    held.add_all([1, 2, 3])
    new = {
        1: Stamp(T0, "P1"),
        2: Stamp(T0 - dt.timedelta(seconds=2), "P2"),
        3: Stamp(T0 - dt.timedelta(seconds=5), "P3"),
    }
    tolerance = dt.timedelta(seconds=2)
    found = judge(new, set(), held, lambda seqs: {}, lambda *_: None, tolerance)
    assert by_parcel(found.inverted_at) == {"P3": {2, 3}}
    assert by_parcel(judge(new, set(), held, lambda seqs: {}, lambda *_: None).inverted_at) == {
        "P2": {1, 2},
        "P3": {2, 3},
    }


@st.composite
def written_off_streams(
    draw: st.DrawFn,
) -> tuple[dict[int, int], set[int], set[int], list[list[int]], int, list[int]]:
    """A PDA's seqs 1..n, some rejected, some lost and written off between two pushes,
    of which some arrive after all (a push after the write-off); the others cut into
    pushes sent in some order: ``(times, rejected, lost, pushes, write-off before push,
    the lost ones arriving after it)``."""
    n = draw(st.integers(2, 12))
    lost = set(draw(st.sets(st.integers(1, n), min_size=1, max_size=n - 1)))
    rejected = set(draw(st.sets(st.integers(1, n)))) - lost
    times = {s: draw(st.integers(0, 30)) for s in range(1, n + 1) if s not in rejected}
    order = draw(st.permutations(sorted(set(range(1, n + 1)) - lost)))
    cuts = draw(st.sets(st.integers(1, len(order) - 1))) if len(order) > 1 else set()
    pushes, start = [], 0
    for cut in [*sorted(cuts), len(order)]:
        pushes.append(order[start:cut])
        start = cut
    written_off_at = draw(st.integers(0, len(pushes)))
    arriving = sorted(draw(st.sets(st.sampled_from(sorted(lost)))))
    return times, rejected, lost, pushes, written_off_at, arriving


@given(written_off_streams())
def test_seqs_written_off_before_between_or_after_the_pushes_leave_the_flags_of_the_stream(
    stream: tuple[dict[int, int], set[int], set[int], list[list[int]], int, list[int]],
) -> None:
    """Rule 3 for rule 6 with a manager's write-off: seqs written off hold no event, so
    the events around them are neighbours; the flags kept over the pushes and the
    write-off (which judges the pairs it completes) are those of the stored events in
    seq order, wherever the write-off came, and whichever written-off seqs came after
    all."""
    times, rejected, lost, pushes, written_off_at, arriving = stream
    device = Device()
    for index, push in enumerate([*pushes, []]):
        if index == written_off_at:
            device.write_off(lost)
        device.push({s: times[s] for s in push if s not in rejected}, set(push) & rejected)
    device.push({s: times[s] for s in arriving}, set())
    stored = sorted(s for s in times if s not in lost or s in arriving)
    expected: dict[str, set[int]] = {}
    for before, after in zip(stored, stored[1:], strict=False):
        if times[after] < times[before]:
            expected.setdefault(f"P{after}", set()).update((before, after))
    assert device.flagged == expected


def test_a_write_off_judges_each_range_with_two_searches_past_rejected_seqs() -> None:
    """Seqs 3 and 6 to 7 written off, seq 2 and 8 rejected: the pairs across them are
    1-4 (past 2 and 3) and 5-9 (past 6 to 8); a range next to a seq still on the PDA (11)
    has no pair."""
    device = Device()
    device.push({1: 30, 4: 20, 5: 40, 9: 10, 10: 50, 12: 60}, {2, 8})
    device.searches = 0
    assert device.write_off({3, 6, 7}) == {"P4": {1, 4}, "P9": {5, 9}}
    assert device.searches == 4
    assert device.write_off({13}) == {}  # above the highest seq: nothing after it


def test_a_flags_seqs_still_named_are_those_of_inverted_pairs_of_neighbours_now() -> None:
    """``courier-api rejudge``: a flag named 1 and 3 (judged while 2 was rejected); 2 is
    stored since, dated between them, another parcel's: 1-2 is inverted (named for 2's
    parcel), 2-3 is not; 3-4 is inverted for 4's parcel. Nothing names 1 or 3 for
    parcel P3 any more; 4 names 3 and 4 for P4. A seq with no event names nothing."""
    device = Device()
    device.push({1: 30, 2: 20, 3: 25, 4: 10}, set(), {1: "P1", 2: "P2", 3: "P3", 4: "P4"})
    assert still_named_here([1, 3], device.held, device.look_up, device.nearest) == {
        "P2": {1, 2},
        "P4": {3, 4},
    }
    assert still_named_here([7], device.held, device.look_up, device.nearest) == {}


def test_a_flags_seqs_beside_stored_ones_cost_one_look_up_and_no_search() -> None:
    """``courier-api rejudge`` judges a batch of flags' seqs at once: the seqs beside them,
    stored, are read in the same look-up, so it searched twice a seq for nothing. A
    search is left only past a seq holding no event (rejected, here 6)."""
    device = Device()
    times = {seq: (seq * 10 if seq % 2 else seq * 10 - 15) for seq in range(1, 11) if seq != 6}
    device.push(times, {6})
    device.look_ups = device.searches = 0
    assert still_named_here([1, 2, 3, 4], device.held, device.look_up, device.nearest) == {
        "P2": {1, 2},
        "P4": {3, 4},
    }
    assert (device.look_ups, device.searches) == (1, 0)
    device.look_ups = device.searches = 0
    assert still_named_here([5, 7], device.held, device.look_up, device.nearest) == {"P8": {7, 8}}
    assert (device.look_ups, device.searches) == (1, 2)


@given(
    streams(),
    st.sets(st.integers(1, 13)),
    st.sets(st.integers(1, 12), max_size=3),
    st.sets(st.integers(1, 12), max_size=2),
)
def test_the_seqs_still_named_are_those_of_the_inverted_pairs_of_neighbours_stored(
    stream: tuple[dict[int, int], set[int], list[list[int]]],
    asked: set[int],
    unsent: set[int],
    lost: set[int],
) -> None:
    """Against the rule spelt out: each stored seq asked for and its nearest stored
    neighbour on either side, within the run of seqs that all arrived, named under the
    later one's parcel when the later is dated before the earlier. Some seqs are still
    on the PDA (``unsent``), some of those written off (``lost``): held, no event, as
    a rejected one; a seq beside one asked for is then no neighbour, or not the one."""
    times, rejected, _ = stream
    device = Device()
    device.push({seq: at for seq, at in times.items() if seq not in unsent}, rejected - unsent)
    device.write_off({seq for seq in unsent & lost if seq < device.held.max_seq})
    expected: dict[str, set[int]] = {}
    for seq in sorted(asked & set(device.stored)):
        low, high = device.held.held_run(seq)
        below = [s for s in device.stored if low <= s < seq]
        above = [s for s in device.stored if seq < s <= high]
        for earlier, later in ((max(below, default=None), seq), (seq, min(above, default=None))):
            if earlier is None or later is None:
                continue
            first, second = device.stored[earlier], device.stored[later]
            if second.occurred_at_device < first.occurred_at_device:
                expected.setdefault(second.tracking_no, set()).update((earlier, later))
    assert still_named_here(asked, device.held, device.look_up, device.nearest) == expected
