"""Plain records passed between the stages (and, in Serve, between processes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class Passage:
    """A retrieved chunk of a knowledge base with its similarity to the query."""

    id: int
    text: str
    source: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "source": self.source, "score": self.score,
                "metadata": self.metadata}


@dataclass(frozen=True)
class ChatTurn:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """Everything a generator needs to answer one question."""

    question: str
    passages: list[Passage]
    history: list[ChatTurn] = field(default_factory=list)
    max_new_tokens: int = 256
    temperature: float = 0.0
    max_seconds: float = 60.0


@dataclass(frozen=True)
class GenerationChunk:
    """A piece of streamed answer text; the last chunk of a stream carries the finish reason."""

    text: str
    finish_reason: FinishReason | None = None
    completion_tokens: int | None = None  # on the last chunk, when the backend counted them (an upstream's usage)
    pieces: int = 1  # the backend's pieces joined in this text (`join_text`): the count when it gives none


@dataclass(frozen=True)
class AnswerStart:
    """First event of a pipeline stream: the sources the answer is built from."""

    knowledge_base: str
    passages: list[Passage]
    version: str


@dataclass(frozen=True)
class AnswerDelta:
    text: str


@dataclass(frozen=True)
class AnswerEnd:
    finish_reason: FinishReason
    completion_tokens: int
    version: str


AnswerEvent = AnswerStart | AnswerDelta | AnswerEnd


@dataclass(frozen=True)
class Question:
    """A user's question to one knowledge base, with per-request overrides of the pipeline settings."""

    text: str
    knowledge_base: str
    history: list[ChatTurn] = field(default_factory=list)
    top_k: int | None = None
    score_threshold: float | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
