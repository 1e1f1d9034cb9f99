"""KnowledgeBaseRequests against a fake manager and fake version handles (no Ray): the serving versions
passed last, the request timeout, `finish` (202 without waiting or while running, 200 with `served` once a
Retriever reports the published index version) and `progress` (one event per change, a last 202 past
`wait_s`, the error's status when the wait fails)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from deployments.gateway.kb_requests import JOB_POLL_S, KnowledgeBaseRequests
from rag.config import KnowledgeBaseSettings
from rag.errors import KnowledgeBaseNotFoundError, UpstreamTimeoutError


class FakeManager:
    """The manager's methods by name; every call is recorded with its arguments."""

    def __init__(self, **methods: Callable[..., Awaitable[Any]]) -> None:
        self.methods = methods
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def call(self, method: str, *args: Any) -> Awaitable[Any]:
        self.calls.append((method, args))
        return self.methods[method](*args)


class FakeRemote:
    def __init__(self, result: Callable[[], Awaitable[Any]]) -> None:
        self._result = result
        self.calls = 0

    def remote(self) -> Awaitable[Any]:
        self.calls += 1
        return self._result()


class FakeVersion:
    """A version's handle whose Retriever reports `reports` in turn (the last one from then on), or raises."""

    def __init__(self, *reports: dict[str, int] | Exception) -> None:
        self.reports = list(reports)
        self.knowledge_bases = FakeRemote(self._next)

    async def _next(self) -> dict[str, int]:
        report = self.reports.pop(0) if len(self.reports) > 1 else self.reports[0]
        if isinstance(report, Exception):
            raise report
        return report


class FakeHandles:
    def __init__(self, **versions: FakeVersion) -> None:
        self.versions = versions

    async def get(self, version: str) -> FakeVersion:
        return self.versions[version]

    async def embedder(self, version: str) -> Any:
        raise AssertionError("the knowledge-base requests never embed")

    def prime(self, version: str, timeout_s: float) -> None:
        pass

    def is_overload(self, exc: BaseException) -> bool:
        return False


def view(state: str, files_done: int = 0, chunks_embedded: int = 0, **extra: Any) -> dict[str, Any]:
    return {"job_id": "job-1", "knowledge_base_name": "samples", "state": state, "files_total": 2,
            "files_done": files_done, "chunks_total": 10, "chunks_embedded": chunks_embedded, **extra}


def requests(manager: FakeManager, handles: FakeHandles | None = None, serving: list[str] | None = None,
             wait_s: float = 1.0, request_timeout_s: float = 1.0, served_wait_s: float = 0.3) -> KnowledgeBaseRequests:
    versions = ["v1"] if serving is None else serving
    return KnowledgeBaseRequests(manager, handles or FakeHandles(), lambda: list(versions),
                                 KnowledgeBaseSettings(wait_s=wait_s), request_timeout_s, served_wait_s)


def answers(result: Any) -> Callable[..., Awaitable[Any]]:
    async def method(*_: Any) -> Any:
        return result
    return method


def raises(error: Exception) -> Callable[..., Awaitable[Any]]:
    async def method(*_: Any) -> Any:
        raise error
    return method


def waits(*views: dict[str, Any], pause_s: float = 0.0, max_calls: int = 100) -> Callable[..., Awaitable[Any]]:
    """A manager `wait` that answers `views` in turn (the last one from then on), each after `pause_s`;
    past `max_calls` it fails, so progress that never stops ends the test instead of hanging it."""
    remaining = list(views)
    calls = iter(range(max_calls))

    async def wait(job_id: str, timeout_s: float, versions: list[str]) -> dict[str, Any]:
        if next(calls, None) is None:
            raise RuntimeError(f"polled more than {max_calls} times")
        await asyncio.sleep(pause_s)
        return dict(remaining.pop(0) if len(remaining) > 1 else remaining[0])
    return wait


async def collected(kbs: KnowledgeBaseRequests, job_id: str = "job-1") -> list[dict[str, Any]]:
    return [event async for event in kbs.progress(job_id)]


# --- call ---------------------------------------------------------------------------------------------------


def test_call_passes_the_versions_serving_at_call_time_as_the_last_argument() -> None:
    async def list_files(kb: str, versions: list[str]) -> list[str]:
        return [f"{kb} via {','.join(versions)}"]

    manager = FakeManager(list_files=list_files)
    serving = ["v2", "v1"]
    kbs = KnowledgeBaseRequests(manager, FakeHandles(), lambda: list(serving), KnowledgeBaseSettings(), 1.0)
    assert asyncio.run(kbs.call("list_files", "samples")) == ["samples via v2,v1"]
    serving.remove("v2")
    asyncio.run(kbs.call("list_files", "samples"))
    assert manager.calls == [("list_files", ("samples", ["v2", "v1"])), ("list_files", ("samples", ["v1"]))]


def test_a_manager_slower_than_the_request_timeout_is_an_upstream_timeout() -> None:
    async def slow(*_: Any) -> None:
        await asyncio.sleep(5)

    kbs = requests(FakeManager(list_knowledge_bases=slow), request_timeout_s=0.05)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeoutError, match=r"longer than 0\.05s"):
        asyncio.run(kbs.call("list_knowledge_bases"))
    assert time.monotonic() - started < 1.0


def test_a_manager_error_reaches_the_caller_unchanged() -> None:
    kbs = requests(FakeManager(delete=raises(KnowledgeBaseNotFoundError("no knowledge base 'nope'"))))
    with pytest.raises(KnowledgeBaseNotFoundError, match="nope"):
        asyncio.run(kbs.call("delete", "nope"))


# --- finish -------------------------------------------------------------------------------------------------


def test_finish_without_wait_answers_202_with_the_job_id_and_asks_the_manager_nothing() -> None:
    manager = FakeManager()
    status, body = asyncio.run(requests(manager).finish("job-1", False, "upload of 2 file(s)"))
    assert status == 202
    assert body == {"code": 202, "msg": "upload of 2 file(s) started", "data": {"job_id": "job-1"}}
    assert manager.calls == []


def test_finish_of_a_job_still_running_after_the_wait_answers_202_naming_the_job_to_poll() -> None:
    manager = FakeManager(wait=waits(view("running", 1, 4)))
    status, body = asyncio.run(requests(manager, wait_s=2.5).finish("job-1", True, "upload"))
    assert status == 202 and body["code"] == 202
    assert "/knowledge_base/jobs/job-1" in body["msg"] and "still running" in body["msg"]
    assert body["data"]["state"] == "running" and "served" not in body["data"]
    assert manager.calls == [("wait", ("job-1", 2.5, ["v1"]))]  # bounded by the settings' wait_s


def test_a_done_job_that_published_is_200_and_served_once_some_version_reports_its_index_version() -> None:
    handles = FakeHandles(v1=FakeVersion({"samples": 2}), v2=FakeVersion({"samples": 3}))
    manager = FakeManager(wait=waits(view("done", 2, 10, published=True, index_version=3)))
    status, body = asyncio.run(requests(manager, handles, serving=["v1", "v2"]).finish("job-1", True, "upload"))
    assert status == 200 and body["code"] == 200 and body["msg"] == "upload done"
    assert body["data"]["served"] is True


def test_served_waits_for_a_retriever_that_picks_the_new_version_up_later() -> None:
    handles = FakeHandles(v1=FakeVersion({"samples": 2}, {"samples": 2}, {"samples": 4}))
    manager = FakeManager(wait=waits(view("done", 2, 10, published=True, index_version=4)))
    status, body = asyncio.run(requests(manager, handles, served_wait_s=2.0).finish("job-1", True, "upload"))
    assert status == 200 and body["data"]["served"] is True
    assert handles.versions["v1"].knowledge_bases.calls == 3


def test_served_is_false_after_the_served_wait_when_no_version_reports_the_new_index() -> None:
    # v1 pins an older index, v2 does not serve the KB at all
    handles = FakeHandles(v1=FakeVersion({"samples": 2}), v2=FakeVersion({"other": 9}))
    manager = FakeManager(wait=waits(view("done", 2, 10, published=True, index_version=3)))
    started = time.monotonic()
    status, body = asyncio.run(requests(manager, handles, serving=["v1", "v2"]).finish("job-1", True, "upload"))
    elapsed = time.monotonic() - started
    assert status == 200 and body["data"]["served"] is False
    assert 0.25 < elapsed < 1.5
    assert handles.versions["v1"].knowledge_bases.calls >= 2  # polled, not asked once


def test_served_is_false_when_the_only_version_fails_to_answer() -> None:
    handles = FakeHandles(v1=FakeVersion(RuntimeError("ActorDiedError")))
    manager = FakeManager(wait=waits(view("done", 2, 10, published=True, index_version=3)))
    status, body = asyncio.run(requests(manager, handles).finish("job-1", True, "upload"))
    assert status == 200 and body["data"]["served"] is False


def test_a_version_that_fails_to_answer_does_not_hide_another_that_serves() -> None:
    handles = FakeHandles(v1=FakeVersion(RuntimeError("ActorDiedError")), v2=FakeVersion({"samples": 3}))
    manager = FakeManager(wait=waits(view("done", 2, 10, published=True, index_version=3)))
    status, body = asyncio.run(requests(manager, handles, serving=["v1", "v2"]).finish("job-1", True, "upload"))
    assert status == 200 and body["data"]["served"] is True


def test_a_done_job_that_published_nothing_is_200_without_asking_the_retrievers() -> None:
    handles = FakeHandles(v1=FakeVersion({"samples": 1}))
    manager = FakeManager(wait=waits(view("done", 2, 10, published=False, index_version=1)))
    status, body = asyncio.run(requests(manager, handles).finish("job-1", True, "deletion"))
    assert status == 200 and "served" not in body["data"]
    assert handles.versions["v1"].knowledge_bases.calls == 0


def test_finish_of_a_failed_job_raises_its_error() -> None:
    manager = FakeManager(wait=raises(KnowledgeBaseNotFoundError("no knowledge base 'gone'")))
    with pytest.raises(KnowledgeBaseNotFoundError, match="gone"):
        asyncio.run(requests(manager).finish("job-1", True, "upload"))


# --- progress -----------------------------------------------------------------------------------------------


def test_progress_yields_one_event_per_change_and_stops_at_done() -> None:
    manager = FakeManager(wait=waits(view("queued"), view("running"), view("running"), view("running", 1, 5),
                                     view("running", 1, 5), view("done", 2, 10)))
    events = asyncio.run(collected(requests(manager)))
    assert [(e["code"], e["job"]["state"], e["finished"], e["job"]["chunks_embedded"]) for e in events] == [
        (200, "queued", 0, 0), (200, "running", 0, 0), (200, "running", 1, 5), (200, "done", 2, 10)]
    assert events[2]["msg"] == "running: 1/2 files, 5/10 chunks embedded" and events[2]["total"] == 2
    assert manager.calls == [("wait", ("job-1", JOB_POLL_S, ["v1"]))] * 6


def test_progress_of_a_job_that_never_finishes_ends_with_a_202_after_wait_s() -> None:
    manager = FakeManager(wait=waits(view("running", 1, 5), pause_s=0.02))
    started = time.monotonic()
    events = asyncio.run(collected(requests(manager, wait_s=0.15)))
    elapsed = time.monotonic() - started
    assert [e["code"] for e in events] == [200, 202]
    assert "poll /knowledge_base/jobs/job-1" in events[-1]["msg"] and events[-1]["job"]["state"] == "running"
    assert 0.15 <= elapsed < 1.0


def test_progress_that_keeps_changing_still_ends_at_wait_s() -> None:
    counter = iter(range(1, 100))

    async def wait(job_id: str, timeout_s: float, versions: list[str]) -> dict[str, Any]:
        await asyncio.sleep(0.02)
        return view("running", 0, next(counter))  # past 99 polls: an error event, and the test fails

    events = asyncio.run(collected(requests(FakeManager(wait=wait), wait_s=0.15)))
    assert events[-1]["code"] == 202 and all(e["code"] == 200 for e in events[:-1])
    assert 3 <= len(events) < 20


def test_a_failed_wait_ends_progress_with_the_errors_status() -> None:
    manager = FakeManager(wait=raises(KnowledgeBaseNotFoundError("no knowledge base 'gone'")))
    assert asyncio.run(collected(requests(manager))) == [
        {"code": 404, "msg": "no knowledge base 'gone'", "job": {"job_id": "job-1"}}]


def test_an_unexpected_error_mid_progress_ends_it_with_500_after_the_events_so_far() -> None:
    calls = iter([view("running", 1, 5)])

    async def wait(job_id: str, timeout_s: float, versions: list[str]) -> dict[str, Any]:
        try:
            return next(calls)
        except StopIteration:
            raise RuntimeError("the manager replica died") from None

    events = asyncio.run(collected(requests(FakeManager(wait=wait))))
    assert [e["code"] for e in events] == [200, 500]
    assert events[-1]["job"] == {"job_id": "job-1"} and events[-1]["msg"]
    assert "died" not in events[-1]["msg"]  # a server-side failure's own text stays in the logs


class RemoteFailure(Exception):
    """Shaped like Ray's RayTaskError: its text is the remote traceback, the library error is its `cause`."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__('Traceback (most recent call last):\n  File "/home/ray/kb_manager.py", line 1')
        self.cause = cause


def test_an_error_from_the_manager_replica_shows_its_library_error_not_the_remote_traceback() -> None:
    manager = FakeManager(wait=raises(RemoteFailure(KnowledgeBaseNotFoundError("no knowledge base 'gone'"))))
    assert asyncio.run(collected(requests(manager))) == [
        {"code": 404, "msg": "no knowledge base 'gone'", "job": {"job_id": "job-1"}}]


def test_a_progress_poll_the_manager_never_answers_ends_with_504_instead_of_hanging(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("deployments.gateway.kb_requests.MANAGER_SLACK_S", 0.1)

    async def stuck(job_id: str, timeout_s: float, versions: list[str]) -> dict[str, Any]:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    started = time.monotonic()
    events = asyncio.run(collected(requests(FakeManager(wait=stuck))))
    assert [e["code"] for e in events] == [504] and time.monotonic() - started < 5


def test_a_finish_wait_the_manager_never_answers_is_an_upstream_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("deployments.gateway.kb_requests.MANAGER_SLACK_S", 0.1)

    async def stuck(job_id: str, timeout_s: float, versions: list[str]) -> dict[str, Any]:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    with pytest.raises(UpstreamTimeoutError):
        asyncio.run(requests(FakeManager(wait=stuck), wait_s=0.1).finish("job-1", True, "upload"))


def test_a_version_whose_handle_cannot_be_had_does_not_hide_another_that_serves() -> None:
    class GoneFirst(FakeHandles):
        async def get(self, version: str) -> FakeVersion:
            if version == "v1":
                raise RuntimeError("application v1 is being deleted")
            return await super().get(version)

    kbs = requests(FakeManager(), GoneFirst(v2=FakeVersion({"samples": 3})), serving=["v1", "v2"])
    assert asyncio.run(kbs.served("samples", 3)) is True
