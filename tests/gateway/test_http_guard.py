"""The gateway's door and error mapping, in-process (no cluster): key, body size, request ids, 5xx wording,
and a full queue or a slow hop turned into 503/504 with Retry-After."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from ray.serve.exceptions import BackPressureError

from deployments.gateway.http_app import error_response
from deployments.gateway.http_guard import GuardSettings, HttpGuard
from deployments.gateway.serve_handles import is_overload
from deployments.gateway.statuses import bounded
from rag.auth import ApiKeys, create_key_file, read_client_key
from rag.errors import IndexMismatchError, OverloadedError, RagError, UpstreamTimeoutError


def _app() -> FastAPI:
    """Behind the guard: routes that read their whole body (`/echo`, `/upload`) and a probe."""
    app = FastAPI()

    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    app.post("/echo")(echo)
    app.post("/upload")(echo)

    @app.post("/stream")
    async def stream(request: Request) -> dict[str, int]:  # reads its body as it arrives, like upload_docs
        pieces = request.app.state.pieces = []
        async for piece in request.stream():
            if piece:
                pieces.append(len(piece))
        return {"pieces": len(pieces), "bytes": sum(pieces)}

    app.add_exception_handler(RagError, lambda request, exc: error_response(exc, "req-t", request.url.path))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "alive"}

    return app


@pytest.fixture
def guarded(tmp_path: Path) -> tuple[TestClient, str]:
    create_key_file(tmp_path / "key")
    settings = GuardSettings(ApiKeys(tmp_path / "key"), max_body_bytes=1024, errors_shown=3)
    app = _app()
    app.add_middleware(HttpGuard, settings=settings, refuse=error_response)
    return TestClient(app), read_client_key(tmp_path / "key")


def test_key_required_except_on_probes(guarded: tuple[TestClient, str]) -> None:
    client, key = guarded
    refused = client.post("/echo", content=b"{}")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert refused.json()["error"]["code"] == 401 and refused.headers["x-request-id"].startswith("req-")
    assert client.post("/echo", content=b"{}", headers={"authorization": "Bearer nope"}).status_code == 401
    assert client.post("/echo", content=b"{}", headers={"authorization": f"Bearer {key}"}).json() == {"bytes": 2}
    assert client.get("/health").status_code == 200


def test_body_limit_by_length_and_by_counting(guarded: tuple[TestClient, str]) -> None:
    client, key = guarded
    auth = {"authorization": f"Bearer {key}"}
    assert client.post("/echo", content=b"x" * 1024, headers=auth).json() == {"bytes": 1024}
    declared = client.post("/echo", content=b"x" * 1025, headers=auth)
    assert declared.status_code == 413 and "1024 bytes" in declared.json()["error"]["message"]
    streamed = client.post("/echo", content=iter([b"x" * 600, b"x" * 600]), headers=auth)
    assert streamed.status_code == 413
    assert client.post("/echo", headers={**auth, "content-length": "abc"}).status_code == 400


def test_a_caller_request_id_is_kept(guarded: tuple[TestClient, str]) -> None:
    client, key = guarded
    response = client.post("/echo", content=b"{}", headers={"authorization": f"Bearer {key}", "x-request-id": "t-1"})
    assert response.status_code == 200 and "x-request-id" not in response.headers  # Serve's proxy returns it


def test_5xx_bodies_name_the_failure_not_the_details() -> None:
    response = error_response(IndexMismatchError("index /srv/secret/path built with another model"), "req-1")
    assert response.status_code == 500
    assert b"/srv/secret" not in response.body and b"req-1" in response.body


def test_full_queue_and_slow_hop_become_503_and_504_with_retry_after() -> None:
    async def full() -> None:
        raise BackPressureError(num_queued_requests=5, max_queued_requests=5)

    async def slow() -> None:
        await asyncio.sleep(5)

    with pytest.raises(OverloadedError):
        asyncio.run(bounded(full(), 1.0, "the search", is_overload))
    with pytest.raises(BackPressureError):  # a hop that cannot be overloaded passes the error on
        asyncio.run(bounded(full(), 1.0, "the search"))
    with pytest.raises(UpstreamTimeoutError):
        asyncio.run(bounded(slow(), 0.05, "the search"))
    for error, status in ((OverloadedError("x"), 503), (UpstreamTimeoutError("x"), 504)):
        response = error_response(error, "req-2")
        assert response.status_code == status and response.headers["retry-after"] == "1"


def _asgi_call(guard: HttpGuard, path: str, headers: dict[str, str]) -> tuple[int, bytes, float]:
    """One request whose client sends its headers (a Content-Length included) and then never the body."""
    async def never_sends() -> dict[str, object]:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST" if path != "/health" else "GET", "path": path, "query_string": b"",
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()], "root_path": "",
             "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5555)}

    async def run() -> float:
        began = asyncio.get_running_loop().time()
        await asyncio.wait_for(guard(scope, never_sends, send), 5)
        return asyncio.get_running_loop().time() - began

    took = asyncio.run(run())
    status = next(int(m["status"]) for m in sent if m["type"] == "http.response.start")  # type: ignore[call-overload]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")  # type: ignore[misc]
    return status, body, took


def _body_guard(tmp_path: Path) -> tuple[HttpGuard, str]:
    create_key_file(tmp_path / "key")
    settings = GuardSettings(ApiKeys(tmp_path / "key"), max_body_bytes=4096, errors_shown=3, body_timeout_s=0.3,
                             body_timeout_by_path={"/upload": 1.0, "/stream": 0.5},
                             streamed_paths=frozenset({"/stream"}))
    return HttpGuard(_app(), settings, error_response), read_client_key(tmp_path / "key")


def test_an_open_route_answers_without_waiting_for_a_body_that_never_comes(tmp_path: Path) -> None:
    guard, _ = _body_guard(tmp_path)
    status, body, took = _asgi_call(guard, "/health", {"content-length": "1000"})
    assert status == 200 and b"alive" in body and took < 0.3


def test_a_keyed_body_that_never_arrives_is_a_408_at_the_gateways_deadline(tmp_path: Path) -> None:
    guard, key = _body_guard(tmp_path)
    auth = {"authorization": f"Bearer {key}", "content-length": "100", "x-request-timeout-seconds": "3600"}
    status, body, took = _asgi_call(guard, "/echo", auth)
    assert status == 408 and b"did not arrive within 0.3s" in body and 0.25 < took < 1.0
    status, body, took = _asgi_call(guard, "/upload", auth)  # uploads get their own, longer deadline
    assert status == 408 and b"within 1s" in body and 0.9 < took < 2.0
    # without the key, no body is waited for at all
    status, _, took = _asgi_call(guard, "/echo", {"content-length": "100"})
    assert status == 401 and took < 0.25


def test_a_streamed_route_reads_its_body_as_it_arrives_under_the_same_limit_and_deadline(tmp_path: Path) -> None:
    guard, key = _body_guard(tmp_path)
    auth = [(b"authorization", f"Bearer {key}".encode())]
    app = guard.app

    async def run(pieces: list[bytes], in_step: bool, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
        """With `in_step` the client sends a piece only once the route has read the one before: a guard
        that gathered the body before calling the route would never get the second piece (408)."""
        queue = list(pieces)
        sent: list[dict[str, object]] = []

        async def receive() -> dict[str, object]:
            sent_so_far = len(pieces) - len(queue)
            while in_step and sent_so_far and len(getattr(app.state, "pieces", [])) < sent_so_far:
                await asyncio.sleep(0.01)
            if not queue:
                await asyncio.sleep(3600)
            piece = queue.pop(0)
            return {"type": "http.request", "body": piece, "more_body": bool(queue)}

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/stream", "query_string": b"", "headers": auth + headers,
                 "root_path": "", "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5555)}
        await asyncio.wait_for(guard(scope, receive, send), 5)
        status = next(int(m["status"]) for m in sent if m["type"] == "http.response.start")  # type: ignore[call-overload]
        return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")  # type: ignore[misc]

    status, body = asyncio.run(run([b"a" * 1000, b"b" * 1000, b"c" * 1000], True, []))
    assert status == 200 and body == b'{"pieces":3,"bytes":3000}'
    status, body = asyncio.run(run([b"a" * 3000, b"b" * 3000], False, []))  # counted: no Content-Length
    assert status == 413 and b"4096 bytes" in body
    status, body = asyncio.run(run([b"a"], False, [(b"content-length", b"5000")]))  # declared: refused unread
    assert status == 413
    status, body, took = _asgi_call(guard, "/stream", {"authorization": f"Bearer {key}", "content-length": "100"})
    assert status == 408 and b"within 0.5s" in body and 0.4 < took < 1.5


LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def _open_gateway(client: tuple[str, int] = ("127.0.0.1", 5555)) -> TestClient:
    """A gateway configured without keys (allow_unauthenticated), as a browser on this machine reaches it."""
    settings = GuardSettings(None, max_body_bytes=1024, errors_shown=3, allowed_hosts=LOOPBACK_NAMES)
    app = _app()
    app.add_middleware(HttpGuard, settings=settings, refuse=error_response)
    return TestClient(app, base_url="http://127.0.0.1:8000", client=client)


def test_without_keys_a_rebound_name_or_a_cross_site_page_cannot_change_anything() -> None:
    client = _open_gateway()
    assert client.post("/echo", content=b"{}").json() == {"bytes": 2}
    same_site = {"origin": "http://127.0.0.1:8000", "sec-fetch-site": "same-origin"}
    assert client.post("/echo", content=b"{}", headers=same_site).status_code == 200
    assert client.post("/echo", content=b"{}", headers={"host": "localhost:8000",
                                                        "origin": "http://localhost:8000"}).status_code == 200
    # DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1.
    rebound = client.get("/health", headers={"host": "evil.example:8000"})
    assert rebound.status_code == 403 and "evil.example" in rebound.json()["error"]["message"]
    assert client.post("/echo", content=b"{}", headers={"host": "evil.example"}).status_code == 403
    # A page of another site posting a form or a fetch: refused, whatever it sends.
    for headers in ({"origin": "http://evil.example"}, {"origin": "null"}, {"origin": "http://127.0.0.1:9999"},
                    {"sec-fetch-site": "cross-site"}, {"sec-fetch-site": "same-site"}):
        refused = client.post("/upload", content=b"x", headers=headers)
        assert refused.status_code == 403 and "cross-site" in refused.json()["error"]["message"], headers
    assert client.get("/health", headers={"origin": "http://evil.example"}).status_code == 200  # reads nothing


def test_without_keys_only_this_machine_is_served_whatever_address_the_proxy_binds() -> None:
    remote = _open_gateway(client=("10.1.2.3", 40000))
    refused = remote.post("/echo", content=b"{}")
    assert refused.status_code == 403 and "this machine" in refused.json()["error"]["message"]
    assert remote.get("/health").status_code == 200  # probes stay open: they carry only a status word
    assert _open_gateway(client=("::1", 40000)).post("/echo", content=b"{}").status_code == 200


def test_with_keys_neither_the_host_nor_the_origin_matters(guarded: tuple[TestClient, str]) -> None:
    client, key = guarded
    headers = {"authorization": f"Bearer {key}", "host": "rag.example.com", "origin": "https://app.example.com"}
    assert client.post("/echo", content=b"{}", headers=headers).status_code == 200
