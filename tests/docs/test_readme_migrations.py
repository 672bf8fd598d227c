"""README.md's note on upgrading a PostgreSQL database in place names each migration an
operator has to know of: one that builds its indexes CONCURRENTLY (a failed build
stops the upgrade after what came before it was committed: run it again), and one
after which ``courier-api rejudge`` has to run (it changes what the rules read, and
judges no parcel itself: until the rejudge, flags raised under the old data stand).
An operator reading the README before upgrading a big database learnt of neither for
the migrations of 9 December (``c4e8a1f6d273`` ... ``e7a3c5d1f9b4``)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VERSIONS = ROOT / "models" / "migrations" / "versions"
REVISION = re.compile(r'^revision: str = "(\w+)"', re.M)


def upgrading_note() -> str:
    """The README's paragraph on ``db upgrade`` against PostgreSQL, whitespace folded."""
    text = README.read_text()
    start = text.index("`db upgrade` runs each\nmigration in a transaction of its own")
    end = text.index("\n\n", start)
    return " ".join(text[start:end].split())


def migrations() -> list[tuple[str, str]]:
    """``(revision, source)`` of every migration."""
    found = []
    for path in sorted(VERSIONS.glob("*.py")):
        source = path.read_text()
        match = REVISION.search(source)
        assert match, path
        found.append((match.group(1), source))
    return found


@pytest.mark.parametrize(
    "revision",
    [r for r, source in migrations() if "postgresql_concurrently=True" in source],
)
def test_each_migration_building_concurrently_is_named(revision: str) -> None:
    assert f"`{revision}`" in upgrading_note()


@pytest.mark.parametrize(
    "revision",
    [r for r, source in migrations() if "``courier-api rejudge``" in source],
)
def test_each_migration_to_rejudge_after_is_named_with_the_rejudge(revision: str) -> None:
    note = upgrading_note()
    sentences = [s for s in re.split(r"(?<=\.)\s(?=[A-Z`])", note) if f"`{revision}`" in s]
    assert any("courier-api rejudge" in s for s in sentences), sentences
