"""A knowledge base on disk besides its index versions: its description, its original documents, and
the lock that makes one writer at a time.

Layout under `<kb_root>/<kb>/`: `kb.json` (description and embedding model, written at creation),
`content/` (the originals, so an index can be rebuilt and a file downloaded), `v<N>/` (index versions,
`rag.index`), `.writer.lock`. Beside the KBs, `<kb_root>/.spool/` holds uploads on their way in.

File names come from clients (multipart uploads) and become paths, so every name is checked by
`check_file_name` before anything is built from it: one path component (the CLI's nested folders give
several, each checked), NFC-normalised, no `..`, no leading dot, no control characters, a supported
extension. A name that was refused never reaches the file system.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
import unicodedata
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from rag.errors import ConflictError, DocumentNotFoundError, InvalidRequestError, KnowledgeBaseNotFoundError
from rag.file_types import SUPPORTED_SUFFIXES
from rag.kb_versions import Manifest, kb_directory, list_versions, version_directory

CONTENT = "content"
_META = "kb.json"
_WRITER_LOCK = ".writer.lock"
_MAX_NAME_BYTES = 255  # one path component on every common file system
_SHOWN = 80
# Temporary KBs (Chatchat's file chat) live beside the others, so the same build, Retrievers (`discover`)
# and deletion serve them; their names have this exact form, which create refuses, and listings skip.
_TEMPORARY = re.compile(r"temp-([0-9a-f]{32})")


@dataclass(frozen=True)
class KnowledgeBaseMeta:
    name: str
    kb_info: str
    embed_model: str
    created_at: float


def _shown(name: str) -> str:
    return repr(name[:_SHOWN] + ("..." if len(name) > _SHOWN else ""))


def check_file_name(name: object, *, nested: bool = False, any_type: bool = False) -> str:
    """The normalised name of a document, or `InvalidRequestError` naming it. `nested` allows
    folder/name (the CLI's source folders), each part checked the same way; `any_type` checks only that
    the name is safe, not that its type is one a loader reads."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequestError("a file name is empty")
    normal = unicodedata.normalize("NFC", name.strip())
    parts = normal.split("/") if nested else [normal]
    for part in parts:
        _check_part(part, name)
    if not any_type and (why := unsupported_type(parts[-1])):
        raise InvalidRequestError(f"file {_shown(name)}: {why}")
    return normal


def unsupported_type(name: str) -> str | None:
    """Why a file of this name cannot be indexed (its type), or None."""
    suffix = Path(name).suffix.lower()
    if suffix in SUPPORTED_SUFFIXES:
        return None
    return f"type {suffix or '(none)'!r} is not supported; supported: {' '.join(sorted(SUPPORTED_SUFFIXES))}"


def _check_part(part: str, name: str) -> None:
    if part in ("", ".", "..") or part.startswith("."):
        raise InvalidRequestError(f"file {_shown(name)}: a name may not be empty, '..' or start with a dot")
    if "/" in part or "\\" in part or any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in part):
        raise InvalidRequestError(f"file {_shown(name)}: path separators and control characters are not "
                                  "allowed in a file name")
    if len(part.encode("utf-8")) > _MAX_NAME_BYTES:
        raise InvalidRequestError(f"file {_shown(name)}: longer than {_MAX_NAME_BYTES} bytes")


def is_temporary(kb: str) -> bool:
    return _TEMPORARY.fullmatch(kb) is not None


def temporary_name(temp_id: str) -> str | None:
    """The KB name of a temporary KB's id (Chatchat's `knowledge_id`), or None when it cannot be one."""
    name = f"temp-{temp_id}"
    return name if is_temporary(name) else None


def new_temporary_name() -> str:
    return f"temp-{uuid.uuid4().hex}"


def temporary_id(kb: str) -> str:
    return kb.removeprefix("temp-")


def content_directory(kb_root: Path, kb: str) -> Path:
    return kb_directory(kb_root, kb) / CONTENT


def original_path(kb_root: Path, kb: str, name: str) -> Path:
    """Where the original of a (checked) document name lives; inside `content/` by construction."""
    return content_directory(kb_root, kb).joinpath(*check_file_name(name, nested=True).split("/"))


def exists(kb_root: Path, kb: str) -> bool:
    base = kb_directory(kb_root, kb)
    return (base / _META).is_file() or bool(list_versions(kb_root, kb))


def require(kb_root: Path, kb: str) -> Path:
    if not exists(kb_root, kb):
        raise KnowledgeBaseNotFoundError(f"no knowledge base {kb!r}; create it first")
    return kb_directory(kb_root, kb)


def list_names(kb_root: Path, *, temporary: bool = False) -> list[str]:
    """Every knowledge base: created (kb.json) or ingested (a published version); temporary ones only with
    `temporary` (they are nobody's to list)."""
    if not kb_root.is_dir():
        return []
    found = []
    for path in kb_root.iterdir():
        try:
            if path.is_dir() and exists(kb_root, path.name) and (temporary or not is_temporary(path.name)):
                found.append(path.name)
        except InvalidRequestError:  # a folder whose name is no KB name (staging, trash, a stray dir)
            continue
    return sorted(found)


def create(kb_root: Path, kb: str, kb_info: str, embed_model: str) -> KnowledgeBaseMeta:
    base = kb_directory(kb_root, kb)
    if exists(kb_root, kb):
        raise ConflictError(f"knowledge base {kb!r} already exists")
    (base / CONTENT).mkdir(parents=True, exist_ok=True)
    meta = KnowledgeBaseMeta(kb, kb_info, embed_model, time.time())
    _write_meta(kb_root, meta)
    return meta


def _write_meta(kb_root: Path, meta: KnowledgeBaseMeta) -> None:
    write_atomically(kb_directory(kb_root, meta.name) / _META,
                     json.dumps(asdict(meta), ensure_ascii=False, indent=2).encode())


def read_meta(kb_root: Path, kb: str) -> KnowledgeBaseMeta | None:
    path = kb_directory(kb_root, kb) / _META
    if not path.is_file():
        return None
    return KnowledgeBaseMeta(**json.loads(path.read_text(encoding="utf-8")))


def update_info(kb_root: Path, kb: str, kb_info: str) -> KnowledgeBaseMeta:
    """A new description, the rest of kb.json as it was."""
    require(kb_root, kb)
    meta = read_meta(kb_root, kb)
    if meta is None:  # built by the CLI before kb.json existed: its model is the latest index's
        versions = list_versions(kb_root, kb)
        model = Manifest.read(version_directory(kb_root, kb, versions[-1])).embedding_model if versions else ""
        meta = KnowledgeBaseMeta(kb, "", model, time.time())
    meta = KnowledgeBaseMeta(meta.name, kb_info, meta.embed_model, meta.created_at)
    _write_meta(kb_root, meta)
    return meta


def ensure_meta(kb_root: Path, kb: str, embed_model: str) -> None:
    """A KB built by the CLI gets its description too, so both paths leave the same layout; a rebuild
    with another model records that model."""
    meta = read_meta(kb_root, kb)
    if meta is None or meta.embed_model != embed_model:
        info, created = (meta.kb_info, meta.created_at) if meta else ("", time.time())
        meta = KnowledgeBaseMeta(kb, info, embed_model, created)
        _write_meta(kb_root, meta)


_TRASH_PREFIX = ".deleted-"


def delete(kb_root: Path, kb: str) -> None:
    """Remove a KB at once for readers (one rename out of the namespace), then its files."""
    base = require(kb_root, kb)
    with writer(kb_root, kb):
        trash = Path(kb_root) / f"{_TRASH_PREFIX}{kb}-{uuid.uuid4().hex[:8]}"
        os.rename(base, trash)
    shutil.rmtree(trash, ignore_errors=True)
    remove_trash(kb_root)


def remove_trash(kb_root: Path) -> list[str]:
    """Remove what deletes left behind when they were killed between their rename and their last file.
    Nothing reads a trash folder (it left the namespace with its rename): a second remover at the same
    time is harmless. Returns the names removed."""
    root = Path(kb_root)
    trash = [p for p in root.glob(f"{_TRASH_PREFIX}*") if p.is_dir() and not p.is_symlink()] if root.is_dir() else []
    for path in trash:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in trash if not p.exists()]


SPOOL = ".spool"  # uploads streamed to disk by a gateway, each in its own folder until its job ends


def new_spool(kb_root: Path) -> Path:
    """A fresh folder for one upload's files. Under `kb_root`, which every node that builds or serves
    shares, so a gateway on one node writes where the manager on another reads."""
    folder = Path(kb_root) / SPOOL / uuid.uuid4().hex
    folder.mkdir(parents=True, mode=0o700)
    return folder


def check_spool(kb_root: Path, folder: Path, files: Iterable[Path]) -> None:
    """Refuse a spool folder (and files) that is not one `new_spool` made under `kb_root`: a path handed
    between processes is checked before anything is read from it or removed."""
    spools = (Path(kb_root) / SPOOL).resolve()
    folder = Path(folder)
    if folder.resolve().parent != spools or folder.is_symlink():
        raise InvalidRequestError("an upload's files must come from the knowledge-base spool folder")
    if any(Path(f).resolve().parent != folder.resolve() for f in files):
        raise InvalidRequestError("an upload's files must lie in its own spool folder")


def remove_spool(kb_root: Path, folder: Path) -> None:
    check_spool(kb_root, folder, ())
    shutil.rmtree(folder, ignore_errors=True)


def sweep_spools(kb_root: Path, older_than_s: float, keep: set[Path]) -> list[str]:
    """Remove the spool folders older than `older_than_s` that no job holds (`keep`): what a gateway or
    manager that stopped mid-upload left. Returns the names removed."""
    base = Path(kb_root) / SPOOL
    if not base.is_dir():
        return []
    cutoff, removed = time.time() - older_than_s, []
    for folder in base.iterdir():
        try:
            if folder.is_dir() and not folder.is_symlink() and folder not in keep and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        except FileNotFoundError:  # removed by another sweep meanwhile
            continue
    return removed


def read_original(kb_root: Path, kb: str, name: str) -> bytes:
    path = original_path(kb_root, kb, name)
    if not path.is_file() or path.is_symlink():
        raise DocumentNotFoundError(f"knowledge base {kb!r} has no file {_shown(name)}")
    return path.read_bytes()


def write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old bytes or the new ones, never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name[:40]}")
    try:
        with open(temporary, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def writer(kb_root: Path, kb: str) -> Iterator[None]:
    """One writer per KB, across threads, processes and (on a file system with working flock) nodes:
    a second update waits here and then starts from the version the first one published."""
    base = kb_directory(kb_root, kb)
    base.mkdir(parents=True, exist_ok=True)
    with open(base / _WRITER_LOCK, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield

