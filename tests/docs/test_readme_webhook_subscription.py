"""README.md's subscription example is what a recipient channel's integrator copies: it
must be taken as written, and take what the sentence before it promises, the request's
outcomes with its question and the drop topics with their retraction. A channel that
copied one drop topic of two would never hear of the other's drops (a retraction goes
only to the subscriptions its drop's announcement went to)."""

import json
import re
from pathlib import Path

from flask.testing import FlaskClient

from sync.ingest import DROP_TOPICS
from sync.outbox import TOPICS
from tests.conftest import Auth, World

README = Path(__file__).resolve().parents[2] / "README.md"


def the_example() -> dict:
    text = README.read_text(encoding="utf-8")
    found = re.search(r"^POST /api/v1/webhooks/subscriptions\n(\{.*\})$", text, re.M)
    assert found, "the README's subscription example is gone"
    return json.loads(found.group(1))


def test_the_subscription_example_takes_the_outcomes_and_every_drop_with_its_retraction() -> None:
    topics = set(the_example()["topics"])
    consent_requests = {topic for topic in TOPICS if topic.startswith("consent.request")}
    assert consent_requests <= topics
    assert {*DROP_TOPICS.values(), "parcel.drop_voided"} <= topics


def test_the_subscription_example_is_taken_as_written(
    client: FlaskClient, auth: Auth, world: World
) -> None:
    example = the_example() | {"station_id": world.station.id}
    response = client.post(
        "/api/v1/webhooks/subscriptions", json=example, headers=auth.headers("admin")
    )
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["topics"] == example["topics"]


def test_every_consent_request_payload_has_the_fields_the_readme_names(
    client: FlaskClient,
) -> None:
    """'Every payload has `request_id`, `tracking_no` and `station_id`': each consent
    request topic's documented payload (the OpenAPI callback's schema) requires them."""
    text = README.read_text(encoding="utf-8")
    named = re.search(r"Every payload\s+has ((?:`\w+`(?:, | and )?)+)", text)
    assert named, "the README no longer says which fields every payload has"
    fields = set(re.findall(r"`(\w+)`", named.group(1)))
    assert fields == {"request_id", "tracking_no", "station_id"}
    schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
    consent_request_topics = [topic for topic in TOPICS if topic.startswith("consent.request")]
    for topic in consent_request_topics:
        name = "Webhook" + "".join(part.title() for part in re.split(r"[._]", topic))
        assert fields <= set(schemas[name]["required"]), name
