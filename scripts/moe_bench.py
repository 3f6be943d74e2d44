"""The fused mixture-of-experts block on a GPU (layers/fused_moe.py) at Qwen3-30B-A3B's widths, over launch shapes.

    python3 scripts/moe_bench.py [--out DIR] [--quick]

For each token count (decode batches 1-256, prefill chunks) it times the whole block (router GEMM, route,
align, the two expert GEMMs, the sum over k) in a CUDA graph that walks through enough layers' weights to
defeat the L2 cache, as a decode step does, and prints us a layer with the bytes the step had to read (the
experts its tokens picked, counted from the routing, plus the router) as TB/s. `launch_shape`'s choice is
timed at every count; a sweep of tile shapes at a few. Writes moe_bench.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from gemv_bench import time_us as walk_us

from minisgl_cli.engine.distributed import TPGroup
from minisgl_cli.engine.layers import fused_moe
from minisgl_cli.engine.layers.moe import SparseMoE
from minisgl_cli.engine.models.config import MoEConfig

HIDDEN, WIDTH, EXPERTS, TOP_K = 2048, 768, 128, 8  # Qwen3-30B-A3B
LAYERS = 6  # 1.2 GB of experts a layer: 7 GB walked per replay, far past the 50 MB L2


def build_layers(device: torch.device) -> list[SparseMoE]:
    moe = MoEConfig(num_experts=EXPERTS, top_k=TOP_K, intermediate_size=WIDTH, renormalize=True, layers=(0,))
    layers = []
    for _ in range(LAYERS):
        block = SparseMoE(moe, HIDDEN, TPGroup.single()).to(device, torch.bfloat16)
        with torch.no_grad():
            block.gate.weight.normal_(0.0, HIDDEN**-0.5)
            block.experts.gate_up_proj.normal_(0.0, HIDDEN**-0.5)
            block.experts.down_proj.normal_(0.0, WIDTH**-0.5)
        layers.append(block)
    return layers


Shape = fused_moe.LaunchShape | fused_moe.RowShape | None


def run(block: SparseMoE, x: torch.Tensor, shape: Shape) -> torch.Tensor:
    """The block as the engine runs it (None: moe_block's own choice), or one path with a given shape."""
    logits = block.gate(x)
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
    if shape is None:
        return fused_moe.moe_block(x, logits, gate_up, down, block.top_k, block.renormalize)
    if isinstance(shape, fused_moe.RowShape):
        return fused_moe.pair_experts(x, logits, gate_up, down, block.top_k, block.renormalize, shape)[0]
    weights, ids, counts, ranks = fused_moe.fused_route(logits, block.top_k, block.renormalize)
    return fused_moe.fused_experts(x, gate_up, down, weights, ids, counts, ranks, shape)


def time_us(layers: list[SparseMoE], x: torch.Tensor, shape: Shape, reps: int = 5) -> float:
    """Mean microseconds a layer, from a CUDA graph of one walk over the layers replayed `reps` times."""
    return walk_us(lambda x, block: run(block, x, shape), layers, x, reps)


def bytes_read(layers: list[SparseMoE], x: torch.Tensor) -> float:
    """Mean bytes a layer must read: the experts its tokens picked and the router (activations left out)."""
    per_expert = 3 * WIDTH * HIDDEN * 2
    total = 0
    for block in layers:
        _, ids, _, _ = fused_moe.fused_route(block.gate(x), TOP_K, True)
        total += int(ids.unique().numel()) * per_expert + EXPERTS * HIDDEN * 2
    return total / len(layers)


def projections(device: torch.device) -> dict[str, object]:
    """The batch-1 step's other matmuls at Qwen3-30B-A3B's widths: cuBLAS against layers/gemv.py's kernel
    over its rows per program (the router has only 128 rows: 8 programs at the default 16)."""
    import torch.nn.functional as F

    from minisgl_cli.engine.layers.gemv import gemv

    out: dict[str, object] = {}
    for name, n, k in (("router", EXPERTS, HIDDEN), ("qkv", 5120, HIDDEN), ("o_proj", HIDDEN, 4096)):
        copies = [
            torch.randn(n, k, device=device, dtype=torch.bfloat16)
            for _ in range(max(8, (1 << 30) // (n * k * 2)))
        ]
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        times = {"cublas": walk_us(F.linear, copies, x)}
        for block_n in (1, 2, 4, 8, 16):
            for block_k in (512, 1024, 2048):
                times[f"gemv n{block_n} k{block_k}"] = walk_us(
                    lambda x, w, bn=block_n, bk=block_k: gemv(x, w, block_n=bn, block_k=bk), copies, x
                )
        best = min(times, key=lambda key: times[key])
        print(f"{name} [{n} x {k}] batch 1: cuBLAS {times['cublas']:.2f} us, best {best} {times[best]:.2f} us "
              f"({n * k * 2 / times[best] / 1e6:.2f} TB/s)", flush=True)  # fmt: skip
        out[name] = times
        del copies
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--quick", action="store_true", help="fewer token counts and tile shapes")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda")
    layers = build_layers(device)
    counts = (1, 2, 4, 8, 16, 64, 256, 8192) if args.quick else (
        1, 2, 4, 8, 16, 32, 64, 128, 192, 256, 2048, 8192
    )  # fmt: skip
    swept = (1, 64, 256, 8192) if args.quick else (1, 16, 64, 128, 256, 8192)
    grid = ((16, 32, 64), (64, 128), (64, 128), (4,), (3,)) if args.quick else (
        (16, 32, 64), (32, 64, 128), (64, 128), (4, 8), (3, 4)
    )  # fmt: skip
    tiles: list[Shape] = [fused_moe.LaunchShape(*t) for t in itertools.product(*grid)]
    # The per-pair kernels' shapes, one kernel's varied at a time (the two launch independently).
    rows: list[Shape] = [
        fused_moe.RowShape(n, k, 1, 128, w) for n, k, w in itertools.product((8, 16, 32), (256, 512, 1024), (4, 8))
    ] + [
        fused_moe.RowShape(16, 512, n, k, w) for n, k, w in itertools.product((1, 2, 4), (64, 128, 256), (4, 8))
    ]  # fmt: skip
    report: dict[str, dict[str, object]] = {}
    for tokens in counts:
        x = torch.randn(tokens, HIDDEN, device=device, dtype=torch.bfloat16)
        need = bytes_read(layers, x)
        pair_path = tokens <= fused_moe.PAIR_MAX_TOKENS
        chosen = fused_moe.RowShape() if pair_path else fused_moe.launch_shape(tokens * TOP_K, EXPERTS)
        us = time_us(layers, x, None)
        row: dict[str, object] = {"bytes": need, "default": [type(chosen).__name__, chosen.__dict__, us]}
        line = f"T={tokens:5d}: {need / 1e6:8.1f} MB, default {chosen}: {us:8.1f} us ({need / us / 1e6:.2f} TB/s)"
        sorted_default: list[Shape] = [fused_moe.launch_shape(tokens * TOP_K, EXPERTS)]
        candidates = (rows + sorted_default if tokens <= 16 else []) + (tiles if tokens in swept else [])
        if candidates:
            timed = []
            for tile in candidates:
                if (
                    isinstance(tile, fused_moe.LaunchShape)
                    and tile.block_m > 16
                    and tokens * TOP_K < 4 * EXPERTS
                ):
                    continue  # rows a block would mostly pad
                try:
                    timed.append((time_us(layers, x, tile), tile))
                except Exception as err:  # noqa: BLE001 - a tile that does not fit (shared memory): skip it
                    print(f"  {tile}: {type(err).__name__}")
            timed.sort(key=lambda t: t[0])
            row["sweep"] = [[type(t).__name__, t.__dict__, u] for u, t in timed]
            best_us, best = timed[0]
            line += f"; best {best}: {best_us:.1f} us ({need / best_us / 1e6:.2f} TB/s)"
        print(line, flush=True)
        report[str(tokens)] = row
    report["batch-1 projections"] = projections(device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moe_bench.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
