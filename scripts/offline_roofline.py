"""The memory roofline of `bench offline`'s default workload on a model shape: the fewest bytes its decode steps
must read (every weight once per step, each live request's K/V once per step, all requests decoding together
from the start) over a bandwidth, as output tokens/s.

    python scripts/offline_roofline.py qwen3-0.6b qwen3-8b --bandwidth 2.87e12

2.87e12 B/s is the bf16 GEMV streaming rate measured on the H100 device machine (../shared/gpu/README.md).
Prefill is left out (compute-bound and small next to decode here), so the bound is a little optimistic.
"""

from __future__ import annotations

import argparse

import torch

from minisgl_cli.bench.latency import DecodeTraffic
from minisgl_cli.bench.workload import random_workload
from minisgl_cli.engine.models.config import ModelConfig
from minisgl_cli.engine.models.shapes import BUILTIN_SHAPES


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", choices=sorted(BUILTIN_SHAPES))
    ap.add_argument("--bandwidth", type=float, default=2.87e12, help="bytes/s")
    args = ap.parse_args()
    for name in args.models:
        config = ModelConfig.from_hf(BUILTIN_SHAPES[name])
        traffic = DecodeTraffic.of_model(config, torch.bfloat16)
        workload = random_workload(256, (100, 1024), (100, 1024), config.vocab_size, 0)
        reqs = [(len(r.prompt_ids), r.output_len) for r in workload.requests]
        total = 0
        # Decode step s (the prefill sampled token 1) feeds token s of every request with more to generate.
        for step in range(1, max(out for _, out in reqs)):
            live = [prompt + step for prompt, out in reqs if out > step]
            total += traffic.weight_bytes + sum(live) * traffic.kv_bytes_per_token
        seconds = total / args.bandwidth
        print(
            f"{name}: {total / 1e12:.2f} TB read in decode, {seconds:.2f} s at {args.bandwidth / 1e12:.2f} TB/s "
            f"-> {workload.output_tokens / seconds:,.0f} output tok/s"
        )


if __name__ == "__main__":
    main()
