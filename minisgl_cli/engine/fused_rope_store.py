"""One Triton kernel from the fused q|k|v projection to attention's inputs: per-head RMSNorm of q and k
(Qwen3), rope on both, q written out contiguous and k/v written into the layer's KV pool slots.

Unfused, those are up to eight launches per layer (two norms and the copies that make their strided heads
contiguous, rope, q's copy for the attention kernel, the two K/V stores), each a full pass over the tensor:
at batch 1 a decode step is mostly such small kernels between the GEMVs, at batch 256 they are a tenth of
Qwen3-0.6B's step. One program handles one head of one token, so every value is read once and written once.

Numbers are those of the unfused kernel path on CUDA (FlashInfer's rmsnorm, then its rope): the norm is
computed in float32 and rounded to the activation dtype, rope reads that and rounds once more. The PyTorch
path (layers/rmsnorm.py, layers/rope.py) is the reference; it rounds the norm before its weight multiply, so
the two differ by the dtype's rounding.
"""

from __future__ import annotations

import functools

import torch

from minisgl_cli.engine.kernels import have_triton, use_kernels
from minisgl_cli.engine.layers.fp8 import FP8


@functools.cache
def _kernel():  # type: ignore[no-untyped-def]
    """The jitted kernel, built on first use: importing Triton costs time, and the CPU never needs it."""
    import triton
    import triton.language as tl

    # A step's positions and slots are views into one uploaded tensor at offsets that vary from step to step:
    # without this, Triton would compile a variant for each alignment it meets, at run time.
    @triton.jit(do_not_specialize_on_alignment=["pos_ptr", "slots_ptr"])
    def qkv_rope_store(
        qkv_ptr,
        qkv_stride,
        pos_ptr,
        cos_sin_ptr,
        q_weight_ptr,
        k_weight_ptr,
        eps,
        q_out_ptr,
        slots_ptr,
        k_cache_ptr,
        v_cache_ptr,
        HQ: tl.constexpr,
        HK: tl.constexpr,
        D: tl.constexpr,
        HAS_NORM: tl.constexpr,
        KV_FP8: tl.constexpr,
    ):
        t = tl.program_id(0)
        h = tl.program_id(1)  # q heads, then k heads, then v heads
        half = tl.arange(0, D // 2)
        src = qkv_ptr + t.to(tl.int64) * qkv_stride + h * D
        out_ty = q_out_ptr.dtype.element_ty
        kv_ty = k_cache_ptr.dtype.element_ty
        if h >= HQ + HK:  # v: copied into its slot as it is (FP8: saturated and rounded)
            slot = tl.load(slots_ptr + t)
            dst = v_cache_ptr + slot * (HK * D) + (h - HQ - HK) * D
            v1 = tl.load(src + half)
            v2 = tl.load(src + D // 2 + half)
            if KV_FP8:  # e4m3fn has no infinity: past 448 (its largest finite value) would round to NaN
                v1 = tl.clamp(v1.to(tl.float32), -448.0, 448.0).to(kv_ty)
                v2 = tl.clamp(v2.to(tl.float32), -448.0, 448.0).to(kv_ty)
            tl.store(dst + half, v1)
            tl.store(dst + D // 2 + half, v2)
        else:
            x1 = tl.load(src + half).to(tl.float32)
            x2 = tl.load(src + D // 2 + half).to(tl.float32)
            if HAS_NORM:
                if h < HQ:
                    w_ptr = q_weight_ptr
                else:
                    w_ptr = k_weight_ptr
                r = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / D + eps)
                w1 = tl.load(w_ptr + half).to(tl.float32)
                w2 = tl.load(w_ptr + D // 2 + half).to(tl.float32)
                x1 = (x1 * r * w1).to(out_ty).to(tl.float32)
                x2 = (x2 * r * w2).to(out_ty).to(tl.float32)
            pos = tl.load(pos_ptr + t)
            cos = tl.load(cos_sin_ptr + pos * D + half)
            sin = tl.load(cos_sin_ptr + pos * D + D // 2 + half)
            o1 = (x1 * cos - x2 * sin).to(out_ty)
            o2 = (x2 * cos + x1 * sin).to(out_ty)
            if h < HQ:
                dst = q_out_ptr + t.to(tl.int64) * (HQ * D) + h * D
                tl.store(dst + half, o1)
                tl.store(dst + D // 2 + half, o2)
            else:
                slot = tl.load(slots_ptr + t)
                dst = k_cache_ptr + slot * (HK * D) + (h - HQ) * D
                if KV_FP8:  # k rounded to the activation dtype first, as the unfused store sees it
                    tl.store(dst + half, tl.clamp(o1.to(tl.float32), -448.0, 448.0).to(kv_ty))
                    tl.store(dst + D // 2 + half, tl.clamp(o2.to(tl.float32), -448.0, 448.0).to(kv_ty))
                else:
                    tl.store(dst + half, o1)
                    tl.store(dst + D // 2 + half, o2)

    return qkv_rope_store


def can_fuse(qkv: torch.Tensor, head_dim: int, kv_dtype: torch.dtype) -> bool:
    """Whether the fused kernel serves this projection output: where the other fused kernels run (CUDA,
    half precision, kernels not turned off), Triton is there, heads are a power of two wide and the KV pool
    holds the activations' dtype or FP8."""
    pow2 = head_dim >= 2 and head_dim & (head_dim - 1) == 0
    return pow2 and kv_dtype in (qkv.dtype, FP8) and use_kernels(qkv) and have_triton()


def qkv_rope_store(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """q [T, num_heads, head_dim], normed (when `q_norm` = (q weight, k weight, eps)) and rotated, from qkv
    [T, (num_heads + 2 * num_kv_heads) * head_dim]; k (normed, rotated) and v are written to `k_cache` and
    `v_cache` [num_slots, num_kv_heads, head_dim] at `slots` [T], in the caches' dtype (qkv's, or FP8
    unscaled and saturated at 448 as KVPool.store writes it). positions [T] index cos_sin
    [max_positions, head_dim] (cos | sin, float32)."""
    tokens = qkv.shape[0]
    if qkv.stride(1) != 1 or head_dim < 2 or head_dim & (head_dim - 1):
        raise ValueError("qkv_rope_store needs a row-major qkv and a power-of-two head_dim")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and cos_sin.is_contiguous()):
        raise ValueError("qkv_rope_store needs contiguous K/V caches and rope table")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (qkv.dtype, FP8):
        raise ValueError("qkv_rope_store writes the activations' dtype or FP8: the K/V caches must hold it")
    q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if tokens == 0:
        return q
    q_weight, k_weight, eps = q_norm if q_norm is not None else (q, q, 0.0)
    _kernel()[(tokens, num_heads + 2 * num_kv_heads)](
        qkv,
        qkv.stride(0),
        positions,
        cos_sin,
        q_weight,
        k_weight,
        eps,
        q,
        slots,
        k_cache,
        v_cache,
        HQ=num_heads,
        HK=num_kv_heads,
        D=head_dim,
        HAS_NORM=q_norm is not None,
        KV_FP8=k_cache.dtype == FP8,
        num_warps=1,
    )
    return q
