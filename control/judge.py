"""Judging one traffic step of a rollout: the canary's error rate and tail latency against the stable
version's over the same window. Pure, so each rule is unit-tested on numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rag.config import RolloutConfig
from rag.stats import ttft_key


@dataclass(frozen=True)
class Verdict:
    action: Literal["continue", "rollback", "wait", "hold"]
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)


def judge(canary: dict[str, Any], stable: dict[str, Any] | None, cfg: RolloutConfig) -> Verdict:
    """Compare the canary with the stable version over one observation window."""
    numbers = {"canary": canary, "stable": stable}
    if canary.get("requests", 0) < cfg.min_requests:
        return Verdict("wait", f"only {canary.get('requests', 0)} canary requests, need {cfg.min_requests}", numbers)
    baseline = stable["error_rate"] if stable and stable.get("requests") else 0.0
    increase = canary["error_rate"] - baseline
    if increase > cfg.max_error_rate_increase:
        return Verdict("rollback", f"canary error rate {canary['error_rate']:.3f} is {increase:.3f} above stable "
                                   f"{baseline:.3f} (limit {cfg.max_error_rate_increase})", numbers)
    q = tail_quantile(min(canary.get("ttft_samples", 0), (stable or {}).get("ttft_samples", 0)))
    name = f"p{round(q * 100)}"
    c_tail, s_tail = canary.get(ttft_key(q)), (stable or {}).get(ttft_key(q))
    if c_tail is not None and s_tail and c_tail - s_tail > cfg.ttft_slack_s and c_tail > s_tail * cfg.max_ttft_ratio:
        return Verdict("rollback", f"canary {name} time to first token {c_tail:.3f}s is over {cfg.max_ttft_ratio}x "
                                   f"stable {s_tail:.3f}s", numbers)
    return Verdict("continue", f"canary error rate {canary['error_rate']:.3f} (stable {baseline:.3f}), {name} TTFT "
                               f"{_seconds(c_tail)} (stable {_seconds(s_tail)}){_cold_note(canary, stable)}", numbers)


def _cold_note(canary: dict[str, Any], stable: dict[str, Any] | None) -> str:
    """Answers that waited for a cold start are judged for errors but left out of the latency."""
    cold = {"canary": canary.get("cold_starts", 0), "stable": (stable or {}).get("cold_starts", 0)}
    waited = ", ".join(f"{who} {n}" for who, n in cold.items() if n)
    return f"; answers that waited for a cold start, not counted as latency: {waited}" if waited else ""


def tail_quantile(samples: int) -> float:
    """The highest of p99, p90, p50 that `samples` observations estimate: p99 of 10 requests would be
    their maximum, so one slow request would decide the rollout."""
    if samples >= 100:
        return 0.99
    return 0.9 if samples >= 10 else 0.5


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}s"
