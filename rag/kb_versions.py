"""Where the published versions of a knowledge base live on disk, their manifests, and which exist.

Layout: `<kb_root>/<kb>/v<N>/manifest.json` beside the index files (`rag.index` writes and reads those). Apart
from the index, so that what only reads the layout (the gateway's listings and upload checks, the control
plane) loads neither FAISS nor the lexical index. Every path is built from a KB name through
`kb_directory`, which refuses names that are not a single safe path component (`rag.config.check_kb_name`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rag.config import check_kb_name, is_kb_name
from rag.errors import KnowledgeBaseNotFoundError

FORMAT_VERSION = 1
VERSION_DIR = re.compile(r"^v(\d+)$")  # a published version's folder name: v<N>


@dataclass(frozen=True)
class Manifest:
    knowledge_base: str
    version: int
    embedding_model: str
    dimension: int
    count: int
    fingerprint: str
    created_at: float
    splitter: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    # Per original: sha256, size, chunks, updated_at, splitter; what an incremental build compares.
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    # {"cjk_share": 0..1, "main": "zh" | "en"}: which retrieval `mode: auto` gives this KB (rag.language).
    language: dict[str, Any] = field(default_factory=dict)
    # How the vectors were made (runtime, precision, quantization; rag.embedding): a record for people.
    # Which versions may serve the index is `embedding_model`'s job (EmbeddingConfig.vector_space).
    embedding_runtime: dict[str, Any] = field(default_factory=dict)

    @property
    def main_language(self) -> str | None:
        return self.language.get("main")

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        return cls(**json.loads((directory / "manifest.json").read_text(encoding="utf-8")))


def kb_directory(kb_root: Path, name: str) -> Path:
    """The folder of knowledge base `name` under `kb_root`; `InvalidRequestError` for an unsafe name."""
    return Path(kb_root) / check_kb_name(name)


def version_directory(kb_root: Path, name: str, version: int) -> Path:
    """The folder of one published version (which may not exist)."""
    return kb_directory(kb_root, name) / f"v{int(version)}"


def list_versions(kb_root: Path, name: str) -> list[int]:
    """Published versions of a knowledge base, oldest first (only those with a manifest)."""
    base = kb_directory(kb_root, name)
    if not base.is_dir():
        return []
    found = [int(m.group(1)) for p in base.iterdir() if (m := VERSION_DIR.match(p.name))
             and (p / "manifest.json").is_file()]
    return sorted(found)


def list_knowledge_bases(kb_root: Path) -> list[str]:
    if not kb_root.is_dir():
        return []
    return sorted(p.name for p in kb_root.iterdir()
                  if p.is_dir() and is_kb_name(p.name) and list_versions(kb_root, p.name))


def resolve_version(kb_root: Path, name: str, version: int | Literal["latest"]) -> int:
    check_kb_name(name)
    versions = list_versions(kb_root, name)
    if not versions:
        raise KnowledgeBaseNotFoundError(f"knowledge base {name!r} has no index yet; ingest it first")
    if version == "latest":
        return versions[-1]
    if version not in versions:
        raise KnowledgeBaseNotFoundError(
            f"knowledge base {name!r} has no index version {version}; available: {versions}")
    return version
