"""FlashInfer's fused kernels, when they can serve a tensor: CUDA, FlashInfer installed, a dtype it has.

Layers ask `use_kernels(x)` and otherwise run their plain-PyTorch code, which is the reference on every
device (and the only path on CPU). `MINISGL_NO_KERNELS=1` forces that path on CUDA too: the GPU tests run
both and compare them.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

# FlashInfer's norm, activation and rope kernels are built for half precision; float32 stays on PyTorch.
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def flashinfer() -> ModuleType | None:
    """The flashinfer package, or None where it is missing or cannot load (no CUDA, a broken install)."""
    if not torch.cuda.is_available():
        return None
    try:
        import flashinfer as module
    except Exception:  # noqa: BLE001 - an optional accelerator: any import failure means "not here"
        return None
    return module


# Read once: layers consult it on every call. Tests flip it with monkeypatch.
ENABLED = os.environ.get("MINISGL_NO_KERNELS", "").lower() not in ("1", "true", "yes")


def use_kernels(x: torch.Tensor) -> bool:
    """Whether the fused FlashInfer kernels should run on `x` (checked per call: a Python attribute read)."""
    return x.is_cuda and x.dtype in _KERNEL_DTYPES and ENABLED and flashinfer() is not None


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (>= 1): Triton's block sizes must be powers of two."""
    return 1 << max(n - 1, 0).bit_length()


@functools.cache
def have_triton() -> bool:
    """Whether Triton imports (it comes with CUDA builds of torch; the Triton kernels need it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
