"""The roofline of an offline workload on a model shape: its decode steps' fewest bytes over a bandwidth, plus
(with --peak-flops) its prefill's matmul FLOPs over a compute rate, as output tokens/s.

    python scripts/offline_roofline.py qwen3-0.6b qwen3-8b --bandwidth 2.87e12
    python scripts/offline_roofline.py qwen3-30b-a3b --dataset .peer/workload.jsonl --bandwidth 4.14e12 \
        --peak-flops 989e12

Decode: every step reads the weights once (a mixture-of-experts layer only the experts its tokens pick, on
average: bench/latency.py's DecodeTraffic), and each live request's K/V once; all requests decode together
from the start. Prefill (with --peak-flops): 2 FLOPs per active weight per prompt token, attention left out.
Both parts are bounds no engine beats, so their sum is optimistic. The default workload is `bench offline`'s
(256 requests, 100-1024 in and out); --dataset takes a JSONL of {"prompt": [ids], "output_len": N} lines
(Mini-SGLang's workload: ../shared/peer/drivers/workload.py). 2.87e12 B/s is the bf16 GEMV streaming rate of
the H100 device machine (../shared/gpu/README.md), 4.14e12 the H200's (../shared/peer/README.md); 989e12 the
H200's dense bf16 datasheet rate.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from minisgl_cli.bench.latency import DecodeTraffic
from minisgl_cli.bench.workload import random_workload
from minisgl_cli.engine.models.config import ModelConfig
from minisgl_cli.engine.models.shapes import BUILTIN_SHAPES


def lengths(dataset: Path | None, vocab_size: int) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) of each request."""
    if dataset is None:
        workload = random_workload(256, (100, 1024), (100, 1024), vocab_size, 0)
        return [(len(r.prompt_ids), r.output_len) for r in workload.requests]
    rows = [json.loads(line) for line in dataset.read_text().splitlines() if line.strip()]
    return [(len(row["prompt"]), int(row["output_len"])) for row in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", choices=sorted(BUILTIN_SHAPES))
    ap.add_argument("--bandwidth", type=float, default=2.87e12, help="bytes/s")
    ap.add_argument("--peak-flops", type=float, default=None, help="FLOP/s for prefill (left out without it)")
    ap.add_argument("--dataset", type=Path, default=None, help="JSONL of prompt ids and output_len")
    args = ap.parse_args()
    for name in args.models:
        config = ModelConfig.from_hf(BUILTIN_SHAPES[name])
        traffic = DecodeTraffic.of_model(config, torch.bfloat16)
        reqs = lengths(args.dataset, config.vocab_size)
        total = 0.0
        # Decode step s (the prefill sampled token 1) feeds token s of every request with more to generate.
        for step in range(1, max(out for _, out in reqs)):
            live = [prompt + step for prompt, out in reqs if out > step]
            total += traffic.step_weight_bytes(len(live)) + sum(live) * traffic.kv_bytes_per_token
        decode_s = total / args.bandwidth
        output_tokens = sum(out for _, out in reqs)
        line = f"{name}: {total / 1e12:.2f} TB read in decode, {decode_s:.2f} s at {args.bandwidth / 1e12:.2f} TB/s"
        seconds = decode_s
        if args.peak_flops is not None:
            # Active weights a token multiplies: all but the experts, plus its k experts.
            active = traffic.step_weight_bytes(1) / 2
            prefill_s = 2 * active * sum(prompt for prompt, _ in reqs) / args.peak_flops
            seconds += prefill_s
            line += f"; prefill {prefill_s:.2f} s at {args.peak_flops / 1e12:.0f} TFLOP/s"
        print(f"{line} -> {output_tokens / seconds:,.0f} output tok/s")


if __name__ == "__main__":
    main()
