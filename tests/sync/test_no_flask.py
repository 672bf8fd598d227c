"""The domain package must stay usable without the web framework."""

import pkgutil
import subprocess
import sys

import sync


def test_sync_never_imports_flask() -> None:
    modules = [f"sync.{m.name}" for m in pkgutil.walk_packages(sync.__path__)]
    assert modules, "no modules found under sync/"
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m == 'flask' or m.startswith('flask.')"
        " or m.startswith('flask_'))\n"
        "print(','.join(leaked))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"sync/ imports Flask: {result.stdout}"
