"""A proof image past its retention is gone: 410 ``blob_purged``, and it stays gone."""

from __future__ import annotations

import datetime as dt
import hashlib
import io

from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import AuditEntry, Blob, utcnow
from sync import sweeps
from sync.blobs import FileBlobStore
from sync.sweeps import SweepSettings
from tests.conftest import Auth, World


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (5, 5), (0, 120, 240)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_purged_image_answers_410_saying_when_until_it_is_uploaded_again(
    app: Flask, client: FlaskClient, auth: Auth, world: World, session: Session
) -> None:
    data = png()
    digest = hashlib.sha256(data).hexdigest()
    url = f"/api/v1/blobs/{digest}"
    courier = auth.headers("courier1", "PDA-0001")
    put = client.put(url, data=data, content_type="image/png", headers=courier)
    assert put.status_code == 201
    assert client.get(url, headers=courier).status_code == 200
    store = FileBlobStore(app.config["BLOB_DIR"])
    purged_at = utcnow() + dt.timedelta(days=366)
    detail = sweeps.proof_retention_purge(
        session=session, now=purged_at, settings=SweepSettings(blob_store=store)
    )
    session.commit()
    assert detail["purged"] == 1 and not store.exists(digest)

    gone = client.get(url, headers=courier)

    assert gone.status_code == 410
    body = gone.get_json()
    assert body["code"] == "blob_purged" and body["status"] == 410
    assert purged_at.isoformat(timespec="seconds") in body["message"]
    assert "retention" in body["message"]

    auditor = client.get(url, headers=auth.headers("auditor1"))
    assert auditor.status_code == 410
    reads = session.scalars(select(AuditEntry).where(AuditEntry.action == "blob_read")).all()
    assert reads == []  # nothing was read
    session.expire_all()
    assert session.get(Blob, digest).purged_at == purged_at

    # A new proof names the same image and its PDA uploads it: it is kept again, and
    # its retention starts over.
    again = client.put(url, data=data, content_type="image/png", headers=courier)
    assert again.status_code == 200
    assert store.exists(digest)
    assert client.get(url, headers=courier).status_code == 200
    session.expire_all()
    restored = session.get(Blob, digest)
    assert restored.purged_at is None and restored.uploaded_at > purged_at - dt.timedelta(days=366)


def test_an_image_never_uploaded_is_still_404(
    client: FlaskClient, auth: Auth, world: World
) -> None:
    response = client.get(f"/api/v1/blobs/{'0' * 64}", headers=auth.headers("admin"))
    assert response.status_code == 404 and response.get_json()["code"] == "blob_not_found"
