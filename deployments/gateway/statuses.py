"""The one place library errors become HTTP statuses (the gateway's responses, the jobs' outcomes)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from rag.api import ErrorBody
from rag.errors import (
    AuthenticationError,
    BodyTimeoutError,
    ConflictError,
    ForbiddenError,
    IndexMismatchError,
    InvalidRequestError,
    KnowledgeBaseNotFoundError,
    OverloadedError,
    RagError,
    RequestTooLargeError,
    ServiceUnavailableError,
    UnsupportedDocumentError,
    UpstreamTimeoutError,
)

# First match wins: subclasses before their bases.
STATUS_BY_ERROR: dict[type[RagError], int] = {
    AuthenticationError: 401,
    ForbiddenError: 403,
    RequestTooLargeError: 413,
    BodyTimeoutError: 408,
    InvalidRequestError: 400,
    UnsupportedDocumentError: 400,
    KnowledgeBaseNotFoundError: 404,  # DocumentNotFoundError included
    ConflictError: 409,
    UpstreamTimeoutError: 504,
    ServiceUnavailableError: 503,  # OverloadedError included
    IndexMismatchError: 500,
}


# Server-side failures get a fixed text: their own may hold paths, hosts or a remote traceback.
PUBLIC_FAILURE = {
    500: "internal error: the gateway could not complete the request",
    504: "a stage of the service did not answer in time",
}


T = TypeVar("T")


def never(_: BaseException) -> bool:
    return False


async def bounded(call: Awaitable[T], timeout_s: float, what: str,
                  overloaded: Callable[[BaseException], bool] = never) -> T:
    """One hop with a deadline: past it, 504 to retry; a full queue downstream (as `overloaded` tells from
    the error) an immediate 503 to retry, not a 500."""
    try:
        return await asyncio.wait_for(call, timeout_s)
    except TimeoutError:
        raise UpstreamTimeoutError(f"{what} took longer than {timeout_s:g}s") from None
    except Exception as exc:
        if overloaded(exc):
            raise OverloadedError(f"{what}: the service is at capacity; retry shortly") from None
        raise


def status_for(exc: BaseException) -> int:
    return next((code for kind, code in STATUS_BY_ERROR.items() if isinstance(exc, kind)), 500)


def root_cause(exc: BaseException) -> BaseException:
    """The library error inside Ray's wrappers: an error raised in another replica arrives as a
    RayTaskError subclass whose text is a whole traceback, which must not reach a client."""
    while isinstance(getattr(exc, "cause", None), BaseException):
        exc = exc.cause  # type: ignore[attr-defined]
    return exc


def public_status(exc: BaseException) -> tuple[int, str]:
    """(status, message) safe to show a client: a 4xx keeps the library's own words, a 5xx a fixed text."""
    cause = root_cause(exc)
    status = status_for(cause)
    if status >= 500:
        return status, PUBLIC_FAILURE.get(status, PUBLIC_FAILURE[500])
    return status, str(cause)


# An SSE response is described event by event: each has a `data` line (JSON, or `[DONE]` at the end).
SSE_EVENTS: dict[str, Any] = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody, "description": DESCRIPTIONS[code]} for code in statuses}


DESCRIPTIONS = {
    400: "malformed JSON, or a request the service cannot answer (empty question, over a lowered limit)",
    401: "missing or wrong API key (send `Authorization: Bearer <key>`)",
    404: "unknown knowledge base, file or job",
    409: "conflicts with what is stored (a knowledge base that exists, a file upload without override)",
    413: "request body over the size limit",
    422: "the body does not match the schema (the first few problems are named, then counted)",
    500: "internal error; the body gives a request id for the logs",
    503: "starting, draining or at capacity; retry after `Retry-After` seconds",
    504: "a stage did not answer in time; retry after `Retry-After` seconds",
}
