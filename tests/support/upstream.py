"""OpenAI-compatible upstreams for the `openai` generation backend's tests: a real one (`transformers serve`
on a tiny random model, CPU) and a small scripted one for what a real server cannot be made to do on demand
(429, 400, a stall, a stream cut mid-answer), which also counts the streams the client closed early."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support.cluster import free_port


@dataclass
class Script:
    """What the scripted upstream does with the next chat requests."""

    model: str = "scripted-model"
    words: int = 8  # tokens per answer
    delay_s: float = 0.0  # between tokens
    first_delay_s: float = 0.0  # before the first token
    status: int = 200  # not 200: answer this status and `error` instead of a stream
    error: str = ""
    retry_after: str | None = None
    cut_after: int | None = None  # end the connection after this many tokens, without finishing
    usage: bool = True
    requests: list[dict[str, Any]] = field(default_factory=list)
    closed_early: int = 0  # streams whose client left before the last token
    finished: int = 0


def scripted_app(script: Script) -> Starlette:
    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": script.model, "object": "model"}]})

    async def chat(request: Request) -> Response:
        body = await request.json()
        script.requests.append({**body, "authorization": request.headers.get("authorization")})
        if script.status != 200:
            headers = {"retry-after": script.retry_after} if script.retry_after else {}
            return JSONResponse({"error": {"message": script.error, "type": "invalid_request_error"}},
                                status_code=script.status, headers=headers)
        return StreamingResponse(_tokens(body), media_type="text/event-stream")

    async def _tokens(body: dict[str, Any]) -> AsyncIterator[str]:
        sent = 0
        try:
            await asyncio.sleep(script.first_delay_s)
            for i in range(min(script.words, int(body.get("max_tokens") or script.words))):
                if script.cut_after is not None and sent >= script.cut_after:
                    raise ConnectionResetError("cut by the script")
                yield _event({"choices": [{"index": 0, "delta": {"content": f" word{i}"}, "finish_reason": None}]})
                sent += 1
                await asyncio.sleep(script.delay_s)
            yield _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            if script.usage:
                yield _event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": sent * 2,
                                                       "total_tokens": 3 + sent * 2}})
            yield "data: [DONE]\n\n"
            script.finished += 1
        except asyncio.CancelledError:
            script.closed_early += 1
            raise

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])])


def _event(payload: dict[str, Any]) -> str:
    return "data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                                  **payload}) + "\n\n"


@contextlib.contextmanager
def scripted_upstream(script: Script) -> Iterator[str]:
    """The scripted upstream on a free loopback port, in a thread; yields its base_url (…/v1)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(scripted_app(script), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait_listening(f"http://127.0.0.1:{port}/v1/models", 20)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


@dataclass
class Upstream:
    base_url: str
    model: str  # the name it serves the model under (its directory)
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def transformers_upstream(model_dir: Path, log: Path) -> Iterator[Upstream]:
    """`transformers serve` on `model_dir` (CPU, offline) in a process of its own (a test may kill it);
    stopped and waited for afterwards."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cli = Path(sys.executable).with_name("transformers")
    with log.open("wb") as out:
        process = subprocess.Popen([str(cli), "serve", "--host", "127.0.0.1", "--port", str(port), str(model_dir)],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_listening(f"http://127.0.0.1:{port}/v1/models", 120, process)
            yield Upstream(f"http://127.0.0.1:{port}/v1", str(model_dir), process)
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _wait_listening(url: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the upstream exited with {process.returncode} before it listened")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout_s:g}s")
