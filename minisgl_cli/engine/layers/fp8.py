"""FP8 (float8_e4m3fn) weights: quantizing a model's linears at load, dequantizing FP8 checkpoints, the matmul.

A quantized linear keeps its weight in FP8 with one float32 scale per output row (w ~ q * scale[row]), the
scale taken from the row's largest magnitude so it maps to FP8's largest finite value, 448. On a Hopper GPU
the matmul is `torch._scaled_mm`: each token's activations are quantized on the fly with a scale of their own
(dynamic, per token), and the FP8 x FP8 product is rescaled by both scales into the activation dtype. Elsewhere
(the CPU, and the reference) the weight is dequantized to the activation dtype and multiplied as usual.

FP8 checkpoints as published store `<name>.weight` in FP8 beside a scale: `weight_scale_inv` per block of
weight_block_size (128 x 128 in the Qwen3-*-FP8 and DeepSeek-style releases) or one per tensor. They are
dequantized as they load (`dequantize`), so slicing for tensor parallelism works on plain values whatever the
blocks; `--quantization fp8` then quantizes the slices again, per row.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from minisgl_cli.engine.kernels import have_triton, next_pow2, use_kernels
from minisgl_cli.engine.layers import gemv

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
_TINY = 1e-12  # an all-zero row's scale: any positive number keeps 0 / scale = 0


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (FP8 [N, K], float32 scales [N]) with weight ~ q * scale[:, None]."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=_TINY)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    index: tuple[slice, ...],
    full_shape: list[int],
    block: tuple[int, int] | None,
) -> torch.Tensor:
    """The float32 values of `q`, the part `index` (slices of each dimension) of an FP8 checkpoint tensor of
    `full_shape`, whose `scale` multiplies blocks of `block` entries ([ceil(N / bn), ceil(K / bk)] scales) or
    the whole tensor (`block` None: one scale). Each entry takes the scale of the block it sits in, so a part
    need not start on a block boundary."""
    values = q.float()
    if block is None:
        return values * scale.float().reshape(())
    if q.dim() != 2:
        raise ValueError(f"block-scaled FP8 tensors are matrices, not {q.dim()}-D")
    rows, cols = (torch.arange(full_shape[d])[index[d] if d < len(index) else slice(None)] for d in range(2))
    per_entry = scale.float().index_select(0, rows // block[0]).index_select(1, cols // block[1])
    return values * per_entry


@functools.cache
def _scaled_mm_serves(device: torch.device) -> bool:
    """torch._scaled_mm with per-row scales needs an FP8 tensor-core GPU: compute capability 8.9 or 9.0+."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@functools.cache
def _quantize_kernel():  # type: ignore[no-untyped-def]
    """Built on first use, so importing this module never imports Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_tokens(x_ptr, q_ptr, scale_ptr, K, stride_x, BLOCK: tl.constexpr):
        # One program a token: its largest magnitude, then the row divided by its scale. Two passes over a
        # row of a few KB, the second from L2; one launch where the torch expression takes five.
        t = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        peak = tl.zeros([BLOCK], tl.float32)
        for k in range(0, K, BLOCK):
            x = tl.load(x_ptr + t * stride_x + k + cols, mask=k + cols < K, other=0.0).to(tl.float32)
            peak = tl.maximum(peak, tl.abs(x))
        scale = tl.maximum(tl.max(peak, axis=0) / 448.0, 1e-12)  # FP8_MAX and _TINY
        tl.store(scale_ptr + t, scale)
        for k in range(0, K, BLOCK):
            ok = k + cols < K
            x = tl.load(x_ptr + t * stride_x + k + cols, mask=ok, other=0.0).to(tl.float32)
            q = tl.clamp(x / scale, -448.0, 448.0)
            tl.store(q_ptr + t * K + k + cols, q.to(q_ptr.dtype.element_ty), mask=ok)

    return quantize_tokens


def quantize_tokens(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [M, K] -> (FP8 [M, K], float32 scales [M, 1]), one scale per token (its largest magnitude maps to
    448): a Triton kernel where kernels run, the same arithmetic in torch elsewhere."""
    m, k = rows.shape
    if use_kernels(rows) and have_triton() and rows.stride(1) == 1:
        q = torch.empty(m, k, dtype=FP8, device=rows.device)
        scale = torch.empty(m, 1, dtype=torch.float32, device=rows.device)
        if m:
            _quantize_kernel()[(m,)](rows, q, scale, k, rows.stride(0), BLOCK=min(next_pow2(k), 4096))
        return q, scale
    scale = (rows.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=_TINY)
    return (rows.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] @ (FP8 weight [N, K] * scale[N])^T (+ bias), in x's dtype.

    One token on a GPU (a batch-1 decode step) goes through the Triton GEMV, which widens the FP8 rows as it
    streams them and applies each row's scale to its sum: the weight is read once at half bf16's bytes, and
    the activations stay unquantized. More tokens go through torch._scaled_mm on FP8 tensor cores."""
    n, k = weight.shape
    if gemv.serves_fp8(x, weight):
        return gemv.gemv(x, weight, bias, scale=scale)
    if (
        _scaled_mm_serves(x.device)
        and x.dtype == torch.bfloat16  # row-wise scales in _scaled_mm: bf16 out, dims in 16s
        and n % 16 == 0
        and k % 16 == 0
    ):
        # Each token's own scale (dynamic, per token), so one large activation does not flatten the rest.
        x_q, x_scale = quantize_tokens(x.reshape(-1, k))
        out = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale, scale_b=scale.view(1, n), out_dtype=x.dtype)
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], n)
    return F.linear(x, (weight.float() * scale[:, None]).to(x.dtype), bias)


def quantize_linears(model: nn.Module) -> int:
    """Every tensor-parallel linear of `model` (q/k/v, o, gate/up, down; not the embedding, LM head, router
    or experts) to FP8 weights with per-row scales, in place; returns how many. The old weight is freed
    layer by layer, so the peak is the unquantized model, not both."""
    from minisgl_cli.engine.layers.linear import MergedLinear, RowParallelLinear

    count = 0
    for module in model.modules():
        if isinstance(module, MergedLinear | RowParallelLinear) and module.weight_scale is None:
            q, scale = quantize_rows(module.weight.data)
            module.weight = nn.Parameter(q, requires_grad=False)
            module.weight_scale = nn.Parameter(scale, requires_grad=False)
            count += 1
    return count
