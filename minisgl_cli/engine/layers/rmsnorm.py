"""RMSNorm, computed in float32 whatever the activation dtype (as the reference models do).

On CUDA in half precision FlashInfer's kernels run instead: `rmsnorm`, and `fused_add_rmsnorm` for the
residual step (one pass that adds, writes the sum back into `residual` and normalises into `x`).
"""

from __future__ import annotations

import torch
from torch import nn

from minisgl_cli.engine.kernels import flashinfer, use_kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_kernels(x):
            fi = flashinfer()
            # The kernel wants rows of `dim` contiguous values; q/k heads sliced out of the fused qkv
            # projection are strided, so this reshape copies them (a few KB per token).
            rows = x.reshape(-1, self.dim)
            return fi.norm.rmsnorm(rows, self.weight, self.eps).view(x.shape)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the pre-norm residual step of a decoder layer. The kernel
        path works in place: both inputs are the layer's own temporaries, which nothing reads afterwards."""
        if use_kernels(x):
            flashinfer().norm.fused_add_rmsnorm(x, residual, self.weight, self.eps)
            return x, residual
        summed = x + residual
        return self.forward(summed), summed
