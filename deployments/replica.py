"""What every stage's replica does around its `rag` object: timed load + warm-up, drain, cleanup."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

from ray import serve

from rag.devices import device_memory
from rag.lifecycle import InFlight, LifecycleLog


def lifecycle_log(version: str) -> LifecycleLog:
    ctx = serve.get_replica_context()
    return LifecycleLog(ctx.deployment, version, ctx.replica_tag)


async def start_stage(log: LifecycleLog, what: str, load: Callable[[], None],
                      warmup: Callable[[], Awaitable[None] | None], extra_delay_s: float = 0.0) -> None:
    """Load, then warm up with a real call, before `__init__` returns: Serve routes to a replica
    only after its constructor finished, so no request ever reaches a cold one."""
    log.event("STARTUP", loads=what)
    began = time.monotonic()
    load()
    loaded = time.monotonic()
    result = warmup()
    if inspect.isawaitable(result):
        await result
    if extra_delay_s:
        await asyncio.sleep(extra_delay_s)
    log.event("READY", load_s=loaded - began, warmup_s=time.monotonic() - loaded,
              total_s=time.monotonic() - began)


def stop_stage(log: LifecycleLog, in_flight: InFlight, close: Callable[[], None]) -> None:
    """Serve calls `__del__` after draining: free the model and say what was freed."""
    log.event("SHUTDOWN", in_flight=in_flight.count)
    before = device_memory()
    close()
    after = device_memory()
    log.event("CLEANUP", cuda_allocated_before=before["allocated"], cuda_allocated_after=after["allocated"],
              cuda_reserved_after=after["reserved"])

