"""The live app against its committed OpenAPI document, with schemathesis.

The document is read from ``openapi/openapi.json`` (what API users download), not
from the app, so a test here fails when the app answers something the committed
document does not say. For every operation in it:

* **fuzzed** requests: schemathesis generates valid requests (positive mode), with
  generated path parameters and with the ids of real subjects (``tests.subjects``: a
  station's day with shifts, flags, proofs, consents, ...), and invalid ones
  (negative mode);
* **one known-good request** (``tests.subjects.REQUESTS``), so that each success
  answer is checked at least once even where a generated body could never pass
  (a push needs the caller's own PDA, an image its own digest).

Each request is sent in-process (WSGI) as every role: admin, auditor, integration,
station manager, and courier signed in with a PDA. Every answer must:

* not be a server error (no 5xx);
* have a status code the operation lists explicitly: the catch-all ``default``
  response flask-smorest adds does not count, except for the errors any operation
  may answer (``GENERIC_STATUSES``);
* have the documented content type, a body matching the documented schema and
  documented headers;
* when it is an error, be the project's error body whose ``status`` is the status;
* in negative mode, be a 4xx (schemathesis' ``negative_data_rejection``): the API
  refuses what its document calls invalid. Batches judged item by item
  (``PER_ITEM``: parcel intake, sync push) may instead answer a 200 that rejects
  the invalid items, as DESIGN.md rule 1 asks; at least one must be rejected.

The Authorization header is never generated: each role's token replaces it, so a
negative case is invalid in what the document describes, not in its credentials
(the authorization matrix, ``test_authorization_matrix``, covers those).

Left out, each on purpose:

* ``GET /readyz`` and ``GET /healthz`` run without the station's day and without a
  token: on SQLite the test's own open write transaction would lock the file
  against ``/readyz``'s separate connection (it would answer its documented 503).
* Negative mode for operations where nothing can be invalid on the wire but a
  string in the path (``GET /api/v1/devices/{device_id}``, ...): hypothesis finds
  no such case (``Unsatisfiable``), and the test goes on.
* Checks that need a stateful model of the API (``use_after_free``,
  ``ensure_resource_availability``) and ``positive_data_acceptance``: a valid
  request may rightly be refused here (409 for a shift already open, 404 for an
  id that names nothing); ``tests.subjects.REQUESTS`` covers the successes.

Small and deterministic: ``MAX_EXAMPLES`` examples per operation and mode,
``derandomize=True`` (the same requests on every run and machine), no example
database.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core import NOT_SET
from schemathesis.specs.openapi import checks as openapi_checks
from schemathesis.specs.openapi.checks import negative_data_rejection
from sqlalchemy.orm import Session

from tests import subjects
from tests.conftest import Auth
from tests.subjects import Subjects

SPEC = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"
SCHEMA = schemathesis.openapi.from_path(SPEC)
OPERATIONS = {
    f"{op.method.upper()} {op.path}": op
    for op in (result.ok() for result in SCHEMA.get_all_operations())
}
CALLERS: dict[str, subjects.Caller] = {
    "admin": subjects.ADMIN,
    "auditor": subjects.AUDITOR,
    "integration": subjects.INTEGRATION,
    "manager": subjects.MANAGER,
    "courier": subjects.COURIER,
}
WITHOUT_SUBJECTS = {"GET /healthz", "GET /readyz"}
# Answers any operation may give without listing them: a body over MAX_REQUEST_BYTES,
# and the database being unavailable (both with the error body, checked below).
GENERIC_STATUSES = {413, 503}
# Batches whose items are judged one by one: an invalid item is rejected in the 200's
# results, its siblings go on (DESIGN.md, rule 1), so invalid items are not a 4xx.
PER_ITEM = {"POST /api/v1/parcels", "POST /api/v1/sync/push"}
MAX_EXAMPLES = 6
SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


# -- checks -----------------------------------------------------------------------------------


def status_code_declared(ctx: Any, response: Any, case: Case) -> None:
    """The status is listed by the operation itself, not only covered by ``default``."""
    status = response.status_code
    listed = {str(code) for code in case.operation.definition.raw.get("responses", {})}
    if status in GENERIC_STATUSES or str(status) in listed:
        return
    raise AssertionError(
        f"{case.operation.label} answered {status}, which its responses do not list "
        f"({', '.join(sorted(listed))})"
    )


def error_body(ctx: Any, response: Any, case: Case) -> None:
    """Errors carry the project's body: ``code``, ``message`` and the same ``status``."""
    if response.status_code < 400:
        return
    body = response.json()
    assert isinstance(body, dict), body
    assert isinstance(body.get("code"), str) and isinstance(body.get("message"), str), body
    assert body.get("status") == response.status_code, body


def refused_per_item(ctx: Any, response: Any, case: Case) -> None:
    """Negative mode, for batches judged item by item (``PER_ITEM``): refused as a
    whole (4xx), or a 200 that rejects at least one item."""
    if 400 <= response.status_code < 500:
        return
    assert response.status_code == 200, response.status_code
    statuses = [item["status"] for item in response.json()["results"]]
    assert "rejected" in statuses, f"{case.operation.label} accepted invalid items: {statuses}"


CHECKS = [
    not_a_server_error,
    status_code_declared,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.response_headers_conformance,
    error_body,
]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def built(session: Session, app: Flask, client: FlaskClient) -> Subjects:
    return subjects.build(session, app, client)


def fuzzer(
    app: Flask, strategy: Any, headers: dict[str, dict[str, str]], checks: list[Callable[..., Any]]
) -> Callable[[], None]:
    @SETTINGS
    @given(case=strategy)
    def fuzz(case: Case) -> None:
        send_as_everyone(app, case, headers, checks)

    return fuzz


def send_as_everyone(
    app: Flask, case: Case, headers: dict[str, dict[str, str]], checks: list[Callable[..., Any]]
) -> None:
    for role_headers in headers.values():
        response = case.call(app=app, headers=role_headers)
        case.validate_response(response, checks=checks, headers=role_headers)


def strategies(operation: Any, real: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """The generated requests of ``operation``: positive, positive at real subjects,
    negative (each run on its own, so each gets its examples). The Authorization
    header is fixed (each role's replaces it), so that it is never generated nor
    made invalid: negative cases are invalid in what the document describes."""
    fixed = {"headers": {"Authorization": "Bearer replaced-by-each-role"}}
    names = {p.name for p in operation.path_parameters}
    at_subjects = {name: real[name] for name in names}
    yield "positive", operation.as_strategy(**fixed)
    if at_subjects:
        yield "at subjects", operation.as_strategy(path_parameters=at_subjects, **fixed)
    if operation.path_parameters or operation.query or operation.body:
        negative = GenerationMode.NEGATIVE
        yield "negative", operation.as_strategy(generation_mode=negative, **fixed)


# -- tests ------------------------------------------------------------------------------------


def test_every_operation_of_the_document_is_tested() -> None:
    assert sorted(OPERATIONS) == sorted(subjects.REQUESTS)


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_the_app_answers_as_documented(
    request: pytest.FixtureRequest, app: Flask, client: FlaskClient, label: str
) -> None:
    operation = OPERATIONS[label]
    if label in WITHOUT_SUBJECTS:
        real: dict[str, Any] = {}
        headers = {"anonymous": {}}
    else:
        built: Subjects = request.getfixturevalue("built")
        real = subjects.path_parameters(built)
        headers = {role: Auth(client).headers(*caller) for role, caller in CALLERS.items()}
        known_good(app, operation, built, headers)
    for mode, strategy in strategies(operation, real):
        checks = CHECKS
        if mode == "negative":
            rejection = refused_per_item if label in PER_ITEM else negative_data_rejection
            checks = [*CHECKS, rejection]
        try:
            fuzzer(app, strategy, headers, checks)()
        except Unsatisfiable:
            # Nothing of it can be invalid but a string in the path, which cannot be
            # invalid on the wire (GET /api/v1/devices/{device_id}, ...).
            assert mode == "negative", label


def known_good(
    app: Flask, operation: Any, built: Subjects, headers: dict[str, dict[str, str]]
) -> None:
    """The operation's valid request (``tests.subjects.REQUESTS``), as every role; at
    least one of them must succeed, so that a success answer is checked too."""
    statuses = {}
    for role, caller in CALLERS.items():
        spec = subjects.REQUESTS[operation.label](built, caller)
        body: Any = spec.json if spec.data is None else spec.data
        json = "application/json" if spec.json is not None else None
        case = operation.Case(
            path_parameters=dict(spec.path),
            query=dict(spec.query or {}),
            body=NOT_SET if body is None else body,
            media_type=spec.content_type or json,
        )
        response = case.call(app=app, headers=headers[role])
        case.validate_response(response, checks=CHECKS, headers=headers[role])
        statuses[role] = response.status_code
    assert any(200 <= status < 300 for status in statuses.values()), statuses


# Answers the app gave that the document did not list, until this test found them.
FOUND_UNDOCUMENTED = [
    ("GET /api/v1/blobs/{sha256}", "422"),  # a name that is not a sha256
    ("POST /api/v1/devices", "404"),  # station_id names no station
    ("POST /api/v1/users", "404"),
    *(  # JSON that does not parse
        (label, "400")
        for label, operation in OPERATIONS.items()
        if any(body.media_type == "application/json" for body in operation.body)
    ),
]


@pytest.mark.parametrize(("label", "status"), FOUND_UNDOCUMENTED)
def test_statuses_the_app_answers_are_documented(label: str, status: str) -> None:
    operation = OPERATIONS[label]
    assert status in operation.definition.raw["responses"]
