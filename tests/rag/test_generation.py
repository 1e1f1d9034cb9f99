"""Both generator backends, run for real: a tiny random Llama saved to disk and loaded the way the
service loads a model, and the extractive generator over hand-written passages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from rag.config import GenerationConfig
from rag.constants import offline_hub
from rag.errors import ServiceUnavailableError
from rag.generation import (
    GENERATORS,
    ExtractiveGenerator,
    Generator,
    TransformersGenerator,
    build_generator,
    pieces,
)
from rag.records import ChatTurn, GenerationChunk, GenerationRequest, Passage

offline_hub()

CORPUS = [
    "Paris is the capital of France and the largest city of the country.",
    "Plants use photosynthesis to turn light, water and carbon dioxide into sugar.",
    "Python is a programming language that is easy to read.",
    "The answer cites the sources with numbers in square brackets.",
]
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>"]
LONG = 8000  # tokens: an answer that takes this model seconds, so an early stop is unmistakable
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PASSAGES = [
    Passage(id=11, text="Paris is the capital of France. It lies on the Seine.", source="france.md",
            score=0.52),
    Passage(id=12, text="Photosynthesis turns light into chemical energy. Plants need sunlight and water.",
            source="plants.md", score=0.50),
    Passage(id=13, text="长城是中国古代的军事防御工程。长城全长两万多公里。", source="长城.txt", score=0.48),
]


def run(stream: AsyncIterator[GenerationChunk]) -> list[GenerationChunk]:
    """All chunks of a stream, consumed on a fresh event loop."""

    async def collect() -> list[GenerationChunk]:
        return [chunk async for chunk in stream]

    return asyncio.run(collect())


# --- a tiny causal LM, saved like a real checkpoint --------------------------------------------

def _save_model(path: Path, *, chat_template: str | None, allow: str) -> Path:
    """Save a random 2-layer Llama with a WordLevel tokenizer.

    `allow` picks what the model may emit, through its saved generation_config (as a real
    checkpoint would): "words" suppresses every special token, so it never stops before
    max_new_tokens and all its tokens decode to text; "eos" suppresses everything but </s>.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>",
                                        clean_up_tokenization_spaces=False)
    if chat_template:
        tokenizer.chat_template = chat_template
    vocab = raw.get_vocab_size()
    special_ids = [raw.token_to_id(t) for t in SPECIALS]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=LONG + 512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    eos = tokenizer.eos_token_id
    model.generation_config.suppress_tokens = (
        special_ids if allow == "words" else [i for i in range(vocab) if i != eos])
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-llama")
    return {
        "plain": _save_model(root / "plain", chat_template=None, allow="words"),
        "chat": _save_model(root / "chat", chat_template=CHAT_TEMPLATE, allow="words"),
        "eos": _save_model(root / "eos", chat_template=None, allow="eos"),
    }


def _loaded(path: Path, **overrides: Any) -> TransformersGenerator:
    config = GenerationConfig(backend="transformers", model=str(path), device="cpu", **overrides)
    generator = build_generator(config)  # the path the service takes
    assert isinstance(generator, TransformersGenerator)
    generator.load()
    asyncio.run(generator.warmup())  # starts the batched decoder
    generator.check_health()
    return generator


@pytest.fixture(scope="module")
def llm(model_dirs: dict[str, Path]) -> Iterator[TransformersGenerator]:
    generator = _loaded(model_dirs["plain"], max_new_tokens=LONG)
    yield generator
    generator.close()  # stops the decoding thread, which would otherwise keep the process alive


def _request(max_new_tokens: int = 16, **kwargs: object) -> GenerationRequest:
    return GenerationRequest(question="What is the capital of France?", passages=PASSAGES[:2],
                             max_new_tokens=max_new_tokens, **kwargs)  # type: ignore[arg-type]


def _check_shape(chunks: list[GenerationChunk]) -> str:
    assert chunks, "a stream yields at least its final chunk"
    assert chunks[-1].finish_reason in ("stop", "length")
    assert all(c.finish_reason is None for c in chunks[:-1])
    return "".join(c.text for c in chunks)


def test_transformers_streams_several_pieces_then_finishes(llm: TransformersGenerator) -> None:
    chunks = run(llm.stream(_request(max_new_tokens=24)))
    text = _check_shape(chunks)
    assert len([c for c in chunks if c.text]) >= 3
    assert text.strip()
    assert chunks[-1].finish_reason == "length"  # this model cannot emit </s>


@pytest.mark.parametrize("limit", [1, 5, 17])
def test_transformers_respects_max_new_tokens(llm: TransformersGenerator, limit: int) -> None:
    chunks = run(llm.stream(_request(max_new_tokens=limit)))
    text = _check_shape(chunks)
    assert llm.count_tokens(text) == limit
    assert chunks[-1].finish_reason == "length"


def test_config_max_new_tokens_caps_the_request(model_dirs: dict[str, Path]) -> None:
    generator = _loaded(model_dirs["plain"], max_new_tokens=3)
    try:
        text = _check_shape(run(generator.stream(_request(max_new_tokens=50))))
        assert generator.count_tokens(text) == 3
    finally:
        generator.close()


def test_transformers_finishes_with_stop_on_eos(model_dirs: dict[str, Path]) -> None:
    generator = _loaded(model_dirs["eos"])
    try:
        chunks = run(generator.stream(_request(max_new_tokens=10)))
        assert chunks[-1] == GenerationChunk("", "stop")
    finally:
        generator.close()


def test_transformers_time_limit_ends_with_length(llm: TransformersGenerator) -> None:
    started = time.monotonic()
    chunks = run(llm.stream(_request(max_new_tokens=LONG, max_seconds=0.2)))
    assert time.monotonic() - started < 3
    text = _check_shape(chunks)
    assert chunks[-1].finish_reason == "length"
    assert 0 < llm.count_tokens(text) < LONG


def test_sampling_streams_too(llm: TransformersGenerator) -> None:
    text = _check_shape(run(llm.stream(_request(max_new_tokens=8, temperature=0.9))))
    assert llm.count_tokens(text) == 8


def test_chat_template_is_used_when_present(model_dirs: dict[str, Path], llm: TransformersGenerator) -> None:
    chat = _loaded(model_dirs["chat"])
    try:
        request = _request(history=[ChatTurn("user", "Hello"), ChatTurn("assistant", "Hi")])
        prompt = chat.render_prompt(request)
        assert prompt.startswith("<|system|> ")
        assert "<|user|> Hello" in prompt and prompt.endswith("<|assistant|>")
        assert "[1] (france.md)" in prompt
        text = _check_shape(run(chat.stream(_request(max_new_tokens=6))))
        assert chat.count_tokens(text) == 6
    finally:
        chat.close()
    plain = llm.render_prompt(_request())
    assert plain.startswith("System: ") and plain.endswith("\nAssistant:")


def _left_the_batch(llm: TransformersGenerator, within_s: float = 2.0) -> bool:
    decoding = llm._decoding
    assert decoding is not None
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if decoding.in_batch() == 0 and decoding.pending() == 0:
            return True
        time.sleep(0.01)
    return False


def test_closing_the_stream_early_takes_it_out_of_the_batch(llm: TransformersGenerator) -> None:
    async def scenario() -> None:
        stream = llm.stream(_request(max_new_tokens=LONG, max_seconds=60))
        received = 0
        async for chunk in stream:
            received += bool(chunk.text)
            if received == 2:
                break
        assert llm._decoding is not None and llm._decoding.in_batch() == 1  # nobody told it to stop yet
        await stream.aclose()  # type: ignore[attr-defined]

    asyncio.run(scenario())
    assert _left_the_batch(llm)  # far sooner than the rest of the answer would take


def test_cancelling_the_consumer_task_takes_it_out_of_the_batch(llm: TransformersGenerator) -> None:
    async def scenario() -> None:
        first = asyncio.Event()

        async def consume() -> None:
            async for chunk in llm.stream(_request(max_new_tokens=LONG)):
                if chunk.text:
                    first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert _left_the_batch(llm)


def test_concurrent_streams_share_the_model(llm: TransformersGenerator) -> None:
    async def both() -> list[list[GenerationChunk]]:
        async def one(n: int) -> list[GenerationChunk]:
            return [c async for c in llm.stream(_request(max_new_tokens=n))]

        return list(await asyncio.gather(one(12), one(7)))

    first, second = asyncio.run(both())
    assert llm.count_tokens(_check_shape(first)) == 12
    assert llm.count_tokens(_check_shape(second)) == 7
    # Greedy decoding of the same prompt: the shorter answer is a prefix of the longer one.
    assert _check_shape(first).startswith(_check_shape(second))


def test_transformers_warmup_runs_a_real_generation(model_dirs: dict[str, Path]) -> None:
    generator = _loaded(model_dirs["eos"], warmup_tokens=3)  # even a model eager to stop
    try:
        asyncio.run(generator.warmup())
    finally:
        generator.close()


def test_close_makes_health_check_fail(model_dirs: dict[str, Path]) -> None:
    generator = _loaded(model_dirs["plain"])
    asyncio.run(generator.warmup())
    generator.close()
    generator.close()  # idempotent
    with pytest.raises(ServiceUnavailableError):
        generator.check_health()
    with pytest.raises(ServiceUnavailableError):
        run(generator.stream(_request()))


def test_unloaded_transformers_generator_is_unhealthy(model_dirs: dict[str, Path]) -> None:
    generator = build_generator(GenerationConfig(backend="transformers", model=str(model_dirs["plain"])))
    with pytest.raises(ServiceUnavailableError):
        generator.check_health()


def test_transformers_backend_requires_a_model() -> None:
    with pytest.raises(ValidationError, match=r"generation\.model is required"):
        GenerationConfig(backend="transformers")


@pytest.mark.parametrize("model", ["/nonexistent/model", "./missing-model", "~/no/such/model"])
def test_a_model_path_that_names_nothing_fails_at_once_naming_it(model: str) -> None:
    """Only a path can start so: no hub lookup, no framework import, just the path it could not find."""
    generator = build_generator(GenerationConfig(backend="transformers", model=model))
    with pytest.raises(FileNotFoundError, match=f"no model directory '{model}'"):
        generator.load()


def test_backend_registry() -> None:
    assert {"extractive": ExtractiveGenerator, "transformers": TransformersGenerator} == GENERATORS
    assert isinstance(build_generator(GenerationConfig()), ExtractiveGenerator)


# --- extractive ----------------------------------------------------------------------------------

def _extractive(**overrides: Any) -> Generator:
    generator = build_generator(GenerationConfig(**overrides))
    generator.load()
    return generator


def _answer(generator: Generator, question: str, passages: list[Passage] = PASSAGES,
            **kwargs: object) -> tuple[str, list[GenerationChunk]]:
    request = GenerationRequest(question=question, passages=passages, **kwargs)  # type: ignore[arg-type]
    chunks = run(generator.stream(request))
    return _check_shape(chunks), chunks


def test_extractive_cites_the_matching_passage() -> None:
    text, chunks = _answer(_extractive(extractive_sentences=1), "How do plants use photosynthesis?")
    assert text == "Photosynthesis turns light into chemical energy. [2]"
    assert chunks[-1].finish_reason == "stop"
    text, _ = _answer(_extractive(extractive_sentences=1), "What is the capital of France?")
    assert text == "Paris is the capital of France. [1]"


def test_extractive_chinese_question_picks_the_chinese_passage() -> None:
    text, _ = _answer(_extractive(extractive_sentences=1), "长城全长多少公里？")
    assert text == "长城全长两万多公里。[3]"


def test_extractive_keeps_source_order_and_drops_duplicates() -> None:
    duplicated = [*PASSAGES, Passage(id=99, text="Paris is the capital of France.", source="copy.md",
                                     score=0.9)]
    text, _ = _answer(_extractive(extractive_sentences=3), "Is Paris, the capital of France, on the Seine?",
                      duplicated)
    assert text.count("Paris is the capital of France.") == 1
    assert text.index("Paris is the capital") < text.index("It lies on the Seine.")
    assert "[4]" not in text


def test_extractive_pieces_concatenate_to_the_answer_and_are_deterministic() -> None:
    generator = _extractive()
    assert isinstance(generator, ExtractiveGenerator)
    request = GenerationRequest(question="Paris 长城 photosynthesis", passages=PASSAGES)
    first, chunks = _answer(generator, request.question)
    assert first == generator.answer(request)
    assert len([c for c in chunks if c.text]) == generator.count_tokens(first) > 10
    for _ in range(3):
        assert _answer(generator, request.question)[0] == first
    assert "".join(pieces("长城 is 很长。 Yes! [1]")) == "长城 is 很长。 Yes! [1]"


def test_extractive_respects_max_new_tokens() -> None:
    generator = _extractive()
    full, _ = _answer(generator, "What is the capital of France?")
    text, chunks = _answer(generator, "What is the capital of France?", max_new_tokens=3)
    assert chunks[-1].finish_reason == "length"
    assert generator.count_tokens(text) == 3
    assert full.startswith(text)
    zh, chunks = _answer(generator, "长城全长多少公里？", [PASSAGES[2]], max_new_tokens=4)
    assert zh == "长城是中" and chunks[-1].finish_reason == "length"


def test_extractive_time_limit() -> None:
    _, chunks = _answer(_extractive(), "What is the capital of France?", max_seconds=0.0)
    assert chunks == [GenerationChunk("", "length")]


def test_extractive_without_passages_says_so() -> None:
    text, chunks = _answer(_extractive(), "What is the capital of France?", [])
    assert "knowledge base has no information" in text
    assert chunks[-1].finish_reason == "stop"
    zh, _ = _answer(_extractive(), "长城有多长？", [])
    assert "知识库" in zh


def test_extractive_lifecycle() -> None:
    generator = _extractive()
    generator.check_health()
    asyncio.run(generator.warmup())
    generator.close()
    generator.close()
    with pytest.raises(ServiceUnavailableError):
        generator.check_health()
    with pytest.raises(ServiceUnavailableError):
        run(generator.stream(GenerationRequest(question="q", passages=PASSAGES)))
