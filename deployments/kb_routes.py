"""Langchain-Chatchat 0.3's knowledge-base routes: parse, check what is cheap to check here, hand the work
to the KnowledgeBases manager (one writer, jobs), and answer `{code, msg, data}` with the real status.

Module-level routes on the gateway's FastAPI app; the replica's state comes from Serve's replica
context, as the HTTP guard's settings do.
"""

import asyncio
import json
import mimetypes
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.datastructures import UploadFile as StarletteUpload

from deployments.statuses import documented, status_for
from rag import kb_store
from rag.config import KnowledgeBaseSettings, check_kb_name
from rag.errors import InvalidRequestError, RagError, RequestTooLargeError, UpstreamTimeoutError
from rag.kb_api import UPLOAD_BODY, CreateKnowledgeBase, DeleteDocs, KnowledgeBaseRef, UpdateDocs, UploadForm, kb_body
from rag.kb_build import Changes

router = APIRouter(prefix="/knowledge_base", tags=["knowledge bases"])
_SERVED_WAIT_S = 5.0  # after publishing, how long an answer waits for a Retriever to report the new version
_ERRORS = [400, 401, 404, 409, 413, 422, 500, 503, 504]
_JOB = {202: {"description": "still running after `wait_s` (or `wait=false`): poll `/knowledge_base/jobs/{id}`"}}


def _gateway() -> Any:
    return serve.get_replica_context().servable_object


def _documented(*extra: dict[int | str, Any]) -> dict[int | str, Any]:
    merged: dict[int | str, Any] = dict(documented(*_ERRORS))
    for more in extra:
        merged.update(more)
    return merged


async def _call(method: str, *args: Any) -> Any:
    gateway = _gateway()
    versions = gateway.serving_versions()
    timeout = gateway.service.config.request_timeout_s
    try:
        return await asyncio.wait_for(getattr(gateway.kb_manager, method).remote(*args, versions), timeout)
    except TimeoutError:
        raise UpstreamTimeoutError(f"the knowledge-base manager took longer than {timeout:g}s") from None


async def _finish(job_id: str, wait: bool, what: str) -> JSONResponse:
    """Wait (bounded) for a job and for a Retriever to serve what it published; 202 with the job if not."""
    gateway = _gateway()
    if not wait:
        return JSONResponse(kb_body({"job_id": job_id}, f"{what} started", 202), status_code=202)
    bound = gateway.service.config.knowledge_base.wait_s
    view = await asyncio.wait_for(gateway.kb_manager.wait.remote(job_id, bound), bound + 10)
    if view["state"] != "done":
        return JSONResponse(kb_body(view, f"{what} is still running; poll /knowledge_base/jobs/{job_id}", 202),
                            status_code=202)
    if view.get("published"):
        view["served"] = await _served(view["knowledge_base_name"], view["index_version"])
    return JSONResponse(kb_body(view, f"{what} done"))


async def _served(kb: str, version: int) -> bool:
    """Whether a serving version's Retriever reports `version` of `kb` (versions that pin it never will)."""
    gateway = _gateway()
    deadline = time.monotonic() + _SERVED_WAIT_S
    while time.monotonic() < deadline:
        for name in gateway.serving_versions():
            handle = await gateway.service.handles.get(name)
            try:
                if (await asyncio.wait_for(handle.knowledge_bases.remote(), 2)).get(kb, 0) >= version:
                    return True
            except Exception:  # a version going away: ask the others
                continue
        await asyncio.sleep(0.2)
    return False


@router.get("/list_knowledge_bases", responses=_documented())
async def list_knowledge_bases() -> dict[str, Any]:
    """`data`: the names, as Chatchat gives them; `knowledge_bases`: each one's details, including the
    retrieval mode its questions get and why."""
    details = await _call("list_knowledge_bases")
    return {**kb_body([d["knowledge_base_name"] for d in details]), "knowledge_bases": details}


@router.post("/create_knowledge_base", responses=_documented())
async def create_knowledge_base(body: CreateKnowledgeBase) -> dict[str, Any]:
    created = await _call("create", body.knowledge_base_name, body.kb_info, body.embed_model)
    return kb_body(created, f"created knowledge base {body.knowledge_base_name}")


@router.post("/delete_knowledge_base", responses=_documented())
async def delete_knowledge_base(body: KnowledgeBaseRef) -> dict[str, Any]:
    await _call("delete", body.knowledge_base_name)
    return kb_body(None, f"deleted knowledge base {body.knowledge_base_name}")


@router.get("/list_files", responses=_documented())
async def list_files(knowledge_base_name: Annotated[str, Query(min_length=1, max_length=128)]) -> dict[str, Any]:
    return kb_body(await _call("list_files", knowledge_base_name))


@router.get("/download_doc", response_model=None, responses=_documented(
    {200: {"description": "the original bytes", "content": {"application/octet-stream": {}}}}))
async def download_doc(knowledge_base_name: Annotated[str, Query(min_length=1, max_length=128)],
                       file_name: Annotated[str, Query(min_length=1, max_length=1024)]) -> Response:
    data = await _call("download", knowledge_base_name, file_name)
    media = mimetypes.guess_type(file_name)[0] or "application/octet-stream"
    disposition = f"attachment; filename*=UTF-8''{quote(file_name.rsplit('/', 1)[-1])}"
    return Response(data, media_type=media, headers={"content-disposition": disposition})


@router.post("/upload_docs", responses=_documented(_JOB), openapi_extra=UPLOAD_BODY)
async def upload_docs(request: Request) -> JSONResponse:
    """Multipart: `files` (many), `knowledge_base_name`, `override`, `chunk_size`, `chunk_overlap`, `wait`.
    Parsed by hand so that a part without a file name is a 400 naming the problem, not a schema error."""
    limits = _gateway().service.config.knowledge_base
    async with request.form(max_files=limits.max_files + 1, max_fields=50) as form:
        fields = {k: v for k, v in form.multi_items() if k != "files" and isinstance(v, str)}
        try:
            body = UploadForm.model_validate(fields)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        check_kb_name(body.knowledge_base_name)
        received = await _read_files(form.getlist("files"), limits)
    changes = Changes(add=received, override=body.override)
    job_id = await _call("submit", "upload_docs", body.knowledge_base_name, changes, body.splitter())
    return await _finish(job_id, body.wait, f"upload of {len(received)} file(s)")


async def _read_files(files: list[Any], limits: KnowledgeBaseSettings) -> dict[str, bytes]:
    if not files:
        raise InvalidRequestError("no files to upload: send them as multipart parts named 'files'")
    if len(files) > limits.max_files:
        raise InvalidRequestError(f"{len(files)} files in one upload; the limit is {limits.max_files}")
    received: dict[str, bytes] = {}
    for upload in files:
        if not isinstance(upload, StarletteUpload):
            raise InvalidRequestError("each 'files' part must be a file with a file name")
        name = kb_store.check_file_name(upload.filename or "")
        if name in received:
            raise InvalidRequestError(f"file {name!r} is sent twice in one upload")
        data = await upload.read(limits.max_file_bytes + 1)
        if len(data) > limits.max_file_bytes:
            raise RequestTooLargeError(f"file {name!r} is larger than the {limits.max_file_bytes}-byte limit")
        received[name] = data
    return received


@router.post("/delete_docs", responses=_documented(_JOB))
async def delete_docs(body: DeleteDocs) -> JSONResponse:
    names = tuple(dict.fromkeys(body.file_names))
    changes = Changes(delete=names, keep_originals=not body.delete_content)
    job_id = await _call("submit", "delete_docs", body.knowledge_base_name, changes, None)
    return await _finish(job_id, body.wait, f"deletion of {len(names)} file(s)")


@router.post("/update_docs", responses=_documented(_JOB))
async def update_docs(body: UpdateDocs) -> JSONResponse:
    names = tuple(dict.fromkeys(body.file_names))
    splitter = {k: v for k, v in (("chunk_size", body.chunk_size), ("chunk_overlap", body.chunk_overlap))
                if v is not None}
    job_id = await _call("submit", "update_docs", body.knowledge_base_name, Changes(reindex=names),
                         splitter or None)
    return await _finish(job_id, body.wait, f"re-indexing of {len(names)} file(s)")


@router.get("/jobs/{job_id}", responses=_documented())
async def job(job_id: Annotated[str, Path(min_length=1, max_length=64)]) -> dict[str, Any]:
    view = await asyncio.wait_for(_gateway().kb_manager.job.remote(job_id), 10)
    return kb_body(view, view["state"])


@router.post("/recreate_vector_store", response_model=None, responses=_documented(
    {200: {"description": "SSE progress events `{code, msg, total, finished, job}`, then `data: [DONE]`",
           "content": {"text/event-stream": {"schema": {"type": "string"}}}}}))
async def recreate_vector_store(body: KnowledgeBaseRef) -> StreamingResponse:
    job_id = await _call("submit", "recreate_vector_store", body.knowledge_base_name,
                         Changes(rescan=True, full=True), None)
    return StreamingResponse(_progress_events(job_id), media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})


async def _progress_events(job_id: str) -> AsyncIterator[str]:
    """One event per change in progress, bounded by `wait_s`: past it, a last event names the job to poll."""
    gateway = _gateway()
    deadline = time.monotonic() + gateway.service.config.knowledge_base.wait_s
    last: tuple[Any, ...] | None = None
    while True:
        try:
            view = await gateway.kb_manager.wait.remote(job_id, 0.5)
        except Exception as exc:
            error = exc if isinstance(exc, RagError) else RagError(str(exc))
            yield _event({"code": status_for(error), "msg": str(error)[:500], "job": {"job_id": job_id}})
            break
        shown = (view["state"], view["files_done"], view["chunks_embedded"])
        if shown != last:
            last = shown
            yield _event({"code": 200, "msg": f"{view['state']}: {view['files_done']}/{view['files_total']} files, "
                          f"{view['chunks_embedded']}/{view['chunks_total']} chunks embedded",
                          "total": view["files_total"], "finished": view["files_done"], "job": view})
        if view["state"] == "done":
            break
        if time.monotonic() > deadline:
            yield _event({"code": 202, "msg": f"still running; poll /knowledge_base/jobs/{job_id}", "job": view})
            break
    yield "data: [DONE]\n\n"


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
