from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from models.base import Base, Document, int_pk, str_enum, timestamp, utcnow
from models.enums import ParcelStatus, ServiceClass
from models.station import Station


class Parcel(Base):
    """An item on the last mile, known by its tracking number."""

    __tablename__ = "parcel"

    id: Mapped[int_pk]
    tracking_no: Mapped[str] = mapped_column(String(40), unique=True)
    station_id: Mapped[int] = mapped_column(ForeignKey("station.id"), index=True)
    service_class: Mapped[ServiceClass] = mapped_column(str_enum(ServiceClass, "service_class"))
    recipient_name: Mapped[str] = mapped_column(String(200))
    # E.164 ("+8613812345678"), normalised on intake; masked for everyone but auditors.
    recipient_phone: Mapped[str | None] = mapped_column(String(20), index=True)
    address: Mapped[str] = mapped_column(Text)
    lat: Mapped[float | None]
    lon: Mapped[float | None]
    # The courier planned at intake (optional), and the one who has the parcel now: the
    # courier of the check-out that counts last, or the planned one before any check-out.
    planned_courier_id: Mapped[int | None] = mapped_column(ForeignKey("app_user.id"))
    # The stations an intake moved the parcel away from, oldest first, each with when
    # it left: ``[{"station_id": 1, "until": "<ISO time>"}]`` (None: never moved). A
    # scan made at a station while the parcel was there is no wrong station's
    # (``sync.status.reproject``).
    earlier_stations: Mapped[list[dict[str, Any]] | None] = mapped_column(Document)
    # When the recipient refused a courier's request for consent (ISO times, oldest
    # first): from then on, consents given before a refusal authorize no drop of this
    # parcel (``sync.consents.consents_for``).
    consent_refusals: Mapped[list[str] | None] = mapped_column(Document)
    courier_id: Mapped[int | None] = mapped_column(ForeignKey("app_user.id"), index=True)
    # Projected from the scan events (sync.projection); never set by hand.
    status: Mapped[ParcelStatus | None] = mapped_column(str_enum(ParcelStatus, "parcel_status"))
    status_at: Mapped[dt.datetime | None]
    created_at: Mapped[timestamp]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    station: Mapped[Station] = relationship(lazy="raise")

    def __repr__(self) -> str:
        return f"<Parcel {self.tracking_no}>"
