"""The library imports no serving framework: every `rag` module loads without Ray, FastAPI or Starlette."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import importlib, json, pkgutil, sys
import rag
names = ["rag"]
for info in pkgutil.walk_packages(rag.__path__, "rag."):
    importlib.import_module(info.name)
    names.append(info.name)
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"ray", "fastapi", "starlette"})
print(json.dumps({"imported": names, "forbidden": loaded}))
"""


def test_rag_imports_no_serving_framework() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    expected_files = {p.stem for p in (REPO_ROOT / "rag").glob("*.py") if p.stem != "__init__"}
    assert {name.removeprefix("rag.") for name in report["imported"][1:]} >= expected_files
    assert report["forbidden"] == []
