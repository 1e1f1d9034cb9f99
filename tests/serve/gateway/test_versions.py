"""Two pipeline versions side by side on a real cluster: weighted split, sticky ids, and weight
changes that restart nothing; v2 answers from an OpenAI-compatible upstream (the `openai` backend): its
streams end to end, and what a killed upstream does to them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from control import cluster
from control.document import ServeDocument
from rag.client import bearer, stream_chat
from rag.constants import EVALUATE_HEADER
from tests.rag.test_generation import CHAT_TEMPLATE, _save_model
from tests.serve.lifecycle_helpers import replicas, wait_for
from tests.support.service import LocalService
from tests.support.upstream import Upstream, transformers_upstream

pytestmark = pytest.mark.cluster
DEPLOYMENTS = ("Pipeline", "Embedder", "Retriever", "Generator")
# 0.05 is 3.3 standard deviations of the v2 share at 400 requests and a 10 % weight (a correct split
# fails about once in a thousand runs); a split at none or twice the weight fails.
REQUESTS = 400
SPLIT_TOLERANCE = 0.05
# Four clients keep each stage within its autoscaling target (4 ongoing for the Embedder and Retriever),
# so no burst adds a replica the weight-change test would have to wait out (downscale_delay_s is 20 s).
CLIENTS = 4


def apply_weights(service: LocalService, weights: dict[str, float]) -> None:
    doc = ServeDocument.load(service.config_path)
    doc.set_weights(weights)
    doc.save(service.config_path)
    cluster.apply(doc.plain(), service.dashboard)
    live = {k: v for k, v in weights.items() if v > 0}
    wait_for(lambda: cluster.readiness(service.gateway)[1].get("weights") == live, 30,
             f"the gateway to take weights {weights}")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """A real OpenAI-compatible server (`transformers serve`, a tiny random model on CPU) for v2 to answer from."""
    root = tmp_path_factory.mktemp("upstream")
    model = _save_model(root / "tiny", chat_template=CHAT_TEMPLATE, allow="words")
    with transformers_upstream(model, root / "serve.log") as running:
        yield running


@pytest.fixture(scope="module")
def two_versions(service: LocalService, upstream: Upstream) -> Iterator[LocalService]:
    """The package's cluster with a v2 beside v1, v2 answering from the upstream server (the `openai`
    backend); afterwards v2 is gone and v1 serves alone again, so the modules sharing the cluster may run
    in any order."""
    original = service.config_path.read_text()
    doc = ServeDocument.load(service.config_path)
    doc.add_version("v2", "v1", {"version": "v2", "generation.backend": "openai", "generation.model": upstream.model,
                                 "generation.base_url": upstream.base_url, "generation.max_new_tokens": 4000,
                                 "generation.health_misses": 2})
    doc.set_weights({"v1": 100, "v2": 0})  # add at weight 0, wait, then shift
    doc.save(service.config_path)
    cluster.apply(doc.plain(), service.dashboard)
    wait_for(lambda: "v2" in cluster.readiness(service.gateway)[1].get("serving", []), 300, "v2 to serve")
    apply_weights(service, {"v1": 90, "v2": 10})
    try:
        yield service
    finally:
        service.config_path.write_text(original)
        cluster.deploy(service.config_path, dashboard=service.dashboard)
        wait_for(lambda: "v2" not in cluster.applications(service.dashboard), 180, "v2 to be removed")
        cluster.wait_ready(service.gateway, timeout_s=120, dashboard=service.dashboard)


def all_replicas(service: LocalService) -> dict[str, set[str]]:
    found = {f"{app}/{d}": replicas(service.dashboard, app, d) for app in ("v1", "v2") for d in DEPLOYMENTS}
    found["gateway/Gateway"] = replicas(service.dashboard, "gateway", "Gateway")
    return found


def _search_version(client: httpx.Client, _: int) -> str:
    response = client.post("/knowledge_base/search_docs",
                           json={"query": "Where is the Ray dashboard?", "knowledge_base_name": "samples", "top_k": 1})
    assert response.status_code == 200
    return response.headers["x-rag-version"]


def test_ninety_ten_split_over_four_hundred_requests(two_versions: LocalService) -> None:
    with two_versions.client(timeout=60, limits=httpx.Limits(max_connections=CLIENTS)) as client, \
            ThreadPoolExecutor(CLIENTS) as pool:
        counts = Counter(pool.map(lambda i: _search_version(client, i), range(REQUESTS)))
    assert set(counts) == {"v1", "v2"}
    assert abs(counts["v2"] / REQUESTS - 0.10) <= SPLIT_TOLERANCE, counts


def _chat_version(client: httpx.Client, user: str) -> str:
    response = client.post("/v1/chat/completions", json={
        "model": "samples", "user": user, "max_tokens": 1,
        "messages": [{"role": "user", "content": "Where is the Ray dashboard?"}]})
    assert response.status_code == 200
    assert response.json()["version"] == response.headers["x-rag-version"]
    return response.headers["x-rag-version"]


def test_sticky_ids_never_switch_version(two_versions: LocalService) -> None:
    users = [f"user-{i}" for i in range(60)] * 3
    with two_versions.client(timeout=60) as client, ThreadPoolExecutor(CLIENTS) as pool:
        seen = list(zip(users, pool.map(lambda u: _chat_version(client, u), users), strict=True))
    by_user: dict[str, set[str]] = {}
    for user, version in seen:
        by_user.setdefault(user, set()).add(version)
    assert all(len(v) == 1 for v in by_user.values()), {u: v for u, v in by_user.items() if len(v) > 1}
    assert {next(iter(v)) for v in by_user.values()} == {"v1", "v2"}


def test_weight_change_keeps_every_replica(two_versions: LocalService) -> None:
    # Idle, every autoscaled stage is back at its one warm replica (a burst of an earlier test may have
    # added one, removed after downscale_delay_s).
    before = wait_for(lambda: (found := all_replicas(two_versions)) and all(len(ids) == 1 for ids in found.values())
                      and found, 90, "one replica per stage")
    apply_weights(two_versions, {"v1": 50, "v2": 50})
    with two_versions.client(timeout=60) as client:
        counts = Counter(_search_version(client, i) for i in range(200))
    apply_weights(two_versions, {"v1": 90, "v2": 10})
    assert all_replicas(two_versions) == before
    assert 0.35 <= counts["v2"] / 200 <= 0.65, counts


def test_an_upstream_version_streams_sources_first_and_a_killed_upstream_ends_its_stream_cleanly(
        two_versions: LocalService, upstream: Upstream) -> None:
    """Last in this module: it kills the upstream (the fixture then removes v2)."""
    headers = {**bearer(two_versions.api_key), EVALUATE_HEADER: "v2"}  # v2 answers, whatever the weights
    with httpx.Client(base_url=two_versions.gateway, headers=headers, timeout=120) as client:
        answer = stream_chat(client, "Where is the Ray dashboard?", max_tokens=8)
        assert answer.version == "v2" and answer.sources and answer.text.strip(), answer
        assert answer.finish_reason == "length" and answer.done and answer.error is None
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert models["samples"]["generation"]["v2"]["backend"] == "openai"

        def kill_after_first_tokens(seen: Any, event: Any) -> None:
            if seen.text and upstream.process.poll() is None:
                upstream.process.kill()

        cut = stream_chat(client, "Where is the Ray dashboard?", max_tokens=4000, on_event=kill_after_first_tokens)
    assert upstream.process.poll() is not None and cut.text  # it had begun
    assert cut.error and "incomplete" in cut.error and cut.done, cut  # an error event, then [DONE]: no cut body
