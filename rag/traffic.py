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
        self.weights = {name: w for name, w in sorted(config.weights.items()) if w > 0}
        self._rng = rng or random.Random()

    @property
    def live(self) -> list[str]:
        """Versions with weight > 0: the ones that must be serving before the service is ready."""
        return list(self.weights)

    def choose(self, key: str | None = None, among: list[str] | None = None) -> str:
        """A version by weight; `among` narrows the choice (to the versions that are ready, say)
        while keeping the others' proportions."""
        versions = [v for v in self.weights if among is None or v in among] or list(self.weights)
        bounds = list(accumulate(self.weights[v] for v in versions))
        point = self._point(key) * bounds[-1]
        return versions[min(bisect_right(bounds, point), len(versions) - 1)]

    def _point(self, key: str | None) -> float:
        if key is None:
            return self._rng.random()
        # A hash, not Python's hash(): stable across processes, so every gateway replica agrees.
        digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64
