"""The coalescer: a lone call runs at once, calls that arrive while a batch runs share the next one."""

from __future__ import annotations

import asyncio

import pytest

from rag.coalescing import Coalescer


class Recorder:
    """A batch function that records its batches and can be held open until released."""

    def __init__(self, hold_first: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self._hold = hold_first

    async def __call__(self, items: list[int]) -> list[int | Exception]:
        self.batches.append(items)
        if self._hold and len(self.batches) == 1:
            await self.release.wait()
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


async def _turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_lone_call_runs_at_once_without_waiting_for_company() -> None:
    async def main() -> None:
        recorder = Recorder()
        call = asyncio.create_task(Coalescer(recorder, max_batch=8)(3))
        await _turns()  # a few loop turns, no time: the batch has run
        assert recorder.batches == [[3]] and call.done() and call.result() == 30
    asyncio.run(main())


def test_calls_that_arrive_while_a_batch_runs_share_the_next_one_up_to_max_batch() -> None:
    async def main() -> None:
        recorder = Recorder(hold_first=True)
        coalescer = Coalescer(recorder, max_batch=3)
        first = asyncio.create_task(coalescer(0))
        await _turns()
        rest = [asyncio.create_task(coalescer(i)) for i in range(1, 6)]
        await _turns()
        assert recorder.batches == [[0]]  # the others wait for the running batch, not for a timer
        recorder.release.set()
        assert await asyncio.gather(first, *rest) == [0, 10, 20, 30, 40, 50]
        assert recorder.batches == [[0], [1, 2, 3], [4, 5]]
    asyncio.run(main())


def test_an_item_that_fails_fails_only_its_own_caller() -> None:
    async def main() -> None:
        recorder = Recorder(hold_first=True)
        coalescer = Coalescer(recorder, max_batch=8)
        first = asyncio.create_task(coalescer(1))
        await _turns()
        good, bad = asyncio.create_task(coalescer(2)), asyncio.create_task(coalescer(-1))
        recorder.release.set()
        assert await first == 10 and await good == 20
        with pytest.raises(ValueError, match="bad -1"):
            await bad
        assert recorder.batches == [[1], [2, -1]]
    asyncio.run(main())


def test_a_batch_that_raises_or_miscounts_fails_every_caller_in_it_and_the_next_batch_still_runs() -> None:
    async def main() -> None:
        answers: list[object] = [RuntimeError("model gone"), [1], [5, 6]]

        async def flaky(items: list[int]) -> list[int]:
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            assert isinstance(answer, list)
            return answer
        coalescer: Coalescer[int, int] = Coalescer(flaky, max_batch=8)
        with pytest.raises(RuntimeError, match="model gone"):
            await coalescer(1)
        results = await asyncio.gather(coalescer(1), coalescer(2), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "a batch of 2 gave 1 results" in str(r) for r in results)
        assert await asyncio.gather(coalescer(5), coalescer(6)) == [5, 6]
    asyncio.run(main())


def test_a_caller_that_went_away_is_left_out_and_the_others_are_answered() -> None:
    async def main() -> None:
        recorder = Recorder(hold_first=True)
        coalescer = Coalescer(recorder, max_batch=8)
        first = asyncio.create_task(coalescer(1))
        await _turns()
        gone, kept = asyncio.create_task(coalescer(2)), asyncio.create_task(coalescer(3))
        await _turns()
        gone.cancel()
        recorder.release.set()
        assert await first == 10 and await kept == 30
        assert recorder.batches == [[1], [3]]
    asyncio.run(main())


def test_a_wait_holds_a_batch_that_is_not_full_for_company() -> None:
    async def main() -> None:
        recorder = Recorder()
        coalescer = Coalescer(recorder, max_batch=8, wait_s=0.05)
        first = asyncio.create_task(coalescer(1))
        await _turns()
        assert recorder.batches == []  # held for company
        assert await asyncio.gather(first, coalescer(2)) == [10, 20]
        assert recorder.batches == [[1, 2]]
    asyncio.run(main())
