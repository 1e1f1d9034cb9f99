"""Serve's handles to the pipeline versions, cached once per replica: each version's application (its
Pipeline entry point) and its Embedder. What the gateway's services take as `VersionHandles`."""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

EMBEDDER = "Embedder"  # the Embedder deployment of every version application (deployments.app)


class ServeHandles:
    """One cached handle per version application and per version's Embedder."""

    def __init__(self) -> None:
        self._apps: dict[str, DeploymentHandle] = {}
        self._stages: dict[tuple[str, str], DeploymentHandle] = {}  # (version, stage): the Embedders, woken stages
        self._wakes: dict[tuple[str, str], Any] = {}  # the last wake-up call per stage, held until replaced

    async def get(self, version: str) -> Any:
        if version not in self._apps:
            # get_app_handle is a blocking controller call: keep it off the event loop, and cache it.
            self._apps[version] = await asyncio.to_thread(serve.get_app_handle, version)
        return self._apps[version]

    async def embedder(self, version: str) -> Any:
        if (version, EMBEDDER) not in self._stages:
            await asyncio.to_thread(self.embedder_blocking, version)
        return self._stages[(version, EMBEDDER)]

    def embedder_blocking(self, version: str) -> Any:
        """The Embedder's handle from a worker thread (a build's), where blocking calls are allowed."""
        return self._stage(version, EMBEDDER)

    def _stage(self, version: str, stage: str) -> DeploymentHandle:
        """A stage's handle, looked up once (a blocking controller call)."""
        if (version, stage) not in self._stages:
            self._stages[(version, stage)] = serve.get_deployment_handle(stage, app_name=version)
        return self._stages[(version, stage)]

    def prime(self, version: str, timeout_s: float) -> None:
        """One cheap call through a new handle, before a user's request: its first call waits for the
        controller and for its replica list. Blocking: it runs on the readiness thread."""
        handle = serve.get_app_handle(version)
        handle.knowledge_bases.remote().result(timeout_s=timeout_s)
        self._apps[version] = handle

    def wake(self, version: str, stages: list[str]) -> None:
        """A no-op call to each stage at once, so stages at zero replicas cold-start side by side instead
        of one after another as a request reaches each. Blocking (a handle's first lookup asks the
        controller); the calls are not waited for: Serve holds them until a replica is up."""
        for stage in stages:
            self._wakes[(version, stage)] = self._stage(version, stage).ping.remote()

    def is_overload(self, exc: BaseException) -> bool:
        return is_overload(exc)


def is_overload(exc: BaseException) -> bool:
    """A full queue at some stage, however deep in Ray's error wrappers it arrives."""
    seen: BaseException | None = exc
    for _ in range(10):  # Ray's wrappers nest a few levels; a cycle must not loop forever
        if seen is None:
            return False
        if isinstance(seen, BackPressureError):
            return True
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
    return False
