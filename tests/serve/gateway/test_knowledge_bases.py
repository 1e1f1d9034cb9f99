"""The knowledge-base API (Chatchat 0.3 routes) over real HTTP, on the gateway package's cluster: upload under
chat load, live search without a rollout, listing, download, deletion, jobs, recreate, refusals, Chinese."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from rag.client import sse_events, stream_chat
from tests.rag.files import DEEP_MARKUP, docx_bomb
from tests.support.service import LocalService

pytestmark = pytest.mark.cluster

MANUAL = {
    "volcano.md": "# Volcanoes\n\nA caldera forms when a magma chamber empties and the summit collapses. "
                  "Basaltic lava is runny; rhyolitic lava is viscous and explosive.",
    "bread.html": "<html><head><title>Bread</title></head><body><h1>Sourdough</h1><p>A sourdough starter is "
                  "flour and water fermented by wild yeast and lactobacilli; feed it daily.</p></body></html>",
    "orbits.txt": "Kepler's third law: the square of a planet's orbital period is proportional to the cube of "
                  "the semi-major axis of its orbit.",
}


def _upload(http: httpx.Client, kb: str, files: dict[str, bytes | str], **form: Any) -> httpx.Response:
    parts = [("files", (name, data.encode() if isinstance(data, str) else data)) for name, data in files.items()]
    return http.post("/knowledge_base/upload_docs", files=parts,
                     data={"knowledge_base_name": kb, **{k: str(v).lower() for k, v in form.items()}})


def _search(http: httpx.Client, kb: str, query: str) -> list[str]:
    response = http.post("/knowledge_base/search_docs", json={"query": query, "knowledge_base_name": kb, "top_k": 3})
    assert response.status_code == 200, response.text
    return [doc["metadata"]["source"] for doc in response.json()]


def _listed(http: httpx.Client, kb: str) -> dict[str, dict[str, Any]]:
    response = http.get("/knowledge_base/list_files", params={"knowledge_base_name": kb})
    assert response.status_code == 200 and response.json()["code"] == 200, response.text
    return {f["file_name"]: f for f in response.json()["data"]}


@pytest.fixture(scope="module")
def uploaded(service: LocalService) -> str:
    """A KB created and filled over HTTP while chat streams run on another KB."""
    from rag.loadgen import LoadGenerator

    with service.client(timeout=120) as http:
        created = http.post("/knowledge_base/create_knowledge_base",
                            json={"knowledge_base_name": "manuals", "kb_info": "test manuals"})
        assert created.status_code == 200 and created.json()["code"] == 200, created.text
        load = LoadGenerator(service.gateway, concurrency=2, max_seconds=120, api_key=service.api_key).start()
        try:
            # Two hostile files beside the good ones: each fails alone, parsed in its own limited process.
            response = _upload(http, "manuals", {**MANUAL, "tags.html": DEEP_MARKUP, "bomb.docx": docx_bomb()})
        finally:
            result = load.stop()
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["state"] == "done" and data["served"] is True and set(data["changed_files"]) == set(MANUAL)
    assert set(data["failed_files"]) == {"tags.html", "bomb.docx"}, data["failed_files"]
    assert "nested deeper than" in data["failed_files"]["tags.html"]
    assert "unpacks to more than" in data["failed_files"]["bomb.docx"]
    assert result.answers and not result.failed and not result.truncated and not result.errors, \
        (result.failed[:3], result.truncated[:3], result.errors[:3])
    return "manuals"


def test_an_uploaded_kb_is_searchable_without_a_rollout(http: httpx.Client, uploaded: str) -> None:
    assert _search(http, uploaded, "what is a sourdough starter made of")[0] == "bread.html"
    assert _search(http, uploaded, "orbital period and the semi-major axis")[0] == "orbits.txt"
    listed = http.get("/knowledge_base/list_knowledge_bases").json()
    assert {"samples", uploaded} <= {record["kb_name"] for record in listed["data"]}
    details = {d["knowledge_base_name"]: d for d in listed["knowledge_bases"]}
    assert details[uploaded]["language"] == "en" and details[uploaded]["retrieval_mode"] == "hybrid"
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert models[uploaded]["retrieval"]["v1"]["mode"] == "hybrid" and models[uploaded]["retrieval"]["v1"]["why"]


def test_list_files_and_download_the_original_bytes(http: httpx.Client, uploaded: str) -> None:
    listed = _listed(http, uploaded)
    assert set(listed) == set(MANUAL)
    assert listed["volcano.md"]["file_size"] == len(MANUAL["volcano.md"].encode())
    assert all(f["docs_count"] >= 1 and f["in_db"] and f["in_folder"] for f in listed.values())
    download = http.get("/knowledge_base/download_doc", params={"knowledge_base_name": uploaded,
                                                                "file_name": "bread.html"})
    assert download.status_code == 200 and download.content == MANUAL["bread.html"].encode()


def test_delete_then_re_upload_a_file(http: httpx.Client, uploaded: str) -> None:
    deleted = http.post("/knowledge_base/delete_docs", json={"knowledge_base_name": uploaded,
                                                             "file_names": ["orbits.txt"], "delete_content": True})
    assert deleted.status_code == 200 and deleted.json()["data"]["deleted_files"] == ["orbits.txt"], deleted.text
    assert "orbits.txt" not in _listed(http, uploaded)
    assert "orbits.txt" not in _search(http, uploaded, "orbital period and the semi-major axis")
    again = _upload(http, uploaded, {"orbits.txt": MANUAL["orbits.txt"]})
    assert again.status_code == 200 and again.json()["data"]["changed_files"] == ["orbits.txt"]
    assert _search(http, uploaded, "orbital period and the semi-major axis")[0] == "orbits.txt"


def test_upload_without_waiting_gives_a_job_to_poll(http: httpx.Client, uploaded: str) -> None:
    started = _upload(http, uploaded, {"late.md": "Late arrivals: the ferry leaves at nine."}, wait=False)
    assert started.status_code == 202, started.text
    job_id = started.json()["data"]["job_id"]
    deadline = time.monotonic() + 60
    while (view := http.get(f"/knowledge_base/jobs/{job_id}").json()["data"])["state"] != "done":
        assert view["state"] in ("queued", "running") and time.monotonic() < deadline, view
        time.sleep(0.2)
    assert view["files_total"] == 1 and view["chunks_embedded"] == view["chunks_total"] == 1
    assert http.get("/knowledge_base/jobs/job-unknown").status_code == 404


def test_recreate_streams_progress_to_done(http: httpx.Client, uploaded: str) -> None:
    with http.stream("POST", "/knowledge_base/recreate_vector_store",
                     json={"knowledge_base_name": uploaded}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response.iter_lines()))
    # Every event is JSON, as Chatchat's client parses them: no [DONE] after the last.
    assert all(isinstance(e, dict) for e in events) and events[-1]["job"]["state"] == "done", events[-3:]
    assert events[-1]["job"]["embedded"] == events[-1]["job"]["chunks"]


@pytest.mark.parametrize("name", ["../escape.md", "/tmp/absolute.md", "sub/dir.md", ".env"])
def test_unsafe_uploads_are_refused_and_nothing_is_written(service: LocalService, http: httpx.Client,
                                                           uploaded: str, name: str) -> None:
    outside = sorted(p for p in service.work.rglob("*") if service.kb_root not in p.parents)
    before = _listed(http, uploaded)
    response = _upload(http, uploaded, {name: "payload"})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == 400 and name.rsplit("/", 1)[-1] in body["msg"] and body["data"] is None
    assert _listed(http, uploaded) == before
    assert sorted(p for p in service.work.rglob("*") if service.kb_root not in p.parents) == outside
    assert not any((service.kb_root / ".spool").iterdir())  # the upload's spool folder went with it
    assert not (service.kb_root.parent / "escape.md").exists() and not __import__("os").path.exists(
        "/tmp/absolute.md")


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/knowledge_base/create_knowledge_base", {"knowledge_base_name": "../etc"}, 422),
    ("/knowledge_base/create_knowledge_base", {"knowledge_base_name": "samples"}, 409),
    ("/knowledge_base/delete_knowledge_base", {"knowledge_base_name": "no_such_kb"}, 404),
    ("/knowledge_base/delete_docs", {"knowledge_base_name": "samples", "file_names": ["nope.md"]}, 404),
])
def test_kb_errors_carry_code_msg_data_and_the_real_status(http: httpx.Client, path: str, body: dict[str, Any],
                                                           status: int) -> None:
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["code"] == status and response.json()["msg"] and response.json()["data"] is None


def test_delete_a_knowledge_base(http: httpx.Client) -> None:
    assert http.post("/knowledge_base/create_knowledge_base", json={"knowledge_base_name": "scratch"}).status_code \
        == 200
    assert _upload(http, "scratch", {"a.md": "scratch notes about tides"}).status_code == 200
    # Its last file deleted, the KB stays, empty (as Chatchat allows): found nothing, answered without passages.
    emptied = http.post("/knowledge_base/delete_docs", json={"knowledge_base_name": "scratch", "file_names": ["a.md"]})
    assert emptied.status_code == 200 and emptied.json()["data"]["failed_files"] == {}, emptied.text
    found = http.post("/knowledge_base/search_docs", json={"query": "tides", "knowledge_base_name": "scratch"})
    assert found.status_code == 200 and found.json() == []
    asked = http.post("/chat/kb_chat", json={"query": "What about tides?", "kb_name": "scratch", "stream": False})
    assert asked.status_code == 200 and asked.json()["docs"] == []
    deleted = http.post("/knowledge_base/delete_knowledge_base", json={"knowledge_base_name": "scratch"})
    assert deleted.status_code == 200
    assert "scratch" not in {r["kb_name"] for r in http.get("/knowledge_base/list_knowledge_bases").json()["data"]}
    deadline = time.monotonic() + 10
    while "scratch" in {m["id"] for m in http.get("/v1/models").json()["data"]}:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_a_chinese_kb_uploaded_over_http_is_searched_lexical_first(http: httpx.Client) -> None:
    from tests.rag.test_chinese import QUESTIONS, ZH_DOCS

    assert http.post("/knowledge_base/create_knowledge_base", json={"knowledge_base_name": "zhdocs"}).status_code \
        == 200
    assert _upload(http, "zhdocs", dict(ZH_DOCS)).status_code == 200
    for question, source in QUESTIONS.items():
        assert _search(http, "zhdocs", question)[0] == source, question
    details = {d["knowledge_base_name"]: d for d in
               http.get("/knowledge_base/list_knowledge_bases").json()["knowledge_bases"]}
    assert (details["zhdocs"]["language"], details["zhdocs"]["retrieval_mode"]) == ("zh", "lexical")
    answer = stream_chat(http, next(iter(QUESTIONS)), "zhdocs")
    assert answer.complete and "日志" in answer.text and answer.sources[0]["metadata"]["source"] == "tail.md"


def test_a_golden_set_is_stored_over_http_and_scored_without_counting_as_user_traffic(
        service: LocalService, http: httpx.Client, uploaded: str) -> None:
    from control.evaluation import evaluate, fetch_items

    items = [{"question": "What is a sourdough starter made of?", "files": ["bread.html"], "words": ["flour"]},
             {"question": "How does a caldera form?", "files": ["volcano.md"]},
             {"question": "What does Kepler's third law relate?", "files": ["orbits.txt"]}]
    bad = http.post("/knowledge_base/eval_set", json={"knowledge_base_name": uploaded,
                                                       "items": [*items, {"question": " ", "files": ["x.md"]}]})
    assert bad.status_code == 422 and "items.3.question" in bad.json()["msg"]
    assert http.get("/knowledge_base/eval_set", params={"knowledge_base_name": uploaded}).json()["data"]["count"] == 0
    stored = http.post("/knowledge_base/eval_set", json={"knowledge_base_name": uploaded, "items": items})
    assert stored.status_code == 200 and stored.json()["data"] == {"count": 3, "files_not_in_kb": []}
    time.sleep(1.5)  # earlier tests' answers reach the board up to half a second after they end
    before = http.get("/stats").json()["versions"]["v1"]["requests"]
    result = evaluate(service.gateway, service.api_key, uploaded, fetch_items(service.gateway, service.api_key,
                                                                              uploaded), "v1")
    assert result["items"] == 3 and result["errors"] == 0 and result["recall@5"] == 1.0
    assert result["citation_rate"] == 1.0 and result["words_rate"] == 1.0
    time.sleep(1.5)  # the gateways hand their outcomes to the board every half second
    assert http.get("/stats").json()["versions"]["v1"]["requests"] == before
    unknown = http.post("/v1/chat/completions", headers={"x-rag-evaluate-version": "v9"},
                        json={"model": uploaded, "messages": [{"role": "user", "content": "q"}]})
    assert unknown.status_code == 404 and "not deployed" in unknown.text


def test_a_file_chat_over_a_temporary_kb_as_chatchats_web_ui_runs_it(service: LocalService, http: httpx.Client) -> None:
    """upload_temp_docs -> id; the openai SDK on /knowledge_base/temp_kb/{id} (docs in the first chunk);
    /chat/file_chat's own events; never listed nor reachable by name."""
    from openai import OpenAI

    tide = "The harbour master logs the tide every six hours; storm flags go up at force eight."
    response = http.post("/knowledge_base/upload_temp_docs", data={"knowledge_id": "", "chunk_size": "750"},
                         files=[("files", ("harbour.txt", tide.encode())), ("files", ("logo.png", b"PNG"))])
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    temp_id = data["id"]
    assert data["served"] is True and [list(f) for f in data["failed_files"]] == [["logo.png"]]
    client = OpenAI(base_url=f"{service.gateway}/knowledge_base/temp_kb/{temp_id}", api_key=service.api_key)
    chunks = list(client.chat.completions.create(
        model="any", stream=True, messages=[{"role": "user", "content": "When do storm flags go up?"}],
        extra_body={"top_k": 3, "score_threshold": 2.0, "prompt_name": "default", "return_direct": False}))
    docs = chunks[0].model_extra["docs"]
    assert len(docs) == 1 and docs[0].startswith("出处 [1] [harbour.txt]") and "force eight" in docs[0]
    assert "force eight" in "".join(c.choices[0].delta.content or "" for c in chunks[1:] if c.choices)
    with http.stream("POST", "/chat/file_chat", json={"query": "How often is the tide logged?",
                                                       "knowledge_id": temp_id, "stream": True}) as streamed:
        events = list(sse_events(streamed.iter_lines()))
    assert events[-1]["docs"][0].startswith("出处 [1] [harbour.txt]") and "".join(e.get("answer", "") for e in events)
    listed = http.get("/knowledge_base/list_knowledge_bases").json()["data"]
    models = http.get("/v1/models").json()["data"]
    assert not any(temp_id in r["kb_name"] for r in listed) and not any(temp_id in m["id"] for m in models)
    name = f"temp-{temp_id}"
    assert (service.kb_root / name).is_dir()
    by_name = http.post("/knowledge_base/search_docs", json={"knowledge_base_name": name, "query": "tide"})
    assert by_name.status_code == 404
