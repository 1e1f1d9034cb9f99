"""Incremental index builds: a change to a knowledge base's files becomes its next index version.

The one code path of the ingest CLI and the HTTP API. Under the KB's writer lock it starts from the
latest version, keeps the chunks and vectors of every unchanged file, splits only new or changed
files, and embeds only chunks whose text (by SHA-256) the previous version did not hold, so a one-file
change costs one file's embedding and a deletion costs none.

Nothing already stored changes until the new version is ready: incoming files are staged and split
first (a file that cannot be read refuses the whole change, or with `skip_unreadable` fails alone and
is reported while the rest is indexed; a stored file keeps its last indexed version), and originals
move into `content/` and deleted ones go only after the new version is published, so `content/` holds
what the newest version indexed. A build killed between publishing and moving leaves its originals in
its incoming folder; the next writer moves the ones the newest version indexes and drops the rest, and
`indexed_original` finds them there meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from langchain_core.documents import Document

from rag import kb_store
from rag.config import PipelineConfig, SplitterConfig
from rag.documents import DEFAULT_MAX_FILE_BYTES, copy_document, iter_files, load_file, split_documents
from rag.errors import (
    ConflictError,
    DocumentNotFoundError,
    IndexMismatchError,
    InvalidRequestError,
    UnsupportedDocumentError,
)
from rag.index import Chunk, ExtraWriter, clean_staging, publish_index, read_version
from rag.kb_changes import Changes, Source
from rag.kb_versions import Manifest, list_versions, version_directory

# (stage, done, total): "load" counts files, "embed" counts chunks, "published" gives the new version number.
Progress = Callable[[str, int, int], None]
logger = logging.getLogger("rag.kb_build")
# Texts to unit vectors; one that also has `describe()` (how it embeds) has that recorded in the manifest.
Embed = Callable[[list[str]], np.ndarray]
# (file, folder it is named relative to, splitter, max bytes) -> its chunks; rag.parsing.Parser is one.
Parse = Callable[[Path, Path, SplitterConfig, int], list[Document]]
INCOMING_PREFIX = ".incoming-"  # where a build stages the files it was given


class NothingIndexedError(UnsupportedDocumentError):
    """Every file of a change into a KB with no index yet failed alone: nothing to publish. `failed` says
    why for each (a caller that reports failures per file, as the HTTP API does, answers with them)."""

    def __init__(self, message: str, failed: dict[str, str]) -> None:
        super().__init__(message)
        self.failed = failed


@dataclass(frozen=True)
class BuildResult:
    manifest: Manifest
    created: bool  # False when nothing changed: no version was published
    embedded: int = 0
    reused: int = 0
    changed: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    stale_staging_removed: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # file -> why it was not indexed (skip_unreadable)


@dataclass
class _Previous:
    manifest: Manifest | None = None
    chunks_by_file: dict[str, list[tuple[Chunk, np.ndarray]]] = field(default_factory=dict)
    vector_by_text: dict[str, np.ndarray] = field(default_factory=dict)


def update_knowledge_base(kb_root: Path, kb: str, config: PipelineConfig, changes: Changes, *, embed: Embed,
                          splitter: SplitterConfig | None = None, progress: Progress | None = None,
                          max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, extra: ExtraWriter | None = None,
                          batch_size: int = 256, parse: Parse | None = None) -> BuildResult:
    """Apply `changes` and publish the next version (or nothing, when nothing changed)."""
    with kb_store.writer(kb_root, kb):
        removed = len(clean_staging(kb_root, kb))
        _settle_leftovers(kb_root, kb)
        kb_store.remove_trash(kb_root)
        previous = _load_previous(kb_root, kb, config, changes.full)
        files = _file_set(kb_root, kb, previous.manifest, changes)
        incoming = kb_store.kb_directory(kb_root, kb) / f"{INCOMING_PREFIX}{uuid.uuid4().hex}"
        published = moved = False
        try:
            staged = _stage(incoming, changes.add, max_file_bytes)
            # Without override, a file stored already stays as it is: over HTTP that fails it alone, as
            # Chatchat reports it in failed_files; elsewhere other content under its name is a conflict.
            skipped = _stored_already(staged, previous.manifest) if changes.skip_unreadable and \
                not changes.override else {}
            if skipped:
                files, _, staged = _without_failed(skipped, files, {}, staged, previous.manifest)
            todo = _to_process(files, staged, previous.manifest, changes, splitter or config.splitter)
            if not todo and not changes.delete and previous.manifest is not None:
                return BuildResult(previous.manifest, created=False, stale_staging_removed=removed, failed=skipped)
            new_chunks, failed = _split(kb_root, kb, incoming, todo, staged, max_file_bytes, progress,
                                        parse or _parse_here, changes.skip_unreadable)
            failed = {**skipped, **failed}
            if failed:
                files, todo, staged = _without_failed(failed, files, todo, staged, previous.manifest)
                if not todo and not changes.delete and previous.manifest is not None:
                    return BuildResult(previous.manifest, created=False, stale_staging_removed=removed,
                                       failed=failed)
            _check_size(new_chunks, changes.max_chunks)
            chunks, vectors, embedded = _assemble(files, new_chunks, previous, embed, progress, batch_size)
            info = _files_info(files, previous.manifest, new_chunks, staged, todo, kb_root, kb, incoming)
            manifest = publish_index(kb_root, kb, chunks, vectors, embedding_model=config.embedding.vector_space,
                                     fingerprint=_fingerprint(info, config.embedding.vector_space),
                                     splitter=config.splitter.model_dump(), files=info, extra=extra,
                                     embedding_runtime=_runtime_of(embed, previous.manifest, embedded))
            published = True
            if progress:
                progress("published", manifest.version, manifest.version)
            _move_into_content(kb_root, kb, incoming, staged)
            moved = True
        finally:
            if moved or not published:  # else its originals are the published version's: the next writer's
                shutil.rmtree(incoming, ignore_errors=True)
        for name in () if changes.keep_originals else changes.delete:
            kb_store.original_path(kb_root, kb, name).unlink(missing_ok=True)
        kb_store.ensure_meta(kb_root, kb, config.embedding.vector_space)  # a switch of model (full rebuild) included
        return BuildResult(manifest, True, embedded, len(chunks) - embedded, tuple(sorted(todo)),
                           tuple(changes.delete), removed, failed)


def _runtime_of(embed: Embed, previous: Manifest | None, embedded: int) -> dict[str, Any]:
    """What made the vectors: the embedder's own account when it gives one (`describe()`, as the Serve
    Embedder and TextEmbedder do). A version that embedded nothing new keeps its predecessor's record."""
    if not embedded and previous is not None:
        return previous.embedding_runtime
    describe = getattr(embed, "describe", None)
    if describe is None:
        return {}
    try:
        return dict(describe())
    except Exception as exc:  # a record for people: a build is not failed for it
        logger.warning("event=EMBEDDING_RUNTIME_UNKNOWN error=%r", exc)
        return {}


def _load_previous(kb_root: Path, kb: str, config: PipelineConfig, full: bool) -> _Previous:
    versions = list_versions(kb_root, kb)
    meta = kb_store.read_meta(kb_root, kb)
    if meta is not None and meta.embed_model != config.embedding.vector_space and not full:
        raise IndexMismatchError(f"knowledge base {kb!r} embeds with {meta.embed_model!r}, but this pipeline "
                                 f"embeds with {config.embedding.vector_space!r}; to switch its model, rebuild it "
                                 "whole (ingest --force, or recreate_vector_store from a version that runs it)")
    if not versions:
        return _Previous()
    manifest, chunks, vectors = read_version(kb_root, kb, versions[-1])
    previous = _Previous(manifest)
    for chunk, vector in zip(chunks, vectors, strict=True):
        previous.chunks_by_file.setdefault(chunk.source, []).append((chunk, vector))
        if not full and manifest.embedding_model == config.embedding.vector_space:
            previous.vector_by_text[_text_hash(chunk.text)] = vector
    return previous


def _file_set(kb_root: Path, kb: str, manifest: Manifest | None, changes: Changes) -> set[str]:
    known = set(_known_files(manifest))
    if changes.rescan:
        content = kb_store.content_directory(kb_root, kb)
        known = {p.relative_to(content).as_posix() for p in iter_files(content)} if content.is_dir() else set()
    missing = [name for name in changes.delete + changes.reindex if name not in known]
    if missing:
        raise DocumentNotFoundError(f"knowledge base {kb!r} has no file {', '.join(map(repr, missing[:5]))}")
    files = (known - set(changes.delete)) | set(changes.add)
    if not files and not changes.delete:  # deleting the last files leaves an empty KB, as Chatchat allows
        raise ConflictError(f"knowledge base {kb!r} holds no documents to rebuild; upload some first")
    return files


def _known_files(manifest: Manifest | None) -> list[str]:
    if manifest is None:
        return []
    return list(manifest.files) or list(manifest.sources)  # versions built before per-file records


def _stage(incoming: Path, add: dict[str, Source], max_file_bytes: int) -> dict[str, str]:
    """Write every incoming file under `incoming`; returns name -> sha256."""
    digests = {}
    for name, source in add.items():
        if isinstance(source, bytes) and len(source) > max_file_bytes:
            raise InvalidRequestError(f"file {name!r} is larger than the {max_file_bytes}-byte limit")
        target = incoming.joinpath(*kb_store.check_file_name(name, nested=True).split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
            digests[name] = hashlib.sha256(source).hexdigest()
        else:  # a file on disk (the CLI's, or an upload the gateway spooled) is copied, never read whole
            try:
                digests[name] = copy_document(source, target, max_file_bytes)
            except UnsupportedDocumentError as exc:  # named as the client named it, not by its spool path
                raise UnsupportedDocumentError(f"{name}: {str(exc).removeprefix(f'{source}: ')}") from None
    return digests


def _to_process(files: set[str], staged: dict[str, str], manifest: Manifest | None, changes: Changes,
                splitter: SplitterConfig) -> dict[str, SplitterConfig]:
    """Which files to split (and with which splitter): new, changed, re-indexed, or all of them."""
    before = manifest.files if manifest else {}
    conflicts = [n for n, digest in staged.items() if n in before and before[n].get("sha256") != digest]
    if conflicts and not changes.override:
        raise ConflictError(f"files exist with other content: {', '.join(map(repr, sorted(conflicts)[:5]))}; "
                            "upload with override=true to replace them")
    todo = {}
    for name in files:
        old = before.get(name)
        same = old is not None and old.get("sha256") == staged.get(name, old.get("sha256")) \
            and old.get("splitter") == splitter.model_dump()
        if changes.full or changes.rescan or name in changes.reindex or not same:
            todo[name] = splitter
    return todo


def _parse_here(path: Path, root: Path, splitter: SplitterConfig, max_bytes: int) -> list[Document]:
    return split_documents(load_file(path, root, max_bytes=max_bytes), splitter)


def _split(kb_root: Path, kb: str, incoming: Path, todo: dict[str, SplitterConfig], staged: dict[str, str],
           max_file_bytes: int, progress: Progress | None, parse: Parse,
           skip_unreadable: bool) -> tuple[dict[str, list[Chunk]], dict[str, str]]:
    out: dict[str, list[Chunk]] = {}
    failed: dict[str, str] = {}
    content = kb_store.content_directory(kb_root, kb)
    for done, name in enumerate(sorted(todo), 1):
        root = incoming if name in staged else content
        path = root.joinpath(*name.split("/"))
        if not path.is_file():
            raise DocumentNotFoundError(f"the original of {name!r} is missing from {content}; upload it again")
        try:
            docs = parse(path, root, todo[name], max_file_bytes)
            if not docs:
                raise InvalidRequestError(f"file {name!r} contains no text to index")
        except (UnsupportedDocumentError, InvalidRequestError) as exc:
            if not skip_unreadable:
                raise
            failed[name] = str(exc)
        else:
            out[name] = [Chunk(d.page_content, name, {k: v for k, v in d.metadata.items() if k != "source"})
                         for d in docs]
        if progress:
            progress("load", done, len(todo))
    return out, failed


def _check_size(new_chunks: dict[str, list[Chunk]], limit: int | None) -> None:
    total = sum(map(len, new_chunks.values()))
    if limit is not None and total > limit:
        largest = sorted(new_chunks.items(), key=lambda item: -len(item[1]))[:3]
        named = ", ".join(f"{name}: {len(chunks)}" for name, chunks in largest)
        raise InvalidRequestError(f"this upload splits into {total} chunks ({named}); the limit for one upload is "
                                  f"{limit}: send fewer files at once, or a larger chunk_size")


def _stored_already(staged: dict[str, str], manifest: Manifest | None) -> dict[str, str]:
    known = set(_known_files(manifest))
    return {name: "exists already and was not replaced (override=false); upload with override=true to replace it"
            for name in staged if name in known}


def _without_failed(failed: dict[str, str], files: set[str], todo: dict[str, SplitterConfig],
                    staged: dict[str, str], manifest: Manifest | None
                    ) -> tuple[set[str], dict[str, SplitterConfig], dict[str, str]]:
    """The change without the files that failed: a new one stays out, a stored one keeps its indexed version."""
    known = set(_known_files(manifest))
    kept = {name for name in files if name not in failed or name in known}
    if not kept:
        reasons = "; ".join(f"{name}: {why}" for name, why in sorted(failed.items())[:5])
        raise NothingIndexedError(f"no file could be indexed ({reasons})", failed)
    return (kept, {n: s for n, s in todo.items() if n not in failed},
            {n: d for n, d in staged.items() if n not in failed})


def _assemble(files: set[str], new_chunks: dict[str, list[Chunk]], previous: _Previous, embed: Embed,
              progress: Progress | None, batch_size: int) -> tuple[list[Chunk], np.ndarray, int]:
    pairs: list[tuple[Chunk, np.ndarray | None]] = []
    for name in sorted(files):
        if name in new_chunks:
            pairs += [(c, previous.vector_by_text.get(_text_hash(c.text))) for c in new_chunks[name]]
        else:
            pairs += previous.chunks_by_file.get(name, [])
    if not pairs and previous.manifest is not None and not new_chunks:  # every file deleted: an empty index
        return [], np.zeros((0, previous.manifest.dimension), dtype=np.float32), 0
    if not pairs:
        raise InvalidRequestError("the documents contain no text")
    missing = [i for i, (_, vector) in enumerate(pairs) if vector is None]
    fresh = _embed_all([pairs[i][0].text for i in missing], embed, progress, batch_size)
    filled = dict(zip(missing, fresh, strict=True))
    vectors = [filled[i] if v is None else v for i, (_, v) in enumerate(pairs)]
    return [c for c, _ in pairs], np.stack(vectors).astype(np.float32), len(missing)


def _embed_all(texts: list[str], embed: Embed, progress: Progress | None, batch_size: int) -> np.ndarray:
    parts = []
    for start in range(0, len(texts), batch_size):
        parts.append(np.asarray(embed(texts[start:start + batch_size]), dtype=np.float32))
        if progress:
            progress("embed", min(start + batch_size, len(texts)), len(texts))
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def _move_into_content(kb_root: Path, kb: str, incoming: Path, staged: dict[str, str]) -> None:
    for name in staged:
        target = kb_store.original_path(kb_root, kb, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(incoming.joinpath(*name.split("/")), target)


def _settle_leftovers(kb_root: Path, kb: str) -> None:
    """Incoming folders left by killed builds (this KB's one writer is us, so nothing else uses them):
    originals the newest version indexes move into `content/`; the rest was never published."""
    leftovers = sorted(kb_store.kb_directory(kb_root, kb).glob(f"{INCOMING_PREFIX}*"))
    if not leftovers:
        return
    versions = list_versions(kb_root, kb)
    indexed = Manifest.read(version_directory(kb_root, kb, versions[-1])).files if versions else {}
    for folder in leftovers:
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
            name = path.relative_to(folder).as_posix()
            target = kb_store.original_path(kb_root, kb, name)
            if name in indexed and indexed[name].get("sha256") == _file_hash(path) and \
                    not (target.is_file() and _file_hash(target) == indexed[name].get("sha256")):
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
        shutil.rmtree(folder, ignore_errors=True)


def indexed_original(kb_root: Path, kb: str, name: str, sha256: str | None) -> bytes:
    """The bytes of `name` that the newest version indexed (`sha256`, from its manifest): normally the one
    in `content/`; after a build was killed between publishing and moving, the one it left incoming."""
    stored = kb_store.read_original(kb_root, kb, name) if kb_store.original_path(kb_root, kb, name).is_file() \
        else None
    if sha256 is None or (stored is not None and hashlib.sha256(stored).hexdigest() == sha256):
        if stored is None:
            raise DocumentNotFoundError(f"knowledge base {kb!r} has no original of {name!r}")
        return stored
    for folder in sorted(kb_store.kb_directory(kb_root, kb).glob(f"{INCOMING_PREFIX}*")):
        candidate = folder.joinpath(*name.split("/"))
        try:
            data = candidate.read_bytes()
        except OSError:  # not there, or its build just moved or removed it
            continue
        if hashlib.sha256(data).hexdigest() == sha256:
            return data
    raise DocumentNotFoundError(f"the original of {name!r} in knowledge base {kb!r} does not match its index; "
                                "upload it again")


def _files_info(files: set[str], manifest: Manifest | None, new_chunks: dict[str, list[Chunk]],
                staged: dict[str, str], todo: dict[str, SplitterConfig], kb_root: Path,
                kb: str, incoming: Path) -> dict[str, dict[str, object]]:
    before = manifest.files if manifest else {}
    info: dict[str, dict[str, object]] = {}
    for name in sorted(files):
        if name not in todo and name in before:
            info[name] = before[name]
            continue
        path = incoming.joinpath(*name.split("/")) if name in staged else kb_store.original_path(kb_root, kb, name)
        digest = staged.get(name) or _file_hash(path)
        info[name] = {"sha256": digest, "size": path.stat().st_size, "chunks": len(new_chunks.get(name, [])),
                      "updated_at": time.time(), "splitter": todo[name].model_dump()}
    return info


def _fingerprint(info: dict[str, dict[str, object]], model: str) -> str:
    summary = [(name, i.get("sha256"), i.get("splitter")) for name, i in sorted(info.items())]
    return hashlib.sha256(json.dumps([summary, model], sort_keys=True).encode()).hexdigest()


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_hash(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
