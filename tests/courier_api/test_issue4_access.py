"""Who may do what with consents and proofs: each role, at its own station and at
another, declared once. (The flags endpoints have their own matrix in test_flags_api.)
Another station's consent or proof, found by its id, is a 404 to a manager, as an unknown
id is: a 403 would tell them it exists."""

import datetime as dt
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from tests import factories
from tests.conftest import Auth, World

# caller -> (username, device)
CALLERS = {
    "admin": ("admin", None),
    "auditor": ("auditor1", None),
    "integration": ("app1", None),
    "manager_own": ("manager1", None),
    "manager_other": ("manager2", None),
    "courier": ("courier1", "PDA-0001"),
}
# endpoint -> expected status per caller; the subjects belong to station ST1.
EXPECTED: dict[str, dict[str, int]] = {
    "GET /consents": dict(
        admin=200, auditor=200, integration=200, manager_own=200, manager_other=200, courier=403
    ),  # noqa: E501
    "POST /consents": dict(
        admin=201, auditor=403, integration=201, manager_own=403, manager_other=403, courier=403
    ),  # noqa: E501
    "GET /consents/<id>": dict(
        admin=200, auditor=200, integration=200, manager_own=200, manager_other=404, courier=403
    ),  # noqa: E501
    "POST /consents/<id>/revoke": dict(
        admin=200, auditor=403, integration=200, manager_own=403, manager_other=403, courier=403
    ),  # noqa: E501
    "GET /proofs": dict(
        admin=200, auditor=200, integration=403, manager_own=200, manager_other=200, courier=403
    ),  # noqa: E501
    "GET /proofs/<id>": dict(
        admin=200, auditor=200, integration=403, manager_own=200, manager_other=404, courier=403
    ),  # noqa: E501
    "GET /proofs/export.csv": dict(
        admin=200, auditor=200, integration=403, manager_own=200, manager_other=200, courier=403
    ),  # noqa: E501
}


@pytest.fixture
def subjects(client: FlaskClient, auth: Auth, session: Session, world: World) -> dict[str, Any]:
    parcel = factories.parcel(session, world.station)
    session.commit()
    at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    consent = client.post(
        "/api/v1/consents",
        json={
            "tracking_no": parcel.tracking_no,
            "method": "any",
            "channel": "app",
            "granted_at": at.isoformat(),
        },
        headers=auth.headers("app1"),
    ).get_json()
    events = [
        factories.event(1, parcel.tracking_no, occurred_at=at),
        factories.event(
            2, parcel.tracking_no, "delivered", occurred_at=at, pod={"recipient_name": "R"}
        ),
    ]
    receipt = client.post(
        "/api/v1/sync/push",
        json=factories.push_body("PDA-0001", events),
        headers=auth.headers("courier1", "PDA-0001"),
    ).get_json()
    assert [r["status"] for r in receipt["results"]] == ["applied", "applied"]
    proof = client.get("/api/v1/proofs", headers=auth.headers("admin")).get_json()["items"][0]
    return {"parcel": parcel, "consent_id": consent["id"], "proof_id": proof["event_id"]}


def call(client: FlaskClient, endpoint: str, subjects: dict[str, Any], headers: dict) -> int:
    method, path = endpoint.split(" ")
    path = path.replace("/consents/<id>", f"/consents/{subjects['consent_id']}")
    path = path.replace("/proofs/<id>", f"/proofs/{subjects['proof_id']}")
    url = f"/api/v1{path}"
    if method == "GET":
        return client.get(url, headers=headers).status_code
    body: dict[str, Any] = {}
    if path == "/consents":
        body = {
            "tracking_no": subjects["parcel"].tracking_no,
            "method": "locker",
            "channel": "sms",
            "granted_at": dt.datetime.now(dt.UTC).isoformat(),
        }
    return client.post(url, json=body, headers=headers).status_code


@pytest.mark.parametrize("endpoint", sorted(EXPECTED))
@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_access(
    client: FlaskClient,
    auth: Auth,
    subjects: dict[str, Any],
    endpoint: str,
    caller: str,
) -> None:
    username, device = CALLERS[caller]
    status = call(client, endpoint, subjects, auth.headers(username, device))
    assert status == EXPECTED[endpoint][caller]


@pytest.mark.parametrize("endpoint", sorted(EXPECTED))
def test_no_token_is_401(client: FlaskClient, subjects: dict[str, Any], endpoint: str) -> None:
    assert call(client, endpoint, subjects, {}) == 401
