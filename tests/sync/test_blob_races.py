"""A proof image uploaded while the push naming it is stored (PostgreSQL, two connections).

Events may name an image before it arrives: the push raises ``pod_blob_missing`` and
the upload closes it. When the two run side by side, neither may judge the parcel on
a state that misses the other's uncommitted rows, or the flag stays open with the
image stored.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from sync.blobs import FileBlobStore, store_blob
from sync.ingest import PushBatch, ingest
from sync.status import rejudge_after_upload
from tests.lock_waits import while_held
from tests.sync.test_flag_decisions import NOW, RULES, OnePda, race_world, rule_flags


def _image() -> tuple[bytes, str]:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 30)).save(buffer, format="PNG")
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def _upload(session: Session, store: FileBlobStore, data: bytes, digest: str, user: int) -> None:
    """What ``PUT /blobs/<sha256>`` does, left uncommitted."""
    stored = store_blob(
        session=session,
        store=store,
        digest=digest,
        data=data,
        max_bytes=1 << 20,
        station_id=None,
        uploaded_by=user,
    )
    assert stored.created
    rejudge_after_upload(session=session, digest=digest, policy=RULES.policy)


def _push(session: Session, pda: OnePda, events: list[dict[str, Any]]) -> None:
    """A push, left uncommitted."""
    ingest(
        session=session,
        batch=PushBatch(pda.pusher.device_id, uuid.uuid4(), NOW, events),
        pusher=pda.pusher,
        rules=RULES,
        received_at=NOW,
    )


@pytest.mark.postgres_only
@pytest.mark.parametrize("upload_first", [True, False], ids=["upload-first", "push-first"])
def test_an_image_uploaded_while_the_push_naming_it_is_stored_leaves_no_missing_flag(
    committed_app: Any, tmp_path: Path, upload_first: bool
) -> None:
    from courier_api.extensions import db

    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    world, _, tracking_no = race_world(sessions)
    data, digest = _image()
    store = FileBlobStore(tmp_path / "blobs")
    with sessions() as setup:
        pda = OnePda(setup, world)
        setup.commit()
    events = [
        pda.event(1, tracking_no, "checked_out"),
        pda.event(2, tracking_no, "delivered", pod={"signature_sha256": digest}),
    ]

    def upload(session: Session) -> None:
        _upload(session, store, data, digest, world.courier.id)

    def push(session: Session) -> None:
        _push(session, pda, events)

    # Either may wait for the other's locks, or find none to wait for.
    if upload_first:
        while_held(sessions, upload, push, must_wait=False)
    else:
        while_held(sessions, push, upload, must_wait=False)
    with sessions() as check:
        assert "pod_blob_missing" not in rule_flags(check, tracking_no)
