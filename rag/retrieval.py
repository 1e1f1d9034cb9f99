"""The knowledge bases one pipeline version serves: pinned index versions, and followed ones that switch live.

A KB listed with an int is pinned: loaded once, never switched. One listed as "latest", and with
`discover` every other KB under kb_root, is followed: `refresh` (run periodically by the replica)
loads a newly published version, warms it with a real search and swaps it in while searches go on.
A search takes its index once, through a `SharedIndex`, so a swap never changes or closes the index
under it: the replaced index closes when its last search is done.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from rag.config import RetrievalConfig
from rag.errors import KnowledgeBaseNotFoundError, ServiceUnavailableError
from rag.index import KnowledgeBaseIndex, index_device
from rag.kb_versions import Manifest, list_knowledge_bases, list_versions, resolve_version, version_directory
from rag.language import Choice, choose_mode, cjk_share, language_of
from rag.leases import LeaseKeeper
from rag.records import Passage
from rag.shared_index import SharedIndex

logger = logging.getLogger("rag.retrieval")

# (knowledge base, version served before, version served now); None: not served.
Change = tuple[str, int | None, int | None]
# A version that failed to load is retried after the refresh interval, doubling up to this.
RETRY_MAX_S = 60.0


class Retriever:
    """Loads the configured index versions, keeps the followed ones current, and answers vector searches."""

    def __init__(self, config: RetrievalConfig, embedding_model: str, reader_id: str | None = None, *,
                 clock: Callable[[], float] = time.monotonic, model_languages: Sequence[str] = ("en",)) -> None:
        self.config = config
        self.embedding_model = embedding_model
        self.model_languages = tuple(model_languages)
        self.device = index_device(config.device)
        self._served: dict[str, SharedIndex] = {}
        # Guards _served and _closed: a search's lookup and acquire are one step against a swap.
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()
        self._closed = False
        self._retry = _Backoff(config.refresh_interval_s, clock)
        self._missing: set[str] = set()  # listed KBs whose versions vanished, warned about once
        self._leases = LeaseKeeper(config.kb_root_path, reader_id or f"retriever-{uuid.uuid4().hex}",
                                   config.lease_ttl_s, clock)

    @property
    def reader_id(self) -> str:
        return self._leases.reader_id

    def load(self) -> None:
        """Load every listed KB (failing on any), then, with `discover`, the other KBs that load."""
        root = self.config.kb_root_path
        versions = {name: self._start_version(root, name, v) for name, v in self.config.knowledge_bases.items()}
        # Leased before loading, so a prune cannot delete a pinned old version while it loads.
        self._leases.renew(versions)
        served: dict[str, SharedIndex] = {}
        try:
            for name, version in versions.items():
                served[name] = SharedIndex(self._load_index(name, version))
        except BaseException:
            for index in served.values():
                index.retire()
            self._leases.renew({})
            raise
        with self._lock:
            self._served = served
        if self.config.discover:
            with self._refreshing:
                self._follow()
        self._leases.renew(self.knowledge_bases())

    def _start_version(self, root: Path, name: str, wanted: int | str) -> int:
        """A pinned version as pinned; for `latest`, the newest version built with this pipeline's model.
        While a KB is rebuilt with a new model for the version that will run it, a restarted replica of the
        old version starts on the index it can read instead of failing (and follows it as before)."""
        if wanted != "latest":
            return resolve_version(root, name, int(wanted))
        for version in reversed(list_versions(root, name)):
            if Manifest.read(version_directory(root, name, version)).embedding_model == self.embedding_model:
                return version
        return resolve_version(root, name, "latest")  # none matches: loading it says why

    def refresh(self) -> list[Change]:
        """Switch followed KBs to their newest published version, add discovered KBs and drop deleted ones,
        then renew this reader's leases; returns what changed. Safe to run while searches run."""
        with self._refreshing:
            if self._closed:  # a tick that was already on its way when the replica stopped
                return []
            changes = self._follow() if self.config.refresh_interval_s > 0 else []
            self._leases.renew(self.knowledge_bases())
            return changes

    def knowledge_bases(self) -> dict[str, int]:
        """Served knowledge-base names and the index version each one serves now."""
        with self._lock:
            return {name: served.version for name, served in self._served.items()}

    def search(self, knowledge_base: str, vector: np.ndarray, top_k: int | None = None,
               score_threshold: float | None = None, text: str | None = None) -> list[Passage]:
        """The best passages for one query vector; with the query's `text`, in the mode `retrieval.mode`
        gives this KB and question (`rag.language.choose_mode`)."""
        k = top_k if top_k is not None else self.config.top_k
        threshold = score_threshold if score_threshold is not None else self.config.score_threshold
        with self._using(knowledge_base) as index:
            mode = self.mode_for(index, text).mode if text else "dense"
            if mode == "dense":
                return index.search(vector, k, threshold)[0]
            return index.hybrid_search(vector, text or "", k, threshold, candidates=self.config.hybrid_candidates,
                                       dense_weight=self.config.dense_weight, lexical_led=mode == "lexical")

    def mode_for(self, index: KnowledgeBaseIndex, text: str | None = None) -> Choice:
        query_language = language_of(cjk_share(text)) if text else None
        return choose_mode(self.config.mode, self.model_languages, index.manifest.main_language, query_language)

    def describe(self) -> dict[str, dict[str, Any]]:
        """Per served KB: its index version, language and the retrieval its questions get, with why."""
        with self._holding_all() as indexes:
            return {name: {"version": index.version, "language": index.manifest.main_language,
                           "mode": (choice := self.mode_for(index)).mode, "why": choice.why}
                    for name, index in indexes.items()}

    def warmup(self) -> None:
        """A real search on every loaded index, so FAISS and SQLite pages are touched before traffic."""
        with self._holding_all() as indexes:
            for name, index in indexes.items():
                _warm(name, index)

    def check_health(self) -> None:
        with self._holding_all() as indexes:
            if not indexes:
                raise ServiceUnavailableError("no knowledge base index is loaded")
            for index in indexes.values():
                index.check_health()

    def close(self) -> None:
        """Unload everything (each index once its running searches are done) and remove the leases."""
        with self._lock:
            self._closed = True
            served, self._served = self._served, {}
        for index in served.values():
            index.retire()
        self._leases.close()

    def _follow(self) -> list[Change]:
        changes = [self._follow_one(name) for name in self._followed()]
        return [change for change in changes if change is not None]

    def _followed(self) -> list[str]:
        listed = self.config.knowledge_bases
        following = [name for name, version in listed.items() if version == "latest"]
        if self.config.discover:
            found = set(list_knowledge_bases(self.config.kb_root_path)) | set(self.knowledge_bases())
            following += sorted(found - set(listed))
        return following

    def _follow_one(self, name: str) -> Change | None:
        versions = list_versions(self.config.kb_root_path, name)
        current = self.knowledge_bases().get(name)
        if not versions:
            return self._vanished(name, current)
        self._missing.discard(name)
        # Also back to an older one when the served version was deleted (a KB re-ingested from scratch).
        newest = versions[-1]
        if current is not None and (newest <= current and current in versions):
            return None
        if not self._retry.due(name, newest):
            return None
        index = self._try_load(name, newest, current)
        return None if index is None else self._swap(name, index)

    def _vanished(self, name: str, current: int | None) -> Change | None:
        if name in self.config.knowledge_bases:
            # Listed: the config promises it, so keep answering from memory rather than 404 every question.
            if name not in self._missing:
                self._missing.add(name)
                logger.warning("knowledge base %r has no published version under %s any more; still serving "
                               "version %s from memory", name, self.config.kb_root_path, current)
            return None
        with self._lock:
            dropped = self._served.pop(name, None)
        if dropped is None:
            return None
        dropped.retire()
        logger.info("knowledge base %r was deleted; no longer serving version %d", name, dropped.version)
        return (name, dropped.version, None)

    def _try_load(self, name: str, version: int, current: int | None) -> KnowledgeBaseIndex | None:
        try:
            index = self._load_index(name, version)
            try:
                _warm(name, index)
            except BaseException:
                index.close()
                raise
        except Exception as exc:
            delay = self._retry.failed(name, version)
            logger.warning("knowledge base %r: cannot load version %d, still serving version %s, next try in "
                           "%.1f s: %s", name, version, current, delay, exc)
            return None
        self._retry.forget(name)
        return index

    def _swap(self, name: str, index: KnowledgeBaseIndex) -> Change | None:
        fresh = SharedIndex(index)
        with self._lock:
            closed = self._closed
            old = None if closed else self._served.get(name)
            if not closed:
                self._served[name] = fresh
        if closed:  # closed while this version loaded
            fresh.retire()
            return None
        previous = None if old is None else old.version
        if old is not None:
            old.retire()
        logger.info("knowledge base %r: now serving version %d (was %s)", name, index.version, previous)
        return (name, previous, index.version)

    def _load_index(self, name: str, version: int) -> KnowledgeBaseIndex:
        return KnowledgeBaseIndex.load(self.config.kb_root_path, name, version, device=self.device,
                                       expected_model=self.embedding_model)

    @contextmanager
    def _using(self, name: str) -> Iterator[KnowledgeBaseIndex]:
        """The index serving `name` now, kept open (even if swapped out meanwhile) until the block ends."""
        with self._lock:
            served = self._served.get(name)
            if served is None:
                # Which knowledge bases exist is for callers with a key to ask (/v1/models), not for an error to tell.
                raise KnowledgeBaseNotFoundError(
                    f"unknown knowledge base {name[:64]!r}; GET /v1/models lists the ones you may use")
            index = served.acquire()
        try:
            yield index
        finally:
            served.release()

    @contextmanager
    def _holding_all(self) -> Iterator[dict[str, KnowledgeBaseIndex]]:
        with self._lock:
            held = dict(self._served)
            indexes = {name: served.acquire() for name, served in held.items()}
        try:
            yield indexes
        finally:
            for served in held.values():
                served.release()


def _warm(name: str, index: KnowledgeBaseIndex) -> None:
    probe = np.full((1, index.manifest.dimension), index.manifest.dimension ** -0.5, dtype=np.float32)
    # An empty index (every file deleted) is meant to find nothing; any other must find something.
    if not index.search(probe, 1)[0] and index.manifest.count:
        raise ServiceUnavailableError(f"warm-up search on knowledge base {name!r} found nothing")


class _Backoff:
    """When to try again to load a version that failed: after the refresh interval, doubling up to RETRY_MAX_S."""

    def __init__(self, base_s: float, clock: Callable[[], float]) -> None:
        self._base_s = base_s
        self._clock = clock
        self._failures: dict[str, tuple[int, int, float]] = {}  # kb -> (version, failures, next try)

    def due(self, name: str, version: int) -> bool:
        failed = self._failures.get(name)
        # A newer version is tried at once: it may well be the fix of the broken one.
        return failed is None or failed[0] != version or self._clock() >= failed[2]

    def failed(self, name: str, version: int) -> float:
        previous = self._failures.get(name)
        count = previous[1] + 1 if previous is not None and previous[0] == version else 1
        delay = min(RETRY_MAX_S, max(self._base_s, 0.001) * 2.0 ** min(count - 1, 30))
        self._failures[name] = (version, count, self._clock() + delay)
        return delay

    def forget(self, name: str) -> None:
        self._failures.pop(name, None)
