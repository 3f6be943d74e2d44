"""The fused mixture-of-experts kernels (layers/fused_moe.py) against the torch path (layers/moe.py) and float64.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, in a process of its own, as in
test_triton_kernels.py) in float32: routing picks the same experts with the same weights, every expert's
count and ranks are a permutation, and the block's output equals the loop over experts, for ragged sizes and
several tile shapes. On a GPU, in bfloat16 at Qwen3-30B-A3B's widths: the fused block is as close to float64
as the torch path is, and a CUDA graph replay gives the eager output bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minisgl_cli.engine.distributed import Shard, TPGroup
from minisgl_cli.engine.layers import fused_moe
from minisgl_cli.engine.layers.moe import SparseMoE, fused, route
from minisgl_cli.engine.models.config import MoEConfig

try:  # the interpreter check lives with the other Triton kernels' tests
    from test_triton_kernels import HAVE_TRITON
except ImportError:  # pragma: no cover - run from another directory
    HAVE_TRITON = False

# (tokens, experts, top_k, hidden, width, renormalize): ragged sizes, an expert count that is not a power of
# two, a batch of one, more tokens than one route program takes, k = E.
CPU_CASES = [
    (37, 8, 2, 64, 48, True),
    (5, 12, 4, 32, 40, False),
    (1, 8, 8, 32, 16, True),
    (70, 4, 2, 16, 24, True),
]
SHAPES = [None, fused_moe.LaunchShape(32, 32, 32)]
# The pair path runs at the few tokens it serves in the engine (the interpreter runs a program at a time).
ROW_SHAPES = [fused_moe.RowShape(), fused_moe.RowShape(16, 32, 4, 32)]
PAIR_CASES = [i for i, case in enumerate(CPU_CASES) if case[0] <= fused_moe.PAIR_MAX_TOKENS + 1]


def _block(experts: int, top_k: int, hidden: int, width: int, renormalize: bool, seed: int) -> SparseMoE:
    torch.manual_seed(seed)
    moe = MoEConfig(
        num_experts=experts, top_k=top_k, intermediate_size=width, renormalize=renormalize, layers=(0,)
    )
    block = SparseMoE(moe, hidden, TPGroup.single())
    with torch.no_grad():
        block.gate.weight.normal_(0.0, 1.0 / hidden**0.5)
        block.experts.gate_up_proj.normal_(0.0, 1.0 / hidden**0.5)
        block.experts.down_proj.normal_(0.0, 1.0 / width**0.5)
    return block


def _fused(block: SparseMoE, x: torch.Tensor, sorted_path: bool) -> torch.Tensor:
    """One of the two fused paths, whatever the token count."""
    logits = block.gate(x)
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
    if not sorted_path:
        return fused_moe.pair_experts(x, logits, gate_up, down, block.top_k, block.renormalize)[0]
    weights, ids, counts, ranks = fused_moe.fused_route(logits, block.top_k, block.renormalize)
    return fused_moe.fused_experts(x, gate_up, down, weights, ids, counts, ranks)


def _loop(block: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """The torch path, whatever device and kernels: route, then the loop over experts."""
    weights, ids = route(block.gate(x), block.top_k, block.renormalize)
    return block.experts(x, weights, ids).to(x.dtype)


def _float64(block: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(block.gate.weight.double() @ x.double().T, dim=0).T
    weights, ids = torch.topk(probs, block.top_k, dim=-1)
    if block.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    gate_up, down = block.experts.gate_up_proj.double(), block.experts.down_proj.double()
    width = down.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for t, row in enumerate(x.double()):
        for w, e in zip(weights[t].tolist(), ids[t].tolist(), strict=True):
            h = gate_up[e] @ row
            out[t] += w * (down[e] @ (F.silu(h[:width]) * h[width:]))
    return out


def check_interpreted() -> int:
    """Every CPU case through the kernels in float32, against the torch path. Run with TRITON_INTERPRET=1."""
    checked = 0
    for i, (tokens, experts, top_k, hidden, width, renormalize) in enumerate(CPU_CASES):
        block = _block(experts, top_k, hidden, width, renormalize, seed=i)
        x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(i))
        logits = block.gate(x)
        weights, ids, counts, ranks = fused_moe.fused_route(logits, top_k, renormalize)
        want_w, want_ids = route(logits, top_k, renormalize)
        assert torch.equal(ids.long(), want_ids), (i, ids, want_ids)
        assert torch.allclose(weights, want_w, rtol=1e-6, atol=1e-7), i
        assert torch.equal(counts.long(), torch.bincount(want_ids.flatten(), minlength=experts)), i
        for e in range(experts):  # each expert's ranks: 0..count-1, in whatever order the atomics landed
            got = ranks[ids.flatten() == e].sort().values
            assert torch.equal(got, torch.arange(len(got), dtype=got.dtype)), (i, e, got)
        want = _loop(block, x)
        for row_shape in ROW_SHAPES if i in PAIR_CASES else []:
            got, pair_w, pair_ids = fused_moe.pair_experts(
                x, logits, block.experts.gate_up_proj, block.experts.down_proj, top_k, renormalize, row_shape
            )
            assert torch.equal(pair_ids.long(), want_ids), (i, pair_ids, want_ids)
            assert torch.allclose(pair_w, want_w, rtol=1e-6, atol=1e-7), i
            assert float((got - want).abs().max() / want.abs().max()) < 1e-5, (i, row_shape)
            checked += 1
        for shape in SHAPES:
            got = fused_moe.fused_experts(
                x, block.experts.gate_up_proj, block.experts.down_proj, weights, ids, counts, ranks, shape
            )
            assert got.shape == want.shape and got.dtype == want.dtype
            assert float((got - want).abs().max() / want.abs().max()) < 1e-5, (i, shape)
            checked += 1
    return checked + check_interpreted_expert_parallel()


def check_interpreted_expert_parallel() -> int:
    """Two ranks holding half of the experts each: their partial sums, by either path, add up to the block."""
    checked = 0
    for i, (tokens, experts, top_k, hidden, width, renormalize) in enumerate(CPU_CASES):
        if experts % 2:
            continue
        block = _block(experts, top_k, hidden, width, renormalize, seed=i)
        x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(i))
        logits = block.gate(x)
        want = _loop(block, x)
        for path in ("sorted", "pairs") if i in PAIR_CASES else ("sorted",):
            total = torch.zeros_like(want)
            for rank in range(2):
                local = Shard(rank * experts // 2, experts // 2, experts)
                rows = slice(local.start, local.start + local.size)
                gate_up, down = block.experts.gate_up_proj[rows], block.experts.down_proj[rows]
                if path == "pairs":
                    total += fused_moe.pair_experts(
                        x, logits, gate_up, down, top_k, renormalize, local=local
                    )[0]
                else:
                    weights, ids, counts, ranks = fused_moe.fused_route(logits, top_k, renormalize, local)
                    assert int(counts.sum()) == int(
                        ((ids >= local.start) & (ids < local.start + local.size)).sum()
                    )
                    total += fused_moe.fused_experts(
                        x, gate_up, down, weights, ids, counts, ranks, local=local
                    )
            assert float((total - want).abs().max() / want.abs().max()) < 1e-5, (i, path)
            checked += 1
    return checked


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton 3.9+ (its CPU interpreter)")
def test_interpreted_kernels_equal_the_torch_path() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    ep = [i for i, case in enumerate(CPU_CASES) if case[1] % 2 == 0]
    count = len(CPU_CASES) * len(SHAPES) + len(PAIR_CASES) * len(ROW_SHAPES)
    count += sum(2 if i in PAIR_CASES else 1 for i in ep)
    assert done.stdout.strip() == f"{count} cases equal"


@pytest.mark.parametrize(("pairs", "experts"), [(1, 8), (8, 128), (2048, 128), (65536, 128), (100, 3)])
def test_block_bound_covers_the_worst_routing(pairs: int, experts: int) -> None:
    """The buffer of sorted pairs must hold any routing: here the worst, one pair in each of as many experts
    as possible (the rest in one), each run padded to whole blocks."""
    for shape in {fused_moe.launch_shape(pairs, experts), fused_moe.LaunchShape(16, 64, 64)}:
        m = shape.block_m
        used = min(experts, pairs)
        worst = (used - 1) * m + -(-(pairs - used + 1) // m) * m
        assert fused_moe.max_blocks(pairs, experts, m) * m >= worst


def test_launch_shape_grows_with_rows_per_expert() -> None:
    rows = [fused_moe.launch_shape(tokens * 8, 128).block_m for tokens in (1, 64, 256, 1024, 16384)]
    assert rows == sorted(rows) and rows[0] == 16 and rows[-1] == 64


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize(("tokens", "sorted_path"), [(1, False), (5, False), (16, False), (1, True), (7, True),
                                                     (64, True), (300, True), (4096, True)])  # fmt: skip
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fused_block_is_as_close_to_float64_as_the_torch_path(
    tokens: int, sorted_path: bool, renormalize: bool
) -> None:
    block = _block(128, 8, 2048, 768, renormalize, seed=tokens).to("cuda", torch.bfloat16)
    x = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
    assert fused(x), "the fused path serves bf16 on CUDA"
    want = _float64(block, x[:64])
    got, loop = _fused(block, x, sorted_path), _loop(block, x)
    err_fused = float((got[:64].double() - want).norm() / want.norm())
    err_loop = float((loop[:64].double() - want).norm() / want.norm())
    # bf16's own error is ~4e-3 here; the paths differ only in the GEMMs' order of summation.
    assert err_fused < max(1.2 * err_loop, 5e-3), (err_fused, err_loop)
    assert float((got.double() - loop.double()).norm() / loop.double().norm()) < 1e-2
    assert torch.equal(block(x), block(x))


@pytest.mark.parametrize("tokens", [1, 4, 64, 1000])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_expert_parallel_partial_sums_add_up(tokens: int) -> None:
    """Four ranks of 32 whole experts each (--ep): their partial sums add up to the one-rank block within
    the roundings of the partial sums (each rank rounds its own to bf16)."""
    block = _block(128, 8, 2048, 768, True, seed=tokens).to("cuda", torch.bfloat16)
    x = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
    logits = block.gate(x)
    want = block(x)
    total = torch.zeros_like(want, dtype=torch.float32)
    for rank in range(4):
        local = Shard(rank * 32, 32, 128)
        rows = slice(local.start, local.start + 32)
        total += fused_moe.moe_block(
            x, logits, block.experts.gate_up_proj[rows], block.experts.down_proj[rows], 8, True, local
        ).float()
    assert float((total - want.float()).norm() / want.float().norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graph_replay_equals_eager() -> None:
    block = _block(128, 8, 2048, 768, True, seed=1).to("cuda", torch.bfloat16)
    for tokens in (1, 8, 16, 256):  # both paths
        x = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
        eager = block(x)
        assert torch.equal(block(x), eager)  # the atomics' order does not reach the numbers
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = block(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(replayed, block(x))


if __name__ == "__main__":
    print(f"{check_interpreted()} cases equal")
