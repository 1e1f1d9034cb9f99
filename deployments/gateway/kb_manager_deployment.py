"""The knowledge-base manager: one replica in the gateway's application that runs every change to the
knowledge bases (one writer per KB, jobs kept in one place whichever gateway replica is asked)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from deployments.gateway.expiring import Expiring
from deployments.gateway.kb_manager_service import Keep, KnowledgeBaseService
from deployments.gateway.serve_handles import ServeHandles
from deployments.stages.replica_lifecycle import ReplicaLifecycle
from rag.config import GatewayConfig, PipelineConfig
from rag.kb_build import Changes, Embed
from rag.leases import prune_versions

logger = logging.getLogger("rag.knowledge_bases")
FIRST_SWEEP_RETRY_S = 5.0
EMBED_TIMEOUT_S = 300.0  # one batch of a few hundred chunks on a busy CPU; a wedged Embedder fails the job
PIPELINE_DEPLOYMENT = "Pipeline"  # the ingress of every pipeline version (deployments/app.py)


class ServeStages:
    """Each version's config (asked from its Pipeline, trusted for a few seconds) and its Embedder, through
    Serve handles."""

    def __init__(self, handles: ServeHandles) -> None:
        self._handles = handles
        # Not by name for ever: a version redeployed under its old name with another embedding model must
        # not have its index built with one model and labelled with the other.
        self._configs: Expiring[PipelineConfig] = Expiring()

    async def config(self, version: str) -> PipelineConfig:
        async def ask() -> PipelineConfig:
            handle = await self._handles.get(version)
            return PipelineConfig.model_validate(await handle.describe.remote())
        return await self._configs.get(version, ask)

    async def deployed(self) -> list[str]:
        """The pipeline applications Serve runs now: those with a Pipeline deployment (not this gateway's own
        application, nor another team's beside them, such as a Ray Serve LLM upstream)."""
        status = await asyncio.to_thread(serve.status)
        # One being deleted (a rolled-back canary) pins nothing any more, and its config can no longer be asked.
        return sorted(name for name, app in status.applications.items()
                      if PIPELINE_DEPLOYMENT in app.deployments and app.status != "DELETING")

    def embedder(self, version: str) -> Embed:
        return _RemoteEmbed(self._handles.embedder_blocking(version))


class _RemoteEmbed:
    """A version's Embedder for the build's worker thread, where a blocking result() is allowed."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self._handle.embed_many.remote(texts).result(timeout_s=EMBED_TIMEOUT_S)

    def describe(self) -> dict[str, Any]:
        """How it embeds (runtime, precision), recorded in the manifest of what it builds."""
        described = self._handle.describe.remote().result(timeout_s=EMBED_TIMEOUT_S)
        return dict(described.get("runtime", {}))


def _prune(root: Path, kb: str, keep: int, lease_ttl_s: float, also: Keep) -> None:
    pruned = prune_versions(root, kb, keep, lease_ttl_s, protected=also.pinned, newest_for_models=also.models)
    if pruned:
        logger.info("event=INDEX_PRUNED kb=%s versions=%s", kb, pruned)


async def _sweep_forever(service: KnowledgeBaseService) -> None:
    """Temporary KBs left from before this replica started go as soon as the versions' kb_roots can be
    asked (retried every few seconds until then); idle ones go on every sweep after that."""
    swept_once = False
    while True:
        await asyncio.sleep(service.temporary.sweep_interval_s if swept_once else FIRST_SWEEP_RETRY_S)
        try:
            await service.sweep_temporary()
            swept_once = True
        except Exception as exc:  # no version deployed yet, or one going away: next time
            logger.info("event=TEMP_KB_SWEEP_SKIPPED error=%r", exc)


@serve.deployment(name="KnowledgeBases")
class KnowledgeBaseManager:
    async def __init__(self, config: GatewayConfig) -> None:  # type: ignore[misc]
        self._life = ReplicaLifecycle("gateway")
        # Old index versions go once no Retriever holds a lease on them, the newest `keep_versions` stay.
        self.service = KnowledgeBaseService(config.knowledge_base, ServeStages(ServeHandles()), _prune)
        await self._life.start("knowledge-base jobs", lambda: None, lambda: None)
        self._sweeper = asyncio.create_task(_sweep_forever(self.service))

    async def list_knowledge_bases(self, versions: list[str]) -> list[dict[str, Any]]:
        return await self.service.list_knowledge_bases(versions)

    async def create(self, kb: str, kb_info: str, embed_model: str | None, versions: list[str]) -> dict[str, Any]:
        return await self.service.create(kb, kb_info, embed_model, versions)

    async def update_info(self, kb: str, kb_info: str, versions: list[str]) -> dict[str, Any]:
        return await self.service.update_info(kb, kb_info, versions)

    async def delete(self, kb: str, versions: list[str]) -> None:
        await self.service.delete(kb, versions)

    async def list_files(self, kb: str, versions: list[str]) -> list[dict[str, Any]]:
        return await self.service.list_files(kb, versions)

    async def read_eval_set(self, kb: str, versions: list[str]) -> list[dict[str, Any]]:
        return await self.service.read_eval_set(kb, versions)

    async def write_eval_set(self, kb: str, items: list[dict[str, Any]], versions: list[str]) -> dict[str, Any]:
        return await self.service.write_eval_set(kb, items, versions)

    async def download(self, kb: str, name: str, versions: list[str]) -> bytes:
        return await self.service.download(kb, name, versions)

    async def list_chunks(self, kb: str, file_name: str, metadata: dict[str, Any], versions: list[str]
                          ) -> list[dict[str, Any]]:
        return await self.service.list_chunks(kb, file_name, metadata, versions)

    async def spool(self, versions: list[str]) -> str:
        return await self.service.spool(versions)

    async def submit(self, kind: str, kb: str, changes: Changes, splitter: dict[str, int] | None,
                     versions: list[str]) -> str:
        with self._life.in_flight.track():
            return await self.service.submit(kind, kb, changes, splitter, versions)

    async def upload_temporary(self, temp_id: str | None, changes: Changes, splitter: dict[str, int] | None,
                               versions: list[str]) -> dict[str, str]:
        with self._life.in_flight.track():
            return await self.service.upload_temporary(temp_id, changes, splitter, versions)

    async def use_temporary(self, temp_id: str, versions: list[str]) -> str:
        return await self.service.use_temporary(temp_id, versions)

    async def wait(self, job_id: str, timeout_s: float, versions: list[str]) -> dict[str, Any]:
        return await self.service.wait(job_id, timeout_s, versions)

    async def job(self, job_id: str, versions: list[str]) -> dict[str, Any]:
        return await self.service.job(job_id, versions)

    async def __del__(self) -> None:
        # Serve awaits this after the drain of requests; jobs are not requests, so they get their own.
        self._sweeper.cancel()
        await self.service.stop(self.service.settings.stop_drain_s)
        self._life.stop(self.service.parser.close)
