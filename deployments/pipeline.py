"""A pipeline version's entry point: runs `rag.pipeline.RagPipeline` over handles to its stages."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.replica import lifecycle_log
from rag.config import PipelineConfig
from rag.lifecycle import InFlight
from rag.pipeline import RagPipeline
from rag.records import AnswerEvent, GenerationChunk, GenerationRequest, Passage, Question


@serve.deployment(name="Pipeline")
class PipelineDeployment:
    def __init__(self, config: PipelineConfig, embedder: DeploymentHandle, retriever: DeploymentHandle,
                 generator: DeploymentHandle) -> None:
        self._config = config
        self._embedder = embedder
        self._retriever = retriever
        self._generator = generator.options(stream=True)
        self._pipeline = RagPipeline(config, self._embed, self._search, self._generate)
        self._log = lifecycle_log(config.version)
        self._in_flight = InFlight()
        self._log.event("READY", stages="Embedder,Retriever,Generator")

    async def answer(self, question: Question) -> AsyncIterator[AnswerEvent]:
        self._log.first_traffic()
        with self._in_flight.track():
            async for event in self._pipeline.answer(question):
                yield event

    async def search(self, question: Question) -> list[Passage]:
        self._log.first_traffic()
        with self._in_flight.track():
            return await self._pipeline.retrieve(question)

    async def knowledge_bases(self) -> dict[str, int]:
        return await self._retriever.knowledge_bases.remote()

    def in_flight(self) -> int:
        return self._in_flight.count

    async def _embed(self, text: str) -> np.ndarray:
        return await self._embedder.embed.remote(text)

    async def _search(self, knowledge_base: str, vector: np.ndarray, top_k: int | None,
                      score_threshold: float | None) -> list[Passage]:
        return await self._retriever.search.remote(knowledge_base, vector, top_k, score_threshold)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        async for chunk in self._generator.generate.remote(request):
            yield chunk
