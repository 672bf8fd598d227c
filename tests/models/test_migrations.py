"""The migrated schema is exactly what the models declare, on every backend."""

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect

from models import Base, migrate


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


def test_downgrade_to_base_and_back(tmp_path) -> None:
    """Every migration can be undone and redone (on a scratch SQLite file)."""
    from models.engine import make_engine

    scratch = make_engine(f"sqlite:///{tmp_path / 'scratch.db'}")
    migrate.upgrade(scratch)
    assert {"station", "app_user", "device", "parcel"} <= set(inspect(scratch).get_table_names())
    migrate.downgrade(scratch, "base")
    assert set(inspect(scratch).get_table_names()) == {"alembic_version"}
    migrate.upgrade(scratch)
    assert "parcel" in inspect(scratch).get_table_names()
    scratch.dispose()


def test_an_upgrade_that_copies_a_table_keeps_rows_that_refer_to_it(tmp_path) -> None:
    """SQLite alters scan_event by copying it while consents and proof images refer to
    its rows: the migration must neither fail nor lose or break a reference."""
    from sqlalchemy import text

    from models.engine import make_engine

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
