"""Reading what ``GET /metrics`` answers (Prometheus' text format), for the tests of an
app in-process (``test_metrics``) and of a server with several workers
(``test_operations_live``)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def value(text: str, sample: str, **labels: str) -> float:
    """The sample's value (0 when it has not appeared yet)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == sample and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    return 0.0
