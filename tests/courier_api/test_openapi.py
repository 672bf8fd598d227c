"""The committed openapi/openapi.json is the API's reference: it must match the code."""

import json
from pathlib import Path

from flask import Flask
from flask.testing import FlaskClient

from courier_api.extensions import api

SPEC_FILE = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"


def test_committed_spec_matches_the_app(app: Flask) -> None:
    with app.app_context():
        generated = json.loads(json.dumps(api.spec.to_dict()))
    committed = json.loads(SPEC_FILE.read_text())
    assert committed == generated, "openapi/openapi.json is stale: run `make openapi`"


def test_spec_and_docs_are_served(client: FlaskClient) -> None:
    spec = client.get("/openapi.json").get_json()
    assert "/api/v1/parcels" in spec["paths"]
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert b"/docs/assets/swagger-ui-bundle.js" in docs.data
    asset = client.get("/docs/assets/swagger-ui-bundle.js")
    assert asset.status_code == 200
    asset.close()


def test_every_operation_documents_its_errors(app: Flask) -> None:
    with app.app_context():
        spec = api.spec.to_dict()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":
                continue
            responses = operation["responses"]
            public = operation.get("security") == []
            if not public:
                assert "401" in responses and "403" in responses, f"{method} {path}"
            assert "default" in responses, f"{method} {path}"
