"""The gateway's door: a request id on every request, the API key, and the body (its size, and its
deadline), all checked before FastAPI parses anything, so an unauthenticated, oversized or never-ending
body costs no parsing and holds no slot for long. Open routes (probes, the console's files) read no body.
An upload is not gathered here: it passes through to its route as it arrives (which writes it to disk),
under the same size limit and deadline.

Without keys (`allow_unauthenticated`, meant for a gateway on loopback) the key cannot stand between a
web page and the API, so the door checks where a request comes from instead: only from this machine
(whatever address the proxy was bound to), only under a name the gateway answers to (`allowed_hosts`: a
page whose name was rebound to 127.0.0.1 sends its own), and nothing state-changing from another site's
page (`Origin`, `Sec-Fetch-Site`), which a browser sends on its own and a page cannot forge.

A plain ASGI middleware (not a FastAPI dependency): FastAPI reads and parses the body before any
dependency runs, and the body-size limit must come first.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rag.auth import ApiKeys
from rag.errors import (
    AuthenticationError,
    BodyTimeoutError,
    ForbiddenError,
    InvalidRequestError,
    RagError,
    RequestTooLargeError,
)

REQUEST_ID_HEADER = "x-request-id"
# Probes carry only a status word, and the console's page and assets are public files (the page asks for
# the key and sends it on every API call); everything else, /docs and /openapi.json included, needs a key.
OPEN_PATHS = frozenset({"/health", "/ready", "/"})
OPEN_PREFIXES = ("/console/",)


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)
# A caller's own request id is kept (it ties its logs to ours) when it is short and plain.
_CALLER_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True)
class GuardSettings:
    keys: ApiKeys | None  # None: this gateway was explicitly configured to run without keys
    max_body_bytes: int
    errors_shown: int  # problems a 422 names before it only counts them
    # Routes that take documents (multipart uploads) may carry more than a question does, and take longer.
    body_bytes_by_path: Mapping[str, int] = field(default_factory=dict)
    body_timeout_s: float = 10.0
    body_timeout_by_path: Mapping[str, float] = field(default_factory=dict)
    allowed_hosts: frozenset[str] = frozenset({"127.0.0.1", "localhost", "::1"})  # checked only without keys
    # Routes whose body passes through to the route as it arrives (uploads, which stream to disk), under
    # the same limit and deadline, instead of being gathered in memory first.
    streamed_paths: frozenset[str] = frozenset()

    def body_limit(self, path: str) -> int:
        return self.body_bytes_by_path.get(path, self.max_body_bytes)

    def body_deadline(self, path: str) -> float:
        return self.body_timeout_by_path.get(path, self.body_timeout_s)


class HttpGuard:
    """`settings` are the replica's (its key file, its limits); `refuse(error, request_id, path)` renders
    a refusal (the gateway's one mapping of errors to statuses)."""

    def __init__(self, app: ASGIApp, settings: GuardSettings,
                 refuse: Callable[[RagError, str, str], Response]) -> None:
        self.app = app
        self.settings = settings
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Serve's proxy gives every request an id (the caller's x-request-id when sent) and returns it in
        # the x-request-id response header; outside Serve, this middleware makes and returns one.
        given = _header(scope, REQUEST_ID_HEADER.encode())
        request_id = given if given and _CALLER_ID.match(given) else f"req-{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        if not given:
            send = _with_request_id(send, request_id)
        settings, path = self.settings, scope["path"]
        if settings.keys is None and (keyless := _keyless_refusal(scope, settings.allowed_hosts, is_open(path))):
            await self.refuse(keyless, request_id, path)(scope, receive, send)
            return
        if is_open(path):
            # Open routes take no body, so none is read: waiting for one a client never sends would hold
            # one of the gateway's request slots for nothing (80 such requests starved keyed chats).
            await self.app(scope, _replay(b"", receive), send)
            return
        if settings.keys is not None and not settings.keys.accepts(_header(scope, b"authorization")):
            await self.refuse(AuthenticationError("a valid API key is required: send 'Authorization: Bearer "
                                                  "<key>'"), request_id, path)(scope, receive, send)
            return
        deadline = settings.body_deadline(path)
        if path in settings.streamed_paths:
            if refusal := _declared_refusal(scope, settings.body_limit(path)):
                await self.refuse(refusal, request_id, path)(scope, receive, send)
                return
            await self.app(scope, _bounded(receive, settings.body_limit(path), deadline), send)
            return
        try:
            body, refusal = await asyncio.wait_for(_read_body(scope, receive, settings.body_limit(path)), deadline)
        except TimeoutError:
            body, refusal = b"", BodyTimeoutError(f"the request body did not arrive within {deadline:g}s")
        if refusal:
            await self.refuse(refusal, request_id, path)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _keyless_refusal(scope: Scope, allowed_hosts: frozenset[str], open_route: bool) -> ForbiddenError | None:
    """Why a request to a gateway without keys is refused, or None."""
    host = _host_name(_header(scope, b"host") or "")
    if host not in allowed_hosts:
        return ForbiddenError(f"this gateway runs without API keys and answers only to "
                              f"{', '.join(sorted(allowed_hosts))}, not to {host[:100]!r}")
    if open_route:  # probes and the console's files: a status word and public files, for anyone local
        return None
    client = (scope.get("client") or ("",))[0]
    if not _is_loopback(client):
        return ForbiddenError("this gateway runs without API keys, so it answers only requests from this machine")
    if scope.get("method", "GET") in _SAFE_METHODS:
        return None
    origin, fetch_site = _header(scope, b"origin"), _header(scope, b"sec-fetch-site")
    own = {f"http://{_header(scope, b'host')}", f"https://{_header(scope, b'host')}"}
    if (origin is not None and origin not in own) or fetch_site not in (None, "same-origin", "none"):
        return ForbiddenError("this gateway runs without API keys and refuses changes from a cross-site page "
                              f"(Origin {str(origin)[:100]!r}, Sec-Fetch-Site {str(fetch_site)[:20]!r})")
    return None


def _host_name(host: str) -> str:
    """The name in a Host header, without its port ("[::1]:8000" -> "::1")."""
    try:
        name = urlsplit(f"//{host}").hostname
    except ValueError:  # "[::1" and the like
        return ""
    return (name or "").lower()


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # not an address (a unix socket, a test client's name)
        return False


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _with_request_id(send: Send, request_id: str) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message.setdefault("headers", [])
            message["headers"] = [*message["headers"], (REQUEST_ID_HEADER.encode(), request_id.encode())]
        await send(message)
    return sending


async def _read_body(scope: Scope, receive: Receive, limit: int) -> tuple[bytes, RagError | None]:
    """The whole body, or a refusal once it is known to exceed `limit`: from Content-Length before a
    byte is read, else by counting what streams in (a chunked body has no length)."""
    if refusal := _declared_refusal(scope, limit):
        return b"", refusal
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), None


def _too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(f"the request body is larger than the limit of {limit} bytes")


def _declared_refusal(scope: Scope, limit: int) -> RagError | None:
    """A Content-Length over `limit` (or not a number) is refused before a byte is read."""
    declared = _header(scope, b"content-length")
    if declared is None:
        return None
    if not declared.isdigit():
        return InvalidRequestError("invalid Content-Length header")
    return _too_large(limit) if int(declared) > limit else None


def _bounded(receive: Receive, limit: int, deadline_s: float) -> Receive:
    """`receive` for a route that reads the body as it streams in: the body's messages raise 413 past
    `limit` bytes and 408 past `deadline_s` from now (the route's error handling answers); once the body
    is complete, messages (a disconnect) pass as they come, with no deadline."""
    loop = asyncio.get_running_loop()
    until, size, complete = loop.time() + deadline_s, 0, False

    async def receiving() -> Message:
        nonlocal size, complete
        if complete:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), max(until - loop.time(), 0))
        except TimeoutError:
            raise BodyTimeoutError(f"the request body did not arrive within {deadline_s:g}s") from None
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise _too_large(limit)
            complete = not message.get("more_body", False)
        return message
    return receiving


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body as one message, then whatever the connection says next (a disconnect, for streams)."""
    sent = False

    async def receiving() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return receiving
