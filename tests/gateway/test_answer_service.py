"""The gateway's routing, retry, relaying and accounting against fake version handles: no Ray."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from deployments.gateway.answer_service import GatewayService
from rag.api import CompletionFormatter
from rag.config import GatewayConfig, TrafficConfig
from rag.errors import IndexMismatchError, KnowledgeBaseNotFoundError, OverloadedError, ServiceUnavailableError
from rag.lifecycle import InFlight
from rag.records import AnswerDelta, AnswerEnd, AnswerStart, Question

QUESTION = Question("how do I upgrade?", "samples")


class FakeBackPressure(Exception):
    """Stands for Serve's BackPressureError."""


class FakeStream:
    """A streamed answer: batches of events, or `fail` raised at the given batch."""

    def __init__(self, version: str, behaviour: str) -> None:
        self.version, self.behaviour, self.cancelled = version, behaviour, False
        self._batches = self._make()

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> list[Any]:
        return await self._batches.__anext__()

    async def _make(self) -> AsyncIterator[list[Any]]:
        if self.behaviour == "overloaded":
            raise FakeBackPressure("queue full")
        if self.behaviour == "replica_lost":
            raise RuntimeError("ActorDiedError: the replica died")
        if self.behaviour == "index_mismatch":
            raise IndexMismatchError("index v3 was built with another model")
        if self.behaviour == "unknown_kb":
            raise KnowledgeBaseNotFoundError("unknown knowledge base")
        if self.behaviour == "hang":
            await asyncio.sleep(3600)
        if self.behaviour == "cold_start":  # its replicas start from zero: longer than half the budget
            await asyncio.sleep(0.7)
        yield [AnswerStart("samples", [], self.version)]
        yield [AnswerDelta("Roll it out ")]
        if self.behaviour == "break_mid":
            raise RuntimeError("replica died mid-answer")
        if self.behaviour == "slow":
            await asyncio.sleep(3600)
        yield [AnswerDelta("step by step."), AnswerEnd("stop", 5, self.version)]

    def cancel(self) -> None:
        self.cancelled = True


class FakeMethod:
    def __init__(self, handle: FakeHandle, name: str) -> None:
        self.handle, self.name = handle, name

    def options(self, **_: Any) -> FakeMethod:
        return self

    def remote(self, *_: Any) -> Any:
        self.handle.calls += 1
        if self.name == "answer":
            lost = self.handle.calls <= self.handle.lost_for
            stream = FakeStream(self.handle.version, "replica_lost" if lost else self.handle.behaviour)
            self.handle.streams.append(stream)
            return stream

        async def result() -> Any:
            return [] if self.name == "search" else ["samples"]
        return result()


class FakeHandle:
    def __init__(self, version: str, behaviour: str = "ok") -> None:
        self.version, self.behaviour, self.calls = version, behaviour, 0
        self.streams: list[FakeStream] = []
        self.lost_for = 0  # this many calls fail as a lost replica before the behaviour applies

    def __getattr__(self, name: str) -> FakeMethod:
        return FakeMethod(self, name)


class FakeHandles:
    def __init__(self, **behaviours: str) -> None:
        self.handles = {v: FakeHandle(v, b) for v, b in behaviours.items()}
        self.woken: list[tuple[str, list[str]]] = []

    async def get(self, version: str) -> FakeHandle:
        return self.handles[version]

        self.woken: list[tuple[str, list[str]]] = []

    def prime(self, version: str, timeout_s: float) -> None:
        pass

    def wake(self, version: str, stages: list[str]) -> None:
        self.woken.append((version, stages))

    def is_overload(self, exc: BaseException) -> bool:
        return isinstance(exc, FakeBackPressure)


class FakeMetrics:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None]] = []
        self.first_token = self
        self.cold_waits: list[tuple[str, float | None]] = []

    def cold_start_waited(self, version: str, seconds: float | None) -> None:
        self.cold_waits.append((version, seconds))

    def observe(self, *_: Any, **__: Any) -> None:
        pass

    def count_request(self, endpoint: str, status: int | str, version: str | None = None) -> None:
        self.requests.append((endpoint, str(status), version))

    def shadow_result(self, version: str, record: Any) -> None:
        pass

    def golden_scores(self, version: str, knowledge_base: str, scores: dict[str, float | None]) -> None:
        self.golden = (version, knowledge_base, scores)


def service(weights: dict[str, float], first_event_timeout_s: float = 5.0,
            serving: Callable[[], set[str]] | None = None, cold: dict[str, list[str]] | None = None,
            **behaviours: str) -> GatewayService:
    svc = GatewayService(GatewayConfig(first_event_timeout_s=first_event_timeout_s), FakeMetrics(), InFlight(),
                         FakeHandles(**behaviours), serving, cold_stages=lambda: cold or {})
    svc.set_traffic(TrafficConfig(weights=weights))
    return svc


def counts(svc: GatewayService) -> dict[str, tuple[int, int]]:
    return {v: (s["requests"], s["errors"]) for v, s in svc.stats.summary().items()}


async def relay_all(svc: GatewayService, key: str | None = None) -> tuple[str, list[str]]:
    version, first, rest = await svc.open_answer(QUESTION, key)
    lines = [line async for line in svc.relay(CompletionFormatter("rag"), version, first, rest, 0.0, "chat")]
    return version, lines


def test_a_lost_replica_before_the_first_byte_is_retried_on_another_version_and_blamed_on_its_own() -> None:
    svc = service({"v1": 50, "v2": 50}, v1="ok", v2="replica_lost")
    version, lines = asyncio.run(relay_all(svc, key=_key_for(svc, "v2")))
    assert version == "v1" and lines[-1].strip() == "data: [DONE]"
    assert counts(svc) == {"v1": (1, 0), "v2": (1, 1)}


def test_when_every_attempt_fails_each_is_blamed_on_its_version_and_503_comes_within_the_budget() -> None:
    svc = service({"v1": 90, "v2": 10}, first_event_timeout_s=1.0, v1="replica_lost", v2="replica_lost")
    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError, match="no version could start the answer within 1s"):
        asyncio.run(svc.open_answer(QUESTION, _key_for(svc, "v1")))
    assert time.monotonic() - started < 1.2
    # attempts alternate (the version that just failed is avoided) and pause 0.2 s, then 0.5 s
    assert counts(svc) == {"v1": (2, 2), "v2": (1, 1)}
    assert svc.in_flight.count == 0


def test_a_lost_replica_of_the_only_version_is_waited_for_not_refused() -> None:
    svc = service({"v1": 100}, v1="ok")
    svc.handles.handles["v1"].lost_for = 2  # type: ignore[attr-defined]
    version, lines = asyncio.run(relay_all(svc))
    assert version == "v1" and lines[-1].strip() == "data: [DONE]"
    assert counts(svc) == {"v1": (3, 2)}  # two failed attempts, then the answer


def test_while_no_version_serves_a_request_waits_for_one_within_its_budget() -> None:
    serving: dict[str, set[str]] = {"now": {"v1"}}
    svc = service({"v1": 100}, serving=lambda: serving["now"], v1="ok")

    async def replaced_meanwhile() -> str:
        serving["now"] = set()  # its only Generator replica died; Serve is starting a new one
        asyncio.get_running_loop().call_later(0.6, lambda: serving.update(now={"v1"}))
        version, _ = await relay_all(svc)
        return version

    started = time.monotonic()
    assert asyncio.run(replaced_meanwhile()) == "v1"
    assert 0.5 < time.monotonic() - started < 2.0


def test_with_no_version_serving_within_the_budget_the_answer_is_503_at_the_budget() -> None:
    svc = service({"v1": 100}, first_event_timeout_s=0.5, serving=set, v1="ok")
    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError, match="serving"):
        asyncio.run(svc.open_answer(QUESTION, None))
    assert 0.45 < time.monotonic() - started < 0.8
    assert svc.handles.handles["v1"].calls == 0  # type: ignore[attr-defined]  # nothing sent to a cold version


def test_a_full_queue_is_refused_at_once_not_retried() -> None:
    svc = service({"v1": 50, "v2": 50}, v1="ok", v2="overloaded")
    started = time.monotonic()
    with pytest.raises(OverloadedError):
        asyncio.run(svc.open_answer(QUESTION, _key_for(svc, "v2")))
    assert time.monotonic() - started < 0.1
    assert svc.handles.handles["v1"].calls == 0  # type: ignore[attr-defined]


def test_a_stage_error_before_the_first_event_counts_against_its_version_without_retry() -> None:
    svc = service({"v1": 50, "v2": 50}, v1="ok", v2="index_mismatch")
    with pytest.raises(IndexMismatchError):
        asyncio.run(svc.open_answer(QUESTION, _key_for(svc, "v2")))
    handles = svc.handles.handles  # type: ignore[attr-defined]
    assert handles["v1"].calls == 0 and counts(svc) == {"v2": (1, 1)}


def test_a_refusal_is_no_error_but_is_kept_by_status_for_the_rollout_to_compare() -> None:
    svc = service({"v1": 100}, v1="unknown_kb")
    with pytest.raises(KnowledgeBaseNotFoundError):
        asyncio.run(svc.open_answer(QUESTION, None))
    assert counts(svc) == {"v1": (1, 0)}
    assert svc.stats.summary()["v1"]["refused"] == {"404": 1}


def test_a_version_that_never_answers_is_abandoned_at_the_first_event_timeout() -> None:
    svc = service({"v1": 50, "v2": 50}, first_event_timeout_s=1.0, v1="ok", v2="hang")
    version, _ = asyncio.run(relay_all(svc, key=_key_for(svc, "v2")))
    assert version == "v1" and counts(svc) == {"v1": (1, 0), "v2": (1, 1)}
    assert svc.handles.handles["v2"].streams[0].cancelled  # type: ignore[attr-defined]


def test_a_stream_broken_mid_answer_ends_with_an_error_event_and_done_and_counts_as_an_error() -> None:
    svc = service({"v1": 100}, v1="break_mid")
    _, lines = asyncio.run(relay_all(svc))
    assert '"Roll it out "' in "".join(lines)
    assert '"code": "stream_error"' in lines[-2] and lines[-1].strip() == "data: [DONE]"
    assert counts(svc) == {"v1": (1, 1)}
    assert ("chat", "stream_error", "v1") in svc.metrics.requests  # type: ignore[attr-defined]


def test_a_client_hang_up_cancels_upstream_and_is_not_an_error() -> None:
    svc = service({"v1": 100}, v1="slow")

    async def hang_up() -> None:
        version, first, rest = await svc.open_answer(QUESTION, None)
        relay = svc.relay(CompletionFormatter("rag"), version, first, rest, 0.0, "chat")
        assert "assistant" in await relay.__anext__()
        assert "Roll it out" in await relay.__anext__()
        assert svc.in_flight.count == 1 and svc.stats.in_flight() == {"v1": 1}
        await relay.aclose()  # what Starlette does when the client goes away

    asyncio.run(hang_up())
    assert svc.handles.handles["v1"].streams[0].cancelled  # type: ignore[attr-defined]
    assert counts(svc) == {"v1": (1, 0)} and svc.in_flight.count == 0 and svc.stats.in_flight() == {"v1": 0}
    assert ("chat", "client_closed", "v1") in svc.metrics.requests  # type: ignore[attr-defined]


def test_collect_counts_a_whole_answer_once() -> None:
    svc = service({"v1": 100}, v1="ok")

    async def collect() -> list[Any]:
        version, first, rest = await svc.open_answer(QUESTION, None)
        return await svc.collect(version, first, rest, 0.0, "chat")

    events = asyncio.run(collect())
    assert isinstance(events[0], AnswerStart) and isinstance(events[-1], AnswerEnd)
    assert counts(svc) == {"v1": (1, 0)}


def test_outcomes_are_handed_over_once_for_the_merged_view() -> None:
    svc = service({"v1": 100}, v1="ok")
    asyncio.run(relay_all(svc))
    asyncio.run(relay_all(svc))
    first = svc.stats.take_new()
    assert [v for v, _ in first] == ["v1", "v1"] and svc.stats.take_new() == []
    svc.stats.give_back(first)
    assert len(svc.stats.take_new()) == 2


def test_draining_refuses_new_requests() -> None:
    svc = service({"v1": 100}, v1="ok")
    svc.set_traffic(TrafficConfig(weights={"v1": 100}, draining=True))
    with pytest.raises(ServiceUnavailableError, match="draining"):
        asyncio.run(svc.open_answer(QUESTION, None))


def _key_for(svc: GatewayService, version: str) -> str:
    """A sticky key that the weighted split sends to `version` first."""
    return next(k for k in (f"user-{i}" for i in range(1000)) if svc.split.choose(k) == version)


def test_a_cold_version_is_woken_once_and_its_answer_waits_out_the_cold_start() -> None:
    cold = {"v1": ["Embedder", "Generator"]}
    svc = service({"v1": 100}, first_event_timeout_s=1.0, cold=cold, v1="cold_start")

    async def two_answers() -> list[tuple[str, list[str]]]:
        return await asyncio.gather(relay_all(svc), relay_all(svc))

    answers = asyncio.run(two_answers())
    # Half the budget (0.5 s) would have cut the 0.7 s start and retried; a cold start gets all of it.
    assert all(lines[-1] == "data: [DONE]\n\n" and "step by step" in "".join(lines) for _, lines in answers)
    assert svc.handles.woken == [("v1", ["Embedder", "Generator"])]  # once, not per request
    assert svc.handles.handles["v1"].calls == 2
    summary = svc.stats.summary()["v1"]
    assert summary["cold_starts"] == 2 and summary["ttft_samples"] == 0 and summary["errors"] == 0
    assert [v for v, _ in svc.metrics.cold_waits] == ["v1", "v1"]
    assert all(seconds is not None and seconds >= 0.7 for _, seconds in svc.metrics.cold_waits)


def test_a_warm_version_is_neither_woken_nor_given_the_whole_budget() -> None:
    svc = service({"v1": 100}, first_event_timeout_s=1.0, v1="cold_start")
    with pytest.raises(ServiceUnavailableError):
        asyncio.run(relay_all(svc))
    assert svc.handles.woken == [] and svc.metrics.cold_waits == []


def test_priming_a_cold_version_wakes_it_without_waiting() -> None:
    svc = service({"v1": 100, "v2": 0}, v1="ok", v2="ok")
    svc.prime("v2", ["Generator"])
    assert svc.handles.woken == [("v2", ["Generator"])]
