"""``POST /api/v1/auth/refresh``: rotation, reuse detection and the retry grace (SECURITY.md 1)."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from courier_api.extensions import db
from courier_api.scheduler import JOB_SPECS
from models import DeviceStatus, RefreshTokenFamily, utcnow
from sync import refresh_tokens
from tests import factories
from tests.conftest import TEST_JWT_SECRET, Auth, World
from tests.threads import race

REFRESH_URL = "/api/v1/auth/refresh"
PROTECTED_URL = "/api/v1/stations"
GRACE = 60  # REFRESH_REUSE_GRACE_SECONDS' default


class Clock:
    """The server's clock as the refresh endpoint reads it (``courier_api.auth.utcnow``);
    it starts now, since tokens' expiry is checked on the real clock."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr("courier_api.auth.utcnow", clock)
    return clock


def refresh(client: FlaskClient, token: str) -> Any:
    return client.post(REFRESH_URL, json={"refresh_token": token})


def refreshed(client: FlaskClient, token: str) -> dict[str, Any]:
    response = refresh(client, token)
    assert response.status_code == 200, response.get_json()
    pair: dict[str, Any] = response.get_json()
    return pair


def refused(response: Any) -> tuple[int, str]:
    return response.status_code, response.get_json()["code"]


def claims(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, TEST_JWT_SECRET, algorithms=["HS256"])
    return decoded


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_sign_in_starts_a_family_and_each_refresh_rotates_within_it(
    client: FlaskClient, world: World, auth: Auth, clock: Clock
) -> None:
    signed_in = auth.tokens("courier1", "PDA-0001")
    first = claims(signed_in["refresh_token"])
    assert first["fam"] == first["jti"]  # a family is named after its first token
    assert claims(signed_in["access_token"])["fam"] == first["fam"]  # checked per request
    clock.advance(3600)
    second = refreshed(client, signed_in["refresh_token"])
    clock.advance(3600)
    third = refreshed(client, second["refresh_token"])
    families = {claims(pair["refresh_token"])["fam"] for pair in (second, third)}
    assert families == {first["fam"]}
    jtis = {claims(pair["refresh_token"])["jti"] for pair in (signed_in, second, third)}
    assert len(jtis) == 3
    assert third["device_id"] == "PDA-0001"
    assert client.get(PROTECTED_URL, headers=bearer(third["access_token"])).status_code == 200


def test_a_used_refresh_token_is_refused_and_ends_its_family(
    client: FlaskClient, world: World, auth: Auth, clock: Clock
) -> None:
    """A copy of the refresh token was taken (the PDA, its backup, a log): whoever
    presents it second, past the grace, is refused, and the family's newest token with
    it, whether the courier or the thief holds that one."""
    stolen = auth.tokens("courier1", "PDA-0001")["refresh_token"]
    clock.advance(600)
    courier = refreshed(client, stolen)
    clock.advance(GRACE + 1)
    reused = refresh(client, stolen)
    assert refused(reused) == (401, "refresh_token_reused")
    assert "sign in again" in reused.get_json()["message"]
    newest = refresh(client, courier["refresh_token"])
    assert refused(newest) == (401, "refresh_token_revoked")
    assert "sign in again" in newest.get_json()["message"]
    # The family's access tokens end with it, not when their hour is up.
    assert refused(client.get(PROTECTED_URL, headers=bearer(courier["access_token"]))) == (
        401,
        "token_revoked",
    )
    # Signing in again starts a new family, which works.
    fresh = auth.tokens("courier1", "PDA-0001")
    assert claims(fresh["refresh_token"])["fam"] != claims(stolen)["fam"]
    assert refresh(client, fresh["refresh_token"]).status_code == 200


def test_the_thief_using_it_first_ends_the_couriers_session_too(
    client: FlaskClient, world: World, auth: Auth, clock: Clock
) -> None:
    stolen = auth.tokens("courier1", "PDA-0001")["refresh_token"]
    thief = refreshed(client, stolen)
    clock.advance(1800)
    assert refused(refresh(client, stolen)) == (401, "refresh_token_reused")  # the courier
    assert refused(refresh(client, thief["refresh_token"])) == (401, "refresh_token_revoked")


def test_a_revoked_familys_access_tokens_stop_at_once(
    client: FlaskClient, world: World, auth: Auth, clock: Clock
) -> None:
    """A thief who refreshed first with a copied refresh token holds an access token of
    the family; the courier's refresh then shows the reuse and revokes the family. The
    thief's access token still pushed invented deliveries for the rest of its hour: an
    access token names its family (``fam``), and every request refuses one revoked."""
    courier = auth.tokens("courier1", "PDA-0001")
    thief = refreshed(client, courier["refresh_token"])
    assert claims(thief["access_token"])["fam"] == claims(courier["refresh_token"])["fam"]
    assert client.get(PROTECTED_URL, headers=bearer(thief["access_token"])).status_code == 200
    clock.advance(1800)
    assert refused(refresh(client, courier["refresh_token"])) == (401, "refresh_token_reused")
    for access in (thief["access_token"], courier["access_token"]):
        assert refused(client.get(PROTECTED_URL, headers=bearer(access))) == (
            401,
            "token_revoked",
        )
        invented = factories.event(1, "RR473124829GB", "delivered")
        pushed = client.post(
            "/api/v1/sync/push",
            json=factories.push_body("PDA-0001", [invented]),
            headers=bearer(access),
        )
        assert refused(pushed) == (401, "token_revoked")
    # The courier signs in again, a family of its own, and works on.
    again = auth.tokens("courier1", "PDA-0001")
    assert client.get(PROTECTED_URL, headers=bearer(again["access_token"])).status_code == 200


LOGOUT_URL = "/api/v1/auth/logout"


def sign_out(client: FlaskClient, token: str) -> Any:
    return client.post(LOGOUT_URL, json={"refresh_token": token})


def test_signing_out_ends_the_sign_in_and_every_copy_of_its_tokens(
    client: FlaskClient, world: World, auth: Auth, clock: Clock
) -> None:
    """A courier signing out of the PDA (the app drops its tokens) left them working on
    the server: a copy (a backup of the PDA, a token read off it) refreshed for 14 days,
    unseen, since nobody else used the family to show the reuse. Signing out ends the
    sign-in: its refresh and access tokens, copies included, are refused from then on."""
    kept = auth.tokens("courier1", "PDA-0001")  # another sign-in, on the courier's phone
    signed_in = auth.tokens("courier1", "PDA-0001")
    copy = dict(signed_in)
    newest = refreshed(client, signed_in["refresh_token"])
    out = sign_out(client, newest["refresh_token"])
    assert out.status_code == 204 and out.headers["Cache-Control"] == "no-store"
    after = refresh(client, newest["refresh_token"])
    assert refused(after) == (401, "refresh_token_revoked")
    assert "signed out" in after.get_json()["message"]  # not only "used twice"
    for access in (copy["access_token"], newest["access_token"]):
        assert refused(client.get(PROTECTED_URL, headers=bearer(access))) == (401, "token_revoked")
    # Signing out again, with any token of the sign-in, changes nothing.
    assert (
        client.post(LOGOUT_URL, json={"refresh_token": copy["refresh_token"]}).status_code == 204
    )
    # A sign-in that never refreshed ends too; other sign-ins go on.
    fresh = auth.tokens("courier1", "PDA-0001")
    assert (
        client.post(LOGOUT_URL, json={"refresh_token": fresh["refresh_token"]}).status_code == 204
    )
    assert refused(refresh(client, fresh["refresh_token"])) == (401, "refresh_token_revoked")
    assert refused(client.get(PROTECTED_URL, headers=bearer(fresh["access_token"])))[0] == 401
    assert client.get(PROTECTED_URL, headers=bearer(kept["access_token"])).status_code == 200
    assert refresh(client, kept["refresh_token"]).status_code == 200
    # Only a refresh token signs out (an access token is refused as the wrong type).
    wrong = sign_out(client, kept["access_token"])
    assert refused(wrong) == (401, "wrong_token_type")


def test_a_sign_out_is_logged_naming_the_user_and_the_pda_never_the_token(
    client: FlaskClient, world: World, auth: Auth, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone holding a copy of a refresh token may sign its PDA out, and the courier's
    pushes then meet 401 ``token_revoked`` mid-shift. A reuse was logged; a sign-out
    left no trace, so the station could not tell which ended the sign-in."""
    tokens = auth.tokens("courier1", "PDA-0001")
    with caplog.at_level(logging.INFO, logger="courier_api.auth"):
        assert sign_out(client, tokens["refresh_token"]).status_code == 204
    said = [r.getMessage() for r in caplog.records if r.name == "courier_api.auth"]
    family = claims(tokens["refresh_token"])["fam"]
    assert said == [
        f"signed out: sign-in family {family} of user {world.courier.id} on device PDA-0001 ended"
    ]
    assert tokens["refresh_token"] not in caplog.text


def test_a_pda_that_lost_the_answer_may_send_the_same_refresh_again_within_the_grace(
    client: FlaskClient, world: World, auth: Auth, clock: Clock
) -> None:
    token = auth.tokens("courier1", "PDA-0001")["refresh_token"]
    lost = refreshed(client, token)  # the answer never reached the PDA
    clock.advance(GRACE - 1)
    retried = refreshed(client, token)
    # The same family, and the same next token (another string): one token to exchange.
    assert claims(retried["refresh_token"])["fam"] == claims(token)["fam"]
    assert claims(retried["refresh_token"])["jti"] == claims(lost["refresh_token"])["jti"]
    assert client.get(PROTECTED_URL, headers=bearer(retried["access_token"])).status_code == 200
    clock.advance(60)
    following = refreshed(client, retried["refresh_token"])
    # The lost answer's copy of that token is now used up like the one the PDA kept.
    clock.advance(GRACE + 1)
    assert refused(refresh(client, lost["refresh_token"])) == (401, "refresh_token_reused")
    assert refused(refresh(client, following["refresh_token"])) == (401, "refresh_token_revoked")


def test_a_pda_may_lose_an_answer_now_and_then_but_not_twice_in_a_row(
    client: FlaskClient, world: World, auth: Auth, clock: Clock
) -> None:
    """A retry is allowed for one refresh, not for the next one too: a copy refreshing
    seconds after the PDA every time would otherwise never be caught. A PDA that lost
    an answer, refreshed once without trouble, then lost one again keeps its sign-in;
    one that loses two in a row signs in again."""
    token = auth.tokens("courier1", "PDA-0001")["refresh_token"]
    refreshed(client, token)  # lost
    token = refreshed(client, token)["refresh_token"]  # retried
    clock.advance(3600)
    token = refreshed(client, token)["refresh_token"]  # no trouble
    clock.advance(3600)
    refreshed(client, token)  # lost again
    token = refreshed(client, token)["refresh_token"]  # retried: not twice in a row
    clock.advance(3600)
    refreshed(client, token)  # lost
    clock.advance(5)
    assert refused(refresh(client, token)) == (401, "refresh_token_reused")  # twice


def test_the_grace_counts_from_the_first_use_and_then_a_retry_is_a_reuse(
    client: FlaskClient, world: World, auth: Auth, clock: Clock
) -> None:
    token = auth.tokens("courier1", "PDA-0001")["refresh_token"]
    newest = refreshed(client, token)
    clock.advance(GRACE // 2)
    refreshed(client, token)  # a retry; the grace does not start again
    clock.advance(GRACE // 2)
    assert refused(refresh(client, token)) == (401, "refresh_token_reused")
    assert refused(refresh(client, newest["refresh_token"])) == (401, "refresh_token_revoked")


def test_a_token_two_refreshes_back_is_a_reuse_even_within_the_grace(
    client: FlaskClient, world: World, auth: Auth, clock: Clock
) -> None:
    first = auth.tokens("manager1")["refresh_token"]
    second = refreshed(client, first)
    refreshed(client, second["refresh_token"])
    clock.advance(1)
    assert refused(refresh(client, first)) == (401, "refresh_token_reused")


def test_the_grace_is_configured(app_with: Callable[..., Flask], world: World) -> None:
    client = app_with(REFRESH_REUSE_GRACE_SECONDS=0).test_client()
    token = Auth(client).tokens("manager1")["refresh_token"]
    assert refresh(client, token).status_code == 200
    assert refused(refresh(client, token)) == (401, "refresh_token_reused")


def test_each_sign_in_is_a_family_of_its_own(
    client: FlaskClient, world: World, auth: Auth, clock: Clock
) -> None:
    """Signing in on a second PDA (or again on the same) starts an independent family:
    a reuse in one leaves the other working."""
    one = auth.tokens("courier1", "PDA-0001")["refresh_token"]
    other = auth.tokens("courier1", "PDA-0001")["refresh_token"]
    assert claims(one)["fam"] != claims(other)["fam"]
    refreshed(client, one)
    other_next = refreshed(client, other)
    clock.advance(GRACE + 1)
    assert refused(refresh(client, one)) == (401, "refresh_token_reused")
    assert refresh(client, other_next["refresh_token"]).status_code == 200


def legacy_refresh_token(world: World) -> str:
    """A refresh token as issued before rotation: no ``fam`` claim."""
    now = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    body = {
        "sub": str(world.courier.id),
        "role": "courier",
        "station": world.station.id,
        "device": "PDA-0001",
        "iat": now,
        "exp": now + dt.timedelta(days=14),
        "jti": "0ld" * 10 + "00",
        "typ": "refresh",
        "ver": world.courier.credentials_version,
    }
    return jwt.encode(body, TEST_JWT_SECRET, algorithm="HS256")


def test_a_refresh_token_from_before_rotation_is_accepted_once_and_starts_a_family(
    client: FlaskClient, world: World, clock: Clock
) -> None:
    legacy = legacy_refresh_token(world)
    first = refreshed(client, legacy)
    assert claims(first["refresh_token"])["fam"] == claims(legacy)["jti"]
    assert first["device_id"] == "PDA-0001"
    clock.advance(GRACE + 1)
    assert refused(refresh(client, legacy)) == (401, "refresh_token_reused")
    assert refused(refresh(client, first["refresh_token"])) == (401, "refresh_token_revoked")


@pytest.mark.parametrize(
    ("change", "code"),
    [("device lost", "device_not_active"), ("account disabled", "token_revoked")],
)
def test_a_lost_device_or_a_disabled_account_is_refused_before_rotation(
    client: FlaskClient, world: World, auth: Auth, session: Session, change: str, code: str
) -> None:
    """The account and device are checked first, as before: their refusal leaves the
    family as it was (nothing to revoke: the account's tokens all fail anyway)."""
    signed_in = auth.tokens("courier1", "PDA-0001")
    current = refreshed(client, signed_in["refresh_token"])["refresh_token"]
    if change == "device lost":
        world.device.status = DeviceStatus.LOST
    else:
        world.courier.active = False
    session.commit()
    assert refused(refresh(client, current)) == (401, code)
    assert refused(refresh(client, signed_in["refresh_token"])) == (401, code)
    session.expire_all()
    family = session.get(RefreshTokenFamily, claims(current)["fam"])
    assert family is not None and family.revoked_at is None
    assert family.current_jti == claims(current)["jti"]


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


def test_a_copy_kept_in_step_with_the_pda_is_caught(
    client: FlaskClient, world: World, auth: Auth, clock: Clock
) -> None:
    """A copy that lands in the grace once (a restored backup of the PDA's app,
    refreshing when its access token expires, as the PDA does) gets an access token
    that expires seconds after the PDA's, so its next refresh would land in the next
    grace too; a retry right after a retried refresh is a reuse, so it is caught at
    its second refresh. Here the copy refreshes 20 s after the PDA, every hour."""
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


def test_the_daily_job_purges_the_families_whose_tokens_have_expired(
    app: Flask, client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    token = auth.tokens("manager1")["refresh_token"]
    newest = refreshed(client, token)["refresh_token"]
    purge = JOB_SPECS["refresh_token_purge"].build(app.config)
    expiry = dt.datetime.fromtimestamp(claims(newest)["exp"], dt.UTC)
    assert purge(session=session, now=utcnow()) == {"families": 0}
    after = expiry + refresh_tokens.PURGE_MARGIN + dt.timedelta(seconds=1)
    assert purge(session=session, now=after) == {"families": 1}
    session.commit()
    assert session.get(RefreshTokenFamily, claims(newest)["fam"]) is None
