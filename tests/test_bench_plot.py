"""`--plot`: the numbers behind the curves against hand computations, the data each figure draws against the
results it was given, valid PNG files from the commands, and the refusal (exit 2, before any run) when
matplotlib is missing or the file type unknown."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from model_helpers import make_tiny_model
from test_bench import KV, run_bench

from minisgl_cli.bench.latency import LatencyResult
from minisgl_cli.bench.offline import ThroughputResult
from minisgl_cli.bench.plot import (
    MISSING_MATPLOTLIB,
    cdf,
    latency_figure,
    offline_figure,
    prefix_figure,
    save,
    serving_figure,
    throughput_over_time,
    token_times,
)
from minisgl_cli.bench.prefix import PrefixResult
from minisgl_cli.bench.serving import RequestRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DPI = 120  # plot.save's


@pytest.fixture(scope="module", autouse=True)
def _matplotlib_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # matplotlib writes its font cache under ~ unless told otherwise (read when it is first imported).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPLCONFIGDIR", str(tmp_path_factory.mktemp("mplconfig")))
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("plot"), "llama", seed=3)


def assert_png(path: Path, width_in: float, height_in: float) -> None:
    """A PNG that matplotlib reads back, of the figure's size in pixels."""
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = matplotlib.image.imread(path)
    assert pixels.shape == (round(height_in * DPI), round(width_in * DPI), 4)
    assert pixels.std() > 0  # something was drawn


# ---- the numbers


def test_cdf_by_hand() -> None:
    x, y = cdf([0.3, 0.1, 0.2, 0.1])
    assert x.tolist() == [0.1, 0.1, 0.2, 0.3]
    assert y.tolist() == [0.25, 0.5, 0.75, 1.0]


def test_token_times_and_throughput_by_hand() -> None:
    records = [
        # sent at 0.5 s, first token 0.25 s later, then gaps of 0.5 and 0.25: tokens at 0.75, 1.25, 1.5.
        RequestRecord(3, start_s=0.5, output_tokens=3, ttft_s=0.25, e2e_s=1.5, itl_s=(0.5, 0.25)),
        RequestRecord(1, start_s=0.0, output_tokens=1, ttft_s=1.75, e2e_s=1.75),
        RequestRecord(2, start_s=0.0, error="HTTP 500", e2e_s=0.1),  # failed: no tokens
    ]
    times = token_times(records)
    assert sorted(times.tolist()) == [0.75, 1.25, 1.5, 1.75]
    # 4 tokens: sqrt(4) = 2 windows over 2 s, [0, 1) with 1 token and [1, 2] with 3, each 1 s long.
    centres, rates = throughput_over_time(times, 2.0)
    assert centres.tolist() == [0.5, 1.5] and rates.tolist() == [1.0, 3.0]
    assert token_times(records[2:]).size == 0


# ---- the figures


def _records() -> list[RequestRecord]:
    rng = np.random.default_rng(0)
    return [
        RequestRecord(
            8,
            start_s=0.01 * i,
            output_tokens=8,
            ttft_s=float(rng.uniform(0.01, 0.05)),
            e2e_s=0.2 + 0.01 * i,
            itl_s=tuple(rng.uniform(0.001, 0.02, size=7).tolist()),
        )
        for i in range(20)
    ]


def test_serving_figure_draws_the_cdfs_and_writes_a_png(tmp_path: Path) -> None:
    records = _records()
    fig = serving_figure("bench serve", records, elapsed_s=0.5)
    ttft, itl, e2e, rate = fig.axes
    assert [ax.get_title() for ax in fig.axes] == ["TTFT CDF", "ITL CDF", "E2E CDF", "output throughput"]
    for ax, seconds in (
        (ttft, [r.ttft_s for r in records]),
        (itl, [g for r in records for g in r.itl_s]),
        (e2e, [r.e2e_s for r in records]),
    ):
        (line,) = ax.get_lines()
        x, y = cdf(seconds)
        np.testing.assert_allclose(line.get_xdata(), x * 1e3)
        np.testing.assert_allclose(line.get_ydata(), y)
    (line,) = rate.get_lines()
    # Tokens counted over the windows add up to every token streamed (8 per request).
    widths = np.diff(np.linspace(0, 0.5, len(line.get_xdata()) + 1))
    assert float(np.sum(line.get_ydata() * widths)) == pytest.approx(20 * 8)
    out = tmp_path / "serve.png"
    save(fig, out)
    assert_png(out, 10.0, 7.2)


def test_serving_figure_without_completed_requests() -> None:
    fig = serving_figure("t", [RequestRecord(4, 0.0, error="refused")], elapsed_s=1.0)
    assert all(not ax.get_lines() for ax in fig.axes)
    assert all(ax.texts for ax in fig.axes)  # each panel says there is nothing to show


def test_offline_figure_bars_and_completions() -> None:
    ours = ThroughputResult("minisgl", 3, 100, 60, elapsed_s=2.0, finish_s=[1.5, 0.5, 2.0])
    hf = ThroughputResult("hf", 3, 100, 60, elapsed_s=4.0, finish_s=[4.0, 4.0, 4.0])
    fig = offline_figure("bench offline", [ours, hf])
    bars, done = fig.axes
    heights = [patch.get_height() for patch in bars.patches]
    assert heights == [30.0, 15.0, 80.0, 40.0]  # output tok/s of each system, then total tok/s
    assert [t.get_text() for t in bars.get_xticklabels()] == ["minisgl", "hf"]
    minisgl, static = done.get_lines()
    assert minisgl.get_xdata().tolist() == [0.0, 0.5, 1.5, 2.0]
    assert minisgl.get_ydata().tolist() == [0, 1, 2, 3]
    assert static.get_xdata().tolist() == [0.0, 4.0, 4.0, 4.0]


def test_latency_and_prefix_figures() -> None:
    results = [
        LatencyResult("minisgl", bs, 10, 5, prefill_s=0.001 * bs, decode_steps=4, decode_s=0.004 * bs)
        for bs in (8, 1, 32)
    ] + [LatencyResult("hf", 1, 10, 5, prefill_s=0.01, decode_steps=4, decode_s=0.08)]
    decode, prefill = latency_figure("bench latency", results).axes
    minisgl, hf = decode.get_lines()
    assert minisgl.get_xdata().tolist() == [1, 8, 32]
    np.testing.assert_allclose(minisgl.get_ydata(), [1.0, 8.0, 32.0])  # ms per step: 4 steps in 4 * bs ms
    np.testing.assert_allclose(hf.get_ydata(), [20.0])
    np.testing.assert_allclose(prefill.get_lines()[0].get_ydata(), [1.0, 8.0, 32.0])
    assert decode.get_xscale() == "log"

    radix = PrefixResult("radix", ThroughputResult("radix", 4, 160, 16, elapsed_s=2.0), prefill_tokens=64)
    naive = PrefixResult("naive", ThroughputResult("naive", 4, 160, 16, elapsed_s=4.0), prefill_tokens=160)
    computed, rates = prefix_figure("bench prefix", [radix, naive]).axes
    assert [p.get_height() for p in computed.patches] == [64, 160]
    assert [p.get_height() for p in rates.patches] == [88.0, 44.0]


# ---- the commands


def test_offline_and_latency_commands_write_pngs(tiny: Path, tmp_path: Path) -> None:
    offline_png = tmp_path / "offline.png"
    args = ("--num-prompts", "4", "--input-len", "3,8", "--output-len", "2,4")
    res = run_bench("offline", "-m", tiny, *KV, *args, "--baseline", "hf", "--plot", offline_png)
    assert res.code == 0, res.stderr
    assert f"wrote {offline_png}" in res.stderr
    assert_png(offline_png, 10.0, 3.6)
    latency_png = tmp_path / "latency.png"
    args = ("--batch-sizes", "1,2", "--input-len", "4", "--output-len", "3")
    res = run_bench("latency", "-m", tiny, *KV, *args, "--plot", latency_png)
    assert res.code == 0, res.stderr
    assert_png(latency_png, 10.0, 3.6)


@pytest.mark.parametrize("command", ["offline", "latency", "prefix"])
def test_missing_matplotlib_exits_2_before_the_run(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes `import matplotlib` raise ImportError, as when it is not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    # A model that does not exist: were the check after loading it, the error would be another one.
    res = run_bench(command, "-m", tmp_path / "no-model", "--plot", tmp_path / "p.png")
    assert res.code == 2, res.stderr
    assert res.error_lines == [f"error: {MISSING_MATPLOTLIB}"]
    assert MISSING_MATPLOTLIB == '--plot needs matplotlib: pip install "minisgl[plot]"'
    assert res.stdout == "" and not (tmp_path / "p.png").exists()


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("p.txt", "name a .png file"), ("p", "name a .png file"), ("nodir/p.png", "does not exist")],
)
def test_bad_plot_paths_exit_2_before_the_run(tmp_path: Path, name: str, fragment: str) -> None:
    res = run_bench("offline", "-m", tmp_path / "no-model", "--plot", tmp_path / name)
    assert res.code == 2, res.stderr
    assert len(res.error_lines) == 1 and fragment in res.error_lines[0], res.stderr
