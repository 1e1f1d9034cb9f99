"""Generator stage: streams answer pieces from the configured backend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from ray import serve

from deployments.stages.replica_lifecycle import ReplicaLifecycle
from rag.config import PipelineConfig
from rag.generation import build_generator
from rag.records import GenerationChunk, GenerationRequest
from rag.streams import batched, join_text


@serve.deployment(name="Generator")
class GeneratorDeployment:
    async def __init__(self, config: PipelineConfig) -> None:  # type: ignore[misc]
        self._generator = build_generator(config.generation)
        self._window_s = config.generation.stream_batch_window_s
        self._life = ReplicaLifecycle(config.version)
        if config.generation.backend == "openai":  # its requests to the upstream, labelled by model
            # Imported here: the openai client is most of this module's import time, which every replica
            # start (a cold start from zero among them) would pay for nothing on the other backends.
            from rag.upstream import OpenAIGenerator

            assert isinstance(self._generator, OpenAIGenerator)
            model = str(config.generation.model)
            self._generator.report = lambda result, first_token_s, tokens: self._life.metrics.upstream_result(
                model, result, first_token_s, tokens)
        what = f"{config.generation.backend} generator {config.generation.model or ''}".strip()
        await self._life.start(what, self._generator.load, self._generator.warmup, config.lifecycle.warmup_delay_s)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[list[GenerationChunk]]:
        """Chunks in batches: the first alone (time to first token), then what arrives within the
        configured window, so a fast stream does not pay one inter-process message per piece; a batch's
        text pieces go as one piece (`join_text`), which counts them for the usage."""
        self._life.log.first_traffic()
        sent, began = 0, time.monotonic()
        with self._life.in_flight.track():
            try:
                async for batch in batched(self._generator.stream(request), self._window_s):
                    if pieces := sum(1 for chunk in batch if chunk.text):
                        self._life.metrics.tokens.inc(pieces)
                        sent += pieces
                    yield join_text(batch)
            except (asyncio.CancelledError, GeneratorExit):
                # The client went away (or a caller upstream gave up): closing `batched` has closed
                # the backend's stream, so the model stops; say how far it got.
                self._life.log.event("CANCELLED", pieces_sent=sent, after_s=time.monotonic() - began)
                raise

    async def check_health(self) -> None:
        await self._generator.probe()

    def ping(self) -> None:
        """Nothing: the gateway sends it to wake this stage from zero replicas, beside the others."""

    def __del__(self) -> None:
        self._life.stop(self._generator.close)
