from __future__ import annotations

from typing import Any

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from models.base import Base, BigId, Document, big_pk, sha256_hex, timestamp


class AuditEntry(Base):
    """One line of the append-only, hash-chained audit log (DESIGN.md "Audit log").

    ``entry_hash`` covers this entry's content and ``prev_hash``, the hash of the
    entry before it, so a row changed or removed afterwards breaks the chain at a
    place ``courier-api audit verify`` names.
    """

    __tablename__ = "audit_entry"
    # The log's filters (``GET /audit``), each newest first: without them a page of a
    # subject's entries, of a day's, of a rare action's or of a user's reads the whole log.
    __table_args__ = (
        Index("ix_audit_entry_subject", "subject_type", "subject_key", "id"),
        Index("ix_audit_entry_action", "action", "id"),
        Index("ix_audit_entry_actor", "actor_id", "id"),
        Index("ix_audit_entry_at", "at"),
        # (A parcel's entries, ``GET /audit?tracking_no=``: ``AuditEntryParcel``'s key.)
    )

    id: Mapped[big_pk]
    at: Mapped[timestamp]
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("app_user.id"))
    action: Mapped[str] = mapped_column(String(64))  # proof_read, blob_read, flag_resolved...
    subject_type: Mapped[str] = mapped_column(String(32))
    subject_key: Mapped[str] = mapped_column(String(160))
    details: Mapped[dict[str, Any]] = mapped_column(Document)
    # The address of the client whose request wrote the entry (a read's, a sign-off's:
    # where it came from matters in a dispute), as the web edge saw it (behind
    # ``TRUSTED_PROXY_HOPS`` proxies, the one they name); None for the command line, the
    # scheduler and every entry written before migration ``f4a8c2e6b1d3``. In
    # ``entry_hash`` when set (``sync.audit.entry_hash``).
    client_ip: Mapped[str | None] = mapped_column(String(64))
    # Unique: two entries chained onto one predecessor (a fork) cannot both be stored.
    prev_hash: Mapped[sha256_hex] = mapped_column(unique=True)
    entry_hash: Mapped[sha256_hex] = mapped_column(unique=True)
    # The parcel the entry is about, as the code appending it knew it (``sync.audit.
    # append``): None for an entry about no parcel, or about several. Outside
    # ``entry_hash`` (migration ``9d4f2b7c1e63`` says why): the hashed content is the
    # record.
    tracking_no: Mapped[str | None] = mapped_column(String(40))
    # Every parcel the entry concerns, that one or several (a sign-off's manifest, a
    # search's proofs): what ``GET /audit?tracking_no=`` finds it by.
    parcels: Mapped[list[AuditEntryParcel]] = relationship(lazy="raise")


class AuditEntryParcel(Base):
    """A parcel an audit entry concerns: the finding aid by which ``GET
    /audit?tracking_no=`` lists a parcel's entries, those about it alone and those about
    it among others (a bulk sign-off, a handover, a search's proofs), newest first along
    the primary key. Outside the hash chain, as ``AuditEntry.tracking_no`` (migration
    ``b1d7e3a9c5f2`` says why): written with the entry, never changed."""

    __tablename__ = "audit_entry_parcel"

    tracking_no: Mapped[str] = mapped_column(String(40), primary_key=True)
    entry_id: Mapped[int] = mapped_column(BigId, ForeignKey("audit_entry.id"), primary_key=True)
