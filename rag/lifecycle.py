"""Structured lifecycle log lines and in-flight accounting shared by every stage.

Events are one line each, `event=READY deployment=Embedder version=v1 replica=abc load_s=3.20`, so
an operator can grep a rollout. Order per replica: STARTUP, READY, TRAFFIC, SHUTDOWN, DRAINING, CLEANUP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger("rag.lifecycle")


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text


class LifecycleLog:
    """Emits the lifecycle events of one replica, each tagged with who emits it."""

    def __init__(self, deployment: str, version: str, replica: str) -> None:
        self.tags = {"deployment": deployment, "version": version, "replica": replica}
        self._served_first = False
        self.started = time.monotonic()

    def event(self, name: str, **fields: Any) -> str:
        line = " ".join(f"{k}={_format(v)}" for k, v in {"event": name, **self.tags, **fields}.items())
        logger.info(line)
        return line

    def first_traffic(self) -> None:
        if not self._served_first:
            self._served_first = True
            self.event("TRAFFIC", since_start_s=time.monotonic() - self.started)


class InFlight:
    """Counts requests in progress, so a stopping replica can report its drain; `on_change` sees
    every new count (a metrics gauge, say)."""

    def __init__(self, on_change: Callable[[int], None] | None = None) -> None:
        self.count = 0
        self._on_change = on_change

    @contextmanager
    def track(self) -> Iterator[None]:
        self._set(self.count + 1)
        try:
            yield
        finally:
            self._set(self.count - 1)

    def _set(self, count: int) -> None:
        self.count = count
        if self._on_change is not None:
            self._on_change(count)
