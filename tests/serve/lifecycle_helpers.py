"""Helpers for the lifecycle tests: replica ids, lifecycle events from the replica logs, actors."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from deployments import ops
from rag.loadgen import LoadResult

EVENT = re.compile(r"event=(\w+) deployment=(\w+) version=(\S+) replica=(\w+)(.*)$")


def replicas(dashboard: str, app: str, deployment: str, state: str = "RUNNING") -> set[str]:
    details = ops.applications(dashboard).get(app, {}).get("deployments", {}).get(deployment, {})
    return {r["replica_id"] for r in details.get("replicas", []) if r.get("state") == state}


def wait_for(condition: Any, timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"gave up after {timeout_s}s waiting for {what}")


def assert_clean(result: LoadResult, min_sent: int) -> None:
    """The load sent enough requests and none failed, was truncated or broke the connection."""
    assert result.sent >= min_sent and not result.errors, result.errors[:3]
    assert not result.failed, [(a.status, a.error) for a in result.failed[:3]]
    assert not result.truncated, [a.error for a in result.truncated[:3]]


def session_logs() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"


def lifecycle_events(replica: str) -> list[tuple[str, str]]:
    """(event, rest of line) for one replica, in the order it logged them."""
    found: list[tuple[str, str]] = []
    for path in session_logs().glob(f"replica_*_{replica}.log"):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if (match := EVENT.search(line)) and match.group(4) == replica:
                found.append((match.group(1), match.group(5)))
    return found
