"""The gateway's logic: choose a version, start its answer (retrying once before the first byte),
relay the events, copy the question to a rollout's candidate (shadow traffic) and compare the two
answers, and keep the counts that /ready, /stats and the metrics report.

Plain code: the versions' handles come in through `VersionHandles` (Serve's in the deployment, a fake
in unit tests), the way vLLM's serving layer takes an engine client, so routing, retry, relaying and
accounting are tested without a cluster.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from deployments.gateway.statuses import root_cause, status_for
from rag.api import AnswerFormatter, ChatCompletionRequest, document_json, sse
from rag.config import GatewayConfig, TrafficConfig
from rag.errors import (
    InvalidRequestError,
    KnowledgeBaseNotFoundError,
    OverloadedError,
    RagError,
    ServiceUnavailableError,
    VersionNotFoundError,
)
from rag.kb_store import is_temporary
from rag.lifecycle import InFlight
from rag.records import AnswerDelta, AnswerEvent, AnswerStart, Question
from rag.shadow import (
    OK,
    AnswerRecord,
    Dropped,
    MirrorGate,
    Pair,
    answer_record,
    compare,
    cosine,
    question_key,
    trivial_similarity,
)
from rag.stats import VersionStats
from rag.traffic import TrafficSplit

logger = logging.getLogger("rag.gateway")
DEFAULT_MODEL_ALIAS = "rag"
# Pauses between attempts at one answer: spaced, so a replica's replacement is waited for rather than
# hammered, all within `first_event_timeout_s`.
RETRY_PAUSES_S = (0.2, 0.5, 1.0, 2.0)
SERVING_POLL_S = 0.25
# A version's cold stages are woken at most this often: the requests that arrive meanwhile wait in
# Serve's queue for the replicas already starting.
WAKE_INTERVAL_S = 5.0
# The request's own fault: any version would refuse it alike, so it says nothing about the version.
REQUEST_FAULTS = (InvalidRequestError, KnowledgeBaseNotFoundError)
# A copy waits this long at most for the user's answer to end before the pair is given up.
PAIR_WAIT_S = 600.0


class VersionHandles(Protocol):
    """Handles to the pipeline versions (each with `answer`, `search`, `knowledge_bases` methods) and
    to their Embedders (`embed`, `embed_many`, `count_tokens`, `describe`)."""

    async def get(self, version: str) -> Any: ...

    async def embedder(self, version: str) -> Any: ...

    def prime(self, version: str, timeout_s: float) -> None: ...

    def wake(self, version: str, stages: list[str]) -> None:
        """Send each named stage of `version` a no-op without waiting for it (blocking lookup)."""
        ...

    def is_overload(self, exc: BaseException) -> bool:
        """Whether `exc` is a full queue downstream (refused at once, never waited on)."""
        ...


class Metrics(Protocol):
    first_token: Any

    def count_request(self, endpoint: str, status: int | str, version: str | None = None) -> None: ...

    def cold_start_waited(self, version: str, seconds: float | None) -> None: ...

    def shadow_result(self, version: str, record: Pair | Dropped) -> None: ...

    def golden_scores(self, version: str, knowledge_base: str, scores: dict[str, float | None]) -> None: ...


class GatewayService:
    """Picks a version for each request and relays its answer events in the requested shape."""

    def __init__(self, config: GatewayConfig, metrics: Metrics, in_flight: InFlight, handles: VersionHandles,
                 ready_versions: Callable[[], set[str]] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 cold_stages: Callable[[], dict[str, list[str]]] = dict) -> None:
        self.config = config
        self.metrics = metrics
        self.traffic = TrafficConfig()
        self.split = TrafficSplit(self.traffic)
        self.in_flight = in_flight
        self.started = time.monotonic()
        self.ready_versions = ready_versions or (lambda: set(self.split.live))
        self.stats = VersionStats(config.stats_window_records)
        self.handles = handles
        self.clock = clock
        self.cold_stages = cold_stages  # per version, its stages at zero replicas now (readiness)
        self._woken: dict[str, float] = {}
        self.mirror = MirrorGate(config.rollout.shadow, clock)
        self._copies: set[asyncio.Task[None]] = set()  # held so the loop does not drop them mid-way

    def set_traffic(self, traffic: TrafficConfig) -> None:
        self.traffic = traffic
        self.split = TrafficSplit(traffic)

    @property
    def draining(self) -> bool:
        return self.traffic.draining

    def serving_versions(self) -> list[str]:
        """Versions that serve now, the heaviest first: the knowledge-base API embeds through the first."""
        serving, weights = self.ready_versions(), self.split.weights
        return sorted((v for v in weights if v in serving), key=lambda v: -weights[v])

    def knowledge_base_for(self, request: ChatCompletionRequest) -> str:
        if request.knowledge_base:
            return request.knowledge_base
        return self.config.default_knowledge_base if request.model == DEFAULT_MODEL_ALIAS else request.model

    def choose_version(self, key: str | None, avoid: list[str] | None = None) -> str:
        """By weight among the live versions that are serving; a version that just failed is avoided
        when another one can take the request."""
        ready = [v for v in self.split.live if v in self.ready_versions()]
        if not ready:
            raise ServiceUnavailableError(f"no version of {self.split.live} is serving; retry shortly")
        fresh = [v for v in ready if v not in (avoid or [])]
        return self.split.choose(key, among=fresh or ready)

    async def open_answer(self, question: Question, key: str | None) -> tuple[str, AnswerStart, AnswerStream]:
        """Start an answer and wait for its first event (the sources). Errors before that event become
        an HTTP status, not an error inside a 200 stream.

        Nothing has been sent yet, so a lost replica (or a version being replaced or removed) costs the
        client time, not the answer: the request waits for a version that serves and tries again, with
        growing pauses and elsewhere when possible, until the first-event budget is spent; only then
        503. A full queue is refused at once: waiting is what overload must not do."""
        self.refuse_if_draining()
        deadline = self.clock() + self.config.first_event_timeout_s
        failed: list[str] = []
        for attempt in itertools.count(1):
            version = await self._serving_version(key, failed, deadline)
            cold = await self._wake_if_cold(version)
            try:
                # Half the budget at most for one attempt, so a version that hangs leaves time to try another;
                # a cold start gets the whole budget: its replicas are starting, retrying would start nothing.
                attempt_s = deadline - self.clock() if cold else \
                    min(deadline - self.clock(), self.config.first_event_timeout_s / 2)
                began = self.clock()
                first, stream = await self._first_event(version, question, attempt_s)
                if cold:
                    stream.cold = True
                    self.metrics.cold_start_waited(version, self.clock() - began)
                stream.shadow = self._copy(question, version, first)
                return version, first, stream
            except RagError as exc:
                # Raised by a stage: not retried (it is an answer, not a lost replica). The request's own
                # fault is kept apart: the rollout compares its rate with the stable version's.
                if isinstance(exc, REQUEST_FAULTS):
                    self.stats.refused(version, status_for(exc))
                else:
                    self.stats.failed_to_start(version)
                raise
            except Exception as exc:
                self.stats.failed_to_start(version)
                if cold:
                    self.metrics.cold_start_waited(version, None)
                if self.handles.is_overload(exc):
                    raise OverloadedError("the service is at capacity; retry shortly") from None
                failed.append(version)
                pause = RETRY_PAUSES_S[min(attempt, len(RETRY_PAUSES_S)) - 1]
                logger.warning("event=RETRY version=%s attempt=%d pause_s=%s error=%r", version, attempt, pause, exc)
                if deadline - self.clock() <= pause:
                    break
                await asyncio.sleep(pause)
        raise ServiceUnavailableError(f"no version could start the answer within {self.config.first_event_timeout_s:g}"
                                      f"s (tried {failed}); retry shortly")

    async def open_evaluation(self, question: Question, version: str) -> tuple[str, AnswerStart, AnswerStream]:
        """A golden-set question for one named version (even at weight 0): no other version, no retry,
        no copy, and not counted as user traffic."""
        self.refuse_if_draining()
        if version not in self.traffic.weights:
            raise VersionNotFoundError(f"version {version[:64]!r} is not deployed; deployed: "
                                      f"{sorted(self.traffic.weights)}")
        if version not in self.ready_versions():
            raise ServiceUnavailableError(f"version {version!r} is not serving yet; retry shortly")
        await self._wake_if_cold(version)
        first, stream = await self._first_event(version, question, self.config.first_event_timeout_s)
        stream.evaluation = True
        return version, first, stream

    async def _wake_if_cold(self, version: str) -> bool:
        """Whether a stage of `version` is at zero replicas; if so, wake all such stages at once (Serve
        would start them one after another, as the request reaches each), at most every WAKE_INTERVAL_S."""
        stages = self.cold_stages().get(version)
        if not stages:
            return False
        if self.clock() - self._woken.get(version, -WAKE_INTERVAL_S) >= WAKE_INTERVAL_S:
            try:
                await asyncio.to_thread(self._wake, version, stages, "request")
            except Exception as exc:  # the request itself still wakes the stages it reaches
                logger.warning("event=WAKE_FAILED version=%s error=%r", version, exc)
        return True

    def _wake(self, version: str, stages: list[str], reason: str) -> None:
        self._woken[version] = self.clock()
        logger.info("event=COLD_START version=%s stages=%s reason=%s", version, ",".join(stages), reason)
        self.handles.wake(version, stages)

    async def _serving_version(self, key: str | None, failed: list[str], deadline: float) -> str:
        """A version to try: at once when one serves; while none does (the only replica of a stage is being
        replaced, a node is lost, the service is still warming up), wait for one within the budget."""
        while True:
            try:
                return self.choose_version(key, failed[-1:])
            except ServiceUnavailableError:
                if self.clock() >= deadline:
                    raise
                await asyncio.sleep(min(SERVING_POLL_S, max(0.0, deadline - self.clock())))

    async def _first_event(self, version: str, question: Question,
                           timeout_s: float) -> tuple[AnswerStart, AnswerStream]:
        stream = AnswerStream((await self.handles.get(version)).answer.options(stream=True).remote(question))
        try:
            first = await stream.start(max(timeout_s, 0.001))
        except BaseException:
            stream.cancel()
            raise
        return first, stream

    async def relay(self, formatter: AnswerFormatter, version: str, first: AnswerStart,
                    rest: AnswerStream, started: float, endpoint: str) -> AsyncIterator[str]:
        """SSE lines for one answer; a broken upstream ends in an error event and [DONE], never a cut."""
        status, finished, ttft = "200", False, None
        with self.in_flight.track(), self._counted(version, rest) as outcome:
            try:
                if (opening := formatter.chunk(first)) is not None:
                    yield sse(opening)
                async for batch in rest.batches():
                    for event in batch:
                        ttft = ttft or self._first_token(event, started, version)
                        rest.saw(event)
                    events = [sse(c) for event in batch if (c := formatter.chunk(event)) is not None]
                    if formatter.one_event_per_write:
                        for one in events:
                            yield one
                    else:
                        yield "".join(events)
                finished = True
            except Exception as exc:
                status, finished = "stream_error", True
                logger.warning("event=STREAM_ERROR version=%s error=%r", version, exc)
                yield sse(formatter.error_chunk(f"the answer stream broke off ({type(exc).__name__}); "
                                                "the answer above is incomplete"))
            finally:
                if not finished:  # the client went away: stop the generation upstream
                    status = "client_closed"
                    rest.cancel()
                self.metrics.count_request(endpoint, status, version)
                outcome.update(ok=status != "stream_error", first_token_s=ttft)
                rest.ended(OK if status == "200" else status, ttft)
            yield formatter.done

    async def collect(self, version: str, first: AnswerStart, rest: AnswerStream,
                      started: float, endpoint: str) -> list[AnswerEvent]:
        with self.in_flight.track(), self._counted(version, rest) as outcome:
            events: list[AnswerEvent] = [first]
            ttft = None
            try:
                async for batch in rest.batches():
                    for event in batch:
                        ttft = ttft or self._first_token(event, started, version)
                        rest.saw(event)
                        events.append(event)
            except BaseException:
                rest.ended("stream_error", ttft)
                raise
            outcome.update(ok=True, first_token_s=ttft)
            rest.ended(OK, ttft)
        self.metrics.count_request(endpoint, 200, version)
        return events

    @contextmanager
    def _counted(self, version: str, stream: AnswerStream) -> Iterator[dict[str, Any]]:
        """Per-version in-flight and outcome for the rollout's comparison; failed unless marked ok. An
        evaluation's answer is no user's: not counted."""
        outcome: dict[str, Any] = {"ok": False, "first_token_s": None}
        if stream.evaluation:
            yield outcome
            return
        self.stats.started(version)
        try:
            yield outcome
        finally:
            self.stats.finished(version, outcome["ok"], outcome["first_token_s"], stream.cold)

    def _first_token(self, event: AnswerEvent, started: float, version: str) -> float | None:
        """Record time to first token at the first answer text and return it."""
        if not isinstance(event, AnswerDelta):
            return None
        seconds = time.perf_counter() - started
        self.metrics.first_token.observe(seconds, tags={"version": version})
        return seconds

    # -- shadow traffic ----------------------------------------------------------------------------
    def _copy(self, question: Question, version: str, first: AnswerStart) -> ShadowCopy | None:
        """Copy an answered question to the rollout's candidate when the bounds allow; the copy runs on
        its own, the user's answer never waits for it."""
        candidate = self.traffic.shadow
        if not candidate or candidate == version:
            return None
        if candidate not in self.ready_versions():
            self._shadow_record(candidate, Dropped(time.time(), "candidate not serving"))
            return None
        if reason := self.mirror.admit(self.in_flight.count):
            self._shadow_record(candidate, Dropped(time.time(), reason))
            return None
        copy = ShadowCopy(first)
        task = asyncio.create_task(self._run_copy(candidate, question, copy))
        self._copies.add(task)
        task.add_done_callback(self._copies.discard)
        return copy

    async def _run_copy(self, candidate: str, question: Question, copy: ShadowCopy) -> None:
        try:
            try:
                answer = await self._candidate_answer(candidate, question)
            finally:
                self.mirror.done()
            if answer is None:
                self._shadow_record(candidate, Dropped(time.time(), "candidate at capacity"))
                return
            try:
                stable = await asyncio.wait_for(asyncio.shield(copy.result), PAIR_WAIT_S)
            except TimeoutError:
                stable = None
            if stable is None:  # the user left (or never finished): a partial answer compares with nothing
                self._shadow_record(candidate, Dropped(time.time(), "stable answer incomplete"))
                return
            similarity = await self._similarity(candidate, stable, answer)
            self._shadow_record(candidate, compare(stable, answer, similarity, question=question_key(question.text)))
        except Exception as exc:  # a copy never disturbs the gateway
            logger.warning("event=SHADOW_FAILED version=%s error=%r", candidate, exc)

    async def _candidate_answer(self, candidate: str, question: Question) -> AnswerRecord | None:
        """The candidate's whole answer within the copy's deadline (never retried); None when its queue
        was full: a copy is shed, not counted as the candidate's error."""
        began, ttft, texts = time.perf_counter(), None, []
        stream: AnswerStream | None = None
        deadline = self.config.rollout.shadow.timeout_s
        try:
            async with asyncio.timeout(deadline):
                stream = AnswerStream((await self.handles.get(candidate)).answer.options(stream=True).remote(question))
                first = await stream.start(deadline)
                async for batch in stream.batches():
                    for event in batch:
                        if isinstance(event, AnswerDelta):
                            ttft = ttft or time.perf_counter() - began
                            texts.append(event.text)
            return answer_record(OK, ttft, first.passages, "".join(texts))
        except TimeoutError:
            return AnswerRecord("timeout")
        except Exception as exc:
            if self.handles.is_overload(exc):
                return None
            return AnswerRecord(str(status_for(root_cause(exc))) if isinstance(root_cause(exc), RagError)
                                else "stream_error" if stream and texts else "error")
        finally:
            if stream:
                stream.cancel()

    async def _similarity(self, candidate: str, stable: AnswerRecord, answer: AnswerRecord) -> float | None:
        """Cosine of the two answers through the candidate's Embedder; None (not measured) if it fails."""
        if not (stable.ok and answer.ok):
            return None
        if (fixed := trivial_similarity(stable.text, answer.text)) is not None:
            return fixed
        try:
            embedder = await self.handles.embedder(candidate)
            first, second = await asyncio.wait_for(embedder.embed_many.remote([stable.text, answer.text]),
                                                   self.config.request_timeout_s)
            return max(0.0, cosine(list(first), list(second)))
        except Exception as exc:
            logger.warning("event=SHADOW_SIMILARITY_FAILED version=%s error=%r", candidate, exc)
            return None

    def _shadow_record(self, candidate: str, record: Pair | Dropped) -> None:
        self.stats.shadow(candidate, record)
        self.metrics.shadow_result(candidate, record)

    async def search(self, question: Question, key: str | None = None) -> tuple[str, list[dict[str, Any]]]:
        self.refuse_if_draining()
        version = self.choose_version(key)
        with self.in_flight.track():
            passages = await (await self.handles.get(version)).search.remote(question)
        self.metrics.count_request("search_docs", 200, version)
        return version, [document_json(p) for p in passages]

    async def models(self) -> list[dict[str, Any]]:
        """One model per knowledge base, with how each live version retrieves from it (and why) and which
        generation backend and model answers there."""
        found: dict[str, dict[str, Any]] = {}
        generation: dict[str, dict[str, Any]] = {}
        for version in self.split.live:
            handle = await self.handles.get(version)
            for name, info in (await handle.retrieval_modes.remote()).items():
                if not is_temporary(name):  # a file chat's: nobody else's to see
                    found.setdefault(name, {})[version] = info
            configured = (await handle.describe.remote()).get("generation", {})
            generation[version] = {"backend": configured.get("backend"), "model": configured.get("model")}
        return [{"id": n, "object": "model", "created": 0, "owned_by": "rag-serve", "retrieval": found[n],
                 "generation": {v: generation[v] for v in found[n]}} for n in sorted(found)]

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise ServiceUnavailableError("the service is draining for a stop; send new requests elsewhere")

    def prime(self, version: str, cold_stages: list[str] | None = None) -> None:
        """Open the route to `version` before it gets a user's request (blocking: the readiness thread).
        A version with stages at zero replicas is woken instead (a rollout's canary, say): waiting for
        its cold start here would hold up every other version's readiness."""
        if cold_stages:
            self._wake(version, cold_stages, "route")
            return
        self.handles.prime(version, self.config.first_event_timeout_s)


class AnswerStream:
    """A version's answer as it arrives: batches of events over a Serve streaming response."""

    def __init__(self, response: Any) -> None:
        self._response = response
        self._held: list[AnswerEvent] = []
        self.cold = False  # it waited for a stage to start from zero replicas
        self.shadow: ShadowCopy | None = None  # the copy of this question on a rollout's candidate
        self.evaluation = False  # a golden-set question for a named version: not user traffic

    def saw(self, event: AnswerEvent) -> None:
        if self.shadow:
            self.shadow.saw(event)

    def ended(self, status: str, first_token_s: float | None) -> None:
        if self.shadow:
            self.shadow.ended(status, first_token_s)

    async def start(self, timeout_s: float) -> AnswerStart:
        """Wait for the first batch; its first event must be the sources."""
        first, *self._held = await asyncio.wait_for(self._response.__anext__(), timeout_s)
        if not isinstance(first, AnswerStart):
            raise TypeError(f"an answer began with {type(first).__name__}, not AnswerStart")
        return first

    async def batches(self) -> AsyncIterator[list[AnswerEvent]]:
        if self._held:
            yield self._held
        async for batch in self._response:
            yield batch

    def cancel(self) -> None:
        _cancel_quietly(self._response)


class ShadowCopy:
    """The user's side of a shadow pair: the answer as it is relayed, whole when it ends."""

    def __init__(self, first: AnswerStart) -> None:
        self._passages = first.passages
        self._texts: list[str] = []
        # None: the user's answer did not end whole (the client left), so there is nothing to compare.
        self.result: asyncio.Future[AnswerRecord | None] = asyncio.get_running_loop().create_future()

    def saw(self, event: AnswerEvent) -> None:
        if isinstance(event, AnswerDelta):
            self._texts.append(event.text)

    def ended(self, status: str, first_token_s: float | None) -> None:
        if not self.result.done():
            self.result.set_result(None if status == "client_closed" else
                                   answer_record(status, first_token_s, self._passages, "".join(self._texts)))


def _cancel_quietly(stream: Any) -> None:
    # cancel() can re-raise the routing error of a request that never reached a replica.
    try:
        stream.cancel()
    except Exception as exc:
        logger.debug("cancel raised %r", exc)
