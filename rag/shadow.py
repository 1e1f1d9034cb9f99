"""Shadow traffic: a user's question answered by one version is copied to the rollout's candidate, and
the two answers are compared as a pair. What a pair measures, which copies the gateway may start, and
what a stage's pairs add up to are plain functions here; the gateway runs the copies, the rollout's
judge decides on the summary.

Every measure is 1.0 for a candidate that behaves like the stable version, so the thresholds read the
same way: the share of agreement a change may cost.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any

from rag.config import ShadowConfig
from rag.quantiles import TTFT_QUANTILES, quantile, ttft_key
from rag.records import Passage

OK = "ok"
_CITATION = re.compile(r"\[(\d{1,3})\]")
RBO_PERSISTENCE = 0.9  # rank 1 weighs most; a source at rank 3 still counts 0.81 of rank 1


@dataclass(frozen=True)
class AnswerRecord:
    """One side of a pair: how the answer ended and what it was built from."""

    status: str  # "ok", an HTTP status ("404"), "timeout" or "stream_error"
    first_token_s: float | None = None
    sources: tuple[str, ...] = ()  # source files in rank order, each once
    cited: frozenset[str] = frozenset()  # source files the answer cites as [n]
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK


def answer_record(status: str, first_token_s: float | None, passages: Sequence[Passage], text: str) -> AnswerRecord:
    return AnswerRecord(status, first_token_s, tuple(dict.fromkeys(p.source for p in passages)),
                        cited_sources(text, passages), text)


def cited_sources(text: str, passages: Sequence[Passage]) -> frozenset[str]:
    """The files behind the [n] markers of an answer (the prompt and the extractive generator number the
    passages from 1); a marker past the passages cites nothing."""
    numbers = {int(n) for n in _CITATION.findall(text)}
    return frozenset(passages[n - 1].source for n in numbers if 0 < n <= len(passages))


@dataclass(frozen=True)
class Pair:
    """A stable answer and the candidate's answer to the same question."""

    at: float
    stable_status: str
    candidate_status: str
    stable_first_token_s: float | None
    candidate_first_token_s: float | None
    source_overlap: float | None = None  # both answered: rank-biased overlap of their source files
    cited_share: float | None = None  # the stable answer cited something
    answer_similarity: float | None = None  # both answered and the Embedder could compare them
    length_ratio: float | None = None  # candidate / stable answer length, the stable one not empty
    question: str = ""  # a digest of the question: repeated questions weigh once in a stage's means


@dataclass(frozen=True)
class Dropped:
    """A copy not made or not compared, and why (bounds, load, the user left): not evidence either way."""

    at: float
    reason: str


ShadowRecord = Pair | Dropped


def question_key(text: str) -> str:
    return hashlib.blake2b(" ".join(text.casefold().split()).encode("utf-8"), digest_size=8).hexdigest()


def compare(stable: AnswerRecord, candidate: AnswerRecord, similarity: float | None = None,
            at: float | None = None, question: str = "") -> Pair:
    both = stable.ok and candidate.ok
    cited = None
    if stable.ok and stable.cited:
        cited = len(stable.cited & candidate.cited) / len(stable.cited) if candidate.ok else 0.0
    return Pair(time.time() if at is None else at, stable.status, candidate.status, stable.first_token_s,
                candidate.first_token_s,
                source_overlap=rank_biased_overlap(stable.sources, candidate.sources) if both else None,
                cited_share=cited,
                answer_similarity=similarity if both else None,
                length_ratio=len(candidate.text) / len(stable.text) if both and stable.text else None,
                question=question)


def rank_biased_overlap(a: Sequence[str], b: Sequence[str], p: float = RBO_PERSISTENCE) -> float:
    """Top-weighted agreement of two rankings, 1.0 for the same items in the same order, 0.0 for
    nothing in common; normalised over the longer list's depth so short lists can reach 1.0. Two empty
    rankings agree (neither version found anything)."""
    depth = max(len(a), len(b))
    if depth == 0:
        return 1.0
    seen_a: set[str] = set()
    seen_b: set[str] = set()
    total = 0.0
    for d in range(depth):
        if d < len(a):
            seen_a.add(a[d])
        if d < len(b):
            seen_b.add(b[d])
        total += p ** d * len(seen_a & seen_b) / (d + 1)
    return total * (1 - p) / (1 - p ** depth)


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return sum(x * y for x, y in zip(a, b, strict=True)) / norm if norm else 0.0


def trivial_similarity(stable: str, candidate: str) -> float | None:
    """The similarity of two answers when one is empty (they agree only if both are), else None: the
    two must be embedded and compared by `cosine`."""
    if not stable.strip() or not candidate.strip():
        return 1.0 if stable.strip() == candidate.strip() else 0.0
    return None


def summarise(records: Sequence[ShadowRecord]) -> dict[str, Any]:
    """A stage's pairs as the judge reads them. A candidate error counts only where the stable version
    answered the same question (a question nobody could answer says nothing about the candidate)."""
    pairs = [r for r in records if isinstance(r, Pair)]
    judged = [p for p in pairs if p.stable_status == OK]
    failed = [p for p in judged if p.candidate_status != OK]
    both = [p for p in judged if p.candidate_status == OK]
    summary: dict[str, Any] = {
        "pairs": len(pairs), "judged": len(judged), "candidate_errors": len(failed),
        "error_rate": len(failed) / len(judged) if judged else 0.0,
        "errors_by_status": dict(Counter(p.candidate_status for p in failed)),
        "stable_failed": len(pairs) - len(judged),
        "dropped": dict(Counter(r.reason for r in records if isinstance(r, Dropped))),
    }
    summary["questions"] = len({p.question for p in judged})
    for name in ("source_overlap", "cited_share", "answer_similarity", "length_ratio"):
        summary[name], summary[f"{name}_samples"] = _mean_per_question(judged, name)
    for side in ("candidate", "stable"):
        ttfts = sorted(t for p in both if (t := getattr(p, f"{side}_first_token_s")) is not None)
        summary[f"{side}_ttft_samples"] = len(ttfts)
        for q in TTFT_QUANTILES:
            summary[f"{side}_{ttft_key(q)}"] = quantile(ttfts, q)
    return summary


def _mean_per_question(pairs: Sequence[Pair], name: str) -> tuple[float | None, int]:
    """The mean of a measure with each distinct question weighing once (its pairs averaged first), and
    the pairs it covers. Which answers get copied depends on timing (a copy slot frees up, a rate token
    refills) and real traffic repeats its popular questions: a plain mean would let one question that
    happened to be copied often decide."""
    by_question: dict[str, list[float]] = {}
    for p in pairs:
        if (value := getattr(p, name)) is not None:
            by_question.setdefault(p.question, []).append(value)
    if not by_question:
        return None, 0
    return round(fmean(fmean(v) for v in by_question.values()), 4), sum(len(v) for v in by_question.values())


class MirrorGate:
    """Which answers may be copied now: never more than `rate_per_s` copies started per second (a token
    bucket holding one second's worth), `max_in_flight` at once or `max_share` of the answers seen, and
    none while the replica holds `max_user_in_flight` user requests: copies are the first thing shed."""

    def __init__(self, config: ShadowConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self.clock = config, clock
        self.in_flight = 0
        self._answered = 0  # requests seen, and copies made of them: copies stay within max_share
        self._copied = 0
        self._tokens = max(1.0, config.rate_per_s)
        self._refilled = clock()
        self._lock = threading.Lock()

    def admit(self, user_in_flight: int) -> str | None:
        """None when a copy may start (and counts it as started), else why not."""
        with self._lock:
            now = self.clock()
            burst = max(1.0, self.config.rate_per_s)
            self._tokens = min(burst, self._tokens + (now - self._refilled) * self.config.rate_per_s)
            self._refilled = now
            self._answered += 1
            if user_in_flight >= self.config.max_user_in_flight:
                return "gateway busy"
            if self._copied + 1 > self._answered * self.config.max_share:
                return "share"
            if self.in_flight >= self.config.max_in_flight:
                return "copies in flight"
            if self._tokens < 1:
                return "rate"
            self._tokens -= 1
            self.in_flight += 1
            self._copied += 1
            return None

    def done(self) -> None:
        with self._lock:
            self.in_flight = max(0, self.in_flight - 1)
