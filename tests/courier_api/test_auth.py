import base64
import datetime as dt
import hashlib
import json
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event
from sqlalchemy.orm import Session

from courier_api import auth as auth_module
from courier_api.auth import VerifiedTokens
from models import DeviceStatus
from tests import factories
from tests.conftest import TEST_JWT_SECRET, Auth, World

TOKEN_URL = "/api/v1/auth/token"
PROTECTED_URL = "/api/v1/stations"


def sign_in(client: FlaskClient, **body):
    return client.post(TOKEN_URL, json={"password": factories.PASSWORD, **body})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error_code(response) -> str:
    return response.get_json()["code"]


def test_manager_token_carries_the_documented_claims(client: FlaskClient, world: World) -> None:
    response = sign_in(client, username="manager1")
    assert response.status_code == 200
    body = response.get_json()
    assert body["token_type"] == "Bearer"
    claims = jwt.decode(body["access_token"], TEST_JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == str(world.manager.id)
    assert claims["role"] == "station_manager"
    assert claims["station"] == world.station.id
    assert claims["device"] is None
    assert claims["typ"] == "access"
    assert claims["exp"] - claims["iat"] == body["expires_in"]
    assert claims["ver"] == 0
    assert len(claims["jti"]) == 32
    assert client.get(PROTECTED_URL, headers=bearer(body["access_token"])).status_code == 200


def test_sign_in_announces_the_limits_its_413s_enforce(
    app_with: Callable[..., Flask], world: World
) -> None:
    """A PDA developer sizes batches and photos from the sign-in, not from a 413: the
    sign-in (and a refresh) states the limits in force, the very values the 413s name,
    and a push or an image just within them is taken."""
    client = app_with(
        MAX_EVENTS_PER_PUSH=3, MAX_CONTENT_LENGTH=8192, MAX_BLOB_BYTES=2048
    ).test_client()
    tokens = sign_in(client, username="courier1", device_id="PDA-0001").get_json()
    limits = tokens["limits"]
    assert limits == {
        "max_events_per_push": 3,
        "max_request_bytes": 8192,
        "max_image_bytes": 2048,
    }
    refreshed = client.post(
        "/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
    )
    assert refreshed.get_json()["limits"] == limits
    assert sign_in(client, username="manager1").get_json()["limits"] == limits
    headers = bearer(refreshed.get_json()["access_token"])
    tn = factories.s10()
    events = [factories.event(seq, tn) for seq in range(1, limits["max_events_per_push"] + 2)]
    too_many = client.post(
        "/api/v1/sync/push", json=factories.push_body("PDA-0001", events), headers=headers
    )
    assert too_many.status_code == 413
    assert too_many.get_json()["limit"] == {"max": limits["max_events_per_push"], "unit": "events"}
    fits = client.post(
        "/api/v1/sync/push", json=factories.push_body("PDA-0001", events[:-1]), headers=headers
    )
    assert fits.status_code == 200, fits.get_json()
    body = json.dumps(factories.push_body("PDA-0001", events[:1])).encode()
    body += b" " * (limits["max_request_bytes"] + 1 - len(body))
    too_large = client.post(
        "/api/v1/sync/push", data=body, headers=headers, content_type="application/json"
    )
    assert too_large.status_code == 413
    assert too_large.get_json()["limit"] == {"max": limits["max_request_bytes"], "unit": "bytes"}
    image = b"\x89PNG\r\n\x1a\n" + b"\0" * limits["max_image_bytes"]
    path = f"/api/v1/blobs/{hashlib.sha256(image).hexdigest()}"
    refused = client.put(path, data=image, headers=headers, content_type="image/png")
    assert refused.status_code == 413
    assert refused.get_json()["limit"] == {"max": limits["max_image_bytes"], "unit": "bytes"}


def test_the_announced_image_limit_is_the_body_limit_when_that_is_lower(
    app_with: Callable[..., Flask], world: World
) -> None:
    """An image is a request body too: with MAX_BLOB_BYTES above MAX_REQUEST_BYTES, the
    largest image stored is the body limit, and that is what the sign-in states."""
    client = app_with(MAX_CONTENT_LENGTH=4096, MAX_BLOB_BYTES=1 << 20).test_client()
    tokens = sign_in(client, username="courier1", device_id="PDA-0001").get_json()
    assert tokens["limits"]["max_image_bytes"] == 4096
    image = b"\x89PNG\r\n\x1a\n" + b"\0" * 4096
    path = f"/api/v1/blobs/{hashlib.sha256(image).hexdigest()}"
    refused = client.put(
        path, data=image, headers=bearer(tokens["access_token"]), content_type="image/png"
    )
    assert refused.status_code == 413
    assert refused.get_json()["limit"] == {"max": 4096, "unit": "bytes"}


def test_courier_signs_in_with_an_active_device_of_their_station(
    client: FlaskClient, world: World
) -> None:
    response = sign_in(client, username="courier1", device_id="PDA-0001")
    assert response.status_code == 200
    body = response.get_json()
    claims = jwt.decode(body["access_token"], TEST_JWT_SECRET, algorithms=["HS256"])
    assert claims["device"] == "PDA-0001"
    assert body["device_id"] == "PDA-0001"


def test_a_pda_that_lost_its_storage_learns_at_sign_in_where_to_number_from(
    client: FlaskClient, world: World
) -> None:
    """Seqs are the PDA's own: one reset (or its app reinstalled) would number its next
    events from 1 again, and every one would be refused as ``seq_conflict``, kept only
    in quarantine while the PDA deletes them. Signing in again tells it the highest seq
    the server holds for it, rejected ones too; numbered on from there, nothing is
    refused. Other roles get none, and the refreshed pair says the same."""
    first = sign_in(client, username="courier1", device_id="PDA-0001").get_json()
    assert first["device_max_seq"] == 0
    headers = bearer(first["access_token"])
    events = [factories.event(seq, factories.s10()) for seq in (1, 2)]
    events.append(factories.event(3, "not a tracking number"))  # rejected, but held
    pushed = client.post(
        "/api/v1/sync/push", json=factories.push_body("PDA-0001", events), headers=headers
    )
    assert [r["status"] for r in pushed.get_json()["results"]] == ["applied"] * 2 + ["rejected"]
    again = sign_in(client, username="courier1", device_id="PDA-0001").get_json()
    assert again["device_max_seq"] == 3
    resumed = [factories.event(again["device_max_seq"] + 1, factories.s10())]
    answered = client.post(
        "/api/v1/sync/push",
        json=factories.push_body("PDA-0001", resumed),
        headers=bearer(again["access_token"]),
    ).get_json()
    assert answered["results"][0]["status"] == "applied" and answered["acked_through_seq"] == 4
    refreshed = client.post("/api/v1/auth/refresh", json={"refresh_token": again["refresh_token"]})
    assert refreshed.get_json()["device_max_seq"] == 4
    assert sign_in(client, username="manager1").get_json()["device_max_seq"] is None


def test_usernames_are_case_insensitive(client: FlaskClient, world: World) -> None:
    assert sign_in(client, username="  Manager1 ").status_code == 200


def test_courier_without_device_is_told_to_send_one(client: FlaskClient, world: World) -> None:
    response = sign_in(client, username="courier1")
    assert response.status_code == 422
    assert error_code(response) == "device_required"
    assert "device_id" in response.get_json()["errors"]


def test_courier_cannot_use_a_device_of_another_station(client: FlaskClient, world: World) -> None:
    response = sign_in(client, username="courier1", device_id="PDA-0002")
    assert response.status_code == 403
    assert error_code(response) == "device_not_allowed"


def test_courier_cannot_use_an_unknown_device(client: FlaskClient, world: World) -> None:
    response = sign_in(client, username="courier1", device_id="PDA-9999")
    assert response.status_code == 403
    assert error_code(response) == "device_not_allowed"


@pytest.mark.parametrize(
    ("device_id", "status", "code"),
    [
        ("PDA-9999", None, "device_not_allowed"),
        ("PDA-0002", None, "device_not_allowed"),
        ("PDA-OLD", DeviceStatus.RETIRED, "device_not_active"),
    ],
)
def test_a_device_refused_at_sign_in_is_named_as_the_field_at_fault(
    client: FlaskClient,
    world: World,
    session: Session,
    device_id: str,
    status: DeviceStatus | None,
    code: str,
) -> None:
    """A PDA developer reads ``errors`` for the field to fix: the device id typed or
    configured on the PDA, not the password."""
    if status is not None:
        factories.device(session, device_id, world.station, status=status)
        session.commit()
    response = sign_in(client, username="courier1", device_id=device_id)
    assert response.status_code == 403
    body = response.get_json()
    assert (body["code"], list(body["errors"])) == (code, ["device_id"])
    assert device_id in body["errors"]["device_id"][0]


def test_a_token_that_does_not_decode_says_to_send_it_as_given_or_sign_in_again(
    client: FlaskClient, world: World
) -> None:
    """The library's reason alone ('Invalid header padding') told a PDA developer
    nothing of what to do."""
    response = client.get(PROTECTED_URL, headers=bearer("x.y.z"))
    assert error_code(response) == "token_invalid"
    assert "sign in again" in response.get_json()["message"]
    refused = client.post("/api/v1/auth/refresh", json={"refresh_token": "x.y.z"})
    assert error_code(refused) == "token_invalid"
    assert "access_token" not in refused.get_json()["message"]  # a refresh sends the other


@pytest.mark.parametrize("status", [DeviceStatus.RETIRED, DeviceStatus.LOST])
def test_retired_or_lost_device_gets_no_token(
    client: FlaskClient, world: World, session: Session, status: DeviceStatus
) -> None:
    factories.device(session, "PDA-OLD", world.station, status=status)
    session.commit()
    response = sign_in(client, username="courier1", device_id="PDA-OLD")
    assert response.status_code == 403
    assert error_code(response) == "device_not_active"
    assert status.value in response.get_json()["message"]


def test_non_courier_with_device_is_refused(client: FlaskClient, world: World) -> None:
    response = sign_in(client, username="manager1", device_id="PDA-0001")
    assert response.status_code == 422
    assert error_code(response) == "device_not_expected"


@pytest.mark.parametrize("username", ["manager1", "nobody"])
def test_wrong_password_or_unknown_user_look_the_same(
    client: FlaskClient, world: World, username: str
) -> None:
    response = client.post(TOKEN_URL, json={"username": username, "password": "wrong-password"})
    assert response.status_code == 401
    assert error_code(response) == "invalid_credentials"
    assert response.get_json()["message"] == "wrong username or password"


def test_disabled_account_cannot_sign_in(
    client: FlaskClient, world: World, session: Session
) -> None:
    factories.user(session, "gone", "station_manager", world.station, active=False)
    session.commit()
    response = sign_in(client, username="gone")
    assert response.status_code == 401
    assert error_code(response) == "account_disabled"


def test_missing_fields_are_named(client: FlaskClient, world: World) -> None:
    response = client.post(TOKEN_URL, json={"username": "manager1"})
    assert response.status_code == 422
    assert "password" in response.get_json()["errors"]["json"]


def test_retiring_a_device_revokes_its_tokens_at_once(
    client: FlaskClient, world: World, auth: Auth, session: Session
) -> None:
    tokens = auth.tokens("courier1", "PDA-0001")
    assert client.get(PROTECTED_URL, headers=bearer(tokens["access_token"])).status_code == 200
    manager = auth.headers("manager1")
    retired = client.patch("/api/v1/devices/PDA-0001", json={"status": "retired"}, headers=manager)
    assert retired.status_code == 200
    response = client.get(PROTECTED_URL, headers=bearer(tokens["access_token"]))
    assert response.status_code == 401
    assert error_code(response) == "device_not_active"
    refreshed = client.post(
        "/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
    )
    assert refreshed.status_code == 401
    assert error_code(refreshed) == "device_not_active"


def test_disabling_an_account_revokes_its_tokens(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    manager_token = auth.headers("manager1")
    admin = auth.headers("admin")
    response = client.patch(
        f"/api/v1/users/{world.manager.id}", json={"active": False}, headers=admin
    )
    assert response.status_code == 200
    refused = client.get(PROTECTED_URL, headers=manager_token)
    assert refused.status_code == 401
    assert error_code(refused) == "token_revoked"


def test_refresh_issues_a_new_pair(client: FlaskClient, world: World, auth: Auth) -> None:
    tokens = auth.tokens("courier1", "PDA-0001")
    response = client.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert response.status_code == 200
    body = response.get_json()
    assert body["access_token"] != tokens["access_token"]
    assert body["device_id"] == "PDA-0001"
    assert client.get(PROTECTED_URL, headers=bearer(body["access_token"])).status_code == 200


def test_an_answer_carrying_tokens_is_kept_by_no_cache(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    """RFC 6749 5.1: a sign-in's or a refresh's answer holds the tokens, and no cache
    between the PDA and the server (a station's proxy, the browser of a tool calling the
    API) may keep a copy for whoever asks next."""
    signed_in = sign_in(client, username="courier1", device_id="PDA-0001")
    refreshed = client.post(
        "/api/v1/auth/refresh", json={"refresh_token": signed_in.get_json()["refresh_token"]}
    )
    for response in (signed_in, refreshed):
        assert response.status_code == 200
        assert response.headers.get("Cache-Control") == "no-store"
        assert response.headers.get("Pragma") == "no-cache"


def test_refresh_token_is_not_an_access_token(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    tokens = auth.tokens("manager1")
    response = client.get(PROTECTED_URL, headers=bearer(tokens["refresh_token"]))
    assert response.status_code == 401
    assert error_code(response) == "wrong_token_type"
    response = client.post("/api/v1/auth/refresh", json={"refresh_token": tokens["access_token"]})
    assert response.status_code == 401
    assert error_code(response) == "wrong_token_type"
    assert response.get_json()["message"].startswith("this is the access token,")  # not "a access"


def _claims_for(world: World, **changes) -> dict:
    now = dt.datetime.now(dt.UTC)
    claims = {
        "sub": str(world.manager.id),
        "role": "station_manager",
        "station": world.station.id,
        "device": None,
        "iat": now,
        "exp": now + dt.timedelta(minutes=5),
        "jti": "a" * 32,
        "typ": "access",
        "ver": 0,
    }
    claims.update(changes)
    return claims


def test_expired_token(client: FlaskClient, world: World) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    token = jwt.encode(
        _claims_for(world, iat=past, exp=past + dt.timedelta(hours=1)),
        TEST_JWT_SECRET,
        algorithm="HS256",
    )
    response = client.get(PROTECTED_URL, headers=bearer(token))
    assert response.status_code == 401
    assert error_code(response) == "token_expired"


def test_a_token_verified_before_is_refused_once_it_expires(
    app: Flask, client: FlaskClient, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token found among those verified before (``VerifiedTokens``) has its expiry
    checked on each use."""
    now = dt.datetime.now(dt.UTC)
    token = jwt.encode(
        _claims_for(world, iat=now, exp=now + dt.timedelta(minutes=5)),
        TEST_JWT_SECRET,
        algorithm="HS256",
    )
    assert client.get(PROTECTED_URL, headers=bearer(token)).status_code == 200
    with app.app_context():
        assert VerifiedTokens.of_app().get(token, TEST_JWT_SECRET) is not None
    monkeypatch.setattr(auth_module, "clock", lambda: (now + dt.timedelta(minutes=5)).timestamp())
    response = client.get(PROTECTED_URL, headers=bearer(token))
    assert response.status_code == 401
    assert error_code(response) == "token_expired"


def test_a_token_verified_with_one_secret_is_verified_again_under_another(
    app: Flask, client: FlaskClient, world: World
) -> None:
    """The secret changed (a restart with a new ``JWT_SECRET``; tests change it in
    place): a token verified under the old one is not taken from ``VerifiedTokens``."""
    token = jwt.encode(_claims_for(world), TEST_JWT_SECRET, algorithm="HS256")
    assert client.get(PROTECTED_URL, headers=bearer(token)).status_code == 200
    app.config["JWT_SECRET"] = "another-key-" + "y" * 40
    response = client.get(PROTECTED_URL, headers=bearer(token))
    assert response.status_code == 401
    assert error_code(response) == "token_invalid"


def test_token_signed_with_another_key(client: FlaskClient, world: World) -> None:
    token = jwt.encode(_claims_for(world), "another-key-" + "y" * 40, algorithm="HS256")
    response = client.get(PROTECTED_URL, headers=bearer(token))
    assert response.status_code == 401
    assert error_code(response) == "token_invalid"


def test_tampered_token(client: FlaskClient, world: World, auth: Auth) -> None:
    token = auth.tokens("manager1")["access_token"]
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["role"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    response = client.get(PROTECTED_URL, headers=bearer(f"{header}.{forged}.{signature}"))
    assert response.status_code == 401
    assert error_code(response) == "token_invalid"


def test_alg_none_token(client: FlaskClient, world: World) -> None:
    token = jwt.encode(_claims_for(world, role="admin"), None, algorithm="none")
    response = client.get(PROTECTED_URL, headers=bearer(token))
    assert response.status_code == 401
    assert error_code(response) == "token_invalid"


def test_token_missing_a_required_claim(client: FlaskClient, world: World) -> None:
    claims = _claims_for(world)
    del claims["jti"]
    token = jwt.encode(claims, TEST_JWT_SECRET, algorithm="HS256")
    response = client.get(PROTECTED_URL, headers=bearer(token))
    assert response.status_code == 401
    assert error_code(response) == "token_invalid"


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "token_missing"),
        ("Basic abc", "token_invalid"),
        ("Bearer ", "token_invalid"),
        ("Bearer not-a-jwt", "token_invalid"),
    ],
)
def test_malformed_authorization_header(client: FlaskClient, world: World, header, code) -> None:
    headers = {"Authorization": header} if header else {}
    response = client.get(PROTECTED_URL, headers=headers)
    assert response.status_code == 401
    assert error_code(response) == code


def test_role_outside_the_allowed_ones_gets_403(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    response = client.post(
        "/api/v1/stations",
        json={"code": "X1", "name": "X"},
        headers=auth.headers("courier1", "PDA-0001"),
    )
    assert response.status_code == 403
    assert error_code(response) == "role_forbidden"


@pytest.mark.parametrize(
    ("username", "message"),
    [
        ("auditor1", "an auditor may not do this"),
        ("app1", "an integration may not do this"),
        ("manager1", "a station_manager may not do this"),
    ],
)
def test_a_role_refused_is_named_in_plain_words(
    client: FlaskClient, world: World, auth: Auth, username: str, message: str
) -> None:
    """An auditor's script read "a auditor may not do this"."""
    response = client.post(
        "/api/v1/stations", json={"code": "X1", "name": "X"}, headers=auth.headers(username)
    )
    assert response.status_code == 403
    assert response.get_json()["message"] == message


def test_a_password_change_ends_earlier_sessions(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    old = auth.tokens("manager1")
    response = client.patch(
        f"/api/v1/users/{world.manager.id}",
        json={"password": "a-brand-new-pass"},
        headers=auth.headers("admin"),
    )
    assert response.status_code == 200
    refused = client.get(PROTECTED_URL, headers=bearer(old["access_token"]))
    assert refused.status_code == 401
    assert error_code(refused) == "token_revoked"
    refresh = client.post("/api/v1/auth/refresh", json={"refresh_token": old["refresh_token"]})
    assert error_code(refresh) == "token_revoked"
    new = client.post(TOKEN_URL, json={"username": "manager1", "password": "a-brand-new-pass"})
    assert new.status_code == 200
    assert (
        client.get(PROTECTED_URL, headers=bearer(new.get_json()["access_token"])).status_code
        == 200
    )


@pytest.mark.parametrize(
    "change",
    [None, "device lost", "account disabled", "password changed", "moved with its device"],
)
def test_a_push_is_let_in_or_refused_by_its_sign_in_check(
    app: Flask,
    client: FlaskClient,
    world: World,
    session: Session,
    change: str | None,
) -> None:
    """The push's check runs in its transaction (``Database.check_when_writing``) on
    the principal its token names: one whose account moved station since is refused
    (the token's station is the one the push would be filed under)."""
    headers = Auth(client).headers("courier1", "PDA-0001")
    if change == "device lost":
        world.device.status = DeviceStatus.LOST
    elif change == "account disabled":
        world.courier.active = False
    elif change == "password changed":
        world.courier.credentials_version += 1
    elif change == "moved with its device":  # the token names the station it was issued at
        elsewhere = factories.station(session, code="ELSE")
        world.courier.station_id = world.device.station_id = elsewhere.id
    session.commit()
    read: list[str] = []

    def listen(*args: Any) -> None:
        read.append(args[2])

    connection = session.connection()
    event.listen(connection, "before_cursor_execute", listen)
    try:
        tracking_no = factories.parcel(session, world.station).tracking_no
        session.commit()
        body = factories.push_body("PDA-0001", [factories.event(1, tracking_no)])
        response = client.post("/api/v1/sync/push", json=body, headers=headers)
    finally:
        event.remove(connection, "before_cursor_execute", listen)
    expected = {
        None: (200, None),
        "device lost": (401, "device_not_active"),
        "account disabled": (401, "token_revoked"),
        "password changed": (401, "token_revoked"),
        "moved with its device": (401, "token_revoked"),
    }[change]
    assert (response.status_code, response.get_json().get("code")) == expected
    # The check reads the account's plain row, never its password's hash.
    account_reads = [sql for sql in read if "FROM app_user" in sql]
    assert account_reads and not any("password_hash" in sql for sql in account_reads)


def test_an_account_disabled_then_enabled_again_does_not_revive_its_old_tokens(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    """Disabling ends the account's sessions for good, as a password change does."""
    old = auth.tokens("courier1", "PDA-0001")
    admin = auth.headers("admin")
    url = f"/api/v1/users/{world.courier.id}"
    assert client.patch(url, json={"active": False}, headers=admin).status_code == 200
    assert client.patch(url, json={"active": True}, headers=admin).status_code == 200
    refreshed = client.post("/api/v1/auth/refresh", json={"refresh_token": old["refresh_token"]})
    assert (refreshed.status_code, error_code(refreshed)) == (401, "token_revoked")
    response = client.get(PROTECTED_URL, headers=bearer(old["access_token"]))
    assert (response.status_code, error_code(response)) == (401, "token_revoked")
    assert (
        client.get(PROTECTED_URL, headers=auth.headers("courier1", "PDA-0001")).status_code == 200
    )


@pytest.mark.parametrize("reported", ["lost", "retired"])
def test_a_device_brought_back_does_not_revive_the_tokens_issued_before(
    client: FlaskClient, world: World, auth: Auth, reported: str
) -> None:
    """A PDA is stolen with its tokens (issued a minute ago) and reported lost; found
    again and set active, the thief's copies stay dead, while the courier signs in
    again as usual."""
    minute_ago = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    stolen = {
        typ: jwt.encode(
            _claims_for(
                world,
                sub=str(world.courier.id),
                role="courier",
                device="PDA-0001",
                typ=typ,
                iat=minute_ago,
                ver=world.courier.credentials_version,
            ),
            TEST_JWT_SECRET,
            algorithm="HS256",
        )
        for typ in ("access", "refresh")
    }
    assert client.get(PROTECTED_URL, headers=bearer(stolen["access"])).status_code == 200
    manager, url = auth.headers("manager1"), "/api/v1/devices/PDA-0001"
    assert client.patch(url, json={"status": reported}, headers=manager).status_code == 200
    assert client.patch(url, json={"status": "active"}, headers=manager).status_code == 200
    refreshed = client.post("/api/v1/auth/refresh", json={"refresh_token": stolen["refresh"]})
    assert (refreshed.status_code, error_code(refreshed)) == (401, "device_not_active")
    for path in (PROTECTED_URL, "/api/v1/sync/pull"):
        response = client.get(path, headers=bearer(stolen["access"]))
        assert (response.status_code, error_code(response)) == (401, "device_not_active")
    assert (
        client.get(PROTECTED_URL, headers=auth.headers("courier1", "PDA-0001")).status_code == 200
    )
