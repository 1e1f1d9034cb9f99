"""Retriever stage: FAISS search over the knowledge-base index versions this pipeline pins or follows."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import numpy as np
from ray import serve

from deployments.stages.index_follower import follow_forever, reader_id_for
from deployments.stages.replica_lifecycle import ReplicaLifecycle
from rag.config import PipelineConfig
from rag.records import Passage
from rag.retrieval import Change, Retriever


@serve.deployment(name="Retriever")
class RetrieverDeployment:
    async def __init__(self, config: PipelineConfig) -> None:  # type: ignore[misc]
        ctx = serve.get_replica_context()
        self._retriever = Retriever(config.retrieval, config.embedding.vector_space,
                                    reader_id_for(ctx.app_name, ctx.replica_id.unique_id),
                                    model_languages=config.embedding.languages)
        self._life = ReplicaLifecycle(config.version)
        kbs = ",".join(f"{k}@{v}" for k, v in config.retrieval.knowledge_bases.items())
        await self._life.start(f"faiss indexes {kbs} on {self._retriever.device}",
                               self._retriever.load, self._retriever.warmup, config.lifecycle.warmup_delay_s)
        self._life.log.event("INDEXES", loaded=self._retriever.knowledge_bases())
        # Started after warm-up, so the first switch can only come after the replica is ready.
        self._follower = asyncio.create_task(follow_forever(
            self._retriever.refresh, config.retrieval.heartbeat_interval_s, self._log_switch))

    def search(self, knowledge_base: str, vector: np.ndarray, top_k: int | None,
               score_threshold: float | None, text: str | None = None) -> list[Passage]:
        self._life.log.first_traffic()
        with self._life.in_flight.track():
            began = time.perf_counter()
            passages = self._retriever.search(knowledge_base, vector, top_k, score_threshold, text)
            self._life.metrics.vector_search.observe((time.perf_counter() - began) * 1000,
                                                     tags={"knowledge_base": knowledge_base})
            return passages

    def knowledge_bases(self) -> dict[str, int]:
        return self._retriever.knowledge_bases()

    def describe(self) -> dict[str, dict[str, Any]]:
        return self._retriever.describe()

    def check_health(self) -> None:
        self._retriever.check_health()

    def _log_switch(self, change: Change) -> None:
        knowledge_base, old, new = change
        self._life.log.event("INDEX_SWITCH", knowledge_base=knowledge_base, old=old, new=new)

    def ping(self) -> None:
        """Nothing: the gateway sends it to wake this stage from zero replicas, beside the others."""

    def __del__(self) -> None:
        # A constructor that failed (an index that would not load) started no follower.
        follower = getattr(self, "_follower", None)
        if follower is not None:
            # Thread-safe: Serve may call __del__ off the replica's event loop.
            with contextlib.suppress(RuntimeError):  # that loop is already closed
                follower.get_loop().call_soon_threadsafe(follower.cancel)
        # A refresh still running in its thread cannot be cancelled; close() makes it drop what it loads.
        self._life.stop(self._retriever.close)
