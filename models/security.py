from __future__ import annotations

import datetime as dt

from sqlalchemy import Index, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, big_pk, sha256_hex


class SignInAttempt(Base):
    """One sign-in attempt, kept while a rate limit may still count it (minutes).

    Shared by every web worker and replica through the database. The username and
    the client address are stored as keyed hashes: a password typed into the
    username field must not sit in a table, and the limits only compare them.
    """

    __tablename__ = "sign_in_attempt"
    __table_args__ = (
        Index("ix_sign_in_attempt_username_at", "username_key", "at"),
        Index("ix_sign_in_attempt_address_at", "address_key", "at"),
        Index("ix_sign_in_attempt_at", "at"),
    )

    id: Mapped[big_pk]
    at: Mapped[dt.datetime]
    username_key: Mapped[sha256_hex]
    address_key: Mapped[sha256_hex]
    # pending (the password is being checked) | ok (right password) | failed | limited
    outcome: Mapped[str] = mapped_column(String(16))
