"""The pure half of a rollout: config document edits and step verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from rag.config import ConfigError, RolloutConfig
from rag.errors import InvalidRequestError, KnowledgeBaseNotFoundError
from rag.rollout import ServeDocument, judge, tail_quantile

REPO = Path(__file__).resolve().parents[2]


def test_round_trip_keeps_the_file_byte_for_byte() -> None:
    for name in ("serve_config.yaml", "serve_config.gpu.yaml"):
        text = (REPO / name).read_text(encoding="utf-8")
        assert ServeDocument.load(REPO / name).dump() == text


def test_add_version_clones_stable_with_overrides_and_keeps_comments(tmp_path: Path) -> None:
    doc = ServeDocument.load(REPO / "serve_config.yaml")
    doc.add_version("v2", "v1", {"version": "v2", "retrieval.knowledge_bases": {"samples": 2},
                                 "generation.max_new_tokens": 128})
    doc.set_weights({"v1": 90, "v2": 10})
    doc.check()
    doc.save(tmp_path / "c.yaml")
    again = ServeDocument.load(tmp_path / "c.yaml")
    v2 = again.plain()["applications"][-1]
    assert v2["name"] == "v2" and v2["route_prefix"] is None
    assert v2["args"]["retrieval"]["knowledge_bases"] == {"samples": 2}
    assert v2["args"]["generation"]["max_new_tokens"] == 128
    assert again.weights == {"v1": 90.0, "v2": 10.0}
    assert "# The one place where versions" in (tmp_path / "c.yaml").read_text()
    # the stable version is untouched
    assert again.plain()["applications"][1]["args"]["generation"]["max_new_tokens"] == 256


def _published(kb_root: Path, name: str, *versions: int) -> Path:
    for v in versions:
        (kb_root / name / f"v{v}").mkdir(parents=True)
        (kb_root / name / f"v{v}" / "manifest.json").write_text("{}")
    return kb_root


def test_pin_latest_fixes_a_new_version_to_the_index_published_now(tmp_path: Path) -> None:
    kb_root = _published(tmp_path, "samples", 1, 2)
    doc = ServeDocument.load(REPO / "serve_config.yaml")
    doc.add_version("v2", "v1", {"version": "v2", "retrieval.kb_root": str(kb_root),
                                 "retrieval.knowledge_bases": {"samples": "latest", "faq": 1}})
    assert doc.pin_latest("v2") == {"samples": 2}
    assert doc.plain()["applications"][-1]["args"]["retrieval"]["knowledge_bases"] == {"samples": 2, "faq": 1}
    assert doc.pin_latest("v2") == {}  # pinned already: nothing to do
    assert doc.plain()["applications"][1]["args"]["retrieval"]["knowledge_bases"] == {"samples": 1}  # v1 untouched
    doc.check()


def test_pin_latest_without_an_index_says_what_to_do(tmp_path: Path) -> None:
    doc = ServeDocument.load(REPO / "serve_config.yaml")
    doc.add_version("v2", "v1", {"version": "v2", "retrieval.kb_root": str(tmp_path),
                                 "retrieval.knowledge_bases": {"samples": "latest"}})
    with pytest.raises(KnowledgeBaseNotFoundError, match="ingest it first"):
        doc.pin_latest("v2")


def test_remove_version_drops_its_app_and_weight() -> None:
    doc = ServeDocument.load(REPO / "serve_config.yaml")
    doc.add_version("v2", "v1", {"version": "v2"})
    doc.set_weights({"v1": 0, "v2": 100})
    doc.remove_version("v1")
    assert list(doc.versions) == ["v2"] and doc.weights == {"v2": 100.0}
    doc.check()


def test_check_refuses_traffic_to_a_missing_version() -> None:
    doc = ServeDocument.load(REPO / "serve_config.yaml")
    doc.set_weights({"v1": 50, "v9": 50})
    with pytest.raises(ConfigError, match="v9"):
        doc.check()


def test_adding_an_existing_version_or_missing_stable_is_refused() -> None:
    doc = ServeDocument.load(REPO / "serve_config.yaml")
    with pytest.raises(InvalidRequestError, match="already"):
        doc.add_version("v1", "v1", {})
    doc.set_weights({"v1": 0})
    with pytest.raises(InvalidRequestError, match="no stable version"):
        doc.stable_version(excluding="v2")


def test_rollout_settings_live_in_the_gateway_args() -> None:
    cfg = ServeDocument.load(REPO / "serve_config.yaml").gateway.rollout
    assert cfg.steps[-1] == 100 and cfg.interval_s > 0


@pytest.mark.parametrize("steps", [[], [5, 50], [50, 25, 100], [0, 100]])
def test_steps_must_increase_to_100(steps: list[float]) -> None:
    with pytest.raises(ValueError, match="steps"):
        RolloutConfig(steps=steps)


CFG = RolloutConfig(min_requests=10, max_error_rate_increase=0.02, max_ttft_ratio=2.0, ttft_slack_s=0.05)


def _stats(requests: int, errors: int = 0, p99: float | None = 0.1, p90: float | None = None,
           p50: float | None = None) -> dict:
    return {"requests": requests, "errors": errors, "error_rate": errors / requests if requests else 0.0,
            "ttft_samples": requests - errors, "ttft_p99_s": p99, "ttft_p90_s": p90 or p99, "ttft_p50_s": p50 or p99}


def test_healthy_canary_continues() -> None:
    verdict = judge(_stats(50, 0, 0.12), _stats(500, 1, 0.1), CFG)
    assert verdict.action == "continue" and "error rate" in verdict.reason


def test_erroring_canary_rolls_back_with_numbers() -> None:
    verdict = judge(_stats(50, 10), _stats(500, 0), CFG)
    assert verdict.action == "rollback"
    assert "0.200" in verdict.reason and verdict.numbers["canary"]["errors"] == 10


def test_slow_canary_rolls_back_but_small_differences_do_not() -> None:
    assert judge(_stats(50, 0, 0.9), _stats(500, 0, 0.1), CFG).action == "rollback"
    assert judge(_stats(50, 0, 0.04), _stats(500, 0, 0.01), CFG).action == "continue"  # within slack


def test_latency_is_judged_at_the_tail_the_sample_count_supports() -> None:
    # 20 canary answers: their p99 is their slowest one, so p90 decides, and says so.
    one_slow = _stats(20, 0, p99=1.5, p90=0.12)
    verdict = judge(one_slow, _stats(500, 0, p99=0.3, p90=0.1), CFG)
    assert verdict.action == "continue" and "p90" in verdict.reason
    verdict = judge(_stats(20, 0, p99=1.5, p90=0.9), _stats(500, 0, p99=0.3, p90=0.1), CFG)
    assert verdict.action == "rollback" and "p90 time to first token 0.900s" in verdict.reason
    # With 100 samples on both sides p99 is measured, and decides.
    assert judge(_stats(100, 0, p99=1.5, p90=0.12), _stats(500, 0, p99=0.3, p90=0.1), CFG).action == "rollback"
    assert judge(_stats(5, 0, p99=1.5, p50=0.1), _stats(500, 0, p99=0.3, p50=0.1),
                 RolloutConfig(min_requests=5)).reason.count("p50") == 1


@pytest.mark.parametrize(("samples", "q"), [(0, 0.5), (9, 0.5), (10, 0.9), (99, 0.9), (100, 0.99), (5000, 0.99)])
def test_tail_quantile_needs_enough_samples(samples: int, q: float) -> None:
    assert tail_quantile(samples) == q


def test_too_few_canary_requests_waits() -> None:
    assert judge(_stats(3), _stats(500), CFG).action == "wait"


def test_canary_alone_is_judged_on_absolute_error_rate() -> None:
    assert judge(_stats(50, 0), None, CFG).action == "continue"
    assert judge(_stats(50, 5), {"requests": 0, "error_rate": 0.0}, CFG).action == "rollback"
