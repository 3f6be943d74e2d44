"""Online serving benchmark: drive any OpenAI-compatible server over HTTP and time every streamed token.

Requests go out on a schedule (all at once, or Poisson arrivals at --request-rate), at most
--max-concurrency in flight when that is set; each is a streaming completion whose SSE chunks are timed as
they arrive. Token-id prompts (the random dataset) go to /v1/completions, text prompts (ShareGPT) to
/v1/chat/completions; every request asks for exactly its output length (max_tokens, ignore_eos) and for the
usage chunk, which gives the token counts.

Per request: TTFT is send -> first chunk with content; the inter-token latencies (ITL) are the gaps between
content chunks, a chunk that carries several tokens (its usage says so) sharing its gap equally among them;
TPOT is (E2E - TTFT) / (output tokens - 1); E2E is send -> end of the stream. A request's send time is when it
leaves the client, after any wait for a --max-concurrency slot.

A client only: no torch, no engine. Library code: it raises MinisglError / UsageError and never prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from minisgl_cli.bench.progress import Progress
from minisgl_cli.bench.rates import TokenRates
from minisgl_cli.bench.workload import BenchRequest, ChatRequest
from minisgl_cli.errors import UsageError
from minisgl_cli.openai_http import auth_headers, body_message, error_reason, http_error

ServeRequest = BenchRequest | ChatRequest

# Connecting should be quick; a queued request may wait long for its first byte on a loaded server, so reads
# get a bound only a stuck server reaches.
_TIMEOUT = httpx.Timeout(connect=10.0, read=1800.0, write=60.0, pool=None)
# Added to the dataset seed so that the arrival gaps and the prompts come from independent streams.
_ARRIVAL_STREAM = 1
SLO_KEYS = ("ttft", "tpot", "e2e")


# ---- where the server is and what each request says


@dataclass(frozen=True)
class Target:
    base_url: str  # scheme://host[:port][/prefix], without a trailing /v1
    model: str
    api_key: str | None = None
    temperature: float = 0.0


def _request_body(target: Target, request: ServeRequest) -> tuple[str, dict[str, Any]]:
    """The endpoint and JSON body of one streaming request."""
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": request.output_len,
        "temperature": target.temperature,
        "ignore_eos": True,  # a vLLM/SGLang extension: exactly max_tokens tokens, whatever the weights say
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if isinstance(request, BenchRequest):
        return "/v1/completions", {**body, "prompt": request.prompt_ids}
    return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": request.text}]}


# ---- arrivals


def arrival_offsets(num_requests: int, request_rate: float | None, seed: int) -> list[float]:
    """When each request is due, in seconds after the start: all at 0 without a rate, else a Poisson process
    (exponential gaps of mean 1 / rate, from `seed`) whose first request goes at 0."""
    if request_rate is None:
        return [0.0] * num_requests
    if not (request_rate > 0 and math.isfinite(request_rate)):
        raise UsageError(f"--request-rate {request_rate}: expected a positive number")
    rng = np.random.default_rng([seed, _ARRIVAL_STREAM])
    gaps = rng.exponential(1.0 / request_rate, size=max(num_requests - 1, 0))
    return [0.0, *np.cumsum(gaps).tolist()][:num_requests]


# ---- one request


@dataclass(frozen=True)
class RequestRecord:
    """What one request did. A failed one carries `error`, and e2e_s is how long it took to fail."""

    output_len: int  # tokens asked for
    start_s: float  # when it was sent, seconds after the run began
    error: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: tuple[float, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None for a single token."""
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass
class _Timeline:
    """When the content chunks of one stream arrived, and how many tokens each brought."""

    first: float | None = None
    last: float = 0.0
    tokens: int = 0
    itl_s: list[float] = field(default_factory=list)

    def add(self, now: float, tokens: int) -> None:
        if self.first is None:
            self.first = now
            # Tokens that came with the first one arrived with it: no wait between them.
            self.itl_s.extend([0.0] * (tokens - 1))
        else:
            self.itl_s.extend([(now - self.last) / tokens] * tokens)
        self.last = now
        self.tokens += tokens


class _StreamError(Exception):
    """The response went wrong in a way that fails the request; the message says how."""


async def _send(client: httpx.AsyncClient, target: Target, request: ServeRequest, t0: float) -> RequestRecord:
    path, body = _request_body(target, request)
    sent = time.perf_counter()
    timeline = _Timeline()
    usage: dict[str, Any] = {}
    try:
        async with client.stream("POST", path, json=body, headers=auth_headers(target.api_key)) as response:
            if response.status_code != 200:
                await response.aread()
                raise _StreamError(http_error(response))
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments, event: lines
                now = time.perf_counter()
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = _parse_chunk(data)
                chunk_usage = chunk.get("usage")
                chunk_usage = chunk_usage if isinstance(chunk_usage, dict) else {}
                usage = chunk_usage or usage
                if _content(chunk):
                    timeline.add(now, _chunk_tokens(chunk_usage, timeline.tokens))
    except httpx.HTTPError as exc:
        return _failed(request, sent, t0, f"{type(exc).__name__}: {error_reason(exc)}")
    except _StreamError as exc:
        return _failed(request, sent, t0, str(exc))
    end = time.perf_counter()
    if not done:
        return _failed(request, sent, t0, "the stream ended before 'data: [DONE]'")
    if timeline.first is None:
        return _failed(request, sent, t0, "the stream carried no tokens")
    fallback_input = len(request.prompt_ids) if isinstance(request, BenchRequest) else 0
    return RequestRecord(
        output_len=request.output_len,
        start_s=sent - t0,
        input_tokens=_count(usage, "prompt_tokens", fallback_input),
        output_tokens=_count(usage, "completion_tokens", timeline.tokens),
        ttft_s=timeline.first - sent,
        e2e_s=end - sent,
        itl_s=tuple(timeline.itl_s),
    )


def _failed(request: ServeRequest, sent: float, t0: float, error: str) -> RequestRecord:
    # e2e_s of a failure is when it failed, so that the report can name the first failure in time.
    return RequestRecord(request.output_len, sent - t0, error=error, e2e_s=time.perf_counter() - sent)


def _parse_chunk(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        raise _StreamError(f"malformed SSE data: {data[:200]!r}") from None
    if not isinstance(chunk, dict):
        raise _StreamError(f"malformed SSE data: {data[:200]!r}")
    if chunk.get("error"):
        raise _StreamError(f"error in the stream: {body_message(chunk, data)}")
    return chunk


def _content(chunk: dict[str, Any]) -> str:
    """The text a completions chunk (choices[0].text) or chat chunk (choices[0].delta.content) carries."""
    choices = chunk.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return text if isinstance(text, str) else ""


def _chunk_tokens(usage: dict[str, Any], counted: int) -> int:
    """Tokens in a content chunk: what its running usage adds beyond those counted so far (servers that send
    usage on every chunk), else one."""
    total = _count(usage, "completion_tokens", 0)
    return max(total - counted, 1)


def _count(usage: dict[str, Any], key: str, fallback: int) -> int:
    value = usage.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else fallback


# ---- the run


def run_serving(
    target: Target,
    requests: Sequence[ServeRequest],
    offsets: Sequence[float],
    max_concurrency: int | None = None,
    on_done: Progress | None = None,
) -> tuple[list[RequestRecord], float]:
    """Send every request at its offset (see arrival_offsets), at most `max_concurrency` in flight; return
    the records in request order and the wall-clock seconds from the start to the last response."""
    if len(offsets) != len(requests):
        raise ValueError(f"{len(requests)} requests but {len(offsets)} arrival offsets")
    if max_concurrency is not None and max_concurrency < 1:
        raise UsageError(f"--max-concurrency {max_concurrency}: expected a positive integer")
    return asyncio.run(_run(target, requests, offsets, max_concurrency, on_done))


async def _run(
    target: Target,
    requests: Sequence[ServeRequest],
    offsets: Sequence[float],
    max_concurrency: int | None,
    on_done: Progress | None,
) -> tuple[list[RequestRecord], float]:
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency is not None else None
    # No connection cap: httpx's default of 100 would silently limit concurrency below what was asked for.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=target.base_url, timeout=_TIMEOUT, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(request: ServeRequest, offset: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            async with gate if gate is not None else contextlib.nullcontext():
                record = await _send(client, target, request, t0)
            if on_done is not None:
                on_done(1)
            return record

        records = await asyncio.gather(*(one(r, o) for r, o in zip(requests, offsets, strict=True)))
        return list(records), time.perf_counter() - t0


# ---- service-level objectives


@dataclass(frozen=True)
class Slo:
    """Upper bounds in ms a request must meet to count towards goodput; None: no bound."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def met_by(self, record: RequestRecord) -> bool:
        tpot = record.tpot_s
        return record.ok and all(
            bound is None or (value is not None and value * 1e3 <= bound)
            for bound, value in (
                (self.ttft_ms, record.ttft_s),
                # A single-token answer has no time per output token, so no TPOT bound to miss.
                (self.tpot_ms, 0.0 if tpot is None else tpot),
                (self.e2e_ms, record.e2e_s),
            )
        )


def parse_slo(text: str) -> Slo:
    """ "ttft=200,tpot=50" (milliseconds; keys ttft, tpot, e2e) -> Slo."""
    bounds: dict[str, float] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise UsageError(f"--slo {text!r}: expected KEY=MS pairs, keys {', '.join(SLO_KEYS)}")
        if key in bounds:
            raise UsageError(f"--slo {text!r}: {key} is given twice")
        try:
            ms = float(value)
        except ValueError:
            ms = math.nan
        if not (ms > 0 and math.isfinite(ms)):
            raise UsageError(f"--slo {text!r}: {key} must be a positive number of milliseconds")
        bounds[key] = ms
    return Slo(**{f"{key}_ms": ms for key, ms in bounds.items()})


# ---- the summary


@dataclass(frozen=True)
class LatencyStats:
    mean_ms: float
    median_ms: float
    p90_ms: float
    p99_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencyStats | None:
        """Mean and percentiles (linear interpolation) of the values, in ms; None for no values."""
        if not seconds:
            return None
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        median, p90, p99 = np.percentile(ms, [50, 90, 99]).tolist()
        return cls(float(ms.mean()), median, p90, p99)


@dataclass(frozen=True)
class ServingResult(TokenRates):
    num_requests: int
    completed: int
    failed: int
    first_error: str | None  # of the failure that happened first
    short_outputs: int  # completed with fewer tokens than asked: the server did not honour ignore_eos
    input_tokens: int  # of completed requests, as the server's usage counts them
    output_tokens: int
    elapsed_s: float
    ttft: LatencyStats | None  # None when no request completed
    itl: LatencyStats | None  # over every gap of every completed request
    tpot: LatencyStats | None  # over completed requests with at least 2 output tokens
    e2e: LatencyStats | None
    good_requests: int | None  # completed within every --slo bound; None without --slo

    @property
    def requests_per_s(self) -> float:
        return self.completed / self.elapsed_s

    @property
    def goodput_requests_per_s(self) -> float | None:
        return None if self.good_requests is None else self.good_requests / self.elapsed_s


def summarize(records: Sequence[RequestRecord], elapsed_s: float, slo: Slo | None = None) -> ServingResult:
    ok = [r for r in records if r.ok]
    failures = sorted((r for r in records if not r.ok), key=lambda r: r.start_s + r.e2e_s)
    tpots = [r.tpot_s for r in ok if r.tpot_s is not None]
    return ServingResult(
        num_requests=len(records),
        completed=len(ok),
        failed=len(failures),
        first_error=failures[0].error if failures else None,
        short_outputs=sum(r.output_tokens < r.output_len for r in ok),
        input_tokens=sum(r.input_tokens for r in ok),
        output_tokens=sum(r.output_tokens for r in ok),
        elapsed_s=elapsed_s,
        ttft=LatencyStats.of([r.ttft_s for r in ok]),
        itl=LatencyStats.of([gap for r in ok for gap in r.itl_s]),
        tpot=LatencyStats.of(tpots),
        e2e=LatencyStats.of([r.e2e_s for r in ok]),
        good_requests=None if slo is None else sum(slo.met_by(r) for r in ok),
    )
