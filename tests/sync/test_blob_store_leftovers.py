"""What an upload killed mid-write leaves in the blob store, and who removes it.

``FileBlobStore.put`` writes an image to a temporary file beside its place, syncs it,
then renames it: a crash never leaves a half-written image under its digest. A put
that fails removes its temporary file; a process killed (SIGKILL, the OOM killer, a
power cut) in the middle cannot, and nothing removed it afterwards: every such upload
left up to an image's size (10 MB) on the store's disk for good, and the PDA's retry,
which stores the image, wrote a temporary file of its own beside it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sync.blobs import INCOMING_STALE_SECONDS, FileBlobStore

CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from sync.blobs import FileBlobStore

    root, digest, marker = sys.argv[1:4]

    def fsync(fd):  # the bytes are written: the process is killed before the rename
        Path(marker).touch()
        time.sleep(60)

    os.fsync = fsync
    FileBlobStore(root).put(digest, Path(marker).with_suffix(".data").read_bytes())
    """
)


def _killed_mid_write(root: Path, data: bytes, tmp_path: Path) -> None:
    """A process putting ``data`` into the store at ``root``, SIGKILLed once its bytes
    are written and before they are renamed into place."""
    marker = tmp_path / "written"
    marker.with_suffix(".data").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), digest, str(marker)],
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert child.poll() is None, "the writer exited before writing"
            assert time.monotonic() < deadline, "the writer never wrote"
            time.sleep(0.01)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=10)


def _files(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.is_file())


def test_the_retry_of_an_upload_killed_mid_write_removes_what_it_left(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    data = os.urandom(100_000)
    digest = hashlib.sha256(data).hexdigest()
    _killed_mid_write(root, data, tmp_path)
    left = _files(root)
    assert len(left) == 1 and left[0].startswith(".incoming-"), left  # the kill's leftover

    FileBlobStore(root).put(digest, data)  # the PDA sends the same upload again

    assert _files(root) == [digest]
    assert FileBlobStore(root).read(digest, size=len(data)) == data


def test_an_upload_removes_old_leftovers_beside_it_and_leaves_fresh_ones(tmp_path: Path) -> None:
    """Leftovers of images never sent again go with the next upload into their
    directory once they are older than any write takes; a fresh one of another image
    may be that image's upload in flight, in another process."""
    store = FileBlobStore(tmp_path / "blobs")
    data = os.urandom(1000)
    digest = hashlib.sha256(data).hexdigest()
    directory = store.path(digest).parent
    directory.mkdir(parents=True)
    other = digest[:4] + "f" * 60
    old = directory / f".incoming-{other}-old"
    fresh = directory / f".incoming-{other}-fresh"
    for leftover in (old, fresh):
        leftover.write_bytes(b"x" * 500)
    past = time.time() - INCOMING_STALE_SECONDS - 60
    os.utime(old, (past, past))

    store.put(digest, data)

    assert _files(tmp_path / "blobs") == sorted([digest, fresh.name])


PAUSED = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from sync.blobs import FileBlobStore

    root, digest, marker, go = sys.argv[1:5]
    synced = os.fsync

    def fsync(fd):  # the bytes are written: the put waits before its rename
        if not Path(go).exists():
            Path(marker).touch()
            while not Path(go).exists():
                time.sleep(0.01)
        synced(fd)

    os.fsync = fsync
    FileBlobStore(root).put(digest, Path(marker).with_suffix(".data").read_bytes())
    """
)


@contextlib.contextmanager
def _paused_writer(root: Path, data: bytes, tmp_path: Path) -> Iterator[Callable[[], None]]:
    """A put of ``data`` in another process, paused with its bytes written, before its
    rename; the function given lets it go on, and checks that it stored the image."""
    digest = hashlib.sha256(data).hexdigest()
    marker, go = tmp_path / "written", tmp_path / "go"
    marker.with_suffix(".data").write_bytes(data)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    writer = subprocess.Popen(
        [sys.executable, "-c", PAUSED, str(root), digest, str(marker), str(go)],
        env=env,
        start_new_session=True,
        stderr=subprocess.PIPE,
    )

    def finish() -> None:
        go.touch()
        _, errors = writer.communicate(timeout=30)
        assert writer.returncode == 0, errors.decode()

    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert writer.poll() is None, writer.stderr.read() if writer.stderr else ""
            assert time.monotonic() < deadline, "the writer never wrote"
            time.sleep(0.01)
        yield finish
    finally:
        if writer.poll() is None:
            os.killpg(writer.pid, signal.SIGKILL)
            writer.wait(timeout=10)
        if writer.stderr is not None:
            writer.stderr.close()


def test_a_put_in_flight_keeps_its_temporary_file_when_another_put_of_its_image_runs(
    tmp_path: Path,
) -> None:
    """Puts of one image run one at a time under its lock, so a put removed any
    temporary file of its image as a killed put's leftover. On PostgreSQL that lock
    goes with the connection: one whose connection died mid-upload (the PDA retrying
    meanwhile, through another worker) was still writing when the other put removed its
    file, and its rename failed, a 503 for an upload the retry stored. A put holds a
    lock on its temporary file while it writes (released by the kernel when its process
    dies): the other put removes only files nobody holds."""
    root = tmp_path / "blobs"
    data = os.urandom(100_000)
    digest = hashlib.sha256(data).hexdigest()
    with _paused_writer(root, data, tmp_path) as finish:
        FileBlobStore(root).put(digest, data)  # the retry, through another worker

        in_flight = [name for name in _files(root) if name.startswith(".incoming-")]
        assert len(in_flight) == 1, _files(root)
        finish()
    assert _files(root) == [digest]
    assert FileBlobStore(root).read(digest, size=len(data)) == data


def test_a_put_in_flight_keeps_its_file_where_flock_is_a_whole_file_fcntl_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On NFS, Linux makes ``flock`` a ``fcntl`` lock of the whole file (flock(2)), and
    an exclusive one needs the file open for writing: the check of a leftover, opened
    for reading, was refused the lock (EBADF), taken for a file system without locks,
    and removed the file of a put in flight, as before the locks were taken."""
    real_flock = fcntl.flock

    def flock_as_on_nfs(fd: int, operation: int) -> None:
        writable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
        if operation & fcntl.LOCK_EX and not writable:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        real_flock(fd, operation)

    monkeypatch.setattr("sync.blobs.fcntl.flock", flock_as_on_nfs)
    root = tmp_path / "blobs"
    data = os.urandom(100_000)
    digest = hashlib.sha256(data).hexdigest()
    with _paused_writer(root, data, tmp_path) as finish:
        FileBlobStore(root).put(digest, data)

        in_flight = [name for name in _files(root) if name.startswith(".incoming-")]
        assert len(in_flight) == 1, _files(root)
        finish()
    assert _files(root) == [digest]


def test_a_put_in_flight_keeps_its_file_from_a_put_of_its_image_in_the_same_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where ``flock`` is a ``fcntl`` lock (NFS), locks belong to the process, not to
    the open file: a put's retry on another thread of the same worker (gthread: its
    first attempt's database connection died mid-upload) was granted the lock of the
    first put's temporary file, removed it while it was being written (its rename then
    failed: a 503 for an image the retry stored), and, closing its own descriptor,
    dropped that put's lock too. A put knows the temporary files its own process holds."""
    real_flock = fcntl.flock

    def flock_of_the_process(fd: int, operation: int) -> None:
        if operation & fcntl.LOCK_UN:
            real_flock(fd, operation)
            return
        fcntl.lockf(fd, operation)  # a POSIX record lock, as NFS makes a flock

    monkeypatch.setattr("sync.blobs.fcntl.flock", flock_of_the_process)
    from sync import blobs

    root = tmp_path / "blobs"
    data = os.urandom(1000)
    digest = hashlib.sha256(data).hexdigest()
    store = FileBlobStore(root)
    directory = store.path(digest).parent
    directory.mkdir(parents=True)
    fd, in_flight = blobs._incoming_file(directory, digest)  # the first put, writing
    try:
        store.put(digest, data)  # its retry, on another thread of the same worker
        assert Path(in_flight).exists(), _files(root)
    finally:
        os.close(fd)
        Path(in_flight).unlink(missing_ok=True)
    assert _files(root) == [digest]
