"""OffLoopRoute: a large JSON request body is parsed and validated on a worker thread, not on the event loop.

FastAPI parses (json.loads) and validates (pydantic) a body inline, on the event loop that also streams every
other request's tokens; a body of a few MB (a million token ids) takes most of a second, and every stream
stalls meanwhile. This route does both on a thread for a body over OFF_LOOP_BYTES and hands FastAPI the
validated model, which FastAPI's own validation then passes through unchanged (pydantic does not revalidate
an instance of the model itself). The GIL still serialises the C and Rust parts of that work, so the loop
gets its turns between them rather than throughout: the stall shrinks, it does not vanish; the body limit
(middleware.LimitBody) and protocol.py's cheap prompt union keep it short.
"""

from __future__ import annotations

import asyncio
import email.message
import inspect
import json
import typing
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Scope

# Smaller bodies parse in well under a millisecond: the thread hop would cost more than it saves.
OFF_LOOP_BYTES = 64 * 1024

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class _ParsedRequest(Request):
    """A request whose body was already read and parsed; FastAPI's handler reads both from here."""

    def __init__(self, scope: Scope, receive: Receive, raw: bytes, parsed: BaseModel) -> None:
        super().__init__(scope, receive)
        self._raw = raw
        self._parsed = parsed

    async def body(self) -> bytes:
        return self._raw

    async def json(self) -> Any:
        return self._parsed


class OffLoopRoute(APIRoute):
    def get_route_handler(self) -> Handler:
        handle = super().get_route_handler()
        model = _body_model(self.endpoint)
        if model is None:
            return handle

        async def route(request: Request) -> Response:
            raw = await request.body()
            if len(raw) <= OFF_LOOP_BYTES or not _is_json(request):
                return await handle(request)
            parsed = await asyncio.to_thread(_parse, model, raw)
            if parsed is None:  # not JSON: FastAPI parses it again, and answers as it always does
                return await handle(request)
            return await handle(_ParsedRequest(request.scope, request.receive, raw, parsed))

        return route


def _body_model(endpoint: Callable[..., Any]) -> type[BaseModel] | None:
    """The pydantic model an endpoint takes as its body, if it takes one."""
    hints = typing.get_type_hints(endpoint)
    for name in inspect.signature(endpoint).parameters:
        hint = hints.get(name)
        if isinstance(hint, type) and issubclass(hint, BaseModel):
            return hint
    return None


def _is_json(request: Request) -> bool:
    # As FastAPI decides (with strict_content_type off): no Content-Type, or application/json or */*+json.
    value = request.headers.get("content-type")
    if not value:
        return True
    message = email.message.Message()
    message["content-type"] = value
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def _parse(model: type[BaseModel], raw: bytes) -> BaseModel | None:
    """The validated body; None when it is no JSON; RequestValidationError, as FastAPI raises it, when it
    does not fit the model."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        raise RequestValidationError(errors, body=None) from None
