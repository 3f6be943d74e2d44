"""Attention backends behind one interface; `create_backend` picks them by name.

A name is "torch", "flashinfer", "auto" (flashinfer where it can run: CUDA, half precision, FlashInfer
installed; torch otherwise), or a "PREFILL,DECODE" pair of those, which runs prefill/extend steps on the
first and decode steps on the second.
"""

from __future__ import annotations

import torch

from minisgl_cli.engine.attention.base import AttentionBackend
from minisgl_cli.engine.kernels import flashinfer
from minisgl_cli.engine.kv.page_table import PageTable
from minisgl_cli.engine.kv.pool import KVPool
from minisgl_cli.errors import UsageError

BACKENDS = ("auto", "torch", "flashinfer")

__all__ = ["BACKENDS", "AttentionBackend", "create_backend", "resolve_backend_names"]


def resolve_backend_names(name: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(prefill, decode) concrete backend names for a setting such as "auto" or "flashinfer,torch"."""
    parts = name.split(",")
    if len(parts) > 2 or any(p not in BACKENDS for p in parts):
        raise UsageError(
            f"unknown attention backend {name!r} (choose from: {', '.join(BACKENDS)}, or a PREFILL,DECODE pair)"
        )
    fits = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and flashinfer() is not None
    concrete = [("flashinfer" if fits else "torch") if p == "auto" else p for p in parts]
    return concrete[0], concrete[-1]


def create_backend(
    name: str,
    *,
    kv_pool: KVPool,
    page_table: PageTable,
    num_heads: int,
    head_dim: int,
    page_size: int,
    prefill_kernel: str = "auto",
    decode_kernel: str = "auto",
    dtype: torch.dtype | None = None,
) -> AttentionBackend:
    """The backend (or prefill/decode pair) called `name`, for activations of `dtype` (default: the pool's;
    an FP8 pool holds a bf16/fp16 model's K/V)."""
    dtype = kv_pool.dtype if dtype is None else dtype
    prefill, decode = resolve_backend_names(name, kv_pool.device, dtype)
    if kv_pool.dtype == torch.float8_e4m3fn and decode == "flashinfer":
        from minisgl_cli.engine.attention.flashinfer_backend import fp8_decode_refusal

        refusal = fp8_decode_refusal(decode_kernel)
        if refusal is not None:
            raise UsageError(refusal)
    made: dict[str, AttentionBackend] = {}

    def make(kind: str) -> AttentionBackend:
        if kind not in made:
            if kind == "torch":
                from minisgl_cli.engine.attention.torch_backend import TorchBackend

                made[kind] = TorchBackend(kv_pool, page_table, num_heads=num_heads, head_dim=head_dim)
            else:
                from minisgl_cli.engine.attention.flashinfer_backend import FlashInferBackend

                made[kind] = FlashInferBackend(
                    kv_pool,
                    page_table,
                    num_heads=num_heads,
                    head_dim=head_dim,
                    page_size=page_size,
                    prefill_kernel=prefill_kernel,
                    decode_kernel=decode_kernel,
                    dtype=dtype,
                )
        return made[kind]

    if prefill == decode:
        return make(prefill)
    from minisgl_cli.engine.attention.split_backend import SplitBackend

    return SplitBackend(make(prefill), make(decode))
