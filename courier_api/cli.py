"""The ``courier-api`` command: a Flask CLI group over ``create_app()``."""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click
from flask import Flask, current_app, has_app_context
from flask.cli import AppGroup, FlaskGroup, ScriptInfo, pass_script_info, with_appcontext
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError

from courier_api.config import masked_url
from courier_api.extensions import db
from courier_api.logs import ACCESS_LOGGER
from models import DeviceStatus, Role
from models import migrate as migrations
from sync import audit, device_moves, directory
from sync.errors import DomainError


def main() -> None:
    courier_cli().main(prog_name="courier-api")


def courier_cli(create_app: Callable[[], Flask] | None = None) -> FlaskGroup:
    """The ``courier-api`` group (``create_app``: tests give their app)."""
    cli = CourierCli(
        create_app=create_app or _create_app,
        help="Courier field API.",
        add_version_option=False,  # Flask's prints Flask's version, not the service's
    )
    # Flask's -e/--env-file needs python-dotenv, which the service does not install: the
    # option only ever answered that it must be installed. Settings come from the
    # environment (README, Configuration).
    cli.params = [param for param in cli.params if param.name != "env_file"]
    click.version_option(package_name="courier-api", prog_name="courier-api")(cli)
    # On the group itself, not app.cli: Flask pushes an app context around every
    # app.cli command, and a server must not run inside one (see serve()).
    cli.add_command(serve)
    return cli


class CourierCli(FlaskGroup):
    """Flask's CLI group, telling in one line (exit status 1) what stops any command
    on the database: one that cannot be reached, or one not migrated to the code's
    schema. Any other database error is a bug or worse, and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DBAPIError as error:
            message = database_error_message(
                error,
                ctx.ensure_object(ScriptInfo).load_app(),
                migrating=ctx.invoked_subcommand == db_cli.name,
            )
            if message is None:
                raise
            raise click.ClickException(message) from None


def database_error_message(
    error: DBAPIError, app: Flask, *, migrating: bool = False
) -> str | None:
    """What an operator can do about ``error``, or None when it is none of their doing.
    ``migrating``: a ``db`` command, which a missing table stops only when a migration
    fails (a hand-made change, a migration's bug): not a database to migrate, since it
    is the command migrating it, so it keeps its traceback."""
    url = str(app.config["DATABASE_URL"])
    if _cannot_reach(error):
        reason = " ".join(str(error.orig).split())
        password = make_url(url).password
        if password:
            reason = reason.replace(str(password), "***")
        return f"cannot reach the database at {masked_url(url)}: {reason}"
    if migrating and isinstance(error, OperationalError) and migrations.lock_not_available(error):
        return (
            f"the upgrade of {masked_url(url)} stopped: a migration gave up waiting for a lock "
            f"on its table ({' '.join(str(error.orig).split())}). The migrations before it are "
            "committed. Run `courier-api db upgrade` again once no long transaction holds the "
            "table (pg_stat_activity shows them), or with --lock-timeout 0 to wait for it"
        )
    if not migrating and _names_a_missing_table(error) and not _schema_at_head(app):
        return f"the database at {masked_url(url)} is not migrated: run `courier-api db upgrade`"
    return None


def _cannot_reach(error: DBAPIError) -> bool:
    """Connecting failed (refused, timed out, no such database or role, a password
    refused), or the connection was lost; not a statement the database refused."""
    if error.connection_invalidated:
        return True
    if not isinstance(error, OperationalError):
        return False
    if isinstance(error.orig, sqlite3.Error):
        return str(error.orig).startswith("unable to open database file")
    # psycopg: no SQLSTATE when libpq could not connect or lost the connection; else
    # connection_exception, invalid_authorization, invalid_catalog_name (the database),
    # the server shutting down or starting.
    sqlstate = getattr(error.orig, "sqlstate", None)
    return sqlstate is None or sqlstate.startswith(("08", "28", "3D", "57P"))


def _names_a_missing_table(error: DBAPIError) -> bool:
    """A table or column the code expects is missing (SQLite's message; PostgreSQL's
    undefined_table, undefined_column)."""
    if getattr(error.orig, "sqlstate", None) in ("42P01", "42703"):
        return True
    return str(error.orig).startswith(("no such table", "no such column"))


def _schema_at_head(app: Flask) -> bool:
    """Whether the database is at the code's migrations' head: if it is, a missing
    table is a bug to show, not a migration to run."""
    if has_app_context():  # Flask's group keeps it until the end: so the command's session
        db.session.rollback()  # and its transaction (SQLite's write lock with it)
    try:
        with db.engine_of(app).connect() as connection:
            current = set(migrations.current_revisions(connection))
    except DBAPIError:
        return False
    return current == set(migrations.head_revisions())


def _create_app() -> Flask:
    from courier_api.app import create_app
    from courier_api.config import ConfigError

    try:
        return create_app()
    except ConfigError as error:
        raise click.ClickException(f"configuration: {error}") from None


def register_commands(app: Flask) -> None:
    app.cli.add_command(db_cli)
    app.cli.add_command(audit_cli)
    for command in (
        create_station,
        create_user,
        register_device,
        retire_device,
        move_device,
        seed_demo,
        simulate,
        import_parcels,
        rejudge,
        scheduler,
        deliver,
    ):
        app.cli.add_command(command)


def domain_errors_as_messages(command: Callable[..., None]) -> Callable[..., None]:
    """A domain error ends a command with its message (exit status 1), not a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except DomainError as error:
            raise click.ClickException(error.message) from None

    return wrapper


# -- db ---------------------------------------------------------------------------------------

db_cli = AppGroup("db", help="Database migrations.")


@db_cli.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.option(
    "--lock-timeout",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="PostgreSQL: seconds a migration's statement waits for a table another "
    "transaction holds before it gives up and tries again (0: wait as long as it takes).",
)
@click.option(
    "--attempts",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="PostgreSQL: tries in all when a migration gave up waiting for a lock.",
)
def db_upgrade(revision: str, lock_timeout: float, attempts: int) -> None:
    """Migrate the database to the latest schema (or REVISION).

    On PostgreSQL a migration that alters a table waits for the transactions holding
    it while the station's pushes queue behind it: it waits at most --lock-timeout
    seconds, then, as long again later, the upgrade tries again from that migration
    (those before it are committed), --attempts times in all."""
    pause_seconds = lock_timeout

    def retrying(attempt: int, reason: str) -> None:
        click.echo(
            f"a migration gave up waiting for a lock after {lock_timeout:g} s ({reason}); "
            f"trying again in {pause_seconds:g} s (attempt {attempt + 1} of {attempts}). "
            "pg_stat_activity shows the transactions that hold its table",
            err=True,
        )

    try:
        migrations.upgrade(
            db.engine,
            revision,
            lock_timeout_seconds=lock_timeout or None,
            attempts=attempts,
            pause_seconds=pause_seconds,
            on_retry=retrying,
        )
    except migrations.MigrationRefused as refused:
        raise click.ClickException(str(refused)) from None
    click.echo(f"database at {_safe_url()} is at {revision}")


@db_cli.command("downgrade")
@click.argument("revision")
def db_downgrade(revision: str) -> None:
    """Migrate the database down to REVISION (e.g. base)."""
    try:
        migrations.downgrade(db.engine, revision)
    except migrations.MigrationRefused as refused:
        raise click.ClickException(f"{refused}; {_where_refused_left_it()}") from None
    click.echo(f"database at {_safe_url()} is at {revision}")


@db_cli.command("current")
def db_current() -> None:
    """Show the database's revision and the code's head."""
    with db.engine.connect() as connection:
        current = sorted(migrations.current_revisions(connection))
    head = sorted(migrations.head_revisions())
    click.echo(f"current: {', '.join(current) or '(empty database)'}")
    click.echo(f"head:    {', '.join(head)}")


@db_cli.command("revision")
@click.option("-m", "--message", required=True)
def db_revision(message: str) -> None:
    """Autogenerate a migration from the models (developers)."""
    migrations.autogenerate_revision(db.engine, message)


def _where_refused_left_it() -> str:
    """Where a refused migration left the database: on PostgreSQL each migration
    commits on its own, so a downgrade the one it reached refused had undone those
    above it (SQLite runs them all in one transaction, undone together)."""
    with db.engine.connect() as connection:
        current = sorted(migrations.current_revisions(connection))
    at = ", ".join(current) or "(empty database)"
    if current == sorted(migrations.head_revisions()):
        return f"the database at {_safe_url()} is at {at}, the head"
    return (
        f"the database at {_safe_url()} is at {at}, the migrations above it undone: "
        "`courier-api db upgrade` takes it back to the head"
    )


def _safe_url() -> str:
    return masked_url(str(current_app.config["DATABASE_URL"]))


# -- audit log --------------------------------------------------------------------------------

audit_cli = AppGroup("audit", help="The hash-chained audit log.")


@audit_cli.command("verify")
@click.option(
    "--from-head",
    nargs=2,
    type=(int, str),
    metavar="ID HASH",
    help="Start from the head an earlier run printed: check that entry ID still carries "
    "HASH, then only the entries after it",
)
@click.option(
    "--max-entries",
    type=click.IntRange(min=1),
    help="Check at most N entries, then print the head reached: give it to --from-head "
    "to go on from there (default: to the newest entry)",
    metavar="N",
)
@domain_errors_as_messages
def audit_verify(from_head: tuple[int, str] | None, max_entries: int | None) -> None:
    """Check every audit entry's hash and its link to the entry before it.

    Prints progress every 10,000 entries (how many, and how far towards the newest
    entry), then the result; exits with status 1 naming the first entry that breaks
    the chain. The head printed at the end can be recorded and given later to
    --from-head: removing the newest entries breaks no link, only that head shows it,
    and the entries before it need no reading again. A head recorded long ago leaves
    as many entries to read as were appended since (some 5 seconds per 100,000):
    --max-entries bounds a run, which then prints the head to go on from.
    """
    head = audit.recorded_head(*from_head) if from_head else None
    newest = audit.newest_id(db.session)

    def progress(checked: int, entry_id: int) -> None:
        click.echo(f"checked {_entries(checked)}, through entry {entry_id} of {newest}", err=True)

    result = audit.verify(session=db.session, from_head=head, progress=progress, limit=max_entries)
    if not result.ok:
        click.echo(f"audit log BROKEN: {result.message} ({_entries(result.checked)} read)")
        sys.exit(1)
    if result.head_id is None:
        click.echo("audit log is empty: nothing to verify")
        return
    since = f" from entry {head.id}" if head else ""
    if not result.complete:
        click.echo(
            f"audit log intact so far: {_entries(result.checked)}{since}, through entry "
            f"{result.head_id} of {newest}; NOT checked to the end: go on with "
            f"--from-head {result.head_id} {result.head_hash}"
        )
        return
    if head is not None and result.head_id == head.id:
        # Only the recorded head was read: "1 entries from entry N" read as if one new
        # entry had been checked, where none was appended.
        checked = (
            f"entry {head.id} still carries the hash recorded for it, and no entry was "
            "appended after it"
        )
    else:
        checked = f"{_entries(result.checked)}{since}"
    click.echo(f"audit log intact: {checked}; head: entry {result.head_id} {result.head_hash}")


def _entries(count: int) -> str:
    return f"{count:,} entry" if count == 1 else f"{count:,} entries"


# -- directory --------------------------------------------------------------------------------


@click.command("create-station")
@click.argument("code")
@click.option("--name", required=True)
@click.option("--timezone", default="UTC", show_default=True, help="IANA zone")
@with_appcontext
@domain_errors_as_messages
def create_station(code: str, name: str, timezone: str) -> None:
    """Create a station with CODE."""
    station = directory.create_station(session=db.session, code=code, name=name, timezone=timezone)
    db.session.commit()
    click.echo(f"station {station.code} created (id {station.id})")


@click.command("create-user")
@click.argument("username")
@click.option("--role", required=True, type=click.Choice([r.value for r in Role]))
@click.option("--station", "station_code", help="Station code (couriers and managers)")
@click.option("--full-name", default="")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input")
@with_appcontext
@domain_errors_as_messages
def create_user(
    username: str, role: str, station_code: str | None, full_name: str, password_stdin: bool
) -> None:
    """Create a user USERNAME; the password is read from stdin or asked for."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("password", hide_input=True, confirmation_prompt=True)
    station = (
        directory.get_station_by_code(session=db.session, code=station_code)
        if station_code
        else None
    )
    user = directory.create_user(
        session=db.session,
        username=username,
        role=Role(role),
        station=station,
        password=password,
        created_by=None,
        full_name=full_name,
        password_hash_method=current_app.config["PASSWORD_HASH_METHOD"],
    )
    db.session.commit()
    click.echo(f"user {user.username} created ({user.role.value}, id {user.id})")


@click.command("register-device")
@click.argument("device_id")
@click.option("--station", "station_code", required=True, help="Station code")
@with_appcontext
@domain_errors_as_messages
def register_device(device_id: str, station_code: str) -> None:
    """Register the PDA DEVICE_ID at a station."""
    station = directory.get_station_by_code(session=db.session, code=station_code)
    device = directory.register_device(session=db.session, device_id=device_id, station=station)
    db.session.commit()
    click.echo(f"device {device.id} registered at {station.code}")


@click.command("retire-device")
@click.argument("device_id")
@click.option("--lost", is_flag=True, help="Report it lost rather than retired")
@with_appcontext
@domain_errors_as_messages
def retire_device(device_id: str, lost: bool) -> None:
    """Retire DEVICE_ID (or report it lost); its tokens stop working at once."""
    status = DeviceStatus.LOST if lost else DeviceStatus.RETIRED
    device = directory.get_device(session=db.session, device_id=device_id)
    directory.set_device_status(session=db.session, device=device, status=status, changed_by=None)
    db.session.commit()
    click.echo(f"device {device.id} is now {status.value}")


@click.command("move-device")
@click.argument("device_id")
@click.option("--station", "station_code", required=True, help="Code of the station it went to")
@with_appcontext
@domain_errors_as_messages
def move_device(device_id: str, station_code: str) -> None:
    """Move the PDA DEVICE_ID to another station (one sent there); its tokens stop
    working. Refused while it has a shift open or seqs not pushed at its old station."""
    device = directory.get_device(session=db.session, device_id=device_id)
    station = directory.get_station_by_code(session=db.session, code=station_code)
    device_moves.move_device(session=db.session, device=device, station=station, moved_by=None)
    db.session.commit()
    click.echo(f"device {device.id} moved to {station.code}")


# -- serving and data -------------------------------------------------------------------------


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option(
    "--threads",
    default=8,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Threads per worker (a long pull holds one; one is always kept from them)",
)
@pass_script_info
def serve(info: ScriptInfo, host: str, port: int, workers: int, threads: int) -> None:
    """Serve the API with gunicorn, threaded workers, on --host and --port.

    A port another server holds, or an address not this machine's, stops it at once,
    saying which.
    \f
    Not an ``app.cli`` command: Flask pushes a new app context (and so a new
    database session) for a request only when none is active, and the context
    Flask's CLI pushes around its commands would be shared by every request. (Click
    shows ``--help`` the docstring down to the form feed above, not this.)
    """
    import os

    from courier_api.app import default_instance_path
    from courier_api.metrics import MULTIPROC_ENV, prepare_multiprocess_dir
    from courier_api.serve import serve as run_gunicorn

    refused = _cannot_listen(host, port)
    if refused is not None:
        # gunicorn would try five times over five seconds, after "serving on" was printed.
        raise click.ClickException(f"cannot listen on {host}:{port}: {refused}")
    # /metrics adds up every worker's values, written to this directory (emptied now);
    # it must be set before the app, and so prometheus_client, is loaded.
    prepare_multiprocess_dir(
        os.environ.get(MULTIPROC_ENV) or str(default_instance_path() / "metrics")
    )
    app = info.load_app()
    base = f"http://{host}:{port}"
    click.echo(f"serving on {base}/  (pages: {base}/web/login, API docs: {base}/docs)")
    run_gunicorn(app, host=host, port=port, workers=workers, threads=threads)


def _cannot_listen(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (another server holds it, the address is
    not this machine's), with what to do, or None.
    Tried as gunicorn binds it: over IPv6 for an IPv6 address only, else over IPv4 (a
    name such as localhost is its IPv4 address, though getaddrinfo may answer ::1
    first), with SO_REUSEADDR, so a port left in TIME_WAIT by a server just stopped is
    free. A name that does not resolve is left to gunicorn to report."""
    import errno
    import socket

    from gunicorn.util import is_ipv6

    family = socket.AF_INET6 if is_ipv6(host) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except socket.gaierror:
        return None
    except OSError as error:
        why = error.strerror or str(error)
        if error.errno == errno.EADDRINUSE:
            return f"{why} (another server? choose another port: --port, or make run PORT=...)"
        if error.errno == errno.EADDRNOTAVAIL:
            return (
                f"{why} (no network interface of this machine has that address: choose "
                "another host: --host, or make run HOST=...)"
            )
        return why
    return None


def refuse_in_production(command: str, why: str) -> None:
    """A command that creates accounts with published passwords (the README's, the
    code's) stops before it does anything when ``APP_ENV=production``: such an account
    is a way in for anyone who reads them."""
    if current_app.config["APP_ENV"] == "production":
        raise click.ClickException(f"{command} is refused with APP_ENV=production: {why}")


@click.command("seed-demo")
@click.option(
    "--if-empty",
    is_flag=True,
    help="Do nothing (exit status 0) when the database has any station or account",
)
@with_appcontext
def seed_demo(if_empty: bool) -> None:
    """Load a demo station and play a simulated day at it; print the logins.

    Only into an empty database (no station, no account: the demo's accounts have
    fixed names); refused otherwise, or skipped with --if-empty. Refused with
    APP_ENV=production: its accounts' passwords are published.
    """
    from courier_api.demo import (
        DEMO_LOGINS,
        STATION_CODE,
        demo_is_loaded,
        seed,
        what_the_database_holds,
    )

    refuse_in_production(
        "seed-demo",
        "it creates accounts whose passwords are published (admin-demo-pass, ...); "
        "create users with create-user",
    )
    held = what_the_database_holds(db.session)
    if held is not None:
        not_loaded = f"demo data not loaded: the database already has {held}"
        if not if_empty:
            raise click.ClickException(
                f"{not_loaded}; seed-demo loads the demo into an empty database only"
            )
        if not demo_is_loaded(db.session):
            click.echo(not_loaded)
            return  # its logins would not work here
        # make run a second time: the demo is there (its logins follow), not missing.
        click.echo(f"demo station {STATION_CODE} already loaded: left as it is")
    else:
        with _each_request_unlogged():
            summary = seed(
                current_app._get_current_object(),  # type: ignore[attr-defined]
                db.session,
                password_hash_method=current_app.config["PASSWORD_HASH_METHOD"],
                progress=lambda line: click.echo(f"  {line}", err=True),
            )
        db.session.commit()
        click.echo(summary)
    click.echo("demo logins (username / password [device]):")
    for login in DEMO_LOGINS:
        click.echo(f"  {login}")


@click.command("simulate")
@click.option("--couriers", default=6, show_default=True, type=click.IntRange(1, 500))
@click.option("--parcels", default=120, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--seed", default=1, show_default=True, type=int)
@click.option("--station", "station_code", default="SIM", show_default=True)
@click.option("--url", help="A running server's base URL; default: in this process")
@click.option("--admin-user", required=True, help="An admin account to set the station up")
@click.option("--admin-password-stdin", is_flag=True, help="Read its password from stdin")
@with_appcontext
def simulate(
    couriers: int,
    parcels: int,
    seed: int,
    station_code: str,
    url: str | None,
    admin_user: str,
    admin_password_stdin: bool,
) -> None:
    """Play a whole station day through the API, as the PDAs would.

    Creates station STATION with a manager, a channel account, COURIERS couriers
    and their PDAs (passwords: simulated-day-1), takes PARCELS parcels in, and
    plays the day: shifts opened, check-outs, deliveries with signatures and
    photos, failed attempts, locker and pickup-point drops with and without
    consent, consents before and after drops, consent asked at the door and
    granted while the courier waits, hours offline, a batch sent twice, a PDA
    with its clock fast, one that never sends its last batch, parcels that go
    missing. Prints a line per courier, then what the station should now show.

    Refused with APP_ENV=production: its accounts' password is published.
    """
    import json

    from courier_api.simulation import (
        InProcess,
        Names,
        OverHttp,
        Simulation,
        SimulationError,
        plan_day,
    )

    refuse_in_production(
        "simulate",
        "it creates accounts whose password is published (simulated-day-1); "
        "play a day on a copy that is not production",
    )
    if admin_password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt(f"password of {admin_user}", hide_input=True)
    prefix = station_code.lower()
    names = Names(
        station_code=station_code.upper(),
        station_name=f"Simulated station {station_code.upper()}",
        manager=f"{prefix}-manager",
        integration=f"{prefix}-gateway",
        courier_prefix=f"{prefix}-courier",
        device_prefix=f"PDA-{station_code.upper()}-",
    )
    try:
        plan = plan_day(couriers=couriers, parcels=parcels, seed=seed, names=names)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    transport = OverHttp(url) if url else InProcess(current_app._get_current_object())  # type: ignore[attr-defined]
    try:
        with _each_request_unlogged():
            result = Simulation(
                transport,
                plan,
                admin=(admin_user, password),
                progress=lambda line: click.echo(line, err=True),
            ).run()
    except SimulationError as error:
        raise click.ClickException(str(error)) from None
    finally:
        transport.close()
    click.echo(json.dumps(result.expected.as_dict(), indent=2))


@contextlib.contextmanager
def _each_request_unlogged() -> Iterator[None]:
    """A simulated day sends hundreds of requests: a person running ``simulate`` or
    ``seed-demo`` reads its progress lines, not an INFO line for each request (httpx's
    over --url, the app's own access line in this process). Warnings still show."""
    loggers = [logging.getLogger(name) for name in ("httpx", ACCESS_LOGGER)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@click.command("import-parcels")
@click.argument("csv_file", type=click.File("r", encoding="utf-8-sig"))
@click.option("--station", "station_code", help="Station code for rows without one")
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1, 5000))
@with_appcontext
@domain_errors_as_messages
def import_parcels(
    csv_file: click.utils.LazyFile, station_code: str | None, batch_size: int
) -> None:
    """Take in parcels from a CSV file (header row: tracking_no, service_class,
    recipient_name, address; optional recipient_phone, lat, lon, station, courier).

    Each batch is committed on its own; rejected rows are listed with their line
    number, and the command exits with status 1 if any row was rejected.
    """
    from courier_api.importer import import_csv

    outcome = import_csv(
        csv_file,
        session=db.session,
        default_station=station_code,
        batch_size=batch_size,
        progress=lambda line: click.echo(line, err=True),
    )
    click.echo(outcome.summary())
    if outcome.rejected:
        sys.exit(1)


@click.command("rejudge")
@click.option("--station", "station_code", help="Only this station's parcels (default: all)")
@click.option(
    "--batch",
    default=500,
    show_default=True,
    type=click.IntRange(1, 2_000),
    help="Drops, time_inversion flags, PDAs with seqs written off, then parcels, per "
    "transaction (each holds the locks of the PDAs or the parcels it judges, on "
    "PostgreSQL)",
)
@with_appcontext
@domain_errors_as_messages
def rejudge(station_code: str | None, batch: int) -> None:
    """Judge every parcel again under the rules and settings in force now.

    After an upgrade that changed a rule, or a change to a policy setting
    (CONSENT_RECORDING_GRACE_MINUTES, CONSENT_REQUIRED_CLASSES, ...): each drop's
    bounds by its PDA's other events are worked out again (an upgrade that brought
    them leaves the drops stored meanwhile without), each parcel's status, holder and
    rule flags are recomputed from its events and consents as a push would, and closed
    shifts get their handover flags again where that changed them. Between the two,
    time_inversion flags are judged again against their PDAs' stored events (seqs no
    inverted pair names any more withdrawn, a flag naming none closed; a pair on another
    station's flag than its later event's raised there) and the pairs across seqs
    written off as lost are judged, as a push and a write-off now do. One
    transaction per --batch drops, time_inversion flags, PDAs, then parcels, with a
    progress line after each; safe while the service runs, and to run again. The run
    goes to the audit log.
    """
    from courier_api.config import inversion_tolerance_of, policy_of
    from sync.rejudge import rejudge_parcels

    station_id = None
    if station_code is not None:
        station_id = directory.get_station_by_code(session=db.session, code=station_code).id
    totals = rejudge_parcels(
        session=db.session,
        policy=policy_of(current_app.config),
        station_id=station_id,
        batch=batch,
        progress=lambda done: click.echo(f"... {done.summary()}", err=True),
        inversion_tolerance=inversion_tolerance_of(current_app.config),
    )
    click.echo(totals.summary())


# -- scheduled jobs ---------------------------------------------------------------------------


@click.command("scheduler")
@click.option("--once", is_flag=True, help="Run every job once now, then exit")
@click.option("--job", "job_name", metavar="NAME", help="With --once: run only this job")
@with_appcontext
def scheduler(once: bool, job_name: str | None) -> None:
    """Run the scheduled jobs (sweeps, consent expiry, retention purge) until stopped.

    Only the process holding the database lease runs jobs; another scheduler stands
    by and takes over when the lease expires. SIGTERM or Ctrl-C lets the running job
    finish, then releases the lease. With --once, every job (or --job NAME) runs
    now, due or not, if the lease can be had; one line per job; exit status 1 if
    any job failed.
    """
    from courier_api.scheduler import JOB_SPECS, job_scheduler_for, run_until_stopped
    from sync.scheduling import held_elsewhere

    if job_name is not None and job_name not in JOB_SPECS:
        raise click.BadParameter(
            f"no job {job_name!r}; jobs: {', '.join(JOB_SPECS)}", param_hint="--job"
        )
    if job_name is not None and not once:
        raise click.UsageError("--job runs one job once: use it with --once")
    runner = job_scheduler_for(current_app, [job_name] if job_name else None)
    if once:
        claim = runner.claim()
        if not claim.held:
            click.echo(f"nothing run: {held_elsewhere(claim.lease)}")
            return
        try:
            results = runner.run_all(force=True)
        finally:
            runner.release()
        for result in results:
            click.echo(result.summary())
        if any(result.outcome != "ok" for result in results):
            sys.exit(1)
        return
    click.echo(
        f"scheduler {runner.holder}: {len(runner.jobs)} jobs ({', '.join(runner.jobs)}); "
        f"lease of {runner.lease_seconds} s, renewed every {runner.renew_every_seconds} s"
    )
    claim = runner.claim()
    if not claim.held:
        click.echo(f"standing by: {held_elsewhere(claim.lease)}; taking over when it expires")
    run_until_stopped(runner)
    click.echo(f"scheduler {runner.holder} stopped; lease released")


# -- webhook delivery -------------------------------------------------------------------------


@click.command("deliver")
@click.option("--once", is_flag=True, help="Deliver what is due now, print the counts, exit")
@with_appcontext
def deliver(once: bool) -> None:
    """Post webhook messages to their subscriptions until stopped.

    Delivers what is due, then looks again every WEBHOOK_POLL_SECONDS when nothing
    was; one log line per attempt. Failed attempts are retried with backoff; several
    deliverers (and web workers with SCHEDULER_IN_WEB) share the work safely.
    SIGTERM or Ctrl-C lets the attempt in progress finish, then stops. With --once,
    each delivery due now is attempted once and the counts are printed, with those
    skipped unsent as no longer worth sending (exit status 0 even when attempts failed:
    they will be retried).
    """
    import signal
    from types import FrameType

    from courier_api.scheduler import delivery_loop_for
    from sync.webhooks import summary

    loop = delivery_loop_for(current_app)
    try:
        if once:
            click.echo(summary(loop.drain()))
            return

        def stop(signum: int, _frame: FrameType | None) -> None:
            loop.stop_event.set()

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        click.echo(
            f"deliverer {loop.worker_id}: delivering webhooks, looking for due ones every "
            f"{loop.settings.poll_seconds:g} s"
        )
        try:
            loop.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        click.echo(f"deliverer {loop.worker_id} stopped")
    finally:
        loop.close()
