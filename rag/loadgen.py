"""A bounded streaming-load generator: K concurrent clients asking questions for T seconds.

Used by the lifecycle tests (streams in flight while replicas are replaced) and the rollout
benchmark. Every loop is bounded by time and by request count, and stops by itself.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from rag.client import StreamedAnswer, gateway_client, stream_chat

QUESTIONS = (
    "How do I stop the service?",
    "Where is the Ray dashboard?",
    "Which file formats can I ingest?",
    "How are traffic weights changed?",
    "What happens to answers in flight during an upgrade?",
    "How do I point the service at a real model on a GPU?",
    "如何升级服务而不中断请求？",
    "What does /ready return while the service starts?",
)


@dataclass
class LoadResult:
    answers: list[StreamedAnswer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # transport errors: connection refused, reset, timeout

    @property
    def sent(self) -> int:
        return len(self.answers) + len(self.errors)

    @property
    def failed(self) -> list[StreamedAnswer]:
        """Answers that never started: an HTTP error status."""
        return [a for a in self.answers if a.status != 200]

    @property
    def truncated(self) -> list[StreamedAnswer]:
        """Answers that started (200) but did not end properly: no finish reason, an error event, no [DONE]."""
        return [a for a in self.answers if a.status == 200 and not a.complete]

    def percentile(self, what: Callable[[StreamedAnswer], float | None], q: float) -> float | None:
        values = sorted(v for a in self.answers if a.complete and (v := what(a)) is not None)
        return values[min(len(values) - 1, int(q * len(values)))] if values else None


class LoadGenerator:
    """Runs `concurrency` client threads against `base_url` until `stop()` or the bounds are hit."""

    def __init__(self, base_url: str, concurrency: int = 8, max_seconds: float = 60,
                 max_requests: int = 10_000, knowledge_base: str = "samples", timeout_s: float = 120,
                 api_key: str | None = None, sticky_users: bool = False, **chat_options: object) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.concurrency = concurrency
        self.deadline = time.monotonic() + max_seconds
        self.result = LoadResult()
        self._budget = itertools.count()
        self._max_requests = max_requests
        self._kb = knowledge_base
        self._timeout_s = timeout_s
        self._options = chat_options
        self._sticky = sticky_users  # each client sends its own `user` id, so the gateway routes it stickily
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(concurrency)]

    def start(self) -> LoadGenerator:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> LoadResult:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self._timeout_s + 5)
        return self.result

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _client(self, index: int) -> None:
        with gateway_client(self.base_url, self.api_key, timeout=self._timeout_s) as client:
            for number in self._budget:
                if self._stop.is_set() or time.monotonic() > self.deadline or number >= self._max_requests:
                    return
                self._ask(client, QUESTIONS[(index + number) % len(QUESTIONS)], index)

    def _ask(self, client: httpx.Client, question: str, index: int) -> None:
        options = {**self._options, "user": f"load-client-{index}"} if self._sticky else self._options
        try:
            answer = stream_chat(client, question, self._kb, **options)
        except httpx.HTTPError as exc:
            with self._lock:
                self.result.errors.append(f"{type(exc).__name__}: {exc}")
            return
        with self._lock:
            self.result.answers.append(answer)
