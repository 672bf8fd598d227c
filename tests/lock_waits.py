"""Two transactions at once on PostgreSQL: one holding its locks uncommitted while the
other runs into them, for tests of what the second does once the first commits.

On PostgreSQL (READ COMMITTED) a statement that waits for a row lock gets that row as
committed now, but reads every other row as it was when the statement began: these
tests show each writer sees what the one it waited for committed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

WAITING = text(
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
)


def waiting(watcher: Session) -> bool:
    """Whether a session of the test's database waits for a lock now. In a transaction
    of its own: PostgreSQL shows one transaction the activity as it first read it."""
    try:
        return bool(watcher.scalar(WAITING))
    finally:
        watcher.rollback()


def while_held(
    sessions: sessionmaker[Session],
    first: Callable[[Session], None],
    second: Callable[[Session], None],
    *,
    must_wait: bool = True,
) -> None:
    """``first`` run and left uncommitted while ``second`` runs in a thread of its own
    until it waits for a lock (PostgreSQL says so); then ``first`` commits, and
    ``second`` after it. ``must_wait`` False: ``second`` may end without waiting (which
    of two writers takes a lock first is what the test is about), and ``first`` commits
    then. What ``second`` raised is raised here."""
    failures: list[BaseException] = []

    def run_second() -> None:
        try:
            with sessions() as other:
                second(other)
                other.commit()
        except BaseException as error:  # seen by the test, not lost in the thread
            failures.append(error)

    with sessions() as holder, sessions() as watcher:
        first(holder)
        thread = threading.Thread(target=run_second)
        thread.start()
        deadline = time.monotonic() + 30
        while thread.is_alive() and not waiting(watcher):
            assert time.monotonic() < deadline, "the second neither waited nor ended"
            time.sleep(0.02)
        if must_wait:
            assert thread.is_alive(), failures or "the second did not wait for the first"
        holder.commit()
    thread.join(timeout=30)
    assert not thread.is_alive()
    if failures:
        raise failures[0]
