"""Knowledge-base management behind the HTTP API, free of Ray: which version's settings and Embedder an
update uses, one writer per KB, and jobs a client can wait for or poll.

The Serve deployment (`kb_manager_deployment.py`) gives it `Stages`: each pipeline version's config and a
way to embed through that version's Embedder, so an ingest runs the model, batching and device queries
use. Temporary KBs (Chatchat's file chat) are made, used and swept here too (`temporary_kbs` keeps which);
what listings show is read by `kb_listing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from deployments.gateway.kb_listing import describe_all, embed_model_of, stored_files, with_chatchat_names
from deployments.gateway.statuses import status_for
from deployments.gateway.temporary_kbs import TemporaryKbs
from rag import golden, kb_store
from rag.config import KnowledgeBaseSettings, PipelineConfig, SplitterConfig, check_kb_name
from rag.errors import (
    ConflictError,
    InvalidRequestError,
    KnowledgeBaseNotFoundError,
    OverloadedError,
    RagError,
    ServiceUnavailableError,
)
from rag.index import list_chunks
from rag.kb_build import Changes, Embed, NothingIndexedError, indexed_original, update_knowledge_base
from rag.kb_jobs import Job, JobBoard, interrupted, without_server_paths
from rag.kb_versions import list_versions
from rag.parsing import Parser

logger = logging.getLogger("rag.knowledge_bases")
LISTED_CHUNKS_MAX = 1000  # a file's chunks listed by search_docs without a query
SPOOL_SLACK_S = 600.0  # a spool folder this much older than the longest upload belongs to no upload


class Stages(Protocol):
    async def config(self, version: str) -> PipelineConfig: ...

    async def deployed(self) -> list[str]:
        """Every pipeline version deployed now, with or without traffic."""
        ...

    def embedder(self, version: str) -> Embed:
        """A blocking embed function for the build's worker thread."""


@dataclass(frozen=True)
class Keep:
    """What pruning must keep besides the newest versions and the leased ones."""

    pinned: set[int]  # index versions named by a deployed version's config
    models: set[str]  # embedding models of the deployed versions: the newest index of each stays


class KnowledgeBaseService:
    def __init__(self, settings: KnowledgeBaseSettings, stages: Stages,
                 after_publish: Callable[[Path, str, int, float, Keep], None] | None = None) -> None:
        self.settings = settings
        self.jobs = JobBoard()
        self._stages = stages
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._spools: set[Path] = set()  # the spool folders of jobs not ended yet
        self._after_publish = after_publish
        self.parser = Parser(settings.parsing)
        self.temporary = TemporaryKbs(settings.temporary)
        self._stopping = False

    async def _prune(self, root: Path, kb: str, config: PipelineConfig) -> None:
        """Old index versions go, except what a deployed version's config names (a pin, a rollout's pin)
        and the newest one per embedding model in use, whatever the leases say. When a deployed version's
        config cannot be read, nothing is pruned this time: what it pins is unknown."""
        try:
            configs = [await self._stages.config(v) for v in await self._stages.deployed()]
        except Exception as exc:
            logger.warning("event=PRUNE_SKIPPED kb=%s reason=%r", kb, exc)
            return
        keep = Keep({p for c in configs if isinstance(p := c.retrieval.knowledge_bases.get(kb), int)},
                    {c.embedding.vector_space for c in configs})
        assert self._after_publish is not None
        await asyncio.to_thread(self._after_publish, root, kb, self.settings.keep_versions,
                                config.retrieval.lease_ttl_s, keep)

    async def _choose(self, versions: list[str], kb: str | None = None) -> tuple[str, PipelineConfig]:
        """The first serving version (heaviest first) that embeds with the KB's model."""
        if not versions:
            raise ServiceUnavailableError("no pipeline version is serving yet; retry shortly")
        configs = [(v, await self._stages.config(v)) for v in versions]
        root = configs[0][1].retrieval.kb_root_path
        wanted = embed_model_of(root, kb) if kb else None
        for version, config in configs:
            if wanted is None or config.embedding.vector_space == wanted:
                return version, config
        raise ConflictError(f"knowledge base {kb!r} embeds with {wanted!r}, which no serving version runs")

    async def kb_root(self, versions: list[str]) -> Path:
        return (await self._choose(versions))[1].retrieval.kb_root_path

    async def list_knowledge_bases(self, versions: list[str]) -> list[dict[str, Any]]:
        """Every KB with its description, index version, language, and the retrieval its questions get
        from the heaviest serving version (and why)."""
        config = (await self._choose(versions))[1]
        return await asyncio.to_thread(describe_all, config)

    async def create(self, kb: str, kb_info: str, embed_model: str | None, versions: list[str]) -> dict[str, Any]:
        """A new, empty KB. An `embed_model` no serving version runs (a Chatchat client always sends its
        own configured one) is not refused: the KB embeds with the heaviest serving version's model, and
        the answer's `note` says so; `embed_model` in the answer and in kb.json is the model really used."""
        if kb_store.is_temporary(check_kb_name(kb)):
            raise ConflictError(f"knowledge base names of the form {kb[:5]}<32 hex digits> are reserved for "
                                "temporary knowledge bases (upload_temp_docs); choose another name")
        configs = [await self._stages.config(v) for v in versions] if versions else []
        models = sorted({c.embedding.vector_space for c in configs})
        if not configs:
            raise ServiceUnavailableError("no pipeline version is serving yet; retry shortly")
        model = embed_model if embed_model in models else configs[0].embedding.vector_space
        async with self._lock(kb):
            meta = await asyncio.to_thread(kb_store.create, configs[0].retrieval.kb_root_path, kb, kb_info, model)
        created = {"knowledge_base_name": meta.name, "kb_info": meta.kb_info, "embed_model": meta.embed_model}
        if embed_model not in (None, model):
            created["note"] = (f"embed_model {embed_model[:80]!r} is not run by any serving version (they run "
                               f"{', '.join(models)}), so this knowledge base embeds with {model!r}")
        return created

    async def update_info(self, kb: str, kb_info: str, versions: list[str]) -> dict[str, Any]:
        """Chatchat's update_info: the KB's description (what an agent reads to choose a KB), nothing else."""
        _public(kb)
        root = await self.kb_root(versions)
        async with self._lock(kb):
            meta = await asyncio.to_thread(kb_store.update_info, root, kb, kb_info)
        return {"knowledge_base_name": meta.name, "kb_info": meta.kb_info, "embed_model": meta.embed_model}

    async def delete(self, kb: str, versions: list[str]) -> None:
        """Refused (409) while a serving version names the KB: its replicas would keep answering from
        deleted files until their next start, which would then fail on the missing KB."""
        _public(kb)
        root = await self.kb_root(versions)
        naming = [v for v in versions if kb in (await self._stages.config(v)).retrieval.knowledge_bases]
        if naming:
            raise ConflictError(f"knowledge base {kb!r} is named in retrieval.knowledge_bases of the serving "
                                f"version(s) {', '.join(naming)}: roll out versions without it, then delete it")
        async with self._lock(kb):
            await asyncio.to_thread(kb_store.delete, root, kb)

    async def list_files(self, kb: str, versions: list[str]) -> list[dict[str, Any]]:
        _public(kb)
        root = await self.kb_root(versions)
        kb_store.require(root, kb)
        return with_chatchat_names(kb, await asyncio.to_thread(stored_files, root, kb))

    async def read_eval_set(self, kb: str, versions: list[str]) -> list[dict[str, Any]]:
        _public(kb)
        root = await self.kb_root(versions)
        kb_store.require(root, kb)
        items = await asyncio.to_thread(golden.read_items, root, kb)
        return [i.model_dump() for i in items]

    async def write_eval_set(self, kb: str, items: list[dict[str, Any]], versions: list[str]) -> dict[str, Any]:
        """Replace the KB's golden set (validated first: a bad item leaves the stored set as it was); says
        which named files the KB does not hold, since those questions can only score 0."""
        _public(kb)
        checked = golden.check_items(items)
        root = await self.kb_root(versions)
        kb_store.require(root, kb)
        async with self._lock(kb):
            await asyncio.to_thread(golden.write_items, root, kb, checked)
        stored = {row["file_name"] for row in await asyncio.to_thread(stored_files, root, kb)}
        return {"count": len(checked), "files_not_in_kb": golden.files_not_in(checked, stored)}

    async def download(self, kb: str, name: str, versions: list[str]) -> bytes:
        _public(kb)
        root = await self.kb_root(versions)
        kb_store.require(root, kb)
        listed = {f["file_name"]: f for f in await asyncio.to_thread(stored_files, root, kb)}
        row = listed.get(_stored_name(name))
        if row is None:
            raise KnowledgeBaseNotFoundError(f"knowledge base {kb!r} has no file {name[:80]!r}")
        # The bytes the served index was built from (an original not indexed, delete_content=false: as stored).
        return await asyncio.to_thread(indexed_original, root, kb, name, row.get("sha256") if row["in_db"] else None)

    async def list_chunks(self, kb: str, file_name: str, metadata: dict[str, Any], versions: list[str]
                          ) -> list[dict[str, Any]]:
        """Chatchat's search_docs without a query: the chunks of the files `file_name` matches (SQL
        wildcards) whose metadata has `metadata`'s first-level values, from the KB's newest index version,
        at most `LISTED_CHUNKS_MAX`."""
        _public(kb)
        root = await self.kb_root(versions)
        kb_store.require(root, kb)
        newest = list_versions(root, kb)
        if not newest:
            return []
        chunks = await asyncio.to_thread(list_chunks, root, kb, newest[-1], file_name, LISTED_CHUNKS_MAX)
        listed = []
        for i, chunk in chunks:
            described = {**chunk.metadata, "source": chunk.source}
            if all(described.get(k) == v for k, v in metadata.items()):
                listed.append({"id": str(i), "page_content": chunk.text, "score": None, "metadata": described})
        return listed

    async def spool(self, versions: list[str]) -> str:
        """A new folder for one upload's files (the gateway streams them there and submits their paths),
        after removing what stopped uploads left behind."""
        root = await self.kb_root(versions)
        stale_s = self.settings.upload_timeout_s + SPOOL_SLACK_S  # an upload still arriving is younger
        removed = await asyncio.to_thread(kb_store.sweep_spools, root, stale_s, self._spools)
        if removed:
            logger.info("event=KB_SPOOLS_REMOVED count=%d", len(removed))
        return str(await asyncio.to_thread(kb_store.new_spool, root))

    async def submit(self, kind: str, kb: str, changes: Changes, splitter: dict[str, int] | None,
                     versions: list[str]) -> str:
        """Check what can be checked now (the KB, the splitter), then run the change as a job. A job
        owns its spool folder from here on, and removes it when it ends, whatever the outcome."""
        _public(kb)
        version, config = await self._choose(versions, kb)
        return self._submit(kind, kb, changes, splitter, version, config)

    def _submit(self, kind: str, kb: str, changes: Changes, splitter: dict[str, int] | None, version: str,
                config: PipelineConfig, max_chunks: int | None = None) -> str:
        root = config.retrieval.kb_root_path
        paths = [p for p in changes.add.values() if not isinstance(p, bytes)]
        if paths or changes.spool is not None:  # files come by path only from an upload's own spool
            if changes.spool is None:
                raise InvalidRequestError("files sent by path must lie in an upload's spool folder")
            kb_store.check_spool(root, changes.spool, paths)
        if not kb_store.exists(root, kb):
            raise KnowledgeBaseNotFoundError(f"no knowledge base {kb!r}; create it first")
        chosen = _splitter(config.splitter, splitter)
        if self._stopping:
            raise ServiceUnavailableError("the knowledge-base manager is stopping; send the change again shortly")
        waiting = self.jobs.unfinished()  # queued jobs hold their files on disk: their number is bounded
        for_kb = sum(1 for job in waiting if job.knowledge_base == kb)
        if for_kb >= self.settings.max_jobs_per_kb or len(waiting) >= self.settings.max_jobs:
            raise OverloadedError(f"{for_kb} jobs are queued or running for knowledge base {kb!r} and {len(waiting)} "
                                  f"in all (limits {self.settings.max_jobs_per_kb} and {self.settings.max_jobs}); "
                                  "retry once one has finished")
        if kind == "upload_docs":
            changes = replace(changes, max_chunks=max_chunks or self.settings.max_chunks_per_upload)
        job = self.jobs.create(kb, kind, root)
        job.files_total = len(changes.add) + len(changes.reindex)
        if changes.spool is not None:
            self._spools.add(changes.spool)
        task = asyncio.create_task(self._run(job, root, kb, config, changes, chosen, self._stages.embedder(version)),
                                   name=job.id)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job.id

    async def upload_temporary(self, temp_id: str | None, changes: Changes, splitter: dict[str, int] | None,
                               versions: list[str]) -> dict[str, str]:
        """Chatchat's upload_temp_docs: the files go into a new temporary KB (or, given the id of one this
        manager holds, into that one, replacing files of the same name), built by an upload job like any
        other. Returns its id and the job."""
        version, config = await self._discovering(versions)
        root = config.retrieval.kb_root_path
        kb = kb_store.temporary_name(temp_id) if temp_id else None
        if kb is None or not self.temporary.touch(kb) or not kb_store.exists(root, kb):
            await self.sweep_temporary(root)
            kb = kb_store.new_temporary_name()
            self.temporary.reserve(kb)
            try:
                async with self._lock(kb):
                    await asyncio.to_thread(kb_store.create, root, kb, "temporary (file chat)",
                                            config.embedding.vector_space)
            except BaseException:
                self.temporary.discard(kb)
                raise
            logger.info("event=TEMP_KB_CREATED kb=%s count=%d", kb, len(self.temporary))
        try:
            job_id = self._submit("upload_docs", kb, replace(changes, override=True), splitter, version, config,
                                  self.settings.temporary.max_chunks)
        except BaseException:
            await self._drop_if_empty(root, kb)
            raise
        return {"id": kb_store.temporary_id(kb), "knowledge_base_name": kb, "job_id": job_id}

    async def use_temporary(self, temp_id: str, versions: list[str]) -> str:
        """The KB name of a temporary KB to chat over or search, marked as used now; 404 once it is gone."""
        kb = kb_store.temporary_name(temp_id)
        if kb is None or not self.temporary.touch(kb):
            raise KnowledgeBaseNotFoundError(
                f"no temporary knowledge base {temp_id[:40]!r}: it was deleted after "
                f"{self.settings.temporary.idle_ttl_s:g} s unused or when the service restarted (or never existed); "
                "upload the files again with upload_temp_docs")
        return kb

    async def sweep_temporary(self, root: Path | None = None) -> list[str]:
        """Delete the temporary KBs that are idle past their TTL or from before this manager started, under
        `root` or (None) every deployed version's kb_root. Returns their names."""
        roots = {root} if root else {(await self._stages.config(v)).retrieval.kb_root_path
                                      for v in await self._stages.deployed()}
        if not roots:
            raise ServiceUnavailableError("no pipeline version is deployed: no kb_root to sweep yet")
        busy = {job.knowledge_base for job in self.jobs.unfinished()}
        deleted = []
        for where in roots:
            on_disk = await asyncio.to_thread(kb_store.list_names, where, temporary=True)
            for kb, why in self.temporary.to_delete(on_disk, busy).items():
                await self._delete_temporary(where, kb, why)
                deleted.append(kb)
        return deleted

    async def _delete_temporary(self, root: Path, kb: str, why: str) -> None:
        async with self._lock(kb):
            with contextlib.suppress(KnowledgeBaseNotFoundError):
                await asyncio.to_thread(kb_store.delete, root, kb)
        self.temporary.discard(kb)
        self._locks.pop(kb, None)
        logger.info("event=TEMP_KB_DELETED kb=%s reason=%s", kb, why)

    async def _discovering(self, versions: list[str]) -> tuple[str, PipelineConfig]:
        """The first serving version that serves KBs made after it started (`retrieval.discover`): only
        such a version can answer from a temporary KB."""
        if not versions:
            raise ServiceUnavailableError("no pipeline version is serving yet; retry shortly")
        for version in versions:
            config = await self._stages.config(version)
            if config.retrieval.discover:
                return version, config
        raise ConflictError("no serving version serves knowledge bases made while it runs "
                            "(retrieval.discover: true), so none could answer from a temporary one")

    async def wait(self, job_id: str, timeout_s: float, versions: list[str]) -> dict[str, Any]:
        """The job's view once it finished or `timeout_s` passed; a failed job raises its error."""
        job = self.jobs.get(job_id)
        if job is None:  # started by a manager before a restart: its record says how it ended
            return await self.job(job_id, versions)
        deadline = time.monotonic() + timeout_s
        while not job.finished and time.monotonic() < deadline:
            await asyncio.sleep(min(0.1, max(deadline - time.monotonic(), 0)))
        # The result is in before the job's cleanup (its spool, a temporary KB that indexed nothing) is done:
        # the answer waits for that too, so what it says is what is on disk.
        if job.finished and (run := next((t for t in self._tasks if t.get_name() == job_id), None)) is not None:
            await asyncio.wait({run}, timeout=max(deadline - time.monotonic(), 0.001))
        if job.state == "failed" and job.exception is not None:
            raise job.exception
        return job.view()

    async def job(self, job_id: str, versions: list[str]) -> dict[str, Any]:
        job = self.jobs.get(job_id)
        if job is not None:
            return job.view()
        recorded = await asyncio.to_thread(self.jobs.recorded, await self.kb_root(versions), job_id)
        if recorded is None:
            raise KnowledgeBaseNotFoundError(f"no job {job_id[:40]!r} (jobs are kept for a while after they end)")
        return recorded

    async def stop(self, drain_s: float) -> None:
        """Refuse new jobs, give running and queued ones `drain_s` to finish, and record the rest as
        interrupted, so that a client polling after the restart learns what happened."""
        self._stopping = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=drain_s)
        for job in self.jobs.unfinished():
            public = interrupted(job.view())
            job.state, job.status, job.error = public["state"], public["status"], public.get("error")
            job.interrupted, job.finished_at = True, time.time()
            job.result = {**job.result, **{k: public[k] for k in ("index_version", "published", "note") if k in public}}
            await asyncio.to_thread(job.save)
            logger.warning("event=KB_JOB_INTERRUPTED job=%s kb=%s published_version=%s", job.id,
                           job.knowledge_base, job.published_version)

    def _lock(self, kb: str) -> asyncio.Lock:
        return self._locks.setdefault(kb, asyncio.Lock())

    async def _run(self, job: Job, root: Path, kb: str, config: PipelineConfig, changes: Changes,
                   splitter: SplitterConfig, embed: Embed) -> None:
        try:
            await self._build(job, root, kb, config, changes, splitter, embed)
        finally:
            if changes.spool is not None:
                await asyncio.to_thread(kb_store.remove_spool, root, changes.spool)
                self._spools.discard(changes.spool)
            if kb_store.is_temporary(kb):
                self.temporary.touch(kb)  # its idle time starts when its files are in
                await self._drop_if_empty(root, kb)

    async def _drop_if_empty(self, root: Path, kb: str) -> None:
        """A temporary KB none of whose files could be indexed has nothing to chat over: it goes at once
        rather than hold a place until its TTL."""
        if not kb_store.is_temporary(kb) or list_versions(root, kb) or any(
                job.knowledge_base == kb for job in self.jobs.unfinished()):
            return
        await self._delete_temporary(root, kb, "nothing_indexed")

    async def _build(self, job: Job, root: Path, kb: str, config: PipelineConfig, changes: Changes,
                     splitter: SplitterConfig, embed: Embed) -> None:
        async with self._lock(kb):
            if self._stopping:  # stop() records it as interrupted before it started
                return
            job.state, job.started_at = "running", time.time()
            await asyncio.to_thread(job.save)
            try:
                if not kb_store.exists(root, kb):  # deleted while this job waited for the lock: not recreated
                    raise KnowledgeBaseNotFoundError(f"knowledge base {kb!r} was deleted before this job ran")
                # Over HTTP a file that cannot be indexed fails alone (Chatchat's failed_files); the rest lands.
                result = await asyncio.to_thread(
                    update_knowledge_base, root, kb, config, replace(changes, skip_unreadable=True), embed=embed,
                    splitter=splitter, progress=job.progress, max_file_bytes=self.settings.max_file_bytes,
                    batch_size=self.settings.embed_batch, parse=self.parser)
                if result.created and self._after_publish:
                    await self._prune(root, kb, config)
            except NothingIndexedError as exc:  # every file failed alone: done, with each one's reason
                job.state, job.status = "done", 200
                job.result = {"index_version": None, "published": False, "chunks": 0, "embedded": 0, "reused": 0,
                              "changed_files": [], "deleted_files": [],
                              "failed_files": _failed_files(changes, exc.failed, root)}
                logger.info("event=KB_JOB_DONE job=%s kb=%s kind=%s version=none failed=%d", job.id, kb, job.kind,
                            len(exc.failed))
            except Exception as exc:
                # The client sees the library's own words without server paths; anything else (an OSError,
                # a bug) only as a 500 that points to the log, where the whole error is.
                public = (type(exc)(without_server_paths(str(exc), root)) if isinstance(exc, RagError)
                          else RagError(f"the build failed inside the service; the manager's log has job {job.id}"))
                job.state, job.error, job.exception = "failed", str(public), public
                job.status = status_for(exc) if isinstance(exc, RagError) else 500
                logger.warning("event=KB_JOB_FAILED job=%s kb=%s kind=%s error=%r", job.id, kb, job.kind, exc)
            else:
                job.state, job.status = "done", 200
                job.result = {"index_version": result.manifest.version, "published": result.created,
                              "chunks": result.manifest.count, "embedded": result.embedded,
                              "reused": result.reused, "changed_files": list(result.changed),
                              "deleted_files": list(result.deleted),
                              "failed_files": _failed_files(changes, result.failed, root)}
                logger.info("event=KB_JOB_DONE job=%s kb=%s kind=%s version=%d embedded=%d reused=%d failed=%d",
                            job.id, kb, job.kind, result.manifest.version, result.embedded, result.reused,
                            len(result.failed))
            finally:
                job.finished_at = time.time()
                await asyncio.to_thread(job.save)


def _public(kb: str) -> str:
    """A KB name a client may manage: a temporary KB is reachable only through its own routes, by id."""
    if kb_store.is_temporary(check_kb_name(kb)):
        raise KnowledgeBaseNotFoundError(f"no knowledge base {kb!r}")
    return kb


def _failed_files(changes: Changes, failed: dict[str, str], root: Path) -> dict[str, str]:
    """Chatchat's failed_files: what the gateway did not take (a type) and what the build could not index."""
    return {**changes.refused, **{name: without_server_paths(why, root) for name, why in failed.items()}}




def _stored_name(name: str) -> str | None:
    """`name` as a stored file would be named, or None when no stored file can have it (asking for one
    is then simply not found)."""
    try:
        return kb_store.check_file_name(name, nested=True)
    except InvalidRequestError:
        return None






def _splitter(default: SplitterConfig, asked: dict[str, int] | None) -> SplitterConfig:
    """The splitter an upload asks for. An overlap not smaller than the chunk (which the schema cannot
    forbid: it compares two fields) is lowered to half the chunk, as the README says, not refused."""
    if not asked:
        return default
    chosen = {**default.model_dump(), **asked}
    if chosen["chunk_overlap"] >= chosen["chunk_size"]:
        chosen["chunk_overlap"] = chosen["chunk_size"] // 2
    try:
        return SplitterConfig(**chosen)
    except ValidationError as exc:
        raise InvalidRequestError(f"chunk_size/chunk_overlap: {exc.errors()[0]['msg']}") from None





