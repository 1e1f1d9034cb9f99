"""HTTP ingress: OpenAI-compatible chat, Chatchat-style kb_chat and search, health and readiness.

Three parts, as in vLLM's OpenAI entrypoint: request/response schemas (`rag.api`), a service with the
logic (`GatewayService`), and routes of a few lines that parse, call and map.

No `from __future__ import annotations` here: Serve's ingress rebuilds the route methods, and FastAPI
must see real annotation objects to read the request bodies.
"""

import asyncio
import logging
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from deployments.gateway_service import AnswerStream, GatewayService
from deployments.handles import ServeHandles
from deployments.readiness import ReadinessMonitor
from deployments.replica import ReplicaLifecycle
from deployments.stats_board import report_forever, stats_board
from rag.api import ChatCompletionRequest, CompletionFormatter, KbChatRequest, SearchDocsRequest, error_body
from rag.config import GatewayConfig, TrafficConfig, validate
from rag.errors import (
    IndexMismatchError,
    InvalidRequestError,
    KnowledgeBaseNotFoundError,
    RagError,
    ServiceUnavailableError,
)
from rag.records import AnswerStart, Question

logger = logging.getLogger("rag.gateway")
VERSION_HEADER = "x-rag-version"

# The one place library errors become HTTP statuses.
STATUS_BY_ERROR: dict[type[RagError], int] = {
    InvalidRequestError: 400,
    KnowledgeBaseNotFoundError: 404,
    ServiceUnavailableError: 503,
    IndexMismatchError: 500,
}

app = FastAPI(title="rag-serve", summary="Knowledge-base question answering on Ray Serve")


def status_for(exc: RagError) -> int:
    return next((code for kind, code in STATUS_BY_ERROR.items() if isinstance(exc, kind)), 500)


def root_cause(exc: BaseException) -> BaseException:
    """The library error inside Ray's wrappers: an error raised in another replica arrives as a
    RayTaskError subclass whose text is a whole traceback, which must not reach a client."""
    while isinstance(getattr(exc, "cause", None), BaseException):
        exc = exc.cause  # type: ignore[attr-defined]
    return exc


@app.exception_handler(RagError)
async def _rag_error(_: Request, exc: RagError) -> JSONResponse:
    status = status_for(exc)
    headers = {"retry-after": "1"} if status == 503 else None
    return JSONResponse(error_body(str(root_cause(exc)), status), status_code=status, headers=headers)


@app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("event=UNHANDLED error=%r", exc)
    return JSONResponse(error_body(f"internal error ({type(root_cause(exc)).__name__})", 500), status_code=500)


@app.exception_handler(RequestValidationError)
async def _invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = exc.errors()
    malformed = any(p.get("type") == "json_invalid" for p in problems)
    message = "; ".join(f"{'.'.join(str(x) for x in p['loc'])}: {p['msg']}" for p in problems)
    status = 400 if malformed else 422
    param = ".".join(str(x) for x in problems[0]["loc"]) if problems else None
    return JSONResponse(error_body(f"invalid request body: {message}", status, param), status_code=status)


def _answer_response(service: GatewayService, version: str, first: AnswerStart, rest: AnswerStream,
                     formatter: CompletionFormatter, started: float, endpoint: str) -> StreamingResponse:
    return StreamingResponse(service.relay(formatter, version, first, rest, started, endpoint),
                             media_type="text/event-stream",
                             headers={VERSION_HEADER: version, "cache-control": "no-cache"})


async def _answer(service: GatewayService, question: Question, key: str | None, stream: bool,
                  formatter: CompletionFormatter, endpoint: str) -> StreamingResponse | JSONResponse:
    started = time.perf_counter()
    version, first, rest = await service.open_answer(question, key)
    if stream:
        return _answer_response(service, version, first, rest, formatter, started, endpoint)
    events = await service.collect(version, first, rest, started, endpoint)
    return JSONResponse(formatter.completion(events), headers={VERSION_HEADER: version})


@serve.deployment(name="Gateway")
@serve.ingress(app)
class GatewayDeployment:
    """Routes: each parses (FastAPI + `rag.api` schemas), calls the service, and maps the result."""

    async def __init__(self, config: GatewayConfig) -> None:  # type: ignore[misc]
        self._life = ReplicaLifecycle("gateway")
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

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        # Weights only: applied in place, no replica restart. Idempotent, as Serve may call it twice.
        traffic = validate(TrafficConfig, user_config, "Gateway user_config")
        self.service.set_traffic(traffic)
        logger.info("event=TRAFFIC_WEIGHTS weights=%s draining=%s", traffic.weights, traffic.draining)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(self, body: ChatCompletionRequest) -> StreamingResponse | JSONResponse:
        self._life.log.first_traffic()
        cfg = self.service.config
        question = body.to_question(self.service.knowledge_base_for(body), cfg.max_question_chars,
                                    cfg.max_history_turns)
        return await _answer(self.service, question, body.sticky_key, body.stream, CompletionFormatter(body.model),
                             "chat_completions")

    @app.post("/chat/kb_chat", response_model=None)
    async def kb_chat(self, body: KbChatRequest) -> StreamingResponse | JSONResponse:
        self._life.log.first_traffic()
        cfg = self.service.config
        question = body.to_question(cfg.max_question_chars, cfg.max_history_turns)
        formatter = CompletionFormatter(body.model or body.knowledge_base_name, docs_key="docs")
        return await _answer(self.service, question, body.conversation_id, body.stream, formatter, "kb_chat")

    @app.post("/knowledge_base/search_docs")
    async def search_docs(self, body: SearchDocsRequest) -> JSONResponse:
        self._life.log.first_traffic()
        version, docs = await self.service.search(body.to_question(self.service.config.max_question_chars))
        return JSONResponse(docs, headers={VERSION_HEADER: version})

    @app.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": await self.service.models()}

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "alive", "uptime_s": round(time.monotonic() - self.service.started, 3)}

    @app.get("/stats", response_model=None)
    async def stats(self, window_s: float | None = None,
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

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        state, service = self.readiness.current, self.service
        status = "draining" if service.draining else "ready" if state.ready else "starting"
        body = {"status": status, "versions": service.split.live, "weights": service.split.weights,
                "waiting_for": state.waiting_for, "serving": sorted(state.serving),
                "in_flight": service.in_flight.count}
        return JSONResponse(body, status_code=200 if status == "ready" else 503)

    def __del__(self) -> None:
        self._stop_reporting.set()
        self._life.stop(self.readiness.stop)
