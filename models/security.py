from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Index, String, false
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, big_pk, sha256_hex, str64


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
    # pending (the password is being checked) | ok (right password) | failed | limited;
    # or a call limited per caller by the same windows (``sync.sign_in_limits.admit_call``:
    # audit_verify), keyed by the caller in both key columns
    outcome: Mapped[str] = mapped_column(String(16))


class RefreshTokenFamily(Base):
    """The refresh tokens of one sign-in, as rotation follows them (``sync.refresh_tokens``).

    Each refresh token is exchanged once for the next; the family's id is the ``jti``
    of its first token (the tokens' ``fam`` claim), and its row is written at its first
    refresh. It holds the one token that may be exchanged now, the one exchanged last
    and when (a retry within the grace gets the current one again), and whether a
    reuse revoked the family. Kept until its newest token has expired
    (``expires_at``), then purged (job ``refresh_token_purge``). A ``jti`` alone is no
    credential: a token is its signed string.
    """

    __tablename__ = "refresh_token_family"
    __table_args__ = (Index("ix_refresh_token_family_expires_at", "expires_at"),)

    id: Mapped[str64] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("app_user.id"))
    current_jti: Mapped[str64]
    used_jti: Mapped[str | None] = mapped_column(String(64))
    used_at: Mapped[dt.datetime | None]
    expires_at: Mapped[dt.datetime]
    revoked_at: Mapped[dt.datetime | None]
    # Whether the used token was presented again within the grace (a retry), and whether
    # the one used before it was: a retry right after a retried refresh is a reuse
    # (``sync.refresh_tokens``).
    used_retried: Mapped[bool] = mapped_column(default=False, server_default=false())
    retried_before: Mapped[bool] = mapped_column(default=False, server_default=false())
