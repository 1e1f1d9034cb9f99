"""Injected faults for demos and tests: a version that fails or slows a fraction of its answers."""

from __future__ import annotations

import asyncio
import random

from rag.config import FaultConfig


class InjectedFault(RuntimeError):
    """Raised on purpose before an answer starts. Not a `RagError`: to the gateway it looks like any
    infrastructure failure, so it is retried on another version, as a real canary failure would be."""


class FaultInjector:
    def __init__(self, config: FaultConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.Random()

    async def before_answer(self) -> None:
        if self.config.extra_latency_s:
            await asyncio.sleep(self.config.extra_latency_s)
        if self.config.error_rate and self._rng.random() < self.config.error_rate:
            raise InjectedFault(f"injected fault (faults.error_rate={self.config.error_rate})")
