from __future__ import annotations

from typing import Any

from flask import Response, current_app, request
from flask.views import MethodView
from sqlalchemy import select

from courier_api.api.base import RATE_LIMITED, ApiBlueprint
from courier_api.api.blobs.schemas import BlobOut
from courier_api.auth import Principal, current_principal, record_auditor_read
from courier_api.config import policy_of
from courier_api.extensions import db
from courier_api.limits import request_limits
from models import Blob, BlobUpload, Role
from sync.blobs import (
    BlobReader,
    FileBlobStore,
    blob_not_found,
    ensure_not_purged,
    get_blob,
    may_read_blob,
    parcels_naming,
    read_image,
    record_bytes_restored,
    store_blob,
)
from sync.errors import LimitExceeded
from sync.status import rejudge_after_upload

blp = ApiBlueprint("blobs", __name__, url_prefix="/api/v1/blobs", description="Proof images")

IMAGE_BODY = {
    "required": True,
    "content": {
        media_type: {"schema": {"type": "string", "format": "binary"}}
        for media_type in ("image/png", "image/jpeg", "image/webp", "application/octet-stream")
    },
}


def blob_store() -> FileBlobStore:
    return FileBlobStore(current_app.config["BLOB_DIR"])


SHA256_PARAMETER = {
    "in": "path",
    "name": "sha256",
    "required": True,
    "description": "The image's sha256, lowercase hex (anything else is a 422 `invalid_digest`)",
    "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
}


@blp.before_request
def _image_limit() -> None:
    """An upload whose length says it is over ``MAX_BLOB_BYTES`` is refused by that limit
    at once, unread: one over ``MAX_REQUEST_BYTES`` too named the request's limit, and a
    PDA that shrank the photo to fit it uploaded it again over a weak signal, to be
    refused by the image's, lower (``store_blob`` holds a body of no stated length)."""
    size = request.content_length
    limit = request_limits().max_blob_bytes
    if request.method == "PUT" and size is not None and size > limit:
        raise LimitExceeded(
            f"the image has {size:,} bytes; the limit is {limit:,}",
            limit=limit,
            unit="bytes",
            field="body",
        )


@blp.route("/<string:sha256>", parameters=[SHA256_PARAMETER])
class BlobBySha256(MethodView):
    # courier_api.database: its GET, the file read and hashed as served, holds no
    # writers' turn (a shift page's thumbnails at 19:00); an auditor's read is recorded
    # apart, before the bytes go out (``record_auditor_read``). Its PUT writes as ever.
    READS_ONLY = True

    @blp.auth(Role.COURIER, Role.STATION_MANAGER, Role.ADMIN, Role.INTEGRATION)
    @blp.doc(requestBody=IMAGE_BODY)
    @blp.response(200, BlobOut, description="Already stored, and the caller reads it")
    @blp.alt_response(201, schema=BlobOut, description="Stored")
    @blp.alt_response(413, response="REQUEST_ENTITY_TOO_LARGE")
    @blp.alt_response(422, response="UNPROCESSABLE_ENTITY")
    @blp.alt_response(429, **RATE_LIMITED)
    @blp.alt_response(503, response="SERVICE_UNAVAILABLE")
    def put(self, sha256: str) -> tuple[Blob | dict[str, Any], int]:
        """Upload a proof image

        The body is the image itself: PNG, JPEG or WebP, at most MAX_BLOB_BYTES
        (default 8 MiB). The URL names its sha256 (lowercase hex); the bytes must
        hash to it and decode as an image. Uploading the same image again is
        safe (200), and puts its bytes back if they were lost from the store or
        altered there. Events may name an image before it is uploaded. An image
        stored by others the caller may not read (another station's) answers as
        a new one would, 201 and uploaded now, so that it does not show it
        exists; from then on the caller reads it too.

        An account may upload at most 1 GiB, and 5,000 images, a day of images new
        to it (another station's too) that no event names (yet): beyond, 429
        `too_many_unnamed_images` with `Retry-After` (at most 60 seconds), nothing
        stored. Push the events that name the images already uploaded (they then
        count no more at once), then
        upload it again; the message says when room frees by itself.

        A 503 `blob_store_unavailable` (with `Retry-After`) means the server cannot
        store images right now: nothing was stored; keep the image and upload it
        again later. The events that name it are kept meanwhile, and the image is
        reported missing (`pod_blob_missing`, `blob_missing_at_handover`) until it
        arrives.
        """
        principal = current_principal()
        readable = db.session.get(Blob, sha256) is not None and may_read_blob(
            session=db.session, digest=sha256, reader=blob_reader(principal)
        )
        stored = store_blob(
            session=db.session,
            store=blob_store(),
            digest=sha256,
            data=request.get_data(),  # read before the sign-in check (``require_auth``)
            max_bytes=request_limits().max_blob_bytes,
            station_id=principal.station_id,
            uploaded_by=principal.user_id,
            # Put on record apart if every run is aborted after one put the bytes back.
            found_before=db.kept_across_runs(
                "blob_bytes_found",
                if_nothing_stored=lambda session, found: record_bytes_restored(
                    session=session,
                    found=found,
                    uploaded_by=principal.user_id,
                    station_id=principal.station_id,
                ),
            ),
            answered_as_new=not readable,
        )
        blob, created = stored.blob, stored.created
        if stored.arrived:  # new, or back after the retention purge deleted it
            rejudge_after_upload(
                session=db.session, digest=blob.sha256, policy=policy_of(current_app.config)
            )
        db.session.commit()
        if created or readable:
            return blob, 201 if created else 200
        # Stored by someone the caller may not read: for them it did not exist (SECURITY.md
        # threat 3). Answered as new, with the time of their own upload.
        uploaded_at = db.session.scalar(
            select(BlobUpload.uploaded_at).where(
                BlobUpload.sha256 == blob.sha256, BlobUpload.uploaded_by == principal.user_id
            )
        )
        return {name: getattr(blob, name) for name in BlobOut._declared_fields} | {
            "uploaded_at": uploaded_at
        }, 201

    @blp.auth(Role.COURIER, Role.STATION_MANAGER, Role.ADMIN, Role.AUDITOR)
    @blp.response(
        200,
        description="The image bytes",
        content_type="image/*",
    )
    @blp.alt_response(404, response="NOT_FOUND")
    @blp.alt_response(409, response="CONFLICT")
    @blp.alt_response(410, response="GONE")
    @blp.alt_response(422, response="UNPROCESSABLE_ENTITY")
    @blp.alt_response(503, response="SERVICE_UNAVAILABLE")
    def get(self, sha256: str) -> Response:
        """Download a proof image

        Auditors and admins read every image; managers those uploaded at their
        station; couriers those they uploaded themselves. Every
        read by an auditor is recorded in the audit log. An image older than the
        retention period (PROOF_RETENTION_DAYS) has been purged: 410 `blob_purged`,
        saying when. Images are content-addressed and checked on every read: a
        file gone from the store answers 404 `blob_bytes_missing`, one whose bytes
        no longer hash to the digest (changed or replaced in the store) 409
        `blob_bytes_altered`, never the altered bytes; uploading the image again
        mends either.
        """
        return image_response(sha256, current_principal())


def blob_reader(principal: Principal) -> BlobReader:
    """Which images ``principal`` reads: admins and auditors all, managers their
    station's, everyone else what they uploaded."""
    return BlobReader(
        user_id=principal.user_id,
        station_id=principal.station_id if principal.role == Role.STATION_MANAGER else None,
        everything=principal.role in (Role.ADMIN, Role.AUDITOR),
    )


def image_response(sha256: str, principal: Principal) -> Response:
    """A proof image for ``principal``, as the API and the pages serve it.

    Read only when they may (``may_read_blob``: not found otherwise, so an image
    of another station does not even show it exists), refused once purged or when
    its bytes are missing or altered (``read_image``), and, for an auditor, on record
    in the audit log before it goes out (DESIGN.md rule 7), filed under the parcels
    whose proofs, or whose rejected events' PODs, name it (``parcels_naming``).
    """
    blob = get_blob(session=db.session, digest=sha256)
    if not may_read_blob(session=db.session, digest=blob.sha256, reader=blob_reader(principal)):
        raise blob_not_found(sha256)
    data = read_image(blob_store(), ensure_not_purged(blob))
    record_auditor_read(
        "blob_read",
        "blob",
        blob.sha256,
        {"media_type": blob.media_type, "size_bytes": blob.size_bytes},
        principal,
        # Filed under the parcels whose proofs or rejected events name it (their history
        # says who looked at it); read for an auditor only, whose reads alone are recorded.
        parcels=parcels_naming(session=db.session, digest=blob.sha256)
        if principal.role == Role.AUDITOR
        else (),
    )
    response = Response(data, mimetype=blob.media_type)
    response.headers["ETag"] = f'"{blob.sha256}"'
    # The bytes under a digest never change: an API client keeps them, the one API
    # answer that is not no-store (``courier_api.api.base.kept_by_no_cache``). The pages
    # answer no-store instead (``courier_api.web.views.security_headers``).
    response.headers["Cache-Control"] = "private, max-age=31536000, immutable"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
