"""FP8 weights on a GPU (issue 20): the matmuls of --quantization fp8 against bf16 cuBLAS, at decode shapes.

    python3 scripts/fp8_gemm_bench.py [--out DIR]

For each projection of llama-3.1-8b and qwen3-8b it times, in a CUDA graph walking enough weight copies to defeat
the L2 (scripts/gemv_bench.py's timer): at one row, bf16 cuBLAS, the FP8 GEMV of layers/gemv.py over launch
shapes, and torch._scaled_mm after the per-token quantization; at 16-256 rows, bf16 cuBLAS against
quantization + torch._scaled_mm (what fp8_linear runs). Prints microseconds and the weight bytes' GB/s, and
writes fp8_gemm_bench.json.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from gemv_bench import time_us

from minisgl_cli.engine.layers import fp8, gemv

SHAPES = [
    ("llama-3.1-8b", "qkv", 6144, 4096), ("llama-3.1-8b", "o_proj", 4096, 4096),
    ("llama-3.1-8b", "gate_up", 28672, 4096), ("llama-3.1-8b", "down", 4096, 14336),
    ("qwen3-8b", "qkv", 6144, 4096), ("qwen3-8b", "gate_up", 24576, 4096), ("qwen3-8b", "down", 4096, 12288),
]  # fmt: skip
ROWS = (16, 64, 128, 256)
# (block_n, block_k, num_warps) of the FP8 GEMV
SHAPES_TRIED = list(itertools.product((8, 16, 32), (512, 1024, 2048), (4, 8)))


def scaled(x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """What fp8_linear runs above one row: the per-token quantization, then torch._scaled_mm."""
    q, scale = w
    x_q, x_scale = fp8.quantize_tokens(x)
    return torch._scaled_mm(x_q, q.t(), scale_a=x_scale, scale_b=scale.view(1, -1), out_dtype=x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    torch.manual_seed(0)
    cases = []
    for model, name, n, k in SHAPES:
        # gemv()'s own choice for this FP8 weight (all the shapes here have 4096 rows or more)
        default = str((gemv.FP8_BLOCK_N, gemv.FP8_BLOCK_K_WIDE if n > k else gemv.BLOCK_K, gemv.NUM_WARPS))
        count = max(2, -(-600_000_000 // (n * k)))
        bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]
        quant = [fp8.quantize_rows(w) for w in bf16]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        want = F.linear(x, (quant[0][0].float() * quant[0][1][:, None]).to(torch.bfloat16)).float()
        case: dict[str, object] = {"model": model, "proj": name, "n": n, "k": k}
        case["bf16_1"] = time_us(F.linear, bf16, x)
        times = {}
        for bn, bk, warps in SHAPES_TRIED:
            run = functools.partial(gemv.gemv, block_n=bn, block_k=bk, num_warps=warps)
            got = run(x, quant[0][0], scale=quant[0][1]).float()
            assert float((got - want).abs().max() / want.abs().max()) < 2e-2, (model, name, bn, bk, warps)
            times[str((bn, bk, warps))] = time_us(lambda x, w, run=run: run(x, w[0], scale=w[1]), quant, x)
        best = min(times, key=times.__getitem__)
        case["gemv_fp8"], case["gemv_default"], case["gemv_best"] = times, times[default], best
        case["scaled_mm_1"] = time_us(scaled, quant, x)
        print(f"{model:13} {name:8} M=1  bf16 {case['bf16_1']:6.1f} us ({n * k * 2 / case['bf16_1'] / 1e3:4.0f} GB/s)"
              f"  fp8 gemv default {times[default]:6.1f} ({n * k / times[default] / 1e3:4.0f} GB/s)"
              f"  best {times[best]:6.1f} {best}  scaled_mm {case['scaled_mm_1']:6.1f}", flush=True)  # fmt: skip
        for m in ROWS:
            xm = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            case[f"bf16_{m}"] = time_us(F.linear, bf16, xm)
            case[f"scaled_mm_{m}"] = time_us(scaled, quant, xm)
            print(f"{'':13} {'':8} M={m:<3} bf16 {case[f'bf16_{m}']:6.1f} us  fp8 quantize+scaled_mm "
                  f"{case[f'scaled_mm_{m}']:6.1f} us", flush=True)  # fmt: skip
        cases.append(case)
        del bf16, quant
        torch.cuda.empty_cache()
    totals = {str(s): sum(c["gemv_fp8"][str(s)] for c in cases) for s in SHAPES_TRIED}  # type: ignore[index]
    best = min(totals, key=totals.__getitem__)
    default_total = sum(c["gemv_default"] for c in cases)  # type: ignore[misc]
    summary = {"gemv_best_overall": best, "best_total_us": totals[best], "default_total_us": default_total}
    print(summary)
    (args.out / "fp8_gemm_bench.json").write_text(json.dumps({"cases": cases, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
