"""Linear layers, split Megatron-style over tensor-parallel ranks.

A fused column-parallel layer (q|k|v, gate|up) gives each rank its slice of every part's output rows
and needs no communication; the row-parallel layer after it (o_proj, down_proj) takes that split input,
multiplies by its slice of the input columns and all-reduces the partial sums. One all-reduce per pair.
"""

from __future__ import annotations

import torch
from torch import nn

from minisgl_cli.engine.distributed import Shard, TPGroup, WeightSlice
from minisgl_cli.engine.layers.fp8 import fp8_linear
from minisgl_cli.engine.layers.gemv import linear


class Linear(nn.Module):
    """y = x W^T (+ b). Parameters are left uninitialised: the weight loader or dummy init fills them,
    and skipping torch's random init saves seconds at 8B parameters. After `fp8.quantize_linears` the
    weight is FP8 with a float32 scale per output row (`weight_scale`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.weight_scale: nn.Parameter | None = None

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.weight_scale is not None:
            return fp8_linear(x, self.weight, self.weight_scale, bias)
        return linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input in one matmul, column-parallel over `tp`.

    Checkpoints store the parts apart, so each has a named row range (`shards`) that the weight loader
    copies into. `out_sizes` counts each part in units of `unit` rows (heads of head_dim rows for q/k/v),
    and a rank holds `tp.shard(count)` units of every part: whole heads, with a KV head replicated when
    there are fewer of them than ranks.
    """

    def __init__(
        self,
        in_features: int,
        out_sizes: dict[str, int],
        bias: bool = False,
        *,
        tp: TPGroup | None = None,
        unit: int = 1,
    ) -> None:
        tp = tp or TPGroup.single()
        sources = {name: tp.shard(n).times(unit) for name, n in out_sizes.items()}
        super().__init__(in_features, sum(s.size for s in sources.values()), bias)
        self.sources: dict[str, Shard] = sources  # each part's rows in its unsplit checkpoint tensor
        self.shards: dict[str, tuple[int, int]] = {}
        start = 0
        for name, source in self.sources.items():
            self.shards[name] = (start, source.size)
            start += source.size
        self.out_sizes = [s.size for s in self.sources.values()]

    def shard(self, param: torch.Tensor, name: str) -> torch.Tensor:
        """The rows of `param` (this layer's weight or bias) that hold part `name`."""
        start, size = self.shards[name]
        return param.narrow(0, start, size)

    def weight_slices(self) -> dict[str, list[WeightSlice]]:
        params = {"weight": self.weight} if self.bias is None else {"weight": self.weight, "bias": self.bias}
        return {
            kind: [WeightSlice(part, 0, self.shard(param, part), src) for part, src in self.sources.items()]
            for kind, param in params.items()
        }


class RowParallelLinear(Linear):
    """y = x W^T where x arrives split over the ranks by features (a column-parallel layer's output):
    each rank multiplies its slice of the input columns and the partial sums are all-reduced. No bias:
    none of our models has one here (it would have to be added once, after the sum)."""

    def __init__(self, in_features: int, out_features: int, *, tp: TPGroup) -> None:
        source = tp.shard(in_features)
        super().__init__(source.size, out_features)
        self.source = source
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.matmul(x, None))

    def weight_slices(self) -> dict[str, list[WeightSlice]]:
        return {"weight": [WeightSlice(None, 1, self.weight, self.source)]}
