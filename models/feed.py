from __future__ import annotations

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, BigId, big_pk, str_enum, timestamp
from models.enums import FeedKind


class FeedChange(Base):
    """One entry of the pull feed: something a courier's PDA should hear about.

    Entries are read in ``(txid, id)`` order. ``txid`` is the writing transaction's
    PostgreSQL transaction id (0 on SQLite, whose writers are serial), which lets a
    reader stop before any transaction still in progress: a change that commits
    late with a lower id is never skipped (see ``sync.feed``).
    """

    __tablename__ = "feed_change"
    __table_args__ = (Index("ix_feed_change_reader", "station_id", "courier_id", "txid", "id"),)

    id: Mapped[big_pk]
    txid: Mapped[int] = mapped_column(BigId, default=0)
    station_id: Mapped[int] = mapped_column(ForeignKey("station.id"))
    courier_id: Mapped[int | None] = mapped_column(ForeignKey("app_user.id"))
    kind: Mapped[FeedKind] = mapped_column(str_enum(FeedKind, "feed_kind"))
    tracking_no: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[timestamp]
