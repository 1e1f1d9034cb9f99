"""Concurrent streams sharing forward passes (`rag.batching`), run for real on a tiny random Llama:
batched greedy answers equal solo ones token for token, and one member leaving or failing leaves the
others' answers untouched."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rag.batching import BatchSettings, Sampling, TokenDecoder
from rag.config import GenerationConfig
from rag.errors import GenerationError, InvalidRequestError
from rag.generation import TransformersGenerator, build_generator
from rag.records import GenerationChunk, GenerationRequest, Passage
from tests.rag.test_generation import LONG, PASSAGES, _save_model

QUESTIONS = ["What is the capital of France?", "How do plants use light?", "Is Python easy to read?",
             "Which city lies on the Seine?", "What do the sources cite?", "Paris", "light water sugar",
             "What is the largest city of the country and why do plants need sunlight and water?"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersGenerator]:
    path = _save_model(tmp_path_factory.mktemp("tiny-llama") / "plain", chat_template=None, allow="words")
    generator = build_generator(GenerationConfig(backend="transformers", model=str(path), device="cpu",
                                                 max_new_tokens=LONG, max_batch_streams=16))
    assert isinstance(generator, TransformersGenerator)
    generator.load()
    asyncio.run(generator.warmup())
    yield generator
    generator.close()


def _request(question: str, max_new_tokens: int = 24, **kwargs: Any) -> GenerationRequest:
    passages = PASSAGES[: 1 + len(question) % 3]  # prompts of different lengths
    return GenerationRequest(question=question, passages=passages, max_new_tokens=max_new_tokens,
                             temperature=0.0, **kwargs)


async def _collect(llm: TransformersGenerator, request: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in llm.stream(request)]


def _text(chunks: list[GenerationChunk]) -> str:
    return "".join(c.text for c in chunks)


def _solo(llm: TransformersGenerator, requests: list[GenerationRequest]) -> list[str]:
    return [_text(asyncio.run(_collect(llm, r))) for r in requests]


def test_greedy_batched_answers_equal_solo_answers_token_for_token(llm: TransformersGenerator) -> None:
    requests = [_request(q, max_new_tokens=12 + 4 * i) for i, q in enumerate(QUESTIONS)]
    alone = _solo(llm, requests)

    async def together() -> list[list[GenerationChunk]]:
        return list(await asyncio.gather(*(_collect(llm, r) for r in requests)))

    batched = asyncio.run(together())
    assert [_text(c) for c in batched] == alone
    for request, chunks in zip(requests, batched, strict=True):
        assert llm.count_tokens(_text(chunks)) == request.max_new_tokens
        assert chunks[-1].finish_reason == "length"
    assert len(set(alone)) > 1  # different prompts, different answers: the rows did not mix


def test_cancelling_one_stream_leaves_the_others_intact(llm: TransformersGenerator) -> None:
    requests = [_request(q, max_new_tokens=40) for q in QUESTIONS[:4]]
    alone = _solo(llm, requests)

    async def scenario() -> list[str]:
        results = await asyncio.gather(quit_early(llm, QUESTIONS[4]), *(_collect(llm, r) for r in requests))
        return [_text(chunks) for chunks in results[1:]]

    assert asyncio.run(scenario()) == alone
    assert llm._decoding is not None and llm._decoding.pending() == 0
    # Nothing of the cancelled stream stays behind: its steps after the cancel are dropped, at the latest
    # when the next stream starts.
    for _ in range(3):
        asyncio.run(quit_early(llm, QUESTIONS[4]))
        assert asyncio.run(_collect(llm, _request(QUESTIONS[0], max_new_tokens=4)))
        assert llm._decoding.orphaned() == 0 and llm._decoding.pending() == 0


async def quit_early(llm: TransformersGenerator, question: str) -> None:
    stream = llm.stream(_request(question, max_new_tokens=LONG))
    async for chunk in stream:
        if chunk.text:
            break
    await stream.aclose()  # type: ignore[attr-defined]


def test_a_member_that_fails_does_not_fail_the_others(llm: TransformersGenerator) -> None:
    requests = [_request(q, max_new_tokens=30) for q in QUESTIONS[:3]]
    alone = _solo(llm, requests)
    decoding = llm._decoding
    assert decoding is not None

    class Broken(Sampling):
        def kwargs(self, vocab_size: int) -> dict[str, Any]:
            return {**super().kwargs(vocab_size), "temperature": 1}  # an int: the engine rejects the row

    async def scenario() -> list[Any]:
        async def broken_in_the_engine() -> None:
            prompt = llm.encode_prompt(requests[0])
            async for _ in decoding.tokens(prompt, 8, Broken(0.5, 0.9), time.monotonic() + 30):
                pass

        too_long = _request("Paris " * (LONG + 600))  # a prompt the model's context cannot hold
        return list(await asyncio.gather(broken_in_the_engine(), _collect(llm, too_long),
                                         *(_collect(llm, r) for r in requests), return_exceptions=True))

    broken, refused, *others = asyncio.run(scenario())
    assert isinstance(broken, GenerationError) and "temperature" in str(broken)
    assert isinstance(refused, InvalidRequestError) and "context holds" in str(refused)
    assert [_text(chunks) for chunks in others] == alone
    llm.check_health()  # the decoder survived both


def test_a_new_stream_joins_a_running_batch_without_waiting_for_it(llm: TransformersGenerator) -> None:
    async def scenario() -> tuple[float, float, bool]:
        long_started = asyncio.Event()

        async def long_answer() -> None:
            async for chunk in llm.stream(_request(QUESTIONS[0], max_new_tokens=LONG, max_seconds=60)):
                if chunk.text:
                    long_started.set()

        long_task = asyncio.create_task(long_answer())
        await asyncio.wait_for(long_started.wait(), 10)
        began, first = time.monotonic(), None
        async for chunk in llm.stream(_request(QUESTIONS[1], max_new_tokens=16)):
            if chunk.text:
                first = first or time.monotonic()
        took = time.monotonic() - began
        still_running = not long_task.done()
        long_task.cancel()
        await asyncio.gather(long_task, return_exceptions=True)
        assert first is not None
        return first - began, took, still_running

    first_token_s, took_s, long_still_running = asyncio.run(scenario())
    assert long_still_running  # the short answer did not wait for the 8,000-token one
    assert first_token_s < 2 and took_s < 5


def test_sampling_rows_differ_from_greedy_rows_in_one_batch(llm: TransformersGenerator) -> None:
    greedy = _request(QUESTIONS[0], max_new_tokens=30)
    sampled = GenerationRequest(question=QUESTIONS[0], passages=greedy.passages, max_new_tokens=30,
                                temperature=2.0)

    async def scenario() -> list[str]:
        results = await asyncio.gather(_collect(llm, greedy), *(_collect(llm, sampled) for _ in range(3)))
        return [_text(chunks) for chunks in results]

    greedy_text, *samples = asyncio.run(scenario())
    assert greedy_text == _solo(llm, [greedy])[0]
    assert any(s != greedy_text for s in samples)


def test_sampling_kwargs_per_row() -> None:
    assert Sampling(0.0, 0.9).kwargs(1000) == {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
    assert Sampling(0.7, 0.9).kwargs(1000) == {"temperature": 0.7, "top_k": 1000, "top_p": 0.9}


class _Bytes:
    """A byte-level tokenizer: token id = one UTF-8 byte, so a Chinese character takes three tokens."""

    @staticmethod
    def decode(ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_token_decoder_never_splits_a_character() -> None:
    decoder, text = TokenDecoder(_Bytes()), "长城 is long。"
    deltas = [decoder.add([byte]) for byte in text.encode()]
    assert "".join(deltas) + decoder.flush() == text
    assert all("\ufffd" not in d for d in deltas)
    assert [d for d in deltas if d][:2] == ["长", "城"]


def test_token_decoder_flushes_an_incomplete_tail() -> None:
    decoder = TokenDecoder(_Bytes())
    assert decoder.add(list(b"ok")) == "ok"
    assert decoder.add(list("长".encode())[:2]) == ""
    assert decoder.flush() == "\ufffd"


def test_batch_settings_reach_the_engine(llm: TransformersGenerator) -> None:
    decoding = llm._decoding
    assert decoding is not None
    assert decoding.settings == BatchSettings(max_streams=16)
    assert decoding.cache_tokens == 32_768  # the CPU default
    assert decoding.limit(100, 50) == 50
    assert decoding.limit(LONG + 500, 50) == 12  # the context (LONG + 512) caps the answer
    with pytest.raises(InvalidRequestError):
        decoding.limit(LONG + 512, 1)


def test_stopping_the_decoder_fails_streams_in_flight_instead_of_hanging(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    path = _save_model(tmp_path_factory.mktemp("tiny-llama") / "closing", chat_template=None, allow="words")
    generator = build_generator(GenerationConfig(backend="transformers", model=str(path), device="cpu",
                                                 max_new_tokens=LONG))
    generator.load()
    asyncio.run(generator.warmup())

    async def scenario() -> BaseException | None:
        async def consume() -> None:
            async for _ in generator.stream(_request(QUESTIONS[0], max_new_tokens=LONG)):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        generator.close()
        try:
            await asyncio.wait_for(task, 5)
        except Exception as exc:
            return exc
        return None

    error = asyncio.run(scenario())
    assert isinstance(error, GenerationError)


def test_passages_do_not_leak_between_rows(llm: TransformersGenerator) -> None:
    # The same question over different passages: solo answers differ, batched answers match them.
    requests = [GenerationRequest(question="What is it?", passages=[p], max_new_tokens=20, temperature=0.0)
                for p in [*PASSAGES, Passage(id=9, text="Python is easy.", source="py.md", score=0.4)]]
    alone = _solo(llm, requests)

    async def together() -> list[str]:
        return [_text(c) for c in await asyncio.gather(*(_collect(llm, r) for r in requests))]

    assert asyncio.run(together()) == alone


def test_the_generation_benchmark_runs_and_writes_its_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from scripts import bench_generation

    monkeypatch.setattr(bench_generation, "REPO", tmp_path)  # the model is built under tmp_path/var/models
    out = tmp_path / "bench.json"
    assert bench_generation.main(["--tiny", "--skip-serve", "--streams", "1", "3", "--new-tokens", "6",
                                  "--prompt-tokens", "40", "--min-tokens", "6", "--repeat", "1",
                                  "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"in_process", "serve", "startup"} and results["serve"] == {}
    assert set(results["in_process"]) == {"1", "3"}  # only cells, keyed by stream count
    assert results["startup"]["in_process"]["ready_s"] > 0
    for streams in ("1", "3"):
        cell = results["in_process"][streams]
        # Every answer ran to its limit (the benchmark raises on any other finish, --rounds 2 each); it counts
        # the pieces that carry text, and a random model's token can decode to none (seen once: 9 of 12).
        assert 0 < cell["tokens"] <= int(streams) * 6 * 2
        assert cell["tokens_per_s"] > 0 and cell["ttft_p50_s"] <= cell["ttft_p99_s"]
