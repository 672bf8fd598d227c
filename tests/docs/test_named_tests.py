"""The documents name the tests that cover what they claim (SECURITY.md's threats,
RELIABILITY.md's faults): every test they name must exist, or the claim has no cover."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = ("README.md", "SECURITY.md", "docs/RELIABILITY.md", "docs/BENCHMARKS.md")
NAMED = re.compile(r"`(tests/[\w/]+\.py)::(\w+)")


def named_tests(document: str) -> list[tuple[str, str]]:
    return sorted(set(NAMED.findall((ROOT / document).read_text(encoding="utf-8"))))


def test_the_documents_name_tests() -> None:
    """The pattern still finds what it is for (else the test below checks nothing)."""
    assert len(named_tests("SECURITY.md")) > 20


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_test_a_document_names_exists(document: str) -> None:
    missing = [
        f"{path}::{name}"
        for path, name in named_tests(document)
        if not (ROOT / path).is_file()
        or not re.search(rf"^\s*(async\s+)?def {name}\(", (ROOT / path).read_text(), re.M)
    ]
    assert missing == [], f"{document} names tests that do not exist"
