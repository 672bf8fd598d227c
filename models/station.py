from __future__ import annotations

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, int_pk, str200, timestamp


class Station(Base):
    """A delivery station: couriers, devices and parcels belong to one."""

    __tablename__ = "station"

    id: Mapped[int_pk]
    code: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str200]
    # IANA zone: decides where a station's "day" starts for boards and reports.
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    created_at: Mapped[timestamp]

    def __repr__(self) -> str:
        return f"<Station {self.code}>"
