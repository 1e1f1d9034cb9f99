"""A slow warm-up on a real cluster: /ready says 503 starting until every stage is warm, and no
answer is served before the replicas report READY."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import LocalService, running_service
from tests.serve.lifecycle_helpers import replicas, session_logs, wait_for

pytestmark = pytest.mark.cluster
WARMUP_DELAY_S = 8


def _ready_logged_at(replica: str) -> float:
    for path in session_logs().glob(f"replica_*_{replica}.log"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if "event=READY" in line:
                stamp = " ".join(line.split()[1:3])
                return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError(f"no READY event logged by {replica}")


def _probe(service: LocalService, probes: list[tuple[float, int, str]], done: threading.Event) -> None:
    with service.client(timeout=10) as client:
        while not done.wait(0.3):
            try:
                ready = client.get("/ready")
            except httpx.TransportError:
                continue  # the HTTP proxy is not listening yet
            json_body = ready.headers.get("content-type", "").startswith("application/json")
            probes.append((time.time(), ready.status_code, ready.json().get("status", "") if json_body else ""))


def test_ready_turns_200_only_after_real_warm_up(tmp_path: Path) -> None:
    slow = {"lifecycle": {"warmup_delay_s": WARMUP_DELAY_S}}
    with running_service(tmp_path, wait=False, pipeline_args=slow) as service:
        probes: list[tuple[float, int, str]] = []
        chats: list[tuple[float, int]] = []
        body = {"model": "samples", "messages": [{"role": "user", "content": "Where is the Ray dashboard?"}]}
        done = threading.Event()
        # Probes on their own thread: a chat sent during warm-up waits for the service, while /ready
        # must keep saying "starting".
        prober = threading.Thread(target=_probe, args=(service, probes, done))
        prober.start()
        try:
            with service.client(timeout=60) as client:
                deadline = time.monotonic() + 240
                while time.monotonic() < deadline and sum(1 for _, s in chats if s == 200) < 3:
                    try:
                        status = client.post("/v1/chat/completions", json=body).status_code
                        chats.append((time.time(), status))  # when it was answered
                    except httpx.TransportError:
                        pass  # the HTTP proxy is not listening yet
                    time.sleep(0.3)
        finally:
            done.set()
            prober.join()
        (generator,) = wait_for(lambda: replicas(service.dashboard, "v1", "Generator"), 30, "the Generator")
        warm_at = _ready_logged_at(generator)

    starting = [p for p in probes if p[1] == 503 and p[2] == "starting"]
    assert starting, probes[:5]
    assert any(p[1] == 200 and p[2] == "ready" for p in probes)
    first_ready = min(t for t, status, _ in probes if status == 200)
    assert all(t < first_ready for t, _, _ in starting)
    answered = [t for t, status in chats if status == 200]
    assert answered and min(answered) >= warm_at, "a chat was answered before the Generator was warm"
    assert {status for _, status in chats if status != 200} <= {404, 503}
