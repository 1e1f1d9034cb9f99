"""Generator stage: streams answer pieces from the configured backend."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray import serve

from deployments.replica import lifecycle_log, start_stage, stop_stage
from rag.config import PipelineConfig
from rag.generation import build_generator
from rag.lifecycle import InFlight
from rag.records import GenerationChunk, GenerationRequest


@serve.deployment(name="Generator")
class GeneratorDeployment:
    async def __init__(self, config: PipelineConfig) -> None:  # type: ignore[misc]
        self._generator = build_generator(config.generation)
        self._log = lifecycle_log(config.version)
        self._in_flight = InFlight()
        what = f"{config.generation.backend} generator {config.generation.model or ''}".strip()
        await start_stage(self._log, what, self._generator.load, self._generator.warmup,
                          config.lifecycle.warmup_delay_s)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self._log.first_traffic()
        with self._in_flight.track():
            async for chunk in self._generator.stream(request):
                yield chunk

    def check_health(self) -> None:
        self._generator.check_health()

    def __del__(self) -> None:
        stop_stage(self._log, self._in_flight, self._generator.close)
