"""Test data: stations, users, devices and parcels, flushed into the test's transaction."""

from __future__ import annotations

import datetime as dt
import uuid
from itertools import count
from typing import Any

from sqlalchemy.orm import Session

from models import Device, DeviceStatus, Parcel, Role, ServiceClass, Station, User
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
