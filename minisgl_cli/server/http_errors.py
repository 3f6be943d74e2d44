"""HTTP errors in OpenAI's shape: every error, at any status, answers
{"error": {"message", "type", "param", "code"}}, and every 503 carries `Retry-After: 1`.

ApiError is that answer; as_api_error maps what a request can raise (an engine rejection, the engine
gone, a bad sampling setting, a bug) onto it; install_error_handlers makes FastAPI's own errors (request
validation, unknown route or method) and any uncaught exception answer the same way, so a client never
sees FastAPI's 422 or a bare 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from minisgl_cli.errors import UsageError
from minisgl_cli.server import protocol as p
from minisgl_cli.server.engine_client import EngineUnavailable, RequestRejected

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request answered with an HTTP error status and OpenAI's error body."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        if self.status == 503:
            kind = "service_unavailable_error"
        else:
            kind = "server_error" if self.status >= 500 else "invalid_request_error"
        detail = p.ErrorDetail(message=self.message, type=kind, param=self.param, code=self.code)
        return p.ErrorResponse(error=detail).model_dump()

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        headers = dict(headers or {})
        if self.status == 503:
            headers["Retry-After"] = "1"  # queue full or engine restarting: worth trying again soon
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def as_api_error(exc: Exception) -> ApiError:
    """The HTTP error for an exception raised while a request ran."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestRejected):
        code = exc.code
        if code is None and exc.status == 400 and "context length" in exc.message:
            code = "context_length_exceeded"
        return ApiError(exc.status, exc.message, param=exc.param, code=code)
    if isinstance(exc, EngineUnavailable):
        return ApiError(503, f"the engine is unavailable: {exc}")
    if isinstance(exc, UsageError):
        return ApiError(400, str(exc), param=getattr(exc, "param", None))
    log.error("request failed", exc_info=exc)
    return ApiError(500, "internal server error")


def _request_field_names() -> frozenset[str]:
    names: set[str] = set()
    seen: set[type[BaseModel]] = set()
    pending: list[type[BaseModel]] = [
        p.ChatCompletionRequest,
        p.CompletionRequest,
        p.NativeGenerateRequest,
        p.TokenizeRequest,
        p.DetokenizeRequest,
    ]
    while pending:
        model = pending.pop()
        seen.add(model)
        names.update(info.alias or name for name, info in model.model_fields.items())  # "schema", "json"
        for info in model.model_fields.values():
            pending += [t for t in _model_types(info.annotation) if t not in seen]
    return frozenset(names)


def _model_types(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [t for arg in getattr(annotation, "__args__", ()) for t in _model_types(arg)]


# A validation error's location also names union members ("str", "list[TextPart]"): the parameter path
# stops at the first part that is not a request field.
_FIELD_NAMES = _request_field_names()


def _validation_error(exc: RequestValidationError) -> ApiError:
    error = exc.errors()[0]
    kind = error["type"]
    if kind == "json_invalid":
        return ApiError(400, f"malformed JSON body: {error.get('ctx', {}).get('error', 'cannot parse')}")
    path = ""
    for part in error["loc"][1:]:  # the first is "body"
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _FIELD_NAMES:
            path += f".{part}" if path else part
        else:
            break
    message = str(error["msg"]).removeprefix("Value error, ")
    if not path:
        if kind in ("missing", "model_attributes_type", "dict_type", "model_type"):
            return ApiError(400, "the request body must be a JSON object (Content-Type: application/json)")
        return ApiError(400, f"invalid request: {message}")
    if kind == "missing":
        return ApiError(400, f"missing required parameter '{path}'", param=path)
    return ApiError(400, f"invalid value for '{path}': {message}", param=path)


def _http_error(request: Request, exc: StarletteHTTPException) -> ApiError:
    if exc.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return ApiError(exc.status_code, message)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> Response:
        return as_api_error(exc).response()

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return _validation_error(exc).response()

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return _http_error(request, exc).response(dict(exc.headers or {}))

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(UsageError, on_api_error)  # SamplingParams' InvalidParameter: 400 with param
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_api_error)  # a bug: still a 500 in OpenAI's shape
