"""`POST /v1/embeddings`: which serving version's Embedder answers, and the call itself.

Each text is its own request to the Embedder, so texts from concurrent clients share its batches
(`@serve.batch`), as questions do; documents get no query instruction. Plain code: the handles and the
serving versions come in as parameters, so a fake stands in for Serve in unit tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from deployments.gateway.answer_service import VersionHandles
from rag.api import EmbeddingRequest, embedding_response
from rag.errors import InvalidRequestError, KnowledgeBaseNotFoundError, ServiceUnavailableError


class EmbeddingsService:
    def __init__(self, handles: VersionHandles, serving_versions: Callable[[], list[str]]) -> None:
        self._handles = handles
        self._serving_versions = serving_versions
        self._described: dict[str, dict[str, Any]] = {}

    async def create(self, body: EmbeddingRequest) -> dict[str, Any]:
        handle, info = await self._choose(body.model)
        if body.dimensions is not None and body.dimensions != info["dimension"]:
            raise InvalidRequestError(f"{info['model']} gives {info['dimension']} dimensions, not {body.dimensions}")
        texts = body.texts
        vectors, tokens = await asyncio.gather(asyncio.gather(*(handle.embed.remote(t, False) for t in texts)),
                                               handle.count_tokens.remote(texts))
        return embedding_response(vectors, body.model, tokens, body.encoding_format)

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
            if model in await (await self._handles.get(version)).knowledge_bases.remote():
                return await self._embedder(version)
        raise KnowledgeBaseNotFoundError(f"unknown model {model[:64]!r}: name a knowledge base from GET /v1/models "
                                         "or the embedding model")

    async def _embedder(self, version: str) -> tuple[Any, dict[str, Any]]:
        handle = await self._handles.embedder(version)
        if version not in self._described:
            self._described[version] = await handle.describe.remote()
        return handle, self._described[version]
