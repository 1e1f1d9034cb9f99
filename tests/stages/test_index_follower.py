"""The Retriever replica's follow loop, without Ray: ticks, reports changes, survives errors, stops on cancel."""

from __future__ import annotations

import asyncio
import logging

import pytest

from deployments.stages.index_follower import follow_forever, reader_id_for
from rag.leases import check_reader_id
from rag.retrieval import Change


def test_loop_reports_changes_and_survives_failing_refreshes(caplog: pytest.LogCaptureFixture) -> None:
    outcomes: list[list[Change] | Exception] = [RuntimeError("disk gone"), [("a", 1, 2)], [],
                                                [("b", None, 1), ("c", 3, None)]]
    seen: list[Change] = []
    done = asyncio.Event()

    def refresh() -> list[Change]:
        outcome = outcomes.pop(0)
        if not outcomes:
            done.set()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def run() -> None:
        task = asyncio.create_task(follow_forever(refresh, 0.001, seen.append))
        await asyncio.wait_for(done.wait(), 5)
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.ERROR, logger="rag.retrieval"):
        asyncio.run(run())
    assert seen == [("a", 1, 2), ("b", None, 1), ("c", 3, None)]
    assert "disk gone" in caplog.text


@pytest.mark.parametrize(("app", "replica"), [("v1", "abc123"), ("../x", "a/b"), (".hidden", "é" * 300)])
def test_reader_ids_are_always_valid(app: str, replica: str) -> None:
    assert check_reader_id(reader_id_for(app, replica)).startswith("r-")
