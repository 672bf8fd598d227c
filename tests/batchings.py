"""How a PDA's late events may reach the server: for property tests of rule 3."""

from __future__ import annotations

from hypothesis import strategies as st


def draw_batchings(data: st.DataObject, n: int) -> list[list[int]]:
    """Events ``0 .. n-1`` split into up to four pushes, each event in one of them, the
    pushes in any order and the events within each shuffled; then up to three of them
    sent again in a push of their own. Compare with ``[list(range(n))]``: one push."""
    pushes = data.draw(st.integers(min_value=1, max_value=4), label="pushes")
    push_of = data.draw(
        st.lists(st.integers(min_value=0, max_value=pushes - 1), min_size=n, max_size=n),
        label="push of each event",
    )
    order = data.draw(st.permutations(range(n)), label="order")
    batches = [[i for i in order if push_of[i] == k] for k in range(pushes)]
    batches = [batch for batch in batches if batch]
    again = data.draw(st.lists(st.integers(min_value=0, max_value=n - 1), max_size=3))
    if again:
        batches.append(again)
    return batches
