"""What the knowledge-base routes do beyond parsing: hand the work to the KnowledgeBases manager with the
versions serving now, wait (bounded) for a job and for a Retriever to serve what it published, and turn
a long job into progress events.

Plain code: the manager comes in as a `KnowledgeBaseManager` (Serve's handle in the gateway, a fake in
unit tests), the version handles as `VersionHandles`, so every wait and poll is tested without Ray.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from deployments.gateway.answer_service import VersionHandles
from deployments.gateway.statuses import bounded, public_status
from rag.config import KnowledgeBaseSettings
from rag.kb_api import kb_body

SERVED_WAIT_S = 5.0  # after publishing, how long an answer waits for a Retriever to report the new version
JOB_POLL_S = 0.5  # how long one progress poll waits for the job to change
JOB_LOOKUP_S = 10.0  # a job's view is in the manager's memory: longer means the manager is stuck
MANAGER_SLACK_S = 10.0  # beyond a wait's own bound, before the manager counts as not answering


class KnowledgeBaseManager(Protocol):
    """The KnowledgeBases deployment's methods, by name (`list_knowledge_bases`, `create`, `submit`,
    `wait`, `job`, ...), each taking the serving versions last where the manager needs them."""

    def call(self, method: str, *args: Any) -> Awaitable[Any]: ...


class ServeManager:
    """The manager through its Serve handle."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def call(self, method: str, *args: Any) -> Awaitable[Any]:
        response: Awaitable[Any] = getattr(self._handle, method).remote(*args)
        return response


class KnowledgeBaseRequests:
    def __init__(self, manager: KnowledgeBaseManager, handles: VersionHandles,
                 serving_versions: Callable[[], list[str]], settings: KnowledgeBaseSettings,
                 request_timeout_s: float, served_wait_s: float = SERVED_WAIT_S) -> None:
        self._manager = manager
        self._handles = handles
        self._serving_versions = serving_versions
        self.settings = settings
        self._timeout_s = request_timeout_s
        self._served_wait_s = served_wait_s

    async def call(self, method: str, *args: Any) -> Any:
        """One manager call with the versions serving now, bounded by the request timeout."""
        return await self._bounded(self._manager.call(method, *args, self._serving_versions()), self._timeout_s)

    async def job(self, job_id: str) -> dict[str, Any]:
        view: dict[str, Any] = await self._bounded(self._manager.call("job", job_id, self._serving_versions()),
                                                   JOB_LOOKUP_S)
        return view

    def _bounded(self, call: Awaitable[Any], timeout_s: float) -> Awaitable[Any]:
        return bounded(call, timeout_s, "the knowledge-base manager")

    async def finish(self, job_id: str, wait: bool, what: str) -> tuple[int, dict[str, Any]]:
        """(status, body) for a submitted job: 200 once done and (if it published) served, else 202 with
        the job to poll, after waiting at most `wait_s` (not at all without `wait`)."""
        if not wait:
            return 202, kb_body({"job_id": job_id}, f"{what} started", 202)
        bound = self.settings.wait_s
        view = await self._bounded(self._manager.call("wait", job_id, bound, self._serving_versions()),
                                   bound + MANAGER_SLACK_S)
        if view["state"] != "done":
            return 202, kb_body(view, f"{what} is still running; poll /knowledge_base/jobs/{job_id}", 202)
        if view.get("published"):
            view["served"] = await self.served(view["knowledge_base_name"], view["index_version"])
        return 200, kb_body(view, f"{what} done")

    async def served(self, kb: str, version: int) -> bool:
        """Whether a serving version's Retriever reports `version` of `kb` within `served_wait_s`
        (versions that pin an older one never will)."""
        deadline = time.monotonic() + self._served_wait_s
        while time.monotonic() < deadline:
            for name in self._serving_versions():
                try:
                    handle = await self._handles.get(name)
                    if (await asyncio.wait_for(handle.knowledge_bases.remote(), 2)).get(kb, 0) >= version:
                        return True
                except Exception:  # a version going away: ask the others
                    continue
            await asyncio.sleep(0.2)
        return False

    async def progress(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """One event `{code, msg, total, finished, job}` per change in progress, bounded by `wait_s`: past
        it, a last event (code 202) names the job to poll; a failed wait ends with the error's status."""
        deadline = time.monotonic() + self.settings.wait_s
        last: tuple[Any, ...] | None = None
        while True:
            try:
                view = await self._bounded(self._manager.call("wait", job_id, JOB_POLL_S, self._serving_versions()),
                                           JOB_POLL_S + MANAGER_SLACK_S)
            except Exception as exc:  # the stream has begun: the failure becomes its last event
                status, message = public_status(exc)
                yield {"code": status, "msg": message, "job": {"job_id": job_id}}
                return
            if view["state"] == "done" and view.get("published"):  # its last event once a Retriever serves it
                view["served"] = await self.served(view["knowledge_base_name"], view["index_version"])
            shown = (view["state"], view["files_done"], view["chunks_embedded"])
            if shown != last:
                last = shown
                yield {"code": 200, "msg": f"{view['state']}: {view['files_done']}/{view['files_total']} files, "
                       f"{view['chunks_embedded']}/{view['chunks_total']} chunks embedded",
                       "total": view["files_total"], "finished": view["files_done"], "job": view}
            if view["state"] == "done":
                return
            if time.monotonic() > deadline:
                yield {"code": 202, "msg": f"still running; poll /knowledge_base/jobs/{job_id}", "job": view}
                return
