"""The migrated schema is exactly what the models declare, on every backend."""

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, event, insert, inspect, text
from sqlalchemy.exc import IntegrityError, OperationalError

from models import Base, migrate
from models.engine import make_engine
from tests.live_server import postgresql_database, postgresql_test_url


def test_migrated_schema_matches_the_models(engine: Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    assert differences == []


def test_database_is_at_the_single_head(engine: Engine) -> None:
    with engine.connect() as connection:
        current = migrate.current_revisions(connection)
    assert len(migrate.head_revisions()) == 1
    assert current == set(migrate.head_revisions())


def test_each_migration_is_named_in_one_line() -> None:
    """``db upgrade`` logs each migration by its docstring's first paragraph; one written
    over two lines showed on ``make run`` as ``... decisions on a shift's or a\\nPDA's
    flags``, the log escaping its newline."""
    scripts = ScriptDirectory.from_config(migrate.alembic_config())
    names = {script.revision: script.doc for script in scripts.walk_revisions()}
    assert len(names) > 40  # every migration
    assert {revision: doc for revision, doc in names.items() if "\n" in doc} == {}


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Engine]:
    """An empty database of its own: a SQLite file, or in the PostgreSQL pass a
    PostgreSQL database (``tests.live_server.postgresql_database``)."""
    base = postgresql_test_url()
    if base is None:
        engine = make_engine(f"sqlite:///{tmp_path / 'scratch.db'}")
        yield engine
        engine.dispose()
        return
    with postgresql_database(base, "migrations") as url:
        engine = make_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()


def test_downgrade_to_base_and_back(scratch: Engine) -> None:
    """Every migration can be undone and redone (on a scratch database)."""
    migrate.upgrade(scratch)
    assert {"station", "app_user", "device", "parcel"} <= set(inspect(scratch).get_table_names())
    migrate.downgrade(scratch, "base")
    assert set(inspect(scratch).get_table_names()) == {"alembic_version"}
    migrate.upgrade(scratch)
    assert "parcel" in inspect(scratch).get_table_names()
    with scratch.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


HOT_INDEXES = "32c6e05e447b"  # indexes for hot queries, built CONCURRENTLY on PostgreSQL


@pytest.mark.postgres_only
def test_hot_query_indexes_are_built_and_dropped_concurrently(scratch: Engine) -> None:
    """A plain CREATE INDEX would hold pushes back (a SHARE lock on scan_event) while it
    builds. A concurrent build that failed half-way (here: a unique index over
    duplicates) leaves an INVALID index of the same name: the upgrade rebuilds it."""
    migrate.upgrade(scratch, f"{HOT_INDEXES}-1")
    with scratch.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO flag (kind, severity, subject_type, subject_key, evidence, status, "
                "raised_at, updated_at) VALUES (:kind, 'info', 'parcel', :key, '{}', 'open', "
                "now(), now())"
            ),
            [{"kind": "a", "key": "RR1"}, {"kind": "b", "key": "RR1"}],
        )
    with scratch.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        with pytest.raises(IntegrityError):
            connection.execute(
                text("CREATE UNIQUE INDEX CONCURRENTLY ix_flag_subject ON flag (subject_key)")
            )
    assert _index_valid(scratch, "ix_flag_subject") is False

    with statements(scratch) as upgrading:
        migrate.upgrade(scratch, HOT_INDEXES)
    created = [s for s in upgrading if s.startswith("CREATE INDEX")]
    assert [s.startswith("CREATE INDEX CONCURRENTLY") for s in created] == [True] * 2, created
    assert _index_valid(scratch, "ix_flag_subject") is True
    assert _index_valid(scratch, "ix_scan_event_delivery_time") is True

    with statements(scratch) as downgrading:
        migrate.downgrade(scratch, f"{HOT_INDEXES}-1")
    dropped = [s for s in downgrading if s.startswith("DROP INDEX")]
    assert [s.startswith("DROP INDEX CONCURRENTLY") for s in dropped] == [True] * 2, dropped
    assert _index_valid(scratch, "ix_flag_subject") is None


UNFILED_INDEX = "5b1e7c2d9a40"  # events filed under no shift, built CONCURRENTLY too


@pytest.mark.postgres_only
def test_the_unfiled_events_index_is_built_and_dropped_concurrently(scratch: Engine) -> None:
    """As the hot queries' indexes: built without holding pushes back, and an INVALID
    one left by a failed build built again."""
    migrate.upgrade(scratch, f"{UNFILED_INDEX}-1")
    with scratch.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(  # what a build that failed half-way leaves
            text("CREATE INDEX ix_scan_event_unfiled ON scan_event (seq)")
        )
        connection.execute(
            text(
                "UPDATE pg_index SET indisvalid = false "
                "WHERE indexrelid = to_regclass('ix_scan_event_unfiled')"
            )
        )
    assert _index_valid(scratch, "ix_scan_event_unfiled") is False

    with statements(scratch) as upgrading:
        migrate.upgrade(scratch, UNFILED_INDEX)
    created = [s for s in upgrading if s.startswith("CREATE INDEX")]
    assert [s.startswith("CREATE INDEX CONCURRENTLY") for s in created] == [True], created
    assert _index_valid(scratch, "ix_scan_event_unfiled") is True

    with statements(scratch) as downgrading:
        migrate.downgrade(scratch, f"{UNFILED_INDEX}-1")
    dropped = [s for s in downgrading if s.startswith("DROP INDEX")]
    assert [s.startswith("DROP INDEX CONCURRENTLY") for s in dropped] == [True], dropped
    assert _index_valid(scratch, "ix_scan_event_unfiled") is None


FLAGS_OPENED_INDEX = "d2f6a8c4e7b1"  # flags across stations by when they opened


@pytest.mark.postgres_only
def test_the_flags_opened_index_is_built_and_dropped_concurrently(scratch: Engine) -> None:
    """As the hot queries' indexes: built without holding pushes back (a plain build holds
    a SHARE lock on flag, which every push raising a flag waits for), and an INVALID one
    left by a failed build built again."""
    migrate.upgrade(scratch, f"{FLAGS_OPENED_INDEX}-1")
    with scratch.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("CREATE INDEX ix_flag_opened ON flag (id)"))
        connection.execute(
            text(
                "UPDATE pg_index SET indisvalid = false "
                "WHERE indexrelid = to_regclass('ix_flag_opened')"
            )
        )
    assert _index_valid(scratch, "ix_flag_opened") is False

    with statements(scratch) as upgrading:
        migrate.upgrade(scratch, FLAGS_OPENED_INDEX)
    created = [s for s in upgrading if s.startswith("CREATE INDEX")]
    assert [s.startswith("CREATE INDEX CONCURRENTLY") for s in created] == [True], created
    assert _index_valid(scratch, "ix_flag_opened") is True

    with statements(scratch) as downgrading:
        migrate.downgrade(scratch, f"{FLAGS_OPENED_INDEX}-1")
    dropped = [s for s in downgrading if s.startswith("DROP INDEX")]
    assert [s.startswith("DROP INDEX CONCURRENTLY") for s in dropped] == [True], dropped
    assert _index_valid(scratch, "ix_flag_opened") is None


def _index_valid(engine: Engine, name: str) -> bool | None:
    """Whether PostgreSQL's index ``name`` is valid (None: there is none)."""
    with engine.connect() as connection:
        valid: bool | None = connection.scalar(
            text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"),
            {"name": name},
        )
    return valid


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    """Every SQL statement sent through ``engine`` meanwhile, white space folded."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_an_upgrade_that_copies_a_table_keeps_rows_that_refer_to_it(tmp_path) -> None:
    """SQLite alters scan_event by copying it while consents and proof images refer to
    its rows: the migration must neither fail nor lose or break a reference."""
    scratch = make_engine(f"sqlite:///{tmp_path / 'data.db'}")
    migrate.upgrade(scratch, "3edf26907bd1")  # before the event types widened
    statements = [
        "INSERT INTO station (id, code, name, timezone, created_at) "
        "VALUES (1, 'OLD', 'Old', 'UTC', '2026-11-01 00:00:00')",
        "INSERT INTO app_user (id, username, full_name, role, station_id, password_hash, "
        "active, created_at, credentials_version) "
        "VALUES (1, 'c1', '', 'courier', 1, 'x', 1, '2026-11-01 00:00:00', 0)",
        "INSERT INTO device (id, station_id, status, registered_at) "
        "VALUES ('PDA-1', 1, 'active', '2026-11-01 00:00:00')",
        "INSERT INTO sync_batch (id, device_id, batch_id, station_id, courier_id, sent_at, "
        "received_at, clock_offset_ms, event_count, request_hash, receipt) VALUES (1, 'PDA-1', "
        "'00000000000000000000000000000001', 1, 1, '2026-11-01 00:00:00', "
        "'2026-11-01 00:00:00', 0, 1, 'h', '{}')",
        "INSERT INTO scan_event (id, station_id, device_id, courier_id, batch_pk, "
        "client_event_id, seq, type, tracking_no, occurred_at_device, occurred_at, "
        "received_at, details, content_hash) VALUES (7, 1, 'PDA-1', 1, 1, "
        "'00000000000000000000000000000007', 1, 'consent_captured', 'RR473124829GB', "
        "'2026-11-01 00:00:00', '2026-11-01 00:00:00', '2026-11-01 00:00:00', '{}', 'h')",
        "INSERT INTO consent (scope, tracking_no, method, channel, granted_at, event_id, "
        "created_at) VALUES ('parcel', 'RR473124829GB', 'any', 'sms', "
        "'2026-11-01 00:00:00', 7, '2026-11-01 00:00:00')",
        "INSERT INTO proof_image (event_id, sha256, tracking_no) "
        "VALUES (7, 'aa', 'RR473124829GB')",
    ]
    with scratch.begin() as connection:
        for statement in statements:
            connection.execute(text(statement))
    migrate.upgrade(scratch)
    with scratch.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM scan_event")) == 1
        assert connection.scalar(text("SELECT event_id FROM consent")) == 7
        assert connection.scalar(text("SELECT event_id FROM proof_image")) == 7
        assert connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall() == []
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    migrate.downgrade(scratch, "3edf26907bd1")
    migrate.upgrade(scratch)
    scratch.dispose()


BEFORE_DECISIONS = "9b3e5a1c7d20"  # flags kept no decision of their own


def test_flag_decisions_are_filled_in_from_the_history_that_says_what_was_seen(
    scratch: Engine,
) -> None:
    """A flag still as a manager left it, or closed straight from it, or a shift's own
    flag opened on new events with the events it was resolved on in its evidence, gets
    the manager's decision and what it covered; one opened on new events since, or
    never decided on, gets none; ``resolved_on_event_ids`` leaves the evidence."""
    import datetime as dt

    import sqlalchemy as sa

    from models.base import Document

    migrate.upgrade(scratch, BEFORE_DECISIONS)
    when = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    flag = sa.table(
        "flag",
        *(sa.column(name) for name in ("id", "kind", "severity", "subject_type")),
        *(sa.column(name) for name in ("subject_key", "status", "raised_at", "updated_at")),
        sa.column("evidence", Document),
    )
    change = sa.table(
        "flag_change",
        *(sa.column(name) for name in ("flag_id", "at", "by_user_id")),
        *(sa.column(name) for name in ("from_status", "to_status")),
    )
    missing = {"event_ids": [4, 5], "tracking_no": "X", "resolved_on_event_ids": [4]}
    flags = {  # id: kind, status now, evidence, its changes (by a person: True)
        1: ("delivered_without_pod", "resolved", {"event_ids": [1, 2]}, "o R"),
        2: ("delivered_without_pod", "acknowledged", {"event_ids": [3]}, "o A"),
        3: ("unauthorized_locker_drop", "closed", {"event_ids": [3]}, "o R c"),
        4: ("missing_at_handover", "open", missing, "o R o"),
        5: ("consent_after_drop", "open", {"event_ids": [6, 7]}, "o R o"),
        6: ("pod_blob_missing", "open", {"event_ids": [8], "blobs": ["b"]}, "o"),
        7: ("delivered_not_checked_out", "closed", {"event_ids": [9]}, "o A o c"),
    }
    statuses = {"o": "open", "a": "acknowledged", "r": "resolved", "c": "closed"}
    with scratch.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO app_user (id, username, full_name, role, password_hash, active, "
                "created_at, credentials_version) VALUES (1, 'm', '', 'admin', 'x', true, "
                ":when, 0)"
            ),
            {"when": when},
        )
        for flag_id, (kind, status, evidence, history) in flags.items():
            connection.execute(
                sa.insert(flag).values(
                    id=flag_id,
                    kind=kind,
                    severity="warning",
                    subject_type="parcel",
                    subject_key=f"P{flag_id}",
                    status=status,
                    raised_at=when,
                    updated_at=when,
                    evidence=evidence,
                )
            )
            previous = None
            for step in history.split():
                to = statuses[step.lower()]
                by = 1 if step.isupper() else None
                connection.execute(
                    sa.insert(change).values(
                        flag_id=flag_id, at=when, by_user_id=by, from_status=previous, to_status=to
                    )
                )
                previous = to
    migrate.upgrade(scratch)
    with scratch.connect() as connection:
        found = {
            row.id: (row.decision, row.decided_on, row.evidence)
            for row in connection.execute(
                sa.select(
                    sa.column("id"),
                    sa.column("decision"),
                    sa.column("decided_on", Document),
                    sa.column("evidence", Document),
                ).select_from(sa.table("flag"))
            )
        }
    assert {flag_id: found[flag_id][:2] for flag_id in found} == {
        1: ("resolved", {"event_ids": [1, 2]}),
        2: ("acknowledged", {"event_ids": [3]}),
        3: ("resolved", {"event_ids": [3]}),
        4: ("resolved", {"event_ids": [4]}),
        5: (None, None),
        6: (None, None),
        7: (None, None),
    }
    assert found[4][2] == {"event_ids": [4, 5], "tracking_no": "X"}


DROP_BOUNDS = "5d1e7b3f9a02"  # drops keep the times their PDA's other events bound them by


def test_drop_bounds_are_filled_in_as_pushes_keep_them(scratch: Engine) -> None:
    """Dropping the two columns and adding them back fills them from each device's
    events in seq order, as the pushes that stored the events did: a drop stamped after
    the next scan and one stamped before the scan ahead of it, on two PDAs, and on a
    third, scans 12 hours before the drops (they bound them) and a minute more (not).
    The index by time is built CONCURRENTLY on PostgreSQL."""
    import datetime as dt
    import uuid

    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from models import ScanEvent
    from sync.events import EventRules
    from sync.ingest import IngestRules, PushBatch, Pusher, ingest
    from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy
    from tests import factories

    migrate.upgrade(scratch)
    now = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)
    rules = IngestRules(
        events=EventRules(tracking=TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS))
    )

    def at(minutes: int) -> dt.datetime:  # .999999: SQLite would round it up
        return now - dt.timedelta(hours=20, microseconds=-999_999) + dt.timedelta(minutes=minutes)

    def drop(seq: int, tracking_no: str, minutes: int) -> dict[str, Any]:
        return factories.locker_drop(seq, tracking_no, at(minutes))

    with Session(scratch) as session:
        station = factories.station(session)
        numbers = [factories.parcel(session, station).tracking_no for _ in range(3)]
        streams = {
            "one": [  # the drop (seq 2) stamped at 80, after the next scan (seq 3) at 65
                factories.event(1, numbers[0], occurred_at=at(10)),
                drop(2, numbers[2], 80),
                factories.event(3, numbers[1], occurred_at=at(65)),
            ],
            "two": [  # the drop (seq 3) stamped at 50, before the scan ahead (seq 2) at 70
                factories.event(1, numbers[0], occurred_at=at(10)),
                factories.event(2, numbers[1], occurred_at=at(70)),
                drop(3, numbers[2], 50),
                factories.event(4, numbers[1], "out_for_delivery", occurred_at=at(90)),
            ],
            "three": [  # scans 12 hours (reached) and a minute more (not) before the drops
                drop(1, numbers[2], 800),
                factories.event(2, numbers[0], occurred_at=at(800 - 12 * 60)),
                drop(3, numbers[1], 900),
                factories.event(4, numbers[0], occurred_at=at(900 - 12 * 60 - 1)),
            ],
        }
        for name, stream in streams.items():
            courier = factories.user(session, name, "courier", station)
            device = factories.device(session, f"PDA-{name}", station)
            ingest(
                session=session,
                batch=PushBatch(device.id, uuid.uuid4(), now, stream),
                pusher=Pusher(device.id, station.id, courier.id),
                rules=rules,
                received_at=now,
            )
        session.commit()
    bounds = sa.select(
        ScanEvent.device_id,
        ScanEvent.seq,
        ScanEvent.latest_of_earlier_seqs,
        ScanEvent.earliest_of_later_seqs,
    ).order_by(ScanEvent.device_id, ScanEvent.seq)
    with scratch.connect() as connection:
        pushed = connection.execute(bounds).all()
    assert [row for row in pushed if row[2] or row[3]] == [
        ("PDA-one", 2, None, at(65)),
        ("PDA-three", 1, None, at(800 - 12 * 60)),
        ("PDA-two", 3, at(70), None),
    ]

    migrate.downgrade(scratch, f"{DROP_BOUNDS}-1")
    with statements(scratch) as upgrading:
        migrate.upgrade(scratch, DROP_BOUNDS)
    with scratch.connect() as connection:
        assert connection.execute(bounds).all() == pushed
    if scratch.dialect.name == "postgresql":  # built without holding pushes back
        [created] = [s for s in upgrading if s.startswith("CREATE INDEX")]
        assert created.startswith("CREATE INDEX CONCURRENTLY"), created


CAPTURING_STATION = "d2a6f0c3b817"  # a consent captured on a PDA keeps that PDA's station


def test_captured_consents_get_the_station_of_the_pda_that_captured_them(scratch: Engine) -> None:
    """Dropping the column and adding it back fills it as pushes do: a consent captured
    on a PDA of the parcel's station, one captured on another station's PDA (the
    parcel's station is the consent's own ``station_id``), and none for a consent
    from a recipient channel."""
    import datetime as dt
    import uuid

    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from models import Consent, ConsentChannel, ConsentMethod, ConsentScope
    from sync.consents import ConsentDraft, ConsentRules, grant
    from sync.events import EventRules
    from sync.ingest import IngestRules, PushBatch, Pusher, ingest
    from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy
    from tests import factories

    migrate.upgrade(scratch)
    now = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)
    tracking = TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS)
    with Session(scratch) as session:
        here, there = (factories.station(session, code=code) for code in ("ST1", "ST2"))
        tracking_no = factories.parcel(session, here).tracking_no
        for station in (here, there):
            courier = factories.user(session, f"courier-{station.code}", "courier", station)
            device = factories.device(session, f"PDA-{station.code}", station)
            captured = factories.event(
                1,
                tracking_no,
                "consent_captured",
                occurred_at=now - dt.timedelta(hours=1),
                consent={"method": "locker", "channel": "in_person"},
            )
            ingest(
                session=session,
                batch=PushBatch(device.id, uuid.uuid4(), now, [captured]),
                pusher=Pusher(device.id, station.id, courier.id),
                rules=IngestRules(events=EventRules(tracking=tracking)),
                received_at=now,
            )
        grant(
            session=session,
            draft=ConsentDraft(
                scope=ConsentScope.PARCEL,
                method=ConsentMethod.ANY,
                channel=ConsentChannel.SMS,
                granted_at=now - dt.timedelta(hours=1),
                tracking_no=tracking_no,
            ),
            rules=ConsentRules(tracking=tracking, phone_region="CN"),
            created_by=None,
            now=now,
        )
        session.commit()
        expected = [(here.id, here.id), (here.id, there.id), (here.id, None)]
    kept = sa.select(Consent.station_id, Consent.captured_at_station_id).order_by(Consent.id)
    with scratch.connect() as connection:
        assert connection.execute(kept).all() == expected

    migrate.downgrade(scratch, f"{CAPTURING_STATION}-1")
    migrate.upgrade(scratch, CAPTURING_STATION)
    with scratch.connect() as connection:
        assert connection.execute(kept).all() == expected


REFUSALS = "f3e9a7c1b254"  # a parcel keeps when its recipient refused a consent request


def test_a_parcel_gets_the_times_its_recipient_refused_consent(scratch: Engine) -> None:
    """Dropping the column and adding it back fills it from the refused requests,
    oldest first, as answering them does; a parcel nobody refused gets none."""
    import datetime as dt

    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from models import ConsentMethod, ConsentRequest, ConsentRequestStatus, Parcel
    from tests import factories

    migrate.upgrade(scratch)
    now = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)
    with Session(scratch) as session:
        station = factories.station(session, code="ST1")
        courier = factories.user(session, "courier1", "courier", station)
        refused, _untouched = (factories.parcel(session, station) for _ in range(2))
        for hours, status in ((2, "refused"), (1, "granted"), (3, "refused")):
            session.add(
                ConsentRequest(
                    station_id=station.id,
                    tracking_no=refused.tracking_no,
                    courier_id=courier.id,
                    method=ConsentMethod.LOCKER,
                    requested_at=now - dt.timedelta(hours=hours, minutes=5),
                    expires_at=now,
                    status=ConsentRequestStatus(status),
                    answered_at=now - dt.timedelta(hours=hours),
                )
            )
        session.commit()
    kept = sa.select(Parcel.consent_refusals).order_by(Parcel.id)
    migrate.downgrade(scratch, f"{REFUSALS}-1")
    migrate.upgrade(scratch, REFUSALS)
    with scratch.connect() as connection:
        stored = connection.execute(kept).scalars().all()
    assert stored == [
        [(now - dt.timedelta(hours=h)).isoformat() for h in (3, 2)],
        None,
    ]


PDA_DECISIONS = "3fbed2908ec9"  # a decision covers what a PDA's flags name


def test_a_decision_on_a_pdas_flag_gets_what_its_evidence_names(scratch: Engine) -> None:
    """A flag still as the manager left it gets its PDA's ids for its events, its seqs
    and its silence as covered (what it holds now, taken as seen); what the decision
    recorded stays; a flag opened since, or never decided on, is left as it is."""
    import datetime as dt

    import sqlalchemy as sa

    from models.base import Document

    migrate.upgrade(scratch, f"{PDA_DECISIONS}-1")
    when = dt.datetime(2026, 12, 4, tzinfo=dt.UTC)
    silence = {"shift_id": 7, "last_push_at": None, "silent_minutes": 50}
    flags = {  # id: kind, status, decision, decided_on, evidence
        1: ("clock_jump", "resolved", "resolved", {}, {"client_event_ids": ["a"]}),
        2: ("stale_device", "acknowledged", "acknowledged", {}, silence),
        3: ("wrong_shift", "open", "resolved", {}, {"seqs": [3, 4]}),
        4: ("time_inversion", "resolved", "resolved", None, {"device_seqs": ["P#1"]}),
        5: ("unknown_parcel", "resolved", "resolved", {"event_ids": [1]}, {"event_ids": [1]}),
        6: ("wrong_shift", "resolved", "resolved", {"seqs": [3]}, {"seqs": [3, 4]}),
    }
    table = sa.table(
        "flag",
        *(sa.column(name) for name in ("id", "kind", "severity", "subject_type")),
        *(sa.column(name) for name in ("subject_key", "status", "raised_at", "updated_at")),
        sa.column("decision"),
        sa.column("decided_on", Document),
        sa.column("evidence", Document),
    )
    with scratch.begin() as connection:
        for flag_id, (kind, status, decision, decided_on, evidence) in flags.items():
            connection.execute(
                sa.insert(table).values(
                    id=flag_id,
                    kind=kind,
                    severity="warning",
                    subject_type="device",
                    subject_key=f"PDA-{flag_id}",
                    status=status,
                    raised_at=when,
                    updated_at=when,
                    decision=decision,
                    decided_on=decided_on,
                    evidence=evidence,
                )
            )
    migrate.upgrade(scratch)
    with scratch.connect() as connection:
        rows = connection.execute(sa.select(table.c.id, table.c.decided_on)).all()
    found = {flag_id: decided_on for flag_id, decided_on in rows}
    assert found == {
        1: {"client_event_ids": ["a"]},
        2: {"shift_id": 7, "last_push_at": None},
        3: {},
        4: None,
        5: {"event_ids": [1]},
        6: {"seqs": [3]},
    }


OPENED_AT = "5c8d2e7a4f16"  # flags keep when they last opened


def test_a_flag_gets_when_it_last_opened_from_its_history(scratch: Engine) -> None:
    """A flag opened again since it was raised gets the time of its latest opening, one
    never opened again its raising; the queue then lists the reopened one first."""
    import datetime as dt

    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from models import Flag, UTCDateTime
    from sync.flags import list_flags

    migrate.upgrade(scratch, f"{OPENED_AT}-1")
    raised = dt.datetime(2026, 11, 20, 9, 0, tzinfo=dt.UTC)
    flag = sa.table(
        "flag",
        *(sa.column(name) for name in ("id", "kind", "severity", "subject_type", "subject_key")),
        *(sa.column(name) for name in ("status", "evidence")),
        sa.column("raised_at", UTCDateTime()),
        sa.column("updated_at", UTCDateTime()),
    )
    change = sa.table(
        "flag_change",
        *(sa.column(name) for name in ("flag_id", "from_status", "to_status")),
        sa.column("at", UTCDateTime()),
    )
    history = {  # flag id: its changes (hours after its raising, from, to)
        1: [(0, None, "open"), (2, "open", "resolved"), (120, "resolved", "open")],
        2: [(0, None, "open")],
        3: [
            (0, None, "open"),
            (1, "open", "closed"),
            (30, "closed", "open"),
            (31, "open", "closed"),
        ],
    }
    with scratch.begin() as connection:
        for flag_id, changes in history.items():
            connection.execute(
                sa.insert(flag).values(
                    id=flag_id,
                    kind="clock_jump",
                    severity="warning",
                    subject_type="device",
                    subject_key=f"PDA-{flag_id}",
                    status=changes[-1][2],
                    evidence="{}",
                    raised_at=raised + dt.timedelta(days=flag_id),
                    updated_at=raised,
                )
            )
            for hours, before, after in changes:
                connection.execute(
                    sa.insert(change).values(
                        flag_id=flag_id,
                        from_status=before,
                        to_status=after,
                        at=raised + dt.timedelta(days=flag_id, hours=hours),
                    )
                )
    migrate.upgrade(scratch, OPENED_AT)
    with Session(scratch) as session:
        opened = dict(session.execute(sa.select(Flag.id, Flag.opened_at)).all())
        assert opened == {
            1: raised + dt.timedelta(days=1, hours=120),
            2: raised + dt.timedelta(days=2),
            3: raised + dt.timedelta(days=3, hours=30),
        }
    migrate.upgrade(scratch)  # the model reads the head's columns
    with Session(scratch) as session:
        assert [f.id for f in list_flags(session=session)] == [1, 3, 2]


FLAGS_BY_PARCEL = "3b6129cf67c6"  # flags keep the parcel they are about


def _updates_upgrading(engine: Engine, revision: str, prefix: str) -> tuple[list[int], list[bool]]:
    """Upgrade ``engine`` to ``revision``, watching the statements starting with
    ``prefix`` (whitespace folded): the rows each wrote, and whether a transaction was
    open when it ran (a backfill in committed batches holds none open between them)."""
    written: list[int] = []
    open_between: list[bool] = []

    def count(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if " ".join(statement.split()).startswith(prefix):
            written.append(cursor.rowcount)
            open_between.append(cursor.connection.info.transaction_status != 0)

    event.listen(engine, "after_cursor_execute", count)
    try:
        migrate.upgrade(engine, revision)
    finally:
        event.remove(engine, "after_cursor_execute", count)
    return written, open_between


def test_a_flag_gets_the_parcel_it_is_about_from_its_subject(scratch: Engine) -> None:
    """A parcel's own flag and its handover flags in shifts get its tracking number; a
    shift's, a PDA's or an event's own flag none. The queue then finds them by it."""
    import datetime as dt

    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from models import UTCDateTime
    from sync.flags import list_flags

    migrate.upgrade(scratch, f"{FLAGS_BY_PARCEL}-1")
    raised = dt.datetime(2026, 11, 20, 9, 0, tzinfo=dt.UTC)
    flag = sa.table(
        "flag",
        *(sa.column(name) for name in ("id", "kind", "severity", "subject_type", "subject_key")),
        *(sa.column(name) for name in ("status", "evidence")),
        *(sa.column(name, UTCDateTime()) for name in ("raised_at", "opened_at", "updated_at")),
    )
    subjects = {
        1: ("parcel", "RR473124829GB"),
        2: ("shift", "12:RR473124829GB"),
        3: ("shift", "12"),
        4: ("device", "PDA-1"),
        5: ("event", "PDA-1#7"),
        6: ("shift", "13:SF1300000000001"),
    }
    with scratch.begin() as connection:
        for flag_id, (subject_type, subject_key) in subjects.items():
            connection.execute(
                sa.insert(flag).values(
                    id=flag_id,
                    kind="missing_at_handover",
                    severity="critical",
                    subject_type=subject_type,
                    subject_key=subject_key,
                    status="open",
                    evidence="{}",
                    raised_at=raised,
                    opened_at=raised + dt.timedelta(hours=flag_id),
                    updated_at=raised,
                )
            )
    migrate.upgrade(scratch, FLAGS_BY_PARCEL)
    with scratch.connect() as connection:
        parcels = dict(connection.execute(sa.text("SELECT id, tracking_no FROM flag")).all())
    assert parcels == {
        1: "RR473124829GB",
        2: "RR473124829GB",
        3: None,
        4: None,
        5: None,
        6: "SF1300000000001",
    }
    migrate.upgrade(scratch)
    with Session(scratch) as session:
        found = list_flags(session=session, tracking_no="rr 473124829 gb")
        assert [f.id for f in found] == [2, 1]


BEFORE_OPENED_AT = "3fbed2908ec9"  # the revision before OPENED_AT
NAME_OPENED = "ix_flag_station_opened"  # their indexes
NAME_BY_PARCEL = "ix_flag_tracking_no"
FLAG_COLUMNS = ("id", "kind", "severity", "subject_type", "subject_key", "status", "evidence")


def _flag_table(*times: str) -> Any:
    """``flag`` with the columns every revision here has, and the times ``times``."""
    import sqlalchemy as sa

    from models import UTCDateTime

    return sa.table(
        "flag",
        *(sa.column(name) for name in FLAG_COLUMNS),
        *(sa.column(name, UTCDateTime()) for name in times),
    )


def _add_flag(connection: Any, flag_id: int, subject: str, raised: Any, **times: Any) -> None:
    """A flag of the subject ``subject`` (``<type> <key>``) raised at ``raised``."""
    import sqlalchemy as sa

    subject_type, subject_key = subject.split()
    connection.execute(
        sa.insert(_flag_table("raised_at", "updated_at", *times)).values(
            id=flag_id,
            kind="missing_at_handover",
            severity="critical",
            subject_type=subject_type,
            subject_key=subject_key,
            status="open",
            evidence="{}",
            raised_at=raised,
            updated_at=raised,
            **times,
        )
    )


def _add_change(connection: Any, flag_id: int, before: str | None, after: str, at: Any) -> None:
    import sqlalchemy as sa

    from models import UTCDateTime

    change = sa.table(
        "flag_change",
        *(sa.column(name) for name in ("flag_id", "from_status", "to_status")),
        sa.column("at", UTCDateTime()),
    )
    connection.execute(
        sa.insert(change).values(flag_id=flag_id, from_status=before, to_status=after, at=at)
    )


@contextmanager
def index_build_fails(engine: Engine, name: str, table: str = "flag") -> Iterator[None]:
    """The build of the index ``name`` fails half-way, as a lock timeout or a cancelled
    statement ends it. On PostgreSQL for real: another session holds a write lock on
    ``table`` that the CONCURRENTLY build, its index already in the catalog, waits for,
    and the build's ``lock_timeout`` ends the wait, leaving an INVALID index behind;
    on SQLite the statement is refused as an interrupted one would be."""
    from sqlalchemy.exc import OperationalError

    blocker = engine.connect() if engine.dialect.name == "postgresql" else None

    def fail(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if not statement.startswith(("CREATE INDEX", "CREATE UNIQUE INDEX")) or (
            name not in statement
        ):
            return
        if blocker is None:
            raise OperationalError(statement, None, RuntimeError("interrupted"))
        # A migration holding the table itself (a plain build in its transaction) would
        # keep the blocker waiting for ever: it gives up, failing the upgrade instead.
        blocker.execute(text("SET lock_timeout = '5s'"))
        blocker.execute(text(f"LOCK TABLE {table} IN ROW EXCLUSIVE MODE"))  # as a push does
        cursor.execute("SET lock_timeout = '200ms'")

    event.listen(engine, "before_cursor_execute", fail)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", fail)
        if blocker is not None:
            blocker.close()
        engine.dispose()  # no session keeps the lock_timeout


def upgrade_stopped_by_index_build(
    scratch: Engine,
    revision: str,
    before: str,
    index: str,
    *,
    table: str,
    columns_of: str | None = None,
) -> set[str]:
    """Upgrade to ``revision`` with the build of ``index`` on ``table`` failing: the
    upgrade stops at ``before``, the revision before it; the columns of ``columns_of``
    (default ``table``) as it left them."""
    import sqlalchemy as sa

    with pytest.raises(sa.exc.OperationalError), index_build_fails(scratch, index, table):
        migrate.upgrade(scratch, revision)
    with scratch.connect() as connection:
        assert migrate.current_revisions(connection) == {before}
        return {c["name"] for c in inspect(connection).get_columns(columns_of or table)}


def _column_default(engine: Engine, column: str) -> str | None:
    with engine.connect() as connection:
        default: str | None = connection.scalar(
            text(
                "SELECT column_default FROM information_schema.columns "
                "WHERE table_name = 'flag' AND column_name = :column"
            ),
            {"column": column},
        )
    return default


def test_flags_keep_when_they_last_opened_runs_again_after_its_index_build_failed(
    scratch: Engine,
) -> None:
    """PostgreSQL commits the column and its backfill before it builds the index
    CONCURRENTLY: an upgrade stopped there runs again to the end (no DuplicateColumn),
    keeping what running code set meanwhile (a flag raised, one opened again: the
    code's time, not its change's, a moment later), and builds the index anew. SQLite
    rolls the whole upgrade back: it runs again from the start."""
    import datetime as dt

    import sqlalchemy as sa

    raised = dt.datetime(2026, 11, 20, 9, 0, tzinfo=dt.UTC)
    hours = dt.timedelta(hours=1)
    migrate.upgrade(scratch, BEFORE_OPENED_AT)
    with scratch.begin() as connection:
        for flag_id in (1, 2, 3):
            _add_flag(connection, flag_id, f"parcel P{flag_id}", raised + flag_id * hours)
            _add_change(connection, flag_id, None, "open", raised + flag_id * hours)
        _add_change(connection, 1, "open", "resolved", raised + 10 * hours)
        _add_change(connection, 1, "resolved", "open", raised + 20 * hours)
        _add_change(connection, 3, "open", "closed", raised + 30 * hours)
    expected = {1: raised + 20 * hours, 2: raised + 2 * hours, 3: raised + 3 * hours}

    columns = upgrade_stopped_by_index_build(
        scratch, OPENED_AT, BEFORE_OPENED_AT, NAME_OPENED, table="flag"
    )
    if scratch.dialect.name == "postgresql":
        assert "opened_at" in columns
        assert _index_valid(scratch, NAME_OPENED) is False
        reopened = raised + 40 * hours
        with scratch.begin() as connection:  # the new version, serving meanwhile
            _add_flag(connection, 4, "parcel P4", raised + 4 * hours, opened_at=raised + 4 * hours)
            _add_change(connection, 2, "closed", "open", reopened)
            connection.execute(
                sa.update(_flag_table("opened_at"))
                .where(sa.column("id") == 2)
                .values(opened_at=reopened - dt.timedelta(microseconds=3))
            )
        expected |= {2: reopened - dt.timedelta(microseconds=3), 4: raised + 4 * hours}
    else:
        assert "opened_at" not in columns  # rolled back with the rest

    migrate.upgrade(scratch, OPENED_AT)
    with scratch.connect() as connection:
        assert migrate.current_revisions(connection) == {OPENED_AT}
        opened = connection.execute(
            sa.select(sa.column("id"), _flag_table("opened_at").c.opened_at)
        )
        assert dict(opened.all()) == expected
    if scratch.dialect.name == "postgresql":
        assert _index_valid(scratch, NAME_OPENED) is True
        assert _column_default(scratch, "opened_at") is None


def test_flags_by_parcel_runs_again_after_its_index_build_failed(scratch: Engine) -> None:
    """As ``opened_at``'s: an upgrade stopped by a failed index build runs again to the
    end, each flag with its parcel (a parcel's own, a handover's ``<shift>:<tn>``,
    none for a shift's), a flag running code raised meanwhile with the one it set."""
    import datetime as dt

    raised = dt.datetime(2026, 11, 20, 9, 0, tzinfo=dt.UTC)
    subjects = {1: "parcel RR473124829GB", 2: "shift 12:RR473124829GB", 3: "shift 12"}
    migrate.upgrade(scratch, f"{FLAGS_BY_PARCEL}-1")
    with scratch.begin() as connection:
        for flag_id, subject in subjects.items():
            _add_flag(connection, flag_id, subject, raised, opened_at=raised)
    expected = {1: "RR473124829GB", 2: "RR473124829GB", 3: None}

    columns = upgrade_stopped_by_index_build(
        scratch, FLAGS_BY_PARCEL, OPENED_AT, NAME_BY_PARCEL, table="flag"
    )
    if scratch.dialect.name == "postgresql":
        assert "tracking_no" in columns
        assert _index_valid(scratch, NAME_BY_PARCEL) is False
        with scratch.begin() as connection:  # the new version, serving meanwhile
            _add_flag(connection, 4, "shift 13:SF1300000000001", raised, opened_at=raised)
            connection.execute(
                text("UPDATE flag SET tracking_no = 'SF1300000000001' WHERE id = 4")
            )
        expected[4] = "SF1300000000001"
    else:
        assert "tracking_no" not in columns  # rolled back with the rest

    migrate.upgrade(scratch, FLAGS_BY_PARCEL)
    with scratch.connect() as connection:
        assert migrate.current_revisions(connection) == {FLAGS_BY_PARCEL}
        parcels = dict(connection.execute(text("SELECT id, tracking_no FROM flag")).all())
    assert parcels == expected
    if scratch.dialect.name == "postgresql":
        assert _index_valid(scratch, NAME_BY_PARCEL) is True


LOST_SEQS = "a7d3e9f1c5b2"  # lost seqs written off
NAME_LOST_SEQS = "ix_seq_write_off_device"


def test_lost_seq_write_offs_run_again_after_their_index_build_failed(scratch: Engine) -> None:
    """PostgreSQL commits the column and the table before it builds the index
    CONCURRENTLY: an upgrade stopped there runs again to the end (no DuplicateColumn,
    no DuplicateTable), keeping a write-off running code made meanwhile, and builds the
    index anew. SQLite rolls the whole upgrade back: it runs again from the start. A
    device's sync state is left as it was: no seq of it written off (no backfill)."""
    from sqlalchemy.orm import Session

    from tests import factories

    migrate.upgrade(scratch, f"{LOST_SEQS}-1")
    _device_moved_at_running_code_writes(scratch)
    with Session(scratch) as session:
        station = factories.station(session)
        user = factories.user(session, "manager1", "station_manager", station)
        factories.device(session, "PDA-0001", station)
        session.commit()
        station_id, user_id = station.id, user.id
    with scratch.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO device_sync_state (device_id, acked_through_seq, max_seq, "
                "missing_ranges) VALUES ('PDA-0001', 2, 9, :missing)"
            ),
            {"missing": "[[3, 4], [7, 7]]"},
        )

    columns = upgrade_stopped_by_index_build(
        scratch,
        LOST_SEQS,
        AUDIT_BY_PARCEL,
        NAME_LOST_SEQS,
        table="seq_write_off",
        columns_of="device_sync_state",
    )
    with scratch.connect() as connection:
        tables = set(inspect(connection).get_table_names())
    expected_write_offs = []
    if scratch.dialect.name == "postgresql":
        assert "written_off_ranges" in columns and "seq_write_off" in tables
        assert _index_valid(scratch, NAME_LOST_SEQS) is False
        with scratch.begin() as connection:  # the new version, serving meanwhile
            connection.execute(
                text(
                    "INSERT INTO seq_write_off (device_id, station_id, ranges, reason, "
                    "written_off_by, written_off_at) VALUES ('PDA-0001', :station, "
                    "'[[7, 7]]', 'lost', :user, now())"
                ),
                {"station": station_id, "user": user_id},
            )
        expected_write_offs = [("PDA-0001", [[7, 7]])]
    else:
        assert "written_off_ranges" not in columns  # rolled back with the rest
        assert "seq_write_off" not in tables

    migrate.upgrade(scratch, LOST_SEQS)
    with scratch.connect() as connection:
        assert migrate.current_revisions(connection) == {LOST_SEQS}
        state = connection.execute(
            text("SELECT missing_ranges, written_off_ranges FROM device_sync_state")
        ).one()
        write_offs = connection.execute(text("SELECT device_id, ranges FROM seq_write_off"))
        found = [(d, r if isinstance(r, list) else json.loads(r)) for d, r in write_offs]
    missing = state[0] if isinstance(state[0], list) else json.loads(state[0])
    assert (missing, state[1]) == ([[3, 4], [7, 7]], None)
    assert found == expected_write_offs
    if scratch.dialect.name == "postgresql":
        assert _index_valid(scratch, NAME_LOST_SEQS) is True


BACKFILLED_FLAGS = 25_000  # two full batches of 10,000 and a part of one


@pytest.mark.postgres_only
@pytest.mark.parametrize(
    ("revision", "column", "wrong"),
    [
        (OPENED_AT, "opened_at", "opened_at IS DISTINCT FROM raised_at"),
        (FLAGS_BY_PARCEL, "tracking_no", "tracking_no IS DISTINCT FROM 'P' || (id * 7)::text"),
    ],
    ids=["opened_at", "tracking_no"],
)
def test_a_flag_backfill_keeps_no_lock_that_holds_the_queue_or_pushes_back(
    scratch: Engine, revision: str, column: str, wrong: str
) -> None:
    """The column's ACCESS EXCLUSIVE lock is committed before the backfill starts, and
    the backfill runs in batches of at most 10,000 flags, each committed: before each
    of its statements, a reader with a short ``lock_timeout`` reads ``flag``, a push
    writes a flag the batches before wrote, and the migration's session holds no
    transaction open."""
    from sqlalchemy.exc import OperationalError

    migrate.upgrade(scratch, f"{revision}-1")
    opened = ", opened_at" if revision == FLAGS_BY_PARCEL else ""
    with scratch.begin() as connection:  # half parcels' own, half their handovers'
        connection.execute(
            text(
                "INSERT INTO flag (id, kind, severity, subject_type, subject_key, evidence, "
                f"status, raised_at, updated_at{opened}) "
                "SELECT n, 'missing_at_handover', 'critical', "
                "CASE WHEN n % 2 = 0 THEN 'parcel' ELSE 'shift' END, "
                "CASE WHEN n % 2 = 0 THEN '' ELSE (n % 13)::text || ':' END "
                "|| 'P' || (n * 7)::text, '{}', 'open', t, t"
                f"{', t' if opened else ''} "
                "FROM generate_series(1, :count) AS n, "
                "LATERAL (SELECT timestamptz '2026-11-20 09:00+00' + n * interval '1 s' AS t) "
                "AS raised"
            ),
            {"count": BACKFILLED_FLAGS},
        )
        connection.execute(
            text("SELECT setval('flag_id_seq', :count)"), {"count": BACKFILLED_FLAGS}
        )

    seen: list[tuple[bool, bool, bool]] = []
    written: list[int] = []
    watcher = scratch.connect()
    watcher.execute(text("SET lock_timeout = '200ms'"))
    watcher.commit()

    def succeeds(statement: str) -> bool:
        try:
            watcher.execute(text(statement))
            return True
        except OperationalError:
            return False
        finally:
            watcher.rollback()

    def backfill(statement: str) -> bool:
        return " ".join(statement.split()).startswith(f"UPDATE flag SET {column}")

    def watch(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if not backfill(statement):
            return
        migrating = watcher.scalar(
            text("SELECT xact_start IS NOT NULL FROM pg_stat_activity WHERE pid = :pid"),
            {"pid": cursor.connection.info.backend_pid},
        )
        watcher.rollback()
        seen.append(
            (
                succeeds("SELECT count(*) FROM flag WHERE status = 'open'"),
                succeeds("UPDATE flag SET updated_at = updated_at WHERE id = 2"),
                bool(migrating),
            )
        )

    def count(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if backfill(statement):
            written.append(cursor.rowcount)

    event.listen(scratch, "before_cursor_execute", watch)
    event.listen(scratch, "after_cursor_execute", count)
    try:
        migrate.upgrade(scratch, revision)
    finally:
        event.remove(scratch, "before_cursor_execute", watch)
        event.remove(scratch, "after_cursor_execute", count)
        watcher.close()

    assert seen and set(seen) == {(True, True, False)}, seen
    assert max(written) <= 10_000 and sum(written) == BACKFILLED_FLAGS, written
    with scratch.connect() as connection:
        assert connection.scalar(text(f"SELECT count(*) FROM flag WHERE {wrong}")) == 0


@pytest.mark.postgres_only
def test_a_flag_the_version_before_raises_during_the_backfill_gets_when_it_opened(
    scratch: Engine,
) -> None:
    """The version before, still serving while the upgrade runs, raises flags without
    ``opened_at``: they get the constant default until the backfill is done and the
    default dropped, and the pass after the drop fills them too: none is left at the
    bottom of the queue with the year 2000."""
    import datetime as dt

    import sqlalchemy as sa

    raised = dt.datetime(2026, 11, 20, 9, 0, tzinfo=dt.UTC)
    migrate.upgrade(scratch, BEFORE_OPENED_AT)
    with scratch.begin() as connection:
        _add_flag(connection, 1, "parcel P1", raised)
    pusher = scratch.connect()
    pusher.execute(text("SET lock_timeout = '200ms'"))
    pusher.commit()

    def push(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "ALTER COLUMN opened_at DROP DEFAULT" in statement:
            _add_flag(pusher, 2, "parcel P2", raised + dt.timedelta(hours=1))
            pusher.commit()

    event.listen(scratch, "before_cursor_execute", push)
    try:
        migrate.upgrade(scratch, OPENED_AT)
    finally:
        event.remove(scratch, "before_cursor_execute", push)
        pusher.close()
    with scratch.connect() as connection:
        opened = connection.execute(
            sa.select(sa.column("id"), _flag_table("opened_at").c.opened_at)
        )
        assert dict(opened.all()) == {1: raised, 2: raised + dt.timedelta(hours=1)}


AUDIT_BY_PARCEL = "9d4f2b7c1e63"  # audit entries keep the parcel they are about
BEFORE_AUDIT_BY_PARCEL = "a7c3e9f1b5d2"  # batches keep the hash of their bytes
NAME_AUDIT_BY_PARCEL = "ix_audit_entry_tracking_no"
A, B = "RR473124829GB", "SF1300000000001"
# Entries as the versions before wrote them, and the parcel each is given: where its
# details record the number as stored, or its subject is the parcel.
ENTRIES_BEFORE: list[tuple[str, str, str, dict[str, Any], str | None]] = [
    ("consent_granted", "consent", "1", {"tracking_no": A, "scope": "parcel"}, A),
    ("consent_granted", "consent", "2", {"tracking_no": None, "scope": "standing"}, None),
    ("consent_revoked", "consent", "1", {"tracking_no": A, "reason": "moved"}, A),
    ("consent_refused", "consent_request", "3", {"tracking_no": B, "channel": "sms"}, B),
    ("proof_read", "proof", "7", {"tracking_no": A, "event_ids": [7, 9]}, A),
    ("parcel_read", "parcel", A, {"event_ids": [7]}, A),
    ("parcel_updated", "parcel", B, {"changes": {}, "by": "import"}, B),
    ("flag_resolved", "flag", "3", {"subject_type": "parcel", "subject_key": A}, A),
    ("flag_acknowledged", "flag", "4", {"subject_type": "shift", "subject_key": f"12:{B}"}, B),
    ("flag_resolved", "flag", "5", {"subject_type": "shift", "subject_key": "12"}, None),
    ("flag_resolved", "flag", "6", {"subject_type": "device", "subject_key": "PDA-1"}, None),
    # A search's filter, as typed: names no parcel as stored.
    ("proofs_exported", "proof", "export", {"tracking_no": "rr 473124829 gb"}, None),
    ("quarantine_searched", "quarantined_event", "search", {"tracking_no": A}, None),
    ("parcel_read", "shift", "12", {"tracking_nos": [A, B]}, None),  # several parcels
    ("shift_signed_off", "shift", "12", {"note": f"{A} missing"}, None),
    ("proof_read", "proof", "8", {"tracking_no": "X" * 41}, None),  # none so long is stored
]


def _append_before(connection: Any, entries: Any) -> None:
    """``entries`` (action, subject type and key, details, ...) appended after the log's
    newest entry as ``sync.audit`` chains them, without the parcel (the version before)."""
    import datetime as dt

    import sqlalchemy as sa

    from models import UTCDateTime
    from models.base import Document
    from sync import audit

    table = sa.table(
        "audit_entry",
        *(sa.column(name) for name in ("id", "actor_id", "action", "subject_type")),
        *(sa.column(name) for name in ("subject_key", "prev_hash", "entry_hash")),
        sa.column("at", UTCDateTime()),
        sa.column("details", Document),
    )
    newest = connection.execute(
        sa.select(table.c.id, table.c.entry_hash).order_by(table.c.id.desc()).limit(1)
    ).first()
    entry_id, prev = newest if newest is not None else (0, audit.GENESIS_HASH)
    at = dt.datetime(2026, 11, 20, 9, 0, tzinfo=dt.UTC)
    for action, subject_type, subject_key, details, *_ in entries:
        entry_id += 1
        row = {
            "at": at + dt.timedelta(minutes=entry_id),
            "actor_id": None,
            "action": action,
            "subject_type": subject_type,
            "subject_key": subject_key,
            "details": details,
            "prev_hash": prev,
        }
        prev = audit.entry_hash(**row)
        connection.execute(sa.insert(table).values(id=entry_id, entry_hash=prev, **row))


def _parcels_of_entries(engine: Engine) -> dict[int, str | None]:
    with engine.connect() as connection:
        return dict(connection.execute(text("SELECT id, tracking_no FROM audit_entry")).all())


def test_an_audit_entry_gets_the_parcel_its_details_record(scratch: Engine) -> None:
    """A consent's, a refusal's, a proof read's entry get the number their details record,
    an entry about a parcel its key, a decision on a parcel's flag (its own, its handover
    in a shift) the parcel of the flag's subject; a standing consent's, a shift's flag's,
    a search's filter as typed, a page of several parcels and anything else get none. The
    column is outside the hash: the chain verifies as before, and the log lists a
    parcel's entries by its number."""
    from sqlalchemy.orm import Session

    from sync import audit

    migrate.upgrade(scratch, BEFORE_AUDIT_BY_PARCEL)
    with scratch.begin() as connection:
        _append_before(connection, ENTRIES_BEFORE)
    migrate.upgrade(scratch, AUDIT_BY_PARCEL)
    expected = {n: entry[4] for n, entry in enumerate(ENTRIES_BEFORE, start=1)}
    assert _parcels_of_entries(scratch) == expected
    migrate.upgrade(scratch)
    with Session(scratch) as session:
        result = audit.verify(session=session)
        assert (result.ok, result.checked) == (True, len(ENTRIES_BEFORE))
        found = audit.list_entries(session=session, tracking_no="rr 4731-24829 gb")
        # and by the parcels a shift page showed (``b1d7e3a9c5f2``)
        assert [e.id for e in found] == [14, 8, 6, 5, 3, 1]
        found = audit.list_entries(session=session, tracking_no=B)
        assert [e.id for e in found] == [14, 9, 7, 4]


def test_audit_entries_by_parcel_runs_again_after_its_index_build_failed(
    scratch: Engine,
) -> None:
    """As the flags': an upgrade stopped by a failed index build runs again to the end,
    each entry with its parcel, an entry the new version appended meanwhile with the
    one it set and one the version before appended with the one its details record."""

    migrate.upgrade(scratch, BEFORE_AUDIT_BY_PARCEL)
    with scratch.begin() as connection:
        _append_before(connection, ENTRIES_BEFORE[:3])
    expected = {1: A, 2: None, 3: A}

    columns = upgrade_stopped_by_index_build(
        scratch, AUDIT_BY_PARCEL, BEFORE_AUDIT_BY_PARCEL, NAME_AUDIT_BY_PARCEL, table="audit_entry"
    )
    if scratch.dialect.name == "postgresql":
        assert "tracking_no" in columns
        assert _index_valid(scratch, NAME_AUDIT_BY_PARCEL) is False
        assert _parcels_of_entries(scratch) == expected  # the backfill committed
        with scratch.begin() as connection:  # both versions, serving meanwhile
            _append_before(connection, [ENTRIES_BEFORE[3], ENTRIES_BEFORE[5]])
            connection.execute(text(f"UPDATE audit_entry SET tracking_no = '{A}' WHERE id = 5"))
        expected |= {4: B, 5: A}
    else:
        assert "tracking_no" not in columns  # rolled back with the rest

    migrate.upgrade(scratch, AUDIT_BY_PARCEL)
    with scratch.connect() as connection:
        assert migrate.current_revisions(connection) == {AUDIT_BY_PARCEL}
    assert _parcels_of_entries(scratch) == expected
    if scratch.dialect.name == "postgresql":
        assert _index_valid(scratch, NAME_AUDIT_BY_PARCEL) is True


EVERY_PARCEL = "b1d7e3a9c5f2"  # audit entries by every parcel they concern
C = "RR473124832GB"
# Entries as the version before wrote them (its parcel, set or not), and every parcel
# each one concerns.
CONCERNING: list[tuple[str, str, str, dict[str, Any], str | None, set[str]]] = [
    ("proof_read", "proof", "7", {"tracking_no": A}, A, {A}),
    ("parcel_read", "shift", "12", {"tracking_nos": [A, B]}, None, {A, B}),
    (
        "shift_signed_off",
        "shift",
        "12",
        {
            "note": "b missing",
            "balance": {
                "outcomes": {A: ["delivered", 7], C: ["returned", 9]},
                "discrepancies": [{"kind": "missing_at_handover", "tracking_no": B}],
            },
        },
        None,
        {A, B, C},
    ),
    ("shift_signed_off", "shift", "13", {"note": "no balance kept"}, None, set()),
    ("parcel_read", "shift", "14", {"tracking_nos": "not a list"}, None, set()),
    ("proofs_searched", "proof", "search", {"event_ids": [7]}, None, set()),
]


def _entry_parcels(engine: Engine) -> dict[int, set[str]]:
    with engine.connect() as connection:
        found: dict[int, set[str]] = {}
        for number, entry_id in connection.execute(
            text("SELECT tracking_no, entry_id FROM audit_entry_parcel")
        ):
            found.setdefault(entry_id, set()).add(number)
        return found


def test_an_audit_entry_is_filed_under_every_parcel_it_records(scratch: Engine) -> None:
    """An entry about several parcels (a sign-off's balance, a shift page's recipients)
    is filed under each, one about one parcel under it, and a parcel's list has them
    all, newest first; the chain verifies as before. Run again (an upgrade stopped
    after the backfill), it files nothing twice."""
    from sqlalchemy.orm import Session

    from sync import audit

    migrate.upgrade(scratch, POINT_IDS)
    _audit_client_ip_running_code_writes(scratch)
    with scratch.begin() as connection:
        _append_before(connection, CONCERNING)
        for n, entry in enumerate(CONCERNING, start=1):
            connection.execute(
                text("UPDATE audit_entry SET tracking_no = :t WHERE id = :id"),
                {"t": entry[4], "id": n},
            )
    migrate.upgrade(scratch, EVERY_PARCEL)
    expected = {n: entry[5] for n, entry in enumerate(CONCERNING, start=1) if entry[5]}
    assert _entry_parcels(scratch) == expected
    if scratch.dialect.name == "postgresql":  # stopped before its revision was recorded
        with scratch.begin() as connection:
            connection.execute(
                text("UPDATE alembic_version SET version_num = :v"), {"v": POINT_IDS}
            )
        migrate.upgrade(scratch, EVERY_PARCEL)
        assert _entry_parcels(scratch) == expected
    with Session(scratch) as session:
        assert audit.verify(session=session).ok
        listed = {
            number: [e.id for e in audit.list_entries(session=session, tracking_no=number)]
            for number in (A, B, C)
        }
        assert listed == {A: [3, 2, 1], B: [3, 2], C: [3]}


BY_THEIR_PARCELS = "a3f7c9e1d5b8"  # reopenings and closes for the courier by their parcels


def _rejected(engine: Engine, rows: dict[int, str | None]) -> None:
    """Rejected events of the first batch, by id, each naming the parcel given (or none)."""
    with engine.begin() as connection:
        station_id, batch_pk, device_id = connection.execute(
            text("SELECT station_id, id, device_id FROM sync_batch ORDER BY id LIMIT 1")
        ).one()
        for row_id, parcel in rows.items():
            connection.execute(
                text(
                    "INSERT INTO quarantined_event (id, station_id, device_id, batch_pk, "
                    "position, seq, event_type, tracking_no, parcel_tracking_no, error_code, "
                    "message, payload, payload_hash, received_at) VALUES (:id, :station, "
                    ":device, :batch, :id, NULL, 'delivered_to_locker', :tn, :tn, "
                    "'missing_field', 'locker_id is required', '{}', :hash, "
                    "'2026-11-20 09:00:00+00')"
                ),
                {
                    "id": row_id,
                    "station": station_id,
                    "device": device_id,
                    "batch": batch_pk,
                    "tn": parcel,
                    "hash": f"{row_id:064d}",
                },
            )


def test_reopenings_and_closes_for_the_courier_written_before_get_their_parcels(
    scratch: Engine,
) -> None:
    """A lost parcel's history (``GET /audit?tracking_no=``) lists the reopenings its
    late scans or rejected events made, their withdrawals, the closes of its shift for
    the courier and a manager's decisions on the shift's flags citing its scans: the
    entries the version before wrote get the parcels the service now files them under.
    A reopening by seqs still on the PDA, and its withdrawal, name none; a withdrawal
    with no reopening before it none; a decision on a parcel's own flag keeps its own.
    Run again, it files nothing twice; the chain verifies as before."""
    import datetime as dt

    from sqlalchemy.orm import Session

    from sync import audit
    from tests import factories

    migrate.upgrade(scratch, EVERY_PARCEL)
    _audit_client_ip_running_code_writes(scratch)
    with Session(scratch) as session:
        factories.station_day(
            session, "ST1", shifts=2, parcels_per_shift=3, day=dt.date(2026, 11, 20)
        )
        session.commit()
    with scratch.connect() as connection:
        events = connection.execute(
            text("SELECT id, shift_id, tracking_no FROM scan_event ORDER BY id")
        ).all()
    first, second = sorted({event.shift_id for event in events})
    of_shift = {
        shift: {event.tracking_no for event in events if event.shift_id == shift}
        for shift in (first, second)
    }
    x, y = sorted(of_shift[second])[:2]
    late = [event.id for event in events if event.tracking_no == x]  # its two scans
    _rejected(scratch, {1: y, 2: None})
    with scratch.begin() as connection:
        _append_before(
            connection,
            [
                ("shift_signed_off", "shift", str(second), {"note": "y missing"}),
                (
                    "shift_reopened",
                    "shift",
                    str(second),
                    {"event_ids": late, "rejected_event_ids": [1, 2]},
                ),
                ("shift_reopening_withdrawn", "shift", str(second), {"reason": "taken"}),
                ("shift_reopened", "shift", str(first), {"event_ids": [], "missing_seqs": [3]}),
                ("shift_reopening_withdrawn", "shift", str(first), {"reason": "written off"}),
                ("shift_closed_for_courier", "shift", str(first), {"last_seq": None}),
                ("shift_last_seq_declared", "shift", str(second), {"last_seq": 6}),
                ("shift_reopening_withdrawn", "shift", "999", {"reason": "none before"}),
                (  # a manager's word on the shift's late_event_after_signoff flag
                    "flag_resolved",
                    "flag",
                    "5",
                    {"decided_on": {"event_ids": late, "rejected_event_ids": [1, 2]}},
                ),
                ("flag_resolved", "flag", "6", {"decided_on": {"event_ids": late}}),
            ],
        )
        # A decision on a parcel's own flag was filed under it (``b1d7e3a9c5f2``).
        connection.execute(text("UPDATE audit_entry SET tracking_no = :t WHERE id = 10"), {"t": y})
    expected = {2: {x, y}, 3: {x, y}, 6: of_shift[first], 7: of_shift[second], 9: {x, y}}
    migrate.upgrade(scratch, BY_THEIR_PARCELS)
    assert _entry_parcels(scratch) == expected
    with scratch.begin() as connection:  # stopped before its revision was recorded
        connection.execute(
            text("UPDATE alembic_version SET version_num = :v"), {"v": EVERY_PARCEL}
        )
    migrate.upgrade(scratch, BY_THEIR_PARCELS)
    assert _entry_parcels(scratch) == expected
    with Session(scratch) as session:
        assert audit.verify(session=session).ok
        found = audit.list_entries(session=session, tracking_no=x)
        assert [entry.id for entry in found] == [9, 7, 3, 2]


BY_THE_PDAS_IDS = "c4e8b2f6a1d9"  # decisions on a PDA's flags by their parcels


def test_decisions_on_a_pdas_flags_written_before_get_the_parcels_they_cite(
    scratch: Engine,
) -> None:
    """A manager's decisions on a PDA's ``clock_jump`` (its events by the PDA's ids),
    ``wrong_shift`` (by their seqs) and on a ``seq_conflict`` (subject the PDA's event
    by its seq, evidence by the PDA's ids) get the parcels of the events they covered;
    an id of no held event, a malformed one, a seq of another PDA's flag subject (a
    shift's) and a decision on a parcel's own flag get none. Run again, it files
    nothing twice; the chain verifies as before."""
    import datetime as dt
    import uuid

    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from models import ScanEvent
    from sync import audit
    from tests import factories

    migrate.upgrade(scratch, REQUESTS_ANNOUNCE_LAPSE)
    _audit_client_ip_running_code_writes(scratch)
    with Session(scratch) as session:
        factories.station_day(
            session, "ST1", shifts=1, parcels_per_shift=3, day=dt.date(2026, 11, 20)
        )
        session.commit()
    with Session(scratch) as session:
        held = session.scalars(select(ScanEvent).order_by(ScanEvent.seq)).all()
    device = held[0].device_id
    x, y = held[0].tracking_no, held[-1].tracking_no
    assert x != y
    by_id = [str(held[0].client_event_id), str(uuid.uuid4()), "not-an-id"]
    with scratch.begin() as connection:
        _append_before(
            connection,
            [
                (
                    "flag_resolved",
                    "flag",
                    "1",
                    {
                        "subject_type": "device",
                        "subject_key": device,
                        "decided_on": {"client_event_ids": by_id},
                    },
                ),
                (
                    "flag_acknowledged",
                    "flag",
                    "2",
                    {
                        "subject_type": "device",
                        "subject_key": device,
                        "decided_on": {"seqs": [held[-1].seq, 99_999]},
                    },
                ),
                (
                    "flag_resolved",
                    "flag",
                    "3",
                    {
                        "subject_type": "event",
                        "subject_key": f"{device}#{held[0].seq}",
                        "decided_on": {"client_event_ids": by_id[:1]},
                    },
                ),
                (  # seqs of a shift's flag are not a PDA's
                    "flag_resolved",
                    "flag",
                    "4",
                    {
                        "subject_type": "shift",
                        "subject_key": "1",
                        "decided_on": {"seqs": [held[-1].seq]},
                    },
                ),
            ],
        )
    expected = {1: {x}, 2: {y}, 3: {x}}
    migrate.upgrade(scratch, BY_THE_PDAS_IDS)
    assert _entry_parcels(scratch) == expected
    with scratch.begin() as connection:  # stopped before its revision was recorded
        connection.execute(
            text("UPDATE alembic_version SET version_num = :v"), {"v": REQUESTS_ANNOUNCE_LAPSE}
        )
    migrate.upgrade(scratch, BY_THE_PDAS_IDS)
    assert _entry_parcels(scratch) == expected
    with Session(scratch) as session:
        assert audit.verify(session=session).ok


WEBHOOK_SECRETS_ROTATE = "e7b3d9a5c2f8"  # a webhook subscription keeps its previous secret
PURGES_BY_PARCEL = "e2b6d4f8a1c3"  # retention purges by the parcels of their images


def test_purges_written_before_get_the_parcels_whose_proofs_named_their_images(
    scratch: Engine,
) -> None:
    """A retention purge written before is filed under the parcels whose proofs named
    the digests it lists: one image named by two proofs, both parcels; a digest no
    proof names, none; another action listing the same digest, none. Run again, it
    files nothing twice; the chain verifies as before."""
    import datetime as dt

    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from models import ScanEvent
    from sync import audit
    from tests import factories

    migrate.upgrade(scratch, WEBHOOK_SECRETS_ROTATE)
    _audit_client_ip_running_code_writes(scratch)
    with Session(scratch) as session:
        factories.station_day(
            session, "ST1", shifts=1, parcels_per_shift=3, day=dt.date(2026, 11, 20)
        )
        session.commit()
    with Session(scratch) as session:
        held = session.scalars(select(ScanEvent).order_by(ScanEvent.seq)).all()
    numbers = sorted({event.tracking_no for event in held})
    x, y, z = numbers[:3]
    shared, alone, unnamed = "a" * 64, "b" * 64, "c" * 64
    by_number = {event.tracking_no: event.id for event in held}
    with scratch.begin() as connection:
        for number, sha256 in ((x, shared), (y, shared), (z, alone)):
            connection.execute(
                text(
                    "INSERT INTO proof_image (event_id, sha256, tracking_no) VALUES (:e, :s, :t)"
                ),
                {"e": by_number[number], "s": sha256, "t": number},
            )
        _append_before(
            connection,
            [
                ("proof_images_purged", "blob", shared, {"digests": [shared, unnamed]}),
                ("proof_images_purged", "blob", alone, {"digests": [alone]}),
                ("proof_images_purged", "blob", unnamed, {"digests": [unnamed]}),
                ("blob_read", "blob", shared, {"digests": [shared]}),
            ],
        )
    expected = {1: {x, y}, 2: {z}}
    migrate.upgrade(scratch, PURGES_BY_PARCEL)
    assert _entry_parcels(scratch) == expected
    with scratch.begin() as connection:  # stopped before its revision was recorded
        connection.execute(
            text("UPDATE alembic_version SET version_num = :v"), {"v": WEBHOOK_SECRETS_ROTATE}
        )
    migrate.upgrade(scratch, PURGES_BY_PARCEL)
    assert _entry_parcels(scratch) == expected
    with Session(scratch) as session:
        assert audit.verify(session=session).ok
        assert [e.id for e in audit.list_entries(session=session, tracking_no=x)] == [1]


def test_purges_written_before_are_filed_batch_by_batch(scratch: Engine) -> None:
    """More purge entries than one statement files (``BATCH``, 500), among other
    entries: each batch of purges is filed from where the one before ended, none left
    out at a batch's edge, none filed twice."""
    import datetime as dt

    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from models import ScanEvent
    from tests import factories

    migrate.upgrade(scratch, WEBHOOK_SECRETS_ROTATE)
    with Session(scratch) as session:
        factories.station_day(
            session, "ST1", shifts=1, parcels_per_shift=2, day=dt.date(2026, 11, 20)
        )
        session.commit()
    with Session(scratch) as session:
        held = session.scalars(select(ScanEvent).order_by(ScanEvent.seq)).all()
    by_number = {event.tracking_no: event.id for event in held}
    x, y = sorted(by_number)[:2]
    digests = {x: "d" * 64, y: "e" * 64}
    entries = []
    with scratch.begin() as connection:
        for number, sha256 in digests.items():
            connection.execute(
                text(
                    "INSERT INTO proof_image (event_id, sha256, tracking_no) VALUES (:e, :s, :t)"
                ),
                {"e": by_number[number], "s": sha256, "t": number},
            )
        for n in range(1203):  # 601 purges, each after another entry: 2 batches
            number = x if n % 4 == 1 else y
            if n % 2:
                entries.append(
                    ("proof_images_purged", "blob", "p", {"digests": [digests[number]]})
                )
            else:
                entries.append(("blob_read", "blob", "r", {"digests": [digests[number]]}))
        _append_before(connection, entries)
    expected = {n + 1: {x if n % 4 == 1 else y} for n in range(len(entries)) if n % 2}
    assert len(expected) == 601

    migrate.upgrade(scratch, PURGES_BY_PARCEL)

    assert _entry_parcels(scratch) == expected


def _device_moved_at_running_code_writes(engine: Engine) -> None:
    """Running code (a PDA registered) used at an older revision writes ``device.moved_at``,
    which ``b7e2c4a9d1f6`` adds: added here by hand, as that migration adds it only where
    it is not there yet. Added once: called again, nothing changes."""
    kind = "TIMESTAMP WITH TIME ZONE" if engine.dialect.name == "postgresql" else "DATETIME"
    with engine.begin() as connection:
        if "moved_at" not in {c["name"] for c in inspect(connection).get_columns("device")}:
            connection.execute(text(f"ALTER TABLE device ADD COLUMN moved_at {kind}"))


def _audit_client_ip_running_code_writes(engine: Engine) -> None:
    """Running code (an entry appended, the log verified) used at an older revision reads
    and writes ``audit_entry.client_ip``, which ``f4a8c2e6b1d3`` adds: added here by hand,
    as that migration adds it only where it is not there yet."""
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE audit_entry ADD COLUMN client_ip VARCHAR(64)"))


WRITE_OFFS_BY_PARCEL = "b5c1e8d3f7a2"  # write-offs by the parcels of their shifts


def _columns_running_code_reads(engine: Engine) -> None:
    """Running code (a push, a write-off) used at an older revision to write the rows a
    migration takes up reads a device's sync state whole, with the columns later
    revisions added: added here by hand, as ``c8f2a4d6e1b9``, ``f5a1c7e3b9d4`` and
    ``e9c3b7a5d1f2`` add their columns only where they are not there yet."""
    with engine.begin() as connection:
        connection.execute(
            text(
                "ALTER TABLE device_sync_state "
                "ADD COLUMN held_at_write_off BIGINT NOT NULL DEFAULT 0"
            )
        )
        connection.execute(
            text(
                "ALTER TABLE device_sync_state "
                "ADD COLUMN unsettled_seq_conflicts INTEGER NOT NULL DEFAULT 0"
            )
        )
        connection.execute(text("ALTER TABLE quarantined_event ADD COLUMN resent_seq INTEGER"))
        uuid_type = "UUID" if engine.dialect.name == "postgresql" else "CHAR(32)"
        connection.execute(
            text(f"ALTER TABLE quarantined_event ADD COLUMN unsettled_event_id {uuid_type}")
        )
        connection.execute(
            text(
                "ALTER TABLE device_sync_state "
                "ADD COLUMN seq_conflicts_compared BOOLEAN NOT NULL DEFAULT true"
            )
        )


def test_write_offs_written_before_get_the_parcels_of_the_shifts_owning_their_seqs(
    scratch: Engine,
) -> None:
    """A PDA ran three shifts: A declared no seqs (it owns up to where B starts), B
    declared its first seq and no last (it owns up to where C starts), C both. Seqs 7-8
    (A's) and 10-11 (B's) were lost and written off, each on its own. The service files
    each write-off under the parcels of the shifts owning its seqs; entries written
    before were filed under none. Emptied of their parcels, as the version before left
    them, they get back exactly what the service files: A's parcels, then B's, never
    C's nor another PDA's. Run again, it files nothing twice; the chain verifies."""
    import datetime as dt

    from sqlalchemy import delete, insert, select, update
    from sqlalchemy.orm import Session

    from models import (
        AuditEntry,
        AuditEntryParcel,
        Device,
        DeviceSyncState,
        ScanEvent,
        Shift,
        Station,
    )
    from sync import audit
    from sync.lost_seqs import write_off_lost_seqs
    from tests import factories

    migrate.upgrade(scratch, PURGES_BY_PARCEL)
    _audit_client_ip_running_code_writes(scratch)
    _columns_running_code_reads(scratch)
    _device_moved_at_running_code_writes(scratch)
    with Session(scratch) as session:
        factories.station_day(
            session, "ST1", shifts=2, parcels_per_shift=3, day=dt.date(2026, 11, 20)
        )
        admin = factories.user(session, "admin", "admin")
        session.commit()
        device = "ST1-000"
        first = session.scalars(select(Shift).where(Shift.device_id == device)).one()
        template = session.scalars(
            select(ScanEvent).where(ScanEvent.device_id == device).order_by(ScanEvent.seq)
        ).first()
        assert template is not None
        later: dict[int, str] = {}
        for hours, first_seq, last_seq in ((24, 9, None), (48, 12, 12)):
            parcel = factories.parcel(session, session.get(Station, first.station_id))
            shift_id = session.execute(
                insert(Shift)
                .values(
                    station_id=first.station_id,
                    courier_id=first.courier_id,
                    device_id=device,
                    status="closed",
                    work_date=first.work_date + dt.timedelta(days=hours // 24),
                    opened_at=first.opened_at + dt.timedelta(hours=hours),
                    planned_end_at=first.opened_at + dt.timedelta(hours=hours + 10),
                    closed_at=first.opened_at + dt.timedelta(hours=hours + 9),
                    first_seq=first_seq,
                    last_seq=last_seq,
                )
                .returning(Shift.id)
            ).scalar_one()
            at = first.opened_at + dt.timedelta(hours=hours, minutes=1)
            session.execute(
                insert(ScanEvent).values(
                    station_id=first.station_id,
                    device_id=device,
                    courier_id=first.courier_id,
                    batch_pk=template.batch_pk,
                    client_event_id=uuid.uuid4(),
                    seq=first_seq,
                    type="checked_out",
                    tracking_no=parcel.tracking_no,
                    occurred_at_device=at,
                    occurred_at=at,
                    received_at=at,
                    shift_id=shift_id,
                    details={},
                    content_hash=f"{first_seq:064d}",
                )
            )
            later[shift_id] = parcel.tracking_no
        session.execute(
            update(DeviceSyncState)
            .where(DeviceSyncState.device_id == device)
            .values(max_seq=12, acked_through_seq=6, missing_ranges=[[7, 8], [10, 11]])
        )
        session.commit()
        a_parcels = set(
            session.scalars(select(ScanEvent.tracking_no).where(ScanEvent.shift_id == first.id))
        )
        for lost in ([[7, 8]], [[10, 11]]):
            write_off_lost_seqs(
                session=session,
                device=session.get(Device, device),
                ranges=lost,
                reason="flash broken",
                user_id=admin.id,
            )
            session.commit()
        entries = session.scalars(
            select(AuditEntry.id)
            .where(AuditEntry.action == "lost_seqs_written_off")
            .order_by(AuditEntry.id)
        ).all()
    filed = _entry_parcels(scratch)
    [b_parcel, _c_parcel] = later.values()
    assert [filed.get(entry) for entry in entries] == [a_parcels, {b_parcel}]
    with scratch.begin() as connection:  # as the version before left them
        connection.execute(delete(AuditEntryParcel).where(AuditEntryParcel.entry_id.in_(entries)))
    assert not set(entries) & set(_entry_parcels(scratch))

    migrate.upgrade(scratch, WRITE_OFFS_BY_PARCEL)

    assert _entry_parcels(scratch) == filed
    with scratch.begin() as connection:  # stopped before its revision was recorded
        connection.execute(
            text("UPDATE alembic_version SET version_num = :v"), {"v": PURGES_BY_PARCEL}
        )
    migrate.upgrade(scratch, WRITE_OFFS_BY_PARCEL)
    assert _entry_parcels(scratch) == filed
    with Session(scratch) as session:
        assert audit.verify(session=session).ok
        assert entries[1] in {
            e.id for e in audit.list_entries(session=session, tracking_no=b_parcel)
        }


BACKFILLED_ENTRIES = 25_000  # two full batches of 10,000 and a part of one


@pytest.mark.postgres_only
def test_the_audit_backfill_runs_in_committed_batches(scratch: Engine) -> None:
    """The log takes every audited action's append: the backfill writes at most 10,000
    entries a statement, with no transaction held open between them, and each entry
    gets its parcel."""
    migrate.upgrade(scratch, BEFORE_AUDIT_BY_PARCEL)
    with scratch.begin() as connection:  # proofs read, a third of them of no parcel
        connection.execute(
            text(
                "INSERT INTO audit_entry (id, at, action, subject_type, subject_key, details, "
                "prev_hash, entry_hash) "
                "SELECT n, timestamptz '2026-11-20 09:00+00' + n * interval '1 s', "
                "'proof_read', 'proof', n::text, "
                "CASE WHEN n % 3 = 0 THEN '{}'::jsonb "
                "ELSE jsonb_build_object('tracking_no', 'P' || (n * 7)::text) END, "
                "lpad(to_hex(n), 64, '0'), lpad(to_hex(n + 1), 64, '0') "
                "FROM generate_series(1, :count) AS n"
            ),
            {"count": BACKFILLED_ENTRIES},
        )
    written, open_between = _updates_upgrading(
        scratch, AUDIT_BY_PARCEL, "UPDATE audit_entry SET tracking_no"
    )
    assert len(written) == 3 and max(written) <= 10_000, written
    assert sum(written) == BACKFILLED_ENTRIES - BACKFILLED_ENTRIES // 3
    assert not any(open_between), open_between  # autocommit: committed as it ran
    with scratch.connect() as connection:
        wrong = connection.scalar(
            text(
                "SELECT count(*) FROM audit_entry WHERE tracking_no IS DISTINCT FROM "
                "CASE WHEN id % 3 = 0 THEN NULL ELSE 'P' || (id * 7)::text END"
            )
        )
    assert wrong == 0


QUARANTINE_BY_PARCEL = "effb064af2ab"  # rejected events keep the parcel they name, normalized
BEFORE_QUARANTINE_BY_PARCEL = "a7d3e9f1c5b2"  # lost seqs written off
NAME_QUARANTINE_BY_PARCEL = "ix_quarantined_event_parcel"
NAME_QUARANTINE_AS_WRITTEN = "ix_quarantined_event_tracking_no"  # the one it replaces
# Numbers as PDAs wrote them into rejected events, by row id, and the parcel each names:
# what ``sync.tracking.normalize`` reads in them (NFKC, Unicode white space, dashes,
# upper case beyond ASCII), which no SQL of both backends says alike.
WRITTEN_BEFORE: dict[int, tuple[str | None, str | None]] = {
    1: ("rr 4731 2482 9gb", "RR473124829GB"),
    2: ("RR-4731-2482-9GB", "RR473124829GB"),
    3: ("ＲＲ４７３１２４８２９ＧＢ", "RR473124829GB"),  # full-width, an East Asian keyboard
    4: ("rr\u00a04731\u20032482\u30009gb", "RR473124829GB"),  # no-break, em, ideographic
    5: ("RR473124829\x1cGB", "RR473124829GB"),  # a separator Python's \s matches
    6: ("sf1300000000001", "SF1300000000001"),
    7: ("zé-1", "ZÉ1"),  # not a number a parcel has: still what normalize makes of it
    8: (" - ", None),  # nothing left
    9: ("\u337f" * 11, None),  # ㍿ is four characters in NFKC: 44, over the column's 40
    10: (None, None),  # the PDA sent none
}


def _quarantine_before(engine: Engine, written: dict[int, tuple[str | None, str | None]]) -> None:
    """Rejected events kept as the version before kept them: the number as written only."""
    import datetime as dt
    import uuid

    from sqlalchemy.orm import Session

    from models import SyncBatch
    from tests import factories

    _device_moved_at_running_code_writes(engine)
    with Session(engine) as session:
        if session.get(SyncBatch, 1) is None:
            station = factories.station(session)
            courier = factories.user(session, "courier1", "courier", station)
            factories.device(session, "PDA-0001", station)
            at = dt.datetime(2026, 11, 20, 9, 0, tzinfo=dt.UTC)
            session.add(
                SyncBatch(
                    id=1, device_id="PDA-0001", batch_id=uuid.uuid4(), station_id=station.id,
                    courier_id=courier.id, sent_at=at, received_at=at, clock_offset_ms=0,
                    event_count=len(written), request_hash="0" * 64, receipt={},
                )
            )  # fmt: skip
        session.commit()
        station_id = session.scalar(text("SELECT id FROM station"))
    with engine.begin() as connection:
        for row_id, (tracking_no, _) in written.items():
            connection.execute(
                text(
                    "INSERT INTO quarantined_event (id, station_id, device_id, batch_pk, "
                    "position, seq, event_type, tracking_no, error_code, message, payload, "
                    "payload_hash, received_at) VALUES (:id, :station, 'PDA-0001', 1, :id, "
                    "NULL, 'delivered_to_locker', :tn, 'missing_field', 'locker_id is "
                    "required', :payload, :hash, '2026-11-20 09:00:00+00')"
                ),
                {
                    "id": row_id,
                    "station": station_id,
                    "tn": tracking_no,
                    "payload": json.dumps({"tracking_no": tracking_no}),
                    "hash": f"{row_id:064d}",
                },
            )


def _parcels_of_rejected(engine: Engine) -> dict[int, str | None]:
    with engine.connect() as connection:
        return dict(
            connection.execute(text("SELECT id, parcel_tracking_no FROM quarantined_event")).all()
        )


def test_a_rejected_event_gets_the_parcel_its_number_names_as_the_app_normalizes_it(
    scratch: Engine,
) -> None:
    """Each rejected event kept before gets what running code sets on insert
    (``sync.quarantine.parcel_named`` of the number as written): the migration's frozen
    copy computes the same on both backends, and a parcel's rejected events are then
    found by its number however their PDA wrote it."""
    from sqlalchemy.orm import Session

    from sync.quarantine import list_quarantined, parcel_named

    migrate.upgrade(scratch, BEFORE_QUARANTINE_BY_PARCEL)
    _quarantine_before(scratch, WRITTEN_BEFORE)
    migrate.upgrade(scratch, QUARANTINE_BY_PARCEL)
    filled = _parcels_of_rejected(scratch)
    assert filled == {row_id: parcel for row_id, (_, parcel) in WRITTEN_BEFORE.items()}
    assert filled == {row_id: parcel_named(tn) for row_id, (tn, _) in WRITTEN_BEFORE.items()}
    migrate.upgrade(scratch)
    with Session(scratch) as session:
        found = list_quarantined(session=session, station_id=None, tracking_no="RR473124829GB")
        assert [row.id for row, _ in found] == [5, 4, 3, 2, 1]
    with scratch.connect() as connection:
        indexes = {i["name"] for i in inspect(connection).get_indexes("quarantined_event")}
    assert NAME_QUARANTINE_BY_PARCEL in indexes and NAME_QUARANTINE_AS_WRITTEN not in indexes
    migrate.downgrade(scratch, BEFORE_QUARANTINE_BY_PARCEL)
    with scratch.connect() as connection:
        indexes = {i["name"] for i in inspect(connection).get_indexes("quarantined_event")}
        columns = {c["name"] for c in inspect(connection).get_columns("quarantined_event")}
    assert NAME_QUARANTINE_AS_WRITTEN in indexes and NAME_QUARANTINE_BY_PARCEL not in indexes
    assert "parcel_tracking_no" not in columns


def test_rejected_events_by_parcel_runs_again_after_its_index_build_failed(
    scratch: Engine,
) -> None:
    """As the flags': an upgrade stopped by a failed index build runs again to the end,
    each rejected event with its parcel, one the new version quarantined meanwhile with
    the one it set and one the version before quarantined with the one its number names;
    the index on the number as written is dropped only once the new one is built."""

    migrate.upgrade(scratch, BEFORE_QUARANTINE_BY_PARCEL)
    _quarantine_before(scratch, {n: WRITTEN_BEFORE[n] for n in (1, 2, 8)})
    expected = {1: "RR473124829GB", 2: "RR473124829GB", 8: None}

    columns = upgrade_stopped_by_index_build(
        scratch,
        QUARANTINE_BY_PARCEL,
        BEFORE_QUARANTINE_BY_PARCEL,
        NAME_QUARANTINE_BY_PARCEL,
        table="quarantined_event",
    )
    if scratch.dialect.name == "postgresql":
        assert "parcel_tracking_no" in columns
        assert _index_valid(scratch, NAME_QUARANTINE_BY_PARCEL) is False
        assert _index_valid(scratch, NAME_QUARANTINE_AS_WRITTEN) is True  # still read
        assert _parcels_of_rejected(scratch) == expected  # the backfill committed
        _quarantine_before(scratch, {n: WRITTEN_BEFORE[n] for n in (3, 6)})  # both versions
        with scratch.begin() as connection:
            connection.execute(
                text("UPDATE quarantined_event SET parcel_tracking_no = 'SF1' WHERE id = 6")
            )
        expected |= {3: "RR473124829GB", 6: "SF1"}  # what the new version set is kept
    else:
        assert "parcel_tracking_no" not in columns  # rolled back with the rest

    migrate.upgrade(scratch, QUARANTINE_BY_PARCEL)
    with scratch.connect() as connection:
        assert migrate.current_revisions(connection) == {QUARANTINE_BY_PARCEL}
    assert _parcels_of_rejected(scratch) == expected
    if scratch.dialect.name == "postgresql":
        assert _index_valid(scratch, NAME_QUARANTINE_BY_PARCEL) is True
        assert _index_valid(scratch, NAME_QUARANTINE_AS_WRITTEN) is None


BACKFILLED_REJECTIONS = 25_000  # two thirds name a parcel: a batch of 10,000 and a part of one


@pytest.mark.postgres_only
def test_the_quarantine_backfill_runs_in_committed_batches(scratch: Engine) -> None:
    """Every push that rejects an event inserts into the quarantine: the backfill writes
    at most 10,000 rows a statement, with no transaction held open between them, and
    each row gets its parcel (a third of them named none)."""
    migrate.upgrade(scratch, BEFORE_QUARANTINE_BY_PARCEL)
    _quarantine_before(scratch, {})
    with scratch.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO quarantined_event (id, station_id, device_id, batch_pk, position, "
                "tracking_no, error_code, message, payload, payload_hash, received_at) "
                "SELECT n, (SELECT id FROM station), 'PDA-0001', 1, n, "
                "CASE WHEN n % 3 = 0 THEN NULL ELSE 'rr ' || lpad(n::text, 9, '0') || ' gb' "
                "END, 'missing_field', 'locker_id is required', '{}', lpad(to_hex(n), 64, '0'), "
                "timestamptz '2026-11-20 09:00+00' FROM generate_series(1, :count) AS n"
            ),
            {"count": BACKFILLED_REJECTIONS},
        )
    written, open_between = _updates_upgrading(
        scratch, QUARANTINE_BY_PARCEL, "UPDATE quarantined_event"
    )
    named = BACKFILLED_REJECTIONS - BACKFILLED_REJECTIONS // 3
    assert len(written) == 2 and max(written) <= 10_000, written  # 10,000 and the rest
    assert sum(written) == named
    assert not any(open_between), open_between  # autocommit: committed as it ran
    with scratch.connect() as connection:
        wrong = connection.scalar(
            text(
                "SELECT count(*) FROM quarantined_event WHERE parcel_tracking_no IS DISTINCT "
                "FROM CASE WHEN id % 3 = 0 THEN NULL ELSE 'RR' || lpad(id::text, 9, '0') "
                "|| 'GB' END"
            )
        )
    assert wrong == 0


SEQS_AS_TEXT = "f1c7a3e9b5d2"  # rejected events keep a seq their PDA wrote as text
# The seq of rejected events as their PDAs sent it, by row id, and what the row keeps:
# what ``sync.events.readable_seq`` reads in it on insert now.
SEQS_SENT: dict[int, tuple[Any, int | None]] = {
    1: ("2", 2),
    2: (" 7 ", 7),
    3: ("7.0", 7),
    4: ("0012", 12),
    5: ("five", None),
    6: (None, None),
    7: (5.5, None),
    8: ("\u0662", None),  # an Arabic-Indic two: not a seq a PDA writes
    9: ("-3", None),
    10: (str(2**31), None),  # beyond the column's integer
    11: (True, None),
    12: (3.0, 3),  # a whole number with a fraction, kept with none by an older version
}


def _quarantine_with_seqs(engine: Engine, payloads: dict[int, Any]) -> None:
    """Rejected events kept as versions before kept them: no seq, the event as received."""
    _quarantine_before(engine, {})
    with engine.begin() as connection:
        for row_id, payload in payloads.items():
            connection.execute(
                text(
                    "INSERT INTO quarantined_event (id, station_id, device_id, batch_pk, "
                    "position, seq, error_code, message, payload, payload_hash, received_at) "
                    "VALUES (:id, (SELECT id FROM station), 'PDA-0001', 1, :id, NULL, "
                    "'invalid_seq', 'seq must be an integer', :payload, :hash, "
                    "'2026-11-20 09:00:00+00')"
                ),
                {"id": row_id, "payload": payload, "hash": f"{row_id:064d}"},
            )


def _seqs_of_rejected(engine: Engine) -> dict[int, int | None]:
    with engine.connect() as connection:
        return dict(connection.execute(text("SELECT id, seq FROM quarantined_event")).all())


def test_a_rejected_event_gets_the_seq_its_pda_wrote_as_text(scratch: Engine) -> None:
    """Each rejected event kept with no seq gets the seq running code reads in the event
    as received (``sync.events.readable_seq``), on both backends: a quoted whole number
    names one, anything else none. A seq nested deeper, a payload not an object and a
    row already holding a seq are left alone; run again, the same end; downgraded, the
    seqs stay. The station's quarantine then lists the event at its seq."""
    from sqlalchemy.orm import Session

    from sync.events import readable_seq
    from sync.quarantine import list_quarantined

    migrate.upgrade(scratch, CONSENT_EXPIRIES)
    payloads = {
        row_id: json.dumps({"seq": sent, "type": "checked_out"}, sort_keys=True)
        for row_id, (sent, _) in SEQS_SENT.items()
    }
    payloads |= {
        20: json.dumps({"location": {"seq": "3"}}),  # not the event's seq
        21: json.dumps(["seq", "4"]),  # not an object
        22: json.dumps({"seq": "5"}),  # a row that keeps a seq of its own
        23: json.dumps({"seq": "6"})[:-3],  # not JSON (cut short)
    }
    _quarantine_with_seqs(scratch, payloads)
    with scratch.begin() as connection:
        connection.execute(text("UPDATE quarantined_event SET seq = 9 WHERE id = 22"))
    expected = {row_id: seq for row_id, (_, seq) in SEQS_SENT.items()}
    expected |= {20: None, 21: None, 22: 9, 23: None}
    assert expected == {
        **{row_id: readable_seq(sent) for row_id, (sent, _) in SEQS_SENT.items()},
        **{n: expected[n] for n in (20, 21, 22, 23)},
    }

    migrate.upgrade(scratch, SEQS_AS_TEXT)
    assert _seqs_of_rejected(scratch) == expected
    with scratch.begin() as connection:  # stopped before its revision was recorded
        connection.execute(
            text("UPDATE alembic_version SET version_num = :v"), {"v": CONSENT_EXPIRIES}
        )
    migrate.upgrade(scratch, SEQS_AS_TEXT)
    assert _seqs_of_rejected(scratch) == expected
    migrate.upgrade(scratch)
    with Session(scratch) as session:
        listed = {row.id: row.seq for row, _ in list_quarantined(session=session, station_id=None)}
    assert listed == expected
    migrate.downgrade(scratch, CONSENT_EXPIRIES)
    assert _seqs_of_rejected(scratch) == expected


def test_rejected_events_get_their_seqs_batch_by_batch(scratch: Engine) -> None:
    """More rows than one statement writes (``BATCH``, 1,000), among rows naming no
    readable seq: each batch goes on from where the one before ended, none left out at
    a batch's edge; on PostgreSQL no transaction is held open between them."""
    migrate.upgrade(scratch, CONSENT_EXPIRIES)
    count = 2_500
    payloads = {
        n: json.dumps({"seq": str(n) if n % 3 else "n/a", "tracking_no": "RR473124829GB"})
        for n in range(1, count + 1)
    }
    _quarantine_with_seqs(scratch, payloads)
    if scratch.dialect.name == "postgresql":
        written, open_between = _updates_upgrading(
            scratch, SEQS_AS_TEXT, "UPDATE quarantined_event"
        )
        assert len(written) == 3 and max(written) <= 1_000, written
        assert sum(written) == count - count // 3
        assert not any(open_between), open_between  # autocommit: committed as it ran
    else:  # the upgrade's one transaction
        migrate.upgrade(scratch, SEQS_AS_TEXT)
    assert _seqs_of_rejected(scratch) == {n: n if n % 3 else None for n in payloads}


SHIFTS_BY_DECLARED_SEQS = "c4e8a1f6d273"  # a PDA's sign-in reads one entry of its shifts
DECLARED_SEQ_INDEXES = ["ix_shift_device_last_seq", "ix_shift_device_first_seq"]


@pytest.mark.postgres_only
def test_the_declared_seq_indexes_are_built_and_dropped_concurrently(scratch: Engine) -> None:
    """As the unfiled events' index: built without holding a close or an opening back
    (a SHARE lock on shift), and an INVALID one left by a failed build built again."""
    migrate.upgrade(scratch, QUARANTINE_BY_PARCEL)
    with index_build_fails(scratch, DECLARED_SEQ_INDEXES[1], table="shift"):
        with pytest.raises(OperationalError):
            migrate.upgrade(scratch, SHIFTS_BY_DECLARED_SEQS)
    assert _index_valid(scratch, DECLARED_SEQ_INDEXES[0]) is True
    assert _index_valid(scratch, DECLARED_SEQ_INDEXES[1]) is False

    with statements(scratch) as upgrading:
        migrate.upgrade(scratch, SHIFTS_BY_DECLARED_SEQS)
    created = [s for s in upgrading if s.startswith("CREATE INDEX")]
    assert [s.startswith("CREATE INDEX CONCURRENTLY") for s in created] == [True] * 2, created
    assert [_index_valid(scratch, name) for name in DECLARED_SEQ_INDEXES] == [True, True]

    with statements(scratch) as downgrading:
        migrate.downgrade(scratch, QUARANTINE_BY_PARCEL)
    dropped = [s for s in downgrading if s.startswith("DROP INDEX")]
    assert [s.startswith("DROP INDEX CONCURRENTLY") for s in dropped] == [True] * 2, dropped
    assert [_index_valid(scratch, name) for name in DECLARED_SEQ_INDEXES] == [None, None]


CLIENT_CONSENT_IDS = "c4e8a1f3d7b9"  # consents keep the recording channel's own id
NAME_CLIENT_CONSENT_IDS = "ix_consent_client_consent_id"


def test_consents_keep_the_channels_id_runs_again_after_its_index_build_failed(
    scratch: Engine,
) -> None:
    """An upgrade stopped by a failed build of the unique index runs again to the end
    (PostgreSQL committed the column first: no DuplicateColumn), and the index then
    holds: one channel's id names one consent of that channel's, another channel may
    use it too, and consents without one are not limited."""
    import datetime as dt

    from sqlalchemy.orm import Session

    from tests import factories

    migrate.upgrade(scratch, SHIFTS_BY_DECLARED_SEQS)
    columns = upgrade_stopped_by_index_build(
        scratch,
        CLIENT_CONSENT_IDS,
        SHIFTS_BY_DECLARED_SEQS,
        NAME_CLIENT_CONSENT_IDS,
        table="consent",
    )
    if scratch.dialect.name == "postgresql":
        assert "client_consent_id" in columns
        assert _index_valid(scratch, NAME_CLIENT_CONSENT_IDS) is False
    else:
        assert "client_consent_id" not in columns  # rolled back with the rest
    migrate.upgrade(scratch, CLIENT_CONSENT_IDS)
    with scratch.connect() as connection:
        assert migrate.current_revisions(connection) == {CLIENT_CONSENT_IDS}
    if scratch.dialect.name == "postgresql":
        assert _index_valid(scratch, NAME_CLIENT_CONSENT_IDS) is True

    with Session(scratch) as session:
        users = [factories.user(session, name, "integration").id for name in ("sms", "app")]
        session.commit()
    insert = text(
        "INSERT INTO consent (scope, method, channel, granted_at, created_at, created_by, "
        "client_consent_id) VALUES ('standing', 'any', 'sms', :at, :at, :by, :cid)"
    )
    at = dt.datetime(2026, 12, 1, 9, 0)
    with scratch.begin() as connection:
        for by, cid in [(users[0], "m-1"), (users[1], "m-1"), (users[0], None), (users[0], None)]:
            connection.execute(insert, {"at": at, "by": by, "cid": cid})
    with pytest.raises(IntegrityError), scratch.begin() as connection:
        connection.execute(insert, {"at": at, "by": users[0], "cid": "m-1"})


ADDRESS_KEYS = "d5f9b2a4e8c1"  # standing consents' keys ignore spaces beside Chinese


def test_standing_consents_get_the_address_key_running_code_computes(scratch: Engine) -> None:
    """Each consent with an address gets the key ``sync.consents.address_key`` gives it
    now (the migration's frozen copy computes the same), in batches; one without an
    address is left alone; the downgrade gives back the spaced keys."""
    import datetime as dt

    from sync.consents import address_key

    addresses = {
        1: "北京市 朝阳区 建国路 1 号",
        2: "1  CENTURY ave.",
        3: "上海市浦东新区世纪大道100号 A座",
        4: None,
    }
    before = {
        1: "北京市 朝阳区 建国路 1 号",
        2: "1 century ave",
        3: "上海市浦东新区世纪大道100号 a座",
    }
    migrate.upgrade(scratch, CLIENT_CONSENT_IDS)
    with scratch.begin() as connection:
        for consent_id, address in addresses.items():
            connection.execute(
                text(
                    "INSERT INTO consent (id, scope, method, channel, granted_at, created_at, "
                    "address, address_key) VALUES (:id, 'standing', 'any', 'app', :at, :at, "
                    ":address, :key)"
                ),
                {
                    "id": consent_id,
                    "at": dt.datetime(2026, 12, 1, 9, 0),
                    "address": address,
                    "key": before.get(consent_id),
                },
            )

    def keys() -> dict[int, str | None]:
        with scratch.connect() as connection:
            return dict(connection.execute(text("SELECT id, address_key FROM consent")).all())

    migrate.upgrade(scratch, ADDRESS_KEYS)
    assert keys() == {i: address_key(a) if a else None for i, a in addresses.items()}
    assert keys()[1] == "北京市朝阳区建国路1号" and keys()[2] == "1 century ave"
    migrate.downgrade(scratch, CLIENT_CONSENT_IDS)
    assert keys() == {**before, 4: None}


CLIENT_REQUEST_IDS = "e7a3c5d1f9b4"  # online consent requests keep the PDA's own id
NAME_CLIENT_REQUEST_IDS = "ix_consent_request_client_request_id"


def test_consent_requests_keep_the_pdas_id_runs_again_after_its_index_build_failed(
    scratch: Engine,
) -> None:
    """As the consents' channel id: an upgrade stopped by a failed build of the unique
    index runs again to the end, and the index then holds one PDA's id to one request."""
    import datetime as dt
    import uuid

    from sqlalchemy.orm import Session

    from tests import factories

    migrate.upgrade(scratch, ADDRESS_KEYS)
    _device_moved_at_running_code_writes(scratch)
    columns = upgrade_stopped_by_index_build(
        scratch,
        CLIENT_REQUEST_IDS,
        ADDRESS_KEYS,
        NAME_CLIENT_REQUEST_IDS,
        table="consent_request",
    )
    if scratch.dialect.name == "postgresql":
        assert "client_request_id" in columns
        assert _index_valid(scratch, NAME_CLIENT_REQUEST_IDS) is False
    else:
        assert "client_request_id" not in columns  # rolled back with the rest
    migrate.upgrade(scratch, CLIENT_REQUEST_IDS)
    with scratch.connect() as connection:
        assert migrate.current_revisions(connection) == {CLIENT_REQUEST_IDS}
    if scratch.dialect.name == "postgresql":
        assert _index_valid(scratch, NAME_CLIENT_REQUEST_IDS) is True

    with Session(scratch) as session:
        station = factories.station(session)
        courier = factories.user(session, "courier1", "courier", station)
        for device_id in ("PDA-1", "PDA-2"):
            factories.device(session, device_id, station)
        session.commit()
        station_id, courier_id = station.id, courier.id
    insert = text(
        "INSERT INTO consent_request (station_id, tracking_no, courier_id, device_id, "
        "client_request_id, method, requested_at, expires_at, status, created_at) VALUES "
        "(:station, 'RR473124829GB', :courier, :device, :cid, 'locker', :at, :at, "
        "'pending', :at)"
    )
    same = uuid.uuid4().hex
    rows = [("PDA-1", same), ("PDA-2", same), ("PDA-1", None), ("PDA-1", None)]
    at = dt.datetime(2026, 12, 1, 9, 0)
    with scratch.begin() as connection:
        for device, cid in rows:
            values = {"station": station_id, "courier": courier_id, "at": at}
            connection.execute(insert, {**values, "device": device, "cid": cid})
    with pytest.raises(IntegrityError), scratch.begin() as connection:
        values = {"station": station_id, "courier": courier_id, "at": at}
        connection.execute(insert, {**values, "device": "PDA-1", "cid": same})


REKEYED_CONSENTS = 2_500  # two batches of 1,000 and a part of one


@pytest.mark.postgres_only
def test_the_address_rekeying_runs_in_committed_batches(scratch: Engine) -> None:
    """A revocation of a standing consent waits for no more than one batch of the
    rekeying: its UPDATEs hold no transaction open between batches, and each consent
    whose key keeps a space beside a Chinese character gets the key the code computes
    (the others are not written)."""
    from sync.consents import address_key

    migrate.upgrade(scratch, CLIENT_CONSENT_IDS)
    with scratch.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO consent (id, scope, method, channel, granted_at, created_at, "
                "recipient_phone, address, address_key) "
                "SELECT n, 'standing', 'any', 'app', t, t, '+8613800000000', a, a "
                "FROM generate_series(1, :count) AS n, "
                "LATERAL (SELECT timestamptz '2026-12-01 09:00+00' AS t, "
                "CASE WHEN n % 5 = 0 THEN n::text || ' century ave' "
                "ELSE '建国路 ' || n::text || ' 号' END AS a) AS v"
            ),
            {"count": REKEYED_CONSENTS},
        )
    written, open_between = _updates_upgrading(
        scratch, ADDRESS_KEYS, "UPDATE consent SET address_key"
    )
    assert sum(written) == REKEYED_CONSENTS - REKEYED_CONSENTS // 5, written
    assert not any(open_between), open_between  # autocommit: committed as it ran
    with scratch.connect() as connection:
        rows = connection.execute(text("SELECT address, address_key FROM consent")).all()
    assert [a for a, key in rows if key != address_key(a)] == []


REQUESTS_READ_REVOKED = "b6d2f8a4c1e7"  # a request reads revoked once its consent is


def test_a_granted_request_whose_consent_was_revoked_reads_revoked(scratch: Engine) -> None:
    """Of two granted requests, the one whose consent was revoked takes status
    ``revoked`` and the consent's ``revoked_at``; the other, and a pending one, stay as
    they were. The downgrade gives it back ``granted`` (the old CHECK allows nothing
    else)."""
    import datetime as dt

    from sqlalchemy.orm import Session

    from tests import factories

    migrate.upgrade(scratch, CLIENT_REQUEST_IDS)
    with Session(scratch) as session:
        station = factories.station(session)
        courier = factories.user(session, "courier1", "courier", station)
        session.commit()
        station_id, courier_id = station.id, courier.id
    granted_at = dt.datetime(2026, 12, 1, 9, 0)
    revoked_at = dt.datetime(2026, 12, 1, 11, 0)
    with scratch.begin() as connection:
        for consent_id, revoked in ((1, revoked_at), (2, None)):
            connection.execute(
                text(
                    "INSERT INTO consent (id, scope, method, channel, granted_at, created_at, "
                    "tracking_no, revoked_at) VALUES (:id, 'parcel', 'locker', 'sms', :at, "
                    ":at, 'RR473124829GB', :revoked)"
                ),
                {"id": consent_id, "at": granted_at, "revoked": revoked},
            )
        for request_id, status, consent_id in (
            (1, "granted", 1),
            (2, "granted", 2),
            (3, "pending", None),
        ):
            connection.execute(
                text(
                    "INSERT INTO consent_request (id, station_id, tracking_no, courier_id, "
                    "method, requested_at, expires_at, status, consent_id, created_at) VALUES "
                    "(:id, :station, 'RR473124829GB', :courier, 'locker', :at, :at, :status, "
                    ":consent, :at)"
                ),
                {
                    "id": request_id,
                    "station": station_id,
                    "courier": courier_id,
                    "at": granted_at,
                    "status": status,
                    "consent": consent_id,
                },
            )

    def requests(columns: str = "status") -> dict[int, Any]:
        with scratch.connect() as connection:
            query = text(f"SELECT id, {columns} FROM consent_request")
            return {row[0]: tuple(row[1:]) for row in connection.execute(query)}

    migrate.upgrade(scratch, REQUESTS_READ_REVOKED)
    found = requests("status, revoked_at")
    assert {i: status for i, (status, _) in found.items()} == {
        1: "revoked",
        2: "granted",
        3: "pending",
    }
    assert found[1][1] is not None and found[2][1] is None
    migrate.downgrade(scratch, CLIENT_REQUEST_IDS)
    assert {i: status for i, (status,) in requests().items()} == {
        1: "granted",
        2: "granted",
        3: "pending",
    }


DELIVERIES_SKIPPED = "c9e4a2d7f5b3"  # webhook deliveries may be skipped, with why
POINT_IDS = "d8a5f1c3e6b9"  # locker and pickup-point ids trimmed and upper-case


def test_point_ids_are_rewritten_upper_case_and_a_resent_event_stays_a_duplicate(
    scratch: Engine,
) -> None:
    """Consents, requests and drops the version before stored with a point id in lower
    case get it upper-case, as the code now writes it; a drop's ``content_hash`` is
    computed again, as the code computes it, so that the PDA re-sending the drop as it
    first sent it (lower case) is a duplicate, not a conflicting duplicate; a row
    already upper-case is not written."""
    import datetime as dt
    import uuid
    from dataclasses import replace

    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from models import Consent, ConsentRequest, ScanEvent
    from sync.events import EventRules, validate_event
    from sync.ingest import IngestRules, PushBatch, Pusher, ingest
    from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy
    from tests import factories

    migrate.upgrade(scratch, DELIVERIES_SKIPPED)
    _columns_running_code_reads(scratch)
    _device_moved_at_running_code_writes(scratch)
    rules = IngestRules(
        events=EventRules(tracking=TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS))
    )
    at = dt.datetime(2026, 12, 1, 9, 0, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    with Session(scratch, expire_on_commit=False) as session:
        station = factories.station(session)
        courier = factories.user(session, "courier1", "courier", station)
        device = factories.device(session, "PDA-1", station)
        parcel = factories.parcel(session, station).tracking_no
        session.commit()
        pusher = Pusher(device.id, station.id, courier.id)
        sent = [
            factories.event(
                1,
                parcel,
                "delivered_to_pickup_point",
                occurred_at=at,
                point_id="pp-12",
                location={"lat": 31.2304, "lon": 121.4737, "accuracy_m": 8.5},
            ),
            factories.event(
                2,
                parcel,
                "consent_captured",
                occurred_at=at,
                consent={"method": "locker", "point_id": "L-3", "channel": "sms"},
            ),
        ]

        def push(events: list[dict[str, Any]]) -> dict[str, Any]:
            receipt = ingest(
                session=session,
                batch=PushBatch(device.id, uuid.uuid4(), at, events),
                pusher=pusher,
                rules=rules,
                received_at=at,
            )
            session.commit()
            return receipt

        push(sent)
        # As the version before stored them: the point as sent, hashed so.
        drop = session.scalars(select(ScanEvent).where(ScanEvent.seq == 1)).one()
        valid = validate_event(sent[0], rules=rules.events)
        as_before = replace(valid, details={**valid.details, "point_id": "pp-12"})
        drop.details = as_before.details
        drop.content_hash = as_before.content_hash
        session.add(
            Consent(
                scope="parcel",
                station_id=station.id,
                tracking_no=parcel,
                method="pickup_point",
                point_id="pp-12",
                channel="app",
                granted_at=at,
                created_at=at,
            )
        )
        # Core, naming only the columns of this version (later ones add others).
        session.execute(
            insert(ConsentRequest.__table__).values(
                station_id=station.id,
                tracking_no=parcel,
                courier_id=courier.id,
                method="locker",
                point_id="l-3",
                requested_at=at,
                expires_at=at,
                created_at=at,
            )
        )
        session.commit()
        untouched = session.scalars(select(ScanEvent).where(ScanEvent.seq == 2)).one()
        untouched_hash = untouched.content_hash

    migrate.upgrade(scratch, POINT_IDS)
    with Session(scratch) as session:
        drop = session.scalars(select(ScanEvent).where(ScanEvent.seq == 1)).one()
        assert drop.details["point_id"] == "PP-12"
        assert drop.content_hash == valid.content_hash  # as the code hashes it now
        assert session.scalars(select(ScanEvent.content_hash).where(ScanEvent.seq == 2)).one() == (
            untouched_hash
        )
        assert session.scalars(select(Consent.point_id)).all() == ["L-3", "PP-12"]
        assert session.scalars(select(ConsentRequest.point_id)).all() == ["L-3"]
        receipt = ingest(
            session=session,
            batch=PushBatch("PDA-1", uuid.uuid4(), at, [sent[0]]),
            pusher=Pusher("PDA-1", drop.station_id, drop.courier_id),
            rules=rules,
            received_at=at,
        )
        assert [r["status"] for r in receipt["results"]] == ["duplicate"], receipt


@pytest.mark.postgres_only
def test_a_migration_waiting_for_a_lock_gives_up_and_tries_again(scratch: Engine) -> None:
    """A migration's statement waits at most the lock timeout for a table that a
    transaction holds (an audit entry appended, not yet committed), instead of holding
    every append queued behind it; the upgrade then tries again from that migration and
    goes to the end once the transaction has ended."""
    migrate.upgrade(scratch, POINT_IDS)
    blocker = scratch.connect()
    blocker.execute(text("LOCK TABLE audit_entry IN ROW EXCLUSIVE MODE"))  # as an append does
    retries: list[tuple[int, str]] = []

    def retrying(attempt: int, reason: str) -> None:
        retries.append((attempt, reason))
        if attempt == 2:
            blocker.rollback()  # the transaction ends

    try:
        migrate.upgrade(
            scratch,
            EVERY_PARCEL,
            lock_timeout_seconds=0.2,
            attempts=5,
            pause_seconds=0,
            on_retry=retrying,
        )
    finally:
        blocker.close()
    assert [attempt for attempt, _ in retries] == [1, 2]
    assert all("lock timeout" in reason for _, reason in retries)
    with scratch.connect() as connection:
        assert migrate.current_revisions(connection) == {EVERY_PARCEL}


@pytest.mark.postgres_only
def test_an_upgrade_out_of_attempts_stops_where_it_waited_and_says_so(
    scratch: Engine, tmp_path: Path
) -> None:
    """``db upgrade`` whose every attempt gave up waiting says, in one line, that the
    migrations before are committed and what to do; the database stays at the revision
    before the one that waited."""
    from courier_api.cli import courier_cli
    from courier_api.extensions import db
    from tests.conftest import make_test_app

    migrate.upgrade(scratch, POINT_IDS)
    app = make_test_app(scratch.url.render_as_string(hide_password=False), tmp_path)
    runner = app.test_cli_runner()
    with scratch.connect() as blocker:
        blocker.execute(text("LOCK TABLE audit_entry IN ROW EXCLUSIVE MODE"))
        try:
            result = runner.invoke(
                courier_cli(), ["db", "upgrade", "--lock-timeout", "0.2", "--attempts", "2"]
            )
        finally:
            db.engine_of(app).dispose()
        blocker.rollback()
    assert result.exit_code == 1, result.output
    assert "trying again in 0.2 s (attempt 2 of 2)" in result.output
    assert "gave up waiting for a lock" in result.output
    assert "migrations before it are committed" in result.output
    assert "Traceback" not in result.output
    with scratch.connect() as connection:
        assert migrate.current_revisions(connection) == {POINT_IDS}


@pytest.mark.postgres_only
def test_a_concurrent_index_build_waits_for_a_push_as_long_as_it_lasts(scratch: Engine) -> None:
    """A CONCURRENTLY build queues no push behind it, so the lock timeout is not for it:
    it waits for a transaction writing its table (a push, an export's long transaction)
    as it always did. With it, the build gave up after the timeout, left an INVALID
    index to drop and build again, and an upgrade on a busy station ran out of attempts
    where waiting would have held up no one."""
    import threading
    import time

    migrate.upgrade(scratch, HOT_INDEXES)
    failures: list[BaseException] = []
    with scratch.connect() as blocker:
        blocker.execute(text("LOCK TABLE scan_event IN ROW EXCLUSIVE MODE"))  # as a push does

        def upgrading() -> None:
            try:
                migrate.upgrade(
                    scratch, UNFILED_INDEX, lock_timeout_seconds=0.2, attempts=1, pause_seconds=0
                )
            except BaseException as error:  # handed to the test's thread
                failures.append(error)

        thread = threading.Thread(target=upgrading)
        thread.start()
        time.sleep(1.0)  # five lock timeouts
        blocker.rollback()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert failures == []
    with scratch.connect() as connection:
        assert migrate.current_revisions(connection) == {UNFILED_INDEX}
        assert connection.scalar(
            text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"),
            {"name": "ix_scan_event_unfiled"},
        )


@pytest.mark.postgres_only
def test_the_lock_timeout_is_set_back_before_the_connection_is_pooled(scratch: Engine) -> None:
    """The session's ``lock_timeout`` is the migrations' alone: the connection they ran on
    goes back to the pool with the server's default."""
    with migrate.migrating(scratch, lock_timeout_seconds=1.5) as connection:
        raw = connection.connection.driver_connection
        assert connection.scalar(text("SHOW lock_timeout")) == "1500ms"
        connection.rollback()
    assert raw.execute("SHOW lock_timeout").fetchone()[0] == "0"


@pytest.mark.postgres_only
def test_a_lock_timeout_set_in_a_transaction_rolled_back_is_set_again(scratch: Engine) -> None:
    """After a CONCURRENTLY build the session's lock_timeout is 0 (set in its autocommit
    block, so kept); the next statement sets the timeout again, inside its transaction.
    Rolled back, that transaction takes the SET with it: the session waits for ever
    again, while ``migrating`` believed the timeout in force and set nothing, so the
    next plain statement (an ALTER TABLE) would queue every push behind it for as long
    as the longest transaction lasts."""
    with migrate.migrating(scratch, lock_timeout_seconds=1.5) as connection:
        connection.execute(text("SELECT 'as CREATE INDEX CONCURRENTLY does'"))
        connection.commit()
        connection.execute(text("SELECT 1"))  # the timeout, set in this transaction
        connection.rollback()
        assert connection.scalar(text("SHOW lock_timeout")) == "1500ms"
        connection.rollback()


REQUESTS_ANNOUNCE_LAPSE = "f3b8d6a2c4e1"  # consent requests announce their lapse once


def test_requests_lapsed_before_the_upgrade_are_never_announced(scratch: Engine) -> None:
    """The pending requests that had lapsed before the version are marked as of their
    expiry, so that the lapse job does not announce months of old questions; a pending
    one still running, and an answered one, are left unmarked (the job reads only
    pending ones). The downgrade drops the column."""
    import datetime as dt

    from sqlalchemy.orm import Session

    from tests import factories

    migrate.upgrade(scratch, BY_THEIR_PARCELS)
    with Session(scratch) as session:
        station = factories.station(session)
        courier = factories.user(session, "courier1", "courier", station)
        session.commit()
        station_id, courier_id = station.id, courier.id
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)  # SQLite keeps naive UTC
    requested = {1: now - dt.timedelta(days=30), 2: now, 3: now - dt.timedelta(days=30)}
    with scratch.begin() as connection:
        for request_id, status in ((1, "pending"), (2, "pending"), (3, "refused")):
            connection.execute(
                text(
                    "INSERT INTO consent_request (id, station_id, tracking_no, courier_id, "
                    "method, requested_at, expires_at, status, created_at) VALUES "
                    "(:id, :station, 'RR473124829GB', :courier, 'locker', :at, :expires, "
                    ":status, :at)"
                ),
                {
                    "id": request_id,
                    "station": station_id,
                    "courier": courier_id,
                    "at": requested[request_id],
                    "expires": requested[request_id] + dt.timedelta(minutes=30),
                    "status": status,
                },
            )

    migrate.upgrade(scratch, REQUESTS_ANNOUNCE_LAPSE)
    with scratch.connect() as connection:
        marked = dict(
            connection.execute(
                text("SELECT id, lapse_announced_at IS NOT NULL FROM consent_request")
            ).all()
        )
        indexes = {i["name"] for i in inspect(connection).get_indexes("consent_request")}
    assert marked == {1: True, 2: False, 3: False}
    assert "ix_consent_request_unannounced_lapse" in indexes
    migrate.downgrade(scratch, BY_THEIR_PARCELS)
    with scratch.connect() as connection:
        columns = {c["name"] for c in inspect(connection).get_columns("consent_request")}
    assert "lapse_announced_at" not in columns


MARKED_REQUESTS = 25_000  # lapsed unanswered before the version: a station's history


@pytest.mark.postgres_only
def test_the_lapse_marking_runs_in_committed_batches_and_the_index_concurrently(
    scratch: Engine,
) -> None:
    """Every push that asks a recipient and every answer writes to ``consent_request``:
    the upgrade held its ACCESS EXCLUSIVE lock (the column) and its SHARE lock (a plain
    index build) through one UPDATE of every request that ever lapsed unanswered. The
    column is committed alone, the marking writes at most 10,000 requests a statement
    with no transaction open between them, and the index is built CONCURRENTLY."""
    import datetime as dt

    from sqlalchemy.orm import Session

    from tests import factories

    migrate.upgrade(scratch, BY_THEIR_PARCELS)
    with Session(scratch) as session:
        station = factories.station(session)
        courier = factories.user(session, "courier1", "courier", station)
        session.commit()
        station_id, courier_id = station.id, courier.id
    with scratch.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO consent_request (station_id, tracking_no, courier_id, method, "
                "requested_at, expires_at, status, created_at) SELECT :station, "
                "'RR473124829GB', :courier, 'locker', :at, :at + interval '30 minutes', "
                "CASE WHEN n % 5 = 0 THEN 'refused' ELSE 'pending' END, :at "
                "FROM generate_series(1, :count) AS n"
            ),
            {
                "station": station_id,
                "courier": courier_id,
                "at": dt.datetime(2026, 11, 1, 9, tzinfo=dt.UTC),
                "count": MARKED_REQUESTS,
            },
        )
    with statements(scratch) as upgrading:
        written, open_between = _updates_upgrading(
            scratch, REQUESTS_ANNOUNCE_LAPSE, "UPDATE consent_request"
        )
    assert sum(written) == MARKED_REQUESTS - MARKED_REQUESTS // 5
    assert len(written) == 3 and max(written) <= 10_000, written
    assert not any(open_between), open_between  # autocommit: committed as it ran
    created = [s for s in upgrading if s.startswith("CREATE INDEX")]
    assert [s.startswith("CREATE INDEX CONCURRENTLY") for s in created] == [True], created
    assert _index_valid(scratch, "ix_consent_request_unannounced_lapse") is True
    with statements(scratch) as downgrading:
        migrate.downgrade(scratch, BY_THEIR_PARCELS)
    dropped = [s for s in downgrading if s.startswith("DROP INDEX")]
    assert [s.startswith("DROP INDEX CONCURRENTLY") for s in dropped] == [True], dropped


def test_the_lapse_migration_runs_again_after_its_index_build_failed(scratch: Engine) -> None:
    """An upgrade stopped by a failed build of the partial index runs again to the end:
    on PostgreSQL the column and the marking were committed (no DuplicateColumn), the
    INVALID index is built anew; SQLite rolled back the whole version."""
    migrate.upgrade(scratch, BY_THEIR_PARCELS)
    columns = upgrade_stopped_by_index_build(
        scratch,
        REQUESTS_ANNOUNCE_LAPSE,
        BY_THEIR_PARCELS,
        "ix_consent_request_unannounced_lapse",
        table="consent_request",
    )
    assert ("lapse_announced_at" in columns) == (scratch.dialect.name == "postgresql")
    migrate.upgrade(scratch, REQUESTS_ANNOUNCE_LAPSE)
    with scratch.connect() as connection:
        assert migrate.current_revisions(connection) == {REQUESTS_ANNOUNCE_LAPSE}
    if scratch.dialect.name == "postgresql":
        assert _index_valid(scratch, "ix_consent_request_unannounced_lapse") is True


ANSWER_CHANNELS = "a9c4e2f7b1d3"  # consent requests keep how the recipient answered
CONSENT_EXPIRIES = "b3f8d1a6c9e2"  # consent requests keep their consent's expiry


def test_a_granted_request_gets_its_consents_expiry(scratch: Engine) -> None:
    """Dropping the column and adding it back fills it from each request's consent: an
    expiring one's expiry, a lasting one's none, and none for a request unanswered."""
    import datetime as dt

    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from models import (
        Consent,
        ConsentChannel,
        ConsentMethod,
        ConsentRequest,
        ConsentRequestStatus,
        ConsentScope,
    )
    from tests import factories

    migrate.upgrade(scratch)
    now = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)
    until = now + dt.timedelta(hours=2)
    with Session(scratch) as session:
        station = factories.station(session, code="ST1")
        courier = factories.user(session, "courier1", "courier", station)
        parcel = factories.parcel(session, station)
        for expires_at in (until, None, "unanswered"):
            consent = None
            if expires_at != "unanswered":
                consent = Consent(
                    scope=ConsentScope.PARCEL,
                    tracking_no=parcel.tracking_no,
                    method=ConsentMethod.LOCKER,
                    channel=ConsentChannel.SMS,
                    granted_at=now,
                    expires_at=expires_at,
                )
                session.add(consent)
                session.flush()
            session.add(
                ConsentRequest(
                    station_id=station.id,
                    tracking_no=parcel.tracking_no,
                    courier_id=courier.id,
                    method=ConsentMethod.LOCKER,
                    requested_at=now - dt.timedelta(minutes=5),
                    expires_at=now + dt.timedelta(minutes=25),
                    status=ConsentRequestStatus.GRANTED
                    if consent
                    else ConsentRequestStatus.PENDING,
                    consent_id=consent.id if consent else None,
                )
            )
        session.commit()
    kept = sa.select(ConsentRequest.consent_expires_at).order_by(ConsentRequest.id)
    migrate.downgrade(scratch, ANSWER_CHANNELS)
    migrate.upgrade(scratch, CONSENT_EXPIRIES)
    with scratch.connect() as connection:
        assert connection.execute(kept).scalars().all() == [until, None, None]


UPLOADS_BY_UPLOADER = "a9c3e5f7b1d2"  # uploads by uploader, by day
IMAGE_READS_BY_PARCEL = "d7e1a5c9b3f4"  # auditors' image reads by the parcels of their proofs


def _image_proofs(scratch: Engine, named: dict[str, tuple[str, Any]]) -> None:
    """Proofs naming images: each parcel of ``named`` (a station day's, at the version
    before) names its digest, its events received at the time given."""
    import sqlalchemy as sa

    from models import UTCDateTime

    received_at = text("UPDATE scan_event SET received_at = :r WHERE tracking_no = :t")
    received_at = received_at.bindparams(sa.bindparam("r", type_=UTCDateTime()))
    with scratch.begin() as connection:
        by_number = dict(connection.execute(text("SELECT tracking_no, id FROM scan_event")).all())
        for number, (sha256, received) in named.items():
            connection.execute(received_at, {"r": received, "t": number})
            connection.execute(
                text(
                    "INSERT INTO proof_image (event_id, sha256, tracking_no) VALUES (:e, :s, :t)"
                ),
                {"e": by_number[number], "s": sha256, "t": number},
            )


def _station_day_numbers(scratch: Engine, parcels: int) -> list[str]:
    import datetime as dt

    from sqlalchemy.orm import Session

    from tests import factories

    with Session(scratch) as session:
        factories.station_day(
            session, "ST1", shifts=1, parcels_per_shift=parcels, day=dt.date(2026, 11, 20)
        )
        session.commit()
    with scratch.connect() as connection:
        return sorted(connection.scalars(text("SELECT DISTINCT tracking_no FROM scan_event")))


def test_image_reads_written_before_get_the_parcels_whose_proofs_named_the_image(
    scratch: Engine,
) -> None:
    """An auditor's read of a proof image written before is filed under the parcels whose
    proofs named the image when it was read, as the service files one now: one image
    named by two proofs, both parcels; an image whose proof arrived after a read, none
    for that read and its parcel for a read after it; an image no proof names, none;
    another action about the same image, none. Run again, it files nothing twice; the
    chain verifies as before."""
    import datetime as dt

    from sqlalchemy.orm import Session

    from sync import audit

    migrate.upgrade(scratch, UPLOADS_BY_UPLOADER)
    _audit_client_ip_running_code_writes(scratch)
    x, y, z = _station_day_numbers(scratch, 3)[:3]
    shared, later, unnamed = "a" * 64, "b" * 64, "c" * 64
    early = dt.datetime(2026, 11, 20, 8, 0, tzinfo=dt.UTC)
    # ``_append_before`` writes the n-th entry at 09:00 and n minutes: z's proof
    # arrives between the second entry and the fourth.
    between = dt.datetime(2026, 11, 20, 9, 2, 30, tzinfo=dt.UTC)
    _image_proofs(scratch, {x: (shared, early), y: (shared, early), z: (later, between)})
    with scratch.begin() as connection:
        _append_before(
            connection,
            [
                ("blob_read", "blob", shared, {"media_type": "image/png", "size_bytes": 9}),
                ("blob_read", "blob", later, {"media_type": "image/png", "size_bytes": 9}),
                ("proof_images_purged", "blob", shared, {"digests": [shared]}),
                ("blob_read", "blob", later, {"media_type": "image/png", "size_bytes": 9}),
                ("blob_read", "blob", unnamed, {"media_type": "image/png", "size_bytes": 9}),
            ],
        )
    expected = {1: {x, y}, 4: {z}}
    migrate.upgrade(scratch, IMAGE_READS_BY_PARCEL)
    assert _entry_parcels(scratch) == expected
    with scratch.begin() as connection:  # stopped before its revision was recorded
        connection.execute(
            text("UPDATE alembic_version SET version_num = :v"), {"v": UPLOADS_BY_UPLOADER}
        )
    migrate.upgrade(scratch, IMAGE_READS_BY_PARCEL)
    assert _entry_parcels(scratch) == expected
    with Session(scratch) as session:
        assert audit.verify(session=session).ok
        assert [e.id for e in audit.list_entries(session=session, tracking_no=x)] == [1]
        assert [e.id for e in audit.list_entries(session=session, tracking_no=z)] == [4]


REJECTED_IMAGES = "e8c2a6f4d1b7"  # images rejected events name, and reads of them by parcel


def test_images_rejected_events_name_get_their_parcels_and_reads_of_them_are_filed(
    scratch: Engine,
) -> None:
    """A rejected event whose POD names an image is kept with the image and the parcel
    it names (``rejected_image``), as the service now keeps one as it quarantines, and
    an auditor's read of the image written before is filed under that parcel when the
    event had arrived by then: a read before, none; one naming no parcel, a POD that is
    no mapping or a digest that is none, nothing. A retention purge written before is
    filed under the parcels of the rejected events naming the images it lists. Run
    again, the same end; the chain verifies as before."""
    import datetime as dt
    import json

    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from models import UTCDateTime
    from sync import audit

    migrate.upgrade(scratch, IMAGE_READS_BY_PARCEL)
    _audit_client_ip_running_code_writes(scratch)
    x, y = _station_day_numbers(scratch, 2)[:2]
    shared, later, unnamed = "a" * 64, "b" * 64, "c" * 64
    early = dt.datetime(2026, 11, 20, 8, 0, tzinfo=dt.UTC)
    between = dt.datetime(2026, 11, 20, 9, 2, 30, tzinfo=dt.UTC)  # after entry 2
    sent = [
        (x, {"pod": {"photo_sha256": shared.upper(), "signature_sha256": "not-a-digest"}}, early),
        (y, {"pod": {"signature_sha256": later}}, between),
        (None, {"pod": {"photo_sha256": unnamed}}, early),
        (x, {"pod": f"photo_sha256={unnamed}"}, early),
    ]
    insert = sa.text(
        "INSERT INTO quarantined_event (id, station_id, device_id, batch_pk, position, "
        "event_type, tracking_no, parcel_tracking_no, error_code, message, payload, "
        "payload_hash, received_at) VALUES (:id, :station, :device, :batch, :id, "
        "'delivered_to_locker', :tn, :tn, 'missing_field', 'locker_id is required', "
        ":payload, :hash, :received)"
    ).bindparams(sa.bindparam("received", type_=UTCDateTime()))
    with scratch.begin() as connection:
        station_id, batch_pk, device_id = connection.execute(
            text("SELECT station_id, id, device_id FROM sync_batch ORDER BY id LIMIT 1")
        ).one()
        for row_id, (parcel, payload, received) in enumerate(sent, start=1):
            connection.execute(
                insert,
                {
                    "id": row_id,
                    "station": station_id,
                    "device": device_id,
                    "batch": batch_pk,
                    "tn": parcel,
                    "payload": json.dumps(payload),
                    "hash": f"{row_id:064d}",
                    "received": received,
                },
            )
        read = {"media_type": "image/png", "size_bytes": 9}
        _append_before(
            connection,
            [
                ("blob_read", "blob", shared, read),
                ("blob_read", "blob", later, read),
                ("proof_images_purged", "blob", shared, {"digests": [shared]}),
                ("blob_read", "blob", later, read),
                ("blob_read", "blob", unnamed, read),
                ("proof_images_purged", "blob", later, {"digests": [later, unnamed]}),
            ],
        )

    def linked() -> set[tuple[int, str, str]]:
        with scratch.connect() as connection:
            query = "SELECT quarantined_event_id, sha256, tracking_no FROM rejected_image"
            return {tuple(row) for row in connection.execute(text(query))}

    expected = {1: {x}, 3: {x}, 4: {y}, 6: {y}}
    migrate.upgrade(scratch, REJECTED_IMAGES)
    assert linked() == {(1, shared, x), (2, later, y)}
    assert _entry_parcels(scratch) == expected
    with scratch.begin() as connection:  # stopped before its revision was recorded
        connection.execute(
            text("UPDATE alembic_version SET version_num = :v"), {"v": IMAGE_READS_BY_PARCEL}
        )
    migrate.upgrade(scratch, REJECTED_IMAGES)
    assert linked() == {(1, shared, x), (2, later, y)}
    assert _entry_parcels(scratch) == expected
    with Session(scratch) as session:
        assert audit.verify(session=session).ok
        assert [e.id for e in audit.list_entries(session=session, tracking_no=y)] == [6, 4]


def test_image_reads_written_before_are_filed_batch_by_batch(scratch: Engine) -> None:
    """More image reads than one statement files (``BATCH``, 2,000), among other
    entries: each batch of reads is filed from where the one before ended, none left out
    at a batch's edge, none filed twice."""
    migrate.upgrade(scratch, UPLOADS_BY_UPLOADER)
    import datetime as dt

    x, y = _station_day_numbers(scratch, 2)[:2]
    digests = {x: "d" * 64, y: "e" * 64}
    early = dt.datetime(2026, 11, 20, 8, 0, tzinfo=dt.UTC)
    _image_proofs(scratch, {number: (sha256, early) for number, sha256 in digests.items()})
    entries = []
    for n in range(4003):  # 2,001 reads, each after another entry: 2 batches
        number = x if n % 4 == 1 else y
        action = "blob_read" if n % 2 else "blob_bytes_restored"
        entries.append((action, "blob", digests[number], {"found": "missing"}))
    with scratch.begin() as connection:
        _append_before(connection, entries)
    expected = {n + 1: {x if n % 4 == 1 else y} for n in range(len(entries)) if n % 2}
    assert len(expected) == 2001

    migrate.upgrade(scratch, IMAGE_READS_BY_PARCEL)

    assert _entry_parcels(scratch) == expected


HELD_AT_WRITE_OFF = "c8f2a4d6e1b9"  # write-offs remember the highest seq held then


def _sync_states(engine: Engine) -> dict[str, tuple[int, int | None]]:
    """Each device's ``acked_through_seq`` and ``held_at_write_off`` (None: no column)."""
    import sqlalchemy as sa

    with engine.connect() as connection:
        table = sa.Table("device_sync_state", sa.MetaData(), autoload_with=connection)
        rows = connection.execute(sa.select(table)).mappings().all()
    return {r["device_id"]: (r["acked_through_seq"], r.get("held_at_write_off")) for r in rows}


def test_stored_acknowledgements_past_seqs_written_off_come_down_to_the_rule_now(
    scratch: Engine,
) -> None:
    """The acknowledgement so far is now its floor (``sync.acks.acknowledged_through``),
    and a write-off passes no seq written off below a seq held then. A write-off made
    before the upgrade is taken as made at the highest seq held now: the PDA only out of
    range at 19:00, its 5 and 6 sent before 3 and 4 (written off), offline at the
    upgrade, was told by its first receipt back (seq 3) to prune through 6, 4 never
    sent. Its first receipt now stops at 3. A stored acknowledgement past seqs written
    off above the highest held comes down too; one without write-offs stays; run again,
    the same end; downgraded, the column goes."""
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from sync.lost_seqs import Seqs
    from tests import factories

    migrate.upgrade(scratch, REJECTED_IMAGES)
    _device_moved_at_running_code_writes(scratch)
    with Session(scratch) as session:
        station = factories.station(session)
        for device in ("PDA-0001", "PDA-0002", "PDA-0003", "PDA-0004"):
            factories.device(session, device, station)
        session.commit()
    with scratch.begin() as connection:
        table = sa.Table("device_sync_state", sa.MetaData(), autoload_with=connection)
        connection.execute(
            table.insert(),
            [
                # 1-4 held, 5 and 6 (a closed shift's last seqs) written off: stored past them.
                {"device_id": "PDA-0001", "max_seq": 6, "missing_ranges": [],
                 "written_off_ranges": [[5, 6]], "acked_through_seq": 6},
                # No write-off: as stored.
                {"device_id": "PDA-0002", "max_seq": 9, "missing_ranges": [],
                 "written_off_ranges": None, "acked_through_seq": 9},
                # 3 and 4 written off below 5 and 6, held: the PDA may hold 3 and 4 unsent.
                {"device_id": "PDA-0003", "max_seq": 6, "missing_ranges": [],
                 "written_off_ranges": [[3, 4]], "acked_through_seq": 6},
                # A gap at 7 below 8, 9 written off above 8: stored past the gap.
                {"device_id": "PDA-0004", "max_seq": 9, "missing_ranges": [[7, 7]],
                 "written_off_ranges": [[9, 9]], "acked_through_seq": 9},
            ],
        )  # fmt: skip
    expected = {
        "PDA-0001": (4, 4),
        "PDA-0002": (9, 0),
        "PDA-0003": (2, 6),
        "PDA-0004": (6, 8),
    }
    migrate.upgrade(scratch, HELD_AT_WRITE_OFF)
    assert _sync_states(scratch) == expected
    acked, held_then = expected["PDA-0003"]
    back_online = Seqs(6, [], [[3, 4]], held_then, acked).arrived(3)  # as a push stores it
    assert back_online.acked_through_seq == 3
    with scratch.begin() as connection:  # stopped before its revision was recorded
        connection.execute(
            text("UPDATE alembic_version SET version_num = :v"), {"v": REJECTED_IMAGES}
        )
    migrate.upgrade(scratch, HELD_AT_WRITE_OFF)
    assert _sync_states(scratch) == expected
    migrate.downgrade(scratch, REJECTED_IMAGES)
    assert _sync_states(scratch) == {k: (acked, None) for k, (acked, _) in expected.items()}
    migrate.upgrade(scratch)


def test_rejected_events_images_and_reads_of_them_are_filed_batch_by_batch(
    scratch: Engine,
) -> None:
    """More rejected events naming images than one statement reads (``BATCH``, 2,000),
    and more image reads and purges than one files, among other entries: each batch
    goes on from where the one before ended, no rejected event's image and no read
    left out at a batch's edge, none filed twice; a purge listing images of both
    sides of the first batch's edge is filed under both their parcels."""
    import datetime as dt
    import json

    import sqlalchemy as sa

    from models import UTCDateTime

    migrate.upgrade(scratch, IMAGE_READS_BY_PARCEL)
    x, y = _station_day_numbers(scratch, 2)[:2]
    rejected = 2003  # 2 batches of rejected events, 2 of reads

    def parcel(n: int) -> str:
        return x if n % 2 else y

    def photo(n: int) -> str:
        return f"{n:064x}"

    with scratch.begin() as connection:
        station_id, batch_pk, device_id = connection.execute(
            text("SELECT station_id, id, device_id FROM sync_batch ORDER BY id LIMIT 1")
        ).one()
        connection.execute(
            sa.text(
                "INSERT INTO quarantined_event (id, station_id, device_id, batch_pk, position, "
                "event_type, tracking_no, parcel_tracking_no, error_code, message, payload, "
                "payload_hash, received_at) VALUES (:id, :station, :device, :batch, :id, "
                "'delivered_to_locker', :tn, :tn, 'missing_field', 'locker_id is required', "
                ":payload, :hash, :received)"
            ).bindparams(sa.bindparam("received", type_=UTCDateTime())),
            [
                {
                    "id": n,
                    "station": station_id,
                    "device": device_id,
                    "batch": batch_pk,
                    "tn": parcel(n),
                    "payload": json.dumps({"pod": {"photo_sha256": photo(n)}}),
                    "hash": f"{n:064d}",
                    "received": dt.datetime(2026, 11, 20, 8, 0, tzinfo=dt.UTC),
                }
                for n in range(1, rejected + 1)
            ],
        )
        entries = []
        for n in range(1, rejected + 1):  # each read after another entry
            entries.append(("blob_bytes_restored", "blob", photo(n), {"found": "missing"}))
            entries.append(("blob_read", "blob", photo(n), {"media_type": "image/png"}))
        edge = [photo(n) for n in (1999, 2000, 2001, 2002)]
        entries.append(("proof_images_purged", "blob", edge[0], {"digests": edge}))
        _append_before(connection, entries)
    expected = {2 * n: {parcel(n)} for n in range(1, rejected + 1)}
    expected[len(entries)] = {x, y}

    migrate.upgrade(scratch, REJECTED_IMAGES)

    with scratch.connect() as connection:
        linked = connection.execute(
            text("SELECT quarantined_event_id, sha256, tracking_no FROM rejected_image")
        ).all()
    assert sorted(linked) == [(n, photo(n), parcel(n)) for n in range(1, rejected + 1)]
    assert _entry_parcels(scratch) == expected


AUDIT_CLIENT_IP = "f4a8c2e6b1d3"  # audit entries keep their client's address


def test_entries_before_the_clients_address_was_kept_verify_beside_those_that_keep_it(
    scratch: Engine,
) -> None:
    """The column comes empty: the entries written before keep their hashes (none is
    re-hashed) and verify beside those appended after with an address, which is in
    their hash. Run again, the same end; a downgrade that would drop addresses the
    hashes cover is refused, one with none drops the column."""
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from sync import audit

    migrate.upgrade(scratch, HELD_AT_WRITE_OFF)
    with scratch.begin() as connection:
        _append_before(
            connection,
            [("blob_read", "blob", "a" * 64, {"media_type": "image/png"}),
             ("parcel_read", "parcel", "RR473124829GB", {"event_ids": [7]})],
        )  # fmt: skip
    with scratch.connect() as connection:
        hashes = connection.execute(text("SELECT id, entry_hash FROM audit_entry")).all()
    migrate.upgrade(scratch, AUDIT_CLIENT_IP)
    with scratch.begin() as connection:  # stopped before its revision was recorded
        connection.execute(
            text("UPDATE alembic_version SET version_num = :v"), {"v": HELD_AT_WRITE_OFF}
        )
    migrate.upgrade(scratch, AUDIT_CLIENT_IP)
    with scratch.connect() as connection:
        assert connection.execute(text("SELECT id, entry_hash FROM audit_entry")).all() == hashes
    migrate.downgrade(scratch, HELD_AT_WRITE_OFF)  # no address kept yet: the column goes
    assert "client_ip" not in {c["name"] for c in inspect(scratch).get_columns("audit_entry")}
    migrate.upgrade(scratch)
    if scratch.dialect.name == "postgresql":  # the entries above were given their ids
        with scratch.begin() as connection:
            connection.execute(text("SELECT setval('audit_entry_id_seq', 2)"))
    with Session(scratch) as session:
        token = audit.CLIENT_IP.set("203.0.113.7")
        try:
            audit.append(session=session, actor_id=None, action="proof_read",
                         subject_type="proof", subject_key="9", details={})  # fmt: skip
        finally:
            audit.CLIENT_IP.reset(token)
        session.commit()
        result = audit.verify(session=session)
        assert result.ok and result.checked == 3, result.message
        assert session.scalars(
            sa.select(sa.column("client_ip"))
            .select_from(sa.table("audit_entry"))
            .order_by(sa.column("id"))
        ).all() == [None, None, "203.0.113.7"]
    with pytest.raises(migrate.MigrationRefused, match="1 audit entries keep their client's"):
        migrate.downgrade(scratch, HELD_AT_WRITE_OFF)
    with Session(scratch) as session:
        assert audit.verify(session=session).ok


SEQ_CONFLICTS_SETTLED = "f5a1c7e3b9d4"  # seq conflicts settled by their events sent again


def _unsettled(engine: Engine) -> dict[str, int | None]:
    """Each device's ``unsettled_seq_conflicts`` (None: no column)."""
    import sqlalchemy as sa

    with engine.connect() as connection:
        table = sa.Table("device_sync_state", sa.MetaData(), autoload_with=connection)
        rows = connection.execute(sa.select(table)).mappings().all()
    return {r["device_id"]: r.get("unsettled_seq_conflicts") for r in rows}


def test_seq_conflicts_kept_before_are_counted_unsettled_for_their_device(
    scratch: Engine,
) -> None:
    """A PDA's ``seq_conflict`` rejections kept before the version that settles them are
    counted unsettled (its next push storing events looks them up among the events it
    holds: those sent again already are settled then); its other rejections, and other
    PDAs, count none. Run again, the same end; downgraded, the columns go."""
    import datetime as dt

    import sqlalchemy as sa

    from models import UTCDateTime

    migrate.upgrade(scratch, AUDIT_CLIENT_IP)
    _station_day_numbers(scratch, 2)
    with scratch.begin() as connection:
        station_id, batch_pk, device_id = connection.execute(
            text("SELECT station_id, id, device_id FROM sync_batch ORDER BY id LIMIT 1")
        ).one()
        connection.execute(
            sa.text(
                "INSERT INTO quarantined_event (station_id, device_id, batch_pk, position, "
                "seq, error_code, message, payload, payload_hash, received_at) VALUES "
                "(:station, :device, :batch, :n, 1, :code, 'refused', '{}', :hash, :received)"
            ).bindparams(sa.bindparam("received", type_=UTCDateTime())),
            [
                {
                    "station": station_id,
                    "device": device_id,
                    "batch": batch_pk,
                    "n": n,
                    "code": code,
                    "hash": f"{n:064d}",
                    "received": dt.datetime(2026, 11, 20, 8, 0, tzinfo=dt.UTC),
                }
                for n, code in enumerate(["seq_conflict", "seq_conflict", "invalid_seq"])
            ],
        )
    before = _unsettled(scratch)
    assert before and set(before.values()) == {None}
    expected = {device: 2 if device == device_id else 0 for device in before}

    migrate.upgrade(scratch, SEQ_CONFLICTS_SETTLED)
    assert _unsettled(scratch) == expected
    with scratch.connect() as connection:
        resent = connection.scalars(text("SELECT resent_seq FROM quarantined_event")).all()
    assert resent == [None, None, None]
    with scratch.begin() as connection:  # stopped before its revision was recorded
        connection.execute(
            text("UPDATE alembic_version SET version_num = :v"), {"v": AUDIT_CLIENT_IP}
        )
    migrate.upgrade(scratch, SEQ_CONFLICTS_SETTLED)
    assert _unsettled(scratch) == expected
    migrate.downgrade(scratch, AUDIT_CLIENT_IP)
    assert _unsettled(scratch) == before
    migrate.upgrade(scratch)


REACH_KEPT_PAST_PURGE = "e8c3a5f1b2d7"  # consent requests keep their reach past a purge
SEQ_CONFLICTS_BY_EVENT = "e9c3b7a5d1f2"  # seq conflicts looked up by their events


def _compared(engine: Engine) -> dict[str, bool | None]:
    """Each device's ``seq_conflicts_compared`` (None: no column)."""
    import sqlalchemy as sa

    with engine.connect() as connection:
        table = sa.Table("device_sync_state", sa.MetaData(), autoload_with=connection)
        rows = connection.execute(sa.select(table)).mappings().all()
    compared = {r["device_id"]: r.get("seq_conflicts_compared") for r in rows}
    return {k: None if v is None else bool(v) for k, v in compared.items()}


def test_a_pda_with_seq_conflicts_kept_before_has_them_compared_by_its_next_push(
    scratch: Engine,
) -> None:
    """A PDA with unsettled ``seq_conflict`` rejections kept before the version that
    looks them up by their events is marked not compared (its next push storing events
    compares them all with the events held, as the version before did on each push);
    other PDAs are compared, and every rejection names no event yet. Run again, the
    same end; downgraded, the columns and the index go."""
    migrate.upgrade(scratch, REACH_KEPT_PAST_PURGE)
    _station_day_numbers(scratch, 2)
    with scratch.begin() as connection:
        device_id = connection.execute(
            text("SELECT device_id FROM device_sync_state ORDER BY device_id LIMIT 1")
        ).scalar_one()
        connection.execute(
            text("UPDATE device_sync_state SET unsettled_seq_conflicts = 2 WHERE device_id = :d"),
            {"d": device_id},
        )
    before = _compared(scratch)
    assert before and set(before.values()) == {None}
    expected = {device: device != device_id for device in before}

    migrate.upgrade(scratch, SEQ_CONFLICTS_BY_EVENT)
    assert _compared(scratch) == expected
    with scratch.begin() as connection:  # stopped before its revision was recorded
        connection.execute(
            text("UPDATE alembic_version SET version_num = :v"), {"v": REACH_KEPT_PAST_PURGE}
        )
    migrate.upgrade(scratch, SEQ_CONFLICTS_BY_EVENT)
    assert _compared(scratch) == expected
    migrate.downgrade(scratch, REACH_KEPT_PAST_PURGE)
    assert _compared(scratch) == before
    indexes = {i["name"] for i in inspect(scratch).get_indexes("quarantined_event")}
    assert "ix_quarantined_event_unsettled" not in indexes
    migrate.upgrade(scratch)


COURIER_SHIFTS_BY_STATE = "e3b9c1d7a4f2"  # a courier's shifts by state and when they opened
UNNAMED_SEQ_CONFLICTS = "f6b3d9a2c8e4"  # seq conflicts kept naming no event, indexed


def test_the_seq_conflicts_naming_no_event_are_indexed_by_device(scratch: Engine) -> None:
    """``ix_quarantined_event_unnamed``: a device's unsettled ``seq_conflict`` rejections
    that name no event (those the version before keeps during the rollout), built
    CONCURRENTLY on PostgreSQL. Run again, the same end; downgraded, it goes."""
    migrate.upgrade(scratch, COURIER_SHIFTS_BY_STATE)
    with statements(scratch) as upgrading:
        migrate.upgrade(scratch, UNNAMED_SEQ_CONFLICTS)
    indexes = {i["name"] for i in inspect(scratch).get_indexes("quarantined_event")}
    assert "ix_quarantined_event_unnamed" in indexes
    created = [s for s in upgrading if s.startswith("CREATE INDEX")]
    concurrently = scratch.dialect.name == "postgresql"
    assert [s.startswith("CREATE INDEX CONCURRENTLY") for s in created] == [concurrently]
    with scratch.begin() as connection:  # stopped before its revision was recorded
        connection.execute(
            text("UPDATE alembic_version SET version_num = :v"), {"v": COURIER_SHIFTS_BY_STATE}
        )
    migrate.upgrade(scratch, UNNAMED_SEQ_CONFLICTS)
    with statements(scratch) as downgrading:
        migrate.downgrade(scratch, COURIER_SHIFTS_BY_STATE)
    indexes = {i["name"] for i in inspect(scratch).get_indexes("quarantined_event")}
    assert "ix_quarantined_event_unnamed" not in indexes
    dropped = [s for s in downgrading if s.startswith("DROP INDEX")]
    assert [s.startswith("DROP INDEX CONCURRENTLY") for s in dropped] == [concurrently]
    migrate.upgrade(scratch)


FAILING_SINCE = "a4d8f2c6e0b3"  # webhook failures remember when they began


def test_a_subscription_failing_at_the_upgrade_has_its_run_start_at_its_next_failure(
    scratch: Engine,
) -> None:
    """``webhook_subscription.failing_since`` is added null on every row, a subscription
    failing at the upgrade included (its run counted from its next failure: a later
    disabling, never an earlier one); its count and its disabling stay as they were.
    Downgraded, the column goes."""
    import datetime as dt

    import sqlalchemy as sa

    created = dt.datetime(2026, 11, 20, 8, 0, tzinfo=dt.UTC)
    migrate.upgrade(scratch, SEQ_CONFLICTS_SETTLED)
    with scratch.begin() as connection:
        table = sa.Table("webhook_subscription", sa.MetaData(), autoload_with=connection)
        connection.execute(
            table.insert(),
            [
                {"url": "https://hooks.example.com/a", "topics": ["flag.raised"],
                 "secret": "s" * 43, "description": "", "active": True,
                 "consecutive_failures": 7, "created_at": created},
                {"url": "https://hooks.example.com/b", "topics": ["flag.raised"],
                 "secret": "t" * 43, "description": "", "active": True,
                 "consecutive_failures": 0, "created_at": created},
            ],
        )  # fmt: skip

    def rows() -> list[dict[str, Any]]:
        with scratch.connect() as connection:
            table = sa.Table("webhook_subscription", sa.MetaData(), autoload_with=connection)
            found = connection.execute(sa.select(table).order_by(table.c.url)).mappings()
            return [
                {k: row.get(k, "absent") for k in ("consecutive_failures", "failing_since")}
                for row in found
            ]

    migrate.upgrade(scratch, FAILING_SINCE)
    assert rows() == [
        {"consecutive_failures": 7, "failing_since": None},
        {"consecutive_failures": 0, "failing_since": None},
    ]
    migrate.downgrade(scratch, SEQ_CONFLICTS_SETTLED)
    assert [row["failing_since"] for row in rows()] == ["absent", "absent"]
    migrate.upgrade(scratch)


SHIFTS_BY_COURIER_STATE = "e3b9c1d7a4f2"  # a courier's shifts by state, when they opened


def test_a_couriers_shifts_by_state_replace_their_index_and_downgrade_gives_it_back(
    scratch: Engine,
) -> None:
    """``ix_shift_courier_status_opened`` replaces ``ix_shift_courier_id``: a failed build
    leaves the old one standing (``shift``'s courier lookups keep an index), run again it
    is built anew, then the old one dropped; the downgrade builds ``ix_shift_courier_id``
    again before it drops the new one, each CONCURRENTLY on PostgreSQL."""
    postgresql = scratch.dialect.name == "postgresql"
    new, old = "ix_shift_courier_status_opened", "ix_shift_courier_id"

    def indexes() -> set[str]:
        return {index["name"] for index in inspect(scratch).get_indexes("shift")}

    migrate.upgrade(scratch, f"{SHIFTS_BY_COURIER_STATE}-1")
    assert old in indexes() and new not in indexes()
    with index_build_fails(scratch, new, table="shift"):
        with pytest.raises(OperationalError):
            migrate.upgrade(scratch, SHIFTS_BY_COURIER_STATE)
    assert old in indexes()
    if postgresql:
        assert _index_valid(scratch, new) is False

    with statements(scratch) as upgrading:
        migrate.upgrade(scratch, SHIFTS_BY_COURIER_STATE)
    assert new in indexes() and old not in indexes()
    with statements(scratch) as downgrading:
        migrate.downgrade(scratch, f"{SHIFTS_BY_COURIER_STATE}-1")
    assert old in indexes() and new not in indexes()
    [courier_id] = [i for i in inspect(scratch).get_indexes("shift") if i["name"] == old]
    assert courier_id["column_names"] == ["courier_id"] and not courier_id["unique"]
    if postgresql:
        assert _index_valid(scratch, old) is True
        for sent in (upgrading, downgrading):
            changed = [s for s in sent if s.startswith(("CREATE INDEX", "DROP INDEX"))]
            assert len(changed) >= 2 and all("CONCURRENTLY" in s for s in changed), changed
    migrate.upgrade(scratch)
    with scratch.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
