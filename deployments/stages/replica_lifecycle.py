"""What every stage's replica does around its `rag` object: timed load + warm-up, drain, cleanup.

Events go through `rag.lifecycle.LifecycleLog` (the replica's log, the node's event file) and count in
`rag_lifecycle_events_total`. The drain's start is read from Serve's drain loop (`drain_log`, the one
parser of a Serve message); without it, `stop` reports the drain from the replica's own in-flight count.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable

from ray import serve

from deployments.stages.drain_log import DrainWatcher
from deployments.stages.replica_metrics import StageMetrics
from rag.devices import device_memory
from rag.lifecycle import InFlight, LifecycleLog

Timings = dict[str, float] | None


def _log_through_serve() -> None:
    """Send the library's `rag.*` log lines to the replica's Serve log handlers (file, stderr), which
    tag them with the replica; the library itself stays free of Ray."""
    rag_logger, serve_logger = logging.getLogger("rag"), logging.getLogger("ray.serve")
    if not rag_logger.handlers:
        for handler in serve_logger.handlers:
            rag_logger.addHandler(handler)
        rag_logger.setLevel(logging.INFO)
        rag_logger.propagate = False


class ReplicaLifecycle:
    """Lifecycle events, in-flight accounting and metrics of one replica."""

    def __init__(self, version: str) -> None:
        _log_through_serve()
        ctx = serve.get_replica_context()
        self.metrics = StageMetrics(version)
        self.log = LifecycleLog(ctx.deployment, version, ctx.replica_tag, on_event=self.metrics.count_event)
        self.in_flight = InFlight(self.metrics.set_in_flight)
        self._stop_requested_at: float | None = None
        self._drain_watcher = DrainWatcher.attach(self._on_drain)

    async def start(self, what: str, load: Callable[[], None], warmup: Callable[[], Awaitable[Timings] | Timings],
                    extra_delay_s: float = 0.0) -> None:
        """Load, then warm up with a real call, before `__init__` returns: Serve routes to a replica
        only after its constructor finished, so no request ever reaches a cold one. Timings the
        warm-up returns (compile seconds, ...) go into the READY line; the metric counts them all."""
        self.log.event("STARTUP", loads=what)
        began = time.monotonic()
        load()
        loaded = time.monotonic()
        timings = warmup()
        if inspect.isawaitable(timings):
            timings = await timings
        if extra_delay_s:
            await asyncio.sleep(extra_delay_s)
        total = time.monotonic() - began
        self.metrics.model_load.set(total)
        self.metrics.started(load=loaded - began, warmup=time.monotonic() - loaded)
        self.log.event("READY", load_s=loaded - began, warmup_s=time.monotonic() - loaded, total_s=total,
                       **(timings or {}))

    def _on_drain(self, ongoing: int) -> None:
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
            self.log.event("SHUTDOWN", in_flight=ongoing)
        self.log.event("DRAINING", in_flight=ongoing)

    def stop(self, close: Callable[[], None]) -> None:
        """Serve calls `__del__` after the drain: free the model and say what was freed."""
        logging.getLogger("ray.serve").removeFilter(self._drain_watcher)
        if self._stop_requested_at is None:  # no drain line was read: report the drain from our own count
            self._on_drain(self.in_flight.count)
        before = device_memory()
        close()
        after = device_memory()
        grace = time.monotonic() - (self._stop_requested_at or time.monotonic())
        self.metrics.grace_used.set(grace)
        self.log.event("CLEANUP", grace_used_s=grace, cuda_allocated_before=before["allocated"],
                       cuda_allocated_after=after["allocated"], cuda_reserved_after=after["reserved"])
