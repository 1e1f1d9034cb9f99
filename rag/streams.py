"""Coalescing a fast stream into batches, so each hop between processes carries many pieces.

Every message between Serve replicas costs about a millisecond per hop, so an answer streamed one
word at a time through Generator → Pipeline → Gateway spends most of its time in transit. Batching
keeps the first piece immediate (time to first token is unchanged) and then gathers what arrives
within a short window.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class _Failed:
    error: BaseException


class _End:
    pass


async def batched(source: AsyncIterator[T], window_s: float = 0.02, max_items: int = 256, immediate: int = 1
                  ) -> AsyncIterator[list[T]]:
    """Lists of consecutive items of `source`: the first `immediate` batches sent as soon as they have an
    item (what is queued already goes along), then whatever arrives within `window_s` of each batch's
    first item (at most `max_items`). An error from `source` is raised after the items that came before
    it; closing this generator closes `source`."""
    queue: asyncio.Queue[T | _Failed | _End] = asyncio.Queue()
    pump = asyncio.create_task(_pump(source, queue))
    try:
        sent = 0
        while True:
            batch, ended = await _gather(queue, 0.0 if sent < immediate else window_s, max_items)
            sent += 1
            if batch:
                yield batch
            if isinstance(ended, _Failed):
                raise ended.error
            if ended is not None:
                return
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump


async def _pump(source: AsyncIterator[T], queue: asyncio.Queue[T | _Failed | _End]) -> None:
    try:
        async for item in source:
            queue.put_nowait(item)
    except Exception as exc:
        queue.put_nowait(_Failed(exc))
        return
    finally:
        close = getattr(source, "aclose", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()
    queue.put_nowait(_End())


async def _gather(queue: asyncio.Queue[T | _Failed | _End], window_s: float, max_items: int
                  ) -> tuple[list[T], _Failed | _End | None]:
    batch: list[T] = []
    item = await queue.get()
    deadline = asyncio.get_running_loop().time() + window_s
    while True:
        if isinstance(item, _Failed | _End):
            return batch, item
        batch.append(item)
        if len(batch) >= max_items:
            return batch, None
        remaining = deadline - asyncio.get_running_loop().time()
        if queue.empty() and remaining <= 0:
            return batch, None
        try:
            item = queue.get_nowait() if not queue.empty() else await asyncio.wait_for(queue.get(), remaining)
        except TimeoutError:
            return batch, None


async def flatten(batches: AsyncIterator[list[T]]) -> AsyncIterator[T]:
    """The items of a stream of batches, one by one."""
    async for batch in batches:
        for item in batch:
            yield item
