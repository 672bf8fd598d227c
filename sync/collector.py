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
re-enables a collector that was enabled when the first one asked.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_holders = 0
_resume = False  # whether the collector was enabled when the first holder paused it


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic collection while this block (and any other thread's) runs."""
    global _holders, _resume
    with _lock:
        if _holders == 0:
            _resume = gc.isenabled()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _resume:
                gc.enable()
