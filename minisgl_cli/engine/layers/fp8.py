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


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] @ (FP8 weight [N, K] * scale[N])^T (+ bias), in x's dtype."""
    n, k = weight.shape
    if (
        _scaled_mm_serves(x.device)
        and x.dtype == torch.bfloat16  # row-wise scales in _scaled_mm: bf16 out, dims in 16s
        and n % 16 == 0
        and k % 16 == 0
    ):
        rows = x.reshape(-1, k)
        # Each token's own scale (dynamic, per token), so one large activation does not flatten the rest.
        x_scale = (rows.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=_TINY)
        x_q = (rows.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
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
