"""Small SQL helpers the services share."""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    CursorResult,
    Select,
    Text,
    Update,
    all_,
    any_,
    bindparam,
    cast,
    func,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session

from sync.direct import DirectStatement, Rows, ready

# PostgreSQL's SQLSTATEs for a transaction it aborted to let another one go on:
# serialization_failure and deadlock_detected. Run again from its start, the same
# transaction may well succeed; nothing of the aborted one was kept.
CONFLICT_SQLSTATES = frozenset({"40001", "40P01"})


def aborted_for_a_conflict(error: BaseException) -> bool:
    """Whether ``error`` is PostgreSQL aborting the transaction to break a deadlock or a
    serialization conflict (``CONFLICT_SQLSTATES``) with concurrent work: nothing of it
    was stored, and the same work run again from its start may well succeed. SQLite's
    errors never are: a busy file has already been waited for (its busy timeout)."""
    orig = getattr(error, "orig", None)
    return isinstance(error, DBAPIError) and getattr(orig, "sqlstate", None) in CONFLICT_SQLSTATES


def among(
    session: Session, column: InstrumentedAttribute[Any], values: Sequence[Any]
) -> ColumnElement[bool]:
    """``column IN (values)``; on PostgreSQL ``column = ANY(:array)``, one parameter.

    A push looks up hundreds of keys at a time: an ``IN`` list makes a new statement
    text for every length, which psycopg parses anew each time, while the array form
    is one statement, parsed once.
    """
    return _among(session.get_bind().dialect.name, column, None, list(values))


def among_param(dialect: str, column: Any, name: str) -> ColumnElement[bool]:
    """``among`` for a statement built once (``Prebuilt``): the values are the list given
    as parameter ``name`` when it runs. ``dialect``: the database's dialect name."""
    return _among(dialect, column, name, None)


def not_among_param(dialect: str, column: Any, name: str) -> ColumnElement[bool]:
    """``column NOT IN (:name)``; on PostgreSQL ``column <> ALL(:name)`` (see ``among_param``)."""
    return _among(dialect, column, name, None, negated=True)


def _among(
    dialect: str, column: Any, name: str | None, values: list[Any] | None, *, negated: bool = False
) -> ColumnElement[bool]:
    """The one place that spells a list of keys per dialect: an array parameter on
    PostgreSQL, an expanding ``IN`` list elsewhere; its values given now or, with a
    ``name``, when the statement runs."""
    given: dict[str, Any] = {} if values is None else {"value": values, "unique": True}
    if dialect == "postgresql":
        array = bindparam(name, type_=ARRAY(column.type), **given)
        return column != all_(array) if negated else column == any_(array)
    listed = bindparam(name, type_=column.type, expanding=True, **given)
    return column.not_in(listed) if negated else column.in_(listed)


def json_text_param(dialect: str, name: str) -> ColumnElement[Any]:
    """A JSON document's column set from the text given as parameter ``name``, already
    encoded (``CAST(:name AS JSONB)`` on PostgreSQL, the text as it is on SQLite), for
    a statement built once: the column's own type would encode it again."""
    given = bindparam(name, type_=Text())
    if dialect == "postgresql":
        return cast(given, JSONB)
    return given


def updating(table: Any, *, by: str, param: str, columns: Sequence[str]) -> Update:
    """``UPDATE table SET c = :new_c, ... WHERE by = :param``, built once (``Prebuilt``
    says why). Each column's value is the parameter ``new_<column>``: SQLAlchemy
    reserves the columns' own names in SET."""
    return (
        update(table)
        .where(table.c[by] == bindparam(param))
        .values({name: bindparam(f"new_{name}") for name in columns})
    )


S = TypeVar("S")


class Prebuilt(Generic[S]):
    """A statement built once for each kind of database, then run again and again.

    Building a statement (``select(...).where(...)``) and computing its cache key costs
    SQLAlchemy more than running a small one: about 200 microseconds against 35 for a
    prebuilt select on SQLite (measured on the CI machine kind). A push of one scan runs
    a dozen statements, so those on the push path are built here once, with ``bindparam``
    for what varies. Per dialect, because ``among`` is spelled apart on PostgreSQL.
    ``execute`` and ``run`` go further: they run it on the driver's cursor
    (``sync.direct``), not through SQLAlchemy's execution of it.
    """

    def __init__(self, build: Callable[[str], S]) -> None:
        self._build = build
        self._built: dict[str, S] = {}
        # By dialect object: engines may convert values differently (json_serializer).
        self._direct: weakref.WeakKeyDictionary[Dialect, DirectStatement] = (
            weakref.WeakKeyDictionary()
        )
        # The dialect last run on and its statement: a service has one, and looking it
        # up in ``_direct`` (a weak reference made per look-up) cost each statement of
        # the writers' turn more than this. Holds that one dialect alive, no more.
        self._last: tuple[Dialect, DirectStatement] | None = None

    def __call__(self, session: Session) -> S:
        return self._for(session.get_bind().dialect.name)

    def _for(self, dialect: str) -> S:
        built = self._built.get(dialect)
        if built is None:  # two threads may both build it: either copy serves
            built = self._built[dialect] = self._build(dialect)
        return built

    def execute(self, session: Session, params: Mapping[str, Any]) -> Rows:
        """``run`` on the session's ``flushed_connection``."""
        return self.run(flushed_connection(session), params)

    def execute_rows(self, session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run it for each of ``rows``: one row directly (``execute``), more in one
        ``executemany`` through SQLAlchemy, which batches them faster."""
        if len(rows) == 1:
            self.execute(session, rows[0])
        elif rows:
            flushed_connection(session).execute(self(session), list(rows))  # type: ignore[call-overload]

    def run(self, connection: Connection, params: Mapping[str, Any]) -> Rows:
        """Run it once with ``params``, on the driver's cursor (``sync.direct``) unless
        SQLAlchemy must do it; the rows it returns, if any."""
        dialect = connection.dialect
        last = self._last
        if last is not None and last[0] is dialect:
            direct = last[1]
        else:
            found = self._direct.get(dialect)
            if found is None:
                found = self._direct[dialect] = DirectStatement(self._for(dialect.name), dialect)
            direct = found
            self._last = (dialect, direct)
        template = direct.template(params)
        if template is not None and ready(connection):
            return direct.run(connection, template, params)
        result = connection.execute(self._for(dialect.name), params)  # type: ignore[call-overload]
        return Rows(result.all() if result.returns_rows else ())


def plain_rows(
    session: Session, query: Select[Any], params: Mapping[str, Any] | None = None
) -> CursorResult[Any]:
    """The rows of a select of columns, without the ORM's work on each row.

    ``session.execute`` hands an ORM-enabled statement's rows to the ORM loader, which
    costs as much again as fetching them: on the station board's hundred thousand
    events, a second of a worker's time. Run on ``flushed_connection``.
    """
    return flushed_connection(session).execute(query, params)


def flushed_connection(session: Session) -> Connection:
    """The session's connection (its one bind, in its transaction), after flushing what
    the session holds when it autoflushes, as ``session.execute`` would.

    For Core statements on the push path: ``session.execute`` first works out whether
    the statement is an ORM one and how to run it, which costs about half as much
    again as running a small one on SQLite (16 against 25 microseconds for an update
    by key, measured on the CI machine kind).

    The connection is kept in the session's ``info`` with the transaction it was asked
    for, and given again while that transaction is still the session's innermost and
    active: asking the session for it costs about 25 microseconds, and a push asks a
    dozen times.
    """
    if session.autoflush:
        session.flush()
    # The innermost: a nested transaction's SAVEPOINT is sent when it first asks the
    # session for its connection.
    transaction = session.get_nested_transaction() or session.get_transaction()
    kept = session.info.get(_KEPT_CONNECTION)
    if kept is not None and transaction is kept[0] and transaction.is_active:
        connection: Connection = kept[1]
        return connection
    connection = session.connection()
    innermost = session.get_nested_transaction() or session.get_transaction()
    session.info[_KEPT_CONNECTION] = (innermost, connection)
    return connection


_KEPT_CONNECTION = "sync.sql.flushed_connection"


def insert_ignoring_conflict(dialect: str, table: Any, *, on: Sequence[str]) -> Any:
    """``INSERT INTO table ... ON CONFLICT (on) DO NOTHING`` for the dialect named (both
    databases spell it alike; SQLAlchemy has a construct per dialect). Add ``.values``."""
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=list(on))
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=list(on))
    raise NotImplementedError(f"no INSERT ... ON CONFLICT for {dialect}")  # pragma: no cover


def among_at_once(
    session: Session, column: InstrumentedAttribute[Any], values: Sequence[Any]
) -> ColumnElement[bool]:
    """``column IN (values)`` in one parameter however many ``values`` (no ``chunks``):
    on PostgreSQL ``column = ANY(:array)``, on SQLite ``column IN (SELECT value FROM
    json_each(:json))``. For reads whose statement count must not grow with their keys.
    Both planners probe an index on ``column`` once per value."""
    if session.get_bind().dialect.name == "postgresql":
        return among(session, column, values)
    listed = func.json_each(literal(json.dumps(list(values)))).table_valued("value")
    return column.in_(select(listed.c.value))


T = TypeVar("T")
R = TypeVar("R")
# Keys per IN list: well below SQLite's and PostgreSQL's bound-parameter limits.
IN_CHUNK = 900


def chunks(items: Sequence[T], size: int = IN_CHUNK) -> Iterator[Sequence[T]]:
    """``items`` in slices of ``size``, for look-ups by many keys."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


# Volatile functions in the select list run after ORDER BY, so the locks come in order.
_ADVISORY_LOCKS = text(
    "SELECT pg_advisory_xact_lock(:space, hashtext(key)) "
    "FROM unnest(CAST(:keys AS text[])) WITH ORDINALITY AS given(key, position) "
    "ORDER BY position"
)


def advisory_locks(session: Session, space: int, keys: Iterable[str]) -> None:
    """Transaction-scoped two-key advisory locks on ``keys`` in ``space``, taken in
    sorted order (PostgreSQL; nothing elsewhere). They cover keys no row holds yet,
    which a row lock cannot: the callers say what each space serializes."""
    wanted = sorted(set(keys))
    if not wanted or session.get_bind().dialect.name != "postgresql":
        return
    connection = flushed_connection(session)
    for chunk in chunks(wanted):
        connection.execute(_ADVISORY_LOCKS, {"space": space, "keys": list(chunk)})


def rows_among(
    session: Session,
    query: Select[Any] | Prebuilt[Any],
    name: str,
    values: Sequence[Any],
    params: Mapping[str, Any] | None = None,
) -> Iterator[Any]:
    """The rows of a query built with ``among_param(..., name)``, for every value of
    ``values``: one execution per ``chunks`` of them (``Prebuilt.execute`` for a
    prebuilt query, else ``plain_rows``)."""
    for chunk in chunks(values):
        given = {**(params or {}), name: list(chunk)}
        if isinstance(query, Prebuilt):
            yield from query.execute(session, given)
        else:
            yield from plain_rows(session, query, given)


def created_once(
    session: Session, find: Callable[[], R | None], create: Callable[[], R]
) -> tuple[R, bool]:
    """What ``find`` finds, else what ``create`` makes: ``(row, made)``. For a row a
    caller names by its own id (a channel's consent, a PDA's consent request) under a
    unique index: a retry finds the first attempt's row. Two attempts at once: the index
    makes the second insert wait for the first's commit and fail; it then answers the
    first's row (a savepoint keeps the rest of the transaction)."""
    earlier = find()
    if earlier is not None:
        return earlier, False
    try:
        with session.begin_nested():
            return create(), True
    except IntegrityError:
        earlier = find()
        if earlier is None:
            raise
        return earlier, False
