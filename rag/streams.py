"""Coalescing a fast stream into batches, so each hop between processes carries many pieces.

Every message between Serve replicas costs about a millisecond per hop, so an answer streamed one
word at a time through Generator → Pipeline → Gateway spends most of its time in transit. Batching
keeps the first piece immediate (time to first token is unchanged) and then gathers what arrives
within a short window. Within a batch, `join_text` makes one piece of the text pieces: they reach the
client at the same moment anyway, and every piece costs each process on the way (and the client) an
object, a pickle and an SSE event of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

from rag.records import GenerationChunk

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


def join_text(batch: list[GenerationChunk]) -> list[GenerationChunk]:
    """`batch` with each run of plain text pieces joined into one piece that counts them (`pieces`); a
    piece that ends the stream or carries a token count stays as it is, in its place."""
    joined: list[GenerationChunk] = []
    for chunk in batch:
        last = joined[-1] if joined else None
        if last is not None and _plain(last) and _plain(chunk):
            joined[-1] = GenerationChunk(last.text + chunk.text, pieces=last.pieces + chunk.pieces)
        else:
            joined.append(chunk)
    return joined


def _plain(chunk: GenerationChunk) -> bool:
    return chunk.finish_reason is None and chunk.completion_tokens is None
