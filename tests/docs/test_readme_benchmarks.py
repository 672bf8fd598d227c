"""README.md's list of benchmarks is where a reader learns what can be measured: every
script in ``bench/`` is named there, and a script taking a measurement to make as its
first argument is written with each of them (``bench/scaling.py sizes|memory|shifts``).
The list left out ``bench/drop_bounds.py`` (what keeping drops' bounds costs a push) and
``scaling.py shifts`` (a push against a PDA's year of past shifts), whose figures
docs/BENCHMARKS.md reports."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BENCH = ROOT / "bench"


def benchmarks_paragraph() -> str:
    """The README's sentence listing the benchmark scripts, whitespace folded."""
    text = " ".join(README.read_text(encoding="utf-8").split())
    start = text.index("Benchmarks are scripts")
    return text[start : text.index("docs/BENCHMARKS.md", start)]


def measurements_of(script: Path) -> list[str]:
    """The choices of a script's first positional argument (none: an empty list)."""
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_argument"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and not str(node.args[0].value).startswith("-")
        ):
            for keyword in node.keywords:
                if keyword.arg == "choices":
                    return list(ast.literal_eval(keyword.value))
    return []


def test_the_pattern_finds_the_scripts() -> None:
    """The paragraph and the scripts are still where this test looks."""
    assert "bench/ingest.py" in benchmarks_paragraph()
    assert measurements_of(BENCH / "scaling.py")


def test_every_benchmark_script_is_named_with_its_measurements() -> None:
    paragraph = benchmarks_paragraph()
    unnamed = []
    for script in sorted(BENCH.glob("*.py")):
        if script.name.startswith("_"):  # a helper the scripts import (bench/_tree.py)
            continue
        name = f"bench/{script.name}"
        choices = measurements_of(script)
        written = re.search(rf"`(?:[^`\s]+ )?{re.escape(name)}( [\w|]+)?`", paragraph)
        if written is None:
            unnamed.append(name)
        elif choices and sorted(written.group(1).strip().split("|")) != sorted(choices):
            unnamed.append(f"{name} {'|'.join(choices)}")
    assert unnamed == [], "benchmarks README.md does not name"
