"""README.md's ``make`` lines are what a newcomer types first: each target it writes
is one the Makefile has, and each ``VAR=value`` it passes is a variable the Makefile
reads (a name it does not read is silently ignored: ``make run PORT=8123`` would still
serve on 8000); and ``make run PYTHON=...``, which README gives a newcomer whose python3
is too old, builds ``.venv`` with the interpreter it names."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


# A stand-in for an interpreter of a given version, as ``make install`` uses one: ``-c``
# runs code under that version, ``-m venv`` makes a virtualenv whose ``bin/python`` is
# that interpreter unless one is there already (as the venv module does: run over an
# existing virtualenv it leaves its interpreter), ``-m pip`` succeeds for 3.11+ and
# fails as pip does for older (pyproject.toml's requires-python).
FAKE_PYTHON = """#!{executable}
import os, shutil, sys
VERSION = {version!r}
args = sys.argv[1:]
if args[0] == "-c":
    sys.version_info = (*VERSION, "final", 0)
    sys.argv = ["-c", *args[2:]]
    exec(compile(args[1], "<string>", "exec"), {{"__name__": "__main__"}})
elif args[:2] == ["-m", "venv"]:
    target = args[-1]
    if "--clear" in args:
        shutil.rmtree(target, ignore_errors=True)
    os.makedirs(os.path.join(target, "bin"), exist_ok=True)
    interpreter = os.path.join(target, "bin", "python")
    if not os.path.lexists(interpreter):
        shutil.copy(__file__, interpreter)
elif args[:2] == ["-m", "pip"]:
    if VERSION < (3, 11):
        sys.exit("ERROR: Package requires a different Python: %d.%d.%d not in '>=3.11'" % VERSION)
else:
    sys.exit("unexpected: %r" % args)
"""


def fake_python(directory: Path, version: tuple[int, int, int]) -> Path:
    path = directory / f"python{version[0]}.{version[1]}"
    path.write_text(FAKE_PYTHON.format(executable=sys.executable, version=version))
    path.chmod(0o755)
    return path


def make_install(checkout: Path, python: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(checkout), "install", f"PYTHON={python}"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def venv_python_version(checkout: Path) -> str:
    return subprocess.run(
        [checkout / ".venv" / "bin" / "python", "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """The Makefile and the files its install target depends on, in a directory of
    their own."""
    root = tmp_path / "checkout"
    root.mkdir()
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, root / name)
    return root


def test_make_run_with_an_older_python3_then_naming_one_builds_the_venv_with_it(
    checkout: Path, tmp_path: Path
) -> None:
    """README: ``make run PYTHON=python3.12`` when python3 is older than 3.11. The
    newcomer's first ``make run`` with a 3.10 python3 built ``.venv`` with it before pip
    refused the package; ``make run PYTHON=python3.12`` then ran the venv module over
    that ``.venv``, which keeps the interpreter it finds, and pip refused again, with
    the same words. An older interpreter now builds no ``.venv`` and is named as the
    reason."""
    old = make_install(checkout, fake_python(tmp_path, (3, 10, 13)))
    assert old.returncode != 0
    assert "PYTHON=" in old.stderr and "3.11" in old.stderr
    assert not (checkout / ".venv").exists()

    new = make_install(checkout, fake_python(tmp_path, (3, 12, 1)))
    assert new.returncode == 0, new.stderr
    assert venv_python_version(checkout) == "(3, 12)"


def test_a_venv_an_older_python_left_is_built_again_with_the_one_named(
    checkout: Path, tmp_path: Path
) -> None:
    """A ``.venv`` of a 3.10 interpreter (left by a ``make run`` before its interpreter
    was checked) is built again with the one ``PYTHON`` names, not kept under it."""
    subprocess.run(
        [fake_python(tmp_path, (3, 10, 13)), "-m", "venv", checkout / ".venv"], check=True
    )
    assert venv_python_version(checkout) == "(3, 10)"

    new = make_install(checkout, fake_python(tmp_path, (3, 12, 1)))
    assert new.returncode == 0, new.stderr
    assert venv_python_version(checkout) == "(3, 12)"
