"""Retriever stage: FAISS search over the knowledge-base index versions this pipeline pins."""

from __future__ import annotations

import time

import numpy as np
from ray import serve

from deployments.replica import ReplicaLifecycle
from rag.config import PipelineConfig
from rag.records import Passage
from rag.retrieval import Retriever


@serve.deployment(name="Retriever")
class RetrieverDeployment:
    async def __init__(self, config: PipelineConfig) -> None:  # type: ignore[misc]
        self._retriever = Retriever(config.retrieval, config.embedding.model)
        self._life = ReplicaLifecycle(config.version)
        kbs = ",".join(f"{k}@{v}" for k, v in config.retrieval.knowledge_bases.items())
        await self._life.start(f"faiss indexes {kbs} on {self._retriever.device}",
                               self._retriever.load, self._retriever.warmup, config.lifecycle.warmup_delay_s)
        self._life.log.event("INDEXES", loaded=self._retriever.knowledge_bases())

    def search(self, knowledge_base: str, vector: np.ndarray, top_k: int | None,
               score_threshold: float | None) -> list[Passage]:
        self._life.log.first_traffic()
        with self._life.in_flight.track():
            began = time.perf_counter()
            passages = self._retriever.search(knowledge_base, vector, top_k, score_threshold)
            self._life.metrics.vector_search.observe((time.perf_counter() - began) * 1000,
                                                     tags={"knowledge_base": knowledge_base})
            return passages

    def knowledge_bases(self) -> dict[str, int]:
        return self._retriever.knowledge_bases()

    def check_health(self) -> None:
        self._retriever.check_health()

    def __del__(self) -> None:
        self._life.stop(self._retriever.close)
