"""The station board reads a day in a fixed number of queries, however many shifts;
a shift's page reads a shift in a fixed number, however many parcels, flags and
rejected events it has.

100 shifts x 150 parcels at one station and 10 x 150 at another, written straight
into the tables (``factories.station_day``: Core inserts, no engine), then the board
of each is read while every SQL statement is counted. Twelve on SQLite: the shifts,
``gather``'s, the PDAs' rejected events (one count for every shift: what the balance
cannot show keeps a shift off the clean handovers), the shifts' own flags and the
proof images their deliveries lack.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, event, func, insert, select, update
from sqlalchemy.orm import Session

from models import (
    AuditEntry,
    Device,
    EventType,
    Flag,
    FlagStatus,
    QuarantinedEvent,
    ScanEvent,
    Shift,
    ShiftStatus,
    SyncBatch,
)
from sync.audit import verify
from sync.balances import (
    COURIERS_PER_STATEMENT,
    CouriersWent,
    board_totals,
    gather,
    station_board,
    waiting_from_earlier_days,
    where_couriers_went,
)
from sync.blobs import BlobReader, FileBlobStore
from sync.handover import Discrepancy
from sync.pages import (
    PROOF_REJECTIONS_SHOWN,
    SCANS_ELSEWHERE_READ,
    handover_scans_elsewhere,
    proof_page,
    shift_page,
    where_courier_went,
)
from sync.proofs import get_proof
from sync.quarantine import (
    RejectionScope,
    parcel_named,
    rejection_counts,
    shift_rejections_counted,
)
from sync.rules import Policy
from sync.signoffs import SIGNED_OFF, handover_seen, sign_off_clean
from tests import factories

DAY = dt.date(2026, 11, 23)


@contextmanager
def counted(session: Session) -> Iterator[list[str]]:
    statements: list[str] = []
    connection = session.connection()

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(connection, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(connection, "before_cursor_execute", count)


def test_the_board_reads_a_day_in_the_same_few_queries_for_10_or_100_shifts(
    session: Session,
) -> None:
    big = factories.station_day(session, "BIG", shifts=100, parcels_per_shift=150, day=DAY)
    small = factories.station_day(session, "SMALL", shifts=10, parcels_per_shift=150, day=DAY)
    session.flush()
    # The big station's shifts signed off with a balance other than theirs now: each
    # row tells it from the shift's own row, with no query of its own.
    session.execute(
        update(Shift)
        .where(Shift.station_id == big)
        .values(status=ShiftStatus.SIGNED_OFF, signoff_balance={"status": "balanced"})
    )
    # And each with proof images missing at handover: named on its row, read at once.
    session.execute(
        insert(Flag),
        [
            {
                "station_id": big,
                "kind": "blob_missing_at_handover",
                "severity": "warning",
                "subject_type": "shift",
                "subject_key": str(shift_id),
                "evidence": {},
                "shift_id": shift_id,
            }
            for shift_id in session.scalars(select(Shift.id).where(Shift.station_id == big))
        ],
    )
    # And each PDA with events rejected: two of the shift's (one with a seq it owns, one
    # without a seq naming one of its parcels, its number typed ``rr 4731 2482 9gb``),
    # and one without a seq naming no parcel of it, which is not.
    session.execute(
        insert(QuarantinedEvent),
        [
            _rejected(session, shift, seq, tracking_no)
            for shift in session.scalars(select(Shift).where(Shift.station_id == big))
            for seq, tracking_no in (
                (5, None),
                (None, factories.typed_loosely(_a_parcel_of(session, shift))),
                (None, "RR473124829GB"),
            )
        ],
    )
    session.expire_all()
    with counted(session) as big_queries:  # with the totals, as the board answers them
        big_board = station_board(session=session, station_id=big, work_date=DAY)
        big_totals = board_totals(big_board)
    with counted(session) as small_queries:
        small_board = station_board(session=session, station_id=small, work_date=DAY)
        board_totals(small_board)
    assert big_totals["signed_off"] == big_totals["changed_since_signoff"] == 100
    assert big_totals["with_open_flags"] == 100
    assert len(big_board) == 100 and len(small_board) == 10
    # Eleven before the rejected events were counted: one statement more, for all shifts.
    assert len(big_queries) == len(small_queries) <= 12, big_queries
    assert [row.rejected_events for row in small_board] == [0] * 10
    for row in big_board:
        assert row.rejected_events == 2
        # Its handover flags wait for a decision too, as the flags list shows them.
        assert sorted(flag.kind for flag in row.open_flags) == [
            "blob_missing_at_handover",
            *["missing_at_handover"] * 3,
        ]
        balance = row.balance
        assert (balance.checked_out, balance.delivered, balance.missing) == (150, 147, 3)
        assert balance.status == "unbalanced"
        assert all(d.flag_id is not None for d in balance.discrepancies)
        assert len(balance.discrepancies) == 3
    # Nothing was written while reading.
    assert all(q.lstrip().upper().startswith("SELECT") for q in big_queries)
    assert session.scalar(select(Shift.id).where(Shift.station_id == big).limit(1)) is not None


def test_the_clean_handovers_are_signed_off_together_in_the_same_statements_for_10_or_40(
    session: Session,
) -> None:
    """At 19:00 the manager signs off 40 clean handovers at once: each sign-off wrote
    its shift, read the audit log's head and wrote its entry, three statements a
    shift, where the board that offered them reads in a fixed few. Now the shifts'
    UPDATE goes in one statement and their entries are chained at once
    (``audit.deferred``): on PostgreSQL the same statements for 10 or 40 shifts; on
    SQLite each entry is still its own INSERT (its ids come back one by one)."""
    admin = factories.user(session, "admin", "admin")
    counts = []
    for code, shifts in (("SMALL", 10), ("BIG", 40)):
        station = factories.station_day(
            session, code, shifts=shifts, parcels_per_shift=20, day=DAY
        )
        # Every parcel accounted for: the one missing of each shift was returned.
        session.execute(
            update(ScanEvent)
            .where(ScanEvent.station_id == station, ScanEvent.type == EventType.EXCEPTION)
            .values(type=EventType.RETURNED_TO_STATION)
        )
        session.execute(delete(Flag).where(Flag.station_id == station))
        session.expire_all()
        seen = {
            row.shift.id: row.balance_version
            for row in station_board(session=session, station_id=station, work_date=DAY)
        }
        session.expire_all()
        with counted(session) as statements:
            outcomes = sign_off_clean(
                session=session, station_id=station, seen=seen, user_id=admin.id, note="ok"
            )
        assert [o.outcome for o in outcomes] == [SIGNED_OFF] * shifts
        counts.append(statements)

    def others(statements: list[str]) -> list[str]:
        """The statements but the audit entries' INSERTs."""
        return [q for q in statements if not q.lstrip().startswith("INSERT INTO audit_entry")]

    small, big = counts
    assert len(others(big)) == len(others(small)), others(big)
    if session.get_bind().dialect.name == "postgresql":
        assert len(big) == len(small), big
    assert session.scalar(select(func.count()).select_from(AuditEntry)) == 50
    signed_off = select(func.count()).where(Shift.status == ShiftStatus.SIGNED_OFF)
    assert session.scalar(signed_off) == 50
    assert verify(session=session).ok


def test_rejected_events_are_counted_as_each_shift_page_lists_them_200_shifts_at_once(
    session: Session,
) -> None:
    """``rejection_counts`` counts for every shift what ``shift_rejections_counted`` lists
    and counts on its page, the seq-less rejections naming its parcels too, in one
    statement per 200 shifts: past about 500, one statement of them all would be too
    deep for SQLite."""
    station = factories.station_day(session, "REJ", shifts=2, parcels_per_shift=10, day=DAY)
    first, second = session.scalars(select(Shift).where(Shift.station_id == station)).all()
    session.execute(
        insert(QuarantinedEvent),
        [
            _rejected(session, first, 3, None),
            _rejected(session, first, 7, None),
            _rejected(session, first, 99, None),  # beyond the seqs it owns (1 to 20)
            _rejected(session, first, None, _a_parcel_of(session, first)),
            _rejected(session, first, None, _a_parcel_of(session, second)),  # not its parcel
            _rejected(session, second, None, _a_parcel_of(session, second)),
        ],
    )
    session.flush()
    facts = gather(session, [first, second])
    scopes = {i: f.rejection_scope(f.balance()) for i, f in facts.items()}
    read = {
        i: shift_rejections_counted(session=session, scope=scope, station_id=station)
        for i, scope in scopes.items()
    }
    assert {i: len(rows) for i, (rows, _) in read.items()} == {first.id: 3, second.id: 1}
    listed = {i: total for i, (_, total) in read.items()}
    assert listed == {first.id: 3, second.id: 1}
    # And 448 shifts of PDAs with nothing rejected.
    elsewhere = {-n: RejectionScope(f"PDA-{n}", (1, 300), ["RR473124829GB"]) for n in range(448)}
    with counted(session) as queries:
        counts = rejection_counts(session=session, scopes=scopes | elsewhere, station_id=station)
    assert counts == listed
    assert len(queries) == 3  # 450 shifts, 200 at a time
    assert rejection_counts(session=session, scopes=scopes, station_id=station + 1) == {}


def _a_parcel_of(session: Session, shift: Shift) -> str:
    return session.scalars(
        select(ScanEvent.tracking_no).where(ScanEvent.shift_id == shift.id).limit(1)
    ).one()


def _rejected(
    session: Session, shift: Shift, seq: int | None, tracking_no: str | None
) -> dict[str, Any]:
    """A quarantined event of the shift's PDA, in one of its batches, to insert."""
    return {
        "station_id": shift.station_id,
        "device_id": shift.device_id,
        "batch_pk": session.scalar(
            select(SyncBatch.id).where(SyncBatch.device_id == shift.device_id)
        ),
        "position": 0,
        "seq": seq,
        "tracking_no": tracking_no,
        "parcel_tracking_no": parcel_named(tracking_no),  # as a push sets it
        "error_code": "missing_field",
        "message": "reason is required",
        "payload": "{}",
        "payload_hash": uuid.uuid4().hex * 2,
    }


def _late_and_rejected(session: Session, shift: Shift, late: int, rejected: int) -> None:
    """A ``late_event_after_signoff`` flag naming ``late`` of the shift's events, and
    ``rejected`` quarantined events of its PDA, each with one of its seqs."""
    events = session.scalars(
        select(ScanEvent.id).where(ScanEvent.shift_id == shift.id).limit(late)
    ).all()
    session.add(
        Flag(
            station_id=shift.station_id,
            kind="late_event_after_signoff",
            severity="warning",
            subject_type="shift",
            subject_key=str(shift.id),
            evidence={"event_ids": list(events)},
            shift_id=shift.id,
        )
    )
    batch_pk = session.scalar(select(SyncBatch.id).where(SyncBatch.device_id == shift.device_id))
    session.execute(
        insert(QuarantinedEvent),
        [
            {
                "station_id": shift.station_id,
                "device_id": shift.device_id,
                "batch_pk": batch_pk,
                "position": n,
                "seq": n + 1,
                "tracking_no": "RR473124829GB",
                "parcel_tracking_no": "RR473124829GB",
                "error_code": "missing_field",
                "message": "compartment is required",
                "payload": "{}",
                "payload_hash": f"{n:064d}",
            }
            for n in range(rejected)
        ],
    )


@pytest.mark.parametrize("status", [ShiftStatus.CLOSED, ShiftStatus.SIGNED_OFF])
def test_a_shift_page_reads_the_same_few_queries_for_10_or_150_parcels(
    session: Session, tmp_path: Any, status: ShiftStatus
) -> None:
    """With its own flags' events (and which of them a correction voided), its PDA's
    rejected events beside its balance, and, for a shift waiting for its sign-off, what
    its sign-off form sends back counted as the board row and the balance count it
    (``sync.balances.read_handovers``: its rejected events, however many more than the
    page lists, the flags waiting, and the proof images its deliveries lack), for a
    station's manager. A signed-off shift's page has no sign-off form: it counts none of
    them (an auditor reading last month's handovers, five statements each)."""
    counts = []
    for code, parcels, late, rejected in (("SMALL", 10, 2, 3), ("BIG", 150, 40, 120)):
        station = factories.station_day(
            session, code, shifts=1, parcels_per_shift=parcels, day=DAY
        )
        shift = session.scalars(select(Shift).where(Shift.station_id == station)).one()
        shift.status = status
        _late_and_rejected(session, shift, late, rejected)
        session.flush()
        session.expire_all()
        shift = session.get_one(Shift, shift.id)
        with counted(session) as queries:
            page = shift_page(
                session=session,
                shift=shift,
                policy=Policy(),
                reader=BlobReader(user_id=1, station_id=station, everything=False),
                store=FileBlobStore(tmp_path),
                visible_station=station,
                unmasked=False,
            )
        [flag] = page.flags
        assert len(flag.events) == late
        assert len(page.rejections) == min(rejected, 100)
        assert page.more_rejections == (rejected > 100)
        assert page.rejected_total == rejected  # in the same statement that lists them
        assert all(q.lstrip().upper().startswith("SELECT") for q in queries)
        counts.append(len(queries))
        if status == ShiftStatus.CLOSED:  # as the board and the balance count them
            read = handover_seen(session, shift)
            assert page.rejected_events == read.rejected_events == rejected
            assert page.open_flag_ids == tuple(f.flag_id for f in read.open_flags)
            assert page.images_missing == read.images_missing
    assert counts[0] == counts[1] <= (19 if status == ShiftStatus.CLOSED else 14), counts


def test_a_proof_page_reads_the_same_few_queries_for_3_or_30_rejected_events(
    session: Session,
) -> None:
    """The rejected events naming a proof's parcel are read with the page in one query,
    however many a broken PDA sent: the newest ``PROOF_REJECTIONS_SHOWN``, and whether
    there are more; another station's are not a station's reader's (as
    ``GET /api/v1/quarantine`` scopes them), but a cross-station reader's."""
    station = factories.station_day(session, "PRF", shifts=1, parcels_per_shift=10, day=DAY)
    other = factories.station_day(session, "OTH", shifts=1, parcels_per_shift=1, day=DAY)
    shift = session.scalars(select(Shift).where(Shift.station_id == station)).one()
    elsewhere = session.scalars(select(Shift).where(Shift.station_id == other)).one()
    delivered = session.scalars(
        select(ScanEvent)
        .where(ScanEvent.shift_id == shift.id, ScanEvent.type == EventType.DELIVERED)
        .order_by(ScanEvent.id)
        .limit(2)
    ).all()
    counts = []
    for proof, rejected in zip(delivered, (3, 30), strict=True):
        rows = [_rejected(session, shift, None, proof.tracking_no) for _ in range(rejected)]
        session.execute(insert(QuarantinedEvent), rows)
        session.execute(
            insert(QuarantinedEvent), [_rejected(session, elsewhere, None, proof.tracking_no)]
        )
        session.flush()
        session.expire_all()
        detail = get_proof(session=session, event_id=proof.id, policy=Policy())
        with counted(session) as queries:
            page = proof_page(
                session=session, detail=detail, visible_station=station, unmasked=False
            )
        shown = min(rejected, PROOF_REJECTIONS_SHOWN)
        assert len(page.rejections) == shown and page.more_rejections == (rejected > shown)
        assert page.rejected_total == rejected  # in the same statement that lists them
        assert {r["station_id"] for r in page.rejections} == {station}
        ids = [r["id"] for r in page.rejections]
        assert ids == sorted(ids, reverse=True)  # newest first
        assert all(q.lstrip().upper().startswith("SELECT") for q in queries)
        counts.append(len(queries))
        everywhere = proof_page(
            session=session, detail=detail, visible_station=None, unmasked=True
        )
        assert other in {r["station_id"] for r in everywhere.rejections}
    assert counts[0] == counts[1] <= 3, counts


def test_handovers_with_every_discrepancy_decided_are_signed_off_together_in_flat_statements(
    session: Session,
) -> None:
    """At 19:00 the manager signs off at once the shifts whose discrepancies they have
    each resolved (``decided``): the same statements for 10 or 40 shifts on PostgreSQL,
    as for the clean ones, and the board that offers them reads no more for it."""
    admin = factories.user(session, "admin", "admin")
    counts = []
    for code, shifts in (("SMALL", 10), ("BIG", 40)):
        station = factories.station_day(
            session, code, shifts=shifts, parcels_per_shift=20, day=DAY
        )
        # Every handover flag (the parcel missing of each shift) resolved by a manager;
        # the shifts' own flags gone, so nothing else waits.
        session.execute(
            update(Flag)
            .where(Flag.station_id == station, Flag.kind == "missing_at_handover")
            .values(status=FlagStatus.RESOLVED)
        )
        session.execute(
            delete(Flag).where(Flag.station_id == station, Flag.kind != "missing_at_handover")
        )
        session.expire_all()
        with counted(session) as board_queries:
            rows = station_board(session=session, station_id=station, work_date=DAY)
        assert len(board_queries) <= 12, board_queries
        assert all(row.balance.status == "unbalanced" for row in rows)
        assert all(row.discrepancies_decided == len(row.balance.discrepancies) > 0 for row in rows)
        seen = {row.shift.id: row.balance_version for row in rows}
        session.expire_all()
        with counted(session) as statements:
            outcomes = sign_off_clean(
                session=session,
                station_id=station,
                seen=seen,
                user_id=admin.id,
                note="each decided",
                decided=True,
            )
        assert [o.outcome for o in outcomes] == [SIGNED_OFF] * shifts, outcomes
        counts.append(statements)

    def others(statements: list[str]) -> list[str]:
        return [q for q in statements if not q.lstrip().startswith("INSERT INTO audit_entry")]

    small, big = counts
    assert len(others(big)) == len(others(small)), others(big)
    if session.get_bind().dialect.name == "postgresql":
        assert len(big) == len(small), big
    entries = session.scalars(select(AuditEntry).where(AuditEntry.action == "shift_signed_off"))
    assert all(entry.details["discrepancies_decided"] for entry in entries)
    assert verify(session=session).ok


def test_the_earlier_days_and_their_couriers_shifts_are_one_statement_for_10_or_100(
    session: Session,
) -> None:
    """The shifts of earlier days still waiting, and where their couriers went on (the
    spare PDA's shift handed over and signed off: ``back``; another still open:
    ``also_open``, ``sync.balances.where_couriers_went``), are read in two statements
    however many there are: yesterday's shifts all left open on dead PDAs, each courier
    on a spare PDA since, half of them handed over and signed off already, and each a
    shift on that PDA the week before, signed off, which decides nothing."""
    yesterday = DAY - dt.timedelta(days=1)
    counts = {}
    for code, size in (("SMALL", 10), ("BIG", 100)):
        station = factories.station_day(
            session, code, shifts=size, parcels_per_shift=1, day=yesterday
        )
        dead = session.scalars(select(Shift).where(Shift.station_id == station)).all()
        for n, shift in enumerate(dead):
            shift.status = ShiftStatus.OPEN
            spare = shift.device_id + "-SPARE"
            session.execute(insert(Device).values(id=spare, station_id=station))
            session.add(
                Shift(
                    station_id=station,
                    courier_id=shift.courier_id,
                    device_id=spare,
                    status=ShiftStatus.SIGNED_OFF if n % 2 else ShiftStatus.OPEN,
                    work_date=yesterday,
                    opened_at=shift.opened_at + dt.timedelta(hours=2),
                    planned_end_at=shift.planned_end_at,
                    closed_at=shift.closed_at if n % 2 else None,
                )
            )
            session.add(
                Shift(
                    station_id=station,
                    courier_id=shift.courier_id,
                    device_id=spare,
                    status=ShiftStatus.SIGNED_OFF,
                    work_date=yesterday - dt.timedelta(days=7),
                    opened_at=shift.opened_at - dt.timedelta(days=7),
                    planned_end_at=shift.planned_end_at - dt.timedelta(days=7),
                    closed_at=shift.opened_at - dt.timedelta(days=7, hours=-8),
                )
            )
        session.flush()
        session.expire_all()
        with counted(session) as statements:
            before = waiting_from_earlier_days(session=session, station_id=station, work_date=DAY)
            went = where_couriers_went(session, station, [s for s, _ in before.shifts])
            back, also = went.back, went.also_open
        counts[size] = len(statements)
        assert len(before.shifts) == size + size // 2  # the spares still open wait too
        assert len(back) == size // 2 and len(also) == size  # each open pair names the other
    assert counts[10] == counts[100] == 2, counts


def test_a_balances_scans_elsewhere_are_one_statement_for_1_or_30_parcels(
    session: Session,
) -> None:
    """``GET /shifts/<id>/balance`` lists, with each parcel missing at handover, its
    scans under the station's other shifts (``sync.pages.handover_scans_elsewhere``):
    one statement however many such parcels, none for a balance without one."""
    station = factories.station_day(session, "ELSE", shifts=1, parcels_per_shift=150, day=DAY)
    session.flush()
    shift = session.scalars(select(Shift).where(Shift.station_id == station)).one()
    balance = gather(session, [shift])[shift.id].balance()
    counts = []
    for lost in (1, 30):
        missing = [
            Discrepancy("missing_at_handover", p.tracking_no, None, None, ())
            for p in balance.parcels[:lost]
        ]
        with counted(session) as statements:
            handover_scans_elsewhere(session, shift, replace(balance, discrepancies=missing))
        counts.append(len(statements))
    assert counts == [1, 1], counts
    with counted(session) as statements:
        handover_scans_elsewhere(session, shift, replace(balance, discrepancies=[]))
    assert statements == []


@contextmanager
def rows_fetched(session: Session) -> Iterator[list[int]]:
    """How many rows each statement sent in the block returns: each is run again, with
    its own parameters, once the block is done (``before_cursor_execute``)."""
    sent: list[tuple[str, Any]] = []
    connection = session.connection()

    def note(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        sent.append((statement, parameters))

    counts: list[int] = []
    event.listen(connection, "before_cursor_execute", note)
    try:
        yield counts
    finally:
        event.remove(connection, "before_cursor_execute", note)
    counts.extend(len(connection.exec_driver_sql(s, p).fetchall()) for s, p in sent)


def test_a_parcel_scanned_500_times_elsewhere_sends_the_balance_and_the_page_20_rows(
    session: Session, tmp_path: Any
) -> None:
    """A flooded parcel: a PDA of the station scanned the parcel another shift lost 500
    times (check-outs and returns, on a loop). ``handover_scans_elsewhere`` read every
    one of them and kept the latest ``SCANS_ELSEWHERE_READ`` in Python, for each read of
    the balance (``GET /shifts/<id>/balance``); now the database ranks them per parcel
    and sends those alone, the same scans, oldest first, as the shift's page lists."""
    station = factories.station_day(session, "FLOOD", shifts=2, parcels_per_shift=2, day=DAY)
    lost, looping = session.scalars(
        select(Shift).where(Shift.station_id == station).order_by(Shift.id)
    ).all()
    balance = gather(session, [lost])[lost.id].balance()
    [missing] = [d for d in balance.discrepancies if d.kind == "missing_at_handover"]
    template = session.scalars(
        select(ScanEvent).where(ScanEvent.shift_id == looping.id).order_by(ScanEvent.seq)
    ).first()
    assert template is not None
    start = lost.opened_at + dt.timedelta(hours=1)
    session.execute(
        insert(ScanEvent),
        [
            {
                "station_id": station,
                "device_id": looping.device_id,
                "courier_id": looping.courier_id,
                "batch_pk": template.batch_pk,
                "client_event_id": uuid.uuid4(),
                "seq": 100 + n,
                "type": "checked_out" if n % 2 else "returned_to_station",
                "tracking_no": missing.tracking_no,
                # Not in the order of their ids: the latest by time are not the last rows.
                "occurred_at_device": start + dt.timedelta(seconds=(n * 37) % 500),
                "occurred_at": start + dt.timedelta(seconds=(n * 37) % 500),
                "received_at": start + dt.timedelta(hours=1),
                "shift_id": looping.id,
                "details": {},
                "content_hash": f"{n:064d}",
            }
            for n in range(500)
        ],
    )
    session.flush()
    flooded = session.execute(
        select(ScanEvent.id, ScanEvent.occurred_at).where(
            ScanEvent.tracking_no == missing.tracking_no, ScanEvent.shift_id == looping.id
        )
    ).all()
    assert len(flooded) == 500
    latest = [i for _, i in sorted((at, i) for i, at in flooded)[-SCANS_ELSEWHERE_READ:]]
    with rows_fetched(session) as rows:
        found = handover_scans_elsewhere(session, lost, balance)
    assert [s.event_id for s in found[missing.tracking_no]] == latest
    assert {s.shift_id for s in found[missing.tracking_no]} == {looping.id}
    assert sum(rows) <= SCANS_ELSEWHERE_READ, rows  # were 501: every check-out and return
    page = shift_page(
        session=session,
        shift=lost,
        policy=Policy(),
        reader=BlobReader(user_id=1, station_id=station, everything=False),
        store=FileBlobStore(tmp_path),
        visible_station=station,
        unmasked=False,
    )
    [shown] = [d for d in page.discrepancies if d.discrepancy.tracking_no == missing.tracking_no]
    assert shown.elsewhere == found[missing.tracking_no]


def test_where_a_courier_went_is_one_statement_for_1_or_30_shifts_since(
    session: Session,
) -> None:
    """The page of a shift left open on a dead PDA names the shift its courier handed
    over since (``sync.pages.where_courier_went``, as the board's ``courier_back``):
    one statement, whether they worked one shift on a spare PDA since or thirty, the
    latest alone read of those handed over; and none is named while a later one is
    still open (out again)."""
    counts = []
    for code, since in (("ONE", 1), ("THIRTY", 30)):
        station = factories.station_day(session, code, shifts=1, parcels_per_shift=1, day=DAY)
        dead = session.scalars(select(Shift).where(Shift.station_id == station)).one()
        dead.status = ShiftStatus.OPEN
        spare = dead.device_id + "-SPARE"
        session.execute(insert(Device).values(id=spare, station_id=station))
        later = [
            Shift(
                station_id=station,
                courier_id=dead.courier_id,
                device_id=spare,
                status=ShiftStatus.SIGNED_OFF,
                work_date=DAY + dt.timedelta(days=n),
                opened_at=dead.opened_at + dt.timedelta(days=n, hours=2),
                planned_end_at=dead.planned_end_at + dt.timedelta(days=n),
                closed_at=dead.closed_at + dt.timedelta(days=n) if dead.closed_at else None,
            )
            for n in range(since)
        ]
        session.add_all(later)
        session.flush()
        with counted(session) as statements:
            went = where_courier_went(session, dead)
        counts.append(len(statements))
        assert went.courier_back is later[-1] and went.also_open == []
        later[-1].status, later[-1].closed_at = ShiftStatus.OPEN, None
        session.flush()
        went = where_courier_went(session, dead)
        assert went.courier_back is None and went.also_open == [later[-1]]
    assert counts == [1, 1], counts


def test_where_a_courier_went_reads_only_their_shifts_opened_since_or_still_open(
    session: Session,
) -> None:
    """A courier's PDA died today, a year of their shifts behind it (one a day). Where
    they went on (``sync.balances.where_couriers_went``, for every dead PDA's shift on
    the board, its page and a sign-off's refusal) read all of those through
    ``ix_shift_courier_id``, more each day: only those they handed over since the one
    still open are read now, and those still open of any day
    (``ix_shift_courier_status_opened``). On SQLite, here; PostgreSQL's plan is checked on a
    realistic history in ``tests/courier_api/test_query_plans.py``."""
    if session.get_bind().dialect.name != "sqlite":
        pytest.skip("PostgreSQL plans depend on statistics: test_query_plans.py has them")
    station = factories.station_day(session, "YEAR", shifts=1, parcels_per_shift=1, day=DAY)
    dead = session.scalars(select(Shift).where(Shift.station_id == station)).one()
    dead.status, dead.closed_at = ShiftStatus.OPEN, None
    spare = dead.device_id + "-SPARE"
    session.execute(insert(Device).values(id=spare, station_id=station))

    def worked(device: str, days: int, status: ShiftStatus) -> Shift:
        return Shift(
            station_id=station,
            courier_id=dead.courier_id,
            device_id=device,
            status=status,
            work_date=DAY + dt.timedelta(days=days),
            opened_at=dead.opened_at + dt.timedelta(days=days),
            planned_end_at=dead.planned_end_at + dt.timedelta(days=days),
            closed_at=None if status == ShiftStatus.OPEN else dead.opened_at,
        )

    year = [worked(dead.device_id, -n, ShiftStatus.SIGNED_OFF) for n in range(1, 300)]
    forgotten = worked(spare + "-OLD", -200, ShiftStatus.OPEN)
    session.execute(insert(Device).values(id=spare + "-OLD", station_id=station))
    handed = worked(spare, 0, ShiftStatus.CLOSED)
    handed.opened_at += dt.timedelta(hours=3)
    session.add_all([*year, forgotten, handed])
    session.flush()
    sent: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    connection = session.connection()
    event.listen(connection, "before_cursor_execute", capture)
    try:
        went = where_courier_went(session, dead)
    finally:
        event.remove(connection, "before_cursor_execute", capture)

    assert went.courier_back is handed and went.also_open == [forgotten]
    [(statement, parameters)] = sent
    plan = " | ".join(
        row[-1]
        for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
    )
    index = "USING INDEX ix_shift_courier_status_opened (courier_id=? AND status=?"
    assert f"{index})" in plan and f"{index} AND opened_at>?)" in plan, plan
    assert "SCAN shift" not in plan and "ix_shift_courier_id" not in plan, plan


def test_where_couriers_went_reads_hundreds_of_couriers_shifts_a_few_statements(
    session: Session,
) -> None:
    """At noon every shift of a big station is open: the board asks where each of their
    couriers went. Read by two terms a courier, 500 couriers made an OR SQLite refuses
    to parse ("Expression tree is too large"); they are read a few hundred at a time."""
    station = factories.station_day(session, "NOON", shifts=1, parcels_per_shift=1, day=DAY)
    [shift] = session.scalars(select(Shift).where(Shift.station_id == station)).all()
    couriers = 500
    out = [
        Shift(
            id=10_000 + n,
            station_id=station,
            courier_id=10_000 + n,
            device_id=f"PDA-{n}",
            status=ShiftStatus.OPEN,
            opened_at=shift.opened_at,
        )
        for n in range(couriers)
    ]
    with counted(session) as statements:
        went = where_couriers_went(session, station, out)
    assert went == CouriersWent({}, {})
    assert len(statements) == -(-couriers // COURIERS_PER_STATEMENT), len(statements)


def test_where_couriers_went_is_one_statement_text_for_3_or_40_couriers(
    session: Session, sent: list[str]
) -> None:
    """A manager at 19:00 reloads a board of 40 shifts still open. Two terms a courier
    made a new statement for each number of couriers, and most of a call's time went on
    building and compiling an OR of 80 terms in Python: the couriers are ``IN`` lists
    now, one statement text whatever their number (SQLAlchemy compiles it once)."""
    station = factories.station_day(session, "EVE", shifts=1, parcels_per_shift=1, day=DAY)
    [shift] = session.scalars(select(Shift).where(Shift.station_id == station)).all()

    def out(couriers: int) -> list[Shift]:
        return [
            Shift(
                id=20_000 + n,
                station_id=station,
                courier_id=20_000 + n,
                device_id=f"PDA-{n}",
                status=ShiftStatus.OPEN,
                opened_at=shift.opened_at + dt.timedelta(minutes=n),
            )
            for n in range(couriers)
        ]

    sent.clear()
    assert where_couriers_went(session, station, out(3)) == CouriersWent({}, {})
    assert where_couriers_went(session, station, out(40)) == CouriersWent({}, {})

    # As SQLAlchemy compiles it: each ``IN`` list one parameter, expanded when sent.
    def compiled(statement: str) -> str:
        marks = re.sub(r"%\(\w+\)s(::\w+)?", "?", statement)  # PostgreSQL's, SQLite's
        return re.sub(r"\?(, \?)+", "?", marks)

    few, many = (compiled(statement) for statement in sent)
    assert few == many


# (courier, PDA, station, state, hour opened, closed_at set): few of each, so a courier
# has several shifts open, two opened the same second, shifts at another station.
WORKED = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=2),
        st.integers(min_value=0, max_value=3),
        st.sampled_from([0, 0, 0, 1]),
        st.sampled_from(list(ShiftStatus)),
        st.integers(min_value=0, max_value=4),
        st.booleans(),
    ),
    max_size=14,
)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(worked=WORKED, data=st.data())
def test_where_couriers_went_answers_as_reading_every_shift_of_the_station(
    session: Session, worked: list[tuple[int, int, int, ShiftStatus, int, bool]], data: Any
) -> None:
    """``where_couriers_went`` reads each courier's shifts still open and those handed
    over since their oldest still open (``ix_shift_courier_status_opened``), the latest on
    each PDA: it answers as a reading of every shift of the station does. Back: the
    latest shift the courier opened after it on another PDA (opened the same second is
    not after) is handed over; out again if that one is still open. Also open: their
    other shifts still open on another PDA, oldest first. Shifts of another station, or
    handed over before, never count; a courier with no shift since is not back."""
    tag = uuid.uuid4().hex[:8]
    stations = [factories.station(session, f"W{tag}{n}") for n in range(2)]
    couriers = [factories.user(session, f"w{tag}{n}", "courier", stations[0]) for n in range(3)]
    pdas = [factories.device(session, f"PDA-W{tag}{n}", stations[0]) for n in range(4)]
    start = dt.datetime(2026, 11, 20, 8, tzinfo=dt.UTC)
    open_on: set[int] = set()
    rows = []
    for courier, pda, station, status, hour, closed in worked:
        if status == ShiftStatus.OPEN and pda in open_on:
            status = ShiftStatus.CLOSED  # one shift open a PDA
        open_on |= {pda} if status == ShiftStatus.OPEN else set()
        # Seven hours apart: across midnight too (their reads are grouped by day).
        opened_at = start + dt.timedelta(hours=7 * hour)
        rows.append(
            Shift(
                station_id=stations[station].id,
                courier_id=couriers[courier].id,
                device_id=pdas[pda].id,
                status=status,
                work_date=opened_at.date(),
                opened_at=opened_at,
                planned_end_at=opened_at + dt.timedelta(hours=9),
                # Closed, then open again; or handed over with its close not yet known.
                closed_at=opened_at + dt.timedelta(hours=1) if closed else None,
            )
        )
    session.add_all(rows)
    session.flush()
    here = [shift for shift in rows if shift.station_id == stations[0].id]
    # A board, a shift's page: some of the station's shifts, not always all.
    asked = data.draw(st.lists(st.sampled_from(here), unique_by=id) if here else st.just([]))

    went = where_couriers_went(session, stations[0].id, asked)

    def key(shift: Shift) -> tuple[dt.datetime, int]:
        return (shift.opened_at, shift.id)

    back: dict[int, int] = {}
    also: dict[int, list[int]] = {}
    for shift in asked:
        if shift.status != ShiftStatus.OPEN:
            continue
        elsewhere = [
            other
            for other in here
            if other.courier_id == shift.courier_id and other.device_id != shift.device_id
        ]
        still_open = sorted((s for s in elsewhere if s.status == ShiftStatus.OPEN), key=key)
        if still_open:
            also[shift.id] = [s.id for s in still_open]
        since = [other for other in elsewhere if other.opened_at > shift.opened_at]
        if since and (latest := max(since, key=key)).status != ShiftStatus.OPEN:
            back[shift.id] = latest.id
    assert {id: s.id for id, s in went.back.items()} == back
    assert {id: [s.id for s in shifts] for id, shifts in went.also_open.items()} == also
