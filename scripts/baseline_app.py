"""The recipe most teams use today, for comparison: one FastAPI app with the pipeline in-process.

    RAG_KB_ROOT=var/kb RAG_PIECE_DELAY_S=0.02 .venv/bin/gunicorn scripts.baseline_app:app \\
        -k uvicorn.workers.UvicornWorker -w 2 --graceful-timeout 30 -b 127.0.0.1:8100

Serves the same pipeline as the Serve app (`LocalPipeline` built from the first pipeline version in
serve_config.yaml), loaded and warmed in each worker's lifespan, behind `POST /v1/chat/completions`
(OpenAI chunks over SSE, ending with `data: [DONE]`) and `GET /ready`. Upgrading it means Gunicorn's
reload (`kill -HUP <master pid>`), which `scripts.bench_rollout` measures against Serve's rollout.

Environment: RAG_SERVE_CONFIG (default serve_config.yaml), RAG_KB_ROOT (default: the config's
retrieval.kb_root), RAG_PIECE_DELAY_S (default: the config's generation.extractive_piece_delay_s).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from control.document import load_serve_config
from control.serve_config import pipeline_configs
from rag.api import SSE_DONE, ChatCompletionRequest, CompletionFormatter, error_body, sse
from rag.config import GatewayConfig, PipelineConfig
from rag.errors import InvalidRequestError, KnowledgeBaseNotFoundError, RagError
from rag.local_pipeline import LocalPipeline
from rag.records import AnswerEvent

GATEWAY = GatewayConfig()  # the same request limits as the Serve gateway's defaults
STATUS_BY_ERROR: dict[type[RagError], int] = {InvalidRequestError: 400, KnowledgeBaseNotFoundError: 404}


def pipeline_config() -> PipelineConfig:
    """The first pipeline version of the Serve config, with the KB root and pacing from the environment."""
    config = next(iter(pipeline_configs(load_serve_config(os.environ.get("RAG_SERVE_CONFIG",
                                                                          "serve_config.yaml"))).values()))
    retrieval = config.retrieval.model_copy(
        update={"kb_root": os.environ.get("RAG_KB_ROOT", str(config.retrieval.kb_root))})
    delay = float(os.environ.get("RAG_PIECE_DELAY_S", config.generation.extractive_piece_delay_s))
    generation = config.generation.model_copy(update={"extractive_piece_delay_s": delay})
    return config.model_copy(update={"retrieval": retrieval, "generation": generation})


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    local = LocalPipeline(pipeline_config())
    local.load()
    await local.warmup()
    app.state.local = local
    try:
        yield
    finally:
        local.close()


app = FastAPI(title="rag-baseline", lifespan=lifespan)


@app.exception_handler(RagError)
async def _rag_error(_: Request, exc: RagError) -> JSONResponse:
    status = next((code for kind, code in STATUS_BY_ERROR.items() if isinstance(exc, kind)), 500)
    return JSONResponse(error_body(str(exc), status), status_code=status)


async def _relay(formatter: CompletionFormatter, first: AnswerEvent,
                 rest: AsyncIterator[AnswerEvent]) -> AsyncIterator[str]:
    """SSE lines; a generation that breaks mid-stream ends in an error event and [DONE], never a cut."""
    try:
        yield sse(formatter.chunk(first))
        async for event in rest:
            yield sse(formatter.chunk(event))
    except Exception as exc:
        yield sse(formatter.error_chunk(f"the answer stream broke off ({type(exc).__name__})"))
    finally:
        close = getattr(rest, "aclose", None)  # a client that went away stops the generation too
        if close is not None:
            await close()
    yield SSE_DONE


@app.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> StreamingResponse | JSONResponse:
    local: LocalPipeline = request.app.state.local
    question = body.to_question(body.knowledge_base or body.model, GATEWAY.limits, GATEWAY.max_history_turns)
    formatter = CompletionFormatter(body.model)
    events = local.pipeline.answer(question)
    if not body.stream:
        return JSONResponse(formatter.completion([e async for e in events]))
    first = await anext(events)  # errors before the first event still get a real status code
    return StreamingResponse(_relay(formatter, first, events), media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})


@app.get("/ready")
async def ready() -> dict[str, Any]:
    return {"status": "ready", "pid": os.getpid()}
