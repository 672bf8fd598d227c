from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ForeignKey, Index, String, Text, UniqueConstraint, text
from sqlalchemy.engine.default import DefaultExecutionContext
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, Document, UTCDateTime, int_pk, str_enum, timestamp, utcnow
from models.enums import FlagSeverity, FlagStatus

# A flag of no station (the system's): NULLs are distinct in a unique constraint.
NO_STATION = "station_id IS NULL"


def _when_raised(context: DefaultExecutionContext) -> dt.datetime:
    """A new flag opened when it was raised (the same instant, not a moment after)."""
    raised: dt.datetime = context.get_current_parameters()["raised_at"]
    return raised


def parcel_of(subject_type: str, subject_key: str) -> str | None:
    """The tracking number of the parcel a flag is about: a parcel's own flag (subject
    ``parcel``, its number) or its handover in a shift (subject ``shift``,
    ``<shift id>:<tracking no>``); None for any other (a shift's, a PDA's, an event's)."""
    if subject_type == "parcel":
        return subject_key
    if subject_type == "shift":
        _, colon, tracking_no = subject_key.partition(":")
        return tracking_no if colon else None
    return None


def _parcel_of_subject(context: DefaultExecutionContext) -> str | None:
    """A new flag's parcel, from its subject: set however the flag is inserted."""
    row = context.get_current_parameters()
    return parcel_of(row["subject_type"], row["subject_key"])


class Flag(Base):
    """A discrepancy or violation: one per kind and subject at each station (a parcel or a
    device moves between stations: each manager settles their own), however often it is
    found (``sync.flags``)."""

    __tablename__ = "flag"
    __table_args__ = (
        UniqueConstraint(
            "kind",
            "subject_type",
            "subject_key",
            "station_id",
            name="uq_flag_kind_subject_station",
        ),
        Index(
            "uq_flag_kind_subject_no_station",
            "kind",
            "subject_type",
            "subject_key",
            unique=True,
            postgresql_where=text(NO_STATION),
            sqlite_where=text(NO_STATION),
        ),
        Index("ix_flag_station_status", "station_id", "status"),
        # The station's queue, newest first; and the flags raised in a report's period.
        Index("ix_flag_station_id", "station_id", "id"),
        Index("ix_flag_station_raised", "station_id", "raised_at"),
        # The station's queue as it reads: latest opened first (a flag opened again rises).
        Index("ix_flag_station_opened", "station_id", "opened_at", "id"),
        # The queue across stations as it reads (an auditor's, an admin's ``GET /flags``).
        Index("ix_flag_opened", "opened_at", "id"),
        # A subject's flags of every kind (a parcel's, for its proof and its shift's
        # balance): the unique constraint leads with the kind, so it cannot serve them.
        Index("ix_flag_subject", "subject_type", "subject_key"),
        # A parcel's flags, its own and its handovers' (``GET /flags?tracking_no=``), as
        # the queue lists them: a handover flag's subject key only ends with the number.
        Index("ix_flag_tracking_no", "tracking_no", "opened_at", "id"),
    )

    id: Mapped[int_pk]
    station_id: Mapped[int | None] = mapped_column(ForeignKey("station.id"))
    kind: Mapped[str] = mapped_column(String(64))
    severity: Mapped[FlagSeverity] = mapped_column(str_enum(FlagSeverity, "flag_severity"))
    subject_type: Mapped[str] = mapped_column(String(16))  # parcel | device | event | shift
    subject_key: Mapped[str] = mapped_column(String(160))
    # The parcel it is about, from its subject (``parcel_of``): None for a flag of a
    # shift, a PDA or an event.
    tracking_no: Mapped[str | None] = mapped_column(String(40), default=_parcel_of_subject)
    evidence: Mapped[dict[str, Any]] = mapped_column(Document)
    status: Mapped[FlagStatus] = mapped_column(
        str_enum(FlagStatus, "flag_status"), default=FlagStatus.OPEN
    )
    # The courier concerned, when there is one (for the station's queue and filters).
    courier_id: Mapped[int | None] = mapped_column(ForeignKey("app_user.id"))
    # The shift concerned, for a shift's own flags (handover discrepancies, sign-off).
    shift_id: Mapped[int | None] = mapped_column(ForeignKey("shift.id"), index=True)
    raised_at: Mapped[timestamp]
    # When it last became open: raised, or opened again (by the system, or raised again on
    # more than a decision covered): where the queue lists it (``sync.flags.list_flags``).
    opened_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_when_raised)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    closed_reason: Mapped[str | None] = mapped_column(Text)
    # A manager's latest decision on the flag (acknowledged or resolved) and what it
    # covered: the event ids and images of its evidence then. A rule flag judged again
    # takes that status while its cause stands only on what they saw (``sync.flags.
    # judged_status``): its status is a function of the events and the decision,
    # however the events were batched (rule 3).
    decision: Mapped[FlagStatus | None] = mapped_column(str_enum(FlagStatus, "flag_decision"))
    decided_on: Mapped[dict[str, Any] | None] = mapped_column(Document)

    def __repr__(self) -> str:
        return f"<Flag {self.kind} {self.subject_type}:{self.subject_key} {self.status}>"


class FlagChange(Base):
    """Every change of a flag's status, by whom (None: the system) and why."""

    __tablename__ = "flag_change"

    id: Mapped[int_pk]
    flag_id: Mapped[int] = mapped_column(ForeignKey("flag.id"), index=True)
    at: Mapped[timestamp]
    by_user_id: Mapped[int | None] = mapped_column(ForeignKey("app_user.id"))
    from_status: Mapped[FlagStatus | None] = mapped_column(str_enum(FlagStatus, "from_status"))
    to_status: Mapped[FlagStatus] = mapped_column(str_enum(FlagStatus, "to_status"))
    note: Mapped[str | None] = mapped_column(Text)
