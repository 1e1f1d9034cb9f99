"""What the knowledge-base manager lists: KBs with their details, a KB's files (Chatchat's field names
beside ours), read from kb_root and the newest index version. Plain functions over the disk layout."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from rag import kb_store
from rag.config import PipelineConfig
from rag.kb_versions import Manifest, list_versions, version_directory
from rag.language import choose_mode


def with_chatchat_names(kb: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each file's details with the fields Chatchat's list_files gives (its web UI shows them) beside ours."""
    return [{**row, "No": number, "kb_name": kb, "file_version": 1 if row.get("in_db") else 0,
             "document_loader": "", "text_splitter": "RecursiveCharacterTextSplitter" if row.get("in_db") else "",
             "create_time": row.get("update_time"), "file_mtime": row.get("update_time"), "custom_docs": False}
            for number, row in enumerate(rows, 1)]


def describe_all(config: PipelineConfig) -> list[dict[str, Any]]:
    root, rows = config.retrieval.kb_root_path, []
    for name in kb_store.list_names(root):
        meta, latest = kb_store.read_meta(root, name), latest_manifest(root, name)
        language = latest.main_language if latest else None
        choice = choose_mode(config.retrieval.mode, config.embedding.languages, language)
        rows.append({"knowledge_base_name": name, "kb_info": meta.kb_info if meta else "",
                     "embed_model": meta.embed_model if meta else latest.embedding_model if latest else None,
                     "index_version": latest.version if latest else None,
                     "files": len(latest.files or latest.sources) if latest else 0, "language": language,
                     "create_time": _iso(meta.created_at) if meta else None,
                     "retrieval_mode": choice.mode, "why": choice.why})
    return rows


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).isoformat(timespec="seconds")


def embed_model_of(root: Path, kb: str) -> str | None:
    meta = kb_store.read_meta(root, kb)
    if meta is not None:
        return meta.embed_model
    latest = latest_manifest(root, kb)
    return latest.embedding_model if latest else None


def latest_manifest(root: Path, kb: str) -> Manifest | None:
    versions = list_versions(root, kb)
    return Manifest.read(version_directory(root, kb, versions[-1])) if versions else None


def stored_files(root: Path, kb: str) -> list[dict[str, Any]]:
    """The indexed files (from the latest version) and originals not indexed (delete_content=false)."""
    latest = latest_manifest(root, kb)
    indexed = latest.files if latest else {}
    rows = [{"file_name": name, "file_ext": Path(name).suffix.lower(), "file_size": info.get("size"),
             "docs_count": info.get("chunks"), "update_time": info.get("updated_at"), "sha256": info.get("sha256"),
             "in_db": True, "in_folder": kb_store.original_path(root, kb, name).is_file()}
            for name, info in indexed.items()]
    if latest and not indexed:  # a version built before per-file records: names only
        rows = [{"file_name": name, "file_ext": Path(name).suffix.lower(), "in_db": True} for name in latest.sources]
    content = kb_store.content_directory(root, kb)
    listed = {r["file_name"] for r in rows}
    if content.is_dir():
        for path in sorted(content.rglob("*")):
            name = path.relative_to(content).as_posix()
            if path.is_file() and name not in listed and not any(p.startswith(".") for p in name.split("/")):
                rows.append({"file_name": name, "file_ext": path.suffix.lower(), "file_size": path.stat().st_size,
                             "docs_count": 0, "update_time": path.stat().st_mtime, "in_db": False, "in_folder": True})
    return sorted(rows, key=lambda r: r["file_name"])
