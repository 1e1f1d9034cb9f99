"""The Serve floor: the project's request path with no work in it, for `scripts.bench_pipeline`.

HTTP proxy → FloorGateway (FastAPI ingress, the API key checked) → FloorPipeline → FloorEmbedder,
FloorRetriever, FloorGenerator over DeploymentHandles: the project's hops, with the resources and
queue sizes serve_config.yaml gives the project's deployments of the same names. The stages return
data of the project's shape (a 384-dimension vector, `top_k` passages of 750 characters, one streamed
piece) without computing anything, so what the floor costs is Serve's own: the proxy, the hops, the
messages. Whatever the project takes beyond it is the project's work and the project's overhead.

It answers the two routes the benchmark calls, in the shapes the project's client reads
(`rag.client.stream_chat` for chat), under its own route prefix.

No `from __future__ import annotations`: FastAPI reads the route annotations at run time.
"""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from rag.api import SSE_DONE, sse
from rag.auth import ApiKeys

DIMENSION = 384  # the bundled embedding model's
PASSAGE_CHARS = 750  # serve_config.yaml's chunk_size
# The deployment options copied from the project's deployment of the same role.
MIRRORED = ("num_replicas", "autoscaling_config", "max_ongoing_requests", "max_queued_requests", "ray_actor_options")
Passage = dict[str, Any]

app = FastAPI(title="rag-serve floor")


@serve.deployment(name="FloorEmbedder")
class FloorEmbedder:
    async def embed(self, text: str) -> np.ndarray:
        return np.zeros(DIMENSION, dtype=np.float32)


@serve.deployment(name="FloorRetriever")
class FloorRetriever:
    # A plain method, as the project's Retriever.search is.
    def search(self, knowledge_base: str, vector: np.ndarray, top_k: int) -> list[Passage]:
        return [{"id": str(i), "page_content": "x" * PASSAGE_CHARS, "score": 0.5,
                 "metadata": {"source": f"{knowledge_base}.md"}} for i in range(top_k)]


@serve.deployment(name="FloorGenerator")
class FloorGenerator:
    async def generate(self, question: str, passages: list[Passage]) -> AsyncIterator[list[str]]:
        yield ["floor"]  # one batch of one piece


@serve.deployment(name="FloorPipeline")
class FloorPipeline:
    """Embed, then search, then stream: the project's order of hops."""

    def __init__(self, embedder: DeploymentHandle, retriever: DeploymentHandle, generator: DeploymentHandle) -> None:
        self._embedder, self._retriever = embedder, retriever
        self._generator = generator.options(stream=True)

    async def search(self, question: str, knowledge_base: str, top_k: int) -> list[Passage]:
        vector = await self._embedder.embed.remote(question)
        return await self._retriever.search.remote(knowledge_base, vector, top_k)

    async def answer(self, question: str, knowledge_base: str) -> AsyncIterator[list[Any]]:
        """The sources alone once the first piece exists (as the project does), then the pieces."""
        passages = await self.search(question, knowledge_base, 3)
        pieces = aiter(self._generator.generate.remote(question, passages))
        first = await anext(pieces)
        yield [passages]
        yield first
        async for batch in pieces:
            yield batch


@serve.deployment(name="FloorGateway")
@serve.ingress(app)
class FloorGateway:
    def __init__(self, api_key_file: str, pipeline: DeploymentHandle) -> None:
        self._keys = ApiKeys(Path(api_key_file))  # the project's key check, so both pay for it
        self._pipeline = pipeline

    @app.post("/knowledge_base/search_docs")
    async def search_docs(self, request: Request) -> Response:
        if not self._keys.accepts(request.headers.get("authorization")):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        body = await request.json()
        docs = await self._pipeline.search.remote(body["query"], body["knowledge_base_name"], body.get("top_k", 3))
        return JSONResponse(docs)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        if not self._keys.accepts(request.headers.get("authorization")):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        body = await request.json()
        events = self._pipeline.answer.options(stream=True).remote(body["messages"][-1]["content"], body["model"])
        sources = await anext(events)  # the status waits for the sources, as the project's does
        return StreamingResponse(self._sse(sources[0], events), media_type="text/event-stream")

    # A method, not a module function: Serve ships this class to its replica by value, and module
    # functions it calls are not found there.
    async def _sse(self, sources: list[Passage], batches: AsyncIterator[list[str]]) -> AsyncIterator[str]:
        yield sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "sources": sources})
        async for batch in batches:
            yield "".join(sse({"choices": [{"index": 0, "delta": {"content": piece}}]}) for piece in batch)
        yield sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        yield SSE_DONE


def build_floor_app(api_key_file: str, options: dict[str, dict[str, Any]]) -> Application:
    """The floor, each deployment with the `MIRRORED` options of the project's deployment of the same
    role (`options` by project name: Gateway, Pipeline, Embedder, Retriever, Generator)."""
    def mirrored(name: str) -> dict[str, Any]:
        return {k: v for k, v in options.get(name, {}).items() if k in MIRRORED}
    pipeline = FloorPipeline.options(**mirrored("Pipeline")).bind(
        FloorEmbedder.options(**mirrored("Embedder")).bind(), FloorRetriever.options(**mirrored("Retriever")).bind(),
        FloorGenerator.options(**mirrored("Generator")).bind())
    return FloorGateway.options(**mirrored("Gateway")).bind(api_key_file, pipeline)
