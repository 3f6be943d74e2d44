"""Where a decode step's time goes, on a GPU: the whole step (schedule, forward, sampling, the copy of the ids
back), the forward alone (its CUDA graph replayed, timed with events), and the kernels of one step.

    python3 scripts/profile_decode.py -m llama-3.1-8b --batch-size 1 --context 640

Dummy weights; prints a table and writes profile_<model>_b<B>.json (a Chrome trace) under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from minisgl_cli.engine.llm import LLM
from minisgl_cli.engine.request import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default="llama-3.1-8b")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--context", type=int, default=640, help="prompt length of each request")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--disable-overlap", action="store_true")
    args = ap.parse_args()

    llm = LLM(args.model, dummy_weights=True, max_running_requests=max(args.batch_size, 8),
              disable_overlap=args.disable_overlap)  # fmt: skip
    scheduler, runner = llm.scheduler, llm.runner
    vocab = runner.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    for _ in range(args.batch_size):
        scheduler.add(torch.randint(0, vocab, (args.context,), generator=g).tolist(), params)
    while any(r.num_computed < r.prompt_len for r in scheduler.running) or scheduler.waiting:
        scheduler.step()
    for _ in range(8):  # warm up decode
        scheduler.step()

    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        scheduler.step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - start) * 1e3 / args.steps

    replay_ms = None
    if runner.graphs is not None:
        size = min(s for s in runner.graphs.sizes if s >= args.batch_size)
        graph = runner.graphs.graphs[size]
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(args.steps):
            graph.replay()
        end.record()
        end.synchronize()
        replay_ms = begin.elapsed_time(end) / args.steps

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            scheduler.step()
        torch.cuda.synchronize()
    args.out.mkdir(parents=True, exist_ok=True)
    trace = args.out / f"profile_{args.model}_b{args.batch_size}.json"
    prof.export_chrome_trace(str(trace))
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    print(table)
    summary = {
        "model": args.model,
        "batch_size": args.batch_size,
        "context": args.context,
        "overlap": scheduler_overlap(scheduler),
        "step_ms": round(step_ms, 3),
        "graph_replay_ms": None if replay_ms is None else round(replay_ms, 3),
    }
    print(json.dumps(summary))


def scheduler_overlap(scheduler: object) -> bool | None:
    return getattr(scheduler, "overlap", None)


if __name__ == "__main__":
    main()
