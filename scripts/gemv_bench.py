"""The batch-1 matmul on a GPU: cuBLAS (F.linear) against layers/gemv.py's Triton kernel, over launch shapes.

    python3 scripts/gemv_bench.py [--out DIR]

For each projection of llama-3.1-8b, qwen3-8b and qwen3-0.6b (qkv, o_proj, gate_up, down, LM head), it times one call in a CUDA graph that walks through enough copies of the weight to defeat the L2
cache, so every call streams its weight from memory as a decode step does. Prints the GB/s of each and writes
gemv_bench.json: per projection the cuBLAS time and every launch shape's, and the shape with the least total
time over all projections.
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from minisgl_cli.engine.layers import gemv

# (model, projection, N, K): output rows and input width of each weight at TP 1.
SHAPES = [
    ("llama-3.1-8b", "qkv", 6144, 4096), ("llama-3.1-8b", "o_proj", 4096, 4096),
    ("llama-3.1-8b", "gate_up", 28672, 4096), ("llama-3.1-8b", "down", 4096, 14336),
    ("llama-3.1-8b", "lm_head", 128256, 4096),
    ("qwen3-8b", "gate_up", 24576, 4096), ("qwen3-8b", "down", 4096, 12288),
    ("qwen3-0.6b", "qkv", 4096, 1024), ("qwen3-0.6b", "o_proj", 1024, 2048),
    ("qwen3-0.6b", "gate_up", 6144, 1024), ("qwen3-0.6b", "down", 1024, 3072),
]  # fmt: skip
# (block_n, block_k, num_warps)
SHAPES_TRIED = list(itertools.product((4, 8, 16, 32), (256, 512, 1024), (4, 8)))


def time_us(
    fn: Callable[[torch.Tensor, Any], object], copies: Sequence[Any], x: torch.Tensor, reps: int = 10
) -> float:
    """Mean microseconds of fn(x, w) over the copies (weights, or whole layers), from a CUDA graph of one pass
    replayed `reps` times. The first two calls run before the capture: Triton compiles on its first launch,
    which a capture cannot hold. Shared by the GPU benchmark scripts."""
    for w in copies[:2]:
        fn(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    gc.disable()  # a collection during capture could free a kernel or graph the capture depends on
    try:
        with torch.cuda.graph(graph):
            for w in copies:
                fn(x, w)
    finally:
        gc.enable()
    graph.replay()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return begin.elapsed_time(end) * 1e3 / (reps * len(copies))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    torch.manual_seed(0)
    cases = []
    default = str((gemv.BLOCK_N, gemv.BLOCK_K, gemv.NUM_WARPS))
    for model, name, n, k in SHAPES:
        size = n * k * 2
        copies = [
            torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            for _ in range(max(2, -(-600_000_000 // size)))
        ]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        want = F.linear(x, copies[0]).float()
        cublas = time_us(F.linear, copies, x)
        times = {}
        for bn, bk, warps in SHAPES_TRIED:
            run = functools.partial(gemv.gemv, block_n=bn, block_k=bk, num_warps=warps)
            err = float((run(x, copies[0]).float() - want).abs().max() / want.abs().max())
            assert err < 2e-2, (model, name, bn, bk, warps, err)
            times[str((bn, bk, warps))] = time_us(run, copies, x)
        best = min(times, key=times.__getitem__)
        picked = "gemv" if gemv.serves(x, copies[0]) else "cuBLAS"
        print(f"{model:13} {name:8} cuBLAS {cublas:7.1f} us {size / cublas / 1e3:5.0f} GB/s   "
              f"default {times[default]:7.1f} us {size / times[default] / 1e3:5.0f} GB/s   "
              f"best {times[best]:7.1f} us {best}   linear() picks {picked}", flush=True)  # fmt: skip
        cases.append({"model": model, "proj": name, "bytes": size, "cublas_us": cublas, "times": times,
                      "picked": picked})  # fmt: skip
        del copies
        torch.cuda.empty_cache()
    totals = {cfg: sum(c["times"][cfg] for c in cases) for cfg in cases[0]["times"]}
    best = min(totals, key=totals.__getitem__)
    summary = {"best": best, "total_us": totals[best], "default_total_us": totals[default],
               "cublas_total_us": sum(c["cublas_us"] for c in cases)}  # fmt: skip
    print(summary)
    (args.out / "gemv_bench.json").write_text(json.dumps({"cases": cases, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
