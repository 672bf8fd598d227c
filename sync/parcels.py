"""Parcel intake: many items per call, each judged on its own."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Parcel, ServiceClass, Station
from sync.errors import DomainError, InvalidInput, NotFound, PermissionDenied
from sync.phones import normalize_phone
from sync.tracking import TrackingNumberPolicy, normalize

# Well under SQLite's and PostgreSQL's bound-parameter limits.
_IN_CHUNK = 900


class IntakeStatus(enum.StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    REJECTED = "rejected"


@dataclass(frozen=True)
class ParcelDraft:
    """One intake item after its shape was checked, before the domain rules."""

    tracking_no: str
    service_class: ServiceClass
    recipient_name: str
    address: str
    recipient_phone: str | None = None
    lat: float | None = None
    lon: float | None = None
    station: str | None = None  # station code; defaults to the caller's station


@dataclass(frozen=True)
class IntakeRules:
    tracking: TrackingNumberPolicy
    phone_region: str | None


@dataclass(frozen=True)
class IntakeScope:
    """Where the caller may put parcels: a manager only at their own station."""

    default_station_id: int | None
    allowed_station_ids: frozenset[int] | None  # None: every station


@dataclass
class IntakeResult:
    index: int
    tracking_no: str
    status: IntakeStatus
    error: DomainError | None = None
    parcel: Parcel | None = field(default=None, repr=False)


def intake_parcels(
    *,
    session: Session,
    drafts: Sequence[tuple[int, ParcelDraft]],
    rules: IntakeRules,
    scope: IntakeScope,
) -> list[IntakeResult]:
    """Create or update parcels; one bad item never stops the others.

    ``drafts`` pairs each item with its index in the caller's list so results
    line up with the request. A parcel already known is updated when its data
    changed and reported ``unchanged`` otherwise, so re-sending a file is safe.
    """
    stations = _stations_by_code(session, (d.station for _, d in drafts if d.station))
    existing = _parcels_by_tracking_no(session, (normalize(d.tracking_no) for _, d in drafts))
    results = []
    for index, draft in drafts:
        try:
            values = _validated_values(draft, rules=rules, scope=scope, stations=stations)
            result = _apply(session, index, values, existing, scope)
        except DomainError as error:
            result = IntakeResult(
                index, normalize(draft.tracking_no), IntakeStatus.REJECTED, error
            )
        results.append(result)
    session.flush()
    return results


def get_parcel(*, session: Session, tracking_no: str) -> Parcel:
    parcel = session.scalar(select(Parcel).where(Parcel.tracking_no == normalize(tracking_no)))
    if parcel is None:
        raise NotFound(f"no parcel {tracking_no!r}", code="parcel_not_found")
    return parcel


def _validated_values(
    draft: ParcelDraft,
    *,
    rules: IntakeRules,
    scope: IntakeScope,
    stations: dict[str, Station],
) -> dict[str, object]:
    tracking_no = rules.tracking.validate(draft.tracking_no)
    if (draft.lat is None) != (draft.lon is None):
        raise InvalidInput(
            "give both lat and lon, or neither",
            code="incomplete_location",
            field="lat" if draft.lat is None else "lon",
        )
    station_id = _station_id(draft.station, stations, scope)
    phone = (
        normalize_phone(
            draft.recipient_phone, default_region=rules.phone_region, field="recipient_phone"
        )
        if draft.recipient_phone
        else None
    )
    for name in ("recipient_name", "address"):
        if not getattr(draft, name).strip():
            raise InvalidInput(f"{name} must not be empty", code="empty_value", field=name)
    return {
        "tracking_no": tracking_no,
        "station_id": station_id,
        "service_class": draft.service_class,
        "recipient_name": draft.recipient_name.strip(),
        "recipient_phone": phone,
        "address": draft.address.strip(),
        "lat": draft.lat,
        "lon": draft.lon,
    }


def _station_id(code: str | None, stations: dict[str, Station], scope: IntakeScope) -> int:
    if code is None:
        if scope.default_station_id is None:
            raise InvalidInput("station is required", code="station_required", field="station")
        station_id = scope.default_station_id
    else:
        station = stations.get(code.strip().upper())
        if station is None:
            raise InvalidInput(
                f"no station with code {code!r}", code="station_not_found", field="station"
            )
        station_id = station.id
    if scope.allowed_station_ids is not None and station_id not in scope.allowed_station_ids:
        raise PermissionDenied(
            "you may take in parcels only for your own station",
            code="station_forbidden",
            field="station",
        )
    return station_id


def _apply(
    session: Session,
    index: int,
    values: dict[str, object],
    existing: dict[str, Parcel],
    scope: IntakeScope,
) -> IntakeResult:
    tracking_no = str(values["tracking_no"])
    parcel = existing.get(tracking_no)
    if parcel is None:
        parcel = Parcel(**values)
        session.add(parcel)
        existing[tracking_no] = parcel
        return IntakeResult(index, tracking_no, IntakeStatus.CREATED, parcel=parcel)
    if (
        scope.allowed_station_ids is not None
        and parcel.station_id not in scope.allowed_station_ids
    ):
        raise PermissionDenied(
            f"parcel {tracking_no} belongs to another station",
            code="parcel_at_other_station",
            field="tracking_no",
        )
    changed = {k: v for k, v in values.items() if getattr(parcel, k) != v}
    if not changed:
        return IntakeResult(index, tracking_no, IntakeStatus.UNCHANGED, parcel=parcel)
    for key, value in changed.items():
        setattr(parcel, key, value)
    return IntakeResult(index, tracking_no, IntakeStatus.UPDATED, parcel=parcel)


def _stations_by_code(session: Session, codes: Iterable[str]) -> dict[str, Station]:
    wanted = sorted({code.strip().upper() for code in codes})
    found: dict[str, Station] = {}
    for chunk in _chunks(wanted):
        for station in session.scalars(select(Station).where(Station.code.in_(chunk))):
            found[station.code] = station
    return found


def _parcels_by_tracking_no(session: Session, numbers: Iterable[str]) -> dict[str, Parcel]:
    wanted = sorted(set(numbers))
    found: dict[str, Parcel] = {}
    for chunk in _chunks(wanted):
        for parcel in session.scalars(select(Parcel).where(Parcel.tracking_no.in_(chunk))):
            found[parcel.tracking_no] = parcel
    return found


def _chunks(items: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(items), _IN_CHUNK):
        yield items[start : start + _IN_CHUNK]
