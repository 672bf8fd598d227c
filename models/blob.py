from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, BigId, int_pk, timestamp


class Blob(Base):
    """A proof image, stored content-addressed; the bytes live in the blob store."""

    __tablename__ = "blob"
    # The retention purge walks images by age.
    __table_args__ = (Index("ix_blob_uploaded_at", "uploaded_at"),)

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    media_type: Mapped[str] = mapped_column(String(32))
    size_bytes: Mapped[int]
    width: Mapped[int]
    height: Mapped[int]
    uploaded_at: Mapped[timestamp]  # first upload
    # The bytes were deleted by the retention purge; the row stays as the record that
    # the image existed (its proof was complete) and when it was purged.
    purged_at: Mapped[dt.datetime | None]


class BlobUpload(Base):
    """Who uploaded an image, from which station: it decides who may read it back.

    The same bytes uploaded by two couriers (of one station or two) are stored once
    and recorded twice, so each of them, and each station's managers, can read them.
    """

    __tablename__ = "blob_upload"
    __table_args__ = (
        UniqueConstraint("sha256", "uploaded_by", name="uq_blob_upload_sha256_user"),
        Index("ix_blob_upload_sha256_station", "sha256", "station_id"),
        # An account's latest uploads: what it uploaded that no event names yet
        # (``sync.blobs.UNNAMED_BYTES_PER_UPLOADER``).
        Index("ix_blob_upload_uploader_time", "uploaded_by", "uploaded_at"),
    )

    id: Mapped[int_pk]
    sha256: Mapped[str] = mapped_column(ForeignKey("blob.sha256"))
    station_id: Mapped[int | None] = mapped_column(ForeignKey("station.id"))
    uploaded_by: Mapped[int] = mapped_column(ForeignKey("app_user.id"))
    uploaded_at: Mapped[timestamp]


class ProofImage(Base):
    """A proof image named by a delivery's POD: lets an upload find the parcels waiting
    for it (their ``pod_blob_missing`` flag closes), and a proof find its images."""

    __tablename__ = "proof_image"
    __table_args__ = (
        UniqueConstraint("event_id", "sha256", name="uq_proof_image_event_sha256"),
        Index("ix_proof_image_sha256", "sha256"),
    )

    id: Mapped[int_pk]
    event_id: Mapped[int] = mapped_column(BigId, ForeignKey("scan_event.id"))
    sha256: Mapped[str] = mapped_column(String(64))  # the blob may arrive later
    tracking_no: Mapped[str] = mapped_column(String(40))


class RejectedImage(Base):
    """A proof image named by the POD of an event the server rejected (kept in
    quarantine), with the parcel that event names: an auditor's read of the image is
    filed under that parcel (``sync.blobs.parcels_naming``), as a proof's is, since a drop
    the server refused is evidence in a dispute and its photo may be the only one."""

    __tablename__ = "rejected_image"
    __table_args__ = (
        UniqueConstraint(
            "quarantined_event_id", "sha256", name="uq_rejected_image_quarantined_event_sha256"
        ),
        Index("ix_rejected_image_sha256", "sha256"),
    )

    id: Mapped[int_pk]
    quarantined_event_id: Mapped[int] = mapped_column(BigId, ForeignKey("quarantined_event.id"))
    sha256: Mapped[str] = mapped_column(String(64))  # the blob may arrive later, or never
    tracking_no: Mapped[str] = mapped_column(String(40))  # its ``parcel_tracking_no``
