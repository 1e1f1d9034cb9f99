"""Embedder stage: concurrent questions share one forward pass; ingest has a lane of its own."""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from deployments.stages.replica_lifecycle import ReplicaLifecycle
from rag.coalescing import Coalescer
from rag.config import PipelineConfig
from rag.embedding import TextEmbedder, check_text


@serve.deployment(name="Embedder")
class EmbedderDeployment:
    async def __init__(self, config: PipelineConfig) -> None:  # type: ignore[misc]
        self._embedder = TextEmbedder(config.embedding)
        self._life = ReplicaLifecycle(config.version)
        # Questions of concurrent requests share a forward pass; a lone one runs at once (rag.coalescing).
        self._questions: Coalescer[str, np.ndarray] = Coalescer(
            self._embed_batch, config.embedding.max_batch_size, config.embedding.batch_wait_timeout_s)
        await self._life.start(f"embedding model {config.embedding.model} on {self._embedder.runtime} "
                               f"({self._embedder.device})",
                               self._embedder.load, self._embedder.warmup, config.lifecycle.warmup_delay_s)

    async def embed(self, text: str, query: bool = True) -> np.ndarray:
        """One request's text, checked alone before it joins a batch with other requests' texts; a
        question (`query`) gets the model's query instruction first."""
        check_text(text)
        return await self._questions(self._embedder.query_text(text) if query else text)

    async def embed_many(self, texts: list[str]) -> np.ndarray:
        """Many texts at once, for ingest: already a batch, so it skips the query batcher and runs on the
        ingest lane in a thread (its own graph and cores), so questions are served beside it."""
        self._life.log.first_traffic()
        with self._life.in_flight.track():
            return await asyncio.to_thread(self._embedder.embed_bulk, texts)

    async def count_tokens(self, texts: list[str]) -> int:
        return await asyncio.to_thread(self._embedder.count_tokens, texts)

    def describe(self) -> dict[str, object]:
        return {"model": self._embedder.model_name, "dimension": self._embedder.dimension,
                "runtime": self._embedder.describe()}

    async def _embed_batch(self, texts: list[str]) -> list[np.ndarray | Exception]:
        # A failure is returned per item, not raised: a raise here would fail every request in the batch.
        self._life.log.first_traffic()
        with self._life.in_flight.track():
            return await asyncio.to_thread(self._embedder.embed_each, texts)

    def check_health(self) -> None:
        self._embedder.check_health()

    def ping(self) -> None:
        """Nothing: the gateway sends it to wake this stage from zero replicas, beside the others."""

    def __del__(self) -> None:
        self._life.stop(self._embedder.close)
