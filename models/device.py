from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from models.base import Base, str_enum, timestamp
from models.enums import DeviceStatus
from models.station import Station


class Device(Base):
    """A courier's handheld terminal (PDA), registered to one station."""

    __tablename__ = "device"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    station_id: Mapped[int] = mapped_column(ForeignKey("station.id"), index=True)
    status: Mapped[DeviceStatus] = mapped_column(
        str_enum(DeviceStatus, "device_status"), default=DeviceStatus.ACTIVE
    )
    last_seen_at: Mapped[dt.datetime | None]
    registered_at: Mapped[timestamp]
    status_changed_at: Mapped[dt.datetime | None]
    # When an admin last moved it to another station (``sync.device_moves``): tokens
    # issued before it no longer work, it signs in anew at its new station.
    moved_at: Mapped[dt.datetime | None]

    station: Mapped[Station] = relationship(lazy="raise")

    def __repr__(self) -> str:
        return f"<Device {self.id} {self.status}>"
