from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from models.base import Base, int_pk, str_enum, timestamp
from models.enums import Role
from models.station import Station


class User(Base):
    """A person or system that signs in: courier, manager, auditor, admin, integration."""

    __tablename__ = "app_user"

    id: Mapped[int_pk]
    username: Mapped[str] = mapped_column(String(64), unique=True)
    full_name: Mapped[str] = mapped_column(String(200), default="")
    role: Mapped[Role] = mapped_column(str_enum(Role, "user_role"))
    station_id: Mapped[int | None] = mapped_column(ForeignKey("station.id"), index=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[timestamp]
    # Carried in every token as "ver"; a password change increments it, so tokens
    # issued before the change are refused whatever the clocks say.
    credentials_version: Mapped[int] = mapped_column(default=0, server_default="0")
    # When the account last signed out of the pages: every page session begun before
    # ends then, a copy of its cookie included (``sync.accounts.sign_out_of_pages``).
    pages_signed_out_at: Mapped[dt.datetime | None]

    station: Mapped[Station | None] = relationship(lazy="raise")

    def __repr__(self) -> str:
        return f"<User {self.username} {self.role}>"
