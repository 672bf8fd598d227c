"""PostgreSQL's plans for the hot queries: an index on every big table, never a Seq Scan.

A database of its own (``tests.live_server.postgresql_database``) gets a realistic
history, bulk-inserted: ``STATIONS`` stations of ``DEVICES`` couriers with a PDA each,
``DAYS`` closed shifts per PDA of ``PARCELS_PER_SHIFT`` parcels (checked out, out for
delivery, then delivered with a proof and its photo or a failed attempt), their feed
entries, flags, consents, the couriers' consent requests and proof images: tens of
thousands of rows per big table,
and a year of older flags (over 100,000: flags are kept), and the audit log of that
year (sign-offs, flag resolutions, an auditor's proof reads, the daily purges), then
``ANALYZE``, as autovacuum would. Then the real code paths run through the API
(push, re-push, pull, balance, board, proof search), every SQL statement they send is
captured with its parameters (``before_cursor_execute``), and each is explained with
those parameters (``EXPLAIN (FORMAT JSON)``, nothing executed). The test fails when a
plan reads one of ``BIG_TABLES`` with a Seq Scan, or reads it at all without an index
(Index Scan, Index Only Scan, Bitmap Index Scan). The planner is left alone: no
``enable_seqscan`` tricks.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import random
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from psycopg.types.json import Jsonb
from sqlalchemy import Engine, delete, event, insert, select, text
from sqlalchemy.orm import Session

from courier_api.extensions import db
from models import (
    AuditEntry,
    AuditEntryParcel,
    DeviceSyncState,
    Flag,
    FlagSeverity,
    FlagStatus,
    Parcel,
    ProofImage,
    QuarantinedEvent,
    ScanEvent,
    Shift,
    migrate,
)
from models.flag import parcel_of
from sync import audit
from sync.consents import address_key
from sync.flags import LATE_COMMIT_WINDOW, FlagCursor
from tests import factories
from tests.conftest import Auth, make_test_app
from tests.live_server import postgresql_database, postgresql_test_url

pytestmark = pytest.mark.postgres_only

STATIONS = 6
DEVICES = 8  # per station
DAYS = 30  # closed shifts per PDA, one a day
# Flags are kept for good (the audit trail): a year of them before those days, as rows of
# the flag table only (their parcels' events are gone from this world, not their flags).
FLAG_HISTORY_DAYS = 335
PARCELS_PER_SHIFT = 24
DELIVERED_SHARE = 0.85
PUSH_PARCELS = 67  # a push of 200 events: 67 parcels' lifecycles, less one
# Tables that grow with the field's work: their look-ups must go through an index.
BIG_TABLES = {
    "scan_event",
    "parcel",
    "feed_change",
    "flag",
    "flag_change",  # kept with the flags: a walk through them counts their openings
    "shift",
    "sync_batch",
    "proof_image",
    "consent",
    "blob",
    "audit_entry",
    "audit_entry_parcel",
    "quarantined_event",
    "rejected_image",
    "consent_request",
}
MIN_BIG_ROWS = 1000  # each big table has at least this many rows (most: thousands)
RULE_FLAG_KINDS = [
    "far_from_address",
    "pod_blob_missing",
    "delivered_without_pod",
    "unauthorized_locker_drop",
    "consent_after_drop",
    "correction_review",
]
INDEX_SCANS = {"Index Scan", "Index Only Scan", "Bitmap Heap Scan"}
PROOF_READ_EVERY = 10  # the auditor reads one delivery's proof in this many


@dataclass
class Captured:
    statement: str
    parameters: Any


@dataclass
class World:
    app: Flask
    engine: Engine
    client: FlaskClient
    station_id: int
    courier_id: int
    device_id: str
    shift_id: int  # a closed shift of that PDA, with its history
    work_date: dt.date
    tracking_no: str  # one of its delivered parcels
    delivery_id: int  # that delivery's event
    courier: dict[str, str]
    manager: dict[str, str]
    auditor: dict[str, str]
    manager_id: int  # of the station above
    auditor_id: int


def _photo(name: str) -> str:
    return hashlib.sha256(f"photo-{name}".encode()).hexdigest()


class History:
    """Rows of the big tables, generated in memory and written with COPY."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.ids: dict[str, int] = defaultdict(int)
        self.entries: list[dict[str, Any]] = []  # the audit log's, unchained

    def add(self, table: str, **row: Any) -> int:
        """Queue a row; tables whose rows others point at get their id here."""
        if table in ("shift", "sync_batch", "scan_event"):
            self.ids[table] += 1
            row["id"] = self.ids[table]
        if table == "flag":
            row.setdefault("opened_at", row["raised_at"])  # never opened again
            row.setdefault("tracking_no", parcel_of(row["subject_type"], row["subject_key"]))
        self.rows[table].append(row)
        return row.get("id", 0)

    def audit(self, **entry: Any) -> None:
        """An audit entry, chained with the others in time order by ``chain_audit_log``."""
        self.entries.append(entry)

    def chain_audit_log(self) -> None:
        prev = audit.GENESIS_HASH
        for entry in sorted(self.entries, key=lambda e: e["at"]):
            parcels = entry.pop("parcels", [])
            entry["prev_hash"] = prev
            hashed = {name: value for name, value in entry.items() if name != "tracking_no"}
            entry["entry_hash"] = prev = audit.entry_hash(**hashed)
            self.ids["audit_entry"] += 1
            entry_id = self.ids["audit_entry"]
            self.rows["audit_entry"].append({"id": entry_id, **entry})
            # filed under every parcel it concerns, as ``audit.append`` files it
            for number in dict.fromkeys([entry.get("tracking_no"), *parcels]):
                if number:
                    self.rows["audit_entry_parcel"].append(
                        {"tracking_no": number, "entry_id": entry_id}
                    )

    def write(self, connection: Any) -> None:
        self.chain_audit_log()
        with connection.cursor() as cursor:
            for table in COPY_ORDER:
                rows = self.rows[table]
                columns = list(dict.fromkeys(column for row in rows for column in row))
                with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row([_copyable(row.get(column)) for column in columns])
            for table in self.ids:
                cursor.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {self.ids[table]})"
                )
            cursor.execute(
                "INSERT INTO proof_image (event_id, sha256, tracking_no) "
                "SELECT id, details->'pod'->>'photo_sha256', tracking_no FROM scan_event "
                "WHERE type = 'delivered'"
            )
            cursor.execute(
                "INSERT INTO rejected_image (quarantined_event_id, sha256, tracking_no) "
                "SELECT id, payload::jsonb->'pod'->>'photo_sha256', parcel_tracking_no "
                "FROM quarantined_event"
            )


def _evidence(kind: str, event_id: int) -> dict[str, Any]:
    """Evidence as the rules write it (``sync.rules``): what makes a flag row's width."""
    evidence: dict[str, Any] = {"event_ids": [event_id]}
    if kind == "far_from_address":
        evidence |= {"distances_m": [{"event_id": event_id, "distance_m": 412.5}], "limit_m": 300}
    elif kind == "pod_blob_missing":
        evidence = {"blobs": [_photo(str(event_id))]}
    elif kind in ("unauthorized_locker_drop", "consent_after_drop"):
        evidence["consent_ids"] = [event_id // 2]
    elif kind == "correction_review":
        evidence["corrections"] = [{"correction": event_id + 1, "voids": event_id}]
    return evidence


def _older_flags(
    history: History, station_id: int, courier_id: int, manager_id: int, today: dt.date
) -> None:
    """A courier's rule flags of the ``FLAG_HISTORY_DAYS`` before the events (one parcel
    in four, as in the days with events), resolved by a manager (an audit entry) or
    closed since."""
    for day in range(DAYS + 1, DAYS + FLAG_HISTORY_DAYS + 1):
        raised = dt.datetime.combine(today - dt.timedelta(days=day), dt.time(10), tzinfo=dt.UTC)
        for n in range(PARCELS_PER_SHIFT // 4):
            serial = len(history.rows["flag"])
            kind = RULE_FLAG_KINDS[serial % len(RULE_FLAG_KINDS)]
            history.add(
                "flag",
                station_id=station_id,
                kind=kind,
                severity="warning",
                subject_type="parcel",
                subject_key=f"RR{serial:08d}{n % 10}CN",
                evidence=_evidence(kind, serial),
                status="closed" if serial % 5 == 0 else "resolved",
                closed_reason="checked with the courier",
                courier_id=courier_id,
                raised_at=raised,
                updated_at=raised,
            )
            if serial % 5:
                _flag_resolved(history, manager_id, raised + dt.timedelta(hours=8))


def _older_images(history: History, device_id: str, today: dt.date) -> None:
    """The proof images a PDA's deliveries named in the ``FLAG_HISTORY_DAYS`` before the
    events, as rows of the blob table only: a year of images is kept (the retention's
    default), and a row stays after the purge deleted its bytes."""
    for day in range(DAYS + 1, DAYS + FLAG_HISTORY_DAYS + 1):
        uploaded = dt.datetime.combine(today - dt.timedelta(days=day), dt.time(18), tzinfo=dt.UTC)
        for n in range(round(PARCELS_PER_SHIFT * DELIVERED_SHARE)):
            history.add(
                "blob",
                sha256=_photo(f"{device_id}-old-{day}-{n}"),
                media_type="image/png",
                size_bytes=100,
                width=10,
                height=10,
                uploaded_at=uploaded,
            )


def _flag_resolved(history: History, manager_id: int, at: dt.datetime) -> None:
    """The audit entry of the flag just added, resolved at ``at`` (flag ids follow the
    order of the rows: COPY gives them from the sequence)."""
    flag = history.rows["flag"][-1]
    history.audit(
        at=at,
        actor_id=manager_id,
        action="flag_resolved",
        subject_type="flag",
        subject_key=str(len(history.rows["flag"])),
        details={
            "kind": flag["kind"],
            "subject_type": flag["subject_type"],
            "subject_key": flag["subject_key"],
            "station_id": flag["station_id"],
            "from_status": "open",
            "note": "checked with the courier",
        },
        tracking_no=flag["tracking_no"],
    )


def _copyable(value: Any) -> Any:
    return Jsonb(value) if isinstance(value, dict | list) else value  # JSON documents


COPY_ORDER = [
    "shift",
    "sync_batch",
    "parcel",
    "scan_event",
    "quarantined_event",
    "feed_change",
    "flag",
    "consent",
    "consent_request",
    "blob",
    "device_sync_state",
    "audit_entry",
    "audit_entry_parcel",
]


def _populate(engine: Engine) -> dict[str, Any]:
    """The history, written with COPY; the ids the paths under test start from."""
    rng = random.Random(8)
    today = dt.datetime.now(dt.UTC).date()
    with Session(engine) as session:
        stations = [factories.station(session, code=f"PLAN{s}") for s in range(STATIONS)]
        auditor_id = factories.user(session, "plan-auditor", "auditor").id
        managers = {
            station.id: factories.user(
                session, f"plan-manager{station.id}", "station_manager", station
            ).id
            for station in stations
        }
        couriers = []
        for station in stations:
            for d in range(DEVICES):
                user = factories.user(session, f"plan-c{station.id}-{d}", "courier", station)
                device = factories.device(session, f"PDA-PLAN-{station.id}-{d}", station)
                couriers.append((station.id, user.id, device.id))
        session.commit()
    history = History()
    serial = 0
    txid = 1000
    for station_id, courier_id, device_id in couriers:
        seq = 0
        manager_id = managers[station_id]
        for day in range(DAYS):
            work_date = today - dt.timedelta(days=DAYS - day)
            opened = dt.datetime.combine(work_date, dt.time(1, 0), tzinfo=dt.UTC)
            closed = opened + dt.timedelta(hours=9)
            first_seq = seq + 1
            shift_id = history.add(
                "shift",
                station_id=station_id,
                courier_id=courier_id,
                device_id=device_id,
                status="signed_off" if day < DAYS - 1 else "closed",
                work_date=work_date,
                opened_at=opened,
                planned_end_at=opened + dt.timedelta(hours=10),
                closed_at=closed,
                first_seq=first_seq,
                last_seq=first_seq + 3 * PARCELS_PER_SHIFT - 1,
                seq_at_close=first_seq + 3 * PARCELS_PER_SHIFT - 1,
                reopened_count=0,
            )
            numbers = [factories.s10() for _ in range(PARCELS_PER_SHIFT)]
            if day < DAYS - 1:
                history.audit(
                    at=closed + dt.timedelta(hours=1),
                    actor_id=manager_id,
                    action="shift_signed_off",
                    subject_type="shift",
                    subject_key=str(shift_id),
                    details={
                        "station_id": station_id,
                        "courier_id": courier_id,
                        "device_id": device_id,
                        "note": "checked at the counter",
                        "forced_reason": None,
                    },
                    parcels=numbers,  # the balance names each of the shift's parcels
                )
            delivered = {}
            for tn in numbers:
                serial += 1
                delivered[tn] = rng.random() < DELIVERED_SHARE
                phone, address = f"+86138{serial:08d}", f"{serial} Century Ave"
                history.add(
                    "parcel",
                    tracking_no=tn,
                    station_id=station_id,
                    service_class="parcel" if serial % 3 else "express",
                    recipient_name="R",
                    recipient_phone=phone,
                    address=address,
                    courier_id=courier_id,
                    status="delivered" if delivered[tn] else "attempt_failed",
                    status_at=closed,
                    created_at=opened,
                    updated_at=closed,
                )
                if serial % 2 == 0:  # a parcel's consent, or now and then a standing one
                    standing = serial % 100 == 0
                    history.add(
                        "consent",
                        scope="standing" if standing else "parcel",
                        station_id=station_id,
                        tracking_no=None if standing else tn,
                        recipient_phone=phone if standing else None,
                        address=address if standing else None,
                        address_key=address_key(address) if standing else None,
                        method="locker",
                        channel="sms",
                        granted_at=opened,
                        created_at=opened,
                    )
                if serial % 3 == 0:  # express: the courier asked the recipient at the door
                    answered = serial % 2 == 1
                    history.add(
                        "consent_request",
                        station_id=station_id,
                        tracking_no=tn,
                        courier_id=courier_id,
                        method="locker",
                        requested_at=opened,
                        expires_at=opened + dt.timedelta(minutes=30),
                        status="refused" if answered else "pending",
                        # unanswered: lapsed long ago, and announced
                        lapse_announced_at=None if answered else opened + dt.timedelta(hours=1),
                        created_at=opened,
                    )
                if serial % 4 == 0:  # a rule flag on one parcel in four
                    history.add(
                        "flag",
                        station_id=station_id,
                        kind=(kind := RULE_FLAG_KINDS[serial // 4 % len(RULE_FLAG_KINDS)]),
                        severity="warning",
                        subject_type="parcel",
                        subject_key=tn,
                        evidence=_evidence(kind, history.ids["scan_event"] + serial % 1000),
                        status="open",
                        courier_id=courier_id,
                        raised_at=closed,
                        updated_at=closed,
                    )
            for step in ("checked_out", "out_for_delivery", "outcome"):
                batch_pk = history.add(
                    "sync_batch",
                    device_id=device_id,
                    batch_id=uuid.uuid4(),
                    station_id=station_id,
                    courier_id=courier_id,
                    sent_at=closed,
                    received_at=closed,
                    clock_offset_ms=0,
                    event_count=PARCELS_PER_SHIFT,
                    request_hash="0" * 64,
                    receipt={},
                )
                for tn in numbers:
                    seq += 1
                    kind, details = step, {}
                    if step == "outcome" and delivered[tn]:
                        kind = "delivered"
                        photo = _photo(f"{device_id}-{seq}")
                        details = {"pod": {"recipient_name": "R", "photo_sha256": photo}}
                        history.add(
                            "blob",
                            sha256=photo,
                            media_type="image/png",
                            size_bytes=100,
                            width=10,
                            height=10,
                            uploaded_at=closed,
                        )
                    elif step == "outcome":
                        kind = "delivery_attempt_failed"
                        details = {"reason": "recipient_absent", "action": "notice_left"}
                    at = opened + dt.timedelta(minutes=10 * (seq - first_seq))
                    event_id = history.add(
                        "scan_event",
                        station_id=station_id,
                        device_id=device_id,
                        courier_id=courier_id,
                        batch_pk=batch_pk,
                        client_event_id=uuid.uuid4(),
                        seq=seq,
                        type=kind,
                        tracking_no=tn,
                        occurred_at_device=at,
                        occurred_at=at,
                        received_at=closed,
                        shift_id=shift_id,
                        details=details,
                        content_hash=_photo(f"{device_id}-{seq}-content"),
                    )
                    if kind == "delivered" and event_id % PROOF_READ_EVERY == 0:
                        history.audit(
                            at=closed + dt.timedelta(days=1),
                            actor_id=auditor_id,
                            action="proof_read",
                            subject_type="proof",
                            subject_key=str(event_id),
                            details={"tracking_no": tn, "event_ids": [event_id]},
                            tracking_no=tn,
                        )
                    if step != "out_for_delivery":
                        txid += 1
                        history.add(
                            "feed_change",
                            txid=txid,
                            station_id=station_id,
                            courier_id=courier_id,
                            kind="parcel",
                            tracking_no=tn,
                            created_at=closed,
                        )
                if step == "outcome":  # a drop the PDA sent without its compartment
                    # Its number as typed: every other one ``rr 4731 2482 9gb``.
                    written = factories.typed_loosely(numbers[1]) if shift_id % 2 else numbers[1]
                    # With its photo: ``rejected_image`` names it (``sync.blobs.parcels_naming``).
                    raw = json.dumps(
                        {
                            "seq": seq,
                            "tracking_no": written,
                            "locker_id": "L-1",
                            "pod": {"photo_sha256": _photo(f"{device_id}-{seq}-refused")},
                        }
                    )
                    history.add(
                        "quarantined_event",
                        station_id=station_id,
                        device_id=device_id,
                        batch_pk=batch_pk,
                        position=PARCELS_PER_SHIFT,
                        client_event_id=str(uuid.uuid4()),
                        seq=None,
                        event_type="delivered_to_locker",
                        tracking_no=written,
                        parcel_tracking_no=numbers[1],
                        error_code="missing_field",
                        message="compartment is required",
                        field="compartment",
                        payload=raw,
                        payload_hash=_photo(raw),
                        received_at=closed,
                    )
            shift_flags = {  # a shift's own flags, resolved by a manager
                ("missing_at_handover", f"{shift_id}:{numbers[0]}"): {
                    "event_ids": [history.ids["scan_event"] - 3 * PARCELS_PER_SHIFT + 1],
                    "tracking_no": numbers[0],
                },
                ("shift_not_closed", str(shift_id)): {
                    "planned_end_at": (opened + dt.timedelta(hours=10)).isoformat(),
                    "grace_minutes": 30,
                },
            }
            for (kind, subject_key), evidence in shift_flags.items():
                history.add(
                    "flag",
                    station_id=station_id,
                    kind=kind,
                    severity="critical",
                    subject_type="shift",
                    subject_key=subject_key,
                    evidence=evidence,
                    status="resolved",
                    closed_reason="checked with the courier at the counter",
                    courier_id=courier_id,
                    shift_id=shift_id,
                    raised_at=closed,
                    updated_at=closed,
                )
                _flag_resolved(history, manager_id, closed + dt.timedelta(minutes=30))
        _older_flags(history, station_id, courier_id, manager_id, today)
        _older_images(history, device_id, today)
        history.add(
            "device_sync_state",
            device_id=device_id,
            acked_through_seq=seq,
            max_seq=seq,
            missing_ranges=[],
        )
    for day in range(DAYS + FLAG_HISTORY_DAYS):  # the scheduler's daily purge of images
        history.audit(
            at=dt.datetime.combine(today - dt.timedelta(days=day), dt.time(3), tzinfo=dt.UTC),
            actor_id=None,
            action="proof_images_purged",
            subject_type="blob",
            subject_key=_photo(f"purged-{day}"),
            details={"count": 1, "digests": [_photo(f"purged-{day}")], "retention_days": 365},
        )
    raw = engine.raw_connection()
    try:
        history.write(raw.driver_connection)
        raw.commit()
    finally:
        raw.close()
    with engine.begin() as connection:
        # Each flag's history, as raising and deciding it wrote it (``sync.flags._record``):
        # kept for good with the flags, which a walk's check reads (its openings).
        connection.execute(
            text(
                "INSERT INTO flag_change (flag_id, at, from_status, to_status) "
                "SELECT id, raised_at, NULL, 'open' FROM flag f WHERE NOT EXISTS "
                "(SELECT 1 FROM flag_change c WHERE c.flag_id = f.id)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO flag_change (flag_id, at, from_status, to_status) "
                "SELECT id, updated_at, 'open', status FROM flag "
                "WHERE status IN ('resolved', 'closed') AND updated_at > raised_at"
            )
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("ANALYZE"))
    with Session(engine) as session:
        station_id, courier_id, device_id = couriers[DEVICES + 3]  # at the second station
        shift_id, work_date = session.execute(
            select(Shift.id, Shift.work_date)
            .where(Shift.device_id == device_id)
            .order_by(Shift.id.desc())
            .limit(1)
        ).one()
        delivery_id, tracking_no = session.execute(
            select(ScanEvent.id, ScanEvent.tracking_no)
            .where(ScanEvent.shift_id == shift_id, ScanEvent.type == "delivered")
            .limit(1)
        ).one()
    return {
        "station_id": station_id,
        "manager_id": managers[station_id],
        "auditor_id": auditor_id,
        "courier_id": courier_id,
        "device_id": device_id,
        "shift_id": shift_id,
        "work_date": work_date,
        "tracking_no": tracking_no,
        "delivery_id": delivery_id,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = postgresql_test_url()
    assert base is not None
    with postgresql_database(base, "plans") as url:
        app = make_test_app(url, tmp_path_factory.mktemp("plans"))
        engine = db.engine_of(app)
        try:
            migrate.upgrade(engine)
            ids = _populate(engine)
            client = app.test_client()
            auth = Auth(client)
            with engine.connect() as connection:
                courier = connection.scalar(
                    text("SELECT username FROM app_user WHERE id = :id"), {"id": ids["courier_id"]}
                )
            yield World(
                app=app,
                engine=engine,
                client=client,
                courier=auth.headers(courier, ids["device_id"]),
                manager=auth.headers(f"plan-manager{ids['station_id']}"),
                auditor=auth.headers("plan-auditor"),
                **ids,
            )
        finally:
            engine.dispose()


class Capture:
    """Every statement the app's engine sends while it is open."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.statements: list[Captured] = []

    def __enter__(self) -> Capture:
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *_exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)

    def _record(
        self, _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, many: bool
    ) -> None:
        if many and isinstance(parameters, list | tuple) and parameters:
            parameters = parameters[0]  # one row's values stand for the executemany
        self.statements.append(Captured(statement, parameters))


def _plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)


@dataclass
class Explained:
    statement: str
    tables: dict[str, set[str]]  # big table -> the scan node types reading it
    indexes: set[str]
    plan: Any


def explain(engine: Engine, captured: list[Captured]) -> list[Explained]:
    """Each captured statement that reads a table, explained with its own parameters."""
    explained = []
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for item in captured:
            verb = item.statement.lstrip().split(None, 1)[0].upper()
            if verb not in ("SELECT", "UPDATE", "DELETE", "WITH", "INSERT"):
                continue
            if verb == "INSERT" and " SELECT " not in item.statement.upper():
                continue  # INSERT ... VALUES reads nothing
            cursor.execute(f"EXPLAIN (FORMAT JSON) {item.statement}", item.parameters or None)
            plan = cursor.fetchone()[0]
            plan = json.loads(plan) if isinstance(plan, str) else plan
            tables: dict[str, set[str]] = {}
            indexes: set[str] = set()
            for node in _plan_nodes(plan[0]["Plan"]):
                if "Index Name" in node:
                    indexes.add(node["Index Name"])
                relation = node.get("Relation Name")
                if relation in BIG_TABLES and node["Node Type"] not in ("ModifyTable",):
                    tables.setdefault(relation, set()).add(node["Node Type"])
            explained.append(Explained(item.statement, tables, indexes, plan))
        raw.rollback()
    finally:
        raw.close()
    return explained


def assert_indexed(explained: list[Explained]) -> None:
    bad = [
        f"{', '.join(f'{t}: {sorted(kinds)}' for t, kinds in e.tables.items())}\n"
        f"  {' '.join(e.statement.split())[:600]}"
        for e in explained
        if any(kinds - INDEX_SCANS for kinds in e.tables.values())
    ]
    assert not bad, "plans reading a big table without an index:\n" + "\n".join(bad)


def run(world: World, method: str, url: str, **kwargs: Any) -> tuple[Any, list[Explained]]:
    with Capture(world.engine) as capture:
        response = world.client.open(url, method=method, **kwargs)
        response.get_data()  # a streamed answer (an export) is read as it is sent
        response.close()
    assert response.status_code < 300, (url, response.status_code, response.get_data()[:500])
    return response, explain(world.engine, capture.statements)


def reads(explained: list[Explained], table: str) -> list[Explained]:
    return [e for e in explained if table in e.tables]


def test_the_database_is_big_enough_for_the_plans_to_mean_something(world: World) -> None:
    with world.engine.connect() as connection:
        counts = dict(
            connection.execute(
                text("SELECT relname, reltuples::bigint FROM pg_class WHERE relname = ANY(:t)"),
                {"t": sorted(BIG_TABLES)},
            ).all()
        )
    assert set(counts) == BIG_TABLES
    small = {table: rows for table, rows in counts.items() if rows < MIN_BIG_ROWS}
    assert not small, counts
    assert counts["scan_event"] > 50_000 and counts["parcel"] > 20_000, counts
    assert counts["flag"] > 100_000, counts


def _push_body(world: World, numbers: list[str], first_seq: int) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    events = []
    seq = first_seq
    for step in ("checked_out", "out_for_delivery", "delivered"):
        for number, tn in enumerate(numbers):
            fields: dict[str, Any] = {}
            kind = step
            if step == "delivered":
                photo = _photo(f"{world.device_id}-{seq}")
                fields["pod"] = {"recipient_name": "R", "photo_sha256": photo}
                if number % 5 == 0:  # a locker drop: its PDA's events bound it
                    kind = "delivered_to_locker"
                    fields.update(locker_id="L-1", compartment=str(number))
            at = now - dt.timedelta(minutes=30) + dt.timedelta(seconds=seq - first_seq)
            events.append(factories.event(seq, tn, kind, occurred_at=at, **fields))
            seq += 1
    return factories.push_body(world.device_id, events[:200])


def test_push_dedupe_and_projection_use_indexes(world: World) -> None:
    with Session(world.engine) as session:
        numbers = [factories.s10() for _ in range(PUSH_PARCELS)]
        session.execute(
            insert(Parcel),
            [
                {
                    "tracking_no": tn,
                    "station_id": world.station_id,
                    "service_class": "parcel",
                    "recipient_name": "R",
                    "address": "1 Road",
                }
                for tn in numbers
            ],
        )
        last_seq = session.scalar(
            select(DeviceSyncState.max_seq).where(DeviceSyncState.device_id == world.device_id)
        )
        session.commit()
    client, courier = world.client, world.courier
    opened = client.post("/api/v1/shifts", json={"first_seq": last_seq + 1}, headers=courier)
    assert opened.status_code == 201, opened.get_json()
    body = _push_body(world, numbers, last_seq + 1)

    first, pushed = run(world, "POST", "/api/v1/sync/push", json=body, headers=courier)
    assert {r["status"] for r in first.get_json()["results"]} == {"applied"}
    again, replayed = run(world, "POST", "/api/v1/sync/push", json=body, headers=courier)
    assert again.get_json() == first.get_json()  # the stored receipt
    rebuilt_body = {**body, "batch_id": str(uuid.uuid4())}
    rebuilt, resent = run(world, "POST", "/api/v1/sync/push", json=rebuilt_body, headers=courier)
    assert {r["status"] for r in rebuilt.get_json()["results"]} == {"duplicate"}

    explained = pushed + replayed + resent
    assert_indexed(explained)
    # What each kind of look-up went through, so the test cannot pass by reading nothing.
    used = set().union(*(e.indexes for e in explained))
    assert "uq_sync_batch_device_batch" in used  # the batch replay
    assert "uq_scan_event_device_event" in used or "uq_scan_event_device_id_seq" in used
    assert reads(pushed, "parcel") and reads(pushed, "scan_event")  # the projection
    assert reads(resent, "scan_event")  # events already held, by id and seq
    # What the drops' bounds read (``sync.drop_bounds.DATED_AFTER``): the device's events
    # by time after the push's earliest (none by seq: the push is in order).
    nearby_sql = "SELECT scan_event.tracking_no, scan_event.seq, scan_event.occurred_at"
    [nearby] = [e for e in pushed if " ".join(e.statement.split()).startswith(nearby_sql)]
    assert "ix_scan_event_device_time" in nearby.indexes, nearby.plan


def test_opening_a_shift_reads_the_pdas_unfiled_events_not_its_history(world: World) -> None:
    """Without a first seq, opening a shift files under it the PDA's events filed under
    none from just before it: through the index of those alone, not through the
    device's (device_id, seq), which holds every event the PDA ever sent."""
    with world.engine.connect() as connection:
        still_open = connection.scalar(
            select(Shift.id).where(Shift.device_id == world.device_id, Shift.status == "open")
        )
    if still_open is not None:  # the push's test opened one
        closed = world.client.post(
            f"/api/v1/shifts/{still_open}/close", json={}, headers=world.courier
        )
        assert closed.status_code == 200, closed.get_json()
    _, opening = run(world, "POST", "/api/v1/shifts", json={}, headers=world.courier)
    filing = [e for e in opening if e.statement.lstrip().upper().startswith("UPDATE SCAN_EVENT")]
    assert len(filing) == 1, [e.statement for e in opening]
    # Either index holds only events filed under none (PostgreSQL's B-trees keep NULLs).
    assert len(filing[0].indexes) == 1, filing[0].plan
    assert filing[0].indexes <= {"ix_scan_event_unfiled", "ix_scan_event_shift_id"}
    assert_indexed(opening)


def _limited_scans(plan: dict[str, Any], table: str, limited: bool = False) -> list[tuple]:
    """Each node of ``plan`` reading ``table``: its index, its direction and whether a
    Limit above it stops it after its first rows."""
    found = []
    if plan.get("Relation Name") == table:
        found.append((plan.get("Index Name"), plan.get("Scan Direction"), limited))
    for child in plan.get("Plans", []):
        found += _limited_scans(child, table, limited or plan["Node Type"] == "Limit")
    return found


def test_a_pdas_sign_in_reads_one_entry_of_its_shifts_whatever_their_number(
    world: World,
) -> None:
    """The sign-in's ``device_max_seq`` counts the seqs the PDA's shifts declared: the
    highest ``last_seq`` and ``first_seq``, each the last entry of the device's range of
    its index (``ix_shift_device_last_seq``, ``ix_shift_device_first_seq``), read
    backward under a Limit, in the one statement that reads its sync state
    (``sync.device_state.held_max_seq``): one entry, not each of the shifts it worked
    (one a day, years of them)."""
    with world.engine.connect() as connection:
        username = connection.scalar(
            text("SELECT username FROM app_user WHERE id = :id"), {"id": world.courier_id}
        )
    body = {"username": username, "password": factories.PASSWORD, "device_id": world.device_id}
    _, signing_in = run(world, "POST", "/api/v1/auth/token", json=body)
    [shifts] = reads(signing_in, "shift")
    assert "device_sync_state" in shifts.statement
    scans = _limited_scans(shifts.plan[0]["Plan"], "shift")
    assert sorted(scans) == [
        ("ix_shift_device_first_seq", "Backward", True),
        ("ix_shift_device_last_seq", "Backward", True),
    ], shifts.plan
    assert_indexed(signing_in)


def test_pull_feed_uses_indexes(world: World) -> None:
    courier = world.courier
    snapshot, first = run(world, "GET", "/api/v1/sync/pull?limit=50", headers=courier)
    cursor = snapshot.get_json()["next_cursor"]
    explained = list(first)
    while snapshot.get_json()["has_more"]:
        snapshot, page = run(
            world, "GET", f"/api/v1/sync/pull?limit=50&cursor={cursor}", headers=courier
        )
        cursor = snapshot.get_json()["next_cursor"]
        explained += page
    _, replay = run(world, "GET", "/api/v1/sync/pull?cursor=0.0&limit=100", headers=courier)
    explained += replay
    assert_indexed(explained)
    used = set().union(*(e.indexes for e in explained))
    assert "ix_feed_change_reader" in used
    assert reads(explained, "parcel")


def test_handover_balance_uses_indexes(world: World) -> None:
    """The gather of ``sync.balances`` for one shift: closed, and signed off days ago;
    and its parcels missing at handover's latest scans, ranked per parcel in SQL
    (``sync.pages.latest_scans``), through the parcels' index, not along the table."""
    with world.engine.connect() as connection:
        older = connection.scalar(
            select(Shift.id)
            .where(Shift.device_id == world.device_id, Shift.status == "signed_off")
            .order_by(Shift.id)
            .limit(1)
        )
    explained = []
    for shift_id in (world.shift_id, older):
        response, plans = run(
            world, "GET", f"/api/v1/shifts/{shift_id}/balance", headers=world.manager
        )
        assert response.get_json()["checked_out"] == PARCELS_PER_SHIFT
        kinds = {d["kind"] for d in response.get_json()["discrepancies"]}
        assert "missing_at_handover" in kinds, kinds
        explained += plans
    assert_indexed(explained)
    used = set().union(*(e.indexes for e in explained))
    assert {"ix_scan_event_shift_id", "ix_flag_subject"} <= used
    ranked = [e for e in explained if "row_number()" in e.statement.lower()]
    assert len(ranked) == 2, [e.statement for e in explained]
    assert all("ix_scan_event_tracking_no" in e.indexes for e in ranked)


def test_proof_search_uses_indexes(world: World) -> None:
    """The search, a proof and the export, with each drop's consent (the parcel's events
    and consents) and a proof's flags (of its parcel, its shift and its event)."""
    day = dt.datetime.combine(world.work_date, dt.time(0, 0), tzinfo=dt.UTC)
    with world.engine.connect() as connection:
        drop_id = connection.scalar(  # one of the drops the push's test pushed
            select(ScanEvent.id).where(
                ScanEvent.device_id == world.device_id,
                ScanEvent.type == "delivered_to_locker",
            )
        )
    assert drop_id is not None, "run with test_push_dedupe_and_projection_use_indexes"
    searches = [
        f"/api/v1/proofs?station_id={world.station_id}&method=locker&limit=100",
        f"/api/v1/proofs/{drop_id}",
        f"/api/v1/proofs/export.csv?station_id={world.station_id}&method=locker",
        f"/api/v1/proofs/export.csv?courier_id={world.courier_id}"
        f"&occurred_from={day.isoformat()}&occurred_to={(day + dt.timedelta(days=1)).isoformat()}",
        "/api/v1/proofs?limit=100",
        f"/api/v1/proofs?station_id={world.station_id}&limit=100",
        f"/api/v1/proofs?station_id={world.station_id}"
        f"&occurred_from={day.isoformat()}&occurred_to={(day + dt.timedelta(days=1)).isoformat()}",
        f"/api/v1/proofs?tracking_no={world.tracking_no}",
        f"/api/v1/proofs?courier_id={world.courier_id}&limit=100",
        f"/api/v1/proofs?station_id={world.station_id}&flag_kind=far_from_address",
        f"/api/v1/proofs/{world.delivery_id}",
    ]
    explained = []
    for url in searches:
        response, plans = run(world, "GET", url.replace("+", "%2B"), headers=world.auditor)
        explained += plans
    # A walk by cursor of a station's day to its last page, which counts the day's
    # matching deliveries against those the walk showed (``sync.proofs._check_walk``).
    walk = searches[6].replace("+", "%2B") + "&limit=1"
    response, plans = run(world, "GET", walk, headers=world.auditor)
    explained += plans
    pages = 1
    while (cursor := response.get_json()["next_cursor"]) is not None:
        page = walk.replace("limit=1", "limit=500") + f"&cursor={cursor}"
        response, plans = run(world, "GET", page, headers=world.auditor)
        explained += plans
        pages += 1
    assert pages > 1, "the day's search should take more than one page of 1"
    assert_indexed(explained)
    used = set().union(*(e.indexes for e in explained))
    assert {"ix_scan_event_delivery_time", "ix_flag_subject"} <= used


def test_station_board_uses_indexes(world: World) -> None:
    """The station's board for a day: ``sync.balances.gather`` for its 8 shifts at once.

    Their parcels' rule flags are read by probes of ``ix_flag_subject`` (an index
    condition on the parcels' keys), not by a walk along the whole index: a merge join
    on it would be an Index Scan too, and read every parcel flag there is. (With the
    30 days of flags alone, 11,520 in 316 pages, one Seq Scan is PostgreSQL's right
    choice: 2 to 3 ms. The year of older flags is what makes the plan mean something.)
    """
    url = f"/api/v1/stations/{world.station_id}/handover?date={world.work_date.isoformat()}"
    response, explained = run(world, "GET", url, headers=world.manager)
    board = response.get_json()
    assert len(board["shifts"]) == DEVICES
    assert board["totals"]["checked_out"] == DEVICES * PARCELS_PER_SHIFT
    assert_indexed(explained)
    used = set().union(*(e.indexes for e in explained))
    assert {"ix_scan_event_shift_id", "ix_flag_subject", "ix_flag_shift_id"} <= used
    by_subject = [
        node.get("Index Cond", "")
        for e in reads(explained, "flag")
        for node in _plan_nodes(e.plan[0]["Plan"])
        if node.get("Index Name") == "ix_flag_subject"
    ]
    assert by_subject and all("subject_key" in cond for cond in by_subject), by_subject


def test_audit_log_list_uses_indexes(world: World) -> None:
    """``GET /audit``, newest first, unfiltered and by each filter: a page never reads the
    whole log (a year of sign-offs, resolutions, an auditor's reads and purges), also for
    a filter that matches little or nothing. (``GET /audit/verify`` reads every entry by
    design, a thousand at a time: it is not a look-up.)"""
    day = dt.datetime.combine(world.work_date, dt.time(0, 0), tzinfo=dt.UTC)
    a_year_ago = day - dt.timedelta(days=FLAG_HISTORY_DAYS)
    with world.engine.connect() as connection:  # a parcel whose proof an auditor read
        read = connection.scalar(
            select(AuditEntry.tracking_no).where(AuditEntry.action == "proof_read").limit(1)
        )
        signed = connection.scalar(  # a parcel of a shift signed off: in its entry alone
            select(AuditEntryParcel.tracking_no)
            .join(AuditEntry, AuditEntry.id == AuditEntryParcel.entry_id)
            .where(AuditEntry.action == "shift_signed_off")
            .limit(1)
        )
    assert read is not None and signed is not None

    def between(start: dt.datetime) -> str:
        return f"at_from={start.isoformat()}&at_to={(start + dt.timedelta(days=1)).isoformat()}"

    searches = [
        "/api/v1/audit?limit=100",
        "/api/v1/audit?action=shift_signed_off&limit=100",
        "/api/v1/audit?action=proof_images_purged",
        "/api/v1/audit?action=parcels_rejudged",  # none yet
        f"/api/v1/audit?actor_id={world.manager_id}&limit=100",
        f"/api/v1/audit?actor_id={world.auditor_id}&limit=100",
        f"/api/v1/audit?actor_id={world.courier_id}",  # a courier's: none
        f"/api/v1/audit?subject_type=shift&subject_key={world.shift_id - 1}",
        f"/api/v1/audit?subject_type=proof&subject_key={world.delivery_id}",
        f"/api/v1/audit?{between(day)}",
        f"/api/v1/audit?{between(a_year_ago)}",
        f"/api/v1/audit?action=flag_resolved&at_to={a_year_ago.isoformat()}",
        f"/api/v1/audit?tracking_no={read.lower()}",  # a parcel's entries, whatever their kind
        f"/api/v1/audit?tracking_no={world.tracking_no}&action=proof_read",
        f"/api/v1/audit?tracking_no={signed}",  # the sign-off of its shift, among others
        f"/api/v1/audit?tracking_no={signed}&after=99999999",  # a page after a cursor
        "/api/v1/audit?tracking_no=RR473124829GB",  # a number with none
    ]
    explained = []
    for url in searches:
        response, plans = run(world, "GET", url.replace("+", "%2B"), headers=world.auditor)
        explained += plans
    assert_indexed(explained)
    used = set().union(*(e.indexes for e in reads(explained, "audit_entry")))
    assert {
        "ix_audit_entry_subject",
        "ix_audit_entry_action",
        "ix_audit_entry_actor",
        "ix_audit_entry_at",
    } <= used, used
    # A parcel's entries, those about it and those about it among others, along its key.
    by_parcel = set().union(*(e.indexes for e in reads(explained, "audit_entry_parcel")))
    assert "pk_audit_entry_parcel" in by_parcel, by_parcel


def test_the_flag_queue_reads_its_page_through_the_stations_opened_index(world: World) -> None:
    """``GET /flags``, the manager's queue at 19:00, latest opened first: the first page,
    the open ones, and the next page after a cursor, each read along
    ``ix_flag_station_opened`` (a year of the station's flags), not sorted whole."""
    first, explained = run(world, "GET", "/api/v1/flags?limit=50", headers=world.manager)
    cursor, walk = first.get_json()["next_after"], first.get_json()["next_cursor"]
    assert cursor is not None and walk is not None
    queries = ("status=open&limit=50", f"limit=50&after={cursor}", f"limit=50&cursor={walk}")
    for query in queries:
        explained += run(world, "GET", f"/api/v1/flags?{query}", headers=world.manager)[1]
    assert_indexed(explained)
    used = set().union(*(e.indexes for e in reads(explained, "flag")))
    assert "ix_flag_station_opened" in used, used


def test_a_deep_page_of_the_flag_queue_starts_at_its_place(world: World) -> None:
    """A walk through the station's year of flags: a page by ``cursor`` or ``after`` far
    down the queue begins its read of ``ix_flag_station_opened`` at its place (an index
    condition on ``opened_at``), not at the queue's top, passing over every flag above it
    (9,000 for the 180th page: each page cost more than the one before)."""
    with world.engine.connect() as connection:
        opened_at, flag_id = connection.execute(
            text(
                "SELECT opened_at, id FROM flag WHERE station_id = :s "
                "ORDER BY opened_at DESC, id DESC OFFSET 9000 LIMIT 1"
            ),
            {"s": world.station_id},
        ).one()
        as_of = connection.scalar(
            text("SELECT max(opened_at) FROM flag WHERE station_id = :s"),
            {"s": world.station_id},
        )
        since = as_of - LATE_COMMIT_WINDOW
        raised = connection.scalar(
            text("SELECT count(*) FROM flag WHERE station_id = :s AND raised_at > :since"),
            {"s": world.station_id, "since": since},
        )
    place = str(FlagCursor(opened_at, flag_id, as_of, since, raised))
    explained: list[Explained] = []
    for query in (f"limit=50&cursor={place}", f"limit=50&after={flag_id}"):
        explained += run(world, "GET", f"/api/v1/flags?{query}", headers=world.manager)[1]
    pages = [e for e in reads(explained, "flag") if "ORDER BY flag.opened_at" in e.statement]
    assert len(pages) == 2, [e.statement for e in explained]
    for page in pages:
        conditions = [
            node.get("Index Cond", "")
            for node in _plan_nodes(page.plan[0]["Plan"])
            if node.get("Index Name") == "ix_flag_station_opened"
        ]
        # The page's own read starts at its place; a page read by ``after`` begins a
        # walk and also probes where it begins (the latest ``opened_at``: IS NOT NULL,
        # read backwards, one entry) and counts the flags raised in the minutes before
        # (``opened_at >``): ranges at the index's top, not its whole length.
        assert any("opened_at <=" in c for c in conditions), conditions
        bounded = ("opened_at <=", "opened_at >", "opened_at IS NOT NULL")
        assert all(any(b in c for b in bounded) for c in conditions), conditions


def test_the_flags_across_stations_are_read_through_the_opened_index(world: World) -> None:
    """``GET /flags`` of an auditor (every station): its first page, a page by cursor and
    one by ``after`` each read along ``ix_flag_opened``; without it PostgreSQL read every
    flag ever kept for each page and sorted them (a Parallel Seq Scan, 55 to 70 ms here)."""
    first, explained = run(world, "GET", "/api/v1/flags?limit=50", headers=world.auditor)
    page = first.get_json()
    assert len(page["items"]) == 50 and page["next_cursor"] is not None
    for query in (f"cursor={page['next_cursor']}", f"after={page['next_after']}"):
        explained += run(world, "GET", f"/api/v1/flags?limit=50&{query}", headers=world.auditor)[1]
    assert_indexed(explained)
    used = set().union(*(e.indexes for e in reads(explained, "flag")))
    assert "ix_flag_opened" in used, used


def test_a_parcels_flags_are_read_through_its_index(world: World) -> None:
    """``GET /flags?tracking_no=``: a parcel's own flags and its handovers' (subject
    ``<shift>:<tracking no>``), and those of its shifts and PDAs citing its events, for
    an auditor and for its station's manager, and a number with none: through
    ``ix_flag_tracking_no`` and ``ix_flag_subject``, not along the station's queue (a
    year of its flags) nor the whole table. A parcel whose shift's and PDA's flags cite
    its delivery is asked for too, so that the page's read is planned with the ids of
    those flags beside its number (``tracking_no = X OR id IN (...)``): without one,
    the read with the OR was never explained."""
    with world.engine.connect() as connection:
        missing = connection.scalar(
            select(Flag.tracking_no).where(
                Flag.kind == "missing_at_handover", Flag.station_id == world.station_id
            )
        )
    assert missing is not None
    cited = _flags_citing_the_delivery(world)
    explained = []
    try:
        for number, headers in (
            (missing, world.auditor),
            (missing, world.manager),
            (world.tracking_no, world.manager),
            (world.tracking_no, world.auditor),
            ("RR000000000GB", world.auditor),
        ):
            response, plans = run(
                world, "GET", f"/api/v1/flags?tracking_no={number}", headers=headers
            )
            explained += plans
            listed = {item["id"] for item in response.get_json()["items"]}
            if number == missing:
                assert listed, number
            if number == world.tracking_no:
                assert set(cited) <= listed, (cited, listed)
    finally:
        with world.engine.begin() as connection:
            connection.execute(delete(Flag).where(Flag.id.in_(cited)))
    assert_indexed(explained)
    used = set().union(*(e.indexes for e in reads(explained, "flag")))
    # Its own by its number; its shifts', PDAs' and held events' citing its events by
    # their subjects, found from its events and rejected events by its number. Those
    # citing it, beside its own, probed by their ids (the key, or the station's
    # (station, id) index for its manager), never along the station's queue.
    # Their histories by their ids: the walk counting their openings.
    by_id = {"pk_flag", "ix_flag_station_id"}
    history = {"ix_flag_change_flag_id"}
    assert used - by_id - history == {"ix_flag_tracking_no", "ix_flag_subject"}, used
    pages = [e for e in reads(explained, "flag") if "flag.id IN" in e.statement]
    assert len(pages) == 2, [e.statement for e in reads(explained, "flag")]
    for page in pages:
        assert "ix_flag_tracking_no" in page.indexes, page.plan
        assert len(page.indexes & by_id) == 1 and page.indexes <= by_id | history | {
            "ix_flag_tracking_no"
        }, page.plan
    events = set().union(*(e.indexes for e in reads(explained, "scan_event")))
    assert events == {"ix_scan_event_tracking_no"}, events


def _flags_citing_the_delivery(world: World) -> list[int]:
    """A shift's ``late_event_after_signoff`` and its PDA's ``clock_jump`` citing the
    world's delivery (by its id; by the PDA's id for it), as a late return on a PDA whose
    clock jumped raises them: their ids (the caller deletes them, one of a kind and
    subject at a station)."""
    with Session(world.engine) as session:
        client_event_id = session.scalar(
            select(ScanEvent.client_event_id).where(ScanEvent.id == world.delivery_id)
        )
        raised = dt.datetime.now(dt.UTC)
        flags = [
            Flag(
                station_id=world.station_id,
                kind="late_event_after_signoff",
                severity=FlagSeverity.WARNING,
                subject_type="shift",
                subject_key=str(world.shift_id),
                evidence={"event_ids": [world.delivery_id]},
                status=FlagStatus.OPEN,
                shift_id=world.shift_id,
                raised_at=raised,
            ),
            Flag(
                station_id=world.station_id,
                kind="clock_jump",
                severity=FlagSeverity.WARNING,
                subject_type="device",
                subject_key=world.device_id,
                evidence={"client_event_ids": [str(client_event_id)]},
                status=FlagStatus.OPEN,
                raised_at=raised,
            ),
        ]
        session.add_all(flags)
        session.commit()
        return [flag.id for flag in flags]


def test_the_quarantine_by_parcel_uses_indexes(world: World) -> None:
    """``GET /quarantine?tracking_no=``: a parcel's rejected events (asked for as stored
    or as a PDA typed it), and a parcel with none (the usual answer), read through the
    index of the parcel each names, not the station's every rejected event; and so are
    those a proof's detail counts (``rejected_events``)."""
    with world.engine.connect() as connection:
        rejected = connection.execute(
            select(QuarantinedEvent.tracking_no, QuarantinedEvent.parcel_tracking_no).where(
                QuarantinedEvent.station_id == world.station_id,
                QuarantinedEvent.tracking_no != QuarantinedEvent.parcel_tracking_no,
            )
        ).first()
    assert rejected is not None
    explained = []
    for number in (*rejected, world.tracking_no, "RR000000000GB"):
        response, plans = run(
            world,
            "GET",
            "/api/v1/quarantine",
            query_string={"tracking_no": number},
            headers=world.manager,
        )
        if number in rejected:
            assert response.get_json()["items"], number
        explained += plans
    response, plans = run(
        world, "GET", f"/api/v1/proofs/{world.delivery_id}", headers=world.manager
    )
    assert response.status_code == 200, response.get_json()
    explained += plans
    # A walk by cursor through the station's rejected events to its last page, which
    # sums a mix of their ids up to its as_of against those it showed (``sync.quarantine.
    # _check_walk``) through an index, as it counts those arrived since, and each page
    # reads its pushes by their key (``sync.quarantine.pushes_by_id``).
    walk, walked, pages = None, [], 0
    while walk is None or walk.get_json()["next_cursor"] is not None:
        query = {"limit": 1} if walk is None else {"limit": 100}
        if walk is not None:
            query["cursor"] = walk.get_json()["next_cursor"]
        walk, plans = run(
            world, "GET", "/api/v1/quarantine", query_string=query, headers=world.manager
        )
        walked += plans
        pages += 1
    assert pages > 1
    checked = [e for e in walked if "sum(" in e.statement]
    assert checked and all(e.indexes for e in checked), checked
    assert_indexed(walked)
    assert_indexed(explained)
    used = set().union(*(e.indexes for e in reads(explained, "quarantined_event")))
    assert "ix_quarantined_event_parcel" in used, used
    counted = [e for e in reads(explained, "quarantined_event") if "count(" in e.statement]
    assert counted and all("ix_quarantined_event_parcel" in e.indexes for e in counted)


def test_a_walk_through_a_stations_rejected_events_reads_their_pushes_by_key(
    world: World,
) -> None:
    """``GET /quarantine?station_id=`` (an auditor's, and a manager's own station): each
    page joined its rejected events to the pushes they came in, and PostgreSQL hashed
    every push ever stored (a Seq Scan of ``sync_batch``, 4,320 rows here) to match a
    page of 100. The pushes are read by their key now, on every page of the walk."""
    for headers, query in (
        (world.auditor, {"station_id": world.station_id}),
        (world.manager, {}),
    ):
        walk, explained, pages = None, [], 0
        while walk is None or walk.get_json()["next_cursor"] is not None:
            asked = {**query, "limit": 100}
            if walk is not None:
                asked["cursor"] = walk.get_json()["next_cursor"]
            walk, plans = run(
                world, "GET", "/api/v1/quarantine", query_string=asked, headers=headers
            )
            assert walk.get_json()["items"], asked
            explained += plans
            pages += 1
        assert pages > 1, query
        assert_indexed(explained)
        pushes = reads(explained, "sync_batch")
        assert len(pushes) == pages and all("pk_sync_batch" in e.indexes for e in pushes)
        rejected = reads(explained, "quarantined_event")
        assert all(e.indexes & STATION_OR_KEY for e in rejected), [e.plan for e in rejected]


# What a station's walk through its rejected events reads them by: the station's index,
# or the key below a page's last id.
STATION_OR_KEY = {"ix_quarantined_event_station_newest", "pk_quarantined_event"}


def test_a_recipients_consents_by_phone_use_indexes(world: World) -> None:
    """``GET /consents?recipient_phone=``: the standing consents naming the phone and
    those of the parcels addressed to it, through the phone's indexes (consents' and
    parcels'), not every consent; for an auditor, across stations and at one station
    (a manager may not search by phone: they see phones masked)."""
    with world.engine.connect() as connection:
        phone = connection.scalar(
            select(Parcel.recipient_phone).where(Parcel.tracking_no == world.tracking_no)
        )
    assert phone is not None
    explained = []
    for station in ({}, {"station_id": world.station_id}):
        _, plans = run(
            world,
            "GET",
            "/api/v1/consents",
            query_string={"recipient_phone": phone, **station},
            headers=world.auditor,
        )
        explained += plans
    assert_indexed(explained)
    used = set().union(*(e.indexes for e in reads(explained, "consent")))
    assert {"ix_parcel_recipient_phone", "ix_consent_recipient"} <= used, used


def test_entries_filed_under_their_parcels_find_them_through_indexes(world: World) -> None:
    """A close a manager makes for the courier is filed under the parcels of the shift's
    events (``sync.shifts.shift_parcels``: along ``ix_scan_event_shift_id``, not through
    the PDA's year of events), a decision on a shift's flag under the parcels of the
    events and rejected events it cites (``sync.audit.parcels_of_events``: by their
    keys), one on a PDA's flag by the PDA's keys for them, and an auditor's read of a
    PDA's write-offs is logged (``lost_seqs_read``)."""
    with Session(world.engine) as session:
        still_open = session.scalar(
            select(Shift.id).where(Shift.device_id == world.device_id, Shift.status == "open")
        )
        rejected = session.scalar(select(QuarantinedEvent.id).limit(1))
        flag = Flag(
            station_id=world.station_id,
            kind="late_event_after_signoff",
            severity=FlagSeverity.WARNING,
            subject_type="shift",
            subject_key=str(world.shift_id),
            evidence={
                "event_ids": [world.delivery_id],
                "rejected_event_ids": [] if rejected is None else [rejected],
            },
            status=FlagStatus.OPEN,
            shift_id=world.shift_id,
            raised_at=dt.datetime.now(dt.UTC),
        )
        client_event_id, seq = session.execute(
            select(ScanEvent.client_event_id, ScanEvent.seq).where(
                ScanEvent.id == world.delivery_id
            )
        ).one()
        pdas = Flag(  # a clock_jump's ids and a wrong_shift's seqs in one evidence
            station_id=world.station_id,
            kind="clock_jump",
            severity=FlagSeverity.WARNING,
            subject_type="device",
            subject_key=world.device_id,
            evidence={"client_event_ids": [str(client_event_id)], "seqs": [seq]},
            status=FlagStatus.OPEN,
            raised_at=dt.datetime.now(dt.UTC),
        )
        session.add_all([flag, pdas])
        session.commit()
        flag_id, pdas_id = flag.id, pdas.id
    if still_open is None:  # the tests before it closed theirs
        opened = world.client.post("/api/v1/shifts", json={}, headers=world.courier)
        assert opened.status_code == 201, opened.get_json()
        still_open = opened.get_json()["id"]
    close = f"/api/v1/shifts/{still_open}/close"
    _, closing = run(world, "POST", close, json={}, headers=world.manager)
    resolve = f"/api/v1/flags/{flag_id}/resolve"
    _, deciding = run(world, "POST", resolve, json={"note": "came back"}, headers=world.manager)
    resolve_pdas = f"/api/v1/flags/{pdas_id}/resolve"
    _, on_pdas = run(world, "POST", resolve_pdas, json={"note": "reset"}, headers=world.manager)
    by_pda = {i for e in reads(on_pdas, "scan_event") for i in e.indexes}
    assert {"uq_scan_event_device_event", "uq_scan_event_device_id_seq"} <= by_pda, by_pda
    deciding += on_pdas
    lost_seqs = f"/api/v1/devices/{world.device_id}/lost-seqs"
    _, listing = run(world, "GET", lost_seqs, headers=world.auditor)
    assert_indexed(closing + deciding + listing)
    by_shift = [e for e in reads(closing, "scan_event") if "DISTINCT" in e.statement.upper()]
    assert by_shift and all("ix_scan_event_shift_id" in e.indexes for e in by_shift), by_shift
    assert reads(deciding, "scan_event"), [e.statement for e in deciding]
    with world.engine.connect() as connection:
        filed = connection.execute(
            select(AuditEntry.subject_key, AuditEntryParcel.tracking_no)
            .join(AuditEntry, AuditEntry.id == AuditEntryParcel.entry_id)
            .where(
                AuditEntry.action == "flag_resolved",
                AuditEntryParcel.tracking_no == world.tracking_no,
            )
        ).all()
    assert {key for key, _ in filed} >= {str(flag_id), str(pdas_id)}, filed


def test_a_write_off_judges_the_pair_across_it_through_the_pdas_seq_index(world: World) -> None:
    """A write-off judges the pair across the seqs it writes off (rule 6): the PDA's
    stored events nearest each end, searched through its (device, seq) index whatever
    its history (thirty days of shifts here), not by reading the PDA's events."""
    with Session(world.engine) as session:
        last_seq = session.scalar(
            select(DeviceSyncState.max_seq).where(DeviceSyncState.device_id == world.device_id)
        )
    late = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    body = factories.push_body(
        world.device_id,
        [factories.event(last_seq + 2, world.tracking_no, "out_for_delivery", occurred_at=late)],
    )
    pushed = world.client.post("/api/v1/sync/push", json=body, headers=world.courier)
    assert pushed.status_code == 200, pushed.get_json()
    assert pushed.get_json()["missing_seqs"] == [last_seq + 1]

    written, explained = run(
        world,
        "POST",
        f"/api/v1/devices/{world.device_id}/lost-seqs",
        json={"seqs": [last_seq + 1], "reason": "lost in a reset"},
        headers=world.manager,
    )
    assert written.get_json()["missing_seqs"] == []
    assert_indexed(explained)
    nearest = [e for e in explained if "ORDER BY scan_event.seq" in " ".join(e.statement.split())]
    assert len(nearest) == 2, [e.statement for e in explained]  # one search each side
    for search in nearest:
        assert "uq_scan_event_device_id_seq" in search.indexes, search.plan


def test_the_lapse_job_reads_the_unannounced_lapses_through_their_partial_index(
    world: World,
) -> None:
    """``consent_requests_lapsed`` runs every minute: it reads the pending requests whose
    lapse is still to announce through ``ix_consent_request_unannounced_lapse`` (a few
    rows), not the station's history of requests answered or announced long ago."""
    from sync import consent_requests

    now = dt.datetime.now(dt.UTC)
    with Capture(world.engine) as capture, Session(world.engine) as session:
        run = consent_requests.announce_lapsed(session=session, now=now)
    assert run["announced"] == 0  # the history's lapses were all announced
    explained = explain(world.engine, capture.statements)
    assert_indexed(explained)
    [job] = [e for e in reads(explained, "consent_request") if "FOR UPDATE" in e.statement]
    assert "ix_consent_request_unannounced_lapse" in job.indexes, job.indexes


def test_an_auditors_image_read_is_filed_under_its_parcels_through_the_digest_index(
    world: World,
) -> None:
    """An auditor's read of a proof image (``blob_read``) is filed under the parcels
    whose proofs name it, and those of the rejected events whose POD names it
    (``sync.blobs.parcels_naming``): in one statement, a look-up of ``proof_image`` and
    one of ``rejected_image`` each by its digest's index, not the year of proofs or of
    refused drops."""
    buffer = io.BytesIO()
    Image.new("RGB", (5, 4), (10, 120, 200)).save(buffer, format="PNG")
    data = buffer.getvalue()
    name = hashlib.sha256(data).hexdigest()
    stored = world.client.put(
        f"/api/v1/blobs/{name}",
        data=data,
        content_type="application/octet-stream",
        headers=world.courier,
    )
    assert stored.status_code == 201, stored.get_json()
    with Session(world.engine) as session:
        session.add(
            ProofImage(event_id=world.delivery_id, sha256=name, tracking_no=world.tracking_no)
        )
        session.commit()
    _, explained = run(world, "GET", f"/api/v1/blobs/{name}", headers=world.auditor)
    assert_indexed(explained)
    [lookup] = reads(explained, "proof_image")
    assert "ix_proof_image_sha256" in lookup.indexes, lookup.plan
    [rejected] = reads(explained, "rejected_image")
    assert "ix_rejected_image_sha256" in rejected.indexes, rejected.plan
    with world.engine.connect() as connection:
        filed = connection.scalars(
            select(AuditEntryParcel.tracking_no)
            .join(AuditEntry, AuditEntry.id == AuditEntryParcel.entry_id)
            .where(AuditEntry.action == "blob_read", AuditEntry.subject_key == name)
        ).all()
    assert filed == [world.tracking_no]


def test_an_open_shifts_balance_reads_where_its_courier_went_through_an_index(
    world: World,
) -> None:
    """The balance of a shift still open names where its courier went on
    (``sync.pages.where_courier_went``, as the shift's page and its board row do: their
    other shifts still open on another PDA, and the latest they opened on each PDA,
    ``sync.balances.where_couriers_went``): one statement,
    through the courier's shifts still open and those handed over since
    (``ix_shift_courier_status_opened``), not along the station's every shift of every
    day, nor every shift the courier worked."""
    with world.engine.connect() as connection:
        still_open = connection.scalar(
            select(Shift.id).where(Shift.device_id == world.device_id, Shift.status == "open")
        )
    if still_open is None:  # run alone: the push's or the opening's test left none open
        opened = world.client.post("/api/v1/shifts", json={}, headers=world.courier)
        assert opened.status_code == 201, opened.get_json()
        still_open = opened.get_json()["id"]
    response, explained = run(
        world, "GET", f"/api/v1/shifts/{still_open}/balance", headers=world.manager
    )
    assert response.get_json()["shift_status"] == "open"
    assert response.get_json()["courier_also_open_shift_ids"] == []
    went = [
        e
        for e in explained
        if "shift" in e.tables and "row_number()" in " ".join(e.statement.split()).lower()
    ]
    assert len(went) == 1, [e.statement for e in explained]
    assert_indexed(went)
    # The courier's shifts, by their key: both the open ones and the latest on each PDA.
    # Those handed over since by the courier's key and time; those still open by it too,
    # or among the PDAs' open shifts (one a PDA at most), as the statistics decide.
    assert "ix_shift_courier_status_opened" in went[0].indexes, went[0].plan
    assert went[0].indexes <= {"ix_shift_courier_status_opened", "uq_shift_open_per_device"}
    assert_indexed(explained)


def test_a_couriers_shifts_are_read_through_their_key_without_ix_shift_courier_id(
    world: World,
) -> None:
    """``ix_shift_courier_status_opened`` replaced ``ix_shift_courier_id``: a courier's own
    shifts (``GET /shifts`` as the courier), and a manager's or auditor's list of one
    courier's (``?courier_id=``, with a state too), are still read by the courier's key,
    its leading column, not along every shift of the table by id."""
    reads = [
        ("/api/v1/shifts?limit=100", world.courier),
        (f"/api/v1/shifts?courier_id={world.courier_id}&limit=100", world.manager),
        (f"/api/v1/shifts?courier_id={world.courier_id}&status=signed_off", world.auditor),
    ]
    for url, headers in reads:
        response, explained = run(world, "GET", url, headers=headers)
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["items"], url
        listed = [e for e in explained if "shift" in e.tables]
        assert listed, [e.statement for e in explained]
        assert_indexed(listed)
        assert any("ix_shift_courier_status_opened" in e.indexes for e in listed), [
            e.plan for e in listed
        ]
