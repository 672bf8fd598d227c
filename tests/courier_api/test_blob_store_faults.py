"""A proof image uploaded while the blob store cannot write (DESIGN.md: nothing from the
field is lost; a blob still missing at handover is a flag).

The store fails in three ways at the OS boundary: a file where the blob directory
should be (every write is ENOTDIR), a full disk (ENOSPC when the image is synced), no
permission (EACCES creating the file). Each time the upload is a 503
``blob_store_unavailable`` with ``Retry-After`` and nothing is recorded; the delivery
and its proof stay, the image is reported missing (``pod_blob_missing`` at once,
``blob_missing_at_handover`` by the scheduled job after the handover), and the same
upload succeeds once the store is back, which closes both flags.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from courier_api.scheduler import JOB_SPECS
from models import Blob, BlobUpload, Flag, FlagStatus, ScanEvent, ServiceClass
from sync import sweeps
from tests import factories
from tests.conftest import Auth, World
from tests.courier_api.test_blobs_api import digest, image_bytes, put
from tests.courier_api.test_shifts_api import Courier

Restore = Callable[[], None]


def file_where_the_directory_should_be(app: Flask, monkeypatch: pytest.MonkeyPatch) -> Restore:
    blob_dir = Path(app.config["BLOB_DIR"])
    blob_dir.parent.mkdir(parents=True, exist_ok=True)
    blob_dir.write_bytes(b"")  # mkdir under it: ENOTDIR
    return blob_dir.unlink


def disk_full(app: Flask, monkeypatch: pytest.MonkeyPatch) -> Restore:
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("sync.blobs.os.fsync", fsync)
    return monkeypatch.undo


def no_permission(app: Flask, monkeypatch: pytest.MonkeyPatch) -> Restore:
    def mkstemp(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), kwargs.get("dir"))

    monkeypatch.setattr("sync.blobs.tempfile.mkstemp", mkstemp)
    return monkeypatch.undo


def flag(session: Session, kind: str) -> Flag:
    session.expire_all()
    return session.scalars(select(Flag).where(Flag.kind == kind)).one()


@pytest.mark.parametrize("fault", [file_where_the_directory_should_be, disk_full, no_permission])
def test_an_upload_the_store_cannot_write_is_503_the_proof_stays_and_a_retry_succeeds(
    app: Flask,
    client: FlaskClient,
    session: Session,
    world: World,
    auth: Auth,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fault: Callable[[Flask, pytest.MonkeyPatch], Restore],
) -> None:
    data = image_bytes()
    photo = digest(data)
    parcel = factories.parcel(session, world.station, service_class=ServiceClass.PARCEL)
    session.commit()
    pda = Courier(client, auth, "courier1", "PDA-0001")
    shift = pda.open(first_seq=1)
    pod = {"recipient_name": "Wang", "photo_sha256": photo}
    receipt = pda.push(
        [pda.event(parcel.tracking_no), pda.event(parcel.tracking_no, "delivered", pod=pod)]
    )
    assert [f["kind"] for f in receipt["flags_raised"]] == ["pod_blob_missing"]

    restore = fault(app, monkeypatch)
    response = put(client, pda.headers, data)

    assert response.status_code == 503
    body = response.get_json()
    assert body["code"] == "blob_store_unavailable"
    assert body["status"] == 503 and "again later" in body["message"]
    assert int(response.headers["Retry-After"]) > 0
    assert session.get(Blob, photo) is None  # nothing recorded
    blob_dir = Path(app.config["BLOB_DIR"])
    if blob_dir.is_dir():
        assert [p for p in blob_dir.rglob("*") if p.is_file()] == []  # no half-written file
    assert "blob_store_unavailable" in caplog.text  # the operators hear of it

    # The delivery and its proof are kept, and the image is reported missing.
    delivery = session.scalars(select(ScanEvent).where(ScanEvent.type == "delivered")).one()
    auditor = auth.headers("auditor1")
    proofs = client.get(f"/api/v1/proofs/{delivery.id}", headers=auditor).get_json()
    assert proofs["pod"]["photo_sha256"] == photo
    assert flag(session, "pod_blob_missing").status == FlagStatus.OPEN
    closed = pda.close(shift["id"])
    assert closed.status_code == 200, closed.get_json()
    closed_at = dt.datetime.fromisoformat(closed.get_json()["closed_at"])
    job = JOB_SPECS[sweeps.BLOB_MISSING_AT_HANDOVER].build(app.config)
    after_grace = closed_at + dt.timedelta(minutes=app.config["BLOB_MISSING_GRACE_MINUTES"] + 1)
    assert job(session=session, now=after_grace)["missing_blobs"] == 1
    at_handover = flag(session, sweeps.BLOB_MISSING_AT_HANDOVER)
    assert at_handover.status == FlagStatus.OPEN
    assert at_handover.evidence == {"blobs": [photo], "event_ids": [delivery.id]}

    restore()  # the store is back: the PDA's retry succeeds
    retried = put(client, pda.headers, data)

    assert retried.status_code == 201, retried.get_json()
    assert client.get(f"/api/v1/blobs/{photo}", headers=auditor).get_data() == data
    assert flag(session, "pod_blob_missing").status == FlagStatus.CLOSED
    done = job(session=session, now=after_grace + dt.timedelta(minutes=15))
    assert done["missing_blobs"] == 0 and done["flags_closed"] == [at_handover.id]
    assert flag(session, sweeps.BLOB_MISSING_AT_HANDOVER).status == FlagStatus.CLOSED


@pytest.mark.parametrize("fault", [disk_full, no_permission])
def test_with_the_store_unable_to_write_another_stations_image_answers_as_a_new_one(
    app: Flask,
    client: FlaskClient,
    session: Session,
    world: World,
    auth: Auth,
    monkeypatch: pytest.MonkeyPatch,
    fault: Callable[[Flask, pytest.MonkeyPatch], Restore],
) -> None:
    """Uploading another station's image answers as uploading a new one (SECURITY.md
    threat 3), but its bytes, held, were only read again, never written: with the
    store's disk full a courier of another station got 201 for a photo held there and
    503 for one nobody holds, and so learnt which exist. Answered as new, it is written
    as a new one is: a 503 alike, nothing recorded, and a 201 once the store is back."""
    factories.user(session, "courier7", "courier", world.other_station)
    session.commit()
    theirs, nobodys = image_bytes(size=(8, 6)), image_bytes(size=(9, 6))
    assert put(client, auth.headers("courier1", "PDA-0001"), theirs).status_code == 201
    prober = auth.headers("courier7", "PDA-0002")

    restore = fault(app, monkeypatch)
    answers = {
        name: put(client, prober, data) for name, data in [("held", theirs), ("new", nobodys)]
    }
    restore()

    assert {name: (a.status_code, a.get_json().get("code")) for name, a in answers.items()} == {
        name: (503, "blob_store_unavailable") for name in answers
    }
    session.expire_all()
    assert session.scalar(select(func.count()).where(BlobUpload.sha256 == digest(theirs))) == 1
    assert put(client, prober, theirs).status_code == 201  # the store back: as new still
    assert put(client, prober, theirs).status_code == 200  # theirs now too


def test_an_image_the_store_cannot_read_is_503_not_500(
    app: Flask,
    client: FlaskClient,
    auth: Auth,
    world: World,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = image_bytes()
    courier = auth.headers("courier1", "PDA-0001")
    assert put(client, courier, data).status_code == 201

    def open_file(self: Path, *args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(self))

    monkeypatch.setattr(Path, "open", open_file)
    response = client.get(f"/api/v1/blobs/{digest(data)}", headers=courier)

    assert response.status_code == 503
    assert response.get_json()["code"] == "blob_store_unavailable"
    assert response.headers["Retry-After"]


def test_a_stored_image_and_its_new_directories_are_synced_before_the_upload_is_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 201 lets the PDA delete its image. The image's bytes are synced, but the
    rename that gives the file its name, and the directories made for it, are entries
    of directories: until each directory is synced, a power cut may undo them, and the
    blob's row would point at no file. Every directory that gained an entry is synced."""
    from sync.blobs import FileBlobStore

    synced: list[tuple[int, int]] = []  # (device, inode) of each directory synced
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            synced.append((info.st_dev, info.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    root = tmp_path / "blobs"
    root.mkdir()
    store = FileBlobStore(root)
    data = image_bytes()
    store.put(digest(data), data)
    target = store.path(digest(data))
    assert target.read_bytes() == data

    def key(path: Path) -> tuple[int, int]:
        info = path.stat()
        return info.st_dev, info.st_ino

    # The file's directory, and the two made for it under the root (root/ab/cd/).
    assert {key(target.parent), key(target.parent.parent), key(root)} <= set(synced)
