"""The benchmarks' progress bars move while a run goes, not only when it ends: the engine's offline run
reports output tokens per engine step (requests of one length all finish in its last step), transformers'
static batch per generate() step, latency runs per step; each bar ends at exactly its total. And
transformers draws none of its own bars beside ours (a subprocess, whose stderr is what a user sees)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from model_helpers import make_tiny_model
from rich.progress import Progress, TaskID
from test_bench import KV, VOCAB, run_bench

from minisgl_cli.bench.hf_baseline import load_hf_model, run_hf_latency, run_hf_offline
from minisgl_cli.bench.latency import run_latency
from minisgl_cli.bench.offline import run_offline
from minisgl_cli.bench.progress import Tally
from minisgl_cli.bench.workload import BenchRequest, Workload, random_workload
from minisgl_cli.cli import ui
from minisgl_cli.engine.llm import LLM
from minisgl_cli.model_source import resolve_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("progress"), "llama", seed=5)


@pytest.fixture(scope="module")
def tiny_llm(tiny: Path) -> LLM:
    return LLM(str(tiny), kv_cache_tokens=4096, max_running_requests=8)


@pytest.fixture(scope="module")
def hf_model(tiny: Path) -> Any:
    return load_hf_model(
        resolve_model(str(tiny)), dummy_weights=False, dtype=torch.float32, device=torch.device("cpu"), seed=0
    )


def test_tally_never_passes_its_total_and_finish_tops_it_up() -> None:
    seen: list[int] = []
    tally = Tally(seen.append, total=10)
    for n in (4, 0, 3, 5, 2):  # 14 offered: the last 4 would pass the total
        tally.add(n)
    assert seen == [4, 3, 3] and tally.done == 10
    tally.finish()
    assert seen == [4, 3, 3]  # already complete: nothing more
    short = Tally(seen.append, total=5)
    short.add(2)
    short.finish()
    assert seen[-2:] == [2, 3] and short.done == 5
    Tally(None, total=3).finish()  # no callback: counts only


def test_engine_progress_moves_while_same_length_requests_run(tiny_llm: LLM) -> None:
    """4 requests of 6 tokens run in one batch and finish in the same step: counted per request they would
    show 0/4 until the end. Counted in tokens, each step adds one token for each of the 4."""
    w = random_workload(4, (5, 5), (6, 6), VOCAB, seed=3)
    seen: list[int] = []
    run_offline(tiny_llm, w, seen.append)
    assert sum(seen) == w.output_tokens == 24
    assert seen == [4] * 6  # one prefill step, then 5 decode steps, each a token for all 4


def test_hf_progress_moves_within_one_static_batch(hf_model: Any) -> None:
    """One batch of all 5 requests (a batch size above the workload): every generate() step reports the
    rows still within their own output length (output lengths 2, 3, 3, 5, 7: 5 rows at step 1 and 2,
    4 at step 3, 2 at steps 4 and 5, then 1), never the rows that only pad the batch."""
    lengths = [3, 7, 2, 5, 3]
    w = Workload([BenchRequest([1 + i, 2, 3], n) for i, n in enumerate(lengths)])
    seen: list[int] = []
    run_hf_offline(hf_model, w, 8, seen.append)
    assert seen == [5, 5, 4, 2, 2, 1, 1]
    assert sum(seen) == w.output_tokens


def test_latency_progress_counts_every_step_of_each_batch(tiny_llm: LLM, hf_model: Any) -> None:
    for run in (run_latency, run_hf_latency):
        seen: list[int] = []
        model = tiny_llm if run is run_latency else hf_model
        run(model, [1, 3], 4, 5, 0, seen.append)
        # Per batch size: its prefill, then 4 decode steps; 2 batch sizes.
        assert seen == [1] * 10, run.__name__


class _RecordingProgress(Progress):
    """A rich Progress that draws nothing and records every advance, by task description."""

    advances: dict[str, list[float]]

    def __init__(self) -> None:
        super().__init__(disable=True)
        self.advances = {}

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        self.advances.setdefault(self.tasks[task_id].description, []).append(advance)
        super().advance(task_id, advance)


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[_RecordingProgress]:
    made: list[_RecordingProgress] = []

    def progress(transient: bool = False) -> _RecordingProgress:
        made.append(_RecordingProgress())
        return made[-1]

    monkeypatch.setattr(ui, "progress", progress)
    return made


def _tasks(made: list[_RecordingProgress]) -> dict[str, tuple[float, float | None, list[float], Any]]:
    """Task description -> (completed, total, the advances, unit)."""
    return {
        t.description: (t.completed, t.total, bar.advances[t.description], t.fields.get("unit"))
        for bar in made
        for t in bar.tasks
    }


def test_offline_command_bars_reach_their_totals_step_by_step(
    tiny: Path, bars: list[_RecordingProgress]
) -> None:
    # 3 requests of 5 tokens each, all in one transformers batch (the default batch size is 64).
    args = ("--num-prompts", "3", "--input-len", "4", "--output-len", "5", "--baseline", "hf")
    res = run_bench("offline", "-m", tiny, *KV, *args)
    assert res.code == 0, res.stderr
    tasks = _tasks(bars)
    assert set(tasks) == {"minisgl", "transformers"}
    for name, (completed, total, advances, unit) in tasks.items():
        assert completed == total == 15 and unit == "tok", name
        assert len(advances) > 1, name  # moved before the end
    assert tasks["transformers"][2] == [3] * 5  # one static batch: 3 of its rows' tokens each step


def test_latency_and_prefix_command_bars_move(tiny: Path, bars: list[_RecordingProgress]) -> None:
    res = run_bench("latency", "-m", tiny, *KV, "--batch-sizes", "2", "--input-len", "4", "--output-len", "3")
    assert res.code == 0, res.stderr
    assert _tasks(bars) == {"minisgl": (3, 3, [1, 1, 1], "step")}
    bars.clear()
    args = ("--num-prompts", "3", "--prefix-len", "8", "--question-len", "2", "--output-len", "4")
    res = run_bench("prefix", "-m", tiny, *KV, *args)
    assert res.code == 0, res.stderr
    tasks = _tasks(bars)
    assert set(tasks) == {"radix", "naive"}
    for name, (completed, total, advances, unit) in tasks.items():
        assert completed == total == 12 and unit == "tok" and len(advances) > 1, name


def test_rate_column_names_the_unit() -> None:
    with Progress(disable=True) as bar:
        tokens = bar.add_task("minisgl", total=10, unit="tok")
        items = bar.add_task("generate", total=10)
        column = ui._RateColumn()
        assert column.render(bar.tasks[tokens]).plain == "- tok/s"
        assert column.render(bar.tasks[items]).plain == "-/s"


# A tqdm bar, as transformers draws it: "Loading weights:  50%|█████     | 1/2 [00:00<00:00, 5.1it/s]".
TQDM = re.compile(r"\d+%\||it/s\]|s/it\]")


def test_no_transformers_bar_or_chatter_on_stderr(tiny: Path) -> None:
    """Through the real executable: stderr is a pipe, so our own bar is off too, and what is left is what
    transformers prints by itself (its "Loading weights" bar, before this was silenced)."""
    args = ["--num-prompts", "2", "--input-len", "4", "--output-len", "3", "--baseline", "hf"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINISGL_", "HF_HUB_DISABLE", "TQDM"))}
    result = subprocess.run(
        [sys.executable, "-m", "minisgl_cli", "bench", "offline", "-m", str(tiny), *KV, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "minisgl / hf output tok/s" in result.stdout
    assert "Loading weights" not in result.stderr and not TQDM.search(result.stderr), result.stderr


def test_quiet_loading_puts_transformers_settings_back(tiny: Path) -> None:
    from transformers.utils import logging as hf_logging

    before = (hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity())
    load_hf_model(
        resolve_model(str(tiny)), dummy_weights=True, dtype=torch.float32, device=torch.device("cpu"), seed=0
    )
    assert (hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()) == before
