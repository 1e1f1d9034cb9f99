"""Request and response shapes of the HTTP API (OpenAI chat completions, Chatchat kb_chat, search).

Pure pydantic: the gateway parses with these, turns them into `Question`s, and renders the
pipeline's answer events with the formatters below.
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import urlencode

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from rag.config import LimitsConfig, RetrievalConfig
from rag.errors import InvalidRequestError
from rag.records import AnswerDelta, AnswerEnd, AnswerEvent, AnswerStart, ChatTurn, Passage, Question

# The schema states the default limits; a deployment may lower them (`GatewayConfig.limits`), see `enforce`.
LIMITS = LimitsConfig()
# Identifiers (model, user, conversation, knowledge base) are short; a fixed bound keeps every echo of
# them (the `model` of each streamed chunk) small.
NAME_MAX_CHARS = 128
# At least one character that is not whitespace. The server strips with Python's notion of whitespace,
# so pydantic checks the pattern with Python's `re` too (`regex_engine` below), as schemathesis does.
# Spelt out as the characters `str.isspace` (hence `str.strip`) treats as whitespace, rather than `\S`:
# fuzzers' regex engines disagree on whether `\S` matches the separators U+001C-U+001F.
_SPACE = "\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
NOT_BLANK = f"[^{_SPACE}]"

Name = Annotated[str, Field(min_length=1, max_length=NAME_MAX_CHARS)]


def _json_number(value: Any) -> Any:
    """A JSON number as the schema means it: `true` or `"5"` is not one (pydantic would take them), while
    5.0 is an integer (which pydantic's strict mode would refuse)."""
    if isinstance(value, (bool, str)):
        raise ValueError("must be a JSON number")
    return value


JsonNumber = BeforeValidator(_json_number)
# JSON booleans only: `0` or `"no"` for `stream` is a client's mistake to report, not a guess to make.
Flag = Annotated[bool, Field(strict=True)]
TopK = Annotated[int, Field(ge=1, le=LIMITS.max_top_k), JsonNumber]
MaxTokens = Annotated[int, Field(ge=1, le=LIMITS.max_tokens), JsonNumber]
Threshold = Annotated[float, Field(ge=-1, le=1, description="minimum cosine similarity"), JsonNumber]
# Chatchat's score_threshold (its routes: search_docs, kb_chat, local_kb chat): the distance between the
# normalised vectors, 0 (same) to 2 (opposite), smaller is closer, 2 keeps everything. For unit vectors
# distance² = 2 − 2·cosine, so it maps exactly onto the cosine similarity this service filters by.
Distance = Annotated[float, Field(ge=0, le=2, description="maximum distance between the normalised vectors (0-2, as "
                                                        "in Chatchat; 2 keeps everything)"), JsonNumber]


def cosine_from_distance(distance: float | None) -> float | None:
    return None if distance is None else 1.0 - distance * distance / 2.0
Temperature = Annotated[float, Field(ge=0, le=2), JsonNumber]
Query = Annotated[str, Field(min_length=1, max_length=LIMITS.max_question_chars, pattern=NOT_BLANK)]


class _Request(BaseModel):
    # OpenAI clients send fields this service does not use (n, presence_penalty, ...): ignore them.
    # Lone surrogates ("\\ud800" in JSON) are refused by pydantic itself (string_unicode): they would fail
    # the tokenizer later, inside a batch shared with other requests.
    model_config = ConfigDict(extra="ignore", regex_engine="python-re")


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer"]
    content: str = Field(min_length=1, max_length=LIMITS.max_message_chars, pattern=NOT_BLANK)


Messages = Annotated[list[ChatMessage], Field(max_length=LIMITS.max_messages)]


class ChatCompletionRequest(_Request):
    model: Name
    # At least one from the user: the last of them is the question (see to_question).
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=LIMITS.max_messages, json_schema_extra={
        "contains": {"type": "object", "properties": {"role": {"const": "user"}}, "required": ["role"]}})]
    stream: Flag = False
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    user: Name | None = None
    conversation_id: Name | None = Field(None, description="keeps a conversation on one version")
    knowledge_base: Name | None = Field(None, description="knowledge base to answer from; default: the model")
    top_k: TopK | None = None
    score_threshold: Threshold | None = None

    @property
    def sticky_key(self) -> str | None:
        """What pins a request to one version while several are live: the conversation, else the user."""
        return self.conversation_id or self.user

    @model_validator(mode="after")
    def _asks_something(self) -> ChatCompletionRequest:
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("messages: at least one message must have role 'user' (the question)")
        return self

    def to_question(self, knowledge_base: str, limits: LimitsConfig, max_history: int) -> Question:
        """The last user message is the question and what comes before it the history; messages after it
        (an assistant prefill, a trailing system note) have no place in a retrieval prompt and are left out."""
        asked = max(i for i, m in enumerate(self.messages) if m.role == "user")
        earlier, last = self.messages[:asked], self.messages[asked]
        max_new_tokens = self.max_completion_tokens or self.max_tokens
        enforce(limits, self.messages, max_new_tokens, self.top_k)
        return Question(text=_question_text(last.content, limits.max_question_chars), knowledge_base=knowledge_base,
                        history=_history(earlier, max_history), top_k=self.top_k,
                        score_threshold=self.score_threshold, max_new_tokens=max_new_tokens,
                        temperature=self.temperature)


class KbChatRequest(_Request):
    """Langchain-Chatchat's `/chat/kb_chat` body (the fields that apply to a local knowledge base): 0.3's
    `kb_name`, `mode`, `prompt_name`, `return_direct`, and 0.2's `knowledge_base_name`."""

    # One of the two names is required: said in the schema, so that a client knows before it asks.
    model_config = ConfigDict(extra="ignore", regex_engine="python-re", json_schema_extra={
        "anyOf": [{"required": [name], "properties": {name: {"type": "string"}}}
                  for name in ("kb_name", "knowledge_base_name")]})

    query: Query
    kb_name: Name | None = Field(None, description="the knowledge base (Chatchat 0.3)")
    knowledge_base_name: Name | None = Field(None, description="the knowledge base (Chatchat 0.2)")
    mode: Literal["local_kb", "temp_kb"] = Field("local_kb", description="temp_kb: `kb_name` is the id of a "
                                                 "temporary knowledge base (upload_temp_docs)")
    top_k: TopK | None = None
    score_threshold: Distance | None = None
    history: Messages = Field(default_factory=list)
    stream: Flag = True
    model: Name | None = None
    conversation_id: Name | None = None
    temperature: Temperature | None = None
    max_tokens: MaxTokens | None = None
    prompt_name: Name | None = Field(None, description="accepted; a version's prompt template is in its config")
    return_direct: Flag = Field(False, description="the retrieved documents only, no generated answer")

    @model_validator(mode="after")
    def _names_a_kb(self) -> KbChatRequest:
        if not (self.kb_name or self.knowledge_base_name):
            raise ValueError("kb_name (or knowledge_base_name) names the knowledge base to answer from")
        return self

    @property
    def knowledge_base(self) -> str:
        return str(self.kb_name or self.knowledge_base_name)

    def to_question(self, knowledge_base: str, limits: LimitsConfig, max_history: int) -> Question:
        enforce(limits, self.history, self.max_tokens, self.top_k)
        return Question(text=_question_text(self.query, limits.max_question_chars),
                        knowledge_base=knowledge_base, history=_history(self.history, max_history),
                        top_k=self.top_k, score_threshold=cosine_from_distance(self.score_threshold),
                        max_new_tokens=self.max_tokens, temperature=self.temperature)


class LocalKbChatRequest(ChatCompletionRequest):
    """Chatchat 0.3's OpenAI-compatible KB chat (`/knowledge_base/local_kb/{kb}/chat/completions`, what its
    web UI calls with the openai SDK): OpenAI's body plus Chatchat's `extra_body` fields."""

    score_threshold: Distance | None = None  # Chatchat's scale on Chatchat's route
    prompt_name: Name | None = Field(None, description="accepted; a version's prompt template is in its config")
    return_direct: Flag = Field(False, description="the retrieved documents only, no generated answer")

    def to_question(self, knowledge_base: str, limits: LimitsConfig, max_history: int) -> Question:
        question = super().to_question(knowledge_base, limits, max_history)
        return replace(question, score_threshold=cosine_from_distance(self.score_threshold))


class SearchDocsRequest(_Request):
    """Chatchat's search_docs: an empty query finds nothing (as in Chatchat); `file_name` (SQL wildcards
    `%` and `_`) and `metadata` (first-level keys, equal values) keep only the passages that match."""

    query: Annotated[str, Field(max_length=LIMITS.max_question_chars)] = ""
    knowledge_base_name: Name
    top_k: TopK | None = None
    score_threshold: Distance | None = None
    file_name: Annotated[str, Field(max_length=1024)] = ""
    metadata: dict[str, Any] = Field(default_factory=dict, max_length=20)

    @property
    def filtered(self) -> bool:
        return bool(self.file_name or self.metadata)

    def to_question(self, limits: LimitsConfig) -> Question:
        """The search to run; filtered, it asks for as many passages as a search may return, to filter."""
        top_k = limits.max_top_k if self.filtered else self.top_k
        enforce(limits, [], None, self.top_k)
        return Question(text=_question_text(self.query, limits.max_question_chars),
                        knowledge_base=self.knowledge_base_name, top_k=top_k,
                        score_threshold=cosine_from_distance(self.score_threshold))

    def keep(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The passages the filters keep, the best `top_k` of them (a version's default top_k when not
        asked: the search itself was widened to filter)."""
        top_k = self.top_k or RetrievalConfig.model_fields["top_k"].default
        if not self.filtered:
            return docs
        pattern = re.compile("".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in self.file_name)
                             ) if self.file_name else None
        kept = [d for d in docs if (pattern is None or pattern.fullmatch(str(d["metadata"].get("source", ""))))
                and all(d["metadata"].get(k) == v for k, v in self.metadata.items())]
        return kept[:top_k]


EMBEDDING_INPUTS = 2048  # as OpenAI's endpoint takes
EmbeddingText = Annotated[str, Field(min_length=1, max_length=LIMITS.max_message_chars, pattern=NOT_BLANK)]


class EmbedTexts(_Request):
    """Chatchat's `/other/embed_texts` body."""

    texts: Annotated[list[EmbeddingText], Field(min_length=1, max_length=EMBEDDING_INPUTS)]
    embed_model: Name | None = Field(None, description="one no version runs is answered with the served one")
    to_query: Flag = Field(False, description="give each text the model's query instruction")


class EmbeddingRequest(_Request):
    """OpenAI's `POST /v1/embeddings`: `model` is a knowledge base (embedded by the model that serves it)
    or the embedding model's name."""

    input: EmbeddingText | Annotated[list[EmbeddingText], Field(min_length=1, max_length=EMBEDDING_INPUTS)]
    model: Name
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, le=65_536), JsonNumber] | None = None
    user: Name | None = None

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def embedding_response(vectors: Sequence[Any], model: str, tokens: int, encoding: str) -> dict[str, Any]:
    """OpenAI's embedding list; base64 is the little-endian float32 bytes, as the openai SDK decodes it."""
    def encoded(vector: Any) -> Any:
        array = np.asarray(vector, dtype="<f4")
        return base64.b64encode(array.tobytes()).decode() if encoding == "base64" else array.tolist()
    return {"object": "list", "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)]}


def enforce(limits: LimitsConfig, messages: list[ChatMessage], max_tokens: int | None, top_k: int | None) -> None:
    """The limits a deployment lowered below what the schema states (the schema checked the rest)."""
    if len(messages) > limits.max_messages:
        raise InvalidRequestError(f"{len(messages)} messages; the limit is {limits.max_messages}")
    longest = max((len(m.content) for m in messages), default=0)
    if longest > limits.max_message_chars:
        raise InvalidRequestError(f"a message has {longest} characters; the limit is {limits.max_message_chars}")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise InvalidRequestError(f"max_tokens is {max_tokens}; the limit is {limits.max_tokens}")
    if top_k is not None and top_k > limits.max_top_k:
        raise InvalidRequestError(f"top_k is {top_k}; the limit is {limits.max_top_k}")


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


def summarize_problems(problems: Sequence[dict[str, Any]], shown: int, max_chars: int = 100) -> str:
    """A validation failure in a few lines however large the body: the first `shown` problems (field and
    reason, each cut to `max_chars`, never the offending value) and how many more there were."""
    parts = [_clip(f"{'.'.join(str(x) for x in p.get('loc', ()))}: {p.get('msg', '')}", max_chars)
             for p in problems[:shown]]
    more = len(problems) - len(parts)
    return "; ".join(parts) + (f" (and {more} more problems)" if more > 0 else "")


def _clip(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars - 1] + "…"


def document_json(passage: Passage) -> dict[str, Any]:
    """A retrieved passage as Chatchat's search_docs returns it."""
    return {"id": str(passage.id), "page_content": passage.text, "score": round(passage.score, 6),
            "metadata": {**passage.metadata, "source": passage.source}}


def sse(payload: dict[str, Any] | str) -> str:
    body = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {body}\n\n"


SSE_DONE = sse("[DONE]")


def chatchat_references(knowledge_base: str, base_url: str) -> Callable[[list[dict[str, Any]]], list[Any]]:
    """Retrieved passages as Chatchat's kb chat gives them in `docs` (its web UI joins them as markdown):
    `出处 [n] [file](download link) \n\n text`."""
    def render(docs: list[dict[str, Any]]) -> list[Any]:
        references = []
        for number, doc in enumerate(docs, 1):
            source = str(doc["metadata"].get("source", ""))
            link = f"{base_url.rstrip('/')}/knowledge_base/download_doc?" + urlencode(
                {"knowledge_base_name": knowledge_base, "file_name": source})
            references.append(f"出处 [{number}] [{source}]({link}) \n\n{doc['page_content']}\n\n")
        return references
    return render


def _as_they_are(docs: list[dict[str, Any]]) -> list[Any]:
    return list(docs)


class AnswerFormatter(Protocol):
    """How a route shows an answer's events: `chunk` gives one event's payload (None: nothing to send for
    it), `done` ends the stream."""

    done: str
    one_event_per_write: bool  # for a client that parses each chunk it receives as one event (Chatchat's)

    def chunk(self, event: AnswerEvent) -> dict[str, Any] | None: ...

    def error_chunk(self, message: str, code: str = "stream_error") -> dict[str, Any]: ...

    def completion(self, events: list[AnswerEvent]) -> dict[str, Any]: ...


class CompletionFormatter:
    """Renders answer events as OpenAI `chat.completion.chunk`s, or folds them into one completion. The
    first chunk carries the retrieved passages under `docs_key`, each as `render` makes it (search_docs'
    documents by default; Chatchat's reference strings on its kb-chat routes)."""

    def __init__(self, model: str, docs_key: str = "sources",
                 render: Callable[[list[dict[str, Any]]], list[Any]] = _as_they_are, chatchat: bool = False) -> None:
        # Chatchat's own client (its /chat/kb_chat) parses each chunk it receives as one JSON event: no
        # [DONE], and one event per write.
        self.done = "" if chatchat else SSE_DONE
        self.one_event_per_write = chatchat
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.docs_key = docs_key
        self.render = render

    def docs(self, passages: Sequence[Passage]) -> list[Any]:
        return self.render([document_json(p) for p in passages])

    def chunk(self, event: AnswerEvent) -> dict[str, Any]:
        if isinstance(event, AnswerStart):
            return self._chunk({"role": "assistant", "content": ""}, None,
                               {self.docs_key: self.docs(event.passages),
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
                "usage": _usage(end), self.docs_key: self.docs(start.passages),
                "knowledge_base": start.knowledge_base, "version": end.version}

    def documents_only(self, docs: list[dict[str, Any]], knowledge_base: str, version: str,
                       stream: bool) -> dict[str, Any]:
        """`return_direct`: the retrieved passages and no answer, as one chunk or one completion."""
        extra = {self.docs_key: self.render(docs), "knowledge_base": knowledge_base, "version": version}
        if stream:
            return self._chunk({"role": "assistant", "content": ""}, "stop", extra)
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}, **extra}

    def _chunk(self, delta: dict[str, Any], finish: str | None, extra: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


def _usage(end: AnswerEnd) -> dict[str, int]:
    # Prompt tokens are not counted across stages; the generated count is what clients budget on.
    return {"prompt_tokens": 0, "completion_tokens": end.completion_tokens,
            "total_tokens": end.completion_tokens}


class ErrorDetail(BaseModel):
    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: str | None = None
    code: int


class ErrorBody(BaseModel):
    """Every refusal and failure, in OpenAI's shape (what `error_body` builds)."""

    error: ErrorDetail


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
