"""README.md's ``make`` lines are what a newcomer types first: each target it writes
is one the Makefile has, and each ``VAR=value`` it passes is a variable the Makefile
reads (a name it does not read is silently ignored: ``make run PORT=8123`` would still
serve on 8000)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAKE_LINE = re.compile(r"`make ([a-z][a-z-]*)((?: [A-Z_]+=[^ `]+)*)`?")


def makefile_reads() -> tuple[set[str], set[str]]:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    variables = set(re.findall(r"\$\(([A-Z_]+)\)", makefile))
    return targets, variables


def test_every_make_line_names_a_target_and_variables_the_makefile_reads() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = [(m.group(1), re.findall(r"([A-Z_]+)=", m.group(2))) for m in MAKE_LINE.finditer(text)]
    assert {"run", "test"} <= {target for target, _ in lines}  # the pattern finds them
    assert {"PORT", "PYTHON", "PYTEST_ARGS"} <= {v for _, names in lines for v in names}
    targets, variables = makefile_reads()
    assert sorted({target for target, _ in lines} - targets) == []
    assert sorted({v for _, names in lines for v in names} - variables) == []
