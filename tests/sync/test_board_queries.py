"""The station board reads a day in a fixed number of queries, however many shifts.

100 shifts x 150 parcels at one station and 10 x 150 at another, written straight
into the tables (Core inserts, no engine), then the board of each is read while
every SQL statement is counted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event, insert, select
from sqlalchemy.orm import Session

from models import (
    Device,
    DeviceSyncState,
    Flag,
    Parcel,
    ScanEvent,
    Shift,
    Station,
    SyncBatch,
    User,
)
from sync.balances import station_board
from tests import factories

DAY = dt.date(2026, 11, 23)
OPENED = dt.datetime(2026, 11, 23, 1, 0, tzinfo=dt.UTC)  # 09:00 in Shanghai
PARCELS_PER_SHIFT = 150


def _station(session: Session, code: str, shifts: int) -> int:
    station_id = session.execute(
        insert(Station).values(code=code, name=code, timezone="Asia/Shanghai")
        .returning(Station.id)
    ).scalar_one()  # fmt: skip
    for n in range(shifts):
        _shift(session, station_id, f"{code}-{n:03d}")
    return station_id


def _shift(session: Session, station_id: int, name: str) -> None:
    courier_id = session.execute(
        insert(User)
        .values(username=name.lower(), role="courier", station_id=station_id, password_hash="x")
        .returning(User.id)
    ).scalar_one()
    session.execute(insert(Device).values(id=name, station_id=station_id))
    seqs = 2 * PARCELS_PER_SHIFT
    session.execute(
        insert(DeviceSyncState).values(
            device_id=name, acked_through_seq=seqs, max_seq=seqs, missing_ranges=[]
        )
    )
    shift_id = session.execute(
        insert(Shift)
        .values(
            station_id=station_id,
            courier_id=courier_id,
            device_id=name,
            status="closed",
            work_date=DAY,
            opened_at=OPENED,
            planned_end_at=OPENED + dt.timedelta(hours=10),
            closed_at=OPENED + dt.timedelta(hours=9),
            seq_at_close=seqs,
        )
        .returning(Shift.id)
    ).scalar_one()
    batch_pk = session.execute(
        insert(SyncBatch)
        .values(
            device_id=name,
            batch_id=uuid.uuid4(),
            station_id=station_id,
            courier_id=courier_id,
            sent_at=OPENED,
            received_at=OPENED,
            clock_offset_ms=0,
            event_count=seqs,
            request_hash="0" * 64,
            receipt={},
        )
        .returning(SyncBatch.id)
    ).scalar_one()
    numbers = [factories.s10() for _ in range(PARCELS_PER_SHIFT)]
    session.execute(
        insert(Parcel),
        [
            {
                "tracking_no": tn,
                "station_id": station_id,
                "service_class": "parcel",
                "recipient_name": "R",
                "address": "A",
            }
            for tn in numbers
        ],
    )
    events: list[dict[str, Any]] = []
    for i, tn in enumerate(numbers):
        for step, kind in enumerate(("checked_out", "delivered")):
            if kind == "delivered" and i % 50 == 0:
                kind = "exception"  # a few are missing at handover
            seq = 2 * i + step + 1
            events.append(
                {
                    "station_id": station_id,
                    "device_id": name,
                    "courier_id": courier_id,
                    "batch_pk": batch_pk,
                    "client_event_id": uuid.uuid4(),
                    "seq": seq,
                    "type": kind,
                    "tracking_no": tn,
                    "occurred_at_device": OPENED + dt.timedelta(minutes=seq),
                    "occurred_at": OPENED + dt.timedelta(minutes=seq),
                    "received_at": OPENED + dt.timedelta(hours=9),
                    "shift_id": shift_id,
                    "details": {"pod": {"pickup_code": "1"}} if kind == "delivered" else {},
                    "content_hash": hashlib.sha256(f"{name}{seq}".encode()).hexdigest(),
                }
            )
    session.execute(insert(ScanEvent), events)
    # The missing parcels' flags, as closing the shift would have raised them.
    session.execute(
        insert(Flag),
        [
            {
                "station_id": station_id,
                "kind": "missing_at_handover",
                "severity": "critical",
                "subject_type": "shift",
                "subject_key": f"{shift_id}:{tn}",
                "evidence": {"event_ids": []},
                "status": "open",
                "shift_id": shift_id,
            }
            for i, tn in enumerate(numbers)
            if i % 50 == 0
        ],
    )


@contextmanager
def counted(session: Session) -> Iterator[list[str]]:
    statements: list[str] = []
    connection = session.connection()

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(connection, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(connection, "before_cursor_execute", count)


def test_the_board_reads_a_day_in_the_same_few_queries_for_10_or_100_shifts(
    session: Session,
) -> None:
    big = _station(session, "BIG", 100)
    small = _station(session, "SMALL", 10)
    session.flush()
    session.expire_all()
    with counted(session) as big_queries:
        big_board = station_board(session=session, station_id=big, work_date=DAY)
    with counted(session) as small_queries:
        small_board = station_board(session=session, station_id=small, work_date=DAY)
    assert len(big_board) == 100 and len(small_board) == 10
    assert len(big_queries) == len(small_queries) <= 6, big_queries
    for row in big_board:
        balance = row.balance
        assert (balance.checked_out, balance.delivered, balance.missing) == (150, 147, 3)
        assert balance.status == "unbalanced"
        assert all(d.flag_id is not None for d in balance.discrepancies)
        assert len(balance.discrepancies) == 3
    # Nothing was written while reading.
    assert all(q.lstrip().upper().startswith("SELECT") for q in big_queries)
    assert session.scalar(select(Shift.id).where(Shift.station_id == big).limit(1)) is not None
