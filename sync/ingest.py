"""The offline-batch engine: one push from a PDA in, one receipt out.

``ingest`` runs inside the caller's transaction and never commits: the caller
commits and only then sends the receipt, so nothing is acknowledged that is
not stored (DESIGN.md, PDA sync contract). What it guarantees:

* **Nothing lost.** Every event gets a result at its index. Valid events are
  stored; malformed ones go to quarantine with their raw payload, code and
  message. One bad event never blocks its siblings.
* **Exactly once.** A batch id seen before returns its stored receipt and
  changes nothing. ``(device, client_event_id)`` is unique forever; the same
  id with other content is rejected as ``conflicting_duplicate`` and flagged, but
  for a ``seq_conflict`` settled (its event held since under a new seq) sent again
  at the seq refused: the same event but for its seq, it gets its first answer.
* **One device at a time.** The device's row is locked (``FOR UPDATE`` on
  PostgreSQL; SQLite transactions are serial), so pushes of one device are
  serialized while other devices go on.
* **Savepoints.** The new events of a batch are inserted inside a savepoint;
  if the database refuses any of them, that savepoint is rolled back and each
  event is inserted again inside its own savepoint, so the poison event is
  rejected (``unstorable``) with no partial rows and its siblings are stored.
  The common case costs one statement instead of one savepoint per event.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import operator
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    bindparam,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session

from models import (
    Device,
    DeviceSyncState,
    EventType,
    Flag,
    FlagSeverity,
    FlagStatus,
    OutboxMessage,
    Parcel,
    ProofImage,
    QuarantinedEvent,
    RejectedImage,
    ScanEvent,
    Shift,
    ShiftStatus,
    SyncBatch,
    WebhookDelivery,
    utcnow,
)
from models.sync import DELIVERY_TYPES, DROP_TYPES, UNNAMED_SEQ_CONFLICT
from sync import audit, consents, outbox, request_reach
from sync.acks import SeqTracker, acknowledged_through, without
from sync.balances import closed_shifts_holding, gather, refresh_handover_flags
from sync.blobs import lock_digests
from sync.consent_requests import (
    cancel_for_handed_over,
    cancel_voided,
    lock_requests_to_end,
    requests_from_events,
    send_held_back_behind,
    voided_at_arrival,
)
from sync.device_state import (
    DeviceState,
    declared_first_seq_read,
    held_state,
    lock_device_state,
)
from sync.direct import undone_if_refused
from sync.drop_bounds import EventTime, bound_drops
from sync.errors import Conflict
from sync.events import (
    MAX_EVENT_DEPTH,
    OUT_OF_WINDOW,
    EventRejected,
    EventRules,
    PushClock,
    ValidEvent,
    nested_deeper_than,
    readable_seq,
    referenced_blobs,
    sha256_json,
    validate_event,
    within_depth,
)
from sync.flags import (
    ACTIVE_STATUSES,
    FlagSubject,
    close_flags_by_id,
    device_seq,
    raise_flag,
    split_device_seq,
    withdraw_evidence,
)
from sync.inversion_flags import (
    DEFAULT_TOLERANCE,
    EVIDENCE_KEY,
    KIND,
    SPLIT_REASON,
    device_seqs,
    nearest_stored,
    stored_at,
)
from sync.inversions import Stamp, judge
from sync.quarantine import images_named, parcel_named, rejections_of_batch
from sync.rules import EventDetail, History, Policy
from sync.shifts import (
    WRONG_SHIFT,
    Filing,
    ShiftFiler,
    ShiftRules,
    judge_reopening,
    lock_shifts,
    may_own_rejected,
    may_own_revealed_gap,
    reopened_since_signoff,
    reopened_with_seqs_left_open,
)
from sync.sign_in_limits import Limit
from sync.sql import (
    Prebuilt,
    among,
    among_at_once,
    among_param,
    chunks,
    flushed_connection,
    insert_ignoring_conflict,
    json_text_param,
    plain_rows,
    rows_among,
    updating,
)
from sync.status import reproject, stored_detail, targets_of_corrections, tell_holders
from sync.tracking import TrackingNumberPolicy

log = logging.getLogger(__name__)
TOO_DEEP = EventRejected(
    f"the event nests deeper than {MAX_EVENT_DEPTH} levels; it is kept in quarantine, cut "
    "to that depth",
    code="too_deep",
)
DROP_TOPICS = {
    EventType.DELIVERED_TO_LOCKER: "parcel.in_locker",
    EventType.DELIVERED_TO_PICKUP_POINT: "parcel.at_pickup_point",
}
DROP_VOIDED_TOPIC = "parcel.drop_voided"
# Scans whose voiding leaves a parcel's status as it was (``_handed_over``).
_NOT_STATUS = (EventType.CONSENT_REQUESTED, EventType.CONSENT_CAPTURED, EventType.CORRECTION)

LAST_SEEN_RESOLUTION = dt.timedelta(minutes=1)
# A Core insert: events are written in bulk, never loaded back as ORM objects here.
INSERT_EVENTS = insert(ScanEvent.__table__)
INSERT_ONE_EVENT = Prebuilt(lambda _dialect: INSERT_EVENTS.returning(ScanEvent.__table__.c.id))
INSERT_PROOF_IMAGES = Prebuilt(lambda _dialect: insert(ProofImage.__table__))
_events = ScanEvent.__table__
_states = DeviceSyncState.__table__
_batches = SyncBatch.__table__
# Statements built once (``sync.sql.Prebuilt`` says why): every push runs them.
STORE_DEVICE_STATE = Prebuilt(
    lambda _dialect: updating(
        _states,
        by="device_id",
        param="state_of",
        columns=(
            "max_seq",
            "missing_ranges",
            "written_off_ranges",
            "acked_through_seq",
            "unsettled_seq_conflicts",
            "clock_offset_ms",
            "clock_measured_at",
            "last_push_at",
        ),
    )
)
# The device's last-seen time is only shown (the stale-device sweep reads the sync
# state's ``last_push_at``, kept exact): rewritten when older than the resolution,
# not by every push of a PDA pushing each scan as it happens.
TOUCH_DEVICE = Prebuilt(
    lambda _dialect: (
        update(Device.__table__)
        .where(
            Device.__table__.c.id == bindparam("device"),
            or_(
                Device.__table__.c.last_seen_at.is_(None),
                Device.__table__.c.last_seen_at <= bindparam("seen_before"),
            ),
        )
        .values(last_seen_at=bindparam("seen_at"))
    )
)
_quarantined = QuarantinedEvent.__table__
INSERT_QUARANTINED = insert(_quarantined)
# What a rejected event resent was answered the first time.
QUARANTINED = Prebuilt(
    lambda dialect: select(
        _quarantined.c.payload_hash,
        _quarantined.c.message,
        _quarantined.c.error_code,
        _quarantined.c.field,
    ).where(
        _quarantined.c.device_id == bindparam("device_id"),
        among_param(dialect, _quarantined.c.payload_hash, "hashes"),
    )
)
# A receipt's JSON text, stored with its batch and sent as it is (``Receipt``): keys
# sorted, compact, ASCII only, as Flask's JSON responses are outside debug mode.
RECEIPT_JSON = json.JSONEncoder(ensure_ascii=True, sort_keys=True, separators=(",", ":"))
# The batch's row, and with it the highest first seq the PDA's shifts declared: read by
# the first statement after the device's lock, so on PostgreSQL after any shift opening
# that lock waited for had committed (``declared_first_seq_read``), at no statement more.
NEW_BATCH = Prebuilt(
    lambda dialect: (
        insert_ignoring_conflict(dialect, _batches, on=["device_id", "batch_id"])
        .values(receipt=json_text_param(dialect, "receipt"))
        .returning(_batches.c.id, declared_first_seq_read("device"))
    )
)
STORE_RECEIPT = Prebuilt(
    lambda dialect: (
        update(_batches)
        .where(_batches.c.id == bindparam("batch_pk"))
        .values(receipt=json_text_param(dialect, "receipt"))
    )
)


class Receipt(dict[str, Any]):
    """A new batch's receipt, with ``encoded``, its JSON text as stored (``RECEIPT_JSON``):
    encoded once, in the writers' turn, for the batch's row and for the answer, which
    ``courier_api.api.sync.routes`` sends as it is. A receipt changed after it is made
    is a plain ``dict`` (``{**receipt, ...}``), never this one changed in place."""

    encoded: str


def _columns_at_seqs(*columns: Any) -> Prebuilt[Select[Any]]:
    """These columns of a device's events at the seqs given (through its unique index)."""
    return Prebuilt(
        lambda dialect: select(_events.c.seq, *columns).where(
            _events.c.device_id == bindparam("device_id"),
            among_param(dialect, _events.c.seq, "seqs"),
        )
    )


IDS_AT_SEQS = _columns_at_seqs(_events.c.id)
IDS_IN_SEQ_RANGE = select(_events.c.seq, _events.c.id).where(
    _events.c.device_id == bindparam("device_id"),
    _events.c.seq.between(bindparam("low"), bindparam("high")),
)
OWNERS_OF_SEQS = _columns_at_seqs(_events.c.client_event_id)
SEQ_CONFLICT = "seq_conflict"
# Tracking numbers of any domestic format (an S10 number is judged as ever): what an
# event held under a format dropped since is compared with (``_held_though_refused_now``,
# ``_settle_seq_conflicts``).
ANY_DOMESTIC_NUMBER = TrackingNumberPolicy.from_patterns([r".+"])
# A rejection ``seq_conflict`` whose event is held now under another seq (README's
# recovery): the seq it is held under.
SETTLE_SEQ_CONFLICT = (
    update(_quarantined)
    .where(_quarantined.c.id == bindparam("row_id"))
    .values(resent_seq=bindparam("resent"), unsettled_event_id=None)
)
# A seq_conflict rejection kept before rejections named their events, left unsettled.
NAME_UNSETTLED_EVENT = (
    update(_quarantined)
    .where(_quarantined.c.id == bindparam("row_id"))
    .values(unsettled_event_id=bindparam("event_id"))
)
UNSETTLED_COLUMNS = (
    _quarantined.c.id,
    _quarantined.c.station_id,
    _quarantined.c.seq,
    _quarantined.c.client_event_id,
    _quarantined.c.unsettled_event_id,
)
SEQ_CONFLICT_SETTLED = (
    "every event refused this seq was sent again under a new seq of its own and is held "
    "(pushed by the courier who pushed the event holding the seq)"
)
# Flags whose cause stands, decided on or not: a settled seq_conflict's is closed.
STANDING = (*ACTIVE_STATUSES, FlagStatus.RESOLVED)


@dataclass(frozen=True)
class IngestRules:
    events: EventRules
    clock_skew_bound: dt.timedelta = dt.timedelta(minutes=2)
    # A later seq dated at most this before the one before it is no time_inversion
    # (``sync.inversions``: a clock stepped back a second or two by NTP).
    time_inversion_tolerance: dt.timedelta = DEFAULT_TOLERANCE
    missing_seqs_limit: int = 100
    policy: Policy = field(default_factory=Policy)
    shifts: ShiftRules = field(default_factory=ShiftRules)
    consent_request_ttl: dt.timedelta = dt.timedelta(minutes=30)
    # Consent requests sent per parcel in a window (``CONSENT_REQUESTS_PER_PARCEL``):
    # a PDA's requests beyond are kept, not sent (``sync.consent_requests``).
    consent_requests_per_parcel: Limit | None = None


@dataclass(frozen=True)
class PushBatch:
    device_id: str
    batch_id: uuid.UUID
    sent_at: dt.datetime  # the device's clock when it sent the push
    events: Sequence[Any]  # raw JSON values, validated one by one here


@dataclass(frozen=True)
class Pusher:
    """The courier and device a push comes from (already authenticated)."""

    device_id: str
    station_id: int
    courier_id: int


@dataclass
class _Result:
    index: int
    client_event_id: str | None
    status: str  # applied | duplicate | rejected
    error: EventRejected | None = None
    seq: int | None = None  # a sequence number the server now holds an answer for


@dataclass
class _Rejection:
    index: int
    raw: Any
    error: EventRejected
    payload_hash: str = ""


@dataclass(frozen=True)
class _Validated:
    """A batch's events validated one by one: those valid and those rejected, with
    their indexes in the batch."""

    valid: list[tuple[int, ValidEvent]]
    rejections: list[_Rejection]

    @classmethod
    def of(cls, batch: PushBatch, rules: EventRules, too_deep: frozenset[int]) -> _Validated:
        """``too_deep``: indexes of events nested deeper than MAX_EVENT_DEPTH."""
        valid: list[tuple[int, ValidEvent]] = []
        rejections: list[_Rejection] = []
        for index, raw in enumerate(batch.events):
            if index in too_deep:
                rejections.append(_Rejection(index, raw, TOO_DEEP))
                continue
            try:
                event = validate_event(raw, rules=rules)
            except EventRejected as error:
                rejections.append(_Rejection(index, raw, error))
            else:
                event.content_hash  # noqa: B018 - cached now, outside the device's lock
                valid.append((index, event))
        return cls(valid, rejections)


def event_row(
    event: ValidEvent,
    *,
    pusher: Pusher,
    batch_pk: int,
    clock: PushClock,
) -> dict[str, Any]:
    """The ``scan_event`` row stored for a valid event of a push (the shift it is
    filed under is decided by the caller: ``sync.shifts.ShiftFiler``)."""
    location = event.location
    return {
        "station_id": pusher.station_id,
        "device_id": pusher.device_id,
        "courier_id": pusher.courier_id,
        "batch_pk": batch_pk,
        "client_event_id": event.client_event_id,
        "seq": event.seq,
        "type": event.type,
        "tracking_no": event.tracking_no,
        "occurred_at_device": event.occurred_at_device,
        "occurred_at": clock.corrected(event.occurred_at_device),
        "received_at": clock.received_at,
        "lat": location.lat if location else None,
        "lon": location.lon if location else None,
        "accuracy_m": location.accuracy_m if location else None,
        "shift_id": None,
        "claimed_shift_id": event.shift_id,
        "voids_client_event_id": event.voids_client_event_id,
        "details": event.details,
        "content_hash": event.content_hash,
    }


def request_hash(batch: PushBatch) -> str:
    """Device, batch id and the events as sent: what "the same batch" meant before
    ``content_digest``, kept beside it (``SyncBatch.sent_hash``) so that a retry sent
    byte for byte is a replay whatever its validation makes of it now."""
    return sha256_json(
        {"device_id": batch.device_id, "batch_id": str(batch.batch_id), "events": batch.events}
    )


def event_contents(batch: PushBatch, validated: _Validated) -> list[str]:
    """Each event's content, at its index: a valid one as a duplicate is compared
    (``ValidEvent.content_hash``: ``5.0`` or ``5``, a blank field or none, ``+08:00`` or
    ``Z``), a malformed one as sent."""
    contents: list[str] = [""] * len(batch.events)
    for index, event in validated.valid:
        contents[index] = event.content_hash
    for rejection in validated.rejections:
        contents[rejection.index] = sha256_json(rejection.raw)
    return contents


def content_digest(batch: PushBatch, contents: Sequence[str]) -> str:
    """What "the same batch" means: device, batch id and its events' content
    (``event_contents``), in any order. Not ``sent_at``, which a PDA refreshes on each
    attempt so the clock estimate stays honest. A PDA that writes its retry anew (its
    time zone reset with its battery, say), or rebuilds it from a store that orders it
    otherwise, sends the same events: it gets its receipt, not a ``batch_id_reused``."""
    return sha256_json(
        {"device_id": batch.device_id, "batch_id": str(batch.batch_id), "events": sorted(contents)}
    )


def ordered_content_digest(batch: PushBatch, contents: Sequence[str]) -> str:
    """``content_digest`` as batches stored before 2026-12 have it: the events in the
    order sent. Computed only for a retry whose digest differs from the stored one."""
    return sha256_json(
        {"device_id": batch.device_id, "batch_id": str(batch.batch_id), "events": list(contents)}
    )


def batch_received(session: Session, device_id: str, batch_id: uuid.UUID) -> bool:
    """Whether this device's batch is stored already: a retry of it is answered with its
    receipt (``ingest``) whatever limit it is over now (the push limit lowered since,
    or another server's behind the same balancer), never refused as if nothing had been
    stored."""
    found = session.scalar(
        select(SyncBatch.id).where(
            SyncBatch.device_id == device_id, SyncBatch.batch_id == batch_id
        )
    )
    return found is not None


def ingest(
    *,
    session: Session,
    batch: PushBatch,
    pusher: Pusher,
    rules: IngestRules,
    received_at: dt.datetime | None = None,
) -> dict[str, Any]:
    """Apply one push and return its receipt (stored with the batch)."""
    received_at = received_at or utcnow()
    too_deep = frozenset(
        index for index, raw in enumerate(batch.events) if nested_deeper_than(raw, MAX_EVENT_DEPTH)
    )
    if too_deep:  # judged, hashed and stored cut to the limit: see MAX_EVENT_DEPTH
        events = [within_depth(e) if i in too_deep else e for i, e in enumerate(batch.events)]
        batch = dataclasses.replace(batch, events=events)
    # Validated and hashed before the device's lock, which on SQLite is the writers' turn:
    # none of it reads what is stored.
    validated = _Validated.of(batch, rules.events, too_deep)
    contents = event_contents(batch, validated)
    digest, sent = content_digest(batch, contents), request_hash(batch)
    state = lock_device_state(session, pusher.device_id)
    new = _new_batch(session, batch, pusher, received_at, digest, sent)
    if new is None:
        stored = session.execute(
            select(SyncBatch.request_hash, SyncBatch.sent_hash, SyncBatch.receipt).where(
                SyncBatch.device_id == pusher.device_id, SyncBatch.batch_id == batch.batch_id
            )
        ).one()
        # The same events, however written and in whatever order; or the same bytes,
        # whatever their validation makes of them now (a batch stored before content
        # digests: its request_hash; one stored before they ignored the order: its
        # ordered digest).
        in_order = sent in (stored.sent_hash, stored.request_hash)
        if not in_order and digest != stored.request_hash:
            in_order = ordered_content_digest(batch, contents) == stored.request_hash
            if not in_order:
                raise Conflict(
                    f"batch {batch.batch_id} was already received with other events; "
                    "a new batch needs a new batch_id",
                    code="batch_id_reused",
                    field="batch_id",
                )
        receipt = _acknowledging_no_further(stored.receipt, state)
        if in_order:
            return _answered_as_sent(receipt, batch, None)
        held = _held_versions(session, pusher.device_id, validated)
        return _answered_as_sent(receipt, batch, _Reordered(validated, held))
    return _BatchIngest(session, batch, pusher, rules, received_at, new, state, validated).run()


@dataclass(frozen=True)
class _Reordered:
    """A retry's events, which may be in another order than the first attempt's, and the
    content held for each id the retry sends in more than one version
    (``_held_versions``)."""

    validated: _Validated
    held: Mapping[uuid.UUID, str]


def _held_versions(
    session: Session, device_id: str, validated: _Validated
) -> dict[uuid.UUID, str]:
    """The content held for each id a batch sends in more than one version (a PDA's
    bug: one is applied, the others rejected ``conflicting_duplicate``), which alone
    tells, in a retry in another order, which of them the ``applied`` result is for.
    No query for a batch without such an id (every batch a PDA should send)."""
    versions: dict[uuid.UUID, set[str]] = defaultdict(set)
    for _, event in validated.valid:
        versions[event.client_event_id].add(event.content_hash)
    ids = [i for i, contents in versions.items() if len(contents) > 1]
    return {
        row.client_event_id: row.content_hash
        for chunk in chunks(ids)
        for row in session.execute(
            select(ScanEvent.client_event_id, ScanEvent.content_hash).where(
                ScanEvent.device_id == device_id, ScanEvent.client_event_id.in_(chunk)
            )
        )
    }


def _acknowledging_no_further(receipt: dict[str, Any], state: DeviceState) -> dict[str, Any]:
    """The stored ``receipt`` of a batch sent again, its ``acked_through_seq`` no further
    than the device's acknowledgement now.

    A receipt stored before ``acknowledged_through`` stopped at the highest seq held
    passed seqs a manager had written off, which a PDA only out of range still held
    unsent: its retry after a timeout got that receipt back, and the PDA pruned them.
    The acknowledgement never goes back, so a receipt stored since is never above the
    device's now, and is answered as stored."""
    now = acknowledged_through(
        state.max_seq,
        state.missing_ranges,
        state.written_off_ranges,
        held_at_write_off=state.held_at_write_off,
        acknowledged_before=state.acked_through_seq,
    )
    stored = receipt.get("acked_through_seq")
    if not isinstance(stored, int) or stored <= now:
        return receipt
    return {**receipt, "acked_through_seq": now}


def _answered_as_sent(
    receipt: dict[str, Any], batch: PushBatch, reordered: _Reordered | None
) -> dict[str, Any]:
    """The stored ``receipt`` of a batch sent again, its results at the indexes of this
    retry and each naming its event as this retry wrote its id (``_sent_id``), as every
    push's results do: a retry is the same batch by its events' content, and a PDA that
    writes its ids anew (in capitals, in braces) or lists its events in another order
    matches results by the ids it sent now. ``reordered``: the retry's events when they
    may be in another order than the first attempt's (else they are in its order)."""
    stored = receipt.get("results")
    if not stored:
        return receipt
    order = range(len(stored)) if reordered is None else _retry_order(stored, batch, reordered)
    results = []
    for index, stored_index in enumerate(order):
        result = {**stored[stored_index], "index": index}
        sent = _sent_id(batch.events[index])
        results.append(result if sent is None else {**result, "client_event_id": sent})
    return {**receipt, "results": results}


def _retry_order(
    stored: Sequence[dict[str, Any]], batch: PushBatch, reordered: _Reordered
) -> list[int]:
    """For each event of a retry, the index of its result in the stored receipt. The
    retry holds the same events (``content_digest``), so each is found by its id
    (``_id_key``); among results of one id a malformed event by its error (its code
    and message, else its code), and a version of an id sent in several by whether it
    is the one held (not rejected) or not; events of one id and content are alike, so
    which of them gets which result is the first attempt's order (a batch retried in
    its order gets its results in place)."""
    validated = reordered.validated
    by_key: dict[str | None, list[int]] = defaultdict(list)
    for stored_index, result in enumerate(stored):
        by_key[_id_key(result.get("client_event_id"))].append(stored_index)
    order: list[int | None] = [None] * len(batch.events)
    # Malformed events first: each takes a rejection of its id with its error if any,
    # else with its code (the first attempt may have been answered as its payload was
    # quarantined before). The exact ones first, so that none is taken by another
    # malformed event of that id (no id at all, say) only matching its code.
    unmatched = list(validated.rejections)
    for exact_only in (True, False):
        left = []
        for rejection in unmatched:
            raw = rejection.raw if isinstance(rejection.raw, Mapping) else {}
            candidates = by_key[_id_key(_storable(raw.get("client_event_id"), 64))]
            if not candidates:  # pragma: no cover - the same contents name the same ids
                continue
            unlike = {i: _unlikeness(stored[i], rejection.error) for i in candidates}
            chosen = min(candidates, key=unlike.__getitem__)
            if exact_only and unlike[chosen] > 0:
                left.append(rejection)
                continue
            candidates.remove(chosen)
            order[rejection.index] = chosen
        unmatched = left
    for index, event in validated.valid:
        candidates = by_key[_id_key(str(event.client_event_id))]
        held = reordered.held.get(event.client_event_id)
        if held is not None and candidates:
            rejected = event.content_hash != held
            candidates.sort(key=lambda i: (stored[i].get("status") == "rejected") != rejected)
        order[index] = candidates.pop(0) if candidates else None
    if None in order:  # pragma: no cover - the same contents name the same ids
        return list(range(len(stored)))
    return [i for i in order if i is not None]


def _unlikeness(result: Mapping[str, Any], error: EventRejected) -> int:
    """How far a stored result is from telling a malformed event its ``error``: 0 the
    same error, 1 its code, 2 another rejection, 3 not a rejection."""
    if result.get("status") != "rejected":
        return 3
    told = result.get("error") or {}
    if told.get("code") != error.code:
        return 2
    return (
        0
        if (told.get("message"), told.get("field")) == (error.message, error.field or None)
        else 1
    )


def _id_key(client_event_id: str | None) -> str | None:
    """An event id as a result names it, the same however a PDA spelt it."""
    if client_event_id is None:
        return None
    try:
        return str(uuid.UUID(client_event_id))
    except ValueError:
        return client_event_id


class _HeldEvent(NamedTuple):
    """An event the device holds, as a rejection naming its id is compared with it."""

    seq: int
    content_hash: str


class _NewBatch(NamedTuple):
    """A new batch's row id, and what was read with it (``NEW_BATCH``)."""

    pk: int
    # The highest first seq a shift of the PDA declared (``declared_first_seq_read``).
    declared_first_seq: int | None


def _new_batch(
    session: Session,
    batch: PushBatch,
    pusher: Pusher,
    received_at: dt.datetime,
    digest: str,
    sent: str,
) -> _NewBatch | None:
    """Record the batch and return its row id, with the highest first seq the device's
    shifts declared (``NEW_BATCH``); ``None`` when this device sent a batch with this id
    before (a replay: the device's lock is held, so it is committed)."""
    row = NEW_BATCH.execute(
        session,
        {
            "device_id": pusher.device_id,
            "device": pusher.device_id,  # (an insert's bindparam is not named as a column)
            "batch_id": batch.batch_id,
            "station_id": pusher.station_id,
            "courier_id": pusher.courier_id,
            "sent_at": batch.sent_at,
            "received_at": received_at,
            "clock_offset_ms": _milliseconds(batch.sent_at - received_at),
            "event_count": len(batch.events),
            "request_hash": digest,
            "sent_hash": sent,
            "receipt": "{}",  # the receipt comes last (``STORE_RECEIPT``)
        },
    ).one_or_none()
    return None if row is None else _NewBatch(row[0], row[1])


def _milliseconds(delta: dt.timedelta) -> int:
    return round(delta.total_seconds() * 1000)


class _BatchIngest:
    def __init__(
        self,
        session: Session,
        batch: PushBatch,
        pusher: Pusher,
        rules: IngestRules,
        received_at: dt.datetime,
        new: _NewBatch,
        state: DeviceState,
        validated: _Validated,
    ) -> None:
        self.session = session
        self.validated = validated
        self.batch = batch
        self.pusher = pusher
        self.rules = rules
        self.received_at = received_at
        self.clock = PushClock(batch.sent_at, received_at, rules.events)
        self.offset = self.clock.offset
        self.offset_ms = _milliseconds(self.offset)
        self.batch_pk = new.pk
        self.declared_first_seq = new.declared_first_seq
        self.state = state
        self.results: dict[int, _Result] = {}
        # (index, index of the first copy) for an event sent twice in this batch: the
        # copy shares the first one's fate, also if the database refuses it.
        self.copies: list[tuple[int, int]] = []
        self.rejections: list[_Rejection] = list(validated.rejections)
        # The rows this push quarantined: rejected events not sent (and kept) before.
        self.quarantined: list[dict[str, Any]] = []
        self.raised: list[dict[str, Any]] = []
        # The device's seq_conflict rejections not settled after this push, and the
        # (station, seq) of the flags it settled rejections of (``_settle_seq_conflicts``):
        # closed where none is left (``_close_settled_seq_conflicts``).
        self.unsettled_seq_conflicts = state.unsettled_seq_conflicts
        self.seq_conflicts_settled: set[tuple[int, int]] = set()
        # Whether it settled any: a reopening they made may be withdrawn (_lock_shifts).
        self.settled_any = False
        # The device's acked_through_seq after this push (``_update_device_state``).
        self.acked_through_seq = 0

    def run(self) -> dict[str, Any]:
        # The audit entries of the shifts it reopens are written last: the push judges
        # handover flags after reopening (lock order: flags, then the audit log).
        with audit.deferred(self.session):
            return self._run()

    def _run(self) -> dict[str, Any]:
        self.wrong_claims: dict[int, int] = {}  # seq -> a shift not this courier's (ShiftFiler)
        # Did it file events under a shift whose seqs start at its events, below the
        # highest seq held before (``_file``)?
        self.bounds_a_previous_shift = False
        self.unfiled_beyond_held = False  # events above the highest seq held, under no shift
        # Reopened shifts whose seqs its events may end sooner, or whose missing seqs
        # they may bring (``_lock_shifts``).
        self.reopened_left_open: list[Shift] = []
        # Its PDA's seqs it showed missing, above the highest held before it, and
        # whether it brought some missing before (``_seqs_changed``).
        self.gaps_shown: list[list[int]] = []
        self.gap_filled = False
        # Signed-off shifts that may own a seq it showed missing (``_lock_shifts``).
        self.may_own_gap: list[Shift] = []
        self.filed: dict[uuid.UUID, int | None] = {}  # client event id -> its shift
        # The shifts the filing read open (``ShiftFiler.seen_open``, ``_lock_shifts``).
        self.shifts_seen_open: frozenset[int] = frozenset()
        self.rows: dict[uuid.UUID, dict[str, Any]] = {}  # the rows stored, by client event id
        self.ids_by_seq: dict[int, int] = {}  # their row ids, by seq (``_event_ids``)
        # The shifts this push changes that are closed or signed off (_lock_shifts).
        self.shifts_not_open: dict[int, Shift] = {}
        # Signed-off shifts that may own an event this push quarantined (_lock_shifts).
        self.may_own_quarantined: list[Shift] = []
        # Parcels whose closed shifts this push may judge otherwise: their
        # delivered_not_checked_out flag changed, or their outcomes' folding (_project).
        self.covering_changed: set[str] = set()
        # Each touched parcel's events, as the projection read and ordered them
        # (``_project``): the drops told or taken back are folded on them, not anew.
        self.histories: dict[str, History] = {}
        # Each parcel's station and holder, as the projection left them (``_project``).
        self.holders: dict[str, tuple[int, int | None]] = {}
        copies = self._held_though_refused_now()
        new_events = self._deduplicate(
            sorted([*self.validated.valid, *copies], key=operator.itemgetter(0))
        )
        stored = self._insert(new_events)
        self._check_clock_jumps(stored)
        self._capture_consents(stored)
        self._link_proof_images(stored)
        self._quarantine()
        self._settle_copies()
        self._settle_seq_conflicts(stored)
        tracker = self._update_device_state()
        self._seqs_changed(tracker)
        self._check_time_inversions(stored, tracker)
        touched = {event.tracking_no for _, event in stored} | self._bound_drops()
        voided = [e.voids_client_event_id for _, e in stored if e.voids_client_event_id]
        targets: Sequence[Any] = []
        freed: Sequence[Any] = []  # requests a correction cancelled, asking the recipient
        corrections: dict[uuid.UUID, int] = {}
        if voided:  # a correction may be filed under another tracking number than its target
            targets = targets_of_corrections(self.session, self.pusher.device_id, voided)
            touched |= {target.tracking_no for target in targets}
            for _, event in stored:
                if event.voids_client_event_id:
                    target = event.voids_client_event_id
                    corrections[target] = max(event.seq, corrections.get(target, 0))
        handed = self._handed_over(stored, targets)
        if corrections or handed:
            # Before any parcel lock: an answer holds its request, then locks the parcel.
            # Those voided and those of the parcels handed over, in one order.
            lock_requests_to_end(
                session=self.session,
                device_id=self.pusher.device_id,
                voided=corrections,
                tracking_nos=handed,
            )
        # The questions of the requests it ends are made due together, locked in id order.
        with request_reach.questions_due_together(self.session):
            if corrections:
                freed = cancel_voided(
                    session=self.session,
                    device_id=self.pusher.device_id,
                    corrections=corrections,
                    now=self.received_at,
                )
            shifts = self._lock_shifts(stored, voided)
            self._project(touched)
            if freed:  # after the projection: under its parcels' locks, on their statuses
                send_held_back_behind(
                    session=self.session,
                    cancelled=freed,
                    per_parcel=self.rules.consent_requests_per_parcel,
                    now=self.received_at,
                )
            self._request_consents(stored)
            if handed:
                cancel_for_handed_over(
                    session=self.session, tracking_nos=handed, now=self.received_at
                )
        if voided:
            self._retract_drops(corrections, stored, targets)
        self._tell_holders_of_consents(stored, targets)
        self._settle_shifts(shifts)
        self._reopen_for_gaps_shown()
        self._judge_handovers(shifts)
        for shift in self.reopened_left_open:
            judge_reopening(session=self.session, shift=shift, now=self.received_at)
        self._close_settled_seq_conflicts()
        self._announce_drops(stored)
        receipt = self._receipt(tracker)
        receipt.encoded = RECEIPT_JSON.encode(receipt)
        self.session.flush()
        STORE_RECEIPT.execute(
            self.session, {"batch_pk": self.batch_pk, "receipt": receipt.encoded}
        )
        return receipt

    # -- classification ---------------------------------------------------------------------

    def _deduplicate(self, valid: list[tuple[int, ValidEvent]]) -> list[tuple[int, ValidEvent]]:
        """Drop events already held; reject re-used ids with other content, and re-used seqs.

        Every stored event of the device has a seq up to ``max_seq``, so only events at
        or below it are looked up: a PDA sending what is new (the usual push) costs no
        query. An event above it that re-uses a stored id (a PDA bug) is caught by the
        unique index on insert and answered in ``_insert_one_by_one``.

        The push is judged in seq order, not in the order it lists its events, so that
        no reordering of a batch changes what is held (rule 3): an id sent at several
        seqs (a PDA bug) is held at the lowest; of several events at one seq (a PDA that
        numbered from 1 again) or of one id's versions at one seq, the lowest id, then
        content digest, is, the others answered as if sent after it. Across pushes the
        first to arrive stands, as ever. Returned in the push's order.
        """
        old = [event for _, event in valid if event.seq <= self.state.max_seq]
        held_by_id = self._held_by_id([event.client_event_id for event in old])
        held_by_seq = self._held_by_seq([event.seq for event in old])
        valid = self._not_rejected_before(valid, held_by_id, held_by_seq)
        settled = self._settled_before(valid, held_by_id, held_by_seq)
        owners_before = dict(held_by_seq)  # the seqs' events held before this push
        in_batch: dict[uuid.UUID, tuple[str, int]] = {}
        fresh_at: dict[int, ValidEvent] = {}  # this push's new events, by index
        fresh = []
        for index, event in sorted(valid, key=_judged_first):
            if index in settled:  # answered as the first time, nothing raised
                self._reject(index, self.batch.events[index], settled[index])
                continue
            content_hash = event.content_hash
            held = held_by_id.get(event.client_event_id)
            earlier = in_batch.get(event.client_event_id)
            known_hash = held.content_hash if held else earlier[0] if earlier else None
            if known_hash is not None:
                owner = owners_before.get(event.seq)
                if known_hash == content_hash:
                    self._answer(index, event, "duplicate")
                    if earlier is not None:
                        self.copies.append((index, earlier[1]))
                elif (
                    held is None
                    and earlier is not None
                    and owner not in (None, event.client_event_id)
                    and _but_for_seq(event, fresh_at[earlier[1]])
                ):
                    # Its copy at a seq another event holds, after it under its new seq
                    # (README's recovery, sent at once): as in the other order.
                    self._seq_conflict(index, event, owner)
                else:
                    self._conflicting_duplicate(index, event, held.id if held else None)
                continue
            seq_owner = held_by_seq.get(event.seq)
            if seq_owner is not None and seq_owner != event.client_event_id:
                self._seq_conflict(index, event, seq_owner)
                continue
            in_batch[event.client_event_id] = (content_hash, index)
            held_by_seq[event.seq] = event.client_event_id
            fresh_at[index] = event
            fresh.append((index, event))
        return sorted(fresh, key=operator.itemgetter(0))

    def _held_though_refused_now(self) -> list[tuple[int, ValidEvent]]:
        """Answer ``duplicate`` the events refused for their tracking number alone that
        the device holds, the same event: held under a domestic format the station has
        dropped since, one sent again in a new batch (a retry split after a 413, a queue
        rebuilt) is held, not refused and quarantined beside the event holding it.
        Such a refusal is the only one a setting decides (``DOMESTIC_TRACKING_PATTERNS``);
        only a push with one at a seq held looks anything up.

        Returned, to be judged as valid events are (``_deduplicate``): those that are a
        held event but for its seq, a copy of an event set apart at the seq it was
        refused (README's recovery), which gets its first answer, ``seq_conflict``,
        however it is spelt, as it would with its format still taken."""
        candidates: dict[int, uuid.UUID] = {}
        for rejection in self.rejections:
            raw = rejection.raw
            if rejection.error.code != "invalid_tracking_no" or not isinstance(raw, Mapping):
                continue
            event_id = raw.get("client_event_id")
            seq = readable_seq(raw.get("seq"))
            parsed = _parsed_id(event_id) if isinstance(event_id, str) else None
            if parsed is not None and seq is not None and seq <= self.state.max_seq:
                candidates[rejection.index] = parsed
        if not candidates:
            return []
        held = self._held_by_id(sorted(set(candidates.values())))
        answered = set()
        copies = []
        for rejection in self.rejections:
            event_id = candidates.get(rejection.index)
            found = held.get(event_id) if event_id is not None else None
            if found is None:
                continue
            try:
                event = validate_event(rejection.raw, rules=self._any_domestic_number())
            except EventRejected:
                continue
            if event.content_hash == found.content_hash:
                self._answer(rejection.index, event, "duplicate")
            elif dataclasses.replace(event, seq=found.seq).content_hash == found.content_hash:
                copies.append((rejection.index, event))
            else:
                continue
            answered.add(rejection.index)
        self.rejections = [r for r in self.rejections if r.index not in answered]
        return copies

    def _any_domestic_number(self) -> EventRules:
        """The push's event rules taking any tracking number of no S10 shape."""
        return dataclasses.replace(self.rules.events, tracking=ANY_DOMESTIC_NUMBER)

    def _not_rejected_before(
        self,
        valid: list[tuple[int, ValidEvent]],
        held_by_id: Mapping[uuid.UUID, Any],
        held_by_seq: Mapping[int, uuid.UUID],
    ) -> list[tuple[int, ValidEvent]]:
        """``valid`` less the events sent before unchanged and rejected then, which are
        rejected again with their first answer (an event passing now may have failed a
        check the configuration has changed since, a tracking number's format). Only a
        seq the server holds an answer for but no event can be one: a PDA filling its
        gaps costs no query.

        Not an event once refused for its date alone (``OUT_OF_WINDOW``, before such
        events were kept): it is stored now, so the scan is not lost for good."""
        answered_seq = SeqTracker(self.state.max_seq, self.state.missing_ranges).holds
        candidates = {
            index: sha256_json(self.batch.events[index])
            for index, event in valid
            if answered_seq(event.seq)
            and event.seq not in held_by_seq
            and event.client_event_id not in held_by_id
        }
        if not candidates:
            return valid
        answered = self._quarantined_answers(list(set(candidates.values())))
        again = {
            index
            for index, digest in candidates.items()
            if digest in answered and answered[digest].code != OUT_OF_WINDOW
        }
        for index in sorted(again):
            self._reject(index, self.batch.events[index], answered[candidates[index]])
        return [(index, event) for index, event in valid if index not in again]

    def _settled_before(
        self,
        valid: list[tuple[int, ValidEvent]],
        held_by_id: Mapping[uuid.UUID, Any],
        held_by_seq: Mapping[int, uuid.UUID],
    ) -> dict[int, EventRejected]:
        """The events of ``valid`` that are a ``seq_conflict`` rejection settled before,
        sent again at the seq refused (a PDA's copy of an event it set apart, kept after
        README's recovery held it under a new seq), by index, with their first answer: a
        rejected event gets the same answer every time it is sent. Not a
        ``conflicting_duplicate`` of the event held under the new seq: it is that event
        but for its seq, and raises nothing (the settled flag stays closed).

        Only an event whose id is held at another seq, the same content but the seq, at
        a seq another event holds is looked up: a usual push costs no query."""
        candidates = {}
        for index, event in valid:
            held = held_by_id.get(event.client_event_id)
            owner = held_by_seq.get(event.seq)
            if (
                held is not None
                and held.seq != event.seq
                and owner is not None
                and owner != event.client_event_id
                and dataclasses.replace(event, seq=held.seq).content_hash == held.content_hash
            ):
                candidates[index] = (event.client_event_id, event.seq, held.seq)
        if not candidates:
            return {}
        answers = {
            (_parsed_id(row.client_event_id), row.seq, row.resent_seq): EventRejected(
                row.message, code=row.error_code, field=row.field
            )
            for row in self.session.execute(
                select(
                    QuarantinedEvent.client_event_id,
                    QuarantinedEvent.seq,
                    QuarantinedEvent.resent_seq,
                    QuarantinedEvent.message,
                    QuarantinedEvent.error_code,
                    QuarantinedEvent.field,
                ).where(
                    QuarantinedEvent.device_id == self.pusher.device_id,
                    QuarantinedEvent.error_code == SEQ_CONFLICT,
                    QuarantinedEvent.seq.in_(sorted({seq for _, seq, _ in candidates.values()})),
                    QuarantinedEvent.resent_seq.is_not(None),
                )
            )
        }
        return {index: answers[key] for index, key in candidates.items() if key in answers}

    def _held_by_id(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Any]:
        return {
            row.client_event_id: row
            for chunk in chunks(ids)
            for row in self.session.execute(
                select(
                    ScanEvent.client_event_id,
                    ScanEvent.content_hash,
                    ScanEvent.id,
                    ScanEvent.seq,
                ).where(
                    ScanEvent.device_id == self.pusher.device_id,
                    ScanEvent.client_event_id.in_(chunk),
                )
            )
        }

    def _held_by_seq(self, seqs: Sequence[int]) -> dict[int, uuid.UUID]:
        return {row.seq: row.client_event_id for row in self._at_seqs(OWNERS_OF_SEQS, seqs)}

    def _answer(self, index: int, event: ValidEvent, status: str) -> None:
        """The event's result, naming it by its ``client_event_id`` as the PDA wrote it
        (``_sent_id``), as a rejected one is."""
        sent = _sent_id(self.batch.events[index])
        self.results[index] = _Result(
            index, sent or str(event.client_event_id), status, seq=event.seq
        )

    def _reject(self, index: int, raw: Any, error: EventRejected) -> None:
        self.rejections.append(_Rejection(index, raw, error))

    def _conflicting_duplicate(self, index: int, event: ValidEvent, held_id: int | None) -> None:
        error = EventRejected(
            f"event {event.client_event_id} was already received with other content; "
            "the first version stands",
            code="conflicting_duplicate",
            field="client_event_id",
        )
        self._reject(index, self.batch.events[index], error)
        self._flag(
            "conflicting_duplicate",
            FlagSeverity.WARNING,
            FlagSubject.event_sent_again(self.pusher.device_id, event.client_event_id),
            {"event_ids": [held_id] if held_id else [], "batch_ids": [str(self.batch.batch_id)]},
        )

    def _seq_conflict(self, index: int, event: ValidEvent, owner: uuid.UUID) -> None:
        error = EventRejected(
            f"seq {event.seq} already belongs to event {owner} of this device, so this "
            "event was not stored: keep it, sign in again and send it under a new seq, "
            "after the new device_max_seq and the highest seq the PDA has given",
            code="seq_conflict",
            field="seq",
        )
        self._reject(index, self.batch.events[index], error)
        self._flag(
            "seq_conflict",
            FlagSeverity.WARNING,
            FlagSubject.event_seq(self.pusher.device_id, event.seq),
            {"client_event_ids": sorted({str(owner), str(event.client_event_id)})},
        )

    # -- storing ----------------------------------------------------------------------------

    def _insert(self, fresh: list[tuple[int, ValidEvent]]) -> list[tuple[int, ValidEvent]]:
        rows = [self._row(event) for _, event in fresh]
        if not rows:
            return []
        self._file(fresh, rows)
        try:
            if len(rows) == 1:  # a scan pushed as it happens: its id comes back at once
                with self._undone_if_refused():
                    self.ids_by_seq[rows[0]["seq"]] = INSERT_ONE_EVENT.execute(
                        self.session, rows[0]
                    ).scalar_one()
            else:  # executemany, which is faster without RETURNING (measured)
                with self.session.begin_nested():
                    flushed_connection(self.session).execute(INSERT_EVENTS, rows)
        except (IntegrityError, DataError):
            log.warning(
                "batch %s: the database refused an event; retrying one by one", self.batch.batch_id
            )
            return self._insert_one_by_one(fresh, rows)
        for (index, event), row in zip(fresh, rows, strict=True):
            self._answer(index, event, "applied")
            self.rows[event.client_event_id] = row
        return fresh

    def _undone_if_refused(self) -> AbstractContextManager[Any]:
        """What undoes one statement the database refuses, keeping the transaction.

        SQLite undoes a refused statement by itself and the transaction goes on (its
        default ``ABORT`` conflict resolution): a one-statement insert needs no
        savepoint there, two statements fewer for every scan pushed as it happens.
        PostgreSQL aborts the whole transaction instead, so a savepoint it is, one
        that costs no more than its two statements (``sync.direct``).
        """
        if self.session.get_bind().dialect.name == "sqlite":
            return nullcontext()
        return undone_if_refused(flushed_connection(self.session))

    def _bound_drops(self) -> set[str]:
        """Rule 6 (``sync.drop_bounds``): the times the device's other events bound its
        drops by, for the drops stored now (kept in their rows, which ``_project`` hands
        over) and for the earlier ones this push's events widened: their parcels, to be
        judged again."""
        own, rebound = bound_drops(
            self.session,
            self.pusher.device_id,
            self.batch_pk,
            (
                EventTime(row["seq"], row["occurred_at"], row["type"] in DROP_TYPES)
                for row in self.rows.values()
            ),
            held_max_seq=self.state.max_seq,
        )
        by_seq = {row["seq"]: row for row in self.rows.values()}
        for seq, bounds in own.items():
            by_seq[seq].update(bounds._asdict())
        return rebound

    def _check_time_inversions(
        self, stored: list[tuple[int, ValidEvent]], tracker: SeqTracker
    ) -> None:
        """Rule 6 (``sync.inversions``): an event dated earlier than the event before it
        on the same device (a consent "captured" before the drop it followed), by more
        than the tolerance, is flagged, whichever of the two arrived last, and whatever
        was rejected between. A pair an event stored now splits (it arrived rejected
        before, or was written off) is judged again: its seqs no inverted pair names now
        are withdrawn from their flag, closed when it names no other."""
        station_id = self.pusher.station_id
        new = {e.seq: Stamp(e.occurred_at_device, e.tracking_no, station_id) for _, e in stored}
        rejected = {
            r.seq for r in self.results.values() if r.status == "rejected" and r.seq is not None
        }
        device_id = self.pusher.device_id

        def look_up(seqs: list[int]) -> dict[int, Stamp]:
            # The event at the device's highest seq, when read with its lock: stored, it
            # stays as it is, and an online PDA's next scan needs no look-up.
            found: dict[int, Stamp] = {}
            at_max = self.state.at_max_seq
            if at_max is not None and self.state.max_seq in seqs:
                found[self.state.max_seq] = at_max
                seqs = [seq for seq in seqs if seq != self.state.max_seq]
            found.update(stored_at(self.session, device_id)(seqs))
            return found

        held_before = SeqTracker.of(self.state.max_seq, self.state.missing_ranges)
        judged = judge(
            new,
            rejected,
            tracker,
            look_up,
            nearest_stored(self.session, device_id),
            self.rules.time_inversion_tolerance,
            held_before,
        )
        # One flag per parcel, at the station its pair's later event was pushed at (this
        # push's courier's, unless the later one came from another station before it: a
        # PDA moved since), as a write-off and rejudge raise it (``sync.inversion_flags``).
        for (tracking_no, pushed_at), seqs in sorted(
            judged.inverted_at.items(), key=lambda item: (item[0][0], item[0][1] or 0)
        ):
            self._flag(
                KIND,
                FlagSeverity.WARNING,
                FlagSubject("parcel", tracking_no),
                # "device#seq": a parcel's flag gathers the inversions of every PDA
                {EVIDENCE_KEY: device_seqs(device_id, seqs)},
                station_id=pushed_at,
            )
        # A split pair's seqs leave each station's flag of the parcel that no pair of
        # that station names now: one station's pair keeps a seq on its own flag only,
        # as the events sent in order would have left it (a PDA moved between them).
        for tracking_no, seqs in sorted(judged.split.items()):
            named = device_seqs(device_id, seqs)
            withdraw_evidence(
                session=self.session,
                kind=KIND,
                subject=FlagSubject("parcel", tracking_no),
                key=EVIDENCE_KEY,
                withdrawn=set(named),
                reason=SPLIT_REASON.format(seqs=", ".join(named)),
                standing={
                    station: device_seqs(device_id, standing)
                    for (standing_no, station), standing in judged.standing_at.items()
                    if standing_no == tracking_no
                },
            )

    def _stored_ids(self) -> dict[int, int]:
        """Row ids of the events this push stored, by seq (the bulk insert does not return
        them): looked up once, by the device's seqs (integers, cheaper to read than ids)."""
        missing = sorted({row["seq"] for row in self.rows.values()} - self.ids_by_seq.keys())
        if missing and missing[-1] - missing[0] < 2 * len(missing):
            # A PDA's push is mostly a run of seqs: one range read instead of a list of
            # keys, which may hold a few of the device's other events (skipped).
            wanted = set(missing)
            in_range = plain_rows(
                self.session,
                IDS_IN_SEQ_RANGE,
                {"device_id": self.pusher.device_id, "low": missing[0], "high": missing[-1]},
            )
            self.ids_by_seq.update((row.seq, row.id) for row in in_range if row.seq in wanted)
        else:
            rows = self._at_seqs(IDS_AT_SEQS, missing)
            self.ids_by_seq.update((row.seq, row.id) for row in rows)
        return self.ids_by_seq

    def _at_seqs(self, columns: Prebuilt[Select[Any]], seqs: Sequence[int]) -> Iterator[Any]:
        """This device's stored events at ``seqs``: rows of ``columns`` (``_columns_at_seqs``)."""
        return rows_among(
            self.session, columns, "seqs", seqs, {"device_id": self.pusher.device_id}
        )

    def _event_ids(self, events: Sequence[ValidEvent]) -> dict[uuid.UUID, int]:
        """Row ids of these events, stored by this push."""
        ids = self._stored_ids()
        return {event.client_event_id: ids[event.seq] for event in events}

    def _link_proof_images(self, stored: list[tuple[int, ValidEvent]]) -> None:
        """Record the images each delivery's POD names, uploaded or not yet."""
        with_images = [e for _, e in stored if referenced_blobs(e.details)]
        if not with_images:
            return
        # An upload of one of them running meanwhile is waited for (``lock_digests``).
        lock_digests(self.session, [d for e in with_images for d in referenced_blobs(e.details)])
        ids = self._event_ids(with_images)
        INSERT_PROOF_IMAGES.execute_rows(
            self.session,
            [
                {
                    "event_id": ids[e.client_event_id],
                    "sha256": digest,
                    "tracking_no": e.tracking_no,
                }
                for e in with_images
                for digest in dict.fromkeys(referenced_blobs(e.details))
            ],
        )

    def _capture_consents(self, stored: list[tuple[int, ValidEvent]]) -> None:
        """A consent captured on the PDA becomes a consent like any other, linked to its
        event and ordered by the device's seq (rule 6)."""
        captured = [e for _, e in stored if e.type == EventType.CONSENT_CAPTURED]
        if not captured:
            return
        ids = self._event_ids(captured)
        consents.capture(
            self.session,
            ({**self.rows[e.client_event_id], "id": ids[e.client_event_id]} for e in captured),
        )

    def _request_consents(self, stored: list[tuple[int, ValidEvent]]) -> None:
        """Consent asked for at the door: each request is recorded and announced to the
        recipient's channel (``sync.consent_requests``). After the projection, which
        locked the pushed parcels' numbers (``sync.status.lock_parcels``): an online
        ask for one of them (``asking_bound`` takes that lock too) and another PDA's
        push wait for this one's commit, and find its request pending, instead of each
        sending the recipient the same question."""
        asked = [e for _, e in stored if e.type == EventType.CONSENT_REQUESTED]
        if not asked:
            return
        ids = self._event_ids(asked)
        requests_from_events(
            session=self.session,
            events=({**self.rows[e.client_event_id], "id": ids[e.client_event_id]} for e in asked),
            ttl=self.rules.consent_request_ttl,
            now=self.received_at,
            per_parcel=self.rules.consent_requests_per_parcel,
        )

    @staticmethod
    def _handed_over(stored: list[tuple[int, ValidEvent]], targets: Sequence[Any]) -> set[str]:
        """The parcels this push may put in their recipients' hands, which ends the
        questions still put to them about them (``sync.consent_requests``): those it
        brought a delivery in person (or a collection from the locker) of, and those
        whose scan it voids (a failed attempt after the delivery, a mis-tap voided: the
        parcel is back in the recipient's hands, as one push of the whole stream leaves
        it). Empty, no statement: nor for a push voiding only asks for consent."""
        return {
            e.tracking_no
            for _, e in stored
            if e.type in (EventType.DELIVERED, EventType.COLLECTED_FROM_LOCKER)
        } | {target.tracking_no for target in targets if target.type not in _NOT_STATUS}

    def _tell_holders_of_consents(
        self, stored: list[tuple[int, ValidEvent]], targets: Sequence[Any]
    ) -> None:
        """A consent captured on this PDA, or voided by its correction, changes what the
        parcel's holder may drop: their PDA hears it in its pull feed (a ``consent``
        entry), as of a consent granted or revoked online. The holder may be a colleague
        (the courier who met the recipient at the door was not the one holding the
        parcel, or the PDA changed hands): told only on the PDA that captured it, they
        would go on asking, or drop on a consent voided since. After the projection,
        which settles who holds the parcel."""
        changed = {e.tracking_no for _, e in stored if e.type == EventType.CONSENT_CAPTURED}
        changed |= {t.tracking_no for t in targets if t.type == EventType.CONSENT_CAPTURED}
        if changed:
            tell_holders(self.session, changed, self.holders)

    def _announce_drops(self, stored: list[tuple[int, ValidEvent]]) -> None:
        """Tell recipients where their parcel was left, and its pickup code (outbox). Not
        of a drop that a correction held already voids (sent in the same push, or before
        it): a mis-tap must not send the recipient to a locker, as a voided consent
        request is never sent. A drop scanned again is told once (``_first_told``)."""
        drops = [e for _, e in stored if e.type in DROP_TOPICS]
        if not drops or not any(
            outbox.wanted(self.session, topic) for topic in set(DROP_TOPICS.values())
        ):
            return
        voided = voided_at_arrival(self.session, [self.rows[e.client_event_id] for e in drops])
        drops = [e for e in drops if (self.pusher.device_id, e.client_event_id) not in voided]
        if not drops:
            return
        ids = self._event_ids(drops)
        drops = self._first_told(drops, ids)
        parcels = self._parcels_of({e.tracking_no for e in drops})
        for event in drops:
            parcel = parcels.get(event.tracking_no)
            if parcel is None:
                continue  # not taken in: no recipient to tell
            details = event.details
            data = {
                "tracking_no": parcel.tracking_no,
                "station_id": parcel.station_id,
                "recipient_name": parcel.recipient_name,
                "recipient_phone": parcel.recipient_phone,
                "pickup_code": (details.get("pod") or {}).get("pickup_code"),
                "occurred_at": self.rows[event.client_event_id]["occurred_at"],
                "event_id": ids[event.client_event_id],
            }
            if event.type == EventType.DELIVERED_TO_LOCKER:
                data |= {"locker_id": details["locker_id"], "compartment": details["compartment"]}
            else:
                data |= {"point_id": details["point_id"]}
            outbox.announce(
                session=self.session,
                topic=DROP_TOPICS[event.type],
                ordering_key=outbox.parcel_key(parcel.tracking_no),
                station_id=parcel.station_id,
                data=data,
                now=self.received_at,
            )

    def _first_told(
        self, drops: list[ValidEvent], ids: Mapping[uuid.UUID, int]
    ) -> list[ValidEvent]:
        """The drops that are the first arrived scan of their outcome: a compartment tapped
        twice is one drop (``sync.rules.final_outcomes``), and its recipient is told of it
        once, whichever of its scans arrived first (rule 3): not of a scan repeating one
        held before this push, nor of one repeating another of this push's."""
        new = set(self._stored_ids().values())
        told = []
        for drop in drops:
            scans = self._history(drop.tracking_no).scans_of_outcomes.get(
                ids[drop.client_event_id], [ids[drop.client_event_id]]
            )
            before = scans[: scans.index(ids[drop.client_event_id])]
            if all(scan in new for scan in scans) and not before:
                told.append(drop)
        return told

    def _retract_drops(
        self,
        corrections: dict[uuid.UUID, int],
        stored: list[tuple[int, ValidEvent]],
        targets: Sequence[Any],
    ) -> None:
        """Tell recipients that a drop they were told of is void (outbox): the courier's
        correction says the parcel is not in that locker or at that point. Told only to
        the subscriptions its announcement went to (within the deliveries' retention,
        ``WEBHOOK_RETENTION_DAYS``) that want this too, and only the first time a
        correction voids it. A drop scanned again is void once no scan of it stands (a
        repeat voided, the parcel is still there): its recipient was told of it by the
        scan that arrived first, whichever is voided last. After the projection, which
        reads the parcel's events."""
        listeners = outbox.subscribers(self.session, DROP_VOIDED_TOPIC)
        if not listeners:
            return
        drops = [
            drop
            for drop in self._voided_now(corrections, targets)
            # the parcel is where it was told, on another scan of the drop
            if not self._history(drop.tracking_no).stands_on_another_scan(drop.id)
        ]
        announced = self._announced_to(drops, listeners) if drops else {}
        drops = [drop for drop in drops if drop.id in announced]
        if not drops:
            return
        # The correction that voids it, as the timeline says (``sync.projection``): the
        # lowest seq above the drop's.
        correction_of: dict[int, ValidEvent] = {}
        for drop in drops:
            correction_of[drop.id] = min(
                (
                    event
                    for _, event in stored
                    if event.voids_client_event_id == drop.client_event_id and event.seq > drop.seq
                ),
                key=lambda event: event.seq,
            )
        correction_ids = self._event_ids(list(correction_of.values()))
        parcels = self._parcels_of({drop.tracking_no for drop in drops})
        for drop in drops:
            parcel = parcels.get(drop.tracking_no)
            if parcel is None:  # pragma: no cover - announced, so it was taken in
                continue
            details = drop.details
            told, station_id, announced_id = announced[drop.id]
            outbox.announce(
                session=self.session,
                topic=DROP_VOIDED_TOPIC,
                ordering_key=outbox.parcel_key(parcel.tracking_no),  # after its announcement
                station_id=station_id,
                data={
                    "tracking_no": parcel.tracking_no,
                    "station_id": station_id,
                    "recipient_name": parcel.recipient_name,
                    "recipient_phone": parcel.recipient_phone,
                    "locker_id": details.get("locker_id"),
                    "compartment": details.get("compartment"),
                    "point_id": details.get("point_id"),
                    "event_id": announced_id,  # what the recipient was told of
                    "correction_event_id": correction_ids[correction_of[drop.id].client_event_id],
                    "voided_at": self.received_at,
                },
                now=self.received_at,
                only_to=told,
            )

    def _parcels_of(self, tracking_nos: set[str]) -> dict[str, Parcel]:
        """The parcels taken in among these tracking numbers, with their recipients."""
        return {
            parcel.tracking_no: parcel
            for chunk in chunks(sorted(tracking_nos))
            for parcel in self.session.scalars(
                select(Parcel).where(among(self.session, Parcel.tracking_no, chunk))
            )
        }

    def _voided_now(self, corrections: dict[uuid.UUID, int], targets: Sequence[Any]) -> list[Any]:
        """The drops among these corrections' ``targets`` that were stored before this
        push (one stored with it was never announced) and that no correction stored
        before voided already (retracted then, or never announced)."""
        device_id = self.pusher.device_id
        drops = [
            target
            for target in targets
            if target.type in DROP_TOPICS
            and target.client_event_id not in self.rows
            and target.seq < corrections[target.client_event_id]
        ]
        seq_of = {drop.client_event_id: drop.seq for drop in drops}
        void_before = {
            target
            for chunk in chunks(list(seq_of))
            for target, seq, client_event_id in self.session.execute(
                select(
                    ScanEvent.voids_client_event_id, ScanEvent.seq, ScanEvent.client_event_id
                ).where(
                    ScanEvent.device_id == device_id,
                    ScanEvent.voids_client_event_id.in_(chunk),
                )
            )
            if client_event_id not in self.rows and seq > seq_of[target]
        }
        return [drop for drop in drops if drop.client_event_id not in void_before]

    def _announced_to(
        self, drops: Sequence[Any], listeners: set[int]
    ) -> dict[int, tuple[set[int], int | None, int]]:
        """Which of ``listeners`` each drop's announcement went to (its delivery, whatever
        became of it), the station it named and the scan it named (``event_id``), by the
        drop's row id: by the parcel's ordering key, on the deliveries' index, then the
        message's ``event_id``. The retraction names that station, not the parcel's now:
        a parcel re-routed since must not take it away from the station's subscriptions
        that were told; and that scan, not the one voided last: a drop scanned twice was
        announced by the scan that arrived first, which its receiver knows it by."""
        # A drop scanned again was announced by the scan that arrived first (``_first_told``)
        told_by = {
            scan: drop.id
            for drop in drops
            for scan in self._history(drop.tracking_no).scans_ever(drop.id)
        }
        found: dict[int, set[int]] = defaultdict(set)
        named: dict[int, tuple[int | None, int]] = {}
        for chunk in chunks(sorted({outbox.parcel_key(drop.tracking_no) for drop in drops})):
            for subscription_id, payload, station_id in self.session.execute(
                select(
                    WebhookDelivery.subscription_id,
                    OutboxMessage.payload,
                    OutboxMessage.station_id,
                )
                .join(OutboxMessage, OutboxMessage.id == WebhookDelivery.message_id)
                .where(
                    WebhookDelivery.subscription_id.in_(sorted(listeners)),
                    WebhookDelivery.ordering_key.in_(chunk),
                    WebhookDelivery.topic.in_(sorted(set(DROP_TOPICS.values()))),
                )
                .order_by(OutboxMessage.id)  # a drop announced again: the latest names it
            ):
                drop_id = told_by.get(payload.get("event_id"))
                if drop_id is not None:
                    found[drop_id].add(subscription_id)
                    named[drop_id] = (station_id, payload["event_id"])
        return {drop_id: (told, *named[drop_id]) for drop_id, told in found.items()}

    def _check_clock_jumps(self, stored: list[tuple[int, ValidEvent]]) -> None:
        """Events dated after the push was sent (the PDA's clock went back in between), or
        more than ``max_age`` before it (it went forward, or the PDA kept them that long).

        The PDA's one flag names such events of every push (``client_event_ids``
        accumulate, ``sync.flags.MAX_EVIDENCE_IDS`` of them, a push's deliveries
        first): a delivery's proof lists the flag that cites it (``sync.proofs.cites``)
        however often the clock jumps again, and a manager's decision covers the events
        it was made on, not later ones. Past that bound, the latest push that jumped
        again is cited under ``past_bound`` (its deliveries first) and counted there
        (``sync.flags._merged``): the flag is open again, its ``evidence_version``
        changes, and the manager finds the delivery that reopened it. (The counts and
        ``last_batch_id`` describe the last push only; they are not in the version.)
        """
        ahead = [event for _, event in stored if self.clock.ahead(event.occurred_at_device)]
        behind = [event for _, event in stored if self.clock.behind(event.occurred_at_device)]
        if ahead or behind:
            jumped = [
                str(event.client_event_id)
                for event in sorted(
                    (*ahead, *behind),
                    key=lambda e: (e.type not in DELIVERY_TYPES, str(e.client_event_id)),
                )
            ]
            self._flag(
                "clock_jump",
                FlagSeverity.WARNING,
                FlagSubject("device", self.pusher.device_id),
                {
                    "client_event_ids": jumped,
                    "events_ahead": len(ahead),
                    "events_behind": len(behind),
                    "sent_at": self.batch.sent_at.isoformat(),
                    "last_batch_id": str(self.batch.batch_id),
                },
            )

    def _insert_one_by_one(
        self, fresh: list[tuple[int, ValidEvent]], rows: list[dict[str, Any]]
    ) -> list[tuple[int, ValidEvent]]:
        stored = []
        for (index, event), row in zip(fresh, rows, strict=True):
            try:
                with self.session.begin_nested():
                    self.session.execute(INSERT_EVENTS, [row])
            except (IntegrityError, DataError) as exc:
                self._refused(index, event, exc)
            else:
                self._answer(index, event, "applied")
                self.rows[event.client_event_id] = row
                stored.append((index, event))
        return stored

    def _refused(self, index: int, event: ValidEvent, exc: Exception) -> None:
        """Why the database refused an event: a stored id or seq, or a value it cannot hold."""
        held = self._held_by_id([event.client_event_id]).get(event.client_event_id)
        if held is not None:
            if held.content_hash == event.content_hash:
                self._answer(index, event, "duplicate")
            else:
                self._conflicting_duplicate(index, event, held.id)
            return
        owner = self._held_by_seq([event.seq]).get(event.seq)
        if owner is not None:
            self._seq_conflict(index, event, owner)
            return
        log.warning("event %s refused by the database: %s", event.client_event_id, exc)
        self._reject(
            index,
            self.batch.events[index],
            EventRejected(
                "the database refused this event; it is kept in quarantine", code="unstorable"
            ),
        )

    def _row(self, event: ValidEvent) -> dict[str, Any]:
        return event_row(
            event,
            pusher=self.pusher,
            batch_pk=self.batch_pk,
            clock=self.clock,
        )

    def _file(self, fresh: list[tuple[int, ValidEvent]], rows: list[dict[str, Any]]) -> None:
        """Each new event's shift (``sync.shifts.ShiftFiler``), on its corrected time."""
        filings = [Filing(row["seq"], row["claimed_shift_id"], row["occurred_at"]) for row in rows]
        filer = ShiftFiler(
            self.session,
            self.pusher.device_id,
            self.pusher.courier_id,
            self.rules.shifts,
            filings,
            colleagues=True,
        )
        for (_, event), row, filing in zip(fresh, rows, filings, strict=True):
            row["shift_id"] = self.filed[event.client_event_id] = filer.file(filing)
            row["courier_id"] = filer.recorded_by(row["shift_id"]) or row["courier_id"]
        self.wrong_claims = filer.wrong_claims
        self.shifts_seen_open = filer.seen_open
        # Only a seq below one the server had can end a previous shift's seqs before a
        # rejected seq it held (``judge_reopening``): pushes in order do not.
        self.bounds_a_previous_shift = any(
            row["seq"] <= self.state.max_seq and filer.starts_at_its_events(row["shift_id"])
            for row in rows
        )
        # Seqs above the highest held and below a first seq a shift declared may be ones
        # a signed-off shift owned still on the PDA (that first seq showed them used):
        # filed under no shift, they end its missing seqs without an event of its own
        # (``judge_reopening``). Pushed in order, none is.
        declared = self.declared_first_seq or 0
        self.unfiled_beyond_held = any(
            row["shift_id"] is None and self.state.max_seq < row["seq"] < declared for row in rows
        )

    def _touch_device(self, connection: Connection) -> None:
        """The device's last-seen time, when a minute old (``TOUCH_DEVICE``, conditional);
        within a minute of what was read with the device's sync state
        (``DeviceState.device_seen_at``), without a statement."""
        seen_before = self.received_at - LAST_SEEN_RESOLUTION
        seen_at = self.state.device_seen_at
        if seen_at is not None and seen_at > seen_before:
            return
        TOUCH_DEVICE.run(
            connection,
            {
                "device": self.pusher.device_id,
                "seen_at": self.received_at,
                "seen_before": seen_before,
            },
        )

    def _quarantine(self) -> None:
        """Keep every rejected event; one re-sent is answered as it was the first time.

        Rows go in with one Core executemany: the ORM inserts them one statement each
        on SQLite (it wants each row's id back), and a broken PDA's push of 5,000
        malformed events held the writers' turn through 5,000 of them."""
        if not self.rejections:
            return
        for rejection in self.rejections:
            rejection.payload_hash = sha256_json(rejection.raw)
        answered = self._quarantined_answers([r.payload_hash for r in self.rejections])
        rows = []
        new: dict[str, Any] = {}  # what the PDA sent of each row, by payload hash
        for rejection in self.rejections:
            previous = answered.get(rejection.payload_hash)
            if previous is not None:
                rejection.error = previous
            else:
                answered[rejection.payload_hash] = rejection.error
                rows.append(self._quarantine_row(rejection))
                new[rejection.payload_hash] = rejection.raw
            raw = rejection.raw if isinstance(rejection.raw, Mapping) else {}
            self.results[rejection.index] = _Result(
                rejection.index,
                _storable(raw.get("client_event_id"), 64),
                "rejected",
                rejection.error,
                seq=readable_seq(raw.get("seq")),
            )
        if rows:
            flushed_connection(self.session).execute(INSERT_QUARANTINED, rows)
            self._link_rejected_images(rows, new)
        self.quarantined = rows

    def _link_rejected_images(self, rows: list[dict[str, Any]], sent: Mapping[str, Any]) -> None:
        """Record the images named by the PODs of the events just quarantined (``rows``;
        ``sent``: what the PDA sent of each, by payload hash), with the parcel each event
        names (``RejectedImage``): an auditor's read of such an image is filed under that
        parcel. Their ids are read back by payload hash (the rows went in without them)
        only when one names an image and a parcel: a rare push, yet one of thousands of
        such rows (a PDA whose app refused every drop), so in one parameter
        (``among_at_once``), not a variable each: a SQLite before 3.32 takes 999."""
        parcels = {row["payload_hash"]: row["parcel_tracking_no"] for row in rows}
        named = {
            payload_hash: digests
            for payload_hash, parcel in parcels.items()
            if parcel is not None and (digests := images_named(sent[payload_hash]))
        }
        if not named:
            return
        ids = self.session.execute(
            select(QuarantinedEvent.payload_hash, QuarantinedEvent.id).where(
                QuarantinedEvent.device_id == self.pusher.device_id,
                among_at_once(self.session, QuarantinedEvent.payload_hash, sorted(named)),
            )
        )
        self.session.execute(
            insert(RejectedImage),
            [
                {"quarantined_event_id": row_id, "sha256": digest, "tracking_no": parcels[key]}
                for key, row_id in ids
                for digest in named[key]
            ],
        )

    def _quarantined_answers(self, hashes: Sequence[str]) -> dict[str, EventRejected]:
        """What the events of this device with these payload hashes were answered when
        they were quarantined, by hash."""
        return {
            row.payload_hash: EventRejected(row.message, code=row.error_code, field=row.field)
            for row in rows_among(
                self.session,
                QUARANTINED(self.session),
                "hashes",
                hashes,
                {"device_id": self.pusher.device_id},
            )
        }

    def _settle_copies(self) -> None:
        for index, first in self.copies:
            if self.results[first].status == "rejected":
                self.results[index] = dataclasses.replace(self.results[first], index=index)

    def _settle_seq_conflicts(self, stored: list[tuple[int, ValidEvent]]) -> None:
        """Settle the device's ``seq_conflict`` rejections whose event it now holds under
        another seq: README's recovery, the PDA sending each event set apart again under
        a new seq, the same event otherwise (its ``client_event_id`` and content). Its
        quarantine row names that seq (``resent_seq``), and the seq's flag is closed
        once every rejection of the seq at its station is settled
        (``_close_settled_seq_conflicts``).

        Looked for only by a push storing events, or quarantining a ``seq_conflict``
        (the copy of an event held already, at its old seq, written otherwise:
        ``_settled_before``), while the device has rejections not settled
        (``DeviceState.unsettled_seq_conflicts``, this push's own included): a PDA
        without any pays no statement. A rejection and the event held under its id
        never change once stored, so each pair is compared once, by the push bringing
        the later of the two: only the rejections naming (``unsettled_event_id``) an
        event this push stores or a rejection it quarantines are read, and their events
        looked up; a PDA left with thousands of rejections it never recovers pays one
        index probe per event it pushes, not all of them on each push, and one more
        for those naming no event (``_unnamed_unsettled``: kept by the version before
        during the rollout), named once compared. Those kept before that version
        (``DeviceState.seq_conflicts_compared`` false) are all compared once, by the
        device's next push storing events. Each rejection whose id the
        device holds at another seq is validated again, any domestic tracking number
        taken (the event held passed the patterns of its day), and compared with it, the
        seq aside; only those rejections' payloads are read."""
        new = [row for row in self.quarantined if row["error_code"] == SEQ_CONFLICT]
        self.unsettled_seq_conflicts = self.state.unsettled_seq_conflicts + len(new)
        if not self.unsettled_seq_conflicts or not (stored or new):
            return
        compared = self.state.seq_conflicts_compared
        if compared:
            named = {event.client_event_id for _, event in stored}
            named.update(row["unsettled_event_id"] for row in new)
            named.discard(None)
            rows = [*self._unsettled_naming(sorted(named)), *self._unnamed_unsettled()]
        else:
            rows = self._every_unsettled()
        ids = {row.id: _parsed_id(row.client_event_id) for row in rows}
        held = self._held_under_ids(sorted({i for i in ids.values() if i is not None}), stored)
        resent = {
            row.id: found
            for row in rows
            if (parsed := ids[row.id]) is not None
            and (found := held.get(parsed)) is not None
            and found.seq != row.seq  # else not sent again (yet)
        }
        settled = []
        for row_id, payload in self._payloads_of(sorted(resent)):
            found = resent[row_id]
            try:  # any domestic number: the event held may be of a format dropped since
                event = validate_event(json.loads(payload), rules=self._any_domestic_number())
            except (EventRejected, ValueError, TypeError):
                continue  # not valid now (the rules changed): no event held is the same
            if dataclasses.replace(event, seq=found.seq).content_hash == found.content_hash:
                settled.append((row_id, found.seq))
        done = {row_id for row_id, _ in settled}
        if compared:
            self.unsettled_seq_conflicts -= len(settled)
        else:
            self.unsettled_seq_conflicts = len(rows) - len(settled)
        self._name_events(rows, ids, done)
        if not compared:
            self._mark_compared()
        if not settled:
            return
        flushed_connection(self.session).execute(
            SETTLE_SEQ_CONFLICT, [{"row_id": row_id, "resent": seq} for row_id, seq in settled]
        )
        self.settled_any = True
        # Closed only where no rejection of the seq is left (``_close_settled_seq_conflicts``).
        self.seq_conflicts_settled = {(row.station_id, row.seq) for row in rows if row.id in done}

    def _unsettled_naming(self, event_ids: Sequence[uuid.UUID]) -> list[Any]:
        """The device's ``seq_conflict`` rejections not settled that name these events
        (``ix_quarantined_event_unsettled``). Not one the version before settled during
        the rollout: it set ``resent_seq`` alone, leaving the event named."""
        return [
            row
            for chunk in chunks(event_ids)
            for row in self.session.execute(
                select(*UNSETTLED_COLUMNS).where(
                    QuarantinedEvent.device_id == self.pusher.device_id,
                    QuarantinedEvent.unsettled_event_id.in_(chunk),
                    QuarantinedEvent.resent_seq.is_(None),
                )
            )
        ]

    def _unnamed_unsettled(self) -> list[Any]:
        """The device's ``seq_conflict`` rejections not settled that name no event: kept
        by the version before during the rollout of this one, after migration
        ``e9c3b7a5d1f2`` marked the PDA compared. An empty range of
        ``ix_quarantined_event_unnamed`` but for those (its predicate written as the
        index's, constants and all, for the planners to take it)."""
        return list(
            self.session.execute(
                select(*UNSETTLED_COLUMNS).where(
                    QuarantinedEvent.device_id == self.pusher.device_id,
                    text(UNNAMED_SEQ_CONFLICT),
                )
            )
        )

    def _every_unsettled(self) -> list[Any]:
        """Every ``seq_conflict`` rejection of the device not settled: those kept before
        rejections named their events (``DeviceState.seq_conflicts_compared``)."""
        return list(
            self.session.execute(
                select(*UNSETTLED_COLUMNS).where(
                    QuarantinedEvent.device_id == self.pusher.device_id,
                    QuarantinedEvent.error_code == SEQ_CONFLICT,
                    QuarantinedEvent.resent_seq.is_(None),
                )
            )
        )

    def _held_under_ids(
        self, event_ids: Sequence[uuid.UUID], stored: list[tuple[int, ValidEvent]]
    ) -> dict[uuid.UUID, _HeldEvent]:
        """The device's events held under these ids, with their seq and content hash:
        those this push stores as it stores them, the others looked up."""
        wanted = set(event_ids)
        held = {
            event.client_event_id: _HeldEvent(event.seq, event.content_hash)
            for _, event in stored
            if event.client_event_id in wanted
        }
        for chunk in chunks(sorted(wanted - held.keys())):
            for found in self.session.execute(
                select(ScanEvent.client_event_id, ScanEvent.seq, ScanEvent.content_hash).where(
                    ScanEvent.device_id == self.pusher.device_id,
                    ScanEvent.client_event_id.in_(chunk),
                )
            ):
                held[found.client_event_id] = _HeldEvent(found.seq, found.content_hash)
        return held

    def _name_events(
        self, rows: Sequence[Any], ids: Mapping[int, uuid.UUID | None], settled: set[int]
    ) -> None:
        """Once these rejections were compared with every event held: name the event of
        each left unsettled that names none yet (kept before rejections did, or by the
        version before during the rollout), so the pushes storing it find it."""
        unnamed = [
            {"row_id": row.id, "event_id": ids[row.id]}
            for row in rows
            if row.id not in settled and row.unsettled_event_id is None and ids[row.id]
        ]
        if unnamed:
            flushed_connection(self.session).execute(NAME_UNSETTLED_EVENT, unnamed)

    def _mark_compared(self) -> None:
        """Say every rejection of the device was compared with every event held."""
        flushed_connection(self.session).execute(
            update(_states)
            .where(_states.c.device_id == self.pusher.device_id)
            .values(seq_conflicts_compared=True)
        )

    def _payloads_of(self, row_ids: Sequence[int]) -> Iterator[tuple[int, str]]:
        """The payloads of these quarantined events of the device, by row id."""
        for chunk in chunks(row_ids):
            yield from self.session.execute(
                select(QuarantinedEvent.id, QuarantinedEvent.payload).where(
                    QuarantinedEvent.id.in_(chunk)
                )
            )

    def _close_settled_seq_conflicts(self) -> None:
        """Close the ``seq_conflict`` flags of the seqs this push settled rejections of
        (``_settle_seq_conflicts``) and none is left unsettled, at their station,
        whatever their status (their cause, an event the server held nothing of, is
        gone), the system's change on the audit log with the reason.

        Only where every event refused the seq was pushed by the courier who pushed the
        event holding it: a PDA that numbered from 1 again. One pushed by another
        courier is what a colleague signed in with the PDA's id leaves, taking seqs the
        PDA had yet to push (SECURITY.md): that flag stays for the manager to see,
        whatever the PDA's recovery did."""
        if not self.seq_conflicts_settled:
            return
        seqs = sorted({seq for _, seq in self.seq_conflicts_settled})
        pushers: dict[tuple[int, int], set[int]] = defaultdict(set)
        left: set[tuple[int, int]] = set()  # a rejection of the seq is not settled
        for row in self.session.execute(
            select(
                QuarantinedEvent.station_id,
                QuarantinedEvent.seq,
                QuarantinedEvent.resent_seq,
                SyncBatch.courier_id,
            )
            .join(SyncBatch, SyncBatch.id == QuarantinedEvent.batch_pk)
            .where(
                QuarantinedEvent.device_id == self.pusher.device_id,
                QuarantinedEvent.seq.in_(seqs),
                QuarantinedEvent.error_code == SEQ_CONFLICT,
            )
        ):
            pushers[(row.station_id, row.seq)].add(row.courier_id)
            if row.resent_seq is None:
                left.add((row.station_id, row.seq))
        holders = {
            row.seq: row.courier_id
            for row in self.session.execute(
                select(ScanEvent.seq, ScanEvent.courier_id).where(
                    ScanEvent.device_id == self.pusher.device_id, ScanEvent.seq.in_(seqs)
                )
            )
        }
        settled = {
            (station_id, seq)
            for station_id, seq in self.seq_conflicts_settled - left
            if pushers[(station_id, seq)] <= {holders.get(seq)}
        }
        if not settled:
            return
        keys = {device_seq(self.pusher.device_id, seq) for _, seq in settled}
        found = self.session.execute(
            select(Flag.id, Flag.station_id, Flag.subject_key).where(
                Flag.kind == SEQ_CONFLICT,
                Flag.subject_type == "event",
                Flag.subject_key.in_(sorted(keys)),
                Flag.status.in_(STANDING),
            )
        ).all()
        ids = [
            flag.id
            for flag in found
            if (named := split_device_seq(flag.subject_key)) is not None
            and (flag.station_id, named[1]) in settled
        ]
        close_flags_by_id(
            session=self.session, flag_ids=ids, reason=SEQ_CONFLICT_SETTLED, statuses=STANDING
        )

    def _quarantine_row(self, rejection: _Rejection) -> dict[str, Any]:
        raw = rejection.raw if isinstance(rejection.raw, Mapping) else {}
        tracking_no = _storable(raw.get("tracking_no"), 40)
        return {
            "station_id": self.pusher.station_id,
            "device_id": self.pusher.device_id,
            "batch_pk": self.batch_pk,
            "position": rejection.index,
            "client_event_id": _storable(raw.get("client_event_id"), 64),
            "seq": readable_seq(raw.get("seq")),
            "event_type": _storable(raw.get("type"), 40),
            "tracking_no": tracking_no,
            "parcel_tracking_no": parcel_named(tracking_no),
            "error_code": rejection.error.code,
            "message": rejection.error.message,
            "field": _storable(rejection.error.field, 64),
            "payload": _ascii_json(rejection.raw),
            "payload_hash": rejection.payload_hash,
            "received_at": self.received_at,
            # What a push storing that event finds it by (``_settle_seq_conflicts``).
            "unsettled_event_id": (
                _parsed_id(raw.get("client_event_id"))
                if rejection.error.code == SEQ_CONFLICT
                and isinstance(raw.get("client_event_id"), str)
                else None
            ),
        }

    # -- device state: acknowledgements and clock -------------------------------------------

    def _update_device_state(self) -> SeqTracker:
        tracker = SeqTracker.of(self.state.max_seq, self.state.missing_ranges)
        arrived = [r.seq for r in self.results.values() if r.seq is not None]
        tracker.add_all(arrived)
        # A written-off seq that arrives after all is held like any other: its write-off
        # is moot (``sync.lost_seqs``).
        written_off = self.state.written_off_ranges
        if written_off:
            written_off = without(written_off, [[seq, seq] for seq in arrived])
        # Not past written-off seqs the PDA may still hold unsent (``acknowledged_through``).
        self.acked_through_seq = acknowledged_through(
            tracker.max_seq,
            tracker.missing,
            written_off,
            held_at_write_off=self.state.held_at_write_off,
            acknowledged_before=self.state.acked_through_seq,
        )
        # Written past the ORM: a copy the session holds is flushed first, expired after.
        held = held_state(self.session, self.pusher.device_id)
        self.session.flush()  # whatever the session's autoflush says
        connection = flushed_connection(self.session)  # the one kept: no look-up
        STORE_DEVICE_STATE.run(
            connection,
            {
                "state_of": self.pusher.device_id,
                "new_max_seq": tracker.max_seq,
                "new_missing_ranges": tracker.missing,
                "new_written_off_ranges": written_off,
                "new_acked_through_seq": self.acked_through_seq,
                "new_unsettled_seq_conflicts": self.unsettled_seq_conflicts,
                "new_clock_offset_ms": self.offset_ms,
                "new_clock_measured_at": self.received_at,
                "new_last_push_at": self.received_at,
            },
        )
        if held is not None:
            self.session.expire(held)
        self._touch_device(connection)
        if abs(self.offset) > self.rules.clock_skew_bound:
            self._flag(
                "clock_skew",
                FlagSeverity.WARNING,
                FlagSubject("device", self.pusher.device_id),
                {
                    "clock_offset_ms": self.offset_ms,
                    "bound_ms": round(self.rules.clock_skew_bound.total_seconds() * 1000),
                    "measured_at": self.received_at.isoformat(),
                    "last_batch_id": str(self.batch.batch_id),
                },
            )
        return tracker

    def _seqs_changed(self, tracker: SeqTracker) -> None:
        """What the push did to its PDA's gaps, read off the seqs held before and after
        it, in memory: the seqs it showed missing (a seq arrived beyond the next one
        expected), and whether it brought seqs that were missing. Only such a push looks
        for the shifts a gap reopens or whose reopening it withdraws (``_lock_shifts``):
        a PDA pushing its seqs in order pays nothing for them."""
        before = self.state.missing_ranges
        self.gaps_shown = without(tracker.missing, before)
        self.gap_filled = bool(before) and bool(without(before, tracker.missing))

    # -- shifts ----------------------------------------------------------------------------

    def _lock_shifts(
        self, stored: list[tuple[int, ValidEvent]], voided: list[uuid.UUID]
    ) -> dict[int, list[ValidEvent]]:
        """Lock the shifts these events change, before their parcels are judged again.

        ``{shift id: the new events that change it}``: the shifts the events are filed
        under, and those whose events the corrections among them void. A close or a
        sign-off of one of them waits for this push, or this push for it, so each
        sees the other's events or status, never neither (on PostgreSQL; SQLite's
        writers take turns anyway). The events' foreign key to their shift would make
        the insert wait too, but not a correction filed under another shift. These
        are the only shifts whose handover the push can change.
        """
        by_shift: dict[int, list[ValidEvent]] = {}
        for _, event in stored:
            shift_id = self.filed.get(event.client_event_id)
            if shift_id is not None:
                by_shift.setdefault(shift_id, []).append(event)
        corrections = {e.voids_client_event_id: e for _, e in stored if e.voids_client_event_id}
        for chunk in chunks(voided):
            for shift_id, target in self.session.execute(
                select(ScanEvent.shift_id, ScanEvent.client_event_id).where(
                    ScanEvent.device_id == self.pusher.device_id,
                    ScanEvent.client_event_id.in_(chunk),
                    ScanEvent.shift_id.is_not(None),
                )
            ):
                by_shift.setdefault(shift_id, []).append(corrections[target])
        device_id = self.pusher.device_id
        may_withdraw = self.bounds_a_previous_shift or self.gap_filled or self.unfiled_beyond_held
        also = [
            where
            for where in (
                self._owners_of_quarantined(),
                reopened_with_seqs_left_open(device_id) if may_withdraw else None,
                may_own_revealed_gap(device_id, self.gaps_shown[0][0])
                if self.gaps_shown
                else None,
                reopened_since_signoff(device_id) if self.settled_any else None,
            )
            if where is not None
        ]
        locked = lock_shifts(
            self.session,
            by_shift,
            also=or_(*also) if also else None,
            seen_open=self.shifts_seen_open,
        )
        self.shifts_not_open = {i: shift for i, shift in locked.items() if i in by_shift}
        # A rejected event of its settled (``_settle_seq_conflicts``) is no reopened
        # shift's any more: a reopening it made alone is withdrawn.
        self.reopened_left_open = [
            shift
            for i, shift in locked.items()
            if (may_withdraw and shift.last_seq is None or self.settled_any)
            and i not in by_shift
            and shift.device_id == self.pusher.device_id
            and shift.status == ShiftStatus.CLOSED
            and shift.signed_off_at is not None
        ]
        self.may_own_gap = [
            shift
            for i, shift in locked.items()
            if self.gaps_shown
            and i not in by_shift
            and shift.device_id == device_id
            and shift.status == ShiftStatus.SIGNED_OFF
            and shift.last_seq is None
        ]
        # None when it quarantined nothing new: its late events' shifts are no owners.
        # Those reopened since their sign-off too: their reopening names what is theirs.
        self.may_own_quarantined = [
            shift
            for shift in locked.values()
            if self.quarantined
            and shift.signed_off_at is not None
            and shift.status in (ShiftStatus.SIGNED_OFF, ShiftStatus.CLOSED)
            and shift.station_id == self.pusher.station_id
        ]
        return by_shift

    def _owners_of_quarantined(self) -> ColumnElement[bool] | None:
        """The shifts that may own what this push quarantined (``may_own_rejected``),
        locked with its shifts: a rejected event of a signed-off shift reopens it as a
        late one does (``_settle_shifts``). None when it quarantined nothing new: a
        rejected event sent again was seen by whoever signed off after it first came."""
        if not self.quarantined:
            return None
        rows = self.quarantined
        return may_own_rejected(
            self.pusher.device_id,
            [row["seq"] for row in rows if row["seq"] is not None],
            [
                row["parcel_tracking_no"]
                for row in rows
                if row["seq"] is None and row["parcel_tracking_no"]
            ],
        )

    def _settle_shifts(self, by_shift: dict[int, list[ValidEvent]]) -> None:
        """A PDA naming a shift that is not its own is flagged; a signed-off shift that
        gets events (or loses one to a correction) reopens, and one reopened with no
        event of its own named gets them named (``sync.shifts.judge_reopening``). (The handover
        flags of closed shifts were judged again with the parcels, in ``_project``.)"""
        if self.wrong_claims:
            claims = self.wrong_claims
            self._flag(
                WRONG_SHIFT,
                FlagSeverity.WARNING,
                FlagSubject("device", self.pusher.device_id),
                {
                    "seqs": sorted(claims),
                    "claimed_shift_ids": sorted(set(claims.values())),
                    "last_batch_id": str(self.batch.batch_id),
                },
            )
        rejected = self._quarantined_for_signed_off()
        # Signed off, or reopened since their sign-off and not signed off again (rarely
        # any such shift): what of theirs this push brought came after the sign-off.
        judged = {
            shift.id: shift
            for shift in (*self.shifts_not_open.values(), *self.may_own_quarantined)
            if shift.signed_off_at is not None and shift.status != ShiftStatus.OPEN
        }
        brought = [e for shift_id in judged for e in by_shift.get(shift_id, [])]
        ids = self._event_ids(brought) if brought else {}
        for shift_id, shift in sorted(judged.items()):
            arrived = [ids[e.client_event_id] for e in by_shift.get(shift_id, [])]
            if arrived or rejected.get(shift_id):
                self._report_raised(
                    judge_reopening(
                        session=self.session,
                        shift=shift,
                        now=self.received_at,
                        arrived=arrived,
                        rejected=rejected.get(shift_id, []),
                    )
                )

    def _reopen_for_gaps_shown(self) -> None:
        """A signed-off shift that owns seqs this push showed missing (a gap its seqs
        end in: the next shift's event arrived, its own still on the PDA) no longer has
        the balance its manager signed off: it reopens, as the next shift's opening
        reopens it for the same (``sync.shifts.judge_reopening``), whichever
        came first (rule 3). Only a push showing a gap has any to judge."""
        for shift in self.may_own_gap:
            self._report_raised(
                judge_reopening(
                    session=self.session,
                    shift=shift,
                    now=self.received_at,
                    details={"batch_id": str(self.batch.batch_id)},
                )
            )

    def _quarantined_for_signed_off(self) -> dict[int, list[int]]:
        """``{signed-off shift id: ids of the rows this push quarantined that are its}``,
        by the scope its page lists its rejected events by (``ShiftFacts.rejection_scope``,
        ``sync.quarantine.RejectionScope``), pushed at its station. Read only for
        those ``may_own_rejected`` found: rarely any."""
        if not self.may_own_quarantined:
            return {}
        facts = gather(self.session, self.may_own_quarantined)
        scopes = {shift_id: f.rejection_scope(f.balance()) for shift_id, f in facts.items()}
        return rejections_of_batch(
            session=self.session,
            scopes=scopes,
            batch_pk=self.batch_pk,
            station_id=self.pusher.station_id,
        )

    def _judge_handovers(self, by_shift: dict[int, list[ValidEvent]]) -> None:
        """Closed shifts that got events (a late batch) or lost one to a correction: their
        handover flags are judged again (the parcel thought missing was returned). So
        are those holding events of a parcel whose ``delivered_not_checked_out`` flag
        this push raised, closed or gave other events (a check-out arrived after the
        shift that delivered it closed), or whose earlier final outcomes it folded
        otherwise (the first scan of an outcome another shift scanned again arrived):
        whether that shift's ``not_on_manifest`` is wanted depends on it. A push that
        changes neither costs no query here."""
        closed = dict(self.shifts_not_open) if by_shift else {}
        if self.covering_changed:
            for shift_id, shift in closed_shifts_holding(
                self.session, self.covering_changed
            ).items():
                closed.setdefault(shift_id, shift)
        if closed:
            self._report_raised(
                refresh_handover_flags(session=self.session, shifts=list(closed.values()))
            )

    def _report_raised(self, flags: Iterable[Flag]) -> None:
        known = {item["flag_id"] for item in self.raised}
        self.raised.extend(
            {
                "flag_id": flag.id,
                "kind": flag.kind,
                "subject_type": flag.subject_type,
                "subject_key": flag.subject_key,
            }
            for flag in flags
            if flag.id not in known
        )

    # -- projection ------------------------------------------------------------------------

    def _project(self, tracking_nos: set[str]) -> None:
        # The events just stored are handed over as they are, not read back.
        ids = self._stored_ids()
        stored: dict[str, list[EventDetail]] = defaultdict(list)
        for row in self.rows.values():
            stored[row["tracking_no"]].append(stored_detail(row, ids[row["seq"]]))
        outcome = reproject(
            session=self.session,
            tracking_nos=tracking_nos,
            policy=self.rules.policy,
            stored=stored,
        )
        self.session.flush()
        self._report_raised(outcome.raised)
        self.covering_changed = outcome.handovers_changed()
        self.histories = outcome.histories
        self.holders = outcome.holders
        for tracking_no, (station_id, event_ids) in sorted(outcome.foreign.items()):
            self._flag(
                "wrong_station",
                FlagSeverity.WARNING,
                FlagSubject("parcel", tracking_no),
                {"event_ids": event_ids},
                station_id=station_id,  # the parcel's station: its manager must see it
            )
        for tracking_no, event_ids in sorted(outcome.unknown.items()):
            self._flag(
                "unknown_parcel",
                FlagSeverity.WARNING,
                FlagSubject("parcel", tracking_no),
                {"event_ids": event_ids, "device_id": self.pusher.device_id},
            )

    def _history(self, tracking_no: str) -> History:
        """The parcel's events as the projection read them (``_project``)."""
        return self.histories.get(tracking_no) or History(())

    def _flag(
        self,
        kind: str,
        severity: FlagSeverity,
        subject: FlagSubject,
        evidence: dict[str, Any],
        station_id: int | None = None,
    ) -> None:
        raised = raise_flag(
            session=self.session,
            kind=kind,
            severity=severity,
            subject=subject,
            station_id=station_id or self.pusher.station_id,
            evidence=evidence,
        )
        if raised.new:
            self.session.flush()
            self.raised.append(
                {
                    "flag_id": raised.flag.id,
                    "kind": kind,
                    "subject_type": subject.type,
                    "subject_key": subject.key,
                }
            )

    # -- receipt ---------------------------------------------------------------------------

    def _receipt(self, tracker: SeqTracker) -> Receipt:
        results = []
        for index in range(len(self.batch.events)):
            result = self.results[index]
            item: dict[str, Any] = {
                "index": index,
                "client_event_id": result.client_event_id,
                "status": result.status,
            }
            if result.error is not None:
                item["error"] = {"code": result.error.code, "message": result.error.message}
                if result.error.field:
                    item["error"]["field"] = result.error.field
            results.append(item)
        return Receipt(
            batch_id=str(self.batch.batch_id),
            server_time=self.received_at.isoformat(),
            clock_offset_ms=self.offset_ms,
            results=results,
            acked_through_seq=self.acked_through_seq,
            missing_seqs=tracker.missing_seqs(self.rules.missing_seqs_limit),
            missing_seq_count=tracker.missing_count,
            flags_raised=self.raised,
        )


def _judged_first(item: tuple[int, ValidEvent]) -> tuple[int, uuid.UUID, str, int]:
    """The order ``_deduplicate`` judges a push's events in: by seq, then id, then content,
    whatever the push's order (copies alike in all three keep it, sharing one fate)."""
    index, event = item
    return (event.seq, event.client_event_id, event.content_hash, index)


def _but_for_seq(event: ValidEvent, other: ValidEvent) -> bool:
    """Whether ``event`` is ``other`` sent at another seq: its id and content the same."""
    return (
        event.seq != other.seq
        and dataclasses.replace(event, seq=other.seq).content_hash == other.content_hash
    )


def _parsed_id(sent: str | None) -> uuid.UUID | None:
    """A rejected event's ``client_event_id`` as kept (as its PDA wrote it), read as
    validation reads it; None if it reads as no UUID."""
    try:
        return uuid.UUID(sent) if sent is not None else None
    except ValueError:
        return None


def _sent_id(raw: Any) -> str | None:
    """A valid event's ``client_event_id`` as the PDA sent it. A PDA finds an event's
    result by its id: one written in capitals (iOS's ``uuidString``) or in braces must
    come back so, or its applied events look unanswered and are sent again forever."""
    sent = raw.get("client_event_id") if isinstance(raw, Mapping) else None
    return _storable(sent, 64)


def _storable(value: Any, max_length: int) -> str | None:
    """A raw value kept in a quarantine column only when it is a short, storable string."""
    if not isinstance(value, str) or len(value) > max_length:
        return None
    if any(ch == "\x00" or "\ud800" <= ch <= "\udfff" for ch in value):
        return None
    return value


def _ascii_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=True, sort_keys=True)
