"""The access log: one line per HTTP request, once its response has been sent (a stream's too).

    POST /v1/chat/completions 200 in 812.4 ms from 127.0.0.1:52144

It goes through logging like every other line ("minisgl.access", in log_format.py's format) instead of
uvicorn's access log, which has no duration and a format of its own. /health and /metrics are polled (by a
load balancer, by Prometheus), every second perhaps: their lines are at debug level, so they do not bury the
requests. With the access log off (--no-access-log), every line is at debug level.

Plain ASGI, like middleware.py's: a streamed response flows through untouched.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from minisgl_cli.server.middleware import StatusNoting

log = logging.getLogger("minisgl.access")

POLLED_PATHS = frozenset({"/health", "/metrics"})


class AccessLog:
    def __init__(self, app: ASGIApp, enabled: bool = True) -> None:
        self.app = app
        self._level = logging.INFO if enabled else logging.DEBUG

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        level = logging.DEBUG if path in POLLED_PATHS else self._level
        if not log.isEnabledFor(level):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        noting = StatusNoting(send)
        try:
            await self.app(scope, receive, noting)
        finally:
            query = scope.get("query_string", b"")
            target = f"{path}?{query.decode('latin-1')}" if query else path
            host, port = scope.get("client") or ("-", None)
            client = host if port is None else f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            log.log(
                level,
                "%s %s %d in %.1f ms from %s",
                scope["method"],
                target,
                noting.status,
                (time.perf_counter() - start) * 1000,
                client,
            )
