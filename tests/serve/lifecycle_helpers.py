"""Helpers for the lifecycle tests: replica ids, the lifecycle events the replicas emit, waiting."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from control import cluster
from rag.lifecycle import read_events
from rag.loadgen import LoadResult
from tests.support.service import LocalService


def replicas(dashboard: str, app: str, deployment: str, state: str = "RUNNING") -> set[str]:
    details = cluster.applications(dashboard).get(app, {}).get("deployments", {}).get(deployment, {})
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


def lifecycle_events(service: LocalService, replica: str) -> list[tuple[str, dict[str, Any]]]:
    """(event, its fields) for one replica, in the order it emitted them, from the cluster's event file."""
    return [(e["event"], e) for e in read_events(service.events_file) if e.get("replica") == replica]


def watch_ready(gateway: str, stop: threading.Event, seen: list[str]) -> None:
    """Append what `/ready` says every 0.2 s ("gone" when nothing answers) until `stop`."""
    with httpx.Client(base_url=gateway, timeout=5) as client:
        for _ in range(2000):
            if stop.wait(0.2):
                return
            try:
                seen.append(client.get("/ready").json().get("status", "?"))
            except (httpx.HTTPError, ValueError):
                seen.append("gone")


@dataclass
class StartUp:
    probes: list[tuple[float, int, str]] = field(default_factory=list)  # (when, /ready status, its word)
    chats: list[tuple[float, int]] = field(default_factory=list)  # (when answered, status)


def _probe(service: LocalService, probes: list[tuple[float, int, str]], done: threading.Event) -> None:
    with service.client(timeout=10) as client:
        while not done.wait(0.3):
            try:
                ready = client.get("/ready")
            except httpx.TransportError:
                continue  # the HTTP proxy is not listening yet
            json_body = ready.headers.get("content-type", "").startswith("application/json")
            probes.append((time.time(), ready.status_code, ready.json().get("status", "") if json_body else ""))


def watch_start_up(service: LocalService, answers: int = 3, timeout_s: float = 240) -> StartUp:
    """From a deploy until `answers` chats were answered: `/ready` probed on its own thread (a chat sent
    during warm-up waits for the service, while /ready must keep saying "starting"), chats in a loop."""
    seen = StartUp()
    body = {"model": "samples", "messages": [{"role": "user", "content": "Where is the Ray dashboard?"}]}
    done = threading.Event()
    prober = threading.Thread(target=_probe, args=(service, seen.probes, done))
    prober.start()
    try:
        with service.client(timeout=60) as client:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and sum(1 for _, s in seen.chats if s == 200) < answers:
                try:
                    status = client.post("/v1/chat/completions", json=body).status_code
                    seen.chats.append((time.time(), status))
                except httpx.TransportError:
                    pass  # the HTTP proxy is not listening yet
                time.sleep(0.3)
    finally:
        done.set()
        prober.join()
    return seen
