from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Date, ForeignKey, Index, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, BigId, Document, int_pk, str_enum, timestamp
from models.enums import ShiftStatus


class Shift(Base):
    """A courier's working session on one PDA at one station (DESIGN.md "Shift").

    Opened at the station, closed at the return (归班交接), signed off by a manager.
    Its manifest and balance are computed from the scan events filed under it
    (``scan_event.shift_id``), never typed in. What is stored here is what the
    people involved declared and decided: times, the sequence numbers the PDA said
    bound the shift, and the sign-off with the balance the manager saw.
    """

    __tablename__ = "shift"
    __table_args__ = (
        # At most one open shift per PDA.
        Index(
            "uq_shift_open_per_device",
            "device_id",
            unique=True,
            postgresql_where=text("status = 'open'"),
            sqlite_where=text("status = 'open'"),
        ),
        # The station board: a station's shifts of one day.
        Index("ix_shift_station_work_date", "station_id", "work_date"),
        # Filing an event under the shift its device had open at the time.
        Index("ix_shift_device_opened", "device_id", "opened_at"),
        # A PDA's sign-in: the highest seqs its shifts declared, one index entry each
        # (``sync.device_state.held_max_seq``), however many shifts it has worked.
        Index("ix_shift_device_last_seq", "device_id", "last_seq"),
        Index("ix_shift_device_first_seq", "device_id", "first_seq"),
        # Sweeps: open shifts past their planned end.
        Index("ix_shift_status_planned_end", "status", "planned_end_at"),
        # Where the courier of a shift still open went on (``sync.balances.
        # where_couriers_went``): their shifts still open, and those handed over since.
        Index("ix_shift_courier_status_opened", "courier_id", "status", "opened_at"),
    )

    id: Mapped[int_pk]
    station_id: Mapped[int] = mapped_column(ForeignKey("station.id"))
    courier_id: Mapped[int] = mapped_column(ForeignKey("app_user.id"))
    device_id: Mapped[str] = mapped_column(ForeignKey("device.id"))
    status: Mapped[ShiftStatus] = mapped_column(
        str_enum(ShiftStatus, "shift_status"), default=ShiftStatus.OPEN
    )
    # The station's local date when the shift opened: the "day" of boards and reports.
    work_date: Mapped[dt.date] = mapped_column(Date)
    opened_at: Mapped[timestamp]
    planned_end_at: Mapped[dt.datetime]
    # Declared by the PDA: the seq of its first event of the shift (at opening) and of
    # its last one (at closing). They bound the sequence numbers a gap may hide.
    first_seq: Mapped[int | None] = mapped_column(BigId)
    last_seq: Mapped[int | None] = mapped_column(BigId)
    # The device's highest seq the server held when the shift closed: a record of what
    # had arrived by the handover (a seq written off as lost never arrived: not held).
    seq_at_close: Mapped[int | None] = mapped_column(BigId)
    closed_at: Mapped[dt.datetime | None]
    closed_by: Mapped[int | None] = mapped_column(ForeignKey("app_user.id"))
    signed_off_at: Mapped[dt.datetime | None]
    signed_off_by: Mapped[int | None] = mapped_column(ForeignKey("app_user.id"))
    signoff_note: Mapped[str | None] = mapped_column(Text)
    # A sign-off of a provisional balance must say why it could not wait.
    signoff_forced_reason: Mapped[str | None] = mapped_column(Text)
    # The balance as the manager saw it when signing off (status, counts, discrepancies).
    signoff_balance: Mapped[dict[str, Any] | None] = mapped_column(Document)
    # Events that landed after a sign-off reopen the shift for another one.
    reopened_count: Mapped[int] = mapped_column(default=0)
    reopened_at: Mapped[dt.datetime | None]

    def __repr__(self) -> str:
        return f"<Shift {self.id} {self.device_id} {self.status}>"
