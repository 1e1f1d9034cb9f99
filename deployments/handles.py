"""Serve's handles to the pipeline versions, as the gateway's logic takes them (`VersionHandles`)."""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle


class ServeHandles:
    """One cached handle per version application."""

    def __init__(self) -> None:
        self._handles: dict[str, DeploymentHandle] = {}

    async def get(self, version: str) -> Any:
        if version not in self._handles:
            # get_app_handle is a blocking controller call: keep it off the event loop, and cache it.
            self._handles[version] = await asyncio.to_thread(serve.get_app_handle, version)
        return self._handles[version]

    def prime(self, version: str, timeout_s: float) -> None:
        """One cheap call through a new handle, before a user's request: its first call waits for the
        controller and for its replica list. Blocking: it runs on the readiness thread."""
        handle = serve.get_app_handle(version)
        handle.knowledge_bases.remote().result(timeout_s=timeout_s)
        self._handles[version] = handle

    def is_overload(self, exc: BaseException) -> bool:
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
