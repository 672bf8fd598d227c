"""Request bodies: too large (also chunked, with no Content-Length) and too deep.

The shapes of push payloads are fuzzed in test_sync_fuzz.py; these are the limits.
A chunked upload through the real server (gunicorn) is in test_operations_live.py.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from tests import factories
from tests.conftest import Auth, World

LIMIT = 4096


@pytest.fixture
def small(app_with: Callable[..., Flask], world: World) -> tuple[FlaskClient, dict[str, str]]:
    client = app_with(MAX_CONTENT_LENGTH=LIMIT).test_client()
    return client, Auth(client).headers("courier1", "PDA-0001")


def chunked(
    client: FlaskClient, method: str, path: str, data: bytes, headers: dict[str, str], ctype: str
) -> TestResponse:
    """A body sent as gunicorn hands a chunked one to the app: no Content-Length, the
    stream ends where the body does (``wsgi.input_terminated``)."""
    response = client.open(
        path,
        method=method,
        input_stream=io.BytesIO(data),
        headers={**headers, "Content-Type": ctype, "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    return response


def assert_too_large(response: TestResponse, limit: int = LIMIT) -> None:
    assert response.status_code == 413, response.get_data(as_text=True)[:300]
    body = response.get_json()
    assert body["code"] == "payload_too_large" and body["status"] == 413
    assert f"{limit} bytes" in body["message"]
    assert body["limit"] == {"max": limit, "unit": "bytes"}
    assert response.headers["X-Request-Id"]


def push_body(events: int) -> dict[str, Any]:
    tn = factories.s10()
    return factories.push_body("PDA-0001", [factories.event(i, tn) for i in range(1, events + 1)])


def test_an_oversized_push_is_413_with_or_without_content_length(small: Any) -> None:
    client, headers = small
    data = json.dumps(push_body(60)).encode()
    assert len(data) > LIMIT
    assert_too_large(
        client.post(
            "/api/v1/sync/push", data=data, headers=headers, content_type="application/json"
        )
    )
    assert_too_large(
        chunked(client, "POST", "/api/v1/sync/push", data, headers, "application/json")
    )
    # Under the limit, a chunked push is read whole and applied.
    fits = json.dumps(push_body(2)).encode()
    response = chunked(client, "POST", "/api/v1/sync/push", fits, headers, "application/json")
    assert response.status_code == 200, response.get_json()
    assert [r["status"] for r in response.get_json()["results"]] == ["applied", "applied"]


def test_an_oversized_image_upload_is_413_with_or_without_content_length(small: Any) -> None:
    client, headers = small
    data = b"\x89PNG\r\n\x1a\n" + b"\0" * (2 * LIMIT)
    path = f"/api/v1/blobs/{hashlib.sha256(data).hexdigest()}"
    assert_too_large(client.put(path, data=data, headers=headers, content_type="image/png"))
    assert_too_large(chunked(client, "PUT", path, data, headers, "image/png"))


def test_a_request_body_under_max_request_bytes_but_over_max_blob_bytes_is_413(
    app_with: Callable[..., Flask], world: World
) -> None:
    client = app_with(MAX_CONTENT_LENGTH=LIMIT, MAX_BLOB_BYTES=1024).test_client()
    headers = Auth(client).headers("courier1", "PDA-0001")
    data = b"\x89PNG\r\n\x1a\n" + b"\0" * 2000
    path = f"/api/v1/blobs/{hashlib.sha256(data).hexdigest()}"
    response = chunked(client, "PUT", path, data, headers, "image/png")
    assert response.status_code == 413
    assert "the limit is 1,024" in response.get_json()["message"]


@pytest.mark.parametrize("depth", [33, 1_000, 200_000])
def test_json_nested_absurdly_deep_is_a_400_not_a_500(
    client: FlaskClient, world: World, auth: Auth, depth: int
) -> None:
    courier = auth.headers("courier1", "PDA-0001")
    admin = auth.headers("admin")
    nested = "[" * depth + "]" * depth
    raw = json.dumps({**push_body(1), "events": "NESTED"}).replace('"NESTED"', nested)
    # A push judges depth per event (tests/courier_api/test_sync_api.py): only a body its
    # parser cannot read is a 400 there.
    pushed = [("/api/v1/sync/push", courier)] if depth > 100_000 else []
    for path, headers in [*pushed, ("/api/v1/consents", admin), ("/api/v1/parcels", admin)]:
        response = client.post(path, data=raw, headers=headers, content_type="application/json")
        assert response.status_code == 400, (path, response.get_json())
        assert response.get_json()["code"] == "bad_request"
    # The deepest document fits in the body limit: 400 KB of brackets.
    assert len(raw) < 16 * 1024 * 1024
