import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session

from courier_api.demo import ACTIVE_DEVICES, PASSWORDS, RETIRED_DEVICE
from models import Device, DeviceStatus, Parcel, Role, User
from tests.conftest import World, make_test_app


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


def test_seed_demo_gives_working_logins(runner: FlaskCliRunner, client: FlaskClient) -> None:
    result = runner.invoke(args=["seed-demo", "--if-empty"])
    assert result.exit_code == 0, result.output
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
    again = runner.invoke(args=["seed-demo", "--if-empty"])
    assert "demo data not loaded" in again.output
    assert "courier1 /" in again.output


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
    )
    result = runner.invoke(
        args=["import-parcels", str(csv_file), "--station", "ST1", "--batch-size", "2"]
    )
    assert result.exit_code == 1, result.output
    assert "line 3: RB123456786US" in result.output
    assert "line 5: SF1300000000001: service_class" in result.output
    assert "parcels: 2 rows read" in result.output  # progress after the first batch
    assert "parcels: 4 rows read, 2 created, 0 updated, 0 unchanged, 2 rejected" in result.output
    numbers = set(
        session.scalars(select(Parcel.tracking_no).where(Parcel.station_id == world.station.id))
    )
    assert {"RR473124829GB", "EE471108151FR"} <= numbers


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


def test_serve_runs_gunicorn_and_answers_healthz(tmp_path: Path) -> None:
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
    port = _free_port()
    server = subprocess.Popen(
        [*cli, "serve", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        body = None
        while time.monotonic() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    body = r.read().decode()
            except OSError:
                time.sleep(0.2)
        assert body is not None and '"ready"' in body
    finally:
        server.terminate()
        output = server.communicate(timeout=20)[0]
    assert f"serving on http://127.0.0.1:{port}/" in output
    assert (tmp_path / "instance" / "jwt-secret").stat().st_mode & 0o777 == 0o600
