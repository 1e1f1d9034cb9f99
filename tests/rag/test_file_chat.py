"""Chatchat's file chat shapes: its upload form and request bodies as its client sends them, and
file_chat's own events (answer tokens, then the references; no [DONE])."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rag.config import LimitsConfig
from rag.file_chat import FileChatFormatter, FileChatRequest, SearchTempDocs, TempUploadForm
from rag.records import AnswerDelta, AnswerEnd, AnswerStart, Passage


def test_the_upload_form_takes_either_name_of_an_earlier_id_and_chatchats_strings() -> None:
    sent = TempUploadForm.model_validate({"knowledge_id": "", "chunk_size": "750", "chunk_overlap": "150",
                                          "zh_title_enhance": "False"})
    assert sent.temp_id is None and sent.splitter() == {"chunk_size": 750, "chunk_overlap": 150}
    assert TempUploadForm.model_validate({"prev_id": "ab"}).temp_id == "ab"
    assert TempUploadForm.model_validate({"knowledge_id": "cd"}).temp_id == "cd"
    with pytest.raises(ValidationError):
        TempUploadForm.model_validate({"chunk_size": "10"})


def test_file_chat_body_as_chatchats_client_sends_it() -> None:
    body = {"query": "潮汐何时记录?", "knowledge_id": "a" * 32, "top_k": 3, "score_threshold": 1.0, "history": [],
            "stream": True, "model_name": None, "temperature": 0.9, "max_tokens": None, "prompt_name": "default"}
    question = FileChatRequest.model_validate(body).to_question("temp-x", LimitsConfig(), 10)
    assert (question.knowledge_base, question.top_k, question.score_threshold) == ("temp-x", 3, 0.5)
    assert FileChatRequest.model_validate({"query": "q", "knowledge_id": "i"}).stream is False  # Chatchat's default
    search = SearchTempDocs.model_validate({"knowledge_id": "i", "query": "q", "top_k": 2, "score_threshold": 2.0})
    assert search.to_question("temp-x", LimitsConfig()).score_threshold == -1.0
    with pytest.raises(ValidationError):
        FileChatRequest.model_validate({"query": "q", "knowledge_id": ""})


def test_file_chat_events_are_answer_tokens_then_the_references() -> None:
    passages = [Passage(0, "the tide is logged every six hours", "log.md", 0.8)]
    events = [AnswerStart("temp-x", passages, "v1"), AnswerDelta("Every"), AnswerDelta(" six hours"),
              AnswerEnd("stop", 2, "v1")]
    formatter = FileChatFormatter()
    shown = [formatter.chunk(e) for e in events]
    references = ["出处 [1] [log.md] \n\nthe tide is logged every six hours\n\n"]
    assert shown == [None, {"answer": "Every"}, {"answer": " six hours"}, {"docs": references}]
    assert formatter.done == "" and formatter.one_event_per_write
    assert FileChatFormatter().completion(events) == {"answer": "Every six hours", "docs": references}
