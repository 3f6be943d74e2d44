"""Device and dtype resolution ("auto" included) and KV-cache sizing."""

from __future__ import annotations

import torch

from minisgl_cli.errors import MinisglError, UsageError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Without an explicit size, a CPU KV pool holds at most this many tokens or bytes, whichever is less.
DEFAULT_CPU_KV_TOKENS = 65536
DEFAULT_CPU_KV_BYTES = 4 << 30


def resolve_device(spec: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; "cpu", "cuda", "cuda:N" as given (checked)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"invalid device {spec!r}: expected auto, cpu, cuda or cuda:N") from None
    # A device this machine lacks is the user's request to change (exit 2), like a path that does not exist.
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"device {spec!r} was asked for but this torch build sees no CUDA GPU: "
                "use --device cpu (or auto)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {spec!r} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise UsageError(f"invalid device {spec!r}: expected auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """ "auto" -> bfloat16 on CUDA, float32 on CPU (where bfloat16 matmuls are slow and less exact)."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec not in _DTYPES:
        raise UsageError(f"invalid dtype {spec!r}: expected auto, {', '.join(_DTYPES)}")
    return _DTYPES[spec]


def kv_cache_tokens(
    *,
    device: torch.device,
    bytes_per_token: int,
    kv_cache_tokens: int | None,
    kv_cache_gb: float | None,
    mem_fraction: float,
) -> int:
    """How many tokens the KV pool should hold.

    An explicit token count wins, then an explicit size in GiB. Otherwise on CUDA weights and KV cache
    together get `mem_fraction` of the GPU's memory (SGLang's static fraction): the pool takes that share
    minus what is in use now (call this after the weights are loaded), and the rest stays free for
    activations, CUDA graphs and FlashInfer's workspace. On CPU: min(DEFAULT_CPU_KV_TOKENS,
    DEFAULT_CPU_KV_BYTES worth of tokens).
    """
    if kv_cache_tokens is not None:
        return kv_cache_tokens
    if kv_cache_gb is not None:
        return int(kv_cache_gb * (1 << 30)) // bytes_per_token
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        budget = int(total * mem_fraction) - used
        if budget < bytes_per_token:
            gib = 1 << 30
            raise MinisglError(
                f"--mem-fraction {mem_fraction} gives weights and KV cache {total * mem_fraction / gib:.1f} GiB "
                f"of the GPU's {total / gib:.1f} GiB, but {used / gib:.1f} GiB is already in use (the weights "
                "and anything else on the GPU): raise --mem-fraction or use a smaller model"
            )
        return budget // bytes_per_token
    return min(DEFAULT_CPU_KV_TOKENS, DEFAULT_CPU_KV_BYTES // bytes_per_token)


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device; None on CPU (we do not police host RAM)."""
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0]
