"""Readiness decisions from Serve application states (no cluster needed)."""

from __future__ import annotations

from deployments.readiness import assess

STAGES = {"Pipeline": 1, "Embedder": 1, "Retriever": 1, "Generator": 1}


def test_ready_when_every_stage_of_every_live_version_runs() -> None:
    state = assess(["v1"], {"v1": ("RUNNING", STAGES), "gateway": ("RUNNING", {"Gateway": 1})})
    assert state.ready and state.serving == {"v1", "gateway"} and not state.waiting_for


def test_starting_lists_what_it_waits_for() -> None:
    state = assess(["v1", "v2"], {"v1": ("RUNNING", STAGES), "v2": ("DEPLOYING", {**STAGES, "Generator": 0})})
    assert not state.ready and state.waiting_for == ["v2/Generator"] and state.serving == {"v1"}
    assert assess(["v3"], {}).waiting_for == ["v3 (not_started)"]


def test_rolling_update_keeps_serving() -> None:
    # Old replicas still RUNNING while new ones start.
    assert assess(["v1"], {"v1": ("DEPLOYING", STAGES)}).ready


def test_rebuild_after_args_change_keeps_serving_only_what_served_before() -> None:
    rebuilding = {"v1": ("DEPLOYING", {})}
    assert assess(["v1"], rebuilding, previously_serving={"v1"}).ready
    assert not assess(["v1"], rebuilding).ready


def test_a_failed_or_deleting_version_is_not_serving() -> None:
    for status in ("DEPLOY_FAILED", "DELETING"):
        assert not assess(["v1"], {"v1": (status, STAGES)}, previously_serving={"v1"}).ready
