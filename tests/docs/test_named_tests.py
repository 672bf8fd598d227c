"""The documents name the tests that cover what they claim (SECURITY.md's threats,
RELIABILITY.md's faults): every test they name must exist, or the claim has no cover.

They name a test either whole (``tests/x.py::test_name``) or, in RELIABILITY.md's
tables, by a file and words of its tests' names (``tests/x.py`` (``reported_lost``),
what ``pytest -k`` takes): each such word must still pick a test of that file (a
renamed test left ``refused_at_sign_in``, ``either_way`` and ``too_deep`` naming none)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = ("README.md", "SECURITY.md", "docs/RELIABILITY.md", "docs/BENCHMARKS.md")
NAMED = re.compile(r"`(tests/[\w/]+\.py)::(\w+)")
CITED_BY_WORDS = re.compile(r"`(tests/[\w/]+\.py)` \(([^()]*)\)")
TEST_FUNCTION = re.compile(r"^\s*(?:async\s+)?def (test_\w+)\(", re.M)


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


def words_citing_tests(document: str) -> list[tuple[str, str]]:
    """``(path, word)`` for each backticked word in the parenthesis after a test file."""
    text = (ROOT / document).read_text(encoding="utf-8")
    return sorted(
        {
            (path, word)
            for path, inner in CITED_BY_WORDS.findall(text)
            for word in re.findall(r"`(\w+)`", inner)
        }
    )


def test_the_documents_cite_tests_by_words_of_their_names() -> None:
    """The pattern still finds what it is for (else the test below checks nothing)."""
    assert len(words_citing_tests("docs/RELIABILITY.md")) > 15


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_word_citing_tests_picks_a_test_of_its_file(document: str) -> None:
    picking_none = []
    for path, word in words_citing_tests(document):
        file = ROOT / path
        names = TEST_FUNCTION.findall(file.read_text()) if file.is_file() else []
        if not any(word in name for name in names):
            picking_none.append(f"{path} ({word})")
    assert picking_none == [], f"{document} cites tests by words that pick none"
