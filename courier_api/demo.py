"""Demo data for ``make run``: one station and one simulated day at it.

The admin and the auditor are created here; everything else (the station, its
manager, the recipients' channel, six couriers with their PDAs, the day's
parcels and everything the PDAs did with them) is played through the real API
by the simulation (``courier_api.simulation``), seeded, so every ``make run``
shows the same day: shifts balanced and signed off, unbalanced ones with their
flags, a provisional one, proofs with their images.
"""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask
from sqlalchemy import select
from sqlalchemy.orm import Session

from courier_api.simulation import InProcess, Names, Simulation, plan_day
from models import DeviceStatus, Role, Station, User
from sync import directory

STATION_CODE = "DEMO"
PASSWORDS = {
    Role.ADMIN: "admin-demo-pass",
    Role.STATION_MANAGER: "manager-demo-pass",
    Role.COURIER: "courier-demo-pass",
    Role.AUDITOR: "auditor-demo-pass",
    Role.INTEGRATION: "integration-demo-pass",
}
COURIERS = 6
PARCELS = 120
SEED = 2026
NAMES = Names(
    station_code=STATION_CODE,
    station_name="Demo Station Pudong",
    timezone="Asia/Shanghai",
    manager="manager",
    integration="integration",
    courier_prefix="courier",
    device_prefix="PDA-DEMO-",
    manager_password=PASSWORDS[Role.STATION_MANAGER],
    courier_password=PASSWORDS[Role.COURIER],
    integration_password=PASSWORDS[Role.INTEGRATION],
)
ACTIVE_DEVICES = tuple(f"{NAMES.device_prefix}{n:02d}" for n in range(1, COURIERS + 1))
RETIRED_DEVICE = "PDA-DEMO-OLD"
DEMO_LOGINS = (
    f"admin / {PASSWORDS[Role.ADMIN]}  (everything, every station)",
    f"manager / {PASSWORDS[Role.STATION_MANAGER]}  (station {STATION_CODE})",
    f"auditor / {PASSWORDS[Role.AUDITOR]}  (reads every station; phones unmasked)",
    f"integration / {PASSWORDS[Role.INTEGRATION]}  (the recipients' channel)",
    *(
        f"courier{n} / {PASSWORDS[Role.COURIER]}  [device {ACTIVE_DEVICES[n - 1]}]"
        for n in range(1, COURIERS + 1)
    ),
    f"(device {RETIRED_DEVICE} is retired: signing in with it is refused)",
)


def what_the_database_holds(session: Session) -> str | None:
    """What keeps the demo out of this database (``"stations"``, ``"accounts"``), or
    None when it is empty. The demo creates a station and accounts with fixed names
    (``admin``, ``auditor``, ``manager``, ...): an account created before it, as
    README's PostgreSQL steps create ``admin``, would collide with one of them."""
    if session.scalar(select(Station.id).limit(1)) is not None:
        return "stations"
    if session.scalar(select(User.id).limit(1)) is not None:
        return "accounts"
    return None


def demo_is_loaded(session: Session) -> bool:
    return session.scalar(select(Station.id).where(Station.code == STATION_CODE)) is not None


def seed(
    app: Flask,
    session: Session,
    *,
    password_hash_method: str,
    progress: Callable[[str], None] = lambda line: None,
    couriers: int = COURIERS,
    parcels: int = PARCELS,
) -> str:
    """Create the demo's admin and auditor, play the demo day, retire an old PDA."""
    for username, role, full_name in (
        ("admin", Role.ADMIN, "Demo Admin"),
        ("auditor", Role.AUDITOR, "Chen Jing"),
    ):
        directory.create_user(
            session=session,
            username=username,
            role=role,
            station=None,
            password=PASSWORDS[role],
            created_by=None,
            full_name=full_name,
            password_hash_method=password_hash_method,
        )
    session.commit()  # the simulation signs in as the admin, from other sessions
    plan = plan_day(couriers=couriers, parcels=parcels, seed=SEED, names=NAMES)
    transport = InProcess(app)
    try:
        result = Simulation(
            transport, plan, admin=("admin", PASSWORDS[Role.ADMIN]), progress=progress
        ).run()
    finally:
        transport.close()
    station = directory.get_station_by_code(session=session, code=STATION_CODE)
    device = directory.register_device(session=session, device_id=RETIRED_DEVICE, station=station)
    directory.set_device_status(
        session=session, device=device, status=DeviceStatus.RETIRED, changed_by=None
    )
    board = result.expected.as_dict()["board"]
    return (
        f"demo station {STATION_CODE} loaded: a simulated day of {couriers} couriers and "
        f"{parcels} parcels (seed {SEED}): {board['balanced']} shifts balanced, "
        f"{board['unbalanced']} unbalanced, {board['provisional']} provisional"
    )
