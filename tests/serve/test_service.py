"""The deployed service over real HTTP: streaming chat, the openai client, kb_chat, search, errors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from rag.client import sse_events, stream_chat
from tests.serve.conftest import LocalService

pytestmark = pytest.mark.cluster

QUESTION = "How do I stop the service?"


@pytest.fixture
def http(service: LocalService):
    with httpx.Client(base_url=service.gateway, timeout=60) as client:
        yield client


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
    assert last_chunk["usage"]["completion_tokens"] == len(middle)


def test_openai_client_streams_unchanged(service: LocalService) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{service.gateway}/v1", api_key="not-needed", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="samples", stream=True, messages=[{"role": "user", "content": "Where is the Ray dashboard?"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "8265" in text
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert (chunks[0].model_extra or {})["sources"]
    models = client.models.list()
    assert [m.id for m in models.data] == ["samples"]
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
    assert len(events[0]["docs"]) == 2 and events[-1] == "[DONE]"
    assert "ingesting.md" in [d["metadata"]["source"] for d in events[0]["docs"]]
    whole = http.post("/chat/kb_chat", json={**body, "stream": False}).json()
    assert whole["choices"][0]["message"]["content"] and len(whole["docs"]) == 2


def test_chinese_question_finds_the_chinese_faq(http: httpx.Client) -> None:
    answer = stream_chat(http, "如何升级服务而不中断请求？")
    assert answer.complete
    assert "faq_zh.md" in [doc["metadata"]["source"] for doc in answer.sources]


def test_search_docs(http: httpx.Client) -> None:
    response = http.post("/knowledge_base/search_docs",
                         json={"query": "What port does the dashboard use?", "knowledge_base_name": "samples",
                               "top_k": 2, "score_threshold": 0.1})
    assert response.status_code == 200
    docs = response.json()
    assert len(docs) == 2 and all(d["score"] >= 0.1 for d in docs)
    assert docs[0]["score"] >= docs[1]["score"]


def test_concurrent_streams_all_complete(http: httpx.Client, service: LocalService) -> None:
    questions = [QUESTION, "Where is the Ray dashboard?", "Which file formats can I ingest?",
                 "How are traffic weights changed?"] * 2

    def ask(question: str):
        with httpx.Client(base_url=service.gateway, timeout=120) as client:
            return stream_chat(client, question)

    with ThreadPoolExecutor(len(questions)) as pool:
        answers = list(pool.map(ask, questions))
    assert all(a.complete and a.text for a in answers), [a for a in answers if not a.complete]


BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", 400, "JSON"),
    ("/v1/chat/completions", {"model": "samples"}, 422, "messages"),
    ("/v1/chat/completions", {"model": "samples", "messages": "hi"}, 422, "messages"),
    ("/v1/chat/completions", {"model": "samples", "messages": [{"role": "user", "content": "  "}]}, 400, "empty"),
    ("/v1/chat/completions", {"model": "samples", "messages": [{"role": "assistant", "content": "x"}]}, 400,
     "last message"),
    ("/v1/chat/completions", {"model": "samples", "messages": [{"role": "user", "content": "x"}], "max_tokens": "a"},
     422, "max_tokens"),
    ("/v1/chat/completions", {"model": "no-such-kb", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "no-such-kb"),
    ("/v1/chat/completions", {"model": "samples", "stream": True, "messages": [{"role": "user", "content": "hi"}],
                              "knowledge_base": "missing"}, 404, "missing"),
    ("/chat/kb_chat", {"query": "", "knowledge_base_name": "samples"}, 400, "empty"),
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
                         json={"model": "samples", "messages": [{"role": "user", "content": "x" * 5000}]})
    assert response.status_code == 400 and "limit" in response.json()["error"]["message"]
