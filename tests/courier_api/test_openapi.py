"""The committed openapi/openapi.json is the API's reference: it must match the code."""

import json
import re
from pathlib import Path

from flask import Flask
from flask.testing import FlaskClient

from courier_api.extensions import api
from models import EventType
from sync.events import COMMON_FIELDS, object_fields, type_fields

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
        "post /api/v1/auth/logout",
        "post /api/v1/auth/refresh",
        "post /api/v1/auth/token",
    ]
    assert len(protected) >= 12


def _schema(spec: dict, node: dict) -> dict:
    """A property's schema with its ``$ref`` (or a one-item ``allOf`` of it) followed."""
    if "allOf" in node and len(node["allOf"]) == 1:
        node = node["allOf"][0]
    if "$ref" in node:
        node = spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _names_type(description: str, event_type: str) -> bool:
    """A field's description names the event type carrying it, or a ``prefix*`` of it."""
    words = re.findall(r"[a-z_]+\*?", description)
    return any(
        word == event_type or (word.endswith("*") and event_type.startswith(word[:-1]))
        for word in words
    )


def test_the_push_documents_every_field_an_event_may_carry(app: Flask) -> None:
    """A PDA developer writes events from ``ScanEventIn``: each field the engine takes is
    there, with the event types that carry it, and each object's fields, required ones
    marked. A ``consent_requested`` event's ``request`` was missing (the schema says
    ``additionalProperties: false``), and ``collected_from_locker``'s ``locker_id`` and
    ``compartment`` were described as a locker drop's only."""
    with app.app_context():
        spec = json.loads(json.dumps(api.spec.to_dict()))
    event = spec["components"]["schemas"]["ScanEventIn"]
    carried_by: dict[str, set[str]] = {}
    for event_type in EventType:
        for name in type_fields(event_type):
            carried_by.setdefault(name, set()).add(event_type.value)
    assert set(event["properties"]) == COMMON_FIELDS | set(carried_by)
    undescribed = {
        name: sorted(
            t for t in types if not _names_type(event["properties"][name]["description"], t)
        )
        for name, types in carried_by.items()
    }
    assert {name: types for name, types in undescribed.items() if types} == {}
    for name, fields in object_fields().items():
        documented = _schema(spec, event["properties"][name])
        assert set(documented["properties"]) == set(fields), name
        required = {field for field, needed in fields.items() if needed}
        assert set(documented.get("required", [])) == required, name


def test_the_push_says_to_set_seq_conflicts_apart_before_pruning(app: Flask) -> None:
    """A PDA pruning up to ``acked_through_seq`` as the reference said deleted the
    events rejected ``seq_conflict``, which the server does not hold (their seq is
    another event's): the push and its receipt's field say to set them apart first."""
    with app.app_context():
        spec = api.spec.to_dict()
    push = spec["paths"]["/api/v1/sync/push"]["post"]["description"]
    acked = spec["components"]["schemas"]["PushReceipt"]["properties"]["acked_through_seq"]
    for text in (push, acked["description"]):
        assert "seq_conflict" in text
        assert re.search(r"set (it |them )?apart", " ".join(text.lower().split()))


def test_a_proofs_consent_and_span_say_a_repeated_drop_is_judged_by_its_first_scan(
    app: Flask,
) -> None:
    """The proof of a drop scanned again shows the consent and the span of its first
    scan (``sync.rules.judged_scan``): an auditor reading the second scan's proof saw a
    `judged_between` ending before the scan's own time, and the reference said it was
    the scan's own."""
    with app.app_context():
        spec = api.spec.to_dict()
    schemas = spec["components"]["schemas"]
    consent = schemas["ProofOut"]["properties"]["authorizing_consent"]["description"]
    span = schemas["ProofDetailOut"]["properties"]["judged_between"]["description"]
    search = spec["paths"]["/api/v1/proofs"]["get"]["description"]
    for text in (" ".join(t.split()) for t in (consent, span, search)):
        assert "scanned again" in text and "first scan" in text, text


def test_a_documented_response_adds_no_layer_around_its_view(app: Flask) -> None:
    """The push's eight documented refusals (400, 401, 403, 409, 413, 415, 422, 503)
    are in the spec, and a push calls through none of flask-smorest's alt_response
    wrappers, each of which only called the view again."""
    from courier_api.api.sync.routes import Push

    with app.app_context():
        spec = api.spec.to_dict()  # type: ignore[union-attr]
    documented = spec["paths"]["/api/v1/sync/push"]["post"]["responses"]
    assert {"400", "401", "403", "409", "413", "415", "422", "503"} <= set(documented)
    layers = []
    view = Push.post
    while view is not None:
        layers.append(view.__code__.co_qualname)
        view = getattr(view, "__wrapped__", None)
    assert layers[-1] == "Push.post"
    assert not [layer for layer in layers if "alt_response" in layer], layers
