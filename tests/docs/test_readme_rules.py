"""README.md is what a newcomer has: the files it points to must be in the repository,
and the rules the documents cite by number ("rule 6", "DESIGN.md rule 3") must be
listed in it. It sent readers to ``shared/DESIGN.md``, a file the repository does not
hold, for the seven rules every document and docstring cites."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCUMENTS = [README, ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]
# "rule 6", "Rule 6" opening a sentence, "rules 1 and 2", "rules 3, 4 or 5", "DESIGN.md
# rule 3", "DESIGN.md 3", a citation wrapped at its space; one digit (not "the rules 143 ms")
RULE_CITED = re.compile(
    r"\b(?:DESIGN\.md\s+)?rules?\s+(\d\b(?:(?:,\s*|,?\s+(?:and|or)\s+)\d\b)*)|\bDESIGN\.md\s+(\d)\b",
    re.IGNORECASE,
)
FILE_NAMED = re.compile(r"`([\w.-]+(?:/[\w.-]+)+\.(?:md|py|json|sh|png|toml|txt))`")


def listed_rules() -> dict[int, str]:
    section = re.search(r"\n## Rules\n(.*?)\n## ", README.read_text(encoding="utf-8"), re.S)
    assert section, "README has no Rules section"
    return {
        int(number): name
        for number, name in re.findall(r"^(\d+)\. \*\*(.+?)\*\*", section.group(1), re.M)
    }


def cited_rules(text: str) -> set[int]:
    """The rules ``text`` cites by number."""
    return {
        int(number)
        for found in RULE_CITED.finditer(text)
        for numbers in found.groups()
        if numbers
        for number in re.findall(r"\d", numbers)
    }


def test_every_way_a_document_cites_a_rule_is_found() -> None:
    """A citation the pattern misses is not checked: "Rule 6" opening a sentence (twice
    in BENCHMARKS) and the second of "DESIGN.md rules 1 and 2" (RELIABILITY) were not."""
    text = (
        "Rule 8 compares; (DESIGN.md rules 1 and 2); rules 3, 4 or 5; see the\nrule 6;"
        " DESIGN.md 7; the rules 143 ms per push; a rule of thumb"
    )
    assert cited_rules(text) == {1, 2, 3, 4, 5, 6, 7, 8}


def test_the_readme_lists_the_seven_rules_in_order() -> None:
    rules = listed_rules()
    assert list(rules) == list(range(1, 8))
    assert rules[4] == "Unauthorized unattended drop." and rules[6].startswith("Clock skew")


def test_every_rule_a_document_cites_is_listed() -> None:
    rules = listed_rules()
    cited = {
        (document.name, number)
        for document in DOCUMENTS
        for number in cited_rules(document.read_text(encoding="utf-8"))
    }
    assert {number for _, number in cited} >= {1, 3, 6}  # the pattern finds citations
    assert [(name, number) for name, number in sorted(cited) if number not in rules] == []


def test_every_file_the_readme_names_is_in_the_repository() -> None:
    named = set(FILE_NAMED.findall(README.read_text(encoding="utf-8")))
    assert {"openapi/openapi.json", "docs/BENCHMARKS.md"} <= named  # the pattern finds them
    assert sorted(path for path in named if not (ROOT / path).exists()) == []
