"""The mixture-of-experts block on the GPU in a few launches, none of which waits on the host.

The torch path (layers/moe.py) sorts the (token, expert) pairs and runs each expert on its rows, which needs
every expert's row count on the host: a sync per layer, and nothing a CUDA graph can capture. Here, after the
router's GEMM:

For a step of more than PAIR_MAX_TOKENS tokens (prefill, batched decode), the sorted path:

1. `route`: one program per block of tokens takes the router's logits to float32 probabilities and picks the
   top k (the model's renormalisation), and counts each pair into its expert with an atomic add, whose old
   value is the pair's rank among that expert's pairs.
2. `align`: every program rebuilds the experts' offsets from the counts (a cumsum of E numbers, each
   expert's run padded to whole blocks of BLOCK_M rows) and writes its pairs to their sorted positions;
   program 0 also writes each row block's expert and how many of its rows are real.
3. `expert_gemm` (gated): each program takes one row block of one expert and BLOCK_N columns of its width,
   gathers the block's tokens from x, and runs gate and up together, writing silu(gate) * up per pair.
4. `expert_gemm` (weighted): the down projection over the same blocks, scaled by each pair's routing weight.
5. A sum over each token's k pairs (torch), in the order of its picks.

For a few tokens (batch-1 decode) tiles of 16 rows would be almost all padding and every launch costs a few
microseconds of a step that has only ~30 us a layer to spend, so the pair path has two launches: in
`pair_gate_up` one program per pair and block of rows routes its token (the same top-k code) and streams
that block of its expert's gate and up rows the way layers/gemv.py streams a weight; `token_down` has one
program per token and block of outputs, over all of the token's k experts at once, which also makes the sum.

Every launch's grid depends only on the number of tokens, so the block replays under a CUDA graph. The
atomics make a pair's position inside its expert's run vary from run to run, but a row's result depends only
on its own inputs and the expert's weights, so the numbers do not: the block is deterministic.

The arithmetic follows the torch path's roundings (gate and up rounded to the dtype, silu rounded, the
product rounded; down's output rounded before its float32 weighting), so the paths differ only in the order
of the GEMMs' sums.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from minisgl_cli.engine.distributed import Shard
from minisgl_cli.engine.kernels import next_pow2


@dataclasses.dataclass(frozen=True)
class LaunchShape:
    """Tiles of the two expert GEMMs: rows of a block, output columns and reduction step of a program."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def launch_shape(pairs: int, num_experts: int) -> LaunchShape:
    """Row blocks sized to the pairs an expert gets on average, so decode steps (a few rows an expert) do not
    pay for 64-row tiles of padding and prefill steps (hundreds) get the larger tiles' reuse."""
    # scripts/moe_bench.py on an H200 at Qwen3-30B-A3B's widths: 16-row blocks are best up to 64 tokens
    # (4 pairs an expert), 32-row blocks at 256 (331.6 against 352.0 us), 64 at prefill's thousands.
    per_expert = pairs / num_experts
    if per_expert <= 8:
        return LaunchShape(16, 64, 128)
    if per_expert <= 64:
        return LaunchShape(32, 64, 128)
    return LaunchShape(64, 128, 64, num_warps=8)


def max_blocks(pairs: int, num_experts: int, block_m: int) -> int:
    """Row blocks the sorted pairs can need: each expert that has any pair pads its run to whole blocks,
    and at most min(E, pairs) experts have one."""
    return -(-(pairs + min(num_experts, pairs) * (block_m - 1)) // block_m)


@functools.cache
def _kernels():  # type: ignore[no-untyped-def]
    """Loaded on first use, so importing this module never imports Triton."""
    from minisgl_cli.engine.layers import moe_kernels

    return moe_kernels


_ROUTE_BLOCK_T = 16
_ALIGN_BLOCK_P = 256
_ALIGN_BLOCK_B = 64


def fused_route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, local: Shard | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> float32 weights [T, k], int32 expert ids [T, k], the pair counts of the
    experts this rank holds (`local`; all E without expert parallelism) and each of their pairs' rank among
    its expert's pairs [T * k] (one launch)."""
    logits = router_logits.contiguous()
    tokens, experts = logits.shape
    local = local or Shard(0, experts, experts)
    device = logits.device
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=device)
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=device)
    counts = torch.zeros(local.size, dtype=torch.int32, device=device)
    ranks = torch.empty(tokens * top_k, dtype=torch.int32, device=device)
    _kernels().route[(-(-tokens // _ROUTE_BLOCK_T),)](
        logits, weights, ids, counts, ranks, tokens, experts, local.start, local.size, TOP_K=top_k,
        RENORMALIZE=renormalize,
        BLOCK_T=_ROUTE_BLOCK_T, BLOCK_E=next_pow2(experts), BLOCK_K=next_pow2(top_k), num_warps=4,
    )  # fmt: skip
    return weights, ids, counts, ranks


@dataclasses.dataclass(frozen=True)
class RowShape:
    """Launch shape of the per-pair kernels: output rows of a program and reduction step for gate/up and for
    down (whose programs hold all k experts' tiles at once, so take fewer rows), and warps. The defaults
    are scripts/moe_bench.py's best at 1-8 tokens on an H200 (Qwen3-30B-A3B's widths)."""

    up_block_n: int = 32
    up_block_k: int = 256
    down_block_n: int = 1
    down_block_k: int = 128
    num_warps: int = 4


# Up to this many tokens a step, each (token, expert) pair streams its expert's rows on its own (GEMV-like,
# no padded tiles, no sorting); above, the pairs are sorted by expert and share tiles. Measured by
# scripts/moe_bench.py on an H200 (us a layer, pair path against sorted): 4 tokens 87 against 100+, 8 tokens
# 155-167 against 149, 16 tokens 275 against 215.
PAIR_MAX_TOKENS = 4


def pair_experts(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    renormalize: bool,
    shape: RowShape | None = None,
    local: Shard | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block for a few tokens, routing included: one program per pair and block of the expert's rows
    for gate/up (each routes its token itself), one per token and block of outputs for down (which also
    sums the token's k experts). Two launches. Returns the output [T, H] and the routing weights and ids
    [T, k] the first launch wrote. Under expert parallelism `gate_up` and `down` hold the experts `local` of
    the router's, and the output sums only theirs."""
    shape = shape or RowShape()
    tokens, hidden = x.shape
    experts = router_logits.shape[1]
    local = local or Shard(0, experts, experts)
    width = gate_up.shape[1] // 2
    device = x.device
    kernels = _kernels()
    x = x.contiguous()
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=device)
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=device)
    act = torch.empty(tokens * top_k, width, dtype=x.dtype, device=device)
    kernels.pair_gate_up[(tokens * top_k, -(-width // shape.up_block_n))](
        x, gate_up, router_logits.contiguous(), ids, weights, act, width, hidden, experts, local.start,
        local.size, TOP_K=top_k,
        RENORMALIZE=renormalize, BLOCK_E=next_pow2(experts), BLOCK_J=next_pow2(top_k), BLOCK_N=shape.up_block_n,
        BLOCK_K=shape.up_block_k, num_warps=shape.num_warps,
    )  # fmt: skip
    out = torch.empty(tokens, hidden, dtype=x.dtype, device=device)
    kernels.token_down[(tokens, -(-hidden // shape.down_block_n))](
        act, down, ids, weights, out, hidden, width, local.start, local.size, TOP_K=top_k, BLOCK_J=next_pow2(top_k),
        BLOCK_N=shape.down_block_n, BLOCK_K=shape.down_block_k, num_warps=shape.num_warps,
    )  # fmt: skip
    return out, weights, ids


def moe_block(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    renormalize: bool,
    local: Shard | None = None,
) -> torch.Tensor:
    """The whole block after the router's GEMM, by the path that suits the step's token count; `local`:
    the experts `gate_up` and `down` hold (expert parallelism), all of them by default."""
    if x.shape[0] <= PAIR_MAX_TOKENS:
        return pair_experts(x, router_logits, gate_up, down, top_k, renormalize, local=local)[0]
    weights, ids, counts, ranks = fused_route(router_logits, top_k, renormalize, local)
    return fused_experts(x, gate_up, down, weights, ids, counts, ranks, local=local)


def fused_experts(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    counts: torch.Tensor,
    ranks: torch.Tensor,
    shape: LaunchShape | None = None,
    local: Shard | None = None,
) -> torch.Tensor:
    """x [T, H], stacked gate|up [E, 2I, H] and down [E, H, I], routing from `fused_route` -> the block's
    output [T, H] in x's dtype (this rank's partial sum under tensor parallelism). Under expert parallelism
    the weights hold the experts `local` of the router's, and the output sums only theirs."""
    tokens, hidden = x.shape
    experts, width2, _ = gate_up.shape
    local = local or Shard(0, experts, experts)
    width = width2 // 2
    top_k = ids.shape[1]
    pairs = tokens * top_k
    shape = shape or launch_shape(pairs, local.full)
    blocks = max_blocks(pairs, experts, shape.block_m)
    device = x.device
    sorted_pairs = torch.empty(blocks * shape.block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(blocks, dtype=torch.int32, device=device)
    block_rows = torch.empty(blocks, dtype=torch.int32, device=device)
    kernels = _kernels()
    kernels.align[(-(-pairs // _ALIGN_BLOCK_P),)](
        ids, ranks, counts, sorted_pairs, block_expert, block_rows, pairs, experts, local.start, blocks,
        BLOCK_M=shape.block_m, BLOCK_E=next_pow2(experts), BLOCK_P=_ALIGN_BLOCK_P, BLOCK_B=_ALIGN_BLOCK_B,
        num_warps=4,
    )  # fmt: skip
    x = x.contiguous()
    act = torch.empty(pairs, width, dtype=x.dtype, device=device)
    kernels.expert_gemm[(blocks, -(-width // shape.block_n))](
        x, gate_up, act, sorted_pairs, block_expert, block_rows, weights, width, hidden,
        ROWS_PER_A=top_k, GATED=True, WEIGHTED=False, BLOCK_M=shape.block_m, BLOCK_N=shape.block_n,
        BLOCK_K=shape.block_k, num_warps=shape.num_warps, num_stages=shape.num_stages,
    )  # fmt: skip
    # Pairs of other ranks' experts are never written: zeros, so that the sum below leaves them out.
    new = torch.empty if local.size == local.full else torch.zeros
    out = new(pairs, hidden, dtype=x.dtype, device=device)
    kernels.expert_gemm[(blocks, -(-hidden // shape.block_n))](
        act, down, out, sorted_pairs, block_expert, block_rows, weights, hidden, width,
        ROWS_PER_A=1, GATED=False, WEIGHTED=True, BLOCK_M=shape.block_m, BLOCK_N=shape.block_n,
        BLOCK_K=shape.block_k, num_warps=shape.num_warps, num_stages=shape.num_stages,
    )  # fmt: skip
    # A token's k weighted outputs, summed in the order of its picks.
    return out.view(tokens, top_k, hidden).sum(dim=1)  # float32 accumulation, one rounding
