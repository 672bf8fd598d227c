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


def test_every_protected_operation_documents_401_and_403(app: Flask) -> None:
    with app.app_context():
        spec = api.spec.to_dict()
    public, protected = [], []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":
                continue
            if operation.get("security") == []:
                public.append(f"{method} {path}")
                continue
            protected.append(f"{method} {path}")
            assert {"401", "403"} <= set(operation["responses"]), f"{method} {path}"
    assert sorted(public) == [
        "get /healthz",
        "get /readyz",
        "post /api/v1/auth/refresh",
        "post /api/v1/auth/token",
    ]
    assert len(protected) >= 12
