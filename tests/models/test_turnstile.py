"""SQLite writers take turns before SQLite sees them, across threads and processes."""

from __future__ import annotations

import fcntl
import gc
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from models import turnstile as turnstile_module
from models.engine import make_engine, reads_only, writes_refused
from models.turnstile import Turnstile, TurnstileConnection


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "turns.db"
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE note (n INTEGER)"))
    engine.dispose()
    return path


def _engine(database: Path) -> Engine:
    return make_engine(f"sqlite:///{database}")


def test_file_databases_queue_their_writers_and_memory_ones_do_not(database: Path) -> None:
    engine = _engine(database)
    with engine.connect() as connection:
        raw = connection.connection.dbapi_connection
        assert isinstance(raw, TurnstileConnection) and raw.turnstile is not None
        assert not raw.holds_turn
        connection.execute(text("INSERT INTO note VALUES (1)"))
        assert raw.holds_turn
        connection.commit()
        assert not raw.holds_turn
        connection.execute(text("SELECT 1"))
        connection.rollback()
        assert not raw.holds_turn
    deferred = make_engine(f"sqlite:///{database}", sqlite_begin="DEFERRED")
    with deferred.connect() as connection:
        assert getattr(connection.connection.dbapi_connection, "turnstile", None) is None
    memory = make_engine("sqlite://")
    with memory.connect() as connection:
        assert getattr(connection.connection.dbapi_connection, "turnstile", None) is None


def test_a_second_writer_waits_for_the_first_to_commit_and_then_sees_its_row(
    database: Path,
) -> None:
    engine = _engine(database)
    order: list[str] = []
    second_done = threading.Event()

    def second_writer() -> None:
        with engine.begin() as connection:
            order.append("second began")
            count = connection.execute(text("SELECT count(*) FROM note")).scalar_one()
            connection.execute(text("INSERT INTO note VALUES (:n)"), {"n": count + 1})
        second_done.set()

    with engine.connect() as first:
        first.execute(text("INSERT INTO note VALUES (1)"))
        thread = threading.Thread(target=second_writer)
        thread.start()
        time.sleep(0.3)
        assert order == []  # still waiting for its turn
        order.append("first committed")
        first.commit()
    assert second_done.wait(5)
    thread.join()
    assert order == ["first committed", "second began"]
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT n FROM note ORDER BY n")).scalars().all()
    assert rows == [1, 2]


def test_a_rolled_back_or_closed_connection_gives_its_turn_back(database: Path) -> None:
    engine = _engine(database)
    turnstile = Turnstile(database, timeout=0.2)
    with engine.connect() as connection:
        connection.execute(text("INSERT INTO note VALUES (1)"))
        connection.rollback()
    turnstile.enter()  # free again
    turnstile.leave()
    raw = engine.raw_connection()
    raw.execute("BEGIN IMMEDIATE")  # a driver-level transaction takes no turn
    raw.close()
    connection = engine.connect()
    connection.execute(text("INSERT INTO note VALUES (2)"))
    connection.invalidate()  # the DBAPI connection is closed mid-transaction
    turnstile.enter()
    turnstile.leave()


def _hold_turn(
    turnstile: Turnstile, held: multiprocessing.Event, release: multiprocessing.Event
) -> None:
    turnstile.enter()  # the parent's own object, inherited by the fork
    held.set()
    release.wait(10)
    turnstile.leave()


def test_a_forked_child_takes_turns_with_its_parent_through_an_inherited_turnstile(
    database: Path,
) -> None:
    """A flock belongs to the open file description, which a fork shares: a child
    that kept its parent's would let both write at once."""
    context = multiprocessing.get_context("fork")
    turnstile = Turnstile(database, timeout=0.3)
    turnstile.enter()  # the parent's lock file is open before the fork
    turnstile.leave()
    held, release = context.Event(), context.Event()
    child = context.Process(target=_hold_turn, args=(turnstile, held, release))
    child.start()
    try:
        assert held.wait(10)
        started = time.monotonic()
        with pytest.raises(OperationalError, match="database is locked"):
            turnstile.enter()
        assert time.monotonic() - started >= 0.3
        release.set()
        child.join(10)
        turnstile.enter()  # handed on once the child gave it back
        turnstile.leave()
    finally:
        release.set()
        child.join(10)
    assert child.exitcode == 0


def test_a_writer_of_another_engine_waits_for_a_commit_in_another_process(
    database: Path,
) -> None:
    context = multiprocessing.get_context("fork")
    held, release = context.Event(), context.Event()
    child = context.Process(target=_commit_late, args=(str(database), held, release))
    child.start()
    engine = _engine(database)
    try:
        assert held.wait(10)
        waiter = threading.Thread(target=_release_soon, args=(release,))
        waiter.start()
        started = time.monotonic()
        with engine.begin() as connection:  # waits for the child's commit
            assert time.monotonic() - started >= 0.2
            rows = connection.execute(text("SELECT n FROM note")).scalars().all()
        waiter.join()
        assert rows == [7]
    finally:
        release.set()
        child.join(10)
    assert child.exitcode == 0


def _release_soon(release: threading.Event) -> None:
    time.sleep(0.3)
    release.set()


def _commit_late(
    database: str, held: multiprocessing.Event, release: multiprocessing.Event
) -> None:
    engine = make_engine(f"sqlite:///{database}")
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO note VALUES (7)"))
        held.set()
        release.wait(10)


def test_processes_with_queues_of_writers_share_the_turn(database: Path) -> None:
    """Two processes with four writers each, all taking turns as fast as they can:
    each process gets about half of them. Without the waiters telling each other,
    the turn passes from thread to thread within one process quicker than the other
    process's waiter (asleep between tries) can take it."""
    context = multiprocessing.get_context("fork")
    start = context.Event()
    counts = context.Queue()
    children = [
        context.Process(target=_take_turns, args=(str(database), start, counts)) for _ in range(2)
    ]
    for child in children:
        child.start()
    start.set()
    results = [counts.get(timeout=30) for _ in children]
    for child in children:
        child.join(10)
        assert child.exitcode == 0
    taken = sorted(turns for turns, _ in results)
    longest_wait = max(wait for _, wait in results)
    assert taken[0] > 0  # not two processes that both got nothing
    assert taken[0] >= 0.6 * taken[1], (taken, f"longest wait {longest_wait:.3f} s")


def _take_turns(
    database: str, start: multiprocessing.Event, counts: multiprocessing.Queue
) -> None:
    turnstile = Turnstile(Path(database), timeout=10)
    taken, longest_wait = 0, 0.0
    guard = threading.Lock()
    start.wait(10)
    until = time.monotonic() + 1.0

    def write() -> None:
        nonlocal taken, longest_wait
        while time.monotonic() < until:
            asked = time.monotonic()
            turnstile.enter()
            waited = time.monotonic() - asked
            time.sleep(0.001)  # a short transaction
            turnstile.leave()
            with guard:
                taken += 1
                longest_wait = max(longest_wait, waited)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    counts.put((taken, longest_wait))


def test_the_lock_file_is_opened_read_only(database: Path) -> None:
    """``flock`` needs no write access: a lock file another user created (a command
    run as root) must not lock the service out."""
    turnstile = Turnstile(database, timeout=1)
    turnstile.enter()
    try:
        flags = fcntl.fcntl(turnstile._fd, fcntl.F_GETFL)
    finally:
        turnstile.leave()
    assert flags & os.O_ACCMODE == os.O_RDONLY


def test_threads_of_one_process_take_turns_one_at_a_time(database: Path) -> None:
    turnstile = Turnstile(database, timeout=5)
    inside, most_inside = 0, 0
    guard = threading.Lock()

    def write() -> None:
        nonlocal inside, most_inside
        for _ in range(20):
            turnstile.enter()
            with guard:
                inside += 1
                most_inside = max(most_inside, inside)
            time.sleep(0.001)
            with guard:
                inside -= 1
            turnstile.leave()

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert most_inside == 1 and inside == 0


def _race_to_enter(turnstile: Turnstile, writers: int) -> list[BaseException]:
    barrier = threading.Barrier(writers)
    errors: list[BaseException] = []

    def write() -> None:
        barrier.wait()
        try:
            turnstile.enter()
            turnstile.leave()
        except BaseException as error:  # noqa: BLE001 - reported to the test
            errors.append(error)

    threads = [threading.Thread(target=write) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return errors


def test_the_first_writers_of_a_process_arriving_together_all_get_their_turn(
    database: Path,
) -> None:
    """Set-up per process happens once, even when its first writers race for it."""
    for _ in range(20):
        assert _race_to_enter(Turnstile(database, timeout=5), writers=6) == []


def test_a_turnstile_no_longer_used_closes_its_lock_file(database: Path) -> None:
    turnstile = Turnstile(database, timeout=1)
    turnstile.enter()
    turnstile.leave()
    fd, path = turnstile._fd, str(turnstile.path)
    assert _open_file(fd) == path
    del turnstile
    gc.collect()
    assert _open_file(fd) != path  # closed (or the number reused for another file)


def _open_file(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return None


def test_a_writer_truncates_a_wal_that_overlapping_readers_kept_from_starting_over(
    database: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(turnstile_module, "WAL_RESTART_BYTES", 256 * 1024)
    engine = _engine(database)
    wal = database.with_name(database.name + "-wal")
    reading = threading.Event()

    def reader() -> None:  # a board read, say, overlapping the writes below
        with reads_only(engine).connect() as connection:
            connection.execute(text("SELECT count(*) FROM note")).scalar_one()
            reading.set()
            time.sleep(0.5)

    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE page (body BLOB)"))
        thread = threading.Thread(target=reader)
        thread.start()
        assert reading.wait(5)
        started = time.monotonic()
        sizes = []
        for _ in range(8):  # 8 x 64 KB: past the limit while the reader still reads
            with engine.begin() as connection:
                connection.execute(text("INSERT INTO page VALUES (randomblob(65536))"))
            sizes.append(wal.stat().st_size)
        waited = time.monotonic() - started
        thread.join(5)
    finally:
        engine.dispose()
    # Truncated once the reader was done: the commit waited for it, not the busy timeout.
    assert min(sizes) == 0, sizes
    assert waited < 5
    with sqlite3.connect(database) as check:
        assert check.execute("SELECT count(*) FROM page").fetchone()[0] == 8


def test_a_commit_syncs_after_giving_its_turn_back_and_returns_once_synced(
    database: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next writer writes while this one waits for the disk (``synchronous =
    NORMAL`` plus a sync of the WAL): ``FULL`` would hold the turn through it."""
    engine = _engine(database)
    in_sync, release = threading.Event(), threading.Event()
    returned: list[str] = []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        if threading.current_thread().name == "first":
            in_sync.set()
            assert release.wait(10)
        real_fsync(fd)

    def write(value: int) -> None:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO note VALUES (:v)"), {"v": value})
        returned.append(threading.current_thread().name)

    def rows() -> int:
        with sqlite3.connect(database) as check:
            return int(check.execute("SELECT count(*) FROM note").fetchone()[0])

    monkeypatch.setattr(os, "fsync", slow_fsync)
    first = threading.Thread(target=write, args=(1,), name="first")
    second = threading.Thread(target=write, args=(2,), name="second")
    try:
        first.start()
        assert in_sync.wait(10)
        second.start()  # the turn is free while the first syncs
        deadline = time.monotonic() + 10
        while rows() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rows() == 2  # the second committed during the first's sync
        assert returned == []  # neither receipt went out before a sync
        release.set()
        first.join(10)
        second.join(10)
    finally:
        release.set()
        engine.dispose()
    assert sorted(returned) == ["first", "second"]


def test_commits_during_a_sync_share_the_next_one_and_none_returns_unsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: each commit returns only after a sync that began once it had
    committed, and commits waiting together need one sync, not one each."""
    wal_sync = turnstile_module.WalSync(tmp_path / "x.db-wal")
    turn = threading.Lock()  # the writers' turn, under which commits are counted
    syncs: list[tuple[int, float, float]] = []  # (commits covered, began, ended)

    def sync_file(_file: object) -> None:
        began = time.monotonic()
        covered = wal_sync._committed
        time.sleep(0.01)
        syncs.append((covered, began, time.monotonic()))

    monkeypatch.setattr(turnstile_module._WalFile, "sync", sync_file)
    returned: list[tuple[int, float]] = []

    def writer() -> None:
        for _ in range(10):
            with turn:
                ticket = wal_sync.committed()
            wal_sync.make_durable(ticket)
            returned.append((ticket, time.monotonic()))

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(ticket for ticket, _ in returned) == list(range(1, 81))
    for ticket, at in returned:
        assert any(covered >= ticket and ended <= at for covered, _, ended in syncs)
    assert len(syncs) < 40, len(syncs)  # 80 commits; one sync each would be 80


def test_a_sync_ending_after_a_deleted_wals_checkpoint_leaves_its_commits_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer syncs commit 1 while the WAL file is deleted; the next commit finds it
    gone, and its checkpoint puts commits 1 and 2 in the database file, synced
    (``covered_elsewhere``). The first sync ending only then counted its own commit as
    the last one synced, so commit 2, durable, synced the file again: gone, it failed
    (a 503 for a push on disk) and every later sync with it."""
    wal_sync = turnstile_module.WalSync(tmp_path / "x.db-wal")
    syncing = threading.Event()
    release = threading.Event()
    calls: list[int] = []

    def sync_file(_file: object) -> None:
        calls.append(1)
        if len(calls) == 1:  # the file was there: the sync goes through, slowly
            syncing.set()
            assert release.wait(10)
            return
        raise FileNotFoundError(2, "No such file or directory")  # deleted since

    monkeypatch.setattr(turnstile_module._WalFile, "sync", sync_file)
    first = wal_sync.committed()
    errors: list[BaseException] = []

    def durable() -> None:
        try:
            wal_sync.make_durable(first)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    thread = threading.Thread(target=durable)
    thread.start()
    assert syncing.wait(10)
    second = wal_sync.committed()
    wal_sync.covered_elsewhere(second)  # the checkpoint of the deleted WAL's frames
    release.set()
    thread.join(10)
    assert errors == []
    wal_sync.make_durable(second)  # on disk already: no sync, no failure
    assert calls == [1]
    assert wal_sync.failure is None


def test_a_failed_sync_fails_its_commit_and_every_later_one(
    database: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """After a failed ``fsync`` Linux may drop the unwritten pages and report the next
    sync as a success: no later commit may be acknowledged either."""
    engine = _engine(database)
    real_fsync = os.fsync
    failures = [OSError(5, "Input/output error")]

    def failing_fsync(fd: int) -> None:
        if failures:
            raise failures.pop()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    try:
        for value in (1, 2):
            with pytest.raises(OperationalError, match="sync the WAL file"):
                with engine.begin() as connection:
                    connection.execute(text("INSERT INTO note VALUES (:v)"), {"v": value})
        with engine.connect() as connection:  # the turn was given back each time
            assert connection.execute(text("SELECT count(*) FROM note")).scalar_one() == 2
    finally:
        engine.dispose()
    assert failures == []  # the second commit did not try again
    assert "could not sync the WAL file" in caplog.text


def test_a_wal_file_deleted_under_the_service_is_saved_into_the_database_and_writes_stop(
    database: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone deletes ``-wal`` (a clean-up, a backup script) while the service runs:
    its commits since the last checkpoint, acknowledged ones among them, lived only in
    that deleted file, which the service's connections held open, and a SIGKILL (or a
    power cut) then lost them all (500 acknowledged events in a run of the server).
    The next commit finds the file gone and checkpoints through its own connection:
    the database file alone holds every commit, and later writes are refused (a 503,
    nothing written) rather than made in a WAL no new connection would see."""
    engine = _engine(database)
    wal = database.with_name(database.name + "-wal")
    try:
        with engine.begin() as connection:  # acknowledged: its frames in the WAL only
            connection.execute(text("INSERT INTO note VALUES (1)"))
        wal.unlink()
        with engine.begin() as connection:  # the commit that finds the file gone
            connection.execute(text("INSERT INTO note VALUES (2)"))
        with pytest.raises(OperationalError, match="WAL file was deleted"):
            with engine.begin() as connection:
                connection.execute(text("INSERT INTO note VALUES (3)"))
        with reads_only(engine).connect() as connection:  # reads go on
            assert connection.execute(text("SELECT count(*) FROM note")).scalar_one() == 2
        # What a SIGKILL leaves: the database file, without the deleted WAL.
        copy = tmp_path / "after-a-kill.db"
        copy.write_bytes(database.read_bytes())
        with sqlite3.connect(copy) as check:
            assert check.execute("SELECT n FROM note ORDER BY n").fetchall() == [(1,), (2,)]
    finally:
        engine.dispose()
    assert "was deleted while in use" in caplog.text


def test_a_wal_file_replaced_under_the_service_is_saved_into_the_database_and_writes_stop(
    database: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The WAL file deleted, then made anew before a commit of the service looks: an
    operator starts a second service (or runs a command) on the database meanwhile,
    whose connection makes a new, empty ``-wal``. The path names a file again, but not
    the one the service's connections write to: their commits since the last
    checkpoint still live only in the deleted file, and a SIGKILL lost them. The next
    commit tells the file is not its connection's (device and inode) and saves them as
    for a deletion; later writes are refused."""
    engine = _engine(database)
    wal = database.with_name(database.name + "-wal")
    try:
        with engine.begin() as connection:  # acknowledged: its frames in the WAL only
            connection.execute(text("INSERT INTO note VALUES (1)"))
        before = wal.stat().st_ino
        wal.unlink()
        # Another process opens the database: SQLite makes the WAL file anew (its read
        # then fails, the index naming frames of the deleted file).
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sqlite3; sqlite3.connect({str(database)!r})"
                ".execute('SELECT count(*) FROM note')",
            ],
            capture_output=True,
            check=False,
        )
        assert wal.exists() and wal.stat().st_ino != before
        with engine.begin() as connection:  # the commit that finds another file there
            connection.execute(text("INSERT INTO note VALUES (2)"))
        with pytest.raises(OperationalError, match="WAL file was replaced"):
            with engine.begin() as connection:
                connection.execute(text("INSERT INTO note VALUES (3)"))
        assert writes_refused(engine) is not None  # what /readyz answers 503 for
        # What a SIGKILL leaves: the database file, without the deleted WAL.
        copy = tmp_path / "after-a-kill.db"
        copy.write_bytes(database.read_bytes())
        with sqlite3.connect(copy) as check:
            assert check.execute("SELECT n FROM note ORDER BY n").fetchall() == [(1,), (2,)]
    finally:
        engine.dispose()
    assert "was replaced by another file while in use" in caplog.text


def test_a_wal_file_sqlite_makes_anew_once_every_connection_closed_is_no_replacement(
    database: Path,
) -> None:
    """SQLite deletes the WAL file when the last connection to the database closes and
    makes it anew at the next one's: connections made then know the new file, and
    commit on."""
    engine = _engine(database)
    wal = database.with_name(database.name + "-wal")
    try:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO note VALUES (1)"))
        engine.dispose()  # the last connection closes: SQLite deletes the WAL file
        assert not wal.exists()
        for value in (2, 3):
            with engine.begin() as connection:
                connection.execute(text("INSERT INTO note VALUES (:v)"), {"v": value})
        assert writes_refused(engine) is None
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM note")).scalar_one() == 3
    finally:
        engine.dispose()


def test_a_failed_probe_for_other_processes_still_gives_the_turn_back(
    database: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether another process waits is a courtesy: a ``flock`` error there (ENOLCK)
    must not keep the turn, which would stop every writer of every process."""
    turnstile = Turnstile(database, timeout=0.3)
    turnstile._this_process()  # its lock files open
    real_flock = fcntl.flock

    def failing_probe(fd: int, operation: int) -> None:
        if fd == turnstile._waiting_fd and operation == fcntl.LOCK_EX | fcntl.LOCK_NB:
            raise OSError(37, "No locks available")
        real_flock(fd, operation)

    monkeypatch.setattr(turnstile_module.fcntl, "flock", failing_probe)
    turnstile.enter()
    turnstile.leave()  # raised, the turn kept, before
    assert _race_to_enter(turnstile, writers=2) == []
    turnstile._others_waited = True  # a writer about to let another process go first
    turnstile.enter()  # its probe fails too: it takes its turn all the same
    turnstile.leave()


def test_a_sync_ended_by_an_unexpected_exception_leaves_no_writer_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writers waiting for another's sync are woken however it ends, and one of
    them syncs itself: none waits forever for a sync nobody makes."""
    wal_sync = turnstile_module.WalSync(tmp_path / "x.db-wal")
    calls: list[int] = []

    def sync_file(_file: object) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("interrupted")

    monkeypatch.setattr(turnstile_module._WalFile, "sync", sync_file)
    first, second = wal_sync.committed(), wal_sync.committed()
    with pytest.raises(RuntimeError):
        wal_sync.make_durable(first)
    done = threading.Event()

    def wait_for_second() -> None:
        wal_sync.make_durable(second)
        done.set()

    thread = threading.Thread(target=wait_for_second, daemon=True)
    thread.start()
    assert done.wait(5), "a writer waits forever for a sync nobody makes"
    assert len(calls) == 2
    wal_sync.make_durable(first)  # covered by the second sync: no third one
    assert len(calls) == 2


def _wait_as_another_process(
    database: str, waiting: multiprocessing.Event, done: multiprocessing.Event
) -> None:
    turnstile = Turnstile(Path(database), timeout=10)
    waiting.set()
    turnstile.enter()  # waits: the parent holds the turn
    turnstile.leave()
    done.set()


def test_a_waiting_process_is_seen_and_let_go_first(database: Path) -> None:
    """The mechanism itself, without timing races: another process's waiter is seen
    by the process holding the turn, and once it has waited SHARE_AFTER_SECONDS the
    next writer of this process defers to it (``COURTESY_SECONDS``)."""
    turnstile = Turnstile(database, timeout=10)
    turnstile.enter()
    assert not turnstile._another_process_waits()  # nobody waits yet
    context = multiprocessing.get_context("fork")
    waiting, done = context.Event(), context.Event()
    child = context.Process(target=_wait_as_another_process, args=(str(database), waiting, done))
    child.start()
    try:
        assert waiting.wait(10)
        deadline = time.monotonic() + 10
        while not turnstile._another_process_waits() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert turnstile._another_process_waits()  # the child's waiter, on .waiting
        turnstile.leave()
        assert done.wait(10)  # it took the turn
        assert not turnstile._another_process_waits()
    finally:
        child.join(10)
    assert child.exitcode == 0

    # Another process's waiter that stays (a shared lock of .waiting held here on a
    # description of its own): after SHARE_AFTER_SECONDS of turns, a writer defers.
    other = os.open(turnstile.waiting_path, os.O_RDONLY)
    try:
        fcntl.flock(other, fcntl.LOCK_SH)
        longest = 0.0
        until = time.monotonic() + 20 * turnstile_module.SHARE_AFTER_SECONDS
        while time.monotonic() < until:
            started = time.monotonic()
            turnstile.enter()
            longest = max(longest, time.monotonic() - started)
            turnstile.leave()
        assert longest >= turnstile_module.COURTESY_SECONDS
    finally:
        os.close(other)
