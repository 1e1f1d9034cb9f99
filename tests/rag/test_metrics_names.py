"""The Grafana dashboard shipped with the service charts every metric the service exports."""

from __future__ import annotations

import json
from pathlib import Path

from rag import metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "control" / "grafana" / "rag_dashboard.json"


def test_every_metric_has_a_panel() -> None:
    exprs = " ".join(t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"])
    missing = [m.name for m in metrics.ALL if f"ray_{m.name}" not in exprs]
    assert not missing


def test_metric_names_are_prometheus_safe_and_unique() -> None:
    names = [m.name for m in metrics.ALL]
    assert len(names) == len(set(names))
    assert all(n.replace("_", "").isalnum() and n.startswith("rag_") for n in names)
    assert all(list(m.buckets) == sorted(m.buckets) for m in metrics.ALL)


def test_no_metric_uses_a_label_ray_serve_reserves() -> None:
    # ray.serve.metrics adds these itself and refuses a metric that declares one (the replica then fails).
    reserved = {"deployment", "replica", "application", "route"}
    assert not [(m.name, set(m.tags) & reserved) for m in metrics.ALL if set(m.tags) & reserved]
