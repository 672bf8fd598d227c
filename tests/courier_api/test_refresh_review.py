"""Second reader's tests of refresh-token rotation (SECURITY.md 1): concurrent refreshes
on the first-token (ON CONFLICT) path and with the grace, the clock read before the
family's row is locked, and a copy kept in step with the PDA."""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from courier_api.extensions import db
from sync import refresh_tokens
from tests import factories
from tests.conftest import Auth, World
from tests.courier_api.test_refresh_tokens import (
    REFRESH_URL,
    Clock,
    claims,
    refresh,
    refreshed,
    refused,
)
from tests.threads import race


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr("courier_api.auth.utcnow", clock)
    return clock


def racer_signed_in(app: Flask) -> tuple[FlaskClient, str]:
    with app.app_context():
        station = factories.station(db.session, code="RACE")
        factories.user(db.session, "racer", "station_manager", station)
        db.session.commit()
    client = app.test_client()
    return client, Auth(client).tokens("racer")["refresh_token"]


def slow_judge(monkeypatch: pytest.MonkeyPatch) -> None:
    judge = refresh_tokens.judge

    def slow(*args: Any, **kwargs: Any) -> str:
        verdict = judge(*args, **kwargs)
        time.sleep(0.3)  # hold the family's row: the other refresh must wait for it
        return verdict

    monkeypatch.setattr(refresh_tokens, "judge", slow)


@pytest.mark.parametrize("grace", [0, 60])
@pytest.mark.parametrize("which", ["first", "later"])
def test_two_refreshes_with_one_token_at_once_take_turns(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch, grace: int, which: str
) -> None:
    """The sign-in's own token (no row yet: INSERT ... ON CONFLICT DO NOTHING, then the
    lock) or a later one (the row exists: the lock), sent twice together while the first
    holds the row: without a grace one 200 and one reuse; within it, two 200 with one
    next token (the existing within-grace race test passes without FOR UPDATE: its
    refreshes need not overlap)."""
    committed_app.config["REFRESH_REUSE_GRACE_SECONDS"] = grace
    client, token = racer_signed_in(committed_app)
    if which == "later":
        token = refreshed(client, token)["refresh_token"]
    slow_judge(monkeypatch)
    answers = race(committed_app, REFRESH_URL, [{"refresh_token": token}] * 2, {})
    bodies = [answer.get_json() for answer in answers]
    if grace == 0:
        assert sorted(answer.status_code for answer in answers) == [200, 401], bodies
        assert sorted(body["code"] for body in bodies if "code" in body) == [
            "refresh_token_reused"
        ]
        winner = next(body for body in bodies if "refresh_token" in body)
        assert refused(refresh(client, winner["refresh_token"])) == (401, "refresh_token_revoked")
    else:
        assert [answer.status_code for answer in answers] == [200, 200], bodies
        assert len({claims(body["refresh_token"])["jti"] for body in bodies}) == 1


def test_without_a_grace_the_second_refresh_is_a_reuse_whoever_read_the_clock_first(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REFRESH_REUSE_GRACE_SECONDS=0 means "never" (README; SECURITY.md: "without a grace
    the second is a reuse"). ``exchange_refresh_token`` reads the clock before the
    family's row is locked: the refresh that read it first may get the row second, and
    then finds the token used after "now" (now < used_at), which ``judge`` took for a
    retry within a grace of 0. PostgreSQL only in effect: on a SQLite file the clock is
    read within the writers' turn."""
    committed_app.config["REFRESH_REUSE_GRACE_SECONDS"] = 0
    client, first = racer_signed_in(committed_app)
    token = refreshed(client, first)["refresh_token"]  # the family's row exists

    base = dt.datetime.now(dt.UTC)
    calls = [0]
    lock = threading.Lock()

    def utcnow() -> dt.datetime:
        with lock:
            n = calls[0]
            calls[0] += 1
        if n == 0:
            time.sleep(0.5)  # read the clock first, reach the family's row second
        return base + dt.timedelta(milliseconds=n)

    monkeypatch.setattr("courier_api.auth.utcnow", utcnow)
    answers = race(committed_app, REFRESH_URL, [{"refresh_token": token}] * 2, {})
    bodies = [answer.get_json() for answer in answers]
    assert sorted(answer.status_code for answer in answers) == [200, 401], bodies


def test_a_copy_kept_in_step_with_the_pda_is_never_caught(
    client: FlaskClient, world: World, auth: Auth, clock: Clock
) -> None:
    """SECURITY.md 1: "whoever presents a token second ends the family", unless the two
    refreshes fall within the grace of each other. A copy that lands in the grace once
    (a restored backup of the PDA's app, refreshing when its access token expires as the
    PDA does) gets an access token that expires seconds after the PDA's, so its next
    refresh lands in the next grace too, and so on: never caught. Here the copy
    refreshes 20 s after the PDA, every hour for two days."""
    pda = auth.tokens("courier1", "PDA-0001")["refresh_token"]
    copy = pda
    caught = False
    for _ in range(48):
        clock.advance(3600 - 20)
        pda = refreshed(client, pda)["refresh_token"]
        clock.advance(20)
        answer = refresh(client, copy)
        if answer.status_code != 200:
            caught = True
            break
        copy = answer.get_json()["refresh_token"]
    assert caught, "a copy in step with the PDA refreshed for two days, undetected"
