"""A manager's decision on a rule flag, and the events that arrive after it (rule 3).

A parcel's rule flags are judged again whenever its events change; a manager's
acknowledgement or resolution covers the events they saw. Whatever the batching of
the events that come after it, the flags end in the same status.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models import Flag, FlagStatus, OutboxMessage, ScanEvent, WebhookSubscription
from sync.events import EventRules
from sync.flags import (
    REPEATED_SCANS,
    acknowledge_flag,
    covers,
    evidence_version,
    flag_changes,
    judged_status,
    resolve_flag,
)
from sync.ingest import IngestRules, PushBatch, Pusher, ingest
from sync.outbox import TOPICS
from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy
from tests import factories
from tests.batchings import draw_batchings
from tests.conftest import World

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
RULES = IngestRules(
    events=EventRules(tracking=TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS))
)
# What may come after the manager's decision: the check-out the delivery lacked (seq 1,
# sent late), and scans after the delivery, some of them outcomes of their own.
LATER = (
    "checked_out",
    "out_for_delivery",
    "delivered",
    "delivered_to_locker",
    "returned_to_station",
)


class OnePda:
    """A PDA of its own for each run of an example: its seqs start at 1. Signed in as
    the world's courier, or as ``courier_id``."""

    def __init__(self, session: Session, world: Any, courier_id: int | None = None) -> None:
        device = factories.device(session, f"PDA-{uuid.uuid4().hex[:12]}", world.station)
        self.session = session
        self.pusher = Pusher(device.id, world.station.id, courier_id or world.courier.id)

    def event(self, seq: int, tracking_no: str, kind: str, **fields: Any) -> dict[str, Any]:
        fields.setdefault("occurred_at", NOW - dt.timedelta(hours=3, minutes=-seq))
        if kind == "delivered_to_locker":
            fields.update(locker_id="L-1", compartment="7")
        return factories.event(seq, tracking_no, kind, **fields)

    def push(self, events: list[dict[str, Any]], received_at: dt.datetime) -> dict[str, Any]:
        receipt = ingest(
            session=self.session,
            batch=PushBatch(
                device_id=self.pusher.device_id,
                batch_id=uuid.uuid4(),
                sent_at=received_at,
                events=events,
            ),
            pusher=self.pusher,
            rules=RULES,
            received_at=received_at,
        )
        self.session.commit()
        return receipt


def rule_flags(session: Session, tracking_no: str) -> dict[str, FlagStatus]:
    """The parcel's flags not closed: one raised and closed on the way (an outcome in
    one push, voided in the next) is as good as never raised."""
    return {
        flag.kind: flag.status
        for flag in session.scalars(
            select(Flag).where(
                Flag.subject_type == "parcel",
                Flag.subject_key == tracking_no,
                Flag.status != FlagStatus.CLOSED,
            )
        )
    }


OPEN, ACK, RESOLVED = FlagStatus.OPEN, FlagStatus.ACKNOWLEDGED, FlagStatus.RESOLVED


def test_a_decision_stands_while_the_cause_is_only_on_what_the_manager_saw() -> None:
    seen = {"event_ids": [1, 2]}
    assert judged_status(RESOLVED, seen, {"event_ids": [2]}) == RESOLVED
    assert judged_status(RESOLVED, seen, {"event_ids": [1, 2]}) == RESOLVED
    assert judged_status(ACK, seen, {"event_ids": [1, 2]}) == ACK
    assert judged_status(RESOLVED, seen, {"event_ids": [2, 3]}) == OPEN
    assert judged_status(ACK, seen, {"event_ids": [3]}) == OPEN
    assert judged_status(None, None, {"event_ids": [1]}) == OPEN


def test_a_repeated_scan_of_an_outcome_the_manager_saw_is_nothing_new() -> None:
    def repeating(*pairs: tuple[int, int]) -> dict[str, Any]:
        ids = sorted({i for pair in pairs for i in pair})
        return {
            "event_ids": ids,
            REPEATED_SCANS: [{"event_id": r, "first_event_id": f} for r, f in pairs],
        }

    assert judged_status(RESOLVED, {"event_ids": [1]}, repeating((2, 1))) == RESOLVED
    assert evidence_version(repeating((2, 1))) == evidence_version({"event_ids": [1]})
    # Decided on scan 2 when it was the first: scan 1, an earlier one, is news.
    assert judged_status(RESOLVED, {"event_ids": [2]}, repeating((2, 1))) == OPEN
    # A repeat of a scan the evidence does not cite (another station's) is its own.
    assert not covers({"event_ids": [1]}, {"event_ids": [1, 3], REPEATED_SCANS: [
        {"event_id": 3, "first_event_id": 2}
    ]})  # fmt: skip


def test_a_missing_image_the_manager_did_not_see_is_new_too() -> None:
    seen = {"event_ids": [1], "blobs": ["a"]}
    assert covers(seen, {"event_ids": [1], "blobs": ["a"]})
    assert not covers(seen, {"event_ids": [1], "blobs": ["b"]})
    # Decided on before the evidence named its deliveries: compared on its images.
    assert covers({"blobs": ["a"]}, {"event_ids": [1], "blobs": ["a"]})
    assert not covers(None, {"event_ids": []})


def delivered_without_a_check_out(session: Session, world: World) -> tuple[OnePda, str, Flag]:
    """A parcel delivered (seq 2) by a PDA of its own with no check-out: the PDA, the
    tracking number and its ``delivered_not_checked_out`` flag, open."""
    pda = OnePda(session, world)
    tracking_no = factories.parcel(session, world.station).tracking_no
    session.commit()
    pda.push([pda.event(2, tracking_no, "delivered")], NOW)
    return pda, tracking_no, the_flag(session, tracking_no, "delivered_not_checked_out")


def test_an_acknowledged_flag_opens_on_new_events_and_is_acknowledged_again_when_they_go(
    session: Session, world: World
) -> None:
    """The manager acknowledged a delivery with no check-out. A second delivery, which
    they never saw (at a locker: another outcome, not the same scanned again), joins
    the evidence: the flag is back in the open queue. Voided by a correction, it
    leaves: acknowledged again, as if it had never come; the history says why each
    time."""
    pda, tracking_no, flag = delivered_without_a_check_out(session, world)
    acknowledge_flag(session=session, flag=flag, user_id=world.manager.id)
    session.commit()
    again = pda.event(3, tracking_no, "delivered_to_locker")
    pda.push([again], NOW + dt.timedelta(minutes=1))
    session.refresh(flag)
    assert flag.status == OPEN
    undo = pda.event(
        4, tracking_no, "correction", voids_client_event_id=again["client_event_id"], reason="x"
    )
    pda.push([undo], NOW + dt.timedelta(minutes=2))
    session.refresh(flag)
    assert flag.status == ACK
    notes = [c.note for c in flag_changes(session=session, flag=flag)][-2:]
    assert notes == [
        "the rule fails again on new events",
        "the rule fails again on the events a manager acknowledged it on",
    ]


def test_a_manager_resolving_a_flag_opened_on_new_events_settles_those_too(
    session: Session, world: World
) -> None:
    """Resolved, opened on a second delivery (at a locker: another outcome), resolved
    again by the manager: their new decision covers the second delivery, and a third
    (in person again) opens it once more."""
    pda, tracking_no, flag = delivered_without_a_check_out(session, world)
    resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="seen")
    session.commit()
    pda.push([pda.event(3, tracking_no, "delivered_to_locker")], NOW + dt.timedelta(minutes=1))
    session.refresh(flag)
    assert flag.status == OPEN
    resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="both seen")
    session.commit()
    assert flag.decided_on == {"event_ids": flag.evidence["event_ids"]}
    assert len(flag.decided_on["event_ids"]) == 2
    pda.push([pda.event(4, tracking_no, "out_for_delivery")], NOW + dt.timedelta(minutes=2))
    session.refresh(flag)
    assert flag.status == RESOLVED  # a scan that is no delivery: the cause is unchanged
    pda.push([pda.event(5, tracking_no, "delivered")], NOW + dt.timedelta(minutes=3))
    session.refresh(flag)
    assert flag.status == OPEN


def test_a_scan_repeating_the_outcome_after_the_decision_leaves_it_standing(
    session: Session, world: World
) -> None:
    """The scanner beeped again after the manager decided on the delivery's flags: the
    same outcome, which they judged. Each flag stays as they left it, citing the repeat
    as one, and its ``evidence_version`` is the one they read: a decision sent with it
    is not refused as made on changed evidence."""
    pda, tracking_no, flag = delivered_without_a_check_out(session, world)
    flags = session.scalars(select(Flag).where(Flag.subject_key == tracking_no)).all()
    others = [f for f in flags if f.id != flag.id]
    assert others  # delivered_without_pod too: the express parcel has no proof
    for other in others:
        resolve_flag(session=session, flag=other, user_id=world.manager.id, note="seen")
    session.commit()
    read = evidence_version(flag.evidence)
    again = pda.event(3, tracking_no, "delivered")
    pda.push([again], NOW + dt.timedelta(minutes=1))
    for other in others:
        session.refresh(other)
        assert other.status == RESOLVED
    session.refresh(flag)
    first_id, again_id = session.scalars(
        select(ScanEvent.id).where(ScanEvent.tracking_no == tracking_no).order_by(ScanEvent.seq)
    ).all()
    assert flag.evidence["event_ids"] == [first_id, again_id]
    assert flag.evidence[REPEATED_SCANS] == [{"event_id": again_id, "first_event_id": first_id}]
    acknowledge_flag(session=session, flag=flag, user_id=world.manager.id, seen_version=read)
    assert flag.status == ACK


@settings(  # as many examples as the profile says (100; 300 in CI's SQLite pass)
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_a_parcels_rule_flags_end_the_same_however_the_later_events_are_batched(
    session: Session, world: World, data: st.DataObject
) -> None:
    """An express parcel delivered (seq 2) with no check-out and no proof raises rule
    flags; the manager acknowledges or resolves each. Then the same later events (the
    check-out, further scans and outcomes, corrections voiding some of them) pushed
    in one batch, or shuffled, repeated and split into several: every flag of the
    parcel ends in the same status."""
    decision = data.draw(st.sampled_from(["acknowledge", "resolve"]), label="decision")
    kinds = data.draw(st.lists(st.sampled_from(LATER), min_size=1, max_size=3), label="later")
    voided = data.draw(
        st.lists(st.booleans(), min_size=len(kinds), max_size=len(kinds)), label="voided"
    )

    def run(batches: list[list[int]]) -> dict[str, FlagStatus]:
        pda = OnePda(session, world)
        tracking_no = factories.parcel(session, world.station).tracking_no
        session.commit()
        delivered = pda.event(2, tracking_no, "delivered")
        pda.push([delivered], NOW)
        flags = session.scalars(select(Flag).where(Flag.subject_key == tracking_no)).all()
        assert flags
        for flag in flags:
            if decision == "resolve":
                resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="seen")
            else:
                acknowledge_flag(session=session, flag=flag, user_id=world.manager.id)
        session.commit()
        # The first check-out is the one the delivery lacked (seq 1); seqs stay unique.
        first = kinds.index("checked_out") if "checked_out" in kinds else -1
        later = [
            pda.event(1 if i == first else 3 + i, tracking_no, kind)
            for i, kind in enumerate(kinds)
        ]
        seq = 3 + len(kinds)
        for target, void in zip(list(later), voided, strict=True):
            if void:
                later.append(
                    pda.event(
                        seq,
                        tracking_no,
                        "correction",
                        voids_client_event_id=target["client_event_id"],
                        reason="mis-tap",
                    )
                )
                seq += 1
        for k, batch in enumerate(batches):
            pda.push([later[i] for i in batch], NOW + dt.timedelta(minutes=1 + k))
        return rule_flags(session, tracking_no)

    n = len(kinds) + sum(voided)
    assert run(draw_batchings(data, n)) == run([list(range(n))])


def subscribe(session: Session) -> None:
    session.add(
        WebhookSubscription(
            url="http://127.0.0.1:9/hook", topics=list(TOPICS), station_id=None, secret="s" * 43
        )
    )
    session.commit()


def announced(session: Session, flag: Flag) -> list[tuple[str, dict[str, Any]]]:
    """The flag's announcements, oldest first: (topic, payload)."""
    return [
        (m.topic, m.payload)
        for m in session.scalars(select(OutboxMessage).order_by(OutboxMessage.created_at))
        if m.topic.startswith("flag.") and m.payload.get("flag_id") == flag.id
    ]


def the_flag(session: Session, tracking_no: str, kind: str) -> Flag:
    return session.scalars(
        select(Flag).where(Flag.subject_key == tracking_no, Flag.kind == kind)
    ).one()


def test_an_acknowledged_flag_back_from_closed_is_announced_as_raised(
    session: Session, world: World
) -> None:
    """Acknowledged, closed by a late check-out (``flag.closed`` announced), back on the
    very delivery the manager acknowledged when the check-out is voided: the flag is
    active again, acknowledged: ``flag.raised`` says so, or a station system that heard
    ``flag.closed`` would believe it is over; and the push's receipt counts it raised."""
    subscribe(session)
    pda, tracking_no, flag = delivered_without_a_check_out(session, world)
    acknowledge_flag(session=session, flag=flag, user_id=world.manager.id)
    session.commit()
    checkout = pda.event(1, tracking_no, "checked_out")
    pda.push([checkout], NOW + dt.timedelta(minutes=1))
    session.refresh(flag)
    assert flag.status == FlagStatus.CLOSED
    undo = pda.event(
        3, tracking_no, "correction", voids_client_event_id=checkout["client_event_id"], reason="x"
    )
    receipt = pda.push([undo], NOW + dt.timedelta(minutes=2))
    session.refresh(flag)
    assert flag.status == FlagStatus.ACKNOWLEDGED  # active again
    assert flag.id in [raised["flag_id"] for raised in receipt["flags_raised"]]
    topics = [topic for topic, _ in announced(session, flag)]
    assert topics[:2] == ["flag.raised", "flag.closed"]
    assert topics[-1] != "flag.closed", topics  # the last word subscribers heard


def test_a_rule_flag_raised_again_is_announced_with_the_courier_it_now_concerns(
    session: Session, world: World
) -> None:
    """A delivery without proof by courier 1 is voided (the flag closes); courier 2,
    who checks the parcel out next, delivers it without proof too: the flag is raised
    again and now concerns courier 2, whom ``flag.raised`` names."""
    subscribe(session)
    first = OnePda(session, world)
    tracking_no = factories.parcel(session, world.station).tracking_no
    courier2 = factories.user(session, "courier2", "courier", world.station)
    session.commit()
    second = OnePda(session, world, courier2.id)
    delivered = first.event(2, tracking_no, "delivered")
    first.push([first.event(1, tracking_no, "checked_out"), delivered], NOW)
    flag = the_flag(session, tracking_no, "delivered_without_pod")
    assert flag.courier_id == world.courier.id
    undo = first.event(
        3,
        tracking_no,
        "correction",
        voids_client_event_id=delivered["client_event_id"],
        reason="x",
    )
    first.push([undo], NOW + dt.timedelta(minutes=1))
    session.refresh(flag)
    assert flag.status == FlagStatus.CLOSED
    later = NOW + dt.timedelta(minutes=30)
    second.push(
        [
            second.event(1, tracking_no, "checked_out", occurred_at=later),
            second.event(2, tracking_no, "delivered", occurred_at=later + dt.timedelta(minutes=1)),
        ],
        NOW + dt.timedelta(hours=1),
    )
    session.refresh(flag)
    assert flag.status == FlagStatus.OPEN
    assert flag.courier_id == courier2.id
    topic, payload = announced(session, flag)[-1]
    assert topic == "flag.raised"
    assert payload["courier_id"] == courier2.id


def resolved_while_a_push_judges(
    monkeypatch: pytest.MonkeyPatch,
    sessions: sessionmaker[Session],
    judging: ModuleType,
    flag_id: int,
    manager_id: int,
    push: Callable[[Session], None],
) -> Flag:
    """``push`` in a session of its own; the moment it judges the flag again
    (``judging.rejudge``), a manager resolves the flag on another connection, waiting
    up to 2 s for it (the push may hold the flag's row). The flag, once both are done."""
    real_rejudge = judging.rejudge
    manager_done = threading.Event()
    failures: list[BaseException] = []

    def resolve() -> None:
        try:
            with sessions() as managing:
                flag = managing.get(Flag, flag_id)
                assert flag is not None
                resolve_flag(session=managing, flag=flag, user_id=manager_id, note="seen")
                managing.commit()
        except BaseException as error:  # seen by the test, not lost in the thread
            failures.append(error)
        finally:
            manager_done.set()

    manager = threading.Thread(target=resolve)

    def rejudge_after_the_manager(*, session: Session, flag: Flag, **kwargs: Any) -> bool:
        if flag.id == flag_id and not manager.is_alive() and not manager_done.is_set():
            manager.start()
            manager_done.wait(2)  # done, unless the push holds the flag's row
        return bool(real_rejudge(session=session, flag=flag, **kwargs))

    monkeypatch.setattr(judging, "rejudge", rejudge_after_the_manager)
    try:
        with sessions() as pushing:
            push(pushing)
    finally:
        monkeypatch.setattr(judging, "rejudge", real_rejudge)
    manager.join(timeout=30)
    assert failures == []
    with sessions() as check:
        flag = check.get(Flag, flag_id)
        assert flag is not None
        return flag


def race_world(sessions: sessionmaker[Session]) -> tuple[SimpleNamespace, int, str]:
    """A station of its own, committed: its courier and PDA, a manager's id, a parcel."""
    with sessions() as setup:
        station = factories.station(setup, code="RACE")
        world = SimpleNamespace(
            station=station,
            courier=factories.user(setup, "racer", "courier", station),
            device=factories.device(setup, "PDA-RACE", station),
        )
        manager_id = factories.user(setup, "boss", "station_manager", station).id
        tracking_no = factories.parcel(setup, station).tracking_no
        setup.commit()
    return world, manager_id, tracking_no


@pytest.mark.postgres_only
def test_a_resolution_committed_while_a_push_judges_the_flag_leaves_it_as_judged(
    committed_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL, two connections. A push brings a second delivery for a parcel whose
    ``delivered_not_checked_out`` flag is open on the first, while a manager resolves
    the flag. The push locks the flag it judges: the resolution waits for it and
    covers both deliveries, rather than being written over (resolved, on evidence
    ``judged_status`` would call open)."""
    import sync.status
    from courier_api.extensions import db

    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    world, manager_id, tracking_no = race_world(sessions)
    with sessions() as first:
        pda = OnePda(first, world)
        first.commit()
        pda.push([pda.event(2, tracking_no, "delivered")], NOW)
        flag_id = the_flag(first, tracking_no, "delivered_not_checked_out").id

    def push(session: Session) -> None:
        pda.session = session
        pda.push([pda.event(3, tracking_no, "delivered")], NOW + dt.timedelta(minutes=1))

    flag = resolved_while_a_push_judges(
        monkeypatch, sessions, sync.status, flag_id, manager_id, push
    )
    assert flag.decision == FlagStatus.RESOLVED
    assert len(flag.evidence["event_ids"]) == 2
    assert flag.status == judged_status(flag.decision, flag.decided_on, flag.evidence)


@pytest.mark.postgres_only
def test_a_resolution_committed_while_a_late_push_judges_a_handover_flag_leaves_it_as_judged(
    committed_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same race for a shift's own flag: a late scan of a parcel missing at the
    handover, pushed while the manager resolves the missing flag on the check-out
    alone. The flag must end as ``judged_status`` says of what it holds."""
    import sync.balances
    from courier_api.extensions import db
    from tests.sync.test_shifts import Pda

    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    world, manager_id, tracking_no = race_world(sessions)
    with sessions() as first:
        pda = Pda(first, world)  # type: ignore[arg-type]
        shift = pda.open(first_seq=1)
        pda.push([pda.event(tracking_no)])
        shift = pda.close(shift, last_seq=5)
        (flag_id,) = first.scalars(select(Flag.id).where(Flag.shift_id == shift.id))

    def push(session: Session) -> None:
        pda.session = session
        pda.push([pda.event(tracking_no, "out_for_delivery")])

    flag = resolved_while_a_push_judges(
        monkeypatch, sessions, sync.balances, flag_id, manager_id, push
    )
    assert flag.decision == FlagStatus.RESOLVED
    assert len(flag.evidence["event_ids"]) == 2
    assert flag.status == judged_status(flag.decision, flag.decided_on, flag.evidence)
