"""Chatchat 0.3's file chat over temporary knowledge bases: the request shapes of `upload_temp_docs`,
`search_temp_docs` and `/chat/file_chat`, and file_chat's own event format.

A temporary KB is named by its id (Chatchat's `knowledge_id`: 32 hex digits); what it holds and how long it
lives is the manager's business (`deployments/gateway/temporary_kbs.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import Field

from rag.api import (
    Distance,
    MaxTokens,
    Messages,
    Name,
    Query,
    Temperature,
    TopK,
    _history,
    _question_text,
    _Request,
    cosine_from_distance,
    document_json,
    enforce,
)
from rag.config import LimitsConfig
from rag.kb_api import SplitterForm
from rag.records import AnswerDelta, AnswerEvent, AnswerStart, Question

TempId = Annotated[str, Field(min_length=1, max_length=64, description="the id upload_temp_docs answered")]


class TempUploadForm(SplitterForm):
    """The form fields of `upload_temp_docs` besides its files. Chatchat's server names the id of an
    earlier upload `prev_id`, its client sends `knowledge_id`: either adds these files to that temporary
    KB (same id) while it lives; otherwise (none, empty, or expired) a new one is made."""

    prev_id: Annotated[str, Field(max_length=64)] = ""
    knowledge_id: Annotated[str, Field(max_length=64)] = ""
    zh_title_enhance: bool = Field(False, description="accepted for Chatchat clients; titles are not enhanced")

    @property
    def temp_id(self) -> str | None:
        return self.prev_id or self.knowledge_id or None


class SearchTempDocs(_Request):
    """Chatchat's search_temp_docs: an empty query finds nothing."""

    knowledge_id: TempId
    query: Annotated[str, Field(max_length=LimitsConfig().max_question_chars)] = ""
    top_k: TopK | None = None
    score_threshold: Distance | None = None

    def to_question(self, knowledge_base: str, limits: LimitsConfig) -> Question:
        enforce(limits, [], None, self.top_k)
        return Question(text=_question_text(self.query, limits.max_question_chars), knowledge_base=knowledge_base,
                        top_k=self.top_k, score_threshold=cosine_from_distance(self.score_threshold))


class FileChatRequest(_Request):
    """Chatchat's `/chat/file_chat` body, as its client's `file_chat` sends it."""

    query: Query
    knowledge_id: TempId
    top_k: TopK | None = None
    score_threshold: Distance | None = None
    history: Messages = Field(default_factory=list)
    stream: bool = Field(False, description="as in Chatchat, both answer as SSE events; false: one event")
    model_name: Name | None = None
    temperature: Temperature | None = None
    max_tokens: MaxTokens | None = None
    prompt_name: Name | None = Field(None, description="accepted; a version's prompt template is in its config")

    def to_question(self, knowledge_base: str, limits: LimitsConfig, max_history: int) -> Question:
        enforce(limits, self.history, self.max_tokens, self.top_k)
        return Question(text=_question_text(self.query, limits.max_question_chars), knowledge_base=knowledge_base,
                        history=_history(self.history, max_history), top_k=self.top_k,
                        score_threshold=cosine_from_distance(self.score_threshold),
                        max_new_tokens=self.max_tokens, temperature=self.temperature)


def file_references(docs: list[dict[str, Any]]) -> list[Any]:
    """Passages as file_chat gives them in `docs`: `出处 [n] [file] \\n\\n text` (no link: a temporary KB's
    files are not downloadable)."""
    return [f"出处 [{n}] [{doc['metadata'].get('source', '')}] \n\n{doc['page_content']}\n\n"
            for n, doc in enumerate(docs, 1)]


class FileChatFormatter:
    """file_chat's events: `{"answer": token}` as the answer grows, then `{"docs": [...]}`; or, not
    streamed, one `{"answer", "docs"}`. No `[DONE]`: Chatchat's client parses every event as JSON."""

    done = ""
    one_event_per_write = True

    def __init__(self) -> None:
        self._docs: list[Any] = []

    def docs(self, passages: Sequence[Any]) -> list[Any]:
        return file_references([document_json(p) for p in passages])

    def chunk(self, event: AnswerEvent) -> dict[str, Any] | None:
        if isinstance(event, AnswerStart):
            self._docs = self.docs(event.passages)
            return None
        if isinstance(event, AnswerDelta):
            return {"answer": event.text}
        return {"docs": self._docs}

    def error_chunk(self, message: str, code: str = "stream_error") -> dict[str, Any]:
        return {"code": 500, "msg": message, "error": code}

    def completion(self, events: list[AnswerEvent]) -> dict[str, Any]:
        start = next(e for e in events if isinstance(e, AnswerStart))
        return {"answer": "".join(e.text for e in events if isinstance(e, AnswerDelta)),
                "docs": self.docs(start.passages)}
