"""One writer at a time on a SQLite file, handed on the moment the last one commits.

SQLite lets one transaction write at a time; the others wait in its busy handler,
which sleeps between tries, longer and longer (1, 2, 5, 10 ... up to 100 ms). Under
a steady stream of short pushes the lock is free most of the time a waiter sleeps:
the processor idles, and a waiter that has slept long loses to one that just
arrived, so a few requests wait seconds (they end as 503 after the busy timeout).

The turnstile queues the writers before SQLite sees them: within a process on a
lock (a waiter wakes when it is released), across processes on an exclusive
``flock`` of a file next to the database (one waiter per process tries it, every
millisecond). A transaction takes its turn before ``BEGIN IMMEDIATE`` and gives it
back when the connection commits or rolls back (``TurnstileConnection``), so
SQLite's own lock is always free when asked for. Waiting longer than the busy
timeout raises the error SQLite would have raised ("database is locked": a 503).

Waiting processes take turns too. Within a process the turn passes from thread to
thread in microseconds, quicker than another process's waiter, asleep between its
tries, can take it: a worker with a queue of writers kept the turn for seconds
while the other's waited (``bench/load.py``: 41 turns of 200-event pushes against
98, waits up to 2 s). So a waiter tells the others it waits (a shared ``flock`` of a
second file, ``.waiting``), and a writer giving the turn back while another process
waits makes the next writer of its own process let that one go first.

Readers take no turn (``models.engine.reads_only``), and a reader that began before
a checkpoint keeps SQLite from starting its WAL file over: readers that overlap
without end (PDAs pulling while others push) would let it grow without bound
(SQLite's "checkpoint starvation": 57 MB in 30 s of ``bench/load.py``). The writer
whose commit finds it beyond ``WAL_RESTART_BYTES`` truncates it before giving its
turn back, once the readers of its old frames are done (``PRAGMA wal_checkpoint``).

A commit is on disk before ``commit()`` returns (a push's receipt lets the PDA delete
its events), but its sync is made after the turn is given back: SQLite commits with
``synchronous = NORMAL`` (the WAL written, not synced), and the writer then syncs the
WAL file, which makes every transaction committed before that sync began durable
(https://sqlite.org/forum/forumpost/d1a6bc7c4cd2baca). The next writer writes while
this one waits for the disk, and writers of one process that committed during a sync
share the next one (group commit): ``FULL`` would hold the turn through each sync.
A file SQLite could not put in WAL mode has no WAL file to sync: its connections
commit with ``EXTRA`` (``TurnstileConnection.syncs_wal``, set by ``models.engine``).
A WAL file deleted under the service, or replaced (deleted, then made anew by a process
that opened the database since), is copied into the database by the next commit, and
the process then refuses writes until it restarts
(``TurnstileConnection._save_a_deleted_wal``).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy.exc import OperationalError

POLL_SECONDS = 0.001  # how often the one waiter of a process tries the file lock
# How long a process may keep passing the turn among its own writers while another
# process waits: passing it on within a process is cheaper (0.4 ms on average here
# against 0.8 to another process), so short transactions go a few at a time.
SHARE_AFTER_SECONDS = 0.010
# How long a process that had the turn lets another process's waiter take it first:
# a few of its tries.
COURTESY_SECONDS = 0.003
# SQLite checkpoints every 1,000 pages (4 MB) on its own: a WAL file eight times that
# size is one that readers kept from starting over.
WAL_RESTART_BYTES = 32 * 1024 * 1024

log = logging.getLogger(__name__)


class Turnstile:
    """The turn to write on one SQLite file, for the threads and processes using it."""

    def __init__(self, database: Path, timeout: float) -> None:
        self.path = database.with_name(database.name + ".writer")
        self.waiting_path = database.with_name(database.name + ".waiting")
        self.wal = database.with_name(database.name + "-wal")
        self.timeout = timeout
        self._pid = -1  # the process _lock and _fd were made for
        self._lock = threading.Lock()
        self._fd = -1
        self._waiting_fd = -1
        self._others_waited = False  # when the turn was last given back (under _lock)
        self._others_wait_since: float | None = None  # as first seen by this process
        self._setup = threading.Lock()
        self._durable: WalSync  # made per process, by the first writer (_this_process)
        # Why this process's writers are refused their turn until a restart (its WAL
        # file deleted under it: ``TurnstileConnection._save_a_deleted_wal``).
        self._refused: OSError | None = None
        _TURNSTILES.add(self)

    def _this_process(self) -> None:
        """A forked worker gets a lock and a file description of its own: ``flock``
        locks belong to the open file description, which a fork shares."""
        if self._pid == os.getpid():
            return
        with self._setup:  # the first writers of a process may arrive together
            if self._pid != os.getpid():
                self._lock = threading.Lock()
                self._durable = WalSync(self.wal)
                self._fd = self._open(self.path)
                self._waiting_fd = self._open(self.waiting_path)
                self._others_waited = False
                self._others_wait_since = None
                self._refused = None
                for fd in (self._fd, self._waiting_fd):  # its engine is gone: so are they
                    weakref.finalize(self, os.close, fd)
                self._pid = os.getpid()

    @staticmethod
    def _open(path: Path) -> int:
        """A lock file, read-only (``flock`` needs no more): a file created by another
        user (a maintenance command run as root) must not lock the service out."""
        try:
            return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise OperationalError("open the writers' lock file", None, error) from None

    def enter(self) -> None:
        self._this_process()
        if self._refused is not None:
            raise OperationalError("BEGIN IMMEDIATE", None, self._refused) from None
        deadline = time.monotonic() + self.timeout
        if not self._lock.acquire(timeout=self.timeout):
            raise _locked()
        try:
            if self._others_waited:
                self._others_waited = False
                self._let_others_go_first()
            if not self._try_flock(self._fd, fcntl.LOCK_EX):
                self._wait_for_turn(deadline)
        except BaseException:
            self._lock.release()
            raise

    def leave(self) -> None:
        """Give the turn back, whatever happens: a turn kept would stop every writer."""
        try:
            self._others_waited = self._time_to_share()
        finally:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                self._lock.release()

    def _time_to_share(self) -> bool:
        """Another process has waited ``SHARE_AFTER_SECONDS`` (seen at this process's
        turns' ends): the next writer of this process lets it go first."""
        if not self._another_process_waits():
            self._others_wait_since = None
            return False
        now = time.monotonic()
        if self._others_wait_since is None:
            self._others_wait_since = now
        if now - self._others_wait_since < SHARE_AFTER_SECONDS:
            return False
        self._others_wait_since = None
        return True

    def _wait_for_turn(self, deadline: float) -> None:
        """This process's one waiter: tries every ``POLL_SECONDS``, the others told."""
        fcntl.flock(self._waiting_fd, fcntl.LOCK_SH)
        try:
            while not self._try_flock(self._fd, fcntl.LOCK_EX):
                if time.monotonic() >= deadline:
                    raise _locked()
                time.sleep(POLL_SECONDS)
        finally:
            fcntl.flock(self._waiting_fd, fcntl.LOCK_UN)

    def _another_process_waits(self) -> bool:
        """Asked with ``_lock`` held: this process then has no waiter of its own on
        ``.waiting`` (its other writers wait for ``_lock``), so a shared lock there is
        another process's. A courtesy only: a probe that fails (ENOLCK) says no,
        which neither keeps the turn nor fails a write."""
        try:
            if self._try_flock(self._waiting_fd, fcntl.LOCK_EX):
                fcntl.flock(self._waiting_fd, fcntl.LOCK_UN)
                return False
        except OSError as error:
            log.warning("could not tell whether another process waits: %s", error)
            return False
        return True

    def _let_others_go_first(self) -> None:
        """Wait until the other processes' waiters took the turn, or a short while."""
        until = time.monotonic() + COURTESY_SECONDS
        while self._another_process_waits() and time.monotonic() < until:
            time.sleep(POLL_SECONDS / 4)

    @staticmethod
    def _try_flock(fd: int, operation: int) -> bool:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def committed(self) -> int:
        """Count a commit, the turn still held: its ticket for ``make_durable``."""
        return self._durable.committed()

    def make_durable(self, ticket: int) -> None:
        self._durable.make_durable(ticket)

    def wal_file(self) -> WalFound | None:
        """The file the WAL's path names now; None when there is none. Asked after a
        commit, the turn held: the committing connection has the file open, and SQLite
        deletes it only once the last connection to the database closes, so it is gone
        only if something else deleted it (an operator cleaning up, a backup script
        moving ``*-wal`` away), and another file than the connection's only if a
        process opened the database after that (``TurnstileConnection.wal_identity``).
        A file that cannot be asked about is taken as the connection's, of size 0."""
        try:
            found = os.stat(self.wal)
        except FileNotFoundError:
            return None
        except OSError:
            return WalFound(None, 0)
        return WalFound((found.st_dev, found.st_ino), found.st_size)

    def refusal(self) -> OSError | None:
        """Why this process's writes fail until it restarts (its WAL file deleted, a
        failed sync of it), or None: what ``/readyz`` tells the load balancer."""
        if self._pid != os.getpid():
            return None  # no writer of this process yet
        return self._refused or self._durable.failure

    def refuse_writes(self, error: OSError) -> None:
        """No writer of this process gets the turn from now on (``enter`` raises)."""
        self._refused = error

    def wal_lost(self, covered: int, error: OSError) -> None:
        """The WAL file was deleted, and the commits up to ``covered`` were copied into
        the database file and synced: they are on disk; later ones are refused."""
        self._durable.covered_elsewhere(covered)
        self.refuse_writes(error)


class WalFound(NamedTuple):
    """The file a WAL's path names: its device and inode (None: unknown), its size."""

    identity: tuple[int, int] | None
    size: int


def wal_identity(wal: Path) -> tuple[int, int] | None:
    """The device and inode of the file the WAL's path names now; None: no file."""
    try:
        found = os.stat(wal)
    except OSError:
        return None
    return (found.st_dev, found.st_ino)


class WalSync:
    """Syncs of one WAL file shared by the commits of one process (group commit).

    Commits are numbered in the order they end (under the writers' turn); a sync
    covers every commit numbered before it began, since their frames are then in
    the file. A commit waits for the first sync that covers it, and a sync that
    fails stays failed: after a failed ``fsync`` Linux may drop the pages it could
    not write and let the next one succeed (PostgreSQL's "fsyncgate"), so no later
    commit may be acknowledged either until the service restarts.

    Only in this process, though: another worker process keeps its own ``WalSync``.
    It syncs through a descriptor it keeps open (``_WalFile``), and Linux reports a
    failed write-back to every description open when it happened, so that worker is
    told too; an error from before its first sync it learns only if nobody saw it
    yet (SQLite's own checkpoint may have), and so might acknowledge one commit.
    """

    def __init__(self, wal: Path) -> None:
        self.wal = wal
        self._committed = 0  # commits counted so far (under the turn)
        self._synced = 0  # commits covered by a finished sync
        self._syncing = False  # a writer is syncing for the others
        self._changed = threading.Condition()
        self._failure: OSError | None = None
        self._file = _WalFile(wal)  # open from the first sync on (one syncer at a time)
        weakref.finalize(self, self._file.close)

    @property
    def failure(self) -> OSError | None:
        """The failed sync every later commit of this process fails for, if any."""
        return self._failure

    def committed(self) -> int:
        self._committed += 1
        return self._committed

    def make_durable(self, ticket: int) -> None:
        """Return once commit ``ticket`` is on disk. One writer syncs at a time; the
        others wait, and those it covered return as it ends, without a sync."""
        with self._changed:
            while self._failure is None and self._synced < ticket and self._syncing:
                self._changed.wait()
            if self._failure is None and self._synced < ticket:
                self._syncing = True
                covered = self._committed
            else:
                covered = 0
        if covered:
            self._sync(covered)
        if self._failure is not None and self._synced < ticket:
            raise OperationalError("sync the WAL file", None, self._failure) from None

    def covered_elsewhere(self, covered: int) -> None:
        """The commits up to ``covered`` are on disk by other means (copied into the
        database file by a checkpoint, and synced): their writers need no sync."""
        with self._changed:
            self._synced = max(self._synced, covered)
            self._changed.notify_all()

    def _sync(self, covered: int) -> None:
        """Whatever ends it, the writers waiting for it are told (one of them syncs
        again if it ended without an answer, an exception other than ``OSError``)."""
        failure = None
        synced = False
        try:
            self._file.sync()
            synced = True
        except OSError as error:
            log.critical("could not sync the WAL file %s: %s", self.wal, error)
            failure = error
        finally:
            with self._changed:
                self._syncing = False
                if synced:  # never back: a checkpoint may have covered more meanwhile
                    self._synced = max(self._synced, covered)
                elif failure is not None:
                    self._failure = failure
                self._changed.notify_all()


class _WalFile:
    """The WAL file, synced through a descriptor kept open: the kernel reports a failed
    write-back to the descriptions open at the time, not always to later ones."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def sync(self) -> None:
        """``fsync`` it, reopened first if SQLite made the WAL anew (it does once every
        connection has closed)."""
        if self._fd >= 0 and os.fstat(self._fd).st_ino != os.stat(self.path).st_ino:
            self.close()
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_TURNSTILES: weakref.WeakSet[Turnstile] = weakref.WeakSet()


def _forget_parent() -> None:
    """In a forked child: set-up locks of its own (the parent's may have been held by a
    thread that does not exist here); the rest is remade at first use."""
    for turnstile in list(_TURNSTILES):
        turnstile._setup = threading.Lock()


os.register_at_fork(after_in_child=_forget_parent)


class TurnstileConnection(sqlite3.Connection):
    """A sqlite3 connection that gives its turn back when its transaction ends."""

    turnstile: Turnstile | None = None
    holds_turn: bool = False
    # Whether the file is in WAL mode, its writers syncing the WAL after their turn
    # (``synchronous = NORMAL``); set on connecting (``models.engine``). Not: SQLite
    # syncs each commit itself (``EXTRA``), and there is no WAL file to sync.
    syncs_wal: bool = False
    # The WAL file this connection has open, by device and inode: the one its path named
    # once SQLite had opened it (set on connecting, or at the first commit of a file
    # that had no WAL yet). SQLite neither deletes nor makes that file anew while the
    # connection is open, so a commit finding another file there finds the WAL replaced
    # (deleted, then made anew by a process opening the database since).
    wal_identity: tuple[int, int] | None = None

    def take_turn(self) -> None:
        if self.turnstile is not None and not self.holds_turn:
            self.turnstile.enter()
            self.holds_turn = True

    def give_turn(self) -> None:
        if self.holds_turn:
            self.holds_turn = False
            assert self.turnstile is not None
            self.turnstile.leave()

    def commit(self) -> None:
        ticket = 0
        try:
            super().commit()
            if self.holds_turn and self.syncs_wal:
                assert self.turnstile is not None
                ticket = self.turnstile.committed()
                found = self.turnstile.wal_file()
                if found is None:
                    self._save_a_deleted_wal(ticket, replaced=False)
                elif self._wal_replaced(found):
                    self._save_a_deleted_wal(ticket, replaced=True)
                elif found.size > WAL_RESTART_BYTES:
                    self._truncate_a_large_wal()
        finally:
            self.give_turn()
        if ticket:
            assert self.turnstile is not None
            self.turnstile.make_durable(ticket)

    def _wal_replaced(self, found: WalFound) -> bool:
        """Whether the WAL's path names another file than the one this connection has
        open (the first commit of a connection made before the file existed learns it)."""
        if found.identity is None:
            return False
        if self.wal_identity is None:
            self.wal_identity = found.identity
            return False
        return found.identity != self.wal_identity

    def _save_a_deleted_wal(self, ticket: int, *, replaced: bool) -> None:
        """After a commit, the turn still held, the WAL file found deleted (or replaced:
        deleted, then made anew by a process that opened the database since, such as a
        second service started beside this one, a WAL this connection does not write
        to): its frames, every commit since the last checkpoint (acknowledged ones
        among them), live only in the deleted file the connections of the service hold
        open, and a SIGKILL or a power cut would lose them, and a connection opened anew
        would start a WAL of its own beside it. A checkpoint through this connection
        copies them into the database file, which it syncs (``synchronous = NORMAL``);
        the file is synced again here. The commits up to ``ticket`` are then on disk;
        no writer of this process gets the turn again until a restart (503
        ``database_unavailable``, nothing written). Should the checkpoint not finish,
        the commits stay unsynced: this commit and every later one fail, and only a
        clean stop of the service (SQLite checkpoints as its last connection closes)
        keeps them."""
        assert self.turnstile is not None
        wal = self.turnstile.wal
        what = "deleted" if not replaced else "replaced by another file"
        gone = FileNotFoundError(
            errno.ENOENT, f"the WAL file was {what} while the service had it open", str(wal)
        )
        try:
            busy, frames, copied = self.execute("PRAGMA wal_checkpoint(FULL)").fetchone()
            if busy or copied < frames:
                raise OSError(errno.EBUSY, f"checkpoint copied {copied} of {frames} frames")
            database = os.open(wal.with_name(wal.name[: -len("-wal")]), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(database)
            finally:
                os.close(database)
        except (sqlite3.Error, OSError) as error:
            log.critical(
                "the WAL file %s was %s while in use, and its commits could not be "
                "copied into the database (%s): writes are refused; stop the service "
                "cleanly (SIGTERM), never with SIGKILL, to keep them",
                wal,
                what,
                error,
            )
            self.turnstile.refuse_writes(gone)
            return
        log.critical(
            "the WAL file %s was %s while in use: its %d frames were copied into the "
            "database and synced; writes are refused until the service restarts: stop "
            "every process using the database (the service, its scheduler, any command) "
            "before starting one again, as one started while another still holds the "
            "deleted file writes to a new WAL file the others do not see",
            wal,
            what,
            frames,
        )
        self.turnstile.wal_lost(ticket, gone)

    def _truncate_a_large_wal(self) -> None:
        """After a commit, the turn still held, the WAL file beyond
        ``WAL_RESTART_BYTES``: never raises (the commit is done)."""
        assert self.turnstile is not None
        try:
            busy = self.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.Error as error:
            log.warning("could not truncate the WAL file %s: %s", self.turnstile.wal, error)
            return
        if busy:
            log.warning(
                "the WAL file %s stays beyond %d bytes: a reader outlasted the busy "
                "timeout (the next commit tries again)",
                self.turnstile.wal,
                WAL_RESTART_BYTES,
            )

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self.give_turn()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.give_turn()


def _locked() -> OperationalError:
    """What SQLite's busy handler raises after its timeout, as SQLAlchemy wraps it."""
    return OperationalError(
        "BEGIN IMMEDIATE", None, sqlite3.OperationalError("database is locked")
    )


def connect_args(existing: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**(existing or {}), "factory": TurnstileConnection}
