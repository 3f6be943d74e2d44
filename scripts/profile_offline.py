"""Where an offline run's time goes: host time per step by phase, and how long the device sat idle.

    python3 scripts/profile_offline.py -m qwen3-0.6b --dataset .peer/workload.jsonl --temperature 0.6

Runs the workload through `LLM.iter_outputs` (what `bench offline` times) with timers wrapped around the
scheduler's phases. On a GPU it also records a CUDA event before each step's first device work and after
its sampling: the sum of those intervals is the device's busy time, and wall time minus it is the time the
device waited on the host. Prints one table for decode steps and one for prefill steps (mean host ms per
step in each phase) and a JSON summary; `--json FILE` writes it. Dummy weights; any engine flag of LLM can
be given as `--set key=value`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from minisgl_cli.bench.dataset_file import file_workload
from minisgl_cli.bench.offline import warm_up
from minisgl_cli.engine import sampling as sampling_module
from minisgl_cli.engine import scheduler as scheduler_module
from minisgl_cli.engine.llm import LLM
from minisgl_cli.engine.request import SamplingParams


class Timers:
    """Host seconds per phase, split by the kind of step that is running (decode or prefill)."""

    def __init__(self) -> None:
        self.kind = "decode"
        self.seconds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.steps: dict[str, int] = defaultdict(int)
        self.batch_sizes: dict[str, int] = defaultdict(int)

    def wrap(self, owner: Any, name: str, label: str) -> None:
        inner: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[self.kind][label] += time.perf_counter() - start

        setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default="qwen3-0.6b")
    ap.add_argument("--dataset", type=Path, required=True, help="JSONL of {prompt: [ids], output_len}")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--set", action="append", default=[], help="an LLM engine setting, key=value")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value

    llm = LLM(args.model, dummy_weights=True, **overrides)
    sched = llm.scheduler
    workload = file_workload(
        args.dataset, None, (1, 1), 0, llm.runner.model_config.vocab_size, lambda: llm.tokenizer
    )
    warm_up(llm)
    sched.drop_cached_prefixes()

    timers = Timers()
    cuda = llm.runner.device.type == "cuda"
    marks: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    shapes: list[tuple[str, int, int, int]] = []  # per launched step: kind, rows, new tokens, KV tokens read
    schedule = sched.schedule

    def timed_schedule() -> Any:
        start = time.perf_counter()
        batch = schedule()
        timers.kind = "decode" if batch is None or not batch.is_prefill else "prefill"
        timers.seconds[timers.kind]["schedule"] += time.perf_counter() - start
        if batch is not None:
            timers.steps[timers.kind] += 1
            timers.batch_sizes[timers.kind] += len(batch.reqs)
        return batch

    sched.schedule = timed_schedule  # type: ignore[method-assign]
    launch = sched._launch

    def timed_launch(batch: Any) -> Any:
        begin = torch.cuda.Event(enable_timing=True) if cuda else None
        if begin is not None:
            begin.record()
        kv = sum(r.num_computed + n for r, n in zip(batch.reqs, batch.extend_lens, strict=True))
        shapes.append((timers.kind, len(batch.reqs), batch.num_tokens, kv))
        flight = launch(batch)
        if begin is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            marks.append((begin, end))
        return flight

    sched._launch = timed_launch  # type: ignore[method-assign]
    timers.wrap(scheduler_module, "prepare_step", "prepare_step")
    timers.wrap(llm.runner, "forward", "forward (launch)")
    timers.wrap(sched, "_sample", "sample (launch)")
    timers.wrap(sched, "_process", "process (incl. wait)")
    timers.wrap(sampling_module.PendingResults, "to_host", "wait for ids")
    timers.wrap(sched, "step", "step total")

    prompts = [r.prompt_ids for r in workload.requests]
    params = [
        SamplingParams(temperature=args.temperature, max_tokens=r.output_len, ignore_eos=True)
        for r in workload.requests
    ]
    tokens = 0
    start = time.perf_counter()
    for out in llm.iter_outputs(prompts, params):
        tokens += out.usage.completion_tokens
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    busy = sum(b.elapsed_time(e) for b, e in marks) / 1e3 if cuda else None

    summary: dict[str, Any] = {
        "model": args.model,
        "settings": overrides,
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "output_tok_per_s": round(tokens / wall, 1),
        "device_busy_s": None if busy is None else round(busy, 3),
        "device_idle_share": None if busy is None else round(1 - busy / wall, 3),
    }
    for kind in ("decode", "prefill"):
        steps = timers.steps[kind]
        if not steps:
            continue
        phases = {k: round(v * 1e3 / steps, 3) for k, v in timers.seconds[kind].items()}
        summary[kind] = {
            "steps": steps,
            "mean_batch": round(timers.batch_sizes[kind] / steps, 1),
            "host_ms_per_step": phases,
        }
    if cuda:
        gpu_ms = [b.elapsed_time(e) for b, e in marks]
        summary["steps_gpu"] = [[*shape, round(ms, 4)] for shape, ms in zip(shapes, gpu_ms, strict=True)]
        decode = [
            (rows, kv, ms) for (kind, rows, _, kv), ms in zip(shapes, gpu_ms, strict=True) if kind == "decode"
        ]
        if len(decode) > 3:
            import numpy as np

            # A decode step's device time as fixed + per row + per KV token read: what each part costs.
            a = np.array([[1.0, rows, kv / 1e5] for rows, kv, _ in decode])
            coef = np.linalg.lstsq(a, np.array([ms for *_, ms in decode]), rcond=None)[0]
            summary["decode_gpu_ms_fit"] = {
                "fixed": round(float(coef[0]), 4),
                "per_row": round(float(coef[1]), 5),
                "per_100k_kv_tokens": round(float(coef[2]), 4),
                "total_decode_gpu_s": round(sum(ms for *_, ms in decode) / 1e3, 3),
                "kv_part_s": round(float(coef[2]) * sum(kv for _, kv, _ in decode) / 1e5 / 1e3, 3),
            }
        summary["prefill_gpu_s"] = round(
            sum(ms for (kind, *_), ms in zip(shapes, gpu_ms, strict=True) if kind == "prefill") / 1e3, 3
        )
    total_step = sum(timers.seconds[k]["step total"] for k in timers.seconds)
    summary["outside_step_ms_per_step"] = round(
        (wall - total_step) * 1e3 / max(1, sum(timers.steps.values())), 3
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "steps_gpu"}, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
