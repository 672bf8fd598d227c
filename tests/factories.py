"""Test data: stations, users, devices and parcels, flushed into the test's transaction."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from itertools import count
from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.orm import Session

from models import (
    Blob,
    Device,
    DeviceStatus,
    DeviceSyncState,
    Flag,
    FlagChange,
    Parcel,
    Role,
    ScanEvent,
    ServiceClass,
    Shift,
    Station,
    SyncBatch,
    User,
)
from sync.accounts import hash_password
from sync.tracking import s10_check_digit

PASSWORD = "correct-horse-9"
_PASSWORD_HASH = hash_password(PASSWORD, method="pbkdf2:sha256:1000")
_serials = count(10000001)


def station(session: Session, code: str = "ST1", name: str | None = None) -> Station:
    obj = Station(code=code, name=name or f"Station {code}", timezone="Asia/Shanghai")
    session.add(obj)
    session.flush()
    return obj


def user(
    session: Session,
    username: str,
    role: str,
    station: Station | None = None,
    active: bool = True,
) -> User:
    obj = User(
        username=username,
        role=Role(role),
        station_id=station.id if station else None,
        password_hash=_PASSWORD_HASH,
        active=active,
    )
    session.add(obj)
    session.flush()
    return obj


def device(
    session: Session,
    device_id: str,
    station: Station,
    status: DeviceStatus = DeviceStatus.ACTIVE,
) -> Device:
    obj = Device(id=device_id, station_id=station.id, status=status)
    session.add(obj)
    session.flush()
    return obj


def s10(prefix: str = "RR", country: str = "GB") -> str:
    """A fresh, valid S10 tracking number."""
    serial = f"{next(_serials):08d}"
    return f"{prefix}{serial}{s10_check_digit(serial)}{country}"


def typed_loosely(tracking_no: str, separator: str = " ") -> str:
    """An S10 number as a person types it into a PDA: lower case, in groups
    (``rr 4731 2482 9gb``, ``rr-4731-2482-9gb``), which ``sync.tracking.normalize``
    reads back as the number."""
    groups = (tracking_no[:2], tracking_no[2:6], tracking_no[6:10], tracking_no[10:])
    return separator.join(groups).lower()


def stored_image(session: Session, digest: str) -> Blob:
    """The row of an image the PDA uploaded (its bytes are not needed by the rules)."""
    blob = Blob(sha256=digest, media_type="image/png", size_bytes=100, width=10, height=10)
    session.add(blob)
    session.flush()
    return blob


def parcel(
    session: Session,
    station: Station,
    tracking_no: str | None = None,
    service_class: ServiceClass = ServiceClass.EXPRESS,
    phone: str | None = "+8613812345678",
) -> Parcel:
    obj = Parcel(
        tracking_no=tracking_no or s10(),
        station_id=station.id,
        service_class=service_class,
        recipient_name="Recipient",
        recipient_phone=phone,
        address="1 Century Ave",
    )
    session.add(obj)
    session.flush()
    return obj


def station_with_pdas(
    session: Session, code: str, pdas: dict[str, str], *, parcels: int
) -> tuple[Station, list[str]]:
    """A station with a courier and their PDA for each ``{username: device id}``, and
    the tracking numbers of ``parcels`` parcels of it (flushed; the caller commits)."""
    place = station(session, code=code)
    for username, device_id in pdas.items():
        user(session, username, "courier", place)
        device(session, device_id, place)
    return place, [parcel(session, place).tracking_no for _ in range(parcels)]


def event(
    seq: int,
    tracking_no: str,
    type: str = "checked_out",
    occurred_at: dt.datetime | None = None,
    client_event_id: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """One scan event as a PDA sends it (device clock); by default a few hours ago, a
    second apart per seq, so that it lies before a push sent now."""
    when = occurred_at or dt.datetime.now(dt.UTC) - dt.timedelta(hours=3, seconds=-seq)
    return {
        "client_event_id": client_event_id or str(uuid.uuid4()),
        "seq": seq,
        "type": type,
        "tracking_no": tracking_no,
        "occurred_at": when.isoformat(),
        **fields,
    }


def locker_drop(
    seq: int, tracking_no: str, occurred_at: dt.datetime, locker_id: str = "L-1"
) -> dict[str, Any]:
    """A delivery to a locker with its pickup code, as a PDA sends it."""
    return event(
        seq,
        tracking_no,
        "delivered_to_locker",
        occurred_at=occurred_at,
        locker_id=locker_id,
        compartment="1",
        pod={"pickup_code": "1234"},
    )


def push_body(
    device_id: str,
    events: list[dict[str, Any]],
    batch_id: str | None = None,
    sent_at: dt.datetime | None = None,
) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "batch_id": batch_id or str(uuid.uuid4()),
        "sent_at": (sent_at or dt.datetime.now(dt.UTC)).isoformat(),
        "events": events,
    }


def station_day(
    session: Session, code: str, *, shifts: int, parcels_per_shift: int, day: dt.date
) -> int:
    """A station's closed day written straight into the tables (Core inserts, no engine):
    ``shifts`` couriers with a PDA each, ``parcels_per_shift`` parcels each checked out
    and delivered with a proof, but one in 50 that ends in an exception and is missing
    at handover, with its flag. For tests and benchmarks of reads over many shifts."""
    opened = dt.datetime.combine(day, dt.time(1, 0), tzinfo=dt.UTC)  # 09:00 in Shanghai
    station_id = session.execute(
        insert(Station).values(code=code, name=code, timezone="Asia/Shanghai")
        .returning(Station.id)
    ).scalar_one()  # fmt: skip
    for n in range(shifts):
        _closed_shift(session, station_id, f"{code}-{n:03d}", day, opened, parcels_per_shift)
    return station_id


def _closed_shift(
    session: Session, station_id: int, name: str, day: dt.date, opened: dt.datetime, parcels: int
) -> None:
    courier_id = session.execute(
        insert(User)
        .values(username=name.lower(), role="courier", station_id=station_id, password_hash="x")
        .returning(User.id)
    ).scalar_one()
    session.execute(insert(Device).values(id=name, station_id=station_id))
    seqs = 2 * parcels
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
            work_date=day,
            opened_at=opened,
            planned_end_at=opened + dt.timedelta(hours=10),
            closed_at=opened + dt.timedelta(hours=9),
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
            sent_at=opened,
            received_at=opened,
            clock_offset_ms=0,
            event_count=seqs,
            request_hash="0" * 64,
            receipt={},
        )
        .returning(SyncBatch.id)
    ).scalar_one()
    numbers = [s10() for _ in range(parcels)]
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
                    "occurred_at_device": opened + dt.timedelta(minutes=seq),
                    "occurred_at": opened + dt.timedelta(minutes=seq),
                    "received_at": opened + dt.timedelta(hours=9),
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


def flag_raised_at(session: Session, flag: Flag, when: dt.datetime) -> Flag:
    """A flag just raised, dated as if the push raising it had stored it at ``when`` (a
    push committing late): its ``raised_at``, its place in the queue (``opened_at``) and
    its opening in its history, which a walk through the flags counts
    (``sync.flags.check_flag_walk``)."""
    session.flush()
    flag.raised_at = flag.opened_at = when
    session.execute(
        update(FlagChange)
        .where(FlagChange.flag_id == flag.id, FlagChange.from_status.is_(None))
        .values(at=when)
    )
    return flag
