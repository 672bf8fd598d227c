"""Rule 3, convergence: however a device's stream is split, reordered, repeated, lost
in transit or retried (in any order), the server ends in the state one in-order push gives.

A hypothesis state machine plays a PDA against the engine: pushes of arbitrary subsets
in arbitrary order, responses lost after commit, retries of the same batch, pushes that
fail before commit, clock changes and pulls, with proofs of delivery, consents (captured
on the PDA, or granted through the API at any point, for good or for an hour, and maybe
revoked later) and consent requests in the mix, so the rule flags they decide must
converge too. The PDA works in a shift opened before the day, which the courier may
close at any point (the rest of the stream then lands in a closed shift), and hand to
the next courier at any point, whose sign-in pushes the rest (a shift left open is
closed by a manager at the end), so the shift's handover balance, flags and who recorded
each event must converge as well. After every step, each event the server acknowledged
is stored exactly once. At the end the PDA delivers everything still unacknowledged, and
the final state (statuses, holders, acks, flags, quarantine, the shift's balance) is
compared with a fresh database that got the whole stream in one in-order push from a PDA
with the same clock, then closed the shift if the PDA did. (When the test changes the
PDA's clock mid-day, events recorded before are corrected by the offset of the push that
carries them, so only their corrected times may differ.) Some events are recorded on a
clock reset to its factory date: the shift, opened without a first seq, holds them by
their seqs whenever they come. A malformed event the PDA saw rejected (an unknown field,
or its seq written as text, which the server holds it at all the same) may be corrected
on it and sent again under its id and seq (README), then or before the last push: the
reference gets those events first as rejected (kept in quarantine, no event stored
around them), then the day as corrected in one push. Event times on the grid are in
no order, so a pair judged across a rejected seq may be inverted; its time_inversion
flag is compared with its pairs, and it is judged again once the seq is stored.

The day runs on a 10-minute grid, or on one of 130 or 140 minutes (events hours apart,
across the consent's expiry, the requests' lapse and the drop bounds' reach). A dispute
day holds a locker or pickup-point drop of the consented express parcel near the
consent's time and a later-seq scan of another parcel dated before it, so whether the
consent came first on the corrected clock (rule 4), the drop's bounds and the
time_inversion decide its flag. The recipient consents for lockers, pickup points or
any. Some consent requests ask for the parcel not taken in (nobody to ask: ``unsent``)
or still ask at the push, and corrections often void them. Besides arbitrary subsets,
the PDA pushes its whole queue in runs of seqs, oldest run first or newest first.
Requests are compared exactly but for README's bounded exception (a hand-over scan
ends them in the push that brings it, and a later correction does not bring them
back: ``_excuse_ended_by_a_hand_over``).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from models import (
    ConsentRequest,
    DeviceSyncState,
    EventType,
    Flag,
    FlagStatus,
    Parcel,
    QuarantinedEvent,
    ScanEvent,
    ServiceClass,
)
from models.enums import ConsentChannel, ConsentMethod, ConsentScope
from sync import feed
from sync.balances import shift_balance
from sync.consent_requests import HANDED_OVER_REASON
from sync.consents import ConsentDraft, ConsentRules, Revocation, grant, revoke
from sync.drop_bounds import REACH
from sync.events import EventRules
from sync.flags import ACTIVE_STATUSES
from sync.ingest import IngestRules, PushBatch, Pusher, ingest
from sync.parcels import IntakeRules, IntakeScope, ParcelDraft, intake_parcels
from sync.projection import EventFact
from sync.rules import ConsentFact, EventDetail, granted_before
from sync.shifts import ShiftRules, close_shift, open_shift
from sync.status import rejudge_for_consent
from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy
from tests import factories

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
POLICY = TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS)
RULES = IngestRules(events=EventRules(tracking=POLICY))
KNOWN = [factories.s10() for _ in range(3)]  # taken in before the day starts
UNKNOWN = factories.s10()  # never taken in: its events are kept and flagged
STATUS_TYPES = [
    t
    for t in EventType
    if t not in (EventType.CORRECTION, EventType.CONSENT_CAPTURED, EventType.CONSENT_REQUESTED)
]
EXTRA_FIELDS: dict[EventType, dict[str, Any]] = {
    EventType.DELIVERY_ATTEMPT_FAILED: {"reason": "recipient_absent", "action": "notice_left"},
    EventType.DELIVERED_TO_LOCKER: {"locker_id": "L-1", "compartment": "7"},
    EventType.DELIVERED_TO_PICKUP_POINT: {"point_id": "PP-1"},
    EventType.EXCEPTION: {"reason": "damaged"},
    EventType.CONSENT_CAPTURED: {"consent": {"method": "locker", "channel": "sms"}},
    EventType.CONSENT_REQUESTED: {"request": {"method": "locker"}},
}
DELIVERIES = (
    EventType.DELIVERED,
    EventType.DELIVERED_TO_LOCKER,
    EventType.DELIVERED_TO_PICKUP_POINT,
)
# The scans putting a parcel in its recipient's hands, which end its consent requests.
HAND_OVERS = {EventType.DELIVERED.value, EventType.COLLECTED_FROM_LOCKER.value}
FINAL_OUTCOMES = {t.value for t in (*DELIVERIES, EventType.RETURNED_TO_STATION)}
PLACE_FIELDS = ("locker_id", "compartment", "point_id")  # what a repeated scan repeats
# Proofs of delivery: none, a pickup code, a signature never uploaded (pod_blob_missing).
PODS = [{}, {"pickup_code": "1234"}, {"signature_sha256": "5" * 64}]
# Clock offsets the PDA may have at send time; 4 minutes is beyond the 2-minute flag bound.
SKEWS = [
    dt.timedelta(0),
    dt.timedelta(seconds=30),
    dt.timedelta(minutes=4),
    dt.timedelta(minutes=-3),
]
# The day's events happen on a 10-minute grid, and the recipient consents between two
# of its times. A push corrects an event's device time by the offset it measures, so
# after the clock changes a push corrects older events by up to 4 minutes either way
# (SKEWS) from what one in-order push would: never across the consent's time, so that
# whether the consent came before a drop cannot depend on which push carried it. The
# server records it 80 minutes later: the recording grace (an hour) then ends 5 minutes
# off the grid too, so a drop after the grant may still come before the consent was
# recorded (granted_before's other branch), and no skew moves a drop across that either.
DAY_START = NOW - dt.timedelta(hours=3)
EVENT_GRID_MINUTES = 10
CONSENT_GRANTED_AT = NOW - dt.timedelta(hours=2) + dt.timedelta(minutes=EVENT_GRID_MINUTES / 2)
CONSENT_RECORDED_AT = CONSENT_GRANTED_AT + dt.timedelta(minutes=80)
# A consent granted for an hour ends off the grid too (``recipient_consents``).
CONSENT_EXPIRES_AT = CONSENT_GRANTED_AT + dt.timedelta(hours=1)
# Some days are recorded on a coarser grid, its events hours apart: from 18 hours
# before the day to just after the consent's expiry, across the consent's grant,
# expiry and recording grace, the requests' TTL, and the drops' reach
# (``sync.drop_bounds.REACH``), each at least 5 minutes off a grid time, so no skew
# moves an event across them either (``test_no_skew_moves_an_event_across_an_edge``).
GRIDS: dict[int, range] = {EVENT_GRID_MINUTES: range(0, 13), 130: range(-8, 2), 140: range(-8, 2)}
# A request the PDA asked with its own expiry (``request.expires_at``): besides the TTL
# (30 minutes: every one of the day's has lapsed when it arrives), one still asking the
# recipient at the push, or lapsed by then, depending on when it was asked.
REQUEST_LIVES = [None, None, dt.timedelta(hours=3, minutes=5), dt.timedelta(hours=20)]
# The consent the recipient gives, by method (a drop of another kind is not covered).
CONSENT_METHODS = [ConsentMethod.LOCKER, ConsentMethod.PICKUP_POINT, ConsentMethod.ANY]
# Some events are recorded after the PDA's battery died and it came back dated 2000: a
# push corrects them to a year before it at most. Their time files them under no shift;
# their seqs are the shift's (it declared no first seq: they count from 1).
FACTORY_DATE = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


@st.composite
def event_streams(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A device's whole day: seq 1..n, some events malformed, some corrections, some
    final outcomes scanned again (a scanner beeping twice; a locker drop perhaps in
    another compartment, a second outcome), and the corrections more often void such a
    scan, or a consent request, than another event (voiding a repeat needs no review,
    its first scan does). The day runs on one of ``GRIDS``; some of its requests ask
    for the parcel never taken in (nobody to ask), some are still asking at the push
    (``REQUEST_LIVES``: one per question, so none is held back behind another, which
    follows arrival: README, ``CONSENT_REQUESTS_PER_PARCEL``). A dispute day
    (``_dispute``) adds a drop of the consented parcel near the consent's time."""
    grid = draw(st.sampled_from([EVENT_GRID_MINUTES] * 3 + [130, 140]))
    events: list[dict[str, Any]] = []
    repeats: list[dict[str, Any]] = []  # the events scanned again, as drawn
    asks: list[dict[str, Any]] = []  # the consent requests
    live_questions: set[tuple[str, str]] = set()
    for seq in range(1, draw(st.integers(1, 10)) + 1):
        kind = draw(
            st.sampled_from(
                ["status"] * 5
                + ["consent", "request", "request", "correction", "correction"]
                + ["malformed", "malformed", "again"]
            )
        )
        tracking_no = draw(st.sampled_from([*KNOWN, UNKNOWN]))
        seq_as_text = False
        event_type = draw(st.sampled_from(STATUS_TYPES))
        extra = dict(EXTRA_FIELDS.get(event_type, {}))
        finals = [e for e in events if e["type"] in FINAL_OUTCOMES and not _sent_malformed(e)]
        clock = draw(st.sampled_from([DAY_START] * 4 + [FACTORY_DATE]))
        occurred = clock + dt.timedelta(minutes=grid * draw(st.sampled_from(GRIDS[grid])))
        if kind == "again" and finals:
            scanned = draw(st.sampled_from(finals))
            tracking_no, event_type = scanned["tracking_no"], EventType(scanned["type"])
            extra = {k: v for k, v in scanned.items() if k in PLACE_FIELDS}
        if event_type == EventType.DELIVERED_TO_LOCKER:
            extra["compartment"] = draw(st.sampled_from([extra["compartment"]] * 3 + ["8"]))
        if kind == "consent":
            event_type = EventType.CONSENT_CAPTURED
            method = draw(st.sampled_from([m.value for m in CONSENT_METHODS]))
            extra = {"consent": {"method": method, "channel": "sms"}}
        elif kind == "request":
            event_type = EventType.CONSENT_REQUESTED
            tracking_no = draw(st.sampled_from([*KNOWN, UNKNOWN, UNKNOWN, UNKNOWN]))
            method = draw(st.sampled_from(["locker", "pickup_point"]))
            extra = {"request": {"method": method}}
            life = draw(st.sampled_from(REQUEST_LIVES))
            if life is not None and (tracking_no, method) not in live_questions:
                live_questions.add((tracking_no, method))
                extra["request"]["expires_at"] = (occurred + life).isoformat()
        elif kind == "correction" and events:
            target = draw(st.sampled_from(events + repeats * 2 + asks * 3))
            event_type = EventType.CORRECTION
            # Usually filed under its target's number; sometimes under another one.
            tracking_no = draw(st.sampled_from([target["tracking_no"]] * 3 + KNOWN))
            extra = {"voids_client_event_id": target["client_event_id"], "reason": "mis-tap"}
        elif kind == "malformed":
            # An unknown field, or the seq written as text ("4"): quarantined (at its
            # seq all the same); without it, or with the seq a number, valid.
            seq_as_text = draw(st.booleans())
            if not seq_as_text:
                extra["colour"] = "red"
        if event_type in DELIVERIES:
            extra["pod"] = draw(st.sampled_from(PODS))
        events.append(
            factories.event(
                seq,
                tracking_no,
                event_type.value,
                occurred_at=occurred,
                client_event_id=str(draw(st.uuids())),
                **extra,
            )
        )
        if seq_as_text:
            events[-1]["seq"] = str(seq)
        if kind == "again" and finals:
            repeats.append(events[-1])
        if event_type == EventType.CONSENT_REQUESTED:
            asks.append(events[-1])
    if draw(st.booleans()):
        events = draw(_dispute(events, grid))
    return events


@st.composite
def _dispute(draw: st.DrawFn, events: list[dict[str, Any]], grid: int) -> list[dict[str, Any]]:
    """The day with a locker or pickup-point drop of the consented express parcel
    (``KNOWN[0]``) near the consent's time, so that whether the consent came before it
    decides its flag (rule 4), and a later-seq scan of another parcel dated before it:
    a time_inversion, and a bound of the drop (``sync.drop_bounds``) that may move its
    earliest time before the consent's grant or recording (within ``REACH``; on the
    coarse grids perhaps beyond it). Inserted anywhere in the stream, which is
    renumbered (seqs in the stream's order, a quoted one stays quoted)."""
    steps = GRIDS[grid]
    near = [
        step
        for step in steps
        if abs(DAY_START + dt.timedelta(minutes=grid * step) - CONSENT_GRANTED_AT)
        <= dt.timedelta(minutes=75)
    ]
    drop_step = draw(st.sampled_from(near))
    drop_type = draw(
        st.sampled_from([EventType.DELIVERED_TO_LOCKER, EventType.DELIVERED_TO_PICKUP_POINT])
    )
    drop = factories.event(
        0,
        KNOWN[0],
        drop_type.value,
        occurred_at=DAY_START + dt.timedelta(minutes=grid * drop_step),
        client_event_id=str(draw(st.uuids())),
        pod=draw(st.sampled_from(PODS)),
        **EXTRA_FIELDS[drop_type],
    )
    day = list(events)
    at = draw(st.integers(0, len(day)))
    day.insert(at, drop)
    for _ in range(draw(st.integers(1, 2))):  # two: the drop's bound is the earlier
        scan_step = drop_step - draw(st.integers(1, 3 if grid == EVENT_GRID_MINUTES else 6))
        scan_type = draw(st.sampled_from(STATUS_TYPES))
        scan = factories.event(
            0,
            draw(st.sampled_from(KNOWN[1:])),
            scan_type.value,
            occurred_at=DAY_START + dt.timedelta(minutes=grid * scan_step),
            client_event_id=str(draw(st.uuids())),
            **EXTRA_FIELDS.get(scan_type, {}),
            **({"pod": draw(st.sampled_from(PODS))} if scan_type in DELIVERIES else {}),
        )
        day.insert(draw(st.integers(at + 1, len(day))), scan)
    for seq, event in enumerate(day, start=1):
        event["seq"] = str(seq) if isinstance(event["seq"], str) else seq
    return day


def _sent_malformed(event: dict[str, Any]) -> bool:
    """A correctable mistake of ``event_streams``: an unknown field, or a quoted seq."""
    return "colour" in event or isinstance(event["seq"], str)


def _seq(event: dict[str, Any]) -> int:
    return int(event["seq"])


class World:
    """A station, a courier and a PDA in a transaction that is rolled back afterwards."""

    def __init__(self, engine: Engine) -> None:
        self.connection = engine.connect()
        self.transaction = self.connection.begin()
        self.session = Session(
            bind=self.connection, join_transaction_mode="create_savepoint", expire_on_commit=False
        )
        try:
            self._populate()
        except BaseException:
            self.close()
            raise

    def _populate(self) -> None:
        station = factories.station(self.session, code="CONV")
        courier = factories.user(self.session, "conv-courier", "courier", station)
        self.next_courier_id = factories.user(self.session, "conv-next", "courier", station).id
        device = factories.device(self.session, "PDA-CONV", station)
        for tracking_no in KNOWN:
            factories.parcel(self.session, station, tracking_no=tracking_no)
        self.session.commit()
        self.pusher = Pusher(device.id, station.id, courier.id)
        self.courier_id = courier.id  # the shift's, whoever is signed in on the PDA
        self.station_id = station.id
        # Opened before the day (events are 1 to 3 hours before NOW), closed at NOW.
        self.shift = open_shift(
            session=self.session,
            device=device,
            courier_id=courier.id,
            rules=ShiftRules(),
            now=NOW - dt.timedelta(hours=4),
        )
        self.session.commit()

    def close_the_shift(self, last_seq: int) -> None:
        close_shift(
            session=self.session, shift=self.shift, closed_by=self.courier_id,
            last_seq=last_seq, now=NOW,
        )  # fmt: skip
        self.session.commit()

    def push(
        self, events: list[dict[str, Any]], batch_id: uuid.UUID, skew: dt.timedelta
    ) -> dict[str, Any]:
        return ingest(
            session=self.session,
            batch=PushBatch(self.pusher.device_id, batch_id, NOW + skew, events),
            pusher=self.pusher,
            rules=RULES,
            received_at=NOW,
        )

    def final_state(self) -> dict[str, Any]:
        session = self.session
        state = session.get(DeviceSyncState, self.pusher.device_id)
        balance = shift_balance(session=session, shift=self.shift)
        sent = dict(session.execute(select(ScanEvent.id, ScanEvent.client_event_id)).all())
        return {
            "balance": (
                balance.summary(),
                balance.missing_seqs,
                sorted(
                    (
                        p.tracking_no,
                        p.outcome,
                        p.on_manifest,
                        sent.get(p.outcome_event_id or 0),  # a repeat: its first scan
                        [(sent[r.event_id], sent[r.first_event_id]) for r in p.repeated_scans],
                    )
                    for p in balance.parcels
                ),
                sorted((d.kind, d.tracking_no, d.flag_status) for d in balance.discrepancies),
            ),
            # Ids differ between databases (PostgreSQL sequences survive rollbacks): a parcel
            # held by this world's courier says so by name.
            "parcels": sorted(
                (tracking_no, status, status_at, self._courier_name(courier_id))
                for tracking_no, status, status_at, courier_id in session.execute(
                    select(Parcel.tracking_no, Parcel.status, Parcel.status_at, Parcel.courier_id)
                )
            ),
            # A drop's bounds (``sync.drop_bounds``) too: what its PDA's other events
            # show of when it happened, kept in its row whatever order they came in.
            "events": sorted(
                (client_event_id, seq, content_hash, self._courier_name(courier_id), *bounds)
                for client_event_id, seq, content_hash, courier_id, *bounds in session.execute(
                    select(
                        ScanEvent.client_event_id,
                        ScanEvent.seq,
                        ScanEvent.content_hash,
                        ScanEvent.courier_id,
                        ScanEvent.latest_of_earlier_seqs,
                        ScanEvent.earliest_of_later_seqs,
                    )
                )
            ),
            "quarantine": sorted(session.scalars(select(QuarantinedEvent.payload_hash))),
            # A consent request per consent_requested event stored, cancelled whether its
            # correction came in its push or a later one (no per-parcel bound here: which
            # requests it sends follows arrival, README, CONSENT_REQUESTS_PER_PARCEL). Why
            # one is unsent depends on the parcel at its arrival (the unknown parcel not
            # taken in yet, or taken in without a phone): its reason is not compared.
            "requests": sorted(
                (str(client_event_id), status.value, None if status.value == "unsent" else reason)
                for client_event_id, status, reason in session.execute(
                    select(
                        ConsentRequest.client_event_id,
                        ConsentRequest.status,
                        ConsentRequest.status_reason,
                    )
                )
            ),
            "acks": (state.acked_through_seq, state.max_seq, state.missing_ranges),
            # Active flags: a flag whose cause went away is closed, and whether it was
            # ever raised depends on arrival order. The clock_skew flag depends on the
            # clocks of all the pushes, not on the stream; it is checked separately.
            # A time_inversion's pairs too: judged on the events held, as its status is.
            "flags": sorted(
                (kind, self._subject(key), status, self._inverted_seqs(kind, evidence))
                for kind, key, status, evidence in session.execute(
                    select(Flag.kind, Flag.subject_key, Flag.status, Flag.evidence).where(
                        Flag.kind != "clock_skew", Flag.status.in_(ACTIVE_STATUSES)
                    )
                )
            ),
        }

    @staticmethod
    def _inverted_seqs(kind: str, evidence: dict[str, Any]) -> list[str]:
        return list(evidence["device_seqs"]) if kind == "time_inversion" else []

    def _subject(self, key: str) -> str:
        """A shift's flags name it by id, which differs between databases."""
        shift, sep, tracking_no = key.partition(":")
        return f"the shift:{tracking_no}" if sep and shift == str(self.shift.id) else key

    def _courier_name(self, courier_id: int | None) -> str | None:
        if courier_id is None:
            return None
        return "the shift's courier" if courier_id == self.courier_id else str(courier_id)

    def hand_over(self) -> None:
        """The PDA is handed to the next courier, who signs in on it: what it still
        holds of the day is pushed under their sign-in."""
        self.pusher = Pusher(self.pusher.device_id, self.pusher.station_id, self.next_courier_id)

    def recipient_consents(
        self, expiring: bool = False, method: ConsentMethod = ConsentMethod.LOCKER
    ) -> None:
        """The recipient of the first parcel agrees to locker delivery, through the app,
        mid-morning, and the server records it 80 minutes later: a drop in the first 20
        minutes after the grant is not authorized by it (recorded beyond the policy's
        grace), a later one is. Whenever the rule runs, the consent is the same.
        ``expiring``: for an hour (it ends off the grid too), so later drops are not.
        ``method``: for lockers, for pickup points, or any."""
        self.consent = consent = grant(
            session=self.session,
            draft=ConsentDraft(
                scope=ConsentScope.PARCEL,
                method=method,
                channel=ConsentChannel.APP,
                granted_at=CONSENT_GRANTED_AT,
                tracking_no=KNOWN[0],
                expires_at=CONSENT_EXPIRES_AT if expiring else None,
            ),
            rules=ConsentRules(tracking=POLICY, phone_region="CN"),
            created_by=None,
            now=CONSENT_RECORDED_AT,
        )
        rejudge_for_consent(session=self.session, consent=consent, policy=RULES.policy)
        self.session.commit()

    def recipient_revokes(self) -> None:
        """The recipient takes the consent back, now: after every drop of the day, so it
        authorized those it did, and they stay authorized."""
        revoke(
            session=self.session,
            consent=self.consent,
            revocation=Revocation(None, "changed my mind", ConsentChannel.APP),
        )
        rejudge_for_consent(session=self.session, consent=self.consent, policy=RULES.policy)
        self.session.commit()

    def take_in_the_unknown_parcel(self) -> None:
        intake_parcels(
            session=self.session,
            drafts=[(0, ParcelDraft(UNKNOWN, ServiceClass.PARCEL, "R", "2 Road"))],
            rules=IntakeRules(tracking=POLICY, phone_region="CN"),
            scope=IntakeScope(default_station_id=self.station_id, allowed_station_ids=None),
        )
        self.session.commit()

    def close(self) -> None:
        self.session.close()
        self.transaction.rollback()
        self.connection.close()


class PdaAgainstServer(RuleBasedStateMachine):
    engine: Engine  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.world = World(self.engine)
        self.stream: list[dict[str, Any]] = []
        self.skew = self.day_skew = dt.timedelta(0)
        self.clock_was_changed = False
        self.taken_in = False
        self.consented = False
        self.consent_method = ConsentMethod.LOCKER
        self.expiring = False
        self.revoked = False
        self.closed = False
        self.handed_over = False
        self.skewed_push = False  # did any committed push carry an offset beyond the bound?
        self.acknowledged: set[str] = set()
        self.rejected_seen: set[str] = set()  # the events the PDA was told were rejected
        self.retyped: list[dict[str, Any]] = []  # the rejected events corrected since
        self.sent: list[tuple[uuid.UUID, list[dict[str, Any]], dict[str, Any]]] = []
        self.cursor: feed.Cursor | None = None

    @initialize(stream=event_streams(), skew=st.sampled_from(SKEWS), retypes=st.booleans())
    def record_the_day(
        self, stream: list[dict[str, Any]], skew: dt.timedelta, retypes: bool
    ) -> None:
        """The PDA's clock is off by ``skew`` all day (it may be 4 minutes off).
        ``retypes``: before its last push the courier corrects every event it was told
        was rejected (``_correct``)."""
        self.stream = stream
        self.skew = self.day_skew = skew
        self.retypes = retypes

    def _batch(self, data: st.DataObject) -> list[dict[str, Any]]:
        """Any events of the day, in any order, some twice (the PDA re-sends freely)."""
        return data.draw(st.lists(st.sampled_from(self.stream), min_size=1, max_size=12))

    def _commit_push(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        batch_id = uuid.uuid4()
        receipt = self.world.push(events, batch_id, self.skew)
        self.world.session.commit()
        self.skewed_push |= abs(self.skew) > RULES.clock_skew_bound
        self.sent.append((batch_id, events, receipt))
        return receipt

    @rule(data=st.data())
    def push(self, data: st.DataObject) -> None:
        self._hear(self._commit_push(self._batch(data)), data)

    @precondition(lambda self: len(self.stream) > 1)
    @rule(data=st.data(), newest_first=st.booleans())
    def push_in_runs(self, data: st.DataObject, newest_first: bool) -> None:
        """The PDA sends its whole queue in runs of consecutive seqs, one push each:
        oldest first (draining its queue as it goes), or newest first (its latest
        scans first, the backlog after)."""
        ordered = sorted(self.stream, key=_seq)
        cuts = sorted(data.draw(st.sets(st.integers(1, len(ordered) - 1), min_size=1)))
        runs = [ordered[a:b] for a, b in zip([0, *cuts], [*cuts, len(ordered)], strict=True)]
        for run in reversed(runs) if newest_first else runs:
            self._hear(self._commit_push(run), data)

    def _hear(self, receipt: dict[str, Any], data: st.DataObject) -> None:
        """What the PDA does with a receipt: it forgets what is acknowledged, and the
        courier may correct events it was told were rejected."""
        rejected = set()
        for result in receipt["results"]:
            if result["status"] in ("applied", "duplicate"):
                self.acknowledged.add(result["client_event_id"])
            elif result["status"] == "rejected":
                rejected.add(result["client_event_id"])
        self.rejected_seen |= rejected
        malformed = self._malformed(rejected)
        if malformed:
            self._correct(data.draw(st.lists(st.sampled_from(malformed), unique_by=_seq)))

    def _malformed(self, ids: set[str]) -> list[dict[str, Any]]:
        """The PDA's malformed events of these ids."""
        return [e for e in self.stream if _sent_malformed(e) and e["client_event_id"] in ids]

    def _correct(self, malformed: list[dict[str, Any]]) -> None:
        """The courier corrects events the PDA was told were rejected: each is sent from
        now on under its id and seq, valid. Its seq held no event, and the pair judged
        across it may have been inverted."""
        for event in malformed:
            corrected = {k: v for k, v in event.items() if k != "colour"}
            corrected["seq"] = _seq(event)
            self.stream = [corrected if e is event else e for e in self.stream]
            self.retyped.append(event)

    @rule(data=st.data())
    def push_whose_response_is_lost(self, data: st.DataObject) -> None:
        self._commit_push(self._batch(data))  # committed, but the PDA never hears back

    @rule(data=st.data())
    def retry_a_batch(self, data: st.DataObject) -> None:
        if not self.sent:
            return
        batch_id, events, receipt = data.draw(st.sampled_from(self.sent))
        order = data.draw(st.permutations(range(len(events))))  # rebuilt in any order
        retry = [events[i] for i in order]
        replayed = self.world.push(retry, batch_id, self.skew)
        self.world.session.commit()
        assert {**replayed, "results": receipt["results"]} == receipt
        assert [r["index"] for r in replayed["results"]] == list(range(len(retry)))

        def answers(sent: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[Any]:
            """Each event's result, events sent alike told alike in any order."""
            return sorted(
                (
                    json.dumps(event, sort_keys=True),
                    json.dumps({k: v for k, v in result.items() if k != "index"}, sort_keys=True),
                )
                for event, result in zip(sent, results, strict=True)
            )

        assert answers(retry, replayed["results"]) == answers(events, receipt["results"])

    @rule(data=st.data())
    def push_that_fails_before_commit(self, data: st.DataObject) -> None:
        before = self._stored_ids()
        self.world.push(self._batch(data), uuid.uuid4(), self.skew)
        self.world.session.rollback()
        assert self._stored_ids() == before

    @precondition(lambda self: not self.consented)
    @rule(expiring=st.booleans(), method=st.sampled_from(CONSENT_METHODS))
    def the_recipient_consents(self, expiring: bool, method: ConsentMethod) -> None:
        self.world.recipient_consents(expiring, method)
        self.consented = True
        self.expiring = expiring
        self.consent_method = method

    @precondition(lambda self: self.consented and not self.revoked)
    @rule()
    def the_recipient_revokes(self) -> None:
        self.world.recipient_revokes()
        self.revoked = True

    @precondition(lambda self: not self.closed and bool(self.stream))
    @rule()
    def the_courier_closes_the_shift(self) -> None:
        """Back at the station, possibly before the PDA has sent everything: the events
        still to come land in a closed shift."""
        self.world.close_the_shift(last_seq=len(self.stream))
        self.closed = True

    @precondition(lambda self: not self.handed_over)
    @rule()
    def the_pda_is_handed_over(self) -> None:
        """The next courier signs in on the PDA, and the rest of the day is pushed under
        their sign-in: it is still the first courier's, filed under their shift by the
        seqs its close declares, whether the close came first or the shift was left
        open (a manager closes it at the end of the day)."""
        self.world.hand_over()
        self.cursor = None  # a cursor is the signed-in courier's
        self.handed_over = True

    @precondition(lambda self: not self.taken_in)
    @rule()
    def the_unknown_parcel_is_taken_in(self) -> None:
        """Intake of a parcel some of whose events may already be stored."""
        self.world.take_in_the_unknown_parcel()
        self.taken_in = True

    @rule(skew=st.sampled_from(SKEWS))
    def clock_changes(self, skew: dt.timedelta) -> None:
        """Someone sets the PDA's clock. Events recorded before keep their device times,
        but a later push corrects them by the new offset: their corrected times can no
        longer match an in-order push, so only that comparison is relaxed."""
        if skew != self.skew:
            self.clock_was_changed = True
        self.skew = skew

    @rule()
    def pull(self) -> None:
        page = feed.read_page(
            session=self.world.session,
            station_id=self.world.pusher.station_id,
            courier_id=self.world.pusher.courier_id,
            cursor=self.cursor,
            limit=3,
        )
        assert len(page.changes) <= 3
        self.cursor = page.next_cursor

    @invariant()
    def every_acknowledged_event_is_stored_exactly_once(self) -> None:
        counts = dict(
            self.world.session.execute(
                select(ScanEvent.client_event_id, func.count()).group_by(ScanEvent.client_event_id)
            ).all()
        )
        assert all(n == 1 for n in counts.values())
        stored = {str(cid) for cid in counts}
        assert self.acknowledged <= stored

    def _stored_ids(self) -> set[str]:
        return {str(cid) for cid in self.world.session.scalars(select(ScanEvent.client_event_id))}

    def teardown(self) -> None:
        try:
            reached = self._deliver_everything() if self.stream else None
        finally:
            self.world.close()
        if reached is not None:
            # Only now: SQLite has one writer, and the world above held it until closed.
            reference = self._one_in_order_push()
            if self.clock_was_changed:
                for state in (reached, reference):
                    state["parcels"] = [
                        (tn, status, courier) for tn, status, _, courier in state["parcels"]
                    ]
                    # A bound is another event's corrected time: two events of one grid
                    # time, pushed with different offsets, may then bound each other or
                    # not (never across an edge of the rules: the flags are compared).
                    state["events"] = [event[:4] for event in state["events"]]
            self._excuse_ended_by_a_hand_over(reached, reference)
            assert reached == reference

    def _excuse_ended_by_a_hand_over(
        self, reached: dict[str, Any], reference: dict[str, Any]
    ) -> None:
        """README's bounded exception to rule 3: a push bringing a parcel's delivery in
        person or its collection cancels the parcel's requests still asking (or held
        back), and a correction voiding that scan, or a scan after it, in a later push
        does not bring them back; in one push they never ended. So a request cancelled
        as handed over, where the one push left it otherwise, is left out of both sides,
        only when the day holds such a scan of its parcel. Every other request, and
        everything else, is compared exactly."""
        handed_over = {
            e["tracking_no"]
            for e in self.stream
            if e["type"] in HAND_OVERS and not _sent_malformed(e)
        }
        parcel_of = {e["client_event_id"]: e["tracking_no"] for e in self.stream}
        in_one_push = {request[0]: request for request in reference["requests"]}
        excused = {
            request[0]
            for request in reached["requests"]
            if request[1:] == ("cancelled", HANDED_OVER_REASON)
            and in_one_push.get(request[0]) != request
            and parcel_of[request[0]] in handed_over
        }
        for state in (reached, reference):
            state["requests"] = [r for r in state["requests"] if r[0] not in excused]

    def _deliver_everything(self) -> dict[str, Any]:
        if self.retypes:
            self._correct(self._malformed(self.rejected_seen))
        self._commit_push(list(self.stream))  # the PDA finally delivers everything
        if self.handed_over and not self.closed:  # left open: a manager closes it
            self.world.close_the_shift(last_seq=len(self.stream))
            self.closed = True
        reached = self.world.final_state()
        skew_flagged = self.world.session.scalar(
            select(func.count()).select_from(Flag).where(Flag.kind == "clock_skew")
        )
        assert bool(skew_flagged) == self.skewed_push
        open_flags = {kind for kind, _, status, _ in reached["flags"] if status == FlagStatus.OPEN}
        unknown_events = any(
            e["tracking_no"] == UNKNOWN and not _sent_malformed(e) for e in self.stream
        )
        assert ("unknown_parcel" in open_flags) == (unknown_events and not self.taken_in)
        return reached

    def _one_in_order_push(self) -> dict[str, Any]:
        reference = World(self.engine)
        try:
            if self.retyped:  # rejected before anything else: no pair is judged across them
                reference.push(list(self.retyped), uuid.uuid4(), self.day_skew)
                reference.session.commit()
            reference.push(list(self.stream), uuid.uuid4(), self.day_skew)
            reference.session.commit()
            if self.taken_in:
                reference.take_in_the_unknown_parcel()
            if self.consented:
                reference.recipient_consents(self.expiring, self.consent_method)
            if self.revoked:
                reference.recipient_revokes()
            if self.closed:
                reference.close_the_shift(last_seq=len(self.stream))
            return reference.final_state()
        finally:
            reference.close()


def _grid_times(grid: int | None = None) -> list[dt.datetime]:
    """Every time ``event_streams`` may stamp a day's event with on ``grid`` (on any
    grid when None), dispute days' too."""
    times = []
    for each, steps in GRIDS.items():
        if grid in (None, each):
            earliest = steps.start - (3 if each == EVENT_GRID_MINUTES else 6)  # ``_dispute``
            times += [
                DAY_START + dt.timedelta(minutes=each * s) for s in range(earliest, steps.stop)
            ]
    return times


def test_the_consent_leaves_every_outcome_of_a_drop_reachable_and_none_to_the_clock() -> None:
    """The machine's drops, on any grid and corrected by any skew, meet the recipient's
    consent as granted after them, granted before but recorded too late, and
    authorized; and each grid time meets it one way whatever the skew."""
    consent = ConsentFact(
        id=1,
        method=ConsentMethod.LOCKER,
        point_id=None,
        granted_at=CONSENT_GRANTED_AT,
        recorded_at=CONSENT_RECORDED_AT,
    )

    def outcome(at: dt.datetime) -> str:
        fact = EventFact(1, "PDA-CONV", 1, EventType.DELIVERED_TO_LOCKER, at, uuid.uuid4(), 1)
        if granted_before(consent, EventDetail(fact), RULES.policy, []):
            return "authorized"
        return "granted after" if CONSENT_GRANTED_AT > at else "recorded too late"

    seen = set()
    for device_time in _grid_times():
        judged = {outcome(device_time - skew) for skew in SKEWS}
        assert len(judged) == 1, (device_time, judged)
        seen |= judged
    assert seen == {"authorized", "granted after", "recorded too late"}


def test_no_skew_moves_an_event_across_an_edge() -> None:
    """The consent's expiry; a request's lapse at the push (``REQUEST_LIVES``, and the
    TTL); an event within the drop bounds' reach of another: each grid time lies on
    one side of each, whatever the skews of the pushes that carry the two (a day's
    events all lie on one grid)."""
    lives = [life for life in REQUEST_LIVES if life] + [RULES.consent_request_ttl]
    times = _grid_times()
    for device_time in times:
        assert len({device_time - skew < CONSENT_EXPIRES_AT for skew in SKEWS}) == 1
        for life in lives:
            assert len({device_time + life - skew <= NOW for skew in SKEWS}) == 1
    for grid in GRIDS:
        on_grid = _grid_times(grid)
        for one, other in ((a, b) for a in on_grid for b in on_grid):
            apart = {abs((one - s) - (other - t)) for s in SKEWS for t in SKEWS}
            assert len({gap <= REACH for gap in apart}) == 1
            assert len({gap <= 2 * REACH for gap in apart}) == 1  # a cluster's
    assert any(NOW - life < t for t in times for life in lives)  # a request still asks
    assert all(t + RULES.consent_request_ttl < NOW for t in times)  # lapsed by the TTL


def test_any_split_order_and_retry_converge_to_one_in_order_push(engine: Engine) -> None:
    PdaAgainstServer.engine = engine
    run_state_machine_as_test(
        PdaAgainstServer,
        settings=settings(
            max_examples=settings.default.max_examples,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


@pytest.fixture(autouse=True)
def _no_leftovers(engine: Engine) -> None:
    """Each example rolls back; make sure nothing leaked into the shared database."""
    yield
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(ScanEvent)) == 0
