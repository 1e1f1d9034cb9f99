"""Step verdicts: the canary's error rate and tail latency against the stable version's."""

from __future__ import annotations

import pytest

from control.judge import judge, tail_quantile
from rag.config import RolloutConfig


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


def test_cold_starts_are_reported_apart_from_the_canarys_latency() -> None:
    canary = {**_stats(50, 0, 0.12), "cold_starts": 3}
    verdict = judge(canary, _stats(500, 1, 0.1), CFG)
    assert verdict.action == "continue"
    assert "answers that waited for a cold start, not counted as latency: canary 3" in verdict.reason
    assert "cold start" not in judge(_stats(50, 0, 0.12), _stats(500, 1, 0.1), CFG).reason
