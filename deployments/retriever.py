"""Retriever stage: FAISS search over the knowledge-base index versions this pipeline pins."""

from __future__ import annotations

import numpy as np
from ray import serve

from deployments.replica import lifecycle_log, start_stage, stop_stage
from rag.config import PipelineConfig
from rag.lifecycle import InFlight
from rag.records import Passage
from rag.retrieval import Retriever


@serve.deployment(name="Retriever")
class RetrieverDeployment:
    async def __init__(self, config: PipelineConfig) -> None:  # type: ignore[misc]
        self._retriever = Retriever(config.retrieval, config.embedding.model)
        self._log = lifecycle_log(config.version)
        self._in_flight = InFlight()
        kbs = ",".join(f"{k}@{v}" for k, v in config.retrieval.knowledge_bases.items())
        await start_stage(self._log, f"faiss indexes {kbs} on {self._retriever.device}",
                          self._retriever.load, self._retriever.warmup, config.lifecycle.warmup_delay_s)
        self._log.event("INDEXES", loaded=self._retriever.knowledge_bases())

    def search(self, knowledge_base: str, vector: np.ndarray, top_k: int | None,
               score_threshold: float | None) -> list[Passage]:
        self._log.first_traffic()
        with self._in_flight.track():
            return self._retriever.search(knowledge_base, vector, top_k, score_threshold)

    def knowledge_bases(self) -> dict[str, int]:
        return self._retriever.knowledge_bases()

    def check_health(self) -> None:
        self._retriever.check_health()

    def __del__(self) -> None:
        stop_stage(self._log, self._in_flight, self._retriever.close)
