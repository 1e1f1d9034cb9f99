"""Removing the applications: the gateway first, so its knowledge-base manager can finish a job in its
drain while the pipelines' Embedders still serve it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from control import cluster
from control.document import ServeDocument

REPO = Path(__file__).resolve().parents[2]


def test_the_gateway_application_is_removed_before_the_pipelines(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    doc = ServeDocument.load(REPO / "serve_config.yaml")
    doc.add_version("v2", "v1", {"version": "v2"})
    doc.save(tmp_path / "serve_config.yaml")
    running: dict[str, Any] = {name: {} for name in ("gateway", "v1", "v2")}
    applied: list[list[str]] = []

    def apply(config: dict[str, Any], dashboard: str) -> None:
        applied.append([app["name"] for app in config["applications"]])
        for name in set(running) - set(applied[-1]):
            del running[name]

    monkeypatch.setattr(cluster, "apply", apply)
    monkeypatch.setattr(cluster, "_safe_apps", lambda dashboard=None: dict(running))
    cluster.remove_all_apps(tmp_path / "serve_config.yaml", timeout_s=5)
    assert applied == [["v1", "v2"], []] and running == {}
