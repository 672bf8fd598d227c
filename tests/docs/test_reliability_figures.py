"""RELIABILITY.md says how much of the API its security tests cover: how many of the
OpenAPI document's operations the conformance test plays, how many endpoints and
callers the authorization matrix declares, and how many kinds of corruption the
fuzzer draws. Each endpoint added grows the tests (they
fail on an endpoint without its row), not the figures: a reader was told 58 of 60
operations and 86 endpoints (1,290 cells) when the tests covered 63 of 65 and 92
(1,380). The figures are checked against the tests' own tables."""

import re
from pathlib import Path

from tests.courier_api import test_authorization_matrix as matrix
from tests.courier_api import test_openapi_conformance as conformance
from tests.courier_api.test_sync_fuzz import CORRUPTIONS

RELIABILITY = Path(__file__).resolve().parents[2] / "docs" / "RELIABILITY.md"


def row_of(test_file: str) -> str:
    """The security table's row naming ``test_file``."""
    rows = [
        line
        for line in RELIABILITY.read_text(encoding="utf-8").splitlines()
        if line.startswith("| ") and f"`{test_file}`" in line
    ]
    assert len(rows) == 1, rows
    return rows[0]


def number(text: str) -> int:
    return int(text.replace(",", ""))


def test_the_conformance_figures_are_the_tests() -> None:
    row = row_of("tests/courier_api/test_openapi_conformance.py")
    played, of = re.search(r"([\d,]+) of its ([\d,]+) operations", row).groups()  # type: ignore[union-attr]
    assert number(of) == len(conformance.OPERATIONS)
    assert number(played) == len(conformance.OPERATIONS) - len(conformance.WITHOUT_SUBJECTS)
    roles = re.search(r"as each of (\d+) roles", row).group(1)  # type: ignore[union-attr]
    assert number(roles) == len(conformance.CALLERS)


def test_the_authorization_matrix_figures_are_the_tests() -> None:
    row = row_of("tests/courier_api/test_authorization_matrix.py")
    endpoints, callers = re.search(  # type: ignore[union-attr]
        r"([\d,]+) endpoints read from the URL map × ([\d,]+) callers", row
    ).groups()
    cells = re.search(r"([\d,]+) cells", row).group(1)  # type: ignore[union-attr]
    assert number(endpoints) == len(matrix.MATRIX)
    assert number(callers) == len(matrix.CALLERS)
    assert number(cells) == len(matrix.MATRIX) * len(matrix.CALLERS)


def test_the_fuzzers_corruption_kinds_are_the_tests() -> None:
    row = row_of("tests/courier_api/test_sync_fuzz.py")
    kinds = re.search(r"for each of ([\d,]+) corruption kinds", row).group(1)  # type: ignore[union-attr]
    assert number(kinds) == len(CORRUPTIONS)
