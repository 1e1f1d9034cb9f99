"""Knowledge-base names the index refuses, and staging folders left by publishers that died."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from rag.errors import InvalidRequestError
from rag.index import Chunk, KnowledgeBaseIndex, clean_staging
from rag.kb_versions import Manifest, list_knowledge_bases, list_versions, resolve_version
from tests.rag.index_samples import publish

# --- knowledge base names ---------------------------------------------------------------------------

UNSAFE_NAMES = ["../escaped", "..", "/abs", "a/b", "", ".staging-x", "x" * 64]


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_unsafe_kb_names_are_refused_and_nothing_is_written(tmp_path: Path, vectors: np.ndarray,
                                                            name: str) -> None:
    kb_root = tmp_path / "root" / "kb"
    kb_root.mkdir(parents=True)
    absolute = tmp_path / "abs"  # where "/abs"-like names would land if joined unchecked
    with pytest.raises(InvalidRequestError, match="invalid knowledge base name"):
        publish(kb_root, vectors, name=name if name != "/abs" else str(absolute))
    for call in (lambda: KnowledgeBaseIndex.load(kb_root, name), lambda: resolve_version(kb_root, name, "latest"),
                 lambda: list_versions(kb_root, name), lambda: clean_staging(kb_root, name)):
        with pytest.raises(InvalidRequestError, match="invalid knowledge base name"):
            call()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["root", "root/kb"]


def test_list_knowledge_bases_skips_folders_that_are_not_kb_names(tmp_path: Path, vectors: np.ndarray) -> None:
    publish(tmp_path, vectors, name="good")
    (tmp_path / ".hidden" / "v1").mkdir(parents=True)
    (tmp_path / ".hidden" / "v1" / "manifest.json").write_text("{}")
    assert list_knowledge_bases(tmp_path) == ["good"]


# --- staging leftovers --------------------------------------------------------------------------------

def _leftover(base: Path, name: str) -> Path:
    staging = base / name
    staging.mkdir(parents=True)
    (staging / "index.faiss").write_bytes(b"partial")
    return staging


def test_publish_removes_staging_left_by_dead_publishers(tmp_path: Path, vectors: np.ndarray) -> None:
    publish(tmp_path, vectors)
    stale = [_leftover(tmp_path / "kb", f".staging-{n}") for n in ("dead1", "dead2")]
    unrelated = _leftover(tmp_path / "kb", "notes")
    manifest = publish(tmp_path, vectors)
    assert manifest.version == 2
    assert not any(p.exists() for p in stale)
    assert unrelated.exists()  # only staging folders are ever removed


def test_clean_staging_reports_what_it_removed(tmp_path: Path) -> None:
    assert clean_staging(tmp_path, "kb") == []  # no KB folder yet: nothing to do, nothing created
    assert not (tmp_path / "kb").exists()
    stale = _leftover(tmp_path / "kb", ".staging-dead")
    assert clean_staging(tmp_path, "kb") == [stale]
    assert not stale.exists()


def test_clean_staging_leaves_a_live_publish_alone(tmp_path: Path, vectors: np.ndarray,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import rag.index

    stale = _leftover(tmp_path / "kb", ".staging-dead")
    writing, release = threading.Event(), threading.Event()
    write_docstore = rag.index._write_docstore

    def slow_write(directory: Path, chunks: list[Chunk]) -> None:
        write_docstore(directory, chunks)
        writing.set()
        release.wait(timeout=30)

    monkeypatch.setattr(rag.index, "_write_docstore", slow_write)
    results: list[Manifest] = []
    thread = threading.Thread(target=lambda: results.append(publish(tmp_path, vectors)))
    thread.start()
    try:
        assert writing.wait(timeout=30)
        [live] = [p for p in (tmp_path / "kb").iterdir() if p.name.startswith(".staging-")]
        assert clean_staging(tmp_path, "kb") == []  # a publisher is alive: nothing is touched
        assert live.exists()
        assert (live / "docstore.sqlite").exists()
    finally:
        release.set()
        thread.join(timeout=30)
    assert [m.version for m in results] == [1]
    assert not stale.exists()  # removed by the publish itself, before it started writing
    assert KnowledgeBaseIndex.load(tmp_path, "kb").version == 1
    assert clean_staging(tmp_path, "kb") == []
    assert not [p for p in os.listdir(tmp_path / "kb") if p.startswith(".staging-")]
