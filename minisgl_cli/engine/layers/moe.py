"""The sparse mixture-of-experts MLP (Qwen3-MoE, Mixtral), split over tensor-parallel ranks.

A router (one small linear, replicated) scores the experts per token; each token goes through its top-k
experts, whose outputs are summed weighted by the router's probabilities. The experts' weights are stacked
in two parameters, gate|up [E, 2 * I, H] and down [E, H, I], the layout a fused MoE kernel reads.

Tensor parallelism splits every expert's width I the way the dense MLP splits its own: each rank holds
rows of gate and up and the matching columns of down, so every rank routes every token itself (the router
is replicated), and the block's partial sums meet in one all-reduce, as after the dense MLP.

On CUDA with Triton the block runs as fused kernels (layers/fused_moe.py): no host sync, so it replays under
CUDA graphs. The loop over experts here is the reference and the CPU path.
"""

from __future__ import annotations

import torch
from torch import nn

from minisgl_cli.engine.distributed import Shard, TPGroup, WeightSlice
from minisgl_cli.engine.kernels import have_triton, use_kernels
from minisgl_cli.engine.layers import fused_moe
from minisgl_cli.engine.layers.activation import silu_and_mul
from minisgl_cli.engine.layers.gemv import linear
from minisgl_cli.engine.layers.linear import Linear
from minisgl_cli.engine.models.config import MoEConfig


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (float32 weights [T, k], expert ids [T, k]). The softmax is taken in float32
    (as transformers does) so that bfloat16 logits do not tie experts that differ."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class Experts(nn.Module):
    """The experts' stacked weights: this rank's slice of every expert's width, or under expert parallelism
    its share of whole experts (`local`: which of the model's experts it holds)."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, tp: TPGroup, expert_parallel: bool
    ) -> None:
        super().__init__()
        if expert_parallel:
            self.local = tp.shard(num_experts)
            self.source = Shard(0, intermediate_size, intermediate_size)
        else:
            self.local = Shard(0, num_experts, num_experts)
            self.source = tp.shard(intermediate_size)  # this rank's rows of gate and up, columns of down
        width = self.source.size
        self.gate_up_proj = nn.Parameter(
            torch.empty(self.local.size, 2 * width, hidden_size), requires_grad=False
        )
        self.down_proj = nn.Parameter(torch.empty(self.local.size, hidden_size, width), requires_grad=False)

    def weight_slices(self) -> dict[str, list[WeightSlice]]:
        """Checkpoints store each expert's gate, up and down apart; the parts are named "<expert>.gate",
        "<expert>.up" and "<expert>" (down), and each is a slice of the unsplit expert's tensor. Another
        rank's experts (expert parallelism) are listed with a meta-device `dest`: the loader skips them and
        dummy weights draw them anyway, so every rank's experts get the values they get on one rank."""
        width = self.source.size
        gate_up: list[WeightSlice] = []
        down: list[WeightSlice] = []
        for e in range(self.local.full):
            mine = self.local.start <= e < self.local.start + self.local.size
            if mine:
                stacked, stacked_down = (
                    self.gate_up_proj[e - self.local.start],
                    self.down_proj[e - self.local.start],
                )
            else:
                stacked = torch.empty(
                    self.gate_up_proj.shape[1:], dtype=self.gate_up_proj.dtype, device="meta"
                )
                stacked_down = torch.empty(
                    self.down_proj.shape[1:], dtype=self.down_proj.dtype, device="meta"
                )
            gate_up.append(WeightSlice(f"{e}.gate", 0, stacked[:width], self.source))
            gate_up.append(WeightSlice(f"{e}.up", 0, stacked[width:], self.source))
            down.append(WeightSlice(str(e), 1, stacked_down, self.source))
        return {"gate_up_proj": gate_up, "down_proj": down}

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], routing weights and expert ids [T, k] -> this rank's partial sum [T, H] (float32).

        The reference path: sort the (token, expert) pairs by expert and run each of this rank's experts
        that received tokens on just those rows. It reads the per-expert counts on the host, a sync a fused
        GPU kernel avoids; on the CPU it is the fast way (no wasted rows, no padding)."""
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        local_ids = ids.flatten()
        pairs = None
        if self.local.size < self.local.full:  # expert parallelism: only this rank's experts' pairs
            local_ids = local_ids - self.local.start
            pairs = torch.nonzero((local_ids >= 0) & (local_ids < self.local.size)).flatten()
            local_ids = local_ids[pairs]
        order = torch.argsort(local_ids, stable=True)
        sorted_pairs = order if pairs is None else pairs[order]
        tokens = sorted_pairs // ids.shape[1]  # the token of each sorted pair
        pair_weights = weights.flatten()[sorted_pairs]
        counts = torch.bincount(local_ids, minlength=self.local.size).tolist()
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = tokens[start : start + count]
            h = silu_and_mul(linear(x.index_select(0, rows), self.gate_up_proj[expert]))
            y = linear(h, self.down_proj[expert]).float() * pair_weights[start : start + count, None]
            out.index_add_(0, rows, y)
            start += count
        return out


class SparseMoE(nn.Module):
    """Router + experts; `forward` returns the block's output summed over the ranks."""

    def __init__(self, moe: MoEConfig, hidden_size: int, tp: TPGroup) -> None:
        super().__init__()
        self.top_k = moe.top_k
        self.renormalize = moe.renormalize
        self.tp = tp
        self.gate = Linear(hidden_size, moe.num_experts)  # the router: replicated, never split
        self.experts = Experts(moe.num_experts, hidden_size, moe.intermediate_size, tp, moe.expert_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        if fused(x):
            experts = self.experts
            out = fused_moe.moe_block(
                x,
                logits,
                experts.gate_up_proj,
                experts.down_proj,
                self.top_k,
                self.renormalize,
                experts.local,
            )
            return self.tp.all_reduce(out)
        weights, ids = route(logits, self.top_k, self.renormalize)
        # Summed in float32 over the k experts, rounded once to the activation dtype, then all-reduced.
        return self.tp.all_reduce(self.experts(x, weights, ids).to(x.dtype))


def fused(x: torch.Tensor) -> bool:
    """Whether the block runs as fused kernels: CUDA, half precision, Triton (MINISGL_NO_KERNELS=1 keeps the
    reference path, as for every fused layer)."""
    return use_kernels(x) and have_triton() and x.shape[0] > 0
