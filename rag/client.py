"""A small client for the service's HTTP API, used by the demo, the benchmarks and the tests."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from rag.auth import bearer, read_client_key
from rag.constants import resolve_path

DEFAULT_KEY_FILE = "var/api_key"  # what `make demo` creates and serve_config.yaml's gateway reads

@dataclass
class StreamedAnswer:
    """What one streamed chat completion delivered, and when."""

    text: str = ""
    sources: list[dict[str, Any]] = field(default_factory=list)
    version: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    done: bool = False  # saw `data: [DONE]`
    status: int = 0
    first_token_s: float | None = None
    total_s: float = 0.0
    started_at: float = 0.0  # wall clock, to place an answer in a phase of a rollout

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.done and self.finish_reason is not None and self.error is None


def client_key(key_file: str | Path | None = DEFAULT_KEY_FILE) -> str | None:
    """The key to send, from `key_file` (relative: from the project root); None when no file is named."""
    return read_client_key(resolve_path(key_file)) if key_file else None


def gateway_client(base_url: str, api_key: str | None, **options: Any) -> httpx.Client:
    """An httpx client for the gateway that sends `Authorization: Bearer <api_key>` on every request."""
    return httpx.Client(base_url=base_url, headers=bearer(api_key), **options)


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any] | str]:
    """Decoded `data:` payloads of an SSE body; the `[DONE]` marker comes back as the string."""
    for line in lines:
        if line.startswith("data:"):
            payload = line[5:].strip()
            yield payload if payload == "[DONE]" else json.loads(payload)


def apply_event(answer: StreamedAnswer, event: dict[str, Any] | str, started: float) -> None:
    if event == "[DONE]":
        answer.done = True
        return
    assert isinstance(event, dict)
    if "error" in event:
        answer.error = str(event["error"].get("message"))
    answer.sources = event.get("sources") or event.get("docs") or answer.sources
    answer.version = event.get("version") or answer.version
    for choice in event.get("choices", []):
        piece = choice.get("delta", {}).get("content") or ""
        if piece and answer.first_token_s is None:
            answer.first_token_s = time.perf_counter() - started
        answer.text += piece
        answer.finish_reason = choice.get("finish_reason") or answer.finish_reason


def stream_chat(client: httpx.Client, question: str, knowledge_base: str = "samples",
                on_event: Any = None, **extra: Any) -> StreamedAnswer:
    """POST a streaming chat completion and collect it; `on_event(answer, event)` sees each event."""
    body = {"model": knowledge_base, "stream": True, "messages": [{"role": "user", "content": question}],
            **extra}
    answer = StreamedAnswer(started_at=time.time())
    started = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        answer.status = response.status_code
        if response.status_code != 200:
            response.read()
            answer.error = response.text
        else:
            try:
                for event in sse_events(response.iter_lines()):
                    apply_event(answer, event, started)
                    if on_event:
                        on_event(answer, event)
            except httpx.HTTPError as exc:  # the body was cut: a truncated answer, not a refused one
                answer.error = f"connection broke mid-answer: {type(exc).__name__}: {exc}"
    answer.total_s = time.perf_counter() - started
    return answer
