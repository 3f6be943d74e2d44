"""The API's ASGI middleware: the API-key check and the request counter.

Both are plain ASGI rather than starlette's BaseHTTPMiddleware: neither buffers a stream nor touches
`receive`, so a streamed response flows through untouched and a disconnect still reaches the app.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from minisgl_cli.server.http_errors import ApiError
from minisgl_cli.server.metrics import ApiMetrics


def _guarded(path: str) -> bool:
    return path.startswith("/v1/") or path == "/generate"


class RequireApiKey:
    """401 for /v1/* and /generate without the key, before the body is read or validated."""

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
        status = 500  # if the app raises before it answers

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            path = scope["path"]
            self._metrics.requests.inc(path if path in self._endpoints else "other", str(status))
