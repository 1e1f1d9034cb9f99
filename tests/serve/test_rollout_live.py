"""The rollout tool on a real cluster under streaming load: a knowledge-base update and a switch to an
upstream LLM server are promoted with zero failed answers; a canary that fails is rolled back by itself."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from control import cluster
from control.document import ServeDocument, load_serve_config
from control.rollout import Rollout
from control.serve_config import pipeline_configs
from rag.client import stream_chat
from rag.errors import InvalidRequestError
from rag.ingest import ingest_directory
from rag.loadgen import LoadGenerator
from tests.rag.test_generation import CHAT_TEMPLATE, _save_model
from tests.serve.lifecycle_helpers import assert_clean, replicas, wait_for
from tests.support import cluster as support
from tests.support.service import REPO, LocalService, running_service
from tests.support.upstream import transformers_upstream

pytestmark = pytest.mark.cluster
# Two pipelines share this machine's two cores, where a scheduling hiccup can double one request's time
# to first token: the latency rule is covered by unit tests (tests/rag/test_rollout.py), so here a
# latency difference counts only above 0.3 s.
FAST_ROLLOUT = {"steps": [25, 100], "interval_s": 3, "min_requests": 5, "max_wait_intervals": 4,
                "drain_timeout_s": 60, "ttft_slack_s": 0.3, "start_timeout_s": 150,
                # The KB update adds a document, and the watcher keeps asking the one question it answers:
                # that question's pairs legitimately differ, so the quality bars are lowered here (they are
                # unit-tested, and exercised at their defaults by make bench-quality).
                # Every answer may be copied (max_share 1), so the stage gathers its pairs in one or two intervals.
                "shadow": {"min_pairs": 10, "rate_per_s": 8, "max_share": 1.0, "min_source_overlap": 0.5,
                           "min_cited_share": 0.5, "min_answer_similarity": 0.5}}
MARKER = "The aurora release adds a zebra crossing mode"
MARKER_QUESTION = "What does the aurora release add?"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    # Two gateway replicas: the numbers the rollout judges must cover both.
    # The stable version pins its index, as a team that ships KB updates as canaries would: the update
    # must reach users only through the rollout (a version following `latest` would switch at once).
    with running_service(tmp_path_factory.mktemp("rollout"), pipeline_args={
            "generation": {"extractive_piece_delay_s": 0.01},
            "retrieval": {"knowledge_bases": {"samples": 1}, "discover": False}},
            gateway_args={"rollout": FAST_ROLLOUT},
            deployment_options={"Gateway": {"num_replicas": 2}}) as service:
        yield service


def _rollout(service: LocalService, log: list[str]) -> Rollout:
    return Rollout(service.config_path, cluster.ClusterClient(service.dashboard, service.gateway, service.api_key),
                   say=log.append)


def _new_index_version(service: LocalService, tmp_path) -> int:
    source = tmp_path / "kb"
    shutil.copytree(REPO / "data" / "sample_kb", source)
    (source / "release_notes.md").write_text(f"# Release notes\n\n{MARKER}. It is off by default.\n")
    config = next(iter(pipeline_configs(load_serve_config(service.config_path)).values()))
    return ingest_directory(source, service.kb_root, "samples", config).manifest.version


def _watch_marker(service: LocalService, stop: threading.Event, seen: list[tuple[str, bool]]) -> None:
    with service.client(timeout=60) as client:
        for i in range(400):
            if stop.wait(0.1):
                return
            answer = stream_chat(client, MARKER_QUESTION, user=f"watch-{i}")
            if answer.complete:
                seen.append((answer.version or "?", "zebra" in answer.text))


def test_knowledge_base_update_is_promoted_with_zero_failures(live: LocalService, tmp_path) -> None:
    stable = ServeDocument.load(live.config_path).stable_version(excluding="")
    index = _new_index_version(live, tmp_path)
    canary = f"kb{index}-{uuid.uuid4().hex[:4]}"
    log: list[str] = []
    seen: list[tuple[str, bool]] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_marker, args=(live, stop, seen))
    with LoadGenerator(live.gateway, api_key=live.api_key, concurrency=4, max_seconds=240) as load:
        watcher.start()
        status = _rollout(live, log).start(canary, stable, {"retrieval.knowledge_bases": {"samples": index}})
        stop.set()
    watcher.join()
    assert status == "promoted", "\n".join(log)
    doc = ServeDocument.load(live.config_path)
    assert list(doc.versions) == [canary] and doc.weights == {canary: 100.0}
    wait_for(lambda: stable not in cluster.applications(live.dashboard), 60, "the old version to be removed")
    assert_clean(load.result, min_sent=20)
    # The old index kept serving the old version until it was removed; the new one answers from the update.
    assert seen and all(not has for version, has in seen if version == stable)
    assert any(has for version, has in seen if version == canary)
    assert any("ROLLOUT_CHECK" in line and '"continue"' in line for line in log)


def test_failing_canary_is_rolled_back_automatically(live: LocalService) -> None:
    doc = ServeDocument.load(live.config_path)
    stable = doc.stable_version(excluding="")
    stable_replicas = {d: replicas(live.dashboard, stable, d) for d in ("Pipeline", "Generator", "Retriever")}
    canary = f"bad-{uuid.uuid4().hex[:4]}"
    log: list[str] = []
    with LoadGenerator(live.gateway, api_key=live.api_key, concurrency=4, max_seconds=240) as load:
        status = _rollout(live, log).start(canary, stable, {"faults": {"error_rate": 0.6}})
    assert status == "rolled_back", "\n".join(log)
    assert any("rollback" in line and "error rate" in line for line in log)
    doc = ServeDocument.load(live.config_path)
    assert list(doc.versions) == [stable] and doc.weights == {stable: 100.0}
    # Injected failures happen before the first byte, so the gateway retried them on the stable version.
    assert_clean(load.result, min_sent=20)
    # The rollback touched no stable replica (the autoscaler may have added some beside them under load).
    assert all(ids <= replicas(live.dashboard, stable, d) for d, ids in stable_replicas.items()), stable_replicas
    wait_for(lambda: canary not in cluster.applications(live.dashboard), 120, "the canary to be removed")


def _snapshot(service: LocalService) -> tuple[list[str], str, int, dict]:
    status, body = cluster.readiness(service.gateway)
    return sorted(cluster.applications(service.dashboard)), service.config_path.read_text(), status, body["weights"]


def test_a_version_too_big_for_the_cluster_is_refused_in_seconds_and_changes_nothing(live: LocalService) -> None:
    before = _snapshot(live)
    doc = ServeDocument.load(live.config_path)
    doc.add_version("huge", doc.stable_version(excluding=""), {"version": "huge"})
    generator = next(d for d in doc.versions["huge"]["deployments"] if d["name"] == "Generator")
    generator["ray_actor_options"] = {"num_cpus": 3}  # more than the 2-CPU cluster has
    doc.save(live.config_path)  # the operator adds the version to the file, then rolls it out
    edited = live.config_path.read_text()
    started = time.monotonic()
    try:
        with pytest.raises(InvalidRequestError, match="does not fit") as refused:
            _rollout(live, []).start("huge")
        assert time.monotonic() - started < 120
        assert live.config_path.read_text() == edited
    finally:
        live.config_path.write_text(before[1])
    assert "Generator" in str(refused.value) and "num_cpus=" in str(refused.value)
    assert _snapshot(live) == before
    status = _rollout(live, []).status()
    assert status["agree"] and status["cluster"]["applications"] == before[0]


def test_a_version_whose_replicas_cannot_start_is_rolled_back(live: LocalService) -> None:
    before = _snapshot(live)
    stable = ServeDocument.load(live.config_path).stable_version(excluding="")
    log: list[str] = []
    broken = {"generation": {"backend": "transformers", "model": "/nonexistent/model"}}
    with LoadGenerator(live.gateway, api_key=live.api_key, concurrency=2, max_seconds=240) as load:
        status = _rollout(live, log).start("broken", stable, broken)
    assert status == "rolled_back", "\n".join(log)
    assert any("ROLLOUT_DONE" in line and "failed to deploy" in line for line in log), "\n".join(log)
    wait_for(lambda: "broken" not in cluster.applications(live.dashboard), 120, "the broken version to be removed")
    assert _snapshot(live) == before
    assert_clean(load.result, min_sent=5)


def test_stats_cover_every_gateway_replica(live: LocalService) -> None:
    assert len(replicas(live.dashboard, "gateway", "Gateway")) == 2
    version = ServeDocument.load(live.config_path).stable_version(excluding="")

    def total(scope: str = "cluster") -> int:
        with live.client(timeout=10) as client:
            body = client.get("/stats", params={"scope": scope}).json()
        assert body["scope"] == scope
        return int(body["versions"].get(version, {}).get("requests", 0))

    start = total()
    for i in range(12):
        with live.client(timeout=60) as client:  # a new connection each time
            assert stream_chat(client, "How do I roll back?", user=f"stats-{i}").complete
    wait_for(lambda: total() - start == 12, 10, "the merged count to reach 12")
    assert max(total("replica") for _ in range(10)) <= total()


def test_ray_refuses_unauthenticated_control_calls(live: LocalService) -> None:
    apps = sorted(cluster.applications(live.dashboard))
    put = httpx.put(f"{live.dashboard}/api/serve/applications/", json={"applications": []}, timeout=10)
    job = httpx.post(f"{live.dashboard}/api/jobs/", json={"entrypoint": "touch /tmp/rag-serve-pwned"}, timeout=10)
    wrong = httpx.post(f"{live.dashboard}/api/jobs/", json={"entrypoint": "true"}, timeout=10,
                       headers={"Authorization": "Bearer not-the-token"})
    assert put.status_code == 401 and job.status_code == 401 and wrong.status_code == 403
    assert sorted(cluster.applications(live.dashboard)) == apps


def test_losing_a_gateway_replica_costs_only_the_streams_it_carried(live: LocalService) -> None:
    with LoadGenerator(live.gateway, api_key=live.api_key, concurrency=6, max_seconds=180) as load:
        wait_for(lambda: len(load.result.answers) >= 12, 60, "the load to get going")
        killed_at = time.time()
        support.kill_replica(live.dashboard, "gateway", "Gateway")
        wait_for(lambda: len(replicas(live.dashboard, "gateway", "Gateway")) == 2, 120, "a new gateway replica")
        sent = load.result.sent
        wait_for(lambda: load.result.sent >= sent + 12, 60, "answers after the replacement")
    result = load.result
    cut = [a for a in result.answers if a.status == 200 and not a.complete]
    refused = [a for a in result.failed if a.started_at + a.total_s >= killed_at]
    # Only the streams the killed replica carried (at most one per client) are lost. Serve's proxy ends
    # such a response as if it were complete, so the client sees it only by the missing [DONE] (the finish
    # reason may have come just before the cut); a request it had already routed to the dying replica may
    # be refused once.
    assert len(cut) + len(refused) + len(result.errors) <= 6, ([a.error for a in cut], refused, result.errors)
    assert all(not a.done for a in cut), [(a.done, a.finish_reason, a.error) for a in cut]
    assert not [a for a in result.failed if a.started_at >= killed_at + 2]  # then every request goes elsewhere
    assert sum(a.complete for a in result.answers if a.started_at >= killed_at) >= 12


def test_a_switch_to_an_upstream_llm_is_promoted_under_load_with_zero_failures(live: LocalService, tmp_path) -> None:
    """From the extractive default to an OpenAI-compatible server (`transformers serve`, a tiny random model
    on CPU): slower to its first token by design, so this rollout says how much slower it may be (--judge).
    Last in this module: the upstream stops when the test ends, and the promoted version needs it."""
    model = _save_model(tmp_path / "tiny", chat_template=CHAT_TEMPLATE, allow="words")
    stable = ServeDocument.load(live.config_path).stable_version(excluding="")
    canary = f"llm-{uuid.uuid4().hex[:4]}"
    log: list[str] = []
    with transformers_upstream(model, tmp_path / "serve.log") as upstream:
        with LoadGenerator(live.gateway, api_key=live.api_key, concurrency=4, max_seconds=240) as load:
            status = _rollout(live, log).start(canary, stable, {
                "generation.backend": "openai", "generation.model": upstream.model,
                "generation.base_url": upstream.base_url, "generation.max_new_tokens": 24},
                shadow=False, judge={"ttft_slack_s": 2.0})
        assert status == "promoted", "\n".join(log)
        with live.client(timeout=60) as client:
            answer = stream_chat(client, "Where is the Ray dashboard?", max_tokens=6)
    assert answer.version == canary and answer.sources and answer.text.strip() and answer.done, answer
    assert_clean(load.result, min_sent=20)
    assert any(a.version == canary for a in load.result.answers), "no user was answered by the upstream"
    wait_for(lambda: stable not in cluster.applications(live.dashboard), 60, "the old version to be removed")
