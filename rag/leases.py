"""Reader leases on index versions, so old versions can be pruned without pulling one from under a replica.

A reader (a Retriever replica) keeps one small file per knowledge base it serves,
`<kb_root>/<kb>/.readers/<reader_id>.json` = `{"version": N, "time": <unix seconds>}`, and rewrites it
as a heartbeat. A lease is fresh while its `time` is less than `ttl_s` old. The time is the one the
reader wrote, not the file's mtime: on a shared filesystem mtime is the server's clock or the
writer's depending on the protocol, while the written time is always the reader's wall clock, so
only the clocks of the nodes have to agree (NTP), not the filesystem's.

`prune_versions` deletes the versions that are neither among the newest few nor leased. It only
ever considers versions listed before it read the leases, and never the newest, so a concurrent
publish (a new, higher version) or a replica that just switched to the newest is never affected.
A replica writes its lease before it loads a pinned old version, which leaves one race: a prune
that read the leases just before that write can still delete the version (the replica then fails
to start and is restarted, and finds the version gone, which is what the prune was asked for).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Collection
from pathlib import Path

from rag.config import LEASE_HEARTBEATS_PER_TTL, is_kb_name
from rag.errors import InvalidRequestError
from rag.kb_versions import Manifest, kb_directory, list_versions, version_directory

logger = logging.getLogger("rag.leases")

READERS_DIR = ".readers"
# A reader id becomes a file name: no separators, no leading dot (hidden names are temporary files).
READER_ID_PATTERN = r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}"
_SUFFIX = ".json"
_PRUNED_PREFIX = ".pruned-"


def check_reader_id(reader_id: object) -> str:
    """`reader_id` itself when it is safe as a file name; else `InvalidRequestError`."""
    if isinstance(reader_id, str) and re.fullmatch(READER_ID_PATTERN, reader_id):
        return reader_id
    raise InvalidRequestError(f"invalid reader id {reader_id!r:.80}: use 1-128 letters, digits, '_', '-' or '.', "
                              "not starting with '.'")


def write_lease(kb_root: Path, reader_id: str, uses: dict[str, int], *, now: float | None = None) -> None:
    """Announce that `reader_id` serves `uses` (KB name -> version); drop its leases on every other KB."""
    check_reader_id(reader_id)
    stamp = time.time() if now is None else now
    for kb, version in uses.items():
        _write_atomically(_lease_path(kb_root, kb, reader_id), {"version": int(version), "time": stamp})
    for kb in _leased_knowledge_bases(kb_root, reader_id):
        if kb not in uses:
            _lease_path(kb_root, kb, reader_id).unlink(missing_ok=True)


def remove_leases(kb_root: Path, reader_id: str) -> None:
    """Drop every lease of `reader_id` (a reader that stops)."""
    check_reader_id(reader_id)
    for kb in _leased_knowledge_bases(kb_root, reader_id):
        _lease_path(kb_root, kb, reader_id).unlink(missing_ok=True)


def versions_in_use(kb_root: Path, kb: str, ttl_s: float, *, now: float | None = None) -> set[int]:
    """Versions of `kb` named by a lease written less than `ttl_s` ago."""
    stamp = time.time() if now is None else now
    return {version for _, version, written in _leases(kb_root, kb)
            if version is not None and stamp - written < ttl_s}


def prune_versions(kb_root: Path, kb: str, keep: int, ttl_s: float, *, now: float | None = None,
                   protected: Collection[int] = (), newest_for_models: Collection[str] = ()) -> list[int]:
    """Delete the versions of `kb` that are not among the newest `keep`, not leased, not `protected`
    (named by a deployed version's config: pinned, or pinned by a rollout in progress) and not the newest
    built with one of `newest_for_models` (the embedding models deployed versions use: a version switching
    back to a model must find an index it can read); returns them.

    Stale leases and leftovers of interrupted prunes are removed as well.
    """
    if keep < 1:
        raise InvalidRequestError(f"keep must be >= 1 (the newest version is never pruned), got {keep}")
    stamp = time.time() if now is None else now
    # List before reading leases: a version a reader starts to lease after this is newer, so kept.
    versions = list_versions(kb_root, kb)
    protected = (set(versions[-keep:]) | versions_in_use(kb_root, kb, ttl_s, now=stamp) | set(protected)
                 | _newest_per_model(kb_root, kb, versions, set(newest_for_models)))
    deleted = [v for v in versions if v not in protected and _delete_version(kb_root, kb, v)]
    _remove_stale_leases(kb_root, kb, ttl_s, stamp)
    _remove_pruned_leftovers(kb_root, kb)
    return deleted


def _newest_per_model(kb_root: Path, kb: str, versions: list[int], models: set[str]) -> set[int]:
    newest: dict[str, int] = {}
    for version in versions:  # oldest first: the last one seen per model is its newest
        try:
            model = Manifest.read(version_directory(kb_root, kb, version)).embedding_model
        except (OSError, ValueError, TypeError):
            continue
        if model in models:
            newest[model] = version
    return set(newest.values())


def _lease_path(kb_root: Path, kb: str, reader_id: str) -> Path:
    return kb_directory(kb_root, kb) / READERS_DIR / f"{reader_id}{_SUFFIX}"


def _leased_knowledge_bases(kb_root: Path, reader_id: str) -> list[str]:
    # By the lease files, not list_knowledge_bases: a KB whose versions are all gone still holds our lease.
    names = {p.parent.parent.name for p in Path(kb_root).glob(f"*/{READERS_DIR}/{reader_id}{_SUFFIX}")}
    return sorted(n for n in names if is_kb_name(n))


def _write_atomically(path: Path, payload: dict[str, float | int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(payload), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _leases(kb_root: Path, kb: str) -> list[tuple[Path, int | None, float]]:
    """(path, version, time written) of each lease of `kb`; an unreadable one has no version and its mtime."""
    folder = kb_directory(kb_root, kb) / READERS_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if path.name.startswith(".") or not path.name.endswith(_SUFFIX):
            continue
        with contextlib.suppress(FileNotFoundError):  # its reader removed it meanwhile
            found.append((path, *_read_lease(path)))
    return found


def _read_lease(path: Path) -> tuple[int | None, float]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return int(data["version"]), float(data["time"])
    except (ValueError, KeyError, TypeError) as exc:
        # Written by something else than write_lease: protects nothing, and goes once it is old.
        logger.warning("ignoring unreadable lease %s: %s", path, exc)
        return None, path.stat().st_mtime


def _delete_version(kb_root: Path, kb: str, version: int) -> bool:
    # Renamed first, so the version disappears at once rather than file by file under a reader listing it.
    source = version_directory(kb_root, kb, version)
    trash = source.with_name(f"{_PRUNED_PREFIX}{source.name}-{uuid.uuid4().hex}")
    try:
        os.rename(source, trash)
    except FileNotFoundError:  # another prune took it
        return False
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _remove_stale_leases(kb_root: Path, kb: str, ttl_s: float, now: float) -> None:
    folder = kb_directory(kb_root, kb) / READERS_DIR
    for path, _, written in _leases(kb_root, kb):
        if now - written >= ttl_s:
            path.unlink(missing_ok=True)
    if folder.is_dir():
        # Temporary files of writers that died between write and rename.
        for path in folder.glob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime >= ttl_s:
                    path.unlink()


def _remove_pruned_leftovers(kb_root: Path, kb: str) -> None:
    for path in kb_directory(kb_root, kb).glob(f"{_PRUNED_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


class LeaseKeeper:
    """One reader's leases: rewritten when its versions change, else at most once per `ttl_s / 3`; removed on close.

    Best effort: a reader that cannot write under kb_root (a read-only mount) loses the protection
    of its versions from pruning, which is logged, not its ability to serve.
    """

    def __init__(self, kb_root: Path, reader_id: str, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kb_root = kb_root
        self.reader_id = check_reader_id(reader_id)
        self._every_s = ttl_s / LEASE_HEARTBEATS_PER_TTL
        self._clock = clock
        self._written: dict[str, int] | None = None
        self._written_at = 0.0
        self._failing = False
        self._closed = False
        # A heartbeat from the refresh thread must not rewrite leases that close() just removed.
        self._lock = threading.Lock()

    def renew(self, uses: dict[str, int]) -> None:
        with self._lock:
            if self._closed or (uses == self._written and self._clock() - self._written_at < self._every_s):
                return
            if self._attempt("write", lambda: write_lease(self.kb_root, self.reader_id, uses)):
                self._written, self._written_at = dict(uses), self._clock()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._attempt("remove", lambda: remove_leases(self.kb_root, self.reader_id))

    def _attempt(self, what: str, action: Callable[[], None]) -> bool:
        try:
            action()
        except OSError as exc:
            if not self._failing:  # once per outage, not once per heartbeat
                logger.warning("cannot %s the leases of reader %s under %s, so pruning may delete the index "
                               "versions it serves: %s", what, self.reader_id, self.kb_root, exc)
            self._failing = True
            return False
        self._failing = False
        return True
