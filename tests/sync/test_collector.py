"""``sync.collector``: the cyclic collector paused while any holder needs it, and only then."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from sync import collector
from sync.collector import collector_paused


@pytest.fixture(autouse=True)
def collector_enabled() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if was:
        gc.enable()
    else:
        gc.disable()


def test_paused_inside_and_resumed_after_even_on_an_error() -> None:
    with pytest.raises(RuntimeError), collector_paused():
        assert not gc.isenabled()
        raise RuntimeError("the board failed")
    assert gc.isenabled()


def test_a_collector_disabled_beforehand_stays_disabled() -> None:
    gc.disable()
    with collector_paused():
        pass
    assert not gc.isenabled()


def test_resumed_only_when_the_last_of_overlapping_threads_is_done() -> None:
    first_in = threading.Event()
    first_may_leave = threading.Event()
    seen: list[bool] = []

    def first() -> None:
        with collector_paused():
            first_in.set()
            first_may_leave.wait(5)
        seen.append(gc.isenabled())  # the other thread still holds its pause

    thread = threading.Thread(target=first)
    with collector_paused():
        thread.start()
        assert first_in.wait(5)
        first_may_leave.set()
        thread.join(5)
        assert not thread.is_alive()
        assert not gc.isenabled()
    assert seen == [False]
    assert gc.isenabled()


def test_overlapping_holders_cannot_keep_it_from_collecting_for_good(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    collections: list[float] = []
    monkeypatch.setattr(collector, "clock", lambda: now[0])
    monkeypatch.setattr(collector.gc, "collect", lambda: collections.append(now[0]))
    with collector_paused():  # a long report, say, while boards come and go
        for _ in range(3):
            with collector_paused():
                now[0] += collector.LONGEST_PAUSE_SECONDS / 2
        assert not gc.isenabled()
    # The second board left 10 s into the pause: one collection, then the clock
    # started again, so the third (15 s in) did not collect.
    assert collections == [1000.0 + collector.LONGEST_PAUSE_SECONDS]
    assert gc.isenabled()
