"""Shadow traffic in the gateway, against fake versions: the user's answer is the stable one, untouched
and never waiting; the copy's answer is compared with it; copies are bounded, shed and never counted as
user traffic. No Ray."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from deployments.gateway.answer_service import GatewayService
from rag.api import CompletionFormatter
from rag.config import GatewayConfig, RolloutConfig, ShadowConfig, TrafficConfig
from rag.errors import KnowledgeBaseNotFoundError, VersionNotFoundError
from rag.lifecycle import InFlight
from rag.records import AnswerDelta, AnswerEnd, AnswerStart, Passage, Question

QUESTION = Question("how do I upgrade?", "samples")
STABLE = {"sources": ["upgrade.md", "drain.md"], "text": "Roll it out step by step [1]. Drain first [2]."}


class Version:
    """A fake pipeline version: its sources and answer text, a delay, or a refusal."""

    def __init__(self, name: str, sources: list[str], text: str, delay_s: float = 0.0, refuse: bool = False) -> None:
        self.name, self.sources, self.text, self.delay_s, self.refuse = name, sources, text, delay_s, refuse
        self.answers = 0
        self.cancelled = 0

    def stream(self) -> Any:
        self.answers += 1
        version = self

        class Stream:
            def __init__(self) -> None:
                self._it = version._events()

            def __aiter__(self) -> Stream:
                return self

            async def __anext__(self) -> list[Any]:
                return await self._it.__anext__()

            def cancel(self) -> None:
                version.cancelled += 1
        return Stream()

    async def _events(self) -> AsyncIterator[list[Any]]:
        await asyncio.sleep(self.delay_s)
        if self.refuse:
            raise KnowledgeBaseNotFoundError("unknown knowledge base 'samples'")
        yield [AnswerStart("samples", [Passage(i, "t", s, 0.5) for i, s in enumerate(self.sources)], self.name)]
        for word in self.text.split(" "):
            yield [AnswerDelta(word + " ")]
        yield [AnswerEnd("stop", 3, self.name)]


class Method:
    def __init__(self, version: Version) -> None:
        self.version = version

    def options(self, **_: Any) -> Method:
        return self

    def remote(self, *_: Any) -> Any:
        return self.version.stream()


class Embed:
    """Bag of words: answers with the same words are similar."""

    def options(self, **_: Any) -> Embed:
        return self

    async def remote(self, texts: list[str]) -> np.ndarray:
        vocab = sorted({w for t in texts for w in t.split()})
        return np.array([[t.split().count(w) for w in vocab] for t in texts], dtype=float)


class Handles:
    def __init__(self, *versions: Version) -> None:
        self.versions = {v.name: v for v in versions}

    async def get(self, version: str) -> Any:
        return type("Handle", (), {"answer": Method(self.versions[version])})()

    async def embedder(self, version: str) -> Any:
        return type("Embedder", (), {"embed_many": Embed()})()

    def prime(self, version: str, timeout_s: float) -> None:
        pass

    def wake(self, version: str, stages: list[str]) -> None:
        pass

    def is_overload(self, exc: BaseException) -> bool:
        return False


class Metrics:
    def __init__(self) -> None:
        self.first_token = self
        self.requests: list[tuple[str, str, str | None]] = []
        self.shadow: list[tuple[str, Any]] = []

    def observe(self, *_: Any, **__: Any) -> None:
        pass

    def count_request(self, endpoint: str, status: int | str, version: str | None = None) -> None:
        self.requests.append((endpoint, str(status), version))

    def cold_start_waited(self, version: str, seconds: float | None) -> None:
        pass

    def shadow_result(self, version: str, record: Any) -> None:
        self.shadow.append((version, record))


def gateway(candidate: Version, **shadow: Any) -> tuple[GatewayService, Version]:
    stable = Version("v1", STABLE["sources"], STABLE["text"])
    config = GatewayConfig(rollout=RolloutConfig(shadow=ShadowConfig(**{"max_share": 1.0, **shadow})))
    svc = GatewayService(config, Metrics(), InFlight(), Handles(stable, candidate), lambda: {"v1", "v2"})
    svc.set_traffic(TrafficConfig(weights={"v1": 100, "v2": 0}, shadow="v2"))
    return svc, stable


async def ask(svc: GatewayService, times: int = 1, close_after: int | None = None) -> list[list[str]]:
    answers = []
    for _ in range(times):
        version, first, rest = await svc.open_answer(QUESTION, "user-1")
        lines = []
        relay = svc.relay(CompletionFormatter("rag"), version, first, rest, 0.0, "chat")
        async for line in relay:
            lines.append(line)
            if close_after is not None and len(lines) >= close_after:
                await relay.aclose()  # the client went away
                break
        answers.append(lines)
    while svc._copies:  # let the copies finish, as the test ends the loop
        await asyncio.sleep(0.01)
    return answers


def shadow_summary(svc: GatewayService) -> dict[str, Any]:
    summary: dict[str, Any] = svc.stats.summary()["v2"]["shadow"]
    return summary


def test_a_sticky_users_answer_is_copied_and_an_identical_candidate_scores_one() -> None:
    svc, _ = gateway(Version("v2", STABLE["sources"], STABLE["text"]))
    [lines] = asyncio.run(ask(svc))
    assert "Roll" in "".join(lines) and lines[-1].strip() == "data: [DONE]"
    summary = shadow_summary(svc)
    assert summary["judged"] == 1 and summary["candidate_errors"] == 0
    assert summary["source_overlap"] == 1.0 and summary["cited_share"] == 1.0
    assert summary["answer_similarity"] == 1.0 and summary["length_ratio"] == 1.0
    # The copy is no user request: not in the users' counts or metrics.
    assert svc.stats.summary()["v2"]["requests"] == 0 and all(v == "v1" for _, _, v in svc.metrics.requests)


def test_a_candidate_with_other_sources_and_answer_scores_low() -> None:
    svc, _ = gateway(Version("v2", ["changelog.md"], "Nothing about that here [1]."))
    asyncio.run(ask(svc))
    summary = shadow_summary(svc)
    assert summary["source_overlap"] == 0.0 and summary["cited_share"] == 0.0
    assert summary["answer_similarity"] < 0.5


def test_a_candidate_refusal_of_what_stable_answers_counts_as_its_error() -> None:
    svc, _ = gateway(Version("v2", [], "", refuse=True))
    asyncio.run(ask(svc))
    summary = shadow_summary(svc)
    assert summary["candidate_errors"] == 1 and summary["errors_by_status"] == {"404": 1}


def test_the_user_never_waits_for_a_slow_copy_and_a_late_copy_is_an_error() -> None:
    svc, _ = gateway(Version("v2", STABLE["sources"], STABLE["text"], delay_s=1.0), timeout_s=0.3)

    async def timed() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        began = loop.time()
        version, first, rest = await svc.open_answer(QUESTION, None)
        [_ async for _ in svc.relay(CompletionFormatter("rag"), version, first, rest, 0.0, "chat")]
        answered = loop.time() - began
        while svc._copies:
            await asyncio.sleep(0.01)
        return answered, loop.time() - began

    answered, copied = asyncio.run(timed())
    assert answered < 0.2 and copied >= 0.3
    assert shadow_summary(svc)["errors_by_status"] == {"timeout": 1}


def test_copies_are_bounded_by_rate_and_the_rest_are_counted_as_dropped() -> None:
    candidate = Version("v2", STABLE["sources"], STABLE["text"])
    svc, _ = gateway(candidate, rate_per_s=2)
    asyncio.run(ask(svc, times=5))
    summary = shadow_summary(svc)
    assert candidate.answers == 2 and summary["judged"] == 2 and summary["dropped"] == {"rate": 3}


def test_a_user_who_leaves_mid_answer_leaves_no_pair_to_compare() -> None:
    svc, _ = gateway(Version("v2", STABLE["sources"], STABLE["text"]))
    asyncio.run(ask(svc, close_after=2))
    summary = shadow_summary(svc)
    assert summary["judged"] == 0 and summary["dropped"] == {"stable answer incomplete": 1}


def test_an_answer_from_the_candidate_itself_is_not_copied() -> None:
    candidate = Version("v2", STABLE["sources"], STABLE["text"])
    svc, _ = gateway(candidate)
    svc.set_traffic(TrafficConfig(weights={"v2": 100}, shadow="v2"))
    asyncio.run(ask(svc))
    assert candidate.answers == 1 and "shadow" not in svc.stats.summary()["v2"]


def test_an_evaluation_reaches_the_named_version_at_weight_0_uncounted_and_uncopied() -> None:
    candidate = Version("v2", ["changelog.md"], "Other [1].")
    svc, stable = gateway(candidate)

    async def evaluate() -> list[Any]:
        version, first, rest = await svc.open_evaluation(QUESTION, "v2")
        return await svc.collect(version, first, rest, 0.0, "evaluation")

    events = asyncio.run(evaluate())
    assert events[0].version == "v2" and candidate.answers == 1 and stable.answers == 0
    assert svc.stats.summary() == {}  # no user request, no copy
    with pytest.raises(VersionNotFoundError, match="not deployed"):
        asyncio.run(svc.open_evaluation(QUESTION, "v9"))
