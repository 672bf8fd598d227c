"""Prebuilt statements run on the driver's cursor (``sync.direct``) do what SQLAlchemy
would have done: the same rows, of the same types and names; the same values written,
defaults included; the same errors; listeners told."""

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import (
    CompoundSelect,
    Connection,
    Engine,
    Select,
    bindparam,
    event,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, PendingRollbackError, StatementError
from sqlalchemy.orm import Session
from sqlalchemy.pool import _ConnectionFairy

from models import DeviceSyncState, FeedChange, FeedKind, Flag, FlagSeverity, FlagStatus, Parcel
from models.engine import make_engine
from sync import direct as direct_module
from sync.accounts import SUBJECT_ROWS, check_token_subject
from sync.consents import CONSENTS_OF_PARCELS
from sync.device_state import LOCK_DEVICE_STATE
from sync.feed import INSERT_CHANGES
from sync.ingest import INSERT_ONE_EVENT, STORE_DEVICE_STATE
from sync.shifts import SHIFT_WINDOWS, ShiftRules, open_shift
from sync.sql import Prebuilt, flushed_connection
from sync.status import BLOBS_HELD, JUDGED_EVENTS_OF_PARCELS_BUT, PARCELS_FOR_UPDATE
from tests import factories
from tests.conftest import World
from tests.sync.test_ingest import Pda, at, consent_in_person, locker_drop

SIGNATURE = "5" * 64


@pytest.fixture
def shadowed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every select run directly is run again through SQLAlchemy, and must give the same
    rows: values, their types, the columns' names. Yields the statements compared."""
    compared: list[Any] = []
    run = direct_module.DirectStatement.run

    def run_and_compare(
        self: direct_module.DirectStatement,
        connection: Connection,
        template: Any,
        params: Any,
    ) -> direct_module.Rows:
        rows = run(self, connection, template, params)
        if isinstance(self.statement, Select | CompoundSelect):
            expected = connection.execute(self.statement, params).all()
            assert [tuple(row) for row in rows] == [tuple(row) for row in expected]
            assert [list(map(type, row)) for row in rows] == [
                list(map(type, row)) for row in expected
            ]
            if rows:
                assert rows[0]._fields == tuple(expected[0]._fields)
            compared.append((self.statement, len(rows)))
        return rows

    monkeypatch.setattr(direct_module.DirectStatement, "run", run_and_compare)
    yield compared


def test_the_selects_of_pushes_give_what_sqlalchemy_gives(
    session: Session, world: World, shadowed: list[Any]
) -> None:
    """A day's scans pushed one at a time, as an online PDA does: a delivery with a
    signature, a locker drop with its consent, in an open shift."""
    open_shift(
        session=session,
        device=world.device,
        courier_id=world.courier.id,
        rules=ShiftRules(),
        now=at(0),
        first_seq=1,
    )
    factories.stored_image(session, SIGNATURE)
    delivered, dropped = (factories.parcel(session, world.station) for _ in range(2))
    session.commit()
    pda = Pda(session, world)
    tn, other = delivered.tracking_no, dropped.tracking_no
    scans = [
        pda.event(1, tn),
        pda.event(2, tn, "out_for_delivery"),
        pda.event(3, tn, "delivered", pod={"recipient_name": "Li", "signature_sha256": SIGNATURE}),
        pda.event(4, other),
        consent_in_person(pda, 5, other, at(5)),
        locker_drop(pda, 6, other, at(6)),
    ]
    for scan in scans:
        receipt = pda.push([scan])
        assert [r["status"] for r in receipt["results"]] == ["applied"]
    assert session.get(Parcel, delivered.id).status == "delivered"

    def rows_seen(statement: Any) -> int:
        return sum(count for compared, count in shadowed if compared is statement(session))

    # Each ran and gave rows: these for every push (the device's state also when the
    # shift opened), the blobs once, for the delivery.
    for statement in (LOCK_DEVICE_STATE, SHIFT_WINDOWS, PARCELS_FOR_UPDATE):
        assert rows_seen(statement) >= len(scans), statement
    # those before, for each scan (their payloads read for a final outcome only)
    assert rows_seen(JUDGED_EVENTS_OF_PARCELS_BUT) == (0 + 1 + 2) * 2
    assert rows_seen(BLOBS_HELD) == 1
    assert rows_seen(CONSENTS_OF_PARCELS) >= 1


def test_a_connection_outside_a_transaction_begins_one_as_sqlalchemy_does(
    engine: Engine,
) -> None:
    with engine.connect() as connection:
        assert not connection.in_transaction()
        assert LOCK_DEVICE_STATE.run(connection, {"device_id": "PDA-NONE"}) == []
        assert connection.in_transaction()


def test_the_sign_in_check_reads_what_sqlalchemy_reads(session: Session, world: World) -> None:
    connection = session.connection()
    subject = check_token_subject(
        connection,
        user_id=world.courier.id,
        device_id=world.device.id,
        credentials_version=world.courier.credentials_version,
    )
    assert (subject.station_id, subject.device_id) == (world.station.id, world.device.id)
    # The token's sign-in family: none (a token issued before access tokens named it),
    # and one that is no family here (the outer join gives no revocation).
    for family in (None, "no-such-family"):
        params = {"user_id": world.courier.id, "device_id": world.device.id, "family": family}
        direct = SUBJECT_ROWS.run(connection, params)
        expected = connection.execute(SUBJECT_ROWS(session), params).all()
        assert direct == [tuple(row) for row in expected]
        assert direct[0]._fields == expected[0]._fields


def test_an_insert_fills_in_the_defaults_sqlalchemy_would(session: Session, world: World) -> None:
    """``feed_change.created_at`` has a Python-side default, ``txid`` one per database."""
    row = {
        "station_id": world.station.id,
        "courier_id": world.courier.id,
        "kind": FeedKind.PARCEL,
        "tracking_no": "RR000000001CN",
    }
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    INSERT_CHANGES.execute(session, row)  # directly
    session.connection().execute(INSERT_CHANGES(session), [row, row])  # by SQLAlchemy
    written = session.scalars(select(FeedChange).order_by(FeedChange.id)).all()
    assert len(written) == 3
    direct, *by_sqlalchemy = written
    for change in by_sqlalchemy:
        assert (change.txid, change.kind, change.tracking_no) == (
            direct.txid,
            direct.kind,
            direct.tracking_no,
        )
        assert before <= direct.created_at <= change.created_at


def test_a_refused_insert_raises_sqlalchemys_error_without_its_parameters(
    session: Session, world: World
) -> None:
    pda = Pda(session, world)
    tracking_no = factories.parcel(session, world.station).tracking_no
    pda.push([pda.event(1, tracking_no)])  # stored at seq 1
    stored = session.connection().execute(select(INSERT_ONE_EVENT(session).table)).mappings().one()
    again = {
        **{k: v for k, v in stored.items() if k != "id"},
        "client_event_id": uuid.uuid4(),
    }
    with pytest.raises(IntegrityError) as raised, session.begin_nested():
        INSERT_ONE_EVENT.execute(session, again)  # the same device and seq
    assert tracking_no not in str(raised.value)
    assert "hidden" in str(raised.value)
    # Its savepoint undone, the transaction goes on (PostgreSQL: not aborted).
    assert LOCK_DEVICE_STATE.execute(session, {"device_id": world.device.id}).one().max_seq == 1


def _stored_row_again(session: Session, world: World, seq: int) -> dict[str, Any]:
    """The columns of the event a PDA stored at seq 1, as a new event at ``seq``."""
    pda = Pda(session, world)
    pda.push([pda.event(1, factories.parcel(session, world.station).tracking_no)])
    stored = session.connection().execute(select(INSERT_ONE_EVENT(session).table)).mappings().one()
    return {
        **{k: v for k, v in stored.items() if k != "id"},
        "client_event_id": uuid.uuid4(),
        "seq": seq,
    }


def test_a_statement_refused_in_a_direct_savepoint_is_undone_and_the_transaction_goes_on(
    session: Session, world: World, sent: list[str]
) -> None:
    second = _stored_row_again(session, world, seq=2)
    third_at_seq_1 = {**second, "client_event_id": uuid.uuid4(), "seq": 1}
    connection = flushed_connection(session)
    sent.clear()
    with pytest.raises(IntegrityError), direct_module.undone_if_refused(connection):
        INSERT_ONE_EVENT.execute(session, second)  # stored, then undone with the savepoint
        INSERT_ONE_EVENT.execute(session, third_at_seq_1)  # the same device and seq
    assert [s for s in sent if "SAVEPOINT" in s] == [
        "SAVEPOINT direct_undo",
        "ROLLBACK TO SAVEPOINT direct_undo",
    ]
    table = INSERT_ONE_EVENT(session).table
    assert session.connection().execute(select(table.c.seq)).scalars().all() == [1]


def test_what_a_direct_savepoint_kept_stays(
    session: Session, world: World, sent: list[str]
) -> None:
    second = _stored_row_again(session, world, seq=2)
    sent.clear()
    with direct_module.undone_if_refused(flushed_connection(session)):
        INSERT_ONE_EVENT.execute(session, second)
    assert [s for s in sent if "SAVEPOINT" in s] == [
        "SAVEPOINT direct_undo",
        "RELEASE SAVEPOINT direct_undo",
    ]
    table = INSERT_ONE_EVENT(session).table
    assert sorted(session.connection().execute(select(table.c.seq)).scalars()) == [1, 2]


def test_a_transaction_sqlalchemy_would_refuse_gets_sqlalchemys_own_savepoint(
    session: Session, world: World, sent: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    second = _stored_row_again(session, world, seq=2)
    monkeypatch.setattr(direct_module, "ready", lambda _connection: False)
    sent.clear()
    with direct_module.undone_if_refused(flushed_connection(session)):
        INSERT_ONE_EVENT.execute(session, second)
    assert [s.split()[0] for s in sent if "SAVEPOINT" in s] == ["SAVEPOINT", "RELEASE"]
    assert "direct_undo" not in " ".join(sent)  # SQLAlchemy's name: sa_savepoint_<n>


def test_a_lost_connection_raises_what_sqlalchemy_raises(session: Session, world: World) -> None:
    """A connection invalidated in its transaction (lost): SQLAlchemy's own refusal,
    ``PendingRollbackError``, from a direct statement and from the direct savepoint."""
    engine = session.get_bind()
    assert isinstance(engine, Connection | Engine)
    with engine.engine.connect() as connection:
        connection.begin()
        connection.invalidate()
        with pytest.raises(PendingRollbackError):
            LOCK_DEVICE_STATE.run(connection, {"device_id": world.device.id})
        with pytest.raises(PendingRollbackError), direct_module.undone_if_refused(connection):
            pass


def test_a_direct_savepoint_sqlalchemy_rolled_back_leaves_its_error_alone(
    session: Session, world: World, sent: list[str]
) -> None:
    """Where SQLAlchemy ended the transaction the savepoint was in (here a nested one
    it rolled back), its error stands, not "no such savepoint"."""
    second = _stored_row_again(session, world, seq=2)
    connection = flushed_connection(session)
    sent.clear()
    with pytest.raises(LookupError), connection.begin_nested() as outer:
        with direct_module.undone_if_refused(connection):
            INSERT_ONE_EVENT.execute(session, second)
            outer.rollback()
            raise LookupError("the block's own error")
    assert not any(s.startswith("ROLLBACK TO SAVEPOINT direct_undo") for s in sent)
    table = INSERT_ONE_EVENT(session).table
    assert session.connection().execute(select(table.c.seq)).scalars().all() == [1]


def test_listeners_hear_of_each_statement_run_directly(session: Session, world: World) -> None:
    heard: list[tuple[str, Any]] = []

    def listen(*args: Any) -> None:
        heard.append((args[2], args[3]))

    connection = session.connection()
    event.listen(connection, "before_cursor_execute", listen)
    try:
        LOCK_DEVICE_STATE.execute(session, {"device_id": world.device.id})
    finally:
        event.remove(connection, "before_cursor_execute", listen)
    [(statement, parameters)] = heard
    assert statement.startswith("SELECT device_sync_state.max_seq")
    assert world.device.id in (parameters.values() if isinstance(parameters, dict) else parameters)


def test_a_long_in_list_runs_through_sqlalchemy(
    session: Session, world: World, shadowed: list[Any]
) -> None:
    """Lists up to ``LONGEST_LIST`` keys run directly (on SQLite, a template per length);
    a bulk push's longer ones are left to SQLAlchemy, whose row processing is faster
    for hundreds of rows, and whose SQL for them is not kept."""
    numbers = sorted(
        factories.parcel(session, world.station).tracking_no
        for _ in range(direct_module.LONGEST_LIST + 1)
    )
    for wanted in (numbers[:1], numbers[:-1], numbers):
        rows = PARCELS_FOR_UPDATE.execute(session, {"numbers": wanted})
        assert [row.tracking_no for row in rows] == wanted
    assert [count for _, count in shadowed] == [1, len(numbers) - 1]  # the last not direct


def test_a_long_list_in_a_documents_parameter_runs_directly(
    session: Session, world: World
) -> None:
    """Only a list of keys (an IN list, an array) longer than ``LONGEST_LIST`` is left to
    SQLAlchemy: a JSON document's list, however long, is a value like any, run directly
    (and the statement's other parameters are not looked over for lists)."""
    Pda(session, world).push(
        [factories.event(1, factories.parcel(session, world.station).tracking_no)]
    )
    ranges = [[seq, seq] for seq in range(3, 3 + 2 * (direct_module.LONGEST_LIST + 1), 2)]
    params = {
        "state_of": world.device.id,
        "new_max_seq": ranges[-1][0] + 1,
        "new_missing_ranges": ranges,
        "new_written_off_ranges": [],
        "new_acked_through_seq": 1,
        "new_unsettled_seq_conflicts": 0,
        "new_clock_offset_ms": 0,
        "new_clock_measured_at": at(1),
        "new_last_push_at": at(1),
    }
    dialect = session.get_bind().dialect
    direct = direct_module.DirectStatement(STORE_DEVICE_STATE(session), dialect)
    assert direct.template(params) is not None
    STORE_DEVICE_STATE.execute(session, params)
    stored = session.scalars(
        select(DeviceSyncState).where(DeviceSyncState.device_id == world.device.id)
    ).one()
    session.refresh(stored)
    assert stored.missing_ranges == ranges
    keys = direct_module.DirectStatement(PARCELS_FOR_UPDATE(session), dialect)
    assert keys.template({"numbers": ["x"] * (direct_module.LONGEST_LIST + 1)}) is None


def test_a_value_it_cannot_convert_raises_what_sqlalchemy_raises(
    session: Session, world: World
) -> None:
    """A naive time for a UTC column: SQLAlchemy's StatementError either way."""
    params = {
        "device_id": world.device.id,
        "courier_id": world.courier.id,
        "min_seq": 1,
        "max_seq": 1,
        "since": dt.datetime(2026, 12, 1, 8, 0),  # naive
        "until": dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC),
    }
    with pytest.raises(StatementError, match="naive datetime") as by_sqlalchemy:
        session.connection().execute(SHIFT_WINDOWS(session), params)
    with pytest.raises(StatementError, match="naive datetime") as directly:
        SHIFT_WINDOWS.execute(session, params)
    assert type(directly.value) is type(by_sqlalchemy.value)


def test_an_update_fills_in_the_columns_onupdate(session: Session, world: World) -> None:
    """``flag.updated_at`` is set by its ``onupdate`` when the statement leaves it out."""
    flag = Flag(
        kind="clock_skew",
        severity=FlagSeverity.WARNING,
        station_id=world.station.id,
        subject_type="device",
        subject_key=world.device.id,
        evidence={},
        updated_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    )
    session.add(flag)
    session.flush()
    resolve = Prebuilt(
        lambda _dialect: (
            update(Flag.__table__)
            .where(Flag.__table__.c.id == bindparam("flag"))
            .values(status=bindparam("status"))
        )
    )
    resolve.execute(session, {"flag": flag.id, "status": FlagStatus.RESOLVED})
    session.expire(flag)
    assert flag.status == FlagStatus.RESOLVED
    assert flag.updated_at > dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)


def test_a_row_visits_only_its_columns_with_a_conversion(
    session: Session, world: World, shadowed: list[Any]
) -> None:
    """A parcel's row has a dozen columns and few to convert (its enums, its times):
    the others are taken as the driver gave them, never looked at one by one, and the
    row is what SQLAlchemy gives (``shadowed``)."""
    parcel = factories.parcel(session, world.station)
    session.commit()
    params = {"numbers": [parcel.tracking_no]}
    [row] = PARCELS_FOR_UPDATE.execute(session, params)
    assert row.tracking_no == parcel.tracking_no
    statement = PARCELS_FOR_UPDATE._direct[session.get_bind().dialect]
    template = statement.template(params)
    assert template is not None
    converted = [index for index, _, _ in template.converting]
    assert converted == [
        index
        for index, processor in enumerate(template.result_processors)
        if processor is not None
    ]
    assert 0 < len(converted) < len(row)
    assert shadowed  # compared with SQLAlchemy's row


class _NoLookUp(dict[Any, Any]):
    def get(self, key: Any, default: Any = None) -> Any:
        raise AssertionError("looked up by dialect")


def test_a_statement_run_again_on_its_last_dialect_is_not_looked_up(
    session: Session, world: World, database_url: str
) -> None:
    """A service runs on one database: the statement kept for the dialect it last ran on
    is used without the weak dictionary's look-up (a weak reference made each time, in
    the writers' turn). Another dialect still gets a statement of its own."""
    params = {"device_id": world.device.id}
    first = LOCK_DEVICE_STATE.execute(session, params)
    kept = LOCK_DEVICE_STATE._direct
    LOCK_DEVICE_STATE._direct = _NoLookUp()  # type: ignore[assignment]
    try:
        assert LOCK_DEVICE_STATE.execute(session, params) == first
    finally:
        LOCK_DEVICE_STATE._direct = kept
    other = make_engine(database_url, sqlite_begin="DEFERRED")  # a dialect of its own
    try:
        with other.connect() as connection:
            assert LOCK_DEVICE_STATE.run(connection, {"device_id": "no-such-device"}) == []
            assert LOCK_DEVICE_STATE._last is not None
            assert LOCK_DEVICE_STATE._last[0] is other.dialect
    finally:
        other.dispose()
    assert LOCK_DEVICE_STATE.execute(session, params) == first
    assert LOCK_DEVICE_STATE._last[0] is session.get_bind().dialect


def test_statements_run_directly_take_the_drivers_cursor_itself(
    session: Session, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not through the pool's proxy of the connection, one call more per statement."""

    def proxied(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a cursor made through the pool's proxy")

    params = {"device_id": world.device.id}
    expected = session.connection().execute(LOCK_DEVICE_STATE(session), params).all()
    monkeypatch.setattr(_ConnectionFairy, "cursor", proxied)
    assert LOCK_DEVICE_STATE.execute(session, params) == expected
