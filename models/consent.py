from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Index, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, BigId, int_pk, str_enum, timestamp
from models.enums import ConsentChannel, ConsentMethod, ConsentScope


class Consent(Base):
    """A recipient's agreement to unattended delivery (DESIGN.md "Consent", rule 4).

    For one parcel, or standing for a recipient's phone and address. It comes from a
    recipient-facing channel (the API) or is captured on a PDA (a ``consent_captured``
    event, linked by ``event_id``). Revoking keeps the row: what was agreed when is
    evidence.
    """

    __tablename__ = "consent"
    __table_args__ = (
        Index("ix_consent_tracking_no", "tracking_no"),
        Index("ix_consent_recipient", "recipient_phone", "address_key"),
        Index("ix_consent_station_id", "station_id", "id"),
        # The expiry sweep: consents that lapsed and have not been announced yet.
        Index(
            "ix_consent_unannounced_expiry",
            "expires_at",
            postgresql_where=text("expiry_announced_at IS NULL AND expires_at IS NOT NULL"),
            sqlite_where=text("expiry_announced_at IS NULL AND expires_at IS NOT NULL"),
        ),
        # A channel's retry of the same consent finds the one recorded the first time.
        Index(
            "ix_consent_client_consent_id",
            "created_by",
            "client_consent_id",
            unique=True,
            postgresql_where=text("client_consent_id IS NOT NULL"),
            sqlite_where=text("client_consent_id IS NOT NULL"),
        ),
    )

    id: Mapped[int_pk]
    scope: Mapped[ConsentScope] = mapped_column(str_enum(ConsentScope, "consent_scope"))
    station_id: Mapped[int | None] = mapped_column(ForeignKey("station.id"))
    tracking_no: Mapped[str | None] = mapped_column(String(40))
    recipient_phone: Mapped[str | None] = mapped_column(String(20))  # E.164
    address: Mapped[str | None] = mapped_column(Text)
    # The address as compared: case, spaces and punctuation folded.
    address_key: Mapped[str | None] = mapped_column(String(400))
    method: Mapped[ConsentMethod] = mapped_column(str_enum(ConsentMethod, "consent_method"))
    point_id: Mapped[str | None] = mapped_column(String(64))  # a specific locker or point
    channel: Mapped[ConsentChannel] = mapped_column(str_enum(ConsentChannel, "consent_channel"))
    granted_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]
    revoked_reason: Mapped[str | None] = mapped_column(Text)
    # Who revoked it (a channel's integration account, an admin), and how the recipient
    # did (when the request said): null for consents revoked before these were kept.
    revoked_by: Mapped[int | None] = mapped_column(ForeignKey("app_user.id"))
    revoked_channel: Mapped[ConsentChannel | None] = mapped_column(
        str_enum(ConsentChannel, "revoked_channel")
    )
    evidence: Mapped[str | None] = mapped_column(Text)
    # Captured on a PDA: its event, and that device's seq (its causal order, rule 6).
    event_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("scan_event.id"), unique=True)
    device_id: Mapped[str | None] = mapped_column(ForeignKey("device.id"))
    seq: Mapped[int | None]
    # Captured on a PDA: the station that PDA was at then (its event's). The consent
    # authorizes only drops a PDA of that station records (SECURITY.md threat 2): a
    # courier of another station knows a tracking number, not the recipient.
    captured_at_station_id: Mapped[int | None] = mapped_column(ForeignKey("station.id"))
    # Who recorded it: the channel's integration account or an admin (API), or the
    # courier whose PDA captured it.
    created_by: Mapped[int | None] = mapped_column(ForeignKey("app_user.id"))
    created_at: Mapped[timestamp]
    # The recording channel's own id for it (its message or call id), unique per
    # recording user: a retry of ``POST /consents`` with it records nothing new.
    client_consent_id: Mapped[str | None] = mapped_column(String(64))
    # When the expiry sweep told the PDAs holding covered parcels that it lapsed.
    expiry_announced_at: Mapped[dt.datetime | None]

    def __repr__(self) -> str:
        return f"<Consent {self.id} {self.scope} {self.method}>"
