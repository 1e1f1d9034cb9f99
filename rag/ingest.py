"""Build a new index version of a knowledge base from a folder of documents."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rag.config import PipelineConfig, check_kb_name
from rag.documents import DEFAULT_MAX_FILE_BYTES, content_fingerprint, iter_files, load_file, split_documents
from rag.embedding import TextEmbedder
from rag.errors import InvalidRequestError
from rag.index import Chunk, Manifest, clean_staging, list_versions, publish_index, version_directory

# (stage, done, total): lets a CLI draw a progress bar without the library knowing about terminals.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class IngestResult:
    manifest: Manifest
    created: bool  # False when the latest version already holds exactly this content
    stale_staging_removed: int = 0  # staging folders of killed ingests cleaned up at the start


def ingest_directory(source: Path, kb_root: Path, name: str, config: PipelineConfig, *,
                     embedder: TextEmbedder | None = None, force: bool = False,
                     progress: Progress | None = None, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> IngestResult:
    """Load, split and embed every supported file under `source`, then publish a new version.

    Unchanged content (same files, splitter and embedding model as the latest version) publishes
    nothing unless `force`, so re-running an ingest is cheap and does not pile up versions. Every
    refusal (bad name, unreadable or unsafe file) is a `RagError` raised before anything is published.
    """
    check_kb_name(name)  # before any work: a bad name should not cost a load and an embedding pass
    if embedder is not None and embedder.model_name != config.embedding.model:
        raise InvalidRequestError(f"the embedder given runs {embedder.model_name!r} but the config says "
                                  f"{config.embedding.model!r}; the index would be labelled with the wrong model")
    # Cleaned here too, not only in publish_index, since an unchanged re-run never publishes.
    removed = len(clean_staging(kb_root, name))
    files = iter_files(source)
    if not files:
        raise InvalidRequestError(f"no supported documents under {source}")
    fingerprint = _fingerprint(files, source, config)
    latest = _latest_manifest(kb_root, name)
    if latest is not None and latest.fingerprint == fingerprint and not force:
        return IngestResult(latest, created=False, stale_staging_removed=removed)
    chunks = _chunks(files, source, config, progress, max_file_bytes)
    vectors = _embed([c.text for c in chunks], config, embedder, progress)
    manifest = publish_index(kb_root, name, chunks, vectors, embedding_model=config.embedding.model,
                             fingerprint=fingerprint, splitter=config.splitter.model_dump())
    return IngestResult(manifest, created=True, stale_staging_removed=removed)


def _fingerprint(files: list[Path], source: Path, config: PipelineConfig) -> str:
    settings = json.dumps([config.splitter.model_dump(), config.embedding.model], sort_keys=True)
    return hashlib.sha256((content_fingerprint(files, source) + settings).encode()).hexdigest()


def _latest_manifest(kb_root: Path, name: str) -> Manifest | None:
    versions = list_versions(kb_root, name)
    return Manifest.read(version_directory(kb_root, name, versions[-1])) if versions else None


def _chunks(files: list[Path], source: Path, config: PipelineConfig, progress: Progress | None,
            max_file_bytes: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    for done, path in enumerate(files, 1):
        for doc in split_documents(load_file(path, source, max_bytes=max_file_bytes), config.splitter):
            meta = {k: v for k, v in doc.metadata.items() if k != "source"}
            chunks.append(Chunk(doc.page_content, str(doc.metadata["source"]), meta))
        if progress:
            progress("load", done, len(files))
    if not chunks:
        raise InvalidRequestError(f"the documents under {source} contain no text")
    return chunks


def _embed(texts: list[str], config: PipelineConfig, embedder: TextEmbedder | None,
           progress: Progress | None) -> np.ndarray:
    own = embedder is None
    model = embedder or TextEmbedder(config.embedding)
    if own:
        model.load()
    try:
        step = config.embedding.batch_size
        parts = []
        for start in range(0, len(texts), step):
            parts.append(model.embed(texts[start:start + step]))
            if progress:
                progress("embed", min(start + step, len(texts)), len(texts))
        return np.concatenate(parts)
    finally:
        if own:
            model.close()
