"""Generator stage: streams answer pieces from the configured backend."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray import serve

from deployments.replica import ReplicaLifecycle
from rag.config import PipelineConfig
from rag.generation import build_generator
from rag.records import GenerationChunk, GenerationRequest


@serve.deployment(name="Generator")
class GeneratorDeployment:
    async def __init__(self, config: PipelineConfig) -> None:  # type: ignore[misc]
        self._generator = build_generator(config.generation)
        self._life = ReplicaLifecycle(config.version)
        what = f"{config.generation.backend} generator {config.generation.model or ''}".strip()
        await self._life.start(what, self._generator.load, self._generator.warmup, config.lifecycle.warmup_delay_s)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self._life.log.first_traffic()
        with self._life.in_flight.track():
            async for chunk in self._generator.stream(request):
                if chunk.text:
                    self._life.metrics.tokens.inc()
                yield chunk

    def check_health(self) -> None:
        self._generator.check_health()

    def __del__(self) -> None:
        self._life.stop(self._generator.close)
