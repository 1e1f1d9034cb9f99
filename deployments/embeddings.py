"""`POST /v1/embeddings` behind the gateway: which version's Embedder answers, and the call itself.

Each text is its own request to the Embedder, so texts from concurrent clients share its batches
(`@serve.batch`), as questions do; documents get no query instruction.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from rag.api import EmbeddingRequest, embedding_response
from rag.errors import InvalidRequestError, KnowledgeBaseNotFoundError, ServiceUnavailableError


class Embeddings:
    def __init__(self) -> None:
        self._embedders: dict[str, Any] = {}
        self._described: dict[str, dict[str, Any]] = {}

    async def create(self, gateway: Any, body: EmbeddingRequest) -> dict[str, Any]:
        handle, info = await self._choose(gateway, body.model)
        if body.dimensions is not None and body.dimensions != info["dimension"]:
            raise InvalidRequestError(f"{info['model']} gives {info['dimension']} dimensions, not {body.dimensions}")
        texts = body.texts
        vectors, tokens = await asyncio.gather(asyncio.gather(*(handle.embed.remote(t, False) for t in texts)),
                                               handle.count_tokens.remote(texts))
        return embedding_response(vectors, body.model, tokens, body.encoding_format)

    async def _choose(self, gateway: Any, model: str) -> tuple[Any, dict[str, Any]]:
        """The heaviest serving version whose Embedder runs `model`, or whose Retriever serves KB `model`."""
        versions = gateway.serving_versions()
        if not versions:
            raise ServiceUnavailableError("no pipeline version is serving yet; retry shortly")
        for version in versions:
            handle, info = await self._embedder(version)
            if model == info["model"]:
                return handle, info
        for version in versions:
            if model in await (await gateway.service.handles.get(version)).knowledge_bases.remote():
                return await self._embedder(version)
        raise KnowledgeBaseNotFoundError(f"unknown model {model[:64]!r}: name a knowledge base from GET /v1/models "
                                         "or the embedding model")

    async def _embedder(self, version: str) -> tuple[Any, dict[str, Any]]:
        if version not in self._embedders:
            self._embedders[version] = await asyncio.to_thread(serve.get_deployment_handle, "Embedder", version)
            self._described[version] = await self._embedders[version].describe.remote()
        return self._embedders[version], self._described[version]
