"""Paged decode attention (one new token per sequence) as two Triton kernels, for a KV cache that is read
through slot ids: page size 1 (a sequence's K/V rows are any slots, listed in a CSR page-id array), or
larger pages through the same gather.

Decode attention is a stream over K/V: every row is read once and used for a handful of dot products. Stage 1
runs one program per (sequence, KV head, split); it takes all G = Hq / Hk query heads of its KV head at once,
so each K/V row crosses the memory bus once for the whole group, and walks its share of the sequence in
blocks of BLOCK_N tokens (gather the slot ids, the K rows, scores in float32, an online softmax in base 2
with log2(e) folded into the scale, the V rows). Where batch x KV heads alone would leave SMs idle (small
batches, long contexts) each sequence is cut into splits whose partial outputs and log-sum-exps stage 2
merges; with one split stage 1 writes the output itself and stage 2 does not run.

The launch shape is fixed when planned (`plan`), for a batch size: the grid, the split count, the scratch
buffers. A split's token range is derived inside the kernel from the sequence's indptr entries, so one plan
serves any lengths and page ids, and a CUDA graph captured around `DecodePlan.decode` can be replayed after
new lengths and page ids are written into the same index buffers. `decode` neither allocates nor syncs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from minisgl_cli.engine.kernels import next_pow2

# Defaults of the launch shape, overridable per plan (scripts/decode_attention_bench.py sweeps them).
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 3  # on an H200, 3 stages beat 2 by 0.5-1% and 1 by 25% (scripts/decode_attention_bench.py)
# Splits are added until the stage-1 grid has this many programs per SM: fewer leave the memory system
# short of requests in flight (a program has only its pipeline's few blocks of K/V loading at a time).
PROGRAMS_PER_SM = 4
MAX_SPLITS = 64
# Query heads per KV head from which the scores and the weighted sum of V go through tl.dot (tensor cores).
# Padding the group to the MMA's 16 rows wastes MMA work, but decode is bound by K/V reads: on an H200 the
# tl.dot variant read K/V at 4.1 TB/s with 2 query heads a KV head, the CUDA-core products at 0.8 (their
# [G, BLOCK_N, D] product tiles spill), so tl.dot is the default for every group.
DOT_MIN_GROUP = 1
DOT_MIN_ROWS = 16  # tl.dot's smallest M
H200_SMS = 132  # what a plan for a device without CUDA (the interpreter) assumes


@functools.cache
def _kernels():  # type: ignore[no-untyped-def]
    """(stage 1, stage 2), built on first use: importing Triton costs time, and the CPU never needs it."""
    import triton
    import triton.language as tl

    # The index arrays may be views into larger buffers at varying offsets: without this, Triton would
    # compile a variant for each alignment it meets, at run time.
    @triton.jit(
        do_not_specialize_on_alignment=["kv_indptr_ptr", "kv_indices_ptr", "last_page_len_ptr", "order_ptr"]
    )
    def decode_split(
        q_ptr,
        k_ptr,
        v_ptr,
        kv_indptr_ptr,
        kv_indices_ptr,
        last_page_len_ptr,
        order_ptr,
        qk_scale,
        out_ptr,
        part_out_ptr,
        part_lse_ptr,
        stride_qb,
        stride_qh,
        stride_kn,
        stride_kh,
        stride_vn,
        stride_vh,
        stride_ob,
        stride_oh,
        HQ: tl.constexpr,
        G: tl.constexpr,
        GP: tl.constexpr,
        D: tl.constexpr,
        PAGE_SIZE: tl.constexpr,
        SPLITS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        USE_DOT: tl.constexpr,
        DOT_F32: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        ORDERED: tl.constexpr,
        KV_FP8: tl.constexpr,
    ):
        # KV heads vary fastest over the grid, then sequences: blocks start roughly in grid order, so with
        # `order` (sequences longest first) the long programs start first and the short ones fill in
        # behind them, instead of a long one starting last and running alone (ragged batches).
        h = tl.program_id(0)
        b = tl.program_id(1)
        if ORDERED:
            b = tl.load(order_ptr + b)
        split = tl.program_id(2)
        first_page = tl.load(kv_indptr_ptr + b)
        num_pages = tl.load(kv_indptr_ptr + b + 1) - first_page
        if PAGE_SIZE == 1:
            length = num_pages
        else:
            length = tl.maximum((num_pages - 1) * PAGE_SIZE + tl.load(last_page_len_ptr + b), 0)
        # Equal shares rounded up to whole blocks, so only a split's last block is ragged; the splits past
        # the sequence's end get an empty range.
        chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, length)

        rows = tl.arange(0, GP)  # the group's query heads, padded to a power of two (16 for tl.dot)
        row_ok = rows < G
        heads = h * G + rows
        d = tl.arange(0, D)
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=row_ok[:, None], other=0.0
        )
        if DOT_F32 or not USE_DOT:
            q = q.to(tl.float32)
        m = tl.full([GP], float("-inf"), tl.float32)
        l = tl.zeros([GP], tl.float32)  # noqa: E741
        acc = tl.zeros([GP, D], tl.float32)
        k_head = k_ptr + h * stride_kh
        v_head = v_ptr + h * stride_vh
        for start in range(lo, hi, BLOCK_N):
            tok = start + tl.arange(0, BLOCK_N)
            ok = tok < hi
            if PAGE_SIZE == 1:
                slot = tl.load(kv_indices_ptr + first_page + tok, mask=ok, other=0)
            else:
                page = tl.load(kv_indices_ptr + first_page + tok // PAGE_SIZE, mask=ok, other=0)
                slot = page * PAGE_SIZE + tok % PAGE_SIZE
            # A pool of millions of slots times Hk * D elements overflows int32 offsets.
            slot = slot.to(tl.int64)
            k = tl.load(k_head + slot[:, None] * stride_kn + d[None, :], mask=ok[:, None], other=0.0)
            if KV_FP8:  # stored unscaled (a scale of 1): widened to q's type, the MMA takes one type
                k = k.to(q_ptr.dtype.element_ty)
            if USE_DOT:
                if DOT_F32:
                    k = k.to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            else:
                s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
            s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
            # Every block holds at least one token of the range, so m_new is finite from the first block on.
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)  # noqa: E741
            # Masked: a NaN in a row past the end would survive its zero weight.
            v = tl.load(v_head + slot[:, None] * stride_vn + d[None, :], mask=ok[:, None], other=0.0)
            if KV_FP8:
                v = v.to(q_ptr.dtype.element_ty)
            if USE_DOT:
                # The weights in V's dtype, as FlashAttention does: the MMA takes two operands of one type.
                p = p.to(v.dtype)
                if DOT_F32:
                    p = p.to(tl.float32)
                    v = v.to(tl.float32)
                pv = tl.dot(p, v, input_precision=DOT_PRECISION)
            else:
                pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
            acc = acc * alpha[:, None] + pv
            m = m_new
        o = acc / tl.where(l > 0, l, 1.0)[:, None]  # an empty range: zeros, not 0 / 0
        if SPLITS == 1:
            dst = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
            tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:
            part = (b * HQ + heads) * SPLITS + split
            tl.store(part_out_ptr + part[:, None] * D + d[None, :], o, mask=row_ok[:, None])
            # In base 2 like the scores; log2(0) makes an empty split's -inf.
            tl.store(part_lse_ptr + part, m + tl.log2(l), mask=row_ok)

    @triton.jit
    def merge_splits(
        part_out_ptr,
        part_lse_ptr,
        out_ptr,
        stride_ob,
        stride_oh,
        HQ: tl.constexpr,
        D: tl.constexpr,
        SPLITS: tl.constexpr,
        SP: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, SP)
        d = tl.arange(0, D)
        part = (b * HQ + h) * SPLITS + s
        lse = tl.load(part_lse_ptr + part, mask=s < SPLITS, other=float("-inf"))
        live = lse > float("-inf")
        w = tl.where(live, tl.exp2(lse - tl.max(lse, axis=0)), 0.0)
        o = tl.load(part_out_ptr + part[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
        den = tl.sum(w, axis=0)
        out = tl.sum(w[:, None] * o, axis=0) / tl.where(den > 0, den, 1.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))

    return decode_split, merge_splits


def choose_splits(
    batch_size: int, num_kv_heads: int, max_context_hint: int, block_n: int, num_sms: int
) -> int:
    """KV splits per sequence: 1 when batch x KV heads already gives every SM PROGRAMS_PER_SM programs, else
    enough to reach that, but no more than a `max_context_hint`-token sequence has blocks (the rest would
    only ever be empty) and MAX_SPLITS."""
    programs = batch_size * num_kv_heads
    target = PROGRAMS_PER_SM * num_sms
    if programs >= target:
        return 1
    return max(1, min(-(-target // programs), -(-max_context_hint // block_n), MAX_SPLITS))


@dataclass(frozen=True)
class DecodePlan:
    """A fixed launch shape and its scratch, for batches of exactly `batch_size` sequences."""

    batch_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    num_splits: int
    block_n: int
    num_warps: int
    num_stages: int
    use_dot: bool
    partial_out: torch.Tensor  # [B, Hq, splits, D] float32: each split's normalised output
    partial_lse: torch.Tensor  # [B, Hq, splits] float32: each split's log2-sum-exp2 of its scaled scores

    def decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_indptr: torch.Tensor,
        kv_indices: torch.Tensor,
        sm_scale: float,
        out: torch.Tensor,
        kv_last_page_len: torch.Tensor | None = None,
        order: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """out [B, Hq, D] = softmax(q k^T * sm_scale) v per sequence, for q [B, Hq, D] and one layer's
        k, v [num_slots, Hk, D] (q's dtype, or float8_e4m3fn holding the values unscaled). Sequence i reads the pages kv_indices[kv_indptr[i]:kv_indptr[i + 1]]
        (int32, on q's device; with page size 1 they are the slots), the last one holding
        kv_last_page_len[i] tokens when pages are larger. Query head j attends with KV head j // G. A
        sequence with no tokens gets zeros. Returns `out`. `order` (int32 [B], a permutation of the
        sequences, longest first) only changes which programs start first: on a ragged batch it keeps the
        longest sequences from starting last and running alone.

        Only shapes are checked (host metadata): nothing here reads the device, so the call can be captured
        in a CUDA graph, after one call outside it (Triton compiles on the first launch)."""
        b, hq, d, hk = self.batch_size, self.num_q_heads, self.head_dim, self.num_kv_heads
        if q.shape != (b, hq, d) or out.shape != (b, hq, d) or kv_indptr.shape != (b + 1,):
            raise ValueError(
                f"this plan decodes q/out [{b}, {hq}, {d}] with kv_indptr [{b + 1}], got q {tuple(q.shape)}, "
                f"out {tuple(out.shape)}, kv_indptr {tuple(kv_indptr.shape)}"
            )
        if k.shape[1:] != (hk, d) or v.shape[1:] != (hk, d):
            raise ValueError(
                f"k and v must be [num_slots, {hk}, {d}], got {tuple(k.shape)}, {tuple(v.shape)}"
            )
        if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1 or out.stride(2) != 1:
            raise ValueError("q, k, v and out need contiguous heads (a last stride of 1)")
        if k.dtype != v.dtype or k.dtype not in (q.dtype, torch.float8_e4m3fn):
            raise ValueError(
                f"k and v must both be q's dtype ({q.dtype}) or float8_e4m3fn, got {k.dtype}, {v.dtype}"
            )
        if kv_indptr.dtype != torch.int32 or kv_indices.dtype != torch.int32:
            raise ValueError("kv_indptr and kv_indices must be int32")
        if self.page_size > 1:
            if kv_last_page_len is None or kv_last_page_len.shape != (b,):
                raise ValueError(f"page size {self.page_size} needs kv_last_page_len [{b}]")
        else:
            kv_last_page_len = kv_indptr  # never read with page size 1: any pointer will do
        group = hq // hk
        decode_split, merge_splits = _kernels()
        if order is not None and (order.shape != (b,) or order.dtype != torch.int32):
            raise ValueError(f"order must be int32 [{b}], got {order.dtype} {tuple(order.shape)}")
        decode_split[(hk, b, self.num_splits)](
            q,
            k,
            v,
            kv_indptr,
            kv_indices,
            kv_last_page_len,
            kv_indptr if order is None else order,  # not read without an order
            sm_scale * math.log2(math.e),
            out,
            self.partial_out,
            self.partial_lse,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            out.stride(0),
            out.stride(1),
            HQ=hq,
            G=group,
            GP=max(next_pow2(group), DOT_MIN_ROWS) if self.use_dot else next_pow2(group),
            D=d,
            PAGE_SIZE=self.page_size,
            SPLITS=self.num_splits,
            BLOCK_N=self.block_n,
            USE_DOT=self.use_dot,
            ORDERED=order is not None,
            KV_FP8=k.dtype == torch.float8_e4m3fn,
            # The interpreter (CPU tensors) multiplies bfloat16 operands of tl.dot as their integer bits: it
            # gets float32 operands holding the same values, so it computes what the GPU's MMA does.
            DOT_F32=not q.is_cuda,
            # float32 inputs stay float32 in the MMA (TF32 would cost them 13 bits); half types ignore it.
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )
        if self.num_splits > 1:
            merge_splits[(b, hq)](
                self.partial_out,
                self.partial_lse,
                out,
                out.stride(0),
                out.stride(1),
                HQ=hq,
                D=d,
                SPLITS=self.num_splits,
                SP=next_pow2(self.num_splits),
                num_warps=4,
            )
        return out


def plan(
    batch_size: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_context_hint: int,
    *,
    device: torch.device | str = "cuda",
    page_size: int = 1,
    num_splits: int | None = None,
    block_n: int = BLOCK_N,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
    use_dot: bool | None = None,
    num_sms: int | None = None,
) -> DecodePlan:
    """The launch shape for decoding `batch_size` sequences of up to about `max_context_hint` tokens (longer
    ones are still right, they just get no more splits), with its scratch allocated once. `num_splits`,
    `use_dot` (tensor cores or CUDA-core products) and `num_sms` override what is derived from the shape and
    the device."""
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not split into groups over {num_kv_heads} KV heads")
    for name, n in (("head_dim", head_dim), ("page_size", page_size), ("block_n", block_n)):
        if n < 1 or n & (n - 1):
            raise ValueError(f"{name} must be a power of two, got {n}")
    if use_dot is None:
        use_dot = num_q_heads // num_kv_heads >= DOT_MIN_GROUP
    if use_dot and (block_n < DOT_MIN_ROWS or head_dim < DOT_MIN_ROWS):
        raise ValueError(f"tl.dot needs block_n and head_dim of at least {DOT_MIN_ROWS}")
    device = torch.device(device)
    if num_sms is None:
        num_sms = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else H200_SMS
        )
    if num_splits is None:
        num_splits = choose_splits(batch_size, num_kv_heads, max_context_hint, block_n, num_sms)
    scratch = (batch_size, num_q_heads, num_splits) if num_splits > 1 else (0, 0, 0)
    return DecodePlan(
        batch_size=batch_size,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        page_size=page_size,
        num_splits=num_splits,
        block_n=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
        use_dot=use_dot,
        partial_out=torch.empty(*scratch, head_dim, dtype=torch.float32, device=device),
        partial_lse=torch.empty(scratch, dtype=torch.float32, device=device),
    )
