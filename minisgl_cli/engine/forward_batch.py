"""ForwardBatch: the device-side description of one model step, built once by the scheduler.

Token-major layout: the T new tokens of all B sequences are concatenated, sequence by sequence.
Prefill chunks (extend_lens > 1) and decode tokens (extend_lens == 1) may be mixed in one batch.
Host-side copies (*_cpu) travel with the batch so backends can plan without reading GPU tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64, new tokens of every sequence, concatenated
    positions: torch.Tensor  # [T] int64, absolute position of each new token in its sequence
    out_slots: torch.Tensor  # [T] int64, KV-pool slot each new token's k/v is written to
    req_rows: torch.Tensor  # [B] int64, row of each sequence in the page table (ReqToTokenTable)
    seq_lens: torch.Tensor  # [B] int64, KV length of each sequence after this step (prefix + new)
    extend_lens: torch.Tensor  # [B] int64, new tokens of each sequence in this step
    logits_indices: torch.Tensor  # [B] int64, index into T of each sequence's last new token
    seq_lens_cpu: list[int]
    extend_lens_cpu: list[int]

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token (the CUDA-graph-able case)."""
        return all(n == 1 for n in self.extend_lens_cpu)
