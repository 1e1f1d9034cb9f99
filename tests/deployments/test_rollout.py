"""Every path of the rollout driver against a fake cluster and a fake clock: preflight, start deadline,
fail-closed judging, automatic rollback, abort and resume in every state, the lock, atomic files."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deployments.rollout import Rollout, RolloutBusyError
from deployments.serve_document import ServeDocument
from rag.errors import InvalidRequestError

REPO = Path(__file__).resolve().parents[2]
FAST = {"steps": [50, 100], "interval_s": 5, "min_requests": 5, "max_wait_intervals": 2,
        "drain_timeout_s": 10, "start_timeout_s": 60}


def healthy(_: dict[str, float]) -> dict[str, Any]:
    numbers = {"requests": 40, "errors": 0, "error_rate": 0.0, "ttft_samples": 40, "ttft_p50_s": 0.1,
               "ttft_p90_s": 0.1, "ttft_p99_s": 0.1, "in_flight": 0}
    return {"v1": dict(numbers), "v2": dict(numbers)}


class FakeCluster:
    """Applies configs, starts new applications after `start_polls` serving checks, and reports stats that
    a test controls; `serving_stops_at` makes v2 stop serving after that many checks."""

    def __init__(self, free_cpu: float = 2.0, start_polls: int | None = 1,
                 stats: Callable[[dict[str, float]], dict[str, Any]] = healthy) -> None:
        self.free = {"node-a": {"CPU": free_cpu, "memory": 8e9}}
        self.applied: list[dict[str, Any]] = []
        self.apps: dict[str, dict[str, Any]] = {}
        self.polls: dict[str, int] = {}
        self.start_polls, self.stats_fn = start_polls, stats
        self.weights: dict[str, float] = {}
        self.fail_apply = False
        self.serving_checks = 0
        self.serving_stops_at: int | None = None
        self.on_serving: Callable[[], None] | None = None

    def deploy(self, config: dict[str, Any]) -> None:
        self.apply(config)
        self.polls = {name: 10**6 for name in self.apps}

    def apply(self, config: dict[str, Any]) -> None:
        if self.fail_apply:
            raise RuntimeError("applying the Serve config failed (500)")
        self.applied.append(config)
        self.apps = {a["name"]: {"status": "RUNNING", "deployments": {
            d["name"]: {"status": "HEALTHY", "message": ""} for d in a.get("deployments") or []}}
            for a in config["applications"]}
        gateway = next(a for a in config["applications"] if a["name"] == "gateway")
        self.weights = gateway["deployments"][0]["user_config"]["weights"]

    def applications(self) -> dict[str, Any]:
        return self.apps

    def free_resources(self) -> dict[str, dict[str, float]]:
        return self.free

    def serving(self) -> set[str]:
        self.serving_checks += 1
        if self.on_serving:
            self.on_serving()
        serving = set()
        for name in self.apps:
            if name == "gateway":
                continue
            self.polls[name] = self.polls.get(name, 0) + 1
            started = self.start_polls is not None and self.polls[name] > self.start_polls
            stopped = name == "v2" and self.serving_stops_at is not None and \
                self.serving_checks >= self.serving_stops_at
            if started and not stopped:
                serving.add(name)
        return serving

    def stats(self, window_s: float | None) -> dict[str, Any]:
        return self.stats_fn(self.weights)


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the driver may catch it."""


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def config(tmp_path: Path) -> Path:
    # v1 follows `samples: latest`, which a rollout pins to the index published now: give it one, so the
    # test does not depend on a var/kb left by `make demo`.
    (tmp_path / "kb" / "samples" / "v1").mkdir(parents=True)
    (tmp_path / "kb" / "samples" / "v1" / "manifest.json").write_text("{}")
    path = tmp_path / "serve_config.yaml"
    ServeDocument.load(REPO / "serve_config.yaml").variant(gateway_args={"rollout": FAST},
                                                           kb_root=tmp_path / "kb").save(path)
    return path


def make(config: Path, cluster: FakeCluster, log: list[str] | None = None) -> Rollout:
    clock = Clock()
    cluster.deploy(ServeDocument.load(config).plain())
    return Rollout(config, cluster, say=(log if log is not None else []).append, sleep=clock.sleep, clock=clock)


def start_v2(rollout: Rollout) -> str:
    return rollout.start("v2", "v1", {"generation.max_new_tokens": 128})


def assert_as_before(config: Path, before: str, cluster: FakeCluster) -> None:
    assert config.read_text() == before
    assert cluster.applied[-1] == ServeDocument.load(config).plain()
    assert sorted(cluster.apps) == ["gateway", "v1"] and cluster.weights == {"v1": 100}


def test_a_healthy_canary_is_promoted_step_by_step(config: Path) -> None:
    cluster = FakeCluster()
    rollout = make(config, cluster)
    assert start_v2(rollout) == "promoted"
    weights = [c["applications"][0]["deployments"][0]["user_config"]["weights"] for c in cluster.applied[1:]]
    assert weights == [{"v1": 100, "v2": 0}, {"v1": 50, "v2": 50}, {"v1": 0, "v2": 100},
                       {"v1": 0, "v2": 100}, {"v2": 100}]
    doc = ServeDocument.load(config)
    assert list(doc.versions) == ["v2"] and doc.weights == {"v2": 100.0}
    assert "# The one place where versions" in config.read_text()
    state = rollout.load_state()
    assert state and state.status == "promoted" and [h["action"] for h in state.history] == ["continue"] * 2


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
    doc = ServeDocument.load(config)
    per_version = sum(d["ray_actor_options"]["num_cpus"] for d in doc.plain()["applications"][1]["deployments"])
    largest = max(d["ray_actor_options"]["num_cpus"] for d in doc.plain()["applications"][1]["deployments"])
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
    assert status == "held" and cluster.weights == {"v1": 50, "v2": 50}
    assert ServeDocument.load(config).weights == {"v1": 50.0, "v2": 50.0}
    with pytest.raises(InvalidRequestError, match="held"):
        start_v2(rollout)  # a held rollout must be resumed or aborted, not started over
    assert rollout.abort() == "aborted"
    assert_as_before(config, before, cluster)


def test_too_few_canary_answers_roll_back(config: Path) -> None:
    def quiet(weights: dict[str, float]) -> dict[str, Any]:
        stats = healthy(weights)
        stats["v2"].update(requests=2, ttft_samples=2)
        return stats

    before = config.read_text()
    cluster = FakeCluster(stats=quiet)
    rollout = make(config, cluster)
    assert start_v2(rollout) == "rolled_back"
    state = rollout.load_state()
    assert state and "only 2 canary requests" in state.reason and "rather than promote" in state.reason
    assert_as_before(config, before, cluster)


# Serving checks: 1 (not yet) and 2 (serving) while it starts, 3 and 4 at the two steps, 5 at promotion.
@pytest.mark.parametrize(("gone_at", "reason"), [(4, "stopped serving"), (5, "not serving at promotion")])
def test_a_canary_that_stops_serving_is_rolled_back_not_promoted(config: Path, gone_at: int, reason: str) -> None:
    before = config.read_text()
    cluster = FakeCluster()
    rollout = make(config, cluster)
    cluster.serving_stops_at = gone_at
    assert start_v2(rollout) == "rolled_back"
    state = rollout.load_state()
    assert state and reason in state.reason
    assert_as_before(config, before, cluster)


def test_a_failing_canary_is_rolled_back(config: Path) -> None:
    def failing(weights: dict[str, float]) -> dict[str, Any]:
        stats = healthy(weights)
        stats["v2"].update(errors=10, error_rate=0.25)
        return stats

    before = config.read_text()
    cluster = FakeCluster(stats=failing)
    rollout = make(config, cluster)
    assert start_v2(rollout) == "rolled_back"
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


def test_an_interrupted_start_can_be_aborted_or_resumed(config: Path) -> None:
    before = config.read_text()
    cluster = FakeCluster(start_polls=3)
    rollout = make(config, cluster)

    def killed() -> None:
        raise Killed  # a killed process: no rollback ran

    cluster.on_serving = killed
    with pytest.raises(Killed):
        start_v2(rollout)
    state = rollout.load_state()
    assert state and state.status == "running" and state.phase == "starting"
    assert "v2" in cluster.apps  # stranded, for now
    cluster.on_serving = None
    status = rollout.status()
    assert status["rollout"]["status"] == "running" and status["agree"]

    cluster.on_serving = None
    assert rollout.start("v2", resume=True) == "promoted"

    ServeDocument.from_text(before).save(config)
    cluster.deploy(ServeDocument.load(config).plain())
    rollout.state_path.unlink()
    cluster.on_serving = killed
    with pytest.raises(Killed):
        start_v2(rollout)
    cluster.on_serving = None
    assert rollout.abort() == "aborted"
    assert_as_before(config, before, cluster)
    with pytest.raises(InvalidRequestError, match="no rollout is in progress"):
        rollout.abort()
    with pytest.raises(InvalidRequestError, match="no interrupted or held rollout"):
        rollout.start("v2", resume=True)
    assert start_v2(rollout) == "promoted"  # and a fresh start works afterwards


def test_ctrl_c_during_a_step_rolls_back(config: Path) -> None:
    before = config.read_text()
    cluster = FakeCluster()
    rollout = make(config, cluster)

    def ctrl_c() -> None:
        if cluster.weights.get("v2") == 50:
            cluster.on_serving = None
            raise KeyboardInterrupt

    cluster.on_serving = ctrl_c
    assert start_v2(rollout) == "aborted"
    state = rollout.load_state()
    assert state and state.reason == "interrupted"
    assert_as_before(config, before, cluster)


def test_two_concurrent_starts_the_second_is_refused(config: Path) -> None:
    cluster = FakeCluster()
    first = make(config, cluster)
    second = Rollout(config, cluster, say=lambda _: None)
    inside, release = threading.Event(), threading.Event()

    def block() -> None:
        inside.set()
        release.wait(10)

    cluster.on_serving = block
    runner = threading.Thread(target=start_v2, args=(first,))
    runner.start()
    try:
        assert inside.wait(10)
        with pytest.raises(RolloutBusyError, match="another rollout command is running"):
            second.start("v3", "v1")
    finally:
        cluster.on_serving = None
        release.set()
        runner.join(10)
    assert first.load_state().status == "promoted"  # type: ignore[union-attr]


def test_abort_from_another_process_rolls_back_the_running_rollout(config: Path) -> None:
    before = config.read_text()
    cluster = FakeCluster()
    driver = make(config, cluster)
    operator = Rollout(config, cluster, say=lambda _: None, sleep=lambda _: time.sleep(0.01))
    at_step, go = threading.Event(), threading.Event()
    results: dict[str, str] = {}

    def pause_at_first_step() -> None:
        if cluster.weights.get("v2") == 50 and not go.is_set():
            at_step.set()
            go.wait(10)

    cluster.on_serving = pause_at_first_step
    runner = threading.Thread(target=lambda: results.update(driver=start_v2(driver)))
    aborter = threading.Thread(target=lambda: results.update(operator=operator.abort(wait_s=30)))
    runner.start()
    try:
        assert at_step.wait(10)
        aborter.start()  # the driver holds the lock, so abort asks it and waits for the outcome
        for _ in range(500):
            if operator.abort_path.exists():
                break
            time.sleep(0.01)
        assert operator.abort_path.exists()
    finally:
        go.set()
        runner.join(10)
        if aborter.is_alive() or aborter.ident:
            aborter.join(10)
    assert results == {"driver": "aborted", "operator": "aborted"}
    assert_as_before(config, before, cluster)
    assert not driver.abort_path.exists()


def test_status_reports_file_and_cluster_and_whether_they_agree(config: Path) -> None:
    cluster = FakeCluster()
    rollout = make(config, cluster)
    status = rollout.status()
    assert status["agree"] and status["file"]["weights"] == {"v1": 100.0} and status["rollout"] is None
    cluster.apps["v9"] = {"status": "DEPLOYING"}
    assert not rollout.status()["agree"]
