"""SplitBackend: one backend for prefill/extend steps and another for decode steps (e.g. "flashinfer,torch")."""

from __future__ import annotations

import torch

from minisgl_cli.engine.attention.base import AttentionBackend
from minisgl_cli.engine.forward_batch import ForwardBatch


class SplitBackend(AttentionBackend):
    def __init__(self, prefill: AttentionBackend, decode: AttentionBackend) -> None:
        super().__init__(
            prefill.kv_pool, prefill.page_table, num_heads=prefill.num_heads, head_dim=prefill.head_dim
        )
        self.prefill_backend = prefill
        self.decode_backend = decode
        self._active = decode

    def prepare(self, batch: ForwardBatch) -> None:
        self._active = self.decode_backend if batch.is_decode else self.prefill_backend
        self._active.prepare(batch)

    @property  # type: ignore[override]
    def out_slots(self) -> torch.Tensor:
        return self._active.out_slots

    def attend(self, q: torch.Tensor, layer_id: int) -> torch.Tensor:
        return self._active.attend(q, layer_id)
