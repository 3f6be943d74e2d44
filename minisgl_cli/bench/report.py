"""Benchmark reports: the rows of the terminal tables, the minisgl / hf ratios, and one JSON document per run.

JSON document (schema_version 1). Every key is always present; null where it does not apply.

    {
      "schema_version": 1,
      "command": "offline" | "latency" | "serve",
      "machine": {"platform": str, "python": str, "cpu": str, "cpu_count": int, "gpu": str | null,
                  "gpu_count": int, "torch": str, "transformers": str, "minisgl": str}
                 (serve: the client's machine, which never imports torch and cannot see the server's
                  hardware, so "gpu", "gpu_count", "torch" and "transformers" are null),
      "config": offline, latency:
                  {"model": str, "dummy_weights": bool, "device": str, "dtype": str, "baseline": "hf" | null,
                   "engine": {every EngineConfig field},
                   "bench": offline: {"dataset": "random" | the dataset file's path, "num_prompts": requests run,
                                      "input_len": str | null (a dataset file), "output_len", "dataset_seed",
                                      "hf_batch_size": int | null, "temperature": float}
                            latency: {"batch_sizes": [int], "input_len": int, "output_len": int, "seed": int,
                                      "bandwidth_bytes_per_s": float | null (measured on GPUs)}}
                serve: {"model": str, "url": str,
                        "bench": {"dataset": "random" | "sharegpt", "dataset_path": str | null,
                                  "num_prompts", "input_len": str | null (sharegpt), "output_len": str,
                                  "dataset_seed", "vocab_size": int | null (sharegpt),
                                  "request_rate": float | null, "max_concurrency": int | null,
                                  "temperature": float,
                                  "slo": {"ttft_ms", "tpot_ms", "e2e_ms": float | null} | null}},
      "results": [one per system (offline) or per system and batch size (latency), minisgl first; one (serve);
        offline: {"system": "minisgl" | "hf", "num_requests", "input_tokens", "output_tokens", "elapsed_s",
                  "requests_per_s", "input_tok_per_s", "output_tok_per_s", "total_tok_per_s"}
        latency: {"system", "batch_size", "input_len", "output_len", "prefill_ms", "prefill_tok_per_s",
                  "decode_steps", "decode_ms_per_step", "decode_tok_per_s", "roofline_share": float | null}
        serve: {"num_requests", "completed", "failed", "first_error": str | null, "short_outputs",
                "input_tokens", "output_tokens", "elapsed_s", "requests_per_s", "input_tok_per_s",
                "output_tok_per_s", "total_tok_per_s", "goodput_requests_per_s": float | null (no --slo),
                then for M in ttft, itl, tpot, e2e: "mean_M_ms", "median_M_ms", "p90_M_ms", "p99_M_ms"
                (float | null: null when no request completed)}],
      "comparisons": [{"metric": "output_tok_per_s" | "prefill_tok_per_s" | "decode_tok_per_s",
                       "batch_size": int | null, "minisgl": float, "hf": float, "ratio": minisgl / hf}]
                     (empty without a baseline, and for serve)
    }

serve counts tokens and rates over completed requests only; "short_outputs" counts completed requests that
got fewer tokens than asked (the server stopped early despite ignore_eos). Its definitions of TTFT, ITL,
TPOT and E2E are in bench/serving.py.

Times are seconds unless the key says ms; rates are per second of wall-clock time. bench prefix writes a
document of the same frame with its own config and results (see bench/prefix.py); `bench compare` reads any
of them (bench/compare.py).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minisgl_cli.bench.latency import LatencyResult
from minisgl_cli.bench.offline import ThroughputResult
from minisgl_cli.bench.serving import LatencyStats, ServingResult
from minisgl_cli.errors import MinisglError
from minisgl_cli.wording import plural

SCHEMA_VERSION = 1
THROUGHPUT_KEYS = (
    "system",
    "num_requests",
    "input_tokens",
    "output_tokens",
    "elapsed_s",
    "requests_per_s",
    "input_tok_per_s",
    "output_tok_per_s",
    "total_tok_per_s",
)
LATENCY_KEYS = (
    "system",
    "batch_size",
    "input_len",
    "output_len",
    "prefill_ms",
    "prefill_tok_per_s",
    "decode_steps",
    "decode_ms_per_step",
    "decode_tok_per_s",
    "roofline_share",
)
# The latency distributions of a serving run: ServingResult attributes, with their table labels.
SERVING_LATENCIES = {"ttft": "TTFT", "itl": "ITL", "tpot": "TPOT", "e2e": "E2E"}
SERVING_STATS = ("mean", "median", "p90", "p99")
_SERVING_COUNTS = (
    "num_requests",
    "completed",
    "failed",
    "first_error",
    "short_outputs",
    "input_tokens",
    "output_tokens",
    "elapsed_s",
    "requests_per_s",
    "input_tok_per_s",
    "output_tok_per_s",
    "total_tok_per_s",
    "goodput_requests_per_s",
)
SERVING_KEYS = (
    *_SERVING_COUNTS,
    *(f"{stat}_{metric}_ms" for metric in SERVING_LATENCIES for stat in SERVING_STATS),
)
_METRIC_LABELS = {
    "output_tok_per_s": "output tok/s",
    "prefill_tok_per_s": "prefill tok/s",
    "decode_tok_per_s": "decode tok/s",
}


@dataclass(frozen=True)
class Comparison:
    metric: str  # a rate, higher is better: a key of _METRIC_LABELS
    batch_size: int | None  # None for offline runs
    minisgl: float
    hf: float

    @property
    def ratio(self) -> float:
        return self.minisgl / self.hf


@dataclass(frozen=True)
class TableData:
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]


# ---- comparisons


def offline_comparisons(results: list[ThroughputResult]) -> list[Comparison]:
    by_system = {r.system: r for r in results}
    if "hf" not in by_system:
        return []
    ours, hf = by_system["minisgl"], by_system["hf"]
    return [Comparison("output_tok_per_s", None, ours.output_tok_per_s, hf.output_tok_per_s)]


def latency_comparisons(results: list[LatencyResult]) -> list[Comparison]:
    hf = {r.batch_size: r for r in results if r.system == "hf"}
    comparisons = []
    for ours in (r for r in results if r.system == "minisgl" and r.batch_size in hf):
        theirs = hf[ours.batch_size]
        for metric in ("prefill_tok_per_s", "decode_tok_per_s"):
            comparisons.append(
                Comparison(metric, ours.batch_size, getattr(ours, metric), getattr(theirs, metric))
            )
    return comparisons


def ratio_lines(comparisons: list[Comparison]) -> list[str]:
    """ "minisgl / hf output tok/s = 1.23x" (offline); "batch 8: minisgl / hf prefill tok/s = ..x, decode ..." """
    groups: dict[int | None, list[Comparison]] = {}
    for c in comparisons:
        groups.setdefault(c.batch_size, []).append(c)
    lines = []
    for batch_size, group in groups.items():
        ratios = ", ".join(f"{_METRIC_LABELS[c.metric]} = {c.ratio:.2f}x" for c in group)
        prefix = "" if batch_size is None else f"batch {batch_size}: "
        lines.append(f"{prefix}minisgl / hf {ratios}")
    return lines


# ---- terminal tables


def offline_table(results: list[ThroughputResult]) -> TableData:
    columns = (
        "system",
        "requests",
        "input tokens",
        "output tokens",
        "time (s)",
        "req/s",
        "output tok/s",
        "total tok/s",
    )
    rows = [
        (
            r.system,
            str(r.num_requests),
            str(r.input_tokens),
            str(r.output_tokens),
            f"{r.elapsed_s:.2f}",
            f"{r.requests_per_s:,.2f}",
            f"{r.output_tok_per_s:,.1f}",
            f"{r.total_tok_per_s:,.1f}",
        )
        for r in results
    ]
    return TableData(columns, rows)


def latency_table(results: list[LatencyResult]) -> TableData:
    columns = (
        "system",
        "batch",
        "input",
        "output",
        "prefill ms",
        "prefill tok/s",
        "decode ms/step",
        "decode tok/s",
    )
    rows = [
        (
            r.system,
            str(r.batch_size),
            str(r.input_len),
            str(r.output_len),
            f"{r.prefill_ms:,.2f}",
            f"{r.prefill_tok_per_s:,.1f}",
            f"{r.decode_ms_per_step:,.2f}",
            f"{r.decode_tok_per_s:,.1f}",
        )
        for r in results
    ]
    # The roofline column only where some share is known (a GPU in the bandwidth table): elsewhere all blank.
    if any(r.roofline_share is not None for r in results):
        columns += ("roofline",)
        rows = [
            (*row, "-" if r.roofline_share is None else f"{r.roofline_share:.0%}")
            for row, r in zip(rows, results, strict=True)
        ]
    return TableData(columns, rows)


def serving_tables(result: ServingResult) -> tuple[TableData, TableData]:
    """Throughput (one metric a row: too many for columns in 80 characters) and the latency distributions
    (one row per metric, in ms)."""
    rows = [
        ("requests", str(result.num_requests)),
        ("completed", str(result.completed)),
        ("failed", str(result.failed)),
        ("time (s)", f"{result.elapsed_s:.2f}"),
        ("req/s", f"{result.requests_per_s:,.2f}"),
        ("input tok/s", f"{result.input_tok_per_s:,.1f}"),
        ("output tok/s", f"{result.output_tok_per_s:,.1f}"),
        ("total tok/s", f"{result.total_tok_per_s:,.1f}"),
    ]
    goodput = result.goodput_requests_per_s
    if goodput is not None:
        rows.append(("goodput req/s", f"{goodput:,.2f}"))
    latency_columns = ("latency (ms)", *SERVING_STATS)
    latency_rows = []
    for metric, label in SERVING_LATENCIES.items():
        stats: LatencyStats | None = getattr(result, metric)
        cells = ("-",) * len(SERVING_STATS)
        if stats is not None:
            cells = tuple(f"{getattr(stats, f'{stat}_ms'):,.2f}" for stat in SERVING_STATS)
        latency_rows.append((label, *cells))
    return TableData(("throughput", "value"), rows), TableData(latency_columns, latency_rows)


def serving_notes(result: ServingResult) -> list[str]:
    """What a reader must know beside the tables: failures (with the first error) and short outputs."""
    notes = []
    if result.failed:
        notes.append(
            f"{result.failed} of {plural(result.num_requests, 'request')} failed; "
            f"first error: {result.first_error}"
        )
    if result.short_outputs:
        notes.append(
            f"{plural(result.short_outputs, 'completed request')} got fewer tokens than asked "
            "(the server stopped before max_tokens despite ignore_eos)"
        )
    return notes


# ---- the JSON document


def build_report(
    command: str,
    config: dict[str, Any],
    results: list[ThroughputResult] | list[LatencyResult] | list[ServingResult],
    comparisons: list[Comparison],
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "machine": machine_info(with_torch=command != "serve"),
        "config": config,
        "results": [_record(r) for r in results],
        "comparisons": [
            {
                "metric": c.metric,
                "batch_size": c.batch_size,
                "minisgl": c.minisgl,
                "hf": c.hf,
                "ratio": c.ratio,
            }
            for c in comparisons
        ],
    }


def write_report(path: Path, report: dict[str, Any]) -> None:
    try:
        path.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as exc:
        raise MinisglError(f"cannot write the JSON report {path}: {exc.strerror or exc}") from exc


def machine_info(with_torch: bool = True) -> dict[str, Any]:
    """The machine this process runs on. with_torch=False (the serving client, which must work without
    torch): the GPU and torch/transformers keys are null rather than imported."""
    from minisgl_cli import __version__

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count() or 0,
        "gpu": None,
        "gpu_count": None,
        "torch": None,
        "transformers": None,
        "minisgl": __version__,
    }
    if with_torch:
        import torch
        import transformers

        gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        info["gpu"] = torch.cuda.get_device_name(0) if gpu_count else None
        info["gpu_count"] = gpu_count
        info["torch"] = torch.__version__
        info["transformers"] = transformers.__version__
    return info


def _record(result: ThroughputResult | LatencyResult | ServingResult) -> dict[str, Any]:
    if isinstance(result, ServingResult):
        return _serving_record(result)
    keys = THROUGHPUT_KEYS if isinstance(result, ThroughputResult) else LATENCY_KEYS
    return {key: getattr(result, key) for key in keys}


def _serving_record(result: ServingResult) -> dict[str, Any]:
    record = {key: getattr(result, key) for key in _SERVING_COUNTS}
    for metric in SERVING_LATENCIES:
        stats: LatencyStats | None = getattr(result, metric)
        for stat in SERVING_STATS:
            record[f"{stat}_{metric}_ms"] = None if stats is None else getattr(stats, f"{stat}_ms")
    return record


def _cpu_name() -> str:
    # platform.processor() is often empty or just "x86_64" on Linux; /proc/cpuinfo names the model.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
