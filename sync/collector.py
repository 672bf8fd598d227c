"""Pausing Python's cyclic garbage collector while a large read is turned into objects.

The station board builds a few objects per event of the day: at 19:00, with 40 shifts
closing, hundreds of thousands of tuples and lists that hold no reference cycles,
so the collector can free none of them. It still counts them as they are made, and
each time their number grows by a quarter it walks all of them again (a full
collection, which also stops every other thread of the worker): a third of the
board's time, measured (``docs/BENCHMARKS.md``), and pauses for the pushes served
next to it.

The collector is one per process and ``gc.disable`` is global, so the pause is
counted: it ends when the last of the threads that asked for it is done, and only
re-enables a collector that was enabled when the first one asked. Overlapping
readers could keep it paused for good, so a pause never goes longer than
``LONGEST_PAUSE_SECONDS`` without a collection: the first holder to leave after
that collects once, and the clock starts again.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

LONGEST_PAUSE_SECONDS = 10.0

_lock = threading.Lock()
_holders = 0
_resume = False  # whether the collector was enabled when the first holder paused it
_last_collected = 0.0  # when this pause began, or when it last collected
clock: Callable[[], float] = time.monotonic  # tests replace it


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic collection while this block (and any other thread's) runs, within
    ``LONGEST_PAUSE_SECONDS``."""
    global _holders, _resume, _last_collected
    with _lock:
        if _holders == 0:
            _resume = gc.isenabled()
            _last_collected = clock()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                if _resume:
                    gc.enable()
            elif _resume and clock() - _last_collected >= LONGEST_PAUSE_SECONDS:
                gc.collect()
                _last_collected = clock()


def _forget_holders() -> None:
    """A forked child starts with no holder (its parent's threads are not in it)."""
    global _holders, _lock
    _lock = threading.Lock()
    if _holders and _resume:
        gc.enable()
    _holders = 0


os.register_at_fork(after_in_child=_forget_holders)
