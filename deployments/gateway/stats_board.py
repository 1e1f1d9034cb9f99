"""One place where every gateway replica's request outcomes meet, so `/stats` (and the rollout that
judges by it) covers the whole gateway, whichever replica answers the call.

A small named Ray actor holding a `MergedStats`; each gateway replica hands it the outcomes it recorded
since its last report, every `PUSH_INTERVAL_S`. Detached, so it outlives any one gateway replica and
application update; it ends with the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import ray

from rag.stats import MergedStats, VersionStats

logger = logging.getLogger("rag.gateway")
BOARD_NAME, BOARD_NAMESPACE = "rag_stats_board", "rag"
PUSH_INTERVAL_S = 0.5


@ray.remote(num_cpus=0, max_restarts=-1)
class StatsBoard:
    def __init__(self, capacity: int) -> None:
        self._merged = MergedStats(capacity)

    def report(self, replica: str, outcomes: list[Any], in_flight: dict[str, int]) -> None:
        self._merged.report(replica, outcomes, in_flight)

    def summary(self, window_s: float | None) -> dict[str, Any]:
        return {"versions": self._merged.summary(window_s), "replicas": self._merged.replicas}


def stats_board(capacity: int) -> Any:
    return StatsBoard.options(name=BOARD_NAME, namespace=BOARD_NAMESPACE, get_if_exists=True,  # type: ignore[attr-defined]
                              lifetime="detached").remote(capacity)


async def report_forever(board: Any, replica: str, stats: VersionStats, stop: asyncio.Event) -> None:
    """Hand this replica's new outcomes and in-flight counts to the board until `stop` is set; outcomes
    a failed report could not deliver go with the next one."""
    while not stop.is_set():
        outcomes = stats.take_new()
        try:
            await asyncio.wait_for(board.report.remote(replica, outcomes, stats.in_flight()), 5)
        except Exception as exc:
            stats.give_back(outcomes)
            logger.warning("event=STATS_REPORT_FAILED replica=%s error=%r", replica, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PUSH_INTERVAL_S)
