"""Rotary position embedding (neox layout: the two rotated halves are the first and second half of a head)."""

from __future__ import annotations

import math

import torch
from torch import nn

from minisgl_cli.engine.kernels import flashinfer, use_kernels
from minisgl_cli.engine.models.config import Llama3RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: Llama3RopeScaling | None = None) -> torch.Tensor:
    """[head_dim / 2] float64 rotation frequencies, with Llama 3.1's scaling applied when given."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv_freq
    # Llama 3.1: long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and the band
    # between the two wavelength limits interpolates linearly in (original context / wavelength).
    old_len = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smooth = smooth.clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq


class RotaryEmbedding(nn.Module):
    """Holds a float32 [max_positions, head_dim] cache of (cos | sin), built once, indexed by position."""

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: Llama3RopeScaling | None = None
    ) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling).float()
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_sin", torch.cat([angles.cos(), angles.sin()], dim=-1), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D] and k [T, Hk, D] rotated by the angles of their positions [T].

        On CUDA FlashInfer's kernel rotates q and k in place (they are this layer's fresh projections) and
        reads the same float32 (cos | sin) cache.
        """
        if use_kernels(q):
            head_dim = q.shape[-1]
            flashinfer().rope.apply_rope_with_cos_sin_cache_inplace(
                positions,
                q.view(q.shape[0], -1),
                k.view(k.shape[0], -1),
                head_dim,
                self.cos_sin,
                is_neox=True,
            )
            return q, k
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
