"""HTTP ingress: OpenAI-compatible chat, Chatchat-style kb_chat and search, health and readiness.

Three parts, as in vLLM's OpenAI entrypoint: request/response schemas (`rag.api`), a service with the
logic (`GatewayService`), and routes of a few lines that parse, call and map.

No `from __future__ import annotations` here: Serve's ingress rebuilds the route methods, and FastAPI
must see real annotation objects to read the request bodies.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import console_routes, kb_routes
from deployments.embeddings import Embeddings
from deployments.gateway_service import AnswerStream, GatewayService
from deployments.handles import ServeHandles
from deployments.http_guard import OPEN_PATHS, GuardSettings, HttpGuard
from deployments.readiness import ReadinessMonitor
from deployments.replica import ReplicaLifecycle
from deployments.stats_board import report_forever, stats_board
from deployments.statuses import documented, status_for
from rag.api import (
    ChatCompletionRequest,
    CompletionFormatter,
    EmbeddingRequest,
    KbChatRequest,
    SearchDocsRequest,
    error_body,
    summarize_problems,
)
from rag.auth import ApiKeys
from rag.config import GatewayConfig, TrafficConfig, validate
from rag.errors import (
    OverloadedError,
    RagError,
    UpstreamTimeoutError,
)
from rag.kb_api import kb_body
from rag.records import AnswerStart, Question

logger = logging.getLogger("rag.gateway")
VERSION_HEADER = "x-rag-version"
KB_PREFIX = "/knowledge_base/"
RETRY_AFTER_S = "1"
T = TypeVar("T")

# What a 5xx body says in words; the exception's own text (paths, device messages) goes to the log only.
PUBLIC_FAILURE = {
    500: "internal error: the gateway could not complete the request",
    504: "a stage of the service did not answer in time",
}


STREAM_OR_JSON = {200: {"description": "an SSE stream of `chat.completion.chunk`s (`stream: true`) or one JSON body",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}, "application/json": {}}}}
ANSWER_ERRORS = documented(400, 401, 404, 413, 422, 500, 503, 504)
READ_ERRORS = documented(401, 500, 503, 504)

app = FastAPI(title="rag-serve", summary="Knowledge-base question answering on Ray Serve")


def root_cause(exc: BaseException) -> BaseException:
    """The library error inside Ray's wrappers: an error raised in another replica arrives as a
    RayTaskError subclass whose text is a whole traceback, which must not reach a client."""
    while isinstance(getattr(exc, "cause", None), BaseException):
        exc = exc.cause  # type: ignore[attr-defined]
    return exc


def error_response(exc: RagError, request_id: str, path: str = "") -> JSONResponse:
    """The response for a library error: the status from STATUS_BY_ERROR, its headers, a safe message;
    on the knowledge-base routes, Chatchat's `{code, msg, data}` beside the OpenAI `error` object."""
    status = status_for(exc)
    message = str(root_cause(exc))
    if status >= 500:
        logger.warning("event=REQUEST_FAILED request_id=%s status=%d error=%r", request_id, status, exc)
        message = f"{PUBLIC_FAILURE.get(status, message)} (request id {request_id})"
    headers = {"www-authenticate": "Bearer"} if status == 401 else {}
    if status in (503, 504):
        headers["retry-after"] = RETRY_AFTER_S
    return JSONResponse(_shaped(error_body(message, status), path), status_code=status, headers=headers)


def _shaped(body: dict[str, Any], path: str) -> dict[str, Any]:
    if path.startswith(KB_PREFIX):
        error = body["error"]
        return {**kb_body(None, error["message"], error["code"]), **body}
    return body


def _request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "unknown"))


@app.exception_handler(RagError)
async def _rag_error(request: Request, exc: RagError) -> JSONResponse:
    return error_response(exc, _request_id(request), request.url.path)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(root_cause(exc), BackPressureError):  # a stage's queue is full: refuse now, not later
        return error_response(OverloadedError("the service is at capacity; retry shortly"), _request_id(request),
                              request.url.path)
    logger.exception("event=UNHANDLED request_id=%s error=%r", _request_id(request), exc)
    return JSONResponse(_shaped(error_body(f"{PUBLIC_FAILURE[500]} (request id {_request_id(request)})", 500),
                                request.url.path), status_code=500)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # FastAPI's and Starlette's own refusals (an unparsable body, no such route, method not allowed) in
    # the same OpenAI shape as every other error, keeping their headers (Allow on a 405).
    return JSONResponse(_shaped(error_body(str(exc.detail)[:200], exc.status_code), request.url.path),
                        status_code=exc.status_code, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = exc.errors()
    malformed = any(p.get("type") == "json_invalid" for p in problems)
    status = 400 if malformed else 422
    param = ".".join(str(x) for x in problems[0]["loc"])[:100] if problems else None
    shown = _replica_guard().errors_shown
    message = f"invalid request body: {summarize_problems(problems, shown)}"
    return JSONResponse(_shaped(error_body(message, status, param), request.url.path), status_code=status)


def _replica_guard() -> GuardSettings:
    # The middleware is built with the app, before any replica exists; the settings are the replica's.
    return serve.get_replica_context().servable_object.guard  # type: ignore[no-any-return]


async def _bounded(call: Awaitable[T], timeout_s: float, what: str) -> T:
    """One hop with a deadline; a full queue downstream is an immediate 503, not a 500."""
    try:
        return await asyncio.wait_for(call, timeout_s)
    except TimeoutError:
        raise UpstreamTimeoutError(f"{what} took longer than {timeout_s:g}s") from None
    except BackPressureError:
        raise OverloadedError(f"{what}: the service is at capacity; retry shortly") from None


def _openapi() -> dict[str, Any]:
    """FastAPI's description plus the bearer scheme the guard enforces (all routes but the probes)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        schema.setdefault("components", {})["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"apiKey": []}]
        for path in OPEN_PATHS:
            for operation in schema["paths"].get(path, {}).values():
                operation["security"] = []
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]
app.include_router(kb_routes.router)
app.include_router(console_routes.router)
app.add_middleware(HttpGuard, settings=_replica_guard, refuse=error_response)


def _answer_response(service: GatewayService, version: str, first: AnswerStart, rest: AnswerStream,
                     formatter: CompletionFormatter, started: float, endpoint: str) -> StreamingResponse:
    return StreamingResponse(service.relay(formatter, version, first, rest, started, endpoint),
                             media_type="text/event-stream",
                             headers={VERSION_HEADER: version, "cache-control": "no-cache"})


async def _answer(service: GatewayService, question: Question, key: str | None, stream: bool,
                  formatter: CompletionFormatter, endpoint: str) -> StreamingResponse | JSONResponse:
    started = time.perf_counter()
    try:
        version, first, rest = await service.open_answer(question, key)
    except RagError as exc:  # refused before its first byte: counted, as a cut stream is (stream_error)
        service.metrics.count_request(endpoint, status_for(exc))
        raise
    if stream:
        return _answer_response(service, version, first, rest, formatter, started, endpoint)
    events = await service.collect(version, first, rest, started, endpoint)
    return JSONResponse(formatter.completion(events), headers={VERSION_HEADER: version})


def _guard_settings(config: GatewayConfig) -> GuardSettings:
    if config.allow_unauthenticated:
        logger.warning("event=AUTH mode=none reason=allow_unauthenticated: every route is open to anyone "
                       "who can reach the gateway")
        keys = None
    else:
        keys = ApiKeys(config.api_key_path)
        logger.info("event=AUTH mode=api_key file=%s", config.api_key_path)
    uploads = {"/knowledge_base/upload_docs": max(config.knowledge_base.max_upload_bytes, config.limits.max_body_bytes)}
    return GuardSettings(keys, config.limits.max_body_bytes, config.limits.validation_errors_shown, uploads)


@serve.deployment(name="Gateway")
@serve.ingress(app)
class GatewayDeployment:
    """Routes: each parses (FastAPI + `rag.api` schemas), calls the service, and maps the result."""

    async def __init__(self, config: GatewayConfig, kb_manager: DeploymentHandle) -> None:  # type: ignore[misc]
        self._life = ReplicaLifecycle("gateway")
        self.kb_manager = kb_manager
        self._embeddings = Embeddings()
        self.guard = _guard_settings(config)  # first: a missing key file fails the replica before it serves
        self.service = GatewayService(config, self._life.metrics, self._life.in_flight, ServeHandles(),
                                      lambda: self.readiness.current.serving)
        self.readiness = ReadinessMonitor(lambda: self.service.split.live, config.ready_poll_interval_s,
                                          self.service.prime, lambda: list(self.service.traffic.weights))
        self._board = stats_board(config.stats_window_records)
        self._stop_reporting = asyncio.Event()
        replica = serve.get_replica_context().replica_id.unique_id
        self._reporter = asyncio.create_task(report_forever(self._board, replica, self.service.stats,
                                                            self._stop_reporting))
        await self._life.start("HTTP routes and the readiness monitor", lambda: None, lambda: None)

    def serving_versions(self) -> list[str]:
        """Versions that serve now, the heaviest first: the knowledge-base API embeds through the first."""
        serving, weights = self.readiness.current.serving, self.service.split.weights
        return sorted((v for v in weights if v in serving), key=lambda v: -weights[v])

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        # Weights only: applied in place, no replica restart. Idempotent, as Serve may call it twice.
        traffic = validate(TrafficConfig, user_config, "Gateway user_config")
        self.service.set_traffic(traffic)
        logger.info("event=TRAFFIC_WEIGHTS weights=%s draining=%s", traffic.weights, traffic.draining)

    @app.post("/v1/chat/completions", response_model=None, responses={**STREAM_OR_JSON, **ANSWER_ERRORS})
    async def chat_completions(self, body: ChatCompletionRequest) -> StreamingResponse | JSONResponse:
        self._life.log.first_traffic()
        cfg = self.service.config
        question = body.to_question(self.service.knowledge_base_for(body), cfg.limits, cfg.max_history_turns)
        return await _answer(self.service, question, body.sticky_key, body.stream, CompletionFormatter(body.model),
                             "chat_completions")

    @app.post("/chat/kb_chat", response_model=None, responses={**STREAM_OR_JSON, **ANSWER_ERRORS})
    async def kb_chat(self, body: KbChatRequest) -> StreamingResponse | JSONResponse:
        self._life.log.first_traffic()
        cfg = self.service.config
        question = body.to_question(cfg.limits, cfg.max_history_turns)
        formatter = CompletionFormatter(body.model or body.knowledge_base_name, docs_key="docs")
        return await _answer(self.service, question, body.conversation_id, body.stream, formatter, "kb_chat")

    @app.post("/knowledge_base/search_docs", responses=ANSWER_ERRORS)
    async def search_docs(self, body: SearchDocsRequest) -> JSONResponse:
        self._life.log.first_traffic()
        cfg = self.service.config
        version, docs = await _bounded(self.service.search(body.to_question(cfg.limits)), cfg.request_timeout_s,
                                       "the search")
        return JSONResponse(docs, headers={VERSION_HEADER: version})

    @app.post("/v1/embeddings", responses=ANSWER_ERRORS)
    async def embeddings(self, body: EmbeddingRequest) -> dict[str, Any]:
        """OpenAI's embeddings: `input` a string or a list, `model` a knowledge base or the embedding model,
        `encoding_format` float or base64; through the Embedder's batching."""
        return await _bounded(self._embeddings.create(self, body), self.service.config.request_timeout_s,
                              "the embedding")

    @app.get("/v1/models", responses=READ_ERRORS)
    async def list_models(self) -> dict[str, Any]:
        models = await _bounded(self.service.models(), self.service.config.request_timeout_s, "listing the models")
        return {"object": "list", "data": models}

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "alive", "uptime_s": round(time.monotonic() - self.service.started, 3)}

    @app.get("/stats", response_model=None, responses=documented(401, 422, 503))
    async def stats(self, window_s: float | None = Query(None, gt=0, le=86_400),
                    scope: Literal["cluster", "replica"] = "cluster") -> dict[str, Any] | JSONResponse:
        """Per-version requests, error rate, p50/p90/p99 time to first token and in-flight over the last
        `window_s` seconds, of every gateway replica (`scope=replica`: of the one answering): what
        `rollout` compares."""
        body = {"weights": self.service.split.weights, "draining": self.service.draining, "window_s": window_s,
                "scope": scope}
        if scope == "replica":
            return {**body, "versions": self.service.stats.summary(window_s)}
        try:
            merged = await asyncio.wait_for(self._board.summary.remote(window_s), 5)
        except Exception as exc:
            logger.warning("event=STATS_UNAVAILABLE error=%r", exc)
            return JSONResponse(error_body("the merged statistics of the gateway replicas are unavailable", 503),
                                status_code=503, headers={"retry-after": "1"})
        return {**body, **merged}

    @app.get("/ready", responses={503: {"description": "starting or draining (same body as 200)"}})
    async def ready(self) -> JSONResponse:
        state, service = self.readiness.current, self.service
        status = "draining" if service.draining else "ready" if state.ready else "starting"
        body = {"status": status, "versions": service.split.live, "weights": service.split.weights,
                "waiting_for": state.waiting_for, "serving": sorted(state.serving),
                "in_flight": service.in_flight.count}
        return JSONResponse(body, status_code=200 if status == "ready" else 503)

    def __del__(self) -> None:
        stop_reporting = getattr(self, "_stop_reporting", None)
        if stop_reporting:
            stop_reporting.set()
        # A constructor that failed (a missing key file) left no readiness monitor to stop.
        readiness = getattr(self, "readiness", None)
        self._life.stop(readiness.stop if readiness else lambda: None)

