"""Every error under /api has one JSON body: code, status, message (and errors per field)."""

from pathlib import Path

import marshmallow as ma
import pytest
from flask.testing import FlaskClient

from courier_api.api.base import PageArgs
from courier_api.api.sync.schemas import PullArgs
from courier_api.errors import LOCATIONS, validation_message
from sync.paging import MAX_PAGE_SIZE
from tests import factories
from tests.conftest import Auth, World, make_test_app


def assert_error_shape(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status
    assert response.mimetype == "application/json", response.data[:200]
    body = response.get_json()
    # ``limit``: a 413's only, how many one request may carry.
    assert set(body) <= {"code", "status", "message", "errors"} | (
        {"limit"} if status == 413 else set()
    )
    assert body["status"] == status
    assert isinstance(body["code"], str) and body["code"]
    assert isinstance(body["message"], str) and body["message"]
    if code:
        assert body["code"] == code
    return body


def test_400_malformed_json(client: FlaskClient, world: World) -> None:
    response = client.post("/api/v1/auth/token", data="{not json", content_type="application/json")
    assert_error_shape(response, 400, "bad_request")


def test_401_without_token(client: FlaskClient) -> None:
    assert_error_shape(client.get("/api/v1/users"), 401, "token_missing")


def test_403_for_another_station(client: FlaskClient, world: World, auth: Auth) -> None:
    response = client.get(
        f"/api/v1/stations/{world.other_station.id}", headers=auth.headers("manager1")
    )
    assert_error_shape(response, 403, "station_forbidden")


def test_404_unknown_path_and_unknown_resource(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    assert_error_shape(client.get("/api/v1/nothing-here"), 404, "not_found")
    response = client.get("/api/v1/stations/999999", headers=auth.headers("admin"))
    assert_error_shape(response, 404, "station_not_found")


def test_405_names_the_allowed_methods(client: FlaskClient) -> None:
    response = client.delete("/api/v1/auth/token")
    assert_error_shape(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_409_duplicate(client: FlaskClient, world: World, auth: Auth) -> None:
    response = client.post(
        "/api/v1/stations", json={"code": "ST1", "name": "Again"}, headers=auth.headers("admin")
    )
    body = assert_error_shape(response, 409, "station_exists")
    assert "code" in body["errors"]


def test_413_body_over_the_limit(database_url: str, tmp_path: Path) -> None:
    app = make_test_app(database_url, tmp_path, MAX_CONTENT_LENGTH=1024)
    response = app.test_client().post(
        "/api/v1/auth/token", data="x" * 4096, content_type="application/json"
    )
    body = assert_error_shape(response, 413, "payload_too_large")
    assert "1024" in body["message"]


def test_413_names_the_body_and_says_to_send_less(database_url: str, tmp_path: Path) -> None:
    """A PDA whose push is over the byte limit reads errors for the field at fault, as
    for an image too large (errors.body), and learns nothing was stored: split it."""
    app = make_test_app(database_url, tmp_path, MAX_CONTENT_LENGTH=1024)
    response = app.test_client().post(
        "/api/v1/auth/token", data="x" * 4096, content_type="application/json"
    )
    body = assert_error_shape(response, 413, "payload_too_large")
    assert body["errors"] == {"body": [body["message"]]}
    assert "nothing was stored" in body["message"]
    assert body["limit"] == {"max": 1024, "unit": "bytes"}


def test_422_names_the_field(client: FlaskClient, world: World, auth: Auth) -> None:
    response = client.post("/api/v1/stations", json={"code": "X1"}, headers=auth.headers("admin"))
    body = assert_error_shape(response, 422, "validation_error")
    assert "name" in body["errors"]["json"]


def test_422_unknown_query_argument_value(client: FlaskClient, world: World, auth: Auth) -> None:
    response = client.get("/api/v1/users?limit=0", headers=auth.headers("admin"))
    body = assert_error_shape(response, 422, "validation_error")
    assert "limit" in body["errors"]["query"]


def test_a_422s_message_names_each_field_at_fault_and_what_is_wrong(
    client: FlaskClient, world: World, auth: Auth
) -> None:
    """The message said "the request did not validate; see errors" whatever the fault:
    a manager's sign-off together naming a shift without its balance version, or a
    flag queue filtered from a day without its offset, read only that. It names the
    field (a list's item by its index) and what is wrong now; `errors` is unchanged."""
    manager = auth.headers("manager1")
    response = client.post(
        f"/api/v1/stations/{world.station.id}/signoffs",
        json={"note": "all accounted for", "shifts": [{"shift_id": 1}]},
        headers=manager,
    )
    body = assert_error_shape(response, 422, "validation_error")
    assert body["errors"] == {
        "json": {"shifts": {"0": {"balance_version": ["Missing data for required field."]}}}
    }
    assert body["message"] == (
        "the request did not validate: shifts[0].balance_version: Missing data for required field."
    )
    response = client.get("/api/v1/flags?raised_from=2026-11-23&limit=0", headers=manager)
    body = assert_error_shape(response, 422, "validation_error")
    assert body["message"].startswith("the request did not validate: ")
    assert (
        "raised_from: give the time with its offset: 2026-11-23T19:00:00+08:00"
        in (body["message"])
    )
    assert "limit: Must be greater than or equal to 1" in body["message"]


def test_a_422s_message_names_the_first_fields_and_counts_the_others() -> None:
    errors = {"json": {"a": ["bad"], "b": {"c": ["worse"]}, "_schema": ["odd"], "d": ["x"]}}
    assert validation_message(errors) == (
        "the request did not validate: a: bad; b.c: worse; odd; and 1 more (see errors)"
    )


@pytest.fixture
def failing_client(database_url: str, tmp_path: Path) -> FlaskClient:
    app = make_test_app(database_url, tmp_path, PROPAGATE_EXCEPTIONS=False)

    @app.route("/api/v1/_boom")
    def boom():
        raise RuntimeError("a bug with a secret in it")

    return app.test_client()


def test_500_is_json_and_hides_the_details(failing_client: FlaskClient) -> None:
    body = assert_error_shape(failing_client.get("/api/v1/_boom"), 500, "internal_error")
    assert "secret" not in body["message"]


def test_errors_are_keyed_as_the_reference_says_by_location_or_by_field(
    client: FlaskClient, world: World
) -> None:
    """The reference said every ``errors`` was keyed by location then field: a PDA
    reading ``errors[location][field]`` broke on a domain error's flat
    ``{"device_id": [...]}``. Both shapes are documented, each by its example."""
    invalid = client.post("/api/v1/auth/token", json={"username": "courier1"})
    assert_error_shape(invalid, 422, "validation_error")
    assert list(invalid.get_json()["errors"]) == ["json"]
    assert "password" in invalid.get_json()["errors"]["json"]
    refused = client.post(
        "/api/v1/auth/token",
        json={"username": "courier1", "password": factories.PASSWORD},
    )
    assert_error_shape(refused, 422, "device_required")
    assert isinstance(refused.get_json()["errors"]["device_id"], list)
    spec = client.get("/openapi.json").get_json()
    described = spec["components"]["schemas"]["Error"]["properties"]["errors"]["description"]
    assert "errors.json.password" in described and "errors.device_id" in described


def assert_fields_named_as_documented(body: dict) -> None:
    """``errors`` as the reference keys it: a 422 ``validation_error`` by location, then
    field; any other error by the field alone, each with its messages."""
    errors = body.get("errors")
    if errors is None:
        return
    if body["code"] == "validation_error":
        assert set(errors) <= LOCATIONS, errors
        assert all(isinstance(fields, dict) for fields in errors.values()), errors
        return
    for field, messages in errors.items():
        assert field not in LOCATIONS, errors
        assert isinstance(messages, list) and all(isinstance(m, str) for m in messages), errors


def test_every_kind_of_error_names_its_field_as_the_reference_says(
    client: FlaskClient, world: World, auth: Auth, database_url: str, tmp_path: Path
) -> None:
    """A body that was not JSON (400) said so under ``errors.json``, a location, and one
    sent as another Content-Type (415) under ``errors.headers["Content-Type"]``: a client
    reading a non-422 error's ``errors[field]`` as the reference says found a location,
    or a dict where the messages should be. Each kind now keys its field alone: the
    body (``errors.body``, as for a body over the size limit), the header."""
    admin = auth.headers("admin")
    courier = auth.headers("courier1", "PDA-0001")
    small = make_test_app(database_url, tmp_path, MAX_CONTENT_LENGTH=64).test_client()
    answers = {
        "400": client.post("/api/v1/auth/token", data="{x", content_type="application/json"),
        "401": client.get("/api/v1/users"),
        "403": client.get(
            f"/api/v1/stations/{world.other_station.id}", headers=auth.headers("manager1")
        ),
        "404": client.get("/api/v1/nothing-here"),
        "404 domain": client.get("/api/v1/stations/999999", headers=admin),
        "405": client.put("/api/v1/stations", headers=admin),
        "409": client.post("/api/v1/stations", json={"code": "ST1", "name": "x"}, headers=admin),
        "400 cursor": client.get("/api/v1/sync/pull?cursor=!!", headers=courier),
        "413": small.post("/api/v1/auth/token", data="x" * 128, content_type="application/json"),
        "415": client.post(
            "/api/v1/stations", data="code=X", content_type="text/plain", headers=admin
        ),
        "422": client.post("/api/v1/stations", json={"code": 5}, headers=admin),
        "422 query": client.get("/api/v1/users?limit=0", headers=admin),
        "422 domain": client.post(
            "/api/v1/auth/token", json={"username": "courier1", "password": factories.PASSWORD}
        ),
    }
    for _ in range(11):
        answers["429"] = client.post(
            "/api/v1/auth/token", json={"username": "nobody", "password": "not it at all"}
        )
    for kind, response in answers.items():
        body = assert_error_shape(response, response.status_code)
        assert response.status_code == int(kind.split()[0]), (kind, body)
        assert_fields_named_as_documented(body)
    assert answers["400"].get_json()["errors"] == {"body": [answers["400"].get_json()["message"]]}
    assert answers["415"].get_json()["errors"] == {"Content-Type": ["must be application/json"]}


@pytest.mark.parametrize("schema", [PageArgs, PullArgs], ids=["page", "pull"])
def test_a_page_is_bounded_by_the_services_page_size(schema: type[ma.Schema]) -> None:
    """The API's bound on ``limit`` is the page size the services clamp to
    (``sync.paging``): asking for the most they give is taken, one more refused."""
    assert schema().load({"limit": str(MAX_PAGE_SIZE)})["limit"] == MAX_PAGE_SIZE
    with pytest.raises(ma.ValidationError) as refused:
        schema().load({"limit": str(MAX_PAGE_SIZE + 1)})
    assert "limit" in refused.value.messages
