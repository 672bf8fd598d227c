"""README.md's "Try it" block is the first thing a new user runs after `make run`: on
the demo it loads, each of its requests must answer as README implies (the health
check, the manager's sign-in with the password it prints, the station's board)."""

import json
import re
from pathlib import Path

from flask import Flask

README = Path(__file__).resolve().parents[2] / "README.md"


def try_it_block() -> str:
    text = README.read_text(encoding="utf-8")
    found = re.search(r"Try it:\n\n```sh\n(.*?)```", text, re.S)
    assert found, "README has no Try it block"
    return found.group(1)


def test_the_try_it_requests_answer_on_the_demo(committed_app: Flask) -> None:
    block = try_it_block()
    paths = re.findall(r"curl -s (?:-X POST )?localhost:8000(/\S+)", block)
    health, sign_in, board = paths
    body = json.loads(re.search(r"-d '(\{.*?\})'", block).group(1))
    seeded = committed_app.test_cli_runner().invoke(args=["seed-demo", "--if-empty"])
    assert seeded.exit_code == 0, seeded.output
    client = committed_app.test_client()
    assert client.get(health).get_json() == {"status": "ok"}
    token = client.post(sign_in, json=body).get_json()["access_token"]  # as README reads it
    # Station 1 is the demo's on a new database; here the ids run on from earlier tests
    # (PostgreSQL's sequences are not rolled back).
    assert board == "/api/v1/stations/1/handover"
    demo = client.get("/api/v1/stations", headers={"Authorization": f"Bearer {token}"})
    (station_id,) = [s["id"] for s in demo.get_json()["items"] if s["code"] == "DEMO"]
    board = board.replace("/1/", f"/{station_id}/")
    answer = client.get(board, headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.get_json()
    shifts = answer.get_json()["shifts"]
    assert len(shifts) == 6  # the demo's six couriers' shifts
    statuses = sorted(row["balance"]["status"] for row in shifts)
    assert statuses == ["balanced"] * 3 + ["provisional"] + ["unbalanced"] * 2


def test_the_readme_says_where_courier_api_is_before_writing_it_bare() -> None:
    """``make run`` puts ``courier-api`` in ``.venv/bin``, not on the PATH: a new user
    typing README's first ``courier-api simulate ...`` as written got "command not
    found", README saying where the command is only in its last sections."""
    text = README.read_text(encoding="utf-8")
    bare = re.search(r"(?<![\w/.-])courier-api (?=[a-z])", text)
    assert bare, "README writes no courier-api command"
    assert "`.venv/bin/courier-api`" in text[: bare.start()]
    assert "`. .venv/bin/activate`" in text[: bare.start()]
