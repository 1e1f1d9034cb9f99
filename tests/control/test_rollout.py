"""The rollout driver against a fake cluster and a fake clock: preflight, the start deadline, fail-closed
judging, automatic rollback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from control.document import ServeDocument
from control.preflight import deployment_replicas
from rag.config import ConfigError
from rag.errors import InvalidRequestError
from rag.golden import check_items, write_items
from tests.control.rollout_fakes import (
    FAST,
    GOOD_GOLDEN,
    FakeCluster,
    assert_as_before,
    healthy,
    make,
    start_v2,
)


def test_a_healthy_canary_is_promoted_step_by_step(config: Path) -> None:
    cluster = FakeCluster()
    rollout = make(config, cluster)
    assert start_v2(rollout) == "promoted"
    traffic = [c["applications"][0]["deployments"][0]["user_config"] for c in cluster.applied[1:]]
    assert [t["weights"] for t in traffic] == [{"v1": 100, "v2": 0}, {"v1": 100, "v2": 0}, {"v1": 50, "v2": 50},
                                               {"v1": 0, "v2": 100}, {"v1": 0, "v2": 100}, {"v2": 100}]
    # No copies before the shadow stage; copies through the steps; none once promoted.
    assert [t.get("shadow") for t in traffic] == [None, "v2", "v2", "v2", None, None]
    doc = ServeDocument.load(config)
    assert list(doc.versions) == ["v2"] and doc.weights == {"v2": 100.0} and doc.shadow is None
    assert "# The one place where versions" in config.read_text()
    state = rollout.load_state()
    assert state and state.status == "promoted" and [h["action"] for h in state.history] == ["continue"] * 3
    assert [(h["step"], h["rule"]) for h in state.history] == [("shadow", "passed"), (0, "passed"), (1, "passed")]
    assert "30 shadow pairs" in state.history[0]["reason"] and state.history[0]["numbers"]["shadow"]["judged"] == 30


def test_a_version_that_does_not_fit_is_refused_before_anything_changes(config: Path) -> None:
    cluster = FakeCluster(free_cpu=1.0)  # v1 and the gateway hold the rest of the 2 CPUs
    rollout = make(config, cluster)
    before, applied = config.read_text(), len(cluster.applied)
    big = {"ray_actor_options": {"num_cpus": 0.8}}
    doc = ServeDocument.load(config).variant(deployment_options={"Embedder": big, "Generator": big})
    doc.save(config)
    before = config.read_text()
    with pytest.raises(InvalidRequestError, match="does not fit") as refused:
        start_v2(rollout)
    message = str(refused.value)
    assert "Embedder" in message and "num_cpus=" in message and "nothing was changed" in message
    assert len(cluster.applied) == applied and config.read_text() == before
    assert rollout.load_state() is None


def test_preflight_keeps_room_for_a_replacement_surge(config: Path) -> None:
    v1 = deployment_replicas(ServeDocument.load(config).plain()["applications"][1])
    per_version = sum(r.count * r.each["CPU"] for r in v1)
    largest = max(r.surge * r.each["CPU"] for r in v1)  # the largest replacement's surge
    before = config.read_text()
    assert start_v2(make(config, FakeCluster(free_cpu=per_version + largest))) == "promoted"
    config.write_text(before)
    Path(str(config) + ".rollout.json").unlink()
    with pytest.raises(InvalidRequestError, match="no room remains for replacing"):
        start_v2(make(config, FakeCluster(free_cpu=per_version + largest / 2)))


def test_dry_run_plans_and_preflights_without_changing_anything(config: Path) -> None:
    cluster, log = FakeCluster(), []
    rollout = make(config, cluster, log)
    rollout.dry_run = True
    before = config.read_text()
    assert start_v2(rollout) == "dry_run"
    assert len(cluster.applied) == 1 and config.read_text() == before and rollout.load_state() is None
    assert any("fits=true" in line for line in log) and any("name: v2" in line for line in log)


def test_a_version_that_never_starts_is_rolled_back_at_its_deadline_with_serves_message(config: Path) -> None:
    cluster = FakeCluster(start_polls=None)
    before = config.read_text()
    rollout = make(config, cluster)

    def stuck() -> None:
        if "v2" in cluster.apps:
            cluster.apps["v2"]["status"] = "DEPLOYING"
            cluster.apps["v2"]["deployments"]["Generator"] = {
                "status": "UPDATING", "message": "Deployment 'Generator' has 1 replicas that have taken more than "
                                                 "30s to be scheduled: resources {CPU: 0.5}"}
    cluster.on_serving = stuck
    assert start_v2(rollout) == "rolled_back"
    state = rollout.load_state()
    assert state and "not serving after 60s" in state.reason and "taken more than 30s to be scheduled" in state.reason
    assert_as_before(config, before, cluster)


@pytest.mark.parametrize("hold", [False, True])
def test_unreadable_stats_never_promote(config: Path, hold: bool) -> None:
    def unreadable(_: dict[str, float]) -> dict[str, Any]:
        raise RuntimeError("/stats answered 503")

    if hold:
        doc = ServeDocument.load(config).variant(gateway_args={"rollout": {**FAST, "on_inconclusive": "hold"}})
        doc.save(config)
    before = config.read_text()
    cluster = FakeCluster(stats=unreadable)
    rollout = make(config, cluster)
    status = start_v2(rollout)
    state = rollout.load_state()
    assert state and "stats unreadable" in state.reason
    if not hold:
        assert status == "rolled_back"
        assert_as_before(config, before, cluster)
        return
    # Held in the shadow stage, which could not be judged either: no user was ever sent to v2.
    assert status == "held" and cluster.weights == {"v1": 100, "v2": 0} and cluster.shadow == "v2"
    assert ServeDocument.load(config).weights == {"v1": 100.0, "v2": 0.0}
    with pytest.raises(InvalidRequestError, match="held"):
        start_v2(rollout)  # a held rollout must be resumed or aborted, not started over
    assert rollout.abort() == "aborted"
    assert_as_before(config, before, cluster)


@pytest.mark.parametrize(("canary", "reason"), [
    ({"requests": 2, "ttft_samples": 2}, "only 2 canary requests"),  # too few to judge: not promoted
    ({"errors": 10, "error_rate": 0.25}, "error rate"),
])
def test_a_canary_too_quiet_or_failing_is_rolled_back(config: Path, canary: dict[str, Any], reason: str) -> None:
    def stats(weights: dict[str, float]) -> dict[str, Any]:
        numbers = healthy(weights)
        numbers["v2"].update(canary)
        return numbers

    before = config.read_text()
    cluster = FakeCluster(stats=stats)
    rollout = make(config, cluster)
    # Live requests only (no shadow copies): pairs would be evidence enough for a quiet canary.
    assert rollout.start("v2", "v1", {"generation.max_new_tokens": 128}, shadow=False) == "rolled_back"
    state = rollout.load_state()
    assert state and reason in state.reason and "promoted" not in state.reason
    assert_as_before(config, before, cluster)
    assert all(c["applications"][0]["deployments"][0]["user_config"].get("shadow") is None for c in cluster.applied)


def test_with_sticky_users_no_live_request_reaches_the_canary_and_the_pairs_decide(config: Path) -> None:
    def sticky(weights: dict[str, float]) -> dict[str, Any]:
        numbers = healthy(weights)
        if weights.get("v1"):  # every user hashed to v1 while it has any weight
            numbers["v2"].update(requests=0, ttft_samples=0, ttft_p50_s=None, ttft_p90_s=None, ttft_p99_s=None)
        return numbers

    rollout = make(config, FakeCluster(stats=sticky))
    assert start_v2(rollout) == "promoted"
    state = rollout.load_state()
    reason = state.history[1]["reason"] if state else ""
    assert "0 canary requests" in reason and "30 shadow pairs" in reason


def test_without_pairs_a_quiet_step_is_still_never_promoted(config: Path) -> None:
    cluster = FakeCluster(stats=lambda w: {**healthy(w), "v2": {**healthy(w)["v2"], "requests": 1}})
    rollout = make(config, cluster)
    cluster.shadow_summary = {**cluster.shadow_summary, "judged": 3} if cluster.shadow_summary else None
    assert start_v2(rollout) == "rolled_back"
    state = rollout.load_state()
    assert state and "3 shadow pairs judged, need 20" in state.reason and "no shadow judgement" in state.reason


# Serving checks: 1 (not yet) and 2 (serving) while it starts, 3 in the shadow stage, 4 and 5 at the two
# steps, 6 at promotion.
@pytest.mark.parametrize(("gone_at", "reason"), [(3, "stopped serving"), (5, "stopped serving"),
                                                 (6, "not serving at promotion")])
def test_a_canary_that_stops_serving_is_rolled_back_not_promoted(config: Path, gone_at: int, reason: str) -> None:
    before = config.read_text()
    cluster = FakeCluster()
    rollout = make(config, cluster)
    cluster.serving_stops_at = gone_at
    assert start_v2(rollout) == "rolled_back"
    state = rollout.load_state()
    assert state and reason in state.reason
    assert_as_before(config, before, cluster)


def test_a_cluster_that_refuses_a_step_rolls_back_and_the_file_never_shows_the_refused_step(config: Path) -> None:
    before = config.read_text()
    cluster = FakeCluster()
    rollout = make(config, cluster)
    original_apply = cluster.apply
    calls = {"n": 0}

    def flaky(cfg: dict[str, Any]) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the first traffic step
            raise RuntimeError("applying the Serve config failed (500)")
        original_apply(cfg)

    cluster.apply = flaky  # type: ignore[method-assign]
    assert start_v2(rollout) == "rolled_back"
    state = rollout.load_state()
    assert state and "failed (500)" in state.reason
    assert_as_before(config, before, cluster)


def test_a_canary_at_zero_replicas_is_judged_only_after_it_was_woken(config: Path) -> None:
    cluster, log = FakeCluster(), []
    cluster.cold_polls = 3  # routable but cold: a stage at zero replicas until the gateway's wake-up lands
    rollout = make(config, cluster, log)
    assert start_v2(rollout) == "promoted"
    assert cluster.cold_polls == 0
    serving = next(i for i, line in enumerate(log) if "ROLLOUT_SERVING" in line)
    assert not any("ROLLOUT_CHECK" in line for line in log[:serving])


def test_a_candidate_that_answers_differently_is_rolled_back_in_the_shadow_stage_before_any_user_sees_it(
        config: Path) -> None:
    before = config.read_text()
    cluster = FakeCluster()
    cluster.shadow_summary = {**(cluster.shadow_summary or {}), "source_overlap": 0.5}
    rollout = make(config, cluster)
    log: list[str] = []
    rollout.say = log.append
    assert start_v2(rollout) == "rolled_back"
    assert all(c["applications"][0]["deployments"][0]["user_config"]["weights"].get("v2", 0) == 0
               for c in cluster.applied)
    state = rollout.load_state()
    assert state and state.history[-1]["step"] == "shadow" and state.history[-1]["rule"] == "source_overlap"
    assert "source overlap with the stable answers 0.500" in state.reason
    assert any("event=ROLLOUT_SHADOW_CHECK" in line and 'rule="source_overlap"' in line for line in log)
    assert_as_before(config, before, cluster)


def test_no_shadow_skips_the_stage_and_the_copies(config: Path) -> None:
    cluster = FakeCluster()
    rollout = make(config, cluster)
    assert rollout.start("v2", "v1", {"generation.max_new_tokens": 128}, shadow=False) == "promoted"
    assert all(c["applications"][0]["deployments"][0]["user_config"].get("shadow") is None for c in cluster.applied)
    state = rollout.load_state()
    assert state and [h["step"] for h in state.history] == [0, 1]


def _kbs(config: dict[str, Any], version: str) -> dict[str, Any]:
    app = next(a for a in config["applications"] if a["name"] == version)
    return dict(app["args"]["retrieval"]["knowledge_bases"])


@pytest.mark.parametrize("pinned_by", ["rollout", "operator"])
def test_after_promotion_the_new_version_follows_latest_where_the_stable_one_did(config: Path, pinned_by: str) -> None:
    cluster = FakeCluster()
    rollout = make(config, cluster)
    settings = {"retrieval.knowledge_bases": {"samples": 1}} if pinned_by == "operator" else {}
    assert rollout.start("v2", "v1", settings) == "promoted"
    assert _kbs(cluster.applied[1], "v2") == {"samples": 1}  # compared like with like while it ran
    assert _kbs(cluster.applied[-1], "v2") == {"samples": "latest"}
    assert ServeDocument.load(config).versions["v2"]["args"]["retrieval"]["knowledge_bases"] == {"samples": "latest"}


def test_a_candidate_serving_one_knowledge_base_fewer_is_rolled_back_before_any_copy_or_user(config: Path) -> None:
    kb_root = config.parent / "kb"
    (kb_root / "manuals" / "v1").mkdir(parents=True)
    (kb_root / "manuals" / "v1" / "manifest.json").write_text("{}")
    doc = ServeDocument.load(config)
    doc.versions["v1"]["args"]["retrieval"]["knowledge_bases"] = {"samples": "latest", "manuals": "latest"}
    doc.save(config)
    before = config.read_text()
    cluster = FakeCluster()
    rollout = make(config, cluster)
    # v1 discovers every KB under kb_root as well; v2 serves only what it lists.
    only_samples = {"retrieval.knowledge_bases": {"samples": "latest"}, "retrieval.discover": False}
    assert rollout.start("v2", "v1", only_samples) == "rolled_back"
    state = rollout.load_state()
    assert state and state.history[-1]["rule"] == "knowledge_bases" and "['manuals']" in state.reason
    assert all(c["applications"][0]["deployments"][0]["user_config"].get("shadow") is None
               and c["applications"][0]["deployments"][0]["user_config"]["weights"].get("v2", 0) == 0
               for c in cluster.applied)
    assert_as_before(config, before, cluster)


def _golden_set(config: Path) -> None:
    write_items(config.parent / "kb", "samples", check_items([
        {"question": "How do I stop the service?", "files": ["operations.md"]},
        {"question": "Which formats can I ingest?", "files": ["ingesting.md"], "words": ["PDF"]}]))


def test_golden_sets_run_on_both_versions_at_start_and_before_promotion(config: Path) -> None:
    _golden_set(config)
    cluster = FakeCluster()
    rollout = make(config, cluster)
    assert start_v2(rollout) == "promoted"
    assert cluster.evaluated == [("v2", "samples", 2), ("v1", "samples", 2)] * 2
    state = rollout.load_state()
    stages = [h["step"] for h in state.history] if state else []
    assert stages == ["golden (start)", "shadow", 0, 1, "golden (before promotion)"]
    assert "recall@5 1.000 (stable 1.000)" in state.history[0]["reason"] if state else False


@pytest.mark.parametrize("measure", ["recall@5", "citation_rate"])
def test_a_candidate_worse_on_the_golden_set_is_rolled_back_before_any_copy(config: Path, measure: str) -> None:
    _golden_set(config)
    before = config.read_text()
    cluster = FakeCluster()
    cluster.golden["v2"] = {**GOOD_GOLDEN, measure: 0.5}
    rollout = make(config, cluster)
    assert start_v2(rollout) == "rolled_back"
    state = rollout.load_state()
    assert state and state.history[-1]["step"] == "golden (start)"
    assert f"candidate {measure} 0.500 is 0.500 below stable 1.000" in state.reason
    assert all(c["applications"][0]["deployments"][0]["user_config"].get("shadow") is None for c in cluster.applied)
    assert_as_before(config, before, cluster)


def test_a_golden_set_that_cannot_be_run_is_no_pass(config: Path) -> None:
    _golden_set(config)
    cluster = FakeCluster()

    def broken(version: str, kb: str, items: list[Any]) -> dict[str, Any]:
        raise RuntimeError("reading the gateway failed")
    cluster.evaluate = broken  # type: ignore[method-assign]
    rollout = make(config, cluster)
    assert start_v2(rollout) == "rolled_back"
    state = rollout.load_state()
    assert state and "golden sets could not be run" in state.reason and state.history[-1]["rule"] == "golden"


def test_a_slow_dashboard_while_the_new_version_starts_is_waited_out_not_a_rollback(config: Path) -> None:
    cluster = FakeCluster(start_polls=3)
    real = cluster.applications
    slow = {"left": 2}

    def flaky() -> dict[str, Any]:
        if "v2" in cluster.apps and slow["left"]:  # while v2 starts (preflight, before any change, may fail)
            slow["left"] -= 1
            raise TimeoutError("ReadTimeout: timed out")
        return real()
    cluster.applications = flaky  # type: ignore[method-assign]
    rollout = make(config, cluster)
    assert start_v2(rollout) == "promoted"


def _slower_canary(_: dict[str, float]) -> dict[str, Any]:
    numbers = healthy(_)
    numbers["v2"].update(ttft_p50_s=0.6, ttft_p90_s=0.8, ttft_p99_s=0.9)  # a language model after extractive
    return numbers


def test_a_rollouts_own_judge_settings_let_a_slower_backend_through_and_bad_ones_change_nothing(
        config: Path) -> None:
    before = config.read_text()
    strict = make(config, FakeCluster(stats=_slower_canary))
    assert strict.start("v2", "v1", {"generation.max_new_tokens": 128}, shadow=False) == "rolled_back"
    assert (state := strict.load_state()) and state.history[-1]["rule"].startswith("latency")
    config.write_text(before)
    Path(str(config) + ".rollout.json").unlink()
    cluster = FakeCluster(stats=_slower_canary)
    loose = make(config, cluster)
    assert loose.start("v2", "v1", {"generation.max_new_tokens": 128}, shadow=False,
                       judge={"ttft_slack_s": 2.0}) == "promoted"
    assert (state := loose.load_state()) and state.judge == {"ttft_slack_s": 2.0}
    assert "ttft_slack_s" not in config.read_text()  # this rollout's, not the gateway's settings
    config.write_text(before)
    Path(str(config) + ".rollout.json").unlink()
    with pytest.raises(ConfigError, match="ttft_slack_s"):
        make(config, FakeCluster()).start("v2", "v1", {"generation.max_new_tokens": 128}, judge={"ttft_slack_s": -1})
    assert config.read_text() == before
