"""A pipeline version's entry point: runs `rag.pipeline.RagPipeline` over handles to its stages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.stages.replica_lifecycle import ReplicaLifecycle
from rag.config import PipelineConfig
from rag.pipeline import RagPipeline
from rag.records import AnswerEvent, GenerationChunk, GenerationRequest, Passage, Question
from rag.streams import batched


@serve.deployment(name="Pipeline")
class PipelineDeployment:
    async def __init__(  # type: ignore[misc]
            self, config: PipelineConfig, embedder: DeploymentHandle, retriever: DeploymentHandle,
            generator: DeploymentHandle) -> None:
        self._config = config
        self._embedder = embedder
        self._retriever = retriever
        self._generator = generator.options(stream=True)
        self._pipeline = RagPipeline(config, self._embed, self._search, self._generate)
        self._life = ReplicaLifecycle(config.version)
        # Nothing of its own to load; the warm-up is one probe question through the three handles, so
        # the first user request finds their routers populated instead of paying for that itself.
        await self._life.start("handles to Embedder, Retriever, Generator", lambda: None, self._pipeline.warmup)

    async def answer(self, question: Question) -> AsyncIterator[list[AnswerEvent]]:
        """Answer events in batches, as the Generator sends them. The sources (`AnswerStart`) and the first
        piece of the answer each go at once: a window opened by the first piece would hold back the time to
        first token by up to `stream_batch_window_s` (20 ms)."""
        self._life.log.first_traffic()
        with self._life.in_flight.track():
            async for batch in batched(self._pipeline.answer(question), self._config.generation.stream_batch_window_s,
                                       immediate=2):
                yield batch

    async def search(self, question: Question) -> list[Passage]:
        self._life.log.first_traffic()
        with self._life.in_flight.track():
            return await self._pipeline.retrieve(question)

    async def knowledge_bases(self) -> dict[str, int]:
        return await self._retriever.knowledge_bases.remote()

    async def retrieval_modes(self) -> dict[str, dict[str, Any]]:
        """Per KB: index version, language, and the retrieval its questions get, with why."""
        return await self._retriever.describe.remote()

    def describe(self) -> dict[str, Any]:
        """This version's settings, for the knowledge-base manager (kb_root, splitter, embedding model)."""
        return self._config.model_dump(mode="json")

    def in_flight(self) -> int:
        return self._life.in_flight.count

    def ping(self) -> None:
        """Nothing: the gateway sends it to wake this stage from zero replicas, beside the others."""

    def __del__(self) -> None:
        self._life.stop(lambda: None)

    async def _embed(self, text: str) -> np.ndarray:
        return await self._embedder.embed.remote(text)

    async def _search(self, knowledge_base: str, vector: np.ndarray, top_k: int | None,
                      score_threshold: float | None, text: str | None = None) -> list[Passage]:
        return await self._retriever.search.remote(knowledge_base, vector, top_k, score_threshold, text)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        # The Generator's handle is bound with stream=True, so remote() gives the async generator Ray's
        # typing does not narrow to.
        async for batch in self._generator.generate.remote(request):  # type: ignore[union-attr]
            for chunk in batch:
                yield chunk
