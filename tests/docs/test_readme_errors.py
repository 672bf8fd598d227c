"""README.md's error body is what a client's developer codes against: the example it
shows must be the body the API gives for that code, and the errors it says carry no
``errors`` member must carry none. It showed ``token_expired`` with ``errors``, which
no 401 has: a client reading ``body["errors"]`` on a 401 failed."""

import datetime as dt
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
from flask import Flask
from flask.testing import FlaskClient

from sync.sign_in_limits import Limit
from tests import factories
from tests.conftest import TEST_JWT_SECRET, World

README = Path(__file__).resolve().parents[2] / "README.md"


def api_section() -> str:
    text = README.read_text(encoding="utf-8")
    return text[text.index("## API (v1)") : text.index("| endpoint | who |")]


def example_body() -> dict[str, Any]:
    found = re.search(r"All errors share one body: `(\{.*?\})`", api_section(), re.S)
    assert found, "README shows no error body"
    return json.loads(found.group(1))


def shape(value: Any) -> Any:
    """The keys of a body, nested, down to the messages' lists."""
    return {k: shape(v) for k, v in value.items()} if isinstance(value, dict) else None


def test_the_example_error_body_is_the_one_the_api_gives(client: FlaskClient) -> None:
    example = example_body()
    assert example["code"] == "validation_error"  # the request below makes this one
    response = client.post("/api/v1/auth/token", json={"username": "someone"})
    body = response.get_json()
    assert response.status_code == example["status"]
    assert body["code"] == example["code"]
    assert shape(body) == shape(example)


def test_errors_about_no_field_have_no_errors_member(
    client: FlaskClient, app_with: Callable[..., Flask], world: World
) -> None:
    """Every code README lists as having no ``errors`` (401, 429, 404) has none."""
    listed = api_section().split("An error about no one field has no `errors`")[1]
    listed = listed.split("Bodies are JSON")[0]
    signed_in = client.post(
        "/api/v1/auth/token", json={"username": "manager1", "password": factories.PASSWORD}
    ).get_json()["access_token"]
    claims = jwt.decode(signed_in, options={"verify_signature": False})
    past = int(dt.datetime.now(dt.UTC).timestamp()) - 7200
    expired = jwt.encode({**claims, "iat": past, "exp": past + 3600}, TEST_JWT_SECRET, "HS256")
    limited = app_with(SIGN_IN_FAILURES_PER_USERNAME=Limit.parse("1/900")).test_client()
    wrong = {"username": "manager1", "password": "wrong-password"}
    limited.post("/api/v1/auth/token", json=wrong)
    answers = {
        "token_missing": client.get("/api/v1/stations/1"),
        "token_expired": client.get(
            "/api/v1/stations/1", headers={"Authorization": f"Bearer {expired}"}
        ),
        "invalid_credentials": client.post("/api/v1/auth/token", json=wrong),
        "too_many_sign_in_attempts": limited.post("/api/v1/auth/token", json=wrong),
        "not_found": client.get("/api/v1/no-such-thing"),
    }
    for code, response in answers.items():
        assert f"`{code}`" in listed, code
        body = response.get_json()
        assert body["code"] == code, (code, body)
        assert set(body) == {"code", "status", "message"}, body
