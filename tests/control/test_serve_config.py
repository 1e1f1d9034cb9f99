"""Whole-config checks of autoscaling: what Serve would refuse and what would break this service's promises."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from control.document import load_serve_config
from control.serve_config import autoscaling_problems, check_serve_config
from rag.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _deployment(config: dict, app: str, name: str) -> dict:
    found = next(a for a in config["applications"] if a["name"] == app)
    return next(d for d in found["deployments"] if d["name"] == name)


@pytest.fixture
def shipped() -> dict:
    return copy.deepcopy(load_serve_config(REPO / "serve_config.yaml"))


def test_the_shipped_config_autoscales_every_stage_and_passes(shipped: dict) -> None:
    for stage in ("Pipeline", "Embedder", "Retriever", "Generator"):
        auto = _deployment(shipped, "v1", stage)["autoscaling_config"]
        assert auto["min_replicas"] >= 1 and auto["max_replicas"] > auto["min_replicas"], stage
    assert _deployment(shipped, "gateway", "Gateway")["autoscaling_config"]["max_replicas"] > 1
    check_serve_config(shipped)


def test_a_version_may_scale_to_zero(shipped: dict) -> None:
    for stage in ("Pipeline", "Embedder", "Retriever", "Generator"):
        _deployment(shipped, "v1", stage)["autoscaling_config"]["min_replicas"] = 0
    assert autoscaling_problems(shipped) == []


@pytest.mark.parametrize(("app", "name", "change", "expected"), [
    ("v1", "Generator", {"num_replicas": 2}, "sets both num_replicas (2) and autoscaling_config"),
    ("v1", "Embedder", {"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}, "must be at least 1 and"),
    ("v1", "Embedder", {"autoscaling_config": {"min_replicas": 0, "max_replicas": 0}}, "must be at least 1 and"),
    ("gateway", "Gateway", {"autoscaling_config": {"min_replicas": 0, "max_replicas": 2}},
     "min_replicas must be at least 1"),
    ("gateway", "KnowledgeBases", {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2}},
     "exactly one replica"),
])
def test_autoscaling_that_would_break_a_promise_is_refused_naming_it(shipped: dict, app: str, name: str,
                                                                      change: dict, expected: str) -> None:
    deployment = _deployment(shipped, app, name)
    if "autoscaling_config" in change:
        deployment.pop("num_replicas", None)
    deployment.update(change)
    with pytest.raises(ConfigError, match=re.escape(expected)) as refused:
        check_serve_config(shipped)
    assert name in str(refused.value)
