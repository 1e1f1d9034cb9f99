"""Which pipeline version answers a request: weighted random, or sticky for a conversation/user id."""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_right
from itertools import accumulate

from rag.config import TrafficConfig


class TrafficSplit:
    """Picks a version in proportion to its weight; the same key always gets the same version."""

    def __init__(self, config: TrafficConfig, rng: random.Random | None = None) -> None:
        live = sorted((name, w) for name, w in config.weights.items() if w > 0)
        self.versions = [name for name, _ in live]
        self._bounds = list(accumulate(w for _, w in live))
        self._rng = rng or random.Random()

    @property
    def live(self) -> list[str]:
        """Versions with weight > 0: the ones that must be serving before the service is ready."""
        return list(self.versions)

    def choose(self, key: str | None = None) -> str:
        point = self._point(key) * self._bounds[-1]
        return self.versions[min(bisect_right(self._bounds, point), len(self.versions) - 1)]

    def _point(self, key: str | None) -> float:
        if key is None:
            return self._rng.random()
        # A hash, not Python's hash(): stable across processes, so every gateway replica agrees.
        digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64
