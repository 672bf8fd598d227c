import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskCliRunner
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from courier_api.cli import _cannot_listen as cannot_listen
from courier_api.cli import courier_cli
from courier_api.config import masked_url
from courier_api.demo import ACTIVE_DEVICES, PASSWORDS, RETIRED_DEVICE
from courier_api.extensions import db
from courier_api.logs import ACCESS_LOGGER
from models import AuditEntry, Device, DeviceStatus, Parcel, Role, Station, User
from sync import audit
from tests import factories
from tests.conftest import World, make_test_app
from tests.live_server import server_database


def test_create_station_user_and_device(runner: FlaskCliRunner, session: Session) -> None:
    result = runner.invoke(
        args=["create-station", "st9", "--name", "Nine", "--timezone", "Asia/Shanghai"]
    )
    assert result.exit_code == 0, result.output
    assert "station ST9 created" in result.output
    result = runner.invoke(
        args=[
            "create-user",
            "Courier9",
            "--role",
            "courier",
            "--station",
            "ST9",
            "--password-stdin",
        ],
        input="a-long-password\n",
    )
    assert result.exit_code == 0, result.output
    user = session.scalar(select(User).where(User.username == "courier9"))
    assert user is not None and user.role == Role.COURIER
    result = runner.invoke(args=["register-device", "PDA-9", "--station", "ST9"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(args=["retire-device", "PDA-9", "--lost"])
    assert result.exit_code == 0, result.output
    session.expire_all()
    assert session.get(Device, "PDA-9").status == DeviceStatus.LOST


def test_retire_device_writes_the_change_to_the_audit_log(
    runner: FlaskCliRunner, session: Session, world: World
) -> None:
    """As `PATCH /devices/<id>` does, naming no actor: the command line's, as an import's.
    Retired again, nothing changes and nothing more is logged."""
    for _ in range(2):
        result = runner.invoke(args=["retire-device", "PDA-0001"])
        assert result.exit_code == 0, result.output
    session.expire_all()
    [entry] = session.scalars(select(AuditEntry).where(AuditEntry.action == "device_updated"))
    assert (entry.actor_id, entry.subject_type, entry.subject_key) == (None, "device", "PDA-0001")
    assert entry.details == {
        "station_id": world.station.id,
        "by": "the command line",
        "changes": {"status": {"from": "active", "to": "retired"}},
    }
    result = runner.invoke(args=["audit", "verify"])
    assert result.exit_code == 0 and "audit log intact" in result.output, result.output


def test_move_device_moves_a_pda_sent_to_another_station(
    runner: FlaskCliRunner, session: Session, world: World
) -> None:
    """As `POST /devices/<id>/move` does, naming no actor; refused in one line while the
    PDA's old station has a shift open on it."""
    result = runner.invoke(args=["move-device", "PDA-0001", "--station", "ST2"])
    assert result.exit_code == 0 and "device PDA-0001 moved to ST2" in result.output
    session.expire_all()
    assert session.get(Device, "PDA-0001").station_id == world.other_station.id
    [entry] = session.scalars(select(AuditEntry).where(AuditEntry.action == "device_moved"))
    assert (entry.actor_id, entry.details["by"]) == (None, "the command line")
    assert entry.details["changes"] == {
        "station_id": {"from": world.station.id, "to": world.other_station.id}
    }
    result = runner.invoke(args=["move-device", "PDA-0001", "--station", "NOPE"])
    assert result.exit_code == 1 and "no station with code 'NOPE'" in result.output


def test_cli_errors_are_one_clear_line(runner: FlaskCliRunner, world: World) -> None:
    result = runner.invoke(args=["create-station", "ST1", "--name", "Again"])
    assert result.exit_code == 1
    assert "station ST1 already exists" in result.output
    result = runner.invoke(
        args=["create-user", "x1", "--role", "courier", "--station", "NOPE", "--password-stdin"],
        input="a-long-password\n",
    )
    assert result.exit_code == 1 and "no station with code 'NOPE'" in result.output
    result = runner.invoke(
        args=[
            "create-user",
            "x2",
            "--role",
            "station_manager",
            "--station",
            "ST1",
            "--password-stdin",
        ],
        input="short\n",
    )
    assert result.exit_code == 1 and "at least 8 characters" in result.output
    result = runner.invoke(args=["retire-device", "NOPE"])
    assert result.exit_code == 1 and "no device 'NOPE'" in result.output


def test_seed_demo_gives_working_logins(
    committed_app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    """(Real commits: on PostgreSQL the feed shows a PDA only committed answers, and the
    demo's couriers wait at doors for them.) `make run` shows its lines per courier and
    the logins, not an access line for each of the day's requests."""
    runner = committed_app.test_cli_runner()
    client = committed_app.test_client()
    with caplog.at_level("INFO"):
        result = runner.invoke(args=["seed-demo", "--if-empty"])
    assert result.exit_code == 0, result.output
    assert [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER] == []
    assert "demo station DEMO loaded" in result.output
    assert f"courier1 / {PASSWORDS[Role.COURIER]}" in result.output
    ok = client.post(
        "/api/v1/auth/token",
        json={
            "username": "courier1",
            "password": PASSWORDS[Role.COURIER],
            "device_id": ACTIVE_DEVICES[0],
        },
    )
    assert ok.status_code == 200
    refused = client.post(
        "/api/v1/auth/token",
        json={
            "username": "courier1",
            "password": PASSWORDS[Role.COURIER],
            "device_id": RETIRED_DEVICE,
        },
    )
    assert refused.status_code == 403
    assert refused.get_json()["code"] == "device_not_active"
    # make run again: the demo is there, not "not loaded" (which sent people looking
    # for what was missing).
    again = runner.invoke(args=["seed-demo", "--if-empty"])
    assert again.stdout.splitlines()[0] == "demo station DEMO already loaded: left as it is"
    assert "courier1 /" in again.output


def test_seed_demo_on_a_database_with_accounts_says_so_in_one_line(
    runner: FlaskCliRunner, session: Session
) -> None:
    """README, "Against PostgreSQL": an operator ran ``db upgrade`` and ``create-user
    admin``, then ``seed-demo --if-empty`` to try the demo there. The database had no
    station, so it was taken as empty, and the demo's own ``admin`` ended the command
    with a traceback (``user admin already exists``). A database holding accounts is not
    empty: ``--if-empty`` leaves it as it is and says why (exit 0, no demo logins that
    would not work), and ``seed-demo`` alone is refused in one line."""
    created = runner.invoke(
        args=["create-user", "admin", "--role", "admin", "--password-stdin"],
        input="an-operators-password\n",
    )
    assert created.exit_code == 0, created.output
    skipped = runner.invoke(args=["seed-demo", "--if-empty"])
    assert skipped.exit_code == 0, skipped.output
    assert "demo data not loaded: the database already has accounts" in skipped.output
    assert "Traceback" not in skipped.output and "courier1 /" not in skipped.output
    refused = runner.invoke(args=["seed-demo"])
    assert refused.exit_code == 1, refused.output
    assert refused.output.startswith("Error: demo data not loaded: the database already has")
    assert len(refused.output.strip().splitlines()) == 1, refused.output
    assert session.scalar(select(func.count()).select_from(Station)) == 0
    assert session.scalar(select(func.count()).select_from(User)) == 1


def test_import_parcels_reports_progress_and_rejected_lines(
    runner: FlaskCliRunner, world: World, session: Session, tmp_path: Path
) -> None:
    csv_file = tmp_path / "parcels.csv"
    csv_file.write_text(
        "tracking_no,service_class,recipient_name,recipient_phone,address,lat,lon\n"
        "RR473124829GB,express,Li Lei,13812345678,1 Century Ave,31.2,121.5\n"
        "RB123456786US,parcel,Han Meimei,,2 Century Ave,,\n"
        "EE471108151FR,registered,Wang Wu,,3 Century Ave,,\n"
        "SF1300000000001,teleport,Zhao Liu,,4 Century Ave,,\n"
        "RR473124832GB,express,Sun Qi,+86 138 0013 800,5 Century Ave,,\n"
    )
    result = runner.invoke(
        args=["import-parcels", str(csv_file), "--station", "ST1", "--batch-size", "2"]
    )
    assert result.exit_code == 1, result.output
    # A refused phone is named by its line, and echoed masked.
    assert "line 6: RR473124832GB: recipient_phone" in result.output
    assert "0013" not in result.output and "3 800" not in result.output
    assert "line 3: RB123456786US" in result.output
    assert "line 5: SF1300000000001: service_class" in result.output
    assert "... parcels: 2 rows read" in result.stderr  # progress after the first batch
    assert "parcels: 5 rows read, 2 created, 0 updated, 0 unchanged, 3 rejected" in result.output
    numbers = set(
        session.scalars(select(Parcel.tracking_no).where(Parcel.station_id == world.station.id))
    )
    assert {"RR473124829GB", "EE471108151FR"} <= numbers


def test_import_parcels_of_one_row_says_1_row(
    runner: FlaskCliRunner, world: World, tmp_path: Path
) -> None:
    csv_file = tmp_path / "one.csv"
    csv_file.write_text(
        "tracking_no,service_class,recipient_name,address\nRR473124829GB,express,Li Lei,1 Ave\n"
    )
    result = runner.invoke(args=["import-parcels", str(csv_file), "--station", "ST1"])
    assert result.exit_code == 0, result.output
    summary = "parcels: 1 row read, 1 created, 0 updated, 0 unchanged, 0 rejected"
    assert result.stdout == f"{summary}\n"
    # The progress after the batch is told apart from the summary, as rejudge's is.
    assert result.stderr == f"... {summary}\n"


def test_import_parcels_of_a_file_without_its_header_line_echoes_no_phone(
    runner: FlaskCliRunner, world: World, tmp_path: Path
) -> None:
    """An export saved without its header line is refused for its header, whose message
    shows the first row as "unknown columns": its phone number masked."""
    csv_file = tmp_path / "no_header.csv"
    csv_file.write_text("RR473124829GB,express,Li Lei,13812345678,1 Century Ave,31.2,121.5\n")
    result = runner.invoke(args=["import-parcels", str(csv_file), "--station", "ST1"])
    assert result.exit_code == 1
    assert "unknown columns: RR473124829GB, express, Li Lei," in result.output
    assert "13812345678" not in result.output and "Li Lei, ********" in result.output


def test_rejudge_reports_each_batch_then_the_totals(
    runner: FlaskCliRunner, world: World, session: Session
) -> None:
    for _ in range(3):
        factories.parcel(session, world.station)
    session.commit()
    result = runner.invoke(args=["rejudge", "--station", "st1", "--batch", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("... 2 parcels judged again: 0 changed status,")
    assert lines[1].startswith("... 3 parcels judged again")
    assert lines[2] == (
        "3 parcels judged again: 0 changed status, 0 rule flags raised, "
        "0 closed or changed, 0 handover flags of closed shifts raised, 0 drops' bounds "
        "repaired; time_inversion flags judged again: 0 seqs withdrawn, 0 flags closed, "
        "0 raised (across seqs written off, or at their later event's station)"
    )
    unknown = runner.invoke(args=["rejudge", "--station", "NOPE"])
    assert unknown.exit_code == 1 and "NOPE" in unknown.output
    assert "Traceback" not in unknown.output
    refused = runner.invoke(args=["rejudge", "--batch", "0"])
    assert refused.exit_code == 2 and "--batch" in refused.output


def test_rejudge_counts_one_as_one(runner: FlaskCliRunner, world: World, session: Session) -> None:
    """A station of one parcel was told '1 parcels judged again', as import-parcels said
    '1 rows read' and audit verify '1 entries': every count of one is singular."""
    factories.parcel(session, world.station)
    session.commit()
    result = runner.invoke(args=["rejudge", "--station", "st1"])
    assert result.exit_code == 0, result.output
    summary = (
        "1 parcel judged again: 0 changed status, 0 rule flags raised, 0 closed or changed, "
        "0 handover flags of closed shifts raised, 0 drops' bounds repaired; time_inversion "
        "flags judged again: 0 seqs withdrawn, 0 flags closed, 0 raised (across seqs "
        "written off, or at their later event's station)"
    )
    assert result.stdout == f"{summary}\n"
    assert result.stderr == f"... {summary}\n"


def test_rejudge_help_names_every_kind_of_batch(runner: FlaskCliRunner) -> None:
    """``--batch`` sets the size of the time_inversion flags' and the written-off PDAs'
    transactions too (``sync.rejudge``); its help named only drops and parcels."""
    result = runner.invoke(args=["rejudge", "--help"])
    assert result.exit_code == 0, result.output
    batch_help = " ".join(result.output[result.output.index("--batch") :].split())
    assert "Drops, time_inversion flags, PDAs with seqs written off, then parcels" in batch_help


def test_the_group_offers_only_what_works(app: Flask) -> None:
    """``courier-api --version`` printed Flask's and Werkzeug's versions, and ``--help``
    offered Flask's ``-e/--env-file``, which only ever answered that python-dotenv (not
    installed with the service) must be installed."""
    runner = app.test_cli_runner()
    version = runner.invoke(courier_cli(), ["--version"])
    assert version.exit_code == 0, version.output
    assert version.output.startswith("courier-api, version ")
    assert "Flask" not in version.output
    shown = runner.invoke(courier_cli(), ["--help"])
    assert shown.exit_code == 0, shown.output
    assert "--env-file" not in shown.output and "--version" in shown.output
    refused = runner.invoke(courier_cli(), ["-e", "settings.env", "db", "current"])
    assert refused.exit_code == 2 and "No such option '-e'" in refused.output


def test_serve_help_is_written_for_operators(app: Flask) -> None:
    """``courier-api serve --help`` showed the docstring's note for developers (why it is
    not an ``app.cli`` command: app contexts, database sessions) as its description."""
    result = app.test_cli_runner().invoke(courier_cli(), ["serve", "--help"])
    assert result.exit_code == 0, result.output
    assert "Serve the API with gunicorn" in result.output
    assert "app context" not in result.output and "app.cli" not in result.output
    assert "another server holds" in result.output


def test_import_parcels_refuses_a_wrong_header(
    runner: FlaskCliRunner, world: World, tmp_path: Path
) -> None:
    csv_file = tmp_path / "bad.csv"
    csv_file.write_text("tracking,service_class,recipient_name,address\n")
    result = runner.invoke(args=["import-parcels", str(csv_file)])
    assert result.exit_code == 1
    assert "missing columns: tracking_no" in result.output
    assert "unknown columns: tracking" in result.output


def test_db_upgrade_and_current_on_a_new_database(tmp_path: Path, database_url: str) -> None:
    app = make_test_app(f"sqlite:///{tmp_path / 'fresh.db'}", tmp_path)
    runner = app.test_cli_runner()
    result = runner.invoke(args=["db", "upgrade"])
    assert result.exit_code == 0, result.output
    current = runner.invoke(args=["db", "current"])
    lines = current.output.splitlines()
    assert lines[0].split(":")[1].strip() == lines[1].split(":")[1].strip()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _call(url: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body else None)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_served_app_isolates_requests_and_revokes_a_retired_device(tmp_path: Path) -> None:
    """Through gunicorn, as deployed: sessions must not outlive their request.

    Authenticated reads on both workers, then readiness, then the CLI retiring the
    device while the server runs, then the device's token is refused. A session
    shared across requests holds SQLite's write lock and fails this test.
    """
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}",
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "APP_ENV": "development",
    }
    env.pop("JWT_SECRET", None)
    cli = [sys.executable, "-m", "courier_api"]
    upgrade = subprocess.run(
        [*cli, "db", "upgrade"], env=env, check=True, capture_output=True, text=True
    )
    assert "created a development secret" in upgrade.stderr
    subprocess.run([*cli, "seed-demo"], env=env, check=True, capture_output=True)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    server_log = log_path.open("w")
    server = subprocess.Popen(
        [*cli, "serve", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=server_log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if _call(f"{base}/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        status, tokens = _call(
            f"{base}/api/v1/auth/token",
            {
                "username": "courier1",
                "password": PASSWORDS[Role.COURIER],
                "device_id": ACTIVE_DEVICES[0],
            },
        )
        assert status == 200, tokens
        token = tokens["access_token"]
        for _ in range(6):
            assert _call(f"{base}/api/v1/stations", token=token)[0] == 200
        assert _call(f"{base}/api/v1/stations/424242", token=token)[0] in (403, 404)
        assert _call(f"{base}/readyz")[0] == 200
        retire = subprocess.run(
            [*cli, "retire-device", ACTIVE_DEVICES[0]],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert retire.returncode == 0, retire.stderr
        refused = [_call(f"{base}/api/v1/stations", token=token) for _ in range(4)]
        assert {status for status, _ in refused} == {401}
        assert {body["code"] for _, body in refused} == {"device_not_active"}
    finally:
        server.terminate()
        server.wait(timeout=20)
        server_log.close()
    output = log_path.read_text()
    assert f"serving on http://127.0.0.1:{port}/" in output
    assert (tmp_path / "instance" / "jwt-secret").stat().st_mode & 0o777 == 0o600


def test_import_parcels_refuses_rows_longer_than_the_header(
    runner: FlaskCliRunner, world: World, session: Session, tmp_path: Path
) -> None:
    """An unquoted comma in an address must not silently cut the address short."""
    csv_file = tmp_path / "commas.csv"
    csv_file.write_text(
        "tracking_no, service_class, recipient_name, address\n"
        "EE471108151FR, parcel, Li Lei, 12 Century Ave, Pudong\n"
        'RR473124829GB, parcel, Li Lei, "12 Century Ave, Pudong"\n'
    )
    result = runner.invoke(args=["import-parcels", str(csv_file), "--station", "ST1"])
    assert result.exit_code == 1, result.output
    assert "line 2: EE471108151FR: _row: 1 more field(s) than the header" in result.output
    assert "1 created" in result.output and "1 rejected" in result.output
    stored = session.scalar(select(Parcel).where(Parcel.tracking_no == "RR473124829GB"))
    assert stored is not None and stored.address == "12 Century Ave, Pudong"
    assert session.scalar(select(Parcel).where(Parcel.tracking_no == "EE471108151FR")) is None


def test_import_parcels_ignores_trailing_empty_fields(
    runner: FlaskCliRunner, world: World, tmp_path: Path
) -> None:
    csv_file = tmp_path / "trailing.csv"
    csv_file.write_text(
        "tracking_no,service_class,recipient_name,address\nRR473124829GB,parcel,Li,1 Ave,,\n"
    )
    result = runner.invoke(args=["import-parcels", str(csv_file), "--station", "ST1"])
    assert result.exit_code == 0, result.output
    assert "1 created" in result.output


def test_an_import_that_changes_a_parcel_writes_it_to_the_audit_log(
    runner: FlaskCliRunner, world: World, session: Session, tmp_path: Path
) -> None:
    """A file taken in again with a parcel's class and position changed: the audit log
    has the change, from the command line (no user signs in there: no actor), the
    position as text (the chain holds no floats); the unchanged parcel has no entry."""
    header = "tracking_no,service_class,recipient_name,address,lat,lon\n"
    kept = "RB123456785GB,parcel,Han,2 Ave,,\n"
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    first.write_text(header + "RR473124829GB,express,Li,1 Ave,31.2,121.5\n" + kept)
    second.write_text(header + "RR473124829GB,parcel,Li,1 Ave,31.25,121.5\n" + kept)
    for csv_file in (first, second):
        result = runner.invoke(args=["import-parcels", str(csv_file), "--station", "ST1"])
        assert result.exit_code == 0, result.output
    assert "1 updated, 1 unchanged" in result.output
    session.expire_all()
    [entry] = session.scalars(select(AuditEntry).where(AuditEntry.action == "parcel_updated"))
    assert (entry.actor_id, entry.subject_type, entry.subject_key) == (
        None,
        "parcel",
        "RR473124829GB",
    )
    assert entry.details == {
        "station_id": world.station.id,
        "by": "an import from the command line",
        "changes": {
            "service_class": {"from": "express", "to": "parcel"},
            "lat": {"from": "31.2", "to": "31.25"},
        },
    }


def test_import_parcels_explains_a_file_that_is_not_utf8(
    runner: FlaskCliRunner, world: World, tmp_path: Path
) -> None:
    csv_file = tmp_path / "gbk.csv"
    csv_file.write_bytes(
        "tracking_no,service_class,recipient_name,address\n"
        "RR473124829GB,parcel,李雷,浦东世纪大道1号\n".encode("gbk")
    )
    result = runner.invoke(args=["import-parcels", str(csv_file), "--station", "ST1"])
    assert result.exit_code == 1
    assert "the file is not UTF-8 text" in result.output
    assert "Traceback" not in result.output


def test_the_demo_is_a_simulated_day_with_something_on_every_page(committed_app: Flask) -> None:
    result = committed_app.test_cli_runner().invoke(args=["seed-demo"])
    assert result.exit_code == 0, result.output
    assert "3 shifts balanced, 2 unbalanced, 1 provisional" in result.output
    client = committed_app.test_client()
    token = client.post(
        "/api/v1/auth/token",
        json={"username": "manager", "password": PASSWORDS[Role.STATION_MANAGER]},
    ).get_json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    stations = client.get("/api/v1/stations", headers=headers).get_json()["items"]
    [demo] = [s for s in stations if s["code"] == "DEMO"]
    board = client.get(f"/api/v1/stations/{demo['id']}/handover", headers=headers).get_json()
    totals = board["totals"]
    assert (totals["shifts"], totals["balanced"], totals["unbalanced"], totals["provisional"]) == (
        6,
        3,
        2,
        1,
    )
    assert totals["signed_off"] == 3
    flags = client.get("/api/v1/flags?status=open", headers=headers).get_json()["items"]
    assert {"missing_at_handover", "unauthorized_locker_drop", "clock_skew"} <= {
        f["kind"] for f in flags
    }
    proofs = client.get("/api/v1/proofs", headers=headers).get_json()["items"]
    assert proofs


def test_simulate_plays_a_day_and_prints_what_the_station_should_show(
    committed_app: Flask,
) -> None:
    with committed_app.app_context():
        factories.user(db.session, "sim-root", "admin")
        db.session.commit()
    runner = committed_app.test_cli_runner()
    args = ["simulate", "--couriers", "4", "--parcels", "16", "--seed", "9", "--station", "cli"]
    result = runner.invoke(
        args=[*args, "--admin-user", "sim-root", "--admin-password-stdin"],
        input=factories.PASSWORD + "\n",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["station"] == "CLI" and summary["parcels"] == 16
    assert summary["board"]["shifts"] == 4 and summary["board"]["provisional"] == 1
    assert "courier 4/4 cli-courier4 (loses_last_batch)" in result.stderr
    again = runner.invoke(
        args=[*args, "--admin-user", "sim-root", "--admin-password-stdin"],
        input=factories.PASSWORD + "\n",
    )
    assert again.exit_code == 1 and "409" in again.output  # the station exists already
    bad = runner.invoke(
        args=["simulate", "--couriers", "5", "--parcels", "2", "--admin-user", "x"], input="p\n"
    )
    assert bad.exit_code == 2 and "a parcel per courier" in bad.output


def test_simulate_over_http_prints_progress_not_a_line_per_request(
    committed_app: Flask, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A person running `simulate --url` (or `seed-demo`, in this process) reads a line
    per courier, not hundreds of INFO lines, one for each request the day sends: httpx's
    over --url and the app's own access lines in this process. Here --url reaches the
    app through httpx's WSGI transport, so both would be logged."""
    import httpx

    from courier_api.simulation import client as simulation_client

    with committed_app.app_context():
        factories.user(db.session, "sim-root", "admin")
        db.session.commit()
    wsgi, real_client = httpx.WSGITransport(app=committed_app), httpx.Client
    monkeypatch.setattr(
        simulation_client.httpx, "Client", lambda **kwargs: real_client(transport=wsgi, **kwargs)
    )
    runner = committed_app.test_cli_runner()
    args = ["simulate", "--couriers", "1", "--parcels", "3", "--seed", "2", "--station", "qq"]
    with caplog.at_level("INFO"):
        result = runner.invoke(
            args=[*args, "--url", "http://sim.test", "--admin-user", "sim-root"],
            input=factories.PASSWORD + "\n",
        )
    assert result.exit_code == 0, result.output
    per_request = [r.getMessage() for r in caplog.records if r.name in ("httpx", ACCESS_LOGGER)]
    assert per_request == []
    assert result.stderr.splitlines() == [  # counts of one say "1 courier", "1 shift"
        "station QQ: 1 courier, 3 parcels taken in",
        "courier 1/1 qq-courier1 (retries): 3 parcels, 6 events in 2 pushes",
        "manager signed off 1 balanced shift",
    ]
    assert logging.getLogger(ACCESS_LOGGER).level == logging.NOTSET  # put back


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    """`make run` with port 8000 taken (another server of the user's) printed "serving on
    http://127.0.0.1:8000/" and then gunicorn's "Connection in use" five times over five
    seconds: it now stops at once, naming the port and how to choose another."""
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}",
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "APP_ENV": "development",
    }
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "courier_api", "serve", "--port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stderr
    assert "serving on" not in result.stdout
    assert result.stderr.splitlines()[-1] == (
        f"Error: cannot listen on 127.0.0.1:{port}: Address already in use (another "
        "server? choose another port: --port, or make run PORT=...)"
    )
    assert "Connection in use" not in result.stderr


def test_serve_on_an_address_this_machine_lacks_names_the_host_not_the_port(
    tmp_path: Path,
) -> None:
    """`make run HOST=<an address copied from another machine>`: no port is free there,
    and the line sent the person to choose another port ('another server?')."""
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}",
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "APP_ENV": "development",
    }
    result = subprocess.run(
        [sys.executable, "-m", "courier_api", "serve", "--host", "192.0.2.1", "--port", "8000"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == (
        "Error: cannot listen on 192.0.2.1:8000: Cannot assign requested address (no "
        "network interface of this machine has that address: choose another host: --host, "
        "or make run HOST=...)"
    )


def test_serve_checks_the_port_as_gunicorn_binds_a_host_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gunicorn binds a host name (`make run HOST=localhost`) over IPv4. Where /etc/hosts
    names `::1 localhost` (most Linux systems, Docker's containers, macOS), getaddrinfo
    answers ::1 first, and the check tried [::1]: it refused a port that only a server
    on [::1] held (a Node dev server binds localhost there), which gunicorn takes, and
    in a container without IPv6 it refused every port ('Cannot assign requested
    address')."""
    real = socket.getaddrinfo

    def ipv6_first(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "localhost":
            return real(host, port, *args, **kwargs)
        loopback = (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0))
        return [loopback, *real("127.0.0.1", port, *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", ipv6_first)
    with socket.socket(socket.AF_INET6) as on_ipv6:
        on_ipv6.bind(("::1", 0))
        on_ipv6.listen()
        port = on_ipv6.getsockname()[1]
        assert cannot_listen("localhost", port) is None
        with socket.socket() as as_gunicorn:  # gunicorn's TCPSocket: IPv4, SO_REUSEADDR
            as_gunicorn.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            as_gunicorn.bind(("localhost", port))
            as_gunicorn.listen()
            assert cannot_listen("localhost", port).startswith("Address already in use")


def test_seed_demo_is_refused_in_production(app_with: Any, session: Session) -> None:
    """Its accounts' passwords are in the README: never in a production database."""
    runner = app_with(APP_ENV="production").test_cli_runner()
    for args in (["seed-demo"], ["seed-demo", "--if-empty"]):
        result = runner.invoke(args=args)
        assert result.exit_code == 1
        assert isinstance(result.exception, SystemExit)  # a message, not a traceback
        assert result.output.splitlines() == [
            "Error: seed-demo is refused with APP_ENV=production: it creates accounts whose "
            "passwords are published (admin-demo-pass, ...); create users with create-user"
        ]
    assert session.scalar(select(func.count()).select_from(User)) == 0


def test_simulate_is_refused_in_production(app_with: Any, session: Session) -> None:
    """Its accounts' password is in the code and the README: never in a production
    database, played in this process or against a server; refused before it asks for
    the admin's password."""
    factories.user(session, "sim-root", "admin")
    session.flush()
    users = session.scalar(select(func.count()).select_from(User))
    runner = app_with(APP_ENV="production").test_cli_runner()
    args = ["simulate", "--couriers", "2", "--parcels", "4", "--admin-user", "sim-root"]
    for where in ([], ["--url", "http://127.0.0.1:9"]):
        result = runner.invoke(args=[*args, *where], input=factories.PASSWORD + "\n")
        assert result.exit_code == 1
        assert isinstance(result.exception, SystemExit)  # a message, not a traceback
        assert result.output.splitlines() == [
            "Error: simulate is refused with APP_ENV=production: it creates accounts whose "
            "password is published (simulated-day-1); play a day on a copy that is not "
            "production"
        ]
    assert session.scalar(select(func.count()).select_from(User)) == users
    assert session.scalar(select(func.count()).select_from(Station)) == 0


def test_a_command_on_a_database_not_migrated_says_to_run_db_upgrade(tmp_path: Path) -> None:
    """Through the ``courier-api`` group, as an operator runs it; ``db upgrade`` still
    works on the empty database, and then the command does."""
    with server_database(tmp_path, "unmigrated") as url:
        app = make_test_app(url, tmp_path)
        runner = app.test_cli_runner()
        try:
            refused = runner.invoke(courier_cli(), ["create-station", "ST9", "--name", "Nine"])
            assert refused.exit_code == 1
            assert isinstance(refused.exception, SystemExit)
            assert refused.output.splitlines() == [
                f"Error: the database at {masked_url(url)} is not migrated: "
                "run `courier-api db upgrade`"
            ]
            upgraded = runner.invoke(courier_cli(), ["db", "upgrade"])
            assert upgraded.exit_code == 0, upgraded.output
            created = runner.invoke(courier_cli(), ["create-station", "ST9", "--name", "Nine"])
            assert created.exit_code == 0, created.output
        finally:
            db.engine_of(app).dispose()


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (
            "postgresql+psycopg://courier:s3cr/et:x@127.0.0.1:{port}/courier",
            "Connection refused",
        ),
        ("sqlite:///{tmp_path}/no-such-directory/courier.db", "unable to open database file"),
    ],
)
def test_a_command_that_cannot_reach_the_database_says_so_in_one_line(
    tmp_path: Path, url: str, reason: str
) -> None:
    url = url.format(port=_free_port(), tmp_path=tmp_path)
    app = make_test_app(url, tmp_path)
    try:
        result = app.test_cli_runner().invoke(courier_cli(), ["retire-device", "PDA-1"])
    finally:
        db.engine_of(app).dispose()
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    [line] = result.output.splitlines()
    assert line.startswith(f"Error: cannot reach the database at {masked_url(url)}: ")
    assert reason in line
    assert "s3cr/et" not in line


def test_a_missing_table_on_a_database_at_head_keeps_its_traceback(tmp_path: Path) -> None:
    """Not a migration to run but a bug (or a hand-made change): not hidden."""
    path = tmp_path / "at-head.db"
    app = make_test_app(f"sqlite:///{path}", tmp_path)
    runner = app.test_cli_runner()
    try:
        assert runner.invoke(courier_cli(), ["db", "upgrade"]).exit_code == 0
        with sqlite3.connect(path) as connection:
            connection.execute("DROP TABLE device")
        result = runner.invoke(courier_cli(), ["retire-device", "PDA-1"])
    finally:
        db.engine_of(app).dispose()
    assert isinstance(result.exception, OperationalError)
    assert "no such table: device" in str(result.exception)


def test_the_courier_api_command_tells_an_unmigrated_database_in_one_line(
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}",
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "APP_ENV": "testing",
        "JWT_SECRET": "a-secret-for-this-test-only-0000000000000",
    }
    result = subprocess.run(
        [sys.executable, "-m", "courier_api", "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"Error: the database at sqlite:///{tmp_path / 'empty.db'} is not migrated: "
        "run `courier-api db upgrade`"
    ]


def test_serve_keeps_a_thread_of_each_worker_free_of_long_pulls(
    app_with: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """``MAX_PULL_WAITERS`` is capped at a worker's threads less one, with a warning;
    with one thread no pull waits (``--threads 1`` still starts)."""
    from courier_api.serve import cap_pull_waiters

    for threads, waiters in ((8, 4), (5, 4), (4, 3), (2, 1), (1, 0)):
        app = app_with(MAX_PULL_WAITERS=4)
        caplog.clear()
        with caplog.at_level("WARNING", logger="courier_api.serve"):
            cap_pull_waiters(app, threads)
        assert app.config["MAX_PULL_WAITERS"] == waiters
        warned = [r.getMessage() for r in caplog.records if r.name == "courier_api.serve"]
        if waiters == 4:
            assert warned == []
        else:
            assert warned == [
                f"MAX_PULL_WAITERS=4 would let long pulls take all {threads} threads of a "
                "worker (pushes, sign-ins and health checks would wait for them): "
                + (
                    f"at most {waiters} wait at a time in each worker; more are answered at once"
                    if waiters
                    else "no long pull waits; each is answered at once"
                )
            ]


def test_a_migration_that_fails_on_a_missing_table_keeps_its_traceback(tmp_path: Path) -> None:
    """``db upgrade`` failing on a table it expects (a hand-made change, a migration's
    bug) is not "not migrated: run db upgrade", the command that just failed: the
    operator needs the migration and the statement, as before."""
    path = tmp_path / "half-way.db"
    app = make_test_app(f"sqlite:///{path}", tmp_path)
    runner = app.test_cli_runner()
    try:
        before = ["db", "upgrade", "--revision", "3fbed2908ec9"]
        assert runner.invoke(courier_cli(), before).exit_code == 0
        with sqlite3.connect(path) as connection:  # 5c8d2e7a4f16 reads it
            connection.execute("DROP TABLE flag_change")
        result = runner.invoke(courier_cli(), ["db", "upgrade"])
    finally:
        db.engine_of(app).dispose()
    assert "not migrated" not in result.output
    assert isinstance(result.exception, OperationalError)
    assert "no such table: flag_change" in str(result.exception)


@pytest.mark.parametrize(
    ("host", "port"), [("127.0.0.1", 8000), ("localhost", 5077), ("::1", 8000), ("::", 80)]
)
def test_serve_binds_gunicorn_to_the_host_and_port_asked_for(host: str, port: int) -> None:
    """``serve --host ::1`` gave gunicorn ``::1:8000``, which it reads as host '' and port
    '' and refuses to start on; an IPv6 literal goes in brackets."""
    from gunicorn.util import parse_address

    from courier_api.serve import bind_address

    assert parse_address(bind_address(host, port)) == (host, port)


def test_a_downgrade_a_migration_refuses_says_why_in_one_line(tmp_path: Path) -> None:
    """Audit entries that keep their client's address hash it: the downgrade that would
    drop the column refuses, and the operator reads why in one line, not a traceback."""
    app = make_test_app(f"sqlite:///{tmp_path / 'kept.db'}", tmp_path)
    runner = app.test_cli_runner()
    assert runner.invoke(args=["db", "upgrade"]).exit_code == 0
    with app.app_context():
        token = audit.CLIENT_IP.set("203.0.113.7")
        try:
            audit.append(session=db.session, actor_id=None, action="proof_read",
                         subject_type="proof", subject_key="9", details={})  # fmt: skip
        finally:
            audit.CLIENT_IP.reset(token)
        db.session.commit()
    result = runner.invoke(args=["db", "downgrade", "c8f2a4d6e1b9"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: 1 audit entries keep their client's address")
    assert len(result.output.splitlines()) == 1 and "Traceback" not in result.output
    current = runner.invoke(args=["db", "current"]).output.splitlines()
    assert current[0].split(":")[1].strip() == current[1].split(":")[1].strip()  # at head


def test_a_refused_downgrade_says_where_it_left_the_database(tmp_path: Path) -> None:
    """On PostgreSQL each migration commits on its own: a downgrade below the client_ip
    migration undid every migration above it before that one refused. The line said
    "Not downgraded" while the database was left neither at head nor where asked, the
    service refusing it as not migrated; the operator reads where it is and what to run."""
    from contextlib import nullcontext

    from tests.live_server import postgresql_database, postgresql_test_url

    base = postgresql_test_url()
    databases = (
        postgresql_database(base, "refused_downgrade")
        if base
        else nullcontext(f"sqlite:///{tmp_path / 'kept.db'}")
    )
    with databases as url:
        app = make_test_app(url, tmp_path)
        runner = app.test_cli_runner()
        try:
            assert runner.invoke(args=["db", "upgrade"]).exit_code == 0
            with app.app_context():
                token = audit.CLIENT_IP.set("203.0.113.7")
                try:
                    audit.append(session=db.session, actor_id=None, action="proof_read",
                                 subject_type="proof", subject_key="9", details={})  # fmt: skip
                finally:
                    audit.CLIENT_IP.reset(token)
                db.session.commit()
            result = runner.invoke(args=["db", "downgrade", "c8f2a4d6e1b9"])
            current = runner.invoke(args=["db", "current"]).output.splitlines()
        finally:
            with app.app_context():
                db.engine_of(app).dispose()
    assert result.exit_code == 1
    assert len(result.output.splitlines()) == 1 and "Traceback" not in result.output
    at = current[0].split(":")[1].strip()
    assert f"is at {at}" in result.output, (result.output, current)
    if at != current[1].split(":")[1].strip():  # left below head: say how to go back
        assert "courier-api db upgrade" in result.output
