"""What a shadow pair measures, what a stage's pairs add up to, and which copies may start: on numbers."""

from __future__ import annotations

import pytest

from rag.config import ShadowConfig
from rag.records import Passage
from rag.shadow import (
    AnswerRecord,
    Dropped,
    MirrorGate,
    answer_record,
    cited_sources,
    compare,
    question_key,
    rank_biased_overlap,
    summarise,
    trivial_similarity,
)


def passages(*sources: str) -> list[Passage]:
    return [Passage(i, f"text {i}", s, 0.5) for i, s in enumerate(sources)]


def test_rank_biased_overlap_is_one_for_the_same_ranking_and_weighs_the_top() -> None:
    assert rank_biased_overlap(["a", "b", "c"], ["a", "b", "c"]) == pytest.approx(1.0)
    assert rank_biased_overlap([], []) == 1.0
    assert rank_biased_overlap(["a"], []) == 0.0
    assert rank_biased_overlap(["a", "b"], ["c", "d"]) == 0.0
    swapped_top = rank_biased_overlap(["a", "b", "c"], ["c", "b", "a"])
    lost_last = rank_biased_overlap(["a", "b", "c"], ["a", "b", "x"])
    assert 0 < swapped_top < lost_last < 1  # losing the first source costs more than losing the third


def test_citations_map_to_the_numbered_passages_files() -> None:
    found = passages("a.md", "b.md", "a.md")
    assert cited_sources("Upgrade step by step [1][3]. Drain first [2]. See [9].", found) == {"a.md", "b.md"}
    assert cited_sources("no markers", found) == frozenset()


def test_a_pair_of_equal_answers_scores_one_and_a_failed_candidate_scores_nothing() -> None:
    stable = answer_record("ok", 0.1, passages("a.md", "b.md"), "Drain first [1]. Then stop [2].")
    same = compare(stable, answer_record("ok", 0.2, passages("a.md", "b.md"), "Drain first [1]. Then stop [2]."), 1.0)
    assert (same.source_overlap, same.cited_share, same.length_ratio) == (pytest.approx(1.0), 1.0, 1.0)
    failed = compare(stable, AnswerRecord("404"), None)
    assert failed.candidate_status == "404" and failed.source_overlap is None and failed.cited_share == 0.0
    nothing_found = compare(stable, answer_record("ok", 0.1, [], "I don't know."), 0.2)
    assert nothing_found.source_overlap == 0.0 and nothing_found.cited_share == 0.0


def test_trivial_similarity_only_for_empty_answers() -> None:
    assert trivial_similarity("", " ") == 1.0 and trivial_similarity("x", "") == 0.0
    assert trivial_similarity("x", "y") is None


def test_summary_counts_candidate_errors_only_where_stable_answered() -> None:
    ok = answer_record("ok", 0.1, passages("a.md"), "A [1].")
    records = [compare(ok, ok, 1.0), compare(ok, AnswerRecord("404"), None),
               compare(AnswerRecord("stream_error"), AnswerRecord("timeout"), None),
               Dropped(0.0, "rate"), Dropped(0.0, "rate")]
    summary = summarise(records)
    assert (summary["pairs"], summary["judged"], summary["candidate_errors"], summary["stable_failed"]) == (3, 2, 1, 1)
    assert summary["error_rate"] == 0.5 and summary["errors_by_status"] == {"404": 1}
    assert summary["dropped"] == {"rate": 2}
    assert summary["source_overlap"] == pytest.approx(1.0) and summary["source_overlap_samples"] == 1
    assert summary["cited_share"] == 0.5  # the failed copy cited none of what the stable answer cited
    assert summary["candidate_ttft_p50_s"] == 0.1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_gate_bounds_rate_and_copies_in_flight_and_sheds_first_under_load() -> None:
    clock = Clock()
    gate = MirrorGate(ShadowConfig(rate_per_s=2, max_in_flight=3, max_user_in_flight=10, max_share=1), clock)
    assert [gate.admit(0), gate.admit(0), gate.admit(0)] == [None, None, "rate"]
    clock.now += 0.5  # one more token
    assert gate.admit(0) is None and gate.in_flight == 3
    clock.now += 10
    assert gate.admit(0) == "copies in flight"
    gate.done()
    assert gate.admit(10) == "gateway busy"  # the users come first
    assert gate.admit(9) is None


def test_a_question_copied_often_weighs_once_in_the_means() -> None:
    ok = answer_record("ok", 0.1, passages("a.md"), "A [1].")
    other = answer_record("ok", 0.1, passages("b.md"), "B [1].")
    # Nine copies of a question both versions answer alike, one of a question the candidate gets wrong.
    records = [compare(ok, ok, 1.0, question=question_key("How do I stop it?")) for _ in range(9)]
    records.append(compare(ok, other, 0.0, question=question_key("how do I  STOP it?  ")))  # the same question
    records.append(compare(ok, other, 0.0, question=question_key("Where is the dashboard?")))
    summary = summarise(records)
    assert summary["questions"] == 2 and summary["source_overlap_samples"] == 11
    assert summary["source_overlap"] == pytest.approx((0.9 + 0.0) / 2)


def test_the_gate_copies_at_most_a_share_of_the_answers_however_quiet_the_service() -> None:
    clock = Clock()
    gate = MirrorGate(ShadowConfig(rate_per_s=100, max_in_flight=100, max_share=0.25), clock)
    decisions = []
    for _ in range(12):
        clock.now += 1
        decisions.append(gate.admit(0))
    assert decisions.count(None) == 3 and decisions[3] is None and set(decisions) == {None, "share"}
