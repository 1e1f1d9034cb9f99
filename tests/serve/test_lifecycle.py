"""Lifecycle under load on one real cluster: warm-up before the first answer, replica replacement, a
crash mid-stream, events, metrics, and the graceful stop of the whole service."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from control import cluster, local_cluster
from rag.auth import bearer
from rag.client import stream_chat
from rag.lifecycle import read_events
from rag.loadgen import LoadGenerator
from tests.serve.lifecycle_helpers import (
    StartUp,
    assert_clean,
    lifecycle_events,
    replicas,
    wait_for,
    watch_ready,
    watch_start_up,
)
from tests.support import cluster as support
from tests.support.service import LocalService, running_service

pytestmark = pytest.mark.cluster

# Paced streams (~50 pieces x 40 ms) stay open long enough to be in flight while a replica stops.
PACED = {"generation": {"extractive_piece_delay_s": 0.04}}
STAGES = ("Pipeline", "Embedder", "Retriever", "Generator")
# Every replica of this cluster holds back READY this long after its real warm-up, so the window in
# which /ready must say "starting" is wide enough to watch.
WARMUP_DELAY_S = 2


def generator_options(*, min_replicas: int, max_replicas: int, target: int) -> dict[str, Any]:
    """Quick to react (a 2 s look-back, 3 s to scale down, 3 s to zero), so one test sees all of it."""
    return {"autoscaling_config": {"min_replicas": min_replicas, "max_replicas": max_replicas,
                                   "target_ongoing_requests": target, "upscale_delay_s": 0,
                                   "downscale_delay_s": 3, "downscale_to_zero_delay_s": 3,
                                   "look_back_period_s": 2},
            "graceful_shutdown_wait_loop_s": 0.2}


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalService, StartUp]]:
    """The paced service, watched from its deploy until it answers (what `/ready` said, when chats were
    answered), whichever test asks for it first."""
    pipeline_args = {**PACED, "lifecycle": {"warmup_delay_s": WARMUP_DELAY_S}}
    # One replica per stage, so each test knows which replica it replaces, kills or watches. The Generator
    # autoscales between 1 and 1: the autoscaling test widens its bounds, an update Serve makes in place
    # (switching between num_replicas and autoscaling may restart the replica).
    options: dict[str, Any] = {stage: {"num_replicas": 1} for stage in STAGES}
    options["Generator"] = generator_options(min_replicas=1, max_replicas=1, target=8)
    with running_service(tmp_path_factory.mktemp("lifecycle"), wait=False, with_metrics=True,
                         pipeline_args=pipeline_args, deployment_options=options) as local:
        start_up = watch_start_up(local)
        cluster.wait_ready(local.gateway, timeout_s=300, dashboard=local.dashboard)
        yield local, start_up


@pytest.fixture
def paced(started: tuple[LocalService, StartUp]) -> LocalService:
    service, _ = started
    if not cluster.applications(service.dashboard):  # the graceful-stop test removed them
        cluster.deploy(service.config_path, dashboard=service.dashboard)
    cluster.wait_ready(service.gateway, timeout_s=300, dashboard=service.dashboard)
    return service


def _non_stream_loop(service: LocalService, stop: threading.Event, statuses: list[int]) -> None:
    body = {"model": "samples", "messages": [{"role": "user", "content": "Where is the Ray dashboard?"}]}
    with service.client(timeout=60) as client:
        for _ in range(500):
            if stop.is_set():
                return
            statuses.append(client.post("/v1/chat/completions", json=body).status_code)


def test_autoscaler_drains_the_replica_it_removes_then_wakes_the_stage_from_zero(paced: LocalService) -> None:
    """The Generator autoscales (min 0, max 2): the replica removed when load falls finishes its streams;
    idle, the stage goes to zero and /ready still says ready; the next question is answered after a cold
    start, counted as one."""
    def autoscaled(target: int) -> Path:
        return paced.config(f"autoscaled-{target}.yaml", deployment_options={
            "Generator": generator_options(min_replicas=0, max_replicas=2, target=target)})

    # 12 steady clients at a target of 1 want two replicas; the same clients at a target of 12 want one,
    # so Serve removes one while the router keeps about half the streams on it.
    began = time.time()
    with LoadGenerator(paced.gateway, api_key=paced.api_key, concurrency=12, max_seconds=180) as load:
        cluster.deploy(autoscaled(1), dashboard=paced.dashboard)
        wait_for(lambda: len(replicas(paced.dashboard, "v1", "Generator")) == 2
                 and not replicas(paced.dashboard, "v1", "Generator", "STARTING")
                 and not replicas(paced.dashboard, "v1", "Generator", "STOPPING"), 120,
                 "two settled Generators for 12 streams")
        sent = load.result.sent
        wait_for(lambda: load.result.sent >= sent + 12, 30, "streams on both replicas")
        cluster.deploy(autoscaled(12), dashboard=paced.dashboard)
        wait_for(lambda: len(replicas(paced.dashboard, "v1", "Generator")) == 1
                 and not replicas(paced.dashboard, "v1", "Generator", "STOPPING"), 90, "the scale-down to one")
        sent = load.result.sent
        wait_for(lambda: load.result.sent >= sent + 12, 30, "answers on the remaining replica")
    ended = time.time()
    assert_clean(load.result, min_sent=24)
    # Replicas the autoscaler removed under this load (the flapping of a 2 s look-back may remove one
    # before the target change does): each that held streams when told to stop let them all finish.
    generators = {e["replica"] for e in read_events(paced.events_file) if e.get("deployment") == "Generator"}
    stopped = [lifecycle_events(paced, r) for r in generators]
    stopped = [events for events in stopped
               if any(e == "SHUTDOWN" and began <= fields["ts"] <= ended for e, fields in events)]
    drained = [events for events in stopped if next(f for e, f in events if e == "SHUTDOWN")["in_flight"] > 0]
    assert drained, stopped  # at least one removal caught streams in flight ...
    for events in drained:
        names = [e for e, _ in events]
        assert names.index("SHUTDOWN") < names.index("DRAINING") < names.index("CLEANUP"), events
        assert [fields for e, fields in events if e == "DRAINING"][-1]["in_flight"] == 0  # ... and let them finish
    seen = set(generators)

    wait_for(lambda: not replicas(paced.dashboard, "v1", "Generator", "RUNNING")
             and not replicas(paced.dashboard, "v1", "Generator", "STOPPING"), 60, "the Generator at zero")
    scaled = wait_for(lambda: (r := cluster.readiness(paced.gateway))[0] == 200 and r[1].get("scaled_to_zero") and r,
                      10, "/ready to say the Generator is scaled to zero")
    assert scaled[1]["scaled_to_zero"] == {"v1": ["Generator"]} and "cold start on demand" in scaled[1]["note"]
    with paced.client(timeout=60) as client:
        def cold_starts() -> int:  # one gateway replica: its own counts are the whole service's
            return int(client.get("/stats", params={"scope": "replica"}).json()["versions"]["v1"].get("cold_starts", 0))

        before = cold_starts()
        answer = stream_chat(client, "Where is the Ray dashboard?")
        assert answer.complete, answer
        assert cold_starts() == before + 1
    woken = replicas(paced.dashboard, "v1", "Generator")
    assert len(woken) == 1 and not woken & seen
    names = [e for e, _ in lifecycle_events(paced, next(iter(woken)))]
    assert names[:2] == ["STARTUP", "READY"], names
    cluster.deploy(paced.config_path, dashboard=paced.dashboard)  # back to one Generator, the woken one
    wait_for(lambda: cluster.applications(paced.dashboard)["v1"]["status"] == "RUNNING"
             and all(len(replicas(paced.dashboard, "v1", stage)) == 1 for stage in STAGES), 120,
             "one replica per stage")
    assert replicas(paced.dashboard, "v1", "Generator") == woken


def test_revision_bump_replaces_every_stage_and_every_answer_finishes(paced: LocalService) -> None:
    """An args change makes Serve rebuild the application and replace all four stages at once: streamed
    and plain answers in flight all finish, and each old replica drains before it cleans up."""
    before = {d: replicas(paced.dashboard, "v1", d) for d in STAGES}
    assert all(len(ids) == 1 for ids in before.values()), before
    statuses: list[int] = []
    stop = threading.Event()
    plain = threading.Thread(target=_non_stream_loop, args=(paced, stop, statuses))
    with LoadGenerator(paced.gateway, api_key=paced.api_key, concurrency=6, max_seconds=180) as load:
        plain.start()
        wait_for(lambda: len(load.result.answers) >= 6, 30, "the load to get going")
        config = paced.config("revision.yaml", pipeline_args={**PACED, "revision": "bumped"})
        cluster.deploy(config, dashboard=paced.dashboard)
        wait_for(lambda: all(replicas(paced.dashboard, "v1", d) - ids and not replicas(paced.dashboard, "v1", d) & ids
                             and not replicas(paced.dashboard, "v1", d, "STOPPING") for d, ids in before.items())
                 and cluster.applications(paced.dashboard)["v1"]["status"] == "RUNNING", 180, "every stage replaced")
        sent_at_switch = load.result.sent
        wait_for(lambda: load.result.sent >= sent_at_switch + 6, 30, "requests on the new replicas")
        stop.set()
    plain.join()
    assert_clean(load.result, min_sent=12)
    assert statuses and set(statuses) == {200}, statuses
    (old_generator,) = before["Generator"]
    events = lifecycle_events(paced, old_generator)
    names = [e for e, _ in events]
    # The old Generator drained with streams in flight and cleaned up after them.
    assert names[:2] == ["STARTUP", "READY"], names
    assert names.index("SHUTDOWN") < names.index("DRAINING") < names.index("CLEANUP"), names
    assert [fields for e, fields in events if e == "DRAINING"][-1]["in_flight"] == 0
    for stage in ("Pipeline", "Embedder", "Retriever"):
        (old,) = before[stage]
        names = [e for e, _ in lifecycle_events(paced, old)]
        assert names[0] == "STARTUP" and names[-1] == "CLEANUP", (stage, names)


def test_killed_generator_mid_stream_ends_with_error_event_and_done(paced: LocalService) -> None:
    started = threading.Event()
    holder: list = []

    def ask() -> None:
        with paced.client(timeout=60) as client:
            holder.append(stream_chat(client, "How do I stop the service?",
                                      on_event=lambda answer, _: answer.text and started.set()))

    thread = threading.Thread(target=ask)
    thread.start()
    assert started.wait(30)
    support.kill_replica(paced.dashboard, "v1", "Generator")
    thread.join(60)
    answer = holder[0]
    assert answer.status == 200 and answer.done, answer
    assert answer.error and "broke off" in answer.error
    assert answer.finish_reason is None

    def next_ok() -> bool:
        with paced.client(timeout=60) as client:
            return stream_chat(client, "Where is the Ray dashboard?").complete

    wait_for(next_ok, 120, "Serve to replace the killed replica", interval_s=1)
    # Five more at once, not one after another: each paced answer takes about 2.7 s, and what is checked
    # is that the new replica answers them all, not how long five in a row take.
    with ThreadPoolExecutor(5) as pool:
        assert all(pool.map(lambda _: next_ok(), range(5)))


def test_killing_the_only_embedder_loses_no_request_that_had_not_started(paced: LocalService) -> None:
    before = replicas(paced.dashboard, "v1", "Embedder")
    with LoadGenerator(paced.gateway, api_key=paced.api_key, concurrency=8, max_seconds=180) as load:
        wait_for(lambda: len(load.result.answers) >= 8, 30, "the load to get going")
        support.kill_replica(paced.dashboard, "v1", "Embedder")
        wait_for(lambda: replicas(paced.dashboard, "v1", "Embedder") - before, 120, "a new Embedder replica")
        sent = load.result.sent
        wait_for(lambda: load.result.sent >= sent + 8, 60, "answers after the replacement")
    # Requests that arrived while no Embedder ran waited for the new one instead of being refused; the
    # Embedder holds no stream, so nothing was cut either.
    assert_clean(load.result, min_sent=16)


def test_client_that_hangs_up_stops_the_generation(paced: LocalService) -> None:
    """Closing the HTTP connection mid-answer cancels the whole chain down to the model's stream."""
    wait_for(lambda: len(replicas(paced.dashboard, "v1", "Generator")) == 1, 60, "one running Generator")
    (generator,) = replicas(paced.dashboard, "v1", "Generator")

    def cancellations() -> list[dict[str, Any]]:
        return [fields for event, fields in lifecycle_events(paced, generator) if event == "CANCELLED"]

    before = len(cancellations())
    body = {"model": "samples", "stream": True,
            "messages": [{"role": "user", "content": "How do I stop the service?"}]}
    with paced.client(timeout=60) as client, \
            client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        # Hang up at the first piece of answer text, with the rest of the paced answer still to come.
        next(line for line in response.iter_lines() if _answer_text(line))
    wait_for(lambda: len(cancellations()) > before, 30, "the Generator to stop the abandoned answer")
    assert cancellations()[-1]["pieces_sent"] >= 1  # it stopped mid-answer, not before it began
    stats_url, key = f"{paced.gateway}/stats", bearer(paced.api_key)
    wait_for(lambda: httpx.get(stats_url, headers=key, timeout=10).json()["versions"]["v1"]["in_flight"] == 0,
             30, "the gateway to let go of the abandoned answer")


def _answer_text(line: str) -> str:
    if not line.startswith("data: {"):
        return ""
    return "".join(c["delta"].get("content") or "" for c in json.loads(line[6:]).get("choices", []))


def test_lifecycle_events_come_in_order(paced: LocalService) -> None:
    with paced.client(timeout=60) as client:
        assert stream_chat(client, "Where is the Ray dashboard?").complete
    for deployment in ("Pipeline", "Retriever"):
        (replica,) = replicas(paced.dashboard, "v1", deployment)
        events = [e for e, _ in lifecycle_events(paced, replica)]
        assert events[:2] == ["STARTUP", "READY"] and "TRAFFIC" in events, (deployment, events)
        ready = next(fields for e, fields in lifecycle_events(paced, replica) if e == "READY")
        assert ready["load_s"] >= 0 and ready["warmup_s"] >= 0


METRICS = ["rag_requests_in_flight", "rag_model_load_seconds", "rag_vector_search_ms",
           "rag_time_to_first_token_seconds", "rag_generated_tokens_total", "rag_requests_total",
           "rag_lifecycle_events_total", "rag_replicas", "rag_replica_start_seconds"]


def test_metrics_are_exported(paced: LocalService) -> None:
    assert paced.metrics
    with paced.client(timeout=60) as client:
        assert stream_chat(client, "Where is the Ray dashboard?").complete

    def scrape() -> str | None:
        text = httpx.get(paced.metrics, timeout=10).text
        return text if all(f"ray_{name}" in text for name in METRICS) else None

    text = wait_for(scrape, 90, "the metrics to be exported", interval_s=2)
    assert 'version="v1"' in text and 'status="200"' in text and 'event="READY"' in text


def test_ready_turns_200_only_after_real_warm_up(started: tuple[LocalService, StartUp]) -> None:
    service, start_up = started
    # The first Generator to warm up is the one that started with the service (the other tests of this
    # module may have replaced it since).
    warm_at = min(e["ts"] for e in read_events(service.events_file)
                  if e.get("event") == "READY" and e.get("deployment") == "Generator" and e.get("version") == "v1")
    probes, chats = start_up.probes, start_up.chats
    starting = [p for p in probes if p[1] == 503 and p[2] == "starting"]
    assert starting, probes[:5]
    assert any(p[1] == 200 and p[2] == "ready" for p in probes)
    first_ready = min(t for t, status, _ in probes if status == 200)
    assert all(t < first_ready for t, _, _ in starting)
    answered = [t for t, status in chats if status == 200]
    assert answered and min(answered) >= warm_at, "a chat was answered before the Generator was warm"
    assert {status for _, status in chats if status != 200} <= {404, 503}


def test_graceful_stop_finishes_every_stream(paced: LocalService) -> None:
    """`make stop`'s path: /ready turns to draining, streams in flight all finish, new requests are
    refused cleanly, the applications go (a test that runs after it gets them back from `paced`)."""
    seen: list[str] = []
    stop = threading.Event()
    watcher = threading.Thread(target=watch_ready, args=(paced.gateway, stop, seen))
    watcher.start()
    try:
        with LoadGenerator(paced.gateway, api_key=paced.api_key, concurrency=6, max_seconds=120) as load:
            wait_for(lambda: len(load.result.answers) >= 6, 30, "the load to get going")
            local_cluster.graceful_stop(paced.config_path, dashboard=paced.dashboard, gateway=paced.gateway,
                                        stop_cluster=False, say=lambda *_: None)
            apps_left = cluster.applications(paced.dashboard)
    finally:
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
