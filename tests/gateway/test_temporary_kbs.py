"""Temporary knowledge bases (Chatchat's file chat) in the manager, without Ray: made by an upload job,
hidden from every listing and management route, bounded in number, deleted when idle and after a restart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from deployments.gateway.kb_manager_service import KnowledgeBaseService
from deployments.gateway.temporary_kbs import TemporaryKbs
from rag import kb_store
from rag.config import KnowledgeBaseSettings, PipelineConfig, RetrievalConfig, SplitterConfig, TemporaryKbSettings
from rag.errors import ConflictError, KnowledgeBaseNotFoundError, OverloadedError
from rag.kb_changes import Changes
from rag.kb_versions import list_knowledge_bases
from tests.gateway.test_kb_manager_service import FakeStages, _spooled, run
from tests.rag.test_kb_build import _doc


def _config(root: Path, discover: bool = True) -> PipelineConfig:
    return PipelineConfig(version="v1", splitter=SplitterConfig(chunk_size=200, chunk_overlap=20),
                          retrieval=RetrievalConfig(kb_root=root, discover=discover))


def _service(root: Path, discover: bool = True, **temporary: Any) -> KnowledgeBaseService:
    settings = KnowledgeBaseSettings(temporary=TemporaryKbSettings(**temporary))
    return KnowledgeBaseService(settings, FakeStages({"v1": _config(root, discover)}))


async def _upload(service: KnowledgeBaseService, files: dict[str, bytes], temp_id: str | None = None) -> dict[str, Any]:
    spool = Path(await service.spool(["v1"]))
    started = await service.upload_temporary(temp_id, Changes(add=_spooled(spool, files), spool=spool), None, ["v1"])
    view = await service.wait(started["job_id"], 30, ["v1"])
    return {**started, "view": view}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_upload_makes_a_hidden_kb_that_only_its_id_reaches(tmp_path: Path) -> None:
    service = _service(tmp_path)

    async def scenario() -> dict[str, Any]:
        await service.create("docs", "", None, ["v1"])
        return await _upload(service, {"notes.md": _doc("tides")})

    made = run(scenario())
    kb = made["knowledge_base_name"]
    assert kb == f"temp-{made['id']}" and kb_store.is_temporary(kb) and len(made["id"]) == 32
    assert made["view"]["state"] == "done" and made["view"]["changed_files"] == ["notes.md"]
    # Retrievers that discover find it like any KB; nothing that lists KBs to people shows it.
    assert kb in list_knowledge_bases(tmp_path)
    assert [d["knowledge_base_name"] for d in run(service.list_knowledge_bases(["v1"]))] == ["docs"]
    assert run(service.use_temporary(made["id"], ["v1"])) == kb
    for call in (service.list_files(kb, ["v1"]), service.delete(kb, ["v1"]), service.download(kb, "notes.md", ["v1"]),
                 service.update_info(kb, "x", ["v1"]), service.submit("delete_docs", kb, Changes(delete=("notes.md",)),
                                                                      None, ["v1"])):
        with pytest.raises(KnowledgeBaseNotFoundError):
            run(call)
    with pytest.raises(ConflictError, match="reserved"):
        run(service.create(f"temp-{'0' * 32}", "", None, ["v1"]))
    assert kb_store.exists(tmp_path, kb)  # none of those touched it


def test_an_id_adds_to_its_kb_and_an_unknown_or_expired_one_makes_a_new_kb(tmp_path: Path) -> None:
    service = _service(tmp_path)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        first = await _upload(service, {"a.md": _doc("alpha")})
        again = await _upload(service, {"b.md": _doc("beta")}, first["id"])
        unknown = await _upload(service, {"c.md": _doc("gamma")}, "f" * 32)
        return first, again, unknown

    first, again, unknown = run(scenario())
    assert again["id"] == first["id"] and again["view"]["index_version"] == 2
    assert set(kb_store.content_directory(tmp_path, first["knowledge_base_name"]).iterdir()) == {
        kb_store.original_path(tmp_path, first["knowledge_base_name"], n) for n in ("a.md", "b.md")}
    assert unknown["id"] not in (first["id"], "f" * 32)
    with pytest.raises(KnowledgeBaseNotFoundError, match="upload the files again"):
        run(service.use_temporary("f" * 32, ["v1"]))
    with pytest.raises(KnowledgeBaseNotFoundError):
        run(service.use_temporary("../samples", ["v1"]))


def test_their_number_is_bounded_and_an_upload_that_indexes_nothing_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    service = _service(tmp_path, max_count=2)
    made = [run(_upload(service, {f"{n}.md": _doc(n)})) for n in ("one", "two")]
    with pytest.raises(OverloadedError, match="limit is 2"):
        run(_upload(service, {"three.md": _doc("three")}))
    assert sorted(kb_store.list_names(tmp_path, temporary=True)) == sorted(m["knowledge_base_name"] for m in made)

    # The job's result is in before its cleanup (the spool, then the empty KB) is done: a slow cleanup
    # must still be over when the upload answers.
    remove_spool = kb_store.remove_spool
    monkeypatch.setattr(kb_store, "remove_spool", lambda *args: (time.sleep(0.3), remove_spool(*args))[1])
    roomy = _service(tmp_path / "other")
    empty = run(_upload(roomy, {"blank.md": b"   \n"}))
    assert empty["view"]["index_version"] is None and empty["view"]["failed_files"]
    assert kb_store.list_names(tmp_path / "other", temporary=True) == [] and len(roomy.temporary) == 0


def test_idle_ones_and_those_from_before_a_restart_are_deleted(tmp_path: Path) -> None:
    service = _service(tmp_path, idle_ttl_s=60)
    clock = Clock()
    service.temporary = TemporaryKbs(service.settings.temporary, clock)
    used, idle = (run(_upload(service, {f"{n}.md": _doc(n)})) for n in ("used", "idle"))
    clock.now += 50
    run(service.use_temporary(used["id"], ["v1"]))
    clock.now += 20
    assert run(service.sweep_temporary()) == [idle["knowledge_base_name"]]
    assert kb_store.list_names(tmp_path, temporary=True) == [used["knowledge_base_name"]]
    with pytest.raises(KnowledgeBaseNotFoundError):
        run(service.use_temporary(idle["id"], ["v1"]))

    restarted = _service(tmp_path)  # a new manager knows none of them
    assert run(restarted.sweep_temporary()) == [used["knowledge_base_name"]]
    assert kb_store.list_names(tmp_path, temporary=True) == []


def test_without_a_version_that_discovers_new_kbs_an_upload_is_refused(tmp_path: Path) -> None:
    service = _service(tmp_path, discover=False)
    with pytest.raises(ConflictError, match="discover"):
        run(_upload(service, {"a.md": _doc("alpha")}))
    assert kb_store.list_names(tmp_path, temporary=True) == []


def test_the_registry_counts_reservations_and_spares_busy_kbs() -> None:
    clock = Clock()
    kbs = TemporaryKbs(TemporaryKbSettings(max_count=1, idle_ttl_s=10), clock)
    kbs.reserve("temp-" + "a" * 32)
    with pytest.raises(OverloadedError):
        kbs.reserve("temp-" + "b" * 32)
    assert not kbs.touch("temp-" + "b" * 32)
    clock.now += 11
    on_disk = ["temp-" + "a" * 32, "temp-" + "c" * 32, "samples"]
    assert kbs.to_delete(on_disk, busy=set()) == {on_disk[0]: "idle", on_disk[1]: "restart"}
    assert kbs.to_delete(on_disk, busy={on_disk[0]}) == {on_disk[1]: "restart"}
    assert kbs.sweep_interval_s == 2.5
