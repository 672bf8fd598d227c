"""Proof images: verified, content-addressed, stored behind a small interface.

The bytes go to a ``BlobStore`` (files under ``BLOB_DIR`` today; an object store
can implement the same methods). The ``blob`` table records what was
verified and who uploaded it. Uploading the same image again changes nothing, unless
the stored bytes were lost or altered: the verified upload then replaces them.
Content-addressed, the bytes are checked against their name on every read
(``read_image``): a file changed or replaced in the store is never served as the
image the PDA uploaded.
The retention purge (``sync.sweeps``) deletes old images' bytes and keeps their
rows, marked ``purged_at``; uploading such an image again (a new proof names it)
brings it back. Both lock the image's row first, so an upload and the purge's
deletion of the same image happen one after the other, never interleaved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import fcntl
import hashlib
import io
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from PIL import Image, UnidentifiedImageError
from sqlalchemy import exists, select, union
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models import Blob, BlobUpload, ProofImage, RejectedImage, utcnow
from sync import audit
from sync.errors import (
    Conflict,
    Gone,
    InvalidInput,
    LimitExceeded,
    NotFound,
    RateLimited,
    Unavailable,
)
from sync.events import SHA256_HEX
from sync.sql import advisory_locks, chunks

# MPO is how Pillow names the multi-picture JPEGs many phone cameras write.
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp"}
MAX_PIXELS = 40_000_000  # a 40-megapixel photo; larger is a decompression bomb, not a proof
log = logging.getLogger(__name__)
# The audit action of an upload that replaced stored bytes found missing or altered.
BYTES_RESTORED = "blob_bytes_restored"
# What one account may upload in a day of images that no event names (yet): a PDA may
# upload a delivery's photos before the push that names them (offline all day, a day's
# photos at once), but a stolen PDA, or a script with a courier's token, uploading image
# after image that no delivery names filled the store's disk, for every station.
UNNAMED_WINDOW = dt.timedelta(hours=24)
UNNAMED_BYTES_PER_UPLOADER = 1024**3
# And how many of them: bytes alone let 1 GiB be a dozen million 84-byte PNGs, each a
# file (an inode, a disk block: some 50 GB), a ``blob`` and a ``blob_upload`` row, and
# each upload read every row counted before it. An honest PDA's day is a few hundred
# deliveries, a signature and a photo each.
UNNAMED_IMAGES_PER_UPLOADER = 5_000
TOO_MANY_UNNAMED = "too_many_unnamed_images"
# The longest ``Retry-After`` of that refusal: a push naming the images held makes room
# at once, so the window's end (up to a day away) told a PDA that honours the header to
# keep the photo of its next delivery for hours after the push that freed the room.
UNNAMED_RETRY_AFTER_SECONDS = 60


class BlobStore(Protocol):
    def exists(self, digest: str) -> bool: ...

    def put(self, digest: str, data: bytes) -> None: ...

    def read(self, digest: str, *, size: int) -> bytes: ...

    def verify(self, digest: str, *, size: int) -> None: ...

    def delete(self, digest: str) -> bool: ...


class BytesAltered(Exception):
    """The file stored under a digest is not the image the digest names: changed or
    replaced in the store after it was verified on upload."""

    def __init__(self, digest: str, found: str) -> None:
        super().__init__(f"the file of blob {digest} holds {found}")
        self.digest = digest
        self.found = found


RETRY_STORE_AFTER_SECONDS = 60
# An image's temporary file in the store (``FileBlobStore.put``): the prefix, then its
# digest. One older than this is no write in flight (a write takes the time to write
# and sync an image of at most ``MAX_BLOB_BYTES``) but one a killed process left.
INCOMING_PREFIX = ".incoming-"
INCOMING_STALE_SECONDS = 3600
# Images' digests' two-key advisory locks, beside ``sync.status.LOCK_SPACE`` (tracking
# numbers): ``sync.sql.advisory_locks``.
DIGEST_LOCK_SPACE = 0x5CA8
# Uploaders' (user ids') two-key advisory locks: an account's new images are counted
# against ``UNNAMED_IMAGES_PER_UPLOADER`` one upload at a time (``store_blob``).
UPLOADER_LOCK_SPACE = 0x5CA9


def store_unavailable(action: str) -> Unavailable:
    """The store failed (full, unwritable, gone): the caller keeps its data and retries."""
    return Unavailable(
        f"the proof image store cannot {action} now; nothing was stored: "
        "send the same request again later",
        code="blob_store_unavailable",
        retry_after=RETRY_STORE_AFTER_SECONDS,
    )


class FileBlobStore:
    """``root/ab/cd/abcd...``: written to a temporary file, synced, then renamed,
    so a crash never leaves a half-written image under its digest. The temporary file
    a crash leaves instead is removed by the next put of the same image (the PDA's
    retry), or by any put into its directory once it is ``INCOMING_STALE_SECONDS`` old
    (``_remove_leftovers``).

    A failing disk (full, read-only, not a directory, no permission) raises
    ``Unavailable`` with the ``OSError`` as its cause; an image that is not there
    is ``FileNotFoundError`` from ``read`` and ``verify``, one whose file is not the
    bytes uploaded ``BytesAltered``.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest[2:4] / digest

    def exists(self, digest: str) -> bool:
        try:
            return self.path(digest).is_file()
        except OSError as exc:
            raise store_unavailable("be read") from exc

    def put(self, digest: str, data: bytes) -> None:
        target = self.path(digest)
        try:
            # The directories that gain an entry: the file's, and those made for it now.
            grown = [target.parent]
            grown += [d.parent for d in (target.parent, target.parent.parent) if not d.is_dir()]
            target.parent.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(target.parent, digest)
            fd, temporary = _incoming_file(target.parent, digest)
        except OSError as exc:
            raise store_unavailable("be written") from exc
        try:
            # Renamed while open: its lock (``_incoming_file``) held until it has its name.
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
                os.replace(temporary, target)
            for directory in grown:  # a 201 lets the PDA delete its copy: names synced too
                _sync_directory(directory)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                Path(temporary).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise store_unavailable("be written") from exc
            raise
        finally:
            _release_incoming(temporary)

    def read(self, digest: str, *, size: int) -> bytes:
        """The image's bytes, checked: the ``size`` bytes recorded on upload, hashing to
        ``digest``. A file of another length is refused by its length, unread; at most
        ``size`` + 1 bytes are read (of one that grew meanwhile)."""
        with self._opened(digest, size) as handle:
            data = handle.read(size + 1)
        _check_length(digest, size, len(data))
        _check_hash(digest, hashlib.sha256(data).hexdigest())
        return data

    def verify(self, digest: str, *, size: int) -> None:
        """``read``'s check without keeping the bytes: hashed a chunk at a time."""
        with self._opened(digest, size) as handle:
            _check_hash(digest, hashlib.file_digest(handle, "sha256").hexdigest())

    @contextlib.contextmanager
    def _opened(self, digest: str, size: int) -> Iterator[BinaryIO]:
        """The image's file, open for reading once its length is the one recorded."""
        try:
            with self.path(digest).open("rb") as handle:
                _check_length(digest, size, os.fstat(handle.fileno()).st_size)
                yield handle
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise store_unavailable("be read") from exc

    def delete(self, digest: str) -> bool:
        """Remove the image's bytes; False if there were none (deleting is idempotent)."""
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        return True


def _incoming_file(directory: Path, digest: str) -> tuple[int, str]:
    """A new temporary file for ``digest``'s bytes in ``directory``, open and locked
    (``flock``, exclusive) for as long as it stays open: ``_remove_leftovers`` leaves a
    locked file alone, and the kernel drops the lock of a killed process. One another
    put removed between its creation and its lock is made again."""
    while True:
        with _INCOMING_HERE_LOCK:  # no put of this process removes it from now on
            fd, temporary = tempfile.mkstemp(dir=directory, prefix=f"{INCOMING_PREFIX}{digest}-")
            _INCOMING_HERE.add(os.path.abspath(temporary))
        try:
            _lock_file(fd, wait=True)
            if os.stat(temporary).st_ino == os.fstat(fd).st_ino:
                return fd, temporary
        except FileNotFoundError:
            pass
        except BaseException:
            _release_incoming(temporary)
            os.close(fd)
            raise
        _release_incoming(temporary)
        os.close(fd)  # removed as a leftover before it was locked: another one


# The temporary files this process's puts hold, by path. Where ``flock`` is a ``fcntl``
# lock (NFS), a lock belongs to the process: another thread's put would be granted it,
# remove the file being written, and drop the lock on closing its own descriptor.
_INCOMING_HERE: set[str] = set()
_INCOMING_HERE_LOCK = threading.Lock()


def _release_incoming(temporary: str) -> None:
    """The put holding ``temporary`` is done with it (renamed, or failed)."""
    with _INCOMING_HERE_LOCK:
        _INCOMING_HERE.discard(os.path.abspath(temporary))


def _lock_file(fd: int, *, wait: bool) -> bool:
    """Lock the open file ``fd`` exclusively: False when another holds it (``wait``
    False). A store whose file system has no such locks (some network ones) is not
    refused: True, unlocked, as before the locks were taken."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        log.warning("the blob store's file system refused a lock: %s", exc)
    return True


def _remove_leftovers(directory: Path, digest: str) -> None:
    """Remove the temporary files of puts killed before their rename (SIGKILL, a power
    cut): ``digest``'s, and any other older than ``INCOMING_STALE_SECONDS``. Left, each
    held up to an image's size of the store's disk for good. A file a put still holds
    (``_incoming_file``'s lock) is left: the puts of one image run one at a time under
    its lock (``lock_digests`` on PostgreSQL, the writer's turn on SQLite), but a put
    whose PostgreSQL connection died lost that lock while it was still writing, and the
    retry removed its file (its rename failed: a 503 for an image the retry stored)."""
    own = f"{INCOMING_PREFIX}{digest}-"
    stale_before = time.time() - INCOMING_STALE_SECONDS
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.name.startswith(INCOMING_PREFIX):
                continue
            with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove
                if entry.name.startswith(own) or entry.stat().st_mtime < stale_before:
                    _remove_unless_held(entry.path)


def _remove_unless_held(path: str) -> None:
    """Remove a temporary file unless a put in flight holds its lock. Opened for
    writing: where ``flock`` is a ``fcntl`` lock of the whole file (NFS), an exclusive
    one is refused on a file open only for reading, taken for no locks at all."""
    with _INCOMING_HERE_LOCK:
        if os.path.abspath(path) in _INCOMING_HERE:  # a put of this process writes it
            return
        fd = os.open(path, os.O_RDWR)
        try:
            if not _lock_file(fd, wait=False):
                return
            os.unlink(path)
        finally:
            os.close(fd)
    log.warning("removed %s, left in the blob store by a killed upload", path)


def _check_length(digest: str, size: int, found: int) -> None:
    if found != size:
        raise BytesAltered(digest, f"{found:,} bytes, not the {size:,} uploaded")


def _check_hash(digest: str, actual: str) -> None:
    if actual != digest:
        raise BytesAltered(digest, f"bytes hashing to {actual}")


def _sync_directory(path: Path) -> None:
    """Make the entries of ``path`` (a file renamed into it, a directory made in it)
    survive a power cut, as ``fsync`` of a file does for its bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ImageInfo:
    media_type: str
    width: int
    height: int


def check_digest(digest: str) -> str:
    if not SHA256_HEX.fullmatch(digest):
        raise InvalidInput(
            "the blob name must be a lowercase hex sha256 digest",
            code="invalid_digest",
            field="sha256",
        )
    return digest


def inspect_image(data: bytes) -> ImageInfo:
    """Accept PNG, JPEG and WebP files that decode; refuse anything else."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            media_type = MEDIA_TYPES.get(image.format or "")
            width, height = image.size
            if media_type is None:
                raise InvalidInput(
                    f"a {image.format} image is not accepted; send PNG, JPEG or WebP",
                    code="unsupported_image_type",
                    field="body",
                )
            if width * height > MAX_PIXELS:  # checked before decoding a pixel
                raise InvalidInput(
                    f"the image has {width}x{height} pixels; the limit is {MAX_PIXELS:,}",
                    code="image_too_large",
                    field="body",
                )
            image.load()  # decode it all: a truncated or corrupt file fails here
    except InvalidInput:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ):
        raise InvalidInput(
            "the bytes are not a readable PNG, JPEG or WebP image",
            code="not_an_image",
            field="body",
        ) from None
    return ImageInfo(media_type, width, height)


@dataclass(frozen=True)
class StoredImage:
    """What ``store_blob`` did: ``created`` the image's row, or ``restored`` the bytes
    of one the retention purge had deleted. Either way the image is now there for the
    proofs that name it, which must be judged again (``rejudge_after_upload``)."""

    blob: Blob
    created: bool
    restored: bool = False
    # The stored bytes this upload put right: "missing" or "altered" (audit-logged, as
    # ``BYTES_RESTORED``: the upload would otherwise erase the only trace of them).
    replaced: str | None = None

    @property
    def arrived(self) -> bool:
        return self.created or self.restored


def store_blob(
    *,
    session: Session,
    store: BlobStore,
    digest: str,
    data: bytes,
    max_bytes: int,
    station_id: int | None,
    uploaded_by: int,
    found_before: MutableMapping[str, str] | None = None,
    answered_as_new: bool = False,
) -> StoredImage:
    """Verify and store an image. Idempotent; each uploader is recorded once
    (``BlobUpload``), which is what lets them read it back. An image new to the
    uploader counts against their images that no event names
    (``check_unnamed_uploads``: ``RateLimited`` past them), whether or not the store
    holds its bytes (another station's, which must not show it exists); one they
    uploaded before costs nothing.

    ``found_before``: what earlier runs of the same upload found and put right, by
    digest ("missing" or "altered"), kept across them by the caller. The bytes are put
    back outside the transaction: a run aborted after that (PostgreSQL, for a conflict)
    and run again finds them whole, and its ``BYTES_RESTORED`` entry would be lost with
    the aborted transaction, the only trace of the file's loss or alteration. When no
    run commits (every one aborted), the caller writes them in a transaction of its own
    (``record_bytes_restored``).

    ``answered_as_new``: the uploader may not read the image (another station's), and
    is answered as for a new one: its bytes, held already, are decoded and written as a
    new image's are, so that a store that cannot write (its disk full) refuses both
    alike (SECURITY.md threat 3)."""
    check_digest(digest)
    if len(data) > max_bytes:
        raise LimitExceeded(
            f"the image has {len(data):,} bytes; the limit is {max_bytes:,}",
            limit=max_bytes,
            unit="bytes",
            field="body",
        )
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise InvalidInput(
            f"the bytes hash to {actual}, not to the digest in the URL",
            code="digest_mismatch",
            field="sha256",
        )
    # New to the account, wherever its bytes are: an image counted only when new to the
    # store let an account at its bound tell another station's images (stored, 201) from
    # images nobody holds (429), which the 201 answering both hides (SECURITY.md threat 3).
    if not _uploaded_by(session, digest, uploaded_by):
        # The count and the new image's rows in one turn per account (PostgreSQL; SQLite's
        # writers take turns): side by side, two uploads each counted the other's image as
        # not there yet, and both were stored past the bound. Held to the commit, before
        # the digest's lock (``lock_digests``), which pushes take without this one.
        advisory_locks(session, UPLOADER_LOCK_SPACE, [str(uploaded_by)])
        # Looked for again once it is our turn: the same image sent again while its
        # first upload was in flight (a PDA giving up over a weak signal) waited for
        # that upload, which recorded it; it costs nothing now, and was refused 429
        # at the bound for an image the account had uploaded.
        if not _uploaded_by(session, digest, uploaded_by):
            check_unnamed_uploads(session=session, uploaded_by=uploaded_by, size=len(data))
    stored = _stored(session, store, digest, data, answered_as_new=answered_as_new)
    if found_before is not None:
        if stored.replaced is not None:
            found_before[digest] = stored.replaced
        elif digest in found_before and not stored.arrived:
            stored = dataclasses.replace(stored, replaced=found_before[digest])
    _record_upload(session, digest, station_id, uploaded_by)
    if stored.replaced is not None:
        record_bytes_restored(
            session=session,
            found={digest: stored.replaced},
            uploaded_by=uploaded_by,
            station_id=station_id,
        )
    return stored


def record_bytes_restored(
    *, session: Session, found: Mapping[str, str], uploaded_by: int, station_id: int | None
) -> None:
    """``BYTES_RESTORED`` for each image of ``found`` (digest: "missing" or "altered"),
    by its uploader: in the upload's transaction, or in one of its own when every run of
    the upload was aborted after one put the bytes back (``found_before``)."""
    for digest, what in sorted(found.items()):
        audit.append(
            session=session,
            actor_id=uploaded_by,
            action=BYTES_RESTORED,
            subject_type="blob",
            subject_key=digest,
            details={"found": what, "station_id": station_id},
        )


def check_unnamed_uploads(
    *, session: Session, uploaded_by: int, size: int, now: dt.datetime | None = None
) -> None:
    """``RateLimited`` (429 ``too_many_unnamed_images``) when a new image of ``size``
    bytes would take what ``uploaded_by`` uploaded in the last ``UNNAMED_WINDOW`` that no
    event names beyond ``UNNAMED_BYTES_PER_UPLOADER``, or beyond
    ``UNNAMED_IMAGES_PER_UPLOADER`` images. An image counts until an event names it (a
    delivery's POD, or the POD of an event refused and kept in quarantine): the
    PDA pushing the deliveries its photos belong to makes room again at once (and keeps
    the images meanwhile: nothing from the field is lost), so ``Retry-After`` is at most
    ``UNNAMED_RETRY_AFTER_SECONDS``; the message says when enough leaves the window by
    itself."""
    now = now or utcnow()
    since = now - UNNAMED_WINDOW
    uploads = session.execute(
        select(BlobUpload.uploaded_at, Blob.size_bytes)
        .join(Blob, Blob.sha256 == BlobUpload.sha256)
        .where(
            BlobUpload.uploaded_by == uploaded_by,
            BlobUpload.uploaded_at > since,
            ~exists().where(ProofImage.sha256 == BlobUpload.sha256),
            # Named by a refused event's POD (kept in quarantine with its parcel): named
            # too. The PDA pushed it; its photo is evidence of the drop it claims.
            ~exists().where(RejectedImage.sha256 == BlobUpload.sha256),
        )
        .order_by(BlobUpload.uploaded_at)
    ).all()
    held, count = sum(size_bytes for _, size_bytes in uploads), len(uploads)

    def room() -> bool:
        return (
            held + size <= UNNAMED_BYTES_PER_UPLOADER and count + 1 <= UNNAMED_IMAGES_PER_UPLOADER
        )

    if room():
        return
    freed_at = now + UNNAMED_WINDOW
    for uploaded_at, size_bytes in uploads:  # oldest first: they leave the window first
        held, count = held - size_bytes, count - 1
        if room():
            freed_at = uploaded_at + UNNAMED_WINDOW
            break
    freed_in = max(1, int((freed_at - now).total_seconds()) + 1)
    # Told to the minute, the one after: the minute it frees in began before it does.
    frees_by = (now + dt.timedelta(seconds=freed_in + 59)).astimezone(dt.UTC)
    raise RateLimited(
        f"this account uploaded {UNNAMED_BYTES_PER_UPLOADER // 2**20:,} MiB or "
        f"{UNNAMED_IMAGES_PER_UPLOADER:,} images that no event names in the last "
        f"{UNNAMED_WINDOW.total_seconds() / 3600:g} hours: push the events that name them, "
        f"then upload this one again; room frees by itself by {frees_by:%Y-%m-%d %H:%M} UTC",
        retry_after=min(freed_in, UNNAMED_RETRY_AFTER_SECONDS),
        code=TOO_MANY_UNNAMED,
    )


def lock_digests(session: Session, digests: Iterable[str]) -> None:
    """Serialize an image's upload with the pushes naming it (PostgreSQL).

    Side by side, each would judge the parcel without the other's uncommitted rows:
    the push finds no image, the upload no delivery naming it (``ProofImage``), and
    ``pod_blob_missing`` stays open with the image stored. A push takes these after
    its device's sync state, before its shifts and parcels; an upload before the
    image's row. SQLite needs nothing: its write transactions run one at a time.
    """
    advisory_locks(session, DIGEST_LOCK_SPACE, digests)


def _stored(
    session: Session, store: BlobStore, digest: str, data: bytes, *, answered_as_new: bool
) -> StoredImage:
    lock_digests(session, [digest])  # before the row: see lock_digests
    # Locked: the purge deletes bytes only of rows still purged, under the same lock.
    existing = session.get(Blob, digest, with_for_update=True, populate_existing=True)
    if existing is not None:
        if existing.purged_at is not None:
            # Purged, and uploaded again (a new proof names the same image): the
            # verified bytes are kept again, and its retention starts over.
            store.put(digest, data)
            existing.purged_at = None
            existing.uploaded_at = utcnow()
            session.flush()
            return StoredImage(existing, created=False, restored=True)
        try:
            store.verify(digest, size=existing.size_bytes)
        except FileNotFoundError:
            log.warning(
                "the file of blob %s was missing from the store; replaced by the same "
                "image uploaded again",
                digest,
            )
            store.put(digest, data)  # the file was lost; these bytes are verified
            return StoredImage(existing, created=False, replaced="missing")
        except BytesAltered as altered:
            log.warning("%s; replaced by the same image uploaded again", altered)
            store.put(digest, data)
            return StoredImage(existing, created=False, replaced="altered")
        if answered_as_new:
            # Held, yet answered as new: stored as a new one is. Only read again, it was
            # a 201 with the store's disk full, where an image nobody holds is a 503.
            inspect_image(data)
            store.put(digest, data)
        return StoredImage(existing, created=False)
    info = inspect_image(data)
    store.put(digest, data)  # before the row: a row never points at missing bytes
    blob = Blob(
        sha256=digest,
        media_type=info.media_type,
        size_bytes=len(data),
        width=info.width,
        height=info.height,
    )
    try:
        with session.begin_nested():
            session.add(blob)
    except IntegrityError:  # the same image, uploaded concurrently
        return StoredImage(get_blob(session=session, digest=digest), created=False)
    return StoredImage(blob, created=True)


def _uploaded_by(session: Session, digest: str, user_id: int) -> bool:
    """Whether ``user_id`` uploaded the image ``digest`` before (``BlobUpload``)."""
    return (
        session.scalar(
            select(BlobUpload.id).where(
                BlobUpload.sha256 == digest, BlobUpload.uploaded_by == user_id
            )
        )
        is not None
    )


def _record_upload(session: Session, digest: str, station_id: int | None, user_id: int) -> None:
    if _uploaded_by(session, digest, user_id):
        return
    try:
        with session.begin_nested():
            session.add(BlobUpload(sha256=digest, station_id=station_id, uploaded_by=user_id))
    except IntegrityError:  # the same user, uploading it twice at once
        pass


@dataclass(frozen=True)
class BlobReader:
    """Who is looking at proof images, in the terms of ``may_read_blob``."""

    user_id: int
    station_id: int | None  # managers: images uploaded at their station
    everything: bool  # admins and auditors read every image


def may_read_blob(*, session: Session, digest: str, reader: BlobReader) -> bool:
    """Cross-station readers (``everything``) read every image; others those uploaded
    by themselves or, for a manager's ``station_id``, at their station."""
    return digest in readable_blobs(session=session, digests=[digest], reader=reader)


def readable_blobs(*, session: Session, digests: Iterable[str], reader: BlobReader) -> set[str]:
    """Which of ``digests`` the reader may read (``may_read_blob``), in one query per
    ``chunks`` of them."""
    wanted = sorted(set(digests))
    if reader.everything:
        return set(wanted)
    readable: set[str] = set()
    for chunk in chunks(wanted):
        query = select(BlobUpload.sha256).where(BlobUpload.sha256.in_(chunk)).distinct()
        if reader.station_id is not None:
            query = query.where(BlobUpload.station_id == reader.station_id)
        else:
            query = query.where(BlobUpload.uploaded_by == reader.user_id)
        readable.update(session.scalars(query))
    return readable


def blobs_by_digest(*, session: Session, digests: Iterable[str]) -> dict[str, Blob]:
    """The images of ``digests`` the server holds (a row: uploaded once, maybe purged
    since), by digest, in one query per ``chunks`` of them; one never uploaded is not
    among them."""
    found: dict[str, Blob] = {}
    for chunk in chunks(sorted(set(digests))):
        found.update(
            (b.sha256, b) for b in session.scalars(select(Blob).where(Blob.sha256.in_(chunk)))
        )
    return found


def parcels_naming(*, session: Session, digest: str) -> list[str]:
    """The parcels whose proofs name the image ``digest`` (``proof_image``, by
    ``ix_proof_image_sha256``), and those named by rejected events whose POD names it
    (``rejected_image``, by ``ix_rejected_image_sha256``: a refused drop's photo is
    evidence in a dispute too), in one statement: an auditor's read of it is filed under
    them, so that a parcel's history (``GET /audit?tracking_no=``) says who looked at its
    delivery's signature or photo, as a retention purge of it is filed (``sync.sweeps``)."""
    query = union(
        select(ProofImage.tracking_no).where(ProofImage.sha256 == digest),
        select(RejectedImage.tracking_no).where(RejectedImage.sha256 == digest),
    )
    return sorted(session.scalars(query))


def get_blob(*, session: Session, digest: str) -> Blob:
    blob = session.get(Blob, check_digest(digest))
    if blob is None:
        raise blob_not_found(digest)
    return blob


def blob_not_found(digest: str) -> NotFound:
    """What ``get_blob`` answers when no image has ``digest``."""
    return NotFound(f"no blob {digest}", code="blob_not_found")


def read_image(store: BlobStore, blob: Blob) -> bytes:
    """The bytes of an image not purged, as uploaded. A file gone from the store is a
    404 ``blob_bytes_missing``; one whose bytes no longer are the image its digest
    names (changed or replaced in the store) a 409 ``blob_bytes_altered``, logged: it
    is never served under the digest, as if it were what the PDA uploaded. Either is
    mended by uploading the image again."""
    try:
        return store.read(blob.sha256, size=blob.size_bytes)
    except FileNotFoundError:
        log.error("blob %s is recorded but its file is missing from the store", blob.sha256)
        raise NotFound(
            f"the bytes of blob {blob.sha256} are missing; upload the image again",
            code="blob_bytes_missing",
        ) from None
    except BytesAltered as altered:
        log.error("%s: altered in the store, not served", altered)
        raise Conflict(
            f"the file stored for blob {blob.sha256} is no longer the image uploaded under "
            "that digest (changed or replaced in the store): it is not served; upload the "
            "image again",
            code="blob_bytes_altered",
        ) from None


class Integrity(enum.StrEnum):
    """Whether the bytes stored for an image still are the image its digest names."""

    INTACT = "intact"  # its file hashes to its digest
    ALTERED = "altered"  # changed or replaced in the store since it was verified
    MISSING = "missing"  # no bytes held: never uploaded, or its file gone from the store
    PURGED = "purged"  # deleted by the retention purge (the record stays)


def stored_integrity(store: BlobStore, blob: Blob | None) -> Integrity:
    """``Integrity`` of ``blob`` (None: never uploaded), its file hashed a chunk at a time
    (``BlobStore.verify``), as serving it checks it. A store that cannot be read raises
    ``Unavailable``, as a read of the image does."""
    if blob is None:
        return Integrity.MISSING
    if blob.purged_at is not None:
        return Integrity.PURGED
    try:
        store.verify(blob.sha256, size=blob.size_bytes)
    except FileNotFoundError:
        return Integrity.MISSING
    except BytesAltered:
        return Integrity.ALTERED
    return Integrity.INTACT


def ensure_not_purged(blob: Blob) -> Blob:
    """Refuse to serve an image the retention purge deleted, saying when."""
    if blob.purged_at is not None:
        raise Gone(
            f"blob {blob.sha256} was purged on {blob.purged_at.isoformat(timespec='seconds')} "
            "under the proof-image retention policy; its bytes no longer exist",
            code="blob_purged",
        )
    return blob
