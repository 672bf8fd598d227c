"""Values the database cannot store are refused with a 4xx, on SQLite and on PostgreSQL."""

import json

import pytest
from flask.testing import FlaskClient

from tests import factories
from tests.conftest import Auth, World

HUGE = 99_999_999_999


def test_huge_ids_in_paths_are_404(client: FlaskClient, world: World, auth: Auth) -> None:
    admin = auth.headers("admin")
    for path in (f"/api/v1/stations/{HUGE}", f"/api/v1/users/{HUGE}"):
        response = client.get(path, headers=admin)
        assert response.status_code == 404, path
        assert response.get_json()["code"] == "not_found"


@pytest.mark.parametrize(
    "path",
    [
        f"/api/v1/stations?after={HUGE}",
        f"/api/v1/users?station_id={HUGE}",
        f"/api/v1/devices?station_id={HUGE}",
        "/api/v1/users?station_id=-1",
    ],
)
def test_out_of_range_query_numbers_are_422(
    client: FlaskClient, world: World, auth: Auth, path: str
) -> None:
    response = client.get(path, headers=auth.headers("admin"))
    assert response.status_code == 422
    assert response.get_json()["errors"]["query"]


def test_out_of_range_body_numbers_are_422(client: FlaskClient, world: World, auth: Auth) -> None:
    response = client.post(
        "/api/v1/devices",
        json={"device_id": "PDA-X1", "station_id": HUGE},
        headers=auth.headers("admin"),
    )
    assert response.status_code == 422
    assert "station_id" in response.get_json()["errors"]["json"]


@pytest.mark.parametrize("username", ["manager1\x00", "man\ud800ager1"])
def test_unstorable_characters_are_refused_by_name(
    client: FlaskClient, world: World, username: str
) -> None:
    body = json.dumps({"username": username, "password": "whatever-123"})
    response = client.post("/api/v1/auth/token", data=body, content_type="application/json")
    assert response.status_code == 422
    assert response.get_json()["errors"]["json"]["username"] == [
        "must not contain NUL characters or unpaired surrogates"
    ]


@pytest.mark.parametrize(
    "body",
    [
        '{"username": "a", "password": "b", "device_id": ' + "9" * 5000 + "}",
        "[" * 100_000 + "]" * 100_000,
    ],
    ids=["integer-beyond-digit-limit", "deep-nesting"],
)
def test_json_python_cannot_parse_is_400(client: FlaskClient, body: str) -> None:
    response = client.post("/api/v1/auth/token", data=body, content_type="application/json")
    assert response.status_code == 400
    assert response.get_json()["code"] == "bad_request"


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ('{"username": "a",, "password": "b"}', "the body is not valid JSON: Expecting"),
        ("[" * 40 + "]" * 40, "the body is JSON nested deeper than 32 levels"),
        ("[" * 100_000 + "]" * 100_000, "the body is JSON nested deeper than"),
    ],
    ids=["syntax", "deeper-than-32", "deeper-than-the-parser"],
)
def test_a_body_that_is_not_json_we_read_says_why(
    client: FlaskClient, body: str, said: str
) -> None:
    """A PDA developer's malformed body read "The browser (or proxy) sent a request that
    this server could not understand.": DESIGN's errors have a human message naming the
    field at fault. It says what is wrong with the body, under ``errors.body`` too (the
    field at fault, as a body over the size limit names it)."""
    response = client.post("/api/v1/auth/token", data=body, content_type="application/json")
    assert response.status_code == 400
    error = response.get_json()
    assert error["code"] == "bad_request"
    assert error["message"].startswith(said), error
    assert error["errors"] == {"body": [error["message"]]}


@pytest.mark.parametrize("path", ["/api/v1/devices/PDA%00X", "/api/v1/parcels/RR%0012"])
def test_nul_characters_in_paths_never_give_500(
    client: FlaskClient, world: World, auth: Auth, path: str
) -> None:
    response = client.get(path, headers=auth.headers("admin"))
    assert response.status_code in (404, 422)
    assert response.get_json()["status"] == response.status_code
    # The request's session is usable again afterwards (no aborted transaction).
    assert client.get("/api/v1/stations", headers=auth.headers("admin")).status_code == 200


@pytest.mark.parametrize("bad_name", ["A\x00", "A\udfff"])
def test_an_unstorable_string_in_one_intake_item_rejects_only_that_item(
    client: FlaskClient, world: World, auth: Auth, bad_name: str
) -> None:
    good, bad = factories.s10(), factories.s10()
    response = client.post(
        "/api/v1/parcels",
        headers=auth.headers("manager1"),
        json={
            "parcels": [
                {
                    "tracking_no": good,
                    "service_class": "parcel",
                    "recipient_name": "A",
                    "address": "B",
                },
                {
                    "tracking_no": bad,
                    "service_class": "parcel",
                    "recipient_name": bad_name,
                    "address": "B",
                },
            ]
        },
    )
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert [r["status"] for r in results] == ["created", "rejected"]
    assert "recipient_name" in results[1]["error"]["errors"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_json_body_sent_as_something_else_is_415_naming_the_header(
    client: FlaskClient, world: World, auth: Auth, content_type: str | None
) -> None:
    """A PDA's HTTP stack that labels the push ``text/plain`` (or not at all) is told
    what is wrong, not that every field of the body it sent is missing."""
    body = json.dumps(factories.push_body("PDA-0001", []))
    headers = auth.headers("courier1", "PDA-0001")
    if content_type is None:
        response = client.post("/api/v1/sync/push", data=body.encode(), headers=headers)
    else:
        response = client.post(
            "/api/v1/sync/push", data=body, content_type=content_type, headers=headers
        )
    assert response.status_code == 415, response.get_json()
    answer = response.get_json()
    assert answer["code"] == "unsupported_media_type"
    assert answer["errors"] == {"Content-Type": ["must be application/json"]}
    assert "application/json" in answer["message"]


def test_an_empty_body_without_a_content_type_is_still_a_missing_field(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    response = client.post("/api/v1/auth/token")
    assert response.status_code == 422
    assert "username" in response.get_json()["errors"]["json"]


@pytest.mark.parametrize(
    ("path", "username", "unknown"),
    [
        ("/api/v1/proofs?tracking=RR123456785GB", "auditor1", "tracking"),
        ("/api/v1/flags?knd=missing_at_handover", "manager1", "knd"),
        ("/api/v1/shifts?stauts=closed", "manager1", "stauts"),
    ],
)
def test_an_unknown_query_parameter_is_422_naming_it_not_ignored(
    client: FlaskClient, world: World, auth: Auth, path: str, username: str, unknown: str
) -> None:
    """A misspelled filter must not answer every record as if there were none."""
    response = client.get(path, headers=auth.headers(username))
    assert response.status_code == 422, response.get_json()
    assert response.get_json()["errors"]["query"] == {unknown: ["Unknown field."]}
