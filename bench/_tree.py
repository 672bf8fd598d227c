"""Puts the root of the tree this script lives in first on ``sys.path`` (and on the
``PYTHONPATH`` its subprocesses inherit), so that a benchmark measures its own checkout.

Every script in ``bench/`` imports this module before any project module. Without it
``python /tmp/other/bench/x.py`` imported ``courier_api``, ``sync`` and ``models`` from
the shared virtualenv's editable install, which points at another checkout: the numbers
were another tree's, and nothing said so. Python puts the script's directory
(``bench/``) first on the path, so ``import _tree`` finds this file; the editable
install's finder comes after every ``sys.path`` entry, so the tree's root wins.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)


def _put_first(entries: list[str]) -> list[str]:
    """``entries`` with ROOT first and nowhere else (an empty entry, the working
    directory, is kept: it is not ROOT unless the script runs from there)."""
    return [ROOT, *(entry for entry in entries if Path(entry or ".").resolve() != Path(ROOT))]


sys.path[:] = _put_first(sys.path)
inherited = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
os.environ["PYTHONPATH"] = os.pathsep.join(_put_first(inherited))
