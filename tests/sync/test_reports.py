"""Station monitoring reports (日监控, 周分析, 月通报) through the engine, without Flask."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.orm import Session

from models import (
    Device,
    Flag,
    FlagSeverity,
    FlagStatus,
    Parcel,
    ReportKind,
    ServiceClass,
    Shift,
    Station,
    StationReport,
    User,
)
from sync import flags, reports, shifts
from sync.balances import shift_balance
from sync.errors import InvalidInput
from sync.events import EventRules
from sync.flags import FlagSubject, raise_flag
from sync.ingest import IngestRules, PushBatch, Pusher, ingest
from sync.shifts import ShiftRules
from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy
from tests import factories
from tests.conftest import World

# The station (factories) keeps Asia/Shanghai time: UTC+8, no daylight saving.
LOCAL = dt.timezone(dt.timedelta(hours=8))
DAY = dt.date(2026, 11, 23)  # a Monday, ISO week 2026-W48
DEADLINES = {
    ServiceClass.EXPRESS: 24,
    ServiceClass.REGISTERED: 48,
    ServiceClass.PARCEL: 72,
    ServiceClass.ORDINARY: 96,
}
RULES = IngestRules(
    events=EventRules(tracking=TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS))
)
SIGNED = {"recipient_name": "Wang", "signature_sha256": "a" * 64}
# An express item needs a signature; others do with a photo, here one uploaded (the
# express signatures are not: they are the images counted missing). A name alone
# proves nothing.
PHOTO = "d" * 64
UNSIGNED = {"recipient_name": "Wang", "photo_sha256": PHOTO}
CONSENT = {"method": "locker", "channel": "sms"}


@pytest.fixture(autouse=True)
def uploaded_photo(session: Session) -> None:
    """The photo of ``UNSIGNED``, uploaded."""
    factories.stored_image(session, PHOTO)


def local(day: dt.date, hour: int, minute: int = 0) -> dt.datetime:
    """A local wall-clock time of the station, as an aware datetime."""
    return dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=LOCAL)


class Pda:
    """One courier's PDA: opens shifts, numbers its events, pushes and closes."""

    def __init__(self, session: Session, world: World, courier: User, device: Device) -> None:
        self.session = session
        self.courier = courier
        self.device = device
        # A courier signs in only on a PDA of their station: they push as its station.
        self.pusher = Pusher(device.id, device.station_id, courier.id)
        self.seq = 0

    def open(self, at: dt.datetime) -> Shift:
        shift = shifts.open_shift(
            session=self.session,
            device=self.device,
            courier_id=self.courier.id,
            rules=ShiftRules(),
            now=at,
        )
        self.session.commit()
        return shift

    def event(self, tracking_no: str, type: str, at: dt.datetime, **fields: Any) -> dict:
        self.seq += 1
        return factories.event(self.seq, tracking_no, type, occurred_at=at, **fields)

    def push(self, events: list[dict], at: dt.datetime) -> None:
        ingest(
            session=self.session,
            batch=PushBatch(self.device.id, uuid.uuid4(), at, events),
            pusher=self.pusher,
            rules=RULES,
            received_at=at,
        )
        self.session.commit()

    def close(self, shift: Shift, at: dt.datetime) -> Shift:
        shift = shifts.close_shift(
            session=self.session, shift=shift, closed_by=self.courier.id, now=at
        )
        self.session.commit()
        return shift


def parcel(
    session: Session,
    world: World,
    taken_in: dt.datetime,
    service_class: ServiceClass = ServiceClass.EXPRESS,
) -> str:
    obj = factories.parcel(session, world.station, service_class=service_class)
    obj.created_at = taken_in
    session.commit()
    return obj.tracking_no


@pytest.fixture
def second(session: Session, world: World) -> tuple[User, Device]:
    courier = factories.user(session, "courier2b", "courier", world.station)
    courier.full_name = "Li Na"
    device = factories.device(session, "PDA-0003", world.station)
    session.commit()
    return courier, device


@pytest.fixture
def pda_elsewhere(session: Session, world: World) -> Pda:
    """A courier of the other station (ST2) on its PDA."""
    courier = factories.user(session, "courier9", "courier", world.other_station)
    session.commit()
    return Pda(session, world, courier, world.other_device)


@pytest.fixture
def pda_a(session: Session, world: World) -> Pda:
    world.courier.full_name = "Zhang Wei"
    return Pda(session, world, world.courier, world.device)


@pytest.fixture
def pda_b(session: Session, world: World, second: tuple[User, Device]) -> Pda:
    return Pda(session, world, *second)


def move_flags_to(session: Session, at: dt.datetime) -> None:
    """Flags are stamped with the wall clock when raised; put them where the test's day is."""
    session.execute(update(Flag).values(raised_at=at))
    session.commit()


def manual_flag(session: Session, world: World, key: str, at: dt.datetime) -> None:
    flag = raise_flag(
        session=session,
        kind="clock_skew",
        severity=FlagSeverity.WARNING,
        subject=FlagSubject("device", key),
        station_id=world.station.id,
        evidence={},
    ).flag
    flag.raised_at = at
    session.commit()


def daily(session: Session, world: World, day: dt.date = DAY, **kw: Any) -> dict[str, Any]:
    kw.setdefault("now", local(DAY + dt.timedelta(days=10), 9))
    return reports.report(
        session=session,
        station_id=world.station.id,
        kind=ReportKind.DAILY,
        start=day,
        deadlines=DEADLINES,
        **kw,
    )


@dataclass
class CraftedDay:
    a: Shift
    b: Shift


@pytest.fixture
def crafted(session: Session, world: World, pda_a: Pda, pda_b: Pda) -> CraftedDay:
    """DAY at ST1: courier A delivers in person with and without POD, drops in a locker
    with and without consent, returns one and loses one; courier B delivers one in
    person, drops one at a pickup point and loses one."""
    t = local(DAY, 8)  # shifts open at 08:00 local (00:00 UTC)

    def m(minutes: int) -> dt.datetime:
        return t + dt.timedelta(minutes=minutes)

    # A's parcels, express (24 h): intake so that p1 and p3 are on time, p2 and p4 late.
    p1 = parcel(session, world, m(30) - dt.timedelta(hours=20))
    p2 = parcel(session, world, m(60) - dt.timedelta(hours=30))
    p3 = parcel(session, world, m(90) - dt.timedelta(hours=24))  # exactly at the deadline
    p4 = parcel(session, world, m(120) - dt.timedelta(hours=24, minutes=1))
    p5 = parcel(session, world, m(0) - dt.timedelta(hours=2))
    p6 = parcel(session, world, m(0) - dt.timedelta(hours=2))
    shift_a = pda_a.open(t)
    pda_a.push(
        [
            pda_a.event(p1, "checked_out", m(0)),
            pda_a.event(p2, "checked_out", m(0)),
            pda_a.event(p3, "checked_out", m(0)),
            pda_a.event(p4, "checked_out", m(0)),
            pda_a.event(p5, "checked_out", m(0)),
            pda_a.event(p6, "checked_out", m(0)),
            pda_a.event(p1, "delivered", m(30), pod=SIGNED),
            pda_a.event(p2, "delivered", m(60), pod=UNSIGNED),
            pda_a.event(p3, "consent_captured", m(80), consent=CONSENT),
            pda_a.event(
                p3, "delivered_to_locker", m(90), locker_id="L1", compartment="1", pod=SIGNED
            ),
            pda_a.event(
                p4, "delivered_to_locker", m(120), locker_id="L1", compartment="2", pod=SIGNED
            ),
            pda_a.event(p5, "returned_to_station", m(300)),
        ],
        m(301),
    )
    shift_a = pda_a.close(shift_a, m(302))
    # B's parcels: ordinary (96 h) in person, parcel class (72 h, no consent needed) at a
    # pickup point 73 h after intake (late), one lost.
    q1 = parcel(session, world, m(0) - dt.timedelta(hours=50), ServiceClass.ORDINARY)
    q2 = parcel(session, world, m(150) - dt.timedelta(hours=73), ServiceClass.PARCEL)
    q3 = parcel(session, world, m(0), ServiceClass.PARCEL)
    shift_b = pda_b.open(m(10))
    pda_b.push(
        [
            pda_b.event(q1, "checked_out", m(10)),
            pda_b.event(q2, "checked_out", m(10)),
            pda_b.event(q3, "checked_out", m(10)),
            pda_b.event(q1, "delivered", m(55), pod=SIGNED),
            pda_b.event(q2, "delivered_to_pickup_point", m(150), point_id="PP1", pod=SIGNED),
        ],
        m(200),
    )
    shift_b = pda_b.close(shift_b, m(400))
    move_flags_to(session, local(DAY, 12))
    manual_flag(session, world, "day-before", local(DAY, 0) - dt.timedelta(minutes=30))
    manual_flag(session, world, "just-after-midnight", local(DAY, 0, 10))
    return CraftedDay(shift_a, shift_b)


def flags_of_day(session: Session) -> dict[str, int]:
    found: dict[str, int] = {}
    for kind in session.scalars(select(Flag.kind)):
        found[kind] = found.get(kind, 0) + 1
    return found


def test_a_crafted_day_has_every_metric_exact(
    session: Session, world: World, crafted: CraftedDay
) -> None:
    body = daily(session, world)
    totals = body["totals"]
    counts = {name: totals[name] for name in ("shifts", *reports.COUNT_FIELDS)}
    assert counts == {
        "shifts": 2,
        "checked_out": 9,
        "delivered": 2,  # p1, q1
        "delivered_without_pod": 1,  # p2
        "unattended": 2,  # p3 with consent, q2 (class needs none)
        "unattended_without_consent": 1,  # p4
        "returned": 1,  # p5
        "missing": 2,  # p6, q3
        "not_checked_out": 0,
    }
    assert totals["information_loss_rate"] == round(2 / 9, 4) == 0.2222
    assert totals["pod_completeness"] == round(2 / 3, 4) == 0.6667
    # check-out to delivery: p1 30, p2 60, p3 90, p4 120, q1 45, q2 140 minutes
    assert totals["avg_checkout_to_delivery_minutes"] == round(485 / 6, 1) == 80.8
    assert totals["on_time"] == {
        "express": {"measured": 4, "on_time": 2, "rate": 0.5},
        "parcel": {"measured": 1, "on_time": 0, "rate": 0.0},
        "registered": {"measured": 0, "on_time": 0, "rate": None},
        "ordinary": {"measured": 1, "on_time": 1, "rate": 1.0},
    }
    assert totals["on_time_rate"] == 0.5
    # The flags the day's events and handovers raised, plus the manual one just after
    # local midnight (16:10 UTC the day before), not the one half an hour before it.
    assert totals["flags_by_kind"] == {
        "clock_skew": 1,
        "delivered_without_pod": 1,  # p2
        "missing_at_handover": 2,  # p6, q3
        "pod_blob_missing": 5,  # the signatures of p1, p3, p4, q1, q2 never uploaded
        "unauthorized_locker_drop": 1,  # p4
    }
    assert totals["flags_total"] == 10
    assert len(flags_of_day(session)) == 5 and flags_of_day(session)["clock_skew"] == 2

    assert [c["username"] for c in body["couriers"]] == ["courier1", "courier2b"]
    a, b = body["couriers"]
    assert (a["courier_id"], a["full_name"], b["full_name"]) == (
        world.courier.id,
        "Zhang Wei",
        "Li Na",
    )
    assert (a["shifts"], a["checked_out"], a["missing"], a["unattended"]) == (1, 6, 1, 1)
    assert (b["shifts"], b["checked_out"], b["missing"], b["unattended"]) == (1, 3, 1, 1)
    assert a["avg_checkout_to_delivery_minutes"] == 75.0
    assert b["avg_checkout_to_delivery_minutes"] == 92.5
    assert (a["on_time_rate"], b["on_time_rate"]) == (0.5, 0.5)
    assert b["information_loss_rate"] == round(1 / 3, 4)
    assert b["pod_completeness"] == 1.0
    # A courier's flags are the ones naming them; the station's own (clock_skew) are not.
    assert a["flags_by_kind"] == {
        "delivered_without_pod": 1,
        "missing_at_handover": 1,
        "pod_blob_missing": 3,
        "unauthorized_locker_drop": 1,
    }
    assert b["flags_by_kind"] == {"missing_at_handover": 1, "pod_blob_missing": 2}

    assert body["days"] == [{"date": "2026-11-23", **totals}]
    assert body["previous"]["period"] == "2026-11-22"
    assert body["previous"]["totals"]["flags_by_kind"] == {"clock_skew": 1}
    assert body["change"]["checked_out"] == 9
    assert body["change"]["information_loss_rate"] is None  # nothing checked out before
    assert body["change"]["flags_by_kind"]["clock_skew"] == 0
    assert body["change"]["flags_total"] == totals["flags_total"] - 1


def test_a_flag_a_manager_acknowledged_or_resolved_still_counts(
    session: Session, world: World, crafted: CraftedDay
) -> None:
    """A manager's decision settles a cause that was there: the flag is counted still."""
    before = daily(session, world)["totals"]["flags_by_kind"]
    drop = session.scalars(select(Flag).where(Flag.kind == "unauthorized_locker_drop")).one()
    missing = session.scalars(select(Flag).where(Flag.kind == "missing_at_handover")).first()
    assert missing is not None
    flags.resolve_flag(session=session, flag=drop, user_id=world.manager.id, note="warned")
    flags.acknowledge_flag(session=session, flag=missing, user_id=world.manager.id)
    session.commit()
    assert daily(session, world)["totals"]["flags_by_kind"] == before


def test_the_flags_counted_do_not_depend_on_how_a_pda_split_its_queue(
    session: Session, world: World, pda_a: Pda, pda_b: Pda
) -> None:
    """Rule 3, for the report: two couriers do the same day's work. A's PDA pushes its
    queue in order; B's in two pushes, the drop and the check-outs first, and B closes
    the shift before the rest lands. Until it does, B's drop is flagged
    ``unauthorized_locker_drop`` (its consent, recorded before it, is still on the PDA)
    and the parcel delivered meanwhile ``missing_at_handover``; then the system closes
    both flags, and the report counts neither: both couriers' rows are the same."""
    t = local(DAY, 8)

    def m(minutes: int) -> dt.datetime:
        return t + dt.timedelta(minutes=minutes)

    def day_of(pda: Pda) -> tuple[Shift, list[dict]]:
        express = parcel(session, world, m(-60))
        ordinary = parcel(session, world, m(-60), ServiceClass.ORDINARY)
        shift = pda.open(t)
        return shift, [
            pda.event(express, "checked_out", m(0)),
            pda.event(ordinary, "checked_out", m(0)),
            pda.event(express, "consent_captured", m(30), consent=CONSENT),
            pda.event(ordinary, "delivered", m(40), pod=UNSIGNED),
            pda.event(
                express,
                "delivered_to_locker",
                m(50),
                locker_id="L1",
                compartment="1",
                pod=UNSIGNED,
            ),
        ]

    shift_a, queue = day_of(pda_a)
    pda_a.push(queue, m(60))
    pda_a.close(shift_a, m(70))
    shift_b, queue = day_of(pda_b)
    check_outs, consent, delivery, drop = queue[:2], queue[2], queue[3], queue[4]
    pda_b.push([*check_outs, drop], m(60))
    pda_b.close(shift_b, m(70))
    b_flags = select(Flag.kind, Flag.status).where(Flag.courier_id == pda_b.courier.id)
    assert {kind: status for kind, status in session.execute(b_flags)} == {
        "unauthorized_locker_drop": FlagStatus.OPEN,
        "missing_at_handover": FlagStatus.OPEN,
    }
    pda_b.push([consent, delivery], m(80))
    assert {kind: status for kind, status in session.execute(b_flags)} == {
        "unauthorized_locker_drop": FlagStatus.CLOSED,
        "missing_at_handover": FlagStatus.CLOSED,
    }
    move_flags_to(session, local(DAY, 12))

    body = daily(session, world)
    in_order, split = body["couriers"]
    assert (in_order["username"], split["username"]) == ("courier1", "courier2b")
    identity = {"courier_id", "username", "full_name"}
    assert {k: v for k, v in split.items() if k not in identity} == {
        k: v for k, v in in_order.items() if k not in identity
    }
    assert (split["delivered"], split["unattended"], split["missing"]) == (1, 1, 0)
    assert body["totals"]["flags_by_kind"] == {} and body["totals"]["flags_total"] == 0


def test_the_report_body_says_what_it_is(
    session: Session, world: World, crafted: CraftedDay
) -> None:
    now = local(DAY + dt.timedelta(days=10), 9)
    body = daily(session, world, now=now)
    assert {k: body[k] for k in list(body)[:10]} == {
        "station_id": world.station.id,
        "station_code": "ST1",
        "station_timezone": "Asia/Shanghai",
        "kind": "daily",
        "period": "2026-11-23",
        "period_start": "2026-11-23",
        "period_end": "2026-11-23",
        "complete": True,
        "generated_at": "2026-12-03T01:00:00+00:00",
        "delivery_deadline_hours": {
            "express": 24,
            "parcel": 72,
            "registered": 48,
            "ordinary": 96,
        },
    }
    # The body is plain JSON: what is stored is what is served.
    assert json.loads(json.dumps(body)) == body


def test_the_balance_identity_holds_per_row(
    session: Session, world: World, crafted: CraftedDay
) -> None:
    body = daily(session, world)
    outcomes = (
        "delivered",
        "delivered_without_pod",
        "unattended",
        "unattended_without_consent",
        "returned",
        "missing",
    )
    for row in [body["totals"], *body["couriers"]]:
        assert row["checked_out"] == sum(row[name] for name in outcomes)
    a = shift_balance(session=session, shift=crafted.a)
    assert body["couriers"][0]["missing"] == a.missing


def test_a_shift_opened_at_23_30_local_belongs_to_that_date(
    session: Session, world: World, pda_a: Pda
) -> None:
    late = local(DAY, 23, 30)  # 15:30 UTC
    a, b = (parcel(session, world, late, ServiceClass.ORDINARY) for _ in range(2))
    shift = pda_a.open(late)
    assert shift.work_date == DAY
    after_midnight = local(DAY + dt.timedelta(days=1), 0, 15)
    pda_a.push(
        [
            pda_a.event(a, "checked_out", late + dt.timedelta(minutes=1)),
            pda_a.event(b, "checked_out", late + dt.timedelta(minutes=1)),
            pda_a.event(a, "delivered", after_midnight, pod=UNSIGNED),
        ],
        after_midnight + dt.timedelta(minutes=1),
    )
    pda_a.close(shift, after_midnight + dt.timedelta(minutes=2))
    move_flags_to(session, after_midnight)  # the handover flag: raised after midnight
    day = daily(session, world, DAY)["totals"]
    assert (day["shifts"], day["checked_out"], day["delivered"], day["missing"]) == (1, 2, 1, 1)
    assert day["flags_total"] == 0
    assert day["avg_checkout_to_delivery_minutes"] == 44.0
    following = daily(session, world, DAY + dt.timedelta(days=1))["totals"]
    assert (following["shifts"], following["checked_out"]) == (0, 0)
    assert following["flags_by_kind"] == {"missing_at_handover": 1}


def test_a_correction_filed_in_a_later_shift_of_the_day_counts(
    session: Session, world: World, pda_a: Pda
) -> None:
    """A return voided from the courier's next shift of the same day: the parcel is
    missing in the first, whichever shifts are read together."""
    (a,) = [parcel(session, world, local(DAY, 7))]
    first = pda_a.open(local(DAY, 8))
    returned = pda_a.event(a, "returned_to_station", local(DAY, 9))
    pda_a.push([pda_a.event(a, "checked_out", local(DAY, 8, 1)), returned], local(DAY, 9, 1))
    first = pda_a.close(first, local(DAY, 10))
    second = pda_a.open(local(DAY, 11))
    pda_a.push(
        [
            pda_a.event(
                a,
                "correction",
                local(DAY, 11, 5),
                voids_client_event_id=returned["client_event_id"],
                reason="mis-tap",
            )
        ],
        local(DAY, 11, 6),
    )
    assert shift_balance(session=session, shift=first).missing == 1
    totals = daily(session, world)["totals"]
    assert (totals["shifts"], totals["checked_out"], totals["returned"], totals["missing"]) == (
        2,
        1,
        0,
        1,
    )
    assert second.work_date == DAY


def test_weekly_has_days_couriers_and_the_change_over_the_previous_week(
    session: Session, world: World, pda_a: Pda, pda_b: Pda
) -> None:
    def run(pda: Pda, day: dt.date, delivered: int, missing: int) -> None:
        t = local(day, 9)
        numbers = [
            parcel(session, world, t, ServiceClass.ORDINARY) for _ in range(delivered + missing)
        ]
        shift = pda.open(t)
        events = [pda.event(tn, "checked_out", t + dt.timedelta(minutes=1)) for tn in numbers]
        events += [
            pda.event(tn, "delivered", t + dt.timedelta(minutes=31), pod=UNSIGNED)
            for tn in numbers[:delivered]
        ]
        pda.push(events, t + dt.timedelta(hours=1))
        pda.close(shift, t + dt.timedelta(hours=2))

    previous_week = DAY - dt.timedelta(days=5)  # Wednesday of 2026-W47
    run(pda_a, previous_week, delivered=1, missing=1)
    run(pda_a, DAY, delivered=3, missing=1)  # Monday
    run(pda_b, DAY, delivered=2, missing=0)
    run(pda_b, DAY + dt.timedelta(days=2), delivered=1, missing=1)  # Wednesday
    move_flags_to(session, local(DAY + dt.timedelta(days=6), 12))  # Sunday

    body = reports.report(
        session=session,
        station_id=world.station.id,
        kind=ReportKind.WEEKLY,
        start=DAY,
        deadlines=DEADLINES,
        now=local(DAY + dt.timedelta(days=8), 9),
    )
    assert (body["kind"], body["period"], body["period_start"], body["period_end"]) == (
        "weekly",
        "2026-W48",
        "2026-11-23",
        "2026-11-29",
    )
    assert body["complete"] is True
    totals = body["totals"]
    assert (totals["shifts"], totals["checked_out"], totals["delivered"], totals["missing"]) == (
        3,
        8,
        6,
        2,
    )
    assert totals["information_loss_rate"] == 0.25
    assert totals["avg_checkout_to_delivery_minutes"] == 30.0
    # every handover flag of both weeks was moved to this week's Sunday
    assert totals["flags_by_kind"] == {"missing_at_handover": 3}
    assert [d["date"] for d in body["days"]] == [
        (DAY + dt.timedelta(days=n)).isoformat() for n in range(7)
    ]
    assert [(d["shifts"], d["checked_out"], d["missing"]) for d in body["days"]] == [
        (2, 6, 1),
        (0, 0, 0),
        (1, 2, 1),
        (0, 0, 0),
        (0, 0, 0),
        (0, 0, 0),
        (0, 0, 0),
    ]
    assert body["days"][0]["information_loss_rate"] == round(1 / 6, 4)
    assert body["days"][1]["information_loss_rate"] is None
    assert body["days"][6]["flags_total"] == 3
    couriers = {c["username"]: c for c in body["couriers"]}
    assert set(couriers) == {"courier1", "courier2b"}
    assert (couriers["courier1"]["shifts"], couriers["courier1"]["checked_out"]) == (1, 4)
    assert (couriers["courier2b"]["shifts"], couriers["courier2b"]["checked_out"]) == (2, 4)
    assert couriers["courier2b"]["information_loss_rate"] == 0.25
    assert couriers["courier1"]["flags_by_kind"] == {"missing_at_handover": 2}
    assert body["previous"]["period"] == "2026-W47"
    assert body["previous"]["totals"]["checked_out"] == 2
    change = body["change"]
    # Every metric of the totals, the open and provisional shifts too (they were missing).
    assert set(change) == set(body["totals"])
    assert (change["shifts_open"], change["shifts_provisional"]) == (0, 0)
    assert (change["shifts"], change["checked_out"], change["delivered"]) == (2, 6, 5)
    assert change["missing"] == 1
    assert change["information_loss_rate"] == 0.25 - 0.5
    assert change["avg_checkout_to_delivery_minutes"] == 0.0
    assert change["pod_completeness"] == 0.0
    assert change["flags_by_kind"] == {"missing_at_handover": 3}


def test_monthly_report_covers_the_calendar_month(
    session: Session, world: World, pda_a: Pda
) -> None:
    for day in (dt.date(2026, 10, 31), dt.date(2026, 11, 1), dt.date(2026, 11, 30)):
        t = local(day, 9)
        tn = parcel(session, world, t)
        shift = pda_a.open(t)
        pda_a.push([pda_a.event(tn, "checked_out", t + dt.timedelta(minutes=1))], t)
        pda_a.close(shift, t + dt.timedelta(hours=1))
    body = reports.report(
        session=session,
        station_id=world.station.id,
        kind=ReportKind.MONTHLY,
        start=dt.date(2026, 11, 1),
        deadlines=DEADLINES,
        now=local(dt.date(2026, 12, 1), 8),
    )
    assert (body["period"], body["period_end"], len(body["days"])) == ("2026-11", "2026-11-30", 30)
    assert (body["totals"]["shifts"], body["previous"]["period"]) == (2, "2026-10")
    assert body["previous"]["totals"]["shifts"] == 1
    assert body["change"]["shifts"] == 1


def test_on_time_rate_against_each_class_deadline(
    session: Session, world: World, pda_a: Pda
) -> None:
    t = local(DAY, 9)
    delivered_at = t + dt.timedelta(hours=1)
    hours = dt.timedelta(hours=1)
    at_deadline = parcel(session, world, delivered_at - 48 * hours, ServiceClass.REGISTERED)
    a_minute_late = parcel(
        session,
        world,
        delivered_at - 48 * hours - dt.timedelta(minutes=1),
        ServiceClass.REGISTERED,
    )
    express_late = parcel(session, world, delivered_at - 25 * hours)
    ordinary_in_time = parcel(session, world, delivered_at - 95 * hours, ServiceClass.ORDINARY)
    never_taken_in = factories.s10()  # no intake record: not measured
    numbers = [at_deadline, a_minute_late, express_late, ordinary_in_time, never_taken_in]
    shift = pda_a.open(t)
    pda_a.push(
        [pda_a.event(tn, "checked_out", t) for tn in numbers]
        + [pda_a.event(tn, "delivered", delivered_at, pod=SIGNED) for tn in numbers],
        delivered_at,
    )
    pda_a.close(shift, delivered_at + hours)
    totals = daily(session, world)["totals"]
    assert totals["delivered"] == 5
    assert totals["on_time"]["registered"] == {"measured": 2, "on_time": 1, "rate": 0.5}
    assert totals["on_time"]["express"] == {"measured": 1, "on_time": 0, "rate": 0.0}
    assert totals["on_time"]["ordinary"] == {"measured": 1, "on_time": 1, "rate": 1.0}
    assert totals["on_time_rate"] == 0.5  # 2 of the 4 measured
    # Other deadlines, other verdicts.
    generous = {c: 1000 for c in ServiceClass}
    totals = reports.report(
        session=session,
        station_id=world.station.id,
        kind=ReportKind.DAILY,
        start=DAY,
        deadlines=generous,
        now=local(DAY, 20),
    )["totals"]
    assert totals["on_time_rate"] == 1.0


def test_a_delivery_scanned_again_in_the_next_shift_is_counted_once(
    session: Session, world: World, pda_a: Pda
) -> None:
    """Delivered in the morning shift, the delivery scanned again in the afternoon one
    (no check-out between): one delivery, the morning's, and nothing the afternoon
    did not check out."""
    t = local(DAY, 9)
    tn = parcel(session, world, t - dt.timedelta(hours=2))
    morning = pda_a.open(t)
    checked_out = pda_a.event(tn, "checked_out", t)
    delivered = pda_a.event(tn, "delivered", t + dt.timedelta(hours=1), pod=SIGNED)
    pda_a.push([checked_out, delivered], t + dt.timedelta(hours=1))
    pda_a.close(morning, t + dt.timedelta(hours=2))
    afternoon = pda_a.open(t + dt.timedelta(hours=3))
    again = t + dt.timedelta(hours=4)
    pda_a.push([pda_a.event(tn, "delivered", again, pod=SIGNED)], again)
    pda_a.close(afternoon, again + dt.timedelta(hours=1))
    totals = daily(session, world)["totals"]
    assert (totals["checked_out"], totals["delivered"], totals["not_checked_out"]) == (1, 1, 0)
    assert totals["avg_checkout_to_delivery_minutes"] == 60


def test_a_delivery_scanned_again_is_timed_by_its_first_scan(
    session: Session, world: World, pda_a: Pda
) -> None:
    """A final outcome scanned again is one outcome, made at its first scan
    (``sync.rules.final_outcomes``): the beep a few minutes later, or the locker's
    compartment tapped again, neither delays the delivery past its deadline nor adds to
    the time it took. A drop in another compartment is a second outcome (a conflict),
    timed as the latest."""
    t = local(DAY, 9)
    delivered_at = t + dt.timedelta(hours=1)
    at_deadline = parcel(session, world, delivered_at - dt.timedelta(hours=24))
    dropped = parcel(session, world, delivered_at - dt.timedelta(hours=24))
    moved = parcel(session, world, delivered_at - dt.timedelta(hours=48))
    again = delivered_at + dt.timedelta(minutes=4)
    shift = pda_a.open(t)
    pda_a.push(
        [pda_a.event(tn, "checked_out", t) for tn in (at_deadline, dropped, moved)]
        + [
            pda_a.event(at_deadline, "delivered", delivered_at, pod=SIGNED),
            pda_a.event(at_deadline, "delivered", again, pod=SIGNED),
            pda_a.event(dropped, "delivered_to_pickup_point", delivered_at, point_id="PP-1"),
            pda_a.event(dropped, "delivered_to_pickup_point", again, point_id="PP-1"),
            pda_a.event(moved, "delivered_to_pickup_point", delivered_at, point_id="PP-1"),
            pda_a.event(moved, "delivered_to_pickup_point", again, point_id="PP-2"),
        ],
        again,
    )
    pda_a.close(shift, again + dt.timedelta(hours=1))
    totals = daily(session, world)["totals"]
    assert (totals["delivered"], totals["unattended"] + totals["unattended_without_consent"]) == (
        1,
        2,
    )
    # at_deadline and dropped on time at their first scan; moved is 2 days late anyway
    assert totals["on_time"]["express"] == {"measured": 3, "on_time": 2, "rate": 0.6667}
    # 60, 60 and 64 minutes from the check-out
    assert totals["avg_checkout_to_delivery_minutes"] == round((60 + 60 + 64) / 3, 1)


def deliveries_at(session: Session, station: Station) -> dict[str, Any]:
    """The delivery measures of a station's daily report of DAY."""
    totals = reports.report(
        session=session,
        station_id=station.id,
        kind=ReportKind.DAILY,
        start=DAY,
        deadlines=DEADLINES,
        now=local(DAY + dt.timedelta(days=10), 9),
    )["totals"]
    names = ("shifts", "checked_out", "delivered", "returned", "missing")
    return {
        **{name: totals[name] for name in names},
        "minutes": totals["avg_checkout_to_delivery_minutes"],
        "express": totals["on_time"]["express"],
    }


NOT_MEASURED = {"measured": 0, "on_time": 0, "rate": None}
ONE_ON_TIME = {"measured": 1, "on_time": 1, "rate": 1.0}


def test_a_delivery_counts_for_the_station_of_the_courier_who_made_it(
    session: Session, world: World, pda_a: Pda, pda_elsewhere: Pda
) -> None:
    """A parcel of ST1 checked out by ST1's courier, then checked out and delivered by a
    courier of ST2: the delivery is ST2's work (its shift, its measures); ST1's courier
    still owes the parcel at his handover, and ST1 measures no delivery."""
    tn = parcel(session, world, local(DAY, 7))
    own = pda_a.open(local(DAY, 8))
    pda_a.push([pda_a.event(tn, "checked_out", local(DAY, 8, 5))], local(DAY, 8, 6))
    foreign = pda_elsewhere.open(local(DAY, 9))
    pda_elsewhere.push(
        [
            pda_elsewhere.event(tn, "checked_out", local(DAY, 9, 5)),
            pda_elsewhere.event(tn, "delivered", local(DAY, 10), pod=SIGNED),
        ],
        local(DAY, 10, 1),
    )
    pda_a.close(own, local(DAY, 18))
    pda_elsewhere.close(foreign, local(DAY, 18))
    assert deliveries_at(session, world.station) == {
        "shifts": 1,
        "checked_out": 1,
        "delivered": 0,
        "returned": 0,
        "missing": 1,
        "minutes": None,
        "express": NOT_MEASURED,
    }
    assert deliveries_at(session, world.other_station) == {
        "shifts": 1,
        "checked_out": 1,
        "delivered": 1,
        "returned": 0,
        "missing": 0,
        "minutes": 55.0,
        "express": ONE_ON_TIME,  # from its intake at ST1, 3 h before
    }


def test_a_parcel_moved_to_another_station_counts_where_each_shift_worked_it(
    session: Session, world: World, pda_a: Pda, pda_elsewhere: Pda
) -> None:
    """Returned at ST1, moved to ST2 and delivered there: ST1 keeps its return, ST2 has
    the delivery; ST1's events filed before the move stay in ST1's figures."""
    tn = parcel(session, world, local(DAY, 7))
    own = pda_a.open(local(DAY, 8))
    pda_a.push(
        [
            pda_a.event(tn, "checked_out", local(DAY, 8, 5)),
            pda_a.event(tn, "returned_to_station", local(DAY, 8, 30)),
        ],
        local(DAY, 8, 31),
    )
    pda_a.close(own, local(DAY, 9))
    session.execute(
        update(Parcel).where(Parcel.tracking_no == tn).values(station_id=world.other_station.id)
    )
    session.commit()
    moved = pda_elsewhere.open(local(DAY, 10))
    pda_elsewhere.push(
        [
            pda_elsewhere.event(tn, "checked_out", local(DAY, 10, 5)),
            pda_elsewhere.event(tn, "delivered", local(DAY, 11), pod=SIGNED),
        ],
        local(DAY, 11, 1),
    )
    pda_elsewhere.close(moved, local(DAY, 18))
    assert deliveries_at(session, world.station) == {
        "shifts": 1,
        "checked_out": 1,
        "delivered": 0,
        "returned": 1,
        "missing": 0,
        "minutes": None,
        "express": NOT_MEASURED,
    }
    assert deliveries_at(session, world.other_station) == {
        "shifts": 1,
        "checked_out": 1,
        "delivered": 1,
        "returned": 0,
        "missing": 0,
        "minutes": 55.0,
        "express": ONE_ON_TIME,
    }


def test_periods_that_have_not_begun_or_are_misaligned_are_refused(
    session: Session, world: World
) -> None:
    now = local(DAY, 9)
    with pytest.raises(InvalidInput) as info:
        daily(session, world, DAY + dt.timedelta(days=1), now=now)
    assert (info.value.code, info.value.field) == ("period_in_future", "date")
    today = daily(session, world, DAY, now=now)
    assert today["complete"] is False
    with pytest.raises(InvalidInput) as info:
        reports.report(
            session=session,
            station_id=world.station.id,
            kind=ReportKind.WEEKLY,
            start=DAY + dt.timedelta(days=1),
            deadlines=DEADLINES,
            now=now,
        )
    assert (info.value.code, info.value.field) == ("invalid_period", "week")
    with pytest.raises(InvalidInput) as info:
        daily(session, world, dt.date(1999, 12, 31), now=now)
    assert info.value.code == "period_out_of_range"


def test_default_periods_are_the_last_finished_ones(session: Session, world: World) -> None:
    now = local(dt.date(2026, 12, 2), 0, 30)  # 16:30 UTC on Dec 1: already Dec 2 locally
    expected = {
        reports.ReportKind.DAILY: "2026-12-01",
        reports.ReportKind.WEEKLY: "2026-W48",
        reports.ReportKind.MONTHLY: "2026-11",
    }
    for kind, label in expected.items():
        body = reports.report(
            session=session,
            station_id=world.station.id,
            kind=kind,
            start=None,
            deadlines=DEADLINES,
            now=now,
        )
        assert (body["period"], body["complete"]) == (label, True)


def test_period_labels_parse_strictly() -> None:
    assert reports.parse_week("2026-W48") == DAY
    assert reports.parse_week("2026-W53") == dt.date(2026, 12, 28)  # 2026 has 53 weeks
    assert reports.parse_month("2026-11") == dt.date(2026, 11, 1)
    for bad in ("2026-48", "2026-W1", "2025-W53", "26-W10", "2026-W00"):
        with pytest.raises(ValueError):
            reports.parse_week(bad)
    for bad in ("2026-13", "2026-1", "2026/11", "2026-00"):
        with pytest.raises(ValueError):
            reports.parse_month(bad)


# -- issuing ----------------------------------------------------------------------------------


@pytest.fixture
def stations_of_old(session: Session, world: World) -> None:
    for station in (world.station, world.other_station):
        station.created_at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    session.commit()


def stored(session: Session) -> list[tuple[int, str, str]]:
    return [
        (r.station_id, r.kind.value, r.period)
        for r in session.scalars(select(StationReport).order_by(StationReport.id))
    ]


def test_issue_due_reports_stores_each_finished_period_once(
    session: Session, world: World, stations_of_old: None, crafted: CraftedDay
) -> None:
    now = local(dt.date(2026, 12, 2), 10)  # a Wednesday
    result = reports.issue_due_reports(session=session, now=now, deadlines=DEADLINES)
    session.commit()
    # Oldest first: Nov 25..29, the week ending on the 29th, Nov 30, the month, Dec 1.
    expected = [("daily", f"2026-11-{d}") for d in range(25, 30)] + [
        ("weekly", "2026-W48"),
        ("daily", "2026-11-30"),
        ("monthly", "2026-11"),
        ("daily", "2026-12-01"),
    ]
    for station in (world.station, world.other_station):
        issued = [(kind, period) for sid, kind, period in stored(session) if sid == station.id]
        assert issued == expected
    assert result["counts"] == {"daily": 14, "weekly": 2, "monthly": 2}
    assert result["skipped"] == 0
    assert [item["id"] for item in result["issued"]] == [
        r.id for r in session.scalars(select(StationReport).order_by(StationReport.id))
    ]
    # The stored week holds the crafted Monday.
    week = session.scalars(
        select(StationReport).where(
            StationReport.station_id == world.station.id, StationReport.period == "2026-W48"
        )
    ).one()
    assert week.body["totals"]["checked_out"] == 9
    assert week.body["complete"] is True and week.generated_at == now
    # Today (Dec 2) is not finished: not issued. A second run issues nothing.
    assert all(period != "2026-12-02" for _, _, period in stored(session))
    again = reports.issue_due_reports(session=session, now=now, deadlines=DEADLINES)
    assert again["issued"] == [] and again["counts"] == {"daily": 0, "weekly": 0, "monthly": 0}
    # The next day only Dec 2 is due.
    following = reports.issue_due_reports(
        session=session, now=now + dt.timedelta(days=1), deadlines=DEADLINES
    )
    assert [(i["kind"], i["period"]) for i in following["issued"]] == [
        ("daily", "2026-12-02"),
        ("daily", "2026-12-02"),
    ]


def test_a_concurrent_issuer_loses_quietly_on_the_unique_constraint(
    session: Session, world: World, stations_of_old: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = local(dt.date(2026, 12, 2), 10)
    first = reports.issue_due_reports(session=session, now=now, deadlines=DEADLINES)
    session.commit()
    # Another issuer that looked before the first one stored anything.
    monkeypatch.setattr(reports, "_issued_periods", lambda *args: set())
    second = reports.issue_due_reports(session=session, now=now, deadlines=DEADLINES)
    session.commit()
    assert second["issued"] == [] and second["skipped"] == len(first["issued"]) == 18
    assert len(stored(session)) == 18


@pytest.mark.postgres_only
def test_two_issuers_racing_store_each_report_once(engine: Engine) -> None:
    """The second issuer read no stored reports, then waits on the unique index while
    the first has not committed, and skips each period once it has."""
    with Session(engine) as setup:
        station = Station(code="RACE", name="Race", timezone="Asia/Shanghai")
        station.created_at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        setup.add(station)
        setup.commit()
        station_id = station.id
    now = local(dt.date(2026, 12, 2), 10)
    results: dict[str, Any] = {}

    def second_issuer() -> None:
        with Session(engine) as second:
            results["second"] = reports.issue_due_reports(
                session=second, now=now, deadlines=DEADLINES
            )
            second.commit()

    try:
        with Session(engine) as first:
            results["first"] = reports.issue_due_reports(
                session=first, now=now, deadlines=DEADLINES
            )
            racer = threading.Thread(target=second_issuer)
            racer.start()
            racer.join(timeout=1.0)
            assert racer.is_alive()  # waiting for the first issuer's transaction
            first.commit()
        racer.join(timeout=30)
        assert len(results["first"]["issued"]) == 9
        assert results["second"]["issued"] == [] and results["second"]["skipped"] == 9
        with Session(engine) as check:
            count = check.scalar(
                select(func.count())
                .select_from(StationReport)
                .where(StationReport.station_id == station_id)
            )
        assert count == 9
    finally:
        with Session(engine) as cleanup:
            cleanup.execute(delete(StationReport).where(StationReport.station_id == station_id))
            cleanup.execute(delete(Station).where(Station.id == station_id))
            cleanup.commit()


def test_no_report_for_periods_before_the_station_existed(session: Session, world: World) -> None:
    for station in (world.station, world.other_station):
        station.created_at = local(dt.date(2026, 11, 30), 12)
    session.commit()
    result = reports.issue_due_reports(
        session=session, now=local(dt.date(2026, 12, 2), 10), deadlines=DEADLINES
    )
    assert sorted({(i["kind"], i["period"]) for i in result["issued"]}) == [
        ("daily", "2026-11-30"),
        ("daily", "2026-12-01"),
        ("monthly", "2026-11"),
    ]


# -- CSV --------------------------------------------------------------------------------------


def test_csv_has_a_flags_column_for_each_kind_the_period_or_the_one_before_raised(
    session: Session, world: World, crafted: CraftedDay
) -> None:
    """README: two reports' CSV may have different ``flags_<kind>`` columns (match them
    by name): a column for each kind raised in the period or the one before, no other."""
    body = daily(session, world)
    header = next(csv.reader(io.StringIO(reports.report_csv(body))))
    raised = {*body["totals"]["flags_by_kind"], *body["previous"]["totals"]["flags_by_kind"]}
    columns = {name.removeprefix("flags_") for name in header if name.startswith("flags_")}
    assert raised and len(raised) < len(flags.KINDS)
    assert columns == raised | {"total"}


def test_csv_has_a_header_and_one_row_per_scope(
    session: Session, world: World, crafted: CraftedDay
) -> None:
    body = daily(session, world)
    rows = list(csv.reader(io.StringIO(reports.report_csv(body))))
    header, *data = rows
    assert header[:7] == [
        "station",
        "period",
        "scope",
        "date",
        "courier_id",
        "courier_username",
        "courier_name",
    ]
    assert {"on_time_rate_express", "on_time_measured_parcel", "flags_clock_skew"} <= set(header)
    assert [row[2] for row in data] == ["total", "day", "courier", "courier", "previous", "change"]
    assert all(len(row) == len(header) for row in data)
    by_scope = {row[2]: dict(zip(header, row, strict=True)) for row in data}
    total = by_scope["total"]
    assert (total["station"], total["period"], total["checked_out"]) == ("ST1", "2026-11-23", "9")
    assert total["information_loss_rate"] == "0.2222"
    assert total["on_time_rate_registered"] == ""  # null
    assert by_scope["day"]["date"] == "2026-11-23"
    assert by_scope["previous"]["period"] == "2026-11-22"
    assert by_scope["previous"]["flags_clock_skew"] == "1"
    assert by_scope["change"]["checked_out"] == "9"
    couriers = [row for row in data if row[2] == "courier"]
    assert [(row[5], row[6]) for row in couriers] == [
        ("courier1", "Zhang Wei"),
        ("courier2b", "Li Na"),
    ]
    assert reports.csv_filename(body) == "ST1-daily-2026-11-23.csv"


def test_a_day_with_a_shift_still_open_is_issued_once_it_settles_or_a_day_later(
    session: Session, world: World, stations_of_old: None, pda_a: Pda
) -> None:
    day = dt.date(2026, 12, 3)
    shift = pda_a.open(local(day, 8))
    tn = parcel(session, world, local(day, 7))
    pda_a.push([pda_a.event(tn, "checked_out", local(day, 8, 5))], local(day, 8, 10))

    def issued_daily(now: dt.datetime) -> list[str]:
        reports.issue_due_reports(session=session, now=now, deadlines=DEADLINES, lookback_days=1)
        session.commit()
        return [
            p for sid, kind, p in stored(session) if sid == world.station.id and kind == "daily"
        ]

    next_morning = local(day + dt.timedelta(days=1), 0, 10)
    assert "2026-12-03" not in issued_daily(next_morning)  # the courier is still out
    pda_a.close(shift, local(day + dt.timedelta(days=1), 0, 20))
    assert "2026-12-03" in issued_daily(local(day + dt.timedelta(days=1), 0, 30))
    report = session.scalars(
        select(StationReport).where(
            StationReport.station_id == world.station.id, StationReport.period == "2026-12-03"
        )
    ).one()
    assert (report.body["totals"]["shifts_open"], report.body["totals"]["missing"]) == (0, 1)


def test_a_day_whose_shift_never_closes_is_issued_a_day_after_it_ended(
    session: Session, world: World, stations_of_old: None, pda_a: Pda
) -> None:
    day = dt.date(2026, 12, 3)
    pda_a.open(local(day, 8))
    later = local(day + dt.timedelta(days=1), 23)
    reports.issue_due_reports(session=session, now=later, deadlines=DEADLINES, lookback_days=2)
    assert not [p for sid, _, p in stored(session) if (sid, p) == (world.station.id, "2026-12-03")]
    much_later = local(day + dt.timedelta(days=2), 0, 5)
    reports.issue_due_reports(
        session=session, now=much_later, deadlines=DEADLINES, lookback_days=2
    )
    session.commit()
    report = session.scalars(
        select(StationReport).where(
            StationReport.station_id == world.station.id, StationReport.period == "2026-12-03"
        )
    ).one()
    assert report.body["totals"]["shifts_open"] == 1
