"""Judging a rollout's evidence: the canary's live requests against the stable version's over one window
(errors, refusals, tail latency) and the shadow pairs (the candidate's answer to the same question as
the stable one: errors, sources, citations, answer similarity, latency). Each rule is a pure function
of numbers, unit-tested on numbers; the first rule that fails decides, and every verdict names its rule.

Missing evidence is never a pass: too few requests or pairs, or a measure that could not be taken, is
"wait", which the driver turns into hold or rollback once its patience is spent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from rag.config import RolloutConfig
from rag.quantiles import ttft_key


@dataclass(frozen=True)
class Verdict:
    action: Literal["continue", "rollback", "wait", "hold"]
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)
    rule: str = ""  # the rule that decided: "errors", "source_overlap", ... ("passed" when none failed)


Rule = Callable[[dict[str, Any], dict[str, Any] | None, RolloutConfig], Verdict | None]


def judge(canary: dict[str, Any], stable: dict[str, Any] | None, cfg: RolloutConfig) -> Verdict:
    """One traffic step: the canary's live requests and, while the shadow is on, its pairs. With sticky
    users a step may route no live request to the canary; the pairs alone are then enough evidence."""
    numbers = {"canary": canary, "stable": stable}
    shadow = canary.get("shadow") or {}
    live = canary.get("requests", 0) >= cfg.min_requests
    pairs = shadow.get("judged", 0) >= cfg.shadow.min_pairs
    if not live and not pairs:
        wanted = f"need {cfg.min_requests}" + (f" or {cfg.shadow.min_pairs} shadow pairs (have "
                                                f"{shadow.get('judged', 0)})" if shadow else "")
        return Verdict("wait", f"only {canary.get('requests', 0)} canary requests, {wanted}", numbers, "evidence")
    rules: list[Rule] = [combined_errors, refusals]
    if live:
        rules.append(live_latency)
    if pairs:
        rules += SHADOW_QUALITY
    return _first_failure(rules, canary, stable, cfg, numbers) or Verdict(
        "continue", _passed(canary, stable, shadow if pairs else {}, cfg), numbers, "passed")


def judge_shadow(canary: dict[str, Any], cfg: RolloutConfig) -> Verdict:
    """The shadow stage: only pairs, as no user is answered by the candidate yet."""
    shadow = canary.get("shadow") or {}
    numbers = {"shadow": shadow}
    if shadow.get("judged", 0) < cfg.shadow.min_pairs:
        dropped = shadow.get("dropped") or {}
        return Verdict("wait", f"{shadow.get('judged', 0)} shadow pairs judged, need {cfg.shadow.min_pairs}"
                               + (f" (copies dropped: {_counts(dropped)})" if dropped else ""), numbers, "evidence")
    rules: list[Rule] = [shadow_errors, *SHADOW_QUALITY]
    return _first_failure(rules, canary, None, cfg, numbers) or Verdict(
        "continue", _passed_shadow(shadow), numbers, "passed")


def _first_failure(rules: list[Rule], canary: dict[str, Any], stable: dict[str, Any] | None, cfg: RolloutConfig,
                   numbers: dict[str, Any]) -> Verdict | None:
    for rule in rules:
        verdict = rule(canary, stable, cfg)
        if verdict:
            return Verdict(verdict.action, verdict.reason, numbers, verdict.rule)
    return None


def knowledge_bases_served(new: set[str], stable: set[str]) -> Verdict:
    """Before any copy or user: a candidate must answer from every knowledge base the stable version
    does (one it lacks would 404 for its users once promoted, though no question in the rollout asked it)."""
    numbers = {"candidate": sorted(new), "stable": sorted(stable)}
    if missing := sorted(stable - new):
        return Verdict("rollback", f"the candidate does not serve knowledge bases {missing} that the stable version "
                                   f"serves", numbers, "knowledge_bases")
    return Verdict("continue", f"the candidate serves every knowledge base the stable version serves "
                               f"({', '.join(sorted(stable)) or 'none'})", numbers, "knowledge_bases")


def judge_golden(results: dict[str, dict[str, dict[str, Any]]], cfg: RolloutConfig) -> Verdict:
    """Per knowledge base, the candidate's golden-set scores against the stable version's, on the same
    questions at the same moment: recall@5 and the citation rate may each fall by at most their margin."""
    numbers = {"golden": results}
    checks = (("recall@5", cfg.quality.max_recall_drop, "golden_recall"),
              ("citation_rate", cfg.quality.max_citation_drop, "golden_citation"))
    for kb, sides in sorted(results.items()):
        candidate, stable = sides["candidate"], sides["stable"]
        for measure, margin, rule in checks:
            c_value, s_value = candidate.get(measure), stable.get(measure)
            if c_value is None or s_value is None:
                return Verdict("wait", f"golden set of {kb}: {measure} not measured", numbers, rule)
            if s_value - c_value > margin:
                return Verdict("rollback", f"golden set of {kb} ({candidate.get('items')} questions): candidate "
                                           f"{measure} {c_value:.3f} is {s_value - c_value:.3f} below stable "
                                           f"{s_value:.3f} (rollout.quality margin {margin})", numbers, rule)
    summary = "; ".join(f"{kb}: " + ", ".join(f"{m} {s['candidate'][m]:.3f} (stable {s['stable'][m]:.3f})"
                                              for m in ("recall@5", "citation_rate"))
                        for kb, s in sorted(results.items()))
    return Verdict("continue", f"golden sets: {summary}", numbers, "passed")


# -- live rules ----------------------------------------------------------------------------------
def combined_errors(canary: dict[str, Any], stable: dict[str, Any] | None, cfg: RolloutConfig) -> Verdict | None:
    """The canary's failures, live and in shadow pairs, against the stable version's live error rate."""
    shadow = canary.get("shadow") or {}
    failures = canary.get("errors", 0) + shadow.get("candidate_errors", 0)
    samples = canary.get("requests", 0) - sum((canary.get("refused") or {}).values()) + shadow.get("judged", 0)
    rate = failures / samples if samples else 0.0
    baseline = stable["error_rate"] if stable and stable.get("requests") else 0.0
    if rate - baseline > cfg.max_error_rate_increase:
        return Verdict("rollback", f"canary error rate {rate:.3f} ({failures} of {samples}, live and shadow) is "
                                   f"{rate - baseline:.3f} above stable {baseline:.3f} (limit "
                                   f"{cfg.max_error_rate_increase})", rule="errors")
    return None


def refusals(canary: dict[str, Any], stable: dict[str, Any] | None, cfg: RolloutConfig) -> Verdict | None:
    """A 4xx the canary gives more often than stable does for the same traffic is the canary's fault (a
    knowledge base it does not serve, a smaller limit); one both give alike is the clients'."""
    for status, count in sorted((canary.get("refused") or {}).items()):
        rate = count / canary["requests"]
        s_count = ((stable or {}).get("refused") or {}).get(status, 0)
        s_rate = s_count / stable["requests"] if stable and stable.get("requests") else 0.0
        if rate - s_rate > cfg.max_error_rate_increase:
            return Verdict("rollback", f"canary refused {count} of {canary['requests']} requests with {status} "
                                       f"({rate:.3f}), stable {s_rate:.3f} (limit {cfg.max_error_rate_increase})",
                           rule=f"refused_{status}")
    return None


def live_latency(canary: dict[str, Any], stable: dict[str, Any] | None, cfg: RolloutConfig) -> Verdict | None:
    q = tail_quantile(min(canary.get("ttft_samples", 0), (stable or {}).get("ttft_samples", 0)))
    return _slower(canary.get(ttft_key(q)), (stable or {}).get(ttft_key(q)), q, cfg, "canary", "latency")


# -- shadow rules --------------------------------------------------------------------------------
def shadow_errors(canary: dict[str, Any], _: dict[str, Any] | None, cfg: RolloutConfig) -> Verdict | None:
    """Copies the candidate failed (any status, 4xx included) of questions the stable version answered."""
    shadow = canary.get("shadow") or {}
    if shadow.get("error_rate", 0.0) > cfg.max_error_rate_increase:
        return Verdict("rollback", f"candidate error rate {shadow['error_rate']:.3f} in the shadow: it failed "
                                   f"{shadow['candidate_errors']} of {shadow['judged']} questions the stable version "
                                   f"answered ({_counts(shadow.get('errors_by_status') or {})}; limit "
                                   f"{cfg.max_error_rate_increase})", rule="shadow_errors")
    return None


def _at_least(measure: str, limit_name: str, what: str) -> Rule:
    def rule(canary: dict[str, Any], _: dict[str, Any] | None, cfg: RolloutConfig) -> Verdict | None:
        shadow = canary.get("shadow") or {}
        value, limit = shadow.get(measure), getattr(cfg.shadow, limit_name)
        if value is None:
            if measure == "cited_share":  # the stable answers cited nothing: nothing to compare
                return None
            return Verdict("wait", f"{what} was not measured on any pair", rule=measure)
        if value < limit:
            return Verdict("rollback", f"{what} {value:.3f} over {shadow.get(measure + '_samples', 0)} pairs is "
                                       f"below {limit} (rollout.shadow.{limit_name})", rule=measure)
        return None
    rule.__name__ = measure
    return rule


def shadow_latency(canary: dict[str, Any], _: dict[str, Any] | None, cfg: RolloutConfig) -> Verdict | None:
    """Median time to first token of the two answers of the same questions, at the same moments. The
    median, not a tail: a stage holds a few dozen copies, and a copy is started later than its user's
    request, on replicas that got nothing else, so one queued copy must not decide (the live steps judge
    the tail of real answers)."""
    shadow = canary.get("shadow") or {}
    return _slower(shadow.get("candidate_ttft_p50_s"), shadow.get("stable_ttft_p50_s"), 0.5, cfg,
                   "candidate (shadow)", "shadow_latency")


SHADOW_QUALITY: list[Rule] = [
    _at_least("source_overlap", "min_source_overlap", "source overlap with the stable answers"),
    _at_least("cited_share", "min_cited_share", "share of the stable answers' cited sources also cited"),
    _at_least("answer_similarity", "min_answer_similarity", "answer similarity to the stable answers"),
    shadow_latency,
]


# -- helpers -------------------------------------------------------------------------------------
def _slower(c_tail: float | None, s_tail: float | None, q: float, cfg: RolloutConfig, who: str,
            rule: str) -> Verdict | None:
    if c_tail is not None and s_tail and c_tail - s_tail > cfg.ttft_slack_s and c_tail > s_tail * cfg.max_ttft_ratio:
        return Verdict("rollback", f"{who} p{round(q * 100)} time to first token {c_tail:.3f}s is over "
                                   f"{cfg.max_ttft_ratio}x stable {s_tail:.3f}s", rule=rule)
    return None


def _passed(canary: dict[str, Any], stable: dict[str, Any] | None, shadow: dict[str, Any],
            cfg: RolloutConfig) -> str:
    baseline = stable["error_rate"] if stable and stable.get("requests") else 0.0
    q = tail_quantile(min(canary.get("ttft_samples", 0), (stable or {}).get("ttft_samples", 0)))
    live = (f"{canary.get('requests', 0)} canary requests, error rate {canary.get('error_rate', 0.0):.3f} "
            f"(stable {baseline:.3f}), p{round(q * 100)} TTFT {_seconds(canary.get(ttft_key(q)))} "
            f"(stable {_seconds((stable or {}).get(ttft_key(q)))})")
    return live + (f"; {_passed_shadow(shadow)}" if shadow else "") + _cold_note(canary, stable)


def _passed_shadow(shadow: dict[str, Any]) -> str:
    return (f"{shadow.get('judged', 0)} shadow pairs: candidate errors {shadow.get('candidate_errors', 0)}, "
            f"source overlap {_ratio(shadow.get('source_overlap'))}, cited share {_ratio(shadow.get('cited_share'))}, "
            f"answer similarity {_ratio(shadow.get('answer_similarity'))}, p50 TTFT "
            f"{_seconds(shadow.get('candidate_ttft_p50_s'))} (stable {_seconds(shadow.get('stable_ttft_p50_s'))})")


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


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}s"
