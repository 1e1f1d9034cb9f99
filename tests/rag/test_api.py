"""HTTP request/response shapes: parsing to Questions, OpenAI chunk rendering, SSE framing, client round trip."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from pydantic import ValidationError

from rag.api import (
    LIMITS,
    NAME_MAX_CHARS,
    NOT_BLANK,
    SSE_DONE,
    ChatCompletionRequest,
    CompletionFormatter,
    KbChatRequest,
    SearchDocsRequest,
    chatchat_references,
    document_json,
    error_body,
    sse,
    summarize_problems,
)
from rag.client import StreamedAnswer, apply_event, sse_events
from rag.config import LimitsConfig
from rag.errors import InvalidRequestError
from rag.records import AnswerDelta, AnswerEnd, AnswerEvent, AnswerStart, ChatTurn, Passage

PASSAGES = [
    Passage(id=4, text="Run make stop.", source="operations.md", score=0.61234567, metadata={"chunk": 3}),
    Passage(id=9, text="升级时不中断请求。", source="faq_zh.md", score=0.5, metadata={"title": "常见问题"}),
]
EVENTS: list[AnswerEvent] = [
    AnswerStart("samples", PASSAGES, "v2"),
    AnswerDelta("Run"),
    AnswerDelta(" `make stop`"),
    AnswerDelta(" 停止 [1]"),
    AnswerEnd("stop", 3, "v2"),
]


def _limits(question_chars: int) -> LimitsConfig:
    return LimitsConfig(max_question_chars=question_chars)


def _chat(**body: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "samples", **body})


def test_to_question_carries_text_history_and_overrides() -> None:
    request = _chat(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Cite sources."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "  How do I stop the service?  "},
    ], top_k=5, score_threshold=0.3, max_tokens=50, temperature=0.2)
    question = request.to_question("samples", LIMITS, max_history=20)
    assert question.text == "How do I stop the service?"
    assert question.knowledge_base == "samples"
    assert question.history == [ChatTurn("system", "Be brief."), ChatTurn("system", "Cite sources."),
                                ChatTurn("user", "Hi"), ChatTurn("assistant", "Hello!")]
    assert (question.top_k, question.score_threshold, question.max_new_tokens, question.temperature) == (
        5, 0.3, 50, 0.2)


def test_to_question_defaults_leave_overrides_unset() -> None:
    question = _chat(messages=[{"role": "user", "content": "q"}]).to_question("kb", _limits(100), 5)
    assert question.history == []
    assert (question.top_k, question.score_threshold, question.max_new_tokens, question.temperature) == (
        None, None, None, None)


def test_history_is_bounded_to_the_latest_turns() -> None:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(9)]
    request = _chat(messages=messages)
    assert [t.content for t in request.to_question("kb", _limits(100), 3).history] == ["m5", "m6", "m7"]
    assert request.to_question("kb", _limits(100), 0).history == []


def test_knowledge_base_field_and_override() -> None:
    request = _chat(messages=[{"role": "user", "content": "q"}], knowledge_base="manuals")
    assert request.knowledge_base == "manuals"
    assert request.to_question("manuals", _limits(100), 5).knowledge_base == "manuals"
    assert _chat(messages=[{"role": "user", "content": "q"}]).knowledge_base is None


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    both = _chat(messages=[{"role": "user", "content": "q"}], max_tokens=50, max_completion_tokens=7)
    assert both.to_question("kb", _limits(100), 5).max_new_tokens == 7
    only_old = _chat(messages=[{"role": "user", "content": "q"}], max_tokens=50)
    assert only_old.to_question("kb", _limits(100), 5).max_new_tokens == 50


@pytest.mark.parametrize("role", ["assistant", "system", "developer"])
def test_the_question_is_the_last_user_message_and_what_follows_it_is_left_out(role: str) -> None:
    request = _chat(messages=[{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                              {"role": "user", "content": "q2"}, {"role": role, "content": "prefill"}])
    question = request.to_question("kb", _limits(100), 5)
    assert question.text == "q2" and [t.content for t in question.history] == ["q1", "a1"]
    with pytest.raises(ValidationError, match="at least one message must have role 'user'"):
        _chat(messages=[{"role": role, "content": "x"}])


def test_too_long_question_is_invalid() -> None:
    request = _chat(messages=[{"role": "user", "content": "x" * 101}])
    with pytest.raises(InvalidRequestError, match="101") as info:
        request.to_question("kb", _limits(100), 5)
    assert "100" in str(info.value)
    assert _chat(messages=[{"role": "user", "content": "x" * 100}]).to_question("kb", _limits(100), 5).text == "x" * 100


@pytest.mark.parametrize("content", ["", "   ", "\n\t ", "\x1c\u3000"])
def test_blank_content_is_refused_by_the_schema(content: str) -> None:
    # The schema's pattern and the server's strip() agree on what is blank (both Python's notion).
    with pytest.raises(ValidationError):
        _chat(messages=[{"role": "user", "content": content}])
    assert not content.strip()


def test_unknown_openai_fields_are_ignored() -> None:
    request = _chat(messages=[{"role": "user", "content": "q"}], n=1, presence_penalty=0.5,
                    logit_bias={"1": 2}, stream_options={"include_usage": True}, stream=True)
    assert request.stream is True
    assert not hasattr(request, "presence_penalty")


@pytest.mark.parametrize("body", [
    {"messages": []},
    {"messages": [{"role": "tool", "content": "x"}]},
    {"messages": [{"role": "user", "content": "q"}], "max_tokens": 0},
    {"messages": [{"role": "user", "content": "q"}], "temperature": 3},
    {"messages": [{"role": "user", "content": "q"}], "top_k": 51},
    {"model": "", "messages": [{"role": "user", "content": "q"}]},
    {"model": "m" * (NAME_MAX_CHARS + 1), "messages": [{"role": "user", "content": "q"}]},
    {"user": "u" * 200_000, "messages": [{"role": "user", "content": "q"}]},
    {"conversation_id": "c" * 129, "messages": [{"role": "user", "content": "q"}]},
    {"knowledge_base": "k" * 129, "messages": [{"role": "user", "content": "q"}]},
    {"messages": [{"role": "user", "content": "q"}] * (LIMITS.max_messages + 1)},
    {"messages": [{"role": "user", "content": "q" * (LIMITS.max_message_chars + 1)}]},
    {"messages": [{"role": "user", "content": "\ud800"}]},
    {"messages": [{"role": "user", "content": "q"}], "max_tokens": LIMITS.max_tokens + 1},
    {"messages": [{"role": "user", "content": "q"}], "max_completion_tokens": LIMITS.max_tokens + 1},
])
def test_malformed_chat_requests_fail_validation(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "samples", **body})


def test_kb_chat_request_to_question() -> None:
    request = KbChatRequest.model_validate({
        "query": " 如何升级？ ", "knowledge_base_name": "samples", "top_k": 4, "score_threshold": 0.1,
        "history": [{"role": "developer", "content": "d"}, {"role": "user", "content": "u"}],
        "max_tokens": 12, "temperature": 0.5, "prompt_name": "default", "return_direct": False})
    assert request.stream is True
    question = request.to_question(request.knowledge_base, _limits(100), max_history=10)
    assert question.text == "如何升级？"
    assert question.knowledge_base == "samples"
    assert question.history == [ChatTurn("system", "d"), ChatTurn("user", "u")]
    assert (question.top_k, question.score_threshold, question.max_new_tokens, question.temperature) == (
        4, pytest.approx(1 - 0.1 ** 2 / 2), 12, 0.5)  # Chatchat's distance 0.1 as cosine 0.995
    with pytest.raises(ValidationError):
        KbChatRequest.model_validate({"query": "  ", "knowledge_base_name": "samples"})
    with pytest.raises(ValidationError):
        KbChatRequest.model_validate({"query": "q", "knowledge_base_name": ""})
    with pytest.raises(ValidationError, match="kb_name"):
        KbChatRequest.model_validate({"query": "q"})


def test_kb_chat_takes_chatchat_03s_body_with_a_distance_threshold() -> None:
    body = {"query": "你好", "mode": "local_kb", "kb_name": "samples", "top_k": 3, "score_threshold": 2.0,
            "history": [], "stream": True, "model": "glm4-chat", "temperature": 0.7, "max_tokens": 0,
            "prompt_name": "default", "return_direct": True}
    with pytest.raises(ValidationError):  # max_tokens 0 is not a budget
        KbChatRequest.model_validate(body)
    request = KbChatRequest.model_validate({**body, "max_tokens": None})
    question = request.to_question(request.knowledge_base, _limits(100), max_history=10)
    assert question.knowledge_base == "samples" and question.score_threshold == -1.0  # 2.0 keeps everything
    assert request.return_direct and request.knowledge_base == "samples"
    assert KbChatRequest.model_json_schema()["anyOf"] == [  # a name, not null
        {"required": ["kb_name"], "properties": {"kb_name": {"type": "string"}}},
        {"required": ["knowledge_base_name"], "properties": {"knowledge_base_name": {"type": "string"}}}]
    with pytest.raises(ValidationError):
        KbChatRequest.model_validate({**body, "mode": "search_engine"})
    assert KbChatRequest.model_validate({**body, "max_tokens": None, "mode": "temp_kb"}).mode == "temp_kb"


def test_search_docs_request() -> None:
    request = SearchDocsRequest.model_validate({"query": "stop", "knowledge_base_name": "samples", "top_k": 2,
                                                "file_name": "", "metadata": {}})
    question = request.to_question(_limits(100))
    assert (question.text, question.knowledge_base, question.top_k, question.score_threshold) == (
        "stop", "samples", 2, None)
    with pytest.raises(InvalidRequestError):
        SearchDocsRequest.model_validate({"query": "   ", "knowledge_base_name": "samples"}).to_question(_limits(9))
    with pytest.raises(InvalidRequestError):
        SearchDocsRequest(query="x" * 11, knowledge_base_name="samples").to_question(_limits(10))


def test_document_json_is_chatchat_shaped() -> None:
    doc = document_json(PASSAGES[0])
    assert doc == {"id": "4", "page_content": "Run make stop.", "score": 0.612346,
                   "metadata": {"chunk": 3, "source": "operations.md"}}


def test_formatter_chunk_shapes() -> None:
    formatter = CompletionFormatter("samples")
    first, *deltas, last = [formatter.chunk(e) for e in EVENTS]
    for chunk in (first, *deltas, last):
        assert chunk["id"] == formatter.id
        assert chunk["id"].startswith("chatcmpl-")
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "samples"
        assert chunk["created"] == formatter.created
        assert len(chunk["choices"]) == 1
        assert chunk["choices"][0]["index"] == 0
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["choices"][0]["finish_reason"] is None
    assert first["sources"] == [document_json(p) for p in PASSAGES]
    assert first["knowledge_base"] == "samples"
    assert first["version"] == "v2"
    assert [d["choices"][0]["delta"] for d in deltas] == [{"content": "Run"}, {"content": " `make stop`"},
                                                           {"content": " 停止 [1]"}]
    assert all(d["choices"][0]["finish_reason"] is None for d in deltas)
    assert last["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert last["usage"] == {"prompt_tokens": 0, "completion_tokens": 3, "total_tokens": 3}
    assert last["version"] == "v2"


def test_formatter_docs_key_and_distinct_ids() -> None:
    chatchat = CompletionFormatter("samples", docs_key="docs")
    first = chatchat.chunk(EVENTS[0])
    assert "docs" in first
    assert "sources" not in first
    assert CompletionFormatter("samples").id != chatchat.id
    assert abs(chatchat.created - time.time()) < 60


def test_completion_folds_events() -> None:
    formatter = CompletionFormatter("samples")
    body = formatter.completion(EVENTS)
    assert body["object"] == "chat.completion"
    assert body["id"] == formatter.id
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Run `make stop` 停止 [1]"},
                                "finish_reason": "stop"}]
    assert body["usage"]["completion_tokens"] == 3
    assert body["sources"] == [document_json(p) for p in PASSAGES]
    assert (body["knowledge_base"], body["version"]) == ("samples", "v2")
    json.dumps(body)  # plain JSON


def test_completion_with_length_finish() -> None:
    events: list[AnswerEvent] = [AnswerStart("kb", [], "v1"), AnswerDelta("a"), AnswerEnd("length", 1, "v1")]
    body = CompletionFormatter("kb").completion(events)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == "a"
    assert body["sources"] == []


def test_error_chunk_and_body() -> None:
    formatter = CompletionFormatter("samples")
    chunk = formatter.error_chunk("boom")
    assert chunk["choices"] == []
    assert chunk["error"] == {"message": "boom", "type": "server_error", "code": "stream_error"}
    assert error_body("bad", 400, "messages") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "messages", "code": 400}}
    assert error_body("down", 503)["error"]["type"] == "server_error"


def test_sse_framing() -> None:
    assert sse({"a": 1, "text": "中文"}) == 'data: {"a": 1, "text": "中文"}\n\n'
    assert sse("[DONE]") == "data: [DONE]\n\n"
    assert SSE_DONE == "data: [DONE]\n\n"
    framed = sse({"text": "line one\nline two"})
    assert framed.count("\n") == 2  # a newline in the payload is escaped by JSON, never breaks the frame
    assert framed.endswith("\n\n")


def test_round_trip_through_sse_and_client() -> None:
    formatter = CompletionFormatter("samples")
    body = "".join(sse(formatter.chunk(e)) for e in EVENTS) + SSE_DONE
    answer = StreamedAnswer(status=200)
    started = time.perf_counter()
    events = list(sse_events(iter(body.splitlines())))
    assert events[-1] == "[DONE]"
    assert len(events) == len(EVENTS) + 1
    for event in events:
        apply_event(answer, event, started)
    assert answer.text == "Run `make stop` 停止 [1]"
    assert answer.sources == [document_json(p) for p in PASSAGES]
    assert answer.version == "v2"
    assert answer.finish_reason == "stop"
    assert answer.done is True
    assert answer.error is None
    assert answer.first_token_s is not None
    assert answer.complete


def test_client_sees_docs_key_and_errors() -> None:
    formatter = CompletionFormatter("samples", docs_key="docs")
    lines = [*sse(formatter.chunk(EVENTS[0])).splitlines(), ": keep-alive comment", "",
             *sse(formatter.chunk(EVENTS[1])).splitlines(), *sse(formatter.error_chunk("generator died")).splitlines()]
    answer = StreamedAnswer(status=200)
    for event in sse_events(iter(lines)):
        apply_event(answer, event, time.perf_counter())
    assert answer.sources == [document_json(p) for p in PASSAGES]
    assert answer.text == "Run"
    assert answer.error == "generator died"
    assert answer.finish_reason is None
    assert not answer.done
    assert not answer.complete


def test_lowered_limits_are_enforced_with_a_400() -> None:
    request = _chat(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b" * 50},
                              {"role": "user", "content": "q"}], max_tokens=100, top_k=20)
    cases = [({"max_messages": 2}, "3 messages"), ({"max_message_chars": 10}, "50 characters"),
             ({"max_tokens": 99}, "max_tokens is 100"), ({"max_top_k": 10}, "top_k is 20")]
    for lowered, message in cases:
        with pytest.raises(InvalidRequestError, match=message):
            request.to_question("kb", LimitsConfig(**lowered), 5)
    assert request.to_question("kb", LIMITS, 5).text == "q"


def test_the_schema_states_the_limits() -> None:
    schema = json.dumps(ChatCompletionRequest.model_json_schema())
    for fragment in ['"maxLength": 128', f'"maxItems": {LIMITS.max_messages}',
                     f'"maxLength": {LIMITS.max_message_chars}', f'"pattern": {json.dumps(NOT_BLANK)}',
                     f'"maximum": {LIMITS.max_tokens}']:
        assert fragment in schema, fragment
    assert f'"maxLength": {LIMITS.max_question_chars}' in json.dumps(KbChatRequest.model_json_schema())
    messages = ChatCompletionRequest.model_json_schema()["properties"]["messages"]
    assert messages["contains"]["properties"]["role"] == {"const": "user"}  # a question is asked


def test_validation_errors_are_summarised_not_echoed() -> None:
    problems = [{"loc": ("body", "messages", i, "role"), "msg": "x" * 500, "input": "secret" * 1000}
                for i in range(10_000)]
    summary = summarize_problems(problems, 3)
    assert len(summary) < 500 and "secret" not in summary
    assert summary.count("body.messages") == 3 and "9997 more" in summary
    assert summarize_problems(problems[:2], 3).count("body.messages") == 2


def test_embedding_request_takes_a_string_or_a_list_and_answers_in_openais_shape() -> None:
    import base64

    import numpy as np
    from pydantic import ValidationError

    from rag.api import EmbeddingRequest, embedding_response

    assert EmbeddingRequest(input="one", model="samples").texts == ["one"]
    assert EmbeddingRequest(input=["a", "b"], model="samples").texts == ["a", "b"]
    for bad in ({"input": [], "model": "m"}, {"input": "  ", "model": "m"}, {"input": [1, 2], "model": "m"},
                {"input": "x", "model": "m", "encoding_format": "int8"}):
        with pytest.raises(ValidationError):
            EmbeddingRequest(**bad)
    vectors = [np.array([0.5, -1.25, 3.0], dtype=np.float32), np.array([1.0, 0.0, 0.0], dtype=np.float32)]
    plain = embedding_response(vectors, "samples", 7, "float")
    assert plain["usage"] == {"prompt_tokens": 7, "total_tokens": 7} and plain["object"] == "list"
    assert [d["index"] for d in plain["data"]] == [0, 1] and plain["data"][0]["embedding"] == [0.5, -1.25, 3.0]
    packed = embedding_response(vectors, "samples", 7, "base64")["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(packed), dtype="<f4").tolist() == [0.5, -1.25, 3.0]


def test_search_docs_filters_by_file_name_wildcards_and_metadata_after_a_widened_search() -> None:
    request = SearchDocsRequest.model_validate({"query": "q", "knowledge_base_name": "kb", "top_k": 2,
                                                "score_threshold": 1.0, "file_name": "guide_%.md",
                                                "metadata": {"lang": "en"}})
    question = request.to_question(LimitsConfig())
    assert question.top_k == LimitsConfig().max_top_k and question.score_threshold == pytest.approx(0.5)
    docs = [{"metadata": {"source": name, "lang": lang}, "page_content": name}
            for name, lang in [("guide_a.md", "en"), ("guide_b.md", "zh"), ("other.md", "en"), ("guide_c.md", "en"),
                               ("guide_d.md", "en"), ("guide_.txt", "en")]]
    assert [d["metadata"]["source"] for d in request.keep(docs)] == ["guide_a.md", "guide_c.md"]
    unfiltered = SearchDocsRequest.model_validate({"query": "q", "knowledge_base_name": "kb", "top_k": 2})
    assert unfiltered.to_question(LimitsConfig()).top_k == 2 and unfiltered.keep(docs) == docs


def test_chatchat_references_are_its_markdown_strings_with_a_download_link() -> None:
    render = chatchat_references("samples", "http://127.0.0.1:8000/")
    refs = render([{"metadata": {"source": "指南 1.md"}, "page_content": "text"}])
    assert refs == ["出处 [1] [指南 1.md](http://127.0.0.1:8000/knowledge_base/download_doc?knowledge_base_name=samples"
                    "&file_name=%E6%8C%87%E5%8D%97+1.md) \n\ntext\n\n"]


@pytest.mark.parametrize(("field", "value", "accepted"), [
    ("top_k", 5.0, True), ("top_k", True, False), ("top_k", "5", False), ("temperature", 1, True),
    ("temperature", False, False), ("score_threshold", "0.5", False), ("stream", 0, False), ("stream", "true", False),
])
def test_numbers_and_flags_are_what_json_schema_means(field: str, value: Any, accepted: bool) -> None:
    body = {"model": "samples", "messages": [{"role": "user", "content": "q"}], field: value}
    if accepted:
        assert ChatCompletionRequest.model_validate(body)
    else:
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate(body)
