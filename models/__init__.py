"""Typed SQLAlchemy 2.0 models and their Alembic migrations."""

from models.audit import AuditEntry
from models.base import Base, UTCDateTime, utcnow
from models.blob import Blob, BlobUpload, ProofImage
from models.consent import Consent
from models.device import Device
from models.enums import (
    ConsentChannel,
    ConsentMethod,
    ConsentScope,
    DeviceStatus,
    EventType,
    FeedKind,
    FlagSeverity,
    FlagStatus,
    ParcelStatus,
    Role,
    ServiceClass,
)
from models.feed import FeedChange
from models.flag import Flag, FlagChange
from models.parcel import Parcel
from models.station import Station
from models.sync import DeviceSyncState, QuarantinedEvent, ScanEvent, SyncBatch
from models.user import User

__all__ = [
    "AuditEntry",
    "Base",
    "Blob",
    "BlobUpload",
    "Consent",
    "ConsentChannel",
    "ConsentMethod",
    "ConsentScope",
    "Device",
    "DeviceStatus",
    "DeviceSyncState",
    "EventType",
    "FeedChange",
    "FeedKind",
    "Flag",
    "FlagChange",
    "FlagSeverity",
    "FlagStatus",
    "Parcel",
    "ParcelStatus",
    "ProofImage",
    "QuarantinedEvent",
    "Role",
    "ScanEvent",
    "ServiceClass",
    "Station",
    "SyncBatch",
    "User",
    "UTCDateTime",
    "utcnow",
]
