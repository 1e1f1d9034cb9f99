"""The `openai` generation backend: answers from an OpenAI-compatible server the team already runs (vLLM,
Ollama, Xinference, Ray Serve LLM, any chat-completions endpoint), with retrieval, prompting and streaming
around it exactly as for the in-process backends.

Through the official `openai` client (its SSE parsing, its typed errors), over one bounded connection pool
per replica. Upstream failures become this service's errors: unreachable or 5xx before the first token
-> `ServiceUnavailableError` (the gateway retries another version, else 503); 429 -> `RateLimitedError`
with the upstream's Retry-After; 400 -> `InvalidRequestError` with the upstream's reason (a context too
long); anything after the first token -> `GenerationError`, which ends the client's stream with an error
event and `[DONE]`. A client that goes away closes the upstream stream at once, so the upstream stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2  # the openai client's HTTP library (its `http_client` must be one of its clients)
import openai

from rag.config import GenerationConfig
from rag.constants import resolve_path
from rag.errors import (
    GenerationError,
    InvalidRequestError,
    RagError,
    RateLimitedError,
    ServiceUnavailableError,
)
from rag.generation import PROBE, Generator, pieces
from rag.prompts import build_messages
from rag.records import FinishReason, GenerationChunk, GenerationRequest

logger = logging.getLogger("rag.generation")
_SHOWN = 300  # of an upstream's error text: enough for "maximum context length is 4096 tokens ..."


def read_api_key(config: GenerationConfig) -> str | None:
    """The upstream's key from the file or environment variable the config names (never from the config)."""
    if config.api_key_file is not None:
        path = resolve_path(config.api_key_file)
        try:
            key = path.read_text(encoding="utf-8").splitlines()[0].strip() if path.is_file() else ""
        except (OSError, IndexError):
            key = ""
        if not key:
            raise ServiceUnavailableError(f"generation.api_key_file {str(config.api_key_file)!r} is missing or empty")
        return key
    if config.api_key_env is not None:
        key = os.environ.get(config.api_key_env, "").strip()
        if not key:
            raise ServiceUnavailableError(f"environment variable {config.api_key_env} (generation.api_key_env) "
                                          "is not set in the Generator's process")
        return key
    return None


def upstream_error(exc: BaseException, where: str, started: bool) -> RagError:
    """This service's error for an upstream failure; `started`: tokens were already sent to the client."""
    if isinstance(exc, RagError):
        return exc
    if started:
        return GenerationError(f"the upstream {where} broke off mid-answer: {_describe(exc)}")
    if isinstance(exc, openai.RateLimitError):
        return RateLimitedError(f"the upstream {where} is rate limiting (429)", _retry_after(exc.response))
    if isinstance(exc, openai.BadRequestError):
        return InvalidRequestError(f"the upstream model refused the request (400): {_body_text(exc)}")
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return ServiceUnavailableError(f"the upstream {where} refused this service's API key "
                                       f"({exc.status_code}): check generation.api_key_file / api_key_env")
    if isinstance(exc, openai.NotFoundError):
        return ServiceUnavailableError(f"the upstream {where} does not know the model or route (404): "
                                       f"{_body_text(exc)}")
    return ServiceUnavailableError(f"the upstream {where} is unavailable: {_describe(exc)}")


def result_of(error: RagError) -> str:
    """The `result` label of a failed upstream request."""
    if isinstance(error, RateLimitedError):
        return "rate_limited"
    if isinstance(error, InvalidRequestError):
        return "refused"
    if isinstance(error, GenerationError):
        return "broken"
    return "unavailable"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {_body_text(exc)}"
    if isinstance(exc, TimeoutError | openai.APITimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {str(exc)[:_SHOWN]}"


def _body_text(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        body = body.get("message") or body.get("error") or body
    if isinstance(body, dict):
        body = body.get("message") or body
    return str(body or exc.message)[:_SHOWN]


def _retry_after(response: httpx2.Response) -> float | None:
    try:
        return float(response.headers.get("retry-after", ""))
    except ValueError:
        return None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class OpenAIGenerator(Generator):
    """Streams through the chat-completions API of an upstream server. Ready only once the upstream has
    answered a short warm-up request for the configured model; `probe` (the replica's check_health) asks
    the upstream each time and fails after `health_misses` misses in a row."""

    def __init__(self, config: GenerationConfig) -> None:
        super().__init__(config)
        self._client: openai.AsyncOpenAI | None = None
        self._closing: asyncio.Task[None] | None = None
        # Called once per request with (result, seconds to first text or None, tokens): the replica's metrics.
        self.report: Callable[[str, float | None, int], None] = lambda result, first_token_s, tokens: None
        self._misses = 0
        self._last_miss = ""
        assert config.base_url and config.model  # guaranteed by GenerationConfig's validator
        # Errors name the model, not the upstream's address: they reach clients and the open /ready probe.
        # The address is in this replica's log lines.
        self.where = f"of model {config.model!r}"

    def load(self) -> None:
        cfg = self.config
        limits = httpx2.Limits(max_connections=cfg.max_connections, max_keepalive_connections=cfg.max_connections)
        # Read bounds each wait between bytes; the token deadlines below bound the stream as a whole. A
        # stream waiting for a free connection counts against its first-token deadline.
        read_s = max(cfg.first_token_timeout_s, cfg.inter_token_timeout_s)
        timeout = openai.Timeout(connect=cfg.connect_timeout_s, read=read_s, write=cfg.connect_timeout_s,
                                 pool=cfg.first_token_timeout_s)
        self._client = openai.AsyncOpenAI(
            base_url=cfg.base_url, api_key=read_api_key(cfg) or "none", default_headers=dict(cfg.headers),
            max_retries=0,  # a retry is the gateway's decision (another version), not the client's
            http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout))
        self._loaded = True

    async def warmup(self) -> dict[str, float]:
        """The model is served (when the upstream lists its models) and answers a short request."""
        began = time.monotonic()
        await self._check_model()
        probe = GenerationRequest(question="What does the probe check?", passages=[PROBE],
                                  max_new_tokens=self.config.warmup_tokens, max_seconds=self.config.max_stream_seconds)
        produced = [c.text async for c in self.stream(probe) if c.text]
        if not produced:
            raise GenerationError(f"the upstream {self.where} answered the warm-up request with no text")
        return {"probe_s": time.monotonic() - began}

    async def _check_model(self) -> None:
        client = self._require()
        try:
            listed = [m.id async for m in client.models.list()]
        except openai.NotFoundError:  # a server without /models: the warm-up request decides
            return
        except Exception as exc:
            raise upstream_error(exc, self.where, started=False) from None
        if listed and self.config.model not in listed:
            raise ServiceUnavailableError(f"the upstream does not serve model {self.config.model!r}; it serves "
                                          f"{', '.join(listed[:10])}")

    async def probe(self) -> None:
        """check_health: the upstream still lists (or serves) the model; fails after `health_misses` misses
        in a row, with the last reason."""
        super().check_health()
        try:
            await asyncio.wait_for(self._check_model(), self.config.connect_timeout_s + 5)
        except Exception as exc:
            self._misses += 1
            self._last_miss = str(exc) if isinstance(exc, RagError) else _describe(exc)
            logger.warning("event=UPSTREAM_MISS upstream=%s model=%s misses=%d reason=%s", self.config.base_url,
                           self.config.model, self._misses, self._last_miss)
            if self._misses >= self.config.health_misses:
                raise ServiceUnavailableError(f"the upstream {self.where} failed {self._misses} checks in a row: "
                                              f"{self._last_miss}") from None
            return
        self._misses = 0

    def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        return self._stream(request)

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        client = self._require()
        cfg = self.config
        max_tokens, max_seconds = self._limits(request)
        began = time.monotonic()
        deadline = began + max_seconds
        started = False
        response: Any = None
        outcome: list[Any] = ["cancelled", None, 0]  # result, first-token seconds, tokens: reported at the end
        try:
            messages: Any = build_messages(request)  # role/content dicts, what the API takes
            response = await asyncio.wait_for(client.chat.completions.create(
                model=str(cfg.model), messages=messages, stream=True, max_tokens=max_tokens,
                temperature=request.temperature, top_p=cfg.top_p, stream_options={"include_usage": True}),
                min(cfg.first_token_timeout_s, max_seconds))
            chunks = aiter(response)
            finish: FinishReason | None = None
            usage: int | None = None
            while True:
                left = deadline - time.monotonic()
                wait = min(cfg.inter_token_timeout_s if started else cfg.first_token_timeout_s, left)
                if left <= 0:
                    finish = "length"  # the answer's time ran out, as in the other backends
                    break
                try:
                    chunk = await asyncio.wait_for(anext(chunks), wait)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    if time.monotonic() >= deadline:
                        finish = "length"
                        break
                    raise
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta and choice.delta.content:
                        if not started:
                            started, outcome[1] = True, time.monotonic() - began
                        yield GenerationChunk(choice.delta.content)
                    if choice.finish_reason:
                        finish = "length" if choice.finish_reason == "length" else "stop"
            outcome[0], outcome[2] = "ok", usage or 0
            yield GenerationChunk("", finish or "stop", completion_tokens=usage)
        except (GeneratorExit, asyncio.CancelledError):
            raise
        except Exception as exc:
            logger.warning("event=UPSTREAM_ERROR upstream=%s model=%s started=%s error=%s", cfg.base_url, cfg.model,
                           started, _describe(exc))
            error = upstream_error(exc, self.where, started)
            outcome[0] = result_of(error)
            raise error from None
        finally:
            if response is not None:  # closes the connection: the upstream sees the client leave
                await response.close()
            self.report(*outcome)

    def count_tokens(self, text: str) -> int:
        # The upstream's tokenizer is not here; its `usage` is what answers report when it sends one.
        return len(pieces(text))

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and (loop := _running_loop()) is not None:
            self._closing = loop.create_task(client.close())  # its connections; without a loop none is open
        super().close()

    def _require(self) -> openai.AsyncOpenAI:
        super().check_health()
        assert self._client is not None
        return self._client
