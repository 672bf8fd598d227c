"""SQLite's writers' turn, recorded in the server that ``bench/load.py --turn-stats``
starts: the script puts this directory first on the server's ``PYTHONPATH``, so that
Python loads this module in each of the server's processes before anything else.

With ``COURIER_TURN_STATS`` naming a directory, each process appends one line a turn
to ``turns.<pid>`` there when the turn is given back: its process id and, on the
machine's monotonic clock (``time.perf_counter``, the load script's too), when the
writer asked for the turn, when it got it and when it gave it back. One ``write(2)``
a turn, outside the turn; a failure to record is ignored (the commit it follows
stands). Without the variable this module does nothing.

The script's CLI commands (migrations, the station) run with the same path and
record their turns too, before the phases: the report leaves them out. Being first
on the path, this module hides any other ``sitecustomize`` (the project's virtualenv
has none).
"""

from __future__ import annotations

import os

_DIRECTORY = os.environ.get("COURIER_TURN_STATS")


def _install(directory: str) -> None:
    import threading
    import time

    from models import turnstile

    enter, leave = turnstile.Turnstile.enter, turnstile.Turnstile.leave
    asked = threading.local()
    files: dict[int, int] = {}  # pid: descriptor (a forked worker opens its own)

    def timed_enter(self: turnstile.Turnstile) -> None:
        started = time.perf_counter()
        enter(self)
        asked.times = (started, time.perf_counter())

    def timed_leave(self: turnstile.Turnstile) -> None:
        released = time.perf_counter()
        leave(self)
        started, taken = getattr(asked, "times", (released, released))
        try:
            os.write(_file(), f"{os.getpid()} {started:.6f} {taken:.6f} {released:.6f}\n".encode())
        except OSError:
            pass

    def _file() -> int:
        pid = os.getpid()
        if pid not in files:
            descriptor = os.open(
                os.path.join(directory, f"turns.{pid}"),
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                0o644,
            )
            if files.setdefault(pid, descriptor) != descriptor:  # another thread was first
                os.close(descriptor)
        return files[pid]

    turnstile.Turnstile.enter = timed_enter  # type: ignore[method-assign]
    turnstile.Turnstile.leave = timed_leave  # type: ignore[method-assign]


if _DIRECTORY:
    _install(_DIRECTORY)
