"""Shared, expensive fixtures for the library tests: one loaded embedding model, one ingested sample KB.

Both are session-scoped and treated as read-only by every test: a test that needs to change a
knowledge base copies it into its own tmp dir first.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from rag.config import EmbeddingConfig, PipelineConfig
from rag.embedding import TextEmbedder
from rag.ingest import ingest_directory
from rag.kb_versions import Manifest, list_versions

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_KB_SOURCE = REPO_ROOT / "data" / "sample_kb"
SAMPLE_KB_NAME = "samples"


@pytest.fixture(scope="session")
def embedder() -> Iterator[TextEmbedder]:
    """The bundled MiniLM model (default `EmbeddingConfig`), loaded once. Never close it in a test."""
    model = TextEmbedder(EmbeddingConfig())
    model.load()
    yield model
    model.close()


@pytest.fixture(scope="session")
def sample_kb_root(embedder: TextEmbedder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A KB root where `data/sample_kb` is ingested once as knowledge base "samples" (v1). Read-only."""
    root = tmp_path_factory.mktemp("kb_root")
    ingest_directory(SAMPLE_KB_SOURCE, root, SAMPLE_KB_NAME, PipelineConfig(), embedder=embedder)
    return root


@pytest.fixture(scope="session")
def sample_manifest(sample_kb_root: Path) -> Manifest:
    """The manifest of the session's sample KB version."""
    versions = list_versions(sample_kb_root, SAMPLE_KB_NAME)
    assert versions == [1], versions
    return Manifest.read(sample_kb_root / SAMPLE_KB_NAME / "v1")


@pytest.fixture(scope="session")
def sample_kb_source() -> Path:
    """The repo's sample corpus folder (never written to)."""
    return SAMPLE_KB_SOURCE


@pytest.fixture(scope="module")
def vectors(embedder: TextEmbedder) -> np.ndarray:
    """The embeddings of the index tests' sample chunks, in their order."""
    from tests.rag.index_samples import CHUNKS

    return embedder.embed([c.text for c in CHUNKS])
