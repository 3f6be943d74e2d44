"""The shared-prefix benchmark: the same workload through the radix prefix cache and through no cache.

Each request is a long shared prefix (a system prompt) plus a short question of its own; every request
generates exactly its output length (greedy, eos ignored). What a prefix cache changes is measured two
ways, in one run: prompt tokens the model actually computed (the scheduler's prefill count; the shared
part ideally once) and end-to-end throughput.

JSON document (schema_version 1):

    {"schema_version": 1, "command": "prefix", "machine": {as in bench/report.py},
     "config": {"model", "device", "dtype", "engine": {every EngineConfig field},
                "bench": {"num_prompts", "prefix_len", "question_len", "output_len", "dataset_seed"}},
     "results": [{"cache_type": "radix" | "naive", "num_requests", "input_tokens", "output_tokens",
                  "prefill_tokens", "cached_tokens", "elapsed_s", "output_tok_per_s", "total_tok_per_s"}],
     "comparisons": [{"metric": "total_tok_per_s" | "prefill_tokens", "radix": float, "naive": float,
                      "ratio": radix / naive}]}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from minisgl_cli.bench.offline import ThroughputResult, run_offline, warm_up
from minisgl_cli.bench.progress import Progress
from minisgl_cli.bench.workload import Workload

if TYPE_CHECKING:
    from minisgl_cli.engine.llm import LLM

CACHE_TYPES = ("radix", "naive")
RESULT_KEYS = (
    "cache_type",
    "num_requests",
    "input_tokens",
    "output_tokens",
    "prefill_tokens",
    "cached_tokens",
    "elapsed_s",
    "output_tok_per_s",
    "total_tok_per_s",
)


@dataclass(frozen=True)
class PrefixResult:
    cache_type: str
    run: ThroughputResult  # requests, tokens (cached ones included), time and rates
    prefill_tokens: int  # prompt tokens run through the model (recomputed ones after a preemption included)


def run_prefix(
    llm: LLM, cache_type: str, workload: Workload, on_progress: Progress | None = None
) -> PrefixResult:
    """Warm up, then time the workload and count the prompt tokens the scheduler prefilled for it;
    `on_progress` is told of output tokens as they are made (run_offline)."""
    warm_up(llm)
    before = llm.scheduler.stats().tokens_prefilled
    run = run_offline(llm, workload, on_progress, system=cache_type, warmup=False)
    return PrefixResult(cache_type, run, llm.scheduler.stats().tokens_prefilled - before)


def comparisons(radix: PrefixResult, naive: PrefixResult) -> list[dict[str, Any]]:
    return [
        {"metric": metric, "radix": value(radix), "naive": value(naive), "ratio": value(radix) / value(naive)}
        for metric, value in (
            ("total_tok_per_s", lambda r: r.run.total_tok_per_s),
            ("prefill_tokens", lambda r: r.prefill_tokens),
        )
    ]


def table(results: list[PrefixResult]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    columns = (
        "cache",
        "requests",
        "prompt tokens",
        "prefilled",
        "cached",
        "time (s)",
        "output tok/s",
        "total tok/s",
    )
    rows = [
        (
            r.cache_type,
            str(r.run.num_requests),
            f"{r.run.input_tokens:,}",
            f"{r.prefill_tokens:,}",
            f"{r.run.cached_tokens:,}",
            f"{r.run.elapsed_s:.2f}",
            f"{r.run.output_tok_per_s:,.1f}",
            f"{r.run.total_tok_per_s:,.1f}",
        )
        for r in results
    ]
    return columns, rows


def record(result: PrefixResult) -> dict[str, Any]:
    own = {"cache_type": result.cache_type, "prefill_tokens": result.prefill_tokens}
    return {key: own[key] if key in own else getattr(result.run, key) for key in RESULT_KEYS}
