"""TorchBackend: paged attention in plain PyTorch, the reference every other backend is tested against.

Each step's sequences are split into two groups, decode tokens (one new token each) and prefill chunks,
and each group is one padded SDPA call: the group's k/v are gathered from the pool through the page
table into [B, max_seq_len] and queries into [B, max_new_tokens], with a mask that hides padding and
future positions. Splitting keeps a long prefill chunk from padding every decode row to its length.
All index and mask tensors are built in `prepare`, once per step, and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minisgl_cli.engine.attention.base import AttentionBackend
from minisgl_cli.engine.forward_batch import ForwardBatch
from minisgl_cli.engine.kv.pool import PADDING_SLOT


@dataclass
class _Group:
    """Sequences attended together in one padded SDPA call (B sequences, E new tokens, L kv positions)."""

    q_index: torch.Tensor  # [B, E] index into the step's T tokens; padding repeats a valid token
    kv_slots: torch.Tensor  # [B, L] KV-pool slot of each position of each sequence
    mask: torch.Tensor  # [B, 1, E, L] bool, True where the query may attend the key
    # Where the group's real outputs go: out[token_index] = padded_out.view(B * E, ...)[flat_index].
    # None when the group is the whole step without padding: its output already is the step's, in order.
    token_index: torch.Tensor | None
    flat_index: torch.Tensor | None
    # Gather buffers for the group's k and v, [B * L, H_kv, D], reused by every layer of the step: fresh
    # tensors of this size per layer cost more in page faults than the gather itself on CPU.
    k_buf: torch.Tensor
    v_buf: torch.Tensor


class TorchBackend(AttentionBackend):
    def prepare(self, batch: ForwardBatch) -> None:
        self.out_slots = batch.out_slots
        extend = batch.extend_lens_cpu
        if len(set(extend)) == 1:
            # Pure decode (or equal-length chunks): no padding, so the padded output is the output.
            self._groups = [self._group(batch, list(range(batch.batch_size)), in_order=True)]
            return
        decode = [i for i, n in enumerate(extend) if n == 1]
        prefill = [i for i, n in enumerate(extend) if n > 1]
        self._groups = [self._group(batch, seqs, in_order=False) for seqs in (prefill, decode) if seqs]

    def attend(self, q: torch.Tensor, layer_id: int) -> torch.Tensor:
        k_cache, v_cache = self.kv_pool.k(layer_id), self.kv_pool.v(layer_id)
        out = None if self._groups[0].token_index is None else torch.empty_like(q)
        for g in self._groups:
            # [B, E, H, D] -> [B, H, E, D], the layout SDPA wants.
            qg = q[g.q_index].transpose(1, 2)
            kg = _gather(k_cache, g.kv_slots, g.k_buf).transpose(1, 2)
            vg = _gather(v_cache, g.kv_slots, g.v_buf).transpose(1, 2)
            if kg.dtype != q.dtype:  # an FP8 pool (--kv-cache-dtype fp8_e4m3): values stored unscaled
                kg, vg = kg.to(q.dtype), vg.to(q.dtype)
            og = F.scaled_dot_product_attention(
                qg, kg, vg, attn_mask=g.mask, scale=self.scale, enable_gqa=True
            )
            og = og.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])
            if out is None:
                return og
            out[g.token_index] = og[g.flat_index]
        assert out is not None
        return out

    def _group(self, batch: ForwardBatch, seqs: list[int], *, in_order: bool) -> _Group:
        device = batch.input_ids.device
        extend_all = torch.tensor(batch.extend_lens_cpu, dtype=torch.int64)
        starts_all = torch.cumsum(extend_all, 0) - extend_all
        seq_ids = torch.tensor(seqs, dtype=torch.int64)
        extend = extend_all[seq_ids]
        seq_lens = torch.tensor(batch.seq_lens_cpu, dtype=torch.int64)[seq_ids]
        max_new = int(extend.max())
        max_len = int(seq_lens.max())

        # Host-built small tensors, one copy each to the device; nothing here reads device memory.
        new = torch.arange(max_new)
        q_index = starts_all[seq_ids, None] + torch.minimum(new, extend[:, None] - 1)
        # Absolute position of each (padded) query, clamped so padding rows attend like the last real one.
        q_pos = (seq_lens - extend)[:, None] + torch.minimum(new, extend[:, None] - 1)
        q_pos = q_pos.to(device, non_blocking=True)
        key_pos = torch.arange(max_len, device=device)
        mask = (key_pos[None, None, :] <= q_pos[:, :, None]).unsqueeze(1)

        rows = batch.req_rows if in_order else batch.req_rows[seq_ids.to(device, non_blocking=True)]
        # Positions past a sequence's end read the padding slot: its row there may be stale or unset.
        in_seq = key_pos[None, :] < seq_lens.to(device, non_blocking=True)[:, None]
        kv_slots = torch.where(in_seq, self.page_table.table[rows, :max_len], PADDING_SLOT)

        token_index = flat_index = None
        if not in_order:
            valid = new[None, :] < extend[:, None]  # [B, E], host-side
            token_index = q_index[valid].to(device, non_blocking=True)
            flat_index = torch.nonzero(valid.flatten()).squeeze(1).to(device, non_blocking=True)
        pool = self.kv_pool.k(0)
        buf_shape = (kv_slots.numel(), *pool.shape[1:])
        return _Group(
            q_index=q_index.to(device, non_blocking=True),
            kv_slots=kv_slots,
            mask=mask,
            token_index=token_index,
            flat_index=flat_index,
            k_buf=torch.empty(buf_shape, dtype=pool.dtype, device=pool.device),
            v_buf=torch.empty(buf_shape, dtype=pool.dtype, device=pool.device),
        )


def _gather(cache: torch.Tensor, slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """cache [num_slots, H, D] rows at slots [B, L] -> [B, L, H, D] in `out`; index_select is the fastest
    gather on CPU."""
    torch.index_select(cache, 0, slots.flatten(), out=out)
    return out.view(*slots.shape, *cache.shape[1:])
