"""Answer generation: one async streaming interface, two backends; `build_generator` picks one."""

from __future__ import annotations

import asyncio
import gc
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

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
    async def warmup(self) -> None:
        """Run one real generation; raise `GenerationError` if it produces nothing."""

    def check_health(self) -> None:
        """Raise `ServiceUnavailableError` unless loaded and not closed. Cheap."""
        if not self._loaded:
            raise ServiceUnavailableError(f"{type(self).__name__} is not loaded (or has been closed)")

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
    """A causal LM from `transformers`, streamed token by token from a background thread.

    Concurrent streams share one model without a lock: weights are only read under
    `torch.inference_mode()`, and each `generate` call owns its KV cache and a copy of the
    generation config, so threads do not step on each other. Torch releases the GIL inside
    kernels, so streams interleave instead of queueing behind one long answer.
    """

    def __init__(self, config: GenerationConfig) -> None:
        super().__init__(config)
        self._model: Any = None
        self._tokenizer: Any = None
        self._device = "cpu"
        self._running: dict[threading.Thread, threading.Event] = {}  # generate thread -> its cancel

    def load(self) -> None:
        """Load tokenizer and model from `config.model` (a local path or hub id) in eval mode."""
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
        self._loaded = True

    def render_prompt(self, request: GenerationRequest) -> str:
        """The prompt text: the tokenizer's chat template if it has one, else a plain rendering."""
        self.check_health()
        messages = build_messages(request)
        if getattr(self._tokenizer, "chat_template", None):
            return str(self._tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False))
        return render_plain(messages)

    async def warmup(self) -> None:
        """Generate exactly `config.warmup_tokens` tokens for a probe question."""
        n = self.config.warmup_tokens
        request = GenerationRequest(question="What does the probe check?", passages=[PROBE],
                                    max_new_tokens=n)
        stats: dict[str, int] = {}
        _ = [chunk async for chunk in self._generate(request, stats, min_new_tokens=n)]
        if stats.get("tokens", 0) < 1:
            raise GenerationError("transformers warm-up generated no tokens")

    def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream generated text; "length" when max_new_tokens or max_seconds ran out."""
        return self._generate(request, {})

    async def _generate(self, request: GenerationRequest, stats: dict[str, int],
                        **extra: Any) -> AsyncIterator[GenerationChunk]:
        from transformers import AsyncTextIteratorStreamer, StoppingCriteriaList

        self.check_health()
        model, tokenizer = self._model, self._tokenizer
        max_tokens, max_seconds = self._limits(request)
        templated = bool(getattr(tokenizer, "chat_template", None))
        # A chat template writes its own BOS; adding special tokens again would double it.
        inputs = tokenizer(self.render_prompt(request), return_tensors="pt", return_token_type_ids=False,
                           add_special_tokens=not templated).to(self._device)
        # The async streamer hands text to this event loop via call_soon_threadsafe, so no
        # executor thread sits blocked on a queue per stream.
        streamer = AsyncTextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel, pad = threading.Event(), tokenizer.pad_token_id
        sampling = {"do_sample": True, "temperature": request.temperature, "top_p": self.config.top_p}
        # The cancel criterion stops `generate` at its next token once the stream is abandoned.
        stop = StoppingCriteriaList([lambda input_ids, scores, **_: cancel.is_set()])
        kwargs = {**inputs, **(sampling if request.temperature > 0 else {"do_sample": False}), **extra,
                  "max_new_tokens": max_tokens, "max_time": max_seconds, "streamer": streamer,
                  "stopping_criteria": stop, "pad_token_id": tokenizer.eos_token_id if pad is None else pad}
        result: dict[str, Any] = {}
        thread = threading.Thread(target=self._run, args=(model, kwargs, streamer, result),
                                  name="rag-generate", daemon=True)
        self._running[thread] = cancel
        thread.start()
        try:
            async for text in streamer:
                if text:
                    yield GenerationChunk(text)
            await asyncio.to_thread(thread.join)
            if "error" in result:
                raise GenerationError(f"generation failed: {result['error']}") from result["error"]
            stats["tokens"] = int(result["output"].shape[-1] - inputs["input_ids"].shape[-1])
            out_of_time = result["seconds"] >= max_seconds
            yield GenerationChunk("", "length" if stats["tokens"] >= max_tokens or out_of_time else "stop")
        finally:
            # Reached on normal end, on aclose() (GeneratorExit) and on task cancellation:
            # stop the generate thread at its next token instead of letting it run on unseen.
            cancel.set()
            await asyncio.to_thread(thread.join, 10.0)
            self._running.pop(thread, None)

    @staticmethod
    def _run(model: Any, kwargs: dict[str, Any], streamer: Any, result: dict[str, Any]) -> None:
        import torch

        started = time.monotonic()
        try:
            with torch.inference_mode():  # grad mode is thread-local: set it in this thread
                result["output"] = model.generate(**kwargs)
            result["seconds"] = time.monotonic() - started
        except BaseException as exc:  # reported by the consumer; the thread must not die silently
            result["error"] = exc
            streamer.end()  # unblock the consumer, which would otherwise wait for text forever

    def close(self) -> None:
        """Stop running streams, drop model and tokenizer, free (GPU) memory."""
        self._loaded = False  # refuse new streams first
        for event in list(self._running.values()):
            event.set()
        for thread in list(self._running):
            thread.join(5.0)
        self._model = self._tokenizer = None
        super().close()

    def count_tokens(self, text: str) -> int:
        self.check_health()
        return len(self._tokenizer.encode(text, add_special_tokens=False))


GENERATORS: dict[str, type[Generator]] = {"extractive": ExtractiveGenerator,
                                          "transformers": TransformersGenerator}


def build_generator(config: GenerationConfig) -> Generator:
    """A generator of the class `config.backend` names; call `load()` before streaming."""
    return GENERATORS[config.backend](config)  # the config schema admits only these names
