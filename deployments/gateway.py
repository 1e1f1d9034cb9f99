"""HTTP ingress: OpenAI-compatible chat, Chatchat-style kb_chat and search, health and readiness.

Three parts, as in vLLM's OpenAI entrypoint: request/response schemas (`rag.api`), a service with the
logic (`GatewayService`), and routes of a few lines that parse, call and map.
"""


import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.readiness import ReadinessMonitor
from rag.api import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionFormatter,
    KbChatRequest,
    SearchDocsRequest,
    document_json,
    error_body,
    sse,
)
from rag.config import GatewayConfig, TrafficConfig, validate
from rag.errors import (
    IndexMismatchError,
    InvalidRequestError,
    KnowledgeBaseNotFoundError,
    RagError,
    ServiceUnavailableError,
)
from rag.lifecycle import InFlight
from rag.records import AnswerEvent, AnswerStart, Question
from rag.traffic import TrafficSplit

logger = logging.getLogger("rag.gateway")
VERSION_HEADER = "x-rag-version"
DEFAULT_MODEL_ALIAS = "rag"

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
    return JSONResponse(error_body(str(root_cause(exc)), status), status_code=status)


@app.exception_handler(RequestValidationError)
async def _invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = exc.errors()
    malformed = any(p.get("type") == "json_invalid" for p in problems)
    message = "; ".join(f"{'.'.join(str(x) for x in p['loc'])}: {p['msg']}" for p in problems)
    status = 400 if malformed else 422
    param = ".".join(str(x) for x in problems[0]["loc"]) if problems else None
    return JSONResponse(error_body(f"invalid request body: {message}", status, param), status_code=status)


class GatewayService:
    """Picks a version for each request and relays its answer events in the requested shape."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.split = TrafficSplit(TrafficConfig())
        self.in_flight = InFlight()
        self.started = time.monotonic()
        self._handles: dict[str, DeploymentHandle] = {}

    def set_traffic(self, traffic: TrafficConfig) -> None:
        self.split = TrafficSplit(traffic)

    def knowledge_base_for(self, request: ChatCompletionRequest) -> str:
        if request.knowledge_base:
            return request.knowledge_base
        return self.config.default_knowledge_base if request.model == DEFAULT_MODEL_ALIAS else request.model

    async def open_answer(self, question: Question, key: str | None
                          ) -> tuple[str, AnswerStart, DeploymentResponseGenerator]:
        """Start an answer and wait for its first event (the sources), so that errors such as an
        unknown knowledge base become an HTTP status rather than an error inside a 200 stream."""
        version = self.split.choose(key)
        handle = await self._handle(version)
        stream = handle.answer.options(stream=True).remote(question)
        try:
            first = await asyncio.wait_for(stream.__anext__(), self.config.first_event_timeout_s)
        except TimeoutError:
            stream.cancel()
            raise ServiceUnavailableError(
                f"version {version} gave no answer within {self.config.first_event_timeout_s}s") from None
        return version, first, stream

    async def relay(self, formatter: CompletionFormatter, first: AnswerStart,
                    rest: DeploymentResponseGenerator) -> AsyncIterator[str]:
        """SSE lines for one answer; a broken upstream ends in an error event and [DONE], never a cut."""
        finished = False
        with self.in_flight.track():
            try:
                yield sse(formatter.chunk(first))
                async for event in rest:
                    yield sse(formatter.chunk(event))
                finished = True
            except Exception as exc:
                logger.warning("event=STREAM_ERROR error=%r", exc)
                yield sse(formatter.error_chunk(f"the answer stream broke off: {type(exc).__name__}"))
                finished = True
            finally:
                if not finished:  # the client went away: stop the generation upstream
                    rest.cancel()
            yield SSE_DONE

    async def collect(self, first: AnswerStart, rest: DeploymentResponseGenerator) -> list[AnswerEvent]:
        with self.in_flight.track():
            return [first, *[event async for event in rest]]

    async def search(self, question: Question) -> list[dict[str, Any]]:
        handle = await self._handle(self.split.choose(None))
        passages = await handle.search.remote(question)
        return [document_json(p) for p in passages]

    async def models(self) -> list[dict[str, Any]]:
        names: set[str] = set()
        for version in self.split.live:
            names.update(await (await self._handle(version)).knowledge_bases.remote())
        return [{"id": n, "object": "model", "created": 0, "owned_by": "rag-serve"} for n in sorted(names)]

    async def _handle(self, version: str) -> DeploymentHandle:
        if version not in self._handles:
            # get_app_handle is a blocking controller call: keep it off the event loop, and cache it.
            self._handles[version] = await asyncio.to_thread(serve.get_app_handle, version)
        return self._handles[version]


def _answer_response(service: GatewayService, version: str, first: AnswerStart,
                     rest: DeploymentResponseGenerator, formatter: CompletionFormatter) -> StreamingResponse:
    return StreamingResponse(service.relay(formatter, first, rest), media_type="text/event-stream",
                             headers={VERSION_HEADER: version, "cache-control": "no-cache"})


async def _answer(service: GatewayService, question: Question, key: str | None, stream: bool,
                  formatter: CompletionFormatter) -> StreamingResponse | JSONResponse:
    version, first, rest = await service.open_answer(question, key)
    if stream:
        return _answer_response(service, version, first, rest, formatter)
    events = await service.collect(first, rest)
    return JSONResponse(formatter.completion(events), headers={VERSION_HEADER: version})


@serve.deployment(name="Gateway")
@serve.ingress(app)
class GatewayDeployment:
    """Routes: each parses (FastAPI + `rag.api` schemas), calls the service, and maps the result."""

    def __init__(self, config: GatewayConfig) -> None:
        self.service = GatewayService(config)
        self.readiness = ReadinessMonitor(lambda: self.service.split.live, config.ready_poll_interval_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        # Weights only: applied in place, no replica restart. Idempotent, as Serve may call it twice.
        self.service.set_traffic(validate(TrafficConfig, user_config, "Gateway user_config"))
        logger.info("event=TRAFFIC_WEIGHTS weights=%s", user_config)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(self, body: ChatCompletionRequest) -> StreamingResponse | JSONResponse:
        cfg = self.service.config
        question = body.to_question(self.service.knowledge_base_for(body), cfg.max_question_chars,
                                    cfg.max_history_turns)
        return await _answer(self.service, question, body.user, body.stream, CompletionFormatter(body.model))

    @app.post("/chat/kb_chat", response_model=None)
    async def kb_chat(self, body: KbChatRequest) -> StreamingResponse | JSONResponse:
        cfg = self.service.config
        question = body.to_question(cfg.max_question_chars, cfg.max_history_turns)
        formatter = CompletionFormatter(body.model or body.knowledge_base_name, docs_key="docs")
        return await _answer(self.service, question, None, body.stream, formatter)

    @app.post("/knowledge_base/search_docs")
    async def search_docs(self, body: SearchDocsRequest) -> list[dict[str, Any]]:
        return await self.service.search(body.to_question(self.service.config.max_question_chars))

    @app.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": await self.service.models()}

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "alive", "uptime_s": round(time.monotonic() - self.service.started, 3)}

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        state = self.readiness.current
        body = {"status": "ready" if state.ready else "starting", "versions": self.service.split.live,
                "waiting_for": state.waiting_for, "in_flight": self.service.in_flight.count}
        return JSONResponse(body, status_code=200 if state.ready else 503)

    def __del__(self) -> None:
        self.readiness.stop()
