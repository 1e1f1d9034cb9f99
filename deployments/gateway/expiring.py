"""What a version says about itself (its config, its Embedder's model), kept for a few seconds by version
name. Never longer: a version rolled back and redeployed under the same name may run another model, and
such a redeploy takes far longer than the few seconds a value is trusted."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
TRUSTED_S = 10.0


class Expiring(Generic[T]):
    def __init__(self, ttl_s: float = TRUSTED_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._values: dict[str, tuple[float, T]] = {}

    async def get(self, key: str, ask: Callable[[], Awaitable[T]]) -> T:
        """The value for `key`, asked again once it is older than the TTL."""
        entry = self._values.get(key)
        if entry is not None and self._clock() - entry[0] <= self._ttl_s:
            return entry[1]
        value = await ask()
        self._values[key] = (self._clock(), value)
        return value
