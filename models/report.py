from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Date, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, Document, int_pk, str_enum, timestamp
from models.enums import ReportKind


class StationReport(Base):
    """A monitoring report as the scheduler issued it for a station and period.

    Reports can always be computed afresh; this keeps what was issued, so that
    "what did the daily report of the 29th say" has one answer.
    """

    __tablename__ = "station_report"
    __table_args__ = (
        UniqueConstraint("station_id", "kind", "period_start", name="uq_station_report_period"),
    )

    id: Mapped[int_pk]
    station_id: Mapped[int] = mapped_column(ForeignKey("station.id"))
    kind: Mapped[ReportKind] = mapped_column(str_enum(ReportKind, "report_kind"))
    period_start: Mapped[dt.date] = mapped_column(Date)
    period: Mapped[str] = mapped_column(String(16))  # 2026-11-29, 2026-W48, 2026-11
    generated_at: Mapped[timestamp]
    body: Mapped[dict[str, Any]] = mapped_column(Document)
