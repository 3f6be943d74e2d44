"""Gated activation of the MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minisgl_cli.engine.kernels import flashinfer, use_kernels


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dim -> silu(gate) * up (one fused kernel on CUDA)."""
    if use_kernels(x):
        return flashinfer().activation.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
