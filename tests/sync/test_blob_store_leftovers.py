"""What an upload killed mid-write leaves in the blob store, and who removes it.

``FileBlobStore.put`` writes an image to a temporary file beside its place, syncs it,
then renames it: a crash never leaves a half-written image under its digest. A put
that fails removes its temporary file; a process killed (SIGKILL, the OOM killer, a
power cut) in the middle cannot, and nothing removed it afterwards: every such upload
left up to an image's size (10 MB) on the store's disk for good, and the PDA's retry,
which stores the image, wrote a temporary file of its own beside it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

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
