"""The API's ASGI middleware: the API-key check, the request body limit and the request counter.

All are plain ASGI rather than starlette's BaseHTTPMiddleware: none buffers a response stream, so a streamed
response flows through untouched and a disconnect still reaches the app. Only LimitBody reads `receive`,
and only the request body, which it hands on whole.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from minisgl_cli.server.http_errors import ApiError
from minisgl_cli.server.metrics import ApiMetrics

_GUARDED = frozenset({"/generate", "/tokenize", "/detokenize"})  # besides everything under /v1/
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
CLIENT_GONE = 499  # nginx's "client closed request": only ever seen in logs and metrics


class StatusNoting:
    """A `send` that passes every message on and remembers the response's status: 500 until the app starts
    a response (if it raises first, uvicorn answers 500)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status = 500

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)


def _guarded(path: str) -> bool:
    return path.startswith("/v1/") or path in _GUARDED


class RequireApiKey:
    """401 for /v1/*, /generate, /tokenize and /detokenize without the key, before the body is read or
    validated."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _guarded(scope["path"]):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(given, self._expected):  # constant time: no timing oracle
                error = ApiError(
                    401, "missing or incorrect API key (Authorization: Bearer KEY)", code="invalid_api_key"
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class LimitBody:
    """HTTP 413 for a request body over `max_bytes`, before any of it is parsed.

    A Content-Length over the limit is refused before the body is read (a client that sent
    `Expect: 100-continue` never uploads it); a body without one (chunked) is read until its count passes
    the limit, so no more than `max_bytes` is ever held. A body within the limit reaches the app whole, as one
    message: FastAPI would have joined it anyway.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(int(declared), scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away mid-body: nobody to answer
                await send({"type": "http.response.start", "status": CLIENT_GONE, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(None, scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        handed_on = False

        async def receive_body_once() -> Message:
            # The body first, then the client's own messages (its disconnect, which the API watches for).
            nonlocal handed_on
            if handed_on:
                return await receive()
            handed_on = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, receive_body_once, send)

    async def _refuse(self, declared: int | None, scope: Scope, receive: Receive, send: Send) -> None:
        size = f"of {declared:,} bytes (its Content-Length) is" if declared is not None else "is"
        error = ApiError(
            413,
            f"the request body {size} over this server's limit of {self.max_bytes:,} bytes "
            "(--max-request-bytes)",
            code="request_too_large",
        )
        # Connection: close, as the unread rest of the body cannot be told apart from a next request.
        await error.response({"Connection": "close"})(scope, receive, send)


class CountRequests:
    """minisgl_requests_total{endpoint, status}; unknown paths share one label, so scans cannot bloat it."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, endpoints: frozenset[str]) -> None:
        self.app = app
        self._metrics = metrics
        self._endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        noting = StatusNoting(send)
        try:
            await self.app(scope, receive, noting)
        finally:
            path = scope["path"]
            self._metrics.requests.inc(path if path in self._endpoints else "other", str(noting.status))
