"""AttentionBackend: the interface every attention implementation (torch, later FlashInfer) provides."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from minisgl_cli.engine.forward_batch import ForwardBatch
from minisgl_cli.engine.kv.page_table import PageTable
from minisgl_cli.engine.kv.pool import KVPool


class AttentionBackend(ABC):
    """Paged attention over a KVPool, driven by a PageTable.

    `prepare` runs once per step and builds whatever index/mask metadata the step needs, shared by all
    layers, and sets `out_slots` (the pool slots of the step's new tokens); `forward` runs once per layer:
    it stores the new tokens' k/v into the pool at `out_slots`, then `attend`s each new token over its
    sequence's positions [0, seq_len) (causally among the new tokens). A caller that wrote k/v into the pool
    itself (the fused rope + store kernel) calls `attend` directly.
    """

    out_slots: torch.Tensor  # [T] int64, set by prepare

    def __init__(self, kv_pool: KVPool, page_table: PageTable, *, num_heads: int, head_dim: int) -> None:
        self.kv_pool = kv_pool
        self.page_table = page_table
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    @abstractmethod
    def prepare(self, batch: ForwardBatch) -> None: ...

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        """q [T, num_heads, head_dim], k and v [T, num_kv_heads, head_dim] -> o [T, num_heads, head_dim]."""
        self.kv_pool.store(layer_id, self.out_slots, k, v)
        return self.attend(q, layer_id)

    @abstractmethod
    def attend(self, q: torch.Tensor, layer_id: int) -> torch.Tensor:
        """Attention of q [T, num_heads, head_dim] over the pool, whose slots at `out_slots` already hold
        this step's k/v -> o [T, num_heads, head_dim]."""
