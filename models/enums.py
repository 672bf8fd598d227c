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
