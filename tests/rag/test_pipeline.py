"""LocalPipeline end to end: real embeddings, real FAISS/SQLite index of the sample KB, extractive answers."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest

from rag.config import FaultConfig, GenerationConfig, PipelineConfig, RetrievalConfig
from rag.embedding import TextEmbedder
from rag.errors import GenerationError, InvalidRequestError, KnowledgeBaseNotFoundError, ServiceUnavailableError
from rag.faults import InjectedFault
from rag.local_pipeline import LocalPipeline
from rag.pipeline import RagPipeline
from rag.records import (
    AnswerDelta,
    AnswerEnd,
    AnswerEvent,
    AnswerStart,
    ChatTurn,
    GenerationChunk,
    GenerationRequest,
    Passage,
    Question,
)


def _local(kb_root: Path, embedder: TextEmbedder, **generation: object) -> LocalPipeline:
    """A pipeline over the session KB that borrows the session's loaded embedder (never closes it)."""
    cfg = PipelineConfig(retrieval=RetrievalConfig(kb_root=kb_root), generation=GenerationConfig(**generation))
    local = LocalPipeline(cfg)
    local.embedder = embedder
    local.retriever.load()
    local.generator.load()
    return local


def _release(local: LocalPipeline) -> None:
    local.generator.close()
    local.retriever.close()


@pytest.fixture(scope="module")
def local(sample_kb_root: Path, embedder: TextEmbedder) -> Iterator[LocalPipeline]:
    pipeline = _local(sample_kb_root, embedder)
    yield pipeline
    _release(pipeline)


def _answer(local: LocalPipeline, question: Question) -> list[AnswerEvent]:
    async def collect() -> list[AnswerEvent]:
        return [event async for event in local.pipeline.answer(question)]

    return asyncio.run(collect())


def _text(events: list[AnswerEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, AnswerDelta))


def _check_shape(events: list[AnswerEvent]) -> tuple[AnswerStart, list[AnswerDelta], AnswerEnd]:
    start, *middle, end = events
    assert isinstance(start, AnswerStart)
    assert isinstance(end, AnswerEnd)
    assert all(isinstance(e, AnswerDelta) for e in middle)
    assert sum(isinstance(e, AnswerEnd) for e in events) == 1
    assert sum(isinstance(e, AnswerStart) for e in events) == 1
    return start, middle, end  # type: ignore[return-value]


def test_answer_event_order(local: LocalPipeline) -> None:
    events = _answer(local, Question("What does the gateway do with traffic weights?", "samples"))
    start, deltas, end = _check_shape(events)
    assert start.passages
    assert start.knowledge_base == "samples"
    assert start.version == "v1"
    assert deltas
    assert all(d.text for d in deltas)
    assert end.finish_reason == "stop"
    assert end.version == "v1"
    assert end.completion_tokens == len(deltas)


def test_stop_question_retrieves_operations_page_and_cites_it(local: LocalPipeline) -> None:
    # With the default top_k=3 the "## Stopping the service" section of operations.md is outranked by
    # configuration/glossary/upgrading chunks about stopping replicas; the page ranks within the top 8.
    events = _answer(local, Question("How do I stop the service?", "samples", top_k=8))
    start, _, end = _check_shape(events)
    sources = [p.source for p in start.passages]
    assert "operations.md" in sources
    assert len(start.passages) == 8
    text = _text(events)
    cited = {int(n) for n in re.findall(r"\[(\d+)\]", text)}
    assert cited
    assert cited <= set(range(1, len(start.passages) + 1))
    assert end.finish_reason == "stop"


def test_chinese_question_retrieves_chinese_faq(local: LocalPipeline) -> None:
    events = _answer(local, Question("如何升级服务而不中断请求？", "samples"))
    start, _, end = _check_shape(events)
    assert start.passages[0].source == "faq_zh.md"
    text = _text(events)
    assert re.search(r"[\u4e00-\u9fff]", text)
    cited = {int(n) for n in re.findall(r"\[(\d+)\]", text)}
    assert cited
    assert all(start.passages[n - 1].source == "faq_zh.md" for n in cited)
    assert end.finish_reason == "stop"


def test_per_question_token_limit_ends_with_length(local: LocalPipeline) -> None:
    events = _answer(local, Question("How do I upgrade without dropping requests?", "samples", max_new_tokens=5))
    _, deltas, end = _check_shape(events)
    assert end.finish_reason == "length"
    assert 1 <= len(deltas) <= 5
    assert end.completion_tokens == len(deltas)
    full = _answer(local, Question("How do I upgrade without dropping requests?", "samples"))
    assert _text(full).startswith(_text(events))
    assert len(_text(full)) > len(_text(events))


def test_config_limit_bounds_larger_request(sample_kb_root: Path, embedder: TextEmbedder) -> None:
    small = _local(sample_kb_root, embedder, max_new_tokens=3)
    try:
        events = _answer(small, Question("How do I upgrade without dropping requests?", "samples",
                                         max_new_tokens=1000))
        _, deltas, end = _check_shape(events)
        assert end.finish_reason == "length"
        assert len(deltas) == 3
    finally:
        _release(small)


def test_history_and_temperature_do_not_break_answers(local: LocalPipeline) -> None:
    question = Question("And how do I ingest documents?", "samples",
                        history=[ChatTurn("user", "Hi"), ChatTurn("assistant", "Hello!")], temperature=0.0)
    _, deltas, end = _check_shape(_answer(local, question))
    assert deltas
    assert end.finish_reason == "stop"


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_question_is_invalid(local: LocalPipeline, text: str) -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        _answer(local, Question(text, "samples"))


def test_unknown_knowledge_base(local: LocalPipeline) -> None:
    with pytest.raises(KnowledgeBaseNotFoundError, match="'nope'"):
        _answer(local, Question("How do I stop the service?", "nope"))


@pytest.mark.parametrize("top_k", [1, 2, 7])
def test_retrieve_respects_top_k(local: LocalPipeline, top_k: int) -> None:
    passages = asyncio.run(local.pipeline.retrieve(Question("How are documents split?", "samples", top_k=top_k)))
    assert len(passages) == top_k
    assert all(isinstance(p, Passage) for p in passages)
    assert len({p.id for p in passages}) == top_k  # hybrid ranks by the fused score; `score` is the cosine


def test_retrieve_default_top_k_and_threshold(local: LocalPipeline) -> None:
    question = Question("How are documents split?", "samples")
    assert len(asyncio.run(local.pipeline.retrieve(question))) == local.config.retrieval.top_k
    strict = Question("How are documents split?", "samples", top_k=10, score_threshold=0.99)
    assert asyncio.run(local.pipeline.retrieve(strict)) == []


def test_no_passages_answer_says_so(local: LocalPipeline) -> None:
    events = _answer(local, Question("How are documents split?", "samples", score_threshold=0.99))
    start, deltas, end = _check_shape(events)
    assert start.passages == []
    assert deltas
    assert "no information" in _text(events)
    assert end.finish_reason == "stop"


def test_full_lifecycle_with_own_embedder(sample_kb_root: Path) -> None:
    local = LocalPipeline(PipelineConfig(retrieval=RetrievalConfig(kb_root=sample_kb_root)))
    local.load()
    try:
        asyncio.run(local.warmup())
        events = _answer(local, Question("What is a knowledge base?", "samples"))
        assert isinstance(events[-1], AnswerEnd)
    finally:
        local.close()
    with pytest.raises(ServiceUnavailableError):
        local.embedder.check_health()
    with pytest.raises(ServiceUnavailableError):
        local.retriever.check_health()
    with pytest.raises(ServiceUnavailableError):
        local.generator.check_health()


class _Stages:
    """Stand-ins for the remote stages that record what the pipeline asks of them."""

    def __init__(self, text: str = "an answer") -> None:
        self.calls: list[tuple] = []
        self.text = text

    async def embed(self, text: str) -> np.ndarray:
        self.calls.append(("embed", text))
        return np.ones(4, dtype=np.float32)

    async def search(self, kb: str, vector: np.ndarray, top_k: int | None, threshold: float | None,
                     text: str | None = None) -> list[Passage]:
        self.calls.append(("search", kb, top_k))
        return [Passage(id=1, text="Stop it with make stop.", source="ops.md", score=0.9)]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.calls.append(("generate", request.max_new_tokens, [p.source for p in request.passages]))
        yield GenerationChunk(self.text, "stop")


def test_warmup_runs_every_stage_in_request_order_without_injected_faults() -> None:
    stages = _Stages()
    config = PipelineConfig(retrieval=RetrievalConfig(knowledge_bases={"ops": 3, "samples": "latest"}),
                            generation=GenerationConfig(warmup_tokens=3), faults=FaultConfig(error_rate=1.0))
    pipeline = RagPipeline(config, stages.embed, stages.search, stages.generate)
    asyncio.run(pipeline.warmup())
    assert [c[0] for c in stages.calls] == ["embed", "search", "generate"]
    assert stages.calls[1] == ("search", "ops", 1) and stages.calls[2] == ("generate", 3, ["ops.md"])
    # The same pipeline's answers do get the injected fault: the warm-up alone skips it.
    with pytest.raises(InjectedFault):
        asyncio.run(_first(pipeline.answer(Question("How do I stop it?", "ops"))))


def test_warmup_fails_when_the_generator_says_nothing() -> None:
    stages = _Stages(text="")
    pipeline = RagPipeline(PipelineConfig(), stages.embed, stages.search, stages.generate)
    with pytest.raises(GenerationError, match="warm-up"):
        asyncio.run(pipeline.warmup())


async def _first(events: AsyncIterator[AnswerEvent]) -> AnswerEvent:
    return await anext(aiter(events))


def test_joined_pieces_count_as_many_tokens_as_they_joined() -> None:
    """The Generator joins a batch's pieces into one (`join_text`): the answer's usage still counts the
    pieces the backend produced, not the messages they travelled in."""
    async def generate(request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        yield GenerationChunk("Stop")
        yield GenerationChunk(" it with make stop.", pieces=4)
        yield GenerationChunk("", "stop")

    stages = _Stages()
    pipeline = RagPipeline(PipelineConfig(), stages.embed, stages.search, generate)

    async def run() -> list[AnswerEvent]:
        return [e async for e in pipeline.answer(Question("How do I stop it?", "samples"))]

    events = asyncio.run(run())
    assert [e.text for e in events if isinstance(e, AnswerDelta)] == ["Stop", " it with make stop."]
    assert isinstance(events[-1], AnswerEnd) and events[-1].completion_tokens == 5
