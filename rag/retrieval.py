"""The knowledge bases one pipeline version serves, each pinned to an index version."""

from __future__ import annotations

import numpy as np

from rag.config import RetrievalConfig
from rag.devices import pick_device
from rag.errors import KnowledgeBaseNotFoundError, ServiceUnavailableError
from rag.index import KnowledgeBaseIndex
from rag.records import Passage


class Retriever:
    """Loads the configured index versions and answers vector searches against them."""

    def __init__(self, config: RetrievalConfig, embedding_model: str) -> None:
        self.config = config
        self.embedding_model = embedding_model
        self.device = pick_device(config.device)
        self._indexes: dict[str, KnowledgeBaseIndex] = {}

    def load(self) -> None:
        root = self.config.kb_root_path
        self._indexes = {
            name: KnowledgeBaseIndex.load(root, name, version, device=self.device,
                                          expected_model=self.embedding_model)
            for name, version in self.config.knowledge_bases.items()}

    def knowledge_bases(self) -> dict[str, int]:
        """Served knowledge-base names and the index version each one is pinned to."""
        return {name: index.version for name, index in self._indexes.items()}

    def search(self, knowledge_base: str, vector: np.ndarray, top_k: int | None = None,
               score_threshold: float | None = None) -> list[Passage]:
        index = self._index(knowledge_base)
        k = top_k if top_k is not None else self.config.top_k
        threshold = score_threshold if score_threshold is not None else self.config.score_threshold
        return index.search(vector, k, threshold)[0]

    def warmup(self) -> None:
        """A real search on every loaded index, so FAISS and SQLite pages are touched before traffic."""
        for name, index in self._indexes.items():
            probe = np.full((1, index.manifest.dimension), index.manifest.dimension ** -0.5, dtype=np.float32)
            if not index.search(probe, 1)[0]:
                raise ServiceUnavailableError(f"warm-up search on knowledge base {name!r} found nothing")

    def check_health(self) -> None:
        if not self._indexes:
            raise ServiceUnavailableError("no knowledge base index is loaded")
        for index in self._indexes.values():
            index.check_health()

    def close(self) -> None:
        for index in self._indexes.values():
            index.close()
        self._indexes = {}

    def _index(self, name: str) -> KnowledgeBaseIndex:
        try:
            return self._indexes[name]
        except KeyError:
            # Which knowledge bases exist is for callers with a key to ask (/v1/models), not for an error to tell.
            raise KnowledgeBaseNotFoundError(
                f"unknown knowledge base {name[:64]!r}; GET /v1/models lists the ones you may use") from None
