"""The API process's Prometheus metrics, in the text exposition format (version 0.0.4), written by hand.

Counters and histograms are updated as requests come and go. The engine's gauges (running and waiting
requests, KV cache usage, prefix-cache hit rate) come from the scheduler's latest EngineStats, read at
scrape time, so a scrape costs the engine nothing.

Latencies are measured here, in the API, from the HTTP request's arrival: they include tokenization, queueing
and the IPC hops, which is what a client sees.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from minisgl_cli.server.engine_client import EngineClient
    from minisgl_cli.server.messages import TextOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. TTFT spans a short prompt on a GPU (ms) to a long queued one on a CPU (tens of s); an
# inter-token gap spans a fast GPU decode step (ms) to a preempted request's recompute.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in pairs) + "}"


def _header(name: str, help: str, kind: str) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]


class Counter:
    def __init__(self, name: str, help: str, label_names: tuple[str, ...] = ()) -> None:
        self.name = name
        self.help = help
        self.label_names = label_names
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        if len(label_values) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {label_values}")
        self._values[label_values] = self._values.get(label_values, 0.0) + amount

    def value(self, *label_values: str) -> float:
        return self._values.get(label_values, 0.0)

    def render(self) -> list[str]:
        lines = _header(self.name, self.help, "counter")
        if not self.label_names and not self._values:
            lines.append(f"{self.name} 0")  # a counter with no labels exists from the start
        for key, value in sorted(self._values.items()):
            lines.append(
                f"{self.name}{_labels(list(zip(self.label_names, key, strict=True)))} {_number(value)}"
            )
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.help = help
        self.bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self.bounds) + 1)  # per bucket (not cumulative); the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """Record `value` `times` times (an output that brought several tokens after one wait)."""
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), len(self.bounds))
        self._counts[index] += times
        self.count += times
        self.sum += value * times

    def render(self) -> list[str]:
        lines = _header(self.name, self.help, "histogram")
        cumulative = 0
        for bound, count in zip((*self.bounds, math.inf), self._counts, strict=True):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        lines.append(f"{self.name}_sum {_number(self.sum)}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


def _gauge(name: str, help: str, value: float) -> list[str]:
    return [*_header(name, help, "gauge"), f"{name} {_number(value)}"]


class RequestTimer:
    """One engine request's timings: time to its first token, then the gaps between its tokens."""

    def __init__(self, metrics: ApiMetrics, arrival: float) -> None:
        self._metrics = metrics
        self._last = arrival
        self._started = False

    def on_output(self, out: TextOutput) -> None:
        if not out.token_ids:
            return  # no new token: the gap runs on to the next output that brings one
        now = time.perf_counter()
        metrics = self._metrics
        if not self._started:
            self._started = True
            metrics.ttft.observe(now - self._last)
            metrics.prompt_tokens.inc(amount=out.prompt_tokens)
        else:
            # Tokens that arrive together shared the wait: each is credited an equal part of it.
            metrics.itl.observe((now - self._last) / len(out.token_ids), times=len(out.token_ids))
        metrics.generation_tokens.inc(amount=len(out.token_ids))
        self._last = now


class ApiMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "minisgl_requests_total", "HTTP requests by endpoint and status code.", ("endpoint", "status")
        )
        self.prompt_tokens = Counter(
            "minisgl_prompt_tokens_total", "Prompt tokens of engine requests that produced a token."
        )
        self.generation_tokens = Counter("minisgl_generation_tokens_total", "Tokens generated.")
        self.ttft = Histogram(
            "minisgl_time_to_first_token_seconds",
            "Time from the HTTP request's arrival to an engine request's first token.",
            TTFT_BUCKETS,
        )
        self.itl = Histogram(
            "minisgl_inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
            ITL_BUCKETS,
        )

    def timer(self, arrival: float) -> RequestTimer:
        """A timer for one engine request of an HTTP request that arrived at `arrival` (perf_counter)."""
        return RequestTimer(self, arrival)

    def render(self, engine: EngineClient) -> str:
        stats = engine.stats
        lines = [
            *self.requests.render(),
            *self.prompt_tokens.render(),
            *self.generation_tokens.render(),
            *self.ttft.render(),
            *self.itl.render(),
            *_gauge(
                "minisgl_requests_in_flight", "Engine requests the API is waiting on.", engine.num_in_flight
            ),
        ]
        if stats is not None:  # none before the scheduler's first report
            lines += [
                *_gauge(
                    "minisgl_num_requests_running",
                    "Requests in the scheduler's running batch.",
                    stats.num_running,
                ),
                *_gauge(
                    "minisgl_num_requests_waiting", "Requests queued in the scheduler.", stats.num_waiting
                ),
                *_gauge("minisgl_kv_cache_usage_ratio", "Share of KV cache pages in use.", stats.kv_usage),
                *_gauge(
                    "minisgl_prefix_cache_hit_rate",
                    "Share of looked-up prompt tokens found in the prefix cache, since start.",
                    stats.prefix_hit_rate,
                ),
                *_header(
                    "minisgl_preemptions_total", "Requests preempted for KV space, since start.", "counter"
                ),
                f"minisgl_preemptions_total {stats.num_preemptions}",
            ]
        return "\n".join(lines) + "\n"
