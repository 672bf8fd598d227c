"""One engine and one sessionmaker per app; one session per request, closed on teardown.

The extension object is created unbound (``courier_api.extensions.db``); its
state lives in ``app.extensions`` so that several apps (tests) never share it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import Flask, current_app, g, has_request_context, request
from flask import session as cookie_session
from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from models.engine import (
    has_own_readers,
    make_engine,
    reads_only,
    refuse_writes,
    set_statement_timeout,
)
from sync.sql import aborted_for_a_conflict, flushed_connection

EXTENSION_KEY = "courier_api.database"
T = TypeVar("T")
# ``Database.kept_across_runs``: writes what the request's runs kept (the dict), in the
# session given, when no run stored it.
KeptWriter = Callable[[Session, dict[Any, Any]], None]
log = logging.getLogger(__name__)

# The answer's code when PostgreSQL aborted the request's transaction every time it was
# run (deadlocks or serialization failures with concurrent work,
# ``dispatched_retrying_conflicts``): nothing was stored, and the same request may be
# sent again after CONFLICT_RETRY_AFTER_SECONDS.
TRANSACTION_CONFLICT = "transaction_conflict"
CONFLICT_RETRY_AFTER_SECONDS = 2


@dataclass
class _State:
    engine: Engine
    sessionmaker: sessionmaker[Session]
    reader: Engine  # for requests that only read (``models.engine.reads_only``)
    # A test's connection that every session is bound to (``bind_to_connection``).
    test_connection: Connection | None = None


class Database:
    def init_app(self, app: Flask) -> None:
        engine = make_engine(app.config["DATABASE_URL"])
        app.extensions[EXTENSION_KEY] = _State(
            engine=engine,
            sessionmaker=sessionmaker(bind=engine, expire_on_commit=False),
            reader=reads_only(engine),
        )
        app.teardown_appcontext(self._close_session)
        app.teardown_request(self._forget_commits)
        seconds = app.config.get("DATABASE_STATEMENT_TIMEOUT_SECONDS", 0)
        if engine.dialect.name == "postgresql" and seconds:
            _bound_statements(app, seconds)

    @staticmethod
    def _state(app: Flask | None = None) -> _State:
        # Out of its proxy: ``courier_api.logs._start_request`` says why.
        state: _State = (app or current_app._get_current_object()).extensions[EXTENSION_KEY]  # type: ignore[attr-defined]
        return state

    @property
    def engine(self) -> Engine:
        return self._state().engine

    def engine_of(self, app: Flask) -> Engine:
        return self._state(app).engine

    def forget_inherited_connections(self, app: Flask) -> None:
        """In a forked worker: new pools for the engine and its readers, leaving the
        connections inherited from the parent unclosed (they are the parent's)."""
        state = self._state(app)
        if has_own_readers(state.engine):
            state.reader.dispose(close=False)
        state.engine.dispose(close=False)

    def sessionmaker_of(self, app: Flask) -> sessionmaker[Session]:
        """Sessions outside requests (the scheduler: one session per transaction)."""
        return self._state(app).sessionmaker

    @property
    def session(self) -> Session:
        """The session of the current request (or CLI command), opened on first use:
        on the reading engine for a view that declares it only reads (``READS_ONLY``)."""
        # ``g`` out of its proxy once: ``courier_api.logs._start_request`` says why.
        ctx = g._get_current_object()  # type: ignore[attr-defined]
        session: Session | None = ctx.get("db_session")
        if session is None:
            state = self._state()
            if not _request_only_reads():
                session = ctx.db_session = state.sessionmaker()
            elif state.test_connection is None:
                session = ctx.db_session = state.sessionmaker(bind=state.reader)
            else:  # tests: the shared connection refuses writes while the request runs
                refuse_writes(state.test_connection, True)
                ctx.db_refused_writes = True
                session = ctx.db_session = state.sessionmaker()
        return session

    def read_apart(self, read: Callable[[Session], T], check: Callable[[Connection], T]) -> T:
        """A request's first work, a check that only reads: ``read`` in the request's
        session for a request that only reads; for one that writes, ``check`` (the
        same check on plain rows, without the ORM's entities) as the first statement
        of the request's transaction; on a SQLite file, in a reading transaction of
        its own first, ended before the request writes, then again so.

        For the signing-in check: a writing transaction on a SQLite file holds the
        one writers' turn from its first statement (``models.turnstile``), so a
        writing request would hold up every push through its sign-in check and the
        parsing of its body (the push itself checks only in its transaction, after
        parsing: ``check_when_writing``). Run again,
        ``check`` (one plain row) keeps the check as good as it was: an account
        disabled or a device reported lost while the request waited for its turn
        stops it still, and its refusal stands for the request (a view catching it
        cannot commit).

        On PostgreSQL (and an in-memory SQLite) a writing request's ``check`` is its
        first statement: loading the user and device as the ORM's entities costs
        more (up to half a millisecond of a one-scan push's CPU there, measured
        alternately in one process), and a push has no use for them. A request that
        only reads, or whose session was opened before, gets ``read``.
        """
        state = self._state()
        if "db_session" in g or _request_only_reads():
            return read(self.session)
        if not has_own_readers(state.engine):
            return check(flushed_connection(self.session))
        if state.test_connection is None:
            with state.reader.connect() as connection:
                result = check(connection)
        else:  # tests: the shared connection, refusing writes meanwhile
            refuse_writes(state.test_connection, True)
            try:
                result = check(state.test_connection)
            finally:
                refuse_writes(state.test_connection, False)
        self.session.info[_RECHECK] = check
        return result

    def write_apart(self, write: Callable[[Session], T]) -> T:
        """``write`` in a writing transaction of its own, committed before this returns:
        for a request that only reads (``READS_ONLY``) and must note something short first
        (a rate limit's count), without making its whole read a writer's (on a SQLite
        file, the one writers' turn for as long as it reads).

        The request's own transaction, if begun, ends first: on a SQLite file that could
        not be put in WAL mode a writer's commit waits for the readers, this request's
        too. In tests, on their shared connection, writes are allowed meanwhile. Ending
        that reading transaction stores nothing of the request: ``write`` aborted for a
        conflict still has the whole request run again (``dispatched_retrying_conflicts``).
        """
        state = self._state()
        if "db_session" in g and g.db_session.in_transaction():
            stored_before = g.get(_COMMITTED, False)
            g.db_session.commit()  # it only read: nothing to write, its snapshot ends
            if _request_only_reads():  # nothing stored: a conflict may still run it again
                setattr(g, _COMMITTED, stored_before)
        refusing = state.test_connection if g.get("db_refused_writes", False) else None
        if refusing is not None:
            refuse_writes(refusing, False)
        try:
            with state.sessionmaker() as session, session.begin():
                return write(session)
        finally:
            if refusing is not None:
                refuse_writes(refusing, True)

    def reads_from_here(self) -> None:
        """The rest of the request only reads, as a view that sets ``READS_ONLY`` does: for
        a writing request whose action was refused (rolled back) that shows a page read
        anew, so that on a SQLite file the page's reads (a shift's, its images hashed)
        hold no writers' turn. The request's transaction ends, rolled back (on SQLite, the
        turn given back at once), and its session reads on as a reading view's: on the
        reading engine (in tests, the shared connection refusing writes until the request
        ends). The objects it loaded (the viewer's account) stay in it, read again from
        the reading transaction when used."""
        setattr(g, _READS_FROM_HERE, True)
        session = g.get("db_session")
        if session is None:
            return  # opened as a reading view's on first use
        session.rollback()
        state = self._state()
        if state.test_connection is None:
            session.bind = state.reader
        else:
            refuse_writes(state.test_connection, True)
            g.db_refused_writes = True

    @staticmethod
    def request_only_reads() -> bool:
        """Whether the current request runs in transactions that only read (its view
        sets ``READS_ONLY``, a GET or HEAD): what it must write, it writes apart
        (``write_apart``)."""
        return _request_only_reads()

    @staticmethod
    def checks_when_writing() -> bool:
        """Whether the current request's view sets ``SIGN_IN_CHECKED_WHEN_WRITING``:
        a view that writes in every request it answers with success, and does nothing
        a refused request must not do before its first statement (the sync push)."""
        return _view_says("SIGN_IN_CHECKED_WHEN_WRITING")

    def check_when_writing(self, check: Callable[[Connection], Any]) -> None:
        """``check`` as the first statement of the request's transaction, when it
        begins (at once if it has): its refusal stands for the request, as the recheck's
        of ``read_apart`` does. On SQLite that statement is the first in the writers'
        turn: no reading transaction before it."""
        session = self.session
        if session.in_transaction():
            check(flushed_connection(session))
        else:
            session.info[_RECHECK] = check

    def dispatched_retrying_conflicts(self, dispatch: Callable[[], T], *, attempts: int) -> T:
        """The request's view (``dispatch``), run again whole in a fresh session when
        PostgreSQL aborted its transaction for a deadlock or a serialization failure
        (``aborted_for_a_conflict``), up to ``attempts`` runs in all; then the error
        stands (a 503 ``transaction_conflict``: ``courier_api.errors``).

        Only while a second run is the first one's exact replacement: nothing of the
        request committed yet (its session's or one written apart), and the pages'
        cookie session unchanged by the request (a flash, a sign-in, a new form token).
        A run's effects beyond its transaction go through the outbox, written in it
        (an image's bytes are content-addressed: put twice, the same file; what a run found
        there and put right is kept for the next, ``kept_across_runs``, and written apart
        if no run stores it). The view's
        sign-in check (``require_auth``, ``page``) runs again first, in the fresh
        session: an account disabled or a PDA reported lost meanwhile stops it."""
        # Kept for this request's runs alone, even in an app context several share (tests).
        setattr(g, _KEPT_ACROSS_RUNS, {})
        setattr(g, _IF_NOTHING_STORED, {})
        try:
            return self._runs(dispatch, attempts)
        finally:
            self._write_what_runs_kept()

    def _runs(self, dispatch: Callable[[], T], attempts: int) -> T:
        for attempt in range(1, attempts + 1):
            try:
                return dispatch()
            except OperationalError as error:
                if (
                    attempt == attempts
                    or not aborted_for_a_conflict(error)
                    or g.get(_COMMITTED, False)
                    or _cookie_session_changed()
                ):
                    raise
                self._discard_session()
                g.pop(_READS_FROM_HERE, None)  # run again whole: from its start, writing
                log.warning(
                    "request aborted (SQLSTATE %s), run %d of %d: running it again",
                    getattr(error.orig, "sqlstate", None),
                    attempt,
                    attempts,
                )
                time.sleep(random.uniform(0.01, 0.05) * 2**attempt)
        raise AssertionError("unreachable: attempts must be at least 1")

    @staticmethod
    def kept_across_runs(
        name: str, *, if_nothing_stored: KeptWriter | None = None
    ) -> dict[Any, Any]:
        """A dict that every run of the current request shares (``dispatched_retrying_conflicts``
        runs it again in a fresh session, not in a fresh request): what a run did beyond
        its transaction, that the run after it finds done and must still put on record
        (an image's bytes put back: the next run finds them whole).

        ``if_nothing_stored`` puts it on record when no run did: each run writes what it
        keeps in the transaction it commits, so when the runs are over (the last one
        aborted too, a 503; an error not run again; a ``SystemExit`` or ``KeyboardInterrupt``
        in the request's thread; an answer without a commit) with nothing of the request
        committed and the dict not empty, it is called once, with the dict and a session
        of its own committed after it (``write_apart``); the
        request's own session is discarded first, uncommitted. Each run passes the same
        writer; the first one's is kept."""
        if if_nothing_stored is not None:
            g.setdefault(_IF_NOTHING_STORED, {}).setdefault(name, if_nothing_stored)
        kept: dict[Any, Any] = g.setdefault(_KEPT_ACROSS_RUNS, {}).setdefault(name, {})
        return kept

    def _write_what_runs_kept(self) -> None:
        """The ``if_nothing_stored`` writers of ``kept_across_runs``, once the request's
        runs are over, if nothing of it committed. One that fails (the database still
        gone) is logged with what it would have written: the server's log then holds
        what the database does not."""
        writers = g._get_current_object().pop(_IF_NOTHING_STORED, {})  # type: ignore[attr-defined]
        if not writers or g.get(_COMMITTED, False):
            return
        kept_by_name = g.get(_KEPT_ACROSS_RUNS, {})
        pending = [
            (write, kept_by_name[name])
            for name, write in writers.items()
            if kept_by_name.get(name)
        ]
        if not pending:
            return
        self._discard_session()  # nothing of it is stored: write_apart must not commit it
        for write, kept in pending:
            try:
                self.write_apart(lambda session, write=write, kept=kept: write(session, kept))
            except Exception:
                log.exception("what the request's runs found could not be recorded: %s", kept)

    @staticmethod
    def _discard_session() -> None:
        """End the request's session, its transaction rolled back: the next use of
        ``session`` opens a fresh one, with nothing of the old one's state (identity
        map, ``info``) left over."""
        session = g.pop("db_session", None)
        if session is not None:
            session.rollback()
            session.close()

    def rollback(self) -> None:
        """The request's transaction rolled back before its error is answered: a
        connection the database ended since the error (a restart, ``DROP DATABASE ...
        WITH (FORCE)``) has nothing left to undo, and the rollback's failure must not
        replace the answer (a 503, 409 or 422 turned into a 500)."""
        _ended_with_its_connection(self.session.rollback)

    def bind_to_connection(self, app: Flask, connection: Connection) -> None:
        """Tests: run every session of ``app`` inside ``connection``'s outer transaction.

        Sessions commit to savepoints, so the test's final rollback undoes everything.
        """
        state = self._state(app)
        state.sessionmaker = sessionmaker(
            bind=connection, expire_on_commit=False, join_transaction_mode="create_savepoint"
        )
        state.test_connection = connection

    @staticmethod
    def _forget_commits(_exc: BaseException | None) -> None:
        """Whether the request committed something (and whether it only reads from
        some point on) is its own: ``g`` outlives the request when an app context holds
        several (a test's, a CLI's), and the next one, finding it set, would not be run
        again after a conflict (or would read only)."""
        ctx = g._get_current_object()  # type: ignore[attr-defined]  # once (``session``)
        ctx.pop(_COMMITTED, None)
        ctx.pop(_READS_FROM_HERE, None)

    @classmethod
    def _close_session(cls, _exc: BaseException | None) -> None:
        ctx = g._get_current_object()  # type: ignore[attr-defined]  # once (``session``)
        session = ctx.pop("db_session", None)
        if session is not None:
            # The answer is made (committed, refused, or only read). Raised from the
            # teardown, the error escaped every handler: gunicorn's own HTML 500.
            _ended_with_its_connection(session.close)
        if ctx.pop("db_refused_writes", False):  # only ever set on a test's connection
            connection = cls._state().test_connection
            assert connection is not None
            refuse_writes(connection, False)


def _ended_with_its_connection(end: Callable[[], None]) -> None:
    """``end`` the request's transaction (a rollback, the session's close); when the
    database ended its connection since the last statement, the rollback fails with
    nothing left to undo (the transaction ended with the connection, which SQLAlchemy
    then throws away): logged, not raised."""
    try:
        end()
    except SQLAlchemyError as error:
        reason = getattr(error, "orig", None) or error  # the driver's, as 503s log it
        log.warning("the request's transaction ended with its connection: %s", reason)


# ``Database.read_apart``: the sign-in check to run again when the request's session
# begins its transaction, and the refusal it gave, which stands until the session ends.
_RECHECK = "courier_api.recheck"
_REFUSED = "courier_api.refused"


@event.listens_for(Session, "after_begin")
def _recheck_on_begin(session: Session, _transaction: Any, connection: Connection) -> None:
    recheck = session.info.pop(_RECHECK, None)
    if recheck is None:
        return
    try:
        recheck(connection)
    except Exception as refused:
        session.info[_REFUSED] = refused
        raise


@event.listens_for(Session, "before_commit")
def _refusal_stands(session: Session) -> None:
    """A view that caught the recheck's refusal (a ``DomainError`` handler around a
    statement) must not commit what it wrote after it."""
    refused = session.info.get(_REFUSED)
    if refused is not None:
        raise refused


# ``g``: the dicts of ``Database.kept_across_runs``, by name, and their writers for a
# request that stores nothing.
_KEPT_ACROSS_RUNS = "courier_api.kept_across_runs"
_IF_NOTHING_STORED = "courier_api.if_nothing_stored"

# ``g``: whether anything of the current request has committed (``dispatched_retrying_conflicts``).
_COMMITTED = "db_committed"
# ``g``: whether the rest of the current request only reads (``Database.reads_from_here``).
_READS_FROM_HERE = "db_reads_from_here"


@event.listens_for(Session, "after_commit")
def _note_commit(session: Session) -> None:
    """A savepoint released (``begin_nested``) commits nothing: PostgreSQL may still
    abort the whole transaction, which a second run then replaces exactly."""
    if has_request_context() and not session.in_nested_transaction():
        g.db_committed = True


def _cookie_session_changed() -> bool:
    """Whether the request changed the pages' cookie session (its ``modified`` read
    alone: reading a key would mark it accessed, adding ``Vary: Cookie`` to answers)."""
    return has_request_context() and bool(getattr(cookie_session, "modified", False))


# Safe methods of views that set READS_ONLY = True: their whole request, signing-in
# check included, runs in transactions that only read.
_READING_METHODS = frozenset({"GET", "HEAD"})


def _request_only_reads() -> bool:
    if not has_request_context():
        return False
    if g._get_current_object().get(_READS_FROM_HERE, False):  # type: ignore[attr-defined]
        return True
    if request._get_current_object().method not in _READING_METHODS:  # type: ignore[attr-defined]
        return False
    return _view_says("READS_ONLY")


def _view_says(flag: str) -> bool:
    """Whether the current request's view (a function, or a ``MethodView``'s class)
    sets ``flag``."""
    if not has_request_context():
        return False
    endpoint = request._get_current_object().endpoint  # type: ignore[attr-defined]
    view = current_app._get_current_object().view_functions.get(endpoint or "")  # type: ignore[attr-defined]
    return bool(
        getattr(view, flag, False) or getattr(getattr(view, "view_class", None), flag, False)
    )


View = TypeVar("View", bound=Callable[..., Any])


def only_reads(view: View) -> View:
    """``READS_ONLY`` for a function view (a ``MethodView`` sets the class attribute):
    put it above the route decorator."""
    view.READS_ONLY = True  # type: ignore[attr-defined]
    return view


def _bound_statements(app: Flask, seconds: int) -> None:
    """A web request's statements on PostgreSQL get ``DATABASE_STATEMENT_TIMEOUT_SECONDS``
    (``models.engine.set_statement_timeout``): a courier's PDA gets a 503 to send again,
    not an answer that never comes, from a database that stopped answering. Every
    statement of the slowest requests (an audit walk, an export) reads a thousand rows
    at most, well within it; CLI commands, migrations and the scheduler are unbounded.
    (SQLite has its busy timeout, and no hooks here: they cost every request.)"""
    app.before_request(lambda: set_statement_timeout(seconds))
    app.teardown_request(lambda _error: set_statement_timeout(None))
