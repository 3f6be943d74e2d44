"""Linear layers: a plain projection and a fused one (q|k|v, gate|up) whose parts load separately."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x W^T (+ b). Parameters are left uninitialised: the weight loader or dummy init fills them,
    and skipping torch's random init saves seconds at 8B parameters."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input in one matmul; checkpoints store them apart, so each part
    has a named row range (`shards`) that the weight loader copies into."""

    def __init__(self, in_features: int, out_sizes: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(out_sizes.values()), bias)
        self.shards: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in out_sizes.items():
            self.shards[name] = (start, size)
            start += size
        self.out_sizes = list(out_sizes.values())

    def shard(self, param: torch.Tensor, name: str) -> torch.Tensor:
        """The rows of `param` (this layer's weight or bias) that hold part `name`."""
        start, size = self.shards[name]
        return param.narrow(0, start, size)
