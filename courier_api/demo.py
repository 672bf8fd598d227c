"""Demo data for ``make run``: one station, its people, PDAs and a day's parcels."""

from __future__ import annotations

import random

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import DeviceStatus, FeedKind, Parcel, Role, ServiceClass, Station
from sync import directory, feed
from sync.tracking import s10_check_digit

STATION_CODE = "DEMO"
PASSWORDS = {
    Role.ADMIN: "admin-demo-pass",
    Role.STATION_MANAGER: "manager-demo-pass",
    Role.COURIER: "courier-demo-pass",
    Role.AUDITOR: "auditor-demo-pass",
    Role.INTEGRATION: "integration-demo-pass",
}
USERS = (
    ("admin", Role.ADMIN, "Demo Admin"),
    ("manager", Role.STATION_MANAGER, "Wang Fang"),
    ("courier1", Role.COURIER, "Li Wei"),
    ("courier2", Role.COURIER, "Zhang Min"),
    ("auditor", Role.AUDITOR, "Chen Jing"),
    ("integration", Role.INTEGRATION, "Recipient app"),
)
ACTIVE_DEVICES = ("PDA-DEMO-01", "PDA-DEMO-02")
RETIRED_DEVICE = "PDA-DEMO-OLD"
DEMO_LOGINS = tuple(
    f"{name} / {PASSWORDS[role]}"
    + (
        f"  [device {ACTIVE_DEVICES[0] if name == 'courier1' else ACTIVE_DEVICES[1]}]"
        if role == Role.COURIER
        else ""
    )
    for name, role, _ in USERS
) + (f"(device {RETIRED_DEVICE} is retired: signing in with it is refused)",)
STREETS = ("Century Ave", "Zhangyang Rd", "Pudong Ave", "Dongfang Rd", "Yanggao Rd")


def database_is_empty(session: Session) -> bool:
    return session.scalar(select(Station.id).limit(1)) is None


def seed(session: Session, *, password_hash_method: str, parcels: int = 40) -> str:
    station = directory.create_station(
        session=session, code=STATION_CODE, name="Demo Station Pudong", timezone="Asia/Shanghai"
    )
    couriers = []
    for username, role, full_name in USERS:
        user = directory.create_user(
            session=session,
            username=username,
            role=role,
            station=station if role.needs_station else None,
            password=PASSWORDS[role],
            full_name=full_name,
            password_hash_method=password_hash_method,
        )
        if role == Role.COURIER:
            couriers.append(user.id)
    for device_id in (*ACTIVE_DEVICES, RETIRED_DEVICE):
        device = directory.register_device(session=session, device_id=device_id, station=station)
    directory.set_device_status(session=session, device=device, status=DeviceStatus.RETIRED)
    rng = random.Random(7)
    classes = list(ServiceClass)
    assignments = []
    for n in range(parcels):
        serial = f"{10000000 + rng.randrange(89999999):08d}"
        tracking_no = (
            f"EE{serial}{s10_check_digit(serial)}CN" if n % 3 == 0 else f"SF{1300000000000 + n}"
        )
        session.add(
            Parcel(
                tracking_no=tracking_no,
                station_id=station.id,
                service_class=classes[n % len(classes)],
                recipient_name=f"Recipient {n + 1}",
                recipient_phone=f"+86138{rng.randrange(10**8):08d}",
                address=f"{rng.randrange(1, 999)} {rng.choice(STREETS)}, Pudong, Shanghai",
                lat=31.22 + rng.random() / 50,
                lon=121.54 + rng.random() / 50,
                # Planned for the couriers in turn: their PDAs pull them.
                planned_courier_id=couriers[n % len(couriers)],
                courier_id=couriers[n % len(couriers)],
            )
        )
        assignments.append(
            feed.FeedEntry(station.id, couriers[n % len(couriers)], FeedKind.PARCEL, tracking_no)
        )
    session.flush()
    feed.record(session, assignments)
    return (
        f"demo station {STATION_CODE} loaded: {len(USERS)} users, "
        f"{len(ACTIVE_DEVICES) + 1} devices, {parcels} parcels planned for the couriers"
    )
