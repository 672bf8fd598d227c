"""Prebuilt statements run on the driver's cursor, without SQLAlchemy's work per execution.

For each execution of a compiled statement SQLAlchemy builds an execution context,
turns the parameters into the driver's form (expanding ``IN`` lists, converting each
value), makes a result object and converts each row: about 80 microseconds for a
one-row select on SQLite on the CI machine kind, against 10 for the driver alone
(measured with the parcel select of ``sync.status``). A push of one scan runs a
dozen such statements, most of them in SQLite's writers' turn, which every push
waits for.

So SQLAlchemy works all of that out once per statement and per shape (how long
each ``IN`` list is), with its own public pieces: ``construct_expanded_state``
for the SQL text and the order of its parameters, the types' bind and result
processors for the conversions. Each execution then only fills the template in,
runs it on the connection's cursor and converts the rows; what it returns is
``Rows``, plain tuples with the columns' names as attributes.

What SQLAlchemy still does for these statements: the transaction (``BEGIN`` and
the writers' turn, savepoints but ``undone_if_refused``'s, commit); the Python-side
defaults of the columns an ``INSERT`` or ``UPDATE`` leaves out, which it says how to
compute; and the errors, through its own handling (a driver error as
``IntegrityError``, ``OperationalError`` ..., parameters hidden as the engine hides
them, a lost connection invalidated). ``before_cursor_execute`` and
``after_cursor_execute`` listeners are called as SQLAlchemy calls them, but with no
execution context (the tests and benchmarks count statements with them); the
engine's ``echo`` does not log these statements.

Some statements still run through SQLAlchemy (``DirectStatement.template`` gives
none): one whose SQL text or values SQLAlchemy makes anew for each run
(``literal_execute`` or callable parameters), one with escaped parameter names, a
tuple ``IN`` list, or a default computed otherwise than by a Python function or
value, and one given a list of keys (an ``IN`` list, an array) longer than
``LONGEST_LIST``. So does an ``executemany`` (``sync.sql.Prebuilt.execute_rows``):
SQLAlchemy's batching of many rows is faster than anything done here.
"""

from __future__ import annotations

import contextlib
import threading
from collections import namedtuple
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

from sqlalchemy import ARRAY, Connection, Dialect
from sqlalchemy.exc import MultipleResultsFound, NoResultFound
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.sqltypes import TupleType

Processor = Callable[[Any], Any] | None
# The longest list of keys run directly (an IN list, an array on PostgreSQL). Longer,
# it is a bulk push's: its statement reads hundreds of rows, which SQLAlchemy's
# compiled row processing converts faster than the loop here, and on SQLite a
# template per length would hold hundreds of statements' text.
LONGEST_LIST = 32


class Rows(list[Any]):
    """The rows of a direct execution, with the part of ``CursorResult``'s interface
    the services use on a fetched result."""

    def all(self) -> list[Any]:
        return list(self)

    def first(self) -> Any:
        return self[0] if self else None

    def one(self) -> Any:
        if not self:
            raise NoResultFound("No row was found when one was required")
        return self.one_or_none()

    def one_or_none(self) -> Any:
        if len(self) > 1:
            raise MultipleResultsFound("Multiple rows were found when one or none was required")
        return self[0] if self else None

    def scalar(self) -> Any:
        return self[0][0] if self else None

    def scalar_one(self) -> Any:
        return self.one()[0]

    def scalars(self) -> list[Any]:
        return [row[0] for row in self]


class _Template:
    """The statement for one shape of parameters: its SQL, how to make each of its
    driver parameters from the caller's, and (after its first rows) their type."""

    def __init__(self, sql: str, slots: list[_Slot], names: list[str] | None) -> None:
        self.sql = sql
        self.slots = slots
        self.names = names  # a dialect with named parameters (psycopg): their names
        self.row_type: Any = None
        self.result_processors: list[Processor] = []
        # Which columns are converted, and whether NULL may be left as it is there
        # (``_converted``): learned with the processors.
        self.converting: list[tuple[int, Callable[[Any], Any], bool]] = []

    def parameters(self, params: Mapping[str, Any]) -> Any:
        values = []
        for kind, source, index, processor in self.slots:
            if kind is _CONSTANT:
                values.append(source)
                continue
            if kind is _PARAM:
                value = params[source]
            elif kind is _ITEM:
                value = params[source][index]
            elif source.is_callable:  # a column's Python-side default, given a context
                value = source.arg(_DefaultContext(params))
            else:
                value = source.arg
            values.append(value if processor is None else processor(value))
        if self.names is None:
            return tuple(values)
        return dict(zip(self.names, values, strict=True))


# Where a driver parameter comes from: the caller's value of that name, an item of one
# of the caller's lists (an expanded IN), a column's default (a column of an INSERT
# not given, as SQLAlchemy fills it in), or a value fixed in the statement (converted
# once); then the name, default or value, the item's index, and the conversion.
_PARAM, _ITEM, _DEFAULT, _CONSTANT = "param", "item", "default", "constant"
_Slot = tuple[str, Any, int, Processor]


class _DefaultContext:
    """What a context-sensitive default function may ask of SQLAlchemy's execution
    context: the statement's parameters (``get_current_parameters``)."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.current_parameters = dict(params)

    def get_current_parameters(self, isolate_multiinsert_groups: bool = True) -> dict[str, Any]:
        return self.current_parameters


def ready(connection: Connection) -> bool:
    """Whether ``connection`` may take a statement run directly: it is in a transaction
    that can take one, begun here as SQLAlchemy begins one on first use. Not: one that
    failed and awaits its rollback, or whose connection was lost (invalidated), on
    which SQLAlchemy refuses to run anything (so it runs the statement and raises what
    it raises: ``PendingRollbackError``)."""
    if connection.invalidated:
        return False
    transaction = connection.get_transaction()
    if transaction is None:
        connection.begin()
        return True
    nested = connection.get_nested_transaction()
    return transaction.is_active and (nested is None or nested.is_active)


class DirectStatement:
    """One statement for one dialect, with a template per shape of its parameters: which
    names are given (an ``INSERT`` or ``UPDATE`` sets those columns, as SQLAlchemy
    compiles it for them) and how long each ``IN`` list is."""

    def __init__(self, statement: Any, dialect: Dialect) -> None:
        self.statement = statement
        self.dialect = dialect
        columns = getattr(statement, "selected_columns", None)
        if columns is None:
            columns = statement.exported_columns  # INSERT/UPDATE ... RETURNING
        self.columns = list(columns)
        binds = statement.compile(dialect=dialect).binds.values()
        # The IN lists given as parameters (``sync.sql.among_param`` on SQLite): each
        # length of each has a template of its own.
        self.expanding = [bind.key for bind in binds if bind.expanding]
        # The parameters that take a list of keys: those, and arrays (``among_param`` on
        # PostgreSQL). Only their lengths can send the statement to SQLAlchemy
        # (``LONGEST_LIST``); a list in another is a value like any (a JSON document).
        self.listed = [
            bind.key for bind in binds if bind.expanding or isinstance(bind.type, ARRAY)
        ]
        self._templates: dict[tuple[Any, ...], _Template | None] = {}
        self._lock = threading.Lock()

    def template(self, params: Mapping[str, Any]) -> _Template | None:
        """The template for the shape of ``params``; None when SQLAlchemy must run it."""
        for name in self.listed:  # most statements have none: no loop over their values
            value = params.get(name)
            if value is not None and len(value) > LONGEST_LIST:
                return None
        if self.expanding:
            shape = (*params, *(len(params[name]) for name in self.expanding if name in params))
        else:  # most statements: no generator made for lists they have none of
            shape = (*params,)
        try:
            return self._templates[shape]
        except KeyError:
            with self._lock:
                template = self._templates[shape] = self._template(params)
            return template

    def run(self, connection: Connection, template: _Template, params: Mapping[str, Any]) -> Rows:
        """Run the template on ``connection``, which ``ready`` said may take it."""
        # A statement with columns returns rows; one without may too (an INSERT of one
        # row returns its key on PostgreSQL unasked, SQLAlchemy's "implicit returning"):
        # not wanted here. The columns say it without asking the cursor's description,
        # which psycopg builds anew each time it is asked: only for the first rows.
        fetched = _on_cursor(
            connection,
            template.sql,
            partial(template.parameters, params),
            fetch=bool(self.columns),
            described=None
            if template.row_type is not None
            else partial(self._learn_rows, template),
        )
        if not fetched:
            return Rows()
        return Rows(_converted(fetched, template.row_type, template.converting))

    def _template(self, params: Mapping[str, Any]) -> _Template | None:
        """Ask SQLAlchemy for the SQL and parameters of this shape, and note where each
        driver parameter comes from."""
        compiled = self.statement.compile(dialect=self.dialect, column_keys=list(params))
        assert isinstance(compiled, SQLCompiler)
        defaults = {
            **{column.key: column.default for column in compiled.insert_prefetch},
            **{column.key: column.onupdate for column in compiled.update_prefetch},
        }
        binds = compiled.binds.values()
        if (
            compiled.escaped_bind_names
            or compiled.schema_translate_map
            or compiled.literal_execute_params  # rendered into the SQL text per value
            or any(bind.callable is not None for bind in binds)  # a value made per run
            or any(bind.expanding and isinstance(bind.type, TupleType) for bind in binds)
            or not all(d.is_scalar or d.is_callable for d in defaults.values())
        ):
            return None
        state = compiled.construct_expanded_state({**{name: None for name in defaults}, **params})
        processors: dict[str, Processor] = {
            name: bind.type.dialect_impl(self.dialect).bind_processor(self.dialect)
            for name, bind in compiled.binds.items()
        }
        processors.update(state.processors)
        expanded_from = {
            expanded: (name, index)
            for name, names in state.parameter_expansion.items()
            for index, expanded in enumerate(names)
        }
        positional = state.positiontup is not None
        names = list(state.positiontup or ()) if positional else list(state.parameters)
        slots: list[_Slot] = []
        for name in names:
            processor = processors.get(name)
            source = expanded_from.get(name)
            if source is not None and source[0] in params:
                slots.append((_ITEM, source[0], source[1], processor))
            elif name in params:
                slots.append((_PARAM, name, 0, processor))
            elif name in defaults:
                slots.append((_DEFAULT, defaults[name], 0, processor))
            else:
                value = state.parameters[name]
                fixed = value if processor is None else processor(value)
                slots.append((_CONSTANT, fixed, 0, None))
        return _Template(state.statement, slots, None if positional else names)

    def _learn_rows(self, template: _Template, description: Sequence[Any]) -> None:
        if len(description) != len(self.columns):  # pragma: no cover - a statement's bug
            raise RuntimeError(f"{len(description)} columns came back, {len(self.columns)} asked")
        template.result_processors = [
            column.type.dialect_impl(self.dialect).result_processor(self.dialect, described[1])
            for column, described in zip(self.columns, description, strict=True)
        ]
        template.converting = [
            (index, processor, _keeps_null(processor))
            for index, processor in enumerate(template.result_processors)
            if processor is not None
        ]
        # The names the statement gave its columns, as SQLAlchemy's rows have them.
        names = [described[0] for described in description]
        template.row_type = namedtuple("Row", names, rename=True)  # type: ignore[misc]


def _on_cursor(
    connection: Connection,
    sql: str,
    parameters: Callable[[], Any],
    fetch: bool,
    described: Callable[[Sequence[Any]], None] | None = None,
) -> list[Any]:
    """Run ``sql`` with the driver parameters ``parameters()`` makes on a cursor of
    ``connection``; its rows if ``fetch`` (and the cursor's description to
    ``described`` when there are some)."""
    # SQLAlchemy's own guard: only a connection or engine with listeners of connection
    # events dispatches them (asking each collection whether it has any costs more).
    dispatch = (
        connection.dispatch if connection._has_events or connection.engine._has_events else None
    )
    made: Any = None
    cursor = None
    try:
        made = parameters()
        # The driver's own, not through the pool's proxy (``cursor`` there is that call).
        cursor = connection.connection.dbapi_connection.cursor()
        if dispatch is not None and dispatch.before_cursor_execute:
            dispatch.before_cursor_execute(connection, cursor, sql, made, None, False)
        cursor.execute(sql, made)
        if dispatch is not None and dispatch.after_cursor_execute:
            dispatch.after_cursor_execute(connection, cursor, sql, made, None, False)
        fetched = cursor.fetchall() if fetch else []
        if fetched and described is not None:
            described(cursor.description)
        cursor.close()
    except BaseException as error:
        # What SQLAlchemy does with an error of its own execution (exec_driver_sql's
        # too): the driver's error as SQLAlchemy's class, parameters hidden as the
        # engine hides them, any other wrapped in StatementError, handle_error
        # listeners told, the cursor closed; a lost connection invalidated, with the
        # pool's older connections. Private, but one method in SQLAlchemy 2.0 and
        # 2.1 (pyproject.toml keeps it below 2.2); tests/sync/test_direct.py checks it.
        connection._handle_dbapi_exception(error, sql, made, cursor, None)
    return fetched


@contextlib.contextmanager
def undone_if_refused(connection: Connection) -> Iterator[None]:
    """A savepoint around statements run on ``connection`` (in its transaction): what
    they did is undone if one of them raises, and the transaction goes on.

    What ``Connection.begin_nested`` does, without its work: SQLAlchemy compiles its
    ``SAVEPOINT`` and ``RELEASE`` anew each time and keeps a nested transaction for
    them, about 8 % of a one-scan push's samples on PostgreSQL under py-spy (the
    push's insert is the only statement in it). SQLAlchemy does not know of this
    savepoint, nor does the ORM: the block runs Core statements only, and nothing in
    it may flush a session or begin or end a transaction of SQLAlchemy's (an object
    flushed in it and undone would stay persistent in its session).
    """
    if not ready(connection):  # SQLAlchemy's own, to raise what it raises there
        with connection.begin_nested():
            yield
        return
    within = _innermost(connection)
    _command(connection, "SAVEPOINT direct_undo")
    try:
        yield
    except BaseException:
        # Undone unless the savepoint went already, with the transaction it was in: a
        # lost connection's, or one SQLAlchemy rolled back (its error is the one to
        # raise, not "no such savepoint").
        if _innermost(connection) is within and within.is_active and not connection.invalidated:
            _command(connection, "ROLLBACK TO SAVEPOINT direct_undo")
        raise
    _command(connection, "RELEASE SAVEPOINT direct_undo")


def _innermost(connection: Connection) -> Any:
    return connection.get_nested_transaction() or connection.get_transaction()


def _command(connection: Connection, sql: str) -> None:
    _on_cursor(connection, sql, tuple, fetch=False)


def _keeps_null(processor: Callable[[Any], Any]) -> bool:
    """Whether ``processor`` gives NULL back as it is (SQLAlchemy's own types all do;
    a ``TypeDecorator`` may make something of it): asked once, with the processors."""
    try:
        return processor(None) is None
    except Exception:
        return False


def _converted(
    fetched: Iterable[Sequence[Any]],
    row_type: Any,
    converting: Sequence[tuple[int, Callable[[Any], Any], bool]],
) -> list[Any]:
    """The driver's rows as ``row_type``, each column that has a processor converted
    (``converting``: its index, its processor, whether NULL stays NULL). Only those
    columns are visited, and a NULL that stays NULL is not handed to its processor: a
    parcel's history is read with its events' payloads NULL but for its final outcomes
    (``sync.status.load_events``), and a PDA that scanned one parcel 25,000 times made
    each later push of it call a processor for each of those NULLs."""
    make = row_type._make
    if not converting:
        return [make(row) for row in fetched]
    rows = []
    for row in fetched:
        values = list(row)
        for index, processor, keeps_null in converting:
            value = values[index]
            if value is not None or not keeps_null:
                values[index] = processor(value)
        rows.append(make(values))
    return rows
