"""The gateway's FastAPI app, built per replica around its services (`build_http_app`): the routes, the
HTTP guard, one mapping of errors to statuses and bodies, and the OpenAPI description with its bearer
scheme. Built inside the replica (late-bound ingress), so nothing here reaches Serve's replica context.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.gateway import answer_routes, console_routes, kb_routes
from deployments.gateway.http_guard import OPEN_PATHS, HttpGuard
from deployments.gateway.services import GatewayServices
from deployments.gateway.statuses import DESCRIPTIONS, PUBLIC_FAILURE, root_cause, status_for
from rag.api import error_body, summarize_problems
from rag.errors import OverloadedError, RagError
from rag.kb_api import kb_body

logger = logging.getLogger("rag.gateway")
KB_PREFIX = "/knowledge_base/"
RETRY_AFTER_S = "1"

# What a 5xx body says in words; the exception's own text (paths, device messages) goes to the log only.
def build_http_app(services: GatewayServices) -> FastAPI:
    """The whole HTTP surface of one gateway replica, around `services`."""
    app = FastAPI(title="rag-serve", summary="Knowledge-base question answering on Ray Serve")
    app.state.services = services
    app.add_exception_handler(RagError, _rag_error)  # type: ignore[arg-type]  # Starlette types the handler loosely
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid_body)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
    for module in (answer_routes, kb_routes, console_routes):
        app.include_router(module.router)
    app.add_middleware(HttpGuard, settings=services.guard, refuse=error_response)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's description plus the bearer scheme the guard enforces (all routes but the probes)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        schema.setdefault("components", {})["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"apiKey": []}]
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                if path in OPEN_PATHS:
                    operation["security"] = []
                else:  # the guard answers 401 before any route runs, so FastAPI does not know it
                    operation["responses"].setdefault("401", {"description": DESCRIPTIONS[401],
                                                              "content": _ERROR_CONTENT})
        app.openapi_schema = schema
    return app.openapi_schema


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
        asked = getattr(root_cause(exc), "retry_after_s", None)  # an upstream's own Retry-After (its 429)
        headers["retry-after"] = str(max(1, round(asked))) if asked else RETRY_AFTER_S
    return JSONResponse(_shaped(error_body(message, status), path), status_code=status, headers=headers)


def _shaped(body: dict[str, Any], path: str) -> dict[str, Any]:
    if path.startswith(KB_PREFIX):
        error = body["error"]
        return {**kb_body(None, error["message"], error["code"]), **body}
    return body


def _request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "unknown"))


async def _rag_error(request: Request, exc: RagError) -> JSONResponse:
    return error_response(exc, _request_id(request), request.url.path)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(root_cause(exc), BackPressureError):  # a stage's queue is full: refuse now, not later
        return error_response(OverloadedError("the service is at capacity; retry shortly"), _request_id(request),
                              request.url.path)
    logger.exception("event=UNHANDLED request_id=%s error=%r", _request_id(request), exc)
    return JSONResponse(_shaped(error_body(f"{PUBLIC_FAILURE[500]} (request id {_request_id(request)})", 500),
                                request.url.path), status_code=500)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # FastAPI's and Starlette's own refusals (an unparsable body, no such route, method not allowed) in
    # the same OpenAI shape as every other error, keeping their headers.
    headers = {k.lower(): v for k, v in (exc.headers or {}).items()}
    if exc.status_code == 405:  # Starlette's Allow names the first route of the path; a path may have several
        headers["allow"] = ", ".join(_methods_of(request))
    return JSONResponse(_shaped(error_body(str(exc.detail)[:200], exc.status_code), request.url.path),
                        status_code=exc.status_code, headers=headers)


def _methods_of(request: Request) -> list[str]:
    """Every method some route serves at the request's path (routers included in the app nest theirs)."""
    def flat(routes: Iterable[Any]) -> Iterator[Any]:
        for route in routes:
            nested = getattr(getattr(route, "original_router", None), "routes", None)
            yield from flat(nested) if nested is not None else (route,)

    methods: set[str] = set()
    for route in flat(request.app.routes):
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(request.url.path):
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods - {"HEAD"})


async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = exc.errors()
    malformed = any(p.get("type") == "json_invalid" for p in problems)
    status = 400 if malformed else 422
    param = ".".join(str(x) for x in problems[0]["loc"])[:100] if problems else None
    shown = request.app.state.services.guard.errors_shown
    message = f"invalid request body: {summarize_problems(problems, shown)}"
    return JSONResponse(_shaped(error_body(message, status, param), request.url.path), status_code=status)

