"""The `openai` generation backend against real OpenAI-compatible servers: `transformers serve` on a tiny
random model (streaming, usage, the model check), and a scripted one for what a real server will not do on
demand (429, 400, stalls, a stream cut mid-answer, counting streams closed early)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from rag.config import GenerationConfig
from rag.errors import GenerationError, InvalidRequestError, RateLimitedError, ServiceUnavailableError
from rag.generation import build_generator
from rag.records import GenerationChunk, GenerationRequest, Passage
from rag.upstream import OpenAIGenerator
from tests.rag.test_generation import CHAT_TEMPLATE, _save_model
from tests.support.upstream import Script, scripted_upstream, transformers_upstream

PASSAGES = [Passage(0, "Paris is the capital of France.", "france.md", 0.9)]


def _request(max_new_tokens: int = 8, max_seconds: float = 30.0) -> GenerationRequest:
    return GenerationRequest(question="What is the capital of France?", passages=PASSAGES,
                             max_new_tokens=max_new_tokens, temperature=0.5, max_seconds=max_seconds)


def _generator(base_url: str, model: str, **overrides: Any) -> OpenAIGenerator:
    generator = build_generator(GenerationConfig(backend="openai", base_url=base_url, model=model, **overrides))
    assert isinstance(generator, OpenAIGenerator)
    generator.load()
    return generator


async def _collect(generator: OpenAIGenerator, request: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in generator.stream(request)]


@pytest.fixture(scope="module")
def real_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    root = tmp_path_factory.mktemp("upstream")
    model = _save_model(root / "tiny", chat_template=CHAT_TEMPLATE, allow="words")
    with transformers_upstream(model, root / "serve.log") as upstream:
        yield upstream.base_url, str(model)


def test_streams_from_a_real_upstream_with_its_usage(real_upstream: tuple[str, str]) -> None:
    base_url, model = real_upstream
    generator = _generator(base_url, model, warmup_tokens=2)

    async def scenario() -> tuple[dict[str, float], list[GenerationChunk]]:
        timings, chunks = await generator.warmup(), await _collect(generator, _request(max_new_tokens=6))
        await generator.probe()
        return timings, chunks

    timings, chunks = asyncio.run(scenario())
    assert timings["probe_s"] > 0
    assert "".join(c.text for c in chunks).strip() and chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 6  # the upstream's own count


def test_a_model_the_upstream_does_not_serve_fails_the_warm_up_by_name(real_upstream: tuple[str, str]) -> None:
    base_url, _ = real_upstream
    generator = _generator(base_url, "qwen2.5-7b-instruct")
    with pytest.raises(ServiceUnavailableError, match=r"does not serve model .qwen2\.5-7b-instruct.; it serves"):
        asyncio.run(generator.warmup())


def test_an_upstream_that_is_not_there_fails_the_warm_up_and_then_the_health_checks() -> None:
    generator = _generator("http://127.0.0.1:9/v1", "m", health_misses=2, connect_timeout_s=1)

    async def scenario() -> None:
        with pytest.raises(ServiceUnavailableError, match=r"the upstream of model 'm' is unavailable"):
            await generator.warmup()
        await generator.probe()  # one miss is not yet a failure
        with pytest.raises(ServiceUnavailableError, match="failed 2 checks in a row"):
            await generator.probe()

    asyncio.run(scenario())


def test_prompt_parameters_key_and_headers_reach_the_upstream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script()
    (tmp_path / "key").write_text("sk-upstream-1\n")
    with scripted_upstream(script) as base_url:
        generator = _generator(base_url, script.model, api_key_file=tmp_path / "key", top_p=0.8,
                               headers={"x-team": "search"})
        reported: list[tuple[str, float | None, int]] = []
        generator.report = lambda *outcome: reported.append(outcome)
        chunks = asyncio.run(_collect(generator, _request(max_new_tokens=5)))
        monkeypatch.setenv("UPSTREAM_KEY", "sk-upstream-2")
        asyncio.run(_collect(_generator(base_url, script.model, api_key_env="UPSTREAM_KEY"), _request()))
    sent = script.requests[0]
    assert sent["model"] == "scripted-model" and sent["stream"] is True and sent["max_tokens"] == 5
    assert (sent["temperature"], sent["top_p"], sent["authorization"]) == (0.5, 0.8, "Bearer sk-upstream-1")
    assert "Paris is the capital of France." in sent["messages"][-1]["content"]  # the same prompt as the others
    assert script.requests[1]["authorization"] == "Bearer sk-upstream-2"
    assert [c.text for c in chunks[:-1]] == [f" word{i}" for i in range(5)]
    assert (chunks[-1].finish_reason, chunks[-1].completion_tokens) == ("stop", 10)
    [(result, first_token_s, tokens)] = reported  # what the replica's metrics get, labelled by model there
    assert result == "ok" and first_token_s is not None and first_token_s > 0 and tokens == 10


def test_upstream_refusals_map_to_this_services_errors() -> None:
    script = Script(status=429, error="slow down", retry_after="7")
    with scripted_upstream(script) as base_url:
        generator = _generator(base_url, script.model)
        reported: list[str] = []
        generator.report = lambda result, *_: reported.append(result)

        async def scenario() -> None:  # one event loop, as in a replica: the client's pool belongs to it
            with pytest.raises(RateLimitedError) as limited:
                await _collect(generator, _request())
            assert limited.value.retry_after_s == 7.0
            script.status, script.error = 400, "This model's maximum context length is 4096 tokens"
            with pytest.raises(InvalidRequestError, match="maximum context length is 4096 tokens"):
                await _collect(generator, _request())
            script.status = 503
            with pytest.raises(ServiceUnavailableError, match="HTTP 503"):
                await _collect(generator, _request())

        asyncio.run(scenario())
    assert reported == ["rate_limited", "refused", "unavailable"]


def test_a_stream_cut_mid_answer_is_a_generation_error_after_its_text() -> None:
    script = Script(cut_after=3)
    with scripted_upstream(script) as base_url:
        generator = _generator(base_url, script.model)

        async def scenario() -> list[str]:
            seen = []
            with pytest.raises(GenerationError, match="broke off mid-answer"):
                async for chunk in generator.stream(_request()):
                    seen.append(chunk.text)
            return seen

        assert asyncio.run(scenario()) == [" word0", " word1", " word2"]


def test_deadlines_first_token_and_the_answers_own_time() -> None:
    script = Script(first_delay_s=3)
    with scripted_upstream(script) as base_url:
        stalled = _generator(base_url, script.model, first_token_timeout_s=0.5)
        began = time.monotonic()
        with pytest.raises(ServiceUnavailableError, match="no answer in time"):
            asyncio.run(_collect(stalled, _request()))
        assert time.monotonic() - began < 2.5
        script.first_delay_s, script.delay_s, script.words = 0, 0.4, 50
        chunks = asyncio.run(_collect(_generator(base_url, script.model), _request(max_new_tokens=50, max_seconds=1)))
    assert chunks[-1].finish_reason == "length" and 1 <= sum(1 for c in chunks if c.text) <= 4


def test_a_client_that_goes_away_closes_the_upstream_stream() -> None:
    script = Script(words=200, delay_s=0.05)
    with scripted_upstream(script) as base_url:
        generator = _generator(base_url, script.model)

        async def scenario() -> None:
            stream = generator.stream(_request(max_new_tokens=200))
            async for chunk in stream:
                if chunk.text == " word2":
                    break
            await stream.aclose()  # what the pipeline does when its client leaves

        asyncio.run(scenario())
        deadline = time.monotonic() + 5
        while script.closed_early == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert script.closed_early == 1 and script.finished == 0


def test_the_config_names_where_the_key_is_never_the_key() -> None:
    with pytest.raises(ValidationError, match="base_url"):
        GenerationConfig(backend="openai", model="m")
    with pytest.raises(ValidationError, match="must not carry a key"):
        GenerationConfig(backend="openai", model="m", base_url="http://h/v1", headers={"Authorization": "Bearer x"})
    with pytest.raises(ServiceUnavailableError, match=r"RAG_TEST_UNSET_VARIABLE \(generation\.api_key_env\) is not"):
        _generator("http://127.0.0.1:9/v1", "m", api_key_env="RAG_TEST_UNSET_VARIABLE")  # a start-up error


def test_a_rate_limit_keeps_its_retry_after_across_replicas() -> None:
    import pickle

    crossed = pickle.loads(pickle.dumps(RateLimitedError("the upstream is rate limiting (429)", 7.0)))
    assert isinstance(crossed, RateLimitedError) and crossed.retry_after_s == 7.0 and "429" in str(crossed)
