"""The gateway's whole FastAPI app (`build_http_app`) around real services over fakes, in-process (no Ray):
the probes without a key and /ready's three states, the key on everything else, Chatchat's `{code, msg,
data}` on the knowledge-base routes (errors in both shapes), a 422 that names only the first problems,
/stats from the merged view (503 when it fails), /rollout from its state file, and the OpenAPI security."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from deployments.gateway.answer_service import GatewayService
from deployments.gateway.embeddings_service import EmbeddingsService
from deployments.gateway.http_app import build_http_app
from deployments.gateway.http_guard import GuardSettings
from deployments.gateway.kb_requests import KnowledgeBaseRequests
from deployments.gateway.readiness import Readiness
from deployments.gateway.services import GatewayServices
from rag import kb_store
from rag.auth import ApiKeys, create_key_file, read_client_key
from rag.config import GatewayConfig, KnowledgeBaseSettings, TrafficConfig
from rag.errors import KnowledgeBaseNotFoundError, OverloadedError
from rag.kb_changes import Changes
from rag.lifecycle import InFlight
from tests.gateway.test_answer_service import FakeMetrics

TEMP_ID = "a" * 32


class FakeRemote:
    def __init__(self, result: Any) -> None:
        self.result = result

    async def remote(self, *_: Any) -> Any:
        return self.result


class FakeVersion:
    """A pipeline version's handle: what /v1/models, search_docs and /v1/embeddings ask it."""

    def __init__(self) -> None:
        self.retrieval_modes = FakeRemote({"samples": {"version": 3, "mode": "hybrid", "why": "default"}})
        self.describe = FakeRemote({"generation": {"backend": "openai", "model": "qwen2.5-7b-instruct",
                                                   "base_url": "http://10.0.0.5:8000/v1"}})
        self.knowledge_bases = FakeRemote({"samples": 3})
        self.search = FakeRemote([])


class FakeEmbedder:
    def __init__(self) -> None:
        self.describe = FakeRemote({"model": "bge-m3", "dimension": 2})
        self.embed = FakeRemote([0.5, 0.25])
        self.count_tokens = FakeRemote(7)


class FakeHandles:
    def __init__(self) -> None:
        self.version = FakeVersion()

    async def get(self, version: str) -> FakeVersion:
        return self.version

    async def embedder(self, version: str) -> FakeEmbedder:
        return FakeEmbedder()

    def prime(self, version: str, timeout_s: float) -> None:
        pass

    def is_overload(self, exc: BaseException) -> bool:
        return False


class FakeManager:
    """The KnowledgeBases manager: `list_knowledge_bases` answers two KBs, `list_files` knows no KB; uploads
    get spool folders under `kb_root` and `submit` records what it was handed (or raises `refusal`)."""

    def __init__(self, kb_root: Path) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.kb_root = kb_root
        self.spools: list[Path] = []
        self.submitted: list[tuple[str, Changes, dict[str, bytes]]] = []
        self.refusal: Exception | None = None

    async def delete(self, kb: str, versions: list[str]) -> None:
        await self.list_files(kb, versions)  # 404 unless "docs"

    async def update_info(self, kb: str, kb_info: str, versions: list[str]) -> dict[str, Any]:
        await self.list_files(kb, versions)
        return {"knowledge_base_name": kb, "kb_info": kb_info, "embed_model": "m"}

    async def spool(self, versions: list[str]) -> str:
        self.spools.append(kb_store.new_spool(self.kb_root))
        return str(self.spools[-1])

    async def list_chunks(self, kb: str, file_name: str, metadata: dict[str, Any], versions: list[str]
                          ) -> list[dict[str, Any]]:
        return [{"id": "0", "page_content": "listed", "score": None, "metadata": {"source": file_name}}]

    async def upload_temporary(self, temp_id: str | None, changes: Changes, splitter: Any,
                               versions: list[str]) -> dict[str, str]:
        received = {n: Path(p).read_bytes() for n, p in changes.add.items()}
        self.submitted.append((f"temporary {temp_id}", changes, received))
        return {"id": TEMP_ID, "knowledge_base_name": f"temp-{TEMP_ID}", "job_id": "job-t"}

    async def use_temporary(self, temp_id: str, versions: list[str]) -> str:
        if temp_id != TEMP_ID:
            raise KnowledgeBaseNotFoundError(f"no temporary knowledge base {temp_id!r}")
        return f"temp-{temp_id}"

    async def wait(self, job_id: str, timeout_s: float, versions: list[str]) -> dict[str, Any]:
        return {"state": "done", "published": False, "index_version": 1, "changed_files": ["a.md"],
                "failed_files": {"tool.exe": "type '.exe' is not supported"}, "knowledge_base_name": "x"}

    async def submit(self, kind: str, kb: str, changes: Changes, splitter: Any, versions: list[str]) -> str:
        if self.refusal is not None:
            raise self.refusal
        self.submitted.append((kb, changes, {n: Path(p).read_bytes() for n, p in changes.add.items()}))
        return "job-1"

    def call(self, method: str, *args: Any) -> Any:
        self.calls.append((method, args))
        return getattr(self, method)(*args)

    async def list_knowledge_bases(self, versions: list[str]) -> list[dict[str, Any]]:
        return [{"knowledge_base_name": "samples", "kb_info": "demo"}, {"knowledge_base_name": "docs", "kb_info": ""}]

    async def list_files(self, kb: str, versions: list[str]) -> list[dict[str, Any]]:
        if kb != "docs":
            raise KnowledgeBaseNotFoundError(f"no knowledge base {kb!r}")
        return []


@dataclass
class Gateway:
    client: TestClient
    auth: dict[str, str]
    answers: GatewayService
    manager: FakeManager
    readiness: list[Readiness]
    stats: dict[str, Any]
    stats_windows: list[float | None] = field(default_factory=list)
    first_traffic: list[int] = field(default_factory=lambda: [0])


@pytest.fixture
def gateway(tmp_path: Path) -> Gateway:
    create_key_file(tmp_path / "key")
    handles = FakeHandles()
    answers = GatewayService(GatewayConfig(), FakeMetrics(), InFlight(), handles)
    answers.set_traffic(TrafficConfig(weights={"v1": 100}))
    manager = FakeManager(tmp_path / "kb")
    readiness = [Readiness(False, ["v1/Generator"])]
    stats: dict[str, Any] = {"versions": {"v1": {"requests": 12, "errors": 1}}, "replicas": 2}

    async def merged_stats(window_s: float | None) -> dict[str, Any]:
        gw.stats_windows.append(window_s)
        if "fail" in stats:
            raise RuntimeError("a gateway replica did not answer")
        return stats

    def first_traffic() -> None:
        gw.first_traffic[0] += 1

    services = GatewayServices(
        answers=answers,
        embeddings=EmbeddingsService(handles, answers.serving_versions),
        knowledge_bases=KnowledgeBaseRequests(manager, handles, answers.serving_versions,
                                              KnowledgeBaseSettings(max_file_bytes=4096, max_files=3),
                                              request_timeout_s=1.0),
        guard=GuardSettings(ApiKeys(tmp_path / "key"), max_body_bytes=64 * 1024, errors_shown=2,
                            body_bytes_by_path={UPLOAD: 32 * 1024}, streamed_paths=frozenset({UPLOAD})),
        readiness=lambda: readiness[-1],
        merged_stats=merged_stats,
        first_traffic=first_traffic,
        rollout_state_file=tmp_path / "rollout.json",
    )
    gw = Gateway(TestClient(build_http_app(services)), {"authorization": f"Bearer {read_client_key(tmp_path / 'key')}"},
                 answers, manager, readiness, stats)
    return gw


# --- probes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/console/console.js", "/console/console.css"])
def test_the_console_allows_only_its_own_origin_and_no_framing(gateway: Gateway, path: str) -> None:
    response = gateway.client.get(path)
    assert response.status_code == 200
    policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
    assert policy["frame-ancestors"] == "'none'" and policy["default-src"] == "'self'"
    assert policy["script-src"] == "'self'" and "unsafe" not in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY" and response.headers["x-content-type-options"] == "nosniff"


def test_health_needs_no_key(gateway: Gateway) -> None:
    response = gateway.client.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "alive"


def test_ready_needs_no_key_and_is_503_starting_with_what_it_waits_for(gateway: Gateway) -> None:
    response = gateway.client.get("/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "starting" and body["waiting_for"] == ["v1/Generator"]
    assert body["versions"] == ["v1"] and body["weights"] == {"v1": 100.0} and body["in_flight"] == 0
    assert "why" not in body
    gateway.readiness[0] = Readiness(False, ["v1/Generator"], why={"v1/Generator": "UNHEALTHY (health_check_failed)"})
    assert gateway.client.get("/ready").json()["why"] == {"v1/Generator": "UNHEALTHY (health_check_failed)"}


def test_ready_is_200_once_the_readiness_says_ready(gateway: Gateway) -> None:
    gateway.readiness.append(Readiness(True, [], serving={"v1"}))
    response = gateway.client.get("/ready")
    assert response.status_code == 200
    assert response.json()["status"] == "ready" and response.json()["serving"] == ["v1"]


def test_ready_is_200_with_stages_scaled_to_zero_and_says_so(gateway: Gateway) -> None:
    gateway.readiness.append(Readiness(True, [], serving={"v1"}, scaled_to_zero={"v1": ["Generator"]},
                                       replicas={"v1": {"Pipeline": 1, "Generator": 0}}))
    response = gateway.client.get("/ready")
    body = response.json()
    assert response.status_code == 200 and body["status"] == "ready"
    assert body["scaled_to_zero"] == {"v1": ["Generator"]} and body["replicas"]["v1"]["Generator"] == 0
    assert body["note"] == "scaled to zero, cold start on demand: v1/Generator"


def test_ready_is_503_draining_once_the_traffic_config_drains(gateway: Gateway) -> None:
    gateway.readiness.append(Readiness(True, [], serving={"v1"}))
    gateway.answers.set_traffic(TrafficConfig(weights={"v1": 100}, draining=True))
    response = gateway.client.get("/ready")
    assert response.status_code == 503 and response.json()["status"] == "draining"


# --- the key ------------------------------------------------------------------------------------------------


def test_models_need_the_key(gateway: Gateway) -> None:
    refused = gateway.client.get("/v1/models")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert refused.json()["error"]["code"] == 401
    response = gateway.client.get("/v1/models", headers=gateway.auth)
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == ["samples"]
    assert response.json()["data"][0]["retrieval"] == {"v1": {"version": 3, "mode": "hybrid", "why": "default"}}
    # Which backend and model answers in each version (not where the upstream lives)
    assert response.json()["data"][0]["generation"] == {"v1": {"backend": "openai", "model": "qwen2.5-7b-instruct"}}


def test_an_upstreams_429_is_a_503_with_its_own_retry_after(gateway: Gateway) -> None:
    from rag.errors import RateLimitedError

    gateway.answers.handles.version.search = FakeRemote(None)  # type: ignore[attr-defined]

    async def limited(*_: Any) -> Any:
        raise RateLimitedError("the upstream is rate limiting (429)", 12.0)

    gateway.answers.handles.version.search.remote = limited  # type: ignore[attr-defined]
    response = gateway.client.post("/knowledge_base/search_docs", headers=gateway.auth,
                                   json={"knowledge_base_name": "samples", "query": "q"})
    assert response.status_code == 503 and response.headers["retry-after"] == "12"


def test_search_docs_counts_first_traffic_and_names_the_version(gateway: Gateway) -> None:
    response = gateway.client.post("/knowledge_base/search_docs", headers=gateway.auth,
                                   json={"query": "how?", "knowledge_base_name": "samples"})
    assert response.status_code == 200 and response.json() == []
    assert response.headers["x-rag-version"] == "v1" and gateway.first_traffic == [1]


def test_embeddings_through_the_app(gateway: Gateway) -> None:
    response = gateway.client.post("/v1/embeddings", headers=gateway.auth,
                                   json={"input": ["a", "b"], "model": "samples"})
    assert response.status_code == 200
    body = response.json()
    assert [d["embedding"] for d in body["data"]] == [[0.5, 0.25], [0.5, 0.25]]
    assert body["usage"]["prompt_tokens"] == 7 and body["model"] == "samples"


def test_chatchats_embed_texts_through_the_app(gateway: Gateway) -> None:
    response = gateway.client.post("/other/embed_texts", headers=gateway.auth,
                                   json={"texts": ["a", "b"], "embed_model": "bge-m3", "to_query": False})
    assert response.status_code == 200
    assert response.json()["data"] == [[0.5, 0.25], [0.5, 0.25]] and "with bge-m3" in response.json()["msg"]
    assert gateway.client.post("/other/embed_texts", headers=gateway.auth, json={"texts": []}).status_code == 422


# --- knowledge-base routes ----------------------------------------------------------------------------------


def test_list_knowledge_bases_answers_chatchats_shape_from_the_manager(gateway: Gateway) -> None:
    response = gateway.client.get("/knowledge_base/list_knowledge_bases", headers=gateway.auth)
    assert response.status_code == 200
    body = response.json()
    assert (body["code"], body["msg"]) == (200, "success")
    assert [(r["kb_name"], r["kb_info"], r["vs_type"]) for r in body["data"]] == [
        ("samples", "demo", "faiss"), ("docs", "", "faiss")]  # Chatchat 0.3's records, as its web UI reads them
    assert body["knowledge_bases"][0] == {"knowledge_base_name": "samples", "kb_info": "demo"}
    assert gateway.manager.calls == [("list_knowledge_bases", (["v1"],))]


def test_a_knowledge_base_the_manager_does_not_know_is_404_in_both_shapes(gateway: Gateway) -> None:
    response = gateway.client.get("/knowledge_base/list_files", params={"knowledge_base_name": "nope"},
                                  headers=gateway.auth)
    assert response.status_code == 404
    body = response.json()
    assert body["code"] == 404 and body["msg"] == "no knowledge base 'nope'" and body["data"] is None
    assert body["error"] == {"message": "no knowledge base 'nope'", "type": "invalid_request_error", "param": None,
                             "code": 404}


UPLOAD = "/knowledge_base/upload_docs"


def _upload(gateway: Gateway, files: list[tuple[str, tuple[str, bytes]]], **fields: str) -> Any:
    return gateway.client.post(UPLOAD, headers=gateway.auth, files=files,
                               data={"knowledge_base_name": "docs", "wait": "false", **fields})


def test_an_upload_reaches_the_manager_as_files_in_its_spool_folder(gateway: Gateway) -> None:
    response = _upload(gateway, [("files", ("a.md", b"# alpha\n" * 100)), ("files", ("b.txt", b"first")),
                                 ("files", ("b.txt", b"beta"))], override="true")  # a name twice: the last wins
    assert response.status_code == 202 and response.json()["data"] == {"job_id": "job-1"}
    [(kb, changes, received)] = gateway.manager.submitted
    assert kb == "docs" and changes.override and changes.spool == gateway.manager.spools[0]
    assert received == {"a.md": b"# alpha\n" * 100, "b.txt": b"beta"}  # the bytes sent, read from disk
    assert all(Path(p).parent == changes.spool for p in changes.add.values())  # paths, not bytes


@pytest.mark.parametrize(("files", "fields", "status", "words"), [
    ([("files", ("big.md", b"x" * 5000))], {}, 413, "'big.md' is larger than the 4096-byte limit"),
    ([("files", (f"{i}.md", b"a")) for i in range(4)], {}, 400, "Maximum number of files is 3"),
    ([("files", ("dir/tool.md", b"a"))], {}, 400, "path separators"),
    ([("other", ("a.md", b"a"))], {}, 400, "no files to upload"),
    ([("files", ("a.md", b"a"))], {"knowledge_base_name": "../etc"}, 422, "knowledge_base_name: String should match"),
])
def test_a_refused_upload_leaves_no_spool_and_submits_nothing(gateway: Gateway, files: Any, fields: dict[str, str],
                                                              status: int, words: str) -> None:
    response = _upload(gateway, files, **fields)
    assert response.status_code == status and words in response.json()["msg"], response.json()
    assert gateway.manager.submitted == [] and not any(p.exists() for p in gateway.manager.spools)


def test_a_file_of_a_type_no_loader_reads_fails_alone_in_failed_files(gateway: Gateway) -> None:
    response = _upload(gateway, [("files", ("a.md", b"alpha")), ("files", ("tool.exe", b"MZ"))])
    assert response.status_code == 202
    [(_, changes, received)] = gateway.manager.submitted
    assert received == {"a.md": b"alpha"} and list(changes.refused) == ["tool.exe"]
    assert "type '.exe' is not supported" in changes.refused["tool.exe"]
    only = _upload(gateway, [("files", ("logo.png", b"\x89PNG"))], wait="true")  # nothing to build: no job
    assert only.status_code == 200 and list(only.json()["data"]["failed_files"]) == ["logo.png"]
    assert len(gateway.manager.submitted) == 1 and not gateway.manager.spools[-1].exists()
    unknown = _upload(gateway, [("files", ("logo.png", b"\x89PNG"))], knowledge_base_name="nope")
    assert unknown.status_code == 404


def test_an_upload_the_manager_refuses_leaves_no_spool(gateway: Gateway) -> None:
    gateway.manager.refusal = OverloadedError("4 jobs are queued")
    response = _upload(gateway, [("files", ("a.md", b"alpha"))])
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert not gateway.manager.spools[0].exists()


def test_an_upload_that_is_not_multipart_or_too_large_is_refused_before_a_spool(gateway: Gateway) -> None:
    response = gateway.client.post(UPLOAD, headers=gateway.auth, json={"knowledge_base_name": "docs"})
    assert response.status_code == 400 and "multipart/form-data" in response.json()["msg"]
    assert not any(p.exists() for p in gateway.manager.spools)
    response = _upload(gateway, [("files", ("a.md", b"x" * 40_000))])
    assert response.status_code == 413 and "32768 bytes" in response.json()["msg"]


@pytest.mark.parametrize("body", [{"knowledge_base_name": "docs"}, "docs"])
def test_delete_knowledge_base_takes_chatchats_bare_name_body_too(gateway: Gateway, body: Any) -> None:
    response = gateway.client.post("/knowledge_base/delete_knowledge_base", headers=gateway.auth, json=body)
    assert response.status_code == 200 and response.json()["msg"] == "deleted knowledge base docs"
    assert gateway.manager.calls[-1] == ("delete", ("docs", ["v1"]))
    bad = gateway.client.post("/knowledge_base/delete_knowledge_base", headers=gateway.auth, json="../etc")
    assert bad.status_code == 422


def test_update_info_changes_the_description_as_chatchat_names_it(gateway: Gateway) -> None:
    response = gateway.client.post("/knowledge_base/update_info", headers=gateway.auth,
                                   json={"knowledge_base_name": "docs", "kb_info": "产品手册"})
    assert response.status_code == 200 and response.json()["data"]["kb_info"] == "产品手册"
    missing = gateway.client.post("/knowledge_base/update_info", headers=gateway.auth,
                                  json={"knowledge_base_name": "nope", "kb_info": "x"})
    assert missing.status_code == 404 and missing.json()["code"] == 404


@pytest.mark.parametrize("stream", [False, True])
def test_chatchats_kb_chat_routes_return_the_documents_only_when_asked(gateway: Gateway, stream: bool) -> None:
    from rag.client import sse_events

    extra = {"top_k": 2, "score_threshold": 2.0, "prompt_name": "default", "return_direct": True, "stream": stream}
    for path, body in (("/knowledge_base/local_kb/samples/chat/completions",
                        {"model": "glm4-chat", "messages": [{"role": "user", "content": "hi"}], **extra}),
                       ("/chat/kb_chat", {"query": "hi", "mode": "local_kb", "kb_name": "samples", **extra})):
        response = gateway.client.post(path, headers=gateway.auth, json=body)
        assert response.status_code == 200, response.text
        events = list(sse_events(response.iter_lines())) if stream else [response.json()]
        # The OpenAI route ends its stream as OpenAI does; Chatchat's own route as Chatchat does (JSON only).
        assert events[1:] == (["[DONE]"] if stream and path.endswith("completions") else []), events
        answer = events[0]
        choice = answer["choices"][0]
        assert (choice.get("delta") or choice.get("message"))["content"] == "" and choice["finish_reason"] == "stop"
        assert answer["docs"] == [] and answer["knowledge_base"] == "samples"
    assert gateway.client.post("/knowledge_base/search_docs", headers=gateway.auth,
                               json={"knowledge_base_name": "samples", "query": ""}).json() == []


def test_a_body_with_many_invalid_fields_names_only_the_first_problems(gateway: Gateway) -> None:
    response = gateway.client.post("/knowledge_base/update_docs", headers=gateway.auth, json={
        "knowledge_base_name": "", "file_names": [], "chunk_size": 1, "chunk_overlap": -1, "wait": "maybe"})
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert message.startswith("invalid request body: body.knowledge_base_name: ")
    assert "body.file_names" in message and "chunk_size" not in message and "wait" not in message
    assert message.endswith("(and 3 more problems)") and message.count("; ") == 1
    assert response.json()["code"] == 422 and gateway.manager.calls == []


# --- /stats -------------------------------------------------------------------------------------------------


def test_stats_merges_what_the_replicas_report(gateway: Gateway) -> None:
    response = gateway.client.get("/stats", params={"window_s": 60}, headers=gateway.auth)
    assert response.status_code == 200
    assert response.json() == {"weights": {"v1": 100.0}, "draining": False, "window_s": 60.0, "scope": "cluster",
                               "versions": {"v1": {"requests": 12, "errors": 1}}, "replicas": 2}
    assert gateway.stats_windows == [60.0]


def test_stats_are_503_when_the_merged_view_fails(gateway: Gateway) -> None:
    gateway.stats["fail"] = True
    response = gateway.client.get("/stats", headers=gateway.auth)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == 503


def test_replica_stats_do_not_ask_the_other_replicas(gateway: Gateway) -> None:
    gateway.stats["fail"] = True
    response = gateway.client.get("/stats", params={"scope": "replica"}, headers=gateway.auth)
    assert response.status_code == 200 and response.json()["versions"] == {}
    assert gateway.stats_windows == []


# --- /rollout -----------------------------------------------------------------------------------------------


def test_rollout_without_a_state_file_is_none(gateway: Gateway) -> None:
    response = gateway.client.get("/rollout", headers=gateway.auth)
    assert response.status_code == 200 and response.json() == {"status": "none"}


def test_rollout_shows_the_state_file_without_the_config_texts(gateway: Gateway, tmp_path: Path) -> None:
    state = {"status": "running", "step": 2, "canary": "v2", "before": "weights: ...", "target": "weights: ..."}
    (tmp_path / "rollout.json").write_text(json.dumps(state), encoding="utf-8")
    assert gateway.client.get("/rollout").status_code == 401
    response = gateway.client.get("/rollout", headers=gateway.auth)
    assert response.json() == {"status": "running", "step": 2, "canary": "v2"}


# --- OpenAPI ------------------------------------------------------------------------------------------------


def test_openapi_needs_the_key_and_lists_the_bearer_scheme_with_open_probes(gateway: Gateway) -> None:
    assert gateway.client.get("/openapi.json").status_code == 401
    schema = gateway.client.get("/openapi.json", headers=gateway.auth).json()
    assert schema["components"]["securitySchemes"] == {"apiKey": {"type": "http", "scheme": "bearer"}}
    assert schema["security"] == [{"apiKey": []}]
    assert schema["paths"]["/health"]["get"]["security"] == []
    assert schema["paths"]["/ready"]["get"]["security"] == []
    assert "security" not in schema["paths"]["/v1/models"]["get"]  # the global bearer requirement applies
    keyed = [(path, method) for path, operations in schema["paths"].items() for method in operations
             if path not in ("/health", "/ready", "/")]
    assert len(keyed) > 15 and all("401" in schema["paths"][p][m]["responses"] for p, m in keyed)
    assert "401" not in schema["paths"]["/health"]["get"]["responses"]


def test_a_method_a_path_does_not_serve_is_a_405_allowing_every_method_it_does(gateway: Gateway) -> None:
    response = gateway.client.request("OPTIONS", "/knowledge_base/eval_set", headers=gateway.auth)
    assert response.status_code == 405 and response.headers["allow"] == "GET, POST"
    assert gateway.client.delete("/v1/models", headers=gateway.auth).headers["allow"] == "GET"


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/knowledge_base/delete_docs", {"knowledge_base_name": "docs", "file_names": ["a.md"], "wait": 0}, "wait"),
    ("/knowledge_base/update_docs", {"knowledge_base_name": "docs", "file_names": ["a.md"], "wait": "no"}, "wait"),
    ("/knowledge_base/eval_results", {"knowledge_base_name": "docs", "version": "v1", "scores": {"mrr": False}},
     "scores.mrr"),
    ("/knowledge_base/eval_set", {"knowledge_base_name": "docs", "items": [{}]}, "items.0.question"),
    ("/knowledge_base/eval_set", {"knowledge_base_name": "docs", "items": [{"question": " ", "files": ["a.md"]}]},
     "items.0.question"),
    ("/knowledge_base/create_knowledge_base", {"knowledge_base_name": "x" * 64}, "knowledge_base_name"),
])
def test_what_the_schema_does_not_allow_is_a_422_naming_the_field(gateway: Gateway, path: str, body: dict,
                                                                  field: str) -> None:
    response = gateway.client.post(path, headers=gateway.auth, json=body)
    assert response.status_code == 422 and response.json()["error"]["param"] == f"body.{field}", response.json()


def test_golden_scores_are_kept_for_prometheus_and_bad_ones_refused(gateway: Gateway) -> None:
    body = {"knowledge_base_name": "samples", "version": "v2",
            "scores": {"recall@5": 0.75, "citation_rate": 1.0, "words_rate": None}}
    response = gateway.client.post("/knowledge_base/eval_results", json=body, headers=gateway.auth)
    assert response.status_code == 200, response.text
    assert gateway.answers.metrics.golden == ("v2", "samples", {"recall@5": 0.75, "citation_rate": 1.0,  # type: ignore[attr-defined]
                                                                 "words_rate": None})
    for bad in ({"recall@5": 1.5}, {"precision": 0.5}):
        refused = gateway.client.post("/knowledge_base/eval_results", json={**body, "scores": bad},
                                      headers=gateway.auth)
        assert refused.status_code == 422, refused.text
    assert gateway.client.post("/knowledge_base/eval_results", json=body).status_code == 401


@pytest.mark.parametrize("names", [{"version": "v2\u0016x"}, {"knowledge_base_name": "\u001eE-x"},
                                   {"version": "../v2"}])
def test_golden_scores_with_names_no_version_or_kb_could_have_are_refused(gateway: Gateway, names: dict) -> None:
    body = {"knowledge_base_name": "samples", "version": "v2", "scores": {"recall@5": 0.5}, **names}
    response = gateway.client.post("/knowledge_base/eval_results", json=body, headers=gateway.auth)
    assert response.status_code in (400, 422), response.text


# --- Chatchat's file chat (temporary knowledge bases) ---------------------------------------------------------


def test_upload_temp_docs_takes_chatchats_form_and_answers_the_id_and_failed_files(gateway: Gateway) -> None:
    form = {"knowledge_id": "", "chunk_size": "750", "chunk_overlap": "150", "zh_title_enhance": "False"}
    response = gateway.client.post("/knowledge_base/upload_temp_docs", headers=gateway.auth, data=form,
                                   files=[("files", ("a.md", b"# alpha")), ("files", ("tool.exe", b"MZ"))])
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["id"] == TEMP_ID and data["failed_files"] == [{"tool.exe": "type '.exe' is not supported"}]
    [(who, changes, received)] = gateway.manager.submitted
    assert who == "temporary None" and received == {"a.md": b"# alpha"} and list(changes.refused) == ["tool.exe"]
    again = gateway.client.post("/knowledge_base/upload_temp_docs", headers=gateway.auth, data={"prev_id": TEMP_ID},
                                files=[("files", ("b.md", b"# beta"))])
    assert again.status_code == 200 and gateway.manager.submitted[-1][0] == f"temporary {TEMP_ID}"
    nothing = gateway.client.post("/knowledge_base/upload_temp_docs", headers=gateway.auth,
                                  files=[("files", ("logo.png", b"PNG"))])
    assert nothing.status_code == 200 and nothing.json()["data"]["id"] is None and len(gateway.manager.submitted) == 2
    assert not any(p.exists() for p in gateway.manager.spools[-1:])


def test_a_temporary_kb_answers_only_on_its_own_routes_by_id(gateway: Gateway) -> None:
    name = f"temp-{TEMP_ID}"
    for path, body in (("/knowledge_base/search_docs", {"knowledge_base_name": name, "query": "q"}),
                       ("/chat/kb_chat", {"query": "q", "kb_name": name}),
                       ("/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "q"}]}),
                       (f"/knowledge_base/local_kb/{name}/chat/completions",
                        {"model": "m", "messages": [{"role": "user", "content": "q"}]})):
        response = gateway.client.post(path, headers=gateway.auth, json=body)
        assert response.status_code == 404, (path, response.text)
    search = gateway.client.post("/knowledge_base/search_temp_docs", headers=gateway.auth,
                                 json={"knowledge_id": TEMP_ID, "query": "q", "top_k": 3, "score_threshold": 1.0})
    assert search.status_code == 200 and search.json() == []
    gone = gateway.client.post("/knowledge_base/search_temp_docs", headers=gateway.auth,
                               json={"knowledge_id": "b" * 32, "query": "q", "top_k": 3, "score_threshold": 1.0})
    assert gone.status_code == 404
    direct = gateway.client.post("/chat/kb_chat", headers=gateway.auth, json={
        "query": "q", "mode": "temp_kb", "kb_name": TEMP_ID, "return_direct": True, "stream": False})
    assert direct.status_code == 200 and direct.json()["knowledge_base"] == name
    chat = gateway.client.post("/chat/file_chat", headers=gateway.auth, json={"query": "q", "knowledge_id": "b" * 32})
    assert chat.status_code == 404
    used = [args[0] for method, args in gateway.manager.calls if method == "use_temporary"]
    assert used == [TEMP_ID, "b" * 32, TEMP_ID, "b" * 32]


def test_search_docs_without_a_query_lists_the_named_files_chunks_from_the_manager(gateway: Gateway) -> None:
    body = {"knowledge_base_name": "docs", "query": "", "file_name": "a.md", "metadata": {"chunk": 0}}
    response = gateway.client.post("/knowledge_base/search_docs", headers=gateway.auth, json=body)
    assert response.status_code == 200 and response.json()[0]["page_content"] == "listed"
    assert gateway.manager.calls[-1] == ("list_chunks", ("docs", "a.md", {"chunk": 0}, ["v1"]))


def test_search_docs_for_a_name_no_kb_can_have_is_a_404_with_or_without_a_query(gateway: Gateway) -> None:
    """A question route takes any name (its schema says so); one that cannot be a KB's is unknown, not
    invalid, also on the listing path the KB manager would refuse with a 400 (found by schemathesis)."""
    calls = len(gateway.manager.calls)
    for query in ("", "q"):
        body = {"knowledge_base_name": "µ<P", "query": query, "file_name": "", "metadata": {"a": 1}}
        response = gateway.client.post("/knowledge_base/search_docs", headers=gateway.auth, json=body)
        assert response.status_code == 404 and "no knowledge base" in response.text, response.text
    assert len(gateway.manager.calls) == calls
