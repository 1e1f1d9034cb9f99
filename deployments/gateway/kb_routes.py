"""Langchain-Chatchat 0.3's knowledge-base routes: parse, check what is cheap to check here, hand the work
to the KnowledgeBases manager through `KnowledgeBaseRequests` (one writer, jobs, bounded waits), and
answer `{code, msg, data}` with the real status.

No `from __future__ import annotations` here: FastAPI must see real annotation objects.
"""

import json
import mimetypes
import pathlib
from collections.abc import AsyncIterator
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Body, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from deployments.gateway.kb_requests import KnowledgeBaseRequests
from deployments.gateway.services import KbRequests, Services
from deployments.gateway.statuses import SSE_EVENTS, documented
from deployments.gateway.uploads import discard, receive_upload
from rag.config import KB_NAME_PATTERN, check_kb_name
from rag.file_chat import TempUploadForm
from rag.kb_api import (
    CreateKnowledgeBase,
    DeleteDocs,
    EvalResults,
    EvalSet,
    KbName,
    KnowledgeBaseRef,
    UpdateDocs,
    UpdateInfo,
    UploadForm,
    form_body,
    kb_body,
)
from rag.kb_changes import Changes

FormT = TypeVar("FormT", bound=BaseModel)
router = APIRouter(prefix="/knowledge_base", tags=["knowledge bases"])
KbNameQuery = Annotated[str, Query(min_length=1, max_length=63, pattern=KB_NAME_PATTERN)]
_ERRORS = [400, 401, 404, 409, 413, 422, 500, 503, 504]
_JOB: dict[int | str, Any] = {
    202: {"description": "still running after `wait_s` (or `wait=false`): poll `/knowledge_base/jobs/{id}`"}}


def _finished(status: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, status_code=status)


def _documented(*extra: dict[Any, Any]) -> dict[int | str, Any]:
    merged: dict[int | str, Any] = dict(documented(*_ERRORS))
    for more in extra:
        merged.update(more)
    return merged


@router.get("/list_knowledge_bases", responses=_documented())
async def list_knowledge_bases(kbs: KbRequests) -> dict[str, Any]:
    """`data`: Chatchat 0.3's records (`kb_name`, `kb_info`, `vs_type`, `embed_model`, `file_count`,
    `create_time`: what its web UI reads); `knowledge_bases`: each one's details, including the retrieval
    mode its questions get and why."""
    details = await kbs.call("list_knowledge_bases")
    records = [{"id": number, "kb_name": d["knowledge_base_name"], "kb_info": d.get("kb_info", ""), "vs_type": "faiss",
                "embed_model": d.get("embed_model"), "file_count": d.get("files", 0),
                "create_time": d.get("create_time")} for number, d in enumerate(details, 1)]
    return {**kb_body(records), "knowledge_bases": details}


@router.post("/create_knowledge_base", responses=_documented())
async def create_knowledge_base(body: CreateKnowledgeBase, kbs: KbRequests) -> dict[str, Any]:
    created = await kbs.call("create", body.knowledge_base_name, body.kb_info, body.embed_model)
    note = f"; {created['note']}" if "note" in created else ""
    return kb_body(created, f"created knowledge base {body.knowledge_base_name}{note}")


@router.post("/delete_knowledge_base", responses=_documented())
async def delete_knowledge_base(body: Annotated[KnowledgeBaseRef | KbName, Body()], kbs: KbRequests) -> dict[str, Any]:
    """`{"knowledge_base_name": ...}`, or the bare name as the JSON body (what Chatchat's client sends)."""
    name = body if isinstance(body, str) else body.knowledge_base_name
    await kbs.call("delete", name)
    return kb_body(None, f"deleted knowledge base {name}")


@router.post("/update_info", responses=_documented())
async def update_info(body: UpdateInfo, kbs: KbRequests) -> dict[str, Any]:
    """Chatchat's: a new description for the KB (`kb_info`), the rest as it was."""
    updated = await kbs.call("update_info", body.knowledge_base_name, body.kb_info)
    return kb_body(updated, f"updated the description of knowledge base {body.knowledge_base_name}")


@router.get("/list_files", responses=_documented())
async def list_files(knowledge_base_name: KbNameQuery,
                     kbs: KbRequests) -> dict[str, Any]:
    return kb_body(await kbs.call("list_files", knowledge_base_name))


@router.get("/eval_set", responses=_documented())
async def read_eval_set(knowledge_base_name: KbNameQuery,
                        kbs: KbRequests) -> dict[str, Any]:
    """The KB's golden set (`data.items`, empty when it has none): what `scripts.evaluate` and a rollout run."""
    items = await kbs.call("read_eval_set", knowledge_base_name)
    return kb_body({"items": items, "count": len(items)})


@router.post("/eval_set", responses=_documented())
async def write_eval_set(body: EvalSet, kbs: KbRequests) -> dict[str, Any]:
    """Replace the KB's golden set whole; a bad item is a 422 naming it, and the stored set stays as it was."""
    stored = await kbs.call("write_eval_set", body.knowledge_base_name, [item.model_dump() for item in body.items])
    missing = stored["files_not_in_kb"]
    note = f"; {len(missing)} named file(s) are not in it: see files_not_in_kb" if missing else ""
    return kb_body(stored, f"stored {stored['count']} evaluation questions for {body.knowledge_base_name}{note}")


@router.post("/eval_results", responses=_documented())
async def report_eval_results(body: EvalResults, services: Services) -> dict[str, Any]:
    """A version's golden-set scores (what `scripts.evaluate` and a rollout computed), kept for Prometheus
    as `rag_golden_score{version, knowledge_base, measure}`."""
    check_kb_name(body.knowledge_base_name)
    services.answers.metrics.golden_scores(body.version, body.knowledge_base_name,
                                           {str(k): v for k, v in body.scores.items()})
    return kb_body(None, f"recorded the golden-set scores of {body.version} on {body.knowledge_base_name}")


@router.get("/download_doc", response_model=None, responses=_documented(
    {200: {"description": "the original bytes", "content": {"application/octet-stream": {}}}}))
async def download_doc(knowledge_base_name: KbNameQuery,
                       file_name: Annotated[str, Query(min_length=1, max_length=1024)],
                       kbs: KbRequests) -> Response:
    data = await kbs.call("download", knowledge_base_name, file_name)
    media = mimetypes.guess_type(file_name)[0] or "application/octet-stream"
    disposition = f"attachment; filename*=UTF-8''{quote(file_name.rsplit('/', 1)[-1])}"
    return Response(data, media_type=media, headers={"content-disposition": disposition})


@router.post("/upload_docs", responses=_documented(_JOB), openapi_extra=form_body(UploadForm, ["knowledge_base_name"]))
async def upload_docs(request: Request, kbs: KbRequests) -> JSONResponse:
    """Multipart: `files` (many), `knowledge_base_name`, `override`, `chunk_size`, `chunk_overlap`, `wait`.
    The files stream to a spool folder the manager made and its job removes; parsed by hand so that a
    part without a file name is a 400 naming the problem, not a schema error."""
    spool = pathlib.Path(await kbs.call("spool"))
    try:
        upload = await receive_upload(request, spool, kbs.settings)
        body = _form(UploadForm, upload.fields)
        check_kb_name(body.knowledge_base_name)
        if not upload.files:  # every file of a type no loader reads: nothing to build, as Chatchat answers
            await discard(spool)
            await kbs.call("list_files", body.knowledge_base_name)  # still a 404 for a KB that does not exist
            return _finished(200, kb_body({"failed_files": upload.refused, "changed_files": []},
                                          "no file of this upload can be indexed; see failed_files"))
        changes = Changes(add=dict(upload.files), override=body.override, spool=spool, refused=upload.refused)
        job_id = await kbs.call("submit", "upload_docs", body.knowledge_base_name, changes, body.splitter())
    except BaseException:  # not submitted: nobody else will remove the folder
        await discard(spool)
        raise
    return _finished(*await kbs.finish(job_id, body.wait, f"upload of {len(upload.files)} file(s)"))


@router.post("/upload_temp_docs", responses=_documented(_JOB), openapi_extra=form_body(TempUploadForm))
async def upload_temp_docs(request: Request, kbs: KbRequests) -> JSONResponse:
    """Chatchat's file chat: multipart `files` (many), optional `prev_id`/`knowledge_id` (an earlier
    upload's id: add to it), `chunk_size`, `chunk_overlap`. Builds a temporary knowledge base through the
    Embedder and splitter every upload uses and answers once it serves: `data.id` for
    `/knowledge_base/temp_kb/{id}/chat/completions`, `/chat/file_chat` and `search_temp_docs`;
    `data.failed_files` as Chatchat lists them. Never listed; deleted after `temporary.idle_ttl_s`
    unused and when the service restarts."""
    limits = kbs.settings.model_copy(update={"max_files": kbs.settings.temporary.max_files})
    spool = pathlib.Path(await kbs.call("spool"))
    try:
        upload = await receive_upload(request, spool, limits)
        body = _form(TempUploadForm, upload.fields)
        if not upload.files:  # nothing to chat over: no KB made, the reasons said (200, as Chatchat answers)
            await discard(spool)
            return _finished(200, kb_body({"id": None, "failed_files": _as_chatchat_lists(upload.refused)},
                                          "no file of this upload can be indexed; see failed_files"))
        changes = Changes(add=dict(upload.files), spool=spool, refused=upload.refused)
        started = await kbs.call("upload_temporary", body.temp_id, changes, body.splitter())
    except BaseException:
        await discard(spool)
        raise
    status, answer = await kbs.finish(started["job_id"], True, f"upload of {len(upload.files)} file(s) for a file chat")
    view = answer["data"]
    if status == 202:
        return _finished(202, kb_body({"id": started["id"], "job_id": started["job_id"]}, answer["msg"], 202))
    failed = _as_chatchat_lists(view["failed_files"])
    if view["index_version"] is None:  # the manager has deleted the KB it made for them
        return _finished(200, kb_body({"id": None, "failed_files": failed},
                                      "no file of this upload could be indexed; see failed_files"))
    return _finished(200, kb_body({"id": started["id"], "failed_files": failed, "job_id": started["job_id"],
                                   "served": view.get("served", False)},
                                  f"uploaded {len(view['changed_files'])} file(s) for a file chat"))


def _as_chatchat_lists(failed: dict[str, str]) -> list[dict[str, str]]:
    """upload_temp_docs lists failures as one `{file: why}` per file (upload_docs gives one dict)."""
    return [{name: why} for name, why in failed.items()]


def _form(model: type[FormT], fields: dict[str, str]) -> FormT:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


@router.post("/delete_docs", responses=_documented(_JOB))
async def delete_docs(body: DeleteDocs, kbs: KbRequests) -> JSONResponse:
    names = tuple(dict.fromkeys(body.file_names))
    changes = Changes(delete=names, keep_originals=not body.delete_content)
    job_id = await kbs.call("submit", "delete_docs", body.knowledge_base_name, changes, None)
    return _finished(*await kbs.finish(job_id, body.wait, f"deletion of {len(names)} file(s)"))


@router.post("/update_docs", responses=_documented(_JOB))
async def update_docs(body: UpdateDocs, kbs: KbRequests) -> JSONResponse:
    names = tuple(dict.fromkeys(body.file_names))
    splitter = {k: v for k, v in (("chunk_size", body.chunk_size), ("chunk_overlap", body.chunk_overlap))
                if v is not None}
    job_id = await kbs.call("submit", "update_docs", body.knowledge_base_name, Changes(reindex=names),
                           splitter or None)
    return _finished(*await kbs.finish(job_id, body.wait, f"re-indexing of {len(names)} file(s)"))


@router.get("/jobs/{job_id}", responses=_documented())
async def job(job_id: Annotated[str, Path(min_length=1, max_length=64)], kbs: KbRequests) -> dict[str, Any]:
    view = await kbs.job(job_id)
    return kb_body(view, view["state"])


@router.post("/recreate_vector_store", response_model=None, responses=_documented(
    {200: {"description": "SSE progress events `{code, msg, total, finished, job}`; the stream ends after the last",
           "content": {"text/event-stream": {"schema": SSE_EVENTS}}}}))
async def recreate_vector_store(body: KnowledgeBaseRef, kbs: KbRequests) -> StreamingResponse:
    job_id = await kbs.call("submit", "recreate_vector_store", body.knowledge_base_name,
                           Changes(rescan=True, full=True), None)
    return StreamingResponse(_progress_events(kbs, job_id), media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _progress_events(requests: KnowledgeBaseRequests, job_id: str) -> AsyncIterator[str]:
    # No `[DONE]` after the last event: Chatchat's client parses every event as JSON (and logs one that is not).
    async for event in requests.progress(job_id):
        yield _event(event)
