"""The HTTP API (FastAPI) over an EngineClient: OpenAI-compatible endpoints and a native /generate.

    POST /v1/chat/completions, POST /v1/completions   OpenAI's shapes; "stream": true answers with SSE
    GET  /v1/models                                    the served model
    POST /generate                                     native, SGLang-style (below)
    GET  /health                                       200 {"status": "ok"} while the engine runs, else 503
    GET  /metrics                                      Prometheus text (server/metrics.py)

With an API key set, /v1/* and /generate need `Authorization: Bearer KEY`; /health, /metrics and
/openapi.json stay open. Every error, at any status, has OpenAI's body
{"error": {"message", "type", "param", "code"}}; every 503 carries `Retry-After: 1`. An error after a
stream's headers went out is sent as its last event, `data: {"error": {...}}`, before `data: [DONE]`.

Native /generate
    request   {"text": "..."} or {"input_ids": [...]}, "stream": bool (default false), and optional
              "sampling_params": {max_new_tokens, temperature, top_p, top_k, min_p, stop, stop_token_ids,
              ignore_eos, seed, frequency_penalty, presence_penalty, repetition_penalty}; omitted
              settings take the server's defaults.
    response  {"text": ..., "output_ids": [...], "meta_info": {"prompt_tokens", "completion_tokens",
              "cached_tokens", "finish_reason"}}
    stream    SSE events `data: {...}\\n\\n` of the same shape, each with only that step's new text and
              ids (the counts are totals so far; finish_reason is set on the last), then `data: [DONE]`.

Each choice (n per prompt, for each prompt of a batch) is one engine request; they run concurrently and
their outputs are merged as they arrive. A client that goes away aborts its engine requests at once,
which frees their KV cache: a stream's generator closes them when starlette cancels it, and a plain
request watches for the disconnect while it waits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from minisgl_cli.config import SamplingConfig
from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.engine.tokenize import Prompt
from minisgl_cli.errors import UsageError
from minisgl_cli.server import protocol as p
from minisgl_cli.server.engine_client import EngineClient, EngineUnavailable, RequestRejected
from minisgl_cli.server.messages import TextOutput, TokenLogprobs
from minisgl_cli.server.metrics import CONTENT_TYPE, ApiMetrics

log = logging.getLogger(__name__)

_SSE_DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may buffer a stream
# OpenAPI: declaring the 4XX range also keeps FastAPI from documenting its 422, which this API never sends.
_ERROR_DOC: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": p.ErrorResponse, "description": "Invalid request, unknown model or missing API key"},
    503: {"model": p.ErrorResponse, "description": "Engine busy or down (Retry-After: 1)"},
}
_SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events with stream"},
    **_ERROR_DOC,
}
_CLIENT_GONE = 499  # nginx's "client closed request": only ever seen in logs and metrics


@dataclass
class ApiSettings:
    served_model_name: str
    api_key: str | None = None
    # Server-wide defaults for the sampling fields a request leaves out (same names as SamplingParams').
    sampling_defaults: SamplingConfig = field(default_factory=SamplingConfig)


# ---- errors


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


def _as_api_error(exc: Exception) -> ApiError:
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
    pending: list[type[BaseModel]] = [p.ChatCompletionRequest, p.CompletionRequest, p.NativeGenerateRequest]
    while pending:
        model = pending.pop()
        seen.add(model)
        names.update(model.model_fields)
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


def _install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> Response:
        return _as_api_error(exc).response()

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


# ---- middleware (plain ASGI: neither buffers a stream nor touches `receive`)


def _guarded(path: str) -> bool:
    return path.startswith("/v1/") or path == "/generate"


class _RequireApiKey:
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


class _CountRequests:
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


# ---- running engine requests


@dataclass
class Job:
    """One engine request: a choice of the response."""

    index: int  # the choice's index: prompt_index * n + j
    prompt: Prompt
    sampling: SamplingParams


def make_jobs(prompts: Sequence[Prompt], n: int, sampling: SamplingParams) -> list[Job]:
    """n choices per prompt. With a seed, choice j uses seed + j: reproducible, yet the choices differ."""
    jobs = []
    for i, prompt in enumerate(prompts):
        for j in range(n):
            seeded = (
                sampling
                if sampling.seed is None or j == 0
                else dataclasses.replace(sampling, seed=sampling.seed + j)
            )
            jobs.append(Job(i * n + j, prompt, seeded))
    return jobs


class Fanout:
    """Jobs run concurrently, one task each; their outputs come out merged, in arrival order.

    Closing it cancels the tasks, which closes their engine iterators: a request still running is aborted
    and its KV freed. The cancellation is requested synchronously, so it happens even when close() runs in
    a task that is itself being cancelled.
    """

    def __init__(
        self,
        engine: EngineClient,
        jobs: list[Job],
        *,
        max_tokens_explicit: bool,
        metrics: ApiMetrics,
        arrival: float,
    ) -> None:
        self._queue: asyncio.Queue[tuple[int, TextOutput | Exception | None]] = asyncio.Queue()
        self._running = len(jobs)
        self._buffer: list[tuple[int, TextOutput]] = []
        self._tasks = [
            asyncio.create_task(self._pump(engine, job, max_tokens_explicit, metrics, arrival))
            for job in jobs
        ]

    async def _pump(
        self, engine: EngineClient, job: Job, max_tokens_explicit: bool, metrics: ApiMetrics, arrival: float
    ) -> None:
        timer = metrics.timer(arrival)
        try:
            stream = engine.generate(job.prompt, job.sampling, max_tokens_explicit=max_tokens_explicit)
            async with aclosing(stream) as outputs:
                async for out in outputs:
                    timer.on_output(out)
                    self._queue.put_nowait((job.index, out))
        except Exception as exc:  # RequestRejected, EngineUnavailable: the consumer raises it
            self._queue.put_nowait((job.index, exc))
        else:
            self._queue.put_nowait((job.index, None))

    async def _next(self) -> tuple[int, TextOutput] | None:
        while self._running:
            index, item = await self._queue.get()
            if item is None:
                self._running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                return index, item
        return None

    async def start(self) -> None:
        """Wait until every job has its first output. A stream calls this before it sends its headers, so
        that a rejection of any of its requests still gets its own HTTP status."""
        started: set[int] = set()
        while len(started) < len(self._tasks) and (item := await self._next()) is not None:
            self._buffer.append(item)
            started.add(item[0])

    async def events(self) -> AsyncIterator[tuple[int, TextOutput]]:
        """(choice index, output) until every job has finished; raises the first job error."""
        while self._buffer:
            yield self._buffer.pop(0)
        while (item := await self._next()) is not None:
            yield item

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()


@dataclass
class Choice:
    """One choice's outputs so far."""

    index: int
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    logprob_chars: int = 0  # length of the token strings so far: the next token's text_offset
    finish_reason: str | None = None
    num_outputs: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, out: TextOutput) -> None:
        self.texts.append(out.text)
        self.token_ids += out.token_ids
        if out.logprobs:
            self.logprobs += out.logprobs
            self.logprob_chars += sum(len(t.token) for t in out.logprobs)
        self.finish_reason = out.finish_reason
        self.num_outputs += 1
        self.prompt_tokens = out.prompt_tokens
        self.completion_tokens = out.completion_tokens
        self.cached_tokens = out.cached_tokens

    @property
    def text(self) -> str:
        return "".join(self.texts)


def usage_of(choices: Sequence[Choice], n: int) -> p.Usage:
    """Each prompt's tokens once (its n choices share it), completion tokens summed over all choices."""
    prompt = cached = 0
    for start in range(0, len(choices), n):
        group = choices[start : start + n]
        prompt += max(c.prompt_tokens for c in group)
        cached += min(c.cached_tokens for c in group)  # what every choice found cached
    completion = sum(c.completion_tokens for c in choices)
    return p.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached),
    )


async def _client_gone(request: Request) -> None:
    # The body is already read, so an ASGI server's receive() now blocks until the client disconnects.
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)  # an unexpected message: do not spin on it


async def _unless_client_gone(request: Request, work: Awaitable[None]) -> bool:
    """Run `work`; if the client disconnects first, cancel it and return False."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()  # a no-op once it is done
    if task not in done:
        return False
    task.result()  # raises the work's error
    return True


async def _drain(fanout: Fanout, choices: list[Choice]) -> None:
    async for index, out in fanout.events():
        choices[index].add(out)


# ---- response formats


def _sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


class Format(ABC):
    """How one endpoint shapes a response and a stream's chunks."""

    include_usage = False

    def encode(self, chunk: BaseModel) -> bytes:
        # OpenAI sends "usage" in chunks only when asked (null until the last one).
        return _sse(chunk.model_dump_json(exclude=None if self.include_usage else {"usage"}))

    @abstractmethod
    def chunks(self, choice: Choice, out: TextOutput) -> Iterable[BaseModel]:
        """A stream's chunks for `out`, the newest output of `choice` (not yet added to it)."""

    def usage_chunk(self, usage: p.Usage) -> BaseModel:
        raise NotImplementedError

    @abstractmethod
    def response(self, choices: list[Choice], usage: p.Usage) -> BaseModel:
        """The whole response, once every choice has finished."""


class _OpenAIFormat(Format):
    id_prefix = ""

    def __init__(self, model: str, *, logprobs: bool, include_usage: bool) -> None:
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.logprobs = logprobs
        self.include_usage = include_usage


def _top_logprobs(token: TokenLogprobs) -> list[p.TopLogprob]:
    return [p.TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in token.top_logprobs]


def chat_logprobs(tokens: Sequence[TokenLogprobs]) -> p.ChatLogprobs:
    return p.ChatLogprobs(
        content=[
            p.ChatTokenLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes, top_logprobs=_top_logprobs(t))
            for t in tokens
        ]
    )


def completion_logprobs(tokens: Sequence[TokenLogprobs], start: int) -> p.CompletionLogprobs:
    """The legacy shape; text offsets count from `start`, the choice's text length before these tokens."""
    offsets = []
    for t in tokens:
        offsets.append(start)
        start += len(t.token)
    return p.CompletionLogprobs(
        tokens=[t.token for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=[{top.token: top.logprob for top in t.top_logprobs} for t in tokens],
        text_offset=offsets,
    )


class ChatFormat(_OpenAIFormat):
    id_prefix = "chatcmpl-"

    def _chunk(self, index: int, delta: dict[str, str], **fields: Any) -> p.ChatCompletionChunk:
        choice = p.ChatChunkChoice(index=index, delta=delta, **fields)
        return p.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def chunks(self, choice: Choice, out: TextOutput) -> Iterable[BaseModel]:
        if choice.num_outputs == 0:
            yield self._chunk(choice.index, {"role": "assistant", "content": ""})
        if out.text or out.logprobs:
            logprobs = chat_logprobs(out.logprobs) if self.logprobs and out.logprobs else None
            yield self._chunk(choice.index, {"content": out.text}, logprobs=logprobs)
        if out.finish_reason is not None:
            yield self._chunk(choice.index, {}, finish_reason=out.finish_reason)

    def usage_chunk(self, usage: p.Usage) -> BaseModel:
        return p.ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )

    def response(self, choices: list[Choice], usage: p.Usage) -> BaseModel:
        return p.ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                p.ChatChoice(
                    index=c.index,
                    message=p.AssistantMessage(content=c.text),
                    logprobs=chat_logprobs(c.logprobs) if self.logprobs else None,
                    finish_reason=c.finish_reason,
                )
                for c in choices
            ],
            usage=usage,
        )


class CompletionFormat(_OpenAIFormat):
    id_prefix = "cmpl-"

    def _chunk(self, choice: p.CompletionChoice) -> p.CompletionResponse:
        return p.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice])

    def chunks(self, choice: Choice, out: TextOutput) -> Iterable[BaseModel]:
        if out.text or out.logprobs:
            logprobs = (
                completion_logprobs(out.logprobs, choice.logprob_chars)
                if self.logprobs and out.logprobs
                else None
            )
            yield self._chunk(
                p.CompletionChoice(index=choice.index, text=out.text, logprobs=logprobs, finish_reason=None)
            )
        if out.finish_reason is not None:
            yield self._chunk(
                p.CompletionChoice(index=choice.index, text="", finish_reason=out.finish_reason)
            )

    def usage_chunk(self, usage: p.Usage) -> BaseModel:
        return p.CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )

    def response(self, choices: list[Choice], usage: p.Usage) -> BaseModel:
        return p.CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                p.CompletionChoice(
                    index=c.index,
                    text=c.text,
                    logprobs=completion_logprobs(c.logprobs, 0) if self.logprobs else None,
                    finish_reason=c.finish_reason,
                )
                for c in choices
            ],
            usage=usage,
        )


class NativeFormat(Format):
    @staticmethod
    def _body(text: str, ids: list[int], meta: Choice | TextOutput) -> p.NativeGenerateResponse:
        info = p.NativeMetaInfo(
            prompt_tokens=meta.prompt_tokens,
            completion_tokens=meta.completion_tokens,
            cached_tokens=meta.cached_tokens,
            finish_reason=meta.finish_reason,
        )
        return p.NativeGenerateResponse(text=text, output_ids=ids, meta_info=info)

    def chunks(self, choice: Choice, out: TextOutput) -> Iterable[BaseModel]:
        if out.text or out.token_ids or out.finish_reason is not None:
            yield self._body(out.text, out.token_ids, out)

    def response(self, choices: list[Choice], usage: p.Usage) -> BaseModel:
        (choice,) = choices
        return self._body(choice.text, choice.token_ids, choice)


async def _event_stream(fanout: Fanout, fmt: Format, choices: list[Choice], n: int) -> AsyncIterator[bytes]:
    try:
        async for index, out in fanout.events():
            for chunk in fmt.chunks(choices[index], out):
                yield fmt.encode(chunk)
            choices[index].add(out)
        if fmt.include_usage:
            yield fmt.encode(fmt.usage_chunk(usage_of(choices, n)))
    except Exception as exc:
        # The 200 and its headers are gone: the error can only be the stream's last event.
        yield _sse(json.dumps(_as_api_error(exc).body()))
    finally:
        fanout.close()
    yield _SSE_DONE


class _EventStream(StreamingResponse):
    """An SSE response that closes its fanout however the response ends. Starlette cancels a stream whose
    client left, but a generator suspended at a yield (or never started) is not closed by that."""

    def __init__(self, fanout: Fanout, events: AsyncIterator[bytes]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        self._fanout = fanout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._fanout.close()


# ---- the app


def _sampling_params(
    fields: p.SamplingFields, defaults: SamplingConfig, *, max_tokens: int | None, logprobs: int | None
) -> SamplingParams:
    """The request's settings; fields it leaves out take the server's defaults."""
    given = {f.name: getattr(fields, f.name, None) for f in dataclasses.fields(defaults)}
    given["max_tokens"] = max_tokens
    values = {name: getattr(defaults, name) if value is None else value for name, value in given.items()}
    stop = [fields.stop] if isinstance(fields.stop, str) else list(fields.stop or [])
    return SamplingParams(
        **values,
        stop=stop,
        stop_token_ids=list(fields.stop_token_ids or []),
        ignore_eos=fields.ignore_eos,
        logprobs=logprobs,
    )


def create_app(engine: EngineClient, settings: ApiSettings) -> FastAPI:
    metrics = ApiMetrics()
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.close()

    # strict_content_type off: a JSON body without a Content-Type header (curl -d) is still read as JSON.
    app = FastAPI(
        title="minisgl", summary="OpenAI-compatible LLM server", lifespan=lifespan, strict_content_type=False
    )
    _install_error_handlers(app)

    def check_model(model: str | None) -> None:
        if model is not None and model != settings.served_model_name:
            message = f"the model '{model}' does not exist: this server serves '{settings.served_model_name}'"
            raise ApiError(404, message, param="model", code="model_not_found")

    async def serve(
        request: Request,
        fmt: Format,
        jobs: list[Job],
        *,
        n: int,
        max_tokens_explicit: bool,
        stream: bool,
        arrival: float,
    ) -> Response | BaseModel:
        choices = [Choice(index) for index in range(len(jobs))]
        fanout = Fanout(
            engine, jobs, max_tokens_explicit=max_tokens_explicit, metrics=metrics, arrival=arrival
        )
        streaming = False
        try:
            if stream:
                if not await _unless_client_gone(request, fanout.start()):
                    return Response(status_code=_CLIENT_GONE)
                streaming = True  # from here on the response owns the fanout
                return _EventStream(fanout, _event_stream(fanout, fmt, choices, n))
            if not await _unless_client_gone(request, _drain(fanout, choices)):
                return Response(status_code=_CLIENT_GONE)
        except Exception as exc:
            raise _as_api_error(exc) from exc
        finally:
            if not streaming:
                fanout.close()
        return fmt.response(choices, usage_of(choices, n))

    @app.post("/v1/chat/completions", response_model=p.ChatCompletionResponse, responses=_SSE_DOC)
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Any:
        arrival = time.perf_counter()
        check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        sampling = _sampling_params(
            body, settings.sampling_defaults, max_tokens=max_tokens, logprobs=logprobs
        )
        messages = [m.to_prompt() for m in body.messages]
        fmt = ChatFormat(settings.served_model_name, logprobs=body.logprobs, include_usage=body.include_usage)
        jobs = make_jobs([messages], body.n, sampling)
        return await serve(
            request,
            fmt,
            jobs,
            n=body.n,
            max_tokens_explicit=max_tokens is not None,
            stream=body.stream,
            arrival=arrival,
        )

    @app.post("/v1/completions", response_model=p.CompletionResponse, responses=_SSE_DOC)
    async def completions(body: p.CompletionRequest, request: Request) -> Any:
        arrival = time.perf_counter()
        check_model(body.model)
        if body.echo:
            raise ApiError(400, "'echo' is not supported", param="echo")
        sampling = _sampling_params(
            body, settings.sampling_defaults, max_tokens=body.max_tokens, logprobs=body.logprobs
        )
        fmt = CompletionFormat(
            settings.served_model_name, logprobs=body.logprobs is not None, include_usage=body.include_usage
        )
        jobs = make_jobs(body.prompts, body.n, sampling)
        return await serve(
            request,
            fmt,
            jobs,
            n=body.n,
            max_tokens_explicit=body.max_tokens is not None,
            stream=body.stream,
            arrival=arrival,
        )

    @app.post("/generate", response_model=p.NativeGenerateResponse, responses=_SSE_DOC)
    async def generate(body: p.NativeGenerateRequest, request: Request) -> Any:
        arrival = time.perf_counter()
        params = body.sampling_params
        sampling = _sampling_params(
            params, settings.sampling_defaults, max_tokens=params.max_new_tokens, logprobs=None
        )
        jobs = make_jobs([body.prompt], 1, sampling)
        return await serve(
            request,
            NativeFormat(),
            jobs,
            n=1,
            max_tokens_explicit=params.max_new_tokens is not None,
            stream=body.stream,
            arrival=arrival,
        )

    @app.get("/v1/models", response_model=p.ModelList, responses=_ERROR_DOC)
    async def models() -> p.ModelList:
        card = p.ModelCard(
            id=settings.served_model_name, created=started, max_model_len=engine.info.context_length
        )
        return p.ModelList(data=[card])

    @app.get("/health", responses={503: _ERROR_DOC[503]})
    async def health() -> dict[str, str]:
        if not engine.healthy:
            raise ApiError(503, "the engine is not running")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(engine), media_type=CONTENT_TYPE)

    if settings.api_key:
        app.add_middleware(_RequireApiKey, api_key=settings.api_key)
    endpoints = frozenset(route.path for route in app.routes if hasattr(route, "path"))
    app.add_middleware(_CountRequests, metrics=metrics, endpoints=endpoints)  # outermost: counts the 401s too
    return app
