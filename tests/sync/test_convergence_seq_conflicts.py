"""Rule 3 for README's recovery from a PDA that numbered its events from 1 again.

The PDA's morning is held (pushed in any split). Then it reboots and its app numbers
from 1 again: its next events take seqs the server holds, those above them seqs it
never got. The PDA pushes them in any split and order, sometimes loses an answer
(the push committed) and retries the batch, in another order, before anything newer,
and sends again events already held or old copies of events it set apart. It follows
README's **Read the results before you prune**: it sets apart each event refused
``seq_conflict``, signs in again and, when it likes, gives those new seqs after the
higher of the sign-in's ``device_max_seq`` and the highest seq it has given, and
pushes them too; an old copy refused again it drops (the event is held under its new
seq). However the day went, the server ends holding every event of the PDA once, each
with its content, every ``seq_conflict`` rejection settled (its ``resent_seq``), no
``seq_conflict`` flag still open for the manager, none ``conflicting_duplicate``, and
the PDA acknowledged through its last seq with nothing missing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import DeviceSyncState, Flag, FlagStatus, QuarantinedEvent, ScanEvent
from sync.device_state import held_max_seq
from sync.events import EventRules
from sync.flags import ACTIVE_STATUSES
from sync.ingest import IngestRules, PushBatch, Pusher, ingest
from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy
from tests import factories
from tests.batchings import draw_batchings
from tests.conftest import World

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
RULES = IngestRules(
    events=EventRules(tracking=TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS))
)
TYPES = ["checked_out", "out_for_delivery"]
MAX_STEPS = 8  # pushes drawn after the reboot; the rest of the queue goes after them


@dataclasses.dataclass
class Pda:
    """A PDA following README's contract after its app numbered from 1 again."""

    session: Session
    pusher: Pusher
    queue: list[dict[str, Any]]  # events not yet answered applied or duplicate
    highest_given: int
    held: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # by id
    set_apart: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    old_copies: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    resequenced: set[str] = dataclasses.field(default_factory=set)  # ids given a new seq
    unanswered: tuple[uuid.UUID, list[dict[str, Any]]] | None = None
    pushes: int = 0

    def push(self, events: list[dict[str, Any]], batch_id: uuid.UUID | None = None) -> Any:
        self.pushes += 1
        received_at = NOW + dt.timedelta(minutes=self.pushes)
        receipt = ingest(
            session=self.session,
            batch=PushBatch(
                device_id=self.pusher.device_id,
                batch_id=batch_id or uuid.uuid4(),
                sent_at=received_at,
                events=events,
            ),
            pusher=self.pusher,
            rules=RULES,
            received_at=received_at,
        )
        self.session.commit()
        return receipt

    def send(self, events: list[dict[str, Any]], *, answer_lost: bool) -> None:
        batch_id = uuid.uuid4()
        receipt = self.push(events, batch_id)
        if answer_lost:  # committed, the answer lost on the way: retried before anything
            self.unanswered = (batch_id, events)
        else:
            self.read(events, receipt)

    def retry(self, data: st.DataObject) -> None:
        assert self.unanswered is not None
        batch_id, events = self.unanswered
        again = data.draw(st.permutations(events), label="retry in the order")
        self.unanswered = None
        self.read(list(again), self.push(list(again), batch_id))

    def read(self, events: list[dict[str, Any]], receipt: dict[str, Any]) -> None:
        """README's **Read the results before you prune**: set apart each event refused
        ``seq_conflict`` (an old copy of one given a new seq already is dropped); the
        PDA deletes an event only once the server answered it held."""
        assert len(receipt["results"]) == len(events)
        for event, result in zip(events, receipt["results"], strict=True):
            assert result["client_event_id"] == event["client_event_id"]
            key = (event["client_event_id"], event["seq"])
            queued = [e for e in self.queue if (e["client_event_id"], e["seq"]) == key]
            if result["status"] in ("applied", "duplicate"):
                self.held[event["client_event_id"]] = event
                self.queue = [e for e in self.queue if e not in queued]
                continue
            assert result["status"] == "rejected", result
            assert result["error"]["code"] == "seq_conflict", result
            self.queue = [e for e in self.queue if e not in queued]
            if event["client_event_id"] in self.resequenced or event in self.set_apart:
                continue  # an old copy, or set apart already: the PDA drops it
            self.set_apart.append(event)

    def recover(self) -> None:
        """Step 4: sign in again, new seqs after the higher of ``device_max_seq`` and the
        highest seq given, in their order; keep the old copies (a queue rebuilt later)."""
        after = max(held_max_seq(self.session, self.pusher.device_id), self.highest_given)
        for offset, event in enumerate(sorted(self.set_apart, key=lambda e: e["seq"]), 1):
            self.old_copies.append(event)
            self.resequenced.add(event["client_event_id"])
            self.queue.append({**event, "seq": after + offset})
        self.highest_given = after + len(self.set_apart)
        self.set_apart = []

    def done(self) -> bool:
        return not (self.queue or self.set_apart or self.unanswered)


def day(tracking_no: str, morning: int, after_reboot: int) -> tuple[list[Any], list[Any]]:
    """The morning's events, seqs 1..``morning``, then those numbered from 1 again."""
    start = NOW - dt.timedelta(hours=6)

    def event(seq: int, minute: int) -> dict[str, Any]:
        return factories.event(
            seq,
            tracking_no,
            TYPES[minute % 2],
            occurred_at=start + dt.timedelta(minutes=minute),
        )

    before = [event(seq, seq) for seq in range(1, morning + 1)]
    after = [event(seq, 100 + seq) for seq in range(1, after_reboot + 1)]
    return before, after


@settings(
    max_examples=min(60, settings.default.max_examples),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    morning=st.integers(1, 4),
    after_reboot=st.integers(1, 6),
    data=st.data(),
)
def test_a_pda_numbering_from_1_again_converges_by_readmes_recovery_whatever_the_split(
    session: Session, world: World, morning: int, after_reboot: int, data: st.DataObject
) -> None:
    device = factories.device(session, f"PDA-{uuid.uuid4().hex[:12]}", world.station)
    parcel = factories.parcel(session, world.station)
    session.commit()
    pusher = Pusher(device.id, world.station.id, world.courier.id)
    before, after = day(parcel.tracking_no, morning, after_reboot)
    pda = Pda(session, pusher, queue=list(before), highest_given=morning)
    for batch in draw_batchings(data, morning):
        pda.send([before[i] for i in batch], answer_lost=False)
    assert pda.done(), pda.queue
    # The reboot: numbered from 1 again, the PDA sends what it records next.
    pda.queue, pda.highest_given = list(after), after_reboot
    for _ in range(data.draw(st.integers(0, MAX_STEPS), label="pushes drawn")):
        if pda.unanswered is not None:
            pda.retry(data)
        elif pda.set_apart and data.draw(st.booleans(), label="recover now"):
            pda.recover()
        elif pda.queue:
            sent = data.draw(
                st.lists(st.sampled_from(pda.queue), min_size=1, unique_by=lambda e: id(e)),
                label="sent",
            )
            extra = list(pda.held.values()) + pda.old_copies
            if extra:
                sent += data.draw(st.lists(st.sampled_from(extra), max_size=2), label="again")
            sent = list(data.draw(st.permutations(sent), label="in the order"))
            pda.send(sent, answer_lost=data.draw(st.booleans(), label="answer lost"))
    # The rest of the queue, in one push each time, until nothing is left on the PDA.
    for _ in range(2 * (morning + after_reboot) + 2):
        if pda.done():
            break
        if pda.unanswered is not None:
            pda.retry(data)
        elif pda.queue:
            pda.send(list(pda.queue), answer_lost=False)
        else:
            pda.recover()
    assert pda.done(), (pda.queue, pda.set_apart)
    note(f"{pda.pushes} pushes, {len(pda.resequenced)} events given new seqs")
    converged(session, device.id, [*before, *after])


def converged(session: Session, device_id: str, recorded: list[dict[str, Any]]) -> None:
    """Every event held once with its content (its seq aside), every seq_conflict
    settled and its flag closed, no conflicting_duplicate, nothing missing."""

    def content(event: dict[str, Any]) -> tuple[str, str, dt.datetime]:
        when = dt.datetime.fromisoformat(event["occurred_at"])
        return event["type"], event["tracking_no"], when

    stored = session.execute(
        select(
            ScanEvent.client_event_id,
            ScanEvent.type,
            ScanEvent.tracking_no,
            ScanEvent.occurred_at_device,
        ).where(ScanEvent.device_id == device_id)
    ).all()
    assert sorted((str(row[0]), (str(row[1]), row[2], row[3])) for row in stored) == sorted(
        (e["client_event_id"], content(e)) for e in recorded
    )
    rejections = session.execute(
        select(QuarantinedEvent.error_code, QuarantinedEvent.resent_seq).where(
            QuarantinedEvent.device_id == device_id
        )
    ).all()
    assert rejections, "the reboot's first event refused seq_conflict"
    assert all(code == "seq_conflict" and resent for code, resent in rejections), rejections
    flags = session.execute(
        select(Flag.kind, Flag.status).where(
            Flag.kind.in_(["seq_conflict", "conflicting_duplicate"]),
            Flag.subject_key.startswith(f"{device_id}#")
            | Flag.subject_key.startswith(f"{device_id}/"),
        )
    ).all()
    assert flags and all(kind == "seq_conflict" for kind, _ in flags), flags
    assert not [f for f in flags if f.status in ACTIVE_STATUSES], flags
    assert all(status == FlagStatus.CLOSED for _, status in flags), flags
    state = session.get(DeviceSyncState, device_id)
    assert state is not None
    session.refresh(state)
    assert state.unsettled_seq_conflicts == 0
    assert state.missing_ranges == []
    assert state.acked_through_seq == state.max_seq
