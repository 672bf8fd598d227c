"""PUT/GET /blobs/<sha256>: verified digests, real images only, idempotent, access by role."""

import datetime as dt
import hashlib
import io
import logging
import random
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import Connection, event, func, select
from sqlalchemy.exc import OperationalError

from courier_api.app import REQUEST_ATTEMPTS
from models import (
    AuditEntry,
    AuditEntryParcel,
    Blob,
    BlobUpload,
    Flag,
    FlagStatus,
    RejectedImage,
    User,
)
from sync import audit, blobs
from sync.blobs import FileBlobStore
from sync.errors import RateLimited
from tests import factories
from tests.conftest import Auth, World
from tests.courier_api.test_transaction_conflicts import aborted, assert_transaction_conflict
from tests.courier_api.test_web_pages import signed_in


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(client: FlaskClient, headers: dict[str, str], data: bytes, name: str | None = None) -> Any:
    return client.put(
        f"/api/v1/blobs/{name or digest(data)}",
        data=data,
        content_type="application/octet-stream",
        headers=headers,
    )


@pytest.fixture
def courier(auth: Auth, world: World) -> dict[str, str]:
    return auth.headers("courier1", "PDA-0001")


@pytest.mark.parametrize(
    ("fmt", "media_type"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_an_image_is_stored_once_under_its_digest(
    app: Flask, client: FlaskClient, courier: dict[str, str], fmt: str, media_type: str
) -> None:
    data = image_bytes(fmt)
    first = put(client, courier, data)
    assert first.status_code == 201
    assert first.get_json() | {"uploaded_at": None} == {
        "sha256": digest(data),
        "media_type": media_type,
        "size_bytes": len(data),
        "width": 8,
        "height": 6,
        "uploaded_at": None,
    }
    again = put(client, courier, data)
    assert again.status_code == 200
    assert again.get_json() == first.get_json()
    assert FileBlobStore(app.config["BLOB_DIR"]).read(digest(data), size=len(data)) == data


def test_bytes_that_do_not_match_the_digest_are_refused(
    client: FlaskClient, courier: dict[str, str]
) -> None:
    response = put(client, courier, image_bytes(), name=digest(b"something else"))
    assert response.status_code == 422
    assert response.get_json()["code"] == "digest_mismatch"


@pytest.mark.parametrize(
    "data",
    [b"not an image at all", image_bytes()[:40], image_bytes("GIF"), b""],
    ids=["text", "truncated-png", "gif", "empty"],
)
def test_anything_but_a_whole_png_jpeg_or_webp_is_refused(
    client: FlaskClient, courier: dict[str, str], data: bytes
) -> None:
    response = put(client, courier, data)
    assert response.status_code == 422
    body = response.get_json()
    assert body["code"] in {"not_an_image", "unsupported_image_type"}
    assert list(body["errors"]) == ["body"]  # the image sent, as a too large one is named


@pytest.mark.parametrize("name", ["abc", "A" * 64, "g" * 64])
def test_a_name_that_is_not_a_sha256_is_422(
    client: FlaskClient, courier: dict[str, str], name: str
) -> None:
    response = put(client, courier, image_bytes(), name=name)
    assert response.status_code == 422
    assert response.get_json()["code"] == "invalid_digest"
    read = client.get(f"/api/v1/blobs/{name}", headers=courier)  # a 422 documented too
    assert read.status_code == 422 and read.get_json()["code"] == "invalid_digest"


def test_an_image_over_the_blob_limit_is_413_with_the_limit(
    app_with: Callable[..., Flask], world: World
) -> None:
    client = app_with(MAX_BLOB_BYTES=100).test_client()
    response = put(
        client, Auth(client).headers("courier1", "PDA-0001"), image_bytes(size=(64, 64))
    )
    assert response.status_code == 413
    assert "limit is 100" in response.get_json()["message"]
    assert response.get_json()["limit"] == {"max": 100, "unit": "bytes"}


def test_an_image_over_the_request_limit_too_is_413_with_the_image_limit(
    app_with: Callable[..., Flask], world: World
) -> None:
    """An image larger than MAX_REQUEST_BYTES as well as MAX_BLOB_BYTES named the request
    body's limit: a PDA that shrank the photo to fit it uploaded it again over a weak
    signal to learn the image's, lower. It is refused by the image's limit at once (by
    its length, unread)."""
    client = app_with(MAX_BLOB_BYTES=100, MAX_CONTENT_LENGTH=1000).test_client()
    buffer = io.BytesIO()  # a photo's noise: no PNG makes it small
    Image.frombytes("RGB", (32, 32), random.Random(7).randbytes(3072)).save(buffer, format="PNG")
    data = buffer.getvalue()
    assert len(data) > 1000
    response = put(client, Auth(client).headers("courier1", "PDA-0001"), data)
    assert response.status_code == 413
    assert response.get_json()["limit"] == {"max": 100, "unit": "bytes"}


def test_who_may_read_an_image(client: FlaskClient, auth: Auth, courier: dict[str, str]) -> None:
    data = image_bytes()
    put(client, courier, data)
    url = f"/api/v1/blobs/{digest(data)}"
    for username in ("admin", "auditor1", "manager1"):
        response = client.get(url, headers=auth.headers(username))
        assert response.status_code == 200, username
        assert response.data == data and response.mimetype == "image/png"
    assert client.get(url, headers=courier).status_code == 200  # the uploader
    assert client.get(url, headers=auth.headers("manager2")).status_code == 404
    assert client.get(url, headers=auth.headers("app1")).status_code == 403
    assert client.get(url).status_code == 401


def test_an_unknown_image_is_404(client: FlaskClient, auth: Auth, world: World) -> None:
    response = client.get(f"/api/v1/blobs/{'0' * 64}", headers=auth.headers("auditor1"))
    assert response.status_code == 404
    assert response.get_json()["code"] == "blob_not_found"


def test_auditors_cannot_upload(client: FlaskClient, auth: Auth, world: World) -> None:
    assert put(client, auth.headers("auditor1"), image_bytes()).status_code == 403


def test_a_lost_file_is_restored_by_uploading_again(
    app: Flask,
    client: FlaskClient,
    session: Any,
    courier: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Put back, on the audit log and in the server's log at WARNING, as a file found
    altered is: a file gone from the store is lost data, or deleted by someone."""
    data = image_bytes()
    put(client, courier, data)
    store = FileBlobStore(app.config["BLOB_DIR"])
    store.path(digest(data)).unlink()
    with caplog.at_level(logging.WARNING, logger="sync.blobs"):
        assert put(client, courier, data).status_code == 200
    assert any(
        r.levelno == logging.WARNING
        and digest(data) in r.getMessage()
        and "missing" in r.getMessage()
        for r in caplog.records
    )
    assert store.read(digest(data), size=len(data)) == data
    found = session.scalars(
        select(AuditEntry.details).where(AuditEntry.action == "blob_bytes_restored")
    ).all()
    assert [details["found"] for details in found] == ["missing"]


@pytest.mark.parametrize("altered", ["replaced", "same_length"])
def test_a_proof_photo_altered_on_disk_is_not_served_as_the_genuine_one(
    app: Flask,
    client: FlaskClient,
    auth: Auth,
    session: Any,
    courier: dict[str, str],
    caplog: pytest.LogCaptureFixture,
    altered: str,
) -> None:
    """The auditor checks the photo of a proof; its file in BLOB_DIR was replaced by
    another image, or had bytes changed in place. Content-addressed, it is checked on
    every read: a 409 ``blob_bytes_altered``, logged, never the other bytes under the
    digest's ETag, and no ``blob_read`` on record (nothing went out). Uploading the
    genuine image again puts it back, and the audit log keeps that the file had been
    altered: the repair does not erase the only trace of the tampering."""
    genuine = image_bytes()
    name = digest(genuine)
    assert put(client, courier, genuine).status_code == 201
    path = FileBlobStore(app.config["BLOB_DIR"]).path(name)
    if altered == "replaced":
        buffer = io.BytesIO()
        Image.new("RGB", (80, 60), (30, 200, 30)).save(buffer, format="PNG")
        path.write_bytes(buffer.getvalue())
    else:
        path.write_bytes(genuine[:-1] + bytes([genuine[-1] ^ 1]))
    url = f"/api/v1/blobs/{name}"
    auditor = auth.headers("auditor1")
    with caplog.at_level(logging.ERROR, logger="sync.blobs"):
        response = client.get(url, headers=auditor)
    assert (response.status_code, response.get_json()["code"]) == (409, "blob_bytes_altered")
    assert "ETag" not in response.headers
    assert any(name in r.getMessage() and "altered" in r.getMessage() for r in caplog.records)
    assert session.scalar(select(AuditEntry.id).where(AuditEntry.action == "blob_read")) is None
    assert put(client, courier, genuine).status_code == 200
    mended = client.get(url, headers=auditor)
    assert (mended.status_code, mended.data) == (200, genuine)
    [restored] = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "blob_bytes_restored")
    ).all()
    assert (restored.subject_type, restored.subject_key) == ("blob", name)
    assert restored.details["found"] == "altered" and restored.actor_id is not None
    # Uploaded again while intact: nothing to restore, nothing more on the log.
    assert put(client, courier, genuine).status_code == 200
    assert (
        session.scalar(select(func.count()).where(AuditEntry.action == "blob_bytes_restored")) == 1
    )


@pytest.mark.parametrize("found", ["missing", "altered"])
def test_bytes_restored_by_an_upload_postgresql_aborts_are_on_record_once(
    app: Flask,
    client: FlaskClient,
    session: Any,
    connection: Connection,
    courier: dict[str, str],
    found: str,
) -> None:
    """An upload puts the genuine bytes back, then PostgreSQL aborts it (at its audit
    entry, the first write) and the server runs it again. The bytes were put back
    outside the transaction: the second run found the file whole and kept no
    ``blob_bytes_restored``, erasing the only trace that the file had been altered (or
    lost). The finding of the aborted run is carried to the run after it: on record
    once."""
    genuine = image_bytes()
    name = digest(genuine)
    assert put(client, courier, genuine).status_code == 201
    path = FileBlobStore(app.config["BLOB_DIR"]).path(name)
    if found == "missing":
        path.unlink()
    else:
        path.write_bytes(genuine[:-1] + bytes([genuine[-1] ^ 1]))
    with aborted(connection, "deadlock_detected", runs=1, into="audit_entry") as failed:
        response = put(client, courier, genuine)
    assert len(failed) == 1
    assert response.status_code == 200, response.get_json()
    assert path.read_bytes() == genuine
    restored = session.scalars(
        select(AuditEntry.details).where(AuditEntry.action == "blob_bytes_restored")
    ).all()
    assert [details["found"] for details in restored] == [found]
    # Uploaded again, whole: nothing more on record (no finding carried to another request).
    assert put(client, courier, genuine).status_code == 200
    assert (
        session.scalar(select(func.count()).where(AuditEntry.action == "blob_bytes_restored")) == 1
    )


def alter(path: Path, genuine: bytes, found: str) -> None:
    """The stored file of ``genuine`` lost (``missing``) or one bit changed (``altered``)."""
    if found == "missing":
        path.unlink()
    else:
        path.write_bytes(genuine[:-1] + bytes([genuine[-1] ^ 1]))


@pytest.mark.parametrize("found", ["missing", "altered"])
@pytest.mark.parametrize("aborted_runs", [REQUEST_ATTEMPTS - 1, REQUEST_ATTEMPTS])
def test_bytes_restored_by_an_upload_postgresql_aborts_every_time_are_on_record_once(
    app: Flask,
    client: FlaskClient,
    session: Any,
    connection: Connection,
    world: World,
    courier: dict[str, str],
    found: str,
    aborted_runs: int,
) -> None:
    """Every run of the upload PostgreSQL aborts, at its audit entry: the server gives
    up, a 503 ``transaction_conflict``, with the genuine bytes put back by the first run
    (outside the transaction). Nothing of the request's transaction is kept, yet what its
    runs found must be: the upload sent again finds the file whole, and the tampering
    (or the loss) would be on record nowhere. Written in a transaction of its own when
    the server gives up: once, as a run that succeeds after aborted ones writes it once
    (with its upload)."""
    genuine = image_bytes()
    name = digest(genuine)
    assert put(client, courier, genuine).status_code == 201
    path = FileBlobStore(app.config["BLOB_DIR"]).path(name)
    alter(path, genuine, found)
    with aborted(connection, "deadlock_detected", runs=aborted_runs, into="audit_entry") as failed:
        response = put(client, courier, genuine)
    assert len(failed) == aborted_runs
    if aborted_runs == REQUEST_ATTEMPTS:
        assert_transaction_conflict(response)
    else:
        assert response.status_code == 200, response.get_json()
    assert path.read_bytes() == genuine
    restored = AuditEntry.action == "blob_bytes_restored"
    [entry] = session.scalars(select(AuditEntry).where(restored)).all()
    uploader = session.scalar(select(User.id).where(User.username == "courier1"))
    assert (entry.actor_id, entry.subject_key) == (uploader, name)
    assert entry.details == {"found": found, "station_id": world.station.id}
    assert audit.verify(session=session).ok
    # Sent again, the file whole: nothing more on record.
    assert put(client, courier, genuine).status_code == 200
    assert session.scalar(select(func.count()).where(restored)) == 1


def test_bytes_restored_by_an_upload_the_database_then_fails_are_on_record(
    app: Flask,
    client: FlaskClient,
    session: Any,
    connection: Connection,
    courier: dict[str, str],
) -> None:
    """An error that is no conflict (the connection lost, a busy SQLite file) is not run
    again: the upload's one run is a 503 ``database_unavailable`` after it put altered
    bytes back. What it found is written apart all the same."""
    genuine = image_bytes()
    assert put(client, courier, genuine).status_code == 201
    path = FileBlobStore(app.config["BLOB_DIR"]).path(digest(genuine))
    alter(path, genuine, "altered")
    failed: list[str] = []

    def lost(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("INSERT INTO audit_entry ") and not failed:
            failed.append(statement)
            raise OperationalError(statement, {}, Exception("server closed the connection"))

    event.listen(connection, "before_cursor_execute", lost)
    try:
        response = put(client, courier, genuine)
    finally:
        event.remove(connection, "before_cursor_execute", lost)
    assert len(failed) == 1
    assert (response.status_code, response.get_json()["code"]) == (503, "database_unavailable")
    restored = AuditEntry.action == "blob_bytes_restored"
    [details] = session.scalars(select(AuditEntry.details).where(restored)).all()
    assert details["found"] == "altered"


def test_bytes_restored_that_cannot_be_recorded_at_all_are_in_the_server_log(
    app: Flask,
    client: FlaskClient,
    session: Any,
    connection: Connection,
    courier: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every run aborted, and the write apart too: the finding is logged at ERROR with
    the image it is about, the one trace left of it."""
    genuine = image_bytes()
    name = digest(genuine)
    assert put(client, courier, genuine).status_code == 201
    alter(FileBlobStore(app.config["BLOB_DIR"]).path(name), genuine, "altered")
    with (
        caplog.at_level(logging.ERROR, logger="courier_api.database"),
        aborted(connection, "deadlock_detected", into="audit_entry") as failed,
    ):
        response = put(client, courier, genuine)
    assert len(failed) == REQUEST_ATTEMPTS + 1  # the runs, then the write apart
    assert_transaction_conflict(response)
    assert any(
        r.levelno == logging.ERROR and name in r.getMessage() and "altered" in r.getMessage()
        for r in caplog.records
    )
    restored = AuditEntry.action == "blob_bytes_restored"
    assert session.scalar(select(func.count()).where(restored)) == 0


def test_bytes_restored_are_carried_to_the_runs_of_their_own_request_alone(
    app: Flask, client: FlaskClient, session: Any, courier: dict[str, str]
) -> None:
    """Two uploads under one app context (as a test or a CLI may hold it): the finding
    of the first, which put altered bytes back, is not the second's, which finds them
    whole. One ``blob_bytes_restored``."""
    genuine = image_bytes()
    assert put(client, courier, genuine).status_code == 201
    path = FileBlobStore(app.config["BLOB_DIR"]).path(digest(genuine))
    path.write_bytes(genuine[:-1] + bytes([genuine[-1] ^ 1]))
    with app.app_context():
        assert put(client, courier, genuine).status_code == 200
        assert put(client, courier, genuine).status_code == 200
    restored = AuditEntry.action == "blob_bytes_restored"
    assert session.scalar(select(func.count()).where(restored)) == 1


def test_the_same_image_uploaded_at_two_stations_is_readable_at_both(
    client: FlaskClient, auth: Auth, session: Any, world: World, courier: dict[str, str]
) -> None:
    factories.user(session, "courier7", "courier", world.other_station)
    session.commit()
    elsewhere = auth.headers("courier7", "PDA-0002")
    data = image_bytes()
    assert put(client, courier, data).status_code == 201
    assert put(client, elsewhere, data).status_code == 201  # stored once; new to them
    url = f"/api/v1/blobs/{digest(data)}"
    for headers in (courier, elsewhere, auth.headers("manager1"), auth.headers("manager2")):
        assert client.get(url, headers=headers).status_code == 200


def test_uploading_a_proof_image_closes_the_flag_of_the_parcel_waiting_for_it(
    client: FlaskClient, session: Any, world: World, courier: dict[str, str]
) -> None:
    parcel = factories.parcel(session, world.station)
    session.commit()
    data = image_bytes()
    when = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)
    events = [
        factories.event(1, parcel.tracking_no, occurred_at=when),
        factories.event(
            2,
            parcel.tracking_no,
            "delivered",
            occurred_at=when + dt.timedelta(minutes=5),
            pod={"signature_sha256": digest(data)},
        ),
    ]
    receipt = client.post(
        "/api/v1/sync/push", json=factories.push_body("PDA-0001", events), headers=courier
    ).get_json()
    assert [f["kind"] for f in receipt["flags_raised"]] == ["pod_blob_missing"]
    assert put(client, courier, data).status_code == 201
    flag = session.scalars(select(Flag).where(Flag.kind == "pod_blob_missing")).one()
    session.refresh(flag)
    assert flag.status == FlagStatus.CLOSED


def test_an_auditors_read_of_a_proof_image_is_in_its_parcels_history(
    app: Flask,
    client: FlaskClient,
    auth: Auth,
    session: Any,
    world: World,
    courier: dict[str, str],
) -> None:
    """Parcels a and b were delivered with the same signature (one image named by both
    proofs), c with a photo of its own. An auditor settling a dispute over a looks at
    its signature, through the API and the proof page's image: each read is on record
    (``blob_read``), but was filed under no parcel, so ``GET /audit?tracking_no=a`` did
    not say who had looked at it. Both are in a's and b's histories now, not in c's; a
    manager's read is on record nowhere, as before."""
    a, b, c = (factories.parcel(session, world.station).tracking_no for _ in range(3))
    session.commit()
    signature, photo = image_bytes(), image_bytes(size=(9, 7))
    when = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    events = []
    for seq, (number, pod) in enumerate(
        [
            (a, {"signature_sha256": digest(signature)}),
            (b, {"signature_sha256": digest(signature)}),
            (c, {"photo_sha256": digest(photo)}),
        ]
    ):
        at = when + dt.timedelta(minutes=seq)
        events += [
            factories.event(2 * seq + 1, number, occurred_at=at),
            factories.event(
                2 * seq + 2,
                number,
                "delivered",
                occurred_at=at + dt.timedelta(seconds=30),
                pod=pod,
            ),
        ]
    pushed = client.post(
        "/api/v1/sync/push", json=factories.push_body("PDA-0001", events), headers=courier
    )
    assert pushed.status_code == 200, pushed.get_json()
    assert put(client, courier, signature).status_code == 201
    assert put(client, courier, photo).status_code == 201
    name = digest(signature)
    auditor = auth.headers("auditor1")
    assert client.get(f"/api/v1/blobs/{name}", headers=auditor).status_code == 200
    assert client.get(f"/api/v1/blobs/{name}", headers=auth.headers("manager1")).status_code == 200
    pages = signed_in(app, "auditor1")
    assert pages.client.get(f"/web/images/{name}").status_code == 200

    def reads_in_history(number: str) -> list[tuple[str, int | None]]:
        response = client.get(
            "/api/v1/audit", query_string={"tracking_no": number}, headers=auditor
        )
        assert response.status_code == 200, response.get_json()
        return [
            (e["subject_key"], e["actor_id"])
            for e in response.get_json()["items"]
            if e["action"] == "blob_read"
        ]

    auditor_id = session.scalar(select(User.id).where(User.username == "auditor1"))
    assert reads_in_history(a) == [(name, auditor_id)] * 2
    assert reads_in_history(b) == [(name, auditor_id)] * 2
    assert reads_in_history(c) == []


def test_an_auditors_read_of_an_image_a_rejected_drop_names_is_in_its_parcels_history(
    client: FlaskClient, auth: Auth, session: Any, world: World, courier: dict[str, str]
) -> None:
    """A PDA sent a drop into a locker with a photo of the compartment, but without the
    locker's id: the server refused it (kept in quarantine, listed on the parcel's proof
    and shift page), and the photo was uploaded. An auditor settling "never delivered"
    looks at that photo: the read is on record (``blob_read``) but was filed under no
    parcel, as no accepted proof names the image, so ``GET /audit?tracking_no=`` did not
    say who had looked at the only evidence of the drop. It is in the parcel's history
    now, and in no other's; an image named by a rejected event without a parcel number
    files its read under none."""
    a, b = (factories.parcel(session, world.station).tracking_no for _ in range(2))
    session.commit()
    photo, other = image_bytes(), image_bytes(size=(9, 7))
    when = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    refused_drop = factories.event(
        2, a.lower(), "delivered_to_locker", occurred_at=when, pod={"photo_sha256": digest(photo)}
    )
    unnamed = factories.event(
        3, "", "delivered", occurred_at=when, pod={"photo_sha256": digest(other)}
    )
    events = [
        factories.event(1, a, occurred_at=when - dt.timedelta(minutes=1)),
        refused_drop,
        unnamed,
    ]
    pushed = client.post(
        "/api/v1/sync/push", json=factories.push_body("PDA-0001", events), headers=courier
    )
    assert pushed.status_code == 200, pushed.get_json()
    statuses = [r["status"] for r in pushed.get_json()["results"]]
    assert statuses == ["applied", "rejected", "rejected"], pushed.get_json()
    assert put(client, courier, photo).status_code == 201
    assert put(client, courier, other).status_code == 201
    auditor = auth.headers("auditor1")
    for image in (photo, other):
        assert client.get(f"/api/v1/blobs/{digest(image)}", headers=auditor).status_code == 200

    def reads_in_history(number: str) -> list[str]:
        response = client.get(
            "/api/v1/audit", query_string={"tracking_no": number}, headers=auditor
        )
        assert response.status_code == 200, response.get_json()
        return [
            e["subject_key"] for e in response.get_json()["items"] if e["action"] == "blob_read"
        ]

    assert reads_in_history(a) == [digest(photo)]
    assert reads_in_history(b) == []
    filed = session.execute(
        select(AuditEntry.subject_key, AuditEntryParcel.tracking_no)
        .outerjoin(AuditEntryParcel, AuditEntryParcel.entry_id == AuditEntry.id)
        .where(AuditEntry.action == "blob_read")
    ).all()
    assert sorted(filed) == sorted([(digest(photo), a), (digest(other), None)])


def test_a_push_of_more_rejected_drops_naming_photos_than_sqlite_takes_variables_is_stored(
    request: pytest.FixtureRequest,
    client: FlaskClient,
    session: Any,
    connection: Connection,
    world: World,
    courier: dict[str, str],
) -> None:
    """A PDA whose app sent every locker drop without its locker's id pushed 1,000 of
    them after a day offline, each with its photo: refused, kept in quarantine. Their
    ids were read back by their payloads' hashes in one ``IN`` list of 1,000, more than
    the SQLite before 3.32 that many systems ship takes (999 variables), so the whole
    push failed and the PDA could never deliver its day. Now read in one parameter, the
    rejections and their photos are kept (``rejected_image``), each under its parcel."""
    if connection.dialect.name == "sqlite":  # as a SQLite built before 3.32 allows
        raw = connection.connection.driver_connection
        before = raw.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        # The pooled connection serves the next tests: given back its bound after this one.
        request.addfinalizer(lambda: raw.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, before))
    a = factories.parcel(session, world.station).tracking_no
    session.commit()
    when = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    drops = [
        factories.event(
            seq, a, "delivered_to_locker", occurred_at=when, pod={"photo_sha256": f"{seq:064x}"}
        )
        for seq in range(1, 1001)
    ]
    pushed = client.post(
        "/api/v1/sync/push", json=factories.push_body("PDA-0001", drops), headers=courier
    )
    assert pushed.status_code == 200, pushed.get_json()
    assert {r["status"] for r in pushed.get_json()["results"]} == {"rejected"}
    kept = session.execute(select(RejectedImage.sha256, RejectedImage.tracking_no)).all()
    assert sorted(kept) == [(f"{seq:064x}", a) for seq in range(1, 1001)]


def test_uploading_another_stations_image_answers_as_uploading_a_new_one(
    client: FlaskClient, auth: Auth, session: Any, world: World, courier: dict[str, str]
) -> None:
    """For a courier or a manager another station's image does not exist (SECURITY.md
    threat 3): uploading its bytes answers what uploading an image nobody holds answers
    (201, uploaded now), not 200 "already stored" with the time the other station
    stored it. Uploading an image one may already read is a 200, as before."""
    factories.user(session, "courier7", "courier", world.other_station)
    session.commit()
    theirs = image_bytes(size=(8, 6))
    assert put(client, courier, theirs).status_code == 201
    callers = {  # the manager first: once they upload it, it is their station's
        "manager2": auth.headers("manager2"),
        "courier7": auth.headers("courier7", "PDA-0002"),
    }
    for width, (username, headers) in enumerate(callers.items(), start=9):
        time.sleep(0.01)
        before = dt.datetime.now(dt.UTC)
        answers = [put(client, headers, data) for data in (theirs, image_bytes(size=(width, 6)))]
        assert [a.status_code for a in answers] == [201, 201], username
        for answer in answers:
            assert dt.datetime.fromisoformat(answer.get_json()["uploaded_at"]) >= before, username
        assert put(client, headers, theirs).status_code == 200, username  # theirs now
    assert put(client, courier, theirs).status_code == 200
    assert put(client, auth.headers("manager1"), theirs).status_code == 200  # its station's


def test_an_account_at_its_bound_is_refused_another_stations_image_as_a_new_one(
    client: FlaskClient,
    auth: Auth,
    session: Any,
    world: World,
    courier: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An image the server held cost nothing against the uploader's bound on images no
    event names, whoever held it: a courier of another station at the bound (a few
    thousand tiny PNGs of their own) was refused 429 an image nobody holds and stored
    another station's, 201, so the bound told them which photos exist there, which the
    201 answered for both hides (SECURITY.md threat 3). An image new to the account is
    counted as new, wherever its bytes already are; one it uploaded itself is held and
    costs nothing (a PDA's retry)."""
    factories.user(session, "courier7", "courier", world.other_station)
    session.commit()
    monkeypatch.setattr(blobs, "UNNAMED_IMAGES_PER_UPLOADER", 1)
    theirs, mine, nobodys = (image_bytes(size=(8, 6 + n)) for n in range(3))
    assert put(client, courier, theirs).status_code == 201
    prober = auth.headers("courier7", "PDA-0002")
    assert put(client, prober, mine).status_code == 201  # at the bound now
    answers = {
        name: put(client, prober, data) for name, data in [("held", theirs), ("new", nobodys)]
    }
    assert {name: (a.status_code, a.get_json().get("code")) for name, a in answers.items()} == {
        name: (429, "too_many_unnamed_images") for name in answers
    }
    assert session.scalar(select(func.count()).where(BlobUpload.sha256 == digest(theirs))) == 1
    assert put(client, prober, mine).status_code == 200  # its own, held: costs nothing


def test_images_no_event_names_are_bounded_per_account_and_a_push_naming_them_makes_room(
    client: FlaskClient,
    auth: Auth,
    world: World,
    courier: dict[str, str],
    session: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stolen PDA (or a script with a courier's token) uploaded image after image that
    no delivery named, each stored for the retention's year: 20 random 3 MiB PNGs were
    60 MiB on disk in seconds, without end, and a full store refuses every station's
    proofs. An account's images no event names are bounded per day
    (``UNNAMED_BYTES_PER_UPLOADER``, here three images' worth); beyond, 429 with
    ``Retry-After`` and nothing stored. A push naming them makes room again, and an
    image already named by an event (the PDA pushed first) never counts."""
    images = [image_bytes(size=(8, 6 + n)) for n in range(6)]
    monkeypatch.setattr(blobs, "UNNAMED_BYTES_PER_UPLOADER", sum(map(len, images[:3])) + 2)
    for data in images[:3]:
        assert put(client, courier, data).status_code == 201
    refused = put(client, courier, images[3])
    assert refused.status_code == 429, refused.get_json()
    assert refused.get_json()["code"] == "too_many_unnamed_images"
    # The push naming the images makes room at once: a PDA honouring Retry-After is not
    # told to keep its next photo for the day the oldest image takes to leave the window.
    assert 0 < int(refused.headers["Retry-After"]) <= blobs.UNNAMED_RETRY_AFTER_SECONDS
    assert "push the events that name them" in refused.get_json()["message"]
    assert session.get(Blob, digest(images[3])) is None  # nothing stored
    assert put(client, courier, images[0]).status_code == 200  # one held: uploaded again
    # Another account is not held back by this one's uploads.
    assert put(client, auth.headers("manager1"), images[3]).status_code == 201
    # The PDA pushes the deliveries its first two photos belong to: room for two more.
    tn = [factories.parcel(session, world.station).tracking_no for _ in range(3)]
    session.commit()
    delivered = [
        factories.event(2 * n + 2, tn[n], "delivered", pod={"photo_sha256": digest(images[n])})
        for n in range(2)
    ]
    auth.push([factories.event(1, tn[0]), factories.event(3, tn[1]), *delivered])
    assert put(client, courier, images[4]).status_code == 201
    # An image an event names before it arrives never counts.
    auth.push([factories.event(6, tn[2], "delivered", pod={"photo_sha256": digest(images[5])})])
    assert put(client, courier, images[5]).status_code == 201


def test_tiny_images_no_event_names_are_bounded_by_their_number_too(
    client: FlaskClient,
    auth: Auth,
    world: World,
    courier: dict[str, str],
    session: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bounded by bytes alone, 1 GiB a day was a dozen million 84-byte PNGs for one
    stolen token: each a file (an inode and a disk block: some 50 GB, not 1 GiB), two
    rows, and a longer read for each upload after it. The images no event names are
    bounded by their number as well (``UNNAMED_IMAGES_PER_UPLOADER``, here three);
    beyond, the same 429, nothing stored, and a push naming one makes room again."""
    images = [image_bytes(size=(1, 1 + n)) for n in range(5)]
    monkeypatch.setattr(blobs, "UNNAMED_IMAGES_PER_UPLOADER", 3, raising=False)
    for data in images[:3]:
        assert put(client, courier, data).status_code == 201
    refused = put(client, courier, images[3])
    assert refused.status_code == 429, refused.get_json()
    assert refused.get_json()["code"] == "too_many_unnamed_images"
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    assert session.get(Blob, digest(images[3])) is None  # nothing stored
    assert put(client, courier, images[0]).status_code == 200  # held already: no new file
    tn = factories.parcel(session, world.station).tracking_no
    session.commit()
    auth.push(
        [
            factories.event(1, tn),
            factories.event(2, tn, "delivered", pod={"photo_sha256": digest(images[0])}),
        ]
    )
    assert put(client, courier, images[3]).status_code == 201
    assert put(client, courier, images[4]).status_code == 429


def test_an_image_a_rejected_event_names_counts_as_named(
    client: FlaskClient,
    auth: Auth,
    world: World,
    courier: dict[str, str],
    session: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A drop the server refused (here for a missing compartment) is kept in quarantine
    with the images its POD names (``RejectedImage``): evidence in a dispute, its photo
    maybe the only one. Its photo counted as one no event named, and the PDA, told to
    "push the events that name them", had pushed it: each retry, a minute apart, was
    refused again for a day. An image a rejected event names counts as named, as a
    proof's does (the event is stored, attributed to its PDA, and seen in quarantine)."""
    images = [image_bytes(size=(2, 1 + n)) for n in range(3)]
    monkeypatch.setattr(blobs, "UNNAMED_IMAGES_PER_UPLOADER", 1)
    assert put(client, courier, images[0]).status_code == 201
    assert put(client, courier, images[1]).status_code == 429
    tn = factories.parcel(session, world.station).tracking_no
    session.commit()
    drop = factories.event(
        2, tn, "delivered_to_locker", locker_id="L-7", pod={"photo_sha256": digest(images[0])}
    )
    drop.pop("compartment", None)
    receipt = auth.push([factories.event(1, tn), drop])
    assert [r["status"] for r in receipt["results"]] == ["applied", "rejected"], receipt
    assert put(client, courier, images[1]).status_code == 201
    assert put(client, courier, images[2]).status_code == 429  # the bound still holds


def test_the_time_room_frees_by_itself_is_not_before_it_frees(
    session: Any, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal says by when room frees by itself; written to the minute, it gave the
    minute the oldest image leaves the window begins in (12:00 for 12:00:30), so a
    courier uploading again at 12:00 was refused again. It gives the minute after."""
    monkeypatch.setattr(blobs, "UNNAMED_IMAGES_PER_UPLOADER", 1)
    now = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.UTC)
    frees_at = now + dt.timedelta(seconds=30)
    session.add(Blob(sha256="a" * 64, media_type="image/png", size_bytes=84, width=1, height=1))
    session.flush()
    session.add(
        BlobUpload(
            sha256="a" * 64,
            station_id=world.station.id,
            uploaded_by=world.courier.id,
            uploaded_at=frees_at - blobs.UNNAMED_WINDOW,
        )
    )
    session.flush()
    with pytest.raises(RateLimited) as refused:
        blobs.check_unnamed_uploads(
            session=session, uploaded_by=world.courier.id, size=84, now=now
        )
    said = re.search(r"by itself by (\d{4}-\d\d-\d\d \d\d:\d\d) UTC", refused.value.message)
    assert said is not None, refused.value.message
    assert dt.datetime.strptime(said[1], "%Y-%m-%d %H:%M").replace(tzinfo=dt.UTC) >= frees_at
    assert said[1] == "2026-12-05 12:01"
    # Still within the window's check a minute later: the oldest image has left it.
    blobs.check_unnamed_uploads(
        session=session, uploaded_by=world.courier.id, size=84, now=now + dt.timedelta(minutes=1)
    )


def test_a_head_of_an_image_or_a_proof_puts_no_read_on_record(
    client: FlaskClient, auth: Auth, session: Any, world: World, courier: dict[str, str]
) -> None:
    """The audit log says who saw what. A ``HEAD`` (Flask answers it with the GET view's
    headers and no body) put on record a ``blob_read`` of an image, or a ``proof_read``,
    that the auditor never saw: an auditor's tool checking its links filled a dispute's
    history with reads of images nobody looked at. A HEAD still answers as the GET does,
    without the bytes; the GET that follows is on record, once."""
    parcel = factories.parcel(session, world.station).tracking_no
    session.commit()
    photo = image_bytes()
    at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    events = [
        factories.event(1, parcel, occurred_at=at),
        factories.event(
            2, parcel, "delivered", occurred_at=at + dt.timedelta(minutes=1),
            pod={"photo_sha256": digest(photo)},
        ),
    ]  # fmt: skip
    pushed = client.post(
        "/api/v1/sync/push", json=factories.push_body("PDA-0001", events), headers=courier
    )
    assert pushed.status_code == 200, pushed.get_json()
    assert put(client, courier, photo).status_code == 201
    delivery = pushed.get_json()["results"][1]
    assert delivery["status"] == "applied", delivery
    auditor = auth.headers("auditor1")
    proofs = client.get("/api/v1/proofs", query_string={"tracking_no": parcel}, headers=auditor)
    event_id = proofs.get_json()["items"][0]["event_id"]

    def actions() -> list[str]:
        session.expire_all()
        return list(session.scalars(select(AuditEntry.action).order_by(AuditEntry.id)))

    before = actions()
    image = client.head(f"/api/v1/blobs/{digest(photo)}", headers=auditor)
    assert image.status_code == 200 and image.data == b""
    assert image.mimetype == "image/png" and image.content_length == len(photo)
    proof = client.head(f"/api/v1/proofs/{event_id}", headers=auditor)
    assert proof.status_code == 200 and proof.data == b""
    assert actions() == before
    assert client.get(f"/api/v1/blobs/{digest(photo)}", headers=auditor).data == photo
    assert actions() == [*before, "blob_read"]
