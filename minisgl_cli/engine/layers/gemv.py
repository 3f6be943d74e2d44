"""y = x W^T for one row of x (a batch-1 decode step), as a Triton kernel that streams W at the memory's rate.

At batch 1 a decode step is a walk over the weights. cuBLAS streams the wide projections of an 8B model well
(gate_up at 4.1 TB/s on an H200) but not those with as many or fewer outputs than inputs: o_proj 2.7 TB/s,
down 3.8 TB/s, each with a split-K reduction kernel after it. Here one program owns BLOCK_N output rows over
the whole of K, so nothing is reduced across programs and each row of W is read once, in long contiguous runs:
o_proj 3.25 TB/s, down 3.95 TB/s (scripts/gemv_bench.py, the H200, weights streamed from memory, not L2).

Where it loses (more outputs than inputs: qkv, gate_up, the LM head) cuBLAS keeps the call, and with more
than one row cuBLAS's GEMM reuses each W tile across rows, which a one-row kernel cannot. The kernel
accumulates in float32 and rounds once, as cuBLAS does; only the order of the sum differs. So a request decoded
alone can differ in the last bit from the same request in a batch (as it already could between the kernels cuBLAS
picks for different batch sizes).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from minisgl_cli.engine.kernels import have_triton, use_kernels

# The launch shape that streamed best over all the measured projections of 4096 rows and more (block_n 16
# against 4 and 8, block_k 1024 against 256 and 512, 4 warps against 8; pipelining stages made no difference).
BLOCK_N = 16
BLOCK_K = 1024
NUM_WARPS = 4
# Fewer rows than that leave too few programs of 16 rows to keep the memory busy: one row a program there
# (scripts/moe_bench.py, H200: Qwen3-30B-A3B's o_proj 2048 x 4096 7.65 -> 5.91 us, its router 128 x 2048
# 3.53 -> 2.53 us).
SMALL_N = 4096
SMALL_BLOCK_N = 1
# An FP8 weight's rows are half as many bytes: 8 rows a program, and blocks of 512 where there are more outputs
# than inputs (qkv, gate_up), 1024 otherwise, were the best of 18 launch shapes over llama-3.1-8b's and
# qwen3-8b's projections (scripts/fp8_gemm_bench.py on an H100: llama-3.1-8b's four 97.0 -> 89.3 us a layer
# against 16 x 1024).
FP8_BLOCK_N = 8
FP8_BLOCK_K_WIDE = 512


@functools.cache
def _kernel():  # type: ignore[no-untyped-def]
    """Built on first use, so importing this module never imports Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(x_ptr, w_ptr, b_ptr, s_ptr, out_ptr, N, K, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * K
        # A [BLOCK_N, BLOCK_K] tile of partial sums, reduced once at the end: no shuffles inside the loop.
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            col_ok = (k + cols) < K
            x = tl.load(x_ptr + k + cols, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(w_rows + k + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_SCALE:  # an FP8 weight's scale per row, applied once to the row's sum
            y *= tl.load(s_ptr + rows, mask=row_ok, other=0.0)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)

    return gemv


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, block_n: int | None = None,
         block_k: int | None = None, num_warps: int = NUM_WARPS,
         scale: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """x [1, K] @ weight [N, K]^T (+ bias) through the Triton kernel; with `scale` [N] (float32) the weight
    is FP8 and row r stands for weight[r] * scale[r] (layers/fp8.py). The launch shape can be overridden
    (scripts/gemv_bench.py sweeps it)."""
    n, k = weight.shape
    fp8 = weight.dtype == torch.float8_e4m3fn
    if block_n is None:
        block_n = SMALL_BLOCK_N if n < SMALL_N else FP8_BLOCK_N if fp8 else BLOCK_N
    if block_k is None:
        block_k = FP8_BLOCK_K_WIDE if fp8 and n > k else BLOCK_K
    if scale is not None and scale.shape != (n,):
        raise ValueError(f"gemv's scale is one float32 per weight row: [{n}], got {tuple(scale.shape)}")
    if x.shape != (1, k) or not (x.is_contiguous() and weight.is_contiguous()):
        raise ValueError(
            f"gemv takes one contiguous row of {k} and a contiguous [N, {k}] weight, got {tuple(x.shape)}"
        )
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    b = weight if bias is None else bias  # any pointer when HAS_BIAS is off: the kernel never reads it
    _kernel()[(-(-n // block_n),)](
        x,
        weight,
        b,
        weight if scale is None else scale,
        out,
        n,
        k,
        HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return out


def serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel beats cuBLAS on this call: one row on CUDA in half precision, no more outputs than
    inputs (measured: it wins on o_proj and down, loses on qkv and gate_up), a row-major weight."""
    return (
        x.dim() == 2
        and x.shape[0] == 1
        and weight.shape[0] <= weight.shape[1]
        and use_kernels(x)
        and have_triton()
        and weight.dtype == x.dtype
        and weight.is_contiguous()
        and x.is_contiguous()
    )


def serves_fp8(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes this FP8 weight's call: one row on CUDA in half precision, any shape (the
    alternative, torch._scaled_mm, would first quantize the row, and at one row streams no faster)."""
    return (
        x.dim() == 2
        and x.shape[0] == 1
        and weight.dtype == torch.float8_e4m3fn
        and use_kernels(x)
        and have_triton()
        and weight.is_contiguous()
        and x.is_contiguous()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the Triton GEMV where it streams faster than cuBLAS."""
    if serves(x, weight):
        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)
