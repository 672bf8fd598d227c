"""What PDAs upload: batches, the scan events they carry, and what was refused.

Scan events are append-only: nothing here is ever deleted, and nothing the PDA
sent is ever changed. What an event means for its parcel (its status, whether a
correction voided it) is computed from the events by ``sync.projection``. The one
column the server may set later is ``shift_id``, the filing: an event that arrived
before the shift it belongs to was opened is filed under it when it opens.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    text,
    true,
)
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, BigId, Document, big_pk, sha256_hex, str_enum, timestamp
from models.enums import EventType

# The events that deliver a parcel (and carry its proof): the auditors' proof search
# reads them by time through a partial index of just these.
DELIVERY_TYPES = (
    EventType.DELIVERED,
    EventType.DELIVERED_TO_LOCKER,
    EventType.DELIVERED_TO_PICKUP_POINT,
)
DELIVERY_PREDICATE = "type IN ({})".format(", ".join(f"'{t.value}'" for t in DELIVERY_TYPES))
# Events filed under no shift (``ix_scan_event_unfiled``).
UNFILED_PREDICATE = "shift_id IS NULL"
# Unattended drops (at a locker or a pickup point): the events whose time decides
# whether a consent authorized them (DESIGN.md rule 4), and which keep the times their
# PDA's other events bound them by (``sync.drop_bounds``).
DROP_TYPES = (EventType.DELIVERED_TO_LOCKER, EventType.DELIVERED_TO_PICKUP_POINT)


class SyncBatch(Base):
    """One push from a PDA, with the receipt it was answered with.

    The receipt is stored so that re-sending the batch returns it byte for byte
    and changes nothing (DESIGN.md rule 2).
    """

    __tablename__ = "sync_batch"
    __table_args__ = (
        UniqueConstraint("device_id", "batch_id", name="uq_sync_batch_device_batch"),
    )

    id: Mapped[big_pk]
    device_id: Mapped[str] = mapped_column(ForeignKey("device.id"))
    batch_id: Mapped[uuid.UUID] = mapped_column(Uuid())
    station_id: Mapped[int] = mapped_column(ForeignKey("station.id"), index=True)
    courier_id: Mapped[int] = mapped_column(ForeignKey("app_user.id"))
    sent_at: Mapped[dt.datetime]
    received_at: Mapped[timestamp]
    clock_offset_ms: Mapped[int] = mapped_column(BigId)
    event_count: Mapped[int]
    # What "the same batch" is (``sync.ingest.content_digest``): the same batch id with
    # other events is refused. A batch stored before content digests holds the hash of
    # its events as sent here.
    request_hash: Mapped[sha256_hex]
    # The hash of its events as sent (``sync.ingest.request_hash``), kept beside the
    # content digest: a retry sent byte for byte is the same batch even when the events'
    # validation changed in between (tracking-number patterns, the code), which moves an
    # event between valid and rejected and so changes its content digest. None for a
    # batch stored before it was kept.
    sent_hash: Mapped[str | None] = mapped_column(String(64))
    receipt: Mapped[dict[str, Any]] = mapped_column(Document)


class ScanEvent(Base):
    """An immutable fact from the field, with the device's time and the corrected time."""

    __tablename__ = "scan_event"
    __table_args__ = (
        UniqueConstraint("device_id", "client_event_id", name="uq_scan_event_device_event"),
        UniqueConstraint("device_id", "seq", name="uq_scan_event_device_id_seq"),
        CheckConstraint("seq >= 1", name="seq_positive"),
        Index("ix_scan_event_tracking_no", "tracking_no"),
        # Corrections of a device's events, wherever they were filed. Partial: only
        # corrections are in it, so "has this device sent any?" is one probe.
        Index(
            "ix_scan_event_voids",
            "device_id",
            "voids_client_event_id",
            postgresql_where=text("voids_client_event_id IS NOT NULL"),
            sqlite_where=text("voids_client_event_id IS NOT NULL"),
        ),
        # The auditors' proof search by time: deliveries only (a third of the events).
        Index(
            "ix_scan_event_delivery_time",
            "occurred_at",
            postgresql_where=text(DELIVERY_PREDICATE),
            sqlite_where=text(DELIVERY_PREDICATE),
        ),
        # A device's events filed under no shift, by time: what opening a shift files
        # under it (``sync.shifts.open_shift``), without reading the PDA's whole history.
        Index(
            "ix_scan_event_unfiled",
            "device_id",
            "occurred_at",
            postgresql_where=text(UNFILED_PREDICATE),
            sqlite_where=text(UNFILED_PREDICATE),
        ),
        # A device's events by time, with their seqs (``sync.drop_bounds``): those dated
        # within reach of a push's events, without reading the PDA's whole history.
        Index("ix_scan_event_device_time", "device_id", "occurred_at", "seq"),
    )

    id: Mapped[big_pk]
    station_id: Mapped[int] = mapped_column(ForeignKey("station.id"), index=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("device.id"))
    courier_id: Mapped[int] = mapped_column(ForeignKey("app_user.id"))
    batch_pk: Mapped[int] = mapped_column(BigId, ForeignKey("sync_batch.id"), index=True)
    client_event_id: Mapped[uuid.UUID] = mapped_column(Uuid())
    seq: Mapped[int]
    type: Mapped[EventType] = mapped_column(str_enum(EventType, "event_type"))
    tracking_no: Mapped[str] = mapped_column(String(40))
    occurred_at_device: Mapped[dt.datetime]  # as the PDA's clock said
    occurred_at: Mapped[dt.datetime]  # corrected by the device's estimated clock offset
    received_at: Mapped[timestamp]
    lat: Mapped[float | None]
    lon: Mapped[float | None]
    accuracy_m: Mapped[float | None]
    # The shift the event is filed under: the one the PDA named, if it is this device's,
    # else the one the device had open when the event happened (sync.shifts).
    shift_id: Mapped[int | None] = mapped_column(ForeignKey("shift.id"), index=True)
    claimed_shift_id: Mapped[int | None]  # the shift id the PDA sent, as sent
    voids_client_event_id: Mapped[uuid.UUID | None] = mapped_column(Uuid())
    details: Mapped[dict[str, Any]] = mapped_column(Document)  # the type-specific fields
    # sha256 of the event's canonical content: a re-sent id with other content is refused.
    content_hash: Mapped[sha256_hex]
    # Drops only (``sync.drop_bounds``): the latest corrected time of an event its PDA
    # recorded before it (lower seq) when that is later than its own, and the earliest
    # of one recorded after it when that is earlier, each within 12 hours of it. The
    # seqs are the PDA's causal order (rule 6): the drop happened between the two,
    # whatever its own clock said.
    latest_of_earlier_seqs: Mapped[dt.datetime | None]
    earliest_of_later_seqs: Mapped[dt.datetime | None]

    def __repr__(self) -> str:
        return f"<ScanEvent {self.device_id}#{self.seq} {self.type} {self.tracking_no}>"


# A ``seq_conflict`` rejection not settled that names no event (``ix_quarantined_event_unnamed``).
UNNAMED_SEQ_CONFLICT = (
    "error_code = 'seq_conflict' AND resent_seq IS NULL AND unsettled_event_id IS NULL"
)


class QuarantinedEvent(Base):
    """An event that was refused, kept with its raw payload and the reason (rule 1).

    A re-sent rejected event is recognised by its payload hash and answered with
    the same rejection, so a bad event is final and never blocks a device's queue.
    """

    __tablename__ = "quarantined_event"
    __table_args__ = (
        UniqueConstraint("device_id", "payload_hash", name="uq_quarantined_event_device_payload"),
        Index("ix_quarantined_event_device_seq", "device_id", "seq"),
        # The station's list, newest first.
        Index("ix_quarantined_event_station_newest", "station_id", "id"),
        # A parcel's rejected events, newest first (``?tracking_no=``), by the number
        # normalized (``parcel_tracking_no``), however the PDA wrote it.
        Index("ix_quarantined_event_parcel", "parcel_tracking_no", "id"),
        # A device's ``seq_conflict`` rejections not settled, by the event they name:
        # what a push storing events looks its events up in (``sync.ingest``). Partial:
        # a settled rejection, or another, is not in it.
        Index(
            "ix_quarantined_event_unsettled",
            "device_id",
            "unsettled_event_id",
            postgresql_where=text("unsettled_event_id IS NOT NULL"),
            sqlite_where=text("unsettled_event_id IS NOT NULL"),
        ),
        # Its unsettled ``seq_conflict`` rejections that name no event: kept by the
        # version before, during the rollout of the one naming them (or before it, not
        # compared yet). Empty but for those: a push storing events probes it once.
        Index(
            "ix_quarantined_event_unnamed",
            "device_id",
            postgresql_where=text(UNNAMED_SEQ_CONFLICT),
            sqlite_where=text(UNNAMED_SEQ_CONFLICT),
        ),
    )

    id: Mapped[big_pk]
    station_id: Mapped[int] = mapped_column(ForeignKey("station.id"))
    device_id: Mapped[str] = mapped_column(ForeignKey("device.id"))
    batch_pk: Mapped[int] = mapped_column(BigId, ForeignKey("sync_batch.id"))
    position: Mapped[int]  # index in the batch's events
    client_event_id: Mapped[str | None] = mapped_column(String(64))
    seq: Mapped[int | None]
    event_type: Mapped[str | None] = mapped_column(String(40))
    tracking_no: Mapped[str | None] = mapped_column(String(40))  # as the PDA wrote it
    # The parcel it names: ``tracking_no`` normalized as parcels' numbers are stored
    # (``sync.quarantine.parcel_named``), set on insert; what a parcel's rejected events
    # are found and attributed to shifts by (``rr 4731 2482 9gb`` is RR473124829GB's).
    parcel_tracking_no: Mapped[str | None] = mapped_column(String(40))
    error_code: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    field: Mapped[str | None] = mapped_column(String(64))
    # The event exactly as received, as ASCII JSON (NULs and lone surrogates escaped).
    payload: Mapped[str] = mapped_column(Text)
    payload_hash: Mapped[sha256_hex]
    received_at: Mapped[timestamp]
    # Rejected ``seq_conflict`` (its seq another event's), then sent again by its PDA
    # under this seq, the same event otherwise (README's recovery), and held: the
    # rejection is settled (``sync.ingest``). None: not (yet), or another rejection.
    resent_seq: Mapped[int | None]
    # A ``seq_conflict`` rejection not settled yet: its ``client_event_id`` read as a
    # UUID (the PDA may write it in capitals or braces), by which a push storing that
    # event finds it. None once settled, and for every other rejection; None too for
    # one the version before kept during the rollout, until a push storing events
    # finds it through ``ix_quarantined_event_unnamed`` and names it.
    unsettled_event_id: Mapped[uuid.UUID | None] = mapped_column(Uuid())


class DeviceSyncState(Base):
    """Per device: which sequence numbers the server holds, and the clock estimate.

    Its row is updated under the device's lock, so acknowledgements never race.
    """

    __tablename__ = "device_sync_state"

    device_id: Mapped[str] = mapped_column(ForeignKey("device.id"), primary_key=True)
    acked_through_seq: Mapped[int] = mapped_column(BigId, default=0)
    # The highest seq held: arrived (stored or rejected), or written off as lost
    # (``sync.lost_seqs``: a write-off may name seqs a shift declared above it).
    max_seq: Mapped[int] = mapped_column(BigId, default=0)
    # Gaps below max_seq as [[first, last], ...], ascending.
    missing_ranges: Mapped[list[list[int]]] = mapped_column(Document, default=list)
    # Seqs a manager wrote off as lost (``sync.lost_seqs``), as [[first, last], ...]
    # ascending: no longer in ``missing_ranges``, and none of them arrived since (one
    # that does leaves them). NULL: none.
    written_off_ranges: Mapped[list[list[int]] | None] = mapped_column(Document)
    # The highest seq held (an event or a rejection, not a seq written off) when a
    # manager last wrote off seqs of the device: seqs written off are acknowledged only
    # below a seq held above it, one that came after the write-off (``sync.acks``).
    held_at_write_off: Mapped[int] = mapped_column(BigId, server_default="0")
    # How many of the device's rejected events are ``seq_conflict`` ones not settled
    # (``QuarantinedEvent.resent_seq``): only while some are does a push look for them
    # among the events it stores (``sync.ingest``), recounting them as it does.
    unsettled_seq_conflicts: Mapped[int] = mapped_column(server_default="0")
    # Whether every one of them was compared with every event the device holds: then a
    # push compares only its own with the events held, and the events it stores with
    # them (``QuarantinedEvent.unsettled_event_id``). False for a device with some kept
    # before migration e9c3b7a5d1f2: its next push storing events compares them all.
    seq_conflicts_compared: Mapped[bool] = mapped_column(server_default=true())
    clock_offset_ms: Mapped[int | None] = mapped_column(BigId)
    clock_measured_at: Mapped[dt.datetime | None]
    last_push_at: Mapped[dt.datetime | None]


class SeqWriteOff(Base):
    """A manager's write-off of seqs a PDA lost (a reset, a broken flash): who, when,
    why, and the ranges as written off. The device's sync state keeps which of them
    are still written off (``DeviceSyncState.written_off_ranges``)."""

    __tablename__ = "seq_write_off"
    # A device's write-offs, in order: what its shifts' balances read.
    __table_args__ = (Index("ix_seq_write_off_device", "device_id", "id"),)

    id: Mapped[big_pk]
    device_id: Mapped[str] = mapped_column(ForeignKey("device.id"))
    station_id: Mapped[int] = mapped_column(ForeignKey("station.id"))
    ranges: Mapped[list[list[int]]] = mapped_column(Document)  # [[first, last], ...]
    reason: Mapped[str] = mapped_column(Text)
    written_off_by: Mapped[int] = mapped_column(ForeignKey("app_user.id"))
    written_off_at: Mapped[timestamp]
