"""The library imports no serving framework: every `rag` module loads without Ray, FastAPI or Starlette."""

from __future__ import annotations

from tests.support.imports import import_report, top_level_modules


def test_rag_imports_no_serving_framework() -> None:
    imported, forbidden = import_report("rag", ["ray", "fastapi", "starlette"])
    assert imported >= top_level_modules("rag")
    assert forbidden == []
