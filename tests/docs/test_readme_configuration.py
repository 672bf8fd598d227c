"""README.md's configuration table is what an operator sets: every variable the service
reads is there, each number with the default the service takes and the largest value
it accepts. An operator setting ``SHIFT_PLANNED_HOURS=36`` for a two-day shift, or
``PROOF_RETENTION_DAYS=50000``, read no bound in the table and the service refused to
start ("must be at most 24")."""

import ast
import re
from pathlib import Path
from typing import Any

import pytest

from courier_api.config import load_config

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CONFIG = ROOT / "courier_api" / "config.py"
AT_MOST = re.compile(r"(?:at most|`\d+` to) `?([\d,]+)\b")


def documented() -> dict[str, tuple[str, str]]:
    """``{variable: (default cell, meaning cell)}`` of the Configuration table."""
    text = README.read_text(encoding="utf-8")
    table = text[text.index("## Configuration") : text.index("### Against PostgreSQL")]
    return {
        name: (default.strip(), meaning.strip())
        for name, default, meaning in re.findall(
            r"^\| `([A-Z_]+)` \|([^|]*)\|(.*)\|$", table, re.M
        )
    }


def constant(node: ast.expr) -> Any:
    """The value of a constant expression (``24 * 60``)."""
    return eval(compile(ast.Expression(node), "config.py", "eval"), {"__builtins__": {}})


def numbers_read() -> dict[str, dict[str, Any]]:
    """``{variable: {"key", "minimum", "maximum"}}`` of each ``_int(environ, ...)`` that
    ``load_config`` reads, with the config key it fills."""
    tree = ast.parse(CONFIG.read_text(encoding="utf-8"))
    read = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Dict):
            continue
        for key, value in zip(node.keys, node.values, strict=True):
            if (
                isinstance(key, ast.Constant)
                and isinstance(value, ast.Call)
                and isinstance(value.func, ast.Name)
                and value.func.id == "_int"
            ):
                bounds = {kw.arg: constant(kw.value) for kw in value.keywords}
                read[ast.literal_eval(value.args[1])] = {
                    "key": key.value,
                    "minimum": bounds.get("minimum", 1),
                    "maximum": bounds.get("maximum"),
                }
    return read


def variables_read() -> set[str]:
    source = CONFIG.read_text(encoding="utf-8")
    return set(re.findall(r'environ(?:\.get\(|\[|, )"([A-Z][A-Z_]+)"', source))


def test_the_patterns_find_what_they_are_for() -> None:
    assert {"MAX_EVENTS_PER_PUSH", "SHIFT_PLANNED_HOURS"} <= set(numbers_read())
    assert len(documented()) > 40


def test_every_variable_the_service_reads_is_documented() -> None:
    assert sorted(variables_read() - set(documented())) == []


@pytest.mark.parametrize("variable", sorted(numbers_read()))
def test_each_number_has_its_default_and_its_bounds(variable: str, tmp_path: Path) -> None:
    read = numbers_read()[variable]
    default_cell, meaning = documented()[variable]
    defaults = load_config({"JWT_SECRET": "x" * 32}, tmp_path)
    shown = re.search(r"`([\d,]+)`", default_cell)
    assert shown, default_cell
    assert int(shown.group(1).replace(",", "")) == defaults[read["key"]]
    stated = [int(n.replace(",", "")) for n in AT_MOST.findall(meaning)]
    if read["maximum"] is not None:
        assert stated == [read["maximum"]], f"{variable}: at most {read['maximum']}"
    else:
        assert stated == [], f"{variable} has no largest value"
    if read["minimum"] == 0:
        assert "`0`" in meaning or "`0`" in default_cell, f"{variable} may be 0"
