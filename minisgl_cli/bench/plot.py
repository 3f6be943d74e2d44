"""`--plot FILE`: a figure of a benchmark's results, drawn with matplotlib (the optional extra `minisgl[plot]`).

- offline: output and total tokens/s of each system (bars), and requests completed over time;
- latency: decode ms per step and prefill ms against the batch size, one line per system;
- prefix: prompt tokens computed and total tokens/s, radix against naive (bars);
- serve: the CDFs of TTFT, ITL and E2E over completed requests, and output tokens/s over the run.

matplotlib is imported here only, inside functions, so a benchmark without --plot never loads it; figures are
drawn on the Agg canvas directly (no pyplot), so nothing depends on a display or pyplot's global state.
The numbers behind the curves (CDF steps, token arrival times, throughput windows) come from plain numpy
functions that need no matplotlib.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from minisgl_cli.errors import MinisglError, UsageError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from minisgl_cli.bench.latency import LatencyResult
    from minisgl_cli.bench.offline import ThroughputResult
    from minisgl_cli.bench.prefix import PrefixResult
    from minisgl_cli.bench.serving import RequestRecord

MISSING_MATPLOTLIB = '--plot needs matplotlib: pip install "minisgl[plot]"'
_PANEL_INCHES = (5.0, 3.6)
_MAX_WINDOWS = 60  # throughput-over-time windows: enough for a shape, few enough that each holds tokens


def check_plot_target(path: Path) -> None:
    """UsageError unless matplotlib can be imported and knows the file type of `path` (by its suffix).

    Called before a benchmark runs, so that a missing package costs one line rather than a whole run.
    """
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise UsageError(MISSING_MATPLOTLIB) from None
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = path.suffix.lower().removeprefix(".")
    if suffix not in formats:
        raise UsageError(f"--plot {path}: name a .png file (or .svg, .pdf: a type matplotlib writes)")


# ---- the numbers behind the curves


def cdf(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The empirical CDF: the values sorted, and for each the share of values at or below it."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    return x, np.arange(1, len(x) + 1) / max(len(x), 1)


def token_times(records: Sequence[RequestRecord]) -> np.ndarray:
    """When each streamed token of the completed requests arrived, in seconds after the run began: the first
    at send + TTFT, each next one its inter-token gap later."""
    times = [r.start_s + r.ttft_s + np.concatenate(([0.0], np.cumsum(r.itl_s))) for r in records if r.ok]
    return np.concatenate(times) if times else np.zeros(0)


def throughput_over_time(times: np.ndarray, elapsed_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Tokens per second in equal windows over [0, elapsed_s]: the windows' centres and the rates."""
    windows = int(np.clip(np.sqrt(len(times)), 1, _MAX_WINDOWS))
    edges = np.linspace(0.0, elapsed_s, windows + 1)
    counts, _ = np.histogram(times, edges)
    return (edges[:-1] + edges[1:]) / 2, counts / (elapsed_s / windows)


# ---- the figures


def offline_figure(title: str, results: Sequence[ThroughputResult]) -> Figure:
    fig, (rates, done) = _figure(title, 2)
    systems = [r.system for r in results]
    _grouped_bars(
        rates,
        systems,
        {
            "output tok/s": [r.output_tok_per_s for r in results],
            "total tok/s": [r.total_tok_per_s for r in results],
        },
    )
    rates.set_title("throughput")
    rates.set_ylabel("tokens / s")
    for r in results:
        x = np.concatenate(([0.0], np.sort(r.finish_s)))
        done.step(x, np.arange(len(x)), where="post", label=r.system)
    done.set_title("requests completed")
    done.set_xlabel("time (s)")
    done.set_ylabel("requests")
    done.legend()
    return fig


def latency_figure(title: str, results: Sequence[LatencyResult]) -> Figure:
    fig, (decode, prefill) = _figure(title, 2)
    for system in dict.fromkeys(r.system for r in results):
        own = sorted((r for r in results if r.system == system), key=lambda r: r.batch_size)
        sizes = [r.batch_size for r in own]
        decode.plot(sizes, [r.decode_ms_per_step for r in own], marker="o", label=system)
        prefill.plot(sizes, [r.prefill_ms for r in own], marker="o", label=system)
    sizes = sorted({r.batch_size for r in results})
    for ax, name in ((decode, "decode ms / step"), (prefill, "prefill ms")):
        if sizes[-1] >= 4 * sizes[0]:
            ax.set_xscale("log", base=2)  # batch sizes usually double: even spacing
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_title(name)
        ax.set_xlabel("batch size")
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.legend()
    return fig


def prefix_figure(title: str, results: Sequence[PrefixResult]) -> Figure:
    fig, (computed, rates) = _figure(title, 2)
    caches = [r.cache_type for r in results]
    _grouped_bars(computed, caches, {"prompt tokens computed": [r.prefill_tokens for r in results]})
    computed.set_title("prompt tokens computed")
    computed.set_ylabel("tokens")
    _grouped_bars(rates, caches, {"total tok/s": [r.run.total_tok_per_s for r in results]})
    rates.set_title("throughput")
    rates.set_ylabel("tokens / s")
    return fig


def serving_figure(title: str, records: Sequence[RequestRecord], elapsed_s: float) -> Figure:
    fig, (ttft, itl, e2e, rate) = _figure(title, 2, rows=2)
    ok = [r for r in records if r.ok]
    for ax, name, seconds, counted in (
        (ttft, "TTFT", [r.ttft_s for r in ok], "requests"),
        (itl, "ITL", [gap for r in ok for gap in r.itl_s], "gaps"),
        (e2e, "E2E", [r.e2e_s for r in ok], "requests"),
    ):
        ax.set_title(f"{name} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel(f"share of {counted}")
        if seconds:
            x, y = cdf(seconds)
            ax.step(x * 1e3, y, where="post")
            ax.set_ylim(0, 1.02)
        else:
            _no_data(ax, "no completed requests")
    rate.set_title("output throughput")
    rate.set_xlabel("time (s)")
    rate.set_ylabel("tokens / s")
    times = token_times(records)
    if len(times) and elapsed_s > 0:
        centres, rates = throughput_over_time(times, elapsed_s)
        rate.plot(centres, rates)
        rate.set_ylim(bottom=0)
    else:
        _no_data(rate, "no tokens")
    return fig


def save(fig: Figure, path: Path) -> None:
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise MinisglError(f"cannot write the plot {path}: {exc.strerror or exc}") from exc


def _figure(title: str, columns: int, rows: int = 1) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = _PANEL_INCHES
    fig = Figure(figsize=(width * columns, height * rows), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself to the figure: savefig renders with Agg
    fig.suptitle(title)
    return fig, list(fig.subplots(rows, columns, squeeze=False).ravel())


def _grouped_bars(ax: Axes, groups: Sequence[str], series: dict[str, Sequence[float]]) -> None:
    """One group of bars per system (or cache type), one bar per series, each labelled with its value."""
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, fmt="{:,.0f}", fontsize="small")
    ax.set_xticks(x, list(groups))
    if len(series) > 1:
        ax.legend()
    ax.margins(y=0.15)  # room above the tallest bar for its label


def _no_data(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center")
