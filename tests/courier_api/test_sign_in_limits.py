"""Rate limits on POST /api/v1/auth/token and POST /web/login (429 with Retry-After)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from courier_api.config import ConfigError, load_config, validate_config
from sync.sign_in_limits import Limit
from tests import factories
from tests.conftest import World
from tests.courier_api.test_web_pages import Pages

TOKEN = "/api/v1/auth/token"
NAT = "203.0.113.7"  # a station's PDAs behind one address
T0 = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += dt.timedelta(**delta)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr("courier_api.sign_in.utcnow", clock)
    return clock


def limited_app(app_with: Callable[..., Flask], **limits: str) -> Flask:
    settings = {
        "SIGN_IN_FAILURES_PER_USERNAME": None,
        "SIGN_IN_ATTEMPTS_PER_ADDRESS": None,
        "SIGN_IN_FAILURES_PER_ADDRESS": None,
    }
    settings.update({name: Limit.parse(value) for name, value in limits.items()})
    return app_with(**settings)


def sign_in(
    client: FlaskClient,
    username: str,
    password: str = factories.PASSWORD,
    address: str = NAT,
    **extra: Any,
) -> TestResponse:
    body = {"username": username, "password": password}
    if username.startswith("courier"):
        body["device_id"] = "PDA-0001"
    return client.post(TOKEN, json=body, environ_base={"REMOTE_ADDR": address}, **extra)


def assert_limited(response: TestResponse, retry_after: int) -> None:
    assert response.status_code == 429, response.get_json()
    body = response.get_json()
    assert body["code"] == "too_many_sign_in_attempts"
    assert body["status"] == 429
    assert f"try again in {retry_after} seconds" in body["message"]
    assert response.headers["Retry-After"] == str(retry_after)


def test_failed_sign_ins_per_username_stop_at_the_limit_and_the_right_password_too(
    app_with: Callable[..., Flask], world: World, clock: Clock
) -> None:
    client = limited_app(app_with, SIGN_IN_FAILURES_PER_USERNAME="3/900").test_client()
    for _ in range(3):
        assert sign_in(client, "courier1", "wrong-password").status_code == 401
        clock.advance(seconds=10)
    # The limit is reached: the right password does not get through either.
    assert_limited(sign_in(client, "courier1"), retry_after=900 - 30)
    assert_limited(sign_in(client, "courier1", "wrong-password"), retry_after=900 - 30)
    # Another username from the same address, and the same username from elsewhere.
    assert sign_in(client, "manager1").status_code == 200
    assert_limited(sign_in(client, "courier1", address="198.51.100.1"), retry_after=870)
    # Unknown usernames are limited just the same (the limit reveals no account).
    for _ in range(3):
        assert sign_in(client, "nobody", "wrong-password").status_code == 401
    assert sign_in(client, "nobody", "wrong-password").status_code == 429
    # Once the first failure is 15 minutes old, one attempt is let through again.
    clock.advance(seconds=870)
    response = sign_in(client, "courier1")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["access_token"]


def test_attempts_per_address_are_counted_apart_from_usernames(
    app_with: Callable[..., Flask], world: World, clock: Clock
) -> None:
    client = limited_app(app_with, SIGN_IN_ATTEMPTS_PER_ADDRESS="4/60").test_client()
    for username in ("courier1", "manager1", "auditor1", "admin"):
        assert sign_in(client, username).status_code == 200
    clock.advance(seconds=45)
    assert_limited(sign_in(client, "app1"), retry_after=15)
    assert sign_in(client, "app1", address="198.51.100.1").status_code == 200
    clock.advance(seconds=15)
    assert sign_in(client, "app1").status_code == 200


def test_failed_sign_ins_per_address_slow_spraying(
    app_with: Callable[..., Flask], world: World, clock: Clock
) -> None:
    client = limited_app(
        app_with, SIGN_IN_FAILURES_PER_USERNAME="10/900", SIGN_IN_FAILURES_PER_ADDRESS="3/900"
    ).test_client()
    for username in ("courier1", "manager1", "auditor1"):
        assert sign_in(client, username, "Summer2026!").status_code == 401
    assert_limited(sign_in(client, "admin", "Summer2026!"), retry_after=900)
    assert sign_in(client, "admin", address="198.51.100.1").status_code == 200


def test_x_forwarded_for_counts_only_behind_a_trusted_proxy(
    app_with: Callable[..., Flask], world: World, clock: Clock
) -> None:
    limits = {"SIGN_IN_ATTEMPTS_PER_ADDRESS": Limit.parse("1/60")}
    direct = app_with(**limits).test_client()
    assert sign_in(direct, "admin", headers={"X-Forwarded-For": "192.0.2.1"}).status_code == 200
    # Anyone can write the header: without a trusted proxy it changes nothing.
    forged = sign_in(direct, "admin", headers={"X-Forwarded-For": "192.0.2.2"})
    assert forged.status_code == 429

    proxied = app_with(TRUSTED_PROXY_HOPS=1, **limits).test_client()
    proxy = "10.0.0.5"  # every request comes through it
    for client_address in ("192.0.2.10", "192.0.2.11"):
        response = sign_in(
            proxied, "admin", address=proxy, headers={"X-Forwarded-For": client_address}
        )
        assert response.status_code == 200
    # The proxy appends the address it saw: what the client wrote before it is ignored.
    again = sign_in(
        proxied, "admin", address=proxy, headers={"X-Forwarded-For": "192.0.2.99, 192.0.2.10"}
    )
    assert again.status_code == 429


def test_refresh_is_not_a_password_guess(
    app_with: Callable[..., Flask], world: World, clock: Clock
) -> None:
    client = limited_app(app_with, SIGN_IN_FAILURES_PER_USERNAME="1/900").test_client()
    tokens = sign_in(client, "manager1").get_json()
    assert sign_in(client, "manager1", "wrong-password").status_code == 401
    assert sign_in(client, "manager1").status_code == 429
    refreshed = client.post(
        "/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
    )
    assert refreshed.status_code == 200


def test_the_sign_in_page_is_limited_like_the_api(
    app_with: Callable[..., Flask], world: World, clock: Clock
) -> None:
    pages = Pages(limited_app(app_with, SIGN_IN_FAILURES_PER_USERNAME="2/900").test_client())
    for _ in range(2):
        assert pages.login("manager1", "wrong-password").status_code == 401
    refused = pages.login("manager1")
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "900"
    assert "Too many failed sign-ins for this username" in refused.get_data(as_text=True)
    # The API counts the page's failures: it is the same account.
    assert sign_in(pages.client, "manager1").status_code == 429
    clock.advance(minutes=15)
    assert pages.login("manager1").status_code == 302


def test_signing_in_on_the_page_again_and_again_is_never_a_failure(
    app_with: Callable[..., Flask], world: World, clock: Clock
) -> None:
    """A sign-in that succeeds is recorded as a success, also where the page answers
    without a commit of its own (a role the pages refuse)."""
    app = limited_app(app_with, SIGN_IN_FAILURES_PER_USERNAME="2/900")
    for _ in range(5):
        assert Pages(app.test_client()).login("manager1").status_code == 302
        # The integration's password is right, but the pages are not for it.
        assert Pages(app.test_client()).login("app1").status_code == 403
    assert sign_in(app.test_client(), "manager1").status_code == 200
    assert sign_in(app.test_client(), "app1").status_code == 200


def test_default_limits_let_a_station_sign_in_at_shift_start(
    app: Flask, world: World, clock: Clock
) -> None:
    """The defaults: 10 failures per username per 15 minutes; per address, 300 attempts a
    minute and 100 failures per 15 minutes, so one NAT address for a whole station's
    PDAs passes at shift start."""
    config = app.config
    assert str(config["SIGN_IN_FAILURES_PER_USERNAME"]) == "10/900"
    assert str(config["SIGN_IN_ATTEMPTS_PER_ADDRESS"]) == "300/60"
    assert str(config["SIGN_IN_FAILURES_PER_ADDRESS"]) == "100/900"
    client = app.test_client()
    for _ in range(10):
        assert sign_in(client, "courier1", "wrong-password").status_code == 401
    assert sign_in(client, "courier1").status_code == 429
    for _ in range(40):
        assert sign_in(client, "manager1").status_code == 200


def test_the_429_is_documented_with_its_retry_after_header(app: Flask) -> None:
    spec = app.extensions["flask-smorest"]["apis"][""]["ext_obj"].spec.to_dict()
    refused = spec["paths"]["/api/v1/auth/token"]["post"]["responses"]["429"]
    assert refused["headers"]["Retry-After"]["required"] is True
    assert refused["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }


def test_limit_settings_are_checked_at_start_up(tmp_path: Any) -> None:
    config = load_config({"SIGN_IN_FAILURES_PER_ADDRESS": "off"}, tmp_path)
    assert config["SIGN_IN_FAILURES_PER_ADDRESS"] is None
    for name, value in (
        ("SIGN_IN_FAILURES_PER_USERNAME", "10 per 15 minutes"),
        ("SIGN_IN_ATTEMPTS_PER_ADDRESS", "0/60"),
        ("TRUSTED_PROXY_HOPS", "-1"),
        ("TRUSTED_PROXY_HOPS", "many"),
        ("TRUSTED_PROXY_HOPS", "²"),  # a digit to str.isdigit, not to int()
        ("TRUSTED_PROXY_HOPS", "11"),
    ):
        with pytest.raises(ConfigError, match=name):
            load_config({name: value}, tmp_path)
    assert load_config({"TRUSTED_PROXY_HOPS": "2"}, tmp_path)["TRUSTED_PROXY_HOPS"] == 2
    validate_config(load_config({}, tmp_path))
