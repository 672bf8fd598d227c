"""Typed SQLAlchemy 2.0 models and their Alembic migrations."""

from models.base import Base, UTCDateTime, utcnow
from models.device import Device
from models.enums import DeviceStatus, Role, ServiceClass
from models.parcel import Parcel
from models.station import Station
from models.user import User

__all__ = [
    "Base",
    "Device",
    "DeviceStatus",
    "Parcel",
    "Role",
    "ServiceClass",
    "Station",
    "User",
    "UTCDateTime",
    "utcnow",
]
