"""A proof image past its retention is gone: 410 ``blob_purged``, and it stays gone."""

from __future__ import annotations

import datetime as dt
import hashlib
import io

from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models import AuditEntry, Blob, Flag, FlagStatus, ServiceClass, utcnow
from sync import sweeps
from sync.blobs import FileBlobStore
from sync.sweeps import SweepSettings
from tests import factories
from tests.conftest import Auth, World
from tests.courier_api.test_blobs_api import digest, image_bytes, put
from tests.courier_api.test_shifts_api import Courier


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


def test_an_image_purged_then_uploaded_again_closes_the_pod_blob_missing_of_a_new_proof(
    app: Flask, client: FlaskClient, session: Session, world: World, auth: Auth
) -> None:
    """A new proof names an image the retention purge deleted (the same photo taken
    again): ``pod_blob_missing`` opens, as it should. The PDA uploads the image: it is
    kept again (200), so the flag's cause is gone and it should close, as it does when
    an image never uploaded arrives."""
    data = image_bytes()
    photo = digest(data)
    pda = Courier(client, auth, "courier1", "PDA-0001")
    assert put(client, pda.headers, data).status_code == 201
    # The retention purge ran yesterday: the row stays, marked purged.
    session.execute(
        update(Blob).where(Blob.sha256 == photo).values(purged_at=utcnow() - dt.timedelta(days=1))
    )
    session.commit()
    parcel = factories.parcel(session, world.station, service_class=ServiceClass.PARCEL)
    session.commit()
    pda.open(first_seq=1)
    receipt = pda.push(
        [
            pda.event(parcel.tracking_no),
            pda.event(
                parcel.tracking_no,
                "delivered",
                pod={"recipient_name": "Wang", "photo_sha256": photo},
            ),
        ]
    )
    assert [f["kind"] for f in receipt["flags_raised"]] == ["pod_blob_missing"]

    again = put(client, pda.headers, data)

    assert again.status_code == 200, again.get_json()  # the image's row was there
    assert client.get(f"/api/v1/blobs/{photo}", headers=pda.headers).status_code == 200
    session.expire_all()
    flag = session.scalars(select(Flag).where(Flag.kind == "pod_blob_missing")).one()
    assert flag.status == FlagStatus.CLOSED
