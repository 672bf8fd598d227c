"""Closed vocabularies of the domain, stored as their string values."""

from __future__ import annotations

import enum


class Role(enum.StrEnum):
    COURIER = "courier"
    STATION_MANAGER = "station_manager"
    AUDITOR = "auditor"
    ADMIN = "admin"
    INTEGRATION = "integration"

    @property
    def needs_station(self) -> bool:
        """Couriers and managers work at one station; the others work across stations."""
        return self in (Role.COURIER, Role.STATION_MANAGER)


class DeviceStatus(enum.StrEnum):
    ACTIVE = "active"
    RETIRED = "retired"
    LOST = "lost"


class ServiceClass(enum.StrEnum):
    EXPRESS = "express"
    PARCEL = "parcel"
    REGISTERED = "registered"
    ORDINARY = "ordinary"


class EventType(enum.StrEnum):
    """What a scan event says happened (DESIGN.md, "Scan event")."""

    CHECKED_OUT = "checked_out"
    OUT_FOR_DELIVERY = "out_for_delivery"
    DELIVERY_ATTEMPT_FAILED = "delivery_attempt_failed"
    DELIVERED = "delivered"
    DELIVERED_TO_LOCKER = "delivered_to_locker"
    DELIVERED_TO_PICKUP_POINT = "delivered_to_pickup_point"
    RETURNED_TO_STATION = "returned_to_station"
    COLLECTED_FROM_LOCKER = "collected_from_locker"
    EXCEPTION = "exception"
    CONSENT_CAPTURED = "consent_captured"
    CONSENT_REQUESTED = "consent_requested"  # asked at the door; answered by the recipient
    CORRECTION = "correction"


class ParcelStatus(enum.StrEnum):
    """Where a parcel stands, as projected from its events."""

    CHECKED_OUT = "checked_out"
    OUT_FOR_DELIVERY = "out_for_delivery"
    ATTEMPT_FAILED = "attempt_failed"
    DELIVERED = "delivered"
    IN_LOCKER = "in_locker"
    AT_PICKUP_POINT = "at_pickup_point"
    COLLECTED = "collected"
    RETURNED = "returned"
    EXCEPTION = "exception"


class FlagSeverity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class FlagStatus(enum.StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"
    CLOSED = "closed"  # its cause disappeared; closed by the system with the reason


class FeedKind(enum.StrEnum):
    """Entries of a device's pull feed."""

    PARCEL = "parcel"
    PARCEL_REMOVED = "parcel_removed"
    CONSENT = "consent"  # granted, revoked or expired: the PDA replaces its copy
    CONSENT_REQUEST = "consent_request"  # the courier's request answered, or its ask failed


class ConsentMethod(enum.StrEnum):
    LOCKER = "locker"
    PICKUP_POINT = "pickup_point"
    ANY = "any"


class ConsentChannel(enum.StrEnum):
    SMS = "sms"
    APP = "app"
    PHONE_CALL = "phone_call"
    IN_PERSON = "in_person"


class ConsentScope(enum.StrEnum):
    PARCEL = "parcel"  # this one parcel
    STANDING = "standing"  # every parcel for this recipient phone and address


class ShiftStatus(enum.StrEnum):
    """Where a shift is in its life; its balance is computed, never stored."""

    OPEN = "open"  # the courier is out: events are still being recorded
    CLOSED = "closed"  # handed over (归班交接), waiting for a manager's sign-off
    SIGNED_OFF = "signed_off"  # a manager signed the handover off


class ReportKind(enum.StrEnum):
    DAILY = "daily"  # 日监控
    WEEKLY = "weekly"  # 周分析
    MONTHLY = "monthly"  # 月通报


class ConsentRequestStatus(enum.StrEnum):
    """Where a request for a recipient's consent stands (asked at the door)."""

    PENDING = "pending"  # sent to the recipient's channel, no answer yet
    GRANTED = "granted"
    REFUSED = "refused"
    UNSENT = "unsent"  # nobody to ask: the parcel is not taken in, or has no phone
    CANCELLED = "cancelled"  # the PDA voided the request (a correction): no answer counts
    REVOKED = "revoked"  # granted, and the consent that answered it was revoked since


class DeliveryStatus(enum.StrEnum):
    """A webhook message's delivery to one subscription."""

    PENDING = "pending"  # waiting for its first or next attempt
    DELIVERED = "delivered"  # the receiver answered 2xx
    DEAD = "dead"  # attempts exhausted; parked with the last error, replayable
    SKIPPED = "skipped"  # not sent: moot by the time it was due (``skipped_reason``)
