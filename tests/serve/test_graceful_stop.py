"""The graceful stop on a real cluster: /ready turns to draining, streams in flight all finish, new
requests are refused cleanly, and the applications are removed."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from deployments import ops
from rag.loadgen import LoadGenerator
from tests.serve.conftest import running_service
from tests.serve.lifecycle_helpers import wait_for

pytestmark = pytest.mark.cluster


def _watch_ready(gateway: str, stop: threading.Event, seen: list[str]) -> None:
    with httpx.Client(base_url=gateway, timeout=5) as client:
        for _ in range(2000):
            if stop.wait(0.2):
                return
            try:
                seen.append(client.get("/ready").json().get("status", "?"))
            except (httpx.HTTPError, ValueError):
                seen.append("gone")


def test_graceful_stop_finishes_every_stream(tmp_path: Path) -> None:
    paced = {"generation": {"extractive_piece_delay_s": 0.04}}
    with running_service(tmp_path, pipeline_args=paced) as service:
        seen: list[str] = []
        stop = threading.Event()
        watcher = threading.Thread(target=_watch_ready, args=(service.gateway, stop, seen))
        watcher.start()
        with LoadGenerator(service.gateway, api_key=service.api_key, concurrency=6, max_seconds=120) as load:
            wait_for(lambda: len(load.result.answers) >= 6, 30, "the load to get going")
            ops.graceful_stop(service.config_path, dashboard=service.dashboard, gateway=service.gateway,
                              stop_cluster=False, say=lambda *_: None)
            apps_left = ops.applications(service.dashboard)
        stop.set()
        watcher.join()

    result = load.result
    assert apps_left == {}
    assert "ready" in seen and "draining" in seen
    assert seen.index("draining") > seen.index("ready")
    assert not result.truncated, [a.error for a in result.truncated[:3]]
    assert len([a for a in result.answers if a.complete]) >= 6
    # Requests that arrived after the drain began were refused before any byte was streamed.
    assert {a.status for a in result.failed} <= {503, 404}
