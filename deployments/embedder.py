"""Embedder stage: batches concurrent queries into one forward pass."""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from deployments.replica import ReplicaLifecycle
from rag.config import PipelineConfig
from rag.embedding import TextEmbedder


@serve.deployment(name="Embedder")
class EmbedderDeployment:
    async def __init__(self, config: PipelineConfig) -> None:  # type: ignore[misc]
        self._embedder = TextEmbedder(config.embedding)
        self._life = ReplicaLifecycle(config.version)
        self.embed.set_max_batch_size(config.embedding.max_batch_size)
        self.embed.set_batch_wait_timeout_s(config.embedding.batch_wait_timeout_s)
        await self._life.start(f"embedding model {config.embedding.model} on {self._embedder.device}",
                               self._embedder.load, self._embedder.warmup, config.lifecycle.warmup_delay_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def embed(self, texts: list[str]) -> list[np.ndarray]:
        self._life.log.first_traffic()
        with self._life.in_flight.track():
            vectors = await asyncio.to_thread(self._embedder.embed, texts)
        return list(vectors)

    def check_health(self) -> None:
        self._embedder.check_health()

    def __del__(self) -> None:
        self._life.stop(self._embedder.close)
