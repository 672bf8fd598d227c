"""A benchmark measures the tree it lives in. The scripts in ``bench/`` imported
``courier_api``, ``sync`` and ``models`` before their own tree was on ``sys.path``, so
``python /tmp/other/bench/push_instructions.py`` without ``PYTHONPATH`` took them from
the shared virtualenv's editable install (another checkout) and timed that code.

Each script is imported here as ``python bench/<script>.py`` would run it (its own
directory first on the path, no ``PYTHONPATH``) from a copy of the tree, and the
project's packages must come from the copy. Also run against the tree itself, the
copy catches an editable install pointing at this very tree, which would pass."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))

REPORT_WHERE_FROM = """
import importlib, sys
sys.path.insert(0, sys.argv[1])
importlib.import_module(sys.argv[2])
import courier_api, models, sync, os
print(repr(os.environ.get("PYTHONPATH", "")))
for package in (courier_api, models, sync):
    print(package.__file__)
"""


@pytest.fixture(scope="module")
def copied_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("other") / "tree"
    ignored = shutil.ignore_patterns(".git", ".venv", "instance", "__pycache__", "*.sqlite*")
    for part in ("bench", "courier_api", "models", "sync", "tests"):
        shutil.copytree(ROOT / part, copy / part, ignore=ignored)
    return copy


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bench_script_imports_the_code_of_its_own_tree(copied_tree: Path, script: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", REPORT_WHERE_FROM, str(copied_tree / "bench"), script],
        capture_output=True,
        text=True,
        env=env,
        cwd=copied_tree.parent,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    inherited, *files = done.stdout.splitlines()
    tree = copied_tree.resolve()
    assert [Path(f).resolve().is_relative_to(tree) for f in files] == [True] * 3, files
    # A server or CLI the script starts (bench/load.py) runs the same tree.
    assert inherited.strip("'").split(os.pathsep)[0] == str(tree)
