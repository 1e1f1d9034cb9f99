"""FAISS + SQLite version directories: publish, load, search, versioning, crash safety, concurrency."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from rag.errors import (
    IndexMismatchError,
    InvalidRequestError,
    KnowledgeBaseNotFoundError,
    ServiceUnavailableError,
)
from rag.index import Chunk, KnowledgeBaseIndex, publish_index
from rag.kb_versions import Manifest, list_knowledge_bases, list_versions, resolve_version
from tests.rag.index_samples import CHUNKS, MODEL, publish


@pytest.fixture
def published(tmp_path: Path, vectors: np.ndarray) -> Iterator[KnowledgeBaseIndex]:
    """The test chunks published as version 1 under `tmp_path` and loaded; closed afterwards."""
    publish(tmp_path, vectors)
    index = KnowledgeBaseIndex.load(tmp_path, "kb")
    yield index
    index.close()


def test_publish_load_search_round_trip(tmp_path: Path, embedder, vectors: np.ndarray) -> None:
    manifest = publish(tmp_path, vectors)
    assert (manifest.knowledge_base, manifest.version, manifest.count, manifest.dimension) == ("kb", 1, 4, 384)
    assert manifest.sources == sorted({c.source for c in CHUNKS})
    assert manifest.embedding_model == MODEL
    assert Manifest.read(tmp_path / "kb" / "v1") == manifest
    assert {p.name for p in (tmp_path / "kb" / "v1").iterdir()} == {"index.faiss", "docstore.sqlite",
                                                                    "manifest.json", "lexical.npz",
                                                                    "lexical_vocab.json"}

    index = KnowledgeBaseIndex.load(tmp_path, "kb", expected_model=MODEL)
    try:
        assert (index.name, index.version) == ("kb", 1)
        index.check_health()
        [hits] = index.search(embedder.embed(["How do I stop the service?"]), 2)
        assert len(hits) == 2
        assert hits[0].source == "operations.md"
        assert hits[0].text == CHUNKS[0].text
        assert hits[0].id == 0
        assert hits[0].metadata == CHUNKS[0].metadata
        assert hits[0].score >= hits[1].score
        assert hits[0].score == pytest.approx(float(vectors[0] @ embedder.embed(["How do I stop the service?"])[0]),
                                              abs=1e-4)
    finally:
        index.close()


def test_search_many_queries_and_1d_query(published: KnowledgeBaseIndex, embedder, vectors: np.ndarray) -> None:
    queries = embedder.embed(["Which version answers a request?", "水果", "文件如何切分"])
    results = published.search(queries, 1)
    assert len(results) == 3
    assert results[0][0].source == "upgrading.md"
    assert results[2][0].source == "faq_zh.md"
    # The exact stored vector finds itself with similarity ~1.
    [self_hit] = published.search(vectors[3], 1)
    assert self_hit[0].id == 3
    assert self_hit[0].score == pytest.approx(1.0, abs=1e-4)


def test_versions_increment_and_old_ones_stay_loadable(tmp_path: Path, embedder, vectors: np.ndarray) -> None:
    first = publish(tmp_path, vectors[:2], chunks=CHUNKS[:2], fingerprint="one")
    second = publish(tmp_path, vectors, fingerprint="two")
    assert (first.version, second.version) == (1, 2)
    assert list_versions(tmp_path, "kb") == [1, 2]
    assert resolve_version(tmp_path, "kb", "latest") == 2

    latest = KnowledgeBaseIndex.load(tmp_path, "kb", "latest")
    old = KnowledgeBaseIndex.load(tmp_path, "kb", 1)
    try:
        assert latest.version == 2
        assert latest.manifest.count == 4
        assert latest.directory == tmp_path / "kb" / "v2"
        assert old.version == 1
        assert old.manifest.count == 2
        assert old.manifest.fingerprint == "one"
        probe = embedder.embed(["fruit at the market"])
        assert {p.id for p in old.search(probe, 10)[0]} == {0, 1}  # v1 content unchanged by v2
        assert latest.search(probe, 1)[0][0].source == "fruit.txt"
    finally:
        latest.close()
        old.close()


def test_crash_leftovers_are_ignored_and_do_not_block_publishing(tmp_path: Path, vectors: np.ndarray) -> None:
    publish(tmp_path, vectors)
    publish(tmp_path, vectors)
    base = tmp_path / "kb"
    staging = base / ".staging-deadbeef"  # a build that crashed before its rename
    staging.mkdir()
    (staging / "index.faiss").write_bytes(b"partial")
    half = base / "v3"  # a version directory whose manifest was never written
    half.mkdir()
    (half / "index.faiss").write_bytes(b"partial")

    assert list_versions(tmp_path, "kb") == [1, 2]
    assert resolve_version(tmp_path, "kb", "latest") == 2
    index = KnowledgeBaseIndex.load(tmp_path, "kb", "latest")
    assert index.version == 2
    index.close()
    with pytest.raises(KnowledgeBaseNotFoundError, match=r"available: \[1, 2\]"):
        resolve_version(tmp_path, "kb", 3)

    manifest = publish(tmp_path, vectors)
    assert manifest.version > 3
    assert list_versions(tmp_path, "kb") == [1, 2, manifest.version]
    assert KnowledgeBaseIndex.load(tmp_path, "kb").version == manifest.version
    assert (half / "index.faiss").read_bytes() == b"partial"  # the leftover was not overwritten


def test_unrelated_entries_in_kb_dir_are_ignored(tmp_path: Path, vectors: np.ndarray) -> None:
    publish(tmp_path, vectors)
    base = tmp_path / "kb"
    (base / "notes.txt").write_text("x")
    (base / "vx").mkdir()
    (base / "v02x").mkdir()
    assert list_versions(tmp_path, "kb") == [1]
    assert publish(tmp_path, vectors).version == 2


def test_list_knowledge_bases(tmp_path: Path, vectors: np.ndarray) -> None:
    assert list_knowledge_bases(tmp_path / "missing") == []
    publish(tmp_path, vectors, name="beta")
    publish(tmp_path, vectors, name="alpha")
    (tmp_path / "empty").mkdir()
    assert list_knowledge_bases(tmp_path) == ["alpha", "beta"]
    assert list_versions(tmp_path, "nothing-here") == []


def test_unknown_knowledge_base(tmp_path: Path, vectors: np.ndarray) -> None:
    publish(tmp_path, vectors)
    with pytest.raises(KnowledgeBaseNotFoundError, match="'nope'") as info:
        KnowledgeBaseIndex.load(tmp_path, "nope")
    assert "ingest" in str(info.value)


def test_unknown_version_lists_available_ones(tmp_path: Path, vectors: np.ndarray) -> None:
    publish(tmp_path, vectors)
    publish(tmp_path, vectors)
    with pytest.raises(KnowledgeBaseNotFoundError) as info:
        KnowledgeBaseIndex.load(tmp_path, "kb", 7)
    assert "7" in str(info.value)
    assert "available: [1, 2]" in str(info.value)


def test_other_embedding_model_is_a_mismatch(tmp_path: Path, vectors: np.ndarray) -> None:
    publish(tmp_path, vectors, model="a")
    with pytest.raises(IndexMismatchError) as info:
        KnowledgeBaseIndex.load(tmp_path, "kb", expected_model="b")
    assert "'a'" in str(info.value)
    assert "'b'" in str(info.value)
    index = KnowledgeBaseIndex.load(tmp_path, "kb", expected_model="a")
    assert index.manifest.embedding_model == "a"
    index.close()


@pytest.mark.parametrize("shape", [(1, 10), (10,), (2, 383), (1, 385)])
def test_query_of_wrong_dimension(published: KnowledgeBaseIndex, shape: tuple[int, ...]) -> None:
    with pytest.raises(IndexMismatchError, match="384"):
        published.search(np.ones(shape, dtype=np.float32), 1)


def test_score_threshold_filters(published: KnowledgeBaseIndex, embedder) -> None:
    query = embedder.embed(["How do I stop the service?"])
    everything = published.search(query, 10, -1.0)[0]
    assert len(everything) == 4
    scores = [p.score for p in everything]
    assert scores == sorted(scores, reverse=True)
    cut = (scores[0] + scores[1]) / 2
    kept = published.search(query, 10, cut)[0]
    assert [p.id for p in kept] == [everything[0].id]
    assert all(p.score >= cut for p in kept)
    assert published.search(query, 10, 0.999)[0] == []


def test_top_k_larger_than_count(published: KnowledgeBaseIndex, embedder) -> None:
    hits = published.search(embedder.embed(["anything at all"]), 50)[0]
    assert sorted(p.id for p in hits) == [0, 1, 2, 3]
    with pytest.raises(InvalidRequestError):
        published.search(embedder.embed(["anything at all"]), 0)


def test_metadata_round_trips_through_json(tmp_path: Path, vectors: np.ndarray) -> None:
    metadata = {"title": "升级指南 «ß»", "page": 3, "ratio": 0.5, "ok": True, "none": None,
                "tags": ["a", "é", "中文"], "nested": {"row": 7, "emoji": "🙂"}}
    chunks = [Chunk("第一段：如何升级服务。", "指南/升级.md", metadata), *CHUNKS[1:]]
    publish(tmp_path, vectors, chunks=chunks)
    index = KnowledgeBaseIndex.load(tmp_path, "kb")
    try:
        [hit] = index.search(vectors[0], 1)[0]
        assert hit.metadata == metadata
        assert hit.source == "指南/升级.md"
        assert hit.text == "第一段：如何升级服务。"
    finally:
        index.close()
    raw = sqlite3.connect(tmp_path / "kb" / "v1" / "docstore.sqlite").execute(
        "SELECT metadata FROM chunks WHERE id = 0").fetchone()[0]
    assert "升级指南" in raw  # stored as readable JSON, not escaped or pickled
    assert json.loads(raw) == metadata
    assert Manifest.read(tmp_path / "kb" / "v1").sources[0] == "faq_zh.md"
    assert "指南/升级.md" in json.loads((tmp_path / "kb" / "v1" / "manifest.json").read_text("utf-8"))["sources"]


def test_docstore_is_sqlite_and_nothing_is_pickled(tmp_path: Path, vectors: np.ndarray) -> None:
    publish(tmp_path, vectors)
    directory = tmp_path / "kb" / "v1"
    with sqlite3.connect(directory / "docstore.sqlite") as db:
        rows = db.execute("SELECT id, text, source, metadata FROM chunks ORDER BY id").fetchall()
    assert [(r[1], r[2]) for r in rows] == [(c.text, c.source) for c in CHUNKS]
    assert [json.loads(r[3]) for r in rows] == [c.metadata for c in CHUNKS]
    assert (directory / "docstore.sqlite").read_bytes().startswith(b"SQLite format 3\x00")
    files = [p for p in directory.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert not path.read_bytes().startswith(b"\x80"), f"{path.name} looks like a pickle"
    json.loads((directory / "manifest.json").read_text("utf-8"))


def test_close_is_idempotent_and_search_after_close_is_unavailable(tmp_path: Path, vectors: np.ndarray) -> None:
    publish(tmp_path, vectors)
    index = KnowledgeBaseIndex.load(tmp_path, "kb")
    index.close()
    index.close()
    with pytest.raises(ServiceUnavailableError):
        index.search(vectors[0], 1)
    with pytest.raises(ServiceUnavailableError):
        index.check_health()


def test_an_empty_index_needs_its_dimension_and_finds_nothing(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="shape"):
        publish_index(tmp_path, "kb", [], np.zeros((0, 0), dtype=np.float32), embedding_model=MODEL,
                      fingerprint="fp")
    assert list_versions(tmp_path, "kb") == []
    manifest = publish_index(tmp_path, "kb", [], np.zeros((0, 384), dtype=np.float32), embedding_model=MODEL,
                             fingerprint="fp")  # a KB whose last file was deleted
    assert (manifest.count, manifest.dimension) == (0, 384)
    index = KnowledgeBaseIndex.load(tmp_path, "kb")
    assert index.search(np.ones((2, 384), dtype=np.float32) / np.sqrt(384), 5) == [[], []]


def test_vectors_not_matching_chunks_publish_nothing(tmp_path: Path, vectors: np.ndarray) -> None:
    with pytest.raises(InvalidRequestError, match="4 chunks"):
        publish(tmp_path, vectors[:3])
    assert list_versions(tmp_path, "kb") == []
    assert not (tmp_path / "kb").exists() or not any((tmp_path / "kb").iterdir())


def test_concurrent_publishes_get_distinct_versions(tmp_path: Path, vectors: np.ndarray) -> None:
    results: list[Manifest] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)
    lock = threading.Lock()

    def writer(n: int) -> None:
        try:
            barrier.wait(timeout=10)
            manifest = publish(tmp_path, vectors, fingerprint=f"writer-{n}")
            with lock:
                results.append(manifest)
        except BaseException as exc:  # collected and re-raised by the test
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert sorted(m.version for m in results) == [1, 2, 3, 4]
    assert list_versions(tmp_path, "kb") == [1, 2, 3, 4]
    # Each directory holds the manifest of the writer that published it, and no staging dir remains.
    by_version = {m.version: m.fingerprint for m in results}
    for version, fingerprint in by_version.items():
        assert Manifest.read(tmp_path / "kb" / f"v{version}").fingerprint == fingerprint
    assert sorted(p.name for p in (tmp_path / "kb").iterdir() if p.name != ".publish.lock") == ["v1", "v2", "v3", "v4"]


def test_every_file_of_a_version_reaches_the_disk_before_its_rename(tmp_path: Path, vectors: np.ndarray,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import rag.index
    from rag.lexical import DATA_FILE, VOCAB_FILE

    synced: list[str] = []
    real_fsync, real_rename = rag.index._fsync, os.rename

    def fsync(path: Path) -> None:
        synced.append(Path(path).name)
        real_fsync(path)

    def rename(source: Path, target: Path) -> None:
        synced.append(f"renamed {Path(target).name}")
        real_rename(source, target)

    monkeypatch.setattr(rag.index, "_fsync", fsync)
    monkeypatch.setattr(rag.index.os, "rename", rename)
    publish(tmp_path, vectors)
    renamed = synced.index("renamed v1")
    assert {"index.faiss", "docstore.sqlite", DATA_FILE, VOCAB_FILE, "manifest.json"} <= set(synced[:renamed])
