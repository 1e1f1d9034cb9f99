"""Per-version request stats and fault injection."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from rag.config import FaultConfig
from rag.faults import FaultInjector, InjectedFault
from rag.quantiles import quantile
from rag.stats import VersionStats


def test_stats_count_errors_in_flight_and_percentiles() -> None:
    stats = VersionStats(capacity=1000)
    for i in range(100):
        stats.started("v1")
        stats.finished("v1", ok=i % 10 != 0, first_token_s=i / 100)
    stats.started("v2")
    stats.failed_to_start("v2")
    summary = stats.summary()
    assert summary["v1"]["requests"] == 100 and summary["v1"]["errors"] == 10
    assert summary["v1"]["error_rate"] == pytest.approx(0.1)
    # Nearest rank over 0.00 .. 0.99: the 50th, 90th and 99th smallest values.
    assert summary["v1"]["ttft_samples"] == 100
    assert [summary["v1"][k] for k in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s")] == pytest.approx([0.49, 0.89, 0.98])
    assert summary["v1"]["in_flight"] == 0
    assert summary["v2"] == {**summary["v2"], "in_flight": 1, "errors": 1}


def test_quantile_is_nearest_rank() -> None:
    assert quantile([], 0.5) is None
    assert quantile([1.0], 0.99) == 1.0
    assert quantile([float(i) for i in range(1, 11)], 0.9) == 9.0  # not the maximum of ten
    assert quantile([float(i) for i in range(1, 11)], 0.5) == 5.0


def test_stats_window_and_capacity() -> None:
    stats = VersionStats(capacity=5)
    for _ in range(8):
        stats.started("v1")
        stats.finished("v1", ok=True, first_token_s=0.1)
    assert stats.summary()["v1"]["requests"] == 5
    time.sleep(0.05)
    assert stats.summary(window_s=0.01)["v1"]["requests"] == 0


def test_faults_off_by_default_and_rate_is_honoured() -> None:
    asyncio.run(FaultInjector(FaultConfig()).before_answer())
    injector = FaultInjector(FaultConfig(error_rate=0.3), rng=random.Random(7))

    async def outcomes() -> int:
        failures = 0
        for _ in range(1000):
            try:
                await injector.before_answer()
            except InjectedFault:
                failures += 1
        return failures

    assert 250 <= asyncio.run(outcomes()) <= 350


def test_fault_latency_is_added() -> None:
    began = time.perf_counter()
    asyncio.run(FaultInjector(FaultConfig(extra_latency_s=0.2)).before_answer())
    assert time.perf_counter() - began >= 0.2


def test_answers_that_waited_for_a_cold_start_count_for_errors_not_latency() -> None:
    stats = VersionStats()
    for _ in range(10):
        stats.started("v2")
        stats.finished("v2", ok=True, first_token_s=0.1)
    stats.started("v2")
    stats.finished("v2", ok=False, first_token_s=None, cold=True)
    stats.started("v2")
    stats.finished("v2", ok=True, first_token_s=12.0, cold=True)  # the replica's start, not the version's speed
    summary = stats.summary()["v2"]
    assert (summary["requests"], summary["errors"], summary["cold_starts"]) == (12, 1, 2)
    assert summary["ttft_samples"] == 10 and summary["ttft_p90_s"] == pytest.approx(0.1)
