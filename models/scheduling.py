from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, Document, big_pk


class SchedulerLease(Base):
    """Which scheduler process may run jobs, until when (renewed while it lives).

    A second ``courier-api scheduler`` (or a web worker configured to schedule)
    finds the lease held and stands by; it takes over once the lease expires.
    """

    __tablename__ = "scheduler_lease"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    acquired_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]


class JobRun(Base):
    """One run of a scheduled job: when, how long, and how it ended."""

    __tablename__ = "job_run"
    __table_args__ = (Index("ix_job_run_job_id", "job", "id"),)

    id: Mapped[big_pk]
    job: Mapped[str] = mapped_column(String(64))
    holder: Mapped[str] = mapped_column(String(200))  # the scheduler process that ran it
    started_at: Mapped[dt.datetime]
    finished_at: Mapped[dt.datetime | None]
    duration_ms: Mapped[int | None]
    outcome: Mapped[str] = mapped_column(String(16))  # running | ok | failed
    # What the job did (counts, flags raised), or the error when it failed.
    detail: Mapped[dict[str, Any]] = mapped_column(Document, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
