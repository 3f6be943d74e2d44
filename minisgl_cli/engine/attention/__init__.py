"""Attention backends behind one interface; `create_backend` picks one by name."""

from __future__ import annotations

import torch

from minisgl_cli.engine.attention.base import AttentionBackend
from minisgl_cli.engine.kv.page_table import PageTable
from minisgl_cli.engine.kv.pool import KVPool
from minisgl_cli.errors import UsageError

BACKENDS = ("auto", "torch")

__all__ = ["BACKENDS", "AttentionBackend", "create_backend"]


def create_backend(
    name: str,
    *,
    kv_pool: KVPool,
    page_table: PageTable,
    num_heads: int,
    head_dim: int,
    device: torch.device,
) -> AttentionBackend:
    """The backend called `name`; "auto" picks the best one available on `device`."""
    if name == "auto":
        # FlashInfer joins here (for CUDA) when it lands; torch is the reference everywhere.
        name = "torch"
    if name == "torch":
        from minisgl_cli.engine.attention.torch_backend import TorchBackend

        return TorchBackend(kv_pool, page_table, num_heads=num_heads, head_dim=head_dim)
    raise UsageError(f"unknown attention backend {name!r} (choose from: {', '.join(BACKENDS)})")
