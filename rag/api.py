"""Request and response shapes of the HTTP API (OpenAI chat completions, Chatchat kb_chat, search).

Pure pydantic: the gateway parses with these, turns them into `Question`s, and renders the
pipeline's answer events with the formatters below.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rag.errors import InvalidRequestError
from rag.records import AnswerDelta, AnswerEnd, AnswerEvent, AnswerStart, ChatTurn, Passage, Question


class _Request(BaseModel):
    # OpenAI clients send fields this service does not use (n, presence_penalty, ...): ignore them.
    model_config = ConfigDict(extra="ignore")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class ChatCompletionRequest(_Request):
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    user: str | None = None
    conversation_id: str | None = Field(None, description="keeps a conversation on one version")
    knowledge_base: str | None = Field(None, description="knowledge base to answer from; default: the model")
    top_k: int | None = Field(None, ge=1, le=50)
    score_threshold: float | None = Field(None, ge=-1, le=1)

    @property
    def sticky_key(self) -> str | None:
        """What pins a request to one version while several are live: the conversation, else the user."""
        return self.conversation_id or self.user

    def to_question(self, knowledge_base: str, max_chars: int, max_history: int) -> Question:
        *earlier, last = self.messages
        if last.role != "user":
            raise InvalidRequestError(f"the last message must have role 'user', got {last.role!r}")
        return Question(text=_question_text(last.content, max_chars), knowledge_base=knowledge_base,
                        history=_history(earlier, max_history), top_k=self.top_k,
                        score_threshold=self.score_threshold,
                        max_new_tokens=self.max_completion_tokens or self.max_tokens,
                        temperature=self.temperature)


class KbChatRequest(_Request):
    """Langchain-Chatchat's `/chat/kb_chat` body (the fields that apply to a local knowledge base)."""

    query: str
    knowledge_base_name: str = Field(min_length=1)
    top_k: int | None = Field(None, ge=1, le=50)
    score_threshold: float | None = Field(None, ge=-1, le=1)
    history: list[ChatMessage] = Field(default_factory=list)
    stream: bool = True
    model: str | None = None
    conversation_id: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1)

    def to_question(self, max_chars: int, max_history: int) -> Question:
        return Question(text=_question_text(self.query, max_chars), knowledge_base=self.knowledge_base_name,
                        history=_history(self.history, max_history), top_k=self.top_k,
                        score_threshold=self.score_threshold, max_new_tokens=self.max_tokens,
                        temperature=self.temperature)


class SearchDocsRequest(_Request):
    query: str
    knowledge_base_name: str = Field(min_length=1)
    top_k: int | None = Field(None, ge=1, le=50)
    score_threshold: float | None = Field(None, ge=-1, le=1)

    def to_question(self, max_chars: int) -> Question:
        return Question(text=_question_text(self.query, max_chars), knowledge_base=self.knowledge_base_name,
                        top_k=self.top_k, score_threshold=self.score_threshold)

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


def _question_text(text: str, max_chars: int) -> str:
    text = text.strip()
    if not text:
        raise InvalidRequestError("the question is empty")
    if len(text) > max_chars:
        raise InvalidRequestError(f"the question has {len(text)} characters; the limit is {max_chars}")
    return text


def _history(messages: list[ChatMessage], max_turns: int) -> list[ChatTurn]:
    """The last `max_turns` messages as turns; OpenAI's newer "developer" role is a system message."""
    turns = [ChatTurn("system" if m.role == "developer" else m.role, m.content) for m in messages]
    return turns[-max_turns:] if max_turns else []


def document_json(passage: Passage) -> dict[str, Any]:
    """A retrieved passage as Chatchat's search_docs returns it."""
    return {"id": str(passage.id), "page_content": passage.text, "score": round(passage.score, 6),
            "metadata": {**passage.metadata, "source": passage.source}}


def sse(payload: dict[str, Any] | str) -> str:
    body = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {body}\n\n"


SSE_DONE = sse("[DONE]")


class CompletionFormatter:
    """Renders answer events as OpenAI `chat.completion.chunk`s, or folds them into one completion."""

    def __init__(self, model: str, docs_key: str = "sources") -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.docs_key = docs_key

    def chunk(self, event: AnswerEvent) -> dict[str, Any]:
        if isinstance(event, AnswerStart):
            return self._chunk({"role": "assistant", "content": ""}, None,
                               {self.docs_key: [document_json(p) for p in event.passages],
                                "knowledge_base": event.knowledge_base, "version": event.version})
        if isinstance(event, AnswerDelta):
            return self._chunk({"content": event.text}, None, {})
        return self._chunk({}, event.finish_reason, {"version": event.version, "usage": _usage(event)})

    def error_chunk(self, message: str, code: str = "stream_error") -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "error": {"message": message, "type": "server_error", "code": code}}

    def completion(self, events: list[AnswerEvent]) -> dict[str, Any]:
        start = next(e for e in events if isinstance(e, AnswerStart))
        end = next(e for e in events if isinstance(e, AnswerEnd))
        text = "".join(e.text for e in events if isinstance(e, AnswerDelta))
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": end.finish_reason}],
                "usage": _usage(end), self.docs_key: [document_json(p) for p in start.passages],
                "knowledge_base": start.knowledge_base, "version": end.version}

    def _chunk(self, delta: dict[str, Any], finish: str | None, extra: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


def _usage(end: AnswerEnd) -> dict[str, int]:
    # Prompt tokens are not counted across stages; the generated count is what clients budget on.
    return {"prompt_tokens": 0, "completion_tokens": end.completion_tokens,
            "total_tokens": end.completion_tokens}


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
