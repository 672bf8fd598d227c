"""Rule 6 for drops (``sync.drop_bounds``): what a PDA's other events bound a drop by,
worked out as one push sees it, and widened push by push."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Flag, FlagStatus, ScanEvent
from sync import drop_bounds
from sync.drop_bounds import (
    REACH,
    Bounds,
    EventTime,
    bound_drops,
    bounds_among,
    drops_after,
    rebound,
)
from tests import factories
from tests.conftest import World
from tests.sync.test_ingest import NOW, Pda, locker_consent, locker_drop

T0 = dt.datetime(2026, 11, 23, 9, 0, tzinfo=dt.UTC)


def brute_force(events: list[EventTime], drop: EventTime) -> Bounds:
    """The definition, event by event."""
    later = [
        e.occurred_at
        for e in events
        if e.seq < drop.seq and drop.occurred_at < e.occurred_at <= drop.occurred_at + REACH
    ]
    earlier = [
        e.occurred_at
        for e in events
        if e.seq > drop.seq and drop.occurred_at - REACH <= e.occurred_at < drop.occurred_at
    ]
    return Bounds(max(later, default=None), min(earlier, default=None))


@given(
    st.dictionaries(
        st.integers(1, 60),
        st.tuples(st.integers(0, 24 * 60), st.booleans()),  # minutes after T0, a drop?
        max_size=40,
    )
)
def test_the_sweeps_find_what_the_definition_says(stream: dict[int, tuple[int, bool]]) -> None:
    """Times on a minute grid a day wide, so that some lie exactly ``REACH`` apart."""
    events = [
        EventTime(seq, T0 + dt.timedelta(minutes=minutes), drop)
        for seq, (minutes, drop) in stream.items()
    ]
    drops = [e for e in events if e.is_drop]
    assert bounds_among(events, drops) == {d.seq: brute_force(events, d) for d in drops}


def test_an_event_exactly_reach_away_bounds_a_drop_and_one_a_moment_further_does_not() -> None:
    drop = EventTime(5, T0, True)
    events = [
        drop,
        EventTime(4, T0 + REACH),
        EventTime(3, T0 + REACH + dt.timedelta(microseconds=1)),
        EventTime(6, T0 - REACH - dt.timedelta(microseconds=1)),
    ]
    assert bounds_among(events, [drop]) == {5: Bounds(T0 + REACH, None)}


def at(minutes: float) -> dt.datetime:
    return NOW - dt.timedelta(hours=3) + dt.timedelta(minutes=minutes)


@pytest.fixture
def pda(session: Session, world: World) -> Pda:
    return Pda(session, world)


def test_only_drops_whose_bounds_move_are_written_and_judged_again(
    session: Session, world: World, pda: Pda
) -> None:
    """A drop at 80 (seq 3); seq 4 at 65 bounds it; seq 5 at 70 bounds it no further;
    seq 6 at 60 does. A push of the device's events in order bounds nothing."""
    tn = factories.parcel(session, world.station).tracking_no
    session.commit()
    pda.push([pda.event(1, tn, occurred_at=at(10)), locker_drop(pda, 3, tn, at(80))])
    device = world.device.id

    def bounds() -> tuple[dt.datetime | None, dt.datetime | None]:
        drop = session.scalars(select(ScanEvent).where(ScanEvent.seq == 3)).one()
        session.refresh(drop)
        return drop.latest_of_earlier_seqs, drop.earliest_of_later_seqs

    assert bound_drops(session, device, -1, [EventTime(4, at(65))], 9) == ({}, {tn})
    assert bounds() == (None, at(65))
    assert bound_drops(session, device, -1, [EventTime(5, at(70))], 9) == ({}, set())
    assert bound_drops(session, device, -1, [EventTime(6, at(60))], 9) == ({}, {tn})
    assert bounds() == (None, at(60))
    assert bound_drops(session, device, -1, [EventTime(2, at(90))], 9) == ({}, {tn})
    assert bounds() == (at(90), at(60))
    assert bound_drops(session, device, -1, [EventTime(7, at(100))], 9) == ({}, set())


def test_a_scan_stamped_a_day_early_bounds_only_the_drops_within_reach_of_its_time(
    session: Session, world: World, pda: Pda
) -> None:
    """Three days of locker drops, each consented to ten minutes before. Then the PDA's
    clock goes back three days for one scan (the next seq): the scan gets
    ``time_inversion``, and the drops of the 12 hours after its stamped time, which it
    dates before their consents, ``consent_after_drop``; the days after are left alone."""
    seq = 1
    by_day: dict[int, list[str]] = {}
    for day in (3, 2, 1):
        start = NOW - dt.timedelta(days=day)
        events = []
        for i in range(3):
            tn = factories.parcel(session, world.station).tracking_no
            by_day.setdefault(day, []).append(tn)
            drop_at = start + dt.timedelta(minutes=30 * (i + 1))
            consent_at = drop_at - dt.timedelta(minutes=10)
            locker_consent(session, world, tn, consent_at, recorded_at=consent_at)
            events.append(pda.event(seq, tn, occurred_at=drop_at - dt.timedelta(minutes=20)))
            events.append(locker_drop(pda, seq + 1, tn, drop_at))
            seq += 2
        session.commit()
        pda.push(events, received_at=start + dt.timedelta(hours=10))
    flagged = select(Flag.subject_key).where(
        Flag.status == FlagStatus.OPEN, Flag.kind == "consent_after_drop"
    )
    assert list(session.scalars(flagged)) == []

    other = factories.parcel(session, world.station).tracking_no
    session.commit()
    pda.push([pda.event(seq, other, occurred_at=NOW - dt.timedelta(days=3, hours=1))])

    assert set(session.scalars(flagged)) == set(by_day[3])
    inverted = session.scalars(select(Flag.subject_key).where(Flag.kind == "time_inversion"))
    assert list(inverted) == [other]
    # worked out again from the events (``rejudge``), the pushes' bounds stand
    drops = drops_after(session, station_id=None, after=("", 0), limit=100)
    assert len(drops) == 9 and rebound(session, drops) == 0


def test_a_push_reads_only_the_stored_events_within_reach_of_its_own(
    session: Session, world: World, pda: Pda, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten days of a PDA's scans, 20 a day. A push of the next scan reads nothing by seq
    (the device holds no higher one); one of today's scan and one stamped nine days
    early (its clock set back) reads the events within reach of each, not the days
    between; a gap filled nine days back reads by seq, within reach too."""
    tn = factories.parcel(session, world.station).tracking_no
    session.commit()
    seq = 1
    for day in range(10, 0, -1):
        start = NOW - dt.timedelta(days=day)
        events = [
            pda.event(seq + i, tn, occurred_at=start + dt.timedelta(minutes=20 * i))
            for i in range(20)
        ]
        pda.push(events, received_at=start + dt.timedelta(hours=8))
        seq += 20 + (1 if day == 9 else 0)  # seq 41 is left for later: a gap
    read: dict[str, list[int]] = {"by time": [], "by seq": []}
    for name, prebuilt in (
        ("by time", drop_bounds.DATED_AFTER),
        ("by seq", drop_bounds.RECORDED_AFTER),
    ):
        original = prebuilt.execute

        def counting(s: Session, params: Any, original: Any = original, name: str = name) -> Any:
            rows = original(s, params)
            read[name].append(len(rows))
            return rows

        monkeypatch.setattr(prebuilt, "execute", counting)

    pda.push([pda.event(seq, tn, occurred_at=NOW - dt.timedelta(minutes=5))])
    assert read == {"by time": [0], "by seq": []}

    read = {"by time": [], "by seq": []}
    nine_days_early = NOW - dt.timedelta(days=9, hours=2)
    pda.push(
        [
            pda.event(seq + 1, tn, occurred_at=NOW - dt.timedelta(minutes=4)),
            pda.event(seq + 2, tn, occurred_at=nine_days_early),
        ]
    )
    assert len(read["by time"]) == 2 and sum(read["by time"]) <= 2 * 20, read
    assert read["by seq"] == []

    read = {"by time": [], "by seq": []}
    pda.push([pda.event(41, tn, occurred_at=NOW - dt.timedelta(days=9, hours=-7))])
    assert read["by time"] and read["by seq"], read
    assert sum(read["by time"]) + sum(read["by seq"]) <= 2 * 20, read
