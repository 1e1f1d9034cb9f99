"""Step verdicts: the canary's error rate and tail latency against the stable version's."""

from __future__ import annotations

import pytest

from control.judge import judge, judge_golden, judge_shadow, tail_quantile
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


# -- refusals and shadow pairs ----------------------------------------------------------------------
def _shadow(judged: int = 30, errors: int = 0, overlap: float | None = 1.0, cited: float | None = 1.0,
            similarity: float | None = 0.98, c_p50: float = 0.1, s_p50: float = 0.1, **status: int) -> dict:
    return {"pairs": judged, "judged": judged, "candidate_errors": errors, "error_rate": errors / judged,
            "errors_by_status": status, "dropped": {}, "source_overlap": overlap, "source_overlap_samples": judged,
            "cited_share": cited, "cited_share_samples": judged, "answer_similarity": similarity,
            "answer_similarity_samples": judged, "candidate_ttft_samples": judged, "stable_ttft_samples": judged,
            **{f"candidate_ttft_p{q}_s": c_p50 for q in (50, 90, 99)},
            **{f"stable_ttft_p{q}_s": s_p50 for q in (50, 90, 99)}}


def test_a_canary_refusing_what_stable_answers_is_rolled_back_but_refusals_both_give_are_not() -> None:
    canary = {**_stats(50), "refused": {"404": 10}}
    verdict = judge(canary, _stats(500), CFG)
    assert verdict.action == "rollback" and verdict.rule == "refused_404" and "10 of 50" in verdict.reason
    both = judge({**_stats(50), "refused": {"400": 5}}, {**_stats(500), "refused": {"400": 50}}, CFG)
    assert both.action == "continue"


def test_with_no_live_canary_requests_enough_pairs_judge_the_step() -> None:
    quiet = {**_stats(0), "shadow": _shadow()}
    assert judge(quiet, _stats(500), CFG).action == "continue"
    assert judge({**_stats(0), "shadow": _shadow(judged=5)}, _stats(500), CFG).action == "wait"
    bad = judge({**_stats(0), "shadow": _shadow(overlap=0.4)}, _stats(500), CFG)
    assert bad.action == "rollback" and bad.rule == "source_overlap" and "0.400" in bad.reason


def test_live_and_shadow_errors_are_judged_together() -> None:
    # 1 of 9 live answers failed and 3 of 30 copies: 4 of 39, over the limit, though neither alone is judged.
    canary = {**_stats(9, 1), "shadow": _shadow(errors=3, **{"500": 3})}
    verdict = judge(canary, _stats(500), CFG)
    assert verdict.action == "rollback" and verdict.rule == "errors" and "4 of 39" in verdict.reason


@pytest.mark.parametrize(("shadow", "rule"), [
    (_shadow(errors=3, **{"404": 3}), "shadow_errors"),  # a knowledge base the candidate does not serve
    (_shadow(overlap=0.55), "source_overlap"),  # an index lacking half the files
    (_shadow(cited=0.5), "cited_share"),
    (_shadow(similarity=0.6), "answer_similarity"),  # a bad prompt or a broken generator
    (_shadow(c_p50=1.5), "shadow_latency"),
])
def test_the_shadow_stage_rolls_back_on_the_first_failing_rule_and_names_it(shadow: dict, rule: str) -> None:
    verdict = judge_shadow({"shadow": shadow}, CFG)
    assert verdict.action == "rollback" and verdict.rule == rule and verdict.numbers["shadow"] is shadow


def test_the_shadow_stage_never_passes_on_missing_evidence() -> None:
    assert judge_shadow({}, CFG).action == "wait"
    few = judge_shadow({"shadow": {**_shadow(judged=4), "dropped": {"rate": 7}}}, CFG)
    assert few.action == "wait" and "4 shadow pairs judged, need 20" in few.reason and "rate 7" in few.reason
    unmeasured = judge_shadow({"shadow": _shadow(similarity=None)}, CFG)
    assert unmeasured.action == "wait" and unmeasured.rule == "answer_similarity"
    uncited = judge_shadow({"shadow": _shadow(cited=None)}, CFG)  # stable answers cite nothing: not a rule
    assert uncited.action == "continue" and uncited.rule == "passed" and "30 shadow pairs" in uncited.reason


def _golden(recall: float = 1.0, cited: float | None = 1.0) -> dict:
    return {"items": 10, "recall@5": recall, "citation_rate": cited}


def test_golden_sets_allow_a_margin_and_roll_back_beyond_it_per_knowledge_base() -> None:
    same = {"samples": {"candidate": _golden(0.97), "stable": _golden(1.0)}}
    assert judge_golden(same, CFG).action == "continue"
    worse = {"samples": {"candidate": _golden(), "stable": _golden()},
             "manuals": {"candidate": _golden(0.8), "stable": _golden(0.9)}}
    verdict = judge_golden(worse, CFG)
    assert verdict.action == "rollback" and verdict.rule == "golden_recall"
    assert "golden set of manuals" in verdict.reason
    assert judge_golden({"samples": {"candidate": _golden(cited=None), "stable": _golden()}}, CFG).action == "wait"
