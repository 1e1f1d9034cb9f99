"""What importing every module of a package pulls in, checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import importlib, json, pkgutil, sys
package = importlib.import_module({package!r})
names = []
for info in pkgutil.walk_packages(package.__path__, {package!r} + "."):
    importlib.import_module(info.name)
    names.append(info.name)
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({forbidden!r}))
print(json.dumps({{"imported": names, "forbidden": loaded}}))
"""


def import_report(package: str, forbidden: list[str]) -> tuple[set[str], list[str]]:
    """(the modules of `package` imported, by name without the package; which of `forbidden` got loaded)
    after importing every module of `package` in a new interpreter."""
    report = _run_fresh(_SCRIPT.format(package=package, forbidden=forbidden))
    return {name.removeprefix(f"{package}.") for name in report["imported"]}, report["forbidden"]


def top_level_modules(package: str) -> set[str]:
    return {p.stem for p in (REPO_ROOT / package).glob("*.py") if p.stem != "__init__"}


def loaded_by(module: str, candidates: list[str]) -> list[str]:
    """Which of `candidates` (module names) importing `module` in a new interpreter loads."""
    script = (f"import importlib, json, sys; importlib.import_module({module!r}); "
              f"print(json.dumps(sorted(set({candidates!r}) & set(sys.modules))))")
    return _run_fresh(script)


def _run_fresh(script: str) -> Any:
    """The JSON a script prints last, run in a new interpreter from the repository's root."""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])
