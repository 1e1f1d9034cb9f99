"""Question → embed → retrieve → generate, as one stream of answer events.

The pipeline only sees three async callables, so the same code runs with the stages in this
process (`rag.local_pipeline`, used by tests, scripts and benchmarks) or behind Ray Serve handles. This
module imports none of the stages: a Pipeline replica, which reaches them through handles, loads no
index, model runtime or FAISS.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import numpy as np

from rag.config import PipelineConfig
from rag.errors import GenerationError, InvalidRequestError
from rag.faults import FaultInjector
from rag.generation import PROBE
from rag.records import (
    AnswerDelta,
    AnswerEnd,
    AnswerEvent,
    AnswerStart,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    Passage,
    Question,
)

EmbedQuery = Callable[[str], Awaitable[np.ndarray]]


class SearchPassages(Protocol):
    def __call__(self, knowledge_base: str, vector: np.ndarray, top_k: int | None,
                 score_threshold: float | None, text: str | None = None) -> Awaitable[list[Passage]]: ...


GenerateAnswer = Callable[[GenerationRequest], AsyncIterator[GenerationChunk]]


class RagPipeline:
    """Answers questions over the knowledge bases of one pipeline version."""

    def __init__(self, config: PipelineConfig, embed: EmbedQuery, search: SearchPassages,
                 generate: GenerateAnswer) -> None:
        self.config = config
        self._embed = embed
        self._search = search
        self._generate = generate
        self._faults = FaultInjector(config.faults)

    async def retrieve(self, question: Question) -> list[Passage]:
        if not question.text.strip():
            raise InvalidRequestError("the question is empty")
        vector = await self._embed(question.text)
        return await self._search(question.knowledge_base, vector, question.top_k, question.score_threshold,
                                  question.text)

    async def warmup(self) -> None:
        """One probe question through every stage, in a request's order and without injected faults.

        Run over remote stages, it opens each connection the first user request would otherwise
        have to open, so a new version's first answers are as fast as its later ones.
        """
        question = "What does the warm-up probe check?"
        vector = await self._embed(question)
        first_kb = next(iter(self.config.retrieval.knowledge_bases))  # the schema requires one at least
        passages = await self._search(first_kb, vector, 1, None, question)
        request = GenerationRequest(question=question, passages=passages or [PROBE],
                                    max_new_tokens=self.config.generation.warmup_tokens,
                                    max_seconds=self.config.generation.max_stream_seconds)
        if not any([chunk.text async for chunk in self._generate(request)]):
            raise GenerationError("the warm-up answer through the pipeline produced no text")

    async def answer(self, question: Question) -> AsyncIterator[AnswerEvent]:
        """Sources first, then answer text, then the finish reason: the order clients render in.

        The sources are held back until the generator has produced its first chunk, so a generator
        that cannot start fails this call before any event is sent, when the caller can still retry.
        """
        await self._faults.before_answer()
        passages = await self.retrieve(question)
        chunks = aiter(self._generate(self._generation_request(question, passages)))
        try:
            chunk = await anext(chunks, None)
            yield AnswerStart(question.knowledge_base, passages, self.config.version)
            finish: FinishReason = "stop"
            pieces, counted = 0, None
            while chunk is not None:
                if chunk.text:
                    pieces += chunk.pieces
                    yield AnswerDelta(chunk.text)
                if chunk.finish_reason is not None:
                    finish = chunk.finish_reason
                if chunk.completion_tokens is not None:
                    counted = chunk.completion_tokens
                chunk = await anext(chunks, None)
            yield AnswerEnd(finish, pieces if counted is None else counted, self.config.version)
        finally:
            # A client that went away closes this generator: close the generation too, so a model
            # stops producing tokens nobody reads.
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()

    def _generation_request(self, question: Question, passages: list[Passage]) -> GenerationRequest:
        cfg = self.config.generation
        # The configured maximum bounds every stream, so no stream can outlive a replica's drain.
        limit = cfg.max_new_tokens if question.max_new_tokens is None else min(question.max_new_tokens,
                                                                                cfg.max_new_tokens)
        return GenerationRequest(
            question=question.text, passages=passages, history=question.history, max_new_tokens=limit,
            temperature=cfg.temperature if question.temperature is None else question.temperature,
            max_seconds=cfg.max_stream_seconds)
