"""Per-version request outcomes over a sliding time window: what a rollout compares.

Each gateway replica keeps its own `VersionStats` and hands the outcomes it recorded since the last
hand-over (`take_new`) to one `MergedStats`, so the numbers a rollout judges cover every replica."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from rag.quantiles import TTFT_QUANTILES, quantile, ttft_key
from rag.shadow import Dropped, Pair, ShadowRecord, summarise


@dataclass(frozen=True)
class Outcome:
    at: float
    ok: bool
    first_token_s: float | None
    cold: bool = False  # it waited for a stage to start from zero replicas: its latency is the cold start's
    # The version refused the request as the client's fault (its HTTP status): not an error of the version
    # by itself, but a rollout compares the rate per status with the stable version's.
    refused: str = ""


Record = Outcome | Pair | Dropped


class VersionStats:
    """Keeps the last `capacity` outcomes per version and summarises any recent window."""

    def __init__(self, capacity: int = 20_000) -> None:
        self._records: dict[str, deque[Outcome]] = {}
        self._shadow: dict[str, deque[ShadowRecord]] = {}  # per candidate version
        self._in_flight: dict[str, int] = {}
        self._new: list[tuple[str, Record]] = []
        self._capacity = capacity
        self._lock = threading.Lock()

    def started(self, version: str) -> None:
        with self._lock:
            self._in_flight[version] = self._in_flight.get(version, 0) + 1

    def finished(self, version: str, ok: bool, first_token_s: float | None, cold: bool = False) -> None:
        with self._lock:
            self._in_flight[version] = self._in_flight.get(version, 1) - 1
            self._record(version, Outcome(time.time(), ok, first_token_s, cold))

    def failed_to_start(self, version: str) -> None:
        """An attempt that failed before its first event (and may have been retried elsewhere)."""
        with self._lock:
            self._record(version, Outcome(time.time(), False, None))

    def refused(self, version: str, status: int) -> None:
        """A request the version refused as the client's fault (400, 404): compared, not counted as error."""
        with self._lock:
            self._record(version, Outcome(time.time(), False, None, refused=str(status)))

    def shadow(self, candidate: str, record: ShadowRecord) -> None:
        """A compared pair (or a copy dropped) for the rollout's candidate."""
        with self._lock:
            self._record(candidate, record)

    def add(self, version: str, record: Record) -> None:
        """A record made elsewhere (another gateway replica)."""
        with self._lock:
            self._store(version, record)

    def _store(self, version: str, record: Record) -> None:
        store: dict[str, deque[Any]] = self._records if isinstance(record, Outcome) else self._shadow
        store.setdefault(version, deque(maxlen=self._capacity)).append(record)

    def _record(self, version: str, record: Record) -> None:
        self._store(version, record)
        self._new.append((version, record))
        del self._new[:-self._capacity]

    def take_new(self) -> list[tuple[str, Record]]:
        """Outcomes recorded since the last call, for the merged view."""
        with self._lock:
            new, self._new = self._new, []
            return new

    def give_back(self, outcomes: list[tuple[str, Record]]) -> None:
        """Outcomes that could not be handed over, to go with the next hand-over."""
        with self._lock:
            self._new[:0] = outcomes
            del self._new[:-self._capacity]

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            return dict(self._in_flight)

    def summary(self, window_s: float | None = None,
                in_flight: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
        """Per version over the last `window_s` seconds; `in_flight` replaces this replica's own counts."""
        since = time.time() - window_s if window_s else 0.0
        with self._lock:
            counts = self._in_flight if in_flight is None else in_flight
            versions = set(self._records) | set(self._shadow) | set(counts)
            return {v: self._summarise(v, since, counts.get(v, 0)) for v in sorted(versions)}

    def _summarise(self, version: str, since: float, in_flight: int) -> dict[str, Any]:
        recent = [r for r in self._records.get(version, ()) if r.at >= since]
        refused = [r.refused for r in recent if r.refused]
        errors = sum(1 for r in recent if not r.ok and not r.refused)
        # An answer that waited for a cold start counts for errors, not for latency: its time to first
        # token measures the start of a replica, which `cold_starts` reports apart.
        ttfts = sorted(r.first_token_s for r in recent if r.first_token_s is not None and not r.cold)
        summary = {"requests": len(recent), "errors": errors, "cold_starts": sum(1 for r in recent if r.cold),
                   "error_rate": errors / len(recent) if recent else 0.0,
                   "refused": {s: refused.count(s) for s in sorted(set(refused))}, "ttft_samples": len(ttfts),
                   **{ttft_key(q): quantile(ttfts, q) for q in TTFT_QUANTILES}, "in_flight": in_flight}
        shadow = [r for r in self._shadow.get(version, ()) if r.at >= since]
        if shadow:
            summary["shadow"] = summarise(shadow)
        return summary


class MergedStats:
    """The outcomes of every gateway replica, and their in-flight counts as last reported. A replica that
    stopped reporting for `stale_after_s` (stopped, or lost with its node) no longer counts as in flight."""

    def __init__(self, capacity: int = 20_000, stale_after_s: float = 10.0) -> None:
        self._outcomes = VersionStats(capacity)
        self._in_flight: dict[str, tuple[float, dict[str, int]]] = {}
        self._stale_after_s = stale_after_s

    def report(self, replica: str, outcomes: list[tuple[str, Record]], in_flight: dict[str, int]) -> None:
        for version, outcome in outcomes:
            self._outcomes.add(version, outcome)
        self._in_flight[replica] = (time.monotonic(), in_flight)

    def summary(self, window_s: float | None = None) -> dict[str, dict[str, Any]]:
        totals: dict[str, int] = {}
        for seen, counts in self._in_flight.values():
            if time.monotonic() - seen <= self._stale_after_s:
                for version, n in counts.items():
                    totals[version] = totals.get(version, 0) + n
        return self._outcomes.summary(window_s, totals)

    @property
    def replicas(self) -> int:
        return len(self._in_flight)
