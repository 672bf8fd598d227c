from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, Document, int_pk, str_enum, timestamp, utcnow
from models.enums import FlagSeverity, FlagStatus


class Flag(Base):
    """A discrepancy or violation: one per kind and subject, however often it is found."""

    __tablename__ = "flag"
    __table_args__ = (
        UniqueConstraint("kind", "subject_type", "subject_key", name="uq_flag_kind_subject"),
        Index("ix_flag_station_status", "station_id", "status"),
    )

    id: Mapped[int_pk]
    station_id: Mapped[int | None] = mapped_column(ForeignKey("station.id"))
    kind: Mapped[str] = mapped_column(String(64))
    severity: Mapped[FlagSeverity] = mapped_column(str_enum(FlagSeverity, "flag_severity"))
    subject_type: Mapped[str] = mapped_column(String(16))  # parcel | device | event
    subject_key: Mapped[str] = mapped_column(String(160))
    evidence: Mapped[dict[str, Any]] = mapped_column(Document)
    status: Mapped[FlagStatus] = mapped_column(
        str_enum(FlagStatus, "flag_status"), default=FlagStatus.OPEN
    )
    raised_at: Mapped[timestamp]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    closed_reason: Mapped[str | None] = mapped_column(Text)

    def __repr__(self) -> str:
        return f"<Flag {self.kind} {self.subject_type}:{self.subject_key} {self.status}>"
