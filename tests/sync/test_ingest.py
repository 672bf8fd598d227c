"""The engine over a database session, without Flask: results, exactly-once, acks, clock."""

import contextlib
import dataclasses
import datetime as dt
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, func, select, update
from sqlalchemy.orm import Session

from models import (
    AuditEntry,
    Consent,
    Device,
    DeviceSyncState,
    FeedChange,
    FeedKind,
    Flag,
    FlagStatus,
    OutboxMessage,
    Parcel,
    ParcelStatus,
    QuarantinedEvent,
    ScanEvent,
    SyncBatch,
    WebhookSubscription,
)
from models.enums import ConsentChannel, ConsentMethod, ConsentScope
from sync import audit, handover, projection, rules, status
from sync import ingest as ingest_module
from sync.consents import ConsentDraft, ConsentRules, grant
from sync.errors import Conflict
from sync.events import OUT_OF_WINDOW, EventRejected, EventRules
from sync.flags import flag_changes, resolve_flag
from sync.ingest import IngestRules, PushBatch, Pusher, ingest
from sync.lost_seqs import write_off_lost_seqs
from sync.parcels import IntakeRules, IntakeScope, ParcelDraft, intake_parcels, parcel_timeline
from sync.rules import Policy
from sync.status import rejudge_for_consent
from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy
from tests import factories
from tests.conftest import World

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
POLICY = TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS)
RULES = IngestRules(events=EventRules(tracking=POLICY))


def at(minutes: float) -> dt.datetime:
    return NOW - dt.timedelta(hours=3) + dt.timedelta(minutes=minutes)


class Pda:
    """A PDA of the test world: numbers its events and pushes them through the engine."""

    def __init__(self, session: Session, world: World, skew: dt.timedelta = dt.timedelta()):
        self.session = session
        self.pusher = Pusher(world.device.id, world.station.id, world.courier.id)
        self.skew = skew

    def event(self, seq: int, tracking_no: str, type: str = "checked_out", **kw: Any) -> dict:
        kw.setdefault("occurred_at", at(seq) + self.skew)
        return factories.event(seq, tracking_no, type, **kw)

    def push(
        self,
        events: list[Any],
        batch_id: uuid.UUID | None = None,
        *,
        received_at: dt.datetime = NOW,
        sent_at: dt.datetime | None = None,
        commit: bool = True,
        rules: IngestRules = RULES,
    ) -> dict[str, Any]:
        """``sent_at``: on the PDA's clock; by default ``received_at`` with its skew."""
        receipt = ingest(
            session=self.session,
            batch=PushBatch(
                device_id=self.pusher.device_id,
                batch_id=batch_id or uuid.uuid4(),
                sent_at=sent_at or received_at + self.skew,
                events=events,
            ),
            pusher=self.pusher,
            rules=rules,
            received_at=received_at,
        )
        if commit:
            self.session.commit()
        return receipt


def statuses(receipt: dict[str, Any]) -> list[str]:
    return [r["status"] for r in receipt["results"]]


def count(session: Session, model: Any) -> int:
    return session.scalar(select(func.count()).select_from(model))


@contextlib.contextmanager
def statements_sent(session: Session) -> Iterator[list[str]]:
    """The SQL the session's connection sends meanwhile, in order."""
    sent: list[str] = []

    def capture(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    connection = session.connection()
    event.listen(connection, "before_cursor_execute", capture)
    try:
        yield sent
    finally:
        event.remove(connection, "before_cursor_execute", capture)


@contextlib.contextmanager
def statements_with_parameters(session: Session) -> Iterator[list[tuple[str, Any]]]:
    """The SQL the session's connection sends meanwhile, with its parameters, in order."""
    sent: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    connection = session.connection()
    event.listen(connection, "before_cursor_execute", capture)
    try:
        yield sent
    finally:
        event.remove(connection, "before_cursor_execute", capture)


@pytest.fixture
def pda(session: Session, world: World) -> Pda:
    return Pda(session, world)


@pytest.fixture
def parcel(session: Session, world: World) -> Parcel:
    parcel = factories.parcel(session, world.station)
    session.commit()
    return parcel


def test_each_event_gets_its_own_result_and_a_bad_one_blocks_nothing(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    bad = pda.event(2, parcel.tracking_no, "delivered_to_locker")  # no locker_id
    receipt = pda.push(
        [pda.event(1, parcel.tracking_no), bad, pda.event(3, parcel.tracking_no, "delivered")]
    )
    assert statuses(receipt) == ["applied", "rejected", "applied"]
    assert receipt["results"][1]["error"]["code"] == "missing_field"
    assert receipt["results"][1]["client_event_id"] == bad["client_event_id"]
    assert count(session, ScanEvent) == 2
    kept = session.scalars(select(QuarantinedEvent)).one()
    assert kept.error_code == "missing_field" and kept.field == "locker_id"
    assert kept.client_event_id == bad["client_event_id"] and kept.seq == 2
    assert bad["client_event_id"] in kept.payload
    # A rejected event is final: the PDA may drop it, so its seq counts as held.
    assert receipt["acked_through_seq"] == 3
    assert session.get(Parcel, parcel.id).status == ParcelStatus.DELIVERED


def test_resending_a_batch_returns_the_same_receipt_and_changes_nothing(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    events = [pda.event(1, parcel.tracking_no), pda.event(2, parcel.tracking_no, "bogus")]
    batch_id = uuid.uuid4()
    first = pda.push(events, batch_id)
    rows = (
        count(session, ScanEvent),
        count(session, QuarantinedEvent),
        count(session, FeedChange),
    )
    assert pda.push(events, batch_id) == first
    assert (
        count(session, ScanEvent),
        count(session, QuarantinedEvent),
        count(session, FeedChange),
    ) == rows


def test_a_retry_written_anew_in_another_spelling_gets_the_original_receipt(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """A PDA's battery is swapped while a batch is in flight and its answer is lost; the
    app comes back with its time zone reset to UTC and writes the retry anew from its
    store: the same events, times in ``Z``, seqs as ``1`` where its serializer wrote
    ``1.0``, the empty location left out. It is the same batch: the original receipt
    comes back, not a 409 ``batch_id_reused`` telling the PDA its events were other
    ones. A batch stored before such retries were recognised replays unchanged too."""
    when = at(1).astimezone(dt.timezone(dt.timedelta(hours=8)))
    first = pda.event(1, parcel.tracking_no, occurred_at=when, location=None)
    first["seq"] = 1.0
    bad = pda.event(2, parcel.tracking_no, "bogus")
    batch_id = uuid.uuid4()
    receipt = pda.push([first, bad], batch_id)
    anew = {**first, "seq": 1, "occurred_at": at(1).isoformat().replace("+00:00", "Z")}
    anew["client_event_id"] = first["client_event_id"].upper()
    del anew["location"]
    again = pda.push([anew, bad], batch_id, received_at=NOW + dt.timedelta(hours=1))
    named_anew = {**receipt["results"][0], "client_event_id": anew["client_event_id"]}
    assert again == {**receipt, "results": [named_anew, *receipt["results"][1:]]}
    assert count(session, ScanEvent) == 1

    stored_before = [pda.event(3, parcel.tracking_no, "delivered")]
    old_id = uuid.uuid4()
    old_receipt = pda.push(stored_before, old_id)
    batch = PushBatch(pda.pusher.device_id, old_id, NOW, stored_before)
    session.execute(
        update(SyncBatch)
        .where(SyncBatch.batch_id == old_id)
        .values(request_hash=ingest_module.request_hash(batch))
    )
    session.commit()
    assert pda.push(stored_before, old_id) == old_receipt


def test_a_push_hashes_its_bytes_once_before_the_devices_lock(
    pda: Pda, parcel: Parcel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bytes of a batch (up to MAX_EVENTS_PER_PUSH events) are hashed once a push,
    before the device's lock (the writers' turn on SQLite), a replay's too: never again
    under the lock to compare with what is stored."""
    events = [pda.event(1, parcel.tracking_no)]
    batch_id = uuid.uuid4()
    hashed: list[str] = []
    original = ingest_module.request_hash
    locked = ingest_module.lock_device_state

    def hashing(batch: PushBatch) -> str:
        hashed.append("hash")
        return original(batch)

    def locking(*args: Any, **kwargs: Any) -> Any:
        hashed.append("lock")
        return locked(*args, **kwargs)

    monkeypatch.setattr(ingest_module, "request_hash", hashing)
    monkeypatch.setattr(ingest_module, "lock_device_state", locking)
    receipt = pda.push(events, batch_id)
    assert pda.push(events, batch_id) == receipt
    assert hashed == ["hash", "lock", "hash", "lock"]


def test_a_retry_sent_byte_for_byte_after_the_tracking_patterns_changed_gets_its_receipt(
    pda: Pda, parcel: Parcel
) -> None:
    """A batch is known by its events' content, and which events are valid depends on
    the tracking-number patterns: narrowed between an attempt whose answer was lost
    and its retry (an operator's change, a deploy), they made a valid event a rejected
    one, and the retry, sent byte for byte, was refused 409 batch_id_reused instead of
    getting its receipt (DESIGN.md rule 2); widened, the same for a rejected one."""
    domestic = "SF1234567890123"  # a courier company's own numbering
    events = [pda.event(1, parcel.tracking_no), pda.event(2, domestic, "delivered")]
    batch_id = uuid.uuid4()
    receipt = pda.push(events, batch_id)
    assert statuses(receipt) == ["applied", "applied"]
    narrowed = IngestRules(events=EventRules(tracking=TrackingNumberPolicy.from_patterns([])))
    assert statuses(pda.push([pda.event(3, domestic)], rules=narrowed)) == ["rejected"]

    assert pda.push(events, batch_id, rules=narrowed) == receipt
    assert pda.push([dict(e) for e in events], batch_id) == receipt
    with pytest.raises(Conflict) as refused:  # other events under the same id
        pda.push([events[0], pda.event(2, parcel.tracking_no, "delivered")], batch_id)
    assert refused.value.code == "batch_id_reused"


def test_a_retry_writing_its_ids_anew_finds_its_results_under_them(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """A retry is the same batch whatever the spelling of its ids (a PDA whose app was
    updated in between writes them in capitals, or in braces); the receipt it gets back
    names each event as the retry wrote it, as every push's results do: answered in the
    first attempt's spelling, a PDA matching results by id finds its events unanswered
    and sends them again forever."""
    checked_out = pda.event(1, parcel.tracking_no)
    delivered = pda.event(2, parcel.tracking_no, "delivered")
    bad = pda.event(3, parcel.tracking_no, "bogus")
    batch_id = uuid.uuid4()
    receipt = pda.push([checked_out, delivered, bad], batch_id)
    anew = [
        {**checked_out, "client_event_id": checked_out["client_event_id"].upper()},
        {**delivered, "client_event_id": "{" + delivered["client_event_id"] + "}"},
        bad,
    ]
    again = pda.push(anew, batch_id, received_at=NOW + dt.timedelta(hours=1))
    assert [r["client_event_id"] for r in again["results"]] == [e["client_event_id"] for e in anew]
    assert {**again, "results": receipt["results"]} == receipt
    assert statuses(again) == statuses(receipt) == ["applied", "applied", "rejected"]
    assert count(session, ScanEvent) == 2


def test_a_retry_listing_its_events_in_another_order_gets_the_receipt_at_its_indexes(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """DESIGN.md rule 2: re-sending a batch returns the same receipt. A PDA offline all
    afternoon lost the answer to a batch and rebuilt the retry from its store, which
    lists events by time, not by seq (and one id in capitals); it was refused 409
    ``batch_id_reused`` as if other events had been sent. The same events in any order
    are the same batch: the stored receipt comes back, each result at the retry's index
    and naming the event as the retry wrote it, malformed events (no id at all) each
    with its own error, and nothing is stored again."""
    tn = parcel.tracking_no
    checked_out, delivered = pda.event(1, tn), pda.event(2, tn, "delivered")
    no_type = {k: v for k, v in pda.event(3, tn).items() if k not in ("type", "client_event_id")}
    bad_seq = {**pda.event(4, tn), "seq": 0}
    del bad_seq["client_event_id"]
    batch_id = uuid.uuid4()
    receipt = pda.push([checked_out, no_type, delivered, bad_seq], batch_id)
    assert statuses(receipt) == ["applied", "rejected", "applied", "rejected"]
    codes = {r["index"]: r["error"]["code"] for r in receipt["results"] if "error" in r}
    assert codes[1] != codes[3]
    rows = (count(session, ScanEvent), count(session, QuarantinedEvent))

    upper = {**delivered, "client_event_id": delivered["client_event_id"].upper()}
    retry = [bad_seq, upper, no_type, checked_out]  # [3, 2, 1, 0] of the first attempt
    again = pda.push(retry, batch_id, received_at=NOW + dt.timedelta(hours=2))
    first = receipt["results"]
    assert again["results"] == [
        {**first[3], "index": 0},
        {**first[2], "index": 1, "client_event_id": upper["client_event_id"]},
        {**first[1], "index": 2},
        {**first[0], "index": 3},
    ]
    assert {**again, "results": first} == receipt
    assert (count(session, ScanEvent), count(session, QuarantinedEvent)) == rows

    with pytest.raises(Conflict) as refused:  # another event among them: other content
        pda.push(
            [bad_seq, pda.event(2, tn, "returned_to_station"), no_type, checked_out], batch_id
        )
    assert refused.value.code == "batch_id_reused"


def test_a_retry_in_another_order_answers_each_version_of_an_id_as_the_first_time(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """A PDA's bug sent one id in two versions in a batch: one applied, the other
    rejected ``conflicting_duplicate``. Its retry in another order tells each version
    what became of it (by the version held), not the applied result to the one that
    was refused."""
    held = pda.event(1, parcel.tracking_no, "delivered")
    other = {**held, "pod": {"recipient_name": "Someone else"}}
    batch_id = uuid.uuid4()
    receipt = pda.push([held, other], batch_id)
    assert sorted(statuses(receipt)) == ["applied", "rejected"]
    again = pda.push([other, held], batch_id, received_at=NOW + dt.timedelta(hours=1))
    assert again["results"] == [
        {**receipt["results"][1], "index": 0},
        {**receipt["results"][0], "index": 1},
    ]


def test_a_retry_in_another_order_tells_each_malformed_event_its_own_error(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """Two malformed events no id tells apart (none sent) and refused with one code
    but each its own message: a PDA typing event types by hand ("delivred", "returnd").
    Its retry in another order gets each its own error, not the other's at its index."""
    tn = parcel.tracking_no
    typos = []
    for seq, typo in ((1, "delivred"), (2, "returnd")):
        event = {**pda.event(seq, tn), "type": typo}
        del event["client_event_id"]
        typos.append(event)
    batch_id = uuid.uuid4()
    receipt = pda.push(typos, batch_id)
    errors = [r["error"] for r in receipt["results"]]
    assert [e["code"] for e in errors] == ["unknown_event_type"] * 2
    assert "delivred" in errors[0]["message"] and "returnd" in errors[1]["message"]
    again = pda.push(typos[::-1], batch_id, received_at=NOW + dt.timedelta(hours=1))
    assert again["results"] == [
        {**receipt["results"][1], "index": 0},
        {**receipt["results"][0], "index": 1},
    ]


def test_a_batch_stored_with_its_ordered_digest_is_still_known_by_it(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """A batch stored before digests ignored the order keeps its digest of the events in
    order: its retry, written anew in that order, still gets its receipt."""
    events = [pda.event(1, parcel.tracking_no), pda.event(2, parcel.tracking_no, "delivered")]
    batch_id = uuid.uuid4()

    def contents_of(events: list[dict[str, Any]]) -> tuple[PushBatch, list[str]]:
        batch = PushBatch(pda.pusher.device_id, batch_id, NOW, events)
        validated = ingest_module._Validated.of(batch, RULES.events, frozenset())
        return batch, ingest_module.event_contents(batch, validated)

    if contents_of(events)[1] == sorted(contents_of(events)[1]):
        events.reverse()  # in an order the sorted digest does not keep
    batch, contents = contents_of(events)
    receipt = pda.push(events, batch_id)
    ordered = ingest_module.ordered_content_digest(batch, contents)
    assert ordered != ingest_module.content_digest(batch, contents)
    session.execute(
        update(SyncBatch)
        .where(SyncBatch.batch_id == batch_id)
        .values(request_hash=ordered, sent_hash="0" * 64)
    )
    session.commit()
    anew = [{**e, "client_event_id": e["client_event_id"].upper()} for e in events]
    assert {**pda.push(anew, batch_id), "results": receipt["results"]} == receipt


def test_a_batch_id_reused_for_other_events_is_refused(pda: Pda, parcel: Parcel) -> None:
    batch_id = uuid.uuid4()
    pda.push([pda.event(1, parcel.tracking_no)], batch_id)
    with pytest.raises(Conflict) as info:
        pda.push([pda.event(2, parcel.tracking_no)], batch_id)
    assert info.value.code == "batch_id_reused"


def test_an_event_resent_in_another_batch_is_a_duplicate(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    event = pda.event(1, parcel.tracking_no)
    pda.push([event])
    receipt = pda.push([event, event])
    assert statuses(receipt) == ["duplicate", "duplicate"]
    assert count(session, ScanEvent) == 1


def test_each_result_names_its_event_as_the_pda_wrote_its_id(pda: Pda, parcel: Parcel) -> None:
    """A PDA matches results to its events by ``client_event_id``. One that writes its
    UUIDs in capitals (iOS's ``uuidString``) or in braces must find them in the
    receipt as sent, applied or duplicate as well as rejected: answered in another
    spelling, its events look unanswered, are never pruned, and are sent again forever."""
    capitals = pda.event(1, parcel.tracking_no, client_event_id=str(uuid.uuid4()).upper())
    braces = pda.event(2, parcel.tracking_no, "delivered")
    braces["client_event_id"] = "{" + braces["client_event_id"] + "}"
    bad = pda.event(3, parcel.tracking_no, "bogus", client_event_id=str(uuid.uuid4()).upper())
    sent = [capitals["client_event_id"], braces["client_event_id"], bad["client_event_id"]]

    first = pda.push([capitals, braces, bad])
    assert statuses(first) == ["applied", "applied", "rejected"]
    assert [r["client_event_id"] for r in first["results"]] == sent
    again = pda.push([capitals, braces, bad])
    assert statuses(again) == ["duplicate", "duplicate", "rejected"]
    assert [r["client_event_id"] for r in again["results"]] == sent


def test_the_same_id_with_other_content_is_rejected_and_flagged_never_overwritten(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    original = pda.event(1, parcel.tracking_no)
    pda.push([original])
    altered = {**original, "occurred_at": at(50).isoformat()}
    receipt = pda.push([altered])
    assert statuses(receipt) == ["rejected"]
    assert receipt["results"][0]["error"]["code"] == "conflicting_duplicate"
    stored = session.scalars(select(ScanEvent)).one()
    assert stored.occurred_at_device == at(1)
    flag = session.scalars(select(Flag).where(Flag.kind == "conflicting_duplicate")).one()
    assert flag.subject_key == f"{pda.pusher.device_id}/{original['client_event_id']}"
    assert receipt["flags_raised"][0]["flag_id"] == flag.id
    # Sending the conflicting copy again: same answer, one quarantine row, one flag.
    again = pda.push([altered])
    assert again["results"][0]["error"]["code"] == "conflicting_duplicate"
    assert again["flags_raised"] == []
    assert count(session, QuarantinedEvent) == 1


def test_two_events_claiming_one_seq_keep_the_first(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    pda.push([pda.event(1, parcel.tracking_no)])
    receipt = pda.push([pda.event(1, parcel.tracking_no, "delivered")])
    assert receipt["results"][0]["error"]["code"] == "seq_conflict"
    assert "seq_conflict" in set(session.scalars(select(Flag.kind)))


def _seq_conflict_flag(session: Session, pda: Pda, seq: int) -> Flag:
    return session.scalars(
        select(Flag).where(
            Flag.kind == "seq_conflict", Flag.subject_key == f"{pda.pusher.device_id}#{seq}"
        )
    ).one()


def _rejected_at(session: Session, client_event_id: str) -> QuarantinedEvent:
    return session.scalars(
        select(QuarantinedEvent).where(QuarantinedEvent.client_event_id == client_event_id)
    ).one()


def test_a_seq_conflict_is_settled_once_its_event_is_held_under_a_new_seq(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """README's recovery: a PDA whose app numbered from 1 again sets apart the events
    rejected ``seq_conflict`` and sends them again under new seqs, same ids. The server
    then holds each such event: its rejection is settled (the quarantine says under
    which seq it is held), and the flag, whose cause was an event the server held
    nothing of, is closed by the system, on the audit log with why, as an
    ``unknown_parcel`` flag is once its parcel is taken in. A reboot left the station's
    manager one open flag per restarted seq, long after every event was held."""
    pda.push([pda.event(1, parcel.tracking_no), pda.event(2, parcel.tracking_no)])
    restarted = pda.event(1, parcel.tracking_no, "out_for_delivery", occurred_at=at(5))
    receipt = pda.push([restarted])
    assert receipt["results"][0]["error"]["code"] == "seq_conflict"
    flag = _seq_conflict_flag(session, pda, 1)
    assert flag.status == FlagStatus.OPEN
    assert _rejected_at(session, restarted["client_event_id"]).resent_seq is None

    resent = pda.push([{**restarted, "seq": 3}])
    assert statuses(resent) == ["applied"]
    assert resent["acked_through_seq"] == 3
    session.refresh(flag)
    assert flag.status == FlagStatus.CLOSED
    assert "sent again under a new seq" in (flag.closed_reason or "")
    assert _rejected_at(session, restarted["client_event_id"]).resent_seq == 3
    [entry] = session.scalars(
        select(AuditEntry).where(
            AuditEntry.action == "flag_status_changed", AuditEntry.subject_key == str(flag.id)
        )
    ).all()
    assert entry.actor_id is None
    assert (entry.details["from_status"], entry.details["to_status"]) == ("open", "closed")
    assert entry.details["reason"] == flag.closed_reason
    assert audit.verify(session=session).ok
    # Settled, the PDA's next pushes read no rejected event for it.
    with statements_sent(session) as statements:
        pda.push([pda.event(4, parcel.tracking_no, "delivered")])
    assert not [s for s in statements if "quarantined_event" in s], statements


def test_a_seq_conflict_flag_stays_open_until_every_event_refused_its_seq_is_held(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """Two events refused one seq (two restarts) are one flag: it closes when both are
    held, not when the first is; an event sent again under its id but with other
    content is not the event refused, which stays unsettled (and its flag open)."""
    pda.push([pda.event(1, parcel.tracking_no)])
    first = pda.event(1, parcel.tracking_no, "out_for_delivery", occurred_at=at(5))
    second = pda.event(1, parcel.tracking_no, "delivered", occurred_at=at(9))
    pda.push([first])
    pda.push([second])
    flag = _seq_conflict_flag(session, pda, 1)
    assert len(flag.evidence["client_event_ids"]) == 3
    pda.push([{**first, "seq": 2}])
    session.refresh(flag)
    assert flag.status == FlagStatus.OPEN
    assert _rejected_at(session, first["client_event_id"]).resent_seq == 2
    assert _rejected_at(session, second["client_event_id"]).resent_seq is None
    other = {**second, "seq": 3, "occurred_at": at(30).isoformat()}  # not the event refused
    assert statuses(pda.push([other])) == ["applied"]
    session.refresh(flag)
    assert flag.status == FlagStatus.OPEN
    assert _rejected_at(session, second["client_event_id"]).resent_seq is None


def test_a_seq_conflict_sent_again_before_the_upgrade_is_settled_by_the_next_push(
    session: Session, world: World, pda: Pda, parcel: Parcel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rejection whose event the version before already held under a new seq: the
    migration counts it unsettled, and the PDA's next push storing events settles it
    and closes its flag, though that push brings no event of it."""
    pda.push([pda.event(1, parcel.tracking_no)])
    restarted = pda.event(1, parcel.tracking_no, "out_for_delivery", occurred_at=at(5))
    pda.push([restarted])
    forgotten = update(DeviceSyncState).values(unsettled_seq_conflicts=0)
    session.execute(forgotten)  # as the version before kept it: no count
    session.commit()
    monkeypatch.setattr(ingest_module._BatchIngest, "_settle_seq_conflicts", lambda *_: None)
    pda.push([{**restarted, "seq": 2}])  # the version before: held, nothing settled
    monkeypatch.undo()
    assert _rejected_at(session, restarted["client_event_id"]).resent_seq is None
    # As migrated: counted, named by no event, not compared yet (e9c3b7a5d1f2).
    session.execute(update(QuarantinedEvent).values(unsettled_event_id=None))
    session.execute(
        update(DeviceSyncState).values(unsettled_seq_conflicts=1, seq_conflicts_compared=False)
    )
    session.commit()
    pda.push([pda.event(3, parcel.tracking_no, "delivered")])
    assert _rejected_at(session, restarted["client_event_id"]).resent_seq == 2
    assert _seq_conflict_flag(session, pda, 1).status == FlagStatus.CLOSED
    state = session.get(DeviceSyncState, world.device.id)
    assert state is not None and state.unsettled_seq_conflicts == 0


def test_a_seq_conflict_kept_before_the_upgrade_and_never_sent_again_is_settled_when_it_is(
    session: Session, world: World, pda: Pda, parcel: Parcel
) -> None:
    """A rejection kept before rejections named their events (migration
    ``e9c3b7a5d1f2``): the PDA's next push storing events compares it with the events
    held, finds none, and names its event; a push sending that event under a new seq
    later settles it, as one kept since, and no push in between looks it up."""
    pda.push([pda.event(1, parcel.tracking_no)])
    restarted = pda.event(1, parcel.tracking_no, "out_for_delivery", occurred_at=at(5))
    pda.push([restarted])
    session.execute(update(QuarantinedEvent).values(unsettled_event_id=None))
    session.execute(update(DeviceSyncState).values(seq_conflicts_compared=False))
    session.commit()
    pda.push([pda.event(2, parcel.tracking_no, "delivered")])
    state = session.get(DeviceSyncState, world.device.id)
    assert state is not None
    session.refresh(state)
    assert (state.unsettled_seq_conflicts, state.seq_conflicts_compared) == (1, True)
    rejection = _rejected_at(session, restarted["client_event_id"])
    assert rejection.unsettled_event_id == uuid.UUID(restarted["client_event_id"])
    assert statuses(pda.push([{**restarted, "seq": 3}])) == ["applied"]
    session.refresh(rejection)
    assert (rejection.resent_seq, rejection.unsettled_event_id) == (3, None)
    assert _seq_conflict_flag(session, pda, 1).status == FlagStatus.CLOSED
    session.refresh(state)
    assert state.unsettled_seq_conflicts == 0


def test_a_seq_conflict_the_version_before_kept_during_the_rollout_is_settled_when_resent(
    session: Session, world: World, pda: Pda, parcel: Parcel
) -> None:
    """In the minutes of the rollout the version before still answers pushes after
    migration ``e9c3b7a5d1f2`` ran: a ``seq_conflict`` it keeps names no event
    (``unsettled_event_id``), on a PDA the migration found with none unsettled, so
    marked compared. Sent again under a new seq to the new version, the event is held:
    the rejection is settled and its flag closed, not left open for ever."""
    pda.push([pda.event(1, parcel.tracking_no)])
    restarted = pda.event(1, parcel.tracking_no, "out_for_delivery", occurred_at=at(5))
    pda.push([restarted])
    # As the version before kept it: counted, named by no event; the PDA still compared.
    session.execute(update(QuarantinedEvent).values(unsettled_event_id=None))
    session.commit()
    assert statuses(pda.push([{**restarted, "seq": 2}])) == ["applied"]
    rejection = _rejected_at(session, restarted["client_event_id"])
    assert (rejection.resent_seq, rejection.unsettled_event_id) == (2, None)
    assert _seq_conflict_flag(session, pda, 1).status == FlagStatus.CLOSED
    state = session.get(DeviceSyncState, world.device.id)
    assert state is not None
    session.refresh(state)
    assert state.unsettled_seq_conflicts == 0


def test_a_seq_conflict_the_version_before_settled_during_the_rollout_is_not_settled_twice(
    session: Session, world: World, pda: Pda, parcel: Parcel
) -> None:
    """The version before, still answering during the rollout, settles a rejection the
    new one kept (its ``resent_seq``) but leaves the event it names. A copy of that
    event at its old seq, its id in capitals, is a new rejection settled at once: the
    count of those left must not lose the one settled before too, or it reaches 0
    with another still unsettled, whose event sent again later is never looked for."""
    pda.push([pda.event(1, parcel.tracking_no), pda.event(2, parcel.tracking_no)])
    first = pda.event(1, parcel.tracking_no, "out_for_delivery", occurred_at=at(5))
    second = pda.event(2, parcel.tracking_no, "delivered", occurred_at=at(9))
    assert statuses(pda.push([first, second])) == ["rejected", "rejected"]
    # The version before holds ``first`` under seq 3 and settles its rejection alone.
    rows = {
        row.client_event_id: row
        for row in session.scalars(select(QuarantinedEvent).order_by(QuarantinedEvent.id))
    }
    assert statuses(pda.push([{**first, "seq": 3}])) == ["applied"]
    session.execute(
        update(QuarantinedEvent)
        .where(QuarantinedEvent.id == rows[first["client_event_id"]].id)
        .values(resent_seq=3, unsettled_event_id=uuid.UUID(first["client_event_id"]))
    )
    session.execute(update(DeviceSyncState).values(unsettled_seq_conflicts=1))
    session.commit()
    capitals = {**first, "client_event_id": first["client_event_id"].upper()}
    assert statuses(pda.push([capitals])) == ["rejected"]
    state = session.get(DeviceSyncState, world.device.id)
    assert state is not None
    session.refresh(state)
    assert state.unsettled_seq_conflicts == 1  # ``second``'s
    assert statuses(pda.push([{**second, "seq": 4}])) == ["applied"]
    session.expire_all()
    assert _rejected_at(session, second["client_event_id"]).resent_seq == 4
    assert _seq_conflict_flag(session, pda, 2).status == FlagStatus.CLOSED
    session.refresh(state)
    assert state.unsettled_seq_conflicts == 0


def test_a_seq_conflict_with_a_seq_another_courier_pushed_keeps_its_flag_open(
    session: Session, world: World, pda: Pda, parcel: Parcel
) -> None:
    """A colleague signed in with the PDA's id took seqs the PDA had yet to push
    (SECURITY.md): the PDA's own events are refused ``seq_conflict``. Sent again under
    new seqs they are held, and their rejections say so, but the flag is what tells
    the manager another courier pushed as this PDA: it stays open."""
    colleague = Pda(session, world)
    other = factories.user(session, "courier9", "courier", world.station)
    session.commit()
    colleague.pusher = Pusher(world.device.id, world.station.id, other.id)
    colleague.push([colleague.event(1, parcel.tracking_no)])
    own = pda.event(1, parcel.tracking_no, "out_for_delivery", occurred_at=at(5))
    assert statuses(pda.push([own])) == ["rejected"]
    assert statuses(pda.push([{**own, "seq": 2}])) == ["applied"]
    assert _rejected_at(session, own["client_event_id"]).resent_seq == 2
    assert _seq_conflict_flag(session, pda, 1).status == FlagStatus.OPEN


def test_a_seq_conflict_resent_in_the_same_push_is_settled(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """A PDA that resends a set-apart event in the push where an older copy of it is
    refused again (its queue rebuilt): the event is held, the refusal settled at once."""
    pda.push([pda.event(1, parcel.tracking_no)])
    restarted = pda.event(1, parcel.tracking_no, "out_for_delivery", occurred_at=at(5))
    receipt = pda.push([restarted, {**restarted, "seq": 2}])
    assert statuses(receipt) == ["rejected", "applied"]
    assert _rejected_at(session, restarted["client_event_id"]).resent_seq == 2
    assert _seq_conflict_flag(session, pda, 1).status == FlagStatus.CLOSED


@pytest.mark.parametrize("refused_before", [False, True], ids=["first sent", "refused before"])
@pytest.mark.parametrize("old_copy_first", [True, False], ids=["old copy first", "new seq first"])
def test_an_event_sent_under_its_new_seq_and_at_its_old_one_in_one_push_is_one_answer(
    session: Session, pda: Pda, parcel: Parcel, refused_before: bool, old_copy_first: bool
) -> None:
    """A PDA whose queue holds an event set apart both as sent (its old seq, another
    event's) and under its new seq (README's recovery: a queue rebuilt from a copy
    kept) pushes both at once: the copy at the old seq is answered ``seq_conflict``,
    settled by the event held under its new seq, whichever of the two comes first in
    the batch (rule 3). With the new seq first, the copy was taken for a
    ``conflicting_duplicate`` of it, flagged for the manager for nothing lost."""
    pda.push([pda.event(1, parcel.tracking_no)])
    restarted = pda.event(1, parcel.tracking_no, "out_for_delivery", occurred_at=at(5))
    if refused_before:
        assert statuses(pda.push([restarted])) == ["rejected"]
    resent = {**restarted, "seq": 2}
    batch = [restarted, resent] if old_copy_first else [resent, restarted]
    receipt = pda.push(batch)
    by_seq = {
        event["seq"]: result for event, result in zip(batch, receipt["results"], strict=True)
    }
    assert by_seq[2]["status"] == "applied"
    assert (by_seq[1]["status"], by_seq[1]["error"]["code"]) == ("rejected", "seq_conflict")
    assert set(session.scalars(select(Flag.kind))) == {"seq_conflict"}
    assert _seq_conflict_flag(session, pda, 1).status == FlagStatus.CLOSED
    assert _rejected_at(session, restarted["client_event_id"]).resent_seq == 2


def test_a_set_apart_event_sent_again_at_its_old_seq_after_the_recovery_gets_the_same_answer(
    session: Session, world: World, pda: Pda, parcel: Parcel
) -> None:
    """README: a rejected event gets the same answer every time it is sent. A PDA whose
    recovery is done (the event held under a new seq, its refusal settled) that sends
    the set-apart copy again at its old seq, in a new batch (a queue rebuilt from a
    copy it kept), is answered ``seq_conflict`` as the first time: not a
    ``conflicting_duplicate`` with a flag of its own, nor the settled flag opened
    again, for the manager at 19:00 with nothing lost. Written otherwise (its id in
    capitals), the same event: kept in quarantine as sent, settled at once."""
    pda.push([pda.event(1, parcel.tracking_no)])
    restarted = pda.event(1, parcel.tracking_no, "out_for_delivery", occurred_at=at(5))
    first = pda.push([restarted])
    assert statuses(pda.push([{**restarted, "seq": 2}])) == ["applied"]
    flag = _seq_conflict_flag(session, pda, 1)
    assert flag.status == FlagStatus.CLOSED

    again = pda.push([restarted])
    assert again["results"] == first["results"]
    session.refresh(flag)
    assert flag.status == FlagStatus.CLOSED
    assert set(session.scalars(select(Flag.kind))) == {"seq_conflict"}
    capitals = {**restarted, "client_event_id": restarted["client_event_id"].upper()}
    [result] = pda.push([capitals])["results"]
    assert (result["status"], result["error"]["code"]) == ("rejected", "seq_conflict")
    session.refresh(flag)
    assert flag.status == FlagStatus.CLOSED
    assert set(session.scalars(select(Flag.kind))) == {"seq_conflict"}
    rows = session.scalars(select(QuarantinedEvent).order_by(QuarantinedEvent.id)).all()
    assert [row.resent_seq for row in rows] == [2, 2]
    state = session.get(DeviceSyncState, world.device.id)
    assert state is not None and state.unsettled_seq_conflicts == 0


def _payloads_read(statements: list[tuple[str, Any]]) -> list[Any]:
    """The parameters of each statement that read rejected events' payloads."""
    return [
        parameters
        for sql, parameters in statements
        if re.search(r"quarantined_event\.payload\b", sql) and sql.lstrip().startswith("SELECT")
    ]


def test_a_pda_that_never_recovers_reads_no_payload_of_its_seq_conflicts_on_each_push(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """Each push storing events while seq_conflict rejections are unsettled looks for
    those whose event is held now under another seq. A PDA that never sends them
    again (never recovers) paid, on every push, the payloads of all of them, then
    still every rejection's id and seq and a look-up of each among the events held
    (51.7 ms a push at 2,000 of them): a push reads only the rejections naming the
    events it stores, and a payload only of one whose event is held at another seq,
    the only ones it may settle."""
    tn = parcel.tracking_no
    pda.push([pda.event(seq, tn) for seq in range(1, 6)])
    restarted = [
        pda.event(seq, tn, "out_for_delivery", occurred_at=at(9 + seq)) for seq in range(1, 6)
    ]
    assert statuses(pda.push(restarted)) == ["rejected"] * 5
    with statements_with_parameters(session) as statements:
        assert statuses(pda.push([pda.event(6, tn, "delivered")])) == ["applied"]
    assert any("quarantined_event" in sql for sql, _ in statements)  # still looked for
    assert _payloads_read(statements) == []
    # Nor are its rejections' events looked up among those held, pushed before: each
    # was compared when it was refused. Only the event this push stores is looked for.
    refused = [uuid.UUID(event["client_event_id"]) for event in restarted]
    named = [
        sql
        for sql, parameters in statements
        if any(form in repr(parameters) for i in refused for form in (str(i), i.hex))
    ]
    assert named == []

    with statements_with_parameters(session) as statements:
        assert statuses(pda.push([{**restarted[2], "seq": 7}])) == ["applied"]
    [parameters] = _payloads_read(statements)
    settling = _rejected_at(session, restarted[2]["client_event_id"])
    assert settling.resent_seq == 7
    assert list(parameters.values() if isinstance(parameters, dict) else parameters) == [
        settling.id
    ]
    assert _seq_conflict_flag(session, pda, 3).status == FlagStatus.CLOSED
    assert _seq_conflict_flag(session, pda, 1).status == FlagStatus.OPEN


def test_an_event_held_sent_again_after_the_domestic_patterns_narrowed_is_a_duplicate(
    session: Session, pda: Pda
) -> None:
    """README: an event already held comes back ``duplicate``. One held under a
    domestic format the station has since dropped (a carrier's numbers no longer
    taken in), sent again in a new batch (a retry split after a 413, a queue rebuilt),
    was validated anew and answered ``rejected`` ``invalid_tracking_no``, and kept in
    quarantine beside the event holding it: the PDA was told its scan was refused, and
    the station shown a rejection of a scan it holds. A new event of that number is
    still refused."""
    domestic = "SF1234567890"
    held = pda.event(1, domestic)
    assert statuses(pda.push([held])) == ["applied"]
    narrowed = IngestRules(
        events=EventRules(tracking=TrackingNumberPolicy.from_patterns([r"JD\d{10}"]))
    )
    again = pda.push([held, pda.event(2, domestic)], rules=narrowed)
    assert statuses(again) == ["duplicate", "rejected"]
    assert again["results"][1]["error"]["code"] == "invalid_tracking_no"
    assert again["acked_through_seq"] == 2
    assert session.scalars(select(QuarantinedEvent.seq)).all() == [2]
    assert count(session, ScanEvent) == 1


@pytest.mark.parametrize("held", ["by this version", "before this version"])
def test_a_settled_events_copy_written_otherwise_after_its_format_was_dropped_is_a_seq_conflict(
    session: Session, pda: Pda, held: str
) -> None:
    """README's recovery: a copy of an event set apart, sent again at the seq it was
    refused (a queue rebuilt), gets its first answer, ``seq_conflict``, however it is
    written (its id in capitals), and raises nothing. Its domestic format dropped since,
    it was answered ``invalid_tracking_no`` and quarantined anew beside the event held
    under its new seq. And a rejection whose event was held under its new seq before
    this version (settled by the next push storing events) was left unsettled for good
    when that push came after its format was dropped, its flag open, its payload read
    again on every push."""
    domestic = "SF1234567890"
    narrowed = IngestRules(
        events=EventRules(tracking=TrackingNumberPolicy.from_patterns([r"JD\d{10}"]))
    )
    assert statuses(pda.push([pda.event(1, domestic)])) == ["applied"]
    restarted = pda.event(1, domestic, "out_for_delivery", occurred_at=at(5))
    assert statuses(pda.push([restarted])) == ["rejected"]
    resent = {**restarted, "seq": 2}
    assert statuses(pda.push([resent])) == ["applied"]
    if held == "before this version":  # unsettled: the next push storing events settles it
        session.execute(update(QuarantinedEvent).values(resent_seq=None))
        session.execute(
            update(DeviceSyncState).values(unsettled_seq_conflicts=1, seq_conflicts_compared=False)
        )
        session.execute(update(Flag).values(status=FlagStatus.OPEN, closed_reason=None))
        session.commit()
        pushed = pda.push([pda.event(3, "JD1234567890")], rules=narrowed)
        assert statuses(pushed) == ["applied"]
    written_otherwise = {**restarted, "client_event_id": restarted["client_event_id"].upper()}
    receipt = pda.push([written_otherwise, resent], rules=narrowed)
    assert statuses(receipt) == ["rejected", "duplicate"]
    assert receipt["results"][0]["error"]["code"] == "seq_conflict"
    assert receipt["flags_raised"] == []
    # Its own row (sent otherwise), settled: each row of the event names the seq it is held
    rejections = select(QuarantinedEvent.error_code, QuarantinedEvent.resent_seq)
    assert session.execute(rejections).all() == [("seq_conflict", 2)] * 2
    state = session.get(DeviceSyncState, pda.pusher.device_id)
    assert state is not None
    session.refresh(state)
    assert state.unsettled_seq_conflicts == 0
    assert _seq_conflict_flag(session, pda, 1).status == FlagStatus.CLOSED


def test_a_rejected_event_resent_gets_the_same_answer_and_one_quarantine_row(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    bad = pda.event(1, parcel.tracking_no, "exception", reason="melted")
    first = pda.push([bad])
    second = pda.push([bad])
    assert first["results"] == second["results"]
    assert count(session, QuarantinedEvent) == 1


def test_a_rejected_event_sent_again_corrected_under_its_id_and_seq_is_applied(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """A courier mistypes a tracking number (its check digit is wrong): the event is
    rejected and kept in quarantine. Retyped on the PDA and sent again under the same
    id and seq, it is applied: the server holds no event of that id (a rejected event
    is not stored), so it is no conflicting duplicate, and its seq is the one the
    rejection held. The quarantine row stays, the record of what was first sent."""
    typed = parcel.tracking_no[:10] + str((int(parcel.tracking_no[10]) + 1) % 10)
    typed += parcel.tracking_no[11:]
    mistyped = pda.event(1, typed)
    first = pda.push([mistyped])
    assert first["results"][0]["error"]["code"] == "invalid_check_digit"
    retyped = {**mistyped, "tracking_no": parcel.tracking_no}
    second = pda.push([retyped])
    assert statuses(second) == ["applied"]
    assert second["acked_through_seq"] == 1
    assert count(session, ScanEvent) == 1
    assert count(session, QuarantinedEvent) == 1


def test_an_event_held_and_sent_again_31_days_on_is_a_duplicate_a_new_one_is_kept(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """Rule 2 whatever the push's sent_at: an event kept on a PDA behind a gap is
    re-sent with every push, and 31 days on it is still the event the server holds.
    An event of that push dated as long before it is kept too (rule 1), its clock
    flagged; the same id with other content is a conflicting duplicate."""
    tn = parcel.tracking_no
    held = pda.event(1, tn)
    pda.push([held])
    altered = {**pda.event(1, tn), "client_event_id": held["client_event_id"]}
    altered["occurred_at"] = at(2).isoformat()
    later = NOW + dt.timedelta(days=31)
    receipt = pda.push(
        [held, pda.event(2, tn, "out_for_delivery"), altered, held], received_at=later
    )
    assert statuses(receipt) == ["duplicate", "applied", "rejected", "duplicate"]
    assert [r["error"]["code"] for r in receipt["results"] if "error" in r] == [
        "conflicting_duplicate",
    ]
    assert sorted(f["kind"] for f in receipt["flags_raised"]) == [
        "clock_jump",
        "conflicting_duplicate",
    ]
    assert count(session, ScanEvent) == 2
    assert count(session, QuarantinedEvent) == 1
    assert (receipt["acked_through_seq"], receipt["missing_seqs"]) == (2, [])


def test_a_held_id_reused_at_a_new_seq_31_days_on_is_a_conflicting_duplicate(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    held = pda.event(1, parcel.tracking_no)
    pda.push([held])
    reused = {**pda.event(9, parcel.tracking_no), "client_event_id": held["client_event_id"]}
    receipt = pda.push([reused], received_at=NOW + dt.timedelta(days=31))
    assert receipt["results"][0]["error"]["code"] == "conflicting_duplicate"
    assert count(session, ScanEvent) == 1


@pytest.mark.parametrize("pushed", ["before", "after"])
def test_a_scan_pushed_after_the_pdas_clock_was_set_a_year_ahead_is_kept_at_its_time(
    session: Session, pda: Pda, world: World, pushed: str
) -> None:
    """The courier checks a parcel out and delivers it on a right clock; then the
    PDA's date is set a year ahead (a typo) and it scans another parcel. Whether the
    delivery went out before the change or with the next scan, in a push sent a year
    ahead, it is kept (rule 1) at the time it was recorded, the parcel ends
    delivered (rule 3), and a resend once the clock is right changes nothing."""
    year = dt.timedelta(days=365)
    tn, other = (factories.parcel(session, world.station).tracking_no for _ in range(2))
    session.commit()
    checked_out = pda.event(1, tn, occurred_at=at(10))
    delivered = pda.event(
        2, tn, "delivered", occurred_at=at(20), pod={"signature_sha256": "5" * 64}
    )
    next_scan = pda.event(3, other, occurred_at=at(40) + year)  # on the wrong clock
    if pushed == "before":
        pda.push([checked_out, delivered], received_at=at(30))
        late = pda.push([next_scan], received_at=at(50), sent_at=at(50) + year)
        assert [f["kind"] for f in late["flags_raised"]] == ["clock_skew"]
    else:
        pda.push([checked_out], received_at=at(15))
        late = pda.push([delivered, next_scan], received_at=at(50), sent_at=at(50) + year)
        assert statuses(late) == ["applied", "applied"]
        kinds = {f["kind"] for f in late["flags_raised"]}
        assert kinds == {"clock_jump", "clock_skew", "pod_blob_missing"}
        jump = session.scalars(select(Flag).where(Flag.kind == "clock_jump")).one()
        assert (jump.evidence["events_behind"], jump.evidence["events_ahead"]) == (1, 0)
        assert jump.evidence["client_event_ids"] == [delivered["client_event_id"]]
    again = pda.push([checked_out, delivered, next_scan], received_at=at(60))
    assert statuses(again) == ["duplicate", "duplicate", "duplicate"]
    stored = session.scalars(select(ScanEvent).order_by(ScanEvent.seq)).all()
    assert [(e.seq, e.occurred_at) for e in stored] == [(1, at(10)), (2, at(20)), (3, at(40))]
    assert session.scalars(select(Parcel).where(Parcel.tracking_no == tn)).one().status == (
        ParcelStatus.DELIVERED
    )


def test_an_event_once_refused_for_its_date_alone_is_kept_when_sent_again(
    session: Session, pda: Pda, parcel: Parcel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Such events were once refused (``occurred_at_out_of_range``) and quarantined; a
    PDA that still holds one and sends it again has it stored now, not refused with
    that first answer as an event refused for what it holds is."""

    def as_before(raw: Any, *, rules: EventRules) -> Any:
        raise EventRejected("more than 30 days before sent_at", code=OUT_OF_WINDOW)

    event = pda.event(1, parcel.tracking_no, occurred_at=NOW - dt.timedelta(hours=1))
    monkeypatch.setattr(ingest_module, "validate_event", as_before)
    first = pda.push([event], sent_at=NOW + dt.timedelta(days=40))
    assert first["results"][0]["error"]["code"] == "occurred_at_out_of_range"
    monkeypatch.undo()
    again = pda.push([event, pda.event(2, parcel.tracking_no)])
    assert statuses(again) == ["applied", "applied"]
    assert session.scalars(select(ScanEvent.seq).order_by(ScanEvent.seq)).all() == [1, 2]


def test_a_pda_filling_its_gaps_never_looks_in_the_quarantine(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """Only a seq answered without an event stored can be a rejected event sent again."""
    tn = parcel.tracking_no
    pda.push([pda.event(1, tn), pda.event(4, tn, "out_for_delivery")])
    with statements_sent(session) as sent:
        receipt = pda.push([pda.event(2, tn), pda.event(3, tn)])
    assert statuses(receipt) == ["applied", "applied"]
    assert sent and not [s for s in sent if "quarantined_event" in s]


def test_a_consent_captured_tells_its_parcels_holder_without_reading_the_parcel_again(
    session: Session, world: World, pda: Pda, parcel: Parcel
) -> None:
    """The holder the projection just wrote is the one told (a ``consent`` entry in
    their pull feed): the push sends no statement of its own to find them."""
    tn = parcel.tracking_no
    pda.push([pda.event(1, tn)])
    consent = {"method": "locker", "channel": "in_person"}
    with statements_sent(session) as sent:
        receipt = pda.push([pda.event(2, tn, "consent_captured", consent=consent)])
    assert statuses(receipt) == ["applied"]
    told = session.execute(
        select(FeedChange.courier_id, FeedChange.tracking_no).where(
            FeedChange.kind == FeedKind.CONSENT
        )
    ).all()
    assert told == [(world.courier.id, tn)]
    read_holders = [s for s in sent if " ".join(s.split()).startswith("SELECT parcel.station_id")]
    assert read_holders == []


@pytest.mark.parametrize("split", [False, True], ids=["one push", "two pushes"])
def test_a_resolved_flag_ends_resolved_however_the_later_events_are_batched(
    session: Session, world: World, pda: Pda, parcel: Parcel, split: bool
) -> None:
    """Delivered (seq 2) without a check-out is flagged and a manager resolves it. The
    check-out (seq 1) and a correction voiding it (seq 3) then arrive: in one push
    the cause never goes; in two it goes and comes back on the same delivery, and
    the manager's resolution stands (rule 3), the flag's history showing both."""
    tn = parcel.tracking_no
    check_out = pda.event(1, tn)
    delivered = pda.event(2, tn, "delivered", pod={"photo_sha256": "a" * 64})
    fix = pda.event(
        3, tn, "correction", voids_client_event_id=check_out["client_event_id"], reason="x"
    )
    pda.push([delivered])
    flag = session.scalars(select(Flag).where(Flag.kind == "delivered_not_checked_out")).one()
    resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="seen")
    session.commit()
    later = NOW + dt.timedelta(minutes=1)
    if split:
        pda.push([check_out], received_at=later)
        session.refresh(flag)
        assert flag.status == FlagStatus.CLOSED
        pda.push([fix], received_at=later + dt.timedelta(minutes=1))
    else:
        pda.push([check_out, fix], received_at=later)
    session.refresh(flag)
    assert flag.status == FlagStatus.RESOLVED
    history = [(c.from_status, c.to_status) for c in flag_changes(session=session, flag=flag)]
    assert history[-1] == (
        (FlagStatus.CLOSED, FlagStatus.RESOLVED)
        if split
        else (FlagStatus.OPEN, FlagStatus.RESOLVED)
    )


def test_a_resolved_missing_image_flag_reopens_when_a_new_delivery_lacks_its_image(
    session: Session, world: World, pda: Pda, parcel: Parcel
) -> None:
    """A manager resolves a delivery's missing signature. The delivery is voided and the
    parcel delivered again with another signature, not uploaded either: the manager has
    not seen that one, so the flag opens again (as for every other rule flag)."""
    tn = parcel.tracking_no
    first = pda.event(2, tn, "delivered", pod={"signature_sha256": "a" * 64})
    pda.push([pda.event(1, tn), first])
    flag = session.scalars(select(Flag).where(Flag.kind == "pod_blob_missing")).one()
    resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="phoned them")
    session.commit()
    fix = pda.event(
        3, tn, "correction", voids_client_event_id=first["client_event_id"], reason="mis-tap"
    )
    again = pda.event(4, tn, "delivered", pod={"signature_sha256": "b" * 64})
    pda.push([fix, again], received_at=NOW + dt.timedelta(minutes=5))
    session.refresh(flag)
    assert flag.evidence["blobs"] == ["b" * 64]
    assert flag.status == FlagStatus.OPEN


def test_gaps_are_reported_until_the_missing_events_arrive(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    tn = parcel.tracking_no
    receipt = pda.push(
        [pda.event(1, tn), pda.event(2, tn, "out_for_delivery"), pda.event(5, tn, "delivered")]
    )
    assert receipt["acked_through_seq"] == 2
    assert receipt["missing_seqs"] == [3, 4]
    assert receipt["missing_seq_count"] == 2
    receipt = pda.push([pda.event(4, tn, "exception", reason="damaged")])
    assert (receipt["acked_through_seq"], receipt["missing_seqs"]) == (2, [3])
    receipt = pda.push([pda.event(3, tn, "out_for_delivery")])
    assert (receipt["acked_through_seq"], receipt["missing_seqs"]) == (5, [])
    state = session.get(DeviceSyncState, pda.pusher.device_id)
    assert (state.acked_through_seq, state.max_seq, state.missing_ranges) == (5, 5, [])


def test_missing_seqs_are_capped_with_a_count(pda: Pda, parcel: Parcel) -> None:
    receipt = pda.push([pda.event(1000, parcel.tracking_no)])
    assert receipt["missing_seqs"] == list(range(1, 101))
    assert receipt["missing_seq_count"] == 999


def test_a_skewed_clock_is_measured_corrected_and_flagged(
    session: Session, world: World, parcel: Parcel
) -> None:
    pda = Pda(session, world, skew=dt.timedelta(minutes=4))
    receipt = pda.push([pda.event(1, parcel.tracking_no)])
    assert receipt["clock_offset_ms"] == 240_000
    stored = session.scalars(select(ScanEvent)).one()
    assert stored.occurred_at_device == at(1) + dt.timedelta(minutes=4)
    assert stored.occurred_at == at(1)
    assert stored.received_at == NOW
    flag = session.scalars(select(Flag)).one()
    assert (flag.kind, flag.subject_type, flag.subject_key) == ("clock_skew", "device", "PDA-0001")
    assert flag.evidence["clock_offset_ms"] == 240_000
    assert session.get(DeviceSyncState, "PDA-0001").clock_offset_ms == 240_000


def test_a_small_offset_raises_no_flag(session: Session, world: World, parcel: Parcel) -> None:
    pda = Pda(session, world, skew=dt.timedelta(seconds=90))
    assert pda.push([pda.event(1, parcel.tracking_no)])["flags_raised"] == []
    assert count(session, Flag) == 0


def test_a_late_event_is_placed_by_seq_and_the_status_recomputed(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    tn = parcel.tracking_no
    pda.push([pda.event(3, tn, "delivered")])
    pda.push([pda.event(1, tn), pda.event(2, tn, "out_for_delivery")])
    assert session.get(Parcel, parcel.id).status == ParcelStatus.DELIVERED
    timeline = parcel_timeline(session=session, tracking_no=tn)
    assert [entry.event.seq for entry in timeline] == [1, 2, 3]
    assert [entry.emsevt for entry in timeline] == [None, "EDG", "EMI"]


def test_a_correction_voids_the_event_which_stays_visible(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    tn = parcel.tracking_no
    delivered = pda.event(2, tn, "delivered")
    pda.push([pda.event(1, tn), delivered])
    pda.push(
        [
            pda.event(
                3,
                tn,
                "correction",
                voids_client_event_id=delivered["client_event_id"],
                reason="scanned the wrong parcel",
            )
        ]
    )
    assert session.get(Parcel, parcel.id).status == ParcelStatus.CHECKED_OUT
    timeline = parcel_timeline(session=session, tracking_no=tn)
    assert [(e.event.seq, e.voided_by is not None) for e in timeline] == [
        (1, False),
        (2, True),
        (3, False),
    ]
    assert count(session, ScanEvent) == 3  # append-only: nothing deleted or rewritten


def test_events_for_an_unknown_parcel_are_kept_flagged_and_projected_at_intake(
    session: Session, world: World, pda: Pda
) -> None:
    tn = factories.s10()
    receipt = pda.push([pda.event(1, tn), pda.event(2, tn, "delivered")])
    assert statuses(receipt) == ["applied", "applied"]
    flag = session.scalars(select(Flag)).one()
    assert (flag.kind, flag.subject_key, flag.status) == ("unknown_parcel", tn, FlagStatus.OPEN)
    assert len(flag.evidence["event_ids"]) == 2

    intake_parcels(
        session=session,
        drafts=[(0, ParcelDraft(tn, "express", "R", "1 Road"))],
        rules=IntakeRules(tracking=POLICY, phone_region="CN"),
        scope=IntakeScope(default_station_id=world.station.id, allowed_station_ids=None),
    )
    session.commit()
    parcel = session.scalars(select(Parcel).where(Parcel.tracking_no == tn)).one()
    assert parcel.status == ParcelStatus.DELIVERED
    assert parcel.courier_id == world.courier.id
    assert flag.status == FlagStatus.CLOSED and "taken in" in flag.closed_reason


def _reclassed(session: Session, world: World, numbers: list[str], to: str) -> list[Any]:
    """The parcels taken in again as class ``to`` by the station's manager."""
    return intake_parcels(
        session=session,
        drafts=[(i, ParcelDraft(tn, to, "R", "1 Road")) for i, tn in enumerate(numbers)],
        rules=IntakeRules(tracking=POLICY, phone_region="CN"),
        scope=IntakeScope(default_station_id=world.station.id, allowed_station_ids=None),
        changed_by=world.manager.id,
    )


def test_an_intake_changing_many_parcels_logs_each_in_the_same_statements_as_few(
    session: Session, world: World
) -> None:
    """Each parcel an intake changes gets its ``parcel_updated`` entry, chained at once
    after the flags: taking in 40 changed parcels sends as many statements as 4 (a
    file of thousands stays one pass), and the chain verifies. (The entries' INSERT is
    one statement on PostgreSQL; SQLAlchemy sends SQLite's row by row, in process.)"""
    numbers = [factories.s10() for _ in range(44)]
    for result in _reclassed(session, world, numbers, "express"):
        assert result.status == "created"
    session.commit()
    sent = {}
    for few_or_many in (numbers[:4], numbers[4:]):
        with statements_sent(session) as statements:
            results = _reclassed(session, world, few_or_many, "parcel")
        assert {r.status for r in results} == {"updated"}
        logged = [s for s in statements if s.startswith("INSERT INTO audit_entry")]
        others = len(statements) - len(logged)
        if session.get_bind().dialect.name == "sqlite":
            del logged[1:]  # its INSERTs: one per entry
        sent[len(few_or_many)] = (others, len(logged))
    session.commit()
    assert sent[4] == sent[40], sent
    entries = session.scalars(
        select(AuditEntry).where(AuditEntry.action == "parcel_updated").order_by(AuditEntry.id)
    ).all()
    assert [e.subject_key for e in entries] == numbers
    assert {e.actor_id for e in entries} == {world.manager.id}
    assert audit.verify(session=session).ok


def test_a_poison_event_leaves_no_partial_rows_and_its_siblings_are_stored(
    session: Session, pda: Pda, parcel: Parcel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database refuses one event (seq 0 breaks a CHECK constraint that validation
    would normally catch first): only that event is rejected."""
    poison_id = str(uuid.uuid4())
    validate = ingest_module.validate_event

    def validate_but_let_poison_through(raw: Any, **kwargs: Any) -> Any:
        valid = validate(raw, **kwargs)
        if raw["client_event_id"] == poison_id:
            return dataclasses.replace(valid, seq=0)
        return valid

    monkeypatch.setattr(ingest_module, "validate_event", validate_but_let_poison_through)
    tn = parcel.tracking_no
    receipt = pda.push(
        [
            pda.event(1, tn),
            pda.event(2, tn, "out_for_delivery", client_event_id=poison_id),
            pda.event(3, tn, "delivered"),
        ]
    )
    assert statuses(receipt) == ["applied", "rejected", "applied"]
    assert receipt["results"][1]["error"]["code"] == "unstorable"
    assert sorted(session.scalars(select(ScanEvent.seq))) == [1, 3]
    assert session.scalar(select(QuarantinedEvent.client_event_id)) == poison_id


def test_check_out_assigns_the_parcel_and_a_second_check_out_reassigns_it(
    session: Session, world: World, pda: Pda, parcel: Parcel
) -> None:
    tn = parcel.tracking_no
    pda.push([pda.event(1, tn)])
    other_courier = factories.user(session, "courier2", "courier", world.station)
    other_device = factories.device(session, "PDA-0003", world.station)
    session.commit()
    other = Pda(session, world)
    other.pusher = Pusher(other_device.id, world.station.id, other_courier.id)
    other.push([other.event(1, tn, occurred_at=at(30))])
    assert session.get(Parcel, parcel.id).courier_id == other_courier.id
    feed = session.execute(
        select(FeedChange.courier_id, FeedChange.kind).order_by(FeedChange.id)
    ).all()
    assert feed == [
        (world.courier.id, FeedKind.PARCEL),
        (world.courier.id, FeedKind.PARCEL_REMOVED),
        (other_courier.id, FeedKind.PARCEL),
    ]


def _outcome(session: Session, receipt: dict[str, Any], order: list[int]) -> dict[str, Any]:
    """What a push left, its results put back in the order the events were recorded."""
    results = [None] * len(order)
    for position, result in zip(order, receipt["results"], strict=True):
        results[position] = {k: v for k, v in result.items() if k != "index"}
    flags = session.execute(
        select(Flag.kind, Flag.subject_key, Flag.status, Flag.evidence).order_by(
            Flag.kind, Flag.subject_key
        )
    ).all()
    return {
        "events": sorted(
            session.execute(select(ScanEvent.seq, ScanEvent.client_event_id, ScanEvent.type))
        ),
        "quarantine": sorted(
            session.execute(select(QuarantinedEvent.seq, QuarantinedEvent.error_code))
        ),
        "flags": [tuple(row) for row in flags],
        "results": results,
        "raised": sorted((f["kind"], f["subject_key"]) for f in receipt["flags_raised"]),
        "acked_through_seq": receipt["acked_through_seq"],
        "missing_seqs": receipt["missing_seqs"],
    }


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(order=st.permutations(range(6)))
def test_one_id_sent_at_several_seqs_in_one_push_is_held_at_its_lowest_in_any_order(
    session: Session, pda: Pda, parcel: Parcel, order: list[int]
) -> None:
    """A PDA's bug sends one ``client_event_id`` at two free seqs in one push (its
    record numbered twice, once with other content), or at one seq in two versions, and
    two events at one seq (numbered from 1 again). Rule 3: however the push lists its
    events, the server holds the same ones, an id at its lowest seq, the others rejected
    (``conflicting_duplicate``, ``seq_conflict``) with the same flags; each result
    stays at its event's index."""
    tn = parcel.tracking_no
    first = pda.event(1, tn)
    recorded = [
        first,
        {**first, "seq": 2},  # the same record numbered again
        pda.event(3, tn, "out_for_delivery"),
        {**pda.event(4, tn, "delivered"), "client_event_id": first["client_event_id"]},
        {**first, "occurred_at": at(30).isoformat()},  # another version at its seq
        pda.event(3, tn, "returned_to_station"),  # another event at a seq of this push
    ]
    batch_id = uuid.uuid4()

    def pushed(order: list[int]) -> dict[str, Any]:
        events = [recorded[i] for i in order]
        receipt = pda.push(events, batch_id, commit=False)
        assert [r["index"] for r in receipt["results"]] == list(range(len(events)))
        assert [r["client_event_id"] for r in receipt["results"]] == [
            e["client_event_id"] for e in events
        ]
        outcome = _outcome(session, receipt, order)
        session.rollback()
        return outcome

    in_order = pushed(list(range(len(recorded))))
    held = [(seq, str(event_id)) for seq, event_id, _ in in_order["events"]]
    assert (1, first["client_event_id"]) in held and len(held) == 2
    assert pushed(order) == in_order


def test_a_stored_id_sent_again_with_a_new_seq_is_a_conflicting_duplicate(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """Above the device's highest seq nothing is looked up in advance: the unique index
    refuses the re-used id, and only that event is answered, as a conflicting duplicate."""
    tn = parcel.tracking_no
    original = pda.event(1, tn)
    pda.push([original])
    reused = pda.event(7, tn, "delivered", client_event_id=original["client_event_id"])
    receipt = pda.push(
        [pda.event(2, tn, "out_for_delivery"), reused, pda.event(3, tn, "delivered")]
    )
    assert statuses(receipt) == ["applied", "rejected", "applied"]
    assert receipt["results"][1]["error"]["code"] == "conflicting_duplicate"
    assert sorted(session.scalars(select(ScanEvent.seq))) == [1, 2, 3]
    assert "conflicting_duplicate" in set(session.scalars(select(Flag.kind)))


def test_an_event_pushed_alone_that_the_database_refuses_leaves_the_rest_of_its_push(
    session: Session, pda: Pda, parcel: Parcel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scan pushed on its own is inserted without a savepoint on SQLite, which undoes
    a refused statement by itself: the refusal is answered, the push's other writes
    (the batch's receipt, the device's acknowledgements) are kept, and the next push
    goes on. On PostgreSQL the insert runs in a savepoint."""
    tn = parcel.tracking_no
    original = pda.event(1, tn)
    pda.push([original])
    reused = pda.event(2, tn, "out_for_delivery", client_event_id=original["client_event_id"])
    batch_id = uuid.uuid4()
    receipt = pda.push([reused], batch_id=batch_id)
    assert statuses(receipt) == ["rejected"]
    assert receipt["results"][0]["error"]["code"] == "conflicting_duplicate"
    assert pda.push([reused], batch_id=batch_id) == receipt  # the receipt was stored

    poison_id = str(uuid.uuid4())
    validate = ingest_module.validate_event

    def validate_but_let_poison_through(raw: Any, **kwargs: Any) -> Any:
        valid = validate(raw, **kwargs)
        return dataclasses.replace(valid, seq=0) if raw["client_event_id"] == poison_id else valid

    monkeypatch.setattr(ingest_module, "validate_event", validate_but_let_poison_through)
    with statements_sent(session) as sent:
        receipt = pda.push([pda.event(2, tn, "out_for_delivery", client_event_id=poison_id)])
        assert statuses(receipt) == ["rejected"]
        assert receipt["results"][0]["error"]["code"] == "unstorable"
        receipt = pda.push([pda.event(2, tn, "out_for_delivery")])
        assert statuses(receipt) == ["applied"] and receipt["acked_through_seq"] == 2
    # Each push's own transaction is a savepoint here (the session joins the test's
    # connection so), one per push; on PostgreSQL each lone insert adds its own.
    savepoints = [s for s in sent if s.startswith("SAVEPOINT")]
    assert len(savepoints) == (2 if session.get_bind().dialect.name == "sqlite" else 4)
    assert sorted(session.scalars(select(ScanEvent.seq))) == [1, 2]
    assert session.get(Parcel, parcel.id).status == ParcelStatus.OUT_FOR_DELIVERY
    assert set(session.scalars(select(QuarantinedEvent.client_event_id))) == {
        reused["client_event_id"],
        poison_id,
    }


@pytest.mark.parametrize("correction_first", [False, True])
def test_a_correction_filed_under_another_number_voids_its_target_in_either_order(
    session: Session, world: World, pda: Pda, correction_first: bool
) -> None:
    target_parcel = factories.parcel(session, world.station)
    other_parcel = factories.parcel(session, world.station)
    session.commit()
    delivered = pda.event(2, target_parcel.tracking_no, "delivered")
    correction = pda.event(
        3,
        other_parcel.tracking_no,  # the courier scanned the wrong label for the correction
        "correction",
        voids_client_event_id=delivered["client_event_id"],
        reason="not delivered after all",
    )
    batches = [[pda.event(1, target_parcel.tracking_no), delivered], [correction]]
    for batch in reversed(batches) if correction_first else batches:
        pda.push(batch)
    assert session.get(Parcel, target_parcel.id).status == ParcelStatus.CHECKED_OUT
    timeline = parcel_timeline(session=session, tracking_no=target_parcel.tracking_no)
    assert [(e.event.seq, e.voided_by is not None) for e in timeline] == [
        (1, False),
        (2, True),
        (3, False),
    ]


def test_an_event_dated_after_its_push_was_sent_is_kept_flagged_and_not_in_the_future(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """The PDA's clock was set back between recording and sending (an NTP step on
    reconnect): the event is real, so it is kept, and the jump is flagged."""
    ahead = pda.event(1, parcel.tracking_no, occurred_at=NOW + dt.timedelta(minutes=20))
    receipt = pda.push([ahead])
    assert statuses(receipt) == ["applied"]
    assert [f["kind"] for f in receipt["flags_raised"]] == ["clock_jump"]
    stored = session.scalars(select(ScanEvent)).one()
    assert stored.occurred_at_device == NOW + dt.timedelta(minutes=20)
    assert stored.occurred_at == NOW  # never later than its arrival


def test_events_recorded_before_the_pdas_clock_reset_to_its_factory_date_are_kept(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """The battery died at the end of the afternoon; the PDA comes back in the year 2000
    and pushes the afternoon's scans, recorded on a right clock: decades after its
    push's sent_at. They are kept and the jump flagged (rule 1); the push's clock
    offset says nothing of the clock that recorded them, so they keep the time they
    were recorded at. Sent again once the clock is right, they are duplicates."""
    tn = parcel.tracking_no
    events = [
        pda.event(1, tn, occurred_at=NOW - dt.timedelta(hours=2)),
        pda.event(2, tn, "out_for_delivery", occurred_at=NOW - dt.timedelta(hours=1)),
    ]
    reset = dt.datetime(2000, 1, 1, 0, 5, tzinfo=dt.UTC)
    receipt = pda.push(events, sent_at=reset)
    assert statuses(receipt) == ["applied", "applied"]
    assert sorted(f["kind"] for f in receipt["flags_raised"]) == ["clock_jump", "clock_skew"]
    assert receipt["acked_through_seq"] == 2
    stored = session.scalars(select(ScanEvent).order_by(ScanEvent.seq)).all()
    assert [e.occurred_at for e in stored] == [
        NOW - dt.timedelta(hours=2),
        NOW - dt.timedelta(hours=1),
    ]
    assert statuses(pda.push(events)) == ["duplicate", "duplicate"]
    assert session.get(Parcel, parcel.id).status == ParcelStatus.OUT_FOR_DELIVERY


def test_an_event_at_the_end_of_the_calendar_from_a_pda_at_its_start_is_kept_not_an_overflow(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """Correcting it by the push's offset (two thousand years) passes the end of the
    calendar: it saturates, and the arrival caps it."""
    far = pda.event(1, parcel.tracking_no, occurred_at=dt.datetime(9999, 12, 31, tzinfo=dt.UTC))
    receipt = pda.push([far], sent_at=dt.datetime(1, 1, 1, tzinfo=dt.UTC))
    assert statuses(receipt) == ["applied"]
    assert session.scalars(select(ScanEvent.occurred_at)).one() == NOW


def test_a_copy_sent_twice_in_one_batch_shares_the_fate_of_the_first(
    session: Session, pda: Pda, parcel: Parcel, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison = pda.event(1, parcel.tracking_no)
    validate = ingest_module.validate_event

    def refuse_it_in_the_database(raw: Any, **kwargs: Any) -> Any:
        valid = validate(raw, **kwargs)
        if raw["client_event_id"] == poison["client_event_id"]:
            return dataclasses.replace(valid, seq=0)
        return valid

    monkeypatch.setattr(ingest_module, "validate_event", refuse_it_in_the_database)
    receipt = pda.push([poison, poison])
    assert statuses(receipt) == ["rejected", "rejected"]
    assert {r["error"]["code"] for r in receipt["results"]} == {"unstorable"}
    assert [r["index"] for r in receipt["results"]] == [0, 1]


def test_a_courier_of_another_station_scanning_a_parcel_is_flagged_and_takes_nothing_over(
    session: Session, world: World, pda: Pda, parcel: Parcel
) -> None:
    pda.push([pda.event(1, parcel.tracking_no)])
    stranger = factories.user(session, "courier9", "courier", world.other_station)
    session.commit()
    other = Pda(session, world)
    other.pusher = Pusher(world.other_device.id, world.other_station.id, stranger.id)
    receipt = other.push([other.event(1, parcel.tracking_no, occurred_at=at(20))])
    assert statuses(receipt) == ["applied"]  # what happened is recorded
    assert session.get(Parcel, parcel.id).courier_id == world.courier.id  # not taken over
    flag = session.scalars(select(Flag).where(Flag.kind == "wrong_station")).one()
    assert (flag.subject_key, flag.station_id) == (parcel.tracking_no, world.station.id)


def test_scans_made_before_a_parcel_moved_station_are_no_wrong_stations(
    session: Session, world: World, pda: Pda, parcel: Parcel
) -> None:
    """Checked out and returned at station A, re-routed to B: B's courier's scans raise
    no wrong_station over A's; a scan by A's courier after the move does."""
    tn = parcel.tracking_no
    pda.push([pda.event(1, tn, occurred_at=at(0)), pda.event(2, tn, "returned_to_station")])
    _move(session, world, parcel, world.other_station, when=at(30))
    courier_b = factories.user(session, "courier9", "courier", world.other_station)
    session.commit()
    pda_b = Pda(session, world)
    pda_b.pusher = Pusher(world.other_device.id, world.other_station.id, courier_b.id)
    pda_b.push([pda_b.event(1, tn, occurred_at=at(60))])
    assert session.get(Parcel, parcel.id).courier_id == courier_b.id
    assert session.scalars(select(Flag).where(Flag.kind == "wrong_station")).all() == []

    pda.push([pda.event(3, tn, occurred_at=at(90))])  # A's courier, after the move
    late = session.scalar(
        select(ScanEvent.id).where(ScanEvent.device_id == world.device.id, ScanEvent.seq == 3)
    )
    flag = session.scalars(select(Flag).where(Flag.kind == "wrong_station")).one()
    assert (flag.station_id, flag.evidence["event_ids"]) == (world.other_station.id, [late])


def test_a_scan_by_another_station_while_the_parcel_was_here_is_flagged_after_it_came_back(
    session: Session, world: World, pda: Pda, parcel: Parcel
) -> None:
    """Station B's courier scanned A's parcel (offline) while it was at A. The parcel was
    then mis-routed to B and routed back to A. When B's PDA pushes that scan, it is a
    scan by the wrong station made while the parcel was at A: A's manager must see it
    (as it was before moves were kept), not lose it as 'history at its old station'."""
    tn = parcel.tracking_no
    pda.push([pda.event(1, tn, occurred_at=at(0))])
    _move(session, world, parcel, world.other_station, when=at(30))
    _move(session, world, parcel, world.station, when=at(60))
    courier_b = factories.user(session, "courier9", "courier", world.other_station)
    session.commit()
    pda_b = Pda(session, world)
    pda_b.pusher = Pusher(world.other_device.id, world.other_station.id, courier_b.id)
    pda_b.push([pda_b.event(1, tn, "out_for_delivery", occurred_at=at(10))])  # while at A
    scan_b = session.scalar(
        select(ScanEvent.id).where(ScanEvent.device_id == world.other_device.id)
    )
    flags = session.scalars(select(Flag).where(Flag.kind == "wrong_station")).all()
    assert [(f.station_id, f.evidence["event_ids"]) for f in flags] == [
        (world.station.id, [scan_b])
    ]


def test_a_consent_captured_by_a_courier_of_another_station_is_the_parcels_stations(
    session: Session, world: World, parcel: Parcel
) -> None:
    """Its manager lists the consents that authorize its parcels' drops; a parcel not
    taken in has no station but the PDA's."""
    stranger = factories.user(session, "courier9", "courier", world.other_station)
    session.commit()
    other = Pda(session, world)
    other.pusher = Pusher(world.other_device.id, world.other_station.id, stranger.id)
    consent = {"consent": {"method": "locker", "channel": "in_person"}}
    unknown = factories.s10()  # not taken in
    other.push(
        [
            other.event(1, parcel.tracking_no, "consent_captured", **consent),
            other.event(2, unknown, "consent_captured", **consent),
        ]
    )
    stations = dict(session.execute(select(Consent.tracking_no, Consent.station_id)).all())
    assert stations == {parcel.tracking_no: world.station.id, unknown: world.other_station.id}


def locker_drop(pda: Pda, seq: int, tn: str, when: dt.datetime) -> dict[str, Any]:
    return pda.event(
        seq,
        tn,
        "delivered_to_locker",
        occurred_at=when,
        locker_id="L-1",
        compartment="1",
        pod={"pickup_code": "1111"},
    )


def consent_in_person(pda: Pda, seq: int, tn: str, when: dt.datetime) -> dict[str, Any]:
    """A consent captured on the PDA, for a locker drop."""
    return pda.event(
        seq,
        tn,
        "consent_captured",
        occurred_at=when,
        consent={"method": "locker", "channel": "in_person"},
    )


@pytest.mark.parametrize("consent_first", [False, True])
def test_a_consent_captured_after_the_drop_but_stamped_before_is_a_time_inversion(
    session: Session, pda: Pda, parcel: Parcel, consent_first: bool
) -> None:
    """The courier drops the parcel (seq 2, 14:00), then records a consent (seq 3) that
    claims 13:50: the backdated consent. Flagged whichever arrives first, and the drop
    stays unauthorized."""
    tn = parcel.tracking_no
    drop = locker_drop(pda, 2, tn, at(60))
    backdated = consent_in_person(pda, 3, tn, at(50))
    batches = [[pda.event(1, tn, occurred_at=at(10)), drop], [backdated]]
    for batch in reversed(batches) if consent_first else batches:
        pda.push(batch)
    kinds = set(session.scalars(select(Flag.kind).where(Flag.subject_key == tn)))
    assert {"time_inversion", "consent_after_drop"} <= kinds
    inversion = session.scalars(select(Flag).where(Flag.kind == "time_inversion")).one()
    assert inversion.evidence == {"device_seqs": ["PDA-0001#2", "PDA-0001#3"]}


@pytest.mark.parametrize(
    "order", ["in one push", "consent first", "rejected one last"], ids=lambda o: o
)
def test_a_rejected_event_between_the_drop_and_the_backdated_consent_hides_nothing(
    session: Session, pda: Pda, parcel: Parcel, order: str
) -> None:
    """A malformed event slipped in between (seq 3, quarantined) holds no time: the
    consent (seq 4) stamped before the drop (seq 2) it followed is still a time
    inversion, whichever of the three arrives last."""
    tn = parcel.tracking_no
    first = pda.event(1, tn, occurred_at=at(10))
    drop = locker_drop(pda, 2, tn, at(60))
    malformed = pda.event(3, tn, "no_such_type", occurred_at=at(61))
    backdated = consent_in_person(pda, 4, tn, at(50))
    batches = {
        "in one push": [[first, drop, malformed, backdated]],
        "consent first": [[backdated], [malformed], [first, drop]],
        "rejected one last": [[first, drop], [backdated], [malformed]],
    }[order]
    for batch in batches:
        pda.push(batch)
    assert count(session, QuarantinedEvent) == 1
    kinds = set(session.scalars(select(Flag.kind).where(Flag.subject_key == tn)))
    assert {"time_inversion", "consent_after_drop"} <= kinds
    inversion = session.scalars(select(Flag).where(Flag.kind == "time_inversion")).one()
    assert inversion.evidence["device_seqs"] == ["PDA-0001#2", "PDA-0001#4"]


@pytest.mark.parametrize(
    ("pushed_after", "flagged"),
    [(dt.timedelta(minutes=30), set()), (dt.timedelta(hours=3), {"consent_after_drop"})],
    ids=["pushed soon", "pushed hours later"],
)
def test_a_consent_captured_on_another_pda_is_only_its_clocks_word(
    session: Session,
    world: World,
    pda: Pda,
    parcel: Parcel,
    pushed_after: dt.timedelta,
    flagged: set[str],
) -> None:
    """The courier drops the parcel (10:00) and, hours later, records a consent on a
    spare PDA whose clock was set back to 09:50 for it and put right before its push:
    no seq orders it against the drop, and the push measures no offset. Like a
    channel's, its time counts only if it reached the server within the grace."""
    tn = parcel.tracking_no
    drop_at = at(60)
    pda.push([pda.event(1, tn, occurred_at=at(10)), locker_drop(pda, 2, tn, drop_at)])
    spare = Pda(session, world)
    spare.pusher = Pusher(
        factories.device(session, "PDA-0003", world.station).id,
        world.station.id,
        world.courier.id,
    )
    session.commit()
    spare.push([consent_in_person(spare, 1, tn, at(50))], received_at=drop_at + pushed_after)
    active = select(Flag.kind).where(Flag.subject_key == tn, Flag.status != FlagStatus.CLOSED)
    assert set(session.scalars(active)) == flagged


@pytest.mark.parametrize("consent_first", [True, False], ids=["consent first", "drop first"])
def test_a_consent_captured_on_another_stations_pda_authorizes_no_drop_here(
    session: Session, world: World, pda: Pda, parcel: Parcel, consent_first: bool
) -> None:
    """SECURITY.md threat 2: a courier of ST2 records on ST2's PDA an in-person consent
    (at 50) for ST1's parcel, knowing only its number; ST1's courier drops it at 60
    without asking anyone. Whichever push arrives first, both within the grace, the drop
    is ST1's ``unauthorized_locker_drop``, its evidence naming the consent."""
    tn = parcel.tracking_no
    stranger = Pda(session, world)
    courier2 = factories.user(session, "courier2", "courier", world.other_station)
    stranger.pusher = Pusher(world.other_device.id, world.other_station.id, courier2.id)
    session.commit()
    pushes = [
        lambda: stranger.push([consent_in_person(stranger, 1, tn, at(50))], received_at=at(61)),
        lambda: pda.push(
            [pda.event(1, tn, occurred_at=at(10)), locker_drop(pda, 2, tn, at(60))],
            received_at=at(61),
        ),
    ]
    for push in pushes if consent_first else reversed(pushes):
        push()
    consent = session.scalars(select(Consent)).one()
    flag = session.scalars(select(Flag).where(Flag.kind == "unauthorized_locker_drop")).one()
    assert (flag.subject_key, flag.station_id, flag.status) == (
        tn,
        world.station.id,
        FlagStatus.OPEN,
    )
    assert flag.evidence["captured_at_other_station"] == [consent.id]


def test_a_reused_id_answered_with_a_rejection_does_not_make_neighbours_of_its_own_seqs(
    session: Session, pda: Pda, world: World
) -> None:
    """Seq 2 comes again with other content (conflicting_duplicate): it is stored, so
    seqs 1 and 3 are not neighbours, and only the pair 1-2 is inverted."""
    x, y, z = (factories.parcel(session, world.station).tracking_no for _ in range(3))
    session.commit()
    second = pda.event(2, y, occurred_at=at(50))
    pda.push([pda.event(1, x, occurred_at=at(60)), second, pda.event(3, z, occurred_at=at(55))])
    receipt = pda.push([{**second, "type": "out_for_delivery"}])
    assert receipt["results"][0]["error"]["code"] == "conflicting_duplicate"
    flags = session.scalars(select(Flag).where(Flag.kind == "time_inversion")).all()
    assert [(f.subject_key, f.evidence["device_seqs"]) for f in flags] == [
        (y, ["PDA-0001#1", "PDA-0001#2"])
    ]


def test_a_push_asks_its_session_for_the_connection_once(
    session: Session, pda: Pda, parcel: Parcel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every statement of a one-scan push, the device state's update too, runs on the
    connection kept with its transaction (``sync.sql.flushed_connection``): the session
    is asked for it once, when the push begins, not again in the writers' turn."""
    pda.push([pda.event(1, parcel.tracking_no)])
    asked: list[Session] = []
    connection = Session.connection

    def asking(self: Session, *args: Any, **kwargs: Any) -> Any:
        asked.append(self)
        return connection(self, *args, **kwargs)

    monkeypatch.setattr(Session, "connection", asking)
    receipt = pda.push([pda.event(2, parcel.tracking_no, "out_for_delivery")], commit=False)
    assert statuses(receipt) == ["applied"]
    assert asked == [session]


def test_a_pda_sending_only_malformed_scans_costs_the_same_statements_every_push(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """Each rejected seq between a push and the last stored event is skipped in one
    search, not read one by one: the 50th malformed push costs what the 5th did."""
    pda.push([pda.event(1, parcel.tracking_no)])
    counts = []
    for seq in range(2, 52):
        with statements_sent(session) as sent:
            receipt = pda.push([pda.event(seq, parcel.tracking_no, "no_such_type")])
        assert statuses(receipt) == ["rejected"]
        counts.append(len(sent))
    assert counts[-1] == counts[4]


@pytest.mark.parametrize("between", [False, True], ids=["next scan", "after a rejected one"])
def test_an_online_pdas_next_scan_is_compared_with_the_one_before_read_with_its_lock(
    session: Session, pda: Pda, parcel: Parcel, between: bool
) -> None:
    """The event at the device's highest seq comes with its sync state
    (``lock_device_state``): a scan pushed alone after it is judged without looking it
    up; one after a rejected seq looks it up and finds none, then the one past the gap."""
    tn = parcel.tracking_no
    pda.push([pda.event(1, tn, occurred_at=at(60))])
    if between:
        pda.push([pda.event(2, tn, "no_such_type", occurred_at=at(61))])
    with statements_sent(session) as sent:
        pda.push([pda.event(3 if between else 2, tn, "out_for_delivery", occurred_at=at(50))])
    looked_up = [
        s
        for s in (" ".join(statement.split()) for statement in sent)
        if s.startswith("SELECT scan_event.seq, scan_event.occurred_at")
    ]
    assert len(looked_up) == (2 if between else 0)  # seq 2, then the search below it
    inversion = session.scalars(select(Flag).where(Flag.kind == "time_inversion")).one()
    assert inversion.evidence["device_seqs"] == ["PDA-0001#1", f"PDA-0001#{3 if between else 2}"]


def test_a_delivery_of_a_parcel_never_asked_about_reads_its_requests_once(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """A push bringing a delivery asks whether the parcel has a consent request a
    hand-over may end (``REQUESTS_A_HAND_OVER_MAY_END``) and, none, goes no further: the
    query cancelling them (joined to the parcel, locking) is neither built nor run. On
    PostgreSQL the pending requests are found first (``lock_requests_to_end``), one select;
    none, none locked."""
    tn = parcel.tracking_no
    pda.push([pda.event(1, tn), pda.event(2, tn, "out_for_delivery")])
    with statements_sent(session) as sent:
        receipt = pda.push([pda.event(3, tn, "delivered", pod={"recipient_name": "Ann"})])
    assert statuses(receipt) == ["applied"]
    assert session.scalar(select(Parcel.status).where(Parcel.id == parcel.id)) == "delivered"
    requests_read = [" ".join(s.split()) for s in sent if "FROM consent_request" in s]
    postgresql = session.get_bind().dialect.name == "postgresql"
    assert len(requests_read) == (2 if postgresql else 1)
    assert not [s for s in requests_read if "JOIN parcel" in s]
    assert requests_read[-1].startswith("SELECT consent_request.id FROM consent_request")


def test_an_event_not_yet_arrived_between_two_leaves_them_unjudged(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """Seq 3 is still on the PDA: whether 2 and 4 are neighbours is not known yet, and
    the pair that is inverted is judged when 3 comes (here: 3 and 4)."""
    tn = parcel.tracking_no
    pda.push([pda.event(1, tn, occurred_at=at(10)), pda.event(2, tn, occurred_at=at(60))])
    pda.push([pda.event(4, tn, "out_for_delivery", occurred_at=at(50))])
    assert "time_inversion" not in set(session.scalars(select(Flag.kind)))
    pda.push([pda.event(3, tn, "out_for_delivery", occurred_at=at(70))])
    inversion = session.scalars(select(Flag).where(Flag.kind == "time_inversion")).one()
    assert inversion.evidence["device_seqs"] == ["PDA-0001#3", "PDA-0001#4"]


def mistyped(tracking_no: str) -> str:
    """``tracking_no`` with its check digit wrong: refused ``invalid_check_digit``."""
    return tracking_no[:10] + str((int(tracking_no[10]) + 1) % 10) + tracking_no[11:]


# Three scans of a PDA, seq 2 mistyped at first (rejected, then retyped and sent again
# under its id and seq), as (parcel, PDA time) by seq, and the time_inversion flags the
# three give taken in seq order: {parcel: its flag's seqs}.
GAP_FILLED = {
    # Seq 2 is another parcel's, dated before seq 1: that pair is the inversion, and
    # seq 3, dated between them, follows seq 2 in order.
    "another parcel's pair": (
        [("P", at(30)), ("Q", at(10)), ("P", at(20))],
        {"Q": ["#1", "#2"]},
    ),
    # One parcel: its flag names seqs 1 and 2; seq 3, named with seq 1 while seq 2 was
    # rejected, is taken out of it, and the flag stands.
    "the same parcel's pair": (
        [("P", at(30)), ("P", at(10)), ("P", at(20))],
        {"P": ["#1", "#2"]},
    ),
    # NTP stepped the clock back 1.5 s twice: within the tolerance each time, beyond it
    # over the two.
    "two clock steps within the tolerance": (
        [
            ("P", at(30)),
            ("P", at(30) - dt.timedelta(seconds=1.5)),
            ("P", at(30) - dt.timedelta(seconds=3)),
        ],
        {},
    ),
}


@pytest.mark.parametrize("scenario", list(GAP_FILLED))
@pytest.mark.parametrize(
    "order",
    [
        "in order, corrected from the start",
        "corrected last",
        "corrected first",
        "corrected between its neighbours",
        "never rejected, pushed last",
    ],
)
def test_a_pair_across_a_gap_filled_later_is_judged_again(
    session: Session, pda: Pda, world: World, scenario: str, order: str
) -> None:
    """Rule 6 judges seq-neighbours among the events the server holds, and rule 3 wants
    the same flags whatever the order. Seq 2 is rejected at first (its tracking number
    mistyped) and sent again corrected: while it was rejected, seqs 1 and 3 were
    neighbours, and their pair flagged if inverted. Once seq 2 is stored, the pairs are
    1-2 and 2-3: the flag raised for 1-3 is closed by the system (or the pair's seqs
    withdrawn from a parcel's flag that still cites others), whichever of the three
    arrived last, as if seq 2 had been sent corrected from the start. A seq still on
    the PDA (never rejected) leaves 1-3 unjudged until it comes."""
    scans, expected = GAP_FILLED[scenario]
    parcels = {name: factories.parcel(session, world.station).tracking_no for name in "PQ"}
    session.commit()
    first, second, third = (
        pda.event(seq, parcels[name], "out_for_delivery", occurred_at=when)
        for seq, (name, when) in enumerate(scans, start=1)
    )
    rejected = {**second, "tracking_no": mistyped(second["tracking_no"])}
    pushes = {
        "in order, corrected from the start": [[first, second, third]],
        "corrected last": [[first, rejected, third], [second]],
        "corrected first": [[rejected], [second], [first, third]],
        "corrected between its neighbours": [[first, rejected], [second], [third]],
        "never rejected, pushed last": [[first, third], [second]],
    }[order]
    for push in pushes:
        receipt = pda.push(push)
        assert "applied" in statuses(receipt) or push == [rejected]
    assert count(session, ScanEvent) == 3
    standing = session.scalars(
        select(Flag).where(Flag.kind == "time_inversion", Flag.status != FlagStatus.CLOSED)
    ).all()
    named = {tn: name for name, tn in parcels.items()}
    assert {
        named[flag.subject_key]: [
            s.removeprefix(world.device.id) for s in flag.evidence["device_seqs"]
        ]
        for flag in standing
    } == expected
    closed = session.scalars(
        select(Flag).where(Flag.kind == "time_inversion", Flag.status == FlagStatus.CLOSED)
    ).all()
    assert all("no longer an inverted pair" in (flag.closed_reason or "") for flag in closed)
    assert bool(closed) == (order == "corrected last" and "P" not in expected)


def test_a_written_off_seq_that_comes_after_all_splits_the_pair_judged_across_it(
    session: Session, pda: Pda, world: World, parcel: Parcel
) -> None:
    """A manager writes seq 2 off as lost; seq 3 arrives, dated 3 s before seq 1 (NTP
    stepped the clock back twice): the pair 1-3 is judged across the written-off seq
    and flagged. Seq 2 comes after all, dated between them: the pairs 1-2 and 2-3 are
    within the tolerance, and the flag is closed, as if the PDA had sent the three in
    order."""
    tn = parcel.tracking_no
    pda.push([pda.event(1, tn, occurred_at=at(30)), pda.event(4, tn, occurred_at=at(40))])
    write_off_lost_seqs(
        session=session,
        device=world.device,
        ranges=[[2, 2]],
        reason="lost in a reset",
        user_id=world.manager.id,
    )
    session.commit()
    step = dt.timedelta(seconds=1.5)
    pda.push([pda.event(3, tn, "out_for_delivery", occurred_at=at(30) - 2 * step)])
    flag = session.scalars(select(Flag).where(Flag.kind == "time_inversion")).one()
    assert (flag.status, flag.evidence["device_seqs"]) == (
        FlagStatus.OPEN,
        ["PDA-0001#1", "PDA-0001#3"],
    )
    pda.push([pda.event(2, tn, "out_for_delivery", occurred_at=at(30) - step)])
    assert (flag.status, flag.evidence["device_seqs"]) == (FlagStatus.CLOSED, [])


@pytest.mark.parametrize("order", ["seq 4 last", "seq 4 first"])
def test_a_resolved_time_inversion_stands_on_the_seqs_decided_whatever_the_order(
    session: Session, pda: Pda, world: World, order: str
) -> None:
    """Parcel P's flag names the pairs 1-3 and 5-7, each judged across a rejected seq (2
    and 6, another parcel's scans mistyped), seq 4 still on the PDA; the manager
    resolves it. Seqs 2 and 6 sent again corrected split both pairs (their events in
    order with P's), and seq 4, rejected, makes 3 and 5 neighbours, an inverted pair.
    Whether 4 comes first or last, P's flag ends naming 3-5, seqs the manager decided
    on, and resolved, as a rule flag is while its cause stands only on what the
    manager saw (``judged_status``): closed when 2 and 6 had taken every seq out of it,
    and raised again by seq 4 on seqs the decision covered, it was opened again."""
    p, q = (factories.parcel(session, world.station).tracking_no for _ in range(2))
    session.commit()
    times = {1: (p, 30), 2: (q, 20), 3: (p, 20), 4: (p, 15), 5: (p, 10), 6: (q, 0), 7: (p, 0)}
    scans = {
        seq: pda.event(seq, tn, "out_for_delivery", occurred_at=at(minutes))
        for seq, (tn, minutes) in times.items()
    }
    wrong = {
        seq: {**scans[seq], "tracking_no": mistyped(scans[seq]["tracking_no"])}
        for seq in (2, 4, 6)
    }
    pda.push([scans[1], wrong[2], scans[3], scans[5], wrong[6], scans[7]])
    flag = session.scalars(
        select(Flag).where(Flag.kind == "time_inversion", Flag.subject_key == p)
    ).one()
    assert flag.evidence["device_seqs"] == [f"PDA-0001#{s}" for s in (1, 3, 5, 7)]
    resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="checked")
    session.commit()
    later = [[scans[2]], [scans[6]]]
    if order == "seq 4 last":
        for push in later:
            pda.push(push)
        session.refresh(flag)
        assert (flag.status, flag.evidence["device_seqs"]) == (FlagStatus.CLOSED, [])
        entry = session.scalars(
            select(AuditEntry).where(
                AuditEntry.action == "flag_status_changed", AuditEntry.subject_key == str(flag.id)
            )
        ).one()
        assert (entry.details["from_status"], entry.details["to_status"]) == ("resolved", "closed")
        pda.push([wrong[4]])
    else:
        for push in [[wrong[4]], *later]:
            pda.push(push)
    session.refresh(flag)
    assert (flag.status, flag.evidence["device_seqs"]) == (
        FlagStatus.RESOLVED,
        ["PDA-0001#3", "PDA-0001#5"],
    )


@pytest.mark.parametrize("seq_4", ["rejected, then sent again corrected", "right at once"])
def test_a_resolved_time_inversion_reopened_by_a_pair_split_since_is_resolved_again(
    session: Session, pda: Pda, world: World, seq_4: str
) -> None:
    """Parcel P's flag names the pair 1-2 (seq 2 dated ten minutes before seq 1), and
    the manager resolves it. Seqs 3 to 5 are P's scans on a clock NTP stepped back 1.5 s
    twice: no inversion in order. Seq 4 mistyped at first, rejected, made 3 and 5
    neighbours, 3 s apart, an inverted pair beyond what the manager saw, and opened the
    flag again; seq 4 sent again corrected splits it, and the flag names 1-2 again, only
    what the manager resolved: resolved, as when seq 4 came right at once and the flag
    never moved (rule 3; ``judged_status``), not left open for a decision already
    taken."""
    p = factories.parcel(session, world.station).tracking_no
    session.commit()
    step = dt.timedelta(seconds=1.5)
    pda.push(
        [
            pda.event(1, p, "out_for_delivery", occurred_at=at(30)),
            pda.event(2, p, "out_for_delivery", occurred_at=at(20)),
        ]
    )
    flag = session.scalars(
        select(Flag).where(Flag.kind == "time_inversion", Flag.subject_key == p)
    ).one()
    resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="checked")
    session.commit()
    scans = {
        seq: pda.event(seq, p, "out_for_delivery", occurred_at=at(40) - (seq - 3) * step)
        for seq in (3, 4, 5)
    }
    if seq_4 == "right at once":
        pda.push(list(scans.values()))
    else:
        wrong = {**scans[4], "tracking_no": mistyped(p)}
        pda.push([scans[3], wrong, scans[5]])
        session.refresh(flag)
        assert (flag.status, flag.evidence["device_seqs"]) == (
            FlagStatus.OPEN,
            [f"PDA-0001#{s}" for s in (1, 2, 3, 5)],
        )
        pda.push([scans[4]])
    session.refresh(flag)
    assert (flag.status, flag.evidence["device_seqs"]) == (
        FlagStatus.RESOLVED,
        ["PDA-0001#1", "PDA-0001#2"],
    )


@pytest.mark.parametrize("written_off", ["before its neighbours", "between", "after both"])
@pytest.mark.parametrize("lost", [[[2, 2]], [[2, 3]]])
def test_a_pair_across_written_off_seqs_is_judged_whenever_the_write_off_comes(
    session: Session, pda: Pda, world: World, parcel: Parcel, written_off: str, lost: list
) -> None:
    """The PDA lost seq 2 (or 2 and 3) in a reset, and a manager writes them off. Seq 1
    and the next seq after them are neighbours for good, the later dated ten minutes
    before the earlier (a consent backdated past the drop it followed): flagged
    time_inversion, naming the two, whether the write-off came before either arrived,
    between them, or after both (rule 3: it was judged only when a push completed the
    pair). The seq after, dated after both, makes no other pair."""
    tn = parcel.tracking_no
    after = lost[0][1] + 1
    first = [pda.event(1, tn, occurred_at=at(30))]
    rest = [
        pda.event(after, tn, "out_for_delivery", occurred_at=at(20)),
        pda.event(after + 1, tn, "out_for_delivery", occurred_at=at(40)),
    ]

    def write_off() -> None:
        write_off_lost_seqs(
            session=session,
            device=world.device,
            ranges=lost,
            reason="lost in a reset",
            user_id=world.manager.id,
        )
        session.commit()

    if written_off == "before its neighbours":
        pda.push([pda.event(9, tn, "out_for_delivery", occurred_at=at(50))])
        write_off()
        pda.push(first)
        pda.push(rest)
    elif written_off == "between":
        pda.push(first + [pda.event(9, tn, "out_for_delivery", occurred_at=at(50))])
        write_off()
        pda.push(rest)
    else:
        pda.push(first + rest + [pda.event(9, tn, "out_for_delivery", occurred_at=at(50))])
        assert "time_inversion" not in set(session.scalars(select(Flag.kind)))
        write_off()
    flag = session.scalars(select(Flag).where(Flag.kind == "time_inversion")).one()
    assert (flag.status, flag.evidence["device_seqs"], flag.station_id) == (
        FlagStatus.OPEN,
        ["PDA-0001#1", f"PDA-0001#{after}"],
        world.station.id,
    )


def test_a_write_off_after_the_pda_moved_raises_at_the_station_its_events_were_pushed_at(
    session: Session, pda: Pda, world: World, parcel: Parcel
) -> None:
    """PDA-0001's courier at ST1 pushed seqs 1-3 and 5-9 of one parcel: 2 and 3 an
    inverted pair (flagged at ST1 by the push), seq 4 lost. The PDA moved to ST2, and
    seq 4 is written off: seqs 3 and 5, pushed at ST1 too, are an inverted pair. The
    write-off raised it at the PDA's station now, ST2: a second time_inversion flag of
    the parcel, on ST2's board, about ST1's shift. It goes to ST1's flag, as a push
    storing seq 5 after the write-off would have raised it."""
    tn = parcel.tracking_no
    pda.push(
        [
            pda.event(1, tn, occurred_at=at(10)),
            pda.event(2, tn, "out_for_delivery", occurred_at=at(30)),
            pda.event(3, tn, "out_for_delivery", occurred_at=at(20)),
            pda.event(5, tn, "out_for_delivery", occurred_at=at(5)),
            pda.event(6, tn, "out_for_delivery", occurred_at=at(50)),
        ]
    )
    world.device.station_id = world.other_station.id
    session.commit()
    write_off_lost_seqs(
        session=session,
        device=world.device,
        ranges=[[4, 4]],
        reason="lost in a reset",
        user_id=world.admin.id,
    )
    session.commit()
    flags = session.scalars(select(Flag).where(Flag.kind == "time_inversion")).all()
    assert [(f.station_id, f.evidence["device_seqs"]) for f in flags] == [
        (world.station.id, [f"PDA-0001#{s}" for s in (2, 3, 5)])
    ]


def test_a_pair_completed_after_the_pda_moved_is_the_station_of_its_later_event(
    session: Session, pda: Pda, world: World, parcel: Parcel
) -> None:
    """At ST1 the PDA pushed seqs 1 and 3 of a parcel, seq 3 dated before seq 2, still
    on the PDA. It moved to ST2, whose courier pushed seq 2 from it: the pair (2, 3) was
    flagged at ST2, the pushing courier's station, though seq 2 pushed at ST1 first
    would have had it flagged at ST1 (rule 3: the order of arrival decided the board).
    The pair is its later event's station's, ST1, whichever arrives last."""
    tn = parcel.tracking_no
    pda.push([pda.event(1, tn, occurred_at=at(10)), pda.event(3, tn, occurred_at=at(50))])
    world.device.station_id = world.other_station.id
    courier = factories.user(session, "courier2", "courier", world.other_station)
    session.commit()
    moved = Pda(session, world)
    moved.pusher = Pusher(world.device.id, world.other_station.id, courier.id)
    moved.push([moved.event(2, tn, "out_for_delivery", occurred_at=at(60))])
    flags = session.scalars(select(Flag).where(Flag.kind == "time_inversion")).all()
    assert [(f.station_id, f.evidence["device_seqs"]) for f in flags] == [
        (world.station.id, ["PDA-0001#2", "PDA-0001#3"])
    ]


@pytest.mark.parametrize("order", ["in order", "seq 3 rejected at ST1, corrected at ST2"])
def test_a_pair_split_after_the_pda_moved_leaves_each_station_its_own_pairs(
    session: Session, pda: Pda, world: World, parcel: Parcel, order: str
) -> None:
    """At ST1 the PDA pushed seqs 1 and 2 of a parcel, 2 dated before 1: ST1's flag
    names 1-2. Seq 3 was rejected there (mistyped). The PDA moved to ST2, whose courier
    pushed seq 4, dated before 2: 2-4, across the rejected 3, on ST2's flag. Seq 3 sent
    again corrected splits 2-4 into 2-3 (in order) and 3-4 (inverted). Seq 2 still
    stood in ST1's pair 1-2, so it was left on ST2's flag too: ST2 read 2, 3, 4, where
    the same events sent in order (3 and 4 from ST2) give ST2 3-4 alone (rule 3). A
    split pair's seqs stay on a station's flag only for a pair of that station."""
    tn = parcel.tracking_no
    first = pda.event(1, tn, occurred_at=at(50))
    second = pda.event(2, tn, "out_for_delivery", occurred_at=at(40))
    third = pda.event(3, tn, "out_for_delivery", occurred_at=at(45))
    fourth = pda.event(4, tn, "out_for_delivery", occurred_at=at(30))
    rejected = {**third, "tracking_no": mistyped(tn)}
    pda.push([first, second] if order == "in order" else [first, second, rejected])
    world.device.station_id = world.other_station.id
    courier = factories.user(session, "courier2", "courier", world.other_station)
    session.commit()
    moved = Pda(session, world)
    moved.pusher = Pusher(world.device.id, world.other_station.id, courier.id)
    for push in [[third, fourth]] if order == "in order" else [[fourth], [third]]:
        assert "applied" in statuses(moved.push(push))
    flags = session.scalars(
        select(Flag)
        .where(Flag.kind == "time_inversion", Flag.status != FlagStatus.CLOSED)
        .order_by(Flag.station_id)
    ).all()
    assert [(f.station_id, f.evidence["device_seqs"]) for f in flags] == [
        (world.station.id, ["PDA-0001#1", "PDA-0001#2"]),
        (world.other_station.id, ["PDA-0001#3", "PDA-0001#4"]),
    ]


def test_a_consent_captured_after_the_drop_and_stamped_after_is_no_time_inversion(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """The clean twin: recorded after the drop, dated after it: consent_after_drop (it
    came too late) but nothing backdated."""
    tn = parcel.tracking_no
    drop = locker_drop(pda, 2, tn, at(60))
    late = consent_in_person(pda, 3, tn, at(70))
    pda.push([pda.event(1, tn, occurred_at=at(10)), drop, late])
    kinds = set(session.scalars(select(Flag.kind).where(Flag.subject_key == tn)))
    assert kinds == {"consent_after_drop"}


@pytest.mark.parametrize(
    ("stepped_back", "inverted"),
    [(dt.timedelta(seconds=2), False), (dt.timedelta(seconds=2.5), True)],
    ids=["within the tolerance", "beyond it"],
)
def test_a_clock_stepped_back_by_ntp_within_the_tolerance_is_no_time_inversion(
    session: Session, pda: Pda, parcel: Parcel, stepped_back: dt.timedelta, inverted: bool
) -> None:
    """The courier scans the parcel out for delivery; NTP steps the PDA's clock back two
    seconds; the failed attempt recorded a second later is dated a second before the
    scan. A clock step of the tolerance (2 s by default) is no backdating: a manager
    would get a time_inversion warning for every NTP correction between two scans at
    the door. A step beyond it is flagged as ever."""
    tn = parcel.tracking_no
    scan = at(30)
    pda.push(
        [
            pda.event(1, tn, occurred_at=at(10)),
            pda.event(2, tn, "out_for_delivery", occurred_at=scan),
            pda.event(
                3,
                tn,
                "delivery_attempt_failed",
                occurred_at=scan - stepped_back,
                reason="recipient_absent",
                action="retry_planned",
            ),
        ]
    )
    kinds = set(session.scalars(select(Flag.kind).where(Flag.subject_key == tn)))
    assert ("time_inversion" in kinds) is inverted


def test_a_consent_stamped_within_the_tolerance_before_the_drop_it_followed_stays_late(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """Rule 6's intent under the tolerance: the consent recorded after the drop (seq 3)
    but dated a second before it raises no time_inversion, yet authorizes nothing: a
    consent captured on the drop's own PDA is judged by seq, so the drop is
    consent_after_drop, whichever push arrives first."""
    tn = parcel.tracking_no
    drop = locker_drop(pda, 2, tn, at(60))
    late = consent_in_person(pda, 3, tn, at(60) - dt.timedelta(seconds=1))
    pda.push([late])
    pda.push([pda.event(1, tn, occurred_at=at(10)), drop])
    kinds = set(session.scalars(select(Flag.kind).where(Flag.subject_key == tn)))
    assert kinds == {"consent_after_drop"}


@pytest.mark.parametrize(("fast_by", "jumped"), [(5, False), (6, True)])
def test_a_clock_put_right_by_ntp_just_before_the_push_is_a_jump_past_five_minutes(
    session: Session, pda: Pda, parcel: Parcel, fast_by: int, jumped: bool
) -> None:
    """The PDA's clock ran fast all afternoon offline; back in range, NTP put it right
    and the PDA pushed at once: its last scan is dated after the push was sent. Up to
    five minutes after (``EventRules.future_tolerance``), README's clock_jump ("dated
    after their push was sent") is not raised: the scan is taken on the push's clock."""
    tn = parcel.tracking_no
    scan = NOW - dt.timedelta(seconds=30) + dt.timedelta(minutes=fast_by)
    pda.push([pda.event(1, tn, occurred_at=scan)], sent_at=NOW)
    assert ("clock_jump" in set(session.scalars(select(Flag.kind)))) is jumped


def test_a_consent_captured_then_voided_by_a_correction_authorizes_nothing(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    tn = parcel.tracking_no
    captured = pda.event(
        2, tn, "consent_captured", occurred_at=at(20), consent={"method": "any", "channel": "sms"}
    )
    drop = pda.event(
        4,
        tn,
        "delivered_to_locker",
        occurred_at=at(40),
        locker_id="L-1",
        compartment="1",
        pod={"pickup_code": "1"},
    )
    correction = pda.event(
        3,
        tn,
        "correction",
        occurred_at=at(30),
        voids_client_event_id=captured["client_event_id"],
        reason="the recipient said no",
    )
    pda.push([pda.event(1, tn, occurred_at=at(10)), captured, drop])
    assert "unauthorized_locker_drop" not in set(session.scalars(select(Flag.kind)))
    pda.push([correction])
    flag = session.scalars(select(Flag).where(Flag.kind == "unauthorized_locker_drop")).one()
    assert flag.status == FlagStatus.OPEN


def test_the_events_a_push_hands_to_the_projection_are_what_the_database_holds(
    session: Session, world: World, parcel: Parcel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push projects the events it just stored from memory, not read back: they must
    equal what a later read of the database gives (times in UTC, ids, details)."""
    from sync.status import load_events

    handed: dict[str, Any] = {}
    real_reproject = ingest_module.reproject

    def spy(**kwargs: Any) -> Any:
        handed.update(kwargs["stored"])
        return real_reproject(**kwargs)

    monkeypatch.setattr(ingest_module, "reproject", spy)
    pda = Pda(session, world, skew=dt.timedelta(minutes=7))  # a PDA clock running fast
    beijing = dt.timezone(dt.timedelta(hours=8))
    tn = parcel.tracking_no
    first = pda.event(1, tn, location={"lat": 31.2304161, "lon": 121.4737012, "accuracy_m": 8.5})
    first["occurred_at"] = (at(1) + pda.skew).astimezone(beijing).isoformat()
    pda.push(
        [
            first,
            pda.event(2, tn, "out_for_delivery"),
            pda.event(
                3,
                tn,
                "correction",
                voids_client_event_id=first["client_event_id"],
                reason="scanned the wrong parcel",
            ),
        ]
    )
    read_back = load_events(session, [tn])[tn]
    assert len(handed[tn]) == 3
    assert sorted(handed[tn], key=lambda e: e.fact.seq) == sorted(
        read_back, key=lambda e: e.fact.seq
    )
    assert all(e.fact.occurred_at.utcoffset() == dt.timedelta(0) for e in handed[tn])


def test_the_ids_a_push_hands_on_are_its_own_events_between_older_ones_of_the_device(
    session: Session, world: World, parcel: Parcel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row ids of a push's events are read back by seq, as one range when the seqs
    are dense: the device's older events inside that range must not be taken for them."""
    handed: dict[str, Any] = {}
    real_reproject = ingest_module.reproject

    def spy(**kwargs: Any) -> Any:
        handed.clear()
        handed.update(kwargs["stored"])
        return real_reproject(**kwargs)

    monkeypatch.setattr(ingest_module, "reproject", spy)
    pda = Pda(session, world)
    tn = parcel.tracking_no
    pda.push([pda.event(2, tn), pda.event(5, tn, "out_for_delivery")])
    receipt = pda.push([pda.event(seq, tn, "out_for_delivery") for seq in (1, 3, 4, 6)])
    assert statuses(receipt) == ["applied"] * 4
    stored = dict(
        session.execute(
            select(ScanEvent.seq, ScanEvent.id).where(ScanEvent.device_id == world.device.id)
        ).all()
    )
    assert {e.fact.seq: e.fact.event_id for e in handed[tn]} == {
        seq: stored[seq] for seq in (1, 3, 4, 6)
    }


def test_a_sync_state_the_session_holds_shows_what_a_push_wrote(
    session: Session, world: World, parcel: Parcel
) -> None:
    """The push writes the device's sync state past the ORM: a copy loaded in the same
    transaction must not keep the old acknowledgements."""
    pda = Pda(session, world)
    pda.push([pda.event(1, parcel.tracking_no)])
    held = session.get(DeviceSyncState, world.device.id)
    assert held is not None and held.max_seq == 1
    pda.push(
        [pda.event(seq, parcel.tracking_no, "out_for_delivery") for seq in (2, 4)], commit=False
    )
    assert (held.max_seq, held.acked_through_seq, held.missing_ranges) == (4, 2, [[3, 3]])


@pytest.mark.parametrize("held", [True, False], ids=["device held", "device not loaded"])
def test_a_push_shows_its_device_as_seen_at_most_once_a_minute(
    session: Session, world: World, parcel: Parcel, held: bool
) -> None:
    """A PDA pushing each scan does not rewrite its device row: the last-seen time moves
    when a minute old (a conditional update), whether the session holds a copy of the
    device or not."""
    pda = Pda(session, world)
    session.expunge_all()
    device = session.get(Device, world.device.id) if held else None  # held while referenced

    def push_at(received_at: dt.datetime, seq: int) -> dt.datetime | None:
        event = pda.event(seq, parcel.tracking_no, occurred_at=received_at)
        pda.push([event], received_at=received_at, commit=False)
        session.flush()
        return session.scalar(select(Device.last_seen_at).where(Device.id == world.device.id))

    assert push_at(NOW, 1) == NOW
    assert push_at(NOW + dt.timedelta(seconds=59), 2) == NOW
    assert push_at(NOW + dt.timedelta(seconds=61), 3) == NOW + dt.timedelta(seconds=61)
    held_copy = session.identity_map.get(session.identity_key(Device, world.device.id))
    assert held_copy is device


def test_a_push_reading_when_its_device_was_seen_touches_it_only_when_a_minute_old(
    session: Session, world: World, parcel: Parcel
) -> None:
    """The push reads the device's last-seen time with its sync state
    (``DeviceState.device_seen_at``): within the minute after it, a push sends no
    statement for the device row."""
    pda = Pda(session, world)
    seen = NOW - dt.timedelta(seconds=30)
    world.device.last_seen_at = seen
    session.flush()
    session.expunge_all()

    def push_at(received_at: dt.datetime, seq: int) -> list[str]:
        with statements_sent(session) as sent:
            pda.push([pda.event(seq, parcel.tracking_no)], received_at=received_at, commit=False)
            session.flush()
        return [s for s in sent if s.startswith("UPDATE device ")]

    assert push_at(seen + dt.timedelta(seconds=59), 1) == []
    assert len(push_at(seen + dt.timedelta(seconds=61), 2)) == 1
    last_seen = session.scalar(select(Device.last_seen_at).where(Device.id == world.device.id))
    assert last_seen == seen + dt.timedelta(seconds=61)


def test_a_push_of_many_malformed_events_keeps_them_all_in_one_insert(
    session: Session, pda: Pda, parcel: Parcel
) -> None:
    """A broken PDA's push must not hold the database one statement per bad event (on
    SQLite, every other PDA waits for it); resent, each gets its first answer."""
    bad = [pda.event(seq, parcel.tracking_no, "no_such_type") for seq in range(1, 301)]
    for seq in (301, 302):
        bad.append({**pda.event(seq, parcel.tracking_no), "occurred_at": "yesterday"})
    with statements_sent(session) as sent:
        receipt = pda.push(bad)
    assert statuses(receipt) == ["rejected"] * 302
    inserts = [s for s in sent if s.lstrip().upper().startswith("INSERT INTO QUARANTINED_EVENT")]
    assert len(inserts) == 1
    assert count(session, QuarantinedEvent) == 302
    codes = [r["error"]["code"] for r in receipt["results"]]
    again = pda.push(bad)
    assert [r["error"]["code"] for r in again["results"]] == codes
    assert count(session, QuarantinedEvent) == 302


def test_inversions_of_two_pdas_on_one_parcel_keep_their_pdas_apart(
    session: Session, world: World, parcel: Parcel
) -> None:
    """One flag per parcel gathers the inversions of every PDA: each seq with its PDA,
    so that an auditor reads which device went back in time where."""
    tn = parcel.tracking_no
    first = Pda(session, world)
    first.push(
        [
            first.event(9, tn, occurred_at=at(20)),
            first.event(10, tn, "out_for_delivery", occurred_at=at(15)),  # back in time
        ]
    )
    courier = factories.user(session, "courier7", "courier", world.station)
    device = factories.device(session, "PDA-0007", world.station)
    session.commit()
    second = Pda(session, world)
    second.pusher = Pusher(device.id, world.station.id, courier.id)
    second.push(
        [
            second.event(1, tn, occurred_at=at(40)),
            second.event(2, tn, "out_for_delivery", occurred_at=at(35)),  # back in time
        ]
    )
    [inversion] = session.scalars(select(Flag).where(Flag.kind == "time_inversion")).all()
    assert inversion.evidence == {
        "device_seqs": ["PDA-0001#9", "PDA-0001#10", "PDA-0007#1", "PDA-0007#2"]
    }


def _move(
    session: Session, world: World, parcel: Parcel, station: Any, when: dt.datetime = NOW
) -> None:
    """Re-route the parcel to ``station`` (an intake by someone who may place it anywhere)."""
    (result,) = intake_parcels(
        session=session,
        drafts=[
            (0, ParcelDraft(parcel.tracking_no, "express", "R", "1 Road", station=station.code))
        ],
        rules=IntakeRules(tracking=POLICY, phone_region="CN"),
        scope=IntakeScope(default_station_id=None, allowed_station_ids=None),
        now=when,
    )
    assert result.status == "updated", result.error
    session.commit()


def locker_consent(
    session: Session,
    world: World,
    tracking_no: str,
    granted_at: dt.datetime,
    *,
    recorded_at: dt.datetime,
    expires_at: dt.datetime | None = None,
) -> None:
    """The recipient agrees by SMS to a locker drop of the parcel (recorded by the server
    at ``recorded_at``), and the parcel is judged again with it."""
    consent = grant(
        session=session,
        draft=ConsentDraft(
            scope=ConsentScope.PARCEL,
            method=ConsentMethod.LOCKER,
            channel=ConsentChannel.SMS,
            granted_at=granted_at,
            tracking_no=tracking_no,
            expires_at=expires_at,
        ),
        rules=ConsentRules(tracking=POLICY, phone_region="CN"),
        created_by=world.integration.id,
        now=recorded_at,
    )
    rejudge_for_consent(session=session, consent=consent, policy=Policy())


# How the PDA's four events reach the server: by seq, in pushes in this order.
ARRIVALS = {
    "in one push": [[1, 2, 3, 4]],
    "the drop first": [[1, 2, 3], [4]],
    "the next scan first": [[4], [1, 2, 3]],
    "one by one, backwards": [[4], [3], [2], [1]],
}


@pytest.mark.parametrize("pushes", ARRIVALS.values(), ids=ARRIVALS.keys())
def test_a_drop_stamped_after_the_pdas_next_scan_of_another_parcel_is_judged_before_it(
    session: Session, world: World, pda: Pda, parcel: Parcel, pushes: list[list[int]]
) -> None:
    """The courier drops the parcel (seq 3) with the PDA's clock set forward to stamp it
    after the recipient's consent (granted at 70), puts the clock right, and scans the
    next parcel (seq 4) at 65. The seqs say the drop happened by 65, before the consent
    (rule 6, ``sync.drop_bounds``), however the events arrive (rule 3): only the next
    parcel gets the time_inversion, and the drop counts as made before the consent."""
    tn = parcel.tracking_no
    other = factories.parcel(session, world.station).tracking_no
    locker_consent(session, world, tn, at(70), recorded_at=at(71))
    session.commit()
    stream = {
        1: pda.event(1, tn, occurred_at=at(10)),
        2: pda.event(2, other, occurred_at=at(20)),
        3: locker_drop(pda, 3, tn, at(80)),
        4: pda.event(4, other, "out_for_delivery", occurred_at=at(65)),
    }
    for seqs in pushes:
        pda.push([stream[seq] for seq in seqs])
    inverted = session.scalars(select(Flag.subject_key).where(Flag.kind == "time_inversion"))
    assert list(inverted) == [other]
    kinds = set(
        session.scalars(
            select(Flag.kind).where(Flag.subject_key == tn, Flag.status == FlagStatus.OPEN)
        )
    )
    assert kinds == {"consent_after_drop"}
    drop = session.scalars(select(ScanEvent).where(ScanEvent.seq == 3)).one()
    assert (drop.latest_of_earlier_seqs, drop.earliest_of_later_seqs) == (None, at(65))


@pytest.mark.parametrize("together", [True, False], ids=["scan with the drop", "scan late"])
def test_a_drop_stamped_before_its_consent_expired_is_judged_after_the_pdas_scan_before_it(
    session: Session, world: World, pda: Pda, parcel: Parcel, together: bool
) -> None:
    """The recipient's consent expired at 60. The courier scans another parcel at 70,
    then drops this one (the next seq) with the clock set back to 50. The drop happened
    after that scan, when the consent no longer held: unauthorized, whether the scan
    arrives with the drop or after it."""
    tn = parcel.tracking_no
    other = factories.parcel(session, world.station).tracking_no
    locker_consent(session, world, tn, at(0), recorded_at=at(1), expires_at=at(60))
    session.commit()
    first, drop = pda.event(1, tn, occurred_at=at(10)), locker_drop(pda, 3, tn, at(50))
    scan = pda.event(2, other, occurred_at=at(70))  # the seq between
    if together:
        pda.push([first, scan, drop])
    else:
        pda.push([first, drop])
        flagged = session.scalars(
            select(Flag.kind).where(Flag.subject_key == tn, Flag.status == FlagStatus.OPEN)
        )
        assert "unauthorized_locker_drop" not in set(flagged)  # as far as the server knows
        pda.push([scan])
    flagged = session.scalars(
        select(Flag.kind).where(Flag.subject_key == tn, Flag.status == FlagStatus.OPEN)
    )
    assert "unauthorized_locker_drop" in set(flagged)


@pytest.mark.parametrize(
    ("limited_to", "flagged"),
    [("station", set()), ("other_station", {"unauthorized_locker_drop"})],
    ids=["consent at the drop's station", "consent at the next station"],
)
def test_a_standing_consent_of_one_station_is_judged_where_the_parcel_was_at_the_drop(
    session: Session, world: World, pda: Pda, parcel: Parcel, limited_to: str, flagged: set[str]
) -> None:
    """The recipient agreed to locker drops at one station only. The parcel is dropped
    at station A, then re-routed to B (same recipient): the drop is judged by what held
    at A when it was made, not by the station the parcel is at now."""
    tn = parcel.tracking_no
    consent = grant(
        session=session,
        draft=ConsentDraft(
            scope=ConsentScope.STANDING,
            method=ConsentMethod.LOCKER,
            channel=ConsentChannel.APP,
            granted_at=at(0),
            recipient_phone=parcel.recipient_phone,
            address=parcel.address,
            station_id=getattr(world, limited_to).id,
        ),
        rules=ConsentRules(tracking=POLICY, phone_region="CN"),
        created_by=world.integration.id,
        now=at(1),
    )
    rejudge_for_consent(session=session, consent=consent, policy=Policy())
    session.commit()
    pda.push([pda.event(1, tn, occurred_at=at(10)), locker_drop(pda, 2, tn, at(60))])
    active = select(Flag.kind).where(Flag.subject_key == tn, Flag.status != FlagStatus.CLOSED)
    assert set(session.scalars(active)) == flagged

    (moved,) = intake_parcels(
        session=session,
        drafts=[
            (
                0,
                ParcelDraft(
                    tn,
                    "express",
                    parcel.recipient_name,
                    parcel.address,
                    recipient_phone=parcel.recipient_phone,
                    station=world.other_station.code,
                ),
            )
        ],
        rules=IntakeRules(tracking=POLICY, phone_region="CN"),
        scope=IntakeScope(default_station_id=None, allowed_station_ids=None),
        now=NOW,
    )
    assert moved.status == "updated", moved.error
    session.commit()
    assert set(session.scalars(active)) == flagged


def test_a_violation_at_the_station_a_parcel_moved_to_is_that_stations_own_flag(
    session: Session, world: World, pda: Pda, parcel: Parcel
) -> None:
    """An express parcel dropped in a locker without consent at station A, resolved by
    A's manager, re-routed to station B and dropped without consent again there: B's
    manager gets a flag of B's drop in B's queue, and A's resolution stands."""
    tn = parcel.tracking_no
    locker = {"locker_id": "L-1", "compartment": "1", "pod": {"pickup_code": "1"}}
    pda.push([pda.event(1, tn), pda.event(2, tn, "delivered_to_locker", **locker)])
    at_a = session.scalars(select(Flag).where(Flag.kind == "unauthorized_locker_drop")).one()
    resolve_flag(session=session, flag=at_a, user_id=world.manager.id, note="recipient called")
    session.commit()
    (drop_a,) = at_a.evidence["event_ids"]

    _move(session, world, parcel, world.other_station)
    # Moving the parcel raises nothing at B: A's drop was A's, and A resolved it.
    assert (
        session.scalars(select(Flag).where(Flag.station_id == world.other_station.id)).all() == []
    )

    courier_b = factories.user(session, "courier9", "courier", world.other_station)
    session.commit()
    pda_b = Pda(session, world)
    pda_b.pusher = Pusher(world.other_device.id, world.other_station.id, courier_b.id)
    receipt = pda_b.push(
        [
            pda_b.event(1, tn, occurred_at=at(60)),
            pda_b.event(2, tn, "delivered_to_locker", occurred_at=at(70), **locker),
        ]
    )
    drop_b = session.scalar(
        select(ScanEvent.id).where(
            ScanEvent.device_id == world.other_device.id, ScanEvent.seq == 2
        )
    )
    drops = session.scalars(
        select(Flag).where(Flag.kind == "unauthorized_locker_drop").order_by(Flag.id)
    ).all()
    assert [(f.station_id, f.status, f.evidence["event_ids"]) for f in drops] == [
        (world.station.id, FlagStatus.RESOLVED, [drop_a]),
        (world.other_station.id, FlagStatus.OPEN, [drop_b]),
    ]
    assert drops[1].courier_id == courier_b.id
    assert {"flag_id": drops[1].id, "kind": "unauthorized_locker_drop"}.items() <= next(
        f for f in receipt["flags_raised"] if f["kind"] == "unauthorized_locker_drop"
    ).items()
    assert [c.to_status for c in flag_changes(session=session, flag=drops[0])] == [
        FlagStatus.OPEN,
        FlagStatus.RESOLVED,
    ]


def test_a_resolved_missing_image_flag_from_before_it_named_its_deliveries_stays_resolved(
    session: Session, world: World, pda: Pda, parcel: Parcel
) -> None:
    """Until 5cfa1b0 a pod_blob_missing flag's evidence named only its images. A manager
    resolved one such flag; later an unrelated scan of the parcel (an exception) is
    pushed: no image is missing that the manager has not seen, so the flag stays
    resolved (7b12f5a: 'existing flags are judged the same')."""
    tn = parcel.tracking_no
    pda.push([pda.event(1, tn), pda.event(2, tn, "delivered", pod={"signature_sha256": "a" * 64})])
    flag = session.scalars(select(Flag).where(Flag.kind == "pod_blob_missing")).one()
    flag.evidence = {"blobs": ["a" * 64]}  # as stored before this release
    resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="phoned them")
    session.commit()
    pda.push(
        [pda.event(3, tn, "exception", reason="other")], received_at=NOW + dt.timedelta(hours=1)
    )
    session.refresh(flag)
    assert flag.status == FlagStatus.RESOLVED, [
        (c.from_status, c.to_status, c.note) for c in flag_changes(session=session, flag=flag)
    ]


def test_a_resolved_flag_from_before_flags_had_a_station_each_stays_resolved(
    session: Session, world: World, pda: Pda, parcel: Parcel
) -> None:
    """Before 64a4089ef286 a parcel's rule flag was raised at the parcel's station,
    whoever's events it cited. A courier of station B delivered station A's parcel
    without a proof; A's manager resolved the flag. After the upgrade a later scan of
    the parcel is pushed: the fault is the one already resolved, so it is neither
    closed as if 'the rule holds' nor raised again as a new open flag at B."""
    tn = parcel.tracking_no
    courier_b = factories.user(session, "courier9", "courier", world.other_station)
    session.commit()
    pda_b = Pda(session, world)
    pda_b.pusher = Pusher(world.other_device.id, world.other_station.id, courier_b.id)
    pda_b.push([pda_b.event(1, tn), pda_b.event(2, tn, "delivered")])
    flag = session.scalars(select(Flag).where(Flag.kind == "delivered_without_pod")).one()
    flag.station_id = world.station.id  # where the flag was raised before the upgrade
    resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="B's mistake")
    session.commit()
    pda_b.push(
        [pda_b.event(3, tn, "exception", reason="other")], received_at=NOW + dt.timedelta(hours=1)
    )
    found = session.scalars(
        select(Flag).where(Flag.kind == "delivered_without_pod").order_by(Flag.id)
    ).all()
    assert [(f.station_id, f.status, f.closed_reason) for f in found] == [
        (world.station.id, FlagStatus.RESOLVED, None)
    ]


def test_a_push_on_a_parcel_of_a_long_history_orders_it_once_not_once_a_rule(
    session: Session, world: World, pda: Pda, parcel: Parcel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push judges each parcel it touches on the parcel's whole history: its status
    (``sync.projection.project``), its rule flags (``sync.rules.evaluate``), which scans
    repeat an outcome (``first_scans``), whether the events just stored fold its outcomes
    otherwise (``refolded``), which drops to tell recipients of or take back. Each sorted
    the whole history into projection order (``sync.projection.ordered``) again: a PDA
    that pushed 25,000 events of one parcel (each stored, rule 1) made every later push
    of it, its honest courier's scan too, sort them six times, 12 to 16 s in SQLite's
    writers' turn under load, and the station's other PDAs got 503s. Ordered once now;
    once more, without the events just stored, where they may fold its outcomes
    otherwise (``refolded``)."""
    tn = parcel.tracking_no
    topics = [ingest_module.DROP_VOIDED_TOPIC, *ingest_module.DROP_TOPICS.values()]
    session.add(WebhookSubscription(url="http://127.0.0.1:9/hook", topics=topics, secret="s" * 43))
    courier = factories.user(session, "courier2", "courier", world.station)
    factories.device(session, "PDA-0003", world.station)
    session.commit()
    flood: list[dict[str, Any]] = []  # consents, drops, corrections, check-outs
    for seq in range(1, 301):
        when = NOW - dt.timedelta(hours=3) + dt.timedelta(seconds=seq)
        if seq % 4 == 1:
            consent = {"method": "any", "channel": "in_person"}
            flood.append(pda.event(seq, tn, "consent_captured", occurred_at=when, consent=consent))
        elif seq % 4 == 2:
            drop = {"locker_id": "L-1", "compartment": str(seq), "pod": {"pickup_code": "1"}}
            flood.append(pda.event(seq, tn, "delivered_to_locker", occurred_at=when, **drop))
        elif seq % 4 == 3:
            voided = flood[-2]["client_event_id"]
            flood.append(
                pda.event(
                    seq,
                    tn,
                    "correction",
                    occurred_at=when,
                    voids_client_event_id=voided,
                    reason="x",
                )
            )
        else:
            flood.append(pda.event(seq, tn, occurred_at=when))
    assert statuses(pda.push(flood)) == ["applied"] * len(flood)
    honest = Pda(session, world)
    honest.pusher = Pusher("PDA-0003", world.station.id, courier.id)
    sorts: list[int] = []
    real = projection.ordered

    def counted(facts: Any) -> Any:
        facts = list(facts)
        sorts.append(len(facts))
        return real(facts)

    for module in (projection, rules, status, handover):
        monkeypatch.setattr(module, "ordered", counted)
    later = NOW - dt.timedelta(hours=2)
    drop = {"locker_id": "L-2", "compartment": "1", "pod": {"pickup_code": "2"}}
    voided = flood[-3]["client_event_id"]  # a drop, announced
    pushes = {
        "the honest courier's drop": (
            honest,
            [honest.event(1, tn, "delivered_to_locker", occurred_at=later, **drop)],
        ),
        "the flooding PDA's correction of its drop": (
            pda,
            [
                pda.event(
                    301,
                    tn,
                    "correction",
                    occurred_at=later,
                    voids_client_event_id=voided,
                    reason="mis-tap",
                )
            ],
        ),
    }
    for what, (device, events) in pushes.items():
        sorts.clear()
        assert statuses(device.push(events)) == ["applied"] * len(events), what
        whole = [n for n in sorts if n >= len(flood)]
        assert 1 <= len(whole) <= 2, (what, sorts)
    told = {
        (m.topic, m.payload["locker_id"], m.payload["compartment"])
        for m in session.scalars(select(OutboxMessage))
    }
    assert ("parcel.in_locker", "L-2", "1") in told  # the courier's drop
    assert ("parcel.drop_voided", "L-1", "298") in told  # the one a correction took back


def test_a_push_judges_a_parcels_history_reading_payloads_only_of_its_final_outcomes(
    session: Session, world: World, pda: Pda, parcel: Parcel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push judges each parcel it touches on its whole history, read back from the
    database. Every event's payload came with it (details, position, PDA time, time of
    receipt, drop bounds) and was converted, though the rules read it of final outcomes
    only: a PDA that scanned one parcel 25,000 times made each later push of it, its
    honest courier's too, convert them all in SQLite's writers' turn. Now the events
    before the push carry their facts alone, but the final outcomes, whose payload is
    read whole; the status and the flags are those the whole history gives."""
    tn = parcel.tracking_no
    failed = {"reason": "recipient_absent", "action": "notice_left"}
    before = [
        pda.event(1, tn, location={"lat": 31.2, "lon": 121.5}),
        pda.event(2, tn, "delivery_attempt_failed", **failed),
        pda.event(3, tn, "out_for_delivery"),
        pda.event(4, tn, "delivered", pod={"recipient_name": "Li"}),  # no image: flagged
        pda.event(5, tn, "delivered", pod={"recipient_name": "Li"}),  # a repeat of it
    ]
    assert statuses(pda.push(before)) == ["applied"] * len(before)
    judged: list[list[Any]] = []

    class Spied(rules.History):
        def __init__(self, events: Any, voids: Any = None) -> None:
            judged.append(list(events))
            super().__init__(events, voids)

    monkeypatch.setattr(status, "History", Spied)
    assert statuses(pda.push([pda.event(6, tn, "out_for_delivery")])) == ["applied"]
    (history,) = judged
    read_back = {e.fact.seq: e for e in history if e.fact.seq < 6}
    assert sorted(read_back) == [1, 2, 3, 4, 5]
    for seq in (1, 2, 3):
        event = read_back[seq]
        assert event.details == {}, seq
        assert (event.lat, event.lon, event.occurred_at_device, event.received_at) == (None,) * 4
    for seq in (4, 5):
        event = read_back[seq]
        assert event.details == {"pod": {"recipient_name": "Li"}}
        assert event.occurred_at_device == at(seq) and event.received_at == NOW
    # Judged on these, the parcel is what its whole history makes it.
    whole = status.load_events(session, [tn])[tn]
    by_seq = {e.fact.seq: e for e in whole}  # read in no promised order: by seq
    assert by_seq[2].details == failed and by_seq[1].lat == 31.2
    facts = rules.ParcelFacts(parcel.service_class, parcel.lat, parcel.lon)
    lean = status.load_events(session, [tn], judged_only=True)[tn]
    assert rules.evaluate(facts, lean, [], rules.Policy()) == rules.evaluate(
        facts, whole, [], rules.Policy()
    )
    assert "delivered_without_pod" in rules.evaluate(facts, lean, [], rules.Policy())
    assert projection.project([e.fact for e in lean]) == projection.project(
        [e.fact for e in whole]
    )


def test_a_push_expires_the_device_state_the_session_holds_without_asking_for_its_mapper(
    session: Session, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state row is written past the ORM: a copy the session holds is expired, and
    read again says what the push wrote. Its key is made by the mapper kept once, not
    by ``Session.identity_key`` (which finds the mapper again, some 20 us a push)."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    pda = Pda(session, world)
    pda.push([pda.event(1, parcel.tracking_no)], commit=False)
    held = session.get(DeviceSyncState, world.device.id)
    assert held is not None and held.max_seq == 1

    def refused(*_: Any, **__: Any) -> Any:
        raise AssertionError("Session.identity_key asked during a push")

    monkeypatch.setattr(Session, "identity_key", refused)
    pda.push([pda.event(2, parcel.tracking_no, "out_for_delivery")], commit=False)
    assert held.max_seq == 2
    session.commit()
