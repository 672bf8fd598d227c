"""Second reader's tests for ff252eb (flag decisions): what the re-judged rule flags
announce through the outbox when the system changes their status."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Flag, FlagStatus, OutboxMessage, WebhookSubscription
from sync.events import EventRules
from sync.flags import acknowledge_flag
from sync.ingest import IngestRules, PushBatch, Pusher, ingest
from sync.outbox import TOPICS
from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy
from tests import factories
from tests.conftest import World

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
RULES = IngestRules(
    events=EventRules(tracking=TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS))
)


class OnePda:
    """A PDA of its own (as in test_flag_decisions, which the parent commit lacks)."""

    def __init__(self, session: Session, world: World, courier_id: int | None = None) -> None:
        device = factories.device(session, f"PDA-{uuid.uuid4().hex[:12]}", world.station)
        self.session = session
        self.pusher = Pusher(device.id, world.station.id, courier_id or world.courier.id)

    def event(self, seq: int, tracking_no: str, kind: str, **fields: Any) -> dict[str, Any]:
        fields.setdefault("occurred_at", NOW - dt.timedelta(hours=3, minutes=-seq))
        return factories.event(seq, tracking_no, kind, **fields)

    def push(self, events: list[dict[str, Any]], received_at: dt.datetime) -> None:
        ingest(
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


def test_an_acknowledged_flag_back_from_closed_is_announced(
    session: Session, world: World
) -> None:
    """Acknowledged, closed by a late check-out (``flag.closed`` announced), back on the
    very delivery the manager acknowledged when the check-out is voided: the flag is
    active again. Before ff252eb it came back open and ``flag.raised`` said so; now it
    comes back acknowledged and nothing is announced, so a station system that heard
    ``flag.closed`` keeps believing it is over."""
    subscribe(session)
    pda = OnePda(session, world)
    tracking_no = factories.parcel(session, world.station).tracking_no
    session.commit()
    pda.push([pda.event(2, tracking_no, "delivered")], NOW)
    flag = the_flag(session, tracking_no, "delivered_not_checked_out")
    acknowledge_flag(session=session, flag=flag, user_id=world.manager.id)
    session.commit()
    checkout = pda.event(1, tracking_no, "checked_out")
    pda.push([checkout], NOW + dt.timedelta(minutes=1))
    session.refresh(flag)
    assert flag.status == FlagStatus.CLOSED
    undo = pda.event(
        3, tracking_no, "correction", voids_client_event_id=checkout["client_event_id"], reason="x"
    )
    pda.push([undo], NOW + dt.timedelta(minutes=2))
    session.refresh(flag)
    assert flag.status == FlagStatus.ACKNOWLEDGED  # active again
    topics = [topic for topic, _ in announced(session, flag)]
    assert topics[:2] == ["flag.raised", "flag.closed"]
    assert topics[-1] != "flag.closed", topics  # the last word subscribers heard


def test_a_rule_flag_raised_again_is_announced_with_the_courier_it_now_concerns(
    session: Session, world: World
) -> None:
    """A delivery without proof by courier 1 is voided (the flag closes); courier 2,
    who checks the parcel out next, delivers it without proof too: the flag is raised
    again and now concerns courier 2. Before ff252eb ``raise_flag`` set the courier
    before announcing; now ``rejudge`` announces first and ``apply_rule_flags`` sets
    the courier after, so ``flag.raised`` names courier 1."""
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


@pytest.mark.postgres_only
def test_a_resolution_committed_while_a_push_judges_the_flag_leaves_it_as_judged(
    committed_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL, two connections. A push brings a second delivery for a parcel whose
    ``delivered_not_checked_out`` flag is open on the first; it reads the flag (no
    lock) before a manager's resolution of it commits, then writes the new evidence
    over it. The flag must end as ``judged_status`` says of what it holds (open: the
    second delivery is beyond what the manager decided on); it ends resolved, to open
    at the next push that touches the parcel however little it changes."""
    from sqlalchemy.orm import sessionmaker

    import sync.status
    from courier_api.extensions import db
    from sync.flags import judged_status, resolve_flag

    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    with sessions() as setup:
        station = factories.station(setup, code="RACE")
        courier = factories.user(setup, "racer", "courier", station)
        manager = factories.user(setup, "boss", "station_manager", station)
        device = factories.device(setup, "PDA-RACE", station)
        tracking_no = factories.parcel(setup, station).tracking_no
        setup.commit()
        pusher = Pusher(device.id, station.id, courier.id)
        manager_id = manager.id

    def push(session: Session, events: list[dict[str, Any]], at: dt.datetime) -> None:
        ingest(
            session=session,
            batch=PushBatch(device_id=device.id, batch_id=uuid.uuid4(), sent_at=at, events=events),
            pusher=pusher,
            rules=RULES,
            received_at=at,
        )
        session.commit()

    def event(seq: int, kind: str) -> dict[str, Any]:
        return factories.event(
            seq, tracking_no, kind, occurred_at=NOW - dt.timedelta(hours=3, minutes=-seq)
        )

    with sessions() as first:
        push(first, [event(2, "delivered")], NOW)
        flag_id = the_flag(first, tracking_no, "delivered_not_checked_out").id

    real_rejudge = sync.status.rejudge
    manager_done = threading.Event()
    failures: list[BaseException] = []

    def resolve() -> None:
        try:
            with sessions() as managing:  # another connection
                resolve_flag(
                    session=managing,
                    flag=managing.get(Flag, flag_id),
                    user_id=manager_id,
                    note="seen",
                )
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
        return real_rejudge(session=session, flag=flag, **kwargs)

    monkeypatch.setattr(sync.status, "rejudge", rejudge_after_the_manager)
    with sessions() as second:
        push(second, [event(3, "delivered")], NOW + dt.timedelta(minutes=1))
    monkeypatch.setattr(sync.status, "rejudge", real_rejudge)
    manager.join(timeout=30)
    assert failures == []
    with sessions() as check:
        flag = check.get(Flag, flag_id)
        assert flag is not None
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
    from types import SimpleNamespace

    from sqlalchemy.orm import sessionmaker

    import sync.balances
    from courier_api.extensions import db
    from sync.flags import judged_status, resolve_flag
    from tests.sync.test_shifts import Pda

    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
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
    with sessions() as first:
        pda = Pda(first, world)  # type: ignore[arg-type]
        shift = pda.open(first_seq=1)
        pda.push([pda.event(tracking_no)])
        shift = pda.close(shift, last_seq=5)
        (flag_id,) = first.scalars(select(Flag.id).where(Flag.shift_id == shift.id))

    real_rejudge = sync.balances.rejudge
    manager_done = threading.Event()
    failures: list[BaseException] = []

    def resolve() -> None:
        try:
            with sessions() as managing:
                resolve_flag(
                    session=managing,
                    flag=managing.get(Flag, flag_id),
                    user_id=manager_id,
                    note="x",
                )
                managing.commit()
        except BaseException as error:
            failures.append(error)
        finally:
            manager_done.set()

    manager = threading.Thread(target=resolve)

    def rejudge_after_the_manager(*, session: Session, flag: Flag, **kwargs: Any) -> bool:
        if flag.id == flag_id and not manager.is_alive() and not manager_done.is_set():
            manager.start()
            manager_done.wait(2)  # done, unless the push holds the flag's row
        return real_rejudge(session=session, flag=flag, **kwargs)

    monkeypatch.setattr(sync.balances, "rejudge", rejudge_after_the_manager)
    with sessions() as second:
        pda.session = second
        pda.push([pda.event(tracking_no, "out_for_delivery")])
    monkeypatch.setattr(sync.balances, "rejudge", real_rejudge)
    manager.join(timeout=30)
    assert failures == []
    with sessions() as check:
        flag = check.get(Flag, flag_id)
        assert flag is not None and flag.decision == FlagStatus.RESOLVED
        assert len(flag.evidence["event_ids"]) == 2
        assert flag.status == judged_status(flag.decision, flag.decided_on, flag.evidence)
