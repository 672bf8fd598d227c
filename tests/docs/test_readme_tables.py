"""README.md's tables of scheduled jobs and webhook topics are what an operator and an
integrator plan by: every job the scheduler runs is a row with how often it runs, and
every topic a subscription may name is a row. A job or a topic added without its row
(or a row left for one removed) would send them to ``GET /api/v1/jobs`` or
``GET /api/v1/webhooks/topics`` to learn what the service does."""

import re
from pathlib import Path

from courier_api.scheduler import JOB_SPECS
from sync.outbox import TOPICS

README = Path(__file__).resolve().parents[2] / "README.md"
EVERY = {"5 min": 300, "15 min": 900, "30 min": 1800, "daily": 86400}


def section(title: str, until: str) -> str:
    text = README.read_text(encoding="utf-8")
    return text[text.index(title) : text.index(until)]


def test_every_scheduled_job_is_a_row_with_how_often_it_runs() -> None:
    rows = re.findall(
        r"^\| `(\w+)` \| ([^|]+) \|",
        section("## Scheduled jobs", "## Webhooks (integrations)"),
        re.M,
    )
    documented = {name: EVERY.get(every.strip(), every.strip()) for name, every in rows}
    assert documented == {name: spec.interval_seconds for name, spec in JOB_SPECS.items()}


def test_every_webhook_topic_is_a_row() -> None:
    first_cells = re.findall(
        r"^\| (`[\w.]+`(?:, `[\w.]+`)*) \|",
        section("## Webhooks (integrations)", "Admins subscribe a URL to topics"),
        re.M,
    )
    documented = {topic for cell in first_cells for topic in re.findall(r"`([\w.]+)`", cell)}
    assert documented == set(TOPICS)
