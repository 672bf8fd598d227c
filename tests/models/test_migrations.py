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
