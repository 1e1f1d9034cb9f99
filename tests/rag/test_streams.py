"""Coalescing streams into batches, and a batch's text pieces into one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from rag.records import GenerationChunk
from rag.streams import batched, flatten, join_text


async def _paced(n: int, delay_s: float, fail_at: int | None = None) -> AsyncIterator[int]:
    for i in range(n):
        if i == fail_at:
            raise ValueError("boom")
        yield i
        await asyncio.sleep(delay_s)


def _collect(source: AsyncIterator[int], **kwargs: float) -> list[list[int]]:
    async def run() -> list[list[int]]:
        return [b async for b in batched(source, **kwargs)]  # type: ignore[arg-type]

    return asyncio.run(run())


def test_first_item_alone_then_bursts_coalesce() -> None:
    batches = _collect(_paced(100, 0), window_s=0.05)
    assert batches[0] == [0]
    assert [i for b in batches for i in b] == list(range(100))
    assert len(batches) <= 5


def test_the_first_immediate_batches_do_not_wait_for_a_window() -> None:
    """The Pipeline's sources and first answer piece: neither may wait for company."""
    async def sources_then_answer() -> AsyncIterator[int]:
        for i in range(5):
            yield i
            await asyncio.sleep(0.05)

    assert _collect(sources_then_answer(), window_s=5.0)[:2] == [[0], [1, 2, 3, 4]]  # the window held back 1
    assert _collect(sources_then_answer(), window_s=5.0, immediate=2)[:3] == [[0], [1], [2, 3, 4]]


def test_slow_source_is_not_held_back() -> None:
    batches = _collect(_paced(5, 0.05), window_s=0.005)
    assert [i for b in batches for i in b] == list(range(5))
    assert len(batches) == 5


def test_max_items_bounds_a_batch() -> None:
    batches = _collect(_paced(50, 0), window_s=1.0, max_items=8)
    assert max(len(b) for b in batches) <= 8 and sum(map(len, batches)) == 50


def test_error_comes_after_the_items_before_it() -> None:
    seen: list[int] = []

    async def run() -> None:
        async for batch in batched(_paced(10, 0, fail_at=6), window_s=0.05):
            seen.extend(batch)

    with pytest.raises(ValueError, match="boom"):
        asyncio.run(run())
    assert seen == list(range(6))


def test_closing_early_closes_the_source() -> None:
    closed = asyncio.Event()

    async def source() -> AsyncIterator[int]:
        try:
            for i in range(1000):
                yield i
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    async def run() -> bool:
        stream = batched(source(), window_s=0.01)
        await anext(stream)
        await stream.aclose()
        await asyncio.sleep(0.05)
        return closed.is_set()

    assert asyncio.run(run())


def test_flatten_restores_the_items() -> None:
    async def run() -> list[int]:
        return [i async for i in flatten(batched(_paced(30, 0), window_s=0.01))]

    assert asyncio.run(run()) == list(range(30))


def test_a_batchs_text_pieces_become_one_that_counts_them() -> None:
    batch = [GenerationChunk("Stop "), GenerationChunk("it "), GenerationChunk("with "), GenerationChunk("make stop.")]
    assert join_text(batch) == [GenerationChunk("Stop it with make stop.", pieces=4)]
    assert join_text([GenerationChunk("one")]) == [GenerationChunk("one")] and join_text([]) == []


def test_the_end_of_a_stream_and_a_backends_token_count_stay_in_their_place() -> None:
    end, counted = GenerationChunk("", "stop"), GenerationChunk(" tail", "length", completion_tokens=9)
    assert join_text([GenerationChunk("a"), GenerationChunk("b"), end]) == [GenerationChunk("ab", pieces=2), end]
    assert join_text([GenerationChunk("a"), counted, GenerationChunk("b"), GenerationChunk("c")]) == [
        GenerationChunk("a"), counted, GenerationChunk("bc", pieces=2)]
