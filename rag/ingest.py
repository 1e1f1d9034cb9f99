"""Build the next index version of a knowledge base from a folder of documents (the CLI's path).

The folder is the knowledge base's whole content: files new or changed since the latest version are
split and embedded, files gone from the folder are dropped, and unchanged files keep their vectors
(`rag.kb_build`, the same code path as the HTTP API).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rag import kb_store
from rag.config import PipelineConfig, check_kb_name
from rag.documents import DEFAULT_MAX_FILE_BYTES, iter_files
from rag.embedding import TextEmbedder
from rag.errors import InvalidRequestError
from rag.kb_build import Changes, Progress, update_knowledge_base
from rag.kb_versions import Manifest, list_versions, version_directory


@dataclass(frozen=True)
class IngestResult:
    manifest: Manifest
    created: bool  # False when the latest version already holds exactly this content
    stale_staging_removed: int = 0  # staging folders of killed ingests cleaned up at the start
    embedded: int = 0  # chunks embedded this time; the others kept the previous version's vectors
    reused: int = 0


def ingest_directory(source: Path, kb_root: Path, name: str, config: PipelineConfig, *,
                     embedder: TextEmbedder | None = None, force: bool = False,
                     progress: Progress | None = None, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> IngestResult:
    """Make the knowledge base hold exactly the supported files under `source`.

    Unchanged content publishes nothing unless `force` (which also embeds every chunk again), so
    re-running an ingest is cheap and does not pile up versions. Every refusal (bad name, unreadable
    or unsafe file) is a `RagError` raised before anything is published.
    """
    check_kb_name(name)  # before any work: a bad name should not cost a load and an embedding pass
    if embedder is not None and embedder.config.vector_space != config.embedding.vector_space:
        raise InvalidRequestError(f"the embedder given runs {embedder.config.vector_space!r} but the config says "
                                  f"{config.embedding.vector_space!r}; the index would be labelled with the wrong "
                                  "model")
    source = Path(source)
    files = {p.relative_to(source).as_posix(): p for p in iter_files(source)}
    if not files:
        raise InvalidRequestError(f"no supported documents under {source}")
    for relative in files:
        kb_store.check_file_name(relative, nested=True)
    gone = tuple(sorted(set(_current_files(kb_root, name)) - set(files)))
    with _Embedding(config, embedder) as embed:
        result = update_knowledge_base(kb_root, name, config, Changes(add=dict(files), delete=gone, full=force),
                                       embed=embed, progress=progress, max_file_bytes=max_file_bytes,
                                       batch_size=config.embedding.batch_size)
    return IngestResult(result.manifest, result.created, result.stale_staging_removed, result.embedded,
                        result.reused)


def _current_files(kb_root: Path, name: str) -> list[str]:
    versions = list_versions(kb_root, name)
    if not versions:
        return []
    manifest = Manifest.read(version_directory(kb_root, name, versions[-1]))
    return list(manifest.files) or list(manifest.sources)


class _Embedding:
    """The given embedder, or one loaded for this ingest only (and freed after)."""

    def __init__(self, config: PipelineConfig, embedder: TextEmbedder | None) -> None:
        self._own = embedder is None
        self._model = embedder or TextEmbedder(config.embedding)

    def __enter__(self) -> _Embedding:
        if self._own:
            self._model.load()
        return self

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self._model.embed_bulk(texts)

    def describe(self) -> dict[str, Any]:
        return self._model.describe()

    def __exit__(self, *_: object) -> None:
        if self._own:
            self._model.close()
