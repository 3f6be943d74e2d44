"""The HTTP API (FastAPI) over an EngineClient: OpenAI-compatible endpoints and a native /generate.

    POST /v1/chat/completions, POST /v1/completions   OpenAI's shapes; "stream": true answers with SSE
    GET  /v1/models                                    the served model
    POST /generate                                     native, SGLang-style (below)
    POST /tokenize, /detokenize (also under /v1/)      vLLM's: a prompt's ids as generation sees them, and back
    GET  /version                                      {"version": minisgl's}
    GET  /health                                       200 {"status": "ok"} while the engine runs, else 503
    GET  /metrics                                      Prometheus text (server/metrics.py)

With an API key set, /v1/*, /generate, /tokenize and /detokenize need `Authorization: Bearer KEY`;
/health, /metrics, /version and /openapi.json stay open. A request body over --max-request-bytes is a 413
before any of it is parsed (middleware.LimitBody), and a large one is parsed off the event loop
(body_route.py). Every error, at any status, has OpenAI's body
{"error": {"message", "type", "param", "code"}}; every 503 carries `Retry-After: 1`. An error after a
stream's headers went out is sent as its last event, `data: {"error": {...}}`, before `data: [DONE]`.

Request fields (protocol.py): every field of OpenAI's two request bodies works, is a no-op that cannot change
the output (user, metadata, ...), or is refused with a 400 whose `param` names it (tools, audio, ...); names
OpenAI does not have are ignored, with one warning per name, except the vLLM/SGLang extras protocol.py
declares. An output constraint (response_format, or vLLM's structured_outputs / guided_*, or SGLang's regex /
ebnf) becomes SamplingParams.structured; at most one per request.

/tokenize and /detokenize (vLLM's shapes; the tokenizer workers do the work, never the event loop)
    request   {"prompt": "..."} or {"messages": [...], "tools"?, "chat_template_kwargs"?}, and
              "add_special_tokens" (default true for a prompt; a chat's template writes its own, so only false
              there), "return_token_strs"; {"tokens": [...]} for /detokenize
    response  {"count", "max_model_len", "tokens": [...], "token_strs": [...] or null}; {"prompt": "..."}
    Messages are rendered exactly as a chat completion renders them (with the generation prompt).

Native /generate
    request   {"text": "..."} or {"input_ids": [...]}, "stream": bool (default false), and optional
              "sampling_params": {max_new_tokens, temperature, top_p, top_k, min_p, stop, stop_token_ids,
              ignore_eos, seed, frequency_penalty, presence_penalty, repetition_penalty, logit_bias,
              json_schema (SGLang's: the schema as a JSON string), regex, ebnf}; omitted settings take the
              server's defaults.
    response  {"text": ..., "output_ids": [...], "meta_info": {"prompt_tokens", "completion_tokens",
              "cached_tokens", "finish_reason"}}
    stream    SSE events `data: {...}\\n\\n` of the same shape, each with only that step's new text and
              ids (the counts are totals so far; finish_reason is set on the last), then `data: [DONE]`.

The pieces: http_errors.py (the error body and the handlers that give every error that shape),
middleware.py (the API key, the request counter), fanout.py (each choice is one engine request; they run
concurrently and their outputs are merged as they arrive), formats.py (response and stream shapes).
A client that goes away aborts its engine requests at once, which frees their KV cache: a stream's
generator closes them when starlette cancels it, and a plain request watches for the disconnect (here)
while it waits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel

from minisgl_cli import __version__
from minisgl_cli.config import SamplingConfig, ServerConfig
from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.engine.tokenize import ChatPrompt
from minisgl_cli.server import protocol as p
from minisgl_cli.server.body_route import OffLoopRoute
from minisgl_cli.server.chat_output import ChatOutputRules
from minisgl_cli.server.engine_client import EngineClient
from minisgl_cli.server.fanout import Choice, Fanout, Job, drain, make_jobs, usage_of
from minisgl_cli.server.formats import (
    ChatFormat,
    CompletionFormat,
    EventStream,
    Format,
    NativeFormat,
    event_stream,
)
from minisgl_cli.server.http_errors import ApiError, as_api_error, install_error_handlers
from minisgl_cli.server.metrics import CONTENT_TYPE, ApiMetrics
from minisgl_cli.server.middleware import CLIENT_GONE, CountRequests, LimitBody, RequireApiKey

# OpenAPI: declaring the 4XX range also keeps FastAPI from documenting its 422, which this API never sends.
_ERROR_DOC: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": p.ErrorResponse, "description": "Invalid request, unknown model or missing API key"},
    503: {"model": p.ErrorResponse, "description": "Engine busy or down (Retry-After: 1)"},
}
_SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events with stream"},
    **_ERROR_DOC,
}


@dataclass
class ApiSettings:
    served_model_name: str
    api_key: str | None = None
    # Server-wide defaults for the sampling fields a request leaves out (same names as SamplingParams').
    sampling_defaults: SamplingConfig = field(default_factory=SamplingConfig)
    # How chat outputs are read (server/chat_output.py): None reads no tool calls / no reasoning.
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    max_request_bytes: int = ServerConfig.max_request_bytes  # a bigger body is a 413, unread


# ---- disconnect watching


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


# ---- the app


def _sampling_params(
    fields: p.SamplingFields, defaults: SamplingConfig, *, max_tokens: int | None, logprobs: int | None
) -> SamplingParams:
    """The request's settings; fields it leaves out take the server's defaults. InvalidParameter (a 400)
    for a value the engine cannot take, among them an invalid schema, regex or grammar."""
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
        logit_bias=fields.token_bias,
        structured=fields.structured(),
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
    install_error_handlers(app)
    app.router.route_class = OffLoopRoute  # every route added below parses a large body on a thread

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
                    return Response(status_code=CLIENT_GONE)
                streaming = True  # from here on the response owns the fanout
                return EventStream(fanout, event_stream(fanout, fmt, choices, n))
            if not await _unless_client_gone(request, drain(fanout, choices)):
                return Response(status_code=CLIENT_GONE)
        except Exception as exc:
            raise as_api_error(exc) from exc
        finally:
            if not streaming:
                fanout.close()
        return fmt.response(choices, usage_of(choices, n))

    @app.post("/v1/chat/completions", response_model=p.ChatCompletionResponse, responses=_SSE_DOC)
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Any:
        arrival = time.perf_counter()
        check_model(body.model)
        p.check_fields(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        sampling = _sampling_params(
            body, settings.sampling_defaults, max_tokens=max_tokens, logprobs=logprobs
        )
        mode, tool_name = body.tool_rules()
        template_kwargs = body.chat_template_kwargs or {}
        prompt = ChatPrompt([m.to_prompt() for m in body.messages], body.tool_definitions(), template_kwargs)
        rules = ChatOutputRules(mode, tool_name, settings.tool_call_parser, settings.reasoning_parser)
        if mode == "auto" and settings.tool_call_parser is None:
            message = (
                "this server reads no tool calls from free text (--tool-call-parser none, or none detected)"
            )
            raise ApiError(400, message + ": use tool_choice 'required' or a named tool", param="tool_choice")
        fmt = ChatFormat(
            settings.served_model_name, logprobs=body.logprobs, include_usage=body.include_usage, rules=rules
        )
        jobs = make_jobs([prompt], body.n, sampling)
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
        p.check_fields(body)
        if body.best_of is not None and body.best_of != body.n:
            message = "'best_of' is not supported unless it equals n: candidates are not ranked"
            raise ApiError(400, message, param="best_of")
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
        p.check_fields(body)
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

    @app.post("/tokenize", response_model=p.TokenizeResponse, responses=_ERROR_DOC)
    @app.post("/v1/tokenize", response_model=p.TokenizeResponse, responses=_ERROR_DOC)
    async def tokenize(body: p.TokenizeRequest) -> p.TokenizeResponse:
        check_model(body.model)
        p.check_fields(body)
        try:
            reply = await engine.tokenize(
                body.to_prompt(),
                add_special_tokens=body.special_tokens,
                token_strs=bool(body.return_token_strs),
            )
        except Exception as exc:
            raise as_api_error(exc) from exc
        return p.TokenizeResponse(
            count=len(reply.token_ids),
            max_model_len=engine.info.context_length,
            tokens=reply.token_ids,
            token_strs=reply.token_strs,
        )

    @app.post("/detokenize", response_model=p.DetokenizeResponse, responses=_ERROR_DOC)
    @app.post("/v1/detokenize", response_model=p.DetokenizeResponse, responses=_ERROR_DOC)
    async def detokenize(body: p.DetokenizeRequest) -> p.DetokenizeResponse:
        check_model(body.model)
        p.check_fields(body)
        try:
            text = await engine.detokenize(list(body.tokens))
        except Exception as exc:
            raise as_api_error(exc) from exc
        return p.DetokenizeResponse(prompt=text)

    @app.get("/version", response_model=p.VersionResponse)
    async def version() -> p.VersionResponse:
        return p.VersionResponse(version=__version__)

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

    app.add_middleware(LimitBody, max_bytes=settings.max_request_bytes)
    if settings.api_key:  # outside LimitBody: a client without the key gets its 401 before its body is read
        app.add_middleware(RequireApiKey, api_key=settings.api_key)
    endpoints = frozenset(route.path for route in app.routes if hasattr(route, "path"))
    app.add_middleware(CountRequests, metrics=metrics, endpoints=endpoints)  # outermost: counts the 401s too
    return app
