"""Answer generation: one async streaming interface, two backends; `build_generator` picks one."""

from __future__ import annotations

import asyncio
import gc
import re
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from rag.batching import BatchedDecoding, BatchSettings, Sampling, TokenDecoder
from rag.config import GenerationConfig
from rag.constants import local_or_hub_id
from rag.devices import empty_device_cache, pick_device
from rag.errors import GenerationError, ServiceUnavailableError
from rag.prompts import build_messages, render_plain
from rag.records import GenerationChunk, GenerationRequest, Passage

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# Latin terminators need following whitespace (so "3.14" stays whole); CJK ones do not.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|(?<=[。！？；])\s*|\s*\n\s*")
# A newline inside a paragraph (hard-wrapped prose) is a space, not a sentence end; blank lines, list
# items, headings, quotes and table rows still start a new line.
_SOFT_BREAK = re.compile(r"(?<=\S)[ \t]*\n(?![ \t]*(?:\n|[-*+#>|]|\d+[.)]\s))[ \t]*(?=\S)")
_WORD = re.compile(rf"[^\W_{_CJK}]+")
_CJK_RUN = re.compile(f"[{_CJK}]+")
_CJK_END = re.compile(f"[{_CJK}。！？；，、：”’）」』]$")  # Chinese text: no space before [n] or after it
# One streamed piece = one "token": a CJK character, or a run of other non-space characters,
# each with the whitespace before it, so the pieces concatenate exactly to the text.
_PIECE = re.compile(rf"\s*(?:[{_CJK}]|[^\s{_CJK}]+)")
_STOPWORDS = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "by", "can", "do", "does", "for", "from", "how", "i", "in",
    "is", "it", "its", "of", "on", "or", "that", "the", "this", "to", "was", "what", "when", "where",
    "which", "who", "why", "will", "with", "you", "your"})
RETRIEVAL_BONUS = 0.25  # weight of the passage's similarity score; lexical overlap counts 1 per term
NO_PASSAGES_EN = "The knowledge base has no information relevant to this question, so I cannot answer it."
NO_PASSAGES_ZH = "知识库中没有与该问题相关的内容，无法回答。"
PROBE = Passage(id=0, text="The warm-up probe checks that the generator runs. It answers questions.",
                source="warmup", score=1.0)


class Generator(ABC):
    """Streams an answer to a question from retrieved passages."""

    def __init__(self, config: GenerationConfig) -> None:
        self.config = config
        self._loaded = False

    def load(self) -> None:
        """Load the model and tokenizer; a no-op for backends that need none."""
        self._loaded = True

    @abstractmethod
    async def warmup(self) -> dict[str, float] | None:
        """Run one real generation; raise `GenerationError` if it produces nothing. May return timings
        (seconds by name) for the READY log line."""

    def check_health(self) -> None:
        """Raise `ServiceUnavailableError` unless loaded and not closed. Cheap."""
        if not self._loaded:
            raise ServiceUnavailableError(f"{type(self).__name__} is not loaded (or has been closed)")

    async def probe(self) -> None:
        """The replica's check_health: `check_health` here; a backend with a remote side asks it."""
        self.check_health()

    @abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Yield answer pieces; the last chunk has `finish_reason` set."""

    def close(self) -> None:
        """Release the model and its memory. Idempotent; afterwards `check_health` raises."""
        self._loaded = False
        gc.collect()
        empty_device_cache()

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens in `text` as this backend counts them for `max_new_tokens`."""

    def _limits(self, request: GenerationRequest) -> tuple[int, float]:
        # The config is the server's ceiling; a request may ask for less, never for more.
        return (min(request.max_new_tokens, self.config.max_new_tokens),
                min(request.max_seconds, self.config.max_stream_seconds))


def _has_cjk(text: str) -> bool:
    return _CJK_RUN.search(text) is not None


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, split at English and Chinese terminators and at line breaks between
    paragraphs or list items; markdown headings are titles, not sentences, and are left out."""
    parts = _SENTENCE_BREAK.split(_SOFT_BREAK.sub(" ", text))
    return [s.strip() for s in parts if s and s.strip() and not s.lstrip().startswith("#")]


def _starts_mid_sentence(passage: Passage, sentence: str) -> bool:
    return bool(passage.metadata.get("start_index")) and not (sentence[:1].isupper() or _has_cjk(sentence[:1])
                                                              or sentence[:1] in "`*-[(\"'")


def lexical_terms(text: str) -> set[str]:
    """Lowercased Latin words minus stopwords, plus character bigrams of CJK runs."""
    lowered = text.lower()
    terms = {w for w in _WORD.findall(lowered) if w not in _STOPWORDS}
    for run in _CJK_RUN.findall(lowered):
        terms.update(run[i:i + 2] for i in range(max(len(run) - 1, 1)))
    return terms


def pieces(text: str) -> list[str]:
    """`text` cut into streaming pieces (words / CJK characters) that concatenate back to it."""
    return _PIECE.findall(text.strip())


class ExtractiveGenerator(Generator):
    """Answers with the passage sentences best matching the question, each cited as [n]; no model."""

    def __init__(self, config: GenerationConfig) -> None:
        super().__init__(config)
        self._loaded = True  # nothing to load

    async def warmup(self) -> None:
        """Answer a probe question over a probe passage."""
        request = GenerationRequest(question="What does the probe check?", passages=[PROBE])
        if not "".join([c.text async for c in self.stream(request)]).strip():
            raise GenerationError("extractive warm-up produced no text")

    def answer(self, request: GenerationRequest) -> str:
        """The full answer text the stream spells out."""
        if not request.passages:
            return NO_PASSAGES_ZH if _has_cjk(request.question) else NO_PASSAGES_EN
        question = lexical_terms(request.question)
        candidates: list[tuple[float, int, int, str, int]] = []
        seen: set[str] = set()
        for p_index, passage in enumerate(request.passages):
            for s_index, sentence in enumerate(split_sentences(passage.text)):
                if s_index == 0 and _starts_mid_sentence(passage, sentence):
                    continue  # a chunk boundary cut this sentence: its start is in another chunk
                key, terms = " ".join(sentence.lower().split()), lexical_terms(sentence)
                if key not in seen and terms:  # overlapping chunks repeat sentences; answers should not
                    seen.add(key)
                    hits = len(question & terms)
                    candidates.append((-hits - RETRIEVAL_BONUS * passage.score, p_index, s_index, sentence,
                                       hits))
        # Sentences sharing no word with the question are padding, unless nothing matches lexically
        # (a paraphrase the embedding retrieval understood): then the retrieval score decides.
        pool = [c for c in candidates if c[4]] or candidates
        best = sorted(pool)[: self.config.extractive_sentences]
        text, cjk = "", False
        # Source order reads better than score order: sentences of one passage stay in sequence.
        for _, p_index, _, sentence, _ in sorted(best, key=lambda c: (c[1], c[2])):
            sep = "" if not text or (cjk and _has_cjk(sentence[:1])) else " "
            cjk = _CJK_END.search(sentence) is not None
            text += f"{sep}{sentence}{'' if cjk else ' '}[{p_index + 1}]"
        return text or (NO_PASSAGES_ZH if _has_cjk(request.question) else NO_PASSAGES_EN)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream `answer(request)` piece by piece within the token and time limits."""
        self.check_health()
        max_tokens, max_seconds = self._limits(request)
        deadline = time.monotonic() + max_seconds
        for count, piece in enumerate(pieces(self.answer(request))):
            if count >= max_tokens or time.monotonic() >= deadline:
                yield GenerationChunk("", "length")
                return
            yield GenerationChunk(piece)
            # Pacing (0 by default) gives answers a typing rhythm in demos and keeps streams open long
            # enough for the lifecycle tests to replace replicas under them; sleep(0) lets others run.
            await asyncio.sleep(self.config.extractive_piece_delay_s)
        yield GenerationChunk("", "stop")

    def count_tokens(self, text: str) -> int:
        return len(pieces(text))


class TransformersGenerator(Generator):
    """A causal LM from `transformers`. Concurrent streams share forward passes (`rag.batching`): each
    step decodes every active stream at once, a new stream joins at the next step, and each leaves on
    its own (EOS, token limit, deadline, client gone)."""

    def __init__(self, config: GenerationConfig) -> None:
        super().__init__(config)
        self._model: Any = None
        self._tokenizer: Any = None
        self._device = "cpu"
        self._decoding: BatchedDecoding | None = None

    def load(self) -> None:
        """Load tokenizer and model from `config.model` (a local path or hub id) in eval mode, and set
        up the batched decoder over it (started by `warmup`)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        assert self.config.model  # guaranteed by GenerationConfig's validator
        source = local_or_hub_id(self.config.model)
        self._device = pick_device(self.config.device)
        auto_dtype = "bfloat16" if self._device == "cuda" else "float32"
        dtype_name = auto_dtype if self.config.dtype == "auto" else self.config.dtype
        trust = self.config.trust_remote_code
        self._tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
        model: Any = AutoModelForCausalLM.from_pretrained(
            source, dtype=getattr(torch, dtype_name), trust_remote_code=trust)
        self._model = model.to(self._device).eval()
        settings = BatchSettings(max_streams=self.config.max_batch_streams,
                                 max_batch_tokens=self.config.max_batch_tokens,
                                 kv_cache_tokens=self.config.kv_cache_tokens,
                                 compile_level=self.config.compile_level)
        self._decoding = BatchedDecoding(self._model, self._tokenizer.eos_token_id, settings)
        self._loaded = True

    def check_health(self) -> None:
        super().check_health()
        if self._decoding is None or not self._decoding.alive:
            raise ServiceUnavailableError("the transformers generator's batched decoder is not running")

    def render_prompt(self, request: GenerationRequest) -> str:
        """The prompt text: the tokenizer's chat template if it has one, else a plain rendering."""
        super().check_health()
        messages = build_messages(request)
        if getattr(self._tokenizer, "chat_template", None):
            return str(self._tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False))
        return render_plain(messages)

    async def warmup(self) -> dict[str, float]:
        """Start the decoder (on CUDA: capture and compile), then stream probe answers alone and in a
        batch, so the paths traffic takes have produced tokens before the replica reports ready."""
        assert self._decoding is not None, "load() first"
        compile_s = await asyncio.to_thread(self._decoding.start)
        n = self.config.warmup_tokens
        probe = GenerationRequest(question="What does the probe check?", passages=[PROBE], max_new_tokens=n)
        began = time.monotonic()
        for streams in sorted({1, min(8, self.config.max_batch_streams)}):
            answers = await asyncio.gather(*(self._generated(probe) for _ in range(streams)))
            if min(answers) < 1:
                raise GenerationError(f"transformers warm-up generated no tokens ({streams} streams)")
        return {"compile_s": compile_s, "probe_s": time.monotonic() - began}

    async def _generated(self, request: GenerationRequest) -> int:
        stats: dict[str, int] = {}
        async for _ in self._generate(request, stats):
            pass
        return stats.get("tokens", 0)

    def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream generated text; "length" when max_new_tokens or max_seconds ran out."""
        return self._generate(request, {})

    def encode_prompt(self, request: GenerationRequest) -> list[int]:
        templated = bool(getattr(self._tokenizer, "chat_template", None))
        # A chat template writes its own BOS; adding special tokens again would double it.
        return list(self._tokenizer(self.render_prompt(request), add_special_tokens=not templated,
                                    return_token_type_ids=False)["input_ids"])

    async def _generate(self, request: GenerationRequest, stats: dict[str, int]) -> AsyncIterator[GenerationChunk]:
        self.check_health()
        decoding = self._decoding
        assert decoding is not None
        max_tokens, max_seconds = self._limits(request)
        deadline = time.monotonic() + max_seconds
        prompt = self.encode_prompt(request)
        budget = decoding.limit(len(prompt), max_tokens)
        text, count = TokenDecoder(self._tokenizer), 0
        sampling = Sampling(request.temperature, self.config.top_p)
        async for ids in decoding.tokens(prompt, budget, sampling, deadline):
            count += len(ids)
            if piece := text.add(ids):
                yield GenerationChunk(piece)
        if tail := text.flush():
            yield GenerationChunk(tail)
        stats["tokens"] = count
        out_of_room = count >= budget or time.monotonic() >= deadline
        yield GenerationChunk("", "length" if out_of_room else "stop")

    def close(self) -> None:
        """Stop the decoder (streams still running end with an error), drop the model, free (GPU) memory."""
        self._loaded = False  # refuse new streams first
        decoding, self._decoding = self._decoding, None
        if decoding is not None:
            decoding.close()
        self._model = self._tokenizer = None
        super().close()

    def count_tokens(self, text: str) -> int:
        super().check_health()
        return len(self._tokenizer.encode(text, add_special_tokens=False))


GENERATORS: dict[str, type[Generator]] = {"extractive": ExtractiveGenerator,
                                          "transformers": TransformersGenerator}


def build_generator(config: GenerationConfig) -> Generator:
    """A generator of the class `config.backend` names; call `load()` before streaming."""
    if config.backend == "openai":
        from rag.upstream import OpenAIGenerator  # it builds on this module

        return OpenAIGenerator(config)
    return GENERATORS[config.backend](config)  # the config schema admits only these names
