"""Typed SQLAlchemy 2.0 models and their Alembic migrations."""

from models.audit import AuditEntry, AuditEntryParcel
from models.base import Base, UTCDateTime, utcnow
from models.blob import Blob, BlobUpload, ProofImage, RejectedImage
from models.consent import Consent
from models.device import Device
from models.enums import (
    ConsentChannel,
    ConsentMethod,
    ConsentRequestStatus,
    ConsentScope,
    DeliveryStatus,
    DeviceStatus,
    EventType,
    FeedKind,
    FlagSeverity,
    FlagStatus,
    ParcelStatus,
    ReportKind,
    Role,
    ServiceClass,
    ShiftStatus,
)
from models.feed import FeedChange
from models.flag import Flag, FlagChange
from models.integrations import (
    ConsentRequest,
    OutboxMessage,
    WebhookDelivery,
    WebhookSubscription,
)
from models.parcel import Parcel
from models.report import StationReport
from models.scheduling import JobRun, SchedulerLease
from models.security import RefreshTokenFamily, SignInAttempt
from models.shift import Shift
from models.station import Station
from models.sync import DeviceSyncState, QuarantinedEvent, ScanEvent, SeqWriteOff, SyncBatch
from models.user import User

__all__ = [
    "AuditEntry",
    "AuditEntryParcel",
    "Base",
    "Blob",
    "BlobUpload",
    "Consent",
    "ConsentChannel",
    "ConsentMethod",
    "ConsentRequest",
    "ConsentRequestStatus",
    "ConsentScope",
    "DeliveryStatus",
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
    "JobRun",
    "Parcel",
    "OutboxMessage",
    "ParcelStatus",
    "ProofImage",
    "QuarantinedEvent",
    "RefreshTokenFamily",
    "RejectedImage",
    "ReportKind",
    "Role",
    "ScanEvent",
    "SchedulerLease",
    "SeqWriteOff",
    "ServiceClass",
    "Shift",
    "ShiftStatus",
    "SignInAttempt",
    "Station",
    "StationReport",
    "SyncBatch",
    "User",
    "UTCDateTime",
    "WebhookDelivery",
    "WebhookSubscription",
    "utcnow",
]
