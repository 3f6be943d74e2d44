"""The CPU's matmul paths at decode shapes (issue 21's groundwork): float32, bfloat16, and int8 through
torch._int_mm and torch.ops.aten._weight_int8pack_mm, for SmolLM2-135M's projections.

    python3 scripts/cpu_matmul_bench.py [--threads N]

Each call walks enough weight copies to defeat the caches (as a decode step streams its weights from memory)
and prints us a call and the weight bytes' rate. The int8 rows time the matmul alone, not the quantization of
the activations that a W8A8 path would add.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

# (projection, N, K) of SmolLM2-135M: qkv, o_proj, gate_up, down, the tied LM head.
SHAPES = [("qkv", 960, 576), ("o_proj", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536),
          ("lm_head", 49152, 576)]  # fmt: skip
WALK_BYTES = 256 << 20  # far past the L2 and L3 of the development machine


def time_us(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], weights: list[torch.Tensor],
            x: torch.Tensor, reps: int = 5) -> float:  # fmt: skip
    for w in weights[:2]:
        fn(x, w)
    start = time.perf_counter()
    for _ in range(reps):
        for w in weights:
            fn(x, w)
    return (time.perf_counter() - start) * 1e6 / (reps * len(weights))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64], help="batch rows (M)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{torch.backends.cpu.get_cpu_capability()}, {args.threads} threads; us a call (GB/s of weight bytes)"
    )
    for name, n, k in SHAPES:
        copies = max(2, WALK_BYTES // (n * k * 4))
        fp32 = [torch.randn(n, k) for _ in range(copies)]
        bf16 = [w.bfloat16() for w in fp32]
        int8 = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(copies)]
        scales = (torch.rand(n) + 0.5).bfloat16()
        for m in args.rows:
            x = torch.randn(m, k)
            xq = torch.randint(-127, 128, (m, k), dtype=torch.int8)
            times = {
                "float32": (time_us(F.linear, fp32, x), 4),
                "bfloat16": (time_us(F.linear, bf16, x.bfloat16()), 2),
                # The [N, K] int8 weight passed as its [K, N] column-major view: oneDNN's fast layout.
                "int8 _int_mm": (time_us(lambda a, w: torch._int_mm(a, w.t()), int8, xq), 1),
                "int8 weight-only (bf16 x)": (
                    time_us(
                        lambda a, w, s=scales: torch.ops.aten._weight_int8pack_mm(a, w, s), int8, x.bfloat16()
                    ),
                    1,
                ),  # fmt: skip
            }
            cells = ", ".join(
                f"{key} {us:.0f} ({n * k * size / us / 1e3:.1f})" for key, (us, size) in times.items()
            )
            print(f"{name} {n}x{k} M={m}: {cells}", flush=True)


if __name__ == "__main__":
    main()
