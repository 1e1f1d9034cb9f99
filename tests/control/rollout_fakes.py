"""A fake cluster and clock for the rollout driver's tests, and the helpers they share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from control.document import ServeDocument
from control.rollout import Rollout

REPO = Path(__file__).resolve().parents[2]
FAST = {"steps": [50, 100], "interval_s": 5, "min_requests": 5, "max_wait_intervals": 2,
        "drain_timeout_s": 10, "start_timeout_s": 60}


# What the gateways report for a candidate that answers like the stable version.
GOOD_SHADOW = {"pairs": 30, "judged": 30, "candidate_errors": 0, "error_rate": 0.0, "errors_by_status": {},
               "stable_failed": 0, "dropped": {}, "source_overlap": 1.0, "source_overlap_samples": 30,
               "cited_share": 1.0, "cited_share_samples": 30, "answer_similarity": 0.99,
               "answer_similarity_samples": 30, "length_ratio": 1.0, "length_ratio_samples": 30,
               "candidate_ttft_samples": 30, "stable_ttft_samples": 30,
               **{f"{side}_ttft_p{q}_s": 0.1 for side in ("candidate", "stable") for q in (50, 90, 99)}}


def healthy(_: dict[str, float]) -> dict[str, Any]:
    numbers = {"requests": 40, "errors": 0, "error_rate": 0.0, "ttft_samples": 40, "ttft_p50_s": 0.1,
               "ttft_p90_s": 0.1, "ttft_p99_s": 0.1, "in_flight": 0}
    return {"v1": dict(numbers), "v2": dict(numbers)}


class FakeCluster:
    """Applies configs, starts new applications after `start_polls` serving checks, and reports stats that
    a test controls; `serving_stops_at` makes v2 stop serving after that many checks."""

    def __init__(self, free_cpu: float = 2.0, start_polls: int | None = 1,
                 stats: Callable[[dict[str, float]], dict[str, Any]] = healthy) -> None:
        self.cold_polls = 0
        total = max(2.0, free_cpu)
        self.usage = {"node-a": {"CPU": [total - free_cpu, total], "memory": [0.0, 8e9]}}
        self.applied: list[dict[str, Any]] = []
        self.apps: dict[str, dict[str, Any]] = {}
        self.polls: dict[str, int] = {}
        self.start_polls, self.stats_fn = start_polls, stats
        self.weights: dict[str, float] = {}
        self.shadow: str | None = None  # the version the gateway copies answered questions to
        self.shadow_summary: dict[str, Any] | None = dict(GOOD_SHADOW)  # what its pairs add up to
        self.golden: dict[str, dict[str, Any]] = {}  # per version, its golden-set scores (default: GOOD_GOLDEN)
        self.evaluated: list[tuple[str, str, int]] = []  # (version, kb, questions)
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
        self.shadow = gateway["deployments"][0]["user_config"].get("shadow")

    def applications(self) -> dict[str, Any]:
        return self.apps

    def resource_usage(self) -> dict[str, dict[str, list[float]]]:
        return self.usage

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

    def scaled_to_zero(self) -> dict[str, list[str]]:
        if self.cold_polls:  # the version's stages are at zero for this many more checks, then woken
            self.cold_polls -= 1
            return {"v2": ["Generator"]}
        return {}

    def stats(self, window_s: float | None) -> dict[str, Any]:
        stats = self.stats_fn(self.weights)
        if self.shadow and self.shadow_summary is not None and self.shadow in stats:
            stats[self.shadow] = {"shadow": self.shadow_summary, **stats[self.shadow]}
        return stats


    def evaluate(self, version: str, kb: str, items: list[Any]) -> dict[str, Any]:
        self.evaluated.append((version, kb, len(items)))
        return {"knowledge_base": kb, "version": version, **self.golden.get(version, GOOD_GOLDEN)}


GOOD_GOLDEN = {"items": 4, "errors": 0, "recall@1": 0.75, "recall@3": 1.0, "recall@5": 1.0, "mrr": 0.875,
               "citation_rate": 1.0, "words_rate": None, "words_items": 0}


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the driver may catch it."""


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def __call__(self) -> float:
        return self.now




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
