"""The CPU embedding runtimes (OpenVINO, ONNX Runtime) against PyTorch, the export cache, and the index's
vector space: which runtimes' vectors may share an index, and which make another one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from rag.config import EmbeddingConfig, PipelineConfig
from rag.constants import BUNDLED_EMBEDDING_MODEL
from rag.embedding import TextEmbedder, resolve_model_path, usable_cores
from rag.embedding_export import Export, ensure_export, export_directory, export_key
from rag.embedding_runtime import GraphEncoder
from rag.errors import IndexMismatchError
from rag.ingest import ingest_directory
from rag.kb_versions import Manifest

from .conftest import SAMPLE_KB_NAME

REPO_ROOT = Path(__file__).resolve().parents[2]
# Lengths from a few tokens to past the model's 256-token window, English and Chinese: the exported graph
# must match PyTorch at every padding and truncation, not only at the length it was traced with.
TEXTS = ["stop", "How do I upgrade the service without dropping requests?",
         "如何升级服务而不中断请求？", "FAISS keeps one vector per chunk. " * 12,
         "The gateway drains its streams before a replica stops; " * 40]


def _loaded(**settings: object) -> TextEmbedder:
    embedder = TextEmbedder(EmbeddingConfig(**settings))  # type: ignore[arg-type]
    embedder.load()
    return embedder


@pytest.fixture(scope="module")
def torch_vectors() -> np.ndarray:
    embedder = _loaded(runtime="torch")
    try:
        return embedder.embed(TEXTS)
    finally:
        embedder.close()


@pytest.fixture(scope="module")
def int8() -> Iterator[TextEmbedder]:
    embedder = _loaded(runtime="onnx", quantization="int8")
    yield embedder
    embedder.close()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(axis=1))


def test_the_default_on_a_cpu_is_openvino_and_says_how_it_computes(embedder: TextEmbedder) -> None:
    described = embedder.describe()
    assert embedder.runtime == "openvino" and described["runtime"] == "openvino"
    assert described["device"] == "cpu" and described["quantization"] == "none"
    assert described["precision"] in ("bf16", "fp32")  # bf16 where the CPU has AMX / AVX-512 bf16
    assert described["threads"] == 1 and described["ingest_threads"] == usable_cores()


@pytest.mark.parametrize("runtime", ["openvino", "onnx"])
def test_cpu_runtimes_give_pytorch_vectors_at_every_length(runtime: str, torch_vectors: np.ndarray,
                                                           embedder: TextEmbedder) -> None:
    """Interchangeable: an index built by one runtime serves questions embedded by another."""
    other = embedder if runtime == "openvino" else _loaded(runtime=runtime)
    try:
        for vectors in (other.embed(TEXTS), other.embed_bulk(TEXTS)):
            assert vectors.shape == torch_vectors.shape and vectors.dtype == np.float32
            np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
            assert _cosines(vectors, torch_vectors).min() > 0.9995
        # one text alone (no padding) is the same vector as inside a batch of longer ones
        np.testing.assert_allclose(other.embed([TEXTS[1]])[0], other.embed(TEXTS)[1], atol=2e-3)
    finally:
        if other is not embedder:
            other.close()


def test_int8_is_another_vector_space(int8: TextEmbedder, torch_vectors: np.ndarray) -> None:
    """Its vectors are close (the same meaning) but not interchangeable: an index keeps them apart."""
    vectors = int8.embed(TEXTS)
    assert int8.describe()["precision"] == "int8"
    assert _cosines(vectors, torch_vectors).min() > 0.9
    assert int8.config.vector_space == f"{BUNDLED_EMBEDDING_MODEL}+int8"
    assert EmbeddingConfig(runtime="onnx").vector_space == EmbeddingConfig(runtime="torch").vector_space \
        == EmbeddingConfig().vector_space == BUNDLED_EMBEDDING_MODEL


def test_an_index_records_its_runtime_and_serves_only_its_vector_space(
        embedder: TextEmbedder, int8: TextEmbedder, sample_kb_source: Path, tmp_path: Path) -> None:
    manifest = ingest_directory(sample_kb_source, tmp_path, SAMPLE_KB_NAME, PipelineConfig(),
                                embedder=embedder).manifest
    assert manifest.embedding_model == BUNDLED_EMBEDDING_MODEL
    assert manifest.embedding_runtime == embedder.describe()
    assert Manifest.read(tmp_path / SAMPLE_KB_NAME / "v1").embedding_runtime["runtime"] == "openvino"

    quantized = PipelineConfig(embedding=int8.config)
    with pytest.raises(IndexMismatchError, match=r"\+int8"):  # incremental into float vectors: refused
        ingest_directory(sample_kb_source, tmp_path, SAMPLE_KB_NAME, quantized, embedder=int8)
    rebuilt = ingest_directory(sample_kb_source, tmp_path, SAMPLE_KB_NAME, quantized, embedder=int8,
                               force=True).manifest  # a model switch: the whole KB again
    assert rebuilt.embedding_model == f"{BUNDLED_EMBEDDING_MODEL}+int8" and rebuilt.version == 2
    assert rebuilt.embedding_runtime["runtime"] == "onnx" and rebuilt.embedding_runtime["quantization"] == "int8"


def test_a_question_does_not_wait_for_the_ingest_lane(embedder: TextEmbedder) -> None:
    """Questions and ingest have a graph each: with ingest holding its own, a question still runs."""
    bulk = embedder._bulk
    assert bulk is not None and bulk is not embedder._query
    with bulk._lock:  # an ingest batch in flight on the bulk lane
        done = threading.Event()
        worker = threading.Thread(target=lambda: (embedder.embed([TEXTS[1]]), done.set()))
        worker.start()
        assert done.wait(timeout=30)
        worker.join()


def test_the_export_is_made_once_and_again_only_for_changed_model_files(tmp_path: Path) -> None:
    model = tmp_path / "minilm"
    shutil.copytree(resolve_model_path(BUNDLED_EMBEDDING_MODEL), model)
    before = export_key(str(model), model)
    assert export_key(str(model), model) == before
    config = model / "config.json"
    config.write_text(config.read_text() + "\n")
    assert export_key(str(model), model) != before

    cache = tmp_path / "cache"
    first = ensure_export(BUNDLED_EMBEDDING_MODEL, cache)
    graph = first.graph("none")
    stamp = graph.stat().st_mtime_ns
    again = ensure_export(BUNDLED_EMBEDDING_MODEL, cache)
    assert again == first and graph.stat().st_mtime_ns == stamp
    assert first.directory == export_directory(BUNDLED_EMBEDDING_MODEL, cache)
    meta = json.loads((first.directory / "export.json").read_text())
    assert meta["max_seq_length"] == 256 and meta["dimension"] == 384
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [first.directory.name]


def test_openvino_compiles_a_lane_once_per_node_and_recompiles_a_broken_blob(embedder: TextEmbedder,
                                                                             tmp_path: Path) -> None:
    """Later replicas load the compiled graph from the export's directory; a blob cut short (a disk that
    filled up) is compiled anew, with the same vectors."""
    source = export_directory(BUNDLED_EMBEDDING_MODEL, EmbeddingConfig().cache_dir)  # the session's export
    copy = tmp_path / source.name
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("openvino_cache"))
    export = Export.read(copy)
    expected = GraphEncoder(export, "openvino", "none", "auto", 1).encode(TEXTS, 8)
    blobs = sorted((copy / "openvino_cache").glob("*.blob"))
    assert len(blobs) == 1, blobs
    written = blobs[0].stat().st_mtime_ns
    np.testing.assert_allclose(GraphEncoder(export, "openvino", "none", "auto", 1).encode(TEXTS, 8), expected,
                               atol=1e-6)
    assert blobs[0].stat().st_mtime_ns == written  # loaded, not compiled and written again
    # The ingest lane differs only in threads and streams, which OpenVINO sets at load: the same blob.
    bulk = GraphEncoder(export, "openvino", "none", "auto", 2, parallel=True)
    np.testing.assert_allclose(bulk.encode(TEXTS, 2), expected, atol=1e-6)
    assert list((copy / "openvino_cache").glob("*.blob")) == blobs and blobs[0].stat().st_mtime_ns == written
    blobs[0].write_bytes(blobs[0].read_bytes()[:blobs[0].stat().st_size // 2])
    np.testing.assert_allclose(GraphEncoder(export, "openvino", "none", "auto", 1).encode(TEXTS, 8), expected,
                               atol=1e-6)


def test_a_cpu_replica_never_imports_torch(embedder: TextEmbedder) -> None:
    """With the export on disk, embedding loads OpenVINO and a tokenizer only (about 300 MB less)."""
    assert embedder.describe()["runtime"] == "openvino"  # the export exists (the session's embedder made it)
    code = ("import sys; from rag.config import EmbeddingConfig; from rag.embedding import TextEmbedder; "
            "e = TextEmbedder(EmbeddingConfig()); e.load(); e.warmup(); "
            "print(e.embed(['hello']).shape, 'torch' in sys.modules, 'sentence_transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["(1,", "384)", "False", "False"]


@pytest.mark.parametrize(("settings", "message"), [
    ({"quantization": "int8"}, "needs runtime onnx"),
    ({"quantization": "int8", "runtime": "openvino"}, "needs runtime onnx"),
    ({"device": "cuda", "runtime": "openvino"}, "device cuda needs runtime torch"),
    ({"runtime": "tensorrt"}, "runtime"),
    ({"ingest_threads": -1}, "ingest_threads"),
])
def test_runtime_settings_that_cannot_work_are_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        EmbeddingConfig(**settings)  # type: ignore[arg-type]
