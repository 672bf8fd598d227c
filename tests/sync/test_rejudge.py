"""Judging every parcel again after the policy changed (``sync.rejudge``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from models import (
    AuditEntry,
    Consent,
    DeviceSyncState,
    Flag,
    FlagSeverity,
    FlagStatus,
    Parcel,
    ScanEvent,
    ServiceClass,
    User,
)
from sync import inversion_flags, rejudge
from sync.events import EventRules
from sync.flags import SYSTEM_CHANGE, FlagSubject, raise_flag, resolve_flag
from sync.ingest import IngestRules, PushBatch, Pusher, ingest
from sync.parcels import IntakeRules, IntakeScope, ParcelDraft, intake_parcels
from sync.rejudge import REJUDGE_STARTED_ACTION, REJUDGED_ACTION, RejudgeTotals, rejudge_parcels
from sync.rules import Policy
from sync.sql import aborted_for_a_conflict
from sync.status import reproject
from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy
from tests import factories
from tests.conftest import World
from tests.sync.test_ingest import locker_consent

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
RULES = IngestRules(
    events=EventRules(tracking=TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS))
)
ORDINARY_TOO = Policy(consent_required=frozenset(ServiceClass))


def drop_in_a_locker(session: Session, pusher: Pusher, tracking_no: str) -> None:
    """Checked out and left in a locker with a pickup code, no consent on record."""
    at = NOW - dt.timedelta(hours=1)
    events = [
        factories.event(1, tracking_no, occurred_at=at),
        factories.event(
            2,
            tracking_no,
            "delivered_to_locker",
            occurred_at=at + dt.timedelta(minutes=30),
            locker_id="L-1",
            compartment="4",
            pod={"pickup_code": "2468"},
        ),
    ]
    push(session, pusher, events)


def push(session: Session, pusher: Pusher, events: list[dict[str, Any]]) -> None:
    ingest(
        session=session,
        batch=PushBatch(pusher.device_id, uuid.uuid4(), NOW, events),
        pusher=pusher,
        rules=RULES,
        received_at=NOW,
    )
    session.commit()


def unauthorized(session: Session) -> set[str]:
    session.expire_all()
    return set(
        session.scalars(
            select(Flag.subject_key).where(
                Flag.kind == "unauthorized_locker_drop", Flag.status == FlagStatus.OPEN
            )
        )
    )


def test_parcels_dropped_under_one_policy_are_judged_again_under_the_next(
    session: Session, world: World
) -> None:
    """Ordinary parcels need no consent for a locker, until the station's policy says
    they do. Parcels dropped before keep their old judgment until something about
    them changes; ``rejudge`` applies the new policy to them all, station by station
    if asked, says what it did batch by batch, and a second run changes nothing."""
    here = factories.parcel(session, world.station, service_class=ServiceClass.ORDINARY)
    other_station, [there] = factories.station_with_pdas(
        session, "OTH", {"courier-oth": "PDA-OTH"}, parcels=1
    )
    there_parcel = session.scalars(select(Parcel).where(Parcel.tracking_no == there)).one()
    there_parcel.service_class = ServiceClass.ORDINARY
    session.commit()
    drop_in_a_locker(
        session, Pusher(world.device.id, world.station.id, world.courier.id), here.tracking_no
    )
    courier = session.scalars(select(User).where(User.username == "courier-oth")).one()
    drop_in_a_locker(session, Pusher("PDA-OTH", other_station.id, courier.id), there)
    assert unauthorized(session) == set()  # no consent needed when dropped

    seen: list[int] = []
    totals = rejudge_parcels(
        session=session,
        policy=ORDINARY_TOO,
        station_id=world.station.id,
        batch=1,
        progress=lambda done: seen.append(done.parcels),
    )
    assert unauthorized(session) == {here.tracking_no}  # the other station's waits
    # a line after the station's one drop's bounds, then one per parcel
    assert seen[0] == 0 and seen[1:] == list(range(1, totals.parcels + 1))
    assert totals.flags_raised == 1

    everywhere = rejudge_parcels(session=session, policy=ORDINARY_TOO)
    assert unauthorized(session) == {here.tracking_no, there}
    assert everywhere.flags_raised == 1

    again = rejudge_parcels(session=session, policy=ORDINARY_TOO)
    assert again == RejudgeTotals(parcels=everywhere.parcels)  # nothing left to change

    back = rejudge_parcels(session=session, policy=Policy())
    assert unauthorized(session) == set()  # closed: the rule holds again
    assert back.flags_rejudged == 2

    runs = session.scalars(
        select(AuditEntry).where(AuditEntry.action == REJUDGED_ACTION).order_by(AuditEntry.id)
    ).all()
    assert [(r.subject_type, r.subject_key) for r in runs] == [
        ("station", str(world.station.id)),
        ("service", "all"),
        ("service", "all"),
        ("service", "all"),
    ]
    assert runs[0].details["flags_raised"] == 1
    started = session.scalars(
        select(AuditEntry)
        .where(AuditEntry.action == REJUDGE_STARTED_ACTION)
        .order_by(AuditEntry.id)
    ).all()
    assert [entry.id < run.id for entry, run in zip(started, runs, strict=True)] == [True] * 4
    assert started[0].details["policy"] == runs[0].details["policy"]
    assert runs[0].details["policy"]["consent_required"] == sorted(c.value for c in ServiceClass)
    assert runs[-1].details["policy"]["consent_required"] == ["express"]


def test_drops_stored_without_their_bounds_get_them_back_and_are_judged_with_them(
    session: Session, world: World
) -> None:
    """A drop stamped after the recipient's consent, the PDA's next scan (of another
    parcel) dated before it. Stored by a version that kept no bounds (as while the
    upgrade that brought them ran: here the columns emptied and the parcel judged
    again), it passes for authorized; ``rejudge`` works its bounds out again and
    judges it by them, and a second run changes nothing."""
    express = factories.parcel(session, world.station).tracking_no
    other = factories.parcel(session, world.station).tracking_no
    consent_at = NOW - dt.timedelta(minutes=30)
    locker_consent(session, world, express, consent_at, recorded_at=consent_at)
    session.commit()
    events = [
        factories.event(1, express, occurred_at=consent_at - dt.timedelta(minutes=60)),
        factories.locker_drop(2, express, consent_at + dt.timedelta(minutes=5)),
        factories.event(3, other, occurred_at=consent_at - dt.timedelta(minutes=10)),
    ]
    pusher = Pusher(world.device.id, world.station.id, world.courier.id)
    push(session, pusher, events)
    assert late(session) == {express}
    session.execute(
        update(ScanEvent).values(latest_of_earlier_seqs=None, earliest_of_later_seqs=None)
    )
    reproject(session=session, tracking_nos=[express])
    session.commit()
    assert late(session) == set()  # as the version before judged it

    totals = rejudge_parcels(session=session, policy=Policy())
    assert totals.drop_bounds_changed == 1 and late(session) == {express}
    again = rejudge_parcels(session=session, policy=Policy())
    assert again == RejudgeTotals(parcels=again.parcels)


@pytest.mark.parametrize("station", [True, False], ids=["--station", "every station"])
def test_a_drop_of_a_parcel_not_taken_in_yet_gets_its_bounds_back_too(
    session: Session, world: World, station: bool
) -> None:
    """As above, but the parcel was not taken in when the drop arrived (``unknown_parcel``):
    ``rejudge`` finds the drop by its station all the same, and when the parcel is taken
    in and its consent arrives, the drop is judged with its bounds."""
    express = factories.s10()
    other = factories.parcel(session, world.station).tracking_no
    session.commit()
    consent_at = NOW - dt.timedelta(minutes=30)
    events = [
        factories.locker_drop(1, express, consent_at + dt.timedelta(minutes=5)),
        factories.event(2, other, occurred_at=consent_at - dt.timedelta(minutes=10)),
    ]
    push(session, Pusher(world.device.id, world.station.id, world.courier.id), events)
    session.execute(
        update(ScanEvent).values(latest_of_earlier_seqs=None, earliest_of_later_seqs=None)
    )
    session.commit()
    totals = rejudge_parcels(
        session=session, policy=Policy(), station_id=world.station.id if station else None
    )
    assert totals.drop_bounds_changed == 1
    intake_parcels(
        session=session,
        drafts=[(0, ParcelDraft(express, "express", "R", "1 Road"))],
        rules=IntakeRules(tracking=RULES.events.tracking, phone_region="CN"),
        scope=IntakeScope(default_station_id=world.station.id, allowed_station_ids=None),
    )
    session.commit()
    locker_consent(session, world, express, consent_at, recorded_at=consent_at)
    session.commit()
    assert late(session) == {express}


def test_a_drop_judged_authorized_by_another_stations_captured_consent_is_judged_again(
    session: Session, world: World
) -> None:
    """A courier of another station captured a consent for this station's parcel on
    their PDA, and the parcel was dropped here: the version before counted the consent
    (here: the column the upgrade fills emptied, the parcel judged again), and the
    upgrade fills in the capturing station. ``rejudge`` flags the drop."""
    tn = factories.parcel(session, world.station).tracking_no
    courier2 = factories.user(session, "courier2", "courier", world.other_station)
    session.commit()
    captured_at = NOW - dt.timedelta(minutes=40)
    consent = factories.event(
        1,
        tn,
        "consent_captured",
        occurred_at=captured_at,
        consent={"method": "locker", "channel": "in_person"},
    )
    push(session, Pusher(world.other_device.id, world.other_station.id, courier2.id), [consent])
    drop = factories.locker_drop(1, tn, captured_at + dt.timedelta(minutes=10))
    push(session, Pusher(world.device.id, world.station.id, world.courier.id), [drop])
    assert unauthorized(session) == {tn}
    session.execute(update(Consent).values(captured_at_station_id=None))
    reproject(session=session, tracking_nos=[tn])
    session.execute(update(Consent).values(captured_at_station_id=world.other_station.id))
    session.commit()
    assert unauthorized(session) == set()  # as the version before judged it

    totals = rejudge_parcels(session=session, policy=Policy())
    assert totals.flags_raised == 1 and unauthorized(session) == {tn}


def late(session: Session) -> set[str]:
    session.expire_all()
    return set(
        session.scalars(
            select(Flag.subject_key).where(
                Flag.kind == "consent_after_drop", Flag.status == FlagStatus.OPEN
            )
        )
    )


class _Deadlock(Exception):
    sqlstate = "40P01"  # as psycopg gives it


@pytest.mark.parametrize(
    ("orig", "conflict"),
    [
        (psycopg.errors.DeadlockDetected("deadlock detected"), True),
        (psycopg.errors.SerializationFailure("could not serialize access"), True),
        (psycopg.errors.LockNotAvailable("could not obtain lock"), False),
        (psycopg.OperationalError("server closed the connection"), False),
        (sqlite3.OperationalError("database is locked"), False),
    ],
    ids=["deadlock", "serialization", "lock timeout", "connection lost", "sqlite busy"],
)
def test_one_rule_says_which_errors_postgresql_aborted_for_a_conflict(
    orig: Exception, conflict: bool
) -> None:
    """rejudge and the web edge tell a conflict (run it again: it may well pass) from an
    outage by one rule (``sync.sql.aborted_for_a_conflict``), not two lists of SQLSTATEs
    kept apart; rejudge also waits on SQLite's busy file."""
    error = OperationalError("UPDATE ...", {}, orig)
    assert aborted_for_a_conflict(error) is conflict
    assert rejudge._given_up_for_another(error) is (conflict or isinstance(orig, sqlite3.Error))


def test_a_batch_the_database_gives_up_for_another_transaction_is_tried_again(
    session: Session, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live push or intake can make PostgreSQL pick the run's batch as a deadlock's
    victim: it is rolled back and tried again, and the run goes on. Any other error
    ends the run at once (its start is on the audit log)."""
    here = factories.parcel(session, world.station, service_class=ServiceClass.ORDINARY)
    session.commit()
    drop_in_a_locker(
        session, Pusher(world.device.id, world.station.id, world.courier.id), here.tracking_no
    )
    monkeypatch.setattr(rejudge, "RETRY_SECONDS", 0)
    real = rejudge.reproject
    calls: list[int] = []

    def once_a_victim(**kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("SELECT ...", {}, _Deadlock("deadlock detected"))
        return real(**kwargs)

    monkeypatch.setattr(rejudge, "reproject", once_a_victim)
    totals = rejudge_parcels(session=session, policy=ORDINARY_TOO)
    assert len(calls) == 2 and totals.flags_raised == 1
    assert unauthorized(session) == {here.tracking_no}

    def broken(**kwargs: Any) -> Any:
        raise OperationalError("SELECT ...", {}, Exception("disk I/O error"))

    monkeypatch.setattr(rejudge, "reproject", broken)
    with pytest.raises(OperationalError):
        rejudge_parcels(session=session, policy=Policy())


def test_a_repeat_flagged_as_a_second_outcome_by_the_version_before_is_cleared(
    session: Session, world: World
) -> None:
    """The version before judged a return scanned twice as two final outcomes
    (`conflicting_final_outcome`, critical: the handover unbalanced). This one judges
    it one outcome; the flag it left open closes when ``rejudge`` runs, as README's
    upgrade note says."""
    parcel = factories.parcel(session, world.station)
    at = NOW - dt.timedelta(hours=1)
    events = [
        factories.event(1, parcel.tracking_no, occurred_at=at),
        factories.event(2, parcel.tracking_no, "returned_to_station", occurred_at=at),
        factories.event(3, parcel.tracking_no, "returned_to_station", occurred_at=at),
    ]
    push(session, Pusher(world.device.id, world.station.id, world.courier.id), events)

    def conflicts() -> list[FlagStatus]:
        session.expire_all()
        return list(
            session.scalars(select(Flag.status).where(Flag.kind == "conflicting_final_outcome"))
        )

    assert conflicts() == []
    event_ids = sorted(session.scalars(select(ScanEvent.id).where(ScanEvent.seq > 1)))
    raise_flag(  # as the version before left it
        session=session,
        kind="conflicting_final_outcome",
        severity=FlagSeverity.CRITICAL,
        subject=FlagSubject("parcel", parcel.tracking_no),
        station_id=world.station.id,
        evidence={"event_ids": event_ids},
    )
    session.commit()
    assert conflicts() == [FlagStatus.OPEN]
    rejudge_parcels(session=session, policy=Policy())
    assert conflicts() == [FlagStatus.CLOSED]


def test_a_repeat_in_a_later_shift_flagged_not_on_manifest_by_the_version_before_is_cleared(
    session: Session, world: World
) -> None:
    """The courier delivered the parcel in the morning shift and scanned the delivery
    again in the afternoon one: the version before raised ``not_on_manifest`` on the
    afternoon shift. This one takes the scan as a repeat of the morning's outcome; the
    flag it left open closes when ``rejudge`` runs, as README's upgrade note says."""
    from sync import shifts
    from sync.balances import subject_of
    from sync.shifts import ShiftRules

    parcel = factories.parcel(session, world.station)
    pusher = Pusher(world.device.id, world.station.id, world.courier.id)
    at = NOW - dt.timedelta(hours=6)

    def shift(first_seq: int, events: list[dict[str, Any]], hours: int) -> int:
        opened = shifts.open_shift(
            session=session,
            device=world.device,
            courier_id=world.courier.id,
            rules=ShiftRules(),
            first_seq=first_seq,
            now=at + dt.timedelta(hours=hours),
        )
        session.commit()
        push(session, pusher, events)
        shifts.close_shift(
            session=session,
            shift=opened,
            closed_by=world.courier.id,
            last_seq=first_seq + len(events) - 1,
            now=at + dt.timedelta(hours=hours + 1),
        )
        session.commit()
        return opened.id

    pod = {"recipient_name": "Wang", "signature_sha256": "a" * 64}
    shift(
        1,
        [
            factories.event(1, parcel.tracking_no, occurred_at=at),
            factories.event(2, parcel.tracking_no, "delivered", occurred_at=at, pod=pod),
        ],
        0,
    )
    later = at + dt.timedelta(hours=2, minutes=5)
    afternoon = shift(
        3, [factories.event(3, parcel.tracking_no, "delivered", occurred_at=later)], 2
    )
    assert list(session.scalars(select(Flag.kind).where(Flag.shift_id == afternoon))) == []
    repeat = session.scalars(select(ScanEvent.id).where(ScanEvent.seq == 3)).one()
    raise_flag(  # as the version before left it
        session=session,
        kind="not_on_manifest",
        severity=FlagSeverity.WARNING,
        subject=subject_of(afternoon, parcel.tracking_no),
        station_id=world.station.id,
        shift_id=afternoon,
        evidence={
            "event_ids": [repeat],
            "outcome": "delivered",
            "tracking_no": parcel.tracking_no,
        },
    )
    session.commit()
    rejudge_parcels(session=session, policy=Policy())
    session.expire_all()
    assert list(session.scalars(select(Flag.status).where(Flag.shift_id == afternoon))) == [
        FlagStatus.CLOSED
    ]


def inversion(session: Session, tracking_no: str) -> Flag:
    session.expire_all()
    return session.scalars(
        select(Flag).where(Flag.kind == "time_inversion", Flag.subject_key == tracking_no)
    ).one()


def test_time_inversion_flags_raised_across_a_seq_stored_since_are_judged_again(
    session: Session, world: World
) -> None:
    """Before pushes judged again the pairs they split, a pair judged across a rejected
    seq kept its flag once that seq was stored: parcel P's seqs 1 and 3, the clock
    stepped back by NTP 1.5 s twice (no inversion with seq 2 between them), and seq 3
    named in Q's flag too, whose pair 4-5 stands. Built here as such a version left
    them, P's flag resolved by the manager since. ``rejudge`` judges each flag's seqs
    against the events stored: P's names none now and is closed by the system, its
    resolution settling nothing (a rule flag whose cause went away is closed resolved
    or not), the change on the audit log; Q's keeps 4-5 and its status. A second run
    changes nothing."""
    p, q = (factories.parcel(session, world.station).tracking_no for _ in range(2))
    session.commit()
    at = NOW - dt.timedelta(hours=1)
    step = dt.timedelta(seconds=1.5)
    pusher = Pusher(world.device.id, world.station.id, world.courier.id)
    events = [
        factories.event(1, p, occurred_at=at),
        factories.event(2, p, "out_for_delivery", occurred_at=at - step),
        factories.event(3, p, "out_for_delivery", occurred_at=at - 2 * step),
        factories.event(4, q, occurred_at=at + dt.timedelta(minutes=10)),
        factories.event(5, q, "out_for_delivery", occurred_at=at + dt.timedelta(minutes=5)),
    ]
    push(session, pusher, events)
    pda = world.device.id
    assert inversion(session, q).evidence["device_seqs"] == [f"{pda}#4", f"{pda}#5"]
    for tracking_no, stale in ((p, ["#1", "#3"]), (q, ["#3"])):
        raise_flag(
            session=session,
            kind="time_inversion",
            severity=FlagSeverity.WARNING,
            subject=FlagSubject("parcel", tracking_no),
            station_id=world.station.id,
            evidence={"device_seqs": [pda + seq for seq in stale]},
        )
    session.commit()
    assert inversion(session, q).evidence["device_seqs"] == [f"{pda}#{s}" for s in (3, 4, 5)]
    resolve_flag(
        session=session,
        flag=inversion(session, p),
        user_id=world.manager.id,
        note="NTP, checked",
    )
    session.commit()

    totals = rejudge_parcels(session=session, policy=Policy())
    stale_p, kept_q = inversion(session, p), inversion(session, q)
    assert (stale_p.status, stale_p.evidence["device_seqs"]) == (FlagStatus.CLOSED, [])
    assert "judged again against the events stored" in (stale_p.closed_reason or "")
    assert (kept_q.status, kept_q.evidence["device_seqs"]) == (
        FlagStatus.OPEN,
        [f"{pda}#4", f"{pda}#5"],
    )
    assert (totals.inversion_seqs_withdrawn, totals.inversion_flags_closed) == (3, 1)
    changes = session.scalars(
        select(AuditEntry).where(
            AuditEntry.action == SYSTEM_CHANGE, AuditEntry.subject_key == str(stale_p.id)
        )
    ).all()
    assert [(c.details["from_status"], c.details["to_status"]) for c in changes] == [
        ("resolved", "closed")
    ]

    again = rejudge_parcels(session=session, policy=Policy())
    assert again == RejudgeTotals(parcels=again.parcels)
    assert session.scalar(
        select(func.count()).select_from(AuditEntry).where(AuditEntry.action == SYSTEM_CHANGE)
    ) == len(changes)


def test_a_pair_across_seqs_written_off_before_the_write_off_judged_it_is_flagged(
    session: Session, world: World
) -> None:
    """Seq 3, a consent, dated ten minutes before seq 1; seq 2 lost and written off once
    both had arrived by a version whose write-off judged no pair (the sync state as it
    left it). ``rejudge`` judges the pair across it, at the PDA's station, as a write-off
    now does; a second run raises nothing."""
    p = factories.parcel(session, world.station).tracking_no
    session.commit()
    at = NOW - dt.timedelta(hours=1)
    events = [
        factories.event(1, p, occurred_at=at),
        factories.event(3, p, "out_for_delivery", occurred_at=at - dt.timedelta(minutes=10)),
        factories.event(9, p, "out_for_delivery", occurred_at=at + dt.timedelta(minutes=5)),
    ]
    push(session, Pusher(world.device.id, world.station.id, world.courier.id), events)
    session.execute(
        update(DeviceSyncState)
        .where(DeviceSyncState.device_id == world.device.id)
        .values(missing_ranges=[[4, 8]], written_off_ranges=[[2, 2]], acked_through_seq=3)
    )
    session.commit()
    assert session.scalar(select(func.count()).select_from(Flag)) == 0

    totals = rejudge_parcels(session=session, policy=Policy(), station_id=world.station.id)
    flag = inversion(session, p)
    assert (flag.status, flag.evidence["device_seqs"], flag.station_id) == (
        FlagStatus.OPEN,
        [f"{world.device.id}#1", f"{world.device.id}#3"],
        world.station.id,
    )
    assert totals.inversion_flags_raised == 1
    again = rejudge_parcels(session=session, policy=Policy())
    assert again == RejudgeTotals(parcels=again.parcels)


def test_a_pair_across_seqs_written_off_of_a_pda_moved_since_is_its_old_stations(
    session: Session, world: World
) -> None:
    """As above, then the PDA moved to ST2. ``rejudge --station ST1`` judged only ST2's
    PDAs now, and a run for every station raised the pair at ST2, the PDA's station now:
    a flag about ST1's events on ST2's board, where a push raised it at ST1. Both raise
    it at ST1 now, where its events were pushed; ``--station ST2`` raises nothing."""
    p = factories.parcel(session, world.station).tracking_no
    session.commit()
    at = NOW - dt.timedelta(hours=1)
    events = [
        factories.event(1, p, occurred_at=at),
        factories.event(3, p, "out_for_delivery", occurred_at=at - dt.timedelta(minutes=10)),
        factories.event(9, p, "out_for_delivery", occurred_at=at + dt.timedelta(minutes=5)),
    ]
    push(session, Pusher(world.device.id, world.station.id, world.courier.id), events)
    session.execute(
        update(DeviceSyncState)
        .where(DeviceSyncState.device_id == world.device.id)
        .values(missing_ranges=[[4, 8]], written_off_ranges=[[2, 2]], acked_through_seq=3)
    )
    world.device.station_id = world.other_station.id
    session.commit()

    st2 = world.other_station.id
    elsewhere = rejudge_parcels(session=session, policy=Policy(), station_id=st2)
    assert elsewhere.inversion_flags_raised == 0
    totals = rejudge_parcels(session=session, policy=Policy(), station_id=world.station.id)
    assert totals.inversion_flags_raised == 1
    rejudge_parcels(session=session, policy=Policy())
    flags = session.scalars(select(Flag).where(Flag.kind == "time_inversion")).all()
    assert [(f.station_id, f.evidence["device_seqs"]) for f in flags] == [
        (world.station.id, [f"{world.device.id}#1", f"{world.device.id}#3"])
    ]


def test_a_pair_flagged_at_another_station_than_its_later_event_goes_to_that_one(
    session: Session, world: World
) -> None:
    """ST1's courier pushed seqs 1 and 3 of a parcel; the PDA moved to ST2, whose courier
    pushed seq 2, dated after 3: the pair 2-3 was flagged at ST2, the pushing courier's
    station, as the service did before a pair became its later event's station's (3:
    ST1). ``rejudge`` judged the flag by parcel, found 2-3 still inverted, and left it on
    ST2's board, where the push storing 2 first would have raised it at ST1. Now it
    raises the pair at ST1 and withdraws it from ST2's flag (closed, naming none)."""
    p = factories.parcel(session, world.station).tracking_no
    session.commit()
    at = NOW - dt.timedelta(hours=1)
    st1 = Pusher(world.device.id, world.station.id, world.courier.id)
    push(
        session,
        st1,
        [factories.event(1, p, occurred_at=at), factories.event(3, p, occurred_at=at)],
    )
    world.device.station_id = world.other_station.id
    courier = factories.user(session, "courier2", "courier", world.other_station)
    session.commit()
    st2 = Pusher(world.device.id, world.other_station.id, courier.id)
    later = at + dt.timedelta(minutes=10)
    push(session, st2, [factories.event(2, p, "out_for_delivery", occurred_at=later)])
    # As the service raised it before: at the station of the push completing the pair.
    session.execute(
        update(Flag).where(Flag.kind == "time_inversion").values(station_id=world.other_station.id)
    )
    session.commit()

    totals = rejudge_parcels(session=session, policy=Policy())
    assert (totals.inversion_flags_raised, totals.inversion_flags_closed) == (1, 1)
    flags = session.scalars(
        select(Flag).where(Flag.kind == "time_inversion").order_by(Flag.station_id)
    ).all()
    assert [(f.station_id, f.status, f.evidence["device_seqs"]) for f in flags] == [
        (world.station.id, FlagStatus.OPEN, [f"{world.device.id}#2", f"{world.device.id}#3"]),
        (world.other_station.id, FlagStatus.CLOSED, []),
    ]
    again = rejudge_parcels(session=session, policy=Policy())
    assert (again.inversion_flags_raised, again.inversion_flags_closed) == (0, 0)


def test_rejudging_write_offs_locks_every_pda_of_its_batch_before_any_flag(
    session: Session, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The push's lock order is its PDA's sync state, then flags. A batch of PDAs with
    seqs written off that locked one PDA's state, raised its flag, then locked the next
    PDA's state would hold parcel P's ``time_inversion`` flag while waiting for the
    second PDA's state, which that PDA's push holds while it waits for P's flag: a
    deadlock on PostgreSQL, the push given up. Every state of the batch is locked, in id
    order, before a flag is touched, as the flags' rejudging does."""
    p = factories.parcel(session, world.station).tracking_no
    second = factories.device(session, "PDA-0003", world.station)
    session.commit()
    at = NOW - dt.timedelta(hours=1)
    for pda in (world.device.id, second.id):
        events = [
            factories.event(1, p, occurred_at=at),
            factories.event(3, p, "out_for_delivery", occurred_at=at - dt.timedelta(minutes=10)),
        ]
        push(session, Pusher(pda, world.station.id, world.courier.id), events)
        session.execute(
            update(DeviceSyncState)
            .where(DeviceSyncState.device_id == pda)
            .values(missing_ranges=[], written_off_ranges=[[2, 2]], acked_through_seq=3)
        )
    session.commit()
    calls: list[tuple[str, str]] = []
    lock, raise_ = inversion_flags.lock_device_state, inversion_flags.raise_flag

    def locking(session: Session, device_id: str) -> Any:
        calls.append(("lock", device_id))
        return lock(session, device_id)

    def raising(**kwargs: Any) -> Any:
        calls.append(("flag", kwargs["subject"].key))
        return raise_(**kwargs)

    monkeypatch.setattr(inversion_flags, "lock_device_state", locking)
    monkeypatch.setattr(inversion_flags, "raise_flag", raising)
    raised, _ = inversion_flags.rejudge_written_off(
        session=session, after_device="", limit=10, tolerance=dt.timedelta(seconds=2)
    )
    assert raised == 1
    assert calls == [
        ("lock", world.device.id),
        ("lock", second.id),
        ("flag", p),
        ("flag", p),
    ]
    assert inversion(session, p).evidence["device_seqs"] == [
        f"{pda}#{seq}" for pda in (world.device.id, second.id) for seq in (1, 3)
    ]


@pytest.mark.postgres_only
def test_rejudging_flags_while_another_pda_raises_two_of_them_deadlocks_neither(
    committed_app: Any,
) -> None:
    """PostgreSQL, two connections. Parcels P and Q (P first by number) have
    ``time_inversion`` flags naming PDA-A, Q's raised first (the lower id). PDA-B's push
    (or a write-off of its seqs) raises both, as a push does: by parcel, P's then Q's.
    ``rejudge`` locks PDA-A's state, then the batch's flags: by id, it took Q's and
    waited for P's, held by the push, which then waited for Q's: a deadlock, one of them
    given up (the courier's upload failed). In the push's order, by parcel, it waits for
    P's holding no flag, and both finish."""
    from courier_api.extensions import db

    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    with sessions() as setup:
        station = factories.station(setup, code="RACE")
        for pda in ("PDA-A", "PDA-B"):
            factories.device(setup, pda, station)
        p, q = sorted(factories.parcel(setup, station).tracking_no for _ in range(2))
        for tracking_no in (q, p):
            raise_flag(
                session=setup,
                kind="time_inversion",
                severity=FlagSeverity.WARNING,
                subject=FlagSubject("parcel", tracking_no),
                station_id=station.id,
                evidence={"device_seqs": ["PDA-A#1", "PDA-A#3"]},
            )
        setup.commit()
        station_id = station.id

    def raise_for_b(session: Session, tracking_no: str) -> None:
        raise_flag(
            session=session,
            kind="time_inversion",
            severity=FlagSeverity.WARNING,
            subject=FlagSubject("parcel", tracking_no),
            station_id=station_id,
            evidence={"device_seqs": ["PDA-B#7", "PDA-B#9"]},
        )
        session.flush()

    failures: list[BaseException] = []

    def rejudging() -> None:
        try:
            with sessions() as session:
                inversion_flags.rejudge_flags(
                    session=session, after_id=0, limit=10, tolerance=dt.timedelta(seconds=2)
                )
                session.commit()
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            failures.append(error)

    with sessions() as pushing:
        raise_for_b(pushing, p)
        rejudge_thread = threading.Thread(target=rejudging)
        rejudge_thread.start()
        time.sleep(0.5)  # rejudge waits for P's flag, holding what it locked before
        try:
            raise_for_b(pushing, q)
            pushing.commit()
        except BaseException as error:  # noqa: BLE001
            failures.append(error)
            pushing.rollback()
        rejudge_thread.join(timeout=30)
    assert failures == []
    with sessions() as check:
        named = dict(
            check.execute(
                select(Flag.subject_key, Flag.evidence).where(Flag.kind == "time_inversion")
            ).all()
        )
    assert {key: evidence["device_seqs"] for key, evidence in named.items()} == {
        tracking_no: ["PDA-B#7", "PDA-B#9"] for tracking_no in (p, q)
    }


def test_rejudging_write_offs_raises_a_batch_s_flags_by_parcel(
    session: Session, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PDA-0001's pair across its seq written off is parcel Q's, PDA-0003's parcel P's
    (P first by number). The batch raises P's flag, then Q's, as a push raises its
    flags, whichever PDA each came from: PDA by PDA it took Q's and then P's, while
    another PDA's push raising both took P's and waited for Q's (a deadlock on
    PostgreSQL)."""
    p, q = sorted(factories.parcel(session, world.station).tracking_no for _ in range(2))
    second = factories.device(session, "PDA-0003", world.station)
    session.commit()
    at = NOW - dt.timedelta(hours=1)
    for pda, tracking_no in ((world.device.id, q), (second.id, p)):
        events = [
            factories.event(1, tracking_no, occurred_at=at),
            factories.event(
                3, tracking_no, "out_for_delivery", occurred_at=at - dt.timedelta(minutes=10)
            ),
        ]
        push(session, Pusher(pda, world.station.id, world.courier.id), events)
        session.execute(
            update(DeviceSyncState)
            .where(DeviceSyncState.device_id == pda)
            .values(missing_ranges=[], written_off_ranges=[[2, 2]], acked_through_seq=3)
        )
    session.commit()
    raised_for: list[str] = []
    raise_ = inversion_flags.raise_flag

    def raising(**kwargs: Any) -> Any:
        raised_for.append(kwargs["subject"].key)
        return raise_(**kwargs)

    monkeypatch.setattr(inversion_flags, "raise_flag", raising)
    raised, _ = inversion_flags.rejudge_written_off(
        session=session, after_device="", limit=10, tolerance=dt.timedelta(seconds=2)
    )
    assert (raised, raised_for) == (2, [p, q])
    assert inversion(session, p).evidence["device_seqs"] == [f"{second.id}#1", f"{second.id}#3"]


def test_judging_a_batch_of_time_inversion_flags_again_costs_no_statement_per_flag(
    session: Session, world: World
) -> None:
    """A PDA's check-outs each followed by a scan dated five minutes before it: a
    ``time_inversion`` flag per parcel, each still standing. ``rejudge`` read each
    flag's seqs and searched each seq's neighbours on its own, three statements a flag
    (a station's year of flags, a run of hours); a batch now reads its PDAs' seqs at
    once, the same statements for 2 flags as for 12, and leaves each flag as it was."""
    from tests.sync.test_ingest import statements_sent

    def statements(flags: int) -> int:
        parcels = sorted(
            factories.parcel(session, world.station).tracking_no for _ in range(flags)
        )
        device = factories.device(session, f"PDA-9{flags:03d}", world.station)
        session.commit()
        at = NOW - dt.timedelta(hours=2)
        events = []
        for number, tracking_no in enumerate(parcels):
            scanned = at + dt.timedelta(minutes=10 * number)
            events.append(factories.event(2 * number + 1, tracking_no, occurred_at=scanned))
            events.append(
                factories.event(
                    2 * number + 2,
                    tracking_no,
                    "out_for_delivery",
                    occurred_at=scanned - dt.timedelta(minutes=5),
                )
            )
        push(session, Pusher(device.id, world.station.id, world.courier.id), events)
        first = min(inversion(session, tracking_no).id for tracking_no in parcels)
        with statements_sent(session) as sent:
            done, _ = inversion_flags.rejudge_flags(
                session=session,
                after_id=first - 1,
                limit=flags,
                tolerance=dt.timedelta(seconds=2),
            )
        assert done == (flags, 0, 0, 0)
        session.rollback()
        return len(sent)

    assert statements(2) == statements(12)


def test_a_parcel_s_flags_at_two_stations_count_the_seqs_withdrawn_once(
    session: Session, world: World
) -> None:
    """A parcel's ``time_inversion`` flag at each of two stations (it moved, or a
    write-off raised one at the PDA's), both naming seqs 1 and 3 of a pair a seq stored
    since split. Withdrawing them from the first flag withdraws them from the second too
    (``withdraw_evidence`` works at every station): the batch read both flags' seqs before
    withdrawing any, and said 4 seqs withdrawn where 2 were, judging the second flag on
    what it no longer named. Each flag is judged on what it names when its turn comes."""
    p = factories.parcel(session, world.station).tracking_no
    session.commit()
    at = NOW - dt.timedelta(hours=1)
    step = dt.timedelta(seconds=1.5)
    events = [
        factories.event(1, p, occurred_at=at),
        factories.event(2, p, "out_for_delivery", occurred_at=at - step),
        factories.event(3, p, "out_for_delivery", occurred_at=at - 2 * step),
    ]
    push(session, Pusher(world.device.id, world.station.id, world.courier.id), events)
    pda = world.device.id
    for station in (world.station, world.other_station):
        raise_flag(
            session=session,
            kind="time_inversion",
            severity=FlagSeverity.WARNING,
            subject=FlagSubject("parcel", p),
            station_id=station.id,
            evidence={"device_seqs": [f"{pda}#1", f"{pda}#3"]},
        )
    session.commit()

    done, _ = inversion_flags.rejudge_flags(
        session=session, after_id=0, limit=10, tolerance=dt.timedelta(seconds=2)
    )
    session.commit()
    assert done == inversion_flags.Rejudged(judged=2, withdrawn=2, closed=2)
    session.expire_all()
    flags = session.scalars(select(Flag).where(Flag.kind == "time_inversion")).all()
    assert [(f.status, f.evidence["device_seqs"]) for f in flags] == [(FlagStatus.CLOSED, [])] * 2


def test_a_stations_run_judges_the_flags_on_its_board_of_a_parcel_moved_elsewhere_since(
    session: Session, world: World
) -> None:
    """ST1's courier scanned parcel P: seqs 1 and 3, the clock stepped back by NTP 1.5 s
    twice (no inversion with seq 2 between them), flagged across seq 2 by a version
    before (as ``time_inversion_flags_raised_across_a_seq_stored_since`` builds it), on
    ST1's board. An intake then moved P to ST2 (it was mis-sorted). ``rejudge --station
    ST1`` picked the time_inversion flags by their parcel's station now, so it left the
    stale flag on ST1's board, the one its manager asked to have put right, and only a
    run for ST2 would close it. A station's run now judges the flags on its board too,
    and its parcels' flags wherever they stand, as before."""
    p = factories.parcel(session, world.station).tracking_no
    session.commit()
    at = NOW - dt.timedelta(hours=1)
    step = dt.timedelta(seconds=1.5)
    pusher = Pusher(world.device.id, world.station.id, world.courier.id)
    events = [
        factories.event(1, p, occurred_at=at),
        factories.event(2, p, "out_for_delivery", occurred_at=at - step),
        factories.event(3, p, "out_for_delivery", occurred_at=at - 2 * step),
    ]
    push(session, pusher, events)
    pda = world.device.id
    raise_flag(
        session=session,
        kind="time_inversion",
        severity=FlagSeverity.WARNING,
        subject=FlagSubject("parcel", p),
        station_id=world.station.id,
        evidence={"device_seqs": [f"{pda}#1", f"{pda}#3"]},
    )
    session.execute(
        update(Parcel).where(Parcel.tracking_no == p).values(station_id=world.other_station.id)
    )
    session.commit()

    totals = rejudge_parcels(session=session, policy=Policy(), station_id=world.station.id)

    stale = inversion(session, p)
    assert (stale.station_id, stale.status, stale.evidence["device_seqs"]) == (
        world.station.id,
        FlagStatus.CLOSED,
        [],
    )
    assert (totals.inversion_seqs_withdrawn, totals.inversion_flags_closed) == (2, 1)


def test_the_totals_count_one_of_each_as_one() -> None:
    """Each count of one reads singular ('1 rule flag raised', '1 drop's bounds'), each
    other count plural, as the other commands' progress lines and summaries do."""
    ones = RejudgeTotals(**{f.name: 1 for f in dataclasses.fields(RejudgeTotals)})
    assert ones.summary() == (
        "1 parcel judged again: 1 changed status, 1 rule flag raised, 1 closed or changed, "
        "1 handover flag of closed shifts raised, 1 drop's bounds repaired; time_inversion "
        "flags judged again: 1 seq withdrawn, 1 flag closed, 1 raised (across seqs "
        "written off, or at their later event's station)"
    )
    twos = RejudgeTotals(**{f.name: 2 for f in dataclasses.fields(RejudgeTotals)})
    assert twos.summary() == (
        "2 parcels judged again: 2 changed status, 2 rule flags raised, 2 closed or changed, "
        "2 handover flags of closed shifts raised, 2 drops' bounds repaired; time_inversion "
        "flags judged again: 2 seqs withdrawn, 2 flags closed, 2 raised (across seqs "
        "written off, or at their later event's station)"
    )
