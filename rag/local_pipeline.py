"""The three stages in this process behind one `RagPipeline`, with no Ray Serve handle between them:
for tests, scripts and benchmarks (the plain FastAPI baseline of `make bench` among them)."""

from __future__ import annotations

import asyncio

import numpy as np

from rag.config import PipelineConfig
from rag.embedding import TextEmbedder
from rag.generation import Generator, build_generator
from rag.pipeline import RagPipeline
from rag.records import Passage
from rag.retrieval import Retriever


class LocalPipeline:
    """All three stages in this process: load, warm up, answer, close."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.embedder = TextEmbedder(config.embedding)
        self.retriever = Retriever(config.retrieval, config.embedding.vector_space,
                                   model_languages=config.embedding.languages)
        self.generator: Generator = build_generator(config.generation)
        self.pipeline = RagPipeline(config, self._embed, self._search, self.generator.stream)

    def load(self) -> None:
        self.embedder.load()
        self.retriever.load()
        self.generator.load()

    async def warmup(self) -> None:
        self.embedder.warmup()
        self.retriever.warmup()
        await self.generator.warmup()

    def close(self) -> None:
        self.generator.close()
        self.retriever.close()
        self.embedder.close()

    async def _embed(self, text: str) -> np.ndarray:
        vectors = await asyncio.to_thread(self.embedder.embed_queries, [text])
        return vectors[0]

    async def _search(self, knowledge_base: str, vector: np.ndarray, top_k: int | None,
                      score_threshold: float | None, text: str | None = None) -> list[Passage]:
        return self.retriever.search(knowledge_base, vector, top_k, score_threshold, text)
