"""The fault tests' machinery (``tests.live_server``) itself."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import psycopg
from sqlalchemy import event
from sqlalchemy.engine import make_url

from models import Device, Station, SyncBatch, User
from models.base import Base
from tests.live_server import Ledger, _libpq_url, server_database


def _sessions_on(url: str) -> int:
    """Sessions open on ``url``'s PostgreSQL database, but the one asking."""
    database = make_url(url).database
    with psycopg.connect(_libpq_url(url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_ledger_left_open_holds_no_connection_to_the_database(tmp_path: Path) -> None:
    """A crash test failing before it closed its ``Ledger`` (an assertion in its push
    loop, a server that did not start) left the ledger's pooled connection open on the
    database being dropped, and the killer thread's reads with it. Each read now
    closes its connection: a ledger never closed holds none."""
    with server_database(tmp_path, "ledger") as url:
        ledger = Ledger(url)  # never closed, as by a test that failed early
        opened = Counter[str]()
        event.listen(ledger.engine, "connect", lambda *_: opened.update(["connect"]))
        event.listen(ledger.engine, "close", lambda *_: opened.update(["close"]))
        tables = [model.__table__ for model in (Station, User, Device, SyncBatch)]
        Base.metadata.create_all(ledger.engine, tables=tables)

        assert ledger.batch_committed(str(uuid.uuid4())) is False
        ledger.wait_for_batch(str(uuid.uuid4()), still_waiting=lambda: False)

        assert opened["close"] == opened["connect"] > 0, opened  # each one closed
        if ledger.engine.dialect.name == "postgresql":
            assert _sessions_on(url) == 0
