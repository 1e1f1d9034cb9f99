"""FAISS index plus SQLite docstore, stored as immutable, atomically published version directories.

Layout: `<kb_root>/<kb>/v<N>/{index.faiss, docstore.sqlite, manifest.json}` (`rag.kb_versions`: the folders,
the manifest, which versions exist). A version is built in a hidden staging directory and renamed into
place, and `manifest.json` is written last, so a crash mid-build never leaves a half-written version
that `latest` would pick. Nothing is pickled: FAISS writes its own format and the docstore is SQLite
with JSON metadata.

Every path here is built from a KB name through `kb_directory`, which refuses names that are not a
single safe path component (`rag.config.check_kb_name`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from rag.errors import (
    IndexMismatchError,
    InvalidRequestError,
    ServiceUnavailableError,
)
from rag.kb_versions import VERSION_DIR, Manifest, kb_directory, resolve_version, version_directory
from rag.language import cjk_share, language_of
from rag.lexical import LexicalIndex, fuse
from rag.records import Passage

_STAGING_PREFIX = ".staging-"
_PUBLISH_LOCK = ".publish.lock"


@dataclass(frozen=True)
class Chunk:
    """A piece of a document as stored in the docstore."""

    text: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)


# Writes more files into a version's staging folder before it is published (the lexical index).
ExtraWriter = Callable[[Path, list[Chunk]], None]


def publish_index(kb_root: Path, name: str, chunks: list[Chunk], vectors: np.ndarray, *,
                  embedding_model: str, fingerprint: str, splitter: dict[str, Any] | None = None,
                  files: dict[str, dict[str, Any]] | None = None, extra: ExtraWriter | None = None,
                  embedding_runtime: dict[str, Any] | None = None) -> Manifest:
    """Write a new immutable version of `name` and publish it atomically; returns its manifest.

    Staging leftovers of killed publishes are removed first (see `clean_staging`).
    """
    base = kb_directory(kb_root, name)
    vectors = _check_vectors(chunks, vectors)
    base.mkdir(parents=True, exist_ok=True)
    clean_staging(kb_root, name)
    with _publishing(base):
        staging = base / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            _write_faiss(staging, vectors)
            _write_docstore(staging, chunks)
            # Built once per version, here, so a query never rebuilds it (Chatchat's BM25 does, per query).
            LexicalIndex.build([c.text for c in chunks]).save(staging)
            if extra is not None:
                extra(staging, chunks)
            # Every file of the version is on disk before the rename publishes it: after a power loss the
            # newest version must load (FAISS, docstore, BM25 and whatever `extra` wrote alike).
            for path in sorted(staging.rglob("*")):
                if path.is_file():
                    _fsync(path)
            share = cjk_share(c.text for c in chunks)
            profile = {"cjk_share": round(share, 4), "main": language_of(share)}
            return _rename_into_place(base, staging, name, vectors.shape[1], len(chunks), embedding_model,
                                      fingerprint, splitter or {}, sorted({c.source for c in chunks}),
                                      files=files or {}, language=profile,
                                      embedding_runtime=embedding_runtime or {})
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def clean_staging(kb_root: Path, name: str) -> list[Path]:
    """Remove the staging folders of publishes that died (SIGKILL, power loss); returns those removed.

    A live publisher holds a shared flock on the KB's lock file from before it creates its staging
    folder until after its rename; this takes the lock exclusively without waiting, so it succeeds
    only when no publisher of this KB is alive, and then every staging folder is stale. The kernel
    drops a dead process's flock, so no pid or age guess is needed (an age cut-off would delete a
    slow live build, a pid check is fooled by pid reuse and other hosts). When a publisher is live,
    nothing is removed now; the next run cleans up.
    """
    base = kb_directory(kb_root, name)
    if not base.is_dir():
        return []
    with open(base / _PUBLISH_LOCK, "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []
        stale = [p for p in base.iterdir() if p.name.startswith(_STAGING_PREFIX) and p.is_dir()]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return [p for p in stale if not p.exists()]


@contextmanager
def _publishing(base: Path) -> Iterator[None]:
    # Shared, so concurrent publishers of one KB do not wait for each other (see clean_staging).
    with open(base / _PUBLISH_LOCK, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield


def _check_vectors(chunks: list[Chunk], vectors: np.ndarray) -> np.ndarray:
    """An empty index is allowed (a KB whose last file was deleted searches to nothing), but it still
    needs its dimension: vectors of shape (0, dimension)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(chunks) or vectors.shape[1] < 1:
        raise InvalidRequestError(f"{len(chunks)} chunks but vectors of shape {vectors.shape}")
    return vectors


def _write_faiss(directory: Path, vectors: np.ndarray) -> None:
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    faiss.write_index(index, str(directory / "index.faiss"))


def _write_docstore(directory: Path, chunks: list[Chunk]) -> None:
    path = directory / "docstore.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE chunks (id INTEGER PRIMARY KEY, text TEXT NOT NULL, source TEXT NOT NULL, "
                   "metadata TEXT NOT NULL)")
        db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?)",
                       [(i, c.text, c.source, json.dumps(c.metadata, ensure_ascii=False, default=str))
                        for i, c in enumerate(chunks)])
    db.close()


def _rename_into_place(base: Path, staging: Path, name: str, dimension: int, count: int, model: str,
                       fingerprint: str, splitter: dict[str, Any], sources: list[str], **recorded: Any) -> Manifest:
    # Another ingest may publish concurrently: a rename onto an existing version fails, so take the next.
    for _ in range(100):
        version = _next_version_number(base)
        manifest = Manifest(name, version, model, dimension, count, fingerprint, time.time(), splitter, sources,
                            **recorded)
        (staging / "manifest.json").write_text(json.dumps(asdict(manifest), indent=2, ensure_ascii=False),
                                               encoding="utf-8")
        _fsync(staging / "manifest.json")
        try:
            os.rename(staging, base / f"v{version}")
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            continue
        _fsync_dir(base)
        return manifest
    raise ServiceUnavailableError(f"could not publish a new version of {name!r}: too many concurrent writers")


def read_version(kb_root: Path, name: str, version: int) -> tuple[Manifest, list[Chunk], np.ndarray]:
    """A published version's chunks and vectors, in id order: what an incremental build starts from."""
    directory = version_directory(kb_root, name, version)
    manifest = Manifest.read(directory)
    index = faiss.read_index(str(directory / "index.faiss"))
    vectors = index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, manifest.dimension), "float32")
    db = sqlite3.connect(f"file:{directory / 'docstore.sqlite'}?mode=ro&immutable=1", uri=True)
    try:
        rows = db.execute("SELECT text, source, metadata FROM chunks ORDER BY id").fetchall()
    finally:
        db.close()
    return manifest, [Chunk(text, source, json.loads(meta)) for text, source, meta in rows], vectors


def list_chunks(kb_root: Path, name: str, version: int, source_like: str, limit: int) -> list[tuple[int, Chunk]]:
    """A version's chunks (with their ids) whose source matches the SQL LIKE pattern `source_like` (`%`,
    `_`, as Chatchat's file_name filter), in id order, at most `limit`."""
    directory = version_directory(kb_root, name, version)
    db = sqlite3.connect(f"file:{directory / 'docstore.sqlite'}?mode=ro&immutable=1", uri=True)
    try:
        rows = db.execute("SELECT id, text, source, metadata FROM chunks WHERE source LIKE ? ORDER BY id LIMIT ?",
                          (source_like or "%", limit)).fetchall()
    finally:
        db.close()
    return [(i, Chunk(text, source, json.loads(meta))) for i, text, source, meta in rows]


def _next_version_number(base: Path) -> int:
    # Counts directories without a manifest too: a leftover of a crash must never block publishing.
    numbers = [int(m.group(1)) for p in base.iterdir() if (m := VERSION_DIR.match(p.name))]
    return max(numbers, default=0) + 1


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync(path)


def faiss_gpus() -> int:
    """GPUs this faiss build can search on: 0 for the CPU wheel (it has no GPU resources at all)."""
    return int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0


def index_device(requested: Literal["auto", "cpu", "cuda"]) -> str:
    """Where indexes are searched: `auto` asks faiss itself, not torch (importing torch only to learn that
    this faiss cannot use a GPU costs a CPU-only Retriever about 2 s of CPU and 200 MB at every start)."""
    if requested == "auto":
        return "cuda" if faiss_gpus() > 0 else "cpu"
    return requested


class KnowledgeBaseIndex:
    """One loaded, read-only version of a knowledge base: vector search plus chunk lookup."""

    def __init__(self, directory: Path, manifest: Manifest, index: Any, gpu_resources: Any = None,
                 lexical: LexicalIndex | None = None) -> None:
        self.directory = directory
        self.manifest = manifest
        self.lexical = lexical  # None for versions published before lexical indexes: dense only
        self._index = index
        self._gpu_resources = gpu_resources
        self._db: sqlite3.Connection | None = sqlite3.connect(
            f"file:{directory / 'docstore.sqlite'}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, kb_root: Path, name: str, version: int | Literal["latest"] = "latest", *,
             device: str = "cpu", expected_model: str | None = None) -> KnowledgeBaseIndex:
        directory = version_directory(kb_root, name, resolve_version(kb_root, name, version))
        manifest = Manifest.read(directory)
        if expected_model is not None and manifest.embedding_model != expected_model:
            raise IndexMismatchError(
                f"{directory} was built with embedding model {manifest.embedding_model!r}, "
                f"but this pipeline embeds with {expected_model!r}; re-ingest or change embedding.model")
        index = faiss.read_index(str(directory / "index.faiss"))
        gpu_resources = None
        if device == "cuda" and faiss_gpus() > 0:
            gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(gpu_resources, 0, index)
        lexical = LexicalIndex.load(directory) if LexicalIndex.exists(directory) else None
        return cls(directory, manifest, index, gpu_resources, lexical)

    @property
    def name(self) -> str:
        return self.manifest.knowledge_base

    @property
    def version(self) -> int:
        return self.manifest.version

    def search(self, vectors: np.ndarray, top_k: int, score_threshold: float = -1.0) -> list[list[Passage]]:
        """The best `top_k` passages for each query vector, with similarity >= `score_threshold`."""
        queries = self._check_queries(vectors)
        if top_k < 1:
            raise InvalidRequestError(f"top_k must be >= 1, got {top_k}")
        if self.manifest.count == 0:  # a KB whose files were all deleted: nothing to find
            return [[] for _ in queries]
        scores, ids = self._require().search(queries, min(top_k, self.manifest.count))
        return [self._passages(row_ids, row_scores, score_threshold) for row_ids, row_scores in zip(ids, scores,
                                                                                                   strict=True)]

    def hybrid_search(self, vector: np.ndarray, text: str, top_k: int, score_threshold: float = -1.0, *,
                      candidates: int = 50, dense_weight: float = 0.75, lexical_led: bool = False) -> list[Passage]:
        """Dense and BM25 rankings of `candidates` each, fused (`rag.lexical.fuse`), best `top_k` kept in
        fused order. A passage's `score` stays its cosine similarity, and `score_threshold` applies to
        it as in dense search, so a threshold means one thing in both modes.

        `lexical_led`: for text the embedding model does not cover, BM25's order, then the dense
        ranking's after it; the cosine of such text is noise, so no threshold removes a BM25 hit."""
        if self.lexical is None or self.manifest.count == 0:
            return self.search(vector, top_k, score_threshold)[0]
        query = self._check_queries(vector)
        width = min(max(candidates, top_k), self.manifest.count)
        scores, ids = self._require().search(query, width)
        dense = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
        lexical = self.lexical.search(text, width)
        cosine = dict(dense) | {i: self._cosine(i, query[0]) for i, _ in lexical if i not in dict(dense)}
        if lexical_led:
            found = {i for i, _ in lexical}
            order = [i for i, _ in lexical] + [i for i, _ in dense if i not in found]
            kept = [i for i in order if i in found or cosine[i] >= score_threshold][:top_k]
        else:
            kept = [i for i, _ in fuse(dense, lexical, len(cosine), dense_weight=dense_weight)
                    if cosine[i] >= score_threshold][:top_k]
        rows = self._rows(kept)
        return [Passage(id=i, text=rows[i][0], source=rows[i][1], score=cosine[i], metadata=json.loads(rows[i][2]))
                for i in kept]

    def _cosine(self, chunk: int, query: np.ndarray) -> float:
        return float(np.dot(self._require().reconstruct(chunk), query))

    def _check_queries(self, vectors: np.ndarray) -> np.ndarray:
        queries = np.ascontiguousarray(np.atleast_2d(np.asarray(vectors, dtype=np.float32)))
        if queries.ndim != 2 or queries.shape[1] != self.manifest.dimension:
            raise IndexMismatchError(
                f"query vectors of shape {queries.shape} do not match index dimension {self.manifest.dimension}")
        return queries

    def _passages(self, ids: np.ndarray, scores: np.ndarray, threshold: float) -> list[Passage]:
        hits = [(int(i), float(s)) for i, s in zip(ids, scores, strict=True) if i >= 0 and s >= threshold]
        rows = self._rows([i for i, _ in hits])
        return [Passage(id=i, text=rows[i][0], source=rows[i][1], score=s, metadata=json.loads(rows[i][2]))
                for i, s in hits]

    def _rows(self, ids: list[int]) -> dict[int, tuple[str, str, str]]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._lock:
            db = self._db
            if db is None:
                raise ServiceUnavailableError(f"index {self.directory} is closed")
            cursor = db.execute(f"SELECT id, text, source, metadata FROM chunks WHERE id IN ({marks})", ids)
            return {row[0]: (row[1], row[2], row[3]) for row in cursor}

    def check_health(self) -> None:
        if self._require().ntotal != self.manifest.count or self._db is None:
            raise ServiceUnavailableError(f"index {self.directory} is not fully loaded")

    def close(self) -> None:
        """Drop the vectors, the docstore connection and any GPU resources; idempotent."""
        with self._lock:
            if self._db is not None:
                self._db.close()
            self._db = None
        self._index = None
        self._gpu_resources = None

    def _require(self) -> Any:
        if self._index is None:
            raise ServiceUnavailableError(f"index {self.directory} is closed")
        return self._index
