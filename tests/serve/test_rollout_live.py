"""The rollout tool on a real cluster under streaming load: a knowledge-base update is promoted with
zero failed answers; a canary that fails is rolled back by itself."""

from __future__ import annotations

import shutil
import threading
import uuid
from collections.abc import Iterator

import pytest

from deployments import ops
from deployments.rollout import Rollout
from rag.client import stream_chat
from rag.config import load_serve_config, pipeline_configs
from rag.ingest import ingest_directory
from rag.loadgen import LoadGenerator
from rag.rollout import ServeDocument
from tests.serve.conftest import REPO, LocalService, running_service
from tests.serve.lifecycle_helpers import assert_clean, replicas, wait_for

pytestmark = pytest.mark.cluster
# Two pipelines share this machine's two cores, where a scheduling hiccup can double one request's time
# to first token: the latency rule is covered by unit tests (tests/rag/test_rollout.py), so here a
# latency difference counts only above 0.3 s.
FAST_ROLLOUT = {"steps": [25, 100], "interval_s": 4, "min_requests": 10, "max_wait_intervals": 3,
                "drain_timeout_s": 60, "ttft_slack_s": 0.3}
MARKER = "The aurora release adds a zebra crossing mode"
MARKER_QUESTION = "What does the aurora release add?"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    with running_service(tmp_path_factory.mktemp("rollout"), pipeline_args={
            "generation": {"extractive_piece_delay_s": 0.01}}) as service:
        doc = ServeDocument.load(service.config_path)
        gateway = next(a for a in doc.data["applications"] if a["name"] == "gateway")
        gateway["args"]["rollout"] = FAST_ROLLOUT
        doc.save(service.config_path)
        ops.apply(doc.plain(), service.dashboard)
        yield service


def _rollout(service: LocalService, log: list[str]) -> Rollout:
    return Rollout(service.config_path, dashboard=service.dashboard, gateway=service.gateway, say=log.append)


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
    with LoadGenerator(live.gateway, api_key=live.api_key, concurrency=6, max_seconds=240) as load:
        watcher.start()
        status = _rollout(live, log).start(canary, stable, {"retrieval.knowledge_bases": {"samples": index}})
        stop.set()
    watcher.join()
    assert status == "promoted", "\n".join(log)
    doc = ServeDocument.load(live.config_path)
    assert list(doc.versions) == [canary] and doc.weights == {canary: 100.0}
    wait_for(lambda: stable not in ops.applications(live.dashboard), 60, "the old version to be removed")
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
    with LoadGenerator(live.gateway, api_key=live.api_key, concurrency=6, max_seconds=240) as load:
        status = _rollout(live, log).start(canary, stable, {"faults": {"error_rate": 0.6}})
    assert status == "rolled_back", "\n".join(log)
    assert any("rollback" in line and "error rate" in line for line in log)
    doc = ServeDocument.load(live.config_path)
    assert list(doc.versions) == [stable] and doc.weights == {stable: 100.0}
    # Injected failures happen before the first byte, so the gateway retried them on the stable version.
    assert_clean(load.result, min_sent=20)
    assert {d: replicas(live.dashboard, stable, d) for d in stable_replicas} == stable_replicas
