"""An ingest SIGKILLed mid-build: the last good version keeps serving, the next run cleans up and publishes.

The ingest runs in a child process that stops itself at a chosen point (half the chunks embedded, or
half the docstore written into its staging folder) and says so through a file, so the kill always
lands mid-build: no sleeps, no timing races. The child embeds with a hash stand-in instead of the
model, so it starts in about a second; what is under test is what the kill leaves on disk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from rag.config import PipelineConfig
from rag.index import KnowledgeBaseIndex
from rag.ingest import ingest_directory
from rag.kb_versions import list_versions

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = PipelineConfig()

CHILD = """
import sys, time
from pathlib import Path

import numpy as np

import rag.index
from rag.config import EmbeddingConfig, PipelineConfig
from rag.ingest import ingest_directory

source, kb_root, ready, stop_at = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]


def stop(where):
    ready.write_text(where)
    time.sleep(600)  # until SIGKILLed


class HashEmbedder:
    config = EmbeddingConfig()

    def embed_bulk(self, texts):
        vectors = np.stack([np.random.default_rng(abs(hash(t)) % 2**32).random(384) for t in texts])
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)

    def describe(self):
        return {"runtime": "hash"}


def progress(stage, done, total):
    if stop_at == "embed" and stage == "embed" and done >= total / 2:
        stop(f"embedded {done} of {total}")


write_docstore = rag.index._write_docstore


def half_docstore(directory, chunks):
    write_docstore(directory, chunks[: len(chunks) // 2])
    stop(str(directory))


if stop_at == "write":
    rag.index._write_docstore = half_docstore
# Small batches so the embed stop lands near half; the fingerprint ignores the batch size.
ingest_directory(source, kb_root, "kb", PipelineConfig(embedding=EmbeddingConfig(batch_size=2)),
                 embedder=HashEmbedder(), progress=progress)
"""


def _corpus(folder: Path, topics: list[str]) -> Path:
    for n, topic in enumerate(topics):
        text = "\n\n".join(f"{topic.capitalize()} paragraph {p}: " + f"{topic} facts, sentence {p}. " * 12
                           for p in range(4))
        (folder / f"{n:02d}-{topic}.md").parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{n:02d}-{topic}.md").write_text(text, encoding="utf-8")
    return folder


def _kill_mid_build(source: Path, kb_root: Path, ready: Path, stop_at: str) -> str:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(source), str(kb_root), str(ready), stop_at],
                             cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert child.poll() is None, f"the ingest ended before the kill: {child.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "the ingest never reached the kill point"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
        return ready.read_text()
    finally:  # whatever failed above, no child outlives the test
        child.kill()
        child.wait(timeout=30)
        if child.stderr:
            child.stderr.close()


def _staging(kb_root: Path) -> list[Path]:
    return [p for p in (kb_root / "kb").iterdir() if p.name.startswith(".staging-")]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stop_at", ["embed", "write"])
def test_ingest_killed_mid_build_keeps_last_version_and_next_run_recovers(tmp_path: Path, embedder,
                                                                          stop_at: str) -> None:
    source, kb_root = _corpus(tmp_path / "src", ["harbour", "glacier", "orchard"]), tmp_path / "kb"
    assert ingest_directory(source, kb_root, "kb", CONFIG, embedder=embedder).manifest.version == 1
    _corpus(source, ["harbour", "glacier", "orchard", "volcano", "lighthouse", "desert", "meadow", "canyon"])

    where = _kill_mid_build(source, kb_root, tmp_path / "ready", stop_at)

    assert list_versions(kb_root, "kb") == [1]
    if stop_at == "write":  # the kill landed inside the publish: its staging folder is left behind
        assert [str(p) for p in _staging(kb_root)] == [where]
        assert (Path(where) / "docstore.sqlite").exists()
        assert not (Path(where) / "manifest.json").exists()
    with closing(KnowledgeBaseIndex.load(kb_root, "kb")) as index:
        assert index.version == 1
        [hits] = index.search(embedder.embed(["glacier facts"]), 1)
        assert hits[0].source == "01-glacier.md"

    rerun = ingest_directory(source, kb_root, "kb", CONFIG, embedder=embedder)

    assert (rerun.created, rerun.manifest.version) == (True, 2)
    assert rerun.stale_staging_removed == (1 if stop_at == "write" else 0)
    assert _staging(kb_root) == []
    assert list_versions(kb_root, "kb") == [1, 2]
    with closing(KnowledgeBaseIndex.load(kb_root, "kb")) as index:
        assert index.version == 2
        [hits] = index.search(embedder.embed(["lighthouse facts"]), 1)
        assert hits[0].source == "04-lighthouse.md"

