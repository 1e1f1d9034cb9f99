"""Per-version request outcomes over a sliding time window: what a rollout compares."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Outcome:
    at: float
    ok: bool
    first_token_s: float | None


class VersionStats:
    """Keeps the last `capacity` outcomes per version and summarises any recent window."""

    def __init__(self, capacity: int = 20_000) -> None:
        self._records: dict[str, deque[Outcome]] = {}
        self._in_flight: dict[str, int] = {}
        self._capacity = capacity
        self._lock = threading.Lock()

    def started(self, version: str) -> None:
        with self._lock:
            self._in_flight[version] = self._in_flight.get(version, 0) + 1

    def finished(self, version: str, ok: bool, first_token_s: float | None) -> None:
        with self._lock:
            self._in_flight[version] = self._in_flight.get(version, 1) - 1
            records = self._records.setdefault(version, deque(maxlen=self._capacity))
            records.append(Outcome(time.time(), ok, first_token_s))

    def failed_to_start(self, version: str) -> None:
        """An attempt that failed before its first event (and may have been retried elsewhere)."""
        with self._lock:
            self._records.setdefault(version, deque(maxlen=self._capacity)).append(Outcome(time.time(), False, None))

    def summary(self, window_s: float | None = None) -> dict[str, dict[str, Any]]:
        since = time.time() - window_s if window_s else 0.0
        with self._lock:
            versions = set(self._records) | set(self._in_flight)
            return {v: self._summarise(v, since) for v in sorted(versions)}

    def _summarise(self, version: str, since: float) -> dict[str, Any]:
        recent = [r for r in self._records.get(version, ()) if r.at >= since]
        errors = sum(1 for r in recent if not r.ok)
        ttfts = sorted(r.first_token_s for r in recent if r.first_token_s is not None)
        return {"requests": len(recent), "errors": errors,
                "error_rate": errors / len(recent) if recent else 0.0, "ttft_samples": len(ttfts),
                **{ttft_key(q): quantile(ttfts, q) for q in TTFT_QUANTILES},
                "in_flight": self._in_flight.get(version, 0)}


TTFT_QUANTILES = (0.5, 0.9, 0.99)


def ttft_key(q: float) -> str:
    return f"ttft_p{round(q * 100)}_s"


def quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile of sorted `values`: p99 of 100 values is the 99th, not the largest."""
    return values[max(0, math.ceil(q * len(values)) - 1)] if values else None
