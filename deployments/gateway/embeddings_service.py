"""`POST /v1/embeddings`: which serving version's Embedder answers, and the calls to it.

A few texts go one by one through the Embedder's question batcher (`rag.coalescing`), so texts from concurrent
clients share a forward pass, as questions do. A long list (langchain sends 1,000 texts per request) goes
in slices of `SLICE` texts, one `embed_many` call at a time: the request holds one of the Embedder's
slots whatever its size, never fills its queue, and chats keep being answered between (and beside) its
slices. Each call is one hop with its own deadline. Documents get no query instruction. Plain code: the
handles and the serving versions come in as parameters, so a fake stands in for Serve in unit tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from deployments.gateway.answer_service import VersionHandles
from deployments.gateway.expiring import Expiring
from deployments.gateway.statuses import bounded
from rag.api import EmbeddingRequest, embedding_response
from rag.errors import (
    InvalidRequestError,
    KnowledgeBaseNotFoundError,
    ServiceUnavailableError,
)

T = TypeVar("T")
# Up to this many texts ride the query batcher, one request each; more go in slices through embed_many.
FEW = 8
# Texts per embed_many call: a fraction of a second of one CPU core for short texts with MiniLM.
SLICE = 64


class EmbeddingsService:
    def __init__(self, handles: VersionHandles, serving_versions: Callable[[], list[str]],
                 hop_timeout_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._handles = handles
        self._serving_versions = serving_versions
        self._hop_timeout_s = hop_timeout_s
        self._described: Expiring[dict[str, Any]] = Expiring(clock=clock)  # each version's model and dimension

    async def create(self, body: EmbeddingRequest) -> dict[str, Any]:
        handle, info = await self._choose(body.model)
        if body.dimensions is not None and body.dimensions != info["dimension"]:
            raise InvalidRequestError(f"{info['model']} gives {info['dimension']} dimensions, not {body.dimensions}")
        texts = body.texts  # each checked by the schema already (not blank, valid Unicode, length)
        vectors, tokens = await asyncio.gather(
            self._one_by_one(handle, texts) if len(texts) <= FEW else self._sliced(handle, texts),
            self._hop(handle.count_tokens.remote(texts)))
        return embedding_response(vectors, body.model, tokens, body.encoding_format)

    async def chatchat_vectors(self, texts: list[str], embed_model: str | None,
                               to_query: bool) -> tuple[list[list[float]], str, str | None]:
        """Chatchat's `/other/embed_texts`: (vectors, the model that made them, a note when `embed_model`
        is one no version runs: then the heaviest serving version's model embeds, as for a KB's creation).
        `to_query` gives each text the model's query instruction, a few texts at a time."""
        note = None
        try:
            handle, info = await self._choose(embed_model) if embed_model else await self._heaviest()
        except KnowledgeBaseNotFoundError:
            handle, info = await self._heaviest()
            note = f"embed_model {str(embed_model)[:64]!r} is not run here; embedded with {info['model']!r}"
        if to_query:
            vectors = []
            for start in range(0, len(texts), FEW):
                vectors += await self._one_by_one(handle, texts[start:start + FEW], query=True)
        else:
            vectors = await (self._one_by_one(handle, texts) if len(texts) <= FEW else self._sliced(handle, texts))
        return [[float(x) for x in vector] for vector in vectors], str(info["model"]), note

    async def _heaviest(self) -> tuple[Any, dict[str, Any]]:
        versions = self._serving_versions()
        if not versions:
            raise ServiceUnavailableError("no pipeline version is serving yet; retry shortly")
        return await self._embedder(versions[0])

    async def _one_by_one(self, handle: Any, texts: list[str], query: bool = False) -> list[Any]:
        return list(await self._hop(asyncio.gather(*(handle.embed.remote(t, query) for t in texts))))

    async def _sliced(self, handle: Any, texts: list[str]) -> list[Any]:
        vectors: list[Any] = []
        for start in range(0, len(texts), SLICE):
            vectors.extend(await self._hop(handle.embed_many.remote(texts[start:start + SLICE])))
        return vectors

    def _hop(self, call: Awaitable[T]) -> Awaitable[T]:
        return bounded(call, self._hop_timeout_s, "the Embedder", self._handles.is_overload)

    async def _choose(self, model: str) -> tuple[Any, dict[str, Any]]:
        """The heaviest serving version whose Embedder runs `model`, or whose Retriever serves KB `model`."""
        versions = self._serving_versions()
        if not versions:
            raise ServiceUnavailableError("no pipeline version is serving yet; retry shortly")
        for version in versions:
            handle, info = await self._embedder(version)
            if model == info["model"]:
                return handle, info
        for version in versions:
            if model in await self._hop((await self._handles.get(version)).knowledge_bases.remote()):
                return await self._embedder(version)
        raise KnowledgeBaseNotFoundError(f"unknown model {model[:64]!r}: name a knowledge base from GET /v1/models "
                                         "or the embedding model")

    async def _embedder(self, version: str) -> tuple[Any, dict[str, Any]]:
        handle = await self._handles.embedder(version)
        return handle, await self._described.get(version, lambda: self._hop(handle.describe.remote()))
