"""A station day, planned from a seed before any of it happens (pure).

The plan says who the couriers are, which PDA each carries and how it behaves
(a clock running fast, hours offline, a last batch that never comes, a batch
sent twice), and what becomes of every parcel (its *fate*). From the plan alone
it also says what the station should show once the day is played through the
API: each shift's balance and the flags standing. The simulation test checks
that the server, which knows none of this, shows exactly that.
"""

from __future__ import annotations

import enum
import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from models import ServiceClass
from sync.handover import COUNT_FIELDS
from sync.tracking import s10_check_digit


class Fate(enum.StrEnum):
    DELIVERED = "delivered"  # in person, with a proof (a signature and a photo for express)
    DELIVERED_WITHOUT_POD = "delivered_without_pod"  # express, handed over, no signature
    LOCKER = "locker"  # a class that needs no consent, left in a locker
    LOCKER_CONSENT_BEFORE = "locker_consent_before"  # express; the recipient's app agreed first
    LOCKER_WITHOUT_CONSENT = "locker_without_consent"  # express; nobody agreed
    LOCKER_CONSENT_AFTER = "locker_consent_after"  # express; the agreement came after the drop
    PICKUP_POINT_CAPTURED = "pickup_point_captured"  # express; agreed at the door, on the PDA
    DOOR_REQUEST_GRANTED = "door_request_granted"  # express; asked at the door, granted by SMS
    RETURNED = "returned"  # nobody home, brought back to the station
    MISSING = "missing"  # checked out, never accounted for


class Trait(enum.StrEnum):
    SKEWED_CLOCK = "skewed_clock"  # the PDA's clock runs 7 minutes fast
    OFFLINE = "offline"  # offline all afternoon: two big batches, the second after closing
    LOSES_LAST_BATCH = "loses_last_batch"  # closes the shift; its last batch never comes
    RETRIES = "retries"  # a push whose answer was lost is sent again, same batch id


EXPRESS_FATES = frozenset(
    {
        Fate.DELIVERED_WITHOUT_POD,
        Fate.LOCKER_CONSENT_BEFORE,
        Fate.LOCKER_WITHOUT_CONSENT,
        Fate.LOCKER_CONSENT_AFTER,
        Fate.PICKUP_POINT_CAPTURED,
        Fate.DOOR_REQUEST_GRANTED,
    }
)
# How often each fate is drawn: most parcels are delivered.
WEIGHTS = {
    Fate.DELIVERED: 30,
    Fate.DELIVERED_WITHOUT_POD: 3,
    Fate.LOCKER: 8,
    Fate.LOCKER_CONSENT_BEFORE: 5,
    Fate.LOCKER_WITHOUT_CONSENT: 3,
    Fate.LOCKER_CONSENT_AFTER: 2,
    Fate.PICKUP_POINT_CAPTURED: 4,
    Fate.DOOR_REQUEST_GRANTED: 4,
    Fate.RETURNED: 6,
    Fate.MISSING: 2,
}
# The last parcels of a PDA whose last batch never comes: fates that need nothing from
# other parties after the drop, so what is lost is just the PDA's own events.
SIMPLE_FATES = (Fate.DELIVERED, Fate.LOCKER, Fate.RETURNED, Fate.LOCKER_WITHOUT_CONSENT)
LOST_PARCELS = 2  # how many parcels' final events the lost last batch holds
TRAITS_IN_ORDER = (Trait.RETRIES, Trait.SKEWED_CLOCK, Trait.OFFLINE, Trait.LOSES_LAST_BATCH)
STREETS = ("Century Ave", "Zhangyang Rd", "Pudong Ave", "Dongfang Rd", "Yanggao Rd")
NAMES = ("Li Wei", "Zhang Min", "Liu Yang", "Huang Lei", "Zhao Xin", "Sun Hao", "Zhou Ting")
OUTCOME_OF_FATE = {
    Fate.DELIVERED: "delivered",
    Fate.DELIVERED_WITHOUT_POD: "delivered_without_pod",
    Fate.LOCKER: "unattended",
    Fate.LOCKER_CONSENT_BEFORE: "unattended",
    Fate.LOCKER_WITHOUT_CONSENT: "unattended_without_consent",
    Fate.LOCKER_CONSENT_AFTER: "unattended_without_consent",
    Fate.PICKUP_POINT_CAPTURED: "unattended",
    Fate.DOOR_REQUEST_GRANTED: "unattended",
    Fate.RETURNED: "returned",
    Fate.MISSING: "missing",
}
FLAG_OF_FATE = {
    Fate.DELIVERED_WITHOUT_POD: "delivered_without_pod",
    Fate.LOCKER_WITHOUT_CONSENT: "unauthorized_locker_drop",
    Fate.LOCKER_CONSENT_AFTER: "consent_after_drop",
    Fate.MISSING: "missing_at_handover",
}


@dataclass(frozen=True)
class ParcelPlan:
    tracking_no: str
    service_class: ServiceClass
    fate: Fate
    recipient_name: str
    recipient_phone: str
    address: str
    lat: float
    lon: float
    lost: bool = False  # its events after the check-out are in the batch that never comes


@dataclass(frozen=True)
class CourierPlan:
    index: int
    username: str
    full_name: str
    device_id: str
    traits: frozenset[Trait]
    parcels: tuple[ParcelPlan, ...]


@dataclass(frozen=True)
class Names:
    """How the simulated station and its people are called (``make run``: the demo's)."""

    station_code: str = "SIM"
    station_name: str = "Simulated Station"
    timezone: str = "Asia/Shanghai"
    manager: str = "sim-manager"
    integration: str = "sim-gateway"
    courier_prefix: str = "sim-courier"
    device_prefix: str = "PDA-SIM-"
    manager_password: str = "simulated-day-1"
    courier_password: str = "simulated-day-1"
    integration_password: str = "simulated-day-1"


@dataclass(frozen=True)
class DayPlan:
    seed: int
    names: Names
    couriers: tuple[CourierPlan, ...]

    @property
    def parcels(self) -> list[ParcelPlan]:
        return [p for courier in self.couriers for p in courier.parcels]


SERIALS = range(10_000_000, 99_999_999)  # the 8 digits of an S10 number


def plan_day(*, couriers: int, parcels: int, seed: int, names: Names | None = None) -> DayPlan:
    """Who works, with what PDA, and what becomes of each of ``parcels`` parcels."""
    if couriers < 1 or parcels < couriers:
        raise ValueError("a day needs at least one courier and a parcel per courier")
    names = names or Names()
    rng = random.Random(seed)
    serials = _at_station(rng.sample(SERIALS, parcels), names.station_code)
    shares = [parcels // couriers + (1 if n < parcels % couriers else 0) for n in range(couriers)]
    planned = []
    taken = 0
    for n in range(couriers):
        traits = frozenset({TRAITS_IN_ORDER[n]} if n < len(TRAITS_IN_ORDER) else set())
        own = []
        careful = n % 2 == 0  # every other courier makes no mistake all day
        for k in range(shares[n]):
            serial = f"{serials[taken + k]:08d}"
            lost = Trait.LOSES_LAST_BATCH in traits and k >= shares[n] - LOST_PARCELS
            fate = _draw_fate(rng, traits, last=lost, careful=careful)
            own.append(_parcel(rng, serial, fate, lost))
        taken += shares[n]
        planned.append(
            CourierPlan(
                index=n + 1,
                username=f"{names.courier_prefix}{n + 1}",
                full_name=NAMES[n % len(NAMES)],
                device_id=f"{names.device_prefix}{n + 1:02d}",
                traits=traits,
                parcels=tuple(own),
            )
        )
    return DayPlan(seed=seed, names=names, couriers=tuple(planned))


def _at_station(serials: list[int], station_code: str) -> list[int]:
    """The day's serials moved along by an amount of the station's own: another day at
    another station with the same seed draws other tracking numbers (the same ones would
    be taken in again there, moving the first station's parcels), while the day drawn
    from the seed, every fate, stays the same."""
    digest = hashlib.sha256(station_code.encode()).digest()
    shift = int.from_bytes(digest[:8], "big") % len(SERIALS)
    return [SERIALS[(SERIALS.index(s) + shift) % len(SERIALS)] for s in serials]


def _draw_fate(rng: random.Random, traits: frozenset[Trait], *, last: bool, careful: bool) -> Fate:
    if last:
        return rng.choice(SIMPLE_FATES)
    offline = Trait.OFFLINE in traits  # nobody to wait for at the door without coverage
    fates = [
        f
        for f in WEIGHTS
        if not (f == Fate.DOOR_REQUEST_GRANTED and offline) and not (careful and f in FLAG_OF_FATE)
    ]
    return rng.choices(fates, weights=[WEIGHTS[f] for f in fates])[0]


def _parcel(rng: random.Random, serial: str, fate: Fate, lost: bool) -> ParcelPlan:
    if fate in EXPRESS_FATES:
        service_class = ServiceClass.EXPRESS
    elif fate == Fate.LOCKER:
        service_class = rng.choice([ServiceClass.PARCEL, ServiceClass.ORDINARY])
    else:
        service_class = rng.choice(list(ServiceClass))
    prefix = "EE" if service_class == ServiceClass.EXPRESS else "CP"
    return ParcelPlan(
        tracking_no=f"{prefix}{serial}{s10_check_digit(serial)}CN",
        service_class=service_class,
        fate=fate,
        recipient_name=rng.choice(NAMES),
        recipient_phone=f"+86138{rng.randrange(10**8):08d}",
        address=f"{rng.randrange(1, 999)} {rng.choice(STREETS)}, Pudong, Shanghai",
        lat=round(31.22 + rng.random() / 50, 6),
        lon=round(121.54 + rng.random() / 50, 6),
        lost=lost,
    )


# -- what the station should show ----------------------------------------------------------

# The balance's counts of a shift's own parcels (the simulated PDAs never deliver a
# parcel they did not check out).
COUNTS = tuple(name for name in COUNT_FIELDS if name != "not_checked_out")


@dataclass
class ExpectedShift:
    courier: str
    status: str  # balanced | unbalanced | provisional
    shift_status: str  # signed_off (the manager signs off what balances) | closed
    counts: dict[str, int]
    missing_seq_count: int
    discrepancy_count: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "shift_status": self.shift_status,
            **self.counts,
            "missing_seq_count": self.missing_seq_count,
            "discrepancy_count": self.discrepancy_count,
        }


@dataclass
class Expected:
    """What the API (and the pages) should show once the day is played."""

    station_code: str
    parcels: int
    shifts: dict[str, ExpectedShift] = field(default_factory=dict)  # by courier username
    flags: Counter[str] = field(default_factory=Counter)  # standing flags, by kind

    def as_dict(self) -> dict[str, Any]:
        statuses = Counter(shift.status for shift in self.shifts.values())
        return {
            "station": self.station_code,
            "parcels": self.parcels,
            "shifts": {name: shift.as_dict() for name, shift in sorted(self.shifts.items())},
            "board": {
                "shifts": len(self.shifts),
                **{s: statuses[s] for s in ("balanced", "unbalanced", "provisional")},
            },
            "flags": dict(sorted(self.flags.items())),
        }


def expected_outcome(plan: DayPlan, events_lost: dict[str, int]) -> Expected:
    """What the station shows when the day went as planned. ``events_lost``: how many
    events each courier's lost last batch held (they are the shift's missing seqs)."""
    expected = Expected(plan.names.station_code, len(plan.parcels))
    for courier in plan.couriers:
        counts = dict.fromkeys(COUNTS, 0)
        discrepancies = 0
        for parcel in courier.parcels:
            outcome = "missing" if parcel.lost else OUTCOME_OF_FATE[parcel.fate]
            counts["checked_out"] += 1
            counts[outcome] += 1
            flag = "missing_at_handover" if parcel.lost else FLAG_OF_FATE.get(parcel.fate)
            if flag:
                discrepancies += 1
                expected.flags[flag] += 1
        missing_seqs = events_lost.get(courier.username, 0)
        if missing_seqs:
            status = "provisional"
        elif discrepancies:
            status = "unbalanced"
        else:
            status = "balanced"
        expected.shifts[courier.username] = ExpectedShift(
            courier=courier.username,
            status=status,
            shift_status="signed_off" if status == "balanced" else "closed",
            counts=counts,
            missing_seq_count=missing_seqs,
            discrepancy_count=discrepancies,
        )
        if Trait.SKEWED_CLOCK in courier.traits:
            expected.flags["clock_skew"] += 1
    return expected
