"""Benchmark reports: the rows of the terminal tables, the minisgl / hf ratios, and one JSON document per run.

JSON document (schema_version 1). Every key is always present; null where it does not apply.

    {
      "schema_version": 1,
      "command": "offline" | "latency",
      "machine": {"platform": str, "python": str, "cpu": str, "cpu_count": int, "gpu": str | null,
                  "gpu_count": int, "torch": str, "transformers": str, "minisgl": str},
      "config": {"model": str, "dummy_weights": bool, "device": str, "dtype": str, "baseline": "hf" | null,
                 "engine": {every EngineConfig field},
                 "bench": offline: {"dataset", "num_prompts", "input_len", "output_len", "dataset_seed",
                                    "hf_batch_size": int | null}
                          latency: {"batch_sizes": [int], "input_len": int, "output_len": int, "seed": int}},
      "results": [one per system (offline) or per system and batch size (latency), minisgl first;
        offline: {"system": "minisgl" | "hf", "num_requests", "input_tokens", "output_tokens", "elapsed_s",
                  "requests_per_s", "input_tok_per_s", "output_tok_per_s", "total_tok_per_s"}
        latency: {"system", "batch_size", "input_len", "output_len", "prefill_ms", "prefill_tok_per_s",
                  "decode_steps", "decode_ms_per_step", "decode_tok_per_s", "roofline_share": float | null}],
      "comparisons": [{"metric": "output_tok_per_s" | "prefill_tok_per_s" | "decode_tok_per_s",
                       "batch_size": int | null, "minisgl": float, "hf": float, "ratio": minisgl / hf}]
                     (empty without a baseline)
    }

Times are seconds unless the key says ms; rates are per second of wall-clock time.
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
from minisgl_cli.errors import MinisglError

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


# ---- the JSON document


def build_report(
    command: str,
    config: dict[str, Any],
    results: list[ThroughputResult] | list[LatencyResult],
    comparisons: list[Comparison],
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "machine": machine_info(),
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


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    from minisgl_cli import __version__

    gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count() or 0,
        "gpu": torch.cuda.get_device_name(0) if gpu_count else None,
        "gpu_count": gpu_count,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "minisgl": __version__,
    }


def _record(result: ThroughputResult | LatencyResult) -> dict[str, Any]:
    keys = THROUGHPUT_KEYS if isinstance(result, ThroughputResult) else LATENCY_KEYS
    return {key: getattr(result, key) for key in keys}


def _cpu_name() -> str:
    # platform.processor() is often empty or just "x86_64" on Linux; /proc/cpuinfo names the model.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
