"""The transformers Generator as a real Serve replica, beside the gateway's cluster: concurrent streams
through its handle are batched in one replica and each gets exactly the answer it gets alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rag.config import GenerationConfig, PipelineConfig
from rag.generation import TransformersGenerator
from rag.records import GenerationRequest
from tests.rag.test_batching import QUESTIONS
from tests.rag.test_generation import PASSAGES, _save_model
from tests.support.service import LocalService

pytestmark = pytest.mark.cluster


def _requests() -> list[GenerationRequest]:
    return [GenerationRequest(question=q, passages=PASSAGES[: 1 + i % 3], max_new_tokens=10 + 3 * i,
                              temperature=0.0) for i, q in enumerate(QUESTIONS)]


def _in_process(config: GenerationConfig, requests: list[GenerationRequest]) -> list[str]:
    generator = TransformersGenerator(config)
    generator.load()

    async def solo() -> list[str]:
        await generator.warmup()
        return ["".join([c.text async for c in generator.stream(r)]) for r in requests]

    try:
        return asyncio.run(solo())
    finally:
        generator.close()


def test_concurrent_streams_through_the_replica_match_solo_answers(service: LocalService, tmp_path: Path) -> None:
    from ray import serve

    from deployments.stages.generator_deployment import GeneratorDeployment

    model = _save_model(tmp_path / "tiny-llama", chat_template=None, allow="words")
    config = GenerationConfig(backend="transformers", model=str(model), device="cpu", max_batch_streams=8)
    requests = _requests()
    expected = _in_process(config, requests)
    app = GeneratorDeployment.options(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16)
    handle = serve.run(app.bind(PipelineConfig(version="tiny", generation=config)), name="tiny-llm",
                       route_prefix=None).options(stream=True)
    try:
        async def together() -> list[tuple[str, str | None]]:
            async def one(request: GenerationRequest) -> tuple[str, str | None]:
                text, finish = "", None
                async for batch in handle.generate.remote(request):
                    text += "".join(c.text for c in batch)
                    finish = batch[-1].finish_reason if batch else finish
                return text, finish

            return list(await asyncio.gather(*(one(r) for r in requests)))

        answers = asyncio.run(together())
    finally:
        serve.delete("tiny-llm")
    assert [text for text, _ in answers] == expected
    assert {finish for _, finish in answers} == {"length"}
