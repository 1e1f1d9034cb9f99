"""The answering routes: OpenAI-compatible chat and embeddings, Chatchat-style kb_chat and search, the
models, per-version statistics and the probes. Each parses (FastAPI + `rag.api` schemas), calls a
service, and maps the result; the logic is in `GatewayService` and `EmbeddingsService`.

No `from __future__ import annotations` here: FastAPI must see real annotation objects.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from deployments.gateway.answer_service import AnswerStream, GatewayService
from deployments.gateway.serve_handles import is_overload
from deployments.gateway.services import GatewayServices, Services
from deployments.gateway.statuses import SSE_EVENTS, bounded, documented, status_for
from rag.api import (
    AnswerFormatter,
    ChatCompletionRequest,
    CompletionFormatter,
    EmbeddingRequest,
    EmbedTexts,
    KbChatRequest,
    LocalKbChatRequest,
    SearchDocsRequest,
    chatchat_references,
    error_body,
    sse,
)
from rag.config import is_kb_name
from rag.constants import EVALUATE_HEADER
from rag.errors import KnowledgeBaseNotFoundError, RagError
from rag.file_chat import FileChatFormatter, FileChatRequest, SearchTempDocs, file_references
from rag.kb_api import kb_body
from rag.kb_store import is_temporary
from rag.records import AnswerStart, Question

logger = logging.getLogger("rag.gateway")
router = APIRouter()
VERSION_HEADER = "x-rag-version"
T = TypeVar("T")

STREAM_OR_JSON: dict[int | str, dict[str, Any]] = {
    200: {"description": "an SSE stream of `chat.completion.chunk`s (`stream: true`) or one JSON body",
                        "content": {"text/event-stream": {"schema": SSE_EVENTS}, "application/json": {}}}}
ANSWER_ERRORS = documented(400, 401, 404, 413, 422, 500, 503, 504)
READ_ERRORS = documented(401, 500, 503, 504)


def _hop(call: Awaitable[T], timeout_s: float, what: str) -> Awaitable[T]:
    return bounded(call, timeout_s, what, is_overload)


def _not_temporary(knowledge_base: str) -> str:
    """A temporary KB answers only on its own routes, by id (where its idle clock is kept)."""
    if is_temporary(knowledge_base):
        raise KnowledgeBaseNotFoundError(f"no knowledge base {knowledge_base!r}")
    return knowledge_base


async def _temporary(services: GatewayServices, temp_id: str) -> str:
    """The KB name of a live temporary KB (404 once it is gone), its idle clock reset."""
    name: str = await services.knowledge_bases.call("use_temporary", temp_id)
    return name


async def _answer(service: GatewayService, question: Question, key: str | None, stream: bool,
                  formatter: AnswerFormatter, endpoint: str,
                  evaluate: str | None = None) -> StreamingResponse | JSONResponse:
    started = time.perf_counter()
    endpoint = "evaluation" if evaluate else endpoint
    try:
        if evaluate:
            version, first, rest = await service.open_evaluation(question, evaluate)
        else:
            version, first, rest = await service.open_answer(question, key)
    except RagError as exc:  # refused before its first byte: counted, as a cut stream is (stream_error)
        service.metrics.count_request(endpoint, status_for(exc))
        raise
    if stream:
        return _streamed(service, version, first, rest, formatter, started, endpoint)
    events = await service.collect(version, first, rest, started, endpoint)
    return JSONResponse(formatter.completion(events), headers={VERSION_HEADER: version})


def _streamed(service: GatewayService, version: str, first: AnswerStart, rest: AnswerStream,
              formatter: AnswerFormatter, started: float, endpoint: str) -> StreamingResponse:
    return StreamingResponse(service.relay(formatter, version, first, rest, started, endpoint),
                             media_type="text/event-stream",
                             headers={VERSION_HEADER: version, "cache-control": "no-cache"})


EvaluateVersion = Annotated[str | None, Header(
    alias=EVALUATE_HEADER, max_length=64,
    description="golden-set evaluation only: the version that must answer (even at weight 0); the answer is "
                "not counted as user traffic in /stats and never copied to a shadow candidate")]


@router.post("/v1/chat/completions", response_model=None, responses={**STREAM_OR_JSON, **ANSWER_ERRORS})
async def chat_completions(body: ChatCompletionRequest, services: Services,
                           evaluate: EvaluateVersion = None) -> StreamingResponse | JSONResponse:
    services.first_traffic()
    service = services.answers
    cfg = service.config
    question = body.to_question(_not_temporary(service.knowledge_base_for(body)), cfg.limits, cfg.max_history_turns)
    return await _answer(service, question, body.sticky_key, body.stream, CompletionFormatter(body.model),
                         "chat_completions", evaluate)


@router.post("/chat/kb_chat", response_model=None, responses={**STREAM_OR_JSON, **ANSWER_ERRORS})
async def kb_chat(body: KbChatRequest, request: Request, services: Services) -> StreamingResponse | JSONResponse:
    """Chatchat's KB chat (0.3's body, 0.2's names too): `docs` in the first chunk are Chatchat's
    reference strings; `score_threshold` is Chatchat's distance (0-2). `mode: temp_kb` answers from the
    temporary KB whose id is `kb_name`."""
    services.first_traffic()
    cfg = services.answers.config
    render: Callable[[list[dict[str, Any]]], list[Any]] = file_references
    if body.mode == "temp_kb":
        kb = await _temporary(services, body.knowledge_base)
    else:
        kb = _not_temporary(body.knowledge_base)
        render = chatchat_references(kb, str(request.base_url))
    question = body.to_question(kb, cfg.limits, cfg.max_history_turns)
    formatter = CompletionFormatter(body.model or body.knowledge_base, docs_key="docs", render=render, chatchat=True)
    if body.return_direct:
        return await _documents_only(services.answers, question, body.conversation_id, body.stream, formatter)
    return await _answer(services.answers, question, body.conversation_id, body.stream, formatter, "kb_chat")


@router.post("/knowledge_base/local_kb/{knowledge_base_name}/chat/completions", response_model=None,
             responses={**STREAM_OR_JSON, **ANSWER_ERRORS})
async def local_kb_chat(knowledge_base_name: Annotated[str, Path(min_length=1, max_length=128)],
                        body: LocalKbChatRequest, request: Request,
                        services: Services) -> StreamingResponse | JSONResponse:
    """Chatchat 0.3's OpenAI-compatible KB chat, as its web UI calls it with the openai SDK (base_url
    `.../knowledge_base/local_kb/<kb>`, `extra_body` top_k, score_threshold (distance), prompt_name,
    return_direct): the first chunk carries `docs` (reference strings) and no text."""
    services.first_traffic()
    kb = _not_temporary(knowledge_base_name)
    return await _kb_completions(services, body, kb, chatchat_references(kb, str(request.base_url)), "local_kb_chat")


@router.post("/knowledge_base/temp_kb/{knowledge_id}/chat/completions", response_model=None,
             responses={**STREAM_OR_JSON, **ANSWER_ERRORS})
async def temp_kb_chat(knowledge_id: Annotated[str, Path(min_length=1, max_length=64)],
                       body: LocalKbChatRequest, services: Services) -> StreamingResponse | JSONResponse:
    """The same over a temporary KB (Chatchat's file chat in its web UI: base_url
    `.../knowledge_base/temp_kb/<id>`, the id upload_temp_docs answered); 404 once it is gone."""
    services.first_traffic()
    kb = await _temporary(services, knowledge_id)
    return await _kb_completions(services, body, kb, file_references, "temp_kb_chat")


async def _kb_completions(services: GatewayServices, body: LocalKbChatRequest, kb: str,
                          render: Callable[[list[dict[str, Any]]], list[Any]],
                          endpoint: str) -> StreamingResponse | JSONResponse:
    service, cfg = services.answers, services.answers.config
    question = body.to_question(kb, cfg.limits, cfg.max_history_turns)
    formatter = CompletionFormatter(body.model, docs_key="docs", render=render)
    if body.return_direct:
        return await _documents_only(service, question, body.sticky_key, body.stream, formatter)
    return await _answer(service, question, body.sticky_key, body.stream, formatter, endpoint)


@router.post("/chat/file_chat", response_model=None, responses={**STREAM_OR_JSON, **ANSWER_ERRORS})
async def file_chat(body: FileChatRequest, services: Services) -> StreamingResponse:
    """Chatchat's file chat over a temporary KB: SSE events `{"answer": token}`, then `{"docs": [...]}`
    (`stream: false`: one event with both), without `[DONE]`, as Chatchat's client reads them."""
    services.first_traffic()
    service, cfg = services.answers, services.answers.config
    kb = await _temporary(services, body.knowledge_id)
    question = body.to_question(kb, cfg.limits, cfg.max_history_turns)
    formatter = FileChatFormatter()
    started = time.perf_counter()
    try:
        version, first, rest = await service.open_answer(question, None)
    except RagError as exc:
        service.metrics.count_request("file_chat", status_for(exc))
        raise
    headers = {VERSION_HEADER: version, "cache-control": "no-cache"}
    if body.stream:
        return StreamingResponse(service.relay(formatter, version, first, rest, started, "file_chat"),
                                 media_type="text/event-stream", headers=headers)
    events = await service.collect(version, first, rest, started, "file_chat")
    return StreamingResponse(iter([sse(formatter.completion(events))]), media_type="text/event-stream",
                             headers=headers)


async def _documents_only(service: GatewayService, question: Question, key: str | None, stream: bool,
                          formatter: CompletionFormatter) -> StreamingResponse | JSONResponse:
    """`return_direct`: what the search finds, without generating an answer."""
    version, docs = await _hop(service.search(question, key), service.config.request_timeout_s, "the search")
    body = formatter.documents_only(docs, question.knowledge_base, version, stream)
    headers = {VERSION_HEADER: version}
    if stream:
        return StreamingResponse(iter([sse(body), formatter.done]), media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"})
    return JSONResponse(body, headers=headers)


@router.post("/knowledge_base/search_docs", responses=ANSWER_ERRORS)
async def search_docs(body: SearchDocsRequest, services: Services) -> JSONResponse:
    services.first_traffic()
    cfg = services.answers.config
    if not is_kb_name(_not_temporary(body.knowledge_base_name)):
        # Free-form on this question route, as on the others: a name no KB can have names none (404), on
        # the listing path too, where the KB manager would call it an invalid name (400).
        raise KnowledgeBaseNotFoundError(f"no knowledge base {body.knowledge_base_name!r}")
    if not body.query.strip():  # as Chatchat: nothing asked lists what the filters name, or nothing
        if not body.filtered:
            return JSONResponse([])
        listed = await services.knowledge_bases.call("list_chunks", body.knowledge_base_name, body.file_name,
                                                     body.metadata)
        return JSONResponse(listed)
    version, docs = await _hop(services.answers.search(body.to_question(cfg.limits)), cfg.request_timeout_s,
                                  "the search")
    return JSONResponse(body.keep(docs), headers={VERSION_HEADER: version})


@router.post("/knowledge_base/search_temp_docs", responses=ANSWER_ERRORS)
async def search_temp_docs(body: SearchTempDocs, services: Services) -> JSONResponse:
    """Chatchat's search of a temporary KB: its passages as search_docs gives them."""
    services.first_traffic()
    cfg = services.answers.config
    kb = await _temporary(services, body.knowledge_id)
    if not body.query.strip():
        return JSONResponse([])
    version, docs = await _hop(services.answers.search(body.to_question(kb, cfg.limits)), cfg.request_timeout_s,
                               "the search")
    return JSONResponse(docs, headers={VERSION_HEADER: version})


@router.post("/v1/embeddings", responses=ANSWER_ERRORS)
async def embeddings(body: EmbeddingRequest, services: Services) -> dict[str, Any]:
    """OpenAI's embeddings: `input` a string or a list, `model` a knowledge base or the embedding model,
    `encoding_format` float or base64; through the Embedder's batching, a long list in slices (each call to
    the Embedder has its own deadline, so 2,048 texts are not held to one hop's)."""
    return await services.embeddings.create(body)


@router.post("/other/embed_texts", responses=ANSWER_ERRORS)
async def embed_texts(body: EmbedTexts, services: Services) -> dict[str, Any]:
    """Chatchat's: `{code, msg, data: [[float, ...], ...]}`, the vectors in the order of `texts`."""
    vectors, model, note = await services.embeddings.chatchat_vectors(body.texts, body.embed_model, body.to_query)
    return kb_body(vectors, f"embedded {len(vectors)} texts with {model}" + (f"; {note}" if note else ""))


@router.get("/v1/models", responses=READ_ERRORS)
async def list_models(services: Services) -> dict[str, Any]:
    models = await _hop(services.answers.models(), services.answers.config.request_timeout_s,
                           "listing the models")
    return {"object": "list", "data": models}


@router.get("/health")
async def health(services: Services) -> dict[str, Any]:
    return {"status": "alive", "uptime_s": round(time.monotonic() - services.answers.started, 3)}


@router.get("/stats", response_model=None, responses=documented(401, 422, 503))
async def stats(services: Services, window_s: float | None = Query(None, gt=0, le=86_400),
                scope: Literal["cluster", "replica"] = "cluster") -> dict[str, Any] | JSONResponse:
    """Per-version requests, error rate, p50/p90/p99 time to first token and in-flight over the last
    `window_s` seconds, of every gateway replica (`scope=replica`: of the one answering): what
    `rollout` compares."""
    service = services.answers
    body = {"weights": service.split.weights, "draining": service.draining, "window_s": window_s, "scope": scope}
    if scope == "replica":
        return {**body, "versions": service.stats.summary(window_s)}
    try:
        merged = await asyncio.wait_for(services.merged_stats(window_s), 5)
    except Exception as exc:
        logger.warning("event=STATS_UNAVAILABLE error=%r", exc)
        return JSONResponse(error_body("the merged statistics of the gateway replicas are unavailable", 503),
                            status_code=503, headers={"retry-after": "1"})
    return {**body, **merged}


@router.get("/ready", responses={503: {"description": "starting or draining (same body as 200)"}})
async def ready(services: Services) -> JSONResponse:
    state, service = services.readiness(), services.answers
    status = "draining" if service.draining else "ready" if state.ready else "starting"
    body = {"status": status, "versions": service.split.live, "weights": service.split.weights,
            "waiting_for": state.waiting_for, "serving": sorted(state.serving), "in_flight": service.in_flight.count,
            # Stages at zero replicas by design (autoscaling min_replicas 0): ready, a request wakes them.
            "scaled_to_zero": state.scaled_to_zero, "replicas": state.replicas}
    if state.why:
        body["why"] = state.why  # Serve's status of each stage waited for, and the error it last raised
    if state.scaled_to_zero:
        body["note"] = "scaled to zero, cold start on demand: " + ", ".join(
            f"{v}/{stage}" for v, stages in sorted(state.scaled_to_zero.items()) for stage in stages)
    return JSONResponse(body, status_code=200 if status == "ready" else 503)
